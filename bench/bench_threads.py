"""Parallel vCPUs: fault_batch from 1 and 2 Python threads, GIL released.

Disjoint ranges: each thread first-touches its own 4 GiB (sequential) — the ratio
of the 2-thread to the 1-thread rate is the scaling figure.  Shared range: both
threads first-touch the same 4 GiB in the same order; the rate and the CAS
failures (lost races, each re-faulted) are recorded.  Pool memory is faulted in
beforehand (rounds start after zap_all), so the kernel's page zeroing is not timed.
"""
import numpy as np
import pytest

import spte_fast as sf

from conftest import GIB_PAGES, per_item, run_parallel

N = 4 * GIB_PAGES            # faults per thread


@pytest.mark.parametrize("nthreads", [1, 2])
def test_disjoint_ranges(benchmark, nthreads):
    benchmark.group = "threads: sequential first-touch, disjoint 4 GiB per thread (ns/fault)"
    vm = sf.Vm(sf.SpteLayout.ept(), max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 14)
    vm.add_memslot(0, 2 * N, pfn=0x100000)
    vcpus = [vm.vcpu() for _ in range(nthreads)]
    arrays = [np.arange(t * N, (t + 1) * N, dtype=np.uint64) for t in range(nthreads)]
    calls = [lambda v=v, a=a: v.fault_batch(a) for v, a in zip(vcpus, arrays)]
    benchmark.pedantic(lambda: run_parallel(calls), setup=lambda: vm.zap_all() and None, rounds=7,
                       warmup_rounds=1)
    assert vm.stats["pages_4k"] == nthreads * N
    vm.audit()
    per_item(benchmark, nthreads * N)


def test_shared_range_two_threads(benchmark):
    benchmark.group = "threads: sequential first-touch, both threads on one 4 GiB (ns/fault)"
    vm = sf.Vm(sf.SpteLayout.ept(), max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 14)
    vm.add_memslot(0, N, pfn=0x100000)
    vcpus = [vm.vcpu(), vm.vcpu()]
    gfns = np.arange(N, dtype=np.uint64)
    calls = [lambda v=v: v.fault_batch(gfns) for v in vcpus]
    benchmark.pedantic(lambda: run_parallel(calls), setup=lambda: vm.zap_all() and None, rounds=7,
                       warmup_rounds=1)
    st = vm.stats
    assert st["pages_4k"] == N
    vm.audit()
    benchmark.extra_info["cas_failures_total"] = st["cas_failures"]
    benchmark.extra_info["faults_retry_total"] = st["faults_retry"]
    per_item(benchmark, 2 * N)
