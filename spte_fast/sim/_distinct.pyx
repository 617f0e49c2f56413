"""The simulator's working set: which values of a stream of gfn chunks are new.

``numpy.unique`` on every segment (a hash of the segment, then a sort) cost the default
``simulate`` run more than its ``access_batch`` calls did; one pass over a byte per value,
as a C loop without the GIL, costs a load per access.
"""
from libc.stdint cimport uint8_t, uint64_t


def first_seen(uint8_t[::1] seen, const uint64_t[:] values, uint64_t[::1] out):
    """Mark each value in ``seen`` (a byte per possible value) and write the ones not seen
    before to ``out``, in the order they first occur; return how many.  ``out`` must hold
    as many as could be new.  A value beyond ``seen`` raises ValueError after the pass
    (the values before it are marked)."""
    cdef Py_ssize_t i, n = 0, limit = seen.shape[0], room = out.shape[0]
    cdef Py_ssize_t bad = -1
    cdef uint64_t v
    with nogil:
        for i in range(values.shape[0]):
            v = values[i]
            if v >= <uint64_t>limit:
                bad = i
                break
            if n == room:               # full: only a value already seen may follow
                if not seen[v]:
                    bad = i
                    break
                continue
            # Branch-free: whether a value is new is random while the set grows, and a
            # mispredicted branch per access cost more than the table's cache miss.
            out[n] = v
            n += 1 - seen[v]
            seen[v] = 1
    if bad >= 0:
        raise ValueError(f"value {values[bad]:#x} at {bad} is beyond the {limit}-value "
                         f"table, or out (room {room}) is full")
    return n


def count_new(uint64_t[::1] bitmap, const uint64_t[:] values, uint64_t limit):
    """Set each value's bit in ``bitmap`` (bit v % 64 of word v // 64, for values below
    ``limit``) and return how many were clear before: a working-set count in a bit per
    value, an eighth of first_seen's table and no list of values, so that the pass stays
    in the producer core's own cache.  A value at or beyond ``limit`` raises ValueError
    after the pass (the values before it are counted and marked)."""
    if limit > <uint64_t>bitmap.shape[0] * 64:
        raise ValueError(f"a bitmap of {bitmap.shape[0]} words holds no {limit} values")
    cdef Py_ssize_t i, bad = -1
    cdef uint64_t v, w, b, n = 0
    with nogil:
        for i in range(values.shape[0]):
            v = values[i]
            if v >= limit:
                bad = i
                break
            w = bitmap[v >> 6]
            b = (<uint64_t>1) << (v & 63)
            n += (w & b) == 0               # branch-free, as in first_seen
            bitmap[v >> 6] = w | b
    if bad >= 0:
        raise ValueError(f"value {values[bad]:#x} at {bad} is beyond the {limit}-value "
                         f"bitmap")
    return n
