"""How well do the hash tables find a softmax's largest logits? Recall of the exact top-k on the
LM example's 50K-word head, by table settings, after rescoring a pool of hashed candidates.

    python benchmarks/bench_lm_recall.py            # trains the LM densely for 150 steps first (about 2 min)
    python benchmarks/bench_lm_recall.py --hash srp,dwta,dwta:16 --bits 8 --tables 40:2   # hash families

For each (K, L, probes): the recall of the exact top ``--k`` logits of 1,024 held-out tokens by
the best ``--k`` of a pool of ``--pool`` hashed candidates scored exactly (what
``LSHLinear(rescore=)`` does), the softmax mass the chosen set covers, and the query's time. This is
the measurement behind ``auto_settings`` (docs/estimator.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import transformer_lm as tl  # noqa: E402

import lsh_torch  # noqa: E402
from lsh_torch.diagnostics import topk_recall  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="dense training steps before measuring")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--pool", type=int, default=256)
    p.add_argument("--hash", default="srp", help="hash families to compare, comma-separated: srp, dwta "
                                                  "(LSHLinear(hash=)), dwta:BIN_SIZE (hashing.DWTA(bin_size=))")
    p.add_argument("--bits", default="12,10,8,6", help="K values, comma-separated")
    p.add_argument("--tables", default="20:2,20:4,40:2", help="L:probes pairs, comma-separated")
    p.add_argument("--json", default=os.path.join(HERE, "results", "lm_recall.json"))
    args = p.parse_args(argv)
    families = args.hash.split(",")
    settings = [tuple(int(v) for v in pair.split(":")) for pair in args.tables.split(",")]
    train, test, vocab = tl.load_corpus(50_000, 0.05, False)
    torch.manual_seed(0)
    model = tl.TransformerLM(len(vocab))
    tl.train(model, train, argparse.Namespace(batch_size=16, context=64, steps=args.steps, seed=0, lr=2e-3,
                                              no_progress=True), "dense")
    model.eval()
    inputs, _ = next(tl.batches(test, 16, 64, 1, 1))
    with torch.no_grad():
        h = model.features(inputs).reshape(-1, model.head.in_features)
        logits = model.head(h)
    probs = logits.softmax(1)
    exact_mass = probs.topk(args.k, dim=1).values.sum(1).mean().item()
    print(f"{len(vocab):,} words, {h.shape[0]} tokens, exact top {args.k} holds {exact_mass:.3f} of the softmax mass")
    print(f"{'hash':>18} {'K':>3} {'L':>3} {'probes':>6} {'recall':>7} {'mass':>6} {'query ms':>9}")
    rows = []
    for family, bits, (tables, probes) in ((f, int(b), s) for f in families for b in args.bits.split(",")
                                           for s in settings):
        spec = lsh_torch.hashing.DWTA(int(family[5:])) if family.startswith("dwta:") else family
        try:
            layer = lsh_torch.LSHLinear.from_linear(model.head, num_tables=tables, bits=bits, probes=probes,
                                                    asymmetric=False, hash=spec)
        except ValueError as e:  # a bin size whose log2 does not divide K
            print(f"{family:>18} {bits:>3} {tables:>3} {probes:>6}  skipped: {e}")
            continue
        layer.rebuild()
        start = time.perf_counter()
        pool, _ = layer.tables.query(h, args.pool, None, 0)
        ms = 1000 * (time.perf_counter() - start)
        chosen = pool.gather(1, logits.gather(1, pool).topk(args.k, dim=1).indices)
        recall = topk_recall(chosen, logits, args.k)["recall"]
        mass = probs.gather(1, chosen).sum(1).mean().item()
        rows.append({"hash": str(layer.tables.hash), "bits": bits, "tables": tables, "probes": probes,
                     "recall": recall, "mass": mass, "query_ms": ms})
        print(f"{str(layer.tables.hash):>18} {bits:>3} {tables:>3} {probes:>6} {recall:>7.3f} {mass:>6.3f} "
              f"{ms:>9.0f}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"k": args.k, "pool": args.pool, "tokens": h.shape[0], "exact_mass": exact_mass, "rows": rows}, f,
                  indent=1)
    print(f"json: {args.json}")


if __name__ == "__main__":
    main()
