"""Seeded noise, latent decoding and no-grad image generation shared by training, validation and eval."""

from __future__ import annotations

from typing import Sequence

import torch

from fair_core.conditioning import Conditioning, encode_prompts
from fair_core.dft import sample
from fair_core.models import DiffusionParts


def latent_shape(parts: DiffusionParts, resolution: int | None = None) -> tuple[int, int, int]:
    """``(C, h, w)`` of the UNet input for images of ``resolution`` pixels (default: the UNet's native size)."""
    scale = 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae is not None else 1
    size = parts.unet.config.sample_size if resolution is None else resolution // scale
    if resolution is not None and resolution % scale:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {scale}")
    return (parts.unet.config.in_channels, size, size)


def seeded_noise(seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise ``(len(seeds), *shape)``, one CPU generator per seed.

    Drawing on the CPU makes image ``j`` identical on every device, process and batch split.
    """
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def decode_latents(parts: DiffusionParts, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(N, C, h, w)`` -> images ``(N, 3, H, W)`` in ``[-1, 1]``; differentiable.

    Pixel-space models (``vae is None``, the toy world) are their own decoding.
    """
    if parts.vae is None:
        return latents.clamp(-1, 1)
    vae = parts.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return images.float().clamp(-1, 1)


@torch.no_grad()
def generate_images(
    parts: DiffusionParts,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in ``[-1, 1]`` (on CPU, float32) for ``prompts[i]`` with noise seed ``seeds[i]``,
    with whatever adaptor ``parts`` carry (LoRA layers and ``parts.soft_prompt``)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    shape = latent_shape(parts, resolution)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        conditioning: Conditioning = encode_prompts(parts, batch_prompts)
        noise = seeded_noise(seeds[start : start + batch_size], shape, device)
        latents = sample(
            parts.unet, parts.scheduler, noise, conditioning.cond, conditioning.uncond, num_steps, guidance_scale,
            added_cond=conditioning.added_cond, autocast_dtype=autocast_dtype,
        )
        images.append(decode_latents(parts, latents).float().cpu())
    return torch.cat(images)
