"""How a frozen weight matrix is stored quantised: NF4 (with double quantisation) and int8/int4 affine.

Both formats use torchao's quantisers (``NF4Tensor.from_tensor``; ``choose_qparams_affine`` +
``quantize_affine`` / ``dequantize_affine``); peftkit only keeps their outputs as plain buffers so
that a quantised layer is an ordinary module (``state_dict``, ``.to(device)``, no tensor subclass).

* ``nf4`` -- QLoRA's 4-bit NormalFloat: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized
  LLMs", 2023, arXiv:2305.14314. ``W ~ nf4[code] * s_b`` for each block ``b`` of ``block_size``
  consecutive weights, ``s_b = absmax(block)``; the block scales are themselves quantised to int8 in
  groups of ``scaler_block_size`` (double quantisation). Storage per weight: 4 bits + 8 /
  block_size bits + 32 / (block_size * scaler_block_size) bits, i.e. 4.127 bits (0.129x float32)
  at the defaults 64 / 256.
* ``int8`` / ``int4`` -- affine weight-only quantisation, ``W ~ (q - z) * s`` with one ``(s, z)``
  per output row and input group of ``group_size`` columns (``None``: the whole row, i.e. per
  channel). ``int8`` is symmetric by default (``z = 0``), ``int4`` asymmetric; the zero points are kept
  in float32, so an adapter that is constant over a group can be folded into them (QA-LoRA).
  ``int4`` codes are packed two per byte.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from peftkit.config import check

METHODS = ("nf4", "int8", "int4")


def torchao_quantization() -> Any:
    """Import ``torchao.quantization`` quietly (its import logs warnings about optional GPU kernels).

    Raises:
        ImportError: torchao is not installed (``pip install 'peftkit[quant]'``).
    """
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError as err:  # pragma: no cover - torchao is installed with the quant/test extras
        raise ImportError("quantising a base model needs torchao: pip install 'peftkit[quant]' (from a clone of the "
                          "repository: pip install -e '.[quant]')") from err
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return tq


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


class QuantFormat:
    """A storage format for one 2-D weight ``(out_features, in_features)``.

    ``quantize(w)`` returns the buffers that hold it (names in ``buffer_names``); ``dequantize`` gives
    the float32 matrix back, ``dequantize_rows`` only some rows (embedding lookups).
    ``unsupported(shape, rows)`` says why a shape cannot be stored (``rows``: row by row), or None.
    """

    method: ClassVar[str] = ""
    buffer_names: ClassVar[tuple[str, ...]] = ()

    def unsupported(self, shape: tuple[int, int], rows: bool = False) -> str | None:  # pragma: no cover
        """Why a weight of ``shape`` ``(out_features, in_features)`` cannot be stored, or None when it can.
        With ``rows`` it must also be decodable row by row (an embedding table, :meth:`dequantize_rows`).
        Default ``rows=False``.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError

    def quantize(self, w: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """The buffers (keys: ``buffer_names``) storing ``w: (out_features, in_features)``, any float dtype
        (detached and computed in float32), on ``w``'s device. Only for shapes :meth:`unsupported` accepts.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError

    def dequantize(self, q: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:  # pragma: no cover
        """The float32 weight ``(out_features, in_features)`` = ``shape`` rebuilt from :meth:`quantize`'s
        buffers ``q``, on their device.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError

    def dequantize_rows(self, q: dict[str, Tensor], shape: tuple[int, int], rows: Tensor) -> Tensor:  # pragma: no cover
        """Only rows ``rows`` (``(n,)`` integer indices, repeats allowed) of the weight of ``shape``, as
        float32 ``(n, in_features)``; decodes just those rows (embedding lookups). Needs
        ``unsupported(shape, rows=True)`` to be None.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class NF4Format(QuantFormat):
    """QLoRA's NF4 with double-quantised block scales (torchao ``NF4Tensor``).

    Args:
        block_size: consecutive weights sharing one absmax scale (default 64, as QLoRA). The weight's
            element count must be a multiple of it.
        scaler_block_size: scales per second-level int8 group (default 256; lowered to the largest
            divisor of the number of blocks when that is not a multiple, e.g. on tiny layers).

    Raises:
        ConfigError: ``block_size`` is not an even integer > 0, or ``scaler_block_size`` not an integer > 0.

    Paper: QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv:2305.14314).
    """

    method: ClassVar[str] = "nf4"
    buffer_names: ClassVar[tuple[str, ...]] = ("nf4_data", "nf4_scalers", "nf4_factor", "nf4_mean", "nf4_levels")
    block_size: int = 64
    scaler_block_size: int = 256

    def __post_init__(self) -> None:
        check(_positive_int(self.block_size) and self.block_size % 2 == 0,
              f"block_size={self.block_size!r} is not valid for nf4; expected an even integer > 0 (default 64)")
        check(_positive_int(self.scaler_block_size),
              f"scaler_block_size={self.scaler_block_size!r} is not valid; expected an integer > 0 (default 256)")

    def unsupported(self, shape: tuple[int, int], rows: bool = False) -> str | None:
        """The weight count (with ``rows``: the row length ``in_features``) must be a multiple of
        ``block_size``."""
        size = shape[1] if rows else shape[0] * shape[1]
        what = "row length" if rows else "weight count"
        return None if size % self.block_size == 0 else f"{what} {size} is not a multiple of block_size={self.block_size}"

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        """torchao's ``NF4Tensor.from_tensor`` of ``w``, kept as plain buffers: ``nf4_data: (numel / 2,)``
        uint8 (two 4-bit codes per byte, row-major), ``nf4_scalers: (numel / block_size,)`` int8 block scales,
        ``nf4_factor`` float32 (one per group of scales), ``nf4_mean: (1,)`` and ``nf4_levels: (16,)`` (the
        NF4 code book). A scale group holds ``scaler_block_size`` scales, or the largest divisor of the block
        count below that when it does not divide the count.

        Raises:
            ImportError: torchao is not installed.
        """
        tq = torchao_quantization()
        w = w.detach().float().contiguous()
        n_blocks = w.numel() // self.block_size
        t = tq.NF4Tensor.from_tensor(w, self.block_size, _largest_divisor(n_blocks, self.scaler_block_size))
        return {"nf4_data": t.quantized_data, "nf4_scalers": t.quantized_scalers, "nf4_factor": t.quantization_factor,
                "nf4_mean": t.scaler_mean.reshape(1), "nf4_levels": t.nf4}

    def dequantize(self, q: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        # torchao's NF4Tensor.get_original_weight, bit for bit, with one table lookup per byte
        return self._decode(q, q["nf4_data"], self._scales(q)).view(shape)

    def dequantize_rows(self, q: dict[str, Tensor], shape: tuple[int, int], rows: Tensor) -> Tensor:
        data = q["nf4_data"].view(shape[0], -1).index_select(0, rows)
        scales = self._scales(q).view(shape[0], -1).index_select(0, rows)
        return self._decode(q, data, scales).view(rows.numel(), shape[1])

    @staticmethod
    def _scales(q: dict[str, Tensor]) -> Tensor:
        scalers, factor = q["nf4_scalers"], q["nf4_factor"]
        return (scalers.view(factor.numel(), -1) / factor[:, None]).flatten() + q["nf4_mean"]

    @staticmethod
    def _decode(q: dict[str, Tensor], data: Tensor, scales: Tensor) -> Tensor:
        levels = q["nf4_levels"]
        pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # byte -> (hi, lo)
        values = pairs.index_select(0, data.reshape(-1).int()).view(scales.numel(), -1)
        return values.mul_(scales.reshape(-1, 1))


@dataclass(frozen=True)
class AffineFormat(QuantFormat):
    """Weight-only affine integer quantisation (torchao ``choose_qparams_affine``/``quantize_affine``).

    Args:
        bits: 8 (codes in [-128, 127]) or 4 (codes in [0, 15], packed two per byte).
        group_size: input columns sharing one scale and zero point per output row; None = per channel.
        symmetric: symmetric mapping (zero point in the middle) instead of min/max (asymmetric).
            Default True.

    Defaults: ``bits=8``, ``group_size=None``.

    Raises:
        ConfigError: ``bits`` not 4 or 8, ``group_size`` neither None nor an integer >= 2, or a non-bool
            ``symmetric``.
    """

    buffer_names: ClassVar[tuple[str, ...]] = ("qdata", "qscale", "qzero")
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        check(self.bits in (4, 8), f"bits={self.bits!r} is not valid for affine quantisation; expected 4 or 8")
        check(self.group_size is None or (_positive_int(self.group_size) and self.group_size >= 2),
              f"group_size={self.group_size!r} is not valid; expected an integer >= 2 (columns sharing one scale; "
              "a group of one column would store a scale per weight) or None (per channel)")
        check(isinstance(self.symmetric, bool), f"symmetric={self.symmetric!r} is not valid; expected True or False")

    @property
    def method(self) -> str:  # type: ignore[override]
        return f"int{self.bits}"

    def _range(self) -> tuple[torch.dtype, int, int]:
        return (torch.int8, -128, 127) if self.bits == 8 else (torch.uint8, 0, 15)

    def group(self, in_features: int) -> int:
        """Input columns per ``(scale, zero point)`` pair for a weight with ``in_features`` columns
        (``group_size``, or the whole row when it is None)."""
        return self.group_size or in_features

    def unsupported(self, shape: tuple[int, int], rows: bool = False) -> str | None:
        """``in_features`` must be a multiple of ``group_size`` and, for int4, even; every row is stored on
        its own, so ``rows`` adds no condition."""
        inp = shape[1]
        if inp % self.group(inp):
            return f"in_features={inp} is not a multiple of group_size={self.group_size}"
        if self.bits == 4 and inp % 2:
            return f"in_features={inp} is odd (int4 packs two codes per byte)"
        return None

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        """``qdata``: the codes, ``(out, in)`` int8, or for int4 ``(out, in / 2)`` uint8 (column ``2j`` in the
        high nibble, ``2j + 1`` in the low one); ``qscale``, ``qzero``: ``(out, in / group)`` float32.

        Raises:
            ImportError: torchao is not installed.
        """
        tq = torchao_quantization()
        w = w.detach().float().contiguous()
        dtype, lo, hi = self._range()
        block = (1, self.group(w.shape[1]))
        mapping = tq.MappingType.SYMMETRIC if self.symmetric else tq.MappingType.ASYMMETRIC
        scale, zero = tq.choose_qparams_affine(w, mapping, block, dtype, lo, hi, zero_point_dtype=torch.float32)
        codes = tq.quantize_affine(w, block, scale, zero, dtype, lo, hi)
        if self.bits == 4:
            codes = (codes[:, 0::2] << 4) | codes[:, 1::2]
        groups = w.shape[1] // block[1]
        return {"qdata": codes, "qscale": scale.reshape(w.shape[0], groups).float(),
                "qzero": zero.reshape(w.shape[0], groups).float()}

    def dequantize(self, q: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return self._decode(q["qdata"], q["qscale"], q["qzero"], shape)

    def dequantize_rows(self, q: dict[str, Tensor], shape: tuple[int, int], rows: Tensor) -> Tensor:
        pick = [q[n].index_select(0, rows) for n in ("qdata", "qscale", "qzero")]
        return self._decode(*pick, (rows.numel(), shape[1]))

    def _decode(self, codes: Tensor, scale: Tensor, zero: Tensor, shape: tuple[int, int]) -> Tensor:
        tq = torchao_quantization()
        dtype, lo, hi = self._range()
        if self.bits == 4:
            codes = torch.stack([codes >> 4, codes & 15], dim=-1).view(shape)
        block = (1, shape[1] // scale.shape[1])
        return tq.dequantize_affine(codes, block, scale, zero, dtype, lo, hi, output_dtype=torch.float32)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def make_format(method: str, *, block_size: int = 64, scaler_block_size: int = 256,
                group_size: int | None = None, symmetric: bool | None = None) -> QuantFormat:
    """The storage format for ``method`` (``"nf4"``, ``"int8"`` or ``"int4"``).

    Args:
        block_size / scaler_block_size: NF4 blocking (defaults 64 / 256, as QLoRA).
        group_size: affine formats: columns per scale (default: per channel for int8, 64 for int4).
        symmetric: affine formats: default True for int8, False for int4.

    Raises:
        ConfigError: unknown method or invalid sizes, or ``group_size``/``symmetric`` given for nf4.
    """
    check(method in METHODS, f"quantisation method {method!r} is not valid; expected one of {METHODS}")
    if method == "nf4":
        given = [f"{k}={v!r}" for k, v in (("group_size", group_size), ("symmetric", symmetric)) if v is not None]
        check(not given, f"{' and '.join(given)} apply to int4/int8 only; nf4 is blocked by block_size and "
                         "scaler_block_size")
        return NF4Format(block_size, scaler_block_size)
    bits = int(method[3:])
    if bits == 4 and group_size is None:
        group_size = 64
    return AffineFormat(bits, group_size, bits == 8 if symmetric is None else symmetric)
