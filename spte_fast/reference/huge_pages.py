"""Huge pages outside the fault path: eager splitting, the collapsible zap that follows
dirty logging, and NX huge-page recovery.

Models Linux v6.10 (spec §3.13): ``arch/x86/kvm/mmu/tdp_mmu.c``
(``kvm_tdp_mmu_try_split_huge_pages`` -> ``tdp_mmu_split_huge_pages_root``, with
``tdp_mmu_alloc_sp_for_split``; ``kvm_tdp_mmu_zap_collapsible_sptes`` ->
``zap_collapsible_spte_range``) and ``arch/x86/kvm/mmu/mmu.c``
(``kvm_recover_nx_huge_pages``, ``set_nx_huge_pages``).
"""
from ..errors import OutOfMemory
from . import memslots, mmu, tdp_mmu, tdp_mmu_roots
from .kvm_host import kvm_flush_remote_tlbs
from .spte import PG_LEVEL_1G, is_large_pte, is_last_spte, is_shadow_present_pte
from .tdp_iter import for_each_tdp_pte_min_level


# --- eager split ------------------------------------------------------------------------------


def tdp_mmu_alloc_sp_for_split(kvm):
    """A table straight from the host (the pool), not from a vCPU cache: eager splitting
    runs outside any vCPU.  None when the host has no page."""
    try:
        spt = kvm.pool.alloc()
    except OutOfMemory:
        return None
    kvm.stat["tables_allocated"] += 1
    return tdp_mmu.KvmMmuPage(spt)


def tdp_mmu_split_huge_pages_root(kvm, root, start, end, target_level):
    """Every present huge leaf above target_level in [start, end) becomes a table of 512
    leaves one level down; the walk is pre-order, so a 1G page becomes 2M pages and each
    of those is split again.  Returns (pages split, out_of_memory).  A lost CAS retries
    with the same table; a table left unused goes back to the pool.  No TLB flush: the
    old and the new translations agree."""
    end = min(end, tdp_mmu.tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end or target_level >= root.role.level:
        return 0, False
    split = 0
    sp = None
    for it in for_each_tdp_pte_min_level(kvm.pool, root, target_level + 1, start, end):
        while is_shadow_present_pte(it.old_spte) and is_large_pte(it.old_spte):
            if sp is None:
                # KVM drops mmu_lock to allocate and revisits the entry; the model's pool
                # never blocks, so it allocates in place.
                sp = tdp_mmu_alloc_sp_for_split(kvm)
                if sp is None:
                    kvm.stat["huge_pages_split"] += split
                    return split, True
            tdp_mmu.tdp_mmu_init_child_sp(kvm, sp, it, nx_huge_page_disallowed=False)
            if tdp_mmu.tdp_mmu_split_huge_page(kvm, it, sp):
                sp = None
                split += 1
                break               # a lost CAS instead retries on the value found
    if sp is not None:
        if sp.spt in kvm.mmu_pages:
            tdp_mmu.tdp_mmu_free_sp(kvm, sp)
        else:
            kvm.pool._release(sp.spt)
            kvm.stat["tables_freed"] += 1
    kvm.stat["huge_pages_split"] += split
    return split, False


def kvm_mmu_try_split_huge_pages(kvm, start, end, target_level):
    """Split over every valid root, stopping at the first that runs out of tables (what
    was split stays split).  Returns the pages split."""
    total = 0
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        split, out_of_memory = tdp_mmu_split_huge_pages_root(kvm, root, start, end,
                                                             target_level)
        total += split
        if out_of_memory:
            break
    return total


# --- the collapsible zap (dirty logging turned off) -------------------------------------------


def zap_collapsible_spte_range(kvm, root, slot):
    """Shared: a present non-leaf at 2M or 1G whose gfn lies in the slot and whose pages
    could be mapped by one huge page is zapped atomically (with its ranged flush); the
    next fault installs the huge page."""
    start = slot.base_gfn
    end = min(slot.base_gfn + slot.npages, tdp_mmu.tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end:
        return
    for it in for_each_tdp_pte_min_level(kvm.pool, root, 2, start, end):
        while (it.level <= PG_LEVEL_1G and is_shadow_present_pte(it.old_spte)
               and not is_last_spte(it.old_spte, it.level) and start <= it.gfn < end
               and mmu.kvm_mmu_max_mapping_level(kvm, slot, it.gfn, kvm.max_level) >= it.level):
            if tdp_mmu.tdp_mmu_zap_spte_atomic(kvm, it):
                break


def kvm_mmu_zap_collapsible_sptes(kvm, slot):
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        zap_collapsible_spte_range(kvm, root, slot)


# --- NX huge-page recovery ----------------------------------------------------------------------


def unaccount_nx_huge_page(kvm, sp):
    """The table may be replaced by a huge page again: off the possible-NX list."""
    sp.nx_huge_page_disallowed = False
    mmu.untrack_possible_nx_huge_page(kvm, sp)


def kvm_recover_nx_huge_pages(kvm):
    """One run of the recovery thread (mmu_lock for write): ceil(nx_lpage_splits / ratio)
    tables from the head of possible_nx_huge_pages.  One in a dirty-logged slot is only
    unaccounted (zapping it would only make the next fault split again); the others are
    zapped (kvm_tdp_mmu_zap_sp).  One full flush if any was zapped.  Returns the zapped."""
    ratio = kvm.nx_huge_pages_recovery_ratio
    to_zap = -(-kvm.stat["nx_lpage_splits"] // ratio) if ratio else 0
    zapped = 0
    for _ in range(to_zap):
        if not kvm.possible_nx_huge_pages:
            break
        sp = kvm.possible_nx_huge_pages[0]
        slot = memslots.gfn_to_memslot(kvm, sp.gfn) if kvm.nr_memslots_dirty_logging else None
        if slot is not None and slot.dirty_bitmap is not None:
            unaccount_nx_huge_page(kvm, sp)
        elif tdp_mmu.kvm_tdp_mmu_zap_sp(kvm, sp):
            zapped += 1
        else:
            unaccount_nx_huge_page(kvm, sp)     # never stay at the head for ever
    if zapped:
        kvm_flush_remote_tlbs(kvm)              # kvm_mmu_remote_flush_or_zap
    kvm.stat["nx_huge_pages_recovered"] += zapped
    return zapped


def set_nx_huge_pages(kvm, on):
    """The nx_huge_pages module parameter changed at run time: zap everything fast, so that
    later faults map with the new setting."""
    if on == kvm.nx_huge_pages:
        return
    kvm.nx_huge_pages = on
    mmu.kvm_mmu_zap_all_fast(kvm)
