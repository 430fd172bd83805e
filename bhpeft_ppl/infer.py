"""Stochastic variational inference: the training loop.

Each step draws a minibatch of :math:`B` out of :math:`N` examples and takes a
gradient step on the negative ELBO estimate

.. math:: \\mathcal{L} = -\\tfrac{N}{B} \\sum_{n \\in \\text{batch}} \\mathbb{E}_q \\log p(y_n \\mid w)
   + \\beta\\, \\mathrm{KL}(q(w) \\,\\|\\, p(w)),

with :class:`~bhpeft_ppl.elbo.MeanFieldELBO`: the KL of every site whose guide and
prior are both Normal (the mean-field guide's weights under Normal priors, or
under a previous round's mean-field posterior) in closed form, in one vectorised
sum, and the one-draw Monte Carlo estimate :math:`\\log q(w) - \\log p(w)` of the
others (``estimator="trace"``: Pyro's ``Trace_ELBO``, Monte Carlo everywhere).
``ClippedAdam`` (per-parameter gradient clipping) and a learning-rate schedule
take the step.  One seed fixes the initial values,
the data order and every posterior draw.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import Progress, check_compatible, data_fingerprint, load_checkpoint, restore_checkpoint, save_checkpoint
from .data import Collator
from .distributed import ShardSampler, any_rank, average_gradients, barrier, broadcast_parameters, world
from .elbo import MeanFieldELBO
from .errors import CheckpointError, DivergenceError, FitInterrupted, SpecError
from .guides import local_params
from .model import BayesianHybridModel

SCHEDULES = ("constant", "linear", "cosine")
ESTIMATORS = ("mean_field", "trace")


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit`.

    :param epochs: passes over the training data.
    :param batch_size: minibatch size :math:`B`.
    :param lr: peak learning rate of ``ClippedAdam``.
    :param schedule: ``constant``, ``linear`` (decay to 0) or ``cosine``, after a linear warm-up.
    :param warmup_ratio: fraction of steps spent warming up.
    :param clip_norm: per-parameter gradient-norm clip of ``ClippedAdam``.
    :param num_particles: Monte Carlo samples of the ELBO per step.
    :param estimator: ``mean_field`` (:class:`~bhpeft_ppl.elbo.MeanFieldELBO`: closed-form KL of the
        Normal sites, as ``TraceMeanField_ELBO``) or ``trace`` (``Trace_ELBO``: Monte Carlo KL).
    :param max_steps: stop after this many steps (``None``: all epochs).
    :param scale_lr_factor: learning rate of the guide's scale parameters (mean-field scales,
        low-rank diagonal and factor) relative to ``lr``.  Scales move by about ``lr`` in
        log-space per step, so from a small ``GuideSpec.init_scale`` they need many steps to
        reach a converged posterior width; a factor above 1 gets there in fewer steps.
    :param checkpoint_every: steps between checkpoints when :func:`fit` is given a checkpoint
        path (0: only at the end and on Ctrl-C).
    :param seed: fixes data order, initial values and noise.
    :param progress: show a progress bar.
    """

    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    schedule: str = "linear"
    warmup_ratio: float = 0.06
    clip_norm: float = 10.0
    num_particles: int = 1
    estimator: str = "mean_field"
    max_steps: int | None = None
    scale_lr_factor: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_particles"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"FitConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.checkpoint_every, int) or isinstance(self.checkpoint_every, bool) or self.checkpoint_every < 0:
            raise SpecError(f"FitConfig.checkpoint_every must be a non-negative integer, got {self.checkpoint_every!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise SpecError(f"FitConfig.max_steps must be a positive integer or None, got {self.max_steps!r}")
        if not isinstance(self.lr, int | float) or not self.lr > 0:
            raise SpecError(f"FitConfig.lr must be positive, got {self.lr!r}")
        if not isinstance(self.scale_lr_factor, int | float) or not self.scale_lr_factor > 0:
            raise SpecError(f"FitConfig.scale_lr_factor must be positive, got {self.scale_lr_factor!r}")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"FitConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.estimator not in ESTIMATORS:
            raise SpecError(f"FitConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not isinstance(self.clip_norm, int | float) or isinstance(self.clip_norm, bool) or not self.clip_norm > 0:
            raise SpecError(f"FitConfig.clip_norm must be a positive number, got {self.clip_norm!r}")
        if not isinstance(self.warmup_ratio, int | float) or not 0 <= self.warmup_ratio < 1:
            raise SpecError(f"FitConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)


@dataclass
class FitState:
    """What a callback sees after each step."""

    step: int
    epoch: int
    history: dict[str, list[float]]


@dataclass
class FitResult:
    """A fitted guide and its training history.

    ``history`` holds one entry per step: ``step``, ``epoch``, ``loss``
    (negative ELBO estimate), ``log_likelihood`` (scaled to the dataset),
    ``kl`` (KL estimate, before ``kl_weight``) and ``lr``.
    """

    guide: Any
    history: dict[str, list[float]]
    seconds: float
    config: FitConfig
    stopped_early: bool = False
    num_data: int = 0


class EarlyStopping:
    """Stop when the mean loss over ``window`` steps has not improved by
    ``min_delta`` for ``patience`` consecutive checks (one check per ``window`` steps).

    Its state is a function of the loss history, so after a resumed fit it
    replays the checks of the steps done before the checkpoint.
    """

    def __init__(self, patience: int = 3, window: int = 50, min_delta: float = 0.0):
        self.patience, self.window, self.min_delta = patience, window, min_delta
        self.best = math.inf
        self.bad = 0
        self.checked = 0  # steps already checked

    def _check(self, losses: list[float]) -> None:
        recent = losses[-self.window :]
        value = sum(recent) / len(recent)
        if value < self.best - self.min_delta:
            self.best, self.bad = value, 0
        else:
            self.bad += 1

    def __call__(self, state: FitState) -> bool:
        for step in range(self.checked + self.window - self.checked % self.window, state.step, self.window):
            self._check(state.history["loss"][:step])  # checks of steps before a resume
        self.checked = state.step
        if state.step % self.window:
            return False
        self._check(state.history["loss"][: state.step])
        return self.bad >= self.patience


class RecordingTraceELBO(Trace_ELBO):
    """``Trace_ELBO`` that records ``(log-likelihood, loss)`` of each particle, as
    :class:`~bhpeft_ppl.elbo.MeanFieldELBO` does."""

    records: list

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
        loglik = sum(
            float(site["log_prob_sum"].detach())
            for site in model_trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]
        )
        self.records.append((loglik, float(loss)))
        return loss, surrogate


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _site_of(parameter: str) -> str:
    """The sample site a trainable parameter belongs to: ``guide.0.locs.<site>_unconstrained`` and
    ``point.<site>`` name one; a joint low-rank guide's ``guide.1.loc`` covers several and stays as is."""
    parts = parameter.split(".")
    if parts[0] == "guide" and len(parts) > 3 and parts[2] in ("locs", "scales"):
        site = ".".join(parts[3:])
        return site.removesuffix("_unconstrained")
    if parts[0] == "point":
        return ".".join(parts[1:])
    return parameter


def _bad_sites(named: dict[str, torch.Tensor]) -> list[str]:
    """The sites (or joint guide parameters) among ``named`` holding a NaN or infinity, in order.

    One check over all tensors at once (hundreds of per-tensor checks cost more than the
    optimizer step on a small model); the per-tensor scan runs only when something is bad.
    """
    tensors = [t.detach().reshape(-1) for t in named.values() if t is not None]
    if not tensors or torch.isfinite(torch.cat(tensors)).all():
        return []
    bad = [_site_of(name) for name, t in named.items() if t is not None and not torch.isfinite(t).all()]
    return list(dict.fromkeys(bad))


def _is_scale(name: str) -> bool:
    """Whether a guide parameter sets a posterior width (``AutoNormal`` scales, low-rank ``scale``/``cov_factor``)."""
    return ".scales." in name or name.endswith((".scale_unconstrained", ".scale", ".cov_factor"))


def trainable_parameters(model: BayesianHybridModel, guide) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` that SVI updates: the guide's and the point estimates'."""
    params = {f"guide.{n}": p for n, p in guide.named_parameters()}
    params.update({f"point.{n}": p for n, p in model.point_values().items()})
    return params


class SVIStep:
    """One SVI update of ``model``'s guide: ELBO estimate, backward pass, divergence
    checks, a ``ClippedAdam`` step and the learning-rate schedule.

    Call it inside :func:`~bhpeft_ppl.guides.local_params`; :func:`fit` does.

    :param num_data: :math:`N`, the size the minibatch plate is scaled to.
    :param total_steps: length of the learning-rate schedule.
    """

    def __init__(self, model: BayesianHybridModel, guide, config: FitConfig, num_data: int, total_steps: int):
        self.model, self.config, self.num_data = model, config, num_data
        self.params = trainable_parameters(model, guide)
        scales = [p for n, p in self.params.items() if _is_scale(n)]
        others = [p for n, p in self.params.items() if not _is_scale(n)]
        groups = [{"params": others, "lr": config.lr}]
        if scales:
            groups.append({"params": scales, "lr": config.lr * config.scale_lr_factor})
        self.optimizer = ClippedAdam(groups, lr=config.lr, clip_norm=config.clip_norm)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(config.schedule, int(config.warmup_ratio * total_steps), total_steps)
        )
        if config.estimator == "mean_field":
            self.elbo = MeanFieldELBO(num_particles=config.num_particles)
        else:
            self.elbo = RecordingTraceELBO(num_particles=config.num_particles, vectorize_particles=False)
        self.guide = model.scaled_guide(guide)
        self.step = 0

    def _diverged(self, what: str, epoch: int, bad: list[str], hint: str) -> DivergenceError:
        return DivergenceError(f"{what} at step {self.step} (epoch {epoch}); non-finite sites: {bad[:5] or 'none yet'}; {hint}")

    def loss_and_grad(self, batch: dict, epoch: int = 0) -> dict[str, float]:
        """Estimate the loss on ``batch`` and set the gradients (averaged over the ranks of a
        process group, see :mod:`~bhpeft_ppl.distributed`); returns ``loss``, ``log_likelihood``,
        ``kl`` and ``lr`` of this step.

        :raises DivergenceError: the loss or a gradient is not finite (on any rank).
        """
        self.elbo.records = []
        hint = "lower FitConfig.lr or check the priors"
        distributed = world()[1] > 1
        failure = None
        try:
            loss = self.elbo.differentiable_loss(self.model, self.guide, batch, self.num_data)
        except ValueError as err:  # Pyro's argument checks reject NaN locations and logits
            bad = _bad_sites(self.params)
            if not (bad or "nan" in str(err).lower()):
                raise
            failure = self._diverged(f"non-finite values ({str(err).splitlines()[0]})", epoch, bad, hint)
        if any_rank(failure is not None):
            raise failure or self._diverged("non-finite values on another process", epoch, [], hint)
        value = loss.item()
        if not distributed and not math.isfinite(value):
            raise self._diverged(f"the loss is {value}", epoch, _bad_sites(self.params), hint)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loglik = sum(r[0] for r in self.elbo.records) / len(self.elbo.records)
        if distributed:
            value, loglik = average_gradients(self.params.values(), [value, loglik])
            if not math.isfinite(value):
                raise self._diverged(f"the loss averaged over processes is {value}", epoch, _bad_sites(self.params), hint)
        bad = _bad_sites({n: p.grad for n, p in self.params.items()})
        if bad:
            raise self._diverged("non-finite gradient", epoch, bad, "lower FitConfig.lr or clip_norm")
        lr = self.optimizer.param_groups[0]["lr"]
        return {"loss": value, "log_likelihood": loglik, "kl": (value + loglik) / self.model.kl_weight, "lr": lr}

    def apply(self) -> None:
        """Take the optimizer step with the gradients :meth:`loss_and_grad` set, and advance the schedule."""
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1

    def __call__(self, batch: dict, epoch: int = 0) -> dict[str, float]:
        """Update once on ``batch``; returns ``loss``, ``log_likelihood``, ``kl`` and ``lr`` of this step."""
        record = self.loss_and_grad(batch, epoch)
        self.apply()
        return record


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one step of one rank in a distributed fit (so a resumed run draws the same noise)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**32


class _CtrlC:
    """While active, the first Ctrl-C only raises a flag (the fit checkpoints and stops after
    the current step); a second one interrupts at once."""

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.pressed = False

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def fit(
    model: BayesianHybridModel,
    data: Dataset,
    config: FitConfig | None = None,
    *,
    guide=None,
    collate_fn: Callable | None = None,
    callbacks: Sequence[Callable[[FitState], bool | None]] = (),
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> FitResult:
    """Fit the guide of ``model`` to ``data`` by SVI.

    With ``checkpoint``, the whole training state (see :mod:`~bhpeft_ppl.checkpoint`) is
    written there every ``config.checkpoint_every`` steps and at the end, and a Ctrl-C
    writes it before stopping with :class:`~bhpeft_ppl.errors.FitInterrupted`.  With
    ``resume=True`` the fit continues from it; on CPU the result is bitwise the one an
    uninterrupted fit gives.

    Inside a ``torch.distributed`` process group, each rank trains on its shard of ``data``
    and the gradients are averaged (see :mod:`~bhpeft_ppl.distributed`).

    :param model: the :class:`~bhpeft_ppl.model.BayesianHybridModel`.
    :param data: a dataset of encoded examples (see :mod:`bhpeft_ppl.data`).
    :param config: :class:`FitConfig`.
    :param guide: continue from this guide; ``None`` builds one with ``model.make_guide()``.
    :param collate_fn: batch collation (default :class:`~bhpeft_ppl.data.Collator`).
    :param callbacks: called with a :class:`FitState` after every step; returning ``True`` stops.
    :param checkpoint: path of the checkpoint file (``None``: no checkpoints).
    :param resume: continue from ``checkpoint``; without it an existing checkpoint is an error,
        so that an interrupted run is never overwritten by accident.
    :raises DivergenceError: the loss or a gradient is NaN or infinite (names the step and sites;
        the last good checkpoint is kept).
    :raises CheckpointError: the checkpoint is missing, damaged or from another run.
    """
    config = config or FitConfig()
    num_data = len(data)
    if num_data == 0:
        raise SpecError("the training data is empty; give at least one labelled example")
    path = Path(checkpoint) if checkpoint is not None else None
    if resume and path is None:
        raise SpecError("resume=True needs the checkpoint path to resume from")
    if path is not None and not resume and path.exists():
        raise CheckpointError(f"a checkpoint of an earlier run exists at {path}; resume it, or delete it to start afresh")
    saved = load_checkpoint(path) if resume else None
    rank, size = world()
    start = time.perf_counter()
    with local_params():
        pyro.set_rng_seed(config.seed)
        if guide is None:
            guide = model.make_guide()
        order = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(
            data,
            batch_size=config.batch_size,
            collate_fn=collate_fn or Collator(),
            generator=order,
            **({"sampler": ShardSampler(num_data, rank, size, order)} if size > 1 else {"shuffle": True}),
        )
        total = len(loader) * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        update = SVIStep(model, guide, config, num_data, total)
        broadcast_parameters(update.params.values())
        settings = config.to_dict()
        data_hash = data_fingerprint(data) if path is not None else ""
        history: dict[str, list[float]] = {k: [] for k in ("step", "epoch", "loss", "log_likelihood", "kl", "lr")}
        progress = Progress(0, 0, 0, history, order.get_state())
        if saved is not None:
            check_compatible(saved, update, settings, data_hash)
            progress = restore_checkpoint(saved, update)
            history = progress.history
            order.set_state(progress.loader_state)
        if progress.finished:
            return FitResult(guide, history, progress.seconds, config, progress.stopped_early, num_data)
        earlier = progress.seconds
        last_saved = saved.step if saved is not None else None  # step of the checkpoint on disk

        def save(**flags) -> None:
            nonlocal last_saved
            progress.seconds = earlier + time.perf_counter() - start
            for key, value in flags.items():
                setattr(progress, key, value)
            if rank == 0:
                save_checkpoint(path, update, progress, settings, data_hash)
            barrier()
            last_saved = progress.step

        stopped = False
        model.train()
        bar = tqdm(total=total, initial=update.step, disable=not config.progress or rank != 0, desc="SVI", unit="step")
        try:
            with _CtrlC(path is not None) as ctrl_c:
                for epoch in range(progress.epoch, config.epochs):
                    progress.epoch, progress.loader_state = epoch, order.get_state()
                    batches = iter(loader)
                    skip, progress.batch = progress.batch, 0
                    for _ in range(skip):  # batches done before the checkpoint
                        next(batches)
                    for batch in batches:
                        history["step"].append(update.step)
                        history["epoch"].append(epoch)
                        if size > 1:
                            pyro.set_rng_seed(_step_seed(config.seed, rank, update.step))
                        try:
                            record = update(batch, epoch)
                        except DivergenceError as err:
                            if last_saved is None:
                                raise
                            raise DivergenceError(
                                f"{err}; the last good checkpoint (step {last_saved}) is kept at {path}"
                            ) from None
                        for key, value in record.items():
                            history[key].append(value)
                        progress.batch += 1
                        progress.step = update.step
                        bar.update(1)
                        bar.set_postfix(loss=f"{history['loss'][-1]:.4g}")
                        stopped = any_rank(any(bool(cb(FitState(update.step, epoch, history))) for cb in callbacks))
                        if stopped or update.step >= total:
                            break
                        if path is not None and any_rank(ctrl_c.pressed):
                            save()
                            raise FitInterrupted(
                                f"interrupted at step {update.step} of {total}; the checkpoint is saved at {path}; "
                                "resume to continue"
                            )
                        if path is not None and config.checkpoint_every and update.step % config.checkpoint_every == 0:
                            save()
                    if stopped or update.step >= total:
                        break
                    progress.batch = 0
                if path is not None:
                    save(finished=True, stopped_early=stopped)
        finally:
            bar.close()
            model.eval()
    return FitResult(guide, history, earlier + time.perf_counter() - start, config, stopped, num_data)
