"""spte_fast._bench: the bench-only hooks, a second extension that cimports the core.

C loops under ``nogil``, so that bench/ can separate a kernel's cost from the call's,
and the bare-C baselines the engine is measured against.  Not part of the public API.
Being a separate module that reaches the kernels through ``cimport spte_fast._core``, it
is also a proof that embedding works.  Every hook checks its arguments as the public API
does, so nothing here can crash the interpreter.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport INT64_MAX, int64_t

from spte_fast._core cimport (
    SHADOW_NONPRESENT_VALUE, SPTE_BASE_ADDR_MASK, SPTE_ENT_PER_PAGE, SPTE_MMU_PRESENT_MASK,
    Vm, __builtin_ctzll, _as_int, _as_u64, _gfn_array, _page_arena, _pages_array, _u64_array,
    bitmap_fetch_andnot_word, count_present_kernel, fill_pages_kernel, kvm_t,
    spte_fetch_and_seq_cst, spte_load_acquire, spte_memset64, spte_store_relaxed,
    spte_try_cmpxchg_seq_cst, u64,
)

from spte_fast.errors import OutOfMemory

cnp.import_array()


cdef extern from *:
    """
    /* C baselines for bench/: a plain (not vectorised) store loop and libc memset. */
    #include <string.h>
    #if defined(__GNUC__) && !defined(__clang__)
    __attribute__((noinline, optimize("no-tree-vectorize")))
    #else
    __attribute__((noinline))
    #endif
    static void spte_bench_store_loop(uint64_t *p, uint64_t v, size_t n) {
        for (size_t i = 0; i < n; i++) p[i] = v;
        __asm__ volatile("" : : "r"(p) : "memory");
    }
    __attribute__((noinline)) static void spte_bench_memset(uint64_t *p, size_t n) {
        memset(p, 0, n * sizeof(uint64_t));
        __asm__ volatile("" : : "r"(p) : "memory");
    }
    """
    void spte_bench_store_loop(u64* p, u64 v, size_t n) noexcept nogil
    void spte_bench_memset(u64* p, size_t n) noexcept nogil


cdef int64_t _count(object n, str name) except -1:
    return _as_int(n, name, 0, INT64_MAX)


def fill_repeat(page, value, reps):
    """memset64 (the engine's fill) over ``page`` (pages), ``reps`` times (cache-hot)."""
    cdef cnp.ndarray arr = _pages_array(page, "page", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef u64 v = _as_u64(value, "value")
    cdef int64_t r = _count(reps, "reps")
    cdef int64_t n = arr.size // SPTE_ENT_PER_PAGE
    cdef int64_t i
    with nogil:
        for i in range(r):
            fill_pages_kernel(p, n, v)


def store_loop_repeat(page, value, reps):
    """C baseline: a plain 8-byte store loop over ``page``, ``reps`` times."""
    cdef cnp.ndarray arr = _pages_array(page, "page", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef u64 v = _as_u64(value, "value")
    cdef int64_t r = _count(reps, "reps")
    cdef size_t n = arr.size
    cdef int64_t i
    with nogil:
        for i in range(r):
            spte_bench_store_loop(p, v, n)


def memset_repeat(page, reps):
    """C baseline: libc memset(0) of ``page``, ``reps`` times."""
    cdef cnp.ndarray arr = _pages_array(page, "page", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef int64_t r = _count(reps, "reps")
    cdef size_t n = arr.size
    cdef int64_t i
    with nogil:
        for i in range(r):
            spte_bench_memset(p, n)


cdef u64* _nonempty(object array, int64_t* size) except NULL:
    cdef cnp.ndarray arr = _u64_array(array, "array", True)
    if arr.size == 0:
        raise ValueError("array is empty")
    size[0] = arr.size
    return <u64*>cnp.PyArray_DATA(arr)


cdef u64 _rmw_loop(object array, object n, bint atomic) except? 0:
    """n updates (old -> old ^ 1) at a large odd stride; returns a checksum.  The same loop
    for both operations, so the pair measures only the difference (GCC unswitches it)."""
    cdef int64_t size
    cdef u64* p = _nonempty(array, &size)
    cdef int64_t k = _count(n, "n")
    cdef int64_t i, j = 0
    cdef u64 old, acc = 0
    with nogil:
        for i in range(k):
            old = spte_load_acquire(p + j)
            if atomic:
                spte_try_cmpxchg_seq_cst(p + j, &old, old ^ 1)
            else:
                spte_store_relaxed(p + j, old ^ 1)
            acc += old
            j = (j + <int64_t>2654435761) % size
    return acc


def cmpxchg_loop(array, n):
    """n compare-and-exchanges (old -> old ^ 1) at a large odd stride; returns a checksum."""
    return _rmw_loop(array, n, True)


def plain_rmw_loop(array, n):
    """Control for cmpxchg_loop: the same loop with a plain read-modify-write."""
    return _rmw_loop(array, n, False)


def scan_repeat(pages, nonpresent_value, reps):
    """count_present over every page, ``reps`` times; returns the total."""
    cdef cnp.ndarray arr = _pages_array(pages, "pages", False)
    cdef const u64* p = <const u64*>cnp.PyArray_DATA(arr)
    cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
    cdef int64_t k = _count(reps, "reps")
    cdef int64_t n = arr.size // SPTE_ENT_PER_PAGE
    cdef int64_t i, r, total = 0
    with nogil:
        for r in range(k):
            for i in range(n):
                total += count_present_kernel(p + i * SPTE_ENT_PER_PAGE, v)
    return total


cdef enum:
    BARE_GFN_LIMIT_SHIFT = 36      # 4 levels


@cython.final
cdef class BareTdp:
    """Bench baseline: the physical limit the engine is measured against.

    A minimal 4-level radix tree of 512-entry tables in one arena: a walk, a
    bump-allocated table filled with the non-present value (memset64), linked
    and installed with compare-and-exchange -- no slots, no stats, no bookkeeping.
    """
    cdef object _arr
    cdef u64* pages
    cdef int64_t capacity
    cdef int64_t next_free
    cdef u64 nonpresent

    def __cinit__(self, capacity, nonpresent=SHADOW_NONPRESENT_VALUE):
        self.capacity = _as_int(capacity, "capacity", 1, 1 << 32)
        self.nonpresent = _as_u64(nonpresent, "nonpresent")
        if self.nonpresent & SPTE_MMU_PRESENT_MASK:
            raise ValueError("nonpresent must not have bit 11 (present) set")
        self._arr = _page_arena(self.capacity, None)
        self.pages = <u64*>cnp.PyArray_DATA(<cnp.ndarray>self._arr)
        self.reset()

    def reset(self):
        """Forget every table (the arena's memory is reused: already faulted in)."""
        spte_memset64(self.pages, self.nonpresent, SPTE_ENT_PER_PAGE)
        self.next_free = 1

    def insert(self, gfns):
        """Install a 4K leaf for every gfn (gfn < 2**36); returns how many were new."""
        cdef cnp.ndarray g_arr = _gfn_array(gfns, "gfns", (<u64>1) << BARE_GFN_LIMIT_SHIFT)
        cdef const u64* g = <const u64*>cnp.PyArray_DATA(g_arr)
        cdef Py_ssize_t n = g_arr.shape[0]
        cdef int64_t added = 0
        with nogil:
            added = self._insert(g, n)
        if added < 0:
            raise OutOfMemory("bare arena exhausted")
        return added

    cdef int64_t _insert(self, const u64* g, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i
        cdef int level
        cdef u64* table
        cdef u64* e
        cdef u64 old, nl
        cdef int64_t child, added = 0
        for i in range(n):
            table = self.pages
            for level in range(4, 1, -1):
                e = table + ((g[i] >> (9 * (level - 1))) & 511)
                old = spte_load_acquire(e)
                if not (old & SPTE_MMU_PRESENT_MASK):
                    if self.next_free >= self.capacity:
                        return -1
                    child = self.next_free
                    self.next_free += 1
                    spte_memset64(self.pages + child * SPTE_ENT_PER_PAGE, self.nonpresent,
                                  SPTE_ENT_PER_PAGE)
                    nl = self.nonpresent | SPTE_MMU_PRESENT_MASK | (<u64>child << 12) | 0x107
                    if spte_try_cmpxchg_seq_cst(e, &old, nl):
                        old = nl
                table = self.pages + ((old & SPTE_BASE_ADDR_MASK) >> 12) * SPTE_ENT_PER_PAGE
            e = table + (g[i] & 511)
            old = self.nonpresent
            if spte_try_cmpxchg_seq_cst(e, &old, self.nonpresent | SPTE_MMU_PRESENT_MASK |
                                        ((g[i] + 0x100000) << 12) | 0x377):
                added += 1
        return added

    def walk(self, gfns):
        """Walk to the leaf of every gfn; returns the sum of the leaves (a checksum)."""
        cdef cnp.ndarray g_arr = _gfn_array(gfns, "gfns", (<u64>1) << BARE_GFN_LIMIT_SHIFT)
        cdef const u64* g = <const u64*>cnp.PyArray_DATA(g_arr)
        cdef Py_ssize_t n = g_arr.shape[0], i
        cdef int level
        cdef u64* table
        cdef u64 e = 0, acc = 0
        with nogil:
            for i in range(n):
                table = self.pages
                for level in range(4, 0, -1):
                    e = spte_load_acquire(table + ((g[i] >> (9 * (level - 1))) & 511))
                    if level == 1 or not (e & SPTE_MMU_PRESENT_MASK):
                        break
                    table = self.pages + ((e & SPTE_BASE_ADDR_MASK) >> 12) * SPTE_ENT_PER_PAGE
                acc += e
        return acc


def bare_clear_dirty(Vm vm, object base_gfn, object bitmap, object bit):
    """Bench baseline for KVM_CLEAR_DIRTY_LOG: for every set bit of ``bitmap`` (uint64 words,
    page i of the slot at ``base_gfn`` is bit i % 64 of word i // 64), clear the bit in the
    dirty bitmap word and ``bit`` in the 4K leaf in ``vm``'s valid root, with the same
    atomics the engine uses (fetch-and-not of the word, fetch-and of each leaf), walking to
    each 64-page table once per word.  No memslot checks, no stats, no handle_changed_spte:
    the physical limit of clearing those bits in those tables.  Returns the leaves changed.

    The tables must be 4K mappings of the slot (a bench precondition: no checks per level
    beyond presence, which is what makes it bare); the root must be valid."""
    cdef kvm_t* kvm = &vm.kvm
    if kvm.nr_roots < 1:
        raise ValueError("the VM has no root yet")
    cdef cnp.ndarray b_arr = _u64_array(bitmap, "bitmap", False)
    cdef const u64* bm = <const u64*>cnp.PyArray_DATA(b_arr)
    cdef Py_ssize_t nwords = b_arr.shape[0]
    cdef u64 base = _as_u64(base_gfn, "base_gfn")
    cdef u64 clear = ~(<u64>1 << _as_int(bit, "bit", 0, 63))
    cdef u64* pages = kvm.pool.pages
    cdef int64_t root = kvm.roots[kvm.nr_roots - 1]
    cdef int root_level = kvm.root_level
    cdef u64 mask, gfn, e, old
    cdef u64* table
    cdef u64* dirty = NULL
    cdef Py_ssize_t w
    for w in range(kvm.nslots):
        if kvm.slots[w].base_gfn == base and kvm.slots[w].dirty_bitmap != NULL:
            dirty = kvm.slots[w].dirty_bitmap
            if <u64>nwords * 64 > kvm.slots[w].npages + 63:
                raise ValueError("bitmap is longer than the slot's dirty bitmap")
    if dirty == NULL:
        raise ValueError("no dirty-logged memslot starts at base_gfn")
    cdef int level, k
    cdef int64_t changed = 0
    with nogil:
        for w in range(nwords):
            mask = bm[w]
            if mask == 0:
                continue
            bitmap_fetch_andnot_word(dirty + w, mask)
            gfn = base + <u64>w * 64
            table = pages + root * SPTE_ENT_PER_PAGE
            for level in range(root_level, 1, -1):
                e = spte_load_acquire(table + ((gfn >> (9 * (level - 1))) & 511))
                if not (e & SPTE_MMU_PRESENT_MASK):
                    break
                table = pages + ((e & SPTE_BASE_ADDR_MASK) >> 12) * SPTE_ENT_PER_PAGE
            else:
                while mask:
                    k = __builtin_ctzll(mask)
                    mask &= mask - 1
                    old = spte_fetch_and_seq_cst(table + ((gfn + k) & 511), clear)
                    changed += (old & ~clear) != 0
    return changed
