"""The ``bhpeft`` command line: help texts, one-line errors for bad inputs, and the demo end to end.

Bad inputs are a table: each case builds its files in a fresh folder, runs
:func:`bhpeft_ppl.cli.main` in-process, and checks the exit code (2 for a usage
or input error), that stderr is one line ``bhpeft: error: ...`` naming the
problem without a traceback, and that nothing was written: the folder holding
``--out`` (and the shared fitted run) is byte for byte as before.  The same checks
cover a live pickle payload in place of a run's posterior (it must never run), a
full disk (a failing write: exit code 1; after training, the checkpoint is kept
for ``--resume``), and the bad inputs that once escaped (``FIXED_BUG_CASES``).

The commands run on a tiny random-weight BERT with the real MiniLM tokenizer
(``tests/backbones.py``); only :func:`test_demo_writes_both_methods` uses the
real MiniLM weights (a few tens of seconds).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import arviz as az
import pytest
import torch
from backbones import REPO, SST2_DEV, fitted_run, save_tiny_backbone, sst2_rows, tiny_backbone

from bhpeft_ppl.checkpoint import load_checkpoint
from bhpeft_ppl.cli import main
from bhpeft_ppl.config import RunConfig
from bhpeft_ppl.workflow import checkpoint_path

pytestmark = pytest.mark.skipif(not SST2_DEV.is_file(), reason=f"SST-2 dev file not found at {SST2_DEV}")

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


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


# --help ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, expected",
    [
        ("fit", ["--config", "--train.lr", "peak learning rate of ClippedAdam", "--data.train_size", "--data.train-size"]),
        ("fit", ["--model.guide", "mean_field, low_rank, map", "--predict.target_error", "--export.sites", "--no-export.plots"]),
        ("predict", ["--from", "--data", "labels optional", "--train.lr", "peak learning rate of ClippedAdam"]),
        ("evaluate", ["--from", "--data", "with labels", "--predict.samples", "posterior draws averaged"]),
        ("export", ["--from", "--export.sites", "site-name patterns", "--export.samples"]),
        ("demo", ["--train-size", "--lr", "peak learning rate", "--max-length", "--samples"]),
    ],
)
def test_help_of_every_command(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for needle in expected:
        assert needle in text, needle


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "predict", "evaluate", "export", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["fit", "predict", "evaluate", "export"])
def test_every_config_field_is_an_option(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for key, value in RunConfig().to_dict().items():
        for name in value if isinstance(value, dict) else [None]:
            option = f"--{key}.{name}" if name else f"--{key}"
            assert f"{option} " in text or f"{option}," in text or f"{option}\n" in text, option


@pytest.mark.parametrize("argv", [[], ["nosuch"], ["fit", "--train.epochs", "two"], ["fit", "--train.epoch", "1"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err.strip().splitlines()[-1] and "Traceback" not in err


# bad inputs ------------------------------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What a case builds on: a fresh folder ``tmp`` (``--out`` is ``tmp/out`` unless the case says otherwise)."""

    tmp: Path
    backbone: Path
    run: Path
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "out"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def tsv(self, name: str, rows, header: str = "sentence\tlabel") -> Path:
        return self.file(name, "\n".join([header, *("\t".join(r) for r in rows)]) + "\n")

    def fit(self, *extra: str, train: Path | str | None = None, out: Path | None = None) -> list[str]:
        return [
            *("fit", "--model.backbone", str(self.backbone), "--data.train", str(train or SST2_DEV)),
            *("--data.train_size", "40", "--data.test_size", "20", "--train.epochs", "1", "--predict.samples", "2"),
            *("--no-export.plots", "--out", str(out or self.out), "--quiet", *extra),
        ]

    def apply(self, command: str, data: Path | str, *extra: str, run: Path | None = None) -> list[str]:
        return [command, "--from", str(run or self.run), "--data", str(data), "--out", str(self.out), "--quiet", *extra]

    def run_copy(self, change: Callable[[Path], None]) -> Path:
        copy = shutil.copytree(self.run, self.tmp / "run_copy")
        change(copy)
        return copy

    def labelled(self) -> Path:
        return self.tsv("labelled.tsv", sst2_rows(8, start=700))

    def unlabelled(self) -> Path:
        return self.tsv("texts.tsv", [(s,) for s, _ in sst2_rows(8, start=700)], header="sentence")


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _rewrite_checksum(run: Path) -> None:
    """Record the SHA-256 of the (changed) weights in posterior.json, so that the weights file itself is read."""
    meta_path = run / "posterior" / "posterior.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["weights_sha256"] = hashlib.sha256((run / "posterior" / "posterior.safetensors").read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


def _truncate_keeping_checksum(run: Path) -> None:
    _truncate(run / "posterior" / "posterior.safetensors")
    _rewrite_checksum(run)


def _edit_posterior_spec(run: Path) -> None:
    meta_path = run / "posterior" / "posterior.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["spec"]["lora"]["rank"] = 4  # the run was fitted with rank 8; the saved sites stay [8, ...]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")


def _posterior_of(ctx: Ctx, name: str, *options: str) -> Path:
    """The posterior folder of a small fit into ``ctx.tmp / name`` with ``options`` (another base model or spec)."""
    assert main(ctx.fit(*options, out=ctx.tmp / name)) == 0, f"the {name} fit failed"
    return ctx.tmp / name / "posterior"


def _with_posterior(ctx: Ctx, posterior: Path) -> Path:
    """A copy of the shared run whose posterior folder is replaced by ``posterior``."""

    def swap(run: Path) -> None:
        shutil.rmtree(run / "posterior")
        shutil.copytree(posterior, run / "posterior")

    return ctx.run_copy(swap)


def _posterior_of_another_base_model(ctx: Ctx) -> Path:
    other = save_tiny_backbone(ctx.tmp / "other_backbone", seed=1)  # same architecture, other weights
    return _with_posterior(ctx, _posterior_of(ctx, "other_fit", "--model.backbone", str(other)))


def _sentiment_variant(ctx: Ctx, name: str, old: str, new: str) -> Path:
    """A copy of ``models/sentiment.py`` (the shared run's model file) with ``old`` replaced by ``new``."""
    text = (REPO / "models" / "sentiment.py").read_text(encoding="utf-8")
    assert old in text, old
    return ctx.file(name, text.replace(old, new))


def _posterior_of_another_spec(ctx: Ctx) -> Path:
    rank_2 = _sentiment_variant(ctx, "rank_2.py", '"rank": 8', '"rank": 2')
    return _with_posterior(ctx, _posterior_of(ctx, "other_fit", "--model.file", str(rank_2)))


def _one_class(ctx: Ctx) -> Path:
    return ctx.tsv("one_class.tsv", [(s, "1") for s, label in sst2_rows(200) if label == "1"][:40])


def _model_file(ctx: Ctx, name: str, text: str) -> Path:
    return ctx.file(name, text)


_SPEC_ONLY = 'TASK = "sentiment"\nSPEC = {"lora": {"rank": 2}}\n'

CASES: dict[str, tuple[Callable[[Ctx], list[str]], list[str]]] = {
    # data files
    "missing_train_file": (lambda c: c.fit(train=c.tmp / "nope.tsv"), ["nope.tsv", "no such file"]),
    "no_train_data": (lambda c: ["fit", "--out", str(c.out), "--quiet"], ["no training data", "--data.train"]),
    "train_is_a_folder": (lambda c: c.fit(train=c.tmp), ["is a directory"]),
    "empty_file": (lambda c: c.fit(train=c.file("empty.tsv", "")), ["empty.tsv", "is empty"]),
    "header_only": (lambda c: c.fit(train=c.file("header.tsv", "sentence\tlabel\n")), ["header line but no rows"]),
    "not_utf8": (
        lambda c: c.fit(train=c.file("latin1.tsv", "sentence\tlabel\nfine\t1\ncaf\xe9 au lait\t0\n".encode("latin-1"))),
        ["latin1.tsv, line 3", "not valid UTF-8"],
    ),
    "label_column_missing": (
        lambda c: c.fit(train=c.tsv("nolabel.tsv", sst2_rows(40), header="sentence\tstars")),
        ["nolabel.tsv", "no label column", "stars"],
    ),
    "label_not_in_label_names": (
        lambda c: c.fit(
            "--data.label_names",
            "good,bad",
            train=c.tsv("names.tsv", [("nice", "good"), ("awful", "bad"), ("so so", "meh")] * 10),
        ),
        ["names.tsv, line 4", "'meh'", "label names"],
    ),
    "integer_label_out_of_range": (
        lambda c: c.fit(
            "--data.label_names", "negative,positive", train=c.tsv("range.tsv", [("a", "0"), ("b", "1"), ("c", "2")] * 9)
        ),
        ["range.tsv, line 4", "label 2 is outside 0..1"],
    ),
    "one_class_training_data": (lambda c: c.fit(train=_one_class(c)), ["at least two classes", "positive"]),
    "ragged_row": (
        lambda c: c.fit(train=c.file("ragged.tsv", "sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")),
        ["ragged.tsv, line 3", "3 fields"],
    ),
    "train_size_zero": (lambda c: c.fit("--data.train_size", "0"), ["n >= 1"]),
    "fractions_out_of_range": (lambda c: c.fit("--data.validation_fraction", "1.5"), ["validation_fraction must be in [0, 1)"]),
    # model files
    "unknown_model_file": (lambda c: c.fit("--model.file", "nosuch_model"), ["model file nosuch_model not found", "sentiment"]),
    "model_file_not_python": (lambda c: c.fit("--model.file", str(c.file("model.txt", _SPEC_ONLY))), ["must be a Python file"]),
    "model_file_raises_on_import": (
        lambda c: c.fit("--model.file", str(_model_file(c, "boom.py", "import pyro\nraise RuntimeError('boom at import')\n"))),
        ["boom.py", "raised RuntimeError", "boom at import"],
    ),
    "model_file_syntax_error": (
        lambda c: c.fit("--model.file", str(_model_file(c, "syntax.py", "TASK = 'sentiment'\ndef model(:\n"))),
        ["syntax.py", "SyntaxError (line 2)"],
    ),
    "model_file_without_model": (
        lambda c: c.fit("--model.file", str(_model_file(c, "nomodel.py", _SPEC_ONLY))),
        ["nomodel.py", "missing: model"],
    ),
    "model_file_not_utf8": (
        lambda c: c.fit("--model.file", str(c.file("latin1_model.py", b'NAME = "caf\xe9"\n' + _SPEC_ONLY.encode()))),
        ["latin1_model.py", "SyntaxError", "'utf-8' codec can't decode"],
    ),
    "model_file_spec_unknown_key": (
        lambda c: c.fit("--model.file", str(_sentiment_variant(c, "rnak.py", '"rank": 8', '"rnak": 8'))),
        ["rnak.py", "unknown LoRASpec field(s) ['rnak']"],
    ),
    "model_file_spec_wrong_type": (
        lambda c: c.fit("--model.file", str(_sentiment_variant(c, "eight.py", '"rank": 8', '"rank": "eight"'))),
        ["eight.py", "LoRASpec.rank must be a positive integer", "'eight'"],
    ),
    "predict_model_file_raises_on_import": (
        lambda c: c.apply(
            "predict", c.unlabelled(), "--model.file", str(_model_file(c, "boom.py", "raise RuntimeError('boom at import')\n"))
        ),
        ["boom.py", "raised RuntimeError", "boom at import"],
    ),
    "model_file_bad_task": (
        lambda c: c.fit("--model.file", str(_model_file(c, "task.py", 'TASK = "poetry"\nSPEC = {}\ndef model(h, b, n): pass\n'))),
        ["TASK must be one of", "poetry"],
    ),
    # configuration
    "config_not_found": (lambda c: c.fit("--config", str(c.tmp / "none.toml")), ["config file", "none.toml not found"]),
    "fit_export_sites_match_nothing": (
        lambda c: c.fit("--export.sites", "layers.0."),  # caught before fitting, not after
        ["export sites ['layers.0.'] match no latent site", "site names look like"],
    ),
    "config_unknown_key": (
        lambda c: c.fit("--config", str(c.file("c.toml", "[train]\nepoch = 2\n"))),
        ["unknown key train.epoch"],
    ),
    "config_unknown_section": (
        lambda c: c.fit("--config", str(c.file("c.toml", "[trian]\nepochs = 2\n"))),
        ["unknown key 'trian'"],
    ),
    "config_wrong_type": (
        lambda c: c.fit("--config", str(c.file("c.toml", '[train]\nepochs = "two"\n'))),
        ["train.epochs must be int", "'two'"],
    ),
    "config_bool_for_int": (lambda c: c.fit("--config", str(c.file("c.toml", "seed = true\n"))), ["seed must be int"]),
    "config_invalid_toml": (lambda c: c.fit("--config", str(c.file("c.toml", "[train\nepochs = 2\n"))), ["not valid TOML"]),
    "config_not_utf8": (lambda c: c.fit("--config", str(c.file("c.toml", b'out = "caf\xe9"\n'))), ["not UTF-8"]),
    "guide_not_a_preset": (lambda c: c.fit("--model.guide", "bogus"), ["model.guide must be one of", "'bogus'"]),
    "schedule_not_a_choice": (lambda c: c.fit("--train.schedule", "steep"), ["train.schedule must be one of"]),
    "learning_rate_zero": (lambda c: c.fit("--train.lr", "0"), ["lr must be positive"]),
    # backbone
    "backbone_missing_offline": (
        lambda c: c.fit("--model.backbone", str(c.tmp / "missing_model")),
        ["missing_model", "HF_HUB_OFFLINE=1"],
    ),
    # --out
    "out_parent_is_a_file": (
        lambda c: c.fit(out=c.file("a_file", "mine") / "run"),
        ["cannot write the output folder", "a_file"],
    ),
    "out_is_a_file": (lambda c: c.fit(out=c.file("out", "mine")), ["exists and is not a folder"]),
    "out_is_a_user_folder": (
        lambda c: c.fit(out=c.file("out/thesis.tex", "mine").parent),
        ["not empty and is not a run folder", "choose another --out"],
    ),
    # --from
    "from_not_a_run": (lambda c: c.apply("predict", c.unlabelled(), run=c.tmp), ["is not a run folder", "run.json"]),
    "from_missing_folder": (lambda c: c.apply("evaluate", c.labelled(), run=c.tmp / "nope"), ["nope is not a run folder"]),
    "from_run_with_tampered_weights": (
        lambda c: c.apply(
            "predict", c.unlabelled(), run=c.run_copy(lambda r: _flip_bytes(r / "posterior/posterior.safetensors"))
        ),
        ["posterior.safetensors does not match the checksum"],
    ),
    "from_run_with_truncated_weights": (
        lambda c: c.apply("predict", c.unlabelled(), run=c.run_copy(lambda r: _truncate(r / "posterior/posterior.safetensors"))),
        ["posterior.safetensors does not match the checksum", "truncated"],
    ),
    "from_run_with_truncated_weights_and_their_checksum": (
        lambda c: c.apply("predict", c.unlabelled(), run=c.run_copy(_truncate_keeping_checksum)),
        ["posterior.safetensors is not a readable safetensors file"],
    ),
    "from_run_with_posterior_of_another_base_model": (
        lambda c: c.apply("predict", c.unlabelled(), run=_posterior_of_another_base_model(c)),
        ["fitted on another base model", "weights_sha256"],
    ),
    "from_run_with_edited_posterior_spec": (
        lambda c: c.apply("evaluate", c.labelled(), run=c.run_copy(_edit_posterior_spec)),
        ["posterior", "does not fit", "lora"],
    ),
    "from_run_with_unknown_key_in_its_config": (
        lambda c: c.apply(
            "predict", c.unlabelled(), run=c.run_copy(lambda r: _replace(r / "config.toml", "epochs =", "epoch ="))
        ),
        ["config.toml", "unknown key train.epoch"],
    ),
    "from_run_with_wrong_type_in_its_config": (
        lambda c: c.apply(
            "evaluate", c.labelled(), run=c.run_copy(lambda r: _replace(r / "config.toml", "samples = 3", 'samples = "3"'))
        ),
        ["config.toml", "predict.samples must be int", "'3'"],
    ),
    "from_run_with_truncated_posterior_json": (
        lambda c: c.apply("evaluate", c.labelled(), run=c.run_copy(lambda r: _truncate(r / "posterior/posterior.json"))),
        ["posterior.json is not valid JSON", "damaged"],
    ),
    "from_run_without_posterior": (
        lambda c: c.apply("predict", c.unlabelled(), run=c.run_copy(lambda r: shutil.rmtree(r / "posterior"))),
        ["no posterior", "posterior.json is missing"],
    ),
    "from_run_with_damaged_run_json": (
        lambda c: c.apply("predict", c.unlabelled(), run=c.run_copy(lambda r: _truncate(r / "run.json"))),
        ["run.json is damaged"],
    ),
    "from_run_on_another_backbone": (
        lambda c: c.apply("predict", c.unlabelled(), "--model.backbone", "minilm"),
        ["fitted on another base model"],
    ),
    # data of predict / evaluate / export
    "evaluate_unlabelled_data": (lambda c: c.apply("evaluate", c.unlabelled()), ["texts.tsv", "no label column"]),
    "export_unlabelled_data": (lambda c: c.apply("export", c.unlabelled()), ["texts.tsv", "no label column"]),
    "evaluate_unknown_label": (
        lambda c: c.apply("evaluate", c.tsv("odd.tsv", [("fine", "negative"), ("odd", "neutral")])),
        ["odd.tsv, line 3", "'neutral'"],
    ),
    "evaluate_label_out_of_range": (
        lambda c: c.apply("evaluate", c.tsv("range.tsv", [("fine", "1"), ("odd", "2")])),
        ["range.tsv, line 3", "label 2 is outside 0..1"],
    ),
    "predict_data_not_utf8": (
        lambda c: c.apply("predict", c.file("latin1.tsv", "sentence\nfine\ncaf\xe9\n".encode("latin-1"))),
        ["latin1.tsv, line 3", "not valid UTF-8"],
    ),
    "predict_out_parent_is_a_file": (
        lambda c: c.apply("predict", c.unlabelled(), "--out", str(c.file("a_file", "mine") / "predictions")),
        ["cannot write the output folder", "a_file"],
    ),
    "predict_missing_data": (lambda c: c.apply("predict", c.tmp / "none.tsv"), ["none.tsv", "no such file"]),
    "predict_empty_data": (lambda c: c.apply("predict", c.file("empty.csv", "\n\n")), ["empty.csv", "is empty"]),
    "export_sites_match_nothing": (
        lambda c: c.apply("export", c.labelled(), "--export.sites", "no_such_site"),
        ["match no latent site", "no_such_site"],
    ),
}


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _assert_one_line_error_writing_nothing(ctx: Ctx, argv: list[str], needles: list[str], capsys, code: int = 2) -> None:
    """``main(argv)`` exits with ``code`` and one stderr line ``bhpeft: error: ...`` holding every needle, without a
    traceback, and leaves ``ctx.tmp`` and the shared run byte for byte as they were."""
    before, run_before = _snapshot(ctx.tmp), _snapshot(ctx.run)
    capsys.readouterr()
    exit_code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert exit_code == code, err
    assert len(err.splitlines()) == 1 and err.startswith("bhpeft: error: "), err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert _snapshot(ctx.tmp) == before  # no --out folder, no .partial / .tmp sibling, user files untouched
    assert _snapshot(ctx.run) == run_before


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_one_line_error_and_writes_nothing(backbone, run, tmp_path, capsys, case):
    build, needles = CASES[case]
    ctx = Ctx(tmp_path / "work", backbone, run)
    ctx.tmp.mkdir()
    _assert_one_line_error_writing_nothing(ctx, build(ctx), needles, capsys)


@pytest.mark.skipif(ROOT, reason="root ignores file permissions (out_parent_is_a_file covers an unwritable --out)")
def test_out_under_a_read_only_folder(backbone, run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(Ctx(tmp_path, backbone, run).fit(out=locked / "run"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("bhpeft: error: cannot write the output folder") and len(err.splitlines()) == 1
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "argv_tail",
    [["--train.epochs", "two"], ["--predict.samples", "1.5"], ["--train.lr", "fast"], ["--model.guide"], ["--seed", "x"]],
    ids=["int", "int_from_float", "float", "missing_value", "seed"],
)
def test_bad_option_values_are_usage_errors(backbone, run, tmp_path, capsys, argv_tail):
    ctx = Ctx(tmp_path, backbone, run)
    with pytest.raises(SystemExit) as exit_info:
        main(ctx.fit(*argv_tail))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("bhpeft fit: error: argument") and "Traceback" not in err
    assert not ctx.out.exists()


# regressions: inputs that once escaped ``main`` as a traceback after the fit, or passed silently ---------------------------
def _bug(name: str, build: Callable[[Ctx], list[str]], needles: list[str], raises: type[BaseException], why: str):
    """One case; ``raises`` and ``why`` record how it used to fail."""
    return pytest.param(build, needles, id=name)


RANGE_AND_DAMAGE_CASES = [
    _bug(
        "target_error_out_of_range",
        lambda c: c.fit("--predict.target_error", "1.5"),
        ["target_error"],
        ValueError,
        "decisions.choose_threshold raises ValueError after the fit; config does not check the range",
    ),
    _bug(
        "confidence_out_of_range",
        lambda c: c.fit("--predict.target_error", "0.2", "--predict.confidence", "2"),
        ["confidence"],
        ValueError,
        "decisions.choose_threshold raises ValueError after the fit; config does not check the range",
    ),
    _bug(
        "coverage_out_of_range",
        lambda c: c.fit("--predict.coverage", "1.5"),
        ["coverage"],
        ValueError,
        "selective.accuracy_at_coverage raises ValueError after the fit; config does not check the range",
    ),
    _bug(
        "samples_zero",
        lambda c: c.fit("--predict.samples", "0"),
        ["samples"],
        ValueError,
        "predict raises ValueError (num_samples must be >= 1) after the fit",
    ),
    _bug(
        "predict_batch_size_zero",
        lambda c: c.fit("--predict.batch_size", "0"),
        ["batch_size"],
        ValueError,
        "torch DataLoader raises ValueError after the fit",
    ),
    _bug(
        "max_length_zero",
        lambda c: c.fit("--data.max_length", "0"),
        ["max_length"],
        AssertionError,
        "accepted silently: the tokenizer ignores max_length < 2, so nothing is truncated (exit 0, run written)",
    ),
    _bug(
        "backbone_folder_not_a_model",
        lambda c: c.fit("--model.backbone", str(c.file("empty_model/README", "nothing").parent)),
        ["cannot load the model", "empty_model"],
        AssertionError,
        "backbone.load_backbone puts the transformers message, which spans 5 lines, into the error: not one line",
    ),
    _bug(
        "from_run_with_damaged_metrics_json",
        lambda c: c.apply("predict", c.unlabelled(), run=c.run_copy(lambda r: _truncate(r / "metrics.json"))),
        ["metrics.json"],
        ValueError,
        "workflow.apply_run json.loads the stored metrics.json without catching JSONDecodeError",
    ),
    _bug(
        "from_run_with_incomplete_run_json",
        lambda c: c.apply("predict", c.unlabelled(), run=c.run_copy(lambda r: (r / "run.json").write_text("{}"))),
        ["run.json"],
        KeyError,
        "workflow.open_run reads record['model_file']['sha256'] without checking the keys",
    ),
]


@pytest.mark.parametrize("build, needles", RANGE_AND_DAMAGE_CASES)
def test_range_and_damage_errors_are_one_line(backbone, run, tmp_path, capsys, build, needles):
    """Out-of-range values and damaged run files end in one line, before any work is done."""
    ctx = Ctx(tmp_path / "work", backbone, run)
    ctx.tmp.mkdir()
    argv = build(ctx)
    before = _snapshot(ctx.tmp)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("bhpeft: error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err
    assert _snapshot(ctx.tmp) == before


# fixed bugs: inputs that used to end in a traceback, a silent exit or a silent success --------------------------------------
def _fixed_bug(
    name: str, build: Callable[[Ctx], list[str]], needles: list[str], why: str, raises: type[BaseException] | None = None
):
    """A case that once escaped as ``why`` describes (fixed; kept as a regression test)."""
    return pytest.param(build, needles, id=name)


FIXED_BUG_CASES = [
    _fixed_bug(
        "from_run_with_posterior_of_another_spec",
        lambda c: c.apply("predict", c.unlabelled(), run=_posterior_of_another_spec(c)),
        ["spec", "rank"],
        "workflow.open_run rebuilds the model from the spec saved with the posterior and never compares it with the "
        "run's model file: a posterior of LoRA rank 2 in a run of rank 8 predicts silently (exit 0)",
    ),
    _fixed_bug(
        "predict_config_wrong_type",
        lambda c: c.apply("predict", c.unlabelled(), "--config", str(c.file("c.toml", '[predict]\nsamples = "many"\n'))),
        ["predict.samples must be int", "'many'"],
        "cli._apply never reads --config (only fit does): predict / evaluate / export accept the option and ignore the "
        "file, so its errors pass silently (exit 0) and its settings are not applied",
    ),
    _fixed_bug(
        "evaluate_config_unknown_key",
        lambda c: c.apply("evaluate", c.labelled(), "--config", str(c.file("c.toml", "[predict]\nsample = 3\n"))),
        ["unknown key predict.sample"],
        "cli._apply never reads --config (only fit does): the file is ignored (exit 0)",
    ),
    _fixed_bug(
        "model_file_exits_on_import",
        lambda c: c.fit("--model.file", str(_model_file(c, "quits.py", "import sys\nsys.exit()\n"))),
        ["quits.py", "SystemExit"],
        "modelfile._import catches Exception only: SystemExit escapes main, so 'bhpeft fit' ends with exit code 0 and no message",
        SystemExit,
    ),
    _fixed_bug(
        "model_file_spec_target_modules_not_a_list",
        lambda c: c.fit(
            "--model.file", str(_sentiment_variant(c, "targets.py", '"target_modules": None', '"target_modules": 5'))
        ),
        ["targets.py", "target_modules"],
        "spec._targets calls tuple(5): TypeError escapes main as a traceback",
        TypeError,
    ),
    _fixed_bug(
        "model_file_spec_flag_not_a_bool",
        lambda c: c.fit(
            "--model.file", str(_sentiment_variant(c, "flag.py", '"reparameterize": True', '"reparameterize": "no"'))
        ),
        ["flag.py", "reparameterize"],
        "the specs never check their bool fields: 'no' is accepted and is truthy, so the fit runs with the "
        "reparameterised prefix (exit 0)",
    ),
]


@pytest.mark.parametrize("build, needles", FIXED_BUG_CASES)
def test_fixed_bug_is_a_one_line_error(backbone, run, tmp_path, capsys, build, needles):
    ctx = Ctx(tmp_path / "work", backbone, run)
    ctx.tmp.mkdir()
    _assert_one_line_error_writing_nothing(ctx, build(ctx), needles, capsys)


# pickle in a run folder ------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates the file ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("writer", ["pickle", "torch_save"])
def test_pickle_payload_in_a_run_is_refused_and_never_executed(backbone, run, tmp_path, capsys, command, writer):
    """posterior.safetensors replaced by a live pickle payload, its checksum updated so that the file is read."""
    ctx = Ctx(tmp_path / "work", backbone, run)
    ctx.tmp.mkdir()
    proof, marker = tmp_path / "proof", ctx.tmp / "pwned"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists(), "the payload is live: unpickling it creates its marker"

    def plant(copy: Path) -> None:
        weights = copy / "posterior" / "posterior.safetensors"
        if writer == "pickle":
            weights.write_bytes(pickle.dumps(_Payload(marker)))
        else:
            torch.save({"guide/0.locs.x": _Payload(marker)}, weights)
        _rewrite_checksum(copy)

    data = ctx.labelled() if command == "evaluate" else ctx.unlabelled()
    argv = ctx.apply(command, data, run=ctx.run_copy(plant))
    _assert_one_line_error_writing_nothing(ctx, argv, ["posterior.safetensors is not a readable safetensors file"], capsys)
    assert not marker.exists()


# a full disk -----------------------------------------------------------------------------------------------------------------
def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_written(path) -> None:
    """A write that stops half way, as on a full disk: some bytes land, then ENOSPC."""
    Path(path).write_bytes(b"\0" * 512)
    _no_space()


def _netcdf_fails(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(az.InferenceData, "to_netcdf", lambda self, path, *args, **kwargs: _half_written(path))


FULL_DISK_CASES = [
    # (where the write fails, the command)
    pytest.param(lambda mp: mp.setattr(os, "fsync", _no_space), lambda c: c.apply("predict", c.unlabelled()), id="predict_fsync"),
    pytest.param(_netcdf_fails, lambda c: c.apply("evaluate", c.labelled()), id="evaluate_netcdf"),
    pytest.param(
        _netcdf_fails,
        lambda c: c.apply("export", c.labelled()),
        id="export_netcdf",  # once left the new, empty OUT folder behind
    ),
]


@pytest.mark.parametrize("patch, build", FULL_DISK_CASES)
def test_full_disk_is_a_one_line_error_and_leaves_nothing(backbone, run, tmp_path, capsys, monkeypatch, patch, build):
    """A failing write (no space left on device) ends with exit code 1 and one line; the staged output is removed."""
    ctx = Ctx(tmp_path / "work", backbone, run)
    ctx.tmp.mkdir()
    argv = build(ctx)
    patch(monkeypatch)
    _assert_one_line_error_writing_nothing(ctx, argv, ["cannot read or write", "No space left on device"], capsys, code=1)


def test_full_disk_after_training_keeps_the_trained_state_for_resume(backbone, run, tmp_path, capsys, monkeypatch):
    """The posterior write fails after training: exit 1, one line naming the kept checkpoint; --resume then
    writes the run folder from it without refitting."""
    ctx = Ctx(tmp_path / "work", backbone, run)
    ctx.tmp.mkdir()
    argv = ctx.fit()
    out = Path(argv[argv.index("--out") + 1])
    with monkeypatch.context() as mp:
        mp.setattr("bhpeft_ppl.serialize.save_file", lambda tensors, path, *args, **kwargs: _half_written(path))
        assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err
    checkpoint = checkpoint_path(out)
    assert f"the trained state is kept in {checkpoint}" in err and "--resume" in err
    assert not out.exists() and load_checkpoint(checkpoint).meta["finished"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no stage or temporary file
    monkeypatch.setattr("bhpeft_ppl.infer.SVIStep.__call__", _no_step)  # resuming must not train again
    assert main([*argv, "--resume"]) == 0
    assert (out / "posterior" / "posterior.safetensors").is_file() and not checkpoint.exists()


def _no_step(*_args, **_kwargs):
    raise AssertionError("a finished checkpoint was trained again")


# bhpeft demo -----------------------------------------------------------------------------------------------------------------
def test_demo_writes_both_methods(tmp_path, capsys):
    """The real MiniLM on 32 + 24 fine-food reviews, one epoch: the demo folder layout of ``bhpeft_ppl.demo``."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--train-size", "32", "--test-size", "24", "--epochs", "1", "--samples", "2"]
    assert main([*argv, "--max-length", "32", "--quiet"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"bh_peft", "map_hybrid"}
    for method, scores in metrics["methods"].items():
        assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["ece"] <= 1, method
        assert scores["nll"] > 0 and 0 <= scores["brier"] <= 2, method
        assert scores["num_examples"] == 24 and scores["seconds"] > 0, method
        run = out / method
        for name in ("config.toml", "run.json", "metrics.json", "inference_data.nc", "predictions.csv"):
            assert (run / name).is_file(), f"{method}/{name}"
        assert (run / "posterior" / "posterior.safetensors").is_file() and (run / "posterior" / "posterior.json").is_file()
    assert metrics["methods"]["bh_peft"]["posterior_draws"] == 2 and metrics["methods"]["map_hybrid"]["posterior_draws"] == 1
    assert metrics["seed"] == 0 and metrics["train_size"] == 32 and "torch" in metrics["versions"]

    idata = az.from_netcdf(out / "inference_data.nc")
    assert "log_likelihood" in idata.groups() and idata.log_likelihood["obs"].shape == (1, 2, 24)
    assert (out / "inference_data.nc").read_bytes() == (out / "bh_peft" / "inference_data.nc").read_bytes()

    # the sampled reviews are kept, and the saved configs point at them (the runs can be repeated)
    assert len((out / "data" / "train.csv").read_text().strip().splitlines()) > 32  # header + 32 reviews (some multi-line)
    config = (out / "bh_peft" / "config.toml").read_text()
    assert f'train = "{out / "data" / "train.csv"}"' in config and f'out = "{out / "bh_peft"}"' in config
    assert 'guide = "map"' in (out / "map_hybrid" / "config.toml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:5] == ["method", "accuracy", "ECE", "NLL", "Brier"] and lines[0].endswith("acc@80%")
    assert [line.split()[0] for line in lines[1:3]] == ["bh_peft", "map_hybrid"]
    assert float(lines[1].split()[1]) == pytest.approx(metrics["methods"]["bh_peft"]["accuracy"], abs=1e-3)
    assert lines[-1] == f"wrote {out}"


def test_demo_run_json_names_the_kept_data(backbone, tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--model", str(backbone), "--train-size", "24", "--test-size", "12", "--epochs", "1"]
    assert main([*argv, "--samples", "2", "--max-length", "32", "--quiet"]) == 0
    record = json.loads((out / "bh_peft" / "run.json").read_text())
    for split in ("train", "test"):
        assert record["data"][split]["source"] == str(out / "data" / f"{split}.csv")


def test_demo_with_a_missing_model_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "missing"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("bhpeft: error:") and "missing" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_model_alias_selects_the_model_file():
    from bhpeft_ppl.cli import build_parser

    args = build_parser().parse_args(["fit", "--model", "models/news.py"])
    assert vars(args)["model.file"] == "models/news.py"
    demo = build_parser().parse_args(["demo", "--backbone", "/some/folder"])
    assert demo.model == "/some/folder"
