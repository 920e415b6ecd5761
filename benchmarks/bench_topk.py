"""Top-k inference over a huge output layer: LSHLinear.topk (LSH candidates, rescored exactly) vs
nn.Linear + torch.topk, in speed and in recall of the exact top-k.

    python benchmarks/bench_topk.py                 # 670,091 outputs, 1,024 queries: about 2 minutes on 2 cores
    python benchmarks/bench_topk.py --sizes 100000  # other sizes, comma-separated

Three kinds of queries and rows (hidden 128):

  random     rows and queries from N(0, 1): no structure, the hardest case for any hashing (the
             best row's cosine with the query is about 0.4)
  planted    the same rows; each query is a random row plus noise (cosine about 0.7 with it): the
             confident case of a trained classifier, where one output clearly wins
  clustered  rows around 1,000 cluster centres (centre + 0.5 x noise, as classes that share
             structure), queries a random row plus noise: near neighbours crowd every query

Recall@k: the fraction of the exact top k found in the LSH top k (ties aside, 1.0 is perfect). The
layer has LSHLinear's defaults for the width; each query probes ``--probes`` buckets per table and
rescores ``--budgets`` candidates (lists; "default" is what ``topk(x, k)`` does). ``--model PATH``
adds a trained head: ``python examples/xmc.py --labels 670091 --runs lsh --save-head PATH`` saves
one (670,091 labels, its test points' hidden vectors as queries). Every variant is timed in turn
with the dense top-k in one process (medians), so a busy spell on a shared machine slows them
alike. Writes a table and ``benchmarks/results/topk.json``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_output_layer.py

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lsh_torch import LSHLinear

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return (found.unsqueeze(2) == exact.unsqueeze(1)).any(1).float().mean().item()


def interleaved_medians(fns: list, reps: int) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn ``reps`` times after one untimed round:
    on a shared machine a slow spell then slows every variant alike, not the one timed during it."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for spent, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(layer: LSHLinear, x: torch.Tensor, kind: str, args, build_s: float) -> list[dict]:
    """Exact and LSH top-k of ``x`` (every --probes x --budgets variant), timed interleaved."""
    n = layer.out_features
    exact = layer.topk(x, args.k, exact=True)[1]
    variants = [(None if p == "default" else int(p), None if a == "default" else int(a))
                for p in args.probes.split(",") for a in args.budgets.split(",")]
    fns = [lambda: F.linear(x, layer.weight, layer.bias).topk(args.k, dim=1)]
    fns += [lambda p=p, a=a: layer.topk(x, args.k, probes=p, budget=a) for p, a in variants]
    exact_s, *lsh_s = interleaved_medians(fns, args.repeats)
    rows = []
    for (probes, budget), seconds in zip(variants, lsh_s):
        found = layer.topk(x, args.k, probes=probes, budget=budget)[1]
        rows.append({"out_features": n, "queries": kind, "k": args.k, "active": layer.budget,
                     "budget": budget or layer.topk_budget, "bits": layer.tables.bits,
                     "tables": layer.tables.num_tables, "probes": probes or layer.inference_probes,
                     "exact_ms": 1e3 * exact_s, "lsh_ms": 1e3 * seconds, "speedup": exact_s / seconds,
                     "recall_at_k": recall(found, exact), "top1_found": recall(found[:, :1], exact[:, :1]),
                     "build_s": build_s})
    return rows


def bench(n: int, args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    layer = LSHLinear(args.hidden, n, rebuild=None, num_tables=args.tables)
    layer.eval()
    rows = []
    for kind in ("random", "planted", "clustered"):
        if kind != "planted":  # planted queries use the random rows (drawn even when skipped: same data)
            with torch.no_grad():
                if kind == "random":
                    layer.weight.copy_(torch.randn(n, args.hidden, generator=gen))
                else:
                    centres = torch.randn(1000, args.hidden, generator=gen)
                    which = torch.randint(0, 1000, (n,), generator=gen)
                    layer.weight.copy_(centres[which] + 0.5 * torch.randn(n, args.hidden, generator=gen))
                layer.bias.zero_()
        if kind not in args.kinds.split(","):
            continue
        if kind != "planted" or "random" not in args.kinds.split(","):
            start = time.perf_counter()
            layer.rebuild()
            build_s = time.perf_counter() - start
        if kind == "random":
            x = torch.randn(args.queries, args.hidden, generator=gen)
        else:
            picked = layer.weight.detach()[torch.randint(0, n, (args.queries,), generator=gen)]
            x = picked + torch.randn(picked.shape, generator=gen)
        rows += measure(layer, x, kind, args, build_s)
    return rows


def bench_model(path: str, args) -> list[dict]:
    """The trained output layer and test hidden vectors that ``examples/xmc.py --save-head`` saved."""
    saved = torch.load(path)
    n, d = saved["state_dict"]["weight"].shape
    layer = LSHLinear(d, n, rebuild=None, **saved["config"])
    layer.load_state_dict(saved["state_dict"])
    layer.eval()
    x = saved["hidden"][: args.queries].contiguous()
    start = time.perf_counter()
    layer.rebuild()
    return measure(layer, x, "xmc", args, time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="670091")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tables", type=lambda v: v if v == "auto" else int(v), default="auto",
                   help="L of the synthetic layers (default: LSHLinear's)")
    p.add_argument("--probes", default="2,default,64", help="buckets probed per table, comma-separated")
    p.add_argument("--budgets", default="default", help="candidates rescored per query (topk's budget), comma-separated")
    p.add_argument("--kinds", default="random,planted,clustered", help="rows and queries to measure, comma-separated")
    p.add_argument("--model", metavar="PATH",
                   help="also measure a trained output layer saved by examples/xmc.py --save-head PATH")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS, "topk.json"))
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.queries} queries, hidden {args.hidden}, "
          f"k={args.k}")
    results = [r for n in args.sizes.split(",") if n for r in bench(int(n), args)]
    if args.model:
        results += bench_model(args.model, args)
    head = (f"{'outputs':>9}  {'queries':<10}{'K':>3}{'L':>4}{'P':>4}{'A':>6}{'exact ms':>10}{'LSH ms':>9}{'speedup':>9}"
            f"{'recall@k':>10}{'top-1 found':>13}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['out_features']:>9,}  {r['queries']:<10}{r['bits']:>3}{r['tables']:>4}{r['probes']:>4}{r['budget']:>6}"
              f"{r['exact_ms']:>10.1f}{r['lsh_ms']:>9.1f}{r['speedup']:>8.1f}x{r['recall_at_k']:>10.3f}"
              f"{r['top1_found']:>13.3f}")
    print("exact: F.linear + torch.topk over every output; LSH: LSHLinear.topk(x, k) (candidates from the tables, "
          "rescored exactly); recall@k: share of the exact top k in the LSH top k")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
