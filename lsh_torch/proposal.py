"""A tail drawn from a proposal: neurons that are often labels are drawn more often, and weighted less.

``LSHLinear(tail_proposal=counts)``: in training, each of the ``t`` entries of every active set's tail
(docs/estimator.md, "A tail drawn from the label frequencies") draws neuron ``j`` with probability ``q_j``
proportional to ``sqrt(counts[j] + 1)``, again while it lands in the head (the labels and the top set, in the set
uncorrected), at most :data:`TRIES` times. It ends on ``j`` outside the head with probability
``P_j = q_j (1 - Q^TRIES) / (1 - Q)`` (``Q``: the proposal's mass on the head), and its logit is corrected by
``-log(t P_j)``; one left on the head by ``-inf`` (it counts for nothing). Then ``E[sum over the tail of
exp(z + log w)] = sum over the neurons outside the head of exp(z)``, for any head and any ``q > 0``: unbiased, as
the uniform tail is, with a lower variance where ``q`` follows ``exp(z)`` better than a constant does. A neuron
may be drawn more than once: each draw is its own term.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .retrieval import among, in_sorted

# q ~ (counts + 1) ** POWER. The LM example at 6e-3 with 128 words per token, seed 1: a power of 0.25 gave
# perplexity 177.1, 0.5 175.4, the uniform tail 183.7; seed 0: 0.75 gave 170.8, 0.5 162.4, uniform 168.6
# (docs/results.md, "A tail drawn from the label counts").
POWER = 0.5
# Draws per tail entry until one lands outside the head: the head (labels and top set) holds the frequent outputs,
# so a single draw often hits it (a batch-shared LM set of 2,048, 6e-3: perplexity 11.6 above the uniform tail's
# with one draw, hits weighted 0). The weights count the tries (proposal_log_weights), so any number is unbiased.
TRIES = 16
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
    cdf = _cumulative_weights(counts)
    if counts.numel() > 1 and not bool((cdf[1:] > cdf[:-1]).all()):  # a neuron never drawn: a biased estimate
        raise ValueError(f"tail_proposal's counts span too wide a range ({float(counts.max()):.3g} against "
                         f"{float(counts.min()):.3g}): the draw weights sqrt(count + 1) of the smallest vanish beside the "
                         "largest's sum in float64, so those outputs could never be drawn")
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
        cdf = _cumulative_weights(counts)
        points = torch.linspace(0, float(cdf[-1]), GUIDE * cdf.shape[0] + 1, dtype=torch.float64)
        guide = torch.searchsorted(cdf, points, right=True).clamp_max_(cdf.shape[0] - 1).to(torch.int32)
        return cls(cdf.to(device), guide.to(device))

    @property
    def n(self) -> int:
        return self.cdf.shape[0]

    def mass(self, neurons: Tensor) -> Tensor:
        """The unnormalised draw weight of each of ``neurons`` (float64), as the draws see it."""
        return self.cdf[neurons] - torch.where(neurons > 0, self.cdf[(neurons - 1).clamp_min(0)], 0.0)

    def draw(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` independent draws (int64)."""
        u = torch.rand(count, generator=generator, dtype=torch.float64, device=self.cdf.device)
        return self.inverse(u.mul_(self.cdf[-1]))

    def inverse(self, u: Tensor) -> Tensor:
        """The neurons drawn by ``u`` (float64 in ``[0, cdf[-1])``): the first ``j`` with ``cdf[j] > u``."""
        cdf, n = self.cdf, self.n
        at = (u * ((self.guide.shape[0] - 1) / cdf[-1])).long().clamp_(0, self.guide.shape[0] - 1)
        j = self.guide[at].long()
        wrong = (cdf[j] <= u) | ((j > 0) & (cdf[(j - 1).clamp_min_(0)] > u))
        if bool(wrong.any()):
            j[wrong] = torch.searchsorted(cdf, u[wrong], right=True).clamp_max_(n - 1)
        return j


def draw_tail(active: Tensor, head: Tensor, proposal: Proposal, seed: int) -> Tensor:
    """``active`` with its tail (the entries past the first ``head``; ``active [B, A]`` with ``head [B]``, or
    ``[A]`` with a scalar ``head``) replaced by draws from the proposal, seeded by ``seed``: each entry draws
    until it lands outside its row's head, at most :data:`TRIES` times (then it stays on the head: -inf)."""
    rows = active.reshape(-1, active.shape[-1])
    heads = head.reshape(-1)
    tail = _in_tail(rows, heads)
    row_of = tail.nonzero()[:, 0]  # the tail's entries, row-major
    keys = _head_keys(rows, heads, int(heads.max()), proposal.n)
    generator = torch.Generator(active.device).manual_seed(seed)
    draws = proposal.draw(row_of.shape[0], generator)
    pending = torch.arange(row_of.shape[0], device=active.device)
    for _ in range(TRIES - 1):  # (a round redraws the hits only: the share of the head's mass, Q, of the last)
        pending = pending[in_sorted(keys, row_of[pending] * proposal.n + draws[pending])]
        if not pending.numel():
            break
        draws[pending] = proposal.draw(pending.shape[0], generator)
    return rows.masked_scatter(tail, draws).reshape(active.shape)


def proposal_log_weights(active: Tensor, head: Tensor, proposal: Proposal) -> Tensor:
    """Log-weights of a set from :func:`draw_tail`: 0 in the head; for a tail entry of neuron ``j`` outside the
    head, one over its expected count, ``-log(t q_j (1 - Q^TRIES) / (1 - Q))`` (``t`` the tail's length, ``Q`` the
    proposal's mass on the row's head); ``-inf`` for one left on the head. float32, ``active``'s shape."""
    rows = active.reshape(-1, active.shape[-1])
    width, heads = rows.shape[1], head.reshape(-1)
    first, last = 0, width  # the columns that may hold draws, and head entries (a graph reads no bounds off the data)
    if not torch.compiler.is_compiling():
        first, last = int(heads.min()), int(heads.max())
    log_weights = torch.zeros(rows.shape, dtype=torch.float32, device=active.device)
    if first == width:
        return log_weights.reshape(active.shape)
    columns = torch.arange(width, device=active.device)
    in_head = columns[:last] < heads.unsqueeze(1)
    head_mass = torch.where(in_head, proposal.mass(rows[:, :last]), 0.0).sum(1, keepdim=True)
    rest = 1 - head_mass / proposal.cdf[-1]  # 1 - Q, read as a share of the rest: exact where Q is near 1
    # P(an entry ends on j) = q_j (1 + Q + ... + Q^(TRIES-1)) = q_j (1 - Q^TRIES) / (1 - Q)
    reach = -torch.expm1(TRIES * torch.log1p(-rest)) / rest  # (1 - Q^TRIES) / (1 - Q); TRIES where Q is near 1
    drawn = rows[:, first:]
    t = (width - heads).clamp_min(1).to(torch.float64).unsqueeze(1)
    hit = among(drawn, rows[:, :last].masked_fill(~in_head, -1))  # (-1: padding to among)
    weight = -(t * reach * proposal.mass(drawn) / proposal.cdf[-1]).log()
    tail = columns[first:] >= heads.unsqueeze(1)
    log_weights[:, first:] = torch.where(tail, torch.where(hit, -math.inf, weight), 0.0)
    return log_weights.reshape(active.shape)


def _head_keys(rows: Tensor, heads: Tensor, last: int, n: int) -> Tensor:
    """``row * n + neuron`` of every head entry, sorted (int64: rows x n stays below 2^63)."""
    in_head = torch.arange(last, device=rows.device) < heads.unsqueeze(1)
    row = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1)
    return (row * n + rows[:, :last])[in_head].sort().values


def _cumulative_weights(counts: Tensor) -> Tensor:
    return (counts + 1).pow_(POWER).cumsum_(0)


def _in_tail(active: Tensor, head: Tensor) -> Tensor:
    return torch.arange(active.shape[-1], device=active.device) >= head.unsqueeze(-1)
