"""The Bayesian hybrid-PEFT model: priors on PEFT weights and a likelihood, in Pyro.

Generative model for a batch of :math:`B` examples out of :math:`N`:

.. math::

   w_s &\\sim p_s(w_s) \\quad \\text{for every PEFT weight site } s
        \\text{ (LoRA, adapter, prefix, head)} \\\\
   \\eta_n &= f_{\\text{base}}(x_n;\\, w) \\in \\mathbb{R}^{C}
        \\quad \\text{(frozen base model with the PEFT modules)} \\\\
   y_n &\\sim \\mathrm{Categorical}(\\mathrm{softmax}(\\eta_n)), \\quad n \\in \\text{batch},
        \\text{ log-likelihood scaled by } N / B

For multiple choice :math:`\\eta_n` holds one score per choice.  The weight
sites are scaled by ``kl_weight`` :math:`\\beta` (model and guide alike), so
the objective is :math:`\\mathbb{E}_q[\\log p(y \\mid w)] - \\beta\\,\\mathrm{KL}(q \\,\\|\\, p)`;
:math:`\\beta = 1` (default) is the proper ELBO.  Sites whose guide family is
``point`` are ``pyro.param`` (no prior), held by this module.

The Pyro model itself is a plain function ``model(hybrid, batch, num_data)``
(:func:`categorical_model` by default, or the ``model`` of a file in
``models/``); it must observe the labels at a site named ``obs`` inside a
plate named ``data``.  Predictions read the distribution of that site, so a
model file that changes the likelihood changes the predictions with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .errors import SpecError
from .guides import GuideSpec, build_guide, local_params
from .inject import HybridPEFT
from .priors import Prior, Priors, as_priors

OBS_SITE = "obs"
PLATE = "data"


def _point_key(name: str) -> str:
    return name.replace(".", "__")


def categorical_model(hybrid: BayesianHybridModel, batch: Mapping[str, torch.Tensor], num_data: int) -> torch.Tensor:
    """The default Pyro model: every PEFT weight from its prior, then
    :math:`y_n \\sim \\mathrm{Categorical}(\\mathrm{softmax}(f(x_n; w)))` in the plate ``data``.

    :param hybrid: the :class:`BayesianHybridModel` (priors, sites, base model).
    :param batch: a batch of :mod:`bhpeft_ppl.data` (``index`` is the plate's subsample).
    :param num_data: :math:`N`, the size of the whole dataset (the plate's size).
    :returns: the logits ``[B, C]``.
    """
    weights = hybrid.sample_weights()  # w_s ~ p_s(w_s) for every PEFT site
    logits = hybrid.peft(batch, weights)  # [B, C]
    with pyro.plate(PLATE, size=num_data, subsample=batch["index"]):
        pyro.sample(OBS_SITE, dist.Categorical(logits=logits), obs=batch.get("labels"))
    return logits


ModelFunction = Callable[["BayesianHybridModel", Mapping[str, torch.Tensor], int], torch.Tensor]


class BayesianHybridModel(nn.Module):
    """Pyro model over the PEFT weights of a :class:`~bhpeft_ppl.inject.HybridPEFT`.

    :param peft: the injected base model.
    :param priors: :class:`~bhpeft_ppl.priors.Priors`, its dict form, a function
        ``WeightSite -> Prior | None``, or ``None`` for the defaults.
    :param guide_spec: families per component/site (:class:`~bhpeft_ppl.guides.GuideSpec`).
    :param kl_weight: :math:`\\beta` on the prior/KL term; 1 is the proper ELBO.
    :param seed: seed of the initial values of every PEFT weight.
    :param model_fn: the Pyro model ``model(hybrid, batch, num_data)``; default
        :func:`categorical_model`.
    """

    def __init__(
        self,
        peft: HybridPEFT,
        priors: Priors | Mapping | None = None,
        guide_spec: GuideSpec | None = None,
        kl_weight: float = 1.0,
        seed: int = 0,
        model_fn: ModelFunction | None = None,
    ):
        super().__init__()
        if model_fn is not None and not callable(model_fn):
            raise SpecError(f"model_fn must be a function model(hybrid, batch, num_data), got {type(model_fn).__name__}")
        self.model_fn = model_fn or categorical_model
        if not isinstance(kl_weight, int | float) or not kl_weight > 0:
            raise SpecError(f"kl_weight must be a positive number, got {kl_weight!r}")
        self.peft = peft
        self.priors = as_priors(priors)
        self.guide_spec = guide_spec or GuideSpec()
        self.kl_weight = float(kl_weight)
        self.seed = int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.initial_values = OrderedDict((name, site.initial_value(generator)) for name, site in peft.sites.items())
        self.families = OrderedDict((name, self.guide_spec.family(name, site.component)) for name, site in peft.sites.items())
        self.point_estimates = nn.ParameterDict(
            {
                _point_key(name): nn.Parameter(self.initial_values[name].clone())
                for name, family in self.families.items()
                if family == "point"
            }
        )
        # priors are resolved once per model (a prior function must be deterministic)
        self.site_priors = OrderedDict((name, self.priors.for_site(site)) for name, site in peft.sites.items())
        self._fixed_priors: dict[str, dist.Distribution | None] = {}
        self.latent_sites = OrderedDict()  # site (hyper-sites included) -> family
        for name, site in peft.sites.items():
            family = self.families[name]
            if family == "point":
                continue
            for hyper in self.site_priors[name].hyper_sites(site):
                self.latent_sites[hyper] = family
            self.latent_sites[name] = family

    # The model -----------------------------------------------------------------
    def point_values(self) -> dict[str, torch.Tensor]:
        """``{site name: tensor}`` of the point-estimate sites."""
        return {name: self.point_estimates[_point_key(name)] for name, f in self.families.items() if f == "point"}

    def sample_weights(self, *args, **kwargs) -> OrderedDict[str, torch.Tensor]:
        """Draw every PEFT weight: ``pyro.sample`` from its prior, or ``pyro.param`` if a point estimate.

        Extra arguments are ignored, so that this is also the prior model the guide is built on.
        """
        weights = OrderedDict()
        with poutine.substitute(data=self.point_values()), poutine.scale(scale=self.kl_weight):
            for name, site in self.peft.sites.items():
                if self.families[name] == "point":
                    weights[name] = pyro.param(name, self.initial_values[name])
                else:
                    fixed = self._fixed_prior(name, site)
                    weights[name] = self.site_priors[name].sample(site) if fixed is None else pyro.sample(name, fixed)
        return weights

    def _fixed_prior(self, name: str, site) -> dist.Distribution | None:
        """The prior distribution of ``site``, built once, when its prior samples it from
        :meth:`~bhpeft_ppl.priors.Prior.distribution` with no hyper-parameter sites (a fixed
        distribution); ``None`` otherwise (it is sampled by the prior, every call)."""
        if name not in self._fixed_priors:
            prior = self.site_priors[name]
            plain = type(prior).sample is Prior.sample and not prior.hyper_sites(site)
            with torch.inference_mode(False):  # the cache outlives this call, which may be in predict's inference mode
                self._fixed_priors[name] = prior.distribution(site) if plain else None
        return self._fixed_priors[name]

    def forward(self, batch: Mapping[str, torch.Tensor], num_data: int | None = None) -> torch.Tensor:
        """Run the Pyro model on ``batch`` (the plate scaled to ``num_data``, default the batch size)."""
        if "index" not in batch:
            batch = {**batch, "index": torch.arange(batch["input_ids"].shape[0])}
        size = int(num_data) if num_data is not None else int(batch["index"].shape[0])
        return self.model_fn(self, batch, size)

    @torch.no_grad()
    def predictive(
        self, batch: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class probabilities ``[B, C]`` at the weights ``weights`` (latent sites), read off
        the ``obs`` site of the model, and the log-likelihood of the labels ``[B]`` if the batch has them."""
        trace = poutine.trace(poutine.condition(self.forward, data=dict(weights))).get_trace(batch)
        node = trace.nodes.get(OBS_SITE)
        if node is None or node["type"] != "sample":
            raise SpecError(
                f"the model function {getattr(self.model_fn, '__name__', '?')} has no sample site named "
                f"{OBS_SITE!r}; observe the labels with pyro.sample({OBS_SITE!r}, ..., obs=batch.get('labels'))"
            )
        fn = node["fn"]
        probs = getattr(fn, "probs", None)
        if probs is None:
            raise SpecError(f"the {OBS_SITE!r} site must be a Categorical-like distribution with .probs, got {type(fn).__name__}")
        log_lik = fn.log_prob(node["value"]) if node["is_observed"] else None  # [B]
        return probs, log_lik

    # The guide -----------------------------------------------------------------
    def _init_loc(self, site) -> torch.Tensor | None:
        value = self.initial_values.get(site["name"])
        return None if value is None else value.clone()

    def make_guide(self):
        """A fresh ``AutoGuideList`` over the latent sites, one autoguide per family,
        its parameters created (see :func:`~bhpeft_ppl.guides.local_params`)."""
        with local_params():
            guide = build_guide(self.sample_weights, self.latent_sites, self.guide_spec, self._init_loc)
            guide()  # creates the parameters (the prior model ignores arguments)
        return guide

    def scaled_guide(self, guide):
        """``guide`` with its sites scaled by ``kl_weight``, as the model's are."""
        if self.kl_weight == 1.0:
            return guide
        return poutine.scale(guide, scale=self.kl_weight)
