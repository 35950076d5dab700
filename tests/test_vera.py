"""VeRA: shared frozen projections, exact merging, counts, training, and interop with peft."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit import ConfigError, PeftModel, VeraConfig, get_peft_model
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2


class Linears(nn.Module):
    """Linear, square and non-square GPT-2 Conv1D layers of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.square = Conv1D(12, 12)
        self.wide = Conv1D(20, 12)
        self.narrow = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.square(self.lin(x))
        return torch.cat([self.wide(h), self.narrow(h)], -1)


TARGETS = ["lin", "square", "wide", "narrow"]


def adapted(**kw):
    base = Linears()
    model = get_peft_model(base, VeraConfig(target_modules=TARGETS, **{"r": 6, **kw}))
    perturb(model)
    return base, model


def run(model):
    with torch.no_grad():
        return model(torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kw", [dict(), dict(r=3, bias="vera_only"), dict(vera_dropout=0.3, d_initial=0.5)])
def test_merge_and_unload_equals_unmerged(kw):
    _, model = adapted(**kw)
    model.eval()
    before = run(model)
    with model.disable_adapter():
        assert (before - run(model)).abs().max() > 1e-2
    assert (before - run(model.merge_and_unload())).abs().max() <= 1e-5


def test_fifty_merge_cycles_restore_base_weights():
    base, model = adapted()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    before = run(model)
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    model.merge_adapter()
    assert (run(model) - before).abs().max() <= 1e-5
    model.unmerge_adapter()
    now = base.state_dict()
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5


def test_one_shared_projection_sized_for_the_largest_layer_and_drawn_from_the_seed():
    _, model = adapted(r=5, projection_prng_key=7)
    layers = [model.base_model.model.get_submodule(t).adapters["default"] for t in TARGETS]
    projection = layers[0].vera_projection
    assert all(a.vera_projection is projection for a in layers)
    assert projection.vera_A.shape == (5, 12) and projection.vera_B.shape == (20, 5)
    again = get_peft_model(Linears(), VeraConfig(r=5, target_modules=TARGETS, projection_prng_key=7))
    other = get_peft_model(Linears(), VeraConfig(r=5, target_modules=TARGETS, projection_prng_key=8))
    first = again.base_model.model.lin.adapters["default"].vera_projection
    assert torch.equal(first.vera_A, projection.vera_A) and torch.equal(first.vera_B, projection.vera_B)
    assert not torch.equal(other.base_model.model.lin.adapters["default"].vera_projection.vera_A, projection.vera_A)
    assert not any(p.requires_grad for p in projection.buffers())


def test_trainable_count_and_initial_identity():
    r = 6
    base = Linears()
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = base(x)
    model = get_peft_model(base, VeraConfig(r=r, target_modules=TARGETS))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert model.get_nb_trainable_parameters()[0] == sum(r + out for out in (12, 12, 20, 5))


def test_training_reduces_loss_and_only_the_vectors_get_gradients():
    model = get_peft_model(tiny_bert_classifier(), VeraConfig(r=16, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS"))
    x, labels = torch.randint(3, 64, (8, 10)), torch.tensor([0, 1] * 4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        got = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None}
        assert got == {"vera_lambda_b", "vera_lambda_d", "weight", "bias"}  # weight/bias: the classifier copy
        assert all(".modules_to_save." in n for n, p in model.named_parameters()
                   if p.grad is not None and not n.rsplit(".", 1)[-1].startswith("vera_"))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("save_projection", [True, False])
def test_file_holds_the_projection_only_when_asked(save_projection, tmp_path):
    base = Linears()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, VeraConfig(r=4, target_modules=TARGETS, save_projection=save_projection,
                                            projection_prng_key=11))
    perturb(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    assert len([k for k in keys if "lambda" in k]) == 8
    loaded = PeftModel.from_pretrained(twin, tmp_path)
    assert (run(loaded) - run(model)).abs().max() <= 1e-6


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_peft_interop(direction, arch, save_projection, tmp_path):
    make, targets = (tiny_bert_classifier, ["query", "value", "intermediate.dense"]) if arch == "bert" else \
        (tiny_gpt2, ["c_attn", "c_fc", "c_proj"])
    src, dst = (peftkit, peft) if direction == "peftkit_to_peft" else (peft, peftkit)
    base = make()
    twin = copy.deepcopy(base)
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = src.get_peft_model(base, src.VeraConfig(r=6, target_modules=targets, projection_prng_key=3,
                                                        save_projection=save_projection))
        perturb(model, std=1.0)
        model.save_pretrained(tmp_path)
        loaded = dst.PeftModel.from_pretrained(twin, tmp_path)
        with torch.no_grad():
            expected = model(input_ids=x).logits
            with model.disable_adapter():
                assert (model(input_ids=x).logits - expected).abs().max() > 1e-3
            assert (loaded(input_ids=x).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "r=0 is not valid"),
    (dict(vera_dropout=1.0), "vera_dropout=1.0"),
    (dict(bias="lora_only"), "bias='lora_only' is not valid"),
    (dict(projection_prng_key=1.5), "projection_prng_key=1.5"),
    # torch's generator takes [-2**63, 2**64): beyond, a raw "Overflow when unpacking long long" came from it
    (dict(projection_prng_key=2**64), r"projection_prng_key=18446744073709551616 is out of range; .*\[-2\*\*63, 2\*\*64\)"),
    (dict(projection_prng_key=-2**63 - 1), "projection_prng_key=-9223372036854775809 is out of range"),
    (dict(target_modules=[]), r"target_modules=\[\] adapts nothing"),
    # accepted before, and the injection then said "matched no module ... within layers_to_transform=[-1]"
    (dict(layers_to_transform=-1), r"layers_to_transform=-1 must be a block index >= 0"),
])
def test_bad_values_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        VeraConfig(**{"target_modules": ["lin"], **kw})


def test_unsupported_layer_is_a_config_error():
    base = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="VeRA cannot adapt module '0' of type Embedding"):
        get_peft_model(base, VeraConfig(r=2, target_modules=["0", "1"]))
    assert isinstance(base[1], nn.Linear)


def test_gpt2_conv1d_layers_merge_exactly():
    model = get_peft_model(tiny_gpt2(), VeraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    perturb(model)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        assert (before - model.merge_and_unload()(input_ids=x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("save_projection", [False, True])
def test_excluded_modules_are_written_as_the_adapted_list_so_peft_loads_the_same_adapter(save_projection, tmp_path):
    from tests.conftest import tiny_llama

    x = ids(2, 5)
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules="all-linear",
                                                           exclude_modules=["down_proj"], save_projection=save_projection))
    perturb(model, 0.5)
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: exclude_modules (written as null) is not one of its fields
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not any("down_proj" in name and "vera_lambda" in name for name, _ in theirs.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, expected, atol=1e-5, rtol=0)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(back(input_ids=x).logits, expected, atol=1e-6, rtol=0)
