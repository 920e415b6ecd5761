"""The XMC demo's losses (examples/xmc.py): the full-softmax loss dense trains with and the held-out
loss every head is scored by."""
import os
import platform
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import xmc  # noqa: E402
import xmc_data  # noqa: E402

from lsh_torch import LSHLinear  # noqa: E402


def test_full_softmax_loss_spreads_the_target_over_labels():
    logits = torch.randn(4, 6, dtype=torch.float64)
    # The last point has no label: not counted. Label 0 beside padding keeps its share.
    labels = torch.tensor([[1, 4], [2, -1], [0, -1], [-1, -1]])
    logp = logits.log_softmax(1)
    want = (-(logp[0, 1] + logp[0, 4]) / 2 - logp[1, 2] - logp[2, 0]) / 3
    torch.testing.assert_close(xmc.full_softmax_loss(logits, labels), want)
    total, points = xmc.full_softmax_loss(logits, labels, reduce=False)
    torch.testing.assert_close(total / points, want)
    assert points == 3


def test_full_softmax_loss_label_smoothing_is_cross_entropys_on_labelled_points():
    logits, labels = torch.randn(3, 6, dtype=torch.float64), torch.tensor([[1], [-1], [5]])
    want = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2], 0], label_smoothing=0.2)
    torch.testing.assert_close(xmc.full_softmax_loss(logits, labels, label_smoothing=0.2), want)


def test_weight_decay_reaches_the_weights_not_the_biases():
    data = xmc_data.generate(20, num_features=50, num_labels=300, seed=0)
    for kind in ("dense", "lsh"):
        net = xmc.XMCNet(data.num_features, data.num_labels, hidden=8)
        if kind == "lsh":
            net.out = LSHLinear.from_linear(net.out, active=32, sparse_grad=True)
        decay = {id(p): group["weight_decay"] for opt in xmc.optimizers(net, kind, 1e-3, 2e-3, 0.1)
                 for group in opt.param_groups for p in group["params"]}
        assert decay == {id(net.embed.weight): 0.1, id(net.hidden_bias): 0.0, id(net.out.weight): 0.1,
                         id(net.out.bias): 0.0}, kind


def test_rates_are_per_kind_of_run_and_fill_in_from_the_defaults():
    def rates(*argv):
        args = xmc.parse_args(list(argv))
        return [xmc.learning_rates(kind, args) for kind in ("lsh", "random", "dense")]
    default_out = xmc.parse_args([]).out_lr
    assert rates() == [(0.08, default_out[kind]) for kind in ("lsh", "random", "dense")]
    assert rates("--lr", "0.003,random=0.006", "--out-lr", "0.003,random=0.006") == \
        [(0.003, 0.003), (0.006, 0.006), (0.003, 0.003)]
    # a pair alone changes its kind; the others keep the default's rate
    assert rates("--out-lr", "random=0.01") == \
        [(0.08, default_out["lsh"]), (0.08, 0.01), (0.08, default_out["dense"])]
    assert rates("--lr", "dense=0.02")[2] == (0.02, default_out["dense"])


@pytest.mark.parametrize("text, message", [("foo=0.1", "'foo' in 'foo=0.1' is not a kind of run"),
                                           ("0.1,0.2", "a bare rate given twice"),
                                           ("lsh=0.1,lsh=0.2", "lsh given twice"),
                                           ("random=-1", "must be a finite number")])
def test_rates_refuse_what_they_cannot_mean(text, message, capsys):
    with pytest.raises(SystemExit):
        xmc.parse_args(["--out-lr", text])
    assert message in capsys.readouterr().err


def test_norm_rows_share_reaches_the_lsh_layer_only_when_given():
    data = xmc_data.generate(20, num_features=50, num_labels=300, seed=0)
    for given, expected in ((None, LSHLinear.norm_rows_share), ("0.5", 0.5)):
        argv = ["--hidden", "8"] + ([] if given is None else ["--norm-rows-share", given])
        net = xmc.build("lsh", "shared", data, xmc.parse_args(argv), budget=32)
        assert net.out.norm_rows_share == expected
        assert ("norm_rows_share" in vars(net.out)) == (given is not None)


def test_held_out_loss_scores_every_output_of_a_sparse_head():
    data = xmc_data.generate(40, num_features=300, num_labels=500, seed=0)
    torch.manual_seed(0)
    dense = xmc.XMCNet(data.num_features, data.num_labels, hidden=16)
    sparse = xmc.XMCNet(data.num_features, data.num_labels, hidden=16)
    sparse.load_state_dict(dense.state_dict())
    sparse.out = LSHLinear.from_linear(dense.out, active=64, mode="shared")
    sparse.train()
    data.label_ids[data.label_offsets[3]:data.label_offsets[3] + 2] = 7  # a label repeated on a point counts once
    data.label_offsets[5:7] = data.label_offsets[4]  # points without labels count for nothing
    ids, offsets, values, labels = data.batch(np.arange(40))
    assert (labels == -1).any() and ((labels[3] == 7).sum() == 2)
    with torch.no_grad():
        want = xmc.full_softmax_loss(dense.out(dense.hidden(ids, offsets, values)), labels)
    for net, kind in ((dense, "dense"), (sparse, "lsh")):
        got = xmc.held_out_loss(net, kind, data, batch_size=16)  # three batches, summed before the mean
        assert abs(got - float(want)) < 1e-4, kind
    assert sparse.training  # restored
    assert want > 0.9 * np.log(data.num_labels)  # untrained: about log(labels), so every output was scored


def test_runs_taking_turns_train_as_they_would_alone():
    # Taking turns must change the runs' clocks only: a run that drew on another's
    # state (the global RNG, a shared table) would end elsewhere trained beside it than alone.
    def results(runs):
        out = xmc.main(["--train-points", "300", "--test-points", "100", "--features", "2000",
                        "--labels", "3000", "--epochs", "2", "--dense-epochs", "1", "--active", "512",
                        "--eval-points", "50", "--eval-every", "0.5", "--runs", runs, "--json", "", "--plot", ""])
        return {r["name"]: ([c[1:] for c in r["curve"]], r["final"]["P@1"], r["final"]["loss"], r["steps"],
                            r["rebuilds"]) for r in out["runs"]}
    together = results("lsh,random,dense")
    assert list(together) == ["lsh-shared", "random-shared", "dense"]
    alone = {**results("lsh"), **results("random"), **results("dense")}
    for name, result in alone.items():
        assert together[name] == result, name
    assert together["lsh-shared"][3] == 2 * together["dense"][3]  # 2 epochs beside 1: dense left the turn first
    assert together["lsh-shared"][4] >= 1  # the table builds are counted (the table read 0 for a while)


def test_final_points_evaluate_a_subset_that_holds_the_curves():
    def run(*argv):
        return xmc.main(["--train-points", "300", "--test-points", "100", "--features", "2000", "--labels", "3000",
                         "--dense-epochs", "1", "--eval-points", "30", "--eval-every", "0.5", "--runs", "dense",
                         "--out-lr", "0.003", "--json", "", "--plot", "", *argv])  # (3 steps: a faster output rate)
    whole, part = run(), run("--final-points", "40")
    assert whole["data"]["test"].startswith("100 points") and part["data"]["test"].startswith("40 points")
    curves = [[point[1:] for point in result["runs"][0]["curve"]] for result in (whole, part)]
    assert curves[0] == curves[1]  # the same training, measured on the same curve subset (the clock aside)
    assert whole["runs"][0]["final"]["P@1"] != part["runs"][0]["final"]["P@1"]
    assert round(part["runs"][0]["final"]["P@1"] * 40, 6) % 1 == 0  # a share of 40 points


def test_arguments_are_checked_before_any_run(tmp_path, capsys):
    # 0 epochs reported a table of untrained runs; an output path under a file failed after training.
    afile = tmp_path / "a_file"
    afile.write_text("")
    for argv, message in ((["--epochs", "0"], "argument --epochs: must be an int of at least 1"),
                          (["--test-fraction", "2"], "argument --test-fraction: must be a finite number in (0, 1)"),
                          (["--json", str(afile / "x.json")], "is a file")):
        with pytest.raises(SystemExit):
            xmc.parse_args(argv)
        assert message in capsys.readouterr().err
    for argv, message in ((["--labels", "4"], "must be an int of at least 5"),  # P@5
                          (["--runs", "random,dense", "--save-head", str(tmp_path / "h.pt")], "has none"),
                          (["--epochs", "1"], "the lsh runs would draw uniformly throughout and never hash")):
        with pytest.raises(SystemExit):
            xmc.parse_args(argv)
        assert message in capsys.readouterr().err
    assert xmc.parse_args(["--quick"]).json.endswith("xmc_quick.json")  # not over the committed results
    assert xmc.parse_args(["--quick", "--json", ""]).json == ""


def test_bad_data_files_and_options_stop_with_a_message_not_a_traceback(tmp_path):
    """Found after parsing (a file's content, an option the layer refuses): argparse's kind of error."""
    train, narrow = tmp_path / "train.txt", tmp_path / "narrow.txt"
    train.write_text("3 6 5\n1 0:0.5\n2 1:1\n0 2:1\n")
    narrow.write_text("1 8 5\n1 7:0.5\n")
    base = ["--json", "", "--plot", "", "--runs", "lsh"]
    for argv, message in ((["--data", str(tmp_path / "missing.txt")], "--data: [Errno 2] No such file"),
                          (["--data", str(train), "--test-data", str(tmp_path / "gone.txt")], "--test-data: [Errno 2]"),
                          (["--data", str(train), "--test-data", str(narrow)], "the model is sized by the training file"),
                          (["--data", str(train), "--test-fraction", "0.1"], "need at least one training and one test"),
                          (["--train-points", "200", "--test-points", "50", "--features", "100", "--labels", "300",
                            "--bits", "40"], "the lsh run's output layer cannot be built from its options: bits must "
                                             "be in [1, 20], got 40")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            xmc.main(base + argv)


def test_precision_at_k_is_computed_batch_by_batch(monkeypatch):
    """evaluate and popular_baseline built the whole split's label matrix, padded to its most-labelled
    point: 2.5 GB for 100,000 test points one of which had 2,000 labels."""
    torch.manual_seed(0)
    data = xmc_data.generate(2500, num_features=200, num_labels=500, seed=0)
    net = xmc.XMCNet(200, 500, hidden=8)
    ids, offsets, values, labels = data.batch(np.arange(len(data)))
    with torch.no_grad():
        top = net.out(net.hidden(ids, offsets, values)).topk(5).indices
    want = xmc.precision_at(top, labels)
    popular = torch.from_numpy(np.argsort(-data.label_counts(), kind="stable")[:5].copy())
    want_popular = xmc.precision_at(popular.expand(len(data), -1), labels)
    whole = xmc_data.XMCData.batch

    def batch(self, index):
        assert len(index) <= 1024, "a label matrix of more than a batch"
        return whole(self, index)
    monkeypatch.setattr(xmc_data.XMCData, "batch", batch)
    got, _ = xmc.evaluate(net, "dense", data)
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-6 for k in want)
    got = xmc.popular_baseline(data, data)
    assert all(abs(got[k] - want_popular[k]) < 1e-6 for k in want_popular)


@pytest.mark.slow
def test_hogwild_runs_learn_with_one_and_two_processes():
    """examples/hogwild_xmc.py end to end (its options were tested, the lock-free training itself was not):
    both process counts take the same total steps and rank far above the most popular labels."""
    import hogwild_xmc
    args = ["--procs", "1,2", "--train-points", "2000", "--test-points", "400", "--features", "5000",
            "--labels", "3000", "--epochs", "2", "--eval-points", "200", "--active", "256", "--batch-size", "64",
            "--warmup-epochs", "0.5"]
    results = hogwild_xmc.main(args)
    train, test = xmc_data.generate_split(2000, 400, seed=0, num_features=5000, num_labels=3000)
    popular = xmc.popular_baseline(train, test)["P@1"]
    assert [r["procs"] for r in results] == [1, 2]
    assert results[0]["steps"] == results[1]["steps"] > 0
    for r in results:
        assert r["final"]["P@1"] > popular + 0.1, (r["final"], popular)


def test_the_report_says_who_answered_the_lsh_top_k():
    """The demo's footnote follows topk's checks: the index, its stand-in (the likeliest rows alone), or exact."""
    torch.manual_seed(0)
    layer = LSHLinear(16, 8192, rebuild=None).eval()
    with torch.no_grad():
        layer.weight[:600] *= 8  # the winners: long rows that one probe and 8 candidates miss
    x = torch.randn(300, 16)
    assert xmc.topk_fallback(xmc.topk_record(layer)) is None  # nothing checked yet
    layer.topk(x, 5)
    assert xmc.topk_fallback(xmc.topk_record(layer)) is None  # the defaults' index passed its check
    layer.topk(x, 5, probes=1, budget=8)
    record = xmc.topk_record(layer)  # (what the demo records for its own call, topk(h, 5))
    record["answered_by"] = list(layer.topk_answered_by(5, probes=1, budget=8))
    by, checks = record["answered_by"], record["checks"][1:]  # after the defaults' passing check
    (failed, recall, inputs), alone = checks[0], checks[-1]
    assert failed == [5, 1, 8, 64] and recall < 0.95 and inputs == 64  # the premise: this index fails
    assert by[:3] == [5, 0, 0] and alone[0] == by and alone[1] >= 0.95
    assert xmc.topk_fallback({**record, "checks": checks}) == (
        f"topk answered from the {by[3]:,} likeliest rows alone: its index found {recall:.3f} of the exact top 5 "
        f"of 64 checked test points, less than min_recall=0.95; they found {alone[1]:.3f} of {alone[2]} other test points'")
    assert xmc.topk_fallback({**record, "checks": checks, "answered_by": None}).startswith(
        "topk answered exactly: its index found")


def test_text_structure_trains_on_the_corpus_windows(monkeypatch):
    """--structure text: xmc_data.text_split's points (here of a small random corpus standing in for the
    standard library), trained like the generated ones."""
    import transformer_lm

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    files = {f"f{i}.py": list(rng.choice(words, size=640, p=np.arange(1, 401) ** -1.0 / (np.arange(1, 401) ** -1.0).sum()))
             for i in range(12)}
    monkeypatch.setattr(transformer_lm, "stdlib_files", lambda: sorted(files))
    monkeypatch.setattr(transformer_lm, "read_words", lambda path: files[path])
    monkeypatch.setattr(transformer_lm, "is_held_out", lambda path, fraction: path in ("f0.py", "f1.py"))
    argv = ["--structure", "text", "--train-points", "150", "--test-points", "30", "--features", "300", "--labels", "200",
            "--epochs", "2", "--warmup-epochs", "1", "--active", "256", "--eval-points", "20", "--runs", "lsh",
            "--json", "", "--plot", ""]
    out = xmc.main(argv)
    train, test = xmc_data.text_split(150, 30, seed=0, num_features=300, num_labels=200)
    assert (out["data"]["train"], out["data"]["test"]) == (train.summary(), test.summary())
    assert np.diff(train.feature_offsets).max() <= 24  # a window's 24 context words: not the synthetic points
    assert out["runs"][0]["steps"] == 2 * 2 and 0 <= out["runs"][0]["final"]["P@1"] <= 1  # 150 points, batches of 128
    assert out["args"]["corpus"] == f"the standard library of Python {platform.python_version()}"
    vocabulary = len({w for name, words in files.items() if name not in ("f0.py", "f1.py") for w in words})
    with pytest.raises(SystemExit, match=f"--structure text: text_split: num_labels=400: the training text has "
                                         f"{vocabulary} distinct words"):
        xmc.main([*argv[:8], "--labels", "400", *argv[10:]])
