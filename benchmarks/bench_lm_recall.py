"""How well do the hash tables find a softmax's largest logits? Recall of the exact top-k on the
LM example's 50K-word head, by table settings, after rescoring a pool of hashed candidates.

    python benchmarks/bench_lm_recall.py            # trains the LM densely for 150 steps first (about 2 min)
    python benchmarks/bench_lm_recall.py --hash srp,dwta,dwta:16 --bits 8 --tables 40:2   # hash families

For each (K, L, probes): the recall of the exact top ``--k`` logits of 1,024 held-out tokens by
the best ``--k`` of a pool of ``--pool`` hashed candidates per token scored exactly (what
``LSHLinear(rescore=)`` does in eval lookups), the softmax mass the chosen set covers, and the query's
time (median of 5 after a warm-up). This is the measurement behind ``auto_settings`` (docs/estimator.md).
The ``batch`` columns: the same from one pool of ``BATCH_POOL_ROWS`` x ``--pool`` for all the tokens
(what training lookups do: docs/estimator.md, "The per-row top set from the batch's pool").

``--shared``: instead, the batch-shared set of the output layer (``--active``, default 2,048 words
for the 1,024 tokens: their labels, the rescored top set, the corrected tail) with its top set
found and scored for 1,024, 512, 256, 128, 64 and 32 of the tokens and for the default's sample
(``LSHLinear.top_set_scores`` = that many rows x the rescored pool): the softmax mass that
labels + top set hold (mean over all 1,024 tokens) and forward_sparse's time (the lookup and the
set's outputs), medians of 5.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import cli  # noqa: E402
import transformer_lm as tl  # noqa: E402
from timing import median_time  # noqa: E402

import lsh_torch  # noqa: E402
from lsh_torch._checks import MAX_BITS, MAX_PROBES, MAX_TABLES  # noqa: E402  (the library's limits)
from lsh_torch.diagnostics import topk_recall  # noqa: E402
from lsh_torch.nn import BATCH_POOL_ROWS  # noqa: E402


VOCAB = 50_000  # words of the LM's vocabulary, <unk> aside


def hash_spec(text: str) -> str:
    """An item of --hash: srp, dwta or dwta:BIN_SIZE."""
    family, colon, bin_size = text.partition(":")
    if text not in ("srp", "dwta") and family != "dwta":
        raise argparse.ArgumentTypeError(f"must be srp, dwta or dwta:BIN_SIZE, got {text!r}")
    if colon:
        size = cli.integer(2)(bin_size)
        if size & (size - 1):  # DWTA refuses it for every K: each of its cells skipped
            raise argparse.ArgumentTypeError(f"BIN_SIZE must be a power of two, got {text!r}")
    return text


def tables_spec(text: str) -> tuple[int, int]:
    """An item of --tables: L:PROBES."""
    tables, colon, probes = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"must be L:PROBES, got {text!r}")
    return cli.integer(1, MAX_TABLES)(tables), cli.integer(1, MAX_PROBES)(probes)


def cells(args) -> list[tuple[str, int, int, int]]:
    """The table's (hash family, K, L, probes), in its order."""
    return [(family, bits, tables, probes) for family in args.hash for bits in args.bits
            for tables, probes in args.tables]


def hashed(head: torch.nn.Linear, family: str, bits: int, tables: int, probes: int) -> lsh_torch.LSHLinear:
    """``head`` with one cell's hash tables (not yet built)."""
    spec = lsh_torch.hashing.DWTA(int(family[5:])) if family.startswith("dwta:") else family
    return lsh_torch.LSHLinear.from_linear(head, num_tables=tables, bits=bits, probes=probes, asymmetric=False,
                                           hash=spec)


def check_cells(p: argparse.ArgumentParser, args) -> None:
    """Refuse a grid whose every cell LSHLinear refuses (probes above 2^K, a bin size whose log2 divides
    no K, ...): each was skipped after the training, for an empty table."""
    head = torch.nn.Linear(128, VOCAB + 1, device="meta")  # the LM's head, nothing allocated
    errors = []
    for cell in cells(args):
        try:
            hashed(head, *cell)
            return
        except ValueError as error:
            errors.append(f"{cell[0]} K={cell[1]} L={cell[2]} probes {cell[3]}: {error}")
    p.error(f"LSHLinear refuses every cell of --hash x --bits x --tables (e.g. {errors[0]})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=cli.integer(), default=150, help="dense training steps before measuring")
    p.add_argument("--k", type=cli.integer(), default=64)
    p.add_argument("--pool", type=cli.integer(), default=256)
    p.add_argument("--hash", type=cli.listing(hash_spec, "hash families"), default="srp",
                   help="hash families to compare, comma-separated: srp, dwta (LSHLinear(hash=)), dwta:BIN_SIZE "
                        "(hashing.DWTA(bin_size=))")
    p.add_argument("--bits", type=cli.integers(1, MAX_BITS), default="12,10,8,6", help="K values, comma-separated")
    p.add_argument("--tables", type=cli.listing(tables_spec, "L:probes pairs"), default="20:2,20:4,40:2",
                   help="L:probes pairs, comma-separated")
    p.add_argument("--shared", action="store_true", help="the shared top set's coverage by rows sampled")
    p.add_argument("--active", type=cli.integer(), default=2048, help="with --shared: the shared set's size")
    p.add_argument("--json", type=cli.results_path, default=None,
                   help="default: results/lm_recall.json (lm_shared_rows.json with --shared)")
    args = p.parse_args(argv)
    # Each option belongs to one of the two tables: the other would ignore it.
    ignored = cli.given(p, argv, ["k", "pool", "hash", "bits", "tables"] if args.shared else ["active"])
    if ignored:
        p.error(f"--{ignored[0]} {'is not used with' if args.shared else 'needs'} --shared")
    if args.shared:
        try:  # a size the shared layer refuses, named now rather than after the training
            lsh_torch.LSHLinear(128, VOCAB + 1, mode="shared", active=args.active, device="meta")  # the LM's head
        except ValueError as error:
            p.error(f"--active {args.active}: {error}")
    elif args.k > args.pool:
        p.error(f"--k {args.k} must be at most --pool {args.pool} (the top k is chosen from the pool)")
    elif args.pool > VOCAB + 1:  # the query refused it after the training
        p.error(f"--pool {args.pool} must be at most the head's {VOCAB + 1} words")
    else:
        check_cells(p, args)
    args.json = args.json or os.path.join(HERE, "results", "lm_shared_rows.json" if args.shared else "lm_recall.json")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    train, test, vocab = tl.load_corpus(VOCAB, 0.05, False)
    inputs, targets = next(tl.batches(test, 16, 64, 1, 1))
    distinct = targets.unique().numel()
    if args.shared and distinct > args.active:  # now, not after the training
        cli.fail(f"--active {args.active}: the shared set holds the {distinct} distinct labels of the "
                 f"{targets.numel()} held-out tokens; raise it")
    torch.manual_seed(0)
    model = tl.TransformerLM(len(vocab))
    tl.train(model, train, argparse.Namespace(batch_size=16, context=64, steps=args.steps, seed=0, lr=2e-3,
                                              no_progress=True), "dense")
    model.eval()
    with torch.no_grad():
        h = model.features(inputs).reshape(-1, model.head.in_features)
        logits = model.head(h)
    probs = logits.softmax(1)
    if args.shared:
        return shared_rows(model.head, h, targets.reshape(-1), probs, args.active, args.json)
    exact_mass = probs.topk(args.k, dim=1).values.sum(1).mean().item()
    print(f"{len(vocab):,} words, {h.shape[0]} tokens, exact top {args.k} holds {exact_mass:.3f} of the softmax mass")
    batch_pool = min(len(vocab), BATCH_POOL_ROWS * args.pool)
    print(f"{'hash':>18} {'K':>3} {'L':>3} {'probes':>6} {'recall':>7} {'mass':>6} {'query ms':>9}   "
          f"batch pool of {batch_pool:,}: {'recall':>6} {'mass':>6} {'query ms':>9}")
    rows = []
    for family, bits, tables, probes in cells(args):
        try:
            layer = hashed(model.head, family, bits, tables, probes)
        except ValueError as e:  # a bin size whose log2 does not divide K, probes above 2^K
            print(f"{family:>18} {bits:>3} {tables:>3} {probes:>6}  skipped: {e}")
            continue
        layer.rebuild()
        row = {"hash": str(layer.tables.hash), "bits": bits, "tables": tables, "probes": probes}
        for prefix, size, shared in (("", args.pool, False), ("batch_", batch_pool, True)):
            pool, _ = layer.tables.query(h, size, None, 0, shared=shared)
            ms = 1000 * median_time(lambda: layer.tables.query(h, size, None, 0, shared=shared), 5)
            pool = pool.expand(h.shape[0], -1)
            chosen = pool.gather(1, logits.gather(1, pool).topk(args.k, dim=1).indices)
            row.update({prefix + "recall": topk_recall(chosen, logits, args.k)["recall"],
                        prefix + "mass": probs.gather(1, chosen).sum(1).mean().item(), prefix + "query_ms": ms})
        rows.append(row)
        print(f"{row['hash']:>18} {bits:>3} {tables:>3} {probes:>6} {row['recall']:>7.3f} {row['mass']:>6.3f} "
              f"{row['query_ms']:>9.0f}   {'':>20}{row['batch_recall']:>7.3f} {row['batch_mass']:>6.3f} "
              f"{row['batch_query_ms']:>9.0f}", flush=True)
    cli.write_json(args.json, {"k": args.k, "pool": args.pool, "batch_pool": batch_pool, "tokens": h.shape[0],
                               "exact_mass": exact_mass, "rows": rows})
    print(f"json: {args.json}")


@torch.no_grad()
def shared_rows(head: torch.nn.Linear, h: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, active: int,
                path: str) -> None:
    layer = lsh_torch.LSHLinear.from_linear(head, mode="shared", inference="lsh", active=active).eval()  # seed stays
    layer.rebuild()
    distinct = labels.unique()
    label_mass = probs[:, distinct].sum(1).mean().item()
    _, pool = layer._top_set_sizes(layer.budget, distinct.numel(), layer._tail_count(True))
    default_rows = -(-h.shape[0] // layer._top_set_stride(h.shape[0], pool))  # every stride-th row
    print(f"{len(probs[0]):,} words, {h.shape[0]} tokens, {distinct.numel()} distinct labels holding "
          f"{label_mass:.3f} of the softmax mass; {active:,} shared words, a rescored pool of {pool:,}")
    print(f"{'top set rows':>12} {'labels + top set mass':>22} {'forward ms':>10}")
    rows = []
    for sample in sorted({1024, 512, 256, 128, 64, 32, default_rows}, reverse=True):
        layer.top_set_scores = sample * max(1, pool)  # no pool (no room for a top set): any positive cap
        times = []
        for _ in range(5):
            start = time.perf_counter()
            out = layer.forward_sparse(h, labels)
            times.append(1000 * (time.perf_counter() - start))
        head_set = out.indices[out.log_weights == 0]
        rows.append({"top_set_rows": sample, "mass": probs[:, head_set].sum(1).mean().item(),
                     "ms": sorted(times)[2]})
        default = " (default)" if sample == default_rows else ""
        print(f"{sample:>12} {rows[-1]['mass']:>22.3f} {rows[-1]['ms']:>10.1f}{default}", flush=True)
    # As many uniformly random words as the top set holds, instead of it (what selection="random" adds).
    rest = torch.ones(probs.shape[1], dtype=torch.bool).index_fill_(0, distinct, False).nonzero()[:, 0]
    order = torch.randperm(rest.numel(), generator=torch.Generator().manual_seed(0))
    random_mass = probs[:, torch.cat([distinct, rest[order[:len(head_set) - distinct.numel()]]])].sum(1).mean().item()
    print(f"labels + as many uniformly random words: {random_mass:.3f}")
    cli.write_json(path, {"tokens": h.shape[0], "active": active, "pool": pool, "default_rows": default_rows,
                          "label_mass": label_mass, "random_mass": random_mass, "rows": rows})
    print(f"json: {path}")


if __name__ == "__main__":
    cli.run(main)
