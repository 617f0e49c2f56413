"""Guest memory as the VMM sees it: ``vm.read_guest`` / ``vm.write_guest`` (issue 12, point 1).

Semantics: a memslot maps guest-physical pages onto host pages (KVM_SET_USER_MEMORY_REGION's
``userspace_addr``; here ``pfn``), and the VMM's own loads and stores go through that mapping:
``kvm_read_guest`` / ``kvm_write_guest`` (virt/kvm/kvm_main.c) return -EFAULT where no memslot
is.  The contents belong to the host pages, so moving a slot keeps them and a slot mapping the
same host pages again shows them.  A store of the VMM is invisible to the MMU: no SPTE, no exit,
no dirty-log bit (a VMM rewriting a guest page table behind the guest's back leaves shadow
pages stale, which is why point 1 needs it).  Both implementations.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.snapshots import snapshot

PFN0 = 0x100000


def vm_with_slot(impl, npages=1024, base=0, **kw):
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=64)
    return vm, vm.add_memslot(base, npages, PFN0, **kw)


def test_fresh_memory_reads_zero_and_words_round_trip(impl):
    vm, _ = vm_with_slot(impl)
    assert vm.read_guest(0x1000) == 0
    vm.write_guest(0x1008, 0xFFFF_FFFF_FFFF_FFFF)
    vm.write_guest(0x1010, 42)
    assert vm.read_guest(0x1008) == (1 << 64) - 1
    assert vm.read_guest(0x1000, count=4).tolist() == [0, (1 << 64) - 1, 42, 0]
    assert vm.read_guest(0x1000, 4).dtype == np.uint64


def test_an_array_write_spans_pages(impl):
    vm, _ = vm_with_slot(impl)
    words = np.arange(1, 1 + 600, dtype=np.uint64)
    vm.write_guest(0x2000 - 8 * 10, words)               # 10 words in page 1, 590 in page 2
    assert vm.read_guest(0x2000 - 8 * 10, 600).tolist() == words.tolist()
    assert vm.read_guest(0x2000 - 8 * 11) == 0
    assert vm.read_guest(0x2000 + 8 * 590) == 0


def test_the_vmms_stores_are_invisible_to_the_mmu(impl):
    """No SPTE, no stat, no dirty-log bit changes: only a guest access goes through the MMU."""
    vm, slot = vm_with_slot(impl, dirty_log=True)
    v = vm.vcpu()
    v.fault(3, write=True)
    vm.get_dirty_log(slot)
    before = snapshot(vm, [v])
    vm.write_guest(3 << 12, 7)
    vm.write_guest(5 << 12, np.full(512, 9, dtype=np.uint64))
    after = snapshot(vm, [v])
    assert np.array_equal(before.pop("pages"), after.pop("pages"))
    assert after == before
    assert not vm.get_dirty_log(slot).any()


def test_contents_belong_to_the_host_pages(impl):
    """move_memslot keeps them (same host pages); delete then a slot over the same host
    pages at another gfn shows them again; the old gpa has no memory any more."""
    vm, slot = vm_with_slot(impl, npages=16)
    vm.write_guest(0x3008, 0xABC)
    vm.move_memslot(slot, 0x100)
    assert vm.read_guest((0x100 << 12) + 0x3008) == 0xABC
    with pytest.raises(ValueError, match="no memslot"):
        vm.read_guest(0x3008)
    vm.delete_memslot(slot)
    vm.add_memslot(0x400, 16, PFN0)
    assert vm.read_guest((0x400 << 12) + 0x3008) == 0xABC
    vm.add_memslot(0x500, 16, PFN0 + 16)                 # other host pages: fresh
    assert vm.read_guest((0x500 << 12) + 0x3008) == 0


def test_a_read_only_slot_is_read_only_to_the_guest_not_to_the_vmm(impl):
    vm, _ = vm_with_slot(impl, readonly=True)
    vm.write_guest(0x10, 5)
    assert vm.read_guest(0x10) == 5


@pytest.mark.parametrize("call,exc,msg", [
    (lambda vm: vm.read_guest(0x1004), ValueError, "8-byte aligned"),
    (lambda vm: vm.write_guest(0x1001, 1), ValueError, "8-byte aligned"),
    (lambda vm: vm.read_guest(1024 << 12), ValueError, "no memslot"),
    (lambda vm: vm.write_guest((1 << 48) - 8, 1), ValueError, "no memslot"),   # last word
    (lambda vm: vm.read_guest(1 << 48), ValueError, "address width"),
    (lambda vm: vm.write_guest(0, 1 << 64), ValueError, None),
    (lambda vm: vm.write_guest(0, -1), ValueError, None),
    (lambda vm: vm.write_guest(0, 1.0), TypeError, None),
    (lambda vm: vm.write_guest(0, "1"), TypeError, None),
    (lambda vm: vm.write_guest(0.0, 1), TypeError, None),
    (lambda vm: vm.write_guest(0, np.zeros(3, dtype=np.int64)), TypeError, "uint64"),
    (lambda vm: vm.write_guest(0, np.zeros((2, 2), dtype=np.uint64)), ValueError, "1-D"),
    (lambda vm: vm.write_guest(0, np.zeros(0, dtype=np.uint64)), ValueError, "non-empty"),
    (lambda vm: vm.read_guest(0, count=0), ValueError, None),
    (lambda vm: vm.read_guest(0, count=1.5), TypeError, None),
])
def test_bad_arguments_are_refused_and_change_nothing(impl, call, exc, msg):
    vm, _ = vm_with_slot(impl)
    vm.write_guest(0, 77)
    with pytest.raises(exc, match=msg):
        call(vm)
    assert vm.read_guest(0) == 77


def test_a_write_running_off_the_memslot_writes_nothing(impl):
    vm, _ = vm_with_slot(impl, npages=2)
    with pytest.raises(ValueError, match="no memslot"):
        vm.write_guest(0x2000 - 16, np.arange(1, 5, dtype=np.uint64))   # 2 words past the end
    assert vm.read_guest(0x2000 - 16, 2).tolist() == [0, 0]


_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 63), st.integers(0, 511),
              st.lists(st.integers(0, (1 << 64) - 1), min_size=1, max_size=700)),
    st.tuples(st.just("read"), st.integers(0, 63), st.integers(0, 511), st.integers(1, 700)),
    st.tuples(st.just("move"), st.integers(0, 3), st.integers(0, 7)),
), max_size=25)


@settings(max_examples=40)
@given(_ops)
def test_engine_and_oracle_hold_the_same_memory(fast, reference, ops):
    """Random VMM reads, writes (across pages and slots) and memslot moves on both."""
    sides = []
    for impl in (fast, reference):
        vm = impl.Vm(impl.SpteLayout.npt(), max_pt_pages=64)
        slots = [vm.add_memslot(16 * i, 16, PFN0 + 16 * i) for i in range(4)]
        sides.append((vm, slots))
    for op in ops:
        results = []
        for vm, slots in sides:
            try:
                if op[0] == "write":
                    vm.write_guest(op[1] * 4096 + op[2] * 8, np.array(op[3], dtype=np.uint64))
                    results.append(None)
                elif op[0] == "read":
                    results.append(vm.read_guest(op[1] * 4096 + op[2] * 8, op[3]).tolist())
                else:
                    vm.move_memslot(slots[op[1]], 0x1000 + 16 * op[2])
                    results.append(None)
            except ValueError as e:
                results.append(type(e))
        assert results[0] == results[1], op
    for (fv, _), (rv, _) in [sides]:
        for _sid, base, npages, _pfn, _ro in fv.memslots:
            assert fv.read_guest(base << 12, npages * 512).tolist() == \
                rv.read_guest(base << 12, npages * 512).tolist()
