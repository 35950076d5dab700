"""``torch.func`` over adapted models: ``grad`` gives the gradients ``.backward()`` gives, and ``vmap`` of it gives
per-example gradients (as differential-privacy training uses) that equal one backward per example.

The fused LoRA/DoRA node decides in its forward what its backward needs, which ``torch.func`` does not allow:
under a transform those layers run as plain ops; the other custom autograd nodes (LoHa's product, DoRA's
rescale, the quantised base's linear, Child-Tuning's gradient mask) define ``setup_context``, and dropout is
torch's own (which ``vmap`` can batch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from peftkit import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig, get_peft_model
from peftkit.ops import func_transforms_active

TARGETS = ["fc", "out"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False),
    "dora": lambda: LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False, use_dora=True, bias="all"),
    "loha": lambda: LoHaConfig(r=2, target_modules=TARGETS, init_weights=False),
    "lokr": lambda: LoKrConfig(r=2, target_modules=TARGETS, init_weights=False),
    "ia3": lambda: IA3Config(target_modules=TARGETS, feedforward_modules=["out"]),
    "vera": lambda: VeraConfig(r=4, target_modules=TARGETS),
}


class _Net(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)))


def _model(name: str, quantized: bool = False) -> nn.Module:
    torch.manual_seed(0)
    base = _Net()
    if quantized:
        from peftkit.quant import quantize_base

        base = quantize_base(base, "nf4", skip_modules=[])
    model = get_peft_model(base, CONFIGS[name]())
    with torch.no_grad():  # every factor away from its start, so that no gradient is trivially zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def _loss(model: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1, 1, 4)
    return (functional_call(model, params, (x,)) * weights).square().sum()


def _trainable(model: nn.Module) -> dict:
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def _backward_grads(model: nn.Module, x: torch.Tensor) -> dict:
    model.zero_grad()
    _loss(model, dict(model.named_parameters()), x).backward()
    return {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}


def _assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert want[k].abs().max() > 0, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * want[k].abs().max().item(), msg=k)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_func_grad_equals_backward(name):
    model = _model(name)
    x = torch.randn(40, 64)  # enough rows for the fused LoRA node to fold B A into the weight
    _assert_close(grad(lambda p: _loss(model, p, x))(_trainable(model)), _backward_grads(model, x))


@pytest.mark.parametrize("name", ["lora", "dora", "loha"])
def test_vmap_gives_each_examples_gradient(name):
    model = _model(name)
    x = torch.randn(6, 64)
    per_example = vmap(grad(lambda p, row: _loss(model, p, row[None])), in_dims=(None, 0))(_trainable(model), x)
    for i in range(len(x)):
        _assert_close({k: v[i] for k, v in per_example.items()}, _backward_grads(model, x[i:i + 1]))


def test_func_grad_through_a_quantized_base():
    pytest.importorskip("torchao")
    model = _model("lora", quantized=True)
    x = torch.randn(40, 64)
    _assert_close(grad(lambda p: _loss(model, p, x))(_trainable(model)), _backward_grads(model, x))


def test_func_grad_with_dropout_is_seeded_and_drops():
    model = get_peft_model(_Net(), LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.3,
                                               init_lora_weights=False)).train()
    x = torch.randn(40, 64)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(grad(lambda p: _loss(model, p, x))(_trainable(model)))
    model.eval()  # no dropout
    plain = grad(lambda p: _loss(model, p, x))(_trainable(model))
    a_key = "base_model.model.fc.adapters.default.lora_A.weight"
    assert torch.equal(runs[0][a_key], runs[1][a_key])
    assert not torch.allclose(runs[0][a_key], runs[2][a_key]) and not torch.allclose(runs[0][a_key], plain[a_key])


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_vmap_with_dropout_draws_per_its_randomness_flag(randomness):
    model = get_peft_model(_Net(), LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.5,
                                               init_lora_weights=False)).train()
    row = torch.randn(1, 64).expand(8, 64)  # one example eight times: only the dropout masks differ
    per_example = vmap(grad(lambda p, r: _loss(model, p, r[None])), in_dims=(None, 0), randomness=randomness)(
        _trainable(model), row)
    spread = max((v - v[:1]).abs().max().item() for v in per_example.values())
    assert spread > 1e-2 if randomness == "different" else spread < 1e-4  # (batched rounding: ~1e-5)


def test_transforms_are_seen_only_inside_them():
    seen = []
    grad(lambda t: (seen.append(func_transforms_active()), t.sum())[1])(torch.ones(2))
    assert seen == [True] and not func_transforms_active()
