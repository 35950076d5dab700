"""LoRA-FA: LoRA with the down-projection A frozen after its random initialisation.

Paper: Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", 2023, arXiv:2308.03303.

Equation: ``h = W0 x + (alpha / r) * B A dropout(x)`` with ``A: (r, in)`` fixed at its Kaiming-uniform
initialisation and only ``B: (out, r)`` (zero at start) trained. On an embedding, where LoRA starts
the other way round (A zero, B random: peft's convention), LoRA-FA draws ``A`` from N(0, 1) and sets
``B`` to zero, so that the trained factor is the one that starts at zero. Because ``A`` gets no gradient,
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

import torch
from torch import nn

from peftkit.config import MethodSpec, check, register_method
from peftkit.layers import Adapter
from peftkit.methods.lora import LoraConfig, LoraEmbedding, LoraTuner, lora_from_cli

LORAFA_PAPER = ("LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning "
                "(Zhang et al., 2023, arXiv:2308.03303)")


class LoraFAConfig(LoraConfig):
    """Configuration of LoRA-FA: :class:`~peftkit.methods.lora.LoraConfig`'s fields and checks; ``lora_A``
    is never trained. Trainable parameters per ``(out, in)`` layer: ``r * out``.

    Raises:
        ConfigError: as :class:`~peftkit.methods.lora.LoraConfig`; ``use_qalora=True`` (QA-LoRA's pooled
            input has no separate A factor to freeze).

    Paper: LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning (Zhang et al., 2023,
        arXiv:2308.03303).
    """

    peft_type = "LORAFA"

    def validate(self) -> None:
        super().validate()
        check(not self.use_qalora, "use_qalora=True cannot be combined with LoRA-FA (QA-LoRA's adapter has no "
                                   "A factor to freeze); use LoraConfig(use_qalora=True) or leave it False")


class LoraFATuner(LoraTuner):
    """LoRA's tuner with every adapter's A listed in ``frozen_parameters``."""

    method = "LoRA-FA"

    def make_adapter(self, base: nn.Module, config: LoraConfig, module_name: str) -> Adapter:
        """LoRA's adapter with its A factor(s) (``a_key``; an attention's two, ``a_keys``) in ``frozen_parameters``,
        so that they never train; an
        embedding's factors are re-drawn as A ~ N(0, 1), B = 0 (unless ``init_lora_weights=False``)."""
        adapter = super().make_adapter(base, config, module_name)
        adapter.frozen_parameters = getattr(adapter, "a_keys", (adapter.a_key,))
        if isinstance(adapter, LoraEmbedding) and config.init_lora_weights is not False:
            with torch.no_grad():  # LoRA's embedding init trains from a zero A: with A frozen, nothing would learn
                nn.init.normal_(adapter.lora_embedding_A)
                nn.init.zeros_(adapter.lora_embedding_B)
        return adapter


def lorafa_from_cli(args: Any) -> LoraFAConfig:
    """Build a :class:`LoraFAConfig` from ``peftkit train`` options ``args``, as
    :func:`~peftkit.methods.lora.lora_from_cli` (defaults ``r=8``, ``target_modules="all-linear"``)."""
    return lora_from_cli(args, LoraFAConfig)


register_method(MethodSpec(
    name="lorafa", config_cls=LoraFAConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=LORAFA_PAPER, tuner=LoraFATuner(), cli_config=lorafa_from_cli, aliases=("lora-fa",),
))
