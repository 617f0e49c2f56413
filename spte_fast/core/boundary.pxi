# =====================================================================================
# core/boundary.pxi: the API boundary -- argument checks and the one _check_rc
# =====================================================================================
# Every def function converts and checks its arguments here before any kernel runs, and
# maps a kernel's return code to an exception in _check_rc.  Nothing below the boundary
# raises or touches a Python object.

import operator as _operator

import numpy as np

from .errors import (AuditError, CacheConfigError, OutOfMemory, SpteError, WARN_REASONS,
                     CACHE_WARN_REASONS)
from .pf import PF

cnp.import_array()

cdef u64 U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef u64 PFN_LIMIT = (<u64>1) << 40       # pfns that fit SPTE_BASE_ADDR_MASK

# What the API calls an int: Python ints (bool included) and numpy integer scalars; not
# any object with __index__ (whose code could run mid-call).
_INT_TYPES = (int, np.integer)

# The warning names, by the C enums' numbers (core/_core.pxd keeps the same order).
_MMU_WARN_NAMES = tuple(r for r in WARN_REASONS if r not in CACHE_WARN_REASONS)
if len(_MMU_WARN_NAMES) != NR_MMU_WARN or len(CACHE_WARN_REASONS) != NR_CACHE_WARN:
    raise ImportError("spte_fast.errors.WARN_REASONS and the core's WARN_* enums differ")

cdef extern from "Python.h":
    # Declared without an exception spec: the callers test PyErr_Occurred themselves and
    # fall back to the slow path, which words the error.
    bint PyLong_CheckExact(object o)
    unsigned long long _pylong_as_ull "PyLong_AsUnsignedLongLong"(object o)
    long long _pylong_as_ll "PyLong_AsLongLong"(object o)
    void* PyErr_Occurred()
    void PyErr_Clear()


cdef u64 _as_u64(object v, str name) except? 0xFFFFFFFFFFFFFFFF:
    """An int in [0, 2**64) or TypeError/ValueError naming the argument."""
    cdef unsigned long long r
    if PyLong_CheckExact(v):            # the common case, without Python-level calls
        r = _pylong_as_ull(v)
        if r != <unsigned long long>-1 or PyErr_Occurred() == NULL:
            return r
        PyErr_Clear()                   # negative or too wide: worded below
    if not isinstance(v, _INT_TYPES):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    iv = _operator.index(v)
    if iv < 0 or iv > U64_MAX:
        raise ValueError(f"{name} must be in [0, 2**64), got {iv:#x}" if iv >= 0
                         else f"{name} must be in [0, 2**64), got {iv}")
    return <u64>iv


cdef int64_t _as_int(object v, str name, int64_t lo, int64_t hi) except? -1:
    """An int in [lo, hi] or TypeError/ValueError."""
    cdef long long r
    if PyLong_CheckExact(v):
        r = _pylong_as_ll(v)
        if r != -1 or PyErr_Occurred() == NULL:
            if lo <= r <= hi:
                return r
        else:
            PyErr_Clear()               # wider than 64 bits: worded below
    if not isinstance(v, _INT_TYPES):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    iv = _operator.index(v)
    if iv < lo or iv > hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {iv}")
    return <int64_t>iv


cdef int _check_rc(int rc, str what, int warn=-1, object completed=None,
                   str einval="invalid argument") except -1:
    """The one place where kernel return codes become exceptions.

    ``warn``: the memory cache's latest warning reason, which says why -EIO was returned;
    ``completed``: for batch calls, how many items finished before the error; ``einval``:
    what -EINVAL means for this call."""
    if rc >= 0:
        return rc
    if rc == -SPTE_ENOMEM:
        raise OutOfMemory(f"{what}: out of page-table pages (-ENOMEM)", completed=completed)
    if rc == -SPTE_EIO:
        reason = WARN_REASONS[CACHE_WARN_REASONS[warn]] if 0 <= warn < NR_CACHE_WARN else \
            "refused by KVM's rules"
        raise CacheConfigError(f"{what}: {reason} (-EIO)")
    if rc == -SPTE_EINVAL:
        raise ValueError(f"{what}: {einval}")
    raise SpteError(f"{what}: error {rc}")


# -- arrays --------------------------------------------------------------------------------

cdef cnp.ndarray _u64_array(object a, str name, bint writable):
    """Check with numpy's C API (no attribute lookups: this runs on every kernel call)."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray of uint64, not {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT64:
        raise TypeError(f"{name} must have dtype uint64, not {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only")
    return arr


cdef cnp.ndarray _pages_array(object a, str name, bint writable):
    cdef cnp.ndarray arr = _u64_array(a, name, writable)
    cdef int nd = cnp.PyArray_NDIM(arr)
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(arr)
    if not ((nd == 2 and shape[1] == SPTE_ENT_PER_PAGE) or
            (nd == 1 and shape[0] == SPTE_ENT_PER_PAGE)):
        raise ValueError(f"{name} must have shape (n, 512) or (512,), not {(<object>arr).shape}")
    return arr


cdef u64* _elem(object array, int64_t i) except NULL:
    """&array.flat[i]; called after every scalar argument is converted, so that nothing
    can run between taking the pointer and using it."""
    cdef cnp.ndarray arr = _u64_array(array, "array", True)
    if arr.size == 0:
        raise ValueError("array is empty")
    if i >= arr.size:
        raise ValueError(f"index must be in [0, {arr.size - 1}], got {i}")
    return (<u64*>cnp.PyArray_DATA(arr)) + i


cdef cnp.ndarray _int_array(object a, str name):
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(a).__name__}")
    arr = a                             # untyped: the Python attributes below
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not shape {arr.shape}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError(f"{name} holds negative values")
    return arr


cdef cnp.ndarray _gfn_array(object a, str name, u64 limit):
    arr = _int_array(a, name)
    if arr.size and int(arr.max()) >= limit:
        raise ValueError(f"{name} holds gfns beyond the address width (< {limit:#x})")
    return np.ascontiguousarray(arr, dtype=np.uint64)


cdef cnp.ndarray _access_array(object a, Py_ssize_t n):
    arr = _int_array(a, "access")
    if arr.shape[0] != n:
        raise ValueError(f"access has {arr.shape[0]} entries, gfns has {n}")
    if arr.size and int(arr.max()) > 3:
        raise ValueError("access values must be 0..3 (bit 0 write, bit 1 exec)")
    return np.ascontiguousarray(arr, dtype=np.uint8)


cdef cnp.ndarray _out_array(object out, Py_ssize_t n):
    """fault_batch's ``out``: a writable 1-D int8 array of n entries (any strides)."""
    if not isinstance(out, np.ndarray):
        raise TypeError("out must be a numpy.ndarray of int8")
    if out.dtype != np.int8:
        raise TypeError(f"out must have dtype int8, not {out.dtype}")
    if out.ndim != 1 or out.shape[0] != n:
        raise ValueError(f"out must have shape ({n},), not {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return out


cdef object _page_arena(int64_t cap, object poison):
    """``cap`` pages as a (cap, 512) uint64 array aligned to 4 KiB, like real page-table
    pages: numpy.zeros (or full of ``poison``) with one spare page, viewed from the first
    page boundary.  numpy's own blocks are only 16-byte aligned, which would make every
    table straddle two host pages and split cache lines under the fill's wide stores."""
    cdef int64_t n = (cap + 1) * SPTE_ENT_PER_PAGE
    raw = (np.zeros(n, dtype=np.uint64) if poison is None
           else np.full(n, poison, dtype=np.uint64))
    cdef size_t page_bytes = SPTE_ENT_PER_PAGE * sizeof(u64)
    cdef size_t addr = <size_t>cnp.PyArray_DATA(<cnp.ndarray>raw)
    cdef int64_t off = <int64_t>(((page_bytes - addr % page_bytes) % page_bytes) // sizeof(u64))
    return raw[off:off + cap * SPTE_ENT_PER_PAGE].reshape(cap, SPTE_ENT_PER_PAGE)
