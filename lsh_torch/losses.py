"""Losses over the active outputs of a sparse forward (SparseOutput)."""
from __future__ import annotations

import torch
from torch import Tensor


def sparse_cross_entropy(output, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy over the active logits, the target mass spread evenly over each
    row's true labels (as SLIDE does).

    The output's ``log_weights`` (if any) are added to the logits first: the uniformly drawn tail
    of the active set then stands for all the neurons it was drawn from, and the softmax's
    normaliser is an unbiased estimate of the full one (``docs/estimator.md``).

    Args:
        output: a :class:`~lsh_torch.nn.SparseOutput` (``values [*, A]``, ``indices [*, A]`` or
            ``[A]``, optional ``log_weights`` of the shape of ``indices``).
        labels: int64 ``[*]`` (one label per row) or ``[*, M]`` padded with -1 (several).
        reduction: ``"mean"`` (over rows that have a label in their active set), ``"sum"`` or ``"none"``.

    Differentiable through ``output.values`` only. Labels outside a row's active set get no mass:
    in training :meth:`LSHLinear.forward_sparse` forces them in; a row none of whose labels is
    active contributes 0 and is left out of the mean.
    """
    values, indices, log_weights = output if len(output) == 3 else (*output, None)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        raise TypeError("labels must be an int64 tensor")
    batch_shape = values.shape[:-1]
    if labels.shape[: len(batch_shape)] != batch_shape or labels.dim() > len(batch_shape) + 1:
        raise ValueError(f"labels must have shape {tuple(batch_shape)} or {tuple(batch_shape)} + (M,), "
                         f"got {tuple(labels.shape)}")
    logits = values.reshape(-1, values.shape[-1])
    labels = labels.reshape(logits.shape[0], 1 if labels.dim() == len(batch_shape) else labels.shape[-1])  # 0 rows too
    target = _label_mask(indices, labels, logits.shape).to(logits.dtype)
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


def _label_mask(indices: Tensor, labels: Tensor, shape) -> Tensor:
    """``mask[r, a]``: is ``indices[(r,) a]`` one of row r's labels. Shared indices ``[A]`` are looked
    up by binary search (O(A log A + rows*M log A)); per-row ``[rows, A]`` by comparison."""
    if indices.dim() > 1:
        idx = indices.reshape(-1, indices.shape[-1])
        return ((idx.unsqueeze(1) == labels.unsqueeze(2)) & (labels.unsqueeze(2) >= 0)).any(1)
    order = indices.argsort()
    sorted_indices = indices[order]
    pos = torch.searchsorted(sorted_indices, labels).clamp_max(max(indices.shape[0] - 1, 0))
    found = (labels >= 0) & (sorted_indices[pos] == labels) if indices.shape[0] else torch.zeros_like(labels, dtype=torch.bool)
    mask = torch.zeros(shape, dtype=torch.bool, device=labels.device)
    rows = torch.arange(shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return mask.index_put_((rows[found], order[pos[found]]), torch.ones((), dtype=torch.bool, device=labels.device))
