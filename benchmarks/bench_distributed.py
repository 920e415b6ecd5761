"""Bytes per step of lsh_torch.distributed.all_reduce_sparse_grads against a dense all-reduce of the
same head, on 2 gloo processes (CPU).

    python benchmarks/bench_distributed.py                       # 100,000 x 128 head, 256 rows per rank
    python benchmarks/bench_distributed.py --out-features 670091 --batch 128

Each rank trains an XMC-style head (LSHLinear(sparse_grad=True), the width's defaults: 2,048
active outputs per batch in forward_sparse) on its own random batch with one random label per
row; after each backward the touched rows are averaged over the ranks. Reported per step: the
bytes each rank contributes to the all-gathers (rows x (8 + row bytes), padded to the largest
count among the ranks), the dense gradients' bytes (out_features x (in_features + 1) x 4), and
the median wall time of the sparse all-reduce and of a dense all_reduce of the same size (noisy
on a shared machine).

Then step times at world size 1 and 2 for the same global batch (``2 x --batch`` rows): one
process with an LSHLinear head, against 2 processes (one thread each; the 1-process run gets
``--threads``, default 2, the same cores) with the head replicated (data parallel,
all_reduce_sparse_grads) or sharded (ShardedLSHLinear, half the rows and half the budget each).
A step is forward_sparse, the loss, backward, the exchange and a LazyAdam step; reported: the
median step time and the bytes each rank passes into collectives per step (all_gather and
all_reduce inputs, counted by wrapping torch.distributed's functions; the small size exchanges
included). Writes benchmarks/results/distributed.json (``--json``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_output_layer.py

import argparse
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lsh_torch import LazyAdam, LSHLinear, sparse_cross_entropy
from lsh_torch.distributed import ShardedLSHLinear, all_reduce_sparse_grads

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(rank: int, args, init: str, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    head = LSHLinear(args.hidden, args.out_features, sparse_grad=True)
    gen = torch.Generator().manual_seed(rank)
    sent, rows, sparse_s, dense_s = [], [], [], []
    dense = torch.zeros(args.out_features, args.hidden + 1)
    for step in range(args.steps):
        x = torch.randn(args.batch, args.hidden, generator=gen)
        y = torch.randint(args.out_features, (args.batch,), generator=gen)
        head.zero_grad()
        sparse_cross_entropy(head.forward_sparse(x, y), y).backward()
        rows.append(head.weight.grad.coalesce()._nnz())
        dist.barrier()
        start = time.perf_counter()
        sent.append(all_reduce_sparse_grads(head))
        sparse_s.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(dense)
        dense_s.append(time.perf_counter() - start)
    if rank == 0:
        queue.put({"out_features": args.out_features, "hidden": args.hidden, "batch_per_rank": args.batch,
                   "active": head.budget, "touched_rows_rank0": rows, "sparse_bytes_per_step": sent,
                   "dense_bytes_per_step": dense.nbytes, "sparse_ms_median": 1e3 * statistics.median(sparse_s[1:]),
                   "dense_ms_median": 1e3 * statistics.median(dense_s[1:])})
    dist.destroy_process_group()


class _CountBytes:
    """Counts the bytes of the tensors this process passes into all_gather / all_reduce."""

    def __init__(self):
        self.bytes = 0
        for name in ("all_gather", "all_reduce"):
            inner = getattr(dist, name)
            setattr(dist, name, self._counting(inner, name))

    def _counting(self, inner, name):
        def counted(*args, **kwargs):
            self.bytes += (args[1] if name == "all_gather" else args[0]).nbytes
            return inner(*args, **kwargs)
        return counted


def step_times(rank: int, world: int, layout: str, args, init: str, queue) -> None:
    """Median step time and bytes per step of one layout ("single", "replicated", "sharded")."""
    torch.set_num_threads(args.threads if world == 1 else 1)
    counter = None
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        counter = _CountBytes()
    torch.manual_seed(0)
    if layout == "sharded":
        head = ShardedLSHLinear(args.hidden, args.out_features, sparse_grad=True)
    else:
        head = LSHLinear(args.hidden, args.out_features, sparse_grad=True)
    opt = LazyAdam(head.parameters(), lr=1e-3)
    rows = 2 * args.batch // world
    gen = torch.Generator().manual_seed(rank)
    seconds, sent = [], []
    for step in range(args.steps):
        x = torch.randn(rows, args.hidden, generator=gen).requires_grad_()  # as from a trunk: its gradient travels
        y = torch.randint(args.out_features, (rows,), generator=gen)
        if counter is not None:
            dist.barrier()
            counter.bytes = 0
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sparse_cross_entropy(head.forward_sparse(x, y), y).backward()
        if layout == "replicated":
            all_reduce_sparse_grads(head)
        opt.step()
        seconds.append(time.perf_counter() - start)
        sent.append(counter.bytes if counter is not None else 0)
    if rank == 0:
        queue.put({"layout": layout, "world": world, "rows_per_rank": rows, "step_ms_median":
                   1e3 * statistics.median(seconds[2:]), "bytes_per_step_median": statistics.median(sent[2:])})
    if world > 1:
        dist.destroy_process_group()


def spawn(target, world: int, *args):
    """Runs ``target(rank, ...)`` on ``world`` spawned processes; what rank 0 puts in the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(rank, *args, f"file://{tmp}/init", queue)) for rank in range(world)]
        for p in procs:
            p.start()
        result = queue.get()
        for p in procs:
            p.join()
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-features", type=cli.integer(), default=100_000)
    parser.add_argument("--hidden", type=cli.integer(), default=128)
    parser.add_argument("--batch", type=cli.integer(), default=256, help="rows per rank")
    # A worker that fails leaves the parent waiting on its queue: the untimed first steps need others beside them.
    parser.add_argument("--steps", type=cli.integer(2), default=6, help="steps of the all-reduce run (1 untimed)")
    parser.add_argument("--step-steps", type=cli.integer(3), default=22, help="steps of each step-time run (2 untimed)")
    parser.add_argument("--threads", type=cli.integer(), default=2, help="torch threads of the 1-process step-time run")
    parser.add_argument("--json", type=cli.output_path, default=os.path.join(RESULTS, "distributed.json"),
                        help="JSON of the results ('' for none; default: the committed results' file)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = spawn(run, 2, args)
    sparse = statistics.median(result["sparse_bytes_per_step"])
    print(f"head {args.out_features} x {args.hidden}, {args.batch} rows per rank, active {result['active']}, 2 ranks")
    print(f"touched rows per step (rank 0): {result['touched_rows_rank0']}")
    print(f"bytes per rank per step: sparse {sparse / 1e6:.2f} MB, dense {result['dense_bytes_per_step'] / 1e6:.2f} MB "
          f"({result['dense_bytes_per_step'] / sparse:.0f}x)")
    print(f"median ms: sparse all-gather {result['sparse_ms_median']:.1f}, dense all-reduce {result['dense_ms_median']:.1f}"
          " (noisy: shared machine)")
    step_args = argparse.Namespace(**{**vars(args), "steps": args.step_steps})
    layouts = [spawn(step_times, world, world, layout, step_args)
               for world, layout in ((1, "single"), (2, "replicated"), (2, "sharded"))]
    print(f"\nstep time, global batch {2 * args.batch} (forward_sparse, loss, backward, exchange, LazyAdam):")
    print(f"{'layout':<12}{'world':>6}{'rows/rank':>10}{'step ms':>9}{'bytes/rank/step':>17}")
    for r in layouts:
        print(f"{r['layout']:<12}{r['world']:>6}{r['rows_per_rank']:>10}{r['step_ms_median']:>9.1f}"
              f"{r['bytes_per_step_median'] / 1e6:>14.3f} MB")
    print(f"(median of {args.step_steps - 2} steps; 1 process: {args.threads} threads, 2 processes: 1 thread each; "
          "noisy: shared machine)")
    result["step_times"] = layouts
    if args.json:
        cli.write_json(args.json, result)
        print(f"json: {args.json}")


if __name__ == "__main__":
    cli.run(main)
