"""The toy world: procedurally drawn figures whose colour and shape depend on an occupation word.

Each image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB with values in ``[-1, 1]``: one filled figure on a flat grey
background. Two attributes are protected (:data:`TOY_SCHEMA`):

* ``colour``: red or blue (the binary attribute, like gender);
* ``shape``: round, square or triangle (the three-class attribute, like race).

The rest of the content is drawn independently of the attributes and of the occupation, and should
stay put when a fair adaptor changes an attribute: the figure's position ``(x, y)`` (its centroid, in
pixels from the top-left corner), its ``size`` (square root of its area, in pixels; every shape of the
same size covers the same area) and the ``background`` grey level. :func:`estimate_content` reads these
back from any image, so paired images (same seed before and after an adaptor) can be compared.

The bias is known by construction: occupation ``o`` draws ``colour ~ Categorical(COLOUR_SKEW[o])`` and,
independently, ``shape ~ Categorical(SHAPE_SKEW[o])``. Prompts are ``"a photo of a {occupation}"``. In
pretraining, a quarter of the captions also name the colour and, independently, a quarter the shape
(``"a photo of a blue nurse"``), so the text encoder knows the words, as Stable Diffusion's knows
"female" and "male" although most captions do not say them; an image whose caption names an attribute
has that attribute balanced (``sample_world(..., balanced=...)``), as photos captioned "female
firefighter" show women who otherwise look like firefighters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from fair_core.targets import Attribute, TargetDistribution

IMAGE_SIZE = 16
PROMPT_TEMPLATE = "a photo of a {occupation}"

TOY_SCHEMA: dict[str, Attribute] = {
    "colour": Attribute("colour", ("red", "blue")),
    "shape": Attribute("shape", ("round", "square", "triangle")),
}

# occupation -> (P(red), P(blue)), (P(round), P(square), P(triangle)). Skewed both ways on purpose.
OCCUPATION_SKEWS: dict[str, tuple[tuple[float, float], tuple[float, float, float]]] = {
    "doctor": ((0.92, 0.08), (0.80, 0.10, 0.10)),
    "nurse": ((0.08, 0.92), (0.10, 0.10, 0.80)),
    "pilot": ((0.95, 0.05), (0.10, 0.80, 0.10)),
    "teacher": ((0.15, 0.85), (0.75, 0.15, 0.10)),
    "farmer": ((0.88, 0.12), (0.10, 0.15, 0.75)),
    "chef": ((0.70, 0.30), (0.10, 0.80, 0.10)),
    "baker": ((0.25, 0.75), (0.80, 0.10, 0.10)),
    "judge": ((0.90, 0.10), (0.10, 0.10, 0.80)),
    "lawyer": ((0.80, 0.20), (0.15, 0.75, 0.10)),
    "dancer": ((0.06, 0.94), (0.80, 0.10, 0.10)),
    "painter": ((0.40, 0.60), (0.34, 0.33, 0.33)),
    "singer": ((0.12, 0.88), (0.10, 0.80, 0.10)),
    "firefighter": ((0.94, 0.06), (0.10, 0.80, 0.10)),
    "librarian": ((0.07, 0.93), (0.80, 0.10, 0.10)),
    "mechanic": ((0.90, 0.10), (0.10, 0.10, 0.80)),
    "cashier": ((0.10, 0.90), (0.15, 0.75, 0.10)),
    "plumber": ((0.85, 0.15), (0.75, 0.15, 0.10)),
    "tailor": ((0.20, 0.80), (0.10, 0.15, 0.75)),
}
TRAIN_OCCUPATIONS: tuple[str, ...] = (
    "doctor", "nurse", "pilot", "teacher", "farmer", "chef",
    "baker", "judge", "lawyer", "dancer", "painter", "singer",
)
# Never used to train a fair adaptor; the diffusion model itself is pretrained on every occupation.
HELDOUT_OCCUPATIONS: tuple[str, ...] = ("firefighter", "librarian", "mechanic", "cashier", "plumber", "tailor")
OCCUPATIONS: tuple[str, ...] = TRAIN_OCCUPATIONS + HELDOUT_OCCUPATIONS

# Columns of the content parameters returned by sample_world and estimate_content.
PARAM_NAMES: tuple[str, ...] = ("x", "y", "size", "background")
X_RANGE = (6.5, 9.5)
Y_RANGE = (7.5, 9.5)  # triangles reach further up (apex) than down
SIZE_RANGE = (5.0, 7.0)
BACKGROUND_RANGE = (-0.6, 0.6)
COLOUR_JITTER = 0.08
BASE_COLOURS = torch.tensor([[0.85, -0.75, -0.65], [-0.75, -0.45, 0.85]])  # red, blue in [-1, 1]
_SUPERSAMPLE = 4


def prompt(occupation: str, attribute_words: Sequence[str] = ()) -> str:
    """``"a photo of a {occupation}"``, or with class names before the occupation, as some real captions
    name a person's gender: ``prompt("nurse", ["red", "round"]) == "a photo of a red round nurse"``.
    The article is always "a"."""
    return PROMPT_TEMPLATE.format(occupation=" ".join([*attribute_words, occupation]))


def _check_occupations(occupations: Sequence[str]) -> None:
    if isinstance(occupations, str) or not occupations:
        raise ValueError("occupations must be a non-empty list of occupation names")
    unknown = [o for o in occupations if o not in OCCUPATION_SKEWS]
    if unknown:
        raise ValueError(f"unknown toy occupations {unknown} (known: {', '.join(OCCUPATIONS)})")


def occupation_distribution(occupation: str) -> TargetDistribution:
    """The training distribution of ``occupation`` over colour x shape (independent marginals)."""
    _check_occupations([occupation])
    colour, shape = OCCUPATION_SKEWS[occupation]
    return TargetDistribution.from_marginals([(TOY_SCHEMA["colour"], colour), (TOY_SCHEMA["shape"], shape)])


def _shape_masks(grid_x: torch.Tensor, grid_y: torch.Tensor, params: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """Inside-masks ``(N, S, S)`` on a subpixel grid for figures of area ``size**2`` centred (centroid) at ``(x, y)``."""
    x, y, size = (params[:, i, None, None] for i in range(3))
    dx, dy = grid_x - x, grid_y - y
    radius = size / math.sqrt(math.pi)
    round_mask = dx**2 + dy**2 <= radius**2
    square_mask = (dx.abs() <= size / 2) & (dy.abs() <= size / 2)
    height = torch.sqrt(math.sqrt(3.0) * size**2)  # equilateral triangle, apex up, centroid at (x, y)
    apex = -2 * height / 3
    triangle_mask = (dy >= apex) & (dy <= height / 3) & (dx.abs() <= (dy - apex) / math.sqrt(3.0))
    masks = torch.stack([round_mask, square_mask, triangle_mask], dim=1)
    return masks[torch.arange(len(shapes)), shapes]


def draw_figures(labels: torch.Tensor, params: torch.Tensor, colours: torch.Tensor | None = None) -> torch.Tensor:
    """Render figures.

    Args:
        labels: int ``(N, 2)``: colour index, shape index (:data:`TOY_SCHEMA` order).
        params: float ``(N, 4)``: x, y, size, background (:data:`PARAM_NAMES`).
        colours: optional float ``(N, 3)`` RGB in ``[-1, 1]``; default the base colour of each label.

    Returns:
        float ``(N, 3, IMAGE_SIZE, IMAGE_SIZE)`` in ``[-1, 1]``, anti-aliased by 4x4 supersampling.
    """
    if labels.ndim != 2 or labels.shape[1] != 2 or params.shape != (labels.shape[0], len(PARAM_NAMES)):
        raise ValueError(f"expected labels (N, 2) and params (N, 4), got {tuple(labels.shape)} and {tuple(params.shape)}")
    if colours is None:
        colours = BASE_COLOURS[labels[:, 0]]
    fine = IMAGE_SIZE * _SUPERSAMPLE
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    masks = _shape_masks(grid_x, grid_y, params.float(), labels[:, 1].long()).float()
    coverage = F.avg_pool2d(masks[:, None], _SUPERSAMPLE)  # (N, 1, H, W)
    background = params[:, 3, None, None, None].float().expand(-1, 3, 1, 1)
    return background * (1 - coverage) + colours[:, :, None, None].float() * coverage


@dataclass
class WorldSample:
    """A batch of world images.

    Attributes:
        images: float ``(N, 3, IMAGE_SIZE, IMAGE_SIZE)`` in ``[-1, 1]``.
        labels: int64 ``(N, 2)``: class index of colour and shape.
        params: float ``(N, 4)``: x, y, size, background (:data:`PARAM_NAMES`).
        occupations: the occupation of each image, length N.
    """

    images: torch.Tensor
    labels: torch.Tensor
    params: torch.Tensor
    occupations: list[str]

    @property
    def prompts(self) -> list[str]:
        return [prompt(o) for o in self.occupations]


def sample_world(occupations: Sequence[str], n: int, seed: int, balanced: Sequence[str] = ()) -> WorldSample:
    """Draw ``n`` images of each occupation (occupation-major order), deterministically from ``seed``.

    Labels follow :data:`OCCUPATION_SKEWS`, except the attributes named in ``balanced``, which are drawn
    uniformly (the images a caption such as "a photo of a blue firefighter" describes: blue, and otherwise
    a typical firefighter). Position, size, background and colour jitter are uniform and independent of
    the occupation and the labels.
    """
    _check_occupations(occupations)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    unknown = [name for name in balanced if name not in TOY_SCHEMA]
    if isinstance(balanced, str) or unknown:
        raise ValueError(f"balanced: a list of toy attributes ({', '.join(TOY_SCHEMA)}), got {balanced!r}")
    generator = torch.Generator().manual_seed(int(seed))
    labels = []
    for index, name in enumerate(TOY_SCHEMA):
        probs = torch.tensor([OCCUPATION_SKEWS[o][index] for o in occupations]).repeat_interleave(n, dim=0)
        if name in balanced:
            probs = torch.ones_like(probs)
        labels.append(torch.multinomial(probs, 1, generator=generator)[:, 0])
    labels = torch.stack(labels, dim=1)
    total = len(occupations) * n
    low, high = torch.tensor([X_RANGE, Y_RANGE, SIZE_RANGE, BACKGROUND_RANGE]).T
    params = low + (high - low) * torch.rand(total, 4, generator=generator)
    jitter = COLOUR_JITTER * (2 * torch.rand(total, 3, generator=generator) - 1)
    images = draw_figures(labels, params, BASE_COLOURS[labels[:, 0]] + jitter)
    return WorldSample(images, labels, params, [o for o in occupations for _ in range(n)])


def estimate_content(images: torch.Tensor) -> torch.Tensor:
    """Estimate the non-target content of images: ``(N, 4)`` x, y, size, background (:data:`PARAM_NAMES`).

    The background is the median border pixel (the figure never touches the border). A pixel's figure
    coverage is its largest channel difference from the background, relative to the image's largest one;
    coverages below 0.25 count as background noise. Position is the coverage-weighted centroid, size the
    square root of the summed coverage. Exact to about 0.1 px on clean world images.

    Args:
        images: float ``(N, 3, H, W)`` in ``[-1, 1]``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
    images = images.detach().float()
    height, width = images.shape[-2:]
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1)
    background = border.median(dim=-1).values  # (N, 3)
    difference = (images - background[:, :, None, None]).abs().amax(dim=1)  # (N, H, W)
    coverage = difference / difference.flatten(1).amax(dim=1).clamp_min(1e-6)[:, None, None]
    coverage = torch.where(coverage >= 0.25, coverage, torch.zeros_like(coverage))
    area = coverage.sum(dim=(1, 2)).clamp_min(1e-6)
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    x = (coverage * xs).sum(dim=(1, 2)) / area
    y = (coverage * ys[:, None]).sum(dim=(1, 2)) / area
    return torch.stack([x, y, area.sqrt(), background.mean(dim=1)], dim=1)


def content_change(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """How far paired images moved in their non-target content: float ``(N, 3)``.

    Columns: position shift (pixels, Euclidean), absolute size change (pixels), absolute background
    change (grey level in ``[-1, 1]`` units). Zero for an image and itself; an attribute change alone
    (colour or shape of the same figure) leaves it near zero.
    """
    if images_a.shape != images_b.shape:
        raise ValueError(f"paired images differ in shape: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    a, b = estimate_content(images_a), estimate_content(images_b)
    return torch.stack([(a[:, :2] - b[:, :2]).norm(dim=1), (a[:, 2] - b[:, 2]).abs(), (a[:, 3] - b[:, 3]).abs()], dim=1)
