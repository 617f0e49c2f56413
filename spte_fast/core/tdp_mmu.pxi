# =====================================================================================
# core/tdp_mmu.pxi: the TDP MMU (≈ arch/x86/kvm/mmu/tdp_mmu.c, Linux 6.10)
# =====================================================================================
# Setters, handle_changed_spte / handle_removed_pt, kvm_tdp_mmu_map and the zaps.  Callers
# hold mmu_lock: faults (and the atomic zap) in shared mode, changing SPTEs only by
# compare-and-exchange; the other zaps in exclusive mode.  Counters go to the caller's
# context (`st`: a vCPU's or the VM's own), summed when read.  Nothing here raises:
# results are RET_PF_* codes, flags, or negative SPTE_E* codes.

cdef inline void kvm_mmu_warn(mmu_stats_t* st, int reason) noexcept nogil:
    """WARN_ON_ONCE: counted per reason, never raised."""
    st.warn[reason] += 1


# -- bookkeeping: handle_changed_spte, handle_removed_pt (spec §3.7, §3.8) ---------------

cdef void handle_removed_pt(kvm_t* kvm, mmu_stats_t* st, tdp_ptep_t pt, bint shared) noexcept nogil:
    """The table `pt` was unlinked by the caller: freeze its entries, recurse, free it.

    Shared: every entry is exchanged with FROZEN, spinning while another thread's frozen
    operation is in flight, so any later CAS on it fails.  Exclusive: only present entries
    are frozen.  Each change goes through handle_changed_spte.
    """
    cdef int64_t idx = (pt - kvm.pool.pages) // SPTE_ENT_PER_PAGE
    cdef kvm_mmu_page_t* sp = pool_sp(kvm.pool, idx)
    cdef int level = sp.level
    cdef gfn_t base_gfn = sp.gfn
    cdef u64 frozen = kvm.m.frozen_value
    cdef tdp_ptep_t sptep
    cdef u64 old_spte
    cdef int i
    tdp_mmu_unlink_sp(kvm, st, sp)
    for i in range(SPTE_ENT_PER_PAGE):
        sptep = pt + i
        if shared:
            while True:
                old_spte = kvm_tdp_mmu_write_spte_atomic(sptep, frozen)
                if not is_frozen_spte(&kvm.m, old_spte):
                    break
                cpu_relax()
        else:
            old_spte = kvm_tdp_mmu_read_spte(sptep)
            if not is_shadow_present_pte(old_spte):
                continue
            old_spte = kvm_tdp_mmu_write_spte(&kvm.m, sptep, old_spte, frozen, level)
        handle_changed_spte(kvm, st, base_gfn + <u64>i * pages_per_level(level),
                            old_spte, frozen, level, shared)
    u64_inc_return_seq_cst(&kvm.removals)
    if shared and rcu_other_readers(kvm, st.rcu_reader):
        call_rcu_free_sp(kvm, st, idx)      # another vCPU may still walk it
    else:
        tdp_mmu_free_sp(kvm, st, idx)       # nobody else can reach the unlinked table


cdef inline void handle_changed_spte(kvm_t* kvm, mmu_stats_t* st, gfn_t gfn, u64 old_spte,
                                     u64 new_spte, int level, bint shared) noexcept nogil:
    """Bookkeeping for one SPTE change (spec §3.7).

    The common fault case -- the non-present value becomes a present entry -- needs only
    the counters; it is decided here, inline.  A present leaf that is zapped or keeps its
    pfn (write protection, dirty clearing) goes to the short _handle_changed_leaf,
    everything else to _handle_changed_spte_slow.
    """
    if old_spte == kvm.m.shadow_nonpresent_value and is_shadow_present_pte(new_spte) and \
            level >= 1 and level <= PT64_ROOT_MAX_LEVEL and \
            not (gfn & (pages_per_level(level) - 1)):
        st.spte_changes += 1
        if is_last_spte(new_spte, level):
            if not spte_writable_invariants_ok(&kvm.m, new_spte):
                kvm_mmu_warn(st, WARN_SPTE_WRITABLE_INVARIANTS)
            st.pages[level] += 1
        return
    if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and \
            level >= 1 and level <= PT64_ROOT_MAX_LEVEL and \
            not (gfn & (pages_per_level(level) - 1)):
        if new_spte == kvm.m.shadow_nonpresent_value or (
                is_shadow_present_pte(new_spte) and is_last_spte(new_spte, level) and
                not ((old_spte ^ new_spte) & SPTE_BASE_ADDR_MASK)):
            _handle_changed_leaf(kvm, st, old_spte, new_spte, level)
            return
    _handle_changed_spte_slow(kvm, st, gfn, old_spte, new_spte, level, shared)


cdef void _handle_changed_leaf(kvm_t* kvm, mmu_stats_t* st, u64 old_spte, u64 new_spte,
                               int level) noexcept nogil:
    """handle_changed_spte for the two common changes of a present leaf: it is zapped (the
    non-present value), or it keeps its pfn and changes permission or A/D bits (write
    protection, dirty clearing).  What is left of the general case: the page stats, the
    writable invariants, and pushing a dropped D or A to the host page."""
    cdef const spte_masks_t* m = &kvm.m
    cdef bint is_present = new_spte != m.shadow_nonpresent_value
    st.spte_changes += 1
    if old_spte == new_spte:
        return
    if not is_present:
        st.pages[level] -= 1
    elif not spte_writable_invariants_ok(m, new_spte):
        kvm_mmu_warn(st, WARN_SPTE_WRITABLE_INVARIANTS)
    if is_dirty_spte(m, old_spte) and (not is_present or not is_dirty_spte(m, new_spte)):
        kvm_set_pfn_dirty(kvm, spte_to_pfn(old_spte))
    if is_accessed_spte(m, old_spte) and (not is_present or not is_accessed_spte(m, new_spte)):
        kvm_set_pfn_accessed(kvm, spte_to_pfn(old_spte))


cdef void _handle_changed_spte_slow(kvm_t* kvm, mmu_stats_t* st, gfn_t gfn, u64 old_spte,
                                    u64 new_spte, int level, bint shared) noexcept nogil:
    cdef const spte_masks_t* m = &kvm.m
    cdef bint was_present = is_shadow_present_pte(old_spte)
    cdef bint is_present = is_shadow_present_pte(new_spte)
    cdef bint was_leaf = was_present and is_last_spte(old_spte, level)
    cdef bint is_leaf = is_present and is_last_spte(new_spte, level)
    cdef bint pfn_changed = spte_to_pfn(old_spte) != spte_to_pfn(new_spte)
    st.spte_changes += 1
    if level < 1 or level > PT64_ROOT_MAX_LEVEL:
        kvm_mmu_warn(st, WARN_SPTE_LEVEL)
    elif gfn & (pages_per_level(level) - 1):
        kvm_mmu_warn(st, WARN_SPTE_GFN_UNALIGNED)
    # A present leaf must be zapped (and flushed) before it may map another pfn: BUG().
    if was_leaf and is_leaf and pfn_changed:
        if not kvm.fatal:
            kvm.fatal = 1
            kvm.fatal_gfn = gfn
            kvm.fatal_level = level
            kvm.fatal_old = old_spte
            kvm.fatal_new = new_spte
        return
    if old_spte == new_spte:
        return
    if is_leaf and not spte_writable_invariants_ok(m, new_spte):
        kvm_mmu_warn(st, WARN_SPTE_WRITABLE_INVARIANTS)
    if not was_present and not is_present:
        # Only MMIO and frozen transitions are expected between non-present values.
        if not is_mmio_spte(m, old_spte) and not is_mmio_spte(m, new_spte) and \
                not is_frozen_spte(m, new_spte):
            kvm_mmu_warn(st, WARN_NONPRESENT_TO_NONPRESENT)
        return
    if is_leaf != was_leaf:
        st.pages[level] += 1 if is_leaf else -1
    if was_leaf and is_dirty_spte(m, old_spte) and \
            (not is_present or not is_dirty_spte(m, new_spte) or pfn_changed):
        kvm_set_pfn_dirty(kvm, spte_to_pfn(old_spte))
    # A table goes away when its parent entry becomes a leaf or non-present.
    if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
        if not is_leaf and is_present:
            kvm_mmu_warn(st, WARN_NONLEAF_TO_NONLEAF)
        handle_removed_pt(kvm, st, spte_to_child_pt(kvm, old_spte), shared)
    if was_leaf and is_accessed_spte(m, old_spte) and \
            (not is_present or not is_accessed_spte(m, new_spte) or pfn_changed):
        kvm_set_pfn_accessed(kvm, spte_to_pfn(old_spte))


# -- setters (spec §3.4 - §3.6) ------------------------------------------------------------

cdef inline u64 tdp_mmu_set_spte(kvm_t* kvm, mmu_stats_t* st, tdp_ptep_t sptep, u64 old_spte,
                          u64 new_spte, gfn_t gfn, int level) noexcept nogil:
    """Exclusive mode: write (xchg if volatile), then bookkeeping.  Returns the old SPTE."""
    if is_frozen_spte(&kvm.m, old_spte) or is_frozen_spte(&kvm.m, new_spte):
        kvm_mmu_warn(st, WARN_SET_SPTE_FROZEN)
    old_spte = kvm_tdp_mmu_write_spte(&kvm.m, sptep, old_spte, new_spte, level)
    handle_changed_spte(kvm, st, gfn, old_spte, new_spte, level, False)
    return old_spte


cdef inline void tdp_mmu_iter_set_spte(kvm_t* kvm, mmu_stats_t* st, tdp_iter_t* it,
                                       u64 new_spte) noexcept nogil:
    it.old_spte = tdp_mmu_set_spte(kvm, st, it.sptep, it.old_spte, new_spte, it.gfn, it.level)


cdef inline int __tdp_mmu_set_spte_atomic(kvm_t* kvm, mmu_stats_t* st, tdp_iter_t* it,
                                          u64 new_spte) noexcept nogil:
    """The compare-and-exchange alone: 0, or -SPTE_EBUSY with it.old_spte refreshed.

    vm.inject_cas_failures makes it lose the race on demand (memory untouched)."""
    if is_frozen_spte(&kvm.m, it.old_spte):
        kvm_mmu_warn(st, WARN_SET_SPTE_ATOMIC_FROZEN)
    if kvm.inject_cas_fail > 0 and i64_dec_if_positive_relaxed(&kvm.inject_cas_fail):
        it.old_spte = kvm_tdp_mmu_read_spte(it.sptep)
        st.cas_failures += 1
        return -SPTE_EBUSY
    if not tdp_try_cmpxchg64(it.sptep, &it.old_spte, new_spte):
        st.cas_failures += 1
        return -SPTE_EBUSY
    return 0


cdef inline int tdp_mmu_set_spte_atomic(kvm_t* kvm, mmu_stats_t* st, tdp_iter_t* it,
                                 u64 new_spte) noexcept nogil:
    """Shared-mode setter (spec §3.4).

    Returns 0, or -SPTE_EBUSY when the CAS lost: then memory is untouched by us,
    it.old_spte holds the value found, and no bookkeeping ran.
    """
    if __tdp_mmu_set_spte_atomic(kvm, st, it, new_spte):
        return -SPTE_EBUSY
    handle_changed_spte(kvm, st, it.gfn, it.old_spte, new_spte, it.level, True)
    return 0


cdef int tdp_mmu_zap_spte_atomic(kvm_t* kvm, mmu_stats_t* st, tdp_iter_t* it) noexcept nogil:
    """Freeze -> ranged TLB flush -> store non-present -> bookkeeping (6.10, aca48556c592)."""
    if __tdp_mmu_set_spte_atomic(kvm, st, it, kvm.m.frozen_value):
        return -SPTE_EBUSY
    st.tlb_flushes_ranged += 1              # kvm_flush_remote_tlbs_gfn
    # Nobody else writes a frozen SPTE, so a plain store finishes the zap.
    __kvm_tdp_mmu_write_spte(it.sptep, kvm.m.shadow_nonpresent_value)
    handle_changed_spte(kvm, st, it.gfn, it.old_spte, kvm.m.shadow_nonpresent_value,
                        it.level, True)
    return 0


# -- the fault path's map (spec §3.9) ----------------------------------------------------------

cdef inline int tdp_mmu_link_sp(kvm_t* kvm, mmu_stats_t* st, tdp_iter_t* it, kvm_mmu_page_t* sp,
                         bint shared) noexcept nogil:
    """tdp_mmu_link_sp: the entry at `it` becomes a non-leaf pointing to sp's table (CAS when
    shared: -SPTE_EBUSY if it lost); the table is accounted."""
    cdef u64 new_spte = make_nonleaf_spte(&kvm.m, <pfn_t>sp_index(kvm, sp), kvm.m.ad_disabled)
    if shared:
        if tdp_mmu_set_spte_atomic(kvm, st, it, new_spte):
            return -SPTE_EBUSY
    else:
        tdp_mmu_iter_set_spte(kvm, st, it, new_spte)
    tdp_account_mmu_page(st, sp)
    return 0


cdef int tdp_mmu_split_huge_page(kvm_t* kvm, mmu_stats_t* st, tdp_iter_t* it,
                                 kvm_mmu_page_t* sp, bint shared) noexcept nogil:
    """Fill the unlinked table with the 512 pieces of the huge SPTE, then link it (no TLB
    flush: the old and the new translations agree)."""
    cdef u64 huge_spte = it.old_spte
    cdef int level = it.level, i, r
    # The table is not linked yet: these stores need no bookkeeping and no atomics.
    for i in range(SPTE_ENT_PER_PAGE):
        __kvm_tdp_mmu_write_spte(sp.spt + i, make_huge_page_split_spte(
            &kvm.m, huge_spte, level - 1, i, kvm.nx_huge_pages))
    r = tdp_mmu_link_sp(kvm, st, it, sp, shared)
    if r:
        return r
    # Linking subtracted the huge page; the 512 children are added here.
    st.pages[level - 1] += SPTE_ENT_PER_PAGE
    return 0


cdef int kvm_tdp_mmu_map(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault,
                         tdp_iter_t* it) noexcept nogil:
    """kvm_tdp_mmu_map (6.10): KVM's loop over for_each_tdp_pte(gfn, gfn + 1).

    `it` is the walk the fast path just made for this gfn, ending at the first entry that
    is not a present non-leaf.  Every entry above both its end and the goal level is a
    present non-leaf, where KVM's loop would only step down, so the loop starts at the
    deeper of the two (re-reading the entry there).
    """
    cdef kvm_t* kvm = vcpu.kvm
    cdef int64_t sp_idx
    cdef kvm_mmu_page_t* sp
    cdef int r
    kvm_mmu_hugepage_adjust(vcpu, fault)
    tdp_iter_resume(it, max(it.level, fault.goal_level))
    while it.valid and it.gfn < fault.gfn + 1:
        if fault.nx_huge_page_workaround_enabled:
            disallowed_hugepage_adjust(kvm, fault, it.old_spte, it.level)
        # Another thread froze the entry: give up before allocating anything.
        if is_frozen_spte(&kvm.m, it.old_spte):
            return RET_PF_RETRY
        if it.level == fault.goal_level:
            return tdp_mmu_map_handle_target_level(vcpu, fault, it)
        # Step down into the lower level page table if it exists.
        if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
            tdp_iter_next(it)
            continue
        # Non-present, or a huge page that must be split: a new table from the cache.
        sp_idx = tdp_mmu_alloc_sp(vcpu)
        if sp_idx < 0:
            return -SPTE_ENOMEM
        tdp_mmu_init_child_sp(kvm, sp_idx, it, fault.huge_page_disallowed)
        sp = pool_sp(kvm.pool, sp_idx)
        if is_shadow_present_pte(it.old_spte):
            r = tdp_mmu_split_huge_page(kvm, &vcpu.stat, it, sp, True)
        else:
            r = tdp_mmu_link_sp(kvm, &vcpu.stat, it, sp, True)
        if r:
            # Lost the race: the page goes back to the allocator, not the cache.
            tdp_mmu_free_sp(kvm, &vcpu.stat, sp_idx)
            return RET_PF_RETRY
        if fault.huge_page_disallowed and fault.req_level >= it.level:
            track_possible_nx_huge_page(kvm, sp_idx)
        tdp_iter_next(it)
    # The walk ended above the goal level (an upper entry changed under it).
    return RET_PF_RETRY


cdef int tdp_mmu_map_handle_target_level(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault,
                                         tdp_iter_t* it) noexcept nogil:
    cdef kvm_t* kvm = vcpu.kvm
    cdef u64 new_spte
    cdef bint wrprot = False
    cdef int ret = RET_PF_FIXED
    if fault.slot == NULL:
        new_spte = make_mmio_spte(&kvm.m, it.gfn, ACC_ALL, kvm.generation)
    elif it.level == 1 and not fault.prefetch and not is_writable_pte(it.old_spte):
        # make_spte at 4K over a non-writable old SPTE: the VM's precomputed leaf for pfn
        # 0, with the pfn OR-ed in (the pfn only ever lands in bits 12..51).
        new_spte = kvm.leaf_4k_template[fault.map_writable] | (fault.pfn << 12)
    else:
        new_spte = make_spte(&kvm.m, it.level, ACC_ALL, fault.pfn, it.old_spte,
                             fault.prefetch, fault.map_writable, kvm.m.ad_disabled,
                             kvm.nx_huge_pages, False, &wrprot)
    # make_spte's last step: a writable SPTE in a dirty-logged slot marks the page dirty
    # (before the SPTE is installed, whatever the CAS does).
    if fault.slot != NULL and (new_spte & PT_WRITABLE_MASK) and fault.slot.dirty_bitmap != NULL:
        mark_page_dirty_in_slot(kvm, &vcpu.stat, fault.slot, it.gfn)
    if new_spte == it.old_spte:
        ret = RET_PF_SPURIOUS
    elif tdp_mmu_set_spte_atomic(kvm, &vcpu.stat, it, new_spte):
        return RET_PF_RETRY
    elif fault.slot == NULL:
        vcpu.stat.mmio_sptes_created += 1
    elif is_shadow_present_pte(it.old_spte) and not is_last_spte(it.old_spte, it.level):
        # A table was replaced by a huge page: flush the range it covered.
        vcpu.stat.tlb_flushes_ranged += 1
    if wrprot and fault.write:
        ret = RET_PF_EMULATE
    if fault.slot == NULL:
        ret = RET_PF_EMULATE                # MMIO is emulated
    return ret


# -- roots (spec §3.10 "Root lifecycle"; tdp_mmu.c 6.10) -------------------------------------
# kvm.roots is kvm->arch.tdp_mmu_roots (oldest first here; KVM's list_add_rcu puts the newest
# at the head, so "newest first" is this array backwards).  Roots, their reference counts
# and flags change under tdp_mmu_pages_lock; invalidation also holds mmu_lock for write.

cdef inline tdp_ptep_t root_pt(kvm_t* kvm, int64_t root) noexcept nogil:
    return pool_page(kvm.pool, root)


cdef int64_t kvm_valid_root(kvm_t* kvm) noexcept nogil:
    """The valid root (one role here: address space 0, direct), or -1."""
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        if not pool_sp(kvm.pool, kvm.roots[i]).role_invalid:
            return kvm.roots[i]
    return -1


cdef int64_t kvm_tdp_mmu_alloc_root(kvm_vcpu_t* vcpu) noexcept nogil:
    """kvm_tdp_mmu_alloc_root: a reference to the valid root, or a new root from the vCPU's
    cache (reference count 2: the vCPU's and the MMU's).  -1 when the cache is empty."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef int64_t root
    cdef kvm_mmu_page_t* sp
    pthread_mutex_lock(&kvm.tdp_mmu_pages_lock)
    root = kvm_valid_root(kvm)
    if root >= 0:
        kvm_tdp_mmu_get_root(pool_sp(kvm.pool, root))
    else:
        root = tdp_mmu_alloc_sp(vcpu)
        if root >= 0:
            tdp_mmu_init_root(kvm, root, kvm.root_level)
            sp = pool_sp(kvm.pool, root)
            tdp_account_mmu_page(&vcpu.stat, sp)
            kvm.roots[kvm.nr_roots] = root
            kvm.nr_roots += 1
    pthread_mutex_unlock(&kvm.tdp_mmu_pages_lock)
    return root


cdef void kvm_tdp_mmu_put_root(kvm_t* kvm, mmu_stats_t* st, int64_t root) noexcept nogil:
    """kvm_tdp_mmu_put_root: drop one reference; the last one (only ever on an invalid root)
    takes the root off the list and frees its page after the grace period."""
    cdef kvm_mmu_page_t* sp = pool_sp(kvm.pool, root)
    cdef int i, j = 0
    pthread_mutex_lock(&kvm.tdp_mmu_pages_lock)
    if tdp_mmu_root_drop_ref(sp) > 0:
        pthread_mutex_unlock(&kvm.tdp_mmu_pages_lock)
        return
    for i in range(kvm.nr_roots):
        if kvm.roots[i] != root:
            kvm.roots[j] = kvm.roots[i]
            j += 1
    kvm.nr_roots = j
    pthread_mutex_unlock(&kvm.tdp_mmu_pages_lock)
    tdp_unaccount_mmu_page(st, sp)
    if st.rcu_reader >= 0 and rcu_other_readers(kvm, st.rcu_reader):
        call_rcu_free_sp(kvm, st, root)
    else:
        tdp_mmu_free_sp(kvm, st, root)


cdef void kvm_tdp_mmu_invalidate_all_roots(kvm_t* kvm) noexcept nogil:
    """kvm_tdp_mmu_invalidate_all_roots (mmu_lock held for write): every valid root becomes
    invalid and scheduled for zapping; vCPUs drop theirs on their next entry."""
    cdef int i
    cdef kvm_mmu_page_t* sp
    pthread_mutex_lock(&kvm.tdp_mmu_pages_lock)
    for i in range(kvm.nr_roots):
        sp = pool_sp(kvm.pool, kvm.roots[i])
        if not sp.role_invalid:
            tdp_mmu_invalidate_root(sp)
    pthread_mutex_unlock(&kvm.tdp_mmu_pages_lock)


# -- aging: the MMU notifiers' clear_young / test_young (spec §3.11) --------------------------
# Exclusive in 6.10, over every root; the SPTE changes without handle_changed_spte (KVM
# only traces it): presence and pfn stay.

cdef inline bint age_gfn_range(kvm_t* kvm, tdp_iter_t* it) noexcept nogil:
    cdef const spte_masks_t* m = &kvm.m
    cdef u64 old = it.old_spte
    if not is_accessed_spte(m, old):
        return False
    if spte_ad_enabled(old):
        it.old_spte = tdp_mmu_clear_spte_bits(m, it.sptep, old, m.shadow_accessed_mask, it.level)
    else:
        # Capture the dirty state before access tracking drops W.
        if is_writable_pte(old):
            kvm_set_pfn_dirty(kvm, spte_to_pfn(old))
        it.old_spte = kvm_tdp_mmu_write_spte(m, it.sptep, old,
                                             mark_spte_for_access_track(m, old), it.level)
    return True


cdef bint kvm_tdp_mmu_handle_gfn(kvm_t* kvm, gfn_t start, gfn_t end, bint age) noexcept nogil:
    """kvm_tdp_mmu_age_gfn_range (age) / kvm_tdp_mmu_test_age_gfn: every present leaf of
    every root intersecting [start, end).  Returns young."""
    cdef tdp_iter_t it
    cdef bint young = False
    cdef int i
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end:
        return False
    for i in range(kvm.nr_roots - 1, -1, -1):
        tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, kvm.roots[i]), kvm.root_level, 1,
                       start)
        while it.valid and it.gfn < end:
            if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
                if age:
                    young |= age_gfn_range(kvm, &it)
                else:
                    young |= is_accessed_spte(&kvm.m, it.old_spte)
            tdp_iter_next(&it)
    return young


# -- zaps (spec §3.10) -----------------------------------------------------------------------

cdef inline gfn_t tdp_mmu_max_gfn_exclusive(kvm_t* kvm) noexcept nogil:
    """Walks are bounded at host MAXPHYADDR: no SPTE maps a gfn beyond kvm_mmu_max_gfn()."""
    return kvm.max_gfn + 1


cdef bint tdp_mmu_zap_leafs(kvm_t* kvm, mmu_stats_t* st, int64_t root, gfn_t start,
                            gfn_t end) noexcept nogil:
    """tdp_mmu_zap_leafs (exclusive): present leaves in [start, end); no table is freed."""
    cdef tdp_iter_t it
    cdef bint flush = False
    # Zapping SPTEs of an invalid root needs no TLB flush (6.10): no vCPU uses it.
    cdef bint valid = not pool_sp(kvm.pool, root).role_invalid
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end:
        return False
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, 1, start)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            tdp_mmu_iter_set_spte(kvm, st, &it, kvm.m.shadow_nonpresent_value)
            flush |= valid
        tdp_iter_next(&it)
    return flush


cdef bint kvm_tdp_mmu_zap_leafs(kvm_t* kvm, mmu_stats_t* st, gfn_t start,
                                gfn_t end) noexcept nogil:
    """kvm_tdp_mmu_zap_leafs: tdp_mmu_zap_leafs over every valid root."""
    cdef bint flush = False
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        if not pool_sp(kvm.pool, kvm.roots[i]).role_invalid:
            flush |= tdp_mmu_zap_leafs(kvm, st, kvm.roots[i], start, end)
    return flush


cdef int __tdp_mmu_zap_root(kvm_t* kvm, mmu_stats_t* st, int64_t root, int zap_level,
                            bint shared, int64_t max_tries) noexcept nogil:
    """__tdp_mmu_zap_root: every present entry at zap_level.  Exclusive: tdp_mmu_set_spte;
    shared: tdp_mmu_set_spte_atomic, retried on the refreshed value (goto retry).  Returns 1
    when something was zapped, 0 if not, -SPTE_EBUSY after `max_tries` lost races in a row
    (the caller checks for signals and runs the pass again)."""
    cdef tdp_iter_t it
    cdef bint zapped = False
    cdef int64_t tries = 0
    cdef gfn_t end = tdp_mmu_max_gfn_exclusive(kvm)
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, zap_level, 0)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and it.level <= zap_level:
            if not shared:
                tdp_mmu_iter_set_spte(kvm, st, &it, kvm.m.shadow_nonpresent_value)
            elif tdp_mmu_set_spte_atomic(kvm, st, &it, kvm.m.shadow_nonpresent_value):
                tries += 1
                if tries == max_tries:
                    return -SPTE_EBUSY
                continue                    # retry: it.old_spte holds what was found
            zapped = True
            tries = 0
        tdp_iter_next(&it)
    return 1 if zapped else 0


cdef int tdp_mmu_zap_root(kvm_t* kvm, mmu_stats_t* st, int64_t root, bint shared,
                          int64_t max_tries) noexcept nogil:
    """4K -> 2M -> 1G -> root-level passes, so no single removal recurses deeply.  1 if
    anything was zapped, 0 if not, -SPTE_EBUSY from a shared pass that kept losing."""
    cdef int r, zapped = 0, k
    cdef int levels[4]
    levels[0] = 1
    levels[1] = 2
    levels[2] = 3
    levels[3] = kvm.root_level
    for k in range(4):
        r = __tdp_mmu_zap_root(kvm, st, root, levels[k], shared, max_tries)
        if r < 0:
            return r
        zapped |= r
    return zapped


cdef int kvm_tdp_mmu_zap_all(kvm_t* kvm, mmu_stats_t* st) noexcept nogil:
    """kvm_tdp_mmu_zap_all (exclusive): every root, valid or not; no TLB flush (6.10: only
    the VM's destruction or the VMM's exit zaps everything)."""
    cdef int i, zapped = 0
    for i in range(kvm.nr_roots - 1, -1, -1):
        zapped |= tdp_mmu_zap_root(kvm, st, kvm.roots[i], False, 1)
    return zapped


cdef int kvm_tdp_mmu_zap_invalidated_roots(kvm_t* kvm, mmu_stats_t* st,
                                           int64_t max_tries) noexcept nogil:
    """kvm_tdp_mmu_zap_invalidated_roots: zap each root scheduled by the invalidation in
    shared mode (no TLB flush: each vCPU flushes its own on loading a new root), then put
    the MMU's reference.  0, or -SPTE_EBUSY (call again: the root stays scheduled)."""
    cdef int i = kvm.nr_roots - 1
    cdef int64_t root
    cdef kvm_mmu_page_t* sp
    while i >= 0:
        root = kvm.roots[i]
        sp = pool_sp(kvm.pool, root)
        if sp.scheduled_root_to_zap:
            if tdp_mmu_zap_root(kvm, st, root, True, max_tries) < 0:
                return -SPTE_EBUSY
            tdp_mmu_root_zapped(sp)
            kvm_tdp_mmu_put_root(kvm, st, root)   # may take it off the list
        i = min(i, kvm.nr_roots) - 1
    return 0


cdef bint kvm_tdp_mmu_zap_sp(kvm_t* kvm, mmu_stats_t* st, kvm_mmu_page_t* sp) noexcept nogil:
    """kvm_tdp_mmu_zap_sp: the table's parent entry becomes non-present."""
    cdef u64 old_spte
    if sp.ptep == NULL:
        kvm_mmu_warn(st, WARN_ZAP_SP_UNLINKED)
        return False
    old_spte = kvm_tdp_mmu_read_spte(sp.ptep)
    if not is_shadow_present_pte(old_spte):
        kvm_mmu_warn(st, WARN_ZAP_SP_UNLINKED)
        return False
    tdp_mmu_set_spte(kvm, st, sp.ptep, old_spte, kvm.m.shadow_nonpresent_value, sp.gfn,
                     sp.level + 1)
    return True


cdef bint tdp_mmu_zap_sp_at(kvm_t* kvm, mmu_stats_t* st, int64_t root, gfn_t gfn,
                            int level) noexcept nogil:
    """Zap the level-`level` table on gfn's path, if one is linked."""
    cdef tdp_iter_t it
    if not tdp_iter_seek(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, gfn,
                         level + 1):
        return False
    if not tdp_iter_at_nonleaf(&it):
        return False
    return kvm_tdp_mmu_zap_sp(kvm, st, spte_to_child_sp(kvm, it.old_spte))


cdef int tdp_mmu_zap_spte_atomic_at(kvm_t* kvm, mmu_stats_t* st, int64_t root, gfn_t gfn,
                                    int level, int64_t max_tries) noexcept nogil:
    """The atomic zap of the present entry at `level` on gfn's path; a lost CAS is retried
    on the refreshed value, as KVM's callers do (goto retry).  Returns 1 when zapped, 0 when
    the entry is not present, -SPTE_EBUSY after `max_tries` lost races (the caller checks
    for signals and calls again: nothing loops for ever with the GIL released)."""
    cdef tdp_iter_t it
    cdef int64_t tries = 0
    if not tdp_iter_seek(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, gfn, level):
        return 0
    while is_shadow_present_pte(it.old_spte):
        if tdp_mmu_zap_spte_atomic(kvm, st, &it) == 0:
            return 1
        tries += 1
        if tries == max_tries:
            return -SPTE_EBUSY
    return 0


# -- dirty logging (spec §3.12; tdp_mmu.c 6.10) ---------------------------------------------
# Slot-wide write-protection and D-clearing run with mmu_lock held for read (CAS, retried
# on the value found, through handle_changed_spte); the per-word clear of KVM_GET/
# CLEAR_DIRTY_LOG and write_protect_gfn hold it for write.  Callers pass valid roots only
# (for_each_valid_tdp_mmu_root).

cdef bint wrprot_gfn_range(kvm_t* kvm, mmu_stats_t* st, int64_t root, gfn_t start,
                           gfn_t end, int min_level) noexcept nogil:
    """wrprot_gfn_range (shared): clear only W on present leaves at >= min_level;
    MMU-writable stays, so a later write is fixed by the fast page fault."""
    cdef tdp_iter_t it
    cdef bint spte_set = False
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end:
        return False
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, min_level, start)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                (it.old_spte & PT_WRITABLE_MASK):
            if tdp_mmu_set_spte_atomic(kvm, st, &it, it.old_spte & ~PT_WRITABLE_MASK):
                continue                    # retry: it.old_spte holds what was found
            spte_set = True
        tdp_iter_next(&it)
    return spte_set


cdef inline u64 tdp_mmu_dirty_bit(kvm_t* kvm, bint wrprot) noexcept nogil:
    """The bit that says "dirty": W when write-protecting (or without A/D bits), else D
    (tdp_mmu_need_write_protect)."""
    return PT_WRITABLE_MASK if (wrprot or not kvm.ad_enabled) else kvm.m.shadow_dirty_mask


cdef bint clear_dirty_gfn_range(kvm_t* kvm, mmu_stats_t* st, int64_t root, gfn_t start,
                                gfn_t end) noexcept nogil:
    """clear_dirty_gfn_range (shared): present leaves of any level with the dirty bit set
    lose it (D, or W without A/D bits)."""
    cdef tdp_iter_t it
    cdef bint spte_set = False
    cdef u64 dbit = tdp_mmu_dirty_bit(kvm, False)
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end:
        return False
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, 1, start)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                (it.old_spte & dbit):
            if tdp_mmu_set_spte_atomic(kvm, st, &it, it.old_spte & ~dbit):
                continue
            spte_set = True
        tdp_iter_next(&it)
    return spte_set


cdef void clear_dirty_pt_masked(kvm_t* kvm, int64_t root, gfn_t gfn, u64 mask,
                                bint wrprot) noexcept nogil:
    """clear_dirty_pt_masked (exclusive): the 4K leaves of gfn + each set bit of `mask`
    lose the dirty bit with an atomic AND (no handle_changed_spte: KVM only traces it), and
    the old pfn is marked dirty.  The walk stops once every bit was seen."""
    cdef tdp_iter_t it
    cdef u64 dbit = tdp_mmu_dirty_bit(kvm, wrprot), bit
    cdef gfn_t end = gfn + 64
    if mask == 0:
        return
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, 1,
                   gfn + <gfn_t>__builtin_ctzll(mask))
    while it.valid and it.gfn < end:
        if not mask:
            break
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                it.level == 1:
            bit = (<u64>1) << (it.gfn - gfn)
            if mask & bit:
                mask &= ~bit
                if it.old_spte & dbit:
                    it.old_spte = tdp_mmu_clear_spte_bits(&kvm.m, it.sptep, it.old_spte, dbit,
                                                          it.level)
                    kvm_set_pfn_dirty(kvm, spte_to_pfn(it.old_spte))
        tdp_iter_next(&it)


cdef bint write_protect_gfn(kvm_t* kvm, mmu_stats_t* st, int64_t root, gfn_t gfn,
                            int min_level) noexcept nogil:
    """write_protect_gfn (exclusive): W and MMU-writable cleared on the leaf mapping gfn at
    >= min_level, so that every later write faults and takes the slow path."""
    cdef tdp_iter_t it
    cdef bint spte_set = False
    cdef u64 new_spte
    if gfn >= tdp_mmu_max_gfn_exclusive(kvm):
        return False
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, min_level, gfn)
    while it.valid and it.gfn < gfn + 1:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            new_spte = it.old_spte & ~(PT_WRITABLE_MASK | kvm.m.shadow_mmu_writable_mask)
            if new_spte == it.old_spte:
                break
            tdp_mmu_iter_set_spte(kvm, st, &it, new_spte)
            spte_set = True
        tdp_iter_next(&it)
    return spte_set


# -- huge pages (spec §3.13) ------------------------------------------------------------------

cdef int64_t tdp_mmu_split_huge_pages_root(kvm_t* kvm, mmu_stats_t* st, int64_t root,
                                           gfn_t start, gfn_t end, int target_level,
                                           bint shared) noexcept nogil:
    """tdp_mmu_split_huge_pages_root: every present huge leaf above target_level in
    [start, end) becomes a table of 512 one level down; pre-order, so a 1G page is split
    to 2M and each of those again.  Returns the pages split, or -SPTE_ENOMEM (KVM's caller
    gives up there; what was split stays split).  A lost CAS retries with the same table;
    an unused table goes back to the host."""
    cdef tdp_iter_t it
    cdef int64_t sp_idx = -1, split = 0
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end or target_level >= kvm.root_level:
        return 0
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level,
                   target_level + 1, start)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_large_pte(it.old_spte):
            if sp_idx < 0:
                # KVM drops mmu_lock to allocate and revisits the entry; the pool never
                # blocks, so the model allocates in place.
                sp_idx = tdp_mmu_alloc_sp_for_split(kvm, st)
                if sp_idx < 0:
                    st.huge_pages_split += split    # what was split stays split
                    return -SPTE_ENOMEM
            tdp_mmu_init_child_sp(kvm, sp_idx, &it, False)
            if tdp_mmu_split_huge_page(kvm, st, &it, pool_sp(kvm.pool, sp_idx), shared):
                continue                    # retry on the value found
            sp_idx = -1
            split += 1
        tdp_iter_next(&it)
    if sp_idx >= 0:
        tdp_mmu_free_sp(kvm, st, sp_idx)
    st.huge_pages_split += split
    return split


cdef void zap_collapsible_spte_range(kvm_t* kvm, mmu_stats_t* st, int64_t root,
                                     kvm_memory_slot_t* slot) noexcept nogil:
    """zap_collapsible_spte_range (6.10, shared): a present non-leaf at 2M or 1G inside the
    slot whose gfns could be mapped huge is zapped atomically (with its ranged flush), so
    the next fault installs the huge page."""
    cdef tdp_iter_t it
    cdef gfn_t start = slot.base_gfn, end = slot.base_gfn + slot.npages
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end:
        return
    tdp_iter_start(&it, kvm.pool.pages, root_pt(kvm, root), kvm.root_level, 2, start)
    while it.valid and it.gfn < end:
        if it.level <= 3 and is_shadow_present_pte(it.old_spte) and \
                not is_last_spte(it.old_spte, it.level) and \
                start <= it.gfn and it.gfn < end and \
                kvm_mmu_max_mapping_level(slot, it.gfn, kvm.max_level) >= it.level:
            if tdp_mmu_zap_spte_atomic(kvm, st, &it):
                continue                    # retry: it.old_spte holds what was found
        tdp_iter_next(&it)


# -- MMU notifier unmap (spec §3.10) -----------------------------------------------------------

cdef bint kvm_tdp_mmu_unmap_gfn_range(kvm_t* kvm, mmu_stats_t* st, gfn_t start,
                                      gfn_t end) noexcept nogil:
    """kvm_tdp_mmu_unmap_gfn_range: tdp_mmu_zap_leafs over every root, valid or not (a
    flush only for what valid roots mapped)."""
    cdef bint flush = False
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        flush |= tdp_mmu_zap_leafs(kvm, st, kvm.roots[i], start, end)
    return flush
