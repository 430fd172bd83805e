r"""Commonsense reasoning (CommonsenseQA, 5 choices) as Bayesian multiple choice.

Data: a question :math:`q_n` with choices :math:`c_{n1}, \dots, c_{nK}` and the
index :math:`y_n` of the right one.

Generative model.  A frozen pretrained model :math:`f` adapted by LoRA, a
bottleneck adapter and a gated prefix gives one score per choice:

* encoders (BERT, MiniLM, RoBERTa) score each pair :math:`(q_n, c_{nk})` apart:
  :math:`s_{nk} = W_{\text{head}}\, \bar h(q_n, c_{nk}; w) + b_{\text{head}}`;
* decoders (Llama, SmolLM, GPT-2) read one prompt listing the lettered choices
  and score choice :math:`k` by the next-token logit of its letter after
  ``"Answer:"`` (their own LM head; no head weights).

.. math::

    w_{\text{lora}}, w_{\text{adapter}} &\sim \mathcal{N}(0, 0.1^2), \qquad
    w_{\text{prefix}} \sim \mathcal{N}(0, 1), \qquad
    W_{\text{head}} \sim \mathcal{N}(0, 0.5^2) \\
    y_n \mid q_n, c_n, w &\sim \mathrm{Categorical}\big(\mathrm{softmax}_k(s_{n1}, \dots, s_{nK})\big)

(a shared bias cancels in the softmax over choices, so :math:`b_{\text{head}}`
is not identified: its posterior stays at its prior).  Mean-field Normal guide,
proper ELBO.
"""

import pyro
import pyro.distributions as dist

TASK = "commonsense"

SPEC = {
    "lora": {"rank": 8, "alpha": 16.0, "target_modules": None},
    "adapter": {"reduction_factor": 16, "non_linearity": "relu", "placement": "sequential"},
    "prefix": {"num_virtual_tokens": 10, "reparameterize": True, "gate": True},
    # num_labels (the number of choices) comes from the data
    "head": {"task": "multiple_choice", "pooling": "auto", "scoring": "auto"},
}

PRIORS = {
    "components": {
        "lora": {"family": "normal", "scale": 0.1},
        "adapter": {"family": "normal", "scale": 0.1},
        "prefix": {"family": "normal", "scale": 1.0},
        "head": {"family": "normal", "scale": 0.5},
    },
}

GUIDE = {"default": "mean_field", "init_scale": 0.01}


def model(hybrid, batch, num_data):
    """:math:`w \\sim p(w)`, then :math:`y_n \\sim \\mathrm{Categorical}(\\mathrm{softmax}_k\\, s_{nk}(w))`."""
    weights = hybrid.sample_weights()  # every PEFT weight from its prior
    scores = hybrid.peft(batch, weights)  # [B, K] one score per choice
    with pyro.plate("data", size=num_data, subsample=batch["index"]):
        pyro.sample("obs", dist.Categorical(logits=scores), obs=batch.get("labels"))
    return scores
