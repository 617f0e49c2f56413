"""The bench-only hooks of spte_fast._bench: right answers, and arguments checked as the
public API checks them (nothing a Python caller passes may crash the interpreter: an empty
array once made the strided loops divide by zero)."""
import numpy as np
import pytest

from spte_fast import SHADOW_NONPRESENT_VALUE as NP63
from spte_fast import _bench


def test_fill_and_scan_hooks_compute_what_the_kernels_do():
    pages = np.zeros((3, 512), dtype=np.uint64)
    _bench.fill_repeat(pages, NP63, 2)
    assert (pages == NP63).all()
    pages[1, 7] = pages[2, 0] = 5
    assert _bench.scan_repeat(pages, NP63, 3) == 3 * 2
    _bench.store_loop_repeat(pages[0], 9, 1)
    assert (pages[0] == 9).all()
    _bench.memset_repeat(pages[2], 1)
    assert (pages[2] == 0).all()


def test_rmw_loops_flip_the_low_bit_and_agree():
    a, b = np.zeros(512, dtype=np.uint64), np.zeros(512, dtype=np.uint64)
    assert _bench.cmpxchg_loop(a, 1000) == _bench.plain_rmw_loop(b, 1000)
    assert (a == b).all() and a.any()


def test_bare_tdp_installs_each_gfn_once_and_walks_to_it():
    bare = _bench.BareTdp(64)
    gfns = np.array([0, 1, 513, 1 << 30], dtype=np.uint64)
    assert bare.insert(gfns) == 4
    assert bare.insert(gfns[:2]) == 0
    leaves = [NP63 | 0x800 | ((g + 0x100000) << 12) | 0x377 for g in gfns.tolist()]
    assert bare.walk(gfns) == sum(leaves) % (1 << 64)
    bare.reset()
    assert bare.insert(gfns[:1]) == 1


@pytest.mark.parametrize("call, error", [
    (lambda: _bench.cmpxchg_loop(np.zeros(0, np.uint64), 1), ValueError),
    (lambda: _bench.plain_rmw_loop(np.zeros(0, np.uint64), 1), ValueError),
    (lambda: _bench.cmpxchg_loop(np.zeros(4, np.uint64), -1), ValueError),
    (lambda: _bench.cmpxchg_loop([0, 1], 1), TypeError),
    (lambda: _bench.fill_repeat(np.zeros(511, np.uint64), 0, 1), ValueError),
    (lambda: _bench.fill_repeat(np.zeros(512, np.uint64), 0, 1.5), TypeError),
    (lambda: _bench.scan_repeat(np.zeros((2, 512), np.int64), 0, 1), TypeError),
    (lambda: _bench.BareTdp(0), ValueError),
    (lambda: _bench.BareTdp(8, nonpresent=1 << 11), ValueError),
    (lambda: _bench.BareTdp(8).insert(np.array([1 << 36], np.uint64)), ValueError),
    (lambda: _bench.BareTdp(8).insert(np.array([-1], np.int64)), ValueError),
    (lambda: _bench.BareTdp(2).insert(np.arange(1 << 20, dtype=np.uint64)), MemoryError),
])
def test_bad_arguments_are_refused(call, error):
    with pytest.raises(error):
        call()
