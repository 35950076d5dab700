"""Lifecycle guards: wrong calls fail with a clear error before any state changes, and what the user
had (base weights, biases, requires_grad, saved files) is given back or left whole."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from torch import nn

import peftkit
from peftkit import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.layers import AdaptedLayer
from tests.conftest import perturb


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def lora(**kw) -> LoraConfig:
    return LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False, **kw)


def two_adapters() -> PeftModel:
    model = get_peft_model(mlp(), lora())
    model.add_adapter("b", lora())
    return model


def test_a_mixed_batch_while_an_adapter_is_merged_is_refused():
    model = two_adapters()
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match=r"\['default'\] are merged .* unmerge_adapter\(\)"):
        model(torch.randn(2, 6), adapter_names=["b", "__base__"])
    model.unmerge_adapter()
    assert model(torch.randn(2, 6), adapter_names=["b", "__base__"]).shape == (2, 4)


@pytest.mark.parametrize("both_active", [False, True], ids=["b-active", "both-active"])
def test_deleting_one_merged_adapter_keeps_the_other_merged_and_exact(both_active):
    """With both active and merged, deleting one also unmerged the other, warning about a switch nobody asked for."""
    import warnings

    model = two_adapters()
    x = torch.randn(5, 6)
    with torch.no_grad():
        model.set_adapter("b")
        only_b = model(x)
        if both_active:
            model.set_adapter(["default", "b"])
        model.merge_adapter(["default", "b"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.delete_adapter("default")
        layer = model.get_base_model()[0]
        assert isinstance(layer, AdaptedLayer) and layer.merged_adapters == ["b"] and model.active_adapters == ["b"]
        torch.testing.assert_close(model(x), only_b, atol=1e-6, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), only_b, atol=1e-6, rtol=1e-5)
        base = model.unload()
        torch.testing.assert_close(base(x), mlp()(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("call", [lambda m: m.set_adapter(["b", "b"]), lambda m: m.merge_adapter(["b", "b"])])
def test_a_name_given_twice_is_refused(call):
    model = two_adapters()
    with pytest.raises(ConfigError, match=r"\['b'\] given more than once"):
        call(model)
    assert model.active_adapters == ["default"] and model.base_model.merged_adapters() == []


@pytest.mark.parametrize("name", ["a/b", "..", "a\\b", "x.y", ""])
def test_adapter_names_that_cannot_be_folder_names_are_refused(name):
    model = get_peft_model(mlp(), lora())
    with pytest.raises(ConfigError, match=r"adapter_name=.* is not valid"):
        model.add_adapter(name, lora())
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["keys", "update", "forward", "training"])
def test_adapter_names_that_torch_containers_reserve_are_refused(name):
    """They gave a bare KeyError from torch's ModuleDict ("attribute 'keys' already exists")."""
    model = get_peft_model(mlp(), lora())
    with pytest.raises(ConfigError, match=rf"adapter_name='{name}' is not valid: it is an attribute name of "
                                          "torch's ModuleDict"):
        model.add_adapter(name, lora())
    assert list(model.peft_config) == ["default"]
    model.add_adapter("lora_A", lora())  # a name that merely looks internal is fine


def test_a_model_that_already_holds_adapters_is_refused():
    model = get_peft_model(mlp(), lora())
    with pytest.raises(ConfigError, match="already holds peftkit adapters"):
        get_peft_model(model.get_base_model(), lora())


@pytest.mark.parametrize("config", [None, "lora", {"peft_type": "LORA", "r": 2}], ids=["none", "name", "dict"])
def test_get_peft_model_names_a_config_that_is_not_one(config):
    """A method name, a dict or None failed with AttributeError ('str' object has no attribute
    'base_model_name_or_path') on a model with a name_or_path (any transformers model) instead of saying what a
    config is."""
    base = mlp()
    base.name_or_path = "some/model"
    with pytest.raises(ConfigError, match=rf"expected a peftkit PeftConfig .*got builtins\.{type(config).__name__}"):
        get_peft_model(base, config)


@pytest.mark.parametrize("model", [None, "gpt2"], ids=["none", "name"])
def test_get_peft_model_names_a_model_that_is_not_a_module(model):
    with pytest.raises(TypeError, match=rf"model={model!r} is a {type(model).__name__}; give the torch.nn.Module"):
        get_peft_model(model, lora())


@pytest.mark.parametrize("call", ["from_pretrained", "load_adapter"])
def test_loading_refuses_bad_arguments_before_reading_anything(tmp_path, call):
    """is_trainable="no" loaded the adapter trainable (a truthy string); a dict config and a None folder failed
    with AttributeError/TypeError that did not name them."""
    get_peft_model(mlp(), lora()).save_pretrained(tmp_path)
    base = mlp()
    model = get_peft_model(mlp(), lora()) if call == "load_adapter" else None
    before = {k: v.clone() for k, v in (model or base).state_dict().items()}

    def load(folder=tmp_path, **kw):
        if model is None:
            return PeftModel.from_pretrained(base, folder, **kw)
        return model.load_adapter(folder, "other", **kw)

    with pytest.raises(ConfigError, match=rf"{call}\(\): is_trainable='no' must be True or False"):
        load(is_trainable="no")
    with pytest.raises(ConfigError, match=r"expected a peftkit PeftConfig .*got builtins\.dict"):
        load(config={"peft_type": "LORA", "r": 2})
    with pytest.raises(TypeError, match=rf"{call}\(\): model_id=None is a NoneType; give the adapter folder"):
        load(folder=None)
    after = (model or base).state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    assert model is None or list(model.peft_config) == ["default"]


@pytest.mark.parametrize("call", ["from_pretrained", "load_adapter"])
def test_a_refused_load_leaves_the_callers_config_as_it_was(tmp_path, call):
    """A config given to a load whose file did not fit came back in inference mode, with the model type's targets
    and the task's head filled in."""
    from tests.conftest import tiny_bert_classifier

    get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path)
    config = LoraConfig(r=4, task_type="SEQ_CLS")  # another rank than the file's: its tensors do not fit
    given = copy.deepcopy(vars(config))
    with pytest.raises(peftkit.AdapterLoadError, match="shape mismatch"):
        if call == "from_pretrained":
            PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path, config=config)
        else:
            model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["value"]))
            model.load_adapter(tmp_path, "other", config=config)
    assert vars(config) == given
    assert config.target_modules is None and config.modules_to_save is None and config.inference_mode is False


def test_a_refused_get_peft_model_leaves_the_callers_config_as_it_was():
    """The base model's name_or_path was written into the config before the adapter was refused."""
    base = mlp()
    base.name_or_path = "some/model"
    config = LoraConfig(r=2, target_modules=["zzz"])
    with pytest.raises(ConfigError, match="matched no module"):
        get_peft_model(base, config)
    assert config.base_model_name_or_path is None
    config.target_modules = ["0"]
    assert get_peft_model(base, config).peft_config["default"].base_model_name_or_path == "some/model"


@pytest.mark.parametrize("second", [peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                    peftkit.IA3Config()])
def test_a_model_that_already_holds_a_soft_prompt_is_refused(second):
    """A soft prompt wraps no layer, so only its hooks tell; a second get_peft_model was accepted and made
    the first PeftModel insert both prompts (its logits gained positions)."""
    from tests.conftest import ids, tiny_llama

    base = tiny_llama()
    first = get_peft_model(base, peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    x = ids(batch=2, seq=5)
    with torch.no_grad():
        before = first(input_ids=x).logits
    with pytest.raises(ConfigError, match="already holds peftkit adapters"):
        get_peft_model(base, second)
    with torch.no_grad():
        assert torch.equal(first(input_ids=x).logits, before)
    get_peft_model(first.unload(), second)  # once unloaded the base takes a new adapter


def test_disable_adapter_forbids_merging_inside_and_survives_a_deletion_inside():
    model = two_adapters()
    x = torch.randn(3, 6)
    model.merge_adapter(["default", "b"])
    with model.disable_adapter():
        with pytest.raises(ValueError, match="inside disable_adapter"):
            model.merge_adapter()
        model.delete_adapter("b")
    assert model.base_model.merged_adapters() == ["default"]
    with torch.no_grad():
        merged = model(x)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), merged, atol=1e-6, rtol=1e-5)


def test_switching_adapters_inside_disable_adapter_does_not_merge_the_old_one_back():
    """set_adapter('b') inside disable_adapter() while 'a' was merged: on exit 'a' was merged back, so the
    outputs were a + b although only 'b' was active (0.38 off on a tiny Llama); peft gives 'b' alone."""
    model = two_adapters()
    x = torch.randn(3, 6)
    model.set_adapter("b")
    with torch.no_grad():
        only_b = model(x)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match=r"the active adapters changed inside disable_adapter\(\) \(\['default'\] -> "
                                         r"\['b'\]\); adapter\(s\) \['default'\], merged before, stay unmerged"):
        with model.disable_adapter():
            model.set_adapter("b")
    assert model.active_adapters == ["b"] and model.base_model.merged_adapters() == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), only_b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [None, 3, ["default", 3]])
def test_set_adapter_and_set_requires_grad_name_a_value_that_is_not_a_name(bad):
    """set_adapter(None) raised a bare "TypeError: 'NoneType' object is not iterable"."""
    model = two_adapters()
    with pytest.raises(ConfigError, match=rf"adapter_name={bad!r} is not valid; give an adapter's name".replace("[", r"\[")):
        model.set_adapter(bad)
    with pytest.raises(ConfigError, match=rf"adapter_names={bad!r} is not valid".replace("[", r"\[")):
        model.set_requires_grad(bad)
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize("empty", [[], ()])
def test_set_adapter_refuses_an_empty_list_as_peft_but_the_mixed_model_and_functional_take_it(empty):
    """``set_adapter([])`` left a PeftModel with no active adapter, silently running the base model (peft's PeftModel
    refuses it); peft's mixed model and ``peft.functional.set_adapter`` take it, and so do peftkit's."""
    import peftkit.functional

    model = two_adapters()
    model.set_adapter("b")
    model.merge_adapter()
    x = torch.randn(2, 6)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match=rf"set_adapter\(\) needs at least one adapter name, not {re.escape(repr(empty))}; this "
                                         r"model has \['default', 'b'\] .*disable_adapter\(\)"):
        model.set_adapter(empty)
    assert model.active_adapters == ["b"] and model.base_model.merged_adapters() == ["b"]  # nothing changed
    with torch.no_grad():
        assert torch.equal(model(x), before)
        plain = mlp()(x)
        mixed = get_peft_model(mlp(), lora(), mixed=True)
        injected = peftkit.inject_adapter_in_model(lora(), mlp())
        assert (mixed(x) - plain).abs().max() > 1e-3 and (injected(x) - plain).abs().max() > 1e-3
        mixed.set_adapter(empty)
        peftkit.functional.set_adapter(injected, empty)
        for taker in (mixed, injected):  # no adapter active: the base model's output
            assert peftkit.get_model_status(taker).active_adapters == [] and torch.equal(taker(x), plain)
        assert mixed.active_adapter == []


def test_merging_and_deleting_name_a_value_that_is_not_a_name():
    """merge_adapter(3) / merge_and_unload(adapter_names=3) raised a bare "'int' object is not iterable"; a list given
    to delete_adapter must be named too, not fail on hashing."""
    model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="adapter_names=3 is not valid; give an adapter's name, a list of names"):
        model.merge_adapter(3)
    with pytest.raises(ConfigError, match="adapter_names=3 is not valid"):
        model.merge_and_unload(adapter_names=3)
    with pytest.raises(ConfigError, match=r"unknown adapter name\(s\) \[\['b'\]\]; this model has \['default', 'b'\]"):
        model.delete_adapter(["b"])
    assert list(model.peft_config) == ["default", "b"] and not model.base_model.merged_adapters()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_unload_gives_back_biases_and_requires_grad_as_the_user_had_them():
    base = mlp()
    base[2].weight.requires_grad_(False)  # the user's own choice
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, lora(bias="all"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("base_layer.bias"):
                p.add_(1.0)  # "training" the biases
    back = model.unload()
    for n, p in back.named_parameters():
        torch.testing.assert_close(p, before[n])
    assert {n: p.requires_grad for n, p in back.named_parameters()} == {
        "0.weight": True, "0.bias": True, "2.weight": False, "2.bias": True}


def test_deleting_an_adapter_that_loaded_biases_restores_the_base_biases(tmp_path):
    trained = get_peft_model(mlp(), lora(bias="all"))
    with torch.no_grad():
        trained.get_base_model()[0].base_layer.bias.add_(2.0)
    trained.save_pretrained(tmp_path / "a")
    base = mlp()
    original = base[0].bias.detach().clone()
    model = get_peft_model(base, lora())
    model.load_adapter(tmp_path / "a", "biased")
    torch.testing.assert_close(model.get_base_model()[0].base_layer.bias, original + 2.0)
    model.delete_adapter("biased")
    torch.testing.assert_close(model.get_base_model()[0].base_layer.bias, original)


def test_merge_and_unload_keeps_trained_biases():
    model = get_peft_model(mlp(), lora(bias="all"))
    with torch.no_grad():
        model.get_base_model()[0].base_layer.bias.fill_(3.0)
    assert torch.all(model.merge_and_unload()[0].bias == 3.0)


def test_save_pretrained_refuses_nothing_to_save_and_accepts_one_name(tmp_path):
    model = two_adapters()
    with pytest.raises(ValueError, match="selected_adapters is empty"):
        model.save_pretrained(tmp_path, selected_adapters=[])
    model.save_pretrained(tmp_path, selected_adapters="b")
    assert sorted(os.listdir(tmp_path)) == ["b"]
    model.delete_adapter("b")
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter to save"):
        model.save_pretrained(tmp_path / "none")
    with pytest.raises(ValueError, match="no adapter is active"):
        _ = model.active_adapter


def test_a_failed_save_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    model = get_peft_model(mlp(), lora())
    model.save_pretrained(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    with torch.no_grad():
        model.get_base_model()[0].adapters["default"].lora_A.weight.add_(1.0)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):  # the disk fills up after the weights were staged
        calls.append(dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls and {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_bias_all_does_not_train_the_adapters_own_or_modules_to_save_biases():
    from peftkit.methods.lora import trainable_biases

    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"], lora_bias=True,
                                             bias="all"))
    names = trainable_biases(model.get_base_model(), "all", ["0"])
    assert names == ["0.base_layer.bias", "2.original_module.bias"]


def test_saved_files_are_readable_like_any_file_the_user_writes(tmp_path):
    mask = os.umask(0o022)
    try:
        get_peft_model(mlp(), lora()).save_pretrained(tmp_path)
    finally:
        os.umask(mask)
    modes = {f: (tmp_path / f).stat().st_mode & 0o777 for f in os.listdir(tmp_path)}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


def test_deleting_the_active_merged_adapter_leaves_the_base():
    model = get_peft_model(mlp(), lora())
    model.merge_adapter()
    model.delete_adapter("default")
    assert list(model.peft_config) == [] and not any(isinstance(m, AdaptedLayer) for m in model.modules())
    x = torch.randn(3, 6)
    torch.testing.assert_close(model.get_base_model()(x), mlp()(x), atol=1e-6, rtol=1e-5)


def test_an_adapter_added_inside_disable_adapter_is_disabled_there_too():
    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 6)
    with torch.no_grad(), model.disable_adapter():
        model.add_adapter("b", LoraConfig(r=2, target_modules=["2"], init_lora_weights=False))
        model.set_adapter(["default", "b"])
        torch.testing.assert_close(model(x), mlp()(x))
    assert not torch.allclose(model(x), mlp()(x))


def test_switching_adapters_while_merged_unmerges_with_a_warning():
    model = two_adapters()
    x = torch.randn(3, 6)
    with torch.no_grad():
        model.set_adapter("b")
        only_b = model(x)
        model.set_adapter("default")
        model.merge_adapter()
        with pytest.warns(UserWarning, match=r"\['default'\] are merged; unmerging"):
            model.set_adapter("b")
        assert model.base_model.merged_adapters() == []
        torch.testing.assert_close(model(x), only_b)


def test_lora_bias_merges_into_a_bias_free_layer_and_unmerges_away():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"], lora_bias=True, init_lora_weights=False))
    with torch.no_grad():
        model.get_base_model()[2].adapters["default"].lora_B.bias.normal_()
        x = torch.randn(3, 6)
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    assert model.get_base_model()[2].base_layer.bias is None


@pytest.mark.parametrize("name", ["x\x00", "a" * 201, "tab\there"])
def test_names_that_no_file_system_takes_are_refused(name):
    model = get_peft_model(mlp(), lora())
    with pytest.raises(ConfigError, match="printable string of at most 200 bytes"):
        model.add_adapter(name, lora())


def test_merge_and_unload_of_one_adapter_gives_back_what_a_pissa_adapter_took():
    base = mlp()
    w0 = base[0].weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"), "p")
    model.add_adapter("q", LoraConfig(r=2, target_modules=["0"]))  # identity at init
    out = model.merge_and_unload(adapter_names=["q"])
    torch.testing.assert_close(out[0].weight, w0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unload_of_some_adapters_is_not_blocked_by_the_ones_it_drops(safe_merge):
    """(IA)^3 scales down_proj's input, so merging it while LoHa stays unmerged on that layer is refused; but
    merge_and_unload(adapter_names=["ia"]) drops LoHa, so the result is the base with (IA)^3 alone (it was
    refused, telling the user to merge the adapter being dropped)."""
    from tests.conftest import ids, tiny_llama

    model = get_peft_model(tiny_llama(), peftkit.IA3Config(), adapter_name="ia")
    model.add_adapter("ha", peftkit.LoHaConfig(r=2, target_modules=["down_proj"]))
    model.set_adapter(["ia", "ha"])
    perturb(model)
    x = ids()
    model.set_adapter("ia")
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.set_adapter(["ia", "ha"])
    with pytest.raises(ValueError, match="merging 'ia', which transforms the layer's input, while 'ha' stays"):
        model.merge_adapter(["ia"])  # without the unload, the partial merge is still refused
    plain = model.merge_and_unload(adapter_names=["ia"], safe_merge=safe_merge)
    with torch.no_grad():
        assert (plain(input_ids=x).logits - expected).abs().max() <= 1e-5


def test_pissa_adapters_are_not_combined():
    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["0"], init_lora_weights="olora"))
    with pytest.raises(ConfigError, match="init_lora_weights='pissa', which moved part of the base weights"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "avg", combination_type="cat")
    assert list(model.peft_config) == ["a", "b"]


def test_a_randomised_pissa_adapter_reloads_to_the_same_model(tmp_path):
    def big():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32))

    x = torch.randn(3, 32)
    model = get_peft_model(big(), LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa_niter_1"))
    with torch.no_grad():
        model.get_base_model()[0].adapters["default"].lora_B.weight.add_(0.3)
        y = model(x)
    model.save_pretrained(tmp_path)
    fresh = big()
    torch.randn(5)  # the global random state differs from the first time
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(fresh, tmp_path)(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [
    lambda: LoraConfig(r=2, target_modules=["0", "2"]),
    lambda: LoraConfig(r=2, target_modules=["0", "2"], use_dora=True),
    lambda: peftkit.VeraConfig(r=2, target_modules=["0", "2"]),
    lambda: peftkit.LoHaConfig(r=2, target_modules=["0", "2"]),
    lambda: peftkit.LoKrConfig(r=2, target_modules=["0", "2"]),
    lambda: peftkit.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]),
], ids=["lora", "dora", "vera", "loha", "lokr", "ia3"])
def test_a_float64_model_gets_float64_adapters_that_merge_to_float64_round_off(config):
    model = get_peft_model(mlp().double(), config())
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    perturb(model)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
    assert merged.dtype == torch.float64
    assert (merged - unmerged).abs().max() <= 1e-12 * unmerged.abs().max()  # float32 maths would leave ~1e-7


class _LinearWithChild(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return super().forward(x) + self.inner(x)


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.outer = _LinearWithChild()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.outer(x))


class _Alias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a  # one module, two names
        self.c = nn.Linear(4, 4)

    def forward(self, x):
        return self.c(self.b(x)) + self.a(x)


@pytest.mark.parametrize("make, targets, message", [
    # the inner adapter never ran (no gradient) but merging applied it: merged output off by 1.5
    (_Nested, ["outer", "inner"], "target_modules selects both 'outer' and 'outer.inner', which lies inside it"),
    (_Nested, "all-linear", "target_modules selects both 'outer' and 'outer.inner', which lies inside it"),
    # the path through 'b' skipped the adapter, but merging changed it too: merged output off by 1.7
    (_Alias, ["a"], r"module 'a' is also part of the model as \['b'\]; an adapter wraps one name"),
])
def test_targets_a_wrapper_could_not_adapt_exactly_are_refused(make, targets, message):
    with pytest.raises(ConfigError, match=message):
        get_peft_model(make(), LoraConfig(r=2, target_modules=targets))
    model = get_peft_model(make(), LoraConfig(r=2, target_modules=["head" if make is _Nested else "c"],
                                              init_lora_weights=False))
    x = torch.randn(3, 4)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        assert (model(x) - unmerged).abs().max() <= 1e-6


@pytest.mark.parametrize("kw", [dict(modules_to_save=["2"]), dict(task_type="SEQ_CLS")], ids=["listed", "task-head"])
def test_targets_that_modules_to_save_all_take_are_named_as_such(kw):
    """A target that modules_to_save trains whole is skipped; when that left nothing, the error said the targets
    'matched no module of the model' and listed the other modules, though they named one that exists."""
    base = mlp()
    if "task_type" in kw:  # the head a classification task trains whole
        base = nn.ModuleDict({"body": base[0], "classifier": base[2]})
    target = "classifier" if "task_type" in kw else "2"
    with pytest.raises(ConfigError, match=rf"target_modules=\['{target}'\] matched only \['{target}'\], which "
                                          "modules_to_save trains whole"):
        get_peft_model(base, LoraConfig(r=2, target_modules=[target], **kw))
    assert not any(isinstance(m, (AdaptedLayer, peftkit.layers.ModulesToSaveWrapper)) for m in base.modules())


def test_a_composed_adapters_merge_refusal_names_it_not_its_parts():
    """The refusal named the composition's internal parts ('default#1')."""
    from tests.conftest import tiny_llama

    composed = get_peft_model(tiny_llama(), [LoraConfig(r=2, target_modules=["q_proj"]),
                                             peftkit.IA3Config(target_modules=["down_proj"],
                                                               feedforward_modules=["down_proj"])])
    composed.add_adapter("l", peftkit.LoHaConfig(r=2, target_modules=["down_proj"]))
    composed.set_adapter(["default", "l"])
    with pytest.raises(ValueError, match=r"cannot merge \['default'\] on layer .*merging 'default' \(its IA3 part\), "
                                         r"which transforms the layer's input, while 'l' stays unmerged") as err:
        composed.merge_adapter(["default"])
    assert "#" not in str(err.value)


@pytest.mark.parametrize("order", [["i", "h"], ["h", "i"]])
def test_an_input_scale_merges_under_a_serial_adapter_in_either_order(order):
    """(IA)^3's input scale on down_proj with an unmergeable serial adapter there was refused ("merge 'h' too", which
    cannot be done); the serial adapter reads only the layer's output, so the partial merge is exact, in either
    order of the active adapters."""
    from tests.conftest import ids, tiny_llama

    model = get_peft_model(tiny_llama(), peftkit.IA3Config(init_ia3_weights=False), adapter_name="i")
    model.add_adapter("h", peftkit.PfeifferConfig(reduction_factor=4))
    model.set_adapter(order)
    perturb(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        model.merge_adapter(["i"])
        assert (model(input_ids=x).logits - expected).abs().max() <= 1e-5
