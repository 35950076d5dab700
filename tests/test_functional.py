"""peftkit.functional, the module a peft script imports as peft.functional: the calls a port meets first, on models
from inject_adapter_in_model, checked against peft where it has them."""

from __future__ import annotations

import copy

import peft
import peft.functional
import pytest
import torch
from torch import nn

import peftkit
import peftkit.functional as F
from peftkit import (
    ConfigError,
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)


class _Net(nn.Module):
    """A linear to adapt and a head to train whole (``modules_to_save``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.linear(x))


def _adapter_dtypes(model: nn.Module, marker: str) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if marker in n}


def test_functional_offers_every_call_of_peft_functional():
    assert set(peft.functional.__all__) <= set(F.__all__)
    for name in peft.functional.__all__:
        assert callable(getattr(F, name)), name


def test_cast_adapter_dtype_upcasts_a_half_precision_adapter_as_peft_does():
    torch.manual_seed(0)
    base = _Net()
    config = dict(r=2, target_modules=["linear"], modules_to_save=["head"], init_lora_weights=False)
    model = inject_adapter_in_model(LoraConfig(**config), copy.deepcopy(base)).to(torch.bfloat16)
    lora_a = model.linear.adapters["default"].lora_A.weight
    assert lora_a.dtype == torch.bfloat16  # casting the whole model cast the adapter too
    values = {k: v.float() for k, v in get_peft_model_state_dict(model).items()}

    F.cast_adapter_dtype(model, "default")

    state = get_peft_model_state_dict(model)
    assert {k: v.dtype for k, v in state.items()} == {"linear.lora_A.weight": torch.float32, "linear.lora_B.weight":
                                                      torch.float32, "head.weight": torch.bfloat16,
                                                      "head.bias": torch.bfloat16}
    assert all(torch.equal(state[k].float(), values[k]) for k in values)  # upcasting is exact
    assert model.linear.adapters["default"].lora_A.weight is lora_a  # an optimiser built before keeps it
    assert model.linear.base_layer.weight.dtype == torch.bfloat16  # the base keeps its dtype
    # peft casts the same tensors and leaves the same ones alone (the head copy too, as get_peft_model makes it)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(base)).to(torch.bfloat16)
    peft.functional.cast_adapter_dtype(theirs, "default")
    assert {k: v.dtype for k, v in peft.get_peft_model_state_dict(theirs).items()} == {k: v.dtype for k, v in state.items()}
    # the upcast adapter runs on the bfloat16 base as one that was float32 from the start (peftkit's default)
    fresh = inject_adapter_in_model(LoraConfig(**config), copy.deepcopy(base).to(torch.bfloat16))
    set_peft_model_state_dict(fresh, {k: v.to(state[k].dtype) for k, v in values.items()})
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_cast_adapter_dtype_leaves_other_adapters_and_honours_autocast_false():
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["linear"]), _Net())
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["linear"]), model, adapter_name="other")
    model.half()
    F.cast_adapter_dtype(model, "default", autocast_adapter_dtype=False)
    assert set(_adapter_dtypes(model, ".adapters.").values()) == {torch.float16}
    F.cast_adapter_dtype(model, "other")
    assert set(_adapter_dtypes(model, ".adapters.other.").values()) == {torch.float32}
    assert set(_adapter_dtypes(model, ".adapters.default.").values()) == {torch.float16}


@pytest.mark.parametrize("name, kw, match", [
    ("nope", {}, r"unknown adapter name\(s\) \['nope'\]; this model has \['default'\]"),
    (["default"], {}, r"adapter_name=\['default'\] is not valid"),
    ("default", {"autocast_adapter_dtype": "yes"}, r"autocast_adapter_dtype='yes' must be True or False"),
])
def test_cast_adapter_dtype_refuses_bad_input_before_changing_anything(name, kw, match):
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["linear"]), _Net()).half()
    with pytest.raises(ConfigError, match=match):
        F.cast_adapter_dtype(model, name, **kw)
    assert set(_adapter_dtypes(model, ".adapters.").values()) == {torch.float16}
    with pytest.raises(ValueError, match=r"cast_adapter_dtype\(\): this _Net holds no adapter put in by peftkit"):
        F.cast_adapter_dtype(_Net(), "default")


# --- the state-dict calls on a model peftkit did not adapt -----------------------------------------------------------
def _peft_injected() -> nn.Module:
    return peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["linear"]), _Net())


@pytest.mark.parametrize("make, seen", [(_Net, "holds no adapter"), (_peft_injected, "holds adapters of the peft package")])
def test_state_dict_calls_on_a_model_without_peftkit_adapters_say_what_to_pass(make, seen):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call, args in ((get_peft_model_state_dict, ()), (set_peft_model_state_dict, ({},))):
        with pytest.raises(ValueError, match=rf"{call.__name__}\(\) takes a peftkit PeftModel or a model from "
                                             rf"peftkit.inject_adapter_in_model; this _Net {seen}"):
            call(model, *args)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError, match=r"get_peft_model_state_dict\(\) takes a torch.nn.Module .*, not a dict"):
        get_peft_model_state_dict({})


def test_state_dict_calls_still_take_peft_models_and_injected_ones():
    model = peftkit.get_peft_model(_Net(), LoraConfig(r=2, target_modules=["linear"]))
    assert sorted(get_peft_model_state_dict(model)) == ["base_model.model.linear.lora_A.weight",
                                                        "base_model.model.linear.lora_B.weight"]
    injected = inject_adapter_in_model(LoraConfig(r=2, target_modules=["linear"]), _Net())
    assert sorted(get_peft_model_state_dict(torch.compile(injected))) == ["linear.lora_A.weight", "linear.lora_B.weight"]
