"""Argument checks of the API boundary: TypeError / ValueError before anything changes.

KVM has no counterpart (its callers are the kernel and already-validated ioctls); the
model's public classes call these once per argument and run unchecked inside.
"""
import numpy as np

U64_LIMIT = 1 << 64


def check_int(name, value, lo=None, hi=None):
    """Return `value` as a Python int in [lo, hi) (hi exclusive).

    Python ints (bool included) and numpy integer scalars are integers; anything else,
    also an object that merely has ``__index__``, is a TypeError.  Out of range is a
    ValueError.
    """
    if not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo:#x}, got {value:#x}")
    if hi is not None and value >= hi:
        raise ValueError(f"{name} must be < {hi:#x}, got {value:#x}")
    return value


def check_u64(name, value):
    return check_int(name, value, 0, U64_LIMIT)


def check_u64_array(name, array):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(array).__name__}")
    if array.dtype != np.uint64:
        raise TypeError(f"{name} must have dtype uint64, not {array.dtype}")


def check_writable(name, array):
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only")


def check_int_array(name, array):
    """A 1-D numpy array of an integer dtype -> list of Python ints (all >= 0)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(array).__name__}")
    # API.md is silent: whether bool arrays count as integer arrays; numpy says they do not.
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, not {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not of shape {array.shape}")
    values = [int(v) for v in array]
    for v in values:
        if v < 0:
            raise ValueError(f"{name} values must be >= 0, got {v}")
    return values
