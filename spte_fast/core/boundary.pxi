# =====================================================================================
# core/boundary.pxi: the API boundary -- argument checks and the one _check_rc
# =====================================================================================
# Every def function converts and checks its arguments here before any kernel runs, and
# maps a kernel's return code to an exception in _check_rc.  Nothing below the boundary
# raises or touches a Python object.

import operator as _operator

from libc.stdlib cimport calloc
from posix.mman cimport MADV_HUGEPAGE, madvise

import numpy as np

from .errors import (AuditError, CacheConfigError, OutOfMemory, SpteError, WARN_REASONS,
                     CACHE_WARN_REASONS)
from .pf import PF

cnp.import_array()

cdef u64 U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef u64 PFN_LIMIT = (<u64>1) << 40       # pfns that fit SPTE_BASE_ADDR_MASK

# What the API calls an int (docs/API.md "Accepted argument types"): an int or any
# subclass of int (bool, IntEnum: their value is read from the int itself, no method of
# theirs runs), a scalar of numpy's own integer types, or numpy.bool_.  Not a subclass of a
# numpy scalar type and not any other object with __index__: their Python code could run
# in the middle of a call.
_NP_INT_TYPES = frozenset(np.dtype(c).type for c in np.typecodes["AllInteger"]) | {np.bool_}

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


cdef object _int_value(object v, str name):
    """The exact Python int of an accepted int argument, running none of its own code:
    operator.index of an int subclass copies the int without calling its methods, and a
    numpy scalar of numpy's own type is numpy's code.  TypeError for anything else."""
    if isinstance(v, int):
        return _operator.index(v)
    if type(v) in _NP_INT_TYPES:
        return int(bool(v)) if type(v) is np.bool_ else _operator.index(v)
    if isinstance(v, (np.integer, np.bool_)):
        raise TypeError(f"{name} must be an int, not {type(v).__name__} (a subclass of a "
                        f"numpy scalar type: its methods could run in the middle of a call)")
    raise TypeError(f"{name} must be an int, not {type(v).__name__}")


cdef u64 _as_u64(object v, str name) except? 0xFFFFFFFFFFFFFFFF:
    """An int in [0, 2**64) or TypeError/ValueError naming the argument."""
    cdef unsigned long long r
    if PyLong_CheckExact(v):            # the common case, without Python-level calls
        r = _pylong_as_ull(v)
        if r != <unsigned long long>-1 or PyErr_Occurred() == NULL:
            return r
        PyErr_Clear()                   # negative or too wide: worded below
    iv = _int_value(v, name)
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
    iv = _int_value(v, name)
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
# Every property of an array argument is read from numpy's C struct or the buffer protocol,
# never from Python attributes (an ndarray subclass may redefine shape, flags, dtype, min
# and max).  Masked arrays are refused: their mask would be ignored by the kernels.  Byte
# order must be native where a kernel reads or writes the array in place (uint64 arrays,
# ``out``); gfns and access are converted by value and may have either.

cdef object _MaskedArray = np.ma.MaskedArray


cdef cnp.ndarray _ndarray(object a, str name, str what, bint native=True):
    """``a`` as a plain ndarray (a view of the same memory for a subclass), or TypeError.
    ``native``: the kernel reads or writes the memory in place, so the byte order must be
    the machine's (arrays that are converted by value, gfns and access, need not be)."""
    if not cnp.PyArray_CheckExact(a):       # the common case, a plain ndarray, skips this
        if not cnp.PyArray_Check(a):
            raise TypeError(f"{name} must be a numpy.ndarray{what}, not {type(a).__name__}")
        if isinstance(a, _MaskedArray):
            raise TypeError(f"{name} must not be a masked array (numpy.ma): pass "
                            f"{name}.filled(...) or {name}.data")
        a = np.ndarray.view(a, np.ndarray)      # numpy's own view: no subclass code runs
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if native and cnp.PyArray_ISBYTESWAPPED(arr):
        raise TypeError(f"{name} must have native byte order, not {arr.dtype.str!r}")
    return arr


cdef cnp.ndarray _u64_array(object a, str name, bint writable):
    """Check with numpy's C API (no attribute lookups: this runs on every kernel call)."""
    cdef cnp.ndarray arr = _ndarray(a, name, " of uint64")
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
    cdef cnp.npy_intp size = cnp.PyArray_SIZE(arr)
    if size == 0:
        raise ValueError("array is empty")
    if i >= size:
        raise ValueError(f"index must be in [0, {size - 1}], got {i}")
    return (<u64*>cnp.PyArray_DATA(arr)) + i


cdef cnp.ndarray _int_array(object a, str name):
    """A 1-D integer array (any integer dtype, values >= 0) as a plain ndarray."""
    cdef cnp.ndarray arr = _ndarray(a, name, "", False)     # converted by value
    if not (cnp.PyArray_ISINTEGER(arr) and cnp.PyArray_TYPE(arr) != cnp.NPY_BOOL):
        raise TypeError(f"{name} must hold integers, not {arr.dtype}")
    if cnp.PyArray_NDIM(arr) != 1:
        raise ValueError(f"{name} must be 1-D, not shape {(<object>arr).shape}")
    if cnp.PyArray_ISSIGNED(arr) and cnp.PyArray_SIZE(arr) and arr.min() < 0:
        raise ValueError(f"{name} holds negative values")
    return arr


cdef cnp.ndarray _gfn_array(object a, str name, u64 limit):
    cdef cnp.ndarray arr = _int_array(a, name)
    if cnp.PyArray_SIZE(arr) and int(arr.max()) >= limit:
        raise ValueError(f"{name} holds gfns beyond the address width (< {limit:#x})")
    return np.ascontiguousarray(arr, dtype=np.uint64)


cdef cnp.ndarray _access_array(object a, Py_ssize_t n):
    cdef cnp.ndarray arr = _int_array(a, "access")
    if arr.shape[0] != n:
        raise ValueError(f"access has {arr.shape[0]} entries, gfns has {n}")
    if cnp.PyArray_SIZE(arr) and int(arr.max()) > 3:
        raise ValueError("access values must be 0..3 (bit 0 write, bit 1 exec)")
    return np.ascontiguousarray(arr, dtype=np.uint8)


cdef int8_t[:] _out_view(object out, Py_ssize_t n):
    """A batch call's ``out``: a writable 1-D int8 array of n entries (any strides), as a
    typed memoryview.  Its length, strides and writability come from the buffer protocol,
    so the caller writes only inside the buffer that ``out`` exports, whatever its Python
    attributes say.  Write ``&view[0]`` when ``view.strides[0] == 1`` (and n > 0), else
    element by element."""
    cdef cnp.ndarray arr = _ndarray(out, "out", " of int8")
    cdef int8_t[:] view
    if cnp.PyArray_TYPE(arr) != cnp.NPY_INT8:
        raise TypeError(f"out must have dtype int8, not {arr.dtype}")
    if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIMS(arr)[0] != n:
        raise ValueError(f"out must have shape ({n},), not {(<object>arr).shape}")
    if not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError("out is read-only")
    try:
        view = out                      # the buffer ``out`` itself exports (writable)
    except (BufferError, ValueError, TypeError) as e:
        raise ValueError(f"out: no writable 1-D int8 buffer ({e})") from None
    if view.shape[0] != n:
        raise ValueError(f"out's buffer has {view.shape[0]} entries, gfns has {n}")
    return view


cdef int8_t* _out_ptr(int8_t[:] view):
    """Where a kernel may write an ``_out_view`` in place: its first element when the
    buffer is contiguous, NULL when it is empty (nothing to write)."""
    return &view[0] if view.shape[0] else NULL


cdef object _out_scratch(int8_t[:] view):
    """A contiguous int8 array that a kernel fills for a strided ``view`` (copied back by
    ``_out_copy_back``), or None when the view can be written in place."""
    if view.shape[0] and view.strides[0] != 1:
        return np.empty(view.shape[0], dtype=np.int8)
    return None


cdef int _out_copy_back(int8_t[:] view, object scratch, Py_ssize_t done) except -1:
    """view[:done] = scratch[:done], through the view's own strides."""
    cdef const int8_t[:] src = scratch
    cdef Py_ssize_t i
    for i in range(min(done, view.shape[0], src.shape[0])):
        view[i] = src[i]
    return 0


cdef class _PageArena:
    """The memory of a PagePool's pages: C memory that no Python object exposes writably.

    calloc (a page never touched costs nothing), aligned to 4 KiB like real page-table
    pages, with transparent huge pages advised from 4 MiB on as numpy does for its own
    blocks.  Its only Python face is read-only arrays whose base is this object, which
    has no buffer interface: ``flags.writeable = True`` is refused on them, and nothing
    reachable from them (base chain, attributes, gc referents) can be written through.
    """
    cdef void* raw
    cdef u64* pages
    cdef int64_t cap

    def __cinit__(self):
        self.raw = NULL
        self.pages = NULL
        self.cap = 0

    def __dealloc__(self):
        free(self.raw)


cdef _PageArena _new_page_arena(int64_t cap, bint poisoned, u64 poison):
    cdef _PageArena a = _PageArena.__new__(_PageArena)
    cdef size_t page_bytes = SPTE_ENT_PER_PAGE * sizeof(u64)
    cdef size_t nbytes = <size_t>cap * page_bytes
    cdef size_t addr
    a.raw = calloc(<size_t>cap + 1, page_bytes)
    if a.raw == NULL:
        raise MemoryError(f"a pool of {cap} page-table pages")
    addr = <size_t>a.raw
    a.pages = <u64*>(addr + (page_bytes - addr % page_bytes) % page_bytes)
    a.cap = cap
    if nbytes >= (<size_t>4 << 20):
        madvise(<void*>a.pages, nbytes - nbytes % 4096, MADV_HUGEPAGE)
    if poisoned:                        # as numpy.full did: a transient writable view
        _arena_view(a, True).fill(poison)
    return a


cdef object _arena_view(_PageArena a, bint writable=False):
    """A new read-only (cap, 512) uint64 array over the arena, based on the arena
    (``writable``: for the arena's own initialisation only, never handed out)."""
    cdef cnp.npy_intp dims[2]
    dims[0] = <cnp.npy_intp>a.cap
    dims[1] = SPTE_ENT_PER_PAGE
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNewFromData(2, dims, cnp.NPY_UINT64, a.pages)
    if not writable:
        cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
    cnp.set_array_base(arr, a)
    return arr


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
