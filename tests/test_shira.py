"""SHiRA: peft's random mask, the sparse update written out, exact merging, counts, custom masks, training, files
(both ways with peft), a LoRA + SHiRA mixed model against peft's, and bad values."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit import (
    ConfigError,
    LoraConfig,
    PeftMixedModel,
    PeftModel,
    ShiraConfig,
    get_peft_model,
    set_peft_model_state_dict,
)
from peftkit.config import get_method
from peftkit.formats.hf_peft import AdapterLoadError
from peftkit.methods.shira import random_indices
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_llama
from tests.interop_util import output, peft_file_in_peftkit, peftkit_file_in_peft
from tests.zoo import Zoo, assert_fifty_cycles, assert_merge_exact, train_tiny_bert, zoo_inputs


def _adapter(model, name):
    return model.base_model.model.get_submodule(name).adapters["default"]


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("shape, r, seed", [((6, 8), 1, 3), ((4, 6), 1, None), ((16, 32), 2, 42), ((5, 3), 1, 0)])
def test_random_mask_is_peft_s_for_the_same_seed(shape, r, seed):
    out_features, in_features = shape
    module = nn.Linear(in_features, out_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(module)),
                                     peft.ShiraConfig(r=r, random_seed=seed, target_modules=["0"]))
    ours = get_peft_model(nn.Sequential(module), ShiraConfig(r=r, random_seed=seed, target_modules=["0"]))
    indices = ours.base_model.model[0].adapters["default"].shira_indices
    assert indices.dtype == torch.int32 and indices.shape == (2, r * (in_features + out_features))
    assert torch.equal(indices, theirs.base_model.model[0].shira_indices["default"])


def test_random_entries_are_distinct_row_major_and_inside_the_weight():
    idx = random_indices(7, 5, 24, seed=3)
    flat = idx[0].long() * 5 + idx[1].long()
    assert torch.equal(flat, torch.sort(flat).values) and flat.unique().numel() == 24
    assert 0 <= int(idx[0].min()) and int(idx[0].max()) <= 6 and int(idx[1].max()) <= 4


def test_output_is_the_linear_layer_with_the_sparse_update_added():
    """``y = (W0 + S) x + b`` with ``S[row_i, col_i] = shira_weight[i]``, written out densely."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    w0, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = get_peft_model(nn.Sequential(layer), ShiraConfig(r=1, init_weights=False, target_modules=["0"]))
    adapter = model.base_model.model[0].adapters["default"]
    s = torch.zeros(4, 6)
    for (row, col), v in zip(adapter.shira_indices.T.tolist(), adapter.shira_weight.detach(), strict=True):
        s[row, col] = v
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert (model(x) - F.linear(x, w0 + s, b)).abs().max() <= 1e-6
        assert (model(x) - F.linear(x, w0, b)).abs().max() > 1e-2
    assert torch.equal(adapter.delta_weight(model.base_model.model[0]), s)
    assert torch.equal(model.base_model.model[0].base_layer.weight, w0)  # the base weight is never written


def test_zero_init_is_the_identity():
    base = tiny_bert_classifier()
    x = ids()
    expected = _logits(base, x)
    model = get_peft_model(copy.deepcopy(base), ShiraConfig(r=2))
    assert torch.equal(_adapter(model, "bert.encoder.layer.0.attention.self.query").shira_weight, torch.zeros(64))
    assert torch.equal(_logits(model, x), expected)


def _shira_zoo():
    base = Zoo()
    model = get_peft_model(base, ShiraConfig(r=2, target_modules=["lin"], init_weights=False))
    perturb(model)
    return base, model


def test_merge_and_unload_equals_unmerged():
    _, model = _shira_zoo()
    assert_merge_exact(model, zoo_inputs())


def test_fifty_merge_cycles_restore_base_weights():
    base, model = _shira_zoo()
    assert_fifty_cycles(base, model, zoo_inputs())


def test_merge_adds_exactly_the_entries_and_unmerge_restores_them():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 6)), ShiraConfig(r=1, init_weights=False, target_modules=["0"]))
    layer = model.base_model.model[0]
    before = layer.base_layer.weight.detach().clone()
    adapter = layer.adapters["default"]
    model.merge_adapter()
    changed = (layer.base_layer.weight != before).nonzero().T
    assert torch.equal(changed, adapter.shira_indices.long())  # only the k entries moved
    rows, cols = adapter.shira_indices.long()
    assert torch.equal(layer.base_layer.weight[rows, cols], before[rows, cols] + adapter.shira_weight.detach())
    model.unmerge_adapter()
    assert (layer.base_layer.weight - before).abs().max() <= 1e-6


def test_trainable_count_is_r_times_in_plus_out_per_layer():
    model = get_peft_model(tiny_bert_classifier(), ShiraConfig(r=3, target_modules=["query", "intermediate.dense"]))
    # 2 blocks: query 16 x 16, intermediate.dense 32 x 16
    assert model.get_nb_trainable_parameters()[0] == 2 * (3 * (16 + 16) + 3 * (16 + 32))
    assert _adapter(model, "bert.encoder.layer.1.intermediate.dense").shira_indices.shape == (2, 3 * 48)


def test_default_targets_are_the_model_type_s():
    model = get_peft_model(tiny_bert_classifier(), ShiraConfig(r=1))
    assert sorted(model.peft_config["default"].target_modules) == ["query", "value"]


def test_r_above_the_entries_is_named_and_model_left_unchanged():
    base = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 2))
    with pytest.raises(ConfigError, match=r"1: r=2 gives r \* \(in \+ out\) = 16 entries, more than the layer's 2 x 6"):
        get_peft_model(base, ShiraConfig(r=2, target_modules=["0", "1"]))
    assert type(base[0]) is nn.Linear and type(base[1]) is nn.Linear


def test_a_conv1d_target_is_refused_by_name():
    with pytest.raises(ConfigError, match="square"):
        get_peft_model(Zoo(), ShiraConfig(r=1, target_modules=["lin", "square"]))


def test_custom_mask_function_chooses_the_entries():
    def diagonal_band(base_layer, r):
        out_features, in_features = base_layer.weight.shape
        mask = torch.zeros(out_features, in_features)
        mask.view(-1)[: r * (in_features + out_features)] = 1  # the first k entries, row-major
        return mask

    config = ShiraConfig(r=1, mask_type="first", target_modules=["0"])
    config.mask_fn = diagonal_band
    model = get_peft_model(nn.Sequential(nn.Linear(8, 6)), config)
    idx = model.base_model.model[0].adapters["default"].shira_indices
    assert torch.equal(idx[0].long() * 8 + idx[1].long(), torch.arange(14))


@pytest.mark.parametrize("mask, message", [
    (torch.ones(6, 8), "has 48 ones; it needs exactly r \\* \\(in \\+ out\\) = 14"),
    (torch.full((6, 8), 0.5), "values other than 0 and 1"),
    (torch.ones(8, 6), "shape \\(8, 6\\)"),
])
def test_a_bad_custom_mask_is_refused_naming_the_module(mask, message):
    config = ShiraConfig(r=1, mask_type="mine", target_modules=["0"])
    config.mask_fn = lambda base_layer, r: mask
    base = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(ConfigError, match="0: .*" + message):
        get_peft_model(base, config)
    assert type(base[0]) is nn.Linear


def test_a_custom_mask_type_needs_a_mask_function_but_loading_does_not(tmp_path):
    with pytest.raises(ConfigError, match="mask_type='mine' needs a mask function"):
        get_peft_model(nn.Sequential(nn.Linear(8, 6)), ShiraConfig(r=1, mask_type="mine", target_modules=["0"]))
    base = nn.Sequential(nn.Linear(8, 6))
    twin = copy.deepcopy(base)
    config = ShiraConfig(r=1, mask_type="mine", target_modules=["0"], init_weights=False)
    config.mask_fn = lambda base_layer, r: torch.cat([torch.zeros(34), torch.ones(14)]).view(6, 8)  # the last 14
    model = get_peft_model(base, config)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(twin, tmp_path)  # no mask_fn here: the entries come from the file
    assert torch.equal(loaded.base_model.model[0].adapters["default"].shira_indices,
                       model.base_model.model[0].adapters["default"].shira_indices)
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-6


def test_training_reduces_loss_and_only_shira_weight_gets_gradients():
    losses, model = train_tiny_bert(ShiraConfig(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS"),
                                    "shira_weight", steps=60)
    assert losses[-1] < 0.5 * losses[0]
    adapter = _adapter(model, "bert.encoder.layer.0.attention.self.query")
    assert adapter.shira_weight.abs().min() >= 0 and adapter.shira_weight.abs().max() > 1e-3
    assert not adapter.shira_indices.is_floating_point()


def test_save_and_load_round_trip_writes_peft_s_keys(tmp_path):
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, ShiraConfig(r=2, random_seed=9, target_modules=["query", "value"],
                                             task_type="SEQ_CLS"))
    perturb(model)
    x = ids()
    expected = _logits(model, x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SHIRA" and saved["r"] == 2 and saved["random_seed"] == 9
    assert "mask_fn" not in saved
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.1.attention.self.value"
    assert tensors[f"{key}.shira_weight"].shape == (64,)
    assert tensors[f"{key}.shira_indices"].shape == (2, 64) and tensors[f"{key}.shira_indices"].dtype == torch.int32
    assert {k.rsplit(".", 1)[-1] for k in tensors if ".classifier." not in k} == {"shira_weight", "shira_indices"}
    loaded = PeftModel.from_pretrained(twin, tmp_path)
    assert (_logits(loaded, x) - expected).abs().max() <= 1e-6


def test_loading_takes_the_file_s_entries_and_refuses_bad_ones(tmp_path):
    base = nn.Sequential(nn.Linear(8, 6))
    model = get_peft_model(copy.deepcopy(base), ShiraConfig(r=1, random_seed=1, target_modules=["0"],
                                                            init_weights=False))
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    # a model built with another seed takes the file's entries
    other = get_peft_model(copy.deepcopy(base), ShiraConfig(r=1, random_seed=2, target_modules=["0"]))
    other.load_adapter(tmp_path, "file")
    other.set_adapter("file")
    with torch.no_grad():
        assert (other(x) - expected).abs().max() <= 1e-6
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.0.shira_indices"
    bad = tensors[key].clone()
    bad[1, 0] = 8  # column 8 of an 8-wide weight
    save_file({**tensors, key: bad}, path)
    fresh = get_peft_model(copy.deepcopy(base), ShiraConfig(r=1, target_modules=["0"]))
    with pytest.raises(AdapterLoadError, match="outside the weight"):
        fresh.load_adapter(tmp_path, "bad")
    assert list(fresh.peft_config) == ["default"]


INTEROP = {
    "bert": (tiny_bert_classifier, dict(r=2, random_seed=7, target_modules=["query", "value"],
                                        modules_to_save=["classifier"])),
    "bert_task": (tiny_bert_classifier, dict(r=1, target_modules=["query", "dense"], task_type="SEQ_CLS")),
    "llama": (tiny_llama, dict(r=1, random_seed=3, target_modules=["q_proj", "v_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_file_loads_in_peft(case, tmp_path):
    make, kw = INTEROP[case]
    bare, expected, theirs = peftkit_file_in_peft(make, ShiraConfig(**kw), tmp_path)
    assert (expected - theirs).abs().max() <= 1e-5
    assert (expected - bare).abs().max() > 1e-3  # (the adapter changes the output)


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_file_loads_in_peftkit(case, tmp_path):
    make, kw = INTEROP[case]
    expected, ours, x = peft_file_in_peftkit(make, peft.ShiraConfig(**kw), tmp_path)
    assert (expected - output(ours, x)).abs().max() <= 1e-5
    with ours.disable_adapter():
        assert (expected - output(ours, x)).abs().max() > 1e-3
    assert (expected - output(ours.merge_and_unload(), x)).abs().max() <= 1e-5


MIXED = {"lora": ("LoraConfig", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
         "shira": ("ShiraConfig", dict(r=1, random_seed=5, target_modules=["q_proj", "down_proj"],
                                       init_weights=False))}


def test_lora_and_shira_mixed_match_peft_s_mixed_model():
    import peftkit

    base = tiny_llama()
    order = ["shira", "lora"]  # (peft wraps in this order only: SHiRA refuses to wrap a LoRA layer there)
    made = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lib in (peftkit, peft):
            first, second = order
            model = lib.get_peft_model(copy.deepcopy(base), getattr(lib, MIXED[first][0])(**MIXED[first][1]),
                                       adapter_name=first, mixed=True)
            model.add_adapter(second, getattr(lib, MIXED[second][0])(**MIXED[second][1]))
            model.set_adapter(order)
            made.append(model)
        ours, theirs = made
        for name in order:
            set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    assert type(ours) is PeftMixedModel
    x = ids(2, 6)
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-5
    assert (_logits(ours, x) - _logits(base, x)).abs().max() > 1e-2
    for alone in order:
        ours.set_adapter([alone])
        theirs.set_adapter([alone])
        assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-5
    ours.set_adapter(order)
    theirs.set_adapter(order)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert (_logits(merged_ours, x) - _logits(merged_theirs, x)).abs().max() <= 1e-5


def test_shira_after_lora_on_one_layer_gives_the_same_sum_in_peftkit():
    base = tiny_llama()
    a = get_peft_model(copy.deepcopy(base), ShiraConfig(**MIXED["shira"][1]), adapter_name="shira", mixed=True)
    a.add_adapter("lora", LoraConfig(**MIXED["lora"][1]))
    b = get_peft_model(copy.deepcopy(base), LoraConfig(**MIXED["lora"][1]), adapter_name="lora", mixed=True)
    b.add_adapter("shira", ShiraConfig(**MIXED["shira"][1]))
    b.load_state_dict(a.state_dict())
    a.set_adapter(["shira", "lora"])
    b.set_adapter(["lora", "shira"])
    x = ids(2, 6)
    assert (_logits(a, x) - _logits(b, x)).abs().max() <= 1e-5
    assert (_logits(a, x) - _logits(base, x)).abs().max() > 1e-2


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "r=0"),
    (dict(r=True), "r=True"),
    (dict(mask_type=""), "mask_type=''"),
    (dict(mask_type=3), "mask_type=3"),
    (dict(random_seed=1.5), "random_seed=1.5"),
    (dict(random_seed=2**64), "random_seed="),
    (dict(fan_in_fan_out="no"), "fan_in_fan_out='no'"),
    (dict(init_weights=0), "init_weights=0"),
    (dict(target_modules=[]), "target_modules"),
])
def test_bad_values_raise_config_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        ShiraConfig(**{"target_modules": ["lin"], **kw})


def test_fan_in_fan_out_is_set_back_to_false_with_a_warning_as_peft():
    config = ShiraConfig(r=1, target_modules=["0"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out=True is set to False"):
        get_peft_model(nn.Sequential(nn.Linear(8, 6)), config)
    assert config.fan_in_fan_out is False


def test_registered_for_the_cli():
    spec = get_method("shira")
    assert (spec.family, spec.kind, spec.mergeable, spec.config_cls.peft_type) == ("selective", "select", True, "SHIRA")


def test_mixed_adapter_batch_rows_each_get_their_own_entries():
    base = tiny_bert_classifier()
    model = get_peft_model(copy.deepcopy(base), ShiraConfig(r=1, random_seed=1, init_weights=False), adapter_name="a")
    model.add_adapter("b", ShiraConfig(r=2, random_seed=2, init_weights=False))
    x = ids(4, 6)
    rows = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=rows).logits
        alone = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model(input_ids=x).logits
        alone["__base__"] = base(input_ids=x).logits
    for i, name in enumerate(rows):
        assert (mixed[i] - alone[name][i]).abs().max() <= 1e-6
    assert (alone["a"] - alone["b"]).abs().max() > 3e-4  # (the tiny BERT's logits are ~1e-2)


def test_a_quantised_target_is_refused_by_name_before_the_model_changes():
    from peftkit import quantize_base

    base = quantize_base(nn.Sequential(nn.Linear(64, 64)), "int8")
    with pytest.raises(ConfigError, match=r"0: SHiRA changes entries of a float nn\.Linear weight, and this one is "
                                          "quantised"):
        get_peft_model(base, ShiraConfig(r=1, target_modules=["0"]))
    assert type(base[0]).__name__ == "QuantLinear"
