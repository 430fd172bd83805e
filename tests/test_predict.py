"""Posterior predictive: shapes, model averaging, uncertainty decomposition, determinism, point prediction."""

from __future__ import annotations

import pyro
import pytest
import torch
from helpers import choice_dataset, full_batch, separable_dataset, small_spec, state_copy, states_equal, tiny_bert

from bhpeft_ppl.data import EncodedDataset
from bhpeft_ppl.guides import GuideSpec, local_params
from bhpeft_ppl.infer import FitConfig, fit
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.predict import predict
from bhpeft_ppl.spec import HeadSpec

S = 4
GUIDES = {
    "mean_field": GuideSpec(init_scale=0.1),
    "map": GuideSpec.map(),
    "low_rank": GuideSpec(default="low_rank", init_scale=0.1, rank=2),
    "blob": GuideSpec(default="point", patterns={"lora_A": "mean_field"}, init_scale=0.1),
}


@pytest.fixture(scope="module")
def data():
    return separable_dataset(21, seed=3)


@pytest.fixture(scope="module", params=list(GUIDES))
def fitted(request):
    """``(model, guide)`` fitted for a few steps with the guide family ``request.param``."""
    peft = inject(tiny_bert(), small_spec())
    model = BayesianHybridModel(peft, guide_spec=GUIDES[request.param])
    result = fit(model, separable_dataset(24), FitConfig(epochs=2, batch_size=8, lr=5e-2, progress=False))
    yield request.param, model, result.guide
    peft.eject()


def _manual_entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def test_shapes_normalisation_and_model_average(fitted, data):
    _, model, guide = fitted
    p = predict(model, guide, data, S)
    n, c = len(data), 2
    assert p.probs.shape == (S, n, c)
    assert p.mean_probs.shape == (n, c)
    assert p.point_probs.shape == (n, c)
    assert (p.probs >= 0).all()
    assert torch.allclose(p.probs.sum(-1), torch.ones(S, n), atol=1e-5)
    assert torch.allclose(p.point_probs.sum(-1), torch.ones(n), atol=1e-5)
    assert torch.allclose(p.mean_probs, p.probs.mean(0), atol=1e-7)
    assert torch.equal(p.labels, torch.tensor(data.labels))
    assert torch.equal(p.predicted, p.mean_probs.argmax(-1))
    assert p.accuracy() == pytest.approx(float((p.mean_probs.argmax(-1) == p.labels).float().mean()))


def test_uncertainty_decomposition(fitted, data):
    family, model, guide = fitted
    p = predict(model, guide, data, S)
    total = _manual_entropy(p.probs.mean(0))
    expected = _manual_entropy(p.probs).mean(0)
    assert torch.allclose(p.total_entropy, total, atol=1e-6)
    assert torch.allclose(p.expected_entropy, expected, atol=1e-6)
    # Jensen: the entropy of the average is at least the average entropy
    assert (total >= expected - 1e-5).all()
    assert (p.mutual_information >= 0).all()
    assert torch.allclose(p.mutual_information, (total - expected).clamp_min(0.0), atol=1e-6)
    assert torch.allclose(p.summed_variance, p.probs.var(0, unbiased=True).sum(-1), atol=1e-7)
    if family != "map":
        assert p.mutual_information.max() > 1e-7, "a Normal guide should show some epistemic uncertainty"


@pytest.mark.parametrize("fitted", ["map"], indirect=True)
def test_map_draws_are_identical_and_carry_no_epistemic_uncertainty(fitted, data):
    family, model, guide = fitted
    assert family == "map"
    p = predict(model, guide, data, S)
    for s in range(1, S):
        assert torch.equal(p.probs[s], p.probs[0])
    assert p.mutual_information.abs().max() < 1e-6
    assert p.summed_variance.abs().max() < 1e-10
    assert torch.allclose(p.point_probs, p.probs[0], atol=1e-6)


def test_same_seed_same_probs_other_seed_other_probs(fitted, data):
    family, model, guide = fitted
    first = predict(model, guide, data, S, seed=11)
    again = predict(model, guide, data, S, seed=11)
    assert torch.equal(first.probs, again.probs)
    assert torch.equal(first.point_probs, again.point_probs)
    other = predict(model, guide, data, S, seed=12)
    if family == "map":
        assert torch.equal(first.probs, other.probs)
    else:
        assert not torch.equal(first.probs, other.probs)
    # the point prediction does not depend on the draws
    assert torch.allclose(first.point_probs, other.point_probs, atol=1e-6)


def test_batch_size_does_not_change_predictions(fitted, data):
    _, model, guide = fitted
    whole = predict(model, guide, data, S, batch_size=64, seed=2)
    pieces = predict(model, guide, data, S, batch_size=4, seed=2)
    single = predict(model, guide, data, S, batch_size=1, seed=2)
    for other in (pieces, single):
        assert torch.allclose(whole.probs, other.probs, atol=1e-5)
        assert torch.allclose(whole.point_probs, other.point_probs, atol=1e-5)
        assert torch.equal(whole.labels, other.labels)


def test_point_probs_are_the_prediction_at_the_guide_median(fitted, data):
    _, model, guide = fitted
    p = predict(model, guide, data, 2)
    with local_params(), torch.no_grad():
        weights = {k: v.detach() for k, v in guide.median().items()}
        weights.update({k: v.detach() for k, v in model.point_values().items()})
        expected = model.peft(full_batch(data), weights).softmax(-1)
    assert torch.allclose(p.point_probs, expected, atol=1e-5)


def test_predict_changes_neither_guide_nor_param_store(fitted, data):
    _, model, guide = fitted
    pyro.clear_param_store()
    before = state_copy(guide)
    points = {k: v.detach().clone() for k, v in model.point_values().items()}
    predict(model, guide, data, S)
    assert states_equal(before, state_copy(guide))
    assert all(torch.equal(points[k], v) for k, v in model.point_values().items())
    assert list(pyro.get_param_store().keys()) == []


def test_num_samples_must_be_positive(fitted, data):
    _, model, guide = fitted
    with pytest.raises(ValueError):
        predict(model, guide, data, 0)


def test_unlabelled_data_give_no_labels_and_no_accuracy():
    peft = inject(tiny_bert(), small_spec())
    try:
        model = BayesianHybridModel(peft)
        guide = model.make_guide()
        labelled = separable_dataset(6)
        unlabelled = EncodedDataset(labelled.encodings)
        p = predict(model, guide, unlabelled, 2)
        assert p.labels is None
        assert p.probs.shape == (2, 6, 2)
        with pytest.raises(ValueError):
            p.accuracy()
        assert torch.equal(p.probs, predict(model, guide, labelled, 2).probs)
    finally:
        peft.eject()


def test_multiple_choice_probabilities_are_over_choices():
    k = 4
    peft = inject(tiny_bert(), small_spec(HeadSpec(task="multiple_choice", num_labels=k)))
    try:
        model = BayesianHybridModel(peft, guide_spec=GuideSpec(init_scale=0.1))
        guide = model.make_guide()
        data = choice_dataset(7, k)
        p = predict(model, guide, data, 3, batch_size=3)
        assert p.probs.shape == (3, 7, k)
        assert torch.allclose(p.probs.sum(-1), torch.ones(3, 7), atol=1e-5)
        assert torch.equal(p.labels, torch.tensor(data.labels))
        whole = predict(model, guide, data, 3, batch_size=16)
        assert torch.allclose(p.probs, whole.probs, atol=1e-5)
    finally:
        peft.eject()


def test_point_false_skips_the_location_pass(fitted, data):
    _, model, guide = fitted
    with_point = predict(model, guide, data, S, seed=3)
    without = predict(model, guide, data, S, seed=3, point=False)
    assert torch.equal(with_point.probs, without.probs)
    assert torch.equal(without.point_probs, without.mean_probs)


def test_length_sorted_batches_give_the_data_order_and_the_same_predictions(fitted, data):
    _, model, guide = fitted
    sorted_batches = predict(model, guide, data, S, batch_size=4, seed=5)
    in_order = predict(model, guide, data, S, batch_size=4, seed=5, sort_by_length=False)
    assert torch.allclose(sorted_batches.probs, in_order.probs, atol=1e-5)
    assert torch.allclose(sorted_batches.point_probs, in_order.point_probs, atol=1e-5)
    assert torch.allclose(sorted_batches.log_likelihood, in_order.log_likelihood, atol=1e-5)
    assert torch.equal(sorted_batches.labels, torch.tensor(data.labels))
    one_at_a_time = [predict(model, guide, EncodedDataset([data.encodings[i]], [data.labels[i]]), S, seed=5) for i in (0, 7, 20)]
    for i, single in zip((0, 7, 20), one_at_a_time, strict=True):
        assert torch.allclose(sorted_batches.probs[:, i], single.probs[:, 0], atol=1e-5)


def test_length_order_sorts_plain_and_multiple_choice_examples():
    from bhpeft_ppl.predict import length_order

    plain = EncodedDataset([{"input_ids": [1] * n, "attention_mask": [1] * n} for n in (5, 2, 9, 2)])
    assert length_order(plain) == [1, 3, 0, 2]  # ties keep their order
    choices = EncodedDataset(
        [{"input_ids": [[1] * a, [1] * b], "attention_mask": [[1] * a, [1] * b]} for a, b in ((3, 8), (4, 4), (1, 2))]
    )
    assert length_order(choices) == [2, 1, 0]  # by the longest choice
    assert length_order([{"x": 1}]) is None


def test_predictions_are_ordinary_tensors_usable_under_autograd(fitted, data):
    """The passes run in inference mode; what ``predict`` returns must not be inference tensors
    (temperature scaling, for one, takes gradients through a function of the probabilities)."""
    _, model, guide = fitted
    p = predict(model, guide, data, 2)
    for tensor in (p.probs, p.mean_probs, p.point_probs, p.labels, p.log_likelihood):
        assert not tensor.is_inference()
    temperature = torch.ones(1, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(p.mean_probs.log() / temperature, p.labels)
    loss.backward()
    assert temperature.grad is not None
