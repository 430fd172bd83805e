"""Prior families, the hierarchical horseshoe, and the prior map's resolution order."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.priors import (
    DEFAULT_COMPONENT_PRIORS,
    DEFAULT_PATTERN_PRIORS,
    PRIOR_FAMILIES,
    Horseshoe,
    Laplace,
    Normal,
    Prior,
    Priors,
    StudentT,
    as_priors,
    prior_from_dict,
)
from bhpeft_ppl.sites import WeightSite

LORA_A = WeightSite("encoder.layer.0.attention.self.query.lora_A", (4, 32), "lora", "kaiming")
LORA_B = WeightSite("encoder.layer.0.attention.self.query.lora_B", (32, 4), "lora", "zeros")
ADAPTER_UP = WeightSite("encoder.layer.0.output.dense.adapter_up", (32, 2), "adapter", "zeros")
PREFIX_KEY = WeightSite("encoder.layer.0.attention.self.prefix_key", (10, 32), "prefix", "normal:0.5")
PREFIX_GATE = WeightSite("encoder.layer.0.attention.self.prefix_gate", (4,), "prefix", "zeros")
GATE_WEIGHT = WeightSite("encoder.layer.0.attention.self.query.gate_weight", (32,), "lora", "zeros")
HEAD_W = WeightSite("classifier.weight", (3, 32), "head", "normal:0.02")
HEAD_B = WeightSite("classifier.bias", (3,), "head", "zeros")
ALL_SITES = [LORA_A, LORA_B, ADAPTER_UP, PREFIX_KEY, PREFIX_GATE, GATE_WEIGHT, HEAD_W, HEAD_B]


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# Families ----------------------------------------------------------------------
ELEMENTWISE = [
    (Normal, {}),
    (Laplace, {}),
    (StudentT, {"df": 4.0}),
]


@pytest.mark.parametrize(("cls", "extra"), ELEMENTWISE)
@pytest.mark.parametrize("site", [LORA_A, HEAD_B, PREFIX_KEY, WeightSite("w", (2, 3, 5), "adapter")], ids=lambda s: s.name)
def test_distribution_event_shape_is_site_shape(cls, extra, site):
    d = cls(scale=0.3, loc=0.5, **extra).distribution(site)
    assert d.event_shape == torch.Size(site.shape)
    assert d.batch_shape == torch.Size([])
    x = d.sample()
    assert x.shape == torch.Size(site.shape)
    assert d.log_prob(x).shape == torch.Size([])
    assert torch.allclose(d.base_dist.loc, torch.full(site.shape, 0.5))


@pytest.mark.parametrize(("cls", "extra"), ELEMENTWISE)
def test_numeric_scale(cls, extra):
    d = cls(scale=0.25, **extra).distribution(LORA_A)
    assert torch.allclose(d.base_dist.scale, torch.full(LORA_A.shape, 0.25))


@pytest.mark.parametrize(("cls", "extra"), ELEMENTWISE)
@pytest.mark.parametrize("site", [LORA_A, LORA_B, HEAD_W], ids=lambda s: s.name)
def test_fan_in_scale_is_one_over_sqrt_last_dim(cls, extra, site):
    d = cls(scale="fan_in", **extra).distribution(site)
    expected = 1.0 / math.sqrt(site.shape[-1])
    assert torch.allclose(d.base_dist.scale, torch.full(site.shape, expected))


def test_elementwise_log_prob_is_sum_of_elementwise_terms():
    x = torch.randn(LORA_A.shape)
    for prior, base in [
        (Normal(0.2, 0.1), dist.Normal(0.1, 0.2)),
        (Laplace(0.3), dist.Laplace(0.0, 0.3)),
        (StudentT(df=5.0, scale=0.4), dist.StudentT(5.0, 0.0, 0.4)),
    ]:
        assert torch.allclose(prior.distribution(LORA_A).log_prob(x), base.log_prob(x).sum())


def test_student_t_df_is_used():
    d = StudentT(df=7.0, scale=1.0).distribution(HEAD_B)
    assert torch.allclose(d.base_dist.df, torch.full(HEAD_B.shape, 7.0))


@pytest.mark.parametrize(("cls", "extra"), ELEMENTWISE)
def test_sample_creates_one_site_of_the_site_name(cls, extra):
    trace = poutine.trace(cls(**extra).sample).get_trace(LORA_A)
    samples = [n for n, node in trace.nodes.items() if node["type"] == "sample"]
    assert samples == [LORA_A.name]
    assert trace.nodes[LORA_A.name]["value"].shape == torch.Size(LORA_A.shape)
    assert cls(**extra).hyper_sites(LORA_A) == []


# Horseshoe ---------------------------------------------------------------------
@pytest.mark.parametrize(("group_dim", "groups"), [(0, 4), (-1, 32), (1, 32)])
def test_horseshoe_sample_creates_hyper_sites(group_dim, groups):
    prior = Horseshoe(global_scale=0.2, group_dim=group_dim)
    trace = poutine.trace(prior.sample).get_trace(LORA_A)
    tau_name = f"{LORA_A.name}_horseshoe_tau"
    lambda_name = f"{LORA_A.name}_horseshoe_lambda"
    samples = [n for n, node in trace.nodes.items() if node["type"] == "sample"]
    assert samples == [tau_name, lambda_name, LORA_A.name]
    assert prior.hyper_sites(LORA_A) == [tau_name, lambda_name]

    tau = trace.nodes[tau_name]["value"]
    lam = trace.nodes[lambda_name]["value"]
    w = trace.nodes[LORA_A.name]["value"]
    assert tau.shape == torch.Size([])
    assert lam.shape == torch.Size([groups])
    assert w.shape == torch.Size(LORA_A.shape)
    assert (tau > 0).all() and (lam > 0).all()

    # the global scale is the HalfCauchy scale of tau
    assert torch.allclose(trace.nodes[tau_name]["fn"].scale, torch.tensor(0.2))
    # every weight sits in the group of its index along group_dim, with scale tau * lambda_j
    fn = trace.nodes[LORA_A.name]["fn"]
    assert fn.event_shape == torch.Size(LORA_A.shape)
    scale = fn.base_dist.scale
    dim = group_dim % 2
    expected = (tau * lam).unsqueeze(1 - dim).expand(LORA_A.shape)
    assert torch.allclose(scale, expected)
    assert torch.allclose(fn.base_dist.loc, torch.zeros(LORA_A.shape))


def test_horseshoe_one_dimensional_site():
    trace = poutine.trace(Horseshoe().sample).get_trace(HEAD_B)
    assert trace.nodes[f"{HEAD_B.name}_horseshoe_lambda"]["value"].shape == torch.Size([3])
    assert trace.nodes[HEAD_B.name]["value"].shape == torch.Size([3])


def test_horseshoe_scalar_site_raises():
    with pytest.raises(SpecError):
        Horseshoe().sample(WeightSite("scalar", (), "head"))


def test_horseshoe_has_no_marginal_distribution():
    with pytest.raises(SpecError, match="Horseshoe"):
        Horseshoe().distribution(LORA_A)


# Invalid arguments -------------------------------------------------------------
@pytest.mark.parametrize("scale", [0, -0.1, float("inf"), float("nan"), "fan-in", "0.1", None, True])
@pytest.mark.parametrize("cls", [Normal, Laplace, StudentT])
def test_invalid_scale_raises(cls, scale):
    with pytest.raises(SpecError, match="scale"):
        cls(scale=scale)


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), "fan-in"])
def test_invalid_horseshoe_global_scale_raises(scale):
    with pytest.raises(SpecError):
        Horseshoe(global_scale=scale)


@pytest.mark.parametrize("df", [0, -2.0, "three"])
def test_invalid_student_t_df_raises(df):
    with pytest.raises(SpecError, match="df"):
        StudentT(df=df)


def test_priors_are_frozen():
    prior = Normal(0.3)
    with pytest.raises(AttributeError):
        prior.scale = 1.0
    assert prior.scale == 0.3


# Dict form of single priors ----------------------------------------------------
@pytest.mark.parametrize(
    "prior",
    [Normal(0.3, 0.1), Normal("fan_in"), Laplace(0.2), StudentT(df=4.0, scale="fan_in"), Horseshoe(0.5, -1)],
    ids=repr,
)
def test_prior_dict_round_trip(prior):
    data = prior.to_dict()
    assert data["family"] == prior.family
    assert PRIOR_FAMILIES[data["family"]] is type(prior)
    again = prior_from_dict(json.loads(json.dumps(data)))
    assert again == prior and type(again) is type(prior)


def test_prior_from_dict_errors():
    with pytest.raises(SpecError, match="family"):
        prior_from_dict({"scale": 0.1})
    with pytest.raises(SpecError, match="cauchy"):
        prior_from_dict({"family": "cauchy"})
    with pytest.raises(SpecError, match="sigma"):
        prior_from_dict({"family": "normal", "sigma": 0.1})
    with pytest.raises(SpecError):
        prior_from_dict(0.1)
    with pytest.raises(SpecError, match="scale"):
        prior_from_dict({"family": "laplace", "scale": -1})


# Priors: resolution ------------------------------------------------------------
def test_defaults():
    priors = Priors()
    for site in ALL_SITES:
        prior = priors.for_site(site)
        assert isinstance(prior, Prior)
    assert priors.for_site(LORA_A) == DEFAULT_COMPONENT_PRIORS["lora"]
    assert priors.for_site(ADAPTER_UP) == DEFAULT_COMPONENT_PRIORS["adapter"]
    assert priors.for_site(PREFIX_KEY) == DEFAULT_COMPONENT_PRIORS["prefix"]
    assert priors.for_site(HEAD_W) == DEFAULT_COMPONENT_PRIORS["head"]
    assert priors.for_site(HEAD_B) == DEFAULT_PATTERN_PRIORS["classifier.bias"]
    assert priors.for_site(PREFIX_GATE) == DEFAULT_PATTERN_PRIORS["prefix_gate"]
    assert priors.for_site(GATE_WEIGHT) == DEFAULT_PATTERN_PRIORS["gate_weight"]


def test_default_head_bias_prior_differs_from_head_weight():
    priors = Priors()
    weight, bias = priors.for_site(HEAD_W), priors.for_site(HEAD_B)
    assert weight != bias
    # weight: the documented 0.5 (a priori logits of a few units for MiniLM's pooled features); bias: unit scale
    assert torch.allclose(weight.distribution(HEAD_W).base_dist.scale, torch.full(HEAD_W.shape, 0.5))
    assert torch.allclose(bias.distribution(HEAD_B).base_dist.scale, torch.ones(HEAD_B.shape))


def _laplace_everywhere(site):
    return Laplace(0.7)


def test_resolution_order():
    user_pattern = Horseshoe(0.3)
    user_component = StudentT(df=3.0, scale=0.2)
    function_prior = Laplace(0.7)

    # function beats both library defaults (pattern default and component default)
    priors = Priors(function=_laplace_everywhere)
    assert priors.for_site(HEAD_B) == function_prior
    assert priors.for_site(HEAD_W) == function_prior
    assert priors.for_site(LORA_A) == function_prior

    # user component beats the function and the library defaults
    priors = Priors(components={"head": user_component}, function=_laplace_everywhere)
    assert priors.for_site(HEAD_B) == user_component
    assert priors.for_site(HEAD_W) == user_component
    assert priors.for_site(LORA_A) == function_prior

    # user pattern beats the user component
    priors = Priors(components={"head": user_component}, patterns={"classifier.bias": user_pattern}, function=_laplace_everywhere)
    assert priors.for_site(HEAD_B) == user_pattern
    assert priors.for_site(HEAD_W) == user_component

    # library default pattern beats library component default
    assert Priors().for_site(HEAD_B) != DEFAULT_COMPONENT_PRIORS["head"]


def test_function_returning_none_falls_back_to_defaults():
    seen = []

    def only_lora(site):
        seen.append(site.name)
        return Laplace(0.5) if site.component == "lora" else None

    priors = Priors(function=only_lora)
    assert priors.for_site(LORA_A) == Laplace(0.5)
    assert priors.for_site(HEAD_B) == DEFAULT_PATTERN_PRIORS["classifier.bias"]
    assert priors.for_site(HEAD_W) == DEFAULT_COMPONENT_PRIORS["head"]
    assert seen == [LORA_A.name, HEAD_B.name, HEAD_W.name]


@pytest.mark.parametrize("bad", [0.1, 0, "normal", {"family": "normal", "scale": 0.1}, dist.Normal(0.0, 1.0)])
def test_function_returning_non_prior_raises(bad):
    priors = Priors(function=lambda site: bad)
    with pytest.raises(SpecError, match="prior function"):
        priors.for_site(LORA_A)


def test_pattern_matching_semantics_and_order():
    priors = Priors(patterns={"lora_A": Normal(0.5), r".*query\.lora_.": Normal(0.6), "query": Normal(0.7)})
    assert priors.for_site(LORA_A) == Normal(0.5)  # first match wins
    assert priors.for_site(LORA_B) == Normal(0.6)  # regex, full match
    # "query" is neither the name, a '.'-suffix of it, nor a full regex match
    assert priors.for_site(ADAPTER_UP) == DEFAULT_COMPONENT_PRIORS["adapter"]
    assert Priors(patterns={"query": Normal(0.7)}).for_site(LORA_A) == DEFAULT_COMPONENT_PRIORS["lora"]


def test_priors_accept_dict_forms():
    priors = Priors(components={"lora": {"family": "laplace", "scale": 0.3}}, patterns={"bias": {"family": "normal"}})
    assert priors.for_site(LORA_A) == Laplace(0.3)
    assert priors.for_site(HEAD_B) == Normal()


def test_priors_unknown_component_raises():
    with pytest.raises(SpecError, match="loraa"):
        Priors(components={"loraa": Normal()})


# Priors: dict round trip ------------------------------------------------------
def test_priors_dict_round_trip():
    priors = Priors(
        components={"lora": Laplace(0.2), "head": StudentT(df=5.0, scale="fan_in")},
        patterns={"lora_A": Horseshoe(0.5, -1), r".*prefix_.*": Normal(2.0, 0.1)},
    )
    data = json.loads(json.dumps(priors.to_dict()))
    again = Priors.from_dict(data)
    assert again == priors
    assert list(again.patterns) == list(priors.patterns)  # order matters for resolution
    for site in ALL_SITES:
        assert again.for_site(site) == priors.for_site(site)


def test_priors_with_function_round_trip_needs_the_function():
    priors = Priors(components={"adapter": Normal(0.3)}, function=_laplace_everywhere)
    data = json.loads(json.dumps(priors.to_dict()))
    assert "_laplace_everywhere" in data["function"]
    with pytest.raises(SpecError, match="_laplace_everywhere"):
        Priors.from_dict(data)
    again = Priors.from_dict(data, function=_laplace_everywhere)
    assert again == priors
    assert again.for_site(LORA_A) == Laplace(0.7)
    assert again.for_site(ADAPTER_UP) == Normal(0.3)


def test_priors_from_dict_errors():
    with pytest.raises(SpecError, match="extra"):
        Priors.from_dict({"components": {}, "extra": 1})
    with pytest.raises(SpecError):
        Priors.from_dict([("components", {})])


def test_as_priors():
    assert as_priors(None) == Priors()
    priors = Priors(components={"lora": Normal(0.5)})
    assert as_priors(priors) is priors
    assert as_priors(priors.to_dict()) == priors
    from_function = as_priors(_laplace_everywhere)
    assert from_function.function is _laplace_everywhere
    assert from_function.for_site(HEAD_B) == Laplace(0.7)
