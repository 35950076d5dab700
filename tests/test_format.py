"""Saving and loading adapter folders: round trips, atomic writes, and clear errors on bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from peftkit import AdapterLoadError, ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.formats import hf_peft
from peftkit.layers import AdaptedLayer
from tests.conftest import ids, perturb, tiny_bert_classifier


def trained(tmp_path, **kw):
    base = tiny_bert_classifier()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], **kw))
    perturb(model)
    model.save_pretrained(tmp_path)
    return model, state


def fresh(state):
    base = tiny_bert_classifier()
    base.load_state_dict(state)
    return base


def test_round_trip_is_exact_and_frozen_by_default(tmp_path):
    model, state = trained(tmp_path, lora_alpha=5)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        loaded = PeftModel.from_pretrained(fresh(state), tmp_path)
        assert torch.equal(loaded(input_ids=x).logits, expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(fresh(state), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 5


def test_load_adapter_adds_a_second_adapter(tmp_path):
    model, state = trained(tmp_path)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        other = get_peft_model(fresh(state), LoraConfig(r=2, target_modules=["key"]), adapter_name="mine")
        other.load_adapter(tmp_path, adapter_name="theirs")
        assert other.active_adapters == ["mine"]
        other.set_adapter("theirs")
        assert torch.equal(other(input_ids=x).logits, expected)


def test_names_containing_method_words_round_trip(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Linear(4, 4)          # a user module named like a LoRA matrix
            self.default = nn.Linear(4, 4)         # and one named like the default adapter
            self.base_layer = nn.Linear(4, 2)

        def forward(self, x):
            return self.base_layer(self.default(self.lora_A(x)))

    torch.manual_seed(3)
    base = Odd()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lora_A", "default", "base_layer"]),
                           adapter_name="lora")
    perturb(model)
    model.save_pretrained(tmp_path, selected_adapters=["lora"])
    keys = set(hf_peft.load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert "base_model.model.lora_A.lora_A.weight" in keys and "base_model.model.base_layer.lora_B.weight" in keys
    x = torch.randn(3, 4)
    twin = Odd()
    twin.load_state_dict(state)
    loaded = PeftModel.from_pretrained(twin, tmp_path / "lora", adapter_name="lora")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model, state = trained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    perturb(model)

    def crash(fd):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(hf_peft.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    PeftModel.from_pretrained(fresh(state), tmp_path)  # still loads



def test_a_failing_second_adapter_leaves_the_first_adapters_old_files(tmp_path):
    model, _ = trained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    perturb(model)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["key"]))
    (tmp_path / "b").write_text("the user's notes")  # a file where adapter b's folder would go
    with pytest.raises(NotADirectoryError, match=r"b'.*is a file"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert (tmp_path / "b").read_text() == "the user's notes"
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "b"]
    with pytest.raises(NotADirectoryError, match="is a file"):
        model.save_pretrained(tmp_path / "b")

def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    trained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)


def test_pickle_checkpoint_is_refused(tmp_path):
    trained(tmp_path)
    os.replace(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_safetensors_is_a_clear_error_and_model_is_untouched(tmp_path, damage):
    _, state = trained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    base = fresh(state)
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_rank_mismatch_names_the_tensor_and_leaves_model_unadapted(tmp_path):
    _, state = trained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base = fresh(state)
    with pytest.raises(AdapterLoadError, match=r"shape mismatch.*lora_A.weight: file \(4, 16\) vs model \(8, 16\)"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_load_adapter_failure_keeps_existing_adapters(tmp_path):
    _, state = trained(tmp_path / "a")
    model = get_peft_model(fresh(state), LoraConfig(r=2, target_modules=["query"]))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(AdapterLoadError):
        model.load_adapter(tmp_path / "a", adapter_name="broken")
    assert list(model.peft_config) == ["default"]
    assert all(list(m.adapters) == ["default"] for m in model.modules() if isinstance(m, AdaptedLayer))


def test_model_of_another_shape_is_rejected(tmp_path):
    trained(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32))
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_bad_config_json(tmp_path):
    trained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "NOPE"}))
    with pytest.raises(ConfigError, match="unknown PEFT method 'NOPE'"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    # re-saved as UTF-16 (as some Windows editors and shells do): was a bare UnicodeDecodeError naming no file
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}), encoding="utf-16")
    with pytest.raises(ConfigError, match=r"adapter_config.json is not UTF-8 text \(.*\); an adapter config is UTF-8"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)


def test_pickle_saving_is_refused(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)


def test_a_sequence_classification_head_is_named_in_the_saved_config(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"]  # as peft writes the head it trains along
    loaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    assert loaded.peft_config["default"].modules_to_save == ["classifier"]


def test_loading_a_folder_of_adapter_folders_names_them(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds the adapter folder\(s\) \['a', 'b'\].*give one of those"):
        PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path, adapter_name="a")
    PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "a", adapter_name="a")


def test_set_peft_model_state_dict_refuses_values_it_cannot_copy_before_copying_any():
    """A non-tensor value failed with AttributeError ('str' object has no attribute 'shape'), None with TypeError;
    a meta tensor after a good one failed half-way, with the first tensor already copied in."""
    from peftkit import ConfigError, LoraConfig, get_peft_model, set_peft_model_state_dict
    from peftkit import get_peft_model_state_dict as get_sd
    from tests.conftest import perturb, tiny_llama

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(model)
    own = get_sd(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, last = sorted(own)[0], sorted(own)[-1]
    with pytest.raises(ConfigError, match=rf"state_dict\['{first}'\] is a str, not a tensor"):
        set_peft_model_state_dict(model, {**own, first: "weights"})
    with pytest.raises(ConfigError, match=r"state_dict must be a dict of tensors .*got NoneType"):
        set_peft_model_state_dict(model, None)
    half = {k: v + 1 for k, v in own.items()}
    half[last] = torch.empty_like(own[last], device="meta")
    with pytest.raises(NotImplementedError):
        set_peft_model_state_dict(model, half)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_state_dict_functions_take_pefts_arguments(tmp_path):
    """state_dict= (FSDP/DeepSpeed saving), save_embedding_layers, ignore_mismatched_sizes, low_cpu_mem_usage and
    key_mapping were TypeErrors; a state dict given positionally was printed whole in an unknown-name error."""
    from peftkit import ConfigError, LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict
    from peftkit import get_peft_model_state_dict as get_sd
    from tests.conftest import perturb, tiny_llama

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(model)
    own = get_sd(model)
    doubled = {k: 2 * v for k, v in model.state_dict().items()}  # what a gather would hand over
    taken = get_sd(model, state_dict=doubled, save_embedding_layers="auto", unwrap_compiled=True)
    assert taken.keys() == own.keys() and all(torch.equal(taken[k], 2 * own[k]) for k in own)
    assert get_sd(model, "default").keys() == own.keys()  # peftkit's earlier positional adapter name
    # the embedding matrices are written on request, their values also taken from the given state dict
    embed = "base_model.model.model.embed_tokens.weight"
    # (both ends of the tied embedding, as peft writes them)
    assert get_sd(model, save_embedding_layers=True).keys() == own.keys() | {embed, "base_model.model.lm_head.weight"}
    assert torch.equal(get_sd(model, state_dict=doubled, save_embedding_layers=True)[embed],
                       2 * model.get_input_embeddings().weight)
    with pytest.raises(ConfigError, match="save_embedding_layers='yes' is not valid; use 'auto', True or False"):
        get_sd(model, save_embedding_layers="yes")
    set_peft_model_state_dict(model, own, low_cpu_mem_usage=False, ignore_mismatched_sizes=False)
    with pytest.raises(ConfigError, match="ignore_mismatched_sizes=True is not supported"):
        set_peft_model_state_dict(model, own, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path)
    renamed = load_peft_weights(tmp_path, key_mapping={r"\.q_proj\.": ".query."})
    assert sorted(renamed) == sorted(k.replace(".q_proj.", ".query.") for k in own)
