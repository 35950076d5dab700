"""FourierFT: peft's spectral locations, the inverse transform against its cosine sum, exact merging, counts,
training, biases, files (both ways with peft) and bad values."""

from __future__ import annotations

import copy
import json
import math
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ConfigError, FourierFTConfig, PeftModel, get_peft_model
from peftkit.methods.fourierft import spectral_locations
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2
from tests.interop_util import output, peft_file_in_peftkit, peftkit_file_in_peft
from tests.zoo import Zoo, adapted_zoo, assert_fifty_cycles, assert_merge_exact, train_tiny_bert, zoo_inputs

TARGETS = ["lin", "square", "wide"]  # Linear (12 x 8), square and wide GPT-2 Conv1D (12 x 12, 20 x 12)


def _adapter(model, name):
    return model.base_model.model.get_submodule(name).adapters["default"]


@pytest.mark.parametrize("module, seed", [(nn.Linear(8, 12), 777), (nn.Linear(5, 3), 0), (Conv1D(20, 12), 42)])
def test_locations_are_peft_s_for_the_same_seed(module, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(module)),
                                     peft.FourierFTConfig(n_frequency=9, random_loc_seed=seed, target_modules=["0"]))
    ours = get_peft_model(nn.Sequential(module), FourierFTConfig(n_frequency=9, random_loc_seed=seed,
                                                                 target_modules=["0"]))
    assert torch.equal(ours.base_model.model[0].adapters["default"].indices, theirs.base_model.model[0].indices["default"])


def test_locations_are_distinct_and_inside_the_weight():
    loc = spectral_locations(7, 5, 35, seed=3)
    assert loc.shape == (2, 35) and loc[0].max() == 6 and loc[1].max() == 4
    assert len({(int(r), int(c)) for r, c in loc.T}) == 35


def test_delta_is_the_scaled_cosine_sum_of_the_learnt_entries():
    """``Re(IDFT2(F))[p, q] = 1/(out in) sum_k c_k cos(2 pi (p r_k / out + q s_k / in))``, written out."""
    model = get_peft_model(nn.Sequential(nn.Linear(6, 4)), FourierFTConfig(n_frequency=5, scaling=3.0,
                                                                           target_modules=["0"]))
    adapter = model.base_model.model[0].adapters["default"]
    c = adapter.fourierft_spectrum.detach().double()
    rows, cols = adapter.indices
    p = torch.arange(4, dtype=torch.float64).view(4, 1, 1)
    q = torch.arange(6, dtype=torch.float64).view(1, 6, 1)
    phase = 2 * math.pi * (p * rows.double() / 4 + q * cols.double() / 6)
    expected = 3.0 * (c * torch.cos(phase)).sum(-1) / 24
    assert (adapter.delta_weight(model.base_model.model[0]).double() - expected).abs().max() <= 1e-6
    assert expected.abs().max() > 1e-2


def test_default_spectrum_is_random_and_zero_init_is_the_identity():
    base = tiny_bert_classifier()
    x = ids()
    with torch.no_grad():
        expected = base(input_ids=x).logits
    zero = get_peft_model(copy.deepcopy(base), FourierFTConfig(n_frequency=20, init_weights=True))
    assert torch.equal(_adapter(zero, "bert.encoder.layer.0.attention.self.query").fourierft_spectrum, torch.zeros(20))
    random = get_peft_model(copy.deepcopy(base), FourierFTConfig(n_frequency=20))
    spectrum = _adapter(random, "bert.encoder.layer.0.attention.self.value").fourierft_spectrum
    assert spectrum.abs().min() > 0 and 0.3 < spectrum.std() < 3
    with torch.no_grad():
        assert (zero(input_ids=x).logits - expected).abs().max() == 0


# (scales for layers of ~100 entries: 150 on a 12 x 8 layer gives weight changes ~8 and outputs ~80, whose float32
# rounding alone is ~1e-5)
@pytest.mark.parametrize("kw", [dict(n_frequency=30, scaling=10.0), dict(n_frequency=7, scaling=-4.0, random_loc_seed=1)])
def test_merge_and_unload_equals_unmerged(kw):
    _, model = adapted_zoo(FourierFTConfig(target_modules=TARGETS, **kw))
    assert_merge_exact(model, zoo_inputs())


def test_fifty_merge_cycles_restore_base_weights():
    base, model = adapted_zoo(FourierFTConfig(n_frequency=40, scaling=20.0, target_modules=TARGETS))
    assert_fifty_cycles(base, model, zoo_inputs())


def test_trainable_count_is_n_per_layer_with_pattern_overrides():
    model = get_peft_model(Zoo(), FourierFTConfig(n_frequency=30, target_modules=TARGETS,
                                                  n_frequency_pattern={"wide": 200, "squ.*": 5}))
    assert model.get_nb_trainable_parameters()[0] == 30 + 5 + 200
    assert _adapter(model, "wide").indices.shape == (2, 200)


def test_n_frequency_above_the_entries_is_named_and_model_left_unchanged():
    base = Zoo()
    with pytest.raises(ConfigError, match=r"lin: n_frequency=97 exceeds the layer's 12 x 8 = 96 spectral entries"):
        get_peft_model(base, FourierFTConfig(n_frequency=96, target_modules=TARGETS, n_frequency_pattern={"lin": 97}))
    assert isinstance(base.lin, nn.Linear) and isinstance(base.wide, Conv1D)


def test_training_reduces_loss_and_only_the_spectrum_gets_gradients():
    losses, _ = train_tiny_bert(FourierFTConfig(n_frequency=64, scaling=150.0, init_weights=True,
                                                target_modules=["query", "value", "dense"], task_type="SEQ_CLS"),
                                "fourierft_spectrum", steps=60)
    assert losses[-1] < 0.5 * losses[0]


def test_bias_fourier_only_trains_the_adapted_layers_biases():
    model = get_peft_model(tiny_bert_classifier(), FourierFTConfig(n_frequency=8, target_modules=["query"],
                                                                   bias="fourier_only"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("fourierft_spectrum")}
    assert trained == {f"base_model.model.bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in (0, 1)}


def test_save_and_load_round_trip_writes_the_spectrum_only(tmp_path):
    base = Zoo()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, FourierFTConfig(n_frequency=10, scaling=50.0, random_loc_seed=5,
                                                 target_modules=TARGETS, n_frequency_pattern={"wide": 12}))
    perturb(model)
    x = zoo_inputs()
    with torch.no_grad():
        expected = model(*x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FOURIERFT" and saved["random_loc_seed"] == 5 and saved["n_frequency_pattern"] == {
        "wide": 12}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{t}.fourierft_spectrum" for t in TARGETS}
    assert tensors["base_model.model.wide.fourierft_spectrum"].shape == (12,)
    fresh = Zoo()
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert (loaded(*x) - expected).abs().max() <= 1e-6


INTEROP = {
    "bert": (tiny_bert_classifier, dict(n_frequency=50, target_modules=["query", "value"],
                                        modules_to_save=["classifier"])),
    "bert_pattern_bias": (tiny_bert_classifier, dict(n_frequency=20, scaling=80.0, random_loc_seed=11,
                                                     target_modules=["query", "dense"], task_type="SEQ_CLS",
                                                     n_frequency_pattern={"intermediate.dense": 70},
                                                     bias="fourier_only")),
    "gpt2": (tiny_gpt2, dict(n_frequency=40, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}



@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_file_loads_in_peft(case, tmp_path):
    make, kw = INTEROP[case]
    _, expected, theirs = peftkit_file_in_peft(make, FourierFTConfig(**kw), tmp_path)
    assert (expected - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_file_loads_in_peftkit(case, tmp_path):
    make, kw = INTEROP[case]
    expected, ours, x = peft_file_in_peftkit(make, peft.FourierFTConfig(**kw), tmp_path)
    assert (expected - output(ours, x)).abs().max() <= 1e-5
    assert (expected - output(ours.merge_and_unload(), x)).abs().max() <= 1e-5


@pytest.mark.parametrize("kw, message", [
    (dict(n_frequency=0), "n_frequency=0"),
    (dict(n_frequency=True), "n_frequency=True"),
    (dict(scaling=float("nan")), "scaling=nan"),
    (dict(scaling="150"), "scaling='150'"),
    (dict(random_loc_seed=None), "random_loc_seed=None"),
    (dict(random_loc_seed=2**64), "random_loc_seed="),
    (dict(fan_in_fan_out="no"), "fan_in_fan_out='no'"),
    (dict(init_weights=0), "init_weights=0"),
    (dict(bias="lora_only"), "bias='lora_only' is not valid"),
    (dict(n_frequency_pattern={"lin": 0}), r"n_frequency_pattern\['lin'\]=0"),
    (dict(n_frequency_pattern={"(": 4}), "n_frequency_pattern key '\\('"),
    (dict(target_modules=[]), "target_modules"),
])
def test_bad_values_raise_config_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        FourierFTConfig(**{"target_modules": ["lin"], **kw})


def test_a_convolution_target_is_refused():
    with pytest.raises(ConfigError, match="conv2"):
        get_peft_model(Zoo(), FourierFTConfig(n_frequency=4, target_modules=["conv2"]))
