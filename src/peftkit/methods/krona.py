"""KronA: the Kronecker adapter (peftkit's ``KronaConfig``, ``peft_type`` ``KRONA``; peft lacks it).

Paper: Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022,
arXiv:2212.10650.

Equation: ``h = W0 x + s * kron(A, B) x`` with ``A: (a1, a2)`` and ``B: (out / a1, in / a2)``. On
linear layers the product is applied to the input by reshaping, ``kron(A, B) x = vec(A X B^T)`` with
``X = x`` viewed as ``(a2, in / a2)``, so the ``(out, in)`` delta is never built; convolutions (their
``in`` is ``in_channels / groups * prod(kernel)``) build it as a kernel. Trainable parameters per
layer: ``a1 a2 + (out / a1) (in / a2)``. Unlike a rank-``r`` product, ``kron(A, B)`` has rank
``rank(A) rank(B)``, full for generic factors.

File layout as peft's other methods: ``base_model.model.<module>.krona_A`` and ``...krona_B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods import _reparam as rp
from peftkit.ops import Dropout
from peftkit.targeting import LORA_TARGET_DEFAULTS
from peftkit.tuners import WrapTuner

KRONA_PAPER = "KronA: Parameter Efficient Tuning with Kronecker Adapter (Edalati et al., 2022, arXiv:2212.10650)"


@dataclass
class KronaConfig(PeftConfig):
    """Configuration of KronA.

    Args:
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``;
            None (default) takes the model type's usual targets, as peft (:data:`~peftkit.targeting.LORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        a1: rows of ``A``; must divide each target's ``out``. None (default) picks the smaller factor
            near ``sqrt(out)`` (:func:`~peftkit.methods._reparam.factorization`).
        a2: columns of ``A``; must divide each target's ``in`` (``in_channels / groups * prod(kernel)``
            for a convolution). None (default): the smaller factor near ``sqrt(in)``.
        scale: ``s``, the factor on the Kronecker product, a number > 0. Default 1.
        dropout: dropout probability on the adapter's input, in [0, 1). Default 0.
        init_weights: True (``A`` Kaiming-uniform, ``B`` zero: the adapter starts as identity) or
            False (both random: tests only).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        modules_to_save: modules trained in full and saved with the adapter.

    Equation: ``delta = s * kron(A, B)``. Trainable parameters per layer: ``a1 a2 + (out/a1)(in/a2)``.

    Raises:
        ConfigError: ``a1``/``a2`` not None or an integer > 0, ``scale <= 0``, a dropout outside
            [0, 1), ``target_modules=[]`` (None takes the model type's defaults); when injecting, an ``a1``/``a2`` that does not divide a
            target's ``out``/``in`` (the message names the module).

    Paper: KronA: Parameter Efficient Tuning with Kronecker Adapter (Edalati et al., 2022, arXiv:2212.10650).
    """

    peft_type = "KRONA"
    default_target_modules = LORA_TARGET_DEFAULTS
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    a1: int | None = None
    a2: int | None = None
    scale: float = 1.0
    dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        for name in ("a1", "a2"):
            if getattr(self, name) is not None:
                rp.check_positive_int(name, getattr(self, name))
        check(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale > 0,
              f"scale={self.scale!r} is not valid; it must be a number > 0")
        rp.check_unit_interval("dropout", self.dropout)
        check(isinstance(self.init_weights, bool), f"init_weights={self.init_weights!r} must be True or False")
        rp.check_common(self)


class KronaAdapter(Adapter):
    """KronA on one Linear, GPT-2 ``Conv1D`` or ``nn.Conv1d/2d/3d`` layer.

    Shapes: ``krona_A: (a1, a2)``, ``krona_B: (out/a1, in/a2)``; ``x`` and the output as the base
    layer's. ``delta_weight`` is ``s * kron(A, B)`` in the base weight's layout.
    """

    def __init__(self, layout: rp.Layout, a1: int, a2: int, scale: float, dropout: float, init: bool) -> None:
        super().__init__()
        self.layout, self.scaling = layout, scale
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.krona_A = nn.Parameter(torch.empty(a1, a2))
        self.krona_B = nn.Parameter(torch.empty(layout.out_features // a1, layout.flat_in // a2))
        rp.kaiming_(self.krona_A)
        if init:
            nn.init.zeros_(self.krona_B)
        else:
            rp.kaiming_(self.krona_B)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a, b = self.krona_A, self.krona_B
        x = self.dropout(x.to(a.dtype))
        if self.layout.kind == "linear":
            side = rp.kron_linear(x, a, b)
        else:
            side = rp.apply_delta(layer.base_layer, self.layout, x, rp.kron(a, b))
        return torch.add(y, side.to(y.dtype), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        delta = rp.kron(wide(self.krona_A.detach()), wide(self.krona_B.detach())) * self.scaling
        return rp.to_base_layout(delta, self.layout)


class KronaTuner(WrapTuner):
    """Builds one KronA adapter per target module."""

    method = "KronA"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return rp.supported_types()

    def make_adapter(self, base: nn.Module, config: KronaConfig, module_name: str) -> Adapter:
        """A :class:`KronaAdapter` with ``A: (a1, a2)``; ``a1``/``a2`` default to the smaller factor of
        :func:`~peftkit.methods._reparam.factorization` of ``out`` / ``in`` (``in_channels / groups *
        prod(kernel)`` for a convolution).

        Raises:
            ConfigError: ``a1`` does not divide ``out`` or ``a2`` does not divide ``in``.
        """
        layout = rp.layout_of(base)
        a1 = config.a1 or rp.factorization(layout.out_features)[0]
        a2 = config.a2 or rp.factorization(layout.flat_in)[0]
        check(layout.out_features % a1 == 0,
              f"{module_name}: a1={a1} must divide the layer's out features {layout.out_features}")
        check(layout.flat_in % a2 == 0, f"{module_name}: a2={a2} must divide the layer's in features "
                                        f"{layout.flat_in} (in_channels/groups * kernel for a convolution)")
        return KronaAdapter(layout, a1, a2, config.scale, config.dropout, config.init_weights)


def krona_from_cli(args: Any) -> KronaConfig:
    """A :class:`KronaConfig` from ``peftkit train`` options ``args`` (``--lora-dropout`` as ``dropout``;
    ``--target-modules``, default ``"all-linear"``; ``a1``, ``a2`` and ``scale`` through ``--option``)."""
    return KronaConfig(dropout=args.lora_dropout, target_modules=args.target_modules or "all-linear",
                       task_type=args.task_type)


register_method(MethodSpec(
    name="krona", config_cls=KronaConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=KRONA_PAPER, tuner=KronaTuner(), cli_config=krona_from_cli, default_lr=5e-3,
))
