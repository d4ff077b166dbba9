"""What a fair adaptor trains (Shen et al. 2024, §3): LoRA on the text encoder(s) and/or the UNet (soft prompt
tokens: :mod:`fair_core.soft_prompt`).

LoRA layers are injected in place with peft, so module paths stay those of the base model
(``encoder.layers.0.self_attn.q_proj`` in a transformers-5 ``CLIPTextModel``,
``text_model.encoder.layers.0.self_attn.q_proj`` in ``CLIPTextModelWithProjection``,
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` in the UNet); the LoRA weights are
``<path>.lora_A.default.weight`` (down, ``(rank, in)``) and ``<path>.lora_B.default.weight`` (up, ``(out, rank)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from torch import nn

ADAPTER_NAME = "default"
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_text_encoder_lora(
    text_encoder: nn.Module, rank: int = 50, alpha: float = 50, target_modules: Sequence[str] = TEXT_ENCODER_TARGETS
) -> list[nn.Parameter]:
    """Freeze ``text_encoder`` and add LoRA to its attention and MLP projections (every layer).

    Returns the LoRA parameters (fp32), the only ones left trainable. Call once per text encoder.
    """
    return _add_lora(text_encoder, rank, alpha, target_modules)


def add_unet_lora(
    unet: nn.Module, rank: int = 50, alpha: float = 50, target_modules: Sequence[str] = UNET_TARGETS
) -> list[nn.Parameter]:
    """Freeze ``unet`` and add LoRA to q/k/v/out of every self- and cross-attention.

    Returns the LoRA parameters (fp32), the only ones left trainable.
    """
    return _add_lora(unet, rank, alpha, target_modules)


def _add_lora(model: nn.Module, rank: int, alpha: float, target_modules: Sequence[str]) -> list[nn.Parameter]:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    model.requires_grad_(False)
    # "gaussian": down ~ N(0, 1/rank^2), up = 0, the init of the paper's diffusers-0.19 LoRA layers.
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights="gaussian")
    # peft's own injection, not transformers' add_adapter: transformers >= 5.24 refuses every peft release
    # before 0.22 there, and host applications pin their own transformers/peft pair.
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    cast_adapter_dtype(model, ADAPTER_NAME)  # fp32 LoRA on an fp16/bf16 model
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def adapters_disabled(*models: nn.Module) -> Iterator[None]:
    """Run ``models`` as the original base model: LoRA layers bypassed inside the block, restored after."""
    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
