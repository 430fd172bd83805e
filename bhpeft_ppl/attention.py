r"""Prefix-tuning for any Hugging Face model through ``AttentionInterface``.

Every attention class of interest (BERT, RoBERTa, Llama, GPT-2, ...) calls a
function from ``ALL_ATTENTION_FUNCTIONS`` with itself as first argument.  We
register :func:`prefix_attention` under :data:`ATTENTION_NAME`; it prepends the
prefix keys/values of the calling module (if it has a bound
:class:`~bhpeft_ppl.layers.Prefix`) and extends the 4-D mask with "attend"
columns before delegating to PyTorch SDPA.  The same name is registered in
``AttentionMaskInterface`` with a mask function that always materialises the
mask: if the mask were skipped, SDPA's ``is_causal`` would align causality
top-left and a decoder would attend to the wrong positions.

A gated prefix mixes the attention outputs with and without the prefix,
:math:`o = o_{\text{base}} + g\,(o_P - o_{\text{base}})`.  Writing
:math:`\lambda` for the attention mass the prefixed softmax puts on the prefix,
:math:`o_P = \lambda\,\bar o_{\text{pre}} + (1 - \lambda)\,o_{\text{base}}`, so

.. math::

    o = g\lambda\,\bar o_{\text{pre}} + (1 - g\lambda)\,o_{\text{base}},

where :math:`\bar o_{\text{pre}}` attends to the prefix alone.  On the CPU
:func:`mixed_prefix_attention` computes this from one score matrix and one
softmax over ``[prefix; keys]`` instead of two attention passes (PyTorch's CPU
SDPA has no fused kernel with dropout, so each pass would materialise its
scores anyway); on accelerators the two SDPA passes keep their fused kernels.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "bhpeft_prefix"
PREFIX_ATTRIBUTE = "_bhpeft_prefix"


@dataclass
class AttentionCall:
    """What one attention module saw during a discovery pass."""

    module: nn.Module
    query_heads: int
    kv_heads: int
    head_dim: int
    self_attention: bool


_discovery: list[AttentionCall] | None = None


@contextmanager
def discover_attention():
    """Record every attention call made inside the block (one dummy forward pass)."""
    global _discovery
    _discovery, calls = [], []
    try:
        yield calls
    finally:
        calls.extend(_discovery)
        _discovery = None


def _extend_mask(mask: torch.Tensor | None, length: int, query: torch.Tensor, key: torch.Tensor, causal: bool):
    """Prepend ``length`` attend-columns to a 4-D mask ``[B, 1|H, q, kv]``."""
    if mask is None:
        if not causal:
            return None
        q_len, kv_len = query.shape[2], key.shape[2]
        # bottom-right aligned causal mask, as transformers builds it
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]  # [1, 1, q, kv]
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], length, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)  # [B, 1|H, q, P + kv]


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function registered as :data:`ATTENTION_NAME`.

    Shapes: ``query [B, H, q, d]``, ``key``/``value`` ``[B, H_kv, kv, d]``; returns
    ``([B, q, H, d], None)`` as the SDPA function does.
    """
    if _discovery is not None:
        _discovery.append(AttentionCall(module, query.shape[1], key.shape[1], key.shape[-1], query.shape[2] == key.shape[2]))
    prefix = module.__dict__.get(PREFIX_ATTRIBUTE)
    if prefix is None or not prefix.bound:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    prefix_key, prefix_value = prefix.key_value(key.shape[0], key)  # [B, H_kv, P, d]
    mask = _extend_mask(attention_mask, prefix.length, query, key, causal)
    if prefix.gated and query.device.type == "cpu" and _plain(kwargs):
        gate = prefix.gate()  # [H]
        out = mixed_prefix_attention(query, key, value, prefix_key, prefix_value, mask, gate, module.training, **kwargs)
        if out is not None:
            return out, None
    out, weights = sdpa_attention_forward(
        module,
        query,
        torch.cat([prefix_key, key], dim=2),
        torch.cat([prefix_value, value], dim=2),
        mask,
        is_causal=False,
        **kwargs,
    )  # out: [B, q, H, d]
    if prefix.gated:
        base, _ = sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=causal, **kwargs)
        gate = prefix.gate().to(out.dtype)[:, None]  # [H, 1]
        out = base + gate * (out - base)
    return out, weights


def _plain(kwargs: dict) -> bool:
    """Whether the call has no extra attention features (position bias, softcapping, ...)
    that :func:`mixed_prefix_attention` does not implement."""
    return all(kwargs.get(name) is None for name in ("position_bias", "softcap", "s_aux", "sinks"))


# Below this base-attention mass (the prefix out-scores every key by ~41 nats) fall back to
# two exact passes: the backward of the renormalisation divides by the mass squared, which
# underflows float32 from about 1e-20 on (non-finite gradients), and the forward loses precision.
_MIN_BASE_MASS = 1e-18


def _open_rows(mask: torch.Tensor | None, length: int) -> torch.Tensor | bool:
    """Query rows that may attend to at least one real key, ``[B, 1|H, q, 1]``."""
    if mask is None:
        return True
    keys = mask[..., length:]  # [B, 1|H, q, kv]
    if mask.dtype != torch.bool:
        keys = keys > torch.finfo(mask.dtype).min / 2
    return keys.any(-1, keepdim=True)


def mixed_prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    mask: torch.Tensor | None,
    gate: torch.Tensor,
    training: bool,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_,
) -> torch.Tensor | None:
    r"""Gated prefix attention :math:`o = g\lambda\,\bar o_{\text{pre}} + (1 - g\lambda)\,o_{\text{base}}`
    from one softmax :math:`\pi` over ``[prefix; keys]``, with
    :math:`1 - \lambda = \sum_{j \in \text{keys}} \pi_j`:

    .. math::

        o = g\,\pi_{\text{pre}} P_V + (1 - g\lambda)\,\frac{\pi_{\text{keys}}}{1 - \lambda}\,V.

    Attention dropout, when training, drops entries of :math:`\pi` (one mask for
    both terms).  Shapes: ``query [B, H, q, d]``, ``key``/``value`` ``[B, H_kv, kv, d]``,
    ``prefix_*`` ``[B, H_kv, P, d]``, ``mask [B, 1|H, q, P + kv]`` (bool or additive)
    or ``None``, ``gate [H]``.  Returns ``[B, q, H, d]``, or ``None`` where some query
    row's base mass underflows (the caller then runs the two passes).
    """
    length = prefix_key.shape[2]
    groups = query.shape[1] // key.shape[1]
    keys = repeat_kv(torch.cat([prefix_key, key], dim=2), groups)  # [B, H, P + kv, d]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale, keys.transpose(-1, -2))  # [B, H, q, P + kv]
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # [B, H, q, P + kv]
    prefix_probs, base_probs = probs.split([length, probs.shape[-1] - length], dim=-1)  # [B, H, q, P], [B, H, q, kv]
    base_mass = base_probs.sum(-1, keepdim=True)  # [B, H, q, 1], 1 - lambda
    if bool(((base_mass < _MIN_BASE_MASS) & _open_rows(mask, length)).any()):
        return None
    # dropout entry by entry, as on the whole softmax
    prefix_probs = F.dropout(prefix_probs, p=dropout, training=training)
    base_probs = F.dropout(base_probs, p=dropout, training=training)
    norm = base_mass.clamp_min(_MIN_BASE_MASS)  # [B, H, q, 1]
    if value.dtype == torch.float16:  # too narrow for small unnormalised probabilities: normalise them first
        base_probs, norm = base_probs / norm, torch.ones_like(norm)
    prefix_out = torch.matmul(prefix_probs.to(value.dtype), repeat_kv(prefix_value, groups))  # [B, H, q, d], lambda * o_pre
    base_out = torch.matmul(base_probs.to(value.dtype), repeat_kv(value, groups))  # [B, H, q, d], o_base * norm
    g = gate.to(torch.float32)[:, None, None]  # [H, 1, 1]
    out = g * prefix_out + ((1 - g + g * base_mass) / norm) * base_out  # [B, H, q, d]
    return out.to(query.dtype).transpose(1, 2).contiguous()  # [B, q, H, d]


def prefix_mask(*args, **kwargs):
    """``sdpa_mask`` that never skips the mask (see the module docstring)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, prefix_mask)
