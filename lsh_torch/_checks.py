"""Argument checks with messages that name the argument, shared by the Python layer."""
from __future__ import annotations

MAX_BITS = 20  # the limits of csrc/lsh_common.h
MAX_TABLES = 1024
MAX_PROBES = 128


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value
