"""Distributional alignment: optimal-transport target assignment over a batch, and the DAL loss.

Shen et al. (ICLR 2024, §1 of ``reference/method-shen2024.md``). For the N images of one prompt, the
attribute classifier gives per-attribute probabilities ``p_i^a``. The attributes are treated jointly:
joint class ``j`` (row-major over ``target.class_sizes``, the order of ``TargetDistribution.flat()``) is
one combination such as (female, Asian). Each image is matched to a joint class so that the batch as a
whole follows the target distribution ``D``:

1. cost ``C[i, j] = sqrt(sum_a ||p_i^a - onehot_a(j)||^2)``;
2. draw ``S`` count vectors ``b ~ Multinomial(M, D)``, ``M`` = number of images with a face;
3. for each ``b``, solve the exact assignment of the ``M`` images to the ``M`` class slots (``b_j`` slots
   of class ``j``) with minimal total cost;
4. average the ``S`` 0/1 plans into a soft target ``q_i`` over joint classes, marginalise it per
   attribute, and keep ``argmax`` as the image's target where ``max >= C`` (0.8).

The joint assignment is what controls intersectional balance: independent per-attribute assignments
can meet every marginal while pairing all women with one race.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from fair_core.targets import TargetDistribution

NO_TARGET = -1
_ROW_SUM_TOLERANCE = 1e-4  # float32 softmax rows sum to 1 only within ~1e-7 * K


@dataclass
class AlignmentTargets:
    """Result of :func:`assign_targets` for a batch of N images over A attributes and J joint classes.

    Attributes:
        labels: int64 ``(N, A)``; the target class of each attribute, or ``NO_TARGET`` (-1) where the
            image has no face or the assignment is not confident enough.
        confidence: float64 ``(N, A)`` in ``[0, 1]``; ``max_k q_i^a(k)``, the fraction of sampled count
            vectors in which image i went to its target class of attribute a (0 for images without face).
        plan: float64 ``(N, J)``; the averaged soft assignment ``q_i`` over joint classes. Rows of images
            with a face sum to 1; rows of images without a face are 0.
    """

    labels: np.ndarray
    confidence: np.ndarray
    plan: np.ndarray


def assignment_cost(probs: Sequence[np.ndarray], target: TargetDistribution) -> np.ndarray:
    """Cost of sending each image to each joint class.

    Args:
        probs: one float array ``(N, K_a)`` per attribute of ``target.attributes``, rows on the simplex.
        target: defines the attributes and the joint-class order.

    Returns:
        float64 ``(N, J)``: ``sqrt(sum_a ||p_i^a - onehot_a(j)||^2)``, the Euclidean distance between the
        concatenated probabilities and the concatenated one-hot vectors of joint class ``j``.
    """
    table = target.joint_index_table()
    squared = np.zeros((len(probs[0]), len(table)))
    for a, p in enumerate(np.asarray(p, dtype=np.float64) for p in probs):
        # ||p - e_k||^2 = ||p||^2 - 2 p_k + 1, for every class k of attribute a: (N, K_a)
        per_class = (p**2).sum(axis=1, keepdims=True) - 2.0 * p + 1.0
        squared += per_class[:, table[:, a]]
    return np.sqrt(np.maximum(squared, 0.0))


def assign_to_counts(cost: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of M images to classes with exactly ``counts[j]`` images in class j.

    Expands class j into ``counts[j]`` identical slots and solves the square ``M x M`` assignment
    problem exactly (``scipy.optimize.linear_sum_assignment``); this equals exact earth-mover transport
    with unit mass per image and integer class masses.

    Args:
        cost: float ``(M, J)``, cost of image i in class j.
        counts: non-negative integers ``(J,)`` summing to M.

    Returns:
        int64 ``(M,)``: the class of each image.
    """
    cost = np.asarray(cost, dtype=np.float64)
    counts = np.asarray(counts)
    if cost.ndim != 2 or counts.shape != (cost.shape[1],):
        raise ValueError(f"cost must be (M, J) and counts (J,), got {cost.shape} and {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0) or counts.sum() != cost.shape[0]:
        raise ValueError(f"counts must be non-negative integers summing to M={cost.shape[0]}, got {counts.tolist()}")
    slot_class = np.repeat(np.arange(cost.shape[1]), counts)
    rows, slots = linear_sum_assignment(cost[:, slot_class])
    assigned = np.empty(cost.shape[0], dtype=np.int64)
    assigned[rows] = slot_class[slots]
    return assigned


def assign_targets(
    probs: Sequence[np.ndarray],
    target: TargetDistribution,
    has_face: np.ndarray | None = None,
    num_samples: int = 100,
    confidence_threshold: float = 0.8,
    seed: int = 0,
) -> AlignmentTargets:
    """Optimal-transport target assignment of a batch to a target distribution (Shen et al., DAL).

    Call it on the *global* batch: in distributed training, gather the probabilities of all ranks and call
    it on every rank with the same ``seed``; the result is then identical everywhere.

    Args:
        probs: one array ``(N, K_a)`` per attribute of ``target.attributes``, in that order; softmax
            probabilities (rows of images with a face must be non-negative and sum to 1; rows of images
            without a face are ignored).
        target: the joint target distribution ``D``; its ``flat()`` order indexes the joint classes.
        has_face: bool ``(N,)``; images where it is False get no target. ``None`` means all have a face.
        num_samples: ``S``, the number of count vectors ``b ~ Multinomial(M, D)`` averaged.
        confidence_threshold: ``C``; a target is kept where its marginal soft assignment is ``>= C``.
        seed: seeds the ``numpy.random.Generator`` drawing the count vectors.

    Returns:
        :class:`AlignmentTargets` with ``labels`` ``(N, A)``, ``confidence`` ``(N, A)``, ``plan`` ``(N, J)``.
    """
    probs, has_face = _validate(probs, target, has_face, num_samples, confidence_threshold)
    num_images, num_attributes = len(has_face), len(target.attributes)
    labels = np.full((num_images, num_attributes), NO_TARGET, dtype=np.int64)
    confidence = np.zeros((num_images, num_attributes))
    plan = np.zeros((num_images, target.num_joint_classes))
    faces = np.flatnonzero(has_face)
    if len(faces) == 0:
        return AlignmentTargets(labels, confidence, plan)

    cost = assignment_cost([p[faces] for p in probs], target)
    rng = np.random.default_rng(seed)
    # Integer hit counts keep the marginal fractions exact (0.8 stays 0.8 for the threshold test).
    hits = np.zeros(cost.shape, dtype=np.int64)
    for counts in rng.multinomial(len(faces), target.flat(), size=num_samples):
        hits[np.arange(len(faces)), assign_to_counts(cost, counts)] += 1
    plan[faces] = hits / num_samples

    joint_hits = hits.reshape(len(faces), *target.class_sizes)
    for a in range(num_attributes):
        other_axes = tuple(1 + b for b in range(num_attributes) if b != a)
        marginal = joint_hits.sum(axis=other_axes) / num_samples  # (M, K_a)
        best = marginal.argmax(axis=1)
        confidence[faces, a] = marginal.max(axis=1)
        labels[faces, a] = np.where(confidence[faces, a] >= confidence_threshold, best, NO_TARGET)
    return AlignmentTargets(labels, confidence, plan)


def dal_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-image distributional alignment loss.

    Args:
        logits: one tensor ``(N, K_a)`` per attribute (classifier logits on the images' face crops).
            Rows without a target may hold anything, even NaN: they get no loss and no gradient.
        labels: int ``(N, A)`` targets from :func:`assign_targets` (``NO_TARGET`` = no term); a numpy
            array is accepted and moved to the logits' device.

    Returns:
        float32 ``(N,)``: ``sum_a CE(logits[a][i], labels[i, a])`` over attributes with a target, 0 where
        an image has none. Differentiable w.r.t. ``logits``; average or sum it as the trainer needs.
    """
    if len(logits) == 0:
        raise ValueError("dal_loss needs the logits of at least one attribute")
    labels = torch.as_tensor(labels, device=logits[0].device)
    num_images = logits[0].shape[0]
    if labels.dtype not in (torch.int64, torch.int32) or labels.shape != (num_images, len(logits)):
        raise ValueError(f"labels must be an integer tensor of shape ({num_images}, {len(logits)}), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    loss = torch.zeros(num_images, device=labels.device, dtype=torch.float32)
    for a, attribute_logits in enumerate(logits):
        if attribute_logits.ndim != 2 or attribute_logits.shape[0] != num_images:
            raise ValueError(f"logits of attribute {a} must be ({num_images}, K), got {tuple(attribute_logits.shape)}")
        target = labels[:, a].long()
        if bool(((target < NO_TARGET) | (target >= attribute_logits.shape[1])).any()):
            raise ValueError(f"labels of attribute {a} must lie in [-1, {attribute_logits.shape[1] - 1}]")
        rows = torch.nonzero(target != NO_TARGET).squeeze(1)
        # Select rows before the softmax so untargeted (possibly non-finite) rows stay out of the graph.
        ce = F.cross_entropy(attribute_logits[rows].float(), target[rows], reduction="none")
        loss = loss.index_add(0, rows, ce)
    return loss


def _validate(
    probs: Sequence[np.ndarray],
    target: TargetDistribution,
    has_face: np.ndarray | None,
    num_samples: int,
    confidence_threshold: float,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Check the inputs of :func:`assign_targets`; returns float64 probabilities and bool ``has_face``."""
    names = target.names
    if len(probs) != len(names):
        raise ValueError(f"expected probabilities for {len(names)} attributes {list(names)}, got {len(probs)}")
    arrays = [np.asarray(p, dtype=np.float64) for p in probs]
    if arrays[0].ndim != 2:
        raise ValueError(f"probabilities of {names[0]!r} must be a 2-D array (N, K), got shape {arrays[0].shape}")
    num_images = arrays[0].shape[0]
    has_face = np.ones(num_images, dtype=bool) if has_face is None else np.asarray(has_face)
    if has_face.dtype != np.bool_ or has_face.shape != (num_images,):
        raise ValueError(f"has_face must be a bool array of shape ({num_images},), got {has_face.dtype} {has_face.shape}")
    for name, size, p in zip(names, target.class_sizes, arrays):
        if p.shape != (num_images, size):
            raise ValueError(f"probabilities of {name!r} must have shape ({num_images}, {size}), got {p.shape}")
        rows = p[has_face]
        if not np.all(np.isfinite(rows)) or np.any(rows < 0):
            raise ValueError(f"probabilities of {name!r} must be finite and non-negative (images with a face)")
        bad = np.flatnonzero(np.abs(rows.sum(axis=1) - 1.0) > _ROW_SUM_TOLERANCE)
        if len(bad):
            raise ValueError(f"probabilities of {name!r} must sum to 1 per image; image {np.flatnonzero(has_face)[bad[0]]} "
                             f"sums to {rows[bad[0]].sum():.6g} (pass softmax probabilities, not logits)")
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must lie in [0, 1], got {confidence_threshold}")
    return arrays, has_face
