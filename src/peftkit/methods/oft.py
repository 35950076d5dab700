"""OFT: orthogonal finetuning, a learned block-diagonal rotation of each adapted layer's input features.

Paper: Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", 2023, arXiv:2306.07280.
The parametrisation is peft 0.21's: a block size rather than a block count, and by default a truncated
Cayley-Neumann series instead of the exact Cayley transform.

Equation (row vectors, as peft writes it): ``h = (x R) W^T + b`` with ``R = diag(R_1, ..., R_r)`` block-diagonal,
each ``R_i = cayley(Q_i)`` of a skew-symmetric ``Q_i`` (``b x b``, ``b = oft_block_size``, ``r = in / b``
blocks). Merged: ``W' = W R^T``.
``Q_i`` is stored as its ``b (b - 1) / 2`` strictly-upper entries. Trainable parameters per adapted layer:
``r * b (b - 1) / 2`` (``b (b - 1) / 2`` with ``block_share``).

Field names, defaults, parameter names and the file layout (``oft_R.weight``, ``(r, b (b - 1) / 2)``, or
``(1, ...)`` with ``block_share``; ``oft_embedding_R.weight`` on an embedding) are peft's ``OFTConfig``, so
files move both ways. Layers: ``nn.Linear``, GPT-2 ``Conv1D`` (peftkit only), ``nn.Conv2d`` (whose input side is
``in_channels * kh * kw``; see :class:`OFTConvAdapter` for where peft's unmerged Conv2d forward differs) and
``nn.Embedding`` (its looked-up vectors are rotated).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peftkit._version import __version__
from peftkit.config import ConfigError, MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.methods import _reparam as rp
from peftkit.methods.lora import trainable_biases
from peftkit.targeting import LORA_TARGET_DEFAULTS, linear_types
from peftkit.tuners import WrapTuner

OFT_PAPER = "Controlling Text-to-Image Diffusion by Orthogonal Finetuning (Qiu et al., 2023, arXiv:2306.07280)"
BIAS_CHOICES = ("none", "all", "oft_only")
#: the first peft version whose OFT file format and Cayley-Neumann series peftkit's OFT equals
PEFT_FORMAT = "0.18.0"


@dataclass
class OFTConfig(PeftConfig):
    """Configuration of OFT (field names and defaults as ``peft.OFTConfig``).

    Args:
        r: number of rotation blocks per adapted layer; ``0`` (default) derives it from ``oft_block_size``.
        oft_block_size: size ``b`` of each square block, default 32; ``0`` derives it from ``r``. Exactly one of
            ``r`` and ``oft_block_size`` is non-zero (``r * oft_block_size = in_features``). When the value does
            not divide a layer's ``in_features`` the nearest divisor is used there, with a warning, as in peft.
        module_dropout: while training, this fraction of a layer's blocks (``int(p * r)``, chosen at random each
            step) is replaced by the identity; in [0, 1), default 0. No effect with ``block_share``. (peft 0.21
            builds this dropout but never applies it; the saved adapter is the same either way.)
        target_modules: module names/suffixes, a full-match regex or ``"all-linear"``; None (default) takes the
            model type's usual targets, as peft (:data:`~peftkit.targeting.LORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        fan_in_fan_out: kept for file compatibility; the weight layout is read from the module type.
        bias: ``"none"`` (default), ``"all"`` (train every bias of the model) or ``"oft_only"`` (train the biases
            of adapted layers); trained biases are saved with the adapter.
        init_weights: True (default) starts every ``Q`` at zero (``R = I``, the base model); False draws
            ``N(0, 0.1^2)`` (tests only).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        modules_to_save: modules trained in full and saved with the adapter.
        coft: constrained OFT: before each use, each ``Q_i`` whose Frobenius norm (of the full skew matrix)
            exceeds ``eps / sqrt(stored blocks)`` is scaled back to that norm, in place. Default False.
        eps: COFT's radius, a number > 0; default 6e-5.
        block_share: one rotation block shared by all blocks of a layer. Default False.
        use_cayley_neumann: build ``R`` from the truncated series ``I + 2 Q + 2 Q^2 + ... + Q^m`` (True,
            default; cheap, approximately orthogonal) instead of the exact Cayley transform
            ``(I - Q)(I + Q)^-1`` (False; a linear solve). The series approximates ``(I + Q)(I - Q)^-1``, the
            transpose of the exact form; both are peft's.
        num_cayley_neumann_terms: terms of that series, an integer >= 2, default 5: ``m = max(n - 1, 3)``, the
            terms ``Q .. Q^(m-1)`` weighted 2 (``n = 2`` gives ``I + 2 Q``), as peft computes it.

    Raises:
        ConfigError: both or neither of ``r`` and ``oft_block_size`` non-zero, a negative one, ``module_dropout``
            outside [0, 1), ``eps <= 0``, ``num_cayley_neumann_terms < 2``, an unknown ``bias``, non-boolean
            flags, ``layers_pattern`` without ``layers_to_transform``, ``target_modules=[]``; when injected, a
            grouped ``nn.Conv2d`` target.

    Paper: Controlling Text-to-Image Diffusion by Orthogonal Finetuning (Qiu et al., 2023, arXiv:2306.07280).
    """

    peft_type = "OFT"
    default_target_modules = LORA_TARGET_DEFAULTS
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        rp.check_positive_int("r", self.r, allow_zero=True)
        rp.check_positive_int("oft_block_size", self.oft_block_size, allow_zero=True)
        check(self.r != 0 or self.oft_block_size != 0,
              f"r={self.r} and oft_block_size={self.oft_block_size}: one of them must be non-zero (the blocks per "
              "layer, or their size)")
        check(self.r == 0 or self.oft_block_size == 0,
              f"r={self.r} and oft_block_size={self.oft_block_size}: give only one of them and set the other to 0, "
              "since r * oft_block_size = in_features (the default is oft_block_size=32; an adapter_config.json "
              "without oft_block_size comes from peft < 0.14, whose OFT format neither peft nor peftkit loads)")
        rp.check_unit_interval("module_dropout", self.module_dropout)
        check(isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool) and self.eps > 0,
              f"eps={self.eps!r} is not valid; it must be a number > 0 (COFT's radius)")
        check(isinstance(self.num_cayley_neumann_terms, int) and not isinstance(self.num_cayley_neumann_terms, bool)
              and self.num_cayley_neumann_terms >= 2,
              f"num_cayley_neumann_terms={self.num_cayley_neumann_terms!r} is not valid; it must be an integer >= 2 "
              "(1 would fix every rotation at the identity, so nothing would train)")
        check(self.bias in BIAS_CHOICES, f"bias={self.bias!r} is not valid; expected one of {BIAS_CHOICES}")
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            value = getattr(self, name)
            check(isinstance(value, bool), f"{name}={value!r} is not valid; expected True or False")
        check(not self.layers_pattern or self.layers_to_transform is not None,
              f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the block indices it locates), as "
              "in peft; give layers_to_transform too, or leave layers_pattern out")
        rp.check_common(self)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`PeftConfig.to_dict`, with ``peft_version`` ``"0.18.0+peftkit.<version>"``: peft parses it as a
        version when loading an OFT file (refusing ``"peftkit-..."``) and warns about a Cayley-Neumann adapter
        saved before 0.18.0, whose series it changed then; peftkit computes the series of 0.18 and later."""
        out = super().to_dict()
        out["peft_version"] = f"{PEFT_FORMAT}+peftkit.{__version__}"
        return out


def nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest to ``value`` (the lower one on a tie); ``n`` when ``value >= n``. peft's rule
    for an ``r`` or ``oft_block_size`` that does not divide a layer's ``in_features``."""
    if value >= n:
        return n
    higher = next(d for d in range(value, n + 1) if n % d == 0)
    lower = next(d for d in range(value, 0, -1) if n % d == 0)
    return lower if value - lower <= higher - value else higher


def skew(vec: Tensor, block_size: int) -> Tensor:
    """Skew-symmetric matrices from their strictly-upper entries (row-major, as ``torch.triu_indices``).

    Shapes: ``vec: (n, b (b - 1) / 2) -> (n, b, b)``.
    """
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], block_size, block_size)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def cayley(q: Tensor, neumann: bool, terms: int) -> Tensor:
    """The rotations of skew-symmetric ``q``: the exact Cayley transform ``(I - Q)(I + Q)^-1`` or, with
    ``neumann``, the series ``I + 2 Q + ... + 2 Q^(m-1) + Q^m``, ``m = max(terms - 1, 3)`` (``I + 2 Q`` for
    ``terms = 2``), as peft computes them.

    The exact transform is solved in at least float32 (as peft, whose float32 identity promotes a 16-bit ``q``;
    the CPU has no 16-bit LU) and returned in ``q``'s dtype.

    Shapes: ``q: (n, b, b) -> (n, b, b)``.
    """
    if not neumann:
        work = q.to(torch.promote_types(q.dtype, torch.float32))
        eye = torch.eye(q.shape[-1], dtype=work.dtype, device=q.device).expand_as(work)
        return torch.linalg.solve(eye + work, eye - work, left=False).to(q.dtype)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    out = eye + 2 * q
    if terms == 2:
        return out
    power = q
    for _ in range(2, max(terms - 1, 3)):
        power = power @ q
        out = out + 2 * power
    return out + power @ q


def coft_project(vec: Tensor, block_size: int, eps: float) -> Tensor:
    """COFT's projection: each block's skew matrix with Frobenius norm above ``eps / sqrt(n)`` scaled to that
    norm (``n`` = the number of stored blocks); the others unchanged.

    Shapes: ``vec: (n, b (b - 1) / 2) -> (n, b (b - 1) / 2)``.
    """
    radius = eps / vec.shape[0] ** 0.5
    norm = skew(vec, block_size).flatten(1).norm(dim=1, keepdim=True)  # = sqrt(2) * |vec|
    return torch.where(norm <= radius, vec, vec * (radius / norm))


class OFTRotation(nn.Module):
    """The trainable part of one OFT adapter (peft's ``OFTRotationModule``): ``weight`` holds the strictly-upper
    entries of each block's skew-symmetric ``Q``.

    Args:
        blocks: stored blocks (``r``, or 1 with ``block_share``); block_size: ``b``.

    Shapes: ``weight: (blocks, b (b - 1) / 2)``.
    """

    def __init__(self, blocks: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2))

    def extra_repr(self) -> str:
        return f"blocks={self.weight.shape[0]}, block_size={self.block_size}"


class OFTAdapter(Adapter):
    """OFT on a linear layer: the input's features, in ``r`` consecutive groups of ``b``, are each rotated by
    their block ``R_i`` before the base layer sees them (``x_i <- x_i R_i``, row vectors, as peft).

    Args:
        in_features: the layer's input features (``r * b``); r: blocks; block_size: ``b``.
        config: the adapter's :class:`OFTConfig` (``block_share``, ``coft``, ``eps``, the Cayley options,
            ``module_dropout``, ``init_weights``).
        transposed: the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``).

    Shapes: ``x: (..., in)``; ``oft_R.weight: (r, b (b - 1) / 2)`` or ``(1, ...)`` with ``block_share``.
    Merging multiplies the base weight by ``R^T`` on its input side (``W' = W R^T`` for ``(out, in)``, in peft's
    row-vector convention); unmerging by the inverse (the Cayley-Neumann ``R`` is only nearly orthogonal).
    """

    transforms_input = True
    merge_keeps_bias = True  # merging rotates the weight alone (see AdaptedLayer.check_partial_merge)
    #: the attribute holding the :class:`OFTRotation` (peft's name, so the file key: ``oft_R.weight``)
    rotation_name = "oft_R"

    def __init__(self, in_features: int, r: int, block_size: int, config: OFTConfig, transposed: bool) -> None:
        super().__init__()
        self.in_features, self.r, self.block_size, self.transposed = in_features, r, block_size, transposed
        self.block_share, self.coft, self.eps = config.block_share, config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.module_dropout = config.module_dropout
        setattr(self, self.rotation_name, OFTRotation(1 if config.block_share else r, block_size))
        if not config.init_weights:
            nn.init.normal_(self.rotation.weight, mean=0.0, std=0.1)

    @property
    def rotation(self) -> OFTRotation:
        """The :class:`OFTRotation` holding this adapter's parameter (``oft_R``, or ``oft_embedding_R``)."""
        return getattr(self, self.rotation_name)

    def rotations(self, dtype: torch.dtype | None = None, project: bool = True) -> Tensor:
        """The ``r`` rotation blocks built from ``oft_R.weight`` (cast to ``dtype`` when given); with ``coft`` and
        ``project`` the stored weight is first projected in place (as peft, before every use).

        Shapes: ``(r, b, b)`` (one block repeated ``r`` times with ``block_share``).
        """
        w = self.rotation.weight
        if self.coft:
            with torch.no_grad():
                projected = coft_project(w, self.block_size, self.eps)
                if project:
                    w.copy_(projected)
            if not project:
                w = projected
        w = w if dtype is None else w.to(dtype)
        blocks = cayley(skew(w, self.block_size), self.neumann, self.terms)
        return blocks.expand(self.r, -1, -1) if self.block_share else blocks

    def training_rotations(self) -> Tensor:
        """:meth:`rotations`, with ``module_dropout``'s share of blocks set to the identity while training.

        Shapes: ``(r, b, b)``.
        """
        rot = self.rotations()
        if self.training and self.module_dropout > 0 and not self.block_share:
            dropped = torch.randperm(self.r, device=rot.device)[: int(self.module_dropout * self.r)]
            keep = torch.ones(self.r, 1, 1, dtype=rot.dtype, device=rot.device)
            keep[dropped] = 0
            eye = torch.eye(self.block_size, dtype=rot.dtype, device=rot.device)
            rot = keep * rot + (1 - keep) * eye
        return rot

    def transform_input(self, x: Tensor) -> Tensor:
        dtype = self.rotation.weight.dtype
        xs = x.to(dtype).reshape(*x.shape[:-1], self.r, self.block_size)
        return torch.einsum("...rk,rkc->...rc", xs, self.training_rotations()).reshape(x.shape).to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y

    def _blocks64(self, inverse: bool) -> Tensor:
        with torch.no_grad():
            rot = self.rotations(torch.float64, project=False)
            return torch.linalg.inv(rot) if inverse else rot

    def merge_problem(self) -> str | None:
        rot = self._blocks64(inverse=False)
        cond = torch.linalg.cond(rot)
        if not bool(torch.isfinite(cond).all()) or float(cond.max()) > 1e8:
            return (f"{self.rotation_name} has a rotation block with condition number {float(cond.max()):.3g}; merging it could not "
                    "be undone")
        return None

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return rotate_weight(weight, self._blocks64(inverse=False), self.transposed, torch.float64), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return rotate_weight(weight, self._blocks64(inverse=True), self.transposed, torch.float64), bias

    def extra_repr(self) -> str:
        return f"r={self.r}, oft_block_size={self.block_size}, block_share={self.block_share}"


def rotate_weight(weight: Tensor, blocks: Tensor, transposed: bool, dtype: torch.dtype) -> Tensor:
    """``weight`` (base layout) with its input side multiplied block by block, ``W[:, i] <- W[:, i] B_i^T``,
    computed in ``dtype`` and returned in the weight's; differentiable.

    Shapes: ``weight``: ``(out, in)`` (Linear), ``(in, out)`` (GPT-2 ``Conv1D``, ``transposed``) or
    ``(out, C, kh, kw)`` (Conv2d; its input side is ``C * kh * kw``); ``blocks: (r, b, b)`` with ``r * b`` that
    input side.
    """
    r, b = blocks.shape[0], blocks.shape[-1]
    w, blocks = weight.to(dtype), blocks.to(dtype)
    if transposed:  # (in, out): W'[i] = B_i W[i]
        out = torch.einsum("ikc,ico->iko", blocks, w.reshape(r, b, -1))
    else:  # (out, in...)
        out = torch.einsum("oic,ikc->oik", w.reshape(-1, r, b), blocks)
    return out.reshape(weight.shape).to(weight.dtype)


class OFTConvAdapter(OFTAdapter):
    """OFT on an ``nn.Conv2d``: every receptive field (``C * kh * kw`` values, flattened as the weight's
    ``(C, kh, kw)``) is rotated block by block, which is the convolution with the rotated kernel
    ``W' = W R^T`` (weight ``(out, C * kh * kw)``); the forward runs the base convolution with ``W'``
    (``substitute_params``), and merging writes ``W'``. peft's unmerged Conv2d forward folds the rotated patches
    back by summing overlaps, which for a kernel larger than 1x1 is not ``W'`` (its output is not even the base
    model's at the identity); peftkit's output equals peft's *merged* one for every kernel and its unmerged one
    for 1x1 kernels. The file layout is peft's.

    Shapes: ``oft_R.weight: (r, b (b - 1) / 2)``, ``r * b = C * kh * kw``.
    """

    transforms_input = False
    substitutes_params = True
    substitutes_bias = False

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        weight = params["weight"] if "weight" in params else layer.base_layer._parameters["weight"]
        params["weight"] = rotate_weight(weight, self.training_rotations(), False, self.rotation.weight.dtype)
        return params


class OFTEmbeddingAdapter(OFTAdapter):
    """OFT on an ``nn.Embedding``, as peft: each looked-up vector is rotated block by block after the lookup
    (``e_i <- e_i R_i``, row vectors); merged, the table becomes ``E R`` (``(num_embeddings, dim) @ R``).

    Shapes: ``y: (..., dim)``; ``oft_embedding_R.weight: (r, b (b - 1) / 2)``, ``r * b = dim``.
    """

    transforms_input = False
    reads_input = False
    rotation_name = "oft_embedding_R"

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        dtype = self.rotation.weight.dtype
        ys = y.to(dtype).reshape(*y.shape[:-1], self.r, self.block_size)
        return torch.einsum("...rk,rkc->...rc", ys, self.training_rotations()).reshape(y.shape).to(y.dtype)

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # E R is (R^T E^T)^T: the transposed layout's rule with the transposed blocks
        return rotate_weight(weight.T, self._blocks64(inverse=False).transpose(-1, -2), True, torch.float64).T, bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return rotate_weight(weight.T, self._blocks64(inverse=True).transpose(-1, -2), True, torch.float64).T, bias


class OFTTuner(WrapTuner):
    """Builds one :class:`OFTAdapter` per target (``nn.Linear``, GPT-2 ``Conv1D``; :class:`OFTConvAdapter` on
    ``nn.Conv2d``, :class:`OFTEmbeddingAdapter` on ``nn.Embedding``)."""

    method = "OFT"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*linear_types(), nn.Conv2d, nn.Embedding)

    def make_adapter(self, base: nn.Module, config: OFTConfig, module_name: str) -> Adapter:
        """An :class:`OFTAdapter` over the layer's input features (an :class:`OFTConvAdapter` over a Conv2d's
        ``in_channels * kh * kw``, an :class:`OFTEmbeddingAdapter` over an embedding's ``embedding_dim``), with
        ``r``/``oft_block_size`` moved to the nearest divisor of that width (warning) when they do not divide it,
        as peft.

        Raises:
            ConfigError: the target is an ``nn.Conv2d`` with ``groups > 1``.
        """
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"{module_name}: OFT cannot adapt an nn.Conv2d with groups={base.groups} (nor can peft); "
                              "only groups=1; leave it out of target_modules (or add it to exclude_modules)")
        n = base.embedding_dim if isinstance(base, nn.Embedding) else rp.layout_of(base).flat_in
        if config.r == 0:
            size = nearest_divisor(n, config.oft_block_size)
            if size != config.oft_block_size:
                warnings.warn(f"{module_name}: oft_block_size={config.oft_block_size} does not divide in_features={n}; "
                              f"using {size}, the nearest divisor (as peft)", stacklevel=4)
            r = n // size
        else:
            r = nearest_divisor(n, config.r)
            if r != config.r:
                warnings.warn(f"{module_name}: r={config.r} does not divide in_features={n}; using {r}, the nearest "
                              "divisor (as peft)", stacklevel=4)
            size = n // r
        if isinstance(base, nn.Embedding):
            return OFTEmbeddingAdapter(n, r, size, config, False)
        if isinstance(base, nn.Conv2d):
            return OFTConvAdapter(n, r, size, config, False)
        return OFTAdapter(n, r, size, config, not isinstance(base, nn.Linear))

    def trainable_base_params(self, model: nn.Module, config: OFTConfig, targets: list[str]) -> list[str]:
        return trainable_biases(model, config.bias, targets)


def oft_from_cli(args: Any) -> OFTConfig:
    """Build an :class:`OFTConfig` from ``peftkit train`` options: ``--r`` sets the blocks per layer (then
    ``oft_block_size=0``); without it ``oft_block_size=32`` (peft's default; ``--option oft_block_size=B``, or
    ``--option r=R`` which also sets ``oft_block_size`` to 0). ``--target-modules`` (default: the model type's
    usual targets). A ``--lora-dropout`` other than 0 is refused (OFT drops blocks: ``--option module_dropout=P``).

    Raises:
        ConfigError: ``--lora-dropout`` is not 0.
    """
    check(args.lora_dropout == 0, f"--lora-dropout {args.lora_dropout} has no meaning for OFT; use "
                                  "--option module_dropout=P (the fraction of rotation blocks set to the identity)")
    options = getattr(args, "method_options", {}) or {}
    by_blocks = bool(args.r) or ("r" in options and "oft_block_size" not in options)
    r = (args.r or options["r"]) if by_blocks else 0
    return OFTConfig(r=r, oft_block_size=0 if by_blocks else 32, target_modules=args.target_modules,
                     task_type=args.task_type)


register_method(MethodSpec(
    name="oft", config_cls=OFTConfig, family="reparameterised", kind="wrap", mergeable=True, paper=OFT_PAPER,
    tuner=OFTTuner(), cli_config=oft_from_cli,
))
