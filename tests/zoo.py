"""Shared checks for the weight-delta methods (AdaLoRA, LoHa, LoKr, KronA, SoRA) on a zoo of layers."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import get_peft_model
from peftkit.layers import AdaptedLayer
from tests.conftest import perturb, tiny_bert_classifier


class Zoo(nn.Module):
    """Linear, square and non-square GPT-2 ``Conv1D``, a (grouped) ``Conv2d`` and a ``Conv1d``."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.square = Conv1D(12, 12)        # GPT-2 layout: weight (in=12, out=12)
        self.wide = Conv1D(20, 12)          # weight (in=12, out=20)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
        self.conv1 = nn.Conv1d(8, 6, 2, stride=2)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        parts = [self.lin(x[..., :8]), self.square(x), self.wide(x), self.conv2(img),
                 self.conv1(img.flatten(2)[:, :, :8].repeat(1, 2, 1))]
        return torch.cat([p.flatten(1) for p in parts], dim=1)


TARGETS = ["lin", "square", "wide", "conv2", "conv1"]
# (out, in/groups * prod(kernel)) of each target, for parameter-count formulas
SHAPES = {"lin": (12, 8), "square": (12, 12), "wide": (20, 12), "conv1": (6, 16)}


def zoo_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, 12, generator=g), torch.randn(3, 4, 6, 6, generator=g)


def adapted_zoo(config, groups: int = 2):
    """``(base, peft_model)`` on a fresh zoo with every trainable adapter parameter perturbed."""
    base = Zoo(groups=groups)
    model = get_peft_model(base, config)
    perturb(model)
    return base, model


def assert_merge_exact(model, x, tol: float = 1e-5) -> None:
    """The adapters change the output, and ``merge_and_unload`` gives the unmerged output."""
    model.eval()
    with torch.no_grad():
        before = model(*x)
        with model.disable_adapter():
            base_out = model(*x)
        assert (before - base_out).abs().max() > 1e-2  # the adapters really change the output
        merged = model.merge_and_unload()
        after = merged(*x)
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert (before - after).abs().max().item() <= tol


def cycled_logits(model, input_ids, cycles: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unmerged, merged)`` logits of an HF model after ``cycles`` merge/unmerge cycles and one more merge; the
    model is left unmerged."""
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        for _ in range(cycles):
            model.merge_adapter()
            model.unmerge_adapter()
        model.merge_adapter()
        merged = model(input_ids=input_ids).logits
        model.unmerge_adapter()
    return unmerged, merged


def assert_fifty_cycles(base, model, x) -> None:
    """50 merge/unmerge cycles restore the base weights; merged output equals unmerged."""
    model.eval()
    snapshot = {k: v.clone() for k, v in base.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        unmerged = model(*x)
        for _ in range(50):
            model.merge_adapter()
            model.unmerge_adapter()
        model.merge_adapter()
        merged_once = model(*x)
        model.unmerge_adapter()
    assert (merged_once - unmerged).abs().max() <= 1e-5
    now = base.state_dict()
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5


def train_tiny_bert(config, marker: str, steps: int = 40, lr: float = 3e-2) -> tuple[list[float], object]:
    """Train on a tiny classification batch with the method's hooks (penalty, step end); asserts that
    only parameters whose name contains ``marker`` (or the classifier copy) get gradients."""
    model = get_peft_model(tiny_bert_classifier(), config)
    model.train()
    x = torch.randint(3, 64, (8, 10))
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=x, labels=labels).loss
        extra = model.peft_regularization()
        (loss if extra is None else loss + extra).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert marker in name or ".modules_to_save.default." in name, name
        opt.step()
        model.peft_step_end(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model
