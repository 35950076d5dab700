"""QuantLinear / QuantEmbedding: frozen layers whose weight is stored quantised (NF4, int8 or int4).

A ``QuantLinear`` is an ``nn.Linear`` to everything that adapts layers (``isinstance(m, nn.Linear)``
holds), so ``target_modules="all-linear"`` and every wrap-style method that supports ``nn.Linear``
(LoRA, DoRA, VeRA, (IA)^3, ...) adapt it unchanged; likewise ``QuantEmbedding`` is an
``nn.Embedding``. Such a method needs only two things from its base layer, and both go through one
place here (:class:`QuantWeight`):

* ``layer(x)`` -- the base output, computed from the weight dequantised on the fly;
* ``layer.weight`` -- a float tensor shaped like the original weight: the dequantised weight (a fresh
  tensor on each read; writing into it changes nothing), or, while adapters are merged, the float
  copy that holds the merge.

Merging: :class:`~peftkit.layers.AdaptedLayer` calls ``begin_merge()`` before the first merge and
``end_merge()`` after the last unmerge. In between the layer computes from a float copy of its
dequantised weight (into which adapters fold exactly); ``end_merge`` drops it, so the quantised
codes are never touched and unmerging restores the base bit for bit.

Memory: the autograd function below dequantises again in backward instead of saving the float weight,
so a training step holds at most one layer's float weight at a time (QLoRA's point).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import check
from peftkit.quant.formats import AffineFormat, QuantFormat


class _DequantLinear(torch.autograd.Function):
    """``y = x W^T`` with ``W`` dequantised in forward and again in backward and in the forward-mode ``jvp``
    (``y' = x' W^T``: the frozen codes carry no tangent), never saved."""

    generate_vmap_rule = True  # forward and backward are plain torch ops: torch.func may batch them

    @staticmethod
    def forward(x: Tensor, layer: QuantLinear) -> Tensor:
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.layer = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.layer.dequantize(grad.dtype), None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, layer_t: None) -> Tensor:
        return F.linear(x_t, ctx.layer.dequantize(x_t.dtype))


class QuantWeight:
    """What every quantised layer shares: the storage, the one way to read the weight, merging.

    Subclasses set ``fmt``, ``compute_dtype``, ``weight_shape`` and register the format's buffers plus
    ``merged_weight`` (None unless merged).
    """

    fmt: QuantFormat
    compute_dtype: torch.dtype
    weight_shape: tuple[int, int]
    merged_weight: Tensor | None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # a cast of the module (model.to(torch.bfloat16), .half()) casts its float tensors: the dequantised weight
        # follows, as a float layer's weight would (it stayed float32, and merging met a bf16 input)
        # the format's own buffers only move, never change dtype: NF4's float32 block scales can exceed float16's
        # range (a .half() turned them into inf and doubled the weight error)
        order = list(self._buffers)
        own = {n: self._buffers.pop(n) for n in self.fmt.buffer_names if self._buffers.get(n) is not None}
        try:
            result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._put_back(order, own, None)  # a failed move (no such device, out of memory) keeps the storage
            raise
        if own:
            anchor = next(iter(own.values()))
            try:
                moved = fn(torch.empty(0, device=anchor.device))
            except BaseException:
                self._put_back(order, own, None)
                raise
            self._put_back(order, own, moved.device if isinstance(moved, Tensor) else None)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return result

    def _put_back(self, order: list[str], own: dict[str, Tensor], device: torch.device | None) -> None:
        """Register the format's buffers ``own`` again, moved to ``device`` (None: where they are), in ``order``."""
        if not own:
            return
        moved = {n: t if device is None else t.to(device) for n, t in own.items()}
        rest = dict(self._buffers)
        self._buffers.clear()
        for n in order:
            self._buffers[n] = moved[n] if n in moved else rest.pop(n)
        self._buffers.update(rest)

    def quantized_state(self) -> dict[str, Tensor]:
        """The format's buffers (what the layer stores instead of the float weight)."""
        return {n: getattr(self, n) for n in self.fmt.buffer_names}

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The stored weight as a float tensor shaped ``weight_shape`` (default: the original dtype)."""
        return self.fmt.dequantize(self.quantized_state(), self.weight_shape).to(dtype or self.compute_dtype)

    @property
    def weight(self) -> Tensor:
        """The float weight in use: the merged copy while merged, else the dequantised codes."""
        return self.merged_weight if self.merged_weight is not None else self.dequantize()

    @property
    def quantized_numel(self) -> int:
        """Weights held quantised (counted as parameters by ``get_nb_trainable_parameters``)."""
        return self.weight_shape[0] * self.weight_shape[1]

    def quantized_nbytes(self) -> int:
        """Bytes of the quantised weight storage (bias and merged copy excluded)."""
        return sum(t.numel() * t.element_size() for t in self.quantized_state().values())

    def begin_merge(self) -> None:
        """Hold a float copy of the dequantised weight; merges fold into it (called by AdaptedLayer)."""
        if self.merged_weight is None:
            self.merged_weight = self.dequantize()

    def end_merge(self) -> None:
        """Drop the float copy: the layer computes from its untouched quantised codes again."""
        self.merged_weight = None

    def _init_storage(self, shape: tuple[int, int], state: dict[str, Tensor], fmt: QuantFormat,
                      compute_dtype: torch.dtype) -> None:
        self.weight_shape, self.fmt, self.compute_dtype = tuple(shape), fmt, compute_dtype
        for name in fmt.buffer_names:
            self.register_buffer(name, state[name])
        # not persistent: a state_dict taken while merged loads into an unmerged model (and the codes are the truth)
        self.register_buffer("merged_weight", None, persistent=False)


class QuantLinear(QuantWeight, nn.Linear):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``, stored transposed) with a quantised weight.

    Build one with :meth:`quantize` or :meth:`from_module`.

    Args:
        shape: ``(out_features, in_features)``.
        state: the format's buffers (from ``fmt.quantize``).
        bias: the layer's bias ``(out_features,)`` (kept in full precision), or None.
        fmt: the storage format (:func:`peftkit.quant.formats.make_format`).
        compute_dtype: the dtype of the dequantised weight (the original weight's).

    Shapes: ``x: (..., in_features) -> (..., out_features)``, like ``nn.Linear``.
    Buffers: the format's (e.g. ``nf4_data``: uint8 ``(out*in/2,)``); ``merged_weight`` while merged.
    Attributes: ``conv1d``: the layer was a GPT-2 ``Conv1D`` (dequantising gives one back, so that a saved
    model loads in transformers).
    """

    conv1d = False

    def __init__(self, shape: tuple[int, int], state: dict[str, Tensor], bias: nn.Parameter | None,
                 fmt: QuantFormat, compute_dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = shape
        self._init_storage(shape, state, fmt, compute_dtype)
        self.register_parameter("bias", bias)

    @classmethod
    def quantize(cls, weight: Tensor, bias: nn.Parameter | None, fmt: QuantFormat) -> QuantLinear:
        """Quantise ``weight: (out_features, in_features)`` with ``fmt``."""
        return cls(tuple(weight.shape), fmt.quantize(weight), bias, fmt, weight.dtype)

    @classmethod
    def from_module(cls, module: nn.Module, fmt: QuantFormat) -> QuantLinear:
        """Quantise ``module``, an ``nn.Linear`` or GPT-2 ``Conv1D`` (weight ``(in, out)``, transposed here),
        with ``fmt``; its bias is kept (shared, not copied) and ``conv1d`` records the original layout."""
        weight = module.weight.detach()
        layer = cls.quantize(weight if isinstance(module, nn.Linear) else weight.T, module.bias, fmt)
        layer.conv1d = not isinstance(module, nn.Linear)
        return layer

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x W^T + b`` with ``W`` dequantised on the fly (or the merged float weight, when one is set):
        ``x: (..., in_features) -> (..., out_features)``."""
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.bias)
        y = _DequantLinear.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def folded_zero_points(self, delta: Tensor) -> Tensor:
        """The zero points with ``delta: (out_features, groups)`` folded in (see :meth:`fold_group_delta`), not
        stored. Not finite where a quantisation group's scale is ~0 (a group of constant weights).

        Raises:
            ValueError: the format or the group sizes do not allow it.
        """
        if not isinstance(self.fmt, AffineFormat):
            raise ValueError(f"a {self.fmt.method} weight has no zero points to fold a group delta into")
        q_group = self.fmt.group(self.in_features)
        a_group = self.in_features // delta.shape[1]
        if a_group % q_group:
            raise ValueError(f"adapter group of {a_group} columns is not a multiple of the quantisation "
                             f"group_size={q_group}")
        idx = torch.arange(self.qzero.shape[1], device=delta.device) * q_group // a_group
        return self.qzero - delta[:, idx].to(self.qzero) / self.qscale

    def fold_group_delta(self, delta: Tensor) -> None:
        """Add a weight change that is constant over input groups to the zero points, in place.

        ``delta: (out_features, groups)`` where column ``g`` applies to input columns
        ``[g * in/groups, (g + 1) * in/groups)``; the codes and scales stay as they are (QA-LoRA's merge
        in the quantised domain). Only for affine formats whose group divides ``in/groups``.

        Raises:
            ValueError: the format or the group sizes do not allow it, or a zero point would not be finite (a
                group of constant weights, whose scale is ~0); nothing changes then.
        """
        zero = self.folded_zero_points(delta)
        if not bool(torch.isfinite(zero).all()):
            raise ValueError("the group delta cannot be folded into the zero points: a quantisation group of constant "
                             "weights has a scale of ~0, so its zero point would not be finite; merge in float")
        self.qzero.copy_(zero)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant={self.fmt}"


class QuantEmbedding(QuantWeight, nn.Embedding):
    """A frozen ``nn.Embedding`` with a quantised table; a lookup dequantises only the rows it reads.

    Shapes: ``ids: (...)`` integers ``-> (..., embedding_dim)``;
    ``weight``: ``(num_embeddings, embedding_dim)``. ``max_norm`` (which rewrites rows) is not supported.

    Args:
        module: the ``nn.Embedding`` to quantise (its table is read, not changed); its ``padding_idx``,
            ``norm_type``, ``scale_grad_by_freq`` and ``sparse`` are kept, ``max_norm`` is dropped.
        fmt: the :class:`~peftkit.quant.formats.QuantFormat` to store the table in.
    """

    def __init__(self, module: nn.Embedding, fmt: QuantFormat) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = module.num_embeddings, module.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = module.padding_idx, None, module.norm_type
        self.scale_grad_by_freq, self.sparse = module.scale_grad_by_freq, module.sparse
        weight = module.weight.detach()
        self._init_storage(tuple(weight.shape), fmt.quantize(weight), fmt, weight.dtype)

    @property
    def num_embeddings(self) -> int:  # type: ignore[override]
        """Rows of the table; fixed once quantised (transformers' ``resize_token_embeddings`` sets it after
        writing a new ``weight.data``, which a quantised table cannot take: refused, nothing changed).

        Raises:
            ConfigError: (on assignment) a value other than the quantised table's row count.
        """
        return self._num_embeddings

    @num_embeddings.setter
    def num_embeddings(self, value: int) -> None:
        shape = getattr(self, "weight_shape", None)
        check(shape is None or value == shape[0],
              f"the quantised embedding table has {shape and shape[0]} rows and cannot be resized to {value} "
              "(resize_token_embeddings): resize the model before quantize_base, or dequantize_base first")
        self._num_embeddings = value

    def forward(self, ids: Tensor) -> Tensor:
        """The rows ``ids`` of the table, dequantised (only those rows), in ``compute_dtype``:
        ``ids: (...)`` integers ``-> (..., embedding_dim)``."""
        if self.merged_weight is not None:
            return F.embedding(ids, self.merged_weight, self.padding_idx)
        rows = self.fmt.dequantize_rows(self.quantized_state(), self.weight_shape, ids.reshape(-1))
        return rows.to(self.compute_dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant={self.fmt}"
