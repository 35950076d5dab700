"""FourierFT: a weight change learnt as a few entries of its 2-D spectrum (``FourierFTConfig``, ``peft_type``
``FOURIERFT``, peft's file format).

Paper: Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", 2024, arXiv:2405.03003.

Equation: ``delta = s * Re(IDFT2(F))`` where ``F: (out, in)`` is zero except at ``n`` fixed locations, which hold
the trainable ``fourierft_spectrum: (n,)``; ``h = W0 x + delta x``. The locations are drawn once per layer from
``random_loc_seed`` exactly as peft draws them (the first ``n`` entries of ``torch.randperm(out * in)`` under a
``torch.Generator`` seeded with it, entry ``k`` at row ``k // in``, column ``k % in``), so they are never saved: a
file holds ``base_model.model.<module>.fourierft_spectrum`` only and loads both ways. Trainable parameters per
layer: ``n`` (``n_frequency``, or its ``n_frequency_pattern`` override).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods import _reparam as rp
from peftkit.methods.lora import trainable_biases
from peftkit.targeting import LORA_TARGET_DEFAULTS, check_pattern_keys, linear_types, pattern_key
from peftkit.tuners import WrapTuner

FOURIERFT_PAPER = "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al., 2024, arXiv:2405.03003)"

#: FourierFT's default targets: LoRA's, except GPT-2 and GPT-BigCode's MLP output projection (peft's table).
FOURIERFT_TARGET_DEFAULTS: dict[str, tuple[str, ...] | str] = {
    **LORA_TARGET_DEFAULTS, "gpt2": ("mlp.c_proj",), "gpt_bigcode": ("mlp.c_proj",)}


@dataclass
class FourierFTConfig(PeftConfig):
    """Configuration of FourierFT, peft's ``FourierFTConfig``.

    Args:
        n_frequency: ``n``, the number of learnt spectral entries per layer, an integer in ``[1, out * in]``.
            Default 1000.
        scaling: ``s``, the factor on the inverse transform (the paper uses 100-150 for RoBERTa on GLUE, 300 for
            LLaMA and ViT), a finite number. Default 150.
        random_loc_seed: the seed of the spectral locations, an integer in ``[-2**63, 2**64)``. Default 777.
        fan_in_fan_out: kept for file compatibility; the layout is read from the module type (peft corrects a wrong
            value with a warning and so arrives at the same).
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``; None (default) takes the
            model type's usual targets, as peft (:data:`FOURIERFT_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        bias: ``"none"`` (default), ``"all"`` (train every bias of the model) or ``"fourier_only"`` (the biases of the
            adapted layers).
        modules_to_save: modules trained in full and saved with the adapter.
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        n_frequency_pattern: per-module ``n_frequency`` overrides, keyed by a module name or a regular expression
            matched against the end of module names on a segment boundary (the first matching key wins).
        init_weights: False (default, as peft and the paper): a standard normal spectrum, so the model starts
            changed; True: a zero spectrum (the adapter starts as the identity).

    Equation: ``delta = s * Re(IDFT2(F))``, ``F`` sparse with ``n`` trainable entries. Trainable parameters per
    layer: ``n``.

    Raises:
        ConfigError: ``n_frequency`` (or a pattern value) not an integer > 0, ``scaling`` not a finite number,
            ``random_loc_seed`` not an integer seed, ``fan_in_fan_out``/``init_weights`` not a bool, an unknown
            ``bias``, a bad ``n_frequency_pattern`` key, ``target_modules=[]``; when injecting, ``n`` above a
            target's ``out * in`` (the message names the module).

    Paper: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al., 2024, arXiv:2405.03003).
    """

    peft_type = "FOURIERFT"
    default_target_modules = FOURIERFT_TARGET_DEFAULTS
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def validate(self) -> None:
        rp.check_positive_int("n_frequency", self.n_frequency)
        check(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
              and math.isfinite(self.scaling), f"scaling={self.scaling!r} is not valid; it must be a finite number")
        seed = self.random_loc_seed
        check(isinstance(seed, int) and not isinstance(seed, bool) and -2**63 <= seed < 2**64,
              f"random_loc_seed={seed!r} is not valid; it must be an integer seed in [-2**63, 2**64)")
        check(isinstance(self.fan_in_fan_out, bool), f"fan_in_fan_out={self.fan_in_fan_out!r} must be True or False")
        check(isinstance(self.init_weights, bool), f"init_weights={self.init_weights!r} must be True or False")
        check(self.bias in ("none", "all", "fourier_only"),
              f"bias={self.bias!r} is not valid; expected 'none', 'all' or 'fourier_only'")
        check(isinstance(self.n_frequency_pattern, dict),
              f"n_frequency_pattern={self.n_frequency_pattern!r} must be a dict of module name/regex -> n_frequency")
        check_pattern_keys("n_frequency_pattern", self.n_frequency_pattern)
        for key, value in self.n_frequency_pattern.items():
            rp.check_positive_int(f"n_frequency_pattern[{key!r}]", value)
        rp.check_common(self)


def spectral_locations(out_features: int, in_features: int, n: int, seed: int) -> Tensor:
    """The ``(2, n)`` int64 (row, column) locations of the learnt entries, drawn as peft draws them: the first ``n``
    of ``torch.randperm(out * in)`` under a CPU generator seeded with ``seed``, entry ``k`` at ``(k // in, k % in)``.
    """
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierFTLinear(Adapter):
    """FourierFT on one ``nn.Linear`` or GPT-2 ``Conv1D``: ``y + x delta^T``.

    Shapes: ``fourierft_spectrum: (n,)``; the buffer ``indices: (2, n)`` (not saved: rebuilt from the seed);
    ``delta: (out, in)``; ``x: (..., in)``, ``y: (..., out)``. ``delta_weight`` is ``delta`` in the base weight's
    layout (``(in, out)`` for a ``Conv1D``).
    """

    def __init__(self, layout: rp.Layout, n: int, scaling: float, seed: int, init: bool) -> None:
        super().__init__()
        self.layout, self.scaling, self.n_frequency = layout, scaling, n
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n) if init else torch.randn(n))
        self.register_buffer("indices", spectral_locations(layout.out_features, layout.in_features, n, seed),
                             persistent=False)

    def delta(self, spectrum: Tensor) -> Tensor:
        """``s * Re(IDFT2(F))`` with ``spectrum`` at the locations, ``(out, in)``, in ``spectrum``'s dtype promoted to
        at least float32 (the FFT takes no half precision)."""
        dense = torch.zeros(self.layout.out_features, self.layout.in_features, device=spectrum.device,
                            dtype=torch.promote_types(spectrum.dtype, torch.float32))
        dense = dense.index_put((self.indices[0], self.indices[1]), spectrum.to(dense.dtype))
        return torch.fft.ifft2(dense).real * self.scaling

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        d = self.delta(self.fourierft_spectrum)
        return y + F.linear(x.to(d.dtype), d).to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return rp.to_base_layout(self.delta(wide(self.fourierft_spectrum.detach())), self.layout)

    def extra_repr(self) -> str:
        return f"n_frequency={self.n_frequency}, scaling={self.scaling}"


class FourierFTTuner(WrapTuner):
    """Builds one FourierFT adapter per target (``nn.Linear``, GPT-2 ``Conv1D``, as peft)."""

    method = "FourierFT"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return linear_types()

    def make_adapter(self, base: nn.Module, config: FourierFTConfig, module_name: str) -> Adapter:
        """A :class:`FourierFTLinear` with ``n`` from ``n_frequency_pattern`` (first matching key) or
        ``n_frequency``.

        Raises:
            ConfigError: ``n`` above the layer's ``out * in`` entries.
        """
        layout = rp.layout_of(base)
        key = pattern_key(module_name, config.n_frequency_pattern)
        n = config.n_frequency if key is None else config.n_frequency_pattern[key]
        size = layout.out_features * layout.in_features
        check(n <= size, f"{module_name}: n_frequency={n} exceeds the layer's {layout.out_features} x "
                         f"{layout.in_features} = {size} spectral entries; give at most that many (n_frequency_pattern "
                         "sets it per module)")
        return FourierFTLinear(layout, n, config.scaling, config.random_loc_seed, config.init_weights)

    def trainable_base_params(self, model: nn.Module, config: FourierFTConfig, targets: list[str]) -> list[str]:
        return trainable_biases(model, config.bias, targets)


def fourierft_from_cli(args: Any) -> FourierFTConfig:
    """A :class:`FourierFTConfig` from ``peftkit train`` options ``args``: ``--target-modules`` (default
    ``"all-linear"``), ``--task-type``; ``n_frequency``, ``scaling``, ``random_loc_seed`` and ``init_weights`` through
    ``--option`` (peft's defaults otherwise: 1000, 150, 777, a random spectrum).

    Raises:
        ConfigError: invalid values (from the config's validation).
    """
    return FourierFTConfig(target_modules=args.target_modules or "all-linear", task_type=args.task_type)


register_method(MethodSpec(
    name="fourierft", config_cls=FourierFTConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=FOURIERFT_PAPER, tuner=FourierFTTuner(), cli_config=fourierft_from_cli, default_lr=5e-2,
))
