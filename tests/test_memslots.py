"""Memslots: ids and listing, the address-width, host-MAXPHYADDR, pfn and overlap rules,
deleting a slot (kvm_mmu_zap_all_fast), and the memslots generation every swap bumps, up to
the MMIO generation's wrap-around, on both implementations (docs/API.md "Vm, Vcpu":
``add_memslot``, ``delete_memslot``, ``memslots``, ``mmio_generation``; the issue 10
contract "Memslots and generations"; KVM_MMU_SPEC.md §1.4 per-VM MMIO value
(949019b98289), §2.2 the 19-bit MMIO generation; upstream 6.10 virt/kvm/kvm_main.c
``kvm_set_memslot`` / ``kvm_swap_active_memslots``, arch/x86/kvm/x86.c
``kvm_arch_prepare_memory_region``, mmu.c ``kvm_mmu_invalidate_mmio_sptes`` /
``kvm_mmu_zap_all_fast``).

Memslot changes from several threads (KVM's ``slots_lock``) are in test_concurrency.py.
"""
import time

import pytest

from support.layouts import leaf_spte, load_root, make_vm, vm_4k
from support.snapshots import assert_same_snapshot, snapshot
from support.spec import MMIO_GEN_MASK, NP63, PF_EMULATE, PF_FIXED, PFN0, gfn_width


# ==========================================================================================
# Ids and listing, the width / pfn / overlap rules, delete_memslot
# ==========================================================================================


def test_memslot_ids_listing_and_generation(impl):
    """Each swap of the active memslots adds kvm_arch_nr_memslot_as_ids() == 2 (x86 with
    SMM) to the generation (6.10 kvm_swap_active_memslots); KVM_MR_CREATE swaps once
    (kvm_create_memslot), KVM_MR_DELETE twice (kvm_invalidate_memslot, then
    kvm_delete_memslot)."""
    vm, _ = make_vm(impl)
    assert vm.mmio_generation == 0
    assert vm.add_memslot(1000, 10, 5000) == 0
    assert vm.mmio_generation == 2
    assert vm.add_memslot(0, 10, 0, readonly=True) == 1
    assert vm.add_memslot(10, 990, 10) == 2  # touching both neighbours: no overlap
    assert vm.mmio_generation == 6
    assert vm.memslots == [(1, 0, 10, 0, True), (2, 10, 990, 10, False), (0, 1000, 10, 5000, False)]
    vm.delete_memslot(2)
    assert vm.mmio_generation == 10
    assert vm.memslots == [(1, 0, 10, 0, True), (0, 1000, 10, 5000, False)]
    # ids are never reused
    assert vm.add_memslot(20, 5, 20) == 3
    assert vm.mmio_generation == 12
    vm.audit()


@pytest.mark.parametrize("root_level", [4, 5])
def test_memslot_address_width_limits(impl, root_level):
    """With a 52-bit host the pfn bound is 2**40 and kvm_mmu_max_gfn() is 2**40 - 1: the
    address width of the root level is the gfn bound for 4 levels (2**36), the host's
    MAXPHYADDR for 5 levels (6.10 x86.c kvm_arch_prepare_memory_region: ``if ((new->base_gfn
    + new->npages - 1) > kvm_mmu_max_gfn()) return -EINVAL``)."""
    vm, _ = make_vm(impl, root_level=root_level, host_maxphyaddr=52)
    assert vm.host_maxphyaddr == 52 and vm.max_gfn == (1 << 40) - 1
    top = min(gfn_width(root_level), vm.max_gfn + 1)
    assert top == (1 << 36 if root_level == 4 else 1 << 40)
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


@pytest.mark.parametrize("phys", [46, 36])
@pytest.mark.parametrize("root_level", [4, 5])
def test_memslot_host_maxphyaddr_limits(impl, root_level, phys):
    """The host's MAXPHYADDR bounds both sides of a slot: gfns by kvm_mmu_max_gfn()
    (``(1 << (shadow_phys_bits - PAGE_SHIFT)) - 1`` with TDP; kvm_arch_prepare_memory_region
    -EINVAL) and pfns by what the host can have (pfn + npages <= 1 << (phys - 12)); the
    default host has 46 bits.  A refused slot changes nothing."""
    kw = {} if phys == 46 else {"host_maxphyaddr": phys}
    vm, _ = make_vm(impl, root_level=root_level, **kw)
    limit = 1 << (phys - 12)
    assert vm.host_maxphyaddr == phys and vm.max_gfn == limit - 1
    before = snapshot(vm)
    for args in [(limit, 1, 100), (limit - 1, 2, 100), (limit - 10, 11, 100),
                 (5, 1, limit), (5, 2, limit - 1)]:
        with pytest.raises(ValueError):
            vm.add_memslot(*args)
        assert_same_snapshot(dict(before), snapshot(vm))
    assert vm.add_memslot(limit - 1, 1, 7) == 0
    assert vm.add_memslot(0, 1, limit - 1) == 1
    v = vm.vcpu()
    assert v.fault(limit - 1) == PF_FIXED
    # past the host's gfns no slot can exist: kvm_handle_noslot_fault emulates without
    # installing an SPTE (``if (unlikely(fault->gfn > kvm_mmu_max_gfn())) return
    # RET_PF_EMULATE``), for a gfn the root level can still address
    if limit < gfn_width(root_level):
        assert v.fault(limit) == PF_EMULATE
        assert vm.lookup(limit) is None
        assert not [x for _l, x in vm.walk(limit) if vm.layout.is_mmio_spte(x)]
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
    assert vcpu.fault(5) == PF_EMULATE  # an MMIO SPTE of generation 2 (one swap)
    before = snapshot(vm, [vcpu])
    with pytest.raises(exc):
        vm.add_memslot(*args)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    assert vm.mmio_generation == 2
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
    assert vm.mmio_generation == 2 + 4  # one swap to create, two to delete
    vm.audit()


def test_delete_memslot_zaps_all_fast_without_a_flush(impl):
    """6.10 KVM_MR_DELETE (kvm_main.c kvm_set_memslot): swap (invalidate),
    kvm_arch_flush_shadow_memslot -- on x86 kvm_mmu_zap_all_fast --, swap (delete).
    kvm_mmu_zap_all_fast invalidates every root (kvm_tdp_mmu_invalidate_all_roots) and zaps
    them (kvm_tdp_mmu_zap_invalidated_roots): every mapping goes, the other slot's too, and
    no TLB flush is counted ("the vCPU's kvm_mmu_load flushes its local TLB").  The MMU's
    reference is put; the vCPU keeps the invalid root until its next entry, which puts it
    (freeing it) and loads a fresh root from the vCPU cache (kvm_mmu_reload)."""
    vm, layout, vcpu = vm_4k(impl)
    other = vm.add_memslot(4096, 16, 5 * PFN0)
    for g in (0, 1, 1023):
        vcpu.fault(g, write=True)
    vcpu.fault(4096)
    old = vcpu.root
    assert vm.roots == [(old, 2, False)]
    s0 = vm.stats
    assert s0["pt_pages"] == 6  # root, L3, L2, three L1
    gen = vm.mmio_generation
    vm.delete_memslot(0)
    s1 = vm.stats
    assert vm.mmio_generation == gen + 4
    assert s1["tlb_flushes_ranged"] == s0["tlb_flushes_ranged"]
    assert s1["tlb_flushes"] == s0["tlb_flushes"]
    assert s1["pages_4k"] == 0
    assert s1["tables_freed"] == s0["tables_freed"] + 5 and s1["pt_pages"] == 1
    assert vm.root is None and vm.roots == [(old, 1, True)] and vcpu.root == old
    assert (vm.pool.pages[old] == layout.nonpresent_value).all()
    for g in (0, 1, 1023, 4096):
        assert vm.lookup(g) is None and vm.walk(g) == []
    vm.audit()
    # the next entry puts the invalid root and loads a new one; the other slot faults again
    assert vcpu.fault(4096) == PF_FIXED
    s2 = vm.stats
    new = vcpu.root
    assert new != old and vm.roots == [(new, 2, False)]
    assert vm.pool.page_state(old) == "free"
    assert s2["tables_freed"] == s1["tables_freed"] + 1
    assert s2["tables_allocated"] == s1["tables_allocated"] + 4  # root, L3, L2, L1
    assert s2["pt_pages"] == 4 and s2["pages_4k"] == 1
    for g in (0, 1, 1023):  # the new root has only the path to 4096: no L1 there
        assert vm.walk(g)[-1] == (2, layout.nonpresent_value)
    vm.audit()
    # deleting a slot never counts a flush: only the ranged zap does
    vm.zap_gfn_range(4096, 4112)
    s3 = vm.stats
    assert s3["tlb_flushes_ranged"] == s2["tlb_flushes_ranged"] + 1
    vm.delete_memslot(other)
    s4 = vm.stats
    assert s4["tlb_flushes_ranged"] == s3["tlb_flushes_ranged"]
    assert s4["tlb_flushes"] == s3["tlb_flushes"]
    vm.audit()


# ==========================================================================================
# MMIO generation wrap-around
# ==========================================================================================


WRAP_DEADLINE = 120  # seconds: a hang guard, not a performance check


@pytest.mark.slow
def test_mmio_generation_wrap_zaps_every_spte(impl):
    """The generation is +2 per memslot swap; after each swap 6.10
    kvm_mmu_invalidate_mmio_sptes masks it with MMIO_SPTE_GEN_MASK and
    ~(kvm_arch_nr_memslot_as_ids() - 1) and, when that is 0 -- after 2**18 swaps --, calls
    kvm_mmu_zap_all_fast: every SPTE goes at once (the old MMIO SPTE, whose generation would
    come back, and the RAM leaf), with no TLB flush counted.  Deletes zap everything
    themselves (kvm_mmu_zap_all_fast), so the last swaps before the wrap are creates, which
    zap nothing: the leaves installed just before them are still there until the wrap."""
    vm = make_vm(impl, max_pt_pages=64)[0]
    vm.add_memslot(0, 1024, PFN0)
    swaps = 1
    v = vm.vcpu()
    mmio_gfn = 0x40000
    flushes = vm.stats["tlb_flushes"], vm.stats["tlb_flushes_ranged"]
    start = time.monotonic()
    wrap = 1 << 18
    n = 0
    while wrap - swaps > 3:
        sid = vm.add_memslot(1 << 30, 1, PFN0 + (1 << 20))
        vm.delete_memslot(sid)
        swaps += 3
        n += 1
        if n % 4096 == 0 and time.monotonic() - start > WRAP_DEADLINE:
            pytest.fail(f"only {swaps} memslot swaps in {WRAP_DEADLINE} s")
    assert vm.mmio_generation == 2 * swaps
    # the last swaps before the wrap: creates only
    k = 0
    while swaps < wrap - 1:
        vm.add_memslot((1 << 30) + k, 1, PFN0 + (1 << 20) + k)
        swaps += 1
        k += 1
    assert v.fault(5, write=True) == PF_FIXED
    assert v.fault(mmio_gfn) == PF_EMULATE
    mmio = vm.walk(mmio_gfn)[-1][1]
    assert vm.layout.is_mmio_spte(mmio)
    assert vm.layout.get_mmio_spte_generation(mmio) == (2 * swaps) & MMIO_GEN_MASK
    root = v.root
    vm.add_memslot((1 << 30) + k, 1, PFN0 + (1 << 20) + k)  # the swap that wraps
    swaps += 1
    assert swaps == wrap
    assert vm.mmio_generation == 2 * wrap and (vm.mmio_generation & MMIO_GEN_MASK) == 0
    assert vm.root is None and vm.roots == [(root, 1, True)]
    assert vm.lookup(5) is None and vm.walk(5) == []
    assert (vm.pool.pages[root] == NP63).all()
    assert vm.stats["pages_2m"] == 0 and vm.stats["pages_4k"] == 0
    assert (vm.stats["tlb_flushes"], vm.stats["tlb_flushes_ranged"]) == flushes
    vm.audit()
    # the vCPU's next entry loads a new root: nothing of the old mappings is left
    load_root(impl, v)
    assert vm.walk(5)[-1][1] == NP63 and vm.walk(mmio_gfn)[-1][1] == NP63
    vm.audit()


# ==========================================================================================
# KVM_MR_MOVE
# ==========================================================================================


def test_move_memslot_swaps_twice_around_zap_all_fast(impl):
    """6.10 kvm_set_memslot for KVM_MR_MOVE: the new range is checked as for a create
    (address width, kvm_mmu_max_gfn, overlap with the *other* slots), then swap
    (kvm_invalidate_memslot), kvm_arch_flush_shadow_memslot (x86: kvm_mmu_zap_all_fast),
    swap (kvm_move_memslot): +4, every root invalidated and zapped, no TLB flush counted.
    Id, size, pfn and read-only flag stay; host page flags stay (the zap pushed D).  The
    same base is no change at all (kvm_set_memory_region: base and flags unchanged ->
    return 0 before any swap).  A move refused by __kvm_set_memory_region (unknown id,
    overlap, our address width) changes nothing."""
    vm, layout = make_vm(impl, max_level=1)
    a = vm.add_memslot(0, 16, PFN0)
    b = vm.add_memslot(100, 16, 2 * PFN0, readonly=True)
    v = vm.vcpu()
    assert v.fault(3, write=True) == PF_FIXED
    root = v.root
    before = snapshot(vm, [v])
    for args in [(a, 95), (a, 110), (a, gfn_width(4) - 15), (7, 0), (-1, 0)]:
        with pytest.raises(ValueError):
            vm.move_memslot(*args)
        assert_same_snapshot(dict(before), snapshot(vm, [v]))
    with pytest.raises(TypeError):
        vm.move_memslot(a, 1.0)
    gen, s0 = vm.mmio_generation, vm.stats
    assert vm.move_memslot(a, a * 0) is None  # the same base: nothing happens
    assert vm.mmio_generation == gen and vm.roots == [(root, 2, False)]
    assert vm.move_memslot(a, 1000) is None
    s1 = vm.stats
    assert vm.mmio_generation == gen + 4
    assert vm.memslots == [(b, 100, 16, 2 * PFN0, True), (a, 1000, 16, PFN0, False)]
    assert vm.root is None and vm.roots == [(root, 1, True)]
    assert (vm.pool.pages[root] == layout.nonpresent_value).all()
    assert s1["pages_4k"] == 0 and s1["tables_freed"] == s0["tables_freed"] + 3
    assert (s1["tlb_flushes"], s1["tlb_flushes_ranged"]) == \
        (s0["tlb_flushes"], s0["tlb_flushes_ranged"])
    assert vm.host_page_dirty(PFN0 + 3) is True  # the zap pushed the leaf's D
    vm.audit()
    # the old gfns are no slot's any more; the new ones map the same host pages
    assert v.fault(3) == PF_EMULATE
    assert v.root != root and vm.pool.page_state(root) == "free"
    assert v.fault(1003) == PF_FIXED
    assert vm.lookup(1003)[0] == leaf_spte(layout, PFN0 + 3)
    vm.audit()


def test_zap_all_fast_invalidates_every_root_and_zaps_them(impl):
    """6.10 kvm_mmu_zap_all_fast: kvm_tdp_mmu_invalidate_all_roots marks the valid root
    invalid and puts the MMU's reference; kvm_tdp_mmu_zap_invalidated_roots zaps it
    (shared); no TLB flush is counted.  Each vCPU keeps its invalid root until its next
    entry, which puts it (the last put frees it: kvm_tdp_mmu_put_root) and loads a new
    valid root that all vCPUs then share."""
    vm, layout, v1 = vm_4k(impl)
    v2 = vm.vcpu()
    assert v1.fault(5, write=True) == PF_FIXED
    load_root(impl, v2)
    old = v1.root
    assert v2.root == old and vm.roots == [(old, 3, False)]
    s0 = vm.stats
    assert vm.zap_all_fast() is None
    s1 = vm.stats
    assert vm.root is None and vm.roots == [(old, 2, True)]
    assert (vm.pool.pages[old] == layout.nonpresent_value).all()
    assert s1["pages_4k"] == 0 and s1["pt_pages"] == 1
    assert s1["tables_freed"] == s0["tables_freed"] + 3
    assert (s1["tlb_flushes"], s1["tlb_flushes_ranged"]) == \
        (s0["tlb_flushes"], s0["tlb_flushes_ranged"])
    assert vm.walk(5) == [] and vm.lookup(5) is None
    vm.audit()
    assert v1.fault(5) == PF_FIXED  # v1 puts its reference and loads a fresh root
    new = v1.root
    assert new != old
    assert vm.roots == [(new, 2, False), (old, 1, True)]  # newest first
    vm.audit()
    load_root(impl, v2)  # v2's put is the last: the old root is freed
    assert vm.roots == [(new, 3, False)] and vm.pool.page_state(old) == "free"
    assert vm.stats["tables_freed"] == s1["tables_freed"] + 1
    assert vm.zap_all_fast() is None and vm.zap_all_fast() is None  # nothing valid: no-op
    vm.audit()


def test_move_memslot_past_max_gfn_is_refused_after_the_invalidation(impl):
    """6.10 kvm_set_memslot invalidates a moved slot (kvm_invalidate_memslot: a swap, then
    kvm_arch_flush_shadow_memslot = kvm_mmu_zap_all_fast) *before*
    kvm_prepare_memory_region, where kvm_arch_prepare_memory_region refuses a new range
    past kvm_mmu_max_gfn() with -EINVAL; the failure is reverted by another swap
    (kvm_activate_memslot(kvm, invalid_slot, old): "For DELETE/MOVE, revert the above
    INVALID change").  So the refused move leaves the slot where it was, but the generation
    has moved by 4 and every root was invalidated and zapped.  (The issue 10 contract's
    "bad arguments raise before anything changes" does not hold here in 6.10.)"""
    vm, layout = make_vm(impl, max_level=1)
    a = vm.add_memslot(0, 16, PFN0)
    v = vm.vcpu()
    assert v.fault(3, write=True) == PF_FIXED
    root, gen, slots = v.root, vm.mmio_generation, vm.memslots
    with pytest.raises(ValueError):
        vm.move_memslot(a, vm.max_gfn - 14)  # last gfn max_gfn + 1
    assert vm.memslots == slots
    assert vm.mmio_generation == gen + 4
    assert vm.root is None and vm.roots == [(root, 1, True)]
    assert vm.stats["pages_4k"] == 0
    vm.audit()
    assert vm.move_memslot(a, vm.max_gfn - 15) is None  # the last gfn is fine
    assert vm.memslots == [(a, vm.max_gfn - 15, 16, PFN0, False)]
    vm.audit()
