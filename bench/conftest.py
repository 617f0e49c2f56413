"""Fixtures for the pytest-benchmark suite (run: pytest bench --benchmark-only).

Figures are ratios taken side by side in one run (these machines are small and
noisy): `python bench/ratios.py RESULT.json` prints them from
`--benchmark-json=RESULT.json`.
"""
import os
import threading

# numpy's OpenBLAS starts a thread pool whose servers spin after any BLAS call; on a 2-core
# machine they steal a core from the vCPU threads (perf showed blas_thread_server at ~12 %).
# The benchmarks need no BLAS threads; set before numpy loads, an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import spte_fast as sf  # noqa: E402

GIB_PAGES = 1 << 18          # 4 KiB pages per GiB


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def seq_4g():
    """Sequential gfns covering 4 GiB of guest memory."""
    return np.arange(4 * GIB_PAGES, dtype=np.uint64)


@pytest.fixture(scope="session")
def random_64g(rng):
    """4 Mi distinct gfns drawn uniformly from 64 GiB, in random order."""
    return rng.permutation(64 * GIB_PAGES)[: 4 << 20].astype(np.uint64)


def make_vm(impl=sf, *, npages, max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 16,
            layout=None, root_level=4):
    layout = layout or impl.SpteLayout.ept()
    vm = impl.Vm(layout, root_level=root_level, max_level=max_level,
                 max_pt_pages=max_pt_pages)
    vm.add_memslot(0, npages, pfn=0x100000)
    return vm, vm.vcpu()


def replay_in_chunks(batch, gfns, access, chunk, res):
    """Run ``batch`` (a Vcpu's fault_batch or access_batch) over the arrays in chunks of
    ``chunk``; ``res`` (cleared first) receives the summed counts."""
    res.clear()
    for i in range(0, gfns.size, chunk):
        for k, v in batch(gfns[i:i + chunk], access[i:i + chunk]).items():
            res[k] = res.get(k, 0) + v


def per_item(benchmark, n, unit="faults"):
    """Record items/s of the median round in the saved JSON (extra_info)."""
    med = benchmark.stats.stats.median
    benchmark.extra_info[f"{unit}_per_s"] = n / med
    benchmark.extra_info["ns_per_item"] = med / n * 1e9


def run_parallel(calls):
    """Run each callable on its own thread (the batches release the GIL) and join them."""
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
