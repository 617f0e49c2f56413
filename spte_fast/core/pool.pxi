# =====================================================================================
# core/pool.pxi: the page pool, the host memory that page tables come from
# =====================================================================================
# The pool hands out page indices (host frame numbers of the tables).  Never-used pages
# come lowest-first (their memory is untouched numpy.zeros memory, so they cost no write
# on the zero path); freed pages are reused LIFO before them.  Every operation runs under
# pool.lock so that vCPU threads can top up their caches concurrently.  The pool knows a
# page's state (free, raw, cached, table, parked) and whether it is known to be zero; what
# a table *is* (its kvm_mmu_page) belongs to core/mmu_page.pxi.

cdef int64_t pool_alloc_locked(pool_t* p) noexcept nogil:
    cdef int64_t idx
    if p.fail_budget == 0:
        p.failed += 1
        return -1
    if p.free_top > 0:
        p.free_top -= 1
        idx = p.free_stack[p.free_top]
    elif p.next_fresh < p.capacity:
        idx = p.next_fresh
        p.next_fresh += 1
    else:
        p.failed += 1
        return -1
    if p.fail_budget > 0:
        p.fail_budget -= 1
    p.state[idx] = PAGE_RAW
    p.allocated += 1
    return idx


cdef void pool_free_locked(pool_t* p, int64_t idx) noexcept nogil:
    p.state[idx] = PAGE_FREE
    p.clean[idx] = 0
    p.free_stack[p.free_top] = idx
    p.free_top += 1
    p.freed += 1


cdef inline int64_t pool_alloc(pool_t* p) noexcept nogil:
    cdef int64_t idx
    pthread_mutex_lock(&p.lock)
    idx = pool_alloc_locked(p)
    pthread_mutex_unlock(&p.lock)
    return idx


cdef inline void pool_free(pool_t* p, int64_t idx) noexcept nogil:
    pthread_mutex_lock(&p.lock)
    pool_free_locked(p, idx)
    pthread_mutex_unlock(&p.lock)


cdef inline u64* pool_page(pool_t* p, int64_t idx) noexcept nogil:
    return p.pages + idx * SPTE_ENT_PER_PAGE


cdef inline int64_t pool_nr_free(const pool_t* p) noexcept nogil:
    return p.free_top + (p.capacity - p.next_fresh)


# -- the caches on a pool: their initialisation counters are the pool's ------------------
# Each init event is counted once, by the cache that did it; the pool's view is the sum
# over its live caches plus what caches that are gone left behind.

cdef void pool_add_cache(pool_t* p, kvm_mmu_memory_cache_t* mc) noexcept nogil:
    pthread_mutex_lock(&p.lock)
    mc.pool_next = p.caches
    p.caches = mc
    pthread_mutex_unlock(&p.lock)


cdef inline void _init_stats_add(cache_init_stats_t* acc, cache_init_stats_t* s) noexcept nogil:
    acc.fills += i64_load_relaxed(&s.fills)
    acc.zero_inits += i64_load_relaxed(&s.zero_inits)
    acc.zero_untouched += i64_load_relaxed(&s.zero_untouched)
    acc.init_bytes_written += i64_load_relaxed(&s.init_bytes_written)


cdef void pool_remove_cache(pool_t* p, kvm_mmu_memory_cache_t* mc) noexcept nogil:
    cdef kvm_mmu_memory_cache_t** link
    pthread_mutex_lock(&p.lock)
    link = &p.caches
    while link[0] != NULL and link[0] != mc:
        link = &link[0].pool_next
    if link[0] == mc:
        link[0] = mc.pool_next
        _init_stats_add(&p.retired, &mc.init)
    pthread_mutex_unlock(&p.lock)


cdef void pool_init_stats(pool_t* p, cache_init_stats_t* out) noexcept nogil:
    cdef kvm_mmu_memory_cache_t* mc
    memset(out, 0, sizeof(cache_init_stats_t))
    pthread_mutex_lock(&p.lock)
    _init_stats_add(out, &p.retired)
    mc = p.caches
    while mc != NULL:
        _init_stats_add(out, &mc.init)
        mc = mc.pool_next
    pthread_mutex_unlock(&p.lock)
