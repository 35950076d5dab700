"""Child-Tuning: update only a "child network" of the pretrained model by masking gradients.

Paper: Xu, Luo, Zhang, Tan, Chang, Huang and Huang, "Raise a Child in Large Language Model:
Towards Effective and Generalizable Fine-tuning", 2021, arXiv:2109.05687.

Equation: ``w <- w - lr * (dL/dw * M)``.
* Child-Tuning-D (task-driven): ``M`` is fixed, 1 on the ``round(p_D * N)`` entries of largest
  empirical Fisher information ``(1/N) sum_n (dL_n/dw)^2`` over all selected tensors together.
  Trainable parameters: ``round(reserve_p * N_sel)``, stored as indices + values.
* Child-Tuning-F (task-free): ``M ~ Bernoulli(p_F) / p_F``, a fresh mask every optimiser step. As in the
  reference ``ChildTuningAdamW``, which masks the accumulated gradient in ``step()``, the micro-batches
  accumulated into one step share their mask (:class:`~peftkit.methods.selective.StepMask`; a new one is
  drawn at the first backward after the gradients were cleared or ``peft_step_end`` ran; a loop that
  clears them with ``zero_grad(set_to_none=False)`` must call ``model.peft_step_end(step)``).
  Trainable parameters: ``N_sel`` (every selected entry may change over the run), stored dense.

As everywhere in the selective family the update lives in a difference ``delta`` from the frozen
base. D is the same machinery as the FISH mask (:mod:`peftkit.methods.fish`) with the paper's
defaults; the Fisher information is averaged over ``num_fisher_samples`` examples, each alone, in
eval mode (the reference code sums batch gradients over the whole training set). F's masked
gradient then goes through the optimiser unchanged, as in the reference ``ChildTuningAdamW``: with
Adam, an entry outside this step's mask still moves by its momentum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from peftkit.config import MethodSpec, check, register_method
from peftkit.methods.fish import check_num_samples
from peftkit.methods.selective import FisherMaskTuner, SelectAdapter, SelectiveConfig, check_fraction

CHILD_TUNING_PAPER = ("Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning "
                      "(Xu et al., 2021, arXiv:2109.05687)")
CHILD_TYPES = ("D", "F")


@dataclass
class ChildTuningConfig(SelectiveConfig):
    """Configuration of Child-Tuning (selective family).

    Args:
        child_tuning_type: ``"D"`` (default; Fisher-chosen fixed child network) or ``"F"`` (random
            Bernoulli gradient mask each optimiser step, shared by the micro-batches it accumulates).
        reserve_p: ``p_D`` (fraction of entries in the child network) or ``p_F`` (probability that a
            gradient entry is kept), in (0, 1]. Default 0.3.
        num_fisher_samples: examples the Fisher information of type D is averaged over, >= 1.
            Default 1024.
        target_modules: modules whose ``weight``/``bias`` belong to the searched network; None
            (default) = every module.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: see
            :class:`~peftkit.methods.selective.SelectiveConfig`.

    Trainable parameters: D: ``round(reserve_p * N_sel)``; F: ``N_sel``.

    Raises:
        ConfigError: an unknown ``child_tuning_type``, ``reserve_p`` outside (0, 1],
            ``num_fisher_samples < 1``, or a budget that rounds to 0 entries.

    Paper: Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning (Xu et al., 2021,
        arXiv:2109.05687).
    """

    peft_type = "CHILD_TUNING"
    child_tuning_type: str = "D"
    reserve_p: float = 0.3
    num_fisher_samples: int = 1024

    def validate(self) -> None:
        super().validate()
        check(self.child_tuning_type in CHILD_TYPES,
              f"child_tuning_type={self.child_tuning_type!r} is not valid; expected 'D' or 'F'")
        check_fraction("reserve_p", self.reserve_p, low_open=True, high_open=False)
        check_num_samples(self.num_fisher_samples)


class ChildTuningTuner(FisherMaskTuner):
    """Type D: a Fisher mask chosen before training; type F: dense differences with a Bernoulli gradient mask."""

    method = "Child-Tuning"
    fraction_name = "reserve_p"

    def make_adapter(self, base: Any, names: tuple[str, ...], config: ChildTuningConfig) -> SelectAdapter:
        """Type F: dense differences whose gradients get a Bernoulli(``reserve_p``) mask; type D: empty sparse
        differences, filled by :meth:`prepare`."""
        if config.child_tuning_type == "F":
            return SelectAdapter(base, names, grad_keep=config.reserve_p)
        return super().make_adapter(base, names, config)

    def check_budget(self, config: ChildTuningConfig, total: int) -> None:
        if config.child_tuning_type == "D":
            super().check_budget(config, total)

    def prepare(self, host: Any, adapter_name: str, batches: Iterator[dict[str, Tensor]]) -> None:
        if host.peft_config[adapter_name].child_tuning_type == "D":
            super().prepare(host, adapter_name, batches)

    def on_step_end(self, host: Any, adapter_name: str, step: int) -> None:
        """Type F: the next backward draws new gradient masks (one mask per optimiser step)."""
        for _, adapter in self.adapters(host, adapter_name):
            adapter.renew_grad_masks()


def child_tuning_from_cli(args: Any) -> ChildTuningConfig:
    """Build a :class:`ChildTuningConfig` from ``peftkit train`` options ``args`` (``--option child_tuning_type=F``; other fields at their defaults)."""
    return ChildTuningConfig(target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="child-tuning", config_cls=ChildTuningConfig, family="selective", kind="select", mergeable=True,
    paper=CHILD_TUNING_PAPER, tuner=ChildTuningTuner(), cli_config=child_tuning_from_cli, default_lr=1e-4,
))
