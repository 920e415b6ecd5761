"""The pure helpers of benchmarks/bench_estimator.py: the LM curves' subset, interpolation and
equal-time table, and the oracle head (nothing here trains or times anything)."""
import math
import os
import sys

import numpy as np
import pytest
import torch

import lsh_torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_estimator as be  # noqa: E402


def test_held_out_windows_spread_and_fixed():
    tokens = torch.arange(1000)
    w = be.held_out_windows(tokens, 5, 64)
    assert w.shape == (5, 65)
    assert w[0, 0] == 0 and w[-1, -1] == 999  # first window at the start, last one at the end
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(5, 64, dtype=torch.long))  # contiguous windows
    assert torch.equal(w, be.held_out_windows(tokens, 5, 64))


def test_curve_at_linear_and_log():
    curve = [(0.0, 1000.0), (10.0, 10.0), (20.0, 5.0)]
    assert be.curve_at(curve, 5.0) == pytest.approx(505.0)
    assert be.curve_at(curve, 5.0, log=True) == pytest.approx(100.0)  # geometric midpoint
    np.testing.assert_allclose(be.curve_at(curve, [0.0, 10.0, 20.0], log=True), [1000.0, 10.0, 5.0])
    assert be.curve_at(curve, 30.0) == pytest.approx(5.0)  # held at the last value after the end


def test_beats():
    assert be.beats((100.0, 5.0), (200.0, 10.0), 3) == "yes, beyond the spread"
    assert be.beats((100.0, 30.0), (150.0, 30.0), 3) == "no: within the spread"
    assert be.beats((200.0, 1.0), (100.0, 1.0), 3) == "no: higher beyond the spread"
    assert be.beats((100.0, 0.0), (150.0, 0.0), 1).startswith("lower (one seed")


def test_equal_time_table():
    def run(variant, mode, budget, seed, end, final):
        # perplexity falls geometrically from 1000 at t=0 to `final` at t=end
        curve = [[t, i, 1000.0 * (final / 1000.0) ** (t / end)] for i, t in enumerate(np.linspace(0, end, 5))]
        return {"variant": variant, "mode": mode, "budget": budget, "seed": seed, "curve": curve}

    lm = [run("dense", "-", 0, s, 300.0, 100.0) for s in range(2)]
    lm += [run("hashed+tail", "per_row", 128, s, 60.0, 100.0 + s) for s in range(2)]
    lm += [run("uniform+tail", "per_row", 128, s, 30.0, 400.0 + s) for s in range(2)]
    lm += [run("hashed (before)", "per_row", 128, 0, 30.0, 50.0)]
    rows = be.equal_time_table(lm, [("per_row", 128), ("shared", 2048)])
    assert [r["seconds"] for r in rows] == pytest.approx([10.0, 20.0, 30.0])  # the shorter sparse run: 30 s
    last = rows[-1]
    assert last["uniform+tail"][0] == pytest.approx(400.5) and last["uniform+tail"][2] == 2
    assert last["hashed+tail"][0] == pytest.approx(
        np.mean([1000.0 * ((100.0 + s) / 1000.0) ** 0.5 for s in range(2)]))
    assert last["dense"][0] == pytest.approx(1000.0 * 0.1 ** 0.1)
    assert last["dense"][1] == pytest.approx(0.0, abs=1e-9)
    assert all(math.isfinite(r["hashed+tail"][1]) for r in rows)
    # Paired by seed: hashed+tail's minus uniform+tail's value in each seed.
    diffs = [1000.0 * ((100.0 + s) / 1000.0) ** 0.5 - (400.0 + s) for s in range(2)]
    assert last["difference"][0] == pytest.approx(np.mean(diffs)) and last["difference"][2] == 2
    assert last["difference"][1] == pytest.approx(np.std(diffs, ddof=1))


def test_beats_higher():
    assert be.beats((0.7, 0.01), (0.6, 0.01), 3, higher=True) == "yes, beyond the spread"
    assert be.beats((0.6, 0.01), (0.7, 0.01), 3, higher=True) == "no: lower beyond the spread"
    assert be.beats((0.7, 0.1), (0.6, 0.1), 3, higher=True) == "no: within the spread"
    assert be.beats((0.7, 0.0), (0.6, 0.0), 1, higher=True).startswith("higher (one seed")


def test_xmc_equal_time_and_reach(capsys):
    def run(kind, slope, end, seed=0):
        # P@1 rises linearly at `slope` per second, evaluated every second up to `end`
        return {"kind": kind, "name": kind, "mode": "shared", "budget": 2048,  # P@1 and loss rise and fall at `slope`
                "curve": [[t, 0, 0.0, slope * t + 0.01 * seed, 10 - slope * t] for t in range(end + 1)],
                "train_seconds": end, "final": {"P@1": slope * end, "P@3": 0.1, "P@5": 0.1, "loss": 10 - slope * end}}

    xmc = {"seeds": {s: {"runs": [run("lsh", 0.02, 20, s), run("random", 0.01, 10, s)]} for s in range(3)},
           "dense": {s: {"runs": [run("dense", 0.001, 400, 10 * s)]} for s in (1, 0)}}  # seed 1's data: +0.1
    rows, reach = be.xmc_equal_time(xmc, fractions=(0.5, 1.0))
    assert [r["seconds"] for r in rows] == [5.0, 10.0]  # fractions of the shorter sparse run (random: 10 s)
    last = rows[-1]
    assert last["lsh"][0] == pytest.approx(0.21) and last["random"][0] == pytest.approx(0.11)
    assert last["lsh"][2] == 3 and last["dense"][0] == pytest.approx(0.06) and last["dense"][2] == 2
    assert last["difference"][:2] == pytest.approx((0.1, 0.0), abs=1e-12)  # the seeds' offsets cancel in pairs
    # Each seed against the dense run on its own data; seed 2 has none.
    # Seed 0: dense's best 0.4 at 400 s, 0.395 first at 395 s; lsh (0.02 t) first at or above it at 20 s.
    # Seed 1: dense's best 0.5, 0.495 first at 395 s; lsh (0.02 t + 0.01) tops out at 0.41: never.
    assert sorted(reach) == [0, 1]
    assert reach[0]["best"] == pytest.approx(0.4) and reach[0]["dense"] == 395 and reach[0]["lsh"] == 20
    assert reach[1]["best"] == pytest.approx(0.5) and reach[1]["dense"] == 395 and reach[1]["lsh"] is None
    assert reach[0]["random"] is None  # random stops at 0.1
    loss, no_reach = be.xmc_equal_time(xmc, fractions=(1.0,), column=4)
    assert loss[0]["lsh"][0] == pytest.approx(9.8) and loss[0]["random"][0] == pytest.approx(9.9)
    assert loss[0]["dense"][0] == pytest.approx(9.99) and no_reach == {}
    be.print_xmc(xmc, plot="")
    printed = capsys.readouterr().out
    assert "| 0 | 0.400 | 395.0 s | 20.0 s = 0.051 | never |" in printed
    assert "| 1 | 0.500 | 395.0 s | never | never |" in printed
    assert "| dense | 0.400 ± 0.000 |" in printed  # the final table: both seeds' dense runs
    assert "dense finished not recorded, the sparse runs not recorded" in printed
    del xmc["seeds"][1]  # a seed with a dense run and no sparse ones is left out, not "never"
    assert sorted(be.xmc_equal_time(xmc)[1]) == [0]
    xmc["seeds"][1] = {"runs": [run("lsh", 0.02, 20, 1), run("random", 0.01, 10, 1)]}
    for s in range(2):  # recorded without the loss
        xmc["dense"][s]["runs"][0]["curve"] = [c[:4] for c in xmc["dense"][s]["runs"][0]["curve"]]
    assert "dense" not in be.xmc_equal_time(xmc, fractions=(1.0,), column=4)[0][0]


@pytest.mark.parametrize("mode", ["per_row", "shared"])
def test_exact_top_set_oracle_is_the_exact_best(mode):
    torch.manual_seed(0)
    head = lsh_torch.LSHLinear(16, 500, active=64, mode=mode, sparse_grad=True, seed=0)
    be.exact_top_set(head)
    assert head._top_set_stride(10 ** 6, head.out_features) == 1  # every row scores the shared top set
    x, labels = torch.randn(8, 16), torch.tensor([3, 3, 7, 11, 3, 7, 400, 499])
    if mode == "shared":  # 28 labels that outscore everything: more than the rescored pool (4 x 4 top-set places)
        labels = torch.arange(100, 128).reshape(7, 4)
        x = x[:7]
        with torch.no_grad():
            head.weight[labels.flatten()] = 5 * x.mean(0)
    out = head.forward_sparse(x, labels)
    scores = torch.nn.functional.linear(x, head.weight, head.bias).detach()
    if mode == "shared":
        scores, labels = scores.logsumexp(0, keepdim=True), labels.flatten()[None]
        indices, log_weights = out.indices[None], out.log_weights[None]
    else:
        labels, indices, log_weights = labels[:, None], out.indices, out.log_weights
    for row, row_labels, row_indices, row_weights in zip(scores, labels, indices, log_weights):
        head_entries = set(row_indices[row_weights == 0].tolist())  # labels and top set: not corrected
        assert set(row_labels.tolist()) <= head_entries and len(head_entries) == 32  # the budget less the tail
        top = row.index_fill(0, row_labels, -float("inf")).topk(len(head_entries) - len(row_labels)).indices
        assert head_entries - set(row_labels.tolist()) == set(top.tolist())
        assert (row_weights > 0).sum() >= 32  # the tail: half the budget, corrected


def test_equal_steps_table_only_where_the_oracle_ran(capsys):
    def run(variant, seed, offset):  # perplexity 1000 / (step + 1) + offset + seed, evaluated every 25 steps
        return {"variant": variant, "mode": "shared", "budget": 2048, "seed": seed,
                "curve": [[0.1 * s, s, 1000 / (s + 1) + offset + seed] for s in range(0, 301, 25)]}

    lm = [run("hashed+tail", s, -5) for s in range(2)] + [run("uniform+tail", s, 0) for s in range(2)]
    be.print_equal_steps(lm, [("shared", 2048)])
    assert capsys.readouterr().out == ""
    lm += [run("exact top set+tail, oracle", s, -10) for s in range(2)]
    lm += [{**run("dense", s, 20), "mode": "-", "budget": 0} for s in range(2)]
    be.print_equal_steps(lm, [("shared", 2048)])
    out = capsys.readouterr().out
    # step 300: hashed 1000/301 - 5 + {0, 1}, uniform + 5, oracle - 5, dense + 20; paired: -5 and -10 in both seeds
    assert f"| 300 | {1000 / 301 - 4.5:.1f} ± 0.7 | {1000 / 301 + 0.5:.1f} ± 0.7 | {1000 / 301 - 9.5:.1f} ± 0.7 " \
           f"| {1000 / 301 + 20.5:.1f} ± 0.7 | -5.0 ± 0.0 | -10.0 ± 0.0 |" in out
    assert "| 100 |" in out and "| 200 |" in out
    be.print_equal_steps([r for r in lm if r["variant"] != "uniform+tail"], [("shared", 2048)])
    assert "| -5.0 ± 0.0 |" in capsys.readouterr().out  # without uniform+tail: the oracle against hashed+tail


def test_kept_xmc_run_is_reused_only_with_its_arguments(tmp_path, monkeypatch):
    monkeypatch.setattr(be, "RESULTS", str(tmp_path))
    monkeypatch.setattr(be.subprocess, "run", lambda *a, **k: pytest.fail("a kept run was trained again"))
    args = ["--structure", "tree", "--dense-epochs", "4"]
    recorded = be.json.loads(be.json.dumps(be.xmc.recorded_args(
        be.xmc.parse_args(["--runs", "dense", "--seed", "1", *args]))))
    path = tmp_path / "estimator_xmc_tree_dense_full_seed1.json"

    def keep(**changed):
        kept = {"args": {**recorded, **changed, "json": str(path)}, "runs": []}
        path.write_text(be.json.dumps(kept))
        return kept

    kept = keep()
    assert be.xmc_run(1, "dense", "estimator_xmc_tree_dense_full", args, reuse=True) == kept
    with pytest.raises(ValueError, match="'train_points': \\(20000, 100000\\)"):
        be.xmc_run(1, "dense", "estimator_xmc_tree_dense_full", args + ["--train-points", "100000"], reuse=True)
    with pytest.raises(ValueError, match="'quick'"):
        be.xmc_run(1, "dense", "estimator_xmc_tree_dense_full", ["--structure", "tree", "--quick"], reuse=True)
    # Trained before a default changed (the rates were 3e-3 for every parameter): not passed, still compared.
    keep(lr=0.003, out_lr=None)
    with pytest.raises(ValueError, match="'lr': \\(0.003, \\{'lsh': 0.08"):
        be.xmc_run(1, "dense", "estimator_xmc_tree_dense_full", args, reuse=True)


def test_lm_heads_take_sparse_gradients_and_lazy_adam_unless_a_variant_says_dense():
    """The converted heads train as the LM example's: sparse row gradients and LazyAdam; the dense
    model and the "dense grad" variants with torch.optim.Adam, the head's gradient dense."""
    tokens = torch.randint(0, 300, (2, 9))
    for variant, sparse, optimizer in ((None, False, torch.optim.Adam), ("hashed+tail", True, lsh_torch.LazyAdam),
                                       ("uniform+tail", True, lsh_torch.LazyAdam),
                                       ("hashed+tail, dense grad", False, torch.optim.Adam),
                                       ("uniform+tail, dense grad", False, torch.optim.Adam)):
        model = be.lm_model(300, variant, "shared", 64, seed=0)
        assert (variant is not None) == isinstance(model.head, lsh_torch.LSHLinear)
        opt = be.tl.optimizer(model, lr=1e-3)
        assert type(opt) is optimizer, variant
        be.tl.train_step(model, opt, tokens[:, :-1], tokens[:, 1:])
        assert model.head.weight.grad.is_sparse == sparse, variant


def test_plots_keep_their_suffix_and_create_their_folder(tmp_path):
    """With .svg (or .pdf), replacing ".png" left the path as it was: the second plot overwrote the first;
    and a plot in a folder that did not exist failed after the runs."""
    pytest.importorskip("matplotlib")

    def xmc_run(kind, seed):
        curve = [[t, 0, 0.0, 0.01 * t + 0.01 * seed, 10 - 0.01 * t] for t in range(11)]
        return {"kind": kind, "name": kind, "mode": "shared", "budget": 2048, "curve": curve, "train_seconds": 10,
                "final": {"P@1": 0.1, "P@3": 0.1, "P@5": 0.1, "loss": 9.9}}

    xmc = {"seeds": {s: {"runs": [xmc_run("lsh", s), xmc_run("random", s)]} for s in range(2)}, "dense": {}}
    be.print_xmc(xmc, plot=str(tmp_path / "xmc" / "p1.svg"))
    assert sorted(os.listdir(tmp_path / "xmc")) == ["p1.svg", "p1_loss.svg"]

    def lm_run(variant, seed):
        return {"variant": variant, "mode": "shared", "budget": 2048, "seed": seed,
                "curve": [[float(t), t, 1000.0 / (t + 1) + seed] for t in range(0, 50, 10)]}

    lm = [lm_run(v, s) for v in ("hashed+tail", "uniform+tail") for s in range(2)]
    be.print_lm_curves(lm, [("shared", 2048)], torch.zeros(2, 65, dtype=torch.long), str(tmp_path / "lm" / "c.pdf"))
    assert sorted(os.listdir(tmp_path / "lm")) == ["c.pdf", "c_paired.pdf"]


def test_json_is_written_before_the_tables_and_plots(tmp_path, monkeypatch):
    """The JSON came after the tables and plots: one that failed lost the runs."""
    monkeypatch.setattr(be, "xmc_run", lambda seed, runs, stem, demo_args, reuse=False: {"runs": [], "seed": seed})

    def print_xmc(xmc, plot):
        raise RuntimeError("a plot failed")

    monkeypatch.setattr(be, "print_xmc", print_xmc)
    path = tmp_path / "new" / "estimator.json"
    with pytest.raises(RuntimeError, match="a plot failed"):
        be.main(["--skip", "lm", "--no-dense", "--seeds", "0", "--json", str(path)])
    assert be.json.loads(path.read_text())["xmc"]["seeds"] == {"0": {"runs": [], "seed": 0}}


def xmc_calls(monkeypatch) -> list:
    """The (runs, stem, demo_args) of every XMC run that bench_estimator.main asks for, none trained."""
    calls = []
    monkeypatch.setattr(be, "xmc_run", lambda seed, runs, stem, demo_args, reuse=False:
                        calls.append((runs, stem, demo_args)) or {"runs": [], "seed": seed})
    monkeypatch.setattr(be, "print_xmc", lambda xmc, plot: None)
    return calls


def test_xmc_rates_reach_every_run_and_name_its_files(monkeypatch):
    """--xmc-lr and --xmc-out-lr go to dense's runs too, and into every kept file's name: a dense run kept at one
    rate must not stand for another's."""
    calls = xmc_calls(monkeypatch)
    be.main(["--skip", "lm", "--seeds", "0", "--json", "", "--xmc-lr", "0.02", "--xmc-out-lr", "0.003"])
    assert [(runs, stem) for runs, stem, _ in calls] == [
        ("dense", "estimator_xmc_lr0.02_outlr0.003_dense_full"), ("lsh,random", "estimator_xmc_lr0.02_outlr0.003_full")]
    for _, _, demo_args in calls:
        assert demo_args[demo_args.index("--lr") + 1] == "0.02" and demo_args[demo_args.index("--out-lr") + 1] == "0.003"
    calls.clear()
    be.main(["--skip", "lm", "--seeds", "0", "--json", "", "--no-dense", "--xmc-out-lr", "0.001,random=0.0015"])
    assert [stem for _, stem, _ in calls] == ["estimator_xmc_outlr0.001_random0.0015_full"]


def test_xmc_mode_reaches_the_sparse_runs_only_and_names_their_files(monkeypatch):
    """--xmc-mode per_row trains the lsh and random runs per point (and --xmc-tail-proposal draws their tails);
    dense has no active set, and its kept run (per data set) serves either."""
    calls = xmc_calls(monkeypatch)
    be.main(["--skip", "lm", "--seeds", "0", "--json", "", "--xmc-structure", "text", "--xmc-mode", "per_row"])
    assert [(runs, stem) for runs, stem, _ in calls] == [
        ("dense", "estimator_xmc_text_dense_full"), ("lsh,random", "estimator_xmc_text_full_per_row")]
    (_, _, dense), (_, _, sparse) = calls
    assert "--mode" not in dense and sparse[sparse.index("--mode") + 1] == "per_row"
    assert dense[dense.index("--structure") + 1] == sparse[sparse.index("--structure") + 1] == "text"
    calls.clear()
    be.main(["--skip", "lm", "--seeds", "0", "--json", "", "--no-dense", "--xmc-mode", "per_row", "--xmc-tail-proposal",
             "labels"])
    assert [stem for _, stem, _ in calls] == ["estimator_xmc_full_per_row_taillabels"]
    assert calls[0][2][calls[0][2].index("--tail-proposal") + 1] == "labels"


def test_lm_lr_reaches_every_lm_run(monkeypatch):
    """The LM runs' rate was fixed at 2e-3 in the code: --lm-lr sets it."""
    seen = []
    monkeypatch.setattr(be.tl, "optimizer", lambda model, lr: seen.append(lr) or torch.optim.SGD(model.parameters(), lr))
    monkeypatch.setattr(be, "lm_model", lambda vocab_size, variant, mode, budget, seed, counts: torch.nn.Linear(1, 1))
    monkeypatch.setattr(be.tl, "train_step", lambda model, opt, inputs, targets: 0.0)
    monkeypatch.setattr(be.tl, "evaluate", lambda model, tokens, context, max_tokens: (1.0, 0.0))
    tokens = torch.arange(200) % 7
    specs = [(None, "-", 0), ("hashed+tail", "shared", 64)]
    list(be.lm_runs((tokens, tokens, list(range(7))), specs, 0, 2, lr=0.007))
    assert seen == [0.007, 0.007]
    assert be.parse_args(["--lm-lr", "0.006"]).lm_lr == 0.006
