"""The offline toy-world loop end to end: `fair train` on the example config, and a reduced `fair demo`."""

from __future__ import annotations

import json

from fair_core.adaptor import read_adaptor
from fair_core.toyworld.demo import DemoSettings, run_demo
from train_cli.main import main


def test_train_cli_runs_the_toy_smoke_config(tmp_path):
    code = main(["train", "--config", "examples/toy_smoke.yaml", "--set", f"output_dir={tmp_path}",
                 "--set", "iterations=2", "--set", "checkpoint_every=1"])
    assert code == 0
    adaptor = read_adaptor(tmp_path / "fair_adaptor.safetensors", expected_base="toy")
    assert adaptor.family_counts().get("te", 0) > 0
    assert (tmp_path / "checkpoints" / "iter_0000002").is_dir()


def test_reduced_demo_lowers_colour_bias(tmp_path):
    settings = DemoSettings(eval_images_per_prompt=24, output_dir=str(tmp_path))
    figures = run_demo(settings, log=lambda *_: None)
    before = figures["before"]["overall"]["groups"]["colour"]["bias"]["estimate"]
    after = figures["after"]["overall"]["groups"]["colour"]["bias"]["estimate"]
    change = figures["change"]["overall"]["groups"]["colour"]["bias"]
    assert before >= 0.5, "the pretrained toy model should be strongly biased"
    assert after < before - 0.05
    assert change["high"] < 0, "the paired interval of the change must exclude zero"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["attributes"]["colour"]["targeted"] and (tmp_path / "chart_colour.png").is_file()
    read_adaptor(tmp_path / "toy_fair_adaptor.safetensors", expected_base="toy")

    # `fair eval` of the base model and of the demo's adaptor gives the demo's figures (same seeds).
    code = main(["eval", "--model", "toy", "--adaptor", str(tmp_path / "toy_fair_adaptor.safetensors"),
                 "--prompts", str(tmp_path / "heldout_prompts.txt"), "--classifier", "toy",
                 "--images-per-prompt", str(settings.eval_images_per_prompt), "--steps", str(settings.eval_steps), "--guidance", str(settings.guidance_scale), "--batch-size", str(settings.eval_batch_size),
                 "--seed", str(settings.seed), "--target", settings.target, "--out", str(tmp_path / "eval")])
    assert code == 0
    audit = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert audit["summaries"]["base"] == figures["before"]
    assert audit["summaries"]["toy_fair_adaptor"] == figures["after"]
    assert audit["changes"]["toy_fair_adaptor"] == figures["change"]


def test_demo_evaluates_an_adaptor_of_soft_tokens_with_its_tokens(tmp_path):
    """A tokens-only adaptor changes nothing unless the after-images are generated with its soft prompt."""
    settings = DemoSettings(trainable=("tokens",), iterations=2, learning_rate=0.1, images_per_prompt=4,
                            eval_images_per_prompt=4, output_dir=str(tmp_path))
    figures = run_demo(settings, log=lambda *_: None)
    assert read_adaptor(tmp_path / "toy_fair_adaptor.safetensors", expected_base="toy").tokens
    assert figures["content_change"]["background"] > 0, "the after-images must differ from the before-images"


def test_toy_training_setup_puts_models_and_scorer_on_the_given_device():
    """`fair train` hands the toy world the trainer's device: the scorer must sit where the images are made."""
    from fair_core.run_setup import load_training_setup
    from fair_core.train_config import TrainConfig

    setup = load_training_setup(TrainConfig(model="toy", classifier="toy", target="colour=uniform"), device="meta")
    assert next(setup.parts.unet.parameters()).device.type == "meta"
    assert next(setup.scorer.classifier.parameters()).device.type == "meta"
