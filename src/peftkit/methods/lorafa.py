"""LoRA-FA: LoRA with the down-projection A frozen after its random initialisation.

Paper: Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", 2023, arXiv:2308.03303.

Equation: ``h = W0 x + (alpha / r) * B A dropout(x)`` with ``A: (r, in)`` fixed at its Kaiming-uniform
initialisation and only ``B: (out, r)`` (zero at start) trained. Because ``A`` gets no gradient,
backward keeps only the ``r``-wide projection ``A x`` for ``B``'s gradient instead of the layer input,
which is where the memory saving comes from. Trainable parameters per adapted ``(out, in)`` layer:
``r * out`` (``out * r/groups`` for a convolution, ``embedding_dim * r`` for an embedding; plus ``out``
with ``use_dora``).

Everything else (targets, patterns, rsLoRA, DoRA, merging, the file layout ``lora_A``/``lora_B``) is
LoRA's; files carry ``peft_type: "LORAFA"`` (peft has no such config: it offers LoRA-FA as an
optimiser), so they load here as LoRA-FA and are otherwise plain LoRA files.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.config import MethodSpec, register_method
from peftkit.layers import Adapter
from peftkit.methods.lora import LoraConfig, LoraTuner, lora_from_cli

LORAFA_PAPER = ("LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning "
                "(Zhang et al., 2023, arXiv:2308.03303)")


class LoraFAConfig(LoraConfig):
    """Configuration of LoRA-FA: :class:`~peftkit.methods.lora.LoraConfig`'s fields and checks; ``lora_A``
    is never trained. Trainable parameters per ``(out, in)`` layer: ``r * out``.

    Raises:
        ConfigError: as :class:`~peftkit.methods.lora.LoraConfig`.
    """

    peft_type = "LORAFA"


class LoraFATuner(LoraTuner):
    """LoRA's tuner with every adapter's A listed in ``frozen_parameters``."""

    method = "LoRA-FA"

    def make_adapter(self, base: nn.Module, config: LoraConfig, module_name: str) -> Adapter:
        """LoRA's adapter with its A factor (``a_key``) in ``frozen_parameters``, so that it never trains."""
        adapter = super().make_adapter(base, config, module_name)
        adapter.frozen_parameters = (adapter.a_key,)
        return adapter


def lorafa_from_cli(args: Any) -> LoraFAConfig:
    """Build a :class:`LoraFAConfig` from ``peftkit train`` options."""
    return lora_from_cli(args, LoraFAConfig)


register_method(MethodSpec(
    name="lorafa", config_cls=LoraFAConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=LORAFA_PAPER, tuner=LoraFATuner(), cli_config=lorafa_from_cli, aliases=("lora-fa",),
))
