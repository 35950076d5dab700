"""Break tests of inject_adapter_in_model and PeftMixedModel: odd inputs and lifecycles, each checked against peft
where peft has the feature."""

from __future__ import annotations

import copy
import re
import warnings

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from tests.conftest import tiny_llama


class _Nested(nn.Module):
    """Two linears whose paths end alike: ``lin`` and ``sub.lin``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.sub = nn.Sequential()
        self.sub.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub.lin(self.lin(x))


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def _unchanged(model: nn.Module, snapshot: tuple[dict[str, torch.Tensor], list[str]]) -> bool:
    tensors, kinds = snapshot
    now = model.state_dict()
    return (now.keys() == tensors.keys() and all(torch.equal(now[k], tensors[k]) for k in now)
            and kinds == [type(m).__name__ for m in model.modules()])


# --- inject_adapter_in_model(state_dict=...) ----------------------------------------------------------------------
def test_injection_from_a_state_dict_adapts_only_the_named_module_not_one_ending_alike():
    keys = {"lin.lora_A.weight": torch.zeros(2, 4), "lin.lora_B.weight": torch.zeros(4, 2)}
    base = _Nested()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that the state dict names other modules than target_modules
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["zzz"], init_lora_weights=False),
                                              copy.deepcopy(base), state_dict=keys)
    ours = inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["zzz"]), copy.deepcopy(base), state_dict=keys)
    assert sorted(peft.get_peft_model_state_dict(theirs)) == sorted(keys)
    assert sorted(get_peft_model_state_dict(ours)) == sorted(keys)  # sub.lin is left alone, as in peft
    assert isinstance(ours.sub.lin, nn.Linear)
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-6
        assert (ours(x) - base(x)).abs().max() > 1e-3


def test_injection_from_the_models_own_state_dict_is_refused_as_in_peft():
    model = _Nested()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="not found"):
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["lin"]), _Nested(),
                                     state_dict=_Nested().state_dict())
    with pytest.raises(ValueError, match=r"names no module .*'lin\.weight'"):
        inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["lin"]), model, state_dict=model.state_dict())
    assert _unchanged(model, before) and not hasattr(model, "peft_config")


# --- a composed adapter injected --------------------------------------------------------------------------------
def _composed() -> peftkit.ComposedConfig:
    return peftkit.ComposedConfig(configs=[peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                           peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[],
                                                             init_ia3_weights=False)])


def test_injected_composition_lists_its_name_and_round_trips_its_state_dict():
    model = inject_adapter_in_model(_composed(), tiny_llama(), "c")
    assert list(model.peft_config) == ["c"] and model.peft_config["c"].peft_type == "COMPOSED"
    status = peftkit.get_model_status(model)
    assert status.available_adapters == ["c"] and status.active_adapters == ["c"]
    assert {s.name for s in peftkit.get_layer_status(model)} >= {"model.layers.0.self_attn.q_proj"}
    saved = get_peft_model_state_dict(model, adapter_name="c")
    # the parts' namespaces stay in front, the module paths follow without base_model.model.
    assert "parts.0.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert "parts.1.model.layers.1.self_attn.k_proj.ia3_l" in saved
    assert not any("base_model" in k for k in saved)
    changed = {k: v + 0.25 for k, v in saved.items()}
    set_peft_model_state_dict(model, changed, adapter_name="c")
    got = get_peft_model_state_dict(model, adapter_name="c")
    assert got.keys() == changed.keys() and all(torch.equal(got[k], changed[k]) for k in got)
    # a PeftModel's keys (base_model.model. after the namespace) load too
    prefixed = {re.sub(r"^(parts\.\d\.)", r"\1base_model.model.", k): torch.full_like(v, 0.5) for k, v in saved.items()}
    assert "parts.0.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in prefixed
    set_peft_model_state_dict(model, prefixed, adapter_name="c")
    assert torch.all(model.model.layers[1].self_attn.k_proj.adapters["c#1"].ia3_l == 0.5)


# --- peftkit.functional: the lifecycle of an injected model --------------------------------------------------------
def _two_injected(lib, base: nn.Module) -> nn.Module:
    model = lib.inject_adapter_in_model(lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                                        copy.deepcopy(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that the model already holds a peft_config
        return lib.inject_adapter_in_model(lib.LoHaConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights=False),
                                           model, "h")


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def test_functional_set_adapter_and_delete_adapter_match_peft():
    import peft.functional as theirs_f

    import peftkit.functional as ours_f

    base = tiny_llama()
    ours, theirs = _two_injected(peftkit, base), _two_injected(peft, base)
    for name in ("default", "h"):
        set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name)
    x = torch.randint(3, 64, (2, 6))
    for active in (["default", "h"], "default", ["h"]):
        ours_f.set_adapter(ours, active)
        theirs_f.set_adapter(theirs, active)
        assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-5
    assert (_logits(ours, x) - _logits(base, x)).abs().max() > 1e-3
    # gradients reach only the active adapter; set_requires_grad freezes it
    ours(input_ids=x, labels=x).loss.backward()
    touched = {n.split(".adapters.")[1].split(".")[0] for n, p in ours.named_parameters() if p.grad is not None}
    assert touched == {"h"}
    ours_f.set_requires_grad(ours, "h", requires_grad=False)
    assert not any(p.requires_grad for p in ours.parameters())
    # refusals change nothing
    before = _snapshot(ours)
    with pytest.raises(peftkit.ConfigError, match=r"unknown adapter name\(s\) \['nope'\]; this model has \['default', 'h'\]"):
        ours_f.set_adapter(ours, ["default", "nope"])
    with pytest.raises(peftkit.ConfigError, match="unknown adapter"):
        ours_f.delete_adapter(ours, "nope", prefix="lora_")
    assert _unchanged(ours, before) and peftkit.get_model_status(ours).active_adapters == ["h"]
    with pytest.raises(ValueError, match=r"holds no adapter put in by peftkit\.inject_adapter_in_model"):
        ours_f.set_adapter(copy.deepcopy(base), "default")
    # deleting the active adapter leaves the other one active, as in peft; the last one gives the base model back
    assert ours_f.delete_adapter(ours, "h") == ["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it sets 'default' active
        theirs_f.delete_adapter(theirs, "h", prefix="hada_")
    assert list(ours.peft_config) == ["default"]
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() <= 1e-5
    assert ours_f.delete_adapter(ours, "default") is None
    assert (_logits(ours, x) - _logits(base, x)).abs().max() <= 1e-6
    assert isinstance(ours.model.layers[0].self_attn.q_proj, nn.Linear)


@pytest.mark.parametrize("mixed", [False, True])
def test_get_peft_model_on_an_injected_model_says_how_to_add_more(mixed):
    model = inject_adapter_in_model(peftkit.LoraConfig(r=2, target_modules=["q_proj"]), tiny_llama())
    before = _snapshot(model)
    with pytest.raises(peftkit.ConfigError, match=r"put in by inject_adapter_in_model .*inject_adapter_in_model\(config, "
                                                  r"model, '<new name>'\)"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=2, target_modules=["v_proj"]), mixed=mixed)
    assert _unchanged(model, before) and list(model.peft_config) == ["default"]


def test_functional_cast_adapter_dtype_upcasts_one_adapter_as_in_peft():
    import peft.functional as theirs_f

    import peftkit.functional as ours_f

    base = tiny_llama()
    ours, theirs = _two_injected(peftkit, base), _two_injected(peft, base)
    for name in ("default", "h"):
        set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name)
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    ours_f.set_adapter(ours, ["default", "h"])
    theirs_f.set_adapter(theirs, ["default", "h"])
    before = _snapshot(ours)
    with pytest.raises(peftkit.ConfigError, match=r"unknown adapter name\(s\) \['nope'\]; this model has \['default', 'h'\]"):
        ours_f.cast_adapter_dtype(ours, "nope")
    with pytest.raises(peftkit.ConfigError, match="autocast_adapter_dtype='yes' must be True or False"):
        ours_f.cast_adapter_dtype(ours, "default", autocast_adapter_dtype="yes")
    ours_f.cast_adapter_dtype(ours, "default", autocast_adapter_dtype=False)  # does nothing, as in peft
    assert _unchanged(ours, before)
    params = {n: p for n, p in ours.named_parameters() if ".adapters.default." in n}
    ours_f.cast_adapter_dtype(ours, "default")
    theirs_f.cast_adapter_dtype(theirs, "default")

    def dtypes(lib, model, name):
        return sorted(str(t.dtype) for t in lib.get_peft_model_state_dict(model, adapter_name=name).values())

    assert dtypes(peftkit, ours, "default") == ["torch.float32"] * 8 == dtypes(peft, theirs, "default")
    assert set(dtypes(peftkit, ours, "h")) == {"torch.bfloat16"} == set(dtypes(peft, theirs, "h"))  # others are left
    assert {str(p.dtype) for n, p in ours.named_parameters() if ".adapters." not in n} == {"torch.bfloat16"}
    # the parameters keep their identity (an optimiser holding them sees the new values) and their trainability
    now = dict(ours.named_parameters())
    assert all(now[n] is p and p.requires_grad for n, p in params.items())
    x = torch.randint(3, 64, (2, 6))
    assert (_logits(ours, x).float() - _logits(theirs, x).float()).abs().max() <= 1e-2
    with pytest.raises(TypeError, match=r"cast_adapter_dtype\(\) takes a torch.nn.Module"):
        ours_f.cast_adapter_dtype("model", "default")


@pytest.mark.parametrize("call", ["set_adapter", "set_requires_grad"])
@pytest.mark.parametrize("flag", ["yes", 1, None])
def test_functional_flags_must_be_bools_and_nothing_changes_otherwise(call, flag):
    import peftkit.functional as ours_f

    model = _two_injected(peftkit, tiny_llama())
    before = _snapshot(model), [p.requires_grad for p in model.parameters()]
    keyword = "inference_mode" if call == "set_adapter" else "requires_grad"
    with pytest.raises(peftkit.ConfigError, match=rf"{keyword}={flag!r} must be True or False"):
        getattr(ours_f, call)(model, "h", **{keyword: flag})
    assert _unchanged(model, before[0]) and [p.requires_grad for p in model.parameters()] == before[1]
    assert peftkit.get_model_status(model).active_adapters == ["h"]
