"""The run folders of ``bhpeft fit / predict / evaluate / export`` and the all-or-nothing writes behind them.

Every command runs in-process through :func:`bhpeft_ppl.cli.main` on a tiny
random-weight BERT with the real MiniLM tokenizer (``tests/backbones.py``) and
real SST-2 sentences, so a fit takes seconds.  One fitted run folder is shared
by the session and only read; tests that change a run work on a copy.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
from pathlib import Path

import arviz as az
import pytest
import torch
from backbones import SST2_DEV, fit_argv, fitted_run, sst2_rows, tiny_backbone
from safetensors.torch import load_file

import bhpeft_ppl.serialize
from bhpeft_ppl.cli import main
from bhpeft_ppl.config import load_config
from bhpeft_ppl.errors import BHPEFTError
from bhpeft_ppl.files import atomic_write, atomic_write_text, staged_directory

pytestmark = pytest.mark.skipif(not SST2_DEV.is_file(), reason=f"SST-2 dev file not found at {SST2_DEV}")

PLOTS = {"reliability.png", "elbo_trace.png", "accuracy_coverage.png", "uncertainty_histogram.png", "posterior_densities.png"}
UNCERTAINTY_COLUMNS = ["max_prob", "entropy", "mutual_information", "summed_variance"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def backbone(tmp_path_factory) -> Path:
    return tiny_backbone(tmp_path_factory)


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    return fitted_run(tmp_path_factory)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def without_timings(metrics: dict) -> dict:
    """Metrics less the wall-clock fields (``seconds_*``), which differ between identical runs."""
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in metrics.items() if not k.startswith("seconds")}


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    lines = ["\t".join(header)] + ["\t".join(row[: len(header)]) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# bhpeft fit ---------------------------------------------------------------------------------------------------------------
def test_fit_writes_the_documented_run_folder(run):
    for name in ("config.toml", "run.json", "metrics.json", "inference_data.nc", "predictions.csv"):
        assert (run / name).is_file(), name
    assert {p.name for p in (run / "posterior").iterdir()} == {"posterior.safetensors", "posterior.json"}
    assert {p.name for p in (run / "plots").iterdir()} == PLOTS
    assert all((run / "plots" / name).stat().st_size > 1000 for name in PLOTS)
    assert not [p for p in run.parent.iterdir() if p.name.endswith((".partial", ".tmp", ".old"))]

    metrics = read_json(run / "metrics.json")
    for key in ("accuracy", "ece", "nll", "brier", "aurc", "accuracy_at_80"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0 and 0 <= metrics["brier"] <= 2
    assert set(metrics["methods"]) == {"bh_peft"}
    assert metrics["methods"]["bh_peft"]["accuracy"] == metrics["accuracy"]
    assert metrics["num_examples"] == 60 and metrics["posterior_draws"] == 3 and metrics["train_size"] == 120
    assert "threshold" not in metrics

    record = read_json(run / "run.json")
    assert record["task"] == "sentiment" and record["label_names"] == ["negative", "positive"]
    assert record["data"]["train"]["rows"] == 120 and record["data"]["test"]["rows"] == 60
    assert len(record["model_file"]["sha256"]) == 64 and record["seed"] == 0 and "torch" in record["versions"]

    config = load_config(run / "config.toml")
    assert config.train.epochs == 1 and config.predict.samples == 3 and config.data.train == str(SST2_DEV)

    header, rows = read_csv(run / "predictions.csv")
    assert header == ["index", "text", "predicted", "p_negative", "p_positive", *UNCERTAINTY_COLUMNS, "label", "correct"]
    assert len(rows) == metrics["num_examples"]
    for row in rows:
        assert abs(float(row["p_negative"]) + float(row["p_positive"]) - 1) < 1e-5
        assert row["predicted"] in ("negative", "positive") and row["label"] in ("negative", "positive")
        assert row["correct"] == str(int(row["predicted"] == row["label"]))
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(metrics["accuracy"])

    idata = az.from_netcdf(run / "inference_data.nc")
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"):
        assert group in idata.groups(), group
    assert idata.log_likelihood["obs"].shape == (1, 3, 60)
    meta = read_json(run / "posterior" / "posterior.json")
    assert set(idata.posterior.data_vars) == set(meta["latent_sites"])
    assert "classifier.weight" in meta["latent_sites"]


def test_config_toml_reproduces_the_run_bitwise(run, tmp_path):
    again = tmp_path / "again"
    assert main(["fit", "--config", str(run / "config.toml"), "--out", str(again)]) == 0
    assert without_timings(read_json(again / "metrics.json")) == without_timings(read_json(run / "metrics.json"))
    assert (again / "predictions.csv").read_bytes() == (run / "predictions.csv").read_bytes()
    first, second = (load_file(r / "posterior" / "posterior.safetensors") for r in (run, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    resolved = [line for line in (again / "config.toml").read_text().splitlines() if not line.startswith("out =")]
    assert resolved == [line for line in (run / "config.toml").read_text().splitlines() if not line.startswith("out =")]


def test_map_guide_gives_map_hybrid(backbone, tmp_path, capsys):
    out = tmp_path / "map"
    assert main(fit_argv(backbone, out, "--model.guide", "map", "--predict.samples", "1", "--data.train_size", "60")) == 0
    metrics = read_json(out / "metrics.json")
    assert set(metrics["methods"]) == {"map_hybrid"} and metrics["posterior_draws"] == 1
    assert load_config(out / "config.toml").model.guide == "map"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:5] == ["method", "accuracy", "ECE", "NLL", "Brier"]
    assert printed[1].split()[0] == "map_hybrid" and float(printed[1].split()[1]) == pytest.approx(metrics["accuracy"], abs=1e-3)
    assert printed[-1] == f"wrote {out}"


def test_target_error_writes_a_threshold_and_decisions(backbone, tmp_path):
    out = tmp_path / "selective"
    assert main(fit_argv(backbone, out, "--predict.target_error", "0.4", "--data.train_size", "60")) == 0
    threshold = read_json(out / "metrics.json")["threshold"]
    assert threshold["target_error"] == 0.4 and threshold["confidence"] is None
    for key in ("threshold", "coverage", "error", "error_bound", "test_coverage", "test_error"):
        assert key in threshold, key
    assert 0 <= threshold["coverage"] <= 1 and 0 <= threshold["test_coverage"] <= 1
    header, rows = read_csv(out / "predictions.csv")
    assert "decision" in header and {r["decision"] for r in rows} <= {"accept", "abstain"}
    assert sum(r["decision"] == "accept" for r in rows) / len(rows) == pytest.approx(threshold["test_coverage"])

    # the stored threshold is applied by 'bhpeft predict'
    texts = write_tsv(tmp_path / "texts.tsv", [(s,) for s, _ in sst2_rows(8, start=600)], header=("sentence",))
    assert main(["predict", "--from", str(out), "--data", str(texts), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    header, rows = read_csv(tmp_path / "pred" / "predictions.csv")
    assert "decision" in header and len(rows) == 8


def test_toml_config_then_command_line_overrides(backbone, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'out = "{tmp_path / "from_toml"}"\nquiet = true\nseed = 3\n\n'
        f'[model]\nbackbone = "{backbone}"\n\n'
        f'[data]\ntrain = "{SST2_DEV}"\ntrain_size = 64\ntest_size = 20\n\n'
        "[train]\nepochs = 2\nbatch_size = 32\nlr = 0.02\n\n[predict]\nsamples = 2\n\n[export]\nplots = false\n",
        encoding="utf-8",
    )
    out = tmp_path / "from_cli"
    argv = ["fit", "--config", str(config), "--train.epochs", "1", "--data.train-size", "32", "--out", str(out)]
    assert main(argv) == 0
    assert not (tmp_path / "from_toml").exists()
    history = read_json(out / "posterior" / "posterior.json")["history"]
    assert len(history["loss"]) == 1  # 1 epoch (command line, not the file's 2) of 32 rows (command line) in batches of 32
    resolved = load_config(out / "config.toml")
    assert (resolved.train.epochs, resolved.data.train_size, resolved.out) == (1, 32, str(out))  # the command line
    assert (resolved.train.lr, resolved.train.batch_size, resolved.seed, resolved.predict.samples) == (0.02, 32, 3, 2)  # file
    assert resolved.train.warmup_ratio == 0.06  # default
    assert not (out / "plots").exists()
    assert read_json(out / "metrics.json")["seed"] == 3


# bhpeft predict / evaluate / export ---------------------------------------------------------------------------------------
def test_predict_writes_predictions_without_labels(run, tmp_path, capsys):
    texts = write_tsv(tmp_path / "texts.tsv", [(s,) for s, _ in sst2_rows(12, start=700)], header=("sentence",))
    out = tmp_path / "pred"
    assert main(["predict", "--from", str(run), "--data", str(texts), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    header, rows = read_csv(out / "predictions.csv")
    assert header == ["index", "text", "predicted", "p_negative", "p_positive", *UNCERTAINTY_COLUMNS]
    assert [r["text"] for r in rows] == [s for s, _ in sst2_rows(12, start=700)]
    assert all(abs(float(r["p_negative"]) + float(r["p_positive"]) - 1) < 1e-5 for r in rows)
    assert not (out / "metrics.json").exists()
    idata = az.from_netcdf(out / "inference_data.nc")
    assert "posterior_predictive" in idata.groups() and "log_likelihood" not in idata.groups()


def test_predict_on_labelled_data_writes_no_label_columns(run, tmp_path):
    data = write_tsv(tmp_path / "labelled.tsv", sst2_rows(10, start=700))
    out = tmp_path / "pred"
    assert main(["predict", "--from", str(run), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    header, rows = read_csv(out / "predictions.csv")
    assert "label" not in header and "correct" not in header and len(rows) == 10


def test_evaluate_writes_metrics_on_labelled_data(run, tmp_path, capsys):
    data = write_tsv(tmp_path / "labelled.tsv", sst2_rows(40, start=700))
    out = tmp_path / "eval"
    assert main(["evaluate", "--from", str(run), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["num_examples"] == 40 and metrics["data"] == str(data) and metrics["run"] == str(run)
    for key in ("accuracy", "ece", "nll", "brier", "aurc", "accuracy_at_80"):
        assert metrics["methods"]["bh_peft"][key] == metrics[key]
    header, rows = read_csv(out / "predictions.csv")
    assert header[-2:] == ["label", "correct"] and len(rows) == 40
    assert "bh_peft" in capsys.readouterr().out
    assert az.from_netcdf(out / "inference_data.nc").log_likelihood["obs"].shape == (1, 3, 40)


def test_evaluate_on_the_runs_own_test_rows_matches_fit(run, tmp_path):
    """Same rows, same seed, same draws: evaluate reproduces the scores that fit wrote."""
    _, rows = read_csv(run / "predictions.csv")
    data = write_tsv(tmp_path / "test.tsv", [(r["text"], str(["negative", "positive"].index(r["label"]))) for r in rows])
    out = tmp_path / "eval"
    assert main(["evaluate", "--from", str(run), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    fitted, evaluated = read_json(run / "metrics.json"), read_json(out / "metrics.json")
    for key in ("accuracy", "ece", "nll", "brier", "aurc", "accuracy_at_80"):
        assert evaluated[key] == pytest.approx(fitted[key], abs=1e-6), key


@pytest.mark.parametrize(
    "patterns, expected",
    [
        (None, None),  # every latent site
        ("classifier.weight", ["classifier.weight"]),
        ("classifier.*", ["classifier.bias", "classifier.weight"]),
        ("lora_A", [f"encoder.layer.{i}.attention.self.{m}.lora_A" for i in (0, 1) for m in ("query", "value")]),
        (
            "encoder.layer.0.attention.self.query.lora_A,prefix_gate",
            [
                "encoder.layer.0.attention.self.query.lora_A",
                "encoder.layer.0.attention.self.prefix_gate",
                "encoder.layer.1.attention.self.prefix_gate",
            ],
        ),
    ],
    ids=["all", "exact", "regex", "suffix", "list"],
)
def test_export_writes_netcdf_with_the_chosen_sites(run, tmp_path, capsys, patterns, expected):
    data = write_tsv(tmp_path / "labelled.tsv", sst2_rows(16, start=700))
    target = tmp_path / "exports" / "x.nc"
    argv = ["export", "--from", str(run), "--data", str(data), "--out", str(target), "--quiet"]
    assert main(argv + (["--export.sites", patterns] if patterns else [])) == 0
    assert capsys.readouterr().out.strip() == f"wrote {target}"
    idata = az.from_netcdf(target)
    latent = read_json(run / "posterior" / "posterior.json")["latent_sites"]
    assert sorted(idata.posterior.data_vars) == sorted(expected or latent)
    assert idata.log_likelihood["obs"].shape == (1, 3, 16)
    assert "sample_stats" in idata.groups() and "loss" in idata.sample_stats
    assert siblings(target.parent) == ["x.nc"]


def test_export_to_a_folder_writes_inference_data_nc(run, tmp_path):
    data = write_tsv(tmp_path / "labelled.tsv", sst2_rows(8, start=700))
    out = tmp_path / "export"
    assert main(["export", "--from", str(run), "--data", str(data), "--out", str(out), "--export.samples", "2", "--quiet"]) == 0
    idata = az.from_netcdf(out / "inference_data.nc")
    assert idata.posterior.sizes["draw"] == 2 and idata.log_likelihood["obs"].shape == (1, 2, 8)


# failed writes ---------------------------------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["safetensors", "metrics_rename", "final_rename"])
def test_full_disk_during_fit_leaves_nothing(backbone, tmp_path, monkeypatch, capsys, where):
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "run"
    if where == "safetensors":
        monkeypatch.setattr(bhpeft_ppl.serialize, "save_file", _no_space)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if (where == "metrics_rename" and str(dst).endswith("metrics.json")) or (
                where == "final_rename" and str(src).endswith(".partial")
            ):
                _no_space()
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    code = main(fit_argv(backbone, out, "--data.train_size", "40", "--data.test_size", "20", "--no-export.plots"))
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("bhpeft: error:") and len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert "Traceback" not in err
    # no run folder, no .partial, no .tmp: only the trained state, named in the message, for --resume
    assert siblings(parent) == ["run.checkpoint.safetensors"]
    assert f"the trained state is kept in {parent / 'run.checkpoint.safetensors'}; add --resume" in err


def test_full_disk_keeps_the_previous_run(backbone, run, tmp_path, monkeypatch, capsys):
    """Refitting into an existing run folder: a failed write leaves the old run as it was."""
    parent = tmp_path / "runs"
    parent.mkdir()
    old = shutil.copytree(run, parent / "run")
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    monkeypatch.setattr(bhpeft_ppl.serialize, "save_file", _no_space)
    assert main(fit_argv(backbone, old, "--data.train_size", "40", "--data.test_size", "20", "--no-export.plots")) == 1
    assert capsys.readouterr().err.startswith("bhpeft: error:")
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert siblings(parent) == ["run", "run.checkpoint.safetensors"]


def test_interrupt_during_fit_leaves_nothing(backbone, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bhpeft_ppl.workflow.fit", interrupted)
    parent = tmp_path / "runs"
    parent.mkdir()
    assert main(fit_argv(backbone, parent / "run", "--data.train_size", "40")) == 130
    err = capsys.readouterr().err
    assert err.startswith("bhpeft: interrupted") and len(err.strip().splitlines()) == 1
    assert siblings(parent) == []


def test_refit_replaces_an_existing_run_folder(backbone, run, tmp_path):
    out = shutil.copytree(run, tmp_path / "run")
    (out / "stale.txt").write_text("from an older run")
    assert main(fit_argv(backbone, out, "--data.train_size", "40", "--data.test_size", "20", "--no-export.plots")) == 0
    assert not (out / "stale.txt").exists() and not (out / "plots").exists()
    assert read_json(out / "metrics.json")["num_examples"] == 20
    assert siblings(tmp_path) == ["run"]


# staged_directory and atomic_write -----------------------------------------------------------------------------------------
def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _old_run(folder: Path) -> Path:
    (folder / "plots").mkdir(parents=True)
    (folder / "run.json").write_text('{"old": true}')
    (folder / "plots" / "old.png").write_bytes(b"old")
    return folder


def test_staged_directory_creates_the_folder_only_at_the_end(tmp_path):
    target = tmp_path / "deep" / "run"
    with staged_directory(target) as stage:
        assert stage.parent == target.parent and stage.name.endswith(".partial") and not target.exists()
        atomic_write_text(stage / "run.json", "{}")
    assert _tree(target) == {"run.json": b"{}"}
    assert siblings(target.parent) == ["run"]
    assert (target.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700


def test_staged_directory_replaces_an_existing_run_folder(tmp_path):
    target = _old_run(tmp_path / "run")
    with staged_directory(target) as stage:
        assert _tree(target) == {"run.json": b'{"old": true}', "plots/old.png": b"old"}  # untouched while building
        atomic_write_text(stage / "run.json", '{"new": true}')
        atomic_write_text(stage / "metrics.json", "{}")
    assert _tree(target) == {"run.json": b'{"new": true}', "metrics.json": b"{}"}
    assert siblings(tmp_path) == ["run"]  # no .partial, no .old


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_staged_directory_error_leaves_the_existing_run_untouched(tmp_path, error):
    target = _old_run(tmp_path / "run")
    before = _tree(target)
    with pytest.raises(type(error)), staged_directory(target) as stage:
        atomic_write_text(stage / "run.json", '{"new": true}')
        raise error
    assert _tree(target) == before
    assert siblings(tmp_path) == ["run"]


def test_staged_directory_error_without_an_existing_folder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "run") as stage:
        (stage / "part.txt").write_text("half")
        raise RuntimeError("boom")
    assert siblings(tmp_path) == []


def test_staged_directory_accepts_an_empty_folder(tmp_path):
    (tmp_path / "run").mkdir()
    with staged_directory(tmp_path / "run") as stage:
        (stage / "config.toml").write_text("")
    assert _tree(tmp_path / "run") == {"config.toml": b""}


@pytest.mark.parametrize("kind", ["user_folder", "file"])
def test_staged_directory_refuses_what_is_not_a_run(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("mine")
    else:
        target.mkdir()
        (target / "thesis.tex").write_text("mine")
    with pytest.raises(BHPEFTError, match="choose another --out"), staged_directory(target):
        pytest.fail("the block must not run")
    assert (target.read_text() if kind == "file" else (target / "thesis.tex").read_text()) == "mine"
    assert siblings(tmp_path) == ["out"]


def test_staged_directory_names_an_unwritable_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BHPEFTError, match="cannot write the output folder"), staged_directory(tmp_path / "file" / "run"):
        pytest.fail("the block must not run")


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and siblings(tmp_path) == ["metrics.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and siblings(tmp_path) == ["metrics.json"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# bhpeft update: dynamic fine-tuning from a run folder ----------------------------------------------------------------------
def test_update_writes_a_run_folder_whose_prior_is_the_previous_posterior(run, tmp_path, capsys):
    new = write_tsv(tmp_path / "round1.tsv", sst2_rows(30, start=600), header=("sentence", "label"))
    out = tmp_path / "round1"
    argv = ["update", "--from", str(run), "--data", str(new), "--out", str(out), "--quiet", "--update.replay", "0.25"]
    assert main([*argv, "--no-export.plots"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")
    for name in ("config.toml", "run.json", "metrics.json", "inference_data.nc", "predictions.csv"):
        assert (out / name).is_file(), name
    record = read_json(out / "run.json")
    first = read_json(run / "run.json")["rounds"]
    assert [r["round"] for r in record["rounds"]] == [0, 1] and record["rounds"][0] == first[0]
    assert record["rounds"][1]["rows"] == 30 and record["rounds"][1]["replayed"] == round(0.25 * first[0]["rows"])
    assert record["rounds"][1]["from"] == str(run) and record["update"]["replay"] == 0.25
    metrics = read_json(out / "metrics.json")
    assert metrics["round"] == 1 and metrics["num_examples"] == read_json(run / "metrics.json")["num_examples"]

    # the new posterior's prior is the old posterior: its tensors are the old guide's locations and scales
    meta = read_json(out / "posterior" / "posterior.json")
    assert meta["priors"]["sites"] and set(meta["priors"]["sites"]) <= set(meta["sites"])
    new_tensors = load_file(out / "posterior" / "posterior.safetensors")
    old_tensors = load_file(run / "posterior" / "posterior.safetensors")
    site = "classifier.weight"
    assert torch.equal(new_tensors[f"prior/{site}/loc"], old_tensors[f"guide/0.locs.{site}_unconstrained"])  # real: identity
    # the reopened round can predict and be updated again (a chain of rounds)
    out2 = tmp_path / "round2"
    assert main(["update", "--from", str(out), "--data", str(new), "--out", str(out2), "--quiet", "--no-export.plots"]) == 0
    assert [r["round"] for r in read_json(out2 / "run.json")["rounds"]] == [0, 1, 2]
    assert main(["predict", "--from", str(out2), "--data", str(new), "--out", str(tmp_path / "p"), "--quiet"]) == 0


def test_update_with_bad_settings_is_a_one_line_error(run, tmp_path, capsys):
    new = write_tsv(tmp_path / "round1.tsv", sst2_rows(10, start=600), header=("sentence", "label"))
    for option, value, needle in (("--update.inflation", "0.5", "update.inflation"), ("--update.replay", "2", "update.replay")):
        out = tmp_path / "x"
        assert main(["update", "--from", str(run), "--data", str(new), "--out", str(out), option, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bhpeft: error:") and needle in err and len(err.splitlines()) == 1
        assert not out.exists()
