"""Top-k inference over a huge output layer: LSHLinear.topk (LSH candidates, rescored exactly) vs
nn.Linear + torch.topk, in speed and in recall of the exact top-k.

    python benchmarks/bench_topk.py                 # 670,091 outputs, 1,024 queries: about 2 minutes on 2 cores
    python benchmarks/bench_topk.py --sizes 100000 --out benchmarks/results/topk_100k.json  # other sizes

Three kinds of queries and rows (hidden 128):

  random     rows and queries from N(0, 1): no structure, the hardest case for any hashing (the
             best row's cosine with the query is about 0.4)
  planted    the same rows; each query is a random row plus noise (cosine about 0.7 with it): the
             confident case of a trained classifier, where one output clearly wins
  clustered  rows around 1,000 cluster centres (centre + 0.5 x noise, as classes that share
             structure), queries a random row plus noise: near neighbours crowd every query

Recall@k: the fraction of the exact top k found in the LSH top k (ties aside, 1.0 is perfect). The
layer has LSHLinear's defaults for the width. topk searches an index of its own
(``lsh_torch.retrieval``): ``--index-tables`` tables of ``--index-bits`` bits (lists; each pair is
built once, its build time reported), probed ``--probes`` buckets per table, ``--budgets``
candidates rescored per query, and the ``--norm-rows`` largest-norm rows scored for every query
(lists; "default" is what ``topk(x, k)`` does). topk checks each index on 64 of its first queries;
if it found less than ``--min-recall`` of their exact top k, topk answers from the likeliest rows
alone (checked on 64 others; with the default ``--norm-rows``) or exactly (``0``: the index's own
answers, for sweeps of the index itself); the untimed first round does that check, and the table
says what was measured and who answered. ``--model PATH``
adds a trained head: ``python examples/xmc.py --labels 670091 --runs lsh --save-head PATH`` saves
one (670,091 labels, its test points' hidden vectors as queries). Every variant is timed in turn
with the dense top-k in one process (medians), so a busy spell on a shared machine slows them
alike. Writes a table and ``benchmarks/results/topk_run.json`` (``--out``; ``topk.json`` beside it
collects the runs docs/results.md cites, by hand).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_output_layer.py

import argparse
import pickle
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lsh_torch import LSHLinear, hashing
from lsh_torch.retrieval import TOPK_MIN_RECALL, topk_settings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402

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


def options(low: int = 1):
    """Comma-separated ints of at least ``low`` or "default" (topk's own): a list, None for default."""
    one = cli.integer(low)
    return cli.listing(lambda text: None if text == "default" else one(text), "ints or default")


def measure(layer: LSHLinear, x: torch.Tensor, kind: str, args) -> list[dict]:
    """Exact and LSH top-k of ``x``: for each index (--index-tables x --index-bits), the dense top-k
    and every --probes x --budgets x --norm-rows variant, timed interleaved."""
    n = layer.out_features
    exact = layer.topk(x, args.k, exact=True)[1]
    rows = []
    for tables in args.index_tables:
        for bits in args.index_bits:
            layer.topk_tables = tables or topk_settings(n)["num_tables"]
            layer.topk_bits = bits or topk_settings(n)["bits"]
            # An index of its own: planted queries keep the random rows, whose index (build time, recall
            # checks) was reused.
            layer._topk_index = None
            start = time.perf_counter()
            layer.topk(x[:1], 1)  # builds the index
            build_s = time.perf_counter() - start
            variants = [(p, a, h) for p in args.probes for a in args.budgets for h in args.norm_rows]
            fns = [lambda: F.linear(x, layer.weight, layer.bias).topk(args.k, dim=1)]
            fns += [lambda p=p, a=a, h=h: layer.topk(x, args.k, probes=p, budget=a, norm_rows=h,
                                                     min_recall=args.min_recall)
                    for p, a, h in variants]
            exact_s, *lsh_s = interleaved_medians(fns, args.repeats)
            for (probes, budget, norm_rows), seconds in zip(variants, lsh_s):
                found = layer.topk(x, args.k, probes=probes, budget=budget, norm_rows=norm_rows,
                                   min_recall=args.min_recall)[1]
                row = {"out_features": n, "queries": kind, "num_queries": x.shape[0], "k": args.k,
                       "budget": budget or layer.topk_budget,
                       "bits": layer.topk_bits, "tables": layer.topk_tables, "probes": probes or layer.inference_probes,
                       "norm_rows": layer.topk_norm_rows if norm_rows is None else norm_rows}
                check = layer.topk_checks.get((args.k, row["probes"], row["budget"], row["norm_rows"]))
                checked = check.recall if check is not None and check.done else None
                index = layer._topk_index  # None where the candidates are every output: topk is exact, no index
                answering = layer.topk_answered_by(args.k, row["probes"], row["budget"], norm_rows, args.min_recall)
                alone = answering is not None and answering[2] == 0  # topk's stand-in for a failed index
                row.update({"exact_ms": 1e3 * exact_s, "lsh_ms": 1e3 * seconds, "speedup": exact_s / seconds,
                            "recall_at_k": recall(found, exact), "top1_found": recall(found[:, :1], exact[:, :1]),
                            "checked_recall": checked, "min_recall": args.min_recall,
                            "answers": "exact" if answering is None else f"{answering[3]} alone" if alone else "index",
                            "alone_recall": layer.topk_checks[answering].recall if alone else None,
                            "build_s": build_s, "index_mb": 0.0 if index is None else index.nbytes() / 2 ** 20})
                rows.append(row)
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
        if kind not in args.kinds:
            continue
        if kind == "random":
            x = torch.randn(args.queries, args.hidden, generator=gen)
        else:
            picked = layer.weight.detach()[torch.randint(0, n, (args.queries,), generator=gen)]
            x = picked + torch.randn(picked.shape, generator=gen)
        rows += measure(layer, x, kind, args)
    return rows


def load_head(path: str, args) -> dict:
    """What ``examples/xmc.py --save-head`` saved, memory-mapped, checked against ``--k`` and
    ``--norm-rows`` before the synthetic sizes run."""
    try:
        saved = torch.load(path, mmap=True)
        n, count = saved["state_dict"]["weight"].shape[0], len(saved["hidden"])
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as error:
        cli.fail(f"--model {path}: cannot read a head saved by examples/xmc.py --save-head from it: {error}")
    too_large = beyond(args, n)
    if too_large:
        cli.fail(f"{too_large} --model {path}")
    if count < args.queries:
        print(f"--model {path}: {count:,} saved hidden vectors, all measured (--queries {args.queries})")
    return saved


def bench_model(saved: dict, args) -> list[dict]:
    """The trained output layer and test hidden vectors that ``examples/xmc.py --save-head`` saved."""
    n, d = saved["state_dict"]["weight"].shape
    config = dict(saved["config"])
    if saved.get("hash_bin_size"):  # a DWTA head's family, its bin size saved beside the config
        config["hash"] = hashing.DWTA(saved["hash_bin_size"])
    layer = LSHLinear(d, n, rebuild=None, **config)
    layer.load_state_dict(saved["state_dict"])
    layer.eval()
    x = saved["hidden"][: args.queries].contiguous()
    return measure(layer, x, "xmc", args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.DefaultsHelpFormatter)
    p.add_argument("--sizes", type=cli.integers(), default="670091", help="output widths of the synthetic layers, comma-separated")
    p.add_argument("--hidden", type=cli.integer(), default=128, help="input width of the synthetic layers")
    p.add_argument("--queries", type=cli.integer(), default=1024, help="query rows per measurement")
    p.add_argument("--k", type=cli.integer(), default=5, help="topk's k")
    p.add_argument("--tables", type=cli.auto_or(cli.integer()), default="auto",
                   help="L of the synthetic layers' training tables (default: LSHLinear's; topk does not use them)")
    p.add_argument("--index-tables", type=options(), default="default", help="tables of topk's index, comma-separated")
    p.add_argument("--index-bits", type=options(), default="default",
                   help="bits per table of topk's index, comma-separated")
    p.add_argument("--probes", type=options(), default="default", help="buckets probed per table, comma-separated")
    p.add_argument("--norm-rows", type=options(0), default="default",
                   help="largest-norm rows scored for every query, comma-separated")
    p.add_argument("--budgets", type=options(), default="default",
                   help="candidates rescored per query (topk's budget), comma-separated")
    p.add_argument("--kinds", type=cli.listing(cli.choice("random", "planted", "clustered"), "kinds"),
                   default="random,planted,clustered", help="rows and queries to measure, comma-separated")
    p.add_argument("--model", metavar="PATH",
                   help="also measure a trained output layer saved by examples/xmc.py --save-head PATH")
    p.add_argument("--min-recall", type=cli.real(0, 1), default=TOPK_MIN_RECALL,
                   help="topk's min_recall: below it on the last 64 checked queries topk answers from a stand-in or exactly "
                        "(0: never)")
    p.add_argument("--repeats", type=cli.integer(), default=3, help="timed calls per case (their median)")
    p.add_argument("--out", type=cli.output_path, default=os.path.join(RESULTS, "topk_run.json"), help="JSON path ('' for none)")
    args = p.parse_args(argv)
    too_large = beyond(args, min(args.sizes))
    if too_large:
        p.error(f"{too_large} the smallest of --sizes")
    low = [budget for budget in args.budgets if budget is not None and budget < args.k]
    if low:
        p.error(f"--budgets {low[0]}: below --k {args.k} (the top k is chosen from the budget's candidates)")
    return args


def beyond(args, n: int) -> str | None:
    """The start of an error message if --k or a --norm-rows is above ``n`` outputs, else None."""
    rows = max((rows for rows in args.norm_rows if rows is not None), default=0)
    for option, value in (("--k", args.k), ("--norm-rows", rows)):
        if value > n:
            return f"{option} {value}: above the {n:,} outputs of"
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    saved = load_head(args.model, args) if args.model else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.queries} queries, hidden {args.hidden}, "
          f"k={args.k}")
    results = [r for n in args.sizes for r in bench(n, args)]
    if saved is not None:
        results += bench_model(saved, args)
    head = (f"{'outputs':>9}  {'queries':<10}{'K':>3}{'L':>4}{'P':>4}{'A':>6}{'norm':>7}{'exact ms':>10}{'LSH ms':>9}"
            f"{'speedup':>9}{'recall@k':>10}{'top-1 found':>13}{'checked':>9}{'answers':>13}{'build s':>9}{'index MB':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['out_features']:>9,}  {r['queries']:<10}{r['bits']:>3}{r['tables']:>4}{r['probes']:>4}{r['budget']:>6}"
              f"{r['norm_rows']:>7}{r['exact_ms']:>10.1f}{r['lsh_ms']:>9.1f}{r['speedup']:>8.1f}x"
              f"{r['recall_at_k']:>10.3f}"
              f"{r['top1_found']:>13.3f}{'-' if r['checked_recall'] is None else format(r['checked_recall'], '.3f'):>9}"
              f"{r['answers']:>13}{r['build_s']:>9.1f}{r['index_mb']:>10.1f}")
    print("exact: F.linear + torch.topk over every output; LSH: LSHLinear.topk(x, k) (A candidates from topk's own L "
          "tables of K bits, P probes each, and the `norm` largest-norm rows, rescored exactly); recall@k: share of "
          "the exact top k in the LSH top k; checked: the index's recall on the last 64 queries topk checked it on, "
          f"answers: who answered after that (below min_recall={args.min_recall}: `n alone`, the n likeliest rows "
          "alone (by an estimate of their output for the checked queries), checked on the next 64 (alone_recall in the JSON), or exact); build s, index MB: topk's index")
    if args.out:
        cli.write_json(args.out, {"args": vars(args), "results": results})
        print(f"json: {args.out}")


if __name__ == "__main__":
    cli.run(main)
