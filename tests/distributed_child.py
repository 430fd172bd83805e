"""One rank of a data-parallel fit, launched by ``test_distributed.py`` through ``torchrun``.

``torchrun --standalone --nproc_per_node 2 distributed_child.py MODE OUT``

* ``grad``: one SVI step's loss and gradients of the tiny BERT hybrid, each rank on
  its half of 16 examples with the same noise draw; rank 0 writes them to ``OUT``.
* ``fit``: a data-parallel :func:`~bhpeft_ppl.infer.fit` of the conjugate
  linear-Gaussian regression of ``test_conjugate.py``; rank 0 writes the
  posterior mean and standard deviation to ``OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from helpers import separable_dataset, small_spec, tiny_bert
from test_conjugate import PRIOR, LinearPEFT, Regression, collate, gaussian_model

from bhpeft_ppl import FitConfig, GuideSpec, Normal, Priors
from bhpeft_ppl.data import Collator
from bhpeft_ppl.distributed import init_from_env, world
from bhpeft_ppl.guides import local_params
from bhpeft_ppl.infer import SVIStep, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel

GRAD_EXAMPLES = 16


def one_step_gradients(rows: list[int], seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one step on ``rows`` of the 16 examples, plate scaled to 16."""
    data = separable_dataset(GRAD_EXAMPLES)
    batch = Collator()([data[i] for i in rows])
    peft = inject(tiny_bert(), small_spec())
    try:
        model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.1))
        with local_params():
            pyro.set_rng_seed(seed)
            guide = model.make_guide()
            update = SVIStep(model, guide, FitConfig(progress=False), GRAD_EXAMPLES, total_steps=1)
            pyro.set_rng_seed(seed + 1)  # the same noise draw on every rank
            record = update.loss_and_grad(batch)
            return record["loss"], {n: p.grad.detach().clone() for n, p in update.params.items()}
    finally:
        peft.eject()


def regression_data(n: int = 40, d: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)  # [n, d]
    y = x @ torch.tensor([1.0, -0.5, 0.3]) + 0.5 * torch.randn(n, generator=g)  # [n]
    return x, y


def fit_regression(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of ``w`` from a (possibly data-parallel) fit."""
    x, y = regression_data()
    model = BayesianHybridModel(
        LinearPEFT(x.shape[1]),
        priors=Priors(components={"head": Normal(PRIOR)}),
        guide_spec=GuideSpec(default="mean_field", init_scale=0.1),
        model_fn=gaussian_model,
        seed=seed,
    )
    config = FitConfig(
        epochs=700, batch_size=batch_size, lr=0.1, schedule="cosine", warmup_ratio=0.0, num_particles=4, progress=False, seed=seed
    )
    result = fit(model, Regression(x, y), config, collate_fn=collate)
    with torch.no_grad():
        loc, scale = result.guide[0]._get_loc_and_scale("w")
    return loc.clone(), scale.clone()


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    assert init_from_env("gloo"), "run me under torchrun with 2 processes"
    rank, size = world()
    if mode == "grad":
        loss, grads = one_step_gradients(list(range(rank, GRAD_EXAMPLES, size)))
        if rank == 0:
            save_file({**grads, "loss": torch.tensor(loss)}, out)
    else:
        x, _ = regression_data()
        loc, scale = fit_regression(batch_size=len(x) // size)
        if rank == 0:
            save_file({"loc": loc, "scale": scale}, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
