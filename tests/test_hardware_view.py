"""Issue 10: the vCPU as hardware, on both implementations.

Each row of the issue's divergence table, each simplification it removes, and the contract
of ``access``/``access_batch`` and error-coded faults (docs/API.md "Vm, Vcpu", "The hardware
view").  Every expected value is derived from the Linux 6.10 function named in the test,
never from an implementation's output:

* mmu.c ``kvm_mmu_page_fault``, ``handle_mmio_page_fault``, ``page_fault_can_be_fast``,
  ``fast_page_fault``, ``kvm_handle_noslot_fault``, ``kvm_mmu_load``;
  mmu_internal.h ``kvm_mmu_do_page_fault``; spte.c ``make_spte``, ``make_mmio_spte``,
  ``kvm_mmu_reset_all_pte_masks``; tdp_mmu.c ``kvm_tdp_mmu_alloc_root``,
  ``kvm_tdp_mmu_put_root``, ``kvm_tdp_mmu_invalidate_all_roots``,
  ``kvm_tdp_mmu_zap_invalidated_roots``, ``kvm_tdp_mmu_zap_all``, ``handle_changed_spte``;
  kvm_main.c ``kvm_set_memslot``, ``kvm_swap_active_memslots``; x86.c
  ``kvm_arch_prepare_memory_region``; mmu.h ``kvm_mmu_max_gfn``; vmx.c
  ``handle_ept_violation`` / ``handle_ept_misconfig``.
* The CPU's walk: Intel SDM vol. 3 §29.3 (EPT: present = any of R/W/X; W without R is a
  misconfiguration; A on use, D on a write), AMD APM vol. 2 §15.25 (#NPF error code; a PA
  bit at or above MAXPHYADDR is reserved).
"""
import numpy as np
import pytest

from support.layouts import make_layout
from support.spec import NP63, PF_EMULATE, PF_FIXED, PF_RETRY, PF_SPURIOUS

PFERR_PRESENT, PFERR_WRITE, PFERR_USER, PFERR_RSVD, PFERR_FETCH = 1, 2, 4, 8, 16
EPT_A, EPT_D = 1 << 8, 1 << 9
NPT_A, NPT_D = 1 << 5, 1 << 6
#: spte.h: a 4K EPT leaf of a writable slot with A/D: bit 63 | host/MMU-writable (57, 58)
#: | bit 11 | A | D | WB+IPAT (0x70) | RWX.  §2.6 of the spec works the same decode.
EPT_LEAF_4K = (1 << 63) | (1 << 58) | (1 << 57) | 0x800 | EPT_A | EPT_D | 0x70 | 0x7


def vm_of(impl, kind="ept_ad", **kw):
    kw.setdefault("max_pt_pages", 256)
    return impl.Vm(make_layout(impl, kind), **kw)


def test_constants(impl):
    """arch/x86/include/asm/kvm_host.h PFERR_*_BIT: P 0, W 1, U 2, RSVD 3, FETCH 4."""
    assert (impl.PFERR_PRESENT_MASK, impl.PFERR_WRITE_MASK, impl.PFERR_USER_MASK,
            impl.PFERR_RSVD_MASK, impl.PFERR_FETCH_MASK) == (1, 2, 4, 8, 16)
    assert impl.ACCESS_HIT == 0


# ==========================================================================================
# Row 1 / 1b: a not-present re-fault takes the slow path when A/D bits are in use
# ==========================================================================================


def test_row1_ept_ad_refault_of_a_1g_leaf_drops_d_and_pushes_it_to_the_page(impl):
    """page_fault_can_be_fast: a not-present fault is fast only when !kvm_ad_enabled(), so
    the read re-fault goes to kvm_tdp_mmu_map; make_spte with a writable old SPTE returns
    before OR-ing D (the "skip the unsync check and the dirty bit" early return), so the
    1G leaf ...bf7 becomes ...9f7 (A = bit 8 kept, D = bit 9 gone; the issue's "...0af7"
    swaps the two bits); handle_changed_spte pushes the old D to the pfn.  FIXED."""
    vm = vm_of(impl)
    vm.add_memslot(0, 1 << 20, 0x100000)
    v = vm.vcpu()
    assert v.fault(5, write=True) == PF_FIXED
    assert vm.lookup(5) == (0x8600000100000BF7, 3)
    assert not vm.host_page_dirty(0x100000)
    assert v.fault(5) == PF_FIXED
    assert vm.lookup(5) == (0x86000001000009F7, 3)
    assert vm.host_page_dirty(0x100000)
    assert vm.stats["faults_fast"] == 0
    # The CPU's next write through that leaf sets D again (SDM: D on a write), no exit.
    assert v.access(7, write=True) is None
    assert vm.lookup(5) == (0x8600000100000BF7, 3)
    assert vm.stats["hw_ad_sets"] == 1 and vm.stats["exits_ept_violation"] == 0
    vm.audit()


@pytest.mark.parametrize("kind, second, expect", [
    # EPT A/D, exec re-fault at 4K: make_spte drops D (old writable), keeps A, X, R, W.
    ("ept_ad", dict(exec=True), 0x8600000100005977),
    # NPT read re-fault at 4K: P | W | U | A (bit 5) | bit 9 | bit 10 | bit 11, no D, no NX.
    ("npt", dict(), 0x100005E27),
])
def test_row1b_refault_at_4k_drops_d(impl, kind, second, expect):
    """Same rules as row 1 (page_fault_can_be_fast, make_spte, handle_changed_spte)."""
    vm = vm_of(impl, kind, max_level=1)
    vm.add_memslot(0, 1 << 20, 0x100000)
    v = vm.vcpu()
    assert v.fault(5, write=True) == PF_FIXED
    assert v.fault(5, **second) == PF_FIXED
    assert vm.lookup(5) == (expect, 1)
    assert vm.host_page_dirty(0x100005)
    vm.audit()


def test_ept_without_ad_refault_takes_the_fast_path(impl):
    """page_fault_can_be_fast: !present and !kvm_ad_enabled() -> fast_page_fault, which
    finds the access allowed: SPURIOUS, counted in pf_fast, the leaf unchanged."""
    vm = vm_of(impl, "ept_noad", max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    assert v.fault(5, write=True) == PF_FIXED
    leaf = vm.lookup(5)
    assert v.fault(5) == PF_SPURIOUS
    assert vm.lookup(5) == leaf
    assert vm.stats["faults_fast"] == 1 and vm.stats["faults_spurious"] == 1
    assert v.stats["faults_fast"] == 1
    vm.audit()


def test_present_write_fault_on_a_writable_leaf_is_answered_by_the_fast_path(impl):
    """page_fault_can_be_fast: a PRESENT fault is fast for a write; fast_page_fault:
    is_access_allowed -> SPURIOUS (pf_fast)."""
    vm = vm_of(impl, "ept_ad", max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    assert v.fault(5, error_code=PFERR_PRESENT | PFERR_WRITE) == PF_SPURIOUS
    assert vm.stats["faults_fast"] == 1


def test_present_write_fault_on_a_read_only_slot_is_emulated_by_the_slow_path(impl):
    """fast_page_fault gives up (not MMU-writable: new_spte == spte); the slow path's
    kvm_faultin_pfn sees a write to a read-only slot: RET_PF_EMULATE (pf_emulate)."""
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000, readonly=True)
    v = vm.vcpu()
    assert v.fault(5) == PF_FIXED
    leaf = vm.lookup(5)
    assert v.access(5, write=True) == PF_EMULATE
    assert vm.lookup(5) == leaf
    assert vm.stats["exits_ept_violation"] == 1 and vm.stats["faults_fast"] == 0
    assert vm.stats["faults_emulate"] == 1


# ==========================================================================================
# Row 2: an access to an MMIO SPTE is a misconfiguration, emulated without a top-up
# ==========================================================================================


@pytest.mark.parametrize("kind", ["ept_ad", "npt"])
def test_row2_access_to_a_current_mmio_spte_emulates_without_a_top_up(impl, kind):
    """handle_ept_misconfig -> kvm_mmu_page_fault(PFERR_RSVD_MASK) (an NPT #NPF carries
    RSVD for bit 51) -> handle_mmio_page_fault: EMULATE, no cache top-up.  A plain
    not-present fault() still tops up (kvm_tdp_mmu_page_fault: the A/D-enabled VM has no
    fast path for it) and here the pool is exhausted."""
    vm = vm_of(impl, kind, max_pt_pages=8)
    v = vm.vcpu()
    assert v.fault(1 << 30) == PF_EMULATE
    mmio = vm.walk(1 << 30)[-1][1]
    assert vm.layout.is_mmio_spte(mmio)
    before = vm.stats
    assert v.access(1 << 30) == PF_EMULATE
    assert v.access(1 << 30, write=True) == PF_EMULATE
    assert v.fault(1 << 30, error_code=PFERR_RSVD) == PF_EMULATE
    after = vm.stats
    assert after["exits_misconfig"] == before["exits_misconfig"] + 2
    # handle_mmio_page_fault's EMULATE returns before kvm_mmu_do_page_fault counts pf_*.
    assert after["faults_emulate"] == before["faults_emulate"]
    assert after["cache_fills"] == before["cache_fills"]
    with pytest.raises(impl.OutOfMemory):
        v.fault(1 << 30)
    vm.audit()


def test_rsvd_fault_on_an_old_generation_takes_the_slow_path(impl):
    """check_mmio_spte fails for another generation: RET_PF_INVALID, so
    kvm_mmu_do_page_fault remakes the MMIO SPTE with the current generation (EMULATE,
    pf_emulate +1, pf_mmio_spte_created)."""
    vm = vm_of(impl)
    v = vm.vcpu()
    assert v.fault(1 << 30) == PF_EMULATE
    vm.add_memslot(0, 16, 0x100000)                 # one swap: generation 2
    assert vm.layout.get_mmio_spte_generation(vm.walk(1 << 30)[-1][1]) == 0
    emulated = vm.stats["faults_emulate"]
    assert v.access(1 << 30) == PF_EMULATE
    spte = vm.walk(1 << 30)[-1][1]
    assert vm.layout.get_mmio_spte_generation(spte) == 2
    assert vm.stats["faults_emulate"] == emulated + 1
    assert vm.stats["mmio_sptes_created"] == 2
    vm.audit()


def test_rsvd_fault_without_an_mmio_spte_retries(impl):
    """handle_mmio_page_fault: the last SPTE is not MMIO (zapped meanwhile) and the vCPU's
    MMIO info is for another gfn -> RET_PF_RETRY."""
    vm = vm_of(impl)
    vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    assert v.fault(3) == PF_FIXED
    assert v.fault(3, error_code=PFERR_RSVD) == PF_RETRY


# ==========================================================================================
# Row 3: generations as kvm_swap_active_memslots counts them
# ==========================================================================================


def test_row3_generation_moves_by_two_per_swap_and_a_delete_swaps_twice(impl):
    """kvm_swap_active_memslots: += kvm_arch_nr_memslot_as_ids() (2 on x86 with SMM);
    kvm_set_memslot: CREATE one swap, DELETE and MOVE two (the invalid copy, then the
    change)."""
    vm = vm_of(impl)
    assert vm.mmio_generation == 0
    a = vm.add_memslot(0, 16, 0x100000)
    b = vm.add_memslot(16, 16, 0x100010)
    assert vm.mmio_generation == 4
    vm.delete_memslot(a)
    assert vm.mmio_generation == 8
    vm.move_memslot(b, 1024)
    assert vm.mmio_generation == 12
    assert vm.memslots == [(b, 1024, 16, 0x100010, False)]
    vm.move_memslot(b, 1024)                        # same place: no change, no swap
    assert vm.mmio_generation == 12
    vm.audit()


def test_delete_zaps_every_root_fast_and_counts_no_flush(impl):
    """kvm_arch_flush_shadow_memslot is kvm_mmu_zap_all_fast in 6.10: every root is
    invalidated and zapped -- leaves of other slots too -- and no remote flush is made
    (kvm_tdp_mmu_zap_invalidated_roots: the new root's load flushes locally)."""
    vm = vm_of(impl, max_level=1)
    a = vm.add_memslot(0, 16, 0x100000)
    vm.add_memslot(1024, 16, 0x200000)
    v = vm.vcpu()
    v.fault(1)
    v.fault(1025)
    old_root = v.root
    flushes = (vm.stats["tlb_flushes"], vm.stats["tlb_flushes_ranged"])
    vm.delete_memslot(a)
    assert vm.lookup(1025) is None
    assert (vm.stats["tlb_flushes"], vm.stats["tlb_flushes_ranged"]) == flushes
    assert vm.roots == [(old_root, 1, True)]        # only the vCPU's reference is left
    assert vm.root is None
    assert v.access(1025) == PF_FIXED               # a new root, the page faulted again
    assert v.root != old_root and vm.roots == [(v.root, 2, False)]
    vm.audit()


def test_move_memslot_keeps_the_pages_and_refaults_at_the_new_place(impl):
    """KVM_MR_MOVE: the same host pages (userspace_addr) at new gfns; zap_all_fast drops
    the old mappings."""
    vm = vm_of(impl, max_level=1)
    s = vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    v.fault(3, write=True)
    vm.move_memslot(s, 512)
    assert vm.lookup(3) is None
    assert v.fault(3) == PF_EMULATE                 # no slot there now: MMIO
    assert v.fault(515) == PF_FIXED
    assert vm.lookup(515)[0] & 0xFFFFFFFFFF000 == 0x100003 << 12
    assert vm.host_page_dirty(0x100003)             # the zap pushed D to the host page
    vm.audit()


def test_move_past_max_gfn_fails_after_the_invalidation(impl):
    """kvm_set_memslot: for a MOVE, kvm_invalidate_memslot (swap + zap_all_fast) runs
    before kvm_prepare_memory_region refuses the range (-EINVAL), which then swaps the old
    slot back: two swaps, everything zapped, the slot where it was."""
    vm = vm_of(impl, max_level=1)
    s = vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    v.fault(3)
    gen = vm.mmio_generation
    with pytest.raises(ValueError):
        vm.move_memslot(s, vm.max_gfn - 7)          # 16 pages would end past max_gfn
    assert vm.mmio_generation == gen + 4
    assert vm.memslots == [(s, 0, 16, 0x100000, False)]
    assert vm.lookup(3) is None
    assert v.fault(3) == PF_FIXED
    vm.audit()


def test_move_memslot_argument_checks(impl):
    vm = vm_of(impl)
    s = vm.add_memslot(0, 16, 0x100000)
    vm.add_memslot(32, 16, 0x100010)
    before = (vm.memslots, vm.mmio_generation)
    for args, exc in (((s, 40), ValueError), ((s, 24), ValueError), ((99, 0), ValueError),
                      ((s, -1), ValueError), ((s, vm.gfn_limit - 8), ValueError),
                      (("0", 64), TypeError), ((s, 1.5), TypeError)):
        with pytest.raises(exc):
            vm.move_memslot(*args)
        assert (vm.memslots, vm.mmio_generation) == before, args


# ==========================================================================================
# Rows 4-6: host MAXPHYADDR
# ==========================================================================================


def test_row4_max_gfn_refuses_slots_and_emulates_without_an_spte(impl):
    """kvm_arch_prepare_memory_region: a slot ending past kvm_mmu_max_gfn() is -EINVAL;
    kvm_handle_noslot_fault: a gfn past it is emulated without an MMIO SPTE."""
    vm = vm_of(impl, root_level=5)
    assert vm.host_maxphyaddr == 46 and vm.max_gfn == (1 << 34) - 1
    with pytest.raises(ValueError):
        vm.add_memslot(1 << 41, 512, 0x1000)
    assert vm.memslots == [] and vm.mmio_generation == 0
    v = vm.vcpu()
    assert v.fault(1 << 44) == PF_EMULATE
    assert vm.walk(1 << 44) == [(5, NP63)]
    assert vm.stats["mmio_sptes_created"] == 0 and vm.stats["pt_pages"] == 1
    # The last gfn the host can address is fine, the one after it is not.
    vm.add_memslot(vm.max_gfn, 1, 0x1000)
    with pytest.raises(ValueError):
        vm.add_memslot(vm.max_gfn + 1, 1, 0x2000)
    vm.audit()


def test_host_maxphyaddr_bounds_pfns_and_its_argument(impl):
    vm = vm_of(impl, host_maxphyaddr=40)
    assert vm.max_gfn == (1 << 28) - 1
    with pytest.raises(ValueError):
        vm.add_memslot(0, 2, (1 << 28) - 1)         # the second pfn is past the host
    vm.add_memslot(0, 1, (1 << 28) - 1)
    for bad, exc in ((35, ValueError), (53, ValueError), ("46", TypeError), (46.0, TypeError)):
        with pytest.raises(exc):
            vm_of(impl, host_maxphyaddr=bad)


def test_row5_npt_on_a_52_bit_host_has_no_mmio_value(impl):
    """kvm_mmu_reset_all_pte_masks: BIT(51)|P marks NPT MMIO SPTEs only when
    shadow_phys_bits < 52; on a 52-bit host MMIO caching is off, so a pfn with bit 39 is a
    plain leaf (FIXED), and a gfn in no slot is emulated without an SPTE
    (kvm_handle_noslot_fault: !enable_mmio_caching)."""
    vm = vm_of(impl, "npt", host_maxphyaddr=52)
    vm.add_memslot(0, 512, 1 << 39)
    v = vm.vcpu()
    assert v.fault(0) == PF_FIXED
    vm.audit()
    assert v.fault(1 << 30) == PF_EMULATE
    assert vm.stats["mmio_sptes_created"] == 0
    assert not vm.layout.is_mmio_spte(vm.walk(1 << 30)[-1][1])
    assert v.access(1 << 30) == PF_EMULATE          # a violation each time, emulated
    assert vm.stats["exits_ept_violation"] == 1 and vm.stats["exits_misconfig"] == 0
    # With the default 46 bits such a pfn cannot exist.
    with pytest.raises(ValueError):
        vm_of(impl, "npt").add_memslot(0, 512, 1 << 39)


def test_row6_make_mmio_spte_ors_the_unmasked_gpa(impl):
    """spte.c make_mmio_spte: spte |= gpa (gfn << PAGE_SHIFT) with no mask."""
    assert make_layout(impl, "ept_ad").make_mmio_spte(1 << 40) == 0x10000000000006


# ==========================================================================================
# Roots (kvm_mmu_load, kvm_tdp_mmu_alloc_root / put_root, zap_all_fast, zap_all)
# ==========================================================================================


def test_the_root_comes_from_the_first_vcpus_cache(impl):
    """kvm_mmu_load tops up the vCPU's cache (capacity 40), then kvm_tdp_mmu_alloc_root
    takes the root from it (tdp_mmu_alloc_sp); a first 1G fault takes one more table: 38
    pages left.  The root starts with two references (vCPU and MMU)."""
    vm = vm_of(impl)
    assert vm.root is None and vm.roots == [] and vm.stats["pt_pages"] == 0
    assert vm.walk(5) == [] and vm.lookup(5) is None and vm.tdp_iter(0, 1 << 20) == []
    vm.add_memslot(0, 1 << 20, 0x100000)
    v = vm.vcpu()
    assert v.root is None
    assert v.fault(5) == PF_FIXED
    assert v.root == vm.root and vm.roots == [(vm.root, 2, False)]
    assert len(v.cache.objects) == 38
    assert vm.stats["tables_allocated"] == 2 and vm.stats["pt_pages_l4"] == 1
    w = vm.vcpu()
    assert w.access(6) is None                      # the same root: a third reference
    assert w.root == v.root and vm.roots == [(v.root, 3, False)]
    assert len(w.cache.objects) == 40               # loaded, nothing taken
    vm.audit()


def test_zap_all_fast_and_the_last_reference(impl):
    """kvm_tdp_mmu_invalidate_all_roots + kvm_tdp_mmu_zap_invalidated_roots (the MMU's
    reference put); each vCPU puts its own on its next entry (kvm_mmu_free_obsolete_roots)
    and the last put frees the root (kvm_tdp_mmu_put_root)."""
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v, w = vm.vcpu(), vm.vcpu()
    v.fault(1, write=True)
    w.fault(2)
    r0 = vm.root
    freed = vm.stats["tables_freed"]
    assert vm.zap_all_fast() is None
    assert vm.roots == [(r0, 2, True)] and vm.root is None
    assert vm.lookup(1) is None and vm.host_page_dirty(0x100001)
    assert vm.stats["tables_freed"] == freed + 3    # the 3 tables under the root
    assert vm.stats["tlb_flushes"] == 0 and vm.stats["tlb_flushes_ranged"] == 0
    vm.audit()
    v.fault(1)
    r1 = v.root
    assert r1 != r0 and vm.roots == [(r1, 2, False), (r0, 1, True)]
    vm.audit()
    w.access(2)
    assert vm.roots == [(r1, 3, False)]
    assert vm.stats["tables_freed"] == freed + 4    # and now the old root itself
    vm.audit()


def test_zap_all_zaps_every_root_and_counts_no_flush(impl):
    """kvm_tdp_mmu_zap_all: all roots, valid or not; "A TLB flush is unnecessary"."""
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    v.fault(1)
    roots = vm.roots
    assert vm.zap_all() is True
    assert vm.zap_all() is False
    assert vm.roots == roots and vm.stats["tlb_flushes"] == 0
    assert vm.stats["pt_pages"] == 1
    vm.audit()


# ==========================================================================================
# access / access_batch
# ==========================================================================================


@pytest.mark.parametrize("kind", ["ept_ad", "ept_noad", "npt"])
def test_access_runs_to_completion(impl, kind):
    """A first access: the walk fails (EPT violation / #NPF), kvm_mmu_page_fault fixes it,
    the guest re-executes and the walk succeeds: PF.FIXED, two walks, one exit.  A second
    access: no exit (None)."""
    vm = vm_of(impl, kind, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    assert v.access(9, write=True) == PF_FIXED
    assert v.access(9, write=True) is None
    assert v.access(9) is None
    s = vm.stats
    assert (s["hw_walks"], s["exits_ept_violation"], s["exits_misconfig"]) == (4, 1, 0)
    assert s["hw_ad_sets"] == 0                     # make_spte already set A and D
    assert v.stats["hw_walks"] == 4
    vm.audit()


def test_exec_access_on_an_nx_huge_page_exits_and_splits(impl):
    """make_spte under the NX mitigation: a huge leaf is not executable, so the CPU's
    fetch violates (EPT X clear); kvm_mmu_hugepage_adjust makes the goal 4K, and
    kvm_tdp_mmu_map splits the 1G and then the 2M leaf on the way down
    (tdp_mmu_split_huge_page; the 4K pieces are made executable and keep D).  At the
    target level make_spte sees a writable old SPTE and skips D, so the piece is replaced
    (FIXED) by ...7977 and its D goes to the host page (handle_changed_spte)."""
    vm = vm_of(impl, nx_huge_pages=True)
    vm.add_memslot(0, 1 << 20, 0x100000)
    v = vm.vcpu()
    assert v.access(7) == PF_FIXED
    assert vm.lookup(7)[1] == 3
    assert v.access(7, exec=True) == PF_FIXED
    assert vm.lookup(7) == (0x8600000100007977, 1)
    assert vm.host_page_dirty(0x100007)
    assert v.access(7, exec=True) is None
    vm.audit()


def test_access_batch_counts_and_codes(impl):
    vm = vm_of(impl, max_level=1, max_pt_pages=64)
    vm.add_memslot(0, 1024, 0x100000, readonly=True)
    v = vm.vcpu()
    gfns = np.array([1, 1, 2, 1, 1 << 30, 1 << 30, 3], dtype=np.uint64)
    acc = np.array([0, 0, 2, 1, 0, 1, 1], dtype=np.uint8)
    out = np.full(7, -9, dtype=np.int8)
    counts = v.access_batch(gfns, acc, out)
    # read (fault, then hit), read (hit), fetch (fault), write to a read-only slot
    # (violation -> emulated), MMIO (fault makes the SPTE: emulated), MMIO again
    # (misconfiguration -> emulated), write to an unmapped read-only page (fault emulated).
    assert out.tolist() == [PF_FIXED, 0, PF_FIXED, PF_EMULATE, PF_EMULATE, PF_EMULATE,
                            PF_EMULATE]
    assert counts == {"hits": 1, "fixed": 2, "spurious": 0, "retry": 0, "emulate": 4,
                      "fast": 0}
    s = vm.stats
    assert s["exits_ept_violation"] == 5 and s["exits_misconfig"] == 1
    assert s["hw_walks"] == 9
    vm.audit()


@pytest.mark.parametrize("kind", ["ept_ad", "npt"])
@pytest.mark.parametrize("pfn, level", [(0x100000, 3), (0x100200, 2)])
def test_access_batch_walks_end_at_huge_leaves(impl, kind, pfn, level):
    """SDM vol. 3 §29.3.2 / APM §15.25: an entry with bit 7 at level 3 (2) maps 1G (2M)
    and ends the walk.  The first read faults and kvm_mmu_max_mapping_level allows the
    largest leaf the slot's pfn alignment gives (1G for a 1G-aligned pfn, 2M for one that
    is only 2M-aligned), made with A set (make_spte, not a prefetch); every other read
    inside that leaf is translated by it with no exit and nothing to set, and a read past
    it exits once more (FIXED)."""
    vm = vm_of(impl, kind)
    vm.add_memslot(0, 1 << 19, pfn)
    v = vm.vcpu()
    span = 1 << (9 * (level - 1))
    gfns = np.array([3] + list(range(0, span, span // 64)) + [span - 1, span + 3],
                    dtype=np.uint64)
    out = np.full(gfns.size, -9, dtype=np.int8)
    counts = v.access_batch(gfns, None, out)
    assert out[0] == PF_FIXED and out[-1] == PF_FIXED and not out[1:-1].any()
    assert counts["hits"] == gfns.size - 2 and counts["fixed"] == 2
    assert vm.lookup(3)[1] == level and vm.lookup(span + 3)[1] == level
    s = vm.stats
    assert s["exits_ept_violation"] == 2 and s["hw_ad_sets"] == 0
    assert s["hw_walks"] == gfns.size + 2     # each exit's access walks twice
    vm.audit()


def test_access_and_fault_argument_checks(impl):
    vm = vm_of(impl)
    vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    g = np.arange(4, dtype=np.uint64)
    cases = [
        (lambda: v.access(1, write=True, exec=True), ValueError),
        (lambda: v.access(vm.gfn_limit), ValueError),
        (lambda: v.access(-1), ValueError),
        (lambda: v.access("1"), TypeError),
        (lambda: v.fault(1, write=True, error_code=PFERR_WRITE), ValueError),
        (lambda: v.fault(1, error_code=1 << 32), ValueError),
        (lambda: v.fault(1, error_code=-1), ValueError),
        (lambda: v.fault(1, error_code="2"), TypeError),
        (lambda: v.access_batch(g, np.array([0, 1, 2, 3], dtype=np.uint8)), ValueError),
        (lambda: v.access_batch(g, np.zeros(3, dtype=np.uint8)), ValueError),
        (lambda: v.access_batch(g, None, np.zeros(4, dtype=np.int16)), TypeError),
        (lambda: v.fault_batch(g, np.zeros(4, np.uint8), error_codes=np.zeros(4, np.uint32)),
         ValueError),
        (lambda: v.fault_batch(g, error_codes=np.full(4, 1 << 32, np.uint64)), ValueError),
        (lambda: v.fault_batch(g, error_codes=np.zeros(3, np.uint32)), ValueError),
    ]
    before = vm.stats
    for call, exc in cases:
        with pytest.raises(exc):
            call()
    assert vm.stats == before
    vm.audit()


def test_fault_batch_error_codes(impl):
    """Each item goes through kvm_mmu_page_fault: a not-present write (FIXED), a present
    write on the now writable leaf (fast_page_fault: SPURIOUS, pf_fast), a not-present
    fault on a gfn in no slot (an MMIO SPTE: EMULATE) and an RSVD fault on it
    (handle_mmio_page_fault: EMULATE from the vCPU's MMIO info)."""
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    gfns = np.array([3, 3, 1 << 30, 1 << 30], dtype=np.uint64)
    ecs = np.array([PFERR_WRITE, PFERR_PRESENT | PFERR_WRITE, 0, PFERR_RSVD], dtype=np.uint32)
    out = np.zeros(4, dtype=np.int8)
    counts = v.fault_batch(gfns, out=out, error_codes=ecs)
    assert out.tolist() == [PF_FIXED, PF_SPURIOUS, PF_EMULATE, PF_EMULATE]
    # The batch counts every result; KVM's pf_emulate leaves out the one that
    # handle_mmio_page_fault returned before kvm_mmu_do_page_fault.
    assert counts == {"fixed": 1, "spurious": 1, "retry": 0, "emulate": 2, "fast": 1}
    assert vm.stats["faults_emulate"] == 1
    vm.audit()


# ==========================================================================================
# Aging (tdp_mmu.c age_gfn_range, test_age_gfn), seen by the CPU and the fast page fault
# ==========================================================================================


def test_aging_clears_a_and_the_cpu_sets_it_again(impl):
    """age_gfn_range with A/D bits: clear A only (spec §2.6: ...b77 -> ...a77), no flush
    for clear_young; the CPU's next access sets A with no exit; test_age_gfn reads A."""
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    assert vm.lookup(5)[0] == 0x8600000100005B77
    assert vm.test_age_gfn(0, 16) is True
    assert vm.age_gfn_range(0, 16) is True
    assert vm.lookup(5)[0] == 0x8600000100005A77
    assert vm.test_age_gfn(0, 16) is False and vm.age_gfn_range(0, 16) is False
    assert vm.stats["tlb_flushes"] == 0
    assert v.access(5) is None
    assert vm.lookup(5)[0] == 0x8600000100005B77 and vm.stats["hw_ad_sets"] == 1
    # clear_flush_young: one full flush when something was young
    assert vm.age_gfn_range(0, 16, flush=True) is True and vm.stats["tlb_flushes"] == 1
    assert vm.age_gfn_range(0, 16, flush=True) is False and vm.stats["tlb_flushes"] == 1
    vm.audit()


def test_npt_aging_clears_bit_5(impl):
    vm = vm_of(impl, "npt", max_level=1)
    vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    leaf = vm.lookup(5)[0]
    assert leaf & NPT_A and leaf & NPT_D
    assert vm.age_gfn_range(5, 6) is True
    assert vm.lookup(5)[0] == leaf & ~NPT_A
    assert v.access(5, write=True) is None and vm.lookup(5)[0] == leaf


def test_access_tracking_is_undone_by_the_fast_page_fault(impl):
    """EPT without A/D.  age_gfn_range: the SPTE is writable, so its pfn is marked dirty,
    then mark_spte_for_access_track saves R and X in bits 54 and 56 and clears RWX (W is
    not saved; MMU-writable stays).  The CPU now sees a not-present entry: an EPT violation
    without PRESENT, which page_fault_can_be_fast lets through (!kvm_ad_enabled());
    fast_page_fault restores R and X (restore_acc_track_spte) -- FIXED for a read -- and a
    later write sets W on the MMU-writable SPTE, FIXED again, both lockless (pf_fast)."""
    vm = vm_of(impl, "ept_noad", max_level=1)
    vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    assert vm.lookup(5)[0] == 0x8610000100005877          # bit 52: A/D disabled
    assert not vm.host_page_dirty(0x100005)
    assert vm.age_gfn_range(0, 16) is True
    assert vm.lookup(5)[0] == 0x8750000100005870          # RWX cleared, R/X saved
    assert vm.host_page_dirty(0x100005)
    assert vm.test_age_gfn(0, 16) is False                # is_accessed_spte: tracked
    changes = vm.stats["spte_changes"]
    assert v.access(5) == PF_FIXED
    assert vm.lookup(5)[0] == 0x8610000100005875          # R, X back; not W
    assert v.access(5, write=True) == PF_FIXED
    assert vm.lookup(5)[0] == 0x8610000100005877
    s = vm.stats
    assert s["faults_fast"] == 2 and s["faults_fixed"] == 3
    assert s["exits_ept_violation"] == 2
    assert s["spte_changes"] == changes                   # no handle_changed_spte
    assert v.access(5, write=True) is None
    vm.audit()


def test_aging_argument_checks_and_empty_ranges(impl):
    vm = vm_of(impl)
    for args, exc in (((5, 4), ValueError), ((-1, 4), ValueError),
                      ((0, vm.gfn_limit + 1), ValueError), (("0", 4), TypeError)):
        with pytest.raises(exc):
            vm.age_gfn_range(*args)
        with pytest.raises(exc):
            vm.test_age_gfn(*args)
    assert vm.age_gfn_range(0, vm.gfn_limit) is False     # no root yet: nothing to age
    assert vm.test_age_gfn(7, 7) is False


@pytest.mark.parametrize("failures, fast", [(0, 1), (4, 1), (5, 0)])
def test_fast_page_fault_retries_four_times_then_takes_the_slow_path(impl, failures, fast):
    """fast_page_fault: a lost compare-and-exchange walks and tries again while
    ++retry_count <= 4; the fifth loss gives up (RET_PF_INVALID) and the slow path maps
    (make_spte over the access-tracked SPTE).  Either way the write fault is FIXED."""
    vm = vm_of(impl, "ept_noad", max_level=1)
    vm.add_memslot(0, 16, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    vm.age_gfn_range(0, 16)                               # access-tracked, MMU-writable
    vm.inject_cas_failures(failures)
    assert v.fault(5, error_code=PFERR_WRITE) == PF_FIXED
    assert vm.lookup(5)[0] == 0x8610000100005877
    assert v.stats["faults_fast"] == fast and vm.stats["cas_failures"] == failures
    vm.audit()


def test_access_batch_out_of_memory_reports_completed(impl):
    """8 pages: the root and 3 tables for gfn 0 leave 4 in the vCPU's cache, below the
    top-up's minimum of 5 (mmu_topup_memory_caches).  The second access hits; the third
    (gfn 1: not present, so a fault, which tops up first) fails: two accesses completed."""
    vm = vm_of(impl, max_level=1, max_pt_pages=8)
    vm.add_memslot(0, 1 << 20, 0x100000)
    v = vm.vcpu()
    with pytest.raises(impl.OutOfMemory) as info:
        v.access_batch(np.array([0, 0, 1, 2], dtype=np.int64))
    assert info.value.completed == 2
    assert vm.lookup(1) is None
    vm.audit()
