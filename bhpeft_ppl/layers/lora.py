"""LoRA on a linear layer, attached as a forward hook.

.. math:: h = W x + g(x)\\,\\tfrac{\\alpha}{r}\\, B A\\, \\mathrm{drop}(x),
   \\qquad A \\in \\mathbb{R}^{r \\times d_{in}},\\ B \\in \\mathbb{R}^{d_{out} \\times r}

with :math:`g \\equiv 1` unless gated.  :math:`B` starts at zero, so the
untrained layer equals the base layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..spec import LoRASpec
from .base import PEFTLayer, sigmoid_gate


class LoRA(PEFTLayer):
    """LoRA update of the linear layer at ``path`` with widths ``in_features -> out_features``."""

    component = "lora"

    def __init__(self, path: str, in_features: int, out_features: int, spec: LoRASpec):
        super().__init__(path)
        self.scaling = spec.scaling
        self.gated = spec.gate
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.add_site("lora_A", (spec.rank, in_features), "kaiming")
        self.add_site("lora_B", (out_features, spec.rank), "zeros")
        if spec.gate:
            self.add_site("gate_weight", (in_features,), "zeros")
            self.add_site("gate_bias", (1,), "zeros")

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update :math:`g(x)\\,\\tfrac{\\alpha}{r} B A\\,\\mathrm{drop}(x)`, shape ``x.shape[:-1] + (d_out,)``."""
        a = self.weight("lora_A").to(x.dtype)  # [r, d_in]
        b = self.weight("lora_B").to(x.dtype)  # [d_out, r]
        out = F.linear(F.linear(self.dropout(x), a) * self.scaling, b)  # [..., d_out], the factor on the rank-r tensor
        if self.gated:
            out = out * sigmoid_gate(self, x)
        return out

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the base linear layer."""
        if not self.bound:
            return output
        return output + self.delta(inputs[0])
