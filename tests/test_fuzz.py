"""Property-based fuzzing of every op (hypothesis): valid inputs agree with tests/reference.py,
invalid ones raise a Python exception that names the argument at fault.

CI runs a fixed number of examples per test with a fixed seed (derandomized), so a run is
repeatable and fast; LSH_TORCH_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py runs a
longer search (README, "Reliability").
"""
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
import torch.nn.functional as F

from lsh_torch import LSHLinear, ops, sparse_cross_entropy
from lsh_torch.proposal import Proposal

EXAMPLES = int(os.environ.get("LSH_TORCH_FUZZ_EXAMPLES", "40"))
fuzz = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
OPS = torch.ops.lsh_torch
ERRORS = (RuntimeError, ValueError, TypeError)


def tensor(draw, shape, dtype=torch.float32, scale=1.0):
    """A seeded random tensor: hypothesis picks the seed, so failures shrink to a reproducible case."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def ints(draw, shape, low, high):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    return torch.randint(low, high, shape, generator=gen)


# --- valid inputs ------------------------------------------------------------------------------

@st.composite
def tables_case(draw, shared):
    """Tables over n neurons, query codes, and labels (padded with -1 and -100) that fit the budget."""
    n, batch = draw(st.integers(1, 40)), draw(st.integers(0, 5))
    num_tables, bits = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    probes = draw(st.integers(1, min(2 ** bits, 8)))
    offsets, items = ops.build_tables(ints(draw, (n, num_tables), 0, 2 ** bits).int(), bits)
    codes, margins = ops.hash_codes(tensor(draw, (batch, num_tables * bits)), num_tables, bits)
    budget = draw(st.integers(0, n))
    labels = None
    if draw(st.booleans()) and batch:
        width = draw(st.integers(0, 3))
        labels = ints(draw, (batch, width), 0, n)
        labels[ints(draw, (batch, width), 0, 3) == 0] = draw(st.sampled_from([-1, -100]))
        distinct = [labels[labels >= 0].unique()] if shared else [row[row >= 0].unique() for row in labels]
        budget = max(budget, *(d.numel() for d in distinct))
    tail = draw(st.integers(0, budget))
    seed = draw(st.integers(0, 2 ** 40))
    return codes, margins, offsets, items, probes, budget, labels, seed, tail


@pytest.mark.parametrize("name", ["query", "query_shared"])
def test_query_agrees_with_reference(name):
    @fuzz
    @given(tables_case(shared=name == "query_shared"))
    def check(case):
        got = getattr(ops, name)(*case)
        expected = getattr(ref, name)(*case)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    check()


@fuzz
@given(st.data())
def test_hashing_ops_agree_with_reference(data):
    draw = data.draw
    n, d = draw(st.integers(0, 30)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rows = tensor(draw, (n, d), dtype, scale=draw(st.sampled_from([1e-3, 1.0, 1e3])))
    query = draw(st.booleans())
    max_norm = None
    if not query and n and draw(st.booleans()):
        max_norm = rows.double().norm(dim=1).max().reshape(1) * draw(st.floats(1.0, 4.0)) + 1e-30
    got, expected = ops.mips_transform(rows, query, max_norm), ref.mips_transform(rows, query, max_norm)
    torch.testing.assert_close(got[:, :-1], expected[:, :-1])
    # sqrt(1 - |r|^2) for the largest row: |r| = 1 up to rounding, so sqrt(eps)-sized differences.
    torch.testing.assert_close(got[:, -1], expected[:, -1], rtol=0, atol=4 * torch.finfo(dtype).eps ** 0.5)
    vector = tensor(draw, (d,))
    # Summed in float32 for float32 rows: the error bound scales with the sum of |terms|, not the result.
    error = (ops.row_fingerprints(rows, vector).double() - ref.row_fingerprints(rows, vector).double()).abs()
    assert (error <= d * torch.finfo(torch.float32).eps * (rows.double().abs() @ vector.double().abs()) + 1e-30).all()
    num_tables, bits = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    projections = tensor(draw, (n, num_tables * bits), dtype)
    for got, expected in zip(ops.hash_codes(projections, num_tables, bits), ref.hash_codes(projections, num_tables, bits)):
        assert torch.equal(got, expected)
    codes = ints(draw, (n, num_tables), 0, 2 ** bits).int()
    tables = ops.build_tables(codes, bits)
    for got, expected in zip(tables, ref.build_tables(codes, bits)):
        assert torch.equal(got, expected)
    rows = torch.tensor(sorted(draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n))), dtype=torch.long)
    new_codes = ints(draw, (len(rows), num_tables), 0, 2 ** bits).int()
    updated = codes.clone()
    updated[rows] = new_codes
    for got, built, expected in zip(ops.update_tables(*tables, rows, codes[rows], new_codes),
                                    ops.build_tables(updated, bits),
                                    ref.update_tables(*tables, rows, codes[rows], new_codes)):
        assert torch.equal(got, built) and torch.equal(got, expected)


@fuzz
@given(st.data())
def test_row_topk_agrees_with_reference(data):
    # Rows wide enough for the sampled threshold (U > 4k), ties (rounded values) and NaNs.
    draw = data.draw
    batch, width = draw(st.integers(0, 4)), draw(st.integers(1, 3000))
    k = draw(st.integers(0, width))
    scores = tensor(draw, (batch, width), draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))
    if draw(st.booleans()):
        scores = scores.mul(draw(st.sampled_from([1.0, 4.0]))).round()
    if batch and draw(st.booleans()):
        scores[ints(draw, (3,), 0, batch), ints(draw, (3,), 0, width)] = float("nan")
    assert torch.equal(ops.row_topk(scores, k), ref.row_topk(scores, k))


@fuzz
@given(st.data())
def test_dwta_codes_agree_with_reference(data):
    """Rows with many zeros (empty bins, all-zero rows), ties from rounding, any bins."""
    draw = data.draw
    n, d = draw(st.integers(0, 12), label="n"), draw(st.integers(1, 20), label="d")
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    rows = tensor(draw, (n, d), torch.float64)
    rows = rows.masked_fill(ints(draw, (n, d), 0, 4) < draw(st.integers(0, 4)), 0.0)  # 0 to all zero
    if draw(st.booleans()):
        rows = rows.round()  # ties
    rows = rows.to(dtype)
    num_tables, hashes = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    bin_size = draw(st.sampled_from([2, 4, 8, 16]))
    bins = ints(draw, (num_tables * hashes, bin_size), 0, d)  # any indices, repeats included
    codes, margins = ops.dwta_codes(rows, bins, num_tables)
    expected = ref.dwta_codes(rows, bins, num_tables)
    assert torch.equal(codes, expected[0]) and torch.equal(margins, expected[1])


@fuzz
@given(st.data())
def test_linear_ops_and_their_gradients_agree_with_reference(data):
    """Forward and every gradient in float64, repeated and unordered indices included."""
    draw = data.draw
    batch, d, n, budget = draw(st.integers(0, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 30)), draw(st.integers(0, 8))
    x, weight = tensor(draw, (batch, d), torch.float64), tensor(draw, (n, d), torch.float64)
    bias = tensor(draw, (n,), torch.float64) if draw(st.booleans()) else None
    sparse_grad = draw(st.booleans())
    shared = draw(st.booleans())
    active = ints(draw, (budget,) if shared else (batch, budget), 0, n)
    op, reference = (ops.shared_linear, ref.shared_linear) if shared else (ops.sparse_linear, ref.sparse_linear)
    inputs = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    twins = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out, expected = op(*inputs, active, sparse_grad=sparse_grad), reference(*twins, active)
    torch.testing.assert_close(out, expected)
    grad_out = tensor(draw, out.shape, torch.float64)
    wanted = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    want = torch.autograd.grad(expected, [t for t in twins if t is not None], grad_out, allow_unused=True)
    for g, w, t in zip(got, want, wanted):
        g = torch.zeros_like(t) if g is None else g.to_dense()
        torch.testing.assert_close(g, torch.zeros_like(t) if w is None else w)
    if not shared:
        rows, grad_rows, grad_bias_rows = OPS.sparse_linear_grad_weight_rows(grad_out, x, active)
        ref_rows, ref_grad_rows, ref_bias_rows = ref.sparse_linear_grad_weight_rows(grad_out, x, active)
        assert torch.equal(rows, ref_rows)
        torch.testing.assert_close((grad_rows, grad_bias_rows), (ref_grad_rows, ref_bias_rows))


@fuzz
@given(st.data())
def test_lazy_adam_agrees_with_reference(data):
    draw = data.draw
    num_rows, width = draw(st.integers(1, 20)), draw(st.integers(0, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    param, m = tensor(draw, (num_rows, width), dtype), tensor(draw, (num_rows, width), dtype)
    v = tensor(draw, (num_rows, width), dtype).abs()
    rows = torch.randperm(num_rows, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    rows = rows[: draw(st.integers(0, num_rows))].sort().values
    grad = tensor(draw, (rows.numel(), width), dtype)
    args = (rows, grad, draw(st.floats(1e-6, 1.0)), draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.9999)),
            draw(st.floats(1e-10, 1e-3)), draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)))
    expected = [t.clone() for t in (param, m, v)]
    ref.lazy_adam_(*expected, *args)
    ops.lazy_adam_(param, m, v, *args)
    ulps = 4 * torch.finfo(dtype).eps  # the contract's operations, up to a few roundings
    torch.testing.assert_close((param, m, v), tuple(expected), rtol=ulps,
                               atol=ulps * (1 + (float(param.abs().max()) if param.numel() else 0)))


@fuzz
@given(st.data())
def test_layer_properties(data):
    """LSHLinear end to end, any configuration: the computed outputs are the dense layer's at the
    active indices, labels are active, no index repeats, and loss and gradients equal those of the
    same sparse softmax computed from F.linear."""
    draw = data.draw
    d, n = draw(st.integers(1, 8)), draw(st.integers(1, 60))
    batch_shape = draw(st.sampled_from([(0,), (1,), (5,), (2, 3)]))
    mode = draw(st.sampled_from(["per_row", "shared"]))
    rows = 1
    for size in batch_shape:
        rows *= size
    width = draw(st.integers(0, 2))
    labels = ints(draw, (*batch_shape, width) if width else batch_shape, 0, n)
    labels[ints(draw, labels.shape, 0, 4) == 0] = draw(st.sampled_from([-1, -100]))
    flat = labels.reshape(rows, max(width, 1))
    needed = max([flat[flat >= 0].unique().numel()] if mode == "shared" else [1] + [(r >= 0).sum().item() for r in flat])
    active = draw(st.integers(max(needed, 1), n)) if needed <= n else n
    layer = LSHLinear(d, n, dtype=torch.float64, mode=mode, active=active, seed=draw(st.integers(0, 99)),
                      tail=draw(st.sampled_from(["auto", 0, 0.5, 1.0])), rescore=draw(st.integers(1, 3)),
                      selection=draw(st.sampled_from(["lsh", "random"])), sparse_grad=draw(st.booleans()),
                      num_tables=draw(st.integers(1, 4)), bits=draw(st.integers(1, 5)), probes=1,
                      bias=draw(st.booleans()))
    x = tensor(draw, (*batch_shape, d), torch.float64)
    out = layer.forward_sparse(x, labels)
    dense = F.linear(x, layer.weight, layer.bias).reshape(rows, n)
    budget = out.indices.shape[-1]
    per_row = mode == "per_row" and not layer.exact_softmax  # every output: one set, [N], in every mode
    index = out.indices.reshape(rows, budget) if per_row else out.indices.expand(rows, budget)
    torch.testing.assert_close(out.values.reshape(rows, budget), dense.gather(1, index))
    assert all(row.unique().numel() == row.numel() for row in index)
    assert all(set(lab[lab >= 0].tolist()) <= set(row.tolist()) for lab, row in zip(flat, index))
    if layer.exact_softmax:  # every output active: computed in one product, in order, no tail to correct
        assert active == n and out.log_weights is None and torch.equal(index, torch.arange(n).expand(rows, n))
    else:
        assert torch.isfinite(out.log_weights).all() and (out.log_weights >= 0).all()
    loss = sparse_cross_entropy(out, labels)
    grads = torch.autograd.grad(loss, [p for p in layer.parameters()])
    same = out._replace(values=dense.gather(1, index).reshape(out.values.shape))
    expected = torch.autograd.grad(sparse_cross_entropy(same, labels), [p for p in layer.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.to_dense(), want)
    torch.testing.assert_close(layer.eval()(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


# --- invalid inputs ---------------------------------------------------------------------------
# Each case: a valid call with one argument broken. The op must raise a Python exception whose
# message names that argument (never crash, hang, or return).

def _valid_calls(draw):
    n, d, batch, budget = 12, 5, 3, 4
    x, weight, bias = tensor(draw, (batch, d)), tensor(draw, (n, d)), tensor(draw, (n,))
    active = ints(draw, (batch, budget), 0, n)
    codes, margins = ops.hash_codes(tensor(draw, (batch, 2 * 3)), 2, 3)
    table_codes = ints(draw, (n, 2), 0, 8).int()
    offsets, items = ops.build_tables(table_codes, 3)
    labels = ints(draw, (batch, 1), 0, n)
    state = [tensor(draw, (n, d)) for _ in range(2)] + [tensor(draw, (n, d)).abs()]
    rows = torch.tensor([1, 4, 7])
    proposal = Proposal.of(tensor(draw, (n,)).double().abs() * 100, torch.device("cpu"))
    return {
        "sparse_linear": (OPS.sparse_linear, dict(x=x, weight=weight, bias=bias, active=active)),
        "shared_linear": (OPS.shared_linear, dict(x=x, weight=weight, bias=bias, indices=active[0])),
        "sparse_linear_grad_input": (OPS.sparse_linear_grad_input,
                                     dict(grad_out=tensor(draw, (batch, budget)), weight=weight, active=active)),
        "sparse_linear_grad_weight": (OPS.sparse_linear_grad_weight, dict(grad_out=tensor(draw, (batch, budget)), x=x,
                                                                         active=active, num_rows=n)),
        "sparse_linear_grad_weight_rows": (OPS.sparse_linear_grad_weight_rows,
                                           dict(grad_out=tensor(draw, (batch, budget)), x=x, active=active)),
        "query": (OPS.query, dict(codes=codes, margins=margins, offsets=offsets, items=items, probes=2, budget=budget,
                                  labels=labels, seed=0, tail=1)),
        "query_shared": (OPS.query_shared, dict(codes=codes, margins=margins, offsets=offsets, items=items, probes=2,
                                                budget=budget, labels=labels, seed=0, tail=1)),
        "mips_transform": (OPS.mips_transform, dict(rows=weight, query=False, max_norm=torch.tensor(1e3))),
        "row_fingerprints": (OPS.row_fingerprints, dict(rows=weight, vector=tensor(draw, (d,)))),
        "row_topk": (OPS.row_topk, dict(scores=tensor(draw, (batch, n)), k=2)),
        "hash_codes": (OPS.hash_codes, dict(projections=tensor(draw, (n, 6)), num_tables=2, bits=3)),
        "dwta_codes": (OPS.dwta_codes, dict(rows=weight.relu(), bins=ints(draw, (4, 4), 0, d), num_tables=2)),
        "build_tables": (OPS.build_tables, dict(codes=ints(draw, (n, 2), 0, 8).int(), bits=3)),
        "update_tables": (OPS.update_tables, dict(offsets=offsets, items=items, rows=rows, old_codes=table_codes[rows],
                                                  new_codes=ints(draw, (3, 2), 0, 8).int())),
        "proposal_draw": (OPS.proposal_draw, dict(active=active, head=torch.tensor([1, 4, 0]), cdf=proposal.cdf,
                                                  guide=proposal.guide, tries=4, seed=0)),
        "proposal_log_weights": (OPS.proposal_log_weights, dict(active=active, head=torch.tensor([1, 4, 0]),
                                                                cdf=proposal.cdf, tries=4)),
        "lazy_adam_": (OPS.lazy_adam_, dict(param=state[0], exp_avg=state[1], exp_avg_sq=state[2], rows=rows,
                                           grad_rows=tensor(draw, (3, d)), step_size=0.01, beta1=0.9, beta2=0.999,
                                           eps=1e-8, decay=0.01)),
    }


def _corruptions(value):
    """Ways to break one argument, each of which no op may accept."""
    if isinstance(value, torch.Tensor):
        yield "on the meta device", value.to("meta")
        yield "with an extra dimension", value.unsqueeze(0)
        if value.dim() >= 1:
            yield "with a dimension dropped", value[0]
        if value.dtype.is_floating_point:
            yield "as complex", value.to(torch.complex64)
        else:
            yield "as float", value.float()
            yield "out of range", value + 10 ** 6
            yield "negative", value.clamp_max(-2) - 200
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        yield "negative", -value - 1
        yield "huge", 2 ** 40
    elif isinstance(value, float):
        yield "NaN", float("nan")


def _broken(op_name, args, arg):
    """The corruptions of ``args[arg]`` that the op must refuse (some are legal for some arguments)."""
    legal = {("mips_transform", "max_norm"): ("with an extra dimension", "with a dimension dropped"),  # any 1 element
             # no row count to check against: any id in [0, 2^31) is a row (negative ones are refused)
             ("sparse_linear_grad_weight_rows", "active"): ("out of range",),
             # a hint where each draw's search begins, checked against cdf: any value gives the same draws
             ("proposal_draw", "guide"): ("out of range", "negative")}
    if sum(isinstance(v, torch.Tensor) for v in args.values()) == 1:  # all inputs on meta: shape inference
        legal[(op_name, arg)] = ("on the meta device",)
    if arg == "seed":  # any int is a seed
        return []
    return [(how, v) for how, v in _corruptions(args[arg]) if how not in legal.get((op_name, arg), ())]


def _fixed_draw(strategy):
    return 0


CASES = [(op, arg) for op, (_, args) in _valid_calls(_fixed_draw).items() for arg in args if _broken(op, args, arg)]


@pytest.mark.parametrize("op_name,arg", CASES, ids=[f"{op}-{arg}" for op, arg in CASES])
def test_invalid_inputs_raise_and_name_the_argument(op_name, arg):
    @fuzz
    @given(st.data())
    def check(data):
        fn, args = _valid_calls(data.draw)[op_name]
        fn(**args)  # the valid call works
        how, value = data.draw(st.sampled_from(_broken(op_name, args, arg)))
        with pytest.raises(ERRORS) as info:
            fn(**{**args, arg: value})
        names = [arg] + (["device"] if how == "on the meta device" else []) + (["L\\*K"] if arg == "num_tables" else [])
        assert any(re.search(rf"\b{name}\b", str(info.value)) for name in names), f"{op_name}({arg} {how}): {info.value}"
    check()
