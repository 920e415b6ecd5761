"""Extreme multi-label classification with an LSHLinear output layer (the SLIDE setting), on CPU or GPU.

    python examples/xmc.py                      # synthetic data, 100,000 labels: about 4 min on 2 cores
    python examples/xmc.py --quick              # a smaller run (2-3 minutes on 2 cores)
    python examples/xmc.py --data train.txt --test-data test.txt   # Amazon-670K, Delicious-200K, ... files
    python examples/xmc.py --generate data/xmc  # only write the built-in data's train/test files
    python examples/xmc.py --structure tree     # synthetic labels in a hierarchy (confusable siblings)
    python examples/xmc.py --structure text     # real text: 24 stdlib words -> the less common of the next 8
    python examples/xmc.py --device cuda        # the same comparison on a GPU
    torchrun --nproc-per-node 2 examples/xmc.py # data parallel trunk, sharded head (gloo; NCCL with --device cuda)
    python examples/xmc.py --help

Under torchrun (WORLD_SIZE and RANK set) each rank trains on its share of every global batch of
``--batch-size`` (so the steps are the single-process run's), the trunk under DDP
(``lsh_torch.distributed.data_parallel``; the sparse embedding's gradients averaged by
``all_reduce_sparse_grads``), the lsh and random heads as a ``ShardedLSHLinear`` with the budget
split over the shards, the dense head replicated under DDP; P@k from the sharded exact top-k
(global ids); rank 0 prints and writes the files.

The network is SLIDE's: sparse input features -> ``nn.EmbeddingBag`` (sum of feature embeddings
weighted by the feature values) -> 128 hidden units (ReLU) -> one output per label. The same
network, from the same initial weights, on the same batches, is trained with three output layers:

  lsh     LSHLinear.forward_sparse(h, labels) + lsh_torch.sparse_cross_entropy: each step computes
          ``--active`` outputs: the labels, the best-scoring of the outputs the hash tables find,
          and uniform draws from the rest whose logits the loss corrects (docs/estimator.md); the
          first ``--warmup-epochs`` (1) draw random outputs instead (``LSHLinear(warmup=)``)
  random  the same machinery with ``selection="random"``: labels plus uniformly random outputs,
          corrected alike, the same budget (a sampled softmax; what the hashing is worth)
  dense   nn.Linear + full softmax over every label (F.cross_entropy, the target mass spread
          evenly over a point's labels)

Optimizers: the input embedding is sparse (``sparse=True``) in all three and uses
``lsh_torch.LazyAdam`` (``torch.optim.SparseAdam``'s arithmetic in one fused pass: 3-4 ms less per
step here), so the output layer is the only difference; the LSH and random output layers have
row-sparse gradients (``sparse_grad=True``) and use LazyAdam too; the dense output layer and the
hidden bias use ``torch.optim.Adam``. Precision@k is measured on held-out points
with exact scores (``LSHLinear.topk(h, k, exact=True)``, the same computation as the dense
layer's); the LSH top-k (``exact=False``: candidates from topk's own index, which topk checks on
64 test points; where it found less than ``min_recall`` (0.95) of their top 5, its likeliest rows alone stand in,
checked on 64 others, or else exact scores) is reported too, and
the held-out loss: the full softmax's cross-entropy, every output computed (what the sampled losses
estimate; P@k reads only the top of the softmax).

The runs take turns: a quarter epoch (``--eval-every``) of each in turn, each on its own clock, so
that a shared machine's changing speed falls on all of them alike (the dense run, with fewer
epochs, leaves the turn first). Wall time counts training steps only (evaluation excluded); on a
GPU each step ends with ``torch.cuda.synchronize()`` so that it counts the step's kernels, and
includes copying the batch to the device. Results: a table on stdout, a PNG of P@1 against
training wall time (``--plot``) and a JSON of every curve (``--json``).
"""
from __future__ import annotations

import os
import platform

# Threads that wait for work by sleeping, not spinning: on a machine shared with other processes,
# spinning OpenMP threads make the small ops of a sparse step 10-100x slower (measured: the LSH
# step at 100,000 outputs, 2 threads on 2 busy cores, 706 ms spinning vs 47 ms passive). Set
# before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # xmc_data and cli next to this file
import cli  # noqa: E402
import xmc_data  # noqa: E402

import lsh_torch  # noqa: E402
from lsh_torch import GrowingSchedule, LSHLinear, sparse_cross_entropy  # noqa: E402
from lsh_torch import hashing  # noqa: E402
from lsh_torch.retrieval import TOPK_MIN_RECALL  # noqa: E402
from lsh_torch.distributed import (ShardedLSHLinear, all_reduce_sparse_grads, data_parallel,  # noqa: E402
                                   shard_range)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "benchmarks", "results")


# ---------------------------------------------------------------------------------------------
# Model

class XMCNet(nn.Module):
    """Sparse features -> EmbeddingBag(sum, per-sample weights) + bias -> ReLU -> output layer."""

    def __init__(self, num_features: int, num_labels: int, hidden: int = 128, output: nn.Module | None = None):
        super().__init__()
        self.embed = nn.EmbeddingBag(num_features, hidden, mode="sum", sparse=True)
        nn.init.normal_(self.embed.weight, std=1.0)  # values are L2-normalized: hidden units ~ N(0, 1)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))
        self.out = output if output is not None else nn.Linear(hidden, num_labels)

    def hidden(self, ids: Tensor, offsets: Tensor, values: Tensor) -> Tensor:
        return torch.relu(self.embed(ids, offsets, per_sample_weights=values) + self.hidden_bias)

    forward = hidden  # the trunk, for DistributedDataParallel (which calls forward)


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised (under torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def build(kind: str, mode: str, data: xmc_data.XMCData, args, budget: int) -> XMCNet:
    """The network with an output layer of ``kind`` ("dense", "lsh" or "random"); same init for all.
    Under torchrun the LSH and random layers are a ShardedLSHLinear with ``budget`` split evenly
    over the shards (each rank holds the rows of the same single-process initial layer)."""
    torch.manual_seed(args.seed)
    net = XMCNet(data.num_features, data.num_labels, args.hidden).to(args.device)
    if kind != "dense":
        _, size = world()
        warmup = round(args.warmup_epochs * math.ceil(len(data) / args.batch_size)) if kind == "lsh" else 0
        net.out = (ShardedLSHLinear if size > 1 else LSHLinear).from_linear(
            net.out, active=budget // size, mode=mode, selection="lsh" if kind == "lsh" else "random",
            num_tables=args.tables, bits=args.bits, probes=args.probes, tail=args.tail, rescore=args.rescore,
            rebuild=rebuild_schedule(args.rebuild), sparse_grad=True, seed=args.seed,
            asymmetric=True if args.asymmetric else "auto",
            hash=args.hash if args.bin_size is None else hashing.DWTA(args.bin_size),
            warmup=warmup, tail_proposal=(torch.as_tensor(data.label_counts(), dtype=torch.float64)
                                          if args.tail_proposal == "labels" else None))
        if args.norm_rows_share is not None:  # a class attribute of the layer, set on each (shard's) layer
            for layer in net.out.modules():
                if isinstance(layer, LSHLinear):
                    layer.norm_rows_share = args.norm_rows_share
    return net


def to_device(batch, device: torch.device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


def sync(device: torch.device) -> None:
    """Waits for the device's queued kernels, so that a wall-clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rebuild_schedule(spec: str):
    """An int period, ``"growing"`` (``GrowingSchedule()``) or ``"growing:INITIAL:GROWTH:MAX"``."""
    name, *parts = spec.split(":")
    if name == "growing":
        if not parts:
            return GrowingSchedule()
        if len(parts) != 3:
            raise ValueError("growing takes three values, INITIAL:GROWTH:MAX")
        return GrowingSchedule(int(parts[0]), float(parts[1]), int(parts[2]))
    return int(spec)


def rebuild_spec(text: str) -> str:
    """--rebuild's type: the schedule is checked now, the text kept (the JSON records it)."""
    try:
        if isinstance(rebuild_schedule(text), int) and int(text) < 1:
            raise ValueError("a period is at least 1")
    except (ValueError, IndexError) as exc:
        raise argparse.ArgumentTypeError(f"must be an int period of at least 1, growing or "
                                         f"growing:INITIAL:GROWTH:MAX, got {text!r} ({exc})") from None
    return text


RUNS = ("lsh", "random", "dense", "lsh-shared", "lsh-per_row", "random-shared", "random-per_row")


def runs_spec(text: str) -> str:
    """--runs' type: each run is checked now, the text kept (the JSON records it)."""
    runs = cli.listing(cli.choice(*RUNS), "runs")(text)
    repeated = sorted({run for run in runs if runs.count(run) > 1})
    if repeated:  # (one run trained twice, its row printed twice)
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once in {text!r}")
    return text


KINDS = ("lsh", "random", "dense")  # a run's kind: its name without the mode suffix


def rates_spec(text: str) -> dict[str, float]:
    """--lr's and --out-lr's type: one rate for every kind of run, kind=rate pairs for some, or both
    ('0.04', 'random=0.002', '0.003,random=0.006'); ``"*"`` keys the bare rate. :func:`parse_args`
    fills in the kinds left out from the option's default."""
    rates = {}
    for item in text.split(","):
        kind, _, rate = item.strip().rpartition("=")
        kind = kind.strip() or "*"
        if kind != "*" and kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{kind!r} in {text!r} is not a kind of run: expected one of "
                                             f"{', '.join(KINDS)}")
        if kind in rates:
            raise argparse.ArgumentTypeError(f"{'a bare rate' if kind == '*' else kind} given twice in {text!r}")
        rates[kind] = cli.positive(rate.strip())
    return rates


def learning_rates(kind: str, args) -> tuple[float, float]:
    """A run's learning rates: the network's (input embedding, hidden bias) and the output layer's."""
    return args.lr[kind], args.out_lr[kind]


def optimizers(net: XMCNet, kind: str, lr: float, out_lr: float, weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
    """LazyAdam for the sparse embedding (and a sparse output layer), Adam for the dense rest;
    ``weight_decay`` (AdamW's, decoupled) on the two weight matrices, not on the biases."""
    out = [{"params": [net.out.weight], "weight_decay": weight_decay}, {"params": [net.out.bias]}]
    opts = [lsh_torch.LazyAdam([net.embed.weight], lr=lr, weight_decay=weight_decay)]
    if kind == "dense":  # fused: the for-loop AdamW is the slow baseline no user would pick
        opts.append(torch.optim.AdamW([{"params": [net.hidden_bias], "lr": lr}] + out, lr=out_lr, weight_decay=0.0,
                                      fused=True))
    else:
        opts.append(torch.optim.Adam([net.hidden_bias], lr=lr))
        opts.append(lsh_torch.LazyAdam(out, lr=out_lr))
    return opts


def loss_fn(net: XMCNet, kind: str, batch, uncorrected: bool = False, trunk: nn.Module | None = None,
            label_smoothing: float = 0.0) -> Tensor:
    """The training loss; ``trunk`` computes the hidden layer (the DDP wrapper of ``net`` under torchrun)."""
    ids, offsets, values, labels = batch
    h = (trunk if trunk is not None else net)(ids, offsets, values)
    if kind == "dense":
        return full_softmax_loss(net.out(h), labels, label_smoothing=label_smoothing)
    out = net.out.forward_sparse(h, labels)
    return sparse_cross_entropy(out._replace(log_weights=None) if uncorrected else out, labels,
                                label_smoothing=label_smoothing)


def full_softmax_loss(logits: Tensor, labels: Tensor, reduce: bool = True, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of the softmax over every label, the target mass spread evenly over a point's
    distinct labels (``labels`` padded with -1; ``label_smoothing`` as ``F.cross_entropy``'s): the dense
    layer's loss, which the sampled ones estimate. The mean over points with labels, or
    (``reduce=False``) the sum and that count."""
    # The labels' entries of log_softmax, gathered: a dense [B, labels] target (scatter, sum, divide, and
    # F.cross_entropy's product with it) made the dense step 1.3-1.55x as long at 100,000 labels (a review's
    # paired runs), the held-out loss 6.2 against 4.0 s per 1,000 points at 670,091.
    labels = labels.sort(1).values
    counted = labels >= 0
    counted[:, 1:] &= labels[:, 1:] != labels[:, :-1]  # a label repeated on a point counts once
    count = counted.sum(1)
    log_probs = logits.log_softmax(1)
    loss = -(1 - label_smoothing) * log_probs.gather(1, labels.clamp_min(0)).where(counted, 0).sum(1) / count.clamp_min(1)
    if label_smoothing:  # its share spread over every output
        loss = loss - label_smoothing * log_probs.mean(1)
    loss = loss.where(count > 0, 0).sum()  # no labels, no loss (smoothing would give one)
    points = (count > 0).sum()
    return loss / points.clamp_min(1) if reduce else torch.stack([loss, points.to(loss.dtype)])


# ---------------------------------------------------------------------------------------------
# Evaluation

def precision_at(top, labels, ks=(1, 3, 5)) -> dict[str, float]:
    """P@k over all points: the fraction of the top k predictions that are true labels, averaged.
    ``top`` and ``labels`` may be lists of batches, each batch's labels padded to its own widest point
    (a whole split's, padded to its most-labelled point, took 2.5 GB for 100,000 points and one of 2,000)."""
    tops, labels = (top, labels) if isinstance(top, list) else ([top], [labels])
    hit = torch.cat([(t.unsqueeze(2) == y.unsqueeze(1)).any(2) for t, y in zip(tops, labels)]).float()  # [n, kmax]
    return {f"P@{k}": float(hit[:, :k].sum(1).div(k).mean()) for k in ks}


@torch.no_grad()
def evaluate(net: XMCNet, kind: str, data: xmc_data.XMCData, batch_size: int = 1024, exact: bool = True,
             k: int = 5) -> tuple[dict[str, float], float]:
    """Precision@1,3,5 on ``data`` and the seconds the top-k took (hidden layer excluded).
    Under torchrun every rank passes the whole split (the trunk is replicated): a ShardedLSHLinear's
    top-k then scores the gathered copies, each shard half the rows for twice the points, the same
    work as one process; no P@k merging is needed."""
    was_training = net.training
    net.eval()
    tops, labels, seconds, device = [], [], 0.0, net.hidden_bias.device
    for batch in data.batches(batch_size, shuffle=False):
        ids, offsets, values, _ = to_device(batch, device)
        h = net.hidden(ids, offsets, values)
        sync(device)
        start = time.perf_counter()
        if kind == "dense":
            top = net.out(h).topk(k, dim=1).indices
        else:
            top = net.out.topk(h, k, exact=exact)[1]
        sync(device)
        seconds += time.perf_counter() - start
        tops.append(top.cpu())
        labels.append(batch[3])
    net.train(was_training)
    return precision_at(tops, labels), seconds


@torch.no_grad()
def held_out_loss(net: XMCNet, kind: str, data: xmc_data.XMCData, batch_size: int | None = None) -> float | None:
    """:func:`full_softmax_loss` on ``data`` with every output computed exactly, whatever the head:
    how well the full softmax is fitted (P@k reads only the top of it; a sampled estimator that
    ranks well can still be badly calibrated). None for a sharded head (a rank holds part of the rows).
    Default batches hold at most 2**25 logits (128 MB in float32; 50 points at 670,091 labels)."""
    if kind != "dense" and world()[1] > 1:
        return None
    batch_size = batch_size or max(1, min(256, 2 ** 25 // data.num_labels))
    was_training = net.training
    net.eval()
    device = net.hidden_bias.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in data.batches(batch_size, shuffle=False):
        ids, offsets, values, labels = to_device(batch, device)
        h = net.hidden(ids, offsets, values)
        logits = (net.out(h) if kind == "dense" else F.linear(h, net.out.weight, net.out.bias)).float()
        total += full_softmax_loss(logits, labels, reduce=False).double()
    net.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


def curve_point(net: XMCNet, kind: str, eval_data: xmc_data.XMCData) -> tuple[float, float | None]:
    """P@1 and :func:`held_out_loss` on the eval subset: one point of a run's curve."""
    return evaluate(net, kind, eval_data)[0]["P@1"], held_out_loss(net, kind, eval_data)


# ---------------------------------------------------------------------------------------------
# Training

@dataclass
class Run:
    name: str
    kind: str
    mode: str
    budget: int
    curve: list = field(default_factory=list)  # (train seconds, step, epoch, P@1, held-out loss), eval subset
    epoch_seconds: list = field(default_factory=list)
    train_seconds: float = 0.0
    rebuilds: int = 0
    rebuild_seconds: float = 0.0
    steps: int = 0
    final: dict = field(default_factory=dict)
    lsh_topk: dict = field(default_factory=dict)


def min_budget(data: xmc_data.XMCData, batch_size: int, epochs: int, seed: int, mode: str, shards: int = 1) -> int:
    """The fewest active outputs that hold every batch's labels (shared) or every point's (per row),
    in the shard of ``shards`` (``shard_range``) that needs the most."""
    counts = np.diff(data.label_offsets)
    if mode == "per_row":
        return int(counts.max(initial=1))
    ends = [shard_range(data.num_labels, r, shards)[1] for r in range(shards)]
    need = 1
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(len(data))
        for start in range(0, len(data), batch_size):
            _, sel = xmc_data._gather_csr(data.label_offsets, order[start:start + batch_size])
            shard = np.searchsorted(ends, np.unique(data.label_ids[sel]), side="right")
            need = max(need, int(np.bincount(shard, minlength=shards).max()))
    return need


def active_budget(data: xmc_data.XMCData, args, mode: str, seed: int, shards: int = 1) -> int:
    """The active outputs of an lsh or random layer trained on ``data`` in batches seeded from
    ``seed`` (as :func:`min_budget`): ``--active`` (shared) or ``--active-per-row``, split evenly
    over ``shards`` and raised to hold every batch's labels (a margin for the tables' picks), at most
    the narrowest shard's width; the whole layer's count (per shard x shards)."""
    want = args.active if mode == "shared" else args.active_per_row
    need = min_budget(data, args.batch_size, args.epochs, seed, mode, shards)
    return shards * min(data.num_labels // shards, max(-(-want // shards), need + 64 if mode == "shared" else need + 8))


def train_in_turns(runs: list[Run], train_data, eval_data, test_data, args) -> None:
    """Trains every run, one evaluation interval (``--eval-every``) of each in turn (who goes first
    rotates), each on its own clock. A shared machine's speed drifts over minutes (measured: the
    hierarchy's uniform runs, 5 epochs, 3 seeds, 10.1 s on average, and 12.6 s 20 minutes later);
    taking turns, the drift falls on every run alike, so their times compare. Turns of one step
    were unfair to the sparse runs: a dense step evicts their tables and rows from the caches (the
    demo's LSH and uniform runs took 20.8 and 13.0 s beside dense against 16.0 and 10.5 s one after
    another; 16.6 and 10.0 s in turns of a quarter epoch). A run that finishes leaves the turn."""
    active = [train(run, train_data, eval_data, test_data, args, position=i) for i, run in enumerate(runs)]
    turn, finished = 0, object()
    while active:
        first = turn % len(active)
        for steps in active[first:] + active[:first]:
            if next(steps, finished) is finished:
                active.remove(steps)
        turn += 1


def train(run: Run, train_data, eval_data, test_data, args, position: int = 0):
    """Trains ``run`` (filling in its curve, times and results), yielding after every evaluation;
    :func:`train_in_turns` interleaves the runs. Evaluation is off the clock."""
    net = build(run.kind, run.mode, train_data, args, run.budget)
    rank, size = world()
    # Under torchrun: DDP for the dense parameters; the sparse embedding's gradients are averaged
    # by all_reduce_sparse_grads, a ShardedLSHLinear head is left alone (lsh_torch.distributed).
    trunk = data_parallel(net, **({"device_ids": [args.device]} if args.device.type == "cuda" else {})) \
        if size > 1 else None
    opts = optimizers(net, run.kind, *learning_rates(run.kind, args), args.weight_decay)
    epochs = args.dense_epochs if run.kind == "dense" else args.epochs
    steps_per_epoch = math.ceil(len(train_data) / args.batch_size)
    eval_every = max(1, round(steps_per_epoch * args.eval_every))
    rebuild_timer = (_RebuildTimer(net.out.shard if size > 1 else net.out, args.device)
                     if run.kind != "dense" else None)
    run.curve.append((0.0, 0, 0.0, *curve_point(net, run.kind, eval_data)))
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"{run.name:>14}", unit="step", leave=True, dynamic_ncols=True,
               file=sys.stdout, mininterval=1.0, position=position)
    net.train()
    for epoch in range(epochs):
        epoch_start = run.train_seconds
        batches = train_data.batches(args.batch_size, seed=args.seed + epoch, part=(rank, size))
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            loss = loss_fn(net, run.kind, to_device(batch, args.device), args.uncorrected, trunk, args.label_smoothing)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if trunk is not None:
                all_reduce_sparse_grads(trunk)
            for opt in opts:
                opt.step()
            sync(args.device)
            run.train_seconds += time.perf_counter() - start
            run.steps += 1
            bar.update(1)
            if run.steps % eval_every == 0 or run.steps == epochs * steps_per_epoch:
                p1, _ = point = curve_point(net, run.kind, eval_data)
                run.curve.append((run.train_seconds, run.steps, run.steps / steps_per_epoch, *point))
                bar.set_postfix(loss=f"{loss.item():.3f}", P1=f"{p1:.3f}", t=f"{run.train_seconds:.0f}s")
                yield
        run.epoch_seconds.append(run.train_seconds - epoch_start)
    bar.close()
    if rebuild_timer is not None:
        run.rebuilds, run.rebuild_seconds = rebuild_timer.count, rebuild_timer.seconds
    run.final, exact_s = evaluate(net, run.kind, test_data)
    run.final["topk_s"] = exact_s
    run.final["loss"] = held_out_loss(net, run.kind, test_data)
    if run.kind != "dense":
        lsh, lsh_s = evaluate(net, run.kind, test_data, exact=False)
        run.lsh_topk = {**lsh, "topk_s": lsh_s, **topk_record(getattr(net.out, "shard", net.out))}
    if args.save_head and run.kind == "lsh" and world()[1] == 1:
        save_head(net, test_data, args.save_head)


@torch.no_grad()
def save_head(net: XMCNet, data: xmc_data.XMCData, path: str) -> None:
    """The trained output layer (weights and LSHLinear options) and the hidden vectors of ``data``, for
    ``benchmarks/bench_topk.py --model``: top-k speed and recall on a trained model."""
    net.eval()
    hidden = torch.cat([net.hidden(*to_device(batch, net.hidden_bias.device)[:3]).cpu()
                        for batch in data.batches(1024, shuffle=False)])
    out = net.out
    config = {"num_tables": out.tables.num_tables, "bits": out.tables.bits, "probes": out.tables.probes,
              "active": out.budget, "mode": out.mode, "asymmetric": out.tables.asymmetric,
              "center": out.tables.center, "seed": out.seed, "rescore": out.rescore, "hash": out.tables.hash.name}
    # A DWTA family's bin size beside the config (torch.load's weights_only reads no hashing.DWTA): bench_topk
    # rebuilds it; without the family a --hash dwta head reloaded as srp.
    torch.save({"state_dict": {k: v.cpu() for k, v in out.state_dict().items()}, "config": config,
                "hash_bin_size": getattr(out.tables.hash, "bin_size", None), "hidden": hidden}, cli.with_folder(path))
    print(f"saved the output layer and {len(hidden):,} test hidden vectors: {path}")


def warm_up(data, args, steps: int = 20) -> None:
    """A few untimed steps first, so that the first timed run does not pay the process's one-time
    costs (thread pool start, allocator growth) alone: measured, they made its first 39 steps 30%
    slower than the same steps of a later run."""
    net = build("random", "shared", data, args, min(data.num_labels, args.active))
    opts = optimizers(net, "random", *learning_rates("random", args))
    for _, batch in zip(range(steps), data.batches(args.batch_size, seed=args.seed)):
        loss = loss_fn(net, "random", to_device(batch, args.device))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()


class _RebuildTimer:
    """Counts and times an LSHLinear's table builds (wraps its tables' ``build``, which the rebuild
    schedule, the first lookup and ``rebuild()`` all run)."""

    def __init__(self, layer: LSHLinear, device: torch.device):
        self.count, self.seconds, inner = 0, 0.0, layer.tables.build

        def timed(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            inner(*args, **kwargs)
            sync(device)
            self.count += 1
            self.seconds += time.perf_counter() - start
        layer.tables.build = timed


# ---------------------------------------------------------------------------------------------
# Report

def time_to_reach(curve, target: float) -> float | None:
    for seconds, _, _, p1, _ in curve:
        if p1 >= target:
            return seconds
    return None


def p1_at(curve, seconds: float) -> float:
    """P@1 after ``seconds`` of training, interpolated linearly between the evaluations around it
    (the last one after the run's end): runs evaluated at different moments compare fairly."""
    times, p1s = [c[0] for c in curve], [c[3] for c in curve]
    return float(np.interp(seconds, times, p1s))


def topk_record(layer: LSHLinear, k: int = 5) -> dict:
    """What LSHLinear.topk's checks measured (settings (k, probes, budget, norm rows), recall, inputs
    checked), in order, and who answers its top ``k`` now (:meth:`LSHLinear.topk_answered_by`)."""
    answered = layer.topk_answered_by(k)
    return {"checks": [(list(key), c.recall, c.inputs) for key, c in layer.topk_checks.items()],
            "answered_by": None if answered is None else list(answered)}


def topk_fallback(lsh_topk: dict) -> str | None:
    """Why LSHLinear.topk did not answer from its index (see its min_recall), or None: it did, or
    nothing was checked (see :func:`topk_record`)."""
    checks, by = lsh_topk.get("checks") or [], lsh_topk.get("answered_by")
    if not checks or by is not None and by[2] != 0:
        return None
    _, recall, inputs = checks[0]
    why = (f"its index found {recall:.3f} of the exact top 5 of {inputs} checked test points, less than "
           f"min_recall={TOPK_MIN_RECALL}")
    if by is None:
        return f"topk answered exactly: {why}"
    alone = next((c for c in checks if c[0] == by), None)
    found = "" if alone is None else f"; they found {alone[1]:.3f} of {alone[2]} other test points'"
    return f"topk answered from the {by[3]:,} likeliest rows alone: {why}{found}"


def report(runs: list[Run], popular: dict, args) -> dict:
    print()
    head = (f"{'output layer':<16}{'budget':>8}{'P@1':>8}{'P@3':>8}{'P@5':>8}{'loss':>7}{'train s':>9}{'s/epoch':>9}"
            f"{'steps':>7}{'rebuilds':>12}{'LSH top-k P@1/3/5':>20}{'top-k ms':>20}")
    print(head)
    print("-" * len(head))
    print(f"{'most popular':<16}{'':>8}{popular['P@1']:>8.3f}{popular['P@3']:>8.3f}{popular['P@5']:>8.3f}")
    for r in runs:
        lsh = (f"{r.lsh_topk['P@1']:.3f}/{r.lsh_topk['P@3']:.3f}/{r.lsh_topk['P@5']:.3f}" if r.lsh_topk else "")
        if r.lsh_topk and topk_fallback(r.lsh_topk):
            lsh += "*"
        ms = (f"{1e3 * r.final['topk_s']:.0f}" + (f" (LSH {1e3 * r.lsh_topk['topk_s']:.0f})" if r.lsh_topk else ""))
        rebuilds = f"{r.rebuilds} ({r.rebuild_seconds:.1f}s)" if r.kind != "dense" else ""
        loss = "n/a" if r.final["loss"] is None else f"{r.final['loss']:.2f}"
        print(f"{r.name:<16}{(r.budget if r.kind != 'dense' else ''):>8}{r.final['P@1']:>8.3f}{r.final['P@3']:>8.3f}"
              f"{r.final['P@5']:>8.3f}{loss:>7}{r.train_seconds:>9.1f}{float(np.median(r.epoch_seconds)):>9.1f}{r.steps:>7}"
              f"{rebuilds:>12}{lsh:>20}{ms:>20}")
    print("P@k on the full test split with exact scores; loss = the full-softmax cross-entropy on it (dense's "
          "training loss, every output computed); train s = training steps only (no evaluation); "
          "s/epoch = median; top-k ms = time of the test split's top-5 (exact; LSH candidates)")
    for r in runs:
        if r.lsh_topk and topk_fallback(r.lsh_topk):
            print(f"* {r.name}: {topk_fallback(r.lsh_topk)}")
    summary = {}
    dense = next((r for r in runs if r.kind == "dense"), None)
    if dense is not None:
        best = max(c[3] for c in dense.curve)
        print(f"\ndense: best P@1 {best:.3f} (eval subset) in {dense.train_seconds:.1f}s of training")
        summary["dense_best_p1"] = best
        for r in runs:
            if r.kind == "dense":
                continue
            t = time_to_reach(r.curve, best - 0.01)
            frac = None if t is None else t / dense.train_seconds
            summary[f"{r.name}_time_to_dense_best_minus_1pt_s"] = t
            print(f"{r.name}: reaches dense best - 1 point ({best - 0.01:.3f}) "
                  + (f"after {t:.1f}s = {frac:.3f} of the dense wall time (target <= 0.1)" if t is not None
                     else "never in this run"))
    lsh_runs = [r for r in runs if r.kind == "lsh"]
    rand_runs = {r.mode: r for r in runs if r.kind == "random"}
    for r in lsh_runs:
        rnd = rand_runs.get(r.mode)
        if rnd is None:
            continue
        span = min(r.train_seconds, rnd.train_seconds)
        points = [span * i / 10 for i in range(1, 11)]
        lead = [p1_at(r.curve, t) - p1_at(rnd.curve, t) for t in points]
        print(f"\nequal wall time, P@1 {r.name} vs {rnd.name} (eval subset):")
        print("  " + "  ".join(f"{t:>5.1f}s" for t in points))
        print("  " + "  ".join(f"{p1_at(r.curve, t):>6.3f}" for t in points) + f"  {r.name}")
        print("  " + "  ".join(f"{p1_at(rnd.curve, t):>6.3f}" for t in points) + f"  {rnd.name}")
        print(f"  {r.name} ahead at {sum(d > 0 for d in lead)} of 10 times, by {100 * max(lead):+.1f} points at "
              f"best and {100 * min(lead):+.1f} at worst")
        best = max(c[3] for c in r.curve + rnd.curve)
        levels = [round(f * best, 3) for f in (0.5, 0.75, 0.9, 0.95)]  # fractions of the best P@1 of the two
        cells = [(lv, time_to_reach(r.curve, lv), time_to_reach(rnd.curve, lv)) for lv in levels]
        print(f"  seconds to reach P@1 ({r.name} vs {rnd.name}) " + ", ".join(
            f"{lv:.2f}: {'-' if a is None else f'{a:.1f}'} vs {'-' if b is None else f'{b:.1f}'}" for lv, a, b in cells))
        summary[f"{r.name}_vs_{rnd.name}_p1_lead_at_tenths"] = lead
    return summary


def plot(runs: list[Run], popular_p1: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([c[0] for c in r.curve], [c[3] for c in r.curve], marker="o", markersize=3, label=r.name)
    ax.axhline(popular_p1, color="gray", linestyle=":", label="most popular label")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("P@1 (test subset)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cli.with_folder(path), dpi=120)
    plt.close(fig)


def popular_baseline(train_data, test_data) -> dict:
    top = torch.from_numpy(np.argsort(-train_data.label_counts(), kind="stable")[:5].copy())
    labels = [batch[3] for batch in test_data.batches(1024, shuffle=False)]
    return precision_at([top.expand(len(y), -1) for y in labels], labels)


# ---------------------------------------------------------------------------------------------

QUICK = {"train_points": 8_000, "test_points": 2_000, "epochs": 2, "dense_epochs": 1}  # what --quick sets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.DefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training file in the Extreme Classification Repository format "
                                  "(default: the built-in data of --structure, see examples/xmc_data.py)")
    g.add_argument("--test-data", help="test file in the same format (default with --data: hold out --test-fraction)")
    g.add_argument("--test-fraction", type=cli.fraction, default=0.2,
                   help="held-out share when --data has no --test-data")
    g.add_argument("--max-points", type=cli.integer(),
                   help="read only the first points of --data (a quick look at a big file), and of --test-data")
    g.add_argument("--generate", metavar="DIR", type=cli.output_dir,
                   help="write the built-in data's train.txt and test.txt to DIR and exit")
    g.add_argument("--train-points", type=cli.integer(), default=20_000, help="training points of the built-in data (--structure)")
    g.add_argument("--test-points", type=cli.integer(), default=5_000, help="test points of the built-in data")
    g.add_argument("--features", type=cli.integer(), default=100_000, help="feature ids of the built-in data (with --structure text: the most frequent words)")
    g.add_argument("--labels", type=cli.integer(5), default=100_000, help="labels of the built-in data, the output layer's width (P@5 needs 5)")
    g.add_argument("--structure", default="clusters", choices=["clusters", "tree", "text"],
                   help="the built-in data: synthetic, flat clusters of labels drawn independently, or a label "
                        "hierarchy with confusable siblings that co-occur (xmc_data.generate); or real text, the "
                        "standard library's: 24 words -> the less common words among the next 8 "
                        "(xmc_data.text_split; --features and --labels count the words)")
    g.add_argument("--eval-points", type=cli.integer(), default=1000, help="test points for the P@1-vs-time curve")
    g.add_argument("--final-points", type=cli.integer(), default=None,
                   help="test points for the final P@k, held-out loss and popular baseline (default: all; a seeded "
                        "random subset, which holds the curve's points where it is larger, for a big test file: "
                        "Amazon-670K's 153,025 points take about 20 min per run to evaluate on 2 cores)")
    g = p.add_argument_group("training")
    g.add_argument("--runs", type=runs_spec, default="lsh,random,dense",
                   help="output layers to train, in order: lsh, random, dense, or lsh/random with a mode "
                        "suffix (lsh-per_row, random-shared, ...)")
    g.add_argument("--mode", default="shared", choices=["shared", "per_row"],
                   help="LSHLinear mode for the lsh and random runs without a suffix")
    g.add_argument("--epochs", type=cli.integer(), default=5, help="epochs of the lsh and random runs")
    g.add_argument("--dense-epochs", type=cli.integer(), default=2,
                   help="epochs of the dense run (its steps cost ~20x more)")
    g.add_argument("--batch-size", type=cli.integer(), default=128, help="points per training step")
    g.add_argument("--hidden", type=cli.integer(), default=128, help="hidden units (the output layer's input width)")
    g.add_argument("--lr", type=rates_spec, default="0.08",
                   help="Adam / LazyAdam learning rate of the network (the input embedding and hidden bias): one rate, "
                        "or kind=rate pairs for some of the kinds lsh, random, dense (0.08,dense=0.04). The embedding's "
                        "rows are each touched about once in 45 steps and want a far larger rate than the output "
                        "layer's (docs/results.md, 'Every head at its best rates'); figures from before commit 1c0b844 "
                        "were trained at --lr 0.003 --out-lr 0.003")
    g.add_argument("--out-lr", type=rates_spec, default="0.0005",
                   help="learning rate of the output layer, one rate or per kind of run as --lr (the default is about "
                        "the best of every head alike in a sweep)")
    g.add_argument("--label-smoothing", type=cli.real(0, 1), default=0.0,
                   help="as F.cross_entropy's, for every run (lsh_torch.sparse_cross_entropy estimates the spread part)")
    g.add_argument("--weight-decay", type=cli.real(0), default=0.0,
                   help="AdamW's decoupled weight decay on the embedding and output weights (LazyAdam: the touched rows)")
    g.add_argument("--eval-every", type=cli.positive, default=0.25, help="evaluate every this many epochs")
    g.add_argument("--seed", type=cli.integer(0), default=0, help="seeds the built-in data, the weights, the batches and the hashes")
    g.add_argument("--threads", type=cli.integer(), default=None, help="torch threads (default: torch's)")
    g.add_argument("--device", type=cli.device, default="cpu", help="where the networks train: cpu, cuda, cuda:1, ...")
    g = p.add_argument_group("LSHLinear (lsh and random runs)")
    g.add_argument("--active", type=cli.integer(), default=2048,
                   help="active outputs per batch (shared mode); raised if a batch has more distinct labels")
    g.add_argument("--active-per-row", type=cli.integer(), default=128, help="active outputs per point (per_row mode)")
    g.add_argument("--tables", type=cli.auto_or(cli.integer()), default="auto",
                   help="L, hash tables, or auto (LSHLinear's default)")
    g.add_argument("--bits", type=cli.auto_or(cli.integer()), default="auto", help="K, bits per table, or auto")
    g.add_argument("--probes", type=cli.auto_or(cli.integer()), default="auto",
                   help="buckets probed per table, or auto")
    g.add_argument("--tail", type=cli.auto_or(cli.integer(0)), default="auto",
                   help="active outputs drawn uniformly, their logits corrected, or auto")
    g.add_argument("--tail-proposal", choices=["uniform", "labels"], default="uniform",
                   help="the lsh and random runs' tail: uniform draws, or draws in proportion to the square root of "
                        "each label's count in the training data (LSHLinear(tail_proposal=))")
    g.add_argument("--rescore", type=cli.integer(), default=4, help="hashed candidates scored per top-set slot")
    g.add_argument("--norm-rows-share", type=cli.real(0, 1), default=None,
                   help="of the shared top set's rescored pool, the fraction given to the rows of largest norm "
                        "(LSHLinear.norm_rows_share; default: the layer's, 0.25)")
    g.add_argument("--uncorrected", action="store_true",
                   help="drop the tail's logit correction (the loss before the estimator; for comparison)")
    g.add_argument("--warmup-epochs", type=cli.real(0), default=1.0,
                   help="epochs of the lsh runs that use random active sets before the hash tables take over "
                        "(hard negatives only help from the second epoch on; 0 for LSH from the first step)")
    g.add_argument("--asymmetric", action="store_true",
                   help="hash rows through the MIPS transform (off by LSHLinear's default at this width: the 82%% "
                        "of labels that training never sees keep small rows, and the transform crowds them into one "
                        "bucket)")
    g.add_argument("--hash", default="srp", choices=list(hashing.HASHES),
                   help="hash family (LSHLinear(hash=)): srp, signed random projections (default), or dwta, "
                        "densified winner-take-all")
    g.add_argument("--bin-size", type=cli.integer(), default=None,
                   help="dwta: dimensions per bin, a power of two whose log2 divides --bits (default: LSHLinear's)")
    g.add_argument("--rebuild", type=rebuild_spec, default="10", help="table rebuild schedule: an int period in steps "
                   "(the library default, 10), growing, or growing:INITIAL:GROWTH:MAX")
    g = p.add_argument_group("output")
    g.add_argument("--plot", type=cli.output_path, default=os.path.join(RESULTS, "xmc_p1_vs_time.png"),
                   help="PNG of P@1 against time")
    g.add_argument("--json", type=cli.output_path, default=os.path.join(RESULTS, "xmc.json"),
                   help="JSON of the results ('' for none)")
    g.add_argument("--save-head", metavar="PATH", type=cli.output_path, help="save the lsh run's trained output layer "
                   "(where --runs names several lsh runs, the last to finish) and the test points' hidden vectors "
                   "(for benchmarks/bench_topk.py --model)")
    g.add_argument("--quick", action="store_true",
                   help="a smaller, faster run: 8,000 training points, 2 epochs, dense 1 epoch")
    args = p.parse_args(argv)
    for dest in ("lr", "out_lr"):  # kinds left out keep the default's rate; a bare rate covers the rest
        given, default = getattr(args, dest), rates_spec(p.get_default(dest))
        setattr(args, dest, {kind: given.get(kind, given.get("*", default.get(kind, default.get("*"))))
                             for kind in KINDS})
    if args.bin_size is not None and args.hash != "dwta":
        p.error(f"--bin-size is dwta's: it needs --hash dwta, got --hash {args.hash}")
    cli.apply_quick(p, argv, args, QUICK)
    if args.quick:  # beside the committed results, not over them
        for dest, name in (("json", "xmc_quick.json"), ("plot", "xmc_quick_p1_vs_time.png")):
            if not cli.given(p, argv, [dest]):
                setattr(args, dest, os.path.join(RESULTS, name))
    for dest in ("test_data", "max_points"):  # they apply to --data's files: silently ignored without one
        if getattr(args, dest) is not None and args.data is None:
            p.error(f"--{dest.replace('_', '-')} needs --data (the training file)")
    synthetic = cli.given(p, argv, ["train_points", "test_points", "features", "labels", "structure"])
    if args.data is not None and synthetic:  # sizes come from the file's header: they were ignored
        p.error(f"{', '.join('--' + dest.replace('_', '-') for dest in synthetic)} shape the built-in data: with "
                "--data the file's header gives the sizes (--max-points reads fewer points)")
    kinds = {spec.strip().partition("-")[0] for spec in args.runs.split(",")}
    if args.save_head and "lsh" not in kinds:
        p.error(f"--save-head saves an lsh run's output layer: --runs {args.runs} has none")
    if "lsh" in kinds and args.epochs <= args.warmup_epochs:
        p.error(f"--epochs {args.epochs} <= --warmup-epochs {args.warmup_epochs:g}: the lsh runs would draw uniformly "
                "throughout and never hash; lower --warmup-epochs or train longer")
    return args


def recorded_args(args) -> dict:
    """The parsed arguments as the JSON records them (and bench_estimator.py compares a kept run's)."""
    record = {**vars(args), "device": str(args.device)}
    if args.structure == "text" and args.data is None:  # the text is this Python's standard library: a kept run's too
        record["corpus"] = f"the standard library of Python {platform.python_version()}"
    return record


def read_data(args) -> tuple[xmc_data.XMCData, xmc_data.XMCData]:
    """``--data`` (and ``--test-data``, or a held-out split), checked: readable, well formed, test
    points within the training file's features and labels, at least one point each, 5 labels (P@5)."""
    def read(option: str, path: str) -> xmc_data.XMCData:
        try:
            return xmc_data.read_xmc(path, args.max_points)
        except (OSError, xmc_data.XMCFormatError) as error:
            cli.fail(f"{option}: {error}")
    train_data = read("--data", args.data)
    if args.test_data:
        test_data = read("--test-data", args.test_data)
    else:
        train_data, test_data = train_data.split(args.test_fraction, args.seed)
    if test_data.num_features > train_data.num_features or test_data.num_labels > train_data.num_labels:
        cli.fail(f"--test-data has {test_data.num_features:,} features and {test_data.num_labels:,} labels, the training "
             f"data {train_data.num_features:,} and {train_data.num_labels:,}: the model is sized by the training file")
    if not len(train_data) or not len(test_data) or train_data.num_labels < 5:
        cli.fail(f"--data: need at least one training and one test point and 5 labels (P@5), got {len(train_data)} and "
             f"{len(test_data)} points, {train_data.num_labels} labels")
    return train_data, test_data


def init_torchrun(args) -> None:
    """Under torchrun (WORLD_SIZE and RANK in the environment): join the process group (NCCL on
    GPUs, one per rank by LOCAL_RANK; gloo on CPU) and silence stdout on every rank but 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return
    if args.device.type == "cuda":
        args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:  # the table, progress bars and files come from rank 0 only
        sys.stdout = open(os.devnull, "w")


def built_in_data(args) -> tuple[xmc_data.XMCData, xmc_data.XMCData]:
    """The (train, test) points of ``--structure``: generated, or made of the standard library's text."""
    sizes = dict(seed=args.seed, num_features=args.features, num_labels=args.labels)
    if args.structure == "text":
        try:
            return xmc_data.text_split(args.train_points, args.test_points, **sizes)
        except ValueError as error:  # sizes beyond the corpus's words, or no corpus
            cli.fail(f"--structure text: {error} (--features, --labels)")
    return xmc_data.generate_split(args.train_points, args.test_points, structure=args.structure, **sizes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    init_torchrun(args)
    rank, size = world()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate:
        train_data, test_data = built_in_data(args)
        for name, d in (("train", train_data), ("test", test_data)):
            path = os.path.join(args.generate, f"{name}.txt")
            xmc_data.write_xmc(path, d)
            print(f"wrote {path}: {d.summary()}")
        return {}
    start = time.perf_counter()
    if args.data:
        train_data, test_data = read_data(args)
        source = os.path.basename(args.data)
    else:
        train_data, test_data = built_in_data(args)
        source = "the standard library's text" if args.structure == "text" else f"synthetic, {args.structure}"
    print(f"data ({source}, {time.perf_counter() - start:.1f}s to load):\n  train: {train_data.summary()}\n"
          f"  test:  {test_data.summary()}")
    order = np.random.default_rng(args.seed).permutation(len(test_data))
    eval_data = test_data.subset(order[:args.eval_points])
    if args.final_points is not None and args.final_points < len(test_data):
        test_data = test_data.subset(order[:args.final_points])
        print(f"  final evaluation on {len(test_data):,} of them (--final-points)")
    popular = popular_baseline(train_data, test_data)
    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__} on {where} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); "
          f"lsh_torch {lsh_torch.__version__}")
    if size > 1:
        where += f", torchrun {size} ranks"
        print(f"torchrun: {size} ranks ({dist.get_backend()}), each {args.batch_size // size}-{-(-args.batch_size // size)} "
              f"points of every batch of {args.batch_size}; lsh/random heads sharded (ShardedLSHLinear), "
              "budgets split evenly over the shards")

    runs = []
    for spec in [s.strip() for s in args.runs.split(",")]:  # checked by runs_spec
        kind, _, mode = spec.partition("-")
        mode = mode or args.mode
        budget = 0
        if kind != "dense":
            want = args.active if mode == "shared" else args.active_per_row
            budget = active_budget(train_data, args, mode, args.seed, shards=size)
            if budget > want:
                print(f"{spec}: active budget raised from {want} to {budget} to hold every batch's labels")
            elif budget < want:
                print(f"{spec}: active budget {budget} (asked {want}): every output of the layer")
            try:  # an option the layer refuses (--bits, --tables, --tail, ...) stops here, not after the data's load
                build(kind, mode, train_data, args, budget)
            except (TypeError, ValueError) as error:
                cli.fail(f"the {spec} run's output layer cannot be built from its options: {error}")
        name = spec if kind == "dense" or spec != kind else f"{kind}-{mode}"
        runs.append(Run(name, kind, mode, budget))
    if args.save_head and size > 1:
        cli.fail("--save-head saves a single process's output layer; under torchrun the head is sharded")
    warm_up(train_data, args)
    train_in_turns(runs, train_data, eval_data, test_data, args)

    summary = report(runs, popular, args)
    title = (f"{source}: {len(train_data):,} train points, {train_data.num_labels:,} labels, batch {args.batch_size}, "
             f"{where}")
    if args.plot and rank == 0:
        plot(runs, popular["P@1"], args.plot, title)
        print(f"plot: {args.plot}")
    result = {"args": recorded_args(args), "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "data": {"train": train_data.summary(), "test": test_data.summary()},  # test: what was evaluated
              "popular": popular, "summary": summary,
              "runs": [{k: v for k, v in r.__dict__.items()} for r in runs]}
    if args.json and rank == 0:  # whole or not at all: bench_estimator.py keeps and re-reads dense's runs
        cli.write_json(args.json, result)
        print(f"json: {args.json}")
    if size > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    cli.run(main)
