"""LoftQ: error reduction with simple and real quantisers, the LoRA hook, files, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.quant import LoftQConfig, QuantLinear, loftq_decompose, quantize_base
from peftkit.quant.formats import torchao_quantization
from peftkit.quant.loftq import normal_float_levels, simple_fake_quantize
from tests.conftest import perturb, tiny_gpt2, tiny_llama


def weight(out: int = 48, inp: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    low_rank = torch.randn(out, 4, generator=g) @ torch.randn(4, inp, generator=g) * 0.05
    return torch.randn(out, inp, generator=g) * 0.02 + low_rank  # pretrained-like: noise + a few strong directions


@pytest.mark.parametrize("quantizer, bits", [("normal", 2), ("normal", 4), ("uniform", 3), ("uniform", 8),
                                             ("nf4", 4), ("int4", 4), ("int8", 8)])
@pytest.mark.parametrize("steps", [1, 3])
def test_loftq_reduces_the_error_of_plain_lora_init(quantizer, bits, steps):
    w = weight()
    cfg = LoftQConfig(loftq_bits=bits, loftq_iter=steps, quantizer=quantizer)
    plain = LoftQConfig(loftq_bits=bits, loftq_iter=1, quantizer=quantizer)
    q_only = loftq_decompose(w, 1, config=plain).dequantized  # plain LoRA: q(W), B = 0
    result = loftq_decompose(w, 8, scaling=2.5, config=cfg)
    loftq_err = (w - result.dequantized - 2.5 * result.lora_B @ result.lora_A).norm()
    assert loftq_err < 0.9 * (w - q_only).norm()
    assert (result.state is None) == (quantizer in ("normal", "uniform"))


def test_scaling_is_divided_out_so_the_low_rank_part_is_the_svd_term():
    w = weight()
    result = loftq_decompose(w, 6, scaling=4.0, config=LoftQConfig(quantizer="normal"))
    s = torch.linalg.svdvals(w - result.dequantized)
    residual = (w - result.dequantized - 4.0 * result.lora_B @ result.lora_A).norm()
    assert residual == pytest.approx(s[6:].norm().item(), rel=1e-4)
    assert result.lora_A.norm() == pytest.approx(result.lora_B.norm().item(), rel=1e-4)  # balanced factors


def test_simple_normal_float_levels_are_nf4_at_four_bits():
    torch_nf4 = torchao_quantization().NF4Tensor.from_tensor(torch.randn(64), 64, 1).nf4
    assert (normal_float_levels(4) - torch_nf4).abs().max() < 1e-4
    q = simple_fake_quantize(torch.randn(4, 64), 3, "uniform", 64)
    assert q.unique().numel() <= 4 * 7  # at most 2**3 - 1 levels per block


def test_loftq_through_lora_quantizes_the_base_and_starts_near_the_float_model():
    x = torch.randint(3, 64, (2, 9))
    float_model = tiny_llama()
    with torch.no_grad():
        want = float_model(input_ids=x).logits
        qlora = get_peft_model(quantize_base(copy.deepcopy(float_model), "nf4"),
                               LoraConfig(r=4, target_modules="all-linear"))
        loftq = get_peft_model(copy.deepcopy(float_model), LoraConfig(
            r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights="loftq",
            loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2)))
        err_qlora = (qlora(input_ids=x).logits - want).abs().mean()
        err_loftq = (loftq(input_ids=x).logits - want).abs().mean()
    assert err_loftq < 0.8 * err_qlora
    layer = loftq.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, QuantLinear) and layer.base_layer.fmt.method == "nf4"
    assert loftq.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": 2, "quantizer": "auto",
                                                         "block_size": 64}


def test_simple_quantizer_keeps_a_float_base_holding_q_also_on_gpt2_conv1d():
    model = tiny_gpt2()
    original = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="loftq",
                                                  loftq_config={"loftq_bits": 3, "quantizer": "uniform"}))
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert type(layer.base_layer).__name__ == "Conv1D"
    q = layer.base_layer.weight.detach()
    assert q.shape == original.shape and not torch.equal(q, original)
    ad = layer.adapters["default"]
    approx = q + ad.delta_weight(layer)  # Conv1D layout (in, out)
    assert (original - approx).norm() < (original - q).norm()


def test_real_quantizer_on_gpt2_conv1d_becomes_a_quantized_linear_that_merges_exactly():
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights="loftq",
                                                        loftq_config={"loftq_bits": 8}))
    perturb(peft_model)
    layer = peft_model.base_model.model.transformer.h[1].mlp.c_fc
    assert isinstance(layer.base_layer, QuantLinear) and layer.base_layer.fmt.method == "int8"
    x = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
        peft_model.merge_adapter()
        after = peft_model(input_ids=x).logits
    assert (before - after).abs().max() <= 1e-5


def test_a_loftq_adapter_reloads_onto_the_original_model_identically(tmp_path):
    base = tiny_llama()
    cfg = LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights="loftq",
                     loftq_config=LoftQConfig(quantizer="nf4"))
    model = get_peft_model(copy.deepcopy(base), cfg)
    perturb(model)  # as if trained
    model.save_pretrained(tmp_path)
    x = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize("loftq_config, message", [
    ({"loftq_bits": 9}, "loftq_bits=9 is not valid"),
    ({"loftq_iter": 0}, "loftq_iter=0 is not valid"),
    ({"quantizer": "gptq"}, "quantizer='gptq' is not valid"),
    ({"quantizer": "nf4", "loftq_bits": 2}, "stores 4 bits but loftq_bits=2"),
    ({"block_size": 5}, "block_size=5 is not valid"),
    ({"bits": 4}, r"unknown key\(s\) \['bits'\]"),
])
def test_bad_loftq_values_raise_config_error(loftq_config, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(target_modules="all-linear", init_lora_weights="loftq", loftq_config=loftq_config)


def test_loftq_needs_the_full_precision_base_and_linear_targets():
    with pytest.raises(ConfigError, match="needs its full-precision weight"):
        get_peft_model(quantize_base(tiny_llama(), "nf4"), LoraConfig(target_modules=["q_proj"],
                                                                     init_lora_weights="loftq"))
    model = tiny_llama()
    with pytest.raises(ConfigError, match="linear layers only, not Embedding"):
        get_peft_model(model, LoraConfig(target_modules=["embed_tokens", "q_proj"], init_lora_weights="loftq"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # nothing changed


def test_loftq_config_without_loftq_init_is_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        cfg = LoraConfig(target_modules="all-linear", loftq_config={"loftq_bits": 4})
    assert cfg.loftq_config == {}


def test_loftq_refuses_layers_another_adapter_uses_and_bad_values_name_the_field():
    """A LoftQ adapter added next to another one re-quantised the shared base weights: the other adapter's
    outputs moved by 0.09, silently."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                           adapter_name="a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for targets in (["q_proj", "v_proj"], ["v_proj"]):  # (v_proj feeds the layers after it, q_proj among them)
        with pytest.raises(ConfigError, match=r"the model already holds adapter\(s\) \['a'\]"):
            model.add_adapter("b", LoraConfig(r=4, target_modules=targets, init_lora_weights="loftq",
                                              loftq_config={"loftq_bits": 4}))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="loftq_iter=True is not valid"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_iter": True})
    with pytest.raises(ConfigError, match="not a multiple of loftq_config block_size=64"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(100, 64)), LoraConfig(
            r=4, target_modules=["0"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "quantizer": "int4"}))
