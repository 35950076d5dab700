"""DyLoRA: one LoRA adapter trained so that every rank ``b <= r`` works on its own.

Paper: Valipour, Rezagholizadeh, Kobyzev and Ghodsi, "DyLoRA: Parameter-Efficient Tuning of
Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", 2022, arXiv:2210.07558.

Equation: ``h = W0 x + (alpha / b) * B[:, :b] A[:b] dropout(x)``. While the adapter trains, each forward
of the model draws ``b ~ U{1, ..., r}`` (torch's global generator, so seeding torch makes it
reproducible) and every layer of the adapter uses its first ``b`` rank components (``min(b, r_layer)``
with ``rank_pattern``); rsLoRA scales by ``alpha / sqrt(b)``. In eval mode, for merging and while the
adapter is frozen the rank chosen with :func:`set_dylora_rank` is used (default: the full ``r``), so after
training any rank can be picked without retraining. Trainable parameters per adapted ``(out, in)`` layer: ``r * (in + out)``.

Files use LoRA's layout (``lora_A``/``lora_B`` with the full rank) with ``peft_type: "DYLORA"``.
Adapters: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods.lora import LoraConfig, LoraLinear, fresh_output, lora_from_cli, trainable_biases
from peftkit.targeting import linear_types
from peftkit.tuners import WrapTuner

DYLORA_PAPER = ("DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank "
                "Adaptation (Valipour et al., 2022, arXiv:2210.07558)")


@dataclass
class DyLoraConfig(LoraConfig):
    """Configuration of DyLoRA: :class:`~peftkit.methods.lora.LoraConfig`'s fields, ``r`` being the largest
    rank trained. Trainable parameters per ``(out, in)`` layer: ``r * (in + out)``.

    Args:
        eval_rank: the rank used in eval mode and for merging (the first ``eval_rank`` components); None
            (default) uses all. :func:`set_dylora_rank` sets it, so a saved adapter reloads with the rank chosen.

    Raises:
        ConfigError: as :class:`~peftkit.methods.lora.LoraConfig`, and for ``use_dora``, ``use_qalora``, ``lora_bias`` or an
            initialisation other than True, False or ``"gaussian"`` (they do not nest over ranks).

    Paper: DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation
        (Valipour et al., 2022, arXiv:2210.07558).
    """

    peft_type = "DYLORA"
    eval_rank: int | None = None

    def validate(self) -> None:
        super().validate()
        check(self.eval_rank is None or (isinstance(self.eval_rank, int) and not isinstance(self.eval_rank, bool)
                                         and self.eval_rank >= 1),
              f"eval_rank={self.eval_rank!r} is not valid; give a rank >= 1 (at most the largest r), or None for all")
        check(not self.use_dora, "use_dora=True is not supported by DyLoRA")
        check(not self.lora_bias, "lora_bias=True is not supported by DyLoRA (its scale changes with the rank)")
        check(not self.use_qalora, "use_qalora=True is not supported by DyLoRA (its layers do not pool the input as "
                                   "QA-LoRA's do); use LoraConfig(use_qalora=True), or leave it False")
        check(self.init_lora_weights in (True, False, "gaussian"),
              f"init_lora_weights={self.init_lora_weights!r} is not supported by DyLoRA; use True, False or 'gaussian'")


class RankState:
    """The ranks of one DyLoRA adapter, shared by its layers.

    Attributes:
        max_rank: the largest ``r`` of its layers.
        rank: used in eval mode and for merging (set with :func:`set_dylora_rank`).
        sampled: drawn from ``U{1..max_rank}`` at each forward of the model in training mode.
    """

    def __init__(self, max_rank: int) -> None:
        self.max_rank = self.rank = self.sampled = max_rank
        self.hook: Any = None

    def before_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook on the model (``module``; the call's ``args`` are not read): in training mode draw
        ``sampled`` from ``U{1..max_rank}`` (torch's
        global generator); in eval mode leave it."""
        if module.training:
            self.sampled = int(torch.randint(1, self.max_rank + 1, ()).item())


class DyLoraLinear(LoraLinear):
    """LoRA on ``nn.Linear`` / GPT-2 ``Conv1D`` truncated to the current rank ``k``:
    ``x: (..., in) -> (..., out)``, ``lora_A.weight: (r, in)``, ``lora_B.weight: (out, r)``."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, rslora: bool, dropout: float,
                 transposed: bool, ranks: RankState) -> None:
        super().__init__(in_features, out_features, r, alpha / (math.sqrt(r) if rslora else r), dropout,
                         transposed=transposed)
        self.alpha, self.rslora, self.ranks = alpha, rslora, ranks

    def rank(self) -> int:
        """The rank in use: the sampled one while this adapter trains (training mode and its factors take
        gradients), else the chosen one (also for a frozen adapter, e.g. one loaded for inference beside a
        part that trains); never above ``r``."""
        trains = self.training and self.lora_B.weight.requires_grad
        return min(self.ranks.sampled if trains else self.ranks.rank, self.r)

    def _scale(self, k: int) -> float:
        return self.alpha / (math.sqrt(k) if self.rslora else k)

    def low_rank(self) -> tuple[Tensor, Tensor, float]:
        k = self.rank()
        return self.lora_A.weight[:k], self.lora_B.weight[:, :k], self._scale(k)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a, b, scaling = self.low_rank()
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        z = F.linear(self.lora_dropout(x), a)
        if y.dtype == z.dtype == b.dtype and y.is_contiguous() and fresh_output(layer):  # not under autocast
            y.view(-1, y.shape[-1]).addmm_(z.view(-1, a.shape[0]), b.T, alpha=scaling)
            return y
        return torch.add(y, F.linear(z, b).to(y.dtype), alpha=scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        k = min(self.ranks.rank, self.r)
        delta = (wide(self.lora_B.weight[:, :k]) @ wide(self.lora_A.weight[:k])) * self._scale(k)
        return delta.T if self.transposed else delta


class DyLoraTuner(WrapTuner):
    """Builds the adapter's layers around one :class:`RankState` and hooks the model's forward to sample."""

    method = "DyLoRA"

    def __init__(self) -> None:
        self._building: RankState | None = None

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return linear_types()

    def inject(self, host: Any, config: DyLoraConfig, adapter_name: str) -> None:
        """As :meth:`WrapTuner.inject`, with one :class:`RankState` shared by the adapter's layers (its rank
        drawn before each training forward by a pre-hook on the model, kept in ``host.tuner_state``).

        Raises:
            ConfigError: ``eval_rank`` is larger than the adapter's largest rank, or as
                :meth:`WrapTuner.inject`.
        """
        state = RankState(max(config.rank_and_alpha(t)[0] for t in self.find(host, config)))
        if config.eval_rank is not None:
            check(config.eval_rank <= state.max_rank, f"eval_rank={config.eval_rank} is more than the largest rank of "
                                                      f"adapter {adapter_name!r}, {state.max_rank}")
            state.rank = config.eval_rank
        self._building = state
        try:
            super().inject(host, config, adapter_name)
            state = self._building
        finally:
            self._building = None
        state.hook = host.model.register_forward_pre_hook(state.before_forward)
        host.tuner_state[adapter_name] = state

    def make_adapter(self, base: nn.Module, config: DyLoraConfig, module_name: str) -> Adapter:
        """A :class:`DyLoraLinear` with this module's ``(r, alpha)`` (after the patterns), sharing the
        :class:`RankState` that :meth:`inject` is building."""
        r, alpha = config.rank_and_alpha(module_name)
        transposed = not isinstance(base, nn.Linear)
        out_f, in_f = base.weight.shape[::-1] if transposed else base.weight.shape
        adapter = DyLoraLinear(in_f, out_f, r, alpha, config.use_rslora, config.lora_dropout, transposed,
                               self._building)
        adapter.reset(config.init_lora_weights)
        return adapter

    def trainable_base_params(self, model: nn.Module, config: DyLoraConfig, targets: list[str]) -> list[str]:
        return trainable_biases(model, config.bias, targets)

    def remove(self, host: Any, adapter_name: str) -> None:
        state = host.tuner_state.pop(adapter_name, None)
        if isinstance(state, RankState):
            state.hook.remove()

    def state(self, host: Any, adapter_name: str) -> RankState | None:
        """The :class:`RankState` of adapter ``adapter_name`` on ``host``, or None if it is not DyLoRA."""
        state = host.tuner_state.get(adapter_name)
        return state if isinstance(state, RankState) else None


_TUNER = DyLoraTuner()


def set_dylora_rank(model: Any, rank: int, adapter_name: str = "default") -> None:
    """Use the first ``rank`` components of DyLoRA adapter ``adapter_name`` in eval mode and when merging.
    The rank is kept in the adapter's config (``eval_rank``), so ``save_pretrained`` keeps it.

    Args:
        model: the :class:`~peftkit.PeftModel`.
        rank: ``1 <= rank <= r`` (layers with a smaller ``rank_pattern`` rank use all of theirs).
        adapter_name: the adapter (default ``"default"``).

    Raises:
        ConfigError: unknown adapter, not a DyLoRA adapter, or ``rank`` out of range.
        ValueError: the adapter is merged (unmerge it first).

    Paper: DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation
        (Valipour et al., 2022, arXiv:2210.07558).
    """
    host = model.base_model
    host.check_known([adapter_name])
    state = _TUNER.state(host, adapter_name)
    check(state is not None, f"adapter {adapter_name!r} is not a DyLoRA adapter")
    check(isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= state.max_rank,
          f"rank={rank!r} is not valid for adapter {adapter_name!r}; expected an integer in [1, {state.max_rank}]")
    if adapter_name in host.merged_adapters():
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before changing its rank")
    state.rank = rank
    host.peft_config[adapter_name].eval_rank = rank  # saved with the adapter, so that it reloads at this rank


def dylora_from_cli(args: Any) -> DyLoraConfig:
    """Build a :class:`DyLoraConfig` from ``peftkit train`` options ``args``, as :func:`~peftkit.methods.lora.lora_from_cli`
    (defaults ``r=8``, ``target_modules="all-linear"``)."""
    return lora_from_cli(args, DyLoraConfig)


register_method(MethodSpec(
    name="dylora", config_cls=DyLoraConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=DYLORA_PAPER, tuner=_TUNER, cli_config=dylora_from_cli,
))
