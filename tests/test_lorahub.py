"""LoraHub: the search finds the composition that fits a few examples, with forward passes only."""

from __future__ import annotations

import pytest
import torch

from peftkit import ConfigError, LoraConfig, get_peft_model
from peftkit.lorahub import lorahub
from tests.conftest import ids, tiny_llama


def upstream():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters." in n:
                p.add_(torch.randn_like(p) * 0.8)
    return model


def test_lorahub_recovers_the_adapter_that_explains_the_examples():
    model = upstream()
    x = ids(batch=6, seq=8)
    with torch.no_grad():
        model.set_adapter("default")
        target = model(input_ids=x).logits  # the new task: behave like adapter 'default'
    batches = [{"input_ids": x, "labels": target}]

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(input_ids=batch["input_ids"]).logits, batch["labels"])

    result = lorahub(model, ["default", "b"], batches, steps=30, l1=0.0, seed=1, loss_fn=loss_fn)
    assert model.active_adapters == ["lorahub"]
    with torch.no_grad():
        with model.disable_adapter():
            base_loss = loss_fn(model, batches[0]).item()
        final = loss_fn(model, batches[0]).item()
    assert final == pytest.approx(result.loss, abs=1e-6)
    assert final < 0.1 * base_loss
    # the composition is quadratic in w (B and A both scale), so the sign of a lone weight does not matter
    assert abs(result.weights[0]) > 0.7 and abs(result.weights[1]) < 0.3
    assert result.evaluations == 1 + 30 * 8


def test_lorahub_errors():
    model = upstream()
    batch = [{"input_ids": ids(), "labels": ids()}]
    with pytest.raises(ConfigError, match="at least two"):
        lorahub(model, ["default"], batch)
    with pytest.raises(ConfigError, match="at least one batch"):
        lorahub(model, ["default", "b"], [])
    model.add_adapter("wide", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="equal rank"):
        lorahub(model, ["default", "wide"], batch)
    assert "lorahub" not in model.peft_config
