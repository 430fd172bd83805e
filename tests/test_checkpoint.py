"""Resumable training: a fit stopped at any point (exception, SIGKILL, Ctrl-C) and resumed ends
bitwise equal to an uninterrupted fit; checkpoints are atomic, checked on resume and never pickle."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from backbones import fit_argv, tiny_backbone
from helpers import separable_dataset, small_spec, tiny_bert
from safetensors.torch import load_file

import bhpeft_ppl.checkpoint as checkpoint_module
from bhpeft_ppl.checkpoint import load_checkpoint
from bhpeft_ppl.cli import main
from bhpeft_ppl.errors import CheckpointError, DivergenceError, FitInterrupted, SpecError
from bhpeft_ppl.guides import GuideSpec
from bhpeft_ppl.infer import EarlyStopping, FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.workflow import checkpoint_path

CHILD = Path(__file__).with_name("checkpoint_child.py")
CONFIG = FitConfig(epochs=3, batch_size=8, lr=1e-2, checkpoint_every=2, progress=False)  # 40 examples: 5 steps per epoch


class Crash(Exception):
    """Stands for a crash at a given step."""


def _crash_at(step: int):
    def callback(state):
        if state.step == step:
            raise Crash(step)

    return callback


def _fit(checkpoint=None, *, resume=False, guide_spec=None, config=CONFIG, data=None, callbacks=()):
    """Fit the tiny BERT's hybrid; returns ``(guide state, history, result)``."""
    peft = inject(tiny_bert(), small_spec())
    try:
        model = BayesianHybridModel(peft, guide_spec=guide_spec or GuideSpec())
        result = fit(
            model, data or separable_dataset(40), config, checkpoint=checkpoint, resume=resume, callbacks=list(callbacks)
        )
        state = {k: v.detach().clone() for k, v in result.guide.state_dict().items()}
        state.update({f"point/{k}": v.detach().clone() for k, v in model.point_values().items()})
        return state, result.history, result
    finally:
        peft.eject()


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ after resuming: {different[:3]}"


# In-process: a crash at any step, then resume -------------------------------------------------
@pytest.mark.parametrize(
    "guide_spec",
    [GuideSpec(), GuideSpec(default="low_rank"), GuideSpec.map(), GuideSpec.blob()],
    ids=["mean_field", "low_rank", "map", "blob_with_point_sites"],
)
def test_crash_and_resume_is_bitwise_identical(tmp_path, guide_spec):
    reference, history, _ = _fit(guide_spec=guide_spec)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash):
        _fit(path, guide_spec=guide_spec, callbacks=[_crash_at(7)])
    assert load_checkpoint(path).step == 6  # the last checkpoint before the crash (every 2 steps)
    state, resumed_history, _ = _fit(path, resume=True, guide_spec=guide_spec)
    _assert_bitwise(reference, state)
    assert resumed_history == history  # losses, KL, learning rates: every float equal
    assert load_checkpoint(path).meta["finished"]


@pytest.mark.parametrize("crash", [2, 5, 10, 14], ids=lambda s: f"after_step_{s}")
def test_resume_across_epoch_boundaries(tmp_path, crash):
    """Steps 5 and 10 end an epoch (5 batches each): the data order of the next epoch must be restored."""
    reference, history, _ = _fit()
    path = tmp_path / "fit.ckpt"
    config = FitConfig(epochs=3, batch_size=8, lr=1e-2, checkpoint_every=1, progress=False)
    with pytest.raises(Crash):
        _fit(path, config=config, callbacks=[_crash_at(crash + 1)])
    assert load_checkpoint(path).step == crash
    state, resumed_history, _ = _fit(path, resume=True, config=config)
    _assert_bitwise(reference, state)
    assert resumed_history == history


def test_resume_twice_and_after_the_end(tmp_path):
    reference, history, _ = _fit()
    path = tmp_path / "fit.ckpt"
    for crash in (3, 9):
        with pytest.raises(Crash):
            _fit(path, resume=path.exists(), callbacks=[_crash_at(crash)])
    state, resumed_history, _ = _fit(path, resume=True)
    _assert_bitwise(reference, state)
    assert resumed_history == history
    # resuming a finished fit returns its result without further steps
    again, again_history, _ = _fit(path, resume=True, callbacks=[_crash_at(1)])
    _assert_bitwise(reference, again)
    assert again_history == history


def test_early_stopping_replays_its_checks_after_a_resume(tmp_path):
    config = FitConfig(epochs=20, batch_size=8, lr=1e-2, checkpoint_every=3, progress=False)
    _, history, result = _fit(config=config, callbacks=[EarlyStopping(patience=1, window=4, min_delta=1e9)])
    assert result.stopped_early and len(history["loss"]) == 8  # two checks, the second one not better by 1e9
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash):
        _fit(path, config=config, callbacks=[EarlyStopping(patience=1, window=4, min_delta=1e9), _crash_at(7)])
    _, resumed, result = _fit(path, resume=True, config=config, callbacks=[EarlyStopping(patience=1, window=4, min_delta=1e9)])
    assert result.stopped_early and resumed == history


def test_checkpoint_holds_every_part_of_the_state(tmp_path):
    path = tmp_path / "fit.ckpt"
    _fit(path)
    ckpt = load_checkpoint(path)
    names = set(ckpt.tensors)
    assert any(n.startswith("param/guide.") for n in names)
    assert any(n.startswith("optimizer/") and n.endswith("exp_avg_sq") for n in names)
    assert {"rng/torch", "rng/loader"} <= names
    meta = ckpt.meta
    assert meta["step"] == 15 and meta["finished"] and len(meta["history"]["loss"]) == 15
    assert {"python", "numpy"} <= set(meta["rng"])
    assert meta["scheduler"]["last_epoch"] == 15
    assert meta["config"]["lr"] == CONFIG.lr and len(meta["data_sha256"]) == 64


# Checks on resume --------------------------------------------------------------------------------
def _crashed_checkpoint(tmp_path) -> Path:
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash):
        _fit(path, callbacks=[_crash_at(5)])
    return path


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    path = _crashed_checkpoint(tmp_path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="resume it, or delete it"):
        _fit(path)
    assert path.read_bytes() == before


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        _fit(tmp_path / "absent.ckpt", resume=True)
    with pytest.raises(SpecError, match="needs the checkpoint path"):
        _fit(None, resume=True)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"config": FitConfig(epochs=3, batch_size=8, lr=5e-3, checkpoint_every=2, progress=False)}, "lr: saved 0.01"),
        ({"config": FitConfig(epochs=4, batch_size=8, lr=1e-2, checkpoint_every=2, progress=False)}, "epochs: saved 3"),
        ({"data": separable_dataset(40, seed=5)}, "training data differ"),
        ({"guide_spec": GuideSpec(default="low_rank")}, "trained parameters differ"),
    ],
    ids=["lr", "epochs", "data", "guide"],
)
def test_resume_with_other_settings_names_the_difference(tmp_path, change, needle):
    path = _crashed_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=needle):
        _fit(path, resume=True, **change)


def test_progress_and_checkpoint_interval_may_change_on_resume(tmp_path):
    reference, history, _ = _fit()
    path = _crashed_checkpoint(tmp_path)
    config = FitConfig(epochs=3, batch_size=8, lr=1e-2, checkpoint_every=5, progress=True)
    state, resumed_history, _ = _fit(path, resume=True, config=config)
    _assert_bitwise(reference, state)
    assert resumed_history == history


# Damaged files and pickle -------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


@pytest.mark.parametrize("damage", ["truncated", "zeros", "pickle", "torch_save", "not_a_checkpoint"])
def test_damaged_checkpoint_is_refused_and_never_executed(tmp_path, damage):
    path = _crashed_checkpoint(tmp_path)
    marker = tmp_path / "marker"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "zeros":
        path.write_bytes(bytes(path.stat().st_size))
    elif damage == "pickle":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    elif damage == "torch_save":
        torch.save({"state": _Payload(marker)}, path)
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, path, metadata={"bhpeft_ppl": json.dumps({"format": "other"})})
    with pytest.raises(CheckpointError, match=str(path.name)):
        _fit(path, resume=True)
    assert not marker.exists(), "loading the checkpoint executed code"


def test_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = _crashed_checkpoint(tmp_path)  # step 4
    good = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        _fit(path, resume=True)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.ckpt"]  # no temporary file left
    assert load_checkpoint(path).step == 4


# Divergence --------------------------------------------------------------------------------------
def test_divergence_keeps_the_last_good_checkpoint_and_names_step_and_sites(tmp_path):
    path = tmp_path / "fit.ckpt"
    holder = {}

    def poison(state):
        if state.step == 5:  # after the checkpoint of step 4, before the next one
            with torch.no_grad():
                name, param = next((n, p) for n, p in holder["guide"].named_parameters() if "locs" in n)
                param.fill_(float("nan"))
                holder["poisoned"] = name

    peft = inject(tiny_bert(), small_spec())
    try:
        model = BayesianHybridModel(peft, guide_spec=GuideSpec())
        holder["guide"] = guide = model.make_guide()
        with pytest.raises(DivergenceError) as info:
            fit(model, separable_dataset(40), CONFIG, guide=guide, checkpoint=path, callbacks=[poison])
    finally:
        peft.eject()
    message = str(info.value)
    assert "at step 5" in message and "last good checkpoint (step 4)" in message and str(path) in message
    site = holder["poisoned"].split("locs.", 1)[1].removesuffix("_unconstrained")  # the site's own name
    assert f"non-finite sites: ['{site}'" in message
    ckpt = load_checkpoint(path)
    assert ckpt.step == 4 and all(torch.isfinite(t).all() for k, t in ckpt.tensors.items() if k.startswith("param/"))


# Separate processes: SIGKILL and Ctrl-C -------------------------------------------------------------
def _child(directory: Path, *args: str, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, str(CHILD), str(directory), *args]
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _outputs(directory: Path):
    return load_file(directory / "final.safetensors"), json.loads((directory / "history.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    done = _child(directory)
    assert done.returncode == 0, done.stderr
    return _outputs(directory)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    killed = _child(tmp_path, "--kill-at", "7")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "final.safetensors").exists()
    assert load_checkpoint(tmp_path / "fit.ckpt").step == 6
    resumed = _child(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    state, history = _outputs(tmp_path)
    _assert_bitwise(uninterrupted[0], state)
    assert history == uninterrupted[1]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def test_sigkill_from_outside_at_an_arbitrary_moment(tmp_path, uninterrupted):
    process = _child(tmp_path, "--slow", "0.05", wait=False)
    _wait_for(tmp_path / "fit.ckpt", process)
    time.sleep(0.13)  # lands anywhere in a step or a checkpoint write
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    step = load_checkpoint(tmp_path / "fit.ckpt").step  # whole, whenever the kill landed
    assert 2 <= step < 15
    resumed = _child(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    state, history = _outputs(tmp_path)
    _assert_bitwise(uninterrupted[0], state)
    assert history == uninterrupted[1]


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(tmp_path, uninterrupted):
    process = _child(tmp_path, "--slow", "0.1", wait=False)
    _wait_for(tmp_path / "fit.ckpt", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr and "fit.ckpt" in stderr and "Traceback" not in stderr
    ckpt = load_checkpoint(tmp_path / "fit.ckpt")
    assert not ckpt.meta["finished"] and f"step {ckpt.step} of 15" in stderr
    resumed = _child(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    state, history = _outputs(tmp_path)
    _assert_bitwise(uninterrupted[0], state)
    assert history == uninterrupted[1]


def test_fit_interrupted_is_a_keyboard_interrupt():
    assert issubclass(FitInterrupted, KeyboardInterrupt)


# The command line: bhpeft fit --resume ---------------------------------------------------------------
def _cli_argv(backbone: Path, out: Path, *extra: str) -> list[str]:
    """A tiny ``bhpeft fit`` of 300 steps with a checkpoint every 5 steps."""
    return fit_argv(
        backbone,
        out,
        *("--data.train_size", "200", "--train.epochs", "3", "--train.batch_size", "2"),
        *("--train.checkpoint_every", "5", *extra),
    )


def _cli(argv: list[str], wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bhpeft_ppl.cli", *argv]
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _posterior(out: Path):
    meta = json.loads((out / "posterior" / "posterior.json").read_text())
    return load_file(out / "posterior" / "posterior.safetensors"), meta["history"]


@pytest.fixture(scope="module")
def cli_backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory)


@pytest.fixture(scope="module")
def cli_uninterrupted(tmp_path_factory, cli_backbone):
    out = tmp_path_factory.mktemp("cli") / "run"
    done = _cli(_cli_argv(cli_backbone, out))
    assert done.returncode == 0, done.stderr
    assert not checkpoint_path(out).exists(), "the checkpoint is removed once the run folder is written"
    return _posterior(out)


@pytest.mark.parametrize("signal_sent", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl_c"])
def test_cli_fit_killed_then_resumed_matches_an_uninterrupted_fit(tmp_path, cli_backbone, cli_uninterrupted, signal_sent):
    out = tmp_path / "run"
    process = _cli(_cli_argv(cli_backbone, out), wait=False)
    _wait_for(checkpoint_path(out), process)
    process.send_signal(signal_sent)
    _, stderr = process.communicate(timeout=120)
    step = load_checkpoint(checkpoint_path(out)).step
    if signal_sent == signal.SIGINT:
        assert process.returncode == 130, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "interrupted at step" in lines[0] and "--resume" in lines[0], stderr
        assert f"step {step} of 300" in lines[0]
    else:
        assert process.returncode == -signal.SIGKILL
    assert 5 <= step < 300, "the signal should land during training"
    assert not out.exists(), "no partial run folder"
    assert _cli(_cli_argv(cli_backbone, out)).returncode == 2, "an interrupted run is not overwritten without --resume"
    resumed = _cli(_cli_argv(cli_backbone, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    tensors, history = _posterior(out)
    _assert_bitwise(cli_uninterrupted[0], tensors)
    assert history == cli_uninterrupted[1]
    assert not checkpoint_path(out).exists()
    assert json.loads((out / "metrics.json").read_text())["resumed"] is True


def test_cli_resume_errors_are_one_line(tmp_path, cli_backbone, capsys):
    out = tmp_path / "run"
    assert main(_cli_argv(cli_backbone, out, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checkpoint" in err and "without --resume" in err
    assert not out.exists()
    checkpoint_path(out).write_bytes(b"not a checkpoint")
    assert main(_cli_argv(cli_backbone, out, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a readable checkpoint" in err and "Traceback" not in err
    assert not out.exists()
    assert main(_cli_argv(cli_backbone, out, "--train.checkpoint_every", "-1")) == 2
    assert "train.checkpoint_every must be a non-negative integer" in capsys.readouterr().err
