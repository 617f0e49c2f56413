"""KVM_MMU_SPEC.md §6 items 8-24 on the TDP MMU engine, one test per item that the model
makes observable (STYLE.md §3.2: ``test_invN_...``), and what ``vm.audit()`` checks (docs/API.md
``vm.audit()``), on both implementations.

The page tables are read straight out of ``vm.pool.pages`` and decoded with the spec's bit
positions (tests/support/tables.py), so these checks do not trust the engine's own walker,
predicates or audit.  Randomised tests use the ``seed`` fixture (SPTE_FAST_TEST_SEED=all
runs seeds 0..99).

Items not covered here, and why:
* 1-7 (memory cache): test_mmu_cache.py.  11, 12, 14, 15, 17 as constructor properties:
  test_spte.py; the engine part of 14 (gfn and generation of installed MMIO SPTEs) is
  ``test_inv14_...`` below.
* 19 (a fault meeting a FROZEN entry returns RETRY without allocating): no public
  operation leaves a frozen entry in a linked table (the atomic zap stores the
  non-present value before it returns, and pool memory is read-only to users), so the
  path cannot be driven from outside.  What is observable, that no frozen value is ever
  left at rest in a linked table after any operation, is checked by items 9 and 10.
* 23 (iterator pre-order, re-read before stepping down, yield/restart): single-threaded
  and without yielding, every public operation's end state (SPTEs, stats, pool states,
  freed tables' contents) is the same for any visiting order; nothing observable
  distinguishes pre-order.
* 25-30: dirty logging, aging, eager split, NX recovery, shadow MMU: not in this API.
"""
import numpy as np
import pytest

from support.layouts import (
    LAYOUT_KINDS,
    NONPRESENT_VALUES,
    expected_nonleaf,
    leaf_spte,
    load_root,
    make_vm,
)
from support.snapshots import stat_delta
from support.spec import (
    ACC_ALL,
    BIT_AD_DISABLED,
    BIT_PRESENT,
    BIT_PS,
    ENT,
    NP63,
    PAGES_1G,
    PAGES_2M,
    PF_EMULATE,
    PF_FIXED,
    PF_RETRY,
    PFN0,
    child_of,
    pages_per,
)
from support.tables import (
    check_allowed_values,
    entries,
    leaf_slots,
    linked_tables,
    present_leaves,
    table_page,
    tables_content,
)


G1 = PAGES_1G
RO_BASE = 3 * PAGES_1G
ODD_BASE = 2 * PAGES_1G + 1


# ------------------------------------------------------------------------------------------
# a random workload
# ------------------------------------------------------------------------------------------


#: gfns near 2M / 1G boundaries, inside the slots below and outside every slot
ANCHORS = [0, 1, 511, 512, 513, 1023, 5 * PAGES_2M, PAGES_1G - 1, PAGES_1G, PAGES_1G + 1,
           PAGES_1G + PAGES_2M - 1, ODD_BASE, ODD_BASE + 511, ODD_BASE + 600, RO_BASE,
           RO_BASE + 3, 4 * PAGES_1G + 7, 1 << 27, (1 << 27) + PAGES_1G]


def build_vm(impl, kind, nonpresent, nx=False, root_level=4, max_pt_pages=512):
    """Slots: [0, 2G) 1G-aligned (huge pages up to 1G), [2G+1, +1000) misaligned (4K only),
    [3G, 3G+1024) read-only.  4G and beyond: MMIO."""
    vm, layout = make_vm(impl, kind, nonpresent, nx_huge_pages=nx, root_level=root_level,
                         max_pt_pages=max_pt_pages)
    vm.add_memslot(0, 2 * PAGES_1G, PFN0)
    vm.add_memslot(ODD_BASE, 1000, 4 * PFN0 + 3)
    vm.add_memslot(RO_BASE, 1024, 5 * PFN0, readonly=True)
    return vm, layout


def random_gfn(rng):
    return int(ANCHORS[rng.integers(len(ANCHORS))] + rng.integers(0, 3) * 512
               + rng.integers(0, 3))


def random_ops(impl, vm, vcpus, rng, n, check_zap=None):
    """Apply n random operations; returns the set of gfns touched.  ``check_zap(kind,
    before_leaves, args, ret)`` is called after every zap."""
    touched = set()
    for _ in range(n):
        op = int(rng.integers(100))
        gfn = random_gfn(rng)
        touched.add(gfn)
        vcpu = vcpus[int(rng.integers(len(vcpus)))]
        if op < 60:
            try:
                vcpu.fault(gfn, write=bool(rng.integers(2)), exec=bool(rng.integers(2)))
            except impl.OutOfMemory:
                pass
            continue
        before = leaf_slots(vm) if check_zap is not None else None
        ret = None
        if op < 70:
            span = int([1, 2, 512, 513, PAGES_1G][rng.integers(5)])
            args = (gfn, gfn + span)
            ret = vm.zap_gfn_range(*args)
            kind = "range"
        elif op < 80:
            args = (gfn, int(rng.integers(1, vm.root_level + 1)))
            ret = vm.zap_spte_atomic(*args)
            kind = "atomic"
        elif op < 88:
            args = (gfn, int(rng.integers(1, vm.root_level)))
            ret = vm.zap_sp(*args)
            kind = "sp"
        elif op < 90:
            args = ()
            ret = vm.zap_all()
            kind = "all"
        elif op < 95:
            vm.inject_cas_failures(int(rng.integers(1, 3)))
            continue
        else:
            # delete the read-only slot, or add it back
            slot = [s for s in vm.memslots if s[1] == RO_BASE]
            if not slot:
                vm.add_memslot(RO_BASE, 1024, 5 * PFN0, readonly=True)
                continue
            args = (RO_BASE, RO_BASE + 1024)
            vm.delete_memslot(slot[0][0])
            kind = "delete"
        if check_zap is not None:
            check_zap(kind, before, args, ret)
    vm.inject_cas_failures(0)
    return touched


CONFIGS = [(kind, np_) for kind in LAYOUT_KINDS for np_ in NONPRESENT_VALUES]


CONFIG_IDS = [f"{k}-{'np63' if n else 'np0'}" for k, n in CONFIGS]


@pytest.fixture(params=CONFIGS, ids=CONFIG_IDS)
def config(request):
    return request.param


# ==========================================================================================
# 8. A fault consumes at most root_level - goal_level tables; a lost link returns the
#    table to the pool, not the cache
# ==========================================================================================


@pytest.mark.parametrize("root_level", [4, 5])
@pytest.mark.parametrize("goal", [1, 2, 3])
def test_inv8_fault_consumes_root_minus_goal_tables_on_a_fresh_path(impl, root_level, goal):
    """The root is not one of the fault's tables: it comes from the vCPU cache in
    kvm_mmu_load before the fault (6.10 mmu.c kvm_mmu_load -> kvm_tdp_mmu_alloc_root), so
    it is loaded first and the fault's own consumption is measured from there."""
    vm, layout = make_vm(impl, root_level=root_level, max_level=goal)
    vm.add_memslot(0, 4 * PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    load_root(impl, vcpu)
    vcpu.cache.topup(5)
    n0 = vcpu.cache.nobjs
    s0 = vm.stats
    assert vcpu.fault(PAGES_1G + 3) == PF_FIXED
    assert vm.lookup(PAGES_1G + 3)[1] == goal
    used = n0 - vcpu.cache.nobjs
    assert used == root_level - goal
    assert vm.stats["tables_allocated"] - s0["tables_allocated"] == used
    # a neighbouring region shares the upper tables: fewer
    n1 = vcpu.cache.nobjs
    assert vcpu.fault(2 * PAGES_1G + 3 * PAGES_2M) == PF_FIXED
    assert n1 - vcpu.cache.nobjs == max(0, 3 - goal)
    vm.audit()


def test_inv8_random_faults_never_consume_more_than_root_minus_goal(impl, seed, config):
    kind, nonpresent = config
    rng = np.random.default_rng(seed)
    vm, layout = build_vm(impl, kind, nonpresent)
    vcpu = vm.vcpu()
    load_root(impl, vcpu)  # the root is kvm_mmu_load's, not a fault's (6.10 mmu.c)
    for _ in range(60):
        gfn = random_gfn(rng)
        vcpu.cache.topup(5)
        n0 = vcpu.cache.nobjs
        vcpu.fault(gfn, write=bool(rng.integers(2)), exec=bool(rng.integers(2)))
        last_level = vm.walk(gfn)[-1][0]
        assert n0 - vcpu.cache.nobjs <= vm.root_level - last_level
        assert n0 - vcpu.cache.nobjs <= 4
    vm.audit()


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_inv8_lost_link_returns_table_to_pool_not_cache(impl, failures):
    """With the path partly built, the k-th injected failure hits the k-th link CAS."""
    vm, layout = make_vm(impl, max_level=1)
    vm.add_memslot(0, 4 * PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    load_root(impl, vcpu)  # kvm_mmu_load on the first entry; the CASes are the fault's
    vcpu.cache.topup(5)
    s0 = vm.stats
    before = tables_content(vm)
    for k in range(failures):
        objs = vcpu.cache.objects
        vm.inject_cas_failures(1)
        assert vcpu.fault(PAGES_1G + 9) == PF_RETRY
        assert vm.pool.page_state(objs[-1]) == "free"
        assert vcpu.cache.objects == objs[:-1]
        assert tables_content(vm) == before
    d = stat_delta(s0, vm.stats)
    assert d["tables_freed"] == failures and d["cas_failures"] == failures
    assert d["faults_retry"] == failures
    assert "pt_pages" not in d and "spte_changes" not in d
    vm.audit()


# ==========================================================================================
# 9, 11, 12: allowed values, presence = bit 11, EPT bit 63
# ==========================================================================================


def _random_vm(impl, config, seed, nx=False, root_level=4, n=150):
    kind, nonpresent = config
    rng = np.random.default_rng(seed)
    vm, layout = build_vm(impl, kind, nonpresent, nx=nx, root_level=root_level)
    vcpus = [vm.vcpu(), vm.vcpu()]
    touched = random_ops(impl, vm, vcpus, rng, n)
    refill(impl, vm, vcpus[0])
    return vm, layout, vcpus, touched | set(ANCHORS)


def refill(impl, vm, vcpu):
    """Fault every anchor once more, so that a workload that ended in zap_all still leaves
    tables, huge and 4K leaves, read-only leaves and MMIO SPTEs to check."""
    if not [s for s in vm.memslots if s[1] == RO_BASE]:
        vm.add_memslot(RO_BASE, 1024, 5 * PFN0, readonly=True)
    for k, gfn in enumerate(ANCHORS):
        try:
            vcpu.fault(gfn, write=bool(k % 2), exec=k % 3 == 0)
        except impl.OutOfMemory:
            pass


@pytest.mark.parametrize("nx", [False, True])
def test_inv9_linked_tables_hold_only_allowed_values(impl, config, seed, nx):
    vm, layout, vcpus, _ = _random_vm(impl, config, seed, nx=nx)
    tables = linked_tables(vm)
    # the tables found by decoding memory are exactly the pages in state "table"
    assert set(tables) == {i for i in range(vm.pool.capacity) if vm.pool.page_state(i) == "table"}
    assert len(tables) == vm.stats["pt_pages"]
    kinds = check_allowed_values(vm, layout, tables)
    assert {"nonpresent", "present"} <= kinds
    vm.audit()


def test_inv11_presence_is_bit_11_only(impl, config, seed):
    vm, layout, vcpus, touched = _random_vm(impl, config, seed)
    specials = [layout.nonpresent_value, layout.frozen_value,
                layout.make_mmio_spte(5, ACC_ALL, vm.mmio_generation)]
    for v in specials:
        assert layout.is_shadow_present_pte(v) is False
    for _t, level, _i, _g, v in entries(vm):
        assert layout.is_shadow_present_pte(v) is bool(v & BIT_PRESENT)
    for gfn in sorted(touched):
        walk = vm.walk(gfn)
        assert [lvl for lvl, _ in walk] == list(range(vm.root_level, vm.root_level - len(walk), -1))
        for level, v in walk[:-1]:
            assert v & BIT_PRESENT and not (level == 1 or v & BIT_PS)
        level, last = walk[-1]
        present_leaf = bool(last & BIT_PRESENT) and (level == 1 or bool(last & BIT_PS))
        assert present_leaf or not last & BIT_PRESENT
        assert (vm.lookup(gfn) is not None) is present_leaf
        if present_leaf:
            assert vm.lookup(gfn) == (last, level)
    vm.audit()


@pytest.mark.parametrize("kind", ["ept_ad", "ept_noad", "ept_xo"])
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_inv12_ept_bit63_on_every_stored_value(impl, kind, nonpresent, seed):
    vm, layout, vcpus, _ = _random_vm(impl, (kind, nonpresent), seed, nx=True)
    saw_mmio = False
    for _t, level, _i, gfn, v in entries(vm):
        if nonpresent == NP63:
            # spec §1.4: bit 63 unless RWX == 0b110 (MMIO)
            assert v >> 63 or (v & 7) == 6, (gfn, level, hex(v))
        else:
            # present mask without suppress-#VE when the non-present value lacks it
            if v & BIT_PRESENT:
                assert not v >> 63, (gfn, level, hex(v))
        if (v & 7) == 6 and not v & BIT_PRESENT:
            saw_mmio = True
            assert not v >> 63
    assert saw_mmio
    vm.audit()


# ==========================================================================================
# 10. Every zap path leaves exactly the non-present value
# ==========================================================================================


def _populate_for_zaps(vm, vcpu):
    """4K leaves in two 2M regions, a 2M leaf, a 1G leaf and an MMIO SPTE."""
    for g in (0, 1, 2, 512, 513):
        vcpu.fault(g, write=True)
    vcpu.fault(PAGES_1G + 3 * PAGES_2M + 1)  # 2M
    vcpu.fault(2 * PAGES_1G + 5)  # 1G
    vcpu.fault(5 * PAGES_1G + 9)  # MMIO


def _vm_for_zaps(impl, kind, nonpresent):
    vm, layout = make_vm(impl, kind, nonpresent)
    vm.add_memslot(0, 1024, 4 * PFN0 + 1)  # misaligned: 4K only
    vm.add_memslot(PAGES_1G, PAGES_1G, PFN0 + PAGES_2M)  # 2M-aligned only
    vm.add_memslot(2 * PAGES_1G, PAGES_1G, 2 * PFN0)  # 1G
    vcpu = vm.vcpu()
    _populate_for_zaps(vm, vcpu)
    return vm, layout, vcpu


def _assert_clean_tables(vm, layout):
    """No linked entry is frozen; none is 0 unless that is the non-present value."""
    for _t, level, _i, gfn, v in entries(vm):
        assert v != layout.frozen_value, (gfn, level)
        if layout.nonpresent_value != 0:
            assert v != 0, (gfn, level)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_every_zap_path_writes_the_nonpresent_value(impl, kind, nonpresent):
    """Spec §6 item 10, each zap path in turn on one populated VM: zap_gfn_range
    (``tdp_mmu_zap_leafs``) on a 4K, a 2M and a 1G leaf, zap_spte_atomic
    (``tdp_mmu_zap_spte_atomic``) on a leaf and a non-leaf, zap_sp (``kvm_tdp_mmu_zap_sp``),
    delete_memslot and zap_all (``tdp_mmu_zap_root``)."""
    vm, layout, vcpu = _vm_for_zaps(impl, kind, nonpresent)
    assert layout.nonpresent_value == nonpresent
    assert vm.lookup(PAGES_1G + 3 * PAGES_2M)[1] == 2
    assert vm.lookup(2 * PAGES_1G)[1] == 3

    # zap_gfn_range: 4K leaf, 2M leaf, 1G leaf
    assert vm.zap_gfn_range(1, 2)
    assert vm.walk(1)[-1] == (1, nonpresent)
    assert vm.zap_gfn_range(PAGES_1G + 3 * PAGES_2M, PAGES_1G + 3 * PAGES_2M + 1)
    assert vm.walk(PAGES_1G + 3 * PAGES_2M)[-1] == (2, nonpresent)
    assert vm.zap_gfn_range(2 * PAGES_1G, 3 * PAGES_1G)
    assert vm.walk(2 * PAGES_1G)[-1] == (3, nonpresent)
    _assert_clean_tables(vm, layout)
    vm.audit()

    # zap_spte_atomic: a leaf, then a non-leaf
    assert vm.zap_spte_atomic(2, 1)
    assert vm.walk(2)[-1] == (1, nonpresent)
    assert vm.zap_spte_atomic(512, 2)
    assert vm.walk(512)[-1] == (2, nonpresent)
    _assert_clean_tables(vm, layout)
    vm.audit()

    # zap_sp: the parent entry
    assert vm.zap_sp(0, 1)
    assert vm.walk(0)[-1] == (2, nonpresent)
    _assert_clean_tables(vm, layout)
    vm.audit()

    # delete_memslot: 6.10 kvm_arch_flush_shadow_memslot is kvm_mmu_zap_all_fast: every root
    # is invalidated and zapped (tdp_mmu_zap_root); the vCPU keeps its (now invalid) root
    # until its next entry, and the VM has no valid root meanwhile
    _populate_for_zaps(vm, vcpu)
    old = vcpu.root
    vm.delete_memslot(0)
    assert vm.root is None and vm.walk(0) == [] and vm.walk(513) == []
    assert vm.roots == [(old, 1, True)]
    assert (vm.pool.pages[old] == np.uint64(nonpresent)).all()
    _assert_clean_tables(vm, layout)
    vm.audit()
    new = load_root(impl, vcpu)  # kvm_mmu_reload: put the invalid root, load a fresh one
    assert vm.roots == [(new, 2, False)]
    assert vm.walk(0) == [(4, nonpresent)] and vm.walk(513) == [(4, nonpresent)]
    vm.audit()

    # zap_all: the root holds the non-present value only
    _populate_for_zaps(vm, vcpu)
    assert vm.zap_all()
    assert (vm.pool.pages[vm.root] == np.uint64(nonpresent)).all()
    assert vm.walk(PAGES_1G + 3 * PAGES_2M) == [(4, nonpresent)]
    vm.audit()


def test_inv10_every_zap_leaves_the_nonpresent_value(impl, config, seed):
    kind, nonpresent = config
    rng = np.random.default_rng(seed)
    vm, layout = build_vm(impl, kind, nonpresent)
    vcpus = [vm.vcpu()]
    counts = {}

    def check_zap(what, before, args, ret):
        pages = vm.pool.pages
        tables = linked_tables(vm)
        counts[what] = counts.get(what, 0) + 1
        if what == "range":
            start, end = args
            hit = {k: x for k, x in before.items()
                   if x[0] < end and start < x[0] + pages_per(x[1])}
            assert ret is bool(hit)
            for (t, i), (g, lvl, _v) in hit.items():
                assert int(pages[t][i]) == nonpresent, (g, lvl)
        elif what == "delete":
            # kvm_mmu_zap_all_fast (6.10 kvm_arch_flush_shadow_memslot): no valid root is
            # left, every root still on the list (held by a vCPU) is invalid and holds only
            # the non-present value, and no other table is linked
            assert vm.root is None
            assert vm.roots and all(inv for _p, _r, inv in vm.roots)
            for p, _r, _inv in vm.roots:
                assert (pages[p] == np.uint64(nonpresent)).all()
            assert set(tables) == {p for p, _r, _inv in vm.roots}
        elif what in ("atomic", "sp") and ret:
            gfn, level = args
            level = level if what == "atomic" else level + 1
            walk = dict(vm.walk(gfn))
            assert walk[level] == nonpresent
        elif what == "all":
            # kvm_tdp_mmu_zap_all: every root on the list, valid or invalid, is zapped
            for p, _r, _inv in vm.roots:
                assert (pages[p] == np.uint64(nonpresent)).all()
            assert set(tables) == {p for p, _r, _inv in vm.roots}
        check_allowed_values(vm, layout, tables)

    random_ops(impl, vm, vcpus, rng, 200, check_zap=check_zap)
    assert counts.get("range", 0) and counts.get("atomic", 0) and counts.get("sp", 0)
    vm.audit()


# ==========================================================================================
# 13. Non-leaf encoding
# ==========================================================================================


def test_inv13_nonleaf_encoding(impl, config, seed):
    vm, layout, vcpus, _ = _random_vm(impl, config, seed, root_level=5)
    kind, nonpresent = config
    n = 0
    for _t, level, _i, gfn, v in entries(vm):
        if v & BIT_PRESENT and level > 1 and not v & BIT_PS:
            child = child_of(v)
            assert v == expected_nonleaf(layout, child), (gfn, level, hex(v))
            assert v == layout.make_nonleaf_spte(child)
            if kind == "ept_ad" and nonpresent == NP63:
                assert v == 0x8000_0000_0000_0907 | child << 12
            if kind == "ept_noad" and nonpresent == NP63:
                assert v == 0x8000_0000_0000_0807 | BIT_AD_DISABLED | child << 12
            if kind == "npt":
                # P | W | U | A, no NX on a non-leaf
                assert v == 0x827 | child << 12
            n += 1
    assert n >= 3
    vm.audit()


# ==========================================================================================
# 14. MMIO SPTEs installed by faults carry the gfn and the current generation
# ==========================================================================================


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_inv14_installed_mmio_sptes_round_trip(impl, kind):
    """The gfns reach up to vm.max_gfn (host_maxphyaddr 46 by default: 6.10
    kvm_mmu_max_gfn); a gfn past it emulates without an SPTE (kvm_handle_noslot_fault).
    Each add_memslot is one memslot swap, +2 to the generation (kvm_main.c
    kvm_swap_active_memslots with kvm_arch_nr_memslot_as_ids == 2)."""
    vm, layout = make_vm(impl, kind)
    vcpu = vm.vcpu()
    assert vm.max_gfn == (1 << 34) - 1
    gfns = [5, 512, (1 << 27) + 9, (1 << 33) + 3, (1 << 34) - 1]
    for k in range(3):
        vm.add_memslot(1000 + 10 * k, 1, 77 + k)  # bump the generation
        for g in gfns:
            assert vcpu.fault(g + 0) == PF_EMULATE
            level, v = vm.walk(g)[-1]
            assert level == 1 and layout.is_mmio_spte(v)
            assert layout.get_mmio_spte_gfn(v) == g
            assert layout.get_mmio_spte_generation(v) == vm.mmio_generation == 2 * (k + 1)
            assert layout.get_mmio_spte_access(v) == ACC_ALL & layout.mmio_access_mask
        assert vcpu.fault(vm.max_gfn + 1) == PF_EMULATE
        assert vm.lookup(vm.max_gfn + 1) is None
        assert not [v for _l, v in vm.walk(vm.max_gfn + 1) if layout.is_mmio_spte(v)]
    assert vm.stats["mmio_sptes_created"] == 3 * len(gfns)
    vm.audit()


# ==========================================================================================
# 16. Writable-state table for every leaf
# ==========================================================================================


@pytest.mark.parametrize("nx", [False, True])
def test_inv16_writable_state_of_every_leaf(impl, config, seed, nx):
    vm, layout, vcpus, _ = _random_vm(impl, config, seed, nx=nx)
    hw, mw = layout.host_writable_mask, layout.mmu_writable_mask
    slots = vm.memslots
    n = 0
    for gfn, (level, v) in present_leaves(vm).items():
        h, m, w = bool(v & hw), bool(v & mw), bool(v & 2)
        assert (not m or h) and (not w or m), (gfn, level, hex(v))
        ro = [s[4] for s in slots if s[1] <= gfn < s[1] + s[2]]
        assert len(ro) == 1
        # no write-protection operation exists in this API: writable slots give
        # (1, 1, 1), read-only slots (0, 0, 0)
        assert (h, m, w) == ((False,) * 3 if ro[0] else (True,) * 3), (gfn, hex(v))
        n += 1
    assert n
    vm.audit()


# ==========================================================================================
# 17. Split SPTEs
# ==========================================================================================


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_inv17_split_sptes_map_consecutive_pfns(impl, kind, nonpresent):
    vm, layout = make_vm(impl, kind, nonpresent, nx_huge_pages=True)
    vm.add_memslot(G1, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    gfn = G1 + 77 * PAGES_2M + 300
    vcpu.fault(gfn, write=True)
    huge = vm.lookup(gfn)[0]
    assert huge == leaf_spte(layout, PFN0, 3, nx=True)
    vcpu.fault(gfn, exec=True)
    l2 = table_page(vm, gfn, 2)
    l1 = table_page(vm, gfn, 1)
    row2, row1 = vm.pool.pages[l2], vm.pool.pages[l1]
    for i in range(ENT):
        v = int(row2[i])
        if i == 77:
            assert v == expected_nonleaf(layout, l1)
            continue
        assert v == layout.make_huge_page_split_spte(huge, 2, i, nx_huge_pages=True)
        assert layout.spte_to_pfn(v) == PFN0 + i * PAGES_2M
        assert v & BIT_PS and not layout.is_executable_pte(v)
        # only the pfn differs from the huge SPTE
        assert v & ~layout.pfn_mask == huge & ~layout.pfn_mask
    mid = layout.make_huge_page_split_spte(huge, 2, 77, nx_huge_pages=True)
    for i in range(ENT):
        v = int(row1[i])
        if i == 300:
            continue  # replaced by the fault's own leaf
        assert v == layout.make_huge_page_split_spte(mid, 1, i, nx_huge_pages=True)
        assert layout.spte_to_pfn(v) == PFN0 + 77 * PAGES_2M + i
        assert not v & BIT_PS
        assert layout.is_executable_pte(v)
    vm.audit()


# ==========================================================================================
# 18. A failed CAS leaves memory untouched and runs no bookkeeping
# ==========================================================================================


@pytest.mark.parametrize("where", ["link", "leaf", "split", "mmio", "huge-over-table"])
def test_inv18_cas_failure_leaves_memory_untouched(impl, where):
    vm, layout = make_vm(impl, nx_huge_pages=where != "huge-over-table")
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    load_root(impl, vcpu)  # kvm_mmu_load's root is not the fault's: "link" needs one first
    gfn = 5 * PAGES_2M + 1
    kwargs = {}
    if where == "leaf":
        vcpu.fault(gfn + 1, exec=True)  # the 4K path exists: the leaf's CAS fails
        kwargs = {"exec": True}
    elif where == "split":
        vcpu.fault(gfn)  # a 1G leaf; the exec fault fills a table, then loses its link
        kwargs = {"exec": True}
    elif where == "mmio":
        gfn = 7 * PAGES_1G
        vcpu.fault(gfn + 1)  # the path exists: the MMIO SPTE's CAS fails
    elif where == "huge-over-table":
        gfn = 2 * PAGES_1G + 3
        vcpu.fault(gfn)  # MMIO with tables down to 4K
        vm.add_memslot(2 * PAGES_1G, PAGES_1G, 2 * PFN0)  # now a 1G leaf replaces them
    vcpu.cache.topup(5)
    content = tables_content(vm)
    s0 = vm.stats
    objs = vcpu.cache.objects
    vm.inject_cas_failures(1)
    assert vcpu.fault(gfn, **kwargs) == PF_RETRY
    assert tables_content(vm) == content
    d = stat_delta(s0, vm.stats)
    assert d.pop("cas_failures") == 1 and d.pop("faults_retry") == 1
    assert "spte_changes" not in d and "pages_4k" not in d and "pt_pages" not in d
    assert "tlb_flushes_ranged" not in d and "tables_freed" not in d or where in ("link", "split")
    lost = objs[len(vcpu.cache.objects):]
    assert len(lost) == (1 if where in ("link", "split") else 0)
    for t in lost:
        assert vm.pool.page_state(t) == "free"
    assert d.get("tables_freed", 0) == len(lost)
    vm.audit()
    assert vcpu.fault(gfn, **kwargs) in (PF_FIXED, PF_EMULATE)
    vm.audit()


# ==========================================================================================
# 20. Atomic zap: one ranged flush per success, none otherwise
# ==========================================================================================


def test_inv20_atomic_zap_flushes_once_per_success(impl, config, seed):
    kind, nonpresent = config
    rng = np.random.default_rng(seed)
    vm, layout = build_vm(impl, kind, nonpresent)
    vcpu = vm.vcpu()
    successes = 0
    for _ in range(120):
        gfn = random_gfn(rng)
        if rng.integers(3):
            vcpu.fault(gfn, write=bool(rng.integers(2)))
            continue
        level = int(rng.integers(1, 5))
        walk = dict(vm.walk(gfn))
        was_present = level in walk and bool(walk[level] & BIT_PRESENT)
        s0 = vm.stats
        ret = vm.zap_spte_atomic(gfn, level)
        d = stat_delta(s0, vm.stats)
        assert ret is was_present
        assert d.get("tlb_flushes_ranged", 0) == int(ret)
        assert "tlb_flushes" not in d
        if ret:
            successes += 1
            assert dict(vm.walk(gfn))[level] == nonpresent
        else:
            assert d == {}
    assert successes
    vm.audit()


def test_inv20_atomic_zap_with_a_lost_cas(impl):
    """A lost freeze CAS must neither flush nor leave anything changed; whether the zap
    retries is the engine's business, but a success flushes exactly once."""
    vm, layout = make_vm(impl, max_level=1)
    vm.add_memslot(0, 1024, PFN0)
    vcpu = vm.vcpu()
    vcpu.fault(3, write=True)
    leaf = vm.lookup(3)[0]
    s0 = vm.stats
    vm.inject_cas_failures(1)
    ret = vm.zap_spte_atomic(3, 1)
    d = stat_delta(s0, vm.stats)
    assert d.get("cas_failures") == 1
    if ret:
        assert d.get("tlb_flushes_ranged") == 1
        assert vm.walk(3)[-1] == (1, layout.nonpresent_value)
    else:
        assert "tlb_flushes_ranged" not in d
        assert vm.lookup(3) == (leaf, 1)
    vm.inject_cas_failures(0)
    vm.audit()


# ==========================================================================================
# 21. Subtree removal: shared freezes all 512 entries, exclusive only the present ones
# ==========================================================================================


def _table_with_mixed_entries(impl, kind, nonpresent):
    """An L1 table with 3 present leaves, an MMIO SPTE and non-present entries."""
    vm, layout = make_vm(impl, kind, nonpresent, max_level=1)
    vm.add_memslot(0, 100, PFN0)
    vcpu = vm.vcpu()
    for g in (1, 2, 99):
        vcpu.fault(g, write=True)
    vcpu.fault(200)  # MMIO in the same table
    l1 = table_page(vm, 1, 1)
    return vm, layout, vcpu, l1


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_inv21_exclusive_removal_freezes_only_present_entries(impl, kind, nonpresent):
    vm, layout, vcpu, l1 = _table_with_mixed_entries(impl, kind, nonpresent)
    l2 = table_page(vm, 1, 2)
    before1 = [int(x) for x in vm.pool.pages[l1]]
    assert vm.zap_sp(1, 2) is True  # removes the L2 table, which holds the L1 table
    for t in (l1, l2):
        assert vm.pool.page_state(t) == "free"
    row1 = [int(x) for x in vm.pool.pages[l1]]
    for i in range(ENT):
        if before1[i] & BIT_PRESENT:
            assert row1[i] == layout.frozen_value, i
        else:
            assert row1[i] == before1[i], i  # non-present and MMIO entries left as they are
    row2 = [int(x) for x in vm.pool.pages[l2]]
    assert row2[0] == layout.frozen_value  # the formerly present non-leaf
    assert row2[1:] == [nonpresent] * (ENT - 1)
    assert sum(v == layout.frozen_value for v in row1) == 3
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_inv21_shared_removal_freezes_all_entries(impl, kind, nonpresent):
    vm, layout, vcpu, l1 = _table_with_mixed_entries(impl, kind, nonpresent)
    assert vm.zap_spte_atomic(1, 2) is True  # the shared-mode atomic zap of the non-leaf
    assert (vm.pool.pages[l1] == np.uint64(layout.frozen_value)).all()
    assert vm.walk(1)[-1] == (2, nonpresent)
    assert vm.stats["tables_freed"] == 1
    # API.md: a removed table goes back to the pool; page_state is one of free, raw,
    # cached, table
    assert vm.pool.page_state(l1) == "free"
    vm.audit()


def test_inv21_fault_replacing_a_table_freezes_all_entries(impl):
    """The fault path is shared: a huge leaf over a table removes it with all 512 entries
    frozen."""
    vm, layout = make_vm(impl)
    vcpu = vm.vcpu()
    vcpu.fault(PAGES_1G + 3)  # MMIO: L3 -> L2 -> L1
    l2, l1 = table_page(vm, PAGES_1G, 2), table_page(vm, PAGES_1G, 1)
    vm.add_memslot(PAGES_1G, PAGES_1G, PFN0)
    assert vcpu.fault(PAGES_1G + 3) == PF_FIXED
    assert vm.lookup(PAGES_1G)[1] == 3
    for t in (l1, l2):
        assert vm.pool.page_state(t) == "free"
        assert (vm.pool.pages[t] == np.uint64(layout.frozen_value)).all()
    vm.audit()


# ==========================================================================================
# 22. handle_changed_spte: page stats, A/D propagation, no leaf-to-leaf pfn change
# ==========================================================================================


def test_inv22_page_stats_equal_leaves_found(impl, config, seed):
    vm, layout, vcpus, _ = _random_vm(impl, config, seed, nx=True, n=200)
    leaves = present_leaves(vm)
    s = vm.stats
    for level, key in ((1, "pages_4k"), (2, "pages_2m"), (3, "pages_1g")):
        assert s[key] == sum(1 for lvl, _ in leaves.values() if lvl == level), key
    tables = linked_tables(vm)
    for level in range(1, 6):
        assert s[f"pt_pages_l{level}"] == sum(1 for lvl, _ in tables.values() if lvl == level)
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_inv22_accessed_dirty_propagated_when_lost(impl, kind):
    vm, layout = make_vm(impl, kind, max_level=2)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vm.add_memslot(PAGES_1G, 16, 2 * PFN0, readonly=True)
    vcpu = vm.vcpu()
    vcpu.fault(3, write=True)  # 2M writable: A and D (or W without A/D)
    vcpu.fault(PAGES_1G + 1)  # 4K read-only: A only
    w_leaf, _ = vm.lookup(3)
    r_leaf, _ = vm.lookup(PAGES_1G + 1)
    assert layout.is_dirty_spte(w_leaf) and layout.is_accessed_spte(w_leaf)
    assert not layout.is_dirty_spte(r_leaf) and layout.is_accessed_spte(r_leaf)
    vm.zap_all()
    assert vm.host_page_dirty(PFN0) and vm.host_page_accessed(PFN0)
    assert not vm.host_page_dirty(PFN0 + 3) and not vm.host_page_accessed(PFN0 + 3)
    assert not vm.host_page_dirty(2 * PFN0 + 1) and vm.host_page_accessed(2 * PFN0 + 1)
    vm.audit()


def test_inv22_remap_to_another_pfn_goes_through_a_zap(impl):
    """A gfn whose slot is replaced by one with other host pages: delete_memslot zaps
    first, so the new leaf never replaces a present leaf with another pfn."""
    vm, layout = make_vm(impl)
    sid = vm.add_memslot(G1, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    vcpu.fault(G1 + 5, write=True)
    vm.delete_memslot(sid)
    assert vm.lookup(G1 + 5) is None
    vm.add_memslot(G1, PAGES_1G, 2 * PFN0)
    assert vcpu.fault(G1 + 5) == PF_FIXED
    assert vm.lookup(G1 + 5) == (leaf_spte(layout, 2 * PFN0, 3), 3)
    assert vm.host_page_dirty(2 * PFN0) is False
    vm.audit()


# ==========================================================================================
# 24. zap_all passes 4K -> 2M -> 1G -> root
# ==========================================================================================


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
@pytest.mark.parametrize("root_level", [4, 5])
def test_inv24_zap_all_zaps_bottom_up(impl, kind, nonpresent, root_level):
    """Each pass zaps the present entries at its own level before a higher pass removes
    their table, so (exclusive removal freezing only present entries, item 21) the freed
    tables of levels 1..3 hold no FROZEN entry: every formerly present entry is the
    non-present value, MMIO SPTEs are left as they were.  A root-first order would leave
    them frozen.  With a 5-level root no pass runs at level 4: the root pass removes the
    level-4 tables with their present entries, which are therefore FROZEN."""
    vm, layout = make_vm(impl, kind, nonpresent, root_level=root_level, max_level=2)
    vm.add_memslot(0, 2 * PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    for g in (0, 3 * PAGES_2M + 1, PAGES_1G + 9, 3 * PAGES_1G + 1, 3 * PAGES_1G + 2):
        vcpu.fault(g)
    vm.zap_gfn_range(0, 1)
    vcpu.fault(5, exec=True)  # refill: a 2M leaf
    tables = linked_tables(vm)
    before = {t: [int(x) for x in vm.pool.pages[t]] for t in tables}
    assert vm.zap_all() is True
    frozen = layout.frozen_value
    freed = [t for t in tables if t != vm.root]
    assert len(freed) == len(tables) - 1 >= 4
    saw_level4 = False
    for t in freed:
        assert vm.pool.page_state(t) == "free"
        level = tables[t][0]
        row = [int(x) for x in vm.pool.pages[t]]
        if level <= 3:
            assert frozen not in row, t
        for i, (old, new) in enumerate(zip(before[t], row)):
            if old & BIT_PRESENT:
                assert new == (nonpresent if level <= 3 else frozen), (t, level, i)
            else:
                assert new == old, (t, level, i)
        if level == 4:
            saw_level4 = True
            assert frozen in row
    assert saw_level4 is (root_level == 5)
    vm.audit()


def test_inv24_zap_all_reports_once_and_frees_in_one_call(impl, config):
    """zap_all is 6.10 kvm_mmu_zap_all -> kvm_tdp_mmu_zap_all: tdp_mmu_zap_root on every
    root, and no TLB flush ("A TLB flush is unnecessary, KVM zaps everything if and only the
    VM is being destroyed or the userspace VMM has exited"): neither a full nor a ranged one
    is counted.  The tables go back in that one call; the root stays."""
    kind, nonpresent = config
    vm, layout = build_vm(impl, kind, nonpresent)
    vcpu = vm.vcpu()
    for g in ANCHORS:
        vcpu.fault(g, write=True)
    s0 = vm.stats
    assert vm.zap_all() is True
    d = stat_delta(s0, vm.stats)
    assert "tlb_flushes" not in d and "tlb_flushes_ranged" not in d
    assert d["tables_freed"] == s0["pt_pages"] - 1
    assert vm.stats["pt_pages"] == 1 and vm.roots == [(vcpu.root, 2, False)]
    assert vm.stats["pages_4k"] == vm.stats["pages_2m"] == vm.stats["pages_1g"] == 0
    vm.audit()


# ==========================================================================================
# audit(): every pool page is free, cached in one vCPU cache, or linked once
# ==========================================================================================


def test_audit_catches_raw_page_kept_from_pool(impl):
    """docs/API.md ``vm.audit()``: every pool page is exactly one of free, cached (in one
    vCPU cache), or linked once.  A page taken with ``vm.pool.alloc()`` and kept is neither
    free, cached nor linked: AuditError; freeing it makes the VM consistent again."""
    vm = make_vm(impl, max_pt_pages=64)[0]
    vm.add_memslot(0, 1024, PFN0)
    vm.vcpu().fault(5)  # a vCPU cache holding pages is fine
    vm.audit()
    idx = vm.pool.alloc()
    with pytest.raises(impl.AuditError):
        vm.audit()
    vm.pool.free(idx)
    vm.audit()


def test_audit_catches_pages_held_by_a_foreign_cache(impl):
    """Pages held by a MemoryCache that belongs to no vCPU of the VM: AuditError; after the
    cache's ``free()`` audit passes."""
    vm = make_vm(impl, max_pt_pages=64)[0]
    cache = impl.MemoryCache(vm.pool, init_value=vm.layout.nonpresent_value)
    cache.topup(1)
    assert cache.nobjs > 0
    with pytest.raises(impl.AuditError):
        vm.audit()
    cache.free()
    vm.audit()
