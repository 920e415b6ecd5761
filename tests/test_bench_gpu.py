"""benchmarks/bench_gpu.py's harness on the CPU (``--device cpu``), at a small width: its times are printed,
never checked."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_gpu  # noqa: E402


def profile_of(tmp_path, top: int) -> dict:
    """bench_gpu's --profile ``top`` of a dense and a sparse case at a small width: case -> record."""
    path = tmp_path / f"gpu{top}.json"
    bench_gpu.main(["--device", "cpu", "--sizes", "500", "--dtypes", "fp32", "--cases", "dense,lsh shared lazy",
                    "--active", "64", "--batch", "16", "--hidden", "8", "--warmup", "0", "--steps", "1",
                    "--profile", str(top), "--out", str(path)])
    return {r["case"]: r for r in json.loads(path.read_text())["results"]}


def test_profile_names_each_cases_costliest_ops(tmp_path, capsys):
    """--profile N keeps, per case, the N ops of largest self time per step, in that order; with N past the step's
    ops, the sparse step's own ops are among them. (Which ops are the costliest at this width depends on the
    machine's load: the CI's 2 cores, busy, once ranked none of lsh_torch's in the first 8.)"""
    results = profile_of(tmp_path, 8)
    assert "profile of lsh shared lazy, 500 outputs, fp32 (3 steps):" in capsys.readouterr().out
    for case, record in results.items():
        profile = record["profile"]
        assert len(profile) == 8 and not any(row["op"].startswith("## ") for row in profile), case
        times = [row["self_ms_per_step"] for row in profile]
        assert times == sorted(times, reverse=True) and times[0] > 0, case
        assert all(row["calls_per_step"] > 0 for row in profile), case
    every = profile_of(tmp_path, 1000)["lsh shared lazy"]["profile"]
    assert 8 < len(every) < 1000
    sparse_ops = {"lsh_torch::query_shared", "lsh_torch::lazy_adam_", "lsh_torch::shared_linear"}
    assert sparse_ops <= {row["op"] for row in every}, every
