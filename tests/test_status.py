"""get_layer_status / get_model_status: peft's fields and values for the same model and the same calls,
"irregular" where layers disagree, and what peftkit reports beyond peft (soft prompts, composed adapters,
quantised bases)."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit import (
    LoraConfig,
    PromptTuningConfig,
    get_layer_status,
    get_model_status,
    get_peft_model,
    mam_config,
)
from tests.conftest import tiny_bert_classifier, tiny_llama

LAYER_FIELDS = ["name", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters",
                "devices", "quantization_backend"]


def _two_adapters(lib):
    """A BERT with LoRA ``default`` on query+value and ``other`` on query only, built by ``lib``."""
    torch.manual_seed(0)
    model = lib.get_peft_model(tiny_bert_classifier(), lib.LoraConfig(r=2, target_modules=["query", "value"]))
    model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["query"]))
    return model


def _lora_layers(statuses):
    return [{f: getattr(s, f) for f in LAYER_FIELDS} for s in statuses if "classifier" not in s.name]


@pytest.mark.parametrize("step", ["fresh", "both-active", "merged", "disabled", "frozen"])
def test_layer_and_model_status_match_peft(step):
    models = {lib: _two_adapters(lib) for lib in (peft, peftkit)}
    for lib, model in models.items():
        if step == "both-active":
            model.base_model.set_adapter(["default", "other"]) if lib is peft else model.set_adapter(["default", "other"])
        elif step == "merged":
            model.merge_adapter(["default"])
        elif step == "frozen":
            model.set_requires_grad("default", False)
    if step == "disabled":
        with models[peft].disable_adapter(), models[peftkit].disable_adapter():
            ours, theirs = models[peftkit].get_layer_status(), models[peft].get_layer_status()
            ours_model, theirs_model = models[peftkit].get_model_status(), models[peft].get_model_status()
    else:
        ours, theirs = models[peftkit].get_layer_status(), models[peft].get_layer_status()
        ours_model, theirs_model = models[peftkit].get_model_status(), models[peft].get_model_status()
    ours_layers, theirs_layers = _lora_layers(ours), _lora_layers(theirs)
    if step == "both-active":  # peft lists the model's active adapters on every layer, peftkit those it holds
        assert [s["active_adapters"] for s in ours_layers] == [["default", "other"], ["default"]] * 2
        assert all(s["active_adapters"] == ["default", "other"] for s in theirs_layers)
        for s in ours_layers + theirs_layers:
            del s["active_adapters"]
    if step == "disabled":  # peft also freezes the adapters while they are disabled
        assert all(s["requires_grad"] == {"default": True, "other": False} for s in ours_layers[::2])
        assert all(not any(s["requires_grad"].values()) for s in theirs_layers)
        for s in ours_layers + theirs_layers:
            del s["requires_grad"]
    assert ours_layers == theirs_layers and len(ours_layers) == 4
    for field in ("base_model_type", "peft_types", "num_adapter_layers", "enabled", "active_adapters",
                  "merged_adapters", "requires_grad", "available_adapters", "devices", "quantization_backend",
                  "trainable_params"):
        if step == "disabled" and field in ("requires_grad", "trainable_params"):
            continue
        assert getattr(ours_model, field) == getattr(theirs_model, field), field


def test_values_of_a_partly_merged_model():
    model = _two_adapters(peftkit)
    query = model.get_layer_status()[0]
    assert query.name == "model.bert.encoder.layer.0.attention.self.query"
    assert query.module_type == "AdaptedLayer(Linear)"
    assert query.requires_grad == {"default": True, "other": False}
    model.merge_adapter(["default"])
    status = model.get_model_status()
    assert status.merged_adapters == ["default"] and status.active_adapters == ["default"]
    assert status.enabled is True and status.adapter_model_type == "AdapterModel"
    assert status.peft_types == {"default": "LORA", "other": "LORA"}
    # one layer unmerged by hand while the others stay merged: the model's state is "irregular"
    model.base_model.model.bert.encoder.layer[1].attention.self.value.unmerge()
    assert model.get_model_status().merged_adapters == "irregular"
    assert model.get_layer_status()[3].merged_adapters == []


def test_irregular_enabled_and_requires_grad():
    model = _two_adapters(peftkit)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    query.disabled = True
    query.adapters["default"].lora_A.weight.requires_grad_(False)
    status = model.get_model_status()
    assert status.enabled == "irregular"
    assert status.requires_grad == {"default": "irregular", "other": False}
    assert model.get_layer_status()[0].requires_grad == {"default": "irregular", "other": False}


def test_soft_prompt_and_modules_to_save_are_reported():
    model = get_peft_model(tiny_bert_classifier(), PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    statuses = model.get_layer_status()
    assert [(s.name, s.module_type) for s in statuses] == [
        ("model.classifier", "ModulesToSaveWrapper(Linear)"), ("extra_modules.default", "PromptEmbedding")]
    assert statuses[1].active_adapters == ["default"] and statuses[1].requires_grad == {"default": True}
    status = model.get_model_status()
    assert status.peft_types == {"default": "PROMPT_TUNING"} and status.num_adapter_layers == 2
    assert status.trainable_params == 3 * 16 + 16 * 2 + 2
    with model.disable_adapter():
        assert model.get_model_status().enabled is False


def test_composed_adapter_reports_its_owner_name():
    model = get_peft_model(tiny_llama(), mam_config(num_virtual_tokens=2, encoder_hidden_size=None))
    statuses = model.get_layer_status()
    assert statuses and all(s.available_adapters == ["default"] for s in statuses)
    assert all(set(s.requires_grad) == {"default"} for s in statuses)
    assert model.get_model_status().active_adapters == ["default"]


def test_quantised_base_names_its_format():
    pytest.importorskip("torchao")
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peftkit.quantize_base(model, "int8")
    statuses = model.get_layer_status()
    assert {s.quantization_backend for s in statuses} == {"int8"}
    assert model.get_model_status().quantization_backend == "int8"


def test_inner_model_and_plain_modules():
    model = _two_adapters(peftkit)
    inner = get_model_status(model.get_base_model())
    assert inner.adapter_model_type == "None" and inner.peft_types == {}
    assert inner.base_model_type == "BertForSequenceClassification"
    assert inner.num_adapter_layers == model.get_model_status().num_adapter_layers
    assert get_layer_status(model.get_base_model())[0].name == "bert.encoder.layer.0.attention.self.query"
    custom = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=1, target_modules=["0"]))
    assert get_model_status(custom.get_base_model()).base_model_type == "other"
    with pytest.raises(ValueError, match="no peftkit adapter layer found in this Linear"):
        get_layer_status(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not str"):
        get_layer_status("model")
    assert dataclasses.is_dataclass(inner)


def test_a_layer_inside_a_parallel_adapters_sub_layer_is_named_by_its_plain_name():
    """get_layer_status named LoRA's layer inside a parallel adapter's sub-layer by its physical path
    (``...output.base_layer.dense``), while targeting and the saved file use ``...output.dense``."""
    from transformers import BertConfig, BertModel

    import peftkit

    model = peftkit.get_peft_model(BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32)),
                                   peftkit.ParallelConfig(), adapter_name="p")
    model.add_adapter("l", peftkit.LoraConfig(r=2, target_modules=["dense"]))
    names = [s.name for s in model.get_layer_status()]
    assert "model.encoder.layer.0.output" in names and "model.encoder.layer.0.output.dense" in names
    assert not any(".base_layer." in n for n in names)
