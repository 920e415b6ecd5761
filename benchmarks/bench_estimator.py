"""Evidence for the sampled-softmax estimator: hashed top set + corrected uniform tail, against
dense, a corrected uniform set of the same size, and the uncorrected sets of before, over seeds.

    python benchmarks/bench_estimator.py            # LM example + XMC demo, 3 seeds (about 45 min on 2 cores)
    python benchmarks/bench_estimator.py --quick    # 1 seed, 100 LM steps, the XMC demo's --quick (about 6 min)

LM (examples/transformer_lm.py, 50,001-word head): held-out perplexity and accuracy with the
full softmax, ms per training step. Variants, each at a per-token budget (``mode="per_row"``)
and a shared one (``mode="shared"``):

  hashed+tail     LSHLinear's defaults: labels | top set rescored from hashed candidates | corrected uniform tail
  uniform+tail    selection="random": labels | corrected uniform draws (T only, the same total)
  hashed (before) the former output-layer settings (L=20, K=12, 2 probes, MIPS transform), no tail, no correction
  uniform (before) labels | uniform draws, no correction

XMC (examples/xmc.py, 100,000 labels): P@1/3/5 and P@1 against wall time of hashed+tail vs
uniform+tail (and dense, trained until its P@1 plateaus; its curve is cached in
benchmarks/results/ so that later runs reuse it). Writes benchmarks/results/estimator.json,
a markdown table to stdout and estimator_xmc.png (mean P@1 against time, seed spread as a band).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(ROOT, "examples"))

import transformer_lm as tl  # noqa: E402

import lsh_torch  # noqa: E402

BEFORE = dict(num_tables=20, bits=12, probes=2, asymmetric=True, tail=0, rescore=1)
LM_VARIANTS = {  # name -> (LSHLinear kwargs, drop the tail's correction)
    "hashed+tail": ({}, False),
    "uniform+tail": ({"selection": "random"}, False),
    "hashed (before)": (BEFORE, True),
    "uniform (before)": ({"selection": "random", "tail": 0}, True),
}


def lm_run(data, variant: str | None, mode: str, budget: int, seed: int, steps: int) -> dict:
    train_tokens, test_tokens, vocab = data
    args = argparse.Namespace(batch_size=16, context=64, steps=steps, seed=seed, lr=2e-3, no_progress=True)
    torch.manual_seed(seed)
    model = tl.TransformerLM(len(vocab))
    if variant is not None:
        kwargs, uncorrected = LM_VARIANTS[variant]
        model = lsh_torch.convert(model, min_out_features=len(vocab), seed=seed, mode=mode, active=budget, **kwargs)
        if uncorrected:
            head = model.head
            forward_sparse = head.forward_sparse
            head.forward_sparse = lambda x, y=None: forward_sparse(x, y)._replace(log_weights=None)
    seconds, _ = tl.train(model, train_tokens, args, variant or "dense")
    ppl, acc = tl.evaluate(model, test_tokens, args.context, 20_000)
    return {"variant": variant or "dense", "mode": mode, "budget": budget, "seed": seed, "steps": steps,
            "ms_per_step": 1000 * seconds / steps, "perplexity": ppl, "accuracy": acc}


def xmc_run(seed: int, quick: bool, runs: str, tag: str) -> dict:
    path = os.path.join(RESULTS, f"estimator_xmc_{tag}_seed{seed}.json")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "xmc.py"), "--runs", runs, "--seed", str(seed),
           "--json", path, "--plot", "", *(["--quick"] if quick else ["--dense-epochs", "4"])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)


def mean_spread(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, 100 LM steps, the XMC demo's --quick")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (0 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="LM training steps (default 300, 100 with --quick)")
    p.add_argument("--budgets", default="per_row:128,shared:2048", help="LM budgets, mode:count,...")
    p.add_argument("--before-seeds", type=int, default=1, help="seeds of the 'before' variants (the first ones)")
    p.add_argument("--variants", nargs="+", default=list(LM_VARIANTS), choices=list(LM_VARIANTS),
                   help="LM variants to train")
    p.add_argument("--no-dense", action="store_true", help="skip the dense LM runs (ratios then read 'n/a')")
    p.add_argument("--skip", choices=["lm", "xmc"], nargs="*", default=[])
    p.add_argument("--json", default=os.path.join(RESULTS, "estimator.json"))
    args = p.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (100 if args.quick else 300)
    budgets = [(m, int(b)) for m, b in (spec.split(":") for spec in args.budgets.split(","))]
    os.makedirs(RESULTS, exist_ok=True)
    result = {"seeds": seeds, "threads": torch.get_num_threads(), "lm": [], "xmc": {}}

    if "lm" not in args.skip:
        data = tl.load_corpus(50_000, 0.05, False)
        for seed in seeds:
            if not args.no_dense:
                result["lm"].append(lm_run(data, None, "-", 0, seed, steps))
                print(result["lm"][-1], flush=True)
            for mode, budget in budgets:
                for variant in args.variants:
                    if "before" in variant and seeds.index(seed) >= args.before_seeds:
                        continue
                    result["lm"].append(lm_run(data, variant, mode, budget, seed, steps))
                    print(result["lm"][-1], flush=True)
        print(f"\nLM example, {steps} steps, seeds {seeds} (mean ± std over seeds; one seed where no ±)")
        print("| head | budget | held-out ppl | accuracy % | ms/step | vs dense |")
        print("|---|---|---:|---:|---:|---:|")
        dense_ms = statistics.mean([r["ms_per_step"] for r in result["lm"] if r["variant"] == "dense"] or [float("nan")])
        keys = [("dense", "-", 0)] + [(v, m, b) for m, b in budgets for v in LM_VARIANTS]
        for variant, mode, budget in keys:
            rows = [r for r in result["lm"] if (r["variant"], r["mode"], r["budget"]) == (variant, mode, budget)]
            if not rows:
                continue
            ppl, ppl_sd = mean_spread([r["perplexity"] for r in rows])
            acc, acc_sd = mean_spread([r["accuracy"] for r in rows])
            ms = statistics.mean(r["ms_per_step"] for r in rows)
            pm = lambda sd, fmt: f" ± {sd:{fmt}}" if len(rows) > 1 else ""  # noqa: E731
            print(f"| {variant} | {mode} {budget or ''} | {ppl:.1f}{pm(ppl_sd, '.1f')} | {acc:.2f}{pm(acc_sd, '.2f')} "
                  f"| {ms:.0f} | {'n/a' if dense_ms != dense_ms else f'{dense_ms / ms:.1f}x'} |")

    if "xmc" not in args.skip:
        tag = "quick" if args.quick else "full"
        dense_cache = os.path.join(RESULTS, f"estimator_xmc_dense_{tag}.json")
        if not os.path.exists(dense_cache):
            dense = xmc_run(seeds[0], args.quick, "dense", "dense")
            with open(dense_cache, "w") as f:
                json.dump(dense, f)
        with open(dense_cache) as f:
            result["xmc"]["dense"] = json.load(f)
        result["xmc"]["seeds"] = {seed: xmc_run(seed, args.quick, "lsh,random", tag) for seed in seeds}
        print_xmc(result["xmc"])
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"json: {args.json}")


def print_xmc(xmc: dict) -> None:
    runs = {}
    for seed_result in xmc["seeds"].values():
        for run in seed_result["runs"]:
            runs.setdefault(run["name"], []).append(run)
    for run in xmc["dense"]["runs"]:
        runs.setdefault(run["name"], []).append(run)
    print(f"\nXMC demo, seeds {list(xmc['seeds'])} (dense: one cached run)")
    print("| output layer | P@1 | P@3 | P@5 | train s |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        cols = []
        for k in ("P@1", "P@3", "P@5"):
            m, sd = mean_spread([r["final"][k] for r in rs])
            cols.append(f"{m:.3f}" + (f" ± {sd:.3f}" if len(rs) > 1 else ""))
        print(f"| {name} | {' | '.join(cols)} | {statistics.mean(r['train_seconds'] for r in rs):.1f} |")
    plot_xmc(runs)


def plot_xmc(runs: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in runs.items():
        end = min(r["curve"][-1][0] for r in rs)
        grid = np.linspace(0, end, 60)
        curves = np.array([np.interp(grid, [c[0] for c in r["curve"]], [c[3] for c in r["curve"]]) for r in rs])
        ax.plot(grid, curves.mean(0), label=f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
        if len(rs) > 1:
            ax.fill_between(grid, curves.min(0), curves.max(0), alpha=0.25)
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("P@1 (eval subset)")
    ax.set_xscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(RESULTS, "estimator_xmc.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
