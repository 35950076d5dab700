"""OFT: block-diagonal Cayley rotations of the input, merged exactly, with peft's file format both ways."""

from __future__ import annotations

import copy
import json
import re
import types
import warnings

import peft
import pytest
import torch
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, OFTConfig, PeftModel, get_peft_model
from peftkit.config import get_method
from peftkit.methods.oft import OFTAdapter, cayley, coft_project, nearest_divisor, oft_from_cli, skew
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.zoo import train_tiny_bert


def outputs(model, x):
    """Logits and last hidden states together (a tiny BERT classifier's logits alone move little)."""
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


CASES = {
    "bert": (tiny_bert_classifier, dict(oft_block_size=4, target_modules=["query", "value", "dense"])),
    "bert_r_share": (tiny_bert_classifier, dict(r=2, oft_block_size=0, block_share=True,
                                                target_modules=["query", "dense"])),
    "llama_exact": (tiny_llama, dict(oft_block_size=8, use_cayley_neumann=False, target_modules="all-linear")),
    "llama_terms3": (tiny_llama, dict(oft_block_size=4, num_cayley_neumann_terms=3, target_modules=["q_proj", "down_proj"])),
    "gpt2_conv1d": (tiny_gpt2, dict(oft_block_size=4, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2_tied_embedding": (tiny_gpt2, dict(oft_block_size=8, target_modules=["wte", "c_fc"])),
}


# --- the maths against peft's own functions ------------------------------------------------------------

@pytest.mark.parametrize("neumann,terms", [(True, 2), (True, 3), (True, 4), (True, 5), (True, 7), (False, 5)])
def test_rotation_blocks_equal_peft(neumann, terms):
    torch.manual_seed(0)
    theirs = OFTRotationModule(3, 6, 4, 12, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
    nn.init.normal_(theirs.weight, std=0.3)
    expected = theirs._cayley_batch(theirs.weight, 4, neumann, terms)
    ours = cayley(skew(theirs.weight, 4), neumann, terms)
    assert (ours - expected).abs().max() <= 1e-6
    assert (ours - torch.eye(4)).abs().max() > 0.1  # a real rotation, not the identity


def test_exact_cayley_is_orthogonal_and_the_series_nearly_so():
    torch.manual_seed(1)
    q = skew(torch.randn(5, 28, dtype=torch.float64) * 0.01, 8)
    exact = cayley(q, neumann=False, terms=5)
    series = cayley(q, neumann=True, terms=5)
    eye = torch.eye(8, dtype=torch.float64)
    assert (exact @ exact.transpose(-1, -2) - eye).abs().max() <= 1e-12
    err = (series @ series.transpose(-1, -2) - eye).abs().max()
    assert 1e-12 < err <= 1e-4
    # the series approximates (I + Q)(I - Q)^-1, the transpose of the exact form, as in peft
    assert (series - exact.transpose(-1, -2)).abs().max() <= 1e-4


def test_nearest_divisor_is_peft_rule():
    layer = types.SimpleNamespace()
    for n in (1, 12, 16, 37, 48, 64):
        for value in range(1, 70):
            assert nearest_divisor(n, value) == OFTLayer.adjust_oft_parameters(layer, n, value), (n, value)


def test_coft_projection_equals_peft_and_bounds_the_norm():
    torch.manual_seed(2)
    theirs = OFTRotationModule(3, 6, 4, 12, coft=True, eps=0.05)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(3, 6) * torch.tensor([[1.0], [0.001], [0.3]]))
    expected = theirs._project_batch(theirs.weight, eps=0.05)
    ours = coft_project(theirs.weight, 4, 0.05)
    assert (ours - expected).abs().max() <= 1e-7
    norms = skew(ours, 4).flatten(1).norm(dim=1)
    radius = 0.05 / 3 ** 0.5
    assert norms.max() <= radius * (1 + 1e-6)
    assert torch.equal(ours[1], theirs.weight[1])  # a block inside the radius is left alone


# --- behaviour ---------------------------------------------------------------------------------------------

def test_identity_at_init_and_trainable_count_formula():
    base = tiny_llama()
    x = ids()
    with torch.no_grad():
        plain = base(input_ids=x).logits
    model = get_peft_model(base, OFTConfig(oft_block_size=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, plain)
    # q_proj: in 16 -> 4 blocks of 4 (6 each); down_proj: in 24 -> 6 blocks; two layers
    assert model.get_nb_trainable_parameters()[0] == 2 * (4 * 6 + 6 * 6)
    shared = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=4, block_share=True, target_modules=["q_proj"]))
    assert shared.get_nb_trainable_parameters()[0] == 2 * 6


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged_and_fifty_cycles_restore_the_base(case):
    make, kw = CASES[case]
    torch.manual_seed(3)
    base = make()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, OFTConfig(**kw))
    perturb(model, std=0.3)
    x = ids()
    adapted = outputs(model, x)
    with model.disable_adapter():
        plain = outputs(model, x)
    assert (adapted - plain).abs().max() > 1e-2
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    model.merge_adapter()
    assert (outputs(model, x) - adapted).abs().max() <= 1e-5
    model.unmerge_adapter()
    now = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if ".adapters." not in k}
    assert now.keys() == snapshot.keys()
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5
    assert (outputs(model, x) - adapted).abs().max() <= 1e-5
    merged = model.merge_and_unload()
    assert (outputs(merged, x) - adapted).abs().max() <= 1e-5


def test_merge_multiplies_the_input_side_of_the_weight():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 3)), OFTConfig(oft_block_size=4, target_modules=["0"]))
    perturb(model)
    layer = model.get_base_model()[0]
    w = layer.base_layer.weight.detach().clone()
    rot = layer.adapters["default"].rotations().detach()
    model.merge_adapter()
    expected = torch.cat([w[:, :4] @ rot[0].T, w[:, 4:] @ rot[1].T], dim=1)
    assert (layer.base_layer.weight - expected).abs().max() <= 1e-6


def test_training_lowers_the_loss_and_only_oft_R_gets_gradients():
    losses, _ = train_tiny_bert(OFTConfig(oft_block_size=4, target_modules=["query", "value", "dense"],
                                          task_type="SEQ_CLS"), "oft_R", steps=40, lr=3e-2)
    assert losses[-1] < 0.75 * losses[0]


def test_coft_keeps_every_block_in_its_radius_while_training():
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=4, coft=True, eps=1e-2, target_modules=["q_proj"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = ids()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model(input_ids=x)  # the projection runs before each use
    radius = 1e-2 / 4 ** 0.5
    for m in model.modules():
        if isinstance(m, OFTAdapter):
            w = m.oft_R.weight.detach()
            assert w.abs().max() > 0
            assert skew(w, 4).flatten(1).norm(dim=1).max() <= radius * (1 + 1e-5)


def test_module_dropout_sets_that_share_of_blocks_to_the_identity_in_training_only():
    torch.manual_seed(4)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 4)),
                           OFTConfig(oft_block_size=4, module_dropout=0.5, target_modules=["0"]))
    perturb(model)
    adapter = model.get_base_model()[0].adapters["default"]
    x = torch.randn(5, 16)
    adapter.train()
    out = adapter.transform_input(x).reshape(5, 4, 4)
    unchanged = [(out[:, i] - x.reshape(5, 4, 4)[:, i]).abs().max() <= 1e-7 for i in range(4)]
    assert sum(bool(u) for u in unchanged) == 2
    adapter.eval()
    rotated = adapter.transform_input(x).reshape(5, 4, 4)
    assert all((rotated[:, i] - x.reshape(5, 4, 4)[:, i]).abs().max() > 1e-3 for i in range(4))


def test_bias_oft_only_trains_the_adapted_layers_biases():
    model = get_peft_model(tiny_bert_classifier(), OFTConfig(oft_block_size=4, target_modules=["query"], bias="oft_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "bias" in n} == {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in range(2)}


def test_block_size_that_does_not_divide_moves_to_the_nearest_divisor_with_a_warning():
    with pytest.warns(UserWarning, match=r"oft_block_size=5 does not divide in_features=16; using 4"):
        model = get_peft_model(nn.Sequential(nn.Linear(16, 4)), OFTConfig(oft_block_size=5, target_modules=["0"]))
    assert model.get_base_model()[0].adapters["default"].oft_R.weight.shape == (4, 6)
    with pytest.warns(UserWarning, match="r=3 does not divide in_features=16; using 2"):
        model = get_peft_model(nn.Sequential(nn.Linear(16, 4)), OFTConfig(r=3, oft_block_size=0, target_modules=["0"]))
    assert model.get_base_model()[0].adapters["default"].oft_R.weight.shape == (2, 28)


# --- files ---------------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    base = tiny_llama()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, OFTConfig(oft_block_size=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    x = ids()
    expected = outputs(model, x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "OFT" and saved["oft_block_size"] == 4 and saved["r"] == 0
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"].shape == (4, 6)
    loaded = PeftModel.from_pretrained(twin, tmp_path)
    assert (outputs(loaded, x) - expected).abs().max() == 0


def test_an_embedding_is_saved_under_peft_key_and_rotates_the_looked_up_rows(tmp_path):
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=4, target_modules=["embed_tokens"]))
    perturb(model)
    emb = model.get_base_model().model.embed_tokens
    x = ids()
    with torch.no_grad():
        rot = emb.adapters["default"].rotations()
        table = emb.base_layer.weight.reshape(64, 4, 4)
        by_hand = torch.einsum("nic,ick->nik", table, rot).reshape(64, 16)[x]
        assert (emb(x) - by_hand).abs().max() <= 1e-6
        assert (by_hand - emb.base_layer(x)).abs().max() > 1e-2
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.embed_tokens.oft_embedding_R.weight"].shape == (4, 6)


INTEROP = {k: v for k, v in CASES.items() if not k.startswith("gpt2")}  # peft's OFT does not take GPT-2's Conv1D
INTEROP["llama_coft"] = (tiny_llama, dict(oft_block_size=4, coft=True, eps=0.5, target_modules=["q_proj", "o_proj"]))
INTEROP["llama_embedding"] = (tiny_llama, dict(oft_block_size=4, target_modules=["embed_tokens", "v_proj"]))


@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_adapter_loads_in_peft(case, tmp_path):
    make, kw = INTEROP[case]
    torch.manual_seed(5)
    base = make()
    twin = copy.deepcopy(base)
    ours = get_peft_model(base, OFTConfig(**kw))
    perturb(ours, std=0.3)
    x = ids()
    expected = outputs(ours, x)
    with ours.disable_adapter():
        assert (outputs(ours, x) - expected).abs().max() > 1e-3
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert not [w for w in caught if "cayley" in str(w.message).lower()]  # peft reads our peft_version as >= 0.18
    assert (outputs(theirs, x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_adapter_loads_in_peftkit(case, tmp_path):
    make, kw = INTEROP[case]
    torch.manual_seed(6)
    base = make()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.OFTConfig(**kw))
        perturb(theirs, std=0.3)
        x = ids()
        expected = outputs(theirs, x)
        theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(twin, tmp_path)
    assert (outputs(ours, x) - expected).abs().max() <= 1e-5
    merged = ours.merge_and_unload()
    assert (outputs(merged, x) - expected).abs().max() <= 1e-5


# --- refusals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,words", [
    (dict(r=4), "give only one of them"),
    (dict(r=0, oft_block_size=0), "one of them must be non-zero"),
    (dict(oft_block_size=-4), "oft_block_size=-4"),
    (dict(module_dropout=1.0), "module_dropout=1.0"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(num_cayley_neumann_terms=1), "num_cayley_neumann_terms=1"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(coft="yes"), "coft='yes'"),
    (dict(layers_pattern="layers"), "layers_pattern='layers' needs layers_to_transform"),
    (dict(target_modules=[]), "target_modules=[]"),
])
def test_bad_values_raise_naming_the_value(kw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        OFTConfig(**kw)


def test_grouped_conv_targets_are_refused_before_anything_changes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.grouped = nn.Conv2d(4, 4, 3, groups=2)

    net = Net()
    with pytest.raises(ConfigError, match=re.escape("grouped: OFT cannot adapt an nn.Conv2d with groups=2")):
        get_peft_model(net, OFTConfig(oft_block_size=4, target_modules=["lin", "grouped"]))
    assert isinstance(net.lin, nn.Linear) and not any("adapters" in n for n, _ in net.named_modules())


class ConvNet(nn.Module):
    """A 1x1 and a 3x3 (padded, strided) Conv2d, then a Linear, on a (N, 4, 6, 6) image."""

    def __init__(self):
        super().__init__()
        self.point = nn.Conv2d(4, 8, 1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.head = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.point(x))).flatten(1))


def test_conv2d_rotates_the_receptive_fields_and_merges_exactly():
    torch.manual_seed(8)
    net = ConvNet()
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        plain = net(x)
    model = get_peft_model(net, OFTConfig(oft_block_size=8, target_modules=["point", "conv", "head"]))
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # identity at init, whatever the kernel
    conv = model.get_base_model().conv
    assert conv.adapters["default"].oft_R.weight.shape == (9, 28)  # 8 * 3 * 3 = 72 = 9 blocks of 8
    perturb(model)
    with torch.no_grad():
        adapted = model(x)
        rot = conv.adapters["default"].rotations()
        w = conv.base_layer.weight.reshape(6, 9, 8)
        by_hand = torch.einsum("oic,ikc->oik", w, rot).reshape(6, 8, 3, 3)
        inner = torch.tanh(model.get_base_model().point(x))
        assert (conv(inner) - nn.functional.conv2d(inner, by_hand, conv.base_layer.bias, 2, 1)).abs().max() <= 1e-6
    assert (adapted - plain).abs().max() > 1e-2
    weights = {k: v.clone() for k, v in net.state_dict().items() if ".adapters." not in k}
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    assert max((net.state_dict()[k] - v).abs().max().item() for k, v in weights.items()) <= 1e-5
    with torch.no_grad():
        merged = model.merge_and_unload()(x)
    assert (merged - adapted).abs().max() <= 1e-5


def test_conv2d_files_move_both_ways_with_peft(tmp_path):
    """1x1 kernels: outputs equal peft's, merged or not. 3x3: peftkit's output is peft's merged output (peft's
    unmerged Conv2d forward sums overlapping patches back, so it is not even the base model at the identity)."""
    torch.manual_seed(9)
    net = ConvNet()
    x = torch.randn(3, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(net), peft.OFTConfig(oft_block_size=8,
                                                                         target_modules=["point", "conv"]))
        perturb(theirs)
        theirs.save_pretrained(tmp_path / "peft")
        with torch.no_grad():
            theirs_unmerged = theirs(x)
            theirs_merged = theirs.merge_and_unload()(x)
    ours = PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "peft")
    with torch.no_grad():
        assert (ours(x) - theirs_merged).abs().max() <= 1e-5
        assert (ours(x) - theirs_unmerged).abs().max() > 1e-2  # peft's own merged/unmerged disagreement

    ours = get_peft_model(copy.deepcopy(net), OFTConfig(oft_block_size=4, target_modules=["point"]))
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "ours")
    with torch.no_grad():
        expected = ours(x)
        assert (expected - net(x)).abs().max() > 1e-3
        assert (back(x) - expected).abs().max() <= 1e-5


def test_cli_config_uses_r_or_the_default_block_size():
    args = types.SimpleNamespace(r=None, lora_dropout=0.0, target_modules=None, task_type="SEQ_CLS", method_options={})
    cfg = oft_from_cli(args)
    assert (cfg.r, cfg.oft_block_size) == (0, 32)
    cfg = oft_from_cli(types.SimpleNamespace(**{**vars(args), "r": 4}))
    assert (cfg.r, cfg.oft_block_size) == (4, 0)
    cfg = oft_from_cli(types.SimpleNamespace(**{**vars(args), "method_options": {"r": 6}}))
    assert (cfg.r, cfg.oft_block_size) == (6, 0)
    with pytest.raises(ConfigError, match=r"--lora-dropout 0\.1 has no meaning for OFT"):
        oft_from_cli(types.SimpleNamespace(**{**vars(args), "lora_dropout": 0.1}))
    assert get_method("oft").family == "reparameterised"


def test_two_stacked_oft_adapters_merge_exactly_and_mixed_batches_pick_each_rows_adapter():
    torch.manual_seed(7)
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=4, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("b", OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.normal_(std=0.3)
    x = ids(batch=3)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=["default", "b", "__base__"]).logits
        alone = {}
        for name in ("default", "b"):
            model.set_adapter(name)
            alone[name] = model(input_ids=x).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
        model.set_adapter(["default", "b"])
        both = model(input_ids=x).logits
        model.merge_adapter(["default", "b"])
        merged = model(input_ids=x).logits
    assert (alone["default"] - alone["b"]).abs().max() > 1e-2 and (both - alone["default"]).abs().max() > 1e-2
    assert (mixed[0] - alone["default"][0]).abs().max() <= 1e-6
    assert (mixed[1] - alone["b"][1]).abs().max() <= 1e-6
    assert (mixed[2] - plain[2]).abs().max() <= 1e-6
    assert (merged - both).abs().max() <= 1e-5


def test_two_oft_adapters_on_a_conv2d_merge_together_exactly_but_not_the_later_one_alone():
    torch.manual_seed(10)
    model = get_peft_model(ConvNet(), OFTConfig(oft_block_size=8, target_modules=["conv"]))
    model.add_adapter("other", OFTConfig(oft_block_size=4, target_modules=["conv"]))
    model.set_adapter(["default", "other"])
    perturb(model)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        both = model(x)
        model.set_adapter("default")
        assert (model(x) - both).abs().max() > 1e-3
        model.set_adapter(["default", "other"])
        with pytest.raises(ValueError, match="nothing was merged"):  # the rotations do not commute
            model.merge_adapter(["other"])
        model.merge_adapter(["default"])  # the first one alone is exact: the other rotates the merged kernel
        assert (model(x) - both).abs().max() <= 1e-5
        model.unmerge_adapter()
        model.merge_adapter()
        assert (model(x) - both).abs().max() <= 1e-5
