"""The toy world's models: a word-level CLIP tokenizer and text encoder, a pixel-space UNet, a classifier.

They are the same diffusers/transformers classes as Stable Diffusion's, at toy size:

* text: :class:`~transformers.CLIPTokenizer` whose vocabulary is a BPE learned (with the ``tokenizers``
  library) on the prompt words, so every prompt word is one token; :class:`~transformers.CLIPTextModel`
  of width 32; prompts are padded to :data:`MAX_TOKENS` and the UNet attends to ``last_hidden_state``.
* denoiser: :class:`~diffusers.UNet2DConditionModel` on ``(N, 3, 16, 16)`` pixels (no VAE), epsilon
  prediction under SD's scaled-linear DDPM schedule (beta 0.00085..0.012, 1000 steps), so SD's sampler,
  DPM-Solver++ 2M with CFG 7.5 and about 20 steps, samples it.
* :class:`ToyClassifier`: a small CNN from images to concatenated colour and shape logits.
"""

from __future__ import annotations

import json
import string
from typing import Any, Sequence

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fair_core.models import CLIP_BOS as BOS
from fair_core.models import CLIP_EOS as EOS
from fair_core.models import sd_dpm_solver
from fair_core.toyworld.world import IMAGE_SIZE, OCCUPATIONS, PROMPT_TEMPLATE, TOY_SCHEMA

MAX_TOKENS = 16  # "a photo of a <occupation>" is 7 tokens with BOS/EOS; room for a few soft tokens
TEXT_WIDTH = 32
NUM_LOGITS = sum(len(a.classes) for a in TOY_SCHEMA.values())


def prompt_words() -> list[str]:
    """Every word of every toy prompt, in first-seen order."""
    classes = [name for attribute in TOY_SCHEMA.values() for name in attribute.classes]
    words = PROMPT_TEMPLATE.replace("{occupation}", "").split() + classes + list(OCCUPATIONS)
    return list(dict.fromkeys(words))


def learn_vocabulary(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary and merge list over ``words`` in which each word is a single ``word</w>`` token.

    The alphabet is a-z (with and without ``</w>`` where seen), so unseen lowercase words still tokenize.
    """
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, min_frequency=1, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=list(string.ascii_lowercase), end_of_word_suffix="</w>",
    )
    bpe.train_from_iterator([" ".join(words)], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def make_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> CLIPTokenizer:
    """The CLIP tokenizer over a toy vocabulary (same class and special tokens as SD's)."""
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges], model_max_length=MAX_TOKENS)


def text_encoder_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder for ``tokenizer``'s vocabulary."""
    vocab = tokenizer.get_vocab()
    return CLIPTextModel(text_encoder_config(len(vocab), vocab[BOS], vocab[EOS]))


def unet_config(layers_per_block: int = 1) -> dict[str, Any]:
    """Constructor arguments of the pixel-space UNet: 16 -> 8 -> 4 px levels, cross-attention at 8 and 4 px
    and in the mid block. ``layers_per_block`` is the depth knob of the depth sweep."""
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}")
    return dict(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=8,
    )


def build_unet(layers_per_block: int = 1) -> UNet2DConditionModel:
    """A randomly initialised pixel-space denoiser (:func:`unet_config`)."""
    return UNet2DConditionModel(**unet_config(layers_per_block))


def training_scheduler() -> DDPMScheduler:
    """SD's training noise schedule: scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1,
    )


def sampling_scheduler() -> DPMSolverMultistepScheduler:
    """A fresh DPM-Solver++ 2M over the training schedule (the sampler the fair trainer uses)."""
    return sd_dpm_solver()


class ToyClassifier(torch.nn.Module):
    """Images ``(N, 3, H, W)`` in ``[-1, 1]`` -> logits ``(N, 5)``: colour (2) then shape (3), TOY_SCHEMA order.

    Three conv stages (full, 1/2, 1/4 resolution) and global average + max pooling, so the prediction
    does not depend on where the figure is. Differentiable w.r.t. the input pixels.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width

        def stage(c_in: int, c_out: int, stride: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), torch.nn.SiLU(),
                    torch.nn.Conv2d(c_out, c_out, 3, padding=1), torch.nn.SiLU()]

        self.features = torch.nn.Sequential(
            *stage(3, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 2 * width, 2)
        )
        self.head = torch.nn.Sequential(
            torch.nn.Linear(4 * width, 2 * width), torch.nn.SiLU(), torch.nn.Linear(2 * width, NUM_LOGITS)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ToyClassifier expects images (N, 3, H, W), got {tuple(images.shape)}")
        features = self.features(images)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt embeddings ``(N, MAX_TOKENS, TEXT_WIDTH)``: ``last_hidden_state`` of max-length-padded tokens."""
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(text_encoder.device)).last_hidden_state


def generate(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int = 20,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
) -> torch.Tensor:
    """Sample images ``(N, 3, 16, 16)`` in ``[-1, 1]`` with DPM-Solver++ 2M and classifier-free guidance, from
    bare toy modules (:func:`fair_core.sampling.generate_images`, the trainer's sampler).

    Image ``i`` uses prompt ``prompts[i]`` and noise seed ``seeds[i]``; ``guidance_scale`` 1 samples the
    model's own conditional distribution (no unconditional pass).
    """
    from fair_core.models import DiffusionParts
    from fair_core.sampling import generate_images

    parts = DiffusionParts(unet, None, text_encoder, tokenizer, sampling_scheduler(), base="toy")
    return generate_images(parts, prompts, seeds, num_steps, guidance_scale, batch_size=batch_size, device=unet.device)
