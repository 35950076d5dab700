"""peft's ``peft.utils`` names, for code that imports them from there (``from peftkit.utils import ...``).

* :data:`PeftType`: an enum of every registered method's ``peft_type`` (``PeftType.LORA == "LORA"``; a
  config's ``peft_type`` is the plain string, which compares equal to the member).
* :class:`PromptTuningInit`, :class:`PromptEncoderReparameterizationType`: the values of
  ``PromptTuningConfig.prompt_tuning_init`` and ``PromptEncoderConfig.encoder_reparameterization_type``.
* :func:`prepare_model_for_kbit_training`.
* :func:`get_peft_config`, :func:`load_peft_weights`, :func:`get_peft_model_state_dict`,
  :func:`set_peft_model_state_dict`, :class:`TaskType`.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn

import peftkit.methods  # noqa: F401  (registers every method, so that PeftType lists them all)
from peftkit.config import PeftConfig, TaskType, all_methods
from peftkit.formats.hf_peft import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

#: Every registered method's ``peft_type`` (peft's enum and peftkit's own types), a ``str`` enum.
PeftType = enum.Enum("PeftType", {t: t for t in sorted({s.config_cls.peft_type for s in all_methods()})},
                     type=str, module=__name__)
PeftType.__doc__ = "The ``peft_type`` of every registered method (mirrors ``peft.PeftType``); members equal their value."


class PromptTuningInit(str, enum.Enum):
    """``PromptTuningConfig.prompt_tuning_init`` values (mirrors ``peft.PromptTuningInit``)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    """``PromptEncoderConfig.encoder_reparameterization_type`` values (mirrors peft's enum)."""

    MLP = "MLP"
    LSTM = "LSTM"


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config that ``config_dict`` (an ``adapter_config.json`` object, with ``peft_type``) describes, as
    peft's ``get_peft_config``.

    Raises:
        ConfigError: ``config_dict`` is not a mapping, has no or an unknown ``peft_type``, or invalid values.
    """
    return PeftConfig.from_dict(config_dict)


__all__ = ["PeftType", "PromptEncoderReparameterizationType", "PromptTuningInit", "TaskType", "get_peft_config",
           "get_peft_model_state_dict", "load_peft_weights", "prepare_model_for_kbit_training",
           "set_peft_model_state_dict"]


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Get a base model ready for QLoRA-style training, before :func:`peftkit.get_peft_model` (mirrors
    ``peft.prepare_model_for_kbit_training``, so that QLoRA scripts port by changing the import).

    In place, and returned:

    1. every parameter is frozen;
    2. float16/bfloat16 parameters (layer norms, biases, heads and embeddings left unquantised) are cast to
       float32 for stable training; the codes of layers quantised by :func:`peftkit.quantize_base` are buffers
       and stay as they are (those layers dequantise to their input's dtype);
    3. when the model holds quantised layers and ``use_gradient_checkpointing`` is True, gradient checkpointing
       is turned on (transformers' method, with ``gradient_checkpointing_kwargs``) and the input embeddings'
       output is made to require grad, so that adapters get gradients through a frozen base.

    Unlike peft there is no bitsandbytes ``load_in_4bit`` base here: quantise with :func:`peftkit.quantize_base`
    (before or after this call). Paper: "QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers et al., 2023,
    arXiv 2305.14314).

    Args:
        model: the base model (a transformers model for step 3).
        use_gradient_checkpointing: default True.
        gradient_checkpointing_kwargs: passed on (e.g. ``{"use_reentrant": False}``); default None.
        auto_clear_cache: accepted for peft's signature (it empties an accelerator's cache after the casts);
            the CUDA cache is emptied when CUDA is in use.

    Raises:
        ConfigError: ``model`` is already a :class:`peftkit.PeftModel` (freezing would freeze its adapters: call
            this on the base model, then :func:`peftkit.get_peft_model`); or step 3 applies and the model has no
            ``gradient_checkpointing_enable`` (the model is unchanged then).
    """
    from peftkit.config import check
    from peftkit.model import PeftModel, enable_checkpointing
    from peftkit.quant.layer import QuantWeight

    check(not isinstance(model, PeftModel), "prepare_model_for_kbit_training takes the base model, before "
          "get_peft_model; on a PeftModel it would freeze the adapters (call it on model.get_base_model() only if "
          "that is what you want)")
    quantised = any(isinstance(m, QuantWeight) for m in model.modules())
    checkpoint = quantised and use_gradient_checkpointing
    check(not checkpoint or callable(getattr(model, "gradient_checkpointing_enable", None)),
          f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers model); pass "
          "use_gradient_checkpointing=False")
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if checkpoint:
        enable_checkpointing(model, gradient_checkpointing_kwargs)
    return model
