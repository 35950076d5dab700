"""LoHa and LoKr: exact merging on every layer type, parameter counts, dropouts, training, peft interop."""

from __future__ import annotations

import copy
import math
import warnings

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit import ConfigError, LoHaConfig, LoKrConfig, get_peft_model
from peftkit.methods import _reparam as rp
from peftkit.methods._reparam import factorization
from tests.conftest import ids, perturb, tiny_bert_classifier
from tests.zoo import (
    SHAPES,
    TARGETS,
    Zoo,
    adapted_zoo,
    assert_fifty_cycles,
    assert_merge_exact,
    train_tiny_bert,
    zoo_inputs,
)

CASES = [
    (LoHaConfig, dict(r=2, alpha=3)),
    (LoHaConfig, dict(r=2, alpha=5, use_effective_conv2d=True)),
    (LoHaConfig, dict(r=3, alpha=2, rank_pattern={"conv2": 2}, alpha_pattern={"lin": 9})),
    (LoKrConfig, dict(r=2, alpha=3)),
    (LoKrConfig, dict(r=1, alpha=4, decompose_both=True, use_effective_conv2d=True)),
    (LoKrConfig, dict(r=8, alpha=4)),                      # every w2 whole
    (LoKrConfig, dict(r=2, alpha=2, decompose_factor=4, init_weights="lycoris")),
]


@pytest.mark.parametrize("cls, kw", CASES)
def test_merge_and_unload_equals_unmerged(cls, kw):
    _, model = adapted_zoo(cls(target_modules=TARGETS, **kw))
    assert_merge_exact(model, zoo_inputs())


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
def test_fifty_merge_cycles_restore_base_weights(cls):
    base, model = adapted_zoo(cls(r=2, alpha=7, target_modules=TARGETS))
    assert_fifty_cycles(base, model, zoo_inputs())


def loha_count(r: int, effective: bool) -> int:
    """The LoHa docstring formula over the zoo (conv2: out 8, in/groups 2, kernel 3x3; conv1: 8 -> 6, k 2)."""
    dense = sum(2 * r * (o + i) for o, i in SHAPES.values())
    if not effective:
        return dense + 2 * r * (8 + 2 * 9)
    return dense - 2 * r * (6 + 16) + 2 * (r * r * 9 + r * 8 + r * 2) + 2 * (r * r * 2 + r * 6 + r * 8)


def lokr_count(r: int, decompose_both: bool, effective: bool) -> int:
    """The LoKr docstring formula: P(w1) + P(w2) per layer."""
    layers = {"lin": (12, 8, ()), "square": (12, 12, ()), "wide": (20, 12, ()), "conv2": (8, 2, (3, 3)),
              "conv1": (6, 8, (2,))}
    total = 0
    for out_f, in_f, kernel in layers.values():
        (a, b), (c, d) = factorization(out_f), factorization(in_f)
        total += r * (a + c) if decompose_both and r < max(a, c) / 2 else a * c
        k = math.prod(kernel)
        if r >= max(b, d) / 2:
            total += b * d * k
        elif effective and kernel:
            total += r * r * k + r * (b + d)
        else:
            total += r * (b + d * k)
    return total


@pytest.mark.parametrize("cls, kw, expected", [
    (LoHaConfig, dict(r=2), loha_count(2, False)),
    (LoHaConfig, dict(r=2, use_effective_conv2d=True), loha_count(2, True)),
    (LoKrConfig, dict(r=1), lokr_count(1, False, False)),
    (LoKrConfig, dict(r=1, decompose_both=True, use_effective_conv2d=True), lokr_count(1, True, True)),
    (LoKrConfig, dict(r=4), lokr_count(4, False, False)),
])
def test_trainable_parameter_count_matches_formula(cls, kw, expected):
    model = get_peft_model(Zoo(), cls(target_modules=TARGETS, **kw))
    assert model.get_nb_trainable_parameters()[0] == expected
    assert expected > 0


def test_lokr_linear_forward_never_builds_the_kronecker_product(monkeypatch):
    model = get_peft_model(nn.Sequential(nn.Linear(12, 20)), LoKrConfig(r=1, target_modules=["0"]))
    perturb(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = model(x)
        delta = model.base_model.model[0].adapters["default"].delta_weight(model.base_model.model[0])
        monkeypatch.setattr(rp, "kron", lambda *a: pytest.fail("kron built in the linear forward"))
        assert (model(x) - expected).abs().max() <= 1e-6
    with torch.no_grad(), model.disable_adapter():
        assert (model(x) + x @ delta.T - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("cls, rescaled", [(LoHaConfig, True), (LoKrConfig, False)])
def test_rank_dropout_zeroes_whole_output_rows(cls, rescaled):
    torch.manual_seed(3)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 64)), cls(r=4, rank_dropout=0.5, target_modules=["0"]))
    perturb(model)
    x = torch.randn(5, 8)
    with torch.no_grad():
        model.eval()
        full = model(x)
        with model.disable_adapter():
            base = model(x)
        model.train()
        dropped = model(x)
    ratio = (dropped - base) / (full - base)          # per output row: 0 or the rescale factor
    per_row = ratio[0]
    assert torch.allclose(ratio, per_row.expand_as(ratio), atol=1e-4)
    kept = per_row.abs() > 1e-3
    assert 0 < int(kept.sum()) < 64
    factor = 64 / int(kept.sum()) if rescaled else 1.0
    assert torch.allclose(per_row[kept], torch.full_like(per_row[kept], factor), atol=1e-4)


def test_module_dropout_skips_the_adapter_only_while_training():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoHaConfig(r=2, module_dropout=0.999999,
                                                                       target_modules=["0"]))
    perturb(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        model.train()
        assert torch.equal(model(x), base)
        model.eval()
        assert (model(x) - base).abs().max() > 1e-3


@pytest.mark.parametrize("cls, marker", [(LoHaConfig, "hada_"), (LoKrConfig, "lokr_")])
def test_training_reduces_loss_and_only_adapter_gets_gradients(cls, marker):
    losses, _ = train_tiny_bert(cls(r=2, alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"), marker,
                                steps=60)
    assert losses[-1] < 0.5 * losses[0]


def test_factorization_follows_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 32):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    assert factorization(128) == (8, 16) and factorization(128, 32) == (32, 4)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.conv1 = nn.Conv1d(8, 6, 3)
        self.lin = nn.Linear(12, 20)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        a = self.conv2(img)
        return torch.cat([a.flatten(1), self.conv1(a.flatten(2)[..., :10]).flatten(1),
                          self.lin(a.flatten(1)[:, :12])], dim=1)


INTEROP = {
    "loha_bert": ("LoHaConfig", tiny_bert_classifier, dict(r=2, alpha=3, target_modules=["query", "dense"])),
    "lokr_bert": ("LoKrConfig", tiny_bert_classifier, dict(r=2, alpha=5, target_modules=["value", "dense"],
                                                           decompose_both=True, rank_pattern={"value": 1})),
    "loha_conv": ("LoHaConfig", ConvNet, dict(r=2, alpha=3, target_modules=["conv2", "conv1", "lin"],
                                              use_effective_conv2d=True)),
    "lokr_conv": ("LoKrConfig", ConvNet, dict(r=2, alpha=3, target_modules=["conv2", "conv1", "lin"],
                                              alpha_pattern={"conv1": 7})),
    "lokr_conv_cp": ("LoKrConfig", ConvNet, dict(r=1, alpha=3, target_modules=["conv2", "lin"],
                                                 use_effective_conv2d=True, decompose_factor=2)),
}


def _run(model, make):
    with torch.no_grad():
        if make is ConvNet:
            return model(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(5)))
        return model(input_ids=ids()).logits


@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_adapter_loads_in_peft(case, tmp_path):
    cls, make, kw = INTEROP[case]
    base = make()
    twin = copy.deepcopy(base)
    ours = get_peft_model(base, getattr(peftkit, cls)(**kw))
    perturb(ours)
    torch.manual_seed(1)
    expected = _run(ours, make)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    torch.manual_seed(1)
    assert (expected - _run(theirs, make)).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_adapter_loads_in_peftkit(case, tmp_path):
    cls, make, kw = INTEROP[case]
    base = make()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, getattr(peft, cls)(**kw))
        perturb(theirs)
        theirs.save_pretrained(tmp_path)
    torch.manual_seed(1)
    expected = _run(theirs, make)
    with theirs.disable_adapter():
        assert (expected - _run(theirs, make)).abs().max() > 1e-4  # the adapter matters
    ours = peftkit.PeftModel.from_pretrained(twin, tmp_path)
    torch.manual_seed(1)
    assert (expected - _run(ours, make)).abs().max() <= 1e-5
    merged = ours.merge_and_unload()
    torch.manual_seed(1)
    assert (expected - _run(merged, make)).abs().max() <= 1e-5


@pytest.mark.parametrize("cls, kw, message", [
    (LoHaConfig, dict(r=0), "r=0"),
    (LoHaConfig, dict(alpha=-1), "alpha=-1"),
    (LoHaConfig, dict(rank_dropout=1.0), "rank_dropout=1.0"),
    (LoHaConfig, dict(module_dropout=-0.1), "module_dropout=-0.1"),
    (LoHaConfig, dict(init_weights="lycoris"), "init_weights='lycoris'"),
    (LoHaConfig, dict(rank_pattern={"lin": 0}), "rank_pattern['lin']=0"),
    (LoKrConfig, dict(decompose_factor=0), "decompose_factor=0"),
    (LoKrConfig, dict(init_weights="pissa"), "init_weights='pissa'"),
    (LoKrConfig, dict(alpha_pattern={"lin": -2}), "alpha_pattern['lin']=-2"),
    (LoKrConfig, dict(alpha_pattern={"[lin": 2}), "alpha_pattern key '[lin' is not a valid regular expression"),
    (LoHaConfig, dict(rank_pattern={"lin[": 2}), "rank_pattern key 'lin[' is not a valid regular expression"),
])
def test_bad_values_raise_config_error(cls, kw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cls(target_modules=TARGETS, **kw)


def test_missing_targets_raise_config_error():
    with pytest.raises(ConfigError, match=r"target_modules=\[\] adapts nothing"):
        LoKrConfig(target_modules=[])
    # None means the model type's defaults (as peft); a plain module has none
    with pytest.raises(ConfigError, match="there are no default targets for model_type=None"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoKrConfig())


@pytest.mark.parametrize("config", [LoHaConfig, LoKrConfig])
def test_rank_dropout_on_an_unbatched_convolution_drops_output_channels(config):
    net = nn.Sequential(nn.Conv1d(4, 5, 3, padding=1))
    model = get_peft_model(net, config(r=2, rank_dropout=0.5, target_modules=["0"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    model.train()
    layer = model.base_model.model[0]
    x = torch.randn(4, 5)  # (channels, length): length == out channels, so a misplaced mask would broadcast
    torch.manual_seed(1)  # keeps 2 of the 5 channels
    side = model(x) - layer.base_layer(x)
    torch.manual_seed(1)
    batched = model(x[None])[0] - layer.base_layer(x[None])[0]
    torch.testing.assert_close(side, batched, atol=1e-6, rtol=0)
    dropped = (side.abs().sum(dim=1) == 0)  # whole output channels (rows) are zero, not positions
    assert dropped.any() and not (side.abs().sum(dim=0) == 0).any()
