"""In-memory form of a fair adaptor: LoRA weights per module, soft tokens and metadata."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from fair_core.adaptor.metadata import FairMetadata
from fair_core.adaptor.naming import FAMILIES, family_of_prefix


@dataclass
class LoraWeights:
    """The LoRA of one linear layer: ``W + (alpha / rank) * up @ down``.

    Attributes:
        down: ``(rank, in_features)``, peft's ``lora_A``.
        up: ``(out_features, rank)``, peft's ``lora_B``.
        alpha: the kohya alpha; the update's scale is ``alpha / rank``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight update ``(alpha / rank) * up @ down`` in ``dtype``, shape ``(out_features, in_features)``."""
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


@dataclass
class SoftTokens:
    """A learned soft prompt: ``n_vectors`` input embeddings per text encoder.

    Attributes:
        name: the prompt word, e.g. ``"fairtoken"``.
        vectors: encoder family (``"te"`` for SD1.x, ``"te1"``/``"te2"`` for SDXL) to a tensor
            ``(n_vectors, encoder width)``.
    """

    name: str
    vectors: dict[str, torch.Tensor]

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


@dataclass
class FairAdaptor:
    """A fair adaptor as read from, or about to be written to, a ``.safetensors`` file.

    Attributes:
        metadata: what the adaptor says about itself (base model, target, classifier, ...).
        lora: kohya prefix (``lora_unet_...``, ``lora_te_...``) to the weights of that module.
        tokens: soft prompt tokens.
        header: the file's metadata exactly as stored (empty for adaptors built in memory).
    """

    metadata: FairMetadata
    lora: dict[str, LoraWeights] = field(default_factory=dict)
    tokens: list[SoftTokens] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.metadata.base_model

    @property
    def ranks(self) -> tuple[int, ...]:
        """The distinct LoRA ranks, ascending (one entry for a uniform-rank adaptor)."""
        return tuple(sorted({w.rank for w in self.lora.values()}))

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(sorted({w.alpha for w in self.lora.values()}))

    def family_counts(self) -> dict[str, int]:
        """Number of LoRA modules per family (``unet``, ``te``, ``te1``, ``te2``), families in canonical order."""
        counts = Counter(family_of_prefix(prefix) for prefix in self.lora)
        return {family: counts[family] for family in FAMILIES if counts[family]}

    def lora_of_family(self, family: str) -> dict[str, LoraWeights]:
        return {prefix: w for prefix, w in self.lora.items() if family_of_prefix(prefix) == family}

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (what ``fair adaptor inspect --json`` prints)."""
        metadata = self.metadata
        return {
            "name": metadata.name,
            "base_model": metadata.base_model,
            "ranks": list(self.ranks),
            "alphas": list(self.alphas),
            "modules": self.family_counts(),
            "tokens": [
                {"name": t.name, "vectors": t.num_vectors, "widths": {f: int(v.shape[1]) for f, v in t.vectors.items()}}
                for t in self.tokens
            ],
            "attributes": [a.to_json() for a in metadata.attributes],
            "target": metadata.target.to_json() if metadata.target is not None else None,
            "classifier": metadata.classifier,
            "metadata": dict(self.header),
        }
