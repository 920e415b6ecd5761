"""benchmarks/bench_topk.py on small layers (its times are printed, never checked)."""
import json
import os
import sys

import pytest
import torch

import lsh_torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_topk  # noqa: E402


def test_each_kind_checks_an_index_of_its_own(tmp_path):
    """Planted queries keep the random rows: they reused random's index, and reported its recall check."""
    path = tmp_path / "new" / "topk.json"  # a folder that does not exist yet
    bench_topk.main(["--sizes", "5000", "--queries", "64", "--kinds", "random,planted", "--budgets", "40",
                     "--min-recall", "0.001", "--repeats", "1", "--out", str(path)])
    rows = json.loads(path.read_text())["results"]
    assert [r["queries"] for r in rows] == ["random", "planted"]
    for row in rows:  # the index answers all 64 queries, the first 64 it checked: the same recall
        assert row["answers"] == "index" and row["num_queries"] == 64
        assert row["checked_recall"] == pytest.approx(row["recall_at_k"], abs=1e-6), row["queries"]


@pytest.fixture
def head(tmp_path):
    """A head as examples/xmc.py --save-head saves it: 300 outputs, 10 hidden vectors."""
    layer = lsh_torch.LSHLinear(16, 300, seed=0)
    path = tmp_path / "head.pt"
    torch.save({"state_dict": layer.state_dict(), "config": {"seed": 0}, "hash_bin_size": None,
                "hidden": torch.randn(10, 16)}, path)
    return str(path)


def test_model_is_checked_before_the_synthetic_sizes(head, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_topk, "bench", lambda n, args: pytest.fail("ran the synthetic sizes first"))
    for argv, message in ((["--model", head, "--k", "400"], "--k 400: above the 300 outputs of --model"),
                          (["--model", head, "--norm-rows", "500"], "--norm-rows 500: above the 300 outputs"),
                          (["--model", str(tmp_path / "missing.pt")], "--model")):
        with pytest.raises(SystemExit, match=f"error: {message}"):
            bench_topk.main(argv + ["--sizes", "1000", "--out", ""])


def test_model_measures_the_hidden_vectors_it_has(head, tmp_path, capsys):
    path = tmp_path / "topk.json"
    bench_topk.main(["--model", head, "--sizes", "1000", "--kinds", "random", "--queries", "64", "--repeats", "1",
                     "--out", str(path)])
    assert "10 saved hidden vectors, all measured (--queries 64)" in capsys.readouterr().out
    model = json.loads(path.read_text())["results"][-1]
    assert model["queries"] == "xmc" and model["num_queries"] == 10
    # 300 outputs are within topk's candidates: it answers exactly, with no index (whose size was read).
    assert model["answers"] == "exact" and model["index_mb"] == 0.0
