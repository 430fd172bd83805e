"""SVI fitting: learning, frozen base, local parameters, history, seeds, stopping, divergence, validation."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from helpers import separable_dataset, small_spec, state_copy, states_equal, tiny_bert, tiny_llama

from bhpeft_ppl.data import EncodedDataset
from bhpeft_ppl.errors import DivergenceError, SpecError
from bhpeft_ppl.guides import GuideSpec, local_params
from bhpeft_ppl.infer import EarlyStopping, FitConfig, fit, trainable_parameters
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.predict import predict
from bhpeft_ppl.spec import HybridSpec

HISTORY_KEYS = {"step", "epoch", "loss", "log_likelihood", "kl", "lr"}


def _mean(values):
    return sum(values) / len(values)


def _fit_fresh(base, guide_spec=None, config=None, data=None, spec=None, **kwargs):
    """Inject, fit, eject; returns ``(model, result)``."""
    peft = inject(base, spec or small_spec())
    try:
        model = BayesianHybridModel(peft, guide_spec=guide_spec)
        result = fit(model, data or separable_dataset(24), config or FitConfig(epochs=1, batch_size=8, progress=False), **kwargs)
    finally:
        peft.eject()
    return model, result


# Learning --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "guide_spec",
    [GuideSpec.map(), GuideSpec(), GuideSpec(default="low_rank")],
    ids=["map", "mean_field", "low_rank"],
)
def test_fit_learns_separable_task_on_encoder(guide_spec):
    train, test = separable_dataset(64, seed=0), separable_dataset(100, seed=1)
    peft = inject(tiny_bert(), HybridSpec.bh_peft())
    try:
        model = BayesianHybridModel(peft, guide_spec=guide_spec)
        result = fit(model, train, FitConfig(epochs=12, batch_size=16, lr=1e-2, progress=False))
        loss = result.history["loss"]
        assert len(loss) == 48
        assert all(math.isfinite(v) for v in loss)
        assert _mean(loss[-10:]) < _mean(loss[:10])
        accuracy = predict(model, result.guide, test, 5).accuracy()
        assert accuracy > 0.7, f"held-out accuracy {accuracy} is not above chance (0.5)"
    finally:
        peft.eject()


def test_fit_learns_separable_task_on_decoder():
    train, test = separable_dataset(64, seed=0), separable_dataset(100, seed=1)
    peft = inject(tiny_llama(), small_spec())
    try:
        assert peft.is_decoder
        model = BayesianHybridModel(peft, guide_spec=GuideSpec.map())
        result = fit(model, train, FitConfig(epochs=12, batch_size=16, lr=1e-2, progress=False))
        loss = result.history["loss"]
        assert _mean(loss[-10:]) < _mean(loss[:10])
        accuracy = predict(model, result.guide, test, 3).accuracy()
        assert accuracy > 0.65, f"held-out accuracy {accuracy} is not above chance (0.5)"
    finally:
        peft.eject()


# The base model stays frozen and outside Pyro -------------------------------------------------
@pytest.mark.parametrize("guide_spec", [GuideSpec(), GuideSpec.blob()], ids=["mean_field", "blob"])
def test_fit_leaves_base_weights_bit_identical_and_param_store_empty(guide_spec):
    base = tiny_bert()
    before = state_copy(base)
    pyro.clear_param_store()
    model, result = _fit_fresh(base, guide_spec, FitConfig(epochs=2, batch_size=8, lr=5e-2, progress=False))
    # the fit did change the guide (or this test would prove nothing)
    fresh, fitted = model.make_guide().parameters(), result.guide.parameters()
    assert any(not torch.equal(p.detach(), q.detach()) for p, q in zip(fresh, fitted, strict=True))
    assert states_equal(before, state_copy(base))
    assert all(p.grad is None for p in base.parameters())
    assert not any(p.requires_grad for p in base.parameters())
    store = pyro.get_param_store()
    assert list(store.keys()) == []
    base_names = {n for n, _ in base.named_parameters()}
    assert base_names.isdisjoint(store.keys())


def test_trainable_parameters_are_guide_and_point_estimates_only():
    base = tiny_bert()
    peft = inject(base, small_spec())
    try:
        model = BayesianHybridModel(peft, guide_spec=GuideSpec.blob())
        guide = model.make_guide()
        params = trainable_parameters(model, guide)
        ids = {id(p) for p in params.values()}
        assert len(ids) == len(params)
        guide_ids = {id(p) for p in guide.parameters()}
        point_ids = {id(p) for p in model.point_values().values()}
        assert point_ids, "blob has point estimates"
        assert guide_ids, "blob has a guide on lora_A"
        assert ids == guide_ids | point_ids
        assert ids.isdisjoint(id(p) for p in base.parameters())
        assert ids.isdisjoint(id(p) for p in peft.parameters())
        assert all(p.requires_grad for p in params.values())
    finally:
        peft.eject()


# History ---------------------------------------------------------------------------------------
def test_history_lists_one_entry_per_step():
    data = separable_dataset(20)
    _, result = _fit_fresh(tiny_bert(), config=FitConfig(epochs=2, batch_size=8, lr=1e-2, progress=False), data=data)
    history = result.history
    assert set(history) == HISTORY_KEYS
    steps = 2 * math.ceil(len(data) / 8)
    assert {len(v) for v in history.values()} == {steps}
    assert history["step"] == list(range(steps))
    assert history["epoch"] == [0] * (steps // 2) + [1] * (steps // 2)
    assert all(lr > 0 for lr in history["lr"])
    for loss, loglik, kl in zip(history["loss"], history["log_likelihood"], history["kl"], strict=True):
        assert math.isfinite(loss) and math.isfinite(loglik) and math.isfinite(kl)
        assert loglik <= 0  # a categorical log-likelihood
        assert loss == pytest.approx(-loglik + kl, rel=1e-5, abs=1e-3)
    assert result.num_data == len(data)
    assert result.stopped_early is False
    assert result.seconds > 0


def test_max_steps_caps_the_fit():
    _, result = _fit_fresh(tiny_bert(), config=FitConfig(epochs=5, batch_size=8, max_steps=4, progress=False))
    assert len(result.history["loss"]) == 4
    assert result.stopped_early is False


# Seeds -----------------------------------------------------------------------------------------
def test_same_seed_gives_identical_fit_and_other_seed_differs():
    base = tiny_bert()
    data = separable_dataset(24)
    runs = []
    for seed in (0, 0, 1):
        config = FitConfig(epochs=1, batch_size=8, lr=1e-2, seed=seed, progress=False)
        runs.append(_fit_fresh(base, GuideSpec(), config, data)[1])
    first, again, other = runs
    assert first.history == again.history
    assert states_equal(state_copy(first.guide), state_copy(again.guide))
    assert first.history["loss"] != other.history["loss"]
    assert not states_equal(state_copy(first.guide), state_copy(other.guide))


# Stopping --------------------------------------------------------------------------------------
def test_early_stopping_stops_before_max_steps():
    config = FitConfig(epochs=5, batch_size=8, lr=1e-2, progress=False)
    data = separable_dataset(24)
    total = config.epochs * math.ceil(len(data) / config.batch_size)
    stopper = EarlyStopping(patience=1, window=2, min_delta=1e9)  # no improvement is ever big enough
    _, result = _fit_fresh(tiny_bert(), config=config, data=data, callbacks=[stopper])
    assert result.stopped_early is True
    assert len(result.history["loss"]) < total
    assert len(result.history["loss"]) % stopper.window == 0


def test_callback_returning_true_stops_and_sees_state():
    seen = []

    def stop_after_three(state):
        seen.append((state.step, len(state.history["loss"])))
        return state.step >= 3

    _, result = _fit_fresh(tiny_bert(), config=FitConfig(epochs=3, batch_size=8, progress=False), callbacks=[stop_after_three])
    assert result.stopped_early is True
    assert len(result.history["loss"]) == 3
    assert seen == [(1, 1), (2, 2), (3, 3)]


def test_callback_returning_none_does_not_stop():
    calls = []
    _, result = _fit_fresh(
        tiny_bert(), config=FitConfig(epochs=2, batch_size=8, progress=False), callbacks=[lambda state: calls.append(state.step)]
    )
    assert result.stopped_early is False
    assert len(result.history["loss"]) == 6
    assert calls == [1, 2, 3, 4, 5, 6]


# Divergence ------------------------------------------------------------------------------------
def _poison_at(guide, step, name):
    def callback(state):
        if state.step == step:
            with torch.no_grad():
                dict(guide.named_parameters())[name].fill_(float("nan"))

    return callback


@pytest.mark.parametrize("validation", [False, True], ids=["validation_off", "validation_on"])
def test_nan_guide_parameter_raises_divergence_error_naming_step_and_site(validation):
    peft = inject(tiny_bert(), small_spec())
    try:
        model = BayesianHybridModel(peft)
        guide = model.make_guide()
        name = next(n for n, _ in guide.named_parameters() if "lora_A" in n)
        poison = _poison_at(guide, 2, name)  # after the second step: the third (step 2) diverges
        with pyro.validation_enabled(validation), pytest.raises(DivergenceError) as info:
            fit(model, separable_dataset(24), FitConfig(epochs=3, batch_size=8, progress=False), guide=guide, callbacks=[poison])
        message = str(info.value)
        assert "step 2" in message
        site = name.split("locs.", 1)[1].removesuffix("_unconstrained")  # named by its sample site
        assert site.endswith("lora_A") and f"non-finite sites: ['{site}'" in message
    finally:
        peft.eject()


# Validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": 1.5},
        {"batch_size": 0},
        {"num_particles": 0},
        {"max_steps": 0},
        {"lr": 0},
        {"lr": -1e-3},
        {"lr": float("nan")},
        {"schedule": "exponential"},
        {"estimator": "tracegraph"},
        {"warmup_ratio": 1.0},
        {"warmup_ratio": -0.1},
        {"warmup_ratio": "0.1"},
        {"clip_norm": 0.0},
        {"clip_norm": -1.0},
    ],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_invalid_fit_config_raises_spec_error(kwargs):
    with pytest.raises(SpecError):
        FitConfig(**kwargs)


def test_empty_dataset_raises_spec_error():
    peft = inject(tiny_bert(), small_spec())
    try:
        with pytest.raises(SpecError):
            fit(BayesianHybridModel(peft), EncodedDataset([], []), FitConfig(progress=False))
    finally:
        peft.eject()


def test_scale_lr_factor_puts_guide_scales_in_their_own_parameter_group():
    from bhpeft_ppl.infer import SVIStep

    model = BayesianHybridModel(inject(tiny_bert(), small_spec()), guide_spec=GuideSpec(components={"lora": "low_rank"}))
    with local_params():
        guide = model.make_guide()
        step = SVIStep(model, guide, FitConfig(lr=0.01, scale_lr_factor=5.0, progress=False), num_data=8, total_steps=10)
    fast, slow = step.optimizer.param_groups[1], step.optimizer.param_groups[0]
    assert fast["lr"] == pytest.approx(0.05 * fast["lr"] / fast["initial_lr"]) and fast["initial_lr"] == pytest.approx(0.05)
    assert slow["initial_lr"] == pytest.approx(0.01)
    scale_ids = {id(p) for p in fast["params"]}
    names = {n for n, p in step.params.items() if id(p) in scale_ids}
    assert names and all(".scales." in n or n.endswith((".scale_unconstrained", ".cov_factor")) for n in names)
    assert not any(".locs." in n or n.endswith(".loc") for n in names)
    with pytest.raises(SpecError, match="scale_lr_factor"):
        FitConfig(scale_lr_factor=0)
