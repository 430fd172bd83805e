"""Save and load a fitted posterior without pickle.

A posterior folder holds

* ``posterior.safetensors``: the guide's parameters (unconstrained, as in its
  ``state_dict``) under ``guide/...`` and point estimates under ``point/<site>``;
* ``posterior.json``: the hybrid spec, priors, guide spec, KL weight, seed, the
  site names and shapes, a fingerprint of the base model, library versions,
  the SHA-256 of the weights file, and the training history if given.

Both are written atomically, the JSON last, so a crash leaves either the old
posterior or the new one.  Loading checks the fingerprint, the spec and every
site, and says what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import PosteriorMismatchError, SpecError
from .files import atomic_write, atomic_write_json, library_versions
from .guides import GuideSpec, local_params
from .inject import inject
from .model import BayesianHybridModel
from .priors import Priors
from .spec import HybridSpec

FORMAT = "bhpeft_ppl.posterior"
FORMAT_VERSION = 1
WEIGHTS_FILE = "posterior.safetensors"
META_FILE = "posterior.json"
REQUIRED_FIELDS = ("spec", "priors", "guide_spec", "kl_weight", "seed", "sites", "base_model", "weights_sha256")


def base_fingerprint(base: torch.nn.Module) -> dict[str, Any]:
    """Identity of a base model: type, sizes, a hash of its config and of its first and last weights."""
    config = base.config.to_dict()
    for key in ("_name_or_path", "_attn_implementation_autoset", "attn_implementation", "transformers_version"):
        config.pop(key, None)
    params = list(base.parameters())
    digest = hashlib.sha256()
    for p in (params[0], params[-1]):
        digest.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    return {
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size", config.get("n_embd")),
        "num_layers": config.get("num_hidden_layers", config.get("n_layer")),
        "vocab_size": config.get("vocab_size"),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": digest.hexdigest(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_posterior(
    directory: str | Path,
    model: BayesianHybridModel,
    guide,
    *,
    history: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model``'s point estimates and ``guide``'s parameters to ``directory``."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"cannot create the posterior folder {directory}: {err.strerror}; choose a writable path") from None
    tensors = {f"guide/{k}": v.detach().cpu().contiguous() for k, v in guide.state_dict().items()}
    tensors.update({f"point/{k}": v.detach().cpu().contiguous() for k, v in model.point_values().items()})
    tensors.update(model.priors.tensors())  # the previous round's posterior, when it is the prior
    weights = atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": model.peft.spec.to_dict(),
        "priors": model.priors.to_dict(),
        "guide_spec": model.guide_spec.to_dict(),
        "kl_weight": model.kl_weight,
        "seed": model.seed,
        "sites": {name: list(site.shape) for name, site in model.peft.sites.items()},
        "latent_sites": dict(model.latent_sites),
        "base_model": base_fingerprint(model.peft.base),
        "versions": library_versions(),
        "weights_sha256": _sha256(weights),
        "history": history,
        "extra": extra or {},
    }
    atomic_write_json(directory / META_FILE, meta)
    return directory


def read_posterior_metadata(directory: str | Path) -> dict[str, Any]:
    """The JSON metadata of a saved posterior, checked for format."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise PosteriorMismatchError(
            f"no posterior at {directory}: {META_FILE} is missing; give a folder written by save_posterior"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PosteriorMismatchError(f"{path} is not valid JSON ({err}); the posterior is damaged, refit or restore it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PosteriorMismatchError(f"{path} is not a bhpeft_ppl posterior (format field missing or wrong)")
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise PosteriorMismatchError(f"{path} lacks the field(s) {missing}; the posterior is damaged, refit or restore it")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PosteriorMismatchError(
            f"{path} has format version {meta.get('format_version')}, this library reads {FORMAT_VERSION}"
        )
    return meta


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, here {b!r}")
    return out


def _read_tensors(directory: Path, meta: dict) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise PosteriorMismatchError(f"{path} is missing; the posterior folder is incomplete")
    if _sha256(path) != meta.get("weights_sha256"):
        raise PosteriorMismatchError(
            f"{path} does not match the checksum in {META_FILE}: it was changed or truncated; refit or restore it"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise PosteriorMismatchError(f"{path} is not a readable safetensors file ({err})") from None


def load_guide(directory: str | Path, model: BayesianHybridModel):
    """Load a saved posterior into ``model`` (its point estimates) and return its guide.

    :raises PosteriorMismatchError: the base model, spec, guide spec or sites differ; the
        message lists every difference.
    """
    directory = Path(directory)
    meta = read_posterior_metadata(directory)
    problems = _differences({"base_model": meta["base_model"]}, {"base_model": base_fingerprint(model.peft.base)})
    problems += _differences({"spec": meta["spec"]}, {"spec": model.peft.spec.to_dict()})
    problems += _differences({"guide_spec": meta["guide_spec"]}, {"guide_spec": model.guide_spec.to_dict()})
    here = {name: list(site.shape) for name, site in model.peft.sites.items()}
    problems += _differences({"sites": meta["sites"]}, {"sites": here})
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise PosteriorMismatchError(f"the posterior in {directory} does not fit this model: {shown}")
    tensors = _read_tensors(directory, meta)
    guide = model.make_guide()
    guide_state = {k[len("guide/") :]: v for k, v in tensors.items() if k.startswith("guide/")}
    with local_params():
        missing, unexpected = guide.load_state_dict(guide_state, strict=False)
    if missing or unexpected:
        raise PosteriorMismatchError(
            f"guide parameters in {directory} do not fit: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, param in model.point_values().items():
            key = f"point/{name}"
            if key not in tensors:
                raise PosteriorMismatchError(f"point estimate {name} is missing from {directory / WEIGHTS_FILE}")
            param.copy_(tensors[key])
    return guide


def load_posterior(
    directory: str | Path, base: torch.nn.Module, priors_function=None, model_fn=None, spec: HybridSpec | None = None
):
    """Rebuild the model saved in ``directory`` on ``base`` and load its posterior.

    :param base: the same pretrained model (checked by fingerprint).
    :param priors_function: the prior function, if the saved priors used one.
    :param model_fn: the Pyro model function (a model file's ``model``); default the categorical model.
    :param spec: the spec the posterior must have been fitted with (a run's model file), if known.
    :returns: ``(model, guide)``.
    """
    meta = read_posterior_metadata(directory)
    fingerprint = base_fingerprint(base)
    problems = _differences({"base_model": meta["base_model"]}, {"base_model": fingerprint})
    if problems:
        raise PosteriorMismatchError(f"the posterior in {directory} was fitted on another base model: {'; '.join(problems[:4])}")
    if spec is not None:
        problems = _differences({"spec": meta["spec"]}, {"spec": spec.to_dict()})
        if problems:
            raise PosteriorMismatchError(
                f"the posterior in {directory} does not fit the model file's spec: {'; '.join(problems[:4])}"
            )
    tensors = _read_tensors(Path(directory), meta) if meta["priors"].get("sites") else None
    peft = inject(base, HybridSpec.from_dict(meta["spec"]))
    try:
        model = BayesianHybridModel(
            peft,
            Priors.from_dict(meta["priors"], priors_function, tensors),
            GuideSpec.from_dict(meta["guide_spec"]),
            meta["kl_weight"],
            meta["seed"],
            model_fn,
        )
        return model, load_guide(directory, model)
    except BaseException:
        peft.eject()  # leave the base model as it was
        raise
