"""The bias audit as one library call: images + scorer + optional target -> :class:`AuditResult`.

``fair eval``, the trainer's validation, the demo, the ComfyUI Bias Audit node and the A1111 batch audit all go
through :func:`score_records` (images -> one JSON-ready record per image) and :func:`summarise_records` (records ->
:class:`~fair_core.metrics.BiasSummary`); :func:`audit_images` and :func:`audit_folder` are the two together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fair_core.images import image_to_tensor, read_image_file
from fair_core.metrics import BiasSummary, Predictions, summarise_bias
from fair_core.scoring import AttributeScorer
from fair_core.targets import TargetDistribution

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_AUDIT_SIDE = 2048
"""Longest side of an image as the folder audit scores it (larger files are shrunk first, and reported)."""
ImageCallback = Callable[[Sequence[str], Sequence[int], torch.Tensor], None]
"""``on_images(prompts, indices, images)``: sees each batch ``(n, 3, H, W)`` in [-1, 1] as it is scored."""


@dataclass
class AuditResult:
    """What an audit found.

    Attributes:
        summary: frequencies, bias, distance to target, face rate and uncertainty, with bootstrap intervals.
        records: one per image (``prompt``, ``index``, ``has_face``, ``box``, ``probs`` per attribute).
        target: what the distance is measured to (uniform over the classifier's attributes when none was given).
        notes: files converted, resized or skipped (folder audits), one line each.
    """

    summary: BiasSummary
    records: list[dict]
    target: TargetDistribution
    notes: list[str] = field(default_factory=list)

    @property
    def boxes(self) -> np.ndarray:
        """``(N, 4)`` face boxes ``(x0, y0, x1, y1)`` in pixels, NaN rows where there is no face or no detector."""
        return np.array([r["box"] if r["box"] else [np.nan] * 4 for r in self.records], dtype=float).reshape(-1, 4)

    def describe(self) -> str:
        """A short human summary: faces found, then per attribute the shares against the target, distance and bias."""
        overall = self.summary.overall
        lines = [f"{overall.num_faces} of {overall.num_images} images with a face "
                 f"(face rate {overall.face_rate.estimate:.0%})"]
        if overall.num_faces == 0:
            return "\n".join(lines + ["no faces: no bias figures"])
        for name, group in overall.groups.items():
            shares = ", ".join(f"{c} {f:.0%} (target {t:.0%})" for c, f, t in
                               zip(group.classes, np.atleast_1d(group.frequencies.estimate), group.target))
            lines.append(f"{name}: {shares}; distance to target {group.distance.estimate:.3f} "
                         f"[{group.distance.low:.3f}, {group.distance.high:.3f}], bias {group.bias.estimate:.3f}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: ``target``, the overall figures (``summary``), ``notes`` and the per-image ``records``."""
        return {"target": self.target.to_json(), "summary": self.summary.to_json()["overall"],
                "notes": list(self.notes), "records": self.records}


def score_records(scorer: AttributeScorer, images: torch.Tensor, prompts: Sequence[str], indices: Sequence[int],
                  seeds: Sequence[int | None]) -> list[dict]:
    """One JSON-ready record per image of ``images`` ``(N, 3, H, W)`` in ``[-1, 1]``: ``prompt``, ``index``,
    ``seed``, ``has_face``, ``box`` (pixels, or None) and ``probs`` (per attribute, rounded to 6 digits)."""
    with torch.no_grad():
        scores = scorer(images)
    probabilities = scores.probabilities()
    boxes = scores.boxes.cpu().numpy() if scores.boxes is not None else None
    records = []
    for i, (prompt, index, seed) in enumerate(zip(prompts, indices, seeds)):
        box = None if boxes is None or np.isnan(boxes[i]).any() else [round(float(v), 2) for v in boxes[i]]
        records.append({
            "prompt": prompt, "index": int(index), "seed": seed, "has_face": bool(scores.has_face[i]), "box": box,
            "probs": {a.name: [round(float(v), 6) for v in p[i]] for a, p in zip(scorer.attributes, probabilities)},
        })
    return records


def predictions_of(records: Sequence[dict], target: TargetDistribution) -> dict[str, Predictions]:
    """Per prompt, :class:`Predictions` in ``target``'s attribute order."""
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt"], []).append(record)
    result = {}
    for prompt, rows in by_prompt.items():
        missing = [n for n in target.names if n not in rows[0]["probs"]]
        if missing:
            raise ValueError(f"the classifier does not predict {missing} (it has {list(rows[0]['probs'])})")
        probs = [np.array([r["probs"][n] for r in rows]) for n in target.names]
        result[prompt] = Predictions(probs, np.array([r["has_face"] for r in rows], dtype=bool))
    return result


def summarise_records(records: Sequence[dict], target: TargetDistribution,
                      reference: TargetDistribution | None = None, seed: int = 0) -> BiasSummary:
    """The bias figures of scored images (:func:`score_records`' records), per prompt and over prompts."""
    return summarise_bias(predictions_of(records, target), target, reference, seed=seed)


def audit_images(images: torch.Tensor, scorer: AttributeScorer, target: TargetDistribution | None = None, *,
                 prompt: str = "batch", reference: TargetDistribution | None = None, seed: int = 0,
                 batch_size: int = 16) -> AuditResult:
    """Audit one batch of images of one prompt.

    Args:
        images: ``(N, 3, H, W)`` float in [-1, 1] (:mod:`fair_core.images` converts host formats).
        scorer: face detection + classifier (:func:`fair_core.resolve.resolve_audit_scorer`), or any scorer.
        target: the wanted distribution; uniform over the scorer's attributes when None.
        prompt: the name the figures are filed under.
        reference: a reference (training-data) distribution for the amplification ratio.
        seed: of the bootstrap intervals.
        batch_size: images scored at a time.
    """
    target = target if target is not None else TargetDistribution.uniform(scorer.attributes)
    records = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        count = chunk.shape[0]
        records += score_records(scorer, chunk, [prompt] * count, range(start, start + count), [None] * count)
    return AuditResult(summarise_records(records, target, reference, seed), records, target)


def audit_folder(folder: str | Path, scorer: AttributeScorer, target: TargetDistribution | None = None, *,
                 input_size: int | None = None, reference: TargetDistribution | None = None, seed: int = 0,
                 batch_size: int = 8, device: str = "cpu") -> AuditResult:
    """Audit a folder of generated images, one subfolder per prompt (``fair eval --images``' layout); files that
    were converted, resized or could not be read are listed in ``notes``."""
    target = target if target is not None else TargetDistribution.uniform(scorer.attributes)
    records, report = score_image_folder(folder, scorer, input_size, batch_size, device)
    if not records:
        raise ValueError(f"{folder}: no readable images")
    return AuditResult(summarise_records(records, target, reference, seed), records, target, report.lines())


@dataclass
class FolderReport:
    """What :func:`score_image_folder` did besides scoring: files it converted, resized, could not read, or left
    out (not an image suffix we read, or inside a nested folder)."""

    converted: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for what, files in (("converted to RGB", self.converted), ("resized", self.resized),
                            ("unreadable, skipped", self.unreadable), ("not read (not an image file we read, or in a "
                                                                      "nested folder)", self.ignored)):
            if files:
                out.append(f"{len(files)} image(s) {what}: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
        return out


def read_image_folder(folder: str | Path, report: FolderReport | None = None) -> dict[str, list[Path]]:
    """Prompt -> image files of a folder of already generated images.

    Layout: one subfolder per prompt, named by the prompt (underscores read as spaces), holding images
    (``.png``/``.jpg``/``.jpeg``/``.webp``/``.bmp``) in name order; image ``j`` is the ``j``-th file. Anything
    else (other files, nested folders, files beside the subfolders) is listed in ``report.ignored``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    report = report if report is not None else FolderReport()
    prompts = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            report.ignored.append(entry.name)
            continue
        files = []
        for item in sorted(entry.iterdir()):
            if item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
                files.append(item)
            else:
                report.ignored.append(f"{entry.name}/{item.name}")
        if files:
            prompts[entry.name.replace("_", " ")] = files
    if not prompts:
        raise ValueError(f"{folder}: no images found; expected one subfolder per prompt holding "
                         f"{'/'.join(IMAGE_SUFFIXES)} files")
    return prompts


def score_image_folder(folder: str | Path, scorer: AttributeScorer, input_size: int | None = None,
                       batch_size: int = 8, device: str = "cpu", on_images: ImageCallback | None = None) -> tuple[list[dict], FolderReport]:
    """Records (seed ``None``, plus ``file``) of every readable image of :func:`read_image_folder`.

    Images not in RGB (grey, RGBA, palette, 16-bit) are converted; with ``input_size`` (a whole-image
    classifier's fixed size) other sizes are resized; files PIL cannot read are skipped. All three are
    listed in the :class:`FolderReport`, never raised.
    """
    report = FolderReport()
    files = [(prompt, index, path) for prompt, paths in read_image_folder(folder, report).items()
             for index, path in enumerate(paths)]
    records = []
    # Read one batch of files at a time (a folder of SD images does not fit in memory at once); score
    # equal-sized images together (faces may be scored at any size).
    for start in range(0, len(files), batch_size):
        loaded = [(prompt, index, path.name, pixels) for prompt, index, path in files[start : start + batch_size]
                  if (pixels := _read_image(path, input_size, report)) is not None]
        for shape in dict.fromkeys(tuple(item[3].shape) for item in loaded):
            same = [item for item in loaded if tuple(item[3].shape) == shape]
            images = torch.stack([item[3] for item in same])
            prompts, indices = [i[0] for i in same], [i[1] for i in same]
            if on_images is not None:
                on_images(prompts, indices, images)
            for record, item in zip(score_records(scorer, images.to(device), prompts, indices, [None] * len(same)), same):
                records.append({**record, "file": item[2]})
    order = {p: i for i, p in enumerate(dict.fromkeys(prompt for prompt, _, _ in files))}
    return sorted(records, key=lambda r: (order[r["prompt"]], r["index"])), report


def _read_image(path: Path, input_size: int | None, report: FolderReport) -> torch.Tensor | None:
    """``(3, H, W)`` in [-1, 1] by :mod:`fair_core.images`' rules, resized to ``input_size`` if given, else shrunk
    to :data:`MAX_AUDIT_SIDE` on its long side (face detection works at 2048 px anyway, and an 8000 px photo would
    otherwise take gigabytes as float tensors), or None if unreadable; what was done is added to ``report``."""
    from PIL import Image

    shown = f"{path.parent.name}/{path.name}"
    try:
        pixels, mode = read_image_file(path)
    except ValueError:
        report.unreadable.append(shown)
        return None
    if mode != "RGB":
        report.converted.append(shown)
    height, width = pixels.shape[:2]
    size = (input_size, input_size) if input_size is not None else None
    if size is None and max(height, width) > MAX_AUDIT_SIDE:
        scale = MAX_AUDIT_SIDE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size is not None and size != (width, height):
        report.resized.append(shown)
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))
    return image_to_tensor(pixels)
