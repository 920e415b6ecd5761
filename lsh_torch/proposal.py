"""A tail drawn from a proposal: neurons that are often labels are drawn more often, and weighted less.

``LSHLinear(tail_proposal=counts)``: in training, the tail of every active set (docs/estimator.md, "A tail
drawn from the label frequencies") is ``t`` independent draws, each neuron ``j`` with probability
``q_j`` proportional to ``sqrt(counts[j] + 1)``. A draw's logit is corrected by ``-log(t q_j)``; a draw that
hits the head (the labels and the top set, already in the set uncorrected) by ``-inf``: it counts for
nothing. Then ``E[sum over the tail of exp(z + log w)] = sum over the neurons outside the head of exp(z)``,
for any head and any ``q > 0``: unbiased, as the uniform tail is, with a lower variance where ``q`` follows
``exp(z)`` better than a constant does. A neuron may be drawn more than once: each draw is its own term.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .retrieval import among

# q ~ (counts + 1) ** POWER. The LM example at 6e-3 with 128 words per token, seed 1: a power of 0.25 gave
# perplexity 177.1, 0.5 175.4, the uniform tail 183.7; seed 0: 0.75 gave 170.8, 0.5 162.4, uniform 168.6
# (docs/results.md, "A tail drawn from the label frequencies").
POWER = 0.5


def check_proposal(counts, out_features: int) -> Optional[Tensor]:
    """``counts`` as the layer keeps it: None, or a float64 CPU copy of ``out_features`` finite counts >= 0."""
    if counts is None:
        return None
    if not isinstance(counts, Tensor):
        raise TypeError(f"tail_proposal must be None or a tensor of {out_features:,} counts (how often each output "
                        f"is a label in the training data), got {type(counts).__name__}")
    if counts.dtype == torch.bool or counts.is_complex() or counts.dim() != 1 or counts.shape[0] != out_features:
        raise ValueError(f"tail_proposal must be a 1-D real tensor of out_features = {out_features:,} counts, got "
                         f"{counts.dtype} of shape {tuple(counts.shape)}")
    counts = counts.detach().to("cpu", torch.float64, copy=True)
    bad = ~torch.isfinite(counts) | (counts < 0)
    if bool(bad.any()):
        at = int(bad.nonzero()[0, 0])
        raise ValueError(f"tail_proposal must hold finite counts >= 0, got {float(counts[at])} at output {at}")
    return counts


def proposal_cdf(counts: Tensor, device: torch.device) -> Tensor:
    """The cumulative draw weights ``[N]`` float64 on ``device``: draw ``j`` takes ``(cdf[j] - cdf[j-1]) / cdf[-1]``."""
    return (counts + 1).pow_(POWER).cumsum_(0).to(device)


def draw_tail(active: Tensor, head: Tensor, cdf: Tensor, seed: int) -> Tensor:
    """``active`` with its tail (the entries past the first ``head``; ``active [B, A]`` with ``head [B]``, or
    ``[A]`` with a scalar ``head``) replaced by independent draws from the proposal, seeded by ``seed``."""
    generator = torch.Generator(active.device).manual_seed(seed)
    u = torch.rand(active.shape, generator=generator, dtype=torch.float64, device=active.device) * cdf[-1]
    draws = torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[0] - 1)
    return torch.where(_in_tail(active, head), draws, active)


def proposal_log_weights(active: Tensor, head: Tensor, cdf: Tensor) -> Tensor:
    """Log-weights of a set from :func:`draw_tail`: 0 in the head, ``-log(t q_j)`` for a tail draw of neuron
    ``j`` (``t`` the tail's length), ``-inf`` for one that hits the head. float32, ``active``'s shape."""
    tail = _in_tail(active, head)
    width = active.shape[-1]
    t = (width - head).clamp_min(1).to(torch.float64).unsqueeze(-1)
    below = torch.where(active > 0, cdf[(active - 1).clamp_min(0)], 0.0)
    q = (cdf[active] - below) / cdf[-1]
    heads = torch.where(tail, -1, active).reshape(-1, width)  # (-1: padding to among)
    hit = among(active, heads)
    log_w = torch.where(hit, -math.inf, -(t * q).log())
    return torch.where(tail, log_w, 0.0).float()


def _in_tail(active: Tensor, head: Tensor) -> Tensor:
    return torch.arange(active.shape[-1], device=active.device) >= head.unsqueeze(-1)
