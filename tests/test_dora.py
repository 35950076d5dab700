"""DoRA: exact merging (several adapters too), the detached norm, gradients, counts, peft interop."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import ConfigError, LoraConfig, get_peft_model
from peftkit.methods.dora import factored_norm, rescale
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_llama
from tests.test_lora import TARGETS, Zoo, inputs


def dora_zoo(groups: int = 2, **kw):
    base = Zoo(groups=groups)
    model = get_peft_model(base, LoraConfig(target_modules=TARGETS, use_dora=True, **kw))
    perturb(model)
    return base, model


def outputs(model):
    with torch.no_grad():
        return model(*inputs())


@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=7),
    dict(r=4, lora_alpha=3, use_rslora=True, groups=4),
    dict(r=2, lora_alpha=16, bias="lora_only", lora_dropout=0.2),
    dict(r=2, lora_alpha=2, rank_pattern={"conv2": 4}, alpha_pattern={"lin": 9}),
])
def test_merge_and_unload_equals_unmerged_on_every_layer_type(kw):
    _, model = dora_zoo(**kw)
    model.eval()
    before = outputs(model)
    with model.disable_adapter():
        base_out = outputs(model)
    assert (before - base_out).abs().max() > 1e-2
    merged = model.merge_and_unload()
    assert (before - merged(*inputs()).detach()).abs().max() <= 1e-4


def test_fifty_merge_cycles_restore_base_weights():
    base, model = dora_zoo(r=4, lora_alpha=5)
    snapshot = {k: v.clone() for k, v in base.state_dict().items() if "base_layer" in k}
    unmerged = outputs(model)
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    model.merge_adapter()
    assert (outputs(model) - unmerged).abs().max() <= 1e-4
    model.unmerge_adapter()
    now = base.state_dict()
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5


def test_several_dora_adapters_on_one_layer_stay_exact():
    base = Zoo(groups=2)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_dora=True))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True))
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=5, target_modules=["lin", "square", "conv2"]))
    model.set_adapter(["default", "plain", "second"])
    perturb(model)
    expected = outputs(model)
    snapshot = {k: v.clone() for k, v in base.state_dict().items() if "base_layer" in k}
    # any prefix of the active order, merged at once or one by one; each norm comes from the unmerged base
    for steps in ([["default"]], [["default", "plain"]], [None], [["default"], ["plain"], ["second"]]):
        for names in steps:
            model.merge_adapter(names)
            assert (outputs(model) - expected).abs().max() <= 1e-4, steps
        model.unmerge_adapter()
    now = base.state_dict()
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5


def test_factored_norm_equals_norm_of_materialised_weight():
    torch.manual_seed(3)
    w, a, b = torch.randn(3, 5, 12), torch.randn(3, 2, 12), torch.randn(3, 5, 2)
    direct = torch.linalg.vector_norm(w + 0.7 * b @ a, dim=-1)
    assert torch.allclose(factored_norm(w, a, b, 0.7), direct, rtol=1e-5)
    assert torch.allclose(factored_norm(w[0].T.T, a[0], b[0], 0.7), direct[0], rtol=1e-5)


def test_rescale_gradients():
    y = torch.randn(4, 3, 6, dtype=torch.double, requires_grad=True)
    g = torch.rand(6, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(rescale, (y, g, b))
    assert torch.autograd.gradcheck(rescale, (y, g, None))
    conv_g = torch.rand(1, 3, 1, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(rescale, (y, conv_g, b[:3]))


@pytest.mark.parametrize("layer", [nn.Linear(10, 6), Conv1D(6, 10)])
def test_forward_and_gradients_match_the_paper_with_a_detached_norm(layer):
    layer.bias.requires_grad_(False)
    model = get_peft_model(nn.Sequential(layer), LoraConfig(r=3, lora_alpha=5, target_modules=["0"], use_dora=True))
    perturb(model)
    adapter = model.base_model.model[0].adapters["default"]
    x = torch.randn(2, 4, 10)
    out = model(x)
    out.square().sum().backward()
    ours = [p.grad.clone() for p in (adapter.lora_A.weight, adapter.lora_B.weight, adapter.lora_magnitude_vector)]
    params = [p.detach().clone().requires_grad_() for p in (adapter.lora_A.weight, adapter.lora_B.weight,
                                                            adapter.lora_magnitude_vector)]
    a, b, m = params
    w0 = layer.weight.T if isinstance(layer, Conv1D) else layer.weight
    v = w0 + 5 / 3 * b @ a
    reference = nn.functional.linear(x, m[:, None] * v / torch.linalg.vector_norm(v, dim=1, keepdim=True).detach(),
                                     layer.bias)
    reference.square().sum().backward()
    assert (out - reference).abs().max() <= 1e-5
    for got, want in zip(ours, params, strict=True):
        assert torch.allclose(got, want.grad, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base_model_and_trainable_count_matches_formula():
    r = 4
    model = get_peft_model(Zoo(groups=2), LoraConfig(r=r, target_modules=TARGETS, use_dora=True))
    x = inputs()
    with torch.no_grad():
        start = model(*x)
        with model.disable_adapter():
            assert (start - model(*x)).abs().max() <= 1e-5
    # LoRA's count plus one magnitude per output feature (embedding: per embedding dimension)
    expected = (r * (20 + 8) + 8 + r * (8 + 12) + 12 + r * (12 + 12) + 12 + r * (12 + 20) + 20
                + (r * 2 * 9 + 8 * (r // 2) + 8) + (r * 8 * 2 + 6 * r + 6))
    assert model.get_nb_trainable_parameters()[0] == expected
    shapes = {n.split(".")[2]: tuple(p.shape) for n, p in model.named_parameters() if "magnitude" in n}
    assert shapes == {"emb": (8,), "lin": (12,), "square": (12,), "wide": (20,), "conv2": (1, 8, 1, 1),
                      "conv1": (1, 6, 1)}


def test_training_reduces_loss_and_only_adapter_gets_gradients():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"], use_dora=True,
                                                              lora_dropout=0.1, task_type="SEQ_CLS"))
    model.train()
    x, labels = torch.randint(3, 64, (8, 10)), torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(40):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        assert got and all(".lora_" in n or ".modules_to_save.default." in n for n in got), got
        assert any(n.endswith("lora_magnitude_vector") for n in got)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_training_follows_peft_step_by_step():
    """Same model, same initial adapter, no dropout: the loss curves of peft's DoRA and ours coincide."""
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    x, labels = torch.randint(3, 64, (8, 10)), torch.tensor([0, 1] * 4)
    curves = []
    for lib, model in ((peftkit, base), (peft, twin)):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapted = lib.get_peft_model(model, lib.LoraConfig(r=4, target_modules=["query", "value", "dense"],
                                                               use_dora=True, task_type="SEQ_CLS"))
        adapted.train()
        opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=3e-2)
        curve = []
        for _ in range(8):
            loss = adapted(input_ids=x, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0][-1] < curves[0][0]
    assert max(abs(a - b) for a, b in zip(*curves, strict=True)) <= 1e-4


def _zoo_logits(model):
    return outputs(model)


@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_peft_interop_on_every_layer_type(direction, tmp_path):
    base = Zoo(groups=1)
    twin = copy.deepcopy(base)
    kw = dict(r=4, lora_alpha=6, target_modules=TARGETS, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = (peftkit if direction == "peftkit_to_peft" else peft).get_peft_model(base, (
            peftkit.LoraConfig if direction == "peftkit_to_peft" else peft.LoraConfig)(**kw))
        perturb(src)
        src.save_pretrained(tmp_path)
        expected = _zoo_logits(src)
        dst = (peft if direction == "peftkit_to_peft" else peftkit).PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - _zoo_logits(dst)).abs().max() <= 1e-5
    with torch.no_grad():
        assert (expected - dst.merge_and_unload()(*inputs())).abs().max() <= 1e-4


def test_peft_interop_on_a_llama(tmp_path):
    base = tiny_llama()
    twin = copy.deepcopy(base)
    ours = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True))
    perturb(ours)
    ours.save_pretrained(tmp_path)
    x = ids()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
        assert (ours(input_ids=x).logits - theirs(input_ids=x).logits).abs().max() <= 1e-5


def test_lora_bias_with_dora_is_a_config_error():
    with pytest.raises(ConfigError, match="lora_bias=True is not supported with use_dora=True"):
        LoraConfig(target_modules=["lin"], use_dora=True, lora_bias=True)
    with pytest.raises(ConfigError, match="use_dora="):
        LoraConfig(target_modules=["lin"], use_dora="yes")


def test_mixed_adapter_batch_equals_each_adapter_alone():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"], use_dora=True))
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=3, target_modules=["q_proj", "o_proj"], use_dora=True))
    perturb_all = [p for n, p in model.named_parameters() if ".lora_" in n]
    with torch.no_grad():
        for p in perturb_all:
            p.add_(torch.randn_like(p) * 0.3)
    x = ids(batch=4)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=x[i:i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=x[i:i + 1]).logits
            assert (mixed[i:i + 1] - alone).abs().max() <= 1e-5, name


def test_float64_dora_with_bitfit_merged_under_it_runs_and_stays_exact():
    """A float64 model (set_default_dtype): merging BitFit under an active DoRA raised a dtype error (the norm
    mixed the float32 unmerged weight with float64 factors); the merge is exact to float64 precision."""
    from peftkit import BitFitConfig

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], use_dora=True),
                               adapter_name="d")
        model.add_adapter("bf", BitFitConfig())
        model.set_adapter(["bf", "d"])
        perturb(model)
        x = ids()
        with torch.no_grad():
            expected = model(input_ids=x).logits
            model.base_model.merge(["bf"])
            assert (model(input_ids=x).logits - expected).abs().max() <= 1e-8
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("first", [
    lambda: LoraConfig(r=2, target_modules=["query"], lora_bias=True),
    lambda: peftkit.SSFConfig(target_modules=["query"]),
], ids=["lora_bias", "ssf"])
def test_dora_after_a_bias_changing_adapter_refuses_to_merge_and_before_it_merges_exactly(first):
    model = get_peft_model(tiny_bert_classifier(), first(), adapter_name="first")
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["query"], use_dora=True))
    perturb(model)
    model.eval()
    x = ids()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    model.set_adapter(["first", "dora"])  # DoRA rescales the bias change of "first" (unmerged only)
    for names in (None, ["first"], ["dora"]):
        with pytest.raises(ValueError, match=r"'dora' \(DoraLinear\) rescales the bias change of 'first'.*nothing "
                                             r"was merged"):
            model.merge_adapter(names)
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    model.set_adapter(["dora", "first"])  # the bias change after the rescale: merging is exact
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        model.merge_adapter()
        assert torch.allclose(model(input_ids=x).logits, unmerged, atol=1e-5)
