"""A tiny training run for the trainer tests, launched as a script (also by ``torchrun``).

usage: python tests/trainer_worker.py OUTPUT_DIR ITERATIONS [--resume] [--nan-at K]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fair_core.models import DiffusionParts  # noqa: E402
from fair_core.scoring import WholeImageScorer  # noqa: E402
from fair_core.targets import DEFAULT_SCHEMA, TargetDistribution  # noqa: E402
from tiny_models import tiny_sd15  # noqa: E402
from fair_core.train_config import TrainConfig  # noqa: E402
from fair_core.trainer import FairTrainer  # noqa: E402


def tiny_classifier(outputs: int = 2) -> torch.nn.Module:
    """A fixed random conv net: 32 px RGB -> ``outputs`` logits (2: gender)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, outputs),
    )
    return net.requires_grad_(False)


def make_trainer(output_dir: str, iterations: int, attributes: tuple[str, ...] = ("gender",), **overrides) -> FairTrainer:
    """A trainer on tiny SD1.5 parts, gender=uniform target; the classifier scores ``attributes``.

    The linear warm-up/decay schedule makes the kill-and-resume test check the schedule's state too."""
    torch.set_num_threads(1)
    settings = dict(
        model="tiny", trainable=["text_encoder", "unet"], lora_rank=4, lora_alpha=4, images_per_prompt=4,
        micro_batch=1, steps_min=2, steps_max=3, iterations=iterations, checkpoint_every=1, validate_every=1000,
        learning_rate=1e-3, lr_schedule="linear", lr_warmup_iterations=1, ema_decay=0.5, output_dir=output_dir, log_with=None, device="cpu", seed=7,
    )
    config = TrainConfig(**settings | overrides)
    parts = DiffusionParts(**vars(tiny_sd15()), base="sd15")
    schema = [DEFAULT_SCHEMA[name] for name in attributes]
    scorer = WholeImageScorer(tiny_classifier(sum(len(a.classes) for a in schema)), schema)
    prompts = ["a photo of a doctor", "a photo of a nurse", "a photo of a pilot"]
    return FairTrainer(config, parts, scorer, TargetDistribution.parse("gender=uniform"), prompts)


if __name__ == "__main__":
    output, count = sys.argv[1], int(sys.argv[2])
    trainer = make_trainer(output, count)
    assert trainer.accelerator.num_processes == int(os.environ.get("WORLD_SIZE", 1)), "not the launched process count"
    trainer.fit(resume="--resume" in sys.argv)
