"""Small tensor operations shared by several methods' hot paths.

:class:`Dropout` is ``nn.Dropout`` with a faster mask on the CPU. PyTorch's CPU dropout draws one
Bernoulli sample per element (about 7 ns each here); this one draws 64 random bits per four
elements and compares 16-bit fields with a threshold, which is five to six times faster and gives
i.i.d. masks with keep probability ``1 - p'``, where ``p' = round(p * 65536) / 65536`` (at most
7.6e-6 from ``p``). Outputs are scaled by ``1 / (1 - p')``, so the expectation is exactly the
input. On accelerators it is plain ``F.dropout``.

Paper: Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
JMLR 2014 (no arXiv id).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 65536


class _MaskedScale(torch.autograd.Function):
    """``y = where(keep, x, 0) * scale``; the backward and the forward-mode ``jvp`` apply the same mask and
    scale (the map is linear in ``x``)."""

    generate_vmap_rule = True  # forward and backward are plain torch ops: torch.func may batch them

    @staticmethod
    def forward(x: Tensor, keep: Tensor, scale: float) -> Tensor:
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])
        ctx.scale = inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None

    @staticmethod
    def jvp(ctx, x_t: Tensor, keep_t: Tensor | None, scale_t: None) -> Tensor:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, x_t, 0) * ctx.scale


def keep_mask(shape: torch.Size, p: float, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A boolean mask of ``shape`` whose entries are True with probability ``1 - round(p*65536)/65536``."""
    n = 1
    for s in shape:
        n *= s
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1, generator=generator)
    fields = bits.view(torch.int16)[:n].view(shape)
    drop_levels = round(p * _LEVELS)
    # int16 fields are uniform on [-32768, 32767]; keep the top (65536 - drop_levels) values
    return fields >= (-32768 + drop_levels)


# looked up once (asked per forward); a torch without the private check never reports a transform
_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None) or (lambda: False)


def func_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacfwd``, ...) is running (torch's
    private check; False when torch lacks it)."""
    return _TRANSFORMS_ACTIVE()


def transforms_or_forward_ad_active() -> bool:
    """:func:`func_transforms_active`, or a forward-mode AD level is open outside ``torch.func``
    (``with torch.autograd.forward_ad.dual_level():``, in which tensors may carry tangents).

    The routing check of nodes that decide in their forward what their backward needs and define no ``jvp``
    (the fused LoRA/DoRA node): under either, those layers run as plain differentiable ops. It costs what
    :func:`func_transforms_active` costs plus one module-attribute read (torch keeps the open level in
    ``forward_ad._current_level``, -1 when none is open)."""
    return _forward_ad._current_level >= 0 or _TRANSFORMS_ACTIVE()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Functional form of :class:`Dropout` (torch's own dropout on a GPU, under ``torch.func``, whose
    ``vmap(randomness="different")`` needs a random op it can batch, and while ``torch.compile`` traces).

    Args:
        x: any shape; the result has the same shape.
        p: drop probability in [0, 1]. On CPU it is rounded to the mask's resolution (1 / 65536); a
            rounded ``p`` of 1 returns zeros.
        training: False (or ``p == 0``) returns ``x`` itself. Default True.
    """
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or func_transforms_active() or torch.compiler.is_compiling():
        return F.dropout(x, p, True)  # (Dynamo breaks the graph on the mask's random_ and on a custom jvp)
    p_eff = round(p * _LEVELS) / _LEVELS
    if p_eff >= 1:
        return x * 0
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p_eff))


class Dropout(nn.Dropout):
    """Drop-in ``nn.Dropout`` (same ``p``, same ``train()``/``eval()`` behaviour) with the fast CPU mask."""

    def forward(self, x: Tensor) -> Tensor:
        """``x`` with entries zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)`` in training
        mode; ``x`` itself in eval mode or at ``p = 0``. Any shape; same shape out."""
        return dropout(x, self.p, self.training)
