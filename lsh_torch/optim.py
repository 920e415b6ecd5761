"""LazyAdam: Adam on the touched rows only, one fused C++ pass (lsh_torch::lazy_adam_)."""
from __future__ import annotations

import math

import torch

from . import ops


class LazyAdam(torch.optim.Optimizer):
    """A drop-in for :class:`torch.optim.SparseAdam` (same arithmetic, same argument checks):
    moments and parameters of the rows a sparse gradient touches are updated, nothing else.
    Use it with ``LSHLinear(..., sparse_grad=True)``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazyAdam does not support dense gradients, please consider Adam instead")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = p.grad.coalesce()
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                ops.lazy_adam_(p, state["exp_avg"], state["exp_avg_sq"], grad.indices()[0], grad.values(),
                               step_size, beta1, beta2, group["eps"])
        return loss
