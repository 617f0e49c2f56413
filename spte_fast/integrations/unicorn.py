"""spte_fast as the MMU of unicorn, the CPU emulator (QEMU's TCG underneath).

In ``UC_TLB_VIRTUAL`` mode unicorn asks a ``UC_HOOK_TLB_FILL`` callback for every miss of
its software TLB: "which physical page backs this virtual page, and what may be done to
it?"  :func:`attach` answers those fills with a vCPU's hardware view: the fill is the page
walk a real CPU makes on a TLB miss -- the EPT/NPT walk from the vCPU's root with its A/D
assists, the EPT violations / #NPFs it raises and KVM's handling of them
(``kvm_mmu_page_fault``: the fast page fault, ``kvm_tdp_mmu_page_fault``, MMIO) -- and the
entry handed back carries the host physical address of the page (the SPTE's pfn) and the
permissions the leaf grants.  Like a real TLB the entry allows a write only once the leaf
is dirty where the layout tracks D, so the first write through a clean entry walks again
and sets D (and, with PML, logs the gfn).  Instruction fetches, loads and stores are those
of the machine code unicorn runs.

The emulator's physical address space is the host's: guest RAM lives at the host addresses
of its memslots (``pfn << 12`` for each slot), mapped into the ``Uc`` by :func:`attach`.
A program therefore reads and writes the pages the SPTEs point at, so a wrong translation
shows as a wrong result.  Load data with :meth:`Attachment.write` (the VMM's own access to
guest memory, invisible to the MMU, as on KVM).

Two callbacks answer the fills:

``callback="c"`` (default)
    ``spte_fast.integrations._unicorn.tlb_fill``, a Cython ``cdef`` function with unicorn's
    C signature, registered as a raw function pointer through unicorn's ctypes API.  Each
    fill calls ``vcpu_tlb_fill`` of the C embedding API: no Python object, no GIL (ctypes
    releases it around ``uc_emu_start``).  Needs a ``spte_fast.Vcpu``.
``callback="python"``
    A Python hook that uses only the public API: ``vcpu.access()`` then ``vm.lookup()``.
    Microseconds per fill, and it works with the pure-Python reference model's vCPUs too,
    so the two modes check each other.

A fill KVM cannot back with RAM is answered with a fault, which unicorn raises in the guest
as a page fault (``UcError(UC_ERR_EXCEPTION)`` unless the program handles interrupts):
an MMIO access (no memslot: KVM emulates it, and there is no device here), or an address
beyond the guest's physical address width.  :attr:`Attachment.fault` says which.
A failure of the model itself (``OutOfMemory`` when the page-table pool is exhausted)
stops the emulation and is raised by :meth:`Attachment.emu_start`.

KVM flushes TLBs when it changes SPTEs (zaps, write protection for dirty logging, aging).
:meth:`Attachment.emu_start` flushes unicorn's TLB before it starts when the VM counted a
flush since the last run.  The vCPU's own exits never need one here (6.10's TDP fault path
flushes only when a table gives way to a huge page, which needs the host's mapping level to
grow; its huge-page split keeps every translation and flushes nothing).  VM operations that
another thread makes *during* a run take effect at the next ``emu_start`` (real KVM would
kick the vCPU out of the guest).

With ``guest=None`` the guest runs with paging off: the virtual address unicorn asks
about is the guest-physical address.  With ``guest`` a guest paging model -- an object with
``root_gpa`` and ``levels``, such as :class:`spte_fast.GuestPageTables` -- attach loads its
root into the vCPU's CR3 and every fill is a guest-virtual access: the two-dimensional walk
through the guest's own tables and the TDP tables (``vcpu.access(gva)``), its exits, the
guest's A/D bits; the entry grants what both the guest's entries and the TDP leaf allow (a
write once the guest PTE and the leaf are dirty).  A gva the guest's tables do not map (or
do not permit) is a guest page fault, answered to unicorn as a fault.  The accesses are
user-mode (a process).  Shadow paging needs the shadow MMU, which does not exist yet.
"""
import ctypes

try:
    import unicorn as _uc
    from unicorn import unicorn_const as _const
    from unicorn.unicorn_py3 import unicorn as _ucmod
except ImportError as e:         # pragma: no cover - exercised only without the extra
    raise ImportError("spte_fast.integrations.unicorn needs unicorn: "
                      "pip install 'spte_fast[unicorn]'") from e

from .._core import GUEST_PAGE_FAULT
from ..errors import OutOfMemory, SpteError
from ..pf import PF
from . import _unicorn

__all__ = ["Attachment", "attach", "KINDS"]

#: The kinds of access, in the order of the per-kind counts (unicorn's UC_MEM_READ,
#: UC_MEM_WRITE and UC_MEM_FETCH are 16, 17 and 18).
KINDS = ("read", "write", "fetch")

_PAGE = 4096
_ENOMEM = 12


def _c_address(fn):
    return ctypes.cast(fn, ctypes.c_void_p).value


def hook_c(uc, htype, state):
    """Install one of _unicorn's C callbacks on ``uc``: uc_hook_add with its function
    pointer (``state.callback``) and raw user data (``state.user_data``), for every
    address.  Returns the hook handle for :func:`unhook_c`.  Keep ``state`` alive."""
    h = _ucmod.uc_hook_h()
    status = _ucmod.uclib.uc_hook_add(uc._uch, ctypes.byref(h), htype,
                                      ctypes.c_void_p(state.callback),
                                      ctypes.c_void_p(state.user_data),
                                      ctypes.c_uint64(1), ctypes.c_uint64(0))
    if status != _const.UC_ERR_OK:
        raise _uc.UcError(status)
    return h.value


def unhook_c(uc, handle):
    status = _ucmod.uclib.uc_hook_del(uc._uch, _ucmod.uc_hook_h(handle))
    if status != _const.UC_ERR_OK:
        raise _uc.UcError(status)


def _flush_tlb(uc):
    """uc_ctl_flush_tlb (the binding has no method for it)."""
    uc.ctl(_const.UC_CTL_TLB_FLUSH, _const.UC_CTL_IO_WRITE)


def _vm_flushes(vm):
    st = vm.stats
    return st["tlb_flushes"] + st["tlb_flushes_ranged"]


def _layout_perms(layout):
    """(bits to read, bits to write, bits to fetch, bits forbidding a fetch, D) of a
    layout's leaf as the CPU reads it: EPT R / W / X; NPT P|U for any access (nested walks
    are user accesses), W to write, NX forbids fetches."""
    if layout.mode == "ept":
        return 1, 2, layout.x_mask, 0, layout.dirty_mask
    pu = 1 | layout.user_mask
    return pu, pu | 2, pu, layout.nx_mask, layout.dirty_mask


class Attachment:
    """spte_fast answering one ``Uc``'s TLB fills for one vCPU (see :func:`attach`)."""

    def __init__(self, uc, vcpu, callback, guest=None):
        self.uc = uc
        self.vcpu = vcpu
        self.vm = vcpu.vm
        self.callback = callback
        self.guest = guest
        self._mapped = []                   # (host address, size) this attachment mapped
        self._hook = None
        self._fill = None                   # the C state (callback "c")
        self._py = None                     # the Python counts (callback "python")
        self._flushes_seen = _vm_flushes(self.vm)
        self._emulator_flushes = 0          # flushes of unicorn's TLB at emu_start
        self._fault = None
        self._error = None
        self._detached = False

    # -- memory ---------------------------------------------------------------------------

    def _map_memslots(self):
        """Map every memslot's host range that unicorn does not hold yet (RAM, all
        permissions: the SPTEs decide what the guest may do)."""
        regions = [(b, e) for b, e, _ in self.uc.mem_regions()]
        for _sid, _base, npages, pfn, _ro in self.vm.memslots:
            start, size = pfn * _PAGE, npages * _PAGE
            end = start + size - 1
            if any(b <= end and start <= e for b, e in regions):
                continue
            self.uc.mem_map(start, size, _const.UC_PROT_ALL)
            self._mapped.append((start, size))
            regions.append((start, end))

    def host_address(self, gpa):
        """The host physical address backing guest-physical ``gpa`` (its memslot's
        ``pfn << 12`` plus the offset): where the emulator keeps that byte."""
        gpa = int(gpa)
        for _sid, base, npages, pfn, _ro in self.vm.memslots:
            if base * _PAGE <= gpa < (base + npages) * _PAGE:
                return pfn * _PAGE + gpa - base * _PAGE
        raise ValueError(f"gpa {gpa:#x} is in no memslot")

    def _host_ranges(self, gpa, size):
        gpa, size = int(gpa), int(size)
        if gpa < 0 or size < 0:
            raise ValueError("gpa and size must be non-negative")
        self._check_attached()
        self._map_memslots()                # a memslot added since the last run
        while size > 0:
            start = self.host_address(gpa)
            for _sid, base, npages, pfn, _ro in self.vm.memslots:
                if pfn * _PAGE <= start < (pfn + npages) * _PAGE:
                    n = min(size, (pfn + npages) * _PAGE - start)
                    break
            yield start, n
            gpa += n
            size -= n

    def write(self, gpa, data):
        """The VMM writes guest memory (host side: no SPTE is touched)."""
        data = memoryview(data).cast("B")
        done = 0
        for host, n in self._host_ranges(gpa, len(data)):
            self.uc.mem_write(host, bytes(data[done:done + n]))
            done += n

    def read(self, gpa, size):
        """The VMM reads guest memory (host side)."""
        out = bytearray()
        for host, n in self._host_ranges(gpa, size):
            out += self.uc.mem_read(host, n)
        return bytes(out)

    # -- running ---------------------------------------------------------------------------

    def flush(self):
        """Flush unicorn's TLB (and its translation blocks)."""
        _flush_tlb(self.uc)
        self._emulator_flushes += 1

    def emu_start(self, begin, until, timeout=0, count=0):
        """``uc.emu_start`` after syncing the emulator with the VM: new memslots mapped, and
        its TLB flushed when KVM flushed since the last run.  Raises the model's error
        (e.g. ``OutOfMemory``) when a fill failed, else unicorn's own ``UcError``."""
        self._check_attached()
        self._map_memslots()
        flushes = _vm_flushes(self.vm)
        if flushes != self._flushes_seen:
            self._flushes_seen = flushes
            self.flush()
        if self._fill is not None:
            self._fill.reset_denied()
        self._fault = None
        try:
            self.uc.emu_start(begin, until, timeout, count)
        except _uc.UcError as e:
            self._raise_model_error(e)
            raise
        self._raise_model_error(None)

    def _raise_model_error(self, cause):
        if self._fill is not None:
            err = self._fill.take_error()
        else:
            err, self._error = self._error, None
        if err is None:
            return
        if isinstance(err, BaseException):
            raise err from cause
        code, gfn = err
        if code == -_ENOMEM:
            raise OutOfMemory(f"TLB fill of gfn {gfn:#x}: the page-table pool is exhausted "
                              "(Vm(max_pt_pages=...))") from cause
        raise SpteError(f"TLB fill of gfn {gfn:#x} failed ({code})") from cause

    # -- what happened --------------------------------------------------------------------

    @property
    def fault(self):
        """(address, kind, reason) of the first fill of the last run answered with a fault
        -- reason "emulated" (no memslot: KVM emulated the access), "beyond_address_width"
        or "model_error" -- or None.  (Later fills of that run are the CPU delivering the
        page fault, which a program without an IDT cannot take.)"""
        if self._fill is not None:
            f = self._fill.first_denied()
            return None if f is None else (f[0], KINDS[f[1]] if 0 <= f[1] < 3 else f[1], f[2])
        return self._fault

    @property
    def stats(self):
        """Fills answered, by kind; those whose access exited to KVM and those answered
        with a fault; flushes of the emulator's TLB."""
        if self._fill is not None:
            c = self._fill.counts()
            fills, exits, denied = c["fills"], c["exits"], c["denied"]
        else:
            fills, exits, denied = self._py["fills"], self._py["exits"], self._py["denied"]
        out = {"tlb_fills": sum(fills), "fill_exits": sum(exits),
               "fills_denied": sum(denied), "emulator_tlb_flushes": self._emulator_flushes}
        for i, k in enumerate(KINDS):
            out[f"tlb_fills_{k}"] = fills[i]
            out[f"fill_exits_{k}"] = exits[i]
            out[f"fills_denied_{k}"] = denied[i]
        return out

    # -- the Python callback ----------------------------------------------------------------

    def _python_fill(self, uc, vaddr, access, entry, _user_data):
        kind = access - _const.UC_MEM_READ
        c = self._py
        if not 0 <= kind < 3:
            self._deny_first(vaddr, kind, "bad_access_type")
            return False
        c["fills"][kind] += 1
        guest = self.guest is not None
        try:
            if guest:                        # a guest-virtual access: the 2D walk
                r = self.vcpu.access(vaddr, write=kind == 1, exec=kind == 2, user=True)
            else:
                r = self.vcpu.access(vaddr >> 12, write=kind == 1, exec=kind == 2)
        except ValueError:                  # beyond the guest's address width
            return self._deny(uc, vaddr, kind, "beyond_address_width")
        except SpteError as e:
            return self._deny(uc, vaddr, kind, "model_error", e)
        if r == GUEST_PAGE_FAULT:
            return self._deny(uc, vaddr, kind, "guest_page_fault")
        if r is not None:
            c["exits"][kind] += 1
        if r == PF.EMULATE:
            return self._deny(uc, vaddr, kind, "emulated")
        gfn, allowed = self._guest_final(vaddr) if guest else (vaddr >> 12, _const.UC_PROT_ALL)
        hit = self.vm.lookup(gfn)
        if hit is None:
            return self._deny(uc, vaddr, kind, "emulated")
        spte, level = hit
        pfn = self.vm.layout.spte_to_pfn(spte) + (gfn & ((1 << (9 * (level - 1))) - 1))
        entry.paddr = pfn * _PAGE
        entry.perms = self._perms(spte) & allowed
        return True

    def _guest_final(self, gva):
        """(the final gfn, what the guest's entries allow) after a completed guest access:
        W only with R/W at every level and a dirty PTE, X only without XD anywhere."""
        walk = self.vcpu.walk(gva)
        level, leaf = walk[-1]
        size = 1 << (12 + 9 * (level - 1))
        final = (leaf & 0x000F_FFFF_FFFF_F000 & ~(size - 1)) | (gva & (size - 1))
        allowed = _const.UC_PROT_ALL
        if any(e >> 63 for _, e in walk):
            allowed &= ~_const.UC_PROT_EXEC
        if not all(e & 2 for _, e in walk) or not leaf & 0x40:
            allowed &= ~_const.UC_PROT_WRITE
        return final >> 12, allowed

    def _deny(self, uc, vaddr, kind, reason, error=None):
        """Answer the fill with a fault; a model error also stops the run."""
        self._py["denied"][kind] += 1
        self._deny_first(vaddr, KINDS[kind], reason)
        if error is not None:
            if self._error is None:
                self._error = error
            uc.emu_stop()
        return False

    def _deny_first(self, vaddr, kind, reason):
        if self._fault is None:
            self._fault = (vaddr, kind, reason)

    def _perms(self, spte):
        need_r, need_w, need_x, nx, dirty = self._masks
        perms = 0
        if spte & need_r == need_r:
            perms |= _const.UC_PROT_READ
        if spte & need_w == need_w and (not dirty or spte & dirty):
            perms |= _const.UC_PROT_WRITE   # a clean entry: the first write walks again
        if spte & need_x == need_x and not spte & nx:
            perms |= _const.UC_PROT_EXEC
        return perms

    # -- lifetime --------------------------------------------------------------------------

    def _install(self):
        if self.guest is not None:          # ValueError for a bad root: before anything
            self.vcpu.set_cr3(self.guest.root_gpa, levels=self.guest.levels)
        self._map_memslots()
        if self.callback == "c":
            self._fill = _unicorn.TlbFill(self.vcpu, _c_address(_ucmod.uclib.uc_emu_stop),
                                          self.guest is not None, True)
            self._hook = hook_c(self.uc, _const.UC_HOOK_TLB_FILL, self._fill)
        else:
            self._masks = _layout_perms(self.vm.layout)
            self._py = {"fills": [0, 0, 0], "exits": [0, 0, 0], "denied": [0, 0, 0]}
            self._hook = self.uc.hook_add(_const.UC_HOOK_TLB_FILL, self._python_fill)
        self.uc.ctl_set_tlb_mode(_const.UC_TLB_VIRTUAL)
        self.flush()                        # nothing translated before attach survives

    def _check_attached(self):
        if self._detached:
            raise ValueError("this attachment was detached")

    def detach(self):
        """Restore the emulator: the hook removed, the TLB back to unicorn's own
        (UC_TLB_CPU) and flushed, the memory this attachment mapped unmapped."""
        self._check_attached()
        self._detached = True
        if self.callback == "c":
            unhook_c(self.uc, self._hook)
        else:
            self.uc.hook_del(self._hook)
        self.uc.ctl_set_tlb_mode(_const.UC_TLB_CPU)
        _flush_tlb(self.uc)
        for start, size in self._mapped:
            self.uc.mem_unmap(start, size)
        self._mapped = []
        if getattr(self.uc, "_spte_fast_attachment", None) is self:
            del self.uc._spte_fast_attachment

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._detached:
            self.detach()


def attach(uc, vcpu, *, guest=None, callback="c"):
    """Make ``vcpu``'s hardware view the MMU of unicorn engine ``uc``: switch it to
    ``UC_TLB_VIRTUAL``, map the VM's memslots at their host addresses, install the
    TLB-fill hook.  Returns an :class:`Attachment`; ``detach()`` undoes all of it.

    ``callback``: "c" (the GIL-free C callback; a ``spte_fast.Vcpu``) or "python" (the
    public API from Python; any vCPU with ``access`` and a ``vm`` with ``lookup``, the
    reference model's included).  ``guest``: None (paging off) or a guest paging model
    with ``root_gpa`` and ``levels`` (a GuestPageTables): its root goes into CR3."""
    if not isinstance(uc, _uc.Uc):
        raise TypeError(f"uc must be a unicorn.Uc, not {type(uc).__name__}")
    if callback not in ("c", "python"):
        raise ValueError(f"callback must be 'c' or 'python', not {callback!r}")
    if guest is not None and not (hasattr(guest, "root_gpa") and hasattr(guest, "levels")):
        raise TypeError(f"guest must be a guest paging model with root_gpa and levels (a "
                        f"spte_fast.GuestPageTables), not {type(guest).__name__}")
    if not hasattr(vcpu, "access") or not hasattr(vcpu, "vm"):
        raise TypeError(f"vcpu must be a spte_fast vCPU, not {type(vcpu).__name__}")
    if callback == "c":
        from .._core import Vcpu
        if not isinstance(vcpu, Vcpu):
            raise TypeError("callback='c' needs a spte_fast.Vcpu (the C engine); use "
                            "callback='python' for the reference model")
    if getattr(uc, "_spte_fast_attachment", None) is not None:
        raise ValueError("this Uc already has spte_fast attached: detach() it first")
    if uc.ctl_get_page_size() != _PAGE:
        raise ValueError(f"the emulator's page size is {uc.ctl_get_page_size()}, not 4096")
    a = Attachment(uc, vcpu, callback, guest)
    a._install()
    uc._spte_fast_attachment = a            # the hook's state lives as long as the Uc
    return a
