"""Site naming and the shared exact / '.'-suffix / full-regex matcher."""

from __future__ import annotations

import pytest

from bhpeft_ppl.naming import hyper_site_name, matches, matches_any, resolve, site_name


def test_site_name_joins_with_a_dot():
    assert site_name("encoder.layer.0.attention.self.query", "lora_A") == "encoder.layer.0.attention.self.query.lora_A"
    assert site_name("classifier", "weight") == "classifier.weight"


def test_site_name_of_root_module_is_the_weight():
    assert site_name("", "weight") == "weight"


def test_hyper_site_name_hangs_under_the_site():
    site = site_name("h.0.attn.c_attn", "lora_A")
    assert hyper_site_name(site, "horseshoe_tau") == "h.0.attn.c_attn.lora_A_horseshoe_tau"
    assert hyper_site_name(site, "horseshoe_tau").startswith(site + "_")


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        # exact
        ("classifier.bias", "classifier.bias", True),
        ("query", "query", True),
        # '.'-suffix
        ("encoder.layer.0.attention.self.query", "query", True),
        ("encoder.layer.0.attention.self.query", "self.query", True),
        ("encoder.layer.0.attention.self.query", "attention.self.query", True),
        ("encoder.layer.0.attention.self.query.lora_A", "lora_A", True),
        # a suffix must start at a '.' boundary
        ("encoder.layer.0.attention.self.subquery", "query", False),
        ("subquery", "query", False),
        ("encoder.layer.0.attention.self.query", "f.query", False),
        # a prefix or an infix is not a match
        ("encoder.layer.0.attention.self.query", "encoder", False),
        ("encoder.layer.0.attention.self.query", "attention", False),
        ("encoder.layer.0.attention.self.query.lora_A", "query", False),
        ("queryx", "query", False),
        # regex, which must match the whole name
        ("encoder.layer.3.output.dense", r".*layer\.\d+\.output\.dense", True),
        ("encoder.layer.3.attention.output.dense", r".*layer\.\d+\.output\.dense", False),
        ("encoder.layer.3.output.dense.adapter_up", r".*layer\.\d+\.output\.dense", False),
        ("layers.12.self_attn.q_proj", r"layers\.1\d?\.self_attn\.q_proj", True),
        ("layers.2.self_attn.q_proj", r"layers\.1\d?\.self_attn\.q_proj", False),
        ("h.0.attn.c_attn.lora_A", r".*lora_[AB]", True),
        ("h.0.attn.c_attn.lora_C", r".*lora_[AB]", False),
        ("a.subquery", r".*query", True),
        ("query_proj", "query", False),
    ],
)
def test_matches(name, pattern, expected):
    assert matches(name, pattern) is expected


@pytest.mark.parametrize("pattern", ["[", "(unclosed", "*star", "a{2,1}"])
def test_invalid_regex_does_not_crash(pattern):
    assert matches("encoder.layer.0.attention.self.query", pattern) is False
    # exact and suffix matching still work for such a pattern
    assert matches(pattern, pattern) is True
    assert matches("module." + pattern, pattern) is True


def test_matches_any():
    name = "encoder.layer.1.attention.self.value"
    assert matches_any(name, ["query", "value"])
    assert not matches_any(name, ["query", "key"])
    assert not matches_any(name, [])
    assert matches_any(name, iter(["[", r".*\.value"]))


def test_resolve_precedence_pattern_then_component_then_default():
    name = "encoder.layer.0.attention.self.query.lora_A"
    patterns = {"lora_A": "pattern"}
    components = {"lora": "component"}
    assert resolve(name, "lora", patterns, components, "default") == "pattern"
    assert resolve(name, "lora", {}, components, "default") == "component"
    assert resolve(name, "lora", {"lora_B": "other"}, components, "default") == "component"
    assert resolve(name, "adapter", {"lora_B": "other"}, components, "default") == "default"
    assert resolve(name, "adapter", {}, {}, "default") == "default"


def test_resolve_first_matching_pattern_wins():
    name = "encoder.layer.0.attention.self.query.lora_A"
    assert resolve(name, "lora", {"nomatch": 0, "lora_A": 1, r".*lora_.*": 2}, {}, -1) == 1
    assert resolve(name, "lora", {r".*lora_.*": 2, "lora_A": 1}, {}, -1) == 2


def test_resolve_returns_falsy_values_from_patterns_and_components():
    name = "classifier.bias"
    assert resolve(name, "head", {"bias": 0}, {"head": 5}, 9) == 0
    assert resolve(name, "head", {}, {"head": None}, 9) is None
