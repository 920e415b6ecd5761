"""The large-output path: forward_sparse, sparse_cross_entropy, top-k, shared mode, random selection."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
import lsh_torch
from lsh_torch import LSHLinear, SparseOutput, hashing, ops, sparse_cross_entropy
from lsh_torch.distributed import _shard_kwargs
from lsh_torch.nn import TOPK_BUDGET, topk_budget


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_forward_sparse_forces_labels_and_matches_reference(mode):
    layer = LSHLinear(16, 500, active=40, mode=mode)
    x = torch.randn(2, 3, 16)
    labels = torch.tensor([[[1, 2], [3, -1], [4, 4]], [[5, -1], [6, 7], [8, 9]]])
    out = layer.forward_sparse(x, labels)
    if mode == "per_row":
        assert out.values.shape == out.indices.shape == (2, 3, 40)
        for row, labs in zip(out.indices.reshape(6, 40).tolist(), labels.reshape(6, 2).tolist()):
            distinct = list(dict.fromkeys(l for l in labs if l >= 0))
            assert row[: len(distinct)] == distinct and len(set(row)) == 40
        expected = ref.sparse_linear(x.reshape(6, 16), layer.weight.detach(), layer.bias.detach(), out.indices.reshape(6, 40))
    else:
        assert out.values.shape == (2, 3, 40) and out.indices.shape == (40,)
        assert out.indices[:9].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
        expected = ref.shared_linear(x.reshape(6, 16), layer.weight.detach(), layer.bias.detach(), out.indices)
    torch.testing.assert_close(out.values.reshape(6, 40), expected)


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_dropin_forward_in_shared_mode_equals_scatter_of_forward_sparse(mode):
    layer = LSHLinear(16, 300, active=30, mode=mode, tail=10)  # "auto" gives forward no tail
    x = torch.randn(5, 16)
    dense = layer(x)
    layer.step -= 1
    sparse = layer.forward_sparse(x)
    idx = sparse.indices if sparse.indices.dim() == 2 else sparse.indices.expand(5, -1)
    assert torch.equal(dense.gather(1, idx), sparse.values)
    assert int((dense != 0).sum()) <= idx.numel()


def test_auto_mode_is_per_row_for_forward_and_shared_for_forward_sparse():
    layer = LSHLinear(16, 300, active=30)
    assert layer.mode == "auto"
    x = torch.randn(4, 16)
    assert ((layer(x) != 0).sum(1) == 30).all()  # each row its own 30
    assert layer.forward_sparse(x).indices.shape == (30,)
    assert layer.active_set(x).shape == (4, 30)


def test_sparse_cross_entropy_equals_cross_entropy_over_active_logits():
    values = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[3, 1, 0, 9, 8, 7]] * 4)
    labels = torch.tensor([3, 0, 7, 1])
    loss = sparse_cross_entropy((values, indices), labels)
    pos = (indices == labels[:, None]).float().argmax(1)
    torch.testing.assert_close(loss, F.cross_entropy(values, pos))
    loss.backward()
    assert values.grad.abs().sum() > 0


def test_sparse_cross_entropy_refuses_outputs_it_cannot_read():
    values, labels = torch.randn(6, 8), torch.arange(6)
    cases = [
        ((values, torch.arange(10)), ValueError, "indices must have values' shape"),
        ((values, torch.arange(8)[None].expand(5, -1)), ValueError, "indices must have values' shape"),
        ((values, torch.arange(8), torch.zeros(5)), ValueError, "log_weights must be None or have indices' shape"),
        ((values.long(), torch.arange(8)), TypeError, "values must be a floating tensor"),
        ((values, torch.arange(8).float()), TypeError, "indices must be an int64 tensor"),
        (values, TypeError, "output must be a SparseOutput"),
        ((values, torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])), ValueError, "repeat a neuron"),
        ((values, torch.arange(8).repeat(6, 1).index_fill(1, torch.tensor([7]), 3)), ValueError, "repeat a neuron"),
        ((values, torch.arange(8) - 1), ValueError, "indices must be neuron ids >= 0"),
        ((values, torch.arange(8), torch.zeros(8, dtype=torch.bool)), TypeError, "log_weights must be a floating"),
        *[((values, torch.arange(8), torch.zeros(8).index_fill(0, torch.tensor([7]), bad)), ValueError,
           "log_weights must not be NaN or inf") for bad in (math.nan, math.inf)],
        ((values, torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]), torch.zeros(8)), ValueError, "indices must be neuron ids >= 0"),
        # A repeat among entries that stand for themselves (log-weight 0) counts twice: refused.
        ((values, torch.tensor([0, 1, 2, 3, 4, 5, 6, 0]), torch.zeros(8)), ValueError, "repeat a neuron"),
    ]
    for output, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            sparse_cross_entropy(output, labels)
    # Repeats among the other entries are draws, each its own term: accepted, and a head entry's repeat in the tail too.
    drawn = torch.tensor([0, 1, 2, 3, 4, 5, 4, 4])
    lw = torch.tensor([0.0, 0, 0, 0, 0, 1.5, -0.5, -math.inf])
    head_labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(sparse_cross_entropy((values, drawn, lw), head_labels, "none"),
                               torch.logsumexp(values + lw, 1) - values.gather(1, head_labels[:, None]).squeeze(1))
    with pytest.raises(TypeError, match="labels must be an int64 tensor of class ids, got torch.uint8"):
        sparse_cross_entropy((values, torch.arange(8)), labels.to(torch.uint8))
    # Another device (meta stands in for one) is named, not a dispatcher's "Tensor on device meta is not on ...".
    meta = lambda t: t.to("meta")  # noqa: E731
    for output, given, name in (((values, meta(torch.arange(8))), labels, "output.indices"),
                                ((values, torch.arange(8), meta(torch.zeros(8))), labels, "output.log_weights"),
                                ((values, torch.arange(8)), meta(labels), "labels")):
        with pytest.raises(ValueError, match=f"{name} are on meta but output.values are on cpu"):
            sparse_cross_entropy(output, given)
    # Wholly on meta (no autocast there), shapes as F.cross_entropy gives them.
    assert sparse_cross_entropy((meta(values), meta(torch.arange(8))), meta(labels)).device.type == "meta"
    with pytest.raises(TypeError, match="head must be an integer tensor .query's head., got list"):
        ops.tail_log_weights([1], 5, 10)


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_the_loss_trusts_forward_sparse_until_its_output_is_changed(mode, monkeypatch):
    """forward_sparse's indices are distinct and its log-weights valid by construction: the loss does not sort
    the indices again (most of its forward per row), but an output changed in place since is checked."""
    from lsh_torch import losses
    torch.manual_seed(0)
    layer = LSHLinear(8, 300, active=32, mode=mode, sparse_grad=True)
    x, y = torch.randn(6, 8), torch.randint(0, 300, (6,))
    checked = []
    monkeypatch.setattr(losses, "_check_distinct", lambda indices, log_weights=None: checked.append(indices))
    sparse_cross_entropy(layer.forward_sparse(x, y), y)
    assert checked == []
    monkeypatch.undo()
    out = layer.forward_sparse(x, y)
    rows = out.indices if mode == "per_row" else out.indices[None]
    rows[:, -1] = -1  # not a neuron, as a hand edit might make it
    copied = SparseOutput(out.values, copy.deepcopy(out.indices), copy.deepcopy(out.log_weights))
    for edited in (out, copied):  # a copy's version restarts at 0: it must not pass as the original
        with pytest.raises(ValueError, match="neuron ids >= 0"):
            sparse_cross_entropy(edited, y)
    out = layer.forward_sparse(x, y)
    out.log_weights[..., -1] = math.nan
    with pytest.raises(ValueError, match="log_weights must not be NaN"):
        sparse_cross_entropy(out, y)


def test_log_weights_are_a_constant_of_the_loss():
    values, labels = torch.randn(6, 8, requires_grad=True), torch.arange(6)
    log_weights = torch.zeros(8).index_fill(0, torch.tensor([7]), math.log(5.0)).requires_grad_()
    loss = sparse_cross_entropy((values, torch.arange(8), log_weights), labels)
    loss.backward()
    assert log_weights.grad is None and values.grad is not None
    with_minus_inf = sparse_cross_entropy((values, torch.arange(8), log_weights.detach().index_fill(0, torch.tensor([6]),
                                                                                                  -math.inf)), labels)
    assert torch.isfinite(with_minus_inf)  # -inf: an entry that stands for no output


def test_sparse_cross_entropy_with_a_minus_inf_logit_is_cross_entropys():
    values = torch.zeros(2, 4, requires_grad=True)
    masked = values.detach().clone()
    masked[0, 2] = -float("inf")  # an output masked out, as F.cross_entropy allows
    got = sparse_cross_entropy((masked.requires_grad_(), torch.arange(4)), torch.tensor([0, 1]))
    want = F.cross_entropy(masked.detach().requires_grad_(), torch.tensor([0, 1]))
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(masked.grad).all()


def test_labels_with_no_columns_are_no_labels():
    layer = LSHLinear(8, 500, active=32, mode="per_row")
    x = torch.randn(4, 8)
    out = layer.forward_sparse(x, torch.zeros(4, 0, dtype=torch.int64))
    layer.step = 0  # the same draws
    assert torch.equal(out.indices, layer.forward_sparse(x).indices)
    with pytest.raises(ValueError, match="x must have shape \\[B, in_features=8\\]"):
        layer.active_set(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="input must have shape"):
        layer.active_set(torch.randn(4, 9))
    with pytest.raises(TypeError, match="labels must be an int64 tensor, got torch.float32"):
        layer.active_set(x, torch.zeros(4))


def test_sparse_cross_entropy_multi_label_and_shared_indices():
    values = torch.randn(2, 5, dtype=torch.float64)
    indices = torch.tensor([10, 11, 12, 13, 14])
    labels = torch.tensor([[10, 12, -1], [14, -100, -1]])  # -1 and -100 are padding
    loss = sparse_cross_entropy((values, indices), labels, reduction="none")
    logp = values.log_softmax(1)
    torch.testing.assert_close(loss, torch.stack([-(logp[0, 0] + logp[0, 2]) / 2, -logp[1, 4]]))
    only_padding = sparse_cross_entropy((values, indices), torch.tensor([-1, -100]))
    assert only_padding.item() == 0.0
    per_row = sparse_cross_entropy((values, indices), torch.tensor([-1, 10]), reduction="none")
    assert not torch.signbit(per_row[0])  # 0, not -0.
    empty = sparse_cross_entropy((values[:0], indices), torch.tensor([], dtype=torch.int64))  # a fully padded batch
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        sparse_cross_entropy((values, indices), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="int64"):
        sparse_cross_entropy((values, indices), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="reduction"):
        sparse_cross_entropy((values, indices), torch.tensor([1, 2]), reduction="avg")


@pytest.mark.parametrize("shared", [True, False])
def test_sparse_cross_entropy_counts_a_repeated_label_once_and_has_exact_gradients(shared):
    torch.manual_seed(0)
    values = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([5, 2, 9, 7, 0, 4]) if shared else torch.stack([torch.randperm(10)[:6] for _ in range(3)])
    log_weights = torch.tensor([0.0, 0.0, 1.5, 0.0, 0.0, 1.5]).expand(indices.shape).contiguous()  # labels: weight 0
    full = indices.expand(3, 6)
    columns = [[1, 1, 4], [3, 0, 0], [2, 2, 2]]  # row 0's second label repeats its first
    labels = torch.stack([full[r, c] for r, c in enumerate(map(torch.tensor, columns))])
    labels[2] = -1  # a row without labels
    loss = sparse_cross_entropy((values, indices, log_weights), labels, reduction="none")
    logp = (values + log_weights).log_softmax(1)
    expected = torch.stack([-(logp[0, 1] + logp[0, 4]) / 2, -(logp[1, 3] + logp[1, 0]) / 2, logp.new_zeros(())])
    torch.testing.assert_close(loss, expected)
    torch.autograd.gradcheck(lambda v: sparse_cross_entropy((v, indices, log_weights), labels), (values,))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_sparse_cross_entropy_refuses_a_label_drawn_in_the_tail(mode):
    """A label that forward_sparse was not given but that the tail drew carries the tail's log-weight:
    it was scored raised by it (loss 4.26 against the estimator's 7.67), silently."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 500, active=200, mode=mode, sparse_grad=True)
    x = torch.randn(4, 16)
    out = layer.forward_sparse(x)  # no labels forced in: the set is the top set and the tail
    weights = out.log_weights.expand(out.values.shape)
    labels = out.indices.expand(out.values.shape)[torch.arange(4), (weights != 0).float().argmax(1)]
    with pytest.raises(ValueError, match="a uniform tail draw.* not forced in"):
        sparse_cross_entropy(out, labels)
    out = layer.forward_sparse(x, labels)  # forced in: weight 0, scored as they are
    assert (out.log_weights.expand(out.values.shape)[out.indices.expand(out.values.shape) == labels[:, None]] == 0).all()
    sparse_cross_entropy(out, labels).backward()


def test_sparse_cross_entropy_refuses_labels_that_are_not_active():
    """Out-of-range labels gave loss 0 and left their rows out of the mean; F.cross_entropy raises."""
    values = torch.randn(2, 5)
    for indices in (torch.tensor([10, 11, 12, 13, 14]), torch.tensor([[10, 11, 12, 13, 14]] * 2)):
        for labels in (torch.tensor([10, -5]), torch.tensor([15, 11]), torch.tensor([[11, 99], [12, -1]])):
            with pytest.raises(ValueError, match="not among the row's active outputs"):
                sparse_cross_entropy((values, indices), labels)
    layer = LSHLinear(4, 10, active=4)
    with pytest.raises(ValueError, match="label 10 of row 0"):
        sparse_cross_entropy(layer.forward_sparse(torch.randn(2, 4)), torch.tensor([10, -5]))
    with pytest.raises(TypeError, match="ignore_index"):
        sparse_cross_entropy((values, indices), torch.tensor([1, 2]), ignore_index=None)


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_ignore_index_matches_cross_entropy(mode):
    """-100 labels (F.cross_entropy's and Hugging Face's padding) are left out, through forward_sparse too."""
    layer = LSHLinear(8, 30, active=30, mode=mode, tail=0, dtype=torch.float64)
    x, labels = torch.randn(6, 8, dtype=torch.float64), torch.tensor([3, -100, 29, -100, 0, 3])
    loss = sparse_cross_entropy(layer.forward_sparse(x, labels), labels)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, layer.weight, layer.bias), labels))
    other = torch.tensor([3, 7, 29, 7, 0, 3])
    loss7 = sparse_cross_entropy(layer.forward_sparse(x, other), other, ignore_index=7)
    torch.testing.assert_close(loss7, F.cross_entropy(F.linear(x, layer.weight, layer.bias), other, ignore_index=7))


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_empty_batches(mode):
    layer = LSHLinear(4, 50, mode=mode, sparse_grad=True)
    x, labels = torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    loss = sparse_cross_entropy(layer.forward_sparse(x, labels), labels)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    out = layer.forward_sparse(torch.randn(3, 4))
    no_labels = sparse_cross_entropy(out, torch.zeros(3, 0, dtype=torch.long), reduction="none")
    assert no_labels.shape == (3,) and (no_labels == 0).all()


@pytest.mark.parametrize("mode,optimizer", [("per_row", torch.optim.SparseAdam), ("shared", torch.optim.SparseAdam),
                                            ("shared", torch.optim.SGD)])
def test_sparse_training_step_touches_active_rows_only(mode, optimizer):
    layer = LSHLinear(16, 400, active=24, mode=mode, sparse_grad=True)
    opt = optimizer(layer.parameters(), lr=0.05)
    x, labels = torch.randn(8, 16), torch.randint(0, 400, (8,))
    before = layer.weight.detach().clone()
    out = layer.forward_sparse(x, labels)
    sparse_cross_entropy(out, labels).backward()
    opt.step()
    changed = (layer.weight.detach() != before).any(1)
    touched = torch.zeros(400, dtype=torch.bool)
    touched[out.indices.flatten()] = True
    assert changed[labels].all() and not changed[~touched].any()


def test_sparse_training_learns():
    torch.manual_seed(0)
    proto = torch.randn(200, 16)
    layer = LSHLinear(16, 200, active=48, mode="shared", sparse_grad=True, rebuild=10)
    opt = torch.optim.SparseAdam(layer.parameters(), lr=0.05)
    for _ in range(150):
        labels = torch.randint(0, 200, (32,))
        loss = sparse_cross_entropy(layer.forward_sparse(proto[labels] + 0.1 * torch.randn(32, 16), labels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    labels = torch.arange(200)
    pred = layer.eval()(proto).argmax(1)
    assert (pred == labels).float().mean() > 0.8


def test_topk_exact_and_lsh():
    layer = LSHLinear(16, 300, active=300)
    x = torch.randn(2, 4, 16)
    dense = F.linear(x, layer.weight, layer.bias)
    values, indices = layer.topk(x, 5, exact=True)
    expected = dense.topk(5, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    lsh_values, lsh_indices = layer.topk(x, 5)  # every neuron a candidate: the exact answer
    torch.testing.assert_close(lsh_values, expected.values)
    assert torch.equal(lsh_indices, expected.indices)
    small = LSHLinear(16, 300, active=20)
    v, i = small.topk(x, 5, budget=20)
    assert v.shape == i.shape == (2, 4, 5)
    torch.testing.assert_close(v, F.linear(x, small.weight, small.bias).gather(-1, i))
    with pytest.raises(ValueError, match="k"):
        small.topk(x, 21, budget=20)
    with pytest.raises(ValueError, match="probes"):
        small.topk(x, 5, probes=0)
    for bad in (0, 301):
        with pytest.raises(ValueError, match="budget"):
            small.topk(x, 5, budget=bad)
    with pytest.raises(TypeError, match="budget"):
        small.topk(x, 5, budget=2.0)


def test_topk_budget_default_and_covering_every_output():
    wide = LSHLinear(8, 10_000, rebuild=None)
    assert wide.topk_budget == topk_budget(10_000) == TOPK_BUDGET < 10_000
    assert topk_budget(300) == 300
    # A budget of every output scores every output: the exact top k, whatever the tables find.
    layer = LSHLinear(16, 300, active=20, num_tables=1, bits=8, probes=1, rebuild=None)
    x = torch.randn(32, 16)
    expected = F.linear(x, layer.weight, layer.bias).topk(5, dim=1)
    values, indices = layer.topk(x, 5, budget=300)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(values, expected.values)


def test_topk_budget_scores_only_the_tables_candidates():
    # One index table of 1,024 buckets over 2,000 rows: a query's bucket holds about 2 of them, so
    # most of a budget of 64 is uniform draws, which topk must not score (they are no candidates).
    torch.manual_seed(0)
    layer = LSHLinear(16, 2000, active=64, rebuild=None)
    layer.topk_tables, layer.topk_bits = 1, 10
    x = torch.randn(200, 16)
    k, budget = 2, 64
    values, indices = layer.topk(x, k, probes=1, budget=budget, norm_rows=0, min_recall=0)  # the index's answers
    index = layer._topk_index
    codes, margins = hashing.input_codes(x, index.projection, 1, 10)
    active, head = ops.query(codes, margins, index.offsets, index.items, 1, budget, None, layer.seed, 0,
                             hashing.row_keys(codes))  # topk's query: rows keyed by their codes
    real = head.clamp_min(k)
    assert (head < budget).all()  # the test's premise: draws after every row's candidates
    for row in range(x.shape[0]):
        assert set(indices[row].tolist()) <= set(active[row, : real[row]].tolist()), row
    torch.testing.assert_close(values, F.linear(x, layer.weight, layer.bias).gather(1, indices))
    # Scoring the draws too would have picked a draw in many rows: the check above can fail.
    every = F.linear(x, layer.weight, layer.bias).gather(1, active).topk(k, dim=1).indices
    assert ((every >= real.unsqueeze(1)).any(1)).float().mean() > 0.5


def test_topk_with_more_probes_finds_more_of_the_exact_top():
    torch.manual_seed(0)
    layer = LSHLinear(16, 4000, active=100, num_tables=4, bits=10, probes=1, rebuild=None)
    layer.topk_tables, layer.topk_bits = 4, 10
    x = layer.weight.detach()[:200] + 0.5 * torch.randn(200, 16)  # queries near a row
    exact = layer.topk(x, 1, exact=True)[1]
    found = [(layer.topk(x, 1, probes=p, norm_rows=0, min_recall=0)[1] == exact).float().mean() for p in (1, 32)]
    assert found[1] > found[0] + 0.2, found
    assert layer.tables.probes == 1  # the override holds for the call only


@pytest.mark.parametrize("mode", ["shared", "per_row"])
def test_warmup_draws_random_sets_then_builds_the_tables(mode):
    warm = LSHLinear(16, 500, active=40, mode=mode, warmup=3, rebuild=2)
    rand = LSHLinear(16, 500, active=40, mode=mode, selection="random", rebuild=2)
    labels = torch.randint(0, 500, (8, 2))
    for step in range(5):
        x = torch.randn(8, 16)
        active = warm.forward_sparse(x, labels).indices
        if step < 3:  # the random selection's sets, seed for seed; no table built
            assert torch.equal(active, rand.forward_sparse(x, labels).indices)
            assert warm._stale and not warm.tables.built
        else:
            assert not warm._stale and warm.tables.built
    assert warm.step == 5 and "warmup=3" in repr(warm)
    with pytest.raises(ValueError, match="warmup"):
        LSHLinear(16, 500, warmup=-1)


def test_random_selection_is_uniform_and_keeps_labels():
    layer = LSHLinear(16, 1000, active=50, selection="random")
    labels = torch.arange(64)
    active = layer.active_set(torch.randn(64, 16), labels)
    assert torch.equal(active[:, 0], labels)
    counts = torch.bincount(active[:, 1:].flatten(), minlength=1000).float()
    assert counts.max() < 15  # 64*49/1000 ~ 3 expected per neuron


def test_auto_settings_by_width():
    hidden, wide = LSHLinear(8, 1000), LSHLinear(8, 670_091)
    assert (hidden.tables.num_tables, hidden.tables.bits, hidden.tables.probes, hidden.tables.asymmetric,
            hidden.budget) == (5, 6, 10, True, 250)  # the paper's settings, 25% active
    assert (wide.tables.num_tables, wide.tables.bits, wide.tables.probes, wide.tables.asymmetric,
            wide.budget) == (20, 12, 2, False, 2048)  # ~200 rows per bucket, 2,048 active
    assert LSHLinear(8, 670_091, mode="shared").tables.num_tables == 20  # the batch shares one top set
    assert LSHLinear(8, 670_091, mode="per_row").tables.num_tables == 40  # each row needs its own
    assert LSHLinear(8, 1000, mode="per_row").tables.num_tables == 5
    # topk searches an index of its own, the same for every mode (lsh_torch.retrieval.topk_settings)
    assert (wide.topk_tables, wide.topk_bits, wide.inference_probes, wide.topk_budget, wide.topk_norm_rows) == (
        60, 13, 12, 768, 5235)
    assert LSHLinear(8, 670_091, mode="per_row", num_tables=10).inference_probes == 12
    assert (hidden.topk_bits, hidden.inference_probes) == (7, 12)  # N / 8 rows: 128 buckets
    assert (LSHLinear(8, 20).topk_bits, LSHLinear(8, 20).inference_probes) == (1, 2)  # capped at the buckets
    assert LSHLinear(8, 50_001).tables.bits == 8 and LSHLinear(8, 8192).budget == 2048
    assert LSHLinear(8, 10).tables.bits == 6
    assert LSHLinear(8, 670_091, num_tables=3, active=100).tables.num_tables == 3  # explicit values win
    # Auto values fit the explicit ones: probes within a small K's buckets, K a multiple of a DWTA bin's bits
    assert [LSHLinear(8, 1000, bits=k).tables.probes for k in (1, 3, 4)] == [2, 8, 10]
    assert LSHLinear(8, 1000, probes=8, bits=3).tables.probes == 8
    with pytest.raises(ValueError, match=r"probes must be in \[1, 8\], got 9"):  # a given one is not moved
        LSHLinear(8, 1000, probes=9, bits=3)
    assert [LSHLinear(8, n, hash=hashing.DWTA(bin_size=16)).tables.bits for n in (1000, 100_000, 670_091)] == [8, 8, 12]
    assert LSHLinear(8, 1000, hash=hashing.DWTA(bin_size=4)).tables.bits == 6
    assert LSHLinear(8, 1000, bits=np.int64(3)).tables.probes == 8  # numpy ints as check_int takes them
    assert lsh_torch.nn.fit_bits(21, hashing.DWTA(2 ** 7)) == 14  # within the kernels' 20 bits
    # A vocabulary-parallel layer's shards fit their K the same way (bits from each shard's rows)
    assert _shard_kwargs(670_091, 335_046, {"hash": hashing.DWTA(16)})["bits"] == 12
    assert _shard_kwargs(100_000, 25_000, {"hash": hashing.DWTA(16)})["bits"] == 8
    assert _shard_kwargs(100_000, 25_000, {"bits": 1})["probes"] == 2


@pytest.mark.parametrize("sparse_grad", [True, False])
@pytest.mark.parametrize("mode", ["auto", "per_row"])
def test_a_narrow_softmax_layer_computes_every_output_in_forward_sparse(sparse_grad, mode):
    # Up to 8,192 outputs with the budget left to "auto" a sparse step was no faster than nn.Linear's
    # and trained worse: forward_sparse computes the exact softmax; forward keeps the hidden-layer sets.
    torch.manual_seed(0)
    layer = LSHLinear(16, 1000, sparse_grad=sparse_grad, mode=mode, dtype=torch.float64)
    assert layer.exact_softmax and layer.budget == 250 and "exact_softmax=True" in repr(layer)
    assert LSHLinear(16, 8192).exact_softmax and LSHLinear(16, 8192).budget == 2048  # forward's budget stays
    assert not LSHLinear(16, 8193).exact_softmax and not LSHLinear(16, 1000, active=0.25).exact_softmax
    assert LSHLinear(16, 20_000, active=1.0).exact_softmax  # every output asked for
    # An explicit tail asks for the sampled estimator (its docs: forward's set is then forward_sparse's);
    # it was ignored here, forward_sparse computing every output while forward drew the tail.
    for tail in (0.5, 100, 0):
        sampled = LSHLinear(16, 1000, tail=tail)
        assert not sampled.exact_softmax and sampled.budget == 250
        out = sampled.forward_sparse(torch.randn(4, 16), torch.tensor([1, 2, 3, 4]))
        assert out.values.shape == (4, 250) and bool(out.log_weights.any()) == (tail != 0)  # the tail corrected
    shard = _shard_kwargs(1000, 500, {"tail": 0.5})
    assert shard["active"] == 0.25 and _shard_kwargs(1000, 500, {})["active"] == 1.0  # shards as the full layer
    x, labels = torch.randn(2, 3, 16, dtype=torch.float64), torch.tensor([[5, 999, -100], [0, 7, 7]])
    out = layer.forward_sparse(x, labels)
    assert out.log_weights is None and out.values.shape == (2, 3, 1000)
    assert torch.equal(out.indices, torch.arange(1000))  # one set for every row, in every mode
    dense = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out.values, dense)
    loss = sparse_cross_entropy(out, labels)
    torch.testing.assert_close(loss, F.cross_entropy(dense.reshape(6, 1000), labels.reshape(6), ignore_index=-100))
    grads = torch.autograd.grad(loss, [layer.weight, layer.bias])
    want = torch.autograd.grad(F.cross_entropy(F.linear(x, layer.weight, layer.bias).reshape(6, 1000),
                                               labels.reshape(6), ignore_index=-100), [layer.weight, layer.bias])
    for got, expected in zip(grads, want):
        assert got.is_sparse == sparse_grad
        torch.testing.assert_close(got.to_dense(), expected)
    assert layer.step == 0  # no lookup, no step of the tables' schedule
    hidden = layer(x)  # training forward: the hidden layers' per-row sets, 25% of the outputs
    assert ((hidden != 0).sum(-1) <= 250).all()
    with pytest.raises(ValueError, match="labels must be in"):
        layer.forward_sparse(x, torch.full((2, 3), 1000))


def test_forward_sparse_errors():
    layer = LSHLinear(16, 100, active=4)
    with pytest.raises(ValueError, match="labels"):
        layer.forward_sparse(torch.randn(3, 16), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="labels"):
        layer.forward_sparse(torch.randn(3, 16), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, out_features=100\).* got 100"):  # as the exact path says it
        layer.forward_sparse(torch.randn(3, 16), torch.tensor([1, 2, 100]))
    with pytest.warns(UserWarning, match="no room for hashed candidates: the set grows to 7 outputs"):
        out = LSHLinear(16, 100, active=4).forward_sparse(torch.randn(1, 16), torch.tensor([[1, 2, 3, 4, 5]]))
    assert out.values.shape == (1, 7)  # labels past the budget: the 5 and a tail of 2, not an error (_set_size)
    with pytest.raises(ValueError, match="mode"):
        LSHLinear(16, 100, mode="batch")
    with pytest.raises(ValueError, match="selection"):
        LSHLinear(16, 100, selection="best")


def test_a_shared_training_step_has_no_data_dependent_shapes():
    # On a GPU each data-dependent shape (nonzero, boolean indexing, unique) or scalar read is a host
    # sync. Between rebuilds a shared step reads one scalar (the batch's distinct label count, which
    # sizes the top set) and, on the CPU only, the layer's two checks (labels in range, the query's heads
    # in [0, budget]) and the loss's two (labels found, none drawn in the tail), all asserted on the device
    # elsewhere; nothing else (labels that could pass the budget would add none: the count is read once). The
    # loss trusts forward_sparse's indices and log-weights (ids >= 0, no neuron twice, weights >= 0 and not NaN).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            boolean_index = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if boolean_index or func in (torch.ops.aten.nonzero.default, torch.ops.aten._unique2.default,
                                         torch.ops.aten.masked_select.default,
                                         torch.ops.aten._local_scalar_dense.default):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = LSHLinear(16, 3000, active=256, mode="shared", sparse_grad=True)
    x, labels = torch.randn(32, 16), torch.randint(0, 3000, (32, 2))
    labels[0, 1] = -1
    layer.forward_sparse(x, labels)  # the first step builds the tables
    with Syncs() as syncs:
        sparse_cross_entropy(layer.forward_sparse(x, labels), labels).backward()
    assert syncs.ops == ["aten._local_scalar_dense.default"] * 5, syncs.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_loss_under_autocast_is_float32_like_cross_entropy(dtype):
    """Each row's loss and their sum were rounded to the autocast dtype: 0.03-0.06 nats off in
    bfloat16, and a float16 sum of 16,384 rows overflowed to inf. F.cross_entropy returns float32."""
    torch.manual_seed(0)
    layer = LSHLinear(8, 64, active=64)  # every output: the exact softmax
    x, labels = torch.randn(16_384, 8), torch.randint(0, 64, (16_384,))
    with torch.autocast("cpu", dtype=dtype):
        for reduction in ("mean", "sum", "none"):
            out = layer.forward_sparse(x, labels)
            loss = sparse_cross_entropy(out, labels, reduction=reduction)
            expected = F.cross_entropy(out.values, labels, reduction=reduction)
            assert loss.dtype == expected.dtype == torch.float32
            torch.testing.assert_close(loss, expected)
    # outside autocast: the values' dtype, as F.cross_entropy's
    half = LSHLinear(8, 64, active=64, dtype=dtype)
    assert sparse_cross_entropy(half.forward_sparse(x.to(dtype), labels), labels).dtype == dtype


def test_label_smoothing_takes_entries_that_stand_for_no_output():
    """A log_weight of -inf (an entry standing for no outputs, e.g. padding of a hand-built SparseOutput)
    made the smoothed loss NaN (0 * -inf); without smoothing it was the loss without that entry."""
    values, indices = torch.randn(2, 4, dtype=torch.float64), torch.arange(4)
    log_weights, y = torch.tensor([0.0, 0.0, 0.0, -math.inf], dtype=torch.float64), torch.tensor([0, 1])
    for smoothing in (0.0, 0.1):
        padded = sparse_cross_entropy(SparseOutput(values, indices, log_weights), y, label_smoothing=smoothing)
        kept = sparse_cross_entropy(SparseOutput(values[:, :3], indices[:3], log_weights[:3]), y,
                                    label_smoothing=smoothing)
        torch.testing.assert_close(padded, kept)
