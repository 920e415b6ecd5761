"""LSHLinear on torch.distributed: data parallelism with row-sparse gradients, and a
vocabulary-parallel output layer.

Data parallel (every rank a full replica). DDP and FSDP2 cannot reduce sparse COO gradients (DDP
copies every gradient into dense buckets; FSDP2 reduce-scatters dense shards), so the parameters
with row-sparse gradients stay out of them and :func:`all_reduce_sparse_grads` averages those
gradients by all-gathering the touched rows (indices + values), cost proportional to the rows
touched, not to ``out_features``::

    model = lsh_torch.distributed.data_parallel(net)    # DDP that leaves those parameters alone
    loss = loss_fn(model(x), y); loss.backward()
    lsh_torch.distributed.all_reduce_sparse_grads(model)  # average their sparse grads over the ranks
    optimizer.step()

With FSDP2, ``fully_shard(net, ignored_params=unmanaged_parameters(net))`` does the same.
The ranks' LSH tables need no communication: they are rebuilt from the weights, which stay
identical, and each rank's active sets then depend only on its own batch.

Vocabulary parallel: :class:`ShardedLSHLinear` splits the rows of a wide output layer over the
ranks (each its own LSHLinear, tables and optimizer state); :func:`lsh_torch.sparse_cross_entropy`
computes the softmax over all shards (Megatron's vocab-parallel cross-entropy).

Gradient convention (both cases): after ``loss.backward()`` on every rank, each rank's loss being
the mean over its own labelled rows, every parameter's gradient is that of the mean of the ranks'
losses, as DDP gives: :func:`all_reduce_sparse_grads` averages; a ShardedLSHLinear's shard gradient
arrives summed over the ranks' losses and is divided by the world size by a hook; the gradient
reaching each rank's input is that of its own loss, which DDP/FSDP2 then average over the trunk.
With equal batch sizes this is single-process training on the concatenated global batch.
"""
from __future__ import annotations

import math
import numbers
import zlib
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._checks import check_bool, check_int, check_module, integer_scalar, vouch, vouched
from .losses import (_check_labels_forced, _check_labels_found, _checked_output, _drawn, _label_columns, _label_rows,
                     _mask_of, reduce_loss, smoothed_target)
from .nn import (WIDE, LSHLinear, _budget, _ddp_managing, _label_matrix, auto_bits, auto_settings, cap_probes,
                 fit_bits, topk_budget)
from .optim import _DTensor, _checked_norms, grad_norm_part, norm_dtype, scale_grads_
from .proposal import check_proposal
from .retrieval import TOPK_MIN_RECALL, check_min_recall

__all__ = ["ShardedLSHLinear", "ShardedSparseOutput", "all_reduce_sparse_grads", "clip_grad_norm_", "data_parallel",
           "shard_range", "unmanaged_parameters"]


def _check_initialised(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs torch.distributed: call torch.distributed.init_process_group first")


def _rank_and_size(group) -> tuple[int, int]:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("process_group does not contain this process")
    return rank, dist.get_world_size(group)


def _gather_ints(values: list[int], group, device) -> Tensor:
    """``[world, len(values)]``: every rank's ``values``."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def _stop_everywhere(error: Optional[Exception], group, device, agreed=(), names: str = "") -> None:
    """One all-gather after a step that may fail on some ranks only (an argument check, a shard's
    kernel): a rank's ``error`` raises there and stops the others too, instead of leaving them
    waiting in the next collective. ``agreed``: numbers every rank must pass alike (``names``
    says which; as many on every rank, failed or not), checked in the same all-gather."""
    flag = [1.0 if error is not None else 0.0, *([0.0] * len(agreed) if error is not None else agreed)]  # equal lengths
    mine = torch.tensor(flag, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    every = torch.stack(out).cpu()
    if error is not None:
        raise error
    failed = every[:, 0].nonzero()
    if failed.numel():
        raise ValueError(f"rank {int(failed[0])} of the process group raised an error (an invalid argument or a failed "
                         "step; its error says which); every rank stops")
    if agreed and not bool((every[:, 1:] == every[:1, 1:]).all()):
        raise ValueError(f"{names} must be the same on every rank, got {every[:, 1:].tolist()} by rank")


def _gather_padded(t: Tensor, group, fill=0, rows_only: bool = False) -> list[Tensor]:
    """Every rank's ``t`` (shapes may differ by rank, dimensions may not): all-gather of copies
    padded with ``fill`` to the largest shape (gloo gathers equal sizes only), cut back (in the
    first dimension only if ``rows_only``, so that they can be concatenated)."""
    shapes = _gather_ints(list(t.shape), group, t.device)
    top = shapes.max(0).values.tolist()
    padded = t.new_full(top, fill)
    padded[tuple(slice(n) for n in t.shape)] = t
    out = [torch.empty_like(padded) for _ in range(shapes.shape[0])]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:shape[0]] if rows_only else o[tuple(slice(n) for n in shape)] for o, shape in zip(out, shapes.tolist())]


# ---------------------------------------------------------------------------------------------
# Data parallel

def _lsh_layers(module: nn.Module) -> tuple[list[LSHLinear], list[nn.Module]]:
    """The replicated LSHLinear layers and the ShardedLSHLinear layers under ``module``."""
    sharded = [m for m in module.modules() if isinstance(m, ShardedLSHLinear)]
    inner = {id(m.shard) for m in sharded}
    return [m for m in module.modules() if isinstance(m, LSHLinear) and id(m) not in inner], sharded


def _replicated_sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    replicated, _ = _lsh_layers(module)
    sparse = [m for m in replicated if m._sparse_grad]
    sparse += [m for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    return [p for m in sparse for p in m.parameters(recurse=False) if p.requires_grad]


def unmanaged_parameters(module: nn.Module) -> set[nn.Parameter]:
    """The parameters of ``module`` that DDP / FSDP2 must leave alone: those with row-sparse
    gradients (``LSHLinear(sparse_grad=True)``, ``nn.Embedding``/``EmbeddingBag(sparse=True)``),
    which :func:`all_reduce_sparse_grads` averages, and those of :class:`ShardedLSHLinear` layers,
    which differ by rank. For FSDP2: ``fully_shard(module, ignored_params=unmanaged_parameters(module))``
    (FSDP2 broadcasts nothing: start the ranks from identical values, e.g. the same seed); the
    head, not managed by FSDP2, then needs no ``register_fsdp_forward_method`` for ``forward_sparse``."""
    _, sharded = _lsh_layers(module)
    return set(_replicated_sparse_parameters(module)) | {p for m in sharded for p in m.parameters()}


def data_parallel(module: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(module, **ddp_kwargs)`` that leaves out :func:`unmanaged_parameters`
    and the LSH tables' buffers (rebuilt on every rank from identical weights; DDP would broadcast
    them every forward, and a ShardedLSHLinear's differ by rank). Like DDP, it copies rank 0's
    values of the replicated sparse-gradient parameters to every rank. After each backward, call
    :func:`all_reduce_sparse_grads` on the returned module."""
    _check_initialised("data_parallel")
    check_module("module", module)
    group = ddp_kwargs.get("process_group")
    replicated, sharded = _lsh_layers(module)
    skip = {id(t) for t in unmanaged_parameters(module)} | {id(b) for m in [*replicated, *sharded] for b in m.buffers()}
    names = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if id(t) in skip]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    before = [(layer, _values_signature(layer)) for layer in replicated]
    with torch.no_grad():
        for p in _replicated_sparse_parameters(module):
            dist.broadcast(p, dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    wrapped = nn.parallel.DistributedDataParallel(module, **ddp_kwargs)
    # These broadcasts and DDP's own wrote rank 0's values in place without bumping version counters: bumped
    # here where they changed a layer, so that a topk index built before from this rank's weights is rebuilt
    # and eval re-hashes. (Not where they changed nothing, as after loading one checkpoint on every rank: eval
    # keeps the restored tables, and a resumed run goes on as the saving one. The training tables keep theirs,
    # restored by load_lsh_state for an exact resume, or fixed by the next rebuild's fingerprints.)
    for layer, signature in before:
        if not all(_same(a, b) for a, b in zip(signature, _values_signature(layer))):
            for p in (layer.weight, layer.bias):
                if p is not None and not p.is_inference():
                    torch.autograd.graph.increment_version(p)
    return wrapped


@torch.no_grad()
def _values_signature(layer: LSHLinear) -> tuple[Tensor, Optional[Tensor]]:
    """What tells whether a write changed ``layer``'s weight or bias, without a copy of the weight: its
    rows' fingerprints (what an incremental rebuild compares), and the bias."""
    fingerprints = ops.row_fingerprints(layer.weight.detach(), layer.tables.fingerprint_vector.float())
    return fingerprints, None if layer.bias is None else layer.bias.detach().clone()


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    return a is None or torch.equal(a, b)


@torch.no_grad()
def all_reduce_sparse_grads(module: nn.Module, process_group=None) -> int:
    """Average the row-sparse gradients of ``module``'s replicated parameters (those of
    ``LSHLinear(sparse_grad=True)`` and sparse embeddings, not ShardedLSHLinear's) over the ranks.

    Each gradient's touched rows (indices and values) are all-gathered (padded to the largest
    count among the ranks), summed per row and divided by the world size, as DDP averages; every
    rank computes the same sum in the same order, so the ranks' parameters stay bit-identical.
    A parameter without a gradient counts as no touched rows. Returns the bytes this rank
    contributed to the all-gathers (rows x (8 + row bytes), padded), for measuring.
    """
    _check_initialised("all_reduce_sparse_grads")
    check_module("module", module)
    params = _replicated_sparse_parameters(module)
    _, world = _rank_and_size(process_group)
    grads, error = [], None
    for p in params:
        grad = p.grad
        if grad is None:
            grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.int64, device=p.device),
                                           p.new_empty(0, *p.shape[1:]), p.shape, check_invariants=False)
        elif not grad.is_sparse:
            error = TypeError(f"all_reduce_sparse_grads: a parameter of shape {tuple(p.shape)} has a dense gradient; "
                              "its layer should produce sparse ones (sparse_grad=True / sparse=True)")
        grads.append(grad.coalesce() if grad.is_sparse else grad)
    # The ranks' parameters must match (rows gathered from a wider replica would index past this one's).
    # A rank without such parameters takes part too (a frozen replica would otherwise leave the rest waiting).
    shapes = zlib.crc32(repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode())
    device = next(iter(params), next(module.parameters(), torch.empty(0))).device
    _stop_everywhere(error, process_group, device, agreed=(len(params), shapes),
                     names="the replicated sparse parameters (count, shapes and dtypes; a CRC of them)")
    if not params:
        return 0
    counts = _gather_ints([g._nnz() for g in grads], process_group, params[0].device)  # one sync for all
    sent = 0
    for p, grad, sizes in zip(params, grads, counts.t().tolist()):
        rows = torch.cat(_gather_rows(grad.indices()[0], sizes, process_group))
        values = torch.cat(_gather_rows(grad.values(), sizes, process_group))
        sent += max(sizes) * (8 + values.element_size() * math.prod(p.shape[1:]))
        # Rows come from valid gradients: the invariant check would only cost time.
        p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape, check_invariants=False).coalesce() / world
    return sent


@torch.no_grad()
def clip_grad_norm_(module: nn.Module, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, process_group=None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a model whose :class:`ShardedLSHLinear` layers hold
    different rows on each rank: the total norm counts every rank's shard once (all-reduced: a sum
    of ``|g|^p``, or the max for ``norm_type=inf``) and the replicated parameters once (identical on
    every rank after DDP / FSDP2 / :func:`all_reduce_sparse_grads`), so every rank scales by the
    same factor and the replicas stay identical (``clip_grad_norm_`` on one rank sees its shard
    only: the ranks clipped the trunk by different factors and its replicas drifted apart). Sparse
    gradients count their values and are scaled in place. Call it after the gradients are reduced;
    returns the total norm."""
    _check_initialised("clip_grad_norm_")
    max_norm, norm_type = _checked_norms(max_norm, norm_type)
    _, sharded = _lsh_layers(module)
    mine = {id(p) for m in sharded for p in m.parameters()}
    params = [p for p in module.parameters() if p.grad is not None]
    device = next(module.parameters(), torch.empty(0)).device
    infinite = norm_type == math.inf
    dtype = norm_dtype(module.parameters())  # of every parameter, with a gradient or not: the same on every rank
    replicated = grad_norm_part([p for p in params if id(p) not in mine], norm_type, device, dtype)
    shard = grad_norm_part([p for p in params if id(p) in mine], norm_type, device, dtype)
    dist.all_reduce(shard, op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM, group=process_group)
    total = torch.maximum(replicated, shard) if infinite else (replicated + shard).pow(1 / norm_type)
    scale_grads_(params, total, max_norm, norm_type, error_if_nonfinite)
    return total


def _gather_rows(t: Tensor, sizes: list[int], group) -> list[Tensor]:
    """Every rank's ``t`` [sizes[r], *rest] (``rest`` equal on all ranks), padded to the largest."""
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return [o[:n] for o, n in zip(out, sizes)]


# ---------------------------------------------------------------------------------------------
# Vocabulary parallel

def shard_range(out_features: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of rank ``rank``: contiguous, the first ``out_features % world_size``
    ranks one row more than the others."""
    world_size = check_int("world_size", world_size, 1, 2 ** 31 - 1)
    out_features = check_int("out_features", out_features, 0, 2 ** 62)
    rank = check_int("rank", rank, 0, world_size - 1)
    base, extra = divmod(out_features, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _first_order_only(what: str) -> None:
    """Refuse a backward with ``create_graph=True`` (a gradient penalty): the collectives below are not
    differentiable, so a second-order gradient through them would come back incomplete without a word."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what}: second-order gradients (backward with create_graph=True, e.g. a gradient "
                           "penalty) do not pass the sharded layer's collectives; an LSHLinear in one process "
                           "computes them exactly")


class _GatherRows(torch.autograd.Function):
    """All ranks' rows ``[sum(sizes), d]`` from this rank's ``x [sizes[rank], d]``. Backward: the
    gradient of this rank's rows summed over the ranks (every rank's loss may use them)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat(_gather_rows(x.contiguous(), sizes, group))

    @staticmethod
    def backward(ctx, grad):
        _first_order_only("ShardedLSHLinear (gathering the ranks' inputs)")
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None, None


class _GatherColumns(torch.autograd.Function):
    """This rank's rows of the full output ``[sizes[rank], sum(widths)]`` from every shard's
    columns for all rows ``z [sum(sizes), widths[rank]]``. Backward: each shard's columns of
    every rank's output gradient."""

    @staticmethod
    def forward(ctx, z, sizes, widths, rank, group):
        ctx.sizes, ctx.widths, ctx.rank, ctx.group = sizes, widths, rank, group
        start = sum(sizes[:rank])
        columns = _gather_padded(z.contiguous(), group)
        return torch.cat([c[start: start + sizes[rank]] for c in columns], 1)

    @staticmethod
    def backward(ctx, grad):
        _first_order_only("ShardedLSHLinear (gathering the shards' outputs)")
        start = sum(ctx.widths[: ctx.rank])
        rows = _gather_padded(grad.contiguous(), ctx.group)
        return torch.cat([r[:, start: start + ctx.widths[ctx.rank]] for r in rows]), None, None, None, None


class ShardedSparseOutput(NamedTuple):
    """Output of :meth:`ShardedLSHLinear.forward_sparse`: this shard's part of the active set for
    the rows of *every* rank (``values [sum(sizes), A]``; ``indices`` global neuron ids, ``[A]`` in
    shared mode or ``[sum(sizes), A]``; ``log_weights`` from this shard's tail), and what
    :func:`lsh_torch.sparse_cross_entropy` needs to combine the shards: the process group, every
    rank's batch size (rows in rank order) and this rank's batch shape."""

    values: Tensor
    indices: Tensor
    log_weights: Optional[Tensor]
    process_group: object
    sizes: tuple
    batch_shape: torch.Size


class _ShardedSoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row loss ``log sum_all_shards exp(z) - sum(target * z)`` of this rank's rows, from this
    shard's logits for every rank's rows: the max and the sums are all-reduced (Megatron's
    vocab-parallel cross-entropy). Backward: every rank's upstream gradient is all-gathered, so that
    this shard's logits get the gradient of every rank's loss (summed)."""

    @staticmethod
    def forward(ctx, logits, target, labelled, sizes, rank, group):
        top = logits.max(1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - top[:, None]).exp()
        scored = torch.where(target > 0, target * logits, 0.0)  # an entry of weight 0 (log_weight -inf): 0
        sums = torch.stack([exp.sum(1), scored.sum(1)], 1)
        dist.all_reduce(sums, group=group)
        loss = torch.where(labelled, top + sums[:, 0].log() - sums[:, 1], 0.0)
        ctx.save_for_backward(exp / sums[:, :1], target, labelled)
        ctx.sizes, ctx.group = sizes, group
        start = sum(sizes[:rank])
        return loss[start: start + sizes[rank]]

    @staticmethod
    def backward(ctx, grad):
        _first_order_only("sparse_cross_entropy of a ShardedSparseOutput")
        probs, target, labelled = ctx.saved_tensors
        upstream = torch.cat(_gather_rows(grad.contiguous(), list(ctx.sizes), ctx.group))
        upstream = torch.where(labelled, upstream, 0.0)
        return upstream[:, None] * (probs - target), None, None, None, None, None


def sharded_cross_entropy(output: ShardedSparseOutput, labels: Tensor, reduction: str, ignore_index: int,
                          label_smoothing: float = 0.0, check=lambda: None) -> Tensor:
    """:func:`lsh_torch.sparse_cross_entropy` of a :class:`ShardedSparseOutput` (it dispatches
    here after checking its arguments): this rank's loss over its own rows, the softmax over every
    shard's active set, each shard's tail correction applied (the sum of the shards' unbiased
    normaliser estimates is an unbiased estimate of the full one)."""
    group, sizes, batch_shape = output.process_group, list(output.sizes), output.batch_shape
    rank, _ = _rank_and_size(group)
    try:  # ``check``: sparse_cross_entropy's argument checks, run here so that one rank's bad argument stops all
        check()
        values, indices, log_weights = _checked_output(tuple(output[:3]))  # log_weights detached
        if labels.device != output.values.device:
            raise ValueError(f"labels are on {labels.device} but the output is on {output.values.device}")
        labels = _label_rows(labels, batch_shape, ignore_index)
        error = None
    except Exception as caught:  # warnings turned into errors too
        error = caught
    agreed = (0, 0, 0) if error else (label_smoothing, ("mean", "sum", "none").index(reduction), ignore_index)
    _stop_everywhere(error, group, output.values.device, agreed, "label_smoothing, reduction and ignore_index")
    every = torch.cat(_gather_padded(labels, group, fill=-1, rows_only=True))  # [sum(sizes), M], -1 padding
    logits = values.to(torch.promote_types(values.dtype, torch.float32))  # float64 stays
    column, found = _label_columns(indices, every, logits.shape[1])
    mask = _mask_of(column, logits.shape[1])
    drawn = _drawn(column, log_weights, logits.shape)
    drawn = torch.zeros_like(found) if drawn is None else drawn
    counts = torch.cat([mask.sum(1, keepdim=True), found, drawn], 1).to(logits.dtype)
    dist.all_reduce(counts, group=group)  # each label is found on the shard that owns it
    labels_found = counts[:, 1:1 + every.shape[1]]
    _check_labels_found((labels_found > 0) | (every == -1), every, sizes)
    _check_labels_forced(counts[:, 1 + every.shape[1]:] > 0, every, sizes)
    count = counts[:, 0]
    target = mask.to(logits.dtype) / count.clamp_min(1)[:, None]
    if log_weights is not None:
        log_weights = log_weights.expand_as(logits)
        logits = logits + log_weights
    shift = None
    if label_smoothing:  # the spread over every shard's outputs: the weights' sums all-reduced
        target, shift = smoothed_target(target, log_weights, label_smoothing, partial(dist.all_reduce, group=group))
    loss = _ShardedSoftmaxCrossEntropy.apply(logits, target, count > 0, tuple(sizes), rank, group)
    start = sum(sizes[:rank])
    if shift is not None:
        loss = loss + torch.where(count > 0, shift, 0.0)[start: start + sizes[rank]]
    return reduce_loss(loss, count[start: start + sizes[rank]] > 0, reduction, batch_shape, output.values)


def _shard_kwargs(out_features: int, width: int, kwargs: dict) -> dict:
    """A shard's LSHLinear options: ``"auto"`` resolved for the full layer (a shard of a wide
    output layer keeps the output-layer settings), except ``bits`` (from the shard's rows, the
    bucket size of the full layer's kind) and an ``active`` count (the full layer's, split by width;
    every row where the full layer would compute every output: ``LSHLinear.exact_softmax``)."""
    auto, wide = auto_settings(out_features, kwargs.get("mode", "auto"), kwargs.get("hash", "srp")), out_features >= WIDE
    kwargs, auto_probes = dict(kwargs), kwargs.get("probes", "auto") == "auto"
    for name in ("num_tables", "probes", "asymmetric", "active", "bits"):
        if kwargs.get(name, "auto") != "auto":
            continue
        if name == "bits":
            kwargs[name] = fit_bits(auto_bits(width, wide=wide), kwargs.get("hash", "srp"))
        elif name == "active" and out_features <= WIDE and kwargs.get("tail", "auto") == "auto":
            # the full layer's exact softmax, shard by shard
            kwargs[name] = 1.0
        elif name == "active" and isinstance(auto["active"], int):
            kwargs[name] = max(1, min(width, math.ceil(auto["active"] * width / out_features)))
        else:
            kwargs[name] = auto[name]
    if auto_probes:
        kwargs["probes"] = cap_probes(kwargs["probes"], kwargs["bits"])
    return kwargs


class _DivideBy:
    """A gradient hook dividing by a constant (a class, not a lambda: the parameters it hooks pickle)."""

    def __init__(self, divisor: int):
        self.divisor = divisor

    def __call__(self, grad: Tensor) -> Tensor:
        return grad / self.divisor


def _note_rows(module: "ShardedLSHLinear", state_dict, prefix: str, local_metadata: dict) -> None:
    """Records in the state_dict's metadata which rows the shard holds (checked when loaded)."""
    local_metadata["lsh_torch_rows"] = (module.start, module.end, module.out_features)


class ShardedLSHLinear(nn.Module):
    r"""A vocabulary-parallel LSH output layer: rank ``r`` of ``process_group`` owns the rows
    :func:`shard_range` gives it, as its own :class:`~lsh_torch.LSHLinear` (``self.shard``: own
    hash tables, own optimizer state, its ``weight``/``bias`` the only state_dict entries).

    Every rank calls every method collectively with its own batch (sizes may differ; labels, if
    any, on all ranks or none). :meth:`forward_sparse` all-gathers the hidden vectors (with
    gradient), scores this shard's active set for the whole global batch with the labels forced
    in on the shard that owns them, and :func:`lsh_torch.sparse_cross_entropy` of its output is
    this rank's loss over its own rows with the softmax taken over every shard. Gradients follow
    the module docstring's convention (those of the mean of the ranks' losses); keep this layer out
    of DDP/FSDP2 (:func:`data_parallel`, :func:`unmanaged_parameters`) and do not all-reduce it.

    Args:
        in_features, out_features, bias, device, dtype: of the full layer, as for ``nn.Linear``.
        process_group: the ranks sharing the rows (default: the default group); each needs at
            least one row (``out_features >= world size``). Uneven widths are fine.
        lsh_kwargs: options of each shard's LSHLinear (``active`` and ``tail`` are per shard).
            ``"auto"`` is resolved for the full width (output-layer settings from 8,192 outputs)
            except ``bits`` (the shard's width) and ``active`` (the full layer's budget split by
            width). ``seed`` is offset by the rank, so the shards draw independent tails.

    Initialisation draws each shard from ``nn.Linear``'s distribution with a generator seeded by
    one draw of the global RNG plus the rank (ranks seeded alike get different rows; the values
    depend on the world size). Use :meth:`from_linear` or :meth:`load_full_state_dict` to start
    from given weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 process_group=None, **lsh_kwargs):
        super().__init__()
        _check_initialised("ShardedLSHLinear")
        self.process_group = process_group
        self.rank, self.world_size = _rank_and_size(process_group)
        # At least one row per rank: every rank owns a shard.
        out_features = check_int("out_features (at least the process group's size)", out_features, self.world_size,
                                 2 ** 31 - 1)
        in_features = check_int("in_features", in_features, 1, 2 ** 31 - 1)
        self.in_features, self.out_features = in_features, out_features
        self.widths = [b - a for a, b in (shard_range(out_features, r, self.world_size)
                                          for r in range(self.world_size))]
        self.start, self.end = shard_range(out_features, self.rank, self.world_size)
        error = None
        try:  # options checked for this shard's width can fail on some ranks only: all ranks stop
            kwargs = _shard_kwargs(out_features, self.end - self.start, lsh_kwargs)
            if kwargs.get("tail_proposal") is not None:  # this shard's rows' counts
                kwargs["tail_proposal"] = check_proposal(kwargs["tail_proposal"], out_features)[self.start:self.end]
            kwargs["seed"] = (check_int("seed", kwargs.get("seed", 0), 0, 2 ** 31 - 1) + self.rank) % 2 ** 31
            # Its own initialisation draws as many numbers as the shard has rows: the global RNG must
            # advance alike on every rank (the trunk built next, a data split seeded alike).
            where = torch.device(device) if device is not None else torch.get_default_device()
            cuda = [where.index if where.index is not None else torch.cuda.current_device()] if where.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                self.shard = LSHLinear(in_features, self.end - self.start, bias, device, dtype, **kwargs)
            self.budgets = [_budget(_shard_kwargs(out_features, w, lsh_kwargs)["active"], w) for w in self.widths]
        except Exception as caught:
            error = caught
        # The ranks must build the same layer: another out_features split the rows otherwise (rows of no rank,
        # silently), another in_features or dtype aborted the process inside gloo. (As many numbers on every rank.)
        built = None if error else self.shard.weight.dtype
        agreed = (in_features, out_features, float(bias), zlib.crc32(str(built or dtype).encode()),
                  0 if error else sum(self.budgets))
        # gloo talks through CPU tensors, NCCL through the current CUDA device's (whatever the layer's device).
        _stop_everywhere(error, process_group, torch.device("cpu") if dist.get_backend(process_group) == "gloo"
                         else torch.device("cuda", torch.cuda.current_device()), agreed,
                         "in_features, out_features, bias, dtype (a CRC of its name) and the active budget")
        self.register_state_dict_post_hook(_note_rows)
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Another rank's state_dict of the same shape loaded silently: rank 0's everywhere copied its rows onto the others'.
        rows = local_metadata.get("lsh_torch_rows")
        if rows is not None and tuple(rows) != (self.start, self.end, self.out_features):
            whose = ("a layer of another width" if rows[2] != self.out_features else
                     "another rank's shard, or a shard of a run over another number of ranks")
            error_msgs.append(f"the state_dict holds rows [{rows[0]}, {rows[1]}) of {rows[2]} ({whose}), "
                              f"this rank owns [{self.start}, {self.end}) of {self.out_features}: load each rank's "
                              "own, or full_state_dict() / load_full_state_dict() to move rows between ranks")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._rows_compared = False

    def _mean_over_ranks(self) -> None:
        """Hook this shard's parameters (once each) to divide their gradients by the world size: the
        mean over the ranks' losses (module docstring). A hook belongs to a parameter object, so the
        new ones of a copy, ``torch.load``, ``load_state_dict(assign=True)`` or ``to_empty`` get theirs
        at their first forward (without it, their gradients were the world size times too large)."""
        if self.world_size > 1:
            for p in self.shard.parameters():
                if p.requires_grad and not any(isinstance(h, _DivideBy) for h in (p._backward_hooks or {}).values()):
                    p.register_hook(_DivideBy(self.world_size))

    @property
    def weight(self) -> Tensor:
        """This rank's rows ``[end - start, in_features]``."""
        return self.shard.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.shard.bias

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise like ``nn.Linear`` (uniform in ``±1/sqrt(in_features)``), each rank its own rows."""
        seed = int(torch.randint(2 ** 62, ()))
        if self.weight.is_meta:  # no data to draw (to_empty and a load come next); the global RNG advanced alike
            return
        gen = torch.Generator(device=self.weight.device).manual_seed(seed + self.rank)
        bound = 1 / math.sqrt(self.in_features)
        for p in self.shard.parameters():
            p.uniform_(-bound, bound, generator=gen)
        self.shard._mark_stale()
        self._rows_compared = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, process_group=None, **lsh_kwargs) -> "ShardedLSHLinear":
        """A ShardedLSHLinear holding, on each rank, its rows of ``linear``'s weight and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, process_group=process_group, **lsh_kwargs)
        layer.load_full_state_dict(linear.state_dict())
        return layer

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The full layer's ``{"weight": [out_features, in_features], "bias": [out_features]}``
        (``nn.Linear``'s keys), gathered on every rank (collective; it costs the full weight's
        memory on each)."""
        return {name: torch.cat(_gather_padded(p.detach(), self.process_group))
                for name, p in self.shard.named_parameters()}

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Load this rank's rows of a full ``nn.Linear``-style state dict (e.g. from
        :meth:`full_state_dict` at any world size); the tables rebuild on next use."""
        expected = {"weight": (self.out_features, self.in_features)}
        if self.shard.bias is not None:
            expected["bias"] = (self.out_features,)
        if not isinstance(state_dict, dict) or set(state_dict) != set(expected):
            raise ValueError(f"state_dict must have exactly the keys {sorted(expected)}, "
                             f"got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(f"state_dict[{name!r}] must have shape {shape}, got {tuple(state_dict[name].shape)}")
        self.shard.load_state_dict({name: t[self.start: self.end] for name, t in state_dict.items()})
        self._rows_compared = False

    def _check_not_under_ddp(self) -> None:
        """A plain DistributedDataParallel that manages the shard broadcast rank 0's rows over every other
        rank's when it wrapped the model, and would average different rows' gradients: refused at the
        forward DDP runs (and, called outside it, by :meth:`_refuse_rows_copied_over`). FSDP2 managing the
        shard re-sharded its rows as DTensors."""
        if _DTensor is not None and isinstance(self.shard.weight, _DTensor):
            raise RuntimeError("ShardedLSHLinear's rows are managed by FSDP2 (fully_shard made them DTensors, split "
                               "again over the ranks): leave them out with fully_shard(model, "
                               "ignored_params=lsh_torch.distributed.unmanaged_parameters(model)), and re-create or "
                               "reload the layer.")
        if _ddp_managing(self.shard.parameters()) is not None:
            raise RuntimeError("ShardedLSHLinear runs inside a DistributedDataParallel that manages its rows: DDP "
                               "copied rank 0's rows over every other rank's when it wrapped the model (re-create or "
                               "reload the layer) and would average different rows' gradients. Wrap the model with "
                               "lsh_torch.distributed.data_parallel(model), which leaves the shards out.")

    _rows_compared = False  # (a class default: pickles from before have no such attribute)

    @torch.no_grad()
    def _refuse_rows_copied_over(self) -> None:
        """At the first forward after a build or load (one all-gather of a few numbers per rank): a plain DDP's
        wrapping copied rank 0's rows over the others' even where the layer is called outside DDP's forward, as
        ``head.forward_sparse(model(x), y)`` is (silently: wrong rows trained, or with sparse gradients a failed
        backward). A shard equal to rank 0's, every row (checksums of the rows' fingerprints by one vector on
        every rank), where rank 0's rows are not all alike (a zero initialisation's are), is that copy. (A wrap
        after the first forward goes unseen until the next load.)"""
        w = self.shard.weight.detach()
        vector = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0x5EED)).to(w.device)
        fingerprints = ops.row_fingerprints(w, vector).double()
        place = torch.arange(1, w.shape[0] + 1, device=w.device, dtype=torch.float64)
        mine = torch.stack([fingerprints.new_tensor(float(w.shape[0])), fingerprints.sum(), (fingerprints * place).sum(),
                            (fingerprints.max() != fingerprints.min()).double()])
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.process_group)
        self._rows_compared = True
        copies = [rank for rank, r in enumerate(every) if rank and torch.equal(r, every[0])]
        if bool(every[0][-1]) and copies:
            raise RuntimeError(f"ShardedLSHLinear: rank {copies[0]} holds rank 0's rows, not its own: a wrapper that "
                               "manages them copied them over (a plain DistributedDataParallel when it wrapped the "
                               "model, or fully_shard without ignored_params), or every rank initialised its shard "
                               "alike. Wrap the model with lsh_torch.distributed.data_parallel(model), or "
                               "fully_shard(model, ignored_params=lsh_torch.distributed.unmanaged_parameters(model)), "
                               "which leave the shards out; then re-create or reload the layer.")

    _METHODS = ("forward", "forward_sparse", "topk")  # what _gather_input's callers tell each other

    def _gather_input(self, input: Tensor, method: str, check=lambda: None, labelled: Optional[bool] = None):
        """Every rank's rows, their counts, and what ``check`` returned. The input (as the shard
        will check it, autocast-aware) and ``check`` are verified on every rank before the first
        collective, and the outcome travels with the row counts: a bad argument on one rank raises
        on every rank (the others name it) instead of leaving them waiting in a collective. So do
        ``method`` (the caller: ranks calling different ones would wait in different collectives) and
        ``labelled`` (whether labels, or topk's exclude, were given), which every rank must say alike."""
        self._mean_over_ranks()
        try:
            self.shard._operands(input)
            self._check_not_under_ddp()
            checked, error = check(), None
        except Exception as caught:  # warnings turned into errors too: every rank must hear of it
            checked, error = None, caught
        rows = -1 if error else input.reshape(-1, self.in_features).shape[0]
        compare = not (self._rows_compared or torch.compiler.is_compiling())
        gathered = _gather_ints([rows, int(bool(labelled)), int(compare), self._METHODS.index(method)],
                                self.process_group, self.shard.weight.device)
        sizes = gathered[:, 0].tolist()
        if gathered[:, 3].unique().numel() > 1:
            called = ", ".join(f"rank {r} {self._METHODS[m]}" for r, m in enumerate(gathered[:, 3].tolist()))
            raise ValueError(f"the ranks called different methods of ShardedLSHLinear ({called}): each call is "
                             "collective, every rank makes the same one")
        if error is not None:
            raise error
        if -1 in sizes:
            raise ValueError(f"rank {sizes.index(-1)} of the process group was given an invalid argument (its error says "
                             "which); every rank stops")
        if bool(gathered[:, 2].any()):  # every rank takes part where one asks (a load on one rank only)
            self._refuse_rows_copied_over()
        if labelled is not None and gathered[:, 1].unique().numel() > 1:
            # Another rank's labels would be forced for its rows alone, the loss then refusing this rank's.
            given = "labels" if method == "forward_sparse" else "exclude"
            raise ValueError(f"{given} must be given to {method} on every rank or on none, got {given} by ranks "
                             f"{gathered[:, 1].nonzero().flatten().tolist()} only")
        x = input.reshape(-1, self.in_features)
        return _GatherRows.apply(x, sizes, self.rank, self.process_group), sizes, checked

    def forward(self, input: Tensor) -> Tensor:
        """Exact ``[*, out_features]`` outputs of this rank's batch, differentiable, in training too
        (sparse training goes through :meth:`forward_sparse`). Each shard computes its columns for
        the global batch, then an all-gather along the vocabulary: every rank briefly holds
        ``global batch x out_features`` values (1,024 rows x 670K outputs: 2.7 GB in float32);
        for retrieval use :meth:`topk`."""
        x, sizes, _ = self._gather_input(input, "forward")
        z = F.linear(x, self.shard.weight, self.shard.bias)
        out = _GatherColumns.apply(z, sizes, self.widths, self.rank, self.process_group)
        return out.reshape(*input.shape[:-1], self.out_features)

    def forward_sparse(self, input: Tensor, labels: Optional[Tensor] = None) -> ShardedSparseOutput:
        """This shard's active outputs for every rank's rows (see :class:`ShardedSparseOutput`);
        ``labels`` (int64 ``[*]`` or ``[*, M]``, global ids, -1 and -100 padding) are forced in
        on the shard that owns them. Train with :func:`lsh_torch.sparse_cross_entropy`."""
        x, sizes, flat = self._gather_input(input, "forward_sparse", lambda: self._flat_labels(input, labels),
                                            labels is not None)
        batch_shape = input.shape[:-1]
        local = self._local_ids(flat)
        try:  # a shard's lookup can fail (a weight it cannot hash, out of memory): all ranks stop
            values, indices, log_weights = self.shard.forward_sparse(x, local if local.shape[1] else None)
            error = None
        except Exception as caught:  # a warning turned into an error (-W error) too
            error = caught
        _stop_everywhere(error, self.process_group, self.shard.weight.device)
        shifted = indices + self.start
        if vouched(indices):  # distinct ids shifted alike stay distinct: the loss need not sort them again
            vouch(shifted)
        return ShardedSparseOutput(values, shifted, log_weights, self.process_group, tuple(sizes), batch_shape)

    def _flat_labels(self, input: Tensor, labels: Optional[Tensor], name: str = "labels") -> Tensor:
        """``labels`` (global ids; ``name``, the argument's) as ``[rows, M]`` with all padding as -1, checked."""
        batch_shape = input.shape[:-1]
        if labels is None:
            labels = torch.full((*batch_shape, 0), -1, dtype=torch.int64, device=input.device)
        labels = _label_matrix(labels, batch_shape, input.device, name)
        if bool(((labels < -1) | (labels >= self.out_features)).any()):
            raise ValueError(f"{name} must be in [0, out_features={self.out_features}) or -1 / -100 (padding)")
        return labels

    def _local_ids(self, flat: Tensor) -> Tensor:
        """Every rank's ``flat`` ids (``[rows, M]``, -1 padding) for the global batch, as this shard's own
        rows (ids of other shards become -1)."""
        every = torch.cat(_gather_padded(flat, self.process_group, fill=-1, rows_only=True))
        return torch.where((every >= self.start) & (every < self.end), every - self.start, -1)

    @torch.no_grad()
    def topk(self, input: Tensor, k: int, exact: bool = False, probes: Optional[int] = None,
             budget: Optional[int] = None, min_recall: float = TOPK_MIN_RECALL,
             exclude: Optional[Tensor] = None) -> torch.return_types.topk:
        """The ``k`` largest outputs of this rank's rows and their global ids, ``[*, k]`` each:
        each shard's top ``min(k, its rows or candidates)`` for the global batch
        (:meth:`LSHLinear.topk`; ``budget`` candidates per shard, at most its rows, default
        :func:`~lsh_torch.nn.topk_budget` of its width or 4k where larger; each shard's index checked against its
        exact top-k with ``min_recall``), all-gathered and merged. ``k`` is at most
        ``out_features`` (``exact``) or the shards' candidates together.

        ``exclude`` (int64 ``[*]`` or ``[*, M]``, global ids, -1 and -100 padding; given on every rank or
        on none): ids each row must not get, scored -inf as by :meth:`LSHLinear.topk`: each shard excludes
        those among its rows."""
        k = integer_scalar(k)  # torch.topk's habit
        k, budget, probes = (int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
                             for v in (k, budget, probes))  # numpy ints too; the rest is refused in check_k
        good_budget = budget is None or (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1)
        good_k = isinstance(k, int) and not isinstance(k, bool) and k >= 0  # (refused in check_k otherwise)
        budgets = [topk_budget(w, k if good_k else 0) if budget is None or not good_budget else min(budget, w)
                   for w in self.widths]
        limit = self.out_features if exact else sum(budgets)

        def check_k():  # on every rank before the first collective (_gather_input)
            check_bool("exact", exact)  # (a numpy or tensor bool: the shard converts it alike)
            if budget is not None:
                check_int("budget", budget, 1, max(self.widths))
            if probes is not None:
                check_int("probes", probes, 1, 2 ** 31 - 1)
            check_min_recall(min_recall)
            check_int("k", k, 0, limit)
            return None if exclude is None else self._flat_labels(input, exclude, "exclude")
        x, sizes, flat = self._gather_input(input, "topk", check_k, exclude is not None)
        mine = min(k, self.shard.out_features if exact else budgets[self.rank])
        excluded = None if flat is None else self._local_ids(flat)  # (collective: outside the try)
        try:  # a shard can refuse what another accepts (probes beyond its narrower tables), or run out of memory
            values, indices = self.shard.topk(x, mine, exact=exact, probes=probes, budget=budgets[self.rank],
                                              min_recall=min_recall, exclude=excluded)
            error = None
        except Exception as caught:
            error = caught
        # Each shard answers every rank's rows with the same k and method: a rank asking otherwise would
        # get padding among the merged candidates (or exact and approximate shards mixed).
        _stop_everywhere(error, self.process_group, self.shard.weight.device,
                         (k, exact, budget or 0, probes or 0, float(min_recall)), "k, exact, budget, probes and min_recall")
        start = sum(sizes[: self.rank])
        rows = slice(start, start + sizes[self.rank])
        every_values = torch.cat([v[rows] for v in _gather_padded(values, self.process_group)], 1)
        every_indices = torch.cat([i[rows] for i in _gather_padded(indices + self.start, self.process_group)], 1)
        values, best = every_values.topk(k, dim=1)
        shape = (*input.shape[:-1], k)
        return torch.return_types.topk((values.reshape(shape), every_indices.gather(1, best).reshape(shape)))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows=[{self.start}, {self.end}), "
                f"rank={self.rank}, world_size={self.world_size}")
