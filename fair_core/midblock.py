"""Schedule maths of the training-free mid-block bypass (Hakemi et al. 2025, v1; reconstructed, experimental).

The v1 abstract proposes bypassing the UNet's mid-block "temporarily and progressively" during sampling; v2 dropped
the method and gives no formula (``reference/method-hakemi2025.md`` §3.4, §4.2). This module implements the
reconstruction the reference file lays out, with its untuned defaults:

* a partial bypass ``h_mid' = h_in + λ · (M(h_in) − h_in)``: ``h_in`` enters the mid-block ``M``, λ = 1 is the
  unmodified model and λ = 0 skips the block (:func:`blend`);
* λ follows a schedule over sampling progress s ∈ [0, 1] (0 = first, noisiest step) with the bypass at its
  strongest, λ_min, from ``start`` and back to λ = 1 by ``end`` (:class:`BypassSchedule`);
* s is ComfyUI's "percent" of the denoising trajectory, ``1 − t(σ) / 999`` for the model's timestep t of the
  current σ (:func:`progress_of_timestep`): the convention of ComfyUI's own start/end-percent inputs, and
  independent of how many steps the sampler takes.

Host glue (the ComfyUI node, an A1111 forward hook) only finds ``h_in`` / ``M(h_in)`` and calls these functions.
Depends on torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "cosine", "step", "reverse")
"""``linear``/``cosine``: λ rises from λ_min at ``start`` to 1 at ``end``; ``step``: λ_min on [start, end), else 1;
``reverse`` (the bypass grows): λ falls from 1 at ``start`` to λ_min at ``end`` and stays there."""
BRANCHES = ("both", "cond", "uncond")
"""Which classifier-free-guidance branch the bypass acts on. ComfyUI marks each batch chunk 0 (cond) or 1 (uncond)."""
NUM_TIMESTEPS = 1000  # SD1.x / SD2.x / SDXL discrete timesteps


@dataclass(frozen=True)
class BypassSchedule:
    """λ(s), the mid-block's weight at sampling progress s (see :data:`SCHEDULES`).

    Attributes:
        lambda_min: the strongest bypass, in [0, 1] (0 skips the mid-block).
        start: progress where the bypass begins, in [0, 1).
        end: progress where the bypass ends (``reverse``: where it reaches λ_min), in (start, 1].
        schedule: one of :data:`SCHEDULES`.

    Defaults are the reference's untuned suggestion (λ_min 0.5, first 30 % of sampling, linear).
    """

    lambda_min: float = 0.5
    start: float = 0.0
    end: float = 0.3
    schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.lambda_min <= 1.0:
            raise ValueError(f"lambda_min must be in [0, 1] (1 leaves the model unchanged), got {self.lambda_min}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got start {self.start}, end {self.end}")

    def weight(self, progress: float) -> float:
        """λ at ``progress`` s ∈ [0, 1]; values outside are clamped."""
        s = min(max(float(progress), 0.0), 1.0)
        if s < self.start:
            return 1.0
        u = min((s - self.start) / (self.end - self.start), 1.0)  # position in the window, 0..1
        depth = 1.0 - self.lambda_min
        if self.schedule == "linear":
            return self.lambda_min + depth * u
        if self.schedule == "cosine":
            return 1.0 - depth * 0.5 * (1.0 + math.cos(math.pi * u))
        if self.schedule == "step":
            return self.lambda_min if s < self.end else 1.0
        return 1.0 - depth * u  # reverse

    def weights(self, progress: torch.Tensor) -> torch.Tensor:
        """λ for each entry of a progress tensor (any shape), float32 on its device."""
        values = [self.weight(p) for p in progress.detach().flatten().tolist()]
        return torch.tensor(values, dtype=torch.float32, device=progress.device).reshape(progress.shape)


def progress_of_timestep(timestep: torch.Tensor | float, num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """Sampling progress s = 1 − t / (T − 1) of model timestep(s) t ∈ [0, T − 1] (t = T − 1, pure noise: s = 0),
    clamped to [0, 1]; the inverse of ComfyUI's ``percent_to_sigma`` on the timestep axis."""
    t = torch.as_tensor(timestep, dtype=torch.float32)
    return (1.0 - t / (num_timesteps - 1)).clamp(0.0, 1.0)


def branch_mask(cond_or_uncond: Sequence[int], batch: int, apply_to: str) -> torch.Tensor:
    """Bool ``(batch,)``: which rows of a CFG batch the bypass acts on.

    ComfyUI stacks the batch as ``len(cond_or_uncond)`` equal chunks, chunk i being cond (0) or uncond (1).
    """
    if apply_to not in BRANCHES:
        raise ValueError(f"apply_to must be one of {', '.join(BRANCHES)}, got {apply_to!r}")
    if apply_to == "both" or not cond_or_uncond:
        return torch.ones(batch, dtype=torch.bool)
    if batch % len(cond_or_uncond):
        raise ValueError(f"batch of {batch} does not split into {len(cond_or_uncond)} cond/uncond chunks")
    wanted = 0 if apply_to == "cond" else 1
    chunk = torch.tensor([flag == wanted for flag in cond_or_uncond], dtype=torch.bool)
    return chunk.repeat_interleave(batch // len(cond_or_uncond))


def blend(h_in: torch.Tensor, h_mid: torch.Tensor, weight: torch.Tensor | float,
          match_std: bool = False) -> torch.Tensor:
    """``h_in + λ · (h_mid − h_in)``, per sample.

    Args:
        h_in: ``(B, C, H, W)``, what entered the mid-block.
        h_mid: ``(B, C, H, W)``, what it returned.
        weight: λ, a float or ``(B,)``; 1 returns ``h_mid`` exactly, 0 returns ``h_in``.
        match_std: rescale each blended sample to the standard deviation of its ``h_mid`` (avoids contrast shifts
            when λ < 1); samples with λ = 1 are left exactly as they were.
    Returns:
        ``(B, C, H, W)`` in ``h_mid``'s dtype.
    """
    if h_in.shape != h_mid.shape:
        raise ValueError(f"mid-block input {tuple(h_in.shape)} and output {tuple(h_mid.shape)} differ in shape")
    lam = torch.as_tensor(weight, dtype=torch.float32, device=h_mid.device)
    lam = lam.reshape(-1, *([1] * (h_mid.ndim - 1))) if lam.ndim else lam
    out = h_in.float() + lam * (h_mid.float() - h_in.float())
    if match_std:
        dims = tuple(range(1, h_mid.ndim))
        scale = h_mid.float().std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp_min(1e-12)
        out = torch.where(lam == 1.0, out, out * scale)
    return torch.where(lam == 1.0, h_mid.float(), out).to(h_mid.dtype)


def row_weights(schedule: BypassSchedule, timesteps: torch.Tensor, batch: int, cond_or_uncond: Sequence[int] = (),
                apply_to: str = "both", num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """λ per row of a UNet batch of ``batch`` rows: the schedule at each row's progress, and 1 on rows of the branch
    the bypass leaves alone (:func:`branch_mask`). Float32 ``(batch,)`` on the timesteps' device.

    ``timesteps`` are the model timesteps (of ``num_timesteps``) of the batch's rows, or of one CFG chunk: ComfyUI
    passes the sigmas of one chunk (``(batch / chunks,)``) and stacks the chunks, so they are tiled to ``batch``.
    """
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    if timesteps.numel() == 0 or batch % timesteps.numel():
        raise ValueError(f"{timesteps.numel()} timesteps do not tile a batch of {batch} rows")
    progress = progress_of_timestep(timesteps.float(), num_timesteps)
    weights = schedule.weights(progress).repeat(batch // timesteps.numel())
    mask = branch_mask(cond_or_uncond, batch, apply_to).to(weights.device)
    return torch.where(mask, weights, torch.ones_like(weights))
