"""Adversarial checks of HRA, FourierFT, LN tuning and trainable tokens: each test pins a defect found and fixed."""

from __future__ import annotations

import copy

import torch

from peftkit import HRAConfig, get_peft_model
from tests.conftest import ids, tiny_llama


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_hra_runs_a_bfloat16_model_and_agrees_with_float32():
    # the WY factor's triangular solve has no bfloat16 kernel on CPU: it must run in float32
    base = tiny_llama()
    model = get_peft_model(base, HRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)).eval()
    x = ids()
    full = logits(model, x)
    half = logits(copy.deepcopy(model).to(torch.bfloat16), x).float()
    assert (half - full).abs().max() < 0.05 * full.abs().max()
    model.to(torch.bfloat16).train()
    model(input_ids=x, labels=x).loss.backward()
    grad = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].hra_u.grad
    assert grad is not None and grad.dtype == torch.bfloat16 and grad.abs().sum() > 0
