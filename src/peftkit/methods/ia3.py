"""(IA)^3: learned vectors that rescale keys, values and the feed-forward activations.

Paper: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", 2022, arXiv:2205.05638.

Equation: on an attention projection ``y = l (.) (W x + b)``; on a feed-forward down projection
``y = W (l (.) x) + b``. Both fold into ``W`` exactly: ``W' = diag(l) W, b' = l (.) b`` or
``W' = W diag(l)``. Trainable parameters: ``out`` per attention target, ``in`` per feed-forward
target. Field names, defaults and the file layout (``ia3_l``, shape ``(out, 1)`` or ``(1, in)``; on an
``nn.Conv1d/2d/3d`` ``(1, out_channels, 1, ...)`` or ``(1, in_channels, 1, ...)``, one 1 per spatial
dimension) are peft's, so adapters move both ways. On a convolution the vector scales channels: the
output's, or the input's before the convolution (exactly foldable, since zero, reflected or replicated
padding of a scaled channel is the scaled padding); a grouped convolution's input scale folds into each
group's own input channels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods.adapters import model_type
from peftkit.targeting import UnmatchedTargetWarning, check_target_fields, linear_types, matches
from peftkit.tuners import WrapTuner

IA3_PAPER = ("Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning "
             "(Liu et al., 2022, arXiv:2205.05638)")

# (target_modules, feedforward_modules) by config.model_type, as peft chooses them.
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(("bert", "roberta"), (["key", "value", "output.dense"], ["output.dense"])),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])),
    **dict.fromkeys(("llama", "mistral"), (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    **dict.fromkeys(("llama4", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
                    (["q_proj", "v_proj", "down_proj"], ["down_proj"])),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    **dict.fromkeys(("gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"),
                    (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
}


@dataclass
class IA3Config(PeftConfig):
    """Configuration of (IA)^3 (field names and defaults as ``peft.IA3Config``).

    Args:
        target_modules: names/suffixes, a full-match regex or ``"all-linear"``; None takes peft's
            choice for the model's ``config.model_type`` (:data:`IA3_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        feedforward_modules: the targets whose *input* is rescaled (``l: (1, in)``); the others rescale
            their output (``l: (out, 1)``). None takes peft's choice for the model type.
        fan_in_fan_out: kept for file compatibility; the weight layout is read from the module type.
        modules_to_save: modules trained in full and saved with the adapter.
        init_ia3_weights: True (default) starts every vector at 1 (the identity); False draws N(0, 1)
            (for tests only).

    Raises:
        ConfigError: ``feedforward_modules`` is not a subset of ``target_modules`` (both lists), a
            non-boolean flag, or (when injected) a model type with no default and no explicit lists.

    Paper: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning (Liu et al., 2022,
        arXiv:2205.05638).
    """

    peft_type = "IA3"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        check_target_fields(self)
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        check(isinstance(self.init_ia3_weights, bool),
              f"init_ia3_weights={self.init_ia3_weights!r} is not valid; expected True or False")
        check(isinstance(self.fan_in_fan_out, bool), f"fan_in_fan_out={self.fan_in_fan_out!r} must be True or False")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            check(not extra, f"feedforward_modules={self.feedforward_modules!r} is not valid: {extra} are not in "
                             f"target_modules={self.target_modules!r} (feedforward modules must be targets too)")


def _vector(features: int, spatial: int | None, init: bool, linear_shape: tuple[int, int]) -> nn.Parameter:
    """``ia3_l``: ones (or Gaussian without ``init``) of ``linear_shape`` on a linear layer, ``(1, features, 1,
    ...)`` with ``spatial`` ones on a convolution."""
    shape = linear_shape if spatial is None else (1, features) + (1,) * spatial
    return nn.Parameter(torch.ones(shape) if init else torch.randn(shape))


def _channels(lv: Tensor, spatial: int | None) -> Tensor:
    """The vector shaped to scale a layer's channels: ``(C,)`` on a linear layer's last dimension,
    ``(C, 1, ...)`` on a convolution's channel dimension (batched ``(N, C, ...)`` or not, ``(C, ...)``)."""
    return lv.flatten() if spatial is None else lv.reshape(-1, *(1,) * spatial)


class IA3Output(Adapter):
    """(IA)^3 on an attention projection: ``y <- l (.) y``.

    Shapes: ``ia3_l: (out, 1)``; the layer maps ``(..., in) -> (..., out)``. On a convolution
    (``spatial`` = its number of spatial dimensions) ``ia3_l: (1, out_channels, 1, ...)`` scales the output
    channels of ``(N, out_channels, ...)``.
    """

    def __init__(self, out_features: int, transposed: bool, init: bool, spatial: int | None = None) -> None:
        super().__init__()
        self.transposed, self.spatial = transposed, spatial
        self.ia3_l = _vector(out_features, spatial, init, (out_features, 1))

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y * _channels(self.ia3_l, self.spatial).to(y.dtype)

    def _scale(self, undo: bool = False) -> Tensor:
        lv = wide(self.ia3_l.detach())
        if undo:  # dividing by a zero entry: the merge cannot be undone (merge_adapter refuses it up front)
            check_nonzero(lv)
        if self.spatial is not None:  # convolution weight (out, in / groups, *kernel)
            return lv.reshape(-1, *(1,) * (self.spatial + 1))
        return lv.T if self.transposed else lv  # Linear weight (out, in); Conv1D weight (in, out)

    def merge_problem(self) -> str | None:
        return zero_scale_problem("ia3_l", self.ia3_l)

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        lv = self._scale()
        return weight * lv, None if bias is None else bias * lv.flatten()

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        lv = self._scale(undo=True)
        return weight / lv, None if bias is None else bias / lv.flatten()


class IA3Input(Adapter):
    """(IA)^3 on a feed-forward down projection: ``y = W (l (.) x) + b``.

    Shapes: ``ia3_l: (1, in)``. On a convolution (``spatial`` = its number of spatial dimensions, ``groups``
    its groups) ``ia3_l: (1, in_channels, 1, ...)`` scales the input channels of ``(N, in_channels, ...)``.
    """

    transforms_input = True

    def __init__(self, in_features: int, transposed: bool, init: bool, spatial: int | None = None,
                 groups: int = 1) -> None:
        super().__init__()
        self.transposed, self.spatial, self.groups = transposed, spatial, groups
        self.ia3_l = _vector(in_features, spatial, init, (1, in_features))

    def transform_input(self, x: Tensor) -> Tensor:
        return x * _channels(self.ia3_l, self.spatial).to(x.dtype)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y

    def _scale(self, undo: bool = False, out_channels: int = 0) -> Tensor:
        lv = wide(self.ia3_l.detach())
        if undo:  # dividing by a zero entry: the merge cannot be undone (merge_adapter refuses it up front)
            check_nonzero(lv)
        if self.spatial is not None:  # convolution weight (out, in / groups, *kernel): group g reads inputs g
            per_group = lv.numel() // self.groups
            lv = lv.reshape(self.groups, 1, per_group).expand(self.groups, out_channels // self.groups, per_group)
            return lv.reshape(out_channels, per_group, *(1,) * self.spatial)
        return lv.T if self.transposed else lv

    def merge_problem(self) -> str | None:
        return zero_scale_problem("ia3_l", self.ia3_l)

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight * self._scale(out_channels=weight.shape[0]), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight / self._scale(undo=True, out_channels=weight.shape[0]), bias


def check_nonzero(scale: Tensor) -> None:
    """Check that the rescaling vector ``scale`` (any shape) has no zero entry (its merge could not be undone).

    Raises:
        ValueError: ``scale`` has a zero entry; the message says how many.
    """
    problem = zero_scale_problem("scale", scale)
    if problem:
        raise ValueError(f"an (IA)^3/SSF {problem}")


def zero_scale_problem(name: str, scale: Tensor) -> str | None:
    """``"<name> has a zero entry ..."`` when the rescaling vector ``scale`` has one, else None."""
    zeros = int((scale.detach() == 0).sum())
    if zeros:
        return f"{name} has {zeros} zero entr{'y' if zeros == 1 else 'ies'}; merging it could not be undone"
    return None


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class IA3Tuner(WrapTuner):
    """Builds one (IA)^3 vector per target; resolves peft's default modules by model type."""

    method = "(IA)^3"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*linear_types(), *_CONVS)

    def inject(self, host: Any, config: IA3Config, adapter_name: str) -> None:
        """As :meth:`WrapTuner.inject`, after filling in peft's default ``target_modules`` and
        ``feedforward_modules`` for the model type (written into ``config``; restored on failure). Given
        ``feedforward_modules`` entries that match no adapted module only warn
        (:class:`~peftkit.targeting.UnmatchedTargetWarning`).

        Raises:
            ConfigError: ``target_modules`` is None and the model type has no defaults, or as
                :meth:`WrapTuner.inject`.
        """
        kind = model_type(host.model)
        given = config.target_modules, config.feedforward_modules
        if config.target_modules is None:
            check(kind in IA3_DEFAULTS, f"IA3Config: no default target_modules for model_type={kind!r} (known: "
                                        f"{sorted(IA3_DEFAULTS)}); give target_modules and feedforward_modules")
            config.target_modules = list(IA3_DEFAULTS[kind][0])
        if given[1] is not None and config.target_modules is not None:
            self._check_feedforward(host, config)
        if config.feedforward_modules is None:
            defaults = list(IA3_DEFAULTS[kind][1]) if kind in IA3_DEFAULTS else []
            if isinstance(given[0], list):  # only the defaults the user's own targets include (a subset, as saved)
                defaults = [m for m in defaults if m in given[0]]
            config.feedforward_modules = defaults
        try:
            super().inject(host, config, adapter_name)
        except BaseException:
            config.target_modules, config.feedforward_modules = given
            raise

    def _check_feedforward(self, host: Any, config: IA3Config) -> None:
        """Warn (:class:`~peftkit.targeting.UnmatchedTargetWarning`) about ``feedforward_modules`` entries (or
        its regex) that match none of the modules the config adapts: they would change nothing."""
        found = self.find(host, config)
        ff = config.feedforward_modules
        entries = [ff] if isinstance(ff, str) else list(ff)
        unmatched = [e for e in entries if not any(matches(name, e if isinstance(ff, str) else [e]) for name in found)]
        if unmatched:
            warnings.warn(UnmatchedTargetWarning(
                f"feedforward_modules {unmatched} match none of the {len(found)} adapted module(s) (not in "
                f"target_modules={config.target_modules!r}?), so they change nothing"), stacklevel=4)

    def make_adapter(self, base: nn.Module, config: IA3Config, module_name: str) -> Adapter:
        """:class:`IA3Input` (``ia3_l: (1, in)``) when ``module_name`` matches ``feedforward_modules``, else
        :class:`IA3Output` (``ia3_l: (out, 1)``); on a convolution ``(1, channels, 1, ...)``."""
        ff = matches(module_name, config.feedforward_modules)
        if isinstance(base, _CONVS):
            spatial = base.weight.dim() - 2
            if ff:
                return IA3Input(base.in_channels, False, config.init_ia3_weights, spatial, base.groups)
            return IA3Output(base.out_channels, False, config.init_ia3_weights, spatial)
        transposed = not isinstance(base, nn.Linear)
        in_f, out_f = base.weight.shape[::-1] if not transposed else base.weight.shape
        if ff:
            return IA3Input(in_f, transposed, config.init_ia3_weights)
        return IA3Output(out_f, transposed, config.init_ia3_weights)


def ia3_from_cli(args: Any) -> IA3Config:
    """Build an :class:`IA3Config` from ``peftkit train`` options (default targets by model type)."""
    return IA3Config(target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="ia3", config_cls=IA3Config, family="additive", kind="wrap", mergeable=True, paper=IA3_PAPER,
    tuner=IA3Tuner(), cli_config=ia3_from_cli, default_lr=5e-3,
))
