"""VeRA: one frozen pair of random matrices shared by every adapted layer, and trainable scaling vectors.

Paper: Kopiczko, Blankevoort and Asano, "VeRA: Vector-based Random Matrix Adaptation", 2023,
arXiv:2310.11454.

Equation: ``h = W0 x + Lambda_b B Lambda_d A dropout(x)`` with ``A: (r, in)`` and ``B: (out, r)`` frozen,
random and shared, ``Lambda_d = diag(vera_lambda_d)`` (``r``) and ``Lambda_b = diag(vera_lambda_b)``
(``out``) trained. Trainable parameters per adapted ``(out, in)`` layer: ``r + out``.

As in HF PEFT, ``A`` and ``B`` are drawn once per adapter for the largest adapted layer (``vera_A:
(r, max in)``, ``vera_B: (max out, r)``, Kaiming-uniform from a CPU generator seeded with
``projection_prng_key``) and each layer uses the top-left slice it needs. The file keeps
``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection`` is true; otherwise loading
regenerates them from the saved seed. Adapters: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, unwrap, wide
from peftkit.methods.lora import fresh_output, trainable_biases
from peftkit.ops import Dropout
from peftkit.targeting import VERA_TARGET_DEFAULTS, check_target_fields, linear_types
from peftkit.tuners import WrapTuner

VERA_PAPER = "VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2023, arXiv:2310.11454)"
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclass
class VeraConfig(PeftConfig):
    """Configuration of VeRA (field names and defaults as ``peft.VeraConfig``).

    Args:
        r: rank of the shared random projections, > 0. Default 256 (VeRA needs far larger ranks than
            LoRA; its parameter count grows only by one per unit of rank and layer).
        target_modules: names/suffixes, a full-match regex, or ``"all-linear"`` (Linear and Conv1D only);
            None (default) takes the model type's usual targets, as peft (:data:`~peftkit.targeting.VERA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        projection_prng_key: seed of the generator that draws ``vera_A`` and ``vera_B``. Default 0.
        save_projection: write ``vera_A``/``vera_B`` into the file (default True); when False they are
            regenerated from ``projection_prng_key`` on loading.
        vera_dropout: dropout probability on the adapter's input, in [0, 1). Default 0.
        d_initial: initial value of every ``vera_lambda_d`` entry (``vera_lambda_b`` starts at zero, so
            the adapter starts as the identity). Default 0.1.
        fan_in_fan_out: kept for file compatibility; the layout is read from the module type.
        bias: ``"none"``, ``"all"`` or ``"vera_only"`` (train the biases of the adapted layers).
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: False leaves ``lambda_b = 1`` and ``lambda_d ~ N(0, 1)`` (for tests).
        layers_to_transform / layers_pattern: restrict to some blocks.

    Raises:
        ConfigError: ``r <= 0``, dropout outside [0, 1), a non-integer ``projection_prng_key`` or one outside
            ``[-2**63, 2**64)``, a non-numeric ``d_initial``, an unknown ``bias``, or ``target_modules=[]``.

    Paper: VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2023, arXiv:2310.11454).
    """

    peft_type = "VERA"
    default_target_modules = VERA_TARGET_DEFAULTS
    r: int = 256
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self) -> None:
        check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
              f"r={self.r!r} is not valid; the rank must be an integer > 0")
        check(isinstance(self.vera_dropout, (int, float)) and 0 <= self.vera_dropout < 1,
              f"vera_dropout={self.vera_dropout!r} is not valid; it must lie in [0, 1)")
        check(isinstance(self.projection_prng_key, int) and not isinstance(self.projection_prng_key, bool),
              f"projection_prng_key={self.projection_prng_key!r} must be an integer seed")
        check(-2**63 <= self.projection_prng_key < 2**64,  # what torch.Generator.manual_seed takes
              f"projection_prng_key={self.projection_prng_key} is out of range; a seed lies in [-2**63, 2**64)")
        check(isinstance(self.d_initial, (int, float)) and not isinstance(self.d_initial, bool),
              f"d_initial={self.d_initial!r} must be a number")
        check(self.bias in ("none", "all", "vera_only"),
              f"bias={self.bias!r} is not valid; expected 'none', 'all' or 'vera_only'")
        check_target_fields(self)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform (gain sqrt(2), fan = ``shape[1]``) drawn from ``generator``, as peft draws it."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen ``vera_A: (r, max_in)`` and ``vera_B: (max_out, r)`` of one adapter, shared by its
    layers (a submodule of each, so moving the model moves them once). The buffers are not persistent:
    the adapter's file carries them only through the tuner when ``save_projection`` is true."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", _kaiming_uniform((r, max_in), generator), persistent=False)
        self.register_buffer("vera_B", _kaiming_uniform((max_out, r), generator), persistent=False)


class VeraLinear(Adapter):
    """VeRA on ``nn.Linear`` / GPT-2 ``Conv1D``: ``x: (..., in) -> (..., out)``.

    Parameters: ``vera_lambda_d: (r,)``, ``vera_lambda_b: (out,)``. The forward folds ``lambda_b`` into
    the small ``B`` slice and scales the ``(..., r)`` projection by ``lambda_d``, then accumulates into
    the base output with one matmul; no gradient is computed for the frozen ``A``.
    """

    def __init__(self, projection: VeraProjection, in_features: int, out_features: int, r: int, dropout: float,
                 transposed: bool) -> None:
        super().__init__()
        self.r, self.in_features, self.out_features, self.transposed = r, in_features, out_features, transposed
        self.vera_projection = projection
        self.vera_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_lambda_b = nn.Parameter(torch.ones(out_features))
        self.vera_lambda_d = nn.Parameter(torch.randn(r))

    def reset(self, d_initial: float) -> None:
        """``lambda_d = d_initial``, ``lambda_b = 0``: the adapter starts as the identity."""
        with torch.no_grad():
            self.vera_lambda_d.fill_(d_initial)
            self.vera_lambda_b.zero_()

    def _slices(self) -> tuple[Tensor, Tensor]:
        p = self.vera_projection
        return p.vera_A[: self.r, : self.in_features], p.vera_B[: self.out_features, : self.r]

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a, b = self._slices()
        d = self.vera_lambda_d
        if x.dtype != d.dtype:
            x = x.to(d.dtype)
        z = F.linear(self.vera_dropout(x), a.to(d.dtype)) * d
        b = b.to(d.dtype) * self.vera_lambda_b[:, None]
        if y.dtype == z.dtype and y.is_contiguous() and fresh_output(layer):
            y.view(-1, y.shape[-1]).addmm_(z.view(-1, self.r), b.T)
            return y
        return y + F.linear(z, b).to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        a, b = self._slices()
        delta = (wide(self.vera_lambda_b)[:, None] * wide(b)) @ (wide(self.vera_lambda_d)[:, None] * wide(a))
        return delta.T if self.transposed else delta


class VeraTuner(WrapTuner):
    """Draws the shared projection sized for the largest target, then wraps each target."""

    method = "VeRA"

    def __init__(self) -> None:
        self._projection: VeraProjection | None = None

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return linear_types()

    @staticmethod
    def _in_out(base: nn.Module) -> tuple[int, int, bool]:
        transposed = not isinstance(base, nn.Linear)
        out_f, in_f = base.weight.shape[::-1] if transposed else base.weight.shape
        return in_f, out_f, transposed

    def inject(self, host: Any, config: VeraConfig, adapter_name: str) -> None:
        shapes = [self._in_out(unwrap(host.model.get_submodule(t))) for t in self.find(host, config)]
        self._projection = VeraProjection(config.r, max(s[0] for s in shapes), max(s[1] for s in shapes),
                                          config.projection_prng_key)
        try:
            super().inject(host, config, adapter_name)
        finally:
            self._projection = None

    def make_adapter(self, base: nn.Module, config: VeraConfig, module_name: str) -> Adapter:
        """A :class:`VeraLinear` on the shared projection that :meth:`inject` drew, set to the identity
        (``lambda_d = d_initial``, ``lambda_b = 0``) when ``init_weights``."""
        in_f, out_f, transposed = self._in_out(base)
        adapter = VeraLinear(self._projection, in_f, out_f, config.r, config.vera_dropout, transposed)
        if config.init_weights:
            adapter.reset(config.d_initial)
        return adapter

    def trainable_base_params(self, model: nn.Module, config: VeraConfig, targets: list[str]) -> list[str]:
        return trainable_biases(model, config.bias, targets)

    def export_config(self, host: Any, adapter_name: str) -> VeraConfig:
        """The config as is, except that ``exclude_modules`` (which peft's ``VeraConfig`` lacks: peft would drop it,
        adapt the excluded layers too and size the shared projection from them) is written out as the explicit
        list of adapted modules in ``target_modules``."""
        config = host.peft_config[adapter_name]
        if not config.exclude_modules:
            return config
        names = list(host.adapters_of(adapter_name, VeraLinear))
        return dataclasses.replace(config, target_modules=names, exclude_modules=None)

    def extra_tensors(self, host: Any, adapter_name: str) -> dict[str, Any]:
        """``base_model.vera_A`` / ``base_model.vera_B`` (peft's keys) when ``save_projection`` is true."""
        if not host.peft_config[adapter_name].save_projection:
            return {}
        for _, layer in host.wrappers():
            if isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters:
                projection = layer.adapters[adapter_name].vera_projection
                return dict(zip(PROJECTION_KEYS, (projection.vera_A, projection.vera_B), strict=True))
        return {}


def vera_from_cli(args: Any) -> VeraConfig:
    """Build a :class:`VeraConfig` from ``peftkit train`` options ``args`` (``--r`` is the shared rank,
    default 256; ``--lora-dropout`` as ``vera_dropout``; ``--target-modules`` default ``"all-linear"``)."""
    return VeraConfig(r=args.r or 256, vera_dropout=args.lora_dropout, target_modules=args.target_modules or "all-linear",
                      task_type=args.task_type)


register_method(MethodSpec(
    name="vera", config_cls=VeraConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=VERA_PAPER, tuner=VeraTuner(), cli_config=vera_from_cli, default_lr=1e-2,
))
