"""Pfeiffer placement (AdapterHub's ``original_ln_before=True``): on post-LN encoders the serial adapter sits
after the FFN's Add & Norm and the block's own LayerNorm runs again after it; files saved before the field
existed keep the placement they were trained with."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import (
    AdapterDropConfig,
    BottleneckConfig,
    CompacterPlusPlusConfig,
    ConfigError,
    GatedBottleneckConfig,
    HoulsbyConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PfeifferConfig,
    add_fusion,
    get_peft_model,
)
from peftkit.layers import AdaptedLayer
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_llama


def adapted(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def ffn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A BertOutput's inputs: the intermediate activations (2, 5, 32) and the residual (2, 5, 16)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 16, generator=g)


def test_pfeiffer_on_bert_is_adapterhubs_add_norm_order():
    """AdapterHub (SeqBnConfig, bottleneck.py pre_forward/forward/post_forward): residual = u (the FFN output),
    h = LN(u + x), a = up(relu(down(h))) + u, out = LN(a + x), with the block's own LayerNorm both times."""
    model = get_peft_model(tiny_bert_classifier(), PfeifferConfig(reduction_factor=4, scaling=0.5))
    perturb(model)
    out = model.get_base_model().bert.encoder.layer[1].output  # BertOutput: LN(dropout(dense(i)) + x)
    ln, a = out.LayerNorm.base_layer, out.LayerNorm.adapters["default"]
    inner, x = ffn_inputs()
    with torch.no_grad():
        u = out.dense(inner)
        h = F.layer_norm(u + x, (16,), ln.weight, ln.bias, ln.eps)
        a_out = 0.5 * (h @ a.adapter_down.weight.T + a.adapter_down.bias).relu() @ a.adapter_up.weight.T
        expected = F.layer_norm(a_out + 0.5 * a.adapter_up.bias + u + x, (16,), ln.weight, ln.bias, ln.eps)
        got = out(inner, x)
        assert (got - expected).abs().max() <= 1e-6
        # ... which differs from the earlier placement on the projection, LN(u + A(u) + x)
        old = ln(u + a.bottleneck(u) + x)
        assert (got - old).abs().max() > 1e-2


@pytest.mark.parametrize("make", [
    lambda: PfeifferConfig(reduction_factor=4),
    lambda: PfeifferConfig(reduction_factor=4, mh_adapter=True),
    lambda: CompacterPlusPlusConfig(reduction_factor=2, phm_dim=2),
    lambda: AdapterDropConfig(adapterdrop_layers=1, reduction_factor=4),
    lambda: GatedBottleneckConfig(reduction_factor=4, task_type="SEQ_CLS"),
])
def test_pfeiffer_family_on_bert_wraps_the_add_norm_layer_norms_and_starts_as_the_identity(make):
    base = tiny_bert_classifier()
    x = ids()
    expected = logits(base, x, output_hidden_states=True)
    config = make()
    model = get_peft_model(base, config)
    blocks = (1,) if config.adapterdrop_layers else (0, 1)
    sites = (["attention.output.LayerNorm"] if config.mh_adapter else []) + ["output.LayerNorm"]
    assert adapted(base) == [f"bert.encoder.layer.{i}.{s}" for i in blocks for s in sites]
    assert all(base.get_submodule(n).adapters["default"].norm_site == "add_norm" for n in adapted(base))
    assert torch.equal(logits(model, x), expected)
    perturb(model)
    assert (logits(model, x) - expected).abs().max() > 1e-4


def test_distilbert_gets_the_placement_at_its_output_layer_norm():
    from transformers import DistilBertConfig, DistilBertModel

    base = DistilBertModel(DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32)).eval()
    model = get_peft_model(base, PfeifferConfig(reduction_factor=4, mh_adapter=True))
    assert adapted(base) == [f"transformer.layer.{i}.{s}" for i in (0, 1) for s in ("sa_layer_norm", "output_layer_norm")]
    perturb(model)
    block = base.transformer.layer[0]
    h_in = torch.randn(2, 5, 16)
    with torch.no_grad():
        z = block.ffn(h_in) + h_in  # the FFN's Add, given the attention's output h_in
        norm = block.output_layer_norm
        expected = norm.base_layer(z + norm.adapters["default"].bottleneck(norm.base_layer(z)))
        assert (norm(z) - expected).abs().max() <= 1e-6


def test_roberta_shares_berts_sites_and_two_active_adapters_each_renormalise():
    from transformers import RobertaConfig, RobertaModel

    base = RobertaModel(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=40)).eval()
    model = get_peft_model(base, PfeifferConfig(reduction_factor=4), adapter_name="a")
    model.add_adapter("b", PfeifferConfig(reduction_factor=8))
    assert adapted(base) == [f"encoder.layer.{i}.output.LayerNorm" for i in (0, 1)]
    model.set_adapter(["a", "b"])
    perturb(model)
    norm = base.encoder.layer[1].output.LayerNorm
    a, b = norm.adapters["a"], norm.adapters["b"]
    z = torch.randn(2, 5, 16)
    with torch.no_grad():  # y_k = LN(z + A_k(y_{k-1})), y_0 = LN(z)
        y1 = norm.base_layer(z + a.bottleneck(norm.base_layer(z)))
        assert (norm(z) - norm.base_layer(z + b.bottleneck(y1))).abs().max() <= 1e-6


def test_pre_ln_decoders_put_the_adapter_on_the_block_output_or_on_request_the_ffn_projection():
    """AdapterHub adds A(x + u) on a pre-LN block, and x + u is the block's output (tests/test_pfeiffer_pre_ln.py)."""
    base = tiny_llama()
    get_peft_model(base, PfeifferConfig(reduction_factor=4))
    assert adapted(base) == [f"model.layers.{i}" for i in (0, 1)]
    assert base.model.layers[0].adapters["default"].norm_site == "layer"
    base = tiny_llama()
    get_peft_model(base, PfeifferConfig(reduction_factor=4, pre_ln_site="projection"))
    assert adapted(base) == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert base.model.layers[0].mlp.down_proj.adapters["default"].norm_site is None


def test_houlsby_on_bert_keeps_the_adapter_before_the_add_norm():
    model = get_peft_model(tiny_bert_classifier(), HoulsbyConfig(reduction_factor=4))
    assert model.peft_config["default"].original_ln_before is False
    perturb(model)
    out = model.get_base_model().bert.encoder.layer[0].output
    a = out.dense.adapters["default"]
    inner, x = ffn_inputs()
    with torch.no_grad():
        u = out.dense.base_layer(inner)
        expected = out.LayerNorm(u + a.adapter_up(F.silu(a.adapter_down(u))) + x)
        assert (out(inner, x) - expected).abs().max() <= 1e-6


def test_original_ln_after_false_adds_the_adapter_after_the_add_norm():
    model = get_peft_model(tiny_bert_classifier(), PfeifferConfig(reduction_factor=4, original_ln_after=False,
                                                                  residual_before_ln=False))
    perturb(model)
    norm = model.get_base_model().bert.encoder.layer[0].output.LayerNorm
    assert norm.adapters["default"].norm_site == "after_norm"
    z = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = norm.base_layer(z)
        assert (norm(z) - (h + norm.adapters["default"].bottleneck(h))).abs().max() <= 1e-6


def saved_without_the_new_fields(tmp_path, config) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """An adapter as a file of the earlier code: trained on the FFN projection, config without the fields."""
    torch.manual_seed(0)
    base = tiny_bert_classifier()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    perturb(model)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["original_ln_before"] is False and data["original_ln_after"] is True  # written explicitly
    del data["original_ln_before"], data["original_ln_after"]
    path.write_text(json.dumps(data))
    fresh = tiny_bert_classifier()
    fresh.load_state_dict(state)
    return x, expected, fresh


@pytest.mark.parametrize("make", [
    lambda: PfeifferConfig(reduction_factor=4, original_ln_before=False),
    lambda: CompacterPlusPlusConfig(reduction_factor=2, phm_dim=2, original_ln_before=False),
    lambda: AdapterDropConfig(adapterdrop_layers=1, reduction_factor=4, original_ln_before=False),
])
def test_a_file_saved_before_the_fields_existed_loads_with_its_placement_and_outputs(tmp_path, make):
    x, expected, fresh = saved_without_the_new_fields(tmp_path, make())
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert loaded.peft_config["default"].original_ln_before is False
    assert all(n.endswith("output.dense") for n in adapted(fresh))
    assert torch.equal(logits(loaded, x), expected)


def test_new_saves_write_the_fields_and_load_back_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    base = tiny_bert_classifier()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, PfeifferConfig(reduction_factor=4))
    perturb(model)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["original_ln_before"] is True and data["original_ln_after"] is True
    fresh = tiny_bert_classifier()
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert all(n.endswith("output.LayerNorm") for n in adapted(fresh))
    assert torch.equal(logits(loaded, x), expected)
    # a dict a user writes (no peft_version) takes today's defaults
    assert PeftConfig.from_dict({"peft_type": "PFEIFFER"}).original_ln_before is True


def test_fusion_of_pfeiffer_adapters_fuses_before_the_second_layer_norm_pass():
    model = get_peft_model(tiny_bert_classifier(), PfeifferConfig(bottleneck_size=4), adapter_name="a")
    model.add_adapter("b", PfeifferConfig(bottleneck_size=3))
    x = ids()
    model.set_adapter("a")
    perturb(model)
    alone = logits(model, x)
    add_fusion(model, ["a"], "one")
    model.set_adapter("one")
    assert (logits(model, x) - alone).abs().max() <= 1e-6  # a fusion of one adapter is that adapter
    add_fusion(model, ["a", "b"], "f")
    model.set_adapter("b")
    perturb(model)
    model.set_adapter("f")
    perturb(model)  # the fusion layers
    norm = model.get_base_model().bert.encoder.layer[1].output.LayerNorm
    fuse, a, b = (norm.adapters[n] for n in ("f", "a", "b"))
    z = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = norm.base_layer(z)
        o = torch.stack([a.bottleneck(h), b.bottleneck(h)], dim=-2)  # (2, 5, 2, 16)
        scores = torch.einsum("btnd,btd->btn", fuse.fusion_key(o), fuse.fusion_query(h))
        fused = torch.einsum("btn,btnd->btd", scores.softmax(-1), fuse.fusion_value(o))
        assert (norm(z) - norm.base_layer(z + fused)).abs().max() <= 1e-6


def test_fusing_add_norm_adapters_that_differ_in_original_ln_after_is_refused():
    model = get_peft_model(tiny_bert_classifier(), PfeifferConfig(bottleneck_size=4), adapter_name="a")
    model.add_adapter("b", PfeifferConfig(bottleneck_size=3, original_ln_after=False, residual_before_ln=False))
    with pytest.raises(ConfigError, match=r"differ in original_ln_after \(\{'a': True, 'b': False\}\)"):
        add_fusion(model, ["a", "b"], "f")
    assert "f" not in model.peft_config


def test_mixed_batch_and_lora_merge_beside_pfeiffer_adapters():
    model = get_peft_model(tiny_bert_classifier(), PfeifferConfig(reduction_factor=4), adapter_name="a")
    model.add_adapter("b", PfeifferConfig(reduction_factor=4))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["output.dense"]))
    perturb(model)
    x = ids()
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = logits(model, x)
    with model.disable_adapter():
        single["__base__"] = logits(model, x)
    rows = ["b", "__base__", "a"]
    mixed = logits(model, x, adapter_names=rows)
    for i, name in enumerate(rows):
        assert (mixed[i] - single[name][i]).abs().max() <= 1e-6
    model.set_adapter(["lora", "a"])  # LoRA on the FFN projection, the adapter after its Add & Norm
    both = logits(model, x)
    model.merge_adapter(["lora"])
    assert (logits(model, x) - both).abs().max() <= 1e-5
    model.unmerge_adapter()
    assert (logits(model, x) - both).abs().max() <= 1e-5


@pytest.mark.parametrize("kw, fragment", [
    (dict(original_ln_before=False, original_ln_after=False), "would drop the block's residual"),
    (dict(original_ln_before=True, original_ln_after=False),
     "original_ln_after=False needs residual_before_ln=False and ln_before=False"),
    (dict(original_ln_before=True, original_ln_after=False, residual_before_ln=False, ln_before=True),
     "got residual_before_ln=False, ln_before=True"),
    (dict(original_ln_before="yes"), "original_ln_before='yes' is not valid: expected true or false"),
])
def test_bad_placements_raise_config_error_naming_them(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        BottleneckConfig(**kw)


def test_a_skip_after_the_layer_norm_is_refused_at_an_add_norm_before_any_change():
    base = tiny_bert_classifier()
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ConfigError, match=r"layer\.0\.output\.LayerNorm: residual_before_ln=False is not supported"):
        get_peft_model(base, PfeifferConfig(residual_before_ln=False, ln_before=True))
    assert {n: type(m) for n, m in base.named_modules()} == before
    # on a pre-LN model's FFN projection that skip works as before
    get_peft_model(tiny_llama(), PfeifferConfig(residual_before_ln=False, ln_before=True, pre_ln_site="projection"))


@pytest.mark.parametrize("option, at_norm", [(None, True), ("original_ln_before=false", False)])
def test_cli_pfeiffer_trains_at_the_add_norm_and_saves_the_placement(tiny_model_dir, tmp_path, option, at_norm):
    from safetensors.torch import load_file

    from peftkit.cli import main

    out = tmp_path / "run"
    extra = ["--option", option] if option else []
    assert main(["train", "--model", tiny_model_dir, "--method", "pfeiffer", *extra, "--max-steps", "1",
                 "--max-train-samples", "8", "--max-eval-samples", "8", "--output-dir", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PFEIFFER" and saved["original_ln_before"] is at_norm
    sites = {k.rsplit(".adapter_", 1)[0].split("layer.0.")[-1] for k in load_file(out / "adapter_model.safetensors")
             if ".adapter_up." in k and "layer.0." in k}
    assert sites == {"output.LayerNorm" if at_norm else "output.dense"}
