"""Write a full-size SD1.5 single-file checkpoint with random weights, using ComfyUI's own classes.

Runs inside the ComfyUI test venv (``python make_checkpoint.py OUT.safetensors``), never in the project venv:
it imports ``comfy``. No hub, no download: the UNet, CLIP-L and VAE modules are built on the meta device from
their architecture (the published SD1.5 sizes, in ComfyUI's configuration terms), ComfyUI turns their state
dicts into its single-file key layout (``BaseModel.state_dict_for_saving``), and every floating tensor is filled
with seeded random values (fp16 on disk, ~2.1 GB): norm weights 1, biases 0, other weights N(0, 1/fan_in).
The result loads through ``CheckpointLoaderSimple`` like a real SD1.5 file; its images are noise.
"""

from __future__ import annotations

import math
import sys

import torch

# SD1.5's UNet in the terms of ComfyUI's UNetModel (what its model detection reads from a real checkpoint).
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "use_temporal_attention": False, "use_temporal_resblock": False,
}
# SD1.x's KL autoencoder (8x downscale, 4 latent channels).
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def random_value(key: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A seeded fp16 value for one checkpoint tensor (shape of ``like``): 1 for norm weights, 0 for biases,
    N(0, 1/fan_in) otherwise; CLIP's logit scale 4.6055 and its text projection the identity, as ComfyUI
    initialises them."""
    if key.endswith("logit_scale"):
        return torch.tensor(4.6055, dtype=torch.float16)
    if key.endswith("text_projection.weight"):
        return torch.eye(like.shape[0], dtype=torch.float16)
    if key.endswith(".bias"):
        return torch.zeros(like.shape, dtype=torch.float16)
    if like.ndim == 1:
        return torch.ones(like.shape, dtype=torch.float16)
    fan_in = math.prod(like.shape[1:])
    return (torch.randn(like.shape, generator=generator) / math.sqrt(fan_in)).to(torch.float16)


def build_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The single-file SD1.5 state dict (ComfyUI's key layout) with random values."""
    from comfy import model_detection
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = model_detection.model_config_from_unet_config(dict(SD15_UNET))
    if type(config).__name__ != "SD15":
        raise RuntimeError(f"ComfyUI detected {type(config).__name__} for the SD1.5 UNet configuration")
    target = config.clip_target()
    with torch.device("meta"), torch.no_grad():
        model = config.get_model({}, device="meta")
        vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
        clip = target.clip(device="meta", dtype=torch.float32, **target.params)
    shapes = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        like = shapes[key]
        if not key.startswith(MODEL_PREFIXES):
            raise RuntimeError(f"unexpected checkpoint key {key!r}")
        if not like.is_floating_point():
            raise RuntimeError(f"non-float checkpoint tensor {key!r} ({like.dtype}) has no value on meta")
        state[key] = random_value(key, like, generator)
    return state


def main(out: str) -> None:
    from comfy import utils

    state = build_state_dict()
    utils.save_torch_file(state, out)
    print(f"wrote {len(state)} tensors, {sum(t.numel() for t in state.values()) / 1e6:.0f} M values to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
