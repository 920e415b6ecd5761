"""Typed wrappers over ``torch.ops.lsh_torch.*``, their fake kernels and autograd.

Schemas are defined once in ``csrc/lsh_torch.cpp``; kernels in ``csrc/cpu`` and ``csrc/cuda``;
slow pure-PyTorch references in ``tests/reference.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library, which registers the ops)

_ops = torch.ops.lsh_torch


def mips_transform(rows: Tensor, query: bool) -> Tensor:
    """Asymmetric transform for maximum inner product search with SimHash.

    ``query=False`` (weight rows): ``[r / M, sqrt(1 - |r / M|^2)]`` with ``M`` the largest row norm;
    ``query=True``: ``[q / |q|, 0]``. Then ``sign(P(w)·h)`` and ``sign(Q(x)·h)`` collide with a
    probability that grows with ``w·x``. ``[n, d] -> [n, d + 1]``.
    """
    return _ops.mips_transform(rows, query)


def hash_codes(projections: Tensor, num_tables: int, bits: int) -> tuple[Tensor, Tensor]:
    """Signed-random-projection codes ``[n, L]`` (int32) and per-bit margins ``[n, L*K]`` (float32)."""
    return _ops.hash_codes(projections, num_tables, bits)


def build_tables(codes: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """CSR hash tables from the codes ``[N, L]`` of all neurons: offsets ``[L, 2^K + 1]``, items ``[L, N]``."""
    return _ops.build_tables(codes, bits)


def query(codes: Tensor, margins: Tensor, offsets: Tensor, items: Tensor, probes: int, budget: int,
          labels: Optional[Tensor] = None, seed: int = 0) -> Tensor:
    """Multi-probe lookup: ``active [B, budget]`` int64, labels first, no duplicates per row."""
    return _ops.query(codes, margins, offsets, items, probes, budget, labels, seed)


def sparse_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], active: Tensor,
                  sparse_grad: bool = False) -> Tensor:
    """``out[b, a] = weight[active[b, a]] · x[b] + bias[active[b, a]]``, differentiable.

    With ``sparse_grad=True`` the weight (and bias) gradients are sparse COO tensors holding the
    touched rows only, like ``nn.Embedding(sparse=True)``; otherwise they are dense.
    """
    if sparse_grad and torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _SparseGradLinear.apply(x, weight, bias, active)
    return _ops.sparse_linear(x, weight, bias, active)


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, so torch.compile and torch.export can trace the ops.

@torch.library.register_fake("lsh_torch::mips_transform")
def _(rows, query):
    torch._check(rows.dim() == 2, lambda: "mips_transform: rows must be 2-D")
    return rows.new_empty(rows.shape[0], rows.shape[1] + 1)


@torch.library.register_fake("lsh_torch::hash_codes")
def _(projections, num_tables, bits):
    n = projections.shape[0]
    return (projections.new_empty(n, num_tables, dtype=torch.int32),
            projections.new_empty(n, num_tables * bits, dtype=torch.float32))


@torch.library.register_fake("lsh_torch::build_tables")
def _(codes, bits):
    return codes.new_empty(codes.shape[1], 2 ** bits + 1), codes.new_empty(codes.shape[1], codes.shape[0])


@torch.library.register_fake("lsh_torch::query")
def _(codes, margins, offsets, items, probes, budget, labels, seed):
    return codes.new_empty(codes.shape[0], budget, dtype=torch.int64)


@torch.library.register_fake("lsh_torch::sparse_linear")
def _(x, weight, bias, active):
    torch._check(x.shape[1] == weight.shape[1], lambda: "sparse_linear: feature sizes differ")
    return x.new_empty(active.shape)


@torch.library.register_fake("lsh_torch::sparse_linear_grad_input")
def _(grad_out, weight, active):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


@torch.library.register_fake("lsh_torch::sparse_linear_grad_weight_rows")
def _(grad_out, x, active):
    touched = torch.library.get_ctx().new_dynamic_size()
    return active.new_empty(touched), x.new_empty(touched, x.shape[1]), x.new_empty(touched)


@torch.library.register_fake("lsh_torch::sparse_linear_grad_weight")
def _(grad_out, x, active, num_rows):
    return x.new_empty(num_rows, x.shape[1]), x.new_empty(num_rows)


# ---------------------------------------------------------------------------------------------
# Autograd of sparse_linear. The dense path is registered on the op; the row-sparse path is an
# autograd.Function over the same op (a sparse gradient is a wrapper-level choice, not the op's).

def _setup_context(ctx, inputs, output):
    x, weight, bias, active = inputs
    ctx.save_for_backward(x, weight, active)
    ctx.has_bias = bias is not None


def _grads(ctx, grad_out: Tensor, sparse: bool):
    x, weight, active = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.sparse_linear_grad_input(grad_out, weight, active)
    need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    if sparse and (need_w or need_b):
        rows, gw, gb = _ops.sparse_linear_grad_weight_rows(grad_out, x, active)
        index = rows.unsqueeze(0)
        if need_w:
            grad_w = torch.sparse_coo_tensor(index, gw, weight.shape, is_coalesced=True, check_invariants=False)
        if need_b:
            grad_b = torch.sparse_coo_tensor(index, gb, (weight.shape[0],), is_coalesced=True, check_invariants=False)
    elif need_w or need_b:
        gw, gb = _ops.sparse_linear_grad_weight(grad_out, x, active, weight.shape[0])
        grad_w = gw if need_w else None
        grad_b = gb if need_b else None
    return grad_x, grad_w, grad_b, None


torch.library.register_autograd("lsh_torch::sparse_linear", lambda ctx, g: _grads(ctx, g, sparse=False),
                                setup_context=_setup_context)


class _SparseGradLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, active):
        return _ops.sparse_linear(x, weight, bias, active)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, sparse=True)
