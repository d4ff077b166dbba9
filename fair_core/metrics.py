"""Bias metrics of generated images, with bootstrap confidence intervals.

Building blocks (numpy, vectorised over leading axes):

* :class:`Predictions` — classifier probabilities and face flags of the images of one prompt;
  ``.labels()`` gives argmax labels, ``-1`` (``NO_FACE``) for images without a face.
* :func:`joint_labels` — per-attribute labels to joint-class labels (row-major, the order of
  ``TargetDistribution.flat()``).
* :func:`class_frequencies` — class shares among images with a face.
* :func:`shen_bias` — Shen et al.'s bias: mean over unordered class pairs of ``|f_k - f_l|``
  (``|f_female - f_male|`` for two classes).
* :func:`total_variation` — distance to a (possibly non-uniform) target, ``0.5 * sum |f - t|``.
* :func:`amplification_ratio` — Hakemi et al.'s ``AR(k) = generated share / reference share``.
* :func:`face_rate`, :func:`uncertainty_rate` — reported beside the bias.
* :func:`bootstrap_ci`, :func:`paired_bootstrap_ci` — percentile intervals, resampling images within
  each prompt (paired: the same images, i.e. the same seeds, in both runs).

:func:`summarise_labels` (from labels) and :func:`summarise_bias` (from probabilities, adding the
uncertainty figures) compute everything per prompt and averaged over prompts into a :class:`BiasSummary`;
:func:`compare_bias` gives the paired change between two runs on the same seeds.
Averages over prompts weight every prompt with at least one face equally; prompts without any face
are skipped and listed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fair_core.targets import TargetDistribution

NO_FACE = -1
# Resampled label tables are built in chunks of about this many integers, to bound memory.
_CHUNK_ELEMENTS = 4_000_000

Statistic = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- per-image predictions
@dataclass
class Predictions:
    """Classifier output for the N images of one prompt.

    Attributes:
        probs: one float array ``(N, K_a)`` per attribute (softmax probabilities), in the order of the
            target's attributes. Rows of images without a face are ignored.
        has_face: bool ``(N,)``; False where no face was detected.
    """

    probs: list[np.ndarray]
    has_face: np.ndarray

    def __post_init__(self) -> None:
        self.probs = [np.asarray(p, dtype=np.float64) for p in self.probs]
        self.has_face = np.asarray(self.has_face)
        if not self.probs or any(p.ndim != 2 for p in self.probs):
            raise ValueError("Predictions.probs must be a non-empty list of (N, K_a) arrays")
        num_images = self.probs[0].shape[0]
        if any(p.shape[0] != num_images for p in self.probs):
            raise ValueError(f"all attributes need the same number of images, got {[p.shape for p in self.probs]}")
        if self.has_face.dtype != np.bool_ or self.has_face.shape != (num_images,):
            raise ValueError(f"has_face must be a bool array of shape ({num_images},), got "
                             f"{self.has_face.dtype} {self.has_face.shape}")
        if any(not np.all(np.isfinite(p[self.has_face])) for p in self.probs):
            raise ValueError("probabilities of images with a face must be finite")

    def labels(self) -> np.ndarray:
        """int64 ``(N, A)``: argmax class per attribute; ``NO_FACE`` (-1) on rows without a face."""
        labels = np.stack([p.argmax(axis=1) for p in self.probs], axis=1)
        return np.where(self.has_face[:, None], labels, NO_FACE)

    def uncertain(self, threshold: float = 0.8) -> np.ndarray:
        """bool ``(N, A)``: True where a face's top probability is below ``threshold`` (False without a face)."""
        return np.stack([p.max(axis=1) < threshold for p in self.probs], axis=1) & self.has_face[:, None]

    def check(self, target: TargetDistribution) -> "Predictions":
        """Return self after checking that the class counts match ``target``'s attributes."""
        sizes = tuple(p.shape[1] for p in self.probs)
        if sizes != target.class_sizes:
            raise ValueError(f"predictions have class sizes {sizes}, target {list(target.names)} needs {target.class_sizes}")
        return self


# ----------------------------------------------------------------------------- frequency statistics
def joint_labels(labels: np.ndarray, class_sizes: Sequence[int]) -> np.ndarray:
    """Joint-class index of per-attribute labels.

    Args:
        labels: int ``(..., A)``, class of each attribute, or -1 (no face).
        class_sizes: ``(K_1, ..., K_A)``.

    Returns:
        int64 ``(...)``: row-major index in ``[0, prod K_a)`` (the order of ``TargetDistribution.flat()``),
        -1 where any attribute is -1.
    """
    labels = np.asarray(labels)
    sizes = np.asarray(class_sizes, dtype=np.int64)
    if labels.shape[-1:] != sizes.shape:
        raise ValueError(f"labels have {labels.shape[-1:]} attributes, class_sizes {sizes.shape}")
    if np.any((labels < NO_FACE) | (labels >= sizes)):
        raise ValueError(f"labels must lie in [-1, K_a) for class sizes {sizes.tolist()}")
    strides = np.cumprod(np.r_[sizes[1:], 1][::-1])[::-1]
    joint = (labels * strides).sum(axis=-1)
    return np.where(np.any(labels < 0, axis=-1), NO_FACE, joint)


def class_frequencies(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class among the images with a face.

    Args:
        labels: int ``(..., N)``, class in ``[0, num_classes)`` or -1 (no face, not counted).
        num_classes: ``K``.

    Returns:
        float64 ``(..., K)`` summing to 1; NaN where no image has a face.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if np.any((labels < NO_FACE) | (labels >= num_classes)):
        raise ValueError(f"labels must lie in [-1, {num_classes})")
    rows = labels.reshape(-1, labels.shape[-1])
    offsets = np.arange(len(rows))[:, None] * num_classes
    valid = rows >= 0
    counts = np.bincount((rows + offsets)[valid], minlength=len(rows) * num_classes)
    counts = counts.reshape(*labels.shape[:-1], num_classes)
    with np.errstate(invalid="ignore"):
        return counts / counts.sum(axis=-1, keepdims=True)


def shen_bias(frequencies: np.ndarray) -> np.ndarray:
    """Shen et al.'s bias: mean over the ``K(K-1)/2`` unordered class pairs of ``|f_k - f_l|``.

    0 for a uniform split, ``2/K`` when all images fall in one class. ``frequencies``: ``(..., K)``;
    returns ``(...)``.

    Computed on sampled frequencies it is biased upward near a fair split (by about its own sampling
    noise, ``O(1/sqrt(N))``), so the percentile interval of a near-fair model can lie above the estimate
    and miss the true value 0; use the paired change (:func:`compare_bias`) to compare runs there.
    """
    f = np.asarray(frequencies, dtype=np.float64)
    k = f.shape[-1]
    if k < 2:
        raise ValueError("shen_bias needs at least two classes")
    return np.abs(f[..., :, None] - f[..., None, :]).sum(axis=(-2, -1)) / (k * (k - 1))


def total_variation(frequencies: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Total-variation distance ``0.5 * sum_k |f_k - t_k|`` in ``[0, 1]``; ``(..., K)``, ``(K,)`` -> ``(...)``."""
    f, t = np.asarray(frequencies, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if t.shape != f.shape[-1:]:
        raise ValueError(f"target has shape {t.shape}, frequencies have {f.shape[-1]} classes")
    return 0.5 * np.abs(f - t).sum(axis=-1)


def amplification_ratio(frequencies: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Hakemi et al.'s amplification ratio per class, ``AR(k) = f_k / r_k``; ``(..., K)`` -> ``(..., K)``.

    ``AR < 1`` for a minority class means the generator under-produces it relative to the reference
    (e.g. its training data); ``inf`` where the reference share is 0.
    """
    f, r = np.asarray(frequencies, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if r.shape != f.shape[-1:]:
        raise ValueError(f"reference has shape {r.shape}, frequencies have {f.shape[-1]} classes")
    with np.errstate(divide="ignore", invalid="ignore"):
        return f / r


def face_rate(labels: np.ndarray) -> np.ndarray:
    """Fraction of images with a face; ``labels`` ``(..., N)`` with -1 for no face -> ``(...)``."""
    return (np.asarray(labels) != NO_FACE).mean(axis=-1)


def uncertainty_rate(probs: np.ndarray, has_face: np.ndarray | None = None, threshold: float = 0.8) -> float:
    """Fraction of faces whose top class probability is below ``threshold``; ``probs`` ``(N, K)``. NaN if no face."""
    top = np.asarray(probs, dtype=np.float64).max(axis=1)
    if has_face is not None:
        top = top[np.asarray(has_face, dtype=bool)]
    return float((top < threshold).mean()) if len(top) else math.nan


# ----------------------------------------------------------------------------- bootstrap
@dataclass
class Interval:
    """A point estimate with a bootstrap percentile interval; scalars, or arrays of the same shape."""

    estimate: Any
    low: Any
    high: Any

    def to_json(self) -> dict[str, Any]:
        return {"estimate": _json_number(self.estimate), "low": _json_number(self.low), "high": _json_number(self.high)}

    def __str__(self) -> str:
        def text(value: Any) -> str:
            return np.array2string(np.asarray(value), precision=3) if np.ndim(value) else f"{value:.3f}"

        return f"{text(self.estimate)} [{text(self.low)}, {text(self.high)}]"


def bootstrap_ci(
    statistic: Statistic,
    samples: np.ndarray | Sequence[np.ndarray],
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of a statistic, resampling rows (images) with replacement.

    Args:
        statistic: vectorised over a leading batch axis: maps ``(B, n, *row)`` to ``(B, *out)``, e.g.
            ``lambda x: shen_bias(class_frequencies(x, 2))`` for labels of shape ``(n,)``. NaN results
            (e.g. a resample without faces) are left out.
        samples: one array ``(n, *row)``, or a sequence of them (one per prompt): then the interval is
            of the mean of the statistic over prompts, each prompt's images resampled independently.
        num_resamples: number of bootstrap resamples.
        level: coverage of the interval, e.g. 0.95.
        seed: seeds the ``numpy.random.Generator``.
    """
    _check_bootstrap_args(num_resamples, level)
    single = isinstance(samples, np.ndarray)
    rng = np.random.default_rng(seed)
    runs = [_replicates(lambda x: {"value": statistic(x)}, np.asarray(s), num_resamples, rng)
            for s in ([samples] if single else samples)]
    if not runs:
        raise ValueError("bootstrap_ci needs at least one sample")
    estimates = np.stack([e["value"] for e, _ in runs])
    replicates = np.stack([r["value"] for _, r in runs], axis=1)
    return _interval(_nanmean(estimates, 0), _nanmean(replicates, 1), level)


def paired_bootstrap_ci(
    statistic: Statistic,
    before: np.ndarray | Sequence[np.ndarray],
    after: np.ndarray | Sequence[np.ndarray],
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Interval of the change ``statistic(after) - statistic(before)`` between two runs on the same seeds.

    Row i of ``before`` and of ``after`` come from the same seed; a resample draws the same rows in
    both runs, so the variation shared by the two runs cancels. Arguments as in :func:`bootstrap_ci`
    (``before`` and ``after`` of equal shapes, per prompt when sequences).
    """
    if isinstance(before, np.ndarray):
        return bootstrap_ci(_paired(statistic), _stack_pair(before, after), num_resamples, level, seed)
    if len(before) != len(after):
        raise ValueError(f"paired runs need the same prompts: {len(before)} and {len(after)} samples")
    pairs = [_stack_pair(b, a) for b, a in zip(before, after)]
    return bootstrap_ci(_paired(statistic), pairs, num_resamples, level, seed)


def _paired(statistic: Callable) -> Callable:
    """``statistic`` of the 'after' half minus that of the 'before' half of ``(B, n, 2, *row)``."""

    def change(x: np.ndarray) -> Any:
        before, after = statistic(x[:, :, 0]), statistic(x[:, :, 1])
        if isinstance(after, dict):
            return {key: after[key] - before[key] for key in after}
        return after - before

    return change


def _stack_pair(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"paired runs need the same images (seeds): shapes {before.shape} and {after.shape}")
    return np.stack([before, after], axis=1)


def _replicates(
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]], sample: np.ndarray, num_resamples: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Statistic of the sample and of ``num_resamples`` row resamples: ``({k: (*out)}, {k: (R, *out)})``."""
    if sample.ndim == 0 or len(sample) == 0:
        raise ValueError(f"a bootstrap sample needs at least one row, got shape {sample.shape}")
    n = len(sample)
    estimate = {key: value[0] for key, value in statistic(sample[None]).items()}
    chunk = max(1, _CHUNK_ELEMENTS // sample.size)
    parts = [statistic(sample[rng.integers(0, n, size=(min(chunk, num_resamples - start), n))])
             for start in range(0, num_resamples, chunk)]
    return estimate, {key: np.concatenate([p[key] for p in parts]) for key in estimate}


def _interval(estimate: np.ndarray, replicates: np.ndarray, level: float) -> Interval:
    tail = 100.0 * (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, which is what we want
        low, high = np.nanpercentile(replicates, [tail, 100.0 - tail], axis=0)
    return Interval(_scalar(estimate), _scalar(low), _scalar(high))


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _check_bootstrap_args(num_resamples: int, level: float) -> None:
    if int(num_resamples) != num_resamples or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer, got {num_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


# ----------------------------------------------------------------------------- report
@dataclass
class GroupFigures:
    """Figures of one class group: a single attribute, or the joint classes of all attributes.

    Attributes:
        classes: class labels (joint classes read ``"female,Asian"``).
        target: target shares ``(K,)`` the distance is measured to.
        frequencies: class shares among faces ``(K,)``.
        bias: :func:`shen_bias` of the frequencies.
        distance: :func:`total_variation` to ``target``.
        amplification: :func:`amplification_ratio` to the reference ``(K,)``; None without a reference.
    """

    classes: tuple[str, ...]
    target: np.ndarray
    frequencies: Interval
    bias: Interval
    distance: Interval
    amplification: Interval | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"classes": list(self.classes), "target": _json_number(self.target)}
        for name in ("frequencies", "bias", "distance", "amplification"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value.to_json()
        return data


@dataclass
class Figures:
    """All figures of one prompt, or their mean over prompts.

    Attributes:
        num_images: images (summed over prompts for the mean; per run for a change).
        num_faces: images with a face (summed over prompts for the mean; after - before for a change).
        face_rate: :func:`face_rate`.
        uncertainty: per attribute, the fraction of faces whose top probability is below the threshold
            (empty when only labels were given).
        groups: per group name (an attribute name, or ``"gender x race"`` for the joint classes).
    """

    num_images: int
    num_faces: int
    face_rate: Interval
    uncertainty: dict[str, Interval]
    groups: dict[str, GroupFigures]

    def to_json(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_faces": self.num_faces,
            "face_rate": self.face_rate.to_json(),
            "uncertainty": {name: value.to_json() for name, value in self.uncertainty.items()},
            "groups": {name: group.to_json() for name, group in self.groups.items()},
        }


@dataclass
class BiasSummary:
    """Bias of a set of prompts (:func:`summarise_labels`) or its paired change between runs (:func:`compare_bias`).

    Attributes:
        overall: means over the prompts with a face (face rate: over all prompts).
        prompts: figures of each prompt.
        prompts_without_faces: prompts left out of the means because no image had a face.
        level, num_resamples, seed: of the bootstrap intervals.
        change: True when every figure (and ``num_faces``) is ``after - before``.
    """

    overall: Figures
    prompts: dict[str, Figures]
    prompts_without_faces: list[str]
    level: float
    num_resamples: int
    seed: int
    change: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "change (after - before)" if self.change else "summary",
            "bootstrap": {"level": self.level, "num_resamples": self.num_resamples, "seed": self.seed},
            "overall": self.overall.to_json(),
            "prompts": {prompt: figures.to_json() for prompt, figures in self.prompts.items()},
            "prompts_without_faces": list(self.prompts_without_faces),
        }

    def describe(self) -> str:
        """A few human-readable lines: the overall figures with their intervals."""
        head = "change after - before" if self.change else "bias"
        lines = [
            f"{head} over {len(self.prompts)} prompts ({len(self.prompts_without_faces)} without faces), "
            f"{self.overall.num_images} images, {self.overall.num_faces} faces; {100 * self.level:.0f}% intervals",
            f"  face rate {self.overall.face_rate}",
        ]
        lines += [f"  uncertain {name} {value}" for name, value in self.overall.uncertainty.items()]
        lines += [f"  {name}: bias {g.bias}, distance to target {g.distance}" for name, g in self.overall.groups.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Group:
    name: str
    classes: tuple[str, ...]
    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    target: np.ndarray
    reference: np.ndarray | None = None


def summarise_labels(
    labels: Sequence[np.ndarray],
    has_face: Sequence[np.ndarray] | None,
    target: TargetDistribution,
    prompts: Sequence[str] | None = None,
    uncertain: Sequence[np.ndarray] | None = None,
    reference: TargetDistribution | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BiasSummary:
    """Bias figures per prompt and averaged over prompts, with bootstrap intervals, from predicted labels.

    Groups: every attribute of ``target`` alone and, with two or more attributes, their joint classes.

    Args:
        labels: per prompt, int ``(N_p, A)`` predicted classes of ``target``'s attributes (-1 = no face).
        has_face: per prompt, bool ``(N_p,)``; rows where it is False are not counted. ``None``: only
            rows holding -1 lack a face.
        target: the wanted distribution; distances are measured to its marginals / joint table.
        prompts: prompt texts naming the per-prompt figures (default ``"prompt 0"``, ...).
        uncertain: per prompt, bool ``(N_p, A)``, True where the classifier's top probability was below
            the threshold; without it the uncertainty figures are left out.
        reference: optional reference distribution (e.g. of the training data) for the amplification
            ratio (overall: prompt-averaged share / reference share) of the groups whose attributes it covers (the joint group only if it holds all of
            ``target``'s attributes in the same order).
        num_resamples, level, seed: of the percentile bootstrap (images resampled within each prompt).
    """
    names = _prompt_names(prompts, len(labels))
    for what, per_prompt in (("has_face", has_face), ("uncertain", uncertain)):
        if per_prompt is not None and len(per_prompt) != len(labels):
            raise ValueError(f"{what} has {len(per_prompt)} entries for {len(labels)} prompts")
    tables = {name: _table(labels[i], None if has_face is None else has_face[i], None if uncertain is None else uncertain[i], target)
              for i, name in enumerate(names)}
    groups = _groups(target, reference)
    return _summarise(lambda x: _figures(x, groups), tables, groups, num_resamples, level, seed, change=False)


def summarise_bias(
    predictions: Mapping[str, Predictions],
    target: TargetDistribution,
    reference: TargetDistribution | None = None,
    uncertainty_threshold: float = 0.8,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BiasSummary:
    """:func:`summarise_labels` from classifier probabilities, with the uncertainty figures.

    Args:
        predictions: per prompt text, the :class:`Predictions` of its images (attributes in ``target`` order).
        uncertainty_threshold: a face is "uncertain" for an attribute when its top probability is below it.
        Other arguments as in :func:`summarise_labels`.
    """
    _check_prompts(predictions)
    values = [p.check(target) for p in predictions.values()]
    return summarise_labels([p.labels() for p in values], None, target, list(predictions),
                            [p.uncertain(uncertainty_threshold) for p in values], reference, num_resamples, level, seed)


def compare_bias(
    before: Mapping[str, Predictions],
    after: Mapping[str, Predictions],
    target: TargetDistribution,
    reference: TargetDistribution | None = None,
    uncertainty_threshold: float = 0.8,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BiasSummary:
    """Paired change ``after - before`` of every figure of :func:`summarise_bias`.

    Both runs must hold the same prompts and, per prompt, the same seeds in the same order (image i of
    ``before`` and of ``after`` come from the same noise). A prompt without faces in either run is
    left out of the means.
    """
    _check_prompts(before)
    if set(before) != set(after):
        raise ValueError(f"before and after need the same prompts; differing: {sorted(set(before) ^ set(after))}")

    def table(p: Predictions) -> np.ndarray:
        return _table(p.check(target).labels(), None, p.uncertain(uncertainty_threshold), target)

    tables = {prompt: _stack_pair(table(before[prompt]), table(after[prompt])) for prompt in before}
    groups = _groups(target, reference)
    return _summarise(_paired(lambda x: _figures(x, groups)), tables, groups, num_resamples, level, seed, change=True)


def _check_prompts(predictions: Mapping[str, Predictions]) -> None:
    if not predictions:
        raise ValueError("no prompts to summarise")


def _prompt_names(prompts: Sequence[str] | None, count: int) -> list[str]:
    if count == 0:
        raise ValueError("no prompts to summarise")
    names = [f"prompt {i}" for i in range(count)] if prompts is None else [str(p) for p in prompts]
    if len(names) != count or len(set(names)) != count:
        raise ValueError(f"need {count} distinct prompt names, got {len(names)} ({len(set(names))} distinct)")
    return names


def _groups(target: TargetDistribution, reference: TargetDistribution | None) -> list[_Group]:
    groups = []
    for axis, attribute in enumerate(target.attributes):
        covered = reference is not None and attribute.name in reference.names
        groups.append(_Group(attribute.name, attribute.classes, (axis,), (len(attribute.classes),),
                             target.marginal(attribute.name), reference.marginal(attribute.name) if covered else None))
    if len(target.attributes) > 1:
        covered = reference is not None and reference.names == target.names
        groups.append(_Group(" x ".join(target.names), tuple(",".join(c) for c in target.joint_labels()),
                             tuple(range(len(target.attributes))), target.class_sizes, target.flat(),
                             reference.flat() if covered else None))
    return groups


def _table(labels: np.ndarray, has_face: np.ndarray | None, uncertain: np.ndarray | None, target: TargetDistribution) -> np.ndarray:
    """int64 ``(N, A)`` labels, or ``(N, 2A)`` labels then 0/1 uncertainty flags; -1 where there is no face."""
    labels = np.asarray(labels)
    num_attributes = len(target.attributes)
    if labels.ndim != 2 or labels.shape[1] != num_attributes or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape (N, {num_attributes}) for {list(target.names)}, got "
                         f"{labels.dtype} {labels.shape}")
    if np.any((labels < NO_FACE) | (labels >= np.asarray(target.class_sizes))):
        raise ValueError(f"labels must lie in [-1, K_a) for class sizes {target.class_sizes}")
    face = np.all(labels != NO_FACE, axis=1)
    if has_face is not None:
        has_face = np.asarray(has_face)
        if has_face.dtype != np.bool_ or has_face.shape != face.shape:
            raise ValueError(f"has_face must be a bool array of shape {face.shape}, got {has_face.dtype} {has_face.shape}")
        face &= has_face
    columns = [labels]
    if uncertain is not None:
        uncertain = np.asarray(uncertain)
        if uncertain.shape != labels.shape:
            raise ValueError(f"uncertain must have the shape of labels {labels.shape}, got {uncertain.shape}")
        columns.append(uncertain.astype(np.int64))
    return np.where(face[:, None], np.concatenate(columns, axis=1), NO_FACE)


def _figures(table: np.ndarray, groups: Sequence[_Group]) -> dict[str, np.ndarray]:
    """Every figure of a batch of label tables ``(B, N, A)`` or ``(B, N, 2A)``, each of shape ``(B, ...)``."""
    num_attributes = sum(len(g.axes) == 1 for g in groups)
    labels = table[..., :num_attributes]
    figures = {"num_faces": (labels[..., 0] != NO_FACE).sum(axis=-1), "face_rate": face_rate(labels[..., 0])}
    for group in groups:
        if len(group.axes) == 1 and table.shape[-1] > num_attributes:
            flags = table[..., num_attributes + group.axes[0]]
            figures[f"uncertainty/{group.name}"] = class_frequencies(flags, 2)[..., 1]
        frequencies = class_frequencies(joint_labels(labels[..., group.axes], group.sizes), len(group.classes))
        figures[f"{group.name}/frequencies"] = frequencies
        figures[f"{group.name}/bias"] = shen_bias(frequencies)
        figures[f"{group.name}/distance"] = total_variation(frequencies, group.target)
        if group.reference is not None:
            figures[f"{group.name}/amplification"] = amplification_ratio(frequencies, group.reference)
    return figures


def _summarise(
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]],
    tables: Mapping[str, np.ndarray],
    groups: Sequence[_Group],
    num_resamples: int,
    level: float,
    seed: int,
    change: bool,
) -> BiasSummary:
    _check_bootstrap_args(num_resamples, level)
    rng = np.random.default_rng(seed)
    runs = {prompt: _replicates(statistic, table, num_resamples, rng) for prompt, table in tables.items()}
    # A prompt without faces (in either run) has NaN figures and drops out of the means below.
    without_faces = [p for p, (estimate, _) in runs.items() if np.isnan(estimate[f"{groups[0].name}/bias"])]
    prompts = {
        prompt: _assemble({k: _interval(v, replicates[k], level) for k, v in estimate.items()},
                          len(tables[prompt]), int(estimate["num_faces"]), groups)
        for prompt, (estimate, replicates) in runs.items()
    }
    means = {
        key: _interval(_nanmean(np.stack([e[key] for e, _ in runs.values()]), 0),
                       _nanmean(np.stack([r[key] for _, r in runs.values()], axis=1), 1), level)
        for key in next(iter(runs.values()))[0]
    }
    overall = _assemble(means, sum(f.num_images for f in prompts.values()),
                        sum(f.num_faces for f in prompts.values()), groups)
    return BiasSummary(overall, prompts, without_faces, level, num_resamples, seed, change)


def _assemble(intervals: dict[str, Interval], num_images: int, num_faces: int, groups: Sequence[_Group]) -> Figures:
    return Figures(
        num_images=num_images,
        num_faces=num_faces,
        face_rate=intervals["face_rate"],
        uncertainty={g.name: intervals[f"uncertainty/{g.name}"] for g in groups if f"uncertainty/{g.name}" in intervals},
        groups={
            g.name: GroupFigures(g.classes, g.target, intervals[f"{g.name}/frequencies"], intervals[f"{g.name}/bias"],
                                 intervals[f"{g.name}/distance"], intervals.get(f"{g.name}/amplification"))
            for g in groups
        },
    )


def _scalar(value: np.ndarray) -> Any:
    value = np.asarray(value, dtype=np.float64)
    return float(value) if value.ndim == 0 else value


def _json_number(value: Any) -> Any:
    """Floats and lists of floats for JSON; NaN and infinities become None."""
    if np.ndim(value) > 0:
        return [_json_number(v) for v in np.asarray(value).tolist()]
    value = float(value)
    return value if math.isfinite(value) else None
