"""LSHLinear.topk's index (lsh_torch.retrieval): recall of planted top sets, the largest-norm rows,
when the index is rebuilt, and argument errors. Correctness only: speed is benchmarks/bench_topk.py's."""
import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsh_torch
from lsh_torch import LSHLinear
from lsh_torch import retrieval
from lsh_torch.retrieval import TopkIndex, topk_budget, topk_settings


def recall(found, exact):
    return (found.unsqueeze(-1) == exact.unsqueeze(-2)).any(-2).float().mean().item()


def check_scores(layer, x, values, indices):
    """Best first, no id twice per row, each value the exact output of its neuron."""
    assert (values[..., :-1] >= values[..., 1:]).all()
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()
    torch.testing.assert_close(values, F.linear(x, layer.weight, layer.bias).gather(-1, indices))


def test_settings_by_width():
    assert topk_settings(670_091) == {"num_tables": 60, "bits": 13, "probes": 12, "budget": 768, "norm_rows": 5235}
    assert topk_settings(100_000)["bits"] == 13
    # N / 2^13 rows per bucket clamped to [8, 80], K rounded: 13 from about 46K to 927K outputs
    assert [topk_settings(n)["bits"] for n in (46_340, 46_341, 926_819, 926_820, 2 ** 31 - 1)] == [12, 13, 13, 14, 20]
    assert topk_settings(10) == {"num_tables": 60, "bits": 1, "probes": 2, "budget": 10, "norm_rows": 0}
    with pytest.raises(ValueError, match="out_features"):
        topk_settings(0)


def test_planted_top_sets_are_found():
    # Each query has 5 rows planted near it (cosine ~0.9) among 20,000 random rows: they are its
    # exact top 5, and the tables must find them.
    torch.manual_seed(0)
    n, d, queries = 20_000, 32, 64
    layer = LSHLinear(d, n, rebuild=None).eval()
    x = torch.randn(queries, d)
    planted = torch.randperm(n)[: 5 * queries].reshape(queries, 5)
    with torch.no_grad():
        layer.bias.zero_()
        layer.weight[planted.flatten()] = (x.repeat_interleave(5, 0) + 0.5 * torch.randn(5 * queries, d))
        layer.weight[planted.flatten()] *= layer.weight.norm(dim=1).median() / layer.weight[planted.flatten()].norm(
            dim=1, keepdim=True)  # norms like the others': found by direction, not by norm
    values, indices = layer.topk(x, 5, min_recall=0)  # the index's own answers
    exact = layer.topk(x, 5, exact=True)[1]
    assert set(exact.flatten().tolist()) == set(planted.flatten().tolist())  # the premise
    assert recall(indices, exact) >= 0.95
    check_scores(layer, x, values, indices)


def test_largest_norm_rows_are_scored_for_every_row():
    # 128 rows of 5x the norm of the rest, at random directions: every query's exact top 5 are
    # among them, which tables of directions rank no higher than any other row.
    torch.manual_seed(0)
    n, d = 16_384, 32
    layer = LSHLinear(d, n, rebuild=None).eval()
    large = torch.randperm(n)[: n // 128]
    with torch.no_grad():
        layer.weight[large] *= 5
    x = torch.randn(256, d)
    exact = layer.topk(x, 5, exact=True)[1]
    assert torch.isin(exact, large).all()  # the premise
    assert layer.topk_norm_rows == n // 128
    values, indices = layer.topk(x, 5)
    assert recall(indices, exact) == 1.0
    check_scores(layer, x, values, indices)
    assert recall(layer.topk(x, 5, norm_rows=0, min_recall=0)[1], exact) < 0.8  # the tables alone miss many
    index = layer._topk_index
    assert set(index.order[: n // 128].tolist()) == set(large.tolist())
    assert torch.equal(index.order[index.rank.long()], torch.arange(n))  # rank is order's inverse


def test_inputs_of_zero_norm_get_the_rows_of_largest_bias():
    """A cold-start user's zero vector scores the bias alone: its top k are the rows of largest bias, which
    neither the tables (directions) nor the norm rows rank (a user review: recall 0.0 for zero inputs)."""
    torch.manual_seed(0)
    n, d = 20_000, 32
    layer = LSHLinear(d, n, rebuild=None).eval()
    with torch.no_grad():
        layer.bias.normal_(0, 0.1)
    x = torch.randn(64, d)
    x[::5] = 0
    values, indices = layer.topk(x, 10, min_recall=0)  # the index's own answers
    exact = layer.topk(x, 10, exact=True)[1]
    assert torch.equal(indices[::5], exact[::5]) and torch.equal(exact[0], layer.bias.topk(10).indices)
    check_scores(layer, x, values, indices)
    layer.bias = None  # no bias: nothing to add
    check_scores(layer, x, *layer.topk(x, 10, min_recall=0))


@pytest.mark.parametrize("budget, norm_rows", [(20, 0), (20, 3), (20, 400), (5, 2), (400, 0), (20, 399)])
def test_any_budget_and_norm_rows_give_distinct_exact_scores(budget, norm_rows):
    torch.manual_seed(1)
    layer = LSHLinear(16, 400, rebuild=None).eval()
    x = torch.randn(3, 7, 16)  # any leading shape
    values, indices = layer.topk(x, 5, budget=budget, norm_rows=norm_rows, min_recall=0)
    assert values.shape == indices.shape == (3, 7, 5)
    check_scores(layer, x, values, indices)
    if norm_rows == 400 or budget == 400:  # every output a candidate: the exact top 5
        exact = layer.topk(x, 5, exact=True)
        assert torch.equal(indices, exact[1]) and torch.equal(values, exact[0])


def test_a_change_to_few_rows_re_hashes_those_alone_into_the_tables_a_build_makes():
    """An optimizer step that moved a batch's rows rebuilt the whole index (a user review: 7-10 s at 1M x
    64); now the moved rows are merged into it, which gives the tables, order and answers of a new build."""
    torch.manual_seed(0)
    n = 20_000
    layer = LSHLinear(16, n, active=64, sparse_grad=True, rebuild=None)
    opt = lsh_torch.LazyAdam(layer.parameters(), lr=0.05)
    x = torch.randn(64, 16)
    layer.eval().topk(x, 5)
    first = layer._topk_index
    assert first.rehashed == n and first.checks
    for _ in range(2):  # each step moves the rows of its active set (64 of 20,000)
        labels = torch.randint(0, n, (8, 1))
        lsh_torch.sparse_cross_entropy(layer.train().forward_sparse(x[:8], labels), labels).backward()
        opt.step()
        opt.zero_grad()
    values, indices = layer.eval().topk(x, 5)
    index = layer._topk_index
    assert index is not first and 0 < index.rehashed <= n // 10 and not index.checks.get((5, 0, 0, 0))
    fresh = TopkIndex(layer.weight, layer.topk_tables, layer.topk_bits, layer._topk_seed, layer.bias)
    for name in ("offsets", "items", "order", "rank", "fingerprints"):
        assert torch.equal(getattr(index, name), getattr(fresh, name)), name
    assert first.items is not index.items and first.key != index.key  # the old index untouched (threads)
    settings = dict(probes=12, budget=100, norm_rows=156, seed=layer._topk_seed, min_recall=0)
    for a, b in zip(index.topk(x, layer.weight, layer.bias, 5, **settings),
                    fresh.topk(x, layer.weight, layer.bias, 5, **settings)):
        assert torch.equal(a, b)
    check_scores(layer, x, values, indices)
    with torch.no_grad():
        layer.weight[: n // 5] += 1  # a fifth of the rows: a new build
    layer.topk(x, 5)
    assert layer._topk_index.rehashed == n


@pytest.mark.parametrize("exact", [True, False])
def test_exclude_gives_the_best_k_a_row_may_get(exact):
    """A recommender's "not what the user has seen": the best k outside each row's exclude set, which a user
    wrote as topk(x, k + M) and a filter (a user review)."""
    torch.manual_seed(0)
    n = 3000
    layer = LSHLinear(16, n).eval()
    x = torch.randn(2, 5, 16)  # any leading shape
    dense = F.linear(x, layer.weight, layer.bias)
    seen = dense.topk(6, dim=-1).indices[..., ::2].clone()  # 3 of each row's top 6
    seen[0, 0, 0], seen[1, 2, 1] = -1, -100  # padding
    seen[0, 1, 1] = seen[0, 1, 0]  # a repeat
    options = {} if exact else dict(budget=n, norm_rows=0)  # every output scored: the index's exact answer
    values, indices = layer.topk(x, 4, exact=exact, exclude=seen, **options)
    masked = dense.scatter(-1, seen.clamp_min(0), float("-inf"))
    masked[0, 0, seen[0, 0, 0].clamp_min(0)] = dense[0, 0, 0]  # a padded entry excludes nothing (undo column 0)
    masked[1, 2, 0] = dense[1, 2, 0]
    want = masked.topk(4, dim=-1)
    assert values.shape == indices.shape == (2, 5, 4)
    assert torch.equal(indices, want.indices) and torch.equal(values, want.values)
    one = layer.topk(x, 2, exact=exact, exclude=dense.argmax(-1), **options).indices  # [*]: one per row
    assert torch.equal(one, dense.topk(3, dim=-1).indices[..., 1:])
    if not exact:  # the index's own answers: none excluded, each its exact score
        values, indices = layer.topk(x, 4, exclude=seen, min_recall=0)
        assert not retrieval.among(indices.reshape(10, 4), seen.reshape(10, 3)).any()
        check_scores(layer, x, values, indices)


def test_exclude_leaves_room_for_what_the_row_may_get():
    """A review of the exclusion inside the index: cold-start users who saw the most popular items got none of the
    next ones (the k rows of largest bias, all excluded: recall 0.0), and a random-selection layer returned -inf
    (excluded ids) though allowed outputs remained."""
    torch.manual_seed(0)
    n, k = 20_000, 10
    layer = LSHLinear(32, n).eval()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(n))
    x = torch.zeros(8, 32)  # scores: the bias alone
    seen = layer.bias.topk(k).indices.expand(8, -1)
    want = layer.bias.topk(2 * k).indices[k:]
    got = layer.topk(x, k, exclude=seen, min_recall=0).indices
    assert (got.sort(1).values == want.sort().values).all()
    # The likeliest rows alone, standing in for a failed index, all excluded for a heavy user: answered exactly (it
    # returned -inf and excluded ids though 15,360 outputs remained).
    n = 16_384
    layer = LSHLinear(32, n, rebuild=None).eval()
    with torch.no_grad():
        layer.weight[torch.randperm(n)[:1000]] *= 5
    layer.topk(torch.randn(200, 32), 5, probes=1, budget=20, exclude=torch.full((200, 1024), -1))  # a light user
    heavy = layer._topk_index.alone_order[:1024].expand(4, -1)
    assert layer.topk_answered_by(5, probes=1, budget=20, exclude=heavy)[:3] == (5, 0, 0)
    x = torch.randn(4, 32)
    got = layer.topk(x, 5, probes=1, budget=20, exclude=heavy)
    want = F.linear(x, layer.weight, layer.bias).index_fill(1, heavy[0], -math.inf).topk(5)
    assert torch.equal(got.values, want.values) and torch.equal(got.indices, want.indices)
    random = LSHLinear(16, 64, selection="random").eval()
    x = torch.randn(4, 16)
    got = random.topk(x, 10, budget=16, exclude=torch.arange(40).expand(4, -1))
    assert got.values.isfinite().all() and (got.indices >= 40).all()  # 16 + 64 candidates: every output


def test_exclude_argument_errors():
    layer = LSHLinear(16, 300).eval()
    x = torch.randn(4, 16)
    for bad, error, match in ((torch.zeros(4, 2), TypeError, "exclude must be an int64 tensor"),
                              (torch.zeros(3, 2, dtype=torch.int64), ValueError, r"exclude must have shape \(4,\)"),
                              (torch.full((4, 2), 300), ValueError, r"exclude must be in \[0, out_features=300\)")):
        with pytest.raises(error, match=match):
            layer.topk(x, 2, exclude=bad)
    empty = layer.topk(x[:0], 3, exclude=torch.zeros(0, 2, dtype=torch.int64))  # an empty batch, as without
    assert empty.values.shape == empty.indices.shape == (0, 3)
    # As torch.topk of the masked scores: a row left fewer than k outputs gets -inf for the rest (k + M past
    # out_features, or past an explicit budget, was refused).
    for exact in (True, False):
        left = layer.topk(x, 2, exact=exact, exclude=torch.arange(1, 300).expand(4, -1))
        assert (left.indices[:, 0] == 0).all() and left.values[:, 1].isneginf().all()
        assert torch.equal(left.values[:, 0], F.linear(x, layer.weight, layer.bias)[:, 0])
    wide = LSHLinear(16, 5000).eval()
    for width in (5, 6, 7, 8):  # the search widened by M padded to a power of two: one recall check for them all,
        wide.topk(x, 2, budget=40, exclude=torch.zeros(4, width, dtype=torch.int64))  # apart from calls without
    assert list(wide.topk_checks) == [(2, wide.inference_probes, 40, 39, 8)]
    assert wide.topk_answered_by(2, budget=40, exclude=torch.zeros(4, 6, dtype=torch.int64)) == (2, 12, 40, 39, 8)
    assert wide.topk_answered_by(2, budget=40) == (2, 12, 40, 39)


def test_outputs_masked_by_a_minus_inf_bias_are_never_returned_twice():
    """With all but 10 of 20,000 outputs masked (-inf bias), the top 700 ends in -inf ties, where a skipped
    candidate stood beside its norm-row copy: an id twice in a row (a user review), and an excluded id returned."""
    torch.manual_seed(0)
    n = 20_000
    layer = LSHLinear(16, n, rebuild=None).eval()
    x = torch.randn(32, 16)
    available = torch.randperm(n)[:10]
    with torch.no_grad():
        layer.bias.fill_(float("-inf"))
        layer.bias[available] = 0.0
    values, indices = layer.topk(x, 700, min_recall=0)
    assert (indices.sort(1).values.diff(dim=1) != 0).all()
    assert set(indices[:, :10].flatten().tolist()) == set(available.tolist()) and values[:, 10:].isneginf().all()


def test_a_warm_up_without_the_check_leaves_it_to_the_queries_that_follow():
    """The README's serving advice: a random warm-up batch judged by the check could turn the index off."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 20_000).eval()
    layer.topk(torch.randn(64, 16), 5, min_recall=0)
    assert layer._topk_index is not None and layer.topk_checks == {}


def test_index_is_cached_until_the_weight_changes():
    torch.manual_seed(0)
    layer = LSHLinear(16, 3000, rebuild=None, sparse_grad=True).eval()
    x = torch.randn(8, 16)
    layer.topk(x, 3)
    index = layer._topk_index
    layer.topk(x, 3)
    layer.topk(torch.randn(4, 16), 2, probes=1, budget=50, norm_rows=7)  # per-call options reuse it
    assert layer._topk_index is index
    with torch.no_grad():
        layer.bias.add_(1.0)  # the bias is read at every call, never indexed (its checks are redone: below)
    check_scores(layer, x, *layer.topk(x, 3))
    assert layer._topk_index is index

    def changes_rebuild(change):
        before = layer._topk_index
        change()
        values, indices = layer.topk(x, 3)
        assert layer._topk_index is not before
        check_scores(layer, x, values, indices)
        return indices

    def plant():  # a new winner for every query: a huge row along their mean
        with torch.no_grad():
            layer.weight[123] = 100 * x.mean(0) / x.mean(0).norm()
    indices = changes_rebuild(plant)
    assert (indices[:, 0] == 123).float().mean() > 0.5
    state = copy.deepcopy(layer.state_dict())
    for change in (lambda: layer.load_state_dict(state), lambda: layer.reset_parameters(), layer.rebuild):
        changes_rebuild(change)

    def step(opt):
        def run():
            labels = torch.randint(0, 3000, (8,))
            lsh_torch.sparse_cross_entropy(layer.forward_sparse(x, labels), labels).backward()
            opt.step()
            opt.zero_grad()
        return run
    layer.train()
    changes_rebuild(step(lsh_torch.LazyAdam(layer.parameters(), lr=1e-2)))
    changes_rebuild(step(torch.optim.SparseAdam(list(layer.parameters()), lr=1e-2)))
    # A fused optimizer updates in place without bumping version counters (recall 0.08 against the new
    # weight was measured before a step hook bumped them for indexed parameters).
    dense = LSHLinear(16, 3000, rebuild=None).train()
    layer, fused = dense, torch.optim.AdamW(dense.parameters(), lr=1e-2, fused=True)
    layer.topk(x, 3)
    changes_rebuild(step(fused))
    # Writes through .data bypass the version counter: rebuild() is the way to tell the layer.
    index = layer._topk_index
    layer.weight.data.mul_(2)
    layer.topk(x, 3)
    assert layer._topk_index is index
    layer.rebuild()
    layer.topk(x, 3)
    assert layer._topk_index is not index


def test_index_changes_with_its_settings_and_leaves_copies():
    torch.manual_seed(0)
    layer = LSHLinear(16, 3000, rebuild=None).eval()
    x = torch.randn(8, 16)
    expected = layer.topk(x, 3, min_recall=0)
    layer.topk_tables, layer.topk_bits = 7, 5
    layer.topk(x, 3)
    index = layer._topk_index
    assert (index.num_tables, index.bits, index.items.shape) == (7, 5, (7, 3000))
    layer.topk_tables, layer.topk_bits = 60, topk_settings(3000)["bits"]
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._topk_index is None  # a cache, never copied
        got = twin.topk(x, 3, min_recall=0)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # same seed, same answer


def test_autocast_reuses_the_index_of_the_parameter():
    layer = LSHLinear(16, 3000, rebuild=None).eval()
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, _ = layer.topk(x, 3)
        index = layer._topk_index
        layer.topk(x, 3)
    assert values.dtype == torch.bfloat16 and layer._topk_index is index


def test_calls_under_bfloat16_and_float16_autocast_share_the_recall_check():
    """The check keeps the inputs it scored across calls: one call under autocast to bfloat16 and the next to
    float16 (or in float32) left two dtypes that autocast's cat refused to join."""
    layer = LSHLinear(16, 3000, rebuild=None).eval()
    x = torch.randn(4, 16)
    for low in (torch.bfloat16, torch.float16, None):
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
            values, indices = layer.topk(x, 3)
        assert values.dtype == (low or torch.float32)
    (check,) = layer.topk_checks.values()
    assert check.inputs == 12 and check.queries.shape == (12, 16)


def test_a_k_past_the_default_budget_takes_four_candidates_per_answer():
    """topk(x, k) with k above the default budget of 768 was refused, even k = out_features, which torch.topk takes;
    the default budget now grows to 4k (every output: the exact computation). An explicit budget still bounds k."""
    layer = LSHLinear(16, 3000, rebuild=None).eval()
    x = torch.randn(8, 16)
    assert layer.topk_answered_by(5)[2] == 768 and layer.topk_answered_by(500)[2] == 2000
    assert layer.topk_answered_by(3000) is None and layer.topk_answered_by(750) is None  # 4k >= 3000: exact
    for k in (500, 3000):
        values, indices = layer.topk(x, k)
        expected = torch.topk(F.linear(x, layer.weight, layer.bias), k)
        assert values.shape == (8, k)
        if k == 3000:
            assert torch.equal(values, expected.values)
        else:
            check_scores(layer, x, values, indices)
    with pytest.raises(ValueError, match=r"budget=800.*must be in \[0, 800\], got 900"):
        layer.topk(x, 900, budget=800)
    with pytest.raises(ValueError, match=r"k \(at most out_features\) must be in \[0, 3000\], got 3001"):
        layer.topk(x, 3001)


def test_random_selection_scores_random_neurons_without_an_index():
    layer = LSHLinear(16, 3000, selection="random", rebuild=None).eval()
    x = torch.randn(8, 16)
    values, indices = layer.topk(x, 3, budget=100)
    check_scores(layer, x, values, indices)
    assert layer._topk_index is None


@pytest.mark.parametrize("selection", ["lsh", "random"])
def test_an_input_gets_the_same_answer_however_it_is_batched(selection):
    """topk's lookups were keyed by the rows' places in the batch: candidates tied at the budget (or a
    random layer's draws) differed, and 9 of 32 rows (31 with selection="random") got another answer
    alone than batched. Keyed by their codes, they do not."""
    torch.manual_seed(0)
    layer = LSHLinear(64, 4000, selection=selection).eval()
    x = torch.randn(32, 64)

    def topk(rows):  # min_recall=0: the index's own answers, not the check's exact ones
        return layer.topk(rows, 5, budget=20, norm_rows=0, min_recall=0)

    values, indices = topk(x)
    order = torch.randperm(32)
    assert all(torch.equal(a, b[order]) for a, b in zip(topk(x[order]), (values, indices)))
    for b in range(32):
        assert all(torch.equal(a, t[b:b + 1]) for a, t in zip(topk(x[b:b + 1]), (values, indices)))


def test_topk_argument_errors():
    layer = LSHLinear(16, 300, rebuild=None)
    x = torch.randn(4, 16)
    for bad in (-1, 301):
        with pytest.raises(ValueError, match="norm_rows"):
            layer.topk(x, 3, norm_rows=bad)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="norm_rows"):
            layer.topk(x, 3, norm_rows=bad)
    with pytest.raises(ValueError, match="probes"):
        layer.topk(x, 3, probes=2 ** layer.topk_bits + 1)
    with pytest.raises(ValueError, match="k"):
        layer.topk(x, 51, budget=50)
    with pytest.raises(TypeError, match="exact must be a bool"):
        layer.topk(x, 3, exact="no")  # bool("no") is True
    for name, bad in (("probes", -3), ("budget", 0), ("norm_rows", -7)):  # unused by exact=True, but checked
        with pytest.raises(ValueError, match=name):
            layer.topk(x, 3, exact=True, **{name: bad})
    assert layer.topk(x, 200, exact=True).indices.shape == (4, 200)  # any k up to out_features
    for bad, error in ((1.5, ValueError), (-0.1, ValueError), ("0.9", TypeError), (True, TypeError)):
        with pytest.raises(error, match="min_recall"):
            layer.topk(x, 3, min_recall=bad)
    index = layer._topk_index_of(layer.weight, layer.bias)  # the public index: a weight it was not built from is refused
    with pytest.raises(ValueError, match="weight the index was built from"):
        index.topk(x, torch.randn(301, 16), None, 3, 4, 50, 0, 0)
    for bad, error in ((0, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="probes"):
            index.topk(x, layer.weight, None, 3, bad, 50, 0, 0)
    for weight in (torch.randn(300), torch.ones(300, 16, dtype=torch.int64), "weight"):
        with pytest.raises(TypeError, match="weight must be a floating \\[N, d\\] tensor"):
            TopkIndex(weight, 4, 6, seed=0)
    with pytest.raises(TypeError, match="seed"):
        TopkIndex(layer.weight, 4, 6, seed=0.5)
    with pytest.raises(RuntimeError, match="meta device"):
        LSHLinear(16, 300, device="meta").topk(x.to("meta"), 3, budget=50)
    assert LSHLinear(16, 300, device="meta").topk(x.to("meta"), 3, exact=True)[0].shape == (4, 3)
    with pytest.raises(ValueError, match="out_features"):
        topk_budget(-5)
    for name, bad, error in (("topk_tables", 0, ValueError), ("topk_bits", 21, ValueError),
                             ("topk_tables", 2.5, TypeError)):
        broken = copy.deepcopy(layer)
        setattr(broken, name, bad)
        with pytest.raises(error, match=name):
            broken.topk(x, 3, budget=50)
    layer.topk(x, 3, budget=50)  # an index, then a NaN bias entry (its checks were skipped: unchecked answers)
    with torch.no_grad():
        layer.bias[7] = float("nan")
    with pytest.raises(ValueError, match="bias has NaN"):
        layer.topk(x, 3, budget=50)
    with pytest.raises(ValueError, match="bias has NaN"):
        copy.deepcopy(layer).topk(x, 3, budget=50)  # a new index
    with torch.no_grad():
        layer.bias[7] = -math.inf  # a mask: that output is never in the top k
    assert 7 not in layer.topk(x, 3, budget=50)[1]
    with torch.no_grad():
        layer.bias[7] = 0.0
        layer.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.topk(x, 3, budget=50)


def hard_layer():
    """Rows at random directions, 128 of them 5x longer: with no norm rows and 1 probe, the index
    finds about 0.3 of the exact top 5."""
    torch.manual_seed(0)
    layer = LSHLinear(32, 16_384, rebuild=None).eval()
    with torch.no_grad():
        layer.weight[torch.randperm(16_384)[:128]] *= 5
    return layer, torch.randn(200, 32), dict(norm_rows=0, probes=1)


def test_an_index_below_min_recall_answers_exactly(monkeypatch):
    layer, x, hard = hard_layer()
    exact = layer.topk(x, 5, exact=True)
    own = layer.topk(x, 5, min_recall=0, **hard)
    assert recall(own[1], exact[1]) < 0.5  # the premise: the index alone is poor here
    assert layer.topk_checks == {}  # min_recall=0 measured nothing
    with pytest.warns(UserWarning, match=r"found 0\.\d+ of the exact top 5 of the last 64 inputs checked, less than min_recall=0\.9") as record:
        got = layer.topk(x, 5, **hard)
    assert record[0].filename == __file__  # the warning names the caller's line
    assert torch.equal(got[1], exact[1]) and torch.equal(got[0], exact[0])
    # 64 inputs spread over the call's checked; the 136 others answered exactly, one in 16 of them also searched in
    # the index; the verdict stands on the last 64 checked.
    spread = torch.arange(64) * 200 // 64
    retried = torch.tensor([i for i in range(200) if i not in spread.tolist()])[15::16]
    last = torch.cat([spread, retried])[-64:]
    (key, check), = layer.topk_checks.items()
    assert key == (5, 1, layer.topk_budget, 0) and check.inputs == 64 + 8 and check.recall < 0.5
    assert check.recall == pytest.approx(recall(own[1][last], exact[1][last]))
    searched, search = [], TopkIndex._search
    monkeypatch.setattr(TopkIndex, "_search", lambda *a: searched.append(1) or search(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at the verdict
        again = layer.topk(x[:3], 5, **hard)
    assert torch.equal(again[1], exact[1][:3]) and not searched  # exact, the index not even searched
    with pytest.warns(UserWarning, match="less than min_recall=0.99") as record:  # a stricter call is told too
        layer.topk(x[:3], 5, min_recall=0.99, **hard)
    assert record[0].filename == __file__
    assert layer.topk(x, 5, min_recall=0.2, **hard)[1].shape == (200, 5) and searched  # a laxer call takes it


def test_the_verdict_follows_the_last_64_inputs_checked_both_ways(monkeypatch):
    """Checked on its first 64 inputs only, an index kept answering inputs unlike them with the recall of theirs:
    users who had seen their own best 200 items got 0.68 of their masked top 5 from an index that found all of
    light users'. Later inputs are checked too (one in 1,024; one in 128 here, for fewer queries), and the last 64
    checked decide; answered exactly, one in 16 is searched in the index, which answers again once they say it may."""
    monkeypatch.setattr(retrieval, "TOPK_AUDIT_EVERY", 128)
    layer, x, _ = hard_layer()
    x = torch.randn(8192, 32, generator=torch.Generator().manual_seed(1))
    scores = F.linear(x, layer.weight, layer.bias)
    light = torch.randint(0, 16_384, (8192, 200), generator=torch.Generator().manual_seed(2))  # seen at random
    heavy = scores.topk(200, dim=1).indices  # each user's own best 200 seen
    settings = dict(norm_rows=128)
    key = (5, layer.inference_probes, layer.topk_budget, 128, 256)
    exact = lambda rows, seen: layer.topk(x[rows], 5, exact=True, exclude=seen[rows])[1]
    first = slice(0, 64)
    assert recall(layer.topk(x[first], 5, exclude=light[first], **settings)[1], exact(first, light)) == 1.0
    assert layer.topk_answered_by(5, exclude=light, **settings) == key
    premise = slice(7680, 8192)
    assert recall(layer.topk(x[premise], 5, exclude=heavy[premise], min_recall=0, **settings)[1],
                  exact(premise, heavy)) < 0.75  # the index alone, for heavy users
    with pytest.warns(UserWarning, match="of the last 64 inputs checked"):
        for start in range(64, 6144, 512):  # 6,080 heavy users: one in 128 checked, one in 16 once answered exactly
            layer.topk(x[start:start + 512], 5, exclude=heavy[start:start + 512], **settings)
    assert layer.topk_answered_by(5, exclude=heavy, **settings) is None  # exact scores now
    later = slice(6144, 6656)
    assert torch.equal(layer.topk(x[later], 5, exclude=heavy[later], **settings)[1], exact(later, heavy))
    for start in range(6656, 8192, 512):  # light users again: 96 of 1,536 searched in the index
        layer.topk(x[start:start + 512], 5, exclude=light[start:start + 512], **settings)
    assert layer.topk_answered_by(5, exclude=light, **settings) == key
    check = layer.topk_checks[key]
    assert check.inputs > 64 + 96 and check.hits.shape == (64,) and check.recall >= 0.9


def test_audited_inputs_wait_to_be_checked_together():
    """Audits are checked 16 inputs at a time (one read of every row for all of them); calls of one settings key
    may exclude histories of different widths (129-256 share a key) or none (width 0 and None share one)."""
    check = retrieval.RecallCheck()
    q = lambda n: torch.randn(n, 4)
    ids = lambda n: torch.zeros(n, 5, dtype=torch.long)
    assert check.wait(q(6), ids(6).float(), ids(6), torch.ones(6, 3, dtype=torch.long)) is None
    assert check.wait(q(6), ids(6).float(), ids(6), None) is None
    queries, values, indices, seen = check.wait(q(4), ids(4).float(), ids(4), torch.full((4, 1), 2))
    assert queries.shape == (16, 4) and values.shape == indices.shape == (16, 5) and check.pending == []
    assert seen.tolist() == [[1, 1, 1]] * 6 + [[-1, -1, -1]] * 6 + [[2, -1, -1]] * 4  # -1: padding, as exclude's
    check.wait(q(16), ids(16).float(), ids(16), None)  # (a whole batch at once)
    assert check.pending == []


def test_an_index_is_trusted_after_64_inputs_and_checked_again_after_a_change(monkeypatch):
    layer, x, _ = hard_layer()  # the defaults find all of it (the long rows are norm rows)
    exact = layer.topk(x, 5, exact=True)
    checked = []
    real = retrieval.exact_topk
    monkeypatch.setattr(retrieval, "exact_topk", lambda x, w, *a: (  # every output scored: a check's
        w.shape[0] == layer.out_features and checked.append(x.shape[0])) or real(x, w, *a))
    for rows in (slice(0, 30), slice(30, 60), slice(60, 200)):  # checks add up across calls
        values, indices = layer.topk(x[rows], 5)
        assert torch.equal(indices, exact[1][rows])
    assert checked == [30, 30, 4] and layer.topk_checks[(5, 12, 768, 128)].recall == 1.0
    layer.topk(x, 5)
    assert checked == [30, 30, 4]  # trusted: no exact scores any more
    layer.topk(x, 3)
    assert checked == [30, 30, 4, 64]  # other settings, another check
    with torch.no_grad():
        layer.weight.mul_(1.01)
    assert layer.topk_checks == {}
    layer.topk(x, 5)
    assert checked[-1] == 64 and set(layer.topk_checks) == {(5, 12, 768, 128)}
    # A new bias changes the top k but not the index: the same index, checked again (a bias-only change
    # kept the old verdict, 0.994, while the index's answers fell to 0.37).
    index = layer._topk_index
    with torch.no_grad():
        layer.bias.add_(1.0)
    assert layer.topk_checks == {}
    layer.topk(x, 5)
    assert layer._topk_index is index and checked[-1] == 64 and set(layer.topk_checks) == {(5, 12, 768, 128)}


def test_a_failed_index_falls_back_to_the_likeliest_rows_alone(monkeypatch):
    """A trained XMC head keeps its winners among a few long rows that tables of directions cannot rank
    (the demo's 100K-label head: the default index found 0.56 of its top 5). With the default
    norm_rows, topk then scores the likeliest rows alone (inputs centred on the origin: the largest-norm
    rows), checked again before they answer. (The
    default tables find 0.95 here: one probe and 20 candidates make them fail.)"""
    torch.manual_seed(0)
    layer = LSHLinear(32, 16_384, rebuild=None).eval()
    with torch.no_grad():
        layer.weight[torch.randperm(16_384)[:1000]] *= 5  # every exact top 5 is among these
    x = torch.randn(200, 32)
    exact = layer.topk(x, 5, exact=True)
    checked, real = [], retrieval.exact_topk
    monkeypatch.setattr(retrieval, "exact_topk", lambda x, w, *a: (  # every output scored: a check's
        w.shape[0] == layer.out_features and checked.append(x)) or real(x, w, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the stand-in passes its check
        got = layer.topk(x, 5, probes=1, budget=20)
    assert torch.equal(got[1], exact[1]) and torch.equal(got[0], exact[0])
    (default, failed), (alone, check) = layer.topk_checks.items()
    assert default == (5, 1, 20, 128) and failed.recall < 0.9  # the premise: the index alone is poor here
    assert alone == (5, 0, 0, 1024) and check.inputs == 64 and check.recall == 1.0  # 128 doubled past the 1,000
    first, second = checked  # the stand-in was checked on inputs other than those that chose it
    assert first.shape == second.shape == (64, 32) and not (first.unsqueeze(1) == second).all(2).any()
    searched, search = [], TopkIndex._search
    monkeypatch.setattr(TopkIndex, "_search", lambda self, *a: searched.append(a[4:7]) or search(self, *a))
    checked.clear()
    again = layer.topk(x, 5, probes=1, budget=20)
    assert torch.equal(again[1], exact[1]) and searched == [(0, 0, 1024)] and not checked  # trusted, no table
    # A check passed at a lower min_recall fails at this one: the stand-in's rows were ordered all the same.
    layer.rebuild()
    layer.topk(x, 5, probes=1, budget=20, min_recall=0.05)
    assert list(layer.topk_checks) == [(5, 1, 20, 128)]  # passed: no stand-in yet
    assert layer.topk_answered_by(5, probes=1, budget=20) == (5, 0, 0, 1024)
    # Given norm rows are the caller's: below min_recall, those settings answer exactly as before.
    with pytest.warns(UserWarning, match="less than min_recall=0.95: answering exactly"):
        assert torch.equal(layer.topk(x, 5, probes=1, budget=20, norm_rows=128)[1], exact[1])


def stand_in_case(n=16_384, d=32):
    """Rows in a cone around m, the longest along m, inputs near -m: the winners lean away from m."""
    torch.manual_seed(0)
    m = F.normalize(torch.randn(d), dim=0)
    weight = 2 * m + 0.5 * torch.randn(n, d)
    weight[:2000] = 4 * m + 0.3 * torch.randn(2000, d)  # the longest rows, the losers
    layer = LSHLinear(d, n, rebuild=None).eval()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer, -m + 0.1 * torch.randn(300, d)


def test_the_stand_in_ranks_rows_by_their_estimate_for_the_checked_inputs():
    """A softmax-trained head's mean input points against its mean row, and the winners are the rows
    that lean away from it, not the longest (the demo's 100K head trained per row: the norm order needed
    half its rows, topk answered exactly). Here rows in a cone around m, the longest along m, and inputs
    near -m: the estimate m'.w + b + spread |w| for the checked inputs' mean m' finds the winners in few rows."""
    layer, x = stand_in_case()
    n = layer.out_features
    exact = layer.topk(x, 5, exact=True)
    by_norm = torch.empty(n, dtype=torch.long).scatter_(0, layer.weight.norm(dim=1).argsort(descending=True),
                                                        torch.arange(n))
    assert by_norm[exact[1]].flatten().float().quantile(0.9) > n // 4  # the premise: norms would answer exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no exact answers
        values, indices = layer.topk(x, 5, probes=1, budget=8)
    check_scores(layer, x, values, indices)
    assert recall(indices, exact[1]) >= 0.9  # min_recall, as checked
    stand_in = layer.topk_answered_by(5, probes=1, budget=8)
    assert stand_in[:3] == (5, 0, 0) and stand_in[3] <= n // 32
    # The bias is in the estimate: a large one on a few rows puts them first.
    with torch.no_grad():
        layer.bias[:50] = 100.0
    values, indices = layer.topk(x, 5, probes=1, budget=8)
    assert set(indices.flatten().tolist()) <= set(range(50))
    assert set(layer._topk_index.alone_order[:50].tolist()) == set(range(50))
    # ... also a replaced bias, and one computed on access (a parametrization: no Parameter to hold).
    for replace in (lambda b: setattr(layer, "bias", nn.Parameter(b)),
                    lambda b: torch.nn.utils.parametrize.register_parametrization(layer, "bias", Plus(b - layer.bias))):
        bias = torch.zeros(n)
        bias[50:100] = 100.0
        replace(bias)
        values, indices = layer.topk(x, 5, probes=1, budget=8)
        assert set(indices.flatten().tolist()) <= set(range(50, 100))
        assert set(layer._topk_index.alone_order[:50].tolist()) == set(range(50, 100))


class Plus(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.register_buffer("offset", offset.detach().clone())

    def forward(self, x):
        return x + self.offset


@pytest.mark.parametrize("outlier", [float("inf"), 1e19, 10.0])
def test_the_stand_in_holds_with_an_outlying_checked_input(outlier):
    """One input among the 64 checked, infinite, huge or about 50 times as long as the others, moved the
    mean the rows are ordered by: the stand-in failed, or ordered every row alike (NaN), and topk answered
    exactly."""
    layer, x = stand_in_case()
    if outlier == float("inf"):
        x[0, 3] = outlier  # infinite scores, not NaN ones: counted in the check
    else:
        x[0] = outlier * torch.randn(x.shape[1])  # the others: about 1 long
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no exact answers
        values, indices = layer.topk(x, 5, probes=1, budget=8)
    assert layer.topk_answered_by(5, probes=1, budget=8)[:3] == (5, 0, 0)
    assert recall(indices[1:], layer.topk(x[1:], 5, exact=True)[1]) >= 0.9


def test_a_failed_index_answers_exactly_where_norms_do_not_tell():
    """Rows of one norm, inputs centred on the origin, no bias: the likeliest rows are any rows, and a quarter
    of them cannot stand in."""
    torch.manual_seed(0)
    layer = LSHLinear(32, 16_384, rebuild=None).eval()
    with torch.no_grad():
        layer.weight.copy_(F.normalize(layer.weight, dim=1))
    x = torch.randn(200, 32)
    with pytest.warns(UserWarning, match="nor would the likeliest rows alone, up to a quarter of them"):
        got = layer.topk(x, 5, probes=1, budget=20)
    assert torch.equal(got[1], layer.topk(x, 5, exact=True)[1])
    assert list(layer.topk_checks) == [(5, 1, 20, 128)]  # no stand-in was tried


def test_a_failed_stand_in_is_widened_and_checked_again():
    """The 64 inputs that choose the stand-in look like u, whose winners are the 600 longest rows; the
    others like v, whose winners are the next 900: the first stand-in fails its check on them, and
    a wider one (from the ranks its own check recorded) answers."""
    torch.manual_seed(0)
    n, d, batch = 8192, 16, 640
    u, v = F.normalize(torch.randn(2, d), dim=1)
    weight = torch.randn(n, d) * 0.3
    weight[:600] = (weight[:600] + 3 * u) * 2.0
    weight[600:1500] = (weight[600:1500] + 3 * v) * 1.5
    layer = LSHLinear(d, n, rebuild=None).eval()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    x = v + 0.3 * torch.randn(batch, d)
    x[torch.arange(64) * batch // 64] = u + 0.3 * torch.randn(64, d)  # the first check's inputs
    values, indices = layer.topk(x, 5, probes=1, budget=8)
    exact = layer.topk(x, 5, exact=True)
    check_scores(layer, x, values, indices)
    assert recall(indices, exact[1]) > 0.9  # min_recall, as checked
    (index, failed), (first, narrow), (wider, passed) = layer.topk_checks.items()
    assert index == (5, 1, 8, 64) and failed.recall < 0.9
    assert first[:3] == wider[:3] == (5, 0, 0) and first[3] < wider[3] <= n // 4
    assert narrow.recall < 0.9 <= passed.recall and narrow.inputs == passed.inputs == 64
    assert layer.topk_answered_by(5, probes=1, budget=8) == wider


def test_a_check_gathers_small_batches_and_tiny_layers_answer():
    torch.manual_seed(0)
    layer = LSHLinear(16, 8192, rebuild=None).eval()
    with torch.no_grad():
        layer.weight[:600] *= 8
    x = torch.randn(70, 16)
    for rows in torch.arange(70).split(10):  # a check spans calls: its ranks add up with its inputs
        layer.topk(x[rows], 5, probes=1, budget=8)
    failed = layer.topk_checks[(5, 1, 8, 64)]
    assert failed.inputs == 64 and failed.winners.shape == (5 * 64,) and failed.queries.shape == (64, 16) and failed.recall < 0.9
    assert layer.topk_answered_by(5, probes=1, budget=8)[:3] == (5, 0, 0)
    # N // 128 == 0 and N // 4 < k: no stand-in, exact scores with a warning
    for n, k in ((100, 5), (40, 12)):
        small = LSHLinear(16, n, rebuild=None).eval()
        x = torch.randn(80, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # whether the index fails here is not the point
            values, indices = small.topk(x, k, probes=1, budget=k, min_recall=1.0)
        check_scores(small, x, values, indices)
        assert indices.shape == (80, k)


def test_the_stand_in_holds_min_recall_of_the_failed_check_rounded_to_a_doubling():
    n = 16_384  # N // 128 = 128
    ranks = torch.cat([torch.arange(90) * 3, torch.full((10,), 9_000)])  # 90% of them below 270
    assert retrieval.rows_alone((5, 12, 768, 128), ranks, 0.9, n) == 512  # 128 doubled past 267 + 1
    assert retrieval.rows_alone((5, 12, 768, 128), ranks, 0.5, n) == 256
    assert retrieval.rows_alone((5, 0, 0, 512), ranks, 0.9, n) == 1024  # wider than the failed stand-in
    assert retrieval.rows_alone((5, 12, 768, 128), ranks, 0.95, n) is None  # 9,001 rows: past N // 4
    assert retrieval.rows_alone((300, 12, 768, 128), ranks, 0.5, n) == 512  # at least k


@pytest.mark.parametrize("fused", [True, False])
def test_the_step_hook_leaves_parameters_a_step_did_not_update(fused):
    """The fused-step hook bumped every indexed parameter after any step: a frozen head's index was
    rebuilt at every step (seconds at 670K outputs), and a graph that saved its weight failed backward."""
    torch.manual_seed(0)
    head, body = LSHLinear(16, 3000).eval(), nn.Linear(16, 16)
    head.requires_grad_(False)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2, fused=fused)
    x = torch.randn(4, 16)
    head.topk(x, 3)
    index, version = head._topk_index, head.weight._version
    pending = F.linear(body(x), head.weight)  # saves the head's weight for the body's gradient
    body(x).sum().backward()
    opt.step()
    pending.sum().backward()  # the head's weight, saved by the graph, was not modified
    head.topk(x, 3)
    assert head.weight._version == version and head._topk_index is index


def test_a_parametrized_weight_warns_that_topk_rebuilds_its_index():
    layer = nn.utils.parametrizations.weight_norm(LSHLinear(16, 3000).eval())
    with pytest.warns(UserWarning, match="parametrized"):
        layer.topk(torch.randn(4, 16), 3)


def test_the_check_runs_eagerly_under_compile():
    # A check finished across two calls of a compiled topk used to fail in the tracer (a symbolic recall).
    layer, x, hard = hard_layer()
    exact = layer.topk(x, 5, exact=True)[1]
    compiled = torch.compile(lambda x: layer.topk(x, 5, **hard)[1], backend="eager")
    with pytest.warns(UserWarning, match="less than min_recall"):
        got = [compiled(x[:40]), compiled(x[40:140]), compiled(x[140:])]
    assert torch.equal(torch.cat(got), exact)  # 40 + 24 checked inputs, then exact answers


def test_inputs_with_nan_scores_are_not_counted_by_the_check():
    """A NaN input has no top k to find: counted as misses, 8 of 64 made a good index (recall 0.87)
    answer exactly from then on, with a warning blaming the index."""
    layer, x, _ = hard_layer()
    x[::8] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.topk(x, 5)
        (check,) = layer.topk_checks.values()
        assert check.inputs == 56 and check.recall == 1.0  # 8 of the 64 checked were NaN
        layer.topk(x[1:8].repeat(2, 1), 5)  # the check goes on with the next inputs
    (check,) = layer.topk_checks.values()
    assert check.inputs == 64 and check.recall == 1.0


def test_exact_topk_in_blocks(monkeypatch):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(37, 8), torch.randn(500, 8), torch.randn(500)
    expected = F.linear(x, weight, bias).topk(4, dim=1)
    monkeypatch.setattr(retrieval, "EXACT_BLOCK", 500 * 5)  # 5 inputs at a time
    values, indices = retrieval.exact_topk(x, weight, bias, 4)
    torch.testing.assert_close(values, expected.values)  # a smaller product may sum in another order
    assert torch.equal(indices, expected.indices)


def test_index_memory_is_what_the_docstring_says():
    weight = torch.randn(5000, 8)
    index = TopkIndex(weight, 10, 6, seed=0)
    assert index.nbytes() == 4 * 10 * 5000 + 4 * 10 * (2 ** 6 + 1) + 12 * 5000 + 4 * 9 * 60 + 4 * 5000 + 4 * 8
    with_bias = TopkIndex(weight, 10, 6, seed=0, bias=torch.randn(5000))
    assert with_bias.nbytes() == index.nbytes() + 12 * 5000  # the rows' order and places by bias


@pytest.mark.parametrize("exact", [True, False])
def test_topk_returns_torch_topks_named_tuple_and_takes_k_zero(exact):
    """A plain tuple had no .values / .indices, and k=0 (which torch.topk takes) was refused."""
    torch.manual_seed(0)
    layer, x = LSHLinear(16, 3000), torch.randn(5, 16)
    got = layer.topk(x, 4, exact=exact)
    assert isinstance(got, torch.return_types.topk) and got.values.shape == got.indices.shape == (5, 4)
    empty = layer.topk(x, 0, exact=exact)
    assert empty.values.shape == empty.indices.shape == (5, 0) and empty.indices.dtype == torch.int64
    as_tensor = layer.topk(x, torch.tensor(4), exact=exact)  # torch.topk takes a 0-dim integer k
    assert torch.equal(as_tensor.indices, got.indices) and torch.equal(as_tensor.values, got.values)
    for bad in (torch.tensor(4.0), torch.tensor([4]), torch.tensor(True)):
        with pytest.raises(TypeError, match="must be an int, got Tensor"):
            layer.topk(x, bad, exact=exact)


def test_topk_answered_by_checks_its_arguments_as_topk_does():
    layer = LSHLinear(8, 5000).eval()
    assert layer.topk_answered_by(5) == (5, 12, 768, 39)  # nothing checked yet: the settings asked for
    assert layer.topk_answered_by(0) is None and layer.topk_answered_by(5, budget=5000) is None  # exact
    for bad, error, match in (({"k": "a"}, TypeError, r"^k \("), ({"k": -1}, ValueError, r"^k \("),
                              ({"k": 5, "probes": 0}, ValueError, "probes"),
                              ({"k": 5, "budget": 10 ** 9}, ValueError, "budget"),
                              ({"k": 5, "norm_rows": -3}, ValueError, "norm_rows"),
                              ({"k": 5, "min_recall": 2}, ValueError, "min_recall")):
        with pytest.raises(error, match=match):
            layer.topk_answered_by(**bad)
        with pytest.raises(error, match=match):
            layer.topk(torch.randn(2, 8), **bad)
    assert LSHLinear(8, 5000, selection="random").topk_answered_by(5) == (5, 12, 768, 39)  # no index


def test_topk_checks_and_answered_by_read_the_index_once(monkeypatch):
    """Another thread's topk, rebuilding the index, sets it to None first: a monitor thread reading topk_checks or
    topk_answered_by between its check of the index and its use raised AttributeError (a user review)."""
    from lsh_torch.retrieval import TopkIndex
    layer, x = LSHLinear(16, 3000, seed=1).eval(), torch.randn(80, 16)
    layer.topk(x, 5)
    index, answered, checks = layer._topk_index, layer.topk_answered_by(5), layer.topk_checks
    matches = TopkIndex.matches

    def replaced_meanwhile(self, *args):  # the other thread's rebuild starts right after the check
        layer._topk_index = None
        return matches(self, *args)
    monkeypatch.setattr(TopkIndex, "matches", replaced_meanwhile)
    assert layer.topk_answered_by(5) == answered  # what the index it checked measured
    layer._topk_index = index
    assert layer.topk_checks.keys() == checks.keys()


def test_recall_check_membership_is_a_binary_search():
    """The check compared [rows, k, k]: 25.6 GB at k = 20,000 and 64 rows (a user review)."""
    from lsh_torch.retrieval import among
    gen = torch.Generator().manual_seed(0)
    sets, candidates = torch.randint(-1, 50, (6, 9), generator=gen), torch.randint(0, 50, (6, 12), generator=gen)
    brute = (candidates.unsqueeze(2) == sets.unsqueeze(1)).any(2)
    assert torch.equal(among(candidates, sets), brute)
    flat = torch.randint(0, 50, (20,), generator=gen)
    assert torch.equal(among(flat, sets), (flat.unsqueeze(1) == sets.reshape(1, -1)).any(1))
    assert not among(candidates, sets[:, :0]).any()
