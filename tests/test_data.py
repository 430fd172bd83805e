"""Encoding with the model's own tokenizer (the bundled MiniLM's) and padding into batches."""

import pytest
import torch

from bhpeft_ppl.backbone import load_backbone
from bhpeft_ppl.data import Collator, EncodedDataset, encode_choices, encode_texts
from bhpeft_ppl.errors import BHPEFTError


@pytest.fixture(scope="module")
def tokenizer():
    return load_backbone("minilm")[1]


def test_encode_texts_truncates_and_collates_with_index_and_labels(tokenizer):
    data = encode_texts(tokenizer, ["good", "a much longer sentence " * 20], [1, 0], max_length=16)
    batch = Collator.for_tokenizer(tokenizer)([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].sum() < 16 and batch["attention_mask"][1].sum() == 16
    assert torch.equal(batch["labels"], torch.tensor([1, 0])) and torch.equal(batch["index"], torch.tensor([0, 1]))
    pad = batch["input_ids"][0][batch["attention_mask"][0] == 0]
    assert (pad == tokenizer.pad_token_id).all()


def test_encode_choices_gives_one_sequence_per_choice(tokenizer):
    data = encode_choices(
        tokenizer, ["Where is ice?", "What barks?"], [["fridge", "oven", "sun"], ["dog", "cat", "fish"]], [0, 0]
    )
    batch = Collator.for_tokenizer(tokenizer)([data[0], data[1]])
    assert batch["input_ids"].shape[:2] == (2, 3) and batch["attention_mask"].shape == batch["input_ids"].shape
    first = tokenizer.decode(batch["input_ids"][0, 1][batch["attention_mask"][0, 1] == 1])
    assert "ice" in first and "oven" in first


def test_left_padding_puts_pads_first():
    batch = Collator(pad_token_id=9, padding_side="left")(
        [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "index": 0}, {"input_ids": [4], "attention_mask": [1], "index": 1}]
    )
    assert batch["input_ids"][1].tolist() == [9, 9, 4] and batch["attention_mask"][1].tolist() == [0, 0, 1]
    assert "labels" not in batch


def test_label_count_mismatch_is_a_clear_error():
    with pytest.raises(BHPEFTError, match="2 examples but 1 labels"):
        EncodedDataset([{"input_ids": [1], "attention_mask": [1]}] * 2, [0])
