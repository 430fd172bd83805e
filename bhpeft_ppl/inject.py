"""Attach hybrid PEFT modules to a frozen Hugging Face model.

:func:`inject` freezes the base model, finds the target modules by name (exact,
suffix or regex, as ``peft``'s ``target_modules``), and attaches the PEFT
layers with forward hooks and, for prefixes, the attention function of
:mod:`bhpeft_ppl.attention`.  The base model's module tree, parameter names
and weights are left exactly as they were: it stays plain PyTorch and no base
weight ever enters Pyro.  :meth:`HybridPEFT.eject` removes everything again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from . import attention
from .errors import SpecError
from .layers import BottleneckAdapter, LoRA, PEFTLayer, Prefix, PrefixEncoder, TaskHead
from .naming import matches_any
from .sites import WeightSite
from .spec import HybridSpec

_INJECTED = "_bhpeft_injected"

# Default targets by ``config.model_type``: LoRA on the attention query and
# value projections; adapter term added to the FFN output (and, for parallel
# adapters, computed from the FFN input).
_BERT_LIKE = {
    "lora": ("query", "value"),
    "adapter_output": (r".*layer\.\d+\.output\.dense",),
    "adapter_input": (r".*layer\.\d+\.intermediate",),
}
_LLAMA_LIKE = {"lora": ("q_proj", "v_proj"), "adapter_output": (r".*layers\.\d+\.mlp",)}
DEFAULT_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gpt2": {"lora": ("c_attn",), "adapter_output": (r".*h\.\d+\.mlp",)},
}


def _default_targets(model_type: str, key: str, owner: str) -> tuple[str, ...]:
    table = DEFAULT_TARGETS.get(model_type)
    if table is None:
        raise SpecError(
            f"no default {owner}.target_modules for model type {model_type!r}; "
            f"set {owner}.target_modules to module names (known types: {sorted(DEFAULT_TARGETS)})"
        )
    return table.get(key) or table["adapter_output"]


def _linear_widths(module: nn.Module, name: str) -> tuple[int, int]:
    """``(in, out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        d_in, d_out = module.weight.shape  # Conv1D stores [in, out]
        return int(d_in), int(d_out)
    raise SpecError(
        f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer; narrow LoRASpec.target_modules to linear layers"
    )


def _select(named: Mapping[str, nn.Module], patterns: tuple[str, ...], what: str) -> list[str]:
    chosen = [name for name in named if name and matches_any(name, patterns)]
    if not chosen:
        sample = [n for n in named if n][:12]
        raise SpecError(
            f"{what} {list(patterns)} match no module of the base model; "
            f"module names look like {sample} (match is exact, '.'-suffix or full regex)"
        )
    return chosen


def _dummy_inputs(base: nn.Module) -> dict[str, torch.Tensor]:
    device = next(base.parameters()).device
    ids = torch.tensor([[1, 2, 3]], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class HybridPEFT(nn.Module):
    """A frozen base model with hybrid PEFT layers and a task head attached.

    Holds no trainable parameter: the PEFT weights of a forward pass are passed
    in as a ``{site name: tensor}`` mapping (see :meth:`forward`).

    :ivar base: the frozen Hugging Face model: an ``AutoModel`` (no task head) or,
        for decoders, an ``AutoModelForCausalLM`` whose LM head scores answer letters.
    :ivar body: ``base.base_model``, the Transformer that gives the hidden states.
    :ivar scoring: ``classification``, ``per_choice`` or ``answer_letters``
        (see :class:`~bhpeft_ppl.spec.HeadSpec`).
    :ivar sites: ordered ``{site name: WeightSite}`` of every PEFT weight.
    """

    def __init__(self, base: nn.Module, spec: HybridSpec):
        super().__init__()
        self.base = base
        self.body = base.base_model
        self.spec = spec
        self.peft_layers = nn.ModuleList()
        self._handles: list = []
        self._prefixed: list[nn.Module] = []
        self._original_attention = getattr(base.config, "_attn_implementation", None)
        self.is_decoder = False
        self.hidden_size = 0

    # Construction ------------------------------------------------------------
    def _attach(self) -> None:
        base, spec = self.base, self.spec
        model_type = getattr(base.config, "model_type", "")
        named = OrderedDict(base.named_modules())
        widths: dict[str, tuple[int, int]] = {}  # module -> (last dim of input, of output)

        def record(name):
            def hook(module, inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                widths[name] = (inputs[0].shape[-1] if inputs else -1, out.shape[-1])

            return hook

        adapter_out: list[str] = []
        adapter_in: list[str] = []
        if spec.adapter is not None:
            a = spec.adapter
            adapter_out = _select(
                named,
                a.target_modules or _default_targets(model_type, "adapter_output", "AdapterSpec"),
                "AdapterSpec.target_modules",
            )
            if a.placement == "parallel":
                patterns = a.input_modules or (
                    a.target_modules if a.target_modules else _default_targets(model_type, "adapter_input", "AdapterSpec")
                )
                adapter_in = _select(named, patterns, "AdapterSpec.input_modules")
                if len(adapter_in) != len(adapter_out):
                    raise SpecError(
                        f"parallel adapter: {len(adapter_in)} input modules {adapter_in[:3]}... but "
                        f"{len(adapter_out)} output modules {adapter_out[:3]}...; give AdapterSpec.input_modules "
                        "that match one module per FFN block"
                    )
        probes = [named[n].register_forward_hook(record(n)) for n in dict.fromkeys(adapter_out + adapter_in)]
        base.set_attn_implementation(attention.ATTENTION_NAME)
        try:
            with torch.no_grad(), attention.discover_attention() as calls:
                out = self.body(**_dummy_inputs(base))
        finally:
            for h in probes:
                h.remove()
        self.hidden_size = int(out.last_hidden_state.shape[-1])
        self_attention = [c for c in calls if c.self_attention]
        self.is_decoder = bool(self_attention) and bool(getattr(self_attention[0].module, "is_causal", False))

        if spec.lora is not None:
            names = _select(
                named,
                spec.lora.target_modules or _default_targets(model_type, "lora", "LoRASpec"),
                "LoRASpec.target_modules",
            )
            for name in names:
                d_in, d_out = _linear_widths(named[name], name)
                self._add(LoRA(name, d_in, d_out, spec.lora), named[name])

        for i, name in enumerate(adapter_out):
            source = adapter_in[i] if adapter_in else name
            d_in = widths[source][0] if adapter_in else widths[name][1]
            layer = BottleneckAdapter(name, d_in, widths[name][1], spec.adapter)
            if adapter_in:
                self._handles.append(named[source].register_forward_pre_hook(layer.capture_hook))
            self._add(layer, named[name])

        if spec.prefix is not None:
            self._attach_prefix(self_attention, {id(m): n for n, m in named.items()})
        else:
            base.set_attn_implementation(self._original_attention or "sdpa")

        self.scoring = self._resolve_scoring()
        self.head = None
        if self.scoring != "answer_letters":
            outputs = spec.head.num_labels if self.scoring == "classification" else 1
            self.head = TaskHead(self.hidden_size, outputs, getattr(base.config, "initializer_range", 0.02))
            self.peft_layers.append(self.head)
        self.sites: OrderedDict[str, WeightSite] = OrderedDict(
            (site.name, site) for layer in self.peft_layers for site in layer.sites
        )

    def _resolve_scoring(self) -> str:
        head = self.spec.head
        if head.task == "classification":
            return "classification"
        has_lm_head = self.base.get_output_embeddings() is not None
        if head.scoring == "answer_letters" and not has_lm_head:
            raise SpecError(
                "HeadSpec.scoring='answer_letters' needs the decoder's language-model head; "
                "load the base with AutoModelForCausalLM (load_backbone does so for decoders)"
            )
        if head.scoring == "answer_letters" or (head.scoring == "auto" and self.is_decoder and has_lm_head):
            return "answer_letters"
        return "per_choice"

    def _add(self, layer: PEFTLayer, module: nn.Module) -> None:
        self.peft_layers.append(layer)
        self._handles.append(module.register_forward_hook(layer.hook))

    def _attach_prefix(self, calls: list, path_of: dict[int, str]) -> None:
        spec = self.spec.prefix
        unique = list({id(c.module): c for c in calls}.values())
        if spec.target_modules is not None:
            unique = [c for c in unique if matches_any(path_of[id(c.module)], spec.target_modules)]
            if not unique:
                raise SpecError(
                    f"PrefixSpec.target_modules {list(spec.target_modules)} match no self-attention module; "
                    f"they are {[path_of[id(c.module)] for c in calls][:6]}..."
                )
        if not unique:
            raise SpecError("prefix-tuning found no self-attention module calling AttentionInterface in this model")
        encoder = None
        if spec.reparameterize:
            encoder = PrefixEncoder(spec, [c.kv_heads * c.head_dim for c in unique])
            self.peft_layers.append(encoder)
        for i, call in enumerate(unique):
            layer = Prefix(
                path_of[id(call.module)],
                call.kv_heads,
                call.head_dim,
                call.query_heads,
                spec,
                (encoder, i) if encoder is not None else None,
            )
            self.peft_layers.append(layer)
            call.module.__dict__[attention.PREFIX_ATTRIBUTE] = layer
            self._prefixed.append(call.module)

    def eject(self) -> nn.Module:
        """Remove every hook and prefix and return the untouched base model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._prefixed:
            module.__dict__.pop(attention.PREFIX_ATTRIBUTE, None)
        self._prefixed.clear()
        self.base.set_attn_implementation(self._original_attention or "sdpa")
        self.base.__dict__.pop(_INJECTED, None)
        return self.base

    # Use ---------------------------------------------------------------------
    @contextmanager
    def bind(self, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Bind ``{site name: tensor}`` to every PEFT layer for the block."""
        missing = [name for name in self.sites if name not in weights]
        if missing:
            raise KeyError(f"weights missing for {len(missing)} site(s), e.g. {missing[:3]}")
        for layer in self.peft_layers:
            layer.bind(weights)
        try:
            yield
        finally:
            for layer in self.peft_layers:
                layer.unbind()

    def pooling(self) -> str:
        """The pooling in use (``auto`` resolved)."""
        pooling = self.spec.head.pooling
        if pooling == "auto":
            return "last" if self.is_decoder else "mean"
        return pooling

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool ``hidden [N, T, d]`` under ``mask [N, T]`` to ``[N, d]``."""
        pooling = self.pooling()
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        # last attended token, for right or left padding
        t = mask.shape[1]
        last = t - 1 - torch.argmax(mask.flip(1).to(torch.long), dim=1)  # [N]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, batch: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, C]`` (classification) or choice scores ``[B, K]`` (multiple choice).

        :param batch: ``input_ids`` and ``attention_mask`` of shape ``[B, T]``, or
            ``[B, K, T]`` for multiple choice scored per choice; optional
            ``token_type_ids``; for ``answer_letters`` scoring, ``choice_token_ids [B, K]``
            (the token id of each choice's letter).
        :param weights: ``{site name: tensor}`` for every site in :attr:`sites`.
        """
        if self.scoring == "answer_letters":
            return self._letter_scores(batch, weights)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        choices = ids.dim() == 3
        if choices:
            b, k, t = ids.shape
            ids, mask = ids.reshape(b * k, t), mask.reshape(b * k, t)  # [B*K, T]
        extra = self._positions(mask)
        if "token_type_ids" in batch:
            extra["token_type_ids"] = batch["token_type_ids"].reshape(ids.shape)
        with self.bind(weights):
            hidden = self.body(input_ids=ids, attention_mask=mask, **extra).last_hidden_state  # [N, T, d]
            out = self.head(self.pool(hidden, mask))  # [N, outputs]
        if choices:
            return out.reshape(b, k)  # [B, K]
        return out

    def _positions(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoders: positions counted over attended tokens, so a left-padded row is scored
        as it would be alone (encoders compute their own positions)."""
        if not self.is_decoder:
            return {}
        return {"position_ids": (mask.long().cumsum(-1) - 1).clamp_min(0)}  # [N, T]

    def _letter_scores(self, batch: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits of the answer letters after the prompt: ``[B, K]``."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        letters = batch.get("choice_token_ids")
        if ids.dim() != 2 or letters is None:
            raise SpecError(
                "answer_letters scoring needs one prompt per example (input_ids [B, T]) and choice_token_ids [B, K]; "
                "encode the data with bhpeft_ppl.data.encode_letter_prompts"
            )
        t = mask.shape[1]
        last = t - 1 - torch.argmax(mask.flip(1).to(torch.long), dim=1)  # [B] last attended position
        with self.bind(weights):
            hidden = self.body(input_ids=ids, attention_mask=mask, **self._positions(mask)).last_hidden_state  # [B, T, d]
            final = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # [B, d]
            vocab_logits = self.base.get_output_embeddings()(final)  # [B, V]
        return vocab_logits.gather(1, letters.to(vocab_logits.device))  # [B, K]


def inject(base: nn.Module, spec: HybridSpec) -> HybridPEFT:
    """Freeze ``base`` (a Hugging Face ``AutoModel``) and attach the PEFT layers of ``spec``.

    :raises SpecError: a target matches no module, or a LoRA target is not linear.
    """
    if not isinstance(spec, HybridSpec):
        raise SpecError(f"inject expects a HybridSpec, got {type(spec).__name__}")
    if not hasattr(base, "config") or not hasattr(base, "set_attn_implementation"):
        raise SpecError(
            f"inject expects a Hugging Face PreTrainedModel, got {type(base).__name__}; "
            "load one with transformers.AutoModel.from_pretrained"
        )
    if base.__dict__.get(_INJECTED):
        raise SpecError("this base model already has PEFT modules attached; call .eject() on them first")
    base.requires_grad_(False)
    peft = HybridPEFT(base, spec)
    base.__dict__[_INJECTED] = True
    try:
        peft._attach()
    except Exception:
        peft.eject()
        raise
    return peft
