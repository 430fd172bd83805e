"""Tokenised examples and padded batches for the model.

A batch is a dict of tensors: ``input_ids`` and ``attention_mask`` of shape
``[B, T]`` (or ``[B, K, T]`` for ``K`` choices scored one by one), ``labels [B]``
when known, ``index [B]``, the position of each example in its dataset (the
plate's subsample), and for answer-letter scoring ``choice_token_ids [B, K]``.

Multiple choice is encoded in one of two ways (see :class:`~bhpeft_ppl.spec.HeadSpec`):

* per choice (encoders): :func:`encode_choices` makes ``K`` (question, choice) pairs;
* answer letters (decoders): :func:`encode_letter_prompts` makes one prompt ::

      Question: Where would you put a plate after washing it?
      A. cupboard
      B. table
      ...
      Answer:

  and records the token id of each letter as it follows the prompt (``" A"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .errors import BHPEFTError


class EncodedDataset(Dataset):
    """Tokenised examples held in memory.

    :param encodings: one dict per example with ``input_ids`` and ``attention_mask``
        (lists of ints, or lists of lists for multiple choice).
    :param labels: class (or correct choice) per example, or ``None``.
    """

    def __init__(self, encodings: Sequence[dict], labels: Sequence[int] | None = None):
        if labels is not None and len(labels) != len(encodings):
            raise BHPEFTError(f"{len(encodings)} examples but {len(labels)} labels; give one label per example")
        self.encodings = list(encodings)
        self.labels = None if labels is None else [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.encodings[i])
        item["index"] = i
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def encode_texts(tokenizer, texts: Sequence[str], labels: Sequence[int] | None = None, max_length: int = 128):
    """Tokenise ``texts`` with the model's own tokenizer (truncating to ``max_length``)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = [{"input_ids": ids, "attention_mask": m} for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    return EncodedDataset(rows, labels)


def encode_choices(
    tokenizer,
    questions: Sequence[str],
    choices: Sequence[Sequence[str]],
    labels: Sequence[int] | None = None,
    max_length: int = 96,
):
    """Tokenise each (question, choice) pair; example ``n`` holds ``K`` sequences."""
    rows = []
    for question, options in zip(questions, choices, strict=True):
        enc = tokenizer([question] * len(options), list(options), truncation=True, max_length=max_length)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return EncodedDataset(rows, labels)


LETTERS = "ABCDEFGHIJ"


def letter_prompt(question: str, choices: Sequence[str], letters: str = LETTERS) -> str:
    """The prompt of :func:`encode_letter_prompts` (ends with ``"Answer:"``)."""
    lines = [f"Question: {question.strip()}"]
    lines += [f"{letters[k]}. {choice.strip()}" for k, choice in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def letter_token_ids(tokenizer, count: int, letters: str = LETTERS) -> list[int]:
    """Token id of ``" A"``, ``" B"``, ... as the next token after ``"Answer:"``.

    :raises BHPEFTError: a letter is not a single token of this tokenizer.
    """
    if count > len(letters):
        raise BHPEFTError(f"{count} choices but only {len(letters)} answer letters; at most {len(letters)} choices")
    ids = []
    for letter in letters[:count]:
        pieces = tokenizer.encode(" " + letter, add_special_tokens=False)
        if len(pieces) != 1:
            raise BHPEFTError(
                f"the answer letter {letter!r} is {len(pieces)} tokens for this tokenizer; answer-letter scoring "
                "needs single-token letters (use HeadSpec(scoring='per_choice'))"
            )
        ids.append(int(pieces[0]))
    return ids


def encode_letter_prompts(
    tokenizer,
    questions: Sequence[str],
    choices: Sequence[Sequence[str]],
    labels: Sequence[int] | None = None,
    max_length: int = 256,
):
    """One lettered prompt per question; over-long prompts lose their *beginning*,
    so that ``"Answer:"`` stays the last token before the letter."""
    rows = []
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        for question, options in zip(questions, choices, strict=True):
            enc = tokenizer(letter_prompt(question, options), truncation=True, max_length=max_length)
            rows.append(
                {
                    "input_ids": enc["input_ids"],
                    "attention_mask": enc["attention_mask"],
                    "choice_token_ids": letter_token_ids(tokenizer, len(options)),
                }
            )
    finally:
        tokenizer.truncation_side = side
    return EncodedDataset(rows, labels)


def encode_split(tokenizer, rows, scoring: str, max_length: int = 128) -> EncodedDataset:
    """Encode a loaded split (columns ``text``/``label`` or ``question``/``choices``/``label``)
    for the model's scoring: ``classification``, ``per_choice`` or ``answer_letters``."""
    labels = list(rows["label"]) if "label" in rows.column_names else None
    if scoring == "classification":
        return encode_texts(tokenizer, list(rows["text"]), labels, max_length)
    questions, options = list(rows["question"]), list(rows["choices"])
    if scoring == "answer_letters":
        return encode_letter_prompts(tokenizer, questions, options, labels, max_length)
    return encode_choices(tokenizer, questions, options, labels, max_length)


def _pad(seqs: list[list[int]], length: int, value: int, left: bool) -> list[list[int]]:
    return [([value] * (length - len(s)) + list(s)) if left else (list(s) + [value] * (length - len(s))) for s in seqs]


class Collator:
    """Pads a list of examples into a batch; ``padding_side`` as the tokenizer's."""

    def __init__(self, pad_token_id: int = 0, padding_side: str = "right"):
        self.pad_token_id = int(pad_token_id)
        self.left = padding_side == "left"

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        choices = isinstance(examples[0]["input_ids"][0], list)
        if choices:
            seqs = [s for ex in examples for s in ex["input_ids"]]
            masks = [m for ex in examples for m in ex["attention_mask"]]
        else:
            seqs = [ex["input_ids"] for ex in examples]
            masks = [ex["attention_mask"] for ex in examples]
        length = max(len(s) for s in seqs)
        ids = torch.tensor(_pad(seqs, length, self.pad_token_id, self.left))  # [N, T]
        mask = torch.tensor(_pad(masks, length, 0, self.left))  # [N, T]
        if choices:
            k = len(examples[0]["input_ids"])
            ids, mask = ids.view(len(examples), k, length), mask.view(len(examples), k, length)  # [B, K, T]
        batch = {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([ex["index"] for ex in examples])}
        if "choice_token_ids" in examples[0]:
            batch["choice_token_ids"] = torch.tensor([ex["choice_token_ids"] for ex in examples])  # [B, K]
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([ex["labels"] for ex in examples])
        return batch

    @classmethod
    def for_tokenizer(cls, tokenizer) -> Collator:
        """Collator using ``tokenizer``'s pad token (its EOS token if it has none) and side."""
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id or 0
        return cls(pad, getattr(tokenizer, "padding_side", "right"))
