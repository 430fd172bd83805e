"""Prefix-tuning: learned keys and values prepended in a self-attention layer.

For a query :math:`q` attending keys :math:`K` and values :math:`V`, the
prefixed output is :math:`o_P = \\mathrm{attn}(q, [P_K; K], [P_V; V])`.
With the gate (default) the layer returns
:math:`o = o_{\\text{base}} + g\\,(o_P - o_{\\text{base}})` with one
:math:`g` per head, started at 0 so that the untrained model equals the base
model; :math:`g = 1` is the original prefix-tuning.

Prefixes are either free weights ``prefix_key`` / ``prefix_value`` of shape
``[P, kv_heads * head_dim]`` per layer, or all produced by a
:class:`PrefixEncoder` (the reparameterisation of Li & Liang, used by the paper).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..spec import PrefixSpec
from .base import PEFTLayer

PREFIX_INIT = "normal:0.5"


class PrefixEncoder(PEFTLayer):
    """Reparameterisation :math:`[P_K; P_V]_{\\ell} = W_2 \\tanh(W_1 E + b_1) + b_2`
    for all prefixed layers :math:`\\ell` at once, from one embedding
    :math:`E \\in \\mathbb{R}^{P \\times e}`."""

    component = "prefix"

    def __init__(self, spec: PrefixSpec, widths: list[int]):
        super().__init__("prefix_encoder")
        self.widths = list(widths)  # kv_heads * head_dim per layer
        total = 2 * sum(self.widths)
        self.add_site("embedding", (spec.num_virtual_tokens, spec.embedding_dim), "normal:1.0")
        self.add_site("mlp_in", (spec.hidden_dim, spec.embedding_dim), "kaiming")
        self.add_site("mlp_in_bias", (spec.hidden_dim,), "zeros")
        self.add_site("mlp_out", (total, spec.hidden_dim), "kaiming")
        self.add_site("mlp_out_bias", (total,), "zeros")
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)``, each ``[P, width]``; computed once per binding."""
        if self._cache is None:
            e = self.weight("embedding")  # [P, e]
            h = torch.tanh(F.linear(e, self.weight("mlp_in"), self.weight("mlp_in_bias")))  # [P, hidden]
            out = F.linear(h, self.weight("mlp_out"), self.weight("mlp_out_bias"))  # [P, 2 * sum(widths)]
            chunks = torch.split(out, [w for w in self.widths for _ in range(2)], dim=-1)
            self._cache = [(chunks[2 * i], chunks[2 * i + 1]) for i in range(len(self.widths))]
        return self._cache

    def bind(self, weights) -> None:
        super().bind(weights)
        self._cache = None

    def unbind(self) -> None:
        super().unbind()
        self._cache = None


class Prefix(PEFTLayer):
    """Prefix of the self-attention module at ``path``.

    :param kv_heads: key/value heads of the module (fewer than query heads under GQA).
    :param head_dim: width of one head.
    :param query_heads: query heads (one gate each).
    :param encoder: shared :class:`PrefixEncoder` and this layer's index in it, if reparameterised.
    """

    component = "prefix"

    def __init__(
        self,
        path: str,
        kv_heads: int,
        head_dim: int,
        query_heads: int,
        spec: PrefixSpec,
        encoder: tuple[PrefixEncoder, int] | None = None,
    ):
        super().__init__(path)
        self.kv_heads, self.head_dim, self.length = kv_heads, head_dim, spec.num_virtual_tokens
        self.gated = spec.gate
        self._encoder = encoder  # a plain attribute: the encoder is owned by the PEFT container
        if encoder is None:
            self.add_site("prefix_key", (self.length, kv_heads * head_dim), PREFIX_INIT)
            self.add_site("prefix_value", (self.length, kv_heads * head_dim), PREFIX_INIT)
        if spec.gate:
            self.add_site("prefix_gate", (query_heads,), "zeros")

    @property
    def bound(self) -> bool:
        return super().bound and (self._encoder is None or self._encoder[0].bound)

    def key_value(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values, each ``[batch, kv_heads, P, head_dim]``, in ``like``'s dtype."""
        if self._encoder is None:
            key, value = self.weight("prefix_key"), self.weight("prefix_value")  # [P, kvh * hd]
        else:
            encoder, index = self._encoder
            key, value = encoder.prefixes()[index]

        def heads(t: torch.Tensor) -> torch.Tensor:
            t = t.to(like.dtype).view(self.length, self.kv_heads, self.head_dim).transpose(0, 1)  # [kvh, P, hd]
            return t.unsqueeze(0).expand(batch, -1, -1, -1)  # [B, kvh, P, hd]

        return heads(key), heads(value)

    def gate(self) -> torch.Tensor:
        """Per-head gate :math:`g`, shape ``[query_heads]``."""
        return self.weight("prefix_gate")
