"""SSF: scale and shift folded exactly into Linear, GPT-2 Conv1D and LayerNorm, with and without bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import ConfigError, PeftModel, SSFConfig, get_peft_model
from peftkit.layers import AdaptedLayer
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.decode_checks import check_decoding, no_eos

CASES = {
    "bert": (tiny_bert_classifier, dict(target_modules=["query", "dense", "LayerNorm"])),
    "gpt2": (tiny_gpt2, dict(target_modules="all-linear")),
    "llama": (tiny_llama, dict(target_modules="all-linear")),  # bias-free layers: the shift becomes a bias
}


def outputs(model, x):
    """Logits and last hidden states together (a tiny BERT classifier's logits alone are ~1e-2)."""
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged_and_fifty_cycles_restore_the_base(case):
    make, kw = CASES[case]
    base = make()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SSFConfig(**kw))
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
    with model.disable_adapter():
        assert (outputs(model, x) - plain).abs().max() <= 1e-5
    model.unmerge_adapter()
    now = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if ".adapters." not in k}
    assert now.keys() == snapshot.keys()  # biases made for a merge are gone again
    assert max((now[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-5
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert (outputs(merged, x) - adapted).abs().max() <= 1e-5


def test_merge_gives_a_bias_free_layer_a_bias_only_while_merged():
    model = get_peft_model(tiny_llama(), SSFConfig(target_modules=["o_proj"]))
    perturb(model)
    layer = model.get_base_model().model.layers[0].self_attn.o_proj
    assert layer.base_layer.bias is None
    model.merge_adapter()
    assert torch.equal(layer.base_layer.bias, layer.adapters["default"].ssf_shift.detach())
    assert not layer.base_layer.bias.requires_grad
    model.unmerge_adapter()
    assert layer.base_layer.bias is None


def test_trainable_count_is_two_per_output_feature():
    model = get_peft_model(tiny_llama(), SSFConfig())
    # per block: q 16, k 8, v 8, o 16, gate 24, up 24, down 16 outputs
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * (16 + 8 + 8 + 16 + 24 + 24 + 16)
    bert = get_peft_model(tiny_bert_classifier(), SSFConfig(target_modules=["LayerNorm"]))
    assert bert.get_nb_trainable_parameters()[0] == 2 * 16 * 5  # embeddings + 2 per block


def test_paper_init_is_near_identity_and_default_init_is_exact():
    base = tiny_gpt2()
    x = ids()
    expected = outputs(base, x)
    exact = get_peft_model(base, SSFConfig())
    assert torch.equal(outputs(exact, x), expected)
    paper = get_peft_model(tiny_gpt2(), SSFConfig(init_ssf_weights="normal"))
    scales = torch.cat([m.ssf_scale for n, m in paper.named_modules() if n.endswith("adapters.default")])
    assert 0.005 < (scales - 1).std().item() < 0.04


def test_training_lowers_the_loss_and_round_trips(tmp_path):
    base = tiny_bert_classifier()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, SSFConfig(task_type="SEQ_CLS"))
    x = torch.randint(3, 64, (8, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        assert all(".ssf_" in n or ".modules_to_save.default." in n
                   for n, p in model.named_parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    model.save_pretrained(tmp_path)
    fresh = tiny_bert_classifier()
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_decoding_with_cache_and_left_padding(make):
    torch.manual_seed(0)
    model = get_peft_model(no_eos(make()), SSFConfig())
    perturb(model, std=0.3)
    check_decoding(model)


def test_bad_values_raise_config_error():
    with pytest.raises(ConfigError, match="init_ssf_weights='uniform'"):
        SSFConfig(init_ssf_weights="uniform")
    with pytest.raises(ConfigError, match="target_modules is required"):
        SSFConfig(target_modules=[])
    with pytest.raises(ConfigError, match="layers_to_transform"):
        SSFConfig(layers_to_transform=[-2])
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(ConfigError, match="elementwise_affine=True"):
        get_peft_model(net, SSFConfig(target_modules=["0", "1"]))
    assert isinstance(net[0], nn.Linear)
