"""Saving and loading a posterior: exact round trip, atomic files, and refusal of anything that does not fit."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil

import pytest
import torch
from helpers import separable_dataset, small_spec, tiny_bert

from bhpeft_ppl.errors import PosteriorMismatchError
from bhpeft_ppl.guides import GuideSpec
from bhpeft_ppl.infer import FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.predict import predict
from bhpeft_ppl.priors import Horseshoe, Priors
from bhpeft_ppl.serialize import META_FILE, WEIGHTS_FILE, load_guide, load_posterior, read_posterior_metadata, save_posterior

S = 3
FIT = FitConfig(epochs=2, batch_size=8, lr=5e-2, progress=False)
CASES = {
    "mean_field": (GuideSpec(init_scale=0.1), None),
    "map": (GuideSpec.map(), None),
    "low_rank": (GuideSpec(default="low_rank", init_scale=0.1, rank=2), None),
    "blob": (GuideSpec.blob(), None),
    "horseshoe_low_rank": (GuideSpec(default="low_rank", rank=2), Priors(patterns={"lora_A": Horseshoe()})),
}


@pytest.fixture(scope="module")
def data():
    return separable_dataset(10, seed=4)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Round trip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_predictions(case, tmp_path, data):
    guide_spec, priors = CASES[case]
    base = tiny_bert()
    peft = inject(base, small_spec())
    model = BayesianHybridModel(peft, priors=priors, guide_spec=guide_spec, kl_weight=0.5, seed=3)
    untrained = predict(model, model.make_guide(), data, S, seed=7)
    result = fit(model, separable_dataset(24), FIT)
    saved = predict(model, result.guide, data, S, seed=7)
    assert not torch.equal(untrained.probs, saved.probs), "the fit should move the posterior (test power)"
    folder = save_posterior(tmp_path / "post", model, result.guide, history=result.history)
    peft.eject()

    assert sorted(os.listdir(folder)) == sorted([WEIGHTS_FILE, META_FILE])
    loaded_model, loaded_guide = load_posterior(folder, base)
    try:
        again = predict(loaded_model, loaded_guide, data, S, seed=7)
        assert torch.equal(saved.probs, again.probs)
        assert torch.equal(saved.point_probs, again.point_probs)
        assert loaded_model.kl_weight == 0.5 and loaded_model.seed == 3
        assert loaded_model.guide_spec == guide_spec
        assert loaded_model.peft.spec == small_spec()
        assert dict(loaded_model.latent_sites) == dict(model.latent_sites)
        assert loaded_model.priors.to_dict() == model.priors.to_dict()
        for name, value in model.point_values().items():
            assert torch.equal(loaded_model.point_values()[name].detach(), value.detach())
        assert read_posterior_metadata(folder)["history"] == result.history
    finally:
        loaded_model.peft.eject()


def test_save_writes_two_files_atomically_and_overwrites(tmp_path):
    base = tiny_bert()
    peft = inject(base, small_spec())
    try:
        model = BayesianHybridModel(peft)
        guide = model.make_guide()
        folder = tmp_path / "nested" / "posterior"
        save_posterior(folder, model, guide, extra={"note": "first"})
        first = _sha256(folder / WEIGHTS_FILE)
        with torch.no_grad():
            next(guide.parameters()).add_(1.0)
        save_posterior(folder, model, guide, extra={"note": "second"})
        assert sorted(os.listdir(folder)) == sorted([WEIGHTS_FILE, META_FILE])
        assert not [f for f in os.listdir(folder) if f.endswith(".tmp") or f.startswith(".")]
        meta = json.loads((folder / META_FILE).read_text())
        assert meta["extra"] == {"note": "second"}
        assert meta["weights_sha256"] == _sha256(folder / WEIGHTS_FILE) != first
    finally:
        peft.eject()


# Refusals --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A posterior of a mean-field guide on ``tiny_bert(0)`` with ``small_spec(rank=4)``."""
    folder = tmp_path_factory.mktemp("saved") / "posterior"
    peft = inject(tiny_bert(), small_spec(rank=4))
    try:
        model = BayesianHybridModel(peft)
        result = fit(model, separable_dataset(16), FitConfig(epochs=1, batch_size=8, progress=False))
        save_posterior(folder, model, result.guide)
    finally:
        peft.eject()
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the saved posterior, free to damage."""
    return shutil.copytree(saved, tmp_path / "copy")


def _rewrite_checksum(folder):
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = _sha256(folder / WEIGHTS_FILE)
    meta_path.write_text(json.dumps(meta))


def test_loads_cleanly_on_matching_model(saved):
    """Control for the refusals below: the untouched posterior loads."""
    base = tiny_bert()
    model, guide = load_posterior(saved, base)
    model.peft.eject()
    assert any(True for _ in guide.parameters())
    peft = inject(base, small_spec(rank=4))
    try:
        load_guide(saved, BayesianHybridModel(peft))
    finally:
        peft.eject()


def test_other_spec_is_refused_naming_the_difference(saved):
    peft = inject(tiny_bert(), small_spec(rank=8))
    try:
        with pytest.raises(PosteriorMismatchError, match="rank"):
            load_guide(saved, BayesianHybridModel(peft))
    finally:
        peft.eject()


def test_other_guide_spec_is_refused(saved):
    peft = inject(tiny_bert(), small_spec(rank=4))
    try:
        with pytest.raises(PosteriorMismatchError, match="guide_spec"):
            load_guide(saved, BayesianHybridModel(peft, guide_spec=GuideSpec.map()))
    finally:
        peft.eject()


def test_other_base_model_is_refused(saved):
    other = tiny_bert(seed=1)
    with pytest.raises(PosteriorMismatchError, match="base"):
        load_posterior(saved, other)
    assert not other.__dict__.get("_bhpeft_injected"), "a refused load must not leave the base injected"
    peft = inject(other, small_spec(rank=4))
    try:
        with pytest.raises(PosteriorMismatchError, match="weights_sha256"):
            load_guide(saved, BayesianHybridModel(peft))
    finally:
        peft.eject()


def test_truncated_weights_are_refused_by_checksum(copy):
    weights = copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    base = tiny_bert()
    with pytest.raises(PosteriorMismatchError, match="checksum"):
        load_posterior(copy, base)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_refused_load_leaves_base_model_reusable(copy, data, damage):
    weights = copy / WEIGHTS_FILE
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        weights.unlink()
    base = tiny_bert()
    with torch.no_grad():
        reference = base(input_ids=torch.tensor([[11, 12, 13]])).last_hidden_state
    with pytest.raises(PosteriorMismatchError):
        load_posterior(copy, base)
    peft = inject(base, small_spec(rank=4))  # raises SpecError if the failed load left PEFT modules attached
    peft.eject()
    with torch.no_grad():
        assert torch.allclose(base(input_ids=torch.tensor([[11, 12, 13]])).last_hidden_state, reference, atol=1e-6)


def test_unreadable_weights_with_valid_checksum_are_refused(copy):
    weights = copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    _rewrite_checksum(copy)
    with pytest.raises(PosteriorMismatchError):
        load_posterior(copy, tiny_bert())


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.mark.parametrize("writer", ["pickle", "torch_save"])
def test_pickle_payload_is_refused_and_never_executed(copy, tmp_path, writer):
    marker = tmp_path / "pwned"
    # the payload is live: unpickling it does create a marker
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()

    weights = copy / WEIGHTS_FILE
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"guide/0.locs.x": _Payload(marker)}, weights)
    _rewrite_checksum(copy)  # so that the checksum passes and the file is actually read
    with pytest.raises(PosteriorMismatchError):
        load_posterior(copy, tiny_bert())
    assert not marker.exists()
    peft = inject(tiny_bert(), small_spec(rank=4))
    try:
        with pytest.raises(PosteriorMismatchError):
            load_guide(copy, BayesianHybridModel(peft))
    finally:
        peft.eject()
    assert not marker.exists()


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(PosteriorMismatchError):
        load_posterior(tmp_path / "nowhere", tiny_bert())
    with pytest.raises(PosteriorMismatchError):
        read_posterior_metadata(tmp_path / "nowhere")


def test_missing_weights_file_is_refused(copy):
    (copy / WEIGHTS_FILE).unlink()
    with pytest.raises(PosteriorMismatchError):
        load_posterior(copy, tiny_bert())


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe{}", b"[1, 2]"], ids=["broken", "empty", "not_utf8", "list"])
def test_invalid_json_is_refused(copy, content):
    (copy / META_FILE).write_bytes(content)
    with pytest.raises(PosteriorMismatchError):
        load_posterior(copy, tiny_bert())


@pytest.mark.parametrize(
    "change",
    [
        {"format": "something.else"},
        {"format_version": 999},
    ],
    ids=["format", "version"],
)
def test_wrong_format_is_refused(copy, change):
    meta = json.loads((copy / META_FILE).read_text())
    meta.update(change)
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PosteriorMismatchError):
        load_posterior(copy, tiny_bert())


@pytest.mark.parametrize("key", ["base_model", "spec", "sites", "guide_spec", "weights_sha256"])
def test_metadata_missing_a_field_is_refused(copy, key):
    meta = json.loads((copy / META_FILE).read_text())
    del meta[key]
    (copy / META_FILE).write_text(json.dumps(meta))
    base = tiny_bert()
    with pytest.raises(PosteriorMismatchError):
        load_posterior(copy, base)
    base.__dict__.pop("_bhpeft_injected", None)  # a failed load may leave the base injected; tidy up
