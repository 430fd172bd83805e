"""bhpeft_ppl: Bayesian hybrid parameter-efficient fine-tuning of Transformers, in Pyro.

Every PEFT weight (LoRA, bottleneck adapter, prefix, task head) of a frozen
Hugging Face model is a ``pyro.sample`` site with an explicit prior; SVI fits a
guide; predictions average over posterior draws.
"""

from .errors import BHPEFTError, DivergenceError, PosteriorMismatchError, SpecError
from .guides import GuideSpec, local_params
from .infer import EarlyStopping, FitConfig, FitResult, fit
from .inject import HybridPEFT, inject
from .model import BayesianHybridModel
from .naming import site_name
from .predict import Predictions, predict
from .priors import Horseshoe, Laplace, Normal, Priors, StudentT
from .serialize import load_guide, load_posterior, save_posterior
from .spec import AdapterSpec, HeadSpec, HybridSpec, LoRASpec, PrefixSpec

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec",
    "BHPEFTError",
    "BayesianHybridModel",
    "DivergenceError",
    "EarlyStopping",
    "FitConfig",
    "FitResult",
    "GuideSpec",
    "HeadSpec",
    "Horseshoe",
    "HybridPEFT",
    "HybridSpec",
    "Laplace",
    "LoRASpec",
    "Normal",
    "PosteriorMismatchError",
    "Predictions",
    "PrefixSpec",
    "Priors",
    "SpecError",
    "StudentT",
    "fit",
    "inject",
    "load_guide",
    "load_posterior",
    "local_params",
    "predict",
    "save_posterior",
    "site_name",
]
