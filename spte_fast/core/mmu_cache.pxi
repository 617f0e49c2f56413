# =====================================================================================
# core/mmu_cache.pxi: kvm_mmu_memory_cache (virt/kvm/kvm_main.c, Linux 6.10)
# =====================================================================================
# The cache a vCPU tops up before a fault and pops page tables from while it holds
# mmu_lock.  6.10's init_value: 0 with gfp_zero is the GFP_ZERO path (never-used pool
# memory is already zero, so only recycled pages are zeroed), anything else is the memset64
# fill at top-up time.  Callers hold mc.lock (the owner's vcpu->mutex).

cdef inline void _cache_warn(kvm_mmu_memory_cache_t* mc, int reason) noexcept nogil:
    mc.warn[reason] += 1
    mc.last_warn = reason


cdef void mmu_memory_cache_init_page(kvm_mmu_memory_cache_t* mc, int64_t idx) noexcept nogil:
    """mmu_memory_cache_alloc_obj's initialisation: GFP_ZERO, then the 6.10 init_value fill."""
    cdef pool_t* p = mc.pool
    cdef u64* page = pool_page(p, idx)
    # __GFP_ZERO first (only reachable together with init_value through an alloc from an
    # empty cache: top-up refuses that combination), then the memset64 fill.
    if mc.gfp_zero:
        if p.clean[idx]:
            i64_add_relaxed(&mc.init.zero_untouched, 1)   # never-used memory is already zero
        else:
            fill_pages_kernel(page, 1, 0)
            i64_add_relaxed(&mc.init.zero_inits, 1)
            i64_add_relaxed(&mc.init.init_bytes_written, 4096)
            p.clean[idx] = 1
    if mc.init_value != 0:
        fill_pages_kernel(page, 1, mc.init_value)
        i64_add_relaxed(&mc.init.fills, 1)
        i64_add_relaxed(&mc.init.init_bytes_written, 4096)
        p.clean[idx] = 0
    # init_value 0 without gfp_zero: KVM's uninitialised cache, the page is handed out as is.


cdef int64_t mmu_memory_cache_alloc_obj(kvm_mmu_memory_cache_t* mc) noexcept nogil:
    cdef int64_t idx = pool_alloc(mc.pool)
    if idx < 0:
        return -1
    mc.obtained += 1
    mmu_memory_cache_init_page(mc, idx)
    return idx


cdef int kvm_mmu_topup_memory_cache(kvm_mmu_memory_cache_t* mc, int capacity,
                                    int min) noexcept nogil:
    """__kvm_mmu_topup_memory_cache (6.10). Returns 0, -SPTE_EIO or -SPTE_ENOMEM."""
    cdef int64_t idx
    if mc.nobjs >= min:
        return 0
    if mc.objects == NULL:
        if capacity == 0:
            _cache_warn(mc, WARN_CACHE_CAPACITY_ZERO)
            return -SPTE_EIO
        if mc.init_value != 0 and mc.gfp_zero:
            _cache_warn(mc, WARN_CACHE_INIT_VALUE_GFP_ZERO)
            return -SPTE_EIO
        mc.objects = <int64_t*>malloc(capacity * sizeof(int64_t))
        if mc.objects == NULL:
            return -SPTE_ENOMEM
        mc.capacity = capacity
    if mc.capacity != capacity:
        _cache_warn(mc, WARN_CACHE_CAPACITY_MISMATCH)
        return -SPTE_EIO
    while mc.nobjs < mc.capacity:
        idx = mmu_memory_cache_alloc_obj(mc)
        if idx < 0:
            return 0 if mc.nobjs >= min else -SPTE_ENOMEM
        mc.pool.state[idx] = PAGE_CACHED
        mc.objects[mc.nobjs] = idx
        mc.nobjs += 1
    return 0


cdef int64_t kvm_mmu_memory_cache_alloc(kvm_mmu_memory_cache_t* mc) noexcept nogil:
    """kvm_mmu_memory_cache_alloc: LIFO pop; empty -> warning and a direct allocation."""
    cdef int64_t idx
    if mc.nobjs == 0:
        _cache_warn(mc, WARN_CACHE_ALLOC_EMPTY)
        return mmu_memory_cache_alloc_obj(mc)
    mc.nobjs -= 1
    idx = mc.objects[mc.nobjs]
    mc.pool.state[idx] = PAGE_RAW
    return idx


cdef void kvm_mmu_free_memory_cache(kvm_mmu_memory_cache_t* mc) noexcept nogil:
    cdef int i
    pthread_mutex_lock(&mc.pool.lock)
    for i in range(mc.nobjs - 1, -1, -1):      # objects[--nobjs] first, as KVM frees
        pool_free_locked(mc.pool, mc.objects[i])
    pthread_mutex_unlock(&mc.pool.lock)
    mc.nobjs = 0
    mc.capacity = 0
    if mc.objects != NULL:
        free(mc.objects)
        mc.objects = NULL


cdef void mmu_memory_cache_setup(kvm_mmu_memory_cache_t* mc, pool_t* pool, u64 init_value,
                                 bint gfp_zero) noexcept nogil:
    """A new, empty cache on `pool` (KVM sets these fields in kvm_mmu_create)."""
    memset(mc, 0, sizeof(kvm_mmu_memory_cache_t))
    mc.pool = pool
    mc.init_value = init_value
    mc.gfp_zero = gfp_zero
    mc.last_warn = -1
    pthread_mutex_init(&mc.lock, NULL)
    pool_add_cache(pool, mc)


cdef void mmu_memory_cache_teardown(kvm_mmu_memory_cache_t* mc) noexcept nogil:
    """Give the cached pages back and leave the pool's list (its counters stay counted)."""
    kvm_mmu_free_memory_cache(mc)
    pool_remove_cache(mc.pool, mc)
    pthread_mutex_destroy(&mc.lock)
