"""VB-LoRA: LoRA's factors composed from sub-vectors of one vector bank shared by every adapted layer
(``VBLoRAConfig``, ``peft_type`` ``VBLORA``, peft's file format).

Paper: Li et al., "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks", 2024, arXiv:2405.15179.

Equation: ``h = W0 x + B A dropout(x)``; every length-``b`` sub-vector of ``A: (r, in)`` and ``B: (out, r)`` is a
top-k admixture of the bank ``V: (n, b)``: ``v = sum_{i in topk(s)} softmax(s_topk)_i V_i`` for its own logits
``s: (n,)``. ``A`` is cut along ``in`` (``vblora_logits_A: (r, in / b, n)``), ``B`` along ``out``
(``vblora_logits_B: (out / b, r, n)``). Trainable parameters: ``n b`` (the bank, once per adapter) plus
``n r (in + out) / b`` per adapted ``(out, in)`` layer.

The bank is one trainable module kept beside the layers (``AdapterModel.extra_modules[<adapter>]``); each layer's
adapter refers to it without owning it, so it is counted, trained and saved once. Files hold
``base_model.vblora_vector_bank`` and ``base_model.model.<module>.vblora_logits_A`` / ``_B``; with
``save_only_topk_weights`` each logits tensor is written as ``<key>_topk_indices`` (the top-k bank rows, in the
narrowest integer type that holds ``n``) and ``<key>_topk_weights`` (the first ``k - 1`` softmax weights), which
load as logits that are ``-inf`` outside the top k (such an adapter runs and merges exactly but cannot train on).
Adapters: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, unwrap, wide
from peftkit.methods import _reparam as rp
from peftkit.methods.lora import trainable_biases
from peftkit.ops import Dropout
from peftkit.targeting import linear_types
from peftkit.tuners import WrapTuner

VBLORA_PAPER = ("VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li et al., 2024, "
                "arXiv:2405.15179)")
BANK_KEY = "base_model.vblora_vector_bank"
LOGITS = ("vblora_logits_A", "vblora_logits_B")

#: VB-LoRA's default targets per model type (peft's table; Gemma 4's regex is left out, as for LoRA).
VBLORA_TARGET_DEFAULTS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "gpt_bigcode": ("c_attn",),
    "deberta": ("in_proj",),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


@dataclass
class VBLoRAConfig(PeftConfig):
    """Configuration of VB-LoRA, peft's ``VBLoRAConfig`` (same fields and defaults).

    Args:
        r: rank of ``A`` and ``B``, an integer > 0. Default 4.
        num_vectors: ``n``, the vectors in the shared bank, an integer > 0. Default 256.
        vector_length: ``b``, the length of a bank vector, an integer > 0 that divides every adapted layer's input
            and output size (checked when injecting). Default 256 (MiniLM's 384 needs e.g. 128).
        topk: ``k``, the bank vectors mixed into each sub-vector, an integer in ``[1, num_vectors]``. Default 2 (the
            paper's choice).
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``; None (default) takes the
            model type's usual targets, as peft (:data:`VBLORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        save_only_topk_weights: write each layer's top-k indices and weights instead of its logits (a much smaller
            file, for inference and merging only: training cannot resume from it). Default False.
        vblora_dropout: dropout probability on the adapter's input, in [0, 1). Default 0.
        fan_in_fan_out: kept for file compatibility; the layout is read from the module type (peft corrects a wrong
            value with a warning and so arrives at the same).
        bias: ``"none"`` (default), ``"all"`` (train every bias of the model) or ``"vblora_only"`` (the biases of
            the adapted layers).
        modules_to_save: modules trained in full and saved with the adapter.
        init_vector_bank_bound: the bank starts uniform in ``[-bound, bound]``, a finite number > 0 (a zero bank
            gives zero gradients). Default 0.02.
        init_logits_std: the logits start normal with this standard deviation, a finite number >= 0. Default 0.1.
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).

    Equation: ``h = W0 x + B A x``, each length-``b`` piece of ``A``/``B`` a softmax-weighted sum of the ``k`` bank
    vectors with the largest logits. Trainable parameters: ``n b + sum over layers of n r (in + out) / b``.

    Raises:
        ConfigError: ``r``, ``num_vectors``, ``vector_length`` or ``topk`` not an integer > 0; ``topk >
            num_vectors``; dropout outside [0, 1); a bound that is not a finite number > 0; a logits std that is not
            a finite number >= 0; ``save_only_topk_weights``/``fan_in_fan_out`` not a bool; an unknown ``bias``;
            ``target_modules=[]``; when injecting, a layer whose sizes ``vector_length`` does not divide (the
            message names the module).

    Paper: VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li et al., 2024, arXiv:2405.15179).
    """

    peft_type = "VBLORA"
    default_target_modules = VBLORA_TARGET_DEFAULTS
    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            rp.check_positive_int(name, getattr(self, name))
        check(self.topk <= self.num_vectors, f"topk={self.topk} exceeds num_vectors={self.num_vectors}; each "
                                             "sub-vector mixes at most every vector of the bank")
        rp.check_unit_interval("vblora_dropout", self.vblora_dropout)
        bound, std = self.init_vector_bank_bound, self.init_logits_std
        check(_finite(bound) and bound > 0, f"init_vector_bank_bound={bound!r} is not valid; it must be a finite "
                                            "number > 0 (a zero bank gives zero gradients)")
        check(_finite(std) and std >= 0, f"init_logits_std={std!r} is not valid; it must be a finite number >= 0")
        for name in ("save_only_topk_weights", "fan_in_fan_out"):
            check(isinstance(getattr(self, name), bool), f"{name}={getattr(self, name)!r} must be True or False")
        check(self.bias in ("none", "all", "vblora_only"),
              f"bias={self.bias!r} is not valid; expected 'none', 'all' or 'vblora_only'")
        rp.check_common(self)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def indices_dtype(num_vectors: int) -> torch.dtype:
    """The integer type peft writes top-k indices in: uint8 below 2**8 vectors, int16 below 2**15, int32 below 2**31,
    else int64."""
    for limit, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if num_vectors < limit:
            return dtype
    return torch.int64


def topk_mix(logits: Tensor, bank: Tensor, k: int) -> Tensor:
    """The top-``k`` admixture: for each row of logits, ``sum_i softmax(top-k logits)_i bank[top-k index_i]``.

    Shapes: ``logits: (..., n)``, ``bank: (n, b)`` -> ``(..., b)``. Gradients reach the chosen logits and bank rows.
    """
    top, index = logits.topk(k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    return (weights.unsqueeze(-1) * bank[index]).sum(-2)


class VectorBank(nn.Module):
    """The bank ``vblora_vector_bank: (num_vectors, vector_length)`` of one adapter, uniform in ``[-bound, bound]``
    (float32, or float64 for a float64 model, as the layers' adapters); kept in ``AdapterModel.extra_modules`` and
    shared by every layer of the adapter."""

    def __init__(self, num_vectors: int, vector_length: int, bound: float, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        bank = torch.empty(num_vectors, vector_length, device=device, dtype=dtype).uniform_(-bound, bound)
        self.vblora_vector_bank = nn.Parameter(bank)


class VBLoRALinear(Adapter):
    """VB-LoRA on one ``nn.Linear`` or GPT-2 ``Conv1D``: ``y + B A dropout(x)``.

    Shapes: ``vblora_logits_A: (r, in / b, n)``, ``vblora_logits_B: (out / b, r, n)``; ``A: (r, in)``, ``B: (out,
    r)``; ``x: (..., in)``, ``y: (..., out)``. The bank is read from the shared :class:`VectorBank` (not a
    submodule: it is saved once, by the tuner). ``delta_weight`` is ``B A`` in the base weight's layout.
    ``export_state`` gives the logits, or with ``save_only_topk`` their top-k indices and first ``k - 1`` weights
    (peft's keys).
    """

    def __init__(self, bank: VectorBank, layout: rp.Layout, config: VBLoRAConfig) -> None:
        super().__init__()
        b, n = config.vector_length, config.num_vectors
        self.layout, self.r, self.topk, self.num_vectors = layout, config.r, config.topk, n
        self.save_only_topk = config.save_only_topk_weights
        self.__dict__["_bank"] = bank  # held, not registered: the tuner saves it once (BANK_KEY)
        device = bank.vblora_vector_bank.device
        self.vblora_dropout = Dropout(config.vblora_dropout) if config.vblora_dropout > 0 else nn.Identity()
        self.vblora_logits_A = nn.Parameter(torch.empty(config.r, layout.in_features // b, n, device=device))
        self.vblora_logits_B = nn.Parameter(torch.empty(layout.out_features // b, config.r, n, device=device))
        with torch.no_grad():
            for p in (self.vblora_logits_A, self.vblora_logits_B):
                p.normal_(0.0, config.init_logits_std)

    @property
    def bank(self) -> Tensor:
        """The shared ``(num_vectors, vector_length)`` bank."""
        return self._bank.vblora_vector_bank

    def factors(self, widen: bool = False) -> tuple[Tensor, Tensor]:
        """``(A: (r, in), B: (out, r))`` from the logits and the bank, in the logits' dtype (at least float32 with
        ``widen``)."""
        la, lb, bank = self.vblora_logits_A, self.vblora_logits_B, self.bank
        if widen:
            la, lb, bank = wide(la), wide(lb), wide(bank)
        bank = bank.to(device=la.device, dtype=la.dtype)
        a = topk_mix(la, bank, self.topk).reshape(self.r, -1)
        b = topk_mix(lb, bank, self.topk).transpose(1, 2).reshape(-1, self.r)
        return a, b

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        if self.training and bool(torch.isinf(self.vblora_logits_A[0, 0]).any()):
            raise RuntimeError("VB-LoRA logits hold -inf: this adapter was loaded from a save_only_topk_weights file, "
                               "which keeps only the top-k weights and cannot be trained further; train from a file "
                               "saved with save_only_topk_weights=False")
        a, b = self.factors()
        z = F.linear(self.vblora_dropout(x.to(a.dtype)), a)
        return y + F.linear(z, b).to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        a, b = self.factors(widen=True)
        return rp.to_base_layout(b.detach() @ a.detach(), self.layout)

    def export_state(self) -> dict[str, Tensor]:
        if not self.save_only_topk:
            return {name: getattr(self, name) for name in LOGITS}
        out: dict[str, Tensor] = {}
        for name in LOGITS:
            top, index = getattr(self, name).detach().topk(self.topk, dim=-1)
            out[f"{name}_topk_indices"] = index.to(indices_dtype(self.num_vectors))
            out[f"{name}_topk_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
        return out

    def extra_repr(self) -> str:
        return (f"r={self.r}, topk={self.topk}, num_vectors={self.num_vectors}, "
                f"vector_length={self.bank.shape[1]}, save_only_topk={self.save_only_topk}")


def logits_from_topk(indices: Tensor, weights: Tensor, num_vectors: int) -> Tensor:
    """Logits that give the saved top-k admixture back: ``log`` of the ``k`` weights (the last one ``1 - sum`` of the
    saved ``k - 1``) at the saved indices, ``-inf`` elsewhere (peft's reading).

    Shapes: ``indices: (..., k)`` (any integer type), ``weights: (..., k - 1)`` -> ``(..., num_vectors)`` in
    the weights' dtype, at least float32.

    Raises:
        ValueError: the shapes do not pair up, or an index lies outside ``[0, num_vectors)``.
    """
    if indices.shape[:-1] != weights.shape[:-1] or weights.shape[-1] != indices.shape[-1] - 1:
        raise ValueError(f"top-k indices {tuple(indices.shape)} and weights {tuple(weights.shape)} do not pair up "
                         "(the weights hold k - 1 of the k entries)")
    index = indices.to(torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_vectors):
        raise ValueError(f"top-k indices lie in [{int(index.min())}, {int(index.max())}], outside the bank's "
                         f"[0, {num_vectors})")
    w = wide(weights)
    full = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
    out = torch.full((*index.shape[:-1], num_vectors), float("-inf"), device=w.device, dtype=w.dtype)
    return out.scatter(-1, index, full.log())


class VBLoRATuner(WrapTuner):
    """Draws the adapter's bank, wraps each target (``nn.Linear``, GPT-2 ``Conv1D``, as peft) and keeps the bank in
    ``host.extra_modules``; saves it as ``base_model.vblora_vector_bank`` and reads top-k files back as logits."""

    method = "VB-LoRA"

    def __init__(self) -> None:
        self._bank: VectorBank | None = None

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return linear_types()

    def inject(self, host: Any, config: VBLoRAConfig, adapter_name: str) -> None:
        targets = self.find(host, config)
        first = unwrap(host.model.get_submodule(targets[0])) if targets else None
        weight = getattr(first, "weight", None)
        device = weight.device if weight is not None and weight.device.type != "meta" else None
        # the layers' adapters become float64 on a float64 base (AdaptedLayer.add); the bank follows them
        dtype = torch.float64 if weight is not None and weight.dtype == torch.float64 else torch.float32
        self._bank = VectorBank(config.num_vectors, config.vector_length, config.init_vector_bank_bound, device, dtype)
        try:
            super().inject(host, config, adapter_name)
            host.extra_modules[adapter_name] = self._bank
        finally:
            self._bank = None

    def make_adapter(self, base: nn.Module, config: VBLoRAConfig, module_name: str) -> Adapter:
        """A :class:`VBLoRALinear` on the bank :meth:`inject` drew.

        Raises:
            ConfigError: ``vector_length`` does not divide the layer's input or output size.
        """
        layout = rp.layout_of(base)
        b = config.vector_length
        check(layout.in_features % b == 0 and layout.out_features % b == 0,
              f"{module_name}: vector_length={b} does not divide the layer's sizes (in {layout.in_features}, out "
              f"{layout.out_features}); choose a common divisor of every adapted layer's sizes")
        return VBLoRALinear(self._bank, layout, config)

    def trainable_base_params(self, model: nn.Module, config: VBLoRAConfig, targets: list[str]) -> list[str]:
        return trainable_biases(model, config.bias, targets)

    def extra_tensors(self, host: Any, adapter_name: str) -> dict[str, Any]:
        """``base_model.vblora_vector_bank`` (peft's key)."""
        bank = host.extra_modules[adapter_name] if adapter_name in host.extra_modules else None
        return {} if bank is None else {BANK_KEY: bank.vblora_vector_bank}

    def before_load(self, host: Any, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Turn each ``<key>_topk_indices`` / ``<key>_topk_weights`` pair of a top-k file into ``<key>`` logits
        (``-inf`` outside the top k), whatever this adapter's own ``save_only_topk_weights``.

        Raises:
            AdapterLoadError: a pair with one half missing, shapes that do not pair up, or out-of-range indices.
        """
        from peftkit.formats.hf_peft import AdapterLoadError

        n = host.peft_config[adapter_name].num_vectors
        for key in [k for k in tensors if k.endswith("_topk_indices")]:
            stem = key[: -len("_topk_indices")]
            if stem + "_topk_weights" not in tensors:
                raise AdapterLoadError(f"{key} has no {stem}_topk_weights beside it; a save_only_topk_weights file "
                                       "holds both")
            try:
                tensors[stem] = logits_from_topk(tensors[key], tensors[stem + "_topk_weights"], n)
            except ValueError as err:
                raise AdapterLoadError(f"{stem}: {err}") from None
            del tensors[key], tensors[stem + "_topk_weights"]
        orphan = next((k for k in tensors if k.endswith("_topk_weights")), None)
        if orphan is not None:
            raise AdapterLoadError(f"{orphan} has no {orphan[: -len('_topk_weights')]}_topk_indices beside it; a "
                                   "save_only_topk_weights file holds both")


def vblora_from_cli(args: Any) -> VBLoRAConfig:
    """A :class:`VBLoRAConfig` from ``peftkit train`` options ``args``: ``--r`` (default 4), ``--lora-dropout`` as
    ``vblora_dropout``, ``--target-modules`` (default: the model type's, query and value on BERT), ``--task-type``;
    ``vector_length=128`` (peft's 256 does not divide MiniLM's 384) and ``num_vectors=90`` (the paper's bank for
    RoBERTa on GLUE); ``topk`` (2), ``save_only_topk_weights`` and the rest through ``--option``.

    Raises:
        ConfigError: invalid values (from the config's validation).
    """
    return VBLoRAConfig(r=args.r or 4, vblora_dropout=args.lora_dropout, target_modules=args.target_modules,
                        vector_length=128, num_vectors=90, task_type=args.task_type)


register_method(MethodSpec(
    name="vblora", config_cls=VBLoRAConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=VBLORA_PAPER, tuner=VBLoRATuner(), cli_config=vblora_from_cli, default_lr=1e-2,
))
