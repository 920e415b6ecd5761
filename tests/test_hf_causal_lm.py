"""examples/hf_causal_lm.py's training clock, on a stand-in model and clock (nothing trained is checked)."""
import argparse
import os
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")  # the example imports lsh_torch.integrations.transformers
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import hf_causal_lm  # noqa: E402


class Model(torch.nn.Module):
    """What train_for calls: model(input_ids=, labels=).loss."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, labels):
        return SimpleNamespace(loss=self.w + 1.0)


def test_a_step_longer_than_the_marks_retires_every_mark_it_passes(monkeypatch):
    """A step longer than --seconds / --evals retired one mark per step, so the last point came steps
    late, and ms/step was --seconds / steps rather than the time measured."""
    ticks = iter(range(0, 1000, 5))  # readings 2.5 s apart (halves): every training step takes 2.5 s
    monkeypatch.setattr(hf_causal_lm, "time", SimpleNamespace(perf_counter=lambda: next(ticks) / 2))
    args = argparse.Namespace(seconds=3.0, evals=3, lr=1e-3, batch_size=2, context=4, seed=0, eval_tokens=8)
    tokens = torch.arange(100)
    points, seconds = hf_causal_lm.train_for(Model(), tokens, tokens, args, "stand-in")
    # Step 1 ends at 2.5 s, past the marks 1 and 2; step 2 at 5 s, past 3.
    assert [(mark, steps) for mark, steps, _ in points] == [(0.0, 0), (1.0, 1), (2.0, 1), (3.0, 2)]
    assert seconds == 5.0
