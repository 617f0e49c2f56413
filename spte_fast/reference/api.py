"""The public ``Vm`` and ``Vcpu``: argument checks, then one call into the modules that
model KVM.

Stands for the ioctl layer of Linux v6.10 (``virt/kvm/kvm_main.c``: ``KVM_CREATE_VM``,
``KVM_CREATE_VCPU``, ``KVM_SET_USER_MEMORY_REGION``, ``KVM_RUN``), which validates what
userspace passes and hands ``struct kvm`` / ``struct kvm_vcpu`` to the rest.  The
contract is docs/API.md; every check raises TypeError / ValueError before anything changes.
"""
import numpy as np

from . import audit, memslots, mmu, tdp_mmu
from ._checks import check_int, check_int_array, check_writable
from .kvm_host import (KVM_MAX_VCPUS, Kvm, kvm_stats, kvm_vm_ioctl_create_vcpu,
                       kvm_warnings_by_reason)
from .spte import PG_LEVEL_1G, PG_LEVEL_4K, SpteLayout, is_last_spte, is_shadow_present_pte


class Vm:
    """A VM with one TDP MMU root (4 or 5 levels) over a :class:`PagePool` of page tables.

    Lock modes are modelled by which setter a path uses: the fault path and the atomic zap
    run in shared mode (compare-and-exchange, ``tdp_mmu_set_spte_atomic``); zap_gfn_range,
    zap_all and zap_sp run in exclusive mode (``tdp_mmu_set_spte``).
    """

    def __init__(self, layout, root_level=4, max_level=PG_LEVEL_1G, max_pt_pages=1 << 20,
                 nx_huge_pages=False, poison=None):
        if not isinstance(layout, SpteLayout):
            raise TypeError(f"layout must be a SpteLayout, not {type(layout).__name__}")
        root_level = check_int("root_level", root_level)
        if root_level not in (4, 5):
            raise ValueError(f"root_level must be 4 or 5, got {root_level}")
        max_level = check_int("max_level", max_level, PG_LEVEL_4K, PG_LEVEL_1G + 1)
        max_pt_pages = check_int("max_pt_pages", max_pt_pages, 2)
        self._kvm = Kvm(layout, root_level, max_level, max_pt_pages, bool(nx_huge_pages),
                        poison)
        tdp_mmu.kvm_tdp_mmu_alloc_root(self._kvm)
        self._vcpus = []  # the Vcpu objects, in the order of self._kvm.vcpus

    # --- read-only attributes -------------------------------------------------------------------

    layout = property(lambda self: self._kvm.layout)
    root_level = property(lambda self: self._kvm.root_level)
    max_level = property(lambda self: self._kvm.max_level)
    nx_huge_pages = property(lambda self: self._kvm.nx_huge_pages)
    pool = property(lambda self: self._kvm.pool)
    root = property(lambda self: self._kvm.root.spt)
    mmio_generation = property(lambda self: self._kvm.mmio_generation)
    gfn_limit = property(lambda self: self._kvm.gfn_limit)

    def __repr__(self):
        return (f"Vm({self.layout!r}, root_level={self.root_level}, "
                f"max_level={self.max_level}, max_pt_pages={self.pool.capacity})")

    @property
    def stats(self):
        return kvm_stats(self._kvm)

    @property
    def warnings_by_reason(self):
        """{reason: count} for every reason of ``errors.WARN_REASONS``, in that order: the
        VM's own warnings plus those of the root's cache and of every vCPU cache."""
        return kvm_warnings_by_reason(self._kvm)

    def _check_gfn(self, gfn, name="gfn"):
        return check_int(name, gfn, 0, self._kvm.gfn_limit)

    # --- memslots and host pages ----------------------------------------------------------------

    def add_memslot(self, base_gfn, npages, pfn, readonly=False):
        base_gfn = check_int("base_gfn", base_gfn, 0)
        npages = check_int("npages", npages, 1)
        pfn = check_int("pfn", pfn, 0)
        return memslots.kvm_create_memslot(self._kvm, base_gfn, npages, pfn, bool(readonly))

    def delete_memslot(self, slot_id):
        memslots.kvm_delete_memslot(self._kvm, check_int("slot_id", slot_id))

    @property
    def memslots(self):
        return [slot.as_tuple() for slot in memslots.kvm_memslots_sorted(self._kvm)]

    def _check_backed_pfn(self, pfn):
        pfn = check_int("pfn", pfn, 0)
        if memslots.pfn_to_memslot(self._kvm, pfn) is None:
            raise ValueError(f"no memslot backs pfn {pfn:#x}")
        return pfn

    def host_page_accessed(self, pfn):
        return memslots.host_page_accessed(self._kvm, self._check_backed_pfn(pfn))

    def host_page_dirty(self, pfn):
        return memslots.host_page_dirty(self._kvm, self._check_backed_pfn(pfn))

    # --- vCPUs, fault injection -----------------------------------------------------------------

    def vcpu(self):
        return Vcpu(self)

    @property
    def vcpus(self):
        return tuple(self._vcpus)

    def inject_cas_failures(self, n):
        self._kvm.cas_failures_to_inject = check_int("n", n, 0)

    # --- walks ------------------------------------------------------------------------------------

    def walk(self, gfn):
        """[(level, spte), ...] from the root down to the first entry that is not a present
        non-leaf."""
        return tdp_mmu.kvm_tdp_mmu_get_walk(self._kvm, self._check_gfn(gfn))

    def lookup(self, gfn):
        """(spte, level) of the present leaf mapping gfn, or None."""
        level, spte = self.walk(gfn)[-1]
        if is_shadow_present_pte(spte) and is_last_spte(spte, level):
            return spte, level
        return None

    def tdp_iter(self, start, end, min_level=PG_LEVEL_4K):
        """[(level, gfn, spte), ...]: exactly the entries that KVM's
        ``for_each_tdp_pte_min_level(iter, root, min_level, start, end)`` visits, in its
        order (pre-order, while ``iter.valid and iter.gfn < end``)."""
        start = check_int("start", start, 0, self._kvm.gfn_limit + 1)
        end = check_int("end", end, 0, self._kvm.gfn_limit + 1)
        if start > end:
            raise ValueError(f"start {start:#x} > end {end:#x}")
        min_level = check_int("min_level", min_level, PG_LEVEL_4K, self._kvm.root_level + 1)
        return tdp_mmu.kvm_tdp_mmu_iter_view(self._kvm, start, end, min_level)

    # --- zaps -------------------------------------------------------------------------------------

    def zap_gfn_range(self, start, end):
        start = check_int("start", start, 0, self._kvm.gfn_limit + 1)
        end = check_int("end", end, 0, self._kvm.gfn_limit + 1)
        if start > end:
            raise ValueError(f"start {start:#x} > end {end:#x}")
        return mmu.kvm_zap_gfn_range(self._kvm, start, end)

    def zap_all(self):
        """Zap everything; True when anything was zapped (one full TLB flush then)."""
        return mmu.kvm_mmu_zap_all(self._kvm)

    def zap_sp(self, gfn, level):
        gfn = self._check_gfn(gfn)
        level = check_int("level", level, PG_LEVEL_4K, self._kvm.root_level)
        return mmu.kvm_mmu_zap_sp_at(self._kvm, gfn, level)

    def zap_spte_atomic(self, gfn, level):
        gfn = self._check_gfn(gfn)
        level = check_int("level", level, PG_LEVEL_4K, self._kvm.root_level + 1)
        return tdp_mmu.tdp_mmu_zap_spte_atomic_at(self._kvm, gfn, level)

    # --- audit ------------------------------------------------------------------------------------

    def audit(self):
        """Check the invariants of API.md; raise AuditError naming the first one broken."""
        audit.kvm_mmu_audit(self._kvm)


class Vcpu:
    """A vCPU of a :class:`Vm`; owns the ``mmu_shadow_page_cache`` its faults draw on."""

    def __init__(self, vm):
        if not isinstance(vm, Vm):
            raise TypeError(f"vm must be a Vm, not {type(vm).__name__}")
        if len(vm._kvm.vcpus) >= KVM_MAX_VCPUS:
            raise ValueError(f"at most {KVM_MAX_VCPUS} vCPUs per Vm")
        self._vm = vm
        self._vcpu = kvm_vm_ioctl_create_vcpu(vm._kvm)
        vm._vcpus.append(self)

    vm = property(lambda self: self._vm)
    cache = property(lambda self: self._vcpu.cache)

    @property
    def stats(self):
        """This vCPU's own fault counts."""
        return dict(self._vcpu.stat)

    def fault(self, gfn, write=False, exec=False):  # noqa: A002 - the contract's name
        gfn = self._vm._check_gfn(gfn)
        return mmu.kvm_mmu_do_page_fault(self._vcpu, gfn, bool(write), bool(exec))

    def fault_batch(self, gfns, access=None, out=None):
        """Fault every gfn in order; RETRY results are faulted again."""
        gfn_limit = self._vm._kvm.gfn_limit
        # Validate everything before the first fault.
        gfn_list = check_int_array("gfns", gfns)
        n = len(gfn_list)
        for gfn in gfn_list:
            if not 0 <= gfn < gfn_limit:
                raise ValueError(f"gfn {gfn:#x} outside [0, {gfn_limit:#x})")
        if access is None:
            access_list = [0] * n
        else:
            access_list = check_int_array("access", access)
            if len(access_list) != n:
                raise ValueError(f"access has {len(access_list)} entries, gfns has {n}")
            for a in access_list:
                if not 0 <= a <= 3:
                    raise ValueError(f"access values must be in 0..3, got {a}")
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy.ndarray, not {type(out).__name__}")
            if out.dtype != np.int8:
                raise TypeError(f"out must have dtype int8, not {out.dtype}")
            if out.shape != (n,):
                raise ValueError(f"out must have shape ({n},), not {out.shape}")
            check_writable("out", out)
        return mmu.kvm_mmu_page_fault_batch(self._vcpu, gfn_list, access_list, out)

    def __repr__(self):
        return f"Vcpu(cache={self.cache!r})"
