"""Adapter merging: exact concatenation, SVD, and the TIES / DARE / magnitude rules on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import ConfigError, LoraConfig, get_peft_model
from peftkit.layers import AdaptedLayer
from peftkit.merging import combine, elect_sign, magnitude_mask
from tests.conftest import perturb, tiny_bert_classifier
from tests.test_lora import TARGETS, Zoo, inputs

T1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
T2 = torch.tensor([-1.0, -1.0, 2.0, 4.0])


def test_magnitude_mask_keeps_the_largest_entries():
    assert magnitude_mask(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5).tolist() == [False, True, True, False]


def test_ties_full_density_is_the_disjoint_mean():
    # elected signs from the sum [0, -3, 5, 4.5] -> [+, -, +, +]; agreeing entries are averaged
    out = combine([T1, T2], [1.0, 1.0], "ties", density=1.0)
    assert out.tolist() == [1.0, -1.5, 2.5, 2.25]


def test_ties_trims_before_electing():
    # trimmed to half: [0, -2, 3, 0] and [0, 0, 2, 4]; signs of [0, -2, 5, 4] -> [+, -, +, +]
    out = combine([T1, T2], [2.0, 1.0], "ties", density=0.5)
    assert out.tolist() == [0.0, -4.0, (6.0 + 2.0) / 2, 4.0]


def test_sign_election_methods():
    stacked = torch.tensor([[1.0, -2.0], [-3.0, -1.0], [-0.5, 5.0]])
    assert elect_sign(stacked, "total").tolist() == [-1.0, 1.0]
    assert elect_sign(stacked, "frequency").tolist() == [-1.0, -1.0]


def test_magnitude_prune_and_linear():
    assert combine([T1, T2], [0.5, -1.0], "linear").tolist() == [1.5, 0.0, -0.5, -3.75]
    # T1 keeps [_, -2, 3, _], T2 keeps [_, _, 2, 4]
    assert combine([T1, T2], [1.0, 1.0], "magnitude_prune", density=0.5).tolist() == [0.0, -2.0, 5.0, 4.0]


def test_dare_drops_and_rescales_with_a_seed():
    big = torch.arange(1.0, 2001.0)
    g = torch.Generator().manual_seed(7)
    out = combine([big], [1.0], "dare_linear", density=0.25, generator=g)
    keep = torch.rand(big.shape, generator=torch.Generator().manual_seed(7)) < 0.25
    assert torch.equal(out, torch.where(keep, big * 4, torch.zeros_like(big)))
    assert 0.2 < (out != 0).float().mean() < 0.3
    again = combine([big], [1.0], "dare_linear", density=0.25, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)


def _three_adapters():
    base = Zoo(groups=2)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS))
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=5, use_rslora=True, target_modules=TARGETS))
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=2, target_modules=["lin", "conv2", "emb"],
                                      alpha_pattern={"lin": 7}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters." in n:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _delta_sum(model, names, weights):
    out = {}
    for lname, layer in model.base_model.wrappers():
        if isinstance(layer, AdaptedLayer):
            out[lname] = sum(w * layer.adapters[n].delta_weight(layer) for n, w in zip(names, weights)
                             if n in layer.adapters)
    return out


@pytest.mark.parametrize("ctype, kw", [("cat", {}), ("svd", {"svd_rank": 8})])
def test_cat_and_full_rank_svd_are_exact(ctype, kw):
    model = _three_adapters()
    names, weights = ["default", "b", "c"], [0.7, -1.3, 2.0]
    expected = _delta_sum(model, names, weights)
    model.add_weighted_adapter(names, weights, "mix", combination_type=ctype, **kw)
    for lname, layer in model.base_model.wrappers():
        if isinstance(layer, AdaptedLayer):
            got = layer.adapters["mix"].delta_weight(layer)
            assert (got - expected[lname]).abs().max() <= 1e-5, lname
    # and the model output equals the sum of the weighted adapters' effects on a merged model
    x = inputs()
    with torch.no_grad():
        model.set_adapter("mix")
        out_mix = model(*x)
        model.set_adapter(names)
        for layer in (m for _, m in model.base_model.wrappers() if isinstance(m, AdaptedLayer)):
            for n, w in zip(names, weights):
                if n in layer.adapters:
                    layer.adapters[n].scaling *= w
        out_sum = model(*x)
    assert (out_mix - out_sum).abs().max() <= 1e-4


def test_low_rank_svd_is_the_best_approximation():
    model = _three_adapters()
    expected = _delta_sum(model, ["default", "b"], [1.0, 1.0])["lin"]
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=2)
    layer = model.base_model.model.lin
    got = layer.adapters["low"].delta_weight(layer)
    u, s, vh = torch.linalg.svd(expected)
    assert (got - (u[:, :2] * s[:2]) @ vh[:2]).abs().max() <= 1e-5
    assert model.peft_config["low"].r == 2


def test_linear_needs_equal_ranks_and_combines_factors():
    model = _three_adapters()
    with pytest.raises(ConfigError, match="equal rank"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="linear")
    assert "x" not in model.peft_config
    model.add_weighted_adapter(["default", "c"], [1.0, -0.5], "lin", combination_type="linear")
    layer = model.base_model.model.lin
    s1, s2 = layer.adapters["default"].scaling, layer.adapters["c"].scaling
    a = s1 ** 0.5 * layer.adapters["default"].lora_A.weight - (0.5 * s2) ** 0.5 * layer.adapters["c"].lora_A.weight
    assert torch.allclose(layer.adapters["lin"].lora_A.weight, a, atol=1e-6)


def test_merging_errors():
    model = _three_adapters()
    cases = [
        (dict(adapters=["default", "zzz"], weights=[1, 1]), "zzz"),
        (dict(adapters=["default"], weights=[1, 1]), "one weight per adapter"),
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="mean"), "combination_type='mean'"),
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="ties"), "equal rank"),
        (dict(adapters=["default", "c"], weights=[1, 1], combination_type="ties"), "density=None"),
        (dict(adapters=["default", "b"], weights=[1, 1], adapter_name="c"), "already exists"),
        (dict(adapters=["default", "b"], weights=[1, float("nan")]), "nan is not a finite number"),
        (dict(adapters=["default", "b"], weights=[1, "0.5"]), "'0.5' is not a finite number"),
        (dict(adapters=["default", "b"], weights=[1, True]), "True is not a finite number"),
        (dict(adapters=["default", "b"], weights=[1, 1], svd_clamp=1.5), "svd_clamp=1.5 is not valid"),
        (dict(adapters=["default", "b"], weights=[1, 1], svd_clamp=0.0), "svd_clamp=0.0 is not valid"),
        (dict(adapters=["default", "b"], weights=[1, 1], svd_rank=2.5), "svd_rank=2.5 is not valid"),
        # padded with zero directions, a huge rank wrote gigabytes of zeros (peftkit merge --svd-rank 100000)
        (dict(adapters=["default", "b"], weights=[1, 1], svd_rank=13), "svd_rank=13 is more than any adapted layer "
                                                                       "can hold: the widest has 12 singular directions"),
        (dict(adapters=["default", "c"], weights=[1, 1], combination_type="ties", density="0.5"),
         "density='0.5' is not valid"),
        (dict(adapters=["default", "c"], weights=[1, 1], combination_type="dare_linear", density=0.5, seed="x"),
         "seed='x' is not valid"),
        (dict(adapters=["default", "b"], weights=None), "weights=None is not valid; give a list of numbers"),
        (dict(adapters=["default", "b"], weights=[1, 1], svd_full_matrices="no"), "svd_full_matrices='no' must be"),
        (dict(adapters=["default", "b"], weights=[1, 1], svd_driver="qr"), "svd_driver='qr' is not valid"),
        (dict(adapters=["default", "b"], weights=[1, 1], majority_sign_method="bogus", combination_type="cat"),
         "majority_sign_method='bogus' is not valid"),
        # options the combination type does not use are refused, as by `peftkit merge`
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="cat", density=0.3),
         "density=0.3 has no effect with combination_type='cat'; it applies to ties_svd"),
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="cat", svd_rank=2),
         "svd_rank=2 has no effect with combination_type='cat'"),
        (dict(adapters=["default", "c"], weights=[1, 1], combination_type="linear", svd_clamp=0.9),
         "svd_clamp=0.9 has no effect with combination_type='linear'"),
        (dict(adapters=["default", "c"], weights=[1, 1], combination_type="dare_linear", density=0.5,
              majority_sign_method="frequency"),
         "majority_sign_method='frequency' has no effect with combination_type='dare_linear'"),
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="cat", seed=123),
         "seed=123 has no effect with combination_type='cat'"),
        (dict(adapters=["default", "b"], weights=[1, 1], combination_type="cat", modules_to_save_from="b"),
         "modules_to_save_from='b' has no effect: the adapters ['default', 'b'] train no whole modules"),
    ]
    for kw, msg in cases:
        kw.setdefault("adapter_name", "new")
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            model.add_weighted_adapter(**kw)
        assert "new" not in model.peft_config


def test_numpy_and_torch_scalar_weights_are_numbers():
    import numpy as np

    model = _three_adapters()
    model.add_weighted_adapter(["default", "b"], [0.5, 0.25], "plain", combination_type="cat")
    model.add_weighted_adapter(["default", "b"], [np.float32(0.5), torch.tensor(0.25)], "scalars",
                               combination_type="cat")
    # a numpy array or a tensor of weights, as peft takes them (refused for a while as "not a list")
    model.add_weighted_adapter(["default", "b"], np.array([0.5, 0.25]), "array", combination_type="cat")
    model.add_weighted_adapter(["default", "b"], torch.tensor([0.5, 0.25]), "tensor", combination_type="cat")
    for _, layer in model.base_model.wrappers():
        if isinstance(layer, AdaptedLayer) and "plain" in layer.adapters:
            for other in ("scalars", "array", "tensor"):
                assert torch.equal(layer.adapters["plain"].delta_weight(layer), layer.adapters[other].delta_weight(layer))


def test_heads_need_a_source():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    perturb(model)
    with pytest.raises(ConfigError, match="modules_to_save_from"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat",
                               modules_to_save_from="other")
    head = model.base_model.model.classifier
    assert torch.equal(head.modules_to_save["mix"].weight, head.modules_to_save["other"].weight)


def test_non_lora_adapters_are_refused():
    model = _three_adapters()
    model.peft_config["b"] = type("Other", (LoraConfig,), {"peft_type": "OTHER"})(target_modules=["lin"])
    with pytest.raises(ConfigError, match="plain LoRA"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "new", combination_type="cat")
    model.add_adapter("ia3", peftkit.IA3Config(target_modules=["lin"], feedforward_modules=[]))
    with pytest.raises(ConfigError, match=r"adapters \['default'\] are not \(IA\)\^3; add_weighted_adapter combines "
                                          r"\(IA\)\^3 adapters only with each other"):
        model.add_weighted_adapter(["default", "ia3"], [1, 1], "new")
    assert "new" not in model.peft_config


def _ia3_pair(lib, base, ff_b=("down_proj",)):
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(copy.deepcopy(base), lib.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), adapter_name="a")
        model.add_adapter("b", lib.IA3Config(target_modules=["v_proj", "down_proj", "up_proj"],
                                             feedforward_modules=list(ff_b)))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


def test_ia3_adapters_combine_as_in_peft(tmp_path):
    """peft's IA3Model.add_weighted_adapter: at each layer sum_i w_i l_i over the sources there, on the union
    of their layers (it was refused as not LoRA)."""
    import copy

    import peft

    from tests.conftest import ids, tiny_llama

    base = tiny_llama()
    ours, theirs = _ia3_pair(peftkit, base), _ia3_pair(peft, base)
    ours.add_weighted_adapter(["a", "b"], [0.75, -0.5], "mix")
    theirs.add_weighted_adapter(["a", "b"], [0.75, -0.5], "mix")
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    x = ids()
    with torch.no_grad():
        expected = theirs(input_ids=x).logits
        assert (ours(input_ids=x).logits - expected).abs().max() <= 1e-5
    layer = ours.base_model.model.model.layers[0]
    a, b = (layer.mlp.down_proj.adapters[n].ia3_l for n in ("a", "b"))
    torch.testing.assert_close(layer.mlp.down_proj.adapters["mix"].ia3_l, 0.75 * a - 0.5 * b)
    torch.testing.assert_close(layer.self_attn.k_proj.adapters["mix"].ia3_l,  # only 'a' adapts k_proj
                               0.75 * layer.self_attn.k_proj.adapters["a"].ia3_l)
    assert "q_proj" not in str(ours.peft_config["mix"].target_modules)
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix")
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("call, message", [
    (dict(combination_type="cat"), r"\(IA\)\^3 adapters combine only linearly .*got combination_type='cat'"),
    (dict(combination_type="svd"), r"\(IA\)\^3 adapters combine only linearly .*got combination_type='svd'"),
    (dict(density=0.5), r"give no LoRA option; got option\(s\) \['density'\]"),
    (dict(majority_sign_method="frequency"), r"got option\(s\) \['majority_sign_method'\]"),
    (dict(seed=4), r"got option\(s\) \['seed'\]"),
    (dict(ff_b=()), r"on layer 'model.layers.0.mlp.down_proj' the adapters scale different sides"),
])
def test_ia3_combinations_that_cannot_be_made_are_refused(call, message):
    from tests.conftest import tiny_llama

    model = _ia3_pair(peftkit, tiny_llama(), ff_b=call.pop("ff_b", ("down_proj",)))
    with pytest.raises(ConfigError, match=message):
        model.add_weighted_adapter(["a", "b"], [1, 1], "mix", **call)
    assert list(model.peft_config) == ["a", "b"]


def test_adapters_with_trained_biases_are_refused():
    """The combination keeps the low-rank factors only: biases trained with bias='all' would be dropped."""
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], bias="all"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ConfigError, match=r"adapter 'default' trains biases \(bias='all'\)"):
        model.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="cat")
    assert "mix" not in model.peft_config


def test_heads_come_from_an_adapter_that_has_them():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["query"]))  # no head of its own
    with pytest.raises(ConfigError, match=r"modules_to_save_from='plain' has no trained copy of \['classifier'\].*"
                                          r"the adapters that have one: \['default'\]"):
        model.add_weighted_adapter(["default", "plain"], [1, 1], "mix", combination_type="cat",
                                   modules_to_save_from="plain")
    assert "mix" not in model.peft_config


def test_combined_adapter_sits_on_the_source_layers_only():
    """Full layer names as targets are anchored: 'model.lin' does not also select 'other.model.lin' (which
    would get a random adapter), and the combination stays exact."""

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.other = Inner(), torch.nn.Module()
            self.other.model = Inner()

        def forward(self, x):
            return self.other.model.lin(self.model.lin(x))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=r"model\.lin"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=3, target_modules=r"model\.lin"))
    perturb(model)
    model.set_adapter(["a", "b"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    model.add_weighted_adapter(["a", "b"], [1, 1], "ab", combination_type="cat")
    model.set_adapter("ab")
    assert [n for n, w in model.base_model.wrappers() if "ab" in getattr(w, "adapters", {})] == ["model.lin"]
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-5


def test_combined_adapter_keeps_dotted_modules_to_save_names():
    """'pooler.dense' stays 'pooler.dense': cut to 'dense' it wrapped every '*.dense' layer of the model."""
    from transformers import BertModel

    torch.manual_seed(0)
    base = BertModel(tiny_bert_classifier().config)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "attention.output.dense"],
                                            modules_to_save=["pooler.dense"]), adapter_name="x")
    model.add_adapter("y", LoraConfig(r=2, target_modules=["query", "attention.output.dense"],
                                      modules_to_save=["pooler.dense"]))
    model.add_weighted_adapter(["x", "y"], [1, 1], "m", combination_type="cat", modules_to_save_from="x")
    assert model.peft_config["m"].modules_to_save == ["pooler.dense"]
    assert model.base_model.modules_to_save_names() == ["pooler.dense"]


@pytest.mark.parametrize("combination", ["ties_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_svd_rules_work_on_the_scaled_deltas(combination):
    """With different scalings (alpha 8 at r 4, and rsLoRA), the rule sees s B A: before, TIES voted signs on
    the bare B A and differed from TIES on the deltas by about a third of their size."""
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False), "x")
    model.add_adapter("y", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["0"],
                                      init_lora_weights=False))
    layer = model.base_model.model[0]

    def delta(name):
        ad = layer.adapters[name]
        return ad.scaling * ad.lora_B.weight.detach() @ ad.lora_A.weight.detach()

    assert layer.adapters["x"].scaling != layer.adapters["y"].scaling
    model.add_weighted_adapter(["x", "y"], [0.7, 0.3], "m", combination_type=combination, density=0.5, svd_rank=16)
    rule = combination.removesuffix("_svd")
    expected = combine([delta("x"), delta("y")], [0.7, 0.3], rule, density=0.5,
                       generator=torch.Generator().manual_seed(0))
    assert (delta("m") - expected).abs().max() <= 1e-5


def test_a_non_finite_combination_is_refused():
    model = _three_adapters()
    with pytest.raises(ConfigError, match=r"the combination with weights \[1e\+308, 1\] is not finite \(inf or NaN\) "
                                          "on layer"):
        model.add_weighted_adapter(["default", "b"], [1e308, 1], "new", combination_type="svd")
    assert "new" not in model.peft_config


def test_svd_rank_defaults_to_the_largest_rank_rank_patterns_included():
    """peft's default: the largest source rank, rank_pattern values counted (the combination was cut to r)."""
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"],
                                                              rank_pattern={"query": 4}))
    model.add_adapter("b", LoraConfig(r=3, target_modules=["query"]))
    perturb(model)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="svd")
    layer = model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert layer.adapters["mix"].r == 4 and model.peft_config["mix"].r == 4


@pytest.mark.parametrize("combination", ["ties", "magnitude_prune", "dare_linear", "svd", "cat"])
def test_one_source_adapter_is_combined_linearly_as_in_peft(combination):
    """peft combines a single adapter with 'linear' whatever the type: the result is that adapter (scaled by
    its weight). peftkit applied the rule (TIES at density 0.3 pruned 70% of it). A string names one adapter."""
    model = _three_adapters()
    extra = {"density": 0.3} if combination in ("ties", "magnitude_prune", "dare_linear") else {}
    model.add_weighted_adapter("default", [0.5], "one", combination_type=combination, **extra)
    for _, layer in model.base_model.wrappers():
        if isinstance(layer, AdaptedLayer) and "one" in layer.adapters:
            want = 0.5 * layer.adapters["default"].delta_weight(layer)
            assert torch.allclose(layer.adapters["one"].delta_weight(layer), want, atol=1e-6)


def test_a_dora_source_is_named_as_dora():
    model = get_peft_model(Zoo(), LoraConfig(r=2, target_modules=["lin"], use_dora=True), adapter_name="d")
    model.add_adapter("p", LoraConfig(r=2, target_modules=["lin"]))
    with pytest.raises(ConfigError, match="adapter 'd' is LORA with use_dora; add_weighted_adapter combines plain"):
        model.add_weighted_adapter(["d", "p"], [1, 1], "x", combination_type="cat")


def test_combine_checks_its_rule_and_weights():
    with pytest.raises(ConfigError, match="got 2 tensors and 1 weights"):
        combine([T1, T2], [0.5], "linear")  # the one weight was broadcast to both tensors
    with pytest.raises(ConfigError, match="got 2 tensors and 3 weights"):
        combine([T1, T2], [1, 1, 1], "ties", density=1.0)
    with pytest.raises(ConfigError, match="rule='avg' is not a combination rule; expected one of"):
        combine([T1], [1.0], "avg")
