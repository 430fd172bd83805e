"""Draw-invariant modules run once per batch in ``predict``, with identical results."""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS
from helpers import separable_dataset

from bhpeft_ppl.data import Collator
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel
from bhpeft_ppl.predict import predict
from bhpeft_ppl.sharing import shareable_modules, shared_across_draws
from bhpeft_ppl.spec import AdapterSpec, HeadSpec, HybridSpec, LoRASpec, PrefixSpec

SPECS = {
    "bh_peft": HybridSpec.bh_peft(),
    "parallel_adapter_ungated_prefix": HybridSpec.paper_released(),
    "unipelt": HybridSpec.unipelt(),
    "prefix_only": HybridSpec.prefix_only(),
}


def paths(base, modules) -> set[str]:
    name_of = {id(m): n for n, m in base.named_modules()}
    return {name_of[id(m)] for m in modules}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("kind", KINDS)
def test_predictions_are_identical_with_sharing(tiny_base, kind, spec_name):
    peft = inject(tiny_base(kind), SPECS[spec_name])
    model = BayesianHybridModel(peft, seed=0)
    guide = model.make_guide()
    data = separable_dataset(11, seed=2)
    shared = predict(model, guide, data, 4, batch_size=4, seed=5)
    plain = predict(model, guide, data, 4, batch_size=4, seed=5, share_invariant=False)
    assert torch.equal(shared.probs, plain.probs)
    assert torch.equal(shared.point_probs, plain.point_probs)
    assert torch.equal(shared.log_likelihood, plain.log_likelihood)
    assert not torch.allclose(shared.probs[0], shared.probs[1])  # the draws do differ


def test_bert_hybrid_shares_the_embeddings_and_first_projections(tiny_base):
    base = tiny_base("bert")
    inject(base, HybridSpec(LoRASpec(target_modules=("query",)), AdapterSpec(), PrefixSpec(), HeadSpec()))
    base.eval()
    chosen = paths(base, shareable_modules(base))
    assert "embeddings" in chosen
    assert {"encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"} <= chosen  # hooked / plain
    # a module that reads a prefix, or runs a hooked module inside its forward, is never shared
    assert not chosen & {"", "encoder", "encoder.layer.0", "encoder.layer.0.attention.self", "encoder.layer.0.output"}
    assert "encoder.layer.0.output.dense" in chosen  # the adapter hooks its output


def test_last_layer_lora_shares_the_whole_first_layer(tiny_base):
    base = tiny_base("bert")
    inject(base, HybridSpec(LoRASpec(target_modules=("encoder.layer.1.attention.self.query",)), None, None, HeadSpec()))
    base.eval()
    chosen = paths(base, shareable_modules(base))
    assert {"embeddings", "encoder.layer.0"} <= chosen


def test_modules_in_train_mode_are_not_shared(tiny_base):
    """MC dropout: a module in train mode draws new noise in every pass."""
    base = tiny_base("bert")
    inject(base, SPECS["bh_peft"])
    base.eval()
    base.embeddings.dropout.train()
    chosen = paths(base, shareable_modules(base))
    assert "embeddings" not in chosen and "embeddings.dropout" not in chosen
    assert "embeddings.word_embeddings" in chosen


def test_repeated_calls_reuse_the_output_and_new_inputs_do_not(tiny_base):
    base = tiny_base("bert")
    base.eval()
    ids = torch.tensor([[2, 5, 7, 9]])
    with torch.no_grad(), shared_across_draws(shareable_modules(base)) as wrappers:
        assert len(wrappers) == 1  # nothing injected: the whole model
        first = base(input_ids=ids).last_hidden_state
        again = base(input_ids=ids).last_hidden_state
        view = base(input_ids=ids.view(1, 4)).last_hidden_state  # a new view of the same memory
        other = base(input_ids=ids.clone()).last_hidden_state  # equal values, other memory: recomputed
        changed = base(input_ids=ids.flip(-1)).last_hidden_state
        assert again is first and view is first and other is not first
        assert torch.equal(other, first) and not torch.allclose(changed, first)
        assert wrappers[0].hits == 2
    assert "forward" not in base.__dict__  # removed on exit


@pytest.mark.parametrize("kind", KINDS)
def test_draws_reuse_the_embeddings(tiny_base, kind):
    """Over S draws of one batch, the token embedding runs once."""
    peft = inject(tiny_base(kind), SPECS["bh_peft"])
    model = BayesianHybridModel(peft, seed=0)
    guide = model.make_guide()
    batch = next(iter(torch.utils.data.DataLoader(separable_dataset(4), batch_size=4, collate_fn=Collator())))
    model.eval()
    embedding = peft.base.get_input_embeddings()
    with torch.no_grad(), shared_across_draws(shareable_modules(peft.base)) as wrappers:
        for _ in range(3):
            model.predictive(batch, {k: v.detach() for k, v in guide().items()})
        hits = {id(w.forward.__self__): w.hits for w in wrappers}
    owner = next(m for m in peft.base.modules() if id(m) in hits and any(c is embedding for c in m.modules()))
    assert hits[id(owner)] == 2
