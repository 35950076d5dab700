"""HRA: Householder reflection adaptation (``HRAConfig``, ``peft_type`` ``HRA``, peft's file format).

Paper: Yuan et al., "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
Adaptation", 2024, arXiv:2405.17484.

Equation: ``W' = W H`` with ``H = (I - 2 u_1 u_1^T) ... (I - 2 u_r u_r^T)``, the product of ``r`` Householder
reflections of unit vectors ``u_i = U[:, i] / ||U[:, i]||`` (``U = hra_u: (in, r)``); with ``apply_GS`` the columns
are first made orthonormal by Gram-Schmidt (``Q``) and ``H = I - 2 Q Q^T``. ``H`` is orthogonal, so the adapted
weight keeps the base weight's angles between rows (the "orthogonal" side) while the change ``W (H - I)`` has rank
at most ``r`` (the "low-rank" side). Trainable parameters per layer: ``r * in`` (``r * in_channels * kh * kw`` on a
convolution).

On a linear layer the forward rotates the input instead of building ``W H``: ``y = W (H x) + b``, with ``H``
applied in the compact WY form ``H = I - U T U^T`` (``T: (r, r)`` upper triangular, ``T^{-1} = I / 2 +
strict_upper(U^T U)`` for the unit columns), so a token costs ``O(in * r)`` and the ``(in, in)`` matrix is only
built to merge. On a ``Conv2d`` the kernel viewed as ``(out, in * kh * kw)`` is multiplied by ``H`` and the
convolution runs with it (a parameter substitution).

File layout as peft: ``base_model.model.<module>.hra_u`` of shape ``(in, r)`` (``(in * kh * kw, r)`` for a
``Conv2d``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.methods import _reparam as rp
from peftkit.targeting import LORA_TARGET_DEFAULTS, linear_types
from peftkit.tuners import WrapTuner

HRA_PAPER = ("Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation "
             "(Yuan et al., 2024, arXiv:2405.17484)")


@dataclass
class HRAConfig(PeftConfig):
    """Configuration of HRA (Householder reflection adaptation), peft's ``HRAConfig``.

    Args:
        r: the number of Householder reflections per layer, an integer > 0; even when ``init_weights`` is True
            (the symmetric initialisation pairs equal reflections). Default 8.
        apply_GS: orthonormalise the reflection vectors by Gram-Schmidt first (``H = I - 2 Q Q^T``). Default False.
            It needs ``init_weights=False``: with the symmetric initialisation the paired columns are equal, so
            Gram-Schmidt meets a zero residual and takes its direction from rounding, or gives NaN (peft accepts
            the pair and does the same; a saved file with it loads, see :meth:`as_saved`).
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``; None (default) takes the
            model type's usual targets, as peft (:data:`~peftkit.targeting.LORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        init_weights: True (default): each pair of columns of ``hra_u`` is one Kaiming-uniform vector repeated, so
            the reflections cancel in pairs and the adapter starts as the identity (``H = I``); False: every column
            random (tests only: the model starts changed).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        bias: only ``"none"`` (peft also offers ``"all"`` and ``"hra_only"``; peftkit refuses them).
        modules_to_save: modules trained in full and saved with the adapter.

    Equation: ``W' = W prod_i (I - 2 u_i u_i^T)``. Trainable parameters per layer: ``r * in``
    (``r * in_channels * kh * kw`` on a ``Conv2d``).

    Raises:
        ConfigError: ``r`` not an integer > 0, an odd ``r`` or ``apply_GS=True`` with ``init_weights=True`` (a saved
            file with that pair, which peft writes, loads as ``init_weights=False``: see :meth:`as_saved`), ``apply_GS`` or
            ``init_weights`` not a bool, ``bias`` other than ``"none"``, ``target_modules=[]``; when injecting, a
            grouped convolution, a module type HRA does not adapt, or with ``apply_GS`` an ``r`` above a target's input
            dimension (the message names the module).

    Paper: Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation
    (Yuan et al., 2024, arXiv:2405.17484).
    """

    peft_type = "HRA"
    default_target_modules = LORA_TARGET_DEFAULTS
    r: int = 8
    apply_GS: bool = False  # peft's field name
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        rp.check_positive_int("r", self.r)
        check(isinstance(self.apply_GS, bool), f"apply_GS={self.apply_GS!r} must be True or False")
        check(isinstance(self.init_weights, bool), f"init_weights={self.init_weights!r} must be True or False")
        check(not (self.init_weights and self.r % 2),
              f"r={self.r!r} is odd, but init_weights=True pairs equal reflections (so that the adapter starts as "
              "the identity) and needs an even r; give an even r, or init_weights=False for random vectors")
        check(not (self.init_weights and self.apply_GS),
              "apply_GS=True with init_weights=True: the paired initial reflections are equal, so Gram-Schmidt "
              "divides by a zero residual (its direction then comes from rounding, or is NaN); give "
              "init_weights=False with apply_GS=True, or apply_GS=False")
        check(self.bias == "none",
              f"bias={self.bias!r} is not supported; HRA in peftkit takes bias='none' only (peft's 'all' and "
              "'hra_only' train base biases, which peftkit does not offer for HRA)")
        rp.check_common(self)

    @classmethod
    def as_saved(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A saved config with an odd ``r`` or ``apply_GS`` true, and ``init_weights`` true (or absent), loads with
        ``init_weights=False``: peft accepts those pairs (an odd ``r`` after a warning, drawing every vector at
        random, which is what ``init_weights=False`` does), and the file's ``hra_u`` replaces the vectors anyway."""
        r = data.get("r", 8)
        odd = isinstance(r, int) and not isinstance(r, bool) and r % 2
        if (odd or data.get("apply_GS") is True) and data.get("init_weights", True) is True:
            return {**data, "init_weights": False}
        return data


def unit_columns(u: Tensor) -> Tensor:
    """``u`` with every column scaled to norm 1, as peft (no guard: a zero column gives NaN there too).

    Shapes: ``(d, r) -> (d, r)``."""
    return u / u.norm(dim=0)


def gram_schmidt(u: Tensor) -> Tensor:
    """The columns of ``u`` made orthonormal by classical Gram-Schmidt, in order, as peft computes them.

    Shapes: ``(d, r) -> (d, r)``."""
    cols = [u[:, 0] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        v = u[:, i]
        for q in cols:
            v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


def wy_factor(v: Tensor) -> Tensor:
    """``T: (r, r)`` upper triangular with ``(I - 2 v_1 v_1^T) ... (I - 2 v_r v_r^T) = I - V T V^T`` for the unit
    columns ``v_i`` of ``v: (d, r)`` (the compact WY form; ``T^{-1} = I / 2 + strict_upper(V^T V)``, whose diagonal
    never vanishes, so it always exists)."""
    r = v.shape[1]
    inverse = torch.triu(v.T @ v, diagonal=1) + 0.5 * torch.eye(r, dtype=v.dtype, device=v.device)
    return torch.linalg.solve_triangular(inverse, torch.eye(r, dtype=v.dtype, device=v.device), upper=True)


def reflection_factors(u: Tensor, apply_gs: bool) -> tuple[Tensor, Tensor]:
    """``(V, T)`` with ``H = I - V T V^T``: ``V`` the unit (or, with ``apply_gs``, Gram-Schmidt) columns of ``u``,
    ``T`` their WY factor (``2 I`` for orthonormal columns), in ``u``'s dtype promoted to at least float32 (the
    triangular solve has no half-precision kernel on CPU, and a bfloat16 ``T`` would lose the reflections'
    orthogonality).

    Shapes: ``u: (d, r)`` -> ``V: (d, r)``, ``T: (r, r)``."""
    u = u.to(torch.promote_types(u.dtype, torch.float32))
    if apply_gs:
        q = gram_schmidt(u)
        return q, 2 * torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    v = unit_columns(u)
    return v, wy_factor(v)


def householder_matrix(u: Tensor, apply_gs: bool, transpose: bool = False) -> Tensor:
    """``H`` (or ``H^T`` = ``H^{-1}`` with ``transpose``) as a ``(d, d)`` matrix, for merging.

    Shapes: ``u: (d, r) -> (d, d)``."""
    v, t = reflection_factors(u, apply_gs)
    eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
    return eye - v @ (t.T if transpose else t) @ v.T


class HRALinear(Adapter):
    """HRA on one ``nn.Linear`` or GPT-2 ``Conv1D``: the layer sees ``H x`` instead of ``x`` (``y = W H x + b``).

    Shapes: ``hra_u: (in, r)``; ``x: (..., in)``. Merging multiplies the ``(out, in)`` weight by ``H`` on the
    right (a ``Conv1D``'s stored ``(in, out)`` weight by ``H^T`` on the left); unmerging by ``H^T``. Both build
    ``H`` and multiply in float64: a float32 ``H H^T`` misses ``I`` by a bias of ~1e-7 that 50 merge/unmerge cycles
    would pile up in the base weight.
    """

    transforms_input = True
    merge_keeps_bias = True  # merging rotates the weight alone (see AdaptedLayer.check_partial_merge)

    def __init__(self, in_features: int, r: int, apply_gs: bool, init: bool, transposed: bool) -> None:
        super().__init__()
        self.r, self.apply_GS, self.transposed = r, apply_gs, transposed
        self.hra_u = nn.Parameter(initial_vectors(in_features, r, init))

    def transform_input(self, x: Tensor) -> Tensor:
        v, t = reflection_factors(self.hra_u, self.apply_GS)
        xs = x.to(v.dtype)
        # (x rows) H^T = x - (x V) T^T V^T
        return (xs - (xs @ v) @ t.T @ v.T).to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y

    def _fold(self, weight: Tensor, transpose: bool) -> Tensor:
        h = householder_matrix(self.hra_u.detach().double(), self.apply_GS, transpose)
        w = weight.double()
        return (h.T @ w if self.transposed else w @ h).to(weight.dtype)

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self._fold(weight, False), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self._fold(weight, True), bias

    def extra_repr(self) -> str:
        return f"r={self.r}, apply_GS={self.apply_GS}"


class HRAConv2d(Adapter):
    """HRA on one ``nn.Conv2d`` (``groups=1``): the convolution runs with the kernel ``W H``, ``W`` viewed as
    ``(out, in * kh * kw)``, through a parameter substitution (stride, padding, dilation kept).

    Shapes: ``hra_u: (in * kh * kw, r)``; the layer maps ``(N, in, H, W) -> (N, out, H', W')``.
    """

    substitutes_params = True
    substitutes_bias = False  # the substitution replaces the kernel alone (see AdaptedLayer.check_partial_merge)
    merge_keeps_bias = True  # merging rotates the kernel alone (see AdaptedLayer.check_partial_merge)

    def __init__(self, flat_in: int, r: int, apply_gs: bool, init: bool) -> None:
        super().__init__()
        self.r, self.apply_GS = r, apply_gs
        self.hra_u = nn.Parameter(initial_vectors(flat_in, r, init))

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        w = params.get("weight", layer.base_layer.weight)
        v, t = reflection_factors(self.hra_u, self.apply_GS)
        flat = w.reshape(w.shape[0], -1).to(v.dtype)
        rotated = flat - (flat @ v) @ t @ v.T  # W H = W - (W V) T V^T
        return {**params, "weight": rotated.reshape(w.shape).to(w.dtype)}

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y

    def _fold(self, weight: Tensor, transpose: bool) -> Tensor:
        h = householder_matrix(self.hra_u.detach().double(), self.apply_GS, transpose)
        return (weight.double().reshape(weight.shape[0], -1) @ h).reshape(weight.shape).to(weight.dtype)

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self._fold(weight, False), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self._fold(weight, True), bias

    def extra_repr(self) -> str:
        return f"r={self.r}, apply_GS={self.apply_GS}"


def initial_vectors(d: int, r: int, init: bool) -> Tensor:
    """``hra_u: (d, r)``: with ``init`` (``r`` even) ``r / 2`` Kaiming-uniform columns each repeated twice in a row
    (``[a, a, b, b, ...]``: each pair of reflections cancels, ``H = I``), as peft; without, ``r`` Kaiming-uniform
    columns."""
    if not init:
        u = torch.empty(d, r)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        return u
    half = torch.empty(d, r // 2)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    return torch.repeat_interleave(half, 2, dim=1)


class HRATuner(WrapTuner):
    """Builds one HRA adapter per target: :class:`HRALinear` on ``nn.Linear``/``Conv1D``, :class:`HRAConv2d` on
    an ungrouped ``nn.Conv2d``."""

    method = "HRA"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*linear_types(), nn.Conv2d)

    def make_adapter(self, base: nn.Module, config: HRAConfig, module_name: str) -> Adapter:
        """The adapter for ``base``.

        Raises:
            ConfigError: a grouped ``Conv2d`` (peft refuses it too), or, with ``apply_GS``, ``r`` above the
                layer's input dimension (more orthonormal vectors than the space has directions).
        """
        layout = rp.layout_of(base)
        if isinstance(base, nn.Conv2d):
            check(base.groups == 1, f"{module_name}: HRA does not adapt a grouped Conv2d (groups={base.groups}); "
                                    "peft refuses it too. Leave it out of target_modules (or exclude_modules)")
        check(not config.apply_GS or config.r <= layout.flat_in,
              f"{module_name}: r={config.r} exceeds the layer's input dimension {layout.flat_in}; with apply_GS=True "
              "Gram-Schmidt cannot make more orthonormal vectors than that (give a smaller r, or leave the module out)")
        if isinstance(base, nn.Conv2d):
            return HRAConv2d(layout.flat_in, config.r, config.apply_GS, config.init_weights)
        return HRALinear(layout.in_features, config.r, config.apply_GS, config.init_weights, layout.transposed)


def hra_from_cli(args: Any) -> HRAConfig:
    """An :class:`HRAConfig` from ``peftkit train`` options ``args``: ``--r`` (default 8), ``--target-modules``
    (default ``"all-linear"``), ``--task-type``; ``apply_GS`` through ``--option``.

    Raises:
        ConfigError: invalid values (from the config's validation).
    """
    return HRAConfig(r=args.r or 8, target_modules=args.target_modules or "all-linear", task_type=args.task_type)


register_method(MethodSpec(
    name="hra", config_cls=HRAConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=HRA_PAPER, tuner=HRATuner(), cli_config=hra_from_cli, default_lr=None,
))
