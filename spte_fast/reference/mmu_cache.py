"""MemoryCache: Linux v6.10's ``struct kvm_mmu_memory_cache`` for page-table pages.

Models the memory-cache code of ``virt/kvm/kvm_main.c`` (v6.10, commit c23e2b710309 for
``init_value``): ``mmu_memory_cache_alloc_obj``, ``__kvm_mmu_topup_memory_cache``,
``kvm_mmu_memory_cache_alloc`` and ``kvm_mmu_free_memory_cache`` are the module functions
below (KVM's ``__name`` is ``_name`` here: Python would mangle ``__name`` inside a class);
:class:`MemoryCache` is the cache and its validating public methods.  Spec §1.3.
"""
from ..errors import CACHE_WARN_REASONS, CacheConfigError, OutOfMemory
from ._checks import check_int, check_u64
from .kernels import fill_pages
from .pool import PAGE_INIT_STATS, PagePool
from .spte import KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, PAGE_BYTES

MAX_CACHE_OBJS = 1 << 24  # bound on a cache's min and capacity (API.md)


class MemoryCache:
    """KVM's page-backed ``kvm_mmu_memory_cache`` with the 6.10 ``init_value``."""

    def __init__(self, pool, init_value=0, capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
                 gfp_zero=None):
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a PagePool, not {type(pool).__name__}")
        self._pool = pool
        self._init_value = check_u64("init_value", init_value)
        self._default_capacity = check_int("capacity", capacity, 0, MAX_CACHE_OBJS + 1)
        self._gfp_zero = (self._init_value == 0) if gfp_zero is None else bool(gfp_zero)
        self._objects = None  # KVM: NULL until the first real top-up
        self._capacity = 0
        self._warnings = dict.fromkeys(CACHE_WARN_REASONS, 0)
        # The initialisation work this cache did, and the pages it took from the pool.  The
        # pool keeps this record (PagePool.stats sums the records of all its caches).
        self._stats = dict.fromkeys(PAGE_INIT_STATS + ("obtained",), 0)
        pool._register_cache_stats(self._stats)

    pool = property(lambda self: self._pool)
    init_value = property(lambda self: self._init_value)
    gfp_zero = property(lambda self: self._gfp_zero)
    default_capacity = property(lambda self: self._default_capacity)
    capacity = property(lambda self: self._capacity)

    @property
    def warnings(self):
        return sum(self._warnings.values())

    @property
    def warnings_by_reason(self):
        """{reason: count} for exactly the reasons of ``errors.CACHE_WARN_REASONS``."""
        return dict(self._warnings)

    @property
    def nobjs(self):
        return len(self._objects) if self._objects is not None else 0

    def __len__(self):
        return self.nobjs

    @property
    def objects(self):
        return tuple(self._objects or ())

    @property
    def stats(self):
        return dict(self._stats, warnings=self.warnings)

    def topup(self, min, capacity=None):  # noqa: A002 - KVM's parameter name
        """__kvm_mmu_topup_memory_cache(mc, capacity, min) (spec §1.3)."""
        min = check_int("min", min, 0, MAX_CACHE_OBJS + 1)  # noqa: A001
        capacity = (self._default_capacity if capacity is None
                    else check_int("capacity", capacity, 0, MAX_CACHE_OBJS + 1))
        _kvm_mmu_topup_memory_cache(self, capacity, min)

    def alloc(self):
        """kvm_mmu_memory_cache_alloc: LIFO pop; an empty cache WARNs and allocates directly."""
        return kvm_mmu_memory_cache_alloc(self)

    def free(self):
        """kvm_mmu_free_memory_cache: every cached page back to the pool."""
        kvm_mmu_free_memory_cache(self)

    def __repr__(self):
        return (f"MemoryCache(init_value={self._init_value:#x}, gfp_zero={self._gfp_zero}, "
                f"capacity={self._capacity}, nobjs={self.nobjs})")


def _mc_warn(mc, reason):
    """WARN_ON_ONCE in the cache code: counted under its reason, never raised."""
    mc._warnings[reason] += 1


def mmu_memory_cache_alloc_obj(mc):
    """One page from the pool, initialised (alloc_obj, spec §1.3).  OutOfMemory propagates.

    With ``gfp_zero`` (__GFP_ZERO) a page known to be clean is used as is, any other is
    zeroed; then a non-zero ``init_value`` is stored into all 512 entries (memset64).  The
    page stays "raw" in the pool: the caller says who holds it.
    """
    pool = mc._pool
    page = pool.alloc()
    mc._stats["obtained"] += 1
    if mc._gfp_zero:
        if pool.is_clean(page):
            mc._stats["zero_untouched"] += 1
        else:
            fill_pages(pool._pages[page], 0)
            pool._mark_clean(page)
            mc._stats["zero_inits"] += 1
            mc._stats["init_bytes_written"] += PAGE_BYTES
    if mc._init_value != 0:
        fill_pages(pool._pages[page], mc._init_value)
        pool._mark_dirty(page)
        mc._stats["fills"] += 1
        mc._stats["init_bytes_written"] += PAGE_BYTES
    return page


def _kvm_mmu_topup_memory_cache(mc, capacity, min):  # noqa: A002 - KVM's parameter name
    """KVM's __kvm_mmu_topup_memory_cache: CacheConfigError for -EIO, OutOfMemory for
    -ENOMEM (the pages obtained so far stay in the cache)."""
    # 1. Enough objects: nothing else happens (no checks, no allocation).
    if mc.nobjs >= min:
        return
    # 2. First real top-up: configuration checks, then the objects array.
    if mc._objects is None:
        if capacity == 0:
            _mc_warn(mc, "cache-capacity-zero")
            raise CacheConfigError("memory cache top-up with capacity 0")
        if mc._init_value != 0 and mc._gfp_zero:
            _mc_warn(mc, "cache-init-value-gfp-zero")
            raise CacheConfigError(
                f"memory cache with init_value {mc._init_value:#x} and gfp_zero")
        mc._objects = []
        mc._capacity = capacity
    # 3. The capacity may not change across top-ups.
    if mc._capacity != capacity:
        _mc_warn(mc, "cache-capacity-mismatch")
        raise CacheConfigError(
            f"memory cache top-up with capacity {capacity}, recorded {mc._capacity}")
    # 4. Fill up to capacity, not merely to min; what was obtained stays.
    while len(mc._objects) < mc._capacity:
        try:
            page = mmu_memory_cache_alloc_obj(mc)
        except OutOfMemory:
            if len(mc._objects) >= min:
                return
            raise OutOfMemory(
                f"memory cache top-up: {len(mc._objects)} objects, {min} needed") from None
        mc._pool._set_state(page, "cached")
        mc._objects.append(page)


def kvm_mmu_topup_memory_cache(mc, min):  # noqa: A002 - KVM's parameter name
    """The capacity-40 top-up the MMU uses (KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)."""
    _kvm_mmu_topup_memory_cache(mc, KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, min)


def kvm_mmu_memory_cache_alloc(mc):
    """LIFO pop; an empty cache WARNs and obtains one page directly (still initialised)."""
    if mc._objects:
        page = mc._objects.pop()
    else:
        _mc_warn(mc, "cache-alloc-empty")
        page = mmu_memory_cache_alloc_obj(mc)
    mc._pool._set_state(page, "raw")
    return page


def kvm_mmu_free_memory_cache(mc):
    """Every cached page back to the pool, top first (``objects[--nobjs]``, as KVM frees
    them); objects, capacity and nobjs reset."""
    while mc._objects:
        mc._pool._release(mc._objects.pop())
    mc._objects = None
    mc._capacity = 0
