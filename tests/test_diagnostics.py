"""Active-set recall diagnostics and the periodic RecallMonitor probe."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from lsh_torch import ConstantSchedule, LSHLinear
from lsh_torch.diagnostics import RecallMonitor, active_set_recall, multiply_add_fraction, topk_recall


def test_topk_recall_by_hand():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [-1.0, -2.0, 0.5, 3.0, -4.0]])
    active = torch.tensor([[0, 2], [3, 2]])
    r = topk_recall(active, scores, k=2)
    # row 0: top-2 = {0, 1}, active holds 0 -> 0.5; row 1: top-2 = {3, 2}, both held -> 1.0
    assert r["recall"] == pytest.approx(0.75)
    assert r["recall_min"] == pytest.approx(0.5)
    # mass: row 0 holds 5+3 of the best 5+4; row 1 holds 3+0.5 of 3+0.5
    assert r["mass_recall"] == pytest.approx((8 / 9 + 1.0) / 2)
    # k=3: row 0 top-3 = {0, 1, 2} holds 2; row 1 top-3 = {3, 2, 0} holds 2
    assert topk_recall(active, scores, k=3)["recall"] == pytest.approx(2 / 3)


def test_topk_recall_rejects_bad_arguments():
    scores = torch.randn(3, 10)
    with pytest.raises(ValueError, match="k must be"):
        topk_recall(torch.zeros(3, 2, dtype=torch.long), scores, k=11)
    for k in (2.5, True):  # they reached torch.topk's own message
        with pytest.raises(TypeError, match="k must be an int"):
            topk_recall(torch.zeros(3, 2, dtype=torch.long), scores, k=k)
    with pytest.raises(ValueError, match="outside"):
        topk_recall(torch.full((3, 2), 10), scores, k=2)
    with pytest.raises(ValueError, match="same B"):
        topk_recall(torch.zeros(2, 2, dtype=torch.long), scores, k=2)
    # Each gave a plausible number: truncated float ids, an empty set's mass recall 1.0, NaN scores.
    with pytest.raises(TypeError, match="active must be an integer tensor"):
        topk_recall(torch.full((3, 2), 1.9), scores, k=2)
    with pytest.raises(ValueError, match="between 1 and N = 10 outputs"):
        topk_recall(torch.zeros(3, 0, dtype=torch.long), scores, k=2)
    with pytest.raises(ValueError, match="NaN"):
        topk_recall(torch.zeros(3, 2, dtype=torch.long), torch.full((3, 10), float("nan")), k=2)


def test_recall_is_one_when_budget_is_everything():
    layer = LSHLinear(16, 64, active=64)
    x = torch.randn(32, 16)
    r = active_set_recall(layer, x)
    assert r["recall"] == 1.0 and r["recall_min"] == 1.0 and r["mass_recall"] == pytest.approx(1.0)
    assert r["mult_fraction"] == 1.0 and r["budget"] == 64
    assert active_set_recall(layer, x, k=7)["recall"] == 1.0


def test_random_active_set_recall_is_budget_over_out():
    torch.manual_seed(1)
    layer = LSHLinear(32, 400, active=40)
    x = torch.randn(512, 32)
    random_active = torch.rand(512, 400).argsort(1)[:, :40]
    r = active_set_recall(layer, x, active=random_active)
    assert r["random_recall"] == pytest.approx(0.1)
    assert r["recall"] == pytest.approx(0.1, abs=0.015)
    assert r["mass_recall"] < 0.3  # far from what the exact top-40 holds


def test_useless_hash_gives_random_recall_and_good_hash_beats_it():
    torch.manual_seed(2)
    x = torch.randn(256, 32)
    # 2**16 buckets for 400 neurons, one table, one probe: almost no candidates, the fill is random
    useless = LSHLinear(32, 400, active=40, bits=16, num_tables=1, probes=1)
    assert active_set_recall(useless, x)["recall"] == pytest.approx(0.1, abs=0.03)
    good = LSHLinear(32, 400, active=40, bits=6, num_tables=50, probes=4)
    good.weight.data.copy_(useless.weight.data)
    assert active_set_recall(good, x)["recall"] > 0.3


def test_active_set_recall_leaves_the_layer_alone():
    layer = LSHLinear(16, 100, active=10)
    layer.train()
    x = torch.randn(8, 16)
    layer(x)
    step, items = layer.step, layer.tables.items
    active_set_recall(layer, torch.randn(20, 16))
    assert layer.step == step and layer.tables.items is items and layer.training


def test_active_set_recall_accepts_any_leading_shape_and_checks_arguments():
    layer = LSHLinear(16, 100, active=10)
    r = active_set_recall(layer, torch.randn(2, 3, 16))
    assert 0.0 <= r["recall"] <= 1.0
    with pytest.raises(ValueError, match="in_features"):
        active_set_recall(layer, torch.randn(4, 15))
    with pytest.raises(ValueError, match="k must be"):
        active_set_recall(layer, torch.randn(4, 16), k=101)
    with pytest.raises(TypeError, match="LSHLinear"):
        active_set_recall(nn.Linear(16, 100), torch.randn(4, 16))
    with pytest.raises(TypeError, match="x must be a floating tensor"):  # cast silently, where the layer refuses it
        active_set_recall(layer, torch.ones(4, 16, dtype=torch.long))


def test_multiply_add_fraction():
    layer = LSHLinear(100, 1000, active=0.05, bits=6, num_tables=5)
    assert multiply_add_fraction(layer, with_hashing=False) == pytest.approx(0.05)
    assert multiply_add_fraction(layer) == pytest.approx(0.05 + 101 * 30 / (1000 * 100))
    r = active_set_recall(layer, torch.randn(4, 100))
    assert r["mult_fraction_with_hashing"] == pytest.approx(multiply_add_fraction(layer))


def _train(layer, steps, monitor=None, lr=0.1):
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(16, layer.in_features, generator=gen)
        loss = layer(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.maybe_probe(x)


def test_hook_probes_every_n_training_steps_and_marks_rebuilds():
    layer = LSHLinear(16, 100, active=10, rebuild=ConstantSchedule(4))
    monitor = RecallMonitor(layer, every=3).attach()
    _train(layer, 10)
    assert [h["step"] for h in monitor.history] == [3, 6, 9]
    # the initial build happens in the first forward (step 1); then before steps 4 and 8 (0-based)
    assert monitor.rebuild_steps == [1, 5, 9]
    assert [h["since_rebuild"] for h in monitor.history] == [2, 1, 0]
    assert all(0.0 <= h["recall"] <= 1.0 for h in monitor.history)
    layer.eval()
    layer(torch.randn(4, 16))  # eval forwards are not probed by default
    assert len(monitor.history) == 3
    monitor.detach()
    layer.train()
    _train(layer, 5)
    assert len(monitor.history) == 3


def test_a_monitored_compiled_layer_probes_like_eager_and_does_not_recompile():
    """Under torch.compile a probe's step check and measured floats became guards: the caller
    recompiled at every probe (8 recompilations in 14 steps in a review's run; 16 graphs in this one)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = (torch.manual_seed(0) and LSHLinear(16, 100, active=10, seed=0) for _ in range(2))
    monitors = [RecallMonitor(layer, every=3).attach() for layer in (eager, compiled)]
    run = torch.compile(compiled, backend="eager")
    for step in range(10):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        eager(x)
        run(x)
    assert monitors[1].history == monitors[0].history and len(monitors[0].history) == 3
    assert counters["stats"]["unique_graphs"] <= 4  # the layer's (two, around its lookup) and the hook's call


def test_manual_probe_and_manual_rebuild_detected():
    layer = LSHLinear(16, 100, active=10, rebuild=None)
    monitor = RecallMonitor(layer, every=2)
    _train(layer, 4, monitor)
    assert [h["step"] for h in monitor.history] == [2, 4]
    layer.rebuild()
    _train(layer, 2, monitor)
    assert monitor.rebuild_steps[-1] == 5  # seen at the first call after the manual rebuild
    assert [h["step"] for h in monitor.history] == [2, 4, 6]
    fixed = torch.randn(64, 16)
    r = monitor.probe(fixed)
    assert r["step"] == 6 and len(monitor.history) == 4


@pytest.mark.parametrize("warmup", [0, 4])
def test_monitor_does_not_change_training(warmup):
    # With a warm-up, a probe during it used to build tables that training never builds there, making
    # the build that ends the warm-up incremental instead of full.
    torch.manual_seed(3)
    a = LSHLinear(16, 100, active=10, rebuild=ConstantSchedule(3), warmup=warmup)
    b = LSHLinear(16, 100, active=10, rebuild=ConstantSchedule(3), warmup=warmup)
    b.load_state_dict(a.state_dict())
    with RecallMonitor(b, every=1) as monitor:
        torch.manual_seed(4)
        _train(a, 9)
        torch.manual_seed(4)
        _train(b, 9)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(a.tables.codes, b.tables.codes)
    assert min(h["step"] for h in monitor.history) == warmup + 1


def test_a_probe_in_eval_mode_does_not_change_training():
    """An eval-mode probe (a held-out batch in an eval pass) ran the eval lookup, which re-hashes the rows
    moved since the last training rebuild: training then went on from other tables and weights."""
    def run(probe):
        torch.manual_seed(0)
        layer = LSHLinear(16, 100, active=10, rebuild=ConstantSchedule(50), seed=1)
        monitor = RecallMonitor(layer, every=1)
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(5)
        held_out = torch.randn(64, 16, generator=gen)
        for step in range(12):
            loss = layer(torch.randn(16, 16, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if probe and step == 5:
                layer.eval()
                monitor.probe(held_out)
                layer.train()
        return layer.weight.detach().clone(), layer.tables.codes.clone()
    (w0, c0), (w1, c1) = run(False), run(True)
    assert torch.equal(w0, w1) and torch.equal(c0, c1)


def test_monitor_hooks_keyword_calls_and_pickles_with_its_layer():
    import pickle
    layer = LSHLinear(16, 100, active=10)
    monitor = RecallMonitor(layer, every=1).attach()
    for _ in range(3):
        layer(input=torch.randn(8, 16))  # were never probed
    assert len(monitor.history) == 3
    copy = pickle.loads(pickle.dumps(layer))  # the hook's monitor held a weak reference: TypeError
    copy(torch.randn(8, 16))
    assert len(monitor.history) == 3  # the copy's monitor is its own


def test_recall_counts_tied_neurons_and_exact_layers_count_no_hashing():
    scores = torch.zeros(1, 5)  # every neuron an exact top-1
    for active in ([[3]], [[0]]):
        assert topk_recall(torch.tensor(active), scores, 1)["recall"] == 1.0
    assert topk_recall(torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2)["recall"] == 0.5
    layer = LSHLinear(16, 100)  # at most 8,192 outputs: forward_sparse computes them all, no lookup
    assert layer.exact_softmax
    r = active_set_recall(layer, torch.randn(4, 16), sparse=True)
    assert r["mult_fraction"] == r["mult_fraction_with_hashing"] == 1.0


def test_monitor_plot_and_to_dict(tmp_path):
    pytest.importorskip("matplotlib")
    layer = LSHLinear(16, 100, active=10, rebuild=ConstantSchedule(4))
    monitor = RecallMonitor(layer, every=2, name="hidden").attach()
    _train(layer, 8)
    path = tmp_path / "recall.png"
    import matplotlib.pyplot as plt
    open_before = len(plt.get_fignums())
    for _ in range(3):
        fig = monitor.plot(path)
    assert path.stat().st_size > 1000 and fig.axes[0].get_ylabel() == "recall"
    assert len(plt.get_fignums()) == open_before  # pyplot holds none of them (they piled up)
    d = monitor.to_dict()
    assert d["name"] == "hidden" and len(d["history"]) == 4 and d["rebuild_steps"] == monitor.rebuild_steps


def test_monitor_rejects_bad_arguments():
    layer = LSHLinear(16, 100, active=10)
    with pytest.raises(ValueError, match="every"):
        RecallMonitor(layer, every=0)
    with pytest.raises(TypeError, match="LSHLinear"):
        RecallMonitor(nn.Linear(4, 4))
    for k, error in ((0, ValueError), (101, ValueError), (True, TypeError), ("a", TypeError)):
        with pytest.raises(error, match=r"^k must be"):  # was checked only at the first probe, in a training forward
            RecallMonitor(layer, k=k)


def _layer_or_skip(**kwargs):
    try:
        return LSHLinear(32, 400, active=40, **kwargs)
    except TypeError as exc:  # an older LSHLinear without this option
        pytest.skip(f"LSHLinear does not take {sorted(kwargs)}: {exc}")


def test_library_random_selection_has_random_recall():
    torch.manual_seed(6)
    layer = _layer_or_skip(selection="random")
    r = active_set_recall(layer, torch.randn(512, 32))
    assert r["recall"] == pytest.approx(0.1, abs=0.015)
    assert r["mult_fraction_with_hashing"] == pytest.approx(r["mult_fraction"])  # nothing hashed


def test_shared_mode_active_set_is_scored_for_every_row():
    torch.manual_seed(7)
    layer = _layer_or_skip(mode="shared")
    x = torch.randn(64, 32)
    shared = layer.active_set(x)
    assert shared.dim() == 1
    r = active_set_recall(layer, x)
    assert r["recall"] == pytest.approx(active_set_recall(layer, x, active=shared.expand(64, -1))["recall"])
    assert 0.0 <= r["recall"] <= 1.0


@pytest.mark.parametrize("mode", ["auto", "per_row"])
def test_sparse_recall_measures_the_set_forward_sparse_trains_with(mode):
    """sparse=True: the set forward_sparse computes (shared unless per_row, half of it the uniform
    tail), not forward's per-row hidden-layer set; an exact-softmax layer's is every output."""
    layer = LSHLinear(16, 9000, mode=mode, active=256, seed=1)
    x = torch.randn(32, 16)
    expected = active_set_recall(layer, x, k=10, active=layer.active_set(x, sparse=True))
    got = active_set_recall(layer, x, k=10, sparse=True)
    assert got == expected
    probed = layer.active_set(x, sparse=True)  # the next training step's draws: forward_sparse's set
    assert torch.equal(layer.forward_sparse(x).indices, probed)
    assert probed.dim() == (2 if mode == "per_row" else 1)
    monitor = RecallMonitor(layer, every=1, k=10, sparse=True)
    assert monitor.probe(x)["recall"] == active_set_recall(layer, x, k=10, sparse=True)["recall"]
    assert active_set_recall(layer, x, k=10)["budget"] == 256  # forward's set: per row either way
    exact = LSHLinear(16, 500, seed=1)  # at most 8,192 outputs: forward_sparse computes all of them
    assert active_set_recall(exact, x, k=10, sparse=True)["recall"] == 1.0
    with pytest.raises(ValueError, match="labels must be in"):
        exact.active_set(x, torch.full((32,), 500), sparse=True)
    warming = LSHLinear(16, 9000, mode=mode, active=256, seed=1, warmup=2)  # uniform draws for two steps
    for _ in range(3):
        probed = warming.active_set(x, sparse=True)
        assert torch.equal(warming.forward_sparse(x).indices, probed)
    with pytest.raises(TypeError, match="sparse must be a bool"):
        RecallMonitor(layer, sparse="yes")
    # Truthy stand-ins for flags were taken as True (a reviewer's 'no' measured with the bias, or the shared set).
    for call, name in ((lambda: RecallMonitor(layer, include_bias="no"), "include_bias"),
                       (lambda: RecallMonitor(layer, probe_eval=1), "probe_eval"),
                       (lambda: active_set_recall(layer, x, include_bias="no"), "include_bias"),
                       (lambda: multiply_add_fraction(layer, with_hashing="no"), "with_hashing"),
                       (lambda: layer.active_set(x, shared="no"), "shared"),
                       (lambda: layer.active_set(x, sparse=0), "sparse")):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            call()
    # numpy and 0-dim tensor bools are bools, as numpy and tensor ints are ints (they were taken before)
    assert active_set_recall(layer, x, include_bias=np.False_)["recall"] == active_set_recall(layer, x, include_bias=False)[
        "recall"]
    assert layer.active_set(x, shared=torch.tensor(False)).dim() == 2
    with pytest.raises(ValueError, match=r"x must have shape \[\*, in_features=16\], got \(4, 3\)"):
        RecallMonitor(layer).probe(torch.randn(4, 3))  # (a reshape's "shape '[-1, 16]' is invalid")
    with pytest.raises(ValueError, match=r"scores hold \+inf"):  # (its mass share was NaN)
        topk_recall(torch.tensor([[0]]), torch.tensor([[math.inf, 1.0]]), 1)
