"""Issue 10 on the reference model only: the contract's values, each derived from the Linux
6.10 function named in the test's docstring.

These tests poke the oracle's internals in a few places (to build SPTE states the public
API cannot reach yet: access-tracked or write-protected leaves, a generation about to
wrap); they are not part of the shared suite the engine runs.
"""
import numpy as np
import pytest

import spte_fast.reference as ref
from spte_fast.reference import hw
from spte_fast.reference.spte import MMIO_SPTE_GEN_MASK

PF = ref.PF
EPT = ref.SpteLayout.ept()
EPT_NOAD = ref.SpteLayout.ept(ad=False)
NPT = ref.SpteLayout.npt()
PFN0 = 0x100000
PAGES_1G = 1 << 18


def vm_vcpu(layout=EPT, **kw):
    kw.setdefault("max_pt_pages", 256)
    vm = ref.Vm(layout, **kw)
    return vm, vm.vcpu()


def poke(vm, gfn, value):
    """Store `value` into the valid root's last entry on gfn's walk (test-only)."""
    kvm = vm._kvm
    sptep = None
    for it in ref.tdp_mmu.for_each_tdp_pte(kvm.pool, ref.tdp_mmu_roots.kvm_tdp_mmu_valid_root(kvm),
                                           gfn, gfn + 1):
        sptep = it.sptep
    kvm.pool._pages[sptep] = value


# --- constants and stats -------------------------------------------------------------------


def test_constants_are_exported():
    """kvm_host.h PFERR_* bits; ACCESS_HIT is the contract's code of an access without exit."""
    assert (ref.PFERR_PRESENT_MASK, ref.PFERR_WRITE_MASK, ref.PFERR_USER_MASK,
            ref.PFERR_RSVD_MASK, ref.PFERR_FETCH_MASK, ref.ACCESS_HIT) == (1, 2, 4, 8, 16, 0)
    for name in ("PFERR_PRESENT_MASK", "PFERR_WRITE_MASK", "PFERR_USER_MASK",
                 "PFERR_RSVD_MASK", "PFERR_FETCH_MASK", "ACCESS_HIT"):
        assert name in ref.__all__


def test_stats_keys_and_order():
    """vcpu->stat.pf_fast sits after pf_emulate; the hardware counters, then those of
    dirty logging and huge pages (issue 11), then the two-dimensional walk's (issue 12)
    come last."""
    vm, v = vm_vcpu()
    keys = list(vm.stats)
    guest = ["guest_walks", "guest_walk_refs", "guest_faults", "guest_ad_sets"]
    assert keys[:5] == ["faults_fixed", "faults_spurious", "faults_retry", "faults_emulate",
                        "faults_fast"]
    assert keys[-13:] == ["hw_walks", "hw_ad_sets", "exits_ept_violation", "exits_misconfig",
                          "exits_pml_full", "pml_logged", "dirty_pages_marked",
                          "huge_pages_split", "nx_huge_pages_recovered", *guest]
    assert list(v.stats) == ["faults_fixed", "faults_spurious", "faults_retry",
                             "faults_emulate", "faults_fast", "hw_walks", "hw_ad_sets",
                             "exits_ept_violation", "exits_misconfig", "exits_pml_full",
                             "pml_logged", "dirty_pages_marked", *guest]


# --- the divergence table ------------------------------------------------------------------


def test_row1_ept_ad_read_refault_takes_the_slow_path_and_drops_d():
    """page_fault_can_be_fast refuses a !PRESENT fault when kvm_ad_enabled(); make_spte with
    a writable old SPTE skips the D bit ("goto out"); handle_changed_spte pushes the old D to
    the pfn (kvm_set_pfn_dirty)."""
    vm, v = vm_vcpu()
    vm.add_memslot(0, 1 << 20, PFN0)
    assert v.fault(5, write=True) == PF.FIXED
    assert vm.lookup(5) == (0x8600000100000BF7, 3)
    assert not vm.host_page_dirty(PFN0)
    assert v.fault(5) == PF.FIXED
    assert vm.lookup(5) == (0x86000001000009F7, 3)
    assert vm.host_page_dirty(PFN0)
    assert v.stats["faults_fast"] == 0 and v.stats["faults_spurious"] == 0
    vm.audit()


def test_row1b_exec_refault_at_4k_ept_and_read_refault_npt():
    """Same functions at 4K: EPT exec re-fault -> ...5977; NPT read re-fault -> 0x100005e27."""
    vm, v = vm_vcpu(max_level=1)
    vm.add_memslot(0, 1 << 20, PFN0)
    assert v.fault(5, write=True) == PF.FIXED
    assert vm.lookup(5) == (0x8600000100005B77, 1)
    assert v.fault(5, exec=True) == PF.FIXED
    assert vm.lookup(5) == (0x8600000100005977, 1)
    assert vm.host_page_dirty(PFN0 + 5)
    vm.audit()

    vm, v = vm_vcpu(NPT, max_level=1)
    vm.add_memslot(0, 1 << 20, PFN0)
    assert v.fault(5, write=True) == PF.FIXED
    assert vm.lookup(5) == (0x100005E67, 1)
    assert v.fault(5) == PF.FIXED
    assert vm.lookup(5) == (0x100005E27, 1)
    assert vm.host_page_dirty(PFN0 + 5)
    vm.audit()


def test_row2_mmio_access_is_a_misconfig_emulated_without_top_up():
    """An MMIO SPTE is an EPT misconfiguration: handle_ept_misconfig -> kvm_mmu_page_fault
    (PFERR_RSVD_MASK) -> handle_mmio_page_fault, whose mmio_info_in_cache answers EMULATE
    before any cache top-up (the pool is exhausted here)."""
    vm, v = vm_vcpu(max_pt_pages=8)
    assert v.fault(1 << 30) == PF.EMULATE
    nobjs, stats = len(v.cache), vm.stats
    assert nobjs == 8 - 1 - 3 and vm.pool.nr_free == 0 and nobjs < 5
    assert v.access(1 << 30) == PF.EMULATE
    s = vm.stats
    assert s["exits_misconfig"] == 1 and s["exits_ept_violation"] == 0 and s["hw_walks"] == 1
    for key in ("faults_fixed", "faults_spurious", "faults_retry", "faults_emulate",
                "faults_fast", "mmio_sptes_created"):
        assert s[key] == stats[key]
    assert v.fault(1 << 30, error_code=ref.PFERR_RSVD_MASK) == PF.EMULATE
    assert len(v.cache) == nobjs
    vm.audit()


def test_mmio_spte_not_in_the_info_cache_is_found_by_the_walk():
    """handle_mmio_page_fault: not cached -> get_mmio_spte; a current MMIO SPTE caches the
    info (vcpu_cache_mmio_info) and emulates."""
    vm, v = vm_vcpu()
    assert v.fault(1 << 30) == PF.EMULATE
    assert v.fault((1 << 30) + 1) == PF.EMULATE  # the info cache now holds this gfn
    emulate = vm.stats["faults_emulate"]
    assert v.access(1 << 30) == PF.EMULATE
    assert v._vcpu.mmio_gfn == 1 << 30
    assert vm.stats["faults_emulate"] == emulate


def test_stale_mmio_spte_takes_the_normal_path():
    """check_mmio_spte fails after a memslots swap -> RET_PF_INVALID -> kvm_mmu_do_page_fault
    with the RSVD error code: a new MMIO SPTE of the new generation, EMULATE (counted)."""
    vm, v = vm_vcpu()
    assert v.fault(1 << 30) == PF.EMULATE
    vm.add_memslot(0, 512, PFN0)  # generation 2
    before = vm.stats
    assert v.access(1 << 30) == PF.EMULATE
    s = vm.stats
    assert s["exits_misconfig"] == 1
    assert s["faults_emulate"] == before["faults_emulate"] + 1
    assert s["mmio_sptes_created"] == before["mmio_sptes_created"] + 1
    spte = vm.walk(1 << 30)[-1][1]
    assert EPT.get_mmio_spte_generation(spte) == 2
    vm.audit()


def test_rsvd_fault_without_an_mmio_spte_retries_uncounted():
    """handle_mmio_page_fault: no MMIO SPTE on the walk -> RET_PF_RETRY ("let CPU fault
    again"), returned by kvm_mmu_page_fault without kvm_mmu_do_page_fault."""
    vm, v = vm_vcpu()
    stats = vm.stats
    assert v.fault(7, error_code=ref.PFERR_RSVD_MASK) == PF.RETRY
    s = vm.stats
    assert all(s[k] == stats[k] for k in ("faults_fixed", "faults_retry", "faults_emulate",
                                          "faults_spurious"))


def test_row3_generation_steps_by_two_and_delete_swaps_twice():
    """kvm_swap_active_memslots: gen += kvm_arch_nr_memslot_as_ids() (2); KVM_MR_DELETE:
    kvm_invalidate_memslot (swap) then kvm_delete_memslot (swap)."""
    vm, v = vm_vcpu()
    a = vm.add_memslot(0, 512, PFN0)
    assert vm.mmio_generation == 2
    vm.add_memslot(1024, 512, PFN0 + 1024)
    assert vm.mmio_generation == 4
    vm.delete_memslot(a)
    assert vm.mmio_generation == 8


def test_delete_zaps_all_roots_fast_without_a_flush():
    """6.10 kvm_arch_flush_shadow_memslot = kvm_mmu_zap_all_fast: every root invalid, the
    invalidated roots zapped (no TLB flush: kvm_mmu_load flushes), even other slots' SPTEs."""
    vm, v = vm_vcpu()
    a = vm.add_memslot(0, 512, PFN0)
    vm.add_memslot(1024, 512, PFN0 + 1024)
    assert v.fault(1024, write=True) == PF.FIXED
    root = v.root
    flushes = (vm.stats["tlb_flushes"], vm.stats["tlb_flushes_ranged"])
    vm.delete_memslot(a)
    assert (vm.stats["tlb_flushes"], vm.stats["tlb_flushes_ranged"]) == flushes
    assert vm.root is None and vm.roots == [(root, 1, True)]
    assert vm.stats["pages_2m"] == 0
    vm.audit()
    assert v.fault(1024) == PF.FIXED  # a new root; the old one freed
    assert vm.roots == [(v.root, 2, False)] and v.root != root
    vm.audit()


def test_row4_max_gfn_refuses_slots_and_mmio_sptes():
    """kvm_arch_prepare_memory_region: base + npages - 1 > kvm_mmu_max_gfn() -> -EINVAL;
    kvm_handle_noslot_fault: gfn > kvm_mmu_max_gfn() -> RET_PF_EMULATE, no SPTE."""
    vm, v = vm_vcpu(root_level=5)
    assert vm.host_maxphyaddr == 46 and vm.max_gfn == (1 << 34) - 1
    with pytest.raises(ValueError):
        vm.add_memslot(1 << 41, 512, 0x1000)
    assert vm.memslots == [] and vm.mmio_generation == 0
    assert v.fault(1 << 44) == PF.EMULATE
    assert vm.stats["mmio_sptes_created"] == 0
    assert vm.walk(1 << 44) == [(5, EPT.nonpresent_value)]
    assert v._vcpu.mmio_gfn == 1 << 44  # the info is cached before the check
    vm.audit()


def test_row5_npt_with_52_bit_host_has_no_mmio_value():
    """kvm_mmu_reset_all_pte_masks: shadow_phys_bits == 52 -> mask 0 -> MMIO caching off, so
    a leaf with pfn bit 39 (SPTE bit 51) is no MMIO SPTE; with 46 bits no such pfn exists."""
    vm, v = vm_vcpu(NPT, host_maxphyaddr=52)
    vm.add_memslot(0, 512, 1 << 39)
    assert v.fault(0) == PF.FIXED
    spte, level = vm.lookup(0)
    assert NPT.is_mmio_spte(spte)  # the layout's constant mask would say so ...
    vm.audit()                      # ... the VM's does not
    # no-slot faults emulate without installing anything (!enable_mmio_caching)
    assert v.fault(1 << 30) == PF.EMULATE
    assert vm.stats["mmio_sptes_created"] == 0
    assert vm.walk(1 << 30)[-1][1] == NPT.nonpresent_value
    assert v.access(1 << 30) == PF.EMULATE  # a violation each time, never a misconfig
    assert vm.stats["exits_misconfig"] == 0

    vm = ref.Vm(NPT, max_pt_pages=256)
    with pytest.raises(ValueError):
        vm.add_memslot(0, 512, 1 << 39)
    assert vm.memslots == []


def test_row6_make_mmio_spte_ors_the_unmasked_gpa():
    """spte.c make_mmio_spte: spte |= gpa (gfn << PAGE_SHIFT, unmasked)."""
    assert ref.SpteLayout.ept().make_mmio_spte(1 << 40) == 0x10000000000006


def test_npt_mmio_gfn_read_back_below_host_maxphyaddr():
    """get_mmio_spte_gfn with shadow_nonpresent_or_rsvd_lower_gfn_mask = GENMASK(45, 12):
    the NPT marker bit 51 is not read as a gfn bit (audit's mmio-gfn check)."""
    vm, v = vm_vcpu(NPT)
    gfn = (1 << 33) + 5
    assert v.fault(gfn) == PF.EMULATE
    spte = vm.walk(gfn)[-1][1]
    assert spte & ref.NPT_MMIO_VALUE == ref.NPT_MMIO_VALUE
    assert ref.spte.get_mmio_spte_gfn(vm._kvm, spte) == gfn
    vm.audit()


# --- roots ------------------------------------------------------------------------------------


def test_no_root_until_a_vcpu_enters_and_38_cached_pages_after_a_1g_fault():
    """kvm_mmu_load tops up (40) and kvm_tdp_mmu_alloc_root takes the root from the vCPU's
    cache (tdp_mmu_alloc_sp), refcount 2; the 1G fault takes one more table."""
    vm, v = vm_vcpu()
    assert vm.root is None and vm.roots == [] and v.root is None
    assert vm.stats["pt_pages"] == 0 and vm.stats["tables_allocated"] == 0
    assert vm.walk(0) == [] and vm.lookup(0) is None and vm.tdp_iter(0, 1) == []
    assert vm.zap_sp(0, 1) is False and vm.zap_spte_atomic(0, 1) is False
    with pytest.raises(ValueError):
        vm.walk(-1)
    with pytest.raises(ValueError):
        vm.zap_sp(0, 4)
    vm.audit()
    vm.add_memslot(0, PAGES_1G, PFN0)
    assert v.fault(5) == PF.FIXED
    assert len(v.cache) == 38
    assert vm.roots == [(v.root, 2, False)] and vm.root == v.root
    s = vm.stats
    assert (s["tables_allocated"], s["pt_pages"], s["pt_pages_l4"], s["pt_pages_l3"]) == \
        (2, 2, 1, 1)
    assert s["cache_fills"] == 40
    vm.audit()


def test_root_refcounts_across_two_vcpus_and_zap_all_fast():
    """kvm_tdp_mmu_alloc_root takes a reference to a valid root of the same role;
    kvm_mmu_zap_all_fast invalidates and zaps it and puts the MMU's reference; each vCPU
    puts its own at its next entry (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS), the last frees it."""
    vm = ref.Vm(EPT, max_pt_pages=256)
    v1, v2 = vm.vcpu(), vm.vcpu()
    vm.add_memslot(0, 512, PFN0)
    v1.fault(0, write=True)
    r1 = v1.root
    assert vm.roots == [(r1, 2, False)]
    v2.fault(1)
    assert v2.root == r1 and vm.roots == [(r1, 3, False)]
    vm.audit()
    freed = vm.stats["tables_freed"]
    assert vm.zap_all_fast() is None
    assert vm.roots == [(r1, 2, True)] and vm.root is None
    # the 2M leaf's L3 and L2 tables are freed, the root stays (a vCPU holds it)
    assert vm.stats["pages_2m"] == 0 and vm.stats["tables_freed"] == freed + 2
    vm.audit()
    assert v1.access(0) == PF.FIXED
    r2 = v1.root
    assert vm.roots == [(r2, 2, False), (r1, 1, True)]
    vm.audit()
    assert v2.access(0) is None
    assert vm.roots == [(r2, 3, False)]
    assert vm.stats["tables_freed"] == freed + 3
    assert vm.stats["pt_pages_l4"] == 1
    vm.audit()


def test_zap_all_zaps_every_root_without_a_flush():
    """kvm_mmu_zap_all -> kvm_tdp_mmu_zap_all: all roots, exclusive, no TLB flush (6.10);
    roots and refcounts unchanged."""
    vm, v = vm_vcpu()
    vm.add_memslot(0, 512, PFN0)
    v.fault(3)
    roots = vm.roots
    assert vm.zap_all() is True
    assert vm.stats["tlb_flushes"] == 0 and vm.roots == roots
    assert vm.zap_all() is False
    vm.audit()


def test_audit_reports_a_wrong_refcount_as_roots():
    vm, v = vm_vcpu()
    v.fault(1 << 20)
    vm._kvm.tdp_mmu_roots[0].tdp_mmu_root_count += 1
    with pytest.raises(ref.AuditError) as info:
        vm.audit()
    assert info.value.invariant == "roots"


def test_generation_wrap_zaps_all_fast():
    """kvm_mmu_invalidate_mmio_sptes: (gen & MMIO_SPTE_GEN_MASK & ~1) == 0 after a swap ->
    kvm_mmu_zap_all_fast."""
    vm, v = vm_vcpu()
    vm.add_memslot(0, 512, PFN0)
    v.fault(3)
    vm._kvm.memslots_generation = MMIO_SPTE_GEN_MASK + 1 - 4
    vm.add_memslot(1024, 512, PFN0 + 1024)
    assert vm.root is not None  # not yet
    vm.add_memslot(2048, 512, PFN0 + 2048)
    assert vm.mmio_generation == 1 << 19
    assert vm.root is None and vm.roots[0][2] is True
    vm.audit()


# --- memslots -----------------------------------------------------------------------------


def test_move_memslot():
    """KVM_MR_MOVE: kvm_invalidate_memslot (swap + kvm_mmu_zap_all_fast), kvm_move_memslot
    (swap); the same base is no change (__kvm_set_memory_region returns 0)."""
    vm, v = vm_vcpu()
    a = vm.add_memslot(0, 512, PFN0)
    b = vm.add_memslot(4096, 512, PFN0 + 4096)
    v.fault(3, write=True)
    gen = vm.mmio_generation
    vm.move_memslot(a, 0)  # same base: nothing
    assert vm.mmio_generation == gen and vm.root is not None
    # (past max_gfn: refused only after the invalidation, tests/test_hardware_view.py)
    for bad in ((a, 4096 + 100), (a, vm.gfn_limit), (7, 0)):
        with pytest.raises(ValueError):
            vm.move_memslot(*bad)
        assert vm.mmio_generation == gen and vm.root is not None
    with pytest.raises(TypeError):
        vm.move_memslot(a, 1.5)
    vm.move_memslot(a, 1 << 20)
    assert vm.mmio_generation == gen + 4
    assert vm.memslots == [(b, 4096, 512, PFN0 + 4096, False),
                           (a, 1 << 20, 512, PFN0, False)]
    assert vm.root is None and vm.host_page_dirty(PFN0)
    assert v.fault((1 << 20) + 3) == PF.FIXED
    assert vm.lookup((1 << 20) + 3)[0] >> 12 & ((1 << 40) - 1) == PFN0
    assert v.fault(3) == PF.EMULATE  # MMIO now
    vm.audit()


def test_host_maxphyaddr_argument_and_pfn_bound():
    """kvm_mmu_max_gfn() = (1 << (shadow_phys_bits - PAGE_SHIFT)) - 1; host pfns must exist."""
    for bad in (35, 53):
        with pytest.raises(ValueError):
            ref.Vm(EPT, host_maxphyaddr=bad)
    with pytest.raises(TypeError):
        ref.Vm(EPT, host_maxphyaddr=46.0)
    vm = ref.Vm(EPT, host_maxphyaddr=36, max_pt_pages=16)
    assert vm.max_gfn == (1 << 24) - 1
    with pytest.raises(ValueError):
        vm.add_memslot(0, 16, (1 << 24) - 8)
    vm.add_memslot(0, 16, (1 << 24) - 16)
    with pytest.raises(ValueError):
        vm.add_memslot(1 << 24, 1, 0)


# --- error codes, fast path --------------------------------------------------------------------


def test_fault_error_code_arguments():
    vm, v = vm_vcpu()
    vm.add_memslot(0, 512, PFN0)
    with pytest.raises(ValueError):
        v.fault(0, write=True, error_code=ref.PFERR_WRITE_MASK)
    with pytest.raises(ValueError):
        v.fault(0, error_code=1 << 32)
    with pytest.raises(TypeError):
        v.fault(0, error_code=2.0)
    assert v.fault(0, error_code=ref.PFERR_WRITE_MASK) == PF.FIXED
    # present write on a writable leaf: fast path, SPURIOUS
    assert v.fault(0, error_code=ref.PFERR_WRITE_MASK | ref.PFERR_PRESENT_MASK) == PF.SPURIOUS
    assert v.stats["faults_fast"] == 1 and v.stats["faults_spurious"] == 1


def test_ept_without_ad_takes_the_fast_path_on_a_not_present_fault():
    """page_fault_can_be_fast: !fault->present -> !kvm_ad_enabled(): EPT without A/D bits
    answers a re-fault in fast_page_fault (SPURIOUS, pf_fast)."""
    vm, v = vm_vcpu(EPT_NOAD)
    vm.add_memslot(0, 512, PFN0)
    assert v.fault(5, write=True) == PF.FIXED
    changes = vm.stats["spte_changes"]
    assert v.fault(5) == PF.SPURIOUS
    assert v.stats["faults_fast"] == 1 and vm.stats["spte_changes"] == changes


def test_fast_path_restores_access_tracking_and_sets_w():
    """fast_page_fault: restore_acc_track_spte (A/D off), then W on an MMU-writable SPTE; one
    CAS each (fast_pf_fix_direct_spte), no handle_changed_spte; the CPU re-executes."""
    vm, v = vm_vcpu(EPT_NOAD, max_level=1)
    vm.add_memslot(0, 512, PFN0)
    v.fault(5, write=True)
    leaf = vm.lookup(5)[0]
    poke(vm, 5, EPT_NOAD.mark_spte_for_access_track(leaf))
    changes = vm.stats["spte_changes"]
    assert v.access(5) == PF.FIXED            # violation (not present), fast fix, hit
    assert vm.lookup(5)[0] == leaf & ~ref.PT_WRITABLE_MASK  # W is not restored
    assert v.access(5, write=True) == PF.FIXED   # present write, W set by the fast path
    assert vm.lookup(5)[0] == leaf
    s = v.stats
    assert (s["faults_fast"], s["faults_fixed"], s["exits_ept_violation"], s["hw_walks"]) == \
        (2, 3, 2, 4)
    assert s["hw_ad_sets"] == 0 and vm.stats["spte_changes"] == changes
    vm.audit()


def test_fast_path_gives_up_after_five_lost_cases():
    """fast_page_fault: ++retry_count > 4 -> break (RET_PF_INVALID): the slow path maps."""
    for failures, fast in ((4, 1), (5, 0)):
        vm, v = vm_vcpu(max_level=1)
        vm.add_memslot(0, 512, PFN0)
        v.fault(5, write=True)
        leaf = vm.lookup(5)[0]
        poke(vm, 5, leaf & ~ref.PT_WRITABLE_MASK)   # write-protected, MMU-writable
        vm.inject_cas_failures(failures)
        assert v.fault(5, error_code=ref.PFERR_WRITE_MASK | ref.PFERR_PRESENT_MASK) == PF.FIXED
        assert v.stats["faults_fast"] == fast
        assert vm.stats["cas_failures"] == failures
        assert vm.lookup(5)[0] & ref.PT_WRITABLE_MASK
        vm.audit()


# --- the hardware walk -----------------------------------------------------------------------


def test_access_hits_set_accessed_and_dirty_bits():
    """The CPU sets A (and D on writes) in a leaf with A/D enabled: one atomic OR when a bit
    is missing (EPT A/D bits 8/9, NPT 5/6)."""
    for layout, a, d in ((EPT, 1 << 8, 1 << 9), (NPT, 1 << 5, 1 << 6)):
        vm, v = vm_vcpu(layout, max_level=1)
        vm.add_memslot(0, 512, PFN0)
        assert v.access(5, write=True) == PF.FIXED   # violation, fixed, re-executed: a hit
        leaf = vm.lookup(5)[0]
        assert leaf & (a | d) == a | d and v.stats["hw_ad_sets"] == 0
        poke(vm, 5, leaf & ~(a | d))
        assert v.access(5) is None
        assert vm.lookup(5)[0] == leaf & ~d and v.stats["hw_ad_sets"] == 1
        assert v.access(5) is None and v.stats["hw_ad_sets"] == 1
        assert v.access(5, write=True) is None
        assert vm.lookup(5)[0] == leaf and v.stats["hw_ad_sets"] == 2
        assert v.stats["hw_walks"] == 5 and vm.stats["spte_changes"] == 4
        vm.audit()
    vm, v = vm_vcpu(EPT_NOAD, max_level=1)
    vm.add_memslot(0, 512, PFN0)
    v.access(5)
    assert v.access(5, write=True) is None and v.stats["hw_ad_sets"] == 0


def test_exit_error_codes():
    """handle_ept_violation: USER for a read, WRITE, FETCH, PRESENT when the entry had RWX;
    handle_ept_misconfig: PFERR_RSVD_MASK; #NPF: USER always, PRESENT from P, RSVD for a
    reserved bit (with PRESENT)."""
    P, W, U, R, F = (ref.PFERR_PRESENT_MASK, ref.PFERR_WRITE_MASK, ref.PFERR_USER_MASK,
                     ref.PFERR_RSVD_MASK, ref.PFERR_FETCH_MASK)
    ept = ref.Vm(EPT, max_pt_pages=16)._kvm
    npt = ref.Vm(NPT, max_pt_pages=16)._kvm
    np_ = 1 << 63
    code = hw.hw_exit_error_code
    assert code(ept, hw.WALK_VIOLATION, np_, False, False) == U
    assert code(ept, hw.WALK_VIOLATION, np_, True, False) == W
    assert code(ept, hw.WALK_VIOLATION, np_, False, True) == F
    assert code(ept, hw.WALK_VIOLATION, 0x805, True, False) == W | P
    assert code(ept, hw.WALK_MISCONFIG, 6, True, False) == R
    assert code(npt, hw.WALK_VIOLATION, np_, False, False) == U
    assert code(npt, hw.WALK_VIOLATION, 0x805, True, False) == U | P | W
    assert code(npt, hw.WALK_MISCONFIG, ref.NPT_MMIO_VALUE, False, True) == U | P | R | F


def test_write_access_to_a_read_only_slot_is_emulated():
    """A present write violation (PRESENT|WRITE): page_fault_can_be_fast says yes, but the
    leaf is not MMU-writable -> INVALID; kvm_faultin_pfn: KVM_PFN_ERR_RO_FAULT -> EMULATE."""
    vm, v = vm_vcpu()
    vm.add_memslot(0, 512, PFN0, readonly=True)
    assert v.access(5) == PF.FIXED
    assert v.access(5, write=True) == PF.EMULATE
    s = v.stats
    assert s["faults_fast"] == 0 and s["faults_emulate"] == 1 and s["exits_ept_violation"] == 2


def test_access_batch_counts_and_out_codes():
    """Each access is access(): hits are accesses without exit; the other keys count exits'
    kvm_mmu_page_fault results, "fast" those fast_page_fault resolved."""
    vm, v = vm_vcpu(max_level=1)
    vm.add_memslot(0, 512, PFN0)
    gfns = np.array([5, 5, 5, 1 << 30, 1 << 30, 6], dtype=np.uint32)
    acc = np.array([0, 1, 2, 0, 1, 2], dtype=np.int8)
    out = np.full(6, -1, dtype=np.int8)
    counts = v.access_batch(gfns, acc, out)
    assert counts == {"hits": 2, "fixed": 2, "spurious": 0, "retry": 0, "emulate": 2,
                      "fast": 0}
    assert out.tolist() == [PF.FIXED, ref.ACCESS_HIT, ref.ACCESS_HIT, PF.EMULATE,
                            PF.EMULATE, PF.FIXED]
    assert v.stats["exits_misconfig"] == 1 and v.stats["exits_ept_violation"] == 3
    with pytest.raises(ValueError):
        v.access_batch(gfns, np.full(6, 3))
    with pytest.raises(ValueError):
        v.access(5, write=True, exec=True)
    assert v.access_batch(np.array([], dtype=np.int64)) == dict.fromkeys(counts, 0)


def test_access_batch_out_of_memory_reports_completed():
    """8 pages: the root and 3 tables for gfn 0 leave 4 cached, below the top-up's 5."""
    vm, v = vm_vcpu(max_level=1, max_pt_pages=8)
    vm.add_memslot(0, 1 << 20, PFN0)
    gfns = np.array([0, 0, 1, 2], dtype=np.int64)
    with pytest.raises(ref.OutOfMemory) as info:
        v.access_batch(gfns)
    assert info.value.completed == 2
    vm.audit()


def test_fault_batch_error_codes_and_fast():
    """fault_batch: each item through kvm_mmu_page_fault; "fast" counts pf_fast."""
    vm, v = vm_vcpu()
    vm.add_memslot(0, 512, PFN0)
    codes = np.array([ref.PFERR_WRITE_MASK, ref.PFERR_WRITE_MASK | ref.PFERR_PRESENT_MASK, 0],
                     dtype=np.uint32)
    out = np.zeros(3, dtype=np.int8)
    counts = v.fault_batch(np.array([1, 1, 1]), out=out, error_codes=codes)
    assert counts == {"fixed": 2, "spurious": 1, "retry": 0, "emulate": 0, "fast": 1}
    assert out.tolist() == [PF.FIXED, PF.SPURIOUS, PF.FIXED]
    with pytest.raises(ValueError):
        v.fault_batch(np.array([1]), np.array([0]), error_codes=np.array([0]))
    with pytest.raises(ValueError):
        v.fault_batch(np.array([1]), error_codes=np.array([1 << 32], dtype=np.uint64))
    with pytest.raises(ValueError):
        v.fault_batch(np.array([1, 2]), error_codes=np.array([0]))
