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

Steps 2-4 estimate ``q_i = E_b[T(b)]``. Where that expectation is cheap it is computed exactly instead
(``method="auto"``), as the official code does for its single-attribute runs: two joint classes by the
closed form (exp-1: rank by cost difference, binomial tail probabilities; here for any class share) and
a few thousand count vectors by enumeration weighted with their multinomial probabilities (exp-6). The
exact plan has no sampling noise; at ``S = 100`` sampling moves a binary image's confidence by up to
0.08 and a race image's by up to 0.15.

The joint assignment is what controls intersectional balance: independent per-attribute assignments
can meet every marginal while pairing all women with one race.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.stats import binom

from fair_core.targets import TargetDistribution

NO_TARGET = -1
ASSIGNMENT_METHODS = ("auto", "exact", "sampled")
MAX_ENUMERATED_COUNTS = 20_000  # count vectors solved by "auto" before it samples (race at N = 32: 6,545)
MAX_EXACT_COUNTS = 1_000_000  # "exact" refuses more (gender x race at N = 32: 15 million, hours per iteration)
_THRESHOLD_TOLERANCE = 1e-9  # summed plan entries are rounded: a marginal of 0.8 summed to 0.7999999999 stays 0.8
_ROW_SUM_TOLERANCE = 1e-4  # float32 softmax rows sum to 1 only within ~1e-7 * K


@dataclass
class AlignmentTargets:
    """Result of :func:`assign_targets` for a batch of N images over A attributes and J joint classes.

    Attributes:
        labels: int64 ``(N, A)``; the target class of each attribute, or ``NO_TARGET`` (-1) where the
            image has no face or the assignment is not confident enough.
        confidence: float64 ``(N, A)`` in ``[0, 1]``; ``max_k q_i^a(k)``, the probability (exact) or the
            fraction of sampled count vectors in which image i goes to its target class of attribute a
            (0 for images without face).
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


def binary_plan(cost: np.ndarray, share: float) -> np.ndarray:
    """Exact ``E_b[T(b)]`` for two classes, ``b_0 ~ Binomial(M, share)`` images in class 0.

    With ``k`` slots of class 0 the optimal plan sends the ``k`` images with the smallest
    ``cost[:, 0] - cost[:, 1]`` there (any other choice swaps to a cheaper one), so the image of rank
    ``r`` (0-based, ascending; ties by index) is in class 0 exactly when ``k > r``: ``q_i(0) = P(b_0 > r)``.
    For ``share = 0.5`` and the Euclidean cost this is the official exp-1 rule (rank by P(male)).

    Args:
        cost: float ``(M, 2)``.
        share: ``D_0``, the target probability of class 0.

    Returns:
        float64 ``(M, 2)``; rows sum to 1.
    """
    rank = np.empty(len(cost), dtype=np.int64)
    rank[np.argsort(cost[:, 0] - cost[:, 1], kind="stable")] = np.arange(len(cost))
    first = binom.sf(rank, len(cost), share)
    return np.stack([first, 1.0 - first], axis=1)


def count_vectors(total: int, distribution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every count vector ``b`` with ``sum b = total`` over the classes of non-zero probability.

    Returns:
        int64 ``(V, J)`` count vectors and float64 ``(V,)`` their ``Multinomial(total, distribution)``
        probabilities (summing to 1).
    """
    support = np.flatnonzero(distribution > 0)
    # stars and bars: J' - 1 bar positions among total + J' - 1 places
    bars = np.array(list(itertools.combinations(range(total + len(support) - 1), len(support) - 1)), dtype=np.int64)
    bars = bars.reshape(-1, len(support) - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), total + len(support) - 1)], axis=1)
    counts = np.zeros((len(bars), len(distribution)), dtype=np.int64)
    counts[:, support] = np.diff(edges, axis=1) - 1
    # exact integer multinomial coefficients: permuted vectors tie exactly, as in the official enumeration
    coefficients = np.array([math.factorial(total) // math.prod(math.factorial(c) for c in row) for row in counts.tolist()], dtype=np.float64)
    log_p = np.log(coefficients) + counts[:, support] @ np.log(distribution[support])
    probabilities = np.exp(log_p - log_p.max())
    return counts, probabilities / probabilities.sum()


def num_count_vectors(total: int, distribution: np.ndarray) -> int:
    """How many count vectors :func:`count_vectors` would enumerate: ``C(total + J' - 1, J' - 1)``."""
    support = int(np.count_nonzero(distribution > 0))
    return math.comb(total + support - 1, support - 1)


def enumerated_plan(cost: np.ndarray, distribution: np.ndarray, coverage: float = 1.0) -> np.ndarray:
    """``E_b[T(b)]`` by enumerating the count vectors, weighted by their multinomial probabilities.

    Args:
        cost: float ``(M, J)``.
        distribution: ``(J,)`` target probabilities ``D``.
        coverage: keep only the most probable vectors until this share of the probability is covered,
            renormalised (the official exp-6 uses 0.95; 1.0 is the exact expectation).

    Returns:
        float64 ``(M, J)``; rows sum to 1.
    """
    counts, probabilities = count_vectors(len(cost), distribution)
    if coverage < 1.0:
        order = np.flip(np.argsort(probabilities))  # the official order, ties included
        kept = order[: int(np.searchsorted(np.cumsum(probabilities[order]), coverage, side="right")) + 1]
        counts, probabilities = counts[kept], probabilities[kept] / probabilities[kept].sum()
    plan = np.zeros(cost.shape)
    rows = np.arange(len(cost))
    for b, probability in zip(counts, probabilities):
        plan[rows, assign_to_counts(cost, b)] += probability
    return plan


def sampled_plan(cost: np.ndarray, distribution: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Monte-Carlo ``E_b[T(b)]``: the mean of the plans of ``num_samples`` draws ``b ~ Multinomial(M, D)``.

    Returns:
        float64 ``(M, J)``, multiples of ``1 / num_samples``; rows sum to 1.
    """
    hits = np.zeros(cost.shape, dtype=np.int64)
    rows = np.arange(len(cost))
    for counts in rng.multinomial(len(cost), distribution, size=num_samples):
        hits[rows, assign_to_counts(cost, counts)] += 1
    return hits / num_samples


def resolve_method(method: str, num_images: int, distribution: np.ndarray) -> str:
    """``binary``, ``enumerated`` or ``sampled``: what ``method`` (:data:`ASSIGNMENT_METHODS`) computes for a
    batch of ``num_images`` faces and a target ``distribution`` ``(J,)``.

    ``exact`` always computes the expectation (binary closed form for two classes, else enumeration; an
    error beyond :data:`MAX_EXACT_COUNTS` vectors); ``auto`` does so where two classes or at most
    :data:`MAX_ENUMERATED_COUNTS` count vectors, and samples otherwise.
    """
    if method not in ASSIGNMENT_METHODS:
        raise ValueError(f"assignment method must be one of {ASSIGNMENT_METHODS}, got {method!r}")
    if method == "sampled":
        return "sampled"
    if len(distribution) == 2:
        return "binary"
    count = num_count_vectors(num_images, distribution)
    if method == "exact" and count > MAX_EXACT_COUNTS:
        raise ValueError(f"exact assignment of {num_images} images to {len(distribution)} classes means {count:,} "
                         f"count vectors per iteration; use assignment 'auto' or 'sampled'")
    return "enumerated" if method == "exact" or count <= MAX_ENUMERATED_COUNTS else "sampled"


def assign_targets(
    probs: Sequence[np.ndarray],
    target: TargetDistribution,
    has_face: np.ndarray | None = None,
    num_samples: int = 200,
    confidence_threshold: float = 0.8,
    seed: int = 0,
    method: str = "sampled",
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
        num_samples: ``S``, the number of count vectors ``b ~ Multinomial(M, D)`` averaged when sampling
            (the paper: 100 on each of 2 GPUs, 200 in all).
        confidence_threshold: ``C``; a target is kept where its marginal soft assignment is ``>= C``.
        seed: seeds the ``numpy.random.Generator`` drawing the count vectors.
        method: ``sampled`` (steps 2-4 of the module docstring), ``exact`` (the expectation over all count
            vectors) or ``auto`` (exact where cheap, see :func:`resolve_method`).

    Returns:
        :class:`AlignmentTargets` with ``labels`` ``(N, A)``, ``confidence`` ``(N, A)``, ``plan`` ``(N, J)``.
    """
    probs, has_face = _validate(probs, target, has_face, num_samples, confidence_threshold)
    num_images, num_attributes = len(has_face), len(target.attributes)
    labels = np.full((num_images, num_attributes), NO_TARGET, dtype=np.int64)
    confidence = np.zeros((num_images, num_attributes))
    plan = np.zeros((num_images, target.num_joint_classes))
    faces = np.flatnonzero(has_face)
    distribution = target.flat()
    kind = resolve_method(method, len(faces), distribution)
    if len(faces) == 0:
        return AlignmentTargets(labels, confidence, plan)

    cost = assignment_cost([p[faces] for p in probs], target)
    if kind == "binary":
        plan[faces] = binary_plan(cost, float(distribution[0]))
    elif kind == "enumerated":
        plan[faces] = enumerated_plan(cost, distribution)
    else:
        plan[faces] = sampled_plan(cost, distribution, num_samples, np.random.default_rng(seed))

    joint = plan[faces].reshape(len(faces), *target.class_sizes)
    for a in range(num_attributes):
        other_axes = tuple(1 + b for b in range(num_attributes) if b != a)
        marginal = joint.sum(axis=other_axes)  # (M, K_a)
        confidence[faces, a] = marginal.max(axis=1)
        labels[faces, a] = np.where(confidence[faces, a] >= confidence_threshold - _THRESHOLD_TOLERANCE, marginal.argmax(axis=1), NO_TARGET)
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
