"""SoRA: sparse low-rank adaptation with a gate on the rank (``SoraConfig``, ``peft_type`` ``SORA``).

Paper: Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023,
arXiv:2311.11696.

Equation: ``h = W0 x + B diag(g) A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)`` and a gate
``g: (r,)``. After every optimiser step the gate takes a proximal step of the L1 penalty, the soft
threshold ``g <- sign(g) * max(|g| - sparse_lambda, 0)`` (:meth:`SoraTuner.on_step_end`, called by
:class:`peftkit.train.Trainer` through ``PeftModel.peft_step_end``), so that ranks switch off exactly.
A rank whose gate is zero contributes nothing: merging ignores it, and saving drops it (the adapter
file holds only kept ranks and ``rank_pattern`` records each layer's kept rank, 0 for a layer pruned
away). Trainable parameters per layer: ``r (in + out + 1)``, with ``in = in_channels * prod(kernel)``
for a convolution.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods import _reparam as rp
from peftkit.ops import Dropout
from peftkit.targeting import LORA_TARGET_DEFAULTS, check_pattern_keys, pattern_key
from peftkit.tuners import WrapTuner, check_unmerged

if TYPE_CHECKING:
    from peftkit.host import AdapterModel

SORA_PAPER = "Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al., 2023, arXiv:2311.11696)"


@dataclass
class SoraConfig(PeftConfig):
    """Configuration of SoRA.

    Args:
        r: the largest rank (``r_max`` in the paper), integer > 0. Default 8.
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``;
            None (default) takes the model type's usual targets, as peft (:data:`~peftkit.targeting.LORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        lora_dropout: dropout probability on the adapter's input, in [0, 1). Default 0.
        sparse_lambda: the soft threshold ``xi`` taken off ``|g|`` after each optimiser step, >= 0
            (0 turns SoRA into a gated LoRA). Default 1e-3.
        init_lora_weights: True (``A`` Kaiming-uniform, ``B`` zero, ``g ~ N(0, 1)`` as the authors'
            code: the adapter starts as identity) or False (``B`` random too: tests only).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        rank_pattern: per-module rank keyed by a regex matched against the end of the module name;
            0 is allowed (a layer whose ranks were all pruned). Saving writes every layer's kept rank here.
        modules_to_save: modules trained in full and saved with the adapter.

    Equation: ``delta = B diag(g) A``. Trainable parameters per layer: ``r (in + out + 1)``.

    Raises:
        ConfigError: ``r <= 0``, a negative ``sparse_lambda`` or pattern rank, a dropout outside
            [0, 1), ``target_modules=[]``; when injecting, a grouped convolution.

    Paper: Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al., 2023, arXiv:2311.11696).
    """

    peft_type = "SORA"
    default_target_modules = LORA_TARGET_DEFAULTS
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    sparse_lambda: float = 1e-3
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        rp.check_positive_int("r", self.r)
        rp.check_unit_interval("lora_dropout", self.lora_dropout)
        check(isinstance(self.sparse_lambda, (int, float)) and not isinstance(self.sparse_lambda, bool)
              and self.sparse_lambda >= 0, f"sparse_lambda={self.sparse_lambda!r} is not valid; it must be >= 0")
        check(isinstance(self.init_lora_weights, bool),
              f"init_lora_weights={self.init_lora_weights!r} must be True or False")
        rp.check_common(self)
        self.rank_pattern = dict(self.rank_pattern or {})
        check_pattern_keys("rank_pattern", self.rank_pattern)
        for key, value in self.rank_pattern.items():
            rp.check_positive_int(f"rank_pattern[{key!r}]", value, allow_zero=True)

    def rank_for(self, module_name: str) -> int:
        """The rank that applies to ``module_name`` after ``rank_pattern``."""
        key = pattern_key(module_name, self.rank_pattern)
        return self.rank_pattern[key] if key else self.r


class SoraAdapter(Adapter):
    """SoRA on one Linear, GPT-2 ``Conv1D`` or ungrouped ``nn.Conv1d/2d/3d`` layer.

    Parameters: ``lora_A.weight: (r, in)`` (a convolution like the base one, ``r`` output channels,
    for a conv layer), ``lora_B.weight: (out, r)`` (a 1x1 convolution for a conv layer), ``lora_gate: (r,)``.
    """

    def __init__(self, base: nn.Module, layout: rp.Layout, r: int, dropout: float, init: bool) -> None:
        super().__init__()
        self.layout, self.r = layout, r
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        with warnings.catch_warnings():  # a layer pruned to rank 0 builds zero-size weights
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self._build(base, layout, r)
        self.lora_gate = nn.Parameter(torch.randn(r))
        if r:
            rp.kaiming_(self.lora_A.weight)
            (nn.init.zeros_ if init else rp.kaiming_)(self.lora_B.weight)

    def _build(self, base: nn.Module, layout: rp.Layout, r: int) -> None:
        if layout.kind == "conv":
            conv = type(base)
            self.lora_A = skip_init(conv, base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                    base.dilation, bias=False, padding_mode=base.padding_mode)
            self.lora_B = skip_init(conv, r, layout.out_features, 1, bias=False)
        else:
            self.lora_A = skip_init(nn.Linear, layout.in_features, r, bias=False)
            self.lora_B = skip_init(nn.Linear, r, layout.out_features, bias=False)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        if self.r == 0:
            return y
        gate = self.lora_gate
        z = self.lora_A(self.lora_dropout(x.to(gate.dtype)))
        if self.layout.kind == "conv":
            gate = gate.view(-1, *[1] * len(self.layout.kernel))  # channels, then the spatial dims (batched or not)
        return y + self.lora_B(z * gate).to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        a = wide(self.lora_A.weight.detach()).flatten(1)   # (r, in * prod(kernel))
        b = wide(self.lora_B.weight.detach()).flatten(1)   # (out, r)
        return rp.to_base_layout((b * wide(self.lora_gate.detach())) @ a, self.layout)

    def kept(self) -> Tensor:
        """Indices of the ranks whose gate is not zero."""
        return torch.nonzero(self.lora_gate.detach()).flatten()

    def export_state(self) -> dict[str, Tensor]:
        """Only the kept ranks: rows of ``A``, columns of ``B`` and entries of the gate."""
        keep = self.kept()
        return {"lora_A.weight": self.lora_A.weight.index_select(0, keep),
                "lora_B.weight": self.lora_B.weight.index_select(1, keep),
                "lora_gate": self.lora_gate.index_select(0, keep)}

    @torch.no_grad()
    def soft_threshold(self, lam: float) -> None:
        """The proximal step of ``lam * |g|_1``: ``g <- sign(g) max(|g| - lam, 0)``."""
        g = self.lora_gate
        g.copy_(g.sign() * (g.abs() - lam).clamp_min(0))


class SoraTuner(WrapTuner):
    """Builds SoRA adapters; after each optimiser step soft-thresholds their gates."""

    method = "SoRA"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return rp.supported_types()

    def make_adapter(self, base: nn.Module, config: SoraConfig, module_name: str) -> Adapter:
        """A :class:`SoraAdapter` of the rank ``rank_pattern`` gives ``module_name`` (``r`` by default).

        Raises:
            ConfigError: a grouped convolution.
        """
        layout = rp.layout_of(base)
        if layout.kind == "conv":
            check(base.groups == 1, f"{module_name}: SoRA does not adapt grouped convolutions (groups={base.groups})")
        return SoraAdapter(base, layout, config.rank_for(module_name), config.lora_dropout, config.init_lora_weights)

    @staticmethod
    def adapters(host: AdapterModel, adapter_name: str) -> dict[str, SoraAdapter]:
        """Module name -> the SoRA adapter ``adapter_name`` on it, in model order."""
        return host.adapters_of(adapter_name, SoraAdapter)

    def on_step_end(self, host: AdapterModel, adapter_name: str, step: int) -> None:
        lam = host.peft_config[adapter_name].sparse_lambda
        if lam > 0:
            check_unmerged(host, adapter_name, "peft_step_end (SoRA's soft-thresholding of the gates)")
            for adapter in self.adapters(host, adapter_name).values():
                adapter.soft_threshold(lam)

    def kept_ranks(self, host: AdapterModel, adapter_name: str) -> dict[str, int]:
        """Module name -> number of ranks whose gate is not zero, over the layers of ``adapter_name``."""
        return {name: int(a.kept().numel()) for name, a in self.adapters(host, adapter_name).items()}

    def export_config(self, host: AdapterModel, adapter_name: str) -> SoraConfig:
        """The config with ``rank_pattern`` set to every layer's kept rank, keyed ``^<escaped full name>``
        so that a key matches its own module only, never one whose name ends with it."""
        pattern = {"^" + re.escape(name): rank for name, rank in self.kept_ranks(host, adapter_name).items()}
        return dataclasses.replace(host.peft_config[adapter_name], rank_pattern=pattern)


def sora_from_cli(args: Any) -> SoraConfig:
    """A :class:`SoraConfig` from ``peftkit train`` options ``args`` (``--r``, default 8; ``--lora-dropout``;
    ``--target-modules``, default ``"all-linear"``)."""
    return SoraConfig(r=args.r or 8, lora_dropout=args.lora_dropout, target_modules=args.target_modules or "all-linear",
                      task_type=args.task_type)


register_method(MethodSpec(
    name="sora", config_cls=SoraConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=SORA_PAPER, tuner=SoraTuner(), cli_config=sora_from_cli, shards=False,
))
