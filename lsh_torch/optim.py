"""LazyAdam: Adam on the touched rows only, one fused C++ pass (lsh_torch::lazy_adam_)."""
from __future__ import annotations

import math

import torch

from . import ops


class LazyAdam(torch.optim.Optimizer):
    """A drop-in for :class:`torch.optim.SparseAdam` (same arithmetic, same argument checks):
    moments and parameters of the rows a sparse gradient touches are updated, nothing else.
    Use it with ``LSHLinear(..., sparse_grad=True)``.

    A dense gradient touches every row, and gets :class:`torch.optim.Adam`'s step (Adam adds
    ``eps`` to the bias-corrected ``sqrt(v)``, SparseAdam to the uncorrected one). That is what a
    head tied to a dense input embedding gets (its sparse gradient plus the embedding's dense one),
    and what a model's other parameters get, so one LazyAdam can optimize them all.

    ``weight_decay`` is :class:`torch.optim.AdamW`'s, decoupled: a row is scaled by
    ``1 - lr * weight_decay`` before its Adam step. It decays lazily, like the moments: the rows a
    sparse gradient touches, every row of a dense one. (A row a sparse gradient leaves alone keeps
    its weights.) Parameter groups may set their own, as with AdamW (e.g. 0 for biases and norms).
    The default is 0 (AdamW's is 0.01): say it when replacing AdamW. ``lr * weight_decay`` must be
    at most 1 (a larger decay would flip the weights' signs); a step checks every group before it
    updates any.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        _check_decay(lr, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def __setstate__(self, state):
        super().__setstate__(state)
        self.defaults.setdefault("weight_decay", 0.0)  # an optimizer saved before weight_decay existed
        for group in self.param_groups:
            group.setdefault("weight_decay", 0.0)

    # Always eager: under torch.compile a step is one graph break (dynamo cannot trace a sparse
    # gradient's indices into the fused op; each parameter's update is one kernel call anyway).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # before any update: a refused step leaves every state as it was
            # A group's lr set after construction: 0 is a step that moves no weight (a schedule's warm-up
            # start or cosine end), as in SparseAdam and Adam; NaN would be blamed on the decay.
            if not group["lr"] >= 0:
                raise ValueError(f"Invalid learning rate: {group['lr']}")
            _check_decay(group["lr"], group["weight_decay"])
        # Every gradient checked and in the op's row form before any update: one it refuses changes nothing.
        grads = {}
        for g, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.dtype != p.dtype or p.grad.device != p.device:
                    raise TypeError(f"LazyAdam: the gradient of param_groups[{g}]['params'][{j}] must have its dtype "
                                    f"and device, {p.dtype} on {p.device}, got {p.grad.dtype} on {p.grad.device}")
                grads[p] = _row_sparse(p.grad) if p.grad.is_sparse else p.grad
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # contiguous moments: the fused op walks rows of contiguous memory
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                correction2 = math.sqrt(1 - beta2 ** state["step"])
                step_size = group["lr"] * correction2 / (1 - beta1 ** state["step"])
                grad = grads[p]
                if grad.is_sparse:
                    rows, values, eps = grad.indices()[0], grad.values(), group["eps"]
                else:  # Adam's eps, in the op's terms
                    values, eps = _rows(grad), group["eps"] * correction2
                    rows = torch.arange(values.shape[0], device=p.device)
                # A non-contiguous parameter (channels_last, a transposed view) is updated through a
                # contiguous copy, as are moments loaded in another layout.
                param = p if p.is_contiguous() else p.contiguous()
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].contiguous()
                ops.lazy_adam_(_rows(param), _rows(state["exp_avg"]), _rows(state["exp_avg_sq"]), rows, values,
                               step_size, beta1, beta2, eps, group["lr"] * group["weight_decay"])
                if param is not p:
                    p.copy_(param)
        return loss


def _check_decay(lr: float, weight_decay: float) -> None:
    if not 0.0 <= weight_decay or not lr * weight_decay <= 1.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (need weight_decay >= 0 and lr * weight_decay "
                         f"<= 1, lr is {lr})")


def _row_sparse(grad: torch.Tensor) -> torch.Tensor:
    """A sparse COO gradient as coalesced rows (one sparse dimension): ``grad.coalesce()``, without
    its sort where the rows already ascend strictly, as this package's sparse gradients do (autograd
    drops their coalesced flag when it stores ``.grad``; sorting 100,000 sorted rows of 128 took 43
    ms, checking them 0.2 ms). An element-sparse gradient (more sparse dimensions, which SparseAdam
    takes too) becomes the rows it touches, zero where it has no entry."""
    if grad.dim() and grad.sparse_dim() > 1:
        grad = grad.coalesce()
        where, values = grad.indices(), grad.values()
        rows, row_of = where[0].unique(return_inverse=True)
        dense = values.new_zeros(rows.shape[0], *grad.shape[1:])
        dense[(row_of, *where[1:])] = values  # coalesced: each entry once
        return torch.sparse_coo_tensor(rows[None], dense, grad.shape, is_coalesced=True)
    rows = grad._indices()
    if grad.is_coalesced() or rows.shape[0] != 1 or not bool((rows[0, 1:] > rows[0, :-1]).all()):
        return grad.coalesce()
    return torch.sparse_coo_tensor(rows, grad._values(), grad.shape, is_coalesced=True, check_invariants=False)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor as one row (the op wants rows); others as they are."""
    return t.view(1) if t.dim() == 0 else t
