"""Bayesian dynamic fine-tuning: rounds of data, the posterior of each round the prior of the next.

Round :math:`t` sees new data :math:`D_t` and fits :math:`q_t(w) \\approx p(w \\mid D_t)
\\propto p(D_t \\mid w)\\, q_{t-1}(w)` with :math:`q_0` the original prior, so that,
with exact inference, :math:`q_T(w) = p(w \\mid D_1, \\dots, D_T)` without revisiting old data.
Each round's guide starts from the previous posterior.

Options for continual learning (:class:`DynamicConfig`): variance ``inflation``
(forgetting for drifting data), a ``kl_weight`` per round, ``replay`` of a
fraction of earlier rounds' examples (the BH-PEFT paper replays 20 %; replayed
examples are counted twice, which exact updating would not do), and a cap on the
rounds kept for replay (``max_history``).  :meth:`DynamicFineTuning.save` writes
every round's posterior and ``rounds.json``, the chain of rounds and their sizes.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import EncodedDataset
from .errors import SpecError
from .files import atomic_write_json
from .guides import GuideSpec, local_params
from .infer import FitConfig, FitResult, fit
from .inject import HybridPEFT
from .model import BayesianHybridModel, ModelFunction
from .posterior_prior import posterior_as_prior
from .priors import Priors
from .serialize import save_posterior

ROUNDS_FILE = "rounds.json"


@dataclass(frozen=True)
class DynamicConfig:
    """Settings of the rounds.

    :param inflation: :math:`\\gamma \\ge 1` on every posterior variance before it becomes
        the next prior (1 = exact updating).
    :param kl_weight: :math:`\\beta` on each round's KL term against the previous posterior.
    :param replay: fraction of the earlier rounds' examples (those kept) mixed into each round.
    :param max_history: rounds of data kept for replay (``None``: all).
    :param map_scale: scale of the Normal prior around MAP estimates (see
        :func:`~bhpeft_ppl.posterior_prior.posterior_as_prior`).
    """

    inflation: float = 1.0
    kl_weight: float = 1.0
    replay: float = 0.0
    max_history: int | None = None
    map_scale: float | None = None

    def __post_init__(self):
        for name in ("inflation", "kl_weight", "replay", "max_history"):
            if isinstance(getattr(self, name), bool):
                raise SpecError(f"DynamicConfig.{name} must be a number, got {getattr(self, name)!r}")
        if not isinstance(self.inflation, int | float) or not self.inflation >= 1:
            raise SpecError(f"DynamicConfig.inflation must be >= 1 (1 = exact updating), got {self.inflation!r}")
        if not isinstance(self.kl_weight, int | float) or not self.kl_weight > 0:
            raise SpecError(f"DynamicConfig.kl_weight must be positive, got {self.kl_weight!r}")
        if not isinstance(self.replay, int | float) or not 0 <= self.replay <= 1:
            raise SpecError(f"DynamicConfig.replay must be a fraction in [0, 1], got {self.replay!r}")
        if self.max_history is not None and (not isinstance(self.max_history, int) or self.max_history < 1):
            raise SpecError(f"DynamicConfig.max_history must be a positive integer or None, got {self.max_history!r}")


@dataclass
class Round:
    """What one round did."""

    index: int
    new_examples: int
    replayed: int
    seconds: float
    history: dict[str, list[float]]
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("history")
        out["steps"] = len(self.history.get("loss", []))
        out["final_loss"] = self.history["loss"][-1] if self.history.get("loss") else None
        return out


def merge(datasets: list[EncodedDataset]) -> EncodedDataset:
    """One dataset holding the examples of ``datasets`` in order (indices renumbered)."""
    encodings = [e for d in datasets for e in d.encodings]
    if any(d.labels is None for d in datasets):
        raise SpecError("every round's data needs labels")
    return EncodedDataset(encodings, [y for d in datasets for y in d.labels])


def subset(data: EncodedDataset, indices: list[int]) -> EncodedDataset:
    """The examples ``indices`` of ``data``."""
    return EncodedDataset([data.encodings[i] for i in indices], [data.labels[i] for i in indices])


class DynamicFineTuning:
    """Fit rounds of data, each round's posterior the next round's prior.

    :param peft: the injected base model (shared by every round).
    :param priors: the prior of the first round.
    :param guide_spec: the guide families (the same in every round).
    :param model_fn: the Pyro model function (a model file's ``model``).
    :param fit_config: SVI settings of each round (its seed is offset by the round number).
    :param config: :class:`DynamicConfig`.
    :param seed: seed of initial values and replay draws.
    """

    def __init__(
        self,
        peft: HybridPEFT,
        *,
        priors: Priors | None = None,
        guide_spec: GuideSpec | None = None,
        model_fn: ModelFunction | None = None,
        fit_config: FitConfig | None = None,
        config: DynamicConfig | None = None,
        seed: int = 0,
    ):
        self.peft = peft
        self.first_priors = priors
        self.guide_spec = guide_spec or GuideSpec()
        self.model_fn = model_fn
        self.fit_config = fit_config or FitConfig()
        self.config = config or DynamicConfig()
        self.seed = int(seed)
        self.model: BayesianHybridModel | None = None
        self.guide = None
        self.rounds: list[Round] = []
        self.kept: list[EncodedDataset] = []
        self.start_round = 0  # rounds fitted before this driver (resume)

    @classmethod
    def resume(cls, model: BayesianHybridModel, guide, *, rounds_done: int = 1, **kwargs) -> DynamicFineTuning:
        """Continue from a fitted ``model`` and ``guide`` (e.g. :func:`~bhpeft_ppl.serialize.load_posterior`)
        after ``rounds_done`` rounds (the numbering of rounds, seeds included, continues from there)."""
        driver = cls(model.peft, guide_spec=model.guide_spec, model_fn=model.model_fn, seed=model.seed, **kwargs)
        driver.model, driver.guide = model, guide
        if isinstance(rounds_done, bool) or not isinstance(rounds_done, int) or rounds_done < 1:
            raise SpecError(f"rounds_done must be a positive integer (the rounds already fitted), got {rounds_done!r}")
        driver.start_round = rounds_done
        return driver

    def next_model(self) -> tuple[BayesianHybridModel, Any]:
        """The model of the next round (prior = current posterior) and its guide, started at the current posterior."""
        c = self.config
        if self.model is None:
            model = BayesianHybridModel(self.peft, self.first_priors, self.guide_spec, c.kl_weight, self.seed, self.model_fn)
            return model, None
        priors = posterior_as_prior(self.model, self.guide, inflation=c.inflation, map_scale=c.map_scale)
        model = BayesianHybridModel(self.peft, priors, self.guide_spec, c.kl_weight, self.seed, self.model_fn)
        with torch.no_grad():
            for name, value in self.model.point_values().items():
                model.point_values()[name].copy_(value)
        guide = model.make_guide()
        with local_params():
            guide.load_state_dict(self.guide.state_dict())
        return model, guide

    def replay_sample(self, index: int) -> EncodedDataset | None:
        """Seeded sample of ``replay`` × (kept earlier examples)."""
        if not self.kept or self.config.replay == 0:
            return None
        pool = merge(self.kept)
        count = round(self.config.replay * len(pool))
        if count == 0:
            return None
        chosen = sorted(random.Random(self.seed * 1_000_003 + index).sample(range(len(pool)), count))
        return subset(pool, chosen)

    def update(self, data: EncodedDataset, *, collate_fn: Callable | None = None, label: str = "") -> FitResult:
        """Fit one round on ``data`` (plus replay); returns that round's :class:`~bhpeft_ppl.infer.FitResult`."""
        if len(data) == 0:
            raise SpecError("a round needs at least one example")
        index = self.start_round + len(self.rounds)
        start = time.perf_counter()
        model, guide = self.next_model()
        replayed = self.replay_sample(index)
        train = merge([data, replayed]) if replayed is not None else data
        config = dataclasses.replace(self.fit_config, seed=self.fit_config.seed + index)
        result = fit(model, train, config, guide=guide, collate_fn=collate_fn)
        self.model, self.guide = model, result.guide
        self.kept.append(data)
        if self.config.max_history is not None:
            self.kept = self.kept[-self.config.max_history :]
        self.rounds.append(
            Round(index, len(data), 0 if replayed is None else len(replayed), time.perf_counter() - start, result.history, label)
        )
        return result

    def save(self, directory: str | Path) -> Path:
        """Write the current round's posterior to ``directory/round_<t>/`` and the chain to ``rounds.json``."""
        if self.model is None:
            raise SpecError("nothing to save: no round has been fitted")
        directory = Path(directory)
        t = self.start_round + len(self.rounds) - 1
        save_posterior(directory / f"round_{t}", self.model, self.guide, history=self.rounds[-1].history)
        rounds = [r.to_dict() for r in self.rounds]
        previous = directory / ROUNDS_FILE
        if self.start_round and previous.is_file():  # keep the record of the rounds before a resume
            earlier = json.loads(previous.read_text(encoding="utf-8")).get("rounds", [])
            rounds = [r for r in earlier if r.get("index", -1) < self.start_round] + rounds
        record = {"config": dataclasses.asdict(self.config), "rounds": rounds, "seed": self.seed}
        atomic_write_json(directory / ROUNDS_FILE, record)
        return directory
