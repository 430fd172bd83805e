"""Scores of predictive probabilities: accuracy, NLL, Brier, calibration errors and reliability tables.

For probabilities :math:`p_n \\in \\Delta^{C-1}` and labels :math:`y_n`, with confidence
:math:`\\hat p_n = \\max_c p_{n,c}` and prediction :math:`\\hat y_n = \\arg\\max_c p_{n,c}`:

* NLL :math:`= -\\tfrac1N \\sum_n \\log p_{n, y_n}`,
* Brier :math:`= \\tfrac1N \\sum_n \\lVert p_n - e_{y_n} \\rVert^2`,
* ECE :math:`= \\sum_b \\tfrac{|B_b|}{N} \\lvert \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\rvert`,
* MCE :math:`= \\max_{b : |B_b| > 0} \\lvert \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\rvert`,

where :math:`\\mathrm{acc}(B) = \\tfrac{1}{|B|}\\sum_{n \\in B} [\\hat y_n = y_n]` and
:math:`\\mathrm{conf}(B) = \\tfrac{1}{|B|}\\sum_{n \\in B} \\hat p_n`. Two binnings of the confidences:

* ``"width"`` (the default, 15 bins as BLoB reports): bin :math:`b` holds
  :math:`(b/B, (b+1)/B]`; a confidence of exactly 0 goes to the first bin.
* ``"mass"`` (equal-mass, or adaptive, bins): sort the examples by confidence and cut the
  sorted list at positions :math:`\\lfloor kN/B \\rfloor`, :math:`k = 1, \\dots, B-1`, so bin
  sizes differ by at most one. Ties: examples of equal confidence always share a bin; a cut
  that falls inside a run of equal confidences moves to the end of that run. A bin can then
  come out empty and is dropped, so fewer than ``num_bins`` bins may result (one bin when all
  confidences are equal). This makes every score independent of the order of the examples.
"""

from __future__ import annotations

from numbers import Integral

import torch

BINNINGS = ("width", "mass")


def as_probs(probs, name: str = "probs", dims: tuple[int, ...] = (2,)) -> torch.Tensor:
    """``probs`` as a float64 tensor, checked: ``dims`` dimensions, non-empty, finite, in [0, 1], rows summing to 1."""
    probs = torch.as_tensor(probs).double()
    if probs.dim() not in dims:
        shapes = " or ".join({2: "[N, C]", 3: "[S, N, C]"}[d] for d in dims)
        raise ValueError(
            f"expected {name} of shape {shapes}, got {tuple(probs.shape)}; pass one row of class probabilities per example"
        )
    if probs.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(probs.shape)}); pass at least one example and one class")
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} contains NaN or infinite values; pass probabilities (softmax the logits first)")
    if probs.min() < 0 or probs.max() > 1:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{float(probs.min()):g}, {float(probs.max()):g}]; "
            "pass probabilities, not logits (softmax them first)"
        )
    worst = float((probs.sum(-1) - 1).abs().max())
    if worst > 1e-3:
        raise ValueError(
            f"each row of {name} must sum to 1 over classes, found a row off by {worst:g}; normalise the probabilities"
        )
    return probs


def as_labels(labels, num_examples: int, num_classes: int) -> torch.Tensor:
    """``labels`` as a long tensor ``[N]`` of class indices in ``[0, C)``."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != num_examples:
        raise ValueError(f"expected labels of shape [{num_examples}] (one class index per example), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        if not torch.equal(labels, labels.round()):
            raise ValueError("labels must be integer class indices, got non-integer values")
    elif labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes, "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def _prepare(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    probs = as_probs(probs)  # [N, C]
    return probs, as_labels(labels, probs.shape[0], probs.shape[1])


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    _prepare(probs, labels)


def accuracy(probs, labels) -> float:
    """Fraction of examples whose most probable class is the label."""
    probs, labels = _prepare(probs, labels)
    return float((probs.argmax(-1) == labels).double().mean())


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the label (nats)."""
    probs, labels = _prepare(probs, labels)
    return float(-torch.log(probs[torch.arange(len(labels)), labels].clamp_min(eps)).mean())


def brier(probs, labels) -> float:
    """Mean squared distance between ``probs`` and the one-hot label (summed over classes)."""
    probs, labels = _prepare(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()  # [N, C]
    return float(((probs - onehot) ** 2).sum(-1).mean())


def _binned(probs, labels, num_bins: int, binning: str):
    """Per-bin ``lower``, ``upper`` bounds and ``count``, ``correct`` and ``confidence`` sums."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, Integral) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    if binning not in BINNINGS:
        raise ValueError(f"unknown binning {binning!r}; use one of {BINNINGS}")
    num_bins = int(num_bins)
    probs, labels = _prepare(probs, labels)
    confidence, predicted = probs.max(-1)  # [N], [N]
    correct = (predicted == labels).double()  # [N]
    if binning == "width":
        bins = torch.clamp((confidence * num_bins).ceil().long() - 1, 0, num_bins - 1)  # [N]; bin b holds (b/B, (b+1)/B]
        lower = [b / num_bins for b in range(num_bins)]
        upper = [(b + 1) / num_bins for b in range(num_bins)]
        size = num_bins
    else:
        n = len(labels)
        sorted_conf, order = torch.sort(confidence, stable=True)  # [N], [N]
        # a cut at position k (between sorted items k-1 and k) moves to the end of its run of ties
        ends = {
            int(torch.searchsorted(sorted_conf, sorted_conf[k - 1], right=True))
            for k in (b * n // num_bins for b in range(1, num_bins))
            if k > 0
        }
        cuts = sorted(ends | {n})
        starts = [0, *cuts[:-1]]
        ranks = torch.empty(n, dtype=torch.long)
        ranks[order] = torch.arange(n)
        bins = torch.searchsorted(torch.tensor(cuts), ranks, right=True)  # [N]
        lower = [float(sorted_conf[s]) for s in starts]
        upper = [float(sorted_conf[c - 1]) for c in cuts]
        size = len(cuts)
    count = torch.zeros(size, dtype=torch.double).index_add_(0, bins, torch.ones_like(correct))  # [B]
    hits = torch.zeros(size, dtype=torch.double).index_add_(0, bins, correct)  # [B]
    conf = torch.zeros(size, dtype=torch.double).index_add_(0, bins, confidence)  # [B]
    return lower, upper, count, hits, conf


def ece(probs, labels, num_bins: int = 15, binning: str = "width") -> float:
    """Expected calibration error over ``num_bins`` confidence bins.

    :param binning: ``"width"`` for equal-width bins, ``"mass"`` for equal-mass bins (see the module docstring for ties).
    """
    _, _, count, hits, conf = _binned(probs, labels, num_bins, binning)
    return float((hits - conf).abs().sum() / count.sum())


def mce(probs, labels, num_bins: int = 15, binning: str = "width") -> float:
    """Maximum calibration error: the largest ``|accuracy - confidence|`` over the non-empty bins."""
    _, _, count, hits, conf = _binned(probs, labels, num_bins, binning)
    full = count > 0
    return float(((hits[full] - conf[full]) / count[full]).abs().max())


def reliability_table(probs, labels, num_bins: int = 15, binning: str = "width") -> list[dict]:
    """One dict per bin, in order of confidence: ``lower``, ``upper``, ``count``, ``accuracy``, ``confidence``, ``gap``.

    ``gap`` is ``accuracy - confidence`` (negative where the model is over-confident). For
    ``"width"`` binning every one of the ``num_bins`` bins is listed, ``lower`` and ``upper``
    being its edges; an empty bin has ``count`` 0 and ``None`` for ``accuracy``, ``confidence``
    and ``gap``. For ``"mass"`` binning only the non-empty bins exist, and ``lower`` and
    ``upper`` are the smallest and largest confidence in the bin.
    """
    lower, upper, count, hits, conf = _binned(probs, labels, num_bins, binning)
    table = []
    for b in range(len(lower)):
        n = int(count[b])
        acc = float(hits[b] / n) if n else None
        mean_conf = float(conf[b] / n) if n else None
        gap = acc - mean_conf if n else None
        table.append({"lower": lower[b], "upper": upper[b], "count": n, "accuracy": acc, "confidence": mean_conf, "gap": gap})
    return table


def summary(probs, labels) -> dict[str, float]:
    """``accuracy``, ``nll``, ``brier``, ``ece`` (equal-width bins), ``ece_mass`` (equal-mass) and ``mce`` (equal-width)."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels),
        "ece_mass": ece(probs, labels, binning="mass"),
        "mce": mce(probs, labels),
    }
