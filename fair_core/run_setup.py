"""Turn a :class:`~fair_core.train_config.TrainConfig` into models, scorer, target and prompts, through
:mod:`fair_core.resolve`: everything a user typed is checked before the diffusion model loads."""

from __future__ import annotations

from dataclasses import dataclass

from fair_core.losses import PreservationLoss
from fair_core.models import DiffusionParts
from fair_core.resolve import (TOY, resolve_model_loader, resolve_preservation, resolve_prompt_lists, resolve_scorer,
                               resolve_target)
from fair_core.scoring import AttributeScorer
from fair_core.targets import TargetDistribution
from fair_core.train_config import TrainConfig


@dataclass
class TrainingSetup:
    parts: DiffusionParts
    scorer: AttributeScorer
    target: TargetDistribution
    train_prompts: list[str]
    val_prompts: list[str]
    preservation: PreservationLoss | None = None


def load_training_setup(config: TrainConfig, device: str = "cpu") -> TrainingSetup:
    """Models, scorer, target and prompt lists for ``config``; nothing is downloaded. The classifier, target,
    prompts and preservation entries are resolved first, the diffusion model last."""
    if (config.model == TOY) != (config.classifier == TOY):
        raise ValueError("the toy world trains with its own classifier: set both model: toy and classifier: toy")
    scorer = resolve_scorer(config.classifier, device, training=True).scorer
    target = resolve_target(config.target, scorer.attributes, "target")
    train, val = resolve_prompt_lists(config.model, config.train_prompts, config.val_prompts, config.prompt_template)
    preservation = resolve_preservation(config.preservation, config.model, device)
    parts = resolve_model_loader(config.model, config.base, device if config.model == TOY else "cpu")()
    return TrainingSetup(parts, scorer, target, train, val, preservation)
