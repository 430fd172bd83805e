"""Variational families per component, composed into one ``AutoGuideList``.

===============  ==============================================  ===============================
family           guide                                           meaning
===============  ==============================================  ===============================
``mean_field``   :class:`MeanFieldNormal` (an ``AutoNormal``)     :math:`q(w) = \\prod_i \\mathcal{N}(w_i; \\mu_i, \\sigma_i^2)`
``low_rank``     ``AutoLowRankMultivariateNormal``               :math:`\\mathcal{N}(\\mu, FF^\\top + D)` jointly over its sites
``map``          ``AutoDelta``                                   :math:`\\delta(w - \\hat w)`: MAP under the prior
``point``        none: the model uses ``pyro.param``             maximum likelihood, no prior
===============  ==============================================  ===============================

:class:`MeanFieldNormal` samples a real-valued site as the Normal itself (Pyro's
``AutoNormal`` samples an auxiliary Normal and a ``Delta`` at its value), so that
the ELBO can take the KL of such a site from its Normal prior in closed form
(:mod:`~bhpeft_ppl.elbo`); its parameters are ``AutoNormal``'s, under the same names.

Locations start at :meth:`WeightSite.initial_value` (LoRA B and adapter
up-projections at zero, so the untrained model equals the base model) and
scales at ``init_scale``.  Hyper-parameter sites of a prior (horseshoe
:math:`\\tau, \\lambda`) take the family of their weight and start at the prior median.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoLowRankMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median
from torch.distributions import biject_to, transform_to

from .errors import SpecError
from .naming import resolve

FAMILIES = ("mean_field", "low_rank", "map", "point")
COMPONENTS = ("lora", "adapter", "prefix", "head")


def _check_family(where: str, family: Any) -> None:
    if family not in FAMILIES:
        raise SpecError(f"{where}: unknown guide family {family!r}; choose one of {FAMILIES}")


@dataclass(frozen=True)
class GuideSpec:
    """Which variational family each site gets.

    Resolution: the first of ``patterns`` matching the site name, then
    ``components``, then ``default``.

    :param default: family of sites not otherwise named.
    :param components: ``{component: family}``.
    :param patterns: ``{site-name pattern: family}``.
    :param init_scale: initial standard deviation of ``mean_field`` and ``low_rank`` guides.
    :param rank: rank of the ``low_rank`` covariance factor.
    """

    default: str = "mean_field"
    components: Mapping[str, str] = field(default_factory=dict)
    patterns: Mapping[str, str] = field(default_factory=dict)
    init_scale: float = 0.01
    rank: int = 8

    def __post_init__(self):
        object.__setattr__(self, "components", dict(self.components))
        object.__setattr__(self, "patterns", dict(self.patterns))
        _check_family("GuideSpec.default", self.default)
        for key, family in self.components.items():
            if key not in COMPONENTS:
                raise SpecError(f"GuideSpec.components: unknown component {key!r}; use {COMPONENTS}")
            _check_family(f"GuideSpec.components[{key!r}]", family)
        for key, family in self.patterns.items():
            _check_family(f"GuideSpec.patterns[{key!r}]", family)
        if not isinstance(self.init_scale, int | float) or not self.init_scale > 0:
            raise SpecError(f"GuideSpec.init_scale must be positive, got {self.init_scale!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise SpecError(f"GuideSpec.rank must be a positive integer, got {self.rank!r}")

    def family(self, name: str, component: str) -> str:
        """Family of the site ``name`` of ``component``."""
        return resolve(name, component, self.patterns, self.components, self.default)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, accepted by :meth:`from_dict`."""
        return {
            "default": self.default,
            "components": dict(self.components),
            "patterns": dict(self.patterns),
            "init_scale": self.init_scale,
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuideSpec:
        """Spec from :meth:`to_dict` output."""
        if not isinstance(data, Mapping):
            raise SpecError(f"GuideSpec expects a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"default", "components", "patterns", "init_scale", "rank"})
        if unknown:
            raise SpecError(f"unknown GuideSpec field(s) {unknown}")
        return cls(**data)

    # Presets -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> GuideSpec:
        """A named preset: ``mean_field`` (the default), ``low_rank``, ``map``, ``blob`` or ``paper_released``."""
        presets = {
            "mean_field": cls,
            "low_rank": lambda: cls(default="low_rank"),
            "map": cls.map,
            "blob": cls.blob,
            "paper_released": cls.paper_released,
        }
        if name not in presets:
            raise SpecError(f"unknown guide preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    @classmethod
    def map(cls) -> GuideSpec:
        """Every site MAP: the point-estimate twin of a Bayesian fit."""
        return cls(default="map")

    @classmethod
    def blob(cls) -> GuideSpec:
        """BLoB-style Bayesian LoRA: a distribution on LoRA A only, the rest point estimates."""
        return cls(default="point", patterns={"lora_A": "mean_field"})

    @classmethod
    def paper_released(cls) -> GuideSpec:
        """The authors' released variant: Bayesian adapter down-projections only."""
        return cls(default="point", patterns={"adapter_down": "mean_field", "adapter_down_bias": "mean_field"})


def is_real(support) -> bool:
    """Whether ``support`` is the real line (or a product of real lines)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class MeanFieldNormal(AutoNormal):
    """``AutoNormal`` that samples each real-valued site as its Normal,
    :math:`w \\sim \\mathcal{N}(\\mu, \\sigma^2)`, instead of a ``Delta`` at the draw of an
    auxiliary Normal (sites with a constrained support, e.g. a horseshoe scale, keep
    ``AutoNormal``'s auxiliary form).  The draws, parameters and their names are
    ``AutoNormal``'s; what changes is that the guide site's distribution is the
    Normal, so its KL from a Normal prior has a closed form, and one sample statement
    per site is saved.
    """

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self._direct = {name: is_real(site["fn"].support) for name, site in self.prototype_trace.iter_stochastic_nodes()}
        # a site in a plate needs pyro.param's effect (a subsampled plate indexes its parameters)
        self._global = {name: not site["cond_indep_stack"] for name, site in self.prototype_trace.iter_stochastic_nodes()}
        self._readers: dict[str, tuple] = {}

    def _get_loc_and_scale(self, name):
        """The site's location and scale.

        Under :func:`local_params`, for a site outside any plate (every weight site),
        they are read straight from the parameters (their modules and constraint
        transforms looked up once per site), without the ``pyro.param`` statement and
        the module-tree walk of a ``PyroModule`` attribute access; nothing in this
        library reads guide parameters from a trace.
        """
        if not pyro.settings.get("module_local_params") or not self._global[name]:
            return super()._get_loc_and_scale(name)
        entry = self._readers.get(name)
        if entry is None or entry[0] is not self.locs:
            *path, leaf = name.split(".")
            readers = []
            for owner in (self.locs, self.scales):
                for part in path:
                    owner = getattr(owner, part)
                constraint, _ = owner._pyro_params[leaf]
                readers.append((owner._parameters, transform_to(constraint)))
            entry = self._readers[name] = (self.locs, readers, f"{leaf}_unconstrained")
        _, ((locs, to_loc), (scales, to_scale)), key = entry
        return to_loc(locs[key]), to_scale(scales[key])

    def forward(self, *args, **kwargs):
        """Draw every site; returns ``{site name: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                loc, scale = self._get_loc_and_scale(name)
                normal = dist.Normal(loc, scale, validate_args=False).to_event(self._event_dims[name])  # scale > 0
                if self._direct[name]:
                    result[name] = pyro.sample(name, normal)
                    continue
                # a constrained site: w = T(z), z ~ N(loc, scale), with log|det dT^-1/dw| as the Delta's density
                transform = biject_to(site["fn"].support)
                z = pyro.sample(f"{name}_unconstrained", normal, infer={"is_auxiliary": True})
                value = transform(z)
                log_density = transform.inv.log_abs_det_jacobian(value, z)
                log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + site["fn"].event_dim)
                result[name] = pyro.sample(name, dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim))
        return result


def build_guide(
    prior_model: Callable,
    latent_sites: Mapping[str, str],
    spec: GuideSpec,
    init_loc_fn: Callable,
) -> AutoGuideList:
    """Compose one autoguide per family over ``prior_model`` (which samples the weights).

    :param latent_sites: ``{site name: family}`` of every latent site, hyper-sites included.
    :param init_loc_fn: initial location of a site (a Pyro ``init_loc_fn``).
    """
    guide = AutoGuideList(prior_model)
    by_family: dict[str, list[str]] = {}
    for name, family in latent_sites.items():
        by_family.setdefault(family, []).append(name)

    def init(site):
        value = init_loc_fn(site)
        return init_to_median(site) if value is None else value

    for family in ("mean_field", "low_rank", "map"):
        names = by_family.get(family)
        if not names:
            continue
        blocked = poutine.block(prior_model, expose=names)
        if family == "mean_field":
            guide.append(MeanFieldNormal(blocked, init_loc_fn=init, init_scale=spec.init_scale))
        elif family == "low_rank":
            guide.append(AutoLowRankMultivariateNormal(blocked, init_loc_fn=init, init_scale=spec.init_scale, rank=spec.rank))
        else:
            guide.append(AutoDelta(blocked, init_loc_fn=init))
    return guide


def local_params():
    """Context in which guide parameters live in their modules, not Pyro's global
    param store, so that several fitted models coexist in one process.

    Every function of this library that runs a guide enters it; enter it too when
    calling a guide yourself.
    """
    return pyro.settings.context(module_local_params=True)
