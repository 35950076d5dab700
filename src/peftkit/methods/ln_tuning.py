"""LN tuning: train a copy of each targeted normalisation layer (LayerNorm, RMSNorm, ...), nothing else.

Paper: Zhao, Gu, Li, Sun, Yan, Shen and Yan, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM
Finetuning", 2023, arXiv:2312.11420.

Equation: ``y = norm(x; gamma', beta')`` for every targeted norm, where ``(gamma', beta')`` is a trained copy of
the norm's own ``(gamma, beta)`` (which stay frozen); a norm without a bias (RMSNorm) has ``gamma'`` alone.
Trainable parameters: ``sum_m numel(params of norm m)``, e.g. ``2 * hidden`` per LayerNorm and ``hidden`` per
RMSNorm (plus ``modules_to_save``, e.g. the classifier head with ``task_type="SEQ_CLS"``).

As in HF peft, the adapter holds the trained *values* (not a difference): the file keys are
``base_model.model.<norm>.ln_tuning_layers.weight`` (and ``.bias``), so files move between peft and peftkit
both ways. The base norm is never written: the wrapped layer runs it with the copy's tensors
(:meth:`~peftkit.layers.Adapter.substitute_params`), so ``disable_adapter()`` gives the base exactly. Merging
writes the copy's values into the norm and keeps the base values aside; unmerging puts them back bit for bit
(peft swaps the two modules, which is the same thing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.methods.selective import SelectiveConfig, SelectTuner, select_parameters
from peftkit.targeting import iter_logical_modules, matches

LN_TUNING_PAPER = ("Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning (Zhao et al., 2023, "
                   "arXiv:2312.11420)")

#: default targets by ``config.model_type``: peft's table (``TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING``)
#: but LLaVA's (which also copies its projector, embeddings and LM head whole), plus the BERT-like encoders, which
#: peft's table lacks (their norms are all named ``LayerNorm``; DistilBERT's as below)
LN_TUNING_TARGET_DEFAULTS: dict[str, tuple[str, ...]] = {
    "llama": ("input_layernorm", "post_attention_layernorm", "norm"),
    "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "t5": ("layer_norm", "final_layer_norm"),
    "mt5": ("layer_norm", "final_layer_norm"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "blip-2": ("layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"),
    "gptj": ("ln_1", "ln_f"),
    "falcon": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
    "phi": ("input_layernorm", "final_layernorm"),
    "gemma": ("input_layernorm", "post_attention_layernorm", "norm"),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"),
    "gemma3_text": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"),
    "qwen2": ("post_attention_layernorm",),
    "qwen3": ("post_attention_layernorm",),
    # not in peft's table
    "bert": ("LayerNorm",),
    "roberta": ("LayerNorm",),
    "xlm-roberta": ("LayerNorm",),
    "electra": ("LayerNorm",),
    "distilbert": ("sa_layer_norm", "output_layer_norm"),
}


@dataclass
class LNTuningConfig(PeftConfig):
    """Configuration of LN tuning (selective family); mirrors ``peft.LNTuningConfig``.

    Trains a copy of every targeted normalisation layer's parameters (``weight``, and ``bias`` where it has one);
    the model's own norms stay frozen. Works on any module whose only parameters are a ``weight`` (and a
    ``bias``) of its own: ``nn.LayerNorm``, HF ``LlamaRMSNorm``/``T5LayerNorm``/``GemmaRMSNorm`` (whose
    ``1 + weight`` form is kept: the module's own forward runs with the copy's tensors), ``nn.GroupNorm``, and
    also a Linear or Embedding when targeted on purpose.

    Args:
        target_modules: names/suffixes, or a full-match regex, of the norms to tune. None (default): the model
            type's norms from :data:`LN_TUNING_TARGET_DEFAULTS` (peft's table, plus BERT, RoBERTa, XLM-R,
            ELECTRA and DistilBERT), written into the config when the adapter is added.
        exclude_modules: names/suffixes or regex never tuned.
        modules_to_save: whole modules trained and saved with the adapter (e.g. a classifier head; with
            ``task_type="SEQ_CLS"`` the head is added automatically, as in peft).

    Trainable parameters: ``sum over targeted norms of numel(weight) + numel(bias)`` (``2 * hidden`` per
    LayerNorm, ``hidden`` per RMSNorm), plus ``modules_to_save``.

    Raises:
        ConfigError: an invalid ``target_modules``/``exclude_modules``; when added to a model: no default targets
            for its model type and none given, no targeted module with parameters, or a targeted module that holds
            sub-modules with parameters (copy the leaf norms instead).

    Paper: Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning (Zhao et al., 2023,
        arXiv:2312.11420).
    """

    peft_type = "LN_TUNING"
    default_target_modules: ClassVar[dict[str, tuple[str, ...] | str] | None] = LN_TUNING_TARGET_DEFAULTS
    # peft's LNTuningConfig has no block selection: not fields (no key in the saved config), read by the selection
    layers_to_transform: ClassVar[None] = None
    layers_pattern: ClassVar[None] = None

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        SelectiveConfig.validate(self)  # the same checks of target_modules/exclude_modules


class LNTuningAdapter(Adapter):
    """The trained copy of one norm's parameters.

    Args:
        base: the norm (kept untouched); its own parameters (``weight``, ``bias``) are copied.

    Attributes:
        ln_tuning_layers: a module holding the copies under the norm's own names (``weight`` ``(hidden,)``,
            ``bias`` ``(hidden,)``), in float32 (float64 for a float64 norm); the file's keys are
            ``ln_tuning_layers.<name>`` as in peft.

    Forward: the norm runs with the copies (cast to its dtype) instead of its own tensors. Merge: the copies are
    written into the norm and its values kept aside; unmerge writes them back (exact).
    """

    substitutes_params = True

    def __init__(self, base: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.ln_tuning_layers = nn.Module()
        for n in self.names:
            w = base._parameters[n].detach()
            dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            self.ln_tuning_layers.register_parameter(n, nn.Parameter(w.to(dtype).clone()))
        self._kept: dict[str, Tensor] = {}  # the norm's own values while merged

    def copy_of(self, name: str) -> Tensor:
        """The trained copy of the norm's tensor ``name`` (``"weight"``/``"bias"``)."""
        return self.ln_tuning_layers._parameters[name]

    def numel(self, name: str) -> int:
        """How many entries the copy of tensor ``name`` has."""
        return self.copy_of(name).numel()

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        for n in self.names:
            params[n] = self.copy_of(n).to(layer.base_layer._parameters[n].dtype)
        return params

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y  # everything happened in substitute_params

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The copies in place of ``weight``/``bias`` (the values they replace are kept for :meth:`unmerge_from`)."""
        self._kept = {"weight": weight.clone()} | ({} if bias is None else {"bias": bias.clone()})
        # cast through the norm's dtype, as the unmerged forward runs, so merged == unmerged exactly
        dtype = layer.base_layer._parameters["weight"].dtype
        new_w = self.copy_of("weight").detach().to(dtype).to(weight.dtype) if "weight" in self.names else weight
        new_b = bias
        if "bias" in self.names and bias is not None:
            new_b = self.copy_of("bias").detach().to(layer.base_layer._parameters["bias"].dtype).to(bias.dtype)
        return new_w, new_b

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The values :meth:`merge_into` replaced (the copies' own stay as they are)."""
        kept = self._kept
        return kept.get("weight", weight).clone(), (kept["bias"].clone() if "bias" in kept else bias)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``copy - base`` of the weight, float32 (for code that asks for an additive change; merging does not)."""
        return self.copy_of("weight").detach().float() - layer.weight.detach().float()

    def extra_repr(self) -> str:
        return f"copies {', '.join(self.names)}"


class LNTuningTuner(SelectTuner):
    """Copies the ``weight``/``bias`` of every targeted module (a norm) into an :class:`LNTuningAdapter`."""

    method = "LN tuning"

    def select(self, host: Any, config: LNTuningConfig) -> list[tuple[str, tuple[str, ...]]]:
        """``(module name, its own parameter names)`` for every targeted module with parameters.

        Raises:
            ConfigError: nothing selected, or a targeted module holds sub-modules with parameters (a block, not a
                norm).
        """
        skip = set(host.modules_to_save_names())
        for name, module in iter_logical_modules(host.model):
            if (not name or name in skip or not matches(name, config.target_modules)
                    or matches(name, config.exclude_modules)):
                continue
            inner = [n for n, _ in module.named_parameters() if "." in n]
            check(not inner, f"LN tuning copies a module's own weight and bias; target_modules="
                             f"{config.target_modules!r} selects {name!r} ({type(module).__name__}), which holds "
                             f"sub-modules with parameters ({', '.join(inner[:2])}); target its norm layers instead")
        return select_parameters(host, config, ("weight", "bias"), self.method)

    def make_adapter(self, base: nn.Module, names: tuple[str, ...], config: Any) -> LNTuningAdapter:
        return LNTuningAdapter(base, names)

    def before_load(self, host: Any, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Nothing to reshape: the copies have the norms' shapes."""


def ln_tuning_from_cli(args: Any) -> LNTuningConfig:
    """Build an :class:`LNTuningConfig` from ``peftkit train`` options ``args``: ``--target-modules`` picks the
    norms (default: the model type's, see :data:`LN_TUNING_TARGET_DEFAULTS`); the task's head trains whole."""
    return LNTuningConfig(target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="ln-tuning", config_cls=LNTuningConfig, family="selective", kind="select", mergeable=True,
    paper=LN_TUNING_PAPER, tuner=LNTuningTuner(), cli_config=ln_tuning_from_cli, default_lr=5e-3,
    aliases=("ln_tuning",),
))
