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


cdef int kvm_faultin_pfn(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault) noexcept nogil:
    """The memslot and pfn of the fault (RET_PF_CONTINUE), or how to finish it."""
    fault.slot = kvm_vcpu_gfn_to_memslot(vcpu, fault.gfn)
    if fault.slot == NULL:
        return RET_PF_CONTINUE              # no memslot: an MMIO SPTE (KVM_PFN_NOSLOT)
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

cdef inline int fast_page_fault(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault,
                                tdp_iter_t* it) noexcept nogil:
    """The fast path's question on the last SPTE of the walk: SPURIOUS if it already
    allows the access, else RET_PF_INVALID (take the slow path)."""
    if is_shadow_present_pte(it.old_spte) and is_access_allowed(&vcpu.kvm.m, fault, it.old_spte):
        return RET_PF_SPURIOUS
    return RET_PF_INVALID


cdef int kvm_tdp_mmu_page_fault(kvm_vcpu_t* vcpu, kvm_page_fault_t* fault) noexcept nogil:
    """One TDP fault (6.10 order).  Returns RET_PF_* or -SPTE_ENOMEM / -SPTE_EIO."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef tdp_iter_t it
    cdef int r
    # kvm_tdp_mmu_fast_pf_get_last_sptep: the walk, from the hint when it is valid.
    if not walk_hint_seed(vcpu, &it, fault.gfn):
        tdp_iter_start(&it, kvm.pool.pages, kvm_root_pt(kvm), kvm.root_level, 1, fault.gfn)
        tdp_iter_walk_down(&it)
    r = fast_page_fault(vcpu, fault, &it)
    if r == RET_PF_INVALID:
        r = mmu_topup_memory_caches(vcpu)
        if r < 0:
            return r
        r = kvm_faultin_pfn(vcpu, fault)
        if r == RET_PF_CONTINUE:
            r = kvm_tdp_mmu_map(vcpu, fault, &it)
            if r < 0:
                return r
    if it.level == 1:
        walk_hint_save(vcpu, &it, fault.gfn)
    return r


cdef int kvm_mmu_do_page_fault(kvm_vcpu_t* vcpu, gfn_t gfn, u64 error_code) noexcept nogil:
    """struct kvm_page_fault from the error code, the fault, and its count (pf_fixed, ...)."""
    cdef kvm_page_fault_t fault
    cdef int r
    fault.gfn = gfn
    fault.error_code = error_code
    fault.write = (error_code & PFERR_WRITE_MASK) != 0
    fault.exec = (error_code & PFERR_FETCH_MASK) != 0
    fault.prefetch = False
    fault.nx_huge_page_workaround_enabled = vcpu.kvm.nx_huge_pages
    fault.max_level = vcpu.kvm.max_level
    fault.req_level = 1
    fault.goal_level = 1
    fault.huge_page_disallowed = False
    fault.slot = NULL
    fault.pfn = 0
    fault.map_writable = False
    r = kvm_tdp_mmu_page_fault(vcpu, &fault)
    if r >= 0:
        vcpu.stat.faults[r] += 1
    return r


cdef inline u64 fault_error_code(bint write, bint exec) noexcept nogil:
    """The error code of a not-present fault for a read, write or instruction fetch."""
    return (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if exec else 0)


cdef void kvm_mmu_invalidate_mmio_sptes(kvm_t* kvm, mmu_stats_t* st) noexcept nogil:
    """A memslot change: the next generation.  When it wraps to 0, an MMIO SPTE from
    2**19 changes ago would look current again, so every SPTE goes (one full flush)."""
    kvm.mmio_gen = (kvm.mmio_gen + 1) & MMIO_SPTE_GEN_MASK
    if kvm.mmio_gen == 0 and tdp_mmu_zap_root(kvm, st):
        st.tlb_flushes += 1
