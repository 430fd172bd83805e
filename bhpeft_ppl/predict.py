"""Posterior predictive: model averaging and the uncertainty decomposition.

With :math:`S` draws :math:`w^{(s)} \\sim q(w)` and
:math:`p_s = \\mathrm{softmax}(f(x; w^{(s)}))`,

.. math::

   \\bar p &= \\tfrac{1}{S} \\textstyle\\sum_s p_s
        \\quad \\text{(model average)} \\\\
   \\underbrace{H[\\bar p]}_{\\text{total}} &=
   \\underbrace{\\tfrac{1}{S} \\textstyle\\sum_s H[p_s]}_{\\text{aleatoric (expected entropy)}} +
   \\underbrace{I(y; w \\mid x)}_{\\text{epistemic (mutual information)}}

The same :math:`S` weight draws are used for every example (so the draws are
posterior functions, as ArviZ expects), and the loop runs over batches and
draws, so memory does not grow with :math:`S`.  Batches are formed from
examples of similar length (shortest first), so that little compute goes to
padding; the outputs are returned in the order of the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import Collator
from .guides import local_params
from .model import BayesianHybridModel
from .sharing import shareable_modules, shared_across_draws


@dataclass
class Predictions:
    """Output of :func:`predict`; ``N`` examples, ``C`` classes (or choices), ``S`` draws.

    :ivar probs: ``[S, N, C]`` class probabilities per posterior draw.
    :ivar mean_probs: ``[N, C]`` the model average :math:`\\bar p`.
    :ivar point_probs: ``[N, C]`` the prediction at the guide's location (posterior mean for Normal guides).
    :ivar labels: ``[N]`` true labels when the data had them, else ``None``.
    :ivar log_likelihood: ``[S, N]`` :math:`\\log p(y_n \\mid w^{(s)})` when labels are known, else ``None``.
    """

    probs: torch.Tensor
    mean_probs: torch.Tensor
    point_probs: torch.Tensor
    labels: torch.Tensor | None
    log_likelihood: torch.Tensor | None = None

    @property
    def predicted(self) -> torch.Tensor:
        """``[N]`` argmax of the model average."""
        return self.mean_probs.argmax(-1)

    @property
    def total_entropy(self) -> torch.Tensor:
        """``[N]`` :math:`H[\\bar p]` in nats."""
        return _entropy(self.mean_probs)

    @property
    def expected_entropy(self) -> torch.Tensor:
        """``[N]`` aleatoric part :math:`\\tfrac1S\\sum_s H[p_s]`."""
        return _entropy(self.probs).mean(0)

    @property
    def mutual_information(self) -> torch.Tensor:
        """``[N]`` epistemic part :math:`H[\\bar p] - \\tfrac1S\\sum_s H[p_s]` (clamped at 0)."""
        return (self.total_entropy - self.expected_entropy).clamp_min(0.0)

    @property
    def summed_variance(self) -> torch.Tensor:
        """``[N]`` the paper's score: :math:`\\sum_c \\mathrm{Var}_s[p_{s,c}]`."""
        if self.probs.shape[0] < 2:
            return torch.zeros(self.probs.shape[1])
        return self.probs.var(0, unbiased=True).sum(-1)

    def accuracy(self) -> float:
        """Accuracy of the model average (requires labels)."""
        if self.labels is None:
            raise ValueError("these predictions have no labels")
        return float((self.predicted == self.labels).float().mean())


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def length_order(data: Dataset) -> list[int] | None:
    """Indices of ``data`` from the shortest example to the longest (ties keep their order),
    or ``None`` when the examples have no ``input_ids`` to measure."""
    lengths = []
    for i in range(len(data)):
        item = data[i]
        ids = item.get("input_ids") if isinstance(item, dict) else None
        if ids is None:
            return None
        multiple_choice = len(ids) > 0 and isinstance(ids[0], list | tuple)
        lengths.append(max(len(c) for c in ids) if multiple_choice else len(ids))
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def posterior_draws(guide, num_samples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` weight draws from ``guide`` (hyper-parameter sites included), seeded."""
    with local_params(), torch.no_grad():
        pyro.set_rng_seed(seed)
        return [{k: v.detach() for k, v in guide().items()} for _ in range(num_samples)]


def posterior_location(guide) -> dict[str, torch.Tensor]:
    """The guide's location (``median``: the mean of Normal guides, the MAP of Delta guides)."""
    with local_params(), torch.no_grad():
        return {k: v.detach() for k, v in guide.median().items()}


def predict(
    model: BayesianHybridModel,
    guide,
    data: Dataset,
    num_samples: int = 10,
    *,
    batch_size: int = 32,
    seed: int = 0,
    collate_fn: Callable | None = None,
    progress: bool = False,
    point: bool = True,
    sort_by_length: bool = True,
    share_invariant: bool = True,
) -> Predictions:
    """Posterior predictive probabilities of ``data`` under ``guide``.

    :param num_samples: :math:`S` posterior draws (the same for every example).
    :param seed: fixes the draws.
    :param point: also predict at the guide's location (``point_probs``; one more forward
        pass per batch); with ``False`` ``point_probs`` is the model average.
    :param sort_by_length: batch examples of similar length together (less padding, the
        same results up to floating-point rounding); outputs keep the data's order.
    :param share_invariant: compute the base-model modules that no PEFT weight reaches
        (the embeddings, ...) once per batch for all draws (:mod:`~bhpeft_ppl.sharing`;
        the same results); ``False`` runs every draw from scratch.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    order = length_order(data) if sort_by_length else None
    loader = DataLoader(data, batch_size=batch_size, sampler=order, collate_fn=collate_fn or Collator())
    per_batch, per_batch_loglik, at_location, labels = _forward_passes(
        model, guide, loader, num_samples, seed, point, progress, share_invariant
    )
    # outside inference mode, torch.cat gives ordinary tensors (usable later under autograd)
    restore = slice(None)
    if order is not None:
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))  # sorted position of example n
    probs = torch.cat(per_batch, dim=1)[:, restore]  # [S, N, C]
    return Predictions(
        probs=probs,
        mean_probs=probs.mean(0),
        point_probs=torch.cat(at_location)[restore] if point else probs.mean(0),
        labels=torch.cat(labels)[restore] if labels else None,
        log_likelihood=torch.cat(per_batch_loglik, dim=1)[:, restore] if labels else None,  # [S, N]
    )


@torch.inference_mode()
def _forward_passes(
    model: BayesianHybridModel,
    guide,
    loader: DataLoader,
    num_samples: int,
    seed: int,
    point: bool,
    progress: bool,
    share_invariant: bool,
):
    """Per batch: probabilities ``[S, B, C]``, log-likelihoods ``[S, B]`` and labels, and the
    probabilities at the guide's location ``[B, C]`` when ``point``."""
    draws = posterior_draws(guide, num_samples, seed)
    location = posterior_location(guide) if point else None
    model.eval()
    shared = shareable_modules(model.peft.base) if share_invariant else []  # found once, wrapped per batch
    per_batch, per_batch_loglik, at_location, labels = [], [], [], []
    for batch in tqdm(loader, disable=not progress, desc="predict", unit="batch"):
        with shared_across_draws(shared):
            outputs = [model.predictive(batch, w) for w in draws]
            if point:
                at_location.append(model.predictive(batch, location)[0])  # [B, C]
        per_batch.append(torch.stack([p for p, _ in outputs]))  # [S, B, C]
        if "labels" in batch:
            labels.append(batch["labels"])
            per_batch_loglik.append(torch.stack([ll for _, ll in outputs]))  # [S, B]
    return per_batch, per_batch_loglik, at_location, labels
