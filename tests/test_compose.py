"""Composed adapters: several methods under one adapter name, saved as one folder, loaded exactly,
activated, merged and deleted as one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkit import (
    BitFitConfig,
    ComposedConfig,
    ConfigError,
    HoulsbyConfig,
    IA3Config,
    LoraConfig,
    ParallelConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    SSFConfig,
    get_peft_model,
)
from peftkit.layers import AdaptedLayer
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_llama
from tests.decode_checks import check_decoding, no_eos


def lora_prefix_houlsby(**kw) -> ComposedConfig:
    return ComposedConfig(configs=[LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
                                   PrefixTuningConfig(num_virtual_tokens=3),
                                   HoulsbyConfig(bottleneck_size=4)], **kw)


def mergeable_parts() -> list:
    return [LoraConfig(r=2, target_modules=["query", "value", "dense"]), IA3Config(), BitFitConfig(),
            SSFConfig(target_modules=["intermediate.dense"])]


def adapted_bert(config, name: str = "default"):
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, config, adapter_name=name)
    perturb(model)
    return model, twin


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def test_one_name_outside_parts_inside_and_the_file_layout(tmp_path):
    model, twin = adapted_bert(lora_prefix_houlsby(task_type="SEQ_CLS"))
    host = model.base_model
    assert list(model.peft_config) == ["default"]
    assert host.members == {"default": ["default#0", "default#1", "default#2"]}
    x = ids()
    out = logits(model, x)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), twin(input_ids=x).logits)
    assert (out - twin(input_ids=x).logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {k for k in keys if not k.startswith("parts.")} == {"base_model.model.classifier.weight",
                                                               "base_model.model.classifier.bias"}
    assert "parts.0.base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight" in keys
    assert "parts.1.prompt_embeddings" in keys
    assert "parts.2.base_model.model.bert.encoder.layer.0.output.dense.adapter_up.weight" in keys
    assert {k.split(".")[1] for k in keys if k.startswith("parts.")} == {"0", "1", "2"}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "COMPOSED"
    assert [c["peft_type"] for c in saved["configs"]] == ["LORA", "PREFIX_TUNING", "HOULSBY"]
    fresh = copy.deepcopy(twin)
    loaded = PeftModel.from_pretrained(twin, tmp_path)
    assert (logits(loaded, x) - out).abs().max() <= 1e-6
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_a_list_of_configs_is_a_composition_and_the_config_round_trips():
    model = get_peft_model(tiny_bert_classifier(), [LoraConfig(r=2, target_modules=["query"]), IA3Config()])
    config = model.peft_config["default"]
    assert isinstance(config, ComposedConfig) and [c.peft_type for c in config.configs] == ["LORA", "IA3"]
    again = ComposedConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()


def test_trainable_count_is_the_sum_of_the_parts():
    d, n, r, m, p = 16, 2, 2, 4, 3  # hidden, blocks, LoRA rank, bottleneck, prefixes
    model = get_peft_model(tiny_bert_classifier(), lora_prefix_houlsby(task_type="SEQ_CLS"))
    lora = n * 2 * r * (d + d)  # query and value, (16, 16) each
    prefix = p * 2 * n * d
    houlsby = n * 2 * (2 * d * m + m + d)
    head = d * 2 + 2
    assert model.get_nb_trainable_parameters()[0] == lora + prefix + houlsby + head


def test_training_reaches_every_part_and_nothing_else():
    model, _ = adapted_bert(lora_prefix_houlsby(task_type="SEQ_CLS"))
    model.train()
    model(input_ids=ids(4), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trainable
    for part in ("adapters.default#0.lora_A", "extra_modules.default#1", "adapters.default#2.adapter_down",
                 "modules_to_save.default"):
        assert any(part in n for n in grads), part


def test_merges_exactly_when_every_part_merges():
    model, twin = adapted_bert(ComposedConfig(configs=mergeable_parts()))
    x = ids()
    unmerged = logits(model, x)
    assert (unmerged - twin(input_ids=x).logits).abs().max() > 1e-2
    snapshot = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    now = model.get_base_model().state_dict()
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5
    model.merge_adapter()
    assert model.base_model.merged_adapters() == ["default"]
    assert (logits(model, x) - unmerged).abs().max() <= 1e-5
    with model.disable_adapter():
        assert (logits(model, x) - twin(input_ids=x).logits).abs().max() <= 1e-5
    assert model.base_model.merged_adapters() == ["default"]
    plain = model.merge_and_unload()
    assert not any(isinstance(mod, AdaptedLayer) for mod in plain.modules())
    assert (plain(input_ids=x).logits - unmerged).abs().max() <= 1e-5


def test_merge_names_the_part_that_cannot_merge_and_changes_nothing():
    model, _ = adapted_bert(ComposedConfig(configs=[LoraConfig(r=2, target_modules=["query"]),
                                                    PrefixTuningConfig(num_virtual_tokens=2)]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'default' cannot be merged: one of its parts uses PREFIX_TUNING"):
        model.merge_adapter()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.base_model.merged_adapters() == []


def test_activate_switch_and_delete_as_one():
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["key"]), adapter_name="plain")
    model.add_adapter("combo", lora_prefix_houlsby())
    model.set_adapter(["plain", "combo"])
    perturb(model)
    x = ids()
    both = logits(model, x)
    model.set_adapter("plain")
    plain = logits(model, x)
    model.set_adapter("combo")
    combo = logits(model, x)
    assert (both - plain).abs().max() > 1e-5 and (both - combo).abs().max() > 1e-5
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        "plain" not in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="combo#1"):
        model.set_adapter("combo#1")  # parts are not addressable
    model.delete_adapter("combo")
    assert list(model.peft_config) == ["plain"] and model.base_model.members == {}
    assert model.active_adapters == ["plain"]
    assert not any("combo" in n for n in model.state_dict())
    assert not model.base_model.extra_modules
    assert (logits(model, x) - plain).abs().max() <= 1e-6
    model.delete_adapter("plain")
    assert torch.equal(logits(model, x), twin(input_ids=x).logits)  # no hook or wrapper left behind


def test_load_a_composition_next_to_other_adapters(tmp_path):
    model, twin = adapted_bert(lora_prefix_houlsby(), name="combo")
    x = ids()
    combo = logits(model, x)
    model.save_pretrained(tmp_path)
    other = get_peft_model(twin, IA3Config(init_ia3_weights=False), adapter_name="ia3")
    ia3 = logits(other, x)
    other.load_adapter(tmp_path / "combo", adapter_name="combo")
    assert (logits(other, x) - ia3).abs().max() <= 1e-6  # loaded inactive
    other.set_adapter("combo")
    assert (logits(other, x) - combo).abs().max() <= 1e-6


def test_generate_with_cache_equals_stepwise_decoding_on_llama():
    config = ComposedConfig(configs=[LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                     PrefixTuningConfig(num_virtual_tokens=3),
                                     ParallelConfig(bottleneck_size=4)])
    base = tiny_llama()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, config)
    perturb(model, 0.5)
    no_eos(model.get_base_model())
    check_decoding(model)
    x = ids(2, 5)
    assert (logits(model, x) - twin(input_ids=x).logits).abs().max() > 1e-3


def test_an_error_in_a_later_part_leaves_the_model_unchanged():
    base = tiny_bert_classifier()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match="nothing_here"):
        get_peft_model(base, [LoraConfig(r=2, target_modules=["query"]), PrefixTuningConfig(num_virtual_tokens=2),
                              LoraConfig(r=2, target_modules=["nothing_here"])])
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    assert base.state_dict().keys() == before.keys()
    assert not base._forward_pre_hooks and not base._forward_hooks


def test_mixed_adapter_batches_refuse_compositions():
    model, _ = adapted_bert(lora_prefix_houlsby(), name="combo")
    with pytest.raises(ValueError, match=r"\['combo'\] are composed"):
        model(input_ids=ids(2), adapter_names=["combo", "__base__"])


@pytest.mark.parametrize("configs, fragment", [
    ([], "non-empty list"),
    (["lora"], "configs\\[0\\] is a str"),
    ([PromptTuningConfig(num_virtual_tokens=2), PrefixTuningConfig(num_virtual_tokens=2)], "at most one"),
    ([ComposedConfig(configs=[IA3Config()])], "cannot hold another composition"),
    ([LoraConfig(target_modules=["query"], modules_to_save=["classifier"])], "set modules_to_save on the Composed"),
    ([LoraConfig(target_modules=["query"], task_type="SEQ_CLS"), IA3Config(task_type="CAUSAL_LM")],
     "same task_type"),
])
def test_bad_compositions_raise_config_error(configs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ComposedConfig(configs=configs)


def test_adapter_names_cannot_contain_the_part_separator():
    with pytest.raises(ConfigError, match="'#'"):
        get_peft_model(tiny_bert_classifier(), IA3Config(), adapter_name="a#0")


def test_the_composition_takes_its_parts_task_type():
    config = ComposedConfig(configs=[LoraConfig(target_modules=["query"], task_type="SEQ_CLS"), IA3Config()])
    assert config.task_type == "SEQ_CLS"


def test_merged_adapters_names_a_composition_once_when_two_parts_share_a_layer():
    model, _ = adapted_bert(ComposedConfig(configs=[LoraConfig(r=2, target_modules=["query"]),
                                                    LoraConfig(r=3, target_modules=["query"])]))
    model.merge_adapter()
    assert model.base_model.merged_adapters() == ["default"]
