"""Pyro model files: the three shipped in ``models/`` (task, spec, priors, guide, and a trace equal to the
library's ``categorical_model``), name resolution, and every kind of bad file, each a ``SpecError`` that
names the file and the problem."""

import hashlib
import sys
import textwrap

import pyro
import pytest
import torch
from helpers import choice_dataset, full_batch, separable_dataset, tiny_bert
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from bhpeft_ppl.errors import SpecError
from bhpeft_ppl.guides import GuideSpec, local_params
from bhpeft_ppl.inject import inject
from bhpeft_ppl.model import BayesianHybridModel, categorical_model
from bhpeft_ppl.modelfile import REPOSITORY_MODELS, ModelFile, load_model_file, resolve_model_file
from bhpeft_ppl.priors import Laplace, Normal, StudentT
from bhpeft_ppl.spec import HybridSpec

SHIPPED = {"sentiment": "classification", "news": "classification", "commonsense": "multiple_choice"}


@pytest.fixture(scope="module", params=list(SHIPPED))
def shipped(request) -> ModelFile:
    return load_model_file(REPOSITORY_MODELS / f"{request.param}.py")


# The shipped model files -----------------------------------------------------------------------------
def test_shipped_files_load_with_their_task_and_metadata(shipped):
    name = shipped.path.stem
    assert shipped.task == name
    assert shipped.path == REPOSITORY_MODELS / f"{name}.py"
    assert shipped.sha256 == hashlib.sha256(shipped.path.read_bytes()).hexdigest()
    assert shipped.doc and shipped.doc == shipped.doc.strip()
    assert shipped.kl_weight == 1.0
    assert shipped.guide == GuideSpec(default="mean_field", init_scale=0.01)
    assert callable(shipped.model)


@pytest.mark.parametrize("num_labels", [2, 4, 5])
def test_hybrid_spec_takes_num_labels_from_the_data(shipped, num_labels):
    spec = shipped.hybrid_spec(num_labels)
    assert isinstance(spec, HybridSpec)
    assert spec.head.num_labels == num_labels
    assert spec.head.task == SHIPPED[shipped.path.stem]
    assert spec.components == ("lora", "adapter", "prefix")
    assert spec.lora.rank == 8 and spec.adapter.reduction_factor == 16 and spec.prefix.num_virtual_tokens == 10
    assert spec.prefix.reparameterize and spec.prefix.gate
    assert "num_labels" not in shipped.spec.get("head", {}), "hybrid_spec must not write into the file's SPEC"


def _sites_by_role(spec: HybridSpec) -> dict:
    peft = inject(tiny_bert(), spec)
    try:
        return dict(peft.sites)
    finally:
        peft.eject()


def test_priors_resolve_to_the_documented_families(shipped):
    name = shipped.path.stem
    sites = _sites_by_role(shipped.hybrid_spec(3))
    for site_name, site in sites.items():
        prior = shipped.priors.for_site(site)
        if site.component in ("lora", "adapter"):
            assert prior == Normal(0.1), site_name
        elif site_name.endswith("prefix_gate"):
            assert prior == Normal(1.0), site_name
        elif site.component == "prefix":
            assert prior == Normal(1.0), site_name
        elif site_name == "classifier.weight":
            expected = StudentT(df=3.0, scale=0.3) if name == "news" else Normal(0.5)
            assert prior == expected, site_name
        elif site_name == "classifier.bias":
            # commonsense has no bias pattern: a shared bias cancels in the softmax over choices
            assert prior == (Normal(0.5) if name == "commonsense" else Normal(1.0)), site_name
        else:
            pytest.fail(f"unexpected site {site_name}")
    assert {"classifier.weight", "classifier.bias"} <= set(sites)


def _trace(model: BayesianHybridModel, batch, num_data: int):
    with local_params():
        trace = poutine.trace(poutine.seed(model, rng_seed=3)).get_trace(batch, num_data)
    trace.compute_log_prob()
    return trace


def test_model_function_traces_like_the_library_categorical_model(shipped):
    multiple_choice = SHIPPED[shipped.path.stem] == "multiple_choice"
    data = choice_dataset(6, 3) if multiple_choice else separable_dataset(6)
    num_labels = 3 if multiple_choice else 2
    peft = inject(tiny_bert(), shipped.hybrid_spec(num_labels))
    try:
        own = BayesianHybridModel(peft, shipped.priors, shipped.guide, model_fn=shipped.model)
        library = BayesianHybridModel(peft, shipped.priors, shipped.guide)
        assert library.model_fn is categorical_model and own.model_fn is shipped.model
        batch = full_batch(data)
        num_data = 40  # the plate scales the likelihood by N / B
        a, b = _trace(own, batch, num_data), _trace(library, batch, num_data)
        samples_a = [n for n, s in a.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
        samples_b = [n for n, s in b.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]
        assert samples_a == samples_b
        assert set(samples_a) == set(peft.sites) | {"obs"}
        for name in samples_a:
            sa, sb = a.nodes[name], b.nodes[name]
            assert sa["is_observed"] == sb["is_observed"] == (name == "obs"), name
            assert torch.equal(sa["value"], sb["value"]), name
            assert type(sa["fn"]) is type(sb["fn"]), name
            torch.testing.assert_close(sa["log_prob_sum"], sb["log_prob_sum"], msg=name)
            assert sa["scale"] == sb["scale"], name
        obs = a.nodes["obs"]
        assert torch.equal(obs["value"], batch["labels"])
        assert obs["scale"] == pytest.approx(num_data / len(data))
        assert [f.name for f in obs["cond_indep_stack"]] == ["data"]
        torch.testing.assert_close(a.log_prob_sum(), b.log_prob_sum())
        # the likelihood term is the categorical log-probability of the labels under the model's scores, times N / B
        with local_params(), torch.no_grad():
            scores = peft(batch, {n: a.nodes[n]["value"] for n in peft.sites})
        expected = torch.distributions.Categorical(logits=scores).log_prob(batch["labels"]).sum() * num_data / len(data)
        torch.testing.assert_close(obs["log_prob_sum"], expected, atol=1e-4, rtol=1e-5)
    finally:
        peft.eject()


# Resolution ------------------------------------------------------------------------------------------------
def test_resolve_model_file_by_bare_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_file("sentiment") == REPOSITORY_MODELS / "sentiment.py"
    assert resolve_model_file("models/news.py") == REPOSITORY_MODELS / "news.py"
    assert load_model_file("commonsense").task == "commonsense"
    own = tmp_path / "sentiment"
    own.write_text("x = 1\n")
    assert resolve_model_file("sentiment") == own.relative_to(tmp_path), "an existing file wins over models/"
    with pytest.raises(SpecError, match=r"no_such_model.*not found.*\['commonsense', 'news', 'sentiment'\]"):
        resolve_model_file("no_such_model")


# Bad model files ------------------------------------------------------------------------------------------
GOOD = """
    import pyro
    import pyro.distributions as dist

    TASK = "sentiment"
    SPEC = {"lora": {"rank": 2}, "head": {"task": "classification"}}

    def model(hybrid, batch, num_data):
        weights = hybrid.sample_weights()
        logits = hybrid.peft(batch, weights)
        with pyro.plate("data", size=num_data, subsample=batch["index"]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=batch.get("labels"))
        return logits
"""


def write(tmp_path, body: str, name: str = "my_model.py", base: str = GOOD):
    path = tmp_path / name
    path.write_text(textwrap.dedent(base) + textwrap.dedent(body))
    return path


def test_a_minimal_file_with_optional_exports_loads(tmp_path):
    path = write(
        tmp_path,
        """
        PRIORS = {"components": {"lora": {"family": "laplace", "scale": 0.2}}}
        GUIDE = "map"
        KL_WEIGHT = 0.5
        """,
    )
    mf = load_model_file(path)
    assert mf.task == "sentiment" and mf.path == path
    assert mf.guide == GuideSpec.map()
    assert mf.kl_weight == 0.5
    assert mf.priors.components == {"lora": Laplace(scale=0.2)}
    assert mf.hybrid_spec(2).lora.rank == 2
    plain = load_model_file(write(tmp_path, "", name="plain.py"))
    assert plain.guide == GuideSpec() and plain.kl_weight == 1.0 and plain.priors.to_dict()["components"] == {}


def assert_spec_error(path, *fragments: str) -> str:
    with pytest.raises(SpecError) as err:
        load_model_file(path)
    message = str(err.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_file(tmp_path):
    assert_spec_error(tmp_path / "absent.py", "not found")


def test_not_a_python_file(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text(textwrap.dedent(GOOD))
    assert_spec_error(path, "must be a Python file ending in .py")


def test_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text('TASK = "sentiment"\nSPEC = {}\n\ndef model(hybrid, batch, num_data)\n    return 1\n')
    assert_spec_error(path, "SyntaxError", "(line 4)")


def test_error_on_import_names_the_exception_and_is_not_left_imported(tmp_path):
    path = write(tmp_path, 'raise RuntimeError("no GPU here")\n', name="raising.py")
    before = set(sys.modules)
    assert_spec_error(path, "RuntimeError", "no GPU here", "on import")
    assert set(sys.modules) == before
    missing_import = tmp_path / "imports.py"
    missing_import.write_text("import no_such_package_for_bhpeft\n")
    assert_spec_error(missing_import, "ModuleNotFoundError", "no_such_package_for_bhpeft")


def test_missing_exports_are_listed(tmp_path):
    path = tmp_path / "partial.py"
    path.write_text('TASK = "news"\n')
    message = assert_spec_error(path, "missing: SPEC, model")
    assert "TASK," not in message.split("missing:")[1]
    empty = tmp_path / "empty.py"
    empty.write_text("")
    assert_spec_error(empty, "missing: TASK, SPEC, model")


def test_unknown_task(tmp_path):
    assert_spec_error(write(tmp_path, 'TASK = "translation"\n'), "TASK must be one of", "'translation'")


def test_spec_not_a_dict(tmp_path):
    assert_spec_error(write(tmp_path, 'SPEC = ["lora"]\n'), "SPEC must be a dict", "list")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ('{"lora": {"rank": 2, "bogus": 1}}', "unknown LoRASpec field(s) ['bogus']"),
        ('{"lorra": {"rank": 2}}', "unknown HybridSpec field(s) ['lorra']"),
        ('{"lora": {"rank": 2}, "head": {"pooling": "max"}}', "HeadSpec.pooling"),
        ('{"lora": {"rank": 0}}', "LoRASpec.rank"),
        ('{"head": {"task": "classification"}}', "at least one of lora, adapter, prefix"),
    ],
    ids=["unknown-component-field", "unknown-component", "bad-head", "bad-rank", "no-component"],
)
def test_invalid_spec(tmp_path, spec, fragment):
    assert_spec_error(write(tmp_path, f"SPEC = {spec}\n"), fragment)


def test_model_with_a_wrong_signature(tmp_path):
    path = write(tmp_path, "def model(hybrid, batch):\n    return None\n")
    assert_spec_error(path, "model(hybrid, batch)", "must accept (hybrid, batch, num_data)")
    assert_spec_error(write(tmp_path, "model = 3\n", name="not_callable.py"), "model must be a function")
    # extra arguments with defaults are fine
    load_model_file(write(tmp_path, "def model(hybrid, batch, num_data, extra=1):\n    return None\n", name="ok.py"))


@pytest.mark.parametrize("value", ["-1.0", "0", '"1"'])
def test_kl_weight_must_be_positive(tmp_path, value):
    assert_spec_error(write(tmp_path, f"KL_WEIGHT = {value}\n"), "KL_WEIGHT must be a positive number")


def test_unknown_guide_preset(tmp_path):
    assert_spec_error(write(tmp_path, 'GUIDE = "full_rank"\n'), "unknown guide preset 'full_rank'")
    assert_spec_error(write(tmp_path, 'GUIDE = {"default": "flow"}\n', name="family.py"), "unknown guide family 'flow'")


def test_invalid_priors(tmp_path):
    assert_spec_error(
        write(tmp_path, 'PRIORS = {"components": {"lora": {"family": "cauchy"}}}\n'), "unknown prior family 'cauchy'"
    )


def test_declared_num_labels_must_agree_with_the_data(tmp_path):
    path = write(tmp_path, 'SPEC = {"lora": {"rank": 2}, "head": {"num_labels": 4}}\n')
    mf = load_model_file(path)
    assert mf.hybrid_spec(4).head.num_labels == 4
    with pytest.raises(SpecError) as err:
        mf.hybrid_spec(3)
    assert str(path) in str(err.value) and "is 4 but the data has 3 classes" in str(err.value)


# Regression: a SPEC whose "head" is not a mapping once raised TypeError instead of a SpecError naming the file.
@pytest.mark.parametrize("head", ["None", '"classification"'], ids=["none", "string"])
def test_spec_head_not_a_mapping_is_a_spec_error(tmp_path, head):
    assert_spec_error(write(tmp_path, f'SPEC = {{"lora": {{"rank": 2}}, "head": {head}}}\n'), "head")


def test_model_file_runs_as_a_pyro_model(tmp_path):
    mf = load_model_file(write(tmp_path, ""))
    peft = inject(tiny_bert(), mf.hybrid_spec(2))
    try:
        model = BayesianHybridModel(peft, mf.priors, mf.guide, mf.kl_weight, model_fn=mf.model)
        batch = full_batch(separable_dataset(4))
        pyro.clear_param_store()
        with local_params():
            trace = poutine.trace(model).get_trace(batch, 4)
        assert trace.nodes["obs"]["is_observed"]
        samples = {n for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
        assert samples == set(peft.sites) | {"obs"}
        assert pyro.get_param_store().keys() == set()
    finally:
        peft.eject()
