"""MoE-LoRA: top-k routing, the dense-expert computation, training, saving, and refusal to merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


def _routed_inputs(model):
    """Record the input of every MoE-LoRA layer per call: {layer: [x, ...]}, and the hook handles."""
    seen, handles = {}, []
    for _, layer in model.base_model.wrappers():
        if "default" in getattr(layer, "adapters", {}):
            seen[layer] = []
            handles.append(layer.register_forward_hook(lambda m, a, out: seen[m].append(a[0].detach())))
    return seen, handles


def _hand_term(moe, tokens):
    """E * sum_e f_e * P_e over ``tokens: (n, in)``, as Switch Transformers writes it (f_e: share of the top-k
    slots, P_e: mean router probability)."""
    gates, probs = moe.gates(tokens)
    return moe.num_experts * ((gates > 0).float().mean(0) / moe.top_k * probs.mean(0)).sum()


def _padded_batch():
    lengths = [8, 5, 3, 6]
    x = ids(batch=4, seq=8)
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()
    return x.masked_fill(mask == 0, 0), mask, lengths


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_load_balancing_loss_counts_only_the_real_tokens_of_a_padded_batch(checkpointing):
    """Padding tokens were routed and counted: with a quarter of this batch padding, the term moved by
    ~1e-2 of its value. Reference: each row run alone, unpadded, its tokens' routing pooled by hand."""
    model, _ = adapted(router_aux_loss_coef=0.5)
    if checkpointing:  # the layers run again in backward(), after the call and its mask are gone
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    x, mask, lengths = _padded_batch()
    seen, handles = _routed_inputs(model)
    with torch.no_grad():
        for row, n in enumerate(lengths):
            model(input_ids=x[row:row + 1, :n])
    expected = 0.5 * torch.stack([_hand_term(layer.adapters["default"], torch.cat([t.reshape(-1, t.shape[-1])
                                                                                   for t in calls]))
                                  for layer, calls in seen.items()]).mean()
    for h in handles:
        h.remove()
    out = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
    got = model.peft_regularization()
    assert abs(got.item() - expected.item()) <= 1e-6
    out.loss.backward()  # a recomputation in backward() leaves the forward's record as it was
    assert model.peft_regularization().item() == got.item()
    model(input_ids=x, labels=x)
    assert abs(model.peft_regularization().item() - got.item()) > 1e-5  # the padding did count before
    # the router's gradient from the term is the same with and without recomputation in backward
    routers = [layer.adapters["default"].lora_router.weight for layer in seen]
    model(input_ids=x, attention_mask=mask)
    grads = torch.autograd.grad(model.peft_regularization(), routers)
    model.gradient_checkpointing_disable()
    model(input_ids=x, attention_mask=mask)
    plain = torch.autograd.grad(model.peft_regularization(), routers)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, plain, strict=True))
    assert all(g.abs().sum() > 0 for g in grads)


def test_without_a_mask_or_with_all_ones_every_token_counts_as_before():
    model, _ = adapted()
    model.train()
    x = ids(batch=3, seq=6)
    seen, handles = _routed_inputs(model)
    model(input_ids=x)
    for h in handles:
        h.remove()
    before = 0.01 * torch.stack([_hand_term(layer.adapters["default"], calls[0].reshape(-1, calls[0].shape[-1]))
                                 for layer, calls in seen.items()]).mean()
    plain = model.peft_regularization()
    assert abs(plain.item() - before.item()) <= 1e-7
    model(input_ids=x, attention_mask=torch.ones_like(x))
    assert abs(model.peft_regularization().item() - plain.item()) <= 1e-7
    x, mask, _ = _padded_batch()
    model(input_ids=x, attention_mask=mask)
    keyword = model.peft_regularization().item()
    model(x, mask)  # a positional mask is read too
    assert abs(model.peft_regularization().item() - keyword) <= 1e-7
    model(x)
    assert abs(model.peft_regularization().item() - keyword) > 1e-5


def test_a_mixed_batch_counts_the_real_tokens_of_the_moe_rows_only():
    from peftkit import LoraConfig

    model, _ = adapted()
    model.add_adapter("lo", LoraConfig(r=2, target_modules=["q_proj"]))
    model.train()
    x, mask, _ = _padded_batch()
    names = ["lo", "default", "lo", "default"]  # scattered: the forward regroups the rows (and the mask)
    model(input_ids=x, attention_mask=mask, adapter_names=names)
    mixed = model.peft_regularization()
    model.set_adapter("default")
    model(input_ids=x[[1, 3]], attention_mask=mask[[1, 3]])
    alone = model.peft_regularization()
    assert abs(mixed.item() - alone.item()) <= 1e-6
    model(input_ids=x[[1, 3]])
    assert abs(model.peft_regularization().item() - alone.item()) > 1e-5


def test_a_model_from_inject_adapter_in_model_records_the_load_balancing_term():
    """Only a PeftModel call counted as a forward: an injected model's routers kept no term (last_aux None)."""
    from peftkit import inject_adapter_in_model

    torch.manual_seed(0)
    model = inject_adapter_in_model(MoeLoraConfig(r=2, target_modules=["0"]), nn.Sequential(nn.Linear(8, 8)))
    model.train()
    x = torch.randn(2, 3, 8)
    model(x).sum().backward()
    moe = model[0].adapters["default"]
    assert moe.last_aux is not None
    assert abs(moe.last_aux.item() - _hand_term(moe, x.reshape(-1, 8)).item()) <= 1e-6
    assert moe.last_aux.requires_grad
