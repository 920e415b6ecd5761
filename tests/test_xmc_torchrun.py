"""examples/xmc.py under torchrun (2 gloo processes, sharded head) against the single-process run."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train-points", "600", "--test-points", "200", "--features", "2000", "--labels", "3000",
        "--epochs", "2", "--dense-epochs", "1", "--runs", "dense,lsh", "--batch-size", "32",
        "--eval-points", "100", "--active", "256", "--warmup-epochs", "0.5", "--plot", ""]


def _run(launcher, json_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "examples", "xmc.py"), *TINY,
                           "--json", str(json_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(json_path) as f:
        return done.stdout, {r["name"]: r for r in json.load(f)["runs"]}


def test_xmc_demo_under_torchrun_matches_the_single_process_run(tmp_path):
    out, sharded = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                        tmp_path / "two.json")
    _, single = _run([], tmp_path / "one.json")
    assert "torchrun: 2 ranks (gloo)" in out
    assert out.count("output layer ") == 1  # the table, from rank 0 only
    # Dense: DDP over the two halves of each batch is the single-process step on the whole batch.
    for k in ("P@1", "P@3", "P@5"):
        assert abs(sharded["dense"]["final"][k] - single["dense"]["final"][k]) <= 0.01, k
    assert abs(sharded["dense"]["final"]["loss"] - single["dense"]["final"]["loss"]) <= 0.05
    assert sharded["lsh-shared"]["final"]["loss"] is None  # a rank holds half the rows: no full softmax
    assert 0 < single["lsh-shared"]["final"]["loss"] < np.log(3000)  # learned: below the uniform guess
    lsh = sharded["lsh-shared"]
    assert lsh["budget"] == 256 and lsh["steps"] == single["lsh-shared"]["steps"]  # global batches, split budget
    assert lsh["final"]["P@1"] > 0.08  # learned: the most popular label scores 0.045 on this split
