"""Bottleneck adapters: Houlsby, Pfeiffer, parallel, Compacter, Compacter++ and AdapterDrop.

Papers:
  Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", 2019, arXiv:1902.00751 (serial,
    after attention and after the FFN).
  Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", 2020,
    arXiv:2005.00247 (serial, after the FFN only, between the transformer's own Add & Norm and a second
    pass through it).
  He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", 2021, arXiv:2110.04366
    (parallel, beside the FFN or the attention, scaled).
  Mahabadi et al., "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", 2021, arXiv:2106.04647.
  Rücklé et al., "AdapterDrop: On the Efficiency of Adapters in Transformers", 2020, arXiv:2010.11918.

Equation: serial ``u <- u + s * W_up f(W_down u)`` on a sub-layer's output ``u`` before the residual
add; parallel ``y <- y + s * W_up f(W_down x)`` with ``x`` the sub-layer's input. Pfeiffer placement
(AdapterHub's ``original_ln_before=True``) on a post-LN encoder: with the block's Add & Norm
``LN(u + x)`` (``x`` the residual), ``h = LN(u + x)`` and the output is ``LN(u + A(h) + x)``. Trainable parameters
per site: ``2 d m + d + m`` (``d`` hidden size, ``m`` bottleneck); Compacter ``2 r (d + m) + d + m``
per site plus ``n^3`` shared.

The sites come from a small per-architecture table (:data:`ADAPTER_SITES`, keyed by
``config.model_type``); ``target_modules`` names them explicitly for other models. Config class names
follow AdapterHub's (``HoulsbyConfig``, ``PfeifferConfig``, ``ParallelConfig``, ``CompacterConfig``,
``CompacterPlusPlusConfig``); peft has no bottleneck adapters, so the ``peft_type`` strings are our own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.config import ConfigError, MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, unwrap
from peftkit.methods.adapter_layers import ACTIVATIONS, BottleneckAdapter, DropState, SublayerLayer
from peftkit.targeting import (
    check_target_fields,
    find_targets,
    iter_logical_modules,
    layer_index,
    linear_types,
)
from peftkit.tuners import WrapTuner

INIT_CHOICES = ("identity", "bert")
DROP_MODES = ("fixed", "random")
PRE_LN_SITES = ("layer", "projection")


@dataclass(frozen=True)
class Sites:
    """Where adapters go in one architecture: full-match regexes over module names.

    ``attn_output`` / ``ffn_output``: the output projections serial adapters wrap; ``attn_block`` /
    ``ffn_block``: the sub-layers parallel adapters sit beside; ``attn_norm`` / ``ffn_norm``: the LayerNorm of
    each sub-layer's Add & Norm, where serial adapters with ``original_ln_before`` go (None on pre-LN models,
    which have none); ``layer``: on a pre-LN model, the transformer block (decoder layer) itself, whose output
    is the FFN sub-layer's residual sum ``x + u``, where serial FFN adapters with ``original_ln_before`` go
    (None on post-LN models).
    """

    attn_output: str
    ffn_output: str
    attn_block: str
    ffn_block: str
    attn_norm: str | None = None
    ffn_norm: str | None = None
    layer: str | None = None


_BERT = Sites(r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense", r".*\.attention\.output",
              r".*\.layer\.\d+\.output", r".*\.attention\.output\.LayerNorm", r".*\.layer\.\d+\.output\.LayerNorm")
_LLAMA = Sites(r".*\.self_attn\.o_proj", r".*\.mlp\.down_proj", r".*\.self_attn", r".*\.mlp",
               layer=r".*\.layers\.\d+")
ADAPTER_SITES: dict[str, Sites] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), _BERT),
    "distilbert": Sites(r".*\.attention\.out_lin", r".*\.ffn\.lin2", r".*\.attention", r".*\.ffn",
                        r".*\.sa_layer_norm", r".*\.output_layer_norm"),
    "deberta-v2": _BERT,
    "gpt2": Sites(r".*\.attn\.c_proj", r".*\.mlp\.c_proj", r".*\.attn", r".*\.mlp", layer=r"(?:.*\.)?h\.\d+"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"), _LLAMA),
    "starcoder2": Sites(r".*\.self_attn\.o_proj", r".*\.mlp\.c_proj", r".*\.self_attn", r".*\.mlp",
                        layer=r".*\.layers\.\d+"),
    "vit": Sites(r".*\.attention\.o_proj", r".*\.mlp\.fc2", r".*\.layers\.\d+\.attention", r".*\.mlp",
                 layer=r".*\.layers\.\d+"),
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters (field names as AdapterHub's ``BnConfig`` where it has them).

    Args:
        target_modules: explicit sites: output projections (``nn.Linear``/GPT-2 ``Conv1D``) for serial
            adapters, whole attention/FFN sub-layers for parallel ones; a list of names/suffixes or a
            full-match regex. None (default) takes them from :data:`ADAPTER_SITES` by the model's
            ``config.model_type``.
        exclude_modules: names/suffixes or regex never adapted.
        mh_adapter: put an adapter at the attention sub-layer (table sites only). Default True.
        output_adapter: put an adapter at the feed-forward sub-layer (table sites only). Default True.
        is_parallel: beside the sub-layer (He et al.) instead of serial after its output projection.
        original_ln_before: (AdapterHub's name) a serial adapter sits after the sub-layer's Add & Norm: on
            a post-LN encoder (BERT, RoBERTa, ELECTRA, DistilBERT, ...: the ``attn_norm``/``ffn_norm`` of
            :data:`ADAPTER_SITES`) it wraps that LayerNorm, reads ``h = LN(u + x)`` (``u`` the sub-layer's
            output, ``x`` its residual) and, with ``original_ln_after``, gives ``LN(u + A(h) + x)``: the
            transformer's own LayerNorm runs before and after the adapter. On a pre-LN model (GPT-2, Llama,
            Mistral, Qwen, Gemma, Phi-3, StarCoder2, ViT: the ``layer`` of :data:`ADAPTER_SITES`) the FFN's
            adapter wraps the whole block and maps its output ``z = x + u`` to ``z + A(z)``: AdapterHub's
            ``x + u + A(x + u)`` there (see ``pre_ln_site``); the attention's adapter (``mh_adapter``) stays on
            its output projection, as no module's output is the attention's residual sum. Default False (the
            adapter on the output projection, before the Add & Norm); ignored for parallel adapters. With
            explicit ``target_modules`` a LayerNorm target gets this placement.
        original_ln_after: (AdapterHub's name) with ``original_ln_before``, the Add & Norm runs again after the
            adapter (True, default: ``LN(u + A(h) + x)``) or not (False: ``h + A(h)``, which needs
            ``residual_before_ln=False`` and ``ln_before=False``). Without ``original_ln_before`` it must be
            True (the adapter's output then goes through the block's own Add & Norm, as it always did). At a
            pre-LN block's output both give ``z + A(z)``, as in AdapterHub.
        pre_ln_site: where ``original_ln_before`` puts the FFN's serial adapter on a pre-LN model of the table:
            ``"layer"`` (default: on the block's output, ``z + A(z)``, as above) or ``"projection"`` (on the
            FFN's output projection, ``u + A(u)`` before the residual add). A file saved without this field
            (by peftkit 0.1.0 before it existed) loads with ``"projection"``, the placement it was trained
            with; ignored elsewhere (post-LN models, parallel adapters, explicit ``target_modules``).
        reduction_factor: bottleneck ``m = d // reduction_factor`` (> 0). Default 16.
        bottleneck_size: ``m`` directly (overrides ``reduction_factor``) or None. With ``phm_layer`` a
            ``reduction_factor``-derived ``m`` is rounded up to a multiple of ``phm_dim``.
        non_linearity: one of :data:`~peftkit.methods.adapter_layers.ACTIVATIONS`. Default ``"relu"``.
        scaling: ``s``, multiplies the adapter's output (> 0). Default 1.
        adapter_dropout: dropout on the bottleneck activations, in [0, 1). Default 0.
        ln_before: a trainable LayerNorm on the adapter input. residual_before_ln: with ``ln_before``,
            the serial skip connection carries the input before (True, default) or after the LayerNorm. With
            ``original_ln_before`` the skip is AdapterHub's: True carries ``u`` (the output becomes
            ``LN(u + A(h) + x)``; the only choice there with ``original_ln_after``: False is refused when the
            adapter is injected at an Add & Norm), False carries ``h``.
        init_weights: ``"identity"`` (default: up-projection zero, the model is unchanged at step 0, except
            with ``ln_before`` and ``residual_before_ln=False``, whose skip carries the normalised input, as
            in AdapterHub) or ``"bert"`` (all weights N(0, 0.01^2): near identity).
        phm_layer: use Compacter's PHM layers; phm_dim ``n`` (divides ``d`` and ``m``), phm_rank ``r``.
            One ``(n, n, n)`` rule tensor is shared by every PHM layer of the adapter.
        adapterdrop_layers: AdapterDrop's ``N`` (>= 0); adapterdrop_mode ``"fixed"`` leaves the adapters
            of the lowest ``N`` blocks out (training and inference skip them), ``"random"`` keeps them and
            skips those of blocks ``< n`` in each training step, ``n`` drawn from ``{0..N}`` after each
            optimiser step (robust AdapterDrop; needs ``PeftModel.peft_step_end``, which the trainer calls).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        modules_to_save: modules trained in full and saved with the adapter.

    Raises:
        ConfigError: on any out-of-range or unknown value (the message names it and what is valid).

    Paper: Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019, arXiv:1902.00751).
    """

    peft_type = "BOTTLENECK"
    # files saved before the Add & Norm placement existed put every serial adapter on the output projection
    # and files saved before pre_ln_site existed kept it there on pre-LN models even with original_ln_before
    saved_before_defaults: ClassVar[dict[str, Any]] = {"original_ln_before": False, "original_ln_after": True,
                                                       "pre_ln_site": "projection"}
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    mh_adapter: bool = True
    output_adapter: bool = True
    is_parallel: bool = False
    original_ln_before: bool = False
    original_ln_after: bool = True
    pre_ln_site: str = "layer"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    ln_before: bool = False
    residual_before_ln: bool = True
    init_weights: str = "identity"
    phm_layer: bool = False
    phm_dim: int = 4
    phm_rank: int = 1
    adapterdrop_layers: int = 0
    adapterdrop_mode: str = "fixed"
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        check_target_fields(self)
        for name in ("mh_adapter", "output_adapter", "is_parallel", "original_ln_before", "original_ln_after",
                     "ln_before", "residual_before_ln", "phm_layer"):
            check(isinstance(getattr(self, name), bool), f"{name}={getattr(self, name)!r} must be True or False")
        if not self.is_parallel:
            check(self.original_ln_before or self.original_ln_after,
                  "original_ln_before=False with original_ln_after=False would drop the block's residual and "
                  "LayerNorm; set original_ln_after=True (the adapter before the Add & Norm) or "
                  "original_ln_before=True (after it)")
            check(self.original_ln_after or not (self.residual_before_ln or self.ln_before),
                  f"original_ln_after=False needs residual_before_ln=False and ln_before=False (the output is "
                  f"h + A(h), h = LN(u + x)); got residual_before_ln={self.residual_before_ln}, "
                  f"ln_before={self.ln_before}")
        check(self.pre_ln_site in PRE_LN_SITES,
              f"pre_ln_site={self.pre_ln_site!r} is not valid; expected one of {PRE_LN_SITES}")
        check(self.target_modules is not None or self.mh_adapter or self.output_adapter,
              "mh_adapter=False and output_adapter=False leave no site; enable one or give target_modules")
        check(_number(self.reduction_factor) and self.reduction_factor > 0,
              f"reduction_factor={self.reduction_factor!r} is not valid; it must be a number > 0")
        check(self.bottleneck_size is None or (_int(self.bottleneck_size) and self.bottleneck_size > 0),
              f"bottleneck_size={self.bottleneck_size!r} is not valid; give an integer > 0 or None")
        check(self.non_linearity in ACTIVATIONS,
              f"non_linearity={self.non_linearity!r} is not valid; expected one of {sorted(ACTIVATIONS)}")
        check(_number(self.scaling) and self.scaling > 0, f"scaling={self.scaling!r} must be a number > 0")
        check(_number(self.adapter_dropout) and 0 <= self.adapter_dropout < 1,
              f"adapter_dropout={self.adapter_dropout!r} is not valid; it must lie in [0, 1)")
        check(self.init_weights in INIT_CHOICES,
              f"init_weights={self.init_weights!r} is not valid; expected one of {INIT_CHOICES}")
        check(_int(self.phm_dim) and self.phm_dim >= 1, f"phm_dim={self.phm_dim!r} must be an integer >= 1")
        check(_int(self.phm_rank) and self.phm_rank >= 1, f"phm_rank={self.phm_rank!r} must be an integer >= 1")
        check(_int(self.adapterdrop_layers) and self.adapterdrop_layers >= 0,
              f"adapterdrop_layers={self.adapterdrop_layers!r} must be an integer >= 0")
        check(self.adapterdrop_mode in DROP_MODES,
              f"adapterdrop_mode={self.adapterdrop_mode!r} is not valid; expected one of {DROP_MODES}")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if _int(self.layers_to_transform) else self.layers_to_transform
            check(isinstance(layers, list) and all(_int(i) and i >= 0 for i in layers),
                  f"layers_to_transform={self.layers_to_transform!r} must be a block index >= 0 or a list of them")

    def bottleneck_for(self, width: int) -> int:
        """``m`` for hidden size ``width``: ``bottleneck_size``, else ``max(1, width // reduction_factor)``
        (with ``phm_layer`` rounded up to a multiple of ``phm_dim``)."""
        if self.bottleneck_size:
            return self.bottleneck_size
        m = max(1, int(width // self.reduction_factor))
        return -(-m // self.phm_dim) * self.phm_dim if self.phm_layer else m


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby et al. 2019 (arXiv:1902.00751): serial adapters after the attention and after the FFN
    output projections, swish non-linearity, ``m = d // 16``; see :class:`BottleneckConfig`.

    Args:
        non_linearity: default ``"swish"`` (instead of ``"relu"``). Every other field and default is
            :class:`BottleneckConfig`'s (``mh_adapter=True``, ``output_adapter=True``,
            ``reduction_factor=16``, serial).

    Raises:
        ConfigError: as :class:`BottleneckConfig`.

    Paper: Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019, arXiv:1902.00751).
    """

    peft_type = "HOULSBY"
    non_linearity: str = "swish"


@dataclass
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer et al. 2020 (arXiv:2005.00247): one serial adapter after the FFN, ReLU, ``m = d // 16``;
    AdapterHub's ``SeqBnConfig``/``PfeifferConfig``. See :class:`BottleneckConfig`.

    On a post-LN encoder (BERT, RoBERTa, ELECTRA, DistilBERT, ...) the adapter re-uses the FFN's own Add &
    Norm: with ``u`` the FFN output and ``x`` its residual, ``h = LN(u + x)`` and the block's output is
    ``LN(u + A(h) + x)`` (the adapter wraps that LayerNorm). On pre-LN models (GPT-2, Llama, ...) AdapterHub adds
    ``A`` of the FFN's residual sum, ``x + u + A(x + u)``, and ``x + u`` is the block's output ``z``: the adapter
    wraps the whole block and gives ``z + A(z)`` (``pre_ln_site="projection"``: ``u + A(u)`` on the FFN's output
    projection, before the residual add, as files saved without ``pre_ln_site`` load).

    Args:
        mh_adapter: default False (no adapter at the attention sub-layer).
        original_ln_before: default True (after the Add & Norm, as above); ``original_ln_after`` stays True
            and ``residual_before_ln`` True, as AdapterHub's. A file saved before these fields existed loads
            with ``original_ln_before=False``, the placement it was trained with (adapter on the projection).

    Every other field and default is :class:`BottleneckConfig`'s (``non_linearity="relu"``,
    ``reduction_factor=16``, ``ln_before=False``).

    Raises:
        ConfigError: as :class:`BottleneckConfig`.

    Paper: AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al., 2020,
        arXiv:2005.00247).
    """

    peft_type = "PFEIFFER"
    mh_adapter: bool = False
    original_ln_before: bool = True


@dataclass
class ParallelConfig(BottleneckConfig):
    """He et al. 2021 (arXiv:2110.04366): a parallel adapter beside the FFN with ``s = 4`` and
    ``m = d // 2`` (AdapterHub's ``ParBnConfig`` defaults); ``mh_adapter=True`` adds one beside the
    attention. See :class:`BottleneckConfig`.

    Args:
        mh_adapter: default False (only the FFN gets an adapter).
        is_parallel: default True (beside the sub-layer, fed its input).
        reduction_factor: default 2 (``m = d // 2``).
        scaling: ``s``, default 4.0.

    Every other field and default is :class:`BottleneckConfig`'s.

    Raises:
        ConfigError: as :class:`BottleneckConfig`.

    Paper: Towards a Unified View of Parameter-Efficient Transfer Learning (He et al., 2021, arXiv:2110.04366).
    """

    peft_type = "PARALLEL_ADAPTER"
    mh_adapter: bool = False
    is_parallel: bool = True
    reduction_factor: float = 2
    scaling: float = 4.0


@dataclass
class CompacterConfig(BottleneckConfig):
    """Mahabadi et al. 2021 (arXiv:2106.04647): Houlsby placement with PHM projections (``n = 4``,
    rank 1, one shared rule tensor), GELU, ``m = d // 32``. See :class:`BottleneckConfig`.

    Args:
        phm_layer: default True (PHM down/up projections with ``phm_dim=4``, ``phm_rank=1``).
        reduction_factor: default 32 (``m = d // 32``, rounded up to a multiple of ``phm_dim``).
        non_linearity: default ``"gelu"``.

    Every other field and default is :class:`BottleneckConfig`'s (both sites, serial).

    Raises:
        ConfigError: as :class:`BottleneckConfig`.

    Paper: Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Mahabadi et al., 2021, arXiv:2106.04647).
    """

    peft_type = "COMPACTER"
    phm_layer: bool = True
    reduction_factor: float = 32
    non_linearity: str = "gelu"


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++ (arXiv:2106.04647): Compacter with the adapter after the FFN only, placed as
    :class:`PfeifferConfig`'s (AdapterHub's ``CompacterPlusPlusConfig`` derives from ``SeqBnConfig``).

    Args:
        mh_adapter: default False (no adapter at the attention sub-layer).
        original_ln_before: default True (after the FFN's Add & Norm on post-LN encoders; see
            :class:`PfeifferConfig`; files saved before the field existed load with False).

    Every other field and default is :class:`CompacterConfig`'s.

    Raises:
        ConfigError: as :class:`BottleneckConfig`.

    Paper: Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Mahabadi et al., 2021, arXiv:2106.04647).
    """

    peft_type = "COMPACTER_PP"
    mh_adapter: bool = False
    original_ln_before: bool = True


@dataclass
class AdapterDropConfig(PfeifferConfig):
    """Rücklé et al. 2020 (arXiv:2010.11918): Pfeiffer adapters (and placement) with none in the lowest 2
    blocks (``adapterdrop_layers=2``, ``adapterdrop_mode="fixed"``; ``"random"`` is robust AdapterDrop).

    Args:
        adapterdrop_layers: default 2. Every other field and default is :class:`PfeifferConfig`'s.

    Raises:
        ConfigError: as :class:`BottleneckConfig`.

    Paper: AdapterDrop: On the Efficiency of Adapters in Transformers (Rücklé et al., 2020, arXiv:2010.11918).
    """

    peft_type = "ADAPTERDROP"
    adapterdrop_layers: int = 2


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` of an HF model, else None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _widths(m: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a linear module (``nn.Linear`` or GPT-2 ``Conv1D``), else None."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, linear_types()):
        return m.weight.shape[0], m.weight.shape[1]
    return None


def output_width(module: nn.Module, hidden: int | None = None) -> int:
    """The hidden size a site works at: the output features of a linear module; inside a sub-layer, the model's
    ``hidden`` size when one of its linear modules outputs that many features (modules register in any order:
    Phi-3's attention registers ``o_proj`` before ``qkv_proj``), else those of its last linear module.

    Raises:
        ConfigError: the module holds no linear layer.
    """
    if hidden is not None and any((w := _widths(m)) and w[1] == hidden for _, m in iter_logical_modules(module)):
        return hidden
    for _, m in reversed(list(iter_logical_modules(module))):
        if isinstance(m, nn.Linear):
            return m.out_features
        if isinstance(m, linear_types()):
            return m.weight.shape[1]
    raise ConfigError(f"cannot find the hidden size of a {type(module).__name__} (it holds no linear layer)")


def input_width(module: nn.Module, hidden: int | None = None) -> int | None:
    """The input features of a sub-layer: the model's ``hidden`` size when one of its linear modules reads that
    many, else those of its first linear module; None when it holds none."""
    if hidden is not None and any((w := _widths(m)) and w[0] == hidden for _, m in iter_logical_modules(module)):
        return hidden
    for _, m in iter_logical_modules(module):
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, linear_types()):
            return m.weight.shape[0]
    return None


class BottleneckTuner(WrapTuner):
    """Builds bottleneck adapters at the table's (or the given) sites."""

    method = "bottleneck adapters"
    adapter_cls: type[BottleneckAdapter] = BottleneckAdapter

    def __init__(self) -> None:
        self._rule: nn.Parameter | None = None
        self._drop: DropState | None = None
        self._hidden: int | None = None

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        """Linear and GPT-2 ``Conv1D`` (serial adapters) and ``nn.LayerNorm`` (serial adapters with
        ``original_ln_before``); :meth:`find` takes any module for parallel ones."""
        return (*linear_types(), nn.LayerNorm)

    def new_wrapper(self, module: nn.Module) -> AdaptedLayer:
        serial = isinstance(module, (*linear_types(), nn.LayerNorm))
        return AdaptedLayer(module) if serial else SublayerLayer(module)

    def find(self, host: Any, config: BottleneckConfig) -> list[str]:
        model = host.model
        targets = config.target_modules
        if targets is None:
            kind = model_type(model)
            sites = ADAPTER_SITES.get(kind)
            check(sites is not None,
                  f"{type(config).__name__}: no adapter sites known for model_type={kind!r} (known: "
                  f"{sorted(ADAPTER_SITES)}); give target_modules: the attention/FFN output projections for "
                  "serial adapters, or the attention/FFN sub-layer modules for parallel ones")
            norm, layer = _placement(config, sites)
            attn, ffn = ((sites.attn_block, sites.ffn_block) if config.is_parallel else
                         (sites.attn_norm, sites.ffn_norm) if norm else
                         (sites.attn_output, sites.layer if layer else sites.ffn_output))
            targets = "|".join(f"(?:{regex})" for on, regex in ((config.mh_adapter, attn), (config.output_adapter, ffn))
                               if on)
        else:
            layer = False
        serial = (*linear_types(), nn.LayerNorm) if config.original_ln_before else linear_types()
        search = dict(exclude_modules=config.exclude_modules, layers_pattern=config.layers_pattern,
                      skip=list(config.modules_to_save or []) + host.modules_to_save_names(),
                      method=type(config).__name__)
        if layer:
            # the attention's projection lies inside the block, which is found on its own (the block's wrapper runs
            # the modules inside it, adapted or not); peft's block index needs a segment after it, which a block's
            # own name lacks: layers_to_transform is applied below
            names = find_targets(model, sites.layer, supported=(nn.Module,), **search)
            if config.mh_adapter:
                names += find_targets(model, sites.attn_output, supported=serial, **search)
                order = {n: i for i, (n, _) in enumerate(iter_logical_modules(model))}
                names.sort(key=order.__getitem__)
        else:
            names = find_targets(model, targets, supported=(nn.Module,) if config.is_parallel else serial,
                                 layers_to_transform=config.layers_to_transform, **search)
        if layer and config.layers_to_transform is not None:
            keep = config.layers_to_transform
            keep = [keep] if _int(keep) else keep
            names = [n for n in names if _block(n, config) in keep]
            check(bool(names), f"{type(config).__name__}: layers_to_transform={config.layers_to_transform!r} keeps no "
                               "block of this model; give indices of its blocks")
        if config.is_parallel:
            for n in names:
                module = model.get_submodule(n)
                check(not _container(unwrap(module)),
                      f"{n}: a parallel adapter sits beside one attention or feed-forward sub-layer, and "
                      f"{type(unwrap(module)).__name__} is not one (a container of blocks, or a whole model, whose "
                      "input and output are not one hidden-state tensor); target the sub-layers inside it, e.g. "
                      "each block's attention or MLP module")
                check(not isinstance(unwrap(module), (*linear_types(), nn.Embedding))
                      and (isinstance(module, SublayerLayer) or not isinstance(module, AdaptedLayer)),
                      f"{n}: a parallel adapter sits beside a whole attention or feed-forward sub-layer, not a "
                      f"single {type(unwrap(module)).__name__}; target the module that holds it")
                # (a BERT-style output sub-layer takes the residual input_tensor, which the adapter reads instead)
                residual = "input_tensor" in inspect.signature(unwrap(module).forward).parameters
                hidden = _hidden_size(model)
                width_in, width_out = input_width(unwrap(module), hidden), output_width(unwrap(module), hidden)
                check(residual or width_in in (None, width_out),
                      f"{n}: a parallel adapter adds A(x) of the sub-layer's input x to its output, but "
                      f"{type(unwrap(module)).__name__} maps {width_in} features to {width_out}; target a sub-layer "
                      "that keeps the hidden size (a block's whole attention or MLP module)")
        if config.adapterdrop_layers:  # it drops by block index: without one it would drop nothing, silently
            check(any(_block(n, config) is not None for n in names),
                  f"adapterdrop_layers={config.adapterdrop_layers} drops the adapters of the first blocks, but no block "
                  f"index was found in the targets ({names[:3]}...); set layers_pattern to the name that precedes the "
                  "block index (e.g. 'layers', 'h', 'block')")
        # (dropping happens in training only: an adapter loaded for inference never drops, whatever it says)
        if config.adapterdrop_mode == "random" and config.adapterdrop_layers and not config.inference_mode:
            last = max(b for b in (_block(n, config) for n in names) if b is not None)
            check(config.adapterdrop_layers <= last,
                  f"adapterdrop_layers={config.adapterdrop_layers} lets a step drop the adapters of every block (the "
                  f"model's adapted blocks are 0..{last}): each step drops the first n blocks, n drawn from "
                  f"0..adapterdrop_layers; use at most {last}")
        if config.adapterdrop_mode == "fixed" and config.adapterdrop_layers:
            before = names
            names = [n for n in names if _block(n, config) is None or _block(n, config) >= config.adapterdrop_layers]
            blocks = sorted({b for n in before if (b := _block(n, config)) is not None})
            check(bool(names), f"adapterdrop_layers={config.adapterdrop_layers} leaves out every block (the model's "
                               f"adapted blocks are {blocks[0] if blocks else 0}..{blocks[-1] if blocks else 0}); use "
                               "a smaller number (on the command line: --option adapterdrop_layers=N)")
        return names

    def inject(self, host: Any, config: BottleneckConfig, adapter_name: str) -> None:
        if config.phm_layer:
            n = config.phm_dim
            self._rule = nn.Parameter(torch.randn(n, n, n) / n ** 0.5)
        if config.adapterdrop_mode == "random" and config.adapterdrop_layers:
            self._drop = DropState(config.adapterdrop_layers)
        self._hidden = _hidden_size(host.model)
        try:
            super().inject(host, config, adapter_name)
        finally:
            self._rule, self._drop, self._hidden = None, None, None

    def make_adapter(self, base: nn.Module, config: BottleneckConfig, module_name: str) -> Adapter:
        """An ``adapter_cls`` of the target's output width ``d`` (for a sub-layer, that of its last linear
        layer; for a LayerNorm, its normalised size) and bottleneck ``m = config.bottleneck_for(d)``; the PHM
        rule and random-AdapterDrop state, when used, are shared by all targets of this injection. A serial
        adapter on a LayerNorm (``original_ln_before``) sits at that Add & Norm (``norm_site``).

        Raises:
            ConfigError: no linear layer gives the width, with ``phm_layer`` ``phm_dim`` does not divide
                both ``d`` and ``m``, or a LayerNorm target with ``original_ln_after`` and
                ``residual_before_ln=False``.
        """
        at_norm = isinstance(base, nn.LayerNorm) and not config.is_parallel
        at_layer = not config.is_parallel and not isinstance(base, (*linear_types(), nn.LayerNorm))
        # (checked here, not in the config: on an output projection that skip works as documented)
        check(not (at_norm and config.original_ln_after and not config.residual_before_ln),
              f"{module_name}: residual_before_ln=False is not supported after an Add & Norm with "
              "original_ln_after=True (the adapter's skip would carry LN(u + x), and the residual x be added once "
              "more); use residual_before_ln=True (AdapterHub's Pfeiffer placement), original_ln_after=False, or "
              "original_ln_before=False (the adapter on the output projection)")
        check(not (at_layer and config.original_ln_after and not config.residual_before_ln),
              f"{module_name}: residual_before_ln=False is not supported on a pre-LN block's output with "
              "original_ln_after=True (AdapterHub's skip would then carry x + u, and add the residual x once more); "
              "use residual_before_ln=True (AdapterHub's Pfeiffer placement), or pre_ln_site='projection' or "
              "original_ln_before=False (the adapter on the FFN's output projection)")
        width = base.normalized_shape[-1] if at_norm else output_width(base, self._hidden)
        m = config.bottleneck_for(width)
        if config.phm_layer:
            n = config.phm_dim
            check(width % n == 0 and m % n == 0,
                  f"{module_name}: phm_dim={n} must divide the hidden size {width} and the bottleneck {m}; "
                  "choose another phm_dim, reduction_factor or bottleneck_size")
        return self.adapter_cls(
            width, m, config.non_linearity, config.scaling, config.adapter_dropout, config.ln_before,
            config.residual_before_ln, config.init_weights, rule=self._rule, phm_rank=config.phm_rank,
            block=_block(module_name, config), drop=self._drop,
            norm_site="layer" if at_layer else ("add_norm" if config.original_ln_after else "after_norm") if at_norm
            else None)

    @staticmethod
    def _drop_state(host: Any, adapter_name: str) -> DropState | None:
        """The random-AdapterDrop state the adapter's layers share, or None."""
        for _, w in host.wrappers():
            adapter = w.adapters[adapter_name] if isinstance(w, AdaptedLayer) and adapter_name in w.adapters else None
            if isinstance(adapter, BottleneckAdapter) and adapter.drop is not None:
                return adapter.drop
        return None

    def on_step_end(self, host: Any, adapter_name: str, step: int) -> None:
        """Robust AdapterDrop: draw the number of dropped blocks for the next step (rank 0's draw on every rank of
        a process group)."""
        drop = self._drop_state(host, adapter_name)
        if drop is not None:
            drop.redraw()
            drop.share_rank0()

    def method_state(self, host: Any, adapter_name: str) -> dict[str, Tensor]:
        """Robust AdapterDrop: ``adapterdrop_n``, the number of blocks the next step drops (``(1,)`` int64)."""
        drop = self._drop_state(host, adapter_name)
        return {} if drop is None else {"adapterdrop_n": torch.tensor([drop.n])}

    def load_method_state(self, host: Any, adapter_name: str, tensors: dict[str, Tensor],
                          check_only: bool = False) -> None:
        """Restore the number of blocks the next step drops.

        Raises:
            ConfigError: other keys, or a number outside ``0..adapterdrop_layers`` (checked first).
        """
        drop = self._drop_state(host, adapter_name)
        value = tensors.get("adapterdrop_n")
        fits = set(tensors) <= {"adapterdrop_n"} and (value is None or (
            drop is not None and value.shape == (1,) and 0 <= int(value[0]) <= drop.max_layers))
        check(fits, f"the checkpoint's state of bottleneck adapter {adapter_name!r} ({sorted(tensors)}) does not fit "
                    "this model's (random AdapterDrop); resume with the run's own options")
        if not check_only and value is not None:
            drop.n = int(value[0])


def _placement(config: BottleneckConfig, sites: Sites) -> tuple[bool, bool]:
    """``(norm, layer)`` for a config placed by the table's ``sites``: whether its serial adapters sit at the Add &
    Norm LayerNorms (a post-LN model), and whether its FFN adapter wraps the whole block (a pre-LN model). A pre-LN
    model has no Add & Norm: the FFN's adapter goes on the block's output, ``x + u``, and the attention's stays on
    its output projection, as no module returns the attention's residual sum."""
    norm = config.original_ln_before and sites.ffn_norm is not None and sites.attn_norm is not None
    layer = (config.original_ln_before and not norm and not config.is_parallel and sites.layer is not None
             and config.pre_ln_site == "layer" and config.output_adapter)
    return norm, layer


def serial_sites(config: BottleneckConfig, model: nn.Module) -> dict[str, str]:
    """Where the serial adapters of ``config`` sit on ``model``, by sub-layer, in words: ``{"attention": ...,
    "FFN": ...}`` with ``"on the FFN's output projection"``, ``"after the FFN's Add & Norm"`` or ``"on the block's
    output"`` (and the attention's likewise), for the sub-layers ``mh_adapter`` / ``output_adapter`` enable.
    Empty for a parallel adapter, explicit ``target_modules`` or a model type :data:`ADAPTER_SITES` lacks (where
    the sites are the named modules themselves).

    Raises nothing: a model without a ``config.model_type`` gets ``{}``."""
    sites = ADAPTER_SITES.get(model_type(model))
    if config.is_parallel or config.target_modules is not None or sites is None:
        return {}
    norm, layer = _placement(config, sites)
    out = {}
    for on, part in ((config.mh_adapter, "attention"), (config.output_adapter, "FFN")):
        if on:
            out[part] = ("on the block's output" if layer and part == "FFN" else f"after the {part}'s Add & Norm"
                         if norm else f"on the {part}'s output projection")
    return out


def _container(module: nn.Module) -> bool:
    """Whether ``module`` cannot be a parallel adapter's sub-layer: a module list or dict (no forward of its
    own) or a whole transformers model or backbone (keyword inputs, a structured output)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return True
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def _hidden_size(model: nn.Module) -> int | None:
    """``model.config.hidden_size`` of an HF model (an int), else None."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return size if _int(size) else None


def _block(module_name: str, config: BottleneckConfig) -> int | None:
    """The block index of a site: peft's rule, read with a segment after the name, so that a whole block's own
    name (``model.layers.3``, a pre-LN FFN site) gives its index (names that do not end in a number give what
    they gave before)."""
    return layer_index(module_name + ".", config.layers_pattern)


def _cli(config_cls: type[BottleneckConfig]):
    def build(args: Any) -> BottleneckConfig:
        return config_cls(target_modules=args.target_modules, task_type=args.task_type)

    build.__doc__ = f"Build a :class:`{config_cls.__name__}` from ``peftkit train`` options."
    return build


_TUNER = BottleneckTuner()
_PAPERS = {
    "bottleneck": "Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019, arXiv:1902.00751)",
    "houlsby": "Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019, arXiv:1902.00751)",
    "pfeiffer": "AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al., 2020, "
                "arXiv:2005.00247)",
    "parallel-adapter": "Towards a Unified View of Parameter-Efficient Transfer Learning (He et al., 2021, "
                        "arXiv:2110.04366)",
    "compacter": "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Mahabadi et al., 2021, arXiv:2106.04647)",
    "compacter++": "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Mahabadi et al., 2021, "
                   "arXiv:2106.04647)",
    "adapterdrop": "AdapterDrop: On the Efficiency of Adapters in Transformers (Rücklé et al., 2020, arXiv:2010.11918)",
}
_CONFIGS = {"bottleneck": BottleneckConfig, "houlsby": HoulsbyConfig, "pfeiffer": PfeifferConfig,
            "parallel-adapter": ParallelConfig, "compacter": CompacterConfig,
            "compacter++": CompacterPlusPlusConfig, "adapterdrop": AdapterDropConfig}
_ALIASES = {"parallel-adapter": ("parallel",), "compacter++": ("compacter-pp",)}

for _name, _cls in _CONFIGS.items():
    register_method(MethodSpec(name=_name, config_cls=_cls, family="additive", kind="wrap", mergeable=False,
                               paper=_PAPERS[_name], tuner=_TUNER, cli_config=_cli(_cls),
                               aliases=_ALIASES.get(_name, ()),
                               # PHM layers have few parameters and want a larger step (measured on SST-2)
                               default_lr=5e-3 if _name.startswith("compacter") else None,
                               # Compacter's PHM rule is one tensor shared by every block's adapter, which FSDP's
                               # per-block groups cannot hold (refused before anything is written)
                               shards=not _name.startswith("compacter")))
