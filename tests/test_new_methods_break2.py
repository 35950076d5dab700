"""Adversarial checks of HRA, FourierFT, LN tuning and trainable tokens: each test pins a defect found and fixed."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from peftkit import ConfigError, HRAConfig, LoraConfig, TrainableTokensConfig, get_peft_model
from peftkit.artifacts import merge_adapter_folders
from tests.conftest import ids, perturb, tiny_gpt2, tiny_llama


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


def test_trainable_tokens_merge_and_unload_keeps_a_tied_head_tied_as_peft():
    x = ids()
    x[:, :3] = torch.tensor([5, 9, 3])
    pairs = [(TrainableTokensConfig(token_indices=[5, 9, 3]), peft.TrainableTokensConfig(token_indices=[5, 9, 3])),
             (LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[5, 9, 3]),
              peft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[5, 9, 3]))]
    for ours, theirs in pairs:
        model = get_peft_model(tiny_gpt2(), ours)
        perturb(model)
        want = logits(model.eval(), x)
        merged = model.merge_and_unload()
        assert merged.lm_head.weight is merged.transformer.wte.weight
        assert torch.allclose(logits(merged, x), want, atol=1e-5)
        reference = peft.get_peft_model(tiny_gpt2(), theirs).merge_and_unload()
        assert reference.lm_head.weight is reference.transformer.wte.weight  # what peft gives


def test_lora_on_a_tied_embedding_alone_still_unties_the_head_when_merged():
    # the head does not share the change (peftkit's documented behaviour): it must keep the base table
    base = tiny_gpt2()
    table = base.transformer.wte.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["wte"]))
    perturb(model)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert torch.equal(merged.lm_head.weight, table)
    assert not torch.equal(merged.transformer.wte.weight, table)


def test_add_weighted_adapter_refuses_lora_with_trainable_token_indices_naming_the_option(tmp_path):
    # the combination keeps the low-rank factors alone: the trained rows would be dropped; the refusal named an
    # internal class (LoraTokenAdapter) instead of the option, from add_weighted_adapter and from `peftkit merge`
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[5, 9]))
    model.add_adapter("two", LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[5, 9]))
    with pytest.raises(ConfigError, match=r"adapter 'default' is LORA with trainable_token_indices; "
                                          "add_weighted_adapter combines plain LoRA"):
        model.add_weighted_adapter(["default", "two"], [0.5, 0.5], "mix")
    assert "mix" not in model.peft_config
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"holds an adapter of type LORA with trainable_token_indices; only plain LoRA"):
        merge_adapter_folders([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], str(tmp_path / "out"))
