"""Memory a fit needs, by calculation: base weights, guide, optimizer and activations.

The base model is built on PyTorch's ``meta`` device from its config alone (no
weights, nothing downloaded), the hybrid spec is injected into it, and the
sample sites are counted exactly.  Then, per rank, in bytes:

* base weights: :math:`P_\\text{base} \\cdot b_w` (``--base-dtype``, 2 for bf16);
* guide and optimizer, for :math:`P` latent weights in fp32 with :math:`k`
  variational parameters each (mean-field 2: location and scale; MAP 1;
  low-rank :math:`2 + r`): parameters, gradients and two Adam moments,
  :math:`4 k P \\cdot 4`, plus the sampled weights and their gradients,
  :math:`2 P \\cdot 4` per ELBO particle (none for MAP, whose draw is its parameter);
* activations kept for the backward pass through the frozen base (the LoRA,
  adapter and prefix gradients of the lowest layer need them all): per layer
  :math:`s b h (34 + 5 a s / h)` bytes in 16-bit precision (Korthikanti et al.,
  2022, "Reducing activation recomputation in large transformer models"),
  or with gradient checkpointing :math:`2 s b h` per layer plus one layer's full set.

    python analyses/memory_estimate.py --out runs/memory
    python analyses/memory_estimate.py --model llama-2-7b --batch-size 4 --tokens 512 --out runs/memory
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

from bhpeft_ppl import HybridSpec, inject
from bhpeft_ppl.files import atomic_write_json, atomic_write_text, library_versions

GIB = 2**30

MODELS = {
    # Llama-2-7B's published shape (config.json of meta-llama/Llama-2-7b-hf)
    "llama-2-7b": lambda: LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # all-MiniLM-L6-v2's shape, the model of the tests and the demo
    "minilm-l6": lambda: BertConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12, vocab_size=30522
    ),
}
PARAMS_PER_WEIGHT = {"mean_field": 2, "map": 1}


def count(config, spec: HybridSpec) -> dict[str, int]:
    """Base parameters, sample sites and latent weights per component of ``spec``.

    Models over a billion parameters are built on the ``meta`` device (shapes only); smaller
    ones for real, since injecting into an encoder runs a probe forward pass.
    """
    large = config.hidden_size * config.hidden_size * config.num_hidden_layers * 12 > 1e9
    with torch.device("meta" if large else "cpu"):
        base = (AutoModelForCausalLM if config.model_type == "llama" else AutoModel).from_config(config)
    peft = inject(base, spec)
    per_component: dict[str, int] = {}
    for site in peft.sites.values():
        per_component[site.component] = per_component.get(site.component, 0) + torch.Size(site.shape).numel()
    return {
        "base_parameters": sum(p.numel() for p in base.parameters()),
        "sites": len(peft.sites),
        "latent_weights": sum(per_component.values()),
        **{f"latent_{k}": v for k, v in sorted(per_component.items())},
    }


def estimate(config, counts: dict[str, int], args) -> dict[str, float]:
    """GiB per rank of each part (see the module docstring for the formulas)."""
    p, k = counts["latent_weights"], PARAMS_PER_WEIGHT[args.guide]
    s, b = args.tokens, args.batch_size
    h, a, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    per_layer = s * b * h * (34 + 5 * a * s / h)  # bytes, 16-bit activations
    activations = layers * per_layer if not args.checkpointing else layers * 2 * s * b * h + per_layer
    parts = {
        "base_weights": counts["base_parameters"] * args.base_dtype_bytes,
        "guide_params_grads_adam": 4 * k * p * 4,
        "sampled_weights_and_grads": 2 * p * 4 * args.particles if args.guide != "map" else 0,
        "activations": activations,
    }
    out = {f"{name}_gib": value / GIB for name, value in parts.items()}
    out["total_gib"] = sum(parts.values()) / GIB
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | guide | sites | latent weights | base | guide + Adam | draws | activations | total (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['guide']} | {r['sites']} | {r['latent_weights'] / 1e6:.1f} M "
            f"| {r['base_weights_gib']:.1f} | {r['guide_params_grads_adam_gib']:.2f} | {r['sampled_weights_and_grads_gib']:.2f} "
            f"| {r['activations_gib']:.1f} | {r['total_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="model shape(s) (default: all)")
    parser.add_argument("--preset", default="bh_peft", help="HybridSpec preset (default bh_peft)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step (default 16)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--particles", type=int, default=1, help="ELBO particles per step (default 1)")
    parser.add_argument("--base-dtype-bytes", type=int, default=2, help="bytes per base weight (2: bf16, default)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the base model")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    args = parser.parse_args()
    spec = getattr(HybridSpec, args.preset)()
    rows = []
    for name in args.model or sorted(MODELS):
        config = MODELS[name]()
        counts = count(config, spec)
        for guide in PARAMS_PER_WEIGHT:
            args.guide = guide
            rows.append({"model": name, "guide": guide, **counts, **estimate(config, counts, args)})
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "guide")}
    atomic_write_json(args.out / "results.json", {"config": settings, "versions": library_versions(), "rows": rows})
    atomic_write_text(args.out / "table.md", table(rows))
    print(table(rows), end="")


if __name__ == "__main__":
    main()
