"""The vectorised ELBO equals Pyro's ``TraceMeanField_ELBO`` and ``Trace_ELBO``; the mean-field guide draws as ``AutoNormal``."""

from __future__ import annotations

import pyro
import pytest
import torch
from helpers import separable_dataset, small_spec, tiny_bert
from pyro import poutine
from pyro.distributions import Delta
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import Normal, kl_divergence

from bhpeft_ppl.data import Collator
from bhpeft_ppl.elbo import MeanFieldELBO, normal_kl_sum
from bhpeft_ppl.guides import GuideSpec, MeanFieldNormal, local_params
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.posterior_prior import posterior_as_prior
from bhpeft_ppl.priors import Horseshoe, Laplace, Priors

CASES = {
    "mean_field": (None, GuideSpec(init_scale=0.05)),
    "horseshoe": (Priors(patterns={"lora_A": Horseshoe()}), GuideSpec(init_scale=0.05)),
    "laplace": (Priors(components={"adapter": Laplace()}), GuideSpec(init_scale=0.05)),
    "low_rank": (None, GuideSpec(default="low_rank", rank=2, init_scale=0.05)),
    "map": (None, GuideSpec.map()),
    "blob": (None, GuideSpec.blob()),
}


@pytest.fixture(scope="module")
def peft():
    peft = inject(tiny_bert(), small_spec())
    yield peft
    peft.eject()


def _moved(model: BayesianHybridModel, guide, seed: int = 0) -> None:
    """Move every guide parameter off its initial value (so KL terms are not trivially 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _loss_and_grads(elbo, model, guide, batch, num_data, seed):
    with local_params():
        pyro.set_rng_seed(seed)
        params = list(guide.parameters())
        loss = elbo.differentiable_loss(model, model.scaled_guide(guide), batch, num_data)
        if isinstance(elbo, TraceMeanField_ELBO):
            loss = loss + _dropped_jacobians(model, guide, seed)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(loss.detach()), grads


def _dropped_jacobians(model, guide, seed):
    """What ``TraceMeanField_ELBO`` leaves out: Pyro's ``KL(Delta || p) = -log p(v)`` ignores the
    ``log_density`` (log-Jacobian of the constraining bijection) of a ``Delta`` guide site, so
    constrained sites (the horseshoe's positive scales) lose the term :math:`\\log|dz/dw|` of
    :math:`\\log q(w)`.  The ELBO needs it (``Trace_ELBO`` keeps it), and ``MeanFieldELBO`` keeps it."""
    pyro.set_rng_seed(seed)
    trace = poutine.trace(model.scaled_guide(guide)).get_trace()
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and isinstance(site["fn"], Delta):
            total = total + (site["fn"].log_density * site["scale"]).sum()
    return total


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_loss_and_gradients_equal_pyros_trace_mean_field_elbo(peft, case, kl_weight):
    """The same loss and gradients (with the Jacobians Pyro's estimator drops, see above)."""
    priors, guide_spec = CASES[case]
    model = BayesianHybridModel(peft, priors=priors, guide_spec=guide_spec, kl_weight=kl_weight)
    guide = model.make_guide()
    _moved(model, guide)
    data = separable_dataset(20)
    batch = Collator()([data[i] for i in (0, 3, 7, 12, 19)])
    ours, our_grads = _loss_and_grads(MeanFieldELBO(), model, guide, batch, len(data), seed=4)
    theirs, their_grads = _loss_and_grads(TraceMeanField_ELBO(), model, guide, batch, len(data), seed=4)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-3)
    for a, b in zip(our_grads, their_grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_kl_part_is_closed_form_not_monte_carlo(peft):
    """Two draws give the same KL (closed form); Trace_ELBO's Monte Carlo KL differs between draws."""
    model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.05))
    guide = model.make_guide()
    _moved(model, guide)
    elbo = MeanFieldELBO()
    with local_params(), torch.no_grad():
        kls = []
        for seed in (0, 1):
            pyro.set_rng_seed(seed)
            kls.append(float(elbo.particle(model.sample_weights, guide)[1]))
            pyro.set_rng_seed(seed)
        mc = []
        for seed in (0, 1):
            pyro.set_rng_seed(seed)
            mc.append(float(Trace_ELBO().differentiable_loss(model.sample_weights, guide)))
    assert kls[0] == pytest.approx(kls[1], rel=1e-6)
    assert abs(mc[0] - mc[1]) > 1e-2 * abs(kls[0])
    # and it is the sum of the per-site KLs of torch.distributions
    with local_params(), torch.no_grad():
        expected = 0.0
        for name, site in model.peft.sites.items():
            loc, scale = guide[0]._get_loc_and_scale(name)
            prior = model.site_priors[name].distribution(site).base_dist
            expected += float(kl_divergence(Normal(loc, scale), prior).sum())
    assert kls[0] == pytest.approx(expected, rel=1e-4)


def test_round_two_kl_is_measured_against_round_one_posterior(peft):
    """Against a prior equal to the guide, the closed-form KL is 0 at any draw."""
    model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.05))
    guide = model.make_guide()
    _moved(model, guide)
    model2 = BayesianHybridModel(peft, priors=posterior_as_prior(model, guide), guide_spec=model.guide_spec)
    with local_params(), torch.no_grad():
        pyro.set_rng_seed(0)
        kl_same = float(MeanFieldELBO().particle(model2.sample_weights, guide)[1])
        kl_original = float(MeanFieldELBO().particle(model.sample_weights, guide)[1])
    assert abs(kl_same) < 1e-3 and kl_original > 10.0


def test_normal_kl_sum_matches_torch():
    g = torch.Generator().manual_seed(0)
    q_loc, p_loc = torch.randn(50, generator=g), torch.randn(50, generator=g)
    q_scale, p_scale = torch.rand(50, generator=g) + 0.1, torch.rand(50, generator=g) + 0.1
    expected = kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale)).sum()
    assert torch.allclose(normal_kl_sum(q_loc, q_scale, p_loc, p_scale), expected, rtol=1e-5)


def test_records_and_particles_average(peft):
    model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.05))
    guide = model.make_guide()
    data = separable_dataset(8)
    batch = Collator()([data[i] for i in range(8)])
    elbo = MeanFieldELBO(num_particles=3)
    with local_params(), torch.no_grad():
        pyro.set_rng_seed(0)
        loss = float(elbo.differentiable_loss(model, guide, batch, 8))
    assert len(elbo.records) == 3
    assert loss == pytest.approx(sum(r[1] for r in elbo.records) / 3, rel=1e-5)
    assert len({r[0] for r in elbo.records}) == 3  # three draws, three log-likelihoods


def test_mean_field_guide_draws_what_autonormal_draws(peft):
    model = BayesianHybridModel(peft, priors=Priors(patterns={"lora_A": Horseshoe()}), guide_spec=GuideSpec(init_scale=0.05))
    guide = model.make_guide()
    part = guide[0]
    assert isinstance(part, MeanFieldNormal)
    _moved(model, guide)
    with local_params(), torch.no_grad():
        reference = AutoNormal(part.model, init_scale=0.05)
        reference()
        reference.load_state_dict(part.state_dict())
        pyro.set_rng_seed(7)
        ours = part()
        ours_trace = poutine.trace(part).get_trace()
        pyro.set_rng_seed(7)
        theirs = reference()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name])
    # real sites are the Normal itself; the horseshoe's positive scales keep an auxiliary site
    auxiliary = [n for n, s in ours_trace.nodes.items() if s["type"] == "sample" and s["infer"].get("is_auxiliary")]
    assert auxiliary and all(n.endswith("_unconstrained") and ("tau" in n or "lambda" in n) for n in auxiliary)
    for name in model.peft.sites:
        assert isinstance(ours_trace.nodes[name]["fn"].base_dist, Normal)
    # outside local_params the parameters are read the PyroModule way, with the same values
    with local_params():
        fast = part._get_loc_and_scale(next(iter(model.peft.sites)))
    slow = AutoNormal._get_loc_and_scale(part, next(iter(model.peft.sites)))
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


# Regressions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["mean_field", "trace"])
def test_a_model_first_run_in_predict_still_trains(peft, estimator):
    """The prior cache is built outside inference mode even when predict builds it."""
    from bhpeft_ppl.infer import FitConfig, fit
    from bhpeft_ppl.predict import predict
    from bhpeft_ppl.priors import StudentT

    priors = Priors(components={"adapter": Laplace(), "head": StudentT()})
    guide = BayesianHybridModel(peft, priors=priors).make_guide()
    rebuilt = BayesianHybridModel(peft, priors=priors)
    data = separable_dataset(8)
    predict(rebuilt, guide, data, 2, batch_size=8)  # the rebuilt model's first sample_weights: in inference mode
    result = fit(rebuilt, data, FitConfig(max_steps=2, batch_size=8, progress=False, estimator=estimator), guide=guide)
    assert all(torch.isfinite(torch.tensor(result.history["loss"])))


def test_masked_out_minus_infinity_counts_zero_as_in_pyro():
    y, keep = torch.tensor([0, 1, 1]), torch.tensor([True, True, False])
    logits = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.0, -float("inf")]])  # the masked row: log p(1) = -inf

    def model():
        pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", 3), poutine.mask(mask=keep):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)

    with local_params():
        guide = MeanFieldNormal(model)
        guide()
        losses = []
        for elbo in (MeanFieldELBO(), TraceMeanField_ELBO()):
            pyro.set_rng_seed(0)
            losses.append(float(elbo.differentiable_loss(model, guide).detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_mean_field_guide_subsamples_the_parameters_of_a_site_in_a_plate():
    index = torch.tensor([1, 4, 7])

    def model():
        with pyro.plate("data", 10, subsample=index):
            pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))

    with local_params():
        guide = MeanFieldNormal(model)
        guide()
        assert guide()["z"].shape == (3,)


def test_a_guide_site_the_model_lacks_is_an_error(peft):
    from bhpeft_ppl.errors import SpecError

    horseshoe = BayesianHybridModel(peft, priors=Priors(patterns={"lora_A": Horseshoe()}))
    plain = BayesianHybridModel(peft)
    with local_params(), pytest.raises(SpecError, match="does not"):
        MeanFieldELBO().particle(plain.sample_weights, horseshoe.make_guide())
