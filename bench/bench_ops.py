"""The engine: faults, zaps, and the baselines they are measured against.

Workloads: (a) sequential first-touch 4K faults over 4 GiB; (b) 4 Mi uniformly
random first-touch faults over 64 GiB; (c) spurious re-faults of mapped pages;
(d) 2M huge-page first-touch over 64 GiB; zap_gfn_range and zap_all of a
populated VM.  Baselines in the same run: the bare-C insert and walk loops
(`spte_fast._bench.BareTdp`: no bookkeeping) over the same gfns, and the reference model
on a smaller size (per-fault ratio).  First-touch rounds start from a VM whose
tables were all zapped (pedantic setup), so pool memory is already faulted in.
"""
import numpy as np
import pytest

import spte_fast as sf
import spte_fast.reference as ref
from spte_fast import _bench

from conftest import GIB_PAGES, make_vm, per_item


def _first_touch(benchmark, vm, vcpu, gfns, rounds=5):
    def setup():
        vm.zap_all()
    res = {}

    def run():
        res.update(vcpu.fault_batch(gfns))
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)
    return res


def test_a_seq_first_touch_4g(benchmark, seq_4g):
    benchmark.group = "fault (a): sequential first-touch 4K over 4 GiB (ns/fault)"
    vm, vcpu = make_vm(npages=4 * GIB_PAGES)
    res = _first_touch(benchmark, vm, vcpu, seq_4g)
    assert res["fixed"] == seq_4g.size
    vm.audit()
    per_item(benchmark, seq_4g.size)


def _bare_insert(benchmark, gfns, capacity, rounds):
    """The bare-C baseline: the same gfns into the minimal radix tree, reset per round."""
    bare = _bench.BareTdp(capacity)
    out = {}

    def run():
        out["n"] = bare.insert(gfns)
    benchmark.pedantic(run, setup=bare.reset, rounds=rounds, warmup_rounds=1)
    assert out["n"] == gfns.size
    per_item(benchmark, gfns.size)


def test_a_bare_c_insert_4g(benchmark, seq_4g):
    benchmark.group = "fault (a): sequential first-touch 4K over 4 GiB (ns/fault)"
    _bare_insert(benchmark, seq_4g, 1 << 14, rounds=5)


def test_b_random_first_touch_64g(benchmark, random_64g):
    benchmark.group = "fault (b): random first-touch 4K over 64 GiB (ns/fault)"
    vm, vcpu = make_vm(npages=64 * GIB_PAGES, max_pt_pages=(1 << 15) + 256)
    res = _first_touch(benchmark, vm, vcpu, random_64g, rounds=3)
    assert res["fixed"] == random_64g.size
    per_item(benchmark, random_64g.size)


def test_b_bare_c_insert_64g(benchmark, random_64g):
    benchmark.group = "fault (b): random first-touch 4K over 64 GiB (ns/fault)"
    _bare_insert(benchmark, random_64g, (1 << 15) + 256, rounds=3)


def test_c_spurious_4g(benchmark, seq_4g):
    benchmark.group = "fault (c): spurious re-faults of 4 GiB (ns/fault)"
    vm, vcpu = make_vm(npages=4 * GIB_PAGES)
    vcpu.fault_batch(seq_4g)
    res = benchmark(vcpu.fault_batch, seq_4g)
    assert res["spurious"] == seq_4g.size
    per_item(benchmark, seq_4g.size)


def test_c_bare_c_walk_4g(benchmark, seq_4g):
    benchmark.group = "fault (c): spurious re-faults of 4 GiB (ns/fault)"
    bare = _bench.BareTdp(1 << 14)
    bare.insert(seq_4g)
    benchmark(bare.walk, seq_4g)
    per_item(benchmark, seq_4g.size)


def test_d_huge_2m_first_touch_64g(benchmark):
    benchmark.group = "fault (d): 2M huge-page first-touch over 64 GiB (ns/fault)"
    gfns = np.arange(0, 64 * GIB_PAGES, 512, dtype=np.uint64)
    vm, vcpu = make_vm(npages=64 * GIB_PAGES, max_level=sf.PG_LEVEL_2M)
    res = _first_touch(benchmark, vm, vcpu, gfns, rounds=20)
    assert res["fixed"] == gfns.size and vm.stats["pages_2m"] == gfns.size
    per_item(benchmark, gfns.size)


@pytest.mark.parametrize("op", ["zap_gfn_range", "zap_all"])
def test_zap_populated_1g(benchmark, op):
    benchmark.group = "zap: a populated 1 GiB of 4K leaves (ns/leaf)"
    gfns = np.arange(GIB_PAGES, dtype=np.uint64)
    vm, vcpu = make_vm(npages=GIB_PAGES)
    fn = (lambda: vm.zap_gfn_range(0, GIB_PAGES)) if op == "zap_gfn_range" else vm.zap_all
    benchmark.pedantic(fn, setup=lambda: vcpu.fault_batch(gfns) and None, rounds=5)
    assert vm.stats["pages_4k"] == 0
    per_item(benchmark, gfns.size, "leaves")


SMALL = 1 << 12      # the reference model is measured on 4096 faults


@pytest.mark.parametrize("impl", [pytest.param(sf, id="fast"), pytest.param(ref, id="reference")])
def test_vs_reference_first_touch(benchmark, impl):
    benchmark.group = "engine vs reference: first-touch 4K, 4096 faults (ns/fault)"
    gfns = np.arange(SMALL, dtype=np.uint64)
    vm, vcpu = make_vm(impl, npages=SMALL, max_pt_pages=256)
    res = {}

    def run():
        res.update(vcpu.fault_batch(gfns))
    benchmark.pedantic(run, setup=lambda: vm.zap_all() and None, rounds=5 if impl is ref else 50)
    assert res["fixed"] == SMALL
    per_item(benchmark, SMALL)


@pytest.mark.parametrize("impl", [pytest.param(sf, id="fast"), pytest.param(ref, id="reference")])
def test_vs_reference_spurious(benchmark, impl):
    benchmark.group = "engine vs reference: spurious, 4096 faults (ns/fault)"
    gfns = np.arange(SMALL, dtype=np.uint64)
    vm, vcpu = make_vm(impl, npages=SMALL, max_pt_pages=256)
    vcpu.fault_batch(gfns)
    res = benchmark.pedantic(vcpu.fault_batch, args=(gfns,), rounds=5 if impl is ref else 50)
    assert res["spurious"] == SMALL
    per_item(benchmark, SMALL)
