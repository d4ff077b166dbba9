"""The toy world: generator, content estimates, tokenizer, weight files, shipped models, depth sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fair_core.toyworld import (
    HELDOUT_OCCUPATIONS,
    OCCUPATION_SKEWS,
    OCCUPATIONS,
    TOY_SCHEMA,
    TRAIN_OCCUPATIONS,
    ToyClassifier,
    content_change,
    draw_figures,
    estimate_content,
    learn_vocabulary,
    load_toy_world,
    make_tokenizer,
    occupation_distribution,
    prompt,
    prompt_words,
    sample_world,
)
from fair_core.toyworld.checkpoint import load_classifier, load_unet, save_classifier
from fair_core.toyworld.depth_sweep import _minority_share_ratio, _paired_flips, format_depth_sweep, run_depth_sweep
from fair_core.toyworld.pretrain import draw_batch, named_world, predict

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    return load_toy_world()


def test_occupations_are_skewed_and_split():
    assert len(OCCUPATIONS) >= 12 and len(HELDOUT_OCCUPATIONS) >= 4
    assert not set(TRAIN_OCCUPATIONS) & set(HELDOUT_OCCUPATIONS)
    red = {o: OCCUPATION_SKEWS[o][0][0] for o in OCCUPATIONS}
    assert sum(p >= 0.9 for p in red.values()) >= 2 and sum(p <= 0.1 for p in red.values()) >= 2
    assert all(max(p, 1 - p) >= 0.8 for o, p in red.items() if o in HELDOUT_OCCUPATIONS)
    assert np.allclose(occupation_distribution("nurse").marginal("colour"), [0.08, 0.92])


def test_sample_world_is_deterministic_and_follows_the_skew():
    a, b = sample_world(["pilot", "dancer"], 400, seed=3), sample_world(["pilot", "dancer"], 400, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.params, b.params)
    assert not torch.equal(a.images, sample_world(["pilot", "dancer"], 400, seed=4).images)
    assert a.images.shape == (800, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    assert a.occupations[:400] == ["pilot"] * 400 and a.prompts[-1] == "a photo of a dancer"
    red_share = [(a.labels[i * 400 : (i + 1) * 400, 0] == 0).float().mean().item() for i in range(2)]
    # Binomial standard error at n=400 is about 0.012: allow 4 of them.
    assert abs(red_share[0] - 0.95) < 0.05 and abs(red_share[1] - 0.06) < 0.05


def test_balanced_attributes_are_uniform_and_the_rest_keeps_the_skew():
    data = sample_world(["pilot"], 2000, seed=5, balanced=["colour"])
    shares = [np.bincount(data.labels[:, i].numpy(), minlength=k) / 2000 for i, k in ((0, 2), (1, 3))]
    # Binomial standard error at n=2000 is at most 0.011: allow 4 of them.
    assert np.allclose(shares[0], [0.5, 0.5], atol=0.045)
    assert np.allclose(shares[1], OCCUPATION_SKEWS["pilot"][1], atol=0.045)
    both = sample_world(["pilot"], 2000, seed=5, balanced=["colour", "shape"])
    assert np.allclose(np.bincount(both.labels[:, 1].numpy(), minlength=3) / 2000, [1 / 3] * 3, atol=0.045)
    with pytest.raises(ValueError, match="balanced"):
        sample_world(["pilot"], 2, seed=0, balanced="colour")


def test_captions_that_name_a_colour_show_it_balanced_on_the_occupations_shapes():
    data = sample_world(["pilot"], 500, seed=0)
    images, captions = draw_batch(data, 4000, torch.Generator().manual_seed(0), named_world(["pilot"], 500, seed=0))
    colour = images[:, 2, 8, 8] > images[:, 0, 8, 8]  # centre pixel bluer than red: a blue figure
    named = np.array([c in ("a photo of a red pilot", "a photo of a blue pilot") for c in captions])
    bare = np.array([c == "a photo of a pilot" for c in captions])
    # 0.9 kept x 0.25 colour x 0.75 no shape = 16.9% name only the colour; 0.9 x 0.75 x 0.75 = 50.6% nothing
    assert 600 < named.sum() < 760 and 1900 < bare.sum() < 2150
    assert abs(colour.numpy()[named].mean() - 0.5) < 0.06 and colour.numpy()[bare].mean() < 0.1
    says_blue = np.array(["blue" in c for c in captions])
    assert np.array_equal(colour.numpy()[says_blue], np.ones(says_blue.sum(), dtype=bool))
    _, old_style = draw_batch(data, 4000, torch.Generator().manual_seed(0))  # without named_data: skewed
    assert sum("blue pilot" in c for c in old_style) < 0.1 * sum(("red pilot" in c) for c in old_style)


def test_content_is_independent_of_occupation_and_labels():
    data = sample_world(["pilot", "dancer"], 2000, seed=0)
    pilot, dancer = data.params[:2000], data.params[2000:]
    # Uniform parameters: SE of a mean difference is about range * 0.29 * sqrt(2/2000); 4 SE allowed.
    ranges = torch.tensor([3.0, 2.0, 2.0, 1.2])
    assert torch.all((pilot.mean(0) - dancer.mean(0)).abs() < 4 * ranges * 0.29 * (2 / 2000) ** 0.5)
    red, blue = data.params[data.labels[:, 0] == 0], data.params[data.labels[:, 0] == 1]
    assert torch.all((red.mean(0) - blue.mean(0)).abs() < 4 * ranges * 0.29 * (1 / 1900 + 1 / 2100) ** 0.5)


def test_attributes_change_the_pixels_as_intended():
    params = torch.tensor([[8.0, 8.0, 6.0, 0.0]]).repeat(3, 1)
    red_round, blue_round, red_triangle = draw_figures(torch.tensor([[0, 0], [1, 0], [0, 2]]), params)
    centre = (slice(None), slice(7, 9), slice(7, 9))
    assert red_round[centre][0].mean() > 0.8 and red_round[centre][2].mean() < -0.6
    assert blue_round[centre][2].mean() > 0.8 and blue_round[centre][0].mean() < -0.6
    assert red_round[:, 0, 0].abs().max() < 1e-6  # corner is background (grey 0)
    # Same figure, other shape: different pixels, same area and centroid.
    assert (red_round - red_triangle).abs().max() > 0.5
    assert content_change(red_round[None], red_triangle[None]).max() < 0.35
    # The triangle's apex row is inside only near the middle column; the disc is wide there.
    disc_coverage = (red_round[1] < -0.3).float()
    triangle_coverage = (red_triangle[1] < -0.3).float()
    assert triangle_coverage[4].sum() < disc_coverage[5].sum()


def test_estimate_content_recovers_the_drawing_parameters():
    data = sample_world(OCCUPATIONS, 20, seed=1)
    error = (estimate_content(data.images) - data.params).abs()
    assert error[:, :3].max() < 0.4 and error[:, 3].max() < 1e-5
    assert content_change(data.images, data.images).abs().max() == 0
    shifted = torch.roll(data.images[:4], shifts=1, dims=-1)  # one pixel right; borders are background
    assert torch.allclose(content_change(data.images[:4], shifted)[:, 0], torch.ones(4), atol=0.05)
    with pytest.raises(ValueError, match="paired images"):
        content_change(data.images[:2], data.images[:3])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown toy occupations"):
        sample_world(["astronaut"], 2, seed=0)
    with pytest.raises(ValueError, match="non-empty list"):
        sample_world("pilot", 2, seed=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ToyClassifier()(torch.zeros(2, 16, 16))


def test_every_prompt_word_is_one_token():
    tokenizer = make_tokenizer(*learn_vocabulary(prompt_words()))
    for word in prompt_words():
        assert tokenizer.tokenize(word) == [word + "</w>"]
    ids = tokenizer(prompt("firefighter"), padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 16 and ids[0] == tokenizer.bos_token_id and ids[6] == tokenizer.eos_token_id


def test_weight_files_round_trip_and_reject_the_wrong_kind(tmp_path):
    torch.manual_seed(0)
    classifier = ToyClassifier(width=8)
    save_classifier(tmp_path / "c.safetensors", classifier)
    loaded, attributes = load_classifier(tmp_path / "c.safetensors")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded(images), classifier(images)) and attributes == tuple(TOY_SCHEMA.values())
    with pytest.raises(ValueError, match="not a toy-world unet file"):
        load_unet(tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_classifier(tmp_path / "missing.safetensors")


def test_shipped_classifiers_read_world_images(world):
    data = sample_world(OCCUPATIONS, 30, seed=12345)
    for scorer in (world.train_scorer, world.eval_scorer):
        accuracy = (predict(scorer.classifier, data.images) == data.labels).float().mean(0)
        assert accuracy[0] >= 0.99 and accuracy[1] >= 0.97, accuracy
        scores = scorer(data.images[:4])
        assert [l.shape for l in scores.logits] == [(4, 2), (4, 3)] and scores.has_face.all()


def _red_minus_blue(images: torch.Tensor) -> torch.Tensor:
    """Classifier-free colour reading: mean R - B over the pixels that differ most from the border."""
    content = estimate_content(images)
    background = images[..., 0, :].median(dim=-1).values  # (N, 3), top row is background
    difference = (images - background[..., None, None]).abs().amax(dim=1)
    mask = difference > 0.5 * difference.flatten(1).amax(1)[:, None, None]
    red_minus_blue = (images[:, 0] - images[:, 2]) * mask
    assert torch.all(content[:, 2] > 2)  # a figure was drawn
    return red_minus_blue.sum(dim=(1, 2)) / mask.sum(dim=(1, 2))


def test_shipped_model_reproduces_the_skew(world):
    prompts = [world.prompt("firefighter")] * 6 + [world.prompt("librarian")] * 6  # 94% red / 93% blue
    images = world.generate(prompts, seeds=list(range(12)), num_steps=20, guidance_scale=7.5)
    assert images.shape == (12, 3, 16, 16) and images.abs().max() <= 1
    colour = predict(world.eval_scorer.classifier, images)[:, 0]
    assert (colour[:6] == 0).float().mean() >= 0.7 and (colour[6:] == 1).float().mean() >= 0.7
    # The classifier agrees with a pixel rule on the generated figures.
    rule = (_red_minus_blue(images) < 0).long()
    assert (rule == colour).float().mean() >= 0.9


def test_shipped_model_composes_colour_words_with_the_occupation(world):
    """"a photo of a blue firefighter" is blue and keeps the firefighter's shape: the colour word is not a
    stand-in for the (mostly round) blue occupations, so a fair adaptor can change colour alone."""
    seeds = list(range(8))
    for occupation, other_colour in (("firefighter", "blue"), ("librarian", "red")):
        bare = predict(world.eval_scorer.classifier, world.generate([world.prompt(occupation)] * 8, seeds))
        named = predict(world.eval_scorer.classifier, world.generate([prompt(occupation, [other_colour])] * 8, seeds))
        assert (named[:, 0] != bare[:, 0]).float().mean() >= 0.9
        assert (named[:, 1] == bare[:, 1]).float().mean() >= 0.9


def test_guidance_one_shortcut_equals_the_guided_formula(world):
    prompts, seeds = [world.prompt("pilot"), world.prompt("nurse")], [3, 4]
    shortcut = world.generate(prompts, seeds, num_steps=10, guidance_scale=1.0)
    full = world.generate(prompts, seeds, num_steps=10, guidance_scale=1.0 + 1e-6)  # takes the two-pass path
    assert torch.allclose(shortcut, full, atol=1e-4)


def test_ratio_and_flip_statistics_by_hand():
    flags = np.array([True] * 10 + [False] * 30)
    result = _minority_share_ratio([flags], reference=0.5)
    assert result["generated_share"] == 0.25 and result["amplification_ratio"] == 0.5
    assert result["ar_ci_low"] < 0.5 < result["ar_ci_high"] < 1
    shallow = np.array([True, True, True, True, False, False])
    deep = np.array([False, False, False, True, False, True])
    flips = _paired_flips(shallow, deep)
    assert flips["flip_minority_to_majority"] == 0.75 and flips["flip_majority_to_minority"] == 0.5
    assert flips["mcnemar_p"] == pytest.approx(0.625)  # two-sided binomial, 3 vs 1 discordant


def test_depth_sweep_runs_end_to_end(tmp_path):
    result = run_depth_sweep(
        depths=(2, 1), steps=2, images_per_prompt=4, seed=0, out_dir=tmp_path, occupations=["lawyer"],
        train_images_per_occupation=40, batch_size=4, num_inference_steps=2,
    )
    assert list(result["depths"]) == ["1", "2"] and "flips_vs_shallowest" in result["depths"]["2"]
    pooled = result["depths"]["1"]["pooled"]
    assert pooled["amplification_ratio"] == pytest.approx(pooled["generated_share"] / pooled["training_share"])
    assert json.loads((tmp_path / "depth_sweep.json").read_text()) == result
    table = format_depth_sweep(result).splitlines()
    assert len(table) == 3 and "reference" in table[1] and "p=" in table[2]
    with pytest.raises(ValueError, match="at least two distinct"):
        run_depth_sweep(depths=(1,), steps=1)


def test_depth_sweep_command_passes_its_settings_through(tmp_path, capsys):
    from train_cli.main import main

    code = main(["demo", "depth-sweep", "--depths", "2,1", "--train-steps", "2", "--sweep-images", "3", "--out", str(tmp_path)])
    assert code == 0
    settings = json.loads((tmp_path / "depth_sweep.json").read_text())["settings"]
    assert (settings["depths"], settings["steps"], settings["images_per_prompt"]) == ([1, 2], 2, 3)
    assert "reference" in capsys.readouterr().out
    assert main(["demo", "depth-sweep", "--depths", "1,deep"]) == 2


def test_colour_blind_preservation_frees_colour_and_holds_content():
    from fair_core.toyworld.preservation import ColourBlindPreservationLoss
    from fair_core.toyworld.world import draw_figures

    loss = ColourBlindPreservationLoss()
    params = torch.tensor([[8.0, 8.5, 6.0, 0.1]] * 2)
    red, blue = draw_figures(torch.tensor([[0, 1], [1, 1]]), params)
    assert loss(blue[None], red[None]).item() == pytest.approx(0.0, abs=1e-6)
    shifted = draw_figures(torch.tensor([[0, 1]]), params[:1] + torch.tensor([1.0, 0, 0, 0]))
    round_figure = draw_figures(torch.tensor([[0, 0]]), params[:1])
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert 1.0 < loss(shifted, red[None]).item() < loss(noise, red[None]).item()
    assert loss(round_figure, red[None]).item() > 0.5
    assert loss(noise, red[None], weights=torch.tensor([0.2])).item() == pytest.approx(0.2 * loss(noise, red[None]).item())
