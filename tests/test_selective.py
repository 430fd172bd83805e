"""Selective prediction and OOD detection: hand-computed scores, tie handling, properties, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bhpeft_ppl.selective import (
    UNCERTAINTY_SCORES,
    accuracy_after_rejection,
    accuracy_at_coverage,
    aurc,
    ood_auroc,
    risk_coverage_curve,
    selective_summary,
    uncertainty,
)


def test_uncertainty_scores_by_hand():
    # one example, two draws that disagree completely: mean (.5, .5)
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [S=2, N=1, C=2]
    assert uncertainty(probs, "max_prob").tolist() == [0.5]
    assert uncertainty(probs, "entropy").item() == pytest.approx(math.log(2))
    assert uncertainty(probs, "mutual_information").item() == pytest.approx(math.log(2))  # each draw has entropy 0
    # unbiased variance over the draws of (1, 0) is .5 for each class: .5 + .5
    assert uncertainty(probs, "summed_variance").item() == pytest.approx(1.0)
    assert uncertainty(probs).dtype == torch.float64


def test_uncertainty_of_a_single_draw():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])  # [N, C], one draw
    assert uncertainty(probs, "max_prob").tolist() == pytest.approx([0.5, 0.1])
    assert uncertainty(probs, "entropy").tolist() == pytest.approx([math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))])
    assert uncertainty(probs, "mutual_information").tolist() == [0.0, 0.0]
    assert uncertainty(probs, "summed_variance").tolist() == [0.0, 0.0]
    assert uncertainty(probs[None], "summed_variance").tolist() == [0.0, 0.0]


def test_risk_coverage_and_aurc_by_hand():
    correct = torch.tensor([1, 0, 1, 1])
    u = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # risks after accepting k = 1..4: 0, 1/2, 1/3, 1/4
    assert aurc(correct, u) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    curve = risk_coverage_curve(correct, u)
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["risk"] == pytest.approx([0, 1 / 2, 1 / 3, 1 / 4])
    assert curve["accuracy"] == pytest.approx([1, 1 / 2, 2 / 3, 3 / 4])
    assert curve["threshold"] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_aurc_and_curve_with_ties_by_hand():
    correct = torch.tensor([1, 0, 1, 1])
    u = torch.tensor([0.1, 0.2, 0.2, 0.4])  # the wrong and a right example are tied
    # tie-averaged errors among the first k: k=1: 0; k=2: 0 + 1 * (1/2) = .5; k=3: 1; k=4: 1
    # risks 0, .25, 1/3, 1/4 (the mean of the two orders 0,.5,1/3,1/4 and 0,0,1/3,1/4)
    assert aurc(correct, u) == pytest.approx((0 + 0.25 + 1 / 3 + 1 / 4) / 4)
    curve = risk_coverage_curve(correct, u)  # only the ends of tie groups
    assert curve["coverage"] == [0.25, 0.75, 1.0]
    assert curve["accuracy"] == pytest.approx([1, 2 / 3, 3 / 4])
    assert curve["threshold"] == pytest.approx([0.1, 0.2, 0.4])
    # coverage .5 keeps 2: tie-averaged errors .5 -> accuracy .75; coverage .7 keeps ceil(2.8) = 3 -> 2/3
    assert accuracy_at_coverage(correct, u, 0.5) == pytest.approx(0.75)
    assert accuracy_at_coverage(correct, u, 0.7) == pytest.approx(2 / 3)
    assert accuracy_at_coverage(correct, u, 1.0) == pytest.approx(0.75)


def test_accuracy_at_coverage_ignores_rounding_noise():
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    u = torch.arange(10.0)
    # .7 * 10 = 7.000000000000001 in floating point; still keeps 7 examples, all right
    assert accuracy_at_coverage(correct, u, 0.7) == 1.0


def test_accuracy_after_rejection_by_hand():
    # sorted by uncertainty: right x7, wrong, right, wrong
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 0])
    u = torch.arange(10.0)
    result = accuracy_after_rejection(correct, u)
    expected = {0.0: 8 / 10, 0.1: 8 / 9, 0.2: 7 / 8, 0.3: 1.0, 0.4: 1.0, 0.5: 1.0, 0.6: 1.0, 0.7: 1.0, 0.8: 1.0, 0.9: 1.0}
    assert list(result) == list(expected)
    assert list(result.values()) == pytest.approx(list(expected.values()))
    assert accuracy_after_rejection(correct, u, fractions=[0.25]) == {0.25: pytest.approx(7 / 8)}  # rejects floor(2.5) = 2


def test_ood_auroc_with_ties_by_hand():
    # out .2 beats .1, ties .2 (1/2), loses to .3 -> 1.5; out .4 beats all three -> 3; 4.5 / 6
    assert ood_auroc([0.1, 0.2, 0.3], [0.2, 0.4]) == pytest.approx(0.75)
    assert ood_auroc([1.0, 1.0], [1.0]) == 0.5
    assert ood_auroc([0.0], [1.0]) == 1.0 and ood_auroc([1.0], [0.0]) == 0.0


def test_ood_auroc_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    u_in = torch.randint(0, 5, (40,), generator=gen).double()
    u_out = torch.randint(1, 7, (25,), generator=gen).double()
    y = [0] * 40 + [1] * 25
    assert ood_auroc(u_in, u_out) == pytest.approx(sklearn_metrics.roc_auc_score(y, torch.cat([u_in, u_out]).numpy()))


def test_selective_summary():
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.55, 0.45]]] * 2)  # [S=2, N=5, C=2]
    labels = torch.tensor([0, 1, 1, 1, 0])  # correct: right, wrong, right, right, right
    result = selective_summary(probs, labels)
    assert set(result) == {"score", "aurc", "accuracy_at_80", "accuracy_after_rejection"}
    assert list(result["accuracy_after_rejection"]) == ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    # max_prob uncertainty .1 .4 .3 .2 .45: coverage .8 keeps 4 of 5, dropping the .45 (right) -> 3/4
    assert result["accuracy_at_80"] == pytest.approx(0.75)
    assert result["accuracy_after_rejection"]["0.0"] == pytest.approx(0.8)
    assert "accuracy_at_92.5" in selective_summary(probs, labels, score="entropy", coverage=0.925)


# ---- bad input ----


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown uncertainty score 'variance'"):
        uncertainty(torch.tensor([[0.5, 0.5]]), "variance")
    with pytest.raises(ValueError, match=r"\[S, N, C\]"):
        uncertainty(torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="logits"):
        uncertainty(torch.tensor([[2.0, -1.0]]))
    with pytest.raises(ValueError, match="one value per example"):
        aurc([1, 0], [0.1])
    with pytest.raises(ValueError, match="no examples"):
        aurc([], [])
    with pytest.raises(ValueError, match="0/1"):
        aurc([2, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        risk_coverage_curve([1, 0], [0.1, float("nan")])
    for coverage in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"coverage must lie in \(0, 1\]"):
            accuracy_at_coverage([1, 0], [0.1, 0.2], coverage)
    with pytest.raises(ValueError, match=r"fractions must lie in \[0, 1\)"):
        accuracy_after_rejection([1, 0], [0.1, 0.2], fractions=[1.0])
    with pytest.raises(ValueError, match="uncertainty_out"):
        ood_auroc([0.1], [])
    with pytest.raises(ValueError, match="labels"):
        selective_summary(torch.tensor([[0.5, 0.5]]), torch.tensor([3]))


# ---- properties ----


def brute_force_aurc_and_accuracy(correct: list[int], u: list[float], kept: int) -> tuple[float, float]:
    """Mean over every order of the examples (hence over every tie-break) of plain AURC and plain accuracy at ``kept``."""
    n = len(correct)
    total_aurc = total_acc = 0.0
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        order = sorted(perm, key=lambda i: u[i])  # stable: ties in the order of this permutation
        errors = 0
        risks = []
        for k, i in enumerate(order, start=1):
            errors += 1 - correct[i]
            risks.append(errors / k)
        total_aurc += sum(risks) / n
        total_acc += 1 - risks[kept - 1]
    return total_aurc / len(perms), total_acc / len(perms)


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2)), min_size=1, max_size=6),
    coverage=st.floats(0.01, 1.0),
)
def test_tie_averaging_equals_mean_over_tie_breaks(pairs, coverage):
    correct = [c for c, _ in pairs]
    u = [float(v) for _, v in pairs]
    kept = max(1, math.ceil(round(coverage * len(u), 6)))
    expected_aurc, expected_acc = brute_force_aurc_and_accuracy(correct, u, kept)
    assert aurc(correct, u) == pytest.approx(expected_aurc)
    assert accuracy_at_coverage(correct, u, coverage) == pytest.approx(expected_acc)


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=1, max_size=40),
    coverage=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_selective_scores_invariant_to_permuting_examples(pairs, coverage, seed):
    correct = torch.tensor([c for c, _ in pairs])
    u = torch.tensor([float(v) for _, v in pairs])  # heavily tied
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    assert aurc(correct[perm], u[perm]) == pytest.approx(aurc(correct, u))
    assert accuracy_at_coverage(correct[perm], u[perm], coverage) == pytest.approx(accuracy_at_coverage(correct, u, coverage))
    permuted = accuracy_after_rejection(correct[perm], u[perm])
    assert list(permuted.values()) == pytest.approx(list(accuracy_after_rejection(correct, u).values()))
    curve, permuted_curve = risk_coverage_curve(correct, u), risk_coverage_curve(correct[perm], u[perm])
    for key in ("coverage", "accuracy", "risk", "threshold"):
        assert permuted_curve[key] == pytest.approx(curve[key])
    assert 0.0 <= aurc(correct, u) <= 1.0


@settings(max_examples=40, deadline=None)
@given(
    a=st.lists(st.floats(-10, 10), min_size=1, max_size=30),
    b=st.lists(st.floats(-10, 10), min_size=1, max_size=30),
    shift=st.floats(20.01, 1e3),
)
def test_auroc_properties(a, b, shift):
    a = torch.tensor(a, dtype=torch.double)
    b = torch.tensor(b, dtype=torch.double)
    assert ood_auroc(a, b) == pytest.approx(1.0 - ood_auroc(b, a))
    assert ood_auroc(a, a + shift) == 1.0
    assert ood_auroc(a + shift, a) == 0.0
    assert ood_auroc(a, a) == pytest.approx(0.5)


@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.integers(-3, 3), min_size=12, max_size=12),
    score=st.sampled_from(UNCERTAINTY_SCORES),
    seed=st.integers(0, 2**16),
)
def test_uncertainty_nonnegative_and_per_example(logits, score, seed):
    probs = torch.softmax(torch.tensor(logits, dtype=torch.double).view(2, 3, 2), -1)  # [S=2, N=3, C=2]
    u = uncertainty(probs, score)
    assert u.shape == (3,) and (u >= 0).all()
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(uncertainty(probs[:, perm], score), u[perm])
