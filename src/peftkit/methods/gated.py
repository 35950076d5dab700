"""Gated LoRA, gated prefix tuning and gated bottleneck adapters: UniPELT's sub-modules.

Paper: Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", 2021,
arXiv:2110.07577. Each sub-module's contribution is multiplied by a learned gate
``g = mean_t sigmoid(W_g h_t + b_g)`` of the sub-module's input ``h`` (:mod:`peftkit.methods.gating`):

* gated LoRA (on ``W x``): ``y = W x + s * g(x) * B A x`` (the reference code uses ``s = 1``);
* gated adapter (serial, on a sub-layer output ``u``): ``u + g(u) * A(u)``, after a post-LN Add & Norm
  ``h = LN(u + x)``: ``LN(u + g(h) * A(h) + x)``; parallel: ``y + g(x) * A(x)``;
* gated prefix (at layer ``l`` with input ``h_l``): the prefix keys and values become ``g_l(h_l) * P_k,l``
  and ``g_l(h_l) * P_v,l`` (the gate is computed once per sequence, on its first call, and stays in the
  cache for the following generation steps).

Trainable parameters: each method's own plus the gates: ``in + 1`` per gated LoRA layer, ``d + 1`` per
gated adapter site, ``N * (d + 1)`` for the prefixes (``N`` layers, ``d`` hidden size). The gates depend
on the input, so nothing here merges into the base weights. UniPELT composes the three
(:mod:`peftkit.methods.hybrid`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, check, register_method
from peftkit.layers import AdaptedLayer
from peftkit.methods.adapter_layers import BottleneckAdapter
from peftkit.methods.adapters import BottleneckConfig, BottleneckTuner
from peftkit.methods.gating import UNIPELT_PAPER, SequenceMask, broadcast, gate_linear
from peftkit.methods.lora import LoraConfig, LoraLinear, LoraTuner
from peftkit.methods.prefix_tuning import PrefixEncoder, PrefixTuner, PrefixTuningConfig
from peftkit.methods.prompt_learning import ModelShape, VirtualTokens, model_shape
from peftkit.targeting import linear_types


@dataclass
class GatedLoraConfig(LoraConfig):
    """LoRA whose update is scaled by a learned per-example gate (UniPELT); see :class:`~peftkit.LoraConfig`.

    ``y = W x + (lora_alpha / r) * g(x) * B A x``, ``g(x) = mean_t sigmoid(W_g x_t + b_g)`` over the real
    tokens, ``W_g: (1, in)``. Linear and GPT-2 ``Conv1D`` layers only. Trainable parameters per adapted
    ``(out, in)`` layer: ``r * (in + out) + in + 1``.

    Raises:
        ConfigError: as :class:`~peftkit.LoraConfig`, or DoRA, ``lora_bias``, QA-LoRA, or an initialisation
            other than True, ``"gaussian"`` or False.

    Paper: UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning (Mao et al., 2021, arXiv:2110.07577).
    """

    peft_type = "GATED_LORA"
    mixed_batches = False  # the gates pool over the whole batch's attention mask

    def validate(self) -> None:
        super().validate()
        check(not (self.use_dora or self.lora_bias or self.use_qalora),
              f"use_dora={self.use_dora}, lora_bias={self.lora_bias}, use_qalora={self.use_qalora}: gated LoRA is "
              "plain LoRA with a gate; leave these False")
        check(self.init_lora_weights in (True, False, "gaussian"),
              f"init_lora_weights={self.init_lora_weights!r} is not valid for gated LoRA; expected True, "
              "'gaussian' or False")


class GatedLoraLinear(LoraLinear):
    """LoRA on a linear layer times the gate ``g(x)``; ``lora_gate: Linear(in, 1)``. Shapes as
    :class:`~peftkit.methods.lora.LoraLinear`; ``seq`` is the :class:`SequenceMask` its gate pools with.

    Args: as :class:`~peftkit.methods.lora.LoraLinear` (``in_features``, ``out_features``, ``r``, ``scaling``,
    ``dropout``, ``lora_bias`` default False, ``transposed`` default False); the gate reads ``in_features``.
    """

    mergeable = False
    fuses_base = False

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 lora_bias: bool = False, transposed: bool = False) -> None:
        super().__init__(in_features, out_features, r, scaling, dropout, lora_bias, transposed)
        self.lora_gate = gate_linear(in_features)
        self.seq: SequenceMask | None = None

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a = self.lora_A.weight
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        g = self.seq.gate(self.lora_gate, x)
        update = self.lora_B(F.linear(self.lora_dropout(x), a)) * (self.scaling * broadcast(g, x))
        return y + update.to(y.dtype)


class GatedLoraTuner(LoraTuner):
    """Gated LoRA adapters; one :class:`SequenceMask` per adapter, removed with it."""

    method = "gated LoRA"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        """Linear and GPT-2 ``Conv1D`` only (no embeddings or convolutions, unlike LoRA)."""
        return linear_types()

    def adapter_classes(self, config: LoraConfig) -> tuple[type, type, type]:
        return GatedLoraLinear, GatedLoraLinear, GatedLoraLinear  # only linear layers are supported

    def inject(self, host: Any, config: GatedLoraConfig, adapter_name: str) -> None:
        refuse_generative(host, config, "gated LoRA")
        super().inject(host, config, adapter_name)
        _attach_mask(host, adapter_name)

    def remove(self, host: Any, adapter_name: str) -> None:
        _detach_mask(host, adapter_name)


@dataclass
class GatedBottleneckConfig(BottleneckConfig):
    """Bottleneck adapters whose output is scaled by a learned per-example gate (UniPELT); placed as
    Pfeiffer's (after the FFN's Add & Norm on post-LN encoders, ``original_ln_before=True``, as AdapterHub's
    UniPELT, whose adapter is a gated ``SeqBnConfig``; ``mh_adapter=True`` adds the attention site). See
    :class:`BottleneckConfig` and :class:`~peftkit.methods.adapters.PfeifferConfig`.

    Serial: ``u + g(u) * A(u)`` on an output projection ``u``; after an Add & Norm ``h = LN(u + x)``:
    ``LN(u + g(h) * A(h) + x)``; on a pre-LN block's output ``z``: ``z + g(z) * A(z)``; parallel: ``y + g(x) * A(x)``; ``g = mean_t sigmoid(W_g h_t + b_g)``,
    ``W_g: (1, d)``. Trainable parameters per site: ``2 d m + m + d`` (+ ``d + 1`` for the gate). A file saved
    before ``original_ln_before`` existed loads with False (the adapter on the FFN's output projection).

    Paper: UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning (Mao et al., 2021, arXiv:2110.07577).
    """

    peft_type = "GATED_BOTTLENECK"
    mixed_batches = False  # the gates pool over the whole batch's attention mask
    mh_adapter: bool = False
    original_ln_before: bool = True


class GatedBottleneckAdapter(BottleneckAdapter):
    """A bottleneck adapter times the gate of its input; ``adapter_gate: Linear(d, 1)``.

    Args:
        width: the hidden size ``d``; the other arguments are :class:`BottleneckAdapter`'s.
    """

    def __init__(self, width: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(width, *args, **kwargs)
        self.adapter_gate = gate_linear(width)
        self.seq: SequenceMask | None = None

    def bottleneck(self, h: Tensor) -> Tensor:
        out = super().bottleneck(h)
        return out * broadcast(self.seq.gate(self.adapter_gate, h), out)


class GatedBottleneckTuner(BottleneckTuner):
    """Gated bottleneck adapters at the table's (or the given) sites."""

    method = "gated bottleneck adapters"
    adapter_cls = GatedBottleneckAdapter

    def inject(self, host: Any, config: GatedBottleneckConfig, adapter_name: str) -> None:
        refuse_generative(host, config, "gated bottleneck adapters")
        super().inject(host, config, adapter_name)
        _attach_mask(host, adapter_name)

    def remove(self, host: Any, adapter_name: str) -> None:
        _detach_mask(host, adapter_name)


def refuse_generative(host: Any, config: Any, method: str) -> None:
    """Refuse a gated method on a model that generates text: ``task_type`` ``CAUSAL_LM`` or ``SEQ_2_SEQ_LM``,
    or, without a task type, a model whose ``can_generate()`` is true. A gate averages a sequence's tokens,
    so there every position would see later tokens (a causal LM's training would read the tokens it is to
    predict) and a cached generation step, which sees only its new token, would differ from a full forward.

    Raises:
        ConfigError: naming the method, the task type or model class, and what to use instead.
    """
    task = getattr(config, "task_type", None)
    if task is None:  # a part of a composition: the composition's task
        owner = next((host.owner(n) for n, c in host.peft_config.items() if c is config), None)
        task = getattr(host.peft_config.get(owner), "task_type", None)
    model = host.model
    generates = task in ("CAUSAL_LM", "SEQ_2_SEQ_LM") or (
        task is None and callable(getattr(model, "can_generate", None)) and bool(model.can_generate()))
    check(not generates, f"{method} (UniPELT) cannot adapt a model that generates text "
          f"({f'task_type={task!r}' if task else type(model).__name__}): its gates average each sequence's tokens, so "
          "every position would see later tokens and cached generation would differ from a full forward; use it "
          "for encoder tasks (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION), or a method without gates "
          "(e.g. lora, or mam for a hybrid)")


def _gated(host: Any, adapter_name: str) -> list[Any]:
    return [w.adapters[adapter_name] for _, w in host.wrappers()
            if isinstance(w, AdaptedLayer) and adapter_name in w.adapters]


def _attach_mask(host: Any, adapter_name: str) -> None:
    seq = SequenceMask(host.model)
    for adapter in _gated(host, adapter_name):
        adapter.seq = seq


def _detach_mask(host: Any, adapter_name: str) -> None:
    adapters = _gated(host, adapter_name)
    if adapters and adapters[0].seq is not None:
        adapters[0].seq.remove()


@dataclass
class GatedPrefixTuningConfig(PrefixTuningConfig):
    """Prefix tuning whose prefixes are scaled by a learned per-example gate at every layer (UniPELT); see
    :class:`~peftkit.PrefixTuningConfig`.

    At layer ``l`` with input ``h_l``: ``g_l = mean_t sigmoid(W_g[l] h_l,t + b_g[l])`` over the real tokens,
    and the layer attends to ``[g_l P_k,l ; K]`` and ``[g_l P_v,l ; V]``. ``W_g: (N, d)`` (``d`` the hidden
    size), saved as ``prefix_gate.weight``/``prefix_gate.bias`` next to ``prompt_embeddings``. Trainable
    parameters: prefix tuning's plus ``N * (d + 1)``. Needs attention modules with an integer
    ``layer_idx`` that take ``cache`` (transformers' BERT, GPT-2, Llama families).

    Paper: UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning (Mao et al., 2021, arXiv:2110.07577).
    """

    peft_type = "GATED_PREFIX_TUNING"
    mixed_batches = False  # the gates pool over the whole batch's attention mask


class GatedPrefixEncoder(PrefixEncoder):
    """:class:`PrefixEncoder` plus the per-layer gates ``prefix_gate: Linear(d, N)`` (row ``l`` gates layer ``l``).

    Args:
        config: the adapter's config (``N = config.num_layers``).
        hidden_size: ``d``, the width of the hidden states the gates read.
        folded: build without the reparameterisation (as :class:`PrefixEncoder`). Default False.
    """

    def __init__(self, config: GatedPrefixTuningConfig, hidden_size: int, folded: bool = False) -> None:
        super().__init__(config, folded)
        self.prefix_gate = gate_linear(hidden_size, config.num_layers)


class GatedPrefixTuner(PrefixTuner):
    """Prefix tuning plus a pre-hook on every self-attention module that scales that layer's prefixes in
    the cache by its gate on the first call of a sequence (when the layer's cache holds only them)."""

    method = "gated prefix tuning"

    def build(self, config: GatedPrefixTuningConfig, model: nn.Module, shape: ModelShape) -> VirtualTokens:
        return GatedPrefixEncoder(config, shape.hidden_size, folded=config.inference_mode)

    def inject(self, host: Any, config: GatedPrefixTuningConfig, adapter_name: str) -> None:
        refuse_generative(host, config, "gated prefix tuning")
        attention = _attention_modules(host.model, model_shape(host.model).num_layers)
        super().inject(host, config, adapter_name)
        module = host.extra_modules[adapter_name]
        module.gating = _PrefixGates(module, attention, config.num_virtual_tokens, SequenceMask(host.model))

    def remove(self, host: Any, adapter_name: str) -> None:
        if adapter_name in host.extra_modules:
            host.extra_modules[adapter_name].gating.remove()
        super().remove(host, adapter_name)

    def extra_tensors(self, host: Any, adapter_name: str) -> dict[str, Any]:
        gate = host.extra_modules[adapter_name].prefix_gate
        return {**super().extra_tensors(host, adapter_name), "prefix_gate.weight": gate.weight,
                "prefix_gate.bias": gate.bias}


def _attention_modules(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The self-attention modules (integer ``layer_idx``, a ``cache`` argument), one per layer in order.

    Raises:
        ConfigError: they are not exactly one per layer.
    """
    found = {m.layer_idx: m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and "cache" in inspect.signature(m.forward).parameters}
    check(sorted(found) == list(range(num_layers)),
          f"gated prefix tuning needs one self-attention module per layer (an integer layer_idx and a 'cache' "
          f"argument); found layers {sorted(found)} in {type(model).__name__}")
    return [found[i] for i in sorted(found)]


class _PrefixGates:
    """The attention pre-hooks of one gated prefix adapter."""

    def __init__(self, encoder: GatedPrefixEncoder, attention: list[nn.Module], num_virtual: int,
                 seq: SequenceMask) -> None:
        self.encoder, self.num_virtual, self.seq = encoder, num_virtual, seq
        self.handles = [m.register_forward_pre_hook(self._hook(i, m), with_kwargs=True)
                        for i, m in enumerate(attention)]

    def remove(self) -> None:
        self.seq.remove()
        for h in self.handles:
            h.remove()

    def _hook(self, layer: int, module: nn.Module) -> _ScalePrefix:
        return _ScalePrefix(self, layer, list(inspect.signature(module.forward).parameters))


class _ScalePrefix:
    """The pre-hook of one attention module: on the first call of a sequence, scale layer ``layer``'s prefixes in
    the cache by its gate. An object rather than a closure, so that a deep copy or pickle of the model carries
    a hook that reads the copy's gate and mask (a closure would keep reading the original's)."""

    def __init__(self, gates: _PrefixGates, layer: int, names: list[str]) -> None:
        self.gates, self.layer, self.names = gates, layer, names

    def __call__(self, mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        gates, layer = self.gates, self.layer
        bound = {**dict(zip(self.names, args, strict=False)), **kwargs}
        cache, h = bound.get("cache"), bound.get("hidden_states")
        if cache is None or h is None or not gates.encoder.hooks.applies():
            return
        kv = cache.layers[layer]
        if kv.get_seq_length() != gates.num_virtual:  # not the first call: the gate is already applied
            return
        gate = gates.encoder.prefix_gate
        g = gates.seq.pool(F.linear(h.to(gate.weight.dtype), gate.weight[layer:layer + 1],
                                    gate.bias[layer:layer + 1]).sigmoid())
        kv.keys = kv.keys * broadcast(g, kv.keys)
        kv.values = kv.values * broadcast(g, kv.values)


def gated_lora_from_cli(args: Any) -> GatedLoraConfig:
    """``peftkit train --method gated-lora``: options ``args``; rank ``--r`` (default 8), ``s = lora_alpha / r``,
    ``--lora-dropout``, ``--target-modules`` (default ``"all-linear"``)."""
    return GatedLoraConfig(r=args.r or 8, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           target_modules=args.target_modules or "all-linear", task_type=args.task_type)


def gated_prefix_from_cli(args: Any) -> GatedPrefixTuningConfig:
    """``peftkit train --method gated-prefix``: 20 prefixes trained through the MLP (width 128); of the options
    ``args`` only ``--task-type`` is read."""
    return GatedPrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128,
                                   task_type=args.task_type)


def gated_adapter_from_cli(args: Any) -> GatedBottleneckConfig:
    """``peftkit train --method gated-adapter``: Pfeiffer placement, ``m = d // 16``; of the options ``args``
    ``--target-modules`` and ``--task-type`` are read."""
    return GatedBottleneckConfig(target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="gated-lora", config_cls=GatedLoraConfig, family="hybrid", kind="wrap", mergeable=False,
    paper=UNIPELT_PAPER, tuner=GatedLoraTuner(), cli_config=gated_lora_from_cli,
))
register_method(MethodSpec(
    name="gated-prefix", config_cls=GatedPrefixTuningConfig, family="hybrid", kind="prompt", mergeable=False,
    paper=UNIPELT_PAPER, tuner=GatedPrefixTuner(), cli_config=gated_prefix_from_cli, default_lr=1e-3,
))
register_method(MethodSpec(
    name="gated-adapter", config_cls=GatedBottleneckConfig, family="hybrid", kind="wrap", mergeable=False,
    paper=UNIPELT_PAPER, tuner=GatedBottleneckTuner(), cli_config=gated_adapter_from_cli,
))
