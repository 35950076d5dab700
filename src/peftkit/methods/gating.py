"""Learned gates of UniPELT's sub-modules: ``g = mean_t sigmoid(W_g h_t + b_g)`` over a sequence's tokens.

Paper: Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", 2021,
arXiv:2110.07577 (Sec. 3: each sub-module's output is multiplied by a gate computed from the
sub-module's input ``h``; the reference code averages the token gates over the sequence, giving one gate
per example and sub-module).

Padding must not move a row's gate, so the average runs over the real tokens only: a
:class:`SequenceMask` records the 2-D ``attention_mask`` of every call to the adapted model (with a
forward pre-hook) and the gates read it. A sub-module that sees ``S`` positions uses the last ``S``
columns of the mask (soft-prompt virtual tokens in front count as real; a cached generation step sees
its new tokens only, so there the gate averages over those).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.layers import trains_with_checkpointing

UNIPELT_PAPER = ("UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning (Mao et al., 2021, "
                 "arXiv:2110.07577)")


#: model -> the SequenceMasks recording its calls (a soft prompt that rewrites the call's mask updates them)
_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rewritten_mask(model: nn.Module, mask: Tensor) -> None:
    """Tell the gates of ``model`` the call's rewritten 2-D ``attention_mask`` (a soft prompt's, which may also
    have moved a row's padding, see :mod:`peftkit.methods.prompt_learning`): a gate's pre-hook that ran before
    the rewrite recorded the user's mask."""
    for seq in list(_MASKS.get(model, ())):
        seq.mask = mask


class SequenceMask:
    """The ``attention_mask`` ``(batch, length)`` of the call to ``model`` now running (None outside a call,
    or when the call has no 2-D mask)."""

    def __init__(self, model: nn.Module) -> None:
        params = list(inspect.signature(model.forward).parameters)
        self.position = params.index("attention_mask") if "attention_mask" in params else None
        self.mask: Tensor | None = None
        self.handles = (model.register_forward_pre_hook(self._record, with_kwargs=True),
                        model.register_forward_hook(self._clear))
        _MASKS.setdefault(model, weakref.WeakSet()).add(self)

    def _record(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # (registered here too: a deep copy or an unpickled model calls the copy of this object, not known yet)
        _MASKS.setdefault(model, weakref.WeakSet()).add(self)
        if trains_with_checkpointing(model):
            # the layers recomputed in backward run after this call ended, without its mask: their gates would
            # pool over the padding too, and the gradients would be wrong
            raise ValueError("gated adapters (UniPELT's gates) cannot train with gradient checkpointing: the layers "
                             "it recomputes in backward would pool their gates without the attention mask; disable "
                             "gradient checkpointing (model.gradient_checkpointing_disable())")
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        self.mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _clear(self, model: nn.Module, args: tuple, output: Any) -> None:
        self.mask = None

    def remove(self) -> None:
        """Unregister the pre-hook and hook from the model."""
        for h in self.handles:
            h.remove()
        for masks in _MASKS.values():
            masks.discard(self)

    def pool(self, g: Tensor) -> Tensor:
        """Average token gates ``(batch, S, k)`` over the real tokens -> ``(batch, k)``; ``(batch, k)`` (one
        vector per row, e.g. a pooler's input) is returned as is.

        Raises:
            ValueError: the recorded mask has another number of rows (a mixed-adapter batch's row group).
        """
        if g.dim() == 2:
            return g
        g = g.flatten(1, -2)
        mask = self.mask
        if mask is None:
            return g.mean(1)
        if mask.shape[0] != g.shape[0]:
            raise ValueError(f"a gate over {g.shape[0]} rows cannot use the attention mask of {mask.shape[0]} rows; "
                             "gated (UniPELT) adapters do not support mixed-adapter batches")
        s = g.shape[1]
        if mask.shape[1] >= s:
            mask = mask[:, -s:]
        else:  # virtual tokens inserted after the mask was recorded: always attended
            mask = torch.cat([mask.new_ones(mask.shape[0], s - mask.shape[1]), mask], dim=1)
        m = mask.to(g.dtype).unsqueeze(-1)
        return (g * m).sum(1) / m.sum(1).clamp_min(1)

    def gate(self, linear: nn.Module, h: Tensor) -> Tensor:
        """``pool(sigmoid(linear(h)))``: ``h: (batch, S, in)`` or ``(batch, in)`` -> ``(batch, k)`` in [0, 1]."""
        return self.pool(torch.sigmoid(linear(h.to(linear.weight.dtype))))


def gate_linear(width: int, outputs: int = 1) -> nn.Linear:
    """A gate's ``W_g: (outputs, width)`` ~ N(0, 0.02^2) and ``b_g = 0`` (BERT initialisation, as the
    reference code): every gate starts near 0.5."""
    linear = nn.Linear(width, outputs)
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


def broadcast(g: Tensor, like: Tensor) -> Tensor:
    """A per-row gate ``(batch, 1)`` shaped to multiply ``like: (batch, ...)``."""
    return g.reshape(g.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)
