"""PiSSA / OLoRA initialisation, their conversion to plain LoRA on save, and interop with peft."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch

import peftkit
from peftkit import AdapterLoadError, ConfigError, LoraConfig, PeftModel, get_peft_model
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2
from tests.test_lora import TARGETS, Zoo, inputs
from tests.zoo import cycled_logits

INITS = ["pissa", "pissa_niter_4", "olora"]
MODELS = {"bert": (tiny_bert_classifier, ["query", "value", "intermediate.dense"]),
          "gpt2": (tiny_gpt2, ["c_attn", "c_proj"])}


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", list(MODELS))
def test_starts_as_the_base_model_with_a_residual_base_weight(init, arch):
    make, targets = MODELS[arch]
    base = make()
    x = ids()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    expected = logits(base, x)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    assert (logits(model, x) - expected).abs().max() <= 1e-5
    changed = [n for n, p in base.named_parameters() if n.replace(".base_layer", "") in original
               and (p - original[n.replace(".base_layer", "")]).abs().max() > 1e-3]
    assert changed and all(".base_layer.weight" in n for n in changed)
    perturb(model)
    trained = logits(model, x)
    assert (trained - logits(model.merge_and_unload(), x)).abs().max() <= 1e-5


def test_pissa_moves_the_top_singular_directions():
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    w = base[0].weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="pissa"))
    adapter = model.base_model.model[0].adapters["default"]
    u, s, vh = torch.linalg.svd(w)
    top = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert torch.allclose(adapter.delta_weight(None), top, atol=1e-5)
    assert torch.allclose(base[0].base_layer.weight, w - top, atol=1e-5)


def test_olora_factors_are_the_qr_factors():
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    w = base[0].weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=3, target_modules=["0"], init_lora_weights="olora"))
    adapter = model.base_model.model[0].adapters["default"]
    q, upper = torch.linalg.qr(w)
    assert torch.allclose(adapter.lora_B.weight, q[:, :3]) and torch.allclose(adapter.lora_A.weight, upper[:3])


def test_other_layer_types_keep_the_default_init():
    base = Zoo(groups=2)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    now = dict(model.base_model.model.named_parameters())
    for name in ("emb", "conv2", "conv1"):
        assert torch.equal(now[f"{name}.base_layer.weight"], before[f"{name}.weight"])
        assert model.base_model.model.get_submodule(name).adapters["default"].mutates_base is False
    assert not torch.equal(now["lin.base_layer.weight"], before["lin.weight"])


def _convert(src_lib, make, targets, init, tmp_path, **kw):
    """Adapt with ``src_lib``, save the initial adapter, train (perturb), save converted; returns the
    trained outputs, the original base model and the converted folder."""
    base = make()
    original = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = src_lib.get_peft_model(base, src_lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 init_lora_weights=init, **kw))
        model.save_pretrained(tmp_path / "init")
        perturb(model)
        model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    return model, original, tmp_path / "final"


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", list(MODELS))
def test_converted_adapter_loads_on_the_original_model_in_peft_and_peftkit(init, arch, tmp_path):
    make, targets = MODELS[arch]
    kw = dict(use_rslora=True) if init == "olora" else dict(rank_pattern={"value": 2}, alpha_pattern={"value": 3})
    if arch == "gpt2":
        kw = {}
    trained, original, folder = _convert(peftkit, make, targets, init, tmp_path, **kw)
    x = ids()
    expected = logits(trained, x)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    ours = PeftModel.from_pretrained(copy.deepcopy(original), folder)
    assert (logits(ours, x) - expected).abs().max() <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(original, folder)
    assert (logits(theirs, x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_adapter_loads_in_peftkit(init, tmp_path):
    trained, original, folder = _convert(peft, tiny_bert_classifier, ["query", "value"], init, tmp_path)
    x = ids()
    ours = PeftModel.from_pretrained(original, folder)
    assert (logits(ours, x) - logits(trained, x)).abs().max() <= 1e-5


def test_conversion_keeps_grouped_convolutions_and_embeddings_exact(tmp_path):
    base = Zoo(groups=2)
    original = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "init")
    perturb(model)
    with torch.no_grad():
        expected = model(*inputs())
    model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=tmp_path / "init")
    plain = PeftModel.from_pretrained(original, tmp_path / "final")
    with torch.no_grad():
        assert (plain(*inputs()) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_unconverted_files_reinitialise_the_same_residual(init, direction, tmp_path):
    src, dst = (peftkit, peft) if direction == "peftkit_to_peft" else (peft, peftkit)
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = src.get_peft_model(base, src.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                        init_lora_weights=init))
        perturb(model)
        model.save_pretrained(tmp_path)
        loaded = dst.PeftModel.from_pretrained(twin, tmp_path)
    assert (logits(loaded, x) - logits(model, x)).abs().max() <= 1e-5


def test_conversion_errors(tmp_path):
    base = tiny_bert_classifier()
    dora = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], use_dora=True, init_lora_weights="pissa"))
    dora.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="does not apply to DoRA"):
        dora.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()
    rs = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], use_rslora=True,
                                                          rank_pattern={"query": 4}, init_lora_weights="olora"))
    with pytest.raises(ValueError, match="use_rslora"):
        rs.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    other = get_peft_model(tiny_bert_classifier(), LoraConfig(r=3, target_modules=["query"], init_lora_weights="pissa"))
    with pytest.raises(AdapterLoadError, match="does not hold the initial"):
        other.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    vera = get_peft_model(tiny_bert_classifier(), peftkit.VeraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="VeRA adapters cannot be saved"):
        vera.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")


def test_dora_with_pissa_starts_as_the_base_model():
    base = tiny_bert_classifier()
    x = ids()
    expected = logits(base, x)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], use_dora=True,
                                            init_lora_weights="pissa_niter_2"))
    assert (logits(model, x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kw, message", [
    (dict(init_lora_weights="pissa_niter_x"), "init_lora_weights='pissa_niter_x' is not valid"),
    (dict(init_lora_weights="svd"), "init_lora_weights='svd' is not valid"),
    (dict(init_lora_weights="olora", lora_bias=True), "lora_bias=True is not supported"),
])
def test_bad_values_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(target_modules=["query"], **kw)


def test_rank_above_the_matrix_rank_is_a_config_error_and_changes_nothing():
    base = torch.nn.Sequential(torch.nn.Linear(12, 4), torch.nn.Linear(4, 12))
    before = [p.detach().clone() for p in base.parameters()]
    with pytest.raises(ConfigError, match="needs r <= min"):
        get_peft_model(base, LoraConfig(r=6, target_modules=["0", "1"], init_lora_weights="pissa"))
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters(), strict=True))
    assert isinstance(base[0], torch.nn.Linear)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_deleting_or_unloading_unmerged_gives_the_original_base_weights_back(init, arch):
    make, targets = MODELS[arch]
    base = make()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=init))
    model.add_adapter("other", LoraConfig(r=2, target_modules=targets, init_lora_weights=init))
    perturb(model)  # training moves A and B; the residual left in the base must still be undone exactly
    model.merge_adapter(["default"])
    model.delete_adapter("other")  # deleted while another adapter is merged on the same layers
    model.unmerge_adapter()
    back = model.unload()
    for n, p in back.named_parameters():
        assert (p - original[n]).abs().max() <= 1e-5, n


@pytest.mark.parametrize("make", [
    lambda: LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights="pissa"),
    lambda: LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights="olora"),
    lambda: peftkit.LoraFAConfig(r=4, target_modules=["query", "value"]),
    lambda: peftkit.DyLoraConfig(r=4, target_modules=["query", "value"]),
    lambda: LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights="loftq",
                       loftq_config={"loftq_bits": 4, "quantizer": "normal", "block_size": 16}),
], ids=["pissa", "olora", "lorafa", "dylora", "loftq"])
def test_fifty_merge_cycles_restore_the_base(make):
    """The README promises 50 merge/unmerge cycles restore the base for every mergeable method; these starts,
    which change the base or train only part of the factors, had no such test."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_classifier(), make()).eval()
    perturb(model)
    base = model.get_base_model()
    snapshot = {k: v.clone() for k, v in base.state_dict().items() if "base_layer" in k}
    x = ids()
    unmerged, merged = cycled_logits(model, x)
    with torch.no_grad():
        assert (model(input_ids=x).logits - unmerged).abs().max() <= 1e-6
    assert (merged - unmerged).abs().max() <= 1e-5
    now = base.state_dict()
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_principal_adapter_next_to_another_warns_that_it_changes_its_outputs(init):
    """Moving the top-r part into the new adapter's factors changes the base the other adapter runs on (peft does
    it silently); deleting the new adapter gives the other its outputs back."""
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.warns(UserWarning, match=r"other adapter\(s\) \['default'\] also run on: their outputs change"):
        model.add_adapter("p", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    with torch.no_grad():
        assert (model(input_ids=x).logits - before).abs().max() > 1e-3
        model.delete_adapter("p")
        assert (model(input_ids=x).logits - before).abs().max() <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))


def test_the_principal_adapter_warning_names_composed_adapters_not_their_parts():
    import peftkit
    from tests.conftest import tiny_llama

    model = get_peft_model(tiny_llama(), [LoraConfig(r=2, target_modules=["q_proj"]),
                                          peftkit.IA3Config(target_modules=["down_proj"], feedforward_modules=[])])
    with pytest.warns(UserWarning, match=r"other adapter\(s\) \['default'\] also run on") as caught:
        model.add_adapter("p", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="pissa"))
    assert not any("#" in str(w.message) for w in caught)


def test_a_rank_above_a_layers_size_names_the_layer_and_changes_nothing():
    from tests.conftest import tiny_llama

    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=r"v_proj: init_lora_weights='pissa' needs r <= min\(out, in\) = 8 .*got r=12"):
        get_peft_model(base, LoraConfig(r=12, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
