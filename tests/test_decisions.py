"""Bayes decisions under a cost matrix, abstention, and thresholds with (guaranteed) error rates."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta

from bhpeft_ppl.decisions import Decisions, Threshold, accept, bayes_decisions, choose_threshold, realised_cost

# cost[true_class, action]: a false alarm (true 0, act 1) costs 1, a miss (true 1, act 0) costs 5
COST = torch.tensor([[0.0, 1.0], [5.0, 0.0]])
PROBS = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])


def test_bayes_decisions_asymmetric_cost_by_hand():
    # expected cost of action 0 = 5 p1, of action 1 = 1 p0:
    #   (.5, .9) -> 0;  (1.5, .7) -> 1 although class 0 is more probable;  (2.5, .5) -> 1
    decisions = bayes_decisions(PROBS, COST)
    assert decisions.actions.tolist() == [0, 1, 1]
    assert decisions.expected_cost.tolist() == pytest.approx([0.5, 0.7, 0.5])
    assert torch.allclose(decisions.action_costs, torch.tensor([[0.5, 0.9], [1.5, 0.7], [2.5, 0.5]], dtype=torch.double))
    assert decisions.actions.dtype == torch.long and decisions.expected_cost.dtype == torch.float64


def test_bayes_decisions_with_abstention_by_hand():
    # abstaining costs .6: cheaper than the best action only for the second example (.7)
    decisions = bayes_decisions(PROBS, COST, abstain_cost=0.6)
    assert decisions.actions.tolist() == [0, -1, 1]
    assert decisions.abstained.tolist() == [False, True, False]
    assert decisions.expected_cost.tolist() == pytest.approx([0.5, 0.6, 0.5])
    json.dumps(decisions.to_dict())
    # an abstention cost equal to the best action's expected cost (exactly .5 here) does not abstain
    assert bayes_decisions([[0.5, 0.5]], COST, abstain_cost=0.5).actions.tolist() == [1]
    assert bayes_decisions([[0.5, 0.5]], COST, abstain_cost=0.4999).actions.tolist() == [-1]
    assert bayes_decisions(PROBS, COST, abstain_cost=0.0).actions.tolist() == [-1, -1, -1]


def test_realised_cost_by_hand():
    decisions = bayes_decisions(PROBS, COST, abstain_cost=0.6)  # actions 0, abstain, 1
    # labels 0, 1, 1: cost[0, 0] = 0, abstain .6, cost[1, 1] = 0 -> .2
    assert realised_cost(decisions, torch.tensor([0, 1, 1]), COST, abstain_cost=0.6) == pytest.approx(0.2)
    # without abstention actions 0, 1, 1; labels 1, 0, 0: cost[1, 0] = 5, cost[0, 1] = 1, cost[0, 1] = 1 -> 7/3
    assert realised_cost(bayes_decisions(PROBS, COST), [1, 0, 0], COST) == pytest.approx(7 / 3)


def test_more_actions_than_classes():
    # a third action "review" costs 2 whatever the class
    cost = torch.tensor([[0.0, 1.0, 2.0], [5.0, 0.0, 2.0]])
    decisions = bayes_decisions(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), cost)
    # row 1: (2.5, .5, 2) -> 1; row 2: (0, 1, 2) -> 0
    assert decisions.actions.tolist() == [1, 0]
    assert decisions.action_costs.shape == (2, 3)


def test_choose_threshold_empirical_by_hand():
    correct = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0])
    u = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    # error after accepting k = 1..8: 0, 0, 1/3, 1/4, 1/5, 1/3, 2/7, 3/8 (not monotone)
    t = choose_threshold(correct, u, target_error=0.25)  # feasible k = 1, 2, 4, 5 -> k = 5
    assert (t.threshold, t.coverage, t.error, t.error_bound) == (pytest.approx(0.5), 5 / 8, pytest.approx(0.2), None)
    t = choose_threshold(correct, u, target_error=0.3)  # k = 7 is feasible again after k = 6 is not
    assert (t.threshold, t.coverage, t.error) == (pytest.approx(0.7), 7 / 8, pytest.approx(2 / 7))
    t = choose_threshold(correct, u, target_error=0.0)
    assert (t.threshold, t.coverage, t.error) == (pytest.approx(0.2), 2 / 8, 0.0)
    assert accept(u, t).tolist() == [True, True] + [False] * 6
    assert accept(u, 0.45).sum() == 4


def test_choose_threshold_with_ties():
    # the first two examples are tied: accepting one means accepting both (error 1/2)
    t = choose_threshold([0, 1, 1], [0.1, 0.1, 0.2], target_error=0.4)
    # k = 2: 1/2 > .4; k = 3: 1/3 <= .4
    assert (t.threshold, t.coverage) == (pytest.approx(0.2), 1.0)
    assert choose_threshold([0, 1, 1], [0.1, 0.1, 0.2], target_error=0.2).coverage == 0.0


def test_choose_threshold_infeasible_accepts_nothing():
    t = choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], target_error=0.1)
    assert t == Threshold(threshold=-math.inf, coverage=0.0, error=0.0, error_bound=None, target_error=0.1, confidence=None)
    assert not accept([0.1, 0.2, 0.3], t).any()
    assert choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], target_error=0.1, confidence=0.9).error_bound == 0.0


def test_choose_threshold_with_confidence_by_hand():
    # ten examples, right except the most uncertain one; confidence .95 over m = 10 candidates
    # -> each Clopper-Pearson bound at level 1 - .05 / 10 = .995. With no errors among k accepted
    # the bound is 1 - .005 ** (1 / k): k = 9 gives .44495 <= .45, k = 8 gives .4843;
    # k = 10 with one error gives Beta^-1(.995; 2, 9) > .45.
    correct = torch.tensor([1] * 9 + [0])
    u = torch.arange(10.0)
    assert beta.ppf(0.995, 2, 9) > 0.45
    t = choose_threshold(correct, u, target_error=0.45, confidence=0.95)
    assert t.threshold == 8.0 and t.coverage == pytest.approx(0.9) and t.error == 0.0
    assert t.error_bound == pytest.approx(1 - 0.005 ** (1 / 9))
    assert t.confidence == 0.95 and t.target_error == 0.45
    json.dumps(dataclasses.asdict(t))
    # the empirical rule accepts everything (error .1)
    assert choose_threshold(correct, u, target_error=0.45).coverage == 1.0


# ---- bad input ----


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"cost of shape \[C, A\] = \[2, A\]"):
        bayes_decisions(PROBS, torch.ones(3, 2))
    with pytest.raises(ValueError, match="finite"):
        bayes_decisions(PROBS, torch.tensor([[0.0, math.inf], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="abstain_cost must be a finite number"):
        bayes_decisions(PROBS, COST, abstain_cost=math.nan)
    with pytest.raises(ValueError, match="logits"):
        bayes_decisions(torch.tensor([[2.0, -1.0]]), COST)
    with pytest.raises(ValueError, match="abstain_cost is None"):
        realised_cost(bayes_decisions(PROBS, COST, abstain_cost=0.6), [0, 1, 1], COST)
    with pytest.raises(ValueError, match="labels"):
        realised_cost(bayes_decisions(PROBS, COST), [0, 1], COST)
    with pytest.raises(ValueError, match=r"target_error must lie in \[0, 1\)"):
        choose_threshold([1, 0], [0.1, 0.2], target_error=1.0)
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\)"):
        choose_threshold([1, 0], [0.1, 0.2], target_error=0.1, confidence=1.0)
    with pytest.raises(ValueError, match="one value per example"):
        choose_threshold([1, 0], [0.1], target_error=0.1)
    with pytest.raises(ValueError, match="shape"):
        accept(torch.zeros(2, 2), 0.5)


# ---- properties ----


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 20),
    c=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_zero_one_cost_without_abstention_is_argmax(n, c, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=gen, dtype=torch.double), -1)
    decisions = bayes_decisions(probs, 1 - torch.eye(c))
    assert isinstance(decisions, Decisions)
    assert torch.equal(decisions.actions, probs.argmax(-1))
    assert torch.allclose(decisions.expected_cost, 1 - probs.max(-1).values)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 20),
    c=st.integers(2, 4),
    abstain_cost=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_zero_one_cost_with_abstention_is_chow_rule(n, c, abstain_cost, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=gen, dtype=torch.double), -1)
    decisions = bayes_decisions(probs, 1 - torch.eye(c), abstain_cost=abstain_cost)
    confidence = probs.max(-1).values
    clear = (confidence - (1 - abstain_cost)).abs() > 1e-9  # away from the boundary
    assert torch.equal(decisions.abstained[clear], (confidence < 1 - abstain_cost)[clear])
    assert (decisions.expected_cost <= abstain_cost + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=1, max_size=30),
    target=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_threshold_is_the_largest_feasible_and_order_invariant(pairs, target, seed):
    correct = torch.tensor([c for c, _ in pairs])
    u = torch.tensor([float(v) for _, v in pairs])
    t = choose_threshold(correct, u, target_error=target)
    accepted = accept(u, t)
    assert t.coverage == pytest.approx(float(accepted.double().mean()))
    if accepted.any():
        assert 1 - correct[accepted].double().mean() <= target + 1e-12
    # no larger coverage is feasible
    for value in torch.unique(u):
        mask = u <= value
        if mask.double().mean() > t.coverage:
            assert 1 - correct[mask].double().mean() > target
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    assert choose_threshold(correct[perm], u[perm], target_error=target) == t
    bounded = choose_threshold(correct, u, target_error=target, confidence=0.9)
    assert bounded.coverage <= t.coverage
    if bounded.coverage > 0:
        assert bounded.error <= bounded.error_bound <= target
