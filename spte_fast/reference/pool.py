"""PagePool: the host pages that page tables are made of.

KVM takes page-table pages from the kernel's page allocator (``__get_free_page`` in
``mmu_memory_cache_alloc_obj``, ``virt/kvm/kvm_main.c``, Linux v6.10) and gives them back
with ``free_page``.  The model's allocator is a fixed array of 4 KiB pages with a free list;
a page's index is its host frame number, so a non-leaf SPTE's pfn names the child table.
"""
import numpy as np

from ..errors import OutOfMemory
from ._checks import check_int, check_u64
from .spte import SPTE_ENT_PER_PAGE

#: The initialisation counters that every memory cache keeps (MemoryCache.stats) and that
#: ``PagePool.stats`` sums over the caches of the pool.
PAGE_INIT_STATS = ("zero_inits", "zero_untouched", "fills", "init_bytes_written")


class PagePool:
    """A fixed array of 4 KiB pages (512 u64 each) with a free list.

    Never-used pages are handed out lowest index first; freed pages are reused LIFO (the most
    recently freed first) before any never-used page.  Per page the pool remembers whether it
    is known to hold only zeros ("clean"): true for never-used pages of an unpoisoned pool and
    for pages a GFP_ZERO cache zeroed; lost when a user writes the page or the page comes back
    through :meth:`free`.  It also remembers who holds each page (:meth:`page_state`); the
    users of the pool (caches, the MMU) report both through private methods.

    The pool counts its own events (allocations, frees, refusals).  Page initialisation is
    counted by the memory cache that does it; the pool keeps every cache's counter record
    (the records outlive the caches) and ``stats`` sums them.
    """

    PAGE_STATES = ("free", "raw", "cached", "table")

    @staticmethod
    def _page_aligned_block(capacity):
        """capacity zeroed pages, each starting on a 4 KiB boundary as a real page-table
        page does (numpy itself only promises 16-byte alignment)."""
        page_bytes = SPTE_ENT_PER_PAGE * 8
        spare = np.zeros((capacity + 1) * SPTE_ENT_PER_PAGE, dtype=np.uint64)
        skip_bytes = -spare.ctypes.data % page_bytes
        first = skip_bytes // 8
        block = spare[first:first + capacity * SPTE_ENT_PER_PAGE]
        return block.reshape(capacity, SPTE_ENT_PER_PAGE)

    def __init__(self, capacity, poison=None):
        capacity = check_int("capacity", capacity, 1)
        poison = None if poison is None else check_u64("poison", poison)
        self._pages = self._page_aligned_block(capacity)
        if poison is not None:
            self._pages.fill(poison)
        self._clean = [poison is None] * capacity
        # A view of a read-only buffer: numpy refuses `flags.writeable = True` on it.
        self._pages_ro = np.asarray(memoryview(self._pages).toreadonly())
        self._capacity = capacity
        self._poison = poison
        self._next_never_used = 0  # pages [_next_never_used, capacity) were never handed out
        self._freed = []  # stack of freed pages; the top is reused first
        self._state = ["free"] * capacity  # see page_state()
        self._fail_budget = None  # fault injection: allocations left before failing, or None
        self._n_allocated = 0
        self._n_freed = 0
        self._n_failed = 0
        self._cache_stats = []  # the stats record of every memory cache created on this pool

    @property
    def capacity(self):
        return self._capacity

    @property
    def poison(self):
        return self._poison

    @property
    def pages(self):
        return self._pages_ro.view()  # a fresh view: reshaping it cannot leak to the next caller

    @property
    def nr_free(self):
        return len(self._freed) + (self._capacity - self._next_never_used)

    def __len__(self):
        return self._capacity

    def alloc(self):
        """Take one page off the free list; its content is unspecified."""
        if self._fail_budget == 0 or self.nr_free == 0:
            self._n_failed += 1
            why = "fault injection" if self.nr_free else "no free page"
            raise OutOfMemory(f"page pool: allocation refused ({why})")
        if self._freed:
            index = self._freed.pop()
        else:
            index = self._next_never_used
            self._next_never_used += 1
        if self._fail_budget is not None:
            self._fail_budget -= 1
        self._state[index] = "raw"
        self._n_allocated += 1
        return index

    def _check_index(self, index):
        return check_int("index", index, 0, self._capacity)

    def free(self, index):
        """Return an allocated page to the free list."""
        index = self._check_index(index)
        if self._state[index] != "raw":
            raise ValueError(f"page {index} was not handed out by alloc() "
                             f"(state {self._state[index]})")
        self._release(index)

    def _release(self, index):
        """Back to the free list (caches and the MMU use this for the pages they own)."""
        self._state[index] = "free"
        self._clean[index] = False  # a page returned to the pool is no longer clean
        self._freed.append(index)
        self._n_freed += 1

    def _free_pages(self):
        """Every page on the free list, freed ones first (for the audit)."""
        return list(self._freed) + list(range(self._next_never_used, self._capacity))

    def fail_after(self, n):
        """Let the next `n` allocations succeed, then refuse all until ``fail_after(None)``."""
        self._fail_budget = None if n is None else check_int("n", n, 0)

    def is_clean(self, index):
        return self._clean[self._check_index(index)]

    def page_state(self, index):
        """"free", "raw" (handed out by an alloc()), "cached" (held by a memory cache) or
        "table" (a page table of a Vm)."""
        return self._state[self._check_index(index)]

    def _mark_dirty(self, index):
        """A user of the pool changed the content of this page (not public)."""
        self._clean[index] = False

    def _mark_clean(self, index):
        """A user of the pool zeroed this page (not public)."""
        self._clean[index] = True

    def _set_state(self, index, state):
        """A user of the pool took this page over (not public)."""
        self._state[index] = state
        if state == "table":
            self._clean[index] = False  # the MMU writes into its tables

    def _register_cache_stats(self, stats):
        """A new memory cache on this pool: keep its counter record for ``stats``."""
        self._cache_stats.append(stats)

    @property
    def stats(self):
        stats = {"allocated": self._n_allocated, "freed": self._n_freed,
                 "in_use": self._n_allocated - self._n_freed, "failed": self._n_failed}
        for key in PAGE_INIT_STATS:
            stats[key] = sum(cache_stats[key] for cache_stats in self._cache_stats)
        return stats

    def __repr__(self):
        return f"PagePool(capacity={self._capacity}, nr_free={self.nr_free})"
