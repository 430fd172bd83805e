"""Computation shared by the posterior draws of one batch.

The :math:`S` forward passes that :func:`~bhpeft_ppl.predict.predict` makes for a
batch differ only in the PEFT weights.  Every base-model module that no PEFT
weight reaches (the embeddings, and the frozen projections of the first layer,
whose input is the embeddings' output) receives the very same input
tensors in each pass, so its output is computed once and reused by the other
:math:`S - 1` passes.

A module's ``forward`` is shared when no module below it carries a hook (LoRA and
adapters are forward hooks; they run around ``forward``, so the hooked module
itself still qualifies), it does not read a prefix, and it is in eval mode (a
module in train mode, e.g. dropout for MC dropout, draws new noise per pass).  A
call is reused only when every tensor argument is the same view of the same
memory as in the stored call (the stored arguments are held, so that memory
cannot pass to a new tensor) and every other argument is equal.  A model that
changed such an output in place would see the change in later passes: the
encoders and decoders of ``tests/test_sharing.py`` (BERT, RoBERTa, Llama, GPT-2)
give identical predictions either way, and ``predict(share_invariant=False)``
turns sharing off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .attention import PREFIX_ATTRIBUTE

_PLAIN = (type(None), bool, int, float, str)


def _arguments(args: tuple, kwargs: dict) -> list | None:
    """The call's arguments as a flat list (kwargs sorted by name), or ``None`` if one
    of them is neither a tensor nor a plain value (then the call is not shared)."""
    items = list(args) + [x for name in sorted(kwargs) for x in (name, kwargs[name])]
    if all(isinstance(x, (torch.Tensor, *_PLAIN)) for x in items):
        return items
    return None


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two tensors are the same view of the same memory (``x.view(...)`` made
    anew in each pass counts as the same)."""
    return x is y or (
        x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        and x.storage_offset() == y.storage_offset()
        and x.shape == y.shape
        and x.stride() == y.stride()
        and x.dtype == y.dtype
        and x.device == y.device
    )


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and _same_view(x, y)):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


class _SharedForward:
    """``forward`` of one module that returns the stored output for a repeated call.

    The first call's arguments and output are stored; a later call with the same
    arguments returns that output.  A call with other arguments shows that the
    module is not draw-invariant here: the stored call is dropped and the module
    runs plainly from then on (holding its tensors would only cost memory).  The
    stored arguments are held, so their memory stays allocated and a new tensor can
    never take a stored tensor's place.
    """

    def __init__(self, forward):
        self.forward = forward
        self.arguments: list | None = None
        self.output = None
        self.active = True
        self.hits = 0

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.forward(*args, **kwargs)
        arguments = _arguments(args, kwargs)
        if self.arguments is not None and arguments is not None and _same(arguments, self.arguments):
            self.hits += 1
            return self.output
        if self.arguments is not None or arguments is None:
            self.active, self.arguments, self.output = False, None, None
            return self.forward(*args, **kwargs)
        output = self.forward(*args, **kwargs)
        self.arguments, self.output = arguments, output
        return output


def _touched(module: nn.Module) -> bool:
    """Whether the module's output may depend on the PEFT weights through its own call."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or PREFIX_ATTRIBUTE in module.__dict__


def shareable_modules(base: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``base`` whose ``forward`` is the same in every draw.

    A module's forward varies if it reads a prefix, is in train mode, or runs a child
    that carries a hook or whose own forward varies."""

    def visit(module: nn.Module) -> tuple[list[nn.Module], bool]:
        found, varies = [], PREFIX_ATTRIBUTE in module.__dict__ or module.training
        for child in module.children():
            below, child_varies = visit(child)
            found += below
            varies = varies or child_varies or _touched(child)
        return (found if varies else [module]), varies

    return visit(base)[0]


@contextmanager
def shared_across_draws(modules: list[nn.Module]) -> Iterator[list[_SharedForward]]:
    """Within the block, repeated calls of ``modules`` (from :func:`shareable_modules`, see the
    module docstring) return their first output; yields the wrappers (``hits``)."""
    installed = []
    for module in modules:
        previous = module.__dict__.get("forward")
        wrapper = _SharedForward(module.forward)
        module.forward = wrapper
        installed.append((module, previous, wrapper))
    try:
        yield [wrapper for _, _, wrapper in installed]
    finally:
        for module, previous, _ in installed:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
