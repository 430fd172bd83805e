"""Posterior summaries as ArviZ ``InferenceData``.

ArviZ's ``from_pyro`` accepts MCMC only, so the groups are built here from
:math:`S` draws :math:`w^{(s)} \\sim q(w)` of the fitted guide, as one chain:

==================== ================================ ==========================================
group                variables                        dims
==================== ================================ ==========================================
posterior            chosen weight sites              (chain, draw, ``<site>_dim_<i>`` ...)
posterior_predictive ``obs`` (a label drawn per draw) (chain, draw, example)
                     ``probs``                        (chain, draw, example, class)
log_likelihood       ``obs``: :math:`\\log p(y_n \\mid w^{(s)})` (chain, draw, example)
observed_data        ``obs``                          (example,)
sample_stats         the SVI trace: ``loss`` (negative ELBO), ``log_likelihood``, ``kl``, ``lr``  (svi_step,)
==================== ================================ ==========================================

With ``log_likelihood`` present, ``az.loo``, ``az.waic`` and ``az.compare``
work between two fitted PEFT configurations scored on the same examples (the
draws come from the variational posterior, so LOO's importance weights correct
for :math:`q` only approximately; check the Pareto :math:`\\hat k`).  Site names
are those of :func:`bhpeft_ppl.naming.site_name`, the same names the priors and
guides use.  The attributes record the spec, priors, guide, seed and library versions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import arviz as az
import numpy as np
import torch
import xarray as xr

from .errors import SpecError
from .files import atomic_write, library_versions
from .model import BayesianHybridModel
from .naming import matches_any
from .predict import Predictions, posterior_draws, predict


def select_sites(model: BayesianHybridModel, sites: Sequence[str] | str | None) -> list[str]:
    """Latent sites to export: ``None`` or ``"all"`` for all, else site-name patterns."""
    latent = list(model.latent_sites)
    if sites is None or sites == "all":
        return latent
    patterns = (sites,) if isinstance(sites, str) else tuple(sites)
    chosen = [name for name in latent if matches_any(name, patterns)]
    if not chosen:
        raise SpecError(f"export sites {list(patterns)} match no latent site; site names look like {latent[:4]}")
    return chosen


def _svi_trace(history: dict | None) -> xr.Dataset | None:
    if not history or not history.get("loss"):
        return None
    steps = np.asarray(history.get("step", range(len(history["loss"]))))
    data = {
        key: ("svi_step", np.asarray(history[key], dtype=float))
        for key in ("loss", "log_likelihood", "kl", "lr")
        if history.get(key)
    }
    return xr.Dataset(data, coords={"svi_step": steps})


def to_inference_data(
    model: BayesianHybridModel,
    guide,
    data,
    *,
    num_samples: int = 100,
    seed: int = 0,
    sites: Sequence[str] | str | None = None,
    history: dict | None = None,
    predictions: Predictions | None = None,
    label_names: Sequence[str] | None = None,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
) -> az.InferenceData:
    """ArviZ ``InferenceData`` of the fitted ``guide`` on ``data``.

    :param num_samples: :math:`S` posterior draws (one chain of :math:`S` draws).
    :param seed: fixes the draws; the same as :func:`~bhpeft_ppl.predict.predict` with this seed.
    :param sites: site-name patterns of the weight sites put in ``posterior`` (``None``: all).
    :param history: the SVI history of :func:`~bhpeft_ppl.infer.fit`, stored as ``sample_stats``.
    :param predictions: reuse :func:`~bhpeft_ppl.predict.predict` output made with the same
        ``num_samples`` and ``seed`` (saves the forward passes).
    :param label_names: names of the classes (the ``class`` coordinate).
    """
    chosen = select_sites(model, sites)
    if predictions is None:
        predictions = predict(model, guide, data, num_samples, seed=seed, batch_size=batch_size, collate_fn=collate_fn)
    s, n, c = predictions.probs.shape
    if s != num_samples:
        raise SpecError(f"predictions hold {s} draws but num_samples is {num_samples}; pass the same number")
    draws = posterior_draws(guide, num_samples, seed)
    posterior = {name: np.stack([d[name].cpu().numpy() for d in draws])[None] for name in chosen}  # [1, S, *shape]
    dims = {name: [f"{name}_dim_{i}" for i in range(posterior[name].ndim - 2)] for name in chosen}
    generator = torch.Generator().manual_seed(seed)
    sampled = torch.multinomial(predictions.probs.reshape(s * n, c).double(), 1, generator=generator).reshape(s, n)
    coords = {"example": np.arange(n), "class": list(label_names) if label_names else np.arange(c)}
    groups = {
        "posterior": posterior,
        "posterior_predictive": {"obs": sampled.numpy()[None], "probs": predictions.probs.numpy()[None]},
    }
    dims.update({"obs": ["example"], "probs": ["example", "class"]})
    if predictions.labels is not None:
        groups["log_likelihood"] = {"obs": predictions.log_likelihood.double().numpy()[None]}  # [1, S, N]
        groups["observed_data"] = {"obs": predictions.labels.numpy()}
    idata = az.from_dict(**groups, coords=coords, dims=dims)
    trace = _svi_trace(history)
    if trace is not None:
        idata.add_groups({"sample_stats": trace})
    attrs = {
        "inference_library": "pyro",
        "inference_method": "svi",
        "bhpeft_spec": json.dumps(model.peft.spec.to_dict(), sort_keys=True),
        "bhpeft_priors": json.dumps(model.priors.to_dict(), sort_keys=True),
        "bhpeft_guide": json.dumps(model.guide_spec.to_dict(), sort_keys=True),
        "kl_weight": model.kl_weight,
        "seed": int(seed),
        "num_draws": int(num_samples),
        "library_versions": json.dumps(library_versions(), sort_keys=True),
    }
    for group in idata.groups():
        idata[group].attrs.update(attrs)
    return idata


def save_inference_data(idata: az.InferenceData, path: str | Path) -> Path:
    """Write ``idata`` to NetCDF (``h5netcdf``) atomically."""
    return atomic_write(path, lambda tmp: idata.to_netcdf(tmp, engine="h5netcdf"))


def load_inference_data(path: str | Path) -> az.InferenceData:
    """Read an ``InferenceData`` NetCDF file, fully into memory (the file is closed afterwards)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no InferenceData file at {path}")
    try:
        idata = az.from_netcdf(path, engine="h5netcdf")
    except (OSError, ValueError) as err:
        raise SpecError(f"{path} is not a readable InferenceData NetCDF file ({err})") from None
    return idata
