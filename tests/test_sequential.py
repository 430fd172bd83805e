"""Bayesian dynamic fine-tuning: rounds, replay and history, the guide's start at the previous posterior,
saved rounds, configuration checks and resuming from a loaded posterior."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import separable_dataset, small_spec, state_copy, states_equal, tiny_bert

from bhpeft_ppl import sequential
from bhpeft_ppl.data import EncodedDataset
from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.guides import GuideSpec, local_params
from bhpeft_ppl.infer import FitConfig
from bhpeft_ppl.inject import inject
from bhpeft_ppl.posterior_prior import PosteriorPrior
from bhpeft_ppl.sequential import ROUNDS_FILE, DynamicConfig, DynamicFineTuning, merge, subset
from bhpeft_ppl.serialize import META_FILE, WEIGHTS_FILE, load_posterior, read_posterior_metadata

FIT = FitConfig(epochs=1, batch_size=8, lr=5e-2, progress=False, seed=3)
ROUND_SIZE = 8


def round_data(k: int, n: int = ROUND_SIZE) -> EncodedDataset:
    return separable_dataset(n, seed=100 + k)


def ids(data: EncodedDataset) -> list[tuple[int, ...]]:
    """One hashable key per example (its token ids)."""
    return [tuple(e["input_ids"]) for e in data.encodings]


@pytest.fixture
def peft():
    peft = inject(tiny_bert(), small_spec(rank=2))
    yield peft
    peft.eject()


@pytest.fixture
def calls(monkeypatch):
    """Records every ``fit`` the driver makes: the model, training data, config and the guide's state at the start."""
    recorded = []
    real_fit = sequential.fit

    def recording_fit(model, data, config, *, guide=None, collate_fn=None):
        recorded.append({"model": model, "data": data, "config": config, "guide": None if guide is None else state_copy(guide)})
        return real_fit(model, data, config, guide=guide, collate_fn=collate_fn)

    monkeypatch.setattr(sequential, "fit", recording_fit)
    return recorded


def run(peft, rounds: int = 3, **config) -> DynamicFineTuning:
    seed = config.pop("seed", 0)
    driver = DynamicFineTuning(peft, fit_config=FIT, config=DynamicConfig(**config), seed=seed)
    for k in range(rounds):
        driver.update(round_data(k), label=f"r{k}")
    return driver


# Rounds ----------------------------------------------------------------------------------------
def test_three_rounds_are_recorded(peft, calls):
    driver = run(peft)
    assert [(r.index, r.new_examples, r.replayed, r.label) for r in driver.rounds] == [
        (0, ROUND_SIZE, 0, "r0"),
        (1, ROUND_SIZE, 0, "r1"),
        (2, ROUND_SIZE, 0, "r2"),
    ]
    assert all(r.seconds > 0 and len(r.history["loss"]) == 1 for r in driver.rounds)
    assert [c["config"].seed for c in calls] == [FIT.seed, FIT.seed + 1, FIT.seed + 2]
    assert calls[0]["guide"] is None and not calls[0]["model"].priors.sites  # round 0: the original prior
    for call in calls[1:]:
        assert set(call["model"].priors.sites) == set(peft.sites)
        assert all(isinstance(p, PosteriorPrior) for p in call["model"].priors.sites.values())
    assert [ids(c["data"]) for c in calls] == [ids(round_data(k)) for k in range(3)]  # no replay by default
    assert len(driver.kept) == 3


def test_each_round_starts_at_the_previous_posterior(peft, calls):
    driver = DynamicFineTuning(peft, fit_config=FIT)
    driver.update(round_data(0))
    first = driver.guide
    after_first = state_copy(first)
    _, guide = driver.next_model()  # what round 1 starts from
    assert states_equal(state_copy(guide), after_first)
    driver.update(round_data(1))
    assert states_equal(calls[1]["guide"], after_first)  # the guide fit() got, before any step
    assert driver.guide is not first
    assert states_equal(state_copy(first), after_first), "fitting round 1 must not change round 0's guide"
    assert not states_equal(state_copy(driver.guide), after_first), "round 1 should move the guide (test power)"
    # round 1's prior is round 0's posterior
    with local_params(), torch.no_grad():
        for name in peft.sites:
            loc, scale = first[0]._get_loc_and_scale(name)
            part = calls[1]["model"].priors.sites[name].parts[name]
            assert torch.equal(part.loc, loc) and torch.equal(part.scale, scale), name


def test_kl_weight_and_inflation_reach_the_round_models(peft, calls):
    run(peft, rounds=2, kl_weight=0.5, inflation=4)
    assert [c["model"].kl_weight for c in calls] == [0.5, 0.5]
    name = next(iter(peft.sites))
    with local_params(), torch.no_grad():
        guide = calls[1]["model"].make_guide()
        guide.load_state_dict(calls[1]["guide"])
        _, scale = guide[0]._get_loc_and_scale(name)
    torch.testing.assert_close(calls[1]["model"].priors.sites[name].parts[name].scale, 2 * scale)


# Replay ----------------------------------------------------------------------------------------
def test_replay_fraction_of_kept_earlier_examples(peft, calls):
    driver = run(peft, replay=0.5)
    assert [r.replayed for r in driver.rounds] == [0, round(0.5 * ROUND_SIZE), round(0.5 * 2 * ROUND_SIZE)]
    for k, call in enumerate(calls):
        train = ids(call["data"])
        assert train[:ROUND_SIZE] == ids(round_data(k)), "the new round's examples come first"
        earlier = {x for j in range(k) for x in ids(round_data(j))}
        replayed = train[ROUND_SIZE:]
        assert len(replayed) == driver.rounds[k].replayed
        assert len(set(replayed)) == len(replayed), "an example is replayed at most once per round"
        assert set(replayed) <= earlier
    # with two earlier rounds kept, round 2 draws from both
    replayed = set(ids(calls[2]["data"])[ROUND_SIZE:])
    assert replayed & set(ids(round_data(0))) and replayed & set(ids(round_data(1)))


def test_max_history_keeps_only_the_last_rounds(peft, calls):
    driver = run(peft, replay=0.5, max_history=1)
    assert [r.replayed for r in driver.rounds] == [0, 4, 4]
    assert set(ids(calls[2]["data"])[ROUND_SIZE:]) <= set(ids(round_data(1)))
    assert len(driver.kept) == 1 and ids(driver.kept[0]) == ids(round_data(2))


def test_replay_draw_is_seeded(peft, calls):
    run(peft, replay=0.5, seed=5)
    run(peft, replay=0.5, seed=5)
    run(peft, replay=0.5, seed=6)
    first, same, other = (calls[i : i + 3] for i in (0, 3, 6))
    assert [ids(c["data"]) for c in first] == [ids(c["data"]) for c in same]
    assert ids(first[2]["data"]) != ids(other[2]["data"]), "another seed draws other examples"


def test_replay_sample_and_helpers(peft):
    driver = DynamicFineTuning(peft, config=DynamicConfig(replay=0.25), seed=1)
    assert driver.replay_sample(0) is None  # nothing kept yet
    driver.kept = [round_data(0), round_data(1)]
    pool = merge(driver.kept)
    assert len(pool) == 2 * ROUND_SIZE and ids(pool) == ids(round_data(0)) + ids(round_data(1))
    assert pool.labels == round_data(0).labels + round_data(1).labels
    a, b = driver.replay_sample(3), driver.replay_sample(3)
    assert len(a) == 4 and ids(a) == ids(b)
    assert ids(subset(pool, [2, 0])) == [ids(pool)[2], ids(pool)[0]]
    assert DynamicFineTuning(peft, config=DynamicConfig(replay=0.0)).replay_sample(1) is None
    with pytest.raises(SpecError, match="labels"):
        merge([round_data(0), EncodedDataset(round_data(1).encodings, None)])


# Saving ----------------------------------------------------------------------------------------
def test_save_after_each_round_keeps_every_round(peft, tmp_path):
    config = DynamicConfig(replay=0.5, kl_weight=0.5)
    driver = DynamicFineTuning(peft, fit_config=FIT, config=config, seed=2)
    with pytest.raises(SpecError, match="no round"):
        driver.save(tmp_path)
    for k in range(3):
        driver.update(round_data(k), label=f"day {k}")
        assert driver.save(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ROUNDS_FILE, "round_0", "round_1", "round_2"])
    for k in range(3):
        assert sorted(p.name for p in (tmp_path / f"round_{k}").iterdir()) == sorted([WEIGHTS_FILE, META_FILE])
    rounds = json.loads((tmp_path / ROUNDS_FILE).read_text())
    assert rounds["config"] == dataclasses.asdict(config)
    assert rounds["seed"] == 2
    assert [(r["index"], r["new_examples"], r["replayed"], r["label"]) for r in rounds["rounds"]] == [
        (0, 8, 0, "day 0"),
        (1, 8, 4, "day 1"),
        (2, 8, 8, "day 2"),
    ]
    for saved, r in zip(rounds["rounds"], driver.rounds, strict=True):
        assert saved["steps"] == len(r.history["loss"]) and saved["final_loss"] == r.history["loss"][-1]
    # round 0's prior is the original one; later rounds hold the previous posterior
    assert "sites" not in read_posterior_metadata(tmp_path / "round_0")["priors"]
    for k in (1, 2):
        meta = read_posterior_metadata(tmp_path / f"round_{k}")
        assert set(meta["priors"]["sites"]) == set(peft.sites)
        assert meta["kl_weight"] == 0.5
        assert meta["history"]["loss"] == driver.rounds[k].history["loss"]


# Configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("inflation", 0.5),
        ("inflation", "2"),
        ("replay", -0.1),
        ("replay", 1.5),
        ("kl_weight", 0),
        ("kl_weight", -1.0),
        ("max_history", 0),
        ("max_history", 1.5),
    ],
)
def test_invalid_config_raises(field, value):
    with pytest.raises(SpecError, match=field):
        DynamicConfig(**{field: value})


def test_valid_config_edges():
    DynamicConfig(inflation=1, replay=0, max_history=None)
    DynamicConfig(inflation=2.5, replay=1.0, max_history=1, kl_weight=0.1, map_scale=0.05)


def test_empty_round_raises(peft):
    driver = DynamicFineTuning(peft, fit_config=FIT)
    with pytest.raises(SpecError, match="at least one example"):
        driver.update(EncodedDataset([], []))
    assert driver.rounds == [] and driver.model is None


# Resume ----------------------------------------------------------------------------------------
def test_resume_continues_from_a_loaded_posterior(tmp_path, calls):
    base = tiny_bert()
    peft = inject(base, small_spec(rank=2))
    driver = DynamicFineTuning(peft, guide_spec=GuideSpec(components={"head": "low_rank"}, rank=2), fit_config=FIT)
    driver.update(round_data(0))
    driver.update(round_data(1))
    driver.save(tmp_path)
    fitted = state_copy(driver.guide)
    round_1 = (tmp_path / "round_1" / META_FILE).read_text()
    peft.eject()

    model, guide = load_posterior(tmp_path / "round_1", base)
    try:
        assert isinstance(next(iter(model.priors.sites.values())), PosteriorPrior)
        resumed = DynamicFineTuning.resume(model, guide, rounds_done=2, fit_config=FIT)
        assert resumed.model is model and resumed.guide is guide
        assert resumed.guide_spec == driver.guide_spec and resumed.seed == driver.seed
        next_model, next_guide = resumed.next_model()
        assert states_equal(state_copy(next_guide), fitted)
        assert set(next_model.priors.sites) == set(model.peft.sites)
        resumed.update(round_data(2))
        assert states_equal(calls[-1]["guide"], fitted), "the resumed round starts at the loaded posterior"
        assert calls[-1]["config"].seed == FIT.seed + 2, "the numbering of rounds (and seeds) continues"
        assert [(r.index, r.new_examples) for r in resumed.rounds] == [(2, ROUND_SIZE)]
        resumed.save(tmp_path)
        assert (tmp_path / "round_2" / WEIGHTS_FILE).is_file()
        assert (tmp_path / "round_1" / META_FILE).read_text() == round_1, "earlier rounds are left alone"
    finally:
        model.peft.eject()


def test_resume_counts_one_round_by_default(peft):
    driver = run(peft, rounds=1)
    resumed = DynamicFineTuning.resume(driver.model, driver.guide, fit_config=FIT)
    resumed.update(round_data(1))
    assert resumed.rounds[0].index == 1


# Regression 4 (bhpeft_ppl/sequential.py, DynamicFineTuning.save): a resumed driver rewrites rounds.json with its own
# rounds only, so the record of the rounds before the resume (sizes, replay, losses) is lost although their
# folders remain. Remove the marker once save() keeps the earlier entries of rounds.json.
def test_resume_then_save_keeps_earlier_rounds_in_rounds_json(tmp_path):
    base = tiny_bert()
    peft = inject(base, small_spec(rank=2))
    driver = DynamicFineTuning(peft, fit_config=FIT)
    for k in range(2):
        driver.update(round_data(k))
        driver.save(tmp_path)
    peft.eject()

    model, guide = load_posterior(tmp_path / "round_1", base)
    try:
        resumed = DynamicFineTuning.resume(model, guide, rounds_done=2, fit_config=FIT)
        resumed.update(round_data(2))
        resumed.save(tmp_path)
        assert [r["index"] for r in json.loads((tmp_path / ROUNDS_FILE).read_text())["rounds"]] == [0, 1, 2]
    finally:
        model.peft.eject()
