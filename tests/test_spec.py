"""Specs: validation (each bad field named), immutability, JSON round trip; round trip and refusal as properties."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.spec import (
    NON_LINEARITIES,
    PLACEMENTS,
    POOLINGS,
    PRESETS,
    SCORINGS,
    TASKS,
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


# Properties -------------------------------------------------------------------------------------------------------------
NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)  # valid UTF-8, non-empty
TARGETS = st.none() | NAMES | st.lists(NAMES, min_size=1, max_size=3)
POSITIVE_INTS = st.integers(1, 10**6)
POSITIVE_NUMBERS = st.floats(min_value=1e-6, max_value=1e6) | st.integers(1, 10**6)
FINITE = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6)

LORA = st.fixed_dictionaries(
    {},
    optional={
        "rank": POSITIVE_INTS,
        "alpha": POSITIVE_NUMBERS,
        "dropout": st.floats(0, 1, exclude_max=True),
        "target_modules": TARGETS,
        "gate": st.booleans(),
    },
)
PREFIX = st.fixed_dictionaries(
    {},
    optional={
        "num_virtual_tokens": POSITIVE_INTS,
        "reparameterize": st.booleans(),
        "embedding_dim": POSITIVE_INTS,
        "hidden_dim": POSITIVE_INTS,
        "gate": st.booleans(),
        "target_modules": TARGETS,
    },
)


@st.composite
def adapters(draw):
    data = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "non_linearity": st.sampled_from(NON_LINEARITIES),
                "placement": st.sampled_from(PLACEMENTS),
                "scaling": FINITE,
                "target_modules": TARGETS,
                "gate": st.booleans(),
            },
        )
    )
    width = draw(st.sampled_from(["default", "bottleneck", "reduction_factor"]))
    if width != "default":
        data[width] = draw(POSITIVE_INTS if width == "bottleneck" else POSITIVE_NUMBERS)
    if data.get("placement") == "parallel" and draw(st.booleans()):
        data["input_modules"] = draw(TARGETS)
    return data


@st.composite
def heads(draw):
    data = draw(
        st.fixed_dictionaries(
            {},
            optional={"num_labels": st.integers(2, 10**6), "task": st.sampled_from(TASKS), "pooling": st.sampled_from(POOLINGS)},
        )
    )
    if data.get("task") == "multiple_choice" and draw(st.booleans()):
        data["scoring"] = draw(st.sampled_from(SCORINGS))
    return data


HYBRID = st.fixed_dictionaries(
    {}, optional={"lora": LORA, "adapter": adapters(), "prefix": PREFIX, "head": heads(), "kind": st.just("hybrid")}
).filter(lambda d: any(name in d for name in ("lora", "adapter", "prefix")))

VALID = {LoRASpec: LORA, AdapterSpec: adapters(), PrefixSpec: PREFIX, HeadSpec: heads(), HybridSpec: HYBRID}
TARGET_FIELDS = ("target_modules", "input_modules")


@pytest.mark.parametrize("cls", list(VALID), ids=lambda cls: cls.__name__)
@settings(max_examples=80, deadline=None, database=None)
@given(data=st.data())
def test_generated_valid_dicts_round_trip(cls, data):
    """``from_dict`` keeps every given value, and ``to_dict`` -> ``from_dict`` (and JSON) gives the same spec back."""
    raw = data.draw(VALID[cls])
    spec = cls.from_dict(raw)
    plain = spec.to_dict()
    assert json.loads(json.dumps(plain)) == plain, "to_dict is plain JSON data"
    assert cls.from_dict(plain) == spec and cls.from_dict(plain).to_dict() == plain
    if cls is HybridSpec:
        assert HybridSpec.from_json(spec.to_json()) == spec
        for name in ("lora", "adapter", "prefix"):
            assert (getattr(spec, name) is None) == (name not in raw)
    else:
        for key, value in raw.items():
            if key in TARGET_FIELDS and value is not None:
                value = [value] if isinstance(value, str) else list(value)
            assert plain[key] == value, key


# One bad value per field; each must be a SpecError naming that field.  (Values the specs still accept or mishandle
# are listed in test_values_the_specs_mishandle below.)
TEXT = st.text(max_size=8)
NOT_A_POSITIVE_INT = (
    st.integers(max_value=0) | st.floats() | TEXT | st.none() | st.booleans() | st.lists(st.integers(), max_size=2)
)
NOT_A_POSITIVE_NUMBER = (
    st.integers(max_value=0) | st.floats(max_value=0.0, allow_nan=False) | TEXT | st.none() | st.lists(st.integers(), max_size=2)
)
NOT_A_FRACTION = (
    st.floats().filter(lambda x: not 0 <= x < 1)
    | st.integers().filter(lambda x: x != 0)
    | TEXT
    | st.none()
    | st.lists(st.integers(), max_size=2)
)
BAD_TARGETS = (
    st.lists(NAMES, max_size=0)
    | st.just("")
    | st.lists(NAMES, max_size=2).flatmap(lambda good: st.permutations([*good, ""]))
    | st.lists(NAMES, max_size=2).flatmap(lambda good: st.permutations([*good, 3]))
    | st.lists(NAMES, max_size=2).flatmap(lambda good: st.permutations([*good, None]))
)


def _not_one_of(choices):
    return TEXT.filter(lambda x: x not in choices) | st.none() | st.integers() | st.lists(st.sampled_from(choices), max_size=2)


BAD_VALUES = {
    LoRASpec: {
        "rank": NOT_A_POSITIVE_INT,
        "alpha": NOT_A_POSITIVE_NUMBER,
        "dropout": NOT_A_FRACTION,
        "target_modules": BAD_TARGETS,
    },
    AdapterSpec: {
        "bottleneck": NOT_A_POSITIVE_INT.filter(lambda x: x is not None),
        "reduction_factor": NOT_A_POSITIVE_NUMBER.filter(lambda x: x is not None),
        "non_linearity": _not_one_of(NON_LINEARITIES),
        "placement": _not_one_of(PLACEMENTS),
        "scaling": TEXT | st.none() | st.lists(st.integers(), max_size=2),
        "target_modules": BAD_TARGETS,
    },
    PrefixSpec: {
        "num_virtual_tokens": NOT_A_POSITIVE_INT,
        "embedding_dim": NOT_A_POSITIVE_INT,
        "hidden_dim": NOT_A_POSITIVE_INT,
        "target_modules": BAD_TARGETS,
    },
    HeadSpec: {
        "num_labels": st.integers(max_value=1) | st.floats() | TEXT | st.none() | st.booleans(),
        "task": _not_one_of(TASKS),
        "pooling": _not_one_of(POOLINGS),
        "scoring": _not_one_of(SCORINGS),
    },
    HybridSpec: {
        "lora": st.integers() | TEXT | st.booleans() | st.lists(st.integers(), max_size=2),
        "adapter": st.integers() | TEXT | st.booleans() | st.lists(st.integers(), max_size=2),
        "prefix": st.integers() | TEXT | st.booleans() | st.lists(st.integers(), max_size=2),
        "head": st.none() | st.integers() | TEXT | st.booleans() | st.lists(st.integers(), max_size=2),
    },
}


@st.composite
def invalid_dicts(draw, cls):
    """``(data, name)``: a valid dict of ``cls`` with one field made invalid, or an unknown key added; ``name`` is
    the field or key the error must name."""
    data = draw(VALID[cls])
    if draw(st.integers(0, 4)) == 0:
        key = draw(NAMES.filter(lambda k: k not in {f.name for f in dataclasses.fields(cls)} | {"kind"}))
        data[key] = draw(st.integers() | TEXT | st.none())
        return data, repr(key)
    name = draw(st.sampled_from(sorted(BAD_VALUES[cls])))
    data[name] = draw(BAD_VALUES[cls][name])
    if cls is AdapterSpec and name in ("bottleneck", "reduction_factor"):
        data.pop("reduction_factor" if name == "bottleneck" else "bottleneck", None)  # not both: that is another error
    if cls is HeadSpec and name == "scoring":
        data["task"] = "multiple_choice"
    if cls is HeadSpec and name == "task" and data.get("scoring", "auto") != "auto":
        data["scoring"] = "auto"
    return data, name


@pytest.mark.parametrize("cls", list(VALID), ids=lambda cls: cls.__name__)
@settings(max_examples=80, deadline=None, database=None)
@given(data=st.data())
def test_generated_invalid_dicts_are_spec_errors_naming_the_field(cls, data):
    raw, name = data.draw(invalid_dicts(cls))
    with pytest.raises(SpecError) as info:
        cls.from_dict(raw)
    assert name in str(info.value)


@pytest.mark.parametrize("data", [None, [], "lora", 3, ["rank", 2], 1.5], ids=repr)
@pytest.mark.parametrize("cls", list(VALID), ids=lambda cls: cls.__name__)
def test_from_dict_of_a_non_mapping_is_a_spec_error(cls, data):
    with pytest.raises(SpecError, match="expects a mapping"):
        cls.from_dict(data)


ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
ALL_FIELDS = sorted({f.name for cls in VALID for f in dataclasses.fields(cls)})
BASE = {LoRASpec: {}, AdapterSpec: {}, PrefixSpec: {}, HeadSpec: {}, HybridSpec: {"lora": {}}}


@settings(max_examples=150, deadline=None, database=None, report_multiple_bugs=False)
@given(
    cls=st.sampled_from(list(VALID)),
    key=st.sampled_from(ALL_FIELDS) | st.text(max_size=4) | st.integers(),
    value=ANY,
    extra=st.dictionaries(st.text(max_size=3) | st.integers(), ANY, max_size=2),
)
@example(cls=LoRASpec, key="target_modules", value=5, extra={})
@example(cls=HeadSpec, key=1, value=0, extra={"x": 0})
def test_any_value_gives_a_spec_or_a_spec_error(cls, key, value, extra):
    """Whatever a model file's SPEC holds, from_dict returns a spec or raises SpecError: never another exception."""
    try:
        spec = cls.from_dict({**BASE[cls], key: value, **extra})
    except SpecError:
        return
    assert isinstance(spec, cls)


def _did_not_raise() -> type[BaseException]:
    return pytest.fail.Exception


@pytest.mark.parametrize(
    ("build", "field"),
    [
        pytest.param(lambda: LoRASpec(gate="no"), "gate", id="lora_gate_text"),
        pytest.param(lambda: PrefixSpec(reparameterize="false"), "reparameterize", id="prefix_reparameterize_text"),
        pytest.param(lambda: AdapterSpec(gate=None), "gate", id="adapter_gate_none"),
        pytest.param(lambda: LoRASpec(alpha=float("nan")), "alpha", id="lora_alpha_nan"),
        pytest.param(lambda: LoRASpec(alpha=float("inf")), "alpha", id="lora_alpha_inf"),
        pytest.param(lambda: AdapterSpec(scaling=float("nan")), "scaling", id="adapter_scaling_nan"),
        pytest.param(lambda: AdapterSpec(reduction_factor=float("nan")), "reduction_factor", id="adapter_reduction_nan"),
        pytest.param(lambda: LoRASpec(alpha=True), "alpha", id="lora_alpha_bool"),
        pytest.param(lambda: LoRASpec(dropout=False), "dropout", id="lora_dropout_bool"),
    ],
)
def test_values_the_specs_mishandle(build, field):
    with pytest.raises(SpecError) as info:
        build()
    assert field in str(info.value)


def test_bad_input_modules_error_names_input_modules():
    with pytest.raises(SpecError) as info:
        AdapterSpec(placement="parallel", input_modules=["intermediate", ""])
    assert "input_modules" in str(info.value)
