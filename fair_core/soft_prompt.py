"""Soft prompt tokens (Shen et al. 2024, §3): K input embeddings per text encoder put right after BOS of the
conditional prompts. The module the trainer optimises, the sampler reads from :class:`~fair_core.models.DiffusionParts`
and an adaptor file's tokens become when applied; it depends on torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fair_core.models import DiffusionParts


class SoftPrompt(nn.Module):
    """K learnable input-token embeddings per text encoder, put right after BOS of conditional prompts.

    They replace token embeddings, so the text encoder adds its position embeddings to them as to any
    token (like a textual-inversion embedding). ``embeddings[i]`` is an fp32 ``nn.Parameter`` of shape
    ``(K, width_i)`` for ``parts.text_encoders[i]`` (SDXL: ``[0]`` is CLIP-L 768, ``[1]`` is CLIP-G 1280).
    """

    def __init__(self, embeddings: Sequence[torch.Tensor]):
        super().__init__()
        if not embeddings or any(e.ndim != 2 for e in embeddings):
            raise ValueError("a soft prompt needs one (num_tokens, width) tensor per text encoder")
        if len({e.shape[0] for e in embeddings}) != 1 or embeddings[0].shape[0] < 1:
            raise ValueError(f"soft prompt tensors disagree on the number of tokens: {[tuple(e.shape) for e in embeddings]}")
        self.embeddings = nn.ParameterList(nn.Parameter(e.detach().float().clone()) for e in embeddings)

    @property
    def num_tokens(self) -> int:
        return self.embeddings[0].shape[0]

    @classmethod
    def initialise(cls, parts: DiffusionParts, num_tokens: int = 5, seed: int | None = None) -> SoftPrompt:
        """Copies of the input embeddings of ``num_tokens`` distinct random non-special vocabulary tokens
        (the same token ids for every text encoder), drawn with ``seed`` (torch's global RNG if None)."""
        special = set(parts.tokenizer.all_special_ids)
        candidates = torch.tensor([i for i in range(parts.text_encoder.config.vocab_size) if i not in special])
        if not 1 <= num_tokens <= len(candidates):
            raise ValueError(f"num_tokens must be between 1 and {len(candidates)}, got {num_tokens}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = candidates[torch.randperm(len(candidates), generator=generator)[:num_tokens]]
        return cls([encoder.get_input_embeddings().weight[ids.to(encoder.device)] for encoder in parts.text_encoders])
