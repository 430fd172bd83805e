"""Stochastic variational inference: the training loop.

Each step draws a minibatch of :math:`B` out of :math:`N` examples and takes a
gradient step on the negative ELBO estimate

.. math:: \\mathcal{L} = -\\tfrac{N}{B} \\sum_{n \\in \\text{batch}} \\mathbb{E}_q \\log p(y_n \\mid w)
   + \\beta\\, \\mathrm{KL}(q(w) \\,\\|\\, p(w)),

with the KL term in closed form wherever Pyro knows it (``TraceMeanField_ELBO``)
and by Monte Carlo elsewhere, using ``ClippedAdam`` (per-parameter gradient
clipping) and a learning-rate schedule.  One seed fixes the initial values,
the data order and every posterior draw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import Collator
from .errors import DivergenceError, SpecError
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
    :param estimator: ``mean_field`` (``TraceMeanField_ELBO``, analytic KL where known) or ``trace`` (``Trace_ELBO``).
    :param max_steps: stop after this many steps (``None``: all epochs).
    :param scale_lr_factor: learning rate of the guide's scale parameters (mean-field scales,
        low-rank diagonal and factor) relative to ``lr``.  Scales move by about ``lr`` in
        log-space per step, so from a small ``GuideSpec.init_scale`` they need many steps to
        reach a converged posterior width; a factor above 1 gets there in fewer steps.
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
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "num_particles"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"FitConfig.{name} must be a positive integer, got {value!r}")
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
    ``min_delta`` for ``patience`` consecutive checks (one check per ``window`` steps)."""

    def __init__(self, patience: int = 3, window: int = 50, min_delta: float = 0.0):
        self.patience, self.window, self.min_delta = patience, window, min_delta
        self.best = math.inf
        self.bad = 0

    def __call__(self, state: FitState) -> bool:
        if state.step % self.window:
            return False
        recent = state.history["loss"][-self.window :]
        value = sum(recent) / len(recent)
        if value < self.best - self.min_delta:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad >= self.patience


class _Recording:
    """Mixin that keeps the log-likelihood of each particle for the history."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
        loglik = sum(
            float(site["log_prob_sum"].detach())
            for site in model_trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]
        )
        self.records.append((loglik, float(loss)))
        return loss, surrogate


class RecordingTraceMeanFieldELBO(_Recording, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that records the log-likelihood part of each particle."""

    records: list


class RecordingTraceELBO(_Recording, Trace_ELBO):
    """``Trace_ELBO`` that records the log-likelihood part of each particle."""

    records: list


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


def _bad_sites(named: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in named.items() if t is not None and not torch.isfinite(t).all()]


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
        estimator = RecordingTraceMeanFieldELBO if config.estimator == "mean_field" else RecordingTraceELBO
        self.elbo = estimator(num_particles=config.num_particles, vectorize_particles=False)
        self.guide = model.scaled_guide(guide)
        self.step = 0

    def _diverged(self, what: str, epoch: int, bad: list[str], hint: str) -> DivergenceError:
        return DivergenceError(f"{what} at step {self.step} (epoch {epoch}); non-finite: {bad[:5] or 'no parameter yet'}; {hint}")

    def __call__(self, batch: dict, epoch: int = 0) -> dict[str, float]:
        """Update once on ``batch``; returns ``loss``, ``log_likelihood``, ``kl`` and ``lr`` of this step."""
        self.elbo.records = []
        hint = "lower FitConfig.lr or check the priors"
        try:
            loss = self.elbo.differentiable_loss(self.model, self.guide, batch, self.num_data)
        except ValueError as err:  # Pyro's argument checks reject NaN locations and logits
            bad = _bad_sites(self.params)
            if bad or "nan" in str(err).lower():
                raise self._diverged(f"non-finite values ({str(err).splitlines()[0]})", epoch, bad, hint) from None
            raise
        value = loss.item()
        if not math.isfinite(value):
            raise self._diverged(f"the loss is {value}", epoch, _bad_sites(self.params), hint)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bad = _bad_sites({n: p.grad for n, p in self.params.items()})
        if bad:
            raise self._diverged("non-finite gradient", epoch, bad, "lower FitConfig.lr or clip_norm")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        loglik = sum(r[0] for r in self.elbo.records) / len(self.elbo.records)
        return {"loss": value, "log_likelihood": loglik, "kl": (value + loglik) / self.model.kl_weight, "lr": lr}


def fit(
    model: BayesianHybridModel,
    data: Dataset,
    config: FitConfig | None = None,
    *,
    guide=None,
    collate_fn: Callable | None = None,
    callbacks: Sequence[Callable[[FitState], bool | None]] = (),
) -> FitResult:
    """Fit the guide of ``model`` to ``data`` by SVI.

    :param model: the :class:`~bhpeft_ppl.model.BayesianHybridModel`.
    :param data: a dataset of encoded examples (see :mod:`bhpeft_ppl.data`).
    :param config: :class:`FitConfig`.
    :param guide: continue from this guide; ``None`` builds one with ``model.make_guide()``.
    :param collate_fn: batch collation (default :class:`~bhpeft_ppl.data.Collator`).
    :param callbacks: called with a :class:`FitState` after every step; returning ``True`` stops.
    :raises DivergenceError: the loss or a gradient is NaN or infinite (names the step and sites).
    """
    config = config or FitConfig()
    num_data = len(data)
    if num_data == 0:
        raise SpecError("the training data is empty; give at least one labelled example")
    start = time.perf_counter()
    with local_params():
        pyro.set_rng_seed(config.seed)
        if guide is None:
            guide = model.make_guide()
        loader = DataLoader(
            data,
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate_fn or Collator(),
            generator=torch.Generator().manual_seed(config.seed),
        )
        total = len(loader) * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        update = SVIStep(model, guide, config, num_data, total)
        history: dict[str, list[float]] = {k: [] for k in ("step", "epoch", "loss", "log_likelihood", "kl", "lr")}
        stopped = False
        model.train()
        bar = tqdm(total=total, disable=not config.progress, desc="SVI", unit="step")
        try:
            for epoch in range(config.epochs):
                for batch in loader:
                    history["step"].append(update.step)
                    history["epoch"].append(epoch)
                    for key, value in update(batch, epoch).items():
                        history[key].append(value)
                    bar.update(1)
                    bar.set_postfix(loss=f"{history['loss'][-1]:.4g}")
                    stopped = any(bool(cb(FitState(update.step, epoch, history))) for cb in callbacks)
                    if stopped or update.step >= total:
                        break
                if stopped or update.step >= total:
                    break
        finally:
            bar.close()
            model.eval()
    return FitResult(guide, history, time.perf_counter() - start, config, stopped, num_data)
