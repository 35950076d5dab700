"""LoRA: low-rank adaptation of Linear, GPT-2 Conv1D, Conv1d/2d/3d and Embedding layers.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685.
rsLoRA scaling: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
2023, arXiv:2312.03732.

Equation: ``h = W0 x + (alpha / r) * B A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)``; rsLoRA
uses ``alpha / sqrt(r)``. Trainable parameters per adapted ``(out, in)`` layer: ``r * (in + out)``
(plus ``out`` with ``lora_bias``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.ops import Dropout
from peftkit.targeting import linear_types, pattern_key
from peftkit.tuners import WrapTuner

LORA_PAPER = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685)"
INIT_CHOICES = (True, False, "gaussian", "loftq")


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of LoRA (field names and defaults as ``peft.LoraConfig``).

    Args:
        r: rank of the update, > 0. Default 8.
        target_modules: list of module names/suffixes, a full-match regex, or ``"all-linear"``.
        exclude_modules: names/suffixes or regex never adapted.
        lora_alpha: scaling numerator (``scaling = lora_alpha / r``), > 0. Default 8.
        lora_dropout: dropout probability on the adapter's input, in [0, 1). Default 0.
        fan_in_fan_out: True when the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``). peftkit
            reads the layout from the module type; the flag is kept for file compatibility.
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (train the
            biases of adapted layers). Trained biases are saved with the adapter.
        use_rslora: scale by ``lora_alpha / sqrt(r)`` instead.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``["classifier"]``).
        init_lora_weights: True (A Kaiming-uniform, B zero: the adapter starts as identity),
            ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``"loftq"`` (LoftQ: quantised base + SVD start,
            see :mod:`peftkit.quant.loftq`), or False (both random: for tests only).
        loftq_config: LoftQ options (a ``LoftQConfig`` or dict; stored as a dict).
        use_qalora / qalora_group_size: QA-LoRA, input pooled over groups of this many columns (see
            :mod:`peftkit.quant.qalora`). Default False / 16.
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        rank_pattern / alpha_pattern: per-module ``r`` / ``lora_alpha`` overrides keyed by a regex
            matched against the end of the module name.
        lora_bias: give ``lora_B`` a trainable bias (merged into the base bias).

    Raises:
        ConfigError: ``r <= 0``, ``lora_alpha <= 0``, dropout outside [0, 1), an unknown ``bias`` or
            ``init_lora_weights``, a non-positive pattern rank, or a missing ``target_modules``.
    """

    peft_type = "LORA"
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    loftq_config: dict[str, Any] = field(default_factory=dict)
    use_qalora: bool = False
    qalora_group_size: int = 16

    def validate(self) -> None:
        check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
              f"r={self.r!r} is not valid; the rank must be an integer > 0")
        check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
              f"lora_alpha={self.lora_alpha!r} is not valid; it must be a number > 0")
        check(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
              f"lora_dropout={self.lora_dropout!r} is not valid; it must lie in [0, 1)")
        check(self.bias in ("none", "all", "lora_only"),
              f"bias={self.bias!r} is not valid; expected 'none', 'all' or 'lora_only'")
        check(self.init_lora_weights in INIT_CHOICES,
              f"init_lora_weights={self.init_lora_weights!r} is not valid; expected one of {INIT_CHOICES}")
        check(self.target_modules is not None and self.target_modules != [],
              "target_modules is required: a list of module names/suffixes, a regex, or 'all-linear'")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        for key, value in self.rank_pattern.items():
            check(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}]={value!r} must be an integer > 0")
        for key, value in self.alpha_pattern.items():
            check(isinstance(value, (int, float)) and value > 0, f"alpha_pattern[{key!r}]={value!r} must be > 0")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            check(all(isinstance(i, int) and i >= 0 for i in layers),
                  f"layers_to_transform={self.layers_to_transform!r} must be a block index >= 0 or a list of them")
        from peftkit.quant.loftq import validate_lora_options

        validate_lora_options(self)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The ``(r, lora_alpha)`` that apply to ``module_name`` after the patterns."""
        rk = pattern_key(module_name, self.rank_pattern)
        ak = pattern_key(module_name, self.alpha_pattern)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.lora_alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _dropout(p: float) -> nn.Module:
    return Dropout(p) if p > 0 else nn.Identity()


def _fresh_output(layer: AdaptedLayer) -> bool:
    """Whether the base layer's output may be updated in place: true for ``nn.Linear`` and GPT-2
    ``Conv1D``, whose backward does not read their output."""
    return type(layer.base_layer) in _INPLACE_SAFE


_INPLACE_SAFE = set(linear_types())


class LoraLinear(Adapter):
    """LoRA on ``nn.Linear`` or GPT-2 ``Conv1D``.

    Shapes: ``x: (..., in_features) -> (..., out_features)``; ``lora_A.weight: (r, in)``,
    ``lora_B.weight: (out, r)``. ``delta_weight`` is ``scaling * B @ A`` shaped like the base weight
    (transposed to ``(in, out)`` for ``Conv1D``).
    """

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 lora_bias: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.r, self.scaling, self.transposed = r, scaling, transposed
        self.lora_dropout = _dropout(dropout)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias)

    def reset(self, init: bool | str) -> None:
        """Initialise A and B (see :class:`LoraConfig` ``init_lora_weights``)."""
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a, b = self.lora_A.weight, self.lora_B
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        z = F.linear(self.lora_dropout(x), a)
        if b.bias is None and y.dtype == z.dtype and y.is_contiguous() and _fresh_output(layer):
            # one GEMM accumulating s * z @ B^T into the base output: no extra pass over y
            y.view(-1, y.shape[-1]).addmm_(z.view(-1, self.r), b.weight.T, alpha=self.scaling)
            return y
        return torch.add(y, b(z).to(y.dtype), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if self.transposed else delta

    def delta_bias(self, layer: AdaptedLayer) -> Tensor | None:
        b = self.lora_B.bias
        return None if b is None else b.detach().float() * self.scaling


class LoraEmbedding(Adapter):
    """LoRA on ``nn.Embedding``.

    Shapes: ``x: (...)`` integer ids ``-> (..., embedding_dim)``; ``lora_embedding_A: (r, num_embeddings)``,
    ``lora_embedding_B: (embedding_dim, r)``; ``delta_weight = scaling * (B @ A).T``, ``(num, dim)``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_dropout = _dropout(dropout)  # kept for config parity; ids cannot be dropped out
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r))

    def reset(self, init: bool | str) -> None:
        """Initialise as HF PEFT does: A zero and B normal, so the adapter starts as identity."""
        if init is False:
            nn.init.normal_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            return
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        base = layer.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        return torch.add(y, (after_a @ self.lora_embedding_B.T).to(y.dtype), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling


class LoraConv(Adapter):
    """LoRA on ``nn.Conv1d/2d/3d``, including grouped convolutions.

    ``lora_A`` is a convolution with the base kernel, stride, padding, dilation and ``groups``
    (``in -> r``); ``lora_B`` a 1x1 convolution ``r -> out`` with the same ``groups``. Because both
    are grouped like the base, ``B(A(x))`` is itself a grouped convolution and merges exactly (HF
    PEFT uses an ungrouped ``A`` there and cannot merge). Requires ``r % groups == 0``.

    Shapes: ``lora_A.weight: (r, in/groups, *k)``, ``lora_B.weight: (out, r/groups, 1, ...)``;
    ``delta_weight: (out, in/groups, *k)``.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, lora_bias: bool = False) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        conv = type(base)
        g = base.groups
        self.lora_dropout = _dropout(dropout)
        self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                           groups=g, bias=False, padding_mode=base.padding_mode)
        self.lora_B = conv(r, base.out_channels, 1, 1, groups=g, bias=lora_bias)

    reset = LoraLinear.reset

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a = self.lora_A.weight
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        return torch.add(y, self.lora_B(self.lora_A(self.lora_dropout(x))).to(y.dtype), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        g = self.lora_A.groups
        out = b.shape[0]
        per_group = torch.bmm(b.reshape(g, out // g, self.r // g), a.reshape(g, self.r // g, -1))
        return per_group.reshape(out, *a.shape[1:]) * self.scaling

    delta_bias = LoraLinear.delta_bias


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoraTuner(WrapTuner):
    """Builds one LoRA adapter for one target module."""

    method = "LoRA"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*linear_types(), nn.Embedding, *CONV_TYPES)

    def make_adapter(self, base: nn.Module, config: LoraConfig, module_name: str) -> Adapter:
        r, alpha = config.rank_and_alpha(module_name)
        scaling = config.scaling_for(r, alpha)
        if config.use_qalora:
            from peftkit.quant.qalora import make_qalora_adapter

            adapter: Any = make_qalora_adapter(base, config, module_name, r, scaling)
        elif isinstance(base, nn.Embedding):
            adapter = LoraEmbedding(base.num_embeddings, base.embedding_dim, r, scaling, config.lora_dropout)
        elif isinstance(base, CONV_TYPES):
            check(r % base.groups == 0,
                  f"{module_name}: r={r} must be divisible by the convolution's groups={base.groups}")
            adapter = LoraConv(base, r, scaling, config.lora_dropout, config.lora_bias)
        else:
            transposed = not isinstance(base, nn.Linear)
            in_f, out_f = base.weight.shape[::-1] if not transposed else base.weight.shape
            adapter = LoraLinear(in_f, out_f, r, scaling, config.lora_dropout, config.lora_bias, transposed)
        if config.init_lora_weights == "loftq":
            from peftkit.quant.loftq import loftq_init

            loftq_init(adapter, base, config, module_name)
        else:
            adapter.reset(config.init_lora_weights)
        return adapter

    def inject(self, host: Any, config: LoraConfig, adapter_name: str) -> None:
        super().inject(host, config, adapter_name)
        if config.init_lora_weights == "loftq":
            from peftkit.quant.loftq import apply_pending

            apply_pending(host.model, adapter_name)

    def trainable_base_params(self, model: nn.Module, config: LoraConfig, targets: list[str]) -> list[str]:
        if config.bias == "all":
            return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if config.bias == "lora_only":
            names = []
            for t in targets:
                layer = model.get_submodule(t)
                if getattr(layer.base_layer, "bias", None) is not None:
                    names.append(f"{t}.base_layer.bias")
            return names
        return []


def lora_from_cli(args: Any) -> LoraConfig:
    """Build a :class:`LoraConfig` from ``peftkit train`` options."""
    return LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules or "all-linear", task_type=args.task_type)


register_method(MethodSpec(
    name="lora", config_cls=LoraConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=LORA_PAPER, tuner=LoraTuner(), cli_config=lora_from_cli,
))
