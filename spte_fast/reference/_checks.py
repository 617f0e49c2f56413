"""Argument checks of the API boundary: TypeError / ValueError before anything changes.

KVM has no counterpart (its callers are the kernel and already-validated ioctls); the
model's public classes call these once per argument and run unchecked inside.  The rules
are docs/API.md "Accepted argument types", the same as the engine's: ints are Python ints
(subclasses included, read without running their methods), numpy's own integer scalars and
``numpy.bool_``; arrays are numpy arrays of native byte order, never masked, judged by what
numpy itself says about them (a subclass's redefined attributes are not consulted).
"""
import operator

import numpy as np

U64_LIMIT = 1 << 64

# numpy's own integer scalar types (and numpy.bool_, as bool is an int): their conversion
# is numpy's code.  A subclass of them could run its own code in the middle of a call.
_NP_INT_TYPES = frozenset(np.dtype(c).type for c in np.typecodes["AllInteger"]) | {np.bool_}


def int_value(name, value):
    """The exact Python int of an accepted int argument, or TypeError."""
    if isinstance(value, int):
        return operator.index(value)        # an int subclass: copied, no method of it runs
    if type(value) in _NP_INT_TYPES:
        return int(bool(value)) if type(value) is np.bool_ else operator.index(value)
    if isinstance(value, (np.integer, np.bool_)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} (a subclass of "
                        f"a numpy scalar type: its methods could run in the middle of a call)")
    raise TypeError(f"{name} must be an int, not {type(value).__name__}")


def check_int(name, value, lo=None, hi=None):
    """Return `value` as a Python int in [lo, hi) (hi exclusive).

    Python ints (bool and other subclasses included), numpy's integer scalars and
    ``numpy.bool_`` are integers; anything else, also an object that merely has
    ``__index__`` or a subclass of a numpy scalar type, is a TypeError.  Out of range is a
    ValueError.
    """
    value = int_value(name, value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo:#x}, got {value:#x}")
    if hi is not None and value >= hi:
        raise ValueError(f"{name} must be < {hi:#x}, got {value:#x}")
    return value


def check_u64(name, value):
    return check_int(name, value, 0, U64_LIMIT)


def plain_array(name, array, what="", native=True):
    """``array`` as a plain ndarray over the same memory, or TypeError: not an ndarray, a
    masked array (its mask would be ignored), or (``native``: an array used in place, as
    the engine's kernels use it) not of native byte order."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray{what}, not {type(array).__name__}")
    if isinstance(array, np.ma.MaskedArray):
        raise TypeError(f"{name} must not be a masked array (numpy.ma): pass "
                        f"{name}.filled(...) or {name}.data")
    if type(array) is not np.ndarray:
        array = np.ndarray.view(array, np.ndarray)     # numpy's view: no subclass code
    if native and not array.dtype.isnative:
        raise TypeError(f"{name} must have native byte order, not {array.dtype.str!r}")
    return array


def check_u64_array(name, array):
    array = plain_array(name, array, " of uint64")
    if array.dtype != np.uint64:
        raise TypeError(f"{name} must have dtype uint64, not {array.dtype}")
    return array


def check_writable(name, array):
    if not plain_array(name, array).flags.writeable:
        raise ValueError(f"{name} is read-only")


def check_int_array(name, array):
    """A 1-D numpy array of an integer dtype -> list of Python ints (all >= 0)."""
    array = plain_array(name, array, native=False)     # converted by value
    # API.md: bool arrays are not integer arrays (numpy says so too), unlike bool scalars.
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, not {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not of shape {array.shape}")
    values = array.tolist()
    for v in values:
        if v < 0:
            raise ValueError(f"{name} values must be >= 0, got {v}")
    return values


def check_out_array(name, out, n):
    """A batch call's ``out``: a writable 1-D int8 array of ``n`` entries (any strides),
    judged by numpy (a subclass's ``shape`` or ``flags`` are not consulted); returns the
    plain ndarray over the same memory, which is what should be written."""
    plain = plain_array(name, out, " of int8")
    if plain.dtype != np.int8:
        raise TypeError(f"{name} must have dtype int8, not {plain.dtype}")
    if plain.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), not {plain.shape}")
    if not plain.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return plain
