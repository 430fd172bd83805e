"""The posterior of one round as the prior of the next: exactness at the start of a round, low-rank
conditionals, MAP and point sites, inflation, horseshoe hyper-sites, and the save/load round trip.

The central check: at the start of round 2 the guide (loaded with round 1's state) equals the new
prior, so for any guide draw :math:`\\log q(w) - \\log p(w) = 0` (whole traces, auxiliary sites and
the Delta sites' log-densities included) and the KL term of round 2 is 0, while against the
original prior it is large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import separable_dataset, small_spec, tiny_bert
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import constraints
from torch.distributions.transforms import AffineTransform

from bhpeft_ppl.errors import PosteriorMismatchError, SpecError
from bhpeft_ppl.guides import GuideSpec, local_params
from bhpeft_ppl.infer import FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.naming import hyper_site_name
from bhpeft_ppl.posterior_prior import (
    LowRankGroup,
    NormalPart,
    PosteriorPrior,
    posterior_as_prior,
    site_prior_tensors,
    site_priors_from_dict,
    site_priors_to_dict,
)
from bhpeft_ppl.predict import posterior_location, predict
from bhpeft_ppl.priors import Horseshoe, Normal, Prior, Priors
from bhpeft_ppl.sequential import DynamicFineTuning
from bhpeft_ppl.serialize import load_posterior, save_posterior

FIT = FitConfig(epochs=1, batch_size=8, lr=5e-2, progress=False)
HORSESHOE = Priors(patterns={"lora_A": Horseshoe()})
LOW_RANK = GuideSpec(default="low_rank", rank=2)


# Helpers ---------------------------------------------------------------------------------------
@pytest.fixture
def fitted():
    """Factory ``fitted(guide_spec, priors=None) -> (model, guide)``: a tiny BERT fitted for two steps."""
    pefts = []

    def make(guide_spec: GuideSpec, priors: Priors | None = None, seed: int = 0):
        peft = inject(tiny_bert(), small_spec(rank=2))
        pefts.append(peft)
        model = BayesianHybridModel(peft, priors, guide_spec, seed=seed)
        return model, fit(model, separable_dataset(16), FIT).guide

    yield make
    for peft in pefts:
        peft.eject()


def next_round(model, guide):
    """Round 2's model (prior = round 1's posterior) and its guide, started at round 1's posterior."""
    return DynamicFineTuning.resume(model, guide).next_model()


def log_q_minus_log_p(model: BayesianHybridModel, guide, seed: int) -> tuple[float, float]:
    """``(log q(w) - log p(w), log q(w))`` for one guide draw ``w``, from whole traces."""
    with local_params(), torch.no_grad():
        pyro.set_rng_seed(seed)
        guide_trace = poutine.trace(guide).get_trace()
        model_trace = poutine.trace(poutine.replay(model.sample_weights, trace=guide_trace)).get_trace()
        log_q = guide_trace.log_prob_sum()
        return float(log_q - model_trace.log_prob_sum()), float(log_q)


def kl_estimate(model: BayesianHybridModel, guide) -> float:
    """The loss of ``TraceMeanField_ELBO`` on the prior model (no observations): the KL of ``guide`` from the prior."""
    with local_params(), torch.no_grad():
        pyro.set_rng_seed(0)
        return float(TraceMeanField_ELBO().differentiable_loss(model.sample_weights, guide))


def assert_zero(value: float, magnitude: float) -> None:
    """``value`` is 0 up to float32 rounding of sums of about ``magnitude`` nats (~1500 weights)."""
    assert abs(value) <= 1e-3 + 1e-6 * abs(magnitude), f"{value} is not 0 (log q ~ {magnitude})"


def weight_part(priors: Priors, name: str):
    return priors.sites[name].parts[name]


def check_round_two_starts_at_round_one_posterior(model, guide, draws: int = 3) -> None:
    model2, guide2 = next_round(model, guide)
    for seed in range(draws):
        diff, log_q = log_q_minus_log_p(model2, guide2, seed)
        assert_zero(diff, log_q)
    # the same draw against the original prior: far from 0 (test power)
    diff, log_q = log_q_minus_log_p(model, guide2, 0)
    assert abs(diff) > 10.0, f"log q - log p under the original prior is {diff}"


# 1. Mean field ---------------------------------------------------------------------------------
def test_mean_field_prior_parts_are_the_guide_locs_and_scales(fitted):
    model, guide = fitted(GuideSpec())
    priors = posterior_as_prior(model, guide)
    model2 = BayesianHybridModel(model.peft, priors, model.guide_spec)
    assert list(model2.latent_sites.items()) == list(model.latent_sites.items())
    assert set(priors.sites) == set(model.peft.sites)
    with local_params(), torch.no_grad():
        for name in model.peft.sites:
            prior = model2.priors.for_site(model.peft.sites[name])
            assert isinstance(prior, PosteriorPrior)
            assert list(prior.parts) == [name]
            part = prior.parts[name]
            assert isinstance(part, NormalPart) and part.support == "real"
            loc, scale = guide[0]._get_loc_and_scale(name)
            assert torch.equal(part.loc, loc), name
            assert torch.equal(part.scale, scale), name
    # the fit moved the guide away from its initial values (test power)
    lora_b = next(n for n in model.peft.sites if n.endswith("lora_B"))
    assert weight_part(priors, lora_b).loc.abs().max() > 0


def test_mean_field_round_two_starts_at_round_one_posterior(fitted):
    model, guide = fitted(GuideSpec())
    check_round_two_starts_at_round_one_posterior(model, guide)


def test_mean_field_kl_of_round_two_is_against_round_one_posterior(fitted):
    """The issue's check: the KL term of round 2 is measured against the round-1 posterior, not the original prior."""
    model, guide = fitted(GuideSpec())
    model2, guide2 = next_round(model, guide)
    _, log_q = log_q_minus_log_p(model2, guide2, 0)
    assert_zero(kl_estimate(model2, guide2), log_q)
    assert kl_estimate(model, guide2) > 100.0


def test_next_model_guide_state_equals_the_fitted_guide(fitted):
    model, guide = fitted(GuideSpec())
    _, guide2 = next_round(model, guide)
    state, state2 = guide.state_dict(), guide2.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert guide2 is not guide


# 2. Low rank -----------------------------------------------------------------------------------
def test_low_rank_round_two_starts_at_round_one_posterior(fitted):
    model, guide = fitted(LOW_RANK)
    priors = posterior_as_prior(model, guide)
    groups = {id(weight_part(priors, name)) for name in model.peft.sites}
    assert len(groups) == 1, "one low-rank guide gives one joint group shared by every site"
    group = weight_part(priors, next(iter(model.peft.sites)))
    assert isinstance(group, LowRankGroup)
    assert group.names == list(model.latent_sites)
    check_round_two_starts_at_round_one_posterior(model, guide)


def test_mixed_families_round_two_starts_at_round_one_posterior(fitted):
    """A mean-field part and a low-rank part (head and prefix) in one guide."""
    model, guide = fitted(GuideSpec(components={"head": "low_rank", "prefix": "low_rank"}, rank=2))
    check_round_two_starts_at_round_one_posterior(model, guide)


def _random_group(supports=("real", "real", "real"), dtype=torch.float32, rank: int = 3):
    generator = torch.Generator().manual_seed(11)
    shapes = [(2,), (3, 2), (4,)]
    d = sum(math.prod(s) for s in shapes)
    loc = torch.randn(d, generator=generator, dtype=dtype)
    cov_factor = 0.7 * torch.randn(d, rank, generator=generator, dtype=dtype)
    cov_diag = 0.5 + torch.rand(d, generator=generator, dtype=dtype)
    return LowRankGroup(["a", "b", "c"], shapes, list(supports), loc, cov_factor, cov_diag)


def _draw(group: LowRankGroup, data: dict | None = None):
    with poutine.trace() as tracer, poutine.condition(data=data or {}):
        values = [group.sample(name) for name in group.names]
    return values, tracer.trace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_rank_group_conditionals_multiply_to_the_joint(dtype):
    group = _random_group(dtype=dtype)
    joint = dist.LowRankMultivariateNormal(group.loc, group.cov_factor, group.cov_diag)
    pyro.set_rng_seed(0)
    for _ in range(5):
        values, trace = _draw(group)
        assert [tuple(v.shape) for v in values] == group.shapes
        flat = torch.cat([v.reshape(-1) for v in values])
        assert float(trace.log_prob_sum()) == pytest.approx(float(joint.log_prob(flat)), abs=1e-4)


def test_low_rank_group_conditional_is_the_gaussian_conditional():
    """Site ``b`` given ``a`` has mean mu_b + S_ba S_aa^-1 (a - mu_a) and covariance S_bb - S_ba S_aa^-1 S_ab."""
    group = _random_group(dtype=torch.float64)
    cov = group.cov_factor @ group.cov_factor.T + torch.diag(group.cov_diag)
    a, b = slice(0, 2), slice(2, 8)
    value_a = torch.tensor([0.3, -1.2], dtype=torch.float64)
    _, trace = _draw(group, {"a": value_a})
    base = trace.nodes["b"]["fn"].base_dist
    gain = cov[b, a] @ torch.linalg.inv(cov[a, a])
    torch.testing.assert_close(base.loc, group.loc[b] + gain @ (value_a - group.loc[a]))
    torch.testing.assert_close(base.covariance_matrix, cov[b, b] - gain @ cov[a, b])


def test_low_rank_group_positive_site_is_the_exp_of_the_joint():
    """A positive site is exp of its unconstrained coordinates; its density carries the Jacobian."""
    group = _random_group(supports=("real", "positive", "real"))
    joint = dist.LowRankMultivariateNormal(group.loc, group.cov_factor, group.cov_diag)
    pyro.set_rng_seed(1)
    for _ in range(3):
        (va, vb, vc), trace = _draw(group)
        assert (vb > 0).all()
        z = torch.cat([va, vb.log().reshape(-1), vc])
        expected = joint.log_prob(z) - vb.log().sum()  # log |d exp(z) / dz| = z
        assert float(trace.log_prob_sum()) == pytest.approx(float(expected), abs=1e-4)


def test_low_rank_group_out_of_order_raises():
    group = _random_group()
    with pytest.raises(SpecError, match="out of order"):
        group.sample("b")
    group.sample("a")
    with pytest.raises(SpecError, match="out of order"):
        group.sample("c")
    # the first site starts a new pass
    group.sample("a")
    group.sample("b")
    group.sample("c")


def test_low_rank_group_moments_match_loc_and_covariance():
    group = _random_group()
    cov = group.cov_factor @ group.cov_factor.T + torch.diag(group.cov_diag)
    n = 4000
    pyro.set_rng_seed(2)
    draws = torch.stack([torch.cat([v.reshape(-1) for v in _draw(group)[0]]) for _ in range(n)])  # [n, D]
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - group.loc).abs() <= 5 * sd / math.sqrt(n)).all()
    empirical = torch.cov(draws.T)
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()  # sd of a sample covariance
    assert ((empirical - cov).abs() <= 5 * se).all()


# 3. MAP and point sites ------------------------------------------------------------------------
def _expected_scale(name: str, shape) -> float:
    if name.endswith("lora_A"):
        return 1.0 / math.sqrt(shape[-1])  # Normal("fan_in") below
    if name.endswith(("lora_B", "adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")):
        return 0.1
    if name == "classifier.weight":
        return 0.5
    return 1.0  # prefix keys/values and gates, classifier.bias


def test_map_parts_are_centred_at_the_estimates_with_the_previous_prior_scale(fitted):
    model, guide = fitted(GuideSpec.map(), Priors(patterns={"lora_A": Normal("fan_in")}))
    priors = posterior_as_prior(model, guide)
    estimates = posterior_location(guide)
    for name, site in model.peft.sites.items():
        part = weight_part(priors, name)
        assert isinstance(part, NormalPart) and part.support == "real"
        assert torch.equal(part.loc, estimates[name]), name
        expected = _expected_scale(name, site.shape)
        torch.testing.assert_close(part.scale, torch.full(site.shape, expected), msg=name)
    lora_a = next(n for n in model.peft.sites if n.endswith("lora_A"))
    assert weight_part(priors, lora_a).scale.flatten()[0] == pytest.approx(1 / math.sqrt(32))


def test_map_scale_overrides_the_previous_prior_scale(fitted):
    model, guide = fitted(GuideSpec.map())
    priors = posterior_as_prior(model, guide, map_scale=0.02)
    for name in model.peft.sites:
        torch.testing.assert_close(weight_part(priors, name).scale, torch.full_like(weight_part(priors, name).loc, 0.02))


@pytest.mark.parametrize("map_scale", [0, -0.1])
def test_non_positive_map_scale_raises(fitted, map_scale):
    model, guide = fitted(GuideSpec.map())
    with pytest.raises(SpecError, match="map_scale"):
        posterior_as_prior(model, guide, map_scale=map_scale)


# Regression 2 (bhpeft_ppl/posterior_prior.py, _scale_of): from round 3 on, a MAP site's previous prior is a
# PosteriorPrior, which has no `scale` attribute, so the Normal around the MAP estimate falls back to 0.1
# (the head's 0.5 and the prefix's 1.0 are lost after one round). Remove the marker once fixed.
def test_map_scale_persists_over_rounds(fitted):
    model, guide = fitted(GuideSpec.map())
    driver = DynamicFineTuning.resume(model, guide, fit_config=FIT)
    driver.update(separable_dataset(8, seed=1))  # round 2: prior = N(MAP of round 1, previous scale)
    round2 = driver.model.priors
    assert float(weight_part(round2, "classifier.weight").scale.flatten()[0]) == pytest.approx(0.5)
    model3, _ = driver.next_model()  # round 3: prior = N(MAP of round 2, ...)
    for name in model.peft.sites:
        torch.testing.assert_close(weight_part(model3.priors, name).scale, weight_part(round2, name).scale, msg=name)


def test_point_sites_get_no_prior_and_carry_over(fitted):
    model, guide = fitted(GuideSpec.blob())
    points = model.point_values()
    assert points and all(not torch.equal(v.detach(), model.initial_values[n]) for n, v in points.items()), (
        "the fit should move the point estimates (test power)"
    )
    priors = posterior_as_prior(model, guide)
    assert set(priors.sites) == set(model.latent_sites) == {n for n in model.peft.sites if n.endswith("lora_A")}
    model2, guide2 = next_round(model, guide)
    assert model2.point_values().keys() == points.keys()
    for name, value in points.items():
        assert torch.equal(model2.point_values()[name].detach(), value.detach()), name
        assert model2.point_values()[name] is not value
    diff, log_q = log_q_minus_log_p(model2, guide2, 0)
    assert_zero(diff, log_q)


# 4. Inflation ----------------------------------------------------------------------------------
def test_inflation_multiplies_every_variance(fitted):
    for guide_spec in (GuideSpec(), GuideSpec.map(), GuideSpec(components={"head": "low_rank"}, rank=2)):
        model, guide = fitted(guide_spec)
        exact, wide = posterior_as_prior(model, guide), posterior_as_prior(model, guide, inflation=4)
        seen_groups = 0
        for name in model.peft.sites:
            a, b = weight_part(exact, name), weight_part(wide, name)
            assert torch.equal(a.loc, b.loc), name
            if isinstance(a, NormalPart):
                torch.testing.assert_close(b.scale, 2 * a.scale)
            else:
                seen_groups += 1
                torch.testing.assert_close(b.cov_diag, 4 * a.cov_diag)
                torch.testing.assert_close(b.cov_factor, 2 * a.cov_factor)
        assert seen_groups == (2 if guide_spec.components else 0)


@pytest.mark.parametrize("inflation", [0.5, 0, -1, float("nan"), "2"])
def test_inflation_below_one_raises(fitted, inflation):
    model, guide = fitted(GuideSpec())
    with pytest.raises(SpecError, match="inflation"):
        posterior_as_prior(model, guide, inflation=inflation)


# 5. Horseshoe hyper-sites ----------------------------------------------------------------------
@pytest.mark.parametrize("guide_spec", [GuideSpec(), LOW_RANK], ids=["mean_field", "low_rank"])
def test_horseshoe_hyper_sites_get_a_positive_posterior_prior(fitted, guide_spec):
    model, guide = fitted(guide_spec, HORSESHOE)
    priors = posterior_as_prior(model, guide)
    lora_a = [n for n in model.peft.sites if n.endswith("lora_A")]
    pyro.set_rng_seed(0)
    for name in lora_a:
        hypers = [hyper_site_name(name, "horseshoe_tau"), hyper_site_name(name, "horseshoe_lambda")]
        prior = priors.sites[name]
        assert list(prior.parts) == [*hypers, name]
        assert prior.hyper_sites(model.peft.sites[name]) == hypers
        for hyper in hypers:
            part = prior.parts[hyper]
            if isinstance(part, NormalPart):
                assert part.support == "positive"
                values = part.distribution().sample((200,))
                assert (values > 0).all()
            else:
                assert part.supports[part.names.index(hyper)] == "positive"
    model2, _ = next_round(model, guide)
    with local_params(), torch.no_grad():
        trace = poutine.trace(model2.sample_weights).get_trace()
    for name in lora_a:
        assert (trace.nodes[hyper_site_name(name, "horseshoe_tau")]["value"] > 0).all()
        assert (trace.nodes[hyper_site_name(name, "horseshoe_lambda")]["value"] > 0).all()
    check_round_two_starts_at_round_one_posterior(model, guide)


# Supports other than real and positive ---------------------------------------------------------
class OnePlusLogNormal(dist.TransformedDistribution):
    """:math:`1 + \\mathrm{LogNormal}(0, 1)`, supported on :math:`(1, \\infty)`."""

    support = constraints.greater_than(1.0)

    def __init__(self):
        super().__init__(dist.LogNormal(torch.tensor(0.0), torch.tensor(1.0)), [AffineTransform(1.0, 1.0)])


@dataclass(frozen=True)
class ShiftedScaleNormal(Prior):
    """A user prior with a hyper-site supported on (1, inf): w ~ N(0, (0.1 s)^2), s ~ 1 + LogNormal(0, 1)."""

    family: ClassVar[str] = "test_shifted_scale"

    def hyper_sites(self, site):
        return [hyper_site_name(site.name, "test_scale")]

    def sample(self, site):
        s = pyro.sample(self.hyper_sites(site)[0], OnePlusLogNormal())
        return pyro.sample(site.name, dist.Normal(torch.zeros(site.shape), 0.1 * s).to_event(len(site.shape)))


# Regression 3 (bhpeft_ppl/posterior_prior.py, _support_name): `type(support) is type(constraint)` takes any
# greater_than(c) for `positive`, so a site on (1, inf) gets exp instead of 1 + exp; the next prior then
# differs from the posterior. Expected: an exact prior, or a SpecError naming the support.
def test_support_other_than_real_or_positive_is_exact_or_refused(fitted):
    model, guide = fitted(GuideSpec(), Priors(patterns={"classifier.bias": ShiftedScaleNormal()}))
    try:
        model2, guide2 = next_round(model, guide)
    except SpecError:
        return
    diff, log_q = log_q_minus_log_p(model2, guide2, 0)
    assert_zero(diff, log_q)


# Positive hyper-sites of a user prior ---------------------------------------
@dataclass(frozen=True)
class LogNormalScaleNormal(Prior):
    """A user prior with a positive hyper-site: w ~ N(0, (0.1 s)^2), s ~ LogNormal(0, 0.5)."""

    family: ClassVar[str] = "test_lognormal_scale"

    def hyper_sites(self, site):
        return [hyper_site_name(site.name, "test_scale")]

    def sample(self, site):
        s = pyro.sample(self.hyper_sites(site)[0], dist.LogNormal(torch.tensor(0.0), torch.tensor(0.5)))
        return pyro.sample(site.name, dist.Normal(torch.zeros(site.shape), 0.1 * s).to_event(len(site.shape)))


def lognormal_scale_prior(site):
    """A prior function (user priors are saved by function name, not by class)."""
    return LogNormalScaleNormal() if site.name == "classifier.bias" else None


LOGNORMAL_SCALE = Priors(function=lognormal_scale_prior)
SCALE_SITE = hyper_site_name("classifier.bias", "test_scale")


# Regression 1b (bhpeft_ppl/posterior_prior.py, NormalPart.distribution and LowRankGroup.sample): biject_to(positive) is
# ComposeTransform(Exp, Affine(0, 1)), whose codomain is `real`, so the posterior prior of a positive site has
# support `real`: the next round's guide samples it unconstrained (negative values, NaN log-densities) and the
# round after treats it as real. Remove the markers once the prior's support is positive (e.g. ExpTransform()).


def test_positive_normal_part_has_positive_support():
    part = NormalPart(torch.zeros(3), torch.ones(3), "positive")
    assert not part.distribution().support.check(-torch.ones(3)).any()


@pytest.mark.parametrize("guide_spec", [GuideSpec(), LOW_RANK], ids=["mean_field", "low_rank"])
def test_positive_hyper_site_stays_positive_in_the_next_round(fitted, guide_spec):
    model, guide = fitted(guide_spec, LOGNORMAL_SCALE)
    priors = posterior_as_prior(model, guide)
    assert list(priors.sites["classifier.bias"].parts) == [SCALE_SITE, "classifier.bias"]
    model2, guide2 = next_round(model, guide)
    with local_params(), torch.no_grad():
        trace = poutine.trace(model2.sample_weights).get_trace()
        assert not trace.nodes[SCALE_SITE]["fn"].support.check(torch.tensor(-1.0)).any()
        for seed in range(5):
            pyro.set_rng_seed(seed)
            assert guide2()[SCALE_SITE] > 0, "the next round's guide must keep the site positive"
    check_round_two_starts_at_round_one_posterior(model, guide)


# Regression 5 (bhpeft_ppl/posterior_prior.py, PosteriorPrior.to_dict / site_priors_from_dict): the order of `parts`
# (hyper-sites first, the weight last: the sampling order) is carried by a JSON object, and save_posterior writes
# JSON with sort_keys=True, so a loaded posterior prior samples the weight before its hyper-sites (and
# `lambda` before `tau`). The loaded model's latent sites change order, and a low-rank group is then sampled out
# of order: load_posterior raises SpecError. Remove the marker once the order is saved explicitly.
@pytest.mark.parametrize("guide_spec", [GuideSpec(), LOW_RANK], ids=["mean_field", "low_rank"])
def test_saved_parts_keep_their_sampling_order(fitted, tmp_path, guide_spec):
    model, guide = fitted(guide_spec, LOGNORMAL_SCALE)
    model2, guide2 = next_round(model, guide)
    folder = save_posterior(tmp_path / "round_2", model2, guide2)
    loaded, _ = load_posterior(folder, tiny_bert(), priors_function=lognormal_scale_prior)
    try:
        assert list(loaded.latent_sites.items()) == list(model2.latent_sites.items())
        assert list(loaded.priors.sites["classifier.bias"].parts) == [SCALE_SITE, "classifier.bias"]
    finally:
        loaded.peft.eject()


# 6. Save and load ------------------------------------------------------------------------------
SAVE_CASES = {
    "mean_field": (GuideSpec(), None),
    "low_rank": (LOW_RANK, None),
    "map": (GuideSpec.map(), None),
    "blob": (GuideSpec.blob(), None),
    "horseshoe": pytest.param((LOW_RANK, HORSESHOE)),
}


@pytest.mark.parametrize("case", list(SAVE_CASES.values()), ids=list(SAVE_CASES))
def test_round_two_posterior_round_trips(fitted, tmp_path, case):
    guide_spec, priors = case
    model, guide = fitted(guide_spec, priors)
    driver = DynamicFineTuning.resume(model, guide, fit_config=FIT)
    driver.update(separable_dataset(8, seed=1))
    model2, guide2 = driver.model, driver.guide
    assert model2.priors.sites, "round 2's prior is round 1's posterior"
    data = separable_dataset(6, seed=9)
    before = predict(model2, guide2, data, 3, seed=0)
    folder = save_posterior(tmp_path / "round_2", model2, guide2)

    loaded, loaded_guide = load_posterior(folder, tiny_bert())  # a fresh base with the same weights
    try:
        assert loaded.priors.to_dict() == model2.priors.to_dict()
        assert list(loaded.latent_sites.items()) == list(model2.latent_sites.items())
        for name, prior in model2.priors.sites.items():
            assert list(loaded.priors.sites[name].parts) == list(prior.parts), name
        saved_tensors, loaded_tensors = model2.priors.tensors(), loaded.priors.tensors()
        assert saved_tensors and saved_tensors.keys() == loaded_tensors.keys()
        for key, value in saved_tensors.items():
            assert torch.equal(loaded_tensors[key], value), key
        if guide_spec.default == "low_rank":  # the joint group is one object again, so its chain works
            assert len({id(weight_part(loaded.priors, n)) for n in loaded.peft.sites}) == 1
        after = predict(loaded, loaded_guide, data, 3, seed=0)
        assert torch.equal(before.probs, after.probs)
        assert torch.equal(before.point_probs, after.point_probs)
    finally:
        loaded.peft.eject()


def test_missing_prior_tensor_raises_spec_error(fitted):
    model, guide = fitted(GuideSpec(components={"head": "low_rank"}, rank=2))  # Normal parts and one group
    sites = posterior_as_prior(model, guide).sites
    data, tensors = site_priors_to_dict(sites), site_prior_tensors(sites)
    assert {k.split("/")[0] for k in tensors} == {"prior", "prior_group"}
    rebuilt = site_priors_from_dict(data, tensors)
    assert set(rebuilt) == set(sites)
    for key in tensors:
        partial = {k: v for k, v in tensors.items() if k != key}
        with pytest.raises((SpecError, PosteriorMismatchError), match="missing"):
            site_priors_from_dict(data, partial)


def test_missing_mean_field_prior_tensor_raises_spec_error(fitted):
    model, guide = fitted(GuideSpec())
    priors = posterior_as_prior(model, guide)
    tensors = priors.tensors()
    assert all(k.startswith("prior/") for k in tensors)
    key = next(iter(tensors))
    with pytest.raises(SpecError, match="missing"):
        Priors.from_dict(priors.to_dict(), tensors={k: v for k, v in tensors.items() if k != key})
    with pytest.raises(SpecError, match="tensors"):
        Priors.from_dict(priors.to_dict())
    again = Priors.from_dict(priors.to_dict(), tensors=tensors)
    assert again.to_dict() == priors.to_dict()


def test_only_posterior_priors_serialise_per_site():
    with pytest.raises(SpecError, match="only posterior priors"):
        Priors(sites={"classifier.bias": Normal(1.0)}).to_dict()
