"""Train a small Hugging Face GPT-2 with and without lsh_torch's patch() for the same wall time.

    python examples/hf_causal_lm.py              # 6.5 minutes on 2 busy CPU cores (measured)
    python examples/hf_causal_lm.py --help

The patched model is the same ``GPT2LMHeadModel``, trained the way every transformers user trains
it: ``model(input_ids, labels=labels).loss``. One call,
``lsh_torch.integrations.transformers.patch(model)``, makes that training step score only the
active words of the vocabulary (each target forced in, the words the hash tables find, and a
corrected uniform tail: LSHLinear's defaults for the width) instead of building the
``[tokens, vocabulary]`` logits; eval, ``generate()`` and ``save_pretrained`` are unchanged.

Data: the Python standard library's sources split into words, as in ``examples/transformer_lm.py``
(a 50,001-word vocabulary, no tokenizer download). Model: a random ``GPT2Config`` (2 layers,
width 128, output head tied to the input embedding). Both models start from the same weights, see
the same batches and use AdamW; each trains for ``--seconds`` of wall time (evaluation excluded).
At ``--evals`` points each model's held-out loss is computed exactly, in eval mode, with the full
softmax over the whole vocabulary (transformers' own loss), and the table shows both at equal
training time.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # noqa: E402
from transformer_lm import batches, check_corpus, check_model_args, load_corpus  # noqa: E402  (the LM example's data)

import lsh_torch.integrations.transformers as lsh_hf  # noqa: E402


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, context: int, max_tokens: int, batch_size: int = 16) -> float:
    """Mean next-word loss over held-out windows, exact (eval mode: the full softmax)."""
    model.eval()
    windows = min(len(tokens), max_tokens) // context
    data = tokens[: windows * context].view(windows, context)
    total, count = 0.0, 0
    for i in range(0, windows, batch_size):
        rows = data[i: i + batch_size]
        n = rows.shape[0] * (context - 1)
        total += model(input_ids=rows, labels=rows).loss.item() * n
        count += n
    model.train()
    return total / count


def train_for(model, data, test, args, name: str) -> tuple[list[tuple[float, int, float]], float]:
    """Train for ``args.seconds`` of wall time: (seconds, steps, held-out loss) at each of the
    ``args.evals`` marks, and the training seconds measured (evaluation excluded)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    marks = [args.seconds * (i + 1) / args.evals for i in range(args.evals)]
    points = [(0.0, 0, held_out_loss(model, test, args.context, args.eval_tokens))]
    clock, steps = 0.0, 0
    model.train()
    for inputs, targets in batches(data, args.batch_size, args.context, 10 ** 9, args.seed):
        start = time.perf_counter()
        window = torch.cat([inputs, targets[:, -1:]], 1)  # labels = input_ids: the model shifts them
        loss = model(input_ids=window, labels=window).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock += time.perf_counter() - start
        steps += 1
        # Points at the nominal marks (the overshoot: under one step); a step longer than the time
        # between marks passes several, each given this evaluation, so both models have every mark.
        passed = [mark for mark in marks if clock >= mark]
        if passed:
            del marks[:len(passed)]
            held_out = held_out_loss(model, test, args.context, args.eval_tokens)
            points += [(mark, steps, held_out) for mark in passed]
            kind = "train loss" if name == "unpatched" else "train loss (sampled estimate)"
            print(f"  {name}: {clock:6.1f} s, {steps:5d} steps, {kind} {loss.item():.3f}, "
                  f"held-out loss {held_out:.3f}", flush=True)
            if not marks:
                return points, clock


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.DefaultsHelpFormatter)
    p.add_argument("--seconds", type=cli.positive, default=100.0, help="training wall time for each model")
    p.add_argument("--evals", type=cli.integer(), default=5, help="held-out evaluations during training")
    p.add_argument("--vocab", type=cli.integer(), default=50_000, help="words in the vocabulary (plus <unk>)")
    p.add_argument("--batch-size", type=cli.integer(), default=16, help="windows of tokens per training step")
    # 2 at least: a held-out window of ``context`` words scores its last context - 1
    p.add_argument("--context", type=cli.integer(2), default=64, help="words per training window")
    p.add_argument("--d-model", type=cli.integer(), default=128, help="GPT-2 width (n_embd)")
    p.add_argument("--layers", type=cli.integer(), default=2, help="GPT-2 layers (n_layer)")
    p.add_argument("--heads", type=cli.integer(), default=4, help="attention heads (n_head, dividing --d-model)")
    p.add_argument("--lr", type=cli.positive, default=2e-3, help="AdamW learning rate (both models)")
    p.add_argument("--active", type=cli.auto_or(cli.integer()), default="auto",
                   help="active words per batch (auto: LSHLinear's default for the width: 2,048, half a corrected "
                        "tail; every word up to 8,192)")
    p.add_argument("--eval-tokens", type=cli.integer(), default=8_192, help="held-out words scored at each evaluation")
    p.add_argument("--held-out", type=cli.fraction, default=0.05, help="fraction of the files held out")
    p.add_argument("--seed", type=cli.integer(0), default=0, help="seeds the weights, the batches and the hashes")
    p.add_argument("--threads", type=cli.integer(), default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    check_model_args(p, args, active=args.active)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    start = time.perf_counter()
    train_tokens, test_tokens, vocab = load_corpus(args.vocab, args.held_out, progress=False)
    check_corpus(train_tokens, test_tokens, args.context, args.context)  # held_out_loss's windows: context words
    print(f"corpus: {len(train_tokens):,} training words, {len(test_tokens):,} held-out words, vocabulary "
          f"{len(vocab):,}, read in {time.perf_counter() - start:.0f} s")

    config = GPT2Config(vocab_size=len(vocab), n_positions=args.context + 1, n_embd=args.d_model,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(args.seed)
    plain = GPT2LMHeadModel(config)
    patched = lsh_hf.patch(copy.deepcopy(plain), active=args.active, seed=args.seed)
    head = patched.lm_head
    described = (f"every one of its {head.out_features:,} words (the exact softmax: at most 8,192 words)"
                 if head.exact_softmax else
                 f"{head.budget} active words per batch ({head.mode} mode), L={head.tables.num_tables}, "
                 f"K={head.tables.bits}, {head.tables.probes} probes")
    print(f"model: GPT2LMHeadModel, {sum(p.numel() for p in plain.parameters()):,} parameters; patched head: "
          f"{described}; {torch.get_num_threads()} threads")

    results, seconds = {}, {}
    for name, model in (("unpatched", plain), ("patched", patched)):
        results[name], seconds[name] = train_for(model, train_tokens, test_tokens, args, name)

    with tempfile.TemporaryDirectory() as path:  # the patched model ships as a plain GPT-2 checkpoint
        patched.save_pretrained(path)
        loaded = GPT2LMHeadModel.from_pretrained(path).eval()
        probe = test_tokens[: args.context][None]
        same = torch.equal(loaded(probe).logits, patched.eval()(probe).logits)
    print(f"save_pretrained -> GPT2LMHeadModel.from_pretrained: {type(loaded.lm_head).__name__} head, "
          f"logits identical to the patched model's: {same}")

    print(f"\nheld-out loss (exact, full softmax over {len(vocab):,} words; perplexity = e^loss) against "
          f"training wall time; batches of {args.batch_size} x {args.context + 1} words")
    print(f"{'train s':>8} | {'unpatched steps':>15} {'loss':>7} {'ppl':>8} | {'patched steps':>13} {'loss':>7} "
          f"{'ppl':>8}")
    for (t, s0, l0), (_, s1, l1) in zip(results["unpatched"], results["patched"]):
        print(f"{t:8.2f} | {s0:15d} {l0:7.3f} {math.exp(l0):8.1f} | {s1:13d} {l1:7.3f} {math.exp(l1):8.1f}")
    # The measured training time: the last step overshoots --seconds, by more than it where steps are slow.
    ms = {name: 1000 * seconds[name] / points[-1][1] for name, points in results.items()}
    print(f"ms/step: unpatched {ms['unpatched']:.0f}, patched {ms['patched']:.0f} "
          f"({ms['unpatched'] / ms['patched']:.1f}x the steps per second)")


if __name__ == "__main__":
    cli.run(main)
