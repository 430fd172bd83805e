"""Pyro model files: a task's generative model, written by a statistician.

A model file (see ``models/`` in the repository) is a Python file that defines

==============  ========  ===========================================================
name            required  what
==============  ========  ===========================================================
``TASK``        yes       ``"sentiment"``, ``"news"`` or ``"commonsense"`` (the data loader)
``SPEC``        yes       the hybrid spec as plain data (:meth:`HybridSpec.to_dict` form);
                          ``head.num_labels`` may be left out: it comes from the data
``model``       yes       ``model(hybrid, batch, num_data)``: the Pyro model, with the
                          plate ``data`` and the likelihood site ``obs``
``PRIORS``      no        priors as plain data (:meth:`Priors.to_dict` form)
``GUIDE``       no        guide families (:meth:`GuideSpec.to_dict` form) or a preset name
``KL_WEIGHT``   no        :math:`\\beta` on the KL term (default 1: the proper ELBO)
==============  ========  ===========================================================

:func:`load_model_file` imports the file and checks each export, naming what is
missing or wrong.  A model file is code: load only files you trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpecError
from .guides import GuideSpec
from .priors import Priors
from .spec import HybridSpec

TASKS = ("sentiment", "news", "commonsense")
REQUIRED = ("TASK", "SPEC", "model")


@dataclass(frozen=True)
class ModelFile:
    """What a model file exports, checked.

    :ivar path: the file.
    :ivar sha256: hash of its bytes, recorded in run folders.
    """

    path: Path
    sha256: str
    task: str
    spec: dict[str, Any]
    model: Any
    priors: Priors = field(default_factory=Priors)
    guide: GuideSpec = field(default_factory=GuideSpec)
    kl_weight: float = 1.0
    doc: str = ""

    def hybrid_spec(self, num_labels: int) -> HybridSpec:
        """The :class:`HybridSpec` with ``head.num_labels`` taken from the data when the file leaves it out."""
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.spec.items()}
        head = data.setdefault("head", {})
        if not isinstance(head, dict):
            raise SpecError(f"{self.path}: SPEC['head'] must be a mapping, got {type(head).__name__}")
        declared = head.get("num_labels")
        if declared is not None and declared != num_labels:
            raise SpecError(
                f"{self.path}: SPEC['head']['num_labels'] is {declared} but the data has {num_labels} classes; "
                "remove num_labels from SPEC (it is read from the data) or fix the data"
            )
        head["num_labels"] = num_labels
        return HybridSpec.from_dict(data)


def _import(path: Path):
    name = f"bhpeft_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import the model file {path}; it must be a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # sys.exit() in a model file must not end bhpeft silently
        sys.modules.pop(name, None)
        where = f" (line {err.lineno})" if isinstance(err, SyntaxError) and err.lineno else ""
        raise SpecError(f"the model file {path} raised {type(err).__name__}{where} on import: {err}; fix the file") from None
    return module


REPOSITORY_MODELS = Path(__file__).resolve().parent.parent / "models"
"""The ``models/`` folder of a source checkout (editable install), searched by bare name."""


def resolve_model_file(name: str | Path) -> Path:
    """``name`` if it is a file, else ``models/<name>.py`` of the source checkout (``"sentiment"`` works from anywhere)."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = REPOSITORY_MODELS / f"{path.stem}.py"
    if path.suffix in ("", ".py") and path.parent in (Path("."), Path("models")) and candidate.is_file():
        return candidate
    known = sorted(p.stem for p in REPOSITORY_MODELS.glob("*.py")) if REPOSITORY_MODELS.is_dir() else []
    raise SpecError(f"model file {name} not found; give the path of a .py file" + (f" or one of {known}" if known else ""))


def load_model_file(path: str | Path) -> ModelFile:
    """Import a model file and check what it exports.

    :raises SpecError: the file is missing, fails to import, or an export is missing or invalid.
    """
    path = resolve_model_file(path)
    if path.suffix != ".py":
        raise SpecError(f"model file {path} must be a Python file ending in .py")
    module = _import(path)
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:
        raise SpecError(f"the model file {path} must define {', '.join(REQUIRED)}; missing: {', '.join(missing)}")
    task = module.TASK
    if task not in TASKS:
        raise SpecError(f"{path}: TASK must be one of {TASKS}, got {task!r}")
    if not isinstance(module.SPEC, dict):
        raise SpecError(f"{path}: SPEC must be a dict (HybridSpec.to_dict() form), got {type(module.SPEC).__name__}")
    model = module.model
    if not callable(model):
        raise SpecError(f"{path}: model must be a function model(hybrid, batch, num_data)")
    try:
        inspect.signature(model).bind(None, None, None)
    except TypeError:
        raise SpecError(f"{path}: model{inspect.signature(model)} must accept (hybrid, batch, num_data)") from None
    try:
        priors = Priors.from_dict(getattr(module, "PRIORS", {}))
        guide = getattr(module, "GUIDE", None)
        guide = GuideSpec.preset(guide) if isinstance(guide, str) else GuideSpec.from_dict(guide or {})
        head = module.SPEC.get("head", {})
        if not isinstance(head, dict):
            raise SpecError(f"SPEC['head'] must be a mapping (HeadSpec.to_dict() form), got {type(head).__name__}")
        spec_check = {**module.SPEC, "head": {**head, "num_labels": 2}}
        HybridSpec.from_dict(spec_check)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
    kl_weight = getattr(module, "KL_WEIGHT", 1.0)
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, int | float) or not kl_weight > 0:
        raise SpecError(f"{path}: KL_WEIGHT must be a positive number, got {kl_weight!r}")
    return ModelFile(
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        task=task,
        spec=dict(module.SPEC),
        model=model,
        priors=priors,
        guide=guide,
        kl_weight=float(kl_weight),
        doc=inspect.getdoc(module) or "",
    )
