r"""News categorisation (AG News: World, Sports, Business, Sci/Tech) with a Bayesian hybrid.

Data: a headline and its description :math:`x_n`, a topic :math:`y_n \in \{0, \dots, C-1\}`.

Generative model.  As in ``sentiment.py``, LoRA, a bottleneck adapter and a
gated prefix adapt a frozen encoder :math:`f`; the difference is the head.  A
topic is often decided by a few directions of the pooled representation
(named entities, domain words), so the head weights get a heavier-tailed
Student-t prior that lets a few weights be large while shrinking the rest:

.. math::

    w_{\text{lora}}, w_{\text{adapter}} &\sim \mathcal{N}(0, 0.1^2), \qquad
    w_{\text{prefix}} \sim \mathcal{N}(0, 1) \\
    W_{\text{head}, cj} &\sim \mathrm{StudentT}_3(0, 0.3) \qquad c = 1..C,\; j = 1..d \\
    b_{\text{head}, c} &\sim \mathcal{N}(0, 1) \\
    y_n \mid x_n, w &\sim \mathrm{Categorical}\big(\mathrm{softmax}(W_{\text{head}}\, \bar h(x_n; w) + b_{\text{head}})\big)

Mean-field Normal guide, proper ELBO.
"""

import pyro
import pyro.distributions as dist

TASK = "news"

SPEC = {
    "lora": {"rank": 8, "alpha": 16.0, "target_modules": None},
    "adapter": {"reduction_factor": 16, "non_linearity": "relu", "placement": "sequential"},
    "prefix": {"num_virtual_tokens": 10, "reparameterize": True, "gate": True},
    "head": {"task": "classification", "pooling": "auto"},
}

PRIORS = {
    "components": {
        "lora": {"family": "normal", "scale": 0.1},
        "adapter": {"family": "normal", "scale": 0.1},
        "prefix": {"family": "normal", "scale": 1.0},
        "head": {"family": "student_t", "df": 3.0, "scale": 0.3},
    },
    "patterns": {
        "classifier.bias": {"family": "normal", "scale": 1.0},
        "prefix_gate": {"family": "normal", "scale": 1.0},
    },
}

GUIDE = {"default": "mean_field", "init_scale": 0.01}


def model(hybrid, batch, num_data):
    """:math:`w \\sim p(w)`, then :math:`y_n \\sim \\mathrm{Categorical}(\\mathrm{softmax}(f(x_n; w)))`."""
    weights = hybrid.sample_weights()  # every PEFT weight from its prior
    logits = hybrid.peft(batch, weights)  # [B, C]
    with pyro.plate("data", size=num_data, subsample=batch["index"]):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=batch.get("labels"))
    return logits
