"""LoRA on ``torch.nn.MultiheadAttention`` (:mod:`peftkit.methods.lora_mha`): its packed ``in_proj_weight`` and its
``out_proj`` adapted together, in peft's file layout; forward/backward with every argument, exact merges, unloading
to the plain attention, files both ways with peft, several adapters, the eval-mode fast paths, and refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.layers import AdaptedLayer
from peftkit.methods.lora_mha import MultiheadAttentionLayer
from tests.conftest import perturb
from tests.test_any_module import lifecycle

E, HEADS = 8, 2
KEYS = ["attn.lora_A.weight", "attn.lora_B.weight", "attn.base_layer.out_proj.lora_A.weight",
        "attn.base_layer.out_proj.lora_B.weight"]


class Attn(nn.Module):
    """One attention (self- or cross-) and a linear head; ``batch_first`` either way."""

    def __init__(self, batch_first: bool = True, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(E, 3)

    def forward(self, x, memory=None, **kwargs):
        kv = x if memory is None else memory
        out, weights = self.attn(x, kv, kv, **kwargs)
        return self.head(out), weights


def inputs(batch_first: bool = True):
    g = torch.Generator().manual_seed(1)
    x, memory = torch.randn(3, 5, E, generator=g), torch.randn(3, 4, E, generator=g)
    return (x, memory) if batch_first else (x.transpose(0, 1), memory.transpose(0, 1))


def by_hand(base: nn.Module, adapters) -> nn.Module:
    """A copy of ``base`` whose attention weights hold ``W + s B A`` of each of ``adapters`` (peftkit adapters)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for a in adapters:
            out = a.base_layer["out_proj"]
            model.attn.in_proj_weight += a.scaling * a.lora_B.weight @ a.lora_A.weight
            model.attn.out_proj.weight += a.scaling * out.lora_B.weight @ out.lora_A.weight
    return model


KWARGS = {
    "plain": {},
    "key_padding_mask": {"key_padding_mask": torch.tensor([[False] * 4, [False, False, True, True], [False] * 3 + [True]])},
    "attn_mask": {"attn_mask": torch.triu(torch.ones(5, 4, dtype=torch.bool), diagonal=1)},
    "per_head_weights": {"need_weights": True, "average_attn_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("case", list(KWARGS))
def test_lifecycle_with_every_argument(batch_first, case, tmp_path):
    """Gradients reach all four factors; the adapter changes the output, disabling gives the base, merge, unmerge,
    merge_and_unload and a reload keep it; the attention weights returned change too; and the output is that of
    the plain attention with ``W + s B A`` in its two weights (rsLoRA scaling, rank 2)."""
    torch.manual_seed(0)
    base, x = Attn(batch_first), inputs(batch_first)
    kwargs = KWARGS[case]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], use_rslora=True)
    model, out = lifecycle(base, config, x, tmp_path, kwargs=kwargs, pick=lambda o: o[0])
    adapter = model.base_model.model.attn.adapters["default"]
    assert adapter.scaling == pytest.approx(4 / 2 ** 0.5)
    with torch.no_grad():
        expected, expected_weights = by_hand(base, [adapter]).eval()(*x, **kwargs)
        got, weights = model(*x, **kwargs)
    assert torch.equal(got, out)
    assert (out - expected).abs().max() <= 1e-6
    assert (weights - expected_weights).abs().max() <= 1e-6
    assert (weights - base(*x, **kwargs)[1]).abs().max() > 1e-3  # (the q/k update changes where it attends)


def test_the_file_holds_peft_keys_and_unload_gives_the_plain_attention(tmp_path):
    torch.manual_seed(0)
    base = Attn()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["attn"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape)
              for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes == dict(zip(KEYS, [(2, E), (3 * E, 2), (2, E), (E, 2)]))
    assert model.get_nb_trainable_parameters()[0] == 6 * 2 * E  # r (E + 3E) + r (E + E)
    x = inputs()[0]
    with torch.no_grad():
        out = model(x)[0]
        plain = model.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj.weight) is nn.Parameter
    assert set(plain.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in plain.parameters())  # as the base model had them
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    with torch.no_grad():
        assert (plain(x)[0] - out).abs().max() <= 1e-5


def test_unload_without_merging_gives_the_base_weights_back():
    torch.manual_seed(0)
    base = Attn()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["attn"]))
    perturb(model)
    model.merge_adapter()
    plain = model.unload()
    assert type(plain.attn) is nn.MultiheadAttention
    assert all((plain.state_dict()[k] - v).abs().max() <= 1e-6 for k, v in base.state_dict().items())


def _peft_model(base, r=2):
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=4, target_modules=["attn"],
                                                                     init_lora_weights=False))
    return model.eval()


def test_files_move_both_ways_with_peft(tmp_path):
    """peft applies an input-projection update as peftkit does (in_proj_weight + s B A): a file from either side
    gives the other the same outputs, and peft's factors load to the same tensors. (The output projection is
    compared in the next test: peft 0.21.2 adds its update twice.)"""
    base, x = Attn(), inputs()
    theirs = _peft_model(base)
    with torch.no_grad():
        theirs.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
        theirs.save_pretrained(tmp_path / "peft")
        peft_out = theirs(*x)[0]
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (ours(*x)[0] - peft_out).abs().max() <= 1e-5
        assert (ours(*x)[0] - base(*x)[0]).abs().max() > 1e-2
    ours.save_pretrained(tmp_path / "ours")
    theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: torch.equal(v, theirs_file[k]) for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()} \
        == {f"base_model.model.{k}": True for k in KEYS}
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    back.train()  # (peft's eval-mode forward is the same here; train mode runs its regular path for sure)
    with torch.no_grad():
        assert (back(*x)[0] - peft_out).abs().max() <= 1e-5


def test_peft_0_21_2_applies_the_output_projection_update_twice(tmp_path):
    """peft's lora.MultiheadAttention.merge writes ``W_out + s B_o A_o`` into out_proj and then calls out_proj's own
    merge, which adds it again (forward, merge and merge_and_unload: huggingface/peft#3774). peftkit applies the
    LoRA equation once, so a file with a non-zero output-projection update gives peft's outputs only with that
    update doubled; once peft is fixed the two agree as they are."""
    base, x = Attn(), inputs()
    theirs = _peft_model(base)
    theirs.save_pretrained(tmp_path)
    with torch.no_grad():
        peft_out = theirs(*x)[0]
        ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        once = ours(*x)[0]
        ours.base_model.model.attn.adapters["default"].base_layer["out_proj"].lora_B.weight.mul_(2)
        twice = ours(*x)[0]
    assert (once - twice).abs().max() > 1e-2
    if peft.__version__ == "0.21.2":
        assert (twice - peft_out).abs().max() <= 1e-5
    else:  # pragma: no cover - a peft with the fix
        assert (once - peft_out).abs().max() <= 1e-5


def test_two_adapters_switch_stack_merge_and_delete():
    torch.manual_seed(0)
    base, x = Attn(), inputs()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=2, target_modules=["attn", "head"], init_lora_weights=False))
    layer = model.base_model.model.attn
    assert isinstance(layer, MultiheadAttentionLayer) and list(layer.adapters) == ["default", "other"]
    first, second = layer.adapters["default"], layer.adapters["other"]
    model.eval()
    with torch.no_grad():
        out_first = model(*x)[0]
        assert (out_first - by_hand(base, [first])(*x)[0]).abs().max() <= 1e-6
        model.set_adapter("other")
        expected = model.base_model.model.head(by_hand(base, [second]).attn(x[0], x[1], x[1])[0])
        assert (model(*x)[0] - expected).abs().max() <= 1e-6
        model.base_model.set_adapter(["default", "other"])
        both = model(*x)[0]
        expected = model.base_model.model.head(by_hand(base, [first, second]).attn(x[0], x[1], x[1])[0])
        assert (both - expected).abs().max() <= 1e-5
        model.merge_adapter(["default"])  # one merged, the other still applied on top
        assert (model(*x)[0] - both).abs().max() <= 1e-5
        model.merge_adapter(["other"])
        assert (model(*x)[0] - both).abs().max() <= 1e-5
        model.delete_adapter("default")  # unmerged on the way out; "other" stays merged
        assert layer.merged_adapters == ["other"]
        model.unmerge_adapter()
        assert (layer.base_layer.in_proj_weight - base.attn.in_proj_weight).abs().max() <= 1e-6
        assert (layer.base_layer.out_proj.weight - base.attn.out_proj.weight).abs().max() <= 1e-6


class Encoder(nn.Module):
    """torch's own encoder (its eval-mode fast path and nested tensors on) over two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True), 2)

    def forward(self, x, key_padding_mask=None):
        return self.enc(x, src_key_padding_mask=key_padding_mask)


def test_fast_paths_in_eval_mode_do_not_skip_the_adapter(tmp_path):
    """In eval mode without gradients torch's TransformerEncoderLayer (and nested-tensor encoder) reads
    ``self_attn.in_proj_weight`` directly, and the attention's own fast path reads its weights; both would run
    the base weights. peftkit's output there equals the training-mode output (no dropout) and the merged one;
    peft's, on the same file, equals the base model's (its adapter is skipped)."""
    torch.manual_seed(0)
    base, x = Encoder().eval(), torch.randn(2, 5, E)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["self_attn"], init_lora_weights=False))
    with torch.no_grad():
        for m in model.modules():  # only in_proj updates: peft applies an out_proj update twice
            if isinstance(m, MultiheadAttentionLayer):
                m.adapters["default"].base_layer["out_proj"].lora_B.weight.zero_()
        trained = model.train()(x, mask)
        evaluated = model.eval()(x, mask)
        base_out = base(x, mask)
        real = ~mask
        assert (evaluated[real] - base_out[real]).abs().max() > 1e-2
        assert (evaluated[real] - trained[real]).abs().max() <= 1e-5
        model.merge_adapter()
        assert (model(x, mask)[real] - evaluated[real]).abs().max() <= 1e-5
        model.unmerge_adapter()
        model.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert (theirs.train()(x, mask)[real] - trained[real]).abs().max() <= 1e-5
        assert (theirs.eval()(x, mask)[real] - base_out[real]).abs().max() <= 1e-5  # peft's adapter is skipped


def test_the_attentions_own_fast_path_runs_the_updated_weights(monkeypatch):
    torch.manual_seed(0)
    base, x = Attn(), inputs()[0]
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    attn = model.base_model.model.attn
    native, calls = torch._native_multi_head_attention, []
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or native(*a, **k))
    with torch.no_grad():
        fast = model.eval()(x, need_weights=False)[0]  # eval, no gradients, batch_first: torch's native kernel
        assert calls == [1]
        regular = model.train()(x, need_weights=False)[0]
    assert (fast - regular).abs().max() <= 1e-5
    assert (fast - base.eval()(x, need_weights=False)[0]).abs().max() > 1e-2
    assert attn.embed_dim == E and attn.num_heads == HEADS and attn.batch_first
    assert attn.out_proj is attn.base_layer.out_proj and attn.in_proj_weight is attn.base_layer.in_proj_weight


def test_a_training_step_changes_only_the_adapter():
    torch.manual_seed(0)
    base, x = Attn(), inputs()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["attn"]))
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # B starts at zero: A gets its gradient from the second step on
        model(*x)[0].square().mean().backward()
        optimiser.step()
        optimiser.zero_grad()
    adapter = model.base_model.model.attn.adapters["default"]
    assert all(p.abs().max() > 0 for p in (adapter.lora_B.weight, adapter.base_layer["out_proj"].lora_B.weight))
    assert torch.equal(model.base_model.model.attn.base_layer.in_proj_weight, base.attn.in_proj_weight)


@pytest.mark.parametrize("kwargs, config, message", [
    ({"kdim": 4, "vdim": 6}, LoraConfig(target_modules=["attn"]),
     r"attn \(nn.MultiheadAttention\): LoRA adapts the packed in_proj_weight, which an attention with kdim=4, vdim=6 "
     "and embed_dim=8 does not have"),
    ({}, LoraConfig(target_modules=["attn"], use_dora=True), r"use_dora=True is not supported on torch's attention"),
    ({}, LoraConfig(target_modules=["attn"], lora_bias=True), r"lora_bias=True is not supported on torch's attention"),
    ({}, LoraConfig(r=2, target_modules=["attn"], init_lora_weights="pissa"),
     r"init_lora_weights='pissa' starts from the base weight"),
    ({}, LoraConfig(target_modules=["attn", "head"], bias="lora_only"), r"bias='lora_only' is not supported"),
    ({}, LoHaConfig(target_modules=["attn"]), "LoHa cannot adapt module 'attn' of type MultiheadAttention"),
    ({}, LoraConfig(target_modules=["out_proj"]),
     r"'attn.out_proj': it is the out_proj of a torch.nn.MultiheadAttention.*target the attention module itself "
     r"\('attn'\)"),
])
def test_unsupported_variants_are_refused_before_anything_changes(kwargs, config, message):
    base = Attn(**kwargs)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match=message):
        get_peft_model(base, config)
    assert type(base.attn) is nn.MultiheadAttention and type(base.head) is nn.Linear
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_dropout_is_not_applied_and_says_so():
    base, x = Attn(), inputs()
    with pytest.warns(UserWarning, match=r"attn \(nn.MultiheadAttention\): lora_dropout=0.5 is not applied"):
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["attn"], lora_dropout=0.5,
                                                init_lora_weights=False))
    with torch.no_grad():
        assert torch.equal(model.train()(*x)[0], model.train()(*x)[0])


def test_mixed_adapter_batches_are_refused_on_the_attention():
    base, x = Attn(), inputs()
    with torch.no_grad():
        base_out = base(*x)[0]
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    with pytest.raises(ValueError, match=r"adapter_names names \['default'\], LoRA adapter\(s\) of an "
                                         "nn.MultiheadAttention.*mixed-adapter batches are not supported"):
        model(*x, adapter_names=["default", "__base__", "default"])
    with torch.no_grad():  # rows that name no adapter of the attention run it as it is
        assert (model(*x, adapter_names=["__base__"] * 3)[0] - base_out).abs().max() <= 1e-6


def test_lora_fa_freezes_both_a_factors():
    from peftkit.methods.lorafa import LoraFAConfig

    model = get_peft_model(Attn(), LoraFAConfig(r=2, target_modules=["attn"]))
    trainable = sorted(n.split("adapters.default.")[1] for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_layer.out_proj.lora_B.weight", "lora_B.weight"]


def test_a_float64_model_gets_float64_factors_and_merges_to_round_off():
    torch.manual_seed(0)
    base = Attn().double()
    x = tuple(t.double() for t in inputs())
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    assert model.base_model.model.attn.adapters["default"].lora_A.weight.dtype == torch.float64
    with torch.no_grad():
        out = model(*x)[0]
        model.merge_adapter()
        assert (model(*x)[0] - out).abs().max() <= 1e-12


def test_bias_all_saves_the_out_proj_bias_under_peft_key(tmp_path):
    """With bias="all" the attention's out_proj bias trains; peft wraps out_proj inside the attention and keys it
    ``attn.base_layer.out_proj.base_layer.bias``. It was saved as ``attn.base_layer.out_proj.bias``, which peft
    dropped silently (outputs 0.19 apart) and which refused peft's file; now either file loads on the other side."""
    torch.manual_seed(0)
    base, x = Attn(), inputs()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["attn"], bias="all",
                                                           init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.attn.adapters["default"].base_layer["out_proj"].lora_B.weight.zero_()  # (peft's bug)
        model.base_model.model.attn.base_layer.out_proj.bias.add_(0.3)
        out = model.eval()(*x)[0]
    model.save_pretrained(tmp_path / "ours")
    key = "base_model.model.attn.base_layer.out_proj.base_layer.bias"
    assert torch.equal(load_file(tmp_path / "ours" / "adapter_model.safetensors")[key],
                       model.base_model.model.attn.base_layer.out_proj.bias)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").train()
    with torch.no_grad():
        assert (theirs(*x)[0] - out).abs().max() <= 1e-5
    theirs.save_pretrained(tmp_path / "peft")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (back(*x)[0] - out).abs().max() <= 1e-5
        plain = model.unload()  # the trained bias goes back to the base's
    assert torch.equal(plain.attn.out_proj.bias, base.attn.out_proj.bias)
