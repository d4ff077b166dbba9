"""Bias metrics (fair_core.metrics): hand-computed values, bootstrap coverage, and the summary report."""

import json

import numpy as np
import pytest

from fair_core.metrics import (
    Predictions,
    amplification_ratio,
    bootstrap_ci,
    class_frequencies,
    compare_bias,
    face_rate,
    joint_labels,
    paired_bootstrap_ci,
    shen_bias,
    summarise_bias,
    summarise_labels,
    total_variation,
    uncertainty_rate,
)
from fair_core.targets import Attribute, TargetDistribution

GENDER = Attribute("gender", ("female", "male"))
RACE = Attribute("race", ("White", "Black", "Indian", "Asian"))
AGE = Attribute("age", ("young", "old"))
GENDER_RACE = TargetDistribution.uniform([GENDER, RACE])


def gender_bias(x):
    return shen_bias(class_frequencies(x, 2))


# ----------------------------------------------------------------------------- labels and frequencies
def test_joint_labels_follow_the_flat_order_of_the_target():
    target = TargetDistribution.uniform([GENDER, RACE, AGE])
    table = target.joint_index_table()
    np.testing.assert_array_equal(joint_labels(table, target.class_sizes), np.arange(16))
    assert target.joint_labels()[int(joint_labels(np.array([1, 3, 0]), (2, 4, 2)))] == ("male", "Asian", "young")
    np.testing.assert_array_equal(joint_labels(np.array([[1, -1, 0], [-1, -1, -1]]), (2, 4, 2)), [-1, -1])
    with pytest.raises(ValueError, match="must lie in"):
        joint_labels(np.array([[2, 0, 0]]), (2, 4, 2))


def test_class_frequencies_count_faces_only():
    np.testing.assert_allclose(class_frequencies(np.array([0, 1, 1, -1, 1]), 2), [0.25, 0.75])
    assert np.isnan(class_frequencies(np.array([-1, -1]), 3)).all()
    batch = np.random.default_rng(0).integers(-1, 4, size=(2, 3, 9))
    expected = [[np.bincount(row[row >= 0], minlength=4) / (row >= 0).sum() for row in rows] for rows in batch]
    np.testing.assert_allclose(class_frequencies(batch, 4), expected)
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        class_frequencies(np.array([0, 2]), 2)


@pytest.mark.parametrize(
    "frequencies, expected",
    [
        ([0.7, 0.3], 0.4),  # |f_female - f_male|
        ([0.4, 0.3, 0.2, 0.1], 1.0 / 6),  # pairs: .1 .2 .3 .1 .2 .1
        ([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05], 2.5 / 28),  # 1.4 + 0.7 + 4 x 0.1 over 28 pairs
        ([0.25] * 4, 0.0),
        ([1.0, 0, 0, 0, 0, 0, 0, 0], 2.0 / 8),
    ],
)
def test_shen_bias_hand_computed(frequencies, expected):
    assert shen_bias(np.array(frequencies)) == pytest.approx(expected)


def test_distance_amplification_face_and_uncertainty_rates_hand_computed():
    assert total_variation(np.array([0.6, 0.4]), np.array([0.75, 0.25])) == pytest.approx(0.15)
    assert total_variation(np.array([0.5, 0.3, 0.2]), np.array([0.75, 0.25, 0.0])) == pytest.approx(0.25)
    np.testing.assert_allclose(amplification_ratio(np.array([0.9, 0.1]), np.array([0.6, 0.4])), [1.5, 0.25])
    assert amplification_ratio(np.array([0.5, 0.5]), np.array([1.0, 0.0]))[1] == np.inf
    assert face_rate(np.array([0, -1, 1, 1])) == pytest.approx(0.75)
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.79, 0.21], [0.5, 0.5]])
    assert uncertainty_rate(probs, np.array([True, True, True, False])) == pytest.approx(2 / 3)
    assert uncertainty_rate(probs) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="target has shape"):
        total_variation(np.array([0.5, 0.5]), np.array([1.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- bootstrap
def covers(interval, truth):
    return interval.low <= truth <= interval.high


def test_percentile_interval_covers_a_single_prompt_bias():
    rng = np.random.default_rng(1)
    hits = sum(covers(bootstrap_ci(gender_bias, (rng.random(120) < 0.75).astype(int), 200, seed=t), 0.5)
               for t in range(200))
    assert hits / 200 >= 0.90


def test_percentile_interval_covers_the_mean_over_prompts():
    rng = np.random.default_rng(2)
    shares = np.array([0.65, 0.75, 0.85, 0.9])
    truth = np.abs(2 * shares - 1).mean()
    hits = 0
    for trial in range(200):
        prompts = [(rng.random(80) < p).astype(int) for p in shares]
        hits += covers(bootstrap_ci(gender_bias, prompts, 200, seed=trial), truth)
    assert hits / 200 >= 0.90


def test_percentile_interval_covers_a_non_uniform_target_distance():
    rng = np.random.default_rng(3)
    true_shares, target = np.array([0.5, 0.3, 0.2]), np.array([0.75, 0.25, 0.0])
    hits = 0
    for trial in range(200):
        labels = rng.choice(3, size=150, p=true_shares)
        interval = bootstrap_ci(lambda x: total_variation(class_frequencies(x, 3), target), labels, 200, seed=trial)
        hits += covers(interval, 0.25)
    assert hits / 200 >= 0.90


def test_paired_interval_covers_the_change_and_is_narrower_than_unpaired():
    """Seed j draws u_j ~ U(0,1); 'female' before if u < 0.8, after if u < 0.6: per-prompt change -0.4."""
    rng = np.random.default_rng(4)
    hits, paired_widths, unpaired_widths = 0, [], []
    for trial in range(200):
        latents = [rng.random(100) for _ in range(3)]
        before = [(u >= 0.8).astype(int) for u in latents]
        after = [(u >= 0.6).astype(int) for u in latents]
        change = paired_bootstrap_ci(gender_bias, before, after, 200, seed=trial)
        hits += covers(change, -0.4)
        paired_widths.append(change.high - change.low)
        widths = [(i.high - i.low) for i in (bootstrap_ci(gender_bias, r, 200, seed=trial) for r in (before, after))]
        unpaired_widths.append(np.hypot(*widths))
    assert hits / 200 >= 0.90
    assert np.mean(paired_widths) < 0.8 * np.mean(unpaired_widths)


def test_bootstrap_edge_cases():
    constant = np.zeros(10, dtype=int)
    interval = bootstrap_ci(gender_bias, constant, 50)
    assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0)
    labels = np.random.default_rng(5).integers(0, 2, 40)
    same = paired_bootstrap_ci(gender_bias, labels, labels, 50)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    assert bootstrap_ci(gender_bias, labels, 100, seed=3) == bootstrap_ci(gender_bias, labels, 100, seed=3)
    vector = bootstrap_ci(lambda x: class_frequencies(x, 2), labels, 100)
    assert vector.low.shape == (2,) and np.all(vector.low <= vector.estimate) and np.all(vector.estimate <= vector.high)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(gender_bias, labels, level=95)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap_ci(gender_bias, labels, labels[:-1])


# ----------------------------------------------------------------------------- summary
def prompt_a():
    """20 faces with joint gender x race counts (6, 4, 2, 2, 2, 2, 1, 1) and two images without a face."""
    joint = np.repeat(np.arange(8), [6, 4, 2, 2, 2, 2, 1, 1])
    labels = GENDER_RACE.joint_index_table()[joint]
    return np.vstack([labels, [[0, 0], [1, 2]]]), np.r_[np.ones(20, bool), False, False]


def test_summary_of_one_prompt_hand_computed():
    labels, has_face = prompt_a()
    reference = TargetDistribution.from_marginals([(GENDER, [0.6, 0.4])])
    summary = summarise_labels([labels], [has_face], GENDER_RACE, prompts=["a doctor"], reference=reference, num_resamples=200)
    figures = summary.prompts["a doctor"]
    assert (figures.num_images, figures.num_faces) == (22, 20)
    assert figures.face_rate.estimate == pytest.approx(20 / 22)
    gender, race, joint = (figures.groups[name] for name in ("gender", "race", "gender x race"))
    np.testing.assert_allclose(gender.frequencies.estimate, [0.7, 0.3])
    assert gender.bias.estimate == pytest.approx(0.4) and gender.distance.estimate == pytest.approx(0.2)
    np.testing.assert_allclose(race.frequencies.estimate, [0.4, 0.3, 0.15, 0.15])
    assert race.bias.estimate == pytest.approx(0.9 / 6) and race.distance.estimate == pytest.approx(0.2)
    assert joint.bias.estimate == pytest.approx(2.5 / 28) and joint.distance.estimate == pytest.approx(0.25)
    assert joint.classes[1] == "female,Black" and joint.amplification is None and race.amplification is None
    np.testing.assert_allclose(gender.amplification.estimate, [0.7 / 0.6, 0.3 / 0.4])
    assert gender.bias.low < 0.4 < gender.bias.high
    assert figures.uncertainty == {}


def test_summary_means_skip_prompts_without_faces_and_count_them():
    labels_a, faces_a = prompt_a()
    labels_b = np.zeros((5, 2), dtype=int)  # five White women: gender bias 1
    labels_c = np.full((4, 2), -1)  # no face at all
    has_face = [faces_a, np.ones(5, bool), np.ones(4, bool)]  # rows of -1 count as no face all the same
    summary = summarise_labels([labels_a, labels_b, labels_c], has_face, GENDER_RACE, prompts=["a", "b", "c"], num_resamples=100)
    assert summary.prompts_without_faces == ["c"]
    overall = summary.overall
    assert (overall.num_images, overall.num_faces) == (31, 25)
    assert overall.groups["gender"].bias.estimate == pytest.approx((0.4 + 1.0) / 2)
    assert overall.face_rate.estimate == pytest.approx((20 / 22 + 1 + 0) / 3)
    assert np.isnan(summary.prompts["c"].groups["gender"].bias.estimate)
    text = json.dumps(summary.to_json(), allow_nan=False)
    assert json.loads(text)["prompts"]["c"]["groups"]["gender"]["bias"]["estimate"] is None
    assert "gender: bias 0.700" in summary.describe()


def test_summary_from_probabilities_reports_uncertainty():
    probs_gender = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    probs_race = np.tile([0.85, 0.05, 0.05, 0.05], (4, 1))
    predictions = Predictions([probs_gender, probs_race], np.array([True, True, True, False]))
    summary = summarise_bias({"p": predictions}, GENDER_RACE, num_resamples=50)
    figures = summary.prompts["p"]
    assert figures.uncertainty["gender"].estimate == pytest.approx(1 / 3)  # 0.7 < 0.8 among three faces
    assert figures.uncertainty["race"].estimate == 0.0
    np.testing.assert_allclose(figures.groups["gender"].frequencies.estimate, [2 / 3, 1 / 3])


def test_compare_bias_gives_the_paired_change():
    rng = np.random.default_rng(6)
    before, after = {}, {}
    for prompt, share in (("a", 0.9), ("b", 0.8)):
        u = rng.random(50)
        female_before, female_after = u < share, u < 0.5
        before[prompt] = Predictions([np.where(female_before[:, None], [0.9, 0.1], [0.1, 0.9])], np.ones(50, bool))
        after[prompt] = Predictions([np.where(female_after[:, None], [0.9, 0.1], [0.1, 0.9])], np.ones(50, bool))
    target = TargetDistribution.uniform([GENDER])
    change = compare_bias(before, after, target, num_resamples=200)
    expected = np.mean([
        shen_bias(class_frequencies(after[p].labels()[:, 0], 2)) - shen_bias(class_frequencies(before[p].labels()[:, 0], 2))
        for p in before
    ])
    assert change.change and change.overall.groups["gender"].bias.estimate == pytest.approx(expected)
    assert change.overall.groups["gender"].bias.high < 0
    assert change.to_json()["kind"] == "change (after - before)"
    with pytest.raises(ValueError, match="same prompts"):
        compare_bias(before, {"a": after["a"]}, target)


def test_summary_rejects_inconsistent_inputs():
    labels, has_face = prompt_a()
    with pytest.raises(ValueError, match="shape"):
        summarise_labels([labels[:, :1]], None, GENDER_RACE)
    with pytest.raises(ValueError, match="must lie in"):
        summarise_labels([labels + 3], None, GENDER_RACE)
    with pytest.raises(ValueError, match="has_face"):
        summarise_labels([labels], [has_face[:3]], GENDER_RACE)
    with pytest.raises(ValueError, match="distinct prompt names"):
        summarise_labels([labels, labels], None, GENDER_RACE, prompts=["x", "x"])
    with pytest.raises(ValueError, match="no prompts"):
        summarise_labels([], None, GENDER_RACE)
    predictions = Predictions([np.full((3, 2), 0.5)], np.ones(3, bool))
    with pytest.raises(ValueError, match="class sizes"):
        summarise_bias({"p": predictions}, GENDER_RACE)
    with pytest.raises(ValueError, match="has_face must be a bool array"):
        Predictions([np.full((3, 2), 0.5)], np.ones(3))
