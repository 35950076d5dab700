"""The last parts of peft's public API: inject_adapter_in_model, PeftMixedModel (get_peft_model(mixed=True)) and the
model's _checkpoint_conversion_mapping as the default key_mapping, each checked against peft itself."""

from __future__ import annotations

import copy
import warnings
from typing import ClassVar

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit import (
    AdapterLoadError,
    ConfigError,
    PeftMixedModel,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from tests.conftest import ids, perturb, tiny_llama

#: (config class name in both libraries, keyword arguments), with a non-zero start so that B = 0 hides nothing
INJECTED = {
    "lora": ("LoraConfig", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                init_lora_weights=False)),
    "loha": ("LoHaConfig", dict(r=2, target_modules=["q_proj", "down_proj"], init_weights=False)),
    "lokr": ("LoKrConfig", dict(r=2, target_modules=["q_proj", "down_proj"], init_weights=False)),
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False)),
}


def _pair(case: str) -> tuple[object, object]:
    name, kw = INJECTED[case]
    return getattr(peftkit, name)(**copy.deepcopy(kw)), getattr(peft, name)(**copy.deepcopy(kw))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


# --- inject_adapter_in_model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(INJECTED))
def test_injected_keys_and_outputs_match_peft(case):
    base = tiny_llama()
    ours_config, theirs_config = _pair(case)
    ours = copy.deepcopy(base)
    out = inject_adapter_in_model(ours_config, ours)
    theirs = peft.inject_adapter_in_model(theirs_config, copy.deepcopy(base))
    assert out is ours and type(ours) is type(base)  # in place, no wrapper
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    ours_sd = get_peft_model_state_dict(ours)
    assert sorted(ours_sd) == sorted(theirs_sd)
    assert not any(k.startswith("base_model.") for k in ours_sd)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1] > 0
    x = ids(2, 6)
    assert (_logits(ours, x) - _logits(base, x)).abs().max() > 1e-3  # the adapter does something
    set_peft_model_state_dict(ours, theirs_sd)
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-6
    # and back: peft loads what peftkit gives (after peftkit's own values changed)
    perturb(ours)
    result = peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
    assert not result.unexpected_keys
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-6


def test_injected_model_state_dict_and_attributes():
    model = tiny_llama()
    plain_keys = set(model.state_dict())
    inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["q_proj"]), model)
    assert list(model.peft_config) == ["default"] and model.peft_config["default"].r == 2
    # nothing of peftkit's bookkeeping leaks into the model's own state dict or parameters
    added = set(model.state_dict()) - plain_keys
    assert all(".adapters.default.lora_" in k or ".base_layer." in k for k in added)
    assert not any(k.startswith("_peftkit") for k in model.state_dict())
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    # peft's state_dict= form: values taken from the model's own state dict
    full = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    taken = get_peft_model_state_dict(model, state_dict=full)
    key = "model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(taken[key], model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.weight + 1)
    # loading accepts peft's PeftModel file keys too (base_model.model. in front)
    prefixed = {"base_model.model." + k: torch.full_like(v, 0.5) for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, prefixed)
    assert torch.all(model.model.layers[1].self_attn.q_proj.adapters["default"].lora_A.weight == 0.5)


def test_second_injection_is_the_active_adapter_as_in_peft():
    base = tiny_llama()
    ours = inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                   copy.deepcopy(base))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                          copy.deepcopy(base))
    second = dict(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert inject_adapter_in_model(peftkit.LoraConfig(**second), ours, "two") is ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that the model already has a peft_config
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**second), theirs, "two")
    assert list(ours.peft_config) == ["default", "two"]
    assert theirs.model.layers[0].self_attn.q_proj.active_adapters == ["two"]
    for name in ("default", "two"):
        theirs_sd = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert sorted(get_peft_model_state_dict(ours, adapter_name=name)) == sorted(theirs_sd)
        set_peft_model_state_dict(ours, theirs_sd, adapter_name=name)
    x = ids(2, 6)
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-6
    assert (_logits(ours, x) - _logits(base, x)).abs().max() > 1e-3


def test_injection_from_a_state_dict_adapts_the_modules_it_names():
    base = tiny_llama()
    source = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["v_proj", "q_proj"]), copy.deepcopy(base))
    keys = peft.get_peft_model_state_dict(source)
    # target_modules says k_proj; the state dict's keys win, as in peft
    ours = inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["k_proj"]), copy.deepcopy(base),
                                   state_dict=keys)
    assert sorted(get_peft_model_state_dict(ours)) == sorted(keys)
    with pytest.raises(ValueError, match="names no module"):
        inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["k_proj"]), copy.deepcopy(base),
                                state_dict={"decoder.lora_A.weight": torch.zeros(1)})


@pytest.mark.parametrize("name, kw", [("PromptTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
                                      ("PrefixTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
                                      ("VeraConfig", dict(r=4, target_modules=["q_proj"]))])
def test_injection_refuses_what_peft_refuses(name, kw):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        peft.inject_adapter_in_model(getattr(peft, name)(**kw), copy.deepcopy(model))
    with pytest.raises(ValueError, match=r"does not support .*get_peft_model"):
        inject_adapter_in_model(getattr(peftkit, name)(**kw), model)
    assert not hasattr(model, "peft_config") and model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="PROMPT_TUNING"):  # also as a part of a composed config
        inject_adapter_in_model(peftkit.ComposedConfig(configs=[peftkit.LoraConfig(target_modules=["q_proj"]),
                                                                peftkit.PromptTuningConfig(num_virtual_tokens=2)]), model)


# --- PeftMixedModel -----------------------------------------------------------------------------------------------
MIXED = {"default": ("LoraConfig", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
         "h": ("LoHaConfig", dict(r=2, target_modules=["q_proj", "down_proj"], init_weights=False)),
         "k": ("LoKrConfig", dict(r=2, target_modules=["v_proj", "up_proj"], init_weights=False))}


def _mixed_pair(base: nn.Module) -> tuple[PeftMixedModel, object]:
    made = []
    for lib in (peftkit, peft):
        (_, (cls, kw)), *rest = MIXED.items()
        model = lib.get_peft_model(copy.deepcopy(base), getattr(lib, cls)(**kw), mixed=True)
        for name, (cls, kw) in rest:
            model.add_adapter(name, getattr(lib, cls)(**kw))
        model.set_adapter(list(MIXED))
        made.append(model)
    ours, theirs = made
    for name in MIXED:  # peftkit takes peft's weights (peft nests the layers: its keys may read q_proj.base_layer.)
        set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    return ours, theirs


def test_mixed_model_with_three_types_active_matches_peft():
    base = tiny_llama()
    ours, theirs = _mixed_pair(base)
    assert type(ours) is PeftMixedModel and isinstance(ours, PeftModel)
    assert ours.active_adapters == list(MIXED) == theirs.active_adapters
    x = ids(2, 6)
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-5
    assert (_logits(ours, x) - _logits(base, x)).abs().max() > 1e-2
    # two of them: the third is left out in both
    ours.set_adapter(["h", "k"])
    theirs.set_adapter(["h", "k"])
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-5
    with ours.disable_adapter(), theirs.disable_adapter():
        assert (_logits(ours, x) - _logits(base, x)).abs().max() <= 1e-6
        assert (_logits(theirs, x) - _logits(base, x)).abs().max() <= 1e-6
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged_ours) is type(base)
    assert (_logits(merged_ours, x) - _logits(merged_theirs, x)).abs().max() <= 1e-5


def test_mixed_model_unload_and_delete():
    base = tiny_llama()
    ours, _ = _mixed_pair(base)
    x = ids(2, 5)
    with pytest.raises(ConfigError, match="unknown adapter name"):
        ours.delete_adapter(["h", "nope"])
    assert list(ours.peft_config) == list(MIXED)  # nothing deleted
    ours.delete_adapter(["h", "k"])
    assert list(ours.peft_config) == ["default"] and ours.active_adapters == ["default"]
    assert (_logits(ours.unload(), x) - _logits(base, x)).abs().max() <= 1e-6


def test_mixed_model_active_adapter_is_the_list_of_active_names_as_in_peft():
    base = tiny_llama()
    ours, theirs = _mixed_pair(base)
    seen = []
    for model in (ours, theirs):
        steps = [list(model.active_adapter)]
        model.set_adapter("h")
        steps.append(model.active_adapter)
        model.set_adapter(["k", "default"])
        steps.append(model.active_adapter)
        model.delete_adapter("k")
        steps.append(model.active_adapter)
        model.delete_adapter("default")
        steps.append(model.active_adapter)  # the last active one deleted: another becomes active
        model.delete_adapter("h")
        steps.append(model.active_adapter)  # none left: an empty list, no error
        seen.append(steps)
    assert seen[0] == seen[1] == [["default", "h", "k"], ["h"], ["k", "default"], ["default"], ["h"], []]
    # a fresh mixed model's one adapter is a list too; a plain PeftModel keeps peft's string
    fresh = get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(target_modules=["q_proj"]), mixed=True)
    assert fresh.active_adapter == ["default"] and fresh.active_peft_config.target_modules == ["q_proj"]
    plain = get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(target_modules=["q_proj"]))
    assert plain.active_adapter == "default"


@pytest.mark.parametrize("name, kw", [("IA3Config", dict(target_modules=["q_proj"], feedforward_modules=[])),
                                      ("PromptTuningConfig", dict(num_virtual_tokens=4, task_type="CAUSAL_LM")),
                                      ("VeraConfig", dict(r=4, target_modules=["q_proj"]))])
def test_mixed_model_refuses_what_peft_refuses(name, kw):
    with pytest.raises(ValueError, match="not compatible"):
        peft.get_peft_model(tiny_llama(), getattr(peft, name)(**kw), mixed=True)
    config = getattr(peftkit, name)(**kw)
    with pytest.raises(ValueError, match=f"not {config.peft_type}"):
        get_peft_model(tiny_llama(), config, mixed=True)
    assert config.base_model_name_or_path is None  # the config is left as it was
    model = get_peft_model(tiny_llama(), peftkit.LoraConfig(target_modules=["q_proj"]), mixed=True)
    with pytest.raises(ValueError, match="PeftMixedModel takes"):
        model.add_adapter("other", getattr(peftkit, name)(**kw))
    assert list(model.peft_config) == ["default"]


def test_mixed_model_loads_folders_and_refuses_other_methods(tmp_path):
    base = tiny_llama()
    source = get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                                    init_lora_weights=False))
    source.add_adapter("h", peftkit.LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    source.add_adapter("ia3", peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    source.save_pretrained(tmp_path)
    ours = PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(ours) is PeftMixedModel  # not the task class, as peft's mixed from_pretrained
    ours.load_adapter(tmp_path / "h", "h")
    with pytest.raises(ValueError, match="not IA3"):
        ours.load_adapter(tmp_path / "ia3", "ia3")
    assert list(ours.peft_config) == ["default", "h"]
    ours.set_adapter(["default", "h"])
    source.set_adapter(["default", "h"])
    x = ids(2, 6)
    assert (_logits(ours, x) - _logits(source, x)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="not IA3"):
        PeftMixedModel.from_pretrained(copy.deepcopy(base), tmp_path / "ia3")


# --- _checkpoint_conversion_mapping as the default key_mapping ------------------------------------------------------
class _Old(nn.Module):
    """A model whose body used to be called ``encoder``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class _Renamed(nn.Module):
    """The same model after its body was renamed ``body``; it maps old checkpoints as transformers models do."""

    _checkpoint_conversion_mapping: ClassVar[dict[str, str]] = {"^encoder": "body"}

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_checkpoint_conversion_mapping_is_the_default_key_mapping(tmp_path):
    old = _Old()
    renamed = _Renamed()
    renamed.body.load_state_dict(old.encoder.state_dict())
    source = get_peft_model(copy.deepcopy(old), peftkit.LoraConfig(r=2, target_modules=["0", "2"],
                                                                   init_lora_weights=False))
    source.save_pretrained(tmp_path)
    x = torch.randn(3, 8)
    ours = PeftModel.from_pretrained(copy.deepcopy(renamed), tmp_path)
    with torch.no_grad():
        assert (ours(x) - source(x)).abs().max() <= 1e-6
        assert (ours(x) - renamed(x)).abs().max() > 1e-3
    # peft's rule: so does peft's from_pretrained
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(renamed), tmp_path)
    with torch.no_grad():
        assert (theirs(x) - source(x)).abs().max() <= 1e-6
    # an explicit key_mapping (even empty) replaces the default, and load_adapter applies none (as in peft)
    with pytest.raises(AdapterLoadError, match="encoder"):
        PeftModel.from_pretrained(copy.deepcopy(renamed), tmp_path, key_mapping={})
    with pytest.raises(AdapterLoadError, match="encoder"):
        ours.load_adapter(tmp_path, "again")
    ours.load_adapter(tmp_path, "again", key_mapping=renamed._checkpoint_conversion_mapping)
    assert list(ours.peft_config) == ["default", "again"]
