"""The LoRA+ optimiser helper: parameter groups and learning rates, checked against peft's helper."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import peftkit
from peftkit import ConfigError, LoraConfig, create_loraplus_optimizer, get_peft_model
from tests.conftest import tiny_gpt2


def groups_by_lr(optimizer):
    return sorted((g["lr"], g["weight_decay"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups
                  if g["params"])


@pytest.mark.parametrize("use_dora", [False, True])
def test_groups_match_peft(use_dora):
    kw = dict(r=4, target_modules=["wte", "c_attn", "c_fc"], use_dora=use_dora, modules_to_save=["ln_f"])
    ours = get_peft_model(tiny_gpt2(), peftkit.LoraConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**kw))
    args = dict(lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.1)
    got = groups_by_lr(create_loraplus_optimizer(ours, torch.optim.AdamW, **args))
    assert got == groups_by_lr(peft_loraplus(theirs, torch.optim.AdamW, **args))
    # lora_B of c_attn (out 48) and c_fc (out 64) in 2 blocks, plus the DoRA magnitudes (wte's 16 too)
    assert (8e-3, 0.1, 2 * 4 * (48 + 64) + (16 + 2 * (48 + 64) if use_dora else 0)) in got


def test_b_gets_the_higher_learning_rate():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lrs[id(p)] == pytest.approx(0.4 if ".lora_B." in name else 0.1), name


@pytest.mark.parametrize("kw, message", [(dict(lr=0), "lr=0"), (dict(lr=1e-3, loraplus_lr_ratio=-1), "ratio"),
                                         (dict(lr=1e-3, loraplus_lr_embedding=0), "loraplus_lr_embedding=0")])
def test_bad_values_are_config_errors(kw, message):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=message):
        create_loraplus_optimizer(model, torch.optim.AdamW, **kw)
