"""The Pyro model: sample sites, guide sites, point estimates, hyper-priors, KL weight, likelihood plate."""

from __future__ import annotations

import pyro
import pytest
import torch
from helpers import (
    choice_dataset,
    full_batch,
    separable_dataset,
    small_spec,
    tiny_bert,
    tiny_llama,
)
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from bhpeft_ppl.data import Collator
from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.guides import GuideSpec, local_params
from bhpeft_ppl.infer import FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.priors import Horseshoe, Priors
from bhpeft_ppl.spec import HeadSpec, HybridSpec


@pytest.fixture
def bert_peft():
    peft = inject(tiny_bert(), HybridSpec.bh_peft())
    yield peft
    peft.eject()


def latent_trace_sites(model: BayesianHybridModel) -> list[str]:
    """Names of the unobserved sample sites of the prior model, in order."""
    with local_params():
        trace = poutine.trace(model.sample_weights).get_trace()
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]


def guide_sample_keys(guide) -> tuple[list[str], list[str]]:
    with local_params(), torch.no_grad():
        return list(guide().keys()), list(guide.median().keys())


# Site names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_base", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_site_names_are_unique_and_cover_every_layer(make_base):
    peft = inject(make_base(), HybridSpec.bh_peft())
    try:
        declared = [site.name for layer in peft.peft_layers for site in layer.sites]
        assert len(declared) == len(set(declared)), "two PEFT weights share a site name"
        assert list(peft.sites) == declared
        components = {site.component for site in peft.sites.values()}
        assert components == {"lora", "adapter", "prefix", "head"}
    finally:
        peft.eject()


def test_model_trace_has_one_sample_site_per_weight(bert_peft):
    m = BayesianHybridModel(bert_peft)
    names = latent_trace_sites(m)
    assert len(names) == len(set(names))
    assert set(names) == set(bert_peft.sites)


# Latent sites and the guide -------------------------------------------------------------------
@pytest.mark.parametrize(
    "guide_spec",
    [GuideSpec(), GuideSpec.map(), GuideSpec(default="low_rank"), GuideSpec(components={"prefix": "map", "head": "low_rank"})],
    ids=["mean_field", "map", "low_rank", "mixed"],
)
def test_latent_sites_match_prior_trace_guide_and_median(bert_peft, guide_spec):
    m = BayesianHybridModel(bert_peft, guide_spec=guide_spec)
    prior_sites = latent_trace_sites(m)
    assert prior_sites == list(m.latent_sites)
    guide = m.make_guide()
    sampled, median = guide_sample_keys(guide)
    assert set(sampled) == set(m.latent_sites)
    assert set(median) == set(m.latent_sites)
    with local_params(), torch.no_grad():
        draw = guide()
    for name, value in draw.items():
        assert value.shape == bert_peft.sites[name].shape, name


def test_mixed_guide_spec_assigns_families_per_component(bert_peft):
    spec = GuideSpec(components={"prefix": "map", "head": "low_rank"}, patterns={"lora_A": "point"})
    m = BayesianHybridModel(bert_peft, guide_spec=spec)
    for name, site in bert_peft.sites.items():
        if name.endswith("lora_A"):
            assert name not in m.latent_sites and m.families[name] == "point"
        elif site.component == "prefix":
            assert m.latent_sites[name] == "map"
        elif site.component == "head":
            assert m.latent_sites[name] == "low_rank"
        else:
            assert m.latent_sites[name] == "mean_field"


@pytest.mark.parametrize("guide_spec", [GuideSpec.blob(), GuideSpec(default="point")], ids=["blob", "all_point"])
def test_point_sites_are_params_not_samples(bert_peft, guide_spec):
    m = BayesianHybridModel(bert_peft, guide_spec=guide_spec)
    point_names = [n for n, f in m.families.items() if f == "point"]
    assert point_names, "the spec should make some sites point estimates"
    with local_params():
        trace = poutine.trace(m.sample_weights).get_trace()
    points = m.point_values()
    assert set(points) == set(point_names)
    for name in point_names:
        assert name in trace.nodes, name
        assert trace.nodes[name]["type"] == "param", name
        # the value the model uses is the module's own parameter (so SVI trains it)
        assert trace.nodes[name]["value"] is points[name]
        assert name not in m.latent_sites
    samples = {n for n, s in trace.nodes.items() if s["type"] == "sample"}
    assert samples == set(m.latent_sites)
    assert samples.isdisjoint(point_names)
    if guide_spec.default == "point" and not guide_spec.patterns:
        assert samples == set()
    else:
        assert samples and all(n.endswith("lora_A") for n in samples)
    # point estimates are nn.Parameters of the model, initialised at the sites' initial values
    own = {id(p) for p in m.parameters()}
    for name, p in points.items():
        assert isinstance(p, torch.nn.Parameter) and id(p) in own
        assert torch.equal(p.detach(), m.initial_values[name])


FAMILIES = [GuideSpec(), GuideSpec.map(), GuideSpec(default="low_rank")]
FAMILY_IDS = ["mean_field", "map", "low_rank"]


@pytest.mark.parametrize("guide_spec", FAMILIES, ids=FAMILY_IDS)
def test_horseshoe_adds_hyper_sites_to_latent_sites_and_guide(bert_peft, guide_spec):
    m = BayesianHybridModel(bert_peft, priors=Priors(patterns={"lora_A": Horseshoe()}), guide_spec=guide_spec)
    plain = BayesianHybridModel(bert_peft, guide_spec=guide_spec)
    lora_a = [n for n in bert_peft.sites if n.endswith("lora_A")]
    assert lora_a
    expected_hyper = {f"{n}_{h}" for n in lora_a for h in ("horseshoe_tau", "horseshoe_lambda")}
    assert set(m.latent_sites) - set(plain.latent_sites) == expected_hyper
    assert set(plain.latent_sites) <= set(m.latent_sites)
    assert latent_trace_sites(m) == list(m.latent_sites)
    guide = m.make_guide()
    sampled, median = guide_sample_keys(guide)
    assert set(sampled) == set(m.latent_sites) == set(median)
    with local_params(), torch.no_grad():
        draw = guide()
    for name in lora_a:
        assert draw[f"{name}_horseshoe_tau"].shape == ()
        assert draw[f"{name}_horseshoe_lambda"].shape == (bert_peft.sites[name].shape[0],)
        assert (draw[f"{name}_horseshoe_tau"] > 0).all() and (draw[f"{name}_horseshoe_lambda"] > 0).all()


@pytest.mark.parametrize("guide_spec", FAMILIES, ids=FAMILY_IDS)
def test_horseshoe_model_fits_with_finite_loss(bert_peft, guide_spec):
    m = BayesianHybridModel(bert_peft, priors=Priors(patterns={"lora_A": Horseshoe()}), guide_spec=guide_spec)
    result = fit(m, separable_dataset(16), FitConfig(epochs=1, batch_size=8, lr=1e-2, progress=False))
    assert len(result.history["loss"]) == 2
    assert all(torch.isfinite(torch.tensor(result.history["loss"])))


@pytest.mark.parametrize("bad", [0, -1.0, "1", None])
def test_kl_weight_must_be_positive(bert_peft, bad):
    with pytest.raises(SpecError):
        BayesianHybridModel(bert_peft, kl_weight=bad)


# KL weight -------------------------------------------------------------------------------------
def _loglik(model, guide, batch, num_data, seed):
    """Log-likelihood (scaled to the data) at the guide draw of ``seed``, computed by replay."""
    with local_params(), torch.no_grad():
        pyro.set_rng_seed(seed)
        guide_trace = poutine.trace(guide).get_trace()
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch, num_data)
    model_trace.compute_log_prob()
    return float(model_trace.nodes["obs"]["log_prob_sum"])


def test_kl_weight_scales_only_the_kl_term():
    peft = inject(tiny_bert(), small_spec())
    try:
        data = separable_dataset(20)
        batch = Collator()([data[i] for i in (1, 4, 9, 16)])
        full, half = BayesianHybridModel(peft), BayesianHybridModel(peft, kl_weight=0.5)
        guide = full.make_guide()
        losses = {}
        for name, m in (("full", full), ("half", half)):
            with local_params(), torch.no_grad():
                pyro.set_rng_seed(3)
                losses[name] = float(TraceMeanField_ELBO().differentiable_loss(m, m.scaled_guide(guide), batch, len(data)))
        loglik = _loglik(full, guide, batch, len(data), seed=3)
        kl = losses["full"] + loglik  # the proper ELBO is loglik - KL
        assert abs(kl) > 1.0, "the KL term should not vanish here, or the test has no power"
        assert losses["half"] == pytest.approx(-loglik + 0.5 * kl, rel=1e-4, abs=1e-2)
        assert losses["half"] != pytest.approx(losses["full"], rel=1e-3)
    finally:
        peft.eject()


def test_fit_history_kl_is_independent_of_kl_weight():
    """Same seed, same initial guide: the first step's KL estimate is the same for any beta,
    and the loss is -loglik + beta * KL."""
    data = separable_dataset(16)
    config = FitConfig(max_steps=1, batch_size=8, lr=1e-2, progress=False, seed=5)
    histories = {}
    for beta in (1.0, 0.5):
        peft = inject(tiny_bert(), small_spec())
        try:
            histories[beta] = fit(BayesianHybridModel(peft, kl_weight=beta), data, config).history
        finally:
            peft.eject()
    one, half = histories[1.0], histories[0.5]
    assert half["log_likelihood"][0] == pytest.approx(one["log_likelihood"][0], rel=1e-5)
    assert half["kl"][0] == pytest.approx(one["kl"][0], rel=1e-4)
    assert half["loss"][0] == pytest.approx(-one["log_likelihood"][0] + 0.5 * one["kl"][0], rel=1e-4)
    assert one["loss"][0] == pytest.approx(-one["log_likelihood"][0] + one["kl"][0], rel=1e-4)


# Likelihood ------------------------------------------------------------------------------------
def test_observed_site_is_in_data_plate_scaled_to_dataset(bert_peft):
    m = BayesianHybridModel(bert_peft)
    data = separable_dataset(20)
    batch = Collator()([data[i] for i in (2, 3, 11, 19)])
    with local_params():
        trace = poutine.trace(m).get_trace(batch, len(data))
    obs = trace.nodes["obs"]
    assert obs["type"] == "sample" and obs["is_observed"]
    assert torch.equal(obs["value"], batch["labels"])
    frames = [f for f in obs["cond_indep_stack"] if f.name == "data"]
    assert len(frames) == 1
    assert frames[0].size == len(batch["labels"])
    assert frames[0].full_size == len(data)
    assert obs["scale"] == pytest.approx(len(data) / len(batch["labels"]))
    assert obs["fn"].batch_shape == (4,)


def test_likelihood_unscaled_without_num_data(bert_peft):
    m = BayesianHybridModel(bert_peft)
    batch = full_batch(separable_dataset(6))
    del batch["index"]
    with local_params():
        trace = poutine.trace(m).get_trace(batch)
    assert trace.nodes["obs"]["scale"] == pytest.approx(1.0)


def test_forward_returns_logits_of_the_batch(bert_peft):
    m = BayesianHybridModel(bert_peft)
    batch = full_batch(separable_dataset(5))
    with local_params():
        trace = poutine.trace(m).get_trace(batch, 5)
    logits = trace.nodes["_RETURN"]["value"]
    assert logits.shape == (5, 2)
    assert torch.allclose(trace.nodes["obs"]["fn"].logits, torch.log_softmax(logits, -1), atol=1e-5)


def test_multiple_choice_logits_are_one_score_per_choice():
    k = 3
    peft = inject(tiny_bert(), small_spec(HeadSpec(task="multiple_choice", num_labels=k)))
    try:
        m = BayesianHybridModel(peft)
        data = choice_dataset(6, k)
        batch = full_batch(data)
        b, kk, t = batch["input_ids"].shape
        assert (b, kk) == (6, k)
        with local_params():
            trace = poutine.trace(m).get_trace(batch, len(data))
        logits = trace.nodes["_RETURN"]["value"]
        assert logits.shape == (6, k)
        assert trace.nodes["obs"]["fn"].logits.shape == (6, k)
        # score [b, j] is the head's output on choice j of example b
        weights = {n: trace.nodes[n]["value"] for n in peft.sites}
        flat = {"input_ids": batch["input_ids"].reshape(b * k, t), "attention_mask": batch["attention_mask"].reshape(b * k, t)}
        with torch.no_grad():
            scores = peft(flat, weights)  # [B*K, 1]
        assert scores.shape == (b * k, 1)
        assert torch.allclose(logits.detach(), scores.reshape(b, k), atol=1e-5)
    finally:
        peft.eject()
