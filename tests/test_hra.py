"""HRA: the reflections against a direct product, exact merging, identity start, counts, training, files (both
ways with peft) and bad values."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, HRAConfig, PeftModel, get_peft_model
from peftkit.methods.hra import gram_schmidt, householder_matrix
from tests.conftest import ids, perturb, tiny_bert_classifier
from tests.interop_util import output, peft_file_in_peftkit, peftkit_file_in_peft
from tests.zoo import Zoo, adapted_zoo, assert_fifty_cycles, assert_merge_exact, train_tiny_bert, zoo_inputs

TARGETS = ["lin", "square", "wide", "conv2"]  # Linear, two GPT-2 Conv1D, an ungrouped Conv2d


def reference_h(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """``H`` straight from the paper's definition, in float64: the product of the reflections in order, or
    ``I - 2 Q Q^T`` for the Gram-Schmidt columns."""
    u = u.detach().double()
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    if apply_gs:
        q, _ = torch.linalg.qr(u)  # the same span, orthonormal: Q Q^T does not depend on the signs
        return eye - 2 * q @ q.T
    h = eye
    for i in range(u.shape[1]):
        v = u[:, i:i + 1] / u[:, i].norm()
        h = h @ (eye - 2 * v @ v.T)
    return h


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))


@pytest.mark.parametrize("apply_gs", [False, True])
def test_householder_matrix_matches_the_product_of_reflections(apply_gs):
    u = torch.randn(9, 4)
    h = householder_matrix(u, apply_gs)
    ref = reference_h(u, apply_gs)
    assert (h.double() - ref).abs().max() <= 1e-5
    assert (h.double() @ h.double().T - torch.eye(9, dtype=torch.float64)).abs().max() <= 1e-5  # orthogonal
    assert (householder_matrix(u, apply_gs, transpose=True).double() - ref.T).abs().max() <= 1e-5


def test_gram_schmidt_columns_are_orthonormal_and_in_order():
    u = torch.randn(7, 3)
    q = gram_schmidt(u)
    assert (q.T @ q - torch.eye(3)).abs().max() <= 1e-5
    assert (q[:, 0] - u[:, 0] / u[:, 0].norm()).abs().max() <= 1e-6  # the first column only normalised


@pytest.mark.parametrize("apply_gs", [False, True])
def test_linear_forward_is_the_weight_times_h(apply_gs):
    model = get_peft_model(nn.Sequential(nn.Linear(10, 5)), HRAConfig(r=4, target_modules=["0"], apply_GS=apply_gs,
                                                                       init_weights=not apply_gs))
    perturb(model)
    layer = model.base_model.model[0]
    x = torch.randn(3, 2, 10)
    w = layer.base_layer.weight.detach().double() @ reference_h(layer.adapters["default"].hra_u, apply_gs)
    expected = x.double() @ w.T + layer.base_layer.bias.detach().double()
    with torch.no_grad():
        assert (model(x).double() - expected).abs().max() <= 1e-5


def test_conv2d_forward_is_the_flattened_kernel_times_h():
    model = get_peft_model(conv_net(), HRAConfig(r=4, target_modules=["0"]))
    perturb(model)
    conv = model.base_model.model[0]
    x = torch.randn(2, 3, 5, 5)
    w = conv.base_layer.weight.detach()
    h = reference_h(conv.adapters["default"].hra_u, False).float()
    rotated = (w.reshape(4, -1) @ h).reshape(w.shape)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, rotated, conv.base_layer.bias, padding=1)
        assert (conv(x) - expected).abs().max() <= 1e-5


def test_initial_adapter_is_the_identity_and_pairs_columns():
    base = tiny_bert_classifier()
    x = ids()
    with torch.no_grad():
        expected = base(input_ids=x).logits
    model = get_peft_model(base, HRAConfig(r=6, target_modules=["query", "value", "dense"]))
    u = model.base_model.model.bert.encoder.layer[0].attention.self.query.adapters["default"].hra_u
    assert u.shape == (16, 6) and torch.equal(u[:, 0::2], u[:, 1::2]) and not torch.equal(u[:, 0], u[:, 2])
    with torch.no_grad():
        assert (model(input_ids=x).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", [dict(), dict(apply_GS=True, init_weights=False), dict(r=3, init_weights=False)])
def test_merge_and_unload_equals_unmerged(kw):
    _, model = adapted_zoo(HRAConfig(**{"r": 4, **kw}, target_modules=TARGETS), groups=1)
    assert_merge_exact(model, zoo_inputs())


@pytest.mark.parametrize("apply_gs", [False, True])
def test_fifty_merge_cycles_restore_base_weights(apply_gs):
    base, model = adapted_zoo(HRAConfig(r=4, apply_GS=apply_gs, init_weights=not apply_gs, target_modules=TARGETS),
                                 groups=1)
    assert_fifty_cycles(base, model, zoo_inputs())


def test_trainable_parameter_count_is_r_times_in():
    model = get_peft_model(Zoo(groups=1), HRAConfig(r=4, target_modules=TARGETS))
    ins = {"lin": 8, "square": 12, "wide": 12, "conv2": 4 * 3 * 3}
    assert model.get_nb_trainable_parameters()[0] == sum(4 * d for d in ins.values()) == 4 * 68


def test_training_reduces_loss_and_only_hra_vectors_get_gradients():
    losses, _ = train_tiny_bert(HRAConfig(r=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS"),
                                "hra_u", steps=60)
    assert losses[-1] < 0.5 * losses[0]


def test_save_and_load_round_trip_with_peft_keys(tmp_path):
    base = Zoo(groups=1)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, HRAConfig(r=4, apply_GS=True, init_weights=False, target_modules=TARGETS))
    perturb(model)
    x = zoo_inputs()
    with torch.no_grad():
        expected = model(*x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HRA" and saved["r"] == 4 and saved["apply_GS"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{t}.hra_u" for t in TARGETS}
    assert tensors["base_model.model.conv2.hra_u"].shape == (36, 4)
    fresh = Zoo(groups=1)
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert (loaded(*x) - expected).abs().max() <= 1e-6


INTEROP = {
    "bert": (tiny_bert_classifier, dict(r=4, target_modules=["query", "value", "dense"], modules_to_save=["classifier"]),
             lambda: dict(input_ids=ids())),
    "bert_gs": (tiny_bert_classifier, dict(r=2, apply_GS=True, init_weights=False, target_modules=["key"],
                                                     task_type="SEQ_CLS"),
                lambda: dict(input_ids=ids())),
    "conv": (conv_net, dict(r=4, target_modules=["0", "3"]), lambda: dict(x=torch.randn(2, 3, 5, 5))),
}


@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_file_loads_in_peft(case, tmp_path):
    make, kw, inputs = INTEROP[case]
    _, expected, theirs = peftkit_file_in_peft(make, HRAConfig(**kw), tmp_path, inputs)
    assert (expected - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_file_loads_in_peftkit(case, tmp_path):
    make, kw, inputs = INTEROP[case]
    expected, ours, x = peft_file_in_peftkit(make, peft.HRAConfig(**kw), tmp_path, inputs)
    assert (expected - output(ours, x)).abs().max() <= 1e-5
    assert (expected - output(ours.merge_and_unload(), x)).abs().max() <= 1e-5


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), "r=0"),
    (dict(r=2.0), "r=2.0"),
    (dict(r=3), "r=3 is odd"),
    (dict(apply_GS="yes"), "apply_GS='yes'"),
    (dict(init_weights=1), "init_weights=1"),
    (dict(bias="all"), "bias='all' is not supported"),
    (dict(bias="hra_only"), "bias='hra_only'"),
    (dict(target_modules=[]), "target_modules"),
])
def test_bad_values_raise_config_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        HRAConfig(**{"target_modules": ["lin"], **kw})


def test_grouped_conv_is_refused_and_model_left_unchanged():
    base = Zoo(groups=2)
    with pytest.raises(ConfigError, match=r"conv2: HRA does not adapt a grouped Conv2d \(groups=2\)"):
        get_peft_model(base, HRAConfig(r=2, target_modules=TARGETS))
    assert isinstance(base.lin, nn.Linear) and isinstance(base.conv2, nn.Conv2d)


def test_conv1d_target_is_refused():
    with pytest.raises(ConfigError, match="conv1"):
        get_peft_model(Zoo(groups=1), HRAConfig(r=2, target_modules=["conv1"]))


def test_gram_schmidt_rank_above_the_input_dimension_is_refused():
    with pytest.raises(ConfigError, match=r"lin: r=10 exceeds the layer's input dimension 8"):
        get_peft_model(Zoo(groups=1), HRAConfig(r=10, apply_GS=True, init_weights=False, target_modules=["lin"]))
    model = get_peft_model(Zoo(groups=1), HRAConfig(r=10, target_modules=["lin"]))  # plain reflections: fine
    assert model.base_model.model.lin.adapters["default"].hra_u.shape == (8, 10)


def test_two_adapters_on_a_convolution_merge_together_exactly():
    """Two substitutions of the kernel (``W H1 H2``) leave the bias alone, so merging both is exact (it was
    refused as if they were rescales reading a bias twice)."""
    model = get_peft_model(conv_net(), HRAConfig(r=2, target_modules=["0"]))
    model.add_adapter("other", HRAConfig(r=4, target_modules=["0"]))
    model.set_adapter(["default", "other"])
    perturb(model)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        both = model(x)
        conv = model.base_model.model[0]
        h1, h2 = (reference_h(conv.adapters[n].hra_u, False).float() for n in ("default", "other"))
        w = conv.base_layer.weight
        expected = torch.nn.functional.conv2d(x, (w.reshape(4, -1) @ h1 @ h2).reshape(w.shape), conv.base_layer.bias,
                                              padding=1)
        assert (conv(x) - expected).abs().max() <= 1e-5
        model.merge_adapter()
        assert (model(x) - both).abs().max() <= 1e-5


def test_a_peft_file_with_an_odd_r_loads(tmp_path):
    """peft only warns on an odd r with init_weights=True and draws every vector at random, which is
    init_weights=False: such a saved file loads (as that), while a new config with it is refused."""
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.HRAConfig(r=3, target_modules=["value"]))
        theirs.save_pretrained(tmp_path)
    x = ids()
    ours = PeftModel.from_pretrained(twin, tmp_path)
    assert ours.peft_config["default"].init_weights is False and ours.peft_config["default"].r == 3
    assert (output(theirs, x) - output(ours, x)).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="r=3 is odd"):
        HRAConfig(r=3, target_modules=["value"])


def test_gram_schmidt_with_the_paired_init_is_refused_but_such_a_saved_file_loads(tmp_path):
    """apply_GS=True with init_weights=True Gram-Schmidts equal columns: a zero residual, so the direction came
    from rounding or was NaN (`peftkit train --method hra --option apply_GS=true` ended with dev accuracy nan)."""
    with pytest.raises(ConfigError, match=r"apply_GS=True with init_weights=True.*give init_weights=False"):
        HRAConfig(r=4, apply_GS=True)
    model = get_peft_model(Zoo(groups=1), HRAConfig(r=4, apply_GS=True, init_weights=False, target_modules=["lin"]))
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**saved, "init_weights": True}))  # as peft writes that pair
    again = PeftModel.from_pretrained(Zoo(groups=1), tmp_path)
    u0 = model.base_model.model.lin.adapters["default"].hra_u
    u1 = again.base_model.model.lin.adapters["default"].hra_u
    assert torch.equal(u0, u1) and not torch.isnan(u1).any()
