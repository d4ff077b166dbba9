"""Pictures for people: image grids and distribution-vs-target bar charts (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from fair_core.images import tensor_to_uint8


def image_grid(images: torch.Tensor, columns: int = 8, upscale: int = 1, padding: int = 2) -> Image.Image:
    """Tile ``(N, 3, H, W)`` images in ``[-1, 1]`` into one RGB picture, ``columns`` per row, white gaps."""
    tiles = tensor_to_uint8(images)
    count, height, width, _ = tiles.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = tile
    picture = Image.fromarray(canvas)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    return picture


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int = 8, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns, upscale).save(path)
    return path


def distribution_chart(
    path: str | Path,
    classes: Sequence[str],
    series: Mapping[str, Sequence[float]],
    intervals: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    title: str = "",
) -> Path:
    """Grouped bar chart of class shares, one bar group per class and one colour per series
    (e.g. ``{"before": ..., "after": ..., "target": ...}``), with optional error bars ``(low, high)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    positions = np.arange(len(classes))
    width = 0.8 / max(1, len(series))
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(classes), 3.6))
    for offset, (name, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        errors = None
        if intervals and name in intervals:
            bounds = np.asarray(intervals[name], dtype=float)
            errors = np.abs(np.stack([values - bounds[:, 0], bounds[:, 1] - values]))
        axis.bar(positions + (offset - (len(series) - 1) / 2) * width, values, width, yerr=errors, capsize=3, label=name)
    axis.set_xticks(positions, classes)
    axis.set_ylim(0, 1)
    axis.set_ylabel("share of images")
    axis.set_title(title)
    axis.legend(frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
