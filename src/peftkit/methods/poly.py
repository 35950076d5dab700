"""Polytropon (Poly) and Multi-Head Routing (MHR): a bank of LoRA skills per layer, mixed per task.

Papers: Ponti et al., "Combining Parameter-efficient Modules for Task-level Generalisation", 2023,
arXiv:2202.13914 (Polytropon); Caccia et al., "Multi-Head Adapter Routing for Cross-Task Generalization",
2023, arXiv:2211.03831 (MHR: ``n_splits > 1``).

Equation, for a row of task ``t`` and each split ``q`` of the layer's input/output features:
``w[t, q] = normalise(sigmoid(Z[t, q]))`` over the ``S`` skills (training: a relaxed-Bernoulli sample with
temperature 1 instead of the sigmoid), ``A_q = sum_s w[t, q, s] A[q, s]``, ``B_q = sum_s w[t, q, s] B[q, s]``,
``h = W0 x + (x A) B / r`` with ``A = concat_q A_q`` along the input features and ``B = concat_q B_q`` along
the output features. ``normalise(v) = v / (sum(v) + 1e-12)``.
Trainable parameters per adapted ``(out, in)`` layer: ``S * r * (in + out) + n_tasks * n_splits * S``.

The task of each row comes from ``task_ids=`` given to :meth:`peftkit.PeftModel.forward` or ``generate``
(as in peft); the model checks it and the layers read it from the shared
:class:`~peftkit.layers.AdapterContext`. With ``n_tasks = 1`` it may be left out (every row is task 0), so
that ``peftkit train --method poly`` runs on single-task data. The routing depends on the task, so a Poly
adapter never merges into the base weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from peftkit.config import ConfigError, MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.targeting import LORA_TARGET_DEFAULTS, check_target_fields, linear_types
from peftkit.tuners import WrapTuner

PAPER = ("Combining Parameter-efficient Modules for Task-level Generalisation "
         "(Ponti et al., 2023, arXiv:2202.13914)")
POLY_TYPES = ("poly",)
EPS = 1e-12  # added to the sum of the skill weights before normalising, as peft and mttl do


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PolyConfig(PeftConfig):
    """Configuration of Polytropon / Multi-Head Routing (field names and defaults as ``peft.PolyConfig``).

    Args:
        r: rank of each skill's LoRA, > 0. Default 8.
        target_modules: names/suffixes, a full-match regex, or ``"all-linear"`` (Linear and GPT-2 Conv1D);
            None (default) takes the model type's usual targets, as peft (LoRA's table).
        exclude_modules: names/suffixes or regex never adapted.
        modules_to_save: modules trained in full and saved with the adapter.
        init_weights: True (default): ``B`` starts at zero, so the adapter starts as the identity; False: ``B``
            random like ``A`` (for tests). ``A`` is Kaiming-uniform per skill and split, the router's logits
            uniform in ``[-1e-3, 1e-3]``.
        poly_type: the router, ``"poly"`` (the only one, as in peft).
        n_tasks: number of tasks, >= 1; ``task_ids`` lie in ``[0, n_tasks)``. Default 1.
        n_skills: LoRA skills per layer, >= 1. Default 4.
        n_splits: heads each skill is split into (MHR when > 1), >= 1; must divide every adapted layer's
            input and output features. Default 1.

    Shapes per adapted ``(out, in)`` layer: ``poly_lora_A: (n_splits, n_skills, in / n_splits, r)``,
    ``poly_lora_B: (n_splits, n_skills, r, out / n_splits)``,
    ``poly_router.module_logits: (n_tasks, n_splits * n_skills)``.
    Trainable parameters per layer: ``n_skills * r * (in + out) + n_tasks * n_splits * n_skills``.

    Raises:
        ConfigError: ``r``, ``n_tasks``, ``n_skills`` or ``n_splits`` not a positive integer, an unknown
            ``poly_type``, ``target_modules=[]``; when injected, ``n_splits`` not dividing a layer's features.

    Paper: Combining Parameter-efficient Modules for Task-level Generalisation (Ponti et al., 2023,
    arXiv:2202.13914); MHR: Multi-Head Adapter Routing for Cross-Task Generalization (Caccia et al., 2023,
    arXiv:2211.03831).
    """

    peft_type = "POLY"
    mixed_batches = False  # a row's skills depend on its task id, which mixed batches do not carry
    default_target_modules = LORA_TARGET_DEFAULTS
    #: the method's forward needs a task id per row (``task_ids=``; see :meth:`peftkit.PeftModel.forward`)
    takes_task_ids = True
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def validate(self) -> None:
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            value = getattr(self, name)
            check(_positive_int(value), f"{name}={value!r} is not valid; it must be an integer >= 1")
        check(self.poly_type in POLY_TYPES,
              f"poly_type={self.poly_type!r} is not valid; expected one of {list(POLY_TYPES)}")
        check(isinstance(self.init_weights, bool), f"init_weights={self.init_weights!r} must be True or False")
        check_target_fields(self)


class PolyRouter(nn.Module):
    """Per-task routing over skills: ``module_logits: (n_tasks, n_splits * n_skills)``.

    :meth:`forward` maps ``task_ids: (batch,)`` int64 to skill weights ``(batch, n_splits, n_skills)`` that sum
    to 1 over the skills (up to ``EPS``): ``sigmoid`` of the logits in eval mode, a relaxed-Bernoulli sample
    (temperature 1, reparameterised, so the logits get gradients) in training mode.
    """

    def __init__(self, n_tasks: int, n_skills: int, n_splits: int) -> None:
        super().__init__()
        self.n_tasks, self.n_skills, self.n_splits = n_tasks, n_skills, n_splits
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))

    def reset(self) -> None:
        """Logits uniform in ``[-1e-3, 1e-3]`` (nearly equal weights for every skill), as peft."""
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: Tensor) -> Tensor:
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        logits = logits.view(-1, self.n_splits, self.n_skills)
        if self.training:
            weights = RelaxedBernoulli(temperature=torch.tensor(1.0, device=logits.device), logits=logits).rsample()
        else:
            weights = torch.sigmoid(logits)
        return weights / (weights.sum(-1, keepdim=True) + EPS)


class PolyLinear(Adapter):
    """Poly on ``nn.Linear`` / GPT-2 ``Conv1D``: ``x: (batch, ..., in) -> (batch, ..., out)``; row ``b`` of the batch
    uses the skills mixed for its task id (see the module docstring for the equation and
    :class:`PolyConfig` for the parameter shapes)."""

    mergeable = False

    def __init__(self, in_features: int, out_features: int, r: int, n_tasks: int, n_skills: int,
                 n_splits: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.n_tasks, self.n_skills, self.n_splits = r, n_tasks, n_skills, n_splits
        self.poly_lora_A = nn.Parameter(torch.empty(n_splits, n_skills, in_features // n_splits, r))
        self.poly_lora_B = nn.Parameter(torch.empty(n_splits, n_skills, r, out_features // n_splits))
        self.poly_router = PolyRouter(n_tasks, n_skills, n_splits)
        #: the task ids of the latest forward that was not a recomputation (activation checkpointing
        #: recomputes a layer in ``backward()``, after the call that gave the ids has ended)
        self._last_task_ids: Tensor | None = None

    def reset(self, init_weights: bool) -> None:
        """Each skill's and split's ``A`` Kaiming-uniform over its ``in / n_splits`` inputs, as an ``nn.Linear``
        weight is drawn; ``B`` zero (``init_weights=True``) or drawn the same way over its ``r`` inputs; the
        router's logits as :meth:`PolyRouter.reset`."""
        with torch.no_grad():
            for q in range(self.n_splits):
                for s in range(self.n_skills):
                    a = torch.empty(self.r, self.in_features // self.n_splits)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    self.poly_lora_A[q, s] = a.T
                    if init_weights:
                        self.poly_lora_B[q, s].zero_()
                    else:
                        b = torch.empty(self.out_features // self.n_splits, self.r)
                        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                        self.poly_lora_B[q, s] = b.T
        self.poly_router.reset()

    def task_ids_for(self, layer: AdaptedLayer, rows: int) -> Tensor:
        """The task id of each of the ``rows`` rows this layer sees: ``(rows,)`` int64.

        The ids come from the running call (``task_ids=`` given to the model); a batch that is a whole
        multiple of them (``generate``'s beams and return sequences) repeats each id for its copies. Without ids
        an adapter of one task uses task 0 for every row.

        Raises:
            ValueError: no ids were given and ``n_tasks > 1``, or their number does not fit ``rows``.
        """
        ctx = layer._ctx
        ids = None if ctx is None else ctx.task_ids
        if ctx is not None and ids is None and ctx.recomputing():
            ids = self._last_task_ids
        if ids is None:
            if self.n_tasks > 1:
                raise ValueError(f"this Poly adapter has n_tasks={self.n_tasks} and needs one task id per row: "
                                 "pass task_ids=[...] (integers in [0, n_tasks)) to the model's forward or generate")
            return torch.zeros(rows, dtype=torch.long)
        if ids.shape[0] != rows:
            if rows % ids.shape[0]:
                raise ValueError(f"task_ids has {ids.shape[0]} entries but a Poly layer saw {rows} rows; give one "
                                 "task id per batch row")
            ids = ids.repeat_interleave(rows // ids.shape[0])
        return ids

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        rows = x.shape[0]
        ids = self.task_ids_for(layer, rows)
        ctx = layer._ctx
        if ctx is None or not ctx.recomputing():
            self._last_task_ids = ids
        weights = self.poly_router(ids)  # (rows, n_splits, n_skills)
        a = torch.einsum("bqs,qsdr->bqdr", weights, self.poly_lora_A).reshape(rows, self.in_features, self.r)
        b = torch.einsum("bqs,qsrd->bqrd", weights, self.poly_lora_B)
        b = b.transpose(1, 2).reshape(rows, self.r, self.out_features)
        h = x.reshape(rows, -1, self.in_features).to(a.dtype)
        delta = h.bmm(a).bmm(b).reshape(y.shape) / self.r
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, n_tasks={self.n_tasks}, n_skills={self.n_skills}, n_splits={self.n_splits}"


class PolyTuner(WrapTuner):
    """Builds :class:`PolyLinear` adapters on ``nn.Linear`` and GPT-2 ``Conv1D`` targets."""

    method = "Poly"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return linear_types()

    def make_adapter(self, base: nn.Module, config: PolyConfig, module_name: str) -> Adapter:
        """A :class:`PolyLinear` of the config's sizes for ``base``.

        Raises:
            ConfigError: ``n_splits`` does not divide the module's input or output features.
        """
        transposed = not isinstance(base, nn.Linear)
        in_f, out_f = base.weight.shape if transposed else base.weight.shape[::-1]
        if in_f % config.n_splits or out_f % config.n_splits:
            raise ConfigError(f"n_splits={config.n_splits} must divide the input and output features of every "
                              f"adapted module; {module_name!r} has {in_f} inputs and {out_f} outputs")
        adapter = PolyLinear(in_f, out_f, config.r, config.n_tasks, config.n_skills, config.n_splits)
        adapter.reset(config.init_weights)
        return adapter


def poly_from_cli(args: Any) -> PolyConfig:
    """Poly from ``peftkit train`` options ``args`` (default learning rate 1e-2): ``--r`` (default 8), ``--target-modules`` (default: the model
    type's LoRA targets) and one task (``n_tasks=1``: the datasets carry no task ids, so every row is task 0),
    4 skills, 1 split unless ``--option`` says otherwise."""
    return PolyConfig(r=args.r or 8, target_modules=args.target_modules, task_type=args.task_type)


# the CLI's datasets carry no task ids: one task, every row task 0
poly_from_cli.defining_fields = {"n_tasks": 1}  # type: ignore[attr-defined]
poly_from_cli.defining_reason = ("the datasets of `peftkit train` carry no task ids, so every row is task 0; "  # type: ignore[attr-defined]
                                 "for several tasks build PolyConfig(n_tasks=...) in Python and pass task_ids=... "
                                 "to the model")


register_method(MethodSpec(
    name="poly", config_cls=PolyConfig, family="multi-task", kind="wrap", mergeable=False, paper=PAPER,
    tuner=PolyTuner(), cli_config=poly_from_cli, aliases=("polytropon", "mhr"),
    # the skills' sum is divided by r (no alpha), so at LoRA's 1e-3 it barely moves in a short run: SST-2 on
    # MiniLM, 150 steps of 16 rows, reached 0.524 at 1e-3 and 0.800 at 1e-2 (LoRA: 0.800)
    default_lr=1e-2,
))
