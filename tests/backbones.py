"""A tiny random-weight BERT saved as a local backbone folder, with the real MiniLM tokenizer.

The command-line tests pass this folder as ``--model.backbone`` so that a whole
``bhpeft fit`` runs in seconds; the tokenizer is the pip-bundled MiniLM's, so the
texts are tokenised as in real runs.  Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bhpeft_ppl.backbone import save_tiny_backbone
from bhpeft_ppl.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BHPEFT_DATA_DIR", REPO.parent / "shared" / "data"))
SST2_DEV = DATA / "sst2" / "dev.tsv"

_BUILT: dict[str, Path] = {}


def tiny_backbone(tmp_path_factory) -> Path:
    """The tiny backbone folder, built once per test session (shared by every test module)."""
    if "bert" not in _BUILT:
        _BUILT["bert"] = save_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))
    return _BUILT["bert"]


def fit_argv(backbone: Path, out: Path, *extra: str) -> list[str]:
    """``bhpeft fit`` on 120 SST-2 dev sentences (test: 60 of the carved ones), one epoch, 3 draws."""
    return [
        *("fit", "--model.backbone", str(backbone), "--data.train", str(SST2_DEV)),
        *("--data.train_size", "120", "--data.test_size", "60", "--train.epochs", "1", "--predict.samples", "3"),
        *("--out", str(out), "--quiet", *extra),
    ]


def fitted_run(tmp_path_factory) -> Path:
    """A run folder of :func:`fit_argv` on the tiny backbone, fitted once per test session; treat it as read-only."""
    if "run" not in _BUILT:
        out = tmp_path_factory.mktemp("fitted") / "run"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("HF_DATASETS_OFFLINE", "1")
            code = main(fit_argv(tiny_backbone(tmp_path_factory), out))
        assert code == 0, "the shared tiny fit failed"
        _BUILT["run"] = out
    return _BUILT["run"]


def sst2_rows(n: int, start: int = 0) -> list[tuple[str, str]]:
    """``n`` ``(sentence, label)`` rows of the SST-2 dev file, from data row ``start``."""
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines[start : start + n]]
