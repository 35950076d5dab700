"""QA-LoRA: group-wise pooled LoRA whose merge stays in the quantised domain.

Paper: Xu et al., "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models", 2023,
arXiv:2309.14717. The input is average-pooled over groups of ``L = qalora_group_size`` columns, so the
adapter's weight change is constant within each group; on a base quantised group-wise with
``W = (q - z) * s`` (int4/int8, group size dividing ``L``) it folds into the zero points ``z``:
the merged model is still the same integer codes, exactly. Equation (peft's form, ``G = in / L``):
``h = W x + (alpha / r) * B A (G * mean_L(dropout(x)))`` with ``A: (r, G)``, ``B: (out, r)``.
Trainable parameters per adapted ``(out, in)`` layer: ``r * (in / L + out)``.

Use it through LoRA: ``LoraConfig(use_qalora=True, qalora_group_size=L, ...)`` (peft's fields);
merge into the quantised base with :func:`peftkit.quant.merge_and_unload_quantized`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peftkit.config import check
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.methods.lora import LoraLinear, _dropout

QALORA_PAPER = ("QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models "
                "(Xu et al., 2023, arXiv:2309.14717)")


class QALoraLinear(Adapter):
    """QA-LoRA on an ``nn.Linear`` (a :class:`~peftkit.quant.QuantLinear` included).

    Args:
        in_features / out_features: the base layer's sizes; ``in_features % group_size == 0``.
        r: rank. scaling: ``lora_alpha / r`` (or rsLoRA's). dropout: dropout probability on ``x``.
        group_size: ``L``, input columns pooled into one feature.

    Shapes: ``x: (..., in) -> (..., out)``; ``lora_A.weight: (r, in / L)``, ``lora_B.weight: (out, r)``;
    ``delta_weight: (out, in)``, each group's ``L`` columns equal to ``scaling * G / L * (B @ A)[:, g]``.
    """

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 group_size: int) -> None:
        super().__init__()
        self.r, self.scaling, self.group_size = r, scaling, group_size
        self.groups = in_features // group_size
        self.lora_dropout = _dropout(dropout)
        self.lora_A = nn.Linear(self.groups, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)

    reset = LoraLinear.reset

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a = self.lora_A.weight
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        pooled = self.lora_dropout(x).unflatten(-1, (self.groups, self.group_size)).mean(-1) * self.groups
        return torch.add(y, self.lora_B(self.lora_A(pooled)).to(y.dtype), alpha=self.scaling)

    def group_delta(self, layer: AdaptedLayer) -> Tensor:
        """The weight change per input group of this adapter on ``layer``, ``(out, in / L)``, float32."""
        ba = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return ba * (self.scaling * self.groups / self.group_size)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.group_delta(layer).repeat_interleave(self.group_size, dim=1)


def make_qalora_adapter(base: nn.Module, config, module_name: str, r: int, scaling: float) -> QALoraLinear:
    """Build the QA-LoRA adapter of ``config`` (a ``LoraConfig`` with ``use_qalora``) for ``base``.

    Raises:
        ConfigError: ``base`` is not an ``nn.Linear``, or its ``in_features`` is not a multiple of
            ``qalora_group_size``.
    """
    check(isinstance(base, nn.Linear), f"{module_name}: use_qalora adapts nn.Linear layers only, not "
          f"{type(base).__name__}")
    group = config.qalora_group_size
    fits = max(d for d in range(1, group + 1) if base.in_features % d == 0)
    check(base.in_features % group == 0, f"{module_name}: in_features={base.in_features} is not a multiple of "
          f"qalora_group_size={group}; give one that divides every adapted layer's in_features (the largest up "
          f"to {group} that divides this one is {fits}; on the command line --option qalora_group_size=N)")
    return QALoraLinear(base.in_features, base.out_features, r, scaling, config.lora_dropout, group)
