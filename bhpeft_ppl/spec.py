"""Frozen, validated specs of the hybrid PEFT modules, with JSON round trip.

A :class:`HybridSpec` combines any subset of

* :class:`LoRASpec`: :math:`h = W x + \\tfrac{\\alpha}{r} B A\\,\\mathrm{drop}(x)` on linear layers,
* :class:`AdapterSpec`: a bottleneck :math:`\\Delta = U\\,\\phi(D z + b_D) + b_U` on the
  feed-forward output, sequential (:math:`z` = FFN output) or parallel
  (:math:`z` = FFN input),
* :class:`PrefixSpec`: learned key/value prefixes prepended in every
  self-attention layer,

and a :class:`HeadSpec` for the new task head.  Presets follow the literature:
:meth:`HybridSpec.bh_peft` (the paper: all three), :meth:`HybridSpec.mam`
(prefix + parallel adapter), :meth:`HybridSpec.unipelt` (all three, gated).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import SpecError

NON_LINEARITIES = ("relu", "gelu", "tanh", "silu")
PLACEMENTS = ("sequential", "parallel")
POOLINGS = ("auto", "cls", "mean", "last")
TASKS = ("classification", "multiple_choice")
SCORINGS = ("auto", "per_choice", "answer_letters")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_flags(spec: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(spec, name), bool):
            raise SpecError(f"{type(spec).__name__}.{name} must be true or false, got {getattr(spec, name)!r}")


def _targets(value: Any, owner: str, name: str = "target_modules") -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) and v for v in value):
        raise SpecError(f"{owner}.{name} must be None or a non-empty list of non-empty strings, got {value!r}")
    return tuple(value)


class _Spec:
    """Shared JSON round trip for the frozen spec dataclasses."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, accepted by :meth:`from_dict`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Spec):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build a spec from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise SpecError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=repr)
        if unknown:
            raise SpecError(f"unknown {cls.__name__} field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class LoRASpec(_Spec):
    """Low-rank adaptation of linear layers (Hu et al., 2021).

    :param rank: rank :math:`r` of :math:`BA`.
    :param alpha: scaling numerator; the update is scaled by :math:`\\alpha / r`.
    :param dropout: dropout on the LoRA input during training.
    :param target_modules: module names, ``.``-suffixes or regexes (as in ``peft``);
        ``None`` picks the attention query and value projections of known model types.
    :param gate: UniPELT gate :math:`\\sigma(w^\\top x + b)` on the update.
    """

    kind: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    gate: bool = False

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _targets(self.target_modules, "LoRASpec"))
        if not _is_int(self.rank) or self.rank < 1:
            raise SpecError(f"LoRASpec.rank must be a positive integer, got {self.rank!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise SpecError(f"LoRASpec.alpha must be positive, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"LoRASpec.dropout must be in [0, 1), got {self.dropout!r}")
        _check_flags(self, "gate")

    @property
    def scaling(self) -> float:
        """:math:`\\alpha / r`."""
        return float(self.alpha) / self.rank


@dataclass(frozen=True)
class AdapterSpec(_Spec):
    """Bottleneck adapter on the feed-forward output (Houlsby et al., 2019; He et al., 2022).

    :param bottleneck: bottleneck width :math:`m`; give this or ``reduction_factor``.
    :param reduction_factor: :math:`m = d / \\text{factor}` (default 16 when no width is given).
    :param non_linearity: one of ``relu``, ``gelu``, ``tanh``, ``silu``.
    :param placement: ``sequential`` adapts the FFN output, ``parallel`` adds an
        adapter of the FFN input to the FFN output.
    :param scaling: factor :math:`s` on the adapter output (He et al. use 4 for parallel).
    :param target_modules: modules whose output receives the adapter term;
        ``None`` picks the FFN output of known model types.
    :param input_modules: for ``parallel``, modules whose input is the FFN input,
        paired in order with ``target_modules``; ``None`` picks known defaults.
    :param gate: UniPELT gate :math:`\\sigma(w^\\top z + b)` on the adapter term.
    """

    kind: ClassVar[str] = "adapter"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    placement: str = "sequential"
    scaling: float = 1.0
    target_modules: tuple[str, ...] | None = None
    input_modules: tuple[str, ...] | None = None
    gate: bool = False

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _targets(self.target_modules, "AdapterSpec"))
        object.__setattr__(self, "input_modules", _targets(self.input_modules, "AdapterSpec", "input_modules"))
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise SpecError("AdapterSpec: give either bottleneck or reduction_factor, not both")
        if self.bottleneck is not None and (not _is_int(self.bottleneck) or self.bottleneck < 1):
            raise SpecError(f"AdapterSpec.bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.reduction_factor is not None and (not _is_number(self.reduction_factor) or self.reduction_factor <= 0):
            raise SpecError(f"AdapterSpec.reduction_factor must be positive, got {self.reduction_factor!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise SpecError(f"AdapterSpec.non_linearity must be one of {NON_LINEARITIES}, got {self.non_linearity!r}")
        if self.placement not in PLACEMENTS:
            raise SpecError(f"AdapterSpec.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.input_modules is not None and self.placement != "parallel":
            raise SpecError("AdapterSpec.input_modules only applies to placement='parallel'; remove it or set placement")
        if not _is_number(self.scaling):
            raise SpecError(f"AdapterSpec.scaling must be a finite number, got {self.scaling!r}")
        _check_flags(self, "gate")

    def width(self, hidden_size: int) -> int:
        """Bottleneck width for a layer of width ``hidden_size``."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, int(hidden_size // (self.reduction_factor or 16)))


@dataclass(frozen=True)
class PrefixSpec(_Spec):
    """Prefix-tuning (Li & Liang, 2021): ``num_virtual_tokens`` learned keys and
    values prepended in every self-attention layer.

    :param num_virtual_tokens: prefix length :math:`P`.
    :param reparameterize: produce all prefixes from an embedding
        :math:`E \\in \\mathbb{R}^{P \\times e}` through an MLP
        :math:`W_2 \\tanh(W_1 E)` (as in the paper) instead of learning them directly.
    :param embedding_dim: :math:`e`, width of the reparameterisation embedding.
    :param hidden_dim: hidden width of the reparameterisation MLP.
    :param gate: zero-initialised per-head gate :math:`g` mixing the attention
        output with and without prefix, :math:`o = o_{\\text{base}} + g\\,(o_{\\text{prefix}} - o_{\\text{base}})`,
        so that the untrained model equals the base model; ``False`` gives the
        original prefix-tuning (:math:`g = 1`).
    :param target_modules: self-attention modules to prefix; ``None`` means all.
    """

    kind: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 10
    reparameterize: bool = False
    embedding_dim: int = 64
    hidden_dim: int = 128
    gate: bool = True
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _targets(self.target_modules, "PrefixSpec"))
        for name in ("num_virtual_tokens", "embedding_dim", "hidden_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise SpecError(f"PrefixSpec.{name} must be a positive integer, got {value!r}")
        _check_flags(self, "reparameterize", "gate")


@dataclass(frozen=True)
class HeadSpec(_Spec):
    """The new task head: a linear layer on a pooled hidden state.

    :param num_labels: classes for ``classification``; choices for ``multiple_choice``.
    :param task: ``classification`` (one logit per class) or ``multiple_choice``
        (one score per choice, softmax over choices).
    :param pooling: ``cls`` (first token), ``mean`` (over unmasked tokens),
        ``last`` (last unmasked token), or ``auto``: ``mean`` for encoders,
        ``last`` for decoders.
    :param scoring: how ``multiple_choice`` is scored: ``per_choice`` (each
        (question, choice) pair encoded apart, a linear score of its pooled
        state), ``answer_letters`` (one prompt listing the lettered choices; the
        score of choice :math:`k` is the next-token logit of its letter, from the
        decoder's own language-model head, so there are no head weights), or
        ``auto``: ``answer_letters`` for decoders loaded with their LM head,
        ``per_choice`` otherwise.
    """

    kind: ClassVar[str] = "head"
    num_labels: int = 2
    task: str = "classification"
    pooling: str = "auto"
    scoring: str = "auto"

    def __post_init__(self):
        if not _is_int(self.num_labels) or self.num_labels < 2:
            raise SpecError(f"HeadSpec.num_labels must be an integer >= 2, got {self.num_labels!r}")
        if self.task not in TASKS:
            raise SpecError(f"HeadSpec.task must be one of {TASKS}, got {self.task!r}")
        if self.pooling not in POOLINGS:
            raise SpecError(f"HeadSpec.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.scoring not in SCORINGS:
            raise SpecError(f"HeadSpec.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.task == "classification" and self.scoring != "auto":
            raise SpecError(f"HeadSpec.scoring={self.scoring!r} applies to task='multiple_choice' only; leave it 'auto'")

    @property
    def outputs(self) -> int:
        """Width of the head's output: classes, or one score per choice."""
        return self.num_labels if self.task == "classification" else 1


_COMPONENTS = {"lora": LoRASpec, "adapter": AdapterSpec, "prefix": PrefixSpec}


@dataclass(frozen=True)
class HybridSpec(_Spec):
    """Any subset of LoRA, adapter and prefix, plus the task head."""

    kind: ClassVar[str] = "hybrid"
    lora: LoRASpec | None = None
    adapter: AdapterSpec | None = None
    prefix: PrefixSpec | None = None
    head: HeadSpec = field(default_factory=HeadSpec)

    def __post_init__(self):
        for name, cls in (*_COMPONENTS.items(), ("head", HeadSpec)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls.from_dict(value))
            elif value is not None and not isinstance(value, cls):
                raise SpecError(f"HybridSpec.{name} must be a {cls.__name__} or None, got {type(value).__name__}")
        if self.head is None:
            raise SpecError("HybridSpec.head must be a HeadSpec")
        if not self.components:
            raise SpecError("HybridSpec needs at least one of lora, adapter, prefix")

    @property
    def components(self) -> tuple[str, ...]:
        """Names of the PEFT components present, in injection order."""
        return tuple(name for name in _COMPONENTS if getattr(self, name) is not None)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridSpec:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "kind"}
        return super().from_dict(data)

    def to_json(self) -> str:
        """JSON text, accepted by :meth:`from_json`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HybridSpec:
        """Spec from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"hybrid spec is not valid JSON ({err}); write it with HybridSpec.to_json()") from None
        return cls.from_dict(data)

    # Presets -----------------------------------------------------------------
    @classmethod
    def bh_peft(cls, head: HeadSpec | None = None) -> HybridSpec:
        """The paper's full hybrid: LoRA (query, value) + sequential adapter + prefix."""
        return cls(LoRASpec(), AdapterSpec(), PrefixSpec(), head or HeadSpec())

    @classmethod
    def mam(cls, head: HeadSpec | None = None) -> HybridSpec:
        """Mix-and-match (He et al., 2022): prefix + parallel adapter (scaling 4)."""
        return cls(
            None,
            AdapterSpec(placement="parallel", scaling=4.0),
            PrefixSpec(num_virtual_tokens=30),
            head or HeadSpec(),
        )

    @classmethod
    def unipelt(cls, head: HeadSpec | None = None) -> HybridSpec:
        """UniPELT-like (Mao et al., 2022): LoRA, adapter and prefix, each gated."""
        return cls(LoRASpec(gate=True), AdapterSpec(gate=True), PrefixSpec(gate=True), head or HeadSpec())

    @classmethod
    def paper_released(cls, head: HeadSpec | None = None) -> HybridSpec:
        """The authors' released variant: ungated prefix + parallel adapter, no LoRA."""
        return cls(None, AdapterSpec(placement="parallel"), PrefixSpec(gate=False), head or HeadSpec())

    @classmethod
    def lora_only(cls, head: HeadSpec | None = None) -> HybridSpec:
        """LoRA alone."""
        return cls(LoRASpec(), None, None, head or HeadSpec())

    @classmethod
    def adapter_only(cls, head: HeadSpec | None = None) -> HybridSpec:
        """Sequential bottleneck adapter alone."""
        return cls(None, AdapterSpec(), None, head or HeadSpec())

    @classmethod
    def prefix_only(cls, head: HeadSpec | None = None) -> HybridSpec:
        """Prefix-tuning alone."""
        return cls(None, None, PrefixSpec(), head or HeadSpec())

    @classmethod
    def preset(cls, name: str, head: HeadSpec | None = None) -> HybridSpec:
        """Preset by name (see :data:`PRESETS`)."""
        if name not in PRESETS:
            raise SpecError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return getattr(cls, PRESETS[name])(head)


PRESETS = {
    "bh_peft": "bh_peft",
    "mam": "mam",
    "unipelt": "unipelt",
    "paper_released": "paper_released",
    "lora": "lora_only",
    "adapter": "adapter_only",
    "prefix": "prefix_only",
}
