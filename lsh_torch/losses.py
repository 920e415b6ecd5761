"""Losses over the active outputs of a sparse forward (SparseOutput)."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ._checks import autocast_on, check_int, refuse, vouched


def sparse_cross_entropy(output, labels: Tensor, reduction: str = "mean", ignore_index: int = -100,
                         label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy over the active logits, the target mass spread evenly over each
    row's distinct true labels (as SLIDE does; a label given twice counts once).

    The output's ``log_weights`` (if any) are added to the logits first: the uniformly drawn tail
    of the active set then stands for all the neurons it was drawn from, and the softmax's
    normaliser is an unbiased estimate of the full one (``docs/estimator.md``).

    Args:
        output: a :class:`~lsh_torch.nn.SparseOutput` (``values [*, A]``, ``indices [*, A]`` or
            ``[A]``, optional ``log_weights`` of the shape of ``indices``).
        labels: int64 ``[*]`` (one label per row) or ``[*, M]`` (several), padded with -1 or
            ``ignore_index``.
        reduction: ``"mean"`` (over rows with at least one label; 0 when there are none, where
            ``F.cross_entropy`` gives NaN), ``"sum"`` or ``"none"`` (0 for rows without labels).
        ignore_index: a label value that counts as padding, like ``F.cross_entropy``'s (default
            -100, the Hugging Face convention). :meth:`LSHLinear.forward_sparse` takes -1 and -100
            as padding; mask other values out before it.
        label_smoothing: as ``F.cross_entropy``'s, in [0, 1]: the target is ``1 - label_smoothing``
            of the labels' mass plus ``label_smoothing`` spread evenly over *all* outputs, the
            part of it on the outputs outside the active set estimated from the set: each active
            output stands for ``exp(log_weight)`` outputs (the tail for the rest it was drawn from).
            Without log_weights (or with all of them 0: a set without a tail) it is spread over
            the active outputs alone. Sharded: every rank passes the same value.

    A :class:`~lsh_torch.distributed.ShardedSparseOutput` (from ``ShardedLSHLinear.forward_sparse``)
    gives this rank's loss over its own rows, the softmax taken over every shard's active set
    (collective: every rank calls it).

    Differentiable through ``output.values`` only. Every label must be in its row's active set
    (:meth:`LSHLinear.forward_sparse` forces the labels it is given in): a label out of range or
    outside the set raises a ValueError rather than being dropped; so does one that the uniform tail
    drew without its being forced (its logit carries the tail's log-weight). A label not passed to
    ``forward_sparse`` that the hashed top set happens to hold cannot be told from a forced one and
    is scored as one. Computed and reduced in float32 (float64 for float64 values); returned in the
    values' dtype, or float32 under autocast, as ``F.cross_entropy`` is. The class dimension is
    the last (``values [*, A]``), not ``F.cross_entropy``'s second.
    """
    def check():
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 tensor of class ids, got "
                            f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
        check_int("ignore_index", ignore_index, -2 ** 63, 2 ** 63 - 1)
        check_label_smoothing(label_smoothing)

    from .distributed import ShardedSparseOutput, sharded_cross_entropy  # imported here: it imports this module
    if isinstance(output, ShardedSparseOutput):  # collective: a bad argument on one rank must stop every rank
        return sharded_cross_entropy(output, labels, reduction, ignore_index, label_smoothing, check)
    check()
    values, indices, log_weights = _checked_output(output)
    if labels.device != values.device:
        raise ValueError(f"labels are on {labels.device} but output.values are on {values.device}")
    batch_shape = values.shape[:-1]
    logits = values.reshape(-1, values.shape[-1])
    labels = _label_rows(labels, batch_shape, ignore_index)
    column, found = _label_columns(indices, labels, logits.shape[1])
    _check_labels_found(found | (labels == -1), labels)
    _check_labels_forced(_drawn(column, log_weights, logits.shape), labels)
    corrected = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
    if log_weights is not None:
        log_weights = log_weights.reshape(-1, logits.shape[-1]).expand_as(corrected)
        corrected = corrected + log_weights
    if label_smoothing:  # the target reaches every output: a dense [rows, A] target
        mask = _mask_of(column, logits.shape[1])
        count = mask.sum(1)
        # The labels' mass in the wider dtype too (a bfloat16 third is not one).
        target = mask.to(corrected.dtype) / count.clamp_min(1).to(corrected.dtype).unsqueeze(1)
        target, shift = smoothed_target(target, log_weights, label_smoothing)
        log_probs = torch.log_softmax(corrected, dim=1)
        scored = torch.where(target > 0, target * log_probs, 0.0)  # an entry of weight 0 (log_weight -inf): 0
        loss = torch.where(count > 0, shift - scored.sum(1), 0.0)
    else:  # -log p of each distinct label, averaged: gathered, no [rows, A] target (log_softmax's fused
        # kernels: 2-2.6x faster forward and backward than logsumexp's at [1,024, 2,048] and [128, 8,191])
        column = column.sort(1).values  # a label given twice in a row counts once, as one output
        first = torch.ones_like(column, dtype=torch.bool)
        first[:, 1:] = column[:, 1:] != column[:, :-1]
        valid = first & (column < logits.shape[1])
        count = valid.sum(1)
        log_probs = torch.log_softmax(corrected, dim=1)
        picked = log_probs.gather(1, column.clamp_max(logits.shape[1] - 1))  # A >= 1: values [*, 0] do not reshape
        loss = torch.where(count > 0, -torch.where(valid, picked, 0.0).sum(1) / count.clamp_min(1), 0.0)
    return reduce_loss(loss, count > 0, reduction, batch_shape, values)


def reduce_loss(loss: Tensor, has_label: Tensor, reduction: str, batch_shape: torch.Size, values: Tensor) -> Tensor:
    """Per-row ``loss`` (float32, or float64) reduced in its own dtype, then returned in ``values``'
    dtype, or float32 under autocast as ``F.cross_entropy``'s (autocast runs it in float32): rounding
    each row's loss and the sum to bfloat16 cost 0.03-0.06 nats, and a float16 sum overflowed to inf (a
    float16 layer's ``"sum"`` outside autocast still returns in float16 and can, as ``F.cross_entropy``'s)."""
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.sum() / has_label.sum().clamp_min(1)
    return loss if autocast_on(values.device.type) else loss.to(values.dtype)


def _checked_output(output) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(values [*, A], indices [A] or [*, A], log_weights of indices' shape or None)``, checked (indices
    distinct neuron ids, log-weights valid), log_weights detached."""
    if isinstance(output, Tensor) or not isinstance(output, tuple) or len(output) not in (2, 3):
        raise TypeError("output must be a SparseOutput (values, indices[, log_weights]), as LSHLinear.forward_sparse "
                        f"returns, got {type(output).__name__} (for dense logits use F.cross_entropy)")
    values, indices, log_weights = output if len(output) == 3 else (*output, None)
    if not isinstance(values, Tensor) or not values.dtype.is_floating_point or values.dim() == 0:
        raise TypeError(f"output.values must be a floating tensor [*, A], got "
                        f"{values.dtype if isinstance(values, Tensor) else type(values).__name__}")
    if values.shape[-1] == 0:
        raise ValueError(f"output.values must hold at least one active output (a softmax over none is undefined), "
                         f"got shape {tuple(values.shape)}")
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
        raise TypeError("output.indices must be an int64 tensor")
    for name, t in (("output.indices", indices), ("output.log_weights", log_weights)):
        if isinstance(t, Tensor) and t.device != values.device:
            raise ValueError(f"{name} are on {t.device} but output.values are on {values.device}")
    # (Dimensions first: a tuple comparison compares sizes before lengths, and a traced batch compared with the
    # shared set's width became an export guard, batch != A.)
    if not (indices.dim() == values.dim() and indices.shape == values.shape
            or indices.dim() == 1 and indices.shape[0] == values.shape[-1]):
        raise ValueError(f"output.indices must have values' shape {tuple(values.shape)} (per row) or "
                         f"{tuple(values.shape[-1:])} (shared), got {tuple(indices.shape)}")
    if log_weights is not None and (not isinstance(log_weights, Tensor) or log_weights.shape != indices.shape):
        given = tuple(log_weights.shape) if isinstance(log_weights, Tensor) else type(log_weights).__name__
        raise ValueError(f"output.log_weights must be None or have indices' shape {tuple(indices.shape)}, got {given}")
    if log_weights is not None and not log_weights.dtype.is_floating_point:
        raise TypeError(f"output.log_weights must be a floating tensor, got {log_weights.dtype}")
    if not vouched(indices):
        _check_distinct(indices, log_weights)
    if log_weights is not None and not vouched(log_weights):
        refuse(log_weights.isnan() | (log_weights == math.inf),
               "sparse_cross_entropy: output.log_weights must not be NaN or inf (the log of how many outputs an entry "
               "stands for; -inf for none)")
    # A correction for how the tail was drawn, not something to train: gradients flow through the values only.
    return values, indices, None if log_weights is None else log_weights.detach()


def check_label_smoothing(label_smoothing) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing!r}")
    return float(label_smoothing)


def smoothed_target(target: Tensor, log_weights: Optional[Tensor], label_smoothing: float,
                    all_reduce=None) -> tuple[Tensor, Tensor]:
    """``label_smoothing`` of each row's target moved onto all outputs, as estimated by the active
    set: active output ``a`` stands for ``w_a = exp(log_weights[a])`` outputs (1 without
    log_weights), so it gets ``w_a / sum(w)`` of the spread mass. Also returns, per row, what to
    add to ``-sum(target * log_softmax(logits + log_weights))``: the spread part must score the
    logits themselves, not the corrected ones (``label_smoothing * sum(w * log_weights) / sum(w)``).
    ``all_reduce`` sums the per-row sums over the shards of a sharded output."""
    weights = torch.ones_like(target) if log_weights is None else log_weights.to(target.dtype).exp()
    sums = torch.stack([weights.sum(1), (weights * log_weights.masked_fill(weights == 0, 0)).sum(1)  # 0 * -inf: 0
                        if log_weights is not None else torch.zeros_like(target[:, 0])], 1)
    if all_reduce is not None:
        all_reduce(sums)
    spread = weights / sums[:, :1]
    return (1 - label_smoothing) * target + label_smoothing * spread, label_smoothing * sums[:, 1] / sums[:, 0]


def _label_rows(labels: Tensor, batch_shape: torch.Size, ignore_index: int, name: str = "labels") -> Tensor:
    """``labels`` (``batch_shape`` or ``batch_shape + (M,)``) as ``[rows, M]``, every padding value -1; ``name``
    is the argument's, for the message."""
    batch_shape = torch.Size(batch_shape)
    if labels.shape[: len(batch_shape)] != batch_shape or labels.dim() > len(batch_shape) + 1:
        raise ValueError(f"{name} must have shape {tuple(batch_shape)} or {tuple(batch_shape)} + (M,), "
                         f"got {tuple(labels.shape)}")
    # (math.prod: Size.numel() specialised a dynamic batch of a non-strict torch.export to the traced one)
    labels = labels.reshape(math.prod(batch_shape), labels.shape[-1] if labels.dim() > len(batch_shape) else 1)
    return labels.masked_fill(labels == ignore_index, -1)


def _check_labels_found(ok: Tensor, labels: Tensor, sizes: Optional[list[int]] = None) -> None:
    refuse(~ok, "sparse_cross_entropy: a label is not among the row's active outputs: out of range, or not passed to "
                "forward_sparse(x, labels), which forces labels in (-1 and ignore_index are padding)",
           lambda bad: _first_label(bad, labels, sizes))


def _first_label(bad: Tensor, labels: Tensor, sizes: Optional[list[int]] = None) -> str:
    """Which label was refused; ``sizes``: the ranks' row counts, when ``labels`` are theirs stacked."""
    row, col = bad.nonzero()[0].tolist()
    where = f"row {row}"
    if sizes is not None:  # a sharded loss: the rank that passed it, and its own row
        rank = next(r for r in range(len(sizes)) if row < sum(sizes[:r + 1]))
        where = f"rank {rank}'s row {row - sum(sizes[:rank])}"
    return f" (label {labels[row, col].item()} of {where})"


def _drawn(column: Tensor, log_weights: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    """``drawn[r, m]``: is label ``m`` of row ``r`` in the row's set as a uniform tail draw (a non-zero
    log-weight) rather than forced in (``column`` from :func:`_label_columns`, ``shape`` the logits')."""
    if log_weights is None:
        return None
    weights = log_weights.reshape(-1, shape[1]).expand(shape[0], shape[1])  # shared: a view, not [rows, A]
    return (weights.gather(1, column.clamp_max(shape[1] - 1)) != 0) & (column < shape[1])


def _check_labels_forced(drawn: Optional[Tensor], labels: Tensor, sizes: Optional[list[int]] = None) -> None:
    """A label that forward_sparse was not given but whose output the tail happened to draw carries the
    tail's log-weight: its logit would be scored raised by it, the loss too low (by 3.4 nats measured)."""
    if drawn is not None:
        refuse(drawn, "sparse_cross_entropy: a label's output carries a non-zero log-weight (a uniform tail draw, or "
                      "-inf: an entry that stands for none), so it was not forced in: pass the labels to "
                      "forward_sparse(x, labels), which forces them in uncorrected",
               lambda bad: _first_label(bad, labels, sizes))


def _check_distinct(indices: Tensor, log_weights: Optional[Tensor] = None) -> None:
    """Neuron ids >= 0, none twice in a row's active set among its entries that stand for themselves (log-weight
    0, or no log_weights): it would count twice in the normaliser. Entries of other log-weights may repeat a
    neuron: a tail drawn with replacement (``LSHLinear(tail_proposal=)``) has each draw as its own term."""
    refuse(indices < 0, "sparse_cross_entropy: output.indices must be neuron ids >= 0")
    keys = indices
    if log_weights is not None:  # entries that may repeat get keys of their own: -1 - their column
        keys = torch.where(log_weights == 0, indices, -1 - torch.arange(indices.shape[-1], device=indices.device))
    ordered = keys.sort(-1).values
    refuse((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0),
           "sparse_cross_entropy: output.indices repeat a neuron within a row's active set; each must appear once "
           "(with log_weights, once among the entries of log-weight 0: a tail's repeated draws carry non-zero ones)")


def _label_columns(indices: Tensor, labels: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``column[r, m]``: where label ``labels[r, m]`` is in row r's active set (``indices [A]``
    shared, or ``[rows, A]``), ``width`` where it is not (or is padding); ``found[r, m]``: is it
    there. Shared indices are looked up by binary search (O(A log A + rows*M log A)); per-row ones
    by comparison. The size stays fixed: selecting the found ones would be a host sync on a GPU."""
    if indices.dim() > 1:
        idx = indices.reshape(-1, indices.shape[-1])
        hits = (idx.unsqueeze(1) == labels.unsqueeze(2)) & (labels.unsqueeze(2) >= 0)
        found = hits.any(2)
        return torch.where(found, hits.to(torch.uint8).argmax(2), width), found
    order = indices.argsort(stable=True)  # a neuron drawn again in the tail: its first (head) entry found
    sorted_indices = indices[order]
    pos = torch.searchsorted(sorted_indices, labels).clamp_max(indices.shape[0] - 1)
    found = (labels >= 0) & (sorted_indices[pos] == labels)
    return torch.where(found, order[pos], width), found


def _mask_of(column: Tensor, width: int) -> Tensor:
    """``mask[r, a]``: is active output ``a`` one of row r's labels (``column`` from :func:`_label_columns`)."""
    mask = torch.zeros(column.shape[0], width + 1, dtype=torch.bool, device=column.device)
    return mask.scatter_(1, column, True)[:, :-1]  # the spare last column takes the labels not found
