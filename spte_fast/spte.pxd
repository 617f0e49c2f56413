# spte_fast.spte: the SPTE layer, ≈ arch/x86/kvm/mmu/spte.h of Linux v6.10.
#
# Types, the fixed constants (C macros in include/spte_defs.h), the masks of one paging
# mode (spte_masks_t: KVM's shadow_*_mask globals, per layout here so that EPT and NPT
# models coexist), and the predicates and constructors as `cdef inline` functions: pure
# functions of (masks, spte) that never store.  Everything here is inlined into every
# module that cimports it (spte_fast._core, spte_fast._bench, an embedder's extension).
# FROZEN_SPTE is the >= 6.11 name of v6.10's REMOVED_SPTE.

from libc.stdint cimport uint64_t

ctypedef uint64_t u64
ctypedef uint64_t gfn_t
ctypedef uint64_t pfn_t
ctypedef uint64_t* tdp_ptep_t


cdef extern from "spte_defs.h":
    const u64 SPTE_MMU_PRESENT_MASK
    const u64 SHADOW_NONPRESENT_VALUE
    const u64 FROZEN_SPTE_BITS
    const u64 SPTE_BASE_ADDR_MASK
    const u64 PT_PRESENT_MASK
    const u64 PT_WRITABLE_MASK
    const u64 PT_PAGE_SIZE_MASK
    const int SPTE_TDP_AD_SHIFT
    const u64 SPTE_TDP_AD_MASK
    const u64 SPTE_TDP_AD_ENABLED
    const u64 SPTE_TDP_AD_DISABLED
    const u64 SPTE_TDP_AD_WRPROT_ONLY
    const u64 SHADOW_ACC_TRACK_SAVED_BITS_MASK
    const int SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    const u64 EPT_SPTE_HOST_WRITABLE
    const u64 EPT_SPTE_MMU_WRITABLE
    const u64 DEFAULT_SPTE_HOST_WRITABLE
    const u64 DEFAULT_SPTE_MMU_WRITABLE
    const u64 VMX_EPT_SUPPRESS_VE_BIT
    const u64 VMX_EPT_RWX_MASK
    const u64 VMX_EPT_MISCONFIG_WX_VALUE
    const u64 VMX_EPT_MEMTYPE_WB_IPAT
    const u64 VMX_EPT_MEMTYPE_MASK
    const u64 NPT_MMIO_VALUE
    const u64 MMIO_SPTE_GEN_MASK
    const int MMIO_SPTE_GEN_LOW_START
    const int MMIO_SPTE_GEN_LOW_END
    const int MMIO_SPTE_GEN_HIGH_START
    const int MMIO_SPTE_GEN_HIGH_END
    const u64 MMIO_SPTE_GEN_LOW_MASK
    const u64 MMIO_SPTE_GEN_HIGH_MASK
    const int MMIO_SPTE_GEN_LOW_BITS
    const int MMIO_SPTE_GEN_HIGH_SHIFT
    const int SPTE_ENT_PER_PAGE
    const int PT64_ROOT_MAX_LEVEL
    const int KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
    const int ACC_EXEC_MASK
    const int ACC_WRITE_MASK
    const int ACC_USER_MASK
    const int ACC_ALL
    const u64 PFERR_PRESENT_MASK
    const u64 PFERR_WRITE_MASK
    const u64 PFERR_USER_MASK
    const u64 PFERR_RSVD_MASK
    const u64 PFERR_FETCH_MASK


# The masks of one paging mode (kvm_mmu_set_ept_masks / kvm_mmu_reset_all_pte_masks),
# per layout instead of KVM's globals so EPT and NPT models coexist.
ctypedef struct spte_masks_t:
    u64 shadow_nonpresent_value   # fills new tables, written back by every zap
    u64 frozen_value              # nonpresent | 0x5a0: the frozen (removed) SPTE
    u64 shadow_present_mask       # EPT: R (unless exec-only) | bit 63 if nonpresent has it; NPT: P
    u64 shadow_user_mask          # EPT: R; NPT: U
    u64 shadow_x_mask             # EPT: X (bit 2); NPT: 0
    u64 shadow_nx_mask            # EPT: 0; NPT: NX (bit 63)
    u64 shadow_accessed_mask      # EPT: bit 8 with A/D, else 0; NPT: bit 5
    u64 shadow_dirty_mask         # EPT: bit 9 with A/D, else 0; NPT: bit 6
    u64 shadow_memtype_mask       # EPT: bits 3..6; NPT: 0
    u64 shadow_memtype_ram        # EPT: WB | IPAT = 0x70; NPT: 0
    u64 shadow_acc_track_mask     # EPT: RWX; NPT: 0
    u64 shadow_host_writable_mask # EPT: bit 57; NPT: bit 9
    u64 shadow_mmu_writable_mask  # EPT: bit 58; NPT: bit 10
    u64 shadow_mmio_value         # EPT: W|X (misconfig); NPT: bit 51 | P
    u64 shadow_mmio_mask          # EPT: RWX | bit 63 if nonpresent has it; NPT: bit 51 | P
    u64 shadow_mmio_access_mask   # EPT: 0; NPT: W|U
    u64 mmio_gfn_mask             # the GPA bits of an MMIO SPTE (6.10's
                                  # shadow_nonpresent_or_rsvd_lower_gfn_mask); a Vm sets
                                  # GENMASK(host MAXPHYADDR - 1, 12)
    bint ept                      # paging mode
    bint ad_disabled              # TDP SPTEs carry SPTE_TDP_AD_DISABLED (EPT without A/D)


# ---------------------------------------------------------------------------
# Predicates (pure functions of (masks, spte); spec §2.4)
# ---------------------------------------------------------------------------

cdef inline bint is_shadow_present_pte(u64 spte) noexcept nogil:
    return (spte & SPTE_MMU_PRESENT_MASK) != 0

cdef inline bint is_large_pte(u64 spte) noexcept nogil:
    return (spte & PT_PAGE_SIZE_MASK) != 0

cdef inline bint is_last_spte(u64 spte, int level) noexcept nogil:
    return level == 1 or is_large_pte(spte)

cdef inline bint is_frozen_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return spte == m.frozen_value

cdef inline bint is_mmio_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return (spte & m.shadow_mmio_mask) == m.shadow_mmio_value and m.shadow_mmio_value != 0

cdef inline u64 spte_to_pfn(u64 spte) noexcept nogil:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12

cdef inline bint is_writable_pte(u64 spte) noexcept nogil:
    return (spte & PT_WRITABLE_MASK) != 0

cdef inline bint is_mmu_writable_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return (spte & m.shadow_mmu_writable_mask) != 0

cdef inline bint spte_ad_enabled(u64 spte) noexcept nogil:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED

cdef inline bint spte_ad_need_write_protect(u64 spte) noexcept nogil:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED

cdef inline u64 spte_shadow_accessed_mask(const spte_masks_t* m, u64 spte) noexcept nogil:
    return m.shadow_accessed_mask if spte_ad_enabled(spte) else 0

cdef inline u64 spte_shadow_dirty_mask(const spte_masks_t* m, u64 spte) noexcept nogil:
    return m.shadow_dirty_mask if spte_ad_enabled(spte) else 0

cdef inline bint is_access_track_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return not spte_ad_enabled(spte) and (spte & m.shadow_acc_track_mask) == 0

cdef inline bint is_accessed_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    cdef u64 am = spte_shadow_accessed_mask(m, spte)
    if am:
        return (spte & am) != 0
    return not is_access_track_spte(m, spte)

cdef inline bint is_dirty_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    cdef u64 dm = spte_shadow_dirty_mask(m, spte)
    if dm:
        return (spte & dm) != 0
    return (spte & PT_WRITABLE_MASK) != 0

cdef inline bint is_executable_pte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return (spte & (m.shadow_x_mask | m.shadow_nx_mask)) == m.shadow_x_mask

cdef inline bint spte_writable_invariants_ok(const spte_masks_t* m, u64 spte) noexcept nogil:
    """check_spte_writable_invariants: W implies MMU-writable implies host-writable."""
    if spte & m.shadow_mmu_writable_mask:
        return (spte & m.shadow_host_writable_mask) != 0
    return not is_writable_pte(spte)

cdef inline u64 pages_per_level(int level) noexcept nogil:
    return (<u64>1) << (9 * (level - 1))

cdef inline int spte_index(gfn_t gfn, int level) noexcept nogil:
    return <int>((gfn >> (9 * (level - 1))) & 511)

cdef inline gfn_t gfn_round_for_level(gfn_t gfn, int level) noexcept nogil:
    return gfn & ~(pages_per_level(level) - 1)


# ---------------------------------------------------------------------------
# Constructors (spec §2.5): pure, inline, never store
# ---------------------------------------------------------------------------

cdef inline bint spte_has_volatile_bits(const spte_masks_t* m, u64 spte) noexcept nogil:
    """Bits hardware or the lockless fast path may set behind our back (6.10)."""
    if not is_writable_pte(spte) and is_mmu_writable_spte(m, spte):
        return True        # fast page fault may set W
    if is_access_track_spte(m, spte):
        return True        # fast page fault may restore access
    if spte_ad_enabled(spte):
        if not (spte & m.shadow_accessed_mask) or \
                (is_writable_pte(spte) and not (spte & m.shadow_dirty_mask)):
            return True    # the CPU may set A or D
    return False


cdef inline u64 mark_spte_for_access_track(const spte_masks_t* m, u64 spte) noexcept nogil:
    if spte_ad_enabled(spte):
        return spte & ~m.shadow_accessed_mask
    if is_access_track_spte(m, spte):
        return spte
    # Save R and X above the A/D-type field; W is dropped, not saved.
    spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    spte &= ~m.shadow_acc_track_mask
    return spte


cdef inline u64 restore_acc_track_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    cdef u64 saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    spte &= ~m.shadow_acc_track_mask
    spte &= ~(SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved


cdef inline u64 make_spte(const spte_masks_t* m, int level, unsigned int pte_access, pfn_t pfn,
                           u64 old_spte, bint prefetch, bint host_writable, bint ad_disabled,
                           bint nx_huge_pages, bint write_tracked, bint* wrprot) noexcept nogil:
    """v6.10 make_spte: the leaf for pfn at level; *wrprot set when write was refused."""
    cdef u64 spte = SPTE_MMU_PRESENT_MASK
    wrprot[0] = False
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    spte |= m.shadow_present_mask
    if not prefetch:
        spte |= spte_shadow_accessed_mask(m, spte)
    # NX huge-page mitigation: a huge page is never executable.
    if level > 1 and (pte_access & ACC_EXEC_MASK) and nx_huge_pages:
        pte_access &= ~ACC_EXEC_MASK
    if pte_access & ACC_EXEC_MASK:
        spte |= m.shadow_x_mask
    else:
        spte |= m.shadow_nx_mask
    if pte_access & ACC_USER_MASK:
        spte |= m.shadow_user_mask
    if level > 1:
        spte |= PT_PAGE_SIZE_MASK
    if m.shadow_memtype_mask:
        spte |= m.shadow_memtype_ram
    if host_writable:
        spte |= m.shadow_host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << 12
    if pte_access & ACC_WRITE_MASK:
        spte |= PT_WRITABLE_MASK | m.shadow_mmu_writable_mask
        # KVM skips the unsync check *and the dirty bit* when the old SPTE was writable.
        if is_writable_pte(old_spte):
            if prefetch:
                spte = mark_spte_for_access_track(m, spte)
            return spte
        if write_tracked:
            wrprot[0] = True
            pte_access &= ~ACC_WRITE_MASK
            spte &= ~(PT_WRITABLE_MASK | m.shadow_mmu_writable_mask)
    if pte_access & ACC_WRITE_MASK:
        spte |= spte_shadow_dirty_mask(m, spte)
    if prefetch:
        spte = mark_spte_for_access_track(m, spte)
    return spte


cdef inline u64 make_nonleaf_spte(const spte_masks_t* m, pfn_t child_pfn, bint ad_disabled) noexcept nogil:
    cdef u64 spte = SPTE_MMU_PRESENT_MASK
    spte |= (child_pfn << 12) | m.shadow_present_mask | PT_WRITABLE_MASK | \
        m.shadow_user_mask | m.shadow_x_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= m.shadow_accessed_mask
    return spte


cdef inline u64 generation_mmio_spte_mask(u64 gen) noexcept nogil:
    cdef u64 mask = (gen << MMIO_SPTE_GEN_LOW_START) & MMIO_SPTE_GEN_LOW_MASK
    mask |= (gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK
    return mask


cdef inline u64 get_mmio_spte_generation(u64 spte) noexcept nogil:
    return ((spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START) | \
        ((spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT)


cdef inline gfn_t get_mmio_spte_gfn(const spte_masks_t* m, u64 spte) noexcept nogil:
    """The GPA bits of an MMIO SPTE (6.10 get_mmio_spte_gfn without the L1TF relocation)."""
    return (spte & m.mmio_gfn_mask) >> 12


cdef inline u64 make_mmio_spte(const spte_masks_t* m, gfn_t gfn, unsigned int access, u64 gen) noexcept nogil:
    cdef u64 spte = generation_mmio_spte_mask(gen & MMIO_SPTE_GEN_MASK)
    spte |= m.shadow_mmio_value | (access & m.shadow_mmio_access_mask)
    spte |= gfn << 12                   # 6.10 ORs the gpa unmasked
    return spte


cdef inline u64 make_huge_page_split_spte(const spte_masks_t* m, u64 huge_spte, int child_level,
                                   int index, bint nx_huge_pages) noexcept nogil:
    """Child `index` of a huge SPTE: same bits, pfn advanced (6.10; later make_small_spte).

    The offset is OR-ed in, as KVM does: a huge SPTE's pfn is aligned to its size, so
    this is the sum, and an unaligned pfn can never carry into bits 52 and up."""
    cdef u64 child = huge_spte
    cdef bint tracked
    child |= (<u64>index * pages_per_level(child_level)) << 12
    if child_level == 1:
        child &= ~PT_PAGE_SIZE_MASK
        if nx_huge_pages:
            # make_spte_executable: the 4K children may run code again.
            tracked = is_access_track_spte(m, child)
            if tracked:
                child = restore_acc_track_spte(m, child)
            child &= ~m.shadow_nx_mask
            child |= m.shadow_x_mask
            if tracked:
                child = mark_spte_for_access_track(m, child)
    return child
