"""The sampled softmax's estimator: labels | hashed top set | uniform tail with corrected logits.

The tail's correction log((N - head) / (A - head)) makes sum(exp(logit + log_weight)) over the
active set an unbiased estimate of the full softmax's normaliser sum(exp(logit)) over all N
neurons, whatever the head is (docs/estimator.md). These tests check that claim numerically, the
layout the loss relies on, and that the loss applies it.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
import lsh_torch
from lsh_torch import LSHLinear, SparseOutput, ops, sparse_cross_entropy
from lsh_torch.nn import BATCH_POOL_ROWS


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_tail_log_weights_match_reference(shape):
    head = torch.randint(0, 20, shape)
    torch.testing.assert_close(ops.tail_log_weights(head, 20, 300), ref.tail_log_weights(head, 20, 300))


@pytest.mark.parametrize("head,budget,n,error,pattern", [
    (torch.tensor([-3]), 4, 100, ValueError, r"head must be in \[0, budget\] = \[0, 4\], got -3"),  # weighted every entry, labels too
    (torch.tensor([12]), 10, 100, ValueError, r"head must be in \[0, budget\] = \[0, 10\], got 12"),  # all zeros
    (torch.tensor([2.5]), 4, 100, TypeError, "head must be an integer tensor"),
    (torch.tensor([2]), 10, 5, ValueError, r"budget must be in \[0, n = 5\]"),  # negative log-weights
    (torch.tensor([0]), -1, 100, ValueError, r"budget must be in \[0, n = 100\]"),
    (torch.tensor([0]), True, 100, TypeError, "budget must be an int"),
])
def test_tail_log_weights_refuses_what_no_query_returns(head, budget, n, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.tail_log_weights(head, budget, n)


def test_a_loss_over_an_empty_active_set_is_refused():
    with pytest.raises(ValueError, match="at least one active output"):
        sparse_cross_entropy(SparseOutput(torch.randn(2, 0), torch.zeros(0, dtype=torch.long)), torch.tensor([-1, -1]))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_forward_sparse_layout_head_then_uniform_tail(mode):
    n, budget, tail = 500, 40, 25
    layer = LSHLinear(16, n, active=budget, tail=tail, mode=mode, num_tables=8, probes=4)
    x, labels = torch.randn(6, 16), torch.randint(0, n, (6,))
    out = layer.forward_sparse(x, labels)
    lw = out.log_weights if mode == "per_row" else out.log_weights.expand(6, -1)
    idx = out.indices if mode == "per_row" else out.indices.expand(6, -1)
    for row in range(6):
        head = int((lw[row] == 0).sum())
        assert head <= budget - tail or head == (1 if mode == "per_row" else labels.unique().numel())
        assert (lw[row, :head] == 0).all()  # labels and hashed candidates: not corrected
        assert torch.allclose(lw[row, head:], torch.full((budget - head,), math.log((n - head) / (budget - head))))
        assert labels[row] in idx[row, :head].tolist()  # the label is in the head, never in the tail


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_corrected_normaliser_is_unbiased(mode):
    # Over many seeds, the mean of sum(exp(z + log_weights)) over the active set equals the full
    # sum(exp(z)); the uncorrected sum falls far short. Logits with a heavy head, as in a softmax.
    torch.manual_seed(0)
    n, budget, tail = 400, 40, 30
    layer = LSHLinear(8, n, active=budget, tail=tail, mode=mode, num_tables=4, probes=2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        z = layer.weight @ x.T * 3 + layer.bias[:, None]  # [n, 3]
    full = torch.exp(z).sum(0)
    estimates, uncorrected = [], []
    for step in range(1500):
        layer.step = step  # each training step draws a new tail
        out = layer.forward_sparse(x)
        idx = out.indices if mode == "per_row" else out.indices.expand(3, -1)
        lw = out.log_weights if mode == "per_row" else out.log_weights.expand(3, -1)
        zi = z.T.gather(1, idx)
        estimates.append(torch.exp(zi + lw).sum(1))
        uncorrected.append(torch.exp(zi).sum(1))
    est = torch.stack(estimates).double()
    stderr = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - full).abs() < 4 * stderr + 1e-9 * full).all(), (est.mean(0), full, stderr)
    assert (torch.stack(uncorrected).mean(0) < 0.7 * full).all()


def test_corrected_normaliser_with_labels_is_unbiased():
    # Labels are in the head; the tail is drawn from the neurons outside labels and candidates.
    torch.manual_seed(1)
    n, budget = 200, 30
    layer = LSHLinear(8, n, active=budget, tail=20, mode="per_row", num_tables=4, probes=2)
    x, labels = torch.randn(4, 8), torch.tensor([[3, 7], [5, -1], [199, 0], [1, 2]])
    z = torch.randn(4, n)
    estimates = []
    for step in range(1500):
        layer.step = step
        out = layer.forward_sparse(x, labels)
        estimates.append(torch.exp(z.gather(1, out.indices) + out.log_weights).sum(1))
    est = torch.stack(estimates).double()
    stderr = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - torch.exp(z).sum(1)).abs() < 4 * stderr).all()


@pytest.mark.parametrize("n", [64, 61])
def test_the_tail_is_a_uniform_draw_from_the_neurons_outside_the_head(n):
    """Each neuron outside the head is in the tail |T| / |outside| of the time, and the tails are many: the draws
    were one XOR-translate of a fixed sequence per set (with N = 64: 38 of the 1,653 possible pairs, inclusion
    odds 0.88-1.41 of |T| / |outside|, a biased normaliser)."""
    from lsh_torch.tables import LSHTables
    sets, head = 20_000, torch.tensor([3, 9, 17, 30, 41, 60])
    active, _ = LSHTables.query_uniform(torch.zeros(sets, 1), n, 8, head.expand(sets, -1), seed=5)
    tails = active[:, 6:].sort(1).values
    outside = n - 6
    counts = torch.bincount(tails.flatten(), minlength=n).double()
    assert counts[head].sum() == 0 and (tails[:, 0] != tails[:, 1]).all()
    expected = sets * 2 / outside
    z2 = ((counts[counts > 0] - expected) ** 2 / expected).mean()
    assert counts.count_nonzero() == outside and z2 < 2, float(z2)  # about 1 (a chi-square's mean)
    pairs = len(set(map(tuple, tails.tolist())))
    possible = outside * (outside - 1) // 2
    assert pairs > 0.95 * possible * (1 - math.exp(-sets / possible)), (pairs, possible)


def test_loss_adds_the_log_weights():
    values, labels = torch.randn(4, 10, requires_grad=True), torch.tensor([0, 1, 2, 3])
    indices = torch.arange(10).expand(4, -1).clone()
    lw = torch.zeros(4, 10)
    lw[:, 6:] = math.log(5.0)
    loss = sparse_cross_entropy(SparseOutput(values, indices, lw), labels)
    torch.testing.assert_close(loss, F.cross_entropy(values + lw, labels))
    # Without log_weights (or a 2-field output) the plain softmax over the active logits.
    torch.testing.assert_close(sparse_cross_entropy(SparseOutput(values, indices), labels), F.cross_entropy(values, labels))
    torch.testing.assert_close(sparse_cross_entropy((values, indices), labels), F.cross_entropy(values, labels))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_every_neuron_active_gives_the_full_softmax(mode, label_smoothing):
    layer = LSHLinear(16, 50, active=50, tail=10, mode=mode)
    x, labels = torch.randn(7, 16), torch.randint(0, 50, (7,))
    out = layer.forward_sparse(x, labels)
    assert layer.exact_softmax and out.log_weights is None  # every output, in order: no lookup, no tail
    assert torch.equal(out.indices, torch.arange(50))  # one set for every row, in every mode
    full = F.cross_entropy(F.linear(x, layer.weight, layer.bias), labels, label_smoothing=label_smoothing)
    torch.testing.assert_close(sparse_cross_entropy(out, labels, label_smoothing=label_smoothing), full)


@pytest.mark.parametrize("mode", ["per_row", "shared"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_with_every_output_active_is_cross_entropys(mode, reduction):
    # No tail to correct for: exactly F.cross_entropy's label_smoothing, ignored rows included.
    n, labels = 12, torch.tensor([3, -100, 0, 11, 5])
    values = torch.randn(5, n, requires_grad=True)
    indices = torch.arange(n) if mode == "shared" else torch.arange(n).expand(5, -1)
    for output in ((values, indices), SparseOutput(values, indices, torch.zeros(indices.shape))):
        loss = sparse_cross_entropy(output, labels, reduction, label_smoothing=0.3)
        torch.testing.assert_close(loss, F.cross_entropy(values, labels, reduction=reduction, label_smoothing=0.3))
    grad, = torch.autograd.grad(loss.sum(), values)
    want, = torch.autograd.grad(F.cross_entropy(values, labels, reduction=reduction, label_smoothing=0.3).sum(), values)
    torch.testing.assert_close(grad, want)


def test_label_smoothing_spread_is_unbiased_over_the_tails_draws():
    # smoothing=1 minus smoothing=0 is, per row, z_label - sum(w z) / sum(w) over the active set,
    # an unbiased estimate of z_label - mean(z) over all n outputs; without the weights (spread
    # over the active outputs alone) it is biased towards the head's high logits.
    torch.manual_seed(2)
    n, budget = 300, 40
    layer = LSHLinear(8, n, active=budget, tail=25, mode="shared", num_tables=4, probes=2)
    x, labels = torch.randn(3, 8), torch.tensor([4, 77, 250])
    with torch.no_grad():
        layer.weight[:30] += 2 * x.mean(0)  # a head of high logits for the tables to find
    layer.rebuild()
    z = F.linear(x, layer.weight, layer.bias).detach()
    estimates, unweighted = [], []
    for step in range(800):
        layer.step = step
        out = layer.forward_sparse(x, labels)
        out = out._replace(values=z[:, out.indices])
        difference = lambda o: (sparse_cross_entropy(o, labels, "none", label_smoothing=1.0)
                                - sparse_cross_entropy(o, labels, "none"))
        estimates.append(difference(out))
        unweighted.append(difference(out._replace(log_weights=None)))
    est = torch.stack(estimates).double()
    want = z.gather(1, labels[:, None]).squeeze(1) - z.mean(1)
    stderr = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - want).abs() < 4 * stderr + 1e-5).all(), (est.mean(0), want, stderr)
    assert ((torch.stack(unweighted).mean(0) - want).abs() > 10 * stderr + 0.05).all()


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_label_smoothing_gradients_float64(mode):
    values = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    indices = torch.arange(9) if mode == "shared" else torch.randperm(40)[:36].reshape(4, 9)
    lw = torch.where(torch.arange(9) >= 5, math.log(6.0), 0.0).expand(indices.shape)
    labels = indices[..., 1].expand(4).clone() if mode == "shared" else indices[:, 1].clone()
    labels[2] = -1
    torch.autograd.gradcheck(
        lambda v: sparse_cross_entropy(SparseOutput(v, indices, lw), labels, "none", label_smoothing=0.2), (values,))


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                        (True, TypeError), ("0.1", TypeError), (None, TypeError)])
def test_label_smoothing_errors(bad, error):
    values, labels = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(error, match="label_smoothing must be"):
        sparse_cross_entropy((values, torch.arange(5)), labels, label_smoothing=bad)
    # numpy scalars are numbers, as for F.cross_entropy
    sparse_cross_entropy((values, torch.arange(5)), labels, label_smoothing=np.float32(0.25))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_labels_that_would_crowd_out_the_tail_grow_the_set(mode):
    """The tail stands for every output outside the set: labels that filled the budget left none, and the
    normaliser was 99% low, silently (later: an error once they passed it, at ordinary LM batch sizes).
    The set now grows to hold the labels and the tail, said once per layer."""
    layer = LSHLinear(16, 2000, active=16, tail=8, mode=mode, sparse_grad=True)
    x = torch.randn(4, 16)
    fewer = torch.arange(8).reshape(1, 8).expand(4, 8)  # 8 labels + 8 tail: the budget, no top set
    with pytest.warns(UserWarning, match="leave no room for hashed candidates: the set is full") as caught:
        out = layer.forward_sparse(x, fewer)
    assert caught[0].filename == __file__ and out.values.shape[-1] == 16
    many = torch.arange(40).reshape(4, 10) if mode == "per_row" else torch.arange(40).reshape(1, 40).expand(4, 40)
    with warnings.catch_warnings():  # said once per layer
        warnings.simplefilter("error")
        out = layer.forward_sparse(x, many)
    labels = 10 if mode == "per_row" else 40
    assert out.values.shape[-1] == labels + 8  # every label and the whole tail
    for row in range(4):
        indices, weights = (out.indices[row], out.log_weights[row]) if mode == "per_row" else out[1:]
        assert set(many[row].tolist()) <= set(indices[:labels].tolist())  # the labels first, then the draws
        assert not weights[:labels].any()
        torch.testing.assert_close(weights[labels:], torch.full((8,), math.log((2000 - labels) / 8)))
    fresh = LSHLinear(16, 2000, active=16, tail=8, mode=mode, sparse_grad=True)
    with pytest.warns(UserWarning, match=f"the set grows to {labels + 8} outputs"):
        fresh.forward_sparse(x, many)
    with warnings.catch_warnings():  # labels, tail and a top set within the budget: nothing to say
        warnings.simplefilter("error")
        LSHLinear(16, 2000, active=16, tail=8, mode=mode).forward_sparse(x, torch.arange(7).expand(4, 7))


def test_a_tail_fraction_above_0_draws_at_least_one():
    assert LSHLinear(16, 2000, active=128, tail=0.001)._tail_count(True) == 1  # round() gave 0: no tail
    assert LSHLinear(16, 2000, active=128, tail=0.0)._tail_count(True) == 0


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_a_budget_of_one_draws_a_tail_too(mode):
    """The default tail, half the budget, was 0 at a budget of 1: each row's set held its label alone, and the loss
    was exactly 0 (a user review)."""
    layer, x, y = LSHLinear(16, 20_000, active=1, mode=mode), torch.randn(8, 16), torch.randint(0, 20_000, (8,))
    with pytest.warns(UserWarning):  # (the labels fill the set: said once)
        out = layer.forward_sparse(x, y)
    drawn = (out.log_weights != 0).sum(-1)
    assert (drawn == 1).all() and sparse_cross_entropy(out, y) > 1


def test_tail_argument_errors():
    with pytest.raises(ValueError, match="tail must be in"):
        LSHLinear(4, 100, active=10, tail=11)
    with pytest.raises(ValueError, match="tail as a fraction"):
        LSHLinear(4, 100, active=10, tail=1.5)
    with pytest.raises(TypeError, match="tail must be"):
        LSHLinear(4, 100, active=10, tail="half")


@pytest.mark.parametrize("mode, sampled, step", [("per_row", 5, 0), ("shared", 5, 0), ("shared", 2, 0),
                                                  ("shared", 2, 4), ("shared", 2, 2), ("shared", 1, 3),
                                                  ("shared", "auto", 2)])
def test_top_set_is_the_best_scoring_of_the_rescored_pool(mode, sampled, step):
    # rescore=4: the head after the labels is the best-scoring quarter of the hashed pool. In shared
    # mode the pool is found and scored for every stride-th row from (seed % stride), stride =
    # ceil(rows / (top_set_scores // pool)): with room for 2 rows' scores, rows 0 and 3 of 5 at
    # step 0, rows 1 and 4 at step 4, row 2 alone at step 2; for 1 row's, row 3 at step 3 (a single
    # row is taken twice: a sample has at least 2 entries). "auto" allows a quarter of the set's
    # outputs, 5 x 64 / 4 = 80 scores, less than one row's pool of 112: row 2 at step 2.
    n, budget, tail = 2000, 64, 32
    layer = LSHLinear(16, n, active=budget, tail=tail, mode=mode, num_tables=6, bits=5, probes=3, rescore=4)
    shared = mode == "shared"
    forced = 4 if shared else 1
    top = budget - tail - forced
    layer.top_set_scores = sampled if sampled == "auto" else sampled * 4 * top + 3  # + 3: the row count rounds down
    layer.step = step
    x, labels = torch.randn(5, 16), torch.tensor([3, 3, 10, 11, 12])
    with torch.no_grad():  # labels score high for a row they label (3 for row 1): in the pool, and forced in
        layer.weight[labels] = 3 * x
    layer.rebuild()
    out = layer.forward_sparse(x, labels)
    seed = layer.seed * 2 ** 32 + step
    rows = {5: [0, 1, 2, 3, 4], 2: [row for row in (step % 3, step % 3 + 3) if row < 5], 1: [step % 5],
            "auto": [2]}[sampled]
    pool, _ = layer.tables.query(x[rows], 4 * top, None, seed, shared=shared)
    with torch.no_grad():
        scores = F.linear(x[rows], layer.weight, layer.bias)
    if shared:
        pool_scores = scores[:, pool].logsumexp(0).masked_fill(torch.isin(pool, labels), -math.inf)
        expected = set(pool[pool_scores.topk(top).indices].tolist())
        head = out.indices[: int((out.log_weights == 0).sum())].tolist()
        assert len(head) == forced + top and set(head) == expected | {3, 10, 11, 12}
    else:  # per row in training: one pool for the batch, BATCH_POOL_ROWS rows' worth, each row's best of it
        pool, _ = layer.tables.query(x, BATCH_POOL_ROWS * 4 * top, None, seed, shared=True)
        for row in range(5):
            row_scores = scores[row, pool].masked_fill(pool == labels[row], -math.inf)
            best = pool[row_scores.topk(top).indices]
            head = out.indices[row, : int((out.log_weights[row] == 0).sum())].tolist()
            assert len(head) == forced + top and set(head) == set(best.tolist()) | {labels[row].item()}
            assert head[0] == labels[row]  # labels first


def test_a_batch_pool_scored_in_blocks_of_rows_chooses_as_in_one(monkeypatch):
    # Scores are computed a block of rows at a time (at most _POOL_SCORES of them): blocks of 3 rows and of all 8
    # choose the same sets.
    layer = LSHLinear(16, 2000, active=64, tail=32, mode="per_row", num_tables=6, bits=5, probes=3)
    x, labels = torch.randn(8, 16), torch.randint(0, 2000, (8,))
    whole = layer.forward_sparse(x, labels).indices
    layer.step = 0
    pool = min(2000, BATCH_POOL_ROWS * 4 * (64 - 32 - 1))
    monkeypatch.setattr(lsh_torch.nn, "_POOL_SCORES", 3 * pool)
    assert torch.equal(layer.forward_sparse(x, labels).indices, whole)


def test_an_eval_per_row_top_set_is_the_best_of_the_rows_own_pool_whatever_its_batch():
    # Eval lookups key rows by their codes, so an input gets the same set however it is batched: each row's
    # pool is its own (rescore x top hashed candidates), not the batch's as in training.
    n, budget, tail, top = 2000, 64, 32, 31
    layer = LSHLinear(16, n, active=budget, tail=tail, mode="per_row", num_tables=6, bits=5, probes=3, rescore=4).eval()
    x, labels = torch.randn(5, 16), torch.tensor([3, 3, 10, 11, 12])
    out = layer.forward_sparse(x, labels)
    pool, _ = layer.tables.query(x, 4 * top, None, layer.seed, keyed=True)
    with torch.no_grad():
        scores = F.linear(x, layer.weight, layer.bias)
    for row in range(5):
        row_scores = scores[row, pool[row]].masked_fill(pool[row] == labels[row], -math.inf)
        head = out.indices[row, : int((out.log_weights[row] == 0).sum())].tolist()
        assert set(head) == set(pool[row][row_scores.topk(top).indices].tolist()) | {labels[row].item()}
        alone = layer.forward_sparse(x[row:row + 1], labels[row:row + 1])
        assert torch.equal(alone.indices[0], out.indices[row])


@pytest.mark.parametrize("share", [0.25, 0.5, 0.0])
def test_a_shared_pool_of_direction_tables_starts_with_the_largest_norm_rows(share):
    # Tables of directions (asymmetric=False) cannot see the norms: the shared pool's first share are the rows of
    # largest norm at the last build, then the hashed candidates not among them, as many as the pool holds.
    n, budget, tail = 2000, 64, 32
    layer = LSHLinear(16, n, active=budget, tail=tail, mode="shared", num_tables=6, bits=5, probes=3, rescore=4,
                      asymmetric=False, rebuild=None)
    layer.norm_rows_share, layer.top_set_scores = share, 10 ** 6  # every row scored
    x, labels = torch.randn(5, 16), torch.tensor([3, 3, 10, 11, 12])
    with torch.no_grad():
        layer.weight[100:140] *= torch.linspace(2, 30, 40)[:, None]  # large rows of random directions
    layer.rebuild()
    built_norms = torch.linalg.vector_norm(layer.weight.detach(), dim=1)
    with torch.no_grad():  # moved since the build: the pool follows the norms the tables were built with
        layer.weight[500:540] *= 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (written since the build: on purpose)
        out = layer.forward_sparse(x, labels)
    top = budget - tail - 4
    hashed, _ = layer.tables.query(x, 4 * top, None, layer.seed * 2 ** 32, shared=True)
    largest = built_norms.topk(int(share * 4 * top)).indices
    others = hashed[~torch.isin(hashed, largest)]
    pool = torch.cat([largest, others])[: 4 * top]
    with torch.no_grad():
        scores = ops.shared_linear(x, layer.weight, layer.bias, pool).logsumexp(0)  # (5 rows: all scored)
    expected = set(pool[scores.masked_fill(torch.isin(pool, labels), -math.inf).topk(top).indices].tolist())
    head = out.indices[: int((out.log_weights == 0).sum())].tolist()
    assert set(head) == expected | {3, 10, 11, 12}
    if share:
        assert set(largest.tolist()) & set(head)  # the rows the built norms rank first do score
        layer.rebuild()  # the moved rows' norms taken (incrementally): now rows of 500..539 lead
        assert layer.tables.rehashed == 40
        now = torch.linalg.vector_norm(layer.weight.detach(), dim=1)
        assert torch.equal(layer.tables.norms, now) and set(layer.tables.largest_norm_rows(8).tolist()) <= set(range(500, 540))


@pytest.mark.parametrize("share", [-0.1, 1.5, "0.25", float("nan")])
def test_norm_rows_share_must_be_a_fraction(share):
    layer = LSHLinear(8, 1000, active=64, mode="shared", asymmetric=False)
    layer.norm_rows_share = share
    with pytest.raises(ValueError, match=r"norm_rows_share must be a fraction in \[0, 1\]"):
        layer.forward_sparse(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_labels_in_the_pool_leave_the_top_set_its_size(mode):
    # Several labels per row, padded with -1, each scoring high for a row it labels (the last of
    # them where two share it): the head is the labels and the top set, none of them twice, and
    # only the rest is the tail. Per row the tail is the same for every row and a row's padding
    # goes to its top set, the best-scoring of its pool (it went to the tail: 3 labels padded to
    # 60 columns left 4 of 128 outputs to the top set).
    n, budget, tail = 3000, 80, 40
    layer = LSHLinear(16, n, active=budget, tail=tail, mode=mode, num_tables=6, bits=5, probes=3, rescore=4)
    x = torch.randn(6, 16)
    labels = torch.tensor([[5, 9, -1], [9, 17, 30], [41, -1, -1], [5, 50, 51], [60, 61, 62], [70, -1, -1]])
    with torch.no_grad():
        for row, row_labels in enumerate(labels):
            layer.weight[row_labels[row_labels >= 0]] = 3 * x[row]
    layer.rebuild()
    out = layer.forward_sparse(x, labels)
    if mode == "shared":
        forced = set(labels[labels >= 0].tolist())
        head = out.indices[: int((out.log_weights == 0).sum())].tolist()
        assert len(head) == len(set(head)) == budget - tail and forced <= set(head)
    else:  # each row's top set from the batch's pool, sized as for rows without labels, at step 0
        batch_pool, _ = layer.tables.query(x, BATCH_POOL_ROWS * 4 * (budget - tail), None, layer.seed * 2 ** 32,
                                           shared=True)
        scores = F.linear(x, layer.weight, layer.bias).detach()
        for row in range(6):
            forced = labels[row][labels[row] >= 0].tolist()
            head = out.indices[row, : int((out.log_weights[row] == 0).sum())].tolist()
            assert head[: len(forced)] == forced and len(head) == len(set(head)) == budget - tail
            pool = batch_pool[~torch.isin(batch_pool, labels[row])]
            assert set(head[len(forced):]) == set(pool[scores[row, pool].topk(len(head) - len(forced)).indices].tolist())


@pytest.mark.parametrize("cap, error", [(0, ValueError), (1e5, TypeError), ("256", TypeError), (True, TypeError)])
def test_top_set_scores_must_be_a_positive_int(cap, error):
    layer = LSHLinear(8, 1000, active=64, mode="shared")
    layer.top_set_scores = cap
    with pytest.raises(error, match=r"top_set_scores \(exact scores per shared top set, or 'auto'\) must be"):
        layer.forward_sparse(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_forward_sparse_on_an_empty_batch(mode):
    layer = LSHLinear(8, 10_000, mode=mode)  # the output-layer defaults: a tail and a rescored top set
    out = layer.forward_sparse(torch.randn(0, 8), torch.zeros(0, dtype=torch.int64))
    assert out.values.shape == (0, 2048) and out.log_weights.shape == out.indices.shape
    assert out.indices.shape == ((0, 2048) if mode == "per_row" else (2048,))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_normaliser_unbiased_when_the_rescored_pool_is_random_fill(mode):
    """Sparse tables (1 table, 12 bits, 1 probe): the rescored pool (rescore x top set) is almost all random fill.
    The tail must be drawn independently of that fill, else it replays the pool's rejected (low-scoring) members
    and the normaliser is biased low (37-58% of the true one per row, when the two shared a seed)."""
    torch.manual_seed(0)
    n, budget, tail = 400, 40, 30
    layer = LSHLinear(8, n, active=budget, tail=tail, mode=mode, num_tables=1, bits=12, probes=1, rescore=4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        z = layer.weight @ x.T * 3 + layer.bias[:, None]  # [n, 3]
    full = torch.exp(z).sum(0)
    estimates = []
    for step in range(800):
        layer.step = step
        out = layer.forward_sparse(x)
        idx = out.indices if mode == "per_row" else out.indices.expand(3, -1)
        lw = out.log_weights if mode == "per_row" else out.log_weights.expand(3, -1)
        estimates.append(torch.exp(z.T.gather(1, idx) + lw).sum(1))
    est = torch.stack(estimates).double()
    stderr = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - full).abs() < 4 * stderr + 1e-9 * full).all(), (est.mean(0), full, stderr)


def test_a_label_on_an_entry_that_stands_for_no_output_is_refused():
    """A label whose entry has log-weight -inf is not a forced label either (documented): refused, not an inf loss."""
    values = torch.randn(2, 4, requires_grad=True)
    lw = torch.tensor([0.0, 0.0, 0.0, -math.inf])
    with pytest.raises(ValueError, match="non-zero log-weight"):
        sparse_cross_entropy(SparseOutput(values, torch.arange(4), lw), torch.tensor([3, 0]))


def _normaliser_estimates(layer, x, z, steps, labels=None):
    """``[steps, B]``: sum(exp(z + log_weights)) over each training step's active set (``z [n, B]``)."""
    estimates = []
    for step in range(steps):
        layer.step = step  # each training step draws a new tail
        out = layer.forward_sparse(x, labels)
        idx = out.indices if out.indices.dim() > 1 else out.indices.expand(x.shape[0], -1)
        lw = out.log_weights if out.log_weights.dim() > 1 else out.log_weights.expand(x.shape[0], -1)
        estimates.append(torch.exp(z.T.gather(1, idx).double() + lw.double()).sum(1))
    return torch.stack(estimates)


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_a_tail_drawn_from_the_proposal_is_unbiased_and_follows_the_counts(mode):
    """Draws with probability ~ sqrt(counts + 1), weighted 1/(t q): the normaliser's mean is the full one (labels in
    the head, draws that hit the head weighted 0); and where the counts follow the softmax (q ~ exp(z)) its spread
    is under half the uniform tail's."""
    torch.manual_seed(0)
    n, budget, tail = 400, 40, 30
    x, labels = torch.randn(1, 8) + 0.1 * torch.randn(3, 8), torch.tensor([5, 17, 300])  # rows of alike softmaxes
    layers = {}
    for name in ("uniform", "proposal"):
        layers[name] = LSHLinear(8, n, active=budget, tail=tail, mode=mode, num_tables=4, probes=2)
    with torch.no_grad():
        z = layers["uniform"].weight @ x.T * 3 + layers["uniform"].bias[:, None]  # [n, 3]
    counts = (100 * torch.exp(2 * z.mean(1))).round()  # sqrt(counts + 1) ~ exp(z): the mass where the softmax's is
    layers["proposal"] = LSHLinear(8, n, active=budget, tail=tail, mode=mode, num_tables=4, probes=2,
                                   tail_proposal=counts)
    layers["proposal"].load_state_dict(layers["uniform"].state_dict())
    full = torch.exp(z.double()).sum(0)
    spread = {}
    for name, layer in layers.items():
        est = _normaliser_estimates(layer, x, z, 1500, labels)
        stderr = est.std(0) / math.sqrt(est.shape[0])
        assert ((est.mean(0) - full).abs() < 4 * stderr + 1e-9 * full).all(), (name, est.mean(0), full, stderr)
        spread[name] = est.std(0) / full
    assert (spread["proposal"] < spread["uniform"] / 2).all(), spread  # (0.09 against 0.23)


def test_the_proposal_draws_each_neuron_in_proportion_to_the_root_of_its_count():
    """Each tail entry draws again while it hits the head, up to TRIES times: it ends on j outside the head with
    probability q_j (1 - Q^TRIES) / (1 - Q), on a head neuron with q_j Q^(TRIES - 1); its weight is one over the first."""
    from lsh_torch.proposal import POWER, TRIES, Proposal, draw_tail, proposal_log_weights
    n, t, sets = 50, 20, 4000
    counts = torch.arange(n, dtype=torch.float64) ** 2
    q = (counts + 1) ** POWER
    q /= q.sum()
    proposal = Proposal.of(counts, torch.device("cpu"))
    head = torch.tensor([49, 48, 47, 46, 0])  # the likeliest draws: Q = 0.12
    Q = float(q[head].sum())
    ends = q * (1 - Q ** TRIES) / (1 - Q)
    ends[head] = q[head] * Q ** (TRIES - 1)
    active = torch.cat([head, torch.zeros(t, dtype=torch.long)]).expand(sets, -1).contiguous()
    heads = torch.full((sets,), head.numel())
    drawn = torch.cat([draw_tail(active[i:i + 500], heads[i:i + 500], proposal, seed=i) for i in range(0, sets, 500)])
    assert (drawn[:, :5] == head).all()
    counted = torch.bincount(drawn[:, 5:].flatten(), minlength=n).double()
    expected = sets * t * ends
    outside = expected > 0.5
    assert ((counted - expected)[outside] ** 2 / expected[outside]).mean() < 2  # about 1 (a chi-square's mean)
    lw = proposal_log_weights(drawn, heads, proposal)
    assert (lw[:, :5] == 0).all()
    tail, hit = drawn[:, 5:], (drawn[:, 5:, None] == head).any(2)
    torch.testing.assert_close(lw[:, 5:][~hit].double(), -(t * ends[tail[~hit]]).log(), rtol=1e-6, atol=1e-6)
    assert (lw[:, 5:][hit] == -math.inf).all()
    assert not torch.equal(drawn[:500], draw_tail(active[:500], heads[:500], proposal, seed=1))  # other draws
    assert torch.equal(drawn[:500], draw_tail(active[:500], heads[:500], proposal, seed=0))
    # A head that holds almost all the mass: entries end on it, weighted -inf, and the others stay unbiased.
    heavy = Proposal.of(torch.zeros(n).index_fill_(0, head, 1e12), torch.device("cpu"))
    few = draw_tail(active[:500], heads[:500], heavy, seed=3)
    assert (proposal_log_weights(few, heads[:500], heavy)[:, 5:] == -math.inf).float().mean() > 0.5


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_a_loss_over_a_proposal_tail_has_the_gradients_of_its_dense_formula_float64(mode):
    """Neurons drawn twice (frequent counts, a small layer) are two terms of the normaliser: the sparse gradients
    are those of logsumexp(z[set] + log_weights) - z[label] computed densely."""
    torch.manual_seed(3)
    n = 60
    counts = torch.zeros(n).index_fill_(0, torch.arange(5), 1e6)
    layer = LSHLinear(6, n, active=24, tail=16, mode=mode, sparse_grad=True, dtype=torch.float64,
                      tail_proposal=counts, num_tables=4, probes=2)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([7, 30, 2, 59, 7])
    out = layer.forward_sparse(x, y)
    idx = out.indices if mode == "per_row" else out.indices.expand(5, -1)
    assert any(row.unique().numel() < row.numel() for row in idx)  # a repeated draw
    sparse_cross_entropy(out, y).backward()
    weight = layer.weight.detach().clone().requires_grad_()
    z = (x @ weight.T + layer.bias.detach()).gather(1, idx)
    lw = out.log_weights if mode == "per_row" else out.log_weights.expand(5, -1)
    column = (idx == y[:, None]).to(torch.uint8).argmax(1)
    dense = (torch.logsumexp(z + lw, 1) - z.gather(1, column[:, None]).squeeze(1)).mean()
    dense.backward()
    torch.testing.assert_close(layer.weight.grad.to_dense(), weight.grad)


@pytest.mark.parametrize("counts,error,pattern", [
    ([1.0] * 300, TypeError, "tail_proposal must be None or a tensor of 300 counts"),
    (torch.ones(299), ValueError, "1-D real tensor of out_features = 300 counts, got torch.float32 of shape .299,."),
    (torch.ones(300, 1), ValueError, "1-D real tensor"),
    (torch.ones(300, dtype=torch.bool), ValueError, "1-D real tensor"),
    (torch.ones(300).index_fill(0, torch.tensor([7]), -1.0), ValueError, "finite counts >= 0, got -1.0 at output 7"),
    (torch.ones(300).index_fill(0, torch.tensor([9]), math.nan), ValueError, "finite counts >= 0, got nan at output 9"),
])
def test_tail_proposal_errors(counts, error, pattern):
    with pytest.raises(error, match=pattern):
        LSHLinear(8, 300, tail_proposal=counts)


def test_eval_sets_keep_the_uniform_tail_and_the_proposal_is_configuration():
    import copy
    import pickle
    counts = torch.arange(300.0)
    layer = LSHLinear(8, 300, active=40, tail=20, mode="per_row", tail_proposal=counts)
    assert "tail_proposal" in repr(layer) and "tail_proposal" not in layer.state_dict()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone.tail_proposal, counts.double())
    counts[0] = 1e9  # the layer keeps its own copy
    assert layer.tail_proposal[0] == 0
    x = torch.randn(4, 8)
    out = layer.eval().forward_sparse(x)
    torch.testing.assert_close(out.log_weights, ops.tail_log_weights(out.log_weights.eq(0).sum(1), 40, 300))


def test_a_proposal_tail_over_a_batch_of_sequences():
    """Inputs [batch, positions, features], as a language model's head gets them: sets and weights per token."""
    layer = LSHLinear(8, 300, active=40, tail=20, mode="per_row", sparse_grad=True, tail_proposal=torch.arange(300.0))
    x, y = torch.randn(2, 5, 8), torch.randint(0, 300, (2, 5))
    out = layer.forward_sparse(x, y)
    assert out.indices.shape == out.log_weights.shape == (2, 5, 40)
    assert (out.log_weights[..., :1] == 0).all() and (out.log_weights[..., 20:] != 0).all()
    sparse_cross_entropy(out, y).backward()


def test_an_assigned_tail_proposal_is_checked_and_followed():
    layer = LSHLinear(8, 300, active=40, tail=20, mode="per_row", sparse_grad=True)
    with pytest.raises(ValueError, match="1-D real tensor of out_features = 300 counts"):
        layer.tail_proposal = torch.ones(10)
    with pytest.raises(ValueError, match="finite counts >= 0"):
        layer.tail_proposal = -torch.ones(300)
    with pytest.raises(ValueError, match="span too wide a range"):  # sqrt(1 + 1) vanishes beside 1e17
        layer.tail_proposal = torch.zeros(300, dtype=torch.float64).index_fill_(0, torch.tensor([0]), 1e34)
    layer.tail_proposal = torch.zeros(300, dtype=torch.int64)
    x, y = torch.randn(4, 8), torch.randint(0, 300, (4,))
    uniform_counts = layer.forward_sparse(x, y).log_weights
    layer.tail_proposal.index_fill_(0, torch.arange(150), 1e6)  # edited in place: the draws follow
    layer.step = 0
    heavy = layer.forward_sparse(x, y).log_weights
    assert not torch.equal(uniform_counts, heavy)
    layer.tail_proposal = None
    layer.step = 0
    out = layer.forward_sparse(x, y)
    torch.testing.assert_close(out.log_weights, ops.tail_log_weights(out.log_weights.eq(0).sum(1), 40, 300))
