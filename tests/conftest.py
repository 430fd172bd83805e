"""Shared fixtures: tiny random-weight Hugging Face models built in memory (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    RobertaConfig,
    RobertaModel,
)

KINDS = ("bert", "roberta", "llama", "gpt2")
ENCODERS = ("bert", "roberta")
DECODERS = ("llama", "gpt2")
HIDDEN = 32
VOCAB = 100

# The test models are tiny: intra-op threads only add synchronisation cost, which grows to
# milliseconds per operation when the CPU cores are busy with other processes.
torch.set_num_threads(1)


def build_tiny_base(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised ``AutoModel``-style base of ``kind``, in eval mode."""
    torch.manual_seed(seed)
    if kind == "bert":
        model = BertModel(
            BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        )
    elif kind == "roberta":
        model = RobertaModel(
            RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        )
    elif kind == "llama":
        model = LlamaModel(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
            )
        )
    elif kind == "gpt2":
        model = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use one of {KINDS}")
    return model.eval()


@pytest.fixture
def tiny_base():
    """Factory ``tiny_base(kind, seed=0)`` for kind in ``bert``, ``roberta``, ``llama``, ``gpt2``."""
    return build_tiny_base


def make_batch(lengths: list[int], seq_len: int | None = None, side: str = "right", seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` ``[B, T]`` with one row per length, padded with zeros on ``side``.

    Real tokens are drawn from ``[2, VOCAB)`` so that they never equal a pad id (0 or RoBERTa's 1).
    """
    t = seq_len or max(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens = torch.randint(2, VOCAB, (n,), generator=generator)
        span = slice(0, n) if side == "right" else slice(t - n, t)
        ids[i, span] = tokens
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def padded_batch():
    """A right-padded batch of three rows (lengths 6, 4, 2) with zeros in its attention mask."""
    return make_batch([6, 4, 2])
