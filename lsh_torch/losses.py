"""Losses over the active outputs of a sparse forward (SparseOutput)."""
from __future__ import annotations

import torch
from torch import Tensor


def sparse_cross_entropy(output, labels: Tensor, reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Softmax cross-entropy over the active logits, the target mass spread evenly over each
    row's true labels (as SLIDE does).

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

    A :class:`~lsh_torch.distributed.ShardedSparseOutput` (from ``ShardedLSHLinear.forward_sparse``)
    gives this rank's loss over its own rows, the softmax taken over every shard's active set
    (collective: every rank calls it).

    Differentiable through ``output.values`` only. Every label must be in its row's active set
    (:meth:`LSHLinear.forward_sparse` forces the labels it is given in): a label that is not, out
    of range or not passed to ``forward_sparse``, raises a ValueError rather than being dropped.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        raise TypeError("labels must be an int64 tensor")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    from .distributed import ShardedSparseOutput, sharded_cross_entropy  # imported here: it imports this module
    if isinstance(output, ShardedSparseOutput):
        return sharded_cross_entropy(output, labels, reduction, ignore_index)
    values, indices, log_weights = output if len(output) == 3 else (*output, None)
    batch_shape = values.shape[:-1]
    logits = values.reshape(-1, values.shape[-1])
    labels = _label_rows(labels, batch_shape, ignore_index)
    mask, found = _label_mask(indices, labels, logits.shape)
    _check_labels_found(found | (labels == -1), labels)
    target = mask.to(logits.dtype)
    count = target.sum(1)
    target = target / count.clamp_min(1).unsqueeze(1)
    logits32 = logits.float()
    if log_weights is not None:
        logits32 = logits32 + log_weights.reshape(-1, logits.shape[-1])
    loss = -(target * torch.log_softmax(logits32, dim=1).to(logits.dtype)).sum(1)
    if reduction == "none":
        return loss.reshape(batch_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (count > 0).sum().clamp_min(1)


def _label_rows(labels: Tensor, batch_shape: torch.Size, ignore_index: int) -> Tensor:
    """``labels`` (``batch_shape`` or ``batch_shape + (M,)``) as ``[rows, M]``, every padding value -1."""
    batch_shape = torch.Size(batch_shape)
    if labels.shape[: len(batch_shape)] != batch_shape or labels.dim() > len(batch_shape) + 1:
        raise ValueError(f"labels must have shape {tuple(batch_shape)} or {tuple(batch_shape)} + (M,), "
                         f"got {tuple(labels.shape)}")
    labels = labels.reshape(batch_shape.numel(), labels.shape[-1] if labels.dim() > len(batch_shape) else 1)
    return labels.masked_fill(labels == ignore_index, -1)


def _check_labels_found(ok: Tensor, labels: Tensor) -> None:
    hint = ("out of range, or not passed to forward_sparse(x, labels), which forces labels in (-1 and ignore_index "
            "are padding)")
    all_ok = ok.all()
    if torch.compiler.is_compiling() or labels.device.type != "cpu":  # no host sync: checked on the device
        torch._assert_async(all_ok, f"sparse_cross_entropy: a label is not among its row's active outputs: {hint}")
    elif not bool(all_ok):
        row, col = (~ok).nonzero()[0].tolist()
        raise ValueError(f"sparse_cross_entropy: label {labels[row, col].item()} of row {row} is not among the row's "
                         f"active outputs: {hint}")


def _label_mask(indices: Tensor, labels: Tensor, shape) -> tuple[Tensor, Tensor]:
    """``mask[r, a]``: is ``indices[(r,) a]`` one of row r's labels; ``found[r, m]``: is label
    ``labels[r, m]`` (``>= 0``) active. Shared indices ``[A]`` are looked up by binary search
    (O(A log A + rows*M log A)); per-row ``[rows, A]`` by comparison."""
    if indices.dim() > 1:
        idx = indices.reshape(-1, indices.shape[-1])
        hits = (idx.unsqueeze(1) == labels.unsqueeze(2)) & (labels.unsqueeze(2) >= 0)
        return hits.any(1), hits.any(2)
    order = indices.argsort()
    sorted_indices = indices[order]
    pos = torch.searchsorted(sorted_indices, labels).clamp_max(max(indices.shape[0] - 1, 0))
    found = (labels >= 0) & (sorted_indices[pos] == labels) if indices.shape[0] else torch.zeros_like(labels, dtype=torch.bool)
    mask = torch.zeros(shape, dtype=torch.bool, device=labels.device)
    rows = torch.arange(shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return mask.index_put_((rows[found], order[pos[found]]), torch.ones((), dtype=torch.bool, device=labels.device)), found
