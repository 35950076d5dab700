"""Prompt tuning: trainable virtual tokens prepended to the input embeddings.

Paper: Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning",
2021, arXiv:2104.08691.

Equation: ``h_0 = [E_prompt ; E x]`` with ``E_prompt: (P, d)`` trained and the whole model frozen.
Trainable parameters: ``P * d`` (``d`` = the model's hidden size; ``2 * P * d`` on an encoder-decoder model,
whose table has peft's two halves, the first prepended to the encoder's input), plus any ``modules_to_save``.
How calls are rewritten (masks, positions, labels, ``generate()``): :mod:`peftkit.methods.prompt_learning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.config import ConfigError, MethodSpec, check, register_method
from peftkit.methods.prompt_learning import (
    LOADING_VALUES,
    ModelShape,
    PromptLearningConfig,
    PromptTuner,
    VirtualTokens,
    settle,
    submodules,
)

PROMPT_TUNING_PAPER = ("The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021, "
                       "arXiv:2104.08691)")
INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of prompt tuning (field names as ``peft.PromptTuningConfig``).

    Args:
        num_virtual_tokens: ``P`` (required, > 0); other size fields: see :class:`PromptLearningConfig`.
        prompt_tuning_init: ``"RANDOM"`` (default; N(0, 1), as ``nn.Embedding``), ``"SAMPLE_VOCAB"``
            (rows of the word embedding at random token ids) or ``"TEXT"`` (the embeddings of
            ``prompt_tuning_init_text``, tokenised as peft does, special tokens included, repeated or cut to ``P``).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: a local tokenizer folder for ``"TEXT"``.
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments for ``"TEXT"``
            (``trust_remote_code`` is dropped).

    Raises:
        ConfigError: an unknown ``prompt_tuning_init``; ``"TEXT"`` without a text or tokenizer;
            ``tokenizer_kwargs`` without ``"TEXT"``; plus :class:`PromptLearningConfig`'s checks.

    Paper: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021, arXiv:2104.08691).
    """

    peft_type = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def validate(self) -> None:
        super().validate()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        check(self.prompt_tuning_init in INITS,
              f"prompt_tuning_init={self.prompt_tuning_init!r} is not valid; expected one of {INITS}")
        if self.prompt_tuning_init == "TEXT":
            check(bool(self.prompt_tuning_init_text),
                  "prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text whose embeddings start the prompt)")
            check(bool(self.tokenizer_name_or_path),
                  "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer folder)")
        check(not self.tokenizer_kwargs or self.prompt_tuning_init == "TEXT",
              f"tokenizer_kwargs={self.tokenizer_kwargs!r} is only used with prompt_tuning_init='TEXT'")


class PromptEmbedding(VirtualTokens):
    """Prompt tuning's table ``embedding.weight: (S * P, d)``; ``forward() -> (S * P, d)`` (``S`` =
    ``num_transformer_submodules``: 1, or 2 on an encoder-decoder model)."""


def _init_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor:
    total = config.total_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (total,))
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as err:  # no such folder, no tokenizer in it (nothing is downloaded offline)
        raise ConfigError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} gives no tokenizer "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); give a local folder holding "
                          "a tokenizer, e.g. the base model's") from None
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]  # special tokens included, as peft does
    check(len(ids) > 0, f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens")
    check(max(ids) < vocab_size,
          f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} gives token id {max(ids)} for "
          f"prompt_tuning_init_text, past the model's {vocab_size} input embeddings: it is not this model's "
          "tokenizer; give the base model's")
    return torch.tensor((ids * math.ceil(total / len(ids)))[:total])


class PromptTuningTuner(PromptTuner):
    """Builds a :class:`PromptEmbedding` and prepends it to every first call's input embeddings."""

    method = "prompt tuning"
    supports_encoder_decoder = True

    def complete_config(self, config: PromptTuningConfig, shape: ModelShape) -> None:
        settle(config, token_dim=shape.embed_dim, num_transformer_submodules=submodules(config, shape),
               num_attention_heads=shape.num_heads, num_layers=shape.num_layers)

    def build(self, config: PromptTuningConfig, model: nn.Module, shape: ModelShape) -> VirtualTokens:
        """A :class:`PromptEmbedding` ``(S * P, hidden)``: random (``RANDOM``, or ``inference_mode``, whose values
        are loaded), else the model's input embeddings of ``P`` random vocabulary ids (``SAMPLE_VOCAB``) or
        of ``prompt_tuning_init_text``'s tokens repeated to length ``P`` (``TEXT``, with the tokenizer at
        ``tokenizer_name_or_path``).

        Raises:
            ConfigError: the text gives no tokens.
        """
        module = PromptEmbedding(config.total_virtual_tokens, config.token_dim)
        # (a start the file's values replace is skipped: a trainable load needs no tokenizer)
        if config.prompt_tuning_init != "RANDOM" and not config.inference_mode and not LOADING_VALUES.get():
            words = model.get_input_embeddings()
            ids = _init_ids(config, words.num_embeddings).to(words.weight.device)
            with torch.no_grad():
                module.embedding.weight.copy_(words(ids).float())
        return module


def prompt_tuning_from_cli(args: Any) -> PromptTuningConfig:
    """``peftkit train --method prompt-tuning``: 20 virtual tokens drawn from the vocabulary (override
    with ``--option num_virtual_tokens=N`` etc.), trained at the method's default learning rate 1e-2
    (soft prompts need far more than LoRA's 1e-3: Lester et al. use 0.3 with Adafactor; the classifier
    head, trained alongside on ``SEQ_CLS`` tasks, limits how high it can go)."""
    return PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="SAMPLE_VOCAB", task_type=args.task_type)


register_method(MethodSpec(
    name="prompt-tuning", config_cls=PromptTuningConfig, family="additive", kind="prompt", mergeable=False,
    paper=PROMPT_TUNING_PAPER, tuner=PromptTuningTuner(), cli_config=prompt_tuning_from_cli,
    default_lr=1e-2,
))
