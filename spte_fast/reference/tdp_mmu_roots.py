"""TDP MMU roots: their list, reference counts and invalidation, and whole-root zaps.

Models the root part of Linux v6.10's ``arch/x86/kvm/mmu/tdp_mmu.c``:
``kvm_tdp_mmu_alloc_root`` (a root from the vCPU's shadow-page cache, or a reference to a
valid root of the same role), ``kvm_tdp_mmu_get_root`` / ``kvm_tdp_mmu_put_root``,
``kvm_tdp_mmu_invalidate_all_roots``, ``kvm_tdp_mmu_zap_invalidated_roots``,
``tdp_mmu_zap_root`` and ``kvm_tdp_mmu_zap_all``.  Spec §3.10 ("Root lifecycle").

``kvm.tdp_mmu_roots`` is ``kvm->arch.tdp_mmu_roots``, newest first (``list_add_rcu`` adds at
the head).  A root is referenced once by each vCPU whose ``root`` it is, and once by the MMU
itself from its allocation until kvm_tdp_mmu_zap_invalidated_roots puts that reference; the
last put takes it off the list and frees its page.
"""
from . import tdp_mmu
from .spte import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, is_shadow_present_pte
from .tdp_iter import for_each_tdp_pte_min_level


def kvm_tdp_mmu_valid_roots(kvm):
    """for_each_valid_tdp_mmu_root: the roots on the list that are not invalid."""
    return [root for root in kvm.tdp_mmu_roots if not root.role.invalid]


def kvm_tdp_mmu_valid_root(kvm):
    """The VM's valid root (there is at most one role, so at most one), or None."""
    valid = kvm_tdp_mmu_valid_roots(kvm)
    return valid[0] if valid else None


def kvm_tdp_mmu_get_root(root):
    """refcount_inc_not_zero: False for a root whose last reference is gone."""
    if root.tdp_mmu_root_count == 0:
        return False
    root.tdp_mmu_root_count += 1
    return True


def kvm_tdp_mmu_put_root(kvm, root):
    """Drop one reference; the last one takes the root off the list and frees its page
    (KVM after an RCU grace period; single-threaded, at once).  Only an invalid root can
    lose its last reference: the MMU holds one while it is valid."""
    root.tdp_mmu_root_count -= 1
    if root.tdp_mmu_root_count:
        return
    assert root.role.invalid, "the last reference of a valid root was put"
    kvm.tdp_mmu_roots.remove(root)
    tdp_mmu.tdp_unaccount_mmu_page(kvm, root)
    tdp_mmu.tdp_mmu_free_sp(kvm, root)


def kvm_tdp_mmu_alloc_root(vcpu):
    """The vCPU's root (kvm_mmu_load -> mmu_alloc_direct_roots): a reference to the valid
    root of the VM's role, else a new root from the vCPU's shadow-page cache with two
    references (the vCPU's and the MMU's), added at the head of the list."""
    kvm = vcpu.kvm
    role = tdp_mmu.KvmMmuPageRole(level=kvm.root_level)
    for root in kvm_tdp_mmu_valid_roots(kvm):
        if root.role == role and kvm_tdp_mmu_get_root(root):
            vcpu.root = root
            return
    root = tdp_mmu.tdp_mmu_alloc_sp(vcpu)
    tdp_mmu.tdp_mmu_init_sp(kvm, root, None, 0, role)
    root.tdp_mmu_root_count = 2
    kvm.tdp_mmu_roots.insert(0, root)
    # The model counts roots in pt_pages while they are on the list (API.md).
    tdp_mmu.tdp_account_mmu_page(kvm, root)
    vcpu.root = root


def kvm_tdp_mmu_invalidate_all_roots(kvm):
    """Under mmu_lock for write: every valid root becomes invalid and scheduled to zap
    (the vCPUs drop them at their next entry: KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)."""
    for root in kvm.tdp_mmu_roots:
        if not root.role.invalid:
            root.tdp_mmu_scheduled_root_to_zap = True
            root.role = root.role._replace(invalid=True)


def kvm_tdp_mmu_zap_invalidated_roots(kvm):
    """Under mmu_lock for read: zap each scheduled root (shared), then put the MMU's
    reference.  No TLB flush: a vCPU flushes its own TLB when it loads a new root."""
    for root in list(kvm.tdp_mmu_roots):
        if not root.tdp_mmu_scheduled_root_to_zap:
            continue
        root.tdp_mmu_scheduled_root_to_zap = False
        tdp_mmu_zap_root(kvm, root, shared=True)
        kvm_tdp_mmu_put_root(kvm, root)


def _tdp_mmu_zap_root(kvm, root, shared, zap_level):
    """KVM's __tdp_mmu_zap_root: zap present entries at levels <= zap_level that the walk
    (min level zap_level) reaches; exclusive stores, or (shared) CASes retried on the
    refreshed value until they succeed.  Returns whether anything was zapped."""
    nonpresent = kvm.layout.nonpresent_value
    zapped = False
    for it in for_each_tdp_pte_min_level(kvm.pool, root, zap_level, 0,
                                         tdp_mmu.tdp_mmu_max_gfn_exclusive(kvm)):
        while is_shadow_present_pte(it.old_spte) and it.level <= zap_level:  # "retry:"
            if not shared:
                tdp_mmu.tdp_mmu_iter_set_spte(kvm, it, nonpresent)
            elif not tdp_mmu.tdp_mmu_set_spte_atomic(kvm, it, nonpresent):
                continue  # lost the CAS: it.old_spte is what was found
            zapped = True
            break
    return zapped


def tdp_mmu_zap_root(kvm, root, shared):
    """Passes of decreasing granularity, 4K -> 2M -> 1G -> root level, so that no single
    removal recurses deeply."""
    zapped = False
    for zap_level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, root.role.level):
        zapped |= _tdp_mmu_zap_root(kvm, root, shared, zap_level)
    return zapped


def kvm_tdp_mmu_zap_all(kvm):
    """Exclusive: every root on the list, valid or invalid, is zapped; no TLB flush (6.10:
    only reached when no vCPU will run again).  Returns whether anything was zapped (the
    model's answer; KVM's function returns nothing)."""
    zapped = False
    for root in list(kvm.tdp_mmu_roots):
        zapped |= tdp_mmu_zap_root(kvm, root, shared=False)
    return zapped


def kvm_tdp_mmu_roots_view(kvm):
    """vm.roots: [(pool index, refcount, invalid), ...] in list order (newest first)."""
    return [(root.spt, root.tdp_mmu_root_count, root.role.invalid)
            for root in kvm.tdp_mmu_roots]
