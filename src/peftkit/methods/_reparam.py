"""Shared pieces of the weight-delta methods (AdaLoRA, LoHa, LoKr, KronA, SoRA).

Each of these methods builds an additive change ``delta`` of a target layer's weight from small
factors. Here live the parts they share: the layer's *layout* (what ``out`` and ``in`` mean for a
Linear, a GPT-2 ``Conv1D`` or a convolution), the step from a method's canonical delta to the base
weight's own layout, the convolution with a delta kernel, the Kronecker product applied to an input
without building it (``kron(w1, w2) x = vec(w1 X w2^T)``), and LyCORIS's rank and module dropout.

Canonical delta: ``(out, in)`` for Linear and ``Conv1D`` (whose stored weight is ``(in, out)``), the
weight's shape ``(out, in/groups, *kernel)`` for convolutions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import check
from peftkit.targeting import check_target_fields, linear_types

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Layout:
    """What a method needs to know about the layer it adapts.

    Attributes:
        kind: ``"linear"`` (``nn.Linear``, GPT-2 ``Conv1D``) or ``"conv"`` (``nn.Conv1d/2d/3d``).
        out_features: output features / channels.
        in_features: input features, or ``in_channels / groups`` for a convolution.
        kernel: the convolution's kernel size (``()`` for linear layers).
        transposed: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``).
        weight_shape: the base weight's shape.
    """

    kind: str
    out_features: int
    in_features: int
    kernel: tuple[int, ...]
    transposed: bool
    weight_shape: tuple[int, ...]

    @property
    def flat_in(self) -> int:
        """``in_features * prod(kernel)``: the width of the delta seen as a matrix."""
        return self.in_features * math.prod(self.kernel)

    def canonical_shape(self) -> tuple[int, ...]:
        """``(out, in)`` for linear layers, the weight's shape for convolutions."""
        return (self.out_features, self.in_features) if self.kind == "linear" else self.weight_shape


def layout_of(base: nn.Module) -> Layout:
    """The :class:`Layout` of a supported base layer (Linear, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d``)."""
    shape = tuple(base.weight.shape)
    if isinstance(base, CONV_TYPES):
        return Layout("conv", base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size), False,
                      shape)
    transposed = not isinstance(base, nn.Linear)
    out_f, in_f = (shape[1], shape[0]) if transposed else shape
    return Layout("linear", out_f, in_f, (), transposed, shape)


def to_base_layout(delta: Tensor, layout: Layout) -> Tensor:
    """A canonical delta (or any tensor with as many elements) in the base weight's layout."""
    if layout.transposed:
        return delta.reshape(layout.out_features, layout.in_features).T
    return delta.reshape(layout.weight_shape)


def apply_delta(base: nn.Module, layout: Layout, x: Tensor, delta: Tensor) -> Tensor:
    """``delta`` applied to ``x`` as the base layer applies its weight (no bias).

    Shapes: ``delta`` canonical (``(out, in)`` or the conv weight's shape); ``x`` as the base takes it.
    A convolution uses the base's stride, padding (and padding mode), dilation and groups.
    """
    if layout.kind == "linear":
        return F.linear(x, delta)
    return base._conv_forward(x, delta.reshape(layout.weight_shape), None)


def kron_linear(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``x @ kron(w1, w2).T`` without building the Kronecker product.

    With ``w1: (a, c)`` and ``w2: (b, d)``, ``kron(w1, w2)`` is ``(a*b, c*d)`` and row ``i*b + k`` times
    ``x`` viewed as ``X: (c, d)`` equals ``(w1 X w2^T)[i, k]``. Cost per row: ``a*c*d + a*d*b``
    multiply-adds instead of ``a*b*c*d``.

    Both products run as explicit 2-D GEMMs: ``torch.matmul`` of a matrix with a batch picks its kernel by
    whether the matrix requires grad, so the same weights gave other roundings in training than after
    loading (an evaluation re-run differed in the 7th digit).

    Shapes: ``x: (..., c*d) -> (..., a*b)``.
    """
    a, c = w1.shape
    b, d = w2.shape
    lead = x.shape[:-1]
    xt = x.reshape(-1, c, d).transpose(1, 2).reshape(-1, c)            # (n*d, c): X^T of each row
    mixed = (xt @ w1.T).reshape(-1, d, a).transpose(1, 2).reshape(-1, d)  # (n*a, d): w1 X of each row
    return (mixed @ w2.T).reshape(*lead, a * b)                         # (n, a, b)


def kron(a: Tensor, b: Tensor) -> Tensor:
    """``torch.kron(a, b)`` (the operand with fewer dims padded with leading unit dims) as one broadcast
    product; unlike ``torch.kron`` it accepts any strides (``torch.kron`` fails on some views).

    Shapes: ``a: (a_1, ..., a_n)``, ``b: (b_1, ..., b_n)`` -> ``(a_1 b_1, ..., a_n b_n)``.
    """
    n = max(a.dim(), b.dim())
    a = a.reshape((1,) * (n - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (n - b.dim()) + tuple(b.shape))
    spread_a = a.reshape([s for d in a.shape for s in (d, 1)])
    spread_b = b.reshape([s for d in b.shape for s in (1, d)])
    return (spread_a * spread_b).reshape([x * y for x, y in zip(a.shape, b.shape, strict=True)])


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into two factors ``(m, n)``, LyCORIS's (and peft's) rule.

    With ``factor > 0`` dividing ``dimension`` the answer is ``(factor, dimension // factor)``, in that
    order. Otherwise walk up the divisors ``m`` of ``dimension`` (not above ``factor`` when it is > 0)
    while ``m`` is below its cofactor; the result is sorted, smaller first (``128 -> (8, 16)``,
    ``127 -> (1, 127)``, ``256 -> (16, 16)``).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return min(m, n), max(m, n)


def check_unit_interval(name: str, value: object) -> None:
    """Check that ``value`` (the field ``name``) is a probability in ``[0, 1)``.

    Raises:
        ConfigError: ``value`` is not a number (bool excluded) in ``[0, 1)``; the message names ``name``.
    """
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
          f"{name}={value!r} is not valid; it must lie in [0, 1)")


def check_positive_int(name: str, value: object, allow_zero: bool = False) -> None:
    """Check that ``value`` (the field ``name``) is an integer > 0 (>= 0 with ``allow_zero``, default False).

    Raises:
        ConfigError: ``value`` is not such an integer (bool excluded); the message names ``name``.
    """
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    check(ok, f"{name}={value!r} is not valid; it must be an integer {'>= 0' if allow_zero else '> 0'}")


def check_common(config: object) -> None:
    """Checks shared by the configs here on ``config``: see :func:`peftkit.targeting.check_target_fields`.

    Raises:
        ConfigError: as :func:`~peftkit.targeting.check_target_fields`.
    """
    check_target_fields(config)


def supported_types() -> tuple[type[nn.Module], ...]:
    """Linear, GPT-2 ``Conv1D`` and ``nn.Conv1d/2d/3d``."""
    return (*linear_types(), *CONV_TYPES)


def module_dropped(adapter: nn.Module, p: float) -> bool:
    """LyCORIS's module dropout: while training, skip the whole adapter with probability ``p``."""
    return adapter.training and p > 0 and bool(torch.rand(1) < p)


def rank_drop(out_features: int, p: float, rescale: bool, device: torch.device) -> Tensor:
    """LyCORIS's rank dropout: a ``(out,)`` 0/1 vector keeping each output row with probability
    ``1 - p``, divided by its mean with ``rescale`` (all-dropped stays all zero)."""
    keep = (torch.rand(out_features, device=device) > p).float()
    if rescale:
        keep = keep / keep.mean().clamp_min(1e-12)
    return keep


def kaiming_(t: Tensor) -> None:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))``, the default init of ``nn.Linear`` weights."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
