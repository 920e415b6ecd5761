"""One training step of an extreme-classification output layer: LSHLinear vs dense vs sampled softmax.

    python benchmarks/bench_output_layer.py             # 100,000 and 670,091 outputs: a few minutes on 2 cores
    python benchmarks/bench_output_layer.py --quick     # 100,000 outputs only, fewer repeats
    python benchmarks/bench_output_layer.py --profile   # also: where the time of each sparse step goes

A step is forward, loss, backward and optimizer step for a batch of ``--batch`` hidden vectors
``h [B, 128]`` (requiring grad, as inside a network) with ``--labels-per-row`` labels each:

  dense          nn.Linear + full softmax (log_softmax, the target mass spread over the labels)
                 + torch.optim.Adam(fused=True)
  lsh shared     LSHLinear(mode="shared", sparse_grad=True).forward_sparse + sparse_cross_entropy
                 + torch.optim.SparseAdam; ``--active`` outputs per batch (labels first)
  lsh per_row    the same with mode="per_row", ``--active-per-row`` outputs per row
  sampled        hand-written pure-PyTorch sampled softmax: the batch's labels plus uniformly random
                 outputs, ``--active`` in all, shared by the batch (F.embedding(sparse=True) gathers
                 the rows) + SparseAdam: what the LSH shared step is with the hashing replaced by
                 torch.randint
  (``--optimizer lazyadam`` gives every sparse case lsh_torch.LazyAdam instead of SparseAdam)

All cases see the same inputs, are timed round-robin in one process (so load from other processes
hits them alike) and report the median; ratios are against the dense step of the same size. The
LSH steps are timed without rebuilds (``rebuild=None``); rebuilds are timed on their own: a full
one (every row hashed), and the incremental one that training runs under the default schedule
(every 10 steps, re-hashing the rows that the last 10 steps moved), whose cost divided by 10 is
added in "lsh + rebuild".
Memory: each case runs again in a fresh child process; "peak MB" is that process's peak resident
set (VmHWM) minus its resident set before the first step (inputs and weights allocated; the
optimizer state, created in the first step, counts in the peak), "state MB" the bytes of weights,
gradients and optimizer state after the steps.
Writes a table to stdout and JSON to ``benchmarks/results/output_layer[_quick].json``.
"""
from __future__ import annotations

import os

# Threads that wait for work by sleeping, not spinning: on a machine shared with other processes,
# spinning OpenMP threads make the small ops of a sparse step 10-100x slower (measured: the LSH
# step at 100,000 outputs, 2 threads on 2 busy cores, 706 ms spinning vs 47 ms passive). Set
# before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timing import REBUILD_PERIOD, full_rebuild_time, incremental_rebuild_time, profile_steps
from torch import Tensor, nn

import lsh_torch
from lsh_torch import LSHLinear, sparse_cross_entropy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402
from xmc import full_softmax_loss  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CASES = ("dense", "lsh shared", "lsh per_row", "sampled")
QUICK = {"sizes": [100_000], "repeats": 10, "dense_repeats": 3, "max_seconds": 30}  # what --quick sets


def make_inputs(n: int, batch: int, hidden: int, labels_per_row: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, hidden, generator=gen)
    labels = torch.randint(0, n, (batch, labels_per_row), generator=gen)
    return h, labels


class DenseStep:
    """nn.Linear, the full softmax's loss from log_softmax and the labels' entries, and a fused Adam: as fast as
    plain PyTorch goes here (a dense target and the for-loop Adam made the step 1.43x as long, a review's paired
    runs at 670,091 outputs)."""

    def __init__(self, n, hidden, h, labels, args):
        self.layer = nn.Linear(hidden, n)
        self.opt = torch.optim.Adam(self.layer.parameters(), lr=1e-3, fused=True)
        self.h, self.labels = h.clone().requires_grad_(), labels

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.h.grad = None
        full_softmax_loss(self.layer(self.h), self.labels).backward()
        self.opt.step()


class LSHStep:
    def __init__(self, n, hidden, h, labels, args, mode):
        budget = args.active if mode == "shared" else args.active_per_row
        self.layer = LSHLinear(hidden, n, active=budget, mode=mode, sparse_grad=True, rebuild=None,
                               num_tables=args.tables, bits=args.bits, probes=args.probes)
        self.opt = sparse_optimizer(args)(list(self.layer.parameters()), lr=1e-3)
        self.h, self.labels = h.clone().requires_grad_(), labels
        self.layer.rebuild()

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.h.grad = None
        out = self.layer.forward_sparse(self.h, self.labels)
        sparse_cross_entropy(out, self.labels).backward()
        self.opt.step()


class SampledStep:
    """Sampled softmax in plain PyTorch: the batch's labels + uniform random candidates, shared."""

    def __init__(self, n, hidden, h, labels, args):
        self.n, self.budget = n, args.active
        self.weight = nn.Parameter(nn.Linear(hidden, n).weight.detach())
        self.bias = nn.Parameter(torch.zeros(n, 1))
        self.opt = sparse_optimizer(args)([self.weight, self.bias], lr=1e-3)
        self.h, self.labels = h.clone().requires_grad_(), labels
        self.gen = torch.Generator().manual_seed(1)

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        self.h.grad = None
        positives = torch.unique(self.labels)
        # Uniform random fill; an accidental repeat of a label or a candidate is left in (rare, harmless
        # for timing), as in TF's sampled_softmax_loss without remove_accidental_hits.
        randoms = torch.randint(0, self.n, (self.budget - positives.numel(),), generator=self.gen)
        cand = torch.cat([positives, randoms])
        w = F.embedding(cand, self.weight, sparse=True)
        b = F.embedding(cand, self.bias, sparse=True).squeeze(1)
        logits = torch.addmm(b, self.h, w.t())
        hit = (self.labels.unsqueeze(2) == cand).any(1).float()
        loss = -(hit / hit.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss.backward()
        self.opt.step()


def sparse_optimizer(args):
    """torch.optim.SparseAdam (default) or lsh_torch.LazyAdam (the fused row-sparse Adam), for every sparse case."""
    if args.optimizer == "lazyadam":
        return lsh_torch.LazyAdam
    return torch.optim.SparseAdam


def make_case(name, n, args):
    h, labels = make_inputs(n, args.batch, args.hidden, args.labels_per_row)
    torch.manual_seed(0)
    if name == "dense":
        return DenseStep(n, args.hidden, h, labels, args)
    if name == "sampled":
        return SampledStep(n, args.hidden, h, labels, args)
    return LSHStep(n, args.hidden, h, labels, args, name.split()[1])


def state_bytes(case) -> int:
    """Bytes of parameters, their gradients and the optimizer state."""
    total = 0
    for group in case.opt.param_groups:
        for p in group["params"]:
            total += p.numel() * p.element_size()
            g = p.grad
            if g is not None:
                g = g.coalesce() if g.is_sparse else g
                total += (g.values() if g.is_sparse else g).numel() * g.element_size()
                if g.is_sparse:
                    total += g.indices().numel() * 8
            for v in case.opt.state.get(p, {}).values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
    return total


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def vm_hwm_mb() -> float:
    """Peak resident set of this process (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args) -> None:
    """Run in a fresh process: build one case, take a few steps, print its memory as JSON."""
    case = make_case(args.memory_case, args.memory_n, args)
    base = rss_mb()
    for _ in range(args.memory_steps):
        case()
    peak = vm_hwm_mb()
    print(json.dumps({"base_rss_mb": base, "peak_rss_mb": peak, "peak_delta_mb": peak - base,
                      "state_mb": state_bytes(case) / 2 ** 20}))


def measure_memory(name, n, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-case", name, "--_memory-n", str(n),
           "--batch", str(args.batch), "--hidden", str(args.hidden), "--labels-per-row", str(args.labels_per_row),
           "--active", str(args.active), "--active-per-row", str(args.active_per_row), "--tables", str(args.tables),
           "--bits", str(args.bits), "--probes", str(args.probes), "--threads", str(torch.get_num_threads()),
           "--optimizer", args.optimizer]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_case(name, case, steps: int = 5) -> str:
    case()
    averages, key = profile_steps(case, steps, f"## {name} step")
    return averages.table(sort_by=key, row_limit=18)


def bench_size(n: int, args) -> dict:
    cases = {name: make_case(name, n, args) for name in CASES}
    for case in cases.values():  # warm-up: first-use allocations, optimizer state
        case()
        case()
    times = {name: [] for name in cases}
    deadline = time.perf_counter() + args.max_seconds
    for rep in range(args.repeats):
        for name, case in cases.items():
            if name == "dense" and rep >= args.dense_repeats:
                continue
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
        if rep + 1 >= args.min_repeats and time.perf_counter() > deadline:
            break
    med = {name: statistics.median(t) for name, t in times.items()}
    full_s, rebuild_s, rehashed, settings = {}, {}, {}, {}
    for mode in ("shared", "per_row"):  # each layer with its own settings (per_row has more tables)
        case = cases[f"lsh {mode}"]
        tables = case.layer.tables
        settings[mode] = {"bits": tables.bits, "tables": tables.num_tables, "probes": tables.probes}
        full_s[mode] = full_rebuild_time(case.layer)
        inputs = case.h, case.labels

        def new_batch(seed, case=case):  # new batches, as in training: each step moves other rows
            h, case.labels = make_inputs(n, args.batch, args.hidden, args.labels_per_row, seed=seed)
            case.h = h.requires_grad_()
        rebuild_s[mode], rehashed[mode] = incremental_rebuild_time(case.layer, case, new_batch)
        case.h, case.labels = inputs
    result = {
        "out_features": n, "median_s": med, "samples": {k: len(v) for k, v in times.items()},
        "ratio_dense_over": {k: med["dense"] / v for k, v in med.items()},
        "ratio_over_sampled": {k: v / med["sampled"] for k, v in med.items()},
        "full_rebuild_s": full_s, "rebuild_period": REBUILD_PERIOD, "incremental_rebuild_s": rebuild_s,
        "rows_rehashed": rehashed,
        "lsh_shared_plus_rebuild_s": med["lsh shared"] + rebuild_s["shared"] / REBUILD_PERIOD,
        "lsh_per_row_plus_rebuild_s": med["lsh per_row"] + rebuild_s["per_row"] / REBUILD_PERIOD,
        "settings": settings,
    }
    if args.profile:
        result["profile"] = {name: profile_case(name, cases[name]) for name in ("lsh shared", "lsh per_row", "sampled")}
    del cases
    if not args.no_memory:
        result["memory"] = {name: measure_memory(name, n, args) for name in CASES}
    return result


def print_table(results: list[dict], args) -> None:
    head = (f"{'outputs':>9}  {'case':<22}{'median ms':>10}{'dense/x':>9}{'x/sampled':>10}{'peak MB':>9}"
            f"{'state MB':>9}{'n':>4}")
    print(head)
    print("-" * len(head))
    for r in results:
        n = r["out_features"]
        for name in CASES:
            mem = r.get("memory", {}).get(name, {})
            budget = {"lsh shared": f" (A={args.active})", "lsh per_row": f" (A={args.active_per_row}/row)",
                      "sampled": f" (A={args.active})"}.get(name, "")
            print(f"{n:>9,}  {name + budget:<22}{1e3 * r['median_s'][name]:>10.1f}{r['ratio_dense_over'][name]:>9.1f}"
                  f"{r['ratio_over_sampled'][name]:>10.2f}{mem.get('peak_delta_mb', float('nan')):>9.0f}"
                  f"{mem.get('state_mb', float('nan')):>9.0f}{r['samples'][name]:>4}")
        for mode in ("shared", "per_row"):
            t = r[f"lsh_{mode}_plus_rebuild_s"]
            print(f"{n:>9,}  {'lsh ' + mode + ' + rebuild':<22}{1e3 * t:>10.1f}{r['median_s']['dense'] / t:>9.1f}"
                  f"{t / r['median_s']['sampled']:>10.2f}")
        for mode, s in r["settings"].items():
            print(f"{'':>9}  rebuild, {mode} (K={s['bits']}, L={s['tables']}, P={s['probes']}): full "
                  f"{1e3 * r['full_rebuild_s'][mode]:.0f} ms; every {r['rebuild_period']} steps (default) re-hashing "
                  f"the rows moved since: {1e3 * r['incremental_rebuild_s'][mode]:.0f} ms "
                  f"({r['rows_rehashed'][mode]:,.0f} rows)")
    print("dense/x: how many times faster than the dense step; x/sampled: time relative to the random-candidate "
          "sampled softmax; peak MB: peak RSS growth over the steps in a fresh process; n: timed steps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.DefaultsHelpFormatter)
    p.add_argument("--sizes", type=cli.integers(), default="100000,670091", help="output sizes, comma-separated")
    p.add_argument("--batch", type=cli.integer(), default=128, help="rows per step")
    p.add_argument("--hidden", type=cli.integer(), default=128, help="input width of the output layer")
    p.add_argument("--labels-per-row", type=cli.integer(), default=5,
                   help="labels per row (Amazon-670K has 5.45 on average)")
    p.add_argument("--active", type=cli.integer(), default=2048, help="outputs per batch: lsh shared and sampled")
    p.add_argument("--active-per-row", type=cli.integer(), default=128, help="outputs per row: lsh per_row")
    p.add_argument("--tables", type=cli.auto_or(cli.integer()), default="auto",
                   help="L (default: LSHLinear's for the width)")
    p.add_argument("--bits", type=cli.auto_or(cli.integer()), default="auto", help="K, bits per table (auto: LSHLinear's for the width)")
    p.add_argument("--probes", type=cli.auto_or(cli.integer()), default="auto", help="buckets probed per table (auto: LSHLinear's)")
    p.add_argument("--repeats", type=cli.integer(), default=30, help="timed steps per sparse case")
    p.add_argument("--dense-repeats", type=cli.integer(), default=7, help="timed steps of the dense case")
    p.add_argument("--min-repeats", type=cli.integer(), default=5, help="timed steps per case even past --max-seconds")
    p.add_argument("--max-seconds", type=cli.positive, default=120, help="stop repeating after this long per size")
    p.add_argument("--threads", type=cli.integer(), default=None, help="torch threads (default: torch's)")
    p.add_argument("--optimizer", default="sparseadam", choices=["sparseadam", "lazyadam"],
                   help="optimizer of the sparse cases: torch.optim.SparseAdam or lsh_torch.LazyAdam")
    p.add_argument("--quick", action="store_true",
                   help="100,000 outputs only, fewer repeats (10, dense 3) and 30 seconds at most")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables of the sparse steps")
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurement")
    p.add_argument("--out", type=cli.results_path, default=None,
                   help="JSON path (default benchmarks/results/output_layer[_quick].json)")
    p.add_argument("--_memory-case", dest="memory_case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--_memory-n", dest="memory_n", type=cli.integer(), help=argparse.SUPPRESS)
    p.add_argument("--_memory-steps", dest="memory_steps", type=cli.integer(), default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cli.apply_quick(p, argv, args, QUICK)
    if args.dense_repeats > args.repeats:  # --repeats bounds every case's timed steps
        if cli.given(p, argv, ["dense_repeats"]):
            p.error(f"--dense-repeats {args.dense_repeats}: above --repeats {args.repeats}, which bounds every case")
        args.dense_repeats = args.repeats  # the default's 7 under a smaller --repeats
    # Every label of a batch is in its active set (and the timed rebuilds draw new batches): room for them all.
    if args.active < args.batch * args.labels_per_row:
        p.error(f"--active {args.active}: below the up to --batch x --labels-per-row = "
                f"{args.batch * args.labels_per_row} distinct labels of a batch")
    if args.active_per_row < args.labels_per_row:
        p.error(f"--active-per-row {args.active_per_row}: below --labels-per-row {args.labels_per_row}")
    # Every width holds the active sets: a smaller one failed at its turn, the earlier widths' results lost.
    smallest = args.memory_n if args.memory_case else min(args.sizes)  # a memory child measures its one width
    for option, active in (("--active", args.active), ("--active-per-row", args.active_per_row)):
        if smallest < active:
            p.error(f"--sizes {smallest}: below {option} {active} (the active outputs must fit in the layer)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        memory_child(args)
        return
    sizes = args.sizes
    print(f"sparse cases use {sparse_optimizer(args).__name__}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
          f"{platform.processor() or platform.machine()}; "
          f"batch {args.batch}, hidden {args.hidden}, {args.labels_per_row} labels per row")
    results = []
    for n in sizes:
        start = time.perf_counter()
        results.append(bench_size(n, args))
        print(f"  {n:,} outputs: {time.perf_counter() - start:.0f}s", flush=True)
    print()
    print_table(results, args)
    for r in results:
        for name, table in r.get("profile", {}).items():
            print(f"\nprofile, {r['out_features']:,} outputs, {name} (5 steps):\n{table}")
    out = args.out or os.path.join(RESULTS, "output_layer_quick.json" if args.quick else "output_layer.json")
    cli.write_json(out, {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "lsh_torch": lsh_torch.__version__,
                         "args": {k: v for k, v in vars(args).items() if not k.startswith("memory")},
                         "results": results})
    print(f"\njson: {out}")


if __name__ == "__main__":
    cli.run(main)
