"""Specs: validation (each bad field named), immutability, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.spec import (
    PRESETS,
    AdapterSpec,
    HeadSpec,
    HybridSpec,
    LoRASpec,
    PrefixSpec,
)


def test_defaults_are_valid():
    lora, adapter, prefix, head = LoRASpec(), AdapterSpec(), PrefixSpec(), HeadSpec()
    assert lora.rank >= 1 and 0 <= lora.dropout < 1 and lora.target_modules is None
    assert adapter.placement == "sequential" and adapter.input_modules is None
    assert prefix.num_virtual_tokens >= 1 and prefix.gate is True
    assert head.num_labels >= 2 and head.task == "classification"
    spec = HybridSpec(lora=lora)
    assert spec.components == ("lora",)
    assert spec.head == HeadSpec()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: LoRASpec(rank=0), "rank"),
        (lambda: LoRASpec(rank=-3), "rank"),
        (lambda: LoRASpec(rank=2.5), "rank"),
        (lambda: LoRASpec(alpha=0), "alpha"),
        (lambda: LoRASpec(alpha=-1.0), "alpha"),
        (lambda: LoRASpec(dropout=1.0), "dropout"),
        (lambda: LoRASpec(dropout=-0.1), "dropout"),
        (lambda: LoRASpec(target_modules=()), "target_modules"),
        (lambda: LoRASpec(target_modules=("query", "")), "target_modules"),
        (lambda: LoRASpec(target_modules=(3,)), "target_modules"),
        (lambda: AdapterSpec(bottleneck=0), "bottleneck"),
        (lambda: AdapterSpec(bottleneck=2.5), "bottleneck"),
        (lambda: AdapterSpec(reduction_factor=0), "reduction_factor"),
        (lambda: AdapterSpec(reduction_factor=-2.0), "reduction_factor"),
        (lambda: AdapterSpec(non_linearity="swish"), "non_linearity"),
        (lambda: AdapterSpec(placement="diagonal"), "placement"),
        (lambda: AdapterSpec(input_modules=("intermediate",)), "input_modules"),
        (lambda: AdapterSpec(placement="sequential", input_modules=("intermediate",)), "input_modules"),
        (lambda: AdapterSpec(scaling="big"), "scaling"),
        (lambda: AdapterSpec(target_modules=()), "target_modules"),
        (lambda: PrefixSpec(num_virtual_tokens=0), "num_virtual_tokens"),
        (lambda: PrefixSpec(embedding_dim=0), "embedding_dim"),
        (lambda: PrefixSpec(hidden_dim=-1), "hidden_dim"),
        (lambda: PrefixSpec(target_modules=[""]), "target_modules"),
        (lambda: HeadSpec(num_labels=1), "num_labels"),
        (lambda: HeadSpec(num_labels=0), "num_labels"),
        (lambda: HeadSpec(task="regression"), "task"),
        (lambda: HeadSpec(pooling="max"), "pooling"),
        (lambda: HybridSpec(), "lora"),
        (lambda: HybridSpec(head=HeadSpec()), "lora"),
        (lambda: HybridSpec(lora=AdapterSpec()), "lora"),
        (lambda: HybridSpec(adapter="yes"), "adapter"),
        (lambda: HybridSpec(lora=LoRASpec(), head=None), "head"),
    ],
)
def test_invalid_field_raises_spec_error_naming_it(build, field):
    with pytest.raises(SpecError) as info:
        build()
    assert field in str(info.value)


def test_bottleneck_and_reduction_factor_together_is_an_error():
    with pytest.raises(SpecError) as info:
        AdapterSpec(bottleneck=4, reduction_factor=8)
    message = str(info.value)
    assert "bottleneck" in message and "reduction_factor" in message


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        LoRASpec(rank=0)


@pytest.mark.parametrize(
    ("spec", "field", "value"),
    [
        (LoRASpec(), "rank", 4),
        (AdapterSpec(), "placement", "parallel"),
        (PrefixSpec(), "gate", False),
        (HeadSpec(), "num_labels", 5),
        (HybridSpec.bh_peft(), "lora", None),
        (HybridSpec.bh_peft(), "head", HeadSpec(num_labels=3)),
    ],
)
def test_specs_are_frozen(spec, field, value):
    before = getattr(spec, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, field, value)
    assert getattr(spec, field) == before


def test_target_modules_are_normalised_to_tuples():
    assert LoRASpec(target_modules="query").target_modules == ("query",)
    assert LoRASpec(target_modules=["query", "value"]).target_modules == ("query", "value")
    spec = AdapterSpec(placement="parallel", target_modules=["a"], input_modules=["b"])
    assert spec.target_modules == ("a",) and spec.input_modules == ("b",)
    assert PrefixSpec(target_modules=["attn"]).target_modules == ("attn",)


def test_derived_quantities():
    assert LoRASpec(rank=4, alpha=8).scaling == pytest.approx(2.0)
    assert AdapterSpec(bottleneck=5).width(768) == 5
    assert AdapterSpec(reduction_factor=4).width(32) == 8
    assert AdapterSpec().width(64) == 4  # default reduction 16
    assert AdapterSpec(reduction_factor=1000).width(32) == 1  # never zero
    assert HeadSpec(num_labels=4).outputs == 4
    assert HeadSpec(num_labels=4, task="multiple_choice").outputs == 1


def test_components_in_injection_order():
    assert HybridSpec.bh_peft().components == ("lora", "adapter", "prefix")
    assert HybridSpec.mam().components == ("adapter", "prefix")
    assert HybridSpec(prefix=PrefixSpec(), lora=LoRASpec()).components == ("lora", "prefix")


def test_presets_match_their_description():
    assert HybridSpec.mam().adapter.placement == "parallel"
    assert HybridSpec.mam().adapter.scaling == 4.0
    unipelt = HybridSpec.unipelt()
    assert unipelt.lora.gate and unipelt.adapter.gate and unipelt.prefix.gate
    released = HybridSpec.paper_released()
    assert released.lora is None and released.prefix.gate is False and released.adapter.placement == "parallel"
    assert HybridSpec.lora_only().components == ("lora",)
    assert HybridSpec.adapter_only().components == ("adapter",)
    assert HybridSpec.prefix_only().components == ("prefix",)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_by_name_and_head(name):
    head = HeadSpec(num_labels=5, task="multiple_choice", pooling="cls")
    spec = HybridSpec.preset(name, head)
    assert spec == getattr(HybridSpec, PRESETS[name])(head)
    assert spec.head == head
    assert HybridSpec.preset(name).head == HeadSpec()


def test_unknown_preset_raises():
    with pytest.raises(SpecError, match="nonsense"):
        HybridSpec.preset("nonsense")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip_of_every_preset(name):
    spec = HybridSpec.preset(name, HeadSpec(num_labels=3, pooling="mean"))
    text = spec.to_json()
    assert json.loads(text)["kind"] == "hybrid"
    again = HybridSpec.from_json(text)
    assert again == spec
    assert again.to_json() == text


CUSTOM_SPECS = [
    HybridSpec(lora=LoRASpec(rank=2, alpha=3.5, dropout=0.1, target_modules=("query", r".*value"), gate=True)),
    HybridSpec(
        adapter=AdapterSpec(
            bottleneck=7,
            non_linearity="gelu",
            placement="parallel",
            scaling=2.0,
            target_modules=("output.dense",),
            input_modules=("intermediate",),
            gate=True,
        ),
        head=HeadSpec(num_labels=4, task="multiple_choice", pooling="last"),
    ),
    HybridSpec(
        lora=LoRASpec(target_modules=("c_attn",)),
        adapter=AdapterSpec(reduction_factor=2.5),
        prefix=PrefixSpec(num_virtual_tokens=3, reparameterize=True, embedding_dim=5, hidden_dim=6, target_modules=("attn",)),
    ),
]


@pytest.mark.parametrize("spec", CUSTOM_SPECS)
def test_json_round_trip_of_custom_specs(spec):
    again = HybridSpec.from_json(spec.to_json())
    assert again == spec
    for name in spec.components:
        component = getattr(again, name)
        assert type(component) is type(getattr(spec, name))
        for field in ("target_modules", "input_modules"):
            value = getattr(component, field, None)
            assert value is None or isinstance(value, tuple)


@pytest.mark.parametrize("spec", CUSTOM_SPECS)
def test_dict_round_trip_is_plain_data(spec):
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert HybridSpec.from_dict(data) == spec
    assert HybridSpec(**{k: v for k, v in data.items() if k != "kind"}) == spec


def test_component_from_dict_round_trip():
    for spec in (
        LoRASpec(rank=3, target_modules=("q",)),
        AdapterSpec(bottleneck=2),
        PrefixSpec(gate=False),
        HeadSpec(num_labels=7),
    ):
        assert type(spec).from_dict(spec.to_dict()) == spec


def test_from_dict_unknown_top_level_key_is_named():
    data = HybridSpec.bh_peft().to_dict()
    data["bogus_field"] = 1
    with pytest.raises(SpecError, match="bogus_field"):
        HybridSpec.from_dict(data)


def test_from_dict_unknown_nested_key_is_named():
    data = HybridSpec.lora_only().to_dict()
    data["lora"]["rnak"] = 4
    with pytest.raises(SpecError, match="rnak"):
        HybridSpec.from_dict(data)
    with pytest.raises(SpecError, match="colour"):
        HeadSpec.from_dict({"num_labels": 2, "colour": "red"})


def test_from_dict_invalid_value_is_a_spec_error():
    data = HybridSpec.lora_only().to_dict()
    data["lora"]["rank"] = 0
    with pytest.raises(SpecError, match="rank"):
        HybridSpec.from_dict(data)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2", "{'lora': {}}"])
def test_invalid_json_raises_spec_error(text):
    with pytest.raises(SpecError):
        HybridSpec.from_json(text)


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"lora"', "null"])
def test_json_that_is_not_an_object_raises_spec_error(text):
    with pytest.raises(SpecError):
        HybridSpec.from_json(text)
