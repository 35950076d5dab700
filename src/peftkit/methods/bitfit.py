"""BitFit: train only the bias terms (all of them, or a chosen subset).

Paper: Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", 2021, arXiv:2106.10199.

Equation: ``y = f(x; W, b + delta_b)`` for every selected module (``W`` frozen, ``delta_b`` trained).
Trainable parameters: the sum of the selected bias sizes, ``sum_m numel(b_m)`` (plus
``modules_to_save``, e.g. the classifier head with ``task_type="SEQ_CLS"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.config import MethodSpec, register_method
from peftkit.methods.selective import SelectiveConfig, SelectTuner, select_parameters

BITFIT_PAPER = ("BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models "
                "(Ben Zaken et al., 2021, arXiv:2106.10199)")


@dataclass
class BitFitConfig(SelectiveConfig):
    """Configuration of BitFit (selective family).

    Trains a difference ``delta_b`` on the ``bias`` of every selected module; weights stay frozen.
    The adapter file holds the bias differences (``<module>.diff_bias``), so loading it onto the base
    model restores the trained model exactly, and ``disable_adapter()`` gives the base model.

    Args:
        target_modules: which modules' biases train: None (default) for every bias of the model; a
            list of names/suffixes or a full-match regex for a subset, e.g. ``["query",
            "intermediate.dense"]`` for the query and intermediate biases (the paper's Sec. 4 subset).
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: see
            :class:`~peftkit.methods.selective.SelectiveConfig`.

    Trainable parameters: ``sum of numel(bias)`` over the selected modules (+ ``modules_to_save``).

    Raises:
        ConfigError: an invalid field, or (when added to a model) no selected module has a bias.

    Paper: BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models (Ben Zaken et
        al., 2021, arXiv:2106.10199).
    """

    peft_type = "BITFIT"


class BitFitTuner(SelectTuner):
    """Selects the ``bias`` of every targeted module."""

    method = "BitFit"

    def select(self, host: Any, config: BitFitConfig) -> list[tuple[str, tuple[str, ...]]]:
        return select_parameters(host, config, ("bias",), self.method)


def bitfit_from_cli(args: Any) -> BitFitConfig:
    """Build a :class:`BitFitConfig` from ``peftkit train`` options ``args`` (``--target-modules`` picks biases; other fields at their defaults)."""
    return BitFitConfig(target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="bitfit", config_cls=BitFitConfig, family="selective", kind="select", mergeable=True,
    paper=BITFIT_PAPER, tuner=BitFitTuner(), cli_config=bitfit_from_cli, default_lr=5e-3,
))
