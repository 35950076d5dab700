"""peft's ``peft.utils`` names, for code that imports them from there (``from peftkit.utils import ...``).

* :data:`PeftType`: an enum of every registered method's ``peft_type`` (``PeftType.LORA == "LORA"``; a
  config's ``peft_type`` is the plain string, which compares equal to the member).
* :class:`PromptTuningInit`, :class:`PromptEncoderReparameterizationType`: the values of
  ``PromptTuningConfig.prompt_tuning_init`` and ``PromptEncoderConfig.encoder_reparameterization_type``.
* :func:`get_peft_config`, :func:`load_peft_weights`, :func:`get_peft_model_state_dict`,
  :func:`set_peft_model_state_dict`, :class:`TaskType`.
"""

from __future__ import annotations

import enum
from typing import Any

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
           "get_peft_model_state_dict", "load_peft_weights", "set_peft_model_state_dict"]
