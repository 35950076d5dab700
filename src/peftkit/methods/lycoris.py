"""What LoHa and LoKr share (the LyCORIS family): config fields, rank/module dropout, the tuner.

Both build a delta of the target layer's weight from small factors, scaled by ``alpha / r``, and add
``delta x`` to the base output; merging adds the delta to the weight, so they merge exactly. Field
names, defaults and parameter names are peft's (``peft.LoHaConfig``/``peft.LoKrConfig``), so files
move both ways. Supported layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (with ``groups``) as in
peft, and GPT-2 ``Conv1D`` (peftkit only; peft refuses it).

Reference: Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", 2023, arXiv:2309.14859.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import PeftConfig, check
from peftkit.layers import AdaptedLayer, Adapter, skipped, wide
from peftkit.methods import _reparam as rp
from peftkit.targeting import check_pattern_keys, linear_types, pattern_key
from peftkit.tuners import WrapTuner


@dataclass
class LycorisConfig(PeftConfig):
    """Fields shared by :class:`~peftkit.methods.loha.LoHaConfig` and :class:`~peftkit.methods.lokr.LoKrConfig`.

    Args:
        r: rank of the factors, integer > 0. Default 8.
        alpha: scaling numerator, ``scaling = alpha / r``; a number > 0. Default 8.
        rank_dropout: while training, drop each output row of the delta with this probability, in
            [0, 1). Default 0.
        module_dropout: while training, skip the whole adapter with this probability, in [0, 1). Default 0.
        use_effective_conv2d: for convolutions with a kernel larger than 1, factor the kernel with a
            small core tensor (FedPara's "Proposition 3"). Default False.
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``;
            None (default) takes the model type's usual targets, as peft (:data:`~peftkit.targeting.LORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        init_weights: True (the adapter starts as identity), False (all factors random: tests only).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        rank_pattern / alpha_pattern: per-module ``r`` / ``alpha`` keyed by a regex matched against the
            end of the module name.
        modules_to_save: modules trained in full and saved with the adapter.

    Raises:
        ConfigError: a non-positive ``r`` or ``alpha``, a dropout outside [0, 1), a bad pattern value,
            or ``target_modules=[]`` (None takes the model type's defaults).
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        rp.check_positive_int("r", self.r)
        check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
              f"alpha={self.alpha!r} is not valid; it must be a number > 0")
        rp.check_unit_interval("rank_dropout", self.rank_dropout)
        rp.check_unit_interval("module_dropout", self.module_dropout)
        check(isinstance(self.use_effective_conv2d, bool),
              f"use_effective_conv2d={self.use_effective_conv2d!r} must be True or False")
        rp.check_common(self)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        check_pattern_keys("rank_pattern", self.rank_pattern)
        check_pattern_keys("alpha_pattern", self.alpha_pattern)
        for key, value in self.rank_pattern.items():
            rp.check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check(isinstance(value, (int, float)) and value > 0, f"alpha_pattern[{key!r}]={value!r} must be > 0")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The ``(r, alpha)`` that apply to ``module_name`` after the patterns."""
        rk = pattern_key(module_name, self.rank_pattern)
        ak = pattern_key(module_name, self.alpha_pattern)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.alpha)


class LycorisAdapter(Adapter):
    """Base of the LoHa and LoKr adapters: scaling, dropouts and the generic forward.

    Subclasses give :meth:`delta` (the canonical delta, see :mod:`peftkit.methods._reparam`) and may
    override :meth:`side` to apply it to ``x`` without building it.

    Args:
        layout: the base layer's weight layout (:class:`~peftkit.methods._reparam.Layout`).
        r: the rank; alpha: the scaling numerator (``scaling = alpha / r``).
        config: the adapter's config, for ``rank_dropout`` and ``module_dropout``.
    """

    rescale_rank_dropout = True

    def __init__(self, layout: rp.Layout, r: int, alpha: float, config: LycorisConfig) -> None:
        super().__init__()
        self.layout, self.r, self.alpha, self.scaling = layout, r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout

    def delta(self, dtype: torch.dtype | None = None) -> Tensor:  # pragma: no cover - abstract
        """The canonical delta, scaled, built from the parameters cast to ``dtype`` (default: as they
        are); differentiable.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError

    def weights(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The adapter's parameters by name, cast to ``dtype`` when given (merging builds in float32)."""
        return {n: p if dtype is None else p.to(dtype) for n, p in self.named_parameters()}

    def side(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        """``delta x`` as the base layer would apply its weight (the delta is built here)."""
        return rp.apply_delta(layer.base_layer, self.layout, x, self.delta())

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        if rp.module_dropped(self, self.module_dropout):
            return skipped(self, y)
        dtype = next(self.parameters()).dtype
        out = self.side(layer, x.to(dtype))
        if self.training and self.rank_dropout > 0:
            keep = rp.rank_drop(self.layout.out_features, self.rank_dropout, self.rescale_rank_dropout, out.device)
            # a convolution's channels come before its len(kernel) spatial dims, batched or not
            out = out * keep.view(-1, *[1] * len(self.layout.kernel)) if self.layout.kind == "conv" else out * keep
        return y + out.to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        with torch.no_grad():
            return rp.to_base_layout(self.delta(wide(next(self.parameters())).dtype), self.layout)


class LycorisTuner(WrapTuner):
    """Builds one LoHa/LoKr adapter per target.

    Args:
        method: the method's display name in messages (``"LoHa"``).
        adapter_cls: its adapter, built as ``adapter_cls(layout, r, alpha, config)``.
    """

    def __init__(self, method: str, adapter_cls: type[LycorisAdapter]) -> None:
        self.method = method
        self.adapter_cls = adapter_cls

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*linear_types(), nn.Conv1d, nn.Conv2d)

    def make_adapter(self, base: nn.Module, config: Any, module_name: str) -> Adapter:
        """The method's adapter for the base layer's :class:`~peftkit.methods._reparam.Layout`, with the
        ``(r, alpha)`` that ``rank_pattern``/``alpha_pattern`` give ``module_name`` (``scaling = alpha / r``)."""
        r, alpha = config.rank_and_alpha(module_name)
        return self.adapter_cls(rp.layout_of(base), r, alpha, config)

    def config_from_cli(self, config_cls: type[LycorisConfig]) -> Any:
        """The ``cli_config`` of the method: ``config_cls`` from ``peftkit train`` options (``--r``,
        ``--lora-alpha`` as ``alpha``, ``--target-modules``; defaults ``r=8``, ``"all-linear"``); a
        ``--lora-dropout`` other than 0 is refused, as these methods drop ranks or whole modules instead.

        Raises:
            ConfigError: (when the returned function is called) ``--lora-dropout`` is not 0.
        """
        def from_cli(args: Any) -> LycorisConfig:
            check(args.lora_dropout == 0, f"--lora-dropout {args.lora_dropout} has no meaning for {self.method}; "
                                          "use --option rank_dropout=P or --option module_dropout=P")
            return config_cls(r=args.r or 8, alpha=args.lora_alpha,
                              target_modules=args.target_modules or "all-linear", task_type=args.task_type)
        return from_cli


def effective_conv(layout: rp.Layout, config: LycorisConfig) -> bool:
    """Whether the kernel gets its own core tensor: asked for in ``config`` (``use_effective_conv2d``), the
    ``layout`` is a convolution's, and its kernel is not all ones."""
    return config.use_effective_conv2d and layout.kind == "conv" and any(k != 1 for k in layout.kernel)


def core_kernel(layout: rp.Layout) -> tuple[int, ...]:
    """Kernel dims of a core tensor (peft's layout: a 1-d kernel ``k`` is stored as ``(k, 1)``)."""
    return layout.kernel if len(layout.kernel) > 1 else (layout.kernel[0], 1)


def rebuild_cp(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``sum_ij core[i, j, ...] left[i, p] right[j, q] -> (p, q, ...)``: a Tucker-2 rebuild of a
    conv kernel from ``core: (r, r, *k)``, ``left: (r, out)``, ``right: (r, in)``."""
    return torch.einsum("ij...,ip,jq->pq...", core, left, right)


def param(*shape: int) -> nn.Parameter:
    """An uninitialised parameter of ``shape``."""
    return nn.Parameter(torch.empty(*shape))
