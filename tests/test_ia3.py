"""(IA)^3: exact merging, peft's default modules and file format (both directions), counts, errors."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import peftkit
from peftkit import ConfigError, IA3Config, get_peft_model
from peftkit.layers import AdaptedLayer
from peftkit.methods.ia3 import IA3Input, IA3Output
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.decode_checks import check_decoding, no_eos

MODELS = {"bert": tiny_bert_classifier, "gpt2": tiny_gpt2, "llama": tiny_llama}


def outputs(model, x):
    """Logits and last hidden states together: a tiny BERT classifier's logits are ~1e-2, too small
    alone for an absolute tolerance to mean much."""
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


@pytest.mark.parametrize("arch", list(MODELS))
def test_merged_equals_unmerged_and_fifty_cycles_restore_the_base(arch):
    base = MODELS[arch]()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, IA3Config())
    perturb(model, std=0.5)
    x = ids()
    adapted = outputs(model, x)
    with model.disable_adapter():
        plain = outputs(model, x)
    assert (adapted - plain).abs().max() > 1e-3
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    model.merge_adapter()
    assert (outputs(model, x) - adapted).abs().max() <= 1e-5
    with model.disable_adapter():
        assert (outputs(model, x) - plain).abs().max() <= 1e-5
    model.unmerge_adapter()
    now = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "ia3_l" not in k}
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert (outputs(merged, x) - adapted).abs().max() <= 1e-5


def test_default_modules_and_vector_shapes_follow_peft():
    model = get_peft_model(tiny_bert_classifier(), IA3Config())
    cfg = model.peft_config["default"]
    assert cfg.target_modules == ["key", "value", "output.dense"] and cfg.feedforward_modules == ["output.dense"]
    layer = model.get_base_model().bert.encoder.layer[0]
    assert isinstance(layer.attention.self.key.adapters["default"], IA3Output)
    assert layer.attention.self.key.adapters["default"].ia3_l.shape == (16, 1)
    assert isinstance(layer.output.dense.adapters["default"], IA3Input)
    assert layer.output.dense.adapters["default"].ia3_l.shape == (1, 32)
    # peft treats attention.output.dense as feed-forward too (its name ends with output.dense)
    assert isinstance(layer.attention.output.dense.adapters["default"], IA3Input)
    gpt = get_peft_model(tiny_gpt2(), IA3Config()).get_base_model().transformer.h[0]
    assert gpt.attn.c_attn.adapters["default"].ia3_l.shape == (48, 1)
    assert gpt.mlp.c_proj.adapters["default"].ia3_l.shape == (1, 64)


def test_trainable_count_is_out_per_attention_target_plus_in_per_feedforward_target():
    counts = {
        "bert": 2 * (16 + 16 + 32 + 16),  # key, value (out=16); output.dense (in=32); attention.output.dense (in=16)
        "gpt2": 2 * (48 + 64),  # c_attn out=3*16; mlp.c_proj in=64
        "llama": 2 * (8 + 8 + 24),  # k_proj, v_proj out=8 (one kv head of 8); down_proj in=24
    }
    for arch, expected in counts.items():
        assert get_peft_model(MODELS[arch](), IA3Config()).get_nb_trainable_parameters()[0] == expected, arch


CASES = {
    "bert": (tiny_bert_classifier, dict(target_modules=["key", "value", "output.dense"],
                                        feedforward_modules=["output.dense"], modules_to_save=["classifier"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                             fan_in_fan_out=True)),
    "llama": (tiny_llama, dict(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
                               feedforward_modules=["down_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_adapter_loads_in_peft(case, tmp_path):
    make, kw = CASES[case]
    base = make()
    twin = copy.deepcopy(base)
    ours = get_peft_model(base, IA3Config(**kw))
    perturb(ours, std=0.5)
    x = ids()
    expected = outputs(ours, x)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - outputs(theirs, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_peftkit(case, tmp_path):
    make, kw = CASES[case]
    base = make()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.IA3Config(**kw))
        perturb(theirs, std=0.5)
        theirs.save_pretrained(tmp_path)
    x = ids()
    expected = outputs(theirs, x)
    ours = peftkit.PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - outputs(ours, x)).abs().max() <= 1e-5
    assert (expected - outputs(ours.merge_and_unload(), x)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoding_with_cache_and_left_padding(arch):
    torch.manual_seed(0)
    model = get_peft_model(no_eos(MODELS[arch]()), IA3Config())
    perturb(model, std=0.5)
    check_decoding(model)


def test_training_lowers_the_loss_and_only_vectors_get_gradients():
    model = get_peft_model(tiny_bert_classifier(), IA3Config(task_type="SEQ_CLS"))
    x = torch.randint(3, 64, (8, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        assert all(".ia3_l" in n or ".modules_to_save.default." in n
                   for n, p in model.named_parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_values_raise_config_error():
    with pytest.raises(ConfigError, match=r"\['up_proj'\] are not in target_modules"):
        IA3Config(target_modules=["down_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(ConfigError, match="init_ia3_weights='yes'"):
        IA3Config(init_ia3_weights="yes")
    with pytest.raises(ConfigError, match="no default target_modules for model_type=None"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), IA3Config())


def test_a_zero_scale_cannot_be_merged_and_the_layer_is_left_as_it_was():
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)), IA3Config(target_modules=["0"]))
    layer = model.get_base_model()[0]
    weight = layer.weight.clone()
    with torch.no_grad():
        layer.adapters["default"].ia3_l[1] = 0.0
    with pytest.raises(ValueError, match="zero entry"):
        model.merge_adapter()
    assert torch.equal(layer.weight, weight) and layer.merged_adapters == []


def test_a_zero_scale_on_the_last_layer_refuses_the_merge_before_any_layer_merges():
    base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    model = get_peft_model(base, IA3Config(target_modules=["0", "1", "2"], feedforward_modules=["1"]))
    weights = [m.weight.clone() for m in base]
    with torch.no_grad():
        base[2].adapters["default"].ia3_l[2] = 0.0
        base[2].adapters["default"].ia3_l[0] = 0.0
    with pytest.raises(ValueError, match=r"adapter 'default' on layer '2': its ia3_l has 2 zero entries; "
                                         r"merging it could not be undone; nothing was merged"):
        model.merge_adapter()
    assert all(torch.equal(m.weight, w) for m, w in zip(base, weights, strict=True))
    assert model.base_model.merged_adapters() == []
    # merge_and_unload (and export) never unmerge: it merges, exactly, as peft does
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = model(x)
        plain = model.merge_and_unload()
        assert (plain(x) - want).abs().max() <= 1e-6 and not any(isinstance(m, AdaptedLayer) for m in plain.modules())


def test_own_targets_without_feedforward_modules_keep_only_the_defaults_they_name(tmp_path):
    # the default feed-forward list of the architecture is cut to the targets given, so the saved
    # config obeys its own rule (feedforward_modules within target_modules) and loads again
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"]))
    assert model.peft_config["default"].feedforward_modules == ["down_proj"]
    model.save_pretrained(tmp_path)
    again = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert again.peft_config["default"].feedforward_modules == ["down_proj"]
    only_attention = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj"]))
    assert only_attention.peft_config["default"].feedforward_modules == []


@pytest.mark.parametrize("kw", [dict(target_modules=r".*\.q_proj", feedforward_modules=["down_proj"]),
                                dict(target_modules=["q_proj"], feedforward_modules=r".*down_proj")])
def test_feedforward_modules_outside_the_targets_warn_when_a_regex_hides_it(kw):
    from peftkit.targeting import UnmatchedTargetWarning
    from tests.conftest import tiny_llama

    with pytest.warns(UnmatchedTargetWarning, match=r"feedforward_modules \[.*down_proj'\] match none of the 2 "):
        get_peft_model(tiny_llama(), IA3Config(**kw))


class _ConvNet(torch.nn.Module):
    """Grouped and plain 2-d convolutions with padding, then a 3-d and a 1-d one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = torch.nn.Conv2d(6, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.vol = torch.nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.seq = torch.nn.Conv1d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.vol(torch.tanh(self.grouped(torch.tanh(self.stem(x)))).unsqueeze(2)).squeeze(2)
        return self.seq(h.flatten(2))


CONV_CONFIGS = {
    "output": dict(target_modules=["stem", "grouped", "vol", "seq"], feedforward_modules=[]),
    "input": dict(target_modules=["stem", "grouped", "vol", "seq"], feedforward_modules=["stem", "grouped", "vol",
                                                                                         "seq"]),
}


@pytest.mark.parametrize("kind", list(CONV_CONFIGS))
def test_convolutions_scale_channels_and_merge_exactly(kind):
    torch.manual_seed(0)
    model = get_peft_model(_ConvNet(), IA3Config(**CONV_CONFIGS[kind]))
    shapes = {n.split(".")[2]: tuple(p.shape) for n, p in model.named_parameters() if "ia3_l" in n}
    channels = "in" if kind == "input" else "out"
    inputs = channels == "in"
    assert shapes == {"stem": (1, 4 if inputs else 6, 1, 1), "grouped": (1, 6 if inputs else 4, 1, 1),
                      "vol": (1, 4, 1, 1, 1), "seq": (1, 4 if inputs else 3, 1)}
    perturb(model, std=0.5)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        layer = model.base_model.model.stem
        scale = layer.adapters["default"].ia3_l.flatten()
        if kind == "input":  # the stem's input channels are scaled before the convolution
            assert torch.allclose(layer(x), layer.base_layer(x * scale[:, None, None]), atol=1e-6)
        else:
            assert torch.allclose(layer(x), layer.base_layer(x) * scale[:, None, None], atol=1e-6)
        assert (layer(x[0]) - layer(x)[0]).abs().max() <= 1e-6  # an unbatched input (C, H, W) is scaled alike
        unmerged = model(x)
        with model.disable_adapter():
            assert (model(x) - unmerged).abs().max() > 1e-2  # the scales do change the output
        model.merge_adapter()
        assert (model(x) - unmerged).abs().max() <= 1e-5
        model.unmerge_adapter()
        assert (model(x) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", list(CONV_CONFIGS))
def test_convolution_adapters_move_both_ways_with_peft(kind, tmp_path):
    kw = dict(target_modules=["stem", "grouped", "vol"],
              feedforward_modules=["stem", "grouped", "vol"] if kind == "input" else [])
    torch.manual_seed(0)
    base = _ConvNet()
    x = torch.randn(2, 4, 5, 5)
    ours = get_peft_model(copy.deepcopy(base), IA3Config(**kw))
    perturb(ours, std=0.5)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
        perturb(theirs, std=0.5)
        theirs.save_pretrained(tmp_path / "theirs")
        loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
        assert (loaded(x) - theirs(x)).abs().max() <= 1e-5
        theirs.merge_adapter()
        assert (loaded(x) - theirs(x)).abs().max() <= 1e-5
