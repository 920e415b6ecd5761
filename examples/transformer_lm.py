"""Convert a small transformer language model's 50,000-word output head to LSHLinear and train both.

    python examples/transformer_lm.py            # a few minutes on 2 CPU cores
    python examples/transformer_lm.py --help

Data: the Python standard library's own source files, which every Python install carries (offline,
the same text on every machine), split into words: identifiers and keywords, numbers, and single
punctuation marks; comments and docstrings are English. Files are split into training and held-out
text by a hash of their path. The vocabulary is the ``--vocab`` most frequent words of the training
files plus ``<unk>``.

Model: a GPT-style decoder written with plain ``nn.Linear`` (attention projections, MLPs and the
output head over the whole vocabulary). ``lsh_torch.convert`` turns the copy's wide layers, here
only the head, into ``LSHLinear`` in one call; both models start from the same weights and see the same
batches. The original trains with ``torch.optim.Adam`` and the full softmax (``F.cross_entropy``
over all words). The converted head's gradients are sparse rows (``sparse_grad=True``), trained by
``lsh_torch.LazyAdam``, which gives the other parameters Adam's step and moves only the head's active
rows (SparseAdam's rule: a word no batch touched keeps its moments); its loss is ``head.forward_sparse`` and
``lsh_torch.sparse_cross_entropy`` over the active words only (each target word forced in, plus the
words the hash tables find for the token's context). Held-out perplexity is computed exactly, with
the full softmax over the whole vocabulary, for both (an LSHLinear in eval mode is exact).
``--random-baseline`` adds a third copy whose head picks its active words at random, which shows
what the hashing itself is worth.

With the defaults (128 active words per token, ``mode="per_row"``; LSHLinear's output-layer
settings for the width: L=40 tables, K=8, 2 probes, rows hashed by direction) each token's set is
its target word, the 63 words that score highest among 252 hashed candidates (scored exactly), and
64 words drawn from the rest in proportion to the square root of their counts in the training text
(``LSHLinear(tail_proposal=counts)``; ``--uniform-tail`` draws them uniformly), each corrected by one
over its chance of being drawn, so that the sampled softmax's normaliser is unbiased
(docs/estimator.md). Both models train at 6e-3, every head's best rate on seed 0. Measured on 2 CPU
cores, 300 steps, seed 0, the runs in lockstep (``benchmarks/bench_estimator.py --skip xmc --seeds 0
--budgets per_row:128,shared:2048 --lm-lr 0.006``, which has three seeds and more variants;
``benchmarks/results/estimator_lm_example_lr0.006.txt``; ms per training step):

    head (128 words per token unless said)                  held-out ppl  accuracy %  ms/step
    nn.Linear, full softmax (Adam)                                 168.8       21.47      622
    hashed top set + tail drawn from the counts (default)          163.9       21.76       79
    hashed top set + uniform tail (--uniform-tail)                 168.6       21.43       74
    words drawn from the counts, corrected (no top set)            198.7       20.73       57
    uniform words, corrected (no top set)                       10,367.7        9.79       54
    shared 2,048 per batch: hashed + uniform tail                  173.7       22.29       55
    shared 2,048 per batch: uniform, corrected                     182.1       21.41       51
    an earlier run at 2e-3, dense head gradients:
    hashed words, uncorrected (before)                             540.6        6.20
    uniform words, uncorrected (before)                            267.1       12.13

The top set carries the variance (without it a corrected uniform set trains a useless model, and a
tail drawn from the counts alone ends 35 above dense), the
correction removes the bias (without it hashed negatives alone are worse than random ones), the
tail drawn from the counts lowers the variance further (over 3 seeds 174.0 against the uniform
tail's 180.6 and dense's 178.5), and the head's sparse gradient with LazyAdam makes its step 8.0x
faster than the dense model's when this example runs alone (83.2 against 665.6 ms, 4 min 6 s in all;
at 2e-3 with the uniform tail, the defaults before 2026-12-06: 178.0 against 180.1 at 9.2x).
"""
from __future__ import annotations

import argparse
import collections
import copy
import glob
import math
import os
import re
import sysconfig
import time
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cli
import lsh_torch

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[^\sA-Za-z0-9_]")
UNK = "<unk>"


# ---------------------------------------------------------------------------------------------
# Data

def stdlib_files() -> list[str]:
    """The ``.py`` files of the standard library (third-party ``site-packages`` left out), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f.split(os.sep) and "dist-packages" not in f.split(os.sep))


def read_words(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return WORD.findall(f.read())
    except (UnicodeDecodeError, OSError):
        return []


def is_held_out(path: str, fraction: float) -> bool:
    root = sysconfig.get_paths()["stdlib"]
    return zlib.crc32(os.path.relpath(path, root).encode()) % 1000 < fraction * 1000


def read_corpus(held_out: float, progress: bool = True):
    """The words of each training file and of each held-out file (lists of lists), and the training words' counts."""
    from tqdm import tqdm

    train_words, test_words, counts = [], [], collections.Counter()
    for path in tqdm(stdlib_files(), desc="reading the standard library", disable=not progress, leave=False):
        words = read_words(path)
        if is_held_out(path, held_out):
            test_words.append(words)
        else:
            train_words.append(words)
            counts.update(words)
    return train_words, test_words, counts


def load_corpus(vocab_size: int, held_out: float, progress: bool = True):
    """Word ids of the training and held-out text (int64) and the vocabulary (index 0 is ``<unk>``)."""
    train_words, test_words, counts = read_corpus(held_out, progress)
    if len(counts) < vocab_size:
        cli.fail(f"--vocab {vocab_size}: the training text has only {len(counts):,} distinct words; use --vocab "
                 f"{len(counts)} or less")
    vocab = [UNK] + [w for w, _ in counts.most_common(vocab_size)]
    index = {w: i for i, w in enumerate(vocab)}

    def encode(files):
        return torch.tensor([index.get(w, 0) for words in files for w in words], dtype=torch.int64)

    return encode(train_words), encode(test_words), vocab


def check_corpus(train: Tensor, test: Tensor, context: int, window: int) -> None:
    """Stop where the text is too short for ``--context`` (the run ended in a ZeroDivisionError): the
    held-out text needs one evaluation window of ``window`` words, the training text a window of
    ``context + 1`` that :func:`batches` can draw."""
    if len(test) < window:
        cli.fail(f"--context {context}: the held-out text has {len(test):,} words, less than one window of {window}; "
                 f"lower --context or raise --held-out")
    if len(train) < context + 2:  # batches draws a window's start from [0, len - context - 1)
        cli.fail(f"--context {context}: the training text has {len(train):,} words, too few for windows of "
                 f"{context + 1}; lower --context or --held-out")


def batches(tokens: Tensor, batch_size: int, context: int, steps: int, seed: int):
    """``steps`` batches of ``batch_size`` random windows: inputs and next-word targets, ``[B, T]`` each."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - context - 1, (batch_size, 1), generator=gen)
        window = tokens[starts + offsets]
        yield window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------------------------
# Model: a plain PyTorch transformer LM, nothing lsh_torch-specific

class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(self, vocab: int, d: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def features(self, tokens: Tensor) -> Tensor:
        """The last hidden states ``[B, T, d]``, the head's input."""
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.ln(self.blocks(x))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.features(tokens))


# ---------------------------------------------------------------------------------------------
# Training and exact evaluation

def loss_of(model: TransformerLM, inputs: Tensor, targets: Tensor) -> Tensor:
    h = model.features(inputs)
    if isinstance(model.head, lsh_torch.LSHLinear):  # only the active words' logits are computed
        return lsh_torch.sparse_cross_entropy(model.head.forward_sparse(h, targets), targets)
    return F.cross_entropy(model.head(h).flatten(0, 1), targets.flatten())


def optimizer(model: TransformerLM, lr: float) -> torch.optim.Optimizer:
    """``lsh_torch.LazyAdam`` where a converted layer takes sparse gradients (it moves the touched rows only and
    gives every dense gradient Adam's step), else ``torch.optim.Adam``, fused as LazyAdam is."""
    if any(isinstance(m, lsh_torch.LSHLinear) and m.sparse_grad for m in model.modules()):
        return lsh_torch.LazyAdam(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def train_step(model: TransformerLM, opt: torch.optim.Optimizer, inputs: Tensor, targets: Tensor) -> float:
    """One optimizer step on a batch; its loss."""
    loss = loss_of(model, inputs, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train(model: TransformerLM, data: Tensor, args, desc: str, every: int = 0,
          callback=None) -> tuple[float, list[float]]:
    """Train ``args.steps`` steps with :func:`optimizer`; the training wall time in seconds and the losses.

    ``callback(step, seconds)``, if given, runs before the first step (step 0) and after every
    ``every``-th step and the last, off the clock: ``seconds`` and the time returned count training
    only. The model is put back in training mode after each call (an evaluation may leave it in eval).
    """
    from tqdm import tqdm

    model.train()
    opt = optimizer(model, args.lr)
    if callback is not None:
        callback(0, 0.0)
        model.train()
    losses, seconds, start = [], 0.0, time.perf_counter()
    bar = tqdm(batches(data, args.batch_size, args.context, args.steps, args.seed), total=args.steps, desc=desc,
               disable=args.no_progress, leave=False)
    for step, (inputs, targets) in enumerate(bar, 1):
        losses.append(train_step(model, opt, inputs, targets))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if callback is not None and ((every and step % every == 0) or step == args.steps):
            seconds += time.perf_counter() - start
            callback(step, seconds)
            model.train()
            start = time.perf_counter()
    return seconds + time.perf_counter() - start, losses


@torch.no_grad()
def evaluate(model: TransformerLM, tokens: Tensor, context: int, max_tokens: int,
             batch_size: int = 16) -> tuple[float, float]:
    """Perplexity (exp of the mean negative log-likelihood) and next-word accuracy (%) on held-out
    words, with the full softmax over the whole vocabulary.

    The text is cut into windows of ``context + 1`` words; each window predicts its last ``context``.
    """
    model.eval()
    windows = min(len(tokens) - 1, max_tokens) // context
    data = tokens[: windows * context + 1]
    nll, correct, count = 0.0, 0, 0
    for i in range(0, windows, batch_size):
        rows = range(i, min(i + batch_size, windows))
        window = torch.stack([data[r * context: (r + 1) * context + 1] for r in rows])
        logits, targets = model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten()
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += targets.numel()
    return math.exp(nll / count), 100 * correct / count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.DefaultsHelpFormatter)
    p.add_argument("--vocab", type=cli.integer(), default=50_000, help="words in the vocabulary (plus <unk>)")
    p.add_argument("--steps", type=cli.integer(), default=300, help="training steps for each model")
    p.add_argument("--batch-size", type=cli.integer(), default=16, help="windows of words per training step")
    p.add_argument("--context", type=cli.integer(), default=64, help="words per training window")
    p.add_argument("--d-model", type=cli.integer(), default=128, help="model width (the head's input)")
    p.add_argument("--layers", type=cli.integer(), default=2, help="transformer layers")
    p.add_argument("--heads", type=cli.integer(), default=4, help="attention heads (dividing --d-model)")
    p.add_argument("--lr", type=cli.positive, default=6e-3,
                   help="Adam / LazyAdam learning rate (both models; 6e-3 was every head's best of 1e-3 to 1.2e-2 on "
                        "seed 0, docs/results.md \"The LM's rate\")")
    p.add_argument("--active", type=cli.integer(), default=128,
                   help="active words per token (per_row mode) or per batch (shared mode) in the LSH head")
    p.add_argument("--mode", choices=["per_row", "shared"], default="per_row",
                   help="LSHLinear mode: one active set per token, or one for the whole batch")
    p.add_argument("--tables", type=cli.auto_or(cli.integer()), default="auto",
                   help="L, hash tables (auto: LSHLinear's default for the width)")
    p.add_argument("--bits", type=cli.auto_or(cli.integer()), default="auto", help="K, bits per hash code")
    p.add_argument("--probes", type=cli.auto_or(cli.integer()), default="auto", help="buckets probed per table")
    p.add_argument("--rebuild", type=cli.integer(), default=10, help="rebuild the hash tables every this many steps")
    p.add_argument("--held-out", type=cli.fraction, default=0.05, help="fraction of the files held out")
    p.add_argument("--eval-tokens", type=cli.integer(), default=20_000, help="held-out words scored for perplexity")
    p.add_argument("--seed", type=cli.integer(0), default=0, help="seeds the weights, the batches and the hashes")
    p.add_argument("--threads", type=cli.integer(), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--random-baseline", action="store_true",
                   help="also train a third copy whose head picks its active words at random (selection='random'): "
                        "what the hashing is worth")
    p.add_argument("--uniform-tail", action="store_true",
                   help="draw the sparse heads' tails uniformly, not in proportion to the square root of each word's "
                        "count in the training text (LSHLinear(tail_proposal=), the default): at 6e-3, 128 words per "
                        "token, perplexity 180.6 against 174.0 with the counts' tail and dense's 178.5 (3 seeds), "
                        "4-9%% less per step; at 2e-3 the two tie")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    check_model_args(p, args, active=args.active, mode=args.mode, num_tables=args.tables, bits=args.bits,
                     probes=args.probes, rebuild=args.rebuild)
    return args


def check_model_args(p: argparse.ArgumentParser, args, **head) -> None:
    """What the model's options must agree on (also hf_causal_lm.py's), before the corpus loads: the
    LSHLinear ``head`` options (its width is --vocab + 1) are tried on a meta-device layer, so that one
    it refuses (--active above the vocabulary, --bits 30, ...) is named now, not after the load."""
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if args.eval_tokens < args.context:
        p.error(f"--eval-tokens {args.eval_tokens} must be at least --context {args.context} (one window)")
    try:
        lsh_torch.LSHLinear(args.d_model, args.vocab + 1, device="meta", **head)
    except (TypeError, ValueError) as error:
        p.error(f"the LSH head (--vocab {args.vocab} + <unk> words): {error}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    train_tokens, test_tokens, vocab = load_corpus(args.vocab, args.held_out, not args.no_progress)
    check_corpus(train_tokens, test_tokens, args.context, args.context + 1)  # evaluate's windows predict context words
    unk = lambda t: 100 * (t == 0).float().mean().item()  # noqa: E731
    print(f"corpus: {len(train_tokens):,} training words, {len(test_tokens):,} held-out words, vocabulary "
          f"{len(vocab):,} words (<unk>: {unk(train_tokens):.1f}% / {unk(test_tokens):.1f}%), "
          f"read in {time.perf_counter() - start:.0f} s")

    torch.manual_seed(args.seed)
    dense = TransformerLM(len(vocab), args.d_model, args.layers, args.heads, args.context)
    # The tail drawn in proportion to the root of each word's count in the training text (unless --uniform-tail).
    counts = None if args.uniform_tail else torch.bincount(train_tokens, minlength=len(vocab))
    lsh = lsh_torch.convert(copy.deepcopy(dense), min_out_features=len(vocab), active=args.active, mode=args.mode,
                            num_tables=args.tables, bits=args.bits, probes=args.probes,
                            rebuild=args.rebuild, sparse_grad=True, seed=args.seed, tail_proposal=counts)
    head = lsh.head
    runs = [("nn.Linear head, full softmax", dense), ("LSHLinear head, sparse softmax", lsh)]
    if args.random_baseline:
        runs.append(("random active words, sparse", lsh_torch.convert(
            copy.deepcopy(dense), min_out_features=len(vocab), active=args.active, mode=args.mode,
            selection="random", sparse_grad=True, seed=args.seed, tail_proposal=counts)))
    print(f"model: {sum(p.numel() for p in dense.parameters()):,} parameters; converted: "
          f"{[n for n, m in lsh.named_modules() if isinstance(m, lsh_torch.LSHLinear)]} -> {head}")

    rows = []
    for name, model in runs:
        seconds, losses = train(model, train_tokens, args, name)
        ppl, acc = evaluate(model, test_tokens, args.context, args.eval_tokens)
        rows.append((name, seconds, seconds / args.steps * 1000, ppl, acc))
        print(f"{name}: trained {args.steps} steps in {seconds:.1f} s; held-out perplexity {ppl:.1f}, "
              f"next-word accuracy {acc:.2f}%")

    plain = lsh_torch.unconvert(copy.deepcopy(lsh))  # back to nn.Linear, e.g. to ship the trained model
    probe = test_tokens[: args.context].unsqueeze(0)
    same = torch.equal(plain.eval()(probe), lsh.eval()(probe))
    print(f"lsh_torch.unconvert: {type(plain.head).__name__} head, outputs identical to the trained LSH model: {same}")

    print(f"\n{args.steps} steps of {args.batch_size} x {args.context} words, vocabulary {len(vocab):,}; LSH head: "
          f"{args.mode} mode, {args.active} active words, L={head.tables.num_tables}, K={head.tables.bits}, "
          f"{head.tables.probes} probes, rebuild every {args.rebuild} steps; {torch.get_num_threads()} threads")
    print(f"{'model':<32} {'train s':>8} {'ms/step':>8} {'held-out ppl':>13} {'accuracy %':>11}")
    for name, seconds, ms, ppl, acc in rows:
        print(f"{name:<32} {seconds:8.1f} {ms:8.1f} {ppl:13.1f} {acc:11.2f}")
    print(f"training time ratio (dense / LSH): {rows[0][1] / rows[1][1]:.2f}x; "
          f"perplexity ratio (LSH / dense): {rows[1][3] / rows[0][3]:.2f}")


if __name__ == "__main__":
    cli.run(main)
