"""Does retrieval limit the XMC demo? Its hashed top set against an exact one (the oracle: perfect
retrieval) and the uniform set, each with the corrected tail, on the demo's data and settings.

    python benchmarks/bench_xmc_recall.py                       # 10 epochs, seeds 0-2 (about 10 min)
    python benchmarks/bench_xmc_recall.py --epochs 5 --seeds 0 --structure tree
    python benchmarks/bench_xmc_recall.py --epochs 5 --structure tree --near-labels 0   # siblings never co-labels
    python benchmarks/bench_xmc_recall.py --epochs 5 --mode per_row   # no other point's labels in a row's set
    python benchmarks/bench_xmc_recall.py --epochs 5 --mode per_row --sets hashed --demo-args="--probes 8 --rescore 16"

Every quarter epoch: P@1 on the demo's eval subset (1,000 test points) and the recall of the exact
top ``--k`` outputs of 256 of them by the set a training step would draw for them, shared or, with
``--mode per_row``, per row (``lsh_torch.diagnostics.active_set_recall``: labels, top set, tail).
The oracle's pool is the exact best outputs (``bench_estimator.exact_top_set``: dense logits, every
row of the batch scoring the top set); its steps cost a dense layer's, so the curves are against
epochs, not time (the demo and ``bench_estimator.py`` compare hashed and uniform at equal time).
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import bench_estimator  # noqa: E402
import cli  # noqa: E402
import xmc  # noqa: E402
import xmc_data  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lsh_torch.diagnostics import active_set_recall  # noqa: E402

SETS = {"hashed": "lsh", "oracle": "lsh", "uniform": "random"}  # -> the demo's run kind


def train(name: str, seed: int, args) -> list[dict]:
    """One run of the demo's head (shared or per-row sets): a row per quarter epoch (epoch, P@1, recall, mass recall)."""
    demo = xmc.parse_args(["--epochs", str(args.epochs), "--seed", str(seed), "--structure", args.structure,
                           "--labels", str(args.labels), "--train-points", str(args.train_points),
                           *shlex.split(args.demo_args)])
    data, test = xmc_data.generate_split(demo.train_points, demo.test_points, seed=seed, num_features=demo.features,
                                         num_labels=demo.labels, structure=demo.structure,
                                         near_labels=args.near_labels)
    eval_data = test.subset(np.random.default_rng(seed).permutation(len(test))[:demo.eval_points])  # the demo's
    kind = SETS[name]
    net = xmc.build(kind, args.mode, data, demo, xmc.active_budget(data, demo, args.mode, seed))
    if name == "oracle":
        bench_estimator.exact_top_set(net.out)
    opts = xmc.optimizers(net, kind, *xmc.learning_rates(kind, demo))
    per_epoch = math.ceil(len(data) / demo.batch_size)
    every, probe = max(1, round(per_epoch / 4)), next(eval_data.batches(256, shuffle=False))[:3]
    rows, step = [], 0
    for epoch in tqdm(range(args.epochs), desc=f"{name} seed {seed}", unit="epoch", file=sys.stdout):
        for batch in data.batches(demo.batch_size, seed=seed + epoch):
            net.train()
            loss = xmc.loss_fn(net, kind, batch)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
            step += 1
            if step % every:
                continue
            with torch.no_grad():
                h = net.hidden(*probe)
            found = active_set_recall(net.out, h, k=args.k, sparse=True)
            rows.append({"epoch": step / per_epoch, "P@1": xmc.evaluate(net, kind, eval_data)[0]["P@1"],
                         "recall": found["recall"], "mass_recall": found["mass_recall"],
                         "warmup": step <= net.out.warmup})
    return rows


def at_epochs(runs: list[list[dict]], key: str, epochs) -> list[list[float]]:
    """Each run's ``key`` at the evaluations nearest to ``epochs``."""
    return [[min(run, key=lambda r: abs(r["epoch"] - e))[key] for e in epochs] for run in runs]


def report(results: dict, args) -> None:
    epochs = list(range(1, args.epochs + 1))
    structure = args.structure + (f", near_labels {args.near_labels}" if args.structure == "tree" else "")
    print(f"\nXMC demo ({structure}, {args.labels:,} labels, {args.train_points:,} points), {args.mode} sets, "
          f"seeds {args.seeds}: P@1 / recall of the exact top {args.k} (mean ± std over seeds) at the end of each "
          "epoch (epoch 1: the warm-up's uniform sets)")
    print("| epoch | " + " | ".join(f"{name} P@1 | {name} recall" for name in results) + " |")
    print("|---:|" + "---:|---:|" * len(results))
    cells = {name: (at_epochs(runs, "P@1", epochs), at_epochs(runs, "recall", epochs)) for name, runs in results.items()}
    for i, epoch in enumerate(epochs):
        row = []
        for p1, recall in cells.values():
            for values in (p1, recall):
                column = [v[i] for v in values]
                row.append(bench_estimator.spread_cell(statistics.mean(column),
                                                       statistics.stdev(column) if len(column) > 1 else 0.0,
                                                       len(column), 3))
        print(f"| {epoch} | " + " | ".join(row) + " |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=cli.integer(2), default=10, help="epochs of each run (the first is the warm-up)")
    p.add_argument("--seeds", type=cli.integers(0), default="0,1,2", help="seeds (data and runs), comma-separated")
    p.add_argument("--structure", type=cli.choice("clusters", "tree"), default="clusters",
                   help="the synthetic labels' structure (examples/xmc_data.py)")
    p.add_argument("--near-labels", type=cli.real(0.0, 1.0), default=0.5,
                   help="with --structure tree: how often a point's further labels are its first label's siblings "
                        "(0: siblings are only ever each other's hard negatives; xmc_data.generate)")
    p.add_argument("--mode", type=cli.choice("shared", "per_row"), default="shared",
                   help="one set per batch (every row's labels in it), or one per row (the demo's --active-per-row)")
    p.add_argument("--labels", type=cli.integer(), default=100_000, help="outputs of the layer (the demo's)")
    p.add_argument("--train-points", type=cli.integer(), default=20_000, help="training points (the demo's)")
    p.add_argument("--sets", type=cli.listing(cli.choice(*SETS), "sets"), default=",".join(SETS),
                   help="which sets to train, comma-separated")
    p.add_argument("--k", type=cli.integer(), default=64, help="the exact top k whose recall is measured")
    p.add_argument("--demo-args", default="", help="more of examples/xmc.py's options for every run, as one argument "
                   "(--demo-args=\"--probes 8 --rescore 16\"; the tables' settings reach the hashed set alone)")
    p.add_argument("--json", type=cli.results_path, default=os.path.join(HERE, "results", "xmc_recall.json"))
    p.add_argument("--plot", type=cli.output_path, default=os.path.join(HERE, "results", "xmc_recall.png"),
                   help="P@1 and recall against epochs, the seeds' range as a band ('' for none)")
    args = p.parse_args(argv)
    try:  # the demo's own parser judges them now, not after the first runs
        xmc.parse_args(shlex.split(args.demo_args))
    except SystemExit:
        p.error(f"--demo-args {args.demo_args!r}: examples/xmc.py refused them (above)")
    if args.k > args.labels:  # active_set_recall refused it at the first measurement, after a quarter epoch
        p.error(f"--k {args.k} must be at most --labels {args.labels}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results = {name: [train(name, seed, args) for seed in args.seeds] for name in args.sets}
    report(results, args)
    cli.write_json(args.json, {"args": vars(args), "runs": results})
    print(f"results: {args.json}")
    if args.plot:
        after_warmup = lambda run, key: [(r["epoch"], r[key]) for r in run if not r["warmup"]]  # noqa: E731
        for key, path, label in (("P@1", args.plot, "P@1 (eval subset)"),
                                 ("recall", bench_estimator.beside(args.plot, "_top"),
                                  f"recall of the exact top {args.k}")):
            bench_estimator.plot_seed_curves([("", {name: [after_warmup(run, key) for run in runs]
                                                    for name, runs in results.items()})],
                                             path, label, xlog=False, xlabel="epoch")


if __name__ == "__main__":
    cli.run(main)
