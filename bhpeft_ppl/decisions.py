"""Decisions from predictive probabilities: Bayes actions under a cost matrix, and abstention thresholds.

**Bayes decisions.** With predictive probabilities :math:`p_n` over :math:`C` classes and a cost
matrix :math:`L \\in \\mathbb{R}^{C \\times A}`, :math:`L_{c,a}` the cost of action :math:`a`
when the true class is :math:`c`, the expected cost of action :math:`a` is

.. math::

   R_{n,a} = \\textstyle\\sum_c p_{n,c} L_{c,a},

and the Bayes action minimises it (the lowest index wins a tie). With an abstention cost
:math:`\\lambda` (the cost of handing the example to a human) the decision abstains when
:math:`\\lambda < \\min_a R_{n,a}`. With the 0-1 cost :math:`L = 1 - I` the Bayes action is the
arg-max class and abstention happens when :math:`\\max_c p_{n,c} < 1 - \\lambda` (Chow's rule).

**Thresholds with guaranteed risk.** On validation data with uncertainty :math:`u_n` and
correctness of the prediction, accepting the examples with :math:`u_n \\le t` gives
:math:`k_t` accepted examples with :math:`e_t` errors. :func:`choose_threshold` returns the
candidate :math:`t` (the distinct validation scores) with the largest coverage :math:`k_t/N`
such that

* without ``confidence``: the empirical error :math:`e_t / k_t \\le` ``target_error``;
* with ``confidence`` :math:`1 - \\delta`: the one-sided Clopper-Pearson upper bound
  :math:`\\bar r_t = \\mathrm{Beta}^{-1}(1 - \\delta/m;\\; e_t + 1, k_t - e_t)` (1 when
  :math:`e_t = k_t`) is :math:`\\le` ``target_error``. Each of the :math:`m` candidates is bounded
  at level :math:`1 - \\delta/m` (a Bonferroni correction over every candidate tested, more
  conservative than the :math:`\\lceil\\log_2 m\\rceil` tests of Geifman and El-Yaniv's binary
  search but free of its monotonicity assumption), so with probability at least
  :math:`1 - \\delta` over the validation labels every bound holds at once, and in particular
  the error rate of the chosen rule on data like the validation data is at most ``target_error``.

Error rates need not fall monotonically with the threshold, so every candidate is checked and
the largest feasible one is kept. If none is feasible the rule accepts nothing:
``threshold = -inf``, ``coverage = 0``, ``error = 0`` (and ``error_bound = 0`` with confidence);
no error is raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import beta

from .calibration import as_labels, as_probs
from .selective import as_correct_and_uncertainty


@dataclass
class Decisions:
    """Output of :func:`bayes_decisions` for ``N`` examples and ``A`` actions.

    :ivar actions: ``[N]`` long, the chosen action, ``-1`` = abstain.
    :ivar expected_cost: ``[N]`` float64, the expected cost of the chosen action (the abstention cost where abstaining).
    :ivar action_costs: ``[N, A]`` float64, the expected cost of every action.
    """

    actions: torch.Tensor
    expected_cost: torch.Tensor
    action_costs: torch.Tensor

    @property
    def abstained(self) -> torch.Tensor:
        """``[N]`` bool, where the decision is to abstain."""
        return self.actions == -1

    def to_dict(self) -> dict[str, list]:
        """The three fields as nested lists, for JSON."""
        return {
            "actions": self.actions.tolist(),
            "expected_cost": self.expected_cost.tolist(),
            "action_costs": self.action_costs.tolist(),
        }


@dataclass
class Threshold:
    """Output of :func:`choose_threshold`; accept an example when its uncertainty is ``<= threshold``.

    :ivar threshold: the uncertainty threshold (``-inf``: accept nothing).
    :ivar coverage: fraction of the validation examples accepted.
    :ivar error: empirical error rate among the accepted validation examples (0 when none).
    :ivar error_bound: Clopper-Pearson upper bound of that error (Bonferroni-corrected), ``None`` without ``confidence``.
    :ivar target_error: the requested error rate.
    :ivar confidence: the requested confidence, or ``None``.
    """

    threshold: float
    coverage: float
    error: float
    error_bound: float | None
    target_error: float
    confidence: float | None


def _as_cost(cost, num_classes: int) -> torch.Tensor:
    cost = torch.as_tensor(cost).double()
    if cost.dim() != 2 or cost.shape[0] != num_classes or cost.shape[1] == 0:
        raise ValueError(
            f"expected cost of shape [C, A] = [{num_classes}, A] (cost[true_class, action]) for {num_classes} classes, "
            f"got {tuple(cost.shape)}"
        )
    if not torch.isfinite(cost).all():
        raise ValueError("cost contains NaN or infinite values; every cost must be a finite number")
    return cost


def _as_abstain_cost(abstain_cost) -> float | None:
    if abstain_cost is None:
        return None
    abstain_cost = float(abstain_cost)
    if not math.isfinite(abstain_cost):
        raise ValueError(f"abstain_cost must be a finite number (or None for no abstention), got {abstain_cost}")
    return abstain_cost


def bayes_decisions(probs, cost, abstain_cost: float | None = None) -> Decisions:
    """Bayes actions minimising the expected cost under ``probs``, abstaining where that is cheaper.

    :param probs: ``[N, C]`` predictive probabilities (e.g. the model average).
    :param cost: ``[C, A]`` with ``cost[true_class, action]``.
    :param abstain_cost: cost of abstaining (handing the example to a human); ``None`` never abstains.
    """
    probs = as_probs(probs)  # [N, C]
    cost = _as_cost(cost, probs.shape[1])  # [C, A]
    abstain_cost = _as_abstain_cost(abstain_cost)
    action_costs = probs @ cost  # [N, A]
    actions = action_costs.argmin(-1)  # [N], the first index among ties
    expected_cost = action_costs.min(-1).values  # [N]
    if abstain_cost is not None:
        abstain = abstain_cost < expected_cost  # [N]
        actions = torch.where(abstain, torch.full_like(actions, -1), actions)
        expected_cost = torch.where(abstain, torch.full_like(expected_cost, abstain_cost), expected_cost)
    return Decisions(actions=actions, expected_cost=expected_cost, action_costs=action_costs)


def realised_cost(decisions: Decisions, labels, cost, abstain_cost: float | None = None) -> float:
    """Mean cost actually incurred: ``cost[label, action]``, or ``abstain_cost`` where the decision abstained."""
    actions = torch.as_tensor(decisions.actions).long()  # [N]
    cost = torch.as_tensor(cost).double()
    if cost.dim() != 2:
        raise ValueError(f"expected cost of shape [C, A] (cost[true_class, action]), got {tuple(cost.shape)}")
    cost = _as_cost(cost, cost.shape[0])  # [C, A]
    labels = as_labels(labels, len(actions), cost.shape[0])  # [N]
    abstain_cost = _as_abstain_cost(abstain_cost)
    abstained = actions == -1  # [N]
    if abstained.any() and abstain_cost is None:
        raise ValueError("some decisions abstain but abstain_cost is None; pass the abstention cost used to make them")
    if ((actions < -1) | (actions >= cost.shape[1])).any():
        raise ValueError(f"actions must lie in [-1, {cost.shape[1]}) for a cost matrix with {cost.shape[1]} actions")
    incurred = cost[labels, actions.clamp_min(0)]  # [N]
    if abstain_cost is not None:
        incurred = torch.where(abstained, torch.full_like(incurred, abstain_cost), incurred)
    return float(incurred.mean())


def _clopper_pearson_upper(errors: torch.Tensor, accepted: torch.Tensor, level: float) -> torch.Tensor:
    """One-sided upper confidence bound at ``level`` of a binomial rate with ``errors`` out of ``accepted``."""
    e = errors.round().numpy()
    k = accepted.double().numpy()
    bound = torch.as_tensor(beta.ppf(level, e + 1, (k - e).clip(min=1)), dtype=torch.double)
    return torch.where(errors.round() >= accepted, torch.ones_like(bound), bound)


def choose_threshold(correct, uncertainty, target_error: float, confidence: float | None = None) -> Threshold:
    """Largest-coverage threshold whose (bounded) error rate on validation data is at most ``target_error``.

    :param correct: ``[N]`` bool or 0/1, whether the prediction on each validation example is right.
    :param uncertainty: ``[N]`` score, larger = more uncertain (see :func:`bhpeft_ppl.selective.uncertainty`).
    :param target_error: the largest acceptable error rate among accepted examples, in [0, 1).
    :param confidence: e.g. 0.95 to bound the error with that probability (Clopper-Pearson with a
        Bonferroni correction over the candidate thresholds, see the module docstring); ``None``
        uses the empirical error.
    """
    if not 0 <= target_error < 1:
        raise ValueError(f"target_error must lie in [0, 1), got {target_error}; it is the acceptable error rate")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), e.g. 0.95, or be None; got {confidence}")
    correct, uncertainty = as_correct_and_uncertainty(correct, uncertainty)
    n = len(correct)
    values, group = torch.unique(uncertainty, sorted=True, return_inverse=True)  # [G], [N]
    accepted = torch.zeros(len(values), dtype=torch.double).index_add_(0, group, torch.ones_like(correct)).cumsum(0)  # [G]
    errors = torch.zeros(len(values), dtype=torch.double).index_add_(0, group, 1.0 - correct).cumsum(0)  # [G]
    rate = errors / accepted  # [G]
    bound = None
    if confidence is None:
        feasible = rate <= target_error  # [G]
    else:
        bound = _clopper_pearson_upper(errors, accepted, 1.0 - (1.0 - confidence) / len(values))  # [G]
        feasible = bound <= target_error  # [G]
    if not feasible.any():
        return Threshold(
            threshold=-math.inf,
            coverage=0.0,
            error=0.0,
            error_bound=None if confidence is None else 0.0,
            target_error=float(target_error),
            confidence=None if confidence is None else float(confidence),
        )
    best = int(torch.nonzero(feasible).max())
    return Threshold(
        threshold=float(values[best]),
        coverage=float(accepted[best] / n),
        error=float(rate[best]),
        error_bound=None if bound is None else float(bound[best]),
        target_error=float(target_error),
        confidence=None if confidence is None else float(confidence),
    )


def accept(uncertainty, threshold: Threshold | float) -> torch.Tensor:
    """``[N]`` bool mask of the examples to accept: ``uncertainty <= threshold``."""
    if isinstance(threshold, Threshold):
        threshold = threshold.threshold
    uncertainty = torch.as_tensor(uncertainty).double()
    if uncertainty.dim() != 1:
        raise ValueError(f"expected uncertainty of shape [N], got {tuple(uncertainty.shape)}")
    if torch.isnan(uncertainty).any():
        raise ValueError("uncertainty contains NaN values; pass finite scores")
    return uncertainty <= float(threshold)
