"""Tests of the diagnostic plots: each writes one valid PNG atomically, also on edge cases."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from bhpeft_ppl import calibration, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # ArviZ announces its refactor on import
    import arviz as az


def assert_png(path: Path, expected: Path) -> None:
    """``path`` is ``expected``, a readable PNG image, and its folder holds no temporary files."""
    assert isinstance(path, Path)
    assert path == expected
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= 200 and image.shape[1] >= 200
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def random_probs(n: int = 200, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(n, c, generator=g), -1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def history(n: int) -> dict[str, list[float]]:
    steps = list(range(n))
    return {
        "step": steps,
        "epoch": [s // 10 for s in steps],
        "loss": [1000.0 / (s + 1) + float(np.sin(s)) for s in steps],
        "log_likelihood": [-2.0 + s / max(n, 1) for s in steps],
        "kl": [5e4 - 10.0 * s for s in steps],
        "lr": [1e-3 * 0.9**s for s in steps],
    }


def idata() -> az.InferenceData:
    rng = np.random.default_rng(0)
    return az.from_dict(
        posterior={
            "w": rng.normal(size=(1, 20, 3, 4)) * 2.0 ** np.arange(12).reshape(3, 4),
            "b": rng.normal(size=(1, 20)),
            "c": np.zeros((1, 20)),  # a constant: no KDE possible
        }
    )


# ----------------------------------------------------------------------------- reliability


@pytest.mark.parametrize("num_bins", [1, 5, 15])
def test_reliability_bins_match_calibration_ece(num_bins):
    probs, labels = random_probs()
    stats = plots.reliability_bins(probs, labels, num_bins)
    assert stats["ece"] == pytest.approx(calibration.ece(probs, labels, num_bins=num_bins), abs=1e-12)
    assert stats["count"].sum() == len(labels)
    assert len(stats["edges"]) == num_bins + 1


def test_reliability_bins_edges_are_right_closed():
    # bin b holds (b/B, (b+1)/B]: a confidence of exactly 0.6 with 5 bins falls in bin 2, not 3
    probs = np.array([[0.6, 0.4], [0.4, 0.6], [0.8, 0.2], [1.0, 0.0]])
    labels = np.array([0, 0, 0, 0])
    stats = plots.reliability_bins(probs, labels, 5)
    assert stats["bin"].tolist() == [2, 2, 3, 4]
    assert stats["count"].tolist() == [0, 0, 2, 1, 1]
    assert stats["accuracy"][2] == pytest.approx(0.5)
    assert np.isnan(stats["accuracy"][0])
    assert stats["ece"] == pytest.approx(calibration.ece(torch.tensor(probs), torch.tensor(labels), num_bins=5))


def test_reliability_diagram(tmp_path):
    probs, labels = random_probs()
    out = tmp_path / "sub" / "rel.png"
    assert_png(plots.reliability_diagram(probs, labels, out, num_bins=10, title="Test"), out)


def test_reliability_diagram_one_bin_populated_numpy(tmp_path):
    probs = np.tile([[0.97, 0.03]], (10, 1))
    labels = np.zeros(10, dtype=int)
    out = tmp_path / "rel.png"
    assert_png(plots.reliability_diagram(probs, labels, str(out)), out)


def test_reliability_diagram_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="expected probs"):
        plots.reliability_diagram(np.ones(3), np.zeros(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="no examples"):
        plots.reliability_diagram(np.ones((0, 2)), np.zeros(0), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- ELBO trace


@pytest.mark.parametrize("n", [1, 3, 250])
def test_elbo_trace(tmp_path, n):
    out = tmp_path / "trace.png"
    assert_png(plots.elbo_trace(history(n), out), out)


@pytest.mark.parametrize("drop", [("kl",), ("lr",), ("kl", "lr"), ("log_likelihood", "lr"), ("log_likelihood", "kl", "lr")])
def test_elbo_trace_missing_optional_keys(tmp_path, drop):
    h = history(30)
    for key in drop:
        del h[key]
    out = tmp_path / "trace.png"
    assert_png(plots.elbo_trace(h, out, title="partial"), out)


def test_elbo_trace_empty_optional_list_and_non_finite(tmp_path):
    h = history(20)
    h["kl"] = []
    h["loss"][3] = float("nan")
    h["log_likelihood"][4] = float("inf")
    out = tmp_path / "trace.png"
    assert_png(plots.elbo_trace(h, out), out)


def test_elbo_trace_rejects_bad_history(tmp_path):
    with pytest.raises(ValueError, match="'loss'"):
        plots.elbo_trace({"step": [0]}, tmp_path / "t.png")
    with pytest.raises(ValueError, match="'step'"):
        plots.elbo_trace({"step": [], "loss": []}, tmp_path / "t.png")
    with pytest.raises(ValueError, match="entries"):
        plots.elbo_trace({"step": [0, 1], "loss": [1.0, 2.0], "kl": [1.0]}, tmp_path / "t.png")


# ----------------------------------------------------------------------------- accuracy-coverage


def test_accuracy_coverage(tmp_path):
    coverage = np.linspace(0.05, 1.0, 20)
    curves = {
        "entropy": {"coverage": coverage.tolist(), "accuracy": (1.0 - 0.3 * coverage).tolist()},
        "mutual information": {"coverage": torch.tensor(coverage), "accuracy": torch.tensor(0.9 - 0.2 * coverage)},
        "single point": {"coverage": [1.0], "accuracy": [0.7]},
    }
    out = tmp_path / "ac.png"
    assert_png(plots.accuracy_coverage(curves, out), out)


def test_accuracy_coverage_rejects_bad_curves(tmp_path):
    with pytest.raises(ValueError, match="no curves"):
        plots.accuracy_coverage({}, tmp_path / "ac.png")
    with pytest.raises(ValueError, match="accuracies"):
        plots.accuracy_coverage({"a": {"coverage": [0.5, 1.0], "accuracy": [1.0]}}, tmp_path / "ac.png")
    with pytest.raises(ValueError, match="needs"):
        plots.accuracy_coverage({"a": {"coverage": [0.5, 1.0]}}, tmp_path / "ac.png")


# ----------------------------------------------------------------------------- uncertainty histograms


@pytest.mark.parametrize("case", ["mixed", "all correct", "all wrong", "constant", "single", "non-finite"])
def test_uncertainty_histograms(tmp_path, case):
    rng = np.random.default_rng(0)
    score = rng.gamma(2.0, size=100)
    correct = rng.random(100) < 0.7
    if case == "all correct":
        correct[:] = True
    elif case == "all wrong":
        correct = torch.zeros(100, dtype=torch.bool)
    elif case == "constant":
        score = np.full(100, 0.3)
    elif case == "single":
        score, correct = score[:1], correct[:1]
    elif case == "non-finite":
        score[:5] = np.nan
        score[5] = np.inf
    out = tmp_path / "u.png"
    assert_png(plots.uncertainty_histograms(torch.tensor(score), correct, out, score_name="entropy"), out)


def test_uncertainty_histograms_all_non_finite_and_bad_shapes(tmp_path):
    out = tmp_path / "u.png"
    assert_png(plots.uncertainty_histograms(np.full(4, np.nan), np.ones(4, dtype=bool), out), out)
    with pytest.raises(ValueError, match="expected uncertainty"):
        plots.uncertainty_histograms(np.ones(3), np.ones(4, dtype=bool), tmp_path / "v.png")
    with pytest.raises(ValueError, match="no examples"):
        plots.uncertainty_histograms(np.ones(0), np.ones(0, dtype=bool), tmp_path / "v.png")


# ----------------------------------------------------------------------------- posterior densities


def test_posterior_densities_default(tmp_path):
    out = tmp_path / "post.png"
    assert_png(plots.posterior_densities(idata(), out), out)


def test_pick_elements_largest_sd_and_labels():
    picked = plots._pick_elements(idata(), ["w", "b"], max_vars=4)
    # w's scale doubles with its flat index, so its largest-sd elements are the last ones; the
    # scalar b takes one panel and leaves the rest to w
    assert [label for label, _ in picked] == ["w[2,3]", "w[2,2]", "w[2,1]", "b"]
    assert all(draws.shape == (20,) for _, draws in picked)


def test_pick_elements_shares_panels():
    labels = [label for label, _ in plots._pick_elements(idata(), None, max_vars=6)]
    assert labels == ["w[2,3]", "w[2,2]", "w[2,1]", "w[2,0]", "b", "c"]
    assert [label for label, _ in plots._pick_elements(idata(), None, max_vars=2)] == ["w[2,3]", "b"]
    assert [label for label, _ in plots._pick_elements(idata(), ["b", "c"], max_vars=6)] == ["b", "c"]


@pytest.mark.parametrize(("var_names", "max_vars"), [(["w"], 6), ("b", 6), (["c"], 1), (None, 1), (["b", "w", "c"], 7)])
def test_posterior_densities_selection(tmp_path, var_names, max_vars):
    out = tmp_path / "post.png"
    assert_png(plots.posterior_densities(idata(), out, var_names=var_names, max_vars=max_vars), out)


def test_posterior_densities_several_chains(tmp_path):
    data = az.from_dict(posterior={"w": np.random.default_rng(1).normal(size=(4, 50, 8, 384))})
    out = tmp_path / "post.png"
    assert_png(plots.posterior_densities(data, out), out)


def test_posterior_densities_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no posterior variables"):
        plots.posterior_densities(idata(), tmp_path / "p.png", var_names=["nope"])
    with pytest.raises(ValueError, match="posterior"):
        plots.posterior_densities(az.from_dict(prior={"a": np.zeros((1, 5))}), tmp_path / "p.png")
    with pytest.raises(ValueError, match="max_vars"):
        plots.posterior_densities(idata(), tmp_path / "p.png", max_vars=0)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- save_all and atomicity


def test_save_all_everything(tmp_path):
    probs, labels = random_probs()
    correct = (probs.argmax(-1) == labels).numpy()
    entropy = -(probs * probs.log()).sum(-1)
    written = plots.save_all(
        tmp_path / "plots",
        probs=probs,
        labels=labels,
        history=history(40),
        curves={"entropy": {"coverage": [0.5, 1.0], "accuracy": [0.8, 0.6]}},
        uncertainty=entropy,
        correct=correct,
        idata=idata(),
    )
    assert set(written) == set(plots.FILE_NAMES)
    for key, path in written.items():
        assert_png(path, tmp_path / "plots" / plots.FILE_NAMES[key])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(plots.FILE_NAMES.values())


def test_save_all_only_given_inputs(tmp_path):
    written = plots.save_all(tmp_path, history=history(1), idata=idata())
    assert set(written) == {"elbo_trace", "posterior_densities"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elbo_trace.png", "posterior_densities.png"]
    assert plots.save_all(tmp_path / "empty") == {}


def test_save_all_rejects_half_pairs(tmp_path):
    probs, _ = random_probs()
    with pytest.raises(ValueError, match="probs and labels"):
        plots.save_all(tmp_path, probs=probs)
    with pytest.raises(ValueError, match="uncertainty and correct"):
        plots.save_all(tmp_path, correct=np.ones(3, dtype=bool))
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    def fail(self, fname, **kwargs):
        Path(fname).write_bytes(b"partial")  # a half-written temporary file must be cleaned up too
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    probs, labels = random_probs()
    calls = [
        lambda p: plots.reliability_diagram(probs, labels, p),
        lambda p: plots.elbo_trace(history(5), p),
        lambda p: plots.accuracy_coverage({"a": {"coverage": [1.0], "accuracy": [0.5]}}, p),
        lambda p: plots.uncertainty_histograms(np.ones(3), np.ones(3, dtype=bool), p),
        lambda p: plots.posterior_densities(idata(), p),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="disk full"):
            call(tmp_path / "out.png")
        assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "trace.png"
    plots.elbo_trace(history(5), out)
    before = out.read_bytes()

    def fail(self, fname, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(RuntimeError):
        plots.elbo_trace(history(50), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["trace.png"]
