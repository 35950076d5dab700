"""LoRA layers: exact merging on every supported layer type, parameter counts, training, checkpointing."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import ConfigError, LoraConfig, get_peft_model
from tests.conftest import perturb, tiny_bert_classifier, tiny_gpt2


class Zoo(nn.Module):
    """One of every layer type LoRA supports, each on a unit-scale input and all in the output."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 12)
        self.square = Conv1D(12, 12)        # GPT-2 layout: weight (in=12, out=12)
        self.wide = Conv1D(20, 12)          # weight (in=12, out=20)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
        self.conv1 = nn.Conv1d(8, 6, 2, stride=2)

    def forward(self, ids: torch.Tensor, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        parts = [self.emb(ids), self.lin(x[..., :8]), self.square(x), self.wide(x), self.conv2(img),
                 self.conv1(img.flatten(2)[:, :, :8].repeat(1, 2, 1))]
        return torch.cat([p.flatten(1) for p in parts], dim=1)


TARGETS = ["emb", "lin", "square", "wide", "conv2", "conv1"]


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 20, (3, 5), generator=g), torch.randn(3, 5, 12, generator=g),
            torch.randn(3, 4, 6, 6, generator=g))


def adapted(**kw) -> tuple[nn.Module, object]:
    base = Zoo(groups=kw.pop("groups", 2))
    targets = [t for t in TARGETS if t != "emb"] if kw.get("lora_bias") else TARGETS  # no lora_bias on embeddings
    model = get_peft_model(base, LoraConfig(target_modules=targets, **kw))
    perturb(model)
    return base, model


@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=7),
    dict(r=4, lora_alpha=3, use_rslora=True),
    dict(r=2, lora_alpha=16, bias="lora_only"),
    dict(r=4, lora_alpha=5, lora_bias=True),
    dict(r=4, lora_alpha=8, fan_in_fan_out=True, groups=4),
    dict(r=2, lora_alpha=2, init_lora_weights="gaussian", rank_pattern={"conv2": 4}, alpha_pattern={"lin": 9}),
])
def test_merge_and_unload_equals_unmerged(kw):
    _, model = adapted(**kw)
    x = inputs()
    with torch.no_grad():
        before = model(*x)
        with model.disable_adapter():
            base_out = model(*x)
        assert (before - base_out).abs().max() > 1e-2  # the adapters really change the output
        merged = model.merge_and_unload()
        after = merged(*x)
    assert not any("AdaptedLayer" in type(m).__name__ for m in merged.modules())
    assert (before - after).abs().max().item() <= 1e-5


def test_fifty_merge_cycles_restore_base_weights():
    base, model = adapted(r=4, lora_alpha=11, lora_bias=True)
    snapshot = {k: v.clone() for k, v in base.state_dict().items() if "base_layer" in k}
    x = inputs()
    with torch.no_grad():
        unmerged = model(*x)
        for _ in range(50):
            model.merge_adapter()
            model.unmerge_adapter()
        merged_once = (model.merge_adapter(), model(*x))[1]
        model.unmerge_adapter()
    assert (merged_once - unmerged).abs().max() <= 1e-5
    now = base.state_dict()
    worst = max((now[k] - v).abs().max().item() for k, v in snapshot.items())
    assert worst <= 1e-5


@settings(max_examples=12, deadline=None)
@given(r=st.sampled_from([2, 4, 6]), alpha=st.floats(0.5, 32), rslora=st.booleans(), dropout=st.sampled_from([0.0, 0.3]))
def test_merge_property(r, alpha, rslora, dropout):
    torch.manual_seed(r)
    _, model = adapted(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=dropout)
    model.eval()  # dropout is off in eval, as for any nn.Dropout
    x = inputs()
    with torch.no_grad():
        before = model(*x)
        model.merge_adapter()
        merged = model(*x)
        model.unmerge_adapter()
        again = model(*x)
    assert (before - merged).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())
    assert (before - again).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())


def test_trainable_parameter_count_matches_formula():
    r = 4
    model = get_peft_model(Zoo(groups=2), LoraConfig(r=r, target_modules=TARGETS))
    # Embedding: r*(num + dim); Linear/Conv1D: r*(in + out); Conv: r*(in/g)*k + out*(r/g)
    expected = (r * (20 + 8) + r * (8 + 12) + r * (12 + 12) + r * (12 + 20)
                + (r * (4 // 2) * 9 + 8 * (r // 2)) + (r * 8 * 2 + 6 * r))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in Zoo().parameters())


def test_rslora_scaling():
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                                                      target_modules=["0"]))
    assert model.base_model.model[0].adapters["default"].scaling == pytest.approx(8 / 4)


def test_grouped_conv_needs_divisible_rank():
    from peftkit import ConfigError

    base = Zoo(groups=4)
    with pytest.raises(ConfigError, match="divisible by the convolution's groups=4"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["conv2"]))
    assert isinstance(base.conv2, nn.Conv2d)


def test_training_reduces_loss_and_only_adapter_gets_gradients():
    model = tiny_bert_classifier()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    x = torch.randint(3, 64, (8, 10))
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(40):
        loss = peft_model(input_ids=x, labels=labels).loss
        loss.backward()
        for name, p in peft_model.named_parameters():
            if p.grad is not None:
                assert "adapters.default.lora_" in name or ".modules_to_save.default." in name, name
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_checkpointing_with_frozen_base_gives_adapter_gradients():
    model = tiny_gpt2()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    perturb(peft_model)  # B != 0, so A receives a gradient too
    peft_model.gradient_checkpointing_enable()
    peft_model.train()
    x = torch.randint(3, 64, (2, 8))
    peft_model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert model.transformer.h[0].attn.c_attn.base_layer.weight.grad is None


@pytest.mark.parametrize("field, value, expected", [
    ("r", "8", "r='8' is not valid: expected an integer"),
    ("r", True, "r=True is not valid: expected an integer"),
    ("lora_alpha", float("nan"), "lora_alpha=nan is not valid: numbers must be finite"),
    ("lora_dropout", float("inf"), "lora_dropout=inf is not valid: numbers must be finite"),
    ("use_rslora", "yes", "use_rslora='yes' is not valid: expected true or false"),
    ("rank_pattern", {"q": "4"}, "rank_pattern="),
    ("rank_pattern", {"q_proj(": 2}, "rank_pattern key 'q_proj(' is not a valid regular expression (missing ), "
                                     "unterminated subpattern at position 6 of the key)"),
    ("alpha_pattern", {"": 2}, "alpha_pattern key '' must be a non-empty string"),
])
def test_fields_of_the_wrong_type_or_not_finite_are_refused_by_name(field, value, expected):
    from peftkit import ConfigError, LoraConfig

    with pytest.raises(ConfigError, match=re.escape(expected)):
        LoraConfig(**{field: value})


def test_bias_all_leaves_out_the_original_of_a_module_it_trains_a_copy_of(tmp_path):
    """``bias="all"`` with ``modules_to_save=["classifier"]``: the unused original classifier's bias was trained
    too (peft's count plus 2, a dead parameter in the optimiser, an extra ``original_module`` key in the file)."""
    import peft
    from safetensors.torch import load_file

    base = tiny_bert_classifier()

    def make(lib):
        return lib.LoraConfig(r=4, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"])

    ours = get_peft_model(copy.deepcopy(base), make(peftkit))
    theirs = peft.get_peft_model(copy.deepcopy(base), make(peft))
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    assert not [n for n, p in ours.named_parameters() if p.requires_grad and "original_module" in n]
    ours.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k for k in keys if "classifier" in k) == ["base_model.model.classifier.bias",
                                                             "base_model.model.classifier.weight"]
    assert "base_model.model.bert.pooler.dense.bias" in keys  # the model's other biases still train


def test_lora_bias_on_an_embedding_is_refused_before_anything_changes():
    """peft refuses it; peftkit accepted it and gave only the linear targets a ``lora_B`` bias, silently."""
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"transformer.wte: lora_bias=True is not supported on an embedding"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn", "wte"], lora_bias=True))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_peft_lora_on_a_grouped_convolution_is_refused_with_the_reason(tmp_path):
    """peft's lora_A on a grouped convolution is not grouped, peftkit's is: the error said "was the adapter trained
    with another r or on another base model?", which sent the user looking in the wrong place."""
    import warnings

    import peft

    from peftkit import AdapterLoadError, PeftModel

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: merging is not supported with groups > 1
        peft.get_peft_model(Net(), peft.LoraConfig(r=4, target_modules=["conv"])).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"conv.lora_A.weight: file \(4, 4, 3, 3\) vs model \(4, 2, 3, 3\) "
                                               r"\(lora_A of a grouped convolution: peft's is not grouped"):
        PeftModel.from_pretrained(Net(), tmp_path)


def test_bias_all_in_a_composed_adapter_also_leaves_out_the_original_head():
    """A part of a composition uses its owner's trained copy of the head: its original's bias is not trained."""
    from peftkit import ComposedConfig, IA3Config

    model = get_peft_model(tiny_bert_classifier(), ComposedConfig(modules_to_save=["classifier"], configs=[
        LoraConfig(r=2, target_modules=["query"], bias="all"), IA3Config(target_modules=["value"], feedforward_modules=[])]))
    trained = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert sorted(trained) == ["base_model.model.classifier.modules_to_save.default.bias",
                               "base_model.model.classifier.modules_to_save.default.weight"]


def test_merge_and_unload_with_one_name_as_a_string_keeps_its_trained_head():
    """``adapter_names="name"`` was split into characters when picking the trained copies: the result had the
    original head (off by 0.45)."""
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"],
                                                              modules_to_save=["classifier"]), adapter_name="myad")
    perturb(model)
    x = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        model.eval()
        before = model(input_ids=x).logits
        plain = model.merge_and_unload(adapter_names="myad")
        assert (plain(input_ids=x).logits - before).abs().max() <= 1e-5


class _Volume(nn.Module):
    """A plain and a grouped 3-d convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.vol = nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1))
        self.grouped = nn.Conv3d(6, 4, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(torch.tanh(self.vol(x)))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv3d_merges_exactly_over_fifty_cycles_and_moves_to_peft(dora, tmp_path):
    """The README lists nn.Conv3d among LoRA's layers; no test had one. (peft's lora_A on a grouped convolution is
    not grouped, see the README, so only the plain convolution's adapter moves to peft.)"""
    import warnings

    import peft

    from tests.zoo import assert_fifty_cycles

    torch.manual_seed(0)
    base = _Volume()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["vol", "grouped"], use_dora=dora))
    perturb(model)
    x = (torch.randn(2, 4, 3, 5, 5),)
    assert_fifty_cycles(base, model, x)
    with torch.no_grad():
        with model.disable_adapter():
            assert (model(*x) - twin(*x)).abs().max() <= 1e-6
        expected = model(*x)
    model.save_pretrained(tmp_path / "both")
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "both")
    plain = get_peft_model(copy.deepcopy(twin), LoraConfig(r=2, target_modules=["vol"], use_dora=dora))
    perturb(plain)
    plain.save_pretrained(tmp_path / "plain")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        assert (loaded(*x) - expected).abs().max() <= 1e-5
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "plain")
        assert (theirs(*x) - plain(*x)).abs().max() <= 1e-5


def test_gemma4_defaults_to_peft_s_regex_over_its_language_model():
    import warnings

    import peft
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    def model():
        torch.manual_seed(0)
        text = Gemma4TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        return Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peftkit.get_peft_model(model(), peftkit.LoraConfig(r=2))
        theirs = peft.get_peft_model(model(), peft.LoraConfig(r=2))
    assert ours.peft_config["default"].target_modules == r".*language_model\..*\.(q_proj|v_proj)"
    adapted = sorted(n.removesuffix(".lora_A.default.weight") for n, _ in theirs.named_parameters() if "lora_A" in n)
    assert sorted(f"base_model.model.{n}" for n, _ in ours.base_model.adapters_of("default", object).items()) == adapted
    assert len(adapted) == 4
