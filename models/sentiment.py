r"""Sentiment analysis with a Bayesian hybrid of LoRA, a bottleneck adapter and a prefix.

Data: texts :math:`x_n` with a polarity label :math:`y_n \in \{0, \dots, C-1\}`
(SST-2: negative / positive; fine-food reviews: great / other).

Generative model.  A frozen pretrained encoder :math:`f` is adapted by three
kinds of small modules whose weights are random variables:

.. math::

    A^{(l)}_{\text{lora}}, B^{(l)}_{\text{lora}} &\sim \mathcal{N}(0, 0.1^2)
        && \text{LoRA on the query and value projections of layer } l \\
    W^{(l)}_{\text{down}}, W^{(l)}_{\text{up}} &\sim \mathcal{N}(0, 0.1^2)
        && \text{bottleneck adapter after the feed-forward block} \\
    P^{(l)}_{K}, P^{(l)}_{V} &\sim \mathcal{N}(0, 1)
        && \text{prefix keys and values (through a small MLP)} \\
    g^{(l)} &\sim \mathcal{N}(0, 1)
        && \text{per-head prefix gate, } \sigma(g) \text{ mixes prefix attention in} \\
    W_{\text{head}} \sim \mathcal{N}(0, 0.5^2), \; b_{\text{head}} &\sim \mathcal{N}(0, 1)
        && \text{linear head on the mean-pooled last hidden state} \\
    y_n \mid x_n, w &\sim \mathrm{Categorical}\big(\mathrm{softmax}(W_{\text{head}}\, \bar h(x_n; w) + b_{\text{head}})\big)
        && n = 1, \dots, N

The guide is mean-field Normal on every weight; the objective is the proper
ELBO (``KL_WEIGHT = 1``).  Copy this file to change the spec, the priors or the
likelihood; ``bhpeft fit --model.file my_model.py`` uses the copy.
"""

import pyro
import pyro.distributions as dist

TASK = "sentiment"

# The hybrid (bhpeft_ppl.HybridSpec as data).  head.num_labels comes from the data.
SPEC = {
    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None, "gate": False},
    "adapter": {"bottleneck": None, "reduction_factor": 16, "non_linearity": "relu", "placement": "sequential"},
    "prefix": {"num_virtual_tokens": 10, "reparameterize": True, "embedding_dim": 64, "hidden_dim": 128, "gate": True},
    "head": {"task": "classification", "pooling": "auto"},
}

# Priors per component, then per site-name pattern (a pattern wins over its component).
PRIORS = {
    "components": {
        "lora": {"family": "normal", "scale": 0.1},
        "adapter": {"family": "normal", "scale": 0.1},
        "prefix": {"family": "normal", "scale": 1.0},
        "head": {"family": "normal", "scale": 0.5},
    },
    "patterns": {
        "classifier.bias": {"family": "normal", "scale": 1.0},
        "prefix_gate": {"family": "normal", "scale": 1.0},
    },
}

GUIDE = {"default": "mean_field", "init_scale": 0.01}

KL_WEIGHT = 1.0


def model(hybrid, batch, num_data):
    """:math:`w \\sim p(w)`, then :math:`y_n \\sim \\mathrm{Categorical}(\\mathrm{softmax}(f(x_n; w)))`."""
    weights = hybrid.sample_weights()  # every PEFT weight from its prior
    logits = hybrid.peft(batch, weights)  # [B, C]
    with pyro.plate("data", size=num_data, subsample=batch["index"]):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=batch.get("labels"))
    return logits
