"""FISH mask: train a fixed sparse set of entries, those with the largest empirical Fisher information.

Paper: Sung, Nair and Raffel, "Training Neural Networks with Fixed Sparse Masks", 2021,
arXiv:2111.09839.

Equation: ``F_i = (1/N) sum_n (d log p(y_n | x_n) / d theta_i)^2`` on ``N`` training examples;
``M = top-k(F)`` over all selected entries together; ``theta_task = theta + M * delta`` with only
the ``k`` masked entries of ``delta`` trained. Trainable parameters: ``k = round(keep_ratio * N_sel)``
(``N_sel``: the selected entries), stored as indices + values.

The mask is chosen once, before training, by :meth:`peftkit.PeftModel.peft_prepare` (the
:class:`~peftkit.train.Trainer` calls it with training batches); each example's gradient is taken
alone, in eval mode, as in the reference code (batch size 1). Unlike the reference code, the
classifier head is not part of the budget: it is a ``modules_to_save`` module trained in full.

A tensor that several modules share (GPT-2's ``wte``/``lm_head``, a model with ``tie_word_embeddings``) is scored
once, by the square of its whole gradient (every use), as the reference code ranks ``named_parameters()``; its
chosen entries change at every module that shares it (:class:`~peftkit.methods.selective.TiedDifference`), and
are stored once, under the module it was selected on (the first in the model, the input embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.config import MethodSpec, check, register_method
from peftkit.methods.selective import FisherMaskTuner, SelectiveConfig, check_fraction

FISH_PAPER = "Training Neural Networks with Fixed Sparse Masks (Sung et al., 2021, arXiv:2111.09839)"


@dataclass
class FishMaskConfig(SelectiveConfig):
    """Configuration of the FISH mask (selective family).

    Args:
        keep_ratio: fraction of the selected entries that train, in (0, 1]. Default 0.005 (the
            paper's 0.5%).
        num_fisher_samples: training examples the Fisher information is averaged over, >= 1.
            Default 1024 (the paper's setting).
        target_modules: modules whose ``weight``/``bias`` may be masked in; None (default) = every
            module (the paper ranks all parameters).
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: see
            :class:`~peftkit.methods.selective.SelectiveConfig`.

    Trainable parameters: ``round(keep_ratio * N_sel)``.

    Raises:
        ConfigError: ``keep_ratio`` outside (0, 1], ``num_fisher_samples < 1``, or a budget that
            rounds to 0 entries.

    Paper: Training Neural Networks with Fixed Sparse Masks (Sung et al., 2021, arXiv:2111.09839).
    """

    peft_type = "FISH_MASK"
    keep_ratio: float = 0.005
    num_fisher_samples: int = 1024

    def validate(self) -> None:
        super().validate()
        check_fraction("keep_ratio", self.keep_ratio, low_open=True, high_open=False)
        check_num_samples(self.num_fisher_samples)


def check_num_samples(value: Any) -> None:
    """Check ``num_fisher_samples``: ``value`` must be an integer >= 1.

    Raises:
        ConfigError: ``value`` is not an integer (bool excluded) >= 1.
    """
    check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          f"num_fisher_samples={value!r} is not valid; it must be an integer >= 1")


class FishMaskTuner(FisherMaskTuner):
    """Top-``keep_ratio`` Fisher entries of every selected tensor, chosen before training."""

    method = "FISH mask"
    fraction_name = "keep_ratio"


def fish_from_cli(args: Any) -> FishMaskConfig:
    """Build a :class:`FishMaskConfig` from ``peftkit train`` options ``args`` (``--option keep_ratio=0.01``; other fields at their defaults)."""
    return FishMaskConfig(target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="fish", config_cls=FishMaskConfig, family="selective", kind="select", mergeable=True,
    paper=FISH_PAPER, tuner=FishMaskTuner(), cli_config=fish_from_cli, default_lr=1e-4,
))
