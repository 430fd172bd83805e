"""Priors over PEFT weights: families, a per-component / per-pattern map, defaults.

A prior is a small frozen object that samples one weight site inside the Pyro
model (so that hierarchical priors can add hyper-parameter sites):

* :class:`Normal`: :math:`w \\sim \\mathcal{N}(\\mu, \\sigma^2)` elementwise,
* :class:`Laplace`: :math:`w \\sim \\mathrm{Laplace}(\\mu, b)`,
* :class:`StudentT`: :math:`w \\sim t_\\nu(\\mu, \\sigma)`,
* :class:`Horseshoe`: :math:`\\tau \\sim \\mathcal{C}^+(0, \\tau_0)`,
  :math:`\\lambda_j \\sim \\mathcal{C}^+(0, 1)`,
  :math:`w_{j\\cdot} \\sim \\mathcal{N}(0, \\tau^2 \\lambda_j^2)` with one local
  scale per slice ``j`` along ``group_dim`` (e.g. per rank-one component of LoRA),
  :math:`\\tau` and :math:`\\lambda` being sites too.

``scale="fan_in"`` means :math:`1/\\sqrt{d_{in}}` with :math:`d_{in}` the last
dimension of the weight.

Default priors (:data:`DEFAULT_COMPONENT_PRIORS`, :data:`DEFAULT_PATTERN_PRIORS`):

=================  =======================  ======================================================
sites              prior                    why
=================  =======================  ======================================================
LoRA A, B          Normal(0, 0.1)           the paper's released prior and BLoB's scale
adapter weights    Normal(0, 0.1)           same as LoRA: small updates of a pretrained block
prefix keys/values Normal(0, 1)             key/value activations of pretrained models are O(1)
gates              Normal(0, 1)             covers "off" (0) and "fully on" (1) equally
head weight        Normal(0, 0.5)           pooled features of MiniLM have norm ~5: a priori logits ~2.5
head bias          Normal(0, 1)             a priori class log-odds of order 1
=================  =======================  ======================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch

from .errors import SpecError
from .naming import hyper_site_name, matches
from .sites import WeightSite


def _scale(scale: float | str, site: WeightSite) -> float:
    if scale == "fan_in":
        return 1.0 / math.sqrt(site.shape[-1])
    return float(scale)


def _check_scale(owner: str, scale: Any) -> None:
    if scale == "fan_in":
        return
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0 or math.isinf(scale):
        raise SpecError(f"{owner}.scale must be a positive number or 'fan_in', got {scale!r}")


class Prior:
    """Base class: a prior that samples one weight site in the model."""

    family: ClassVar[str]

    def distribution(self, site: WeightSite) -> dist.Distribution:
        """The (conditional) distribution of the whole weight, event shape = ``site.shape``.

        A function of the prior and the site only: a model builds it once per site when
        :meth:`sample` is this class's and there are no hyper-parameter sites."""
        raise NotImplementedError

    def sample(self, site: WeightSite) -> torch.Tensor:
        """Sample ``site`` (and any hyper-parameter sites) with ``pyro.sample``."""
        return pyro.sample(site.name, self.distribution(site))

    def hyper_sites(self, site: WeightSite) -> list[str]:
        """Names of the hyper-parameter sites this prior adds for ``site``."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, accepted by :func:`prior_from_dict`."""
        return {"family": self.family, **dataclasses.asdict(self)}


def _elementwise(base: dist.Distribution, site: WeightSite) -> dist.Distribution:
    return base.expand(site.shape).to_event(len(site.shape))


@dataclass(frozen=True)
class Normal(Prior):
    """:math:`w \\sim \\mathcal{N}(\\mathrm{loc}, \\mathrm{scale}^2)` elementwise."""

    family: ClassVar[str] = "normal"
    scale: float | str = 0.1
    loc: float = 0.0

    def __post_init__(self):
        _check_scale("Normal", self.scale)

    def distribution(self, site):
        return _elementwise(dist.Normal(self.loc, _scale(self.scale, site)), site)


@dataclass(frozen=True)
class Laplace(Prior):
    """:math:`w \\sim \\mathrm{Laplace}(\\mathrm{loc}, \\mathrm{scale})` elementwise (an L1 penalty under MAP)."""

    family: ClassVar[str] = "laplace"
    scale: float | str = 0.1
    loc: float = 0.0

    def __post_init__(self):
        _check_scale("Laplace", self.scale)

    def distribution(self, site):
        return _elementwise(dist.Laplace(self.loc, _scale(self.scale, site)), site)


@dataclass(frozen=True)
class StudentT(Prior):
    """:math:`w \\sim t_{\\mathrm{df}}(\\mathrm{loc}, \\mathrm{scale})` elementwise (heavy tails)."""

    family: ClassVar[str] = "student_t"
    df: float = 3.0
    scale: float | str = 0.1
    loc: float = 0.0

    def __post_init__(self):
        _check_scale("StudentT", self.scale)
        if not isinstance(self.df, int | float) or not self.df > 0:
            raise SpecError(f"StudentT.df must be positive, got {self.df!r}")

    def distribution(self, site):
        return _elementwise(dist.StudentT(self.df, self.loc, _scale(self.scale, site)), site)


@dataclass(frozen=True)
class Horseshoe(Prior):
    """Horseshoe shrinkage with one local scale per slice along ``group_dim``.

    Sites: ``<site>.horseshoe_tau`` (scalar) and ``<site>.horseshoe_lambda``
    (``[site.shape[group_dim]]``), then the weight itself given both.
    """

    family: ClassVar[str] = "horseshoe"
    global_scale: float = 0.1
    group_dim: int = 0

    def __post_init__(self):
        _check_scale("Horseshoe", self.global_scale)

    def _dim(self, site: WeightSite) -> int:
        if not site.shape:
            raise SpecError(f"Horseshoe prior needs a weight with at least one dimension, {site.name} is scalar")
        if not -len(site.shape) <= self.group_dim < len(site.shape):
            raise SpecError(f"Horseshoe.group_dim={self.group_dim} is out of range for {site.name} of shape {list(site.shape)}")
        return self.group_dim % len(site.shape)

    def hyper_sites(self, site):
        return [hyper_site_name(site.name, "horseshoe_tau"), hyper_site_name(site.name, "horseshoe_lambda")]

    def sample(self, site):
        dim = self._dim(site)
        tau_name, lambda_name = self.hyper_sites(site)
        tau = pyro.sample(tau_name, dist.HalfCauchy(torch.tensor(float(self.global_scale))))
        lam = pyro.sample(lambda_name, dist.HalfCauchy(torch.ones(site.shape[dim])).to_event(1))  # [G]
        shape = [1] * len(site.shape)
        shape[dim] = site.shape[dim]
        scale = (tau * lam).reshape(shape).expand(site.shape)  # weight shape
        return pyro.sample(site.name, dist.Normal(torch.zeros(site.shape), scale).to_event(len(site.shape)))

    def distribution(self, site):
        raise SpecError("Horseshoe has no closed-form marginal; it is sampled hierarchically by Horseshoe.sample")


PRIOR_FAMILIES: dict[str, type[Prior]] = {c.family: c for c in (Normal, Laplace, StudentT, Horseshoe)}


def prior_from_dict(data: Mapping[str, Any]) -> Prior:
    """Prior from :meth:`Prior.to_dict` output, e.g. ``{"family": "normal", "scale": 0.1}``."""
    if isinstance(data, Prior):
        return data
    if not isinstance(data, Mapping) or "family" not in data:
        raise SpecError(f"a prior must be a mapping with a 'family' key, got {data!r}")
    family = data["family"]
    if family not in PRIOR_FAMILIES:
        raise SpecError(f"unknown prior family {family!r}; choose one of {sorted(PRIOR_FAMILIES)}")
    cls = PRIOR_FAMILIES[family]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields - {"family"})
    if unknown:
        raise SpecError(f"unknown field(s) {unknown} for prior family {family!r}; valid: {sorted(fields)}")
    return cls(**{k: v for k, v in data.items() if k != "family"})


DEFAULT_COMPONENT_PRIORS: dict[str, Prior] = {
    "lora": Normal(0.1),
    "adapter": Normal(0.1),
    "prefix": Normal(1.0),
    "head": Normal(0.5),
}
DEFAULT_PATTERN_PRIORS: dict[str, Prior] = {
    "gate_weight": Normal("fan_in"),
    "gate_bias": Normal(1.0),
    "prefix_gate": Normal(1.0),
    "classifier.bias": Normal(1.0),
}

PriorFunction = Callable[[WeightSite], "Prior | None"]


@dataclass(frozen=True)
class Priors:
    """Which prior each site gets.

    Resolution for a site: ``sites[site.name]`` if present (the previous round's
    posterior, see :mod:`bhpeft_ppl.posterior_prior`); else the first of ``patterns``
    that matches its name (exact, ``.``-suffix or regex); else
    ``components[site.component]``; else ``function(site)`` if given and not
    ``None``; else the library defaults.

    :param components: ``{"lora" | "adapter" | "prefix" | "head": Prior}``.
    :param patterns: ``{site-name pattern: Prior}``, e.g. ``{"lora_A": Horseshoe()}``.
    :param function: a callable ``WeightSite -> Prior | None`` (e.g. from a model file).
    :param sites: ``{exact site name: Prior}``, set by
        :func:`~bhpeft_ppl.posterior_prior.posterior_as_prior`.
    """

    components: Mapping[str, Prior] = field(default_factory=dict)
    patterns: Mapping[str, Prior] = field(default_factory=dict)
    function: PriorFunction | None = None
    sites: Mapping[str, Prior] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "components", {k: prior_from_dict(v) for k, v in dict(self.components).items()})
        object.__setattr__(self, "patterns", {k: prior_from_dict(v) for k, v in dict(self.patterns).items()})
        unknown = sorted(set(self.components) - set(DEFAULT_COMPONENT_PRIORS))
        if unknown:
            raise SpecError(f"unknown component(s) {unknown} in priors; use {sorted(DEFAULT_COMPONENT_PRIORS)}")

    def for_site(self, site: WeightSite) -> Prior:
        """The prior of ``site``."""
        if site.name in self.sites:
            return self.sites[site.name]
        for pattern, prior in self.patterns.items():
            if matches(site.name, pattern):
                return prior
        if site.component in self.components:
            return self.components[site.component]
        if self.function is not None:
            prior = self.function(site)
            if prior is not None:
                if not isinstance(prior, Prior):
                    raise SpecError(
                        f"prior function returned {type(prior).__name__} for {site.name}; return a "
                        "bhpeft_ppl.priors.Prior (Normal, Laplace, StudentT, Horseshoe) or None"
                    )
                return prior
        for pattern, prior in DEFAULT_PATTERN_PRIORS.items():
            if matches(site.name, pattern):
                return prior
        return DEFAULT_COMPONENT_PRIORS[site.component]

    def to_dict(self) -> dict[str, Any]:
        """Plain data; a prior function is recorded by name only and must be passed again on load."""
        out: dict[str, Any] = {
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "patterns": {k: v.to_dict() for k, v in self.patterns.items()},
        }
        if self.function is not None:
            out["function"] = getattr(self.function, "__qualname__", repr(self.function))
        if self.sites:
            from .posterior_prior import site_priors_to_dict

            out.update(site_priors_to_dict(self.sites))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of the per-site (posterior) priors, to be saved beside :meth:`to_dict`."""
        if not self.sites:
            return {}
        from .posterior_prior import site_prior_tensors

        return site_prior_tensors(self.sites)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], function: PriorFunction | None = None, tensors: Mapping[str, torch.Tensor] | None = None
    ) -> Priors:
        """Priors from :meth:`to_dict` output (pass ``function`` again if one was used, and
        the :meth:`tensors` if the priors hold a previous posterior)."""
        if not isinstance(data, Mapping):
            raise SpecError(f"priors must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"components", "patterns", "function", "sites", "groups"})
        if unknown:
            raise SpecError(f"unknown key(s) {unknown} in priors; valid: components, patterns, function, sites, groups")
        if data.get("function") and function is None:
            raise SpecError(f"these priors used the function {data['function']!r}; pass it again as function=...")
        sites = {}
        if data.get("sites"):
            if tensors is None:
                raise SpecError("these priors hold a previous round's posterior; pass its tensors (load with load_posterior)")
            from .posterior_prior import site_priors_from_dict

            sites = site_priors_from_dict(data, tensors)
        return cls(data.get("components", {}), data.get("patterns", {}), function, sites)


def as_priors(priors: Priors | Mapping[str, Any] | PriorFunction | None) -> Priors:
    """Accept a :class:`Priors`, its dict form, a bare function, or ``None`` (defaults)."""
    if priors is None:
        return Priors()
    if isinstance(priors, Priors):
        return priors
    if callable(priors):
        return Priors(function=priors)
    return Priors.from_dict(priors)
