"""SoRA: exact merging, the proximal gate step, sparsity from training, compact save and load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit import ConfigError, PeftModel, SoraConfig, get_peft_model
from peftkit.layers import AdaptedLayer
from tests.zoo import (
    SHAPES,
    TARGETS,
    Zoo,
    adapted_zoo,
    assert_fifty_cycles,
    assert_merge_exact,
    train_tiny_bert,
    zoo_inputs,
)


def gates(model) -> dict[str, torch.nn.Parameter]:
    return {name: w.adapters["default"].lora_gate for name, w in model.base_model.wrappers()
            if isinstance(w, AdaptedLayer)}


@pytest.mark.parametrize("kw", [dict(r=4), dict(r=3, rank_pattern={"conv2": 5, "wide": 2}), dict(r=2, lora_dropout=0.3)])
def test_merge_and_unload_equals_unmerged(kw):
    _, model = adapted_zoo(SoraConfig(target_modules=TARGETS, **kw), groups=1)
    with torch.no_grad():
        gates(model)["lin"][0] = 0.0  # a switched-off rank
    assert_merge_exact(model, zoo_inputs())


def test_fifty_merge_cycles_restore_base_weights():
    base, model = adapted_zoo(SoraConfig(r=4, target_modules=TARGETS), groups=1)
    assert_fifty_cycles(base, model, zoo_inputs())


def test_trainable_parameter_count_matches_formula():
    r = 4
    model = get_peft_model(Zoo(groups=1), SoraConfig(r=r, target_modules=TARGETS))
    shapes = {**SHAPES, "conv2": (8, 4 * 9)}
    assert model.get_nb_trainable_parameters()[0] == sum(r * (i + o + 1) for o, i in shapes.values())


def test_step_end_soft_thresholds_the_gates():
    model = get_peft_model(Zoo(groups=1), SoraConfig(r=4, sparse_lambda=0.001, target_modules=["lin"]))
    gate = gates(model)["lin"]
    weights_before = model.base_model.model.lin.adapters["default"].lora_A.weight.clone()
    with torch.no_grad():
        gate.copy_(torch.tensor([0.5, -0.0005, -0.3, 0.001]))
    model.peft_step_end(1)
    assert torch.allclose(gate, torch.tensor([0.499, 0.0, -0.299, 0.0]), atol=1e-7)
    assert gate[1].item() == 0.0 and gate[3].item() == 0.0  # exactly zero, not just small
    assert torch.equal(model.base_model.model.lin.adapters["default"].lora_A.weight, weights_before)


def test_training_reduces_loss_sparsifies_gates_and_only_adapter_gets_gradients():
    config = SoraConfig(r=4, sparse_lambda=0.05, target_modules=["query", "value"], task_type="SEQ_CLS")
    losses, model = train_tiny_bert(config, "lora_", steps=60)
    assert losses[-1] < 0.5 * losses[0]
    values = torch.cat([g.detach() for g in gates(model).values()])
    assert (values == 0).any() and (values != 0).any()


def test_pruned_ranks_save_compact_and_load_exact(tmp_path):
    base = Zoo(groups=1)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        gates(model)["lin"].copy_(torch.tensor([0.0, 0.7, 0.0, -0.4]))
        gates(model)["square"].zero_()  # the whole layer pruned
    x = zoo_inputs()
    with torch.no_grad():
        expected = model(*x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.lin.lora_A.weight"].shape == (2, 8)
    assert tensors["base_model.model.lin.lora_B.weight"].shape == (12, 2)
    assert tensors["base_model.model.square.lora_gate"].shape == (0,)
    assert tensors["base_model.model.conv2.lora_A.weight"].shape == (4, 4, 3, 3)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern == {"^lin": 2, "^square": 0, "^wide": 4, "^conv2": 4, "^conv1": 4}
    assert model.peft_config["default"].rank_pattern == {}  # the live config is untouched
    fresh = Zoo(groups=1)
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert (loaded(*x) - expected).abs().max() <= 1e-6
        merged = loaded.merge_and_unload()
        assert (merged(*x) - expected).abs().max() <= 1e-5


def test_grouped_convolution_is_refused_before_any_change():
    base = Zoo(groups=2)
    with pytest.raises(ConfigError, match=r"conv2: SoRA does not adapt grouped convolutions \(groups=2\)"):
        get_peft_model(base, SoraConfig(target_modules=TARGETS))
    assert isinstance(base.lin, torch.nn.Linear)


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "r=0"),
    (dict(sparse_lambda=-0.1), "sparse_lambda=-0.1"),
    (dict(lora_dropout=1.0), "lora_dropout=1.0"),
    (dict(rank_pattern={"lin": -1}), r"rank_pattern\['lin'\]=-1"),
    (dict(init_lora_weights="gaussian"), "init_lora_weights='gaussian'"),
])
def test_bad_values_raise_config_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        SoraConfig(target_modules=TARGETS, **kw)


def test_step_end_on_a_merged_adapter_is_refused_before_the_gates_change():
    model = get_peft_model(Zoo(groups=1), SoraConfig(r=4, sparse_lambda=0.05, target_modules=["lin"]))
    gate = gates(model)["lin"]
    with torch.no_grad():
        gate.copy_(torch.tensor([0.5, -0.01, -0.3, 0.02]))
    model.merge_adapter()
    before = gate.clone()
    with pytest.raises(ConfigError, match=r"adapter 'default' is merged .* unmerge it .* before peft_step_end"):
        model.peft_step_end(1)
    assert torch.equal(gate, before)


def test_an_unbatched_convolution_input_gives_the_batched_result():
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1))
    model = get_peft_model(conv, SoraConfig(r=4, target_modules=["0"], init_lora_weights=False)).eval()
    with torch.no_grad():
        gates(model)["0"].copy_(torch.tensor([0.5, -0.2, 0.3, 0.9]))
        for x in (torch.randn(4, 5, 5), torch.randn(4, 4, 4)):  # H != r, and H == r (broadcast by accident)
            torch.testing.assert_close(model(x), model(x[None])[0], atol=1e-6, rtol=0)
