"""A training run's result as a fair-adaptor file: the trained LoRA and soft tokens of the model parts, with the
metadata that says what the run was (base, target, classifier, settings, bias before and after)."""

from __future__ import annotations

import json
from pathlib import Path

from fair_core.adaptor import FairMetadata, SoftTokens, text_encoders_by_family, write_adaptor
from fair_core.models import DiffusionParts
from fair_core.scoring import AttributeScorer
from fair_core.targets import TargetDistribution
from fair_core.train_config import TrainConfig


def run_metadata(config: TrainConfig, parts: DiffusionParts, target: TargetDistribution, scorer: AttributeScorer,
                 before: dict | None, after: dict | None) -> FairMetadata:
    """The adaptor's metadata: base, name, target, the classifier's name and sha256, every setting of ``config``
    (``fair.training_args``) and the validation summaries before and after training (``fair.eval``)."""
    identity = getattr(scorer, "identity", None) or {}
    return FairMetadata(
        base_model=parts.base, name=config.output_name, sd_model_name=config.model,
        attributes=tuple(target.attributes), target=target,
        classifier={"name": str(identity.get("name", type(scorer).__name__)), "sha256": str(identity.get("sha256", ""))},
        training_args=json.loads(config.to_json()), eval={"before": before, "after": after},
        resolution=config.resolution,
    )


def export_adaptor(path: str | Path, config: TrainConfig, parts: DiffusionParts, metadata: FairMetadata) -> Path:
    """Write the parts' trained LoRA (the families ``config.trainable`` names) and soft tokens (one token named
    ``config.output_name``) as a fair adaptor at ``path``, atomically; returns the path."""
    encoders = text_encoders_by_family(parts)
    tokens = []
    if parts.soft_prompt is not None:
        vectors = {f: e.detach().cpu().float() for f, e in zip(encoders, parts.soft_prompt.embeddings)}
        tokens = [SoftTokens(config.output_name, vectors)]
    write_adaptor(
        path, metadata=metadata,
        unet=parts.unet if "unet" in config.trainable else None,
        text_encoders=encoders if "text_encoder" in config.trainable else None,
        tokens=tokens,
    )
    return Path(path)
