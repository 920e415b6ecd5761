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
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .retrieval import among

# q ~ (counts + 1) ** POWER. The LM example at 6e-3 with 128 words per token, seed 1: a power of 0.25 gave
# perplexity 177.1, 0.5 175.4, the uniform tail 183.7; seed 0: 0.75 gave 170.8, 0.5 162.4, uniform 168.6
# (docs/results.md, "A tail drawn from the label frequencies").
POWER = 0.5
GUIDE = 4  # guide points per neuron (see Proposal)


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


class Proposal(NamedTuple):
    """The draw weights of ``counts`` on one device: ``cdf [N]`` float64, their cumulative sums (neuron ``j``
    is drawn with probability ``(cdf[j] - cdf[j-1]) / cdf[-1]``), and ``guide [GUIDE * N + 1]``, the neuron
    at each of as many evenly spaced points of ``[0, cdf[-1]]``: a draw's likely answer, checked against
    ``cdf`` (a binary search over 50,001 float64 sums took 55 ns a draw; the guide answers most in one read)."""
    cdf: Tensor
    guide: Tensor

    @classmethod
    def of(cls, counts: Tensor, device: torch.device) -> "Proposal":
        cdf = (counts + 1).pow_(POWER).cumsum_(0)
        points = torch.linspace(0, float(cdf[-1]), GUIDE * cdf.shape[0] + 1, dtype=torch.float64)
        guide = torch.searchsorted(cdf, points, right=True).clamp_max_(cdf.shape[0] - 1).to(torch.int32)
        return cls(cdf.to(device), guide.to(device))

    def inverse(self, u: Tensor) -> Tensor:
        """The neurons drawn by ``u`` (float64 in ``[0, cdf[-1])``): the first ``j`` with ``cdf[j] > u``."""
        cdf, n = self.cdf, self.cdf.shape[0]
        at = (u * ((self.guide.shape[0] - 1) / cdf[-1])).long().clamp_(0, self.guide.shape[0] - 1)
        j = self.guide[at].long()
        wrong = (cdf[j] <= u) | ((j > 0) & (cdf[(j - 1).clamp_min_(0)] > u))
        if bool(wrong.any()):
            j[wrong] = torch.searchsorted(cdf, u[wrong], right=True).clamp_max_(n - 1)
        return j


def draw_tail(active: Tensor, head: Tensor, proposal: Proposal, seed: int) -> Tensor:
    """``active`` with its tail (the entries past the first ``head``; ``active [B, A]`` with ``head [B]``, or
    ``[A]`` with a scalar ``head``) replaced by independent draws from the proposal, seeded by ``seed``."""
    tail = _in_tail(active, head)
    generator = torch.Generator(active.device).manual_seed(seed)
    u = torch.rand(int(tail.sum()), generator=generator, dtype=torch.float64, device=active.device)
    return active.masked_scatter(tail, proposal.inverse(u.mul_(proposal.cdf[-1])))


def proposal_log_weights(active: Tensor, head: Tensor, proposal: Proposal) -> Tensor:
    """Log-weights of a set from :func:`draw_tail`: 0 in the head, ``-log(t q_j)`` for a tail draw of neuron
    ``j`` (``t`` the tail's length), ``-inf`` for one that hits the head. float32, ``active``'s shape."""
    rows = active.reshape(-1, active.shape[-1])
    width, heads = rows.shape[1], head.reshape(-1)
    first, last = 0, width  # the columns that may hold draws, and head entries (a graph reads no bounds off the data)
    if not torch.compiler.is_compiling():
        first, last = int(heads.min()), int(heads.max())
    log_weights = torch.zeros(rows.shape, dtype=torch.float32, device=active.device)
    if first == width:
        return log_weights.reshape(active.shape)
    cdf, drawn = proposal.cdf, rows[:, first:]
    t = (width - heads).clamp_min(1).to(torch.float64).unsqueeze(1)
    q = (cdf[drawn] - torch.where(drawn > 0, cdf[(drawn - 1).clamp_min(0)], 0.0)) / cdf[-1]
    columns = torch.arange(width, device=active.device)
    in_head = columns[:last] < heads.unsqueeze(1)
    hit = among(drawn, rows[:, :last].masked_fill(~in_head, -1))  # (-1: padding to among)
    tail = columns[first:] >= heads.unsqueeze(1)
    log_weights[:, first:] = torch.where(tail, torch.where(hit, -math.inf, -(t * q).log()), 0.0)
    return log_weights.reshape(active.shape)


def _in_tail(active: Tensor, head: Tensor) -> Tensor:
    return torch.arange(active.shape[-1], device=active.device) >= head.unsqueeze(-1)
