"""The simulator's pipeline pieces: the working-set pass (spte_fast.sim._distinct) and the
chunk producer thread (engine._Prefetch).  Expectations come from numpy and from the
iterables themselves, never from the code under test."""
import threading
import time

import numpy as np
import pytest

from spte_fast.sim import engine
from spte_fast.sim._distinct import count_new, first_seen


def first_occurrences(values):
    """The distinct values in the order they first occur (numpy's unique + first index)."""
    _, idx = np.unique(values, return_index=True)
    return values[np.sort(idx)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_seen_lists_new_values_in_first_seen_order(seed):
    rng = np.random.default_rng(seed)
    seen = np.zeros(5000, dtype=np.uint8)
    out = np.empty(5000, dtype=np.uint64)
    total = []
    for _ in range(6):
        chunk = rng.integers(0, 5000, 3000, dtype=np.uint64)
        n = first_seen(seen, chunk, out)
        new = out[:n].copy()
        expect = first_occurrences(chunk)
        expect = expect[~np.isin(expect, np.array(total, dtype=np.uint64))]
        assert new.tolist() == expect.tolist()
        total += new.tolist()
    assert sorted(total) == np.flatnonzero(seen).tolist()


def test_first_seen_takes_strided_and_read_only_values():
    seen = np.zeros(64, dtype=np.uint8)
    out = np.empty(64, dtype=np.uint64)
    values = np.array([5, 9, 5, 7, 9, 1], dtype=np.uint64)[::-1]
    values.flags.writeable = False
    assert first_seen(seen, values, out) == 4
    assert out[:4].tolist() == [1, 9, 7, 5]


def test_first_seen_refuses_values_beyond_the_table_and_a_full_out():
    seen = np.zeros(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="beyond"):
        first_seen(seen, np.array([1, 8], dtype=np.uint64), np.empty(4, dtype=np.uint64))
    seen[:] = 0
    with pytest.raises(ValueError):
        first_seen(seen, np.array([1, 2, 3], dtype=np.uint64), np.empty(2, dtype=np.uint64))
    # A full out is no error while only known values follow.
    seen[:] = 0
    assert first_seen(seen, np.array([1, 2, 1, 2], dtype=np.uint64),
                      np.empty(2, dtype=np.uint64)) == 2


def test_distinct_counts_what_numpy_counts_dense_and_sparse():
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 1 << 16, 4000, dtype=np.uint64) for _ in range(5)]
    dense, sparse = engine.Distinct(1 << 16), engine.Distinct(1 << 31)
    assert dense._seen is not None and sparse._seen is None
    for c in chunks:
        dense.add(c)
        sparse.add(c)
    everything = np.concatenate(chunks)
    assert dense.count == sparse.count == np.unique(everything).size
    assert dense.values().tolist() == first_occurrences(everything).tolist()
    assert sparse.values().tolist() == np.unique(everything).tolist()


@pytest.mark.parametrize("limit", [1, 63, 64, 65, 5000])
def test_count_new_counts_what_numpy_counts_and_sets_those_bits(limit):
    rng = np.random.default_rng(limit)
    bits = np.zeros(-(-limit // 64), dtype=np.uint64)
    total = np.empty(0, dtype=np.uint64)
    for _ in range(5):
        chunk = rng.integers(0, limit, 700, dtype=np.uint64)[::-1]    # strided too
        new = np.setdiff1d(np.unique(chunk), total)
        assert count_new(bits, chunk, limit) == new.size
        total = np.union1d(total, chunk)
        flags = np.unpackbits(bits.view(np.uint8), bitorder="little")
        assert np.flatnonzero(flags).tolist() == total.tolist()


def test_count_new_refuses_values_beyond_the_limit_and_a_short_bitmap():
    bits = np.zeros(2, dtype=np.uint64)
    with pytest.raises(ValueError, match="beyond"):
        count_new(bits, np.array([3, 100, 5], dtype=np.uint64), 100)
    assert bits.tolist() == [8, 0]          # the value before the bad one is marked
    with pytest.raises(ValueError, match="holds no"):
        count_new(bits, np.array([1], dtype=np.uint64), 129)


def test_distinct_unordered_counts_and_lists_the_set_sorted():
    rng = np.random.default_rng(4)
    chunks = [rng.integers(0, 3000, 1000, dtype=np.uint64) for _ in range(4)]
    d = engine.Distinct(3000, ordered=False)
    counts = []
    for c in chunks:
        d.add(c)
        counts.append(d.count)
    assert counts == [np.unique(np.concatenate(chunks[:k + 1])).size for k in range(4)]
    assert d.values().tolist() == np.unique(np.concatenate(chunks)).tolist()
    with pytest.raises(ValueError, match="beyond"):
        d.add(np.array([3000], dtype=np.uint64))


def test_prefetch_yields_every_item_in_order_and_raises_the_producers_error():
    with engine._Prefetch(iter(range(100)), depth=2) as p:
        assert list(p) == list(range(100))

    def broken():
        yield 1
        yield 2
        raise OSError("read error")
    with engine._Prefetch(broken()) as p:
        it = iter(p)
        assert [next(it), next(it)] == [1, 2]
        with pytest.raises(OSError, match="read error"):
            next(it)


def test_prefetch_close_does_not_hang_on_a_stalled_source():
    release = threading.Event()

    def stalled():
        yield 1
        release.wait(30)                    # a pipe with no writer
        yield 2
    p = engine._Prefetch(stalled())
    assert next(iter(p)) == 1
    t = time.monotonic()
    p.close(timeout=0.3)
    assert time.monotonic() - t < 5
    release.set()


def test_prefetch_stops_a_producer_that_is_ahead():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1
    with engine._Prefetch(endless(), depth=2) as p:
        it = iter(p)
        assert next(it) == 0
    n = len(produced)
    time.sleep(0.1)
    assert len(produced) == n and n <= 5    # stopped, and never ran far ahead
