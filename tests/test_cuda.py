"""The CUDA kernels against the CPU kernels and tests/reference.py, opcheck and gradcheck on CUDA
tensors, half-precision accuracy, and LSHLinear on a GPU. Skipped without a CUDA device.

Integer outputs (codes, tables, active sets) must equal the CPU op's bit for bit; mips_transform
and hash_codes are designed to be bit-identical too; sums of products (sparse_linear and its
gradients) match to rounding, since the summation order differs.
"""
import copy
import itertools

import pytest
import torch
from torch import nn

import reference as ref
import test_ops
from lsh_torch import LazyAdam, LSHLinear, ops, sparse_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPS = torch.ops.lsh_torch
HALF = [torch.bfloat16, torch.float16]
ALL_FLOATS = [torch.float32, torch.float64, *HALF]


def to_cuda(*tensors):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors)


def to_cpu(tensors):
    return tuple(t.cpu() for t in tensors)


random_tables, LABELS, assert_same = test_ops.random_tables, test_ops.LABELS, test_ops.assert_same  # as the CPU tests


# --- mips_transform and hash_codes ------------------------------------------------------------

@pytest.mark.parametrize("query", [False, True])
@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_mips_transform_equals_cpu(dtype, query):
    rows = torch.randn(301, 37, dtype=torch.float64).to(dtype)  # a partial warp tile and two column tiles
    rows[3] = 0  # a zero row must not divide by zero
    if dtype in (torch.float32, torch.bfloat16):  # rows whose float32 squares leave its range: scaled first
        rows[5] *= 1e20
        rows[6] *= 1e-25
    got = ops.mips_transform(rows.cuda(), query).cpu()
    assert got.dtype == dtype and got.shape == (301, 38)
    assert torch.equal(got, ops.mips_transform(rows, query))  # same order and roundings as the CPU loop
    torch.testing.assert_close(got, ref.mips_transform(rows, query))


@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_mips_transform_with_max_norm_equals_cpu(dtype):
    rows = torch.randn(301, 37, dtype=torch.float64).to(dtype)
    m = 1.2 * rows.double().norm(dim=1).max()
    got = ops.mips_transform(rows.cuda(), False, m.cuda()).cpu()
    assert torch.equal(got, ops.mips_transform(rows, False, m))
    with pytest.raises(RuntimeError, match="at most max_norm"):
        ops.mips_transform(rows.cuda(), False, m.cuda() / 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mips_transform_rejects_non_finite_rows_on_cuda(bad):
    rows = torch.randn(50, 8)
    rows[17, 3] = bad
    for max_norm in (None, torch.tensor(1e6)):
        with pytest.raises(RuntimeError, match="finite"):
            ops.mips_transform(rows, False, max_norm)  # the CPU's message, checked on both devices
        with pytest.raises(RuntimeError, match="finite"):
            ops.mips_transform(rows.cuda(), False, None if max_norm is None else max_norm.cuda())
    ops.mips_transform(rows.cuda(), True)  # queries are not checked (as on the CPU)


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("n,d", [(0, 5), (1, 1), (1000, 37), (70_000, 128)])
def test_row_fingerprints_match_reference_on_cuda(dtype, n, d):
    rows, vector = torch.randn(n, d).to(dtype), torch.randn(d)
    got = ops.row_fingerprints(rows.cuda(), vector.cuda())
    assert got.is_cuda and got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.cpu(), ref.row_fingerprints(rows, vector), rtol=1e-5, atol=1e-5)
    # Bit for bit the CPU op's: fingerprints kept on one device compare equal after a move to the other
    # (else the next rebuild takes every row as moved and re-hashes the whole layer).
    assert torch.equal(got.cpu(), ops.row_fingerprints(rows, vector))


@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("batch,width,k", [(0, 9, 3), (4, 9, 0), (3, 5000, 7), (1024, 8192, 129)])
def test_row_topk_equals_cpu(dtype, batch, width, k):
    scores = torch.randn(batch, width).to(dtype)
    assert torch.equal(ops.row_topk(scores.cuda(), k).cpu(), ops.row_topk(scores, k))
    special = test_ops.special_scores()
    assert torch.equal(ops.row_topk(special.cuda(), 150).cpu(), ref.row_topk(special, 150))


def test_mips_transform_empty_and_narrow():
    assert ops.mips_transform(torch.empty(0, 5, device="cuda"), False).shape == (0, 6)
    rows = torch.randn(40, 1)
    assert torch.equal(ops.mips_transform(rows.cuda(), False).cpu(), ops.mips_transform(rows, False))


@pytest.mark.parametrize("num_tables,bits", [(1, 1), (5, 6), (3, 20)])
@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_hash_codes_equal_cpu(num_tables, bits, dtype):
    proj = torch.randn(33, num_tables * bits, dtype=torch.float64).to(dtype)
    proj[0, 0], proj[1, 1 % (num_tables * bits)], proj[2, 0] = float("nan"), 0.0, -0.0
    codes, margins = ops.hash_codes(proj.cuda(), num_tables, bits)
    cpu_codes, cpu_margins = ops.hash_codes(proj, num_tables, bits)
    assert codes.is_cuda and codes.dtype == torch.int32 and margins.dtype == torch.float32
    assert torch.equal(codes.cpu(), cpu_codes) and torch.equal(margins.cpu(), cpu_margins)
    ref_codes, ref_margins = ref.hash_codes(proj, num_tables, bits)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(margins.cpu(), ref_margins)
    row_codes, no_margins = ops.hash_codes(proj.cuda(), num_tables, bits, margins=False)
    assert torch.equal(row_codes.cpu(), cpu_codes) and no_margins.shape == (33, 0)


# --- dwta_codes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,num_tables,hashes,bin_size", [(33, 24, 3, 2, 8), (2000, 128, 40, 3, 8),
                                                            (500, 7, 2, 5, 4), (300, 64, 8, 1, 16), (0, 5, 1, 1, 2)])
@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_dwta_codes_equal_cpu(n, d, num_tables, hashes, bin_size, dtype):
    """No BLAS in DWTA: codes and margins bit-identical to the CPU kernel (and its reference)."""
    rows, bins = test_ops.dwta_problem(n=max(n, 7), d=d, num_tables=num_tables, hashes=hashes, bin_size=bin_size,
                                       dtype=dtype)
    rows = rows[:n]
    codes, margins = ops.dwta_codes(rows.cuda(), bins.cuda(), num_tables)
    cpu_codes, cpu_margins = ops.dwta_codes(rows, bins, num_tables)
    assert codes.is_cuda and codes.dtype == torch.int32 and margins.dtype == torch.float32
    assert torch.equal(codes.cpu(), cpu_codes) and torch.equal(margins.cpu(), cpu_margins)
    if n <= 40:
        ref_codes, ref_margins = ref.dwta_codes(rows, bins, num_tables)
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(margins.cpu(), ref_margins)


def test_dwta_codes_errors_on_cuda():
    rows = torch.randn(4, 6, device="cuda")
    with pytest.raises(RuntimeError, match="bins must hold dimension indices"):
        ops.dwta_codes(rows, torch.tensor([[0, 6]], device="cuda"), 1)
    with pytest.raises(RuntimeError, match="bins must hold dimension indices"):
        ops.dwta_codes(rows, torch.tensor([[-3, 1]], device="cuda"), 1)
    with pytest.raises(RuntimeError, match="bins must hold dimension indices"):  # checked for an empty batch too
        ops.dwta_codes(rows[:0], torch.tensor([[0, 6]], device="cuda"), 1)
    with pytest.raises(RuntimeError, match="one device"):
        ops.dwta_codes(rows, torch.tensor([[0, 1]]), 1)
    with pytest.raises(RuntimeError, match="power-of-two"):
        ops.dwta_codes(rows, torch.zeros(1, 3, dtype=torch.long, device="cuda"), 1)
    ops.dwta_codes(rows, torch.tensor([[0, 1]], device="cuda"), 1)  # still works after an error


def test_dwta_tables_built_on_cuda_equal_cpu():
    """A dwta layer's tables, hashed on each device, are identical (no BLAS), and so are its active sets."""
    cpu_layer = LSHLinear(64, 3000, active=64, num_tables=8, bits=6, probes=4, rebuild=None, seed=2, hash="dwta")
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    cpu_layer.rebuild()
    gpu_layer.rebuild()
    assert gpu_layer.tables.bins.dtype == torch.int64
    for name in ("codes", "offsets", "items"):
        assert torch.equal(getattr(gpu_layer.tables, name).cpu(), getattr(cpu_layer.tables, name)), name
    x = torch.randn(16, 64).relu()
    assert torch.equal(gpu_layer.active_set(x.cuda()).cpu(), cpu_layer.active_set(x))


# --- build_tables -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,bits", [(500, 1), (500, 4), (500, 10), (6000, 3), (6000, 16), (0, 4)])
def test_build_tables_equal_cpu(n, bits):
    codes = torch.randint(0, 2 ** bits, (n, 3), dtype=torch.int32)
    offsets, items = ops.build_tables(codes.cuda(), bits)
    cpu_offsets, cpu_items = ops.build_tables(codes, bits)
    assert offsets.is_cuda and items.dtype == torch.int32
    assert torch.equal(offsets.cpu(), cpu_offsets) and torch.equal(items.cpu(), cpu_items)
    if n <= 500:
        ref_offsets, ref_items = ref.build_tables(codes, bits)
        assert torch.equal(offsets.cpu(), ref_offsets) and torch.equal(items.cpu(), ref_items)


@pytest.mark.parametrize("n,bits,moved", [(500, 1, 40), (500, 10, 0), (6000, 3, 6000), (6000, 16, 300), (0, 4, 0)])
def test_update_tables_equal_cpu(n, bits, moved):
    codes = torch.randint(0, 2 ** bits, (n, 3), dtype=torch.int32)
    rows = torch.randperm(n)[:moved].sort().values
    new_codes = torch.randint(0, 2 ** bits, (moved, 3), dtype=torch.int32)
    args = (*ops.build_tables(codes, bits), rows, codes[rows], new_codes)
    got = ops.update_tables(*(a.cuda() for a in args))
    assert all(g.is_cuda for g in got)
    for g, expected in zip(got, ops.update_tables(*args)):
        assert torch.equal(g.cpu(), expected)
    if moved:  # rows said to leave buckets they are not in
        with pytest.raises(RuntimeError, match="do not match old_codes"):
            ops.update_tables(*(a.cuda() for a in args[:3]), ((codes[rows] + 1) % 2 ** bits).cuda(), new_codes.cuda())


def test_update_tables_errors_on_cuda_as_on_cpu():
    empty = torch.zeros(0, 1, dtype=torch.int32)
    bad = (torch.tensor([[0, 1, 0]], dtype=torch.int32), torch.zeros(1, 0, dtype=torch.int32),
           torch.zeros(0, dtype=torch.long), empty, empty)  # N = 0 with offsets that are not all 0
    for device in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match="offsets"):
            ops.update_tables(*(a.to(device) for a in bad))
    offsets, items = ops.build_tables(torch.tensor([[0], [0], [1]], dtype=torch.int32), 1)
    for device, (rows, old) in itertools.product(("cpu", "cuda"), [([1, 0], [0, 0]), ([2], [0])]):
        with pytest.raises(RuntimeError, match="strictly increasing|do not match old_codes"):
            ops.update_tables(offsets.to(device), items.to(device), torch.tensor(rows, device=device),
                              torch.tensor(old, dtype=torch.int32, device=device)[:, None],
                              torch.ones(len(rows), 1, dtype=torch.int32, device=device))


def test_tables_hashed_on_cuda_match_cpu():
    # The projection is a BLAS matmul on each device, so a code may differ only where a
    # projection is within rounding of zero; the rest of the pipeline is bit-identical.
    gen = torch.Generator().manual_seed(1)
    weight, proj = torch.randn(3000, 24, generator=gen), torch.randn(25, 30, generator=gen)
    p_cpu = ops.mips_transform(weight, False) @ proj
    p_gpu = (ops.mips_transform(weight.cuda(), False) @ proj.cuda()).cpu()
    torch.testing.assert_close(p_gpu, p_cpu, rtol=1e-4, atol=1e-5)
    c_cpu, _ = ops.hash_codes(p_cpu, 5, 6)
    c_gpu, _ = ops.hash_codes(p_gpu.cuda(), 5, 6)
    differ = c_cpu != c_gpu.cpu()
    near_zero = (p_cpu.abs() < 1e-4).reshape(3000, 5, 6).any(-1)
    assert not (differ & ~near_zero).any()


# --- query and query_shared ---------------------------------------------------------------------

QUERY_CASES = [
    # (table args, probes, budget, labels)
    (dict(), 1, 10, None),           # exact buckets only
    (dict(), 6, 40, LABELS),         # labels first, duplicates and padding dropped
    (dict(), 32, 300, LABELS),       # every bucket probed, budget == N: the fill walks to the end
    (dict(), 10, 250, None),         # budget close to N: the random draws give way to the walk
    (dict(), 10, 0, None),           # empty budget
    (dict(n=3000, num_tables=8, bits=4, batch=20), 6, 150, None),  # more candidates than budget: a partial level
    (dict(n=3000, num_tables=1, bits=1, batch=5), 1, 700, None),   # one level of ~1500 candidates, radix select
    (dict(n=2000, num_tables=3, bits=12, batch=9), 3, 500, None),  # sparse buckets: mostly random fill
]


@pytest.mark.parametrize("kwargs,probes,budget,labels", QUERY_CASES)
@pytest.mark.parametrize("shared", [False, True])
def test_query_equals_cpu(kwargs, probes, budget, labels, shared):
    args = random_tables(**kwargs)
    if labels is not None and labels.shape[0] != args[0].shape[0]:
        labels = None
    fn = ops.query_shared if shared else ops.query
    for tail in (0, budget // 2):
        expected = fn(*args, probes, budget, labels, 123, tail)
        got = fn(*to_cuda(*args), probes, budget, None if labels is None else labels.cuda(), 123, tail)
        assert got[0].is_cuda and got[0].dtype == torch.int64 and got[1].is_cuda and got[1].dtype == torch.int64
        assert_same(to_cpu(got), expected)
        if not shared:  # rows keyed by row_keys (eval lookups key them by their codes)
            keys = torch.randint(-2 ** 62, 2 ** 62, (args[0].shape[0],))
            expected = fn(*args, probes, budget, labels, 123, tail, keys)
            got = fn(*to_cuda(*args), probes, budget, None if labels is None else labels.cuda(), 123, tail, keys.cuda())
            assert_same(to_cpu(got), expected)


def test_query_without_tables_equals_cpu():
    args = test_ops.no_tables()
    for fn in (ops.query, ops.query_shared):
        expected = fn(*args, 4, 9, LABELS, 5)
        assert_same(to_cpu(fn(*to_cuda(*args), 4, 9, LABELS.cuda(), 5)), expected)


def test_query_large_seed_and_labels_only():
    args = random_tables()
    seed = (2 ** 31 - 1) * 2 ** 32 + 12345  # a layer's seed * 2**32 + step: above 2**62
    labels = torch.arange(7 * 3).reshape(7, 3)
    for fn in (ops.query, ops.query_shared):
        budget = 3 if fn is ops.query else 21
        expected = fn(*args, 4, budget, labels, seed)
        assert_same(to_cpu(fn(*to_cuda(*args), 4, budget, labels.cuda(), seed)), expected)


def test_query_in_chunks_equals_cpu():
    # 1.5M neurons: the per-row counters exceed the scratch bound, so rows run in several chunks.
    args = random_tables(n=1_500_000, d=4, num_tables=2, bits=16, batch=100, seed=3)
    labels = torch.randint(-1, 1_500_000, (100, 2))
    expected = ops.query(*args, 4, 40, labels, 11, 10)
    assert_same(to_cpu(ops.query(*to_cuda(*args), 4, 40, labels.cuda(), 11, 10)), expected)
    keys = torch.randperm(100) * 7 - 50  # a later chunk's rows read their own keys
    expected = ops.query(*args, 4, 40, labels, 11, 10, keys)
    assert_same(to_cpu(ops.query(*to_cuda(*args), 4, 40, labels.cuda(), 11, 10, keys.cuda())), expected)


@pytest.mark.parametrize("n,bits,batch,crowded,cases", [
    (3000, 8, 8, 2500, ((1, 1200, 0), (2, 2000, 300), (3, 100, 10))),  # partial levels: radix select
    # rows in chunks: a later chunk's rows reuse counters that an overflowed row (all N reset) and a listed
    # row (its candidates reset) left
    (1_500_000, 16, 100, 200_000, ((4, 40, 10), (2, 5000, 1000))),
])
def test_query_with_a_crowded_bucket_equals_cpu(n, bits, batch, crowded, cases):
    """The CUDA query scans each row's listed candidates, room for 4 x L x probes x the mean bucket size
    (at most N / 8, at least 1,024 or N); a row whose candidates overflow that scans all N counters. Here
    table 0 puts ``crowded`` neurons in bucket 0: the rows that probe it (every other row) overflow."""
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 2 ** bits, (n, 2), generator=gen, dtype=torch.int32)
    codes[:crowded, 0] = 0
    offsets, items = ops.build_tables(codes, bits)
    qcodes = torch.randint(1, 2 ** bits, (batch, 2), generator=gen, dtype=torch.int32)
    qcodes[::2, 0] = 0
    args = (qcodes, torch.rand(batch, 2 * bits, generator=gen), offsets, items)
    labels = torch.randint(-1, n, (batch, 3), generator=gen)
    for probes, budget, tail in cases:
        expected = ops.query(*args, probes, budget, labels, 9, tail)
        assert_same(to_cpu(ops.query(*to_cuda(*args), probes, budget, labels.cuda(), 9, tail)), expected)


@pytest.mark.parametrize("fn", [ops.query, ops.query_shared], ids=["query", "query_shared"])
def test_query_under_cuda_graph_capture(fn):
    # While capturing, the kernels skip the synchronising reads; the replayed result is the same.
    args = to_cuda(*random_tables())
    expected = fn(*args, 5, 40, LABELS.cuda(), 9, 10)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*args, 5, 40, LABELS.cuda(), 9, 10)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    labels = LABELS.cuda()
    with torch.cuda.graph(graph):
        out = fn(*args, 5, 40, labels, 9, 10)
    graph.replay()
    torch.cuda.synchronize()
    assert_same(out, expected)


def test_query_errors_on_cuda():
    qcodes, qmargins, offsets, items = to_cuda(*random_tables())
    cases = [
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 1, LABELS.cuda()), "row \\d+ has more distinct labels"),
        (lambda: ops.query_shared(qcodes, qmargins, offsets, items, 4, 5, LABELS.cuda()),
         "the batch has more distinct labels"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, LABELS), "labels must be on"),
        (lambda: ops.query(qcodes, qmargins.cpu(), offsets, items, 4, 5), "margins must be on"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 0, torch.arange(7)), "row_keys must be on"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 0, 5), "probes"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 301), "budget"),
        (lambda: ops.query(qcodes, qmargins, offsets, torch.full_like(items, 999), 4, 5), "items of table"),
        (lambda: ops.query(qcodes + 64, qmargins, offsets, items, 4, 5), "codes must be in"),
        (lambda: ops.query(qcodes, -qmargins - 1, offsets, items, 4, 5), "query: margins must be >= 0"),
        (lambda: ops.query_shared(qcodes, -qmargins - 1, offsets, items, 4, 5), "query_shared: margins must be >= 0"),
        (lambda: ops.query_shared(qcodes, qmargins, offsets, items, 4, 5, None, 0, 6), "tail must be in"),
        # The tables and margins are checked up front as on the CPU, whatever the budget or batch.
        (lambda: ops.query(qcodes, qmargins, offsets.clamp(max=299), items, 4, 5), "offsets of table \\d+ must run from 0"),
        (lambda: ops.query_shared(qcodes, qmargins, offsets.clamp(max=299), items, 4, 5), "must run from 0 to N"),
        (lambda: ops.query(qcodes, qmargins, offsets.flip(1), items, 4, 5), "offsets of table \\d+ must"),
        (lambda: ops.query(qcodes, -qmargins - 1, offsets, items, 4, 0), "query: margins must be >= 0"),
        (lambda: ops.query_shared(qcodes, -qmargins - 1, offsets, items, 4, 0), "query_shared: margins must be >= 0"),
        (lambda: ops.query(qcodes[:0], qmargins[:0], offsets.clamp(max=299), items, 4, 5), "must run from 0 to N"),
    ]
    reversed_items = items.clone()  # every bucket's ids descending: refused as by the CPU
    for table, bounds in enumerate(offsets.tolist()):
        for begin, end in zip(bounds[:-1], bounds[1:]):
            reversed_items[table, begin:end] = items[table, begin:end].flip(0)
    cases += [(lambda: query(qcodes, qmargins, offsets, reversed_items, 10, 250, LABELS.cuda(), 77, 0),
               "ids in each bucket of items must ascend") for query in (ops.query, ops.query_shared)]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()
    with pytest.raises(ValueError, match="labels must be in .* got 300"):  # a bad value, as on the CPU
        ops.query(qcodes, qmargins, offsets, items, 4, 5, torch.full((7, 1), 300, device="cuda"))
    # nothing is left behind by a failed call
    expected = ops.query(*random_tables(), 4, 60, None, 1)
    assert_same(to_cpu(ops.query(qcodes, qmargins, offsets, items, 4, 60, None, 1)), expected)


# --- sparse_linear and its gradients ------------------------------------------------------------

def sparse_problem(dtype=torch.float32, batch=5, d=7, n=40, budget=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=gen).to(dtype)
    weight = (torch.randn(n, d, generator=gen) / d ** 0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    active = torch.stack([torch.randperm(n, generator=gen)[:budget] for _ in range(batch)])
    if batch > 1:
        active[1, :3] = active[0, :3]  # rows shared across samples accumulate
    return x, weight, bias, active


def tolerance(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype in HALF else {}


@pytest.mark.parametrize("d", [7, 16, 64])  # 16 and 64: vector loads for every dtype
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_linear_and_grads_equal_cpu(dtype, d, with_bias):
    x, weight, bias, active = sparse_problem(dtype, d=d)
    bias = bias if with_bias else None
    tol = tolerance(dtype)
    cx, cw, cb, ca = to_cuda(x, weight, bias, active)
    out = ops.sparse_linear(cx, cw, cb, ca)
    torch.testing.assert_close(out.cpu(), ops.sparse_linear(x, weight, bias, active), **tol)
    torch.testing.assert_close(out.cpu(), ref.sparse_linear(x, weight, bias, active), **tol)
    g = torch.randn(active.shape).to(dtype)
    gx = OPS.sparse_linear_grad_input(g.cuda(), cw, ca)
    torch.testing.assert_close(gx.cpu(), OPS.sparse_linear_grad_input(g, weight, active), **tol)
    gw, gb = OPS.sparse_linear_grad_weight(g.cuda(), cx, ca, weight.shape[0])
    cpu_gw, cpu_gb = OPS.sparse_linear_grad_weight(g, x, active, weight.shape[0])
    torch.testing.assert_close((gw.cpu(), gb.cpu()), (cpu_gw, cpu_gb), **tol)
    rows, gw_rows, gb_rows = OPS.sparse_linear_grad_weight_rows(g.cuda(), cx, ca)
    cpu_rows, cpu_gw_rows, cpu_gb_rows = OPS.sparse_linear_grad_weight_rows(g, x, active)
    assert torch.equal(rows.cpu(), cpu_rows)
    torch.testing.assert_close((gw_rows.cpu(), gb_rows.cpu()), (cpu_gw_rows, cpu_gb_rows), **tol)
    # no float atomics: the same call gives the same bits
    assert torch.equal(OPS.sparse_linear_grad_weight(g.cuda(), cx, ca, weight.shape[0])[0], gw)
    assert torch.equal(OPS.sparse_linear_grad_input(g.cuda(), cw, ca), gx)


def test_sparse_linear_long_budget_and_unaligned_input():
    # A long budget splits grad_input into chunks; an input at an odd offset takes scalar loads.
    x, weight, bias, active = sparse_problem(batch=2, d=16, n=4000, budget=3000)
    cw, cb, ca = to_cuda(weight, bias, active)
    cx = torch.empty(2 * 16 + 1, device="cuda")[1:].view(2, 16)
    cx.copy_(x)
    assert cx.data_ptr() % 16 != 0
    torch.testing.assert_close(ops.sparse_linear(cx, cw, cb, ca).cpu(), ops.sparse_linear(x, weight, bias, active))
    g = torch.randn(active.shape)
    torch.testing.assert_close(OPS.sparse_linear_grad_input(g.cuda(), cw, ca).cpu(),
                               OPS.sparse_linear_grad_input(g, weight, active), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", HALF)
def test_half_sparse_linear_close_to_float32(dtype):
    x, weight, bias, active = sparse_problem(torch.float32, batch=8, d=64, n=300, budget=50)
    exact = ref.sparse_linear(x, weight, bias, active)
    hx, hw, hb = (t.to(dtype).cuda().requires_grad_() for t in (x, weight, bias))
    out = ops.sparse_linear(hx, hw, hb, active.cuda())
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out.float().cpu(), exact, **tol)
    g = torch.randn(active.shape)
    out.backward(g.to(dtype).cuda())
    fx, fw, fb = (t.clone().requires_grad_() for t in (x, weight, bias))
    ops.sparse_linear(fx.double(), fw.double(), fb.double(), active).backward(g.double())
    torch.testing.assert_close(hx.grad.float().cpu(), fx.grad.float(), **tol)
    torch.testing.assert_close(hw.grad.float().cpu(), fw.grad.float(), **tol)
    torch.testing.assert_close(hb.grad.float().cpu(), fb.grad.float(), **tol)


def test_sparse_linear_gradcheck_float64_cuda():
    x, weight, bias, active = to_cuda(*sparse_problem(torch.float64))
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda x, w, b: ops.sparse_linear(x, w, b, active), inputs)
    assert torch.autograd.gradcheck(lambda x, w: ops.sparse_linear(x, w, None, active), inputs[:2])
    grads = []
    for sparse in (False, True):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        ops.sparse_linear(x, w, b, active, sparse_grad=sparse).pow(2).sum().backward()
        assert w.grad.is_sparse == sparse and w.grad.is_cuda
        grads.append((w.grad.to_dense(), b.grad.to_dense()))
    torch.testing.assert_close(grads[0], grads[1])


def test_sparse_linear_errors_on_cuda():
    x, weight, bias, active = to_cuda(*sparse_problem())
    g = torch.randn(active.shape, device="cuda")
    cases = [
        (lambda: ops.sparse_linear(x, weight, bias, active + 40), "active index \\d+ is outside \\[0, 40\\)"),
        (lambda: ops.sparse_linear(x, weight, bias, active - 40), "outside"),
        (lambda: OPS.sparse_linear_grad_input(g, weight, active + 40), "outside"),
        (lambda: OPS.sparse_linear_grad_weight(g, x, active, 10), "outside \\[0, 10\\)"),
        (lambda: OPS.sparse_linear_grad_weight_rows(g, x, active - 100), "outside"),
        (lambda: ops.sparse_linear(x, weight, bias, active.cpu()), "active must be on"),
        (lambda: ops.sparse_linear(x, weight.cpu(), bias, active), "weight must be on"),
        (lambda: ops.sparse_linear(x, weight[:, :3], bias, active), "features"),
        (lambda: ops.sparse_linear(x.double(), weight, bias, active), "dtype"),
        (lambda: ops.sparse_linear(x, weight, bias, active.int()), "active"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()
    empty = ops.sparse_linear(x[:0], weight, bias, active[:0])
    assert empty.shape == (0, 6) and empty.is_cuda
    rows, gw, gb = OPS.sparse_linear_grad_weight_rows(g[:, :0], x, active[:, :0])
    assert rows.shape == (0,) and gw.shape == (0, 7)


# --- lazy_adam_ -----------------------------------------------------------------------------------

def adam_state(dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    param, m = torch.randn(300, 33, generator=gen).to(dtype), torch.randn(300, 33, generator=gen).to(dtype)
    v = torch.rand(300, 33, generator=gen).to(dtype)
    rows = torch.randperm(300, generator=gen)[:70].sort().values  # the op takes strictly increasing rows
    return param, m, v, rows, torch.randn(70, 33, generator=gen).to(dtype)


@pytest.mark.parametrize("decay", [0.0, 0.01])
@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_lazy_adam_equals_cpu(dtype, decay):
    cpu = list(adam_state(dtype))
    gpu = [t.cuda() for t in cpu]
    expected = [t.clone() for t in cpu[:3]]
    ref.lazy_adam_(*expected, cpu[3], cpu[4], 0.01, 0.9, 0.999, 1e-8, decay)
    ops.lazy_adam_(*cpu, 0.01, 0.9, 0.999, 1e-8, decay)
    ops.lazy_adam_(*gpu, 0.01, 0.9, 0.999, 1e-8, decay)
    for got, want, exact in zip(gpu[:3], cpu[:3], expected):
        assert torch.equal(got.cpu(), want)  # the CPU's operation order, no fused multiply-adds
        torch.testing.assert_close(got.cpu(), exact, **tolerance(dtype))


def test_lazy_adam_errors_on_cuda_and_no_partial_update():
    param, m, v, rows, grad = to_cuda(*adam_state())
    before = param.clone()
    bad = rows.clone()
    bad[-1] = 300
    with pytest.raises(RuntimeError, match="rows must be in .*got 300"):
        ops.lazy_adam_(param, m, v, bad, grad, 0.01, 0.9, 0.999, 1e-8)
    assert torch.equal(param, before)
    with pytest.raises(RuntimeError, match="rows must be on"):
        ops.lazy_adam_(param, m, v, rows.cpu(), grad, 0.01, 0.9, 0.999, 1e-8)
    with pytest.raises(RuntimeError, match="grad_rows"):
        ops.lazy_adam_(param, m, v, rows, grad[:2], 0.01, 0.9, 0.999, 1e-8)


# --- opcheck on CUDA inputs ---------------------------------------------------------------------

def cuda_opcheck_cases():
    """test_ops' cases (every op), moved to the GPU; requires_grad kept so autograd is exercised."""
    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().cuda().requires_grad_(t.requires_grad)
    cases = test_ops.opcheck_cases() + [("lazy_adam_", (*adam_state(), 0.01, 0.9, 0.999, 1e-8)),
                                        ("lazy_adam_", (*adam_state(), 0.01, 0.9, 0.999, 1e-8, 0.01))]
    return [(name, tuple(move(t) for t in args)) for name, args in cases] if torch.cuda.is_available() else cases


@pytest.mark.parametrize("name,args", cuda_opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_cuda(name, args):
    torch.library.opcheck(getattr(OPS, name), args)


# --- LSHLinear on a GPU -------------------------------------------------------------------------

def test_lsh_linear_eval_on_cuda_equals_linear():
    linear = nn.Linear(32, 500).cuda()
    layer = LSHLinear.from_linear(linear, active=40, seed=3).eval()
    x = torch.randn(9, 32, device="cuda")
    assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_lsh_linear_training_on_cuda_equals_cpu(mode):
    # Same weights, same tables (hashed once on the CPU, then moved), same seed and step: the
    # active sets are identical and the outputs and gradients equal to rounding.
    torch.manual_seed(0)
    cpu_layer = LSHLinear(32, 2000, active=64, num_tables=4, bits=6, probes=8, rebuild=None, seed=5, mode=mode)
    cpu_layer.rebuild()
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    x, labels = torch.randn(16, 32), torch.randint(0, 2000, (16,))
    for _ in range(2):  # the per-step seed advances identically
        out_cpu = cpu_layer.forward_sparse(x, labels)
        out_gpu = gpu_layer.forward_sparse(x.cuda(), labels.cuda())
        assert torch.equal(out_gpu.indices.cpu(), out_cpu.indices)
        assert torch.equal(out_gpu.log_weights.cpu(), out_cpu.log_weights)  # the same tail correction
        torch.testing.assert_close(out_gpu.values.cpu(), out_cpu.values)
        for layer, out, lab in ((cpu_layer, out_cpu, labels), (gpu_layer, out_gpu, labels.cuda())):
            layer.zero_grad()
            sparse_cross_entropy(out, lab).backward()
        torch.testing.assert_close(gpu_layer.weight.grad.cpu(), cpu_layer.weight.grad)
        torch.testing.assert_close(gpu_layer.bias.grad.cpu(), cpu_layer.bias.grad)
    dense_cpu, dense_gpu = cpu_layer(x), gpu_layer(x.cuda())
    torch.testing.assert_close(dense_gpu.cpu(), dense_cpu)


def test_lazy_adam_on_cuda_equals_cpu_on_an_lsh_layer():
    cpu_layer = LSHLinear(16, 300, active=32, mode="shared", sparse_grad=True, rebuild=None, seed=3)
    cpu_layer.rebuild()
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    opts = [LazyAdam(cpu_layer.parameters(), lr=0.01), LazyAdam(gpu_layer.parameters(), lr=0.01)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, labels = torch.randn(8, 16, generator=gen), torch.randint(0, 300, (8,), generator=gen)
        for layer, opt, device in zip((cpu_layer, gpu_layer), opts, ("cpu", "cuda")):
            opt.zero_grad()
            sparse_cross_entropy(layer.forward_sparse(x.to(device), labels.to(device)), labels.to(device)).backward()
            opt.step()
    torch.testing.assert_close(gpu_layer.weight.cpu(), cpu_layer.weight)
    torch.testing.assert_close(gpu_layer.bias.cpu(), cpu_layer.bias)


def test_lsh_linear_trains_on_cuda_with_tables_built_there():
    torch.manual_seed(0)
    layer = LSHLinear(24, 3000, active=0.05, seed=1, device="cuda")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x, labels = torch.randn(64, 24, device="cuda"), torch.randint(0, 3000, (64,), device="cuda")
    losses = []
    for _ in range(30):
        loss = sparse_cross_entropy(layer.forward_sparse(x, labels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert layer.tables.items.is_cuda and losses[-1] < losses[0]


@pytest.mark.parametrize("case", test_ops.PROPOSAL_CASES)
def test_proposal_ops_equal_cpu(case):
    """Counter-based draws: the GPU draws the CPU's neurons, entry for entry; the weights agree to rounding."""
    active, heads, cdf, guide = test_ops.proposal_problem(**test_ops.PROPOSAL_CASES[case])
    for tries in (1, 16):
        drawn = ops.proposal_draw(active, heads, cdf, guide, tries, 7)
        on_gpu = ops.proposal_draw(*to_cuda(active, heads, cdf, guide), tries, 7)
        assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), drawn)
        torch.testing.assert_close(ops.proposal_log_weights(*to_cuda(drawn, heads, cdf), tries).cpu(),
                                   ops.proposal_log_weights(drawn, heads, cdf, tries), rtol=1e-6, atol=1e-6)


def test_proposal_ops_errors_on_cuda():
    active, heads, cdf, guide = to_cuda(*test_ops.proposal_problem(heads=[3, 0, 12, 5, 5, 5, 5]))
    bad = active.clone()
    bad[0, 1] = 50
    with pytest.raises(RuntimeError, match="head entries must be neuron ids in \\[0, N = 50\\), got 50 in row 0"):
        ops.proposal_draw(bad, heads, cdf, guide, 4, 0)
    with pytest.raises(RuntimeError, match="head must be in \\[0, A = 12\\], got 13 at row 1"):
        ops.proposal_log_weights(active, heads.index_fill(0, torch.tensor([1], device="cuda"), 13), cdf, 4)
    bad = active.clone()
    bad[1, 4] = -3
    with pytest.raises(RuntimeError, match="active must hold neuron ids in \\[0, N = 50\\), got -3 at \\[1, 4\\]"):
        ops.proposal_log_weights(bad, heads, cdf, 4)
    with pytest.raises(RuntimeError, match="cdf must end in a positive finite total"):
        ops.proposal_draw(active, heads, cdf * 0, guide, 4, 0)
    with pytest.raises(RuntimeError, match="cdf must end in a positive finite total"):  # no rows: checked still
        ops.proposal_log_weights(active[:0], heads[:0], cdf * 0, 4)
    with pytest.raises(RuntimeError, match="cdf must hold cumulative weights .* cdf\\[1\\]"):
        ops.proposal_draw(active, heads, cdf.flip(0), guide, 4, 0)
    with pytest.raises(RuntimeError, match="guide must be on cuda"):
        ops.proposal_draw(active, heads, cdf, guide.cpu(), 4, 0)


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_a_proposal_tail_on_cuda_draws_and_weighs_as_on_cpu(mode):
    """The layer's proposal tail on the GPU: its weights are the CPU op's, and the normaliser's mean over many steps
    is the full one."""
    from lsh_torch.proposal import Proposal, proposal_log_weights
    torch.manual_seed(0)
    counts = torch.arange(400, dtype=torch.float64) ** 2
    layer = LSHLinear(8, 400, active=40, tail=30, mode=mode, sparse_grad=True, tail_proposal=counts, device="cuda")
    x, y = torch.randn(3, 8, device="cuda"), torch.tensor([5, 17, 300], device="cuda")
    with torch.no_grad():
        z = layer.weight @ x.T + layer.bias[:, None]
    estimates = []
    for step in range(1000):
        layer.step = step
        out = layer.forward_sparse(x, y)
        idx = out.indices if mode == "per_row" else out.indices.expand(3, -1)
        lw = out.log_weights if mode == "per_row" else out.log_weights.expand(3, -1)
        estimates.append(torch.exp(z.T.gather(1, idx).double() + lw.double()).sum(1))
    head = (out.log_weights == 0).sum(-1)
    cpu = proposal_log_weights(out.indices.cpu(), head.cpu(), Proposal.of(counts, torch.device("cpu")))
    torch.testing.assert_close(out.log_weights.cpu(), cpu)
    est = torch.stack(estimates)
    stderr = est.std(0) / est.shape[0] ** 0.5
    assert ((est.mean(0) - torch.exp(z.double()).sum(0)).abs() < 4 * stderr).all()
    sparse_cross_entropy(out, y).backward()
    assert layer.weight.grad.is_cuda


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_lsh_linear_refuses_a_bad_label_on_cuda_and_goes_on(mode):
    """The query kernel's ValueError, not a device assertion, which would end the process's CUDA context."""
    layer = LSHLinear(24, 3000, active=64, mode=mode, device="cuda")
    x = torch.randn(8, 24, device="cuda")
    with pytest.raises(ValueError, match="labels must be in .* got 3000"):
        layer.forward_sparse(x, torch.full((8,), 3000, device="cuda"))
    labels = torch.randint(0, 3000, (8,), device="cuda")
    assert torch.isfinite(sparse_cross_entropy(layer.forward_sparse(x, labels), labels)).item()


def test_incremental_rebuild_on_cuda_patches_the_codes_in_place():
    layer = LSHLinear(24, 3000, rebuild=None, device="cuda")
    layer.rebuild()
    codes = layer.tables.codes.data_ptr()
    with torch.no_grad():
        layer.weight[:10] *= 0.5  # a few rows move: merged in, the codes patched
    layer.rebuild()
    assert layer.tables.rehashed == 10 and layer.tables.codes.data_ptr() == codes


def test_xmc_demo_trains_on_cuda():
    # The demo end to end on the GPU (tiny data): every output layer learns far past the
    # most-popular-label baseline, and the sparse runs rebuilt their tables on the device.
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import xmc
    result = xmc.main(["--device", "cuda", "--train-points", "2000", "--test-points", "400", "--labels", "5000", "--active", "512",
                       "--features", "3000", "--epochs", "3", "--dense-epochs", "2", "--warmup-epochs", "1",
                       "--eval-every", "0.5", "--json", "", "--plot", ""])
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"lsh-shared", "random-shared", "dense"}
    for run in runs.values():
        assert run["final"]["P@1"] > 3 * result["popular"]["P@1"], run["name"]
    assert runs["lsh-shared"]["rebuilds"] > 0
