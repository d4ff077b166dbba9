"""The one interface through which training, evaluation and the UIs read attributes off images.

An :class:`AttributeScorer` takes a batch of images and returns per-attribute logits plus which images
had a usable face. For Stable Diffusion that is "detect the largest face, crop it differentiably,
classify the crop" (``fair_core.faces`` / ``fair_core.classifiers``); for the toy world it is a
whole-image classifier (:class:`WholeImageScorer`). The trainer, ``fair eval`` and the nodes only
see this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from fair_core.targets import Attribute


@dataclass
class AttributeScores:
    """Classifier output for a batch of N images.

    Attributes:
        logits: one tensor per attribute, shape ``(N, K_a)``, differentiable w.r.t. the input pixels.
            Rows of images without a face hold arbitrary values and must be ignored.
        has_face: bool tensor ``(N,)``; False where no face was found (no alignment loss, not counted).
        boxes: float tensor ``(N, 4)`` of face boxes ``(x0, y0, x1, y1)`` in pixels of the input image,
            NaN where there is no face; ``None`` for whole-image scorers.
    """

    logits: list[torch.Tensor]
    has_face: torch.Tensor
    boxes: torch.Tensor | None = None

    def probabilities(self) -> list[np.ndarray]:
        """Softmax of each attribute's logits as float64 numpy arrays ``(N, K_a)``."""
        return [torch.softmax(l.detach().double(), dim=-1).cpu().numpy() for l in self.logits]


class AttributeScorer(Protocol):
    """Callable ``images -> AttributeScores``.

    ``images``: float tensor ``(N, 3, H, W)``, RGB, values in ``[-1, 1]`` (the VAE decoder's range).
    """

    attributes: tuple[Attribute, ...]

    def __call__(self, images: torch.Tensor) -> AttributeScores: ...


def split_logits(logits: torch.Tensor, attributes: Sequence[Attribute]) -> list[torch.Tensor]:
    """Split concatenated logits ``(N, sum K_a)`` (the classifier file layout, DESIGN §3.2) per attribute."""
    sizes = [len(a.classes) for a in attributes]
    if logits.shape[-1] != sum(sizes):
        raise ValueError(f"classifier gives {logits.shape[-1]} logits, attributes need {sum(sizes)} ({sizes})")
    return list(torch.split(logits, sizes, dim=-1))


class WholeImageScorer:
    """Scores the whole image with a classifier ``(N,3,H,W) -> (N, sum K_a)``; every image "has a face".

    The toy world uses it: its figures fill the frame, so there is nothing to detect.
    """

    def __init__(self, classifier: torch.nn.Module, attributes: Sequence[Attribute]):
        self.classifier = classifier
        self.attributes = tuple(attributes)

    def __call__(self, images: torch.Tensor) -> AttributeScores:
        logits = self.classifier(images)
        has_face = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        return AttributeScores(split_logits(logits, self.attributes), has_face)
