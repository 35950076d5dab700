"""SSF: learned scale and shift of chosen layers' outputs, folded into those layers for inference.

Paper: Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning",
2022, arXiv:2210.08823.

Equation: ``y = gamma (.) (W x + b) + beta``; merged ``W' = diag(gamma) W``, ``b' = gamma (.) b + beta``
(a bias-free layer gets a bias while merged). Trainable parameters: ``2 * out`` per target
(``out`` = output features of a linear layer, the normalised size of a LayerNorm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import ConfigError, MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods.ia3 import check_nonzero, zero_scale_problem
from peftkit.targeting import linear_types
from peftkit.tuners import WrapTuner

SSF_PAPER = ("Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning "
             "(Lian et al., 2022, arXiv:2210.08823)")
INIT_CHOICES = (True, "normal")


@dataclass
class SSFConfig(PeftConfig):
    """Configuration of SSF.

    Args:
        target_modules: names/suffixes, a full-match regex, or ``"all-linear"`` (default: every linear
            layer except the output layer). ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.LayerNorm`` (with
            affine weights) can be targeted.
        exclude_modules: names/suffixes or regex never adapted.
        modules_to_save: modules trained in full and saved with the adapter.
        init_ssf_weights: True (default: ``gamma = 1``, ``beta = 0``, the identity) or ``"normal"``
            (the paper's ``gamma ~ N(1, 0.02^2)``, ``beta ~ N(0, 0.02^2)``).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).

    Raises:
        ConfigError: an unknown ``init_ssf_weights``, empty ``target_modules``, a bad block index, or
            (when injected) a LayerNorm without affine weights.

    Paper: Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning (Lian et al., 2022,
        arXiv:2210.08823).
    """

    peft_type = "SSF"
    target_modules: list[str] | str | None = "all-linear"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_ssf_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self) -> None:
        check(self.init_ssf_weights is True or self.init_ssf_weights == "normal",
              f"init_ssf_weights={self.init_ssf_weights!r} is not valid; expected one of {INIT_CHOICES}")
        check(self.target_modules is not None and self.target_modules != [],
              "target_modules is required: a list of module names/suffixes, a regex, or 'all-linear'")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            check(isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers),
                  f"layers_to_transform={self.layers_to_transform!r} must be a block index >= 0 or a list of them")


class SSFAdapter(Adapter):
    """Scale and shift of one layer's output features.

    Args:
        features: ``out``. layout: where ``out`` lies in the base weight: ``"rows"`` (``nn.Linear``,
            ``(out, in)``), ``"cols"`` (GPT-2 ``Conv1D``, ``(in, out)``) or ``"vector"`` (LayerNorm, ``(out,)``).
        init: see :class:`SSFConfig` ``init_ssf_weights``.

    Shapes: ``y: (..., out)``; ``ssf_scale, ssf_shift: (out,)``.
    """

    def __init__(self, features: int, layout: str, init: bool | str) -> None:
        super().__init__()
        self.layout = layout
        self.ssf_scale = nn.Parameter(torch.ones(features))
        self.ssf_shift = nn.Parameter(torch.zeros(features))
        if init == "normal":
            with torch.no_grad():
                self.ssf_scale.normal_(1.0, 0.02)
                self.ssf_shift.normal_(0.0, 0.02)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return torch.addcmul(self.ssf_shift.to(y.dtype), y, self.ssf_scale.to(y.dtype))

    def _scale_for_weight(self, undo: bool = False) -> Tensor:
        g = wide(self.ssf_scale.detach())
        if undo:  # dividing by a zero entry: the merge cannot be undone (merge_adapter refuses it up front)
            check_nonzero(g)
        return {"rows": g[:, None], "cols": g[None, :], "vector": g}[self.layout]

    def merge_problem(self) -> str | None:
        return zero_scale_problem("ssf_scale", self.ssf_scale)

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g, beta = wide(self.ssf_scale.detach()), wide(self.ssf_shift.detach())
        new_w = weight * self._scale_for_weight()
        return new_w, beta.clone() if bias is None else bias * g + beta

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g, beta = wide(self.ssf_scale.detach()), wide(self.ssf_shift.detach())
        return weight / self._scale_for_weight(undo=True), None if bias is None else (bias - beta) / g


class SSFTuner(WrapTuner):
    """Builds one scale-and-shift pair per target layer."""

    method = "SSF"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*linear_types(), nn.LayerNorm)

    def make_adapter(self, base: nn.Module, config: SSFConfig, module_name: str) -> Adapter:
        """An :class:`SSFAdapter` over the output features: the ``out_features`` rows of a Linear weight, the
        columns of a GPT-2 ``Conv1D`` weight ``(in, out)``, or a LayerNorm's ``normalized_shape``.

        Raises:
            ConfigError: a LayerNorm without ``elementwise_affine`` or over more than one dimension.
        """
        if isinstance(base, nn.LayerNorm):
            if base.weight is None or len(base.normalized_shape) != 1:
                raise ConfigError(f"{module_name}: SSF folds into a LayerNorm over one dimension with "
                                  "elementwise_affine=True only; exclude this module")
            return SSFAdapter(base.normalized_shape[0], "vector", config.init_ssf_weights)
        if isinstance(base, nn.Linear):
            return SSFAdapter(base.out_features, "rows", config.init_ssf_weights)
        return SSFAdapter(base.weight.shape[1], "cols", config.init_ssf_weights)


def ssf_from_cli(args: Any) -> SSFConfig:
    """Build an :class:`SSFConfig` from ``peftkit train`` options (default targets: all linear layers)."""
    return SSFConfig(target_modules=args.target_modules or "all-linear", task_type=args.task_type)


register_method(MethodSpec(
    name="ssf", config_cls=SSFConfig, family="additive", kind="wrap", mergeable=True, paper=SSF_PAPER,
    tuner=SSFTuner(), cli_config=ssf_from_cli, default_lr=5e-3,
))
