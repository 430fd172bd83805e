"""Data-parallel SVI over ``torch.distributed``.

Each of :math:`W` processes (ranks) holds the whole model and guide, draws its
minibatch of :math:`B` examples from its own shard of the data, and scales the
plate to the full data size :math:`N`, so each rank's loss is an unbiased
estimate of the negative ELBO, and so is their mean:

.. math:: \\bar{\\mathcal{L}} = \\frac{1}{W} \\sum_{r=1}^{W} \\Big[ -\\frac{N}{B}
   \\sum_{n \\in \\text{batch}_r} \\mathbb{E}_q \\log p(y_n \\mid w) + \\beta\\,\\mathrm{KL} \\Big]
   = -\\frac{N}{WB} \\sum_{n \\in \\cup_r \\text{batch}_r} \\mathbb{E}_q \\log p(y_n \\mid w) + \\beta\\,\\mathrm{KL}.

Its gradient is the ranks' gradients summed by an all-reduce and divided by
:math:`W` (:func:`average_gradients`): the update one process would make on the
union of the :math:`W` batches, as ``DistributedDataParallel`` does.  Every rank
starts from rank 0's parameters (:func:`broadcast_parameters`) and applies the
same averaged update, so the guides stay identical without further traffic.

Launch with ``torchrun --nproc_per_node W script.py`` (or ``accelerate launch``);
:func:`init_from_env` joins the process group that the launcher describes in
the environment (``gloo`` on CPU, ``nccl`` on GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import SpecError


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that writes files)."""
    return world()[0] == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) set up.

    Does nothing and returns ``False`` when ``WORLD_SIZE`` is unset or 1.

    :param backend: ``gloo`` or ``nccl``; default ``nccl`` when CUDA is available, else ``gloo``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return True


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if world()[1] > 1:
        dist.barrier()


def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every rank."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter], values: list[float] = ()) -> list[float]:
    """Replace each ``p.grad`` by its mean over the ranks, and return the mean of each of ``values``
    (the loss, for the history), in one flattened all-reduce.

    A parameter without a gradient on a rank counts as a zero gradient there.
    """
    params, values = list(params), list(values)
    _, size = world()
    if size == 1:
        return values
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    extra = torch.tensor(values, dtype=grads[0].dtype if grads else torch.float64)  # [k]
    flat = torch.cat([g.reshape(-1) for g in grads] + [extra])  # [total parameters + k]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    return flat[offset:].tolist()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank (so that every rank stops together)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class ShardSampler(Sampler[int]):
    """This rank's share of a shuffled epoch.

    Every rank draws the same permutation of the :math:`N` indices from ``generator``
    (seeded alike), drops the last :math:`N \\bmod W` so that each rank runs the same
    number of steps, and keeps every :math:`W`-th index from its rank on.  The
    dropped examples change from epoch to epoch, so none is left out for good.
    """

    def __init__(self, num_data: int, rank: int, size: int, generator: torch.Generator):
        if num_data < size:
            raise SpecError(f"{num_data} examples cannot be shared among {size} processes; use more data or fewer processes")
        self.num_data, self.rank, self.size, self.generator = num_data, rank, size, generator

    def __len__(self) -> int:
        return self.num_data // self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_data, generator=self.generator)  # [N]
        kept = order[: len(self) * self.size]  # [W * (N // W)]
        yield from kept[self.rank :: self.size].tolist()
