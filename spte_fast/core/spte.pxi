# =====================================================================================
# core/spte.pxi: the masks of a paging mode (≈ arch/x86/kvm/mmu/spte.c, v6.10)
# =====================================================================================
# kvm_mmu_set_ept_masks and kvm_mmu_reset_all_pte_masks, into a per-layout struct.  6.10:
# bit 63 (suppress #VE) joins the EPT present mask and MMIO mask exactly when the
# non-present value carries it.  Predicates and constructors are inline in spte.pxd.

cdef void masks_init_ept(spte_masks_t* m, bint has_ad_bits, bint has_exec_only,
                         u64 nonpresent) noexcept nogil:
    cdef u64 ve = nonpresent & VMX_EPT_SUPPRESS_VE_BIT
    memset(m, 0, sizeof(spte_masks_t))
    m.ept = True
    m.ad_disabled = not has_ad_bits
    m.shadow_nonpresent_value = nonpresent
    m.frozen_value = nonpresent | FROZEN_SPTE_BITS
    m.shadow_present_mask = (0 if has_exec_only else 1) | ve
    m.shadow_user_mask = 1
    m.shadow_x_mask = 4
    m.shadow_nx_mask = 0
    m.shadow_accessed_mask = ((<u64>1) << 8) if has_ad_bits else 0
    m.shadow_dirty_mask = ((<u64>1) << 9) if has_ad_bits else 0
    m.shadow_memtype_mask = VMX_EPT_MEMTYPE_MASK
    m.shadow_memtype_ram = VMX_EPT_MEMTYPE_WB_IPAT
    m.shadow_acc_track_mask = VMX_EPT_RWX_MASK
    m.shadow_host_writable_mask = EPT_SPTE_HOST_WRITABLE
    m.shadow_mmu_writable_mask = EPT_SPTE_MMU_WRITABLE
    m.shadow_mmio_value = VMX_EPT_MISCONFIG_WX_VALUE
    m.shadow_mmio_mask = VMX_EPT_RWX_MASK | ve
    m.shadow_mmio_access_mask = 0
    m.mmio_gfn_mask = SPTE_BASE_ADDR_MASK & ~m.shadow_mmio_mask


cdef void masks_init_npt(spte_masks_t* m, u64 nonpresent) noexcept nogil:
    memset(m, 0, sizeof(spte_masks_t))
    m.ept = False
    m.ad_disabled = False
    m.shadow_nonpresent_value = nonpresent
    m.frozen_value = nonpresent | FROZEN_SPTE_BITS
    m.shadow_present_mask = 1
    m.shadow_user_mask = 4
    m.shadow_x_mask = 0
    m.shadow_nx_mask = (<u64>1) << 63
    m.shadow_accessed_mask = (<u64>1) << 5
    m.shadow_dirty_mask = (<u64>1) << 6
    m.shadow_memtype_mask = 0
    m.shadow_memtype_ram = 0
    m.shadow_acc_track_mask = 0
    m.shadow_host_writable_mask = DEFAULT_SPTE_HOST_WRITABLE
    m.shadow_mmu_writable_mask = DEFAULT_SPTE_MMU_WRITABLE
    m.shadow_mmio_value = NPT_MMIO_VALUE
    m.shadow_mmio_mask = NPT_MMIO_VALUE
    m.shadow_mmio_access_mask = ACC_WRITE_MASK | ACC_USER_MASK
    m.mmio_gfn_mask = SPTE_BASE_ADDR_MASK & ~m.shadow_mmio_mask


cdef void masks_set_host_phys_bits(spte_masks_t* m, int phys_bits) noexcept nogil:
    """A VM's copy of the masks on a host with `phys_bits` of physical address.

    kvm_mmu_reset_all_pte_masks: NPT marks MMIO SPTEs with the reserved PA bit 51 only when
    the host has fewer than 52 bits; with 52 there is no reserved bit and MMIO caching is
    off (kvm_mmu_set_mmio_spte_mask with value 0).  EPT always uses the W|X
    misconfiguration.  The GPA of an MMIO SPTE lives in bits 12 .. phys_bits - 1
    (shadow_nonpresent_or_rsvd_lower_gfn_mask; the L1TF relocation is not modelled)."""
    m.mmio_gfn_mask = (((<u64>1) << phys_bits) - 1) & ~(<u64>0xfff)
    if not m.ept and phys_bits >= 52:
        m.shadow_mmio_value = 0
        m.shadow_mmio_mask = 0
