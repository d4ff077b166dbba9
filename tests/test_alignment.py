"""OT target assignment and the DAL loss (fair_core.alignment) against brute force and hand-made cases."""

import itertools

import numpy as np
import pytest
import torch

from scipy.stats import binom

from fair_core.alignment import (
    NO_TARGET, assign_targets, assign_to_counts, assignment_cost, binary_plan, count_vectors, dal_loss, enumerated_plan,
    resolve_method, sampled_plan,
)
from fair_core.targets import Attribute, TargetDistribution

GENDER = Attribute("gender", ("female", "male"))
RACE2 = Attribute("race", ("White", "Black"))
RACE4 = Attribute("race", ("White", "Black", "Indian", "Asian"))


def random_probs(rng, n, sizes, concentration=0.5):
    return [rng.dirichlet(np.full(k, concentration), size=n) for k in sizes]


def confident(classes, k, peak=0.97):
    """One-hot-ish probabilities ``(len(classes), k)`` with ``peak`` on the given classes."""
    probs = np.full((len(classes), k), (1 - peak) / (k - 1))
    probs[np.arange(len(classes)), classes] = peak
    return probs


# ----------------------------------------------------------------------------- cost and one assignment
def test_cost_is_distance_between_concatenated_probabilities_and_one_hots():
    rng = np.random.default_rng(0)
    target = TargetDistribution.uniform([GENDER, RACE4])
    probs = random_probs(rng, 5, (2, 4))
    stacked = np.concatenate(probs, axis=1)
    one_hots = np.array([np.concatenate([np.eye(2)[g], np.eye(4)[r]]) for g, r in target.joint_index_table()])
    expected = np.linalg.norm(stacked[:, None, :] - one_hots[None, :, :], axis=-1)
    np.testing.assert_allclose(assignment_cost(probs, target), expected, atol=1e-12)


def test_assignment_matches_brute_force_on_random_small_instances():
    rng = np.random.default_rng(1)
    targets = [TargetDistribution.uniform([Attribute("c", tuple("abcd"[:k]))]) for k in (2, 3, 4)]
    targets.append(TargetDistribution.uniform([GENDER, RACE2]))  # 4 joint classes
    for instance in range(240):
        target = targets[instance % len(targets)]
        n = int(rng.integers(1, 8))
        probs = random_probs(rng, n, target.class_sizes, concentration=float(rng.choice([0.3, 1.0, 5.0])))
        cost = assignment_cost(probs, target)
        counts = rng.multinomial(n, rng.dirichlet(np.ones(target.num_joint_classes)))
        assigned = assign_to_counts(cost, counts)

        slots = np.repeat(np.arange(len(counts)), counts)
        every_assignment = np.array(sorted(set(itertools.permutations(slots))))  # (distinct, n)
        brute_force = cost[np.arange(n), every_assignment].sum(axis=1).min()
        assert cost[np.arange(n), assigned].sum() == pytest.approx(brute_force, abs=1e-9), instance
        np.testing.assert_array_equal(np.bincount(assigned, minlength=len(counts)), counts)


def test_confident_images_move_only_as_far_as_the_counts_require():
    """Own class costs ~0, any other ~1.37: the optimum moves exactly sum_j max(0, have_j - want_j) images."""
    target = TargetDistribution.uniform([RACE4])
    own = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    counts = np.array([2, 2, 2, 2])
    assigned = assign_to_counts(assignment_cost([confident(own, 4)], target), counts)
    np.testing.assert_array_equal(np.bincount(assigned, minlength=4), counts)
    have = np.bincount(own, minlength=4)
    assert int((assigned != own).sum()) == int(np.maximum(have - counts, 0).sum()) == 3
    assert set(np.flatnonzero(assigned != own)) <= {0, 1, 2, 3, 4}  # only surplus White images move


def test_single_sample_targets_have_exactly_the_drawn_counts():
    rng = np.random.default_rng(2)
    target = TargetDistribution.from_marginals([(GENDER, [0.3, 0.7]), (RACE4, [0.4, 0.3, 0.2, 0.1])])
    probs = random_probs(rng, 20, target.class_sizes)
    result = assign_targets(probs, target, num_samples=1, seed=5)
    counts = np.random.default_rng(5).multinomial(20, target.flat())
    joint = result.labels @ np.array([4, 1])  # row-major joint index
    np.testing.assert_array_equal(np.bincount(joint, minlength=8), counts)
    np.testing.assert_array_equal(result.confidence, 1.0)


def test_joint_assignment_controls_intersections_that_independent_assignments_miss():
    """Target: gender uniform x race uniform over {White, Black}, i.e. 1/4 for each of the four combinations.

    The batch: two confident White women and two confident Black men. Each attribute alone already has
    its marginal target counts (2 female / 2 male, 2 White / 2 Black), so independent per-attribute
    assignments change nothing and every woman stays White. The joint assignment with counts (1, 1, 1, 1)
    must produce one Black woman and one White man; marginalised, it changes the race of one woman and
    one man while keeping every gender and race marginal.
    """
    target = TargetDistribution.uniform([GENDER, RACE2])
    gender_probs, race_probs = confident([0, 0, 1, 1], 2), confident([0, 0, 1, 1], 2, peak=0.9)

    independent_gender = assign_to_counts(assignment_cost([gender_probs], TargetDistribution.uniform([GENDER])), np.array([2, 2]))
    independent_race = assign_to_counts(assignment_cost([race_probs], TargetDistribution.uniform([RACE2])), np.array([2, 2]))
    independent_joint = independent_gender * 2 + independent_race
    np.testing.assert_array_equal(np.bincount(independent_joint, minlength=4), [2, 0, 0, 2])

    joint = assign_to_counts(assignment_cost([gender_probs, race_probs], target), np.array([1, 1, 1, 1]))
    np.testing.assert_array_equal(np.bincount(joint, minlength=4), [1, 1, 1, 1])
    table = target.joint_index_table()
    np.testing.assert_array_equal(table[joint, 0], [0, 0, 1, 1])  # genders kept: the race is cheaper to move
    assert sorted(table[joint, 1][:2]) == [0, 1] and sorted(table[joint, 1][2:]) == [0, 1]


# ----------------------------------------------------------------------------- assign_targets
def test_plan_averages_the_sampled_counts_and_marginals_give_confidence():
    rng = np.random.default_rng(3)
    target = TargetDistribution.from_marginals([(GENDER, [0.5, 0.5]), (RACE4, [0.25] * 4)])
    probs = random_probs(rng, 16, target.class_sizes)
    result = assign_targets(probs, target, num_samples=40, seed=11)
    draws = np.random.default_rng(11).multinomial(16, target.flat(), size=40)
    np.testing.assert_allclose(result.plan.sum(axis=0), draws.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(result.plan.sum(axis=1), 1.0, atol=1e-12)
    table = target.joint_index_table()
    for a, size in enumerate(target.class_sizes):
        marginal = np.stack([result.plan[:, table[:, a] == k].sum(axis=1) for k in range(size)], axis=1)
        np.testing.assert_allclose(result.confidence[:, a], marginal.max(axis=1), atol=1e-12)
        kept = result.labels[:, a] != NO_TARGET
        np.testing.assert_array_equal(kept, marginal.max(axis=1) >= 0.8 - 1e-12)
        np.testing.assert_array_equal(result.labels[kept, a], marginal.argmax(axis=1)[kept])


def test_confidence_threshold_decides_which_targets_are_kept():
    rng = np.random.default_rng(4)
    target = TargetDistribution.uniform([GENDER, RACE4])
    probs = random_probs(rng, 24, target.class_sizes, concentration=1.0)
    everything = assign_targets(probs, target, confidence_threshold=0.0, seed=1)
    assert np.all(everything.labels >= 0)
    strict = assign_targets(probs, target, confidence_threshold=1.0, seed=1)
    np.testing.assert_array_equal(strict.labels >= 0, everything.confidence == 1.0)
    default = assign_targets(probs, target, seed=1)
    np.testing.assert_array_equal(default.labels >= 0, everything.confidence >= 0.8)
    assert 0 < (default.labels >= 0).sum() < default.labels.size  # the threshold actually splits this batch


def test_paper_threshold_leaves_a_dead_zone_that_a_lower_one_narrows():
    """24 crisp images, r of them male, uniform target: how many males are told to turn female. The sampled
    counts spread by +-2.4 images, so with C = 0.8 the first two surplus images never get a corrective target
    (a 14 / 10 batch, a lean of 0.08, teaches nothing); C = 0.6 corrects from the first or second. The demo
    relies on this (``DemoSettings.confidence_threshold``)."""
    target = TargetDistribution.uniform([GENDER])

    def corrected(r: int, threshold: float) -> int:
        p_male = np.concatenate([np.linspace(0.99, 0.95, r), np.linspace(0.05, 0.01, 24 - r)])
        labels = assign_targets([np.stack([1 - p_male, p_male], 1)], target, confidence_threshold=threshold, seed=0).labels
        return int(((labels[:, 0] == 0) & (p_male > 0.5)).sum())

    assert [corrected(r, 0.8) for r in range(12, 18)] == [0, 0, 0, 1, 2, 3]
    assert [corrected(r, 0.6) for r in range(12, 18)] == [0, 1, 2, 3, 4, 5]


def test_images_without_face_get_no_target_and_are_left_out_of_the_transport():
    rng = np.random.default_rng(5)
    target = TargetDistribution.uniform([GENDER, RACE4])
    probs = random_probs(rng, 10, target.class_sizes)
    probs[0][[2, 7]] = np.nan  # rows of images without a face may hold anything
    has_face = np.ones(10, dtype=bool)
    has_face[[2, 7]] = False
    result = assign_targets(probs, target, has_face=has_face, seed=3)
    np.testing.assert_array_equal(result.labels[[2, 7]], NO_TARGET)
    np.testing.assert_array_equal(result.confidence[[2, 7]], 0.0)
    np.testing.assert_array_equal(result.plan[[2, 7]], 0.0)
    faces_only = assign_targets([p[has_face] for p in probs], target, seed=3)  # M = 8 counts, as without them
    np.testing.assert_array_equal(result.labels[has_face], faces_only.labels)
    np.testing.assert_array_equal(result.plan[has_face], faces_only.plan)

    nobody = assign_targets(probs, target, has_face=np.zeros(10, dtype=bool))
    assert np.all(nobody.labels == NO_TARGET) and not nobody.plan.any()


def test_same_seed_same_targets_other_seed_other_plan():
    rng = np.random.default_rng(6)
    target = TargetDistribution.uniform([GENDER, RACE4])
    probs = random_probs(rng, 32, target.class_sizes)
    first, again = assign_targets(probs, target, seed=9), assign_targets(probs, target, seed=9)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.plan, again.plan)
    assert not np.array_equal(first.plan, assign_targets(probs, target, seed=10).plan)


def test_non_uniform_target_shifts_the_batch():
    """A confident all-young batch under a 75/25 young/old target: about a quarter become 'old' targets."""
    age = Attribute("age", ("young", "old"))
    target = TargetDistribution.from_marginals([(age, [0.75, 0.25])])
    probs = [np.column_stack([np.linspace(0.99, 0.6, 40), 1 - np.linspace(0.99, 0.6, 40)])]
    result = assign_targets(probs, target, num_samples=200, seed=0)
    assert result.plan[:, 1].sum() == pytest.approx(10, abs=1.0)
    old = np.flatnonzero(result.labels[:, 0] == 1)
    assert len(old) > 0 and old.min() >= 20  # the least confidently young images are the ones sent to 'old'


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, f: (p[:1], f), "expected probabilities for 2 attributes"),
        (lambda p, f: ([p[0], p[1][:, :3]], f), "'race' must have shape"),
        (lambda p, f: ([p[0], p[1][:5]], f), "'race' must have shape"),
        (lambda p, f: ([p[0][0], p[1]], f), "2-D"),
        (lambda p, f: ([np.log(p[0]), p[1]], f), "finite and non-negative"),
        (lambda p, f: ([p[0] * 2, p[1]], f), "sum to 1"),
        (lambda p, f: ([np.where(np.eye(6, 2, dtype=bool), np.nan, p[0]), p[1]], f), "finite"),
        (lambda p, f: (p, f.astype(int)), "has_face must be a bool array"),
        (lambda p, f: (p, f[:4]), "has_face must be a bool array"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    rng = np.random.default_rng(7)
    target = TargetDistribution.uniform([GENDER, RACE4])
    probs, has_face = change(random_probs(rng, 6, target.class_sizes), np.ones(6, dtype=bool))
    with pytest.raises(ValueError, match=message):
        assign_targets(probs, target, has_face=has_face)


def test_bad_options_and_counts_raise():
    target = TargetDistribution.uniform([GENDER])
    probs = [confident([0, 1], 2)]
    with pytest.raises(ValueError, match="num_samples"):
        assign_targets(probs, target, num_samples=0)
    with pytest.raises(ValueError, match="confidence_threshold"):
        assign_targets(probs, target, confidence_threshold=1.5)
    with pytest.raises(ValueError, match="summing to M=2"):
        assign_to_counts(np.zeros((2, 2)), np.array([2, 1]))
    with pytest.raises(ValueError, match="counts"):
        assign_to_counts(np.zeros((2, 2)), np.array([1.0, 1.0]))


# ----------------------------------------------------------------------------- dal_loss
def test_dal_loss_is_the_sum_of_cross_entropies_over_kept_targets():
    torch.manual_seed(0)
    gender_logits = torch.randn(4, 2, requires_grad=True)
    race_logits = torch.randn(4, 4, requires_grad=True)
    labels = np.array([[0, 3], [1, -1], [-1, -1], [-1, 2]])
    loss = dal_loss([gender_logits, race_logits], labels)
    assert loss.shape == (4,)

    def nll(logits, i, k):
        return -(logits[i, k] - torch.logsumexp(logits[i], dim=0))

    expected = torch.stack([
        nll(gender_logits, 0, 0) + nll(race_logits, 0, 3),
        nll(gender_logits, 1, 1),
        torch.zeros(()),
        nll(race_logits, 3, 2),
    ])
    torch.testing.assert_close(loss, expected)

    loss.sum().backward()
    softmax = torch.softmax(gender_logits.detach(), dim=1)
    torch.testing.assert_close(gender_logits.grad[0], softmax[0] - torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(gender_logits.grad[2], torch.zeros(2))


def test_dal_loss_ignores_non_finite_logits_of_untargeted_images():
    logits = torch.tensor([[2.0, -1.0], [float("nan"), float("nan")]], requires_grad=True)
    loss = dal_loss([logits], torch.tensor([[1], [-1]]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss[1] == 0
    assert torch.isfinite(logits.grad).all() and not logits.grad[1].any()


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([[0, 0], [1, 4]]), r"attribute 1 must lie in \[-1, 3\]"),
        (torch.tensor([[0, 0], [-2, 0]]), r"attribute 0 must lie"),
        (torch.tensor([[0], [1]]), "shape"),
        (torch.tensor([[0.0, 0.0], [1.0, 1.0]]), "integer"),
    ],
)
def test_dal_loss_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        dal_loss([torch.zeros(2, 2), torch.zeros(2, 4)], labels)


# ----------------------------------------------------------------------------- exact expectations
def test_binary_closed_form_is_the_official_exp1_rule():
    """exp-1: rank by P(male) ascending; rank r < N/2 -> female; uncertainty = the Binomial(N, 0.5) CDF."""
    rng = np.random.default_rng(20)
    p_male = rng.uniform(size=24)
    target = TargetDistribution.uniform([GENDER])
    result = assign_targets([np.stack([1 - p_male, p_male], 1)], target, method="auto")
    rank = np.argsort(np.argsort(p_male))
    official_target = np.where(rank < 24 * 0.5, 0, 1)
    official_uncertainty = np.where(official_target == 1, 1 - binom.cdf(rank, 24, 0.5), binom.cdf(rank, 24, 0.5))
    np.testing.assert_allclose(result.confidence[:, 0], 1 - official_uncertainty, atol=1e-12)
    np.testing.assert_array_equal(result.labels[:, 0], np.where(official_uncertainty <= 0.2, official_target, NO_TARGET))


def test_enumeration_equals_the_closed_form_on_two_classes():
    rng = np.random.default_rng(21)
    for share in (0.5, 0.75):
        target = TargetDistribution((GENDER,), np.array([share, 1 - share]))
        cost = assignment_cost(random_probs(rng, 9, (2,)), target)
        np.testing.assert_allclose(enumerated_plan(cost, target.flat()), binary_plan(cost, share), atol=1e-12)


@pytest.mark.parametrize("attributes, shares, n", [
    ([GENDER], (0.75, 0.25), 16), ([RACE4], (0.25,) * 4, 8), ([GENDER, RACE2], (0.4, 0.1, 0.2, 0.3), 6)])
def test_exact_and_sampled_plans_agree_in_expectation(attributes, shares, n):
    rng = np.random.default_rng(22)
    target = TargetDistribution(tuple(attributes), np.array(shares).reshape(target_shape(attributes)))
    cost = assignment_cost(random_probs(rng, n, [len(a.classes) for a in attributes]), target)
    exact = binary_plan(cost, shares[0]) if len(shares) == 2 else enumerated_plan(cost, target.flat())
    sampled = sampled_plan(cost, target.flat(), 20_000, np.random.default_rng(0))
    np.testing.assert_allclose(exact.sum(axis=1), 1.0, atol=1e-12)
    assert np.abs(exact - sampled).max() < 0.015  # 4.3 standard errors of a 20,000-sample mean at most
    assert np.abs(exact - sampled_plan(cost, target.flat(), 100, np.random.default_rng(0))).max() > 0.01


def target_shape(attributes):
    return tuple(len(a.classes) for a in attributes)


def test_exact_assignment_has_no_variance_and_sampling_has():
    rng = np.random.default_rng(23)
    for attribute in (GENDER, RACE4):
        target = TargetDistribution.uniform([attribute])
        probs = random_probs(rng, 12, (len(attribute.classes),))
        exact = [assign_targets(probs, target, method="auto", seed=seed).plan for seed in range(4)]
        sampled = [assign_targets(probs, target, method="sampled", seed=seed).plan for seed in range(4)]
        assert all(np.array_equal(exact[0], plan) for plan in exact[1:])
        assert np.stack(sampled).std(axis=0).max() > 0.01


def test_auto_is_exact_where_cheap_and_samples_otherwise():
    assert resolve_method("auto", 24, np.full(2, 0.5)) == "binary"
    assert resolve_method("auto", 32, np.full(4, 0.25)) == "enumerated"  # exp-6: 6,545 count vectors
    assert resolve_method("auto", 32, np.full(8, 0.125)) == "sampled"  # exp-3: 15 million
    assert resolve_method("exact", 5, np.full(8, 0.125)) == "enumerated"
    assert resolve_method("sampled", 24, np.full(2, 0.5)) == "sampled"
    with pytest.raises(ValueError, match="assignment method"):
        resolve_method("optimal", 24, np.full(2, 0.5))
    with pytest.raises(ValueError, match="15,380,937 count vectors"):
        resolve_method("exact", 32, np.full(8, 0.125))


def test_count_vectors_are_all_compositions_with_multinomial_probabilities():
    counts, probabilities = count_vectors(5, np.array([0.5, 0.0, 0.3, 0.2]))
    expected = [c for c in itertools.product(range(6), repeat=4) if sum(c) == 5 and c[1] == 0]
    assert sorted(map(tuple, counts.tolist())) == sorted(expected)
    from scipy.stats import multinomial
    np.testing.assert_allclose(probabilities, multinomial.pmf(counts, 5, [0.5, 0.0, 0.3, 0.2]), atol=1e-12)


def test_coverage_095_is_the_official_exp6_truncation():
    """exp-6 keeps the most probable count vectors until their mass passes 0.95 and renormalises."""
    rng = np.random.default_rng(24)
    target = TargetDistribution.uniform([RACE4])
    cost = assignment_cost(random_probs(rng, 10, (4,)), target)
    counts, probabilities = count_vectors(10, target.flat())
    order = np.flip(probabilities.argsort())  # the official loop, transcribed
    accumulated = 0.0
    for i, index in enumerate(order):
        accumulated += probabilities[index]
        if accumulated > 0.95:
            break
    official = np.zeros(cost.shape)
    for b, p in zip(counts[order[: i + 1]], probabilities[order[: i + 1]]):
        official[np.arange(10), assign_to_counts(cost, b)] += p
    official /= official.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(enumerated_plan(cost, target.flat(), coverage=0.95), official, atol=1e-12)
