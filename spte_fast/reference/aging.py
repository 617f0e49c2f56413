"""MMU-notifier aging of the TDP MMU: clear_young / clear_flush_young and test_young.

Models Linux v6.10's ``arch/x86/kvm/mmu/tdp_mmu.c`` (``kvm_tdp_mmu_handle_gfn``,
``age_gfn_range``, ``test_age_gfn``) and ``tdp_iter.h`` (``tdp_mmu_clear_spte_bits``).
Spec §3.11.  Aging holds mmu_lock for write in 6.10 and visits the present leaves of every
root (valid or not).  It changes an SPTE without ``handle_changed_spte`` -- KVM only emits a
tracepoint -- because neither presence nor the pfn changes.
"""
from .memslots import kvm_set_pfn_dirty
from .spte import is_last_spte, is_shadow_present_pte, spte_to_pfn
from .tdp_iter import (_kvm_tdp_mmu_write_spte, for_each_tdp_pte, kvm_tdp_mmu_read_spte,
                       kvm_tdp_mmu_spte_need_atomic_write, kvm_tdp_mmu_write_spte)


def tdp_mmu_clear_spte_bits(kvm, sptep, old_spte, mask, level):
    """Clear `mask`: atomically when the SPTE may have volatile bits (the CPU could set D
    meanwhile), else a plain store of old & ~mask.  Returns the old value."""
    if kvm_tdp_mmu_spte_need_atomic_write(kvm.layout, old_spte, level):
        old_spte = kvm_tdp_mmu_read_spte(kvm.pool, sptep)      # fetch-and: the true old value
    _kvm_tdp_mmu_write_spte(kvm.pool, sptep, old_spte & ~mask)
    return old_spte


def age_gfn_range(kvm, it):
    """One present leaf: young if accessed.  With A/D bits: clear A.  Without: capture the
    dirty state first (a writable SPTE marks its pfn dirty), then mark it for access
    tracking (R and X saved in bits 54/56, RWX and W cleared)."""
    layout = kvm.layout
    old = it.old_spte
    if not layout.is_accessed_spte(old):
        return False
    if layout.spte_ad_enabled(old):
        tdp_mmu_clear_spte_bits(kvm, it.sptep, old, layout.accessed_mask, it.level)
    else:
        if layout.is_writable_pte(old):
            kvm_set_pfn_dirty(kvm, spte_to_pfn(old))
        kvm_tdp_mmu_write_spte(layout, kvm.pool, it.sptep, old,
                               layout.mark_spte_for_access_track(old), it.level)
    return True


def test_age_gfn(kvm, it):
    return kvm.layout.is_accessed_spte(it.old_spte)


def kvm_tdp_mmu_handle_gfn(kvm, start, end, handler):
    """The handler on every present leaf intersecting [start, end) of every root."""
    young = False
    for root in list(kvm.tdp_mmu_roots):
        for it in for_each_tdp_pte(kvm.pool, root, start, end):
            if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
                young |= handler(kvm, it)
    return young
