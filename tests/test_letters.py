"""Answer-letter scoring of multiple choice for decoders: scoring resolution, scores equal to the base
language model's next-token logits of the letters, padding invariance, prompt encoding with a real
tokenizer (the bundled MiniLM's), collation, and a short fit and prediction."""

import random

import datasets
import pytest
import torch
from helpers import small_spec, tiny_llama
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bhpeft_ppl.backbone import bundled_path
from bhpeft_ppl.data import (
    LETTERS,
    Collator,
    EncodedDataset,
    encode_letter_prompts,
    encode_split,
    letter_prompt,
    letter_token_ids,
)
from bhpeft_ppl.errors import BHPEFTError, SpecError
from bhpeft_ppl.guides import GuideSpec, local_params
from bhpeft_ppl.infer import FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.predict import predict
from bhpeft_ppl.spec import AdapterSpec, HeadSpec, HybridSpec, LoRASpec

VOCAB = 50
K = 3
LETTER_IDS = [20, 21, 22]
MC = HeadSpec(num_labels=K, task="multiple_choice")


def tiny_llama_lm(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 32-wide Llama with its LM head (random weights fixed by ``seed``), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture
def letter_peft():
    """The small hybrid on a tiny Llama LM, scored by answer letters, and an untouched twin of the base."""
    peft = inject(tiny_llama_lm(), small_spec(MC))
    yield peft, tiny_llama_lm()
    peft.eject()


ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


def padded(rows: list[list[int]], side: str, pad: int = 0) -> dict[str, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "choice_token_ids": torch.tensor([LETTER_IDS] * len(rows))}


def alone(row: list[int]) -> dict[str, torch.Tensor]:
    return padded([row], "right")


# Scoring resolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("make_lm", [tiny_llama_lm, tiny_gpt2_lm], ids=["llama", "gpt2"])
def test_decoder_with_lm_head_scores_answer_letters_without_head_sites(make_lm):
    peft = inject(make_lm(), small_spec(MC))
    try:
        assert peft.is_decoder
        assert peft.scoring == "answer_letters"
        assert peft.head is None
        assert not [n for n in peft.sites if n.startswith("classifier")]
        assert {s.component for s in peft.sites.values()} == {"lora", "adapter", "prefix"}
    finally:
        peft.eject()


def test_decoder_without_lm_head_scores_per_choice():
    peft = inject(tiny_llama(), small_spec(MC))
    try:
        assert peft.is_decoder and peft.scoring == "per_choice"
        assert peft.sites["classifier.weight"].shape == (1, 32)
        assert peft.sites["classifier.bias"].shape == (1,)
    finally:
        peft.eject()


def test_explicit_answer_letters_without_lm_head_is_a_spec_error_and_leaves_the_base_clean():
    base = tiny_llama()
    spec = small_spec(HeadSpec(num_labels=K, task="multiple_choice", scoring="answer_letters"))
    with pytest.raises(SpecError, match=r"answer_letters.*language-model head"):
        inject(base, spec)
    peft = inject(base, small_spec(MC))  # the failed injection was undone
    peft.eject()


def test_explicit_per_choice_on_a_causal_lm_keeps_per_choice():
    peft = inject(tiny_llama_lm(), small_spec(HeadSpec(num_labels=K, task="multiple_choice", scoring="per_choice")))
    try:
        assert peft.scoring == "per_choice"
        assert peft.sites["classifier.weight"].shape == (1, 32)
        model = BayesianHybridModel(peft)
        ids = torch.randint(2, VOCAB, (2, K, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            scores = peft({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, model.initial_values)
        assert scores.shape == (2, K)
    finally:
        peft.eject()


def test_classification_scoring_stays_classification_on_a_causal_lm():
    peft = inject(tiny_llama_lm(), small_spec(HeadSpec(num_labels=4)))
    try:
        assert peft.scoring == "classification"
        assert peft.sites["classifier.weight"].shape == (4, 32)
    finally:
        peft.eject()


def test_answer_letters_needs_multiple_choice():
    with pytest.raises(SpecError, match="multiple_choice"):
        HeadSpec(task="classification", scoring="answer_letters")
    with pytest.raises(SpecError, match="scoring"):
        HeadSpec(task="multiple_choice", num_labels=3, scoring="letters")


# Scores --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_zero_peft_weights_give_the_base_models_letter_logits(letter_peft):
    peft, reference = letter_peft
    weights = BayesianHybridModel(peft).initial_values
    assert torch.count_nonzero(weights["model.layers.0.self_attn.q_proj.lora_B"]) == 0
    for side in ("right", "left"):
        batch = padded(ROWS, side)
        scores = peft(batch, weights)
        assert scores.shape == (len(ROWS), K)
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        for b, row in enumerate(ROWS):
            last = len(row) - 1 if side == "right" else batch["input_ids"].shape[1] - 1
            torch.testing.assert_close(scores[b], logits[b, last, LETTER_IDS], atol=1e-5, rtol=1e-5)
            own = reference(input_ids=torch.tensor([row])).logits[0, -1, LETTER_IDS]
            torch.testing.assert_close(scores[b], own, atol=1e-5, rtol=1e-5)
        assert scores.std() > 1e-3, "letter logits of a random model should differ"


@torch.no_grad()
def test_letter_ids_pick_the_columns_of_the_vocabulary_logits(letter_peft):
    peft, reference = letter_peft
    weights = BayesianHybridModel(peft).initial_values
    batch = padded(ROWS, "right")
    batch["choice_token_ids"] = torch.tensor([[3, 4, 5], [40, 41, 42], [9, 1, 30]])
    scores = peft(batch, weights)
    for b, row in enumerate(ROWS):
        own = reference(input_ids=torch.tensor([row])).logits[0, -1]
        torch.testing.assert_close(scores[b], own[batch["choice_token_ids"][b]], atol=1e-5, rtol=1e-5)


def _random_weights(peft, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """One draw of a guide of spread ``scale`` around the initial values: every PEFT weight nonzero."""
    guide = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=scale)).make_guide()
    torch.manual_seed(0)
    with local_params(), torch.no_grad():
        return {k: v.detach() for k, v in guide().items()}


def _check_rows_alone(peft, weights, side: str) -> None:
    batch = padded(ROWS, side, pad=3)
    with torch.no_grad():
        scores = peft(batch, weights)
        assert torch.isfinite(scores).all()
        for b, row in enumerate(ROWS):
            where = f"row {b}, {side} padding"
            torch.testing.assert_close(
                scores[b : b + 1], peft(alone(row), weights), atol=1e-5, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}"
            )


def test_right_padded_batches_score_as_each_row_alone_with_nonzero_weights(letter_peft):
    peft, _ = letter_peft
    weights = _random_weights(peft)
    batch = padded(ROWS, "right")
    with torch.no_grad():
        changed = peft(batch, weights) - peft(batch, BayesianHybridModel(peft).initial_values)
    assert changed.abs().max() > 1e-3, "the PEFT weights should change the scores"
    _check_rows_alone(peft, weights, "right")


def test_left_padded_batches_score_as_each_row_alone_without_prefix():
    """LoRA and adapters act per position, and RoPE attention depends on relative positions only."""
    peft = inject(tiny_llama_lm(), HybridSpec(lora=LoRASpec(rank=2), adapter=AdapterSpec(bottleneck=4), head=MC))
    try:
        _check_rows_alone(peft, _random_weights(peft), "left")
    finally:
        peft.eject()


# Regression: decoders must get position_ids counted over attended tokens, so that a left-padded row is
# scored as it would be alone (with GPT-2's absolute positions every score changed; with RoPE the prefix keys).
@pytest.mark.parametrize(
    ("make_lm", "spec"),
    [(tiny_llama_lm, small_spec(MC)), (tiny_gpt2_lm, HybridSpec(lora=LoRASpec(rank=2), head=MC))],
    ids=["llama-prefix", "gpt2"],
)
def test_left_padded_batches_score_as_each_row_alone(make_lm, spec):
    peft = inject(make_lm(), spec)
    try:
        _check_rows_alone(peft, _random_weights(peft), "left")
    finally:
        peft.eject()


def test_letter_scoring_rejects_per_choice_batches(letter_peft):
    peft, _ = letter_peft
    weights = BayesianHybridModel(peft).initial_values
    batch = padded(ROWS, "right")
    with pytest.raises(SpecError, match="choice_token_ids"):
        peft({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, weights)
    ids = torch.randint(2, VOCAB, (2, K, 4))
    with pytest.raises(SpecError, match="encode_letter_prompts"):
        peft(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "choice_token_ids": torch.tensor([LETTER_IDS] * 2)},
            weights,
        )


# Prompts and tokens -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_path("minilm"), local_files_only=True)


def test_letter_prompt_text():
    text = letter_prompt("  Where would you put a plate?\n", [" cupboard", "table ", "sink"])
    assert text == "Question: Where would you put a plate?\nA. cupboard\nB. table\nC. sink\nAnswer:"
    assert letter_prompt("Q", ["x", "y"], letters="PQ").splitlines()[1:] == ["P. x", "Q. y", "Answer:"]


def test_letter_token_ids_are_one_token_per_letter(tokenizer):
    ids = letter_token_ids(tokenizer, 5)
    assert len(ids) == len(set(ids)) == 5
    for letter, token in zip("ABCDE", ids, strict=True):
        assert tokenizer.encode(" " + letter, add_special_tokens=False) == [token]
    assert letter_token_ids(tokenizer, 3) == ids[:3]
    with pytest.raises(BHPEFTError, match="at most 10 choices"):
        letter_token_ids(tokenizer, len(LETTERS) + 1)


class TwoPieceTokenizer:
    """A tokenizer in which every answer letter is two tokens."""

    truncation_side = "right"

    def encode(self, text, add_special_tokens=True):
        return [1, 2]

    def __call__(self, text, truncation=False, max_length=None):
        return {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}


def test_multi_token_letters_are_an_error():
    with pytest.raises(BHPEFTError, match=r"'A' is 2 tokens.*per_choice"):
        letter_token_ids(TwoPieceTokenizer(), 3)
    tok = TwoPieceTokenizer()
    with pytest.raises(BHPEFTError, match="2 tokens"):
        encode_letter_prompts(tok, ["q"], [["a", "b"]])
    assert tok.truncation_side == "right", "the truncation side must be restored after an error"


def test_encode_letter_prompts_truncates_from_the_left_and_restores_the_side(tokenizer):
    question = "Where would you put a plate after washing it and drying it very carefully with a towel?"
    choices = [["cupboard", "table", "sink"], ["up", "down"]]
    tokenizer.truncation_side = "right"
    full = encode_letter_prompts(tokenizer, [question, "Short?"], choices, [2, 0], max_length=256)
    short = encode_letter_prompts(tokenizer, [question, "Short?"], choices, [2, 0], max_length=12)
    assert tokenizer.truncation_side == "right"
    answer = tokenizer.encode("Answer:", add_special_tokens=False)
    assert len(full[0]["input_ids"]) > 12 and len(short[0]["input_ids"]) == 12
    for data in (full, short):
        for i in range(2):
            ids = data[i]["input_ids"]
            assert ids[-1] == tokenizer.sep_token_id and ids[0] == tokenizer.cls_token_id
            assert ids[-1 - len(answer) : -1] == answer, "the prompt must end with 'Answer:'"
            assert data[i]["attention_mask"] == [1] * len(ids)
    # the truncated prompt is the end of the full one; the question is what was lost
    assert short[0]["input_ids"][1:-1] == full[0]["input_ids"][-11:-1]
    assert "washing" not in tokenizer.decode(short[0]["input_ids"])
    assert full[0]["choice_token_ids"] == letter_token_ids(tokenizer, 3)
    assert full[1]["choice_token_ids"] == letter_token_ids(tokenizer, 2)
    assert [full[i]["labels"] for i in range(2)] == [2, 0]
    tokenizer.truncation_side = "left"
    encode_letter_prompts(tokenizer, ["q"], [["a", "b"]], max_length=8)
    assert tokenizer.truncation_side == "left"
    tokenizer.truncation_side = "right"


def test_encode_split_by_scoring(tokenizer):
    rows = datasets.Dataset.from_dict(
        {
            "question": ["Where is ice?", "What barks?"],
            "choices": [["fridge", "oven", "sun"], ["dog", "cat", "fish"]],
            "label": [0, 0],
        }
    )
    letters = encode_split(tokenizer, rows, "answer_letters", max_length=64)
    assert isinstance(letters[0]["input_ids"][0], int)
    assert letters[0]["choice_token_ids"] == letter_token_ids(tokenizer, 3)
    assert tokenizer.decode(letters[0]["input_ids"], skip_special_tokens=True).endswith("answer :")
    per_choice = encode_split(tokenizer, rows, "per_choice", max_length=64)
    assert len(per_choice[0]["input_ids"]) == 3 and "choice_token_ids" not in per_choice[0]
    assert letters.labels == per_choice.labels == [0, 0]


def test_collator_returns_choice_token_ids(tokenizer):
    data = encode_letter_prompts(tokenizer, ["Where is ice?", "What barks loudly at night?"], [["a", "b", "c"]] * 2, [1, 2])
    for collate in (Collator.for_tokenizer(tokenizer), Collator(pad_token_id=7, padding_side="left")):
        batch = collate([data[0], data[1]])
        assert batch["choice_token_ids"].shape == (2, 3)
        assert batch["choice_token_ids"].tolist() == [letter_token_ids(tokenizer, 3)] * 2
        assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].dim() == 2
        assert batch["labels"].tolist() == [1, 2] and batch["index"].tolist() == [0, 1]
    left = Collator(pad_token_id=7, padding_side="left")([data[0], data[1]])
    assert left["attention_mask"][0, -1] == 1 and left["attention_mask"][0, 0] == 0


# Fit and predict -------------------------------------------------------------------------------------
def letter_dataset(n: int, seed: int = 0) -> EncodedDataset:
    """Prompts of random tokens; the answer is ``k`` iff token ``30 + k`` ends the question."""
    rng = random.Random(seed)
    rows, labels = [], []
    for i in range(n):
        label = i % K
        ids = [rng.randrange(2, 20) for _ in range(rng.randint(3, 7))] + [30 + label, 25]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "choice_token_ids": LETTER_IDS})
        labels.append(label)
    return EncodedDataset(rows, labels)


def test_short_fit_and_predict_with_answer_letters():
    peft = inject(tiny_llama_lm(), HybridSpec(lora=LoRASpec(rank=2), head=MC))
    try:
        model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.05))
        data = letter_dataset(9)
        result = fit(model, data, FitConfig(epochs=2, batch_size=4, lr=1e-2, progress=False))
        assert len(result.history["loss"]) == 6
        assert all(torch.isfinite(torch.tensor(result.history["loss"])))
        collate = Collator(pad_token_id=0, padding_side="left")
        p = predict(model, result.guide, data, 4, batch_size=4, collate_fn=collate)
        assert p.probs.shape == (4, 9, K)
        torch.testing.assert_close(p.probs.sum(-1), torch.ones(4, 9))
        assert p.labels.tolist() == data.labels
        right = predict(model, result.guide, data, 4, batch_size=9)
        torch.testing.assert_close(p.probs, right.probs, atol=1e-5, rtol=1e-4)
    finally:
        peft.eject()


def test_untrained_map_prediction_is_the_softmax_of_the_base_letter_logits():
    peft = inject(tiny_llama_lm(), small_spec(MC))
    try:
        model = BayesianHybridModel(peft, guide_spec=GuideSpec.map())
        data = letter_dataset(4, seed=1)
        p = predict(model, model.make_guide(), data, 1)
        reference = tiny_llama_lm()
        with torch.no_grad():
            for n in range(len(data)):
                logits = reference(input_ids=torch.tensor([data[n]["input_ids"]])).logits[0, -1, LETTER_IDS]
                torch.testing.assert_close(p.probs[0, n], logits.softmax(-1), atol=1e-5, rtol=1e-5)
    finally:
        peft.eject()
