"""The posterior of one round as the prior of the next (Bayesian dynamic fine-tuning).

Given a fitted guide :math:`q_t(w)`, :func:`posterior_as_prior` builds the prior
:math:`p_{t+1}(w) = q_t(w)` site by site, under the same site names:

* mean-field Normal sites (``AutoNormal``): independent Normals with the guide's
  location and scale (in the unconstrained space of the site, mapped to its
  support by the same bijection Pyro's guide uses, e.g. ``exp`` for a horseshoe scale);
* low-rank multivariate Normal sites (``AutoLowRankMultivariateNormal``): the same
  joint distribution :math:`\\mathcal{N}(\\mu, D + FF^\\top)` over all its sites.  It is
  sampled site by site as a chain of exact conditionals,

  .. math::

     w_i \\mid w_{<i} \\sim \\mathcal{N}\\big(\\mu_i + F_i (I + A)^{-1} b,\\;
        D_i + F_i (I + A)^{-1} F_i^\\top\\big), \\quad
     A = F_{<i}^\\top D_{<i}^{-1} F_{<i},\\;
     b = F_{<i}^\\top D_{<i}^{-1} (w_{<i} - \\mu_{<i}),

  (Woodbury), so every site keeps its own name and the product of the
  conditionals is exactly the joint;
* MAP sites (``AutoDelta``): a Normal centred at the estimate, with scale
  ``map_scale`` (default: the scale of the site's previous prior when it has one,
  else 0.1).  This is a documented choice, not a posterior: a point estimate
  carries no uncertainty to pass on;
* ``point`` sites (``pyro.param``) have no prior; their values carry over as initial values.

``inflation`` :math:`\\gamma \\ge 1` multiplies every variance (a forgetting
factor for drifting data): :math:`\\gamma = 1` is exact Bayesian updating,
larger values forget faster.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal

from .errors import SpecError
from .guides import local_params
from .priors import Prior, Priors
from .sites import WeightSite

SUPPORTS = {"real": torch.distributions.constraints.real, "positive": torch.distributions.constraints.positive}


def _support_name(support) -> str:
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    constraints = torch.distributions.constraints
    if type(support) is type(constraints.real):
        return "real"
    # positive (LogNormal) and nonnegative (HalfCauchy, Gamma, Exponential): biject_to is exp for both;
    # exact types, so that greater_than(c != 0) and Pyro's softplus_positive are not taken for them
    if type(support) in (constraints._GreaterThan, constraints._GreaterThanEq) and float(support.lower_bound) == 0.0:
        return "positive"
    raise SpecError(f"posterior_as_prior supports real and positive sites, not {support}")


@dataclass(eq=False)
class NormalPart:
    """One site: :math:`T(z)` with :math:`z \\sim \\mathcal{N}(\\mathrm{loc}, \\mathrm{scale}^2)`
    elementwise and :math:`T` the bijection onto ``support``."""

    loc: torch.Tensor
    scale: torch.Tensor
    support: str = "real"

    def distribution(self) -> dist.Distribution:
        """The distribution (built on first use; ``loc`` and ``scale`` are fixed)."""
        built = self.__dict__.get("_built")
        if built is None:
            with torch.inference_mode(False):  # the cache outlives this call, which may be in predict's inference mode
                built = dist.Normal(self.loc, self.scale).to_event(self.loc.dim())
                if self.support != "real":
                    built = dist.TransformedDistribution(built, [torch.distributions.transforms.ExpTransform()])
            self.__dict__["_built"] = built
        return built


@dataclass(eq=False)
class LowRankGroup:
    """A joint :math:`\\mathcal{N}(\\mu, D + FF^\\top)` over the unconstrained values of ``names`` (in order)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    supports: list[str]
    loc: torch.Tensor  # [D]
    cov_factor: torch.Tensor  # [D, r]
    cov_diag: torch.Tensor  # [D]

    def __post_init__(self):
        self.offsets = [0]
        for shape in self.shapes:
            self.offsets.append(self.offsets[-1] + math.prod(shape))
        self._reset()

    def _reset(self) -> None:
        r = self.cov_factor.shape[1]
        self._a = torch.zeros(r, r, dtype=self.loc.dtype)  # F_<i^T D_<i^-1 F_<i
        self._b = torch.zeros(r, dtype=self.loc.dtype)  # F_<i^T D_<i^-1 (w_<i - mu_<i)
        self._next = 0

    def sample(self, name: str) -> torch.Tensor:
        """Sample ``name`` given the group's sites sampled before it in this pass."""
        i = self.names.index(name)
        if i == 0:
            self._reset()
        if i != self._next:
            raise SpecError(f"low-rank prior group sampled out of order at {name}; sites must be sampled in guide order")
        lo, hi = self.offsets[i], self.offsets[i + 1]
        f_i, d_i, mu_i = self.cov_factor[lo:hi], self.cov_diag[lo:hi], self.loc[lo:hi]  # [n, r], [n], [n]
        eye = torch.eye(self._a.shape[0], dtype=self._a.dtype)
        inner = torch.linalg.cholesky(torch.linalg.inv(eye + self._a))  # L L^T = (I + A)^-1, [r, r]
        mean = mu_i + f_i @ torch.cholesky_solve(self._b.unsqueeze(-1), torch.linalg.cholesky(eye + self._a)).squeeze(-1)
        base = dist.LowRankMultivariateNormal(mean, f_i @ inner, d_i)  # event [n]
        shape = self.shapes[i]
        transforms = [torch.distributions.transforms.ReshapeTransform((hi - lo,), shape)]
        if self.supports[i] != "real":
            transforms.append(torch.distributions.transforms.ExpTransform())
        value = pyro.sample(name, dist.TransformedDistribution(base, transforms))
        z = value if self.supports[i] == "real" else biject_to(SUPPORTS[self.supports[i]]).inv(value)
        delta = z.reshape(-1) - mu_i  # [n]
        self._a = self._a + f_i.T @ (f_i / d_i.unsqueeze(-1))
        self._b = self._b + f_i.T @ (delta / d_i)
        self._next = i + 1
        return value

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        return {f"{key}/loc": self.loc, f"{key}/cov_factor": self.cov_factor, f"{key}/cov_diag": self.cov_diag}

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "shapes": [list(s) for s in self.shapes], "supports": self.supports}


class PosteriorPrior(Prior):
    """The previous round's posterior of one weight site and its hyper-parameter sites.

    :param parts: ``{site name: NormalPart | LowRankGroup}`` in sampling order (hyper-sites
        first, the weight site last), as the previous prior sampled them.
    """

    family = "posterior"

    def __init__(self, parts: dict[str, NormalPart | LowRankGroup]):
        self.parts = parts

    def hyper_sites(self, site: WeightSite) -> list[str]:
        return [name for name in self.parts if name != site.name]

    def sample(self, site: WeightSite) -> torch.Tensor:
        value = None
        for name, part in self.parts.items():
            value = part.sample(name) if isinstance(part, LowRankGroup) else pyro.sample(name, part.distribution())
        return value

    def distribution(self, site: WeightSite) -> dist.Distribution:
        part = self.parts[site.name]
        if isinstance(part, LowRankGroup):
            raise SpecError(f"{site.name} has a joint low-rank prior; it has no marginal distribution object here")
        return part.distribution()

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "parts": {
                name: {"normal": part.support} if isinstance(part, NormalPart) else {"group": part.names[0]}
                for name, part in self.parts.items()
            },
            "order": list(self.parts),  # the sampling order: JSON objects are written with sorted keys
        }


def _groups(sites: dict[str, Prior]) -> dict[str, LowRankGroup]:
    out = {}
    for prior in sites.values():
        for part in getattr(prior, "parts", {}).values():
            if isinstance(part, LowRankGroup):
                out[part.names[0]] = part
    return out


def site_priors_to_dict(sites: dict[str, Prior]) -> dict[str, Any]:
    """``sites`` and ``groups`` entries of :meth:`Priors.to_dict` (tensors go to :func:`site_prior_tensors`)."""
    for name, prior in sites.items():
        if not isinstance(prior, PosteriorPrior):
            raise SpecError(f"per-site prior of {name} is a {type(prior).__name__}; only posterior priors are per site")
    return {
        "sites": {name: prior.to_dict() for name, prior in sites.items()},
        "groups": {key: group.to_dict() for key, group in _groups(sites).items()},
    }


def site_prior_tensors(sites: dict[str, Prior]) -> dict[str, torch.Tensor]:
    """Every tensor of the posterior priors, keyed ``prior/<site>/loc|scale`` and ``prior_group/<first site>/...``."""
    tensors = {}
    for prior in sites.values():
        for name, part in prior.parts.items():
            if isinstance(part, NormalPart):
                tensors[f"prior/{name}/loc"] = part.loc
                tensors[f"prior/{name}/scale"] = part.scale
    for key, group in _groups(sites).items():
        tensors.update(group.tensors(f"prior_group/{key}"))
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def site_priors_from_dict(data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, PosteriorPrior]:
    """Inverse of :func:`site_priors_to_dict` and :func:`site_prior_tensors`."""
    try:
        groups = {}
        for key, meta in (data.get("groups") or {}).items():
            groups[key] = LowRankGroup(
                list(meta["names"]),
                [tuple(s) for s in meta["shapes"]],
                list(meta["supports"]),
                tensors[f"prior_group/{key}/loc"],
                tensors[f"prior_group/{key}/cov_factor"],
                tensors[f"prior_group/{key}/cov_diag"],
            )
        sites = {}
        for site, prior in data["sites"].items():
            parts = {}
            for name in prior.get("order") or list(prior["parts"]):
                part = prior["parts"][name]
                if "group" in part:
                    parts[name] = groups[part["group"]]
                else:
                    parts[name] = NormalPart(tensors[f"prior/{name}/loc"], tensors[f"prior/{name}/scale"], part["normal"])
            sites[site] = PosteriorPrior(parts)
    except KeyError as err:
        raise SpecError(f"the saved posterior prior is incomplete: {err} is missing; refit the round") from None
    return sites


def _scale_of(prior: Prior, site: WeightSite | None) -> float:
    scale = getattr(prior, "scale", None)
    if isinstance(scale, int | float):
        return float(scale)
    if scale == "fan_in" and site is not None and site.shape:
        return 1.0 / math.sqrt(site.shape[-1])
    return 0.1


def posterior_as_prior(model, guide, *, inflation: float = 1.0, map_scale: float | None = None) -> Priors:
    """The prior of the next round: ``guide``'s posterior, site by site (see the module docstring).

    :param model: the fitted :class:`~bhpeft_ppl.model.BayesianHybridModel`.
    :param guide: its fitted guide (an ``AutoGuideList``).
    :param inflation: :math:`\\gamma \\ge 1`, the factor on every variance (forgetting).
    :param map_scale: scale of the Normal around MAP estimates (default: the previous prior's scale).
    """
    if not isinstance(inflation, int | float) or not inflation >= 1:
        raise SpecError(f"inflation must be a number >= 1 (1 = exact updating), got {inflation!r}")
    if map_scale is not None and not map_scale > 0:
        raise SpecError(f"map_scale must be positive, got {map_scale!r}")
    root = math.sqrt(float(inflation))
    parts: dict[str, NormalPart | LowRankGroup] = {}
    with local_params(), torch.no_grad():
        for part in guide:
            names = [n for n, _ in part.prototype_trace.iter_stochastic_nodes()]
            supports = {n: _support_name(s["fn"].support) for n, s in part.prototype_trace.iter_stochastic_nodes()}
            if isinstance(part, AutoNormal):
                for name in names:
                    loc, scale = part._get_loc_and_scale(name)
                    parts[name] = NormalPart(loc.detach().clone(), scale.detach().clone() * root, supports[name])
            elif isinstance(part, AutoLowRankMultivariateNormal):
                posterior = part.get_posterior()
                shapes = [tuple(part._unconstrained_shapes[n]) for n in names]
                group = LowRankGroup(
                    names,
                    shapes,
                    [supports[n] for n in names],
                    posterior.loc.detach().clone(),
                    posterior.cov_factor.detach().clone() * root,
                    posterior.cov_diag.detach().clone() * inflation,
                )
                parts.update(dict.fromkeys(names, group))
            elif isinstance(part, AutoDelta):
                medians = part.median()
                for name in names:
                    value = medians[name].detach().clone()
                    z = biject_to(part.prototype_trace.nodes[name]["fn"].support).inv(value)
                    site = model.peft.sites.get(name)
                    base_priors = dataclasses.replace(model.priors, sites={})  # the original prior, not a posterior
                    previous = base_priors.for_site(site) if site is not None else None
                    scale = map_scale if map_scale is not None else (_scale_of(previous, site) if previous else 0.1)
                    parts[name] = NormalPart(z, torch.full_like(z, scale * root), supports[name])
            else:
                raise SpecError(f"posterior_as_prior does not know the guide part {type(part).__name__}")
    sites = {}
    for name, site in model.peft.sites.items():
        if model.families[name] == "point":
            continue
        hypers = model.site_priors[name].hyper_sites(site)
        sites[name] = PosteriorPrior({n: parts[n] for n in [*hypers, name]})
    return Priors(model.priors.components, model.priors.patterns, model.priors.function, sites)
