"""MoE-LoRA: top-k routing, the dense-expert computation, training, saving, and refusal to merge."""

from __future__ import annotations

import pytest
import torch

from peftkit import ConfigError, MoeLoraConfig, PeftModel, get_peft_model
from tests.conftest import ids, perturb, tiny_llama


def adapted(**kw):
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, MoeLoraConfig(r=2, lora_alpha=4, num_experts=3,
                                               target_modules=["q_proj", "down_proj"], **{"top_k": 2, **kw}))
    perturb(model)
    return model, state


def test_gates_pick_top_k_and_sum_to_one():
    model, _ = adapted()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    gates, probs = layer.adapters["default"].gates(torch.randn(4, 5, 16))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(4, 5))
    top2 = probs.topk(2, -1).indices
    assert torch.equal(gates.gather(-1, top2) > 0, torch.ones_like(top2, dtype=torch.bool))


def test_output_equals_the_explicit_sum_over_selected_experts():
    model, _ = adapted()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    moe = layer.adapters["default"]
    x = torch.randn(2, 3, layer.base_layer.in_features)
    with torch.no_grad():
        got = layer(x)
        gates, _ = moe.gates(x)
        expected = layer.base_layer(x)
        for e in range(3):
            a = moe.lora_A.weight[e * 2:(e + 1) * 2]
            b = moe.lora_B.weight[:, e * 2:(e + 1) * 2]
            expected = expected + moe.scaling * gates[..., e:e + 1] * (x @ a.T @ b.T)
    assert (got - expected).abs().max() <= 1e-6


def test_trainable_count_training_aux_loss_and_save(tmp_path):
    model, state = adapted()
    # q_proj 16->16, down_proj 24->16, 2 layers: E*r*(in+out) + E*in
    per = lambda i, o: 3 * 2 * (i + o) + 3 * i  # noqa: E731
    assert model.get_nb_trainable_parameters()[0] == 2 * (per(16, 16) + per(24, 16))
    model.train()
    x = ids(batch=4, seq=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(15):
        out = model(input_ids=x, labels=x)
        aux = model.peft_regularization()
        assert aux is not None and aux.item() > 0
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path)
    base = tiny_llama()
    base.load_state_dict(state)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()


def test_the_penalty_is_only_from_routers_that_ran_in_the_latest_forward():
    from peftkit import LoraConfig

    model, _ = adapted()
    model.add_adapter("lo", LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter(["default", "lo"])
    model.train()
    x = ids(batch=4, seq=8)
    out = model(input_ids=x, labels=x, adapter_names=["default", "default", "lo", "lo"])
    first = model.peft_regularization()
    assert first is not None and first.item() > 0
    (out.loss + first).backward()
    # no row of the MoE adapter: no router ran, so no penalty (it returned the previous one, whose graph
    # was freed, and the backward failed)
    out = model(input_ids=x, labels=x, adapter_names=["lo", "lo", "lo", "__base__"])
    assert model.peft_regularization() is None
    out.loss.backward()
    with model.disable_adapter():
        model(input_ids=x)
    assert model.peft_regularization() is None
    model(input_ids=x)  # a training forward with the router: the penalty is back, and it is this forward's
    again = model.peft_regularization()
    assert again is not None and again is not first and again.item() > 0
    again.backward()  # its graph is alive
    model.eval()
    model(input_ids=x)
    assert model.peft_regularization() is None


@pytest.mark.parametrize("kw, msg", [(dict(num_experts=1), "num_experts=1"), (dict(top_k=5), "top_k=5"),
                                     (dict(router_aux_loss_coef=-1), "router_aux_loss_coef=-1"),
                                     # LoRA options the experts do not implement are refused, not saved and ignored
                                     (dict(use_dora=True), "use_dora=True"), (dict(use_qalora=True), "use_qalora=True"),
                                     (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
                                     (dict(init_lora_weights="gaussian"), "init_lora_weights='gaussian'")])
def test_bad_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MoeLoraConfig(target_modules=["q_proj"], **kw)


def test_top_1_gates_by_the_router_probability_so_the_router_learns_from_the_task():
    """Renormalised, a top-1 gate is always 1 and the router got no gradient from the task loss (2e-7);
    as in Switch Transformers the one expert is weighted by its probability p_e."""
    model, _ = adapted(top_k=1)
    moe = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    gates, probs = moe.gates(torch.randn(4, 5, 16))
    top = probs.max(-1)
    assert torch.equal(gates.gather(-1, top.indices[..., None])[..., 0], top.values)
    assert ((gates > 0).sum(-1) == 1).all()
    model.train()
    x = ids(batch=2, seq=6)
    model(input_ids=x).logits.pow(2).sum().backward()  # the task loss only, no load-balancing term
    assert moe.lora_router.weight.grad.abs().sum().item() > 1e-3


def test_a_trained_moe_model_deep_copies_and_pickles():
    """The load-balancing term of the last training forward holds its autograd graph; a copy starts without
    it (deepcopy raised "Only Tensors created explicitly by the user support the deepcopy protocol")."""
    import copy
    import io

    model, _ = adapted()
    model.train()
    x = ids(batch=2, seq=6)
    model(input_ids=x, labels=x).loss.backward()
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, twin(input_ids=x).logits)
    moe = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert moe.last_aux is None  # the eval forward let go of the training forward's graph


@pytest.mark.parametrize("bias", ["all", "lora_only", "none"])
def test_the_bias_option_trains_base_biases_as_with_lora(bias):
    """bias="all" was saved in the config and ignored: no bias trained."""
    from peftkit import LoraConfig
    from tests.conftest import tiny_bert_classifier

    counts = []
    for config in (MoeLoraConfig(r=2, num_experts=2, top_k=1, target_modules=["query", "value"], bias=bias),
                   LoraConfig(r=2, target_modules=["query", "value"], bias=bias)):
        torch.manual_seed(0)
        model = get_peft_model(tiny_bert_classifier(), config)
        counts.append(sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")
                             and "lora" not in n))
    assert counts[0] == counts[1]
    assert bool(counts[0]) == (bias != "none")


def test_a_load_balancing_loss_without_gradient_is_refused_with_advice():
    """Under reentrant activation checkpointing the checkpointed layers' first pass runs without autograd:
    peft_regularization() returned a constant and the routers never learned to balance, silently."""
    for reentrant in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), MoeLoraConfig(r=2, num_experts=2, top_k=1, target_modules=["q_proj"],
                                                           router_aux_loss_coef=1.0))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        x = ids()
        model(input_ids=x, labels=x)
        if reentrant:
            with pytest.raises(RuntimeError, match=r"has no gradient .*'use_reentrant': False"):
                model.peft_regularization()
        else:
            model.peft_regularization().backward()
            router = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_router
            assert router.weight.grad.abs().sum() > 0
