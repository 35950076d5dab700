"""LoHa: low-rank Hadamard product adaptation (peft's ``LoHaConfig``, ``peft_type`` ``LOHA``).

Paper: Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", 2021, arXiv:2108.06098 (used for fine-tuning by LyCORIS, arXiv:2309.14859).

Equation: ``h = W0 x + (alpha / r) * ((w1_a w1_b) ⊙ (w2_a w2_b)) x``. The Hadamard product of two
rank-``r`` matrices has rank up to ``r^2``. Trainable parameters per layer: ``2 r (out + in)`` for
Linear/``Conv1D``; ``2 r (out + in/groups * prod(kernel))`` for a convolution; with
``use_effective_conv2d`` ``2 (r^2 prod(kernel) + r out + r in/groups)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from peftkit.config import MethodSpec, check, register_method
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

LOHA_PAPER = ("FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning "
              "(Hyeon-Woo et al., 2021, arXiv:2108.06098)")


@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of LoHa (field names and defaults as ``peft.LoHaConfig``).

    Fields: see :class:`~peftkit.methods.lycoris.LycorisConfig` (``r``, ``alpha``, ``rank_dropout``,
    ``module_dropout``, ``use_effective_conv2d``, ``target_modules``, ``init_weights``, patterns, ...).
    With ``init_weights=True`` ``hada_w2_b`` starts at zero (the adapter is the identity) and the other
    factors Kaiming-uniform.

    Equation: ``delta = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)`` (element-wise product).
    Trainable parameters per layer: ``2 r (out + in)``; convolution ``2 r (out + in/groups * prod(k))``,
    effective convolution ``2 (r^2 prod(k) + r out + r in/groups)``.

    Raises:
        ConfigError: as :class:`LycorisConfig`, or ``init_weights`` not a bool.

    Paper: FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning (Hyeon-Woo et al., 2021,
        arXiv:2108.06098).
    """

    peft_type = "LOHA"
    default_target_modules = LORA_TARGET_DEFAULTS

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.init_weights, bool),
              f"init_weights={self.init_weights!r} is not valid; LoHa takes True or False")


class _Hadamard(torch.autograd.Function):
    """``(w1a @ w1b) * (w2a @ w2b) * scale``; backward recomputes the two products instead of keeping
    them, so training holds no ``(out, in)`` tensor beyond the delta itself. The forward-mode ``jvp`` is the
    product rule, ``scale * ((w1a' w1b + w1a w1b') * (w2a w2b) + (w1a w1b) * (w2a' w2b + w2a w2b'))``
    (``'``: a tangent; a factor without one adds nothing)."""

    generate_vmap_rule = True  # forward and backward are plain torch ops: torch.func may batch them

    @staticmethod
    def forward(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(*inputs[:4])
        ctx.save_for_forward(*inputs[:4])
        ctx.scale = inputs[4]

    @staticmethod
    def jvp(ctx, w1a_t: Tensor | None, w1b_t: Tensor | None, w2a_t: Tensor | None, w2b_t: Tensor | None,
            scale_t: None) -> Tensor:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        d1, d2 = _product_tangent(w1a, w1b, w1a_t, w1b_t), _product_tangent(w2a, w2b, w2a_t, w2b_t)
        out_t = torch.zeros(w1a.shape[0], w1b.shape[1], dtype=w1a.dtype, device=w1a.device)
        if d1 is not None:
            out_t = out_t + d1 * (w2a @ w2b)
        if d2 is not None:
            out_t = out_t + (w1a @ w1b) * d2
        return out_t * ctx.scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)   # d delta / d (w1a @ w1b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


def _product_tangent(a: Tensor, b: Tensor, a_t: Tensor | None, b_t: Tensor | None) -> Tensor | None:
    """The tangent of ``a @ b`` (``(m, k) @ (k, n)``), ``a' b + a b'``, shape ``(m, n)``; None when neither has one."""
    if a_t is None:
        return None if b_t is None else a @ b_t
    return a_t @ b if b_t is None else a_t @ b + a @ b_t


class LoHaAdapter(LycorisAdapter):
    """LoHa on one Linear, GPT-2 ``Conv1D``, ``nn.Conv1d`` or ``nn.Conv2d`` layer.

    Parameters (peft's names and shapes): ``hada_w1_a, hada_w2_a: (out, r)``,
    ``hada_w1_b, hada_w2_b: (r, in)`` (``in`` = ``in/groups * prod(kernel)`` for a convolution); with
    the effective convolution ``hada_t1, hada_t2: (r, r, *kernel)`` (a 1-d kernel as ``(k, 1)``),
    ``hada_w*_a: (r, out)``, ``hada_w*_b: (r, in/groups)``.
    """

    def __init__(self, layout: rp.Layout, r: int, alpha: float, config: LoHaConfig) -> None:
        super().__init__(layout, r, alpha, config)
        out_f = layout.out_features
        self.cp = effective_conv(layout, config)
        if self.cp:
            self.hada_t1, self.hada_t2 = param(r, r, *core_kernel(layout)), param(r, r, *core_kernel(layout))
            self.hada_w1_a, self.hada_w2_a = param(r, out_f), param(r, out_f)
            self.hada_w1_b, self.hada_w2_b = param(r, layout.in_features), param(r, layout.in_features)
        else:
            self.hada_w1_a, self.hada_w2_a = param(out_f, r), param(out_f, r)
            self.hada_w1_b, self.hada_w2_b = param(r, layout.flat_in), param(r, layout.flat_in)
        for p in self.parameters():
            rp.kaiming_(p)
        if config.init_weights:
            torch.nn.init.zeros_(self.hada_w2_b)

    def delta(self, dtype: torch.dtype | None = None) -> Tensor:
        w = self.weights(dtype)
        if self.cp:
            full = (rebuild_cp(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
                    * rebuild_cp(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"]) * self.scaling)
        elif torch.compiler.is_compiling():  # plain ops: Dynamo breaks the graph on an autograd function with a jvp
            full = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * self.scaling
        else:
            full = _Hadamard.apply(w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"], self.scaling)
        return full.reshape(self.layout.canonical_shape())


LOHA_TUNER = LycorisTuner("LoHa", LoHaAdapter)


register_method(MethodSpec(
    name="loha", config_cls=LoHaConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=LOHA_PAPER, tuner=LOHA_TUNER, cli_config=LOHA_TUNER.config_from_cli(LoHaConfig),
))
