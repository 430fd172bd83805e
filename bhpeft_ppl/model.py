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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .errors import SpecError
from .guides import GuideSpec, build_guide, local_params
from .inject import HybridPEFT
from .priors import Priors, as_priors


def _point_key(name: str) -> str:
    return name.replace(".", "__")


class BayesianHybridModel(nn.Module):
    """Pyro model over the PEFT weights of a :class:`~bhpeft_ppl.inject.HybridPEFT`.

    :param peft: the injected base model.
    :param priors: :class:`~bhpeft_ppl.priors.Priors`, its dict form, a function
        ``WeightSite -> Prior | None``, or ``None`` for the defaults.
    :param guide_spec: families per component/site (:class:`~bhpeft_ppl.guides.GuideSpec`).
    :param kl_weight: :math:`\\beta` on the prior/KL term; 1 is the proper ELBO.
    :param seed: seed of the initial values of every PEFT weight.
    """

    def __init__(
        self,
        peft: HybridPEFT,
        priors: Priors | Mapping | None = None,
        guide_spec: GuideSpec | None = None,
        kl_weight: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
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
        self.latent_sites = OrderedDict()  # site (hyper-sites included) -> family
        for name, site in peft.sites.items():
            family = self.families[name]
            if family == "point":
                continue
            for hyper in self.priors.for_site(site).hyper_sites(site):
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
                    weights[name] = self.priors.for_site(site).sample(site)
        return weights

    def likelihood(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor], num_data: int | None) -> None:
        """:math:`y_n \\sim \\mathrm{Categorical}(\\mathrm{logits}_n)` in a plate scaled to ``num_data``."""
        b = logits.shape[0]
        index = batch.get("index")
        subsample = index if index is not None else torch.arange(b, device=logits.device)
        size = int(num_data) if num_data is not None else b
        with pyro.plate("data", size=size, subsample=subsample):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=batch.get("labels"))

    def forward(self, batch: Mapping[str, torch.Tensor], num_data: int | None = None) -> torch.Tensor:
        """The Pyro model: weights from the prior, base-model logits ``[B, C]``, likelihood."""
        weights = self.sample_weights()
        logits = self.peft(batch, weights)  # [B, C]
        self.likelihood(logits, batch, num_data)
        return logits

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
