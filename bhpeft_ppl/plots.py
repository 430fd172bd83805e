"""Diagnostic plots of a fit and of its predictions, written as PNG files.

Every function draws on a :class:`matplotlib.figure.Figure` with the Agg canvas (never
``pyplot``, so nothing needs a display or touches global state), writes one PNG atomically
(:func:`bhpeft_ppl.files.atomic_write`) and returns its :class:`~pathlib.Path`. Inputs may be
torch tensors or numpy arrays.

How to read them:

* :func:`reliability_diagram` -- accuracy of the predictions in each equal-width confidence bin
  (bars) against the diagonal of perfect calibration; the hatched gap is the difference between
  accuracy and mean confidence in the bin. Bars below the diagonal mean over-confidence, above it
  under-confidence. The lower panel counts the predictions per bin: gaps in sparse bins matter
  little to the ECE (in the title), which weights each bin by its share of the examples.
* :func:`elbo_trace` -- the SVI loss (negative ELBO, raw and a moving average) per step, which
  should fall and flatten; the expected log-likelihood (should rise) and the KL divergence of the
  guide from the prior (own axis: it can be orders of magnitude larger); and the learning rate.
* :func:`accuracy_coverage` -- selective prediction: keeping only the fraction ``coverage`` of
  examples an uncertainty score is most sure of, the accuracy on them. A good score gives a curve
  that falls slowly from high accuracy at low coverage to the overall accuracy at coverage 1;
  a higher curve (larger area) ranks errors better.
* :func:`uncertainty_histograms` -- density histograms of an uncertainty score for correct and for
  wrong predictions. The less the two overlap (wrong ones to the right), the better the score
  separates errors from correct predictions.
* :func:`posterior_densities` -- kernel density estimates of the posterior marginals of a few
  scalar elements of the sampled variables (for a matrix, the elements with the largest posterior
  standard deviation), with the mean and the 94% highest-density interval. Multimodal or very
  wide marginals point at weakly identified parameters.

:func:`save_all` writes whichever of these have their inputs to one folder, with fixed names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bhpeft_ppl.files import atomic_write

if TYPE_CHECKING:
    import arviz

__all__ = [
    "FILE_NAMES",
    "accuracy_coverage",
    "elbo_trace",
    "posterior_densities",
    "reliability_bins",
    "reliability_diagram",
    "save_all",
    "uncertainty_histograms",
]

DPI = 120

#: File names :func:`save_all` writes, by plot.
FILE_NAMES = {
    "reliability": "reliability.png",
    "elbo_trace": "elbo_trace.png",
    "accuracy_coverage": "accuracy_coverage.png",
    "uncertainty_histogram": "uncertainty_histogram.png",
    "posterior_densities": "posterior_densities.png",
}


def _numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """``x`` (a torch tensor, numpy array or sequence) as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x, dtype=dtype)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically, then free it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        fig.clear()


def reliability_bins(probs: Any, labels: Any, num_bins: int = 15) -> dict[str, Any]:
    """Per-bin statistics of a reliability diagram, consistent with :func:`bhpeft_ppl.calibration.ece`.

    Bin ``b`` holds the confidences in :math:`(b/B, (b+1)/B]`; a confidence of 0 goes to bin 0.

    :param probs: predictive probabilities ``[N, C]``.
    :param labels: integer labels ``[N]``.
    :param num_bins: number ``B`` of equal-width confidence bins.
    :returns: ``edges [B+1]``, ``count [B]`` (int), ``accuracy [B]`` and ``confidence [B]``
        (mean per bin; NaN for empty bins), ``bin [N]`` (the bin of each example) and ``ece``.
    :raises ValueError: shapes do not match, there are no examples, or ``num_bins < 1``.
    """
    probs = _numpy(probs, np.float64)
    labels = _numpy(labels)
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs [N, C] and labels [N], got {probs.shape} and {labels.shape}")
    if probs.shape[0] == 0:
        raise ValueError("no examples to plot")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    sum_correct = np.bincount(bins, weights=correct, minlength=num_bins)
    sum_conf = np.bincount(bins, weights=confidence, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, sum_correct / count, np.nan)
        conf = np.where(count > 0, sum_conf / count, np.nan)
    ece = float(np.abs(sum_correct - sum_conf).sum() / len(labels))
    return {
        "edges": np.linspace(0.0, 1.0, num_bins + 1),
        "count": count,
        "accuracy": acc,
        "confidence": conf,
        "bin": bins,
        "ece": ece,
    }


def reliability_diagram(probs: Any, labels: Any, path: str | os.PathLike, num_bins: int = 15, title: str = "Reliability") -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with a histogram of counts.

    :param probs: predictive probabilities ``[N, C]``.
    :param labels: integer labels ``[N]``.
    :param path: the PNG to write.
    :param num_bins: number of equal-width confidence bins (as for :func:`bhpeft_ppl.calibration.ece`).
    :param title: figure title; the ECE is appended.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    :raises ValueError: see :func:`reliability_bins`.
    """
    stats = reliability_bins(probs, labels, num_bins)
    edges, count, acc, conf = stats["edges"], stats["count"], stats["accuracy"], stats["confidence"]
    left, width = edges[:-1], np.diff(edges)
    full = count > 0

    fig = _figure(6.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Perfect calibration")
    top.bar(left[full], acc[full], width=width[full], align="edge", color="tab:blue", edgecolor="black", label="Accuracy")
    gap_low = np.minimum(acc, conf)[full]
    gap_high = np.maximum(acc, conf)[full]
    top.bar(
        left[full],
        gap_high - gap_low,
        bottom=gap_low,
        width=width[full],
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="Gap to mean confidence",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("Accuracy")
    top.set_title(f"{title} (ECE = {stats['ece']:.4f}, N = {len(stats['bin'])}, {num_bins} bins)")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)

    bottom.bar(left, count, width=width, align="edge", color="tab:grey", edgecolor="black")
    bottom.set_xlabel("Confidence (max predicted probability)")
    bottom.set_ylabel("Count")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def _moving_average(values: np.ndarray, half: int) -> np.ndarray:
    """Centred mean of the finite values within ``half`` steps either side (shorter windows at the ends)."""
    finite = np.isfinite(values)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    cnum = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(len(values))
    start = np.maximum(idx - half, 0)
    end = np.minimum(idx + half + 1, len(values))
    n = cnum[end] - cnum[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (csum[end] - csum[start]) / np.maximum(n, 1), np.nan)


def elbo_trace(history: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str = "SVI trace") -> Path:
    """SVI trace: negative ELBO (raw and moving average), log-likelihood and KL, learning rate.

    :param history: equal-length lists under ``step`` and ``loss`` (negative ELBO), and optionally
        ``log_likelihood``, ``kl`` and ``lr`` (as in :attr:`bhpeft_ppl.infer.FitResult.history`);
        a missing or empty optional list is left out of the plot.
    :param path: the PNG to write.
    :param title: figure title.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    :raises ValueError: ``step`` or ``loss`` is missing or empty, or the lists differ in length.
    """
    for key in ("step", "loss"):
        if key not in history or len(history[key]) == 0:
            raise ValueError(f"history needs a non-empty {key!r} list, got keys {sorted(history)}")
    steps = _numpy(history["step"], np.float64)
    series: dict[str, np.ndarray] = {}
    for key in ("loss", "log_likelihood", "kl", "lr"):
        values = history.get(key)
        if values is None or len(values) == 0:
            continue
        arr = _numpy([np.nan if v is None else float(v) for v in values], np.float64)
        if len(arr) != len(steps):
            raise ValueError(f"history[{key!r}] has {len(arr)} entries but history['step'] has {len(steps)}")
        series[key] = np.where(np.isfinite(arr), arr, np.nan)

    n = len(steps)
    marker = "o" if n <= 2 else None
    has_fit_terms = "log_likelihood" in series or "kl" in series
    num_panels = 1 + has_fit_terms + ("lr" in series)
    fig = _figure(8.0, 2.8 * num_panels + 0.4)
    axes = np.atleast_1d(fig.subplots(num_panels, 1, sharex=True))
    fig.suptitle(f"{title} ({n} step{'s' if n != 1 else ''})")

    ax = axes[0]
    half = min(50, max(n // 40, 2 if n >= 10 else 0))
    ax.plot(steps, series["loss"], color="tab:blue", alpha=0.35 if half else 1.0, marker=marker, label="Negative ELBO")
    if half:
        smooth = _moving_average(series["loss"], half)
        ax.plot(steps, smooth, color="tab:blue", label=f"Centred moving average ({2 * half + 1} steps)")
    loss = series["loss"][np.isfinite(series["loss"])]
    if loss.size and loss.min() > 0 and loss.max() / loss.min() > 100:
        ax.set_yscale("log")
    ax.set_ylabel("Negative ELBO")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)

    panel = 1
    if has_fit_terms:
        ax = axes[panel]
        panel += 1
        handles = []
        if "log_likelihood" in series:
            handles += ax.plot(steps, series["log_likelihood"], color="tab:green", marker=marker, label="Expected log-likelihood")
            ax.set_ylabel("Expected log-likelihood", color="tab:green")
            kl_ax = ax.twinx() if "kl" in series else None
        else:
            kl_ax = ax
        if kl_ax is not None:
            handles += kl_ax.plot(steps, series["kl"], color="tab:orange", marker=marker, label="KL(guide || prior)")
            kl_ax.set_ylabel("KL divergence", color="tab:orange")
        ax.legend(handles=handles, loc="center right")
        ax.grid(alpha=0.3)

    if "lr" in series:
        ax = axes[panel]
        lr = series["lr"]
        ax.plot(steps, lr, color="tab:purple", marker=marker, label="Learning rate")
        positive = lr[np.isfinite(lr)]
        if positive.size and positive.min() > 0 and positive.max() / positive.min() > 10:
            ax.set_yscale("log")
        ax.set_ylabel("Learning rate")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)

    axes[-1].set_xlabel("Step")
    if n == 1 and np.isfinite(steps[0]):
        axes[-1].set_xlim(steps[0] - 1, steps[0] + 1)
    return _save(fig, path)


def accuracy_coverage(
    curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike, title: str = "Selective prediction"
) -> Path:
    """Accuracy-coverage curves, one line per uncertainty score or method.

    :param curves: name -> ``{"coverage": [...], "accuracy": [...]}`` (equal lengths, coverage in ``[0, 1]``).
    :param path: the PNG to write.
    :param title: figure title.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    :raises ValueError: ``curves`` is empty, or a curve lacks a list or has lists of different lengths.
    """
    if not curves:
        raise ValueError("no curves to plot")
    fig = _figure(6.5, 5.0)
    ax = fig.subplots()
    for name, curve in curves.items():
        if "coverage" not in curve or "accuracy" not in curve:
            raise ValueError(f"curve {name!r} needs 'coverage' and 'accuracy' lists, got keys {sorted(curve)}")
        coverage = _numpy(curve["coverage"], np.float64).ravel()
        acc = _numpy(curve["accuracy"], np.float64).ravel()
        if len(coverage) != len(acc):
            raise ValueError(f"curve {name!r} has {len(coverage)} coverages but {len(acc)} accuracies")
        order = np.argsort(coverage, kind="stable")
        coverage, acc = coverage[order], acc[order]
        label = str(name)
        ok = np.isfinite(coverage) & np.isfinite(acc)
        if ok.sum() >= 2 and np.ptp(coverage[ok]) > 0:
            label += f" (area {np.trapezoid(acc[ok], coverage[ok]):.3f})"
        ax.plot(coverage, acc, marker="o" if len(coverage) <= 20 else None, markersize=4, label=label)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Coverage (fraction of examples kept)")
    ax.set_ylabel("Accuracy on kept examples")
    ax.set_title(title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def uncertainty_histograms(uncertainty: Any, correct: Any, path: str | os.PathLike, score_name: str = "uncertainty") -> Path:
    """Overlaid density histograms of an uncertainty score for correct and for wrong predictions.

    :param uncertainty: scores ``[N]`` (non-finite ones are left out and counted in the title).
    :param correct: whether each prediction was correct ``[N]`` (bool).
    :param path: the PNG to write.
    :param score_name: name of the score, for the title and x axis.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    :raises ValueError: the inputs are not both ``[N]`` or are empty.
    """
    score = _numpy(uncertainty, np.float64)
    right = _numpy(correct).astype(bool)
    if score.ndim != 1 or right.shape != score.shape:
        raise ValueError(f"expected uncertainty [N] and correct [N], got {score.shape} and {right.shape}")
    if score.size == 0:
        raise ValueError("no examples to plot")
    finite = np.isfinite(score)
    dropped = int((~finite).sum())
    score, right = score[finite], right[finite]

    fig = _figure(6.5, 4.5)
    ax = fig.subplots()
    if score.size:
        low, high = float(score.min()), float(score.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, int(np.clip(np.sqrt(score.size), 10, 50)) + 1)
        for mask, name, color in ((right, "Correct", "tab:blue"), (~right, "Wrong", "tab:red")):
            values = score[mask]
            label = f"{name} (n = {values.size})"
            if values.size == 0:
                ax.plot([], [], color=color, label=label + ": none")
                continue
            ax.hist(values, bins=edges, density=True, alpha=0.5, color=color, edgecolor=color, label=label)
            ax.axvline(values.mean(), color=color, linestyle="--", linewidth=1.2, label=f"{name} mean {values.mean():.3g}")
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    note = f", {dropped} non-finite left out" if dropped else ""
    ax.set_title(f"{score_name} of correct and wrong predictions{note}")
    ax.set_xlabel(score_name)
    ax.set_ylabel("Density")
    if score.size:
        ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _element_label(name: str, index: tuple[int, ...]) -> str:
    return f"{name}[{','.join(str(i) for i in index)}]" if index else str(name)


def _pick_elements(idata: arviz.InferenceData, var_names: Sequence[str] | None, max_vars: int) -> list[tuple[str, np.ndarray]]:
    """Up to ``max_vars`` (label, flat draws) pairs: per variable, the elements with the largest posterior sd."""
    posterior = idata.posterior
    available = [str(v) for v in posterior.data_vars]
    if var_names is None:
        names = available[:max_vars]
    else:
        names = [var_names] if isinstance(var_names, str) else list(var_names)
        missing = [v for v in names if v not in available]
        if missing:
            raise ValueError(f"no posterior variables {missing}; available: {available}")
        names = names[:max_vars]
    if not names:
        raise ValueError("the posterior has no variables to plot")
    # Share the max_vars panels round-robin among the variables, first ones first, skipping full ones.
    sizes = [math.prod(posterior[name].shape[2:]) for name in names]
    slots = [0] * len(names)
    while sum(slots) < max_vars and any(s < n for s, n in zip(slots, sizes, strict=True)):
        for i in range(len(names)):
            if sum(slots) < max_vars and slots[i] < sizes[i]:
                slots[i] += 1
    picked: list[tuple[str, np.ndarray]] = []
    for name, slot in zip(names, slots, strict=True):
        if slot == 0:
            continue
        values = np.asarray(posterior[name].values, dtype=np.float64)  # (chain, draw, *shape)
        shape = values.shape[2:]
        flat = values.reshape(-1, math.prod(shape))  # (chain * draw, elements)
        finite = np.isfinite(flat)
        count = finite.sum(0)
        mean = np.where(finite, flat, 0.0).sum(0) / np.maximum(count, 1)
        sd = np.sqrt(np.where(finite, (flat - mean) ** 2, 0.0).sum(0) / np.maximum(count, 1))
        sd = np.where(count > 0, sd, -np.inf)
        for k in np.argsort(-sd, kind="stable")[:slot]:
            index = tuple(int(i) for i in np.unravel_index(int(k), shape)) if shape else ()
            picked.append((_element_label(name, index), flat[:, k]))
    return picked


def posterior_densities(
    idata: arviz.InferenceData, path: str | os.PathLike, var_names: Sequence[str] | None = None, max_vars: int = 6
) -> Path:
    """Posterior marginal densities (KDE, mean, 94% HDI) of up to ``max_vars`` scalar elements.

    For a multi-dimensional variable the elements with the largest posterior standard deviation
    are shown, labelled like ``w[0,3]``; the panels are shared among the chosen variables.

    :param idata: an :class:`arviz.InferenceData` with a ``posterior`` group (dims ``chain, draw, ...``).
    :param path: the PNG to write.
    :param var_names: variables to plot; ``None`` takes the first ``max_vars`` variables.
    :param max_vars: the most panels (scalar elements) to draw.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    :raises ValueError: no ``posterior`` group, unknown ``var_names``, nothing to plot, or ``max_vars < 1``.
    """
    import arviz as az

    if max_vars < 1:
        raise ValueError(f"max_vars must be at least 1, got {max_vars}")
    if "posterior" not in getattr(idata, "groups", lambda: [])():
        raise ValueError("idata has no 'posterior' group")
    picked = _pick_elements(idata, var_names, max_vars)
    posterior = idata.posterior
    chains = posterior.sizes.get("chain", 1)
    draws = posterior.sizes.get("draw", 0)

    cols = min(3, len(picked))
    rows = math.ceil(len(picked) / cols)
    fig = _figure(4.0 * cols, 3.0 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    plural = "s" if chains != 1 else ""
    fig.suptitle(f"Posterior marginal densities: KDE, 94% HDI shaded, mean dashed ({chains} chain{plural} x {draws} draws)")
    for ax, (label, values) in zip(axes, picked, strict=False):
        values = values[np.isfinite(values)]
        ax.set_xlabel("value")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        if values.size == 0:
            ax.set_title(label)
            ax.text(0.5, 0.5, "no finite draws", ha="center", va="center", transform=ax.transAxes)
            continue
        mean = float(values.mean())
        if values.size < 2 or np.ptp(values) == 0:
            ax.set_title(f"{label}\nconstant {mean:.3g}", fontsize="medium")
            ax.axvline(mean, color="tab:blue")
            ax.set_xlim(mean - max(1.0, abs(mean)) / 2, mean + max(1.0, abs(mean)) / 2)
            ax.set_yticks([])
            continue
        grid, pdf = az.kde(values)
        low, high = (float(v) for v in az.hdi(values, hdi_prob=0.94))
        ax.set_title(f"{label}\nmean {mean:.3g}, 94% HDI [{low:.3g}, {high:.3g}]", fontsize="medium")
        ax.plot(grid, pdf, color="tab:blue")
        ax.fill_between(grid, 0, pdf, where=(grid >= low) & (grid <= high), color="tab:blue", alpha=0.2)
        ax.axvline(mean, color="black", linestyle="--", linewidth=1)
        ax.set_ylim(bottom=0)
    for ax in axes[len(picked) :]:
        ax.set_visible(False)
    return _save(fig, path)


def save_all(
    out_dir: str | os.PathLike,
    *,
    probs: Any = None,
    labels: Any = None,
    history: Mapping[str, Sequence[float]] | None = None,
    curves: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    uncertainty: Any = None,
    correct: Any = None,
    idata: arviz.InferenceData | None = None,
) -> dict[str, Path]:
    """Write every plot whose inputs are given (not ``None``) to ``out_dir``, named as in :data:`FILE_NAMES`.

    :param out_dir: the folder (created if missing).
    :param probs: with ``labels``, for :func:`reliability_diagram` (``reliability.png``).
    :param labels: see ``probs``.
    :param history: for :func:`elbo_trace` (``elbo_trace.png``).
    :param curves: for :func:`accuracy_coverage` (``accuracy_coverage.png``).
    :param uncertainty: with ``correct``, for :func:`uncertainty_histograms` (``uncertainty_histogram.png``).
    :param correct: see ``uncertainty``.
    :param idata: for :func:`posterior_densities` (``posterior_densities.png``).
    :returns: plot name (a key of :data:`FILE_NAMES`) -> path written.
    :raises ValueError: only one of ``probs``/``labels`` or of ``uncertainty``/``correct`` is given,
        or a plotting function rejects its inputs.
    """
    for a, b, name_a, name_b in ((probs, labels, "probs", "labels"), (uncertainty, correct, "uncertainty", "correct")):
        if (a is None) != (b is None):
            raise ValueError(f"{name_a} and {name_b} go together; got only {name_a if b is None else name_b}")
    out = Path(out_dir)
    written: dict[str, Path] = {}
    if probs is not None:
        written["reliability"] = reliability_diagram(probs, labels, out / FILE_NAMES["reliability"])
    if history is not None:
        written["elbo_trace"] = elbo_trace(history, out / FILE_NAMES["elbo_trace"])
    if curves is not None:
        written["accuracy_coverage"] = accuracy_coverage(curves, out / FILE_NAMES["accuracy_coverage"])
    if uncertainty is not None:
        written["uncertainty_histogram"] = uncertainty_histograms(uncertainty, correct, out / FILE_NAMES["uncertainty_histogram"])
    if idata is not None:
        written["posterior_densities"] = posterior_densities(idata, out / FILE_NAMES["posterior_densities"])
    return written
