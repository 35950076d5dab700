"""P-tuning: a prompt encoder (MLP or LSTM) produces the virtual tokens prepended to the input.

Paper: Liu, Zheng, Du, Ding, Qian, Yang and Tang, "GPT Understands, Too", 2021, arXiv:2103.10385.

Equation: ``h_0 = [f(E_prompt) ; E x]``, ``f`` an MLP (``Linear-ReLU-Linear-ReLU-Linear``) or a
bidirectional LSTM followed by ``Linear-ReLU-Linear``; ``E_prompt: (P, d)``. The encoder is a
training-time reparameterisation: :meth:`PromptEncoder.fold` replaces it by its output ``(P, d)``
(exactly), which is also what the file holds (peft's ``prompt_embeddings``), so a loaded adapter is
folded. Trainable parameters (``h`` = ``encoder_hidden_size``, ``n`` = ``encoder_num_layers``):
MLP ``P*d + (d*h + h) + (h*h + h) + (h*d + d)``; LSTM ``P*d + sum over n layers of
2 * (4h*(in + h) + 8h)`` (``in`` = ``d`` for the first layer, ``2h`` after) ``+ (2h*2h + 2h) +
(2h*d + d)``; folded ``P*d``. On an encoder-decoder model the table has ``S * P`` rows (``S`` =
``num_transformer_submodules``, 2 by default, as peft) and the first ``P`` outputs go before the encoder's input.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from peftkit.config import MethodSpec, check, register_method
from peftkit.methods.prompt_learning import (
    ModelShape,
    PromptLearningConfig,
    PromptTuner,
    VirtualTokens,
    settle,
    submodules,
)

P_TUNING_PAPER = "GPT Understands, Too (Liu et al., 2021, arXiv:2103.10385)"
ENCODERS = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of P-tuning (field names as ``peft.PromptEncoderConfig``).

    Args:
        num_virtual_tokens: ``P`` (required, > 0); other size fields: see :class:`PromptLearningConfig`.
        encoder_reparameterization_type: ``"MLP"`` (default) or ``"LSTM"``.
        encoder_hidden_size: ``h``, > 0; None uses ``token_dim`` (the model's input embedding width).
        encoder_num_layers: LSTM layers, > 0 (default 2). The MLP always has two hidden layers: another
            value warns and is ignored there (as in peft).
        encoder_dropout: dropout between LSTM layers, in [0, 1) (default 0).

    Raises:
        ConfigError: an unknown encoder type, a non-positive size, a dropout outside [0, 1); plus
            :class:`PromptLearningConfig`'s checks.

    Paper: GPT Understands, Too (Liu et al., 2021, arXiv:2103.10385).
    """

    peft_type = "P_TUNING"
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        self.encoder_reparameterization_type = kind
        check(kind in ENCODERS, f"encoder_reparameterization_type={kind!r} is not valid; expected one of {ENCODERS}")
        h = self.encoder_hidden_size
        check(h is None or (isinstance(h, int) and not isinstance(h, bool) and h > 0),
              f"encoder_hidden_size={h!r} is not valid; it must be an integer > 0 or None (token_dim)")
        n = self.encoder_num_layers
        check(isinstance(n, int) and not isinstance(n, bool) and n > 0,
              f"encoder_num_layers={n!r} is not valid; it must be an integer > 0")
        if kind != "LSTM" and n != 2:  # as peft: a warning (its files may carry any value; they hold the tokens)
            warnings.warn(f"encoder_num_layers={n!r} only applies to the LSTM encoder; the MLP encoder always has 2 "
                          "hidden layers, so it is ignored", stacklevel=3)
        check(isinstance(self.encoder_dropout, (int, float)) and 0 <= self.encoder_dropout < 1,
              f"encoder_dropout={self.encoder_dropout!r} is not valid; it must lie in [0, 1)")


class PromptEncoder(VirtualTokens):
    """P-tuning's encoder: ``embedding.weight: (S * P, d)`` through ``mlp_head`` (and ``lstm_head`` before it
    for the LSTM type); ``forward() -> (S * P, d)``. Built folded (table only) when ``folded=True``."""

    head_names = ("lstm_head", "mlp_head")

    def __init__(self, config: PromptEncoderConfig, folded: bool = False) -> None:
        d, h = config.token_dim, config.encoder_hidden_size
        super().__init__(config.total_virtual_tokens, d)
        if folded:
            return
        self.folded = False
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def project(self, table: Tensor) -> Tensor:
        if self.lstm_head is not None:
            table = self.lstm_head(table.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(table)


class PTuningTuner(PromptTuner):
    """Builds a :class:`PromptEncoder` (folded when loaded for inference) and prepends its output."""

    method = "P-tuning"
    supports_encoder_decoder = True

    def complete_config(self, config: PromptEncoderConfig, shape: ModelShape) -> None:
        """As the base (``token_dim`` is the model's input embedding width); ``encoder_hidden_size`` defaults to
        ``token_dim``."""
        settle(config, token_dim=shape.embed_dim, num_transformer_submodules=submodules(config, shape),
               num_attention_heads=shape.num_heads, num_layers=shape.num_layers)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim

    def build(self, config: PromptEncoderConfig, model: nn.Module, shape: ModelShape) -> VirtualTokens:
        return PromptEncoder(config, folded=config.inference_mode)


def p_tuning_from_cli(args: Any) -> PromptEncoderConfig:
    """``peftkit train --method p-tuning``: 20 virtual tokens from an MLP encoder of width 128; of the options
    ``args`` only ``--task-type`` is read."""
    return PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128, task_type=args.task_type)


register_method(MethodSpec(
    name="p-tuning", config_cls=PromptEncoderConfig, family="additive", kind="prompt", mergeable=False,
    paper=P_TUNING_PAPER, tuner=PTuningTuner(), cli_config=p_tuning_from_cli,
))
