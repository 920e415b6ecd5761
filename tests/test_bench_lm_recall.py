"""benchmarks/bench_lm_recall.py's --shared table on a small random head (nothing trained; its times
are printed, never checked)."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_lm_recall as blr  # noqa: E402


@pytest.mark.parametrize("active", [512, 40])  # 40: no room for a top set beside the labels and the tail
def test_shared_rows_table(tmp_path, capsys, active):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 3000)
    h, labels = torch.randn(64, 16), torch.randint(0, 40, (64,))
    with torch.no_grad():
        probs = head(h).softmax(1)
    path = str(tmp_path / "new" / "rows.json")  # its folder is created
    blr.shared_rows(head, h, labels, probs, active, path)
    with open(path) as f:
        result = json.load(f)
    top = max(0, active - active // 2 - labels.unique().numel())
    assert result["active"] == active and result["pool"] == 4 * top
    assert result["label_mass"] == pytest.approx(probs[:, labels.unique()].sum(1).mean().item())
    masses = {row["top_set_rows"]: row["mass"] for row in result["rows"]}
    assert result["default_rows"] in masses and capsys.readouterr().out.count("(default)") == 1
    assert all(result["label_mass"] - 1e-6 <= m <= 1 + 1e-6 for m in masses.values())
    # Samples of 64 rows or more are the whole batch: one set.
    assert masses[64] == masses[128] == masses[1024]
    if not top:
        assert masses[64] == pytest.approx(result["label_mass"])
    else:
        assert masses[64] > result["random_mass"]  # the rescored top set beats as many uniform words


def test_shared_set_below_the_labels_is_refused_before_training(monkeypatch):
    """--shared --active 100 failed in query_shared after the corpus and 150 training steps."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3000, (5000,), generator=gen)
    monkeypatch.setattr(blr.tl, "load_corpus", lambda *args: (tokens, tokens, ["w"] * 3000))
    monkeypatch.setattr(blr.tl, "train", lambda *args: pytest.fail("trained before checking --active"))
    with pytest.raises(SystemExit, match="error: --active 100: the shared set holds the [0-9]+ distinct labels"):
        blr.main(["--shared", "--active", "100"])


def test_per_token_table_has_the_batch_pool_beside(tmp_path, monkeypatch, capsys):
    """Each cell measures a pool per token and the training lookups' pool for the batch. A batch pool that holds
    every word (16 x 200 > 3,000) scores them all exactly: recall 1."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3000, (5000,), generator=gen)
    monkeypatch.setattr(blr.tl, "load_corpus", lambda *args: (tokens, tokens, ["w"] * 3000))
    monkeypatch.setattr(blr.tl, "train", lambda *args: None)
    path = str(tmp_path / "recall.json")
    blr.main(["--pool", "200", "--k", "8", "--bits", "6", "--tables", "4:2", "--json", path])
    with open(path) as f:
        result = json.load(f)
    assert result["batch_pool"] == 3000 and len(result["rows"]) == 1
    row = result["rows"][0]
    assert row["batch_recall"] == 1.0 and 0 <= row["recall"] <= 1
    assert "batch pool of 3,000" in capsys.readouterr().out
