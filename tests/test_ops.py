"""Every op against tests/reference.py, opcheck on every op, gradcheck of sparse_linear, and input validation."""
import math

import pytest
import torch

import reference as ref
from lsh_torch import hashing, ops

OPS = torch.ops.lsh_torch


def random_tables(n=300, d=16, num_tables=4, bits=5, batch=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, d, generator=gen)
    x = torch.randn(batch, d, generator=gen)
    proj = torch.randn(d + 1, num_tables * bits, generator=gen)
    codes, _ = ops.hash_codes(ops.mips_transform(weight, False) @ proj, num_tables, bits)
    offsets, items = ops.build_tables(codes, bits)
    qcodes, qmargins = ops.hash_codes(ops.mips_transform(x, True) @ proj, num_tables, bits)
    return qcodes, qmargins, offsets, items


# --- mips_transform ---------------------------------------------------------------------------

@pytest.mark.parametrize("query", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mips_transform_matches_reference(query, dtype):
    rows = torch.randn(50, 9, dtype=dtype)
    rows[3] = 0  # a zero row must not divide by zero
    torch.testing.assert_close(ops.mips_transform(rows, query), ref.mips_transform(rows, query))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mips_transform_with_a_given_max_norm(dtype):
    rows = torch.randn(30, 6, dtype=dtype)
    m = 1.3 * rows.double().norm(dim=1).max()
    got = ops.mips_transform(rows, False, m)
    torch.testing.assert_close(got, ref.mips_transform(rows, False, m))
    # Rows transformed apart with one M equal the rows transformed together.
    torch.testing.assert_close(torch.cat([ops.mips_transform(rows[:7], False, m), ops.mips_transform(rows[7:], False, m)]),
                               got, rtol=0, atol=0)


def test_mips_transform_takes_the_largest_norm_as_torch_computes_it():
    """The kernel sums the squares in another order than torch.linalg.vector_norm: a max_norm computed
    by it was refused in 80 of 200 random cases, the message showing two equal numbers."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows = torch.randn(200, 16, generator=gen) * 7
        got = ops.mips_transform(rows, False, torch.linalg.vector_norm(rows, dim=1).max().reshape(1))
        assert torch.isfinite(got).all() and got[:, -1].min() >= 0
    with pytest.raises(RuntimeError, match=r"at most max_norm .* above it"):
        ops.mips_transform(rows, False, torch.linalg.vector_norm(rows, dim=1).max().reshape(1) / 1.01)


@pytest.mark.parametrize("query", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mips_transform_of_rows_whose_squares_leave_float32s_range(query, dtype):
    """Squares summed in float32 overflowed from norms of about 1e19 (a finite row refused as non-finite) and
    underflowed below about 1e-19 (every row read 0 and hashed alike); such rows are scaled first."""
    rows = torch.randn(20, 7).to(dtype)
    rows[5] = 0
    for scale in (1e20, 1e-25):
        scaled = rows * scale
        torch.testing.assert_close(ops.mips_transform(scaled, query), ref.mips_transform(scaled.double(), query).to(dtype))


def test_mips_transform_lets_non_finite_queries_through():
    out = ops.mips_transform(torch.tensor([[1.0, float("nan")], [3.0, 4.0]]), True)
    assert out[0].isnan().any() and torch.allclose(out[1], torch.tensor([0.6, 0.8, 0.0]))


def test_mips_transform_preserves_inner_product_order():
    w, x = torch.randn(200, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    pw, qx = ops.mips_transform(w, False), ops.mips_transform(x[None], True)[0]
    assert torch.allclose(pw.norm(dim=1), torch.ones(200, dtype=torch.float64))  # all on the unit sphere
    assert torch.equal(torch.argsort(w @ x), torch.argsort(pw @ qx))


# --- row_topk ------------------------------------------------------------------------------------

def special_scores():
    """Ties, both zeros, infinities and NaNs of either sign."""
    s = torch.randint(-3, 4, (6, 300)).float()
    s[0, 5] = s[0, 250] = float("nan")
    s[1] = -0.0
    s[1, ::3] = 0.0
    s[2, 7], s[2, 8] = float("inf"), float("-inf")
    s[3, 9] = -float("nan")
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,width,k", [(3, 5000, 7), (4, 4096, 300), (5, 40, 40), (2, 1, 1), (0, 9, 3), (4, 9, 0),
                                           (7, 3000, 2900)])
def test_row_topk_matches_reference(dtype, batch, width, k):
    # Wide rows with a small k take the sampled threshold; the others every entry.
    scores = torch.randn(batch, width).to(dtype)
    torch.testing.assert_close(ops.row_topk(scores, k), ref.row_topk(scores, k), rtol=0, atol=0)


@pytest.mark.parametrize("k", [0, 1, 17, 150, 300])
def test_row_topk_orders_ties_zeros_infinities_and_nans_as_a_stable_descending_sort(k):
    scores = special_scores()
    expected = ref.row_topk(scores, k)
    assert torch.equal(ops.row_topk(scores, k), expected)
    assert torch.equal(scores.sort(dim=1, descending=True, stable=True).indices[:, :k], expected)
    assert torch.equal(ops.row_topk(scores.double(), k), expected)


def test_row_topk_takes_the_whole_row_where_the_sampled_threshold_keeps_too_few():
    # The threshold is read off every 16th entry of a 4,096 row: where those are the row's largest, it keeps about
    # 17 of them, fewer than k = 100, and the kernel must fall back to every entry. Ascending rows put the top at the end.
    spiked = torch.randn(3, 4096)
    spiked[:, ::16] += 100
    ascending = torch.arange(4096.0).repeat(2, 1)
    for scores in (spiked, ascending, -ascending):
        assert torch.equal(ops.row_topk(scores, 100), ref.row_topk(scores, 100))


def test_row_topk_is_torch_topk_up_to_the_order_of_ties():
    scores = torch.randn(64, 2048)
    values, _ = scores.topk(33, dim=1)
    assert torch.equal(scores.gather(1, ops.row_topk(scores, 33)), values)


# --- row_fingerprints ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 7, 8, 130])  # around the kernel's 8 partial sums
def test_row_fingerprints_match_reference(dtype, d):
    rows, vector = torch.randn(33, d).to(dtype), torch.randn(d)
    torch.testing.assert_close(ops.row_fingerprints(rows, vector), ref.row_fingerprints(rows, vector),
                               rtol=1e-5, atol=1e-5)
    assert ops.row_fingerprints(rows[:0], vector).shape == (0,)
    moved = rows.clone()
    moved[5, d // 2] += 0.5
    changed = ops.row_fingerprints(moved, vector) != ops.row_fingerprints(rows, vector)
    assert changed.nonzero().flatten().tolist() == [5]


# --- hash_codes and build_tables --------------------------------------------------------------

@pytest.mark.parametrize("num_tables,bits", [(1, 1), (5, 6), (3, 20)])
def test_hash_codes_match_reference(num_tables, bits):
    proj = torch.randn(33, num_tables * bits)
    proj[0, 0], proj[1, 1 % (num_tables * bits)] = float("nan"), 0.0
    codes, margins = ops.hash_codes(proj, num_tables, bits)
    ref_codes, ref_margins = ref.hash_codes(proj, num_tables, bits)
    assert codes.dtype == torch.int32 and margins.dtype == torch.float32
    assert torch.equal(codes, ref_codes) and torch.equal(margins, ref_margins)
    # Rows' codes (margins=False): the same codes, no margins.
    row_codes, no_margins = ops.hash_codes(proj.bfloat16(), num_tables, bits, margins=False)
    assert torch.equal(row_codes, ref.hash_codes(proj.bfloat16(), num_tables, bits)[0])
    assert no_margins.shape == (33, 0) and no_margins.dtype == torch.float32


# --- dwta_codes ------------------------------------------------------------------------------------

def dwta_problem(n=33, d=24, num_tables=3, hashes=2, bin_size=8, dtype=torch.float32, seed=0):
    """Rows with the cases the kernel must handle: ReLU zeros (empty bins), an all-zero row, ties,
    NaN and infinities; and seeded bins."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=gen, dtype=torch.float64).relu().to(dtype)  # about half zeros
    rows[1] = 0  # every bin empty: code 0
    rows[2, : d // 2] = 0  # some bins empty, densified
    rows[3] = rows[3].round()  # ties: lowest position wins
    if n > 6:
        rows[4, 0], rows[5, 1], rows[6, 2] = float("nan"), float("inf"), -float("inf")
    bins = hashing.make_bins(d, num_tables * hashes, bin_size, seed)
    return rows, bins


@pytest.mark.parametrize("num_tables,hashes,bin_size", [(1, 1, 2), (3, 2, 8), (2, 3, 4), (4, 1, 16), (1, 5, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dwta_codes_match_reference(num_tables, hashes, bin_size, dtype):
    rows, bins = dwta_problem(num_tables=num_tables, hashes=hashes, bin_size=bin_size, dtype=dtype)
    codes, margins = ops.dwta_codes(rows, bins, num_tables)
    ref_codes, ref_margins = ref.dwta_codes(rows, bins, num_tables)
    bits = hashes * (bin_size.bit_length() - 1)
    assert codes.dtype == torch.int32 and margins.dtype == torch.float32
    assert codes.shape == (33, num_tables) and margins.shape == (33, num_tables * bits)
    assert torch.equal(codes, ref_codes) and torch.equal(margins, ref_margins)
    assert ((codes >= 0) & (codes < 2 ** bits)).all() and (margins >= 0).all()
    assert (codes[1] == 0).all() and (margins[1] == 0).all()  # an all-zero row


def test_dwta_codes_semantics():
    """Hash = argmax position inside the bin; margin = gap to the entry that flipping the bit reaches;
    an empty bin takes the hash of a non-empty one."""
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.5, 0.1, 0.2, 0.3]])
    bins = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])  # H = 2 hashes of 2 bits: K = 4
    codes, margins = ops.dwta_codes(x, bins, 1)
    assert codes.tolist() == [[1 | 0 << 2]]  # argmax 1 (3.0) in bin 0, argmax 0 (0.5) in bin 1
    torch.testing.assert_close(margins, torch.tensor([[3.0 - 0.0, 3.0 - 2.0, 0.5 - 0.1, 0.5 - 0.2]]))
    # Bin 1 empty: it borrows bin 0's hash (the only non-empty one) and its margins.
    x[0, 4:] = 0
    codes, margins = ops.dwta_codes(x, bins, 1)
    assert codes.tolist() == [[1 | 1 << 2]] and torch.equal(margins[0, 2:], margins[0, :2])
    # Scale-blind: a positive multiple hashes alike; ranks, not values, decide.
    y = torch.randn(5, 8)
    assert torch.equal(ops.dwta_codes(y, bins, 2)[0], ops.dwta_codes(3 * y, bins, 2)[0])
    assert torch.equal(ops.dwta_codes(y, bins, 2)[0], ops.dwta_codes(y.pow(3), bins, 2)[0])
    assert ops.dwta_codes(y[:0], bins, 2)[0].shape == (0, 2)


def test_dwta_densification_is_the_same_for_every_row():
    """Rows with the same empty bins borrow from the same bins (the order depends on the bin, not
    the row), so rows that rank their non-empty bins alike get equal codes."""
    d, bins = 64, hashing.make_bins(64, 40, 4, seed=5)
    a = torch.randn(d).abs() + 0.1
    empty = bins[:10].flatten()  # the first 10 bins: 40 distinct dimensions of one permutation
    a[empty] = 0
    rows = torch.stack([torch.ones(d), a, 2 * a])
    codes = ops.dwta_codes(rows, bins, 10)[0]
    assert torch.equal(codes[1], codes[2])
    assert torch.equal(codes, ref.dwta_codes(rows, bins, 10)[0])


@pytest.mark.parametrize("bits", [1, 4, 10])
def test_build_tables_match_reference(bits):
    codes = torch.randint(0, 2 ** bits, (500, 3), dtype=torch.int32)
    offsets, items = ops.build_tables(codes, bits)
    ref_offsets, ref_items = ref.build_tables(codes, bits)
    assert torch.equal(offsets, ref_offsets) and torch.equal(items, ref_items)
    table_major = ops.build_tables(codes.t().contiguous().t(), bits)  # the layout LSHTables keeps
    assert torch.equal(table_major[0], ref_offsets) and torch.equal(table_major[1], ref_items)


def moved_rows(n=400, num_tables=3, bits=5, moved=60, seed=0):
    """Codes of n rows, their tables, and `moved` rows (sorted) with new codes."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, num_tables), dtype=torch.int32, generator=gen)
    rows = torch.randperm(n, generator=gen)[:moved].sort().values
    new_codes = torch.randint(0, 2 ** bits, (moved, num_tables), dtype=torch.int32, generator=gen)
    return codes, rows, new_codes


@pytest.mark.parametrize("bits,moved", [(1, 30), (5, 0), (5, 60), (5, 400), (10, 7)])
def test_update_tables_equal_a_build_of_the_new_codes(bits, moved):
    codes, rows, new_codes = moved_rows(bits=bits, moved=moved)
    offsets, items = ops.build_tables(codes, bits)
    updated_codes = codes.clone()
    updated_codes[rows] = new_codes
    got = ops.update_tables(offsets, items, rows, codes[rows], new_codes)
    for value, built, slow in zip(got, ops.build_tables(updated_codes, bits),
                                  ref.update_tables(offsets, items, rows, codes[rows], new_codes)):
        assert torch.equal(value, built) and torch.equal(value, slow)
    # Codes given as column views of table-major codes (what LSHTables passes) read the same.
    table_major = updated_codes.t().contiguous()
    again = ops.update_tables(offsets, items, rows, codes.t().contiguous()[:, rows].t(), table_major[:, rows].t())
    assert all(torch.equal(a, b) for a, b in zip(again, got))


def test_update_tables_refuse_tables_that_do_not_match_old_codes():
    codes, rows, new_codes = moved_rows()
    offsets, items = ops.build_tables(codes, 5)
    wrong_old = (codes[rows] + 1) % 32
    with pytest.raises(RuntimeError, match="do not match old_codes"):
        ops.update_tables(offsets, items, rows, wrong_old, new_codes)
    # One row said to leave bucket 0 of table 0 where it is not: caught before anything is written past its bucket.
    with pytest.raises(RuntimeError, match="do not match old_codes"):
        ops.update_tables(*ops.build_tables(torch.tensor([[1], [1], [0]], dtype=torch.int32), 1), torch.tensor([0]),
                          torch.tensor([[0]], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int32))
    # Row 2 said to leave bucket 1, above every id there (for a later bucket): the bucket's copies must stop
    # at its room instead of running past it before the row is missed.
    with pytest.raises(RuntimeError, match="do not match old_codes"):
        ops.update_tables(*ops.build_tables(torch.tensor([[1], [1], [0]], dtype=torch.int32), 2),
                          torch.tensor([0, 2]), torch.tensor([[1], [1]], dtype=torch.int32),
                          torch.tensor([[3], [3]], dtype=torch.int32))


def test_update_tables_leave_rows_whose_code_did_not_change():
    # Rows 0 and 2 keep their code in table 0 and change it in table 1: table 0 is copied as it was, and a
    # wrong old code there goes unchecked (nothing moves); table 1's is still caught.
    offsets, items = ops.build_tables(torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.int32), 1)
    rows, new = torch.tensor([0, 2]), torch.tensor([[1, 1], [0, 0]], dtype=torch.int32)
    got = ops.update_tables(offsets, items, rows, torch.tensor([[1, 0], [0, 1]], dtype=torch.int32), new)
    expected = ops.build_tables(torch.tensor([[1, 1], [1, 1], [0, 0]], dtype=torch.int32), 1)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert torch.equal(ops.update_tables(offsets, items, rows, new, new)[1], items)  # no code changed: a copy
    with pytest.raises(RuntimeError, match="do not match old_codes"):
        ops.update_tables(offsets, items, rows, torch.tensor([[1, 1], [0, 0]], dtype=torch.int32),
                          torch.tensor([[1, 0], [0, 1]], dtype=torch.int32))


def test_rebuilds_swap_two_buffers_and_stay_right():
    """Tables from 1 MB on come from freed ones of the same size (fresh pages cost rebuilds 70-190 ms at 670K
    outputs); a reused buffer holds the new tables, not a trace of the old."""
    codes, rows, new_codes = moved_rows(n=100_000, num_tables=4, bits=8, moved=3_000)  # items: 1.6 MB
    tables = ops.build_tables(codes, 8)
    buffers = {tables[1].data_ptr()}
    for step in range(1, 5):
        updated = codes.clone()
        updated[rows] = new_codes
        tables = ops.update_tables(*tables, rows, codes[rows], new_codes)  # the old ones freed here
        assert all(torch.equal(a, b) for a, b in zip(tables, ref.build_tables(updated, 8)))
        buffers.add(tables[1].data_ptr())
        assert len(buffers) == 2  # the build's and the first update's, in turns
        codes = updated
        rows, new_codes = moved_rows(n=100_000, num_tables=4, bits=8, moved=3_000, seed=step)[1:]
    small = ops.build_tables(codes[:100], 8)[1]  # below 1 MB: the usual allocator
    assert small.data_ptr() not in buffers


# --- query --------------------------------------------------------------------------------------

LABELS = torch.tensor([[3, -1], [5, 5], [-1, -1], [0, 1], [2, 7], [9, -1], [299, 298]])


def assert_same(got, expected):
    """Query outputs (active set, head) equal."""
    assert len(got) == len(expected) == 2
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), (got, expected)


@pytest.mark.parametrize("probes,budget,labels,tail", [
    (1, 10, None, 0),         # exact buckets only
    (6, 40, LABELS, 0),       # labels first, duplicates and padding dropped
    (32, 300, LABELS, 0),     # every bucket probed, budget == N: the fill walks to the end
    (10, 250, None, 0),       # budget close to N: the random draws give way to the walk
    (10, 0, None, 0),         # empty budget
    (32, 40, LABELS, 20),     # half the budget reserved for the uniform tail
    (32, 40, LABELS, 39),     # the tail leaves less room than the labels: labels still all in
    (32, 40, None, 40),       # all tail: a uniform sample
])
def test_query_matches_reference(probes, budget, labels, tail):
    qcodes, qmargins, offsets, items = random_tables()
    active, head = ops.query(qcodes, qmargins, offsets, items, probes, budget, labels, 123, tail)
    assert_same((active, head), ref.query(qcodes, qmargins, offsets, items, probes, budget, labels, 123, tail))
    assert head.shape == (7,) and head.dtype == torch.int64
    distinct_labels = [len({l for l in r if l >= 0}) for r in labels.tolist()] if labels is not None else [0] * 7
    for h, forced in zip(head.tolist(), distinct_labels):  # the tail's room is kept unless labels need it
        assert forced <= h <= max(budget - tail, forced)
    for row in active.tolist():
        assert len(set(row)) == len(row) and all(0 <= i < 300 for i in row)
    if labels is not None:
        for row, labs in zip(active.tolist(), labels.tolist()):
            distinct = list(dict.fromkeys(l for l in labs if l >= 0))
            assert row[: len(distinct)] == distinct


@pytest.mark.parametrize("probes,budget,labels,tail", [(1, 10, None, 0), (6, 40, LABELS, 0), (32, 300, LABELS, 0),
                                                       (10, 250, None, 0), (32, 60, LABELS, 30), (32, 60, None, 60)])
def test_query_shared_matches_reference(probes, budget, labels, tail):
    qcodes, qmargins, offsets, items = random_tables()
    indices, head = ops.query_shared(qcodes, qmargins, offsets, items, probes, budget, labels, 77, tail)
    assert_same((indices, head), ref.query_shared(qcodes, qmargins, offsets, items, probes, budget, labels, 77, tail))
    assert head.shape == () and int(head) <= max(budget - tail, 10)  # 10 distinct labels in LABELS
    assert indices.shape == (budget,) and len(set(indices.tolist())) == budget
    if labels is not None:
        distinct = list(dict.fromkeys(l for l in labels.flatten().tolist() if l >= 0))
        assert indices[: len(distinct)].tolist() == distinct


@pytest.mark.parametrize("bits", [5, 12])  # buckets few for the probes (counted per bucket) and many (sorted)
def test_query_shared_of_a_large_batch_on_any_thread_count(bits):
    # More rows than a thread's task (kRowsPerTask, 64): the rows' probe sequences are computed in parallel.
    qcodes, qmargins, offsets, items = random_tables(n=500, bits=bits, batch=300, seed=6)
    expected = ref.query_shared(qcodes, qmargins, offsets, items, 3, 120, LABELS[:3].repeat(100, 1), 9, 40)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert_same(ops.query_shared(qcodes, qmargins, offsets, items, 3, 120, LABELS[:3].repeat(100, 1), 9, 40),
                        expected)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_query_shared_counts_a_bucket_probed_by_many_rows_once_per_probe(threads):
    # The kernel reads a bucket that several rows probe once, adding as many hits: 60 rows, 3
    # distinct ones repeated 30, 20 and 10 times, so that the buckets' weights differ; 60
    # neurons over 2^8 buckets leave most buckets empty, and an empty bucket begins where the next
    # one does (a merge by start alone would add an empty bucket's probes to its neighbour).
    qcodes, qmargins, offsets, items = random_tables(n=60, bits=8, batch=3, seed=4)
    order = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    qcodes, qmargins, labels = qcodes[order], qmargins[order], LABELS[:3][order]
    assert ((offsets[:, 1:] - offsets[:, :-1]) == 0).float().mean() > 0.5
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for probes, budget, tail in [(1, 20, 0), (3, 30, 10), (8, 45, 5)]:
            assert_same(ops.query_shared(qcodes, qmargins, offsets, items, probes, budget, labels, 5, tail),
                        ref.query_shared(qcodes, qmargins, offsets, items, probes, budget, labels, 5, tail))
    finally:
        torch.set_num_threads(previous)


def test_query_refuses_buckets_whose_ids_do_not_ascend():
    # A shared query's parts read their own id range of each bucket, found as if the ids ascend (as
    # every build and update leaves them): reversed buckets would be miscounted, differently for each
    # thread count, so both queries refuse them (280 probed buckets: two parts on two threads).
    qcodes, qmargins, offsets, items = random_tables()
    reversed_items = items.clone()
    for table, bounds in enumerate(offsets.tolist()):
        for begin, end in zip(bounds[:-1], bounds[1:]):
            reversed_items[table, begin:end] = items[table, begin:end].flip(0)
    for query in (ops.query, ops.query_shared):
        with pytest.raises(RuntimeError, match="ids in each bucket of items must ascend"):
            query(qcodes, qmargins, offsets, reversed_items, 10, 250, LABELS, 77, 0)
        reference = ref.query if query is ops.query else ref.query_shared  # and the counters were left clean:
        assert_same(query(qcodes, qmargins, offsets, items, 10, 250, LABELS, 77, 0),
                    reference(qcodes, qmargins, offsets, items, 10, 250, LABELS, 77, 0))


def no_tables(batch=7, n=300, bits=5):
    """L = 0 tables over n neurons: valid input, no candidates, so the sets are labels plus fill."""
    return (torch.zeros(batch, 0, dtype=torch.int32), torch.zeros(batch, 0),
            torch.zeros(0, 2 ** bits + 1, dtype=torch.int32), torch.zeros(0, n, dtype=torch.int32))


def test_query_without_tables_is_labels_and_fill():
    args = no_tables()
    for op, reference in ((ops.query, ref.query), (ops.query_shared, ref.query_shared)):
        active, head = op(*args, 4, 9, LABELS, 5)
        assert_same((active, head), reference(*args, 4, 9, LABELS, 5))
        assert (head == (torch.tensor([1, 1, 0, 2, 2, 1, 2]) if op is ops.query else 9)).all()  # labels only


def test_query_after_a_failed_query_is_still_exact():
    # The kernels reuse per-thread hit counters; an error mid-query must leave them zeroed.
    args = random_tables()
    with pytest.raises(RuntimeError, match="more distinct labels"):
        ops.query_shared(*args, 8, 3, LABELS, 1)
    expected = ref.query_shared(*args, 8, 60, None, 1)
    assert_same(ops.query_shared(*args, 8, 60, None, 1), expected)
    # Failing while counting (the last row's last code is out of range), with the batch large
    # enough for query_shared to count in parallel: the counters touched before are zeroed too.
    codes, margins, offsets, items = random_tables(batch=40)
    broken = codes.clone()
    broken[-1, -1] = 99
    for op in (ops.query, ops.query_shared):
        with pytest.raises(RuntimeError, match="codes must be in"):
            op(broken, margins, offsets, items, 8, 60, None, 1)
    for op, reference in ((ops.query, ref.query), (ops.query_shared, ref.query_shared)):
        assert_same(op(codes, margins, offsets, items, 8, 60, None, 1),
                    reference(codes, margins, offsets, items, 8, 60, None, 1))


def test_probe_sequence_matches_enumeration():
    # A probe order with exact ties in the margins (zeros) is still the enumerated order.
    for margin in [torch.rand(6), torch.zeros(6), torch.tensor([0.5, 0.1, 0.5, 0.0, 2.0, 0.1])]:
        codes = torch.zeros(1, 1, dtype=torch.int32)
        offsets, items = ops.build_tables(torch.arange(64, dtype=torch.int32)[:, None], 6)
        # one neuron per bucket and budget == probes: active = the probed buckets in probe order
        active, _ = ops.query(codes, margin[None], offsets, items, 12, 12, None, 0)
        assert sorted(active[0].tolist()) == sorted(ref.probe_flips(margin, 6, 12))


def test_query_ranks_by_bucket_hits():
    # Neuron 0 is in the query's bucket in all 3 tables, neuron 1 in 2, neuron 2 in 1.
    codes = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.int32)
    offsets, items = ops.build_tables(codes, 1)
    q = torch.zeros(1, 3, dtype=torch.int32)
    active, head = ops.query(q, torch.ones(1, 3), offsets, items, 1, 3, None, 7)
    assert active[0].tolist() == [0, 1, 2] and head.tolist() == [3]
    active, head = ops.query(q, torch.ones(1, 3), offsets, items, 1, 3, None, 7, 2)  # room for the best only
    assert active[0, 0] == 0 and head.tolist() == [1]


def wide_tables(n, num_tables, bits, batch=3, seed=0):
    """Tables over more neurons than the query keeps counters for in the L2 cache, or over more than
    a row probes (it then counts repeats only: ActiveSetBuilder::count_repeats): every other neuron has the same code in every
    table, so the rows' buckets hold neurons hit in every table as well as neurons hit once."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, num_tables), dtype=torch.int32, generator=gen)
    codes[::2] = codes[::2, :1]
    sources = torch.randint(0, n // 2, (batch,), generator=gen) * 2  # the rows' best neurons
    labels = torch.tensor([[-1, 4095, n - 1]] + [[int(s), 4096, -100] for s in sources[1:]])
    margins = torch.rand(batch, num_tables * bits, generator=gen)
    return (codes[sources], margins, *ops.build_tables(codes, bits)), labels


@pytest.mark.parametrize("n,num_tables,bits,batch,probes,budget,tail", [
    (300_001, 3, 12, 3, 1, 40, 0),     # one-byte counters over 256 KB: some rows have enough repeats,
    (300_001, 3, 12, 3, 3, 40, 10),    # ... all rows,
    (300_001, 3, 12, 3, 2, 300, 0),    # ... none: the neurons hit once are candidates too
    (300_001, 8, 8, 3, 1, 1000, 0),    # ... those whose keys fall below a threshold, thousands hit once
    (300_001, 8, 8, 3, 1, 1000, 300),
    (140_000, 255, 8, 1, 1, 300, 0),   # two-byte counters (L > 253)
    (20_000, 8, 7, 3, 1, 300, 0),      # counters in L2, but a row's entries under 0.6 N
    (20_000, 8, 7, 3, 2, 2_000, 100),  # ... with thousands hit once among the best
    (20_000, 8, 7, 3, 1, 500, 200),    # ... a tail beside them
    (20_000, 40, 5, 3, 2, 300, 0),     # entries over 0.6 N: every hit counted (count())
])
def test_query_of_a_wide_layer_matches_reference(n, num_tables, bits, batch, probes, budget, tail):
    args, labels = wide_tables(n, num_tables, bits, batch)
    for lab, keys in ((None, None), (labels, None), (labels, torch.tensor([-7, 2 ** 40, 3])[:batch])):
        assert_same(ops.query(*args, probes, budget, lab, 3, tail, keys),
                    ref.query(*args, probes, budget, lab, 3, tail, keys))


def test_query_of_a_wide_layer_lists_every_neuron_hit_once_where_its_threshold_leaves_too_few():
    """Where the neurons hit twice are too few, the query lists the neurons hit once whose tie-break keys
    fall below a threshold, counting them from the entries the repeats do not hold, which labels' entries
    make too many. Here 200 labels hit in every table, 20 neurons hit in two, and 400 hit once, of which
    the set needs 80: the threshold passes fewer (the premise, from the reference's keys), so all are listed."""
    n, num_tables, budget, seed = 300_001, 4, 300, 5
    codes = torch.randint(2, 256, (n, num_tables), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    codes[:200] = 0  # the labels: in the row's bucket of every table
    once, twice = torch.arange(200, 600), torch.arange(600, 620)
    codes[once] = 1
    codes[once, once % num_tables] = 0  # in the row's bucket of one table
    codes[twice] = 1
    codes[twice, :2] = 0
    offsets, items = ops.build_tables(codes, 8)
    query, margins = torch.zeros(2, num_tables, dtype=torch.int32), torch.rand(2, num_tables * 8)
    labels = torch.arange(200).expand(2, 200)
    entries, needed = 200 * num_tables + len(once) + 2 * len(twice), budget - 200 - len(twice)
    threshold = (2 * needed + 32) / (entries - 2 * len(twice)) * 2.0 ** 64
    for row in (0, 1):
        passed = sum(ref.seeded_hash(seed, ref.TIE_BREAK, row, i) <= threshold for i in once.tolist())
        assert len(twice) + passed >= needed > passed  # too few pass, though with the repeats enough would
    active, head = ops.query(query, margins, offsets, items, 1, budget, labels, seed, 0)
    assert_same((active, head), ref.query(query, margins, offsets, items, 1, budget, labels, seed, 0))
    assert head.tolist() == [budget, budget] and set(active[0, 200:].tolist()) <= set(torch.cat([once, twice]).tolist())


def test_query_of_a_wide_layer_refuses_buckets_whose_ids_do_not_ascend():
    (codes, margins, offsets, items), labels = wide_tables(300_001, 3, 12)
    begin, end = offsets[1, codes[0, 1]], offsets[1, codes[0, 1] + 1]
    broken = items.clone()
    broken[1, begin:end] = items[1, begin:end].flip(0)
    with pytest.raises(RuntimeError, match="ids in each bucket of items must ascend"):
        ops.query(codes, margins, offsets, broken, 2, 40, labels, 3, 0)
    assert_same(ops.query(codes, margins, offsets, items, 2, 40, labels, 3, 0),  # counters left clean
                ref.query(codes, margins, offsets, items, 2, 40, labels, 3, 0))


def test_query_is_deterministic_per_seed_and_varies_across_seeds():
    args = random_tables(n=300)
    a1, _ = ops.query(*args, 4, 200, None, 5)
    assert torch.equal(a1, ops.query(*args, 4, 200, None, 5)[0])
    assert not torch.equal(a1, ops.query(*args, 4, 200, None, 6)[0])


@pytest.mark.parametrize("probes,budget,labels,tail", [(1, 10, None, 0), (6, 40, LABELS, 0), (10, 250, None, 0),
                                                       (32, 40, LABELS, 20)])
def test_query_row_keys_replace_the_row_index(probes, budget, labels, tail):
    """A row's tie-break and draws were keyed by its index in the batch: the same row got another set at
    another place. Keyed by row_keys[b], a row's set moves with it, whatever its place."""
    codes, margins, offsets, items = random_tables()
    keys = torch.tensor([5, -3, 2 ** 62, 0, 5, 77, -(2 ** 63)])  # repeated, negative, extreme: all valid
    active, head = ops.query(codes, margins, offsets, items, probes, budget, labels, 9, tail, keys)
    assert_same((active, head), ref.query(codes, margins, offsets, items, probes, budget, labels, 9, tail, keys))
    # The rows' indices as keys are the default.
    assert_same(ops.query(codes, margins, offsets, items, probes, budget, labels, 9, tail, torch.arange(7)),
                ops.query(codes, margins, offsets, items, probes, budget, labels, 9, tail))
    # Rows (with their labels and keys) reordered, or queried alone: their sets reordered, unchanged.
    def rows(index):
        return ops.query(codes[index], margins[index], offsets, items, probes, budget,
                         None if labels is None else labels[index], 9, tail, keys[index])

    order = torch.tensor([3, 6, 0, 2, 5, 1, 4])
    assert_same(rows(order), (active[order], head[order]))
    for b in range(7):
        assert_same(rows(slice(b, b + 1)), (active[b:b + 1], head[b:b + 1]))


# --- sparse_linear ------------------------------------------------------------------------------

def sparse_problem(dtype=torch.float32, batch=5, d=7, n=40, budget=6):
    x = torch.randn(batch, d, dtype=dtype)
    weight = torch.randn(n, d, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    active = torch.stack([torch.randperm(n)[:budget] for _ in range(batch)])
    active[1, :3] = active[0, :3]  # rows shared across samples accumulate
    return x, weight, bias, active


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("budget", [6, 20])  # 20: rows fetched ahead (kRowsAhead) in every row of active
def test_sparse_linear_matches_reference(dtype, with_bias, budget):
    x, weight, bias, active = sparse_problem(dtype, budget=budget)
    bias = bias if with_bias else None
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ops.sparse_linear(x, weight, bias, active), ref.sparse_linear(x, weight, bias, active), **tol)
    g = torch.randn(active.shape, dtype=dtype)
    torch.testing.assert_close(OPS.sparse_linear_grad_input(g, weight, active),
                               ref.sparse_linear_grad_input(g, weight, active), **tol)
    gw, gb = OPS.sparse_linear_grad_weight(g, x, active, weight.shape[0])
    ref_gw, ref_gb = ref.sparse_linear_grad_weight(g, x, active, weight.shape[0])
    torch.testing.assert_close(gw, ref_gw, **tol)
    torch.testing.assert_close(gb, ref_gb, **tol)
    rows, gw_rows, gb_rows = OPS.sparse_linear_grad_weight_rows(g, x, active)
    ref_rows, ref_gw_rows, ref_gb_rows = ref.sparse_linear_grad_weight_rows(g, x, active)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(gw_rows, ref_gw_rows, **tol)
    torch.testing.assert_close(gb_rows, ref_gb_rows, **tol)


def test_sparse_linear_grad_weight_rows_groups_rows_of_every_width():
    """The kernel groups the pairs by row with a radix sort, 11 bits a pass over the bits in use: rows on
    both sides of each pass's digits, up to 2^31 - 2, each summed in the pairs' order."""
    distinct = torch.tensor([0, 5, 2_047, 2_048, 2_049, 4_194_303, 4_194_304, 2 ** 31 - 2])
    gen = torch.Generator().manual_seed(3)
    places = torch.stack([torch.randperm(len(distinct), generator=gen)[:5] for _ in range(9)])
    x, g = torch.randn(9, 4, dtype=torch.float64, generator=gen), torch.randn(9, 5, dtype=torch.float64, generator=gen)
    rows, gw, gb = OPS.sparse_linear_grad_weight_rows(g, x, distinct[places])
    ref_places, ref_gw, ref_gb = ref.sparse_linear_grad_weight_rows(g, x, places)  # the same sums, by place
    assert torch.equal(rows, distinct[ref_places])
    torch.testing.assert_close((gw, gb), (ref_gw, ref_gb))
    # The largest row once, last: the passes follow its bits.
    rows, gw, _ = OPS.sparse_linear_grad_weight_rows(torch.ones(1, 2), torch.ones(1, 3), torch.tensor([[1, 2048]]))
    assert rows.tolist() == [1, 2048]


@pytest.mark.parametrize("with_bias", [True, False])
def test_shared_linear_matches_reference(with_bias):
    x, weight, bias, _ = sparse_problem()
    bias = bias if with_bias else None
    indices = torch.randperm(40)[:9]
    torch.testing.assert_close(ops.shared_linear(x, weight, bias, indices), ref.shared_linear(x, weight, bias, indices))


def test_shared_linear_gradcheck_and_sparse_grad():
    x, weight, bias, _ = sparse_problem(torch.float64)
    indices = torch.randperm(40)[:9]
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda x, w, b: ops.shared_linear(x, w, b, indices), inputs)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ops.shared_linear(x, w, b, indices, sparse_grad=True).pow(2).sum().backward()
    assert w.grad.is_sparse and b.grad.is_sparse
    inputs[1].grad = inputs[2].grad = None
    ops.shared_linear(x, inputs[1], inputs[2], indices).pow(2).sum().backward()
    torch.testing.assert_close((w.grad.to_dense(), b.grad.to_dense()), (inputs[1].grad, inputs[2].grad))


def test_shared_linear_sums_the_gradients_of_repeated_indices():
    """index_copy_ kept one copy of a repeated row's gradient; the sparse path claimed to be coalesced."""
    x, weight, bias, _ = sparse_problem(torch.float64)
    indices = torch.tensor([7, 1, 7, 30, 1, 1])
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda x, w, b: ops.shared_linear(x, w, b, indices), inputs)
    ops.shared_linear(*inputs, indices).sum().backward()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    sparse = torch.autograd.grad(ops.shared_linear(x, w, b, indices, sparse_grad=True).sum(), (w, b))
    assert inputs[1].grad[1].allclose(3 * x.sum(0)) and inputs[2].grad[7].item() == 2 * x.shape[0]
    torch.testing.assert_close((sparse[0].to_dense(), sparse[1].to_dense()), (inputs[1].grad, inputs[2].grad))
    assert not sparse[0].is_coalesced() and sparse[0].coalesce()._indices().tolist() == [[1, 7, 30]]


def test_sparse_linear_gradcheck_float64():
    x, weight, bias, active = sparse_problem(torch.float64)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(lambda x, w, b: ops.sparse_linear(x, w, b, active), inputs)
    assert torch.autograd.gradcheck(lambda x, w: ops.sparse_linear(x, w, None, active), inputs[:2])


def test_sparse_grad_equals_dense_grad():
    x, weight, bias, active = sparse_problem(torch.float64)
    grads = []
    for sparse in (False, True):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        ops.sparse_linear(x, w, b, active, sparse_grad=sparse).pow(2).sum().backward()
        assert w.grad.is_sparse == sparse and b.grad.is_sparse == sparse
        grads.append((w.grad.to_dense(), b.grad.to_dense()))
    torch.testing.assert_close(grads[0], grads[1])
    # only the touched rows carry a gradient
    touched = torch.zeros(weight.shape[0], dtype=torch.bool)
    touched[active.flatten()] = True
    assert torch.all(grads[0][0][~touched] == 0) and torch.all(grads[0][0][touched].abs().sum(1) > 0)


def test_sparse_linear_empty_batch():
    x, weight, bias, _ = sparse_problem()
    out = ops.sparse_linear(x[:0].requires_grad_(), weight, bias, torch.zeros(0, 6, dtype=torch.long))
    assert out.shape == (0, 6)


def ref_codes_of(offsets, items):
    """The codes [N, L] that tables were built from (each item's bucket)."""
    codes = torch.empty(items.shape[1], items.shape[0], dtype=torch.int32)
    for l in range(items.shape[0]):
        counts = offsets[l, 1:] - offsets[l, :-1]
        codes[items[l].long(), l] = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), counts)
    return codes


# --- proposal_draw and proposal_log_weights ------------------------------------------------------

def proposal_problem(rows=7, width=12, n=50, heads=None, heavy=False, seed=0):
    """A set whose first heads[r] entries of row r are distinct neurons, a proposal over n (most of its mass on the
    heads where ``heavy``), and its draw weights as the layer builds them."""
    from lsh_torch.proposal import Proposal
    g = torch.Generator().manual_seed(seed)
    heads = torch.randint(0, width + 1, (rows,), generator=g) if heads is None else torch.as_tensor(heads)
    active = torch.stack([torch.randperm(n, generator=g)[:width] for _ in range(rows)])
    counts = torch.rand(n, generator=g, dtype=torch.float64) ** 4 * 1e4
    if heavy:
        for r in range(rows):
            counts[active[r, :heads[r]]] = 1e10
    proposal = Proposal.of(counts, torch.device("cpu"))
    return active, heads, proposal.cdf, proposal.guide


PROPOSAL_CASES = {
    "per row": dict(),
    "shared": dict(rows=1, width=40, n=60, heads=[30]),
    "heads 0 and full": dict(heads=[0, 12, 3, 12, 0, 5, 11]),
    "heavy heads": dict(heavy=True),
    "one neuron": dict(rows=2, width=1, n=1, heads=[1, 0]),
    "wide": dict(rows=3, width=64, n=5000, heads=[10, 0, 63]),
}


@pytest.mark.parametrize("case", PROPOSAL_CASES)
@pytest.mark.parametrize("tries", [1, 16])
def test_proposal_ops_match_reference(case, tries):
    active, heads, cdf, guide = proposal_problem(**PROPOSAL_CASES[case])
    drawn = ops.proposal_draw(active, heads, cdf, guide, tries, seed=3)
    assert torch.equal(drawn, ref.proposal_draw(active, heads, cdf, guide, tries, 3))
    columns = torch.arange(active.shape[1])
    in_head = columns < heads.unsqueeze(1)
    assert torch.equal(drawn[in_head], active[in_head])  # the heads are kept
    torch.testing.assert_close(ops.proposal_log_weights(drawn, heads, cdf, tries),
                               ref.proposal_log_weights(drawn, heads, cdf, tries), rtol=1e-6, atol=1e-6)
    assert not torch.equal(drawn, ops.proposal_draw(active, heads, cdf, guide, tries, seed=4)) or case == "one neuron"


def test_proposal_draws_keep_drawing_while_they_hit_the_head():
    """The head holds 90% of the proposal's mass: one try ends on it 90% of the time, 16 tries 0.9^16 = 18.5%, and
    only the entries left on the head are weighted -inf."""
    from lsh_torch.proposal import Proposal
    counts = torch.zeros(50, dtype=torch.float64)
    counts[:5] = 81 ** 2 - 1  # draw weights sqrt(count + 1): 5 x 81 against 45 x 1
    proposal = Proposal.of(counts, torch.device("cpu"))
    active = torch.cat([torch.arange(5), torch.arange(5, 45)]).expand(200, -1).contiguous()
    heads = torch.full((200,), 5)
    for tries, share in ((1, 0.9), (16, 0.9 ** 16)):
        drawn = ops.proposal_draw(active, heads, proposal.cdf, proposal.guide, tries, 0)
        lw = ops.proposal_log_weights(drawn, heads, proposal.cdf, tries)
        on_head = drawn[:, 5:] < 5
        assert abs(float(on_head.float().mean()) - share) < 0.02
        assert torch.equal(lw[:, 5:] == -math.inf, on_head) and (lw[:, :5] == 0).all()


def test_proposal_draws_take_any_guide_and_any_thread_count():
    """The guide is where a search begins: a wrong one (out of range, reversed, constant) gives the same draws."""
    active, heads, cdf, guide = proposal_problem(rows=20, width=30, n=3000)
    expected = ops.proposal_draw(active, heads, cdf, guide, 16, 1)
    for other in (torch.zeros(1, dtype=torch.int32), guide.flip(0), guide + 10 ** 6, guide - 10 ** 6,
                  torch.full((7,), 2999, dtype=torch.int32)):
        assert torch.equal(ops.proposal_draw(active, heads, cdf, other, 16, 1), expected)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.proposal_draw(active, heads, cdf, guide, 16, 1), expected)
    finally:
        torch.set_num_threads(threads)


def test_proposal_draws_follow_the_proposal():
    """With an empty head, each entry is one draw: counts per neuron match the proposal (chi-square)."""
    active, heads, cdf, guide = proposal_problem(rows=400, width=50, n=40, heads=[0] * 400)
    q = torch.diff(cdf, prepend=cdf.new_zeros(1)) / cdf[-1]
    counted = torch.bincount(ops.proposal_draw(active, heads, cdf, guide, 1, 5).flatten(), minlength=40).double()
    expected = q * active.numel()
    assert ((counted - expected) ** 2 / expected).mean() < 2  # about 1 (a chi-square's mean)


@pytest.mark.parametrize("op", ["proposal_draw", "proposal_log_weights"])
def test_proposal_ops_refuse_bad_input(op):
    active, heads, cdf, guide = proposal_problem(heads=[3, 0, 12, 5, 5, 5, 5])

    def call(active=active, heads=heads, cdf=cdf, guide=guide, tries=16):
        if op == "proposal_draw":
            return ops.proposal_draw(active, heads, cdf, guide, tries, 0)
        return ops.proposal_log_weights(active, heads, cdf, tries)

    bad_head_id = active.clone()
    bad_head_id[0, 1] = 50
    cases = [
        (dict(heads=heads.clone().index_fill_(0, torch.tensor([2]), 13)), "head must be in \\[0, A = 12\\], got 13"),
        (dict(heads=heads - 1), "head must be in"),
        (dict(active=bad_head_id), "head entries must be neuron ids in \\[0, N = 50\\), got 50"),
        (dict(cdf=cdf * 0), "cdf must end in a positive finite total"),
        (dict(cdf=cdf.flip(0)), "cdf must hold cumulative weights .* got cdf\\[1\\]"),  # decreasing
        (dict(cdf=cdf.index_fill(0, torch.tensor([7]), math.inf)), "cdf must hold cumulative weights .* cdf\\[7\\] = inf"),
        (dict(cdf=cdf.index_fill(0, torch.tensor([9]), math.nan)), "cdf must hold cumulative weights .* cdf\\[9\\] = nan"),
        (dict(cdf=cdf - cdf[0] - 1), "cdf must hold cumulative weights .* got cdf\\[0\\]"),  # negative
        (dict(cdf=cdf.float()), "cdf must be a float64"),
        (dict(active=active.int()), "active must be an int64"),
        (dict(heads=heads[:3]), "head must be an int64 \\[R\\] tensor with R = 7"),
        (dict(tries=0), "tries must be in \\[1, 64\\]"),
        (dict(tries=65), "tries must be in \\[1, 64\\]"),
    ]
    if op == "proposal_draw":
        cases.append((dict(guide=guide.long()), "guide must be an int32"))
    else:
        bad_tail_id = active.clone()
        bad_tail_id[1, 4] = -3
        cases.append((dict(active=bad_tail_id), "active must hold neuron ids in \\[0, N = 50\\), got -3 at \\[1, 4\\]"))
        flat = cdf.clone()
        flat[active[1, 4]] = flat[active[1, 4] - 1] if active[1, 4] > 0 else 0.0  # neuron active[1, 4]: no mass
        cases.append((dict(cdf=flat), f"tail entry {int(active[1, 4])} at .* has no proposal mass"))
    for kwargs, pattern in cases:
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            call(**kwargs)
    with pytest.raises(TypeError, match="tries must be an int"):
        call(tries=True)
    with pytest.raises(ValueError, match="tries must fit in int64"):
        call(tries=2 ** 63)
    if op == "proposal_draw":
        with pytest.raises(ValueError, match="seed must fit in int64"):
            ops.proposal_draw(active, heads, cdf, guide, 16, -2 ** 63 - 1)
        ops.proposal_draw(active, heads, cdf, guide, 16, -2 ** 63)  # the schema's whole int64 range is a seed


# --- opcheck on every op ------------------------------------------------------------------------

def opcheck_cases():
    qcodes, qmargins, offsets, items = random_tables()
    codes = torch.randint(0, 32, (100, 4), dtype=torch.int32)
    x, weight, bias, active = sparse_problem()
    g = torch.randn(active.shape)
    return [
        ("mips_transform", (torch.randn(20, 5), False)),
        ("mips_transform", (torch.randn(20, 5), True)),
        ("mips_transform", (torch.randn(20, 5), False, torch.tensor(100.0))),
        ("hash_codes", (torch.randn(20, 12), 3, 4)),
        ("hash_codes", (torch.randn(20, 12, dtype=torch.bfloat16), 3, 4, False)),
        ("dwta_codes", dwta_problem(n=20)[:2] + (3,)),
        ("dwta_codes", dwta_problem(n=20, dtype=torch.float64, num_tables=2, hashes=1, bin_size=16)[:2] + (2,)),
        ("build_tables", (codes, 5)),
        ("build_tables", (codes.t().contiguous().t(), 5)),  # a table-major layout, as LSHTables keeps its codes
        ("update_tables", (*ops.build_tables(codes, 5), torch.tensor([2, 7, 50]), codes[[2, 7, 50]],
                           torch.randint(0, 32, (3, 4), dtype=torch.int32))),
        ("row_fingerprints", (torch.randn(20, 5), torch.randn(5))),
        ("row_fingerprints", (torch.randn(20, 5, dtype=torch.float64), torch.randn(5))),
        ("row_topk", (torch.randn(6, 50), 7)),
        ("row_topk", (torch.randn(3, 2000, dtype=torch.float64), 5)),
        ("row_topk", (special_scores(), 20)),
        ("query", (qcodes, qmargins, offsets, items, 5, 20, LABELS, 3)),
        ("query", (qcodes, qmargins, offsets, items, 5, 20, None, 3)),
        ("query", (qcodes, qmargins, offsets, items, 5, 20, LABELS, 3, 10)),
        ("query", (qcodes, qmargins, offsets, items, 5, 20, LABELS, 3, 10, torch.arange(7) * 1000 - 3)),
        ("query_shared", (qcodes, qmargins, offsets, items, 5, 20, LABELS, 3)),
        ("query_shared", (qcodes, qmargins, offsets, items, 5, 30, None, 3, 15)),
        ("shared_linear", (x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_(),
                           torch.randperm(40)[:9])),
        ("shared_linear", (x.detach(), weight.detach(), None, torch.randperm(40)[:9])),
        ("sparse_linear", (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), active)),
        ("sparse_linear", (x.detach(), weight.detach(), None, active)),
        ("sparse_linear_grad_input", (g, weight.detach(), active)),
        ("sparse_linear_grad_weight", (g, x.detach(), active, 40)),
        ("sparse_linear_grad_weight_rows", (g, x.detach(), active)),
        ("proposal_draw", (*proposal_problem(), 16, 3)),
        ("proposal_draw", (proposal_problem(rows=12, width=7)[0].t(), *proposal_problem(rows=7, width=12)[1:], 4, 0)),
        ("proposal_draw", (*proposal_problem(rows=1, width=40, n=60, heads=[30]), 1, -5)),
        ("proposal_log_weights", (*proposal_problem()[:3], 16)),
        ("proposal_log_weights", (*proposal_problem(heavy=True)[:3], 2)),
    ]


@pytest.mark.parametrize("name,args", opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(OPS, name), args)


# --- bad input gets a clear error naming the argument -----------------------------------------

def test_op_input_errors():
    qcodes, qmargins, offsets, items = random_tables()
    ucodes = ref_codes_of(offsets, items)
    x, weight, bias, active = sparse_problem()
    cases = [
        (lambda: ops.hash_codes(torch.randn(3, 12), 3, 5), "L\\*K"),
        (lambda: ops.mips_transform(torch.tensor([[1.0, float("nan")]]), False), "finite"),
        (lambda: ops.hash_codes(torch.randn(3, 21), 1, 21), "bits"),
        (lambda: ops.hash_codes(torch.randn(3, 0), 0, 6), "num_tables"),
        (lambda: ops.hash_codes(torch.ones(3, 4, dtype=torch.int64), 1, 4), "floating"),
        (lambda: ops.build_tables(torch.full((4, 2), 40, dtype=torch.int32), 5), "codes must be in"),
        (lambda: ops.mips_transform(torch.ones(2, 4), False, torch.tensor(1.5)), "at most max_norm"),
        (lambda: ops.mips_transform(torch.ones(2, 4), True, torch.tensor(5.0)), "query=False"),
        (lambda: ops.mips_transform(torch.ones(2, 4), False, torch.tensor(0.0)), "positive"),
        (lambda: ops.mips_transform(torch.ones(2, 4), False, torch.ones(2)), "one element"),
        (lambda: ops.row_fingerprints(torch.randn(4, 3), torch.randn(4)), "vector"),
        (lambda: ops.row_fingerprints(torch.randn(4, 3), torch.randn(3, dtype=torch.float64)), "float32"),
        (lambda: ops.row_fingerprints(torch.randn(12), torch.randn(3)), "rows"),
        (lambda: ops.row_fingerprints(torch.ones(4, 3, dtype=torch.int32), torch.randn(3)), "floating"),
        (lambda: ops.row_topk(torch.randn(4, 3), 4), "k must be in \\[0, U = 3\\], got 4"),
        (lambda: ops.row_topk(torch.randn(4, 3), -1), "k must be in"),
        (lambda: ops.row_topk(torch.ones(4, 3, dtype=torch.int64), 2), "scores must be a floating \\[B, U\\]"),
        (lambda: ops.row_topk(torch.randn(12), 2), "scores must be a floating \\[B, U\\]"),
        (lambda: ops.build_tables(torch.zeros(4, 2, dtype=torch.int64), 5), "int32"),
        (lambda: ops.update_tables(offsets, items, torch.tensor([5, 3]), ucodes[[5, 3]], ucodes[[5, 3]]),
         "rows must be strictly increasing"),
        (lambda: ops.update_tables(offsets, items, torch.tensor([300]), ucodes[:1], ucodes[:1]), "rows must be in"),
        (lambda: ops.update_tables(offsets, items, torch.tensor([3]), ucodes[3:4], ucodes[3:4] + 32),
         "new_codes must be in"),
        (lambda: ops.update_tables(offsets, items, torch.tensor([3], dtype=torch.int32), ucodes[3:4], ucodes[3:4]),
         "rows must be int64"),
        (lambda: ops.update_tables(offsets, items, torch.tensor([3]), ucodes[3:4], ucodes[3:4, :2]),
         "new_codes must be int32 \\[R, L\\]"),
        (lambda: ops.update_tables(offsets[:, :-1], items, torch.tensor([3]), ucodes[3:4], ucodes[3:4]),
         "2\\^K \\+ 1 columns"),
        (lambda: ops.update_tables(offsets, items[:, 1:], torch.tensor([3]), ucodes[3:4], ucodes[3:4]),
         "offsets of table \\d+ must run from 0 to N"),
        (lambda: ops.update_tables(torch.tensor([[0, 4, 4]], dtype=torch.int32),
                                   torch.tensor([[3, 2, 1, 0]], dtype=torch.int32), torch.tensor([3]),
                                   torch.tensor([[0]], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int32)),
         "ascending ids"),
        (lambda: ops.dwta_codes(torch.randn(4, 6), torch.tensor([[0, 6]]), 1), "bins must hold dimension indices"),
        (lambda: ops.dwta_codes(torch.randn(4, 6), torch.tensor([[0, -1]]), 1), "bins must hold dimension indices"),
        (lambda: ops.dwta_codes(torch.randn(4, 6), torch.zeros(2, 3, dtype=torch.long), 1), "power-of-two bin_size"),
        (lambda: ops.dwta_codes(torch.randn(4, 6), torch.zeros(3, 2, dtype=torch.long), 2), "multiple of num_tables"),
        (lambda: ops.dwta_codes(torch.randn(4, 6), torch.zeros(7, 8, dtype=torch.long), 1), "at most 20"),
        (lambda: ops.dwta_codes(torch.randn(4, 6), torch.zeros(2, 2, dtype=torch.int32), 1), "bins must be int64"),
        (lambda: ops.dwta_codes(torch.ones(4, 6, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 1), "rows"),
        (lambda: ops.dwta_codes(torch.randn(4, 6), torch.zeros(2, 2, dtype=torch.long), 0), "num_tables"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 0, 5), "probes"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 301), "budget"),
        (lambda: ops.query(qcodes, qmargins[:, :3], offsets, items, 4, 5), "margins"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, torch.zeros(6, 1, dtype=torch.long)), "labels"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 1, LABELS), "more distinct labels"),
        (lambda: ops.query(qcodes, qmargins, offsets, items.clamp_max(-1), 4, 5), "items"),
        (lambda: ops.query(qcodes, qmargins, offsets.flip(1), items, 4, 5), "offsets"),
        (lambda: ops.query(qcodes + 64, qmargins, offsets, items, 4, 5), "codes must be in"),
        (lambda: ops.query_shared(qcodes - 64, qmargins, offsets, items, 4, 5), "query_shared: codes must be in"),
        (lambda: ops.query(qcodes, -qmargins - 1, offsets, items, 4, 5), "query: margins must be >= 0"),
        (lambda: ops.query_shared(qcodes, -qmargins - 1, offsets, items, 4, 5), "query_shared: margins must be >= 0"),
        (lambda: ops.query_shared(qcodes, qmargins, offsets, items, 4, 5, LABELS),
         "query_shared: the batch has more distinct labels"),
        (lambda: ops.query_shared(qcodes, qmargins, offsets, items, 4, 301), "budget"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 6), "tail must be in"),
        (lambda: ops.query_shared(qcodes, qmargins, offsets, items, 4, 5, None, 0, -1), "tail must be in"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 0, torch.arange(7).int()),
         "row_keys must be int64 \\[B\\] with B = 7"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 0, torch.arange(6)), "row_keys"),
        (lambda: ops.shared_linear(x, weight, bias, torch.tensor([40])), "indices"),
        (lambda: ops.shared_linear(x, weight, bias, torch.tensor([[1]])), "indices"),
        (lambda: ops.shared_linear(x, weight[:, :2], bias, torch.tensor([1])), "features"),
        (lambda: ops.sparse_linear(x, weight[:, :3], bias, active), "features"),
        (lambda: ops.sparse_linear(x.double(), weight, bias, active), "dtype"),
        (lambda: ops.sparse_linear(x, weight, bias, active + 40), "outside"),
        (lambda: ops.sparse_linear(x, weight, bias, active.int()), "active"),
        (lambda: ops.sparse_linear(x, weight, bias[:3], active), "bias"),
        (lambda: ops.sparse_linear(x[:2], weight, bias, active), "batch"),
        # Found by fuzzing (issue 13): these were accepted and returned garbage or did nothing.
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 0, LABELS), "more distinct labels than the budget 0"),
        (lambda: ops.query_shared(qcodes, qmargins, offsets, items, 4, 0, LABELS), "the batch has more distinct"),
        (lambda: ops.mips_transform(torch.ones(2, 4), False, torch.tensor(1e39, dtype=torch.float64)), "at most"),
        (lambda: ops.shared_linear(x.long(), weight.long(), None, torch.tensor([1])), "floating"),
        (lambda: OPS.sparse_linear_grad_weight(x[:, :1], x, active[:, :1], 2 ** 32 + 2), "num_rows"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()
    with pytest.raises(TypeError, match="row_topk: k must be an int, got 2.0"):
        ops.row_topk(torch.randn(4, 3), 2.0)
    for label in (300, -5):  # a bad value: ValueError, as the exact softmax's Python check says it
        with pytest.raises(ValueError, match=f"labels must be in .* -1 / -100 for padding, got {label}"):
            ops.query(qcodes, qmargins, offsets, items, 4, 5, torch.full((7, 1), label))


def test_fake_kernels_refuse_what_the_kernels_refuse():
    # On the meta device (and so under torch.compile / torch.export) the fake kernels run instead of
    # the kernels: shapes, dtypes and limits must be refused there too, not given an output shape.
    qcodes, qmargins, offsets, items = (t.to("meta") for t in random_tables())
    x, weight, bias, active = (t.to("meta") for t in sparse_problem())
    param, rows = torch.zeros(30, 4, device="meta"), torch.zeros(4, dtype=torch.int64, device="meta")
    cases = [
        (lambda: ops.hash_codes(torch.empty(5, 13, device="meta"), 3, 4), "L\\*K"),
        (lambda: ops.hash_codes(torch.empty(5, 0, device="meta"), 0, 4), "num_tables"),
        (lambda: ops.build_tables(torch.zeros(5, 2, device="meta"), 5), "codes must be torch.int32"),
        (lambda: ops.build_tables(torch.zeros(5, 2, dtype=torch.int32, device="meta"), 30), "bits"),
        (lambda: ops.row_fingerprints(torch.zeros(4, 3, device="meta"), torch.zeros(4, device="meta")), "vector"),
        (lambda: ops.row_topk(torch.zeros(4, 3, device="meta"), 4), "k must be in \\[0, U = 3\\]"),
        (lambda: ops.row_topk(torch.zeros(4, 3, dtype=torch.int32, device="meta"), 2), "scores must be floating"),
        (lambda: ops.update_tables(offsets, items, rows.int(), qcodes[:4], qcodes[:4]), "rows must be torch.int64"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 301), "budget"),
        (lambda: ops.query_shared(qcodes.float(), qmargins, offsets, items, 4, 5), "codes must be torch.int32"),
        (lambda: ops.query(qcodes, qmargins[:, :3], offsets, items, 4, 5), "margins"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 0, 5), "probes"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 6), "tail"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 0, qcodes[:, 0]),
         "row_keys must be torch.int64"),
        (lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 0, rows), "row_keys must be int64 \\[B\\]"),
        (lambda: ops.sparse_linear(x, weight, bias, active.float()), "active must be torch.int64"),
        (lambda: ops.sparse_linear(x[:2], weight, bias, active), "batch"),
        (lambda: ops.shared_linear(x, weight, bias[:3], active[0]), "bias"),
        (lambda: ops.shared_linear(x, weight, bias, active[0].float()), "indices"),
        (lambda: ops.lazy_adam_(param, param.clone(), param.clone(), rows, torch.zeros(4, 4, device="meta"),
                                0.1, 2.0, 0.99, 1e-8), "beta1"),
        (lambda: ops.lazy_adam_(param, param.clone(), param.clone(), rows, torch.zeros(3, 4, device="meta"),
                                0.1, 0.9, 0.99, 1e-8), "grad_rows"),
        # found by a review: limits only the kernels checked
        (lambda: ops.lazy_adam_(param, param, param.clone(), rows, torch.zeros(4, 4, device="meta"),
                                0.1, 0.9, 0.99, 1e-8), "share memory"),
        (lambda: ops.lazy_adam_(param.t(), param.t().clone(), param.t().clone(), rows[:2],
                                torch.zeros(2, 30, device="meta"), 0.1, 0.9, 0.99, 1e-8), "contiguous"),
        (lambda: ops.mips_transform(torch.zeros(4, 3, device="meta"), True, torch.ones(1, device="meta")), "query"),
        (lambda: ops.mips_transform(torch.zeros(4, 3, device="meta"), False, torch.ones(2, device="meta")),
         "one element"),
        (lambda: ops.dwta_codes(torch.zeros(4, 3, device="meta"),
                                torch.zeros(7, 8, dtype=torch.int64, device="meta"), 1), "K = H"),
        (lambda: ops.dwta_codes(torch.zeros(4, 0, device="meta"),
                                torch.zeros(2, 8, dtype=torch.int64, device="meta"), 1), "d >= 1"),
        (lambda: ops.update_tables(offsets[:, :-1], items, rows, qcodes[:4], qcodes[:4]), "2\\^K"),
        (lambda: ops.update_tables(offsets, items[:, :3], rows, qcodes[:4], qcodes[:4]), "more rows"),
        (lambda: ops.query(qcodes[:, :1].expand(-1, 1025), qmargins, offsets[:1].expand(1025, -1),
                           items[:1].expand(1025, -1), 4, 5), "num_tables"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_ops_refuse_inputs_on_another_device():
    """A meta tensor among CPU ones used to run the shape-only kernel: uninitialised outputs."""
    qcodes, qmargins, offsets, items = random_tables()
    x, weight, bias, active = sparse_problem()
    param = torch.zeros(5, 3)
    cases = [
        lambda: ops.query_shared(qcodes, qmargins, offsets, items, 4, 5, LABELS.to("meta")),
        lambda: ops.query(qcodes.to("meta"), qmargins, offsets, items, 4, 5),
        lambda: ops.query(qcodes, qmargins, offsets, items, 4, 5, None, 0, 0, torch.arange(7, device="meta")),
        lambda: ops.sparse_linear(x, weight.to("meta"), bias, active),
        lambda: ops.shared_linear(x, weight, bias.to("meta"), torch.tensor([1])),
        lambda: ops.lazy_adam_(param, param.clone(), param.clone(), torch.tensor([1]), torch.ones(1, 3, device="meta"),
                               0.1, 0.9, 0.999, 1e-8),
    ]
    for fn in cases:
        with pytest.raises(RuntimeError, match="device"):
            fn()


def test_query_takes_ignore_index_as_padding():
    qcodes, qmargins, offsets, items = random_tables()
    with_minus_one = ops.query(qcodes, qmargins, offsets, items, 4, 20, LABELS, seed=3)
    ignored = ops.query(qcodes, qmargins, offsets, items, 4, 20, LABELS.masked_fill(LABELS < 0, -100), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(with_minus_one, ignored))


def test_double_backward_float64():
    """Gradient penalties: the backward ops are differentiable too (gradgradcheck)."""
    x, weight, bias, active = sparse_problem(torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradgradcheck(lambda x, w, b: ops.sparse_linear(x, w, b, active), inputs)
    assert torch.autograd.gradgradcheck(lambda x, w: ops.sparse_linear(x, w, None, active), inputs[:2])
    assert torch.autograd.gradgradcheck(lambda x, w, b: ops.shared_linear(x, w, b, active[0]), inputs)
    g = torch.randn(active.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda g, w: OPS.sparse_linear_grad_input(g, w, active), (g, inputs[1]))
    assert torch.autograd.gradgradcheck(lambda g, x: OPS.sparse_linear_grad_weight(g, x, active, 40), (g, inputs[0]))


@pytest.mark.parametrize("linear", ["sparse_linear", "shared_linear", "linear"])
@pytest.mark.parametrize("upstream", ["quadratic", "linear"])
def test_double_backward_of_row_sparse_gradients_float64(linear, upstream):
    """Gradient penalties under sparse_grad=True: the gradients of a penalty on the first gradients (of
    x, the weight and the bias) equal the dense gradients' (gradgradchecked above) and stay row-sparse.
    A loss linear in the output gives a first backward whose incoming gradient needs no graph: marked
    once-differentiable, its weight-dependent part was silently dropped (the weight's gradient was wrong)."""
    x, weight, bias, active = sparse_problem(torch.float64)
    index = {"sparse_linear": (active,), "shared_linear": (active[0],), "linear": ()}[linear]
    scale = torch.randn_like(getattr(ops, linear)(x, weight, bias, *index))

    def gradients(sparse_grad):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = getattr(ops, linear)(*inputs, *index, sparse_grad=sparse_grad)
        loss = out.pow(2).sum() if upstream == "quadratic" else (out * scale).sum()
        first = torch.autograd.grad(loss, inputs, create_graph=True)
        assert [g.is_sparse for g in first] == [False, sparse_grad, sparse_grad]
        penalty = sum((g.to_dense() if g.is_sparse else g).pow(2).sum() for g in first)
        (loss + penalty).backward()
        assert [t.grad.is_sparse for t in inputs] == [False, sparse_grad, sparse_grad]
        return [t.grad.to_dense() for t in inputs]

    for sparse, dense in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(sparse, dense)


def test_query_shared_ranks_by_exact_hits_in_batches_beyond_16_bit_counts():
    """Neuron 0 sits in both tables' probed bucket, neuron 1 in one: 2B hits against B. Counters of 16
    bits saturated at 65,534, so from B = 32,768 the two tied and the seed chose (12 of 20 seeds
    picked neuron 1 at B = 70,000)."""
    offsets, items = ops.build_tables(torch.tensor([[0, 0], [0, 1]], dtype=torch.int32), 1)
    batch = 70_000
    codes, margins = torch.zeros(batch, 2, dtype=torch.int32), torch.ones(batch, 2)
    for seed in range(6):
        assert ops.query_shared(codes, margins, offsets, items, 1, 1, None, seed)[0].tolist() == [0]


def test_query_shared_ranks_counts_past_the_histogram_by_hits_then_key():
    """Counts past 65,535 share the hit histogram's last level, whose block is ranked by hits and then the
    tie-break key: neuron 0 (2B hits) first, then neurons 1 and 2 (B each) in the key's order, as with few rows."""
    offsets, items = ops.build_tables(torch.tensor([[0, 0], [0, 1], [1, 0]], dtype=torch.int32), 1)
    for seed in range(8):  # both orders of 1 and 2 among them
        sets = [ops.query_shared(torch.zeros(batch, 2, dtype=torch.int32), torch.ones(batch, 2), offsets, items, 1, 3,
                                 None, seed)[0].tolist() for batch in (3, 70_000)]
        assert sets[0] == sets[1] and sets[0][0] == 0 and sorted(sets[0]) == [0, 1, 2]


def test_query_refuses_nan_margins():
    qcodes, qmargins, offsets, items = random_tables()
    qmargins[2, 3] = float("nan")
    for query in (ops.query, ops.query_shared):
        with pytest.raises(RuntimeError, match="margins must be >= 0"):
            query(qcodes, qmargins, offsets, items, 4, 5)


@pytest.mark.parametrize("op", ["mips_transform", "hash_codes", "dwta_codes", "row_fingerprints"])
def test_a_backward_through_an_op_without_a_derivative_raises_naming_it(op):
    """Their floating outputs required grad and a backward left the input without a gradient, silently."""
    rows = torch.randn(4, 6, requires_grad=True)
    out = {"mips_transform": lambda: torch.ops.lsh_torch.mips_transform(rows, True),
           "hash_codes": lambda: torch.ops.lsh_torch.hash_codes(rows, 2, 3)[1],
           "dwta_codes": lambda: torch.ops.lsh_torch.dwta_codes(rows, torch.randint(0, 6, (2, 4)), 1)[1],
           "row_fingerprints": lambda: torch.ops.lsh_torch.row_fingerprints(rows, torch.randn(6))}[op]()
    with pytest.raises(RuntimeError, match=f"derivative for lsh_torch::{op} is not implemented"):
        out.sum().backward()
