"""The toy world's image-preservation loss: the stand-in for Shen et al.'s CLIP + DINOv2 similarity.

On Stable Diffusion the fair adaptor is kept from changing everything else by comparing each image with
the frozen model's image from the same noise in the embedding space of CLIP and DINOv2
(:class:`fair_core.losses.ImagePreservationLoss`). The toy world has no such encoders, so it compares a
*colour-blind view* instead: the largest channel of each pixel. Red and blue figures have the same
largest channel (:data:`~fair_core.toyworld.world.BASE_COLOURS`), so a colour change is free while
moving, resizing, reshaping the figure, changing the background or drawing noise is penalised.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def colour_blind_view(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, H*W)``: each pixel's largest channel."""
    return images.float().amax(dim=1).flatten(1)


class ColourBlindPreservationLoss(nn.Module):
    """``(images, reference, weights) -> (N,)``: ``w_i * sum_pixels (view(x_i) - view(o_i))**2``.

    The same call as :class:`fair_core.losses.ImagePreservationLoss` (``face_boxes``/``factor2`` are
    accepted and ignored: a toy scorer has no face boxes). Summed, not averaged, over the pixels so that
    one changed pixel costs as much in a 16 px image as in a bigger one: a pure colour swap scores 0, a
    one-pixel shift of a figure a few units, noise in place of a figure over a hundred.
    """

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [colour_blind_view(images).detach()]

    def forward(
        self,
        images: torch.Tensor,
        reference: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | None = None,
        face_boxes: torch.Tensor | None = None,
        factor2: torch.Tensor | float = 1.0,
    ) -> torch.Tensor:
        (target,) = self.embed(reference) if isinstance(reference, torch.Tensor) else list(reference)
        loss = (colour_blind_view(images) - target.to(images.device)).pow(2).sum(dim=1)
        return loss if weights is None else loss * weights.to(loss)
