"""Prefix-tuning for any Hugging Face model through ``AttentionInterface``.

Every attention class of interest (BERT, RoBERTa, Llama, GPT-2, ...) calls a
function from ``ALL_ATTENTION_FUNCTIONS`` with itself as first argument.  We
register :func:`prefix_attention` under :data:`ATTENTION_NAME`; it prepends the
prefix keys/values of the calling module (if it has a bound
:class:`~bhpeft_ppl.layers.Prefix`) and extends the 4-D mask with "attend"
columns before delegating to PyTorch SDPA.  The same name is registered in
``AttentionMaskInterface`` with a mask function that always materialises the
mask: if the mask were skipped, SDPA's ``is_causal`` would align causality
top-left and a decoder would attend to the wrong positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
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


def prefix_mask(*args, **kwargs):
    """``sdpa_mask`` that never skips the mask (see the module docstring)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, prefix_mask)
