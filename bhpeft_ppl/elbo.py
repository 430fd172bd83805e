"""The negative ELBO with the KL of all Normal sites in one closed-form sum.

For a guide draw :math:`w \\sim q` (one particle),

.. math::

   -\\mathcal{L} = -\\sum_{\\text{observed } o} \\log p(y_o \\mid w)
     + \\sum_{s:\\, q_s, p_s \\text{ Normal}} \\mathrm{KL}(q_s \\,\\|\\, p_s)
     + \\sum_{\\text{other } s} \\big[\\log q_s(w_s) - \\log p_s(w_s)\\big],

each term scaled by its site's ``poutine.scale`` (the data plate's :math:`N/B`,
the model's ``kl_weight``).  For Normal :math:`q = \\mathcal{N}(\\mu_q, \\sigma_q^2)`
and :math:`p = \\mathcal{N}(\\mu_p, \\sigma_p^2)`, elementwise,

.. math:: \\mathrm{KL}(q \\,\\|\\, p) = \\log\\frac{\\sigma_p}{\\sigma_q}
   + \\frac{\\sigma_q^2 + (\\mu_q - \\mu_p)^2}{2\\sigma_p^2} - \\frac12 .

This is Pyro's ``TraceMeanField_ELBO`` estimator, computed differently: Pyro
evaluates every site's log-density (and, with validation on, checks it) before
it chooses the KL, and takes one KL per site; here the Normal pairs of all sites
are concatenated and their KL is one vectorised sum, and log-densities are
evaluated only where they are used.  With hundreds of weight sites this removes
most of Pyro's per-site cost of a step (``analyses/benchmark_performance.py``).
Other pairs take the per-site closed form when torch has one (a Normal guide
under a Laplace prior), and otherwise (horseshoe scales, low-rank joint sites,
MAP ``Delta`` sites) the Monte Carlo term :math:`\\log q - \\log p`, and a
guide's auxiliary sites their :math:`\\log q`, as ``Trace_ELBO`` does.  Unlike
``TraceMeanField_ELBO``, the :math:`\\log q` of a ``Delta`` site keeps its
log-Jacobian (Pyro's ``KL(Delta || p) = -log p(v)`` drops it, which biases the
gradient of constrained sites such as a horseshoe's positive scales).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Independent, Normal, kl_divergence

from .errors import SpecError


def _normal(fn) -> Normal | None:
    """The Normal under any ``Independent`` wrappers of ``fn``, or ``None``."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, Normal) else None


def _scaled(value: torch.Tensor, site: dict) -> torch.Tensor:
    """``value`` (a log-density per batch element) masked and scaled as Pyro scales ``site``, summed
    (a masked-out ``-inf`` gives 0, not NaN)."""
    return scale_and_mask(value, site["scale"], site["mask"]).sum()


def _is_number(scale) -> bool:
    return not torch.is_tensor(scale) or scale.numel() == 1


def _masked(site: dict) -> bool:
    return site["mask"] is not None


def normal_kl_sum(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """:math:`\\sum \\mathrm{KL}(\\mathcal{N}(\\mu_q, \\sigma_q^2) \\| \\mathcal{N}(\\mu_p, \\sigma_p^2))` of flat tensors."""
    ratio = (q_scale / p_scale) ** 2  # [D]
    return 0.5 * (ratio + ((q_loc - p_loc) / p_scale) ** 2 - 1.0 - ratio.log()).sum()


class MeanFieldELBO:
    """Negative ELBO estimate for :class:`~bhpeft_ppl.infer.SVIStep` (see the module docstring).

    :param num_particles: guide draws averaged per estimate.

    After each :meth:`differentiable_loss`, ``records`` holds one
    ``(log-likelihood, loss)`` pair of floats per particle.
    """

    def __init__(self, num_particles: int = 1):
        self.num_particles = num_particles
        self.records: list[tuple[float, float]] = []

    def particle(self, model: Callable, guide: Callable, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-likelihood, KL estimate)`` of one guide draw, both scaled, as tensors."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)  # plates' index sites
        loglik = torch.zeros(())
        kl = torch.zeros(())
        pairs: dict[float, list[tuple[Normal, Normal]]] = {}  # scale -> (q, p) Normal pairs
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                loglik = loglik + _scaled(site["fn"].log_prob(site["value"]), site)
                continue
            guide_site = guide_trace.nodes.get(name)
            if guide_site is None:
                raise SpecError(f"the model's latent site {name!r} has no site in the guide")
            q, p = _normal(guide_site["fn"]), _normal(site["fn"])
            scale = guide_site["scale"]
            if (
                q is not None
                and p is not None
                and q.batch_shape == p.batch_shape
                and _is_number(scale)
                and not _masked(guide_site)
            ):
                pairs.setdefault(float(scale), []).append((q, p))
                continue
            if not isinstance(guide_site["fn"], Delta):
                try:  # another closed form torch knows (e.g. Normal against Laplace)
                    kl = kl + _scaled(kl_divergence(guide_site["fn"], site["fn"]), guide_site)
                    continue
                except NotImplementedError:
                    pass
            log_q = guide_site["fn"].log_prob(guide_site["value"])  # a Delta's includes its log-Jacobian
            kl = kl + _scaled(log_q, guide_site) - _scaled(site["fn"].log_prob(site["value"]), site)
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] != "sample" or name in model_trace.nodes:
                continue
            if not guide_site["infer"].get("is_auxiliary"):
                raise SpecError(f"the guide samples {name!r}, which the model does not; was the guide built for another model?")
            kl = kl + _scaled(guide_site["fn"].log_prob(guide_site["value"]), guide_site)
        for scale, group in pairs.items():
            flat = [
                torch.cat([getattr(d, key).expand(d.batch_shape).reshape(-1) for d in ds])
                for ds in zip(*group, strict=True)
                for key in ("loc", "scale")
            ]
            kl = kl + scale * normal_kl_sum(*flat)  # flat: q_loc, q_scale, p_loc, p_scale, each [D]
        return loglik, kl

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """The negative ELBO averaged over ``num_particles`` draws (differentiable)."""
        self.records = []
        total = 0.0
        for _ in range(self.num_particles):
            loglik, kl = self.particle(model, guide, *args, **kwargs)
            loss = kl - loglik
            self.records.append((float(loglik.detach()), float(loss.detach())))
            total = total + loss / self.num_particles
        return total
