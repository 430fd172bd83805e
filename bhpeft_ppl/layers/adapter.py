"""Bottleneck adapter on the feed-forward output, attached with forward hooks.

.. math:: \\Delta(z) = s\\, g(z)\\, \\big(U\\, \\phi(D z + b_D) + b_U\\big),
   \\qquad D \\in \\mathbb{R}^{m \\times d},\\ U \\in \\mathbb{R}^{d \\times m}

Sequential: :math:`h = f(x) + \\Delta(f(x))`; parallel: :math:`h = f(x) + \\Delta(x)`,
where :math:`f` is the feed-forward block and :math:`x` its input.  :math:`U`
and :math:`b_U` start at zero, so the untrained block equals the base block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..spec import AdapterSpec
from .base import PEFTLayer, sigmoid_gate

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


class BottleneckAdapter(PEFTLayer):
    """Adapter whose term is added to the output of the module at ``path``.

    :param in_features: width of the adapter input (FFN output if sequential,
        FFN input if parallel).
    :param out_features: width of the FFN output.
    """

    component = "adapter"

    def __init__(self, path: str, in_features: int, out_features: int, spec: AdapterSpec):
        super().__init__(path)
        width = spec.width(in_features)
        self.parallel = spec.placement == "parallel"
        self.scaling = float(spec.scaling)
        self.gated = spec.gate
        self.activation = _ACTIVATIONS[spec.non_linearity]
        self._captured: torch.Tensor | None = None
        self.add_site("adapter_down", (width, in_features), "kaiming")
        self.add_site("adapter_down_bias", (width,), "zeros")
        self.add_site("adapter_up", (out_features, width), "zeros")
        self.add_site("adapter_up_bias", (out_features,), "zeros")
        if spec.gate:
            self.add_site("gate_weight", (in_features,), "zeros")
            self.add_site("gate_bias", (1,), "zeros")

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        """Adapter term :math:`\\Delta(z)`, shape ``z.shape[:-1] + (d_out,)``."""
        down = self.weight("adapter_down").to(z.dtype)  # [m, d_in]
        up = self.weight("adapter_up").to(z.dtype)  # [d_out, m]
        h = self.activation(F.linear(z, down, self.weight("adapter_down_bias").to(z.dtype)))  # [..., m]
        bias = self.weight("adapter_up_bias").to(z.dtype)  # [d_out]
        if self.scaling != 1.0:  # s (W_up h + b) with the factor on the narrow tensors
            h, bias = h * self.scaling, bias * self.scaling
        out = F.linear(h, up, bias)  # [..., d_out]
        if self.gated:
            out = out * sigmoid_gate(self, z)
        return out

    def capture_hook(self, module: nn.Module, inputs: tuple) -> None:
        """Forward pre-hook on the FFN input module (parallel placement)."""
        self._captured = inputs[0] if self.bound else None

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the FFN output module."""
        if not self.bound:
            return output
        if self.parallel:
            z, self._captured = self._captured, None
            if z is None:
                raise RuntimeError(f"parallel adapter at {self.path}: the FFN input was not captured this pass")
        else:
            z = output
        return output + self.delta(z)

    def unbind(self) -> None:
        super().unbind()
        self._captured = None
