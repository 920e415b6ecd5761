"""examples/cli.py's argument types, and the command lines of every example and benchmark: a bad
value stops the script at parse time with argparse's error (exit status 2, the option named),
before any work. Nothing here trains or measures anything."""
import argparse
import importlib
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import cli  # noqa: E402

EXAMPLES = ["xmc", "hogwild_xmc", "transformer_lm", "mnist_mlp", "hf_causal_lm", "xmc_data"]
BENCHMARKS = ["bench_estimator", "bench_topk", "bench_layer", "bench_output_layer", "bench_lm_recall",
              "bench_xmc_recall", "bench_distributed", "bench_gpu", "bench_paper", "bench_sweep", "bench_narrow"]


def script(name: str):
    if name == "hf_causal_lm":  # imports lsh_torch.integrations.transformers (the optional extra "hf")
        pytest.importorskip("transformers")
    return importlib.import_module(name)


def refused(parse, text: str) -> bool:
    try:
        parse(text)
    except argparse.ArgumentTypeError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# The types

def test_integer():
    assert cli.integer()("7") == 7 and cli.integer(0)("0") == 0 and cli.integer(1, 3)("3") == 3
    for text in ("0", "-1", "abc", "1.5", "nan", "inf", "", "1e3"):
        assert refused(cli.integer(), text), text
    assert refused(cli.integer(1, 3), "4") and refused(cli.integer(0), "-1")


def test_real_positive_and_fraction():
    assert cli.positive("0.5") == 0.5 and cli.positive("1e-3") == 1e-3
    for text in ("0", "-1", "nan", "inf", "-inf", "abc", ""):
        assert refused(cli.positive, text), text
    assert cli.fraction("0.2") == 0.2
    for text in ("0", "1", "1.5", "-0.1", "nan"):
        assert refused(cli.fraction, text), text
    closed = cli.real(0, 1)
    assert closed("0") == 0.0 and closed("1") == 1.0 and refused(closed, "1.01") and refused(closed, "nan")
    assert cli.real(0)("1e9") == 1e9 and refused(cli.real(0), "inf")


def test_auto_or():
    parse = cli.auto_or(cli.integer())
    assert parse("auto") == "auto" and parse("3") == 3
    for text in ("0", "Auto", "", "2.5"):
        assert refused(parse, text), text


def test_integers_listing_and_choice():
    assert cli.integers()("1,2, 30") == [1, 2, 30]
    for text in ("", ",", "1,,2", "1,", "1,0", "1,x"):
        assert refused(cli.integers(), text), text
    names = cli.listing(cli.choice("fp32", "bf16"))
    assert names("bf16,fp32") == ["bf16", "fp32"]
    assert refused(names, "fp16") and refused(names, "fp32,")


def test_output_path_and_output_dir(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("")
    assert cli.output_path("") == ""  # none
    for ok in (tmp_path / "new" / "deeper" / "x.json", tmp_path / "x.json", afile):
        assert cli.output_path(str(ok)) == str(ok)
    for bad in (afile / "x.json", afile / "sub" / "x.json", tmp_path):  # under a file; a folder
        assert refused(cli.output_path, str(bad)), bad
    assert cli.output_dir(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")
    assert cli.output_dir(str(tmp_path)) == str(tmp_path)
    assert refused(cli.output_dir, str(afile)) and refused(cli.output_dir, str(afile / "dir"))
    # Where the results are the point, "" (none) is refused: those scripts wrote their default file.
    assert refused(cli.results_path, "") and refused(cli.results_path, str(afile / "x.json"))
    assert cli.results_path(str(afile)) == str(afile)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_output_path_refuses_a_folder_that_cannot_be_written():
    """xmc.py --json /proc/x/y.json ran the whole demo, then failed with a traceback (os.access says
    /proc is writable to root: a file is tried)."""
    for bad in ("/proc/x/y.json", "/proc/self/y.json"):
        assert refused(cli.output_path, bad) and refused(cli.results_path, bad), bad
    assert refused(cli.output_dir, "/proc/x")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in a read-only folder")
def test_output_path_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for bad in (locked / "x.json", locked / "new" / "x.json"):
            assert refused(cli.output_path, str(bad)), bad
        assert refused(cli.output_dir, str(locked / "new"))
    finally:
        locked.chmod(0o700)


def test_given_tells_the_options_a_command_line_sets():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    assert cli.given(p, ["--quick"], ["size", "steps"]) == []
    assert cli.given(p, ["--size", "5", "--quick"], ["size", "steps"]) == ["size"]  # the default's value, but given
    assert cli.given(p, ["--steps=1", "--size", "2"], ["size", "steps"]) == ["size", "steps"]


def test_write_json_creates_folders_and_replaces_whole(tmp_path):
    path = tmp_path / "new" / "deeper" / "x.json"  # output_path promised these folders
    cli.write_json(str(path), {"a": 1})
    assert path.read_text() == '{\n "a": 1\n}'
    with pytest.raises(TypeError):  # fails mid-write: the old file stays whole, no temporary file is left
        cli.write_json(str(path), {"a": 2, "b": object()})
    assert path.read_text() == '{\n "a": 1\n}' and os.listdir(path.parent) == ["x.json"]
    assert cli.with_folder(str(tmp_path / "other" / "y.png")) == str(tmp_path / "other" / "y.png")
    assert (tmp_path / "other").is_dir()


def test_distinct_refuses_a_repeated_value(capsys):
    p = argparse.ArgumentParser()
    cli.distinct(p, "--seeds", [0, 1, 2])
    with pytest.raises(SystemExit):
        cli.distinct(p, "--seeds", [0, 1, 0])
    assert "--seeds gives 0 more than once" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The scripts

@pytest.mark.parametrize("name", EXAMPLES + BENCHMARKS)
def test_defaults_parse(name):
    args = script(name).parse_args([])
    assert isinstance(args, argparse.Namespace)


BAD = [  # (script, argv, what stderr must name); {file} is a file, {dir} a folder
    ("xmc", ["--epochs", "0"], "--epochs"),
    ("xmc", ["--lr", "nan"], "--lr"),
    ("xmc", ["--tables", "0"], "--tables"),
    ("xmc", ["--label-smoothing", "1.5"], "--label-smoothing"),
    ("xmc", ["--norm-rows-share", "1.5"], "--norm-rows-share"),
    ("xmc", ["--weight-decay", "-0.1"], "--weight-decay"),
    ("xmc", ["--rebuild", "0"], "--rebuild"),
    ("xmc", ["--runs", "lsh,bogus"], "--runs"),
    ("xmc", ["--runs", "lsh,random,lsh"], "--runs"),
    ("xmc", ["--json", "{file}/x.json"], "--json"),
    ("xmc", ["--generate", "{file}"], "--generate"),
    ("xmc", ["--rebuild", "growingX"], "--rebuild"),  # was taken as growing
    ("xmc", ["--rebuild", "growing:1:2"], "--rebuild"),
    ("hogwild_xmc", ["--procs", "0"], "--procs"),
    ("hogwild_xmc", ["--procs", "1,,2"], "--procs"),
    ("hogwild_xmc", ["--batch-size", "0"], "--batch-size"),
    ("transformer_lm", ["--steps", "0"], "--steps"),
    ("transformer_lm", ["--held-out", "1"], "--held-out"),
    ("transformer_lm", ["--heads", "3"], "--heads"),  # 128 is not a multiple of 3
    ("transformer_lm", ["--eval-tokens", "10"], "--eval-tokens"),  # less than one --context window
    ("transformer_lm", ["--vocab", "100"], "--vocab"),  # the default 128 active words above the head's 101
    ("transformer_lm", ["--bits", "30"], "bits must be in [1, 20]"),  # the layer's own check, before the corpus
    ("hf_causal_lm", ["--vocab", "100", "--active", "500"], "--vocab"),
    ("mnist_mlp", ["--active", "0"], "--active"),
    ("mnist_mlp", ["--num-train", "5000"], "--num-train"),  # no test digits left
    ("hf_causal_lm", ["--seconds", "0"], "--seconds"),
    ("hf_causal_lm", ["--active", "-5"], "--active"),
    ("hf_causal_lm", ["--context", "1"], "--context"),
    ("xmc_data", ["--train-points", "0"], "--train-points"),
    ("xmc_data", ["--out-dir", "{file}"], "--out-dir"),
    ("bench_estimator", ["--steps", "0"], "--steps"),
    ("bench_estimator", ["--xmc-labels", "1"], "--xmc-labels"),
    ("bench_estimator", ["--budgets", "shared:0"], "--budgets"),
    ("bench_estimator", ["--seeds", "0", "-1"], "--seeds"),
    ("bench_estimator", ["--json", "{dir}"], "--json"),
    ("bench_topk", ["--queries", "0"], "--queries"),
    ("bench_topk", ["--probes", "default,0"], "--probes"),
    ("bench_topk", ["--kinds", "random,nope"], "--kinds"),
    ("bench_layer", ["--out", "4096", "0"], "--out"),
    ("bench_layer", ["--min-run-time", "0"], "--min-run-time"),
    ("bench_layer", ["--budget", "5000", "--out", "4096"], "--budget"),
    ("bench_output_layer", ["--repeats", "0"], "--repeats"),
    ("bench_output_layer", ["--sizes", "100,,5"], "--sizes"),
    ("bench_output_layer", ["--out", "{file}/x.json"], "--out"),
    ("bench_lm_recall", ["--k", "0"], "--k"),
    ("bench_lm_recall", ["--json", ""], "--json"), ("bench_sweep", ["--out", ""], "--out"),
    ("bench_lm_recall", ["--tables", "20"], "--tables"),
    ("bench_lm_recall", ["--hash", "srp,md5"], "--hash"),
    ("bench_lm_recall", ["--k", "300"], "--pool"),
    ("bench_distributed", ["--steps", "1"], "--steps"),  # the first step is not timed
    ("bench_distributed", ["--step-steps", "2"], "--step-steps"),
    ("bench_gpu", ["--batch", "0"], "--batch"),
    ("bench_gpu", ["--dtypes", "fp16"], "--dtypes"),
    ("bench_gpu", ["--active", "1.5"], "--active"),
    ("bench_paper", ["--fractions", "0.1,nan"], "--fractions"),
    ("bench_paper", ["--methods", "lsh,magic"], "--methods"),
    ("bench_paper", ["--epochs", "mnist=0"], "--epochs"),
    ("bench_paper", ["--epochs", "mnist=2"], "--epochs"),  # digits and mnist1d have none
    ("bench_sweep", ["--K", "4,,6"], "--K"),
    ("bench_sweep", ["--active", "0"], "--active"),
    # Refused before the run rather than a traceback deep in it (often after long work), or ignored silently.
    ("bench_layer", ["--device", "foo"], "--device"),
    ("bench_topk", ["--k", "10", "--sizes", "5"], "--k"),
    ("bench_topk", ["--budgets", "3"], "--budgets"),  # below --k 5
    ("bench_topk", ["--norm-rows", "700000"], "--norm-rows"),
    ("bench_output_layer", ["--active", "100"], "--active"),  # a batch has up to 128 x 5 distinct labels
    ("bench_output_layer", ["--active-per-row", "2"], "--active-per-row"),
    ("bench_output_layer", ["--dense-repeats", "40"], "--dense-repeats"),  # --repeats 30 bounds it
    ("bench_estimator", ["--budgets", "per_row:60000"], "--budgets"),  # the LM head has 50,001 outputs
    ("bench_estimator", ["--xmc-tail", "5000"], "--xmc-tail"),  # of 2,048 active: failed after the LM part
    ("bench_estimator", ["--xmc-mode", "per_row", "--xmc-tail", "500"], "--xmc-tail"),  # of 128 per point
    ("bench_estimator", ["--eval-every", "0", "--lm-plot", "{dir}/lm.png"], "--lm-plot"),  # no curves to plot
    ("bench_estimator", ["--seeds", "0", "0"], "--seeds"),
    ("bench_narrow", ["--seeds", "0,0"], "--seeds"),
    ("bench_sweep", ["--hidden", "10"], "--hidden"),  # 5% of 10 neurons: none active
    ("bench_sweep", ["--K", "2", "--probes", "5,10"], "--probes"),  # a table of 4 buckets: an empty grid
    ("bench_sweep", ["--K", "2", "--probes", "1"], "--base-probes"),
    ("bench_lm_recall", ["--shared", "--active", "60000"], "--active"),
    ("bench_lm_recall", ["--shared", "--k", "10"], "--k"),  # --shared's table has no top k, pool or tables
    ("bench_lm_recall", ["--shared", "--tables", "20:2"], "--tables"),
    ("bench_lm_recall", ["--active", "100"], "--active"),  # only the --shared table has a shared set
    # bench_lm_recall trained for minutes, then skipped every cell and wrote an empty table.
    ("bench_lm_recall", ["--bits", "25"], "--bits"),  # above the library's 20
    ("bench_lm_recall", ["--tables", "2000:2"], "--tables"), ("bench_lm_recall", ["--tables", "20:200"], "--tables"),
    ("bench_lm_recall", ["--hash", "srp,dwta:3"], "--hash"),  # not a power of two
    ("bench_lm_recall", ["--bits", "1,2", "--tables", "20:8"], "every cell"),  # probes above 2^K
    ("bench_lm_recall", ["--hash", "dwta:32", "--bits", "8,12"], "every cell"),  # log2(32) divides no K
    ("bench_lm_recall", ["--pool", "60000"], "--pool"),  # the head has 50,001 words
    # A width below the active outputs failed at its turn, the earlier widths' results lost.
    ("bench_output_layer", ["--sizes", "20000,1000"], "--sizes 1000: below --active 2048"),
    ("bench_output_layer", ["--sizes", "900", "--active", "700", "--active-per-row", "1000"],
     "--sizes 900: below --active-per-row 1000"),
    ("bench_gpu", ["--sizes", "670091,100"], "--sizes 100: below --active-per-row 128"),
    ("bench_gpu", ["--sizes", "1000", "--cases", "dense,lsh shared lazy"], "--sizes 1000: below --active 2048"),
    ("bench_xmc_recall", ["--k", "5000", "--labels", "2000"], "--k 5000 must be at most --labels 2000"),
] + ([] if torch.cuda.is_available() else [("bench_layer", ["--device", "cuda"], "--device")]) + (
    [("xmc", ["--json", "/proc/x/y.json"], "--json"), ("xmc_data", ["--out-dir", "/proc/x"], "--out-dir")]
    if os.path.isdir("/proc") else []) + [
    (name, ["--threads", value], "--threads") for name in ("xmc", "transformer_lm", "mnist_mlp", "hf_causal_lm",
                                                           "bench_layer", "bench_output_layer", "bench_distributed",
                                                           "bench_paper", "bench_sweep")
    for value in ("0", "-1")]  # torch.set_num_threads raised a RuntimeError after the parse


def refuses(module, argv, *names, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        module.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]  # the error itself: the usage lines above name every option
    for name in names:
        assert name in message, err
    return err


@pytest.mark.parametrize("name, argv, option", BAD, ids=[f"{n}{' '.join(a)}" for n, a, _ in BAD])
def test_bad_value_is_refused_at_parse_time(name, argv, option, tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("")
    argv = [a.format(file=afile, dir=tmp_path) for a in argv]
    refuses(script(name), argv, option, capsys=capsys)


def test_the_width_and_grid_checks_refuse_only_what_fails():
    """The checks above refuse only what fails: a fraction of N fits any width, a case not run needs no
    room, a grid where some cells work keeps them (the others are skipped, as before)."""
    gpu = script("bench_gpu")
    assert gpu.parse_args(["--sizes", "100", "--cases", "dense"]).sizes == [100]
    assert gpu.parse_args(["--sizes", "100", "--active", "0.5", "--active-per-row", "0.1"]).sizes == [100]
    assert gpu.parse_args(["--sizes", "1000", "--cases", "dense,lsh per_row"]).sizes == [1000]
    assert script("bench_output_layer").parse_args(["--sizes", "2048,5000"]).sizes == [2048, 5000]
    lm_recall = script("bench_lm_recall")
    assert lm_recall.parse_args(["--hash", "srp,dwta:32", "--bits", "8"]).hash == ["srp", "dwta:32"]
    assert lm_recall.parse_args(["--bits", "1,20", "--tables", "20:8"]).bits == [1, 20]
    assert script("bench_xmc_recall").parse_args(["--k", "2000", "--labels", "2000"]).k == 2000


class Trained(Exception):
    """Raised by a stand-in for training: the run got past its checks."""


@pytest.mark.parametrize("name", ["transformer_lm", "hf_causal_lm"])
@pytest.mark.parametrize("held_out, training, error", [
    (50, 1000, "the held-out text has 50 words"), (1000, 65, "the training text has 65 words"), (65, 66, None)])
def test_lm_text_shorter_than_a_window_is_an_error(name, held_out, training, error, monkeypatch):
    """--held-out 0.001 --context 9000 ended in a ZeroDivisionError, after the training (transformer_lm)
    or at the first evaluation (hf_causal_lm)."""
    module = script(name)
    corpus = (torch.zeros(training, dtype=torch.int64), torch.zeros(held_out, dtype=torch.int64), ["w"] * 101)
    monkeypatch.setattr(module, "load_corpus", lambda *args, **kwargs: corpus)

    def train(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(module, "train" if name == "transformer_lm" else "train_for", train)
    argv = ["--context", "64", "--vocab", "100", "--active", "64", "--d-model", "16", "--heads", "1", "--layers", "1"]
    if error is None:  # one window of each: enough
        with pytest.raises(Trained):
            module.main(argv)
    else:
        with pytest.raises(SystemExit, match=f"error: --context 64: {error}"):
            module.main(argv)


def test_xmc_recall_plots_beside_a_path_of_any_suffix(tmp_path, monkeypatch):
    """--plot x.svg: the recall plot's name was made by replacing ".png", so it overwrote the P@1 plot."""
    bxr = script("bench_xmc_recall")
    row = {"epoch": 1.0, "P@1": 0.5, "recall": 0.5, "mass_recall": 0.5, "warmup": False}
    monkeypatch.setattr(bxr, "train", lambda name, seed, args: [row])  # nothing trained
    plots = []
    monkeypatch.setattr(bxr.bench_estimator, "plot_seed_curves", lambda curves, path, *a, **k: plots.append(path))
    bxr.main(["--seeds", "0", "--epochs", "2", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.svg")])
    assert plots == [str(tmp_path / "r.svg"), str(tmp_path / "r_top.svg")]


@pytest.mark.parametrize("content, error", [(None, "No such file or directory"), ("{not json", "not JSON"),
                                            ('{"runs": []}', "not a bench_paper.py results file")])
def test_bench_paper_replot_of_a_bad_file_is_an_error(content, error, tmp_path):
    """--replot of a missing or non-JSON file ended in a traceback."""
    path = tmp_path / "paper.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        script("bench_paper").main(["--replot", str(path)])
    assert f"error: --replot {path}: {error}" in str(exc.value)


@pytest.mark.parametrize("option, value", [("--test-data", "test.txt"), ("--max-points", "10")])
def test_xmc_file_options_need_data(option, value, capsys):
    refuses(script("xmc"), [option, value], option, "needs --data", capsys=capsys)  # ignored silently


@pytest.mark.parametrize("option, value", [("--labels", "7"), ("--test-points", "50"), ("--structure", "tree")])
def test_xmc_synthetic_sizes_are_refused_with_data(option, value, capsys):
    # The file's header gives the sizes: these were ignored, and the results' args recorded them.
    refuses(script("xmc"), ["--data", "train.txt", option, value], option, "with --data the file's header", capsys=capsys)


def test_xmc_bin_size_needs_dwta(capsys):
    xmc = script("xmc")
    refuses(xmc, ["--bin-size", "4"], "--bin-size", "--hash dwta", capsys=capsys)  # srp switched to DWTA silently
    refuses(xmc, ["--bin-size", "4", "--hash", "srp"], "--bin-size", capsys=capsys)
    assert xmc.parse_args(["--bin-size", "4", "--hash", "dwta"]).bin_size == 4


@pytest.mark.parametrize("name, argv, option", [
    ("xmc", ["--epochs", "3"], "--epochs"), ("xmc", ["--dense-epochs", "3"], "--dense-epochs"),
    ("xmc", ["--train-points", "100"], "--train-points"), ("xmc", ["--test-points=100"], "--test-points"),
    ("hogwild_xmc", ["--epochs", "3"], "--epochs"),
    ("bench_output_layer", ["--sizes", "10000"], "--sizes"), ("bench_output_layer", ["--repeats", "3"], "--repeats"),
    ("bench_output_layer", ["--max-seconds", "5"], "--max-seconds"),
    ("bench_gpu", ["--steps", "9"], "--steps"), ("bench_paper", ["--seeds", "2"], "--seeds"),
    ("bench_sweep", ["--epochs", "3"], "--epochs"), ("bench_layer", ["--min-run-time", "2"], "--min-run-time"),
])
def test_quick_refuses_the_sizes_it_sets(name, argv, option, capsys):
    # --quick overrode them silently; now given alongside it they are refused, alone they stand.
    module = script(name)
    for order in (["--quick"] + argv, argv + ["--quick"]):
        refuses(module, order, "--quick", option, capsys=capsys)
    assert not module.parse_args(argv).quick


def test_quick_sets_its_sizes_and_help_shows_the_real_defaults(capsys):
    xmc, bol = script("xmc"), script("bench_output_layer")
    args = xmc.parse_args(["--quick", "--labels", "500"])
    assert (args.train_points, args.test_points, args.epochs, args.dense_epochs, args.labels) == (8000, 2000, 2, 1, 500)
    assert xmc.parse_args([]).train_points == 20_000
    args = bol.parse_args(["--quick", "--batch", "64"])
    assert (args.sizes, args.repeats, args.dense_repeats, args.max_seconds, args.batch) == ([100_000], 10, 3, 30, 64)
    args = script("bench_paper").parse_args(["--quick", "--lr", "0.01"])
    assert (args.datasets, args.seeds, args.epochs, args.lr) == (["digits"], 1, 1, 0.01)
    assert script("bench_layer").parse_args(["--quick", "--budget", "64"]).out == [4096, 65536]
    with pytest.raises(SystemExit):
        xmc.parse_args(["--help"])
    assert "(default: 20000)" in capsys.readouterr().out


@pytest.mark.parametrize("option, value", [("--data", "train.txt"), ("--test-data", "test.txt"),
                                           ("--max-points", "10"), ("--generate", "data"), ("--save-head", "head.pt"),
                                           ("--runs", "dense"), ("--mode", "per_row"), ("--json", "out.json"),
                                           ("--threads", "2"), ("--device", "cuda"), ("--dev", "meta"),
                                           ("--jso", "x.json"), ("--final-points", "10")])  # xmc.py's parser takes abbreviations
def test_hogwild_refuses_what_it_would_ignore(option, value, capsys):
    refuses(script("hogwild_xmc"), [option, value], option, capsys=capsys)


def test_hogwild_abbreviations_are_xmc_options():
    """Its own parser took --pro 4 (meant: xmc.py's --probes) as --procs 4."""
    args = script("hogwild_xmc").parse_args(["--pro", "4"])
    assert (args.procs, args.probes) == ([1, 2], 4)


def test_hogwild_workers_honour_label_smoothing_weight_decay_and_uncorrected(monkeypatch):
    hogwild = script("hogwild_xmc")
    args = hogwild.parse_args(["--label-smoothing", "0.1", "--weight-decay", "0.01", "--uncorrected", "--epochs", "2"])
    seen = {}

    def optimizers(net, kind, lr, out_lr, weight_decay=0.0):
        seen["weight_decay"] = weight_decay
        return []

    def loss_fn(net, kind, batch, uncorrected=False, trunk=None, label_smoothing=0.0):
        seen["loss"] = (uncorrected, label_smoothing)
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(hogwild.xmc, "optimizers", optimizers)
    monkeypatch.setattr(hogwild.xmc, "loss_fn", loss_fn)
    net = torch.nn.Module()
    net.out = torch.nn.Linear(1, 1)
    part = SimpleNamespace(batches=lambda batch_size, seed: [None])
    threads = torch.get_num_threads()
    try:
        hogwild.train_part(0, net, part, args, SimpleNamespace(wait=lambda: None))
    finally:
        torch.set_num_threads(threads)  # a worker runs on one thread
    assert seen == {"weight_decay": 0.01, "loss": (True, 0.1)}


def test_transformer_lm_vocab_above_the_corpus_is_an_error_naming_it(monkeypatch):
    """--vocab 10000000 stopped after reading the corpus without argparse's "error:" or the option."""
    tl = script("transformer_lm")
    monkeypatch.setattr(tl, "stdlib_files", lambda: [tl.__file__])
    with pytest.raises(SystemExit, match="error: --vocab 10000000: the training text has only"):
        tl.load_corpus(10_000_000, 0.05, progress=False)


def test_bench_topk_help_is_its_first_sentence(capsys):
    with pytest.raises(SystemExit):
        script("bench_topk").parse_args(["--help"])
    assert "in speed and in recall of the exact top-k." in " ".join(capsys.readouterr().out.split())


def test_mnist_refuses_a_layer_option_before_training(monkeypatch, capsys):
    """--bits 30 trained and reported the nn.Linear model first (a minute), then failed with a traceback."""
    mnist = script("mnist_mlp")
    monkeypatch.setattr(mnist, "train", lambda *a, **k: pytest.fail("trained before checking the layer options"))
    with pytest.raises(SystemExit):  # at parse time now, before the data loads
        mnist.main(["--bits", "30", "--no-progress"])
    assert "argument --bits: must be an int in [1, 20], got '30'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="probes must be in"):  # each fine alone, not together: the layer's check
        mnist.main(["--bits", "2", "--probes", "10", "--no-progress"])


def _workers(pid: int) -> list[int]:
    """The multiprocessing workers (not its resource tracker) process ``pid`` started."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if (entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid
                    and b"spawn_main" in open(f"/proc/{entry}/cmdline", "rb").read()):
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_hogwild_stops_when_a_worker_is_killed_and_leaves_no_worker(tmp_path):
    """A worker killed without a Python exception (the OOM killer) left the parent and the other
    worker waiting at the barrier forever; a killed parent left its workers orphaned, holding memory."""
    import signal
    import subprocess
    import time
    command = [sys.executable, os.path.join(ROOT, "examples", "hogwild_xmc.py"), "--train-points", "2000",
               "--test-points", "100", "--labels", "500", "--features", "500", "--epochs", "1000",
               "--warmup-epochs", "0", "--eval-points", "50", "--procs", "2"]
    for victim in ("worker", "parent"):
        log = tmp_path / f"{victim}.txt"
        run = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        try:
            started = time.time()
            while "epoch 2:" not in log.read_text():  # training on both workers
                assert run.poll() is None, "the run ended before training"
                assert time.time() < started + 120, "no second epoch in 2 minutes"
                time.sleep(0.2)
            workers = _workers(run.pid)
            assert len(workers) == 2
            os.kill(workers[0] if victim == "worker" else run.pid, signal.SIGKILL)
            if victim == "worker":
                # Stopped: by the watch (as a SIGTERM stops it), or, killed inside the barrier, by its broken state.
                assert run.wait(timeout=60) in (128 + signal.SIGTERM, 1)
            deadline = time.time() + 30
            while any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2]
                      for w in workers) and time.time() < deadline:
                time.sleep(0.5)
            assert time.time() < deadline, f"a worker outlived the killed {victim}"
        finally:
            run.kill()
            run.wait()


# ---------------------------------------------------------------------------------------------
# The command lines the README and docs/ give

def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(file, script, argv)`` of every ``python examples/X.py ...`` or ``python benchmarks/X.py ...``
    in README.md and docs/*.md: code lines and inline code spans (which may wrap across lines).
    Command lines with placeholders (``[--bits 8]``, ``{srp,dwta}``, ``--seed S``) are left out."""
    import glob
    import re
    import shlex
    found = []
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        parts = open(path).read().split("```")
        code = [line for block in parts[1::2] for line in block.splitlines()]  # fenced blocks' lines
        spans = [span for prose in parts[0::2] for span in re.findall(r"`([^`]*)`", prose)]  # may wrap lines
        for candidate in code + spans:
            candidate = " ".join(candidate.split()).split(" #")[0]  # unwrapped; a trailing comment dropped
            for match in re.finditer(r"python (examples|benchmarks)/(\w+)\.py((?: [^`|;&]*)?)", candidate):
                rest = match.group(3).strip()
                if re.search(r"[\[\]{}<>]|\.\.\.| [A-Z]( |$)", rest):
                    continue
                found.append((os.path.relpath(path, ROOT), match.group(2), shlex.split(rest)))
    return sorted({(f, s, tuple(a)) for f, s, a in found})


def test_every_documented_command_line_parses(monkeypatch):
    """A command the README or docs give keeps working as the scripts' options are tightened."""
    commands = documented_commands()
    assert len(commands) > 40  # the extraction found them
    monkeypatch.chdir(ROOT)
    failed = []
    for path, name, argv in commands:
        if (name == "hf_causal_lm" and importlib.util.find_spec("transformers") is None) or (
                "cuda" in argv and not torch.cuda.is_available()):  # refused at parse time without a GPU
            continue
        module = script(name)
        try:
            module.parse_args(list(argv))
        except SystemExit as exc:
            failed.append(f"{path}: python {name}.py {' '.join(argv)} (exit {exc.code})")
    assert not failed, "\n".join(failed)


def test_run_ends_an_interrupted_script_with_one_line_and_status_130(capsys):
    """Ctrl-C printed a traceback from wherever it landed (a user review); every script's entry point is cli.run."""
    def interrupted():
        raise KeyboardInterrupt
    handler = signal.getsignal(signal.SIGINT)
    try:
        for main, status in ((interrupted, 130), (lambda: 3, 3), (lambda: {"P@1": 0.5}, 0), (lambda: None, 0)):
            with pytest.raises(SystemExit) as ended:
                cli.run(main)
            assert ended.value.code == status
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # a second Ctrl-C while it exits: no traceback
    finally:
        signal.signal(signal.SIGINT, handler)
    assert capsys.readouterr().err.strip().endswith(": interrupted")
    for name in EXAMPLES + BENCHMARKS:
        with open(os.path.join(ROOT, "examples" if name in EXAMPLES else "benchmarks", name + ".py")) as f:
            assert f.read().endswith('if __name__ == "__main__":\n    cli.run(main)\n'), name


def test_bench_estimator_refuses_to_skip_both_parts():
    with pytest.raises(SystemExit) as ended:
        script("bench_estimator").parse_args(["--skip", "lm", "xmc"])
    assert ended.value.code == 2
