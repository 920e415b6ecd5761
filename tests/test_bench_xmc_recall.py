"""benchmarks/bench_xmc_recall.py on a small synthetic set: its table, JSON and plots, and that the
oracle's top set is the exact one (its recall)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_xmc_recall as bxr  # noqa: E402


def test_small_run(tmp_path, capsys):
    path = str(tmp_path / "recall.json")
    bxr.main(["--epochs", "2", "--seeds", "0", "--labels", "10000", "--train-points", "1000", "--k", "16",
              "--json", path, "--plot", str(tmp_path / "recall.png")])
    with open(path) as f:
        runs = json.load(f)["runs"]
    assert list(runs) == ["hashed", "oracle", "uniform"]
    after = {name: [r for r in seeds[0] if not r["warmup"]] for name, seeds in runs.items()}
    assert all(0 <= r["recall"] <= 1 for rows in after.values() for r in rows)
    # Uniform sets find about their share of the outputs; the exact top set finds the batch's top outputs
    # (a shared set of 2,048 for 256 points' top 16: not all of them).
    assert max(r["recall"] for r in after["uniform"]) < 0.5 < min(r["recall"] for r in after["oracle"])
    assert after["oracle"][0]["recall"] >= after["hashed"][0]["recall"]
    out = capsys.readouterr().out
    assert "| 2 |" in out and os.path.exists(tmp_path / "recall.png") and os.path.exists(tmp_path / "recall_top.png")


class Generated(Exception):
    """Raised by a stand-in for the data generator: what train() asked of it, nothing trained."""


def generator_kwargs(monkeypatch, args) -> dict:
    """The keyword arguments train() passes to xmc_data.generate_split for ``args``."""
    def generate_split(*_, **kwargs):
        raise Generated(kwargs)

    monkeypatch.setattr(bxr.xmc_data, "generate_split", generate_split)
    with pytest.raises(Generated) as generated:
        bxr.train("hashed", 0, args)
    return generated.value.args[0]


def test_near_labels_reaches_the_generator(monkeypatch):
    """--near-labels 0 (siblings only ever hard negatives) is the data's, not a parsed option alone."""
    kwargs = generator_kwargs(monkeypatch, bxr.parse_args(["--structure", "tree", "--near-labels", "0"]))
    assert kwargs["near_labels"] == 0 and kwargs["structure"] == "tree"


def test_per_row_sets(tmp_path):
    """--mode per_row: each row's own set, whose oracle holds the row's exact top outputs."""
    path = str(tmp_path / "recall.json")
    bxr.main(["--epochs", "2", "--seeds", "0", "--labels", "2000", "--train-points", "500", "--k", "4",
              "--mode", "per_row", "--sets", "oracle,uniform", "--json", path, "--plot", ""])
    with open(path) as f:
        runs = json.load(f)["runs"]
    after = {name: [r for r in seeds[0] if not r["warmup"]] for name, seeds in runs.items()}
    assert min(r["recall"] for r in after["oracle"]) > 0.9 > max(r["recall"] for r in after["uniform"])


def test_demo_args_reach_every_run_and_are_judged_at_once(monkeypatch, capsys):
    seen = []
    parse = bxr.xmc.parse_args
    monkeypatch.setattr(bxr.xmc, "parse_args", lambda argv=None: seen.append(list(argv)) or parse(argv))
    generator_kwargs(monkeypatch, bxr.parse_args(["--demo-args=--probes 8 --rescore 16"]))
    assert seen[-1][-4:] == ["--probes", "8", "--rescore", "16"]
    with pytest.raises(SystemExit):
        bxr.parse_args(["--demo-args=--probes eight"])
    assert "--demo-args '--probes eight'" in capsys.readouterr().err
