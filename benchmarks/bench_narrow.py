"""A narrow softmax head with LSHLinear's defaults against nn.Linear: step time and accuracy.

    python benchmarks/bench_narrow.py --before             # 1,000 / 4,096 / 8,192 / 16,384 outputs, 3 seeds: ~8 min on 2 cores
    python benchmarks/bench_narrow.py --sizes 1000 --seeds 0 --out ''   # the table only: narrow.json is the full run's

What a user gets who writes ``LSHLinear(128, N, sparse_grad=True)`` for a classifier's output
layer, trains it with ``forward_sparse`` + ``sparse_cross_entropy`` + ``lsh_torch.LazyAdam`` and
touches nothing else, next to ``nn.Linear`` + ``F.cross_entropy`` + ``torch.optim.Adam``: the same
two-layer network (a 128-unit ReLU trunk under the head, on Adam in both), the same batches
(``--batch``, one label each), ``--steps`` steps, then accuracy and the full softmax's
cross-entropy on held-out points. Data: ``N`` class centres in 128 dimensions, points at
``1.5`` x unit noise around them. Up to 8,192 outputs the defaults compute every output in
``forward_sparse`` (``LSHLinear.exact_softmax``), above they take 2,048; ``--before`` adds the
sparse set of the former defaults (``active=0.25`` below 8,192 outputs, 2,048 from there: half of
them the corrected tail). Steps
are timed in turns (one step of each case in turn), medians; the cases share no state.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_output_layer.py

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lsh_torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HIDDEN = 128


class Case:
    """One network (trunk + head) and its optimizers; ``step`` trains one batch."""

    def __init__(self, kind: str, n: int, seed: int, lr: float):
        torch.manual_seed(seed)
        self.kind = kind
        self.trunk = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU())
        if kind == "dense":
            self.head = torch.nn.Linear(HIDDEN, n)
            self.opts = [torch.optim.Adam([*self.trunk.parameters(), *self.head.parameters()], lr=lr, fused=True)]
        else:
            options = {"active": 0.25 if n < 8192 else 2048} if kind == "before" else {}
            self.head = lsh_torch.LSHLinear(HIDDEN, n, sparse_grad=True, seed=seed, **options)
            self.opts = [torch.optim.Adam(self.trunk.parameters(), lr=lr, fused=True),
                         lsh_torch.LazyAdam(self.head.parameters(), lr=lr)]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        h = self.trunk(x)
        if self.kind == "dense":
            loss = F.cross_entropy(self.head(h), y)
        else:
            loss = lsh_torch.sparse_cross_entropy(self.head.forward_sparse(h, y), y)
        loss.backward()
        for opt in self.opts:
            opt.step()
            opt.zero_grad()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        self.head.eval()
        logits = self.head(self.trunk(x))  # LSHLinear in eval: every output, exact
        self.head.train()
        return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def run(n: int, seed: int, args) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, HIDDEN, generator=gen)

    def points(count):
        y = torch.randint(0, n, (count,), generator=gen)
        return centres[y] + 1.5 * torch.randn(count, HIDDEN, generator=gen), y

    test_x, test_y = points(args.test_points)
    kinds = ["dense", "lsh"] + (["before"] if args.before else [])
    cases = [Case(kind, n, seed, args.lr) for kind in kinds]
    times = [[] for _ in cases]
    for step in range(args.steps):
        x, y = points(args.batch)
        for i in (step + j for j in range(len(cases))):  # who goes first rotates
            i %= len(cases)
            start = time.perf_counter()
            cases[i].step(x, y)
            times[i].append(time.perf_counter() - start)
    rows = []
    for case, spent in zip(cases, times):
        accuracy, loss = case.evaluate(test_x, test_y)
        head = case.head
        rows.append({"out_features": n, "seed": seed, "kind": case.kind, "steps": args.steps,
                     "ms_per_step": 1e3 * statistics.median(spent[args.steps // 10:]), "accuracy": accuracy,
                     "held_out_loss": loss,
                     "outputs_per_step": n if case.kind == "dense" or head.exact_softmax else head.budget})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=cli.integers(), default="1000,4096,8192,16384", help="output sizes, comma-separated")
    p.add_argument("--seeds", type=cli.integers(0), default="0,1,2")
    p.add_argument("--steps", type=cli.integer(), default=600)
    p.add_argument("--batch", type=cli.integer(), default=128)
    p.add_argument("--test-points", type=cli.integer(), default=10_000)
    p.add_argument("--lr", type=cli.positive, default=1e-3)
    p.add_argument("--before", action="store_true", help="also the former defaults' sparse set (a quarter below 8,192 outputs, 2,048 from there)")
    p.add_argument("--out", type=cli.output_path, default=os.path.join(RESULTS, "narrow.json"), help="'' for none")
    args = p.parse_args(argv)
    cli.distinct(p, "--seeds", args.seeds)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, {args.steps} steps, "
          f"seeds {args.seeds}")
    results = []
    for n in args.sizes:
        for seed in args.seeds:
            results += run(n, seed, args)
            print(f"  {n:,} outputs, seed {seed}: done", flush=True)
    head = f"{'outputs':>8}  {'head':<40}{'per step':>9}{'ms/step':>16}{'vs dense':>10}{'accuracy':>16}{'held-out loss':>16}"
    print(head)
    print("-" * len(head))
    names = {"dense": "nn.Linear + Adam", "lsh": "LSHLinear defaults + LazyAdam", "before": "the former defaults' sparse set"}
    for n in args.sizes:
        dense_ms = statistics.mean(r["ms_per_step"] for r in results if r["out_features"] == n and r["kind"] == "dense")
        for kind in names:
            rows = [r for r in results if r["out_features"] == n and r["kind"] == kind]
            if not rows:
                continue
            cell = lambda key, digits: (f"{statistics.mean(r[key] for r in rows):.{digits}f}"
                                        + (f" ± {statistics.stdev(r[key] for r in rows):.{digits}f}" if len(rows) > 1 else ""))
            ms = statistics.mean(r["ms_per_step"] for r in rows)
            print(f"{n:>8,}  {names[kind]:<40}{rows[0]['outputs_per_step']:>9,}{cell('ms_per_step', 2):>16}"
                  f"{ms / dense_ms:>9.2f}x{cell('accuracy', 3):>16}{cell('held_out_loss', 3):>16}")
    print("mean ± std over seeds; per step: outputs computed per training step; accuracy and loss on held-out points, "
          "every output computed")
    if args.out:
        cli.write_json(args.out, {"args": vars(args), "threads": torch.get_num_threads(), "results": results})
        print(f"json: {args.out}")


if __name__ == "__main__":
    cli.run(main)
