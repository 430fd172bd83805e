"""Description of one PEFT weight: its site name, shape, component and initial value."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightSite:
    """One PEFT weight, a ``pyro.sample`` site (or ``pyro.param`` if a point estimate).

    :param name: site name from :func:`bhpeft_ppl.naming.site_name`.
    :param shape: shape of the weight.
    :param component: ``lora``, ``adapter``, ``prefix`` or ``head``.
    :param init: initial value of the guide's location: ``zeros``, ``ones``,
        ``kaiming`` (uniform in :math:`\\pm 1/\\sqrt{\\text{fan-in}}`, as ``nn.Linear`` and
        ``peft`` LoRA A), or ``normal:<std>``.
    """

    name: str
    shape: tuple[int, ...]
    component: str
    init: str = "zeros"

    @property
    def numel(self) -> int:
        """Number of scalar weights."""
        return math.prod(self.shape)

    def initial_value(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial location, drawn with ``generator`` (or the global torch RNG)."""
        if self.init == "zeros":
            return torch.zeros(self.shape)
        if self.init == "ones":
            return torch.ones(self.shape)
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(self.shape[-1])
            return (torch.rand(self.shape, generator=generator) * 2 - 1) * bound
        if self.init.startswith("normal:"):
            std = float(self.init.split(":", 1)[1])
            return torch.randn(self.shape, generator=generator) * std
        raise ValueError(f"unknown init {self.init!r} for site {self.name}")
