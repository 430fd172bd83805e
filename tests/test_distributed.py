"""Data-parallel SVI on ``torch.distributed`` (gloo, 2 CPU processes launched by ``torchrun``).

One step of two processes, each on its half of a batch, must give the gradient
one process gets on the whole batch (same noise draw); and a 2-process fit of a
conjugate linear-Gaussian regression must reach the closed-form posterior, as a
1-process fit does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backbones import fit_argv, tiny_backbone
from distributed_child import GRAD_EXAMPLES, fit_regression, one_step_gradients, regression_data
from safetensors.torch import load_file
from test_conjugate import closed_form

from bhpeft_ppl.distributed import ShardSampler, average_gradients, world
from bhpeft_ppl.errors import SpecError

CHILD = Path(__file__).with_name("distributed_child.py")


def torchrun(*args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node N ARGS`` (a free port is chosen by the launcher)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_gradient_equals_one_process_gradient_on_the_union(tmp_path):
    out = tmp_path / "grad.safetensors"
    torchrun(str(CHILD), "grad", str(out))
    parallel = load_file(out)
    loss, grads = one_step_gradients(list(range(GRAD_EXAMPLES)))  # one process, the whole batch of 16
    assert torch.allclose(parallel.pop("loss"), torch.tensor(loss), rtol=1e-5)
    assert parallel.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(parallel[name], grad, rtol=1e-4, atol=1e-6), name
    # and the two halves alone differ from the union, so the check has teeth
    _, half = one_step_gradients(list(range(0, GRAD_EXAMPLES, 2)))
    assert any(not torch.allclose(half[n], grads[n], rtol=1e-3, atol=1e-5) for n in grads)


def test_two_process_fit_reaches_the_one_process_and_closed_form_posterior(tmp_path):
    out = tmp_path / "posterior.safetensors"
    torchrun(str(CHILD), "fit", str(out))
    parallel = load_file(out)
    x, y = regression_data()
    exact_mean, exact_cov = closed_form(x, y)
    sd = exact_cov.diag().sqrt()
    single_loc, single_scale = fit_regression(batch_size=len(x))
    for loc, scale in ((parallel["loc"], parallel["scale"]), (single_loc, single_scale)):
        assert torch.all((loc - exact_mean).abs() < 0.15 * sd), (loc, exact_mean, sd)
        assert torch.allclose(scale, sd, rtol=0.15), (scale, sd)
    assert torch.all((parallel["loc"] - single_loc).abs() < 0.3 * sd)
    assert torch.allclose(parallel["scale"], single_scale, rtol=0.3)


def test_shards_partition_each_epoch_and_agree_across_ranks():
    seen = []
    for rank in range(3):
        sampler = ShardSampler(10, rank, 3, torch.Generator().manual_seed(4))
        seen.append(list(sampler))
        assert len(seen[-1]) == len(sampler) == 3
    flat = [i for shard in seen for i in shard]
    assert len(set(flat)) == 9  # disjoint; one of the 10 is left out this epoch
    with pytest.raises(SpecError, match="cannot be shared among 3 processes"):
        ShardSampler(2, 0, 3, torch.Generator())


def test_outside_a_process_group_nothing_is_communicated():
    assert world() == (0, 1)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert average_gradients([p], [1.5]) == [1.5]
    assert torch.equal(p.grad, torch.full((2,), 3.0))


def test_bhpeft_fit_under_torchrun_writes_one_run_folder(tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    done = torchrun("-m", "bhpeft_ppl.cli", *fit_argv(tiny_backbone(tmp_path_factory), out, "--train.batch_size", "8"))
    assert done.stdout.count(f"wrote {out}") == 1  # rank 0 alone reports and writes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["train_size"] == 120
    history = json.loads((out / "posterior" / "posterior.json").read_text())["history"]
    assert len(history["loss"]) == 8  # 120 examples, 60 per process, batches of 8: 8 steps of 16 examples
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no checkpoint or stage left beside it
