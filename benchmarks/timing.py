"""Timing helpers shared by the benchmarks."""
from __future__ import annotations

import statistics
import time

REBUILD_PERIOD = 10  # LSHLinear's default schedule: an incremental rebuild every 10 training steps


def median_time(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_steps(step, steps: int, label: str, cuda: bool = False, sync=lambda: None):
    """torch.profiler's per-op averages over ``steps`` calls of ``step`` (each under ``label``; the CPU's
    activity, and the GPU's if ``cuda``), and the attribute that ranks them by self time: self device time
    on a GPU, self CPU time otherwise."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(label):
                step()
        sync()
    return prof.key_averages(), "self_device_time_total" if cuda else "self_cpu_time_total"


def full_rebuild_time(layer, reps: int = 3, sync=lambda: None) -> float:
    """Median seconds of a full table build of ``layer`` (every row hashed)."""
    spent = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        layer.tables.build(layer.weight, full=True)
        sync()
        spent.append(time.perf_counter() - start)
    return statistics.median(spent)


def incremental_rebuild_time(layer, step, new_batch, reps: int = 3, sync=lambda: None) -> tuple[float, int]:
    """Median seconds of the rebuild that training runs under the default schedule: the tables are
    brought up to date, ``REBUILD_PERIOD`` training steps run on fresh batches (``new_batch(seed)``
    installs one, then ``step()`` trains on it), and the rebuild re-hashes the rows those steps
    moved. Returns the seconds and the median number of rows re-hashed. ``sync`` waits for the
    device (torch.cuda.synchronize on a GPU). Timed is the build the schedule runs (``_build``), which
    takes the rows that lazy optimizer steps report; ``rebuild()``, said after writes no version
    counter sees, looks at every row's fingerprint."""
    spent, rows = [], []
    for rep in range(reps):
        layer.rebuild()
        for i in range(REBUILD_PERIOD):
            new_batch(1 + rep * 100 + i)
            step()
        sync()
        start = time.perf_counter()
        layer._build()
        sync()
        spent.append(time.perf_counter() - start)
        rows.append(layer.tables.rehashed)
    return statistics.median(spent), int(statistics.median(rows))
