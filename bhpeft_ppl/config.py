"""Run configuration: a TOML file whose every field can be overridden on the command line.

Sections and fields (each with its help text) are the dataclasses below;
``bhpeft fit --help`` lists them as ``--section.field`` options.  Precedence:
defaults < the TOML file (``--config``) < command-line options.  Unknown
sections or keys and values of the wrong type are errors that name the key.

Example ``run.toml``::

    seed = 0
    out = "runs/sst2"

    [model]
    file = "models/sentiment.py"
    backbone = "minilm"

    [data]
    train = "../shared/data/sst2/train.tsv"
    test = "../shared/data/sst2/dev.tsv"
    train_size = 2000

    [train]
    epochs = 3
    lr = 0.01
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelSection:
    """``[model]``: the Pyro model file, the base model and the variational family."""

    file: str = _opt("models/sentiment.py", "Pyro model file (TASK, SPEC, PRIORS, GUIDE, model); see models/")
    backbone: str = _opt("minilm", "base model: 'minilm' (bundled by pip), a local folder, or a hub id (needs a network)")
    guide: str | None = _opt(
        None,
        "override the model file's GUIDE with a preset",
        ("mean_field", "low_rank", "map", "blob", "paper_released"),
    )
    kl_weight: float | None = _opt(None, "override the model file's KL_WEIGHT (1 = proper ELBO)")


@dataclass
class DataSection:
    """``[data]``: where the examples come from and how they are tokenised."""

    train: str | None = _opt(None, "training file (or hub id); validation/test are split from it when missing")
    validation: str | None = _opt(None, "validation file (used to choose the selective-prediction threshold)")
    test: str | None = _opt(None, "test file (scored in metrics.json)")
    format: str = _opt("auto", "file format", ("auto", "tsv", "csv", "csv_headerless", "ag_news", "jsonl", "commonsense_qa"))
    text_column: str | None = _opt(None, "text column (default: text, sentence, review, content or document)")
    label_column: str | None = _opt(None, "label column (default: label, labels, score, sentiment or class)")
    label_names: list[str] | None = field(
        default=None, metadata={"help": "declared label set, in class order (comma-separated on the command line)"}
    )
    train_size: int | None = _opt(None, "use a stratified sample of this many training examples")
    validation_size: int | None = _opt(None, "use a stratified sample of this many validation examples")
    test_size: int | None = _opt(None, "use a stratified sample of this many test examples")
    validation_fraction: float = _opt(0.1, "fraction of train held out as validation when no validation file is given")
    test_fraction: float = _opt(0.2, "fraction of train held out as test when no test file is given")
    max_length: int = _opt(128, "tokens kept per text (longer texts are truncated)")
    truncation: str = _opt(
        "right", "which end of an over-long text is cut (answer-letter prompts always lose their start)", ("right", "left")
    )


@dataclass
class TrainSection:
    """``[train]``: stochastic variational inference."""

    epochs: int = _opt(3, "passes over the training data")
    batch_size: int = _opt(16, "minibatch size")
    lr: float = _opt(1e-2, "peak learning rate of ClippedAdam")
    schedule: str = _opt("linear", "learning-rate schedule after warm-up", ("constant", "linear", "cosine"))
    warmup_ratio: float = _opt(0.06, "fraction of steps spent warming up")
    clip_norm: float = _opt(10.0, "per-parameter gradient-norm clip")
    num_particles: int = _opt(1, "Monte Carlo samples of the ELBO per step")
    estimator: str = _opt(
        "mean_field", "ELBO: closed-form KL of Normal sites (MeanFieldELBO) or Monte Carlo (Trace_ELBO)", ("mean_field", "trace")
    )
    max_steps: int | None = _opt(None, "stop after this many steps")
    scale_lr_factor: float = _opt(1.0, "learning rate of the guide's scale parameters relative to lr")
    checkpoint_every: int = _opt(100, "steps between training checkpoints (0: only at the end and on Ctrl-C)")


@dataclass
class PredictSection:
    """``[predict]``: posterior predictive, uncertainty and decisions."""

    samples: int = _opt(10, "posterior draws averaged per prediction")
    batch_size: int = _opt(32, "examples per forward pass")
    uncertainty: str = _opt(
        "max_prob",
        "uncertainty score for selective prediction",
        ("max_prob", "entropy", "mutual_information", "summed_variance"),
    )
    coverage: float = _opt(0.8, "coverage at which accuracy is reported (accept the most certain fraction)")
    target_error: float | None = _opt(None, "choose a rejection threshold on validation data keeping the error under this")
    confidence: float | None = _opt(None, "with target_error: hold the error bound at this confidence (Clopper-Pearson)")
    cost: list[float] | None = field(
        default=None,
        metadata={
            "help": "cost matrix cost[true][action], C*C numbers row by row (e.g. 0,5,1,0): adds the Bayes-optimal "
            "action and its expected cost per example to predictions.csv"
        },
    )
    abstain_cost: float | None = _opt(None, "with cost: the cost of abstaining (handing the example to a person)")
    ood: str | None = _opt(
        None, "out-of-distribution data file (labels ignored): report the AUROC of each uncertainty score against the test data"
    )


@dataclass
class ExportSection:
    """``[export]``: the ArviZ InferenceData and the plots."""

    samples: int | None = _opt(None, "posterior draws in the InferenceData (default: predict.samples, reusing those draws)")
    sites: list[str] | None = field(
        default=None, metadata={"help": "site-name patterns of the weights exported (default: all latent sites)"}
    )
    plots: bool = _opt(True, "write PNG plots into the run folder")


@dataclass
class UpdateSection:
    """``[update]``: dynamic fine-tuning (``bhpeft update``), the posterior of a run as the prior of the next."""

    inflation: float = _opt(1.0, "factor >= 1 on every posterior variance before it becomes the prior (1 = exact updating)")
    replay: float = _opt(0.0, "fraction of the earlier rounds' examples mixed into the new round (the paper uses 0.2)")
    max_history: int | None = _opt(None, "earlier rounds kept for replay (default: all)")
    map_scale: float | None = _opt(None, "scale of the prior around MAP estimates (default: the previous prior's scale)")


@dataclass
class RunConfig:
    """The whole configuration of a run."""

    seed: int = _opt(0, "one seed for data splits, initial values, data order and posterior draws")
    out: str = _opt("runs/fit", "run folder")
    quiet: bool = _opt(False, "no progress bars")
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    predict: PredictSection = field(default_factory=PredictSection)
    export: ExportSection = field(default_factory=ExportSection)
    update: UpdateSection = field(default_factory=UpdateSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``None`` values included)."""
        return dataclasses.asdict(self)


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "predict": PredictSection,
    "export": ExportSection,
    "update": UpdateSection,
}


def field_type(cls, name: str) -> tuple[type, bool, bool]:
    """``(scalar type, optional, is_list)`` of a config field."""
    hints = typing.get_type_hints(cls)
    hint = hints[name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _check_value(where: str, cls, name: str, value: Any) -> Any:
    scalar, optional, is_list = field_type(cls, name)
    if value is None:
        if optional:
            return None
        raise SpecError(f"{where} must not be empty")
    if is_list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            if scalar is not str:
                try:
                    value = [scalar(v) for v in value]
                except ValueError:
                    raise SpecError(f"{where} must be comma-separated {scalar.__name__} values, got {value!r}") from None
        if scalar is float and isinstance(value, list):
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not isinstance(value, list) or not all(isinstance(v, scalar) for v in value):
            raise SpecError(f"{where} must be a list of {scalar.__name__}, got {value!r}")
        return value
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, scalar) or (scalar is not bool and isinstance(value, bool)):
        raise SpecError(f"{where} must be {scalar.__name__}, got {type(value).__name__} {value!r}")
    choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("choices")
    if choices and value not in choices:
        raise SpecError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value


def _apply(config: RunConfig, data: dict[str, Any], source: str) -> RunConfig:
    top = {f.name for f in dataclasses.fields(RunConfig)}
    for key, value in data.items():
        if key not in top:
            raise SpecError(f"{source}: unknown key {key!r}; valid top-level keys and sections are {sorted(top)}")
        if key in SECTIONS:
            cls = SECTIONS[key]
            if not isinstance(value, dict):
                raise SpecError(f"{source}: [{key}] must be a table of settings, got {value!r}")
            section = getattr(config, key)
            names = {f.name for f in dataclasses.fields(cls)}
            for sub, sub_value in value.items():
                if sub not in names:
                    raise SpecError(f"{source}: unknown key {key}.{sub}; valid keys of [{key}] are {sorted(names)}")
                setattr(section, sub, _check_value(f"{source}: {key}.{sub}", cls, sub, sub_value))
        else:
            setattr(config, key, _check_value(f"{source}: {key}", RunConfig, key, value))
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file at ``path``, then ``overrides`` (``{"train.lr": 0.01, "seed": 1}``)."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"config file {path} not found")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SpecError(f"config file {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"config file {path} is not valid TOML: {err}") from None
        _apply(config, data, str(path))
    nested: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if "." in key:
            section, sub = key.split(".", 1)
            nested.setdefault(section, {})[sub] = value
        else:
            nested[key] = value
    return _check_ranges(_apply(config, nested, "command line"))


def _check_ranges(config: RunConfig) -> RunConfig:
    """Values of the right type but outside their range, caught before any work is done."""
    d, t, p, e, u = config.data, config.train, config.predict, config.export, config.update
    checks = (
        ("data.max_length", d.max_length, d.max_length >= 2, "at least 2 (the special tokens)"),
        ("data.validation_fraction", d.validation_fraction, 0 <= d.validation_fraction < 1, "in [0, 1)"),
        ("data.test_fraction", d.test_fraction, 0 <= d.test_fraction < 1, "in [0, 1)"),
        ("train.epochs", t.epochs, t.epochs >= 1, "a positive integer"),
        ("train.batch_size", t.batch_size, t.batch_size >= 1, "a positive integer"),
        ("train.lr", t.lr, t.lr > 0, "positive"),
        ("train.scale_lr_factor", t.scale_lr_factor, t.scale_lr_factor > 0, "positive"),
        ("train.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 0, "a non-negative integer"),
        ("predict.samples", p.samples, p.samples >= 1, "a positive integer"),
        ("predict.batch_size", p.batch_size, p.batch_size >= 1, "a positive integer"),
        ("predict.coverage", p.coverage, 0 < p.coverage <= 1, "in (0, 1]"),
        ("predict.target_error", p.target_error, p.target_error is None or 0 <= p.target_error < 1, "in [0, 1)"),
        ("predict.confidence", p.confidence, p.confidence is None or 0 < p.confidence < 1, "in (0, 1), e.g. 0.95"),
        ("export.samples", e.samples, e.samples is None or e.samples >= 1, "a positive integer (or unset)"),
        ("update.inflation", config.update.inflation, config.update.inflation >= 1, "at least 1 (1 = exact updating)"),
        ("update.replay", config.update.replay, 0 <= config.update.replay <= 1, "a fraction in [0, 1]"),
        ("update.max_history", u.max_history, u.max_history is None or u.max_history >= 1, "a positive integer"),
        ("update.map_scale", u.map_scale, u.map_scale is None or u.map_scale > 0, "positive"),
    )
    for key, value, ok, what in checks:
        if not ok:
            raise SpecError(f"{key} must be {what}, got {value!r}")
    return config


def _toml_char(ch: str) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    if ch in escapes:
        return escapes[ch]
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\u{ord(ch):04X}"
    return ch


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(ch) for ch in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: RunConfig) -> str:
    """TOML text of ``config`` (fields that are ``None`` are left out: they mean "default"),
    read back equal by :func:`load_config`."""
    data = config.to_dict()
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for section, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"
