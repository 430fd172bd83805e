"""Why weakly regularised BH-PEFT fits collapse: the training trace and the size of the weights.

The ablations of ``compare_methods.py`` show ``bhpeft_full`` ending near chance on
SST-2 with KL weight 0.01 (and with prior scales x 10), and learning with the same
settings at learning rate 0.002.  This script fits the same cell (SST-2, data seed
0, the comparison's split, budget and seed) under each setting of ``SETTINGS`` and
records, per setting:

* ``log_likelihood_by_tenth``: the minibatch log-likelihood (scaled to the 2,000
  training sentences) averaged over each tenth of the steps;
* ``mean_abs_loc``: the mean absolute posterior mean of each kind of weight
  (``lora_A``, ``lora_B``, ``adapter_down``, ``adapter_up``, ``prefix_key``,
  ``prefix_value``, ``prefix_gate``, ``head``);
* ``accuracy_at_mean``: test accuracy at the posterior mean (no draws), and with
  one kind of weight set to zero (``accuracy_without``), to see which weights
  hurt.

Writes ``OUT/results.json`` (with the configuration, seed and versions) and
``OUT/table.md``; resumable per setting.

    python analyses/collapse_diagnosis.py --out analyses/results/collapse_diagnosis
    python analyses/collapse_diagnosis.py --smoke --out runs/collapse-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods as cm

from bhpeft_ppl import GuideSpec, HybridSpec
from bhpeft_ppl.backbone import load_backbone
from bhpeft_ppl.files import atomic_write_json, atomic_write_text, library_versions, source_commit
from bhpeft_ppl.infer import fit
from bhpeft_ppl.predict import posterior_location

SETTINGS = {  # name: (KL weight, learning rate)
    "kl_weight_1_lr_0.01": (1.0, 0.01),
    "kl_weight_0.01_lr_0.01": (0.01, 0.01),
    "kl_weight_0.01_lr_0.002": (0.01, 0.002),
}
KINDS = ("lora_A", "lora_B", "adapter_down", "adapter_up", "prefix_key", "prefix_value", "prefix_gate", "head")
ZEROED = ("lora_B", "adapter_up", "prefix_gate")  # setting these to zero removes that component


def kind_of(model, site: str) -> str | None:
    """``lora_A``, ... by the weight's own name; ``head`` for the task head's weights."""
    last = site.rsplit(".", 1)[-1]
    if last in KINDS:
        return last
    declared = model.peft.sites.get(site)
    return "head" if declared is not None and declared.component == "head" else None


def accuracy(model, weights: dict, loader, labels: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        probs = torch.cat([model.predictive(batch, weights)[0] for batch in loader])  # [N, C]
    return float((probs.argmax(-1) == labels).float().mean())


def run_setting(cell: cm.Cell, kl_weight: float, lr: float) -> dict:
    args = argparse.Namespace(**{**vars(cell.args), "lr": lr})
    cell = dataclasses.replace(cell, args=args)
    model = cm.hybrid_model(cell, HybridSpec.bh_peft(cell.splits.head), GuideSpec(), cell.seed, kl_weight)
    result = fit(model, cell.splits.train, cell.fit_config(cell.seed), collate_fn=cell.collate)
    loglik = result.history["log_likelihood"]
    tenth = max(1, len(loglik) // 10)
    location = posterior_location(result.guide)
    sizes: dict[str, list[float]] = {}
    for name, value in location.items():
        kind = kind_of(model, name)
        if kind is not None:
            sizes.setdefault(kind, []).append(float(value.abs().mean()))
    loader = cell.loader(cell.splits.test)
    labels = torch.tensor(cell.splits.test.labels)
    without = {}
    for kind in ZEROED:
        zeroed = {n: torch.zeros_like(v) if n.endswith(kind) else v for n, v in location.items()}
        without[kind] = accuracy(model, zeroed, loader, labels)
    record = {
        "kl_weight": kl_weight,
        "lr": lr,
        "steps": len(loglik),
        "log_likelihood_by_tenth": [statistics.mean(loglik[i : i + tenth]) for i in range(0, len(loglik), tenth)],
        "mean_abs_loc": {kind: statistics.mean(values) for kind, values in sizes.items()},
        "accuracy_at_mean": accuracy(model, location, loader, labels),
        "accuracy_without": without,
        "seconds": result.seconds,
        "commit": source_commit(),
    }
    model.peft.eject()
    return record


def table(results: dict) -> str:
    settings = results["settings"]
    kinds = [k for k in KINDS if any(k in r["mean_abs_loc"] for r in settings.values())]
    lines = [
        "# Collapse diagnosis (bhpeft_full, SST-2, data seed 0)",
        "",
        "| setting | LL, first tenth | LL, last tenth | accuracy at the mean | "
        + " | ".join(f"without {k}" for k in ZEROED)
        + " | "
        + " | ".join(f"mean abs {k}" for k in kinds)
        + " |",
        "|---|" + "---|" * (3 + len(ZEROED) + len(kinds)),
    ]
    for name, r in settings.items():
        trace = r["log_likelihood_by_tenth"]
        cells = [f"{trace[0]:.0f}", f"{trace[-1]:.0f}", f"{r['accuracy_at_mean']:.3f}"]
        cells += [f"{r['accuracy_without'][k]:.3f}" for k in ZEROED]
        cells += [f"{r['mean_abs_loc'][k]:.4f}" if k in r["mean_abs_loc"] else "" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "LL: minibatch log-likelihood scaled to the training set (chance: -N ln 2). Every figure: results.json."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, a few dozen sentences (CI)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    cm_argv = ["--out", str(out), "--ablations"] + (["--smoke"] if args.smoke else [])
    settings_args = cm.parse_args(cm_argv)
    config = {"smoke": args.smoke, "settings": SETTINGS, "task": "sst2", "data_seed": 0, "comparison": vars(settings_args)}
    config = json.loads(json.dumps(config, default=str))
    path = out / "results.json"
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if results and results.get("config") != config:
        raise SystemExit(f"{path} holds another configuration; use another --out or remove it")
    results = {"config": config, "versions": library_versions(), "settings": results.get("settings", {})}
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            settings_args.backbone = str(cm.save_tiny_backbone(Path(scratch) / "tiny-bert"))
        base, tokenizer = load_backbone(settings_args.backbone or settings_args.model)
        splits = cm.load_splits("sst2", tokenizer, 0, settings_args)
        cell = cm.Cell("sst2", "bhpeft_full", 0, base, tokenizer, splits, settings_args)
        for name, (kl_weight, lr) in SETTINGS.items():
            if name in results["settings"]:
                print(f"{name}: done, skipped")
                continue
            record = run_setting(cell, kl_weight, lr)
            results["settings"][name] = record
            atomic_write_json(path, results)
            print(f"{name}: accuracy at the mean {record['accuracy_at_mean']:.3f}", flush=True)
    atomic_write_text(out / "table.md", table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
