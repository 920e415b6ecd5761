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
on a shared machine). Writes benchmarks/results/distributed.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_output_layer.py

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lsh_torch import LSHLinear, sparse_cross_entropy
from lsh_torch.distributed import all_reduce_sparse_grads

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-features", type=int, default=100_000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="rows per rank")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=run, args=(rank, args, f"file://{tmp}/init", queue)) for rank in range(2)]
        for p in procs:
            p.start()
        result = queue.get()
        for p in procs:
            p.join()
    sparse = statistics.median(result["sparse_bytes_per_step"])
    print(f"head {args.out_features} x {args.hidden}, {args.batch} rows per rank, active {result['active']}, 2 ranks")
    print(f"touched rows per step (rank 0): {result['touched_rows_rank0']}")
    print(f"bytes per rank per step: sparse {sparse / 1e6:.2f} MB, dense {result['dense_bytes_per_step'] / 1e6:.2f} MB "
          f"({result['dense_bytes_per_step'] / sparse:.0f}x)")
    print(f"median ms: sparse all-gather {result['sparse_ms_median']:.1f}, dense all-reduce {result['dense_ms_median']:.1f}"
          " (noisy: shared machine)")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "distributed.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
