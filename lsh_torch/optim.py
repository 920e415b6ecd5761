"""LazyAdam: Adam on the touched rows only, one fused C++ pass (lsh_torch::lazy_adam_)."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import ops

try:  # FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Partial, Replicate, Shard
except ImportError:  # a torch built without distributed
    _DTensor = None


class LazyAdam(torch.optim.Optimizer):
    """A drop-in for :class:`torch.optim.SparseAdam` (same arithmetic, same argument checks):
    moments and parameters of the rows a sparse gradient touches are updated, nothing else.
    Use it with ``LSHLinear(..., sparse_grad=True)``. It takes row-sparse gradients (one sparse
    dimension, as LSHLinear and ``nn.Embedding(sparse=True)`` give them); an element-sparse one, which
    SparseAdam updates entry by entry, is refused. A step that refuses anything updates nothing.

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
    updates any. ``maximize`` ascends the objective instead, as in SparseAdam and Adam.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 maximize: bool = False):
        group = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        _check_group(group)
        if not 0.0 < float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        super().__init__(params, group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for key, default in (("weight_decay", 0.0), ("maximize", False)):  # saved before they existed
            self.defaults.setdefault(key, default)
            for group in self.param_groups:
                group.setdefault(key, default)

    # Always eager: under torch.compile a step is one graph break (dynamo cannot trace a sparse
    # gradient's indices into the fused op; each parameter's update is one kernel call anyway).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step: the rows each sparse gradient touches, every row of a dense one. ``closure``
        (optional) re-evaluates the model and returns the loss, which the step returns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything the update could refuse is checked before any update: a refused step changes nothing.
        grads = {}
        for g, group in enumerate(self.param_groups):
            # lr set after construction: 0 is a step that moves no weight (a schedule's warm-up start or
            # cosine end), as in SparseAdam and Adam.
            _check_group(group)
            for j, p in enumerate(group["params"]):
                if p.grad is not None:
                    grads[p] = _checked_grad(p, self.state[p], f"param_groups[{g}]['params'][{j}]")
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
                # A Python int: Adam's and AdamW's loaded states hold a float32 tensor, whose powers of the
                # betas rounded float64 updates to 1e-7.
                step = int(state["step"]) + 1
                correction2 = math.sqrt(1 - beta2 ** step)
                lr = float(group["lr"])  # a tensor lr too (torch's Adam takes one; schedulers fill it in place)
                step_size = lr * correction2 / (1 - beta1 ** step)
                grad = grads[p]
                if grad.is_sparse:
                    rows, values, eps = grad.indices()[0], grad.values(), group["eps"]
                else:  # Adam's eps, in the op's terms; every row (below)
                    eps = group["eps"] * correction2
                # A non-contiguous parameter (channels_last, a transposed view) is updated through a
                # contiguous copy, as are moments loaded in another layout. A DTensor (FSDP2's shards):
                # its local shard, whose dense gradient and moments are shards of the same rows.
                local = _local(p)
                param = local if local.is_contiguous() else local.contiguous()
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key].contiguous()
                if not grad.is_sparse:
                    values = _rows(_local(grad))
                    rows = torch.arange(values.shape[0], device=values.device)
                if group["maximize"]:
                    values = -values
                ops.lazy_adam_(_rows(param), _rows(_local(state["exp_avg"])), _rows(_local(state["exp_avg_sq"])), rows,
                               values, step_size, beta1, beta2, eps, lr * group["weight_decay"])
                state["step"] = step
                if param is not local:
                    local.copy_(param)
        return loss


def _check_group(group: dict) -> None:
    """A parameter group's hyperparameters, SparseAdam's checks and messages, plus their types: a string
    or a one-element betas failed inside a comparison, a truthy maximize="no" ascended, and eps=inf made
    every step a no-op."""
    is_real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)
    for key in ("lr", "eps", "weight_decay"):
        value = group[key]
        if key == "lr" and isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            continue  # a tensor lr, as torch's Adam takes
        if not is_real(value):
            raise TypeError(f"LazyAdam: {key} must be a float{' or a one-element float tensor' * (key == 'lr')}, "
                            f"got {value!r}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(is_real, betas))):
        raise TypeError(f"LazyAdam: betas must be a pair of floats (beta1, beta2), got {betas!r}")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"LazyAdam: maximize must be a bool, got {group['maximize']!r}")
    # Flags of torch's Adam that a loaded Adam state carries and LazyAdam's update does not do: it ignored amsgrad
    # and applied Adam's L2 decay as AdamW's decoupled one, silently (2e-4 and 4e-2 apart after 3 steps).
    for key in ("amsgrad", "capturable", "differentiable", "fused"):
        if group.get(key):
            raise ValueError(f"LazyAdam: a parameter group has {key}={group[key]!r} (an Adam state loaded?), which "
                             "LazyAdam does not do")
    if group.get("decoupled_weight_decay") is False and group["weight_decay"]:
        raise ValueError("LazyAdam: a parameter group has Adam's L2 weight_decay (decoupled_weight_decay=False, an Adam "
                         "state loaded?); LazyAdam's decay is AdamW's, decoupled: load an AdamW state, or set "
                         "group['decoupled_weight_decay'] = True to take it so")
    lr, eps, weight_decay = float(group["lr"]), group["eps"], group["weight_decay"]
    if not 0.0 <= lr < math.inf:  # NaN would be blamed on the decay
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 < eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"Invalid beta parameters: {betas}")
    if not 0.0 <= weight_decay or not lr * weight_decay <= 1.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (need weight_decay >= 0 and lr * weight_decay "
                         f"<= 1, lr is {lr})")


def _checked_grad(p: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    """``p``'s gradient in the op's form (a sparse one coalesced), once everything the op would refuse
    has been ruled out."""
    grad = p.grad
    if not p.is_floating_point() or grad.dtype != p.dtype or grad.device != p.device:
        raise TypeError(f"LazyAdam: {name} must be floating point and its gradient of its dtype and device, got a "
                        f"{p.dtype} parameter on {p.device} with a {grad.dtype} gradient on {grad.device}")
    if grad.is_sparse and grad.dim() and grad.sparse_dim() != 1:
        raise ValueError(f"LazyAdam: the gradient of {name} is sparse in {grad.sparse_dim()} dimensions; LazyAdam "
                         "updates whole rows (one sparse dimension, as LSHLinear(sparse_grad=True) and "
                         "nn.Embedding(sparse=True) give): use torch.optim.SparseAdam for element-sparse gradients")
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state and (state[key].shape != p.shape or state[key].dtype != p.dtype):
            raise ValueError(f"LazyAdam: the state {key!r} of {name} is {state[key].dtype} {tuple(state[key].shape)}, "
                             f"the parameter {p.dtype} {tuple(p.shape)}: a state loaded from another model, or a "
                             "model cast (.to(dtype), .half()) after the optimizer stepped; opt.load_state_dict("
                             "opt.state_dict()) casts the moments to the parameters' dtype, as for torch.optim.Adam")
    return _coalesced(grad) if grad.is_sparse else grad


def _coalesced(grad: torch.Tensor) -> torch.Tensor:
    """``grad.coalesce()``, without its sort where the rows already ascend strictly, as this
    package's sparse gradients do (autograd drops their coalesced flag when it stores ``.grad``;
    sorting 100,000 sorted rows of 128 took 43 ms, checking them 0.2 ms)."""
    rows = grad._indices()
    if grad.is_coalesced() or rows.shape[0] != 1 or not bool((rows[0, 1:] > rows[0, :-1]).all()):
        return grad.coalesce()
    return torch.sparse_coo_tensor(rows, grad._values(), grad.shape, is_coalesced=True, check_invariants=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (in place updates of it are the DTensor's), any other tensor itself."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor as one row (the op wants rows); others as they are."""
    return t.view(1) if t.dim() == 0 else t


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None) -> torch.Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_` that also takes row-sparse (COO) gradients
    (``LSHLinear(sparse_grad=True)``, ``nn.Embedding(sparse=True)``), which torch's refuses: a sparse
    gradient counts its values (coalesced) and is scaled like a dense one. Returns the total norm of the
    gradients, as one vector. ``max_norm=inf`` measures without scaling (what transformers' Trainer logs).
    ``foreach`` is taken for torch's signature and changes nothing (torch's chooses kernels by it)."""
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None or a bool, got {foreach!r}")
    params = [p for p in ([parameters] if isinstance(parameters, torch.Tensor) else parameters) if p.grad is not None]
    max_norm, norm_type = _checked_norms(max_norm, norm_type)
    device = params[0].grad.device if params else torch.device("cpu")
    part = grad_norm_part(params, norm_type, device, norm_dtype(params))
    total = part if norm_type == math.inf else part.pow(1 / norm_type)
    scale_grads_(params, total, max_norm, norm_type, error_if_nonfinite)
    return total


def _checked_norms(max_norm, norm_type) -> tuple[float, float]:
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not max_norm >= 0:  # 0 zeroes the gradients, as torch's does; a negative one would flip them
        raise ValueError(f"max_norm must be a float >= 0 (inf: measure only), got {max_norm!r}")
    if not norm_type > 0:
        raise ValueError(f"norm_type must be a positive float or inf, got {norm_type!r}")
    return max_norm, norm_type


def norm_dtype(params) -> torch.dtype:
    """The dtype a norm of these parameters' gradients is summed in: float64 where one is float64 (as torch's
    norm of them), else float32 (torch's sums reduced precision in its own)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def grad_norm_part(params, norm_type: float, device, dtype: torch.dtype) -> torch.Tensor:
    """The gradients' sum of ``|g|^p`` (their largest ``|g|`` for ``norm_type=inf``), sparse ones by their
    coalesced values, in ``dtype``: a part of a total norm that parts of other ranks may join."""
    infinite = norm_type == math.inf

    def part_of(values: torch.Tensor) -> torch.Tensor:  # (an empty one's: 0)
        if not values.numel():
            return values.new_zeros(())
        return values.max() if infinite else values.pow(norm_type).sum()

    parts, by_layout = [torch.zeros((), device=device, dtype=dtype)], {}
    for p in params:
        values = (p.grad.coalesce()._values() if p.grad.is_sparse else p.grad).to(dtype).abs()
        if _DTensor is not None and isinstance(values, _DTensor):  # an FSDP2 shard's: its local part, reduced below
            by_layout.setdefault((values.device_mesh, tuple(values.placements)), []).append(part_of(_local(values)))
        else:  # (moved to ``device``: a model may span devices)
            parts.append(part_of(values).to(device))
    # Local parts of FSDP2 shards reduced over the mesh dimensions they are sharded along, once per layout (not per
    # parameter: 282 against torch's 4 ms per call over 200; an empty local shard's part is 0, where a DTensor's max
    # raised on that rank alone and left the others waiting, as torch's clip does).
    for (mesh, placements), local in by_layout.items():
        stacked = torch.stack(local)
        reduced = Partial("max" if infinite else "sum")
        layout = [reduced if isinstance(placement, Shard) else Replicate() for placement in placements]
        part = _DTensor.from_local(stacked.max() if infinite else stacked.sum(), mesh, layout, run_check=False)
        parts.append(part.full_tensor().to(device))
    stacked = torch.stack(parts)
    return stacked.max() if infinite else stacked.sum()


def scale_grads_(params, total: torch.Tensor, max_norm: float, norm_type: float, error_if_nonfinite: bool) -> None:
    """Scale the gradients by ``max_norm / total`` where that is below 1, sparse ones by a new tensor."""
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()}), "
                           "so it cannot be clipped; set error_if_nonfinite=False to scale them anyway")
    if max_norm == math.inf:
        return
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad * scale.to(p.grad.dtype)
        else:  # an FSDP2 shard's gradient scaled through its local part (a DTensor refuses a plain factor)
            _local(p.grad).mul_(scale.to(p.grad.dtype))
