"""MMU-notifier unmap and gfn write-protection (issue 11 item 2, partial).

Models Linux v6.10: kvm_main.c ``kvm_handle_hva_range`` (one call per memslot intersecting
the range, the range clipped to the slot, one full ``kvm_flush_remote_tlbs`` if any call
asks for it), mmu.c ``kvm_unmap_gfn_range`` -> tdp_mmu.c ``kvm_tdp_mmu_unmap_gfn_range``
(``tdp_mmu_zap_leafs`` over every root of the address space, valid or invalid; a flush is
needed only for valid roots), and tdp_mmu.c ``kvm_tdp_mmu_write_protect_gfn`` /
``write_protect_gfn`` (clear W and MMU-writable on leaves mapping gfn at >= min_level,
through tdp_mmu_set_spte, stopping at the first leaf already protected), whose page-track
caller ``kvm_write_track_add_gfn`` flushes with ``kvm_flush_remote_tlbs`` when it changed.
"""
from . import tdp_mmu, tdp_mmu_roots
from .kvm_host import kvm_flush_remote_tlbs
from .memslots import kvm_memslots_sorted
from .spte import PT_WRITABLE_MASK, is_last_spte, is_shadow_present_pte
from .tdp_iter import for_each_tdp_pte_min_level


def kvm_tdp_mmu_unmap_gfn_range(kvm, start, end, flush):
    for root in list(kvm.tdp_mmu_roots):
        flush = tdp_mmu.tdp_mmu_zap_leafs(kvm, root, start, end, flush)
    return flush


def kvm_unmap_gfn_range(kvm, start, end):
    """The notifier's unmap of [start, end): per intersecting slot; performs the full flush
    it reports."""
    flush = False
    for slot in kvm_memslots_sorted(kvm):
        s = max(start, slot.base_gfn)
        e = min(end, slot.base_gfn + slot.npages)
        if s < e:
            flush = kvm_tdp_mmu_unmap_gfn_range(kvm, s, e, flush)
    if flush:
        kvm_flush_remote_tlbs(kvm)
    return flush


def write_protect_gfn(kvm, root, gfn, min_level):
    L = kvm.layout
    changed = False
    for it in for_each_tdp_pte_min_level(kvm.pool, root, min_level, gfn, gfn + 1):
        if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
            continue
        new_spte = it.old_spte & ~(PT_WRITABLE_MASK | L.mmu_writable_mask)
        if new_spte == it.old_spte:
            break
        tdp_mmu.tdp_mmu_iter_set_spte(kvm, it, new_spte)
        changed = True
    return changed


def kvm_write_track_add_gfn(kvm, gfn, min_level):
    changed = False
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        changed |= write_protect_gfn(kvm, root, gfn, min_level)
    if changed:
        kvm_flush_remote_tlbs(kvm)
    return changed
