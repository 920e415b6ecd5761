"""benchmarks/bench_narrow.py on tiny heads (its times are printed, never checked)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_narrow  # noqa: E402


def test_the_exact_head_trains_as_nn_linear_and_the_former_set_is_a_quarter(tmp_path, capsys):
    path = str(tmp_path / "narrow.json")
    bench_narrow.main(["--sizes", "300", "--seeds", "0,1", "--steps", "40", "--batch", "32", "--test-points", "400", "--before",
                       "--out", path])
    with open(path) as f:
        rows = {(r["kind"], r["seed"]): r for r in json.load(f)["results"]}
    for seed in (0, 1):
        dense, lsh, before = (rows[kind, seed] for kind in ("dense", "lsh", "before"))
        assert lsh["outputs_per_step"] == dense["outputs_per_step"] == 300 and before["outputs_per_step"] == 75
        # LazyAdam's arithmetic is Adam's, the same batches and start: the same model to rounding.
        assert lsh["held_out_loss"] == pytest.approx(dense["held_out_loss"], rel=1e-3)
        assert before["held_out_loss"] > dense["held_out_loss"]
    assert "LSHLinear defaults + LazyAdam" in capsys.readouterr().out
