"""Dirty logging, aging, eager split and the fast page fault after write-protection (issue 11).

Groups (ratios in one run, `python bench/ratios.py RESULT.json`):

* ``dirty (a)``: KVM_CLEAR_DIRTY_LOG of 1 Mi dirty 4K pages (4 GiB, manual protect) beside
  ``_bench.bare_clear_dirty``, a bare-C loop that clears the same bits (the bitmap words and
  W, or D with PML) in the same tables with the same atomics; and get+clear per page.
  Targets: clear within 3x the bare loop; get+clear >= 50 M pages/s.
* ``dirty (b)``: enabling dirty logging on a populated 4 GiB slot without PML
  (``kvm_mmu_slot_apply_flags`` -> ``kvm_tdp_mmu_wrprot_slot`` over 1 Mi leaves).
  Target >= 100 M SPTEs/s.
* ``dirty (c)``: eager split of 64 GiB of 2M pages (32 Ki huge pages, 16 Mi SPTEs written).
  Target >= 50 M SPTEs/s.
* ``dirty (d)``: aging 4 GiB (``age_gfn_range`` over 1 Mi accessed leaves, A/D and
  access-tracking layouts).  Target >= 100 M SPTEs/s.
* ``dirty (e)``: the fast page fault after write-protection: each write of a migration
  round, through the hardware view (``access_batch``), finds W clear, exits with
  PRESENT|WRITE and is fixed by ``fast_page_fault`` (which restores W and logs the page);
  one vCPU over 4 GiB and two vCPU threads over 4 GiB each.  Targets >= 30 M/s on one
  vCPU; two threads >= 1.7x one.

Every round's setup (untimed) puts the tables back into the state the timed call starts
from: dirty again, writable again, huge again, accessed again.
"""

import numpy as np
import pytest

import spte_fast as sf
from spte_fast import _bench

from conftest import GIB_PAGES, per_item, run_parallel

N = 4 * GIB_PAGES                   # 1 Mi pages: 4 GiB
WRITE = 1                           # fault_batch / access_batch access code of a write
PFN = 0x100000


def dirty_vm(*, pml, manual=True, npages=N, nvcpus=1):
    vm = sf.Vm(sf.SpteLayout.ept(), max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 14,
               manual_dirty_log_protect=manual, pml=pml)
    slot = vm.add_memslot(0, npages, PFN)
    vcpus = [vm.vcpu() for _ in range(nvcpus)]
    gfns = np.arange(npages, dtype=np.uint64)
    writes = np.full(npages, WRITE, dtype=np.uint8)
    vcpus[0].fault_batch(gfns, writes)
    return vm, slot, vcpus, gfns, writes


def popcount(words):
    return int(np.unpackbits(np.ascontiguousarray(words).view(np.uint8)).sum())


def redirty(vm, vcpu, gfns, writes, pml):
    """Write every page again: the CPU sets D (and logs it) with PML, the fast page fault
    restores W and logs it without."""
    res = (vcpu.access_batch if pml else vcpu.fault_batch)(gfns, writes)
    return res


@pytest.mark.parametrize("pml", [False, True], ids=["wrprot", "pml"])
@pytest.mark.parametrize("how", ["clear_dirty_log", "bare_c", "get_and_clear"])
def test_dirty_a_clear_1mi_pages(benchmark, how, pml):
    bits = "PML: D" if pml else "W"
    benchmark.group = f"dirty (a): clear a dirty log of 1 Mi 4K pages, {bits} (ns/page)"
    vm, slot, (vcpu,), gfns, writes = dirty_vm(pml=pml)
    vm.set_memslot_flags(slot, dirty_log=True)
    bit = 9 if pml else 1
    state = {}

    def setup():
        redirty(vm, vcpu, gfns, writes, pml)
        state["bm"] = vm.get_dirty_log(slot)
        assert popcount(state["bm"]) == N

    if how == "clear_dirty_log":
        def run():
            vm.clear_dirty_log(slot, 0, N, state["bm"])
    elif how == "bare_c":
        def run():
            state.update(changed=_bench.bare_clear_dirty(vm, 0, state["bm"], bit))
    else:
        def run():
            vm.clear_dirty_log(slot, 0, N, vm.get_dirty_log(slot))
    benchmark.pedantic(run, setup=setup, rounds=7, warmup_rounds=1)
    assert not vm.get_dirty_log(slot).any()
    spte, level = vm.lookup(12345)
    assert level == 1 and not spte & (1 << bit)
    if how != "bare_c":
        vm.audit()
    else:
        assert state["changed"] == N
    per_item(benchmark, N, "pages")


def test_dirty_b_wrprot_4g_slot(benchmark):
    benchmark.group = "dirty (b): enable dirty logging on a 4 GiB slot without PML (ns/SPTE)"
    vm, slot, (vcpu,), gfns, writes = dirty_vm(pml=False)

    def setup():
        vm.set_memslot_flags(slot, dirty_log=False)
        vcpu.fault_batch(gfns, writes)          # W back on every leaf (fast page faults)

    benchmark.pedantic(lambda: vm.set_memslot_flags(slot, dirty_log=True), setup=setup,
                       rounds=7, warmup_rounds=1)
    assert not vm.lookup(N - 1)[0] & 2 and vm.lookup(N - 1)[0] & (1 << 58)
    vm.audit()
    per_item(benchmark, N, "sptes")


def test_dirty_c_eager_split_64g(benchmark):
    benchmark.group = "dirty (c): eager split of 64 GiB of 2M pages (ns/SPTE written)"
    npages = 64 * GIB_PAGES
    vm = sf.Vm(sf.SpteLayout.ept(), max_level=sf.PG_LEVEL_2M, max_pt_pages=1 << 16)
    vm.add_memslot(0, npages, PFN)
    vcpu = vm.vcpu()
    huge = np.arange(0, npages, 512, dtype=np.uint64)
    writes = np.full(huge.size, WRITE, dtype=np.uint8)

    def setup():
        vm.zap_all()
        vcpu.fault_batch(huge, writes)
        assert vm.stats["pages_2m"] == huge.size

    res = {}
    benchmark.pedantic(lambda: res.update(n=vm.split_huge_pages(0, npages)), setup=setup,
                       rounds=5, warmup_rounds=1)
    assert res["n"] == huge.size and vm.stats["pages_4k"] == npages
    vm.audit()
    per_item(benchmark, npages, "sptes")


@pytest.mark.parametrize("kind", ["ept_ad", "ept_access_tracking"])
def test_dirty_d_age_4g(benchmark, kind):
    benchmark.group = "dirty (d): age_gfn_range over 4 GiB of accessed 4K leaves (ns/SPTE)"
    layout = sf.SpteLayout.ept(ad=kind == "ept_ad")
    vm = sf.Vm(layout, max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 14)
    vm.add_memslot(0, N, PFN)
    vcpu = vm.vcpu()
    gfns = np.arange(N, dtype=np.uint64)
    vcpu.fault_batch(gfns)
    res = {}
    # Accessed again: the CPU sets A (A/D), or the fast page fault restores the
    # access-tracked SPTE (without A/D).
    benchmark.pedantic(lambda: res.update(young=vm.age_gfn_range(0, N)),
                       setup=lambda: vcpu.access_batch(gfns) and None, rounds=7,
                       warmup_rounds=1)
    assert res["young"] is True and vm.test_age_gfn(0, N) is False
    vm.audit()
    per_item(benchmark, N, "sptes")


@pytest.mark.parametrize("nthreads", [1, 2])
def test_dirty_e_fast_pf_after_wrprot(benchmark, nthreads):
    benchmark.group = "dirty (e): fast page fault after write-protection, 4 GiB per vCPU (ns/fault)"
    vm, slot, vcpus, gfns, writes = dirty_vm(pml=False, manual=False, npages=nthreads * N,
                                             nvcpus=nthreads)
    vm.set_memslot_flags(slot, dirty_log=True)
    arrays = [gfns[t * N:(t + 1) * N] for t in range(nthreads)]
    before = {}

    def setup():
        vm.get_dirty_log(slot)                  # harvest: re-protects every dirty page
        before.update(vm.stats)

    calls = [lambda v=v, a=a: v.access_batch(a, writes[:N]) for v, a in zip(vcpus, arrays)]
    benchmark.pedantic(lambda: run_parallel(calls), setup=setup, rounds=7, warmup_rounds=1)
    st = vm.stats
    assert st["faults_fast"] - before["faults_fast"] == nthreads * N
    assert popcount(vm.get_dirty_log(slot)) == nthreads * N
    vm.audit()
    per_item(benchmark, nthreads * N)
