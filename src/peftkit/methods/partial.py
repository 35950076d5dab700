"""Partial fine-tuning: train every parameter of the top ``k`` blocks (or of chosen modules), freeze the rest.

Practice followed: Lee, Tang and Lin, "What Would Elsa Do? Freezing Layers During Transformer
Fine-Tuning", 2019, arXiv:1911.03090 -- fine-tuning only the output-side blocks (about a quarter of
them) keeps most of full fine-tuning's quality; the lower blocks stay frozen.

Equation: ``y = f(x; W + delta_W, b + delta_b)`` for every module in the selected blocks or
modules, ``delta`` dense and trained. Trainable parameters: ``sum_m numel(W_m) + numel(b_m)`` over
the selected modules (plus ``modules_to_save``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit.config import ConfigError, MethodSpec, check, register_method
from peftkit.methods.selective import SELECTABLE, SelectiveConfig, SelectTuner, select_parameters
from peftkit.targeting import iter_logical_modules, layer_index

PARTIAL_PAPER = ("What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning "
                 "(Lee et al., 2019, arXiv:1911.03090)")


@dataclass
class PartialConfig(SelectiveConfig):
    """Configuration of partial fine-tuning (selective family).

    Every ``weight`` and ``bias`` of the selected modules trains (as a dense difference from the
    base, so the base model stays recoverable); everything else is frozen.

    Args:
        num_top_layers: train the last ``k`` transformer blocks, >= 1 (block indices as ``layers_to_transform``
            finds them, peft's rule: after the segment ``layers_pattern`` matches, by default the first number
            segment that follows another segment).
        target_modules: train only modules matching these names/suffixes or regex (within the
            chosen blocks when a block choice is given), e.g. ``["attention.output.dense"]``.
        layers_to_transform: explicit block indices instead of ``num_top_layers``.
        exclude_modules, layers_pattern, modules_to_save: see
            :class:`~peftkit.methods.selective.SelectiveConfig` (``modules_to_save=["pooler"]`` adds
            the pooler, for example).

    Trainable parameters: ``sum of numel(weight) + numel(bias)`` over the selected modules.

    Raises:
        ConfigError: none of ``num_top_layers``/``layers_to_transform``/``target_modules`` is given,
            both block choices are given, ``num_top_layers < 1``, or (when added to a model) the model
            has fewer blocks than ``num_top_layers`` or no block at all.

    Paper: What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning (Lee et al., 2019, arXiv:1911.03090).
    """

    peft_type = "PARTIAL"
    num_top_layers: int | None = None

    def validate(self) -> None:
        super().validate()
        k = self.num_top_layers
        check(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
              f"num_top_layers={k!r} is not valid; it must be an integer >= 1 or None")
        check(k is None or self.layers_to_transform is None,
              f"give num_top_layers={k!r} or layers_to_transform={self.layers_to_transform!r}, not both")
        check(k is not None or self.layers_to_transform is not None or self.target_modules is not None,
              "partial fine-tuning needs num_top_layers, layers_to_transform or target_modules "
              "(which blocks or modules to train)")


class PartialTuner(SelectTuner):
    """Selects every weight and bias in the chosen blocks/modules."""

    method = "partial fine-tuning"

    def select(self, host: Any, config: PartialConfig) -> list[tuple[str, tuple[str, ...]]]:
        """``(module name, parameter names)`` to train: the selectable parameters of the targeted modules, in
        the top ``num_top_layers`` blocks when that is set.

        Raises:
            ConfigError: ``num_top_layers`` is set but no block index is found in the model's module names
                (set ``layers_pattern``), or it exceeds the number of blocks; or as
                :func:`~peftkit.methods.selective.select_parameters`.
        """
        layers = None
        if config.num_top_layers is not None:
            found = {layer_index(name, config.layers_pattern) for name, _ in iter_logical_modules(host.model)}
            found.discard(None)
            if not found:
                raise ConfigError(f"num_top_layers={config.num_top_layers}: no transformer block found in the model "
                                  f"(layers_pattern={config.layers_pattern!r}); set layers_pattern")
            count = max(found) + 1
            check(config.num_top_layers <= count,
                  f"num_top_layers={config.num_top_layers} but the model has {count} blocks")
            layers = list(range(count - config.num_top_layers, count))
        return select_parameters(host, config, SELECTABLE, self.method, layers)


def partial_from_cli(args: Any) -> PartialConfig:
    """Build a :class:`PartialConfig` from ``peftkit train`` options ``args``: the top 2 blocks unless
    ``--target-modules`` or ``--option layers_to_transform=[...]`` says otherwise."""
    layers = args.method_options.get("layers_to_transform")
    explicit = args.target_modules is not None or layers is not None
    # the blocks are given to the config here (the --option itself is applied after it is built, too late for
    # its check that something is selected)
    return PartialConfig(target_modules=args.target_modules, num_top_layers=None if explicit else 2,
                         layers_to_transform=layers, task_type=args.task_type)


register_method(MethodSpec(
    name="partial", config_cls=PartialConfig, family="selective", kind="select", mergeable=True,
    paper=PARTIAL_PAPER, tuner=PartialTuner(), cli_config=partial_from_cli, default_lr=1e-4,
))
