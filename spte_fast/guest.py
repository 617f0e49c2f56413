"""The guest's side: x86-64 page tables built in guest memory (issue 12, point 1).

:class:`GuestPageTables` is what a guest kernel's page-table code does -- allocate table
frames, link them, write PTEs -- with the tables in the VM's guest memory
(``vm.read_guest`` / ``vm.write_guest``), so that a vCPU's two-dimensional walk or a
shadowing KVM later finds them exactly as the guest wrote them.  It uses only the public
``Vm`` API, so it works with the engine and the reference model alike; it is guest code,
not part of either model.

Formats (Intel SDM vol. 3 §4.5 "4-level and 5-level paging", AMD APM vol. 2 §5.3): a table
is 512 64-bit entries; bit 0 P, 1 R/W, 2 U/S, 5 A, 6 D, 7 PS (a 1G page at level 3, a 2M
page at level 2), 63 XD/NX, the frame in bits 12..51.  The guest runs in long mode with
CR0.WP=1 and EFER.NX=1.  Intermediate entries are P|R/W|U/S (the leaf decides); a leaf is
written with A and D clear unless asked.  A virtual address must be canonical: bits 63..48
(63..57 with 5 levels) equal to bit 47 (56).
"""
import numpy as np

from ._core import GUEST_PAGE_FAULT
from .errors import OutOfMemory
from .pf import PF

PTE_P = 1 << 0
PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_NX = 1 << 63
PTE_FRAME = ((1 << 52) - 1) & ~0xFFF
PTE_TABLE = PTE_P | PTE_W | PTE_U          # what an intermediate entry holds besides the frame
LEVEL_PAGES = {1: 1, 2: 512, 3: 512 * 512}


def _index(gva, level):
    return (gva >> (12 + 9 * (level - 1))) & 511


class GuestPageTables:
    """x86-64 4- or 5-level page tables of a guest, in ``vm``'s guest memory.

    ``table_gfns=(first, end)``: the guest frames the tables come from (half-open, all in
    memslots); the root is the first.  Without ``direct_map`` the writes are the VMM's
    (``vm.write_guest``, host side), as a boot loader builds tables.  With
    ``direct_map=(vcpu, base_gva)`` it behaves like a guest kernel: it first maps all
    guest memory (every memslot, 2M pages) at ``base_gva`` host-side, as a boot loader
    builds Linux's direct map, loads its root into that vCPU's CR3, and from then on reads
    and writes every table entry through the direct map with ``vcpu.load`` /
    ``vcpu.store`` -- so the MMU sees exactly the accesses a real guest's page-table code
    makes (and a table page is cleared with 512 stores, as clear_page does).
    """

    def __init__(self, vm, levels=4, *, table_gfns, direct_map=None):
        if levels not in (4, 5) or isinstance(levels, bool):
            raise ValueError(f"levels must be 4 or 5, not {levels!r}")
        try:
            first, end = (int(x) for x in table_gfns)
        except (TypeError, ValueError):
            raise TypeError(f"table_gfns must be (first, end) gfns, not {table_gfns!r}") \
                from None
        if not 0 <= first < end:
            raise ValueError(f"table_gfns ({first:#x}, {end:#x}) is empty or negative")
        slots = [(base, base + n) for _sid, base, n, _pfn, _ro in vm.memslots]
        covered = sum(max(0, min(end, e) - max(first, b)) for b, e in slots)
        if covered != end - first:
            raise ValueError(f"table_gfns ({first:#x}, {end:#x}) is not all in memslots: "
                             "the tables must be guest RAM")
        self.vm = vm
        self.levels = levels
        self._next, self._end = first, end
        self.tables = []                # gfns of the tables, the root first
        self.entries_written = 0        # PTE writes (a table's clearing is not counted)
        self._vcpu = None               # the direct map's vCPU, once it is in use
        self._base = None
        if direct_map is not None:
            vcpu, base = self._check_direct_map(direct_map)
        self._new_table()                # the root
        if direct_map is not None:
            self.direct_map_base = base
            for _sid, b, n, _pfn, _ro in vm.memslots:        # the boot loader's work
                for gfn in range(b & ~511, b + n, 512):
                    self.map(base + (gfn << 12), gfn, level=2)
            vcpu.set_cr3(self.root_gpa, levels=levels)
            self._vcpu, self._base = vcpu, base

    # -- the guest's bookkeeping -------------------------------------------------------------

    @property
    def root_gfn(self):
        return self.tables[0]

    @property
    def root_gpa(self):
        """The root table's guest-physical address: what CR3 holds (no flag bits)."""
        return self.root_gfn << 12

    @property
    def free_table_gfns(self):
        return self._end - self._next

    def _check_direct_map(self, direct_map):
        try:
            vcpu, base = direct_map
        except (TypeError, ValueError):
            raise TypeError("direct_map must be (vcpu, base_gva)") from None
        if not (hasattr(vcpu, "store") and hasattr(vcpu, "set_cr3")):
            raise TypeError(f"direct_map's vcpu must be a vCPU, not {type(vcpu).__name__}")
        if vcpu.vm is not self.vm:
            raise ValueError("direct_map's vcpu belongs to another VM")
        base = self._check_gva(base, 2)
        top = max((b + n for _sid, b, n, _pfn, _ro in self.vm.memslots), default=0)
        self._check_gva(base + (((top + 511) & ~511) << 12) - (1 << 21), 2)
        return vcpu, base

    def _new_table(self):
        if self._next >= self._end:
            raise OutOfMemory(f"the guest's page-table frames {self.tables[0]:#x}.."
                              f"{self._end:#x} are used up")
        gfn, self._next = self._next, self._next + 1
        if self._vcpu is None:
            self.vm.write_guest(gfn << 12, np.zeros(512, dtype=np.uint64))   # clear_page
        else:
            for i in range(512):
                self._store((gfn << 12) + 8 * i, 0)
        self.tables.append(gfn)
        return gfn

    def _store(self, gpa, value):
        r = self._vcpu.store(self._base + gpa, value)
        if r == GUEST_PAGE_FAULT or r == PF.EMULATE:     # the direct map covers all RAM
            raise RuntimeError(f"the guest's store to its table at gpa {gpa:#x} did not "
                               f"complete ({r!r})")

    def _read(self, table, level, gva):
        gpa = (table << 12) + 8 * _index(gva, level)
        if self._vcpu is None:
            return self.vm.read_guest(gpa)
        value, r = self._vcpu.load(self._base + gpa)
        if value is None:
            raise RuntimeError(f"the guest's load of its table at gpa {gpa:#x} did not "
                               f"complete ({r!r})")
        return value

    def _write(self, table, level, gva, value, old):
        if value != old:                # an entry is written once per change
            gpa = (table << 12) + 8 * _index(gva, level)
            if self._vcpu is None:
                self.vm.write_guest(gpa, value)
            else:
                self._store(gpa, value)
            self.entries_written += 1

    def _check_gva(self, gva, level=None):
        if isinstance(gva, bool) or not isinstance(gva, (int, np.integer)):
            raise TypeError(f"gva must be an int, not {type(gva).__name__}")
        gva = int(gva)
        bits = 48 if self.levels == 4 else 57
        if not 0 <= gva < 1 << 64:
            raise ValueError(f"gva {gva:#x} is not a 64-bit address")
        top = gva >> (bits - 1)
        if top not in (0, (1 << (65 - bits)) - 1):
            raise ValueError(f"gva {gva:#x} is not canonical for {self.levels}-level paging "
                             f"(bits 63..{bits - 1} must be equal)")
        if level is not None and gva & ((LEVEL_PAGES[level] << 12) - 1):
            raise ValueError(f"gva {gva:#x} is not aligned to its {('4K', '2M', '1G')[level - 1]}"
                             " page")
        return gva

    def _path(self, gva, lowest=1):
        """[(table gfn, level, entry)] from the root down to the first entry that is not
        a present table (a leaf, or not present), or to the entry at ``lowest``."""
        out, table = [], self.root_gfn
        for level in range(self.levels, 0, -1):
            e = self._read(table, level, gva)
            out.append((table, level, e))
            if not e & PTE_P or level == lowest or (level <= 3 and e & PTE_PS):
                break
            table = (e & PTE_FRAME) >> 12
        return out

    # -- the operations -------------------------------------------------------------------------

    def map(self, gva, gfn, *, writable=True, user=True, nx=False, level=1, accessed=False,
            dirty=False):
        """Map the 4K, 2M (level 2) or 1G (level 3) page at ``gva`` to guest frame ``gfn``
        (aligned to the page), making the tables on the way.  A mapped gva is re-mapped:
        its PTE rewritten.  ValueError when a larger page maps gva or a table sits where
        the huge page would go; OutOfMemory when the table frames run out (nothing is
        written then)."""
        if level not in (1, 2, 3) or isinstance(level, bool):
            raise ValueError(f"level must be 1 (4K), 2 (2M) or 3 (1G), not {level!r}")
        gva = self._check_gva(gva, level)
        if isinstance(gfn, bool) or not isinstance(gfn, (int, np.integer)):
            raise TypeError(f"gfn must be an int, not {type(gfn).__name__}")
        gfn = int(gfn)
        if not 0 <= gfn < 1 << 40 or gfn % LEVEL_PAGES[level]:
            raise ValueError(f"gfn {gfn:#x} must be below 1 << 40 and aligned to the page")
        table, lvl, e = self._path(gva, level)[-1]
        if lvl > level and e & PTE_P:
            raise ValueError(f"gva {gva:#x} is inside a {('4K', '2M', '1G')[lvl - 1]} page: "
                             "unmap it first")
        if lvl == level and e & PTE_P and level > 1 and not e & PTE_PS:
            raise ValueError(f"a page table maps the smaller pages of gva {gva:#x}: a "
                             f"{('4K', '2M', '1G')[level - 1]} page cannot go there")
        if lvl - level > self.free_table_gfns:
            raise OutOfMemory(f"mapping gva {gva:#x} needs {lvl - level} new tables; "
                              f"{self.free_table_gfns} frames are left")
        while lvl > level:              # link the missing tables
            child = self._new_table()
            self._write(table, lvl, gva, (child << 12) | PTE_TABLE, e)
            table, lvl, e = child, lvl - 1, 0
        pte = (gfn << 12) | PTE_P
        pte |= (PTE_W if writable else 0) | (PTE_U if user else 0) | (PTE_NX if nx else 0)
        pte |= (PTE_A if accessed else 0) | (PTE_D if dirty else 0)
        pte |= PTE_PS if level > 1 else 0
        self._write(table, level, gva, pte, e)

    def _leaf(self, gva):
        """(table, level, entry) of the present leaf mapping gva, or None."""
        table, level, e = self._path(self._check_gva(gva))[-1]
        return (table, level, e) if e & PTE_P else None

    def unmap(self, gva):
        """Clear the PTE of the page mapping ``gva`` (any size): True, or False when none
        does.  Tables stay (Linux frees them only with the whole range)."""
        leaf = self._leaf(gva)
        if leaf is None:
            return False
        table, level, e = leaf
        self._write(table, level, gva, 0, e)
        return True

    def protect(self, gva, *, writable=None, user=None, nx=None):
        """Change the permissions of the page mapping ``gva`` (None: keep); ValueError when
        gva is not mapped."""
        leaf = self._leaf(gva)
        if leaf is None:
            raise ValueError(f"gva {gva:#x} is not mapped")
        table, level, e = leaf
        new = e
        for flag, bit in ((writable, PTE_W), (user, PTE_U), (nx, PTE_NX)):
            if flag is not None:
                new = new | bit if flag else new & ~bit
        self._write(table, level, gva, new, e)

    def lookup(self, gva):
        """The guest kernel's own walk: ``(gpa, level, pte)`` for ``gva``, or None when it
        is not mapped (no A/D bit is set: software does not set them)."""
        gva = self._check_gva(gva)
        leaf = self._leaf(gva)
        if leaf is None:
            return None
        _table, level, e = leaf
        size = LEVEL_PAGES[level] << 12
        return (e & PTE_FRAME & ~(size - 1)) | (gva & (size - 1)), level, e
