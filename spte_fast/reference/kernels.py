"""The kernels: memset64 page fill, sync_page-style scans, 64-bit atomics.

Models the primitives Linux v6.10 uses on page-table memory: ``memset64`` in
``mmu_memory_cache_alloc_obj`` (``virt/kvm/kvm_main.c``), the ``sync_spte`` scan of
``arch/x86/kvm/mmu/mmu.c`` (entries that differ from the non-present value), and the
``try_cmpxchg64`` / ``xchg`` / atomic and-or of ``arch/x86/kvm/mmu/tdp_iter.h``.  Here they
work on numpy arrays, one element at a time where that is the clearer way.
"""
import threading

import numpy as np

from ._checks import check_int, check_u64, check_u64_array, check_writable
from .spte import SPTE_ENT_PER_PAGE


def _check_pages_shape(name, pages):
    if not (pages.shape == (SPTE_ENT_PER_PAGE,)
            or (pages.ndim == 2 and pages.shape[1] == SPTE_ENT_PER_PAGE)):
        raise ValueError(f"{name} must have shape (n, 512) or (512,), not {pages.shape}")
    if not pages.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def fill_pages(pages, value):
    """memset64: set every u64 of `pages` ((n, 512) or (512,)) to `value`."""
    check_u64_array("pages", pages)
    _check_pages_shape("pages", pages)
    check_writable("pages", pages)
    value = check_u64("value", value)
    pages[...] = np.uint64(value)


def scan_present(page, nonpresent_value):
    """Indices (ascending, intp) of the entries of one page that differ from `nonpresent_value`."""
    check_u64_array("page", page)
    if page.shape != (SPTE_ENT_PER_PAGE,):
        raise ValueError(f"page must have shape (512,), not {page.shape}")
    if not page.flags.c_contiguous:
        raise ValueError("page must be C-contiguous")
    nonpresent_value = check_u64("nonpresent_value", nonpresent_value)
    indices = [i for i in range(SPTE_ENT_PER_PAGE) if int(page[i]) != nonpresent_value]
    return np.array(indices, dtype=np.intp)


def count_present(pages, nonpresent_value):
    """Per page, how many entries differ from `nonpresent_value` (int64, shape (n,))."""
    check_u64_array("pages", pages)
    # API.md is silent: whether count_present needs C-contiguous pages; required, like
    # fill_pages (read-only is fine).
    _check_pages_shape("pages", pages)
    nonpresent_value = check_u64("nonpresent_value", nonpresent_value)
    rows = pages.reshape(-1, SPTE_ENT_PER_PAGE)
    counts = np.count_nonzero(rows != np.uint64(nonpresent_value), axis=1)
    return counts.astype(np.int64).reshape(rows.shape[0])


def _atomic_target(array, index):
    """Validate an atomic's array and index; return the flat writable view and the index."""
    check_u64_array("array", array)
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    check_writable("array", array)
    index = check_int("index", index, 0, array.size)
    return array.reshape(-1), index


# The oracle's atomics are atomic with respect to each other: one lock around the
# read-modify-write (Python may switch threads between any two bytecodes).
_ATOMIC = threading.Lock()


def cmpxchg(array, index, expected, new):
    """Compare-and-exchange on ``array.flat[index]`` -> ``(ok, observed)``."""
    flat, index = _atomic_target(array, index)
    expected = check_u64("expected", expected)
    new = check_u64("new", new)
    with _ATOMIC:
        observed = int(flat[index])
        if observed != expected:
            return False, observed
        flat[index] = new
    return True, observed


def _read_modify_write(array, index, value, name, op):
    """One atomic read-modify-write of ``array.flat[index]``; returns the old value."""
    flat, index = _atomic_target(array, index)
    value = check_u64(name, value)
    with _ATOMIC:
        old = int(flat[index])
        flat[index] = op(old, value)
    return old


def xchg(array, index, new):
    """Exchange: store `new`, return the old value."""
    return _read_modify_write(array, index, new, "new", lambda old, new: new)


def atomic_or(array, index, mask):
    """Fetch-and-or: set `mask`, return the old value."""
    return _read_modify_write(array, index, mask, "mask", lambda old, mask: old | mask)


def atomic_and_not(array, index, mask):
    """Fetch-and-andnot: clear `mask`, return the old value."""
    return _read_modify_write(array, index, mask, "mask", lambda old, mask: old & ~mask)


