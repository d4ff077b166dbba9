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

from fair_core.losses import PreservationLoss


def colour_blind_view(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, H*W)``: each pixel's largest channel."""
    return images.float().amax(dim=1).flatten(1)


class ColourBlindPreservationLoss(PreservationLoss):
    """``d = sum_pixels (view(x) - view(o))**2`` with :func:`colour_blind_view`.

    Summed, not averaged, over the pixels so that one changed pixel costs as much in a 16 px image as in
    a bigger one: a pure colour swap scores 0, a one-pixel shift of a figure a few units, noise in place
    of a figure over a hundred. Weights and face boxes work as in every
    :class:`~fair_core.losses.PreservationLoss` (toy scorers give no boxes).
    """

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [colour_blind_view(images).detach()]

    def distance(self, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        (target,) = targets
        return (colour_blind_view(images) - target.to(images.device)).pow(2).sum(dim=1)
