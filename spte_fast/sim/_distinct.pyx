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
