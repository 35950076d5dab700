"""Diff pruning: a sparse task-specific difference vector on top of the frozen pretrained weights.

Paper: Guo, Rush and Kim, "Parameter-Efficient Transfer Learning with Diff Pruning", 2020,
arXiv:2012.07463.

Equation: ``theta_task = theta + delta`` with ``||delta||_0 <= (1 - s) * N`` (``s`` the target
sparsity, ``N`` the number of selected entries). Trainable parameters while training: ``N`` (a
dense ``delta``, projected back to ``k = round((1 - s) * N)`` non-zeros after every step); changed
and stored parameters: ``k``.

Variant implemented: projected gradient descent onto the sparsity constraint (iterative magnitude
projection). After every optimiser step ``delta`` keeps its ``k`` largest-magnitude entries over
all selected tensors together and the rest are set to 0. Why: the constraint then holds exactly
after every step (so wherever a run stops), with no extra hyper-parameters; it is the magnitude
projection the paper itself applies to reach its target sparsity (its Sec. 3.3), used throughout
instead of only after an L0 (hard-concrete) relaxation phase, which needs a temperature, a stretch
interval and a penalty weight to be tuned. The paper's closing fixed-mask phase is what a saved
adapter gives when loaded with ``is_trainable=True``: its ``k`` entries train, the mask stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftkit.config import MethodSpec, register_method
from peftkit.methods.selective import (
    SelectAdapter,
    SelectiveConfig,
    SelectTuner,
    budget,
    check_fraction,
    global_topk,
)
from peftkit.tuners import check_unmerged

DIFF_PRUNING_PAPER = ("Parameter-Efficient Transfer Learning with Diff Pruning "
                      "(Guo et al., 2020, arXiv:2012.07463)")


@dataclass
class DiffPruningConfig(SelectiveConfig):
    """Configuration of diff pruning (selective family).

    Args:
        target_sparsity: fraction of the selected entries whose difference is exactly 0, in [0, 1).
            Default 0.995 (0.5% of the entries change, the paper's main setting).
        target_modules: modules whose ``weight``/``bias`` get a difference; None (default) = every
            module (the paper prunes the difference of the whole model).
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: see
            :class:`~peftkit.methods.selective.SelectiveConfig`.

    Trainable parameters: ``N`` (the selected entries) while training; ``k = round((1 - s) * N)``
    stored as indices + values. The projection runs in ``model.peft_step_end(step)``, which
    peftkit's Trainer calls after every optimiser step; a hand-written loop must call it too (a file
    always stores the difference exactly as it is: its non-zero entries).

    Raises:
        ConfigError: ``target_sparsity`` outside [0, 1), or a budget that rounds to 0 entries.

    Paper: Parameter-Efficient Transfer Learning with Diff Pruning (Guo et al., 2020, arXiv:2012.07463).
    """

    peft_type = "DIFF_PRUNING"
    target_sparsity: float = 0.995

    def validate(self) -> None:
        super().validate()
        check_fraction("target_sparsity", self.target_sparsity, low_open=False, high_open=True)


class DiffPruningTuner(SelectTuner):
    """Dense differences on every selected tensor, projected to the global top-k after each step."""

    method = "diff pruning"

    def make_adapter(self, base: Any, names: tuple[str, ...], config: DiffPruningConfig) -> SelectAdapter:
        """Dense zero differences, written to files as their non-zero entries (``save_sparse``)."""
        return SelectAdapter(base, names, save_sparse=True)

    def check_budget(self, config: DiffPruningConfig, total: int) -> None:
        budget(1 - config.target_sparsity, total, f"target_sparsity={config.target_sparsity!r}")

    def on_step_end(self, host: Any, adapter_name: str, step: int) -> None:
        """Project the dense differences onto the ``k`` largest magnitudes (the rest become 0).

        Raises:
            ConfigError: the adapter is merged (the projection would change what unmerging subtracts).
        """
        check_unmerged(host, adapter_name, "peft_step_end (diff pruning's projection)")
        params = [getattr(a, f"diff_{n}") for _, a in self.adapters(host, adapter_name) for n in a.names
                  if not a.is_sparse[n]]
        if not params:
            return
        config = host.peft_config[adapter_name]
        k = budget(1 - config.target_sparsity, sum(p.numel() for p in params),
                   f"target_sparsity={config.target_sparsity!r}")
        with torch.no_grad():
            for p, idx in zip(params, global_topk([p.abs() for p in params], k), strict=True):
                flat = p.view(-1)
                kept = flat[idx]
                flat.zero_()
                flat[idx] = kept


def diff_pruning_from_cli(args: Any) -> DiffPruningConfig:
    """Build a :class:`DiffPruningConfig` from ``peftkit train`` options ``args`` (``--option target_sparsity=0.99``; other fields at their defaults)."""
    return DiffPruningConfig(target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="diff-pruning", config_cls=DiffPruningConfig, family="selective", kind="select", mergeable=True,
    paper=DIFF_PRUNING_PAPER, tuner=DiffPruningTuner(), cli_config=diff_pruning_from_cli, default_lr=1e-4, shards=False,
))
