"""Issue 11 item 2 (partial): vm.unmap_gfn_range and vm.write_protect_gfn on both
implementations.  Expected values from Linux 6.10: kvm_main.c kvm_handle_hva_range (per
memslot, one kvm_flush_remote_tlbs when a handler asks), tdp_mmu.c
kvm_tdp_mmu_unmap_gfn_range / tdp_mmu_zap_leafs (flush only for valid roots),
write_protect_gfn (new = old & ~(W | MMU-writable)), page_track.c kvm_write_track_add_gfn
(kvm_flush_remote_tlbs if changed)."""
import pytest

from support.layouts import make_layout

EPT_LEAF_4K = (1 << 63) | (1 << 58) | (1 << 57) | 0x800 | (1 << 8) | (1 << 9) | 0x70 | 0x7


def vm_of(impl, kind="ept_ad", **kw):
    kw.setdefault("max_pt_pages", 256)
    return impl.Vm(make_layout(impl, kind), **kw)


def test_unmap_flushes_once_for_a_mapped_range(impl):
    """tdp_mmu_zap_leafs returns flush for a valid root; kvm_handle_hva_range flushes
    once (full flush: tlb_flushes)."""
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    v.fault(6, write=True)
    before = vm.stats
    assert vm.unmap_gfn_range(0, 1024) is True
    after = vm.stats
    assert after["tlb_flushes"] == before["tlb_flushes"] + 1
    assert after["tlb_flushes_ranged"] == before["tlb_flushes_ranged"]
    assert vm.lookup(5) is None and vm.lookup(6) is None
    assert after["pages_4k"] == 0
    # handle_changed_spte: the zapped leaves had A and D -> host page flags.
    assert vm.host_page_dirty(0x100005) and vm.host_page_accessed(0x100006)
    vm.audit()


def test_unmap_of_an_unmapped_range_does_not_flush(impl):
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    before = vm.stats["tlb_flushes"]
    assert vm.unmap_gfn_range(100, 200) is False
    assert vm.unmap_gfn_range(2048, 4096) is False     # no memslot intersects
    assert vm.stats["tlb_flushes"] == before
    assert vm.lookup(5) is not None
    vm.audit()


def test_write_protect_gfn_clears_w_and_mmu_writable_and_flushes(impl):
    """write_protect_gfn: EPT leaf ...0b77 loses W (bit 1) and MMU-writable (bit 58);
    kvm_write_track_add_gfn flushes (tlb_flushes + 1); a second call changes nothing."""
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    v.fault(5, write=True)
    assert vm.lookup(5) == (EPT_LEAF_4K | 0x100005 << 12, 1)
    before = vm.stats["tlb_flushes"]
    assert vm.write_protect_gfn(5) is True
    assert vm.lookup(5) == ((EPT_LEAF_4K & ~(2 | 1 << 58)) | 0x100005 << 12, 1)
    assert vm.stats["tlb_flushes"] == before + 1
    assert vm.write_protect_gfn(5) is False
    assert vm.stats["tlb_flushes"] == before + 1
    vm.audit()


def test_write_protect_gfn_min_level_skips_4k_leaves(impl):
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    vm.vcpu().fault(5, write=True)
    leaf = vm.lookup(5)
    assert vm.write_protect_gfn(5, min_level=2) is False
    assert vm.lookup(5) == leaf
    vm.audit()


def test_write_protect_gfn_bad_inputs(impl):
    vm = vm_of(impl, max_level=1)
    vm.add_memslot(0, 1024, 0x100000)
    with pytest.raises(ValueError):
        vm.write_protect_gfn(5000)          # in no memslot
    with pytest.raises(ValueError):
        vm.write_protect_gfn(5, min_level=0)
    with pytest.raises(TypeError):
        vm.write_protect_gfn(5.0)
    with pytest.raises(ValueError):
        vm.unmap_gfn_range(10, 5)
    vm.audit()
