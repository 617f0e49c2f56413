"""The TDP MMU: kvm_mmu_page records, the SPTE setters and their bookkeeping, the fault-time
map, zaps and walks.

Models Linux v6.10's ``arch/x86/kvm/mmu/tdp_mmu.c`` (and the ``struct kvm_mmu_page`` of
``mmu_internal.h``).  Every change of a linked entry goes through ``tdp_mmu_set_spte``
(exclusive mode) or ``tdp_mmu_set_spte_atomic`` (shared mode, compare-and-exchange), and
each ends in one ``handle_changed_spte``.  Spec §3.3 - §3.10.

KVM's ``__name`` functions are ``_name`` here (Python mangles ``__name`` inside classes).
"""
from collections import namedtuple

from ..errors import AuditError
from ..pf import PF
from . import memslots
from . import mmu  # mmu.c and tdp_mmu.c call each other; resolved at call time
from . import tdp_mmu_roots  # the roots' part of tdp_mmu.c; resolved at call time
from .kvm_host import kvm_flush_remote_tlbs_gfn, kvm_warn
from .mmu_cache import kvm_mmu_memory_cache_alloc
from .spte import (ACC_ALL, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL,
                   PT_WRITABLE_MASK,
                   SPTE_ENT_PER_PAGE, is_large_pte, is_last_spte, is_mmio_spte,
                   is_shadow_present_pte, make_mmio_spte, pages_per_hpage, spte_to_pfn)
from .tdp_iter import (_kvm_tdp_mmu_write_spte, for_each_tdp_pte, for_each_tdp_pte_min_level,
                       kvm_tdp_mmu_read_spte, kvm_tdp_mmu_write_spte,
                       kvm_tdp_mmu_write_spte_atomic, spte_to_child_pt)

PAGE_STAT_KEYS = {PG_LEVEL_4K: "pages_4k", PG_LEVEL_2M: "pages_2m", PG_LEVEL_1G: "pages_1g"}

# =================================================================================================
# kvm_mmu_page: one record per page-table page; only the helpers below create, change or
# free one, and only they change the pool's metadata of a table.
# =================================================================================================

#: The part of ``union kvm_mmu_page_role`` the model uses (``invalid`` is set only on roots,
#: by kvm_tdp_mmu_invalidate_all_roots).
KvmMmuPageRole = namedtuple("KvmMmuPageRole", ["level", "invalid"], defaults=(False,))


class KvmMmuPage:
    """``struct kvm_mmu_page`` of a TDP MMU table (the fields the model uses)."""

    __slots__ = ("spt", "role", "gfn", "ptep", "nx_huge_page_disallowed",
                 "possible_nx_huge_page_linked", "tdp_mmu_root_count",
                 "tdp_mmu_scheduled_root_to_zap")

    def __init__(self, spt):
        self.spt = spt                      # pool index of the table (its "physical address")
        self.role = None                    # role.level: the level of the entries inside
        self.gfn = None                     # the first gfn the table maps
        self.ptep = None                    # (table, index) of the entry linking it; None: root
        # Can't be replaced by a huge page: it maps an executable page under the NX
        # huge-page mitigation.
        self.nx_huge_page_disallowed = False
        # On kvm->arch.possible_nx_huge_pages (KVM: !list_empty(&possible_nx_huge_page_link)).
        self.possible_nx_huge_page_linked = False
        # Roots only: the reference count, and "invalidated, the MMU's zap still to do".
        self.tdp_mmu_root_count = 0
        self.tdp_mmu_scheduled_root_to_zap = False

    def __repr__(self):
        level = self.role.level if self.role else None
        return f"KvmMmuPage(spt={self.spt}, level={level}, gfn={self.gfn!r}, ptep={self.ptep})"


def sptep_to_sp(kvm, sptep):
    """The kvm_mmu_page of the table holding `sptep` (KVM reads the page's page_private)."""
    return kvm.mmu_pages[sptep[0]]


def spte_to_child_sp(kvm, spte, level):
    """The kvm_mmu_page a present non-leaf SPTE points to, else None."""
    child_pt = spte_to_child_pt(spte, level)
    return None if child_pt is None else kvm.mmu_pages.get(child_pt)


def tdp_mmu_alloc_sp(vcpu):
    """A kvm_mmu_page whose table comes from the vCPU's shadow-page cache."""
    sp = KvmMmuPage(kvm_mmu_memory_cache_alloc(vcpu.cache))
    vcpu.kvm.stat["tables_allocated"] += 1
    return sp


def tdp_mmu_init_sp(kvm, sp, sptep, gfn, role):
    kvm.mmu_pages[sp.spt] = sp              # set_page_private(virt_to_page(sp->spt), sp)
    kvm.pool._set_state(sp.spt, "table")
    sp.role = role
    sp.gfn = gfn
    sp.ptep = sptep


def tdp_mmu_init_child_sp(kvm, child_sp, it, nx_huge_page_disallowed):
    """The table below the iterator's entry: the parent's role one level down.  (KVM's
    kvm_tdp_mmu_map sets nx_huge_page_disallowed right after this call.)"""
    parent_sp = sptep_to_sp(kvm, it.sptep)
    role = parent_sp.role._replace(level=parent_sp.role.level - 1)
    tdp_mmu_init_sp(kvm, child_sp, it.sptep, it.gfn, role)
    child_sp.nx_huge_page_disallowed = nx_huge_page_disallowed


def tdp_mmu_free_sp(kvm, sp):
    """The table goes back to the pool (never to a vCPU cache)."""
    del kvm.mmu_pages[sp.spt]
    kvm.pool._release(sp.spt)
    kvm.stat["tables_freed"] += 1


def tdp_account_mmu_page(kvm, sp):
    kvm.stat["pt_pages"] += 1
    kvm.stat[f"pt_pages_l{sp.role.level}"] += 1


def tdp_unaccount_mmu_page(kvm, sp):
    kvm.stat["pt_pages"] -= 1
    kvm.stat[f"pt_pages_l{sp.role.level}"] -= 1


def tdp_mmu_unlink_sp(kvm, sp):
    """Unaccount a table that its parent no longer links; off the possible-NX list."""
    tdp_unaccount_mmu_page(kvm, sp)
    if not sp.nx_huge_page_disallowed:
        return
    sp.nx_huge_page_disallowed = False
    mmu.untrack_possible_nx_huge_page(kvm, sp)


# =================================================================================================
# Bookkeeping: handle_changed_spte / handle_removed_pt (spec §3.7, §3.8)
# =================================================================================================


def kvm_update_page_stats(kvm, level, delta):
    kvm.stat[PAGE_STAT_KEYS[level]] += delta


def handle_changed_spte(kvm, gfn, old_spte, new_spte, level, shared):
    """Bookkeeping for one SPTE change (spec §3.7)."""
    L = kvm.layout
    kvm.stat["spte_changes"] += 1
    was_present = is_shadow_present_pte(old_spte)
    is_present = is_shadow_present_pte(new_spte)
    was_leaf = was_present and is_last_spte(old_spte, level)
    is_leaf = is_present and is_last_spte(new_spte, level)
    pfn_changed = spte_to_pfn(old_spte) != spte_to_pfn(new_spte)

    # Two conditions, two reasons; each counted at most once per call.  (Alignment is only
    # defined for levels >= 1.)
    if not PG_LEVEL_4K <= level <= PT64_ROOT_MAX_LEVEL:
        kvm_warn(kvm, "spte-level")
    if level >= PG_LEVEL_4K and gfn & (pages_per_hpage(level) - 1):
        kvm_warn(kvm, "spte-gfn-unaligned")

    # KVM's BUG(): a present leaf must be zapped and flushed before a different pfn
    # may be mapped.
    if was_leaf and is_leaf and pfn_changed:
        raise AuditError(
            f"invalid SPTE change: present leaf replaced by a present leaf with a different "
            f"pfn: gfn {gfn:#x} level {level} old {old_spte:#x} new {new_spte:#x}",
            invariant="present-leaf-pfn-change")

    if old_spte == new_spte:
        return
    if is_leaf and not L._writable_state_ok(new_spte):
        kvm_warn(kvm, "spte-writable-invariants")

    if not was_present and not is_present:
        # Only MMIO SPTEs and the frozen value may change between non-present values.
        if (not is_mmio_spte(kvm, old_spte) and not is_mmio_spte(kvm, new_spte)
                and not L.is_frozen_spte(new_spte)):
            kvm_warn(kvm, "nonpresent-to-nonpresent")
        return

    if is_leaf != was_leaf:
        kvm_update_page_stats(kvm, level, 1 if is_leaf else -1)

    if was_leaf and L.is_dirty_spte(old_spte) and (
            not is_present or not L.is_dirty_spte(new_spte) or pfn_changed):
        memslots.kvm_set_pfn_dirty(kvm, spte_to_pfn(old_spte))

    # A subtree was unlinked: tear it down (a non-leaf replaced by another non-leaf is
    # unexpected).
    if was_present and not was_leaf:
        if is_leaf or not is_present:
            handle_removed_pt(kvm, spte_to_child_pt(old_spte, level), shared)
        elif pfn_changed:
            kvm_warn(kvm, "nonleaf-to-nonleaf")
            handle_removed_pt(kvm, spte_to_child_pt(old_spte, level), shared)

    if was_leaf and L.is_accessed_spte(old_spte) and (
            not is_present or not L.is_accessed_spte(new_spte) or pfn_changed):
        memslots.kvm_set_pfn_accessed(kvm, spte_to_pfn(old_spte))


def handle_removed_pt(kvm, pt, shared):
    """Tear down a table its parent no longer links (spec §3.8), then free it."""
    frozen = kvm.layout.frozen_value
    sp = kvm.mmu_pages.get(pt)
    if sp is None:
        raise AuditError(f"removed table {pt} has no kvm_mmu_page", invariant="table-metadata")
    level = sp.role.level
    tdp_mmu_unlink_sp(kvm, sp)

    for i in range(SPTE_ENT_PER_PAGE):
        sptep = (pt, i)
        gfn = sp.gfn + i * pages_per_hpage(level)
        if shared:
            # Freeze every entry.  KVM spins while the value swapped out is itself frozen
            # (another thread's frozen operation in flight); single-threaded, that cannot
            # happen, and spinning would never end.
            old_spte = kvm_tdp_mmu_write_spte_atomic(kvm.pool, sptep, frozen)
            if old_spte == frozen:
                raise AuditError(
                    f"frozen SPTE at rest in a removed table: gfn {gfn:#x} level {level} "
                    f"value {old_spte:#x}", invariant="no-frozen-at-rest")
        else:
            # Exclusive: non-present entries have no side effects and stay as they are.
            old_spte = kvm_tdp_mmu_read_spte(kvm.pool, sptep)
            if not is_shadow_present_pte(old_spte):
                continue
            old_spte = kvm_tdp_mmu_write_spte(kvm.layout, kvm.pool, sptep, old_spte, frozen,
                                              level)
        handle_changed_spte(kvm, gfn, old_spte, frozen, level, shared)

    # KVM frees after an RCU grace period; single-threaded, it goes back at once.
    tdp_mmu_free_sp(kvm, sp)


# =================================================================================================
# Setters (spec §3.4 - §3.6)
# =================================================================================================


def _try_cmpxchg64(kvm, sptep, old_spte, new_spte):
    """try_cmpxchg64 -> (ok, observed); honours the inject_cas_failures test hook."""
    observed = kvm_tdp_mmu_read_spte(kvm.pool, sptep)
    if kvm.cas_failures_to_inject > 0:
        # Another vCPU "changed" the entry: memory untouched, the CAS fails.
        kvm.cas_failures_to_inject -= 1
        kvm.stat["cas_failures"] += 1
        return False, observed
    if observed != old_spte:
        kvm.stat["cas_failures"] += 1
        return False, observed
    _kvm_tdp_mmu_write_spte(kvm.pool, sptep, new_spte)
    return True, observed


def _tdp_mmu_set_spte_atomic(kvm, it, new_spte):
    """KVM's __tdp_mmu_set_spte_atomic: the CAS alone.  False (EBUSY) on failure, with
    it.old_spte refreshed to the value found; no bookkeeping either way."""
    if it.yielded or kvm.layout.is_frozen_spte(it.old_spte):
        kvm_warn(kvm, "set-spte-atomic-frozen")
    ok, observed = _try_cmpxchg64(kvm, it.sptep, it.old_spte, new_spte)
    if not ok:
        it.old_spte = observed
    return ok


def tdp_mmu_set_spte_atomic(kvm, it, new_spte):
    """Shared mode: CAS, then bookkeeping.  Returns True on success, False for EBUSY."""
    if not _tdp_mmu_set_spte_atomic(kvm, it, new_spte):
        return False
    handle_changed_spte(kvm, it.gfn, it.old_spte, new_spte, it.level, shared=True)
    return True


def tdp_mmu_zap_spte_atomic(kvm, it):
    """Shared-mode zap: freeze -> ranged flush -> store non-present -> bookkeeping."""
    if not _tdp_mmu_set_spte_atomic(kvm, it, kvm.layout.frozen_value):
        return False
    kvm_flush_remote_tlbs_gfn(kvm, it.gfn, it.level)
    # Nobody else may touch a frozen SPTE, so a plain store suffices.
    nonpresent = kvm.layout.nonpresent_value
    _kvm_tdp_mmu_write_spte(kvm.pool, it.sptep, nonpresent)
    handle_changed_spte(kvm, it.gfn, it.old_spte, nonpresent, it.level, shared=True)
    return True


def tdp_mmu_set_spte(kvm, sptep, old_spte, new_spte, gfn, level):
    """Exclusive mode: write, then bookkeeping.  Returns the (possibly refreshed) old."""
    L = kvm.layout
    if L.is_frozen_spte(old_spte) or L.is_frozen_spte(new_spte):
        kvm_warn(kvm, "set-spte-frozen")
    old_spte = kvm_tdp_mmu_write_spte(L, kvm.pool, sptep, old_spte, new_spte, level)
    handle_changed_spte(kvm, gfn, old_spte, new_spte, level, shared=False)
    return old_spte


def tdp_mmu_iter_set_spte(kvm, it, new_spte):
    it.old_spte = tdp_mmu_set_spte(kvm, it.sptep, it.old_spte, new_spte, it.gfn, it.level)


# =================================================================================================
# The fault-time map (spec §3.9)
# =================================================================================================


def tdp_mmu_for_each_pte(vcpu, start, end):
    """Every entry of the vCPU's root intersecting [start, end), down to 4K (KVM's macro
    walks ``mmu->root``)."""
    return for_each_tdp_pte(vcpu.kvm.pool, vcpu.root, start, end)


def tdp_mmu_link_sp(kvm, it, sp):
    """Link `sp` below the iterator's entry by CAS (shared); True on success."""
    spte = kvm.layout.make_nonleaf_spte(sp.spt, ad_disabled=kvm.layout.default_ad_disabled)
    if not tdp_mmu_set_spte_atomic(kvm, it, spte):
        return False
    tdp_account_mmu_page(kvm, sp)
    return True


def tdp_mmu_split_huge_page(kvm, it, sp):
    """Fill `sp` with the 512 pieces of the huge leaf at the iterator, then link it."""
    huge_spte = it.old_spte
    level = it.level
    # The table is not linked yet, so these stores need no bookkeeping.
    for i in range(SPTE_ENT_PER_PAGE):
        child_spte = kvm.layout.make_huge_page_split_spte(
            huge_spte, level - 1, i, nx_huge_pages=kvm.nx_huge_pages)
        _kvm_tdp_mmu_write_spte(kvm.pool, (sp.spt, i), child_spte)
    if not tdp_mmu_link_sp(kvm, it, sp):
        return False
    # Linking subtracted the huge page; the new children are added here.
    kvm_update_page_stats(kvm, level - 1, SPTE_ENT_PER_PAGE)
    return True


def kvm_tdp_mmu_map(vcpu, fault):
    """Walk toward fault.gfn building tables, then install the leaf -> PF result."""
    kvm = vcpu.kvm
    mmu.kvm_mmu_hugepage_adjust(vcpu, fault)
    for it in tdp_mmu_for_each_pte(vcpu, fault.gfn, fault.gfn + 1):
        if fault.nx_huge_page_workaround_enabled:
            mmu.disallowed_hugepage_adjust(kvm, fault, it.old_spte, it.level)
        # Frozen by another thread: retry without allocating anything.
        if kvm.layout.is_frozen_spte(it.old_spte):
            return PF.RETRY
        if it.level == fault.goal_level:
            return tdp_mmu_map_handle_target_level(vcpu, fault, it)
        # Step down into an existing lower-level table.
        if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
            continue
        # Non-present, or a huge page to split: a new table from the vCPU cache.
        sp = tdp_mmu_alloc_sp(vcpu)
        tdp_mmu_init_child_sp(kvm, sp, it, fault.huge_page_disallowed)
        if is_shadow_present_pte(it.old_spte):
            linked = tdp_mmu_split_huge_page(kvm, it, sp)
        else:
            linked = tdp_mmu_link_sp(kvm, it, sp)
        if not linked:  # lost the CAS: the table goes back to the pool
            tdp_mmu_free_sp(kvm, sp)
            return PF.RETRY
        # Every table of an NX-disallowed fault is marked, but only those at or below the
        # level the fault could have mapped are candidates for NX recovery.
        if fault.huge_page_disallowed and fault.req_level >= it.level:
            if sp.nx_huge_page_disallowed:
                mmu.track_possible_nx_huge_page(kvm, sp)
    # The walk ended before the goal level (KVM WARNs if it claims to have reached it).
    return PF.RETRY


def tdp_mmu_map_handle_target_level(vcpu, fault, it):
    kvm = vcpu.kvm
    L = kvm.layout
    ret = PF.FIXED
    wrprot = False
    if fault.slot is None:
        new_spte = make_mmio_spte(kvm, it.gfn, ACC_ALL)
    else:
        wrprot, new_spte = L.make_spte(
            fault.pfn, it.level, ACC_ALL, prefetch=fault.prefetch,
            host_writable=fault.map_writable, nx_huge_pages=kvm.nx_huge_pages,
            old_spte=it.old_spte)
        # make_spte's last step: a writable SPTE in a dirty-logged slot marks the page
        # dirty, before it is installed (whatever the CAS then does).
        if new_spte & PT_WRITABLE_MASK:
            memslots.mark_page_dirty_in_slot(vcpu.stat, fault.slot, it.gfn)

    installed = False
    if new_spte == it.old_spte:
        ret = PF.SPURIOUS
    elif not tdp_mmu_set_spte_atomic(kvm, it, new_spte):
        return PF.RETRY
    else:
        installed = True
        # A huge page replaced a table: flush the range it covered.
        if is_shadow_present_pte(it.old_spte) and not is_last_spte(it.old_spte, it.level):
            kvm_flush_remote_tlbs_gfn(kvm, it.gfn, it.level)

    if wrprot and fault.write:
        ret = PF.EMULATE
    if is_mmio_spte(kvm, new_spte):
        # KVM bumps pf_mmio_spte_created even when the SPTE was already there; the
        # contract counts only SPTEs actually installed.
        if installed:
            kvm.stat["mmio_sptes_created"] += 1
        ret = PF.EMULATE
    return ret


# =================================================================================================
# Zaps (spec §3.10) and walks (whole-root zaps are in tdp_mmu_roots).  Zaps are bounded by
# host.MAXPHYADDR (tdp_mmu_max_gfn_exclusive): no SPTE exists above kvm_mmu_max_gfn().
# =================================================================================================


def tdp_mmu_max_gfn_exclusive(kvm):
    return kvm.max_gfn + 1


def tdp_mmu_zap_leafs(kvm, root, start, end, flush):
    """Exclusive: zap present leaves of `root` intersecting [start, end).  Returns whether
    a TLB flush is needed (never for an invalid root); frees no table."""
    end = min(end, tdp_mmu_max_gfn_exclusive(kvm))
    nonpresent = kvm.layout.nonpresent_value
    for it in for_each_tdp_pte(kvm.pool, root, start, end):
        if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
            continue
        tdp_mmu_iter_set_spte(kvm, it, nonpresent)
        if not root.role.invalid:
            flush = True
    return flush


def kvm_tdp_mmu_zap_leafs(kvm, start, end, flush):
    """tdp_mmu_zap_leafs over every valid root."""
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        flush = tdp_mmu_zap_leafs(kvm, root, start, end, flush)
    return flush


def kvm_tdp_mmu_zap_sp(kvm, sp):
    """Exclusive: unlink `sp` by zapping its parent entry.  False (and a WARN) for the root
    or when the parent entry is not present."""
    if sp.ptep is None:  # the root has no parent entry
        kvm_warn(kvm, "zap-sp-unlinked")
        return False
    old_spte = kvm_tdp_mmu_read_spte(kvm.pool, sp.ptep)
    if not is_shadow_present_pte(old_spte):
        kvm_warn(kvm, "zap-sp-unlinked")
        return False
    tdp_mmu_set_spte(kvm, sp.ptep, old_spte, kvm.layout.nonpresent_value, sp.gfn,
                     sp.role.level + 1)
    return True


def tdp_mmu_find_sp(kvm, root, gfn, level):
    """The kvm_mmu_page of the level-`level` table on gfn's path below `root`, or None."""
    for it in for_each_tdp_pte_min_level(kvm.pool, root, level + 1, gfn, gfn + 1):
        if it.level == level + 1:
            return spte_to_child_sp(kvm, it.old_spte, it.level)
    return None


def tdp_mmu_zap_spte_atomic_at(kvm, root, gfn, level):
    """Shared: the atomic zap of the present entry at `level` on gfn's path; False if that
    entry is not present (or not reached).  A lost CAS is retried on the refreshed value,
    as KVM's callers do ("goto retry")."""
    for it in for_each_tdp_pte_min_level(kvm.pool, root, level, gfn, gfn + 1):
        if it.level != level:
            continue
        while is_shadow_present_pte(it.old_spte):
            if tdp_mmu_zap_spte_atomic(kvm, it):
                return True
        return False
    return False


def tdp_mmu_walk(kvm, root, gfn):
    """[(level, spte), ...] from `root` down to the first entry that is not a present
    non-leaf."""
    return [(it.level, it.old_spte) for it in for_each_tdp_pte(kvm.pool, root, gfn, gfn + 1)]


def kvm_tdp_mmu_get_walk(vcpu, gfn):
    """The walk of gfn from the vCPU's root (get_mmio_spte's question)."""
    return tdp_mmu_walk(vcpu.kvm, vcpu.root, gfn)


def kvm_tdp_mmu_fast_pf_get_last_spte(vcpu, gfn):
    """(sptep, level, spte) of the last entry on gfn's walk from the vCPU's root (the fast
    path's question; the level is that of the table holding sptep)."""
    last = None
    for it in tdp_mmu_for_each_pte(vcpu, gfn, gfn + 1):
        last = (it.sptep, it.level, it.old_spte)
    return last


def kvm_tdp_mmu_iter_view(kvm, root, start, end, min_level):
    """[(level, gfn, spte), ...]: exactly the entries for_each_tdp_pte_min_level visits."""
    return [(it.level, it.gfn, it.old_spte)
            for it in for_each_tdp_pte_min_level(kvm.pool, root, min_level, start, end)]
