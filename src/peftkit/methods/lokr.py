"""LoKr: low-rank Kronecker product adaptation (peft's ``LoKrConfig``, ``peft_type`` ``LOKR``).

Paper: Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", 2023, arXiv:2309.14859 (the Kronecker form follows Edalati et al., KronA, arXiv:2212.10650).

Equation: ``h = W0 x + (alpha / r) * kron(w1, w2) x`` with ``w1: (a, c)``, ``w2: (b, d)``,
``out = a b`` and ``in = c d`` split by :func:`~peftkit.methods._reparam.factorization`; ``w1`` is
stored whole or, with ``decompose_both`` and ``r < max(a, c) / 2``, as ``w1_a @ w1_b``; ``w2`` is
stored whole when ``r >= max(b, d) / 2``, else as ``w2_a @ w2_b`` (or a Tucker core ``t2`` for an
effective convolution). Trainable parameters per layer: ``P(w1) + P(w2)`` with ``P(w1) = a c`` or
``r (a + c)`` and ``P(w2) = b d prod(k)``, ``r (b + d prod(k))``, or ``r^2 prod(k) + r (b + d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftkit.config import MethodSpec, check, register_method
from peftkit.layers import AdaptedLayer
from peftkit.methods import _reparam as rp
from peftkit.methods.lycoris import (
    LycorisAdapter,
    LycorisConfig,
    LycorisTuner,
    core_kernel,
    effective_conv,
    param,
    rebuild_cp,
)
from peftkit.targeting import LORA_TARGET_DEFAULTS

LOKR_PAPER = ("Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation "
              "(Yeh et al., 2023, arXiv:2309.14859)")
INIT_CHOICES = (True, False, "lycoris")


@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of LoKr (field names and defaults as ``peft.LoKrConfig``).

    Args (besides those of :class:`~peftkit.methods.lycoris.LycorisConfig`):
        decompose_both: also factor the left Kronecker matrix ``w1`` as ``w1_a @ w1_b`` when
            ``r < max(a, c) / 2``. Default False.
        decompose_factor: the split of ``out`` and ``in`` into two factors: -1 (default) picks factors
            near the square root; ``f > 0`` takes ``f`` when it divides the dimension.
        rank_dropout_scale: divide the rank-dropout mask by its mean. Default False.
        init_weights: True (``w1`` or ``w1_a`` zero: the adapter starts as identity), ``"lycoris"``
            (``w2`` or ``w2_b`` zero), False (all random: tests only).

    Equation: ``delta = (alpha / r) * kron(w1, w2)``, ``w1: (a, c)``, ``w2: (b, d)``, ``out = a b``,
    ``in = c d``. Trainable parameters per layer: ``P(w1) + P(w2)`` (see the module docstring).

    Raises:
        ConfigError: as :class:`LycorisConfig`, ``decompose_factor`` neither -1 nor > 0, or an
            ``init_weights`` outside ``(True, False, "lycoris")``.

    Paper: Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation (Yeh et al., 2023,
        arXiv:2309.14859).
    """

    peft_type = "LOKR"
    default_target_modules = LORA_TARGET_DEFAULTS
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        check(self.init_weights in INIT_CHOICES,
              f"init_weights={self.init_weights!r} is not valid; expected one of {INIT_CHOICES}")
        check(isinstance(self.decompose_factor, int) and not isinstance(self.decompose_factor, bool)
              and (self.decompose_factor == -1 or self.decompose_factor > 0),
              f"decompose_factor={self.decompose_factor!r} is not valid; use -1 (near the square root) or "
              "an integer > 0")


class LoKrAdapter(LycorisAdapter):
    """LoKr on one Linear, GPT-2 ``Conv1D``, ``nn.Conv1d`` or ``nn.Conv2d`` layer.

    Parameters (peft's names and shapes): ``lokr_w1: (a, c)`` or ``lokr_w1_a: (a, r)``,
    ``lokr_w1_b: (r, c)``; ``lokr_w2: (b, d, *kernel)`` or ``lokr_w2_a: (b, r)``,
    ``lokr_w2_b: (r, d * prod(kernel))``, or with the effective convolution ``lokr_t2: (r, r, *kernel)``,
    ``lokr_w2_a: (r, b)``, ``lokr_w2_b: (r, d)``. On linear layers the forward applies the Kronecker
    product to the input by reshaping (:func:`~peftkit.methods._reparam.kron_linear`), never building it.
    """

    def __init__(self, layout: rp.Layout, r: int, alpha: float, config: LoKrConfig) -> None:
        super().__init__(layout, r, alpha, config)
        self.rescale_rank_dropout = config.rank_dropout_scale
        a, b = rp.factorization(layout.out_features, config.decompose_factor)
        c, d = rp.factorization(layout.in_features, config.decompose_factor)
        kernel = layout.kernel
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
        else:
            self.lokr_w1 = param(a, c)
        if r >= max(b, d) / 2:
            self.lokr_w2 = param(b, d, *kernel)
        elif effective_conv(layout, config):
            self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b = param(r, r, *core_kernel(layout)), param(r, b), param(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * math.prod(kernel))
        self._init(config.init_weights)

    def _init(self, init: bool | str) -> None:
        for p in self.parameters():
            rp.kaiming_(p)
        if init is True:
            nn.init.zeros_(self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a)
        elif init == "lycoris":
            nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(w1, w2)`` rebuilt from the stored parameters cast to ``dtype`` (differentiable)."""
        w = self.weights(dtype)
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = rebuild_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        return w1, w2

    def delta(self, dtype: torch.dtype | None = None) -> Tensor:
        w1, w2 = self.factors(dtype)
        if w2.dim() == 4:  # peft's rule: only a 4-d w2 gets w1 as (a, c, 1, 1); kron pads the rest in front
            w1 = w1[:, :, None, None]
        return (rp.kron(w1, w2) * self.scaling).reshape(self.layout.canonical_shape())

    def side(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        if self.layout.kind == "linear":
            w1, w2 = self.factors()
            return rp.kron_linear(x, w1, w2) * self.scaling
        return super().side(layer, x)


LOKR_TUNER = LycorisTuner("LoKr", LoKrAdapter)


register_method(MethodSpec(
    name="lokr", config_cls=LoKrConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=LOKR_PAPER, tuner=LOKR_TUNER, cli_config=LOKR_TUNER.config_from_cli(LoKrConfig), default_lr=5e-3,
))
