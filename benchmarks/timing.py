"""Timing helper shared by the benchmarks."""
from __future__ import annotations

import statistics
import time


def median_time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
