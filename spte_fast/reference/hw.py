"""The CPU: the hardware page walk of EPT / NPT tables, its accessed/dirty assists and the
VM exits it raises, and the guest re-executing an access until it completes.

Not KVM code: this is what the processor does (Intel SDM vol. 3 "EPT translation", "EPT
violations", "EPT misconfigurations"; AMD APM vol. 2 "Nested paging"), with the exits
handed to KVM as Linux v6.10 receives them: ``handle_ept_violation`` and
``handle_ept_misconfig`` (``arch/x86/kvm/vmx/vmx.c``) and ``npf_interception``
(``arch/x86/kvm/svm/svm.c``) build an error code and call ``kvm_mmu_page_fault``.

The walk starts at the vCPU's root and reads the tables by their "physical address" (the
pool index in a non-leaf SPTE).  KVM keeps upper levels at ACC_ALL (fast_page_fault's
comment), so only the leaf's permissions are checked.
"""
from ..errors import OutOfMemory
from ..pf import PF
from . import dirty_log, mmu
from .dirty_log import PML_ENTITY_NUM
from .mmu import (PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK,
                  PFERR_WRITE_MASK, PF_STATS)
from .spte import (PG_LEVEL_4K, PT_PAGE_SIZE_MASK, PT_PRESENT_MASK, PT_WRITABLE_MASK,
                   VMX_EPT_RWX_MASK, spte_index, spte_to_pfn)
from .tdp_iter import _kvm_tdp_mmu_write_spte, kvm_tdp_mmu_read_spte

#: The per-access code of ``access_batch`` for an access that completed without an exit.
ACCESS_HIT = 0

_EPT_READABLE = 1 << 0
_EPT_WRITABLE = 1 << 1
_EPT_EXECUTABLE = 1 << 2
_NPT_USER = 1 << 2
_NPT_NX = 1 << 63

# Outcomes of one walk.
WALK_PERMITTED = "permitted"
WALK_VIOLATION = "violation"      # EPT violation / #NPF on a not-present or forbidding entry
WALK_MISCONFIG = "misconfig"      # EPT misconfiguration / #NPF with RSVD


def reserved_pa_bits(kvm):
    """Physical-address bits host_maxphyaddr..51: reserved in a present entry."""
    return ((1 << 52) - 1) & ~((1 << kvm.host_maxphyaddr) - 1)


def hw_entry_present(kvm, spte):
    """EPT: any of R, W, X; NPT: P."""
    if kvm.layout.mode == "ept":
        return bool(spte & VMX_EPT_RWX_MASK)
    return bool(spte & PT_PRESENT_MASK)


def hw_entry_misconfigured(kvm, spte):
    """A present entry the CPU refuses to use: EPT W without R (KVM's MMIO value 0b110) or
    a reserved PA bit; NPT a reserved PA bit (KVM's MMIO marker, bit 51)."""
    if kvm.layout.mode == "ept" and spte & (_EPT_READABLE | _EPT_WRITABLE) == _EPT_WRITABLE:
        return True
    return bool(spte & reserved_pa_bits(kvm))


def hw_leaf_permits(kvm, spte, write, exec):  # noqa: A002 - the contract's name
    """The leaf's permission for the access.  NPT treats every guest-physical access as a
    user access (the U bit is required; KVM sets it on every SPTE)."""
    if kvm.layout.mode == "ept":
        if exec:
            return bool(spte & _EPT_EXECUTABLE)
        if write:
            return bool(spte & _EPT_WRITABLE)
        return bool(spte & _EPT_READABLE)
    if not spte & _NPT_USER:
        return False
    if exec:
        return not spte & _NPT_NX
    if write:
        return bool(spte & PT_WRITABLE_MASK)
    return True


def hw_walk(vcpu, gfn, write, exec):  # noqa: A002
    """One walk from the vCPU's root -> (outcome, sptep, spte) of the last entry read."""
    return hw_walk_level(vcpu, gfn, write, exec)[:3]


def hw_walk_level(vcpu, gfn, write, exec):  # noqa: A002
    """hw_walk, and the level of the last entry read: (outcome, sptep, spte, level)."""
    kvm = vcpu.kvm
    table = vcpu.root.spt
    level = vcpu.root.role.level
    while True:
        sptep = (table, spte_index(gfn, level))
        spte = kvm_tdp_mmu_read_spte(kvm.pool, sptep)
        if not hw_entry_present(kvm, spte):
            return WALK_VIOLATION, sptep, spte, level
        if hw_entry_misconfigured(kvm, spte):
            return WALK_MISCONFIG, sptep, spte, level
        if level > PG_LEVEL_4K and not spte & PT_PAGE_SIZE_MASK:
            table = spte_to_pfn(spte)
            level -= 1
            continue
        if hw_leaf_permits(kvm, spte, write, exec):
            return WALK_PERMITTED, sptep, spte, level
        return WALK_VIOLATION, sptep, spte, level


def hw_set_accessed_dirty(vcpu, gfn, sptep, spte, write):
    """The CPU sets A (and D on a write) in a leaf that uses hardware A/D bits: one atomic
    OR, only when a bit is missing.  KVM sees nothing of it (no handle_changed_spte).

    Page-modification logging (SDM vol. 3 "Page-Modification Logging"; on while a memslot
    is dirty-logged): setting a clear D first logs the access's 4K-aligned guest-physical
    address; with the 512-entry log full nothing is set and the CPU exits instead
    (returns False: a PML-full exit)."""
    kvm = vcpu.kvm
    L = kvm.layout
    if not L.accessed_mask or not L.spte_ad_enabled(spte):
        return True
    want = L.accessed_mask | (L.dirty_mask if write else 0)
    if spte & want == want:
        return True
    if write and not spte & L.dirty_mask and kvm.enable_pml and kvm.nr_memslots_dirty_logging:
        if len(vcpu.pml_buf) == PML_ENTITY_NUM:
            return False
        vcpu.pml_buf.append(gfn)
        vcpu.stat["pml_logged"] += 1
    # atomic OR (single-threaded: read, or, store)
    _kvm_tdp_mmu_write_spte(kvm.pool, sptep, kvm_tdp_mmu_read_spte(kvm.pool, sptep) | want)
    vcpu.stat["hw_ad_sets"] += 1
    return True


def hw_exit_error_code(kvm, outcome, spte, write, exec):  # noqa: A002
    """The error code KVM's exit handler passes to kvm_mmu_page_fault."""
    access = (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if exec else 0)
    if kvm.layout.mode == "ept":
        if outcome == WALK_MISCONFIG:
            return PFERR_RSVD_MASK                      # handle_ept_misconfig
        # handle_ept_violation: exit qualification bits 0-2 (the access), 3-5 (the
        # entry's RWX: any set -> PRESENT).
        code = access | (PFERR_USER_MASK if not (write or exec) else 0)
        if spte & VMX_EPT_RWX_MASK:
            code |= PFERR_PRESENT_MASK
        return code
    # npf_interception: the #NPF error code as the CPU reports it (a user access).
    code = access | PFERR_USER_MASK
    if outcome == WALK_MISCONFIG:
        return code | PFERR_PRESENT_MASK | PFERR_RSVD_MASK
    if spte & PT_PRESENT_MASK:
        code |= PFERR_PRESENT_MASK
    return code


def kvm_vcpu_access(vcpu, gfn, write, exec, counts=None):  # noqa: A002
    """The guest performs one access: enter, walk; a permitted access completes (A/D set
    by the CPU); else exit to KVM and, unless KVM emulates the access, re-execute it.

    Returns None when the first walk completed the access, else the PF of the last exit.
    With `counts`, each exit's result is added to it (and "fast" when fast_page_fault
    resolved it).  OutOfMemory from an entry or a fault propagates.
    """
    kvm = vcpu.kvm
    last = None
    while True:
        mmu.kvm_vcpu_enter_guest(vcpu)
        vcpu.stat["hw_walks"] += 1
        outcome, sptep, spte = hw_walk(vcpu, gfn, write, exec)
        if outcome == WALK_PERMITTED and hw_set_accessed_dirty(vcpu, gfn, sptep, spte, write):
            return last
        dirty_log.vmx_flush_pml_buffer(vcpu)        # every exit flushes the log first
        if outcome == WALK_PERMITTED:               # the log was full: handle_pml_full
            vcpu.stat["exits_pml_full"] += 1        # does nothing more; re-execute
            continue
        if outcome == WALK_MISCONFIG:
            vcpu.stat["exits_misconfig"] += 1
        else:
            vcpu.stat["exits_ept_violation"] += 1
        error_code = hw_exit_error_code(kvm, outcome, spte, write, exec)
        fast_before = vcpu.stat["faults_fast"]
        last = mmu.kvm_mmu_page_fault(vcpu, gfn, error_code)
        if counts is not None:
            counts[PF_STATS[last][len("faults_"):]] += 1
            counts["fast"] += vcpu.stat["faults_fast"] - fast_before
        if last == PF.EMULATE:
            return last   # the emulator performs the access (no hardware A/D)


def kvm_vcpu_access_batch(vcpu, gfns, accesses, out):
    """Every access in order (bit 0 write, bit 1 exec) -> counts: "hits" (no exit) and
    each exit's result.  OutOfMemory carries .completed."""
    counts = {"hits": 0, "fixed": 0, "spurious": 0, "retry": 0, "emulate": 0, "fast": 0}
    for k, (gfn, access) in enumerate(zip(gfns, accesses)):
        try:
            if k % mmu.KVM_BATCH_CHUNK == 0:
                mmu.kvm_vcpu_enter_guest(vcpu)
            ret = kvm_vcpu_access(vcpu, gfn, bool(access & 1), bool(access & 2), counts)
        except OutOfMemory as e:
            dirty_log.vmx_flush_pml_buffer(vcpu)    # the return to the VMM is an exit
            raise OutOfMemory(f"page pool exhausted after {k} accesses ({e})",
                              completed=k) from e
        if (k + 1) % mmu.KVM_BATCH_CHUNK == 0:
            dirty_log.vmx_flush_pml_buffer(vcpu)    # each chunk ends with a return to the VMM
        if ret is None:
            counts["hits"] += 1
        if out is not None:
            out[k] = ACCESS_HIT if ret is None else int(ret)
    dirty_log.vmx_flush_pml_buffer(vcpu)
    return counts


def kvm_vcpu_access_one(vcpu, gfn, write, exec):  # noqa: A002
    """vcpu.access: one access, then the return to the VMM (an exit: the PML log is
    flushed), also when the access failed."""
    try:
        return kvm_vcpu_access(vcpu, gfn, write, exec)
    finally:
        dirty_log.vmx_flush_pml_buffer(vcpu)
