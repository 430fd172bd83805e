"""Calibration scores: hand-computed ECE (equal-width and equal-mass), MCE, reliability tables; properties; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bhpeft_ppl.calibration import accuracy, brier, ece, mce, nll, reliability_table, summary

# Four examples, three classes. Confidence (max prob), prediction (argmax), label, correct:
#   0.9  class 0  label 0  right
#   0.8  class 0  label 1  wrong
#   0.7  class 1  label 1  right
#   0.4  class 0  label 0  right
PROBS = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.15, 0.7, 0.15], [0.4, 0.3, 0.3]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_accuracy_nll_brier_by_hand():
    assert accuracy(PROBS, LABELS) == pytest.approx(0.75)
    # -(log .9 + log .1 + log .7 + log .4) / 4
    assert nll(PROBS, LABELS) == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.7) + math.log(0.4)) / 4)
    # per example: .01+.0025+.0025 = .015; .64+.81+.01 = 1.46; .0225+.09+.0225 = .135; .36+.09+.09 = .54
    assert brier(PROBS, LABELS) == pytest.approx((0.015 + 1.46 + 0.135 + 0.54) / 4)


def test_ece_and_mce_equal_width_by_hand():
    # 2 bins (0, .5] and (.5, 1]:
    #   bin 0: {.4 right}                -> |1 - .4| = .6 (gap .6)
    #   bin 1: {.9 right, .8 wrong, .7 right} -> |2 - 2.4| = .4 (acc 2/3, conf .8)
    # ECE = (.6 + .4) / 4 = .25; MCE = max(.6, |2/3 - .8|) = .6
    assert ece(PROBS, LABELS, num_bins=2) == pytest.approx(0.25)
    assert ece(PROBS, LABELS, 2) == pytest.approx(0.25)  # positional num_bins, as before
    assert mce(PROBS, LABELS, num_bins=2) == pytest.approx(0.6)


def test_ece_and_mce_equal_mass_by_hand():
    # sorted confidences .4 .7 | .8 .9 (two bins of two):
    #   bin 0: {.4 right, .7 right} -> |2 - 1.1| = .9, gap 1 - .55 = .45
    #   bin 1: {.8 wrong, .9 right} -> |1 - 1.7| = .7, gap .5 - .85 = -.35
    # ECE = (.9 + .7) / 4 = .4; MCE = .45
    assert ece(PROBS, LABELS, num_bins=2, binning="mass") == pytest.approx(0.4)
    assert mce(PROBS, LABELS, num_bins=2, binning="mass") == pytest.approx(0.45)


def test_width_bin_edges_are_right_closed():
    # confidence exactly .5 belongs to (0, .5], and right: bin 0 gap = 1 - .5 = .5; bin 1 empty
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    table = reliability_table(probs, torch.tensor([0]), num_bins=2)
    assert [row["count"] for row in table] == [1, 0]
    assert ece(probs, torch.tensor([0]), num_bins=2) == pytest.approx(0.5)


def test_reliability_table_width_lists_empty_bins():
    # 4 bins (0,.25] (.25,.5] (.5,.75] (.75,1]: {} {.4 right} {.7 right} {.9 right, .8 wrong}
    table = reliability_table(PROBS, LABELS, num_bins=4)
    assert [(row["lower"], row["upper"]) for row in table] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [row["count"] for row in table] == [0, 1, 1, 2]
    assert table[0] == {"lower": 0.0, "upper": 0.25, "count": 0, "accuracy": None, "confidence": None, "gap": None}
    assert table[1]["accuracy"] == 1.0 and table[1]["confidence"] == pytest.approx(0.4) and table[1]["gap"] == pytest.approx(0.6)
    assert (
        table[3]["accuracy"] == 0.5 and table[3]["confidence"] == pytest.approx(0.85) and table[3]["gap"] == pytest.approx(-0.35)
    )


def test_reliability_table_mass_bounds_are_bin_extremes():
    table = reliability_table(PROBS, LABELS, num_bins=2, binning="mass")
    assert [row["count"] for row in table] == [2, 2]
    assert (table[0]["lower"], table[0]["upper"]) == pytest.approx((0.4, 0.7))
    assert (table[1]["lower"], table[1]["upper"]) == pytest.approx((0.8, 0.9))
    assert table[0]["gap"] == pytest.approx(0.45) and table[1]["gap"] == pytest.approx(-0.35)


def test_mass_bins_keep_ties_together():
    # confidences .6 .6 .6 .9: the cut after two examples falls inside the run of .6 and moves to its end,
    # so the bins are {.6, .6, .6} and {.9}. Labels: the .6 examples are right, wrong, right; the .9 one right.
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 0, 0])
    table = reliability_table(probs, labels, num_bins=2, binning="mass")
    assert [row["count"] for row in table] == [3, 1]
    # bin 0: |2 - 1.8| = .2; bin 1: |1 - .9| = .1; ECE = .3 / 4
    assert ece(probs, labels, num_bins=2, binning="mass") == pytest.approx(0.075)
    # all equal: one bin, whatever num_bins is
    assert len(reliability_table(probs[:3], labels[:3], num_bins=5, binning="mass")) == 1


def test_mass_bins_when_fewer_examples_than_bins():
    table = reliability_table(PROBS, LABELS, num_bins=10, binning="mass")
    assert [row["count"] for row in table] == [1, 1, 1, 1]


def test_summary_keys_and_values():
    scores = summary(PROBS, LABELS)
    assert set(scores) == {"accuracy", "nll", "brier", "ece", "ece_mass", "mce"}
    assert all(isinstance(v, float) for v in scores.values())
    assert scores["ece"] == pytest.approx(ece(PROBS, LABELS))
    assert scores["ece_mass"] == pytest.approx(ece(PROBS, LABELS, binning="mass"))


def test_accepts_lists_and_float32():
    assert ece(PROBS.tolist(), LABELS.tolist(), num_bins=2) == pytest.approx(0.25)
    assert ece(PROBS.float(), LABELS, num_bins=2) == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), "shape"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.tensor([[1.5, -0.5]]), torch.tensor([0]), r"\[0, 1\].*logits"),
        (torch.tensor([[0.5, 0.4]]), torch.tensor([0]), "sum to 1"),
        (torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]), "NaN"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), r"labels must lie in \[0, 2\)"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), "labels of shape"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.5]), "integer"),
    ],
)
def test_bad_input_raises(probs, labels, match):
    for score in (accuracy, nll, brier, ece, mce, reliability_table, summary):
        with pytest.raises(ValueError, match=match):
            score(probs, labels)


def test_bad_binning_arguments_raise():
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        ece(PROBS, LABELS, num_bins=0)
    with pytest.raises(ValueError, match="unknown binning 'quantile'"):
        mce(PROBS, LABELS, binning="quantile")


# ---- properties ----


@st.composite
def problems(draw, max_n: int = 30):
    """Probabilities with many ties (logits on a coarse grid) and labels."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(2, 4))
    logits = torch.tensor(draw(st.lists(st.integers(-3, 3), min_size=n * c, max_size=n * c)), dtype=torch.double)
    labels = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return torch.softmax(logits.view(n, c) / 2, -1), labels


@settings(max_examples=60, deadline=None)
@given(problem=problems(), num_bins=st.integers(1, 20), binning=st.sampled_from(["width", "mass"]))
def test_ece_in_unit_interval_and_below_mce(problem, num_bins, binning):
    probs, labels = problem
    e = ece(probs, labels, num_bins=num_bins, binning=binning)
    m = mce(probs, labels, num_bins=num_bins, binning=binning)
    assert 0.0 <= e <= m + 1e-12 <= 1.0 + 1e-12
    table = reliability_table(probs, labels, num_bins=num_bins, binning=binning)
    assert sum(row["count"] for row in table) == len(labels)
    assert e == pytest.approx(sum(row["count"] * abs(row["gap"]) for row in table if row["count"]) / len(labels))


@settings(max_examples=60, deadline=None)
@given(problem=problems(), num_bins=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_scores_invariant_to_permuting_examples(problem, num_bins, seed):
    probs, labels = problem
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    assert summary(probs[perm], labels[perm]) == pytest.approx(summary(probs, labels))
    for binning in ("width", "mass"):
        assert ece(probs[perm], labels[perm], num_bins, binning) == pytest.approx(ece(probs, labels, num_bins, binning))
        assert mce(probs[perm], labels[perm], num_bins, binning) == pytest.approx(mce(probs, labels, num_bins, binning))
        permuted = reliability_table(probs[perm], labels[perm], num_bins, binning)
        original = reliability_table(probs, labels, num_bins, binning)
        assert [row["count"] for row in permuted] == [row["count"] for row in original]
        for a, b in zip(permuted, original, strict=True):
            assert a["gap"] == pytest.approx(b["gap"])


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=30), binning=st.sampled_from(["width", "mass"]))
def test_perfect_one_hot_predictions(labels, binning):
    labels = torch.tensor(labels)
    probs = torch.nn.functional.one_hot(labels, 4).double()
    assert accuracy(probs, labels) == 1.0
    assert brier(probs, labels) == 0.0
    assert nll(probs, labels) == 0.0
    assert ece(probs, labels, binning=binning) == 0.0
    assert mce(probs, labels, binning=binning) == 0.0


@st.composite
def sharp_problems(draw, max_n: int = 30):
    """Continuous probabilities from wide logits: near-one-hot rows, probabilities that underflow to 0, float32 rows."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(2, 5))
    logits = draw(st.lists(st.floats(-60, 60), min_size=n * c, max_size=n * c))
    probs = torch.softmax(torch.tensor(logits, dtype=torch.double).view(n, c), -1)
    if draw(st.booleans()):
        probs = probs.float()
    labels = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return probs, labels


@settings(max_examples=60, deadline=None)
@given(problem=problems() | sharp_problems())
def test_every_summary_score_in_its_range(problem):
    """NLL >= 0 (finite even when the label's probability is 0), Brier in [0, 2], the rest in [0, 1]."""
    scores = summary(*problem)
    assert set(scores) == {"accuracy", "nll", "brier", "ece", "ece_mass", "mce"}
    assert 0.0 <= scores["nll"] < math.inf
    assert 0.0 <= scores["brier"] <= 2.0 + 1e-12
    for key in ("accuracy", "ece", "ece_mass", "mce"):
        assert 0.0 <= scores[key] <= 1.0 + 1e-12, key


@settings(max_examples=40, deadline=None)
@given(problem=sharp_problems(), seed=st.integers(0, 2**16))
def test_summary_of_sharp_probabilities_invariant_to_example_order(problem, seed):
    probs, labels = problem
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    assert summary(probs[perm], labels[perm]) == pytest.approx(summary(probs, labels), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=30), num_classes=st.integers(6, 9), num_bins=st.integers(1, 20))
def test_perfect_one_hot_summary_is_zero_error(labels, num_classes, num_bins):
    """Any number of classes and bins: accuracy 1, and NLL, Brier, both ECEs and MCE exactly 0."""
    labels = torch.tensor(labels)
    probs = torch.nn.functional.one_hot(labels, num_classes).float()
    assert summary(probs, labels) == {"accuracy": 1.0, "nll": 0.0, "brier": 0.0, "ece": 0.0, "ece_mass": 0.0, "mce": 0.0}
    for binning in ("width", "mass"):
        assert ece(probs, labels, num_bins, binning) == 0.0
