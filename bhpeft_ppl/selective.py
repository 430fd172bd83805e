"""Selective prediction and out-of-distribution detection from predictive uncertainty.

With :math:`S` posterior draws :math:`p_s \\in \\Delta^{C-1}` for an example and their mean
:math:`\\bar p = \\tfrac1S \\sum_s p_s`, the uncertainty scores (larger = more uncertain) are

* ``max_prob``: :math:`1 - \\max_c \\bar p_c`,
* ``entropy``: :math:`H[\\bar p] = -\\sum_c \\bar p_c \\log \\bar p_c` (nats),
* ``mutual_information``: :math:`H[\\bar p] - \\tfrac1S \\sum_s H[p_s]` (clamped at 0),
* ``summed_variance``: :math:`\\sum_c \\tfrac{1}{S-1} \\sum_s (p_{s,c} - \\bar p_c)^2`, the
  BH-PEFT paper's score (0 when :math:`S = 1`).

A selective classifier predicts on the :math:`k` least uncertain of :math:`N` examples and
abstains on the rest. With the examples sorted by increasing uncertainty and
:math:`E_k` the number of errors among the first :math:`k`, its coverage is :math:`k/N` and its
selective risk :math:`r_k = E_k / k` (accuracy :math:`1 - r_k`). The area under the
risk-coverage curve (Geifman and El-Yaniv) is

.. math::

   \\mathrm{AURC} = \\tfrac1N \\textstyle\\sum_{k=1}^{N} r_k .

**Ties.** Examples of equal uncertainty cannot be told apart, so their order must not matter.
Inside a tie group that occupies sorted positions :math:`a+1, \\dots, a+m` and holds :math:`e`
errors, :math:`E_k` is replaced by its mean over all orders of the group,
:math:`E_a + (k - a)\\, e / m`; it equals the plain count at the group's ends. ``aurc``,
``accuracy_at_coverage`` and ``accuracy_after_rejection`` use these tie-averaged counts, so a
tie group cut part-way contributes its error rate fractionally. ``risk_coverage_curve`` lists
only the ends of tie groups, the operating points a threshold on the score can reach.

**OOD detection.** With the score of in-distribution examples :math:`u^{in}` and of OOD
examples :math:`u^{out}` (OOD is the positive class, expected to be more uncertain),

.. math::

   \\mathrm{AUROC} = \\frac{1}{N_{in} N_{out}} \\textstyle\\sum_{i,j}
   \\left([u^{out}_j > u^{in}_i] + \\tfrac12 [u^{out}_j = u^{in}_i]\\right),

the Mann-Whitney statistic with ties counted one half.
"""

from __future__ import annotations

import math

import torch

from .calibration import as_labels, as_probs

UNCERTAINTY_SCORES = ("max_prob", "entropy", "mutual_information", "summed_variance")
DEFAULT_REJECTION_FRACTIONS = tuple(i / 10 for i in range(10))


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0


def uncertainty(probs, score: str = "max_prob") -> torch.Tensor:
    """``[N]`` float64 uncertainty of each example (larger = more uncertain).

    :param probs: ``[S, N, C]`` class probabilities per posterior draw, or ``[N, C]`` (one draw).
    :param score: one of :data:`UNCERTAINTY_SCORES` (see the module docstring).
    """
    if score not in UNCERTAINTY_SCORES:
        raise ValueError(f"unknown uncertainty score {score!r}; use one of {UNCERTAINTY_SCORES}")
    probs = as_probs(probs, dims=(2, 3))
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)  # [1, N, C]
    mean = probs.mean(0)  # [N, C]
    if score == "max_prob":
        return 1.0 - mean.max(-1).values
    if score == "entropy":
        return _entropy(mean)
    if score == "mutual_information":
        return (_entropy(mean) - _entropy(probs).mean(0)).clamp_min(0.0)
    if probs.shape[0] < 2:
        return torch.zeros(probs.shape[1], dtype=torch.double)
    return probs.var(0, correction=1).sum(-1)  # [N]


def as_correct_and_uncertainty(correct, uncertainty) -> tuple[torch.Tensor, torch.Tensor]:
    """``correct`` as float64 0/1 ``[N]`` and ``uncertainty`` as float64 ``[N]``, checked."""
    correct = torch.as_tensor(correct)
    uncertainty = torch.as_tensor(uncertainty)
    if correct.dim() != 1 or uncertainty.dim() != 1 or correct.shape != uncertainty.shape:
        raise ValueError(
            "expected correct [N] and uncertainty [N] (one value per example), "
            f"got {tuple(correct.shape)} and {tuple(uncertainty.shape)}"
        )
    if correct.numel() == 0:
        raise ValueError("no examples to score; pass at least one example")
    correct = correct.double()
    if not ((correct == 0) | (correct == 1)).all():
        raise ValueError("correct must hold 0/1 or booleans (1 = prediction right); compare predictions with labels first")
    uncertainty = uncertainty.double()
    if not torch.isfinite(uncertainty).all():
        raise ValueError("uncertainty contains NaN or infinite values; pass finite scores")
    return correct, uncertainty


def _tie_averaged_errors(correct: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
    """``[N]`` errors among the ``k`` least uncertain, ``k = 1..N``, averaged over orders inside tie groups."""
    sorted_u, order = torch.sort(uncertainty, stable=True)  # [N], [N]
    errors = 1.0 - correct[order]  # [N]
    _, group, sizes = torch.unique_consecutive(sorted_u, return_inverse=True, return_counts=True)  # [N], [G]
    group_errors = torch.zeros(len(sizes), dtype=torch.double).index_add_(0, group, errors)  # [G]
    ends = sizes.cumsum(0)  # [G]
    starts = ends - sizes  # [G]
    errors_before = group_errors.cumsum(0) - group_errors  # [G]
    k = torch.arange(1, len(errors) + 1, dtype=torch.double)  # [N]
    return errors_before[group] + (k - starts[group]) * (group_errors / sizes)[group]  # [N]


def _kept(num: int, coverage: float) -> int:
    """Number of examples a ``coverage`` keeps: ``ceil(coverage * N)``, at least 1 (rounding noise ignored)."""
    return max(1, math.ceil(round(coverage * num, 6)))


def risk_coverage_curve(correct, uncertainty) -> dict[str, list[float]]:
    """Coverage, accuracy and risk of accepting the least uncertain examples, at each tie-group end.

    :returns: ``coverage``, ``accuracy``, ``risk`` and ``threshold`` lists, by increasing coverage;
        point ``i`` accepts the examples with ``uncertainty <= threshold[i]``, and the last point has
        coverage 1.
    """
    correct, uncertainty = as_correct_and_uncertainty(correct, uncertainty)
    values, sizes = torch.unique(uncertainty, sorted=True, return_counts=True)  # [G], [G]
    errors = _tie_averaged_errors(correct, uncertainty)  # [N]
    k = sizes.cumsum(0)  # [G]
    risk = errors[k - 1] / k  # [G]
    return {
        "coverage": (k.double() / len(correct)).tolist(),
        "accuracy": (1.0 - risk).tolist(),
        "risk": risk.tolist(),
        "threshold": values.tolist(),
    }


def aurc(correct, uncertainty) -> float:
    """Area under the risk-coverage curve: the mean selective risk over ``k = 1..N`` (tie-averaged)."""
    correct, uncertainty = as_correct_and_uncertainty(correct, uncertainty)
    errors = _tie_averaged_errors(correct, uncertainty)  # [N]
    k = torch.arange(1, len(errors) + 1, dtype=torch.double)  # [N]
    return float((errors / k).mean())


def accuracy_at_coverage(correct, uncertainty, coverage: float = 0.8) -> float:
    """Accuracy on the ``ceil(coverage * N)`` least uncertain examples (tie groups cut part-way count fractionally)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}; it is the fraction of examples to accept")
    correct, uncertainty = as_correct_and_uncertainty(correct, uncertainty)
    kept = _kept(len(correct), coverage)
    return float(1.0 - _tie_averaged_errors(correct, uncertainty)[kept - 1] / kept)


def accuracy_after_rejection(correct, uncertainty, fractions=DEFAULT_REJECTION_FRACTIONS) -> dict[float, float]:
    """The paper's protocol: ``{fraction: accuracy}`` after rejecting ``fraction`` of the most uncertain examples.

    Rejecting ``f`` keeps the ``N - floor(f * N)`` least uncertain examples, i.e. it is
    :func:`accuracy_at_coverage` at coverage ``1 - f``.
    """
    fractions = [float(f) for f in fractions]
    if not fractions:
        raise ValueError("fractions is empty; pass the fractions to reject, e.g. (0.0, 0.1, 0.2)")
    for f in fractions:
        if not 0 <= f < 1:
            raise ValueError(f"rejection fractions must lie in [0, 1), got {f}")
    correct, uncertainty = as_correct_and_uncertainty(correct, uncertainty)
    errors = _tie_averaged_errors(correct, uncertainty)  # [N]
    n = len(correct)
    result = {}
    for f in fractions:
        kept = max(1, n - math.floor(round(f * n, 6)))
        result[f] = float(1.0 - errors[kept - 1] / kept)
    return result


def ood_auroc(uncertainty_in, uncertainty_out) -> float:
    """AUROC of telling OOD examples (positive) from in-distribution ones by a larger uncertainty; ties count 1/2."""
    u_in = torch.as_tensor(uncertainty_in).double()
    u_out = torch.as_tensor(uncertainty_out).double()
    for name, u in (("uncertainty_in", u_in), ("uncertainty_out", u_out)):
        if u.dim() != 1 or u.numel() == 0:
            raise ValueError(f"expected {name} of shape [N] with at least one example, got {tuple(u.shape)}")
        if not torch.isfinite(u).all():
            raise ValueError(f"{name} contains NaN or infinite values; pass finite scores")
    sorted_in = torch.sort(u_in).values  # [N_in]
    below = torch.searchsorted(sorted_in, u_out, right=False).double()  # [N_out] in-scores < u_out
    below_or_equal = torch.searchsorted(sorted_in, u_out, right=True).double()  # [N_out] in-scores <= u_out
    return float((below + below_or_equal).sum() / (2 * len(u_in) * len(u_out)))


def selective_summary(probs, labels, score: str = "max_prob", coverage: float = 0.8) -> dict:
    """Selective-prediction scores of the model average of ``probs`` (``[S, N, C]`` or ``[N, C]``).

    :returns: ``score``, ``aurc``, ``accuracy_at_<100 * coverage>`` (``accuracy_at_80`` for the
        default 0.8, ``accuracy_at_92.5`` for 0.925) and ``accuracy_after_rejection``, a dict
        keyed by the fraction as a string (``"0.0"``, ``"0.1"``, ...) so it serialises to JSON.
    """
    u = uncertainty(probs, score)  # [N]
    probs = as_probs(probs, dims=(2, 3))
    mean = probs.mean(0) if probs.dim() == 3 else probs  # [N, C]
    labels = as_labels(labels, mean.shape[0], mean.shape[1])
    correct = mean.argmax(-1) == labels  # [N]
    return {
        "score": score,
        "aurc": aurc(correct, u),
        f"accuracy_at_{coverage * 100:g}": accuracy_at_coverage(correct, u, coverage),
        "accuracy_after_rejection": {str(round(f, 6)): a for f, a in accuracy_after_rejection(correct, u).items()},
    }
