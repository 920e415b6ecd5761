"""Typed wrappers over ``torch.ops.lsh_torch.*``, their fake kernels and autograd.

Schemas are defined once in ``csrc/lsh_torch.cpp``; kernels in ``csrc/cpu`` and ``csrc/cuda``;
slow pure-PyTorch references in ``tests/reference.py``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _C  # noqa: F401  (loads the library, which registers the ops)
from ._checks import MAX_BITS, MAX_PROBES, MAX_TABLES, MAX_TRIES, refuse

_ops = torch.ops.lsh_torch
_INT32_MAX = 2 ** 31 - 1  # the kernels' int32 ids (csrc/op_checks.h)


def mips_transform(rows: Tensor, query: bool, max_norm: Optional[Tensor] = None) -> Tensor:
    """Asymmetric transform for maximum inner product search with SimHash.

    ``query=False`` (weight rows): ``[r / M, sqrt(1 - |r / M|^2)]`` with ``M`` the largest row norm,
    or ``max_norm`` (a one-element tensor) if given, then no row's norm may exceed it;
    ``query=True``: ``[q / |q|, 0]``.
    Then ``sign(P(w)·h)`` and ``sign(Q(x)·h)`` collide with a probability that grows with ``w·x``.
    ``[n, d] -> [n, d + 1]``.
    """
    _flag("mips_transform", query=query)
    return _ops.mips_transform(rows, query, max_norm)


def hash_codes(projections: Tensor, num_tables: int, bits: int, margins: bool = True) -> tuple[Tensor, Tensor]:
    """Signed-random-projection codes ``[n, L]`` (int32) and per-bit margins ``[n, L*K]`` (float32),
    which order a query's probes; ``margins=False`` (weight rows) leaves them out: ``[n, 0]``."""
    _ints("hash_codes", num_tables=num_tables, bits=bits)
    _flag("hash_codes", margins=margins)
    return _ops.hash_codes(projections, num_tables, bits, margins)


def dwta_codes(rows: Tensor, bins: Tensor, num_tables: int) -> tuple[Tensor, Tensor]:
    """Densified winner-take-all codes ``[n, L]`` (int32) and per-bit margins ``[n, L*K]`` (float32).

    ``bins [L*H, bin_size]`` int64 holds dimension indices of ``rows [n, d]`` (``bin_size`` a power
    of two); ``K = H * log2(bin_size)``. Hash ``g`` is the position of the largest of
    ``rows[:, bins[g]]`` (lowest position among ties), table ``l``'s code its ``H`` hashes
    concatenated (hash ``h`` in bits ``h*b .. h*b+b-1``). An all-zero bin borrows the hash of
    another bin of the row in a fixed pseudo-random order (densification); an all-zero row gets
    code 0. The margin of bit ``k`` of a hash with winner ``a`` is ``x[a] - x[a ^ 2^k]`` (>= 0),
    what that bit's flip costs, so :func:`query`'s multi-probe flips the cheapest bits first.
    Integer outputs: no gradient flows through the codes.
    """
    _ints("dwta_codes", num_tables=num_tables)
    return _ops.dwta_codes(rows, bins, num_tables)


def row_fingerprints(rows: Tensor, vector: Tensor) -> Tensor:
    """``rows [n, d] @ vector [d]`` as float32 ``[n]``: tells which rows changed since a table build."""
    return _ops.row_fingerprints(rows, vector)


def build_tables(codes: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """CSR hash tables from the codes ``[N, L]`` of all neurons: offsets ``[L, 2^K + 1]``, items ``[L, N]``."""
    _ints("build_tables", bits=bits)
    return _ops.build_tables(codes, bits)


def update_tables(offsets: Tensor, items: Tensor, rows: Tensor, old_codes: Tensor,
                  new_codes: Tensor) -> tuple[Tensor, Tensor]:
    """The tables ``(offsets, items)`` with ``rows`` ``[R]`` (int64, strictly increasing) moved from
    the buckets of ``old_codes`` ``[R, L]`` to those of ``new_codes``, every other entry in place:
    :func:`build_tables` of the updated codes, without re-sorting the rows that did not move.
    A row that is not in its old bucket raises (the tables do not match ``old_codes``); one whose old and
    new codes agree in a table stays where it is there (the CPU kernel does not look for it)."""
    return _ops.update_tables(offsets, items, rows, old_codes, new_codes)


def query(codes: Tensor, margins: Tensor, offsets: Tensor, items: Tensor, probes: int, budget: int,
          labels: Optional[Tensor] = None, seed: int = 0, tail: int = 0,
          row_keys: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Multi-probe lookup: ``active [B, budget]`` int64, no duplicates per row, and ``head [B]`` int64.

    Row ``b`` holds its labels, then at most ``budget - labels - tail`` LSH candidates (most
    probed-bucket hits first): its first ``head[b]`` entries; then the tail, seeded uniform draws
    without replacement from the ``N - head[b]`` other neurons (see :func:`tail_log_weights`).
    The tables are as :func:`build_tables` and :func:`update_tables` give them: each bucket's ids
    ascend (checked as the probes read them).

    The random choices of row ``b`` (ties among equally hit candidates, the draws) follow ``seed``
    and its index ``b``, or ``row_keys[b]`` (int64 ``[B]``) if given: then a row's set does not
    depend on where it sits in the batch (:func:`lsh_torch.hashing.row_keys` keys rows by their codes).
    """
    _ints("query", probes=probes, budget=budget, seed=seed, tail=tail)
    return _ops.query(codes, margins, offsets, items, probes, budget, labels, seed, tail, row_keys)


def query_shared(codes: Tensor, margins: Tensor, offsets: Tensor, items: Tensor, probes: int, budget: int,
                 labels: Optional[Tensor] = None, seed: int = 0, tail: int = 0) -> tuple[Tensor, Tensor]:
    """One active set for the whole batch: ``indices [budget]`` int64 (all rows' labels, then
    candidates, then the uniform tail) and ``head []`` int64, as for :func:`query`."""
    _ints("query_shared", probes=probes, budget=budget, seed=seed, tail=tail)
    return _ops.query_shared(codes, margins, offsets, items, probes, budget, labels, seed, tail)


def tail_log_weights(head: Tensor, budget: int, n: int) -> Tensor:
    """Log importance weights of an active set from :func:`query` / :func:`query_shared`:
    ``[*head.shape, budget]`` float32, 0 for the first ``head`` entries and
    ``log((n - head) / (budget - head))`` for the tail, a uniform sample of ``budget - head`` of the
    ``n - head`` other neurons. Adding them to the logits makes the sampled softmax's normaliser an
    unbiased estimate of the full one (docs/estimator.md)."""
    _ints("tail_log_weights", budget=budget, n=n)
    if budget < 0 or budget > n:  # (torch._check's message closure is a graph break under dynamo)
        raise ValueError(f"tail_log_weights: budget must be in [0, n = {n}], got {budget}")
    if not isinstance(head, Tensor) or head.dtype.is_floating_point or head.dtype.is_complex or head.dtype == torch.bool:
        given = head.dtype if isinstance(head, Tensor) else type(head).__name__
        raise TypeError(f"tail_log_weights: head must be an integer tensor (query's head), got {given}")
    # (The budget only in the eager message: formatted in a traced one, a symbolic width would be specialised.)
    refuse((head < 0) | (head > budget), "tail_log_weights: head must be in [0, budget]",
           lambda bad: f" = [0, {budget}], got {head[bad].flatten()[0].item()}")
    head = head.unsqueeze(-1).float()
    tail = torch.arange(budget, device=head.device) >= head
    return torch.where(tail, torch.log((n - head) / (budget - head).clamp_min(1)), 0.0)


def sparse_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], active: Tensor,
                  sparse_grad: bool = False) -> Tensor:
    """``out[b, a] = weight[active[b, a]] · x[b] + bias[active[b, a]]``, differentiable.

    With ``sparse_grad=True`` the weight (and bias) gradients are sparse COO tensors holding the
    touched rows only, like ``nn.Embedding(sparse=True)``; otherwise they are dense.
    """
    return _linear("sparse_linear", x, weight, bias, active, sparse_grad)


def row_topk(scores: Tensor, k: int) -> Tensor:
    """Each row's ``k`` highest scores: indices ``[B, k]`` (int64) into ``scores`` ``[B, U]``, ordered as
    ``scores.sort(dim=1, descending=True, stable=True)`` orders them (every NaN first, ties by the lower
    column). ``scores.topk(k, dim=1).indices`` up to ties (which of them, and their order), several times
    faster on CPU where ``k`` is a small part of ``U`` (on CUDA a full stable sort: no faster). Integer output:
    no gradient."""
    _ints("row_topk", k=k)
    return _ops.row_topk(scores, k)


def proposal_draw(active: Tensor, head: Tensor, cdf: Tensor, guide: Tensor, tries: int, seed: int) -> Tensor:
    """``active [R, A]`` (int64) with the tail of each row (its entries from column ``head[r]`` on) replaced by
    draws from a proposal: neuron ``j`` with probability ``(cdf[j] - cdf[j-1]) / cdf[-1]`` (``cdf [N]`` float64,
    cumulative weights), drawn again while it lands in its row's head (its first ``head[r]`` entries), at most
    ``tries`` times. ``guide [G]`` (int32): the neuron at each of ``G`` evenly spaced points of ``[0, cdf[-1]]``,
    where a draw's search begins (checked against ``cdf``: any guide gives the same draws, a good one fast ones).
    Seeded by ``seed``; counter-based, so the draws depend neither on threads nor on the device. Integer output:
    no gradient."""
    _ints("proposal_draw", tries=tries, seed=seed)
    return _ops.proposal_draw(active, head, cdf, guide, tries, seed)


def proposal_log_weights(active: Tensor, head: Tensor, cdf: Tensor, tries: int) -> Tensor:
    """Log-weights ``[R, A]`` (float32) of a set from :func:`proposal_draw`: 0 in the head; for a tail entry of
    neuron ``j`` outside its row's head, one over its expected count, ``-log(t q_j (1 - Q^tries) / (1 - Q))``
    (``t = A - head[r]``, ``q_j`` its draw probability, ``Q`` the proposal's mass on the row's distinct head
    entries); ``-inf`` for one left on the head. Adding them to the logits makes the sampled softmax's normaliser
    unbiased (docs/estimator.md, "A tail drawn from the label frequencies"). No gradient."""
    _ints("proposal_log_weights", tries=tries)
    return _ops.proposal_log_weights(active, head, cdf, tries)


def shared_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Tensor,
                  sparse_grad: bool = False) -> Tensor:
    """``out[b, a] = weight[indices[a]] · x[b] + bias[indices[a]]`` (one gathered GEMM), differentiable.

    ``sparse_grad`` as for :func:`sparse_linear`.
    """
    return _linear("shared_linear", x, weight, bias, indices, sparse_grad)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], sparse_grad: bool = False) -> Tensor:
    """``F.linear``, every output; with ``sparse_grad`` the weight's and bias's gradients are
    coalesced COO tensors of every row (what a dense gradient is, in the sparse optimizers' form),
    made without a copy: :meth:`LSHLinear.forward_sparse <lsh_torch.nn.LSHLinear.forward_sparse>`
    where every output is active."""
    _flag("linear", sparse_grad=sparse_grad)
    if sparse_grad and torch.is_grad_enabled():
        weight, bias = (_EveryRowSparseGrad.apply(p) if p is not None and p.requires_grad else p for p in (weight, bias))
    return F.linear(x, weight, bias)


def lazy_adam_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grad_rows: Tensor,
               step_size: float, beta1: float, beta2: float, eps: float, decay: float = 0.0) -> None:
    """In-place Adam update of ``param``'s (unique) ``rows`` and their moments; see :class:`lsh_torch.optim.LazyAdam`.
    ``decay`` (``lr * weight_decay``, in [0, 1]) scales those rows by ``1 - decay`` first, as AdamW does.

    Bumps the version counters of the three updated tensors, as PyTorch's in-place ops do (the op's
    ADInplaceOrView kernel, csrc/lsh_torch.cpp): autograd then refuses a backward through values the
    step changed, and caches keyed on a parameter's version (``LSHLinear.topk``'s index) see the step."""
    _ops.lazy_adam_(param, exp_avg, exp_avg_sq, rows, grad_rows, step_size, beta1, beta2, eps, decay)


def _linear(name, x, weight, bias, active, sparse_grad):
    _flag(name, sparse_grad=sparse_grad)
    if sparse_grad and torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _SparseGrad.apply(name, x, weight, bias, active)
    return getattr(_ops, name)(x, weight, bias, active)


def _flag(op: str, **values) -> None:
    """Flags must be bools: the schema takes 0 or "no" as well, and "no" is true."""
    for name, value in values.items():
        if not isinstance(value, (bool, torch.SymBool)):
            raise TypeError(f"{op}: {name} must be a bool, got {value!r}")


def _ints(op: str, **values) -> None:
    """Counts must be ints: the schema takes True as 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{op}: {name} must be an int, got {value!r}")
        if isinstance(value, numbers.Integral) and not -2 ** 63 <= value < 2 ** 63:  # the schema's int is int64
            raise ValueError(f"{op}: {name} must fit in int64, [-2^63, 2^63), got {value}")


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, so torch.compile and torch.export can trace the ops.
# They also serve inputs on the meta device, so each checks that its inputs share one device: a
# meta tensor among CPU ones would otherwise get shape-only outputs (uninitialised memory).

def _one_device(op: str, **tensors) -> None:
    given = {name: t.device for name, t in tensors.items() if t is not None}
    devices = set(given.values())
    torch._check(len(devices) <= 1, lambda: f"{op}: all tensors must be on one device, got "
                 + ", ".join(f"{name} on {device}" for name, device in given.items()))


def _expect(op: str, name: str, t: Tensor, dtype=None, dim: Optional[int] = None) -> None:
    """The kernels' dtype and rank checks (csrc/op_checks.h), so that a traced or meta call raises
    where a real one would. ``dtype``: a torch.dtype, or "floating"."""
    if dtype == "floating":
        torch._check(t.dtype.is_floating_point, lambda: f"{op}: {name} must be floating, got {t.dtype}")
    elif dtype is not None:
        torch._check(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}")
    if dim is not None:
        torch._check(t.dim() == dim, lambda: f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _expect_tables(op: str, num_tables: int, bits: int) -> None:
    torch._check(1 <= bits <= MAX_BITS, lambda: f"{op}: bits (K) must be in [1, {MAX_BITS}], got {bits}")
    torch._check(1 <= num_tables <= MAX_TABLES,
                 lambda: f"{op}: num_tables (L) must be in [1, {MAX_TABLES}], got {num_tables}")


def _expect_linear(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    _expect(op, "x", x, "floating", 2)
    _expect(op, "weight", weight, x.dtype, 2)
    torch._check(x.shape[1] == weight.shape[1],
                 lambda: f"{op}: x has {x.shape[1]} features but weight expects {weight.shape[1]}")
    if bias is not None:
        _expect(op, "bias", bias, x.dtype, 1)
        torch._check(bias.shape[0] == weight.shape[0], lambda: f"{op}: bias must be [{weight.shape[0]}]")


def _expect_query(op, codes, margins, offsets, items, probes, budget, labels, tail) -> None:
    for name, t in (("codes", codes), ("offsets", offsets), ("items", items)):
        _expect(op, name, t, torch.int32, 2)
    _expect(op, "margins", margins, torch.float32, 2)
    buckets, num_tables, n = offsets.shape[1] - 1, codes.shape[1], items.shape[1]
    torch._check(offsets.shape[0] == num_tables and items.shape[0] == num_tables,
                 lambda: f"{op}: codes, offsets and items must agree on the number of tables L")
    torch._check(margins.shape[0] == codes.shape[0], lambda: f"{op}: margins must be float32 [B, L*K]")
    torch._check(num_tables <= MAX_TABLES, lambda: f"{op}: num_tables (L) must be at most {MAX_TABLES}")
    torch._check(n < _INT32_MAX, lambda: f"{op}: too many neurons (N = {n})")
    if _expect_buckets(op, offsets):  # K follows from the tables' shape
        torch._check(margins.shape[1] == num_tables * (buckets.bit_length() - 1),
                     lambda: f"{op}: margins must be float32 [B, L*K]")
        torch._check(1 <= probes <= min(MAX_PROBES, buckets),
                     lambda: f"{op}: probes must be in [1, min({MAX_PROBES}, 2^K = {buckets})], got {probes}")
    torch._check(budget >= 0, lambda: f"{op}: budget must be in [0, N], got {budget}")
    torch._check(budget <= n, lambda: f"{op}: budget must be in [0, N = {n}], got {budget}")
    torch._check(0 <= tail <= budget, lambda: f"{op}: tail must be in [0, budget = {budget}], got {tail}")
    if labels is not None:
        _expect(op, "labels", labels, torch.int64, 2)
        torch._check(labels.shape[0] == codes.shape[0], lambda: f"{op}: labels must be int64 [B, M]")
        torch._check(labels.numel() < _INT32_MAX, lambda: f"{op}: too many labels")


def _expect_buckets(op: str, offsets: Tensor) -> bool:
    """offsets' 2^K + 1 columns, where the tables' shape is static (in practice); whether it is."""
    buckets = offsets.shape[1] - 1
    if isinstance(buckets, int):
        torch._check(2 <= buckets <= 2 ** MAX_BITS and buckets & (buckets - 1) == 0,
                     lambda: f"{op}: offsets must have 2^K + 1 columns with 1 <= K <= {MAX_BITS}")
    return isinstance(buckets, int)


def _expect_active(op: str, active: Tensor, batch, width=None) -> None:
    _expect(op, "active", active, torch.int64, 2)
    torch._check(active.shape[0] == batch, lambda: f"{op}: active has {active.shape[0]} rows but the batch has {batch}")
    if width is not None:
        torch._check(active.shape[1] == width, lambda: f"{op}: grad_out must be [B, A] like active")


def _expect_grad_weight(op: str, grad_out: Tensor, x: Tensor, active: Tensor) -> None:
    _expect(op, "x", x, "floating", 2)
    _expect(op, "grad_out", grad_out, x.dtype, 2)
    torch._check(grad_out.shape[0] == x.shape[0], lambda: f"{op}: grad_out and x must have the same batch size")
    _expect_active(op, active, x.shape[0], grad_out.shape[1])


@torch.library.register_fake("lsh_torch::mips_transform")
def _(rows, query, max_norm=None):
    _one_device("mips_transform", rows=rows, max_norm=max_norm)
    _expect("mips_transform", "rows", rows, "floating", 2)
    if max_norm is not None:
        torch._check(not query, lambda: "mips_transform: max_norm applies to data rows (query=False) only")
        torch._check(max_norm.numel() == 1 and max_norm.dtype.is_floating_point,
                     lambda: "mips_transform: max_norm must be a floating tensor of one element")
    return rows.new_empty(rows.shape[0], rows.shape[1] + 1)


@torch.library.register_fake("lsh_torch::hash_codes")
def _(projections, num_tables, bits, margins=True):
    _expect("hash_codes", "projections", projections, "floating", 2)
    _expect_tables("hash_codes", num_tables, bits)
    torch._check(projections.shape[1] == num_tables * bits,
                 lambda: f"hash_codes: projections must have L*K = {num_tables * bits} columns")
    n = projections.shape[0]
    return (projections.new_empty(n, num_tables, dtype=torch.int32),
            projections.new_empty(n, num_tables * bits if margins else 0, dtype=torch.float32))


@torch.library.register_fake("lsh_torch::dwta_codes")
def _(rows, bins, num_tables):
    _one_device("dwta_codes", rows=rows, bins=bins)
    torch._check(rows.dim() == 2 and rows.dtype.is_floating_point, lambda: "dwta_codes: rows must be a floating [n, d] tensor")
    torch._check(bins.dim() == 2 and bins.dtype == torch.int64, lambda: "dwta_codes: bins must be int64 [L*H, bin_size]")
    bin_size = int(bins.shape[1])
    torch._check(bin_size >= 2 and bin_size & (bin_size - 1) == 0,
                 lambda: f"dwta_codes: bins must have a power-of-two bin_size >= 2 columns, got {bin_size}")
    torch._check(1 <= num_tables <= MAX_TABLES,
                 lambda: f"dwta_codes: num_tables (L) must be in [1, {MAX_TABLES}], got {num_tables}")
    torch._check(bins.shape[0] % num_tables == 0 and bins.shape[0] > 0,
                 lambda: f"dwta_codes: bins must have L*H rows, a multiple of num_tables = {num_tables}")
    torch._check(bins.shape[0] // num_tables * (bin_size.bit_length() - 1) <= MAX_BITS,
                 lambda: f"dwta_codes: bins give K = H * log2(bin_size) bits per table; at most {MAX_BITS} fit a code")
    torch._check(rows.shape[1] >= 1, lambda: "dwta_codes: rows must have at least one column (d >= 1)")
    n = rows.shape[0]
    return (rows.new_empty(n, num_tables, dtype=torch.int32),
            rows.new_empty(n, bins.shape[0] * (bin_size.bit_length() - 1), dtype=torch.float32))


@torch.library.register_fake("lsh_torch::row_fingerprints")
def _(rows, vector):
    _one_device("row_fingerprints", rows=rows, vector=vector)
    _expect("row_fingerprints", "rows", rows, "floating", 2)
    _expect("row_fingerprints", "vector", vector, torch.float32, 1)
    torch._check(vector.shape[0] == rows.shape[1], lambda: f"row_fingerprints: vector must be [d = {rows.shape[1]}]")
    return rows.new_empty(rows.shape[0], dtype=torch.float32)


@torch.library.register_fake("lsh_torch::build_tables")
def _(codes, bits):
    _expect("build_tables", "codes", codes, torch.int32, 2)
    _expect_tables("build_tables", codes.shape[1], bits)
    torch._check(codes.shape[0] < _INT32_MAX, lambda: "build_tables: too many rows")
    return codes.new_empty(codes.shape[1], 2 ** bits + 1), codes.new_empty(codes.shape[1], codes.shape[0])


@torch.library.register_fake("lsh_torch::update_tables")
def _(offsets, items, rows, old_codes, new_codes):
    op = "update_tables"
    _one_device(op, offsets=offsets, items=items, rows=rows, old_codes=old_codes, new_codes=new_codes)
    for name, t in (("offsets", offsets), ("items", items), ("old_codes", old_codes), ("new_codes", new_codes)):
        _expect(op, name, t, torch.int32, 2)
    _expect(op, "rows", rows, torch.int64, 1)
    torch._check(items.shape[0] == offsets.shape[0], lambda: f"{op}: items must have one row per table")
    _expect_buckets(op, offsets)
    torch._check(offsets.shape[0] <= MAX_TABLES, lambda: f"{op}: num_tables (L) must be at most {MAX_TABLES}")
    torch._check(items.shape[1] < _INT32_MAX, lambda: f"{op}: too many items")
    torch._check(rows.shape[0] <= items.shape[1], lambda: f"{op}: more rows than items per table (N)")
    for name, t in (("old_codes", old_codes), ("new_codes", new_codes)):
        torch._check(t.shape[0] == rows.shape[0] and t.shape[1] == offsets.shape[0],
                     lambda: f"{op}: {name} must be int32 [R, L] = [{rows.shape[0]}, {offsets.shape[0]}]")
    return offsets.new_empty(offsets.shape), items.new_empty(items.shape)


@torch.library.register_fake("lsh_torch::query")
def _(codes, margins, offsets, items, probes, budget, labels, seed, tail=0, row_keys=None):
    _one_device("query", codes=codes, margins=margins, offsets=offsets, items=items, labels=labels, row_keys=row_keys)
    _expect_query("query", codes, margins, offsets, items, probes, budget, labels, tail)
    if row_keys is not None:
        _expect("query", "row_keys", row_keys, torch.int64, 1)
        torch._check(row_keys.shape[0] == codes.shape[0], lambda: "query: row_keys must be int64 [B]")
    return (codes.new_empty(codes.shape[0], budget, dtype=torch.int64),
            codes.new_empty(codes.shape[0], dtype=torch.int64))


@torch.library.register_fake("lsh_torch::query_shared")
def _(codes, margins, offsets, items, probes, budget, labels, seed, tail=0):
    _one_device("query_shared", codes=codes, margins=margins, offsets=offsets, items=items, labels=labels)
    _expect_query("query_shared", codes, margins, offsets, items, probes, budget, labels, tail)
    return codes.new_empty(budget, dtype=torch.int64), codes.new_empty((), dtype=torch.int64)


@torch.library.register_fake("lsh_torch::row_topk")
def _(scores, k):
    _expect("row_topk", "scores", scores, "floating", 2)
    torch._check(0 <= k <= scores.shape[1], lambda: f"row_topk: k must be in [0, U = {scores.shape[1]}], got {k}")
    return scores.new_empty(scores.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("lsh_torch::proposal_draw")
def _(active, head, cdf, guide, tries, seed):
    _expect_proposal("proposal_draw", active, head, cdf, tries, guide)
    return active.new_empty(active.shape)  # (the kernels' output is contiguous whatever active's strides)


@torch.library.register_fake("lsh_torch::proposal_log_weights")
def _(active, head, cdf, tries):
    _expect_proposal("proposal_log_weights", active, head, cdf, tries)
    return active.new_empty(active.shape, dtype=torch.float32)


def _expect_proposal(op: str, active: Tensor, head: Tensor, cdf: Tensor, tries: int, guide=None) -> None:
    _one_device(op, active=active, head=head, cdf=cdf, guide=guide)
    _expect(op, "active", active, torch.int64, 2)
    _expect(op, "head", head, torch.int64, 1)
    torch._check(head.shape[0] == active.shape[0],
                 lambda: f"{op}: head must be [R] with R = {active.shape[0]} (active's rows), got {tuple(head.shape)}")
    _expect(op, "cdf", cdf, torch.float64, 1)
    torch._check(cdf.shape[0] >= 1, lambda: f"{op}: cdf must be [N] with N >= 1, got {tuple(cdf.shape)}")
    if guide is not None:
        _expect(op, "guide", guide, torch.int32, 1)
        torch._check(guide.shape[0] >= 1, lambda: f"{op}: guide must be [G] with G >= 1, got {tuple(guide.shape)}")
    torch._check(1 <= tries <= MAX_TRIES, lambda: f"{op}: tries must be in [1, {MAX_TRIES}], got {tries}")


@torch.library.register_fake("lsh_torch::shared_linear")
def _(x, weight, bias, indices):
    _one_device("shared_linear", x=x, weight=weight, bias=bias, indices=indices)
    _expect_linear("shared_linear", x, weight, bias)
    _expect("shared_linear", "indices", indices, torch.int64, 1)
    return x.new_empty(x.shape[0], indices.shape[0])


@torch.library.register_fake("lsh_torch::lazy_adam_")
def _(param, exp_avg, exp_avg_sq, rows, grad_rows, step_size, beta1, beta2, eps, decay=0.0):
    op = "lazy_adam_"
    _one_device(op, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, rows=rows, grad_rows=grad_rows)
    _expect(op, "param", param, "floating")
    torch._check(param.dim() >= 1, lambda: f"{op}: param must have at least one dimension (its rows)")
    torch._check(param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous(),
                 lambda: f"{op}: param, exp_avg and exp_avg_sq must be contiguous")
    torch._check(not (param is exp_avg or param is exp_avg_sq or exp_avg is exp_avg_sq),
                 lambda: f"{op}: param, exp_avg and exp_avg_sq must not share memory")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _expect(op, name, t, param.dtype, param.dim())
        torch._check(t.shape == param.shape, lambda: f"{op}: {name} must have param's shape {tuple(param.shape)}")
    _expect(op, "rows", rows, torch.int64, 1)
    _expect(op, "grad_rows", grad_rows, param.dtype, param.dim())
    torch._check(grad_rows.shape[0] == rows.shape[0] and grad_rows.shape[1:] == param.shape[1:],
                 lambda: f"{op}: grad_rows must be [U, *param.shape[1:]]")
    torch._check(0 <= beta1 < 1 and 0 <= beta2 < 1 and eps >= 0 and math.isfinite(step_size) and 0 <= decay <= 1,
                 lambda: f"{op}: need beta1, beta2 in [0, 1), eps >= 0, a finite step_size and decay in [0, 1]")


@torch.library.register_fake("lsh_torch::sparse_linear")
def _(x, weight, bias, active):
    _one_device("sparse_linear", x=x, weight=weight, bias=bias, active=active)
    _expect_linear("sparse_linear", x, weight, bias)
    _expect_active("sparse_linear", active, x.shape[0])
    return x.new_empty(active.shape)


@torch.library.register_fake("lsh_torch::sparse_linear_grad_input")
def _(grad_out, weight, active):
    op = "sparse_linear_grad_input"
    _one_device(op, grad_out=grad_out, weight=weight, active=active)
    _expect(op, "weight", weight, "floating", 2)
    _expect(op, "grad_out", grad_out, weight.dtype, 2)
    _expect_active(op, active, grad_out.shape[0], grad_out.shape[1])
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


@torch.library.register_fake("lsh_torch::sparse_linear_grad_weight_rows")
def _(grad_out, x, active):
    _one_device("sparse_linear_grad_weight_rows", grad_out=grad_out, x=x, active=active)
    _expect_grad_weight("sparse_linear_grad_weight_rows", grad_out, x, active)
    touched = torch.library.get_ctx().new_dynamic_size()
    return active.new_empty(touched), x.new_empty(touched, x.shape[1]), x.new_empty(touched)


@torch.library.register_fake("lsh_torch::sparse_linear_grad_weight")
def _(grad_out, x, active, num_rows):
    _one_device("sparse_linear_grad_weight", grad_out=grad_out, x=x, active=active)
    _expect_grad_weight("sparse_linear_grad_weight", grad_out, x, active)
    torch._check(0 <= num_rows <= 2 ** 31 - 1, lambda: f"sparse_linear_grad_weight: num_rows must be in [0, 2^31 - 1], "
                 f"got {num_rows}")
    return x.new_empty(num_rows, x.shape[1]), x.new_empty(num_rows)


# ---------------------------------------------------------------------------------------------
# Autograd of the two linear ops. Dense gradients are registered on the ops; row-sparse (COO)
# gradients go through _SparseGrad, an autograd.Function over the same ops, since a sparse
# gradient is the caller's choice, not the op's. Inputs are always (..., x, weight, bias, active).

def _setup_context(ctx, inputs, output):
    x, weight, bias, active = inputs[-4:]
    ctx.save_for_backward(x, weight, active)
    ctx.has_bias = bias is not None


def _needs(ctx):
    need_x, need_w, need_b = ctx.needs_input_grad[-4:-1]
    return need_x, need_w, need_b and ctx.has_bias


def _refuse_batched(grad_out: Tensor, what: str) -> None:
    """Batched gradients (vmap over backward) through a path whose weight gradient vmap cannot build."""
    functorch = torch._C._functorch
    if functorch.is_legacy_batchedtensor(grad_out) or functorch.is_functorch_wrapped_tensor(grad_out):
        raise RuntimeError(f"{what}: batched gradients (torch.autograd.grad(is_grads_batched=True), "
                           "torch.autograd.functional.jacobian(vectorize=True)) are not supported: the weight's "
                           "gradient is built in place over its rows. Loop over the vectors instead (vectorize=False), "
                           "or use mode='per_row' with dense gradients, which supports them.")


def _row_grads(rows, grad_rows, grad_bias_rows, weight, need_w, need_b, sparse, coalesced):
    """Gradients of the weight and bias from those of their rows ``rows``. ``coalesced``: the rows
    are sorted and unique (sparse_linear_grad_weight_rows), so the COO tensors may say so; otherwise
    (shared_linear's indices, unordered and possibly repeated) repeated rows are summed."""
    if sparse:
        index = rows.unsqueeze(0)
        coo = lambda values, shape: torch.sparse_coo_tensor(index, values, shape, is_coalesced=coalesced,
                                                            check_invariants=False)
        return (coo(grad_rows, weight.shape) if need_w else None,
                coo(grad_bias_rows, weight.shape[:1]) if need_b else None)
    return (weight.new_zeros(weight.shape).index_add_(0, rows, grad_rows) if need_w else None,
            weight.new_zeros(weight.shape[:1]).index_add_(0, rows, grad_bias_rows) if need_b else None)


def _sparse_linear_grads(ctx, grad_out, sparse):
    x, weight, active = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    need_x, need_w, need_b = _needs(ctx)
    if sparse and torch.is_grad_enabled():
        # create_graph=True (a gradient penalty): the same gradients from differentiable ops, on the touched
        # rows alone (active renumbered into them), gathered with a sparse gradient: second-order weight
        # gradients stay row-sparse too.
        rows, position = torch.unique(active, return_inverse=True)
        grad_x = _ops.sparse_linear_grad_input(grad_out, F.embedding(rows, weight, sparse=True), position) \
            if need_x else None
        grad_w = grad_b = None
        if need_w or need_b:
            grad_w, grad_b = _row_grads(rows, *_ops.sparse_linear_grad_weight(grad_out, x, position, rows.shape[0]),
                                        weight, need_w, need_b, sparse=True, coalesced=True)
        return grad_x, grad_w, grad_b, None
    grad_x = _ops.sparse_linear_grad_input(grad_out, weight, active) if need_x else None
    grad_w = grad_b = None
    if sparse and (need_w or need_b):
        grad_w, grad_b = _row_grads(*_ops.sparse_linear_grad_weight_rows(grad_out, x, active), weight, need_w, need_b,
                                    sparse=True, coalesced=True)
    elif need_w or need_b:
        grad_w, grad_b = _ops.sparse_linear_grad_weight(grad_out, x, active, weight.shape[0])
        grad_w, grad_b = (grad_w if need_w else None), (grad_b if need_b else None)
    return grad_x, grad_w, grad_b, None


def _shared_linear_grads(ctx, grad_out, sparse):
    x, weight, indices = ctx.saved_tensors
    need_x, need_w, need_b = _needs(ctx)
    if need_w or need_b:
        _refuse_batched(grad_out, "shared_linear (a shared active set)")
    # (Gathered by an embedding: a second-order weight gradient is then row-sparse where the first is.)
    grad_x = grad_out @ F.embedding(indices, weight, sparse=sparse) if need_x else None
    rows, grad_rows, grad_bias_rows = indices, grad_out.t() @ x if need_w else None, grad_out.sum(0) if need_b else None
    if sparse and (need_w or need_b):
        # Rows in ascending order: a set of distinct ones (the layer's always) is then coalesced as it stands, and
        # the optimizer does not sort the gradient again (autograd drops the flag; repeats must still be summed).
        rows, order = indices.sort()
        grad_rows, grad_bias_rows = (None if g is None else g.index_select(0, order) for g in (grad_rows, grad_bias_rows))
    grad_w, grad_b = _row_grads(rows, grad_rows, grad_bias_rows, weight, need_w, need_b, sparse, coalesced=False)
    return grad_x, grad_w, grad_b, None


_GRADS = {"sparse_linear": _sparse_linear_grads, "shared_linear": _shared_linear_grads}

for _name, _grads_fn in _GRADS.items():
    torch.library.register_autograd(f"lsh_torch::{_name}", lambda ctx, g, fn=_grads_fn: fn(ctx, g, False),
                                    setup_context=_setup_context)


# Double backward (gradient penalties): the backward ops are bilinear in (grad_out, weight) and
# (grad_out, x), so their own gradients are the forward and backward ops again.

def _grad_input_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grad_input_grads(ctx, gg):
    grad_out, weight, active = ctx.saved_tensors
    need_g, need_w = ctx.needs_input_grad[:2]
    return (_ops.sparse_linear(gg, weight, None, active) if need_g else None,
            _ops.sparse_linear_grad_weight(grad_out, gg, active, weight.shape[0])[0] if need_w else None, None)


def _grad_weight_setup_context(ctx, inputs, output):
    grad_out, x, active, _ = inputs
    ctx.save_for_backward(grad_out, x, active)


def _grad_weight_grads(ctx, gg_weight, gg_bias):
    grad_out, x, active = ctx.saved_tensors
    need_g, need_x = ctx.needs_input_grad[:2]
    if gg_weight is None:  # only the bias gradient was used
        gg_weight = x.new_zeros(gg_bias.shape[0], x.shape[1])
    return (_ops.sparse_linear(x, gg_weight, gg_bias, active) if need_g else None,
            _ops.sparse_linear_grad_input(grad_out, gg_weight, active) if need_x else None, None, None)


torch.library.register_autograd("lsh_torch::sparse_linear_grad_input", _grad_input_grads,
                                setup_context=_grad_input_setup_context)
torch.library.register_autograd("lsh_torch::sparse_linear_grad_weight", _grad_weight_grads,
                                setup_context=_grad_weight_setup_context)


class _EveryRowSparseGrad(torch.autograd.Function):
    """The identity on a parameter whose gradient leaves as a coalesced COO tensor of every row."""
    @staticmethod
    def forward(param):
        return param.detach()  # an alias, not a view: an in-place write before backward gets nn.Linear's error

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    @torch.compiler.disable  # eager under torch.compile, as _SparseGrad's
    def backward(ctx, grad):
        rows = torch.arange(grad.shape[0], device=grad.device).unsqueeze(0)
        return torch.sparse_coo_tensor(rows, grad.contiguous(), grad.shape, is_coalesced=True, check_invariants=False)


class _SparseGrad(torch.autograd.Function):
    @staticmethod
    def forward(name, x, weight, bias, active):
        return getattr(_ops, name)(x, weight, bias, active)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]
        _setup_context(ctx, inputs, output)

    # Eager under torch.compile: dynamo cannot trace the COO tensors; traced, the graph break warned the user
    # to wrap sparse_coo_tensor in a custom op.
    @staticmethod
    @torch.compiler.disable
    def backward(ctx, grad_out):  # differentiable (a gradient penalty's create_graph=True): see _sparse_linear_grads
        _refuse_batched(grad_out, "sparse_grad=True (row-sparse COO gradients)")
        return (None, *_GRADS[ctx.op_name](ctx, grad_out, True))
