"""One module per PEFT kind.  Each owns the :class:`~bhpeft_ppl.sites.WeightSite`
list of its weights and holds no ``nn.Parameter``: the weights of a forward pass
are bound to it from outside (a posterior draw, a guide's mean, or point
estimates), so that Pyro alone decides what is sampled and what is learned."""

from .adapter import BottleneckAdapter
from .base import PEFTLayer
from .head import TaskHead
from .lora import LoRA
from .prefix import Prefix, PrefixEncoder

__all__ = ["BottleneckAdapter", "LoRA", "PEFTLayer", "Prefix", "PrefixEncoder", "TaskHead"]
