"""Turn a :class:`~fair_core.train_config.TrainConfig` into models, scorer, target and prompts.

The one place that knows what ``model: toy`` or ``classifier: path.safetensors`` means, shared by
``fair train`` and ``fair demo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from fair_core.losses import PreservationLoss, load_preservation_loss
from fair_core.models import DiffusionParts, load_diffusion_parts
from fair_core.prompts import resolve_prompt_set
from fair_core.scoring import AttributeScorer
from fair_core.targets import DEFAULT_SCHEMA, Attribute, TargetDistribution
from fair_core.train_config import TrainConfig

TOY = "toy"


@dataclass
class TrainingSetup:
    parts: DiffusionParts
    scorer: AttributeScorer
    target: TargetDistribution
    train_prompts: list[str]
    val_prompts: list[str]
    preservation: PreservationLoss | None = None


def load_scorer(classifier: str, device: str = "cpu") -> AttributeScorer:
    """A face-detecting scorer over a torch classifier file (``.safetensors``; ONNX has no gradients)."""
    from fair_core.classifiers.model import AttributeClassifier
    from fair_core.faces import FaceAttributeScorer

    if not classifier.endswith(".safetensors"):
        raise ValueError(f"training needs a torch classifier (.safetensors) for gradients, got {classifier!r}")
    return FaceAttributeScorer(None, AttributeClassifier.load(classifier, device=device))


def parse_target(spec: object, schema: Mapping[str, Attribute]) -> TargetDistribution:
    if isinstance(spec, Mapping):
        return TargetDistribution.from_mapping(spec, schema)
    return TargetDistribution.load(str(spec), schema)


def load_training_setup(config: TrainConfig, device: str = "cpu") -> TrainingSetup:
    """Models, scorer, target and prompt lists for ``config``; nothing is downloaded."""
    if config.model == TOY:
        from fair_core.toyworld import load_toy_world

        world = load_toy_world(device=device)
        if config.classifier != TOY:
            raise ValueError("the toy world trains with its own classifier: set classifier: toy")
        train = [world.prompt(o) for o in world.train_occupations]
        val = [world.prompt(o) for o in world.heldout_occupations]
        preservation = load_preservation_loss(config.preservation, device)
        return TrainingSetup(world.parts(), world.train_scorer, parse_target(config.target, world.schema), train, val, preservation)
    parts = load_diffusion_parts(config.model, base=config.base)
    scorer = load_scorer(config.classifier, device)
    schema = {a.name: a for a in scorer.attributes} | {k: v for k, v in DEFAULT_SCHEMA.items() if k not in {a.name for a in scorer.attributes}}
    train = list(resolve_prompt_set(config.train_prompts, config.prompt_template).prompts)
    val = list(resolve_prompt_set(config.val_prompts, config.prompt_template).prompts)
    if "toy" in config.preservation:
        raise ValueError("preservation: 'toy' is the toy world's view; for Stable Diffusion use clip:DIR and/or dino:DIR")
    preservation = load_preservation_loss(config.preservation, device)
    return TrainingSetup(parts, scorer, parse_target(config.target, schema), train, val, preservation)
