"""The runs behind the ``bhpeft`` command: fit, predict, evaluate and export.

A run folder, written whole or not at all (:func:`~bhpeft_ppl.files.staged_directory`):

======================= ===========================================================
``config.toml``         the resolved configuration (rerun with ``--config``)
``run.json``            what is needed to reopen the run: task, labels, model file
                        (path and SHA-256), data sources and sizes, versions, seed
``metrics.json``        scores of the test split: accuracy, NLL, Brier, ECE, MCE,
                        selective prediction, the validation threshold
``posterior/``          the fitted posterior (safetensors + JSON)
``inference_data.nc``   the ArviZ ``InferenceData`` of the test split
``plots/``              reliability diagram, SVI trace, accuracy-coverage curve,
                        uncertainty histograms, posterior densities
``predictions.csv``     per test example: probabilities, uncertainty, decision
======================= ===========================================================
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import calibration, selective
from .backbone import load_backbone
from .config import RunConfig, load_config, to_toml
from .data import Collator, EncodedDataset, encode_split
from .decisions import Decisions, Threshold, accept, bayes_decisions, choose_threshold, realised_cost
from .distributed import is_main_process, world
from .errors import CheckpointError, SpecError
from .export import save_inference_data, select_sites, to_inference_data
from .files import atomic_write_json, atomic_write_text, library_versions, staged_directory
from .guides import GuideSpec
from .infer import FitConfig, FitResult, fit
from .inject import inject
from .loaders import TaskData, load_task, read_split
from .model import BayesianHybridModel
from .modelfile import ModelFile, load_model_file
from .predict import Predictions, predict
from .sequential import DynamicConfig, DynamicFineTuning
from .serialize import load_posterior, save_posterior

RUN_FILE = "run.json"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.json"
POSTERIOR_DIR = "posterior"
IDATA_FILE = "inference_data.nc"
PLOTS_DIR = "plots"
PREDICTIONS_FILE = "predictions.csv"


@dataclass
class Fitted:
    """A model with its fitted guide, ready to predict."""

    model: BayesianHybridModel
    guide: Any
    tokenizer: Any
    label_names: tuple[str, ...]
    model_file: ModelFile
    config: RunConfig
    history: dict | None = None

    @property
    def collate(self) -> Collator:
        return Collator.for_tokenizer(self.tokenizer)

    def encode(self, rows) -> EncodedDataset:
        """Tokenise loaded rows for this model's scoring."""
        self.tokenizer.truncation_side = self.config.data.truncation
        return encode_split(self.tokenizer, rows, self.model.peft.scoring, self.config.data.max_length)

    def predict(self, data: EncodedDataset) -> Predictions:
        c = self.config
        return predict(
            self.model,
            self.guide,
            data,
            c.predict.samples,
            batch_size=c.predict.batch_size,
            seed=c.seed,
            collate_fn=self.collate,
            progress=not c.quiet,
        )


# Pieces ------------------------------------------------------------------------------
def guide_spec(config: RunConfig, model_file: ModelFile) -> GuideSpec:
    """The model file's guide, or the preset named by ``model.guide``."""
    return GuideSpec.preset(config.model.guide) if config.model.guide else model_file.guide


def method_name(spec: GuideSpec) -> str:
    """``map_hybrid`` for an all-MAP guide, else ``bh_peft``."""
    families = {spec.default, *spec.components.values(), *spec.patterns.values()}
    return "map_hybrid" if families <= {"map", "point"} else "bh_peft"


def load_data(config: RunConfig, model_file: ModelFile) -> TaskData:
    """The task's splits as the config says (missing splits carved out of train, then subsampled)."""
    d = config.data
    if d.train is None:
        raise SpecError("no training data: set data.train in the config file or pass --data.train FILE")
    task = load_task(
        model_file.task,
        d.train,
        d.validation,
        d.test,
        format=d.format,
        text_column=d.text_column,
        label_column=d.label_column,
        label_names=d.label_names,
        validation_fraction=d.validation_fraction,
        test_fraction=d.test_fraction,
        seed=config.seed,
    )
    for split, size in (("train", d.train_size), ("validation", d.validation_size), ("test", d.test_size)):
        if size is not None and split in task.splits:
            task = task.subsample(split, size, config.seed)
    if "test" not in task.splits:
        raise SpecError("no test split: give data.test or a positive data.test_fraction")
    return task


def score(predictions: Predictions, config: RunConfig) -> dict[str, Any]:
    """Calibration and selective-prediction scores of the model average, and the
    calibration of the prediction at the posterior location (``point``)."""
    p, y = predictions.probs, predictions.labels
    out: dict[str, Any] = dict(calibration.summary(predictions.mean_probs, y))
    out.update(selective.selective_summary(p, y, config.predict.uncertainty, config.predict.coverage))
    out["uncertainty"] = config.predict.uncertainty
    out["coverage"] = config.predict.coverage
    out["point"] = calibration.summary(predictions.point_probs, y)
    out["num_examples"] = int(y.shape[0])
    out["posterior_draws"] = int(p.shape[0])
    return out


def _correct(predictions: Predictions) -> torch.Tensor:
    return predictions.predicted == predictions.labels


def threshold_from_validation(fitted: Fitted, validation) -> Threshold | None:
    """The rejection threshold keeping the validation error under ``predict.target_error``."""
    c = fitted.config.predict
    if c.target_error is None:
        return None
    preds = fitted.predict(fitted.encode(validation))
    u = selective.uncertainty(preds.probs, c.uncertainty)
    return choose_threshold(_correct(preds), u, c.target_error, c.confidence)


def bayes_actions(predictions: Predictions, config: RunConfig, num_labels: int) -> Decisions | None:
    """Bayes-optimal actions under ``predict.cost`` (and ``predict.abstain_cost``), if a cost matrix is set."""
    c = config.predict
    if c.cost is None:
        return None
    if len(c.cost) != num_labels * num_labels:
        raise SpecError(
            f"predict.cost has {len(c.cost)} numbers but {num_labels} classes need {num_labels}x{num_labels} = "
            f"{num_labels * num_labels} (cost[true][action], row by row)"
        )
    try:
        return bayes_decisions(predictions.mean_probs, decisions_cost(config, num_labels), c.abstain_cost)
    except ValueError as err:
        raise SpecError(f"predict.cost: {err}") from None


def decisions_cost(config: RunConfig, num_labels: int) -> torch.Tensor:
    """``predict.cost`` as a ``[C, C]`` matrix."""
    return torch.tensor(config.predict.cost, dtype=torch.float64).reshape(num_labels, num_labels)


def predictions_csv(
    rows,
    predictions: Predictions,
    label_names,
    threshold: Threshold | None,
    score_name: str,
    decisions: Decisions | None = None,
) -> str:
    """CSV text: one row per example with its probabilities, uncertainty scores and decisions."""
    scores = {name: selective.uncertainty(predictions.probs, name) for name in selective.UNCERTAINTY_SCORES}
    accepted = accept(scores[score_name], threshold) if threshold is not None else None
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    texts = list(rows["text"]) if "text" in rows.column_names else list(rows["question"])
    header = ["index", "text", "predicted", *[f"p_{name}" for name in label_names], *scores]
    if accepted is not None:
        header.append("decision")
    if decisions is not None:
        header += ["bayes_action", "expected_cost"]
    if predictions.labels is not None:
        header += ["label", "correct"]
    writer.writerow(header)
    for n in range(predictions.mean_probs.shape[0]):
        row = [n, texts[n], label_names[int(predictions.predicted[n])]]
        row += [f"{float(v):.6f}" for v in predictions.mean_probs[n]]
        row += [f"{float(s[n]):.6f}" for s in scores.values()]
        if accepted is not None:
            row.append("accept" if bool(accepted[n]) else "abstain")
        if decisions is not None:
            action = int(decisions.actions[n])
            row += ["abstain" if action < 0 else label_names[action], f"{float(decisions.expected_cost[n]):.6f}"]
        if predictions.labels is not None:
            row += [label_names[int(predictions.labels[n])], int(predictions.predicted[n] == predictions.labels[n])]
        writer.writerow(row)
    return buffer.getvalue()


def ood_scores(fitted: Fitted, task: str, predictions: Predictions) -> dict[str, float]:
    """AUROC of each uncertainty score at telling ``predict.ood`` examples from ``predictions``' examples."""
    path = fitted.config.predict.ood
    rows, _ = read_split(
        path, task, format=fitted.config.data.format, text_column=fitted.config.data.text_column, require_labels=False
    )
    ood = fitted.predict(fitted.encode(rows.remove_columns([c for c in rows.column_names if c == "label"])))
    scores = [s for s in selective.UNCERTAINTY_SCORES if predictions.probs.shape[0] > 1 or s in ("max_prob", "entropy")]
    return {
        s: selective.ood_auroc(selective.uncertainty(predictions.probs, s), selective.uncertainty(ood.probs, s)) for s in scores
    }


def write_outputs(
    folder: Path,
    fitted: Fitted,
    data: EncodedDataset,
    rows,
    predictions: Predictions,
    *,
    task: str,
    threshold: Threshold | None = None,
    history: dict | None = None,
    metrics_extra: dict | None = None,
) -> dict[str, Any]:
    """``metrics.json`` (if labelled), ``predictions.csv``, ``inference_data.nc`` and plots into ``folder``."""
    c = fitted.config
    decisions = bayes_actions(predictions, c, len(fitted.label_names))
    atomic_write_text(
        folder / PREDICTIONS_FILE,
        predictions_csv(rows, predictions, fitted.label_names, threshold, c.predict.uncertainty, decisions),
    )
    metrics: dict[str, Any] = {}
    if predictions.labels is not None:
        name = method_name(fitted.model.guide_spec)
        metrics = score(predictions, c)
        if decisions is not None:
            metrics["realised_cost"] = realised_cost(
                decisions, predictions.labels, decisions_cost(c, len(fitted.label_names)), c.predict.abstain_cost
            )
        if c.predict.ood:
            metrics["ood_auroc"] = ood_scores(fitted, task, predictions)
        if threshold is not None:
            u = selective.uncertainty(predictions.probs, c.predict.uncertainty)
            kept = accept(u, threshold)
            metrics["threshold"] = {
                **threshold_dict(threshold),
                "test_coverage": float(kept.double().mean()),
                "test_error": float(1 - _correct(predictions)[kept].double().mean()) if bool(kept.any()) else None,
            }
        metrics.update(metrics_extra or {})
        metrics["methods"] = {name: {k: v for k, v in metrics.items() if not isinstance(v, dict)}}
        atomic_write_json(folder / METRICS_FILE, metrics)
    draws = c.export.samples or c.predict.samples
    idata = to_inference_data(
        fitted.model,
        fitted.guide,
        data,
        num_samples=draws,
        seed=c.seed,
        sites=c.export.sites,
        history=history,
        predictions=predictions if draws == predictions.probs.shape[0] else None,
        label_names=fitted.label_names,
        batch_size=c.predict.batch_size,
        collate_fn=fitted.collate,
    )
    save_inference_data(idata, folder / IDATA_FILE)
    if c.export.plots:
        from . import plots

        kwargs: dict[str, Any] = {"history": history, "idata": idata}
        if predictions.labels is not None:
            correct = _correct(predictions)
            curves = {
                name: selective.risk_coverage_curve(correct, selective.uncertainty(predictions.probs, name))
                for name in selective.UNCERTAINTY_SCORES
                if not (name in ("mutual_information", "summed_variance") and predictions.probs.shape[0] < 2)
            }
            kwargs.update(
                probs=predictions.mean_probs,
                labels=predictions.labels,
                curves=curves,
                uncertainty=selective.uncertainty(predictions.probs, c.predict.uncertainty),
                correct=correct,
            )
        plots.save_all(folder / PLOTS_DIR, **kwargs)
    return metrics


def threshold_dict(threshold: Threshold) -> dict[str, Any]:
    """JSON-ready form of a :class:`~bhpeft_ppl.decisions.Threshold`."""
    out = {}
    for key, value in vars(threshold).items():
        out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


# Commands -----------------------------------------------------------------------------
def _quiet_libraries(config: RunConfig) -> None:
    if config.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def fit_config_of(config: RunConfig, seed: int | None = None) -> FitConfig:
    """The :class:`~bhpeft_ppl.infer.FitConfig` of the ``[train]`` section."""
    t = config.train
    return FitConfig(
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        schedule=t.schedule,
        warmup_ratio=t.warmup_ratio,
        clip_norm=t.clip_norm,
        num_particles=t.num_particles,
        estimator=t.estimator,
        max_steps=t.max_steps,
        scale_lr_factor=t.scale_lr_factor,
        checkpoint_every=t.checkpoint_every,
        seed=config.seed if seed is None else seed,
        progress=not config.quiet,
    )


def finish_run(
    stage: Path,
    fitted: Fitted,
    task: TaskData,
    result: FitResult,
    extra: dict[str, Any],
    record: dict[str, Any],
) -> dict[str, Any]:
    """Score the test split and write the whole run folder into ``stage``."""
    config = fitted.config
    threshold = threshold_from_validation(fitted, task.splits["validation"]) if "validation" in task.splits else None
    test_rows = task.splits["test"]
    test = fitted.encode(test_rows)
    predict_start = time.perf_counter()
    predictions = fitted.predict(test)
    extra = {**extra, "seconds_predict": time.perf_counter() - predict_start, "seed": config.seed}
    extra["stopped_early"] = result.stopped_early
    metrics = write_outputs(
        stage,
        fitted,
        test,
        test_rows,
        predictions,
        task=task.task,
        threshold=threshold,
        history=result.history,
        metrics_extra=extra,
    )
    save_posterior(stage / POSTERIOR_DIR, fitted.model, result.guide, history=result.history)
    atomic_write_text(stage / CONFIG_FILE, to_toml(config))
    atomic_write_json(stage / RUN_FILE, record)
    return metrics


def checkpoint_path(out: str | Path) -> Path:
    """Where ``bhpeft fit --out OUT`` keeps its training checkpoint: ``OUT.checkpoint.safetensors``,
    beside the run folder (which is only written at the end); removed once the run folder is written."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint.safetensors")


def fit_run(config: RunConfig, command: str | None = None, resume: bool = False) -> dict[str, Any]:
    """``bhpeft fit``: load, fit, score the test split, write the run folder ``config.out``.

    Training checkpoints go to :func:`checkpoint_path`; ``resume`` continues from one.  In a
    ``torch.distributed`` process group every rank fits its shard and rank 0 alone scores and
    writes (the other ranks return ``{}``).
    """
    start = time.perf_counter()
    _quiet_libraries(config)
    model_file = load_model_file(config.model.file)
    task = load_data(config, model_file)
    checkpoint = checkpoint_path(config.out)
    if resume and not checkpoint.is_file():
        raise CheckpointError(f"--resume: there is no checkpoint {checkpoint} to resume from; run without --resume")
    if not resume and checkpoint.exists():
        raise CheckpointError(
            f"an interrupted run left the checkpoint {checkpoint}; add --resume to continue it, or delete it to start afresh"
        )
    main = is_main_process()
    trained = False
    try:
        with staged_directory(config.out) if main else tempfile.TemporaryDirectory() as stage:
            stage = Path(stage)
            torch.manual_seed(config.seed)
            base, tokenizer = load_backbone(config.model.backbone)
            peft = inject(base, model_file.hybrid_spec(task.num_labels))
            model = BayesianHybridModel(
                peft,
                model_file.priors,
                guide_spec(config, model_file),
                config.model.kl_weight if config.model.kl_weight is not None else model_file.kl_weight,
                config.seed,
                model_fn=model_file.model,
            )
            select_sites(model, config.export.sites)  # a pattern matching no site fails now, not after the fit
            fitted = Fitted(model, None, tokenizer, task.label_names, model_file, config)
            train = fitted.encode(task.splits["train"])
            result: FitResult = fit(
                model, train, fit_config_of(config), collate_fn=fitted.collate, checkpoint=checkpoint, resume=resume
            )
            trained = True
            if not main:
                return {}
            fitted.guide, fitted.history = result.guide, result.history
            seconds = time.perf_counter() - start
            record = run_record(config, model_file, task, model, command)
            record["rounds"] = [
                {"round": 0, "data": config.data.train, "source": task.sources["train"], "rows": len(train), "replayed": 0}
            ]
            extra = {"seconds_fit": seconds, "train_size": len(train), "round": 0, "resumed": resume, "processes": world()[1]}
            metrics = finish_run(stage, fitted, task, result, extra, record)
    except BaseException as err:
        if trained and checkpoint.is_file():  # keep the trained state, so that the run need not be refitted
            err.add_note(f"the trained state is kept in {checkpoint}; add --resume to write the run folder without refitting")
        raise
    checkpoint.unlink(missing_ok=True)  # the run folder now holds the posterior
    return metrics


def update_run(
    run_dir: str | Path, data_path: str, out: str | Path, overrides: dict[str, Any] | None, command: str | None = None
) -> dict[str, Any]:
    """``bhpeft update``: one round of dynamic fine-tuning.  The run's posterior becomes the
    prior, the guide starts from it, and SVI fits the new data (plus ``update.replay`` of the
    earlier rounds' examples).  Writes a run folder like :func:`fit_run`'s, scored on the run's test split."""
    start = time.perf_counter()
    fitted, record = open_run(run_dir, overrides)
    config = dataclasses.replace(fitted.config, out=str(out))
    fitted.config = config
    task = load_data(config, fitted.model_file)
    rows = read_rows(fitted, record, data_path, labelled=True)
    u = config.update
    rounds = list(record.get("rounds") or [{"round": 0, "data": config.data.train, "rows": None}])
    with staged_directory(out) as stage:
        driver = DynamicFineTuning.resume(
            fitted.model,
            fitted.guide,
            rounds_done=len(rounds),
            fit_config=fit_config_of(config),
            config=DynamicConfig(
                inflation=u.inflation,
                kl_weight=fitted.model.kl_weight,
                replay=u.replay,
                max_history=u.max_history,
                map_scale=u.map_scale,
            ),
        )
        if u.replay > 0:  # rebuild the earlier rounds' examples, newest last
            kept = [task.splits["train"]] + [read_rows(fitted, record, r["data"], labelled=True) for r in rounds[1:]]
            driver.kept = [fitted.encode(k) for k in kept][-(u.max_history or len(kept)) :]
        new = fitted.encode(rows)
        result = driver.update(new, collate_fn=fitted.collate, label=str(data_path))
        this = driver.rounds[-1]
        fitted.model, fitted.guide, fitted.history = driver.model, driver.guide, result.history
        new_record = dict(record)
        new_record["rounds"] = [
            *rounds,
            {"round": len(rounds), "data": str(data_path), "rows": len(new), "replayed": this.replayed, "from": str(run_dir)},
        ]
        new_record["update"] = dataclasses.asdict(u)
        new_record["command"] = command
        extra = {"seconds_fit": time.perf_counter() - start, "train_size": len(new), "round": len(rounds)}
        return finish_run(stage, fitted, task, result, extra, new_record)


def run_record(
    config: RunConfig, model_file: ModelFile, task: TaskData, model: BayesianHybridModel, command: str | None = None
) -> dict[str, Any]:
    """The ``run.json`` record."""
    return {
        "task": task.task,
        "kind": task.kind,
        "label_names": list(task.label_names),
        "scoring": model.peft.scoring,
        "model_file": {"path": str(model_file.path), "sha256": model_file.sha256},
        "backbone": config.model.backbone,
        "data": {split: {"source": task.sources[split], "rows": len(task.splits[split])} for split in task.splits},
        "class_counts": {split: task.class_counts(split) for split in task.splits},
        "seed": config.seed,
        "command": command,
        "versions": library_versions(),
    }


def open_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Fitted, dict[str, Any]]:
    """Reopen a run folder written by :func:`fit_run`: ``(fitted, run record)``."""
    run_dir = Path(run_dir)
    record_path = run_dir / RUN_FILE
    if not record_path.is_file():
        raise SpecError(f"{run_dir} is not a run folder (no {RUN_FILE}); give the --out folder of a 'bhpeft fit'")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"{record_path} is damaged ({err}); refit the run") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("model_file"), dict)
        or not isinstance(record.get("label_names"), list)
        or "task" not in record
    ):
        raise SpecError(f"{record_path} is damaged (task, label_names or model_file missing); refit the run")
    config = load_config(run_dir / CONFIG_FILE, overrides)
    _quiet_libraries(config)
    model_file = load_model_file(config.model.file)
    if model_file.sha256 != record["model_file"].get("sha256"):
        print(
            f"bhpeft: warning: {model_file.path} changed since the run was fitted (SHA-256 differs); "
            "predictions use the file as it is now",
            file=sys.stderr,
        )
    base, tokenizer = load_backbone(config.model.backbone)
    spec = model_file.hybrid_spec(len(record["label_names"]))
    model, guide = load_posterior(run_dir / POSTERIOR_DIR, base, model_fn=model_file.model, spec=spec)
    fitted = Fitted(model, guide, tokenizer, tuple(record["label_names"]), model_file, config)
    return fitted, record


def read_rows(fitted: Fitted, record: dict, path: str, labelled: bool):
    """Rows of ``path`` read as the run's task, with the run's label names."""
    d = fitted.config.data
    rows, _ = read_split(
        path,
        record["task"],
        format=d.format,
        text_column=d.text_column,
        label_column=d.label_column,
        label_names=record["label_names"],
        require_labels=labelled,
    )
    if len(rows) == 0:
        raise SpecError(f"{path} holds no examples")
    return rows


def apply_run(run_dir: str | Path, data_path: str, out: str | Path, overrides: dict[str, Any] | None, labelled: bool):
    """``bhpeft predict`` (``labelled=False``) and ``bhpeft evaluate`` (``labelled=True``)."""
    fitted, record = open_run(run_dir, overrides)
    rows = read_rows(fitted, record, data_path, labelled)
    stored = Path(run_dir) / METRICS_FILE
    threshold = None
    if stored.is_file():
        try:
            saved = json.loads(stored.read_text(encoding="utf-8")).get("threshold")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise SpecError(f"{stored} is damaged ({err}); refit the run or restore the file") from None
        if saved and saved.get("threshold") is not None:
            threshold = Threshold(**{k: v for k, v in saved.items() if k in Threshold.__dataclass_fields__})
    with staged_directory(out) as stage:
        data = fitted.encode(rows)
        predictions = fitted.predict(data)
        if not labelled:
            predictions.labels = None
            predictions.log_likelihood = None
        extra = {"data": str(data_path), "run": str(run_dir)}
        metrics = write_outputs(
            stage, fitted, data, rows, predictions, task=record["task"], threshold=threshold, metrics_extra=extra
        )
    return metrics, predictions


def export_run(run_dir: str | Path, data_path: str | None, out: str | Path, overrides: dict[str, Any] | None) -> Path:
    """``bhpeft export``: the ``InferenceData`` of a run on the labelled examples of ``data_path``."""
    fitted, record = open_run(run_dir, overrides)
    if data_path is None:
        raise SpecError("bhpeft export needs --data FILE (labelled examples to compute the log-likelihood on)")
    rows = read_rows(fitted, record, data_path, labelled=True)
    data = fitted.encode(rows)
    posterior_meta = json.loads((Path(run_dir) / POSTERIOR_DIR / "posterior.json").read_text(encoding="utf-8"))
    c = fitted.config
    idata = to_inference_data(
        fitted.model,
        fitted.guide,
        data,
        num_samples=c.export.samples or c.predict.samples,
        seed=c.seed,
        sites=c.export.sites,
        history=posterior_meta.get("history"),
        label_names=fitted.label_names,
        batch_size=c.predict.batch_size,
        collate_fn=fitted.collate,
    )
    out = Path(out)
    path = out if out.suffix == ".nc" else out / IDATA_FILE
    created = next((p for p in reversed([path.parent, *path.parent.parents]) if not p.exists()), None)
    try:
        return save_inference_data(idata, path)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)  # a failed write leaves no new, empty folder behind
        raise
