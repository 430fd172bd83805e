"""Scores of predictive probabilities: accuracy, NLL, Brier, expected calibration error.

For probabilities :math:`p_n \\in \\Delta^{C-1}` and labels :math:`y_n`:

* NLL :math:`= -\\tfrac1N \\sum_n \\log p_{n, y_n}`,
* Brier :math:`= \\tfrac1N \\sum_n \\lVert p_n - e_{y_n} \\rVert^2`,
* ECE :math:`= \\sum_b \\tfrac{|B_b|}{N} \\lvert \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\rvert`
  over ``num_bins`` equal-width confidence bins (15, as BLoB reports).
"""

from __future__ import annotations

import torch


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs [N, C] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("no examples to score")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose most probable class is the label."""
    _check(probs, labels)
    return float((probs.argmax(-1) == labels).double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the label (nats)."""
    _check(probs, labels)
    return float(-torch.log(probs.double()[torch.arange(len(labels)), labels].clamp_min(eps)).mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared distance between ``probs`` and the one-hot label (summed over classes)."""
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return float(((probs.double() - onehot) ** 2).sum(-1).mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """Expected calibration error over ``num_bins`` equal-width confidence bins."""
    _check(probs, labels)
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == labels).double()
    bins = torch.clamp((confidence * num_bins).ceil().long() - 1, 0, num_bins - 1)  # bin b holds (b/B, (b+1)/B]
    gap = torch.zeros(num_bins, dtype=torch.double)
    gap.index_add_(0, bins, correct - confidence)
    return float(gap.abs().sum() / len(labels))


def summary(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``accuracy``, ``nll``, ``brier`` and ``ece`` of ``probs``."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels),
    }
