"""The CPU's two-dimensional walk: a guest-virtual access of a guest with paging on, under
TDP (EPT / NPT).

Not KVM code: what the processor does (Intel SDM vol. 3 §4.5 "4-level and 5-level paging",
§4.6 "access rights", §4.8 "accessed and dirty flags", §29.3.2 "EPT translation
mechanism"; AMD APM vol. 2 §5.3, §15.25 "nested paging").  Each guest paging-structure
entry is read at a guest-physical address, and that address is translated through the TDP
tables first (an EPT violation / #NPF there is a real exit); then the final guest-physical
address is translated for the access itself.  KVM's own model of this walk,
``FNAME(walk_addr_generic)`` in arch/x86/kvm/mmu/paging_tmpl.h, fixes the choices the
manuals leave open, and this module follows it:

* the accesses to guest paging structures go through the TDP tables as user writes
  (``nested_access = PFERR_WRITE_MASK | PFERR_USER_MASK``: x86-64 guest entries have A/D
  bits the walk may set), with PFERR_GUEST_PAGE_MASK in the exit's error code; the final
  access as itself, with PFERR_GUEST_FINAL_MASK;
* order: the entries are read top down (a not-present entry or a reserved bit ends the
  walk with a guest page fault); the access rights are checked (CR0.WP=1, EFER.NX=1, no
  SMEP/SMAP: a user access needs U/S at every level, a write R/W at every level, a fetch
  no XD at any level); the final address is translated; then A is set in every entry and
  D in the leaf on a write, where clear -- none of them on a guest page fault;
* an exit lets KVM handle it (``kvm_mmu_page_fault``) and the guest re-executes the whole
  access; KVM emulating a paging-structure access (no memslot behind it) ends the access
  with a guest page fault (the emulator's own walk cannot read the entry).

A guest page fault is the guest's (#PF delivered in the guest, no exit under TDP):
``GUEST_PAGE_FAULT``, counted as ``guest_faults``.
"""
from ..errors import OutOfMemory
from ..pf import PF
from . import dirty_log, hw, mmu
from .mmu import PF_STATS

#: What ``access`` returns when the guest takes a page fault (the #PF vector).
GUEST_PAGE_FAULT = 14
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33

PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
PTE_NX = 1 << 63
_FRAME = ((1 << 52) - 1) & ~0xFFF


def _index(gva, level):
    return (gva >> (12 + 9 * (level - 1))) & 511


def _reserved(kvm, pte, level, levels):
    """Reserved bits of a present entry (SDM §4.5, table 4-15 on): address bits at or above
    MAXPHYADDR (the guest's = the host's), PS at the top levels, and the low frame bits of a
    2M / 1G page (bit 12 is PAT there)."""
    maxphy = kvm.host_maxphyaddr
    if pte & _FRAME & ~((1 << maxphy) - 1):
        return True
    if level >= 4 and pte & PTE_PS:
        return True
    if level in (2, 3) and pte & PTE_PS:
        low = ((1 << (9 * (level - 1))) - 1) << 12
        return bool(pte & low & ~(1 << 12))
    return False


class _Restart(Exception):
    """An exit was handled: the guest re-executes the access from the start."""


class _GuestFault(Exception):
    """The guest takes a page fault."""


def _translate(vcpu, gpa, write, exec, extra, w):  # noqa: A002
    """The TDP walk of one guest-physical address: the host pfn backing it.  Raises
    _Restart after an exit KVM handled, _GuestFault when KVM emulated a paging-structure
    access."""
    kvm = vcpu.kvm
    gfn = gpa >> 12
    if gfn >= kvm.gfn_limit:
        raise _GuestFault()
    vcpu.stat["hw_walks"] += 1
    outcome, sptep, spte, level = hw.hw_walk_level(vcpu, gfn, write, exec)
    w["refs"] += vcpu.root.role.level - level + 1
    if outcome == hw.WALK_PERMITTED and hw.hw_set_accessed_dirty(vcpu, gfn, sptep, spte, write):
        return kvm.layout.spte_to_pfn(spte) + (gfn & ((1 << (9 * (level - 1))) - 1))
    dirty_log.vmx_flush_pml_buffer(vcpu)
    if outcome == hw.WALK_PERMITTED:                # PML full: re-execute
        vcpu.stat["exits_pml_full"] += 1
        raise _Restart()
    if outcome == hw.WALK_MISCONFIG:
        vcpu.stat["exits_misconfig"] += 1
    else:
        vcpu.stat["exits_ept_violation"] += 1
    code = hw.hw_exit_error_code(kvm, outcome, spte, write, exec) | extra
    fast_before = vcpu.stat["faults_fast"]
    r = mmu.kvm_mmu_page_fault(vcpu, gfn, code)
    if w["counts"] is not None:
        w["counts"][PF_STATS[r][len("faults_"):]] += 1
        w["counts"]["fast"] += vcpu.stat["faults_fast"] - fast_before
    if w["first"] is None:
        w["first"] = r
    if r == PF.EMULATE:
        if extra == PFERR_GUEST_PAGE_MASK:
            raise _GuestFault()
        return None                                 # the emulator did the final access
    raise _Restart()


def _walk(vcpu, gva, write, exec, user, w):  # noqa: A002
    """One execution of the access; the guest entries walked, A/D set at the end."""
    kvm = vcpu.kvm
    levels = vcpu.guest_levels
    table = vcpu.guest_cr3 & _FRAME
    walked = []                                     # (host pfn, word index, entry)
    w_ok = u_ok = True
    xd = False
    vcpu.stat["guest_walks"] += 1
    for level in range(levels, 0, -1):
        gpa = table + 8 * _index(gva, level)
        pfn = _translate(vcpu, gpa, True, False, PFERR_GUEST_PAGE_MASK, w)
        page = kvm.host_memory.get(pfn)
        pte = page[(gpa >> 3) & 511] if page is not None else 0
        w["refs"] += 1
        walked.append((pfn, (gpa >> 3) & 511, pte))
        if not pte & PTE_P or _reserved(kvm, pte, level, levels):
            raise _GuestFault()
        w_ok = w_ok and bool(pte & PTE_W)
        u_ok = u_ok and bool(pte & PTE_U)
        xd = xd or bool(pte & PTE_NX)
        if level == 1 or (level in (2, 3) and pte & PTE_PS):
            break
        table = pte & _FRAME
    if (user and not u_ok) or (write and not w_ok) or (exec and xd):
        raise _GuestFault()
    size = 1 << (12 + 9 * (level - 1))
    final = (pte & _FRAME & ~(size - 1)) | (gva & (size - 1))
    extra = PFERR_GUEST_FINAL_MASK
    _translate(vcpu, final, write, exec, extra, w)
    for i, (pfn, index, e) in enumerate(walked):
        want = PTE_A | (PTE_D if write and i == len(walked) - 1 else 0)
        if e & want != want:                        # a locked OR into guest memory
            page = kvm.host_memory.setdefault(pfn, [0] * 512)
            page[index] |= want
            vcpu.stat["guest_ad_sets"] += 1


def _guest_access(vcpu, gva, write, exec, user, counts):  # noqa: A002
    """The guest's access to gva, re-executed after every exit KVM handled: None (no
    exit), GUEST_PAGE_FAULT, or the PF of the first exit.  No return to the VMM."""
    w = {"refs": 0, "first": None, "counts": counts}
    try:
        while True:
            mmu.kvm_vcpu_enter_guest(vcpu)
            try:
                _walk(vcpu, gva, write, exec, user, w)
                return w["first"]
            except _Restart:
                continue
            except _GuestFault:
                vcpu.stat["guest_faults"] += 1
                return GUEST_PAGE_FAULT
    finally:
        vcpu.stat["guest_walk_refs"] += w["refs"]


def kvm_vcpu_guest_access(vcpu, gva, write, exec, user, counts=None):  # noqa: A002
    """vcpu.access with paging on: the access, then the return to the VMM (an exit: the
    PML log is flushed)."""
    try:
        return _guest_access(vcpu, gva, write, exec, user, counts)
    finally:
        dirty_log.vmx_flush_pml_buffer(vcpu)


def kvm_vcpu_guest_access_batch(vcpu, gvas, accesses, out):
    """access_batch with paging on: every access in order (0 read, 1 write, 2 fetch), as
    kvm_vcpu_access_batch runs them (a return to the VMM every KVM_BATCH_CHUNK)."""
    counts = {"hits": 0, "fixed": 0, "spurious": 0, "retry": 0, "emulate": 0, "fast": 0,
              "guest_faults": 0}
    for k, (gva, access) in enumerate(zip(gvas, accesses)):
        try:
            ret = _guest_access(vcpu, gva, access == 1, access == 2, True, counts)
        except OutOfMemory as e:
            dirty_log.vmx_flush_pml_buffer(vcpu)
            raise OutOfMemory(f"page pool exhausted after {k} accesses ({e})",
                              completed=k) from e
        if (k + 1) % mmu.KVM_BATCH_CHUNK == 0:
            dirty_log.vmx_flush_pml_buffer(vcpu)
        if ret is None:
            counts["hits"] += 1
        elif ret == GUEST_PAGE_FAULT:
            counts["guest_faults"] += 1
        if out is not None:
            out[k] = 0 if ret is None else int(ret)
    dirty_log.vmx_flush_pml_buffer(vcpu)
    return counts


def guest_walk_entries(vcpu, gva):
    """[(level, entry)] from the guest's CR3 down to the first entry that is not a present
    table (a software walk through the VMM's view of guest memory: nothing is set)."""
    kvm = vcpu.kvm
    out, table = [], vcpu.guest_cr3 & _FRAME
    from .guest_memory import kvm_read_guest
    for level in range(vcpu.guest_levels, 0, -1):
        gpa = table + 8 * _index(gva, level)
        try:
            pte = kvm_read_guest(kvm, gpa, 1)[0]
        except ValueError:
            return out
        out.append((level, pte))
        if not pte & PTE_P or level == 1 or (level in (2, 3) and pte & PTE_PS):
            return out
        table = pte & _FRAME
    return out
