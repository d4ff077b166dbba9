"""fair_core.midblock: the mid-block bypass schedule, progress, branch mask and blend, against values worked out by
hand from reference/method-hakemi2025.md §3.4."""

from __future__ import annotations

import math

import pytest
import torch

from fair_core.midblock import (BypassSchedule, blend, branch_mask, progress_of_timestep, row_weights)


@pytest.mark.parametrize("schedule, progress, expected", [
    # linear, window [0, 0.3], λ_min 0.5: 0.5 at s=0, halfway (s=0.15) 0.75, 1 from s=0.3 on
    ("linear", 0.0, 0.5), ("linear", 0.15, 0.75), ("linear", 0.3, 1.0), ("linear", 0.9, 1.0),
    # cosine: 1 - 0.5 * 0.5 * (1 + cos(pi u)); u=0 -> 0.5, u=0.5 -> 0.75, u=1 -> 1
    ("cosine", 0.0, 0.5), ("cosine", 0.15, 0.75), ("cosine", 0.075, 1 - 0.25 * (1 + math.cos(math.pi / 4))),
    ("cosine", 0.3, 1.0),
    # step: λ_min inside [start, end), 1 after
    ("step", 0.0, 0.5), ("step", 0.299, 0.5), ("step", 0.3, 1.0),
    # reverse: 1 at start, falls to λ_min at end, stays there
    ("reverse", 0.0, 1.0), ("reverse", 0.15, 0.75), ("reverse", 0.3, 0.5), ("reverse", 1.0, 0.5),
])
def test_schedule_values_by_hand(schedule, progress, expected):
    assert BypassSchedule(0.5, 0.0, 0.3, schedule).weight(progress) == pytest.approx(expected, abs=1e-12)


def test_before_the_window_the_model_is_unchanged_and_progress_is_clamped():
    late = BypassSchedule(lambda_min=0.2, start=0.4, end=0.8, schedule="linear")
    assert late.weight(0.0) == 1.0 and late.weight(0.39) == 1.0
    assert late.weight(0.4) == pytest.approx(0.2) and late.weight(0.6) == pytest.approx(0.6)
    assert late.weight(-3.0) == 1.0 and late.weight(7.0) == 1.0
    assert BypassSchedule(0.0, 0.0, 1.0, "reverse").weight(7.0) == 0.0


def test_lambda_min_one_never_bypasses():
    for schedule in ("linear", "cosine", "step", "reverse"):
        rule = BypassSchedule(lambda_min=1.0, schedule=schedule)
        assert all(rule.weight(s / 20) == 1.0 for s in range(21))


@pytest.mark.parametrize("kwargs, words", [
    ({"schedule": "sine"}, "schedule must be one of"),
    ({"lambda_min": 1.5}, "lambda_min must be in [0, 1]"),
    ({"lambda_min": -0.1}, "lambda_min must be in [0, 1]"),
    ({"start": 0.5, "end": 0.5}, "start < end"),
    ({"start": 0.0, "end": 1.2}, "end <= 1"),
])
def test_bad_settings_are_refused_with_the_reason(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        BypassSchedule(**kwargs)


def test_progress_is_comfyuis_percent_on_the_timestep_axis():
    # t = 999 is pure noise (s = 0), t = 0 the end (s = 1); ComfyUI's percent_to_sigma(p) uses t = (1 - p) * 999
    assert progress_of_timestep(999.0).item() == 0.0
    assert progress_of_timestep(0.0).item() == 1.0
    assert progress_of_timestep(torch.tensor([699.3])).item() == pytest.approx(0.3, abs=1e-6)
    assert progress_of_timestep(1200.0).item() == 0.0 and progress_of_timestep(-5.0).item() == 1.0


def test_branch_mask_follows_comfyuis_cond_uncond_chunks():
    # a CFG batch of 2 images: [cond, cond, uncond, uncond] when cond_or_uncond = [0, 1]
    assert branch_mask([0, 1], 4, "both").tolist() == [True] * 4
    assert branch_mask([0, 1], 4, "cond").tolist() == [True, True, False, False]
    assert branch_mask([1, 0], 4, "cond").tolist() == [False, False, True, True]
    assert branch_mask([0, 1], 4, "uncond").tolist() == [False, False, True, True]
    assert branch_mask([], 3, "cond").tolist() == [True] * 3  # no CFG information: every row
    with pytest.raises(ValueError, match="does not split"):
        branch_mask([0, 1], 3, "cond")
    with pytest.raises(ValueError, match="apply_to must be one of"):
        branch_mask([0], 1, "neither")


def test_row_weights_combine_schedule_and_branch():
    rule = BypassSchedule(0.5, 0.0, 0.3, "linear")
    timesteps = torch.tensor([999.0, 999.0, 999.0, 999.0])  # first step: λ = λ_min on the rows it acts on
    assert row_weights(rule, timesteps, 4, [0, 1], "uncond").tolist() == [1.0, 1.0, 0.5, 0.5]
    assert row_weights(rule, torch.tensor([0.0, 999.0]), 2).tolist() == [1.0, 0.5]


def test_row_weights_tile_one_chunks_timesteps_over_the_cfg_batch():
    # ComfyUI gives the sigmas of one chunk (2 images) for a [cond, cond, uncond, uncond] batch of 4 rows
    rule = BypassSchedule(0.0, 0.0, 1.0, "linear")
    weights = row_weights(rule, torch.tensor([999.0, 0.0]), 4, [0, 1], "both")
    assert weights.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert row_weights(rule, torch.tensor([999.0, 0.0]), 4, [0, 1], "cond").tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="do not tile"):
        row_weights(rule, torch.tensor([999.0, 0.0]), 3)


def test_blend_interpolates_per_sample():
    generator = torch.Generator().manual_seed(0)
    h_in, h_mid = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    out = blend(h_in, h_mid, torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(out[0], h_mid[0])  # λ = 1: the model's own output, bit for bit
    assert torch.allclose(out[1], h_in[1])  # λ = 0: the block skipped
    assert torch.allclose(out[2], 0.75 * h_in[2] + 0.25 * h_mid[2])
    assert torch.allclose(blend(h_in, h_mid, 0.5), (h_in + h_mid) / 2)


def test_blend_match_std_rescales_bypassed_rows_only():
    generator = torch.Generator().manual_seed(1)
    h_in, h_mid = torch.randn(2, 8, 4, 4, generator=generator) * 0.1, torch.randn(2, 8, 4, 4, generator=generator) * 3
    out = blend(h_in, h_mid, torch.tensor([0.3, 1.0]), match_std=True)
    assert out[0].std().item() == pytest.approx(h_mid[0].std().item(), rel=1e-5)
    plain = blend(h_in, h_mid, torch.tensor([0.3, 1.0]))
    assert not torch.allclose(out[0], plain[0]) and torch.equal(out[1], h_mid[1])


def test_blend_refuses_mismatched_shapes_and_keeps_dtype():
    with pytest.raises(ValueError, match="differ in shape"):
        blend(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3), 0.5)
    half = blend(torch.zeros(1, 2, 2, 2, dtype=torch.float16), torch.ones(1, 2, 2, 2, dtype=torch.float16), 0.5)
    assert half.dtype == torch.float16 and torch.all(half == 0.5)
