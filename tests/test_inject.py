"""Injection of LoRA, adapters and prefixes into tiny random Hugging Face models."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, ENCODERS, HIDDEN, KINDS, make_batch

from bhpeft_ppl import attention
from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.inject import HybridPEFT, inject
from bhpeft_ppl.spec import AdapterSpec, HeadSpec, HybridSpec, LoRASpec, PrefixSpec

ATOL = 1e-6
P = 3  # virtual tokens of the prefix tests

ZERO_INIT_SPECS = {
    "lora_only": HybridSpec.lora_only(),
    "adapter_only": HybridSpec.adapter_only(),
    "adapter_parallel": HybridSpec(adapter=AdapterSpec(placement="parallel")),
    "prefix_only": HybridSpec.prefix_only(),
    "bh_peft": HybridSpec.bh_peft(),
    "unipelt": HybridSpec.unipelt(),
    "mam": HybridSpec.mam(),
}
UNGATED_PREFIX = HybridSpec(prefix=PrefixSpec(num_virtual_tokens=P, gate=False))

# first-layer module paths of each kind
QUERY = {
    "bert": "encoder.layer.0.attention.self.query",
    "roberta": "encoder.layer.0.attention.self.query",
    "llama": "layers.0.self_attn.q_proj",
    "gpt2": "h.0.attn.c_attn",
}
ATTENTION = {
    "bert": "encoder.layer.0.attention.self",
    "roberta": "encoder.layer.0.attention.self",
    "llama": "layers.0.self_attn",
    "gpt2": "h.0.attn",
}
FFN_OUT = {
    "bert": "encoder.layer.0.output.dense",
    "roberta": "encoder.layer.0.output.dense",
    "llama": "layers.0.mlp",
    "gpt2": "h.0.mlp",
}
FFN_IN = {
    "bert": "encoder.layer.0.intermediate",
    "roberta": "encoder.layer.0.intermediate",
    "llama": "layers.0.mlp",
    "gpt2": "h.0.mlp",
}


def hidden(model, batch, **extra):
    with torch.no_grad():
        return model(**batch, **extra).last_hidden_state


def initial_weights(peft: HybridPEFT, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: site.initial_value(generator) for name, site in peft.sites.items()}


def random_weights(peft: HybridPEFT, seed: int = 1, std: float = 0.5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(site.shape, generator=generator) * std for name, site in peft.sites.items()}


def bound_hidden(peft, weights, batch, **extra):
    with torch.no_grad(), peft.bind(weights):
        return peft.base(**batch, **extra).last_hidden_state


def real(out, mask):
    """Rows of ``out [B, T, d]`` at the attended positions, ``[n, d]``."""
    return out[mask.bool()]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def prefixed_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if attention.PREFIX_ATTRIBUTE in m.__dict__]


# Zero-init equivalence ---------------------------------------------------------
@pytest.mark.parametrize("spec_name", list(ZERO_INIT_SPECS))
@pytest.mark.parametrize("kind", KINDS)
def test_initial_values_reproduce_the_base_model(tiny_base, padded_batch, kind, spec_name):
    base = tiny_base(kind)
    assert (padded_batch["attention_mask"] == 0).any()
    reference = hidden(base, padded_batch)
    peft = inject(base, ZERO_INIT_SPECS[spec_name])
    assert torch.allclose(bound_hidden(peft, initial_weights(peft), padded_batch), reference, atol=ATOL)
    # unbound, the injected model is the base model too
    assert torch.allclose(hidden(base, padded_batch), reference, atol=ATOL)
    # and the layers are live: other weights change the output at attended positions
    changed = bound_hidden(peft, random_weights(peft), padded_batch)
    mask = padded_batch["attention_mask"]
    assert (real(changed, mask) - real(reference, mask)).abs().max() > 1e-3


# Frozen base, state dict, sites --------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_base_is_frozen_and_its_state_dict_untouched(tiny_base, kind):
    base = tiny_base(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft = inject(base, HybridSpec.bh_peft())
    assert all(not p.requires_grad for p in base.parameters())
    assert all(not p.requires_grad for p in peft.parameters())
    assert list(base.state_dict()) == list(before)
    ejected = peft.eject()
    assert ejected is base
    after = base.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


EXPECTED_SITES = {
    "bert": [
        "encoder.layer.0.attention.self.query.lora_A",
        "encoder.layer.0.attention.self.query.lora_B",
        "encoder.layer.1.attention.self.value.lora_A",
        "encoder.layer.0.output.dense.adapter_down",
        "encoder.layer.1.output.dense.adapter_up_bias",
        "encoder.layer.0.attention.self.prefix_key",
        "encoder.layer.1.attention.self.prefix_value",
        "encoder.layer.1.attention.self.prefix_gate",
        "classifier.weight",
        "classifier.bias",
    ],
    "llama": [
        "layers.0.self_attn.q_proj.lora_A",
        "layers.1.self_attn.v_proj.lora_B",
        "layers.0.mlp.adapter_down",
        "layers.1.self_attn.prefix_key",
        "classifier.weight",
    ],
    "gpt2": [
        "h.0.attn.c_attn.lora_A",
        "h.1.attn.c_attn.lora_B",
        "h.0.mlp.adapter_up",
        "h.1.attn.prefix_value",
        "classifier.bias",
    ],
}
EXPECTED_SITES["roberta"] = EXPECTED_SITES["bert"]
# lora targets per layer, with 2 layers: lora 2 * targets * 2, adapter 4 * 2, prefix 3 * 2, head 2
EXPECTED_COUNT = {"bert": 8 + 8 + 6 + 2, "roberta": 8 + 8 + 6 + 2, "llama": 8 + 8 + 6 + 2, "gpt2": 4 + 8 + 6 + 2}


@pytest.mark.parametrize("kind", KINDS)
def test_site_names_unique_and_expected(tiny_base, kind):
    base = tiny_base(kind)
    peft = inject(base, HybridSpec.bh_peft(HeadSpec(num_labels=3)))
    declared = [site.name for layer in peft.peft_layers for site in layer.sites]
    assert len(declared) == len(set(declared)) == len(peft.sites)
    assert len(peft.sites) == EXPECTED_COUNT[kind]
    for name in EXPECTED_SITES[kind]:
        assert name in peft.sites
    modules = dict(base.named_modules())
    for name, site in peft.sites.items():
        assert site.name == name
        path = name.rsplit(".", 1)[0]
        if site.component != "head":
            assert path in modules, name
    assert peft.sites["classifier.weight"].shape == (3, HIDDEN)
    assert peft.sites["classifier.bias"].shape == (3,)
    assert {s.component for s in peft.sites.values()} == {"lora", "adapter", "prefix", "head"}
    assert peft.is_decoder is (kind in DECODERS)
    assert peft.hidden_size == HIDDEN


def test_gpt2_conv1d_lora_shapes(tiny_base):
    peft = inject(tiny_base("gpt2"), HybridSpec(lora=LoRASpec(rank=4)))
    for layer in (0, 1):
        assert peft.sites[f"h.{layer}.attn.c_attn.lora_A"].shape == (4, 32)
        assert peft.sites[f"h.{layer}.attn.c_attn.lora_B"].shape == (96, 4)


def test_llama_gqa_prefix_shapes(tiny_base):
    peft = inject(tiny_base("llama"), HybridSpec(prefix=PrefixSpec(num_virtual_tokens=P)))
    # 2 key/value heads of width 8; one gate per query head (4)
    assert peft.sites["layers.0.self_attn.prefix_key"].shape == (P, 16)
    assert peft.sites["layers.0.self_attn.prefix_value"].shape == (P, 16)
    assert peft.sites["layers.0.self_attn.prefix_gate"].shape == (4,)


# The math of each layer, on the modules themselves --------------------------------
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_update(tiny_base, kind, gate):
    base = tiny_base(kind)
    spec = LoRASpec(rank=2, alpha=6.0, gate=gate)
    peft = inject(base, HybridSpec(lora=spec))
    module = dict(base.named_modules())[QUERY[kind]]
    x = torch.randn(2, 5, HIDDEN)
    weights = random_weights(peft)
    with torch.no_grad():
        plain = module(x)
        with peft.bind(weights):
            adapted = module(x)
    a, b = weights[f"{QUERY[kind]}.lora_A"], weights[f"{QUERY[kind]}.lora_B"]
    expected = 3.0 * (x @ a.T @ b.T)
    if gate:
        g = torch.sigmoid(x @ weights[f"{QUERY[kind]}.gate_weight"] + weights[f"{QUERY[kind]}.gate_bias"])
        expected = expected * g.unsqueeze(-1)
    assert plain.shape == adapted.shape == expected.shape
    assert torch.allclose(adapted - plain, expected, atol=1e-5)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_update(tiny_base, padded_batch, kind, placement):
    base = tiny_base(kind)
    spec = AdapterSpec(bottleneck=3, non_linearity="tanh", placement=placement, scaling=2.0, gate=True)
    peft = inject(base, HybridSpec(adapter=spec))
    modules = dict(base.named_modules())
    seen = {}
    handles = [
        modules[FFN_IN[kind]].register_forward_pre_hook(lambda m, i: seen.setdefault("input", i[0]), prepend=True),
        modules[FFN_OUT[kind]].register_forward_hook(lambda m, i, o: seen.setdefault("base", o), prepend=True),
        modules[FFN_OUT[kind]].register_forward_hook(lambda m, i, o: seen.setdefault("final", o)),
    ]
    weights = random_weights(peft)
    try:
        bound_hidden(peft, weights, padded_batch)
    finally:
        for h in handles:
            h.remove()
    z = seen["input"] if placement == "parallel" else seen["base"]
    path = FFN_OUT[kind]
    down = torch.tanh(z @ weights[f"{path}.adapter_down"].T + weights[f"{path}.adapter_down_bias"])
    delta = 2.0 * (down @ weights[f"{path}.adapter_up"].T + weights[f"{path}.adapter_up_bias"])
    delta = delta * torch.sigmoid(z @ weights[f"{path}.gate_weight"] + weights[f"{path}.gate_bias"]).unsqueeze(-1)
    assert torch.allclose(seen["final"] - seen["base"], delta, atol=1e-5)
    assert peft.sites[f"{path}.adapter_down"].shape == (3, z.shape[-1])
    assert peft.sites[f"{path}.adapter_up"].shape == (seen["base"].shape[-1], 3)


# Eject ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_eject_restores_base_and_allows_reinjection(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    reference = hidden(base, padded_batch)
    hooks = hook_count(base)
    attn = base.config._attn_implementation
    peft = inject(base, HybridSpec.bh_peft())
    assert hook_count(base) > hooks
    assert prefixed_modules(base)
    weights = random_weights(peft)
    assert not torch.allclose(bound_hidden(peft, weights, padded_batch), reference, atol=1e-3)

    peft.eject()
    assert hook_count(base) == hooks
    assert prefixed_modules(base) == []
    assert base.config._attn_implementation == attn
    assert torch.equal(hidden(base, padded_batch), reference)
    # weights bound to the ejected layers no longer reach the base model
    assert torch.equal(bound_hidden(peft, weights, padded_batch), reference)

    again = inject(base, HybridSpec.bh_peft())
    assert list(again.sites) == list(peft.sites)
    assert torch.allclose(bound_hidden(again, initial_weights(again), padded_batch), reference, atol=ATOL)
    changed = bound_hidden(again, weights, padded_batch)
    assert not torch.allclose(changed, reference, atol=1e-3)
    again.eject()


@pytest.mark.parametrize("kind", KINDS)
def test_reinjection_gives_the_same_function(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    first = inject(base, HybridSpec.bh_peft())
    weights = random_weights(first)
    out_first = bound_hidden(first, weights, padded_batch)
    first.eject()
    second = inject(base, HybridSpec.bh_peft())
    assert torch.allclose(bound_hidden(second, weights, padded_batch), out_first, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_inject_twice_without_eject_raises(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    peft = inject(base, HybridSpec.lora_only())
    hooks = hook_count(base)
    with pytest.raises(SpecError, match="eject"):
        inject(base, HybridSpec.prefix_only())
    # the first injection is left intact
    assert hook_count(base) == hooks
    weights = random_weights(peft)
    assert not torch.allclose(bound_hidden(peft, weights, padded_batch), hidden(base, padded_batch), atol=1e-3)


# Prefix-tuning -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_ungated_prefix_changes_outputs(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    reference = hidden(base, padded_batch)
    peft = inject(base, UNGATED_PREFIX)
    assert not any(name.endswith("prefix_gate") for name in peft.sites)
    weights = initial_weights(peft)
    assert all(w.abs().sum() > 0 for n, w in weights.items() if "prefix_" in n)
    out = bound_hidden(peft, weights, padded_batch)
    mask = padded_batch["attention_mask"]
    assert torch.isfinite(out).all()
    assert (real(out, mask) - real(reference, mask)).abs().max() > 1e-3


def _check_padding(peft, weights, batch, side, use_positions):
    mask = batch["attention_mask"]
    extra = {}
    if use_positions:
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    out = bound_hidden(peft, weights, batch, **extra)
    assert torch.isfinite(real(out, mask)).all()
    for row in range(mask.shape[0]):
        keep = mask[row].bool()
        alone = {
            "input_ids": batch["input_ids"][row, keep][None],
            "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        }
        solo = bound_hidden(peft, weights, alone)[0]
        assert torch.allclose(out[row, keep], solo, atol=1e-5), f"row {row} ({side} padding)"


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_right_padding(tiny_base, kind):
    peft = inject(tiny_base(kind), UNGATED_PREFIX)
    _check_padding(peft, initial_weights(peft), make_batch([6, 4, 1], side="right"), "right", use_positions=False)


@pytest.mark.parametrize("kind", DECODERS)
def test_prefix_left_padding(tiny_base, kind):
    peft = inject(tiny_base(kind), UNGATED_PREFIX)
    _check_padding(peft, initial_weights(peft), make_batch([6, 4, 1], side="left"), "left", use_positions=True)


@pytest.mark.parametrize(("kind", "side"), [(k, "right") for k in KINDS] + [(k, "left") for k in DECODERS])
def test_full_hybrid_padding_invariance(tiny_base, kind, side):
    """Every component active (gated prefix with nonzero gates): padding does not leak into real positions."""
    peft = inject(tiny_base(kind), HybridSpec.unipelt(HeadSpec(num_labels=3)))
    _check_padding(peft, random_weights(peft), make_batch([6, 4, 1], side=side), side, use_positions=side == "left")


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("kind", DECODERS)
def test_prefix_keeps_decoders_causal(tiny_base, kind, with_mask):
    peft = inject(tiny_base(kind), UNGATED_PREFIX)
    weights = initial_weights(peft)
    batch = make_batch([6])
    edited = {k: v.clone() for k, v in batch.items()}
    edited["input_ids"][0, 4] = (batch["input_ids"][0, 4] + 7) % 98 + 2
    if not with_mask:
        batch, edited = {"input_ids": batch["input_ids"]}, {"input_ids": edited["input_ids"]}
    out, out_edited = bound_hidden(peft, weights, batch), bound_hidden(peft, weights, edited)
    assert torch.allclose(out[:, :4], out_edited[:, :4], atol=ATOL)
    assert (out[:, 4:] - out_edited[:, 4:]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ENCODERS)
def test_prefix_encoder_is_bidirectional(tiny_base, kind):
    peft = inject(tiny_base(kind), UNGATED_PREFIX)
    weights = initial_weights(peft)
    batch = make_batch([6])
    edited = {k: v.clone() for k, v in batch.items()}
    edited["input_ids"][0, 4] = (batch["input_ids"][0, 4] + 7) % 98 + 2
    out, out_edited = bound_hidden(peft, weights, batch), bound_hidden(peft, weights, edited)
    assert (out[:, :4] - out_edited[:, :4]).abs().max() > 1e-4


def _grad_weights(peft, seed=0):
    return {n: w.requires_grad_() for n, w in initial_weights(peft, seed).items()}


def _backward(peft, weights, batch):
    """Backward of a random projection of the hidden states (a plain sum is constant under a final LayerNorm)."""
    with peft.bind(weights):
        out = peft.base(**batch).last_hidden_state
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        (out * probe).sum().backward()
    return out.detach()


def _assert_grad(weights, name):
    grad = weights[name].grad
    assert grad is not None, name
    assert torch.isfinite(grad).all(), name
    assert grad.abs().max() > 1e-4, name


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_prefix_keys_and_values(tiny_base, padded_batch, kind):
    peft = inject(tiny_base(kind), UNGATED_PREFIX)
    weights = _grad_weights(peft)
    _backward(peft, weights, padded_batch)
    prefix_sites = [n for n in peft.sites if n.endswith(("prefix_key", "prefix_value"))]
    assert len(prefix_sites) == 4
    for name in prefix_sites:
        _assert_grad(weights, name)
    assert all(p.grad is None for p in peft.base.parameters())


@pytest.mark.parametrize("spec_name", ["bh_peft", "unipelt", "mam"])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_initialised_weights_get_gradients(tiny_base, padded_batch, kind, spec_name):
    """At the initial values (the base model), the zero-initialised weights must still be trainable."""
    peft = inject(tiny_base(kind), ZERO_INIT_SPECS[spec_name])
    weights = _grad_weights(peft)
    _backward(peft, weights, padded_batch)
    zero_init = [n for n in peft.sites if n.endswith(("lora_B", "adapter_up", "adapter_up_bias", "prefix_gate"))]
    assert len(zero_init) >= 6
    for name in zero_init:
        _assert_grad(weights, name)


@pytest.mark.parametrize("kind", KINDS)
def test_reparameterised_prefix(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    reference = hidden(base, padded_batch)
    spec = HybridSpec(prefix=PrefixSpec(num_virtual_tokens=P, reparameterize=True, embedding_dim=8, hidden_dim=16, gate=False))
    peft = inject(base, spec)
    encoder_sites = ["embedding", "mlp_in", "mlp_in_bias", "mlp_out", "mlp_out_bias"]
    for weight in encoder_sites:
        assert f"prefix_encoder.{weight}" in peft.sites
    assert not any(n.endswith(("prefix_key", "prefix_value")) for n in peft.sites)
    kv_width = 16 if kind == "llama" else HIDDEN
    assert peft.sites["prefix_encoder.embedding"].shape == (P, 8)
    assert peft.sites["prefix_encoder.mlp_out"].shape == (2 * 2 * kv_width, 16)

    weights = _grad_weights(peft)
    out = _backward(peft, weights, padded_batch)
    mask = padded_batch["attention_mask"]
    assert (real(out, mask) - real(reference, mask)).abs().max() > 1e-3
    for weight in encoder_sites:
        _assert_grad(weights, f"prefix_encoder.{weight}")


@pytest.mark.parametrize("kind", KINDS)
def test_gate_of_one_equals_ungated_prefix(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    ungated = inject(base, UNGATED_PREFIX)
    weights = initial_weights(ungated)
    out_ungated = bound_hidden(ungated, weights, padded_batch)
    ungated.eject()

    gated = inject(base, HybridSpec(prefix=PrefixSpec(num_virtual_tokens=P, gate=True)))
    gates = [n for n in gated.sites if n.endswith("prefix_gate")]
    assert len(gates) == 2
    gated_weights = dict(weights)
    for name in gates:
        gated_weights[name] = torch.ones(gated.sites[name].shape)
    out_gated = bound_hidden(gated, gated_weights, padded_batch)
    assert torch.allclose(out_gated, out_ungated, atol=1e-5)
    # and a gate of zero is the base model
    for name in gates:
        gated_weights[name] = torch.zeros(gated.sites[name].shape)
    assert torch.allclose(bound_hidden(gated, gated_weights, padded_batch), hidden(base, padded_batch), atol=ATOL)


def test_prefix_target_modules_select_layers(tiny_base, padded_batch):
    base = tiny_base("bert")
    peft = inject(base, HybridSpec(prefix=PrefixSpec(num_virtual_tokens=P, target_modules=(r".*layer\.1\..*",))))
    names = [n for n in peft.sites if "prefix" in n]
    assert names and all(n.startswith("encoder.layer.1.") for n in names)
    assert prefixed_modules(base) == ["encoder.layer.1.attention.self"]


# Target errors -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lora_target_matching_nothing_names_the_pattern(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    reference = hidden(base, padded_batch)
    hooks = hook_count(base)
    with pytest.raises(SpecError, match="nonexistent"):
        inject(base, HybridSpec(lora=LoRASpec(target_modules=("nonexistent",))))
    # a failed injection leaves the base model as it was, and injectable
    assert hook_count(base) == hooks
    assert torch.equal(hidden(base, padded_batch), reference)
    inject(base, HybridSpec.lora_only()).eject()


def test_lora_on_a_non_linear_module_raises(tiny_base):
    base = tiny_base("bert")
    with pytest.raises(SpecError, match="intermediate") as info:
        inject(base, HybridSpec(lora=LoRASpec(target_modules=("intermediate",))))
    assert "BertIntermediate" in str(info.value)
    inject(base, HybridSpec.lora_only())


@pytest.mark.parametrize("kind", KINDS)
def test_failure_after_attaching_layers_cleans_up(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    reference = hidden(base, padded_batch)
    hooks = hook_count(base)
    attn = base.config._attn_implementation
    spec = HybridSpec(lora=LoRASpec(), adapter=AdapterSpec(), prefix=PrefixSpec(target_modules=("no_such_attention",)))
    with pytest.raises(SpecError, match="no_such_attention"):
        inject(base, spec)
    assert hook_count(base) == hooks
    assert prefixed_modules(base) == []
    assert base.config._attn_implementation == attn
    assert torch.equal(hidden(base, padded_batch), reference)
    inject(base, HybridSpec.bh_peft())


@pytest.mark.parametrize(
    ("spec", "owner"),
    [
        (HybridSpec.lora_only(), "LoRASpec"),
        (HybridSpec.adapter_only(), "AdapterSpec"),
        (HybridSpec(adapter=AdapterSpec(placement="parallel")), "AdapterSpec"),
        (HybridSpec.bh_peft(), "Spec"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_unknown_model_type_needs_explicit_targets(tiny_base, kind, spec, owner):
    base = tiny_base(kind)
    base.config.model_type = "mystery"
    with pytest.raises(SpecError, match="mystery") as info:
        inject(base, spec)
    assert owner in str(info.value) and "target_modules" in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_model_type_works_with_explicit_targets_and_prefix(tiny_base, padded_batch, kind):
    base = tiny_base(kind)
    reference = hidden(base, padded_batch)
    base.config.model_type = "mystery"
    spec = HybridSpec(
        lora=LoRASpec(target_modules=(QUERY[kind],)),
        adapter=AdapterSpec(target_modules=(FFN_OUT[kind],)),
        prefix=PrefixSpec(num_virtual_tokens=P),
    )
    peft = inject(base, spec)
    assert f"{QUERY[kind]}.lora_A" in peft.sites and f"{FFN_OUT[kind]}.adapter_up" in peft.sites
    assert torch.allclose(bound_hidden(peft, initial_weights(peft), padded_batch), reference, atol=ATOL)


def test_inject_rejects_wrong_arguments(tiny_base):
    with pytest.raises(SpecError, match="HybridSpec"):
        inject(tiny_base("bert"), {"lora": {}})
    with pytest.raises(SpecError, match="PreTrainedModel"):
        inject(torch.nn.Linear(3, 3), HybridSpec.lora_only())


def test_bind_requires_every_site(tiny_base, padded_batch):
    peft = inject(tiny_base("bert"), HybridSpec.lora_only())
    weights = initial_weights(peft)
    del weights["classifier.bias"]
    with pytest.raises(KeyError, match=r"classifier\.bias"):
        with peft.bind(weights):
            pass
    assert not any(layer.bound for layer in peft.peft_layers)


def test_bind_is_undone_after_the_block(tiny_base, padded_batch):
    base = tiny_base("gpt2")
    reference = hidden(base, padded_batch)
    peft = inject(base, HybridSpec.bh_peft())
    with pytest.raises(RuntimeError, match="boom"):
        with peft.bind(random_weights(peft)):
            assert all(layer.bound for layer in peft.peft_layers)
            raise RuntimeError("boom")
    assert not any(layer.bound for layer in peft.peft_layers)
    assert torch.allclose(hidden(base, padded_batch), reference, atol=ATOL)


def test_head_forward_shapes(tiny_base, padded_batch):
    peft = inject(tiny_base("bert"), HybridSpec.lora_only(HeadSpec(num_labels=4)))
    logits = peft(padded_batch, initial_weights(peft))
    assert logits.shape == (3, 4)
    assert torch.isfinite(logits).all()
