# =====================================================================================
# core/mmu.pxi: the page-fault entry (≈ arch/x86/kvm/mmu/mmu.c, Linux 6.10)
# =====================================================================================
# kvm_mmu_do_page_fault builds the struct kvm_page_fault from the error code and counts
# the result; kvm_tdp_mmu_page_fault runs KVM's order: the fast path's question (does the
# last SPTE already allow the access?), the vCPU cache top-up, the pfn (kvm_faultin_pfn:
# a write to a read-only slot is emulated), then kvm_tdp_mmu_map, which begins with
# kvm_mmu_hugepage_adjust.  Callers hold the vCPU's mutex and mmu_lock for read.

cdef enum:
    # mmu_topup_memory_caches: 1 + PT64_ROOT_MAX_LEVEL - 1 (a TDP fault needs no more)
    PT64_ROOT_MAX_LEVEL_PAGES = 5


cdef int kvm_mmu_max_mapping_level(kvm_memory_slot_t* slot, gfn_t gfn,
                                   int max_level) noexcept nogil:
    """The largest level <= max_level whose aligned range lies in the slot with gfn and pfn
    equally aligned (KVM's disallow_lpage); host backing never limits it in this model."""
    cdef int level
    cdef u64 n
    cdef gfn_t base
    for level in range(max_level, 1, -1):
        n = pages_per_level(level)
        base = gfn & ~(n - 1)
        if base >= slot.base_gfn and base + n <= slot.base_gfn + slot.npages and \
                ((slot.pfn - slot.base_gfn) & (n - 1)) == 0:
            return level
    return 1


cdef void kvm_mmu_hugepage_adjust(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault) noexcept nogil:
    cdef u64 mask
    # Set before anything else: an exec fault on a gfn with no memslot (MMIO) under the NX
    # mitigation marks the tables it makes all the same.
    fault.huge_page_disallowed = fault.exec and fault.nx_huge_page_workaround_enabled
    if fault.max_level == 1:
        return
    if fault.slot == NULL:                  # is_error_noslot_pfn: MMIO maps at 4K
        return
    if kvm_slot_dirty_track_enabled(fault.slot):
        return                              # dirty logging tracks writes at 4K
    fault.req_level = kvm_mmu_max_mapping_level(fault.slot, fault.gfn, fault.max_level)
    if fault.req_level == 1 or fault.huge_page_disallowed:
        return
    fault.goal_level = fault.req_level
    mask = pages_per_level(fault.goal_level) - 1
    fault.pfn &= ~mask


cdef inline void disallowed_hugepage_adjust(kvm_t* kvm, kvm_page_fault_t* fault, u64 spte,
                                            int cur_level) noexcept nogil:
    """Keep a table that an NX-disallowed fault had to make: map one level lower."""
    cdef u64 page_mask
    if cur_level > 1 and cur_level == fault.goal_level and is_shadow_present_pte(spte) and \
            not is_large_pte(spte) and spte_to_child_sp(kvm, spte).nx_huge_page_disallowed:
        page_mask = pages_per_level(cur_level) - pages_per_level(cur_level - 1)
        fault.pfn |= fault.gfn & page_mask
        fault.goal_level -= 1


cdef inline bint is_access_allowed(const spte_masks_t* m, kvm_page_fault_t* fault,
                                   u64 spte) noexcept nogil:
    if fault.exec:
        return is_executable_pte(m, spte)
    if fault.write:
        return is_writable_pte(spte)
    return (spte & PT_PRESENT_MASK) != 0


cdef inline void vcpu_cache_mmio_info(kvm_vcpu_t* vcpu, gfn_t gfn) noexcept nogil:
    """x86.h vcpu_cache_mmio_info for a direct MMU (gva 0): the gfn and the generation."""
    vcpu.mmio_gfn = gfn
    vcpu.mmio_gen = vcpu.kvm.generation


cdef inline int kvm_handle_noslot_fault(kvm_vcpu_t* vcpu,
                                        kvm_page_fault_t* fault) noexcept nogil:
    """A gfn in no memslot: emulated; an MMIO SPTE is made for it (RET_PF_CONTINUE) unless
    MMIO caching is off or the gfn is beyond host MAXPHYADDR."""
    vcpu_cache_mmio_info(vcpu, fault.gfn)
    if vcpu.kvm.m.shadow_mmio_value == 0:   # !enable_mmio_caching
        return RET_PF_EMULATE
    if fault.gfn > vcpu.kvm.max_gfn:        # kvm_mmu_max_gfn(): no SPTE for such a gfn
        return RET_PF_EMULATE
    return RET_PF_CONTINUE


cdef int kvm_faultin_pfn(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault) noexcept nogil:
    """The pfn of the fault (RET_PF_CONTINUE), or how to finish it."""
    if fault.slot == NULL:
        return kvm_handle_noslot_fault(vcpu, fault)
    if fault.slot.flags & KVM_MEMSLOT_INVALID:
        return RET_PF_RETRY                 # the slot is being deleted or moved
    fault.map_writable = not (fault.slot.flags & KVM_MEM_READONLY)
    if fault.write and not fault.map_writable:
        return RET_PF_EMULATE               # KVM_PFN_ERR_RO_FAULT: emulate, install nothing
    fault.pfn = gfn_to_pfn_memslot(fault.slot, fault.gfn)
    return RET_PF_CONTINUE


cdef int mmu_topup_memory_caches(kvm_vcpu_t* vcpu) noexcept nogil:
    cdef kvm_mmu_memory_cache_t* mc = vcpu.mmu_shadow_page_cache
    cdef int r
    if mc.nobjs >= PT64_ROOT_MAX_LEVEL_PAGES:
        return 0
    r = kvm_mmu_topup_memory_cache(mc, KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
                                   PT64_ROOT_MAX_LEVEL_PAGES)
    if r == -SPTE_ENOMEM and vcpu.kvm.nr_rcu_pending:
        rcu_reclaim_pending(vcpu.kvm)      # removed tables may be reusable by now
        r = kvm_mmu_topup_memory_cache(mc, KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
                                       PT64_ROOT_MAX_LEVEL_PAGES)
    return r


# -- the vCPU's walk hint (a paging-structure cache) ---------------------------------------

cdef inline bint walk_hint_seed(kvm_vcpu_t* vcpu, tdp_iter_t* it, gfn_t gfn) noexcept nogil:
    """Start `it` at gfn's 4K entry from the last walk, if the entry linking that table is
    unchanged and no table was removed since."""
    cdef walk_hint_t* hint = &vcpu.hint
    if not hint.valid or (gfn >> 9) != hint.region or \
            u64_load_seq_cst(&vcpu.kvm.removals) != hint.removals or \
            kvm_tdp_mmu_read_spte(hint.l2_sptep) != hint.l2_spte:
        return False
    tdp_iter_start_at(it, vcpu.kvm.pool.pages, hint.pt_path, vcpu.kvm.root_level, 1, gfn)
    return True


cdef inline void walk_hint_save(kvm_vcpu_t* vcpu, tdp_iter_t* it, gfn_t gfn) noexcept nogil:
    cdef walk_hint_t* hint = &vcpu.hint
    cdef tdp_ptep_t l2 = it.pt_path[1] + spte_index(gfn, 2)
    cdef u64 v = kvm_tdp_mmu_read_spte(l2)
    hint.valid = is_shadow_present_pte(v) and not is_large_pte(v) and \
        spte_to_child_pt(vcpu.kvm, v) == it.pt_path[0]
    hint.region = gfn >> 9
    hint.removals = u64_load_seq_cst(&vcpu.kvm.removals)
    hint.l2_sptep = l2
    hint.l2_spte = v
    memcpy(hint.pt_path, it.pt_path, sizeof(hint.pt_path))


# -- the fault ----------------------------------------------------------------------------

cdef inline bint page_fault_can_be_fast(kvm_t* kvm, kvm_page_fault_t* fault) noexcept nogil:
    """6.10: never for RSVD faults (an MMIO SPTE of an old generation needs the slow path);
    a not-present fault only when KVM does not use A/D bits (access tracking); a present
    one only for a write (write-protection)."""
    if fault.rsvd:
        return False
    if not fault.present:
        return not kvm.ad_enabled
    return fault.write


cdef inline bint fast_pf_fix_direct_spte(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault,
                                         tdp_iter_t* it, u64 new_spte) noexcept nogil:
    """The lockless fix: one compare-and-exchange and no handle_changed_spte (6.10: the pfn,
    level and presence are unchanged).  A newly writable SPTE marks the gfn dirty in the
    slot's dirty bitmap (mark_page_dirty_in_slot): how dirty logging by write-protection
    learns of a write."""
    cdef u64 old_spte = it.old_spte
    if __tdp_mmu_set_spte_atomic(vcpu.kvm, &vcpu.stat, it, new_spte):
        return False
    if is_writable_pte(new_spte) and not is_writable_pte(old_spte):
        mark_page_dirty_in_slot(vcpu.kvm, &vcpu.stat, fault.slot, fault.gfn)
    return True


cdef int fast_page_fault(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault,
                         tdp_iter_t* it) noexcept nogil:
    """fast_page_fault on the last SPTE of the walk `it` (kvm_tdp_mmu_fast_pf_get_last_sptep),
    once page_fault_can_be_fast said yes (its caller asks, so that the common no costs no
    call): SPURIOUS if it already allows the access; FIXED if restoring an access-tracked
    SPTE and/or setting W on an MMU-writable one allows it; else RET_PF_INVALID."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef const spte_masks_t* m = &kvm.m
    cdef int ret = RET_PF_INVALID, retry_count = 0
    cdef u64 spte, new_spte
    while True:
        spte = it.old_spte
        if not is_shadow_present_pte(spte) or not is_last_spte(spte, it.level):
            break
        if is_access_allowed(m, fault, spte):
            ret = RET_PF_SPURIOUS
            break
        new_spte = spte
        if not kvm.ad_enabled and is_access_track_spte(m, spte):
            new_spte = restore_acc_track_spte(m, new_spte)
        if fault.write and is_mmu_writable_spte(m, spte):
            new_spte |= PT_WRITABLE_MASK
            # Never make a huge SPTE writable in a dirty-logged slot: only its first page
            # would be logged.  The slow path maps the page at 4K instead.
            if it.level > 1 and kvm_slot_dirty_track_enabled(fault.slot):
                break
        if new_spte == spte or not is_access_allowed(m, fault, new_spte):
            break
        if fast_pf_fix_direct_spte(vcpu, fault, it, new_spte):
            ret = RET_PF_FIXED
            break
        retry_count += 1
        if retry_count > 4:                 # "Fast #PF retrying more than 4 times"
            break
        # Walk again, as the next kvm_tdp_mmu_fast_pf_get_last_sptep would.
        tdp_iter_seek(it, kvm.pool.pages, root_pt(kvm, vcpu.root), kvm.root_level,
                      fault.gfn, 1)
    if ret != RET_PF_INVALID:
        vcpu.stat.faults_fast += 1
    return ret


cdef inline int kvm_tdp_mmu_page_fault(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault) noexcept nogil:
    """One TDP fault (6.10 order).  Returns RET_PF_* or -SPTE_ENOMEM / -SPTE_EIO."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef tdp_iter_t it
    cdef int r
    cdef bint seeded = walk_hint_seed(vcpu, &it, fault.gfn)
    # kvm_tdp_mmu_fast_pf_get_last_sptep: the walk, from the hint when it is valid.
    if not seeded:
        tdp_iter_seek(&it, kvm.pool.pages, root_pt(kvm, vcpu.root), kvm.root_level,
                      fault.gfn, 1)
    r = fast_page_fault(vcpu, fault, &it) if page_fault_can_be_fast(kvm, fault) \
        else RET_PF_INVALID
    if r == RET_PF_INVALID:
        r = mmu_topup_memory_caches(vcpu)
        if r < 0:
            return r
        r = kvm_faultin_pfn(vcpu, fault)
        if r == RET_PF_CONTINUE:
            r = kvm_tdp_mmu_map(vcpu, fault, &it)
            if r < 0:
                return r
    # A walk seeded from the hint that ended at 4K changed nothing above: the hint holds.
    if it.level == 1 and not seeded:
        walk_hint_save(vcpu, &it, fault.gfn)
    return r


cdef int kvm_mmu_do_page_fault(kvm_vcpu_t* vcpu, gfn_t gfn, u64 error_code) noexcept nogil:
    """struct kvm_page_fault from the error code, the fault, and its count (pf_fixed, ...)."""
    cdef kvm_page_fault_t fault
    cdef int r
    fault.gfn = gfn
    fault.error_code = error_code
    fault.present = (error_code & PFERR_PRESENT_MASK) != 0
    fault.write = (error_code & PFERR_WRITE_MASK) != 0
    fault.rsvd = (error_code & PFERR_RSVD_MASK) != 0
    fault.exec = (error_code & PFERR_FETCH_MASK) != 0
    fault.prefetch = False
    fault.nx_huge_page_workaround_enabled = vcpu.kvm.nx_huge_pages
    fault.max_level = vcpu.kvm.max_level
    fault.req_level = 1
    fault.goal_level = 1
    fault.huge_page_disallowed = False
    fault.slot = kvm_vcpu_gfn_to_memslot(vcpu, gfn)     # a direct MMU: the gfn is the gpa
    fault.pfn = 0
    fault.map_writable = False
    r = kvm_tdp_mmu_page_fault(vcpu, &fault)
    if r >= 0:
        vcpu.stat.faults[r] += 1
    return r


cdef inline u64 fault_error_code(bint write, bint exec) noexcept nogil:
    """The error code of a not-present fault for a read, write or instruction fetch."""
    return (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if exec else 0)


cdef int handle_mmio_page_fault(kvm_vcpu_t* vcpu, gfn_t gfn) noexcept nogil:
    """A fault with RSVD set, i.e. on an MMIO SPTE (direct MMU): EMULATE if the vCPU's MMIO
    info or the SPTE is of the current generation, RET_PF_INVALID for an old generation (the
    slow path remakes it), RETRY if the SPTE is no longer MMIO (zapped meanwhile)."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef tdp_iter_t it
    cdef u64 spte
    # mmio_info_in_cache -> vcpu_match_mmio_gpa (a cached gfn of 0 never matches)
    if vcpu.mmio_gen == kvm.generation and vcpu.mmio_gfn != 0 and vcpu.mmio_gfn == gfn:
        return RET_PF_EMULATE
    # get_mmio_spte: the last SPTE of kvm_tdp_mmu_get_walk
    tdp_iter_seek(&it, kvm.pool.pages, root_pt(kvm, vcpu.root), kvm.root_level, gfn, 1)
    spte = it.old_spte
    if is_mmio_spte(&kvm.m, spte):
        if get_mmio_spte_generation(spte) != (kvm.generation & MMIO_SPTE_GEN_MASK):
            return RET_PF_INVALID           # check_mmio_spte
        vcpu_cache_mmio_info(vcpu, get_mmio_spte_gfn(&kvm.m, spte))
        return RET_PF_EMULATE
    return RET_PF_RETRY


cdef int kvm_mmu_page_fault(kvm_vcpu_t* vcpu, gfn_t gfn, u64 error_code) noexcept nogil:
    """kvm_mmu_page_fault: what an EPT violation / misconfiguration or a #NPF hands to the
    MMU.  RET_PF_* (or -SPTE_ENOMEM / -SPTE_EIO from kvm_mmu_do_page_fault)."""
    cdef int r = RET_PF_INVALID
    if error_code & PFERR_RSVD_MASK:
        r = handle_mmio_page_fault(vcpu, gfn)
        if r == RET_PF_EMULATE:
            return r
    if r == RET_PF_INVALID:
        r = kvm_mmu_do_page_fault(vcpu, gfn, error_code)
    return r


cdef bint kvm_mmu_invalidate_mmio_sptes(kvm_t* kvm, u64 gen) noexcept nogil:
    """kvm_arch_memslots_updated: an MMIO SPTE of another generation no longer matches.
    True when the MMIO generation wrapped (its address-space bit stripped): an MMIO SPTE
    from 2**18 swaps ago would look current again, so the caller runs
    kvm_mmu_zap_all_fast."""
    gen &= MMIO_SPTE_GEN_MASK
    gen &= ~(<u64>KVM_ADDRESS_SPACE_NUM - 1)
    return gen == 0


# -- kvm_mmu_load / kvm_mmu_free_obsolete_roots (the vCPU's root, on each entry) ---------

cdef int kvm_mmu_reload(kvm_vcpu_t* vcpu) noexcept nogil:
    """On entering the guest (vcpu_enter_guest, mmu_lock held for read here): service
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (drop an invalid root), then kvm_mmu_reload ->
    kvm_mmu_load (top up the cache, find or allocate the root).  0 or -SPTE_ENOMEM/EIO."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef int r
    if vcpu.root >= 0:
        if not pool_sp(kvm.pool, vcpu.root).role_invalid:
            return 0
        kvm_tdp_mmu_put_root(kvm, &vcpu.stat, vcpu.root)
        vcpu.root = -1
    r = mmu_topup_memory_caches(vcpu)
    if r < 0:
        return r
    vcpu.root = kvm_tdp_mmu_alloc_root(vcpu)
    if vcpu.root < 0:
        return -SPTE_ENOMEM
    return 0


# -- slot-wide dirty logging and huge pages (mmu.c 6.10; the TDP MMU's half) ----------------
# The shared ones are called with mmu_lock held for read (the VM's read-side slot), the
# others for write.  Only valid roots (for_each_valid_tdp_mmu_root).

cdef inline bint _root_valid(kvm_t* kvm, int i) noexcept nogil:
    return not pool_sp(kvm.pool, kvm.roots[i]).role_invalid


cdef bint kvm_mmu_slot_remove_write_access(kvm_t* kvm, mmu_stats_t* st,
                                           kvm_memory_slot_t* slot,
                                           int start_level) noexcept nogil:
    """kvm_tdp_mmu_wrprot_slot (shared)."""
    cdef bint spte_set = False
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        if _root_valid(kvm, i):
            spte_set |= wrprot_gfn_range(kvm, st, kvm.roots[i], slot.base_gfn,
                                         slot.base_gfn + slot.npages, start_level)
    return spte_set


cdef bint kvm_mmu_slot_leaf_clear_dirty(kvm_t* kvm, mmu_stats_t* st,
                                        kvm_memory_slot_t* slot) noexcept nogil:
    """kvm_tdp_mmu_clear_dirty_slot (shared)."""
    cdef bint spte_set = False
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        if _root_valid(kvm, i):
            spte_set |= clear_dirty_gfn_range(kvm, st, kvm.roots[i], slot.base_gfn,
                                              slot.base_gfn + slot.npages)
    return spte_set


cdef int64_t kvm_mmu_try_split_huge_pages(kvm_t* kvm, mmu_stats_t* st, gfn_t start,
                                          gfn_t end, int target_level,
                                          bint shared) noexcept nogil:
    """kvm_tdp_mmu_try_split_huge_pages: pages split over the valid roots; on running out
    of memory it stops there (-SPTE_ENOMEM, what was split stays split)."""
    cdef int64_t r, split = 0
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        if _root_valid(kvm, i):
            r = tdp_mmu_split_huge_pages_root(kvm, st, kvm.roots[i], start, end,
                                              target_level, shared)
            if r < 0:
                return r
            split += r
    return split


cdef void kvm_mmu_zap_collapsible_sptes(kvm_t* kvm, mmu_stats_t* st,
                                        kvm_memory_slot_t* slot) noexcept nogil:
    """kvm_tdp_mmu_zap_collapsible_sptes (shared)."""
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        if _root_valid(kvm, i):
            zap_collapsible_spte_range(kvm, st, kvm.roots[i], slot)


cdef bint kvm_mmu_slot_gfn_write_protect(kvm_t* kvm, mmu_stats_t* st, gfn_t gfn,
                                         int min_level) noexcept nogil:
    """kvm_tdp_mmu_write_protect_gfn over the valid roots (exclusive).  True: flush."""
    cdef bint spte_set = False
    cdef int i
    for i in range(kvm.nr_roots - 1, -1, -1):
        if _root_valid(kvm, i):
            spte_set |= write_protect_gfn(kvm, st, kvm.roots[i], gfn, min_level)
    return spte_set


cdef void kvm_arch_mmu_enable_log_dirty_pt_masked(kvm_t* kvm, mmu_stats_t* st,
                                                  kvm_memory_slot_t* slot, u64 gfn_offset,
                                                  u64 mask) noexcept nogil:
    """Re-protect the pages of one 64-page word of a harvested dirty bitmap (exclusive).

    With manual protect and initially-all-set, the huge pages around the first and last set
    bit are first split (eager_page_split) and write-protected at 2M, so that the first
    write to them dirty-logs at 4K.  Then the 4K leaves lose D (PML) or W."""
    cdef gfn_t start, end
    cdef int i
    if mask == 0:
        return
    if kvm.manual_dirty_log_protect and kvm.dirty_log_initially_set:
        start = slot.base_gfn + gfn_offset + <u64>__builtin_ctzll(mask)
        end = slot.base_gfn + gfn_offset + <u64>(63 - __builtin_clzll(mask))
        if kvm.eager_page_split:
            kvm_mmu_try_split_huge_pages(kvm, st, start, end + 1, 1, False)
        kvm_mmu_slot_gfn_write_protect(kvm, st, start, 2)
        # "Cross two large pages?" -- 6.10 compares ALIGN(gfn << PAGE_SHIFT, PMD_SIZE), the
        # gfns rounded *up* to 2M: a last bit on the first page of the next 2M page rounds
        # like the first bit below it, and that huge page is left writable (kept as is).
        if ((start + 511) >> 9) != ((end + 511) >> 9):
            kvm_mmu_slot_gfn_write_protect(kvm, st, end, 2)
    for i in range(kvm.nr_roots - 1, -1, -1):
        if _root_valid(kvm, i):
            clear_dirty_pt_masked(kvm, kvm.roots[i], slot.base_gfn + gfn_offset, mask,
                                  not kvm.enable_pml)


# -- NX huge-page recovery (mmu.c kvm_recover_nx_huge_pages, 6.10; exclusive) ---------------

cdef int64_t kvm_recover_nx_huge_pages(kvm_t* kvm, mmu_stats_t* st) noexcept nogil:
    """One run of the recovery thread: take ceil(nx_lpage_splits / ratio) tables from the
    head of possible_nx_huge_pages; one in a dirty-logged slot is only unaccounted, the
    others are zapped (kvm_tdp_mmu_zap_sp).  One full TLB flush if anything was zapped.
    Returns the tables zapped."""
    cdef int64_t to_zap, zapped = 0, head
    cdef kvm_mmu_page_t* sp
    cdef kvm_memory_slot_t* slot
    cdef bint flush = False
    cdef int ratio = kvm.nx_huge_pages_recovery_ratio
    to_zap = (kvm.nx_lpage_splits + ratio - 1) // ratio if ratio else 0
    while to_zap > 0:
        to_zap -= 1
        head = kvm.possible_nx_head
        if head < 0:
            break
        sp = pool_sp(kvm.pool, head)
        slot = search_memslots(kvm, sp.gfn) if kvm.nr_memslots_dirty_logging else NULL
        if slot != NULL and kvm_slot_dirty_track_enabled(slot):
            unaccount_nx_huge_page(kvm, sp)
        else:
            if kvm_tdp_mmu_zap_sp(kvm, st, sp):
                flush = True
                zapped += 1
            else:
                unaccount_nx_huge_page(kvm, sp)     # never stay at the head for ever
    if flush:
        st.tlb_flushes += 1                 # kvm_mmu_remote_flush_or_zap
    st.nx_huge_pages_recovered += zapped
    return zapped
