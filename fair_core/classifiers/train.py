"""Training attribute classifiers on labelled face images, with a per-group evaluation report.

Label sources (:func:`read_labels`):

* a folder ``DIR/<class>/*.png`` for one attribute;
* a CSV ``file,<attribute>,...``: paths relative to the CSV (or ``image_root``). FairFace's
  ``fairface_label_train.csv`` (``file,age,gender,race,service_test``) is read into the paper's
  schema: race White (+ Middle Eastern, Latino_Hispanic) / Black / Indian / Asian (East + Southeast),
  gender female/male, age young/old split at ``old_from`` years (bucket start);
* CelebA's ``list_attr_celeba.txt``: ``Male`` -> gender, ``Young`` -> age.

Images are read with :func:`fair_core.images.load_image` (any bit depth / channel layout), then either
taken as face crops already (centre square, resized) or, after :func:`find_faces`, cropped by the
same code the scorer uses, so training and use see the same crops (images without a face are left
out). Training and evaluation classifiers should be
separate files trained on separate data: a model finetuned against a classifier learns that
classifier's blind spots, which the same classifier cannot see when it scores the result.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fair_core.classifiers.metadata import FaceCropSpec
from fair_core.classifiers.model import AttributeClassifier
from fair_core.faces import Face, FaceFinder, crop_face, crop_square
from fair_core.images import image_to_tensor, load_image
from fair_core.targets import DEFAULT_SCHEMA, Attribute

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
PATH_COLUMNS = ("file", "path", "image", "filename")
RACE_ALIASES = {
    "white": "White", "middle eastern": "White", "latino_hispanic": "White", "latino hispanic": "White",
    "black": "Black", "indian": "Indian", "asian": "Asian", "east asian": "Asian", "southeast asian": "Asian",
}
MISSING = -1


@dataclass
class LabelledImages:
    """Image paths with one class index per attribute (``-1`` = unknown).

    Attributes:
        paths: image files.
        labels: int64 ``(M, A)``, column ``a`` indexes ``attributes[a].classes``.
        attributes: the label columns.
        faces: the detected face of each image (:func:`find_faces`), or ``None`` when the images
            are face crops already.
    """

    paths: list[Path]
    labels: np.ndarray
    attributes: tuple[Attribute, ...]
    faces: list[Face] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: np.ndarray) -> "LabelledImages":
        faces = [self.faces[i] for i in index] if self.faces is not None else None
        return LabelledImages([self.paths[i] for i in index], self.labels[index], self.attributes, faces)

    def split(self, val_fraction: float, seed: int = 0) -> tuple["LabelledImages", "LabelledImages"]:
        """Random train/validation split (at least one image on each side)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"validation fraction must be between 0 and 1, got {val_fraction}")
        if len(self) < 2:
            raise ValueError(f"need at least 2 labelled images to split, found {len(self)}")
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = min(len(self) - 1, max(1, int(round(val_fraction * len(self)))))
        return self.subset(order[n_val:]), self.subset(order[:n_val])

    def class_counts(self) -> dict[str, dict[str, int]]:
        return {a.name: {c: int((self.labels[:, i] == k).sum()) for k, c in enumerate(a.classes)} for i, a in enumerate(self.attributes)}


# --------------------------------------------------------------------------- label sources
def read_labels(source: str | Path, attributes: Sequence[str] | None = None, image_root: str | Path | None = None,
                old_from: int = 40) -> LabelledImages:
    """Labelled images from a class folder, a CSV file or CelebA's ``list_attr_celeba.txt``."""
    source = Path(source)
    if source.is_dir():
        return read_folder(source, attributes[0] if attributes else None)
    if not source.is_file():
        raise FileNotFoundError(f"training data not found: {source}")
    if source.suffix.lower() == ".csv":
        return read_csv(source, attributes, image_root, old_from)
    if source.suffix.lower() == ".txt":
        return read_celeba(source, attributes, image_root)
    raise ValueError(f"{source}: training data must be a folder, a .csv or CelebA's list_attr_celeba.txt")


def read_folder(root: Path, attribute: str | None = None) -> LabelledImages:
    """``root/<class>/*`` images; the attribute is named or inferred from the schema's class names."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) < 2:
        raise ValueError(f"{root}: expected one sub-folder per class (at least two), found {[p.name for p in folders]}")
    attr = _folder_attribute([p.name for p in folders], attribute, root)
    paths, labels = [], []
    for folder in folders:
        index = _class_index(attr, folder.name, f"{root}/{folder.name}", old_from=40)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [[index]] * len(files)
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    return LabelledImages(paths, np.array(labels, dtype=np.int64), (attr,))


def _folder_attribute(names: list[str], attribute: str | None, root: Path) -> Attribute:
    lowered = {n.lower() for n in names}
    if attribute is None:
        matches = [a for a in DEFAULT_SCHEMA.values() if lowered <= {c.lower() for c in a.classes}]
        if not matches:
            raise ValueError(f"{root}: class folders {names} do not name a known attribute; pass --attributes NAME")
        return matches[0]
    if attribute in DEFAULT_SCHEMA and lowered <= {c.lower() for c in DEFAULT_SCHEMA[attribute].classes}:
        return DEFAULT_SCHEMA[attribute]
    return Attribute(attribute, tuple(names))


def read_csv(path: Path, attributes: Sequence[str] | None = None, image_root: str | Path | None = None,
             old_from: int = 40) -> LabelledImages:
    """A ``file,<attribute>,...`` CSV (FairFace layout included); empty cells are unknown labels."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = list(rows[0])
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise ValueError(f"{path}: needs a column named one of {PATH_COLUMNS} with image paths, found {columns}")
    names = list(attributes) if attributes else [c for c in columns if c in DEFAULT_SCHEMA]
    if not names:
        raise ValueError(f"{path}: no column named {', '.join(DEFAULT_SCHEMA)}; pass --attributes with the label columns")
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} not found (have {columns})")
    attrs = tuple(_csv_attribute(n, [r[n] for r in rows]) for n in names)
    root = Path(image_root) if image_root else path.parent
    labels = np.array([[_class_index(a, r[a.name], f"{path} row {i + 2}", old_from) for a in attrs] for i, r in enumerate(rows)], dtype=np.int64)
    return LabelledImages([root / r[path_column] for r in rows], labels, attrs)


def _csv_attribute(name: str, values: list[str]) -> Attribute:
    if name in DEFAULT_SCHEMA:
        return DEFAULT_SCHEMA[name]
    return Attribute(name, tuple(sorted({v.strip() for v in values if v.strip()})))


def read_celeba(path: Path, attributes: Sequence[str] | None = None, image_root: str | Path | None = None) -> LabelledImages:
    """CelebA ``list_attr_celeba.txt`` (count line, 40 names, ``file +-1 ...`` rows): Male -> gender, Young -> age."""
    lines = path.read_text().splitlines()
    header = lines[1].split() if len(lines) > 2 and lines[0].strip().isdigit() else []
    if "Male" not in header or "Young" not in header:
        raise ValueError(f"{path}: not a CelebA attribute file (line 1 = count, line 2 = attribute names with Male and Young)")
    wanted = list(attributes) if attributes else ["gender", "age"]
    source = {"gender": ("Male", ("female", "male")), "age": ("Young", ("old", "young"))}
    unknown = [w for w in wanted if w not in source]
    if unknown:
        raise ValueError(f"{path}: CelebA gives gender and age only, not {unknown}")
    root = Path(image_root) if image_root else (path.parent / "img_align_celeba" if (path.parent / "img_align_celeba").is_dir() else path.parent)
    paths, labels = [], []
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        values = dict(zip(header, parts[1:]))
        paths.append(root / parts[0])
        labels.append([DEFAULT_SCHEMA[w].index(source[w][1][values[source[w][0]] == "1"]) for w in wanted])
    return LabelledImages(paths, np.array(labels, dtype=np.int64), tuple(DEFAULT_SCHEMA[w] for w in wanted))


def _class_index(attribute: Attribute, raw: str, where: str, old_from: int) -> int:
    """Class index of a raw label: exact or case-insensitive class name, FairFace race/age forms; '' = unknown."""
    value = raw.strip()
    if not value:
        return MISSING
    lowered = {c.lower(): i for i, c in enumerate(attribute.classes)}
    if value.lower() in lowered:
        return lowered[value.lower()]
    if attribute == DEFAULT_SCHEMA["race"] and value.lower() in RACE_ALIASES:
        return attribute.index(RACE_ALIASES[value.lower()])
    if attribute == DEFAULT_SCHEMA["age"] and re.match(r"^\D*(\d+)", value):
        first_year = int(re.match(r"^\D*(\d+)", value).group(1))
        return attribute.index("old" if first_year >= old_from else "young")
    raise ValueError(f"{where}: label {raw!r} is not a class of {attribute.name!r} ({', '.join(attribute.classes)})")


# --------------------------------------------------------------------------- images
def find_faces(items: LabelledImages, finder: FaceFinder, progress: bool = True) -> LabelledImages:
    """Detect the largest face of every image once; returns the images that have one, with their faces.

    Boxes are in image pixels; landmarks are set when the finder has a landmarker.
    """
    keep, faces = [], []
    for index, path in enumerate(tqdm(items.paths, desc="detecting faces", disable=not progress)):
        face = finder.find(load_image(path)).face
        if face is not None:
            keep.append(index)
            faces.append(face)
    found = items.subset(np.array(keep, dtype=np.int64))
    found.faces = faces
    return found


class CropDataset(Dataset):
    """Labelled images as classifier inputs ``(3, size, size)`` in [-1, 1] and labels ``(A,)``.

    Images with a detected face (``items.faces``) are cropped per ``crop`` as the scorer does it;
    otherwise an image is taken as a face crop already (centre square, resized).
    """

    def __init__(self, items: LabelledImages, size: int, crop: FaceCropSpec):
        self.items, self.size, self.crop = items, int(size), crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.items.paths[index])
        labels = torch.from_numpy(self.items.labels[index].copy())
        tensor = image_to_tensor(image)
        if self.items.faces is not None:
            return crop_face(tensor, self.items.faces[index], self.crop, self.size), labels
        height, width = image.shape[:2]
        side = min(height, width)
        return crop_square(tensor, ((width - side) // 2, (height - side) // 2, side), self.size), labels


def augment(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip, scale 0.9-1.1, shift +-6 %, rotation +-10 degrees, brightness/contrast +-20 %."""
    n = crops.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(crops)

    angle, scale = uniform(-math.pi / 18, math.pi / 18), uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(crops)
    theta = torch.zeros(n, 2, 3, dtype=crops.dtype, device=crops.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale * flip, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale * flip, torch.cos(angle) / scale
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-0.12, 0.12), uniform(-0.12, 0.12)
    grid = F.affine_grid(theta, list(crops.shape), align_corners=False)
    moved = F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (moved - mean) * uniform(0.8, 1.2).view(-1, 1, 1, 1) + mean + uniform(-0.2, 0.2).view(-1, 1, 1, 1)
    return jittered.clamp(-1, 1)


# --------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Classifier training settings (``fair classifier train`` flags of the same names)."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    augment: bool = True
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass
class TrainResult:
    """The best-validation classifier, its validation report and the per-epoch history."""

    classifier: AttributeClassifier
    report: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor, classifier: AttributeClassifier) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over labelled rows (label -1 ignored)."""
    total = logits.new_zeros(())
    for column, part in enumerate(classifier.split(logits)):
        target = labels[:, column]
        if (target != MISSING).any():
            total = total + F.cross_entropy(part, target, ignore_index=MISSING)
    return total


def train_classifier(classifier: AttributeClassifier, train: Dataset, val: Dataset, config: TrainConfig = TrainConfig()) -> TrainResult:
    """AdamW with a cosine schedule; keeps the weights of the epoch with the best mean validation accuracy."""
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs and batch size must be at least 1, got {config.epochs} and {config.batch_size}")
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else ("cpu" if config.device == "auto" else config.device))
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, num_workers=config.workers, generator=generator, drop_last=len(train) > config.batch_size)
    model = classifier.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * len(loader)))
    best_state, best_score, best_report, history = None, -1.0, {}, []
    for epoch in range(config.epochs):
        model.train()
        losses = []
        for crops, labels in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress, leave=False):
            crops, labels = crops.to(device), labels.to(device)
            if config.augment:
                crops = augment(crops, generator)
            loss = attribute_loss(model(crops), labels, model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        report = evaluate(model, val, config.batch_size, config.workers)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else math.nan, "val_accuracy": report["mean_accuracy"]})
        if config.progress:
            tqdm.write(f"epoch {epoch + 1}: loss {history[-1]['loss']:.4f}, validation accuracy {report['mean_accuracy']:.3f}")
        if report["mean_accuracy"] > best_score:
            best_score, best_report, best_state = report["mean_accuracy"], report, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return TrainResult(model.eval(), best_report, history)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(classifier: AttributeClassifier, data: Dataset, batch_size: int = 64, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices and true labels, both int64 ``(M, A)``."""
    device = next(classifier.parameters()).device
    classifier.eval()
    predictions, labels = [], []
    for crops, target in DataLoader(data, batch_size=batch_size, num_workers=workers):
        parts = classifier.split(classifier(crops.to(device)))
        predictions.append(torch.stack([p.argmax(dim=-1) for p in parts], dim=1).cpu())
        labels.append(target)
    return torch.cat(predictions).numpy(), torch.cat(labels).numpy()


def evaluate(classifier: AttributeClassifier, data: Dataset, batch_size: int = 64, workers: int = 0) -> dict[str, Any]:
    """Validation report: per attribute accuracy, per-class accuracy and confusion matrix; per group."""
    predictions, labels = predict(classifier, data, batch_size, workers)
    return accuracy_report(predictions, labels, classifier.spec.attributes)


def accuracy_report(predictions: np.ndarray, labels: np.ndarray, attributes: Sequence[Attribute]) -> dict[str, Any]:
    """JSON-ready report from predicted and true class indices ``(M, A)`` (labels -1 are skipped).

    ``per_group[a][b][class]``: accuracy on attribute ``a`` over the images whose true ``b`` is
    ``class`` (e.g. gender accuracy on Black faces), the disparity a fair audit needs to know.
    """
    report: dict[str, Any] = {"attributes": {}, "per_group": {}, "unlabelled": int((labels == MISSING).all(axis=1).sum())}
    for i, attribute in enumerate(attributes):
        known = labels[:, i] != MISSING
        k = len(attribute.classes)
        confusion = np.bincount(labels[known, i] * k + predictions[known, i], minlength=k * k).reshape(k, k)
        rows = confusion.sum(axis=1)
        report["attributes"][attribute.name] = {
            "classes": list(attribute.classes),
            "count": int(known.sum()),
            "accuracy": float(np.trace(confusion) / max(1, known.sum())),
            "per_class_accuracy": {c: (float(confusion[j, j] / rows[j]) if rows[j] else None) for j, c in enumerate(attribute.classes)},
            "confusion": confusion.tolist(),
        }
        report["per_group"][attribute.name] = {
            other.name: _group_accuracy(predictions[:, i], labels[:, i], labels[:, j], other)
            for j, other in enumerate(attributes) if j != i
        }
    report["mean_accuracy"] = float(np.mean([a["accuracy"] for a in report["attributes"].values()]))
    return report


def _group_accuracy(predicted: np.ndarray, truth: np.ndarray, group: np.ndarray, attribute: Attribute) -> dict[str, Any]:
    result = {}
    for k, name in enumerate(attribute.classes):
        rows = (group == k) & (truth != MISSING)
        result[name] = {"count": int(rows.sum()), "accuracy": float((predicted[rows] == truth[rows]).mean()) if rows.any() else None}
    return result


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text of :func:`accuracy_report`."""
    lines = [f"mean validation accuracy: {report['mean_accuracy']:.3f}"]
    for name, data in report["attributes"].items():
        lines.append(f"\n{name}: accuracy {data['accuracy']:.3f} on {data['count']} images")
        width = max(len(c) for c in data["classes"]) + 2
        lines.append("  confusion (rows = true, columns = predicted):")
        lines.append(" " * (width + 2) + "".join(c.rjust(width) for c in data["classes"]))
        for cls, row in zip(data["classes"], data["confusion"]):
            accuracy = data["per_class_accuracy"][cls]
            lines.append(f"  {cls.ljust(width)}" + "".join(str(v).rjust(width) for v in row) + f"   acc {_fmt(accuracy)}")
        for other, groups in report["per_group"][name].items():
            parts = ", ".join(f"{g} {_fmt(v['accuracy'])} (n={v['count']})" for g, v in groups.items())
            lines.append(f"  accuracy by {other}: {parts}")
    if report.get("unlabelled"):
        lines.append(f"\n{report['unlabelled']} validation images had no label")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
