"""Training checkpoints: an interrupted fit resumes exactly where it stopped.

A checkpoint is one safetensors file, written atomically (temporary file,
fsync, rename: :func:`~bhpeft_ppl.files.atomic_write`), so a crash at any
instant leaves the previous checkpoint whole.  It holds

* tensors: the trained parameters (``param/<name>``: guide parameters and point
  estimates), the Adam moments (``optimizer/<index>/<key>``), the torch RNG
  state (``rng/torch``) and the state of the data-order generator at the start
  of the current epoch (``rng/loader``);
* JSON in the safetensors header (key ``bhpeft_ppl``): the step, the epoch and
  the batches of it already done, the loss history, the optimizer's and
  scheduler's plain state, the Python and NumPy RNG states, the
  :class:`~bhpeft_ppl.infer.FitConfig`, the parameter names and shapes, and a
  SHA-256 of the training data.

Resuming checks the config, the parameters and the data hash and names what
differs.  Reading a checkpoint never executes code (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .files import atomic_write

FORMAT = "bhpeft_ppl.checkpoint"
FORMAT_VERSION = 1
META_KEY = "bhpeft_ppl"
# FitConfig fields that may change between a run and its resumption
RESUMABLE_CHANGES = ("progress", "checkpoint_every")


@dataclass
class Progress:
    """Where a fit stands after a step.

    :param step: steps done.
    :param epoch: the current epoch.
    :param batch: batches of ``epoch`` already done.
    :param loader_state: the data-order generator's state at the start of ``epoch``.
    :param seconds: fitting time so far, over every session.
    :param finished: the fit ran to its end (or stopped early).
    """

    step: int
    epoch: int
    batch: int
    history: dict[str, list[float]]
    loader_state: torch.Tensor
    seconds: float = 0.0
    finished: bool = False
    stopped_early: bool = False


def data_fingerprint(data) -> str:
    """SHA-256 of every example of ``data`` (tensors as lists), to tell one training set from another."""
    digest = hashlib.sha256(str(len(data)).encode())
    for i in range(len(data)):
        digest.update(json.dumps(data[i], sort_keys=True, default=_plain).encode())
    return digest.hexdigest()


def _plain(value):
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


def rng_state() -> tuple[torch.Tensor, dict[str, Any]]:
    """The torch RNG state (a tensor) and the Python and NumPy states (plain data)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the legacy global RNG is the one to save)
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return torch.get_rng_state(), plain


def set_rng_state(torch_state: torch.Tensor, plain: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(torch_state)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002


def save_checkpoint(path: str | Path, update, progress: Progress, config: dict, data_hash: str) -> Path:
    """Write the state of ``update`` (an :class:`~bhpeft_ppl.infer.SVIStep`) and ``progress`` to ``path`` atomically."""
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in update.params.items()}
    optimizer = update.optimizer.state_dict()
    plain_state: dict[str, dict[str, Any]] = {}
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    tensors["rng/loader"] = progress.loader_state
    tensors["rng/torch"], plain_rng = rng_state()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": progress.step,
        "epoch": progress.epoch,
        "batch": progress.batch,
        "seconds": progress.seconds,
        "finished": progress.finished,
        "stopped_early": progress.stopped_early,
        "history": progress.history,
        "config": config,
        "data_sha256": data_hash,
        "params": {n: list(p.shape) for n, p in update.params.items()},
        "optimizer": {"state": plain_state, "param_groups": optimizer["param_groups"]},
        "scheduler": update.scheduler.state_dict(),
        "rng": plain_rng,
    }
    header = {META_KEY: json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its tensors and its JSON part."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return self.meta["step"]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    :raises CheckpointError: the file is missing, is not a safetensors file, or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} to resume from; run without resume to start afresh")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({err}); delete it to start afresh") from None
    try:
        meta = json.loads(header[META_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a bhpeft_ppl checkpoint (no readable {META_KEY!r} header: {err})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this library reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return Checkpoint(path, tensors, meta)


def check_compatible(checkpoint: Checkpoint, update, config: dict, data_hash: str) -> None:
    """Raise :class:`CheckpointError` naming every way ``checkpoint`` differs from this fit."""
    meta, problems = checkpoint.meta, []
    for key in sorted(set(meta["config"]) | set(config)):
        if key in RESUMABLE_CHANGES:
            continue
        saved, here = meta["config"].get(key, "<absent>"), config.get(key, "<absent>")
        if saved != here:
            problems.append(f"{key}: saved {saved!r}, here {here!r}")
    if meta["data_sha256"] != data_hash:
        problems.append("the training data differ")
    here_params = {n: list(p.shape) for n, p in update.params.items()}
    if meta["params"] != here_params:
        changed = sorted(set(meta["params"]) ^ set(here_params)) or [
            n for n in here_params if meta["params"].get(n) != here_params[n]
        ]
        problems.append(f"the trained parameters differ ({changed[:3]})")
    if problems:
        raise CheckpointError(
            f"the checkpoint {checkpoint.path} belongs to another run: {'; '.join(problems)}; "
            "resume with the same settings and data, or delete it to start afresh"
        )


def restore_checkpoint(checkpoint: Checkpoint, update) -> Progress:
    """Load ``checkpoint`` into ``update`` (parameters, optimizer, scheduler, step) and the RNGs."""
    meta, tensors = checkpoint.meta, checkpoint.tensors
    with torch.no_grad():
        for name, param in update.params.items():
            param.copy_(tensors[f"param/{name}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer"]["state"].items():
        state.setdefault(int(index), {}).update(values)
    update.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    update.scheduler.load_state_dict(meta["scheduler"])
    update.step = meta["step"]
    set_rng_state(tensors["rng/torch"], meta["rng"])
    return Progress(
        step=meta["step"],
        epoch=meta["epoch"],
        batch=meta["batch"],
        history=meta["history"],
        loader_state=tensors["rng/loader"],
        seconds=meta["seconds"],
        finished=meta["finished"],
        stopped_early=meta["stopped_early"],
    )
