"""Base class of the PEFT layers: declared sites and per-forward weight binding."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..naming import site_name
from ..sites import WeightSite


class PEFTLayer(nn.Module):
    """A PEFT module attached at ``path`` in the base model.

    Subclasses declare their weights with :meth:`add_site` and read them in
    ``forward`` with :meth:`weight`.  An unbound layer is inactive (the base
    model runs unchanged).
    """

    component: str = ""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.sites: list[WeightSite] = []
        self._local: dict[str, str] = {}  # local weight name -> site name
        self._bound: dict[str, torch.Tensor] | None = None

    def add_site(self, weight: str, shape: tuple[int, ...], init: str) -> WeightSite:
        """Declare a weight; its site name comes from :func:`~bhpeft_ppl.naming.site_name`."""
        site = WeightSite(site_name(self.path, weight), tuple(int(s) for s in shape), self.component, init)
        self.sites.append(site)
        self._local[weight] = site.name
        return site

    @property
    def bound(self) -> bool:
        """Whether weights are bound for the current forward pass."""
        return self._bound is not None

    def bind(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Bind this layer's weights from a ``{site name: tensor}`` mapping."""
        self._bound = {local: weights[name] for local, name in self._local.items()}

    def unbind(self) -> None:
        """Drop the bound weights (and with them any autograd graph)."""
        self._bound = None

    def weight(self, local: str) -> torch.Tensor:
        """The bound tensor of weight ``local``."""
        return self._bound[local]

    def has_weight(self, local: str) -> bool:
        """Whether this layer declares weight ``local``."""
        return local in self._local

    def extra_repr(self) -> str:
        return f"path={self.path!r}, sites={[s.name.rsplit('.', 1)[-1] for s in self.sites]}"


def sigmoid_gate(layer: PEFTLayer, x: torch.Tensor) -> torch.Tensor:
    """UniPELT gate :math:`\\sigma(x^\\top w + b)`, shape ``x.shape[:-1] + (1,)``."""
    w = layer.weight("gate_weight")  # [d_in]
    b = layer.weight("gate_bias")  # [1]
    return torch.sigmoid(x @ w.to(x.dtype) + b.to(x.dtype)).unsqueeze(-1)
