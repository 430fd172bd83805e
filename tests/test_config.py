"""Run configuration: defaults, TOML file < command-line precedence, the ``to_toml`` -> ``load_config`` round trip
(also as a hypothesis property), and a ``SpecError`` naming the key or the file for every kind of bad input."""

import dataclasses
import json
import math
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bhpeft_ppl.config as config_module
from bhpeft_ppl.config import (
    DataSection,
    ExportSection,
    ModelSection,
    PredictSection,
    RunConfig,
    TrainSection,
    field_type,
    load_config,
    to_toml,
)
from bhpeft_ppl.errors import SpecError

SECTIONS = config_module.SECTIONS
assert set(SECTIONS) == {"model", "data", "train", "predict", "export", "update"}
assert SECTIONS["model"] is ModelSection and SECTIONS["data"] is DataSection and SECTIONS["train"] is TrainSection
assert SECTIONS["predict"] is PredictSection and SECTIONS["export"] is ExportSection


def write_toml(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# Defaults ---------------------------------------------------------------------------------------------
def test_defaults():
    config = load_config()
    assert config == RunConfig() == load_config(None, {})
    assert (config.seed, config.out, config.quiet) == (0, "runs/fit", False)
    assert config.model.file == "models/sentiment.py" and config.model.backbone == "minilm"
    assert config.model.guide is None and config.model.kl_weight is None
    assert config.data.train is None and config.data.label_names is None and config.data.max_length == 128
    assert (config.train.epochs, config.train.batch_size, config.train.lr) == (3, 16, 1e-2)
    assert config.train.schedule == "linear" and config.train.estimator == "mean_field" and config.train.max_steps is None
    assert config.predict.samples == 10 and config.predict.uncertainty == "max_prob" and config.predict.coverage == 0.8
    assert config.export.samples is None and config.export.sites is None and config.export.plots is True
    assert set(config.to_dict()) >= {"seed", "out", "quiet", *SECTIONS}


def test_defaults_are_fresh_objects():
    a, b = load_config(), load_config()
    a.train.epochs = 99
    assert b.train.epochs == 3 and RunConfig().train.epochs == 3


def _all_fields():
    yield "", RunConfig, [f for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for name, cls in SECTIONS.items():
        yield name, cls, dataclasses.fields(cls)


def test_every_field_has_help_and_a_default_that_passes_its_own_check():
    defaults = RunConfig()
    overrides = {}
    for section, cls, fields in _all_fields():
        instance = getattr(defaults, section) if section else defaults
        for f in fields:
            key = f"{section}.{f.name}" if section else f.name
            assert f.metadata.get("help"), f"{key} has no help text"
            value = getattr(instance, f.name)
            _, optional, _ = field_type(cls, f.name)
            assert value is not None or optional, key
            choices = f.metadata.get("choices")
            if choices and value is not None:
                assert value in choices, key
            overrides[key] = value
    assert load_config(None, overrides) == defaults


# Precedence ----------------------------------------------------------------------------------------------
def test_file_then_overrides(tmp_path):
    path = write_toml(
        tmp_path,
        'seed = 5\nout = "runs/a"\n\n[train]\nepochs = 7\nlr = 0.5\n\n[data]\nlabel_names = ["neg", "pos"]\n',
    )
    from_file = load_config(path)
    assert (from_file.seed, from_file.out, from_file.train.epochs, from_file.train.lr) == (5, "runs/a", 7, 0.5)
    assert from_file.data.label_names == ["neg", "pos"]
    assert from_file.train.batch_size == 16, "keys missing from the file keep their default"
    both = load_config(str(path), {"seed": 9, "train.lr": 0.02, "predict.samples": 3, "data.label_names": "bad, good"})
    assert both.seed == 9 and both.train.lr == 0.02 and both.predict.samples == 3
    assert both.data.label_names == ["bad", "good"]
    assert both.out == "runs/a" and both.train.epochs == 7, "file values survive unrelated overrides"
    assert load_config(path, {"train": {"epochs": 1}}).train.epochs == 1
    assert load_config(path, {"train.max_steps": None}).train.max_steps is None


def test_ints_are_accepted_for_floats_and_become_floats(tmp_path):
    config = load_config(write_toml(tmp_path, "[train]\nlr = 1\n\n[predict]\ncost = [0, 5, 1.5, 0]\n"))
    assert config.train.lr == 1.0 and type(config.train.lr) is float
    assert config.predict.cost == [0.0, 5.0, 1.5, 0.0] and all(type(v) is float for v in config.predict.cost)
    assert type(load_config(None, {"model.kl_weight": 2}).model.kl_weight) is float


# Round trip ------------------------------------------------------------------------------------------------
def _round_trip(config: RunConfig, tmp_path: Path) -> RunConfig:
    text = to_toml(config)
    tomllib.loads(text)  # valid TOML
    return load_config(write_toml(tmp_path, text, "round.toml"))


def test_round_trip_of_the_defaults(tmp_path):
    assert _round_trip(RunConfig(), tmp_path) == RunConfig()


def test_round_trip_with_lists_nones_small_floats_and_escapes(tmp_path):
    config = RunConfig()
    config.seed = 123456789
    config.out = 'C:\\runs\\"quoted" run\ttab\nsecond line'
    config.quiet = True
    config.model.guide = "map"
    config.model.kl_weight = 0.25
    config.data.train = "data/train.tsv"
    config.data.text_column = None
    config.data.label_names = ["neg", "pos, with comma", 'say "hi"', "back\\slash", "ünïcödé ✓", ""]
    config.data.train_size = 100
    config.data.validation_fraction = 0.0
    config.train.lr = 1e-5
    config.train.warmup_ratio = 1.5e-300
    config.train.clip_norm = 1e300
    config.train.schedule = "cosine"
    config.train.max_steps = None
    config.predict.target_error = 0.05
    config.predict.cost = [0.0, 5.0, 1e-7, -0.5]
    config.export.sites = ["lora_A", r"encoder\.layer\.\d+\..*"]
    config.export.plots = False
    text = to_toml(config)
    assert "max_steps" not in text and "text_column" not in text, "None fields are left out"
    loaded = _round_trip(config, tmp_path)
    assert loaded == config
    assert loaded.train.lr == 1e-5 and loaded.export.sites[1] == r"encoder\.layer\.\d+\..*"
    assert to_toml(loaded) == text


def test_empty_lists_round_trip(tmp_path):
    config = RunConfig()
    config.data.label_names = []
    config.export.sites = []
    assert _round_trip(config, tmp_path) == config


# Errors ------------------------------------------------------------------------------------------------------
BAD_FILES = {
    "unknown-section": ("[bogus]\nx = 1\n", "unknown key 'bogus'"),
    "unknown-key": ("[train]\nepoch = 3\n", "unknown key train.epoch"),
    "unknown-top-level-key": ("sed = 1\n", "unknown key 'sed'"),
    "string-for-int": ('[train]\nepochs = "3"\n', "train.epochs must be int, got str"),
    "bool-for-int": ("[train]\nepochs = true\n", "train.epochs must be int, got bool"),
    "float-for-int": ("[train]\nepochs = 3.0\n", "train.epochs must be int, got float"),
    "string-for-float": ('[train]\nlr = "0.1"\n', "train.lr must be float, got str"),
    "bool-for-float": ("[train]\nlr = false\n", "train.lr must be float, got bool"),
    "int-for-bool": ("quiet = 1\n", "quiet must be bool, got int"),
    "int-for-string": ("out = 3\n", "out must be str, got int"),
    "choice": ('[train]\nschedule = "exponential"\n', "train.schedule must be one of"),
    "optional-choice": ('[model]\nguide = "full_rank"\n', "model.guide must be one of"),
    "list-of-ints-for-strings": ("[data]\nlabel_names = [1, 2]\n", "data.label_names must be a list of str"),
    "mixed-list": ('[export]\nsites = ["lora_A", 3]\n', "export.sites must be a list of str"),
    "scalar-for-list": ("[export]\nsites = 3\n", "export.sites must be a list of str"),
    "strings-for-floats": ('[predict]\ncost = ["0", "1"]\n', "predict.cost must be a list of float"),
    "section-not-a-table": ("train = 3\n", "[train] must be a table"),
    "table-for-scalar": ("[seed]\nvalue = 1\n", "seed must be int"),
}


@pytest.mark.parametrize(("text", "fragment"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_file_is_a_spec_error_naming_file_and_key(tmp_path, text, fragment):
    path = write_toml(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"train.epochs": "3"}, "command line: train.epochs must be int"),
        ({"train.epochs": 2.5}, "train.epochs must be int"),
        ({"train.epochs": None}, "train.epochs must not be empty"),
        ({"bogus.x": 1}, "unknown key 'bogus'"),
        ({"train.bogus": 1}, "unknown key train.bogus"),
        ({"predict.uncertainty": "variance"}, "predict.uncertainty must be one of"),
        ({"data.label_names": ["a", None]}, "data.label_names must be a list of str"),
    ],
)
def test_bad_override_is_a_spec_error_naming_the_key(overrides, fragment):
    with pytest.raises(SpecError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


def test_overrides_are_checked_after_a_good_file(tmp_path):
    path = write_toml(tmp_path, "[train]\nepochs = 2\n")
    with pytest.raises(SpecError, match=r"command line: train\.schedule"):
        load_config(path, {"train.schedule": "step"})


def test_invalid_toml(tmp_path):
    path = write_toml(tmp_path, "seed = \n[train\n")
    with pytest.raises(SpecError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "is not valid TOML" in str(err.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('out = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(SpecError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "not UTF-8" in str(err.value)


def test_missing_file_or_folder(tmp_path):
    for path in (tmp_path / "absent.toml", tmp_path):
        with pytest.raises(SpecError) as err:
            load_config(path)
        assert str(path) in str(err.value) and "not found" in str(err.value)


# Regression: TOML basic strings must escape every control character except tab; to_toml once wrote
# only backslash, quote and newline escapes, and a carriage return came back as a newline.
def test_control_characters_in_strings_round_trip(tmp_path):
    config = RunConfig()
    config.out = "runs/a\rb"
    config.data.label_names = ["nul\x00", "escape\x1b", "del\x7f"]
    assert _round_trip(config, tmp_path) == config


# Property ---------------------------------------------------------------------------------------------------
# Any text that is valid UTF-8 (no lone surrogates); control characters included (escaped by to_toml).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
VALUES = st.fixed_dictionaries(
    {
        "seed": st.integers(-(2**63), 2**63 - 1),
        "out": TEXT,
        "quiet": st.booleans(),
        "model.backbone": TEXT,
        "model.kl_weight": st.none() | FLOATS,
        "data.text_column": st.none() | TEXT,
        "data.label_names": st.none() | st.lists(TEXT, max_size=4),
        "data.max_length": st.integers(2, 10**9),
        "train.lr": st.floats(min_value=1e-300, max_value=1e300),
        "train.warmup_ratio": FLOATS,
        "train.schedule": st.sampled_from(["constant", "linear", "cosine"]),
        "train.max_steps": st.none() | st.integers(1, 10**12),
        "predict.cost": st.none() | st.lists(FLOATS, max_size=6),
        "predict.target_error": st.none() | st.floats(min_value=0.0, max_value=0.999),
        "export.sites": st.none() | st.lists(TEXT, min_size=1, max_size=3),
        "export.plots": st.booleans(),
    }
)


@settings(max_examples=60, deadline=None, database=None)
@given(values=VALUES)
def test_random_configs_survive_the_round_trip(values):
    config = RunConfig()
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        setattr(getattr(config, section) if section else config, name, value)
    assert load_config(None, values) == config, "the values are valid overrides"
    with tempfile.TemporaryDirectory() as folder:
        loaded = _round_trip(config, Path(folder))
    assert loaded == config
    assert type(loaded.train.lr) is float and type(loaded.data.max_length) is int


# Properties of bad input ---------------------------------------------------------------------------------------
KEYS = sorted(
    f"{section}.{f.name}" if section else f.name for section, _, fields in _all_fields() for f in fields
)  # every field, as an override key
ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    overrides=st.dictionaries(st.sampled_from(KEYS) | TEXT.filter(lambda k: "." not in k), ANY, max_size=3)
    | st.builds(lambda section, value: {section: value}, st.sampled_from(sorted(SECTIONS)), ANY)
)
def test_any_override_gives_a_config_or_a_spec_error(overrides):
    """Wrong types, unknown keys, sections given scalars, NaN and infinity: a RunConfig or a SpecError, nothing else."""
    try:
        config = load_config(None, overrides)
    except SpecError as err:
        assert str(err).startswith("command line: ") or " must be " in str(err), str(err)
        return
    assert isinstance(config, RunConfig)


TOML_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8)
TOML_SCALARS = st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | TOML_TEXT
TOML_VALUES = TOML_SCALARS | st.lists(TOML_SCALARS, max_size=3)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


@st.composite
def toml_files(draw):
    """TOML text: known sections and keys, now and then an unknown one, each value of any TOML type."""

    def line(key: str, value) -> str:
        return f"{json.dumps(key, ensure_ascii=False)} = {_toml_value(value)}"

    lines, top = [], draw(st.sampled_from(["seed", "out", "quiet"]) | TOML_TEXT.filter(lambda k: k not in SECTIONS))
    if draw(st.integers(0, 2)) == 0:
        lines.append(line(top, draw(TOML_VALUES)))
    sections = draw(st.lists(st.sampled_from(sorted(SECTIONS)), min_size=1, max_size=2, unique=True))
    if draw(st.integers(0, 4)) == 0:
        sections.append(draw(TOML_TEXT.filter(lambda name: name not in [*sections, top])))
    for section in sections:
        names = [f.name for f in dataclasses.fields(SECTIONS[section])] if section in SECTIONS else ["x"]
        entries = draw(st.dictionaries(st.sampled_from(names), TOML_VALUES, max_size=3))
        if draw(st.integers(0, 4)) == 0:
            entries[draw(TOML_TEXT)] = draw(TOML_VALUES)
        lines += [f"[{json.dumps(section, ensure_ascii=False)}]", *(line(k, v) for k, v in entries.items())]
    return "\n".join(lines) + "\n"


@settings(max_examples=100, deadline=None, database=None)
@given(text=toml_files())
def test_any_toml_file_gives_a_config_or_a_spec_error_naming_the_file(text):
    tomllib.loads(text)  # the generator writes valid TOML: the errors below are about keys and values
    with tempfile.TemporaryDirectory() as folder:
        path = write_toml(Path(folder), text)
        try:
            config = load_config(path)
        except SpecError as err:
            assert str(path) in str(err) or " must be " in str(err), str(err)
            return
    assert isinstance(config, RunConfig)


# Each checked range: a value outside it is a SpecError naming the key, raised by load_config (before any work).
OUT_OF_RANGE = {
    "data.max_length": st.integers(max_value=1),
    "data.validation_fraction": st.floats().filter(lambda x: not 0 <= x < 1),
    "data.test_fraction": st.floats().filter(lambda x: not 0 <= x < 1),
    "train.epochs": st.integers(max_value=0),
    "train.batch_size": st.integers(max_value=0),
    "train.lr": st.floats().filter(lambda x: not x > 0),
    "train.scale_lr_factor": st.floats().filter(lambda x: not x > 0),
    "predict.samples": st.integers(max_value=0),
    "predict.batch_size": st.integers(max_value=0),
    "predict.coverage": st.floats().filter(lambda x: not 0 < x <= 1),
    "predict.target_error": st.floats().filter(lambda x: not 0 <= x < 1),
    "predict.confidence": st.floats().filter(lambda x: not 0 < x < 1),
    "export.samples": st.integers(max_value=0),
    "update.inflation": st.floats().filter(lambda x: not x >= 1),
    "update.replay": st.floats().filter(lambda x: not 0 <= x <= 1),
    "update.max_history": st.integers(max_value=-1),  # 0: see test_zero_is_out_of_range
    "update.map_scale": st.floats().filter(lambda x: not x > 0 and x != 0),  # 0: see test_zero_is_out_of_range
}


@settings(max_examples=100, deadline=None, database=None)
@given(key_value=st.sampled_from(sorted(OUT_OF_RANGE)).flatmap(lambda key: st.tuples(st.just(key), OUT_OF_RANGE[key])))
def test_out_of_range_values_are_spec_errors_naming_the_key(key_value):
    key, value = key_value
    with pytest.raises(SpecError) as err:
        load_config(None, {key: value})
    assert str(err.value).startswith(f"{key} must be"), str(err.value)


@pytest.mark.parametrize(("key", "value"), [("update.max_history", 0), ("update.map_scale", 0.0)])
def test_zero_is_out_of_range(key, value):
    with pytest.raises(SpecError, match=key):
        load_config(None, {key: value})
