"""Kernels: memset64 page fill, sync_page scans, 64-bit atomics, on both implementations
(docs/API.md "Kernels"; KVM_MMU_SPEC.md §1.3 alloc_obj's memset64 fill, §1.2 "where it is
tested" (``kvm_sync_spte`` skips never-used entries), §3.3 write primitives, §3.4 and §6
item 18 compare-and-exchange).

Bad arguments raise TypeError/ValueError before any kernel runs, and the array
is unchanged afterwards (docs/API.md preamble: also for an object with ``__index__``,
whose code could otherwise run in the middle of an atomic).
"""
import sys
import threading

import numpy as np
import pytest

from support.child import run_child
from support.spec import NP63, U64

VALUES = [0, NP63, U64, 0x0123_4567_89AB_CDEF]


def rng_pages(seed, n, nonpresent=NP63):
    """n pages of non-present entries with a random sprinkling of other values."""
    rng = np.random.default_rng(seed)
    pages = np.full((n, 512), nonpresent, dtype=np.uint64)
    mask = rng.random((n, 512)) < rng.random((n, 1))  # per-page density
    pages[mask] = rng.integers(0, 1 << 63, size=int(mask.sum()), dtype=np.uint64)
    return pages


# ==========================================================================
# fill_pages
# ==========================================================================


@pytest.mark.parametrize("n", [0, 1, 3, 64])
@pytest.mark.parametrize("value", VALUES, ids=hex)
def test_fill_pages_2d_equals_np_full(impl, n, value):
    pages = np.full((n, 512), 0x5555_5555_5555_5555, dtype=np.uint64)
    assert impl.fill_pages(pages, value) is None
    assert np.array_equal(pages, np.full((n, 512), value, dtype=np.uint64))


@pytest.mark.parametrize("value", VALUES, ids=hex)
def test_fill_pages_1d_page(impl, value):
    page = np.arange(512, dtype=np.uint64)
    impl.fill_pages(page, value)
    assert np.array_equal(page, np.full(512, value, dtype=np.uint64))


def test_fill_pages_random_values(impl, seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        value = int(rng.integers(0, U64, dtype=np.uint64, endpoint=True))
        pages = rng.integers(0, U64, size=(3, 512), dtype=np.uint64, endpoint=True)
        impl.fill_pages(pages, value)
        assert (pages == np.uint64(value)).all()


def test_fill_pages_accepts_numpy_scalar_value(impl):
    pages = np.zeros((2, 512), dtype=np.uint64)
    impl.fill_pages(pages, np.uint64(NP63))
    assert (pages == np.uint64(NP63)).all()


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("offset", range(9))
def test_fill_pages_at_any_8_byte_alignment(impl, n, offset):
    """numpy blocks are 16-byte aligned at best, views can start anywhere: the fill
    stores single words up to a cache-line boundary, then wide stores — every
    entry of the view is written, and not one word beyond it."""
    raw = np.arange(16 + n * 512 + 16, dtype=np.uint64)
    start = (-raw.ctypes.data // 8) % 8 + offset       # 64-byte boundary + offset words
    before = raw.copy()
    view = raw[start:start + n * 512].reshape(n, 512)
    impl.fill_pages(view, NP63 | 0x1234)
    assert (view == np.uint64(NP63 | 0x1234)).all()
    assert np.array_equal(raw[:start], before[:start])
    assert np.array_equal(raw[start + n * 512:], before[start + n * 512:])


def test_fill_pages_leaves_neighbouring_memory_untouched(impl):
    big = np.arange(8 * 512, dtype=np.uint64).reshape(8, 512)
    before = big.copy()
    view = big[2:5]
    assert view.flags.c_contiguous and view.base is not None
    impl.fill_pages(view, NP63)
    assert (big[2:5] == np.uint64(NP63)).all()
    assert np.array_equal(big[:2], before[:2])
    assert np.array_equal(big[5:], before[5:])
    # one page in the middle, through a 1-D view
    impl.fill_pages(big[6], 7)
    assert (big[6] == 7).all() and np.array_equal(big[7], before[7])
    assert np.array_equal(big[5], before[5])


def _bad_fill_targets():
    ro = np.zeros((2, 512), dtype=np.uint64)
    ro.flags.writeable = False
    return [
        ("list", lambda: [0] * 512, TypeError),
        ("tuple", lambda: tuple([0] * 512), TypeError),
        ("float64", lambda: np.zeros((2, 512), dtype=np.float64), TypeError),
        ("int32", lambda: np.zeros((2, 512), dtype=np.int32), TypeError),
        ("int64", lambda: np.zeros((2, 512), dtype=np.int64), TypeError),
        ("shape-3x511", lambda: np.zeros((3, 511), dtype=np.uint64), ValueError),
        ("shape-2x2x512", lambda: np.zeros((2, 2, 512), dtype=np.uint64), ValueError),
        ("shape-511", lambda: np.zeros((511,), dtype=np.uint64), ValueError),
        ("shape-1024", lambda: np.zeros((1024,), dtype=np.uint64), ValueError),
        ("shape-scalar", lambda: np.zeros((), dtype=np.uint64), ValueError),
        ("strided-cols", lambda: np.zeros((3, 1024), dtype=np.uint64)[:, ::2], ValueError),
        ("strided-rows", lambda: np.zeros((6, 512), dtype=np.uint64)[::2], ValueError),
        ("strided-1d", lambda: np.zeros((1024,), dtype=np.uint64)[::2], ValueError),
        ("fortran", lambda: np.asfortranarray(np.zeros((3, 512), dtype=np.uint64)), ValueError),
        ("read-only", lambda: ro, ValueError),
    ]


@pytest.mark.parametrize("name, make, exc", _bad_fill_targets(), ids=lambda v: v if isinstance(v, str) else None)
def test_fill_pages_rejects_bad_arrays_without_writing(impl, name, make, exc):
    target = make()
    before = np.array(target, copy=True)
    with pytest.raises(exc):
        impl.fill_pages(target, NP63)
    assert np.array_equal(np.asarray(target), before)


@pytest.mark.parametrize("value, exc", [(-1, ValueError), (1 << 64, ValueError), (1.0, TypeError),
                                        ("0", TypeError), (None, TypeError)])
def test_fill_pages_rejects_bad_value_without_writing(impl, value, exc):
    pages = np.arange(1024, dtype=np.uint64).reshape(2, 512)
    with pytest.raises(exc):
        impl.fill_pages(pages, value)
    assert np.array_equal(pages, np.arange(1024, dtype=np.uint64).reshape(2, 512))


# ==========================================================================
# scan_present / count_present
# ==========================================================================


@pytest.mark.parametrize("nonpresent", [NP63, 0], ids=hex)
def test_scan_present_matches_numpy(impl, seed, nonpresent):
    pages = rng_pages(seed, 16, nonpresent)
    for page in pages:
        got = impl.scan_present(page, nonpresent)
        assert isinstance(got, np.ndarray) and got.dtype == np.intp and got.ndim == 1
        assert np.array_equal(got, np.flatnonzero(page != np.uint64(nonpresent)))


def test_scan_present_edge_pages(impl):
    empty = np.full(512, NP63, dtype=np.uint64)
    assert impl.scan_present(empty, NP63).size == 0
    assert np.array_equal(impl.scan_present(empty, 0), np.arange(512))
    ends = empty.copy()
    ends[[0, 511]] = 0  # a zero entry is "present" when the non-present value is bit 63
    assert impl.scan_present(ends, NP63).tolist() == [0, 511]
    frozen = empty.copy()
    frozen[100] = NP63 | 0x5A0
    assert impl.scan_present(frozen, NP63).tolist() == [100]


def test_scan_present_accepts_read_only_page(impl):
    page = np.full(512, NP63, dtype=np.uint64)
    page[[3, 7]] = 1
    page.flags.writeable = False
    assert impl.scan_present(page, NP63).tolist() == [3, 7]
    pages = np.full((2, 512), NP63, dtype=np.uint64)
    pages[1, 9] = 0
    pages.flags.writeable = False
    assert impl.count_present(pages, NP63).tolist() == [0, 1]


def test_scan_present_of_a_pool_page(impl):
    """The pool's read-only view is the typical argument."""
    pool = impl.PagePool(2)
    assert impl.scan_present(pool.pages[1], NP63).size == 512
    assert impl.scan_present(pool.pages[1], 0).size == 0


@pytest.mark.parametrize("n", [0, 1, 3, 64])
def test_count_present_per_page(impl, seed, n):
    pages = rng_pages(seed, n)
    got = impl.count_present(pages, NP63)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.shape == (n,)
    assert np.array_equal(got, (pages != np.uint64(NP63)).sum(axis=1))


def test_count_present_single_page_gives_shape_1(impl):
    page = np.full(512, NP63, dtype=np.uint64)
    page[:10] = 0
    got = impl.count_present(page, NP63)
    assert got.shape == (1,) and got.dtype == np.int64 and got.tolist() == [10]


@pytest.mark.parametrize(
    "fn, make, exc",
    [
        ("scan_present", lambda: [0] * 512, TypeError),
        ("scan_present", lambda: np.zeros(512, dtype=np.int64), TypeError),
        ("scan_present", lambda: np.zeros(511, dtype=np.uint64), ValueError),
        ("scan_present", lambda: np.zeros((2, 512), dtype=np.uint64), ValueError),
        ("scan_present", lambda: np.zeros(1024, dtype=np.uint64)[::2], ValueError),
        ("count_present", lambda: [[0] * 512], TypeError),
        ("count_present", lambda: np.zeros((2, 512), dtype=np.float64), TypeError),
        ("count_present", lambda: np.zeros((2, 511), dtype=np.uint64), ValueError),
        ("count_present", lambda: np.zeros((2, 2, 512), dtype=np.uint64), ValueError),
        ("count_present", lambda: np.zeros((3, 1024), dtype=np.uint64)[:, ::2], ValueError),
    ],
)
def test_scan_and_count_reject_bad_arrays(impl, fn, make, exc):
    with pytest.raises(exc):
        getattr(impl, fn)(make(), NP63)


@pytest.mark.parametrize("fn", ["scan_present", "count_present"])
@pytest.mark.parametrize("value, exc", [(-1, ValueError), (1 << 64, ValueError), (1.0, TypeError)])
def test_scan_and_count_reject_bad_nonpresent_value(impl, fn, value, exc):
    with pytest.raises(exc):
        getattr(impl, fn)(np.zeros(512, dtype=np.uint64), value)


# ==========================================================================
# Atomics (spec §3.3-3.4, §6 item 18)
# ==========================================================================


def test_cmpxchg_success_stores_new(impl):
    a = np.array([1, NP63, 3], dtype=np.uint64)
    ok, observed = impl.cmpxchg(a, 1, NP63, 0x8600_0000_1234_5B77)
    assert ok is True and observed == NP63
    assert a.tolist() == [1, 0x8600_0000_1234_5B77, 3]


def test_inv18_cmpxchg_failure_leaves_memory_and_reports_current_value(impl):
    a = np.array([1, NP63 | 0x5A0, 3], dtype=np.uint64)
    ok, observed = impl.cmpxchg(a, 1, NP63, 0xDEAD)
    assert ok is False and observed == NP63 | 0x5A0
    assert a.tolist() == [1, NP63 | 0x5A0, 3]
    # retrying with the observed value succeeds (try_cmpxchg64 refresh)
    assert impl.cmpxchg(a, 1, observed, 0xDEAD) == (True, NP63 | 0x5A0)
    assert a[1] == 0xDEAD


def test_cmpxchg_full_64_bit_values(impl):
    a = np.zeros(4, dtype=np.uint64)
    assert impl.cmpxchg(a, 3, 0, U64) == (True, 0)
    assert impl.cmpxchg(a, 3, U64, NP63) == (True, U64)
    assert impl.cmpxchg(a, 3, U64, 0) == (False, NP63)
    assert a[3] == NP63
    ok, observed = impl.cmpxchg(a, 3, NP63, NP63)  # same value: success, no change
    assert ok and observed == NP63 and a[3] == NP63
    assert isinstance(observed, int) and not isinstance(observed, bool)


def test_cmpxchg_on_2d_array_uses_flat_index(impl):
    pages = np.full((3, 512), NP63, dtype=np.uint64)
    assert impl.cmpxchg(pages, 512 + 7, NP63, 0x1234) == (True, NP63)
    assert pages[1, 7] == 0x1234
    assert int((pages != np.uint64(NP63)).sum()) == 1
    assert impl.cmpxchg(pages, 3 * 512 - 1, NP63, 5) == (True, NP63)
    assert pages[2, 511] == 5


def test_xchg_returns_old_and_stores(impl):
    a = np.array([10, 20], dtype=np.uint64)
    old = impl.xchg(a, 1, U64)
    assert old == 20 and a.tolist() == [10, U64]
    assert impl.xchg(a, 1, NP63) == U64 and a[1] == NP63


def test_atomic_or_returns_old_and_sets_bits(impl):
    a = np.array([0b1010, 0], dtype=np.uint64)
    assert impl.atomic_or(a, 0, 0b0101) == 0b1010
    assert a[0] == 0b1111
    assert impl.atomic_or(a, 1, NP63) == 0 and a[1] == NP63
    assert impl.atomic_or(a, 1, NP63) == NP63 and a[1] == NP63


def test_atomic_and_not_returns_old_and_clears_bits(impl):
    a = np.array([0x8600_0000_0000_0B77], dtype=np.uint64)
    assert impl.atomic_and_not(a, 0, 1 << 8) == 0x8600_0000_0000_0B77  # clear A
    assert a[0] == 0x8600_0000_0000_0A77
    assert impl.atomic_and_not(a, 0, U64) == 0x8600_0000_0000_0A77
    assert a[0] == 0


def test_atomics_on_2d_flat_index(impl):
    pages = np.zeros((2, 512), dtype=np.uint64)
    assert impl.xchg(pages, 513, 9) == 0 and pages[1, 1] == 9
    assert impl.atomic_or(pages, 1023, 6) == 0 and pages[1, 511] == 6
    assert impl.atomic_and_not(pages, 1023, 2) == 6 and pages[1, 511] == 4


ATOMIC_CALLS = {
    "cmpxchg": lambda impl, a, i, v: impl.cmpxchg(a, i, 0, v),
    "xchg": lambda impl, a, i, v: impl.xchg(a, i, v),
    "atomic_or": lambda impl, a, i, v: impl.atomic_or(a, i, v),
    "atomic_and_not": lambda impl, a, i, v: impl.atomic_and_not(a, i, v),
}


@pytest.mark.parametrize("op", sorted(ATOMIC_CALLS))
@pytest.mark.parametrize("index, exc", [(-1, ValueError), (8, ValueError), (1 << 70, ValueError),
                                        (1.0, TypeError)])
def test_atomic_index_out_of_range(impl, op, index, exc):
    a = np.zeros(8, dtype=np.uint64)
    with pytest.raises(exc):
        ATOMIC_CALLS[op](impl, a, index, 1)
    assert not a.any()


@pytest.mark.parametrize("op", sorted(ATOMIC_CALLS))
@pytest.mark.parametrize("value, exc", [(-1, ValueError), (1 << 64, ValueError), (1.5, TypeError)])
def test_atomic_value_out_of_range(impl, op, value, exc):
    a = np.zeros(8, dtype=np.uint64)
    with pytest.raises(exc):
        ATOMIC_CALLS[op](impl, a, 0, value)
    assert not a.any()


def test_cmpxchg_expected_out_of_range(impl):
    a = np.zeros(2, dtype=np.uint64)
    with pytest.raises(ValueError):
        impl.cmpxchg(a, 0, -1, 1)
    with pytest.raises(ValueError):
        impl.cmpxchg(a, 0, 1 << 64, 1)
    assert not a.any()


def _bad_atomic_arrays():
    ro = np.zeros(8, dtype=np.uint64)
    ro.flags.writeable = False
    return [
        ("list", lambda: [0] * 8, TypeError),
        ("int64", lambda: np.zeros(8, dtype=np.int64), TypeError),
        ("float64", lambda: np.zeros(8, dtype=np.float64), TypeError),
        ("read-only", lambda: ro, ValueError),
        ("strided", lambda: np.zeros(16, dtype=np.uint64)[::2], ValueError),
        ("fortran", lambda: np.asfortranarray(np.zeros((4, 2), dtype=np.uint64)), ValueError),
    ]


@pytest.mark.parametrize("op", sorted(ATOMIC_CALLS))
@pytest.mark.parametrize("name, make, exc", _bad_atomic_arrays(), ids=lambda v: v if isinstance(v, str) else None)
def test_atomic_rejects_bad_arrays(impl, op, name, make, exc):
    target = make()
    with pytest.raises(exc):
        ATOMIC_CALLS[op](impl, target, 0, 1)
    assert not np.asarray(target).any()


def test_atomics_accept_numpy_scalars(impl):
    a = np.zeros(4, dtype=np.uint64)
    assert impl.cmpxchg(a, np.int64(2), np.uint64(0), np.uint64(NP63)) == (True, 0)
    assert a[2] == NP63
    assert impl.xchg(a, np.uint16(2), np.uint64(1)) == NP63


def test_cmpxchg_increments_from_two_threads_are_not_lost(impl):
    """Each thread adds 1 with a read / cmpxchg / retry loop.  With a real atomic
    compare-and-exchange no increment is lost, whatever the interleaving."""
    n_per_thread = 20000
    counter = np.zeros((2, 512), dtype=np.uint64)
    target = 512 + 3
    start = threading.Barrier(2)
    failures = []

    def worker():
        start.wait()
        done = 0
        while done < n_per_thread:
            seen = int(counter.flat[target])
            ok, observed = impl.cmpxchg(counter, target, seen, seen + 1)
            if ok:
                done += 1
            else:
                failures.append(observed)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave as much as the GIL allows
    try:
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert counter.flat[target] == 2 * n_per_thread
    assert int((counter != 0).sum()) == 1


# ==========================================================================
# Atomics: ints and numpy integer scalars only (docs/API.md preamble)
# ==========================================================================


ATOMIC_EVIL_CHILD = """
    import importlib, sys
    import numpy as np
    impl = importlib.import_module(sys.argv[1])
    N = 1 << 20                       # 8 MiB: its own mapping, unmapped by the resize

    CASES = [("cmpxchg", "index"), ("cmpxchg", "expected"), ("cmpxchg", "new"),
             ("xchg", "index"), ("xchg", "new"),
             ("atomic_or", "index"), ("atomic_or", "mask"),
             ("atomic_and_not", "index"), ("atomic_and_not", "mask")]
    for name, where in CASES:
        a = np.zeros(N, dtype=np.uint64)

        class Evil:
            def __index__(self):
                a.resize(1, refcheck=False)   # frees the buffer under the atomic
                return 1

        args = {"cmpxchg": [N - 1, 0, 1], "xchg": [N - 1, 1],
                "atomic_or": [N - 1, 1], "atomic_and_not": [N - 1, 1]}[name]
        pos = {"index": 0, "expected": 1, "new": -1, "mask": -1}[where]
        args[pos] = Evil()
        print(name, where, "...", end=" ", flush=True)
        try:
            getattr(impl, name)(a, *args)
            outcome = "no error"
        except Exception as e:
            outcome = type(e).__name__
        unchanged = a.size == N and not a.any()
        print(outcome, "unchanged" if unchanged else "CHANGED", flush=True)
"""


def test_atomics_refuse_index_objects_without_crashing(impl):
    """An argument with ``__index__`` (here one that resizes the array) is a TypeError for
    every position of every atomic; no Python code runs, so the array is untouched and the
    process survives (run in a child: a use-after-free must not kill pytest)."""
    proc = run_child(ATOMIC_EVIL_CHILD, impl)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"child died ({proc.returncode}): {lines[-1:]} {proc.stderr}"
    assert len(lines) == 9
    for line in lines:
        assert line.endswith("TypeError unchanged"), line


@pytest.mark.parametrize("name", ["cmpxchg", "xchg", "atomic_or", "atomic_and_not"])
@pytest.mark.parametrize("pos", [0, -1], ids=["index", "value"])
def test_atomics_refuse_zero_dim_arrays(impl, name, pos):
    """A 0-d array is not an int (API.md: ints or numpy integer scalars): TypeError, array
    unchanged; the numpy integer scalars themselves are accepted."""
    a = np.zeros(8, dtype=np.uint64)
    args = [5, 0, 3] if name == "cmpxchg" else [5, 3]
    bad = list(args)
    bad[pos] = np.array(bad[pos])
    with pytest.raises(TypeError):
        getattr(impl, name)(a, *bad)
    assert not a.any()
    getattr(impl, name)(a, *[np.uint16(x) for x in args])
    assert a[5] == (0 if name == "atomic_and_not" else 3)
