"""Tiny in-memory models and synthetic data for the model / fit / predict / serialize tests.

Nothing is downloaded: the base models are randomly initialised from a config,
and the data are token ids drawn from a seeded generator.
"""

from __future__ import annotations

import random

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from bhpeft_ppl.data import Collator, EncodedDataset
from bhpeft_ppl.spec import AdapterSpec, HeadSpec, HybridSpec, LoRASpec, PrefixSpec

VOCAB = 50
SIGNAL_TOKEN = 7  # label 1 iff this token appears
NOISE_TOKENS = (10, VOCAB)  # noise tokens never equal the signal token nor the pad id 0


def tiny_bert(seed: int = 0) -> BertModel:
    """A 2-layer, 32-wide BERT with random weights (fixed by ``seed``), in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return BertModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaModel:
    """A 2-layer, 32-wide Llama (grouped-query attention: 4 query, 2 key/value heads), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    return LlamaModel(config).eval()


def small_spec(head: HeadSpec | None = None, rank: int = 4) -> HybridSpec:
    """All three PEFT components, sized for the tiny models."""
    return HybridSpec(
        LoRASpec(rank=rank),
        AdapterSpec(bottleneck=4),
        PrefixSpec(num_virtual_tokens=3),
        head or HeadSpec(),
    )


def _sequence(rng: random.Random, length: int, signal: bool) -> list[int]:
    ids = [rng.randrange(*NOISE_TOKENS) for _ in range(length)]
    if signal:
        ids[rng.randrange(length)] = SIGNAL_TOKEN
    return ids


def separable_dataset(n: int = 48, seed: int = 0, min_len: int = 5, max_len: int = 9) -> EncodedDataset:
    """Binary task: label 1 iff token ``SIGNAL_TOKEN`` appears; balanced, variable lengths."""
    rng = random.Random(seed)
    rows, labels = [], []
    for i in range(n):
        label = i % 2
        length = rng.randint(min_len, max_len)
        rows.append({"input_ids": _sequence(rng, length, bool(label)), "attention_mask": [1] * length})
        labels.append(label)
    return EncodedDataset(rows, labels)


def choice_dataset(n: int = 12, k: int = 3, seed: int = 0, min_len: int = 4, max_len: int = 7) -> EncodedDataset:
    """Multiple choice: ``k`` sequences per example; the correct one holds ``SIGNAL_TOKEN``."""
    rng = random.Random(seed)
    rows, labels = [], []
    for i in range(n):
        label = i % k
        seqs = [_sequence(rng, rng.randint(min_len, max_len), j == label) for j in range(k)]
        rows.append({"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]})
        labels.append(label)
    return EncodedDataset(rows, labels)


def full_batch(data: EncodedDataset) -> dict[str, torch.Tensor]:
    """Every example of ``data`` in one padded batch (with ``index`` and ``labels``)."""
    return Collator()([data[i] for i in range(len(data))])


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached clone of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
