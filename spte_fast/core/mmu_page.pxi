# =====================================================================================
# core/mmu_page.pxi: struct kvm_mmu_page, the life of a page-table page
# =====================================================================================
# (≈ mmu_internal.h's struct kvm_mmu_page and the sp helpers of tdp_mmu.c / mmu.c.)  A
# table is a pool page plus its kvm_mmu_page in pool.sp[index]; these helpers are the only
# code that writes the kvm_mmu_page fields or moves a page into or out of PAGE_TABLE
# (tests/test_source_rules.py holds the rest of the engine to it).  Life of a table:
#   tdp_mmu_alloc_sp (a vCPU cache page) -> tdp_mmu_init_child_sp / tdp_mmu_init_sp
#   -> linked: tdp_account_mmu_page [-> track_possible_nx_huge_page]
#   -> removed: tdp_mmu_unlink_sp, then tdp_mmu_free_sp, or call_rcu_free_sp while other
#      vCPUs may still walk it (rcu_reclaim_pending frees it after the grace period).

cdef inline kvm_mmu_page_t* pool_sp(pool_t* p, int64_t idx) noexcept nogil:
    return &p.sp[idx]


cdef inline kvm_mmu_page_t* spte_to_child_sp(kvm_t* kvm, u64 spte) noexcept nogil:
    """The kvm_mmu_page of the table a present non-leaf SPTE points at."""
    return &kvm.pool.sp[spte_to_pfn(spte)]


cdef inline tdp_ptep_t spte_to_child_pt(kvm_t* kvm, u64 spte) noexcept nogil:
    return <tdp_ptep_t>(<char*>kvm.pool.pages + (spte & SPTE_BASE_ADDR_MASK))  # pfn << 12 bytes


cdef inline int64_t sp_index(kvm_t* kvm, const kvm_mmu_page_t* sp) noexcept nogil:
    return sp - kvm.pool.sp


cdef void tdp_mmu_init_sp(kvm_t* kvm, int64_t idx, tdp_ptep_t sptep, gfn_t gfn,
                          int level, bint nx_huge_page_disallowed) noexcept nogil:
    """tdp_mmu_init_sp: the page becomes a table of `level` mapping from `gfn`, linked (or
    about to be) from `sptep` (NULL for a root)."""
    cdef kvm_mmu_page_t* sp = pool_sp(kvm.pool, idx)
    sp.spt = pool_page(kvm.pool, idx)
    sp.ptep = sptep
    sp.gfn = gfn
    sp.level = <int8_t>level
    sp.nx_huge_page_disallowed = nx_huge_page_disallowed
    sp.nx_linked = False
    sp.nx_prev = -1
    sp.nx_next = -1
    sp.root_count = 0
    sp.role_invalid = False
    sp.scheduled_root_to_zap = False
    kvm.pool.state[idx] = PAGE_TABLE
    kvm.pool.clean[idx] = 0             # the VM writes into its tables


cdef inline void tdp_mmu_init_root(kvm_t* kvm, int64_t idx, int root_level) noexcept nogil:
    """kvm_tdp_mmu_alloc_root's tdp_mmu_init_sp(root, NULL, 0, role) and
    refcount_set(&root->tdp_mmu_root_count, 2): the vCPU's reference and the MMU's."""
    tdp_mmu_init_sp(kvm, idx, NULL, 0, root_level, False)
    pool_sp(kvm.pool, idx).root_count = 2


cdef inline void tdp_mmu_invalidate_root(kvm_mmu_page_t* root) noexcept nogil:
    """kvm_tdp_mmu_invalidate_all_roots, per root (tdp_mmu_pages_lock held)."""
    root.scheduled_root_to_zap = True
    root.role_invalid = True


cdef inline void kvm_tdp_mmu_get_root(kvm_mmu_page_t* root) noexcept nogil:
    root.root_count += 1


cdef inline int tdp_mmu_root_drop_ref(kvm_mmu_page_t* root) noexcept nogil:
    """refcount_dec_and_test's count: the references left."""
    root.root_count -= 1
    return root.root_count


cdef inline void tdp_mmu_root_zapped(kvm_mmu_page_t* root) noexcept nogil:
    root.scheduled_root_to_zap = False


cdef inline void tdp_mmu_init_child_sp(kvm_t* kvm, int64_t idx, tdp_iter_t* it,
                                       bint nx_huge_page_disallowed) noexcept nogil:
    """tdp_mmu_init_child_sp: a table for the entry the iterator is at, one level down."""
    tdp_mmu_init_sp(kvm, idx, it.sptep, it.gfn, it.level - 1, nx_huge_page_disallowed)


cdef inline int64_t tdp_mmu_alloc_sp(kvm_vcpu_t* vcpu) noexcept nogil:
    """tdp_mmu_alloc_sp: a page from the vCPU's shadow-page cache (-1 if none)."""
    cdef int64_t idx = kvm_mmu_memory_cache_alloc(vcpu.mmu_shadow_page_cache)
    if idx >= 0:
        vcpu.stat.tables_allocated += 1
    return idx


cdef inline int64_t tdp_mmu_alloc_sp_for_split(kvm_t* kvm, mmu_stats_t* st) noexcept nogil:
    """tdp_mmu_alloc_sp_for_split: a page straight from the host (the pool), not from a
    vCPU cache -- eager splitting runs outside any vCPU (-1 if none).  KVM zeroes it; every
    entry is written before it is linked, so its old contents never show."""
    cdef int64_t idx = pool_alloc(kvm.pool)
    if idx >= 0:
        st.tables_allocated += 1
    return idx


cdef inline void tdp_account_mmu_page(mmu_stats_t* st, kvm_mmu_page_t* sp) noexcept nogil:
    st.pt_pages[sp.level] += 1


cdef inline void tdp_unaccount_mmu_page(mmu_stats_t* st, kvm_mmu_page_t* sp) noexcept nogil:
    st.pt_pages[sp.level] -= 1


cdef void track_possible_nx_huge_page(kvm_t* kvm, int64_t idx) noexcept nogil:
    """Append to kvm.possible_nx_huge_pages (NX recovery takes the oldest first)."""
    cdef kvm_mmu_page_t* sp = pool_sp(kvm.pool, idx)
    pthread_mutex_lock(&kvm.tdp_mmu_pages_lock)
    if sp.nx_huge_page_disallowed and not sp.nx_linked:
        sp.nx_linked = True
        sp.nx_prev = kvm.possible_nx_tail
        sp.nx_next = -1
        if kvm.possible_nx_tail >= 0:
            pool_sp(kvm.pool, kvm.possible_nx_tail).nx_next = idx
        else:
            kvm.possible_nx_head = idx
        kvm.possible_nx_tail = idx
        kvm.nx_lpage_splits += 1
    pthread_mutex_unlock(&kvm.tdp_mmu_pages_lock)


cdef void _untrack_possible_nx_huge_page_locked(kvm_t* kvm, kvm_mmu_page_t* sp) noexcept nogil:
    if not sp.nx_linked:
        return
    if sp.nx_prev >= 0:
        pool_sp(kvm.pool, sp.nx_prev).nx_next = sp.nx_next
    else:
        kvm.possible_nx_head = sp.nx_next
    if sp.nx_next >= 0:
        pool_sp(kvm.pool, sp.nx_next).nx_prev = sp.nx_prev
    else:
        kvm.possible_nx_tail = sp.nx_prev
    sp.nx_linked = False
    sp.nx_prev = -1
    sp.nx_next = -1
    kvm.nx_lpage_splits -= 1


cdef void unaccount_nx_huge_page(kvm_t* kvm, kvm_mmu_page_t* sp) noexcept nogil:
    """unaccount_nx_huge_page: no longer a candidate for NX recovery."""
    pthread_mutex_lock(&kvm.tdp_mmu_pages_lock)
    sp.nx_huge_page_disallowed = False
    _untrack_possible_nx_huge_page_locked(kvm, sp)
    pthread_mutex_unlock(&kvm.tdp_mmu_pages_lock)


cdef void tdp_mmu_unlink_sp(kvm_t* kvm, mmu_stats_t* st, kvm_mmu_page_t* sp) noexcept nogil:
    """tdp_mmu_unlink_sp: unaccount the table and take it off the NX list."""
    tdp_unaccount_mmu_page(st, sp)
    if not sp.nx_huge_page_disallowed:
        return
    pthread_mutex_lock(&kvm.tdp_mmu_pages_lock)
    sp.nx_huge_page_disallowed = False
    _untrack_possible_nx_huge_page_locked(kvm, sp)
    pthread_mutex_unlock(&kvm.tdp_mmu_pages_lock)


cdef inline void tdp_mmu_free_sp(kvm_t* kvm, mmu_stats_t* st, int64_t idx) noexcept nogil:
    """tdp_mmu_free_sp: the page goes back to the pool (never to a vCPU cache)."""
    st.tables_freed += 1
    pool_free(kvm.pool, idx)


cdef void call_rcu_free_sp(kvm_t* kvm, mmu_stats_t* st, int64_t idx) noexcept nogil:
    """call_rcu(tdp_mmu_free_sp_rcu_callback): free after the readers now inside are gone."""
    cdef u64 seq = u64_inc_return_seq_cst(&kvm.rcu_gp_seq)
    st.tables_freed += 1
    pthread_mutex_lock(&kvm.pool.lock)
    kvm.pool.state[idx] = PAGE_PARKED
    kvm.rcu_pending[kvm.nr_rcu_pending] = idx
    kvm.rcu_pending_seq[kvm.nr_rcu_pending] = seq
    kvm.nr_rcu_pending += 1
    pthread_mutex_unlock(&kvm.pool.lock)


cdef void rcu_reclaim_pending(kvm_t* kvm) noexcept nogil:
    """Free the removed tables whose grace period has ended."""
    cdef u64 oldest
    cdef int64_t j, kept = 0
    if i64_load_relaxed(&kvm.nr_rcu_pending) == 0:
        return
    oldest = rcu_oldest_reader_seq(kvm)
    pthread_mutex_lock(&kvm.pool.lock)
    for j in range(kvm.nr_rcu_pending):
        if kvm.rcu_pending_seq[j] <= oldest:
            pool_free_locked(kvm.pool, kvm.rcu_pending[j])
        else:
            kvm.rcu_pending[kept] = kvm.rcu_pending[j]
            kvm.rcu_pending_seq[kept] = kvm.rcu_pending_seq[j]
            kept += 1
    kvm.nr_rcu_pending = kept
    pthread_mutex_unlock(&kvm.pool.lock)
