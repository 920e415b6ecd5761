"""benchmarks/bench_output_layer.py at a small width (its times are printed, never checked)."""
import json
import os
import sys

import torch

import lsh_torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_output_layer  # noqa: E402


def test_each_rebuild_is_labelled_with_its_own_layers_settings(tmp_path, capsys):
    """The per_row rebuild was printed under the shared layer's K, L and probes (per_row has twice the tables)."""
    path = tmp_path / "new" / "out.json"
    threads = torch.get_num_threads()
    try:  # one thread: a few seconds (the default threads took half a minute here); --threads sets the process's
        bench_output_layer.main(["--sizes", "10000", "--batch", "32", "--active", "256", "--active-per-row", "16",
                                 "--repeats", "2", "--dense-repeats", "1", "--min-repeats", "1", "--max-seconds", "1",
                                 "--no-memory", "--threads", "1", "--out", str(path)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(path.read_text())["results"][0]
    out = capsys.readouterr().out
    for mode in ("shared", "per_row"):
        tables = lsh_torch.LSHLinear(128, 10000, mode=mode, device="meta").tables
        assert result["settings"][mode] == {"bits": tables.bits, "tables": tables.num_tables, "probes": tables.probes}
        assert f"rebuild, {mode} (K={tables.bits}, L={tables.num_tables}, P={tables.probes}): full" in out
        assert result["full_rebuild_s"][mode] > 0
    assert result["settings"]["shared"] != result["settings"]["per_row"]
