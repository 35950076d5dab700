"""VB-LoRA: the top-k admixture written out, the shared bank (one parameter, counted and saved once), exact merging,
counts, training, biases, both file layouts (logits and save_only_topk_weights) both ways with peft, and bad
values."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import AdapterLoadError, ConfigError, PeftModel, VBLoRAConfig, get_peft_model
from peftkit.methods.vblora import VBLoRALinear, indices_dtype, logits_from_topk, topk_mix
from tests.conftest import perturb, tiny_bert_classifier, tiny_gpt2
from tests.interop_util import output, peft_file_in_peftkit, peftkit_file_in_peft
from tests.zoo import Zoo, adapted_zoo, assert_fifty_cycles, assert_merge_exact, train_tiny_bert, zoo_inputs

TARGETS = ["lin", "square", "wide"]  # Linear (12 x 8), square and wide GPT-2 Conv1D (12 x 12, 20 x 12)
SMALL = dict(r=2, num_vectors=10, vector_length=4, topk=2)


def _adapter(model, name) -> VBLoRALinear:
    return model.base_model.model.get_submodule(name).adapters["default"]


def test_topk_mix_is_the_softmax_weighted_sum_of_the_largest_logits_rows():
    bank = torch.arange(12.0).reshape(4, 3)
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0], [5.0, -3.0, 0.5, 0.4]])
    out = topk_mix(logits, bank, 2)
    e = torch.exp(torch.tensor([2.0, 1.0]))
    first = (e[0] * bank[1] + e[1] * bank[3]) / e.sum()
    e2 = torch.exp(torch.tensor([5.0, 0.5]))
    second = (e2[0] * bank[0] + e2[1] * bank[2]) / e2.sum()
    assert torch.allclose(out, torch.stack([first, second]), atol=1e-6)


def test_delta_is_b_a_built_from_the_bank_pieces():
    """``A[:, j b:(j+1) b]`` is the admixture of ``logits_A[:, j]``; ``B[i b:(i+1) b, :]`` that of ``logits_B[i]``."""
    model = get_peft_model(nn.Sequential(nn.Linear(8, 12)), VBLoRAConfig(target_modules=["0"], **SMALL))
    perturb(model)
    adapter = _adapter(model, "0")
    bank, la, lb = adapter.bank.detach(), adapter.vblora_logits_A.detach(), adapter.vblora_logits_B.detach()
    a = torch.cat([topk_mix(la[:, j], bank, 2) for j in range(2)], dim=1)        # (2, 8)
    b = torch.cat([topk_mix(lb[i], bank, 2).T for i in range(3)], dim=0)         # (12, 2)
    assert (adapter.delta_weight(model.base_model.model[0]) - b @ a).abs().max() <= 1e-6
    assert (b @ a).abs().max() > 1e-2


def test_the_bank_is_one_parameter_shared_by_all_layers_and_counted_once():
    model = get_peft_model(Zoo(), VBLoRAConfig(target_modules=TARGETS, **SMALL))
    banks = {id(_adapter(model, t).bank) for t in TARGETS}
    assert len(banks) == 1
    assert model.base_model.extra_modules["default"].vblora_vector_bank.shape == (10, 4)
    # n b + sum n r (in + out) / b over (12 x 8), (12 x 12), (20 x 12)
    expected = 10 * 4 + sum(10 * 2 * (i + o) // 4 for o, i in [(12, 8), (12, 12), (20, 12)])
    assert model.get_nb_trainable_parameters()[0] == expected == 40 + 100 + 120 + 160
    assert _adapter(model, "wide").vblora_logits_B.shape == (5, 2, 10)
    assert _adapter(model, "lin").vblora_logits_A.shape == (2, 2, 10)


def test_initial_values_follow_the_bounds():
    model = get_peft_model(tiny_bert_classifier(), VBLoRAConfig(r=4, num_vectors=64, vector_length=8,
                                                                init_vector_bank_bound=0.05, init_logits_std=0.5))
    bank = model.base_model.extra_modules["default"].vblora_vector_bank
    assert bank.abs().max() <= 0.05 and bank.abs().max() > 0.04
    logits = _adapter(model, "bert.encoder.layer.0.attention.self.query").vblora_logits_A
    assert 0.4 < logits.std() < 0.6
    adapted = {n.rsplit(".adapters", 1)[0] for n, _ in model.named_parameters() if "vblora_logits_A" in n}
    assert len(adapted) == 4 and all(n.endswith(("query", "value")) for n in adapted)  # peft's BERT default


@pytest.mark.parametrize("kw", [dict(r=2, num_vectors=10, vector_length=4, topk=2),
                                dict(r=3, num_vectors=7, vector_length=2, topk=7),
                                dict(r=1, num_vectors=5, vector_length=4, topk=1)])
def test_merge_and_unload_equals_unmerged(kw):
    _, model = adapted_zoo(VBLoRAConfig(target_modules=TARGETS, **kw))
    assert_merge_exact(model, zoo_inputs())


def test_fifty_merge_cycles_restore_base_weights():
    base, model = adapted_zoo(VBLoRAConfig(target_modules=TARGETS, **SMALL))
    assert_fifty_cycles(base, model, zoo_inputs())


def test_vector_length_that_does_not_divide_is_named_and_model_left_unchanged():
    base = Zoo()
    with pytest.raises(ConfigError, match=r"lin: vector_length=3 does not divide the layer's sizes \(in 8, out 12\)"):
        get_peft_model(base, VBLoRAConfig(target_modules=TARGETS, r=2, num_vectors=4, vector_length=3))
    assert isinstance(base.lin, nn.Linear) and isinstance(base.wide, Conv1D)


def test_a_convolution_target_is_refused():
    with pytest.raises(ConfigError, match="conv2"):
        get_peft_model(Zoo(), VBLoRAConfig(target_modules=["conv2"], **SMALL))


def test_training_reduces_loss_and_only_logits_and_bank_get_gradients():
    losses, model = train_tiny_bert(VBLoRAConfig(r=4, num_vectors=32, vector_length=8,
                                                 target_modules=["query", "value", "dense"], task_type="SEQ_CLS"),
                                    "vblora_", steps=60)
    assert losses[-1] < 0.5 * losses[0]
    assert model.base_model.extra_modules["default"].vblora_vector_bank.grad is None  # cleared, but it trained:
    assert model.base_model.extra_modules["default"].vblora_vector_bank.requires_grad


def test_bias_vblora_only_trains_the_adapted_layers_biases():
    model = get_peft_model(tiny_bert_classifier(), VBLoRAConfig(target_modules=["query"], bias="vblora_only",
                                                                **SMALL))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "vblora_" not in n}
    assert trained == {f"base_model.model.bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in (0, 1)}


def test_indices_dtype_is_peft_s():
    assert [indices_dtype(n) for n in (255, 256, 2**15 - 1, 2**15, 2**31)] == [
        torch.uint8, torch.int16, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("topk_only", [False, True])
def test_save_and_load_round_trip(topk_only, tmp_path):
    base = Zoo()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, VBLoRAConfig(target_modules=TARGETS, save_only_topk_weights=topk_only,
                                              r=2, num_vectors=300, vector_length=4, topk=3))
    perturb(model)
    x = zoo_inputs()
    model.eval()
    with torch.no_grad():
        expected = model(*x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VBLORA" and saved["save_only_topk_weights"] is topk_only
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.vblora_vector_bank"].shape == (300, 4)
    if topk_only:
        assert set(tensors) == {"base_model.vblora_vector_bank"} | {
            f"base_model.model.{t}.vblora_logits_{m}_topk_{part}" for t in TARGETS for m in "AB"
            for part in ("indices", "weights")}
        assert tensors["base_model.model.wide.vblora_logits_B_topk_indices"].shape == (5, 2, 3)
        assert tensors["base_model.model.wide.vblora_logits_B_topk_indices"].dtype == torch.int16
        assert tensors["base_model.model.wide.vblora_logits_B_topk_weights"].shape == (5, 2, 2)
    else:
        assert set(tensors) == {"base_model.vblora_vector_bank"} | {
            f"base_model.model.{t}.vblora_logits_{m}" for t in TARGETS for m in "AB"}
    fresh = Zoo()
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert (loaded(*x) - expected).abs().max() <= 1e-5
        assert (loaded.merge_and_unload()(*x) - expected).abs().max() <= 1e-5


def test_a_top_k_file_cannot_be_trained_on(tmp_path):
    model = get_peft_model(Zoo(), VBLoRAConfig(target_modules=TARGETS, save_only_topk_weights=True, **SMALL))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Zoo(), tmp_path, is_trainable=True)
    assert torch.isinf(_adapter(loaded, "lin").vblora_logits_A).any()
    loaded.train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        loaded(*zoo_inputs())


def test_a_top_k_file_with_bad_indices_is_refused_and_model_unchanged(tmp_path):
    model = get_peft_model(Zoo(), VBLoRAConfig(target_modules=TARGETS, save_only_topk_weights=True, **SMALL))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lin.vblora_logits_A_topk_indices"][0, 0, 0] = 10  # the bank has 10 vectors
    save_file(tensors, path)
    with pytest.raises(AdapterLoadError, match=r"vblora_logits_A: top-k indices lie in \[\d+, 10\], outside"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert list(model.peft_config) == ["default"]


def test_logits_from_topk_gives_the_saved_admixture_back():
    logits = torch.randn(3, 2, 9)
    top, index = logits.topk(3)
    weights = torch.softmax(top, -1)[..., :-1]
    back = logits_from_topk(index.to(torch.uint8), weights, 9)
    bank = torch.randn(9, 4)
    assert (topk_mix(back, bank, 3) - topk_mix(logits, bank, 3)).abs().max() <= 1e-6
    assert torch.isinf(back).sum() == 3 * 2 * 6
    # a float64 adapter's weights are read back in float64 (float32 lost ~4e-8 on a reload)
    assert logits_from_topk(index, weights.double(), 9).dtype == torch.float64
    with pytest.raises(ValueError, match="do not pair up"):
        logits_from_topk(index, weights[..., :1], 9)


INTEROP = {
    "bert": (tiny_bert_classifier, dict(r=2, num_vectors=12, vector_length=8, target_modules=["query", "value"],
                                        modules_to_save=["classifier"])),
    "bert_topk_bias": (tiny_bert_classifier, dict(r=3, num_vectors=20, vector_length=4, topk=3,
                                                  target_modules=["query", "dense"], task_type="SEQ_CLS",
                                                  save_only_topk_weights=True, bias="vblora_only")),
    "gpt2": (tiny_gpt2, dict(r=2, num_vectors=16, vector_length=8, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True)),
    "gpt2_topk": (tiny_gpt2, dict(r=2, num_vectors=16, vector_length=16, topk=1, target_modules=["c_attn"],
                                  save_only_topk_weights=True)),
}



@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_file_loads_in_peft(case, tmp_path):
    make, kw = INTEROP[case]
    _, expected, theirs = peftkit_file_in_peft(make, VBLoRAConfig(**kw), tmp_path)
    assert (expected - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_file_loads_in_peftkit(case, tmp_path):
    make, kw = INTEROP[case]
    expected, ours, x = peft_file_in_peftkit(make, peft.VBLoRAConfig(**kw), tmp_path)
    assert (expected - output(ours, x)).abs().max() <= 1e-5
    assert (expected - output(ours.merge_and_unload(), x)).abs().max() <= 1e-5


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "r=0"),
    (dict(num_vectors=True), "num_vectors=True"),
    (dict(vector_length=-4), "vector_length=-4"),
    (dict(topk=2.0), "topk=2.0"),
    (dict(topk=300), "topk=300 exceeds num_vectors=256"),
    (dict(vblora_dropout=1.0), "vblora_dropout=1.0"),
    (dict(init_vector_bank_bound=0.0), "init_vector_bank_bound=0.0"),
    (dict(init_vector_bank_bound=float("inf")), "init_vector_bank_bound=inf"),
    (dict(init_logits_std=-0.1), "init_logits_std=-0.1"),
    (dict(save_only_topk_weights="yes"), "save_only_topk_weights='yes'"),
    (dict(fan_in_fan_out=1), "fan_in_fan_out=1"),
    (dict(bias="lora_only"), "bias='lora_only' is not valid"),
    (dict(target_modules=[]), "target_modules"),
])
def test_bad_values_raise_config_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        VBLoRAConfig(**{"target_modules": ["lin"], **kw})


def test_cli_config_fits_minilm_sizes():
    from types import SimpleNamespace

    from peftkit.config import get_method

    spec = get_method("vblora")
    args = SimpleNamespace(r=None, lora_dropout=0.0, target_modules=None, task_type="SEQ_CLS", method_options={})
    config = spec.cli_config(args)
    assert (config.r, config.topk, config.num_vectors, config.vector_length) == (4, 2, 90, 128)
    assert 384 % config.vector_length == 0 and 1536 % config.vector_length == 0
    assert spec.mergeable and spec.family == "reparameterised" and spec.default_lr == 1e-2


def test_default_targets_are_peft_s():
    from peft.utils import constants as c

    from peftkit.methods.vblora import VBLORA_TARGET_DEFAULTS

    theirs = c.TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING
    assert {k: list(v) for k, v in VBLORA_TARGET_DEFAULTS.items()} == {
        k: list(v) for k, v in theirs.items() if k != "gemma4"}


def test_inject_adapter_in_model_refuses_it_as_peft_does():
    """The bank lives beside the layers (peft's ``uses_shared_state``), so a model without a PeftModel around it
    would not train, move or save it."""
    from peftkit import inject_adapter_in_model

    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match="does not support VBLORA, whose vector bank is shared"):
        inject_adapter_in_model(VBLoRAConfig(**SMALL), model)
    assert not any("vblora" in n for n, _ in model.named_parameters())


def test_a_float64_model_gets_a_float64_bank_and_merges_to_float64_round_off():
    model = get_peft_model(Zoo().double(), VBLoRAConfig(target_modules=TARGETS, **SMALL))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    perturb(model)
    x = tuple(t.double() for t in zoo_inputs())
    with torch.no_grad():
        unmerged = model(*x)
        model.merge_adapter()
        merged = model(*x)
    assert (merged - unmerged).abs().max() <= 1e-12 * unmerged.abs().max()  # float32 maths would leave ~1e-7
