"""UniPELT and the MAM adapter: hybrid methods built as compositions (:class:`~peftkit.ComposedConfig`).

Papers:
  Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", 2021,
    arXiv:2110.07577: gated LoRA on the query/value projections + gated prefix tuning + a gated serial
    adapter after the FFN. ``h <- h + g_L s B A x``, prefixes ``g_P P_k, g_P P_v``, and on the FFN output ``u``
    (residual input ``x``) after its Add & Norm ``h = LN(u + x)``, ``LN(u + g_A A(h) + x)`` (AdapterHub's
    placement on post-LN encoders; on a pre-LN block's output ``z``, ``z + g_A A(z)``), each gate ``g = mean_t sigmoid(W_g h_t + b_g)`` of the sub-module's input (:mod:`peftkit.methods.gated`).
  He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", 2021, arXiv:2110.04366:
    the "Mix-And-Match" adapter, prefix tuning at the attention + a scaled parallel adapter beside the FFN,
    ``y <- FFN(x) + s W_up f(W_down x)``.

Trainable parameters: the sum of the parts' (see each config) plus ``modules_to_save``. Both are saved
as ``COMPOSED`` adapters whose parts are listed in ``adapter_config.json``; nothing here merges (prefixes
and adapters do not fold into weights).

Defaults are sized for all-MiniLM-L6-v2 (hidden size d = 384, 6 layers): UniPELT with LoRA rank 8, 10
prefixes through a width-128 MLP, adapter bottleneck d/16 = 24 (the paper's r = 8, l = 10, m = d/16);
MAM with 16 prefixes through a width-128 MLP and a parallel FFN adapter of bottleneck d/4 = 96, s = 4.
"""

from __future__ import annotations

from typing import Any

from peftkit.config import MethodSpec, register_method
from peftkit.methods.adapters import ParallelConfig
from peftkit.methods.compose import UNIFIED_VIEW_PAPER, ComposedConfig, ComposedTuner
from peftkit.methods.gated import GatedBottleneckConfig, GatedLoraConfig, GatedPrefixTuningConfig
from peftkit.methods.gating import UNIPELT_PAPER
from peftkit.methods.prefix_tuning import PrefixTuningConfig

# the query and value projections under their names in BERT-family, Llama-family and GPT-2 models


def unipelt_config(r: int = 8, lora_alpha: float | None = None, lora_target_modules: list[str] | str | None = None,
                   num_virtual_tokens: int = 10, encoder_hidden_size: int | None = 128, reduction_factor: float = 16,
                   task_type: str | None = None, modules_to_save: list[str] | None = None) -> ComposedConfig:
    """UniPELT (Mao et al., 2021, arXiv:2110.07577) as a :class:`ComposedConfig` of gated LoRA, gated prefix
    tuning and a gated adapter after the FFN.

    Args:
        r: LoRA rank (default 8). lora_alpha: None gives ``s = 1`` (``lora_alpha = r``), as the reference
            code, where the gate replaces LoRA's scaling.
        lora_target_modules: LoRA's targets; None: the model type's query and value projections
            (:data:`~peftkit.targeting.LORA_TARGET_DEFAULTS`).
        num_virtual_tokens: prefix length ``l`` (default 10). encoder_hidden_size: width of the prefix MLP
            used while training (None: train the prefixes directly).
        reduction_factor: adapter bottleneck ``m = d // reduction_factor`` (default 16).
        task_type, modules_to_save: of the composition.

    Trainable parameters (``L`` LoRA layers ``(out, in)``, ``N`` blocks, hidden ``d``, ``m``):
    ``sum_L [r (in + out) + in + 1]`` + prefix tuning's + ``N (d + 1)`` + ``N (2 d m + m + 2 d + 1)``.

    Raises:
        ConfigError: an invalid value of any part.

    Paper: UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning (Mao et al., 2021, arXiv:2110.07577).
    """
    return ComposedConfig(task_type=task_type, modules_to_save=modules_to_save, configs=[
        GatedLoraConfig(r=r, lora_alpha=r if lora_alpha is None else lora_alpha,
                        target_modules=lora_target_modules),
        GatedPrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=encoder_hidden_size is not None,
                                encoder_hidden_size=encoder_hidden_size),
        GatedBottleneckConfig(reduction_factor=reduction_factor),
    ])


def mam_config(num_virtual_tokens: int = 16, encoder_hidden_size: int | None = 128, reduction_factor: float = 4,
               scaling: float = 4.0, task_type: str | None = None,
               modules_to_save: list[str] | None = None) -> ComposedConfig:
    """The MAM adapter (He et al., 2021, arXiv:2110.04366) as a :class:`ComposedConfig` of prefix tuning and a
    scaled parallel adapter beside each FFN.

    Args:
        num_virtual_tokens: prefix length ``l`` (default 16). encoder_hidden_size: width of the prefix MLP
            used while training (None: train the prefixes directly).
        reduction_factor: parallel adapter bottleneck ``m = d // reduction_factor`` (default 4).
        scaling: the parallel adapter's ``s`` (default 4, as the paper).
        task_type, modules_to_save: of the composition.

    Trainable parameters: prefix tuning's + ``N (2 d m + m + d)`` (``N`` blocks, hidden ``d``).

    Raises:
        ConfigError: an invalid value of any part.

    Paper: Towards a Unified View of Parameter-Efficient Transfer Learning (He et al., 2021, arXiv:2110.04366).
    """
    return ComposedConfig(task_type=task_type, modules_to_save=modules_to_save, configs=[
        PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=encoder_hidden_size is not None,
                           encoder_hidden_size=encoder_hidden_size),
        ParallelConfig(reduction_factor=reduction_factor, scaling=scaling),
    ])


def unipelt_from_cli(args: Any) -> ComposedConfig:
    """``peftkit train --method unipelt`` from the options ``args`` (``--r`` sets the LoRA rank, default 8;
    ``--target-modules`` LoRA's targets)."""
    return unipelt_config(r=args.r or 8, lora_target_modules=args.target_modules, task_type=args.task_type)


def mam_from_cli(args: Any) -> ComposedConfig:
    """``peftkit train --method mam`` at the defaults of :func:`mam_config`."""
    return mam_config(task_type=args.task_type)


_TUNER = ComposedTuner()
register_method(MethodSpec(
    name="unipelt", config_cls=ComposedConfig, family="hybrid", kind="compose", mergeable=False,
    paper=UNIPELT_PAPER, tuner=_TUNER, cli_config=unipelt_from_cli, variant_of="composed", default_lr=2e-3,
))
register_method(MethodSpec(
    name="mam", config_cls=ComposedConfig, family="hybrid", kind="compose", mergeable=False,
    paper=UNIFIED_VIEW_PAPER, tuner=_TUNER, cli_config=mam_from_cli, variant_of="composed", default_lr=2e-3,
    aliases=("mam-adapter",),
))
