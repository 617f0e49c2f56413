"""The public ``Vm`` and ``Vcpu``: argument checks, then one call into the modules that
model KVM.

Stands for the ioctl layer of Linux v6.10 (``virt/kvm/kvm_main.c``: ``KVM_CREATE_VM``,
``KVM_CREATE_VCPU``, ``KVM_SET_USER_MEMORY_REGION``, ``KVM_RUN``), which validates what
userspace passes and hands ``struct kvm`` / ``struct kvm_vcpu`` to the rest.  The
contract is docs/API.md; every check raises TypeError / ValueError before anything changes.
"""
import numpy as np

from ..pf import PF
from . import (aging, audit, guest_memory, guest_walk, huge_pages, hw, memslots, mmu, notifiers,
               tdp_mmu)
from . import tdp_mmu_roots
from . import dirty_log as dirty_log_mod
from ._checks import check_int, check_int_array, check_out_array, check_u64, check_u64_array
from .kvm_host import (KVM_MAX_VCPUS, Kvm, kvm_flush_remote_tlbs, kvm_stats,
                       kvm_vm_ioctl_create_vcpu,
                       kvm_warnings_by_reason)
from .spte import PG_LEVEL_1G, PG_LEVEL_4K, SpteLayout, is_last_spte, is_shadow_present_pte

#: Error codes are the 32 architectural bits of the #PF / #NPF error code.
ERROR_CODE_LIMIT = 1 << 32
#: Words one read_guest call returns at most.
GUEST_READ_MAX = 1 << 24


class Vm:
    """A VM with TDP MMU roots (4 or 5 levels) over a :class:`PagePool` of page tables.

    Roots come from the vCPUs' caches when a vCPU first enters the guest; there is at most
    one valid root.  Lock modes are modelled by which setter a path uses: the fault path,
    the atomic zap and the zap of invalidated roots run in shared mode
    (compare-and-exchange, ``tdp_mmu_set_spte_atomic``); zap_gfn_range, zap_all and zap_sp
    run in exclusive mode (``tdp_mmu_set_spte``).
    """

    def __init__(self, layout, root_level=4, max_level=PG_LEVEL_1G, max_pt_pages=1 << 20,
                 nx_huge_pages=False, poison=None, host_maxphyaddr=46, *,
                 manual_dirty_log_protect=False, dirty_log_initially_set=False, pml=None,
                 eager_page_split=True, nx_huge_pages_recovery_ratio=60):
        if not isinstance(layout, SpteLayout):
            raise TypeError(f"layout must be a SpteLayout, not {type(layout).__name__}")
        root_level = check_int("root_level", root_level)
        if root_level not in (4, 5):
            raise ValueError(f"root_level must be 4 or 5, got {root_level}")
        max_level = check_int("max_level", max_level, PG_LEVEL_4K, PG_LEVEL_1G + 1)
        max_pt_pages = check_int("max_pt_pages", max_pt_pages, 2)
        host_maxphyaddr = check_int("host_maxphyaddr", host_maxphyaddr, 36, 53)
        # nx_huge_pages_recovery_ratio: KVM caps the period it derives at ratio 3600.
        ratio = check_int("nx_huge_pages_recovery_ratio", nx_huge_pages_recovery_ratio, 0, 3601)
        if dirty_log_initially_set and not manual_dirty_log_protect:
            raise ValueError("dirty_log_initially_set needs manual_dirty_log_protect "
                             "(KVM_DIRTY_LOG_INITIALLY_SET is a flag of "
                             "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
        # PML is a VMX feature that logs the D bits the CPU sets: EPT with A/D bits only.
        has_pml = layout.mode == "ept" and layout.accessed_mask != 0
        if pml is None:
            pml = has_pml
        elif pml and not has_pml:
            raise ValueError("pml=True needs an EPT layout with A/D bits")
        self._kvm = Kvm(layout, root_level, max_level, max_pt_pages, bool(nx_huge_pages),
                        poison, host_maxphyaddr,
                        manual_dirty_log_protect=bool(manual_dirty_log_protect),
                        dirty_log_initially_set=bool(dirty_log_initially_set),
                        enable_pml=bool(pml), eager_page_split=bool(eager_page_split),
                        nx_huge_pages_recovery_ratio=ratio)
        self._vcpus = []  # the Vcpu objects, in the order of self._kvm.vcpus

    # --- read-only attributes -------------------------------------------------------------------

    layout = property(lambda self: self._kvm.layout)
    root_level = property(lambda self: self._kvm.root_level)
    max_level = property(lambda self: self._kvm.max_level)
    nx_huge_pages = property(lambda self: self._kvm.nx_huge_pages)
    pool = property(lambda self: self._kvm.pool)
    mmio_generation = property(lambda self: self._kvm.memslots_generation)
    gfn_limit = property(lambda self: self._kvm.gfn_limit)
    host_maxphyaddr = property(lambda self: self._kvm.host_maxphyaddr)
    max_gfn = property(lambda self: self._kvm.max_gfn)
    manual_dirty_log_protect = property(lambda self: self._kvm.manual_dirty_log_protect)
    dirty_log_initially_set = property(lambda self: self._kvm.dirty_log_initially_set)
    pml = property(lambda self: self._kvm.enable_pml)
    eager_page_split = property(lambda self: self._kvm.eager_page_split)
    nx_huge_pages_recovery_ratio = property(lambda self: self._kvm.nx_huge_pages_recovery_ratio)

    def _valid_root(self):
        return tdp_mmu_roots.kvm_tdp_mmu_valid_root(self._kvm)

    @property
    def root(self):
        """Pool index of the VM's valid root, or None."""
        root = self._valid_root()
        return None if root is None else root.spt

    @property
    def roots(self):
        """[(pool index, refcount, invalid), ...] of every root on the list, newest first."""
        return tdp_mmu_roots.kvm_tdp_mmu_roots_view(self._kvm)

    def __repr__(self):
        return (f"Vm({self.layout!r}, root_level={self.root_level}, "
                f"max_level={self.max_level}, max_pt_pages={self.pool.capacity})")

    @property
    def stats(self):
        return kvm_stats(self._kvm)

    @property
    def warnings_by_reason(self):
        """{reason: count} for every reason of ``errors.WARN_REASONS``, in that order: the
        VM's own warnings plus those of every vCPU cache."""
        return kvm_warnings_by_reason(self._kvm)

    def _check_gfn(self, gfn, name="gfn"):
        return check_int(name, gfn, 0, self._kvm.gfn_limit)

    # --- memslots and host pages ----------------------------------------------------------------

    def add_memslot(self, base_gfn, npages, pfn, readonly=False, dirty_log=False):
        base_gfn = check_int("base_gfn", base_gfn, 0)
        npages = check_int("npages", npages, 1)
        pfn = check_int("pfn", pfn, 0)
        return memslots.kvm_create_memslot(self._kvm, base_gfn, npages, pfn, bool(readonly),
                                           bool(dirty_log))

    # --- dirty logging ----------------------------------------------------------------------

    def _slot(self, slot_id):
        slot = self._kvm.memslots.get(check_int("slot_id", slot_id))
        if slot is None:
            raise ValueError(f"no memslot with id {slot_id!r}")
        return slot

    def _dirty_logged_slot(self, slot_id):
        slot = self._slot(slot_id)
        if slot.dirty_bitmap is None:
            raise ValueError(f"memslot {slot_id} has no dirty log (-ENOENT)")
        return slot

    def set_memslot_flags(self, slot_id, dirty_log):
        """KVM_MR_FLAGS_ONLY: KVM_MEM_LOG_DIRTY_PAGES on or off, then
        kvm_mmu_slot_apply_flags.  The same flags: nothing happens."""
        slot_id = check_int("slot_id", slot_id)
        if not isinstance(dirty_log, int):      # bool is an int; a float is not
            raise TypeError(f"dirty_log must be a bool, not {type(dirty_log).__name__}")
        dirty_log_mod.kvm_set_memslot_flags(self._kvm, self._slot(slot_id), bool(dirty_log))

    def get_dirty_log(self, slot_id):
        """KVM_GET_DIRTY_LOG -> uint64 words (page i: bit i % 64 of word i // 64)."""
        slot = self._dirty_logged_slot(slot_id)
        return np.array(dirty_log_mod.kvm_get_dirty_log_protect(self._kvm, slot),
                        dtype=np.uint64)

    def clear_dirty_log(self, slot_id, first_page, num_pages, bitmap):
        """KVM_CLEAR_DIRTY_LOG for pages [first_page, first_page + num_pages), `bitmap` in
        uint64 words from first_page.  kvm_clear_dirty_log_protect checks only its
        arguments: manual protect is not required."""
        slot_id = check_int("slot_id", slot_id)
        first_page = check_int("first_page", first_page, 0, 1 << 64)
        num_pages = check_int("num_pages", num_pages, 0, 1 << 64)
        words = check_int_array("bitmap", bitmap)      # API.md "Accepted argument types"
        if first_page % 64:
            raise ValueError(f"first_page {first_page} is not a multiple of 64 (-EINVAL)")
        slot = self._dirty_logged_slot(slot_id)
        rest = slot.npages - first_page
        if first_page > slot.npages or num_pages > rest or (num_pages < rest and num_pages % 64):
            raise ValueError(f"pages [{first_page}, {first_page + num_pages}) do not fit the "
                             f"{slot.npages}-page slot in 64-page words (-EINVAL)")
        n = -(-num_pages // 64)
        if len(words) < n:
            raise ValueError(f"bitmap has {len(words)} words, {n} needed")
        dirty_log_mod.kvm_clear_dirty_log_protect(self._kvm, slot, first_page, words[:n])

    # --- huge pages ----------------------------------------------------------------------------

    def split_huge_pages(self, start, end, target_level=PG_LEVEL_4K):
        """Eager split of the huge leaves in [start, end) to target_level -> pages split."""
        start, end = self._age_range(start, end)
        target_level = check_int("target_level", target_level, PG_LEVEL_4K, PG_LEVEL_1G)
        return huge_pages.kvm_mmu_try_split_huge_pages(self._kvm, start, end, target_level)

    def recover_nx_huge_pages(self):
        """One run of the NX recovery thread -> tables zapped."""
        return huge_pages.kvm_recover_nx_huge_pages(self._kvm)

    def set_nx_huge_pages(self, on):
        """The nx_huge_pages module parameter at run time (a change zaps all roots fast)."""
        if not isinstance(on, int):
            raise TypeError(f"on must be a bool, not {type(on).__name__}")
        huge_pages.set_nx_huge_pages(self._kvm, bool(on))

    def delete_memslot(self, slot_id):
        memslots.kvm_delete_memslot(self._kvm, check_int("slot_id", slot_id))

    def move_memslot(self, slot_id, new_base_gfn):
        slot_id = check_int("slot_id", slot_id)
        new_base_gfn = check_int("new_base_gfn", new_base_gfn, 0)
        memslots.kvm_move_memslot(self._kvm, slot_id, new_base_gfn)

    @property
    def memslots(self):
        return [slot.as_tuple() for slot in memslots.kvm_memslots_sorted(self._kvm)]

    def read_guest(self, gpa, count=None):
        gpa = check_u64("gpa", gpa)
        n = 1 if count is None else check_int("count", count, 1, GUEST_READ_MAX + 1)
        words = guest_memory.kvm_read_guest(self._kvm, gpa, n)
        return words[0] if count is None else np.array(words, dtype=np.uint64)

    def write_guest(self, gpa, value):
        if isinstance(value, np.ndarray):
            value = check_u64_array("value", value)
            if value.ndim != 1 or value.shape[0] == 0:
                raise ValueError("value must be an int or a non-empty 1-D uint64 array of "
                                 "words")
            if not value.flags.c_contiguous:
                raise ValueError("value must be C-contiguous")
            values = value.tolist()
        else:
            values = [check_u64("value", value)]
        guest_memory.kvm_write_guest(self._kvm, check_u64("gpa", gpa), values)

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
        """[(level, spte), ...] from the valid root down to the first entry that is not a
        present non-leaf; [] without a valid root."""
        gfn = self._check_gfn(gfn)
        root = self._valid_root()
        return [] if root is None else tdp_mmu.tdp_mmu_walk(self._kvm, root, gfn)

    def lookup(self, gfn):
        """(spte, level) of the present leaf mapping gfn, or None."""
        walk = self.walk(gfn)
        if not walk:
            return None
        level, spte = walk[-1]
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
        root = self._valid_root()
        if root is None:
            return []
        return tdp_mmu.kvm_tdp_mmu_iter_view(self._kvm, root, start, end, min_level)

    # --- zaps -------------------------------------------------------------------------------------

    def zap_gfn_range(self, start, end):
        start = check_int("start", start, 0, self._kvm.gfn_limit + 1)
        end = check_int("end", end, 0, self._kvm.gfn_limit + 1)
        if start > end:
            raise ValueError(f"start {start:#x} > end {end:#x}")
        return mmu.kvm_zap_gfn_range(self._kvm, start, end)

    def _age_range(self, start, end):
        start = check_int("start", start, 0, self._kvm.gfn_limit + 1)
        end = check_int("end", end, 0, self._kvm.gfn_limit + 1)
        if start > end:
            raise ValueError(f"start {start:#x} > end {end:#x}")
        return start, end

    def age_gfn_range(self, start, end, flush=False):
        """MMU notifier clear_young (flush=False) / clear_flush_young: age the leaves in
        [start, end); young if any was accessed (then one full flush if `flush`)."""
        start, end = self._age_range(start, end)
        young = aging.kvm_tdp_mmu_handle_gfn(self._kvm, start, end, aging.age_gfn_range)
        if young and flush:
            kvm_flush_remote_tlbs(self._kvm)
        return young

    def test_age_gfn(self, start, end):
        """MMU notifier test_young: whether a leaf in [start, end) is accessed."""
        start, end = self._age_range(start, end)
        return aging.kvm_tdp_mmu_handle_gfn(self._kvm, start, end, aging.test_age_gfn)

    def unmap_gfn_range(self, start, end):
        """MMU notifier unmap of [start, end) (kvm_unmap_gfn_range): zap leaves in every
        root per intersecting memslot; one full flush if needed.  Returns the flush flag."""
        start, end = self._age_range(start, end)
        return notifiers.kvm_unmap_gfn_range(self._kvm, start, end)

    def write_protect_gfn(self, gfn, min_level=PG_LEVEL_4K):
        """kvm_write_track_add_gfn: clear W and MMU-writable on the leaves mapping gfn at
        >= min_level in the valid root; a full flush if changed.  Returns changed."""
        gfn = self._check_gfn(gfn)
        min_level = check_int("min_level", min_level, PG_LEVEL_4K, PG_LEVEL_1G + 1)
        if memslots.gfn_to_memslot(self._kvm, gfn) is None:
            raise ValueError(f"gfn {gfn:#x} is in no memslot")
        return notifiers.kvm_write_track_add_gfn(self._kvm, gfn, min_level)

    def zap_all(self):
        """Zap every root (kvm_mmu_zap_all); True when anything was zapped.  No TLB flush
        is counted (6.10)."""
        return mmu.kvm_mmu_zap_all(self._kvm)

    def zap_all_fast(self):
        """kvm_mmu_zap_all_fast: invalidate every root, zap the invalidated ones; the
        vCPUs load a new root at their next entry."""
        mmu.kvm_mmu_zap_all_fast(self._kvm)

    def zap_sp(self, gfn, level):
        gfn = self._check_gfn(gfn)
        level = check_int("level", level, PG_LEVEL_4K, self._kvm.root_level)
        root = self._valid_root()
        if root is None:
            return False
        return mmu.kvm_mmu_zap_sp_at(self._kvm, root, gfn, level)

    def zap_spte_atomic(self, gfn, level):
        gfn = self._check_gfn(gfn)
        level = check_int("level", level, PG_LEVEL_4K, self._kvm.root_level + 1)
        root = self._valid_root()
        if root is None:
            return False
        return tdp_mmu.tdp_mmu_zap_spte_atomic_at(self._kvm, root, gfn, level)

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
        """This vCPU's own counters."""
        return dict(self._vcpu.stat)

    @property
    def root(self):
        """Pool index of this vCPU's root (possibly invalid), or None."""
        root = self._vcpu.root
        return None if root is None else root.spt

    def fault(self, gfn, write=False, exec=False, *, error_code=None):  # noqa: A002
        """Enter the guest, then deliver one fault to kvm_mmu_page_fault."""
        gfn = self._vm._check_gfn(gfn)
        if error_code is None:
            error_code = mmu.pf_error_code(bool(write), bool(exec))
        else:
            error_code = check_int("error_code", error_code, 0, ERROR_CODE_LIMIT)
            if write or exec:
                raise ValueError("error_code together with write or exec")
        mmu.kvm_vcpu_enter_guest(self._vcpu)
        return mmu.kvm_mmu_page_fault(self._vcpu, gfn, error_code)

    def _check_gfns(self, gfns):
        gfn_limit = self._vm._kvm.gfn_limit
        gfn_list = check_int_array("gfns", gfns)
        for gfn in gfn_list:
            if not 0 <= gfn < gfn_limit:
                raise ValueError(f"gfn {gfn:#x} outside [0, {gfn_limit:#x})")
        return gfn_list

    @staticmethod
    def _check_values(name, array, n, limit):
        values = check_int_array(name, array)
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, gfns has {n}")
        for v in values:
            if not 0 <= v < limit:
                raise ValueError(f"{name} values must be in 0..{limit - 1:#x}, got {v:#x}")
        return values

    @staticmethod
    def _check_out(out, n):
        """The plain ndarray over ``out``'s memory (numpy's own view: a subclass's shape
        or flags are not consulted), or None."""
        return None if out is None else check_out_array("out", out, n)

    def fault_batch(self, gfns, access=None, out=None, *, error_codes=None):
        """Fault every gfn in order; RETRY results are faulted again."""
        # Validate everything before the first fault.
        gfn_list = self._check_gfns(gfns)
        n = len(gfn_list)
        if error_codes is not None:
            if access is not None:
                raise ValueError("access and error_codes together")
            code_list = self._check_values("error_codes", error_codes, n, ERROR_CODE_LIMIT)
        elif access is None:
            code_list = [0] * n
        else:
            code_list = [mmu.pf_error_code(bool(a & 1), bool(a & 2))
                         for a in self._check_values("access", access, n, 4)]
        out = self._check_out(out, n)
        return mmu.kvm_mmu_page_fault_batch(self._vcpu, gfn_list, code_list, out)

    @property
    def cr3(self):
        """The guest's CR3 (a gpa), or None while the guest runs with paging off."""
        return self._vcpu.guest_cr3

    @property
    def guest_levels(self):
        return self._vcpu.guest_levels

    def set_cr3(self, gpa, *, levels=4):
        """The guest loads CR3 (long mode, CR0.WP=1, EFER.NX=1, no PCID): from now on
        ``access`` takes guest-virtual addresses.  None turns guest paging off.  Under TDP
        no exit happens (CR3 loads are not intercepted) and no MMU state changes."""
        if gpa is None:
            self._vcpu.guest_cr3 = None
            return
        gpa = check_u64("gpa", gpa)
        levels = check_int("levels", levels)
        if levels not in (4, 5):
            raise ValueError(f"levels must be 4 or 5, not {levels}")
        if gpa & 0xFFF:
            raise ValueError(f"CR3 {gpa:#x} must be 4K-aligned (no PCID or flag bits here)")
        if gpa >> 12 >= self._vm._kvm.gfn_limit or gpa >> self._vm._kvm.host_maxphyaddr:
            raise ValueError(f"CR3 {gpa:#x} is beyond the guest's physical address width")
        self._vcpu.guest_cr3 = gpa
        self._vcpu.guest_levels = levels

    def _check_gva(self, gva):
        gva = check_u64("gva", gva)
        bits = 48 if self._vcpu.guest_levels == 4 else 57
        if gva >> (bits - 1) not in (0, (1 << (65 - bits)) - 1):
            raise ValueError(f"gva {gva:#x} is not canonical for {self._vcpu.guest_levels}-"
                             "level paging (the access would #GP)")
        return gva

    def access(self, addr, write=False, exec=False, user=True):  # noqa: A002
        """The guest accesses ``addr`` once -- a gfn with paging off, a guest-virtual
        address with paging on.  Paging off: None if the hardware completed it without an
        exit, else the PF of the last exit.  Paging on (the two-dimensional walk): None,
        GUEST_PAGE_FAULT, or the PF of the first exit."""
        if write and exec:
            raise ValueError("an access is a write or an instruction fetch, not both")
        if self._vcpu.guest_cr3 is not None:
            return guest_walk.kvm_vcpu_guest_access(self._vcpu, self._check_gva(addr),
                                                    bool(write), bool(exec), bool(user))
        gfn = self._vm._check_gfn(addr)
        return hw.kvm_vcpu_access_one(self._vcpu, gfn, bool(write), bool(exec))

    def _mov(self, addr, write, value):
        """vcpu.load / vcpu.store: the access, then the word in guest memory at the gpa it
        reached (None when no RAM was reached)."""
        if write:
            value = check_u64("value", value)
        paging = self._vcpu.guest_cr3 is not None
        addr = self._check_gva(addr) if paging else check_u64("gpa", addr)
        if addr % 8:
            raise ValueError(f"{'gva' if paging else 'gpa'} {addr:#x} is not 8-byte aligned")
        if paging:
            r = guest_walk.kvm_vcpu_guest_access(self._vcpu, addr, write, False, True)
            if r in (guest_walk.GUEST_PAGE_FAULT, PF.EMULATE):
                return r, None
            level, leaf = guest_walk.guest_walk_entries(self._vcpu, addr)[-1]
            size = 1 << (12 + 9 * (level - 1))
            gpa = (leaf & 0x000F_FFFF_FFFF_F000 & ~(size - 1)) | (addr & (size - 1))
            if memslots.gfn_to_memslot(self._vm._kvm, gpa >> 12) is None:
                return r, None                      # the final access was emulated (MMIO)
        else:
            r = hw.kvm_vcpu_access_one(self._vcpu, self._vm._check_gfn(addr >> 12), write,
                                       False)
            if r == PF.EMULATE:
                return r, None
            gpa = addr
        if write:
            guest_memory.kvm_write_guest(self._vm._kvm, gpa, [value])
            return r, None
        return r, guest_memory.kvm_read_guest(self._vm._kvm, gpa, 1)[0]

    def store(self, addr, value):
        """A user-mode 8-byte MOV to addr (guest-virtual with paging on, else a gpa):
        what access returns; nothing written on GUEST_PAGE_FAULT or EMULATE."""
        return self._mov(addr, True, value)[0]

    def load(self, addr):
        """A user-mode 8-byte MOV from addr: (value, result); value None without RAM."""
        r, v = self._mov(addr, False, None)
        return v, r

    def invlpg(self, gva):
        """The guest invalidates gva's translation.  Under TDP INVLPG is not intercepted
        (no exit) and the model keeps no guest TLB: nothing changes."""
        if self._vcpu.guest_cr3 is None:
            raise ValueError("the guest runs with paging off: INVLPG has no translation")
        self._check_gva(gva)

    def walk(self, gva):
        """[(level, entry)] of the guest's page tables for gva, from CR3 down to the first
        entry that is not a present table (read as the VMM reads guest memory)."""
        if self._vcpu.guest_cr3 is None:
            raise ValueError("the guest runs with paging off: vm.walk(gfn) lists the SPTEs")
        return guest_walk.guest_walk_entries(self._vcpu, self._check_gva(gva))

    def access_batch(self, gfns, access=None, out=None):
        """Every access in order -> {"hits", "fixed", "spurious", "retry", "emulate",
        "fast"} (with paging on: to guest-virtual addresses, user-mode, and
        "guest_faults")."""
        if self._vcpu.guest_cr3 is not None:
            gvas = check_u64_array("gvas", gfns)
            if gvas.ndim != 1:
                raise ValueError(f"gvas must be 1-D, not of {gvas.ndim} dimensions")
            gva_list = [self._check_gva(g) for g in gvas.tolist()]
            n = len(gva_list)
            access_list = [0] * n if access is None else \
                self._check_values("access", access, n, 3)
            out = self._check_out(out, n)
            return guest_walk.kvm_vcpu_guest_access_batch(self._vcpu, gva_list, access_list,
                                                          out)
        gfn_list = self._check_gfns(gfns)
        n = len(gfn_list)
        access_list = [0] * n if access is None else self._check_values("access", access, n, 3)
        out = self._check_out(out, n)
        return hw.kvm_vcpu_access_batch(self._vcpu, gfn_list, access_list, out)

    def __repr__(self):
        return f"Vcpu(cache={self.cache!r})"
