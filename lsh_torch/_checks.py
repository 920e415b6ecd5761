"""Argument checks with messages that name the argument, shared by the Python layer."""
from __future__ import annotations

import numbers
import operator

MAX_BITS = 20  # the limits of csrc/lsh_common.h
MAX_TABLES = 1024
MAX_PROBES = 128


def check_int(name: str, value, low: int, high: int) -> int:
    """``value`` as a Python int: an int, or an integer scalar such as ``numpy.int64`` (not a bool)."""
    try:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def int_or_float(name: str, value, expected: str) -> int | float:
    """``value`` as a Python int (a count) or float (a fraction), numpy scalars included; ``expected``
    completes the TypeError's "must be ..."."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)
