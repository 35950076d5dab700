"""LoRA-FA (frozen A) and DyLoRA (nested ranks): training, counts, merging, ranks, files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftkit import ConfigError, DyLoraConfig, LoraFAConfig, PeftModel, get_peft_model, set_dylora_rank
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.test_lora import TARGETS, Zoo, inputs


def train(model, steps: int = 30, lr: float = 3e-2) -> tuple[list[float], set[str]]:
    x, labels = torch.randint(3, 64, (8, 10)), torch.tensor([0, 1] * 4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], set()
    for _ in range(steps):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        grads |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


# --- LoRA-FA --------------------------------------------------------------------------------------------
def test_lorafa_trains_b_only_and_a_stays_at_its_init():
    model = get_peft_model(tiny_bert_classifier(), LoraFAConfig(r=4, target_modules=["query", "value"],
                                                                task_type="SEQ_CLS"))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    losses, grads = train(model, steps=40)
    assert losses[-1] < 0.8 * losses[0]
    assert grads and all(".lora_B." in n or ".modules_to_save." in n for n in grads)
    assert all(torch.equal(p, a_before[n]) for n, p in model.named_parameters() if "lora_A" in n)


def test_lorafa_count_merge_and_file(tmp_path):
    r = 4
    base = Zoo(groups=2)
    model = get_peft_model(base, LoraFAConfig(r=r, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    # B only: out*r (Linear/Conv1D/embedding dim), out*r/groups for a convolution
    assert model.get_nb_trainable_parameters()[0] == 8 * r + 12 * r + 12 * r + 20 * r + 8 * (r // 2) + 6 * r
    with torch.no_grad():
        expected = model(*inputs())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORAFA"
    loaded = PeftModel.from_pretrained(Zoo(groups=2).requires_grad_(False).eval(), tmp_path, is_trainable=True)
    loaded.base_model.model.load_state_dict(base.state_dict(), strict=False)
    assert isinstance(loaded.peft_config["default"], LoraFAConfig)
    assert all(not p.requires_grad for n, p in loaded.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        assert (model.merge_and_unload()(*inputs()) - expected).abs().max() <= 1e-5


def test_lorafa_on_an_embedding_starts_at_the_base_and_learns():
    """LoRA starts an embedding with A = 0; LoRA-FA freezes A, so it must start with B = 0 instead."""
    model = get_peft_model(tiny_llama(), LoraFAConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    x = ids(batch=2, seq=5)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=x).logits
    with torch.no_grad():
        assert (model(input_ids=x).logits - base).abs().max() == 0
    emb = model.base_model.model.model.embed_tokens.adapters["default"]
    assert emb.lora_embedding_A.abs().min() > 0 and not emb.lora_embedding_A.requires_grad
    model(input_ids=x).logits.square().mean().backward()
    assert emb.lora_embedding_B.grad.abs().max() > 0


def test_lorafa_refuses_qalora():
    with pytest.raises(ConfigError, match="use_qalora=True cannot be combined with LoRA-FA"):
        LoraFAConfig(r=2, target_modules=["q_proj"], use_qalora=True)
    # a config changed after it was built is checked again when it is injected, before the model changes
    config = LoraFAConfig(r=2, target_modules=["q_proj"])
    config.use_qalora = True
    base = tiny_llama()
    with pytest.raises(ConfigError, match="use_qalora=True cannot be combined with LoRA-FA"):
        get_peft_model(base, config)
    config.use_qalora, config.r = False, 0
    with pytest.raises(ConfigError, match="r=0"):
        get_peft_model(base, config)
    assert not any("adapters" in n for n, _ in base.named_modules())


def test_lorafa_with_dora_trains_b_and_magnitude():
    model = get_peft_model(tiny_bert_classifier(), LoraFAConfig(r=2, target_modules=["query"], use_dora=True,
                                                                rank_pattern={"layer.1.attention.self.query": 4}))
    assert model.base_model.model.bert.encoder.layer[1].attention.self.query.adapters["default"].r == 4
    _, grads = train(model, steps=2)
    assert {n.rsplit(".", 2)[-2] if n.endswith("weight") else n.rsplit(".", 1)[-1] for n in grads} == \
        {"lora_B", "lora_magnitude_vector"}


# --- DyLoRA ---------------------------------------------------------------------------------------------
def dylora(**kw):
    model = get_peft_model(tiny_gpt2(), DyLoraConfig(target_modules=["c_attn", "c_proj"], **{"r": 6, **kw}))
    perturb(model)
    return model


def test_dylora_samples_a_rank_per_training_forward_and_only_those_components_learn():
    torch.manual_seed(5)
    model = dylora()
    adapter = model.base_model.model.transformer.h[0].attn.c_attn.adapters["default"]
    model.train()
    seen = set()
    for _ in range(25):
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        k = adapter.rank()
        seen.add(k)
        grad_a = adapter.lora_A.weight.grad
        assert grad_a[:k].abs().sum() > 0 and grad_a[k:].abs().sum() == 0
        model.zero_grad()
    assert seen == set(range(1, 7))
    model.eval()
    assert adapter.rank() == 6


@pytest.mark.parametrize("rslora", [False, True])
def test_dylora_rank_setter_selects_the_first_components(rslora):
    model = dylora(lora_alpha=5, use_rslora=rslora)
    model.eval()
    layer = model.base_model.model.transformer.h[1].attn.c_proj
    adapter = layer.adapters["default"]
    x = torch.randn(2, 3, 16)
    for k in (6, 2, 1):
        set_dylora_rank(model, k)
        with torch.no_grad():
            scale = 5 / (k ** 0.5 if rslora else k)
            manual = layer.base_layer(x) + scale * x @ adapter.lora_A.weight[:k].T @ adapter.lora_B.weight[:, :k].T
            assert (layer(x) - manual).abs().max() <= 1e-5


def test_dylora_merges_exactly_at_the_chosen_rank():
    model = dylora(r=4, rank_pattern={"c_proj": 2})
    model.eval()
    x = ids()
    for k in (3, 1):
        set_dylora_rank(model, k)
        with torch.no_grad():
            before = model(input_ids=x).logits
            model.merge_adapter()
            with pytest.raises(ValueError, match="unmerge it before"):
                set_dylora_rank(model, 2)
            assert (model(input_ids=x).logits - before).abs().max() <= 1e-5
            model.unmerge_adapter()
            assert (model(input_ids=x).logits - before).abs().max() <= 1e-5


def test_dylora_count_training_and_file(tmp_path):
    r = 4
    model = get_peft_model(tiny_bert_classifier(), DyLoraConfig(r=r, target_modules=["query", "value", "classifier"]))
    assert model.get_nb_trainable_parameters()[0] == 4 * r * (16 + 16) + r * (16 + 2)
    losses, grads = train(model, steps=40)
    assert losses[-1] < 0.8 * losses[0]
    assert grads and all(".lora_" in n for n in grads)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DYLORA"
    model.eval()
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    bert = model.base_model.unload()
    assert not bert._forward_pre_hooks  # the sampling hook leaves with the adapter
    loaded = PeftModel.from_pretrained(bert, tmp_path)
    assert not any(m.training for m in loaded.get_base_model().modules())  # adapters follow the eval-mode model
    set_dylora_rank(loaded, 2)
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - expected).abs().max() > 1e-4
        set_dylora_rank(loaded, r)
        assert (loaded(input_ids=x).logits - expected).abs().max() <= 1e-5
    # the rank chosen is saved with the adapter: it reloads at that rank, not at r
    set_dylora_rank(loaded, 2)
    with torch.no_grad():
        at_two = loaded(input_ids=x).logits
    loaded.save_pretrained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["eval_rank"] == 2
    again = PeftModel.from_pretrained(loaded.base_model.unload(), tmp_path / "two")
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, at_two)


@pytest.mark.parametrize("kw, message", [
    (dict(use_dora=True), "use_dora=True is not supported by DyLoRA"),
    (dict(init_lora_weights="pissa"), "not supported by DyLoRA"),
    (dict(lora_bias=True), "lora_bias=True is not supported by DyLoRA"),
    (dict(use_qalora=True), "use_qalora=True is not supported by DyLoRA"),  # was ignored, and saved as True
    (dict(r=0), "r=0 is not valid"),
    (dict(eval_rank=0), "eval_rank=0 is not valid"),
    (dict(eval_rank=1.5), "eval_rank=1.5 is not valid"),
])
def test_dylora_bad_values_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        DyLoraConfig(target_modules=["c_attn"], **kw)


def test_dylora_eval_rank_above_the_largest_rank_is_refused():
    with pytest.raises(ConfigError, match="eval_rank=5 is more than the largest rank of adapter 'default', 4"):
        get_peft_model(tiny_llama(), DyLoraConfig(r=4, eval_rank=5, target_modules=["q_proj"]))


def test_dylora_rank_setter_errors():
    model = dylora()
    for bad in (0, 7, 2.5):
        with pytest.raises(ConfigError, match=f"rank={bad!r} is not valid"):
            set_dylora_rank(model, bad)
    with pytest.raises(ConfigError, match="unknown adapter"):
        set_dylora_rank(model, 2, "nope")
    lora = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraFAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="is not a DyLoRA adapter"):
        set_dylora_rank(lora, 1)


def test_dylora_state_goes_with_a_deep_copy():
    """The rank state was kept by the tuner under the original model: on a ``copy.deepcopy`` ``set_dylora_rank``
    failed ("not a DyLoRA adapter") and ``unload`` left the sampling hook on the returned model."""
    import copy

    model = dylora(r=4)
    twin = copy.deepcopy(model)
    set_dylora_rank(twin, 2)
    assert twin.peft_config["default"].eval_rank == 2 and model.peft_config["default"].eval_rank is None
    state, original = twin.base_model.tuner_state["default"], model.base_model.tuner_state["default"]
    assert (state.rank, original.rank) == (2, 4) and state is not original
    layer = twin.base_model.model.transformer.h[0].attn.c_attn.adapters["default"]
    assert layer.ranks is state  # the copy's layers read the copy's state
    plain = twin.unload()
    assert not plain._forward_pre_hooks and len(model.get_base_model()._forward_pre_hooks) == 1


def test_a_frozen_dylora_adapter_keeps_its_chosen_rank_in_training_mode(tmp_path):
    """Only an adapter that trains samples its rank: one loaded for inference (beside a head or another adapter
    that trains) used a random rank in each training-mode forward instead of the one chosen with set_dylora_rank."""
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), DyLoraConfig(r=4, lora_alpha=3, target_modules=["0"]))
    perturb(model)
    set_dylora_rank(model, 2)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(model.base_model.unload(), tmp_path)
    layer = loaded.base_model.model[0]
    a, b = layer.adapters["default"].lora_A.weight, layer.adapters["default"].lora_B.weight
    x = torch.randn(5, 8)
    expected = layer.base_layer(x) + (3 / 2) * x @ a[:2].T @ b[:, :2].T  # lora_alpha / k
    loaded.train()
    with torch.no_grad():
        for _ in range(10):
            assert (loaded(x) - expected).abs().max() <= 1e-6
