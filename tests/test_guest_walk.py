"""Guest-virtual accesses under TDP: the two-dimensional walk (issue 12, point 2).

Expectations come from the processor's rules (Intel SDM vol. 3 §4.5 "4-level and 5-level
paging", §4.6 "access rights", §4.8 "accessed and dirty flags", §29.3.2 "EPT translation"),
with the choices the manuals leave open taken from KVM's own model of the walk,
FNAME(walk_addr_generic) in arch/x86/kvm/mmu/paging_tmpl.h (6.10):

* guest paging-structure entries are read through the TDP tables as user *writes*
  (``nested_access = PFERR_WRITE_MASK | PFERR_USER_MASK``), so a walk dirties the TDP
  leaves of the guest's table pages;
* a not-present entry, a reserved bit, or a missing right (CR0.WP=1: writes need R/W at
  every level, also for the kernel; U/S at every level for user accesses; XD anywhere
  forbids fetches; no SMEP/SMAP) is a guest page fault, and then no A/D bit is set
  (``permission_fault`` goes to ``error`` before ``update_accessed_dirty_bits``);
* on success A is set in every entry walked, D in the leaf on a write;
* a walk reads, per guest level, the TDP entries translating the table's page and the guest
  entry, then the TDP entries of the final address: 4 x (4 + 1) + 4 = 24 references for
  4-level guest paging over 4-level EPT with 4K leaves.
Both implementations; a hypothesis state machine compares them on random guests.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spte_fast as sf
from support.tables import present_leaves

PFN0 = 0x100000
TABLES = (0x10, 0x40)
P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63


def guest(impl, layout="ept", levels=4, root_level=4, max_level=1, **kw):
    lay = impl.SpteLayout.npt() if layout == "npt" else impl.SpteLayout.ept(ad=layout != "ept_noad")
    vm = impl.Vm(lay, root_level=root_level, max_level=max_level, max_pt_pages=256, **kw)
    slot = vm.add_memslot(0, 1 << 14, PFN0, dirty_log=kw.get("pml") is not None)
    pt = sf.GuestPageTables(vm, levels, table_gfns=TABLES)
    v = vm.vcpu()
    v.set_cr3(pt.root_gpa, levels=levels)
    return vm, slot, pt, v


def entries(v, gva):
    return [e for _lvl, e in v.walk(gva)]


@pytest.mark.parametrize("layout", ["ept", "ept_noad", "npt"])
def test_a_first_access_exits_for_each_table_page_then_the_data(impl, layout):
    vm, _slot, pt, v = guest(impl, layout)
    gva = 0x0000_7FFC_1234_5678
    pt.map(gva & ~0xFFF, 0x900)
    assert v.access(gva) == sf.PF.FIXED             # the first exit's result
    st_ = v.stats
    # root, L3, L2, L1 table pages and the data page: one EPT violation each
    assert st_["exits_ept_violation"] == 5 and st_["faults_fixed"] == 5
    assert st_["guest_walks"] == 6                   # five re-executions, then the walk
    leaves = present_leaves(vm)
    assert sorted(leaves) == sorted(pt.tables) + [0x900]
    assert [e & (A | D) for e in entries(v, gva)] == [A, A, A, A]
    assert v.access(gva, write=True) is None         # no exit: D set by the CPU
    assert entries(v, gva)[-1] & D
    assert v.stats["guest_ad_sets"] == 5


@pytest.mark.parametrize("levels,root_level,max_level,refs", [
    (4, 4, 1, 24), (5, 4, 1, 29), (4, 5, 1, 29), (4, 4, 2, 19)])
def test_memory_references_per_walk(impl, levels, root_level, max_level, refs):
    """levels x (TDP entries + 1) + TDP entries: 24 for 4+4 levels with 4K TDP leaves; a
    2M TDP leaf makes each TDP walk 3 entries."""
    vm, _slot, pt, v = guest(impl, levels=levels, root_level=root_level,
                             max_level=max_level)
    gva = 0x1000
    pt.map(gva, 0x900, accessed=True, dirty=True)
    v.access(gva)
    before = v.stats
    assert v.access(gva) is None
    after = v.stats
    assert after["guest_walks"] - before["guest_walks"] == 1
    assert after["guest_walk_refs"] - before["guest_walk_refs"] == refs
    assert after["hw_walks"] - before["hw_walks"] == levels + 1


@pytest.mark.parametrize("flags,write,exec_,user,faults", [
    (dict(writable=False), True, False, True, True),       # R/W clear: no write
    (dict(writable=False), True, False, False, True),      # CR0.WP=1: not for the kernel
    (dict(writable=False), False, False, True, False),     # a read is fine
    (dict(user=False), False, False, True, True),          # U/S clear: no user access
    (dict(user=False), False, False, False, False),        # the kernel may
    (dict(user=True), False, False, False, False),         # no SMAP
    (dict(nx=True), False, True, False, True),             # XD: no fetch
    (dict(user=True), False, True, False, False),          # no SMEP
])
def test_access_rights(impl, flags, write, exec_, user, faults):
    vm, _slot, pt, v = guest(impl)
    pt.map(0x5000, 0x900, **flags)
    r = v.access(0x5000, write=write, exec=exec_, user=user)
    got = entries(v, 0x5000)
    if faults:
        assert r == sf.GUEST_PAGE_FAULT and v.stats["guest_faults"] == 1
        assert all(e & (A | D) == 0 for e in got)  # nothing set on a guest page fault
        assert 0x900 not in present_leaves(vm)       # the data page was never reached
    else:
        assert r == sf.PF.FIXED and v.stats["guest_faults"] == 0
        assert all(e & A for e in got) and bool(got[-1] & D) == write


def test_rights_accumulate_over_the_levels(impl):
    """An upper entry without R/W or U/S forbids it for the whole range below (SDM §4.6)."""
    vm, _slot, pt, v = guest(impl)
    pt.map(0x5000, 0x900)
    l2_table = (entries(v, 0x5000)[1] & ~0xFFF) >> 12      # the L3 entry points at it
    vm.write_guest((l2_table << 12) + 0, (entries(v, 0x5000)[2] & ~(W | U)))
    assert v.access(0x5000, write=True, user=False) == sf.GUEST_PAGE_FAULT
    assert v.access(0x5000, user=True) == sf.GUEST_PAGE_FAULT
    assert v.access(0x5000, user=False) == sf.PF.FIXED


@pytest.mark.parametrize("bad", ["not_present", "maxphyaddr", "ps_at_l4", "ps_reserved"])
def test_malformed_entries_are_guest_page_faults(impl, bad):
    vm, _slot, pt, v = guest(impl)
    pt.map(0x20_0000, 0x800, level=2)
    root = pt.root_gpa
    l4 = vm.read_guest(root)
    if bad == "not_present":
        pt.unmap(0x20_0000)
    elif bad == "maxphyaddr":                      # a frame bit at 46 (host MAXPHYADDR)
        vm.write_guest(root, l4 | (1 << 46))
    elif bad == "ps_at_l4":
        vm.write_guest(root, l4 | PS)
    else:                                          # bit 13 of a 2M leaf is reserved
        l2 = entries(v, 0x20_0000)[2]
        l2_page = (entries(v, 0x20_0000)[1] & ~0xFFF & ((1 << 52) - 1))
        vm.write_guest(l2_page + 8, l2 | (1 << 13))
    assert v.access(0x20_0000) == sf.GUEST_PAGE_FAULT


def test_a_2m_guest_page_translates_with_its_offset_and_gets_d(impl):
    vm, _slot, pt, v = guest(impl)
    pt.map(0x4000_0000, 0x1000, level=2)
    assert v.access(0x4000_0000 + 0x12345, write=True) == sf.PF.FIXED
    assert 0x1012 in present_leaves(vm)              # gfn 0x1000 + 0x12345 >> 12
    assert entries(v, 0x4000_0000)[-1] & (A | D | PS) == A | D | PS


def test_guest_table_accesses_are_writes_to_the_tdp_tables(impl):
    """After get_dirty_log re-protects the slot, a *read* still dirties every guest table
    page it walks (nested_access has PFERR_WRITE_MASK), and not the data page.  With PML
    the CPU logs them as it sets D; without, write protection makes each a fast page
    fault."""
    for pml in (True, False):
        vm, slot, pt, v = guest(impl, pml=pml)
        pt.map(0x1000, 0x900, accessed=True)
        v.access(0x1000)                                  # everything mapped
        vm.get_dirty_log(slot)
        fast = v.stats["faults_fast"]
        assert v.access(0x1000) == (None if pml else sf.PF.FIXED)
        log = vm.get_dirty_log(slot)
        dirty = {i for i in range(64 * len(log)) if int(log[i // 64]) >> (i % 64) & 1}
        assert dirty == set(pt.tables[:4]), pml
        assert v.stats["faults_fast"] - fast == (0 if pml else 4)


def test_table_pages_without_memory_are_a_guest_page_fault(impl):
    """CR3 at a gpa no memslot backs: the walk's first read exits, KVM makes an MMIO SPTE
    and emulates, and the emulator's own walk cannot read the entry: a #PF in the guest."""
    vm, _slot, pt, v = guest(impl)
    v.set_cr3(1 << 30)                                   # past the 64 MiB slot
    assert v.access(0x1000) == sf.GUEST_PAGE_FAULT
    assert v.stats["exits_ept_violation"] == 1 and v.stats["faults_emulate"] == 1
    assert v.access(0x1000) == sf.GUEST_PAGE_FAULT        # now an MMIO SPTE: misconfig
    assert v.stats["exits_misconfig"] == 1


def test_data_without_memory_is_emulated(impl):
    vm, _slot, pt, v = guest(impl)
    pt.map(0x2000, 0x900)
    pt.map(0x3000, 1 << 18)                              # a gfn past the slot: MMIO
    assert v.access(0x2000) == sf.PF.FIXED               # the table pages, then the data
    assert v.access(0x3000) == sf.PF.EMULATE             # only the final access exits
    assert all(e & A for e in entries(v, 0x3000))         # the emulator's walk sets A


def test_invlpg_under_tdp_changes_nothing(impl):
    """EPT / NPT guests run INVLPG without an exit (it is not intercepted under TDP), and
    the model keeps no guest TLB: every walk reads the tables."""
    from support.snapshots import snapshot
    vm, _slot, pt, v = guest(impl)
    pt.map(0x1000, 0x900)
    v.access(0x1000)
    before = snapshot(vm, [v])
    v.invlpg(0x1000)
    after = snapshot(vm, [v])
    assert np.array_equal(before.pop("pages"), after.pop("pages")) and after == before
    assert v.access(0x1000) is None
    with pytest.raises(ValueError, match="canonical"):
        v.invlpg(0x0000_8000_0000_0000)
    v.set_cr3(None)
    with pytest.raises(ValueError, match="paging off"):
        v.invlpg(0x1000)


def test_store_and_load_through_the_mmu(impl):
    """vcpu.store / vcpu.load: user-mode 8-byte MOVs -- the access with its exits, then the
    word lands in (or comes from) the page the translation reached."""
    vm, slot, pt, v = guest(impl)
    pt.map(0x7000, 0x900)
    assert v.store(0x7008, 0xDEAD) == sf.PF.FIXED        # first exit: a table page
    assert vm.read_guest((0x900 << 12) + 8) == 0xDEAD
    assert v.load(0x7008) == (0xDEAD, None)
    assert entries(v, 0x7008)[-1] & D                     # the store dirtied the PTE
    assert v.store(0x8000, 1) == sf.GUEST_PAGE_FAULT       # not mapped: nothing written
    assert v.load(0x8000) == (None, sf.GUEST_PAGE_FAULT)
    pt.protect(0x7000, writable=False)
    assert v.store(0x7008, 2) == sf.GUEST_PAGE_FAULT
    assert vm.read_guest((0x900 << 12) + 8) == 0xDEAD
    with pytest.raises(ValueError, match="aligned"):
        v.store(0x7004, 1)
    with pytest.raises(ValueError, match="canonical"):
        v.load(0x0000_8000_0000_0000)
    v.set_cr3(None)                                       # paging off: gpas
    assert v.store(0x900 << 12, 7) is None                # mapped by the walk above
    assert v.load(0x900 << 12) == (7, None)
    assert v.store(1 << 30, 5) == sf.PF.EMULATE            # no memslot: MMIO, no RAM
    assert v.load(1 << 30) == (None, sf.PF.EMULATE)
    with pytest.raises(ValueError):
        v.load(1 << 48)


@pytest.mark.parametrize("layout", ["ept_noad", "npt"])
def test_access_batch_is_the_accesses_one_by_one(impl, layout):
    """With guest paging access_batch takes uint64 gvas; without PML (whose log a batch
    flushes per chunk, a single access after each) it is access() in a loop: the same codes
    in ``out`` (0, the PF of the first exit, or GUEST_PAGE_FAULT) and the same stats."""
    rng = np.random.default_rng(3)
    sides = []
    for batch in (True, False):
        vm, _slot, pt, v = guest(impl, layout)
        for i in range(0, 64, 3):
            pt.map(i << 12, 0x900 + i, writable=i % 2 == 0, nx=i % 5 == 0)
        gvas = (rng.integers(0, 64, 400, dtype=np.uint64) << np.uint64(12)) + \
            np.uint64(8) * rng.integers(0, 512, 400, dtype=np.uint64)
        kinds = rng.integers(0, 3, 400, dtype=np.uint8)
        rng = np.random.default_rng(3)
        if batch:
            codes = np.full(400, -1, dtype=np.int8)
            res = v.access_batch(gvas, kinds, out=codes)
            codes = codes.tolist()
        else:
            codes = []
            for g, k in zip(gvas.tolist(), kinds.tolist()):
                r = v.access(g, write=k == 1, exec=k == 2)
                codes.append(0 if r is None else int(r))
        sides.append((codes, vm.stats, present_leaves(vm)))
        if batch:
            assert res["hits"] == codes.count(0) and res["guest_faults"] == codes.count(14)
            assert res["guest_faults"] > 0 and res["fixed"] > 0
    assert sides[0] == sides[1]


def test_access_batch_with_paging_checks_its_arguments(impl):
    vm, _slot, pt, v = guest(impl)
    with pytest.raises(TypeError):
        v.access_batch(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="canonical"):
        v.access_batch(np.array([0x1000, 0x0000_8000_0000_0000], dtype=np.uint64))
    with pytest.raises(ValueError):
        v.access_batch(np.zeros(3, dtype=np.uint64), np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError):
        v.access_batch(np.zeros(3, dtype=np.uint64), np.full(3, 3, dtype=np.uint8))
    assert v.stats["guest_walks"] == 0


def test_set_cr3_and_addresses_are_checked(impl):
    vm, _slot, pt, v = guest(impl)
    for bad, exc in ((0x1001, ValueError), (1 << 46, ValueError), (-1, ValueError),
                     (1.0, TypeError)):
        with pytest.raises(exc):
            v.set_cr3(bad)
    with pytest.raises(ValueError):
        v.set_cr3(0x1000, levels=3)
    assert v.cr3 == pt.root_gpa and v.guest_levels == 4
    with pytest.raises(ValueError, match="canonical"):
        v.access(0x0000_8000_0000_0000)
    with pytest.raises(ValueError, match="canonical"):
        v.walk(0x0001_0000_0000_0000)
    with pytest.raises(ValueError):
        v.access(0x1000, write=True, exec=True)
    assert v.access(0xFFFF_8000_0000_0000) == sf.GUEST_PAGE_FAULT   # canonical, unmapped
    v.set_cr3(None)
    assert v.cr3 is None
    assert v.access(5) == sf.PF.FIXED                    # a gfn again
    with pytest.raises(ValueError, match="paging off"):
        v.walk(0x1000)


# -- engine and oracle ---------------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 15), st.integers(0, 63),
              st.sampled_from([1, 1, 2]), st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, 15)),
    st.tuples(st.just("access"), st.integers(0, 15), st.integers(0, 4095),
              st.integers(0, 2), st.booleans()),
    st.tuples(st.just("zap")),
    st.tuples(st.just("zap_all")),
    st.tuples(st.just("dirty")),
    st.tuples(st.just("store"), st.integers(0, 15), st.integers(0, 511),
              st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("load"), st.integers(0, 15), st.integers(0, 511)),
    st.tuples(st.just("batch"), st.lists(st.tuples(st.integers(0, 15), st.integers(0, 511),
                                                   st.integers(0, 2)), max_size=20)),
)


def _gva(i):
    """16 virtual pages spread over the tree: different L4/L3/L2 entries, shared tables."""
    return ((i & 3) << 39) | (((i >> 2) & 1) << 30) | (((i >> 3) & 1) << 21)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["ept", "ept_noad", "npt"]), st.sampled_from([1, 2]),
       st.sampled_from([None, False, True]), st.lists(_op, min_size=15, max_size=40))
def test_engine_and_oracle_walk_the_same(fast, reference, layout, max_level, pml, ops):
    """Random guest mappings, guest-virtual accesses, zaps and dirty-log harvests (PML, or
    write protection) on both: every result, every stat, every SPTE and every word of the
    guest's tables agree."""
    if pml and layout != "ept":
        pml = False                                  # PML is EPT with A/D only
    sides = [guest(impl, layout, max_level=max_level, pml=pml) for impl in (fast, reference)]
    for op in ops:
        out = []
        for vm, slot, pt, v in sides:
            if op[0] == "map":
                gfn = op[2] * (512 if op[3] == 2 else 1) + 0x800
                try:
                    pt.map(_gva(op[1]), gfn, level=op[3], writable=op[4], user=op[5], nx=op[6])
                    out.append(None)
                except ValueError:
                    out.append("refused")
            elif op[0] == "unmap":
                out.append(pt.unmap(_gva(op[1])))
            elif op[0] == "access":
                kind = op[3]
                r = v.access(_gva(op[1]) + 8 * (op[2] // 8), write=kind == 1, exec=kind == 2,
                             user=op[4])
                out.append(None if r is None else int(r))
            elif op[0] == "zap":
                out.append(vm.zap_gfn_range(0, 1 << 14))
            elif op[0] == "zap_all":
                out.append(vm.zap_all())
            elif op[0] == "store":
                r = v.store(_gva(op[1]) + 8 * op[2], op[3])
                out.append(None if r is None else int(r))
            elif op[0] == "load":
                val, r = v.load(_gva(op[1]) + 8 * op[2])
                out.append((val, None if r is None else int(r)))
            elif op[0] == "batch":
                gvas = np.array([_gva(i) + 8 * off for i, off, _k in op[1]], dtype=np.uint64)
                kinds = np.array([k for _i, _o, k in op[1]], dtype=np.uint8)
                codes = np.zeros(len(op[1]), dtype=np.int8)
                res = v.access_batch(gvas, kinds, out=codes)
                out.append((res, codes.tolist()))
            else:
                out.append(vm.get_dirty_log(slot).tolist() if pml is not None else None)
        assert out[0] == out[1], op
    (fv, _, fpt, fc), (rv, _, rpt, rc) = sides
    assert fv.stats == rv.stats
    assert fc.stats == rc.stats
    assert present_leaves(fv) == present_leaves(rv)
    n = (TABLES[1] - TABLES[0]) * 512
    assert np.array_equal(fv.read_guest(TABLES[0] << 12, n), rv.read_guest(TABLES[0] << 12, n))
    # the data pages a store can reach: the first page of every frame a map can name
    for gfn in sorted({0x800 + i for i in range(64)} | {0x800 + 512 * k for k in range(27)}):
        assert np.array_equal(fv.read_guest(gfn << 12, 512), rv.read_guest(gfn << 12, 512))
    fv.audit()
