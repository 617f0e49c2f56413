"""sf.GuestPageTables: x86-64 page tables built in guest memory (issue 12, point 1).

Expectations are the architectural formats, decoded here by a walker written from the
Intel SDM vol. 3 §4.5 (4-level and 5-level paging: CR3 -> PML5E/PML4E -> PDPTE -> PDE ->
PTE; PS in a PDPTE maps 1G, in a PDE 2M; P bit 0, R/W 1, U/S 2, A 5, D 6, PS 7, XD 63,
frame bits 12..51) that reads the tables only through ``vm.read_guest``, and the contract
of issue 12: intermediate entries are P|R/W|U/S, leaves are written with A/D clear unless
asked, each entry is written once per change.  On both implementations' VMs (the helper is
guest code and uses only the public Vm API).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spte_fast as sf

PFN0 = 0x100000
TABLES = (0x10, 0x30)


def sdm_walk(vm, cr3, gva, levels):
    """[(level, entry)] the processor reads for gva (no A/D set: a software walk)."""
    out, table = [], cr3 & ~0xFFF
    for level in range(levels, 0, -1):
        e = vm.read_guest(table + 8 * ((gva >> (12 + 9 * (level - 1))) & 511))
        out.append((level, e))
        if not e & 1 or level == 1 or (level in (2, 3) and e & 0x80):
            return out
        table = e & 0x000F_FFFF_FFFF_F000
    return out


def make(impl, levels=4, root_level=None):
    vm = impl.Vm(impl.SpteLayout.ept(), root_level=root_level or 4, max_pt_pages=64)
    vm.add_memslot(0, 1 << 14, PFN0)
    return vm, sf.GuestPageTables(vm, levels, table_gfns=TABLES)


class CountingVm:
    """A Vm seen through its public API, counting the guest-memory writes."""

    def __init__(self, vm):
        self._vm, self.entry_writes, self.page_writes = vm, [], 0

    def __getattr__(self, name):
        return getattr(self._vm, name)

    def write_guest(self, gpa, value):
        if isinstance(value, np.ndarray):
            self.page_writes += 1
        else:
            self.entry_writes.append((gpa, value))
        self._vm.write_guest(gpa, value)


def test_a_4k_mapping_is_four_entries_in_sdm_format(impl):
    vm, pt = make(impl)
    gva = 0x0000_7FFC_1234_5000
    pt.map(gva, 0x345, writable=False, user=True, nx=True)
    walk = sdm_walk(vm, pt.root_gpa, gva, 4)
    assert [lvl for lvl, _ in walk] == [4, 3, 2, 1]
    tables = [e & ~0xFFF for _, e in walk[:3]]
    assert all(e & 0xFFF == 0x7 and not e >> 52 for _, e in walk[:3])   # P|R/W|U/S only
    assert tables == [t << 12 for t in pt.tables[1:4]]
    assert walk[3][1] == (0x345 << 12) | 0x1 | 0x4 | (1 << 63)         # P|U/S|XD, no R/W
    assert pt.root_gpa == TABLES[0] << 12 and pt.tables[0] == TABLES[0]
    assert pt.lookup(gva + 0x678) == ((0x345 << 12) + 0x678, 1, walk[3][1])


@pytest.mark.parametrize("level,gva,gfn", [(2, 0xFFFF_8000_0040_0000, 0x800),
                                           (3, 0x0000_0040_0000_0000, 0x40000)])
def test_huge_pages_set_ps_and_end_the_walk(impl, level, gva, gfn):
    vm, pt = make(impl)
    pt.map(gva, gfn, level=level, accessed=True, dirty=True)
    walk = sdm_walk(vm, pt.root_gpa, gva, 4)
    assert walk[-1][0] == level
    assert walk[-1][1] == (gfn << 12) | 0x1 | 0x2 | 0x4 | 0x20 | 0x40 | 0x80
    off = 0x12345 if level == 2 else 0x1234567
    assert pt.lookup(gva + off) == ((gfn << 12) + off, level, walk[-1][1])


def test_five_levels_translate_57_bit_addresses(impl):
    vm, pt = make(impl, levels=5, root_level=5)
    gva = 0xFF12_3456_789A_B000                  # bit 56 set, canonical for LA57
    pt.map(gva, 0x77)
    walk = sdm_walk(vm, pt.root_gpa, gva, 5)
    assert [lvl for lvl, _ in walk] == [5, 4, 3, 2, 1] and walk[-1][1] == (0x77 << 12) | 0x7
    with pytest.raises(ValueError, match="canonical"):
        pt.map(0x0100_0000_0000_0000, 0x1)       # bit 56 set, 63..57 clear


def test_each_entry_is_written_once_per_change(impl):
    vm0, _ = make(impl)
    vm = CountingVm(vm0)
    pt = sf.GuestPageTables(vm, table_gfns=(0x100, 0x120))
    assert (vm.page_writes, vm.entry_writes) == (1, [])            # the root cleared
    pt.map(0x1000, 0x50)
    assert vm.page_writes == 4 and len(vm.entry_writes) == 4       # 3 tables + the leaf
    pt.map(0x2000, 0x51)
    assert vm.page_writes == 4 and len(vm.entry_writes) == 5       # the leaf only
    pt.map(0x2000, 0x51)
    assert len(vm.entry_writes) == 5                               # no change: no write
    pt.map(0x2000, 0x52, writable=False)                           # re-map: rewrite
    assert vm.entry_writes[-1] == ((0x103 << 12) + 8 * 2, (0x52 << 12) | 0x5)
    pt.protect(0x2000, writable=True, nx=True)
    assert vm.entry_writes[-1][1] == (0x52 << 12) | 0x7 | (1 << 63)
    assert pt.unmap(0x2000) is True and vm.entry_writes[-1] == ((0x103 << 12) + 16, 0)
    assert pt.unmap(0x2000) is False and len(vm.entry_writes) == 8
    assert pt.entries_written == 8


def test_conflicts_are_refused_and_change_nothing(impl):
    vm, pt = make(impl)
    pt.map(0x20_0000, 0x200, level=2)
    pt.map(0x40_1000, 0x1)
    before = vm.read_guest(TABLES[0] << 12, (TABLES[1] - TABLES[0]) * 512).tolist()
    with pytest.raises(ValueError, match="inside a 2M page"):
        pt.map(0x20_1000, 0x5)
    with pytest.raises(ValueError, match="page table maps the smaller pages"):
        pt.map(0x40_0000, 0x400, level=2)
    with pytest.raises(ValueError, match="not aligned"):
        pt.map(0x60_1000, 0x600, level=2)
    with pytest.raises(ValueError, match="aligned to the page"):
        pt.map(0x60_0000, 0x601, level=2)
    with pytest.raises(ValueError, match="canonical"):
        pt.map(0x0000_8000_0000_0000, 0x1)
    with pytest.raises(ValueError, match="not mapped"):
        pt.protect(0x80_0000, writable=False)
    with pytest.raises(ValueError, match="level"):
        pt.map(0x1000, 0x1, level=4)
    with pytest.raises(TypeError):
        pt.map(4096.0, 0x1)
    assert vm.read_guest(TABLES[0] << 12, (TABLES[1] - TABLES[0]) * 512).tolist() == before


def test_running_out_of_table_frames_writes_nothing(impl):
    vm = impl.Vm(impl.SpteLayout.npt(), max_pt_pages=64)
    vm.add_memslot(0, 1024, PFN0)
    pt = sf.GuestPageTables(vm, table_gfns=(0x10, 0x13))           # root + 2 tables
    with pytest.raises(sf.OutOfMemory):
        pt.map(0x1000, 0x1)                                        # needs 3
    assert vm.read_guest(0x10 << 12, 3 * 512).tolist() == [0] * (3 * 512)
    pt.map(0x20_0000, 0x200, level=2)                              # needs 2: fits
    assert pt.free_table_gfns == 0


def test_the_constructor_checks_its_arguments(impl):
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=64)
    vm.add_memslot(0, 64, PFN0)
    with pytest.raises(ValueError, match="not all in memslots"):
        sf.GuestPageTables(vm, table_gfns=(60, 70))
    with pytest.raises(ValueError, match="levels"):
        sf.GuestPageTables(vm, 3, table_gfns=(1, 4))
    with pytest.raises(ValueError, match="empty"):
        sf.GuestPageTables(vm, table_gfns=(4, 4))
    with pytest.raises(TypeError):
        sf.GuestPageTables(vm, table_gfns=5)
    other = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=64)
    with pytest.raises(ValueError, match="another VM"):
        sf.GuestPageTables(vm, table_gfns=(1, 8), direct_map=(other.vcpu(), 0xFFFF_8880_0000_0000))
    with pytest.raises(TypeError):
        sf.GuestPageTables(vm, table_gfns=(1, 8), direct_map=vm.vcpu())
    with pytest.raises(ValueError, match="canonical"):
        sf.GuestPageTables(vm, table_gfns=(1, 8), direct_map=(vm.vcpu(), 0x0000_8000_0000_0000))


# (hi, mid, 2M region, 4K page in it, level, gfn, writable, user, unmap): few regions and
# pages, so that 4K and 2M mappings of the same region meet.
_maps = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 3),
                           st.integers(0, 3), st.sampled_from([1, 1, 2]),
                           st.integers(0, 1 << 10), st.booleans(), st.booleans(),
                           st.booleans()), max_size=30)


@settings(max_examples=60, deadline=None)
@given(_maps)
def test_random_maps_against_a_model_of_the_mappings(fast, maps):
    """Random maps and unmaps against a model of what is mapped: a 4K map inside a mapped
    2M page and a 2M map over a 2M region that has a table (tables outlive their pages)
    are refused; every lookup then equals both the model and the SDM decode."""
    vm, pt = make(fast)
    pages, huge, tabled = {}, {}, set()        # gva -> (gfn, w, u); 2M region gvas
    touched = []
    for hi, mid, r, page, level, gfn, w, u, unmap in maps:
        gva = (hi << 39) | (mid << 30) | (r << 21) | (page << 12 if level == 1 else 0)
        region = gva & ~((1 << 21) - 1)
        gfn = gfn * 512 if level == 2 else gfn
        touched.append(gva)
        if unmap:
            want = region in huge or gva in pages
            assert pt.unmap(gva) is want
            huge.pop(region, None) if region in huge else pages.pop(gva, None)
            continue
        refused = region in huge if level == 1 else region in tabled
        try:
            pt.map(gva, gfn, writable=w, user=u, level=level)
        except ValueError:
            assert refused
            continue
        assert not refused
        if level == 1:
            pages[gva] = (gfn, w, u)
            tabled.add(region)
        else:
            huge[region] = (gfn, w, u)
    for gva in touched:
        region = gva & ~((1 << 21) - 1)
        got = pt.lookup(gva)
        walk = sdm_walk(vm, pt.root_gpa, gva, 4)
        for _lvl, e in walk[:-1]:
            assert e & 0xFFF == 0x7 and (e >> 12) in pt.tables
        if region in huge:
            gfn, w, u = huge[region]
            want = ((gfn << 12) + (gva - region), 2, (gfn << 12) | 0x81 | (2 * w) | (4 * u))
        elif gva in pages:
            gfn, w, u = pages[gva]
            want = (gfn << 12, 1, (gfn << 12) | 0x1 | (2 * w) | (4 * u))
        else:
            want = None
        assert got == want
        assert (walk[-1][0], walk[-1][1]) == ((want[1], want[2]) if want else
                                              (walk[-1][0], 0))


BASE = 0xFFFF_8880_0000_0000        # Linux's direct map (page_offset_base without KASLR)


def test_a_direct_map_guest_writes_its_tables_through_the_mmu(impl):
    """direct_map=(vcpu, base): all guest memory mapped at base with 2M pages (host side,
    the boot loader), the root in the vCPU's CR3, then every table access a load or store
    through the direct map: one per entry change, 512 stores to clear a new table, and the
    MMU sees each as a guest access (a walk, plus one re-execution per exit)."""
    vm = impl.Vm(impl.SpteLayout.ept(), max_level=1, max_pt_pages=64)
    vm.add_memslot(0, 2048, PFN0)                       # 8 MiB: 4 direct-map 2M pages
    v = vm.vcpu()
    pt = sf.GuestPageTables(vm, table_gfns=TABLES, direct_map=(v, BASE))
    assert v.cr3 == pt.root_gpa and pt.direct_map_base == BASE
    for gfn in (0, 0x200, 0x7FF):                       # (reading them sets A: the
        gpa, level, pte = pt.lookup(BASE + (gfn << 12) + 8)    # kernel loads its tables)
        assert (gpa, level, pte & ~0x60) == ((gfn << 12) + 8, 2, ((gfn & ~511) << 12) | 0x87)
    host = sf.GuestPageTables(make(impl)[0], table_gfns=TABLES)
    before = v.stats
    assert before["guest_walks"] > 0 and before["faults_fixed"] > 0   # the lookups above
    pt.map(0x7000, 0x123, writable=False)
    host.map(0x7000, 0x123, writable=False)
    after = v.stats
    new_tables = 3                                       # L3, L2, L1 for the low half
    loads = 1                                            # the root's entry: not present
    stores = 512 * new_tables + new_tables + 1           # clears, links, the leaf
    exits = after["faults_fixed"] - before["faults_fixed"]
    assert exits > 0
    assert after["guest_walks"] - before["guest_walks"] == loads + stores + exits
    assert pt.lookup(0x7008) == host.lookup(0x7008) == ((0x123 << 12) + 8, 1,
                                                          (0x123 << 12) | 0x5)
    # the guest's stores set the direct map's A and D bits, as a kernel's would
    assert pt.lookup(BASE + (TABLES[0] << 12))[2] & 0x60 == 0x60
