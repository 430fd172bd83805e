"""Main comparison: PEFT and uncertainty methods side by side on MiniLM, three tasks, three seeds.

Every method uses the same frozen base model (the pip-bundled all-MiniLM-L6-v2,
``load_backbone("minilm")``), the same training examples, epochs, batch size,
learning rate, schedule and seeds.  Each (task, method, seed) is one *cell*.

Methods (``--methods``; every fit but ``peft_lora``'s is :func:`bhpeft_ppl.infer.fit`,
i.e. SVI with ``ClippedAdam``, a linear schedule with 6 % warm-up, the library's
default priors):

=======================  ======================================================================
``map_lora``             ``HybridSpec.lora_only()``, ``GuideSpec.map()`` (MAP: a point estimate)
``map_adapter``          ``HybridSpec.adapter_only()``, ``GuideSpec.map()``
``map_prefix``           ``HybridSpec.prefix_only()``, ``GuideSpec.map()``
``map_hybrid``           ``HybridSpec.bh_peft()`` (LoRA + adapter + prefix), ``GuideSpec.map()``
``peft_lora``            Hugging Face ``peft`` LoRA (same rank, alpha, dropout, targets) with the
                         library's head (mean pooling, linear), trained by a plain PyTorch loop on
                         the same objective as ``map_lora`` (see :func:`run_peft_lora`)
``mc_dropout``           the ``map_hybrid`` fit, predicted with the base model's dropout on (S passes)
``deep_ensemble``        3 ``map_hybrid`` fits (seeds ``seed``, ``seed + 1000``, ``seed + 2000``),
                         probabilities averaged
``temperature_scaling``  the ``map_hybrid`` fit, logits divided by one temperature fitted by NLL
                         on the validation split (LBFGS on :math:`\\log T`)
``laplace_head``         the ``map_hybrid`` fit with a last-layer Laplace posterior on the head
``blob_lora``            ``HybridSpec.lora_only()``, ``GuideSpec.blob()`` (BLoB-style: q on LoRA A)
``paper_released``       ``HybridSpec.paper_released()``, ``GuideSpec.paper_released()``, and the
                         released code's KL weighting (see :func:`paper_kl_weight`)
``bhpeft_full``          ``HybridSpec.bh_peft()``, ``GuideSpec()`` (mean-field everywhere), proper ELBO
=======================  ======================================================================

Ablations (``--ablations``: these methods on SST-2, into the same results; the
references are ``map_hybrid`` (nothing Bayesian) and ``bhpeft_full`` (everything)):

=======================  ======================================================================
``bayes_lora``           the hybrid with mean-field LoRA sites, MAP elsewhere; likewise
``bayes_adapter``,       ``bayes_adapter``, ``bayes_prefix`` and ``bayes_head``: which component
``bayes_prefix``,        is Bayesian
``bayes_head``
``prior_x0.1``,          ``bhpeft_full`` with every default prior scale multiplied by 0.1 or 10
``prior_x10``
``kl_weight_0.1``,       ``bhpeft_full`` with the KL term weighted by 0.1 or 0.01 (a tempered
``kl_weight_0.01``       posterior; 1 is the proper ELBO)
``prior_x10_lr_0.002``,  those two ablations with the learning rate 0.002 instead of ``--lr``:
``kl_weight_0.01_lr_``   whether their collapse at the default 0.01 comes from the optimiser
``0.002``                (a weak prior pull lets Adam's noise-driven steps move the weights)
``map_prior_x10_lr_``    ``map_hybrid`` under the priors x 10 at learning rate 0.002: whether what
``0.002``                the wider prior gives ``bhpeft_full`` is Bayesian or only weaker regularisation
``bhpeft_draws``         the ``bhpeft_full`` fit predicted with 30 draws; its record also holds the
                         metrics of the first 1, 5 and 10 of them (``draws_1`` ... ``draws_30``)
=======================  ======================================================================

Chosen on validation (``--tuned``: on SST-2 unless ``--tasks`` is given, into the same
results).  The fixed budget above uses one learning rate and the default priors for
every method, which the ablations show is not the best setting for either hybrid.
Each of these cells fits its method on a grid of prior scale factors
:data:`PRIOR_FACTORS` x learning rates :data:`LEARNING_RATES` (9 fits), scores each fit
by its NLL on the validation split (with the method's own draws) and reports the test
metrics of the fit with the lowest validation NLL; the test set plays no part in the
choice.  The record holds the chosen ``prior_scale_factor`` and ``lr``, every grid
point's validation scores (``grid``) and, as ``seconds``, the training time of all 9
fits (the price of the choice; ``chosen_seconds`` is the chosen fit's own).

=======================  ======================================================================
``map_hybrid_tuned``     ``map_hybrid`` (MAP: the prior is a weight penalty) with the prior
                         scales and the learning rate chosen on validation
``bhpeft_full_tuned``    ``bhpeft_full`` with the prior scales and the learning rate chosen on
                         validation
=======================  ======================================================================

Bayesian methods (``mc_dropout``, ``laplace_head``, ``blob_lora``, ``paper_released``,
``bhpeft_full``) predict with S posterior draws (``--samples``, default 10), the
ensemble with its 3 members, point methods with one.  The methods built on the
MAP hybrid (``mc_dropout``, ``deep_ensemble``, ``temperature_scaling``,
``laplace_head``) reuse its fit, saved once per (task, seed) under ``OUT/fits/``;
their ``seconds`` is the training time of the fit(s) they use plus their own
post-hoc step (temperature, Hessian); delete ``OUT/fits`` to refit.

Data (``../shared/data/``; the test sets are fixed, the training sets are drawn
with the cell's seed):

* ``sst2``: train from ``sst2/train.tsv``, test = ``sst2/dev.tsv`` (872);
* ``ag_news``: ``ag_news/test.csv`` (7,600 rows) split with seed 0, stratified,
  into test (1,520, of which ``--test-size`` are kept), validation (760) and train;
* ``commonsense_qa``: train from ``train_rand_split.jsonl``, test = a fixed seeded
  sample of ``dev_rand_split.jsonl``; 5-way, each (question, choice) pair scored.

Training: ``--train-size`` examples per task (default 2,000 SST-2 sentences, 2,000
AG News articles, 1,000 CommonsenseQA questions, i.e. 5,000 scored pairs; a
stratified sample drawn with the cell seed), 2 epochs, batch 16, learning rate
0.01.  The validation split (``--val-size`` other examples of the training file)
is used only by temperature scaling and by the ``--tuned`` methods' choice.  Maximum length: 64 tokens (SST-2), 96
(AG News), 64 per (question, choice) pair (CommonsenseQA).

Metrics per cell, all from :mod:`bhpeft_ppl.calibration` and
:mod:`bhpeft_ppl.selective` on the model average :math:`\\bar p` of the draws:
accuracy, ECE (15 equal-width bins), NLL, Brier, AURC and the accuracy after
rejecting the 10/20/50 % most uncertain (uncertainty :math:`1 - \\max_c \\bar p_c`,
the same score for every method), ``ood_auroc`` (SST-2 only: the same score on
``--ood-size`` AG News texts against the SST-2 test sentences), ``seconds``
(training wall time), ``predict_seconds`` and ``peak_rss_mb`` (the peak resident
memory of the cell's process, ``ru_maxrss`` from ``os.wait4``: every cell runs in
its own child process, ``compare_methods.py --cell TASK METHOD SEED ...``).

Output: ``OUT/results.json`` (``config``, ``versions``, ``seeds`` and one record
per cell), ``OUT/table.md`` (per task: mean ± sd over the seeds done) and the
plots ``OUT/ece_vs_accuracy.png`` and ``OUT/rejection.png``, all rewritten after
every cell.  A rerun skips the cells already in ``results.json``; delete a record
to recompute that cell.

Cost.  Each cell uses one torch thread (``--threads``) and ``--jobs`` 2 cells run
at once.  On the 2 shared cores of this project's machines a second thread makes
things far worse, not better: a MiniLM hybrid step (16 SST-2 sentences) took
0.40 s with one thread and 6.7 s with two, while another job kept one core busy.
Measured real cells (MiniLM, defaults, seed 0, one cell at a time, another job
running on the other core):

=====================================  ========  ==========  =========  ==========
cell                                   train s   predict s   peak MB    accuracy
=====================================  ========  ==========  =========  ==========
``sst2 map_lora``                      74        15          1,070      0.806
``sst2 peft_lora``                     71        15          1,090      0.802
``sst2 map_hybrid``                    99        18          1,221      0.794
``sst2 temperature_scaling``           103       19          726        0.794
``sst2 laplace_head``                  118       18          800        0.795
``sst2 bhpeft_full`` (10 draws)        113       181         1,248      0.804
``commonsense_qa map_lora``            188       37          2,580      0.379
``commonsense_qa map_hybrid``          237       44          3,396      0.345
=====================================  ========  ==========  =========  ==========

(the post-hoc methods count the 99 s of the MAP hybrid fit they reuse), plus
about 8 s per cell to start Python and load the model and data.  Scaled by the
measured step times of the other components and tasks (LoRA alone 0.75 and AG
News 2.5 times a hybrid SST-2 step), one seed of all 12 methods costs about
32 min (SST-2), 59 min (AG News) and 75 min (CommonsenseQA) of one core, half of
it prediction (10 draws of the test set for 4 Bayesian methods); the full run of
3 tasks x 12 methods x 3 seeds is about 8.3 core-hours, **about 4 hours** with
``--jobs 2`` on two free cores (``--test-size 500`` brings it to about 3.3 hours).
``--smoke`` (a tiny random BERT, 40 training examples, 36 cells, each a new
Python process that spends about 4.5 s importing torch, transformers and Pyro)
took 4 min 15 s with another job busy on one core; it used 250 s of CPU in all,
so about 2.2 min on two free cores.

    python analyses/compare_methods.py --out analyses/results/compare_methods
    python analyses/compare_methods.py --out analyses/results/compare_methods --tasks sst2 --seeds 0
    python analyses/compare_methods.py --out analyses/results/compare_methods --ablations
    python analyses/compare_methods.py --out analyses/results/compare_methods --tuned
    python analyses/compare_methods.py --out analyses/results/compare_methods --report
    python analyses/compare_methods.py --smoke --out runs/compare-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from bhpeft_ppl import BayesianHybridModel, FitConfig, GuideSpec, HeadSpec, HybridSpec, inject
from bhpeft_ppl.backbone import load_backbone, save_tiny_backbone
from bhpeft_ppl.calibration import accuracy, as_probs, brier, ece, nll
from bhpeft_ppl.data import Collator, EncodedDataset, encode_split, encode_texts
from bhpeft_ppl.files import atomic_write, atomic_write_json, atomic_write_text, library_versions, source_commit
from bhpeft_ppl.infer import fit
from bhpeft_ppl.loaders import TaskData, load_task, read_split
from bhpeft_ppl.predict import Predictions, posterior_location, predict
from bhpeft_ppl.priors import Priors
from bhpeft_ppl.selective import accuracy_after_rejection, aurc, ood_auroc, uncertainty
from bhpeft_ppl.serialize import load_guide, save_posterior

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASKS = ("sst2", "ag_news", "commonsense_qa")
METHODS = (
    "map_lora",
    "map_adapter",
    "map_prefix",
    "map_hybrid",
    "peft_lora",
    "mc_dropout",
    "deep_ensemble",
    "temperature_scaling",
    "laplace_head",
    "blob_lora",
    "paper_released",
    "bhpeft_full",
)
ABLATIONS = (
    "bayes_lora",
    "bayes_adapter",
    "bayes_prefix",
    "bayes_head",
    "prior_x0.1",
    "prior_x10",
    "kl_weight_0.1",
    "kl_weight_0.01",
    "prior_x10_lr_0.002",
    "kl_weight_0.01_lr_0.002",
    "map_prior_x10_lr_0.002",
    "bhpeft_draws",
)
TUNED = ("map_hybrid_tuned", "bhpeft_full_tuned")
ALL_METHODS = METHODS + ABLATIONS + TUNED
PRIOR_FACTORS = (1.0, 3.0, 10.0)  # the --tuned grid: default prior scales times these ...
LEARNING_RATES = (0.002, 0.005, 0.01)  # ... and these learning rates
DRAWS = (1, 5, 10, 30)  # posterior draws compared by bhpeft_draws
MAX_LENGTH = {"sst2": 64, "ag_news": 96, "commonsense_qa": 64}
TRAIN_SIZE = {"sst2": 2000, "ag_news": 2000, "commonsense_qa": 1000}  # CommonsenseQA: questions, 5 sequences each
REJECT = (0.1, 0.2, 0.5)
ENSEMBLE_SIZE = 3
PAPER_KL = 0.001  # the released code's weight on the KL averaged over the Bayesian weights
SCORE = "max_prob"  # uncertainty for AURC, rejection and OOD: 1 - max_c p_c, defined for every method
METRICS = (
    "accuracy",
    "ece",
    "nll",
    "brier",
    "aurc",
    *(f"accuracy_reject_{round(100 * f)}" for f in REJECT),
    "ood_auroc",
    "seconds",
    "predict_seconds",
    "peak_rss_mb",
)
# options that change the results: a rerun into the same folder must use the same values
SETTINGS = (
    "smoke",
    "model",
    "train_size",
    "val_size",
    "test_size",
    "ood_size",
    "epochs",
    "batch_size",
    "lr",
    "samples",
    "max_length",
    "predict_batch_size",
)
SMOKE_DEFAULTS = {
    "seeds": [0],
    "train_size": 40,
    "val_size": 16,
    "test_size": 30,
    "ood_size": 16,
    "epochs": 1,
    "batch_size": 8,
    "samples": 3,
    "max_length": 32,
}
DONE = "done, skipped"


# Data -----------------------------------------------------------------------------------------------
@dataclass
class Splits:
    """The encoded examples of one cell and the head they need."""

    train: EncodedDataset
    validation: EncodedDataset
    test: EncodedDataset
    ood: EncodedDataset | None  # AG News texts scored by the SST-2 model; None for the other tasks
    head: HeadSpec


def task_data(task: str, seed: int, args: argparse.Namespace) -> TaskData:
    """The task's splits: a fixed test set (seed 0), training and validation samples drawn with ``seed``."""
    if task == "sst2":
        data = load_task("sentiment", DATA / "sst2" / "train.tsv", test=DATA / "sst2" / "dev.tsv", validation_fraction=0.1)
    elif task == "ag_news":
        data = load_task("news", DATA / "ag_news" / "test.csv", validation_fraction=0.1, test_fraction=0.2, seed=0)
    else:
        folder = DATA / "commonsense_qa"
        data = load_task(
            "commonsense", folder / "train_rand_split.jsonl", test=folder / "dev_rand_split.jsonl", validation_fraction=0.1
        )
    data = data.subsample("test", args.test_size, seed=0)
    data = data.subsample("train", args.train_size or TRAIN_SIZE[task], seed=seed)
    return data.subsample("validation", args.val_size, seed=seed)


def load_splits(task: str, tokenizer, seed: int, args: argparse.Namespace) -> Splits:
    """Read and tokenise the cell's data (each (question, choice) pair apart for CommonsenseQA)."""
    data = task_data(task, seed, args)
    scoring = "classification" if data.kind == "classification" else "per_choice"
    length = args.max_length or MAX_LENGTH[task]
    encoded = {split: encode_split(tokenizer, data.splits[split], scoring, length) for split in ("train", "validation", "test")}
    ood = None
    if task == "sst2":
        rows, _ = read_split(DATA / "ag_news" / "test.csv", "news")
        chosen = sorted(random.Random(0).sample(range(len(rows)), args.ood_size))
        ood = encode_texts(tokenizer, rows.select(chosen)["text"], None, length)
    head = HeadSpec(num_labels=data.num_labels, task=data.kind)
    return Splits(encoded["train"], encoded["validation"], encoded["test"], ood, head)


# One cell -------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """Everything one (task, method, seed) needs: the base model, its tokenizer, the data, the settings."""

    task: str
    method: str
    seed: int
    base: torch.nn.Module
    tokenizer: object
    splits: Splits
    args: argparse.Namespace

    @property
    def collate(self) -> Collator:
        return Collator.for_tokenizer(self.tokenizer)

    def fit_config(self, seed: int) -> FitConfig:
        """The training budget shared by every method (``seed`` fixes initial values, order and noise)."""
        a = self.args
        return FitConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=seed, progress=False)

    def predictions(self, model: BayesianHybridModel, guide, data: EncodedDataset, num: int) -> Predictions:
        """``num`` posterior draws' predictions of ``data`` (seeded with the cell seed)."""
        kwargs = {"batch_size": self.args.predict_batch_size, "seed": self.seed, "collate_fn": self.collate}
        return predict(model, guide, data, num, point=False, **kwargs)

    def loader(self, data: EncodedDataset) -> DataLoader:
        """Batches of ``data`` in order, for prediction."""
        return DataLoader(data, batch_size=self.args.predict_batch_size, shuffle=False, collate_fn=self.collate)


@dataclass
class Outcome:
    """What a method returns: class probabilities per draw and its times."""

    probs: torch.Tensor  # [S, N, C] test
    ood_probs: torch.Tensor | None  # [S, M, C] OOD texts (SST-2 only)
    seconds: float  # training wall time
    predict_seconds: float
    extra: dict = field(default_factory=dict)


def hybrid_model(
    cell: Cell, spec: HybridSpec, guide_spec: GuideSpec, seed: int, kl_weight: float = 1.0, priors: Priors | None = None
) -> BayesianHybridModel:
    """``spec`` injected into the cell's base model, as a Pyro model with ``guide_spec`` (default priors unless given)."""
    return BayesianHybridModel(inject(cell.base, spec), priors, guide_spec=guide_spec, kl_weight=kl_weight, seed=seed)


def predict_draws(cell: Cell, model: BayesianHybridModel, guide, num: int) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Test (and OOD) probabilities ``[S, N, C]`` from ``num`` posterior draws, and the seconds it took."""
    start = time.perf_counter()
    probs = cell.predictions(model, guide, cell.splits.test, num).probs  # [S, N, C]
    ood = None
    if cell.splits.ood is not None:
        ood = cell.predictions(model, guide, cell.splits.ood, num).probs  # [S, M, C]
    return probs, ood, time.perf_counter() - start


def run_svi(
    cell: Cell, spec: HybridSpec, guide_spec: GuideSpec, draws: int, kl_weight: float = 1.0, priors: Priors | None = None
) -> Outcome:
    """Fit ``spec`` with ``guide_spec`` by SVI and predict with ``draws`` posterior draws."""
    model = hybrid_model(cell, spec, guide_spec, cell.seed, kl_weight, priors)
    result = fit(model, cell.splits.train, cell.fit_config(cell.seed), collate_fn=cell.collate)
    probs, ood, seconds = predict_draws(cell, model, result.guide, draws)
    return Outcome(probs, ood, result.seconds, seconds)


def cached_fit(
    cell: Cell,
    folder: Path,
    spec: HybridSpec,
    guide_spec: GuideSpec,
    seed: int,
    priors: Priors | None = None,
    lr: float | None = None,
):
    """``(model, guide, training seconds)`` of ``spec`` fitted with ``seed`` on the cell's training set
    (under ``priors``, default ones unless given, and at learning rate ``lr``, ``--lr`` unless given).

    Saved under ``folder`` the first time, so that the methods built on the same fit (and a
    rerun) reuse it; ``fit.json``, written last, marks it complete.
    """
    model = hybrid_model(cell, spec, guide_spec, seed, priors=priors)
    if (folder / "fit.json").is_file():
        guide = load_guide(folder, model)
        return model, guide, json.loads((folder / "fit.json").read_text(encoding="utf-8"))["seconds"]
    config = cell.fit_config(seed)
    if lr is not None:
        config = dataclasses.replace(config, lr=lr)
    result = fit(model, cell.splits.train, config, collate_fn=cell.collate)
    save_posterior(folder, model, result.guide, history=result.history)
    atomic_write_json(folder / "fit.json", {"seconds": result.seconds, "fit_seed": seed, "data_seed": cell.seed})
    return model, result.guide, result.seconds


def map_hybrid_fit(cell: Cell, seed: int) -> tuple[BayesianHybridModel, object, float]:
    """The MAP hybrid fitted with ``seed``, saved under ``OUT/fits/<task>/data<cell seed>_fit<seed>/``."""
    folder = Path(cell.args.out) / "fits" / cell.task / f"data{cell.seed}_fit{seed}"
    return cached_fit(cell, folder, HybridSpec.bh_peft(cell.splits.head), GuideSpec.map(), seed)


def bhpeft_full_fit(cell: Cell) -> tuple[BayesianHybridModel, object, float]:
    """The full BH-PEFT fit of the cell, saved under ``OUT/fits/<task>/bhpeft_full_data<cell seed>/``."""
    folder = Path(cell.args.out) / "fits" / cell.task / f"bhpeft_full_data{cell.seed}"
    return cached_fit(cell, folder, HybridSpec.bh_peft(cell.splits.head), GuideSpec(), cell.seed)


# Methods --------------------------------------------------------------------------------------------
def run_map(cell: Cell) -> Outcome:
    """``map_lora``, ``map_adapter``, ``map_prefix``: one component, all MAP."""
    preset = {"map_lora": HybridSpec.lora_only, "map_adapter": HybridSpec.adapter_only, "map_prefix": HybridSpec.prefix_only}
    return run_svi(cell, preset[cell.method](cell.splits.head), GuideSpec.map(), draws=1)


def run_map_hybrid(cell: Cell) -> Outcome:
    """``map_hybrid``: LoRA + adapter + prefix, all MAP (the fit the post-hoc methods reuse)."""
    model, guide, seconds = map_hybrid_fit(cell, cell.seed)
    probs, ood, predict_seconds = predict_draws(cell, model, guide, 1)
    return Outcome(probs, ood, seconds, predict_seconds)


def run_blob_lora(cell: Cell) -> Outcome:
    """``blob_lora``: mean-field Normal on LoRA A, point estimates (no prior) elsewhere."""
    return run_svi(cell, HybridSpec.lora_only(cell.splits.head), GuideSpec.blob(), cell.args.samples)


def paper_kl_weight(model: BayesianHybridModel, num_data: int) -> float:
    """The KL weight :math:`\\beta` that gives the released code's objective.

    The released code minimises, per minibatch, the mean cross-entropy plus
    :math:`0.001\\,\\mathrm{KL}/M`, the KL summed over the :math:`M` Bayesian weights and
    divided by :math:`M` (``../shared/design/ARCHITECTURE.md``: "CE + 0.001 * mean-KL").
    Our SVI loss is :math:`-\\tfrac{N}{B}\\sum_b \\log p(y_b \\mid w) + \\beta\\,\\mathrm{KL}`;
    divided by :math:`N` it is the mean cross-entropy plus :math:`\\beta\\,\\mathrm{KL}/N`, so

    .. math:: \\beta = 0.001\\, N / M .
    """
    bayesian = sum(model.peft.sites[name].numel for name in model.latent_sites if name in model.peft.sites)
    return PAPER_KL * num_data / bayesian


def run_paper_released(cell: Cell) -> Outcome:
    """``paper_released``: ungated prefix + parallel adapter, Bayesian adapter down-projections, the paper's KL weight.

    The library's presets are used as they are: adapter width ``d / 16``, 10 prefix tokens
    and guide scales starting at 0.01 (the released code used other widths and about 0.05).
    """
    spec = HybridSpec.paper_released(cell.splits.head)
    probe = hybrid_model(cell, spec, GuideSpec.paper_released(), cell.seed)
    beta = paper_kl_weight(probe, len(cell.splits.train))
    probe.peft.eject()
    outcome = run_svi(cell, spec, GuideSpec.paper_released(), cell.args.samples, kl_weight=beta)
    outcome.extra["kl_weight"] = beta
    return outcome


def run_bhpeft_full(cell: Cell) -> Outcome:
    """``bhpeft_full``: all three components and the head mean-field Normal, proper ELBO."""
    model, guide, seconds = bhpeft_full_fit(cell)
    probs, ood, predict_seconds = predict_draws(cell, model, guide, cell.args.samples)
    return Outcome(probs, ood, seconds, predict_seconds)


# Ablations ------------------------------------------------------------------------------------------
def run_bayes_component(cell: Cell) -> Outcome:
    """``bayes_<component>``: the hybrid with that component's sites mean-field Normal, the others MAP."""
    component = cell.method.removeprefix("bayes_")
    guide_spec = GuideSpec(default="map", components={component: "mean_field"})
    return run_svi(cell, HybridSpec.bh_peft(cell.splits.head), guide_spec, cell.args.samples)


def scaled_default_priors(factor: float) -> Priors:
    """The library's default priors (all Normal) with every scale multiplied by ``factor``."""

    def prior(site):
        default = Priors().for_site(site)
        scale = 1.0 / math.sqrt(site.shape[-1]) if default.scale == "fan_in" else float(default.scale)
        return dataclasses.replace(default, scale=scale * factor)

    return Priors(function=prior)


def run_prior_scale(cell: Cell) -> Outcome:
    """``prior_x<k>``: ``bhpeft_full``, and ``map_prior_x<k>``: ``map_hybrid`` (MAP everywhere),
    under the default priors with scales times ``k``."""
    point = cell.method.startswith("map_")
    factor = float(cell.method.removeprefix("map_").removeprefix("prior_x"))
    guide_spec, draws = (GuideSpec.map(), 1) if point else (GuideSpec(), cell.args.samples)
    outcome = run_svi(cell, HybridSpec.bh_peft(cell.splits.head), guide_spec, draws, priors=scaled_default_priors(factor))
    outcome.extra["prior_scale_factor"] = factor
    return outcome


def run_kl_weight(cell: Cell) -> Outcome:
    """``kl_weight_<b>``: ``bhpeft_full`` with the KL term weighted by ``b``."""
    beta = float(cell.method.removeprefix("kl_weight_"))
    outcome = run_svi(cell, HybridSpec.bh_peft(cell.splits.head), GuideSpec(), cell.args.samples, kl_weight=beta)
    outcome.extra["kl_weight"] = beta
    return outcome


def run_other_lr(cell: Cell) -> Outcome:
    """``<ablation>_lr_<r>``: that ablation trained with the learning rate ``r`` instead of ``--lr``."""
    method, lr = cell.method.rsplit("_lr_", 1)
    args = argparse.Namespace(**{**vars(cell.args), "lr": float(lr)})
    outcome = RUNNERS[method](dataclasses.replace(cell, method=method, args=args))
    outcome.extra["lr"] = float(lr)
    return outcome


def tuned_fit(cell: Cell, factor: float, lr: float) -> tuple[BayesianHybridModel, object, float]:
    """The ``--tuned`` method's base (``map_hybrid`` or ``bhpeft_full``) fitted under the default priors
    times ``factor`` at learning rate ``lr``; at (1, ``--lr``) it is the main run's own fit."""
    method = cell.method.removesuffix("_tuned")
    if factor == 1.0 and lr == cell.args.lr:
        return map_hybrid_fit(cell, cell.seed) if method == "map_hybrid" else bhpeft_full_fit(cell)
    guide_spec = GuideSpec.map() if method == "map_hybrid" else GuideSpec()
    folder = Path(cell.args.out) / "fits" / cell.task / f"{method}_data{cell.seed}_prior{factor:g}_lr{lr:g}"
    spec = HybridSpec.bh_peft(cell.splits.head)
    priors = None if factor == 1.0 else scaled_default_priors(factor)
    return cached_fit(cell, folder, spec, guide_spec, cell.seed, priors=priors, lr=lr)


def run_tuned(cell: Cell) -> Outcome:
    """``<method>_tuned``: the fit of :data:`PRIOR_FACTORS` x :data:`LEARNING_RATES` with the lowest
    validation NLL, scored on the test set.

    Each grid point is predicted on the validation split with the method's draws (1 for MAP,
    ``--samples`` for ``bhpeft_full``, seeded with the cell seed); the test set is predicted
    for the chosen fit only.
    """
    draws = 1 if cell.method == "map_hybrid_tuned" else cell.args.samples
    labels = torch.tensor(cell.splits.validation.labels)
    grid = []
    for factor in PRIOR_FACTORS:
        for lr in LEARNING_RATES:
            model, guide, seconds = tuned_fit(cell, factor, lr)
            probs = cell.predictions(model, guide, cell.splits.validation, draws).probs  # [S, N_val, C]
            model.peft.eject()  # the next grid point is injected into the same base model
            scores = scores_of(Outcome(probs, None, seconds, 0.0), labels)
            point = {"prior_scale_factor": factor, "lr": lr, "seconds": seconds}
            grid.append(point | {f"validation_{key}": scores[key] for key in ("accuracy", "ece", "nll", "aurc")})
    chosen = min(grid, key=lambda point: point["validation_nll"])  # the first of equals
    model, guide, _ = tuned_fit(cell, chosen["prior_scale_factor"], chosen["lr"])
    probs, ood, predict_seconds = predict_draws(cell, model, guide, draws)
    extra = {
        "prior_scale_factor": chosen["prior_scale_factor"],
        "lr": chosen["lr"],
        "chosen_seconds": chosen["seconds"],
        "validation_size": len(cell.splits.validation),
        "grid": grid,
    }
    return Outcome(probs, ood, sum(point["seconds"] for point in grid), predict_seconds, extra)


def run_bhpeft_draws(cell: Cell) -> Outcome:
    """``bhpeft_draws``: the ``bhpeft_full`` fit with ``max(DRAWS)`` draws; the metrics of the first
    ``S`` draws for every ``S`` in :data:`DRAWS` and ``--samples`` go to ``draws_<S>`` (the draws are
    sequential, so the first ``S`` of them are what ``S`` draws with the same seed give)."""
    model, guide, seconds = bhpeft_full_fit(cell)
    probs, ood, predict_seconds = predict_draws(cell, model, guide, max(DRAWS))
    outcome = Outcome(probs, ood, seconds, predict_seconds)
    labels = torch.tensor(cell.splits.test.labels)
    for draws in sorted({*DRAWS, cell.args.samples}):  # --samples too: bhpeft_full's own count
        part = Outcome(probs[:draws], None if ood is None else ood[:draws], seconds, predict_seconds)
        outcome.extra[f"draws_{draws}"] = scores_of(part, labels)
    return outcome


def run_mc_dropout(cell: Cell) -> Outcome:
    """``mc_dropout``: the MAP hybrid with the base model in training mode (its dropout on), S passes.

    Each pass draws new dropout masks (hidden-state and attention-probability dropout of
    the base model, as during training); the PEFT weights stay at the MAP.
    """
    model, guide, seconds = map_hybrid_fit(cell, cell.seed)
    location = posterior_location(guide)
    start = time.perf_counter()
    torch.manual_seed(cell.seed)
    model.eval()
    model.peft.base.train()
    try:
        parts = []
        for data in (cell.splits.test, cell.splits.ood):
            if data is None:
                parts.append(None)
                continue
            batches = [
                torch.stack([model.predictive(batch, location)[0] for _ in range(cell.args.samples)])  # [S, B, C]
                for batch in cell.loader(data)
            ]
            parts.append(torch.cat(batches, dim=1))  # [S, N, C]
    finally:
        model.eval()
    return Outcome(parts[0], parts[1], seconds, time.perf_counter() - start)


def run_deep_ensemble(cell: Cell) -> Outcome:
    """``deep_ensemble``: ``ENSEMBLE_SIZE`` MAP hybrids (seeds ``seed + 1000 k``), one draw each."""
    seeds = [cell.seed + 1000 * k for k in range(ENSEMBLE_SIZE)]
    probs, ood, seconds, predict_seconds = [], [], 0.0, 0.0
    for seed in seeds:
        model, guide, fit_seconds = map_hybrid_fit(cell, seed)
        p, o, s = predict_draws(cell, model, guide, 1)
        model.peft.eject()  # the next member is injected into the same base model
        probs.append(p)
        ood.append(o)
        seconds += fit_seconds
        predict_seconds += s
    ood_probs = torch.cat(ood) if cell.splits.ood is not None else None  # [M, N_ood, C]
    return Outcome(torch.cat(probs), ood_probs, seconds, predict_seconds, {"member_seeds": seeds})  # [M, N, C]


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature :math:`T` minimising the validation NLL of :math:`\\mathrm{softmax}(z / T)`.

    :math:`z = \\log p` are the logits up to a per-example constant, which the softmax
    ignores.  LBFGS on :math:`\\log T` keeps :math:`T > 0`.

    :param probs: ``[N, C]`` validation probabilities; ``labels``: ``[N]``.
    """
    logits = probs.double().clamp_min(1e-12).log()  # [N, C]
    log_t = torch.zeros(1, dtype=torch.double, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def with_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)`` over the last dimension (any leading shape)."""
    return torch.softmax(probs.double().clamp_min(1e-12).log() / temperature, dim=-1).float()


def run_temperature_scaling(cell: Cell) -> Outcome:
    """``temperature_scaling``: the MAP hybrid, one temperature fitted on the validation split."""
    model, guide, seconds = map_hybrid_fit(cell, cell.seed)
    start = time.perf_counter()
    val = cell.predictions(model, guide, cell.splits.validation, 1)
    temperature = fit_temperature(val.mean_probs, val.labels)
    seconds += time.perf_counter() - start
    probs, ood, predict_seconds = predict_draws(cell, model, guide, 1)
    ood = with_temperature(ood, temperature) if ood is not None else None
    return Outcome(with_temperature(probs, temperature), ood, seconds, predict_seconds, {"temperature": temperature})


def head_features(cell: Cell, model: BayesianHybridModel, location: dict, data: EncodedDataset) -> torch.Tensor:
    """The head's input at the MAP weights: ``[N, d]``, or ``[N, K, d]`` for ``K`` choices (no dropout)."""
    captured = []
    handle = model.peft.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    model.eval()
    parts = []
    try:
        for batch in cell.loader(data):
            model.predictive(batch, location)
            parts.append(captured.pop().reshape(*batch["input_ids"].shape[:-1], -1))  # [B, d] or [B, K, d]
    finally:
        handle.remove()
    return torch.cat(parts).double()


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:math:`W h + b`: ``[N, C]`` from ``features [N, d]``, or ``[N, K]`` from ``[N, K, d]`` (one score per choice)."""
    out = features @ weight.T + bias  # [N, C] or [N, K, 1]
    return out.squeeze(-1) if features.dim() == 3 else out


def run_laplace_head(cell: Cell) -> Outcome:
    """``laplace_head``: last-layer Laplace on the MAP hybrid's head.

    With the pooled features :math:`h_n` at the MAP fixed, the head weights
    :math:`\\theta = (W, b)` get the Gaussian :math:`\\mathcal{N}(\\hat\\theta, H^{-1})`,

    .. math:: H = \\nabla^2_\\theta \\Big[ -\\sum_{n=1}^{N} \\log \\mathrm{softmax}(W h_n + b)_{y_n}
              - \\log p(\\theta) \\Big]_{\\theta = \\hat\\theta},

    the exact Hessian of the negative log joint over the training set (for a softmax of a
    linear map it equals the generalised Gauss-Newton matrix), the prior being the
    library's (``Normal(0, 0.5)`` weights, ``Normal(0, 1)`` bias: its precision is added).
    Prediction: :math:`\\theta_s = \\hat\\theta + L^{-\\top} \\varepsilon_s`,
    :math:`H = L L^\\top`, :math:`\\varepsilon_s \\sim \\mathcal{N}(0, I)`, ``S`` draws.
    """
    model, guide, seconds = map_hybrid_fit(cell, cell.seed)
    location = posterior_location(guide)
    start = time.perf_counter()
    sites = model.peft.head.sites  # weight [O, d], bias [O]
    priors = [model.priors.for_site(site).distribution(site) for site in sites]
    sizes = [site.numel for site in sites]
    features = head_features(cell, model, location, cell.splits.train)  # [N, d] or [N, K, d]
    labels = torch.tensor(cell.splits.train.labels)  # [N]

    def unflatten(theta: torch.Tensor) -> list[torch.Tensor]:
        return [part.reshape(site.shape) for part, site in zip(theta.split(sizes), sites, strict=True)]

    def neg_log_joint(theta: torch.Tensor) -> torch.Tensor:
        weight, bias = unflatten(theta)
        loss = F.cross_entropy(head_logits(features, weight, bias), labels, reduction="sum")
        return loss - sum(prior.log_prob(value).sum() for prior, value in zip(priors, (weight, bias), strict=True))

    theta_map = torch.cat([location[site.name].reshape(-1) for site in sites]).double()  # [P]
    hessian = torch.autograd.functional.hessian(neg_log_joint, theta_map, vectorize=True)  # [P, P]
    cholesky = torch.linalg.cholesky(hessian)  # H = L L^T
    seconds += time.perf_counter() - start

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cell.seed)
    noise = torch.randn(cell.args.samples, theta_map.numel(), generator=generator, dtype=torch.double)  # [S, P]
    thetas = theta_map + torch.linalg.solve_triangular(cholesky.T, noise.T, upper=True).T  # [S, P], covariance H^-1
    parts = []
    for data in (cell.splits.test, cell.splits.ood):
        if data is None:
            parts.append(None)
            continue
        feats = head_features(cell, model, location, data)
        draws = [torch.softmax(head_logits(feats, *unflatten(theta)), dim=-1) for theta in thetas]  # S x [N, C]
        parts.append(torch.stack(draws).float())  # [S, N, C]
    return Outcome(parts[0], parts[1], seconds, time.perf_counter() - start, {"laplace_parameters": theta_map.numel()})


def linear_schedule(warmup: int, total: int):
    """``FitConfig(schedule="linear")``'s factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))

    return factor


def run_peft_lora(cell: Cell) -> Outcome:
    """``peft_lora``: Hugging Face ``peft`` LoRA as an external reference for ``map_lora``.

    Same base model, rank, alpha, dropout and target modules (``peft`` matches the
    targets itself; they are checked against ours), the same head (mean pooling over
    unmasked tokens, a linear layer; for multiple choice one score per (question,
    choice) pair), the same initial values (LoRA A, B and head copied from ours), and
    the same objective and optimiser as our MAP fit: the negative log joint

    .. math:: \\tfrac{N}{B} \\sum_{b} -\\log \\mathrm{softmax}(f(x_b))_{y_b} - \\sum_s \\log p(w_s)

    with the library's priors, minimised by ``pyro.optim.clipped_adam.ClippedAdam``
    (element-wise gradient clipping at ``FitConfig.clip_norm``) under the linear schedule
    with warm-up, the same data order and dropout.  Trained by a plain PyTorch loop.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from pyro.optim.clipped_adam import ClippedAdam

    from bhpeft_ppl.inject import DEFAULT_TARGETS

    spec = HybridSpec.lora_only(cell.splits.head)
    ours = hybrid_model(cell, spec, GuideSpec.map(), cell.seed)  # for the targets, initial values and priors only
    lora_paths = sorted(layer.path for layer in ours.peft.peft_layers if layer.component == "lora")
    head_sites = ours.peft.head.sites  # weight [O, d], bias [O]
    pooling = ours.peft.pooling()
    ours.peft.eject()
    if pooling != "mean":
        raise SystemExit(f"peft_lora reproduces mean pooling only, the model uses {pooling!r}")

    lora = spec.lora
    targets = list(lora.target_modules or DEFAULT_TARGETS[cell.base.config.model_type]["lora"])
    lora_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    network = get_peft_model(cell.base, lora_config)
    inner = network.base_model.model
    found = sorted(name for name, module in inner.named_modules() if isinstance(module, LoraLayer))
    if found != lora_paths:
        raise SystemExit(f"peft put LoRA on {found[:3]}..., the library on {lora_paths[:3]}...; the targets differ")
    params = {}
    with torch.no_grad():
        for path in lora_paths:
            layer = inner.get_submodule(path)
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part)["default"].weight  # [r, d_in] or [d_out, r]
                weight.copy_(ours.initial_values[f"{path}.{part}"])
                params[f"{path}.{part}"] = weight
    for site in head_sites:
        params[site.name] = torch.nn.Parameter(ours.initial_values[site.name].clone())
    head_weight, head_bias = (params[site.name] for site in head_sites)
    priors = {name: ours.priors.for_site(site).distribution(site) for name, site in ours.peft.sites.items()}

    def scores(batch: dict) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, T] or [B, K, T]
        flat_ids, flat_mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])  # [N, T]
        hidden = network(input_ids=flat_ids, attention_mask=flat_mask).last_hidden_state  # [N, T, d]
        weights = flat_mask.unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [N, d]
        return F.linear(pooled, head_weight, head_bias).reshape(ids.shape[0], -1)  # [B, C] or [B, K]

    config = cell.fit_config(cell.seed)
    train = cell.splits.train
    start = time.perf_counter()
    # fit seeds every RNG, then builds its guide, which draws once from the priors: do the same,
    # so that the dropout masks of the two loops are the same draws
    pyro.set_rng_seed(config.seed)
    ours.make_guide()
    order = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, collate_fn=cell.collate, generator=order)
    total = len(loader) * config.epochs
    optimizer = ClippedAdam([{"params": list(params.values()), "lr": config.lr}], lr=config.lr, clip_norm=config.clip_norm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(int(config.warmup_ratio * total), total))
    network.train()
    for _ in range(config.epochs):
        for batch in loader:
            logits = scores(batch)  # [B, C]
            loss = F.cross_entropy(logits, batch["labels"], reduction="sum") * len(train) / len(batch["labels"])
            loss = loss - sum(priors[name].log_prob(value).sum() for name, value in params.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    seconds = time.perf_counter() - start

    start = time.perf_counter()
    network.eval()
    parts = []
    with torch.no_grad():
        for data in (cell.splits.test, cell.splits.ood):
            if data is None:
                parts.append(None)
                continue
            probs = [torch.softmax(scores(batch), dim=-1) for batch in cell.loader(data)]  # [B, C] each
            parts.append(torch.cat(probs).unsqueeze(0))  # [1, N, C]
    return Outcome(parts[0], parts[1], seconds, time.perf_counter() - start, {"optimizer": "pyro ClippedAdam"})


RUNNERS = {
    "map_lora": run_map,
    "map_adapter": run_map,
    "map_prefix": run_map,
    "map_hybrid": run_map_hybrid,
    "peft_lora": run_peft_lora,
    "mc_dropout": run_mc_dropout,
    "deep_ensemble": run_deep_ensemble,
    "temperature_scaling": run_temperature_scaling,
    "laplace_head": run_laplace_head,
    "blob_lora": run_blob_lora,
    "paper_released": run_paper_released,
    "bhpeft_full": run_bhpeft_full,
    "bayes_lora": run_bayes_component,
    "bayes_adapter": run_bayes_component,
    "bayes_prefix": run_bayes_component,
    "bayes_head": run_bayes_component,
    "prior_x0.1": run_prior_scale,
    "prior_x10": run_prior_scale,
    "kl_weight_0.1": run_kl_weight,
    "kl_weight_0.01": run_kl_weight,
    "prior_x10_lr_0.002": run_other_lr,
    "kl_weight_0.01_lr_0.002": run_other_lr,
    "map_prior_x10": run_prior_scale,
    "map_prior_x10_lr_0.002": run_other_lr,
    "bhpeft_draws": run_bhpeft_draws,
    "map_hybrid_tuned": run_tuned,
    "bhpeft_full_tuned": run_tuned,
}


def scores_of(outcome: Outcome, labels: torch.Tensor) -> dict[str, float]:
    """The cell's metrics, from the library's calibration and selective-prediction functions."""
    mean = as_probs(outcome.probs.mean(0))  # [N, C] model average
    score = uncertainty(outcome.probs, SCORE)  # [N]
    correct = mean.argmax(-1) == labels  # [N]
    out = {
        "accuracy": accuracy(mean, labels),
        "ece": ece(mean, labels, num_bins=15),
        "nll": nll(mean, labels),
        "brier": brier(mean, labels),
        "aurc": aurc(correct, score),
    }
    for fraction, value in accuracy_after_rejection(correct, score, REJECT).items():
        out[f"accuracy_reject_{round(100 * fraction)}"] = value
    if outcome.ood_probs is not None:
        out["ood_auroc"] = ood_auroc(score, uncertainty(outcome.ood_probs, SCORE))
    return out


def cell_file(out: Path, task: str, method: str, seed: int) -> Path:
    return out / "cells" / f"{task}__{method}__{seed}.json"


def run_cell(args: argparse.Namespace) -> int:
    """The child process: run one cell and write its record to ``OUT/cells/``."""
    task, method, seed = args.cell[0], args.cell[1], int(args.cell[2])
    torch.set_num_threads(args.threads)
    base, tokenizer = load_backbone(args.backbone or args.model)
    splits = load_splits(task, tokenizer, seed, args)
    cell = Cell(task, method, seed, base, tokenizer, splits, args)
    outcome = RUNNERS[method](cell)
    record = {
        "task": task,
        "method": method,
        "seed": seed,
        **scores_of(outcome, torch.tensor(splits.test.labels)),
        "seconds": outcome.seconds,
        "predict_seconds": outcome.predict_seconds,
        "draws": int(outcome.probs.shape[0]),
        "train_size": len(splits.train),
        "test_size": len(splits.test),
        "threads": torch.get_num_threads(),
        "commit": source_commit(),
        **outcome.extra,
    }
    atomic_write_json(cell_file(Path(args.out), task, method, seed), record)
    return 0


# Reporting ------------------------------------------------------------------------------------------
def collect(records: list[dict]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """``{(task, method): {metric: values over seeds}}``."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for record in records:
        values = out.setdefault((record["task"], record["method"]), {})
        for key in METRICS:
            if key in record:
                values.setdefault(key, []).append(float(record[key]))
    return out


def mean(values: list[float]) -> float:
    return statistics.mean(values)


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {spread(values):.{digits}f}"


def table(results: dict) -> str:
    """Markdown: per task, one row per method, mean ± sd over the seeds done, and their number."""
    config, summary = results["config"], collect(results["records"])
    lines = [f"# Method comparison ({'smoke' if config['smoke'] else 'full'} run, model {config['model']})", ""]
    lines += [
        f"Mean ± sd over the seeds done (planned: {results['seeds']}); {config['epochs']} epochs, batch {config['batch_size']}, "
        f"lr {config['lr']}, {config['samples']} posterior draws. Rejection and OOD use the uncertainty {SCORE}; "
        "OOD (SST-2): AG News texts against the SST-2 test sentences. Config, versions and every record: results.json.",
        "",
    ]
    columns = [
        ("accuracy", "accuracy", 3),
        ("ece", "ECE", 3),
        ("nll", "NLL", 3),
        ("brier", "Brier", 3),
        ("aurc", "AURC", 3),
        *((f"accuracy_reject_{round(100 * f)}", f"acc rej {round(100 * f)} %", 3) for f in REJECT),
        ("ood_auroc", "OOD AUROC", 3),
        ("seconds", "train s", 0),
        ("predict_seconds", "predict s", 0),
        ("peak_rss_mb", "peak MB", 0),
    ]
    for task in TASKS:
        if not any(r["task"] == task for r in results["records"]):
            continue
        methods = [m for m in METHODS if (task, m) in summary]
        shown = [c for c in columns if c[0] != "ood_auroc" or task == "sst2"]
        sizes = next(r for r in results["records"] if r["task"] == task)
        lines += [f"## {task} ({sizes['train_size']} training, {sizes['test_size']} test examples)", ""]
        if methods:
            lines.append("| method | " + " | ".join(c[1] for c in shown) + " | seeds |")
            lines.append("|---|" + "---|" * (len(shown) + 1))
        for method in methods:
            values = summary[(task, method)]
            cells = [mean_sd(values.get(key, []), digits) for key, _, digits in shown]
            seeds = len(values["accuracy"])
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {seeds} |")
        lines += [""] if methods else []
        lines += paired_table(task, results["records"])
        lines += ablation_tables(task, results["records"], summary)
        lines += tuned_table(task, results["records"])
    return "\n".join(lines) + "\n"


ABLATION_ROWS = (
    ("map_hybrid", "nothing Bayesian (map_hybrid)"),
    ("bayes_lora", "LoRA only"),
    ("bayes_adapter", "adapter only"),
    ("bayes_prefix", "prefix only"),
    ("bayes_head", "head only"),
    ("bhpeft_full", "everything (bhpeft_full)"),
    ("prior_x0.1", "prior scales x 0.1"),
    ("prior_x10", "prior scales x 10"),
    ("kl_weight_0.1", "KL weight 0.1"),
    ("kl_weight_0.01", "KL weight 0.01"),
    ("prior_x10_lr_0.002", "prior scales x 10, lr 0.002"),
    ("kl_weight_0.01_lr_0.002", "KL weight 0.01, lr 0.002"),
    ("map_prior_x10_lr_0.002", "nothing Bayesian, prior scales x 10, lr 0.002"),
)


PAIRED = (("accuracy", "accuracy", 1), ("ece", "ECE", -1), ("nll", "NLL", -1), ("aurc", "AURC", -1))  # 1: higher is better


def paired_table(task: str, records: list[dict], reference: str = "map_hybrid") -> list[str]:
    """Markdown: each method's difference from ``reference`` on the same seeds (same training
    data, same test set), as the mean of the per-seed differences and the number of seeds on
    which the method is better; empty unless some method shares a seed with the reference."""
    by_cell = {(r["method"], r["seed"]): r for r in records if r["task"] == task}
    rows = []
    for method in METHODS:
        seeds = sorted(seed for m, seed in by_cell if m == method and (reference, seed) in by_cell)
        if method == reference or not seeds:
            continue
        cells = []
        for key, _, sign in PAIRED:
            differences = [by_cell[(method, seed)][key] - by_cell[(reference, seed)][key] for seed in seeds]
            better = sum(sign * d > 0 for d in differences)
            cells.append(f"{round(mean(differences), 3) + 0.0:+.3f} ({better}/{len(seeds)})")  # + 0.0: no "-0.000"
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        f"Paired against `{reference}` (method minus {reference} on the same seed; mean over seeds, "
        "and on how many seeds the method is better):",
        "",
        "| method | " + " | ".join(f"Δ {heading}" for _, heading, _ in PAIRED) + " |",
        "|---|" + "---|" * len(PAIRED),
        *rows,
        "",
    ]


def short_columns(task: str) -> list[tuple[str, str]]:
    """``(metric, heading)`` of the ablation and ``--tuned`` tables (OOD AUROC on SST-2 only)."""
    columns = [("accuracy", "accuracy"), ("ece", "ECE"), ("nll", "NLL"), ("aurc", "AURC"), ("ood_auroc", "OOD AUROC")]
    return [c for c in columns if c[0] != "ood_auroc" or task == "sst2"]


def ablation_tables(task: str, records: list[dict], summary: dict) -> list[str]:
    """Markdown of the ablations of ``task`` (empty if none ran): what is Bayesian, prior scale and
    KL weight (against the references ``map_hybrid`` and ``bhpeft_full``), and the number of draws."""
    if not any((task, m) in summary for m in ABLATIONS):
        return []
    columns = short_columns(task)
    lines = [
        f"### {task} ablations",
        "",
        "| Bayesian part / setting | " + " | ".join(c[1] for c in columns) + " | train s | seeds |",
    ]
    lines.append("|---|" + "---|" * (len(columns) + 2))
    for method, label in ABLATION_ROWS:
        values = summary.get((task, method))
        if values:
            cells = [mean_sd(values.get(key, []), 3) for key, _ in columns] + [mean_sd(values.get("seconds", []), 0)]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(values['accuracy'])} |")
    draws = [r for r in records if r["task"] == task and r["method"] == "bhpeft_draws"]
    if draws:
        lines += ["", "Posterior draws at test time (the `bhpeft_full` fit; the first S of 30 draws):", ""]
        lines += ["| draws S | " + " | ".join(c[1] for c in columns) + " | seeds |", "|---|" + "---|" * (len(columns) + 1)]
        for count in DRAWS:
            parts = [r[f"draws_{count}"] for r in draws if f"draws_{count}" in r]
            cells = [mean_sd([part[key] for part in parts if key in part], 3) for key, _ in columns]
            lines.append(f"| {count} | " + " | ".join(cells) + f" | {len(parts)} |")
    return [*lines, ""]


def tuned_table(task: str, records: list[dict]) -> list[str]:
    """Markdown of the ``--tuned`` methods of ``task`` (empty if none ran), each beside the
    fixed-setting method it extends on the same seeds, with the settings chosen for each seed."""
    mine = [r for r in records if r["task"] == task]
    if not any(r["method"] in TUNED for r in mine):
        return []
    columns = short_columns(task)
    lines = [
        f"### {task}: prior scale and learning rate chosen on validation",
        "",
        f"Grid: default prior scales x {', '.join(f'{f:g}' for f in PRIOR_FACTORS)}; learning rate "
        f"{', '.join(f'{r:g}' for r in LEARNING_RATES)}; the fit with the lowest validation NLL. "
        "train s: all 9 fits. Each method is shown on the seeds its tuned version has.",
        "",
        "| method | " + " | ".join(c[1] for c in columns) + " | chosen (prior x, lr) per seed | train s | seeds |",
        "|---|" + "---|" * (len(columns) + 3),
    ]
    for tuned in TUNED:
        runs = sorted((r for r in mine if r["method"] == tuned), key=lambda r: r["seed"])
        seeds = [r["seed"] for r in runs]
        base = tuned.removesuffix("_tuned")
        for method in (base, tuned):
            values = collect([r for r in mine if r["method"] == method and r["seed"] in seeds]).get((task, method))
            if not values:
                continue
            chosen = ", ".join(f"{r['prior_scale_factor']:g} / {r['lr']:g}" for r in runs) if method == tuned else "-"
            cells = [mean_sd(values.get(key, []), 3) for key, _ in columns] + [chosen, mean_sd(values.get("seconds", []), 0)]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {', '.join(map(str, seeds))} |")
    return [*lines, ""]


def plot(results: dict, out: Path) -> None:
    """``ece_vs_accuracy.png`` and ``rejection.png``: one panel per task, one mark or line per method."""
    from matplotlib.figure import Figure

    summary = collect(results["records"])
    tasks = [t for t in TASKS if any(task == t for task, _ in summary)]
    if not tasks:
        return
    markers = "osD^v<>phX*P"
    style = {m: {"color": f"C{i % 10}", "marker": markers[i % len(markers)]} for i, m in enumerate(METHODS)}

    fig = Figure(figsize=(5.0 * len(tasks), 4.4))
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for method in METHODS:
            values = summary.get((task, method))
            if not values:
                continue
            x, y = values["ece"], values["accuracy"]
            ax.errorbar(mean(x), mean(y), xerr=spread(x), yerr=spread(y), linestyle="none", label=method, **style[method])
        ax.locator_params(nbins=5)
        ax.set_xlabel("ECE (15 bins)")
        ax.set_ylabel("accuracy")
        ax.set_title(task)
    if fig.axes[0].get_legend_handles_labels()[0]:
        fig.axes[0].legend(fontsize=6)
    fig.tight_layout()
    atomic_write(out / "ece_vs_accuracy.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))

    fig = Figure(figsize=(5.0 * len(tasks), 4.4))
    rejected = [0, *(round(100 * f) for f in REJECT)]
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for method in METHODS:
            values = summary.get((task, method))
            if not values:
                continue
            keys = ["accuracy", *(f"accuracy_reject_{r}" for r in rejected[1:])]
            ax.plot(rejected, [mean(values[k]) for k in keys], label=method, **style[method])
        ax.set_xlabel("most uncertain rejected (%)")
        ax.set_ylabel("accuracy on the rest")
        ax.set_title(task)
    if fig.axes[0].get_legend_handles_labels()[0]:
        fig.axes[0].legend(fontsize=6)
    fig.tight_layout()
    atomic_write(out / "rejection.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))


@contextlib.contextmanager
def results_lock(out: Path):
    """An exclusive lock on ``OUT/results.json.lock`` (where ``fcntl`` exists), so that two runs
    on one folder (say the methods and the ablations) do not interleave their saves."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(out / "results.json.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save(results: dict, out: Path) -> None:
    """``results.json`` (records in task, method, seed order), ``table.md`` and the plots.

    Records that another run on the same folder saved meanwhile are read back and kept.
    """
    with results_lock(out):
        path = out / "results.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("config") == results["config"]:
                mine = {(r["task"], r["method"], r["seed"]) for r in results["records"]}
                results["records"] += [r for r in saved["records"] if (r["task"], r["method"], r["seed"]) not in mine]
                results["seeds"] = sorted(set(results["seeds"]) | set(saved.get("seeds", [])))
        latest = {(r["task"], r["method"], r["seed"]): r for r in results["records"]}  # one record a cell, the last
        results["records"] = list(latest.values())
        rank = {(t, m): (i, j) for i, t in enumerate(TASKS) for j, m in enumerate(ALL_METHODS)}
        results["records"].sort(key=lambda r: (*rank[(r["task"], r["method"])], r["seed"]))
        atomic_write_json(path, results)
        atomic_write_text(out / "table.md", table(results))
        plot(results, out)


# Orchestration --------------------------------------------------------------------------------------
def settings_argv(args: argparse.Namespace) -> list[str]:
    """The options of :data:`SETTINGS` as command-line arguments for a child process."""
    argv = ["--smoke"] if args.smoke else []
    for key in SETTINGS:
        value = getattr(args, key)
        if key != "smoke" and value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


SHARED_FITS = (
    ("map_hybrid", "mc_dropout", "deep_ensemble", "temperature_scaling", "laplace_head", "map_hybrid_tuned"),  # the MAP hybrid's
    ("bhpeft_full", "bhpeft_draws", "bhpeft_full_tuned"),  # the full BH-PEFT fit's
)


@dataclass
class Child:
    """A cell running in its own process."""

    task: str
    method: str
    seed: int
    process: subprocess.Popen
    start: float

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/{self.seed}"


def start_child(args: argparse.Namespace, task: str, method: str, seed: int, backbone: str) -> Child:
    """Start ``compare_methods.py --cell TASK METHOD SEED`` with this run's settings."""
    out = Path(args.out)
    cell_file(out, task, method, seed).unlink(missing_ok=True)  # a failed child must not leave an old record
    command = [sys.executable, str(Path(__file__).resolve()), "--cell", task, method, str(seed), "--out", str(out)]
    command += ["--backbone", backbone, "--threads", str(args.threads), *settings_argv(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return Child(task, method, seed, subprocess.Popen(command, env=env), time.perf_counter())


def finished(child: Child, out: Path) -> tuple[bool, dict | None]:
    """``(done, record)`` of a child without blocking: its record with ``peak_rss_mb`` (``ru_maxrss`` of
    ``os.wait4``, in KiB on Linux), or ``None`` if it failed."""
    pid, status, usage = os.wait4(child.process.pid, os.WNOHANG)
    if pid == 0:
        return False, None
    child.process.returncode = os.waitstatus_to_exitcode(status)
    path = cell_file(out, child.task, child.method, child.seed)
    if child.process.returncode != 0 or not path.is_file():
        return True, None
    record = json.loads(path.read_text(encoding="utf-8"))
    record["peak_rss_mb"] = usage.ru_maxrss / 1024
    return True, record


def clashes(cell: tuple[str, str, int], running: list[Child]) -> bool:
    """Whether ``cell`` must wait: cells sharing a cached fit of a (task, seed) run one at a time,
    so that the first one fits and saves it and the others load it."""
    task, method, seed = cell
    return any(
        method in group and any(c.task == task and c.seed == seed and c.method in group for c in running) for group in SHARED_FITS
    )


def config_of(args: argparse.Namespace) -> dict:
    config = {key: getattr(args, key) for key in SETTINGS}
    config["max_length"] = {task: args.max_length or MAX_LENGTH[task] for task in TASKS}
    config["train_size"] = {task: args.train_size or TRAIN_SIZE[task] for task in TASKS}
    config.update(score=SCORE, ensemble_size=ENSEMBLE_SIZE, paper_kl=PAPER_KL, ece_bins=15, reject=list(REJECT))
    return config


def orchestrate(args: argparse.Namespace) -> int:
    """Run every planned cell not in ``OUT/results.json`` yet (``--jobs`` at a time), saving after each."""
    out = Path(args.out)
    path = out / "results.json"
    config = config_of(args)
    results = {"config": config, "versions": library_versions(), "seeds": [], "records": []}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("config") != config:
            raise SystemExit(f"{path} was written with other settings; use another --out, or the same settings, or delete it")
        results = saved
    results["seeds"] = sorted(set(results["seeds"]) | set(args.seeds))
    done = {(r["task"], r["method"], r["seed"]) for r in results["records"]}
    plan = [(task, method, seed) for seed in args.seeds for task in args.tasks for method in args.methods]
    pending = []
    for cell in plan:
        if cell in done:
            print(f"{cell[0]}/{cell[1]}/{cell[2]}: {DONE}", flush=True)
        else:
            pending.append(cell)
    failed, running = [], []
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as scratch:
        backbone = args.model
        if args.smoke and pending:
            backbone = str(save_tiny_backbone(Path(scratch) / "tiny-bert"))
        while pending or running:
            while len(running) < args.jobs:
                cell = next((c for c in pending if not clashes(c, running)), None)
                if cell is None:
                    break
                pending.remove(cell)
                running.append(start_child(args, *cell, backbone))
                print(f"{running[-1].key}: running", flush=True)
            time.sleep(0.1)
            for child in list(running):
                over, record = finished(child, out)
                if not over:
                    continue
                running.remove(child)
                if record is None:
                    print(f"{child.key}: FAILED (see the messages above)", flush=True)
                    failed.append(child.key)
                    continue
                results["records"].append(record)
                save(results, out)  # also brings in the records another run on the folder saved
                merged = {(r["task"], r["method"], r["seed"]) for r in results["records"]}
                pending = [c for c in pending if c not in merged]
                print(
                    f"{child.key}: accuracy {record['accuracy']:.3f}, ECE {record['ece']:.3f}, "
                    f"train {record['seconds']:.1f} s, predict {record['predict_seconds']:.1f} s, "
                    f"peak {record['peak_rss_mb']:.0f} MB, cell {time.perf_counter() - child.start:.1f} s",
                    flush=True,
                )
    save(results, out)
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}; rerun to retry them", flush=True)
        return 1
    print(f"wrote {out}", flush=True)
    return 0


def report(out: Path) -> int:
    """Rewrite ``table.md`` and the plots from ``OUT/results.json``."""
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    atomic_write_text(out / "table.md", table(results))
    plot(results, out)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="tiny random BERT, a few dozen examples, 1 seed, 3 draws (CI)")
    p.add_argument("--report", action="store_true", help="only rewrite table.md and the plots from OUT/results.json")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="default: all three (SST-2 with --ablations)")
    p.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS, help="default: the 12 main methods")
    p.add_argument(
        "--ablations", action="store_true", help="run the ablations (on SST-2 unless --tasks is given) instead of the methods"
    )
    p.add_argument(
        "--tuned",
        action="store_true",
        help="run map_hybrid and bhpeft_full with prior scale and lr chosen on validation (on SST-2 unless --tasks is given)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="minilm", help="base model: 'minilm' (bundled) or a local Hugging Face folder")
    p.add_argument(
        "--train-size", type=int, default=None, help="training examples per cell (default 2000, 2000, 1000 questions by task)"
    )
    p.add_argument("--val-size", type=int, default=500, help="validation examples (temperature scaling and --tuned only)")
    p.add_argument("--test-size", type=int, default=1000, help="at most this many test examples (a fixed sample)")
    p.add_argument("--ood-size", type=int, default=500, help="AG News texts scored by the SST-2 models")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--samples", type=int, default=10, help="posterior draws of the Bayesian methods")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text or pair (default: 64, 96, 64 by task)")
    p.add_argument("--predict-batch-size", type=int, default=32)
    p.add_argument("--jobs", type=int, default=2, help="cells run at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell (see the module docstring)")
    p.add_argument("--cell", nargs=3, metavar=("TASK", "METHOD", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--backbone", default=None, help=argparse.SUPPRESS)
    if "--smoke" in argv:
        p.set_defaults(**SMOKE_DEFAULTS, model="tiny-random-bert")
    args = p.parse_args(argv)
    if args.ablations and args.tuned:
        p.error("--ablations and --tuned are separate runs; give one of them")
    if args.methods is None:
        args.methods = list(ABLATIONS if args.ablations else TUNED if args.tuned else METHODS)
    if args.tasks is None:
        args.tasks = ["sst2"] if args.ablations or args.tuned else list(TASKS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cell:
        return run_cell(args)
    if args.report:
        return report(Path(args.out))
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
