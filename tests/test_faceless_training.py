"""Training on images where no face is found: such an iteration is skipped and counted (no optimiser or EMA step on
zero gradients), shown in the bar, and a run where most iterations have no face stops with a clear message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_worker import make_trainer  # noqa: E402


class NoFaces:
    """Wraps a scorer and reports that no image had a face (as a detector does on faceless 64 px SD images)."""

    def __init__(self, scorer):
        self.scorer, self.attributes = scorer, scorer.attributes

    def __call__(self, images):
        scores = self.scorer(images)
        scores.has_face = torch.zeros_like(scores.has_face)
        return scores


def test_faceless_iterations_are_skipped_and_counted(tmp_path, capsys):
    trainer = make_trainer(str(tmp_path), 3)
    trainer.scorer = NoFaces(trainer.scorer)
    snapshot = [p.detach().clone() for p in trainer.parameters]
    ema = [p.detach().clone() for p in trainer.ema.shadow_params]
    result = trainer.fit()
    assert result.state.faceless_steps == 3 and result.state.skipped_steps == 3
    assert all(torch.equal(a, p) for a, p in zip(snapshot, trainer.parameters)), "no step on zero gradients"
    assert all(torch.equal(a, p) for a, p in zip(ema, trainer.ema.shadow_params))
    assert "iteration 1: no image of ['a photo of" in capsys.readouterr().out


def test_a_run_that_is_mostly_faceless_stops_with_a_message(tmp_path):
    trainer = make_trainer(str(tmp_path), 8)
    trainer.scorer = NoFaces(trainer.scorer)
    with pytest.raises(ValueError, match="5 of 5 iterations had no face in any image"):
        trainer.fit()
