"""The one-pass gated prefix attention equals the two-pass definition, in values and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, KINDS, make_batch
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from bhpeft_ppl import attention
from bhpeft_ppl.inject import inject
from bhpeft_ppl.spec import HeadSpec, HybridSpec

B, H, Q, D, P = 3, 4, 7, 8, 5


def two_pass(query, key, value, prefix_key, prefix_value, mask, gate):
    """The definition :math:`o = o_{base} + g (o_P - o_{base})` with two SDPA passes, ``[B, q, H, d]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    prefix_key, prefix_value = repeat_kv(prefix_key, groups), repeat_kv(prefix_value, groups)
    prefixed = F.scaled_dot_product_attention(
        query, torch.cat([prefix_key, key], 2), torch.cat([prefix_value, value], 2), attn_mask=mask
    )  # [B, H, q, d]
    base_mask = None if mask is None else mask[..., P:]
    base = F.scaled_dot_product_attention(query, key, value, attn_mask=base_mask)  # [B, H, q, d]
    out = base + gate[:, None, None] * (prefixed - base)
    return out.transpose(1, 2)


def inputs(kv_heads=H, seed=0, prefix_scale=1.0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    return {
        "query": randn(B, H, Q, D),
        "key": randn(B, kv_heads, Q, D),
        "value": randn(B, kv_heads, Q, D),
        "prefix_key": randn(B, kv_heads, P, D, scale=prefix_scale),
        "prefix_value": randn(B, kv_heads, P, D),
        "gate": torch.rand(H, generator=generator).requires_grad_(),
    }


def padding_mask(causal=False, left=False):
    """Bool mask ``[B, 1, q, P + kv]``: rows of lengths 7, 4, 1, prefix columns open."""
    real = torch.zeros(B, Q, dtype=torch.bool)
    for row, n in enumerate([7, 4, 1]):
        if left:
            real[row, Q - n :] = True
        else:
            real[row, :n] = True
    keys = real[:, None, None, :].expand(B, 1, Q, Q)  # [B, 1, q, kv]
    if causal:
        keys = keys & torch.ones(Q, Q, dtype=torch.bool).tril()
    return torch.cat([torch.ones(B, 1, Q, P, dtype=torch.bool), keys], -1)


def run_both(tensors, mask):
    mixed = attention.mixed_prefix_attention(
        tensors["query"],
        tensors["key"],
        tensors["value"],
        tensors["prefix_key"],
        tensors["prefix_value"],
        mask,
        tensors["gate"],
        False,
    )
    reference = two_pass(
        tensors["query"], tensors["key"], tensors["value"], tensors["prefix_key"], tensors["prefix_value"], mask, tensors["gate"]
    )
    return mixed, reference


def gradients(out, tensors, probe):
    return torch.autograd.grad((out * probe).sum(), list(tensors.values()))


MASKS = {
    "none": lambda: None,
    "right_padding": lambda: padding_mask(),
    "causal_left_padding": lambda: padding_mask(causal=True, left=True),  # rows with no key at all
    "additive": lambda: torch.zeros(B, 1, Q, P + Q).masked_fill(~padding_mask(), float("-inf")),
}


@pytest.mark.parametrize("kv_heads", [H, 2])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_one_pass_equals_two_passes(mask_name, kv_heads):
    tensors = inputs(kv_heads)
    mixed, reference = run_both(tensors, MASKS[mask_name]())
    assert mixed.shape == (B, Q, H, D)
    assert torch.allclose(mixed, reference, atol=1e-5)
    probe = torch.randn(mixed.shape, generator=torch.Generator().manual_seed(1))
    for got, want, name in zip(gradients(mixed, tensors, probe), gradients(reference, tensors, probe), tensors, strict=True):
        assert torch.allclose(got, want, atol=1e-4), name
        assert got.abs().max() > 0, name


def test_rows_without_keys_attend_to_the_prefix_alone():
    """A causal, left-padded row with no real key: the base output is zero (SDPA's convention) and
    the gated output is :math:`g\\,\\bar o_{pre}`, finite, in values and gradients."""
    tensors = inputs()
    mask = padding_mask(causal=True, left=True)
    assert not mask[2, 0, 0, P:].any()
    mixed, reference = run_both(tensors, mask)
    assert torch.isfinite(mixed).all()
    assert torch.allclose(mixed[2, 0], reference[2, 0], atol=1e-6)
    grads = gradients(mixed, tensors, torch.ones_like(mixed))
    assert all(torch.isfinite(g).all() for g in grads)


def test_underflowing_base_mass_falls_back_to_two_passes():
    """When the prefix out-scores every key by far, the one-pass form would lose the base term's
    precision: it declines, and the layer runs the exact two passes."""
    tensors = inputs(prefix_scale=1.0)
    with torch.no_grad():
        # every prefix key along its query: scores of ~ |q|^2 * 400 / sqrt(d), far above the keys'
        tensors["prefix_key"].copy_(tensors["query"][:, :, :1].expand(B, H, P, D) * 400)
    assert attention.mixed_prefix_attention(**{k: v for k, v in tensors.items()}, mask=None, training=False) is None


@pytest.mark.parametrize("gap", [10.0, 30.0, 40.0, 46.0, 56.0, 66.0, 80.0])
def test_gradients_stay_finite_as_the_prefix_takes_all_the_mass(gap):
    """The prefix out-scores every key by about ``gap`` nats (base mass about e^-gap): the layer
    (the one pass, or the two passes it falls back to) has the two-pass gradients, all finite.
    With the fallback below 1e-30, gaps of 46 to 68 nats gave non-finite gradients."""
    generator = torch.Generator().manual_seed(0)
    query = torch.ones(B, H, Q, D, requires_grad=True)
    key = (torch.randn(B, H, Q, D, generator=generator) * 0.1).requires_grad_()
    value = torch.randn(B, H, Q, D, generator=generator, requires_grad=True)
    prefix_key = torch.full((B, H, P, D), gap / D**0.5, requires_grad=True)  # scores of `gap` against about 0
    prefix_value = torch.randn(B, H, P, D, generator=generator, requires_grad=True)
    gate = torch.full((H,), 0.5, requires_grad=True)
    tensors = [query, key, value, prefix_key, prefix_value, gate]
    mixed = attention.mixed_prefix_attention(query, key, value, prefix_key, prefix_value, None, gate, False)
    reference = two_pass(query, key, value, prefix_key, prefix_value, None, gate)
    expected = torch.autograd.grad(reference.sum(), tensors, retain_graph=True)
    out = reference if mixed is None else mixed  # what the layer returns
    assert (mixed is None) == (gap > 41.5)  # the fallback starts at a base mass of 1e-18
    for got, want in zip(torch.autograd.grad(out.sum(), tensors), expected, strict=True):
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attention_dropout_is_unbiased():
    """Dropout on the one softmax: each draw differs, their mean tends to the output without dropout."""
    torch.manual_seed(0)
    tensors = {k: v.detach() for k, v in inputs().items()}
    plain = attention.mixed_prefix_attention(**tensors, mask=None, training=False, dropout=0.3)
    draws = torch.stack([attention.mixed_prefix_attention(**tensors, mask=None, training=True, dropout=0.3) for _ in range(4000)])
    assert not torch.allclose(draws[0], draws[1])
    assert (draws.mean(0) - plain).abs().max() < 0.05
    assert (draws[0] - plain).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix_scale", [1.0, 6.0])
def test_half_precision_stays_close(dtype, prefix_scale):
    """In half precision too, also where large prefix keys leave the base little mass
    (its unnormalised probabilities then underflow float16, so they are normalised first)."""
    tensors = {k: v.detach() for k, v in inputs(prefix_scale=prefix_scale).items()}
    half = {k: v.to(dtype) for k, v in tensors.items()}
    mixed = attention.mixed_prefix_attention(**half, mask=padding_mask(), training=False)
    reference = two_pass(**{k: v.float() for k, v in half.items()}, mask=padding_mask())
    assert mixed.dtype == dtype
    assert (mixed.float() - reference).abs().max() < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_models_give_the_same_outputs_with_either_path(tiny_base, kind, monkeypatch):
    """A whole hybrid with nonzero gates, padded (left-padded for decoders): the one-pass layer
    and the two-pass layer agree, so the faster path changes no result."""
    peft = inject(tiny_base(kind), HybridSpec.bh_peft(HeadSpec(num_labels=3)))
    generator = torch.Generator().manual_seed(3)
    weights = {name: torch.randn(site.shape, generator=generator) * 0.5 for name, site in peft.sites.items()}
    batch = make_batch([6, 4, 1], side="left" if kind in DECODERS else "right")
    calls = []
    original = attention.mixed_prefix_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "mixed_prefix_attention", counted)
    with torch.no_grad(), peft.bind(weights):
        fast = peft.base(**batch).last_hidden_state
    assert calls, "the one-pass path did not run"
    monkeypatch.setattr(attention, "mixed_prefix_attention", lambda *a, **k: None)
    with torch.no_grad(), peft.bind(weights):
        slow = peft.base(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(fast[real], slow[real], atol=1e-5)
