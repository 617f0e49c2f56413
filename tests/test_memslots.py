"""Memslots: ids and listing, the address-width, pfn and overlap rules, deleting a slot
(which zaps its range), and the MMIO generation every change bumps, up to its wrap-around,
on both implementations (docs/API.md "Vm, Vcpu": ``add_memslot``, ``delete_memslot``,
``memslots``, ``mmio_generation``; KVM_MMU_SPEC.md §1.4 per-VM MMIO value (949019b98289),
§2.2 the 19-bit MMIO generation, §3.10 the zap of a deleted slot's range; upstream
``kvm_mmu_invalidate_mmio_sptes``).

Memslot changes from several threads (KVM's ``slots_lock``) are in test_concurrency.py.
"""
import time

import pytest

from support.layouts import make_vm, vm_4k
from support.snapshots import assert_same_snapshot, snapshot
from support.spec import NP63, PF_EMULATE, PF_FIXED, PFN0, gfn_width


# ==========================================================================================
# Ids and listing, the width / pfn / overlap rules, delete_memslot
# ==========================================================================================


def test_memslot_ids_listing_and_generation(impl):
    vm, _ = make_vm(impl)
    assert vm.add_memslot(1000, 10, 5000) == 0
    assert vm.mmio_generation == 1
    assert vm.add_memslot(0, 10, 0, readonly=True) == 1
    assert vm.add_memslot(10, 990, 10) == 2  # touching both neighbours: no overlap
    assert vm.mmio_generation == 3
    assert vm.memslots == [(1, 0, 10, 0, True), (2, 10, 990, 10, False), (0, 1000, 10, 5000, False)]
    vm.delete_memslot(2)
    assert vm.mmio_generation == 4
    assert vm.memslots == [(1, 0, 10, 0, True), (0, 1000, 10, 5000, False)]
    # ids are never reused
    assert vm.add_memslot(20, 5, 20) == 3
    assert vm.mmio_generation == 5
    vm.audit()


@pytest.mark.parametrize("root_level", [4, 5])
def test_memslot_address_width_limits(impl, root_level):
    vm, _ = make_vm(impl, root_level=root_level)
    top = gfn_width(root_level)
    assert top == (1 << 36 if root_level == 4 else 1 << 45)
    before = snapshot(vm)
    for args in [(top, 1, 100), (top - 1, 2, 100), (top - 10, 11, 100), (1 << 52, 1, 100),
                 (5, 1, 1 << 40), (5, 2, (1 << 40) - 1), (5, 1, 1 << 41)]:
        with pytest.raises(ValueError):
            vm.add_memslot(*args)
        assert_same_snapshot(dict(before), snapshot(vm))
    # the last gfn and the last pfn are fine
    assert vm.add_memslot(top - 1, 1, 7) == 0
    assert vm.add_memslot(0, 1, (1 << 40) - 1) == 1
    assert vm.add_memslot(top - 11, 10, (1 << 40) - 11) == 2
    assert vm.vcpu().fault(top - 1) == PF_FIXED
    vm.audit()


@pytest.mark.parametrize(
    "args, exc",
    [
        ((100, 10, 5000), ValueError),  # gfn overlap: identical
        ((95, 10, 5000), ValueError),  # gfn overlap: tail into the slot
        ((109, 1, 5000), ValueError),  # gfn overlap: last page
        ((50, 100, 5000), ValueError),  # gfn overlap: covers the slot
        ((102, 2, 5000), ValueError),  # gfn overlap: inside
        ((0, 10, 1000), ValueError),  # pfn overlap: identical
        ((0, 10, 995), ValueError),  # pfn overlap: tail
        ((0, 1, 1009), ValueError),  # pfn overlap: last pfn
        ((0, 100, 950), ValueError),  # pfn overlap: covers
        ((0, 0, 5000), ValueError),  # npages 0
        ((0, -1, 5000), ValueError),
        ((-1, 1, 5000), ValueError),
        ((0, 1, -1), ValueError),
        ((0.0, 1, 5000), TypeError),
        ((0, 1.5, 5000), TypeError),
        ((0, 1, "5000"), TypeError),
    ],
)
def test_memslot_refused_changes_nothing(impl, args, exc):
    vm, layout = make_vm(impl)
    vm.add_memslot(100, 10, 1000)
    vcpu = vm.vcpu()
    assert vcpu.fault(100, write=True) == PF_FIXED
    assert vcpu.fault(5) == PF_EMULATE  # an MMIO SPTE of generation 1
    before = snapshot(vm, [vcpu])
    with pytest.raises(exc):
        vm.add_memslot(*args)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    assert vm.mmio_generation == 1
    vm.audit()


def test_memslot_adjacent_ranges_accepted(impl):
    vm, _ = make_vm(impl)
    vm.add_memslot(100, 10, 1000)
    vm.add_memslot(110, 10, 990)  # gfn right after, pfn right before
    vm.add_memslot(90, 10, 1010)  # gfn right before, pfn right after
    assert [s[1] for s in vm.memslots] == [90, 100, 110]
    vm.audit()


def test_delete_unknown_memslot(impl):
    vm, _ = make_vm(impl)
    sid = vm.add_memslot(0, 10, 0)
    before = snapshot(vm)
    for bad in (sid + 1, 99, -1):
        with pytest.raises(ValueError):
            vm.delete_memslot(bad)
        assert_same_snapshot(dict(before), snapshot(vm))
    vm.delete_memslot(sid)
    with pytest.raises(ValueError):
        vm.delete_memslot(sid)
    assert vm.mmio_generation == 2
    vm.audit()


def test_delete_memslot_zaps_its_range_and_flushes(impl):
    vm, layout, vcpu = vm_4k(impl)
    other = vm.add_memslot(4096, 16, 5 * PFN0)
    for g in (0, 1, 1023):
        vcpu.fault(g, write=True)
    vcpu.fault(4096)
    s0 = vm.stats
    vm.delete_memslot(0)
    s1 = vm.stats
    assert s1["tlb_flushes_ranged"] == s0["tlb_flushes_ranged"] + 1
    assert s1["pages_4k"] == s0["pages_4k"] - 3
    assert s1["tables_freed"] == s0["tables_freed"]
    for g in (0, 1, 1023):
        assert vm.lookup(g) is None
        assert vm.walk(g)[-1] == (1, layout.nonpresent_value)
    assert vm.lookup(4096) is not None
    vm.audit()
    # deleting a slot with nothing mapped needs no flush
    s2 = vm.stats
    vm.zap_gfn_range(4096, 4112)
    vm.delete_memslot(other)
    assert vm.stats["tlb_flushes_ranged"] == s2["tlb_flushes_ranged"] + 1  # the zap only
    vm.audit()


# ==========================================================================================
# MMIO generation wrap-around
# ==========================================================================================


WRAP_DEADLINE = 120  # seconds: a hang guard, not a performance check


@pytest.mark.slow
def test_mmio_generation_wrap_zaps_every_spte(impl):
    """After 2**19 memslot changes the generation (API.md: +1 per change, modulo 2**19) is 0
    again, and, as kvm_mmu_invalidate_mmio_sptes does, every SPTE is zapped at once: the old
    MMIO SPTE (whose generation 1 would come back) and the RAM leaf are gone, with one full
    TLB flush."""
    vm = make_vm(impl, max_pt_pages=64)[0]
    vm.add_memslot(0, 1024, PFN0)  # generation 1
    v = vm.vcpu()
    mmio_gfn = 0x40000
    assert v.fault(5, write=True) == PF_FIXED
    assert v.fault(mmio_gfn) == PF_EMULATE
    mmio = vm.walk(mmio_gfn)[-1][1]
    assert vm.layout.is_mmio_spte(mmio) and vm.layout.get_mmio_spte_generation(mmio) == 1
    flushes = vm.stats["tlb_flushes"]
    start = time.monotonic()
    changes = 1
    while True:
        sid = vm.add_memslot(1 << 30, 1, PFN0 + (1 << 20))
        changes += 1
        if changes == 1 << 19:
            break
        vm.delete_memslot(sid)
        changes += 1
        if changes % 4096 == 1:
            assert vm.lookup(5) is not None  # nothing is zapped before the wrap
            if time.monotonic() - start > WRAP_DEADLINE:
                pytest.fail(f"only {changes} memslot changes in {WRAP_DEADLINE} s")
    assert vm.mmio_generation == 0
    assert vm.lookup(5) is None
    assert vm.walk(5)[-1][1] == NP63
    assert vm.walk(mmio_gfn)[-1][1] == NP63
    assert vm.stats["pages_2m"] == 0 and vm.stats["pages_4k"] == 0
    assert vm.stats["tlb_flushes"] == flushes + 1
    vm.audit()
