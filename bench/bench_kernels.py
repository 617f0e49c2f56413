"""Kernels: page fill, cache top-up, cmpxchg and scan.

Ratios to read (python bench/ratios.py): Cython fill vs numpy bulk/per-page
fill and a pure-Python loop per size; the engine's fill of one cache-hot page
vs the C baselines (libc memset, a plain store loop) looped in C; top-up on
the zero path (fresh and recycled pages) vs the fill path; cmpxchg vs a plain
read-modify-write, per element.
"""
import numpy as np
import pytest

import spte_fast as sf
from spte_fast import _bench

from conftest import per_item

V = sf.SHADOW_NONPRESENT_VALUE
SIZES = [1, 64, 16384, 65536]          # 16384 pages = 64 MiB


def _pages(n):
    a = np.zeros((n, 512), dtype=np.uint64)
    a.fill(1)                          # fault the memory in outside the timed region
    return a


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("how", ["cython", "c_loop_no_call", "numpy_bulk", "numpy_per_page",
                                 "python_loop"])
def test_fill(benchmark, how, n):
    """``c_loop_no_call`` is the ceiling: the same kernel over the same pages,
    repeated inside C, so no Python call is paid.  The per-page numpy loop's
    time over it bounds what any fill callable from Python can beat it by."""
    benchmark.group = f"kernel: fill {n} pages with 1<<63 (ns/page)"
    pages = _pages(n)
    reps = 1
    if how == "cython":
        benchmark(sf.fill_pages, pages, V)
    elif how == "c_loop_no_call":
        reps = max(1, 1024 // n)
        benchmark(_bench.fill_repeat, pages, V, reps)
    elif how == "numpy_bulk":
        benchmark(pages.fill, V)
    elif how == "numpy_per_page":
        def loop():
            for i in range(n):
                pages[i].fill(V)
        benchmark(loop)
    else:
        if n > 64:
            pytest.skip("pure-Python loop: measured up to 64 pages")
        flat = pages.reshape(-1)

        def loop():
            for i in range(flat.shape[0]):
                flat[i] = V
        benchmark(loop)
    assert int(pages[n - 1, 511]) == V
    per_item(benchmark, n * reps, "pages")


REPS = 100_000


@pytest.mark.parametrize("how", ["engine_fill_1_63", "engine_fill_0", "c_memset", "c_store_loop"])
def test_fill_hot_page_c_loop(benchmark, how):
    """One cache-hot page filled REPS times inside C: kernel cost without call overhead."""
    benchmark.group = "kernel: fill one cache-hot page, looped in C (ns/page)"
    page = _pages(1)[0]
    if how == "engine_fill_1_63":
        benchmark(_bench.fill_repeat, page, V, REPS)
    elif how == "engine_fill_0":
        benchmark(_bench.fill_repeat, page, 0, REPS)
    elif how == "c_memset":
        benchmark(_bench.memset_repeat, page, REPS)
    else:
        benchmark(_bench.store_loop_repeat, page, V, REPS)
    per_item(benchmark, REPS, "pages")


@pytest.mark.parametrize("path", ["zero_fresh", "zero_recycled", "fill_fresh", "fill_recycled"])
def test_topup_40(benchmark, path):
    """A 40-page top-up on the GFP_ZERO path vs the 6.10 fill path."""
    benchmark.group = "mmu_cache: top up 40 pages (ns/page)"
    init = 0 if path.startswith("zero") else V
    state = {}

    def setup():
        pool = sf.PagePool(64)
        if path.endswith("recycled"):
            # pages that were used before: the zero path must write them too
            idx = [pool.alloc() for _ in range(40)]
            for i in reversed(idx):
                pool.free(i)
        state["cache"] = sf.MemoryCache(pool, init_value=init)

    benchmark.pedantic(lambda: state["cache"].topup(40), setup=setup, rounds=300)
    st = state["cache"].stats
    assert state["cache"].nobjs == 40
    benchmark.extra_info["init_bytes_written"] = st["init_bytes_written"]
    per_item(benchmark, 40, "pages")


N_ATOMIC = 1 << 22


@pytest.mark.parametrize("size", [512, 1 << 25])
@pytest.mark.parametrize("op", ["cmpxchg", "plain_rmw"])
def test_atomic_per_element(benchmark, op, size):
    """lock cmpxchg vs a plain read-modify-write, strided over one page or 256 MiB."""
    benchmark.group = f"atomic: update one SPTE in a {size * 8 >> 10} KiB array (ns/op)"
    arr = np.zeros(size, dtype=np.uint64)
    arr.fill(1)
    fn = _bench.cmpxchg_loop if op == "cmpxchg" else _bench.plain_rmw_loop
    benchmark(fn, arr, N_ATOMIC)
    per_item(benchmark, N_ATOMIC, "ops")


@pytest.mark.parametrize("how", ["cython_c_loop", "numpy"])
def test_scan_per_element(benchmark, how):
    """sync_page-style scan: entries differing from the non-present value."""
    benchmark.group = "kernel: sync_page scan of 4096 pages (ns/entry)"
    rng = np.random.default_rng(1)
    pages = np.full((4096, 512), V, dtype=np.uint64)
    pages[rng.random(pages.shape) < 0.1] = 0x8600_0000_0000_0b77
    if how == "cython_c_loop":
        total = benchmark(_bench.scan_repeat, pages, V, 1)
    else:
        total = benchmark(lambda: int(np.count_nonzero(pages != V)))
    assert total == int(np.count_nonzero(pages != V))
    per_item(benchmark, pages.size, "entries")
