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
layer has LSHLinear's defaults for the width; each query probes ``--probes`` buckets per table
(a list; "default" is what ``topk(x, k)`` does); the candidate budget per query is the layer's
budget. Writes a table and ``benchmarks/results/topk.json``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_output_layer.py

import argparse
import json
import time

import torch
import torch.nn.functional as F
from timing import median_time

from lsh_torch import LSHLinear

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return (found.unsqueeze(2) == exact.unsqueeze(1)).any(1).float().mean().item()


def bench(n: int, args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    layer = LSHLinear(args.hidden, n, rebuild=None)
    layer.eval()
    rows = []
    for kind in ("random", "planted", "clustered"):
        if kind != "planted":  # planted queries use the random rows
            with torch.no_grad():
                if kind == "random":
                    layer.weight.copy_(torch.randn(n, args.hidden, generator=gen))
                else:
                    centres = torch.randn(1000, args.hidden, generator=gen)
                    which = torch.randint(0, 1000, (n,), generator=gen)
                    layer.weight.copy_(centres[which] + 0.5 * torch.randn(n, args.hidden, generator=gen))
                layer.bias.zero_()
            start = time.perf_counter()
            layer.rebuild()
            build_s = time.perf_counter() - start
        if kind == "random":
            x = torch.randn(args.queries, args.hidden, generator=gen)
        else:
            picked = layer.weight.detach()[torch.randint(0, n, (args.queries,), generator=gen)]
            x = picked + torch.randn(picked.shape, generator=gen)
        exact_s = median_time(lambda: F.linear(x, layer.weight, layer.bias).topk(args.k, dim=1), args.repeats)
        exact = layer.topk(x, args.k, exact=True)[1]
        for probes in (None if p == "default" else int(p) for p in args.probes.split(",")):
            lsh_s = median_time(lambda: layer.topk(x, args.k, probes=probes), args.repeats)
            found = layer.topk(x, args.k, probes=probes)[1]
            rows.append({"out_features": n, "queries": kind, "k": args.k, "active": layer.budget,
                         "bits": layer.tables.bits, "tables": layer.tables.num_tables,
                         "probes": probes or layer.inference_probes,
                         "exact_ms": 1e3 * exact_s, "lsh_ms": 1e3 * lsh_s, "speedup": exact_s / lsh_s,
                         "recall_at_k": recall(found, exact), "top1_found": recall(found[:, :1], exact[:, :1]),
                         "build_s": build_s})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="670091")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--probes", default="2,default,64", help="buckets probed per table, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS, "topk.json"))
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.queries} queries, hidden {args.hidden}, "
          f"k={args.k}")
    results = [r for n in args.sizes.split(",") for r in bench(int(n), args)]
    head = (f"{'outputs':>9}  {'queries':<8}{'K':>3}{'L':>4}{'P':>3}{'exact ms':>10}{'LSH ms':>9}{'speedup':>9}"
            f"{'recall@k':>10}{'top-1 found':>13}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['out_features']:>9,}  {r['queries']:<8}{r['bits']:>3}{r['tables']:>4}{r['probes']:>3}"
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
