"""Benchmark of fair_core.dft: time and peak memory of adjusted vs naive DFT over the number of steps.

Not run in CI. Builds an SD1.5-sized UNet from its config with random weights (nothing is downloaded),
adds a rank-50 LoRA on the attention projections (the paper's UNet adaptor), and times one
``adjusted_backward`` call (target-free: the loss is a fixed random projection of the latents; the VAE
and the classifiers are left out, their cost does not depend on the number of steps).

    python bench/bench_dft.py                                  # CUDA, SD1.5 size, 512 px, fp16 autocast
    python bench/bench_dft.py --model tiny --device cpu --steps 2 4   # smoke test

Prints one markdown table row per (mode, steps) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from fair_core import dft
from fair_core.models import sd_dpm_solver

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models are test fixtures
from tiny_models import tiny_sd15  # noqa: E402

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


def sd15_unet() -> UNet2DConditionModel:
    """SD1.5's UNet architecture (860M parameters), random weights."""
    return UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def build(model: str, device: torch.device, frozen_dtype: torch.dtype) -> tuple[UNet2DConditionModel, int, int]:
    """UNet (frozen weights in ``frozen_dtype``, fp32 LoRA), latent size, text width."""
    unet, size, width = (sd15_unet(), 64, 768) if model == "sd15" else (tiny_sd15().unet, 16, 32)
    unet.to(device, frozen_dtype).requires_grad_(False)
    rank = 50 if model == "sd15" else 4
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet, size, width


def measure(unet, scheduler, noise, cond, uncond, steps, mode, autocast_dtype, loss_fn) -> tuple[float, float]:
    """Seconds and peak extra memory (GiB; CUDA only, NaN on CPU) of one adjusted_backward call."""
    cuda = noise.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    dft.adjusted_backward(
        unet, scheduler, noise, cond, uncond, steps, 7.5, loss_fn, mode=mode, autocast_dtype=autocast_dtype
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    unet.zero_grad(set_to_none=True)
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch N (the UNet sees 2N with CFG)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--modes", nargs="+", choices=dft.MODES, default=list(dft.MODES))
    parser.add_argument("--autocast", choices=list(AUTOCAST), default="fp16")
    parser.add_argument("--checkpointing", action="store_true", help="UNet gradient checkpointing")
    args = parser.parse_args()

    device = torch.device(args.device)
    autocast_dtype = AUTOCAST[args.autocast]
    unet, size, width = build(args.model, device, autocast_dtype or torch.float32)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(args.batch, 4, size, size, device=device, generator=g)
    cond, uncond = (torch.randn(args.batch, 77, width, device=device, generator=g) for _ in range(2))
    weight = torch.randn(noise.shape, device=device, generator=g)

    def loss_fn(x0: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x0) * weight).mean()

    scheduler = sd_dpm_solver()  # SD's DPM-Solver++ 2M configuration
    measure(unet, scheduler, noise, cond, uncond, 2, "adjusted", autocast_dtype, loss_fn)  # warm-up
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print("| device | model | N | autocast | checkpointing | mode | steps | seconds | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for steps in args.steps:
            try:
                seconds, peak = measure(unet, scheduler, noise, cond, uncond, steps, mode, autocast_dtype, loss_fn)
                result = f"{seconds:.2f} | {peak:.2f}"
            except torch.OutOfMemoryError:
                result = "OOM | OOM"
                unet.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            setting = f"{name} | {args.model} | {args.batch} | {args.autocast} | {args.checkpointing}"
            print(f"| {setting} | {mode} | {steps} | {result} |")


if __name__ == "__main__":
    main()
