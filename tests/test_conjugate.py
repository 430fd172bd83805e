"""Dynamic fine-tuning is Bayesian updating: a conjugate check that could fail.

A Bayesian linear-Gaussian regression written with the library's own machinery
(a weight site, priors, a model function with a plate and a likelihood, guides,
``fit``, :func:`~bhpeft_ppl.posterior_prior.posterior_as_prior` through
:class:`~bhpeft_ppl.sequential.DynamicFineTuning`):

.. math:: w \\sim \\mathcal{N}(0, \\tau^2 I), \\qquad y_n \\mid w \\sim \\mathcal{N}(x_n^\\top w, \\sigma^2).

The posterior is Gaussian in closed form, so (a) the guide family can hold it
exactly and (b) two rounds (posterior of round 1 as the prior of round 2) must
give the posterior of one round on all the data.  Both fits are compared with
the closed form, in mean and variance.
"""

from collections import OrderedDict

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from bhpeft_ppl import FitConfig, GuideSpec, Normal, Priors
from bhpeft_ppl.sequential import DynamicFineTuning
from bhpeft_ppl.sites import WeightSite

NOISE = 0.5  # sigma
PRIOR = 1.0  # tau


class LinearPEFT(nn.Module):
    """Stands in for ``HybridPEFT``: one weight site ``w [d]``; the mean is ``x @ w``."""

    def __init__(self, d: int):
        super().__init__()
        self.sites = OrderedDict(w=WeightSite("w", (d,), "head"))

    def forward(self, batch, weights):
        return batch["x"] @ weights["w"]  # [B]


def gaussian_model(hybrid, batch, num_data):
    """:math:`w \\sim p(w)`, :math:`y_n \\sim \\mathcal{N}(x_n^\\top w, \\sigma^2)`."""
    weights = hybrid.sample_weights()
    mean = hybrid.peft(batch, weights)  # [B]
    with pyro.plate("data", size=num_data, subsample=batch["index"]):
        pyro.sample("obs", dist.Normal(mean, NOISE), obs=batch["labels"])
    return mean


class Regression(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i], "index": i}


def collate(items):
    return {
        "x": torch.stack([item["x"] for item in items]),  # [B, d]
        "labels": torch.stack([item["labels"] for item in items]),  # [B]
        "index": torch.tensor([item["index"] for item in items]),  # [B]
    }


def closed_form(x, y):
    """Posterior mean and covariance of :math:`w` given all of ``x``, ``y``."""
    precision = x.T @ x / NOISE**2 + torch.eye(x.shape[1]) / PRIOR**2
    cov = torch.linalg.inv(precision)
    return cov @ x.T @ y / NOISE**2, cov


def posterior_moments(driver):
    """Mean and covariance of the fitted guide (one autoguide over the single site ``w``)."""
    part = driver.guide[0]
    with torch.no_grad():
        if isinstance(part, pyro.infer.autoguide.AutoNormal):
            loc, scale = part._get_loc_and_scale("w")
            return loc.clone(), torch.diag(scale**2)
        posterior = part.get_posterior()
        return posterior.loc.clone(), posterior.covariance_matrix.clone()


def fit_rounds(x, y, splits, guide_spec, config):
    driver = DynamicFineTuning(
        LinearPEFT(x.shape[1]),
        priors=Priors(components={"head": Normal(PRIOR)}),
        guide_spec=guide_spec,
        model_fn=gaussian_model,
        fit_config=config,
    )
    for lo, hi in splits:
        driver.update(Regression(x[lo:hi], y[lo:hi]), collate_fn=collate)
    return posterior_moments(driver)


def orthogonal_halves(n: int, d: int, generator):
    """A design whose two halves each have orthogonal columns, so every posterior is diagonal."""
    halves = []
    for _ in range(2):
        q, _ = torch.linalg.qr(torch.randn(n, d, generator=generator))  # [n, d] orthonormal columns
        halves.append(q * torch.tensor([3.0, 2.0, 1.0]))
    return torch.cat(halves)


@pytest.mark.parametrize(
    "design, guide_spec",
    [
        ("orthogonal", GuideSpec(default="mean_field", init_scale=0.1)),
        ("correlated", GuideSpec(default="low_rank", rank=3, init_scale=0.1)),
    ],
    ids=["mean_field", "low_rank"],
)
def test_two_sequential_updates_equal_one_update_on_all_data(design, guide_spec):
    g = torch.Generator().manual_seed(0)
    n, d = 20, 3
    if design == "orthogonal":
        x = orthogonal_halves(n, d, g)
    else:
        x = torch.randn(2 * n, d, generator=g)
        x[:, 1] += 0.8 * x[:, 0]  # correlated columns: a full posterior covariance
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + NOISE * torch.randn(2 * n, generator=g)
    config = FitConfig(
        epochs=700, batch_size=2 * n, lr=0.1, schedule="cosine", warmup_ratio=0.0, num_particles=4, progress=False, seed=0
    )
    exact_mean, exact_cov = closed_form(x, y)
    one_mean, one_cov = fit_rounds(x, y, [(0, 2 * n)], guide_spec, config)
    two_mean, two_cov = fit_rounds(x, y, [(0, n), (n, 2 * n)], guide_spec, config)
    sd = exact_cov.diag().sqrt()
    for mean, cov in ((one_mean, one_cov), (two_mean, two_cov)):
        assert torch.all((mean - exact_mean).abs() < 0.15 * sd), (mean, exact_mean, sd)
        assert torch.allclose(cov.diag(), exact_cov.diag(), rtol=0.15), (cov.diag(), exact_cov.diag())
    # the two-round posterior equals the one-round posterior (each is within the SVI tolerance of the closed form)
    assert torch.all((two_mean - one_mean).abs() < 0.3 * sd)
    assert torch.allclose(two_cov.diag(), one_cov.diag(), rtol=0.3)
    if design == "correlated":  # the off-diagonal covariance is carried from round 1 to round 2
        corr = exact_cov[0, 1] / (sd[0] * sd[1])
        fitted = two_cov[0, 1] / (two_cov[0, 0] * two_cov[1, 1]).sqrt()
        assert corr < -0.3 and abs(float(fitted - corr)) < 0.1
