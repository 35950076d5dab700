"""Optimiser helpers for PEFT methods.

LoRA+: Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", 2024,
arXiv:2402.12354. Equation: the learning rate of ``B`` is ``lr_B = loraplus_lr_ratio * lr_A``
(``loraplus_lr_ratio`` > 1, 16 in the paper's experiments); the trainable parameters are those of
the adapter, unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from peftkit.config import check
from peftkit.layers import AdaptedLayer


def create_loraplus_optimizer(model: Any, optimizer_cls: type[Optimizer], lr: float, loraplus_lr_ratio: float = 16.0,
                              loraplus_lr_embedding: float = 1e-6, **kwargs: Any) -> Optimizer:
    """An optimiser whose parameter groups give LoRA's ``B`` a larger learning rate (mirrors peft's helper).

    Trainable parameters are grouped as peft groups them:

    * adapter matrices on ``nn.Embedding`` layers: ``lr = loraplus_lr_embedding``;
    * ``lora_B`` parameters and every 1-D parameter (biases, DoRA magnitudes, norms):
      ``lr * loraplus_lr_ratio``, with weight decay ``loraplus_weight_decay`` except for biases and
      LayerNorm parameters (no decay);
    * everything else (``lora_A``, ``modules_to_save`` matrices): ``lr``.

    Args:
        model: a :class:`~peftkit.PeftModel` (or any module; then no embedding group is found).
        optimizer_cls: e.g. ``torch.optim.AdamW``.
        lr: the learning rate of A, > 0.
        loraplus_lr_ratio: ``lr_B / lr_A``, > 0. Default 16.
        loraplus_lr_embedding: the learning rate of embedding adapters, > 0. Default 1e-6.
        **kwargs: passed to ``optimizer_cls``; ``loraplus_weight_decay`` (default 0.0) is taken out first.

    Returns:
        the optimiser, with peft's four groups in its order (A, embedding, B, B without weight decay), empty
        ones included.

    Raises:
        ConfigError: a non-positive ``lr``, ratio or embedding learning rate, or no trainable parameter.

    Paper: LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou et al., 2024, arXiv:2402.12354).
    """
    check(lr > 0, f"lr={lr!r} must be > 0")
    check(loraplus_lr_ratio > 0, f"loraplus_lr_ratio={loraplus_lr_ratio!r} must be > 0 (usually >= 1)")
    check(loraplus_lr_embedding > 0, f"loraplus_lr_embedding={loraplus_lr_embedding!r} must be > 0")
    decay = kwargs.pop("loraplus_weight_decay", 0.0)
    embedding, no_decay = set(), set()
    for module in model.modules():
        if isinstance(module, AdaptedLayer) and isinstance(module.base_layer, nn.Embedding):
            embedding |= {id(p) for p in module.adapters.parameters() if p.dim() > 1}
        if isinstance(module, nn.LayerNorm):
            no_decay |= {id(p) for p in module.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        segments = name.split(".")
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif "lora_B" in segments or p.dim() == 1:
            groups["B_no_decay" if id(p) in no_decay or segments[-1] == "bias" else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, decay), "embedding": (loraplus_lr_embedding, decay), "B": (lr * loraplus_lr_ratio, decay),
                "B_no_decay": (lr * loraplus_lr_ratio, 0.0)}
    # always the four groups, in peft's order (an empty one too), so that per-group code ported from peft (a LambdaLR
    # with four lambdas, param_groups[2]) keeps working
    param_groups = [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1]} for k, ps in groups.items()]
    check(any(groups.values()), "the model has no trainable parameter")
    return optimizer_cls(param_groups, lr=lr, **kwargs)
