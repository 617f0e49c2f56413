"""Issue 11 item 1 and 3: dirty logging, eager split, the collapsible zap and NX recovery, on
both implementations, with the exact SPTE values, bitmaps and flush counts of Linux 6.10.

Sources of every expectation (Linux 6.10; spec §3.12-3.14):

* x86.c ``kvm_mmu_slot_apply_flags``: on -- nothing under manual protect + initially-set;
  else eager split (``eager_page_split``), then with PML (``cpu_dirty_log_size``)
  ``kvm_mmu_slot_leaf_clear_dirty`` + ``kvm_mmu_slot_remove_write_access(PG_LEVEL_2M)``,
  without ``..._remove_write_access(PG_LEVEL_4K)``; then ``kvm_flush_remote_tlbs_memslot``
  unconditionally.  Off -- ``kvm_mmu_zap_collapsible_sptes``.
* tdp_mmu.c ``wrprot_gfn_range`` (new = old & ~PT_WRITABLE_MASK: MMU-writable stays),
  ``clear_dirty_gfn_range`` (dbit = D with A/D, else W), ``clear_dirty_pt_masked`` (4K
  leaves of the mask; dbit = W if wrprot or no A/D, else D; ``kvm_set_pfn_dirty``),
  ``tdp_mmu_split_huge_pages_root`` / ``tdp_mmu_split_huge_page`` (no flush, +512 at
  level - 1), ``zap_collapsible_spte_range`` (atomic zap with its ranged flush).
* mmu.c ``kvm_mmu_hugepage_adjust`` (no huge page in a dirty-logged slot),
  ``fast_page_fault`` (W restored on an MMU-writable SPTE, never on a huge one in a
  dirty-logged slot; ``fast_pf_fix_direct_spte`` -> ``mark_page_dirty_in_slot``),
  ``kvm_arch_mmu_enable_log_dirty_pt_masked`` (the ALIGN-up "cross two large pages?"),
  ``kvm_recover_nx_huge_pages``.
* kvm_main.c ``kvm_get_dirty_log_protect`` (xchg each non-zero word, re-protect, one
  memslot flush), ``kvm_clear_dirty_log_protect`` (its -EINVAL / -ENOENT checks,
  fetch_andnot), ``kvm_alloc_dirty_bitmap`` (bitmap_set under initially-set).
* vmx.c PML: the CPU logs the gfn when it sets D (spec: SDM "Page-Modification Logging"),
  ``vmx_flush_pml_buffer`` on every exit, ``kvm_arch_sync_dirty_log`` kicks the vCPUs.

SPTE values from spec §2 (not from either implementation):
EPT 4K leaf with A/D = bit 63 (suppress #VE) | 58 (MMU-writable) | 57 (host-writable) |
bit 11 (MMU-present) | D 0x200 | A 0x100 | WB+IPAT 0x70 | RWX 0x7 = 0x8600000000000b77 | pfn;
EPT without A/D: bit 52 (A/D disabled) instead of A/D: 0x8610000000000877 | pfn;
NPT 4K leaf = bit 10 (MMU-writable) | 9 (host-writable) | 11 | D 0x40 | A 0x20 | U/W/P 0x7
= 0xe67 | pfn.
"""
import numpy as np
import pytest

from support.layouts import make_layout

PFN0 = 0x100000
W = 1 << 1
EPT_D = 1 << 9
EPT_MMU_WRITABLE = 1 << 58
EPT_LEAF_4K = 0x8600000000000B77
EPT_NOAD_LEAF_4K = 0x8610000000000877
NPT_LEAF_4K = 0xE67
PS = 1 << 7                 # PT_PAGE_SIZE_MASK: a 2M / 1G leaf
NX_NPT = 1 << 63

LEAF_4K = {"ept_ad": EPT_LEAF_4K, "ept_noad": EPT_NOAD_LEAF_4K, "npt": NPT_LEAF_4K}


def vm_of(impl, kind="ept_ad", **kw):
    kw.setdefault("max_pt_pages", 512)
    return impl.Vm(make_layout(impl, kind), **kw)


def leaf(kind, gfn, base_pfn=PFN0):
    return LEAF_4K[kind] | ((base_pfn + gfn) << 12)


def writes(vcpu, gfns):
    gfns = np.asarray(gfns, dtype=np.uint64)
    return vcpu.access_batch(gfns, np.ones(len(gfns), dtype=np.uint8))


def reads(vcpu, gfns):
    return vcpu.access_batch(np.asarray(gfns, dtype=np.uint64))


def bits(bitmap):
    """The pages set in a dirty bitmap of uint64 words."""
    return [w * 64 + b for w, word in enumerate(bitmap) for b in range(64) if int(word) >> b & 1]


def spte(vm, gfn):
    found = vm.lookup(gfn)
    return None if found is None else found[0]


# --- enabling dirty logging -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ept_ad", "ept_noad", "npt"])
def test_enabling_without_pml_clears_only_w_and_flushes_the_slot_once(impl, kind):
    """kvm_mmu_slot_remove_write_access(PG_LEVEL_4K): W cleared, MMU-writable kept; one
    kvm_flush_remote_tlbs_memslot (a ranged flush); one swap (generation + 2)."""
    vm = vm_of(impl, kind, max_level=1, pml=False)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    writes(v, [3, 4, 700])
    assert [spte(vm, g) for g in (3, 700)] == [leaf(kind, 3), leaf(kind, 700)]
    before, gen = vm.stats, vm.mmio_generation
    vm.set_memslot_flags(slot, dirty_log=True)
    after = vm.stats
    assert [spte(vm, g) for g in (3, 4, 700)] == [leaf(kind, g) & ~W for g in (3, 4, 700)]
    assert after["tlb_flushes_ranged"] == before["tlb_flushes_ranged"] + 1
    assert after["tlb_flushes"] == before["tlb_flushes"]
    assert vm.mmio_generation == gen + 2
    assert bits(vm.get_dirty_log(slot)) == []
    vm.audit()


@pytest.mark.parametrize("kind", ["ept_ad", "ept_noad", "npt"])
def test_a_write_after_write_protection_is_a_fast_fault_that_logs_the_page(impl, kind):
    """fast_page_fault sets W again on the MMU-writable SPTE and marks the gfn dirty;
    KVM_GET_DIRTY_LOG returns it, clears it and write-protects the page again
    (clear_dirty_pt_masked with wrprot: W), with one memslot flush; a second get finds
    nothing and flushes nothing."""
    vm = vm_of(impl, kind, max_level=1, pml=False)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    writes(v, [3, 5, 64 + 9])
    vm.set_memslot_flags(slot, dirty_log=True)
    before = vm.stats
    counts = writes(v, [5, 64 + 9])
    assert counts["fixed"] == 2 and counts["fast"] == 2 and counts["hits"] == 0
    assert spte(vm, 5) == leaf(kind, 5) and spte(vm, 3) == leaf(kind, 3) & ~W
    after = vm.stats
    assert after["faults_fast"] == before["faults_fast"] + 2
    assert after["dirty_pages_marked"] == before["dirty_pages_marked"] + 2
    bm = vm.get_dirty_log(slot)
    assert bm.dtype == np.uint64 and len(bm) == 1024 // 64
    assert bits(bm) == [5, 64 + 9]
    assert spte(vm, 5) == leaf(kind, 5) & ~W and spte(vm, 64 + 9) == leaf(kind, 64 + 9) & ~W
    assert vm.stats["tlb_flushes_ranged"] == after["tlb_flushes_ranged"] + 1
    assert vm.host_page_dirty(PFN0 + 5)
    again = vm.stats
    assert bits(vm.get_dirty_log(slot)) == []
    assert vm.stats["tlb_flushes_ranged"] == again["tlb_flushes_ranged"]
    vm.audit()


def test_pml_clears_d_keeps_w_and_the_cpu_logs_the_write_without_an_exit(impl):
    """With PML: kvm_mmu_slot_leaf_clear_dirty (D cleared on the 4K leaves), write
    protection only from 2M.  A write is then a hit: the CPU sets D and logs the gfn in
    the vCPU's buffer, flushed to the bitmap at the exit; get_dirty_log clears D again
    (clear_dirty_pt_masked, dbit D) and marks the host page dirty."""
    vm = vm_of(impl, max_level=1)
    assert vm.pml is True
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    writes(v, [3, 5])
    vm.set_memslot_flags(slot, dirty_log=True)
    assert spte(vm, 5) == EPT_LEAF_4K & ~EPT_D | ((PFN0 + 5) << 12)
    before = vm.stats
    counts = writes(v, [5])
    assert counts["hits"] == 1 and counts["fixed"] == 0
    after = vm.stats
    assert after["pml_logged"] == before["pml_logged"] + 1
    assert after["hw_ad_sets"] == before["hw_ad_sets"] + 1
    assert after["exits_ept_violation"] == before["exits_ept_violation"]
    assert spte(vm, 5) == leaf("ept_ad", 5)
    assert bits(vm.get_dirty_log(slot)) == [5]
    assert spte(vm, 5) == leaf("ept_ad", 5) & ~EPT_D
    assert vm.host_page_dirty(PFN0 + 5)
    # A read sets no D and logs nothing.
    reads(v, [3])
    assert vm.stats["pml_logged"] == after["pml_logged"]
    assert bits(vm.get_dirty_log(slot)) == []
    vm.audit()


def test_a_full_pml_buffer_is_an_exit_and_no_write_is_lost(impl):
    """513 writes to D-clean pages in one batch: the 513th finds the 512-entry log full
    (PML-full exit, nothing set), the exit flushes the log, the write is re-executed."""
    vm = vm_of(impl, max_level=1, max_pt_pages=64)
    slot = vm.add_memslot(0, 2048, PFN0)
    v = vm.vcpu()
    pages = np.arange(600, dtype=np.uint64)
    writes(v, pages)
    vm.set_memslot_flags(slot, dirty_log=True)
    before = vm.stats
    counts = writes(v, pages[:513])
    assert counts["hits"] == 513
    after = vm.stats
    assert after["exits_pml_full"] == before["exits_pml_full"] + 1
    assert after["pml_logged"] == before["pml_logged"] + 513
    assert bits(vm.get_dirty_log(slot)) == list(range(513))
    vm.audit()


def test_a_read_fault_in_a_dirty_logged_slot_installs_a_writable_page_and_logs_it(impl):
    """make_spte gives a TDP read fault W (and D) on a host-writable page, and a writable
    SPTE in a dirty-logged slot calls mark_page_dirty_in_slot."""
    vm = vm_of(impl)
    slot = vm.add_memslot(0, 1024, PFN0, dirty_log=True)
    v = vm.vcpu()
    v.fault(7)
    assert spte(vm, 7) == leaf("ept_ad", 7)
    assert bits(vm.get_dirty_log(slot)) == [7]
    vm.audit()


# --- huge pages and dirty logging ----------------------------------------------------------------


def test_no_huge_page_is_created_in_a_dirty_logged_slot(impl):
    """kvm_mmu_hugepage_adjust returns at kvm_slot_dirty_track_enabled."""
    vm = vm_of(impl)
    vm.add_memslot(0, 1024, PFN0, dirty_log=True)
    v = vm.vcpu()
    v.fault(600, write=True)
    assert vm.lookup(600)[1] == 1
    assert vm.stats["pages_2m"] == 0 and vm.stats["pages_4k"] == 1
    vm.audit()


def test_eager_split_on_enable_then_write_protect(impl):
    """A 2M leaf becomes 512 write-protected 4K leaves: tables from the host, no flush of
    their own, huge_pages_split 1, the page stats move 512 to 4K."""
    vm = vm_of(impl, pml=False)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    v.fault(600, write=True)
    assert vm.lookup(600)[1] == 2
    before = vm.stats
    vm.set_memslot_flags(slot, dirty_log=True)
    after = vm.stats
    assert after["huge_pages_split"] == before["huge_pages_split"] + 1
    assert (after["pages_2m"], after["pages_4k"]) == (0, 512)
    assert after["pt_pages_l1"] == before["pt_pages_l1"] + 1
    assert after["tlb_flushes_ranged"] == before["tlb_flushes_ranged"] + 1
    assert after["cache_fills"] == before["cache_fills"]     # not from a vCPU cache
    # make_huge_page_split_spte keeps A/D of the huge page; then W is cleared.
    assert spte(vm, 600) == leaf("ept_ad", 600) & ~W
    assert spte(vm, 512) == leaf("ept_ad", 512) & ~W
    vm.audit()


def test_without_eager_split_the_huge_page_is_protected_and_split_by_the_next_write(impl):
    """eager_page_split=False: the 2M leaf loses W.  The write's fast fault refuses a
    huge SPTE in a dirty-logged slot; the slow path maps 4K (splitting the huge page with
    a table from the vCPU cache) and logs only the page written."""
    vm = vm_of(impl, pml=False, eager_page_split=False)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    v.fault(600, write=True)
    vm.set_memslot_flags(slot, dirty_log=True)
    level2 = vm.lookup(600)
    assert level2[1] == 2 and not level2[0] & W and level2[0] & EPT_MMU_WRITABLE
    before = vm.stats
    counts = writes(v, [601])
    assert counts["fixed"] == 1 and counts["fast"] == 0
    after = vm.stats
    assert after["pages_2m"] == 0 and after["pages_4k"] == 512
    assert after["huge_pages_split"] == before["huge_pages_split"]
    assert spte(vm, 601) == leaf("ept_ad", 601)
    assert spte(vm, 600) == leaf("ept_ad", 600) & ~W
    assert bits(vm.get_dirty_log(slot)) == [601]
    vm.audit()


def test_disabling_dirty_logging_zaps_collapsible_tables_and_huge_pages_come_back(impl):
    """zap_collapsible_spte_range: the 2M-level entry pointing at the split table is
    zapped atomically (its ranged flush); the next fault maps 2M again.  The 1G-level entry
    is kept: the slot (4 MiB) cannot hold a 1G page."""
    vm = vm_of(impl, pml=False)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    v.fault(600, write=True)
    vm.set_memslot_flags(slot, dirty_log=True)
    v.fault(5, write=True)              # a 4K table in [0, 512) too
    before = vm.stats
    vm.set_memslot_flags(slot, dirty_log=False)
    after = vm.stats
    assert after["tlb_flushes_ranged"] == before["tlb_flushes_ranged"] + 2
    assert vm.lookup(600) is None and vm.lookup(5) is None
    assert after["pt_pages_l1"] == before["pt_pages_l1"] - 2
    assert after["pt_pages_l2"] == before["pt_pages_l2"]
    v.fault(600, write=True)
    assert vm.lookup(600)[1] == 2
    with pytest.raises(ValueError):
        vm.get_dirty_log(slot)              # the bitmap is gone (-ENOENT)
    vm.audit()


# --- manual protect and initially-set ------------------------------------------------------------


def test_manual_protect_get_copies_and_clear_protects(impl):
    """With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 get_dirty_log only copies (no flush); the
    clear re-protects the pages whose bits were set in both, with one memslot flush."""
    vm = vm_of(impl, max_level=1, pml=False, manual_dirty_log_protect=True)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    writes(v, [5, 6, 70])
    vm.set_memslot_flags(slot, dirty_log=True)
    writes(v, [5, 6, 70])
    before = vm.stats
    bm = vm.get_dirty_log(slot)
    assert bits(bm) == [5, 6, 70]
    assert bits(vm.get_dirty_log(slot)) == [5, 6, 70]            # still set
    assert vm.stats["tlb_flushes_ranged"] == before["tlb_flushes_ranged"]
    assert spte(vm, 5) == leaf("ept_ad", 5)
    mask = np.zeros(2, dtype=np.uint64)
    mask[0] = 1 << 5
    mask[1] = (1 << 6) | (1 << 8)     # page 70 dirty; page 72 was never dirty
    vm.clear_dirty_log(slot, 0, 128, mask)
    assert bits(vm.get_dirty_log(slot)) == [6]
    assert spte(vm, 5) == leaf("ept_ad", 5) & ~W and spte(vm, 70) == leaf("ept_ad", 70) & ~W
    assert spte(vm, 6) == leaf("ept_ad", 6)
    assert vm.stats["tlb_flushes_ranged"] == before["tlb_flushes_ranged"] + 1
    # Clearing bits that are no longer set changes nothing and flushes nothing.
    vm.clear_dirty_log(slot, 0, 128, mask)
    assert vm.stats["tlb_flushes_ranged"] == before["tlb_flushes_ranged"] + 1
    vm.audit()


def test_initially_set_bitmap_and_an_enable_that_does_nothing(impl):
    """kvm_alloc_dirty_bitmap: bitmap_set of the slot's pages (100: one full word and 36
    bits); kvm_mmu_slot_apply_flags returns before any SPTE change or flush."""
    vm = vm_of(impl, pml=False, manual_dirty_log_protect=True, dirty_log_initially_set=True)
    slot = vm.add_memslot(0, 100, PFN0)
    v = vm.vcpu()
    v.fault(5, write=True)
    before = vm.stats
    vm.set_memslot_flags(slot, dirty_log=True)
    bm = vm.get_dirty_log(slot)
    assert [int(w) for w in bm] == [(1 << 64) - 1, (1 << 36) - 1]
    assert vm.stats["tlb_flushes_ranged"] == before["tlb_flushes_ranged"]
    assert spte(vm, 5) == leaf("ept_ad", 5)
    vm.audit()


def huge_vm_for_the_align_quirk(impl):
    """A slot based at gfn 480 (pfn congruent, so 2M pages at 512 and 1024 fit): word 0 of
    its bitmap covers gfns 480..543, across the 2M boundary at 512."""
    vm = vm_of(impl, pml=False, manual_dirty_log_protect=True, dirty_log_initially_set=True,
               eager_page_split=False)
    slot = vm.add_memslot(480, 2048, PFN0 + 480)
    v = vm.vcpu()
    v.fault(481, write=True)            # 4K: [0, 512) is not inside the slot
    v.fault(512, write=True)            # a 2M leaf
    assert vm.lookup(481)[1] == 1 and vm.lookup(512)[1] == 2
    vm.set_memslot_flags(slot, dirty_log=True)
    return vm, slot


def test_clear_with_a_last_bit_on_the_next_2m_page_leaves_that_page_writable(impl):
    """kvm_arch_mmu_enable_log_dirty_pt_masked compares ALIGN(start << 12, 2M) with
    ALIGN(end << 12, 2M) (rounded up): start 481, end 512 both round to 512, so only
    start's 2M range is write-protected and the 2M leaf at 512 keeps W (6.10's quirk);
    the 4K leaf of 481 loses W (clear_dirty_pt_masked)."""
    vm, slot = huge_vm_for_the_align_quirk(impl)
    mask = np.array([(1 << 1) | (1 << 32)], dtype=np.uint64)     # pages 1, 32: gfns 481, 512
    vm.clear_dirty_log(slot, 0, 64, mask)
    big = vm.lookup(512)
    assert big[1] == 2 and big[0] & W
    assert not spte(vm, 481) & W
    vm.audit()


def test_clear_with_a_last_bit_past_the_2m_boundary_protects_the_huge_page(impl):
    """end 513 rounds up to 1024 != 512: the 2M leaf at 512 is write-protected
    (kvm_mmu_slot_gfn_write_protect at PG_LEVEL_2M: W and MMU-writable cleared)."""
    vm, slot = huge_vm_for_the_align_quirk(impl)
    mask = np.array([(1 << 1) | (1 << 33)], dtype=np.uint64)     # gfns 481, 513
    vm.clear_dirty_log(slot, 0, 64, mask)
    big = vm.lookup(512)
    assert big[1] == 2 and not big[0] & W and not big[0] & EPT_MMU_WRITABLE
    vm.audit()


def test_clear_under_initially_set_splits_eagerly(impl):
    """With eager_page_split the 2M page holding the mask's bits is split first, then the
    4K leaves of the set bits are write-protected; the others stay writable."""
    vm = vm_of(impl, pml=False, manual_dirty_log_protect=True, dirty_log_initially_set=True)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    v.fault(600, write=True)
    vm.set_memslot_flags(slot, dirty_log=True)
    before = vm.stats
    vm.clear_dirty_log(slot, 576, 64, np.array([1 << (600 - 576)], dtype=np.uint64))
    after = vm.stats
    assert after["huge_pages_split"] == before["huge_pages_split"] + 1
    assert spte(vm, 600) == leaf("ept_ad", 600) & ~W
    # write_protect_gfn(start, 2M) found no 2M leaf any more; the siblings keep W.
    assert spte(vm, 601) == leaf("ept_ad", 601)
    assert 600 not in bits(vm.get_dirty_log(slot)) and 601 in bits(vm.get_dirty_log(slot))
    vm.audit()


@pytest.mark.parametrize("args, exc", [
    ((0, 1, 64, [1]), ValueError),          # first_page not a multiple of 64
    ((0, 0, 65, [1, 1]), ValueError),       # num_pages not a multiple of 64, not to the end
    ((0, 0, 2048, [1] * 32), ValueError),   # beyond the slot
    ((0, 1024, 0, "empty"), None),          # first_page == npages, nothing: allowed
    ((0, 0, 128, [1]), ValueError),         # too few words
    ((0, 0, 64, [[1]]), ValueError),        # not 1-D
    ((0, 0, 64, [1.5]), TypeError),         # not integers
    ((0, 0, 64, [-1]), ValueError),         # a negative word (int64)
    ((0, 0, 64, "list"), TypeError),        # a list is not an array (API.md)
    ((0, 0, 64, "masked"), TypeError),      # the mask would be ignored
    ((99, 0, 64, [1]), ValueError),         # no such slot
    ((0, -64, 64, [1]), ValueError),
    (("0", 0, 64, [1]), TypeError),
])
def test_clear_dirty_log_refuses_bad_arguments_before_anything_changes(impl, args, exc):
    vm = vm_of(impl, max_level=1, pml=False, manual_dirty_log_protect=True)
    slot = vm.add_memslot(0, 1024, PFN0, dirty_log=True)
    v = vm.vcpu()
    writes(v, [0, 1])
    before, log = vm.stats, bits(vm.get_dirty_log(slot))
    slot_id, first, num, words = args
    bitmap = {"list": [1], "masked": np.ma.masked_array([1], mask=[True]),
              "empty": np.zeros(0, dtype=np.uint64)}.get(words) if isinstance(words, str) \
        else np.array(words)
    call = (lambda: vm.clear_dirty_log(slot_id if slot_id == 99 or isinstance(slot_id, str)
                                       else slot, first, num, bitmap))
    if exc is None:
        call()
    else:
        with pytest.raises(exc):
            call()
    assert vm.stats == before and bits(vm.get_dirty_log(slot)) == log
    vm.audit()


def test_clear_dirty_log_works_without_manual_protect_and_get_needs_a_log(impl):
    """kvm_vm_ioctl_clear_dirty_log / kvm_clear_dirty_log_protect check only their
    arguments (no manual-protect test): without manual protect a clear still takes the bits
    and re-protects the pages.  A slot without a bitmap is -ENOENT for both ioctls."""
    vm = vm_of(impl, max_level=1, pml=False)
    slot = vm.add_memslot(0, 1024, PFN0)
    with pytest.raises(ValueError, match="ENOENT"):
        vm.get_dirty_log(slot)
    with pytest.raises(ValueError, match="ENOENT"):
        vm.clear_dirty_log(slot, 0, 64, np.ones(1, dtype=np.uint64))
    v = vm.vcpu()
    writes(v, [3, 4])
    vm.set_memslot_flags(slot, dirty_log=True)
    writes(v, [3, 4])
    before = vm.stats
    vm.clear_dirty_log(slot, 0, 64, np.array([1 << 3], dtype=np.uint64))
    assert spte(vm, 3) == leaf("ept_ad", 3) & ~W and spte(vm, 4) == leaf("ept_ad", 4)
    assert vm.stats["tlb_flushes_ranged"] == before["tlb_flushes_ranged"] + 1
    assert bits(vm.get_dirty_log(slot)) == [4]
    with pytest.raises(TypeError):
        vm.set_memslot_flags(slot, dirty_log=1.0)
    with pytest.raises(ValueError):
        vm.set_memslot_flags(1234, dirty_log=True)
    vm.audit()


def test_an_unaligned_first_page_is_refused_before_the_slot_is_looked_up(impl):
    """kvm_clear_dirty_log_protect tests first_page & 63 (-EINVAL) before the memslot
    (-ENOENT)."""
    vm = vm_of(impl)
    vm.add_memslot(0, 1024, PFN0)
    with pytest.raises(ValueError, match="EINVAL"):
        vm.clear_dirty_log(77, 1, 64, np.ones(1, dtype=np.uint64))


def test_set_memslot_flags_without_a_change_does_nothing(impl):
    """__kvm_set_memory_region: the same flags are no change -- no swap at all."""
    vm = vm_of(impl)
    slot = vm.add_memslot(0, 1024, PFN0)
    gen = vm.mmio_generation
    vm.set_memslot_flags(slot, dirty_log=False)
    assert vm.mmio_generation == gen
    vm.set_memslot_flags(slot, dirty_log=True)
    vm.set_memslot_flags(slot, dirty_log=True)
    assert vm.mmio_generation == gen + 2


def test_a_read_only_slot_gets_a_log_but_no_protection_or_flush(impl):
    """kvm_mmu_slot_apply_flags returns for KVM_MEM_READONLY."""
    vm = vm_of(impl, max_level=1)
    slot = vm.add_memslot(0, 1024, PFN0, readonly=True)
    v = vm.vcpu()
    v.fault(3)
    before = vm.stats
    vm.set_memslot_flags(slot, dirty_log=True)
    assert vm.stats["tlb_flushes_ranged"] == before["tlb_flushes_ranged"]
    assert bits(vm.get_dirty_log(slot)) == []


def test_get_dirty_log_without_manual_protect_drains_pml_of_every_vcpu(impl):
    """kvm_arch_sync_dirty_log kicks every vCPU; both vCPUs' writes are in the one get."""
    vm = vm_of(impl, max_level=1)
    slot = vm.add_memslot(0, 1024, PFN0)
    v0, v1 = vm.vcpu(), vm.vcpu()
    writes(v0, [1, 2])
    writes(v1, [3])
    vm.set_memslot_flags(slot, dirty_log=True)
    writes(v0, [1])
    writes(v1, [3])
    assert bits(vm.get_dirty_log(slot)) == [1, 3]
    assert vm.vcpus[0].stats["pml_logged"] == 1 and vm.vcpus[1].stats["pml_logged"] == 1


# --- the Vm's options -------------------------------------------------------------------------


def test_vm_options_and_their_checks(impl):
    vm = vm_of(impl)
    assert (vm.manual_dirty_log_protect, vm.dirty_log_initially_set, vm.pml,
            vm.eager_page_split, vm.nx_huge_pages_recovery_ratio) == (False, False, True, True, 60)
    assert vm_of(impl, "ept_noad").pml is False and vm_of(impl, "npt").pml is False
    with pytest.raises(ValueError):
        vm_of(impl, "npt", pml=True)
    with pytest.raises(ValueError):
        vm_of(impl, "ept_noad", pml=True)
    with pytest.raises(ValueError):
        vm_of(impl, dirty_log_initially_set=True)
    with pytest.raises(ValueError):
        vm_of(impl, nx_huge_pages_recovery_ratio=3601)
    with pytest.raises(ValueError):
        vm_of(impl, nx_huge_pages_recovery_ratio=-1)
    assert vm_of(impl, nx_huge_pages_recovery_ratio=3600).nx_huge_pages_recovery_ratio == 3600


# --- eager split as its own operation ----------------------------------------------------------


def test_split_a_1g_page_to_4k(impl):
    """Pre-order: the 1G leaf becomes 512 2M leaves, each of them 512 4K leaves: 1 + 512
    splits, 513 tables from the host, no flush."""
    vm = vm_of(impl, "ept_ad", max_pt_pages=1024)
    vm.add_memslot(0, 1 << 18, PFN0 * 512)
    v = vm.vcpu()
    v.fault(1000, write=True)
    assert vm.lookup(1000)[1] == 3
    before = vm.stats
    assert vm.split_huge_pages(0, 1 << 18) == 1 + 512
    after = vm.stats
    assert (after["pages_1g"], after["pages_2m"], after["pages_4k"]) == (0, 0, 1 << 18)
    assert after["tables_allocated"] == before["tables_allocated"] + 513
    assert after["tlb_flushes"] + after["tlb_flushes_ranged"] == \
        before["tlb_flushes"] + before["tlb_flushes_ranged"]
    assert spte(vm, 1000) == leaf("ept_ad", 1000, PFN0 * 512)
    vm.audit()


def test_split_to_2m_and_running_out_of_tables(impl):
    """target_level 2: one split.  With too few host pages the split stops where it ran
    out (KVM's "try"): what was split stays split and is counted."""
    vm = vm_of(impl, max_pt_pages=1024)
    vm.add_memslot(0, 1 << 18, PFN0 * 512)
    v = vm.vcpu()
    v.fault(0, write=True)
    assert vm.split_huge_pages(0, 1 << 18, target_level=2) == 1
    assert vm.stats["pages_2m"] == 512
    small = vm_of(impl, max_pt_pages=64)
    small.add_memslot(0, 1 << 18, PFN0 * 512)
    w = small.vcpu()
    w.fault(0, write=True)
    free = small.pool.nr_free
    split = small.split_huge_pages(0, 1 << 18)
    assert split == free and small.stats["huge_pages_split"] == free
    assert small.stats["pages_4k"] == 512 * (free - 1)
    small.audit()
    with pytest.raises(ValueError):
        vm.split_huge_pages(0, 1 << 18, target_level=3)


# --- NX huge-page recovery -----------------------------------------------------------------------


def nx_vm(impl, **kw):
    """An exec fault under the NX mitigation maps 4K and marks its table as a possible NX
    huge page (nx_lpage_splits 1)."""
    vm = vm_of(impl, nx_huge_pages=True, **kw)
    slot = vm.add_memslot(0, 1024, PFN0)
    v = vm.vcpu()
    v.fault(600, exec=True)
    assert vm.stats["nx_lpage_splits"] == 1 and vm.lookup(600)[1] == 1
    return vm, slot, v


def test_nx_recovery_zaps_ceil_splits_over_ratio_with_one_full_flush(impl):
    vm, _slot, v = nx_vm(impl)
    before = vm.stats
    assert vm.recover_nx_huge_pages() == 1                   # ceil(1 / 60)
    after = vm.stats
    assert after["nx_lpage_splits"] == 0 and after["nx_huge_pages_recovered"] == 1
    assert after["tlb_flushes"] == before["tlb_flushes"] + 1
    assert vm.lookup(600) is None
    assert vm.recover_nx_huge_pages() == 0
    assert vm.stats["tlb_flushes"] == after["tlb_flushes"]
    v.fault(600)                                             # a read maps 2M again
    assert vm.lookup(600)[1] == 2
    vm.audit()


def test_nx_recovery_only_unaccounts_in_a_dirty_logged_slot_and_ratio_0_does_nothing(impl):
    vm, slot, _v = nx_vm(impl)
    vm.set_memslot_flags(slot, dirty_log=True)
    before = vm.stats
    assert vm.recover_nx_huge_pages() == 0
    after = vm.stats
    assert after["nx_lpage_splits"] == 0 and after["tlb_flushes"] == before["tlb_flushes"]
    assert vm.lookup(600) is not None
    vm.audit()
    off, _s, _w = nx_vm(impl, nx_huge_pages_recovery_ratio=0)
    assert off.recover_nx_huge_pages() == 0 and off.stats["nx_lpage_splits"] == 1


def test_toggling_nx_huge_pages_zaps_all_roots_fast(impl):
    """set_nx_huge_pages: a change is kvm_mmu_zap_all_fast; the same value nothing."""
    vm, _slot, v = nx_vm(impl)
    roots = vm.roots
    vm.set_nx_huge_pages(True)
    assert vm.roots == roots
    vm.set_nx_huge_pages(False)
    assert vm.nx_huge_pages is False and vm.stats["pages_4k"] == 0
    v.fault(600, exec=True)
    assert vm.lookup(600)[1] == 2               # no mitigation: a huge exec page
    with pytest.raises(TypeError):
        vm.set_nx_huge_pages("yes")
    vm.audit()
