"""AdapterFusion: attention over trained bottleneck adapters, only the fusion layer trains, saved and
loaded with the adapters it fuses."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from peftkit import (
    AdapterFusionConfig,
    ComposedConfig,
    ConfigError,
    HoulsbyConfig,
    LoraConfig,
    ParallelConfig,
    PeftModel,
    PfeifferConfig,
    add_fusion,
    get_peft_model,
)
from peftkit.layers import AdaptedLayer
from peftkit.methods.fusion import FusionAdapter
from tests.conftest import ids, perturb, tiny_bert_classifier

D = 16


def two_adapters():
    """A tiny BERT with trained-looking Houlsby adapter "a" (both sites) and Pfeiffer-style adapter "b" (FFN; on its
    output projection, where "a" sits too, so that the two share sites)."""
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, HoulsbyConfig(bottleneck_size=4), adapter_name="a")
    model.add_adapter("b", PfeifferConfig(bottleneck_size=3, original_ln_before=False))
    model.set_adapter(["a", "b"])
    perturb(model)
    return model, twin


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def fusion_layers(model, name="f"):
    return [w.adapters[name] for _, w in model.base_model.wrappers() if isinstance(w, AdaptedLayer) and name in w.adapters]


def test_fusion_of_one_adapter_is_that_adapter():
    model, _ = two_adapters()
    x = ids()
    model.set_adapter("a")
    alone = logits(model, x)
    add_fusion(model, ["a"], "f")
    model.set_adapter("f")
    assert all(a.fusion_query is None and a.fusion_key is None for a in fusion_layers(model))
    assert (logits(model, x) - alone).abs().max() <= 1e-6
    add_fusion(model, ["a", "b"], "ab")
    model.set_adapter("ab")
    for a in fusion_layers(model, "ab"):  # where only "a" sits, the fusion is "a" whatever W_Q, W_K elsewhere are
        if a.fusion_key is not None:
            with torch.no_grad():
                a.fusion_query.weight.normal_()
                a.fusion_key.weight.normal_()
    model.set_adapter("b")
    b_only = logits(model, x)
    model.set_adapter("ab")
    assert (logits(model, x) - alone).abs().max() > 1e-5 and (logits(model, x) - b_only).abs().max() > 1e-5


def test_a_fusion_with_an_adapter_it_fuses_is_refused_before_any_change():
    """set_adapter(["f", "a"]) applied "a" twice (and trained it), silently."""
    model, _ = two_adapters()
    add_fusion(model, ["a", "b"], "f")
    model.set_adapter("f")
    for names in (["f", "a"], ["b", "f"]):
        with pytest.raises(ConfigError, match=r"adapter 'f' already applies \['(a|b)'\]; .* activate 'f' alone"):
            model.set_adapter(names)
        assert model.active_adapters == ["f"]


def test_sites_with_one_fused_adapter_pass_it_through_and_weights_are_a_softmax():
    model, _ = two_adapters()
    add_fusion(model, ["a", "b"], "f")
    layers = fusion_layers(model)
    assert sorted(len(a.fused) for a in layers) == [1, 1, 2, 2]  # the attention sites hold only "a"
    layer = next(w for _, w in model.base_model.wrappers() if isinstance(w, AdaptedLayer) and "b" in w.adapters)
    fusion = layer.adapters["f"]
    with torch.no_grad():
        for lin in (fusion.fusion_query, fusion.fusion_key):
            lin.weight.zero_()
            lin.bias.zero_()
        x = torch.randn(2, 5, layer.base_layer.in_features)
        y = layer.base_layer(x)
        changes = [layer.adapters[n](layer, x, y) - y for n in ("a", "b")]
        expected = y + (changes[0] + changes[1]) / 2  # equal scores: the average of the adapters' changes
        assert (fusion(layer, x, y) - expected).abs().max() <= 1e-6


def test_only_the_fusion_layer_trains_and_the_value_regulariser():
    model, _ = two_adapters()
    add_fusion(model, ["a", "b"], "f", regularization_weight=0.5)
    model.set_adapter("f")
    assert model.peft_regularization().item() == 0.0  # W_V starts at the identity
    perturb(model)
    penalty = sum(((torch.eye(D) - a.fusion_value.weight) ** 2).sum() for a in fusion_layers(model))
    assert model.peft_regularization().item() == pytest.approx(0.5 * penalty.item(), rel=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.f.fusion_" in n for n in trainable)
    model.train()
    before = {n: p.clone() for n, p in model.named_parameters() if ".adapters.a." in n or ".adapters.b." in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids=ids()).logits.pow(2).sum() + model.peft_regularization()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == trainable
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_trainable_count_is_3d2_plus_2d_per_shared_site_and_d2_per_single_site():
    model, _ = two_adapters()
    add_fusion(model, ["a", "b"], "f")
    model.set_adapter("f")
    assert model.get_nb_trainable_parameters()[0] == 2 * (3 * D * D + 2 * D) + 2 * D * D


def test_save_and_load_with_the_fused_adapters(tmp_path):
    model, twin = two_adapters()
    fresh = copy.deepcopy(twin)
    add_fusion(model, ["a", "b"], "f", task_type="SEQ_CLS")
    model.set_adapter("f")
    perturb(model)
    x = ids()
    fused = logits(model, x)
    model.save_pretrained(tmp_path, selected_adapters=["f"])
    keys = set(load_file(tmp_path / "f" / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.output.dense.fusion_value.weight" in keys
    assert "fused.a.base_model.model.bert.encoder.layer.1.attention.output.dense.adapter_up.weight" in keys
    assert "fused.b.base_model.model.bert.encoder.layer.1.output.dense.adapter_down.bias" in keys
    assert "base_model.model.classifier.weight" in keys
    saved = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert saved["adapters"] == ["a", "b"] and saved["adapter_configs"]["b"]["peft_type"] == "PFEIFFER"
    loaded = PeftModel.from_pretrained(twin, tmp_path / "f", adapter_name="f")
    assert list(loaded.peft_config) == ["f", "a", "b"]
    assert (logits(loaded, x) - fused).abs().max() <= 1e-6
    loaded.set_adapter("a")
    model.set_adapter("a")
    assert (logits(loaded, x) - logits(model, x)).abs().max() <= 1e-6
    # onto a model that already has the fused adapters: the saved copies are loaded into them, with a warning that
    # names the adapters whose weights this replaces (it did so silently)
    other = get_peft_model(fresh, HoulsbyConfig(bottleneck_size=4), adapter_name="a")
    other.add_adapter("b", PfeifferConfig(bottleneck_size=3, original_ln_before=False))
    with pytest.warns(UserWarning, match=r"replaces the weights of the model's adapter\(s\) \['a', 'b'\]"):
        other.load_adapter(tmp_path / "f", adapter_name="f")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the copies equal them now: nothing to say
        other.load_adapter(tmp_path / "f", adapter_name="f2")
    other.set_adapter("f")
    assert (logits(other, x) - fused).abs().max() <= 1e-6


def test_a_failed_load_removes_the_adapters_it_created(tmp_path):
    model, twin = two_adapters()
    add_fusion(model, ["a", "b"], "f")
    model.save_pretrained(tmp_path, selected_adapters=["f"])
    from safetensors.torch import save_file

    path = tmp_path / "f" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop(next(k for k in tensors if k.startswith("fused.b.")))
    save_file(tensors, path)
    host = get_peft_model(twin, LoraConfig(r=2, target_modules=["query"]), adapter_name="lora")
    with pytest.raises(ValueError, match="missing"):
        host.load_adapter(tmp_path / "f", adapter_name="f")
    assert list(host.peft_config) == ["lora"]
    assert all(set(w.adapters) == {"lora"} for _, w in host.base_model.wrappers() if isinstance(w, AdaptedLayer))


def test_a_fused_adapter_cannot_be_deleted_while_its_fusion_exists(tmp_path):
    model, _ = two_adapters()
    add_fusion(model, ["a", "b"], "f")
    model.set_adapter("f")
    x = ids()
    before, keys = logits(model, x), set(model.state_dict())
    with pytest.raises(ConfigError, match=r"cannot delete adapter 'b': adapter\(s\) \['f'\] use it"):
        model.delete_adapter("b")
    assert list(model.peft_config) == ["a", "b", "f"] and model.active_adapters == ["f"]
    assert set(model.state_dict()) == keys and torch.equal(logits(model, x), before)
    model.save_pretrained(tmp_path)  # the model still saves (it raised a bare KeyError after the delete)
    model.delete_adapter("f")
    model.delete_adapter("b")
    assert list(model.peft_config) == ["a"]


def test_an_unknown_fused_adapter_is_named_without_the_fusion_being_added():
    model, _ = two_adapters()
    with pytest.raises(ConfigError, match=r"unknown adapter\(s\) \['zz'\]; this model has \['a', 'b'\]$"):
        add_fusion(model, ["a", "zz"], "f")


@pytest.mark.parametrize("adapters, fragment", [
    (["a", "nope"], r"unknown adapter\(s\) \['nope'\]"),
    (["a", "lora"], "'lora' is LORA; AdapterFusion fuses serial bottleneck"),
    (["a", "par"], "'par' is PARALLEL_ADAPTER \\(parallel\\)"),
    (["a", "a"], "more than once"),
    ([], "names of the adapters to fuse"),
])
def test_bad_fusions_raise_config_error_and_change_nothing(adapters, fragment):
    model, _ = two_adapters()
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["query"]))
    model.add_adapter("par", ParallelConfig(bottleneck_size=2))
    before = set(model.state_dict())
    with pytest.raises(ConfigError, match=fragment):
        add_fusion(model, adapters, "f")
    assert set(model.state_dict()) == before and "f" not in model.peft_config


def test_a_fusion_cannot_be_a_part_of_a_composition():
    with pytest.raises(ConfigError, match="cannot hold another composition or a fusion"):
        ComposedConfig(configs=[AdapterFusionConfig(adapters=["a"])])


def test_fusion_layer_shapes():
    layer = FusionAdapter(["a", "b"], D)
    assert layer.fusion_value.bias is None and torch.equal(layer.fusion_value.weight, torch.eye(D))
    assert layer.fusion_query.weight.shape == (D, D) and layer.fusion_key.bias.shape == (D,)


def test_a_fusion_named_like_an_adapter_it_fuses_and_a_string_of_names_are_refused(tmp_path):
    model, twin = two_adapters()
    with pytest.raises(ConfigError, match="adapters='ab' is not valid"):  # was taken as ['a', 'b']
        add_fusion(model, "ab", "fz")
    add_fusion(model, ["a", "b"], "fz")
    model.save_pretrained(tmp_path, selected_adapters=["fz"])
    # loading the fusion as 'b' said "adapter 'b' already exists" of a model that had no adapter
    with pytest.raises(ConfigError, match="the fusion cannot be named 'b': that is the name of one of the adapters"):
        PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "fz", adapter_name="b")
    loaded = PeftModel.from_pretrained(twin, tmp_path / "fz", adapter_name="fused")
    assert sorted(loaded.peft_config) == ["a", "b", "fused"]
