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

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import ops

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
    """The draw weights of ``counts`` on one device, as :func:`ops.proposal_draw` takes them: ``cdf [N]`` float64,
    their cumulative sums (neuron ``j`` is drawn with probability ``(cdf[j] - cdf[j-1]) / cdf[-1]``), and
    ``guide [GUIDE * N + 1]`` int32, the neuron at each of as many evenly spaced points of ``[0, cdf[-1]]``: where a
    draw's search begins (a binary search over 50,001 float64 sums took 55 ns a draw; the guide answers most in one
    read)."""
    cdf: Tensor
    guide: Tensor

    @classmethod
    def of(cls, counts: Tensor, device: torch.device) -> "Proposal":
        cdf = _cumulative_weights(counts)
        points = torch.linspace(0, float(cdf[-1]), GUIDE * cdf.shape[0] + 1, dtype=torch.float64)
        guide = torch.searchsorted(cdf, points, right=True).clamp_max_(cdf.shape[0] - 1).to(torch.int32)
        return cls(cdf.to(device), guide.to(device))


def draw_tail(active: Tensor, head: Tensor, proposal: Proposal, seed: int) -> Tensor:
    """``active`` with its tail (the entries past the first ``head``; ``active [B, A]`` with ``head [B]``, or
    ``[A]`` with a scalar ``head``) replaced by draws from the proposal, seeded by ``seed``: each entry draws
    until it lands outside its row's head, at most :data:`TRIES` times (then it stays on the head: -inf)."""
    rows = active.reshape(-1, active.shape[-1])
    return ops.proposal_draw(rows, head.reshape(-1), proposal.cdf, proposal.guide, TRIES, seed).reshape(active.shape)


def proposal_log_weights(active: Tensor, head: Tensor, proposal: Proposal) -> Tensor:
    """Log-weights of a set from :func:`draw_tail`: 0 in the head; for a tail entry of neuron ``j`` outside the
    head, one over its expected count, ``-log(t q_j (1 - Q^TRIES) / (1 - Q))`` (``t`` the tail's length, ``Q`` the
    proposal's mass on the row's head); ``-inf`` for one left on the head. float32, ``active``'s shape."""
    rows = active.reshape(-1, active.shape[-1])
    return ops.proposal_log_weights(rows, head.reshape(-1), proposal.cdf, TRIES).reshape(active.shape)


def _cumulative_weights(counts: Tensor) -> Tensor:
    return (counts.double() + 1).pow_(POWER).cumsum_(0)
