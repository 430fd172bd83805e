"""The new task head: a linear map of the pooled hidden state.

.. math:: \\eta = W h + b, \\qquad W \\in \\mathbb{R}^{K \\times d}

:math:`K` logits for classification, one score per choice for multiple choice.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .base import PEFTLayer


class TaskHead(PEFTLayer):
    """Linear head ``classifier`` of width ``hidden_size -> outputs``."""

    component = "head"

    def __init__(self, hidden_size: int, outputs: int, init_std: float = 0.02):
        super().__init__("classifier")
        self.add_site("weight", (outputs, hidden_size), f"normal:{init_std}")
        self.add_site("bias", (outputs,), "zeros")

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits or scores, shape ``pooled.shape[:-1] + (outputs,)``."""
        w = self.weight("weight").to(pooled.dtype)  # [K, d]
        return F.linear(pooled, w, self.weight("bias").to(pooled.dtype))  # [..., K]
