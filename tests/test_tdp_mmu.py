"""The TDP MMU: Vm / Vcpu construction and the root, the fault path (faults, MMIO SPTEs,
huge pages, the NX huge-page workaround), walk / lookup, zaps, host page flags, injected
CAS failures and fault_batch, on both implementations (docs/API.md "Vm, Vcpu";
KVM_MMU_SPEC.md §3.2-3.10 and §3.14; upstream ``kvm_tdp_mmu_map``,
``kvm_tdp_mmu_page_fault``, ``tdp_mmu_zap_leafs``, ``tdp_mmu_zap_root``,
``kvm_tdp_mmu_zap_sp``, ``tdp_mmu_zap_spte_atomic``, ``handle_changed_spte``).

Every behaviour test takes ``impl`` and runs on the pure-Python oracle and on the Cython
engine; every test ends with ``vm.audit()``.  Expected SPTEs come from the spec: the
DESIGN.md known answers, or the layout's ``make_spte`` / ``make_mmio_spte`` constructors
(checked against the bit layout in test_spte.py), never from a previous run.

Elsewhere: argument checking in test_api.py, memslots in test_memslots.py, the vCPU
caches' configuration in test_mmu_cache.py, spec §6 items 8-24 in test_invariants.py,
threads in test_concurrency.py.
"""
import select
import signal
import subprocess
import time

import numpy as np
import pytest

from support.child import child_argv, child_env
from support.layouts import (
    LAYOUT_KINDS,
    NONPRESENT_VALUES,
    expected_nonleaf,
    leaf_spte,
    load_root,
    make_vm,
    vm_4k,
)
from support.snapshots import assert_same_snapshot, snapshot, stat_delta
from support.spec import (
    ACC_ALL,
    ENT,
    PAGES_1G,
    PAGES_2M,
    PF_EMULATE,
    PF_FIXED,
    PF_RETRY,
    PF_SPURIOUS,
    PFN0,
    POISON,
    NP63,
    pages_per,
    round_gfn,
    spte_index,
)
from support.tables import entries, linked_tables, present_leaves, table_page, tables_content


G1 = PAGES_1G  # gfn of the second 1G region


# ==========================================================================================
# 1. Vm / Vcpu construction and the root (kvm_mmu_load -> kvm_tdp_mmu_alloc_root)
# ==========================================================================================


@pytest.mark.parametrize("root_level", [4, 5])
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_vm_construction_attributes_root_and_stats(impl, root_level, nonpresent):
    """No root exists at construction: 6.10 allocates it on the vCPU's first entry
    (kvm_mmu_reload -> kvm_mmu_load: mmu_topup_memory_caches, then mmu_alloc_direct_roots ->
    kvm_tdp_mmu_alloc_root, which takes the page from the vCPU's cache with
    tdp_mmu_alloc_sp, refcount 2 -- the vCPU's and the MMU's -- and adds it to
    kvm->arch.tdp_mmu_roots).  With an 8-page pool the top-up takes all 8 (it only fails
    below min 5, __kvm_mmu_topup_memory_cache) and the root the top one (LIFO)."""
    layout = impl.SpteLayout.ept(nonpresent_value=nonpresent)
    vm = impl.Vm(layout, root_level=root_level, max_level=2, max_pt_pages=8)
    assert vm.layout == layout
    assert vm.root_level == root_level and vm.max_level == 2
    assert vm.nx_huge_pages is False
    assert vm.host_maxphyaddr == 46 and vm.max_gfn == (1 << 34) - 1
    assert vm.pool.capacity == 8
    assert vm.mmio_generation == 0
    assert vm.memslots == []
    assert vm.root is None and vm.roots == []
    assert [vm.pool.page_state(i) for i in range(8)] == ["free"] * 8
    s = vm.stats
    for key in ("faults_fixed", "faults_spurious", "faults_retry", "faults_emulate",
                "faults_fast", "pages_4k", "pages_2m", "pages_1g", "pt_pages", "pt_pages_l1",
                "pt_pages_l2", "pt_pages_l3", "pt_pages_l4", "pt_pages_l5", "tables_allocated",
                "tables_freed", "cache_fills", "cache_zero_inits", "init_bytes_written",
                "tlb_flushes", "tlb_flushes_ranged", "cas_failures", "nx_lpage_splits",
                "mmio_sptes_created", "hw_walks", "hw_ad_sets", "exits_ept_violation",
                "exits_misconfig"):
        assert s[key] == 0, key
    assert vm.walk(0) == [] and vm.lookup(0) is None
    vm.audit()
    # the first vCPU entry loads the root from that vCPU's cache
    v = vm.vcpu()
    assert v.root is None
    root = load_root(impl, v)
    assert vm.root == root and vm.roots == [(root, 2, False)]
    assert 0 <= root < 8
    assert vm.pool.page_state(root) == "table"
    assert (vm.pool.pages[root] == np.uint64(nonpresent)).all()
    assert v.cache.nobjs == 7 and root not in v.cache.objects
    assert sorted(v.cache.objects + (root,)) == list(range(8))
    assert vm.pool.nr_free == 0
    s = vm.stats
    assert s["pt_pages"] == 1 and s[f"pt_pages_l{root_level}"] == 1
    assert all(s[f"pt_pages_l{lvl}"] == 0 for lvl in range(1, 6) if lvl != root_level)
    assert s["tables_allocated"] == 1 and s["tables_freed"] == 0
    for key in ("faults_fixed", "faults_spurious", "faults_retry", "faults_emulate",
                "pages_4k", "pages_2m", "pages_1g", "tlb_flushes", "tlb_flushes_ranged",
                "cas_failures", "nx_lpage_splits", "mmio_sptes_created"):
        assert s[key] == 0, key
    assert vm.walk(0) == [(root_level, nonpresent)]
    assert vm.lookup(0) is None
    vm.audit()


def test_vm_defaults(impl):
    layout = impl.SpteLayout.npt()
    vm = impl.Vm(layout, max_pt_pages=4)
    assert vm.root_level == 4 and vm.max_level == impl.PG_LEVEL_1G
    assert vm.nx_huge_pages is False
    assert impl.Vm(layout, max_pt_pages=4, nx_huge_pages=True).nx_huge_pages is True
    vm.audit()


def test_vm_root_filled_with_nonpresent_value_over_poison(impl):
    """The root comes from the vCPU cache, whose top-up fills every page it takes with the
    non-present value (6.10 mmu_memory_cache_alloc_obj: memset64 of init_value; one 4096-byte
    fill per page, 40 pages for capacity 40); pages the cache never took keep the poison.
    Nothing is filled before the first vCPU entry."""
    layout = impl.SpteLayout.ept()
    vm = impl.Vm(layout, max_pt_pages=48, poison=POISON)
    assert (vm.pool.pages == np.uint64(POISON)).all()
    assert vm.stats["cache_fills"] == 0 and vm.stats["init_bytes_written"] == 0
    v = vm.vcpu()
    root = load_root(impl, v)
    assert (vm.pool.pages[root] == np.uint64(NP63)).all()
    for i in range(48):
        state = vm.pool.page_state(i)
        if state == "free":
            assert (vm.pool.pages[i] == np.uint64(POISON)).all()
        else:
            assert (vm.pool.pages[i] == np.uint64(NP63)).all()
    assert vm.pool.nr_free == 8 and v.cache.nobjs == 39
    assert vm.stats["cache_fills"] == 40
    assert vm.stats["init_bytes_written"] == 40 * 4096
    vm.audit()


@pytest.mark.parametrize("poisoned", [False, True])
def test_vm_root_initialisation_with_nonpresent_zero(impl, poisoned):
    """nonpresent_value 0 is the GFP_ZERO path (DESIGN.md): a never-used page of a
    zero-initialised pool is used as is and costs nothing; a poisoned page is zeroed.  The
    root is one of the 40 pages the vCPU's first top-up takes (kvm_mmu_load)."""
    layout = impl.SpteLayout.ept(nonpresent_value=0)
    vm = impl.Vm(layout, max_pt_pages=48, poison=POISON if poisoned else None)
    assert vm.stats["cache_zero_inits"] == 0 and vm.pool.stats["zero_untouched"] == 0
    root = load_root(impl, vm.vcpu())
    assert (vm.pool.pages[root] == np.uint64(0)).all()
    s, p = vm.stats, vm.pool.stats
    assert s["cache_fills"] == 0 and p["fills"] == 0
    assert s["cache_zero_inits"] == p["zero_inits"] == 40 * int(poisoned)
    assert p["zero_untouched"] == 40 * int(not poisoned)
    assert s["init_bytes_written"] == p["init_bytes_written"] == 40 * 4096 * int(poisoned)
    vm.audit()


def test_direct_vcpu_construction_registers_like_vm_vcpu(impl):
    """docs/API.md: ``Vcpu(vm)`` is the same as ``vm.vcpu()``.  ``impl.Vcpu(vm)`` is
    registered in ``vm.vcpus``, its faults reach ``vm.stats`` and the tables, and audit
    passes: the same outcome as a vCPU from ``vm.vcpu()``."""
    vms, vcpus = [], []
    for make in (lambda vm: impl.Vcpu(vm), lambda vm: vm.vcpu()):
        vm = make_vm(impl, max_pt_pages=64)[0]
        vm.add_memslot(0, 1024, PFN0)
        v = make(vm)
        assert len(vm.vcpus) == 1 and vm.vcpus[0] is v
        assert v.fault(5, write=True) == PF_FIXED
        # a not-present re-fault with A/D on takes the slow path and drops D (6.10
        # page_fault_can_be_fast, make_spte); the next one is spurious
        assert v.fault(5, write=True) == PF_FIXED
        assert v.fault(5, write=True) == impl.PF.SPURIOUS
        vm.audit()
        vms.append(vm)
        vcpus.append(v)
    direct, usual = vms
    assert direct.stats["faults_fixed"] == 2 and direct.stats["pages_2m"] == 1
    assert direct.stats["faults_spurious"] == 1
    assert direct.stats == usual.stats
    assert direct.walk(5) == usual.walk(5)
    assert vcpus[0].stats == vcpus[1].stats


# ==========================================================================================
# 2. Faults (spec §3.9)
# ==========================================================================================


@pytest.mark.parametrize("nonpresent, high",
                         [(NP63, 0x8600_0000_0000_0B77), (0, 0x0600_0000_0000_0B77)])
@pytest.mark.parametrize("write", [False, True])
def test_fault_known_answer_ept_ad(impl, nonpresent, high, write):
    """DESIGN.md: with A/D on a writable 4K leaf is 0x8600_0000_0000_0b77 | pfn << 12
    (0x0600... with nonpresent_value=0); a read fault installs the same writable leaf.
    The next not-present fault of any kind takes the slow path (6.10 mmu.c
    page_fault_can_be_fast: a !PRESENT fault is fast only without A/D bits) and make_spte
    with the writable old SPTE skips the dirty bit (spte.c make_spte: ``if
    (is_writable_pte(old_spte)) goto out``): FIXED, ...0977, and handle_changed_spte
    pushes the old D to the host page (kvm_set_pfn_dirty).  Further faults build the same
    SPTE: RET_PF_SPURIOUS from tdp_mmu_map_handle_target_level, nothing changes."""
    vm, layout, vcpu = vm_4k(impl, nonpresent=nonpresent)
    gfn = 77
    pfn = PFN0 + gfn
    ret = vcpu.fault(gfn, write=write)
    assert ret == PF_FIXED and isinstance(ret, impl.PF) and ret is impl.PF.FIXED
    want = high | pfn << 12
    assert vm.lookup(gfn) == (want, 1)
    assert vm.walk(gfn)[-1] == (1, want)
    s = vm.stats
    assert s["faults_fixed"] == 1 and s["pages_4k"] == 1
    assert vm.host_page_dirty(pfn) is False
    # the first re-fault drops D
    assert vcpu.fault(gfn) == PF_FIXED
    clean = (high & ~0x200) | pfn << 12
    assert clean == want & ~layout.dirty_mask
    assert vm.lookup(gfn) == (clean, 1)
    assert vm.host_page_dirty(pfn) is True and vm.host_page_accessed(pfn) is False
    s = vm.stats
    assert s["faults_fixed"] == 2 and s["faults_fast"] == 0 and s["pages_4k"] == 1
    # later faults of any kind are spurious, and change nothing
    before = snapshot(vm, [vcpu])
    assert vcpu.fault(gfn) == PF_SPURIOUS
    assert vcpu.fault(gfn, write=True) == PF_SPURIOUS
    assert vcpu.fault(gfn, exec=True) == PF_SPURIOUS
    assert vcpu.fault(gfn, write=True, exec=True) == PF_SPURIOUS
    after = snapshot(vm, [vcpu])
    assert after["stats"]["faults_spurious"] == before["stats"]["faults_spurious"] + 4
    after["stats"]["faults_spurious"] = before["stats"]["faults_spurious"]
    assert_same_snapshot(before, after)
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_fault_installs_make_spte_leaf_and_nonleaf_path(impl, kind, nonpresent):
    """The first fault's entry loads the root from the vCPU cache top (kvm_mmu_load ->
    kvm_tdp_mmu_alloc_root -> tdp_mmu_alloc_sp); the 4K fault then builds L3 -> L2 -> L1 from
    the next pages (LIFO) and installs make_spte(pfn, 1, ACC_ALL); the non-leaf entries are
    make_nonleaf_spte of the tables."""
    vm, layout, vcpu = vm_4k(impl, kind, nonpresent)
    vcpu.cache.topup(5)
    objs = vcpu.cache.objects
    assert len(objs) == 40
    gfn = 600
    assert vcpu.fault(gfn) == PF_FIXED
    root, l3, l2, l1 = objs[-1], objs[-2], objs[-3], objs[-4]
    assert vm.root == vcpu.root == root
    assert vcpu.cache.objects == objs[:-4]
    assert vm.walk(gfn) == [
        (4, expected_nonleaf(layout, l3)),
        (3, expected_nonleaf(layout, l2)),
        (2, expected_nonleaf(layout, l1)),
        (1, leaf_spte(layout, PFN0 + gfn)),
    ]
    for t in (l3, l2, l1):
        assert vm.pool.page_state(t) == "table"
    assert linked_tables(vm) == {vm.root: (4, 0), l3: (3, 0), l2: (2, 0), l1: (1, 512)}
    # every other entry of the new tables is the non-present value
    for t, lvl in ((l3, 3), (l2, 2), (l1, 1)):
        row = vm.pool.pages[t]
        idx = spte_index(gfn, lvl)
        assert (np.delete(row, idx) == np.uint64(nonpresent)).all()
    s = vm.stats
    assert s["pt_pages"] == 4
    assert [s[f"pt_pages_l{i}"] for i in range(1, 6)] == [1, 1, 1, 1, 0]
    assert s["tables_allocated"] == 4 and s["pages_4k"] == 1
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_read_only_slot(impl, kind):
    vm, layout = make_vm(impl, kind, max_level=1)
    vm.add_memslot(0, 64, PFN0, readonly=True)
    vcpu = vm.vcpu()
    load_root(impl, vcpu)
    # a write fault on an unmapped gfn: EMULATE, nothing installed
    tables_before = tables_content(vm)
    assert vcpu.fault(3, write=True) == PF_EMULATE
    assert tables_content(vm) == tables_before
    assert vm.lookup(3) is None
    assert vm.stats["pt_pages"] == 1 and vm.stats["faults_emulate"] == 1
    # a read fault maps a read-only leaf (host-writable clear: no W, no MMU-writable)
    assert vcpu.fault(3) == PF_FIXED
    spte, level = vm.lookup(3)
    assert level == 1
    assert spte == leaf_spte(layout, PFN0 + 3, readonly=True)
    assert not spte & 2
    assert not spte & layout.host_writable_mask and not spte & layout.mmu_writable_mask
    assert vcpu.fault(3) == PF_SPURIOUS
    assert vcpu.fault(3, exec=True) == PF_SPURIOUS
    # a write fault on the read-only leaf: EMULATE, the leaf is unchanged
    tables_before = tables_content(vm)
    assert vcpu.fault(3, write=True) == PF_EMULATE
    assert tables_content(vm) == tables_before
    assert vm.lookup(3) == (spte, 1)
    s = vm.stats
    assert s["faults_emulate"] == 2 and s["faults_fixed"] == 1 and s["faults_spurious"] == 2
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_mmio_fault_installs_mmio_spte_with_generation(impl, kind, nonpresent):
    vm, layout = make_vm(impl, kind, nonpresent)
    vm.add_memslot(0, 512, PFN0)
    vm.add_memslot(10 * PAGES_1G, 512, PFN0 + 512)
    vcpu = vm.vcpu()
    gen = vm.mmio_generation
    assert gen == 4  # two creates, one swap each, +2 per swap (kvm_swap_active_memslots)
    gfn = 3 * PAGES_1G + 5
    assert vcpu.fault(gfn) == PF_EMULATE
    mmio = layout.make_mmio_spte(gfn, ACC_ALL, gen)
    walk = vm.walk(gfn)
    assert [lvl for lvl, _ in walk] == [4, 3, 2, 1]
    assert walk[-1] == (1, mmio)
    assert vm.lookup(gfn) is None
    assert layout.is_mmio_spte(walk[-1][1])
    assert layout.get_mmio_spte_gfn(walk[-1][1]) == gfn
    assert layout.get_mmio_spte_generation(walk[-1][1]) == gen
    s = vm.stats
    assert s["mmio_sptes_created"] == 1 and s["faults_emulate"] == 1
    assert s["pages_4k"] == 0 and s["pt_pages"] == 4
    # the same fault again: EMULATE, nothing stored
    tables_before = tables_content(vm)
    assert vcpu.fault(gfn, write=True) == PF_EMULATE
    assert tables_content(vm) == tables_before
    assert vm.stats["mmio_sptes_created"] == 1 and vm.stats["faults_emulate"] == 2
    vm.audit()


def test_stale_mmio_spte_is_replaced_after_memslot_change(impl):
    vm, layout = make_vm(impl, max_level=1)
    vm.add_memslot(0, 512, PFN0)
    vcpu = vm.vcpu()
    gfn = 2048 + 7
    assert vcpu.fault(gfn) == PF_EMULATE
    assert vm.walk(gfn)[-1] == (1, layout.make_mmio_spte(gfn, ACC_ALL, 2))
    # an unrelated slot: generation 4 (+2 per swap), the MMIO SPTE is stale and refaults
    vm.add_memslot(4096, 16, PFN0 + 4096)
    assert vm.mmio_generation == 4
    vm.audit()  # stale MMIO SPTEs are allowed in linked tables
    assert vcpu.fault(gfn) == PF_EMULATE
    assert vm.walk(gfn)[-1] == (1, layout.make_mmio_spte(gfn, ACC_ALL, 4))
    assert vm.stats["mmio_sptes_created"] == 2
    # now a slot covers the gfn: the fault installs a leaf over the MMIO SPTE
    vm.add_memslot(2048, 512, PFN0 + 2048)
    old = vm.walk(gfn)[-1][1]
    assert vcpu.fault(gfn, write=True) == PF_FIXED
    # make_spte with old_spte = the MMIO SPTE: EPT MMIO is W|X, so "old is writable" and
    # the dirty bit is not added (API.md make_spte algorithm)
    assert vm.lookup(gfn) == (leaf_spte(layout, PFN0 + 2048 + 7, old=old), 1)
    assert not vm.lookup(gfn)[0] & layout.dirty_mask
    s = vm.stats
    assert s["mmio_sptes_created"] == 2 and s["pages_4k"] == 1
    vm.audit()


def test_mmio_tables_replaced_by_huge_leaf_flush_and_free(impl):
    """A present non-leaf replaced by a huge leaf: ranged TLB flush, the subtree freed."""
    vm, layout = make_vm(impl)
    vcpu = vm.vcpu()
    gfn = G1 + 12345
    assert vcpu.fault(gfn) == PF_EMULATE  # root -> L3 -> L2 -> L1 with an MMIO SPTE
    l2 = table_page(vm, gfn, 2)
    l1 = table_page(vm, gfn, 1)
    s0 = vm.stats
    assert s0["pt_pages"] == 4
    vm.add_memslot(G1, PAGES_1G, PFN0)
    old = vm.walk(gfn)[1]
    assert old[0] == 3
    assert vcpu.fault(gfn) == PF_FIXED
    # old_spte is the (writable) non-leaf: no dirty bit
    assert vm.lookup(gfn) == (leaf_spte(layout, PFN0, 3, old=old[1]), 3)
    s1 = vm.stats
    assert s1["pt_pages"] == 2 and s1["pt_pages_l2"] == 0 and s1["pt_pages_l1"] == 0
    assert s1["pages_1g"] == 1
    assert s1["tables_freed"] == s0["tables_freed"] + 2
    assert s1["tlb_flushes_ranged"] == s0["tlb_flushes_ranged"] + 1
    assert vm.pool.page_state(l2) == "free" and vm.pool.page_state(l1) == "free"
    assert l2 not in vcpu.cache.objects and l1 not in vcpu.cache.objects
    vm.audit()


# ------------------------------------------------------------------------------------------
# huge pages (spec §3.9 step 1, §3.13) and the NX huge-page workaround
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("max_level", [1, 2, 3])
def test_goal_level_follows_max_level_on_aligned_slot(impl, kind, max_level):
    vm, layout = make_vm(impl, kind, max_level=max_level)
    vm.add_memslot(G1, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    gfn = G1 + 3 * PAGES_2M + 17
    assert vcpu.fault(gfn, write=True) == PF_FIXED
    base = round_gfn(gfn, max_level)
    want = leaf_spte(layout, PFN0 + (base - G1), max_level)
    assert vm.lookup(gfn) == (want, max_level)
    assert layout.spte_to_pfn(want) == PFN0 + base - G1
    # every gfn of the mapping resolves to the same leaf; the first exec re-fault rebuilds
    # it with make_spte(old=want) -- without D where the layout has A/D, whose not-present
    # faults never take the fast path (6.10 page_fault_can_be_fast) --, the second finds
    # it built
    rebuilt = leaf_spte(layout, PFN0 + (base - G1), max_level, old=want)
    for k, g in enumerate((base, base + pages_per(max_level) - 1)):
        assert vm.lookup(g) == (want if k == 0 else rebuilt, max_level)
        first = PF_SPURIOUS if rebuilt == want else PF_FIXED
        assert vcpu.fault(g, exec=True) == (first if k == 0 else PF_SPURIOUS)
    assert vm.lookup(base) == (rebuilt, max_level)
    # EPT without A/D: both re-faults resolved by fast_page_fault (is_access_allowed)
    assert vm.stats["faults_fast"] == (2 if layout.accessed_mask == 0 else 0)
    s = vm.stats
    assert (s["pages_4k"], s["pages_2m"], s["pages_1g"]) == tuple(
        int(lvl == max_level) for lvl in (1, 2, 3))
    assert s["pt_pages"] == 1 + (4 - max_level)
    assert [s[f"pt_pages_l{i}"] for i in (1, 2, 3, 4)] == [
        int(max_level < 2), int(max_level < 3), 1, 1]
    vm.audit()


@pytest.mark.parametrize(
    "base, npages, pfn, gfn, level",
    [
        # pfn 2M- but not 1G-aligned relative to the gfn: 2M
        (G1, PAGES_1G, PFN0 + PAGES_2M, G1 + 5, 2),
        # pfn misaligned by one page: 4K everywhere
        (G1, PAGES_1G, PFN0 + 1, G1 + 5, 1),
        (G1, PAGES_1G, PFN0 + 1, G1 + 7 * PAGES_2M, 1),
        # slot one page short of 1G: the first 2M regions are 2M, the last one straddles the end
        (G1, PAGES_1G - 1, PFN0, G1, 2),
        (G1, PAGES_1G - 1, PFN0, G1 + PAGES_1G - PAGES_2M, 1),
        (G1, PAGES_1G - 1, PFN0, G1 + PAGES_1G - 2, 1),
        # slot starting one page late (pfn equally offset): the first 2M region straddles the
        # start; the others are 2M
        (G1 + 1, PAGES_1G - 1, PFN0 + 1, G1 + 1, 1),
        (G1 + 1, PAGES_1G - 1, PFN0 + 1, G1 + 511, 1),
        (G1 + 1, PAGES_1G - 1, PFN0 + 1, G1 + 512, 2),
        # 2M slot: exactly one 2M page
        (G1 + PAGES_2M, PAGES_2M, PFN0, G1 + PAGES_2M + 9, 2),
        # 2M slot ending in the next 2M region
        (G1 + PAGES_2M, PAGES_2M + 1, PFN0, G1 + 2 * PAGES_2M, 1),
        # slot of 2 x 1G starting at 1G: a 1G page in each half
        (G1, 2 * PAGES_1G, PFN0, G1 + PAGES_1G + 3, 3),
        # slot of 1G + 1 starting one 2M page late: 2M at most
        (G1 + PAGES_2M, PAGES_1G, PFN0 + PAGES_2M, G1 + PAGES_1G + 1, 2),
    ],
)
def test_goal_level_respects_alignment_and_slot_bounds(impl, base, npages, pfn, gfn, level):
    vm, layout = make_vm(impl)  # max_level 1G
    vm.add_memslot(base, npages, pfn)
    vcpu = vm.vcpu()
    assert vcpu.fault(gfn) == PF_FIXED
    start = round_gfn(gfn, level)
    want = leaf_spte(layout, pfn + (start - base), level)
    assert vm.lookup(gfn) == (want, level)
    s = vm.stats
    assert s["pages_4k"] == int(level == 1)
    assert s["pages_2m"] == int(level == 2)
    assert s["pages_1g"] == int(level == 3)
    # the leaf stays inside the slot
    assert base <= start and start + pages_per(level) <= base + npages
    vm.audit()


def test_many_4k_faults_stats_exact(impl):
    vm, layout, vcpu = vm_4k(impl)
    vm.add_memslot(PAGES_1G + 5, 3, 7 * PFN0)
    gfns = [0, 1, 511, 512, 1023, PAGES_1G + 5, PAGES_1G + 7]
    for g in gfns:
        assert vcpu.fault(g) == PF_FIXED
    s = vm.stats
    assert s["pages_4k"] == len(gfns)
    # tables: root, L3 for 1G region 0 and 1 -> 1 L3 (both in the same 512G region),
    # L2 for region 0 and region 1 -> 2, L1 for 2M regions 0, 1, and 1G+0 -> 3
    assert [s[f"pt_pages_l{i}"] for i in (1, 2, 3, 4, 5)] == [3, 2, 1, 1, 0]
    assert s["pt_pages"] == 7 == len(linked_tables(vm))
    assert s["tables_allocated"] == 7
    assert sorted(present_leaves(vm)) == sorted(gfns)
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_nx_huge_pages_2m_split_on_exec(impl, kind):
    vm, layout = make_vm(impl, kind, max_level=2, nx_huge_pages=True)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    gfn = 3 * PAGES_2M + 100
    base = 3 * PAGES_2M
    assert vcpu.fault(gfn, write=True) == PF_FIXED
    huge = leaf_spte(layout, PFN0 + base, 2, nx=True)
    assert vm.lookup(gfn) == (huge, 2)
    assert not layout.is_executable_pte(huge)
    s0 = vm.stats
    assert s0["pages_2m"] == 1 and s0["nx_lpage_splits"] == 0
    nobjs = vcpu.cache.nobjs
    # exec fault: goal 4K, the 2M leaf is split into a fresh table from the cache
    ret = vcpu.fault(gfn, exec=True)
    split_child = layout.make_huge_page_split_spte(huge, 1, gfn - base, nx_huge_pages=True)
    final = leaf_spte(layout, PFN0 + gfn, 1, nx=True, old=split_child)
    assert ret == (PF_SPURIOUS if final == split_child else PF_FIXED)
    assert vm.lookup(gfn) == (final, 1)
    assert layout.is_executable_pte(final)
    s1 = vm.stats
    d = stat_delta(s0, s1)
    assert d["pages_2m"] == -1 and d["pages_4k"] == 512
    assert d["pt_pages"] == 1 and d["pt_pages_l1"] == 1
    assert d["nx_lpage_splits"] == 1
    assert vcpu.cache.nobjs == nobjs - 1
    # the 511 other children: the split SPTEs, executable at 4K
    l1 = table_page(vm, gfn, 1)
    row = vm.pool.pages[l1]
    for i in range(ENT):
        if i == gfn - base:
            continue
        want = layout.make_huge_page_split_spte(huge, 1, i, nx_huge_pages=True)
        assert int(row[i]) == want
        assert layout.spte_to_pfn(want) == PFN0 + base + i
        assert layout.is_executable_pte(want)
    # an exec re-fault of a split child: make_spte(old=child) skips D where the layout has
    # A/D (their not-present faults take the slow path, 6.10 page_fault_can_be_fast), so
    # FIXED exactly when that changes the child; EPT without A/D: fast_page_fault, SPURIOUS
    child = layout.make_huge_page_split_spte(huge, 1, 5, nx_huge_pages=True)
    rebuilt = leaf_spte(layout, PFN0 + base + 5, 1, nx=True, old=child)
    assert vcpu.fault(base + 5, exec=True) == (PF_SPURIOUS if rebuilt == child else PF_FIXED)
    assert vm.lookup(base + 5) == (rebuilt, 1)
    assert vcpu.fault(base + 5, exec=True) == PF_SPURIOUS
    vm.audit()


def test_nx_huge_pages_1g_split_on_exec(impl):
    vm, layout = make_vm(impl, nx_huge_pages=True)
    vm.add_memslot(G1, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    gfn = G1 + 5 * PAGES_2M + 33
    assert vcpu.fault(gfn) == PF_FIXED
    huge = leaf_spte(layout, PFN0, 3, nx=True)
    assert vm.lookup(gfn) == (huge, 3)
    assert not layout.is_executable_pte(huge)
    assert vcpu.fault(gfn, exec=True) in (PF_FIXED, PF_SPURIOUS)
    mid = layout.make_huge_page_split_spte(huge, 2, 5, nx_huge_pages=True)
    child = layout.make_huge_page_split_spte(mid, 1, 33, nx_huge_pages=True)
    assert vm.lookup(gfn) == (leaf_spte(layout, PFN0 + 5 * PAGES_2M + 33, 1, nx=True, old=child), 1)
    # the other 2M pieces stay huge and non-executable
    other = G1 + 6 * PAGES_2M
    assert vm.lookup(other) == (layout.make_huge_page_split_spte(huge, 2, 6, nx_huge_pages=True), 2)
    assert not layout.is_executable_pte(vm.lookup(other)[0])
    s = vm.stats
    assert (s["pages_1g"], s["pages_2m"], s["pages_4k"]) == (0, 511, 512)
    assert s["pt_pages"] == 4 and s["nx_lpage_splits"] == 2
    vm.audit()


def test_nx_huge_pages_exec_fault_on_fresh_gfn_maps_4k(impl):
    vm, layout = make_vm(impl, max_level=2, nx_huge_pages=True)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    assert vcpu.fault(PAGES_2M, write=True) == PF_FIXED  # path root -> L3 -> L2 exists
    assert vm.lookup(PAGES_2M)[1] == 2
    s0 = vm.stats
    gfn = 7 * PAGES_2M + 3
    assert vcpu.fault(gfn, exec=True) == PF_FIXED
    assert vm.lookup(gfn) == (leaf_spte(layout, PFN0 + gfn, 1, nx=True), 1)
    assert layout.is_executable_pte(vm.lookup(gfn)[0])
    d = stat_delta(s0, vm.stats)
    assert d["pages_4k"] == 1 and d["pt_pages_l1"] == 1 and d["nx_lpage_splits"] == 1
    # a read fault in the same 2M region: the NX-disallowed table lowers the goal to 4K
    assert vcpu.fault(gfn + 1) == PF_FIXED
    assert vm.lookup(gfn + 1) == (leaf_spte(layout, PFN0 + gfn + 1, 1, nx=True), 1)
    vm.audit()


def test_nx_disallowed_table_lowers_goal_after_zap(impl):
    """After the 4K leaves of an NX-split table are zapped, a read fault does not replace the
    table with a huge page (API.md item 5): it maps 4K again."""
    vm, layout = make_vm(impl, max_level=2, nx_huge_pages=True)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    gfn = 9 * PAGES_2M + 4
    vcpu.fault(gfn)
    vcpu.fault(gfn, exec=True)  # split
    assert vm.lookup(gfn)[1] == 1
    assert vm.zap_gfn_range(9 * PAGES_2M, 10 * PAGES_2M) is True
    assert vm.lookup(gfn) is None
    s0 = vm.stats
    assert vcpu.fault(gfn) == PF_FIXED
    assert vm.lookup(gfn) == (leaf_spte(layout, PFN0 + gfn, 1, nx=True), 1)
    d = stat_delta(s0, vm.stats)
    assert d == {"faults_fixed": 1, "pages_4k": 1, "spte_changes": 1}
    vm.audit()


def test_nx_lpage_splits_drop_when_the_tables_go(impl):
    """nx_lpage_splits counts tables currently on the possible-NX-huge-page list."""
    vm, layout = make_vm(impl, max_level=2, nx_huge_pages=True)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    for region in (1, 2, 3):
        vcpu.fault(region * PAGES_2M + 7)
        vcpu.fault(region * PAGES_2M + 7, exec=True)  # one NX split table each
    assert vm.stats["nx_lpage_splits"] == 3
    assert vm.zap_sp(PAGES_2M, 1) is True
    assert vm.stats["nx_lpage_splits"] == 2
    assert vm.zap_spte_atomic(2 * PAGES_2M, 2) is True
    assert vm.stats["nx_lpage_splits"] == 1
    vm.zap_gfn_range(0, PAGES_1G)  # leaves only: the table stays listed
    assert vm.stats["nx_lpage_splits"] == 1
    assert vm.zap_all() is True
    assert vm.stats["nx_lpage_splits"] == 0
    vm.audit()


def nx_mmio_then_ram(impl):
    """NX huge pages on: an exec fault on a gfn in no memslot, then a slot over it and a
    read fault."""
    vm = make_vm(impl, nx_huge_pages=True, max_pt_pages=64)[0]
    v = vm.vcpu()
    assert v.fault(0x200, exec=True) == PF_EMULATE  # no slot: an MMIO SPTE at 4K
    vm.add_memslot(0, 0x400, PFN0)  # now RAM, 2M-aligned gfn and pfn
    assert v.fault(0x200) == PF_FIXED
    return vm


def test_nx_exec_fault_on_mmio_gfn_marks_tables_huge_page_disallowed(impl):
    """KVM_MMU_SPEC §3.9 step 1 (``huge_page_disallowed``: an exec fault under the NX
    mitigation) applies to every exec fault, also one on a gfn in no memslot: the tables the
    MMIO exec fault allocated are nx_huge_page_disallowed, so the later read fault maps 4K below them instead of replacing
    the level-1 table by a 2M leaf (no ranged flush)."""
    vm = nx_mmio_then_ram(impl)
    spte, level = vm.lookup(0x200)
    assert level == impl.PG_LEVEL_4K
    assert vm.layout.spte_to_pfn(spte) == PFN0 + 0x200
    assert vm.stats["pt_pages_l1"] == 1
    assert vm.stats["tlb_flushes_ranged"] == 0
    vm.audit()


def test_nx_exec_fault_on_mmio_gfn_same_state_in_both(fast, reference):
    """The engine and the oracle end the MMIO-exec-then-RAM sequence above with the same
    walk and stats."""
    vf, vr = nx_mmio_then_ram(fast), nx_mmio_then_ram(reference)
    for g in (0x200, 0x201, 0x3ff):
        assert vf.walk(g) == vr.walk(g)
    assert vf.stats == vr.stats


def test_spte_changes_counts_handle_changed_spte_calls(impl):
    """One call per SPTE change (spec §3.7); subtree removal adds one call per frozen entry:
    every entry in shared mode, only the present ones in exclusive mode (spec §3.8).  A
    read re-fault with A/D on rebuilds the leaf without D (6.10 make_spte with a writable
    old SPTE): one change; the next re-fault builds the same SPTE: spurious, no change."""
    vm, layout, vcpu = vm_4k(impl)
    vcpu.fault(3)
    assert vm.stats["spte_changes"] == 4  # three links and the leaf
    vcpu.fault(4)
    assert vm.stats["spte_changes"] == 5
    assert vcpu.fault(3) == PF_FIXED  # D dropped: one change
    assert vm.stats["spte_changes"] == 6
    assert vcpu.fault(3) == PF_SPURIOUS  # no change
    assert vm.stats["spte_changes"] == 6
    assert vm.zap_gfn_range(3, 4)
    assert vm.stats["spte_changes"] == 7
    # exclusive subtree removal: the parent entry + the one present leaf (gfn 4)
    assert vm.zap_sp(4, 1)
    assert vm.stats["spte_changes"] == 9
    # shared subtree removal: the root entry + 512 entries of the L3 table (one present,
    # the L2 table's) + 512 of the L2 table
    assert vm.zap_spte_atomic(0, 4)
    assert vm.stats["spte_changes"] == 9 + 1 + 512 + 512
    vm.audit()


def test_without_nx_huge_pages_huge_leaves_are_executable(impl):
    vm, layout = make_vm(impl, max_level=2)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    assert vcpu.fault(5) == PF_FIXED
    spte, level = vm.lookup(5)
    assert level == 2 and layout.is_executable_pte(spte)
    # the exec re-fault needs no split: the slow path (A/D on) only drops D (make_spte)
    assert vcpu.fault(5, exec=True) == PF_FIXED
    assert vm.lookup(5) == (leaf_spte(layout, PFN0, 2, old=spte), 2)
    assert vcpu.fault(5, exec=True) == PF_SPURIOUS
    assert vm.stats["nx_lpage_splits"] == 0 and vm.stats["pages_2m"] == 1
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_root_level_5(impl, kind):
    """Slots end at kvm_mmu_max_gfn() (6.10 kvm_arch_prepare_memory_region), so the top
    1G of a 51-bit host (NPT still caches MMIO below 52 bits, kvm_mmu_reset_all_pte_masks)
    is the highest slot: root entry 7, far from root entry 0."""
    vm, layout = make_vm(impl, kind, root_level=5, host_maxphyaddr=51)
    high = (1 << 39) - PAGES_1G
    assert high + PAGES_1G - 1 == vm.max_gfn
    assert spte_index(high, 5) == 7
    vm.add_memslot(high, PAGES_1G, PFN0)
    vm.add_memslot(5, 1, 7)
    vcpu = vm.vcpu()
    assert vcpu.fault(high + 9, write=True) == PF_FIXED
    assert vcpu.fault(5) == PF_FIXED
    assert vcpu.fault(high - 1) == PF_EMULATE
    walk = vm.walk(high + 9)
    assert [lvl for lvl, _ in walk] == [5, 4, 3]
    assert walk[-1] == (3, leaf_spte(layout, PFN0, 3))
    assert [lvl for lvl, _ in vm.walk(5)] == [5, 4, 3, 2, 1]
    s = vm.stats
    # l4: root entries 0 and 7; l3: one per 512G region; the 1G leaf needs no l2
    assert [s[f"pt_pages_l{i}"] for i in (1, 2, 3, 4, 5)] == [2, 2, 2, 2, 1]
    assert s["pages_1g"] == 1 and s["pages_4k"] == 1
    with pytest.raises(ValueError):
        vcpu.fault(1 << 45)
    vm.audit()


def test_fault_out_of_memory_changes_nothing(impl):
    """max_pt_pages 10: the first entry's top-up (kvm_mmu_load) takes all 10 (>= 5) and the
    root one of them; the faults' top-ups are no-ops while 5 are left."""
    vm, layout, vcpu = vm_4k(impl, max_pt_pages=10)
    vm.add_memslot(8 * PAGES_2M, 8 * PAGES_2M, 3 * PFN0)
    assert vcpu.fault(0) == PF_FIXED  # 3 tables: 6 left
    assert vcpu.cache.nobjs == 6 and vm.pool.nr_free == 0
    assert vcpu.fault(8 * PAGES_2M) == PF_FIXED  # 1 table: 5 left
    assert vcpu.fault(9 * PAGES_2M) == PF_FIXED  # top-up no-op at 5; 1 table: 4 left
    before = snapshot(vm, [vcpu])
    with pytest.raises(impl.OutOfMemory) as info:
        vcpu.fault(10 * PAGES_2M)
    assert isinstance(info.value, MemoryError)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    # a not-present re-fault with A/D on cannot be fast (6.10 page_fault_can_be_fast) and
    # tops up first (kvm_tdp_mmu_page_fault -> mmu_topup_memory_caches): OutOfMemory too
    before = snapshot(vm, [vcpu])
    with pytest.raises(impl.OutOfMemory):
        vcpu.fault(0)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    # a present write fault on a writable leaf is answered by fast_page_fault, which needs
    # no top-up: is_access_allowed -> RET_PF_SPURIOUS
    assert vcpu.fault(0, error_code=impl.PFERR_PRESENT_MASK | impl.PFERR_WRITE_MASK) == PF_SPURIOUS
    assert vm.stats["faults_fast"] == 1
    vm.audit()


# ==========================================================================================
# 3. walk / lookup (kvm_tdp_mmu_get_walk)
# ==========================================================================================


def test_walk_and_lookup_shapes(impl):
    vm, layout = make_vm(impl, max_level=2)
    np_ = layout.nonpresent_value
    vm.add_memslot(PAGES_1G, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    # no root before the first vCPU entry: an empty walk
    assert vm.walk(PAGES_1G) == [] and vm.lookup(PAGES_1G) is None
    # empty: only the root entry
    load_root(impl, vcpu)
    assert vm.walk(PAGES_1G) == [(4, np_)]
    assert vm.lookup(PAGES_1G) is None
    vcpu.fault(PAGES_1G + 1)
    l3 = table_page(vm, PAGES_1G, 3)
    l2 = table_page(vm, PAGES_1G, 2)
    huge = leaf_spte(layout, PFN0, 2)
    assert vm.walk(PAGES_1G + 511) == [(4, expected_nonleaf(layout, l3)),
                                       (3, expected_nonleaf(layout, l2)), (2, huge)]
    assert vm.lookup(PAGES_1G + 511) == (huge, 2)
    # a neighbouring 2M region: the walk stops at the non-present level-2 entry
    assert vm.walk(PAGES_1G + 512) == [(4, expected_nonleaf(layout, l3)),
                                       (3, expected_nonleaf(layout, l2)), (2, np_)]
    assert vm.lookup(PAGES_1G + 512) is None
    # another 1G region: stops at level 3
    assert vm.walk(5 * PAGES_1G) == [(4, expected_nonleaf(layout, l3)), (3, np_)]
    # another 512G region: stops at the root
    assert vm.walk(1 << 27) == [(4, np_)]
    # MMIO: the walk ends at the MMIO entry, lookup is None
    vcpu.fault(7)
    walk = vm.walk(7)
    assert len(walk) == 4 and walk[-1] == (1, layout.make_mmio_spte(7, ACC_ALL, 2))
    assert vm.lookup(7) is None
    vm.audit()


# ==========================================================================================
# 4. Zaps (spec §3.5, §3.10, §3.14)
# ==========================================================================================


def test_zap_gfn_range_half_open_at_4k(impl):
    vm, layout, vcpu = vm_4k(impl)
    np_ = layout.nonpresent_value
    for g in (10, 11, 12):
        vcpu.fault(g, write=True)
    s0 = vm.stats
    assert vm.zap_gfn_range(11, 12) is True
    assert vm.lookup(10) is not None and vm.lookup(12) is not None
    assert vm.walk(11)[-1] == (1, np_)
    s1 = vm.stats
    assert s1["tlb_flushes_ranged"] == s0["tlb_flushes_ranged"] + 1
    assert s1["pages_4k"] == 2
    assert s1["pt_pages"] == s0["pt_pages"] and s1["tables_freed"] == s0["tables_freed"]
    # nothing left in range: False, no flush
    for start, end in ((11, 12), (12, 12), (5, 5), (0, 10), (13, 1024), (1024, 1 << 36)):
        assert vm.zap_gfn_range(start, end) is False, (start, end)
    assert vm.stats["tlb_flushes_ranged"] == s1["tlb_flushes_ranged"]
    # end is exclusive, start inclusive
    assert vm.zap_gfn_range(12, 13) is True
    assert vm.lookup(12) is None and vm.lookup(10) is not None
    assert vm.zap_gfn_range(0, 11) is True
    assert vm.stats["pages_4k"] == 0
    assert vm.stats["tlb_flushes_ranged"] == s1["tlb_flushes_ranged"] + 2
    assert vm.stats["pt_pages"] == s0["pt_pages"]
    vm.audit()


def test_zap_gfn_range_huge_leaf_zapped_whole(impl):
    vm, layout = make_vm(impl, max_level=2)
    np_ = layout.nonpresent_value
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    vcpu.fault(PAGES_2M + 3)  # 2M leaf over [512, 1024)
    vcpu.fault(2 * PAGES_2M)  # 2M leaf over [1024, 1536)
    assert vm.zap_gfn_range(0, PAGES_2M) is False  # ends just before the huge page
    assert vm.zap_gfn_range(3 * PAGES_2M, 4 * PAGES_2M) is False
    s0 = vm.stats
    assert vm.zap_gfn_range(2 * PAGES_2M - 1, 2 * PAGES_2M) is True  # its last page
    assert vm.lookup(PAGES_2M) is None and vm.lookup(PAGES_2M + 3) is None
    assert vm.walk(PAGES_2M)[-1] == (2, np_)
    assert vm.lookup(2 * PAGES_2M) is not None
    s1 = vm.stats
    assert s1["pages_2m"] == 1 and s1["tlb_flushes_ranged"] == s0["tlb_flushes_ranged"] + 1
    assert s1["pt_pages"] == s0["pt_pages"]
    # a one-page range inside the other huge page zaps it whole
    assert vm.zap_gfn_range(2 * PAGES_2M + 100, 2 * PAGES_2M + 101) is True
    assert vm.stats["pages_2m"] == 0
    vm.audit()


def test_zap_gfn_range_1g_leaf(impl):
    vm, layout = make_vm(impl)
    vm.add_memslot(PAGES_1G, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    vcpu.fault(PAGES_1G + 77)
    assert vm.zap_gfn_range(0, PAGES_1G) is False
    assert vm.zap_gfn_range(2 * PAGES_1G, 3 * PAGES_1G) is False
    assert vm.zap_gfn_range(PAGES_1G + PAGES_1G - 1, 2 * PAGES_1G) is True
    assert vm.walk(PAGES_1G)[-1] == (3, layout.nonpresent_value)
    assert vm.stats["pages_1g"] == 0 and vm.stats["pt_pages"] == 2
    vm.audit()


def test_zap_gfn_range_leaves_mmio_sptes(impl):
    vm, layout, vcpu = vm_4k(impl)
    vcpu.fault(2000)  # MMIO
    mmio = vm.walk(2000)[-1]
    assert vm.zap_gfn_range(0, 4096) is False
    assert vm.walk(2000)[-1] == mmio
    vm.audit()


def test_zap_all(impl):
    vm, layout = make_vm(impl, max_level=2)
    vm.add_memslot(0, 4 * PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    for g in (0, PAGES_2M * 3, PAGES_1G + 1, 3 * PAGES_1G + 5 * PAGES_2M):
        vcpu.fault(g, write=True)
    vcpu.fault(5 * PAGES_1G)  # MMIO at 4K
    s0 = vm.stats
    tables = linked_tables(vm)
    assert s0["pt_pages"] == len(tables) == 1 + 1 + 4 + 1
    cached = vcpu.cache.objects
    assert vm.zap_all() is True
    s1 = vm.stats
    assert s1["pt_pages"] == 1 and s1["pt_pages_l4"] == 1
    assert all(s1[f"pt_pages_l{i}"] == 0 for i in (1, 2, 3, 5))
    assert s1["tables_freed"] == s0["tables_freed"] + len(tables) - 1
    assert (s1["pages_4k"], s1["pages_2m"], s1["pages_1g"]) == (0, 0, 0)
    # 6.10 kvm_tdp_mmu_zap_all: "A TLB flush is unnecessary" -- none counted
    assert s1["tlb_flushes"] == s0["tlb_flushes"]
    assert s1["tlb_flushes_ranged"] == s0["tlb_flushes_ranged"]
    assert vm.roots == [(vm.root, 2, False)]  # the root and its references stay
    assert (vm.pool.pages[vm.root] == np.uint64(layout.nonpresent_value)).all()
    for t in tables:
        assert vm.pool.page_state(t) == ("table" if t == vm.root else "free")
    assert vcpu.cache.objects == cached
    assert vm.zap_all() is False
    assert vm.stats["tlb_flushes"] == s1["tlb_flushes"]
    vm.audit()
    # the VM works afterwards
    assert vcpu.fault(3, write=True) == PF_FIXED
    vm.audit()


def test_zap_all_on_empty_vm(impl):
    vm, _ = make_vm(impl)
    assert vm.zap_all() is False
    assert vm.stats["tlb_flushes"] == 0 and vm.stats["tables_freed"] == 0
    vm.audit()


def test_zap_sp(impl):
    vm, layout, vcpu = vm_4k(impl)
    np_ = layout.nonpresent_value
    for g in (0, 1, 2, 512, 513):
        vcpu.fault(g)
    l1_a = table_page(vm, 0, 1)
    l1_b = table_page(vm, 512, 1)
    row_b = vm.pool.pages[l1_b].copy()
    s0 = vm.stats
    assert vm.zap_sp(2, 1) is True
    assert vm.walk(0)[-1] == (2, np_)
    assert [lvl for lvl, _ in vm.walk(0)] == [4, 3, 2]
    s1 = vm.stats
    d = stat_delta(s0, s1)
    assert d["pages_4k"] == -3 and d["pt_pages"] == -1 and d["pt_pages_l1"] == -1
    assert d["tables_freed"] == 1 and d["tlb_flushes"] == 1
    assert "tlb_flushes_ranged" not in d
    assert vm.pool.page_state(l1_a) == "free"
    assert np.array_equal(vm.pool.pages[l1_b], row_b)
    assert vm.lookup(512) is not None
    # no such table any more
    assert vm.zap_sp(0, 1) is False
    assert vm.zap_sp(PAGES_1G, 2) is False
    assert vm.zap_sp(1 << 27, 3) is False
    assert stat_delta(s1, vm.stats) == {}
    # the L3 table: everything below goes
    assert vm.zap_sp(700, 3) is True
    s2 = vm.stats
    assert s2["pt_pages"] == 1 and s2["pages_4k"] == 0
    assert s2["tables_freed"] == s1["tables_freed"] + 3
    assert s2["tlb_flushes"] == s1["tlb_flushes"] + 1
    assert vm.walk(512) == [(4, np_)]
    vm.audit()


def test_zap_sp_under_a_huge_leaf_is_false(impl):
    vm, layout = make_vm(impl, max_level=2)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vm.vcpu().fault(3)
    s0 = vm.stats
    assert vm.zap_sp(3, 1) is False  # the 2M entry is a leaf, no table under it
    assert vm.zap_sp(3, 2) is True
    assert vm.stats["pages_2m"] == 0 and vm.stats["tables_freed"] == s0["tables_freed"] + 1
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("nonpresent", NONPRESENT_VALUES)
def test_zap_spte_atomic_leaf_and_nonleaf(impl, kind, nonpresent):
    vm, layout, vcpu = vm_4k(impl, kind, nonpresent)
    for g in (0, 1, 600):
        vcpu.fault(g, write=True)
    s0 = vm.stats
    # a present 4K leaf
    assert vm.zap_spte_atomic(1, 1) is True
    assert vm.walk(1)[-1] == (1, nonpresent)
    d = stat_delta(s0, vm.stats)
    assert d["tlb_flushes_ranged"] == 1 and d["pages_4k"] == -1
    assert "tables_freed" not in d and "tlb_flushes" not in d
    # not present any more: False, nothing counted
    s1 = vm.stats
    assert vm.zap_spte_atomic(1, 1) is False
    assert vm.zap_spte_atomic(PAGES_1G, 3) is False
    assert vm.zap_spte_atomic(1 << 27, 4) is False
    assert stat_delta(s1, vm.stats) == {}
    # a non-leaf at level 2: the L1 table with gfn 600 is removed
    l1 = table_page(vm, 600, 1)
    assert vm.zap_spte_atomic(600, 2) is True
    assert vm.walk(600)[-1] == (2, nonpresent)
    d = stat_delta(s1, vm.stats)
    assert d["tlb_flushes_ranged"] == 1 and d["pages_4k"] == -1
    assert d["pt_pages"] == -1 and d["pt_pages_l1"] == -1 and d["tables_freed"] == 1
    assert vm.pool.page_state(l1) == "free"
    # the root-level entry: everything goes
    s2 = vm.stats
    assert vm.zap_spte_atomic(0, 4) is True
    assert vm.walk(0) == [(4, nonpresent)]
    d = stat_delta(s2, vm.stats)
    assert d["tlb_flushes_ranged"] == 1 and d["tables_freed"] == 3 and d["pages_4k"] == -1
    assert vm.stats["pt_pages"] == 1
    for _t, level, _i, _g, v in entries(vm):
        assert v != layout.frozen_value
    vm.audit()


# ==========================================================================================
# 5. Host page flags (spec §3.7 A/D propagation)
# ==========================================================================================


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("zap", ["range", "all", "atomic", "sp", "delete"])
def test_host_flags_after_write_fault_and_zap(impl, kind, zap):
    vm, layout, vcpu = vm_4k(impl, kind)
    pfn = PFN0 + 5
    assert vcpu.fault(5, write=True) == PF_FIXED
    assert vm.host_page_dirty(pfn) is False and vm.host_page_accessed(pfn) is False
    if zap == "range":
        assert vm.zap_gfn_range(5, 6)
    elif zap == "all":
        assert vm.zap_all()
    elif zap == "atomic":
        assert vm.zap_spte_atomic(5, 1)
    elif zap == "sp":
        assert vm.zap_sp(5, 1)
    if zap == "delete":
        vm.add_memslot(PAGES_1G, 1, pfn + 100000)
        vm.delete_memslot(0)
        # no slot backs the pfn any more
        with pytest.raises(ValueError):
            vm.host_page_dirty(pfn)
        with pytest.raises(ValueError):
            vm.host_page_accessed(pfn)
    else:
        assert vm.host_page_dirty(pfn) is True
        assert vm.host_page_accessed(pfn) is True
        assert vm.host_page_dirty(pfn + 1) is False and vm.host_page_accessed(pfn - 1) is False
    vm.audit()


def test_host_flags_outlive_the_memslot_that_set_them(impl):
    """Host page flags belong to the host page (KVM marks the struct page), not to the
    memslot: a slot backing the same pfn again sees them."""
    vm, layout, vcpu = vm_4k(impl)
    vm.add_memslot(2048, 16, PFN0 + 2048)
    vcpu.fault(5, write=True)
    vcpu.fault(2049)
    assert vm.host_page_dirty(PFN0 + 2049) is False  # mapped, not zapped yet
    # kvm_mmu_zap_all_fast zaps gfn 5 and also gfn 2049 of the other slot: both pfns become
    # accessed and dirty (the read fault on a writable slot set D: make_spte)
    vm.delete_memslot(0)
    vm.add_memslot(4096, 1024, PFN0)  # the same host pages, other gfns
    assert vm.host_page_dirty(PFN0 + 5) is True
    assert vm.host_page_accessed(PFN0 + 5) is True
    assert vm.host_page_dirty(PFN0 + 6) is False
    assert vm.host_page_dirty(PFN0 + 2049) is True and vm.host_page_accessed(PFN0 + 2049) is True
    assert vm.host_page_dirty(PFN0 + 2050) is False
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_host_flags_read_only_slot(impl, kind):
    vm, layout = make_vm(impl, kind, max_level=1)
    vm.add_memslot(0, 16, PFN0, readonly=True)
    vcpu = vm.vcpu()
    assert vcpu.fault(4) == PF_FIXED
    assert vm.zap_gfn_range(0, 16)
    assert vm.host_page_accessed(PFN0 + 4) is True
    assert vm.host_page_dirty(PFN0 + 4) is False
    vm.audit()


@pytest.mark.parametrize("level", [2, 3])
def test_host_flags_huge_leaf_marks_first_pfn_only(impl, level):
    vm, layout = make_vm(impl, max_level=level)
    vm.add_memslot(PAGES_1G, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    gfn = PAGES_1G + PAGES_1G - 7
    head = PFN0 + round_gfn(gfn, level) - PAGES_1G
    assert vcpu.fault(gfn, write=True) == PF_FIXED
    assert vm.lookup(gfn)[1] == level
    assert vm.zap_gfn_range(gfn, gfn + 1)
    assert vm.host_page_dirty(head) and vm.host_page_accessed(head)
    for pfn in (head + 1, PFN0 + gfn - PAGES_1G, head + pages_per(level) - 1):
        assert vm.host_page_dirty(pfn) is False
        assert vm.host_page_accessed(pfn) is False
    vm.audit()


def test_host_flags_unbacked_pfn(impl):
    vm, layout, vcpu = vm_4k(impl)
    for pfn in (0, PFN0 - 1, PFN0 + 1024, 1 << 40):
        with pytest.raises(ValueError):
            vm.host_page_dirty(pfn)
        with pytest.raises(ValueError):
            vm.host_page_accessed(pfn)
    with pytest.raises(ValueError):
        vm.host_page_dirty(-1)
    assert vm.host_page_dirty(PFN0 + 1023) is False
    vm.audit()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_host_flags_not_set_by_faults_or_spurious(impl, kind):
    """Installing a leaf and a spurious fault set no host flag.  With A/D the first write
    re-fault rebuilds the leaf without D (6.10 make_spte with a writable old SPTE), and
    handle_changed_spte pushes the old D to the host page (kvm_set_pfn_dirty: dirty before,
    not dirty after); A stays, so nothing marks it accessed.  EPT without A/D has no D:
    its re-faults are fast_page_fault's SPURIOUS."""
    vm, layout, vcpu = vm_4k(impl, kind)
    assert vcpu.fault(9, write=True) == PF_FIXED
    assert vm.host_page_dirty(PFN0 + 9) is False
    assert vm.host_page_accessed(PFN0 + 9) is False
    ad = layout.dirty_mask != 0
    assert vcpu.fault(9, write=True) == (PF_FIXED if ad else PF_SPURIOUS)
    assert vcpu.fault(9, write=True) == PF_SPURIOUS
    assert vm.host_page_dirty(PFN0 + 9) is ad
    assert vm.host_page_accessed(PFN0 + 9) is False
    assert vm.host_page_dirty(PFN0 + 8) is False
    vm.audit()


# ==========================================================================================
# 6. CAS-failure injection (spec §3.4, §3.9)
# ==========================================================================================


def test_cas_failure_on_link_returns_retry_and_frees_the_table(impl):
    vm, layout, vcpu = vm_4k(impl)
    load_root(impl, vcpu)  # kvm_mmu_load's root is not linked by a CAS
    vcpu.cache.topup(5)
    objs = vcpu.cache.objects
    walk0 = vm.walk(7)
    pages0 = vm.pool.pages.copy()
    s0 = vm.stats
    vm.inject_cas_failures(1)
    assert vcpu.fault(7) == PF_RETRY
    assert vm.walk(7) == walk0
    lost = objs[-1]
    assert vm.pool.page_state(lost) == "free"
    assert vcpu.cache.objects == objs[:-1]
    assert lost not in vcpu.cache.objects
    d = stat_delta(s0, vm.stats)
    assert d.get("cas_failures") == 1 and d.get("faults_retry") == 1
    assert d.get("tables_freed") == 1
    assert d.get("pages_4k", 0) == 0 and d.get("pt_pages", 0) == 0
    assert "spte_changes" not in d
    # linked tables are untouched (the lost page is no table)
    for t in linked_tables(vm):
        assert np.array_equal(vm.pool.pages[t], pages0[t])
    vm.audit()
    # the injection is used up
    assert vcpu.fault(7) == PF_FIXED
    assert vm.lookup(7) == (leaf_spte(layout, PFN0 + 7), 1)
    vm.audit()


def test_cas_failure_on_leaf_returns_retry(impl):
    vm, layout, vcpu = vm_4k(impl)
    vcpu.fault(6)
    pages0 = vm.pool.pages.copy()
    objs = vcpu.cache.objects
    s0 = vm.stats
    vm.inject_cas_failures(1)
    assert vcpu.fault(7) == PF_RETRY  # the path exists: the leaf's CAS fails
    assert np.array_equal(vm.pool.pages, pages0)
    assert vcpu.cache.objects == objs
    d = stat_delta(s0, vm.stats)
    assert d == {"cas_failures": 1, "faults_retry": 1}
    assert vm.lookup(7) is None
    vm.audit()


@pytest.mark.parametrize("n", [1, 3, 7])
def test_fault_batch_refaults_retry(impl, n):
    vm, layout, vcpu = vm_4k(impl)
    gfns = np.array([0, 512, 513, 5], dtype=np.uint64)
    out = np.full(4, -1, dtype=np.int8)
    vm.inject_cas_failures(n)
    counts = vcpu.fault_batch(gfns, out=out)
    assert counts == {"fixed": 4, "spurious": 0, "retry": n, "emulate": 0, "fast": 0}
    assert out.tolist() == [PF_FIXED] * 4
    s = vm.stats
    assert s["faults_retry"] == n and s["cas_failures"] == n and s["faults_fixed"] == 4
    for g in gfns.tolist():
        assert vm.lookup(g) == (leaf_spte(layout, PFN0 + g), 1)
    vm.audit()


# ==========================================================================================
# 7. fault_batch
# ==========================================================================================


def test_fault_batch_matches_single_faults(impl):
    """fault_batch == the same faults one by one (access bit 0 write, bit 1 exec)."""
    results = []
    for batched in (True, False):
        vm, layout = make_vm(impl)
        vm.add_memslot(0, 2 * PAGES_1G, PFN0)
        vm.add_memslot(3 * PAGES_1G, 16, 2 * PFN0 + 7, readonly=True)
        vcpu = vm.vcpu()
        gfns = [5, 5, PAGES_1G + 3, 3 * PAGES_1G + 1, 3 * PAGES_1G + 1, 3 * PAGES_1G + 2,
                4 * PAGES_1G, 4 * PAGES_1G, 3 * PAGES_1G + 1]
        access = [0, 3, 2, 1, 0, 2, 0, 1, 1]
        if batched:
            out = np.zeros(len(gfns), dtype=np.int8)
            counts = vcpu.fault_batch(np.array(gfns, dtype=np.uint64),
                                      np.array(access, dtype=np.uint8), out)
            rets = out.tolist()
        else:
            rets = [int(vcpu.fault(g, write=bool(a & 1), exec=bool(a & 2)))
                    for g, a in zip(gfns, access)]
            counts = {"fixed": rets.count(4), "spurious": rets.count(5), "retry": 0,
                      "emulate": rets.count(2), "fast": vm.stats["faults_fast"]}
        vm.audit()
        results.append((counts, rets, vm.stats, vm.pool.pages.copy()))
    (c1, r1, s1, p1), (c2, r2, s2, p2) = results
    # the second item re-faults gfn 5 (write + exec) over the first one's leaf: A/D on, so
    # the slow path, and make_spte drops D (6.10 page_fault_can_be_fast, make_spte)
    assert r1 == [PF_FIXED, PF_FIXED, PF_FIXED, PF_EMULATE, PF_FIXED, PF_FIXED,
                  PF_EMULATE, PF_EMULATE, PF_EMULATE]
    assert c1["fast"] == 0
    assert r1 == r2 and c1 == c2 and s1 == s2
    assert np.array_equal(p1, p2)


def test_fault_batch_empty(impl):
    vm, layout, vcpu = vm_4k(impl)
    counts = vcpu.fault_batch(np.zeros(0, dtype=np.uint64), out=np.zeros(0, dtype=np.int8))
    assert counts == {"fixed": 0, "spurious": 0, "retry": 0, "emulate": 0, "fast": 0}
    vm.audit()


@pytest.mark.parametrize("extra", [0, 3])
def test_fault_batch_out_of_memory(impl, extra):
    """max_pt_pages 10: the batch's entry tops the cache up with all 10 pages and loads the
    root from it (kvm_mmu_load), 9 left.  Faults in fresh 2M regions at 4K: the first takes
    3 tables (cache 9 -> 6), the next 1 each (6 -> 5, then the top-up at 5 is a no-op, 5 -> 4);
    the fourth fault's top-up cannot reach 5 with the pool empty: OutOfMemory, completed 3.
    With `extra` re-faults of gfn 0 first, completed is 3 + extra: the first of them drops D
    (FIXED: A/D on, slow path, make_spte with a writable old SPTE), the others are
    SPURIOUS."""
    vm, layout = make_vm(impl, max_level=1, max_pt_pages=10)
    vm.add_memslot(0, 16 * PAGES_2M, PFN0)
    vcpu = vm.vcpu()
    first = [0] + [0] * extra
    gfns = np.array(first + [PAGES_2M * k for k in range(1, 8)], dtype=np.uint64)
    out = np.full(len(gfns), -1, dtype=np.int8)
    with pytest.raises(impl.OutOfMemory) as info:
        vcpu.fault_batch(gfns, out=out)
    err = info.value
    assert isinstance(err, MemoryError)
    completed = 3 + extra
    assert err.completed == completed
    refixed = min(extra, 1)
    assert out[:completed].tolist() == ([PF_FIXED] + [PF_FIXED] * refixed
                                        + [PF_SPURIOUS] * (extra - refixed) + [PF_FIXED] * 2)
    assert out[completed:].tolist() == [-1] * (len(gfns) - completed)  # no result recorded
    s = vm.stats
    assert s["faults_fixed"] == 3 + refixed and s["faults_spurious"] == extra - refixed
    assert s["faults_retry"] == 0 and s["faults_emulate"] == 0
    assert s["pages_4k"] == 3
    # the faults after that point left nothing behind
    for g in gfns[completed:].tolist():
        if g != 0:
            assert vm.lookup(g) is None
            assert len(vm.walk(g)) == 3  # stops at the L2 entry
    assert sorted(present_leaves(vm)) == [0, PAGES_2M, 2 * PAGES_2M]
    vm.audit()


def test_fault_batch_out_of_memory_with_many_gfns(impl):
    vm, layout = make_vm(impl, max_level=1, max_pt_pages=12)
    vm.add_memslot(0, PAGES_1G, PFN0)
    vcpu = vm.vcpu()
    gfns = np.arange(0, PAGES_1G, 37 * 13, dtype=np.uint64)[:300]
    with pytest.raises(impl.OutOfMemory) as info:
        vcpu.fault_batch(gfns)
    done = info.value.completed
    assert 0 < done < len(gfns)
    s = vm.stats
    assert s["faults_fixed"] + s["faults_spurious"] == done
    mapped = set(present_leaves(vm))
    assert mapped == set(gfns[:done].tolist())
    assert vm.pool.nr_free == 0
    vm.audit()


def test_fault_batch_maps_eio_to_cache_config_error(impl):
    """A vCPU cache whose recorded capacity is not 40 makes the fault's top-up -EIO (spec
    §1.3 top-up rule 3, ``__kvm_mmu_topup_memory_cache``): fault_batch raises
    CacheConfigError (not OutOfMemory) after the one fault that needed no top-up, as fault()
    does (docs/API.md fault_batch)."""
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=256, max_level=1)
    vm.add_memslot(0, 1 << 20, PFN0)
    v = vm.vcpu()
    v.cache.topup(5, capacity=6)  # legal: records capacity 6; the fault path asks for 40
    with pytest.raises(impl.CacheConfigError) as info:
        v.fault_batch(np.arange(0, 1 << 20, PAGES_2M, dtype=np.uint64))
    assert not isinstance(info.value, impl.OutOfMemory)
    assert vm.stats["faults_fixed"] == 1
    assert vm.lookup(0) is not None and vm.lookup(PAGES_2M) is None
    with pytest.raises(impl.CacheConfigError):
        v.fault(PAGES_2M)
    vm.audit()


CAS_HANG_CHILD = """
    import importlib, signal, sys
    import numpy as np
    signal.signal(signal.SIGINT, signal.default_int_handler)
    impl = importlib.import_module(sys.argv[1])
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=64)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    vm.inject_cas_failures(2 ** 62)        # every CAS fails: RETRY for ever
    print("ready", flush=True)
    v.fault_batch(np.array([5, 6, 7], dtype=np.uint64))
    print("returned", flush=True)
"""


ZAP_HANG_CHILD = CAS_HANG_CHILD.replace(
    "    vm.inject_cas_failures(2 ** 62)        # every CAS fails: RETRY for ever",
    "    v.fault(5)\n    vm.inject_cas_failures(2 ** 62)        # every CAS fails: lost for ever",
).replace("    v.fault_batch(np.array([5, 6, 7], dtype=np.uint64))",
          "    vm.zap_spte_atomic(5, vm.lookup(5)[1])")


@pytest.mark.parametrize("child", [CAS_HANG_CHILD, ZAP_HANG_CHILD], ids=["fault_batch", "zap_spte_atomic"])
def test_sigint_interrupts_an_operation_stuck_on_lost_races(impl, child):
    """docs/API.md fault_batch: a batch that keeps getting RETRY (here every CAS fails) can
    be interrupted with Ctrl-C, and so can an atomic zap that keeps losing its CAS (KVM's
    callers retry for ever).  It runs in a child interpreter, so a hang fails this test
    only: the child exits with KeyboardInterrupt within 10 s of the signal."""
    assert child.count("inject_cas_failures") == 1
    proc = subprocess.Popen(child_argv(child, impl), env=child_env(impl),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(1.0)
        assert proc.poll() is None, "the operation returned although every CAS fails"
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the operation ignored SIGINT for 10 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err, err


# ==========================================================================================
# 8. Several vCPUs (one thread)
# ==========================================================================================


def test_two_vcpus_share_tables_and_use_their_own_caches(impl):
    """v1's first entry loads the root from v1's cache; v2's first entry tops up v2's cache
    (6.10 kvm_mmu_load: mmu_topup_memory_caches before the root) and takes a reference to
    the same valid root (kvm_tdp_mmu_alloc_root finds it on the list)."""
    vm, layout, v1 = vm_4k(impl)
    v2 = vm.vcpu()
    assert v1.fault(3) == PF_FIXED
    n1 = v1.cache.nobjs
    assert n1 == 40 - 1 - 3  # the root, L3, L2, L1
    assert v2.fault(3) == PF_FIXED  # the A/D slow path drops D (make_spte)
    assert v2.cache.nobjs == 40
    assert v2.root == v1.root == vm.root and vm.roots == [(vm.root, 3, False)]
    assert v2.fault(3) == PF_SPURIOUS
    assert v2.fault(4) == PF_FIXED  # path exists: no table taken
    assert v2.cache.nobjs == 40
    assert v1.cache.nobjs == n1
    assert v2.fault(600) == PF_FIXED  # a new L1 table from v2's cache
    assert v2.cache.nobjs == 39 and v1.cache.nobjs == n1
    assert set(v1.cache.objects).isdisjoint(v2.cache.objects)
    t = table_page(vm, 600, 1)
    assert t not in v1.cache.objects and t not in v2.cache.objects
    assert vm.pool.page_state(t) == "table"
    vm.audit()
