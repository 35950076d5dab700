"""QA-LoRA: pooled forward, parameter count, exact merges (float and in the quantised domain), errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.quant import QuantLinear, merge_and_unload_quantized, quantize_base
from peftkit.quant.qalora import QALoraLinear
from tests.conftest import perturb, tiny_llama
from tests.zoo import cycled_logits


def qalora(model, group=8, **kw):
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "up_proj", "down_proj"],
                                             use_qalora=True, qalora_group_size=group, **kw))
    perturb(model)
    return model


def test_forward_pools_groups_as_peft_does_and_counts_parameters():
    model = qalora(tiny_llama())
    layer = model.base_model.model.model.layers[0].mlp.up_proj  # 16 -> 24
    ad = layer.adapters["default"]
    assert isinstance(ad, QALoraLinear) and ad.lora_A.weight.shape == (4, 2)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        pooled = x.view(3, 5, 2, 8).mean(-1) * 2  # peft: mean over the group, times the number of groups
        want = layer.base_layer(x) + 1.5 * pooled @ ad.lora_A.weight.T @ ad.lora_B.weight.T
        assert (layer(x) - want).abs().max() <= 1e-6
    # r * (in / L + out) per layer: q_proj 16->16, up_proj 16->24, down_proj 24->16; two blocks
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * ((2 + 16) + (2 + 24) + (3 + 16))


def test_merge_into_a_float_base_is_exact_and_fifty_cycles_restore_it():
    model = qalora(tiny_llama())
    base = model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight.detach().clone()
    before, merged = cycled_logits(model, torch.randint(3, 64, (2, 8)))
    assert (before - merged).abs().max() <= 1e-5
    assert (model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight - base).abs().max() <= 1e-6


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_merge_stays_in_the_quantised_domain(method):
    model = qalora(quantize_base(tiny_llama(), method, group_size=8, symmetric=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    codes, scales = layer.qdata.clone(), layer.qscale.clone()
    x = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        before = model(input_ids=x).logits
        plain = merge_and_unload_quantized(model, requantize=False, adapter_names="default")  # one name as a str
        after = plain(input_ids=x).logits
    merged = plain.model.layers[0].self_attn.q_proj
    assert isinstance(merged, QuantLinear) and merged.merged_weight is None  # still integer codes, no float copy
    assert torch.equal(merged.qdata, codes) and torch.equal(merged.qscale, scales)
    assert (before - after).abs().max() <= 1e-5


def test_a_coarser_quantisation_group_cannot_fold_and_falls_back_to_float():
    model = qalora(quantize_base(tiny_llama(), "int8"), group=8)  # int8 per channel: one group per row
    x = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        before = model(input_ids=x).logits
        with pytest.warns(UserWarning, match=r"6 QA-LoRA layer\(s\) \(model.layers.0.self_attn.q_proj, .*could not "
                                             r"be folded .* merged in float instead"):
            plain = merge_and_unload_quantized(model)
        after = plain(input_ids=x).logits
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(plain.model.layers[0].self_attn.k_proj, QuantLinear)  # not adapted: untouched
    assert (before - after).abs().max() <= 1e-5


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = qalora(base)
    model.save_pretrained(tmp_path)
    x = torch.randint(3, 64, (2, 5))
    fresh = tiny_llama()
    fresh.load_state_dict(state)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(fresh, tmp_path)
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert loaded.peft_config["default"].use_qalora and loaded.peft_config["default"].qalora_group_size == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["q_proj"], qalora_group_size=5), "in_features=16 is not a multiple of qalora_group_size=5"),
    (dict(target_modules=["embed_tokens"]), "adapts nn.Linear layers only, not Embedding"),
    (dict(target_modules=["q_proj"], qalora_group_size=0), "qalora_group_size=0 is not valid"),
    (dict(target_modules=["q_proj"], lora_bias=True), "does not support lora_bias"),
    (dict(target_modules=["q_proj"], init_lora_weights="loftq"), "cannot start from init_lora_weights='loftq'"),
    (dict(target_modules=["q_proj"], init_lora_weights="pissa"),
     "use_qalora=True cannot be combined with init_lora_weights='pissa'"),
    (dict(target_modules=["q_proj"], use_dora=True), "use_qalora=True cannot be combined with use_dora=True"),
])
def test_bad_values_raise_config_error(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        get_peft_model(model, LoraConfig(use_qalora=True, **kwargs))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_a_failing_quantised_merge_changes_nothing():
    """A merge that fails its checks (here safe_merge meeting a non-finite (IA)^3 scale): merge_and_unload_quantized
    raised only after it had folded the QA-LoRA adapter into the zero points and removed it from its layer (and
    undone an earlier merge)."""
    from peftkit import IA3Config

    model = qalora(quantize_base(tiny_llama(), "int4", group_size=8))
    model.add_adapter("i", IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.fill_(float("nan"))
    model.merge_adapter()  # "default" merged before the call
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    buffers = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    x = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(ValueError, match=r"merging adapter 'i' gives non-finite weights on layer 'model.layers.0.self_attn.v_proj'"):
        merge_and_unload_quantized(model, adapter_names=["default", "i"], safe_merge=True)
    assert list(layer.adapters) == ["default"] and model.base_model.merged_adapters() == ["default"]
    assert all(torch.equal(v, buffers[k]) for k, v in layer.base_layer.state_dict().items())
    with torch.no_grad():
        assert (model(input_ids=x).logits - before).abs().max() <= 1e-6


def test_on_an_nf4_base_the_warning_says_only_int_bases_fold():
    """The advice was to quantise with group_size=qalora_group_size, which nf4 ignored (now refuses)."""
    model = qalora(quantize_base(tiny_llama(), "nf4", block_size=8))
    with pytest.warns(UserWarning, match=r"could not be folded into the quantised zero points: only int4/int8 bases "
                                         r"fold, and an nf4 base"):
        merge_and_unload_quantized(model)


def test_a_group_of_constant_weights_is_merged_in_float_not_folded_into_an_infinite_zero_point():
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, :8] = 0  # a pruned group: its scale is ~0
    quantize_base(model, "int4", group_size=8)
    peft_model = qalora(model)
    perturb(peft_model, 2.0)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # a delta over ~4 on that group overflows float32 at a scale of 1.2e-38
        layer.adapters["default"].lora_B.weight.mul_(10)
    x = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
    with pytest.raises(ValueError, match="zero point would not be finite"):
        layer.base_layer.fold_group_delta(layer.adapters["default"].group_delta(layer) * 1e3)
    with pytest.warns(UserWarning, match="constant weights"):
        merged = merge_and_unload_quantized(peft_model, safe_merge=True)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear  # merged in float
    assert isinstance(merged.model.layers[1].self_attn.q_proj, QuantLinear)  # folded
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-4, rtol=0)
