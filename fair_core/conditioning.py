"""Prompt encoding for classifier-free guidance, differentiable w.r.t. text-encoder LoRA and soft tokens.

The unconditional prompt is ``""`` encoded by the same (LoRA-modified) text encoder(s), as in the
paper's training and as ComfyUI does; soft tokens go into the conditional prompts only (Shen et al.
2024, pitfall 9). SDXL's "zeros for an empty negative prompt" shortcut is not used.

Two tokenisations (:data:`PROMPT_ENCODINGS`, docs/differences-from-paper.md):

* ``host``: every prompt and ``""`` padded to the tokenizer's 77 tokens, no attention mask, as
  diffusers, ComfyUI and A1111 encode them when an adaptor is used;
* ``paper``: the official code's (``tokenizer(prompts, padding=True)`` and ``""`` padded to the same
  length ``L``, both with their attention masks): a short context of ``L`` = the longest prompt's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CLIPTokenizer

from fair_core.models import DiffusionParts
from fair_core.soft_prompt import SoftPrompt

PROMPT_ENCODINGS = ("host", "paper")


@dataclass
class Conditioning:
    """Text conditioning of N prompts for a CFG sampler.

    Attributes:
        cond: ``(N, L, D)`` hidden states of the prompts (with soft tokens, if any). SD1.5/toy: the text
            encoder's last hidden state; SDXL: penultimate hidden states of both encoders concatenated
            (D = 768 + 1280).
        uncond: ``(N, L, D)`` the same for ``""`` (identical rows).
        added_cond: SDXL only, the UNet's ``added_cond_kwargs`` as name -> ``(cond value, uncond value)``:
            ``text_embeds`` ``(N, P)`` each (pooled, projected CLIP-G output) and ``time_ids`` ``(N, 6)`` each,
            (H, W, 0, 0, H, W) in pixels.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    added_cond: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.cond.shape[0]

    def __getitem__(self, index: slice | int | Sequence[int] | torch.Tensor) -> Conditioning:
        """The conditioning of a subset of the prompts (e.g. a micro-batch); an int keeps the batch dim."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        added = None
        if self.added_cond is not None:
            added = {name: (c[index], u[index]) for name, (c, u) in self.added_cond.items()}
        return Conditioning(self.cond[index], self.uncond[index], added)

    def cfg_unet_kwargs(self) -> dict[str, Any]:
        """UNet keyword arguments for the CFG batch ``torch.cat([x, x])``: rows ``[uncond; cond]``, 2N in all.

        Use as ``eps_uncond, eps_cond = unet(torch.cat([x, x]), t, **c.cfg_unet_kwargs()).sample.chunk(2)``.
        """
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.cat([self.uncond, self.cond])}
        if self.added_cond is not None:
            kwargs["added_cond_kwargs"] = {name: torch.cat([u, c]) for name, (c, u) in self.added_cond.items()}
        return kwargs


def encode_prompts(
    parts: DiffusionParts,
    prompts: Sequence[str],
    image_size: tuple[int, int] | None = None,
    *,
    with_soft_prompt: bool = True,
    encoding: str | None = None,
) -> Conditioning:
    """Encode ``prompts`` and ``""`` with ``parts``' text encoder(s); SDXL when ``parts.text_encoder_2`` is set.

    Args:
        prompts: N prompt strings; longer ones are truncated to the tokenizer's 77 tokens (less the soft tokens).
        image_size: SDXL only: (height, width) in pixels for ``time_ids``; default ``parts.image_size``.
        with_soft_prompt: put ``parts.soft_prompt`` (K tokens, if set) right after BOS of every conditional
            prompt; False encodes as the base model does.
        encoding: ``host`` (77 tokens, unmasked) or ``paper`` (``L`` tokens, padding masked); see the module
            docstring. Default: ``parts.prompt_encoding``. ``cond`` and ``uncond`` are ``(N, 77, D)`` or ``(N, L, D)``.

    Gradients flow to LoRA parameters of the text encoders and to ``parts.soft_prompt``; wrap the call in
    ``torch.no_grad()`` where none are needed.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    encoding = encoding or parts.prompt_encoding
    if encoding not in PROMPT_ENCODINGS:
        raise ValueError(f"prompt encoding must be one of {PROMPT_ENCODINGS}, got {encoding!r}")
    encoders, tokenizers = parts.text_encoders, parts.tokenizers
    prefixes = _soft_prompt_prefixes(parts.soft_prompt if with_soft_prompt else None, encoders)
    sdxl = parts.text_encoder_2 is not None
    n = len(prompts)

    cond, uncond = [], []
    for encoder, tokenizer, prefix in zip(encoders, tokenizers, prefixes):
        ids, mask = tokenize(tokenizer, list(prompts), 0 if prefix is None else prefix.shape[0],
                             None if encoding == "paper" else tokenizer.model_max_length)
        empty_ids, empty_mask = tokenize(tokenizer, [""], 0, ids.shape[1])
        if encoding == "host":
            mask = empty_mask = None
        cond.append(_encode(encoder, ids, mask, prefix, penultimate=sdxl))
        uncond.append(_encode(encoder, empty_ids, empty_mask, None, penultimate=sdxl))
    cond_states = torch.cat([hidden for hidden, _ in cond], dim=-1)
    uncond_states = torch.cat([hidden for hidden, _ in uncond], dim=-1).expand(n, -1, -1)
    if not sdxl:
        return Conditioning(cond_states, uncond_states)

    height, width = image_size if image_size is not None else parts.image_size
    time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=cond_states.dtype, device=cond_states.device)
    time_ids = time_ids.expand(n, -1)
    pooled = (cond[-1][1], uncond[-1][1].expand(n, -1))
    return Conditioning(cond_states, uncond_states, {"text_embeds": pooled, "time_ids": (time_ids, time_ids)})


def _soft_prompt_prefixes(soft_prompt: SoftPrompt | None, encoders: list[torch.nn.Module]) -> list[torch.Tensor | None]:
    if soft_prompt is None:
        return [None] * len(encoders)
    if len(soft_prompt.embeddings) != len(encoders):
        raise ValueError(f"the soft prompt has embeddings for {len(soft_prompt.embeddings)} text encoder(s); "
                         f"the model has {len(encoders)}")
    for i, (prefix, encoder) in enumerate(zip(soft_prompt.embeddings, encoders)):
        if prefix.shape[1] != encoder.config.hidden_size:
            raise ValueError(f"soft prompt width {prefix.shape[1]} does not match text encoder {i + 1} "
                             f"(width {encoder.config.hidden_size})")
    return list(soft_prompt.embeddings)


def _encode(
    encoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, prefix: torch.Tensor | None, penultimate: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (N, L, D), projected pooled output (N, P) or None) of one text encoder on token ids
    ``(N, L)`` with an optional attention mask ``(N, L)``."""
    with _prefix_injected(encoder, prefix) if prefix is not None else nullcontext():
        out = encoder(ids.to(encoder.device), attention_mask=None if mask is None else mask.to(encoder.device),
                      output_hidden_states=penultimate)
    hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
    return hidden, getattr(out, "text_embeds", None)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], num_prefix: int = 0,
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both ``(N, L)``, with ``num_prefix`` placeholder slots right after BOS.

    Args:
        length: ``L``, padding included (77 for the host encoding); ``None``: the longest prompt's tokens
            (``padding=True``, the paper's). Prompts are truncated to the tokenizer's 77 either way.

    The placeholders hold the BOS id with mask 1: any id works because their embeddings are replaced, and
    BOS keeps CLIP's pooling on the first EOS (or on the largest id, for configs with the legacy
    ``eos_token_id=2``).
    """
    limit = tokenizer.model_max_length
    if not 0 <= num_prefix <= limit - 2:
        raise ValueError(f"{num_prefix} soft tokens do not fit in {limit} tokens with BOS and EOS")
    padding = "longest" if length is None else "max_length"
    tokens = tokenizer(prompts, padding=padding, max_length=(limit if length is None else length) - num_prefix,
                       truncation=True, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    placeholders = torch.full((len(prompts), num_prefix), tokenizer.bos_token_id, dtype=ids.dtype)
    ids = torch.cat([ids[:, :1], placeholders, ids[:, 1:]], dim=1)
    mask = torch.cat([mask[:, :1], torch.ones_like(placeholders, dtype=mask.dtype), mask[:, 1:]], dim=1)
    return ids, mask


@contextmanager
def _prefix_injected(encoder: torch.nn.Module, prefix: torch.Tensor) -> Iterator[None]:
    """Replace the token embeddings at positions 1..K with ``prefix`` (K, D) during the block."""
    k = prefix.shape[0]

    def replace(module: torch.nn.Module, args: tuple, embeddings: torch.Tensor) -> torch.Tensor:
        rows = prefix.to(embeddings.dtype).expand(embeddings.shape[0], -1, -1)
        return torch.cat([embeddings[:, :1], rows, embeddings[:, 1 + k :]], dim=1)

    handle = encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
