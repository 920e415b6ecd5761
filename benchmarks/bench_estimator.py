"""Evidence for the sampled-softmax estimator: hashed top set + corrected uniform tail, against
dense, a corrected uniform set of the same size, and the uncorrected sets of before, over seeds.

    python benchmarks/bench_estimator.py            # LM example + XMC demo, 3 seeds (about 55 min on 2 cores,
                                                    # 10 more the first time: XMC's dense runs, then kept)
    python benchmarks/bench_estimator.py --quick    # 1 seed, 100 LM steps, the XMC demo's --quick (about 9 min)

LM (examples/transformer_lm.py, 50,001-word head): held-out perplexity and accuracy with the
full softmax (the first 20,000 held-out words), ms per training step. Variants, each at a per-token
budget (``mode="per_row"``) and a shared one (``mode="shared"``), their heads taking sparse gradients
(``sparse_grad=True``) and every model trained by ``transformer_lm.optimizer`` (lsh_torch.LazyAdam for a
sparse head, torch.optim.Adam for dense):

  hashed+tail     LSHLinear's defaults: labels | top set rescored from hashed candidates | corrected uniform tail
  uniform+tail    selection="random": labels | corrected uniform draws (T only, the same total)
  hashed (before) the former output-layer settings (L=20, K=12, 2 probes, MIPS transform), no tail, no correction
  uniform (before) labels | uniform draws, no correction
  hashed+tail, rebuild 3 / 30 / 100   hashed+tail re-hashing the weights every 3, 30 or 100 steps instead of
                  10 (not run unless named in --variants)
  hashed+tail, tail 1/4 / tail 3/4   hashed+tail with a quarter (three quarters) of the budget in the tail
                  instead of half: a larger (smaller) top set (not run unless named in --variants)
  hashed+tail, rescore 8   hashed+tail with its top set chosen from 8 times its size in hashed candidates instead
                  of 4 (not run unless named in --variants)
  hashed+tail, half the scoring rows   hashed+tail with a shared top set chosen from half as many of the
                  batch's rows as LSHLinear.top_set_scores allows (not run unless named in --variants)
  hashed+tail, dense grad / uniform+tail, dense grad   the head's gradients dense and the model trained by
                  torch.optim.Adam (every word's moments decay every step), as before the converted heads took
                  sparse gradients and lsh_torch.LazyAdam (not run unless named in --variants)
  exact top set+tail, oracle   hashed+tail with the exact best outputs as its top set (dense logits computed
                  to choose them; compare at equal steps, not time; not run unless named in --variants)

A seed's LM runs train in lockstep (the same batches, one step of each in turn, each on its own
clock), so that the machine's drifting load falls on all of them alike. Each LM run also records a
curve: before training and every ``--eval-every`` steps (default steps / 12: 25 at 300 steps, 8
with --quick) the exact full-softmax perplexity on a fixed subset of
the held-out text (``--curve-windows`` windows of 64 words spread evenly over it: 32 x 64 = 2,048
predicted words by default, the same for every variant and seed; about 2 s per evaluation on 2
cores), against the cumulative training wall time, evaluations off the clock. The curves go into
the JSON (``curve``: [seconds, step, perplexity] per evaluation), into estimator_lm.png (one panel
per budget, perplexity against training seconds, mean over seeds as a line, mean +- std as a band,
dense included: its slower steps stretch its curve further to the right), into
estimator_lm_paired.png (hashed+tail's minus uniform+tail's perplexity at equal time, per seed)
and into an equal-time table: per budget, hashed+tail, uniform+tail and dense at 1/3, 2/3 and all
of the training time of the shorter of the two sparse runs (each seed's curve interpolated at that time, linearly in
log-perplexity), with whether hashed+tail is lower beyond the seeds' spread (mean + std below the
other's mean - std), and the same for the difference paired by seed (hashed+tail's minus
uniform+tail's perplexity in each seed: mean + std below 0).

XMC (examples/xmc.py, 100,000 labels): P@1/3/5, the held-out loss and both against wall time of
hashed+tail vs uniform+tail, and dense, trained until its P@1 plateaus: one dense run per seed (each
seed generates its own data), kept in benchmarks/results/ and reused by later runs; each seed's
sparse runs are timed to the plateau of the dense run on their data (``--xmc-reuse`` reads kept sparse
runs as well, e.g. to add dense to runs made with ``--no-dense``). Writes
benchmarks/results/estimator.json, markdown tables to stdout and estimator_xmc.png (mean P@1
against time, seed spread (min to max) as a band; estimator_xmc_loss.png: the held-out loss).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.join(ROOT, "examples"))

import cli  # noqa: E402
import transformer_lm as tl  # noqa: E402
import xmc  # noqa: E402

import lsh_torch  # noqa: E402

LM_VOCAB = 50_000  # the LM's words, <unk> aside: its head has 50,001 outputs
BEFORE = dict(num_tables=20, bits=12, probes=2, asymmetric=True, tail=0, rescore=1)


def drop_correction(head) -> None:
    """The set used as if it were the whole softmax: no log-weights on the tail."""
    forward_sparse = head.forward_sparse
    head.forward_sparse = lambda x, y=None: forward_sparse(x, y)._replace(log_weights=None)


def exact_top_set(head) -> None:
    """The oracle: perfect retrieval. The pool the top set is rescored from is the exact best
    outputs by the layer's own rule (the largest logits per row; in shared mode the largest
    logsumexp of the logits over the batch's rows, every row scored where hashed+tail samples
    them), so the top set is the exact best by that rule; the tail as in hashed+tail. Its time is
    not comparable: it computes dense logits."""
    head.top_set_scores = 2 ** 62  # every row of the batch chooses a shared top set

    def pool(x, budget, labels=None, seed=0, shared=False, **_):
        scores = F.linear(x, head.weight, head.bias).float()
        # At least the layer's budget: labels in the pool are passed over, and labels + top set <= budget.
        size = min(head.out_features, max(budget, head.budget))
        return (scores.logsumexp(0) if shared else scores).topk(size, dim=-1).indices, None

    head.tables.query = pool


def half_the_scoring_rows(head) -> None:
    """A shared top set chosen from every second one of the rows that LSHLinear.top_set_scores allows."""
    stride = head._top_set_stride
    head._top_set_stride = lambda rows, pool: 2 * stride(rows, pool)


def is_oracle(variant: str) -> bool:
    return variant in LM_VARIANTS and LM_VARIANTS[variant][1] is exact_top_set


LM_VARIANTS = {  # name -> (LSHLinear kwargs, a change to the converted head or None)
    "hashed+tail": ({}, None),
    "uniform+tail": ({"selection": "random"}, None),
    "hashed (before)": (BEFORE, drop_correction),
    "uniform (before)": ({"selection": "random", "tail": 0}, drop_correction),
    # Settings beside the defaults (rebuilds every 10 steps, half the budget in the tail); only when asked for.
    **{f"hashed+tail, rebuild {period}": ({"rebuild": period}, None) for period in (3, 30, 100)},
    "hashed+tail, tail 1/4": ({"tail": 0.25}, None),
    "hashed+tail, tail 3/4": ({"tail": 0.75}, None),
    "hashed+tail, rescore 8": ({"rescore": 8}, None),
    "hashed+tail, dense grad": ({"sparse_grad": False}, None),
    "uniform+tail, dense grad": ({"selection": "random", "sparse_grad": False}, None),
    "hashed+tail, half the scoring rows": ({}, half_the_scoring_rows),
    "exact top set+tail, oracle": ({}, exact_top_set),
    # The tail drawn from the training words' counts (LSHLinear(tail_proposal=)): CORPUS stands for them.
    "hashed+proposal tail": ({"tail_proposal": "CORPUS"}, None),
    "uniform+proposal tail": ({"selection": "random", "tail_proposal": "CORPUS"}, None),
}


def lm_model(vocab_size: int, variant: str | None, mode: str, budget: int, seed: int,
             counts: torch.Tensor | None = None) -> torch.nn.Module:
    """The LM of ``seed`` with a dense head (``variant`` None) or a converted one (``counts``: the training
    words', for the variants with ``tail_proposal="CORPUS"``)."""
    torch.manual_seed(seed)
    model = tl.TransformerLM(vocab_size)
    if variant is not None:
        kwargs, change = LM_VARIANTS[variant]
        if kwargs.get("tail_proposal") == "CORPUS":
            kwargs = {**kwargs, "tail_proposal": counts}
        model = lsh_torch.convert(model, min_out_features=vocab_size, seed=seed, mode=mode, active=budget,
                                  **{"sparse_grad": True, **kwargs})
        if change is not None:
            change(model.head)
    return model


def lm_runs(data, specs: list[tuple], seed: int, steps: int, curve_windows: torch.Tensor | None = None,
            eval_every: int = 0, batch_size: int = 16, lr: float = 2e-3):
    """Train one LM per ``(variant, mode, budget)`` of ``specs`` in lockstep: the same batches, one
    step of each in turn (who goes first rotates every step), each on its own clock. A shared
    machine's load drifts over minutes; in lockstep it falls on every variant alike, so their
    times compare (run one after another, hashed+tail's step took 0.95x to 1.20x uniform+tail's over
    three seeds, the same code). Yields each run's result after the last step; curves are evaluated
    off the clock before the first step, every ``eval_every`` steps and after the last."""
    train_tokens, test_tokens, vocab = data
    counts = torch.bincount(train_tokens, minlength=len(vocab))
    models = [lm_model(len(vocab), *spec, seed, counts) for spec in specs]
    opts = [tl.optimizer(m, lr=lr) for m in models]
    seconds, curves = [0.0] * len(models), [[] for _ in models]

    def record(step: int) -> None:
        if curve_windows is not None:
            for i, model in enumerate(models):
                curves[i].append([seconds[i], step, window_perplexity(model, curve_windows)])
                model.train()

    for model in models:
        model.train()
    record(0)
    for step, (inputs, targets) in enumerate(tl.batches(train_tokens, batch_size, 64, steps, seed), 1):
        for i in (step + j for j in range(len(models))):
            i %= len(models)
            start = time.perf_counter()
            tl.train_step(models[i], opts[i], inputs, targets)
            seconds[i] += time.perf_counter() - start
        if (eval_every and step % eval_every == 0) or step == steps:
            record(step)
    for i, ((variant, mode, budget), model) in enumerate(zip(specs, models)):
        ppl, acc = tl.evaluate(model, test_tokens, 64, 20_000)
        out = {"variant": variant or "dense", "mode": mode, "budget": budget, "seed": seed, "steps": steps,
               "ms_per_step": 1000 * seconds[i] / steps, "perplexity": ppl, "accuracy": acc}
        if curve_windows is not None:
            out["curve"] = curves[i]
        yield out


def held_out_windows(tokens: torch.Tensor, windows: int, context: int) -> torch.Tensor:
    """``[windows, context + 1]``: windows of the held-out text whose starts are spread evenly over
    it (first at 0, last at the end), each predicting its last ``context`` words. A fixed subset:
    the same for every model that scores it."""
    starts = torch.linspace(0, len(tokens) - context - 1, windows).round().long()
    return tokens[starts[:, None] + torch.arange(context + 1)]


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Exact perplexity (full softmax over the whole vocabulary) of ``model`` on ``windows``
    (:func:`held_out_windows`); leaves the model in eval mode."""
    model.eval()
    nll = 0.0
    for chunk in windows.split(batch_size):
        nll += F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def curve_at(curve, times, log: bool = False) -> np.ndarray:
    """A curve's values at ``times``: ``curve`` is ``[(seconds, value), ...]`` in increasing time,
    interpolated linearly between its points (linearly in log(value) with ``log``, for perplexities:
    a mean log-likelihood moves linearly between evaluations), held at its first and last value
    outside them."""
    t = np.array([c[0] for c in curve], dtype=float)
    v = np.array([c[1] for c in curve], dtype=float)
    if log:
        return np.exp(np.interp(times, t, np.log(v)))
    return np.interp(times, t, v)


def beats(a: tuple[float, float], b: tuple[float, float], n: int, higher: bool = False) -> str:
    """Is ``a`` = (mean, std) over ``n`` seeds lower (``higher``: higher) than ``b`` beyond the seeds'
    spread (a's mean + std below b's mean - std)? A short verdict for a table cell."""
    better, worse = ("higher", "lower") if higher else ("lower", "higher")
    if higher:
        a, b = (-a[0], a[1]), (-b[0], b[1])
    if n < 2:
        return f"{better if a[0] < b[0] else 'not ' + better} (one seed: no spread)"
    if a[0] + a[1] < b[0] - b[1]:
        return "yes, beyond the spread"
    if b[0] + b[1] < a[0] - a[1]:
        return f"no: {worse} beyond the spread"
    return "no: within the spread"


def seed_curves(lm: list[dict], variant: str, mode: str, budget: int) -> dict:
    """seed -> ``[(seconds, perplexity), ...]`` of the runs of ``variant`` at ``mode`` and ``budget``."""
    return {r["seed"]: [(c[0], c[2]) for c in r["curve"]] for r in lm
            if (r["variant"], r["mode"], r["budget"]) == (variant, mode, budget) and r.get("curve")}


def equal_time_table(lm: list[dict], budgets, fractions=(1 / 3, 2 / 3, 1.0),
                     a: str = "hashed+tail", b: str = "uniform+tail") -> list[dict]:
    """Per budget and per fraction of the training time of the shorter of runs ``a`` and ``b`` (over
    seeds): the time and :func:`values_at` it of a, b and dense (absent where a variant has no curve)."""
    rows = []
    for mode, budget in budgets:
        runs = {name: seed_curves(lm, name, mode, budget) for name in (a, b)}
        if not all(runs.values()):
            continue
        end = min(c[-1][0] for cs in runs.values() for c in cs.values())  # the shorter run's time
        runs["dense"] = seed_curves(lm, "dense", "-", 0)
        rows += [{"mode": mode, "budget": budget, "fraction": f, "seconds": f * end,
                  **values_at(runs, a, b, f * end, log=True)} for f in fractions]
    return rows


def values_at(runs: dict, a: str, b: str, seconds: float, log: bool = False) -> dict:
    """At ``seconds``: (mean, std, count) over seeds of each run's curve (``runs``: name -> {seed:
    curve}, interpolated by :func:`curve_at`), and of a's minus b's value in each seed that has both
    (``difference``: the two share the seed's initial weights and batches, so the seeds' common ups
    and downs cancel)."""
    at = {name: {seed: float(curve_at(c, seconds, log=log)) for seed, c in cs.items()} for name, cs in runs.items()}
    row = {name: (*mean_spread(list(values.values())), len(values)) for name, values in at.items() if values}
    paired = [at[a][seed] - at[b][seed] for seed in at[a] if seed in at[b]]
    row["difference"] = (*mean_spread(paired), len(paired))
    return row


def xmc_run(seed: int, runs: str, stem: str, demo_args: list[str], reuse: bool = False) -> dict:
    """One ``examples/xmc.py --runs runs --seed seed *demo_args`` on ``seed``'s data (the data seed
    is the run seed), saved to ``benchmarks/results/{stem}_seed{seed}.json``; ``reuse``: read that
    file instead where it exists (dense's runs, minutes each, are trained once per seed and data
    and kept)."""
    path = os.path.join(RESULTS, f"{stem}_seed{seed}.json")
    if reuse and os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        # Every argument must be what the demo would train with now, defaults included (a kept run trained
        # before a default changed is not reused silently), the output paths aside.
        wanted = json.loads(json.dumps(xmc.recorded_args(
            xmc.parse_args(["--runs", runs, "--seed", str(seed), *demo_args]))))
        differ = {k: (result["args"].get(k), v) for k, v in wanted.items()
                  if k not in ("json", "plot") and result["args"].get(k) != v}
        if differ:
            raise ValueError(f"{path} was trained with other arguments (file, wanted): {differ}; delete it to "
                             "train it again")
        return result
    cmd = [sys.executable, os.path.join(ROOT, "examples", "xmc.py"), "--runs", runs, "--seed", str(seed),
           "--json", path, "--plot", "", *demo_args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)


def mean_spread(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread_cell(mean: float, sd: float, n: int, digits: int = 1) -> str:
    """A table cell: ``mean ± sd`` over ``n`` seeds, the mean alone for one seed."""
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def values_cell(values: list[float], digits: int = 1) -> str:
    return spread_cell(*mean_spread(values), len(values), digits)


def xmc_rates(text: str) -> str:
    """--xmc-lr's and --xmc-out-lr's type: examples/xmc.py's rates, checked now, passed on as written."""
    xmc.rates_spec(text)
    return text


def budget_spec(text: str) -> tuple[str, int]:
    """An item of --budgets: MODE:COUNT."""
    mode, colon, count = text.partition(":")
    if not colon or mode not in ("per_row", "shared"):
        raise argparse.ArgumentTypeError(f"must be per_row:COUNT or shared:COUNT, got {text!r}")
    return mode, cli.integer()(count)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, 100 LM steps, the XMC demo's --quick")
    p.add_argument("--seeds", type=cli.integer(0), nargs="+", default=None, help="default: 0 1 2 (0 with --quick)")
    p.add_argument("--steps", type=cli.integer(), default=None,
                   help="LM training steps (default 300, 100 with --quick)")
    p.add_argument("--lm-batch", type=cli.integer(1), default=16,
                   help="LM windows of 64 words per step (default 16: 1,024 words, ~270 distinct targets; 128: "
                        "8,192 words, ~1,410 distinct, past labels + tail in a set of 2,048)")
    p.add_argument("--lm-lr", type=cli.positive, default=2e-3,
                   help="every LM run's learning rate (transformer_lm.optimizer: Adam, or LazyAdam with a sparse head)")
    p.add_argument("--budgets", type=cli.listing(budget_spec, "mode:count pairs"), default="per_row:128,shared:2048",
                   help="LM budgets, mode:count,...")
    p.add_argument("--before-seeds", type=cli.integer(0), default=1,
                   help="seeds of the 'before' variants (the first ones)")
    p.add_argument("--variants", nargs="+", default=[v for v in LM_VARIANTS if ", " not in v],
                   choices=list(LM_VARIANTS), metavar="VARIANT",
                   help="LM variants to train, each one argument (quote those with spaces): "
                        + "; ".join(f"'{v}'" for v in LM_VARIANTS))
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense runs (LM: its ratios read 'n/a'; XMC: no dense row or time to its plateau)")
    p.add_argument("--eval-every", type=cli.integer(0), default=None,
                   help="LM curve: evaluate every this many steps (default steps / 12: 25 at 300; 0: no curves)")
    p.add_argument("--curve-windows", type=cli.integer(), default=32,
                   help="LM curve: held-out windows of 64 words scored per evaluation, spread over the held-out text")
    p.add_argument("--skip", choices=["lm", "xmc"], nargs="*", default=[], help="parts not to run")
    p.add_argument("--xmc-epochs", type=cli.integer(), default=None,
                   help="epochs of the XMC lsh and random runs (default: the demo's, 5; 2 with --quick)")
    p.add_argument("--xmc-structure", default="clusters", choices=["clusters", "tree", "text"],
                   help="the XMC demo's data: a synthetic label structure or the standard library's text "
                        "(examples/xmc.py --structure)")
    p.add_argument("--xmc-mode", default=None, choices=["shared", "per_row"],
                   help="the XMC lsh and random runs' active sets: one per batch of --xmc-active, or one per point "
                        "of the demo's --active-per-row, 128 (examples/xmc.py --mode; default: the demo's, shared)")
    p.add_argument("--xmc-label-smoothing", type=cli.real(0, 1), default=None,
                   help="the XMC lsh and random runs' label smoothing (examples/xmc.py --label-smoothing; dense: none)")
    p.add_argument("--xmc-train-points", type=cli.integer(), default=None,
                   help="the XMC demo's training points (default: the demo's, 20,000)")
    p.add_argument("--xmc-labels", type=cli.integer(2), default=None,
                   help="the XMC demo's labels, the output layer's width (default: the demo's, 100,000)")
    p.add_argument("--xmc-active", type=cli.integer(), default=None,
                   help="the XMC lsh and random runs' active outputs per batch (default: the demo's, 2,048)")
    p.add_argument("--xmc-tail", type=cli.integer(0), default=None,
                   help="the XMC lsh runs' uniform tail, of the active outputs (default: LSHLinear's, half)")
    p.add_argument("--xmc-tail-proposal", default=None, choices=["uniform", "labels"],
                   help="what the XMC lsh and random runs' tails are drawn from: uniformly, or in proportion to the "
                        "labels' training counts (examples/xmc.py --tail-proposal; default: the demo's, uniform)")
    p.add_argument("--xmc-norm-rows-share", type=cli.real(0, 1), default=None,
                   help="the XMC lsh runs' share of the rescored pool given to the largest-norm rows "
                        "(examples/xmc.py --norm-rows-share; default: LSHLinear's, 0.25)")
    p.add_argument("--xmc-lr", type=xmc_rates, default=None,
                   help="every XMC run's network learning rate, dense's included (examples/xmc.py --lr: one rate, or "
                        "kind=rate pairs; default: the demo's)")
    p.add_argument("--xmc-out-lr", type=xmc_rates, default=None,
                   help="every XMC run's output-layer learning rate, dense's included (examples/xmc.py --out-lr; "
                        "default: the demo's, each head's own)")
    p.add_argument("--xmc-reuse", action="store_true",
                   help="read the XMC lsh and random runs' files where they exist (their arguments checked) instead "
                        "of training them again, as dense's always are: to add dense runs to kept ones, or re-print")
    # The defaults are the committed results' files; a --quick run writes beside them (estimator_quick.json, ...).
    p.add_argument("--json", type=cli.output_path, default=None,
                   help="'' for none; default: benchmarks/results/estimator.json")
    p.add_argument("--lm-plot", type=cli.output_path, default=None,
                   help="PNG of the LM perplexity curves ('' for none; default: benchmarks/results/estimator_lm.png)")
    p.add_argument("--xmc-plot", type=cli.output_path, default=None,
                   help="PNG of the XMC P@1 curves and, beside it, *_loss.png of the held-out loss ('' for none; "
                        "default: benchmarks/results/estimator_xmc.png)")
    args = p.parse_args(argv)
    if set(args.skip) == {"lm", "xmc"}:
        p.error("--skip lm xmc leaves nothing to run")
    quick = "_quick" if args.quick else ""
    for name, default in (("json", f"estimator{quick}.json"), ("lm_plot", f"estimator_lm{quick}.png"),
                          ("xmc_plot", f"estimator_xmc{quick}.png")):
        if getattr(args, name) is None:
            setattr(args, name, os.path.join(RESULTS, default))
    if args.quick and (args.xmc_epochs or args.xmc_train_points):
        p.error("--xmc-epochs or --xmc-train-points with --quick: the XMC demo's --quick sets its own")
    if args.seeds:
        cli.distinct(p, "--seeds", args.seeds)
    # What the layers would refuse, named now: not after the corpus's load, or after the LM part's hour.
    for mode, budget in args.budgets:
        try:
            lsh_torch.LSHLinear(1, LM_VOCAB + 1, mode=mode, active=budget, device="meta")
        except ValueError as error:
            p.error(f"--budgets {mode}:{budget}: {error}")
    demo = xmc.parse_args([])  # the demo's defaults; it caps the active outputs at the labels
    per_row = args.xmc_mode == "per_row"
    active = min(demo.active_per_row if per_row else args.xmc_active or demo.active, args.xmc_labels or demo.labels)
    if args.xmc_tail is not None and args.xmc_tail > active:
        p.error(f"--xmc-tail {args.xmc_tail}: above the XMC runs' {active} active outputs "
                f"({'per point, --xmc-mode per_row' if per_row else '--xmc-active'})")
    if args.eval_every == 0 and cli.given(p, argv, ["lm_plot"]) and args.lm_plot:
        p.error("--lm-plot with --eval-every 0: no curves are recorded to plot")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (100 if args.quick else 300)
    eval_every = max(1, round(steps / 12)) if args.eval_every is None else args.eval_every
    budgets = args.budgets
    result = {"seeds": seeds, "threads": torch.get_num_threads(), "lm_batch": args.lm_batch, "lm": [], "xmc": {}}

    def save() -> None:  # after each part's runs, before its tables and plots: a failing plot loses no run
        if args.json:
            cli.write_json(args.json, result)
            print(f"json: {args.json}")

    if "lm" not in args.skip:
        data = tl.load_corpus(LM_VOCAB, 0.05, False)
        windows = held_out_windows(data[1], args.curve_windows, 64) if eval_every > 0 else None
        result["lm_curve"] = {"eval_every": eval_every, "windows": args.curve_windows, "context": 64}

        for seed in seeds:
            specs = [] if args.no_dense else [(None, "-", 0)]
            specs += [(variant, mode, budget) for mode, budget in budgets for variant in args.variants
                      if "before" not in variant or seeds.index(seed) < args.before_seeds]
            for run in lm_runs(data, specs, seed, steps, windows, eval_every, args.lm_batch, args.lm_lr):
                result["lm"].append(run)
                print({k: v for k, v in run.items() if k != "curve"}, flush=True)
        save()
        print(f"\nLM example, {steps} steps of {args.lm_batch} x 64 words, seeds {seeds} (mean ± std over seeds; "
              "one seed where no ±)")
        print("| head | budget | held-out ppl | accuracy % | ms/step | vs dense |")
        print("|---|---|---:|---:|---:|---:|")
        dense_ms = statistics.mean([r["ms_per_step"] for r in result["lm"] if r["variant"] == "dense"] or [float("nan")])
        keys = [("dense", "-", 0)] + [(v, m, b) for m, b in budgets for v in LM_VARIANTS]
        for variant, mode, budget in keys:
            rows = [r for r in result["lm"] if (r["variant"], r["mode"], r["budget"]) == (variant, mode, budget)]
            if not rows:
                continue
            ms = statistics.mean(r["ms_per_step"] for r in rows)
            speed = f"| {ms:.0f} | {'n/a' if dense_ms != dense_ms else f'{dense_ms / ms:.1f}x'} |" \
                if not is_oracle(variant) else "| n/a (dense logits) | |"
            print(f"| {variant} | {mode} {budget or ''} | {values_cell([r['perplexity'] for r in rows])} "
                  f"| {values_cell([r['accuracy'] for r in rows], 2)} " + speed)
        if windows is not None:
            print_lm_curves(result["lm"], budgets, windows, args.lm_plot)

    if "xmc" not in args.skip:
        # File names: estimator_xmc[_STRUCTURE][_nPOINTS][_labelsN][_lrR][_outlrR]_{dense,RUNLENGTH}_seedS.json
        # (the clusters' predate the tree).
        data = ["--structure", args.xmc_structure]
        stem = "estimator_xmc" + ("" if args.xmc_structure == "clusters" else f"_{args.xmc_structure}")
        if args.xmc_train_points:
            data += ["--train-points", str(args.xmc_train_points)]
            stem += f"_n{args.xmc_train_points}"
        if args.xmc_labels:
            data += ["--labels", str(args.xmc_labels)]
            stem += f"_labels{args.xmc_labels}"
        for flag, value, tag in (("--lr", args.xmc_lr, "lr"), ("--out-lr", args.xmc_out_lr, "outlr")):
            if value is not None:  # every run's rates, dense's too: named in every file's name
                data, stem = data + [flag, value], f"{stem}_{tag}{value.replace('=', '').replace(',', '_')}"
        length = "quick" if args.quick else "full"
        data += ["--quick"] if args.quick else ["--dense-epochs", "4"]
        result["xmc"]["dense"] = {} if args.no_dense else {
            seed: xmc_run(seed, "dense", f"{stem}_dense_{length}", data, reuse=True) for seed in seeds}
        result["xmc"]["structure"] = args.xmc_structure
        epochs, run_length = (["--epochs", str(args.xmc_epochs)], f"{length}_e{args.xmc_epochs}") if args.xmc_epochs \
            else ([], length)
        for flag, value, tag in (("--mode", args.xmc_mode, ""), ("--active", args.xmc_active, "active"),
                                 ("--tail", args.xmc_tail, "tail"), ("--tail-proposal", args.xmc_tail_proposal, "tail"),
                                 ("--label-smoothing", args.xmc_label_smoothing, "ls"),
                                 ("--norm-rows-share", args.xmc_norm_rows_share, "normrows")):
            if value is not None:  # the sparse runs' options, each named in their files' names
                epochs, run_length = epochs + [flag, str(value)], f"{run_length}_{tag}{value}"
        result["xmc"]["seeds"] = {seed: xmc_run(seed, "lsh,random", f"{stem}_{run_length}", data + epochs,
                                                reuse=args.xmc_reuse) for seed in seeds}
        save()
        print_xmc(result["xmc"], args.xmc_plot)


def print_lm_curves(lm: list[dict], budgets, windows: torch.Tensor, plot: str) -> None:
    """The equal-time table of the LM curves, the equal-steps one where the oracle ran, and their
    plot (``plot``: a PNG path, '' for none)."""
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    # hashed against uniform; where the dense-gradient variants ran, each head against its dense-gradient self
    # and the dense-gradient pair against each other.
    for a, b in (("hashed+tail", "uniform+tail"), ("hashed+tail", "hashed+tail, dense grad"),
                 ("uniform+tail", "uniform+tail, dense grad"), ("hashed+tail, dense grad", "uniform+tail, dense grad")):
        rows = equal_time_table(lm, budgets, a=a, b=b)
        if rows:
            print(f"\nLM at equal training time, {a} against {b}: perplexity on the fixed curve subset "
                  f"({windows.shape[0]} held-out windows, {tokens:,} words; mean ± std over seeds, one seed where "
                  f"no ±), each seed's curve interpolated at the time; times are 1/3, 2/3 and all of the shorter run")
            print_equal_time(rows, a, b, digits=1)
    print_equal_steps(lm, budgets)
    if not plot:
        return
    panels = []
    for mode, budget in budgets:
        runs = {}
        for r in lm:
            if is_oracle(r["variant"]):
                continue  # its time holds dense logits: only its steps compare
            if r.get("curve") and ((r["mode"], r["budget"]) == (mode, budget) or r["variant"] == "dense"):
                runs.setdefault(r["variant"], []).append([(c[0], c[2]) for c in r["curve"]])
        if runs:
            panels.append((f"{mode} {budget}", runs))
    # A linear time axis: evaluations come every eval_every steps, and on a log axis the line from t=0
    # to the first one would fill most of the width. The band is the seeds' range: mean - std on a
    # log axis reached perplexities below 1 where one seed lagged.
    plot_seed_curves(panels, plot, f"held-out perplexity ({tokens:,}-word subset, full softmax)",
                     band="range", ylog=True, xlog=False)
    # The paired difference at equal time, per seed, from the first evaluation after step 0 (before
    # it the curves fall from ~60,000 and their difference says nothing).
    panels = []
    for mode, budget in budgets:
        hashed, uniform = (seed_curves(lm, name, mode, budget) for name in ("hashed+tail", "uniform+tail"))
        pairs = [(hashed[seed], uniform[seed]) for seed in hashed if seed in uniform]
        if pairs:
            start = max(c[1][0] for pair in pairs for c in pair)
            end = min(c[-1][0] for pair in pairs for c in pair)
            grid = np.linspace(start, end, 100)
            panels.append((f"{mode} {budget}", {"hashed+tail − uniform+tail": [
                list(zip(grid, curve_at(h, grid, log=True) - curve_at(u, grid, log=True))) for h, u in pairs]}))
    if panels:
        plot_seed_curves(panels, beside(plot, "_paired"),
                         "perplexity difference at equal time (seeds' range)", band="range", xlog=False, reference=0.0)


def print_equal_steps(lm: list[dict], budgets, fractions=(1 / 3, 2 / 3, 1.0)) -> None:
    """Where the oracle ran: perplexity on the curve subset after the same number of steps (1/3, 2/3
    and all of them) of each variant at the budget and of dense (where it ran), and each variant's
    difference from uniform+tail's (or, without it, hashed+tail's) paired by seed."""
    for mode, budget in budgets:
        runs = {}
        for r in lm:
            if ((r["mode"], r["budget"]) == (mode, budget) or r["variant"] == "dense") and r.get("curve"):
                runs.setdefault(r["variant"], {})[r["seed"]] = {c[1]: c[2] for c in r["curve"]}
        if not any(is_oracle(v) for v in runs):
            continue
        base = next((v for v in ("uniform+tail", "hashed+tail") if v in runs), None)
        others = [v for v in runs if base and v not in (base, "dense")]
        steps = sorted(next(iter(runs[next(v for v in runs if is_oracle(v))].values())))
        print(f"\nLM {mode} {budget} at equal steps (the oracle's time is not comparable): perplexity on the "
              f"curve subset, mean ± std over seeds" + (f"; minus {base}'s, paired by seed" if base else ""))
        print(f"| step | {' | '.join(runs)} |" + "".join(f" {v} − {base} |" for v in others))
        print("|---:|" + "---:|" * (len(runs) + len(others)))
        for f in fractions:
            step = min(steps, key=lambda c: abs(c - f * steps[-1]))
            values = [values_cell([curve[step] for curve in curves.values()]) for curves in runs.values()]
            diffs = [values_cell([runs[v][seed][step] - runs[base][seed][step] for seed in runs[v] if seed in runs[base]])
                     for v in others]
            print(f"| {step} | {' | '.join(values + diffs)} |")


def print_xmc(xmc: dict, plot: str = os.path.join(RESULTS, "estimator_xmc.png")) -> None:
    runs = {}
    for seed_result in xmc["seeds"].values():
        for run in seed_result["runs"]:
            runs.setdefault(run["name"], []).append(run)
    for seed_result in xmc["dense"].values():
        for run in seed_result["runs"]:
            runs.setdefault(run["name"], []).append(run)
    dense = f"seeds {list(xmc['dense'])}, one run per seed's data, kept" if xmc["dense"] else "not run"
    print(f"\nXMC demo ({xmc.get('structure', 'clusters')}), seeds {list(xmc['seeds'])} (dense: {dense})")
    print("| output layer | P@1 | P@3 | P@5 | held-out loss (full softmax) | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rs in runs.items():
        cols = []
        for k, digits in (("P@1", 3), ("P@3", 3), ("P@5", 3), ("loss", 2)):
            values = [r["final"].get(k) for r in rs]
            if None in values:  # a result from before the loss was recorded
                cols.append("-")
                continue
            cols.append(values_cell(values, digits))
        print(f"| {name} | {' | '.join(cols)} | {statistics.mean(r['train_seconds'] for r in rs):.1f} |")
    rows, reach = xmc_equal_time(xmc)
    if rows:
        print("\nXMC at equal training time: P@1 on the eval subset (mean ± std over seeds), each seed's curve "
              "interpolated at the time; times are fractions of the shorter sparse run")
        print_equal_time(rows, "lsh", "random", digits=3, higher=True)
    if reach:
        print("first within 0.005 of dense's best P@1 (eval subset) on the same seed's data, seconds and the fraction "
              "of the time dense took to get there:")
        print("| seed | dense's best | dense | lsh | random |")
        print("|---|---:|---:|---:|---:|")
        at = lambda t, dense: "never" if t is None else f"{t:.1f} s" + (f" = {t / dense:.3f}" if dense else "")  # noqa: E731
        for seed, r in reach.items():
            print(f"| {seed} | {r['best']:.3f} | {r['dense']:.1f} s | {at(r['lsh'], r['dense'])} "
                  f"| {at(r['random'], r['dense'])} |")
        when = lambda results: ", ".join(sorted({r.get("finished", "not recorded") for r in results.values()}))  # noqa: E731
        print(f"(the dense runs are kept and reused: the ratios compare clocks of different runs, dense finished "
              f"{when(xmc['dense'])}, the sparse runs {when(xmc['seeds'])})")
    rows, _ = xmc_equal_time(xmc, column=4)
    if rows:
        print("\nXMC at equal training time: held-out loss (the full softmax's cross-entropy) on the eval subset, "
              "as above")
        print_equal_time(rows, "lsh", "random", digits=2)
    if plot:
        for column, path, ylabel in ((3, plot, "P@1 (eval subset)"),
                                     (4, beside(plot, "_loss"), "held-out loss, full softmax (eval subset)")):
            curves = {name: [xmc_curve(r, column) for r in rs] for name, rs in runs.items()}
            curves = {name: cs for name, cs in curves.items() if None not in cs}
            if len(curves) > 1:  # a comparison: not dense alone (sparse runs recorded before the loss)
                plot_seed_curves([("", curves)], path, ylabel, band="range")


def beside(path: str, tag: str) -> str:
    """``path`` with ``tag`` before its suffix (``lm.svg`` -> ``lm_paired.svg``): replacing ".png" left an
    .svg or .pdf path as it was, and its second plot overwrote the first."""
    stem, suffix = os.path.splitext(path)
    return stem + tag + suffix


def xmc_curve(run: dict, column: int) -> list | None:
    """An XMC run's ``[(seconds, value), ...]``: P@1 (``column=3``) or the held-out loss (4); None
    where the run was recorded without that value (the loss came later)."""
    if all(len(c) > column and c[column] is not None for c in run["curve"]):
        return [(c[0], c[column]) for c in run["curve"]]
    return None


def print_equal_time(rows: list[dict], a: str, b: str, digits: int, higher: bool = False) -> None:
    """A markdown table of equal-time rows (:func:`values_at`, with ``mode`` and ``budget``): a, b and
    dense, mean ± std over seeds, and whether a is better than b beyond the spread, unpaired and
    paired by seed (better: ``higher`` or lower)."""
    word = "higher" if higher else "lower"
    print(f"| set | train s | {a} | {b} | dense | {a} {word} than {b}? | {a} − {b}, per seed "
          f"| {word}, paired by seed? |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    cell = lambda v: "-" if v is None else spread_cell(*v, digits)  # noqa: E731
    for r in rows:
        h, u, d = r[a], r[b], r["difference"]
        print(f"| {r['mode']} {r['budget']} | {r['seconds']:.1f} | {cell(h)} | {cell(u)} | {cell(r.get('dense'))} "
              f"| {beats(h[:2], u[:2], min(h[2], u[2]), higher)} | {cell(d)} | {beats(d[:2], (0.0, 0.0), d[2], higher)} |")


def xmc_equal_time(xmc: dict, fractions=(0.25, 0.5, 0.75, 1.0), column: int = 3) -> tuple[list[dict], dict]:
    """The XMC curves compared: P@1 on the eval subset against training seconds (``column=4``: the
    held-out loss; curves recorded without it are left out). Per fraction of the shorter sparse
    run's time, :func:`values_at` of lsh, random and dense (over the seeds' dense runs), lsh minus
    random paired; and, per seed with a dense run, how soon its lsh and random runs first reach that
    dense run's best - 0.005 (``reach``: seed -> {"best", "dense": dense's own time to get there,
    "lsh", "random": None where never}; P@1 only)."""
    runs, sets = {"lsh": {}, "random": {}, "dense": {}}, set()
    for results in (xmc["seeds"], xmc["dense"]):
        for seed, seed_result in results.items():
            for run in seed_result["runs"]:
                curve = xmc_curve(run, column)
                if curve is not None:
                    runs[run["kind"]][seed] = curve
                    if run["kind"] != "dense":
                        sets.add((run["mode"], run["budget"]))
    if not (runs["lsh"] and runs["random"]):
        return [], {}
    end = min(c[-1][0] for name in ("lsh", "random") for c in runs[name].values())
    # One lsh and one random run per seed; the demo may raise a seed's budget to hold its batches' labels.
    mode, budget = ("/".join(sorted({str(x[i]) for x in sets})) for i in (0, 1))
    rows = [{"mode": mode, "budget": budget, "seconds": f * end, **values_at(runs, "lsh", "random", f * end)}
            for f in fractions]
    reach = {}
    for seed, dense in runs["dense"].items() if column == 3 else ():
        if seed not in runs["lsh"] or seed not in runs["random"]:
            continue
        best = max(v for _, v in dense)
        first = lambda curve: next((t for t, v in curve if v >= best - 0.005), None)  # noqa: E731
        reach[seed] = {"best": best, "dense": first(dense), **{kind: first(runs[kind][seed]) for kind in ("lsh", "random")}}
    return rows, reach


def plot_seed_curves(panels, path: str, ylabel: str, band: str = "range", ylog: bool = False,
                     xlog: bool = True, reference: float | None = None,
                     xlabel: str = "training seconds (2 CPU cores)") -> None:
    """Curves over seeds against training time, one panel per ``(title, {name: [curve, ...]})`` side
    by side (a shared y axis), each curve ``[(seconds, value), ...]``: per name the mean over seeds
    as a line, over the times all its seeds cover, and the seeds' spread as a band, ``"range"``
    (min to max) or ``"std"`` (mean ± std). ``ylog``: a log y axis, curves interpolated linearly in
    log(value) (:func:`curve_at`). ``xlog``: a log time axis (for curves evaluated often: on it the
    line from t=0 to the first evaluation spans most of the width). ``reference``: a horizontal
    line at that value. ``xlabel``: what the curves' first values are. Written to ``path``; nothing
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), sharey=True, squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for name, curves in runs.items():
            start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
            grid = np.linspace(start, end, 200)
            values = np.array([curve_at(c, grid, log=ylog) for c in curves])
            mean = values.mean(0)
            (line,) = ax.plot(grid, mean, label=f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
            if len(curves) > 1:
                low, high = ((values.min(0), values.max(0)) if band == "range" else
                             (mean - values.std(0, ddof=1), mean + values.std(0, ddof=1)))
                ax.fill_between(grid, np.maximum(low, mean * 1e-3) if ylog else low, high, alpha=0.25,
                                color=line.get_color())
        ax.set_xlabel(xlabel)
        if reference is not None:
            ax.axhline(reference, color="gray", linewidth=0.8)
        if xlog:
            ax.set_xscale("log")
        if ylog:
            ax.set_yscale("log")
        if title:
            ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(cli.with_folder(path), dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    cli.run(main)
