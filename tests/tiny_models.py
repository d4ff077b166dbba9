"""Test fixtures: tiny Stable-Diffusion-shaped models built from configs with random weights.

They exercise the same diffusers/transformers classes, module names, LoRA targets and file formats as
SD1.5 and SDXL, at a size that runs in milliseconds on a CPU. Used by the tests and the benchmarks, never by
the library; nothing here downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fair_core.models import sd_dpm_solver

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_level_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte symbols (with and without ``</w>``) and a few merges.

    Same class and special tokens as the real CLIP tokenizer, 516 entries instead of 49408.
    """
    symbols = list(bytes_to_unicode().values())
    merges = [("p", "h"), ("o", "t"), ("o", "c"), ("t", "o</w>")]
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def tiny_vae() -> AutoencoderKL:
    """32 px image <-> 4x16x16 latent."""
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=32,
    )


@dataclass
class TinyPipelineParts:
    """The components of a tiny SD1.5- or SDXL-shaped model. ``text_encoder_2``/``tokenizer_2`` only for SDXL."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DPMSolverMultistepScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None


def tiny_sd15(seed: int = 0) -> TinyPipelineParts:
    """SD1.5-shaped: one CLIPTextModel (width 32), cross-attention UNet with SD1.5 block types."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    return TinyPipelineParts(unet, tiny_vae(), CLIPTextModel(tiny_text_config(tokenizer)), tokenizer, sd_dpm_solver())


def tiny_sdxl(seed: int = 0) -> TinyPipelineParts:
    """SDXL-shaped: CLIP-L-like and CLIP-G-like encoders (widths 32 and 32, concatenated to 64),
    ``text_time`` added conditioning, a transformer block of depth 2 as in SDXL's lower levels."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=64, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer))
    return TinyPipelineParts(
        unet, tiny_vae(), text_encoder, tokenizer, sd_dpm_solver(), text_encoder_2, byte_level_tokenizer()
    )
