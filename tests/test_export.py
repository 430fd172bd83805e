"""ArviZ export: InferenceData groups, dims and values, the same draws as ``predict``, the NetCDF round trip,
LOO / WAIC / compare between fitted configurations, and custom likelihoods given as ``model_fn``."""

import contextlib
import json
import os
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import full_batch, separable_dataset, small_spec, tiny_bert

from bhpeft_ppl.data import EncodedDataset
from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.export import load_inference_data, save_inference_data, select_sites, to_inference_data
from bhpeft_ppl.guides import GuideSpec
from bhpeft_ppl.infer import FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.predict import predict
from bhpeft_ppl.spec import HeadSpec, HybridSpec, LoRASpec

S = 6
SEED = 7
GROUPS = {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"}
FIT = FitConfig(epochs=2, batch_size=8, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def data():
    return separable_dataset(10, seed=3)


def _fitted(spec: HybridSpec, seed: int = 0):
    peft = inject(tiny_bert(), spec)
    model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.05), seed=seed)
    result = fit(model, separable_dataset(16), FitConfig(epochs=2, batch_size=8, lr=1e-2, seed=seed, progress=False))
    return peft, model, result


@pytest.fixture(scope="module")
def fitted():
    """``(model, FitResult)`` of the small hybrid on the tiny BERT, fitted for 4 steps."""
    peft, model, result = _fitted(small_spec())
    yield model, result
    peft.eject()


@pytest.fixture(scope="module")
def idata(fitted, data):
    model, result = fitted
    return to_inference_data(model, result.guide, data, num_samples=S, seed=SEED, history=result.history)


@contextlib.contextmanager
def _quiet_arviz():
    """Hide ArviZ's warnings about Pareto k and WAIC variance on tiny samples."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# Groups, variables and dims ---------------------------------------------------------------------
def test_groups_chain_and_draws(idata):
    assert set(idata.groups()) == GROUPS
    for group in ("posterior", "posterior_predictive", "log_likelihood"):
        assert idata[group].sizes["chain"] == 1, group
        assert idata[group].sizes["draw"] == S, group


def test_posterior_variables_are_the_latent_sites_with_their_shapes(fitted, idata):
    model, _ = fitted
    assert list(idata.posterior.data_vars) == list(model.latent_sites)
    for name in model.latent_sites:
        assert idata.posterior[name].shape == (1, S, *model.peft.sites[name].shape), name
        assert np.isfinite(idata.posterior[name].values).all(), name


def test_posterior_subset_by_site_patterns(fitted, data):
    model, result = fitted
    sub = to_inference_data(model, result.guide, data, num_samples=2, seed=SEED, sites=["lora_A", "classifier.bias"])
    expected = [n for n in model.latent_sites if n.endswith(".lora_A") or n == "classifier.bias"]
    assert len(expected) > 2
    assert list(sub.posterior.data_vars) == expected
    single = to_inference_data(model, result.guide, data, num_samples=2, seed=SEED, sites="classifier.weight")
    assert list(single.posterior.data_vars) == ["classifier.weight"]
    everything = to_inference_data(model, result.guide, data, num_samples=2, seed=SEED, sites="all")
    assert list(everything.posterior.data_vars) == list(model.latent_sites)


def test_predictive_dims_and_normalisation(idata, data):
    n = len(data)
    obs, probs = idata.posterior_predictive["obs"], idata.posterior_predictive["probs"]
    assert obs.dims == ("chain", "draw", "example")
    assert probs.dims == ("chain", "draw", "example", "class")
    assert obs.shape == (1, S, n) and probs.shape == (1, S, n, 2)
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "example")
    assert idata.observed_data["obs"].dims == ("example",)
    np.testing.assert_allclose(probs.sum("class").values, 1.0, atol=1e-5)
    assert set(np.unique(obs.values)) <= {0, 1}
    assert list(idata.posterior_predictive["example"].values) == list(range(n))


def test_log_likelihood_is_log_prob_of_the_observed_label(idata, data):
    labels = np.asarray(data.labels)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, labels)
    probs = idata.posterior_predictive["probs"].values[0]  # [S, N, C]
    at_label = np.take_along_axis(probs, labels[None, :, None], axis=-1)[..., 0]  # [S, N]
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[0], np.log(at_label), rtol=1e-5, atol=1e-5)


def test_sample_stats_hold_the_svi_history(fitted, idata):
    _, result = fitted
    stats, history = idata.sample_stats, result.history
    assert len(history["loss"]) == 4
    assert set(stats.data_vars) == {"loss", "log_likelihood", "kl", "lr"}
    assert stats["loss"].dims == ("svi_step",)
    np.testing.assert_array_equal(stats["loss"].values, np.asarray(history["loss"]))
    np.testing.assert_array_equal(stats["kl"].values, np.asarray(history["kl"]))
    np.testing.assert_array_equal(stats["lr"].values, np.asarray(history["lr"]))
    np.testing.assert_array_equal(stats["svi_step"].values, np.asarray(history["step"]))


def test_no_history_no_sample_stats_and_no_labels_no_likelihood(fitted, data):
    model, result = fitted
    plain = to_inference_data(model, result.guide, data, num_samples=2, seed=SEED)
    assert set(plain.groups()) == GROUPS - {"sample_stats"}
    unlabelled = to_inference_data(model, result.guide, EncodedDataset(data.encodings), num_samples=2, seed=SEED)
    assert set(unlabelled.groups()) == {"posterior", "posterior_predictive"}


def test_attrs_record_spec_priors_guide_seed_and_versions(fitted, idata):
    model, _ = fitted
    for group in idata.groups():
        attrs = idata[group].attrs
        assert HybridSpec.from_dict(json.loads(attrs["bhpeft_spec"])) == model.peft.spec, group
        assert json.loads(attrs["bhpeft_priors"]) == json.loads(json.dumps(model.priors.to_dict())), group
        assert GuideSpec.from_dict(json.loads(attrs["bhpeft_guide"])) == model.guide_spec, group
        assert attrs["seed"] == SEED and attrs["num_draws"] == S, group
        assert attrs["kl_weight"] == 1.0 and attrs["inference_method"] == "svi", group
        versions = json.loads(attrs["library_versions"])
        assert versions["pyro-ppl"] == pyro.__version__
        assert versions["arviz"] == az.__version__
        assert {"python", "torch", "transformers", "numpy"} <= set(versions)


def test_label_names_become_the_class_coordinate(fitted, data):
    model, result = fitted
    named = to_inference_data(model, result.guide, data, num_samples=2, seed=SEED, label_names=["neg", "pos"])
    assert list(named.posterior_predictive["class"].values) == ["neg", "pos"]


# The same draws as predict ----------------------------------------------------------------------
def test_draws_are_those_of_predict_with_the_same_seed(fitted, idata, data):
    model, result = fitted
    p = predict(model, result.guide, data, S, seed=SEED)
    np.testing.assert_array_equal(idata.posterior_predictive["probs"].values[0], p.probs.numpy())
    np.testing.assert_array_equal(idata.log_likelihood["obs"].values[0], p.log_likelihood.double().numpy())
    other = predict(model, result.guide, data, S, seed=SEED + 1)
    assert not np.array_equal(idata.posterior_predictive["probs"].values[0], other.probs.numpy())
    # the posterior variables are the weights those probabilities were computed with
    batch = full_batch(data)
    for s in (0, S - 1):
        weights = {name: torch.as_tensor(idata.posterior[name].values[0, s]) for name in model.latent_sites}
        probs, _ = model.predictive(batch, weights)
        np.testing.assert_allclose(probs.numpy(), p.probs[s].numpy(), atol=1e-5)


def test_passing_predictions_gives_the_same_inference_data(fitted, idata, data):
    model, result = fitted
    p = predict(model, result.guide, data, S, seed=SEED)
    reused = to_inference_data(model, result.guide, data, num_samples=S, seed=SEED, history=result.history, predictions=p)
    assert set(reused.groups()) == set(idata.groups())
    for group in idata.groups():
        assert reused[group].equals(idata[group]), group


def test_predictions_with_another_number_of_draws_are_rejected(fitted, data):
    model, result = fitted
    p = predict(model, result.guide, data, 3, seed=SEED)
    with pytest.raises(SpecError, match="3 draws"):
        to_inference_data(model, result.guide, data, num_samples=4, seed=SEED, predictions=p)


# NetCDF round trip -------------------------------------------------------------------------------
def test_save_load_round_trip_leaves_no_temp_files(fitted, data, tmp_path):
    model, result = fitted
    idata = to_inference_data(
        model, result.guide, data, num_samples=S, seed=SEED, history=result.history, label_names=["neg", "pos"]
    )
    path = tmp_path / "sub" / "posterior.nc"
    assert save_inference_data(idata, path) == path
    assert os.listdir(path.parent) == ["posterior.nc"]
    loaded = load_inference_data(path)
    assert set(loaded.groups()) == set(idata.groups()) == GROUPS
    for group in idata.groups():
        assert loaded[group].equals(idata[group]), group
        assert loaded[group].identical(idata[group]), group  # attributes included
    assert list(loaded.posterior_predictive["class"].values) == ["neg", "pos"]
    assert HybridSpec.from_dict(json.loads(loaded.posterior.attrs["bhpeft_spec"])) == model.peft.spec
    # the file is closed after loading: it can be overwritten and removed
    save_inference_data(idata, path)
    path.unlink()
    assert os.listdir(path.parent) == []


def test_failed_save_leaves_neither_target_nor_temp_file(idata, tmp_path, monkeypatch):
    def broken(self, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(az.InferenceData, "to_netcdf", broken)
    with pytest.raises(OSError, match="disk full"):
        save_inference_data(idata, tmp_path / "posterior.nc")
    assert list(tmp_path.iterdir()) == []


def test_loading_a_non_netcdf_or_missing_file_is_a_spec_error(tmp_path):
    bad = tmp_path / "posterior.nc"
    bad.write_text("this is not NetCDF\n")
    with pytest.raises(SpecError, match="not a readable InferenceData"):
        load_inference_data(bad)
    with pytest.raises(SpecError, match="no InferenceData file"):
        load_inference_data(tmp_path / "missing.nc")


# ArviZ diagnostics ---------------------------------------------------------------------------------
def test_summary_rows_are_named_after_sites(fitted, data):
    model, result = fitted
    small = to_inference_data(model, result.guide, data, num_samples=S, seed=SEED, sites=["classifier.bias"])
    with _quiet_arviz():
        table = az.summary(small, kind="stats")
    assert list(table.index) == ["classifier.bias[0]", "classifier.bias[1]"]
    means = small.posterior["classifier.bias"].values[0].mean(0)
    np.testing.assert_allclose(table["mean"].values, means, atol=1e-3)


def test_loo_and_waic_run_on_the_log_likelihood(idata, data):
    n = len(data)
    with _quiet_arviz():
        loo = az.loo(idata, pointwise=True)
        waic = az.waic(idata, pointwise=True)
    assert loo.loo_i.shape == (n,) and np.isfinite(loo.elpd_loo)
    assert waic.waic_i.shape == (n,) and np.isfinite(waic.elpd_waic)
    ll = idata.log_likelihood["obs"].values[0].astype(float)  # [S, N]
    lppd = float((np.logaddexp.reduce(ll, axis=0) - np.log(S)).sum())
    assert waic.elpd_waic + waic.p_waic == pytest.approx(lppd, rel=1e-6, abs=1e-6)
    # every log-likelihood is <= 0, so are the elpd estimates
    assert waic.elpd_waic <= 0 and loo.elpd_loo <= 0


def test_compare_two_fitted_configurations(idata, data):
    peft, model, result = _fitted(HybridSpec(lora=LoRASpec(rank=2), head=HeadSpec()), seed=1)
    try:
        lora = to_inference_data(model, result.guide, data, num_samples=S, seed=SEED)
    finally:
        peft.eject()
    with _quiet_arviz():
        table = az.compare({"hybrid": idata, "lora": lora}, ic="loo")
        loos = {"hybrid": az.loo(idata).elpd_loo, "lora": az.loo(lora).elpd_loo}
    assert set(table.index) == {"hybrid", "lora"} and len(table) == 2
    assert list(table["rank"]) == [0, 1]
    best = max(loos, key=loos.get)
    assert table.index[0] == best
    assert table["elpd_loo"].iloc[0] >= table["elpd_loo"].iloc[1]
    np.testing.assert_allclose(table.loc["lora", "elpd_loo"], loos["lora"], rtol=1e-9)


# Site selection --------------------------------------------------------------------------------------
def test_select_sites(fitted):
    model, _ = fitted
    assert select_sites(model, None) == list(model.latent_sites)
    assert select_sites(model, "all") == list(model.latent_sites)
    assert select_sites(model, "classifier.bias") == ["classifier.bias"]
    with pytest.raises(SpecError, match="match no latent site"):
        select_sites(model, ["no_such_weight"])
    with pytest.raises(SpecError, match="no_such_weight"):
        select_sites(model, "no_such_weight")


# Custom model functions ----------------------------------------------------------------------------
EPS = 0.3


def label_noise_model(hybrid, batch, num_data):
    """With probability ``EPS`` the label is uniform: ``p = (1 - EPS) softmax + EPS / C``."""
    weights = hybrid.sample_weights()
    logits = hybrid.peft(batch, weights)
    probs = (1 - EPS) * logits.softmax(-1) + EPS / logits.shape[-1]
    with pyro.plate("data", size=num_data, subsample=batch["index"]):
        pyro.sample("obs", dist.Categorical(probs=probs), obs=batch.get("labels"))
    return logits


def renamed_site_model(hybrid, batch, num_data):
    weights = hybrid.sample_weights()
    logits = hybrid.peft(batch, weights)
    with pyro.plate("data", size=num_data, subsample=batch["index"]):
        pyro.sample("label", dist.Categorical(logits=logits), obs=batch.get("labels"))
    return logits


def gaussian_model(hybrid, batch, num_data):
    weights = hybrid.sample_weights()
    logits = hybrid.peft(batch, weights)
    with pyro.plate("data", size=num_data, subsample=batch["index"]):
        pyro.sample("obs", dist.Normal(logits[:, 1], 1.0), obs=batch.get("labels"))
    return logits


@pytest.fixture(scope="module")
def tiny_models():
    """A fresh small hybrid with a guide of spread 0.1 (its draws differ from the base model)."""
    peft = inject(tiny_bert(seed=2), small_spec())
    model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.1), seed=3)
    yield peft, model, model.make_guide()
    peft.eject()


def test_label_noise_model_changes_predictions_as_computed_by_hand(tiny_models, data):
    peft, plain, guide = tiny_models
    noisy = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.1), seed=3, model_fn=label_noise_model)
    assert list(noisy.latent_sites) == list(plain.latent_sites)
    base = predict(plain, guide, data, 3, seed=5)
    p = predict(noisy, guide, data, 3, seed=5)
    expected = (1 - EPS) * base.probs + EPS / 2
    torch.testing.assert_close(p.probs, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.point_probs, (1 - EPS) * base.point_probs + EPS / 2, atol=1e-6, rtol=1e-5)
    labels = torch.tensor(data.labels)
    manual_ll = expected.gather(-1, labels.expand(3, -1).unsqueeze(-1)).squeeze(-1).log()
    torch.testing.assert_close(p.log_likelihood, manual_ll, atol=1e-5, rtol=1e-5)
    # probabilities never leave [EPS / C, 1 - EPS + EPS / C]
    assert p.probs.min() >= EPS / 2 - 1e-6 and p.probs.max() <= 1 - EPS / 2 + 1e-6
    idata = to_inference_data(noisy, guide, data, num_samples=3, seed=5)
    np.testing.assert_array_equal(idata.posterior_predictive["probs"].values[0], p.probs.numpy())


def test_label_noise_model_fits(tiny_models):
    peft, _, _ = tiny_models
    noisy = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.1), seed=3, model_fn=label_noise_model)
    result = fit(noisy, separable_dataset(8), FitConfig(epochs=1, batch_size=4, lr=1e-2, progress=False))
    assert len(result.history["loss"]) == 2 and all(np.isfinite(result.history["loss"]))
    # with label noise every label keeps probability >= EPS / C, so the likelihood is bounded below
    assert all(ll >= 8 * np.log(EPS / 2) - 1e-3 for ll in result.history["log_likelihood"])


def test_model_function_without_obs_site_is_a_spec_error_naming_obs(tiny_models, data):
    peft, _, guide = tiny_models
    renamed = BayesianHybridModel(peft, seed=3, model_fn=renamed_site_model)
    with pytest.raises(SpecError, match="'obs'") as err:
        predict(renamed, guide, data, 1)
    assert "renamed_site_model" in str(err.value)
    gaussian = BayesianHybridModel(peft, seed=3, model_fn=gaussian_model)
    with pytest.raises(SpecError, match="Categorical-like"):
        predict(gaussian, guide, data, 1)


def test_model_fn_must_be_callable(tiny_models):
    peft, _, _ = tiny_models
    with pytest.raises(SpecError, match="model_fn"):
        BayesianHybridModel(peft, model_fn="categorical")
