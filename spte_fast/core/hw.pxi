# =====================================================================================
# core/hw.pxi: the CPU's side of TDP -- the EPT / NPT page walker and the exits it raises
# =====================================================================================
# Not KVM code: what the processor does on a TLB miss for a guest-physical address (Intel
# SDM vol. 3 §29.3 "EPT", AMD APM vol. 2 §15.25 "Nested Paging"), and how VMX/SVM turn a
# failed walk into the error code KVM receives (vmx.c handle_ept_violation /
# handle_ept_misconfig, svm.c npf_interception).  The walker sees hardware bits, not
# KVM's: an EPT entry is present when any of R/W/X is set (an access-tracked SPTE is
# not), W without R is a misconfiguration (KVM's MMIO SPTEs), and on NPT a set physical
# address bit at or above MAXPHYADDR is a reserved-bit fault (NPT's MMIO SPTEs, bit 51).
# KVM makes every non-leaf SPTE with full access (fast_page_fault relies on it too), so
# only the leaf's permissions decide.  When the access is permitted the walker sets the
# accessed bit, and the dirty bit on a write, with one atomic OR, and no VM exit happens:
# the one SPTE store in the engine that is not KVM's (and so not followed by
# handle_changed_spte -- KVM never sees it).

# HW_* verdicts, ACC_* kinds and HW_PERM_* are declared in _core.pxd (the embedding API).


cdef void hw_setup(kvm_t* kvm) noexcept nogil:
    """What the walker checks, per access kind, for this VM's paging mode, and the hit
    case's single test (hw_walk_hits): the leaf has these bits, A (and D on a write) already
    set where the CPU would set them, bit 0, and no reserved or forbidden bit."""
    cdef const spte_masks_t* m = &kvm.m
    cdef u64 ad[3]
    cdef int k
    if m.ept:
        kvm.hw_present_mask = VMX_EPT_RWX_MASK
        kvm.hw_need[ACC_READ] = PT_PRESENT_MASK                 # R
        kvm.hw_need[ACC_WRITE] = PT_WRITABLE_MASK               # W
        kvm.hw_need[ACC_FETCH] = m.shadow_x_mask                # X (no MBEC: one X bit)
        kvm.hw_forbid[ACC_READ] = kvm.hw_forbid[ACC_WRITE] = kvm.hw_forbid[ACC_FETCH] = 0
    else:
        # Nested page walks are user accesses: U is needed at the leaf for any access.
        kvm.hw_present_mask = PT_PRESENT_MASK
        kvm.hw_need[ACC_READ] = PT_PRESENT_MASK | m.shadow_user_mask
        kvm.hw_need[ACC_WRITE] = PT_PRESENT_MASK | m.shadow_user_mask | PT_WRITABLE_MASK
        kvm.hw_need[ACC_FETCH] = PT_PRESENT_MASK | m.shadow_user_mask
        kvm.hw_forbid[ACC_READ] = kvm.hw_forbid[ACC_WRITE] = 0
        kvm.hw_forbid[ACC_FETCH] = m.shadow_nx_mask
    ad[ACC_READ] = ad[ACC_WRITE] = ad[ACC_FETCH] = 0
    if kvm.ad_enabled:          # EPT without A/D: the SPTEs carry no A/D bits to look at
        ad[ACC_READ] = ad[ACC_FETCH] = m.shadow_accessed_mask
        ad[ACC_WRITE] = m.shadow_accessed_mask | m.shadow_dirty_mask
    kvm.hw_hit_ok = kvm.rsvd_pa_mask | PT_PRESENT_MASK
    for k in range(3):
        kvm.hw_hit_need[k] = kvm.hw_need[k] | ad[k] | PT_PRESENT_MASK
        kvm.hw_hit_check[k] = kvm.hw_hit_need[k] | kvm.hw_forbid[k] | kvm.hw_hit_ok


cdef int hw_tdp_walk(kvm_vcpu_t* vcpu, gfn_t gfn, int acc, bint* leaf_present) noexcept nogil:
    """Translate gfn from the vCPU's root: HW_HIT (A, and D on a write, set as needed),
    HW_VIOLATION (`leaf_present` says whether the last entry walked was present to the
    CPU) or HW_MISCONFIG."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef tdp_ptep_t table = pool_page(kvm.pool, vcpu.root)
    cdef tdp_ptep_t sptep
    cdef int level = kvm.root_level
    cdef u64 spte, need = kvm.hw_need[acc], want
    vcpu.stat.hw_walks += 1
    while True:
        sptep = table + spte_index(gfn, level)
        spte = kvm_tdp_mmu_read_spte(sptep)
        if not (spte & kvm.hw_present_mask):
            leaf_present[0] = False
            return HW_VIOLATION
        if (spte & kvm.rsvd_pa_mask) or \
                (kvm.m.ept and (spte & (PT_PRESENT_MASK | PT_WRITABLE_MASK)) == PT_WRITABLE_MASK):
            return HW_MISCONFIG
        if level == 1 or (spte & PT_PAGE_SIZE_MASK):
            break
        table = spte_to_child_pt(kvm, spte)
        level -= 1
    if (spte & need) != need or (spte & kvm.hw_forbid[acc]):
        leaf_present[0] = True
        return HW_VIOLATION
    if kvm.ad_enabled and spte_ad_enabled(spte):
        want = kvm.m.shadow_accessed_mask
        if acc == ACC_WRITE:
            want |= kvm.m.shadow_dirty_mask
        if (spte & want) != want:
            # PML (SDM vol. 3 "Page-Modification Logging"): setting a clear D logs the
            # 4K-aligned guest-physical address first; with the log full, a PML-full exit
            # happens instead and neither A nor D is set (the write is re-executed).
            if acc == ACC_WRITE and not (spte & kvm.m.shadow_dirty_mask) and \
                    kvm.enable_pml and kvm.nr_memslots_dirty_logging:
                if vcpu.pml_count == PML_ENTITY_NUM:
                    return HW_PML_FULL
                vcpu.pml_buf[vcpu.pml_count] = gfn
                vcpu.pml_count += 1
                vcpu.stat.pml_logged += 1
            hw_set_ad_bits(sptep, want)
            vcpu.stat.hw_ad_sets += 1
    return HW_HIT


cdef inline bint hw_entry_usable(kvm_t* kvm, u64 spte) noexcept nogil:
    """An entry the CPU walks through or translates with: present to the hardware (EPT:
    any of R/W/X; NPT: P), no reserved PA bit, and on EPT not W without R (KVM's MMIO
    value: a misconfiguration)."""
    return (spte & kvm.hw_present_mask) != 0 and not (spte & kvm.rsvd_pa_mask) and \
        not (kvm.m.ept and (spte & (PT_PRESENT_MASK | PT_WRITABLE_MASK)) == PT_WRITABLE_MASK)


cdef int hw_walk_last(kvm_vcpu_t* vcpu, gfn_t gfn, u64* last) noexcept nogil:
    """Read gfn's path from the vCPU's root, setting nothing: the level of the last entry
    read -- the leaf, or the first entry the CPU cannot use -- and that entry in ``last``.
    The walk read root_level - level + 1 entries."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef tdp_ptep_t table = pool_page(kvm.pool, vcpu.root)
    cdef int level = kvm.root_level
    cdef u64 spte
    while True:
        spte = kvm_tdp_mmu_read_spte(table + spte_index(gfn, level))
        if not hw_entry_usable(kvm, spte) or level == 1 or (spte & PT_PAGE_SIZE_MASK):
            last[0] = spte
            return level
        table = spte_to_child_pt(kvm, spte)
        level -= 1


cdef inline pfn_t hw_leaf_pfn(u64 spte, int level, gfn_t gfn) noexcept nogil:
    """The host pfn of gfn under a leaf of that level."""
    return spte_to_pfn(spte) + (gfn & ((<u64>1 << (9 * (level - 1))) - 1))


cdef void hw_tlb_entry(kvm_vcpu_t* vcpu, gfn_t gfn, hw_tlb_entry_t* e) noexcept nogil:
    """What the CPU's TLB holds for gfn after a completed access (inside the read side): the
    leaf, the host pfn of gfn, and the accesses the entry allows without another walk --
    those the leaf permits, a write only once D is set where the CPU keeps D (a write
    through a clean entry walks again to set it: SDM vol. 3 §29.3.5, APM vol. 2 §15.25.7,
    which is also when PML logs the gfn).  e.level 0: no present leaf translates gfn."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef int level, acc
    cdef u64 spte
    e.level = 0
    e.perms = 0
    level = hw_walk_last(vcpu, gfn, &spte)
    if not hw_entry_usable(kvm, spte):
        return
    e.spte = spte
    e.level = level
    e.pfn = hw_leaf_pfn(spte, level, gfn)
    for acc in range(3):                    # HW_PERM_* is 1 << ACC_*
        if (spte & kvm.hw_need[acc]) == kvm.hw_need[acc] and not (spte & kvm.hw_forbid[acc]):
            e.perms |= 1 << acc
    if (e.perms & HW_PERM_WRITE) and kvm.ad_enabled and spte_ad_enabled(spte) and \
            not (spte & kvm.m.shadow_dirty_mask):
        e.perms &= ~HW_PERM_WRITE


# What the unrolled walk of one read-side section needs, in registers.
ctypedef struct hw_tlb_fill_t:
    u64* pages
    tdp_ptep_t root
    bint five_levels
    u64 ok                          # kvm.hw_hit_ok: (spte & ok) == bit 0 on every level
    u64 present                     # kvm.hw_present_mask
    const u64* need                 # kvm.hw_hit_need / hw_hit_check, by access kind
    const u64* check


cdef inline void hw_tlb_fill_setup(kvm_vcpu_t* vcpu, hw_tlb_fill_t* f) noexcept nogil:
    cdef kvm_t* kvm = vcpu.kvm
    f.pages = kvm.pool.pages
    f.root = pool_page(kvm.pool, vcpu.root)
    f.five_levels = kvm.root_level == 5
    f.ok = kvm.hw_hit_ok
    f.present = kvm.hw_present_mask
    f.need = kvm.hw_hit_need
    f.check = kvm.hw_hit_check


cdef inline int hw_walk_miss(const hw_tlb_fill_t* f, u64 spte) noexcept nogil:
    """Where the common case ends on `spte`: an entry with none of the present bits is an
    EPT violation / #NPF with the translation not present, exactly as hw_tdp_walk finds it
    (the entries above passed its checks); anything else is for hw_tdp_walk to decide."""
    return HW_UNDECIDED if spte & f.present else HW_VIOLATION


cdef inline int hw_walk_hits(const hw_tlb_fill_t* f, gfn_t gfn, int acc) noexcept nogil:
    """The common cases of hw_tdp_walk, unrolled: HW_HIT when every entry has bit 0 (EPT
    R, NPT P) and no reserved bit, no large page above 1G, and the leaf allows the access
    with A (and D) already set -- a walk that changes nothing; HW_VIOLATION when it ends on
    a not-present entry (nothing is set either); else HW_UNDECIDED: let hw_tdp_walk decide
    (a misconfigured entry, a denied access, an A/D assist)."""
    cdef tdp_ptep_t table = f.root
    cdef u64 spte, ok = f.ok
    if f.five_levels:
        spte = kvm_tdp_mmu_read_spte(table + ((gfn >> 36) & 511))
        if (spte & (ok | PT_PAGE_SIZE_MASK)) != PT_PRESENT_MASK:
            return hw_walk_miss(f, spte)
        table = spte_to_child_table(f.pages, spte)
    spte = kvm_tdp_mmu_read_spte(table + ((gfn >> 27) & 511))
    if (spte & (ok | PT_PAGE_SIZE_MASK)) != PT_PRESENT_MASK:
        return hw_walk_miss(f, spte)
    spte = kvm_tdp_mmu_read_spte(spte_to_child_table(f.pages, spte) + ((gfn >> 18) & 511))
    if not (spte & PT_PAGE_SIZE_MASK):
        if (spte & ok) != PT_PRESENT_MASK:
            return hw_walk_miss(f, spte)
        spte = kvm_tdp_mmu_read_spte(spte_to_child_table(f.pages, spte) + ((gfn >> 9) & 511))
        if not (spte & PT_PAGE_SIZE_MASK):
            if (spte & ok) != PT_PRESENT_MASK:
                return hw_walk_miss(f, spte)
            spte = kvm_tdp_mmu_read_spte(spte_to_child_table(f.pages, spte) + (gfn & 511))
    if (spte & f.check[acc]) == f.need[acc]:
        return HW_HIT
    return hw_walk_miss(f, spte)


cdef inline void hw_prefetch_leaf(const hw_tlb_fill_t* f, gfn_t gfn) noexcept nogil:
    """Prefetch gfn's 4K entry, walking the upper levels with hw_walk_hits' test (tables
    only: any other entry ends it), so that the leaf-table misses of a batch's faults and
    exits overlap (a fault's atomics order every later load after them)."""
    cdef tdp_ptep_t table = f.root
    cdef u64 spte, ok = f.ok | PT_PAGE_SIZE_MASK
    if f.five_levels:
        spte = kvm_tdp_mmu_read_spte(table + ((gfn >> 36) & 511))
        if (spte & ok) != PT_PRESENT_MASK:
            return
        table = spte_to_child_table(f.pages, spte)
    spte = kvm_tdp_mmu_read_spte(table + ((gfn >> 27) & 511))
    if (spte & ok) != PT_PRESENT_MASK:
        return
    spte = kvm_tdp_mmu_read_spte(spte_to_child_table(f.pages, spte) + ((gfn >> 18) & 511))
    if (spte & ok) != PT_PRESENT_MASK:
        return
    spte = kvm_tdp_mmu_read_spte(spte_to_child_table(f.pages, spte) + ((gfn >> 9) & 511))
    if (spte & ok) != PT_PRESENT_MASK:
        return
    spte_prefetch_read(spte_to_child_table(f.pages, spte) + (gfn & 511))


cdef inline u64 tdp_exit_error_code(kvm_t* kvm, int exit, int acc, bint leaf_present) noexcept nogil:
    """The error code KVM's exit handler passes to kvm_mmu_page_fault.

    EPT violation (handle_ept_violation): USER for a read, WRITE, FETCH from the exit
    qualification's access bits, PRESENT if the translation had any of R/W/X.  EPT
    misconfiguration (handle_ept_misconfig): PFERR_RSVD_MASK alone.  #NPF
    (npf_interception): the hardware error code -- always USER, PRESENT if the entry was
    present (always for RSVD), RSVD, WRITE, FETCH."""
    cdef u64 ec = 0
    if kvm.m.ept:
        if exit == HW_MISCONFIG:
            return PFERR_RSVD_MASK
        if acc == ACC_READ:
            ec = PFERR_USER_MASK
        elif acc == ACC_WRITE:
            ec = PFERR_WRITE_MASK
        else:
            ec = PFERR_FETCH_MASK
        if leaf_present:
            ec |= PFERR_PRESENT_MASK
        return ec
    ec = PFERR_USER_MASK
    if acc == ACC_WRITE:
        ec |= PFERR_WRITE_MASK
    elif acc == ACC_FETCH:
        ec |= PFERR_FETCH_MASK
    if exit == HW_MISCONFIG:
        ec |= PFERR_RSVD_MASK | PFERR_PRESENT_MASK
    elif leaf_present:
        ec |= PFERR_PRESENT_MASK
    return ec
