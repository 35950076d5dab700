"""LoftQ: initialise LoRA so that quantised base + adapter approximates the full-precision weight.

Paper: Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", 2023,
arXiv:2310.08659. Alternate ``T`` times: ``Q_t = q(W - s B_{t-1} A_{t-1})``, then ``s B_t A_t`` = the
best rank-``r`` approximation (SVD) of ``W - Q_t``; the base becomes ``Q_T`` and LoRA starts from
``(A_T, B_T)``, so ``||W - (Q + s B A)||`` is smaller than plain LoRA's ``||W - q(W)||`` (B = 0).
Trainable parameters: those of LoRA, ``r * (in + out)`` per layer.

Use it through LoRA: ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4,
loftq_iter=1))`` on a full-precision model (LoftQ quantises the base itself). Quantisers:

* real (torchao, the same storage as :func:`~peftkit.quant.quantize_base`): ``"nf4"`` (4 bits),
  ``"int8"``, ``"int4"`` -- the base layer becomes a :class:`~peftkit.quant.QuantLinear`;
* simple (plain torch, no torchao needed): ``"normal"`` (NormalFloat levels for any 2-8 bits, block
  absmax, as QLoRA's NF construction) and ``"uniform"`` (symmetric uniform levels, block absmax) --
  the base keeps its float weight, overwritten with the dequantised ``Q`` (as peft does).

``"auto"`` (default) picks ``nf4`` for 4 bits, ``int8`` for 8 bits, else ``normal``. Unlike peft,
the scaling ``s = lora_alpha / r`` is divided out (``B = U sqrt(S) / sqrt(s)``, ``A = sqrt(S) V^T /
sqrt(s)``), so ``s B A`` is the SVD term for any alpha. LoftQ is deterministic: loading a LoftQ
adapter onto the original model re-derives the same base before the saved ``A``, ``B`` are copied in.
With ``loftq_iter >= 2`` the later quantisations read an SVD, whose last bits depend on the thread
count (and the device): a reload on another machine setting can flip a few codes (logits about 1e-3
apart on a 256-wide toy model); ``loftq_iter=1`` (the default) re-derives the base exactly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import ConfigError, check
from peftkit.layers import AdaptedLayer
from peftkit.quant.formats import METHODS, make_format
from peftkit.quant.layer import QuantLinear

LOFTQ_PAPER = "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models (Li et al., 2023, arXiv:2310.08659)"
QUANTIZERS = ("auto", *METHODS, "normal", "uniform")
NF_OFFSET = 0.9677083  # QLoRA's quantile offset for NormalFloat levels


@dataclass
class LoftQConfig:
    """LoftQ options (peft's ``LoftQConfig`` plus the quantiser choice); stored as a dict in ``LoraConfig``.

    Args:
        loftq_bits: bits of the base quantiser: 2-8 for the simple quantisers, 4 for ``nf4``/``int4``,
            8 for ``int8``. Default 4.
        loftq_iter: alternating steps ``T`` >= 1. Default 1.
        quantizer: one of :data:`QUANTIZERS` (see the module doc). Default ``"auto"``.
        block_size: weights per absmax block of ``nf4`` and the simple quantisers (even, default 64);
            the group size of ``int4``.

    Raises:
        ConfigError: a value outside those ranges, or bits that the quantiser does not have.

    Paper: LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models (Li et al., 2023, arXiv:2310.08659).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1
    quantizer: str = "auto"
    block_size: int = 64

    def __post_init__(self) -> None:
        check(isinstance(self.loftq_bits, int) and 2 <= self.loftq_bits <= 8,
              f"loftq_bits={self.loftq_bits!r} is not valid; expected an integer in 2..8")
        check(isinstance(self.loftq_iter, int) and not isinstance(self.loftq_iter, bool) and self.loftq_iter >= 1,
              f"loftq_iter={self.loftq_iter!r} is not valid; expected an integer >= 1")
        check(self.quantizer in QUANTIZERS, f"quantizer={self.quantizer!r} is not valid; expected one of {QUANTIZERS}")
        check(isinstance(self.block_size, int) and self.block_size > 0 and self.block_size % 2 == 0,
              f"block_size={self.block_size!r} is not valid; expected an even integer > 0")
        need = {"nf4": 4, "int4": 4, "int8": 8}.get(self.quantizer)
        check(need is None or need == self.loftq_bits,
              f"quantizer={self.quantizer!r} stores {need} bits but loftq_bits={self.loftq_bits}")

    def resolved_quantizer(self) -> str:
        """The quantiser ``"auto"`` stands for (``nf4`` at 4 bits, ``int8`` at 8, else ``normal``)."""
        if self.quantizer != "auto":
            return self.quantizer
        return {4: "nf4", 8: "int8"}.get(self.loftq_bits, "normal")

    @classmethod
    def from_value(cls, value: Any) -> LoftQConfig:
        """``value`` as a :class:`LoftQConfig`: one is returned as is; peft's ``LoftQConfig`` (its attributes) or a
        dict is converted.

        Raises:
            ConfigError: ``value`` has keys :class:`LoftQConfig` lacks, or (from its validation) invalid values.
        """
        if isinstance(value, cls):
            return value
        data = dict(value) if isinstance(value, dict) else dict(vars(value))
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        check(not extra, f"loftq_config has unknown key(s) {extra}; valid keys: {sorted(names)}")
        return cls(**data)


# --- the simple quantisers (plain torch) -------------------------------------------------------------
def normal_float_levels(bits: int) -> Tensor:
    """The ``2**bits`` NormalFloat levels in [-1, 1] (QLoRA's construction: ``2**(bits-1)`` positive
    quantiles of N(0, 1), ``2**(bits-1) - 1`` negative, and an exact zero); 4 bits gives NF4."""
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def simple_fake_quantize(w: Tensor, bits: int, kind: str = "normal", block_size: int = 64) -> Tensor:
    """Quantise and dequantise ``w`` with a simple block-absmax quantiser (no torchao).

    Args:
        w: any float tensor whose element count is a multiple of ``block_size``.
        bits: 2-8. kind: ``"normal"`` (NormalFloat levels) or ``"uniform"`` (``2**bits - 1`` symmetric
            uniform levels). block_size: consecutive weights sharing one absmax scale.

    Returns:
        a float32 tensor shaped like ``w``: every value is a level times its block's absmax.
    """
    if kind == "normal":
        levels = normal_float_levels(bits).to(w.device)
    else:
        steps = 2 ** (bits - 1) - 1
        levels = torch.arange(-steps, steps + 1, device=w.device, dtype=torch.float32) / steps
    blocks = w.detach().float().reshape(-1, block_size)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    idx = torch.bucketize(blocks / scale, (levels[1:] + levels[:-1]) / 2)
    return (levels[idx] * scale).reshape(w.shape)


# --- the decomposition ---------------------------------------------------------------------------------
@dataclass
class LoftQResult:
    """What :func:`loftq_decompose` returns.

    Attributes:
        dequantized: ``Q``, the dequantised base, ``(out, in)`` float32.
        lora_A: ``(r, in)``; lora_B: ``(out, r)``; ``scaling * lora_B @ lora_A`` is the low-rank part.
        state: the quantised storage of ``Q`` (real quantisers) or None (simple ones).
        fmt: its storage format, or None.
    """

    dequantized: Tensor
    lora_A: Tensor
    lora_B: Tensor
    state: dict[str, Tensor] | None
    fmt: Any


def _quantizer(config: LoftQConfig, shape: tuple[int, int]) -> tuple[Callable[[Tensor], tuple], Any]:
    kind = config.resolved_quantizer()
    if kind in ("normal", "uniform"):
        check((shape[0] * shape[1]) % config.block_size == 0,
              f"a {shape} weight cannot be split into blocks of block_size={config.block_size}")
        return (lambda t: (simple_fake_quantize(t, config.loftq_bits, kind, config.block_size), None)), None
    fmt = make_format(kind, block_size=config.block_size, group_size=config.block_size if kind == "int4" else None)
    reason = fmt.unsupported(shape)
    if reason is not None and kind == "int4":  # its groups are LoftQConfig's block_size
        reason = reason.replace("group_size=", "loftq_config block_size=")
    check(reason is None, f"LoftQ quantizer {kind!r} cannot store a {shape} weight: {reason}")

    def real(t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        state = fmt.quantize(t)
        return fmt.dequantize(state, shape), state

    return real, fmt


@torch.no_grad()
def loftq_decompose(weight: Tensor, r: int, scaling: float = 1.0, config: LoftQConfig | None = None) -> LoftQResult:
    """Run LoftQ on one weight matrix.

    Args:
        weight: ``(out, in)`` full-precision weight ``W``.
        r: LoRA rank (<= min(out, in)). scaling: LoRA's ``lora_alpha / r`` (divided out of ``A``, ``B``).
        config: :class:`LoftQConfig` (default: 4 bits, 1 step, ``auto`` quantiser).

    Returns:
        :class:`LoftQResult` with ``W ~ Q + scaling * B @ A``.

    Raises:
        ConfigError: the shape cannot be quantised in blocks, or ``r`` is larger than the matrix.
        ImportError: a real quantiser without torchao.
    """
    config = config or LoftQConfig()
    w = weight.detach().float()
    check(r <= min(w.shape), f"LoftQ rank r={r} is larger than the {tuple(w.shape)} weight allows")
    quantize, fmt = _quantizer(config, tuple(w.shape))
    low_rank = torch.zeros_like(w)
    root_s = math.sqrt(scaling)
    for _ in range(config.loftq_iter):
        q, state = quantize(w - low_rank)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = s[:r].sqrt()
        lora_b, lora_a = u[:, :r] * root / root_s, root[:, None] * vh[:r] / root_s
        low_rank = scaling * lora_b @ lora_a
    return LoftQResult(q, lora_a, lora_b, state, fmt)


# --- hooking into LoRA ------------------------------------------------------------------------------
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def loftq_init(adapter: nn.Module, base: nn.Module, config: Any, module_name: str) -> None:
    """Initialise a LoRA linear adapter with LoftQ; the new base is applied by :func:`apply_pending`
    once every adapter of the config is built (so a bad value leaves the model unchanged).

    Raises:
        ConfigError: the base is not a full-precision ``nn.Linear``/GPT-2 ``Conv1D``.
    """
    check(not isinstance(base, QuantLinear),
          f"{module_name}: init_lora_weights='loftq' quantises the base itself and needs its full-precision "
          f"weight, and this layer is quantised already ({getattr(getattr(base, 'fmt', None), 'method', '?')}: by quantize_base / --quantize, or by "
          "another LoftQ adapter on this model, which replaced the base with its own quantised one); LoftQ needs the "
          "unquantised model, so one LoftQ adapter per model")
    check(hasattr(adapter, "lora_A") and isinstance(adapter.lora_A, nn.Linear),
          f"{module_name}: LoftQ initialises LoRA on linear layers only, not {type(base).__name__}")
    loftq = LoftQConfig.from_value(config.loftq_config or {})
    transposed = not isinstance(base, nn.Linear)
    w = base.weight.detach().T if transposed else base.weight.detach()
    try:
        result = loftq_decompose(w, adapter.r, adapter.scaling, loftq)
    except ConfigError as err:  # name the layer
        raise ConfigError(f"{module_name}: {err}") from None
    adapter.lora_A.weight.data.copy_(result.lora_A)
    adapter.lora_B.weight.data.copy_(result.lora_B)
    if adapter.lora_B.bias is not None:
        adapter.lora_B.bias.data.zero_()
    _PENDING[adapter] = result


def apply_pending(model: nn.Module, adapter_name: str) -> None:
    """Give every layer that adapter ``adapter_name`` initialised with LoftQ its new base: a
    :class:`QuantLinear` (real quantisers) or its float weight overwritten with ``Q`` (simple ones).

    Raises:
        ConfigError: a GPT-2 ``Conv1D`` layer that also holds other adapters would change layout under
            them (checked for every layer before any change).
    """
    todo = [(layer, layer.adapters[adapter_name], _PENDING.pop(layer.adapters[adapter_name]))
            for layer in model.modules()
            if isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters
            and layer.adapters[adapter_name] in _PENDING]
    for layer, _, result in todo:
        if result.fmt is not None and not isinstance(layer.base_layer, nn.Linear) and len(layer.adapters) > 1:
            raise ConfigError(f"LoftQ with quantizer {result.fmt.method!r} turns a GPT-2 Conv1D into a quantised "
                              f"linear; add the LoftQ adapter before others ({list(layer.adapters)})")
    for layer, adapter, result in todo:
        base = layer.base_layer
        with torch.no_grad():
            if result.fmt is None:
                w = base.weight
                w.copy_((result.dequantized.T if not isinstance(base, nn.Linear) else result.dequantized).to(w.dtype))
                continue
            quantized = QuantLinear(tuple(result.dequantized.shape), result.state, base.bias, result.fmt,
                                    base.weight.dtype)
            quantized.conv1d = not isinstance(base, nn.Linear)
        layer.base_layer = quantized
        adapter.transposed = False


def validate_lora_options(config: Any) -> None:
    """Check and normalise a ``LoraConfig``'s LoftQ and QA-LoRA fields (called by its ``validate``).

    ``loftq_config`` becomes a plain dict of every :class:`LoftQConfig` field when
    ``init_lora_weights="loftq"`` (empty means the defaults) and is cleared, with a warning, otherwise
    (as peft does).

    Raises:
        ConfigError: a bad ``loftq_config`` value or key, ``qalora_group_size`` not an integer > 0,
            or ``use_qalora`` together with ``lora_bias`` or LoftQ.
    """
    if config.init_lora_weights == "loftq":
        config.loftq_config = dataclasses.asdict(LoftQConfig.from_value(config.loftq_config or {}))
    elif config.loftq_config:
        warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'", stacklevel=4)
        config.loftq_config = {}
    check(isinstance(config.use_qalora, bool), f"use_qalora={config.use_qalora!r} must be True or False")
    group = config.qalora_group_size
    check(isinstance(group, int) and not isinstance(group, bool) and group > 0,
          f"qalora_group_size={group!r} is not valid; expected an integer > 0")
    if config.use_qalora:
        check(not config.lora_bias, "use_qalora=True does not support lora_bias=True")
        check(config.init_lora_weights != "loftq", "use_qalora=True cannot start from init_lora_weights='loftq'")
