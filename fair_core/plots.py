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


def audit_chart(result, width: int = 640) -> Image.Image:
    """The audit's picture: per attribute, the observed class shares among faces with their 95% intervals beside
    the target shares (an :class:`~fair_core.audit.AuditResult`); an RGB image ``width`` pixels wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {name: g for name, g in result.summary.overall.groups.items() if " x " not in name}
    figure, axes = plt.subplots(1, max(1, len(groups)), figsize=(width / 100, 3.2), dpi=100, squeeze=False)
    for axis, (name, group) in zip(axes[0], groups.items()):
        positions = np.arange(len(group.classes))
        observed = np.nan_to_num(np.atleast_1d(np.asarray(group.frequencies.estimate, dtype=float)))
        low = np.nan_to_num(np.atleast_1d(np.asarray(group.frequencies.low, dtype=float)))
        high = np.nan_to_num(np.atleast_1d(np.asarray(group.frequencies.high, dtype=float)))
        errors = np.clip(np.stack([observed - low, high - observed]), 0, None)
        axis.bar(positions - 0.2, observed, 0.4, yerr=errors, capsize=3, label="observed", color="#4a78c2")
        axis.bar(positions + 0.2, group.target, 0.4, label="target", color="#bbbbbb")
        axis.set_xticks(positions, group.classes)
        axis.set_ylim(0, 1)
        axis.set_title(f"{name}: distance {group.distance.estimate:.2f}", fontsize=10)
    overall = result.summary.overall
    figure.suptitle(f"{overall.num_faces}/{overall.num_images} faces", fontsize=10)
    axes[0][0].legend(frameon=False, fontsize=8)
    figure.tight_layout()
    figure.canvas.draw()
    picture = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[:, :, :3].copy())
    plt.close(figure)
    return picture
