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


def test_trainer_builds_the_lora_plus_optimiser():
    """``TrainingArguments(loraplus_lr_ratio=...)``: the Trainer's optimiser is LoRA+'s (B at lr * ratio, the
    weight decay as LoRA+'s), and its steps equal those of the helper's optimiser passed in by hand."""
    from peftkit.train.trainer import Trainer, TrainingArguments
    from tests.tiny_train import classification_items, collate_classification, lora_model

    items = classification_items(8)
    args = dict(max_steps=3, batch_size=4, progress=False, learning_rate=1e-2, weight_decay=0.05)
    torch.manual_seed(0)
    ours = Trainer(lora_model("classifier"), items, collate_classification,
                   TrainingArguments(loraplus_lr_ratio=6.0, **args))
    lrs = {id(p): (g["lr"], g["weight_decay"]) for g in ours.optimizer.param_groups for p in g["params"]}
    for name, p in ours.model.named_parameters():
        if "lora_B" in name:
            assert lrs[id(p)] == (pytest.approx(6e-2), 0.05), name
        elif "lora_A" in name:
            assert lrs[id(p)] == (pytest.approx(1e-2), 0.05), name
    torch.manual_seed(0)
    model = lora_model("classifier")
    by_hand = Trainer(model, items, collate_classification, TrainingArguments(**args),
                      optimizer=create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=6.0,
                                                          loraplus_weight_decay=0.05))
    ours.train(), by_hand.train()
    assert ours.history == pytest.approx(by_hand.history, abs=1e-7) and len(ours.history) == 3
    b = dict(ours.model.named_parameters())
    assert all(torch.equal(p, b[n]) for n, p in by_hand.model.named_parameters())


def test_trainer_refuses_lora_plus_without_lora_b():
    from peftkit import IA3Config
    from peftkit.train.trainer import Trainer, TrainingArguments
    from tests.tiny_train import classification_items, collate_classification, lora_model

    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio=2\.0 .* this model trains none"):
        Trainer(get_peft_model(tiny_gpt2(), IA3Config(target_modules=["c_attn"], feedforward_modules=[])),
                classification_items(4), collate_classification, TrainingArguments(loraplus_lr_ratio=2.0))
    model = lora_model("classifier")
    with pytest.raises(ConfigError, match="makes the Trainer build a LoRA\\+ optimizer; do not pass one"):
        Trainer(model, classification_items(4), collate_classification, TrainingArguments(loraplus_lr_ratio=2.0),
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
            TrainingArguments(loraplus_lr_ratio=bad)


def test_the_four_groups_are_peft_s_empty_ones_included():
    kw = dict(r=4, target_modules=["c_attn"])
    ours = create_loraplus_optimizer(get_peft_model(tiny_gpt2(), peftkit.LoraConfig(**kw)), torch.optim.AdamW,
                                     lr=1e-3, loraplus_lr_ratio=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_loraplus(peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**kw)), torch.optim.AdamW,
                               lr=1e-3, loraplus_lr_ratio=8)
    shape = [(g["lr"], g["weight_decay"], len(g["params"])) for g in ours.param_groups]
    assert shape == [(g["lr"], g["weight_decay"], len(g["params"])) for g in theirs.param_groups]
    assert len(shape) == 4 and shape[1][2] == 0  # no embedding adapter: an empty group, as in peft
    torch.optim.lr_scheduler.LambdaLR(ours, [lambda step: 1.0] * 4)
