"""AdaLoRA: adaptive budget allocation over SVD-form adapters (peft's ``AdaLoraConfig``, ``ADALORA``).

Paper: Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR
2023, arXiv:2303.10512.

Equation: ``h = W0 x + lora_alpha / (ranknum + 1e-5) * P Lambda Q x`` with ``Q = lora_A: (r, in)``
(right singular vectors), ``Lambda = diag(lora_E): (r, 1)`` and ``P = lora_B: (out, r)``; ``ranknum``
is ``init_r`` (peft's scaling, kept after pruning). Training (:class:`AdaLoraTuner`):

* the loss gets ``orth_reg_weight * mean(||Q Q^T - I||_F, ||P^T P - I||_F)`` over all matrices
  (:meth:`AdaLoraTuner.regularizer`). As in peft, ``PeftModel.forward`` adds it to the returned ``loss``
  while the adapter is active and not in inference mode, so a plain training loop needs nothing more;
  peftkit's trainers add it themselves (once per optimiser step) and report eval losses without it. (One
  difference: peft's ``PeftModel`` without a ``task_type`` skips its AdaLoRA model's forward and so the
  penalty; peftkit adds it whatever the task type, so such a ported loop trains on the objective of the paper;
  ``loss_terms_added_by_caller()`` leaves it out.)
* after each optimiser step (:meth:`AdaLoraTuner.on_step_end`) every entry's sensitivity
  ``I = |w * grad|`` is smoothed, ``Ibar <- b1 Ibar + (1 - b1) I`` and ``U <- b2 U + (1 - b2)|I - Ibar|``;
  triplet ``i`` scores ``S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = Ibar * U``, and the
  lowest-scoring triplets beyond the budget get ``E_i = 0``;
* the budget follows a cubic schedule (:func:`budget_schedule`) from ``init_r`` to ``target_r`` per
  layer on average, between steps ``tinit`` and ``total_step - tfinal``; the final mask is then kept.

The kept triplets are recorded in ``rank_pattern`` (peft's format: ``"<module>.lora_E"`` -> a list of
``init_r`` booleans); saving writes only kept triplets and loading builds the layers that size, so a
layer pruned to rank 0 saves, loads and merges. Trainable parameters per layer: ``r (in + out + 1)``
(``in = in_channels / groups * prod(kernel)`` for a convolution).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods import _reparam as rp
from peftkit.methods.lora import LoraTuner
from peftkit.ops import Dropout
from peftkit.targeting import ADALORA_TARGET_DEFAULTS
from peftkit.tuners import WrapTuner, check_unmerged

if TYPE_CHECKING:
    from peftkit.host import AdapterModel

ADALORA_PAPER = ("AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
                 "(Zhang et al., 2023, arXiv:2303.10512)")
EPS = 1e-5  # peft's guard in lora_alpha / (ranknum + EPS)


@dataclass
class AdaLoraConfig(PeftConfig):
    """Configuration of AdaLoRA (field names and defaults as ``peft.AdaLoraConfig``).

    Args:
        init_r: rank each layer starts with, integer > 0. Default 12.
        target_r: average rank per layer at the end, integer in ``[0, init_r]``. Default 8.
        tinit: steps of warm-up before any pruning, >= 0. Default 0.
        tfinal: steps at the end trained with the final mask fixed, >= 0. Default 0.
        deltaT: steps between two budget allocations while the budget falls, > 0. Default 1.
        beta1 / beta2: EMA factors of the sensitivity and of its uncertainty, in (0, 1). Default 0.85.
        orth_reg_weight: weight of the orthogonality penalty in the loss, >= 0. Default 0.5.
        total_step: the run's optimiser steps, > 0; required, and ``tinit < total_step - tfinal``.
        rank_pattern: the kept triplets, ``{"<module>.lora_E": [bool] * init_r}``; set by training,
            saved with the adapter, and used to build layers compact when loading. Default None.
        target_modules: module names/suffixes, a full-match regex, or ``"all-linear"``;
            None (default) takes the model type's usual targets, as peft (:data:`~peftkit.targeting.ADALORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        lora_alpha: scaling numerator (``lora_alpha / init_r``), > 0. Default 8.
        lora_dropout: dropout on the adapter's input, in [0, 1). Default 0.
        fan_in_fan_out: kept for file compatibility; peftkit reads the layout from the module type.
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` as in :class:`~peftkit.LoraConfig`.
        modules_to_save: modules trained in full and saved with the adapter.
        init_lora_weights: True (``lora_E`` zero: the adapter starts as identity; ``lora_A``, ``lora_B``
            ~ N(0, 0.02^2)) or False (``lora_E`` ~ N(0, 1) too: tests only).
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        r: unused, as in peft (a warning says so when it is not 8); use ``init_r``.

    Equation: ``delta = lora_alpha / (init_r + 1e-5) * lora_B @ (lora_A * lora_E)``. Trainable
    parameters per layer: ``r (in + out + 1)``.

    Raises:
        ConfigError: any value outside the ranges above, a missing ``total_step``, an empty
            ``target_modules`` (None takes the model type's defaults), a schedule with no pruning phase, or a
            ``rank_pattern`` entry that is not a list of ``init_r`` booleans.

        use_rslora / alpha_pattern / lora_bias / use_dora: fields peft's ``AdaLoraConfig`` inherits from
            ``LoraConfig``; accepted at their defaults (False, ``{}``) so that peft code ports, refused otherwise.

    A file written by peft may carry LoRA fields that peft's AdaLoRA ignores (``use_rslora``,
    ``alpha_pattern``: its scale is ``lora_alpha`` whatever they say); they are accepted and dropped.

    Paper: AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023,
        arXiv:2303.10512).
    """

    peft_type = "ADALORA"
    inert_peft_fields: ClassVar[frozenset[str]] = frozenset({"use_rslora", "alpha_pattern"})
    default_target_modules = ADALORA_TARGET_DEFAULTS
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    r: int = 8
    use_rslora: bool = False
    alpha_pattern: dict[str, float] | None = field(default_factory=dict)
    lora_bias: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        for name, value in (("use_rslora", self.use_rslora), ("lora_bias", self.lora_bias), ("use_dora", self.use_dora),
                            ("alpha_pattern", self.alpha_pattern)):
            check(value in (False, None) or value == {},
                  f"{name}={value!r} is not supported by AdaLoRA (peft's AdaLoraConfig inherits the field from "
                  f"LoraConfig: it refuses use_dora and lora_bias and ignores use_rslora and alpha_pattern, its scale "
                  "being lora_alpha / init_r); leave it at its default")
        rp.check_positive_int("init_r", self.init_r)
        rp.check_positive_int("target_r", self.target_r, allow_zero=True)
        check(self.target_r <= self.init_r, f"target_r={self.target_r} must not exceed init_r={self.init_r}")
        rp.check_positive_int("tinit", self.tinit, allow_zero=True)
        rp.check_positive_int("tfinal", self.tfinal, allow_zero=True)
        rp.check_positive_int("deltaT", self.deltaT)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and 0 < value < 1, f"{name}={value!r} is not valid; it must lie in (0, 1)")
        check(isinstance(self.orth_reg_weight, (int, float)) and self.orth_reg_weight >= 0,
              f"orth_reg_weight={self.orth_reg_weight!r} is not valid; it must be >= 0")
        check(self.total_step is not None, "total_step is required: the number of optimiser steps of the run")
        rp.check_positive_int("total_step", self.total_step)
        check(self.tinit < self.total_step - self.tfinal,
              f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no pruning phase; "
              "need tinit < total_step - tfinal")
        check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
              f"lora_alpha={self.lora_alpha!r} is not valid; it must be a number > 0")
        rp.check_unit_interval("lora_dropout", self.lora_dropout)
        check(self.bias in ("none", "all", "lora_only"),
              f"bias={self.bias!r} is not valid; expected 'none', 'all' or 'lora_only'")
        check(isinstance(self.init_lora_weights, bool),
              f"init_lora_weights={self.init_lora_weights!r} must be True or False")
        rp.check_common(self)
        for key, mask in (self.rank_pattern or {}).items():
            check(isinstance(mask, list) and len(mask) == self.init_r and all(m in (True, False) for m in mask),
                  f"rank_pattern[{key!r}] must be a list of init_r={self.init_r} booleans, got {mask!r}")
        if self.r != 8:
            warnings.warn(f"AdaLoraConfig: r={self.r} is not used; the starting rank is init_r={self.init_r}",
                          stacklevel=3)

    def kept_mask(self, module_name: str) -> list[bool] | None:
        """The saved mask of ``module_name`` (peft's key ``<module>.lora_E``, or an older one that still
        names the adapter, ``<module>.lora_E.<adapter>``), or None."""
        pattern = self.rank_pattern or {}
        key = f"{module_name}.lora_E"
        if key in pattern:
            return pattern[key]
        return next((v for k, v in pattern.items() if k.startswith(key + ".")), None)


def budget_schedule(step: int, init_budget: int, target_budget: int, config: AdaLoraConfig) -> tuple[int, bool]:
    """The total rank budget at optimiser step ``step`` (1-based) and whether to mask at that step.

    ``step <= tinit``: ``(init_budget, False)``; ``step > total_step - tfinal``: ``(target_budget, True)``;
    in between ``int((init_budget - target_budget) * (1 - (step - tinit) / (total_step - tfinal - tinit))^3
    + target_budget)``, masking when ``step % deltaT == 0``.
    """
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    left = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * left ** 3 + target_budget), step % config.deltaT == 0


class AdaLoraAdapter(Adapter):
    """AdaLoRA on one Linear, GPT-2 ``Conv1D`` or ``nn.Conv1d/2d/3d`` layer (convolutions with groups too).

    Parameters: ``lora_A: (r, in)``, ``lora_E: (r, 1)``, ``lora_B: (out, r)`` (peft's names; ``in`` =
    ``in_channels / groups * prod(kernel)`` for a convolution, whose side path is a convolution with
    the rebuilt kernel). Non-saved state: ``ranknum`` (``init_r``), ``rank_mask`` (which of the ``r``
    triplets the last allocation kept), ``origin`` (their positions among the ``init_r`` first built).
    """

    def __init__(self, layout: rp.Layout, origin: list[int], init_r: int, lora_alpha: float, dropout: float,
                 init: bool) -> None:
        super().__init__()
        r = len(origin)
        self.layout, self.r, self.ranknum = layout, r, float(init_r)
        self.scaling = lora_alpha / (self.ranknum + EPS)
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(r, layout.flat_in) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1) if init else torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(layout.out_features, r) * 0.02)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool), persistent=False)
        self.register_buffer("origin", torch.tensor(origin, dtype=torch.long), persistent=False)
        self.importance: dict[str, tuple[Tensor, Tensor]] = {}
        self.last_step: int | None = None  # the step the last allocation call was for

    @property
    def saved_form_differs(self) -> bool:
        """True once ranks are pruned: files hold only the kept triplets, training holds all ``r``."""
        return not bool(self.rank_mask.all())

    def delta(self) -> Tensor:
        """``scaling * B @ (A * E)``, canonical shape, differentiable."""
        return (self.lora_B @ (self.lora_A * self.lora_E) * self.scaling).reshape(self.layout.canonical_shape())

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        if self.r == 0:
            return y
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        if self.layout.kind == "linear":
            side = nn.functional.linear(nn.functional.linear(x, self.lora_A * self.lora_E), self.lora_B)
            return torch.add(y, side.to(y.dtype), alpha=self.scaling)
        return y + rp.apply_delta(layer.base_layer, self.layout, x, self.delta()).to(y.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        a, e, b = (wide(p.detach()) for p in (self.lora_A, self.lora_E, self.lora_B))
        return rp.to_base_layout(b @ (a * e) * self.scaling, self.layout)

    def export_state(self) -> dict[str, Tensor]:
        """Only the triplets kept by the last allocation."""
        keep = torch.nonzero(self.rank_mask).flatten()
        return {"lora_A": self.lora_A.index_select(0, keep), "lora_E": self.lora_E.index_select(0, keep),
                "lora_B": self.lora_B.index_select(1, keep)}

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Fold ``I = |w * grad|`` of ``lora_A``, ``lora_E``, ``lora_B`` into the sensitivity EMA
        ``Ibar <- beta1 Ibar + (1 - beta1) I`` and its uncertainty EMA ``U <- beta2 U + (1 - beta2) |I - Ibar|``
        (AdaLoRA's smoothed sensitivity and uncertainty; parameters without a gradient are skipped)."""
        for name in ("lora_A", "lora_E", "lora_B"):
            p = getattr(self, name)
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg, unc = self.importance.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = beta1 * avg + (1 - beta1) * ipt
            unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
            self.importance[name] = (avg, unc)

    def scores(self) -> Tensor:
        """``(r,)`` triplet scores ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``, ``s = Ibar * U``."""
        total = self.lora_E.new_zeros(self.r)
        for name, reduce in (("lora_E", lambda s: s.view(-1)), ("lora_A", lambda s: s.mean(1)),
                             ("lora_B", lambda s: s.mean(0))):
            if name in self.importance:
                avg, unc = self.importance[name]
                total = total + reduce(avg * unc)
        return total

    @torch.no_grad()
    def apply_mask(self, mask: Tensor | None = None) -> None:
        """Set ``rank_mask`` to ``mask`` (``(r,)`` bool; default None keeps the current one) and zero ``lora_E``
        outside it."""
        if mask is not None:
            self.rank_mask.copy_(mask)
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    def full_mask(self) -> list[bool]:
        """The mask over the ``init_r`` triplets first built (peft's ``rank_pattern`` value)."""
        full = torch.zeros(int(self.ranknum), dtype=torch.bool)
        full[self.origin[self.rank_mask].cpu()] = True
        return full.tolist()


DAMAGED_STATE = "the checkpoint is damaged; resume from an earlier copy of the run or train again"


class AdaLoraTuner(WrapTuner):
    """Builds AdaLoRA adapters, adds the orthogonality penalty and allocates the rank budget."""

    method = "AdaLoRA"
    trainable_base_params = LoraTuner.trainable_base_params
    regularizer_in_forward = True  # peft's forward adds the penalty to the loss

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return rp.supported_types()

    def make_adapter(self, base: nn.Module, config: AdaLoraConfig, module_name: str) -> Adapter:
        """An :class:`AdaLoraAdapter` with all ``init_r`` triplets, or only those ``rank_pattern`` keeps for
        ``module_name`` (a loaded, pruned adapter; possibly none)."""
        mask = config.kept_mask(module_name)
        origin = list(range(config.init_r)) if mask is None else [i for i, keep in enumerate(mask) if keep]
        return AdaLoraAdapter(rp.layout_of(base), origin, config.init_r, config.lora_alpha, config.lora_dropout,
                              config.init_lora_weights)

    @staticmethod
    def adapters(host: AdapterModel, adapter_name: str) -> dict[str, AdaLoraAdapter]:
        """Module name -> the AdaLoRA adapter ``adapter_name`` on it, in model order."""
        return host.adapters_of(adapter_name, AdaLoraAdapter)

    def regularizer(self, host: AdapterModel, adapter_name: str) -> Tensor | None:
        """``orth_reg_weight`` times the mean over all ``lora_A`` and ``lora_B`` of ``||A A^T - I||_F`` and
        ``||B^T B - I||_F`` (peft's penalty); None when the weight is 0."""
        weight = host.peft_config[adapter_name].orth_reg_weight
        adapters = list(self.adapters(host, adapter_name).values())
        if weight == 0 or not adapters:
            return None
        total, count = None, 0
        for a in adapters:
            eye = torch.eye(a.r, device=a.lora_A.device, dtype=a.lora_A.dtype)
            for gram in (a.lora_A @ a.lora_A.T, a.lora_B.T @ a.lora_B):
                term = torch.linalg.vector_norm(gram - eye)
                total = term if total is None else total + term
                count += 1
        return total * (weight / count)

    def on_step_end(self, host: AdapterModel, adapter_name: str, step: int) -> None:
        """Update importance, mask to the scheduled budget, or hold the final mask (peft's
        ``update_and_allocate``); call after ``optimizer.step()`` and before ``zero_grad()``.

        Raises:
            RuntimeError: a step that updates the importance finds no gradient on the adapter (nothing changes).
            ConfigError: the adapter is merged into a layer (nothing changes).
        """
        check_unmerged(host, adapter_name, "update_and_allocate / peft_step_end (AdaLoRA's rank masks)")
        adapters = self.adapters(host, adapter_name)
        if adapters and all(getattr(a, "last_step", None) == step for a in adapters.values()):
            # a second call for one step (PeftTrainer's own plus a ported peft callback) would allocate again on
            # importance the first one may have cleared, dropping every triplet
            warnings.warn(f"AdaLoRA adapter {adapter_name!r}: step {step} was already allocated; this call is ignored "
                          "(PeftTrainer and peftkit's Trainer call update_and_allocate after every optimiser step: "
                          "drop a callback that calls it too)", UserWarning, stacklevel=3)
            return
        self._allocate(host, adapter_name, step)
        for a in adapters.values():  # (only once it went through: a refused call may be made again)
            a.last_step = step

    def _allocate(self, host: AdapterModel, adapter_name: str, step: int) -> None:
        config = host.peft_config[adapter_name]
        adapters = self.adapters(host, adapter_name)
        end = config.total_step - config.tfinal
        if step > end:
            for a in adapters.values():
                a.apply_mask()
            return
        init_budget = sum(a.r for a in adapters.values())
        target_budget = config.target_r * len(adapters)
        if step < end:
            if not any(getattr(a, n).grad is not None for a in adapters.values() for n in ("lora_A", "lora_E", "lora_B")):
                # no gradient: every score would be 0 and the budget mask would then drop every triplet
                raise RuntimeError(f"AdaLoRA adapter {adapter_name!r} has no gradients at step {step}: call "
                                   "peft_step_end / update_and_allocate after loss.backward() and optimizer.step(), "
                                   "before optimizer.zero_grad() (its importance scores read the gradients)")
            for a in adapters.values():
                a.update_importance(config.beta1, config.beta2)
        budget, mask_now = budget_schedule(step, init_budget, target_budget, config)
        if mask_now or step == end:
            self.mask_to_budget(host, adapter_name, budget)
        if step == end:
            for a in adapters.values():
                a.importance.clear()

    def mask_to_budget(self, host: AdapterModel, adapter_name: str, budget: int) -> None:
        """Keep the ``budget`` best-scoring triplets over all layers (ties at the threshold are dropped,
        as in peft) and zero the others' ``lora_E``."""
        adapters = self.adapters(host, adapter_name)
        scores = {name: a.scores() for name, a in adapters.items()}
        drop = sum(a.r for a in adapters.values()) - budget
        if drop <= 0:
            masks = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), drop).values
            masks = {name: s > threshold for name, s in scores.items()}
        self.set_rank_masks(host, adapter_name, masks)

    def set_rank_masks(self, host: AdapterModel, adapter_name: str, masks: dict[str, Tensor]) -> None:
        """Apply ``masks`` (module name -> ``(r,)`` booleans over that layer's triplets), zero the dropped
        ``lora_E`` entries and record the result in the config's ``rank_pattern``.

        Raises:
            ConfigError: a module without this adapter, or a mask of the wrong length.
        """
        adapters = self.adapters(host, adapter_name)
        for name, mask in masks.items():
            check(name in adapters, f"{name!r} has no AdaLoRA adapter {adapter_name!r}")
            check(mask.shape == (adapters[name].r,), f"mask of {name!r} has shape {tuple(mask.shape)}, "
                                                     f"expected ({adapters[name].r},)")
        for name, mask in masks.items():
            adapters[name].apply_mask(mask.to(adapters[name].rank_mask.device, torch.bool))
        config = host.peft_config[adapter_name]
        config.rank_pattern = {f"{name}.lora_E": a.full_mask() for name, a in adapters.items()}

    def remove(self, host: AdapterModel, adapter_name: str) -> None:
        for a in self.adapters(host, adapter_name).values():
            a.importance.clear()

    def widen_loaded(self, host: AdapterModel, adapter_name: str, tensors: dict[str, Tensor], saved: PeftConfig
                     ) -> tuple[dict[str, Tensor], Callable[[], None] | None]:
        """A pruned file's kept triplets (``saved.rank_pattern``) put in their places among the ``r`` of each of
        this model's adapters (the others zero), and the masks to apply once copied; tensors that do not have
        the kept count are left for the loader to name."""
        pattern = getattr(saved, "rank_pattern", None)
        if not pattern:
            return tensors, None
        adapters = self.adapters(host, adapter_name)
        widened, masks = dict(tensors), {}
        for key, keep in pattern.items():
            module = key.removesuffix(".lora_E")
            adapter = adapters.get(module)
            kept = torch.tensor(keep, dtype=torch.bool)
            if adapter is None or adapter.r != kept.numel() or int(kept.sum()) == kept.numel():
                continue
            rows = kept.nonzero().squeeze(1)
            for factor, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                file_key = f"base_model.model.{module}.{factor}"
                value = widened.get(file_key)
                if value is None or value.shape[dim] != rows.numel():
                    continue
                shape = list(value.shape)
                shape[dim] = kept.numel()
                widened[file_key] = value.new_zeros(shape).index_copy_(dim, rows, value)
            masks[module] = kept
        if not masks:
            return tensors, None
        return widened, lambda: self.set_rank_masks(host, adapter_name, masks)

    def method_state(self, host: AdapterModel, adapter_name: str) -> dict[str, Tensor]:
        """``<module>.rank_mask`` (once a budget was applied: ``rank_pattern`` is set) and the importance
        averages ``<module>.<lora_A|lora_E|lora_B>.importance_avg/_unc`` (while the allocation runs)."""
        out: dict[str, Tensor] = {}
        masked = host.peft_config[adapter_name].rank_pattern is not None
        for module, a in self.adapters(host, adapter_name).items():
            if masked:
                out[f"{module}.rank_mask"] = a.rank_mask
            for name, (avg, unc) in a.importance.items():
                out[f"{module}.{name}.importance_avg"], out[f"{module}.{name}.importance_unc"] = avg, unc
        return out

    def load_method_state(self, host: AdapterModel, adapter_name: str, tensors: dict[str, Tensor],
                          check_only: bool = False) -> None:
        """Restore the rank masks (and ``rank_pattern``) and the importance averages :meth:`method_state` wrote.

        Raises:
            ConfigError: a key of no AdaLoRA layer of this adapter, or a tensor of the wrong shape (checked first).
        """
        adapters = self.adapters(host, adapter_name)
        masks: dict[str, Tensor] = {}
        importance: dict[str, dict[str, dict[str, Tensor]]] = {}
        for key, value in tensors.items():
            head, _, kind = key.rpartition(".")
            module, factor = head, None
            if kind in ("importance_avg", "importance_unc"):
                module, _, factor = head.rpartition(".")
            a = adapters.get(module)
            fits = a is not None and (
                (kind == "rank_mask" and value.shape == a.rank_mask.shape) or
                (factor in ("lora_A", "lora_E", "lora_B") and value.shape == getattr(a, factor).shape))
            check(fits, f"the checkpoint's AdaLoRA state {key!r} of shape {tuple(value.shape)} does not fit adapter "
                        f"{adapter_name!r} of this model; resume with the run's own options")
            if kind == "rank_mask":
                masks[module] = value.to(torch.bool)
            else:
                importance.setdefault(module, {}).setdefault(factor, {})[kind] = value
        for module, factors in importance.items():
            for factor, pair in factors.items():
                check(len(pair) == 2, f"the checkpoint holds only {sorted(pair)} of AdaLoRA's importance of "
                                      f"{module}.{factor}; {DAMAGED_STATE}")
        if check_only:
            return
        for module, factors in importance.items():
            a = adapters[module]
            a.importance = {f: (pair["importance_avg"].to(a.lora_A), pair["importance_unc"].to(a.lora_A))
                            for f, pair in factors.items()}
        if masks:
            self.set_rank_masks(host, adapter_name, masks)


def adalora_from_cli(args: Any) -> AdaLoraConfig:
    """An :class:`AdaLoraConfig` from ``peftkit train`` options ``args``: ``target_r = --r``, ``init_r`` 1.5x that,
    ``total_step`` the run's ``--max-steps`` (or ``--option total_step=N``), ``tinit`` 10% and ``tfinal``
    20% of it.

    Raises:
        ConfigError: the run's length is unknown (``--epochs`` without ``--max-steps`` or ``total_step``).
    """
    total = args.max_steps or args.method_options.get("total_step")
    check(isinstance(total, int) and total > 0,
          "AdaLoRA needs the run's number of steps: give --max-steps N or --option total_step=N")
    target = args.r or 8
    return AdaLoraConfig(target_r=target, init_r=(3 * target + 1) // 2, total_step=total, tinit=total // 10,
                         tfinal=total // 5, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=args.target_modules or "all-linear", task_type=args.task_type)


register_method(MethodSpec(
    name="adalora", config_cls=AdaLoraConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=ADALORA_PAPER, tuner=AdaLoraTuner(), cli_config=adalora_from_cli, shards=False,
    # E starts at zero, so A and B get no gradient until it moves: at LoRA's 1e-3 the 150-step SST-2 run
    # stays at chance (0.51); 100 steps reach 0.70 at 5e-3 and 0.76 at 2e-2 (300 dev examples)
    default_lr=2e-2,
))
