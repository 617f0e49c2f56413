"""The TDP iterator: ``vm.tdp_iter(start, end, min_level)`` lists what KVM's
``for_each_tdp_pte_min_level(iter, root, min_level, start, end)`` visits
(arch/x86/kvm/mmu/tdp_iter.c, v6.10; KVM_MMU_SPEC §6 item 23).

The expectations are KVM's rules, worked by hand: ``tdp_iter_start`` begins at the root
entry covering ``start`` (its gfn rounded down to the root level); ``tdp_iter_next`` tries,
in order, to step down (only from a present non-leaf, re-read first, and not below
``min_level``), to the side (the next entry of the same table), and up then side; the
loop runs while ``iter.valid && iter.gfn < end``.  Both implementations run every test.
"""
import numpy as np
import pytest

from support.layouts import load_root

PFN0 = 0x100000


def make_vm(impl, npages, max_level=3, max_pt_pages=64, root_level=4):
    vm = impl.Vm(impl.SpteLayout.ept(), root_level=root_level, max_level=max_level,
                 max_pt_pages=max_pt_pages)
    vm.add_memslot(0, npages, PFN0)
    return vm

L4_SPAN = 1 << 27          # gfns under one root entry of a 4-level VM
L3_SPAN = 1 << 18
L2_SPAN = 1 << 9


def levels_gfns(entries):
    return [(level, gfn) for level, gfn, _ in entries]


def test_an_empty_vm_visits_root_entries_only(impl):
    """Before any vCPU entry there is no root (6.10 loads it in kvm_mmu_load): nothing to
    visit.  Once a vCPU has loaded one, an empty root is visited entry by entry."""
    vm = make_vm(impl, npages=1 << 20)
    np_value = vm.layout.nonpresent_value
    assert vm.tdp_iter(0, 1) == [] and vm.tdp_iter(0, vm.gfn_limit) == []
    load_root(impl, vm.vcpu())
    assert vm.tdp_iter(0, 1) == [(4, 0, np_value)]
    # Non-present root entries are visited and never stepped into: one per L4_SPAN.
    assert vm.tdp_iter(0, 2 * L4_SPAN) == [(4, 0, np_value), (4, L4_SPAN, np_value)]
    assert len(vm.tdp_iter(0, vm.gfn_limit)) == 512


def test_a_4k_fault_is_walked_root_down_in_pre_order(impl):
    vm = make_vm(impl, npages=1 << 20, max_level=1)
    vm.vcpu().fault(5, write=True)
    entries = vm.tdp_iter(5, 6)
    # tdp_iter_start: every level's gfn is next_last_level_gfn (5) rounded to the level.
    assert levels_gfns(entries) == [(4, 0), (3, 0), (2, 0), (1, 5)]
    leaf = entries[-1][2]
    assert leaf == vm.lookup(5)[0]
    assert [spte for _, _, spte in entries] == [s for _, s in vm.walk(5)]


def test_two_leaf_tables_side_by_side(impl):
    vm = make_vm(impl, npages=1 << 20, max_level=1)
    v = vm.vcpu()
    v.fault(5)
    v.fault(600)
    entries = levels_gfns(vm.tdp_iter(0, 1024))
    # root 0, L3 0, L2 0, then 512 4K entries; at index 511 the side step fails, so up
    # to L2 and side to gfn 512, down again, 512 more; then 1024 is not below end.
    expected = [(4, 0), (3, 0), (2, 0)] + [(1, g) for g in range(512)] + \
        [(2, 512)] + [(1, g) for g in range(512, 1024)]
    assert entries == expected


def test_min_level_stops_the_step_down(impl):
    vm = make_vm(impl, npages=1 << 20, max_level=1)
    v = vm.vcpu()
    v.fault(5)
    v.fault(600)
    assert levels_gfns(vm.tdp_iter(0, 1024, min_level=2)) == [(4, 0), (3, 0), (2, 0), (2, 512)]
    assert levels_gfns(vm.tdp_iter(0, 1024, min_level=4)) == [(4, 0)]


def test_an_unaligned_start_begins_at_the_covering_entries(impl):
    vm = make_vm(impl, npages=1 << 20, max_level=1)
    vm.vcpu().fault(700)
    # start 700: the L1 entries from 700 on, not from the table's first.
    entries = levels_gfns(vm.tdp_iter(700, 1024))
    assert entries[:4] == [(4, 0), (3, 0), (2, 512), (1, 700)]
    assert entries[-1] == (1, 1023) and len(entries) == 3 + (1024 - 700)


def test_an_empty_range_still_visits_the_path_above_start(impl):
    """KVM's loop checks only ``iter.gfn < end``: with start == end the entries whose
    rounded gfn lies below end are visited (tdp_iter.c; KVM never asks for this)."""
    vm = make_vm(impl, npages=1 << 20, max_level=1)
    vm.vcpu().fault(5)
    assert levels_gfns(vm.tdp_iter(5, 5)) == [(4, 0), (3, 0), (2, 0)]
    assert vm.tdp_iter(0, 0) == []


def test_a_huge_leaf_is_not_stepped_into(impl):
    vm = make_vm(impl, npages=1 << 20, max_level=2)
    vm.vcpu().fault(5)
    entries = vm.tdp_iter(0, 1024)
    assert levels_gfns(entries) == [(4, 0), (3, 0), (2, 0), (2, 512)]
    assert vm.layout.is_large_pte(entries[2][2])
    assert entries[3][2] == vm.layout.nonpresent_value


def test_five_level_root(impl):
    vm = make_vm(impl, 1 << 20, max_level=1, root_level=5)
    vm.vcpu().fault(3)
    assert levels_gfns(vm.tdp_iter(3, 4)) == [(5, 0), (4, 0), (3, 0), (2, 0), (1, 3)]
    assert len(vm.tdp_iter(0, vm.gfn_limit, min_level=5)) == 512


def test_the_leaves_it_lists_are_the_ones_zap_gfn_range_zaps(impl, seed):
    """tdp_mmu_zap_leafs runs the same iterator: it zaps exactly the present leaves listed."""
    rng = np.random.default_rng(seed)
    vm = make_vm(impl, npages=1 << 16, max_level=3, max_pt_pages=512)
    v = vm.vcpu()
    for gfn in rng.integers(0, 1 << 16, 200):
        v.fault(int(gfn), write=bool(gfn & 1))
    L = vm.layout
    for _ in range(5):
        start = int(rng.integers(0, 1 << 16))
        end = int(rng.integers(start, (1 << 16) + 1))
        listed = [(level, gfn) for level, gfn, spte in vm.tdp_iter(start, end)
                  if L.is_shadow_present_pte(spte) and L.is_last_spte(spte, level)]
        before = vm.stats
        vm.zap_gfn_range(start, end)
        after = vm.stats
        gone = {lvl: before[k] - after[k]
                for lvl, k in ((1, "pages_4k"), (2, "pages_2m"), (3, "pages_1g"))}
        assert gone == {lvl: sum(1 for l, _ in listed if l == lvl) for lvl in (1, 2, 3)}
        assert all(vm.lookup(g) is None for _, g in listed)


@pytest.mark.parametrize("args, error", [
    ((5, 4), ValueError),                       # start > end
    ((0, (1 << 36) + 1), ValueError),            # end beyond the address width
    ((0, 1, 0), ValueError),                    # min_level below 1
    ((0, 1, 5), ValueError),                    # min_level above the root level
    ((-1, 1), ValueError),
    ((0.0, 1), TypeError),
    ((0, 1, "1"), TypeError),
])
def test_bad_arguments_are_refused_and_change_nothing(impl, args, error):
    vm = make_vm(impl, npages=1 << 20)
    vm.vcpu().fault(5)
    before = (vm.stats, vm.tdp_iter(0, 1024))
    with pytest.raises(error):
        vm.tdp_iter(*args)
    assert (vm.stats, vm.tdp_iter(0, 1024)) == before
    vm.audit()
