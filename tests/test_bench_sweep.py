"""benchmarks/bench_sweep.py on a tiny stand-in for MNIST (nothing measured is checked)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_sweep  # noqa: E402


def test_out_keeps_the_stems_dots_and_creates_its_folder(tmp_path, monkeypatch, capsys):
    """--out stem.v2 printed "wrote stem.v2.json" but wrote stem.json (Path.with_suffix)."""
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(256, 20, generator=gen), torch.randint(0, 4, (256,), generator=gen),
            torch.randn(64, 20, generator=gen), torch.randint(0, 4, (64,), generator=gen), 4)
    monkeypatch.setattr(bench_sweep, "load_dataset", lambda name, quick: data)
    stem = tmp_path / "new" / "stem.v2"
    bench_sweep.main(["--only-ceiling", "--hidden", "64", "--rows", "16", "--dense-epochs", "1", "--out", str(stem)])
    assert sorted(os.listdir(stem.parent)) == ["stem.v2.json", "stem.v2.md"]
    assert f"wrote {stem}.json/.md" in capsys.readouterr().out
