"""Forward+backward time of LSHLinear and of its sparse op vs nn.Linear, on one device.

    python benchmarks/bench_layer.py            # about a minute on 2 CPU cores
    python benchmarks/bench_layer.py --quick    # a few seconds

For each width N it times, with the same input x [B, in] (requiring grad) and the same weights:
  nn.Linear            y = linear(x) [B, N]; y.backward(g)
  LSHLinear            training-mode drop-in forward [B, N] (query + sparse op + scatter), backward
                       (the default dense weight gradient, and with sparse_grad=True)
  sparse_linear        lsh_torch.ops.sparse_linear on a precomputed active set [B, A], backward
                       (dense and row-sparse weight gradients)
  query                the LSH lookup alone (hash the batch, probe the tables): active [B, A]
  rebuild              re-hash all N weight rows into the tables (amortized over many steps;
                       benchmarks/timing.py's full_rebuild_time, the median of 3)
Medians from torch.utils.benchmark (num_threads = torch.get_num_threads()); ratios are
time / time(nn.Linear) measured in the same run. No rebuilds happen inside the timed steps.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_output_layer.py

import argparse
import platform
import sys

import torch
import torch.utils.benchmark as benchmark
from torch import nn

import lsh_torch
from lsh_torch import ops
from timing import full_rebuild_time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(fn, device, min_run_time: float) -> float:
    fn()  # warm-up (and first-use allocations)
    _sync(device)
    timer = benchmark.Timer(stmt="fn(); sync()", globals={"fn": fn, "sync": lambda: _sync(device)},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def bench_width(n: int, batch: int, d: int, budget: int, device, min_run_time: float) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(d, n, device=device)
    lsh = lsh_torch.LSHLinear.from_linear(linear, active=budget, rebuild=None)
    lsh_sparse = lsh_torch.LSHLinear.from_linear(linear, active=budget, rebuild=None, sparse_grad=True)
    x = torch.randn(batch, d, device=device, requires_grad=True)
    g_full = torch.randn(batch, n, device=device)
    g_active = torch.randn(batch, budget, device=device)
    lsh.rebuild()
    lsh_sparse.rebuild()
    active = lsh.active_set(x.detach())

    def step(module, out_fn, grad):
        def run():
            x.grad = None
            for p in module.parameters():
                p.grad = None
            out_fn().backward(grad)
        return run

    cases = {
        "nn.Linear": step(linear, lambda: linear(x), g_full),
        "LSHLinear": step(lsh, lambda: lsh(x), g_full),
        "LSHLinear sparse_grad": step(lsh_sparse, lambda: lsh_sparse(x), g_full),
        "sparse_linear": step(linear, lambda: ops.sparse_linear(x, linear.weight, linear.bias, active), g_active),
        "sparse_linear sparse_grad": step(linear, lambda: ops.sparse_linear(x, linear.weight, linear.bias, active,
                                                                            sparse_grad=True), g_active),
        "query": lambda: lsh.active_set(x.detach()),
    }
    times = {name: _median(fn, device, min_run_time) for name, fn in cases.items()}
    # Every row re-hashed: lsh.rebuild() re-hashes only rows whose weights moved, and here none do.
    times["rebuild"] = full_rebuild_time(lsh, sync=lambda: _sync(device))
    base = times["nn.Linear"]
    return {"out_features": n, "times_s": times, "ratio_vs_linear": {k: v / base for k, v in times.items()}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.DefaultsHelpFormatter)
    p.add_argument("--batch", type=cli.integer(), default=128, help="rows per call")
    p.add_argument("--in-features", type=cli.integer(), default=128, help="input width")
    p.add_argument("--out", type=cli.integer(), nargs="+", default=[4096, 65536, 262144], help="output widths N")
    p.add_argument("--budget", type=cli.integer(), default=128, help="active neurons per row (A)")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=cli.integer(), default=None, help="torch threads (None: torch's choice)")
    p.add_argument("--min-run-time", type=cli.positive, default=1.0, help="seconds of timing per case")
    p.add_argument("--quick", action="store_true", help="short run: widths 4096 and 65536, 0.2 s per case")
    p.add_argument("--json", type=cli.output_path, help="'' for none",
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_layer.json"))
    args = p.parse_args(argv)
    cli.apply_quick(p, argv, args, {"out": [4096, 65536], "min_run_time": 0.2})
    if args.quick and not cli.given(p, argv, ["json"]):  # beside the committed results, not over them
        args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_layer_quick.json")
    if args.budget > min(args.out):
        p.error(f"--budget {args.budget} must be at most the narrowest --out width, {min(args.out)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device

    rows = []
    for n in args.out:
        rows.append(bench_width(n, args.batch, args.in_features, args.budget, device, args.min_run_time))
        print(f"done N={n}", flush=True)

    names = list(rows[0]["times_s"])
    print(f"\nB={args.batch}, in={args.in_features}, budget A={args.budget} per row, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; "
          "forward+backward medians (ms), "
          "x = ratio vs nn.Linear")
    header = "| case | " + " | ".join(f"N={r['out_features']}" for r in rows) + " |"
    print(header + "\n|---|" + "---:|" * len(rows))
    for name in names:
        cells = [f"{r['times_s'][name] * 1e3:.3f} ms ({r['ratio_vs_linear'][name]:.2f}x)" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")

    if not args.json:
        return
    meta = {"batch": args.batch, "in_features": args.in_features, "budget": args.budget, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "min_run_time_s": args.min_run_time,
            "quick": args.quick, "load_average_1min": os.getloadavg()[0]}
    cli.write_json(args.json, {"meta": meta, "results": rows}, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    cli.run(main)
