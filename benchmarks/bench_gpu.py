"""GPU training step of an extreme-classification output layer: LSHLinear vs nn.Linear + full softmax.

    python benchmarks/bench_gpu.py                    # 670,091 and 4,000,000 outputs, fp32 and bf16
    python benchmarks/bench_gpu.py --quick            # 100,000 outputs, fewer steps (smoke run)
    python benchmarks/bench_gpu.py --help

Needs a CUDA device; without one it says so and exits 0 (``--device cpu`` runs the same harness
on the CPU at small sizes, only to check the script). A step is forward, loss, backward and
optimizer step for a batch of ``--batch`` hidden vectors ``h [B, --hidden]`` (requiring grad, as
inside a network), one label per row (``--labels-per-row``):

  dense            nn.Linear + F.cross_entropy over all outputs + torch.optim.Adam
  lsh per_row      LSHLinear(mode="per_row").forward_sparse(h, labels) + lsh_torch.sparse_cross_entropy
                   (softmax over each row's active logits, labels forced in) + torch.optim.Adam
                   (dense gradients): ``--active-per-row`` outputs per row
  lsh per_row lazy the same with sparse_grad=True + lsh_torch.LazyAdam (row-sparse Adam)
  lsh shared lazy  mode="shared" (one active set of ``--active`` outputs for the batch, a gathered
                   GEMM) + sparse_grad=True + LazyAdam

The hashing settings are LSHLinear's defaults for the width, as in the CPU output-layer benchmark
and the XMC demo (L=20 tables shared, 40 per row, ~200 rows per bucket, 2 probes, asymmetric=False, half of the
2,048 outputs per batch or 128 per row the corrected uniform tail, top set rescored). The LSH steps are timed without
rebuilds (``rebuild=None``); rebuilds are timed on their own: a full one (every row hashed) and the
incremental one that training runs under the default schedule (every 10 steps, re-hashing the rows
the last 10 steps moved), whose cost divided by 10 is added in "+rebuild". Times are medians over
``--steps`` steps after ``--warmup`` steps, each step bracketed by torch.cuda.synchronize(); ratios
are dense / case (above 1: faster than dense). Cases run one after another in this process, memory
released in between; a case that fails (out of memory, ...) is reported and skipped.
``--profile N`` also runs each case's step under torch.profiler and prints its N costliest ops by
self device time (self CPU time on the CPU), per step: where a slow case spends its time.
Writes a table to stdout and JSON to ``benchmarks/results/gpu[_quick].json``.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import lsh_torch
from lsh_torch import LazyAdam, LSHLinear, sparse_cross_entropy
from timing import REBUILD_PERIOD, full_rebuild_time, incremental_rebuild_time, profile_steps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUICK = {"sizes": [100_000], "warmup": 3, "steps": 5}  # what --quick sets
CASES = ("dense", "lsh per_row", "lsh per_row lazy", "lsh shared lazy")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DenseStep:
    def __init__(self, n, h, labels, dtype, args):
        self.layer = nn.Linear(h.shape[1], n, device=h.device, dtype=dtype)
        self.opt = torch.optim.Adam(self.layer.parameters(), lr=1e-3, fused=True)
        self.h, self.labels = h, labels
        if labels.shape[1] > 1:  # target mass spread over the labels, as sparse_cross_entropy does
            target = torch.zeros(labels.shape[0], n, device=h.device, dtype=dtype).scatter_(1, labels, 1.0)
            self.target = target / target.sum(1, keepdim=True)
        else:
            self.target = labels[:, 0]

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.h.grad = None
        loss = F.cross_entropy(self.layer(self.h), self.target)
        loss.backward()
        self.opt.step()


class LSHStep:
    def __init__(self, n, h, labels, dtype, args, mode, lazy):
        budget = args.active if mode == "shared" else args.active_per_row
        self.layer = LSHLinear(h.shape[1], n, device=h.device, dtype=dtype, active=budget, mode=mode,
                               sparse_grad=lazy, rebuild=None, num_tables=args.tables, bits=args.bits,
                               probes=args.probes)  # as bench_output_layer.py and the XMC demo
        self.layer.train()
        self.opt = (LazyAdam if lazy else torch.optim.Adam)(self.layer.parameters(), lr=1e-3)
        self.h, self.labels = h, labels
        self.layer.rebuild()

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.h.grad = None
        loss = sparse_cross_entropy(self.layer.forward_sparse(self.h, self.labels), self.labels)
        loss.backward()
        self.opt.step()


def make_case(name, n, h, labels, dtype, args):
    if name == "dense":
        return DenseStep(n, h, labels, dtype, args)
    mode = "shared" if "shared" in name else "per_row"
    return LSHStep(n, h, labels, dtype, args, mode, lazy=name.endswith("lazy"))


def time_steps(step, device, warmup: int, steps: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times, start = [], time.perf_counter()
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return times


def count_syncs(step, device) -> int | None:
    """Host-device synchronisations in one call of ``step`` (the .item() reads and copies to the
    host that torch's sync debug mode reports; the query sizes its scratch buffers with some)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_step(name, step, device, rows: int, steps: int = 3) -> list[dict]:
    """The ``rows`` ops of largest self device time (CPU time on the CPU) over ``steps`` steps, per step;
    the table is printed, the rows returned for the JSON."""
    averages, key = profile_steps(step, steps, f"## {name} step", cuda=device.type == "cuda", sync=lambda: sync(device))
    print(averages.table(sort_by=key, row_limit=rows))
    ops = [e for e in averages if not e.key.startswith("## ")]  # the step's own label is no op
    top = sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": getattr(e, key) / 1e3 / steps}
            for e in top]


def make_inputs(n, dtype, args, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(args.batch, args.hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, n, (args.batch, args.labels_per_row), generator=gen).to(device)
    return h, labels


def rebuild_times(case: LSHStep, n, dtype, args, device) -> dict:
    """Full rebuild and the default schedule's incremental one (ms), fresh batches in between."""
    layer, inputs = case.layer, (case.h, case.labels)
    full = full_rebuild_time(layer, sync=lambda: sync(device))

    def new_batch(seed):
        case.h, case.labels = make_inputs(n, dtype, args, device, seed)
    seconds, rows = incremental_rebuild_time(layer, case, new_batch, sync=lambda: sync(device))
    case.h, case.labels = inputs
    return {"full_rebuild_ms": 1e3 * full, "rebuild_ms": 1e3 * seconds, "rows_rehashed": rows}


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_one(name, n, dtype_name, args, device) -> dict:
    dtype = DTYPES[dtype_name]
    h, labels = make_inputs(n, dtype, args, device)
    record = {"case": name, "out_features": n, "dtype": dtype_name}
    case = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        case = make_case(name, n, h, labels, dtype, args)
        times = time_steps(case, device, args.warmup, args.steps, args.max_seconds)
        record.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), steps=len(times),
                      syncs_per_step=count_syncs(case, device))
        if args.profile:
            print(f"  profile of {name}, {n} outputs, {dtype_name} (3 steps):", flush=True)
            record["profile"] = profile_step(name, case, device, args.profile)
        if isinstance(case, LSHStep):
            record.update(rebuild_times(case, n, dtype, args, device), budget=case.layer.budget)
            record["amortized_ms"] = record["median_ms"] + record["rebuild_ms"] / REBUILD_PERIOD
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        del case
        release(device)
    return record


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict]) -> None:
    dense = {(r["out_features"], r["dtype"]): r.get("median_ms") for r in results if r["case"] == "dense"}
    head = f"{'outputs':>9} {'dtype':5} {'case':17} {'active':>7} {'step ms':>9} {'x dense':>8} {'full rb ms':>11} " \
           f"{'rebuild ms':>11} {'rows':>8} {'+rebuild ms':>12} {'x dense':>8} {'peak GB':>8} {'syncs':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        base = dense.get((r["out_features"], r["dtype"]))
        if "error" in r:
            print(f"{r['out_features']:>9} {r['dtype']:5} {r['case']:17} failed: {r['error']}")
            continue
        ratio = base / r["median_ms"] if base else None
        amort = r.get("amortized_ms")
        ratio_amort = base / amort if base and amort else None
        print(f"{r['out_features']:>9} {r['dtype']:5} {r['case']:17} {fmt(r.get('budget'), 'd'):>7} "
              f"{r['median_ms']:>9.2f} {fmt(ratio):>8} {fmt(r.get('full_rebuild_ms')):>11} "
              f"{fmt(r.get('rebuild_ms')):>11} {fmt(r.get('rows_rehashed'), 'd'):>8} {fmt(amort):>12} "
              f"{fmt(ratio_amort):>8} {fmt(r.get('peak_mem_gb')):>8} {fmt(r.get('syncs_per_step'), 'd'):>6}")
    print(f"full rb: every row hashed; rebuild: the default schedule's incremental rebuild after {REBUILD_PERIOD} "
          f"steps (rows: re-hashed rows); +rebuild = step + rebuild / {REBUILD_PERIOD}; syncs: host-device "
          f"synchronisations in one step (torch.cuda.set_sync_debug_mode)")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_active(text: str):
    """A count (an int of at least 1) or a fraction of N (a float in (0, 1])."""
    return cli.real(0, 1, open_low=True)(text) if any(c in text for c in ".eE") else cli.integer()(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.DefaultsHelpFormatter)
    p.add_argument("--sizes", type=cli.integers(), default="670091,4000000", help="output sizes, comma-separated")
    p.add_argument("--dtypes", type=cli.listing(cli.choice(*DTYPES), "dtypes"), default="fp32,bf16",
                   help="comma-separated: fp32, bf16")
    p.add_argument("--cases", type=cli.listing(cli.choice(*CASES), "cases"), default=",".join(CASES),
                   help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--batch", type=cli.integer(), default=256)
    p.add_argument("--hidden", type=cli.integer(), default=128)
    p.add_argument("--labels-per-row", type=cli.integer(), default=1)
    p.add_argument("--active", type=parse_active, default=2048,
                   help="active outputs per batch (shared cases): a count or a fraction of N")
    p.add_argument("--active-per-row", type=parse_active, default=128,
                   help="active outputs per row (per_row cases): a count or a fraction of N")
    p.add_argument("--tables", type=cli.auto_or(cli.integer()), default="auto",
                   help="L (default: LSHLinear's for the width)")
    p.add_argument("--bits", type=cli.auto_or(cli.integer()), default="auto")
    p.add_argument("--probes", type=cli.auto_or(cli.integer()), default="auto")
    p.add_argument("--warmup", type=cli.integer(0), default=5)
    p.add_argument("--steps", type=cli.integer(), default=20, help="timed steps per case")
    p.add_argument("--max-seconds", type=cli.positive, default=60, help="stop timing a case after this long")
    p.add_argument("--profile", type=cli.integer(0), default=0, metavar="N",
                   help="print each case's N costliest ops (torch.profiler, self device time); 0: none")
    p.add_argument("--quick", action="store_true", help="100,000 outputs, 3 warm-up and 5 timed steps")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu, the latter only to check the script")
    p.add_argument("--out", type=cli.results_path, default=None,
                   help="JSON path (default benchmarks/results/gpu[_quick].json)")
    args = p.parse_args(argv)
    cli.apply_quick(p, argv, args, QUICK)
    # A width below a count of active outputs failed at its turn, with a traceback, the earlier widths' results lost.
    per_row = any(case.startswith("lsh per_row") for case in args.cases)
    for option, active, used in (("--active-per-row", args.active_per_row, per_row),
                                 ("--active", args.active, "lsh shared lazy" in args.cases)):
        if used and isinstance(active, int) and min(args.sizes) < active:  # a fraction of N fits any width
            p.error(f"--sizes {min(args.sizes)}: below {option} {active} (the active outputs must fit in the layer)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    sizes, dtypes, cases = args.sizes, args.dtypes, args.cases
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both sides
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"

    meta = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "lsh_torch": lsh_torch.__version__,
            "commit": git_commit(), "python": platform.python_version(),
            "args": {k: v for k, v in vars(args).items() if k != "out"}}
    print(f"bench_gpu on {name}, torch {torch.__version__}: batch {args.batch}, hidden {args.hidden}, "
          f"active {args.active} per batch / {args.active_per_row} per row, L={args.tables}, K={args.bits}, probes {args.probes}")
    results = []
    for n in sizes:
        for dtype_name in dtypes:
            for case in cases:
                record = bench_one(case, n, dtype_name, args, device)
                results.append(record)
                status = record.get("error") or f"{record['median_ms']:.2f} ms"
                print(f"  {n:>9} {dtype_name} {case:17} {status}", flush=True)
    print()
    print_table(results)
    out = args.out or os.path.join(RESULTS, "gpu_quick.json" if args.quick else "gpu.json")
    cli.write_json(out, {"meta": meta, "results": results})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
