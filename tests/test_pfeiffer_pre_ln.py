"""Pfeiffer placement on pre-LN blocks (GPT-2, Llama, ...): AdapterHub computes ``x + u + A(x + u)`` there (its
``bottleneck_layer_forward`` with no LayerNorm: the residual ``u`` is kept, ``A`` reads ``x + u``, and
``post_forward`` adds ``x``), and ``x + u`` is the block's output ``z``: the adapter wraps the block, ``z + A(z)``.
Files saved before ``pre_ln_site`` existed keep the projection placement they were trained with."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit import (
    AdapterDropConfig,
    ConfigError,
    GatedBottleneckConfig,
    LoraConfig,
    ParallelConfig,
    PeftConfig,
    PeftModel,
    PfeifferConfig,
    add_fusion,
    get_peft_model,
)
from peftkit.layers import AdaptedLayer
from tests.conftest import ids, perturb, tiny_gpt2, tiny_llama


def adapted(model: nn.Module) -> list[str]:
    """The adapted modules' names as the model's user sees them (a wrapped block's inner modules by their own)."""
    return [n.replace(".base_layer.", ".") for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def by_hand(a, z: torch.Tensor) -> torch.Tensor:
    """``A(z)`` of a plain ReLU bottleneck, written out."""
    return a.scaling * ((z @ a.adapter_down.weight.T + a.adapter_down.bias).relu() @ a.adapter_up.weight.T
                        + a.adapter_up.bias)


def test_llama_block_is_adapterhubs_x_plus_u_plus_a_of_the_sum():
    model = get_peft_model(tiny_llama(), PfeifferConfig(reduction_factor=4, scaling=0.5))
    perturb(model)
    llama = model.get_base_model().model
    block = llama.layers[1]
    assert type(block.base_layer).__name__ == "LlamaDecoderLayer"
    a = block.adapters["default"]
    assert a.norm_site == "layer" and a.block == 1
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    pos = llama.rotary_emb(x, torch.arange(5)[None])
    with torch.no_grad():
        inner = block.base_layer
        x1 = x + inner.self_attn(inner.input_layernorm(x), position_embeddings=pos, attention_mask=None)[0]
        u = inner.mlp(inner.post_attention_layernorm(x1))
        expected = x1 + u + by_hand(a, x1 + u)
        got = block(x, position_embeddings=pos, attention_mask=None)
        assert (got - expected).abs().max() <= 1e-6
        # ... which is not the projection placement, x1 + u + A(u)
        assert (got - (x1 + u + by_hand(a, u))).abs().max() > 1e-2


def test_gpt2_block_is_adapterhubs_x_plus_u_plus_a_of_the_sum():
    model = get_peft_model(tiny_gpt2(), PfeifferConfig(reduction_factor=4))
    perturb(model)
    assert adapted(model.get_base_model()) == ["transformer.h.0", "transformer.h.1"]
    block = model.get_base_model().transformer.h[0]
    a = block.adapters["default"]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        inner = block.base_layer
        x1 = x + inner.attn(inner.ln_1(x))[0]
        u = inner.mlp(inner.ln_2(x1))
        assert (block(x) - (x1 + u + by_hand(a, x1 + u))).abs().max() <= 1e-6


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_identity_at_init_and_cached_generation_equals_uncached(make):
    base = make()
    x = ids()
    expected = logits(base, x)
    model = get_peft_model(base, PfeifferConfig(reduction_factor=4))
    assert torch.equal(logits(model, x), expected)
    perturb(model)
    assert (logits(model, x) - expected).abs().max() > 1e-3
    prompt = x[:, :3]
    cached = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    with model.disable_adapter():
        base_out = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert not torch.equal(cached, base_out)  # the adapter takes part in generation


def test_attention_adapter_stays_on_its_projection_and_other_family_members_move():
    base = tiny_llama()
    get_peft_model(base, PfeifferConfig(reduction_factor=4, mh_adapter=True))
    assert adapted(base) == ["model.layers.0", "model.layers.0.self_attn.o_proj", "model.layers.1",
                             "model.layers.1.self_attn.o_proj"]
    assert base.model.layers[0].self_attn.o_proj.adapters["default"].norm_site is None
    drop = tiny_llama()
    get_peft_model(drop, AdapterDropConfig(adapterdrop_layers=1, reduction_factor=4))
    assert adapted(drop) == ["model.layers.1"]
    some = tiny_llama()
    get_peft_model(some, PfeifferConfig(reduction_factor=4, layers_to_transform=[0]))
    assert adapted(some) == ["model.layers.0"]
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[5\] keeps no block"):
        get_peft_model(tiny_llama(), PfeifferConfig(layers_to_transform=[5]))


def test_random_adapterdrop_skips_the_lowest_blocks_in_training():
    model = get_peft_model(tiny_llama(), AdapterDropConfig(adapterdrop_layers=1, adapterdrop_mode="random",
                                                           reduction_factor=4))
    perturb(model)
    block = model.get_base_model().model.layers[0]
    a = block.adapters["default"]
    a.drop.n = 1
    model.train()
    x = torch.randn(2, 5, 16)
    pos = model.get_base_model().model.rotary_emb(x, torch.arange(5)[None])
    out = block(x, position_embeddings=pos, attention_mask=None)
    assert torch.allclose(out, block.base_layer(x, position_embeddings=pos, attention_mask=None), atol=0)
    out.sum().backward()
    assert a.adapter_up.weight.grad is not None and not a.adapter_up.weight.grad.any()  # joined at weight zero


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), PfeifferConfig(reduction_factor=4))
        perturb(model)
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).abs().max() <= 1e-6, n


def test_two_active_adapters_stack_and_mixed_batches_match_single_ones():
    model = get_peft_model(tiny_llama(), PfeifferConfig(reduction_factor=4), adapter_name="a")
    model.add_adapter("b", PfeifferConfig(reduction_factor=8))
    perturb(model)
    block = model.get_base_model().model.layers[0]
    x = ids()
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = logits(model, x)
    with model.disable_adapter():
        single["__base__"] = logits(model, x)
    rows = ["b", "__base__", "a"]
    mixed = logits(model, x, adapter_names=rows)
    for i, name in enumerate(rows):
        assert (mixed[i] - single[name][i]).abs().max() <= 1e-6
    model.set_adapter(["a", "b"])
    z = torch.randn(2, 5, 16)
    pos = model.get_base_model().model.rotary_emb(z, torch.arange(5)[None])
    with torch.no_grad():  # z1 = z + A(z), z2 = z1 + B(z1)
        base_out = block.base_layer(z, position_embeddings=pos, attention_mask=None)
        z1 = base_out + by_hand(block.adapters["a"], base_out)
        expected = z1 + by_hand(block.adapters["b"], z1)
        assert (block(z, position_embeddings=pos, attention_mask=None) - expected).abs().max() <= 1e-6


def test_fusion_at_the_block_output():
    model = get_peft_model(tiny_llama(), PfeifferConfig(bottleneck_size=4), adapter_name="a")
    model.add_adapter("b", PfeifferConfig(bottleneck_size=3))
    x = ids()
    model.set_adapter("a")
    perturb(model)
    alone = logits(model, x)
    add_fusion(model, ["a"], "one")
    model.set_adapter("one")
    assert (logits(model, x) - alone).abs().max() <= 1e-6
    add_fusion(model, ["a", "b"], "f")
    model.set_adapter("b")
    perturb(model)
    model.set_adapter("f")
    perturb(model)
    block = model.get_base_model().model.layers[1]
    fuse, a, b = (block.adapters[n] for n in ("f", "a", "b"))
    z = torch.randn(2, 5, 16)
    pos = model.get_base_model().model.rotary_emb(z, torch.arange(5)[None])
    with torch.no_grad():
        h = block.base_layer(z, position_embeddings=pos, attention_mask=None)
        o = torch.stack([by_hand(a, h), by_hand(b, h)], dim=-2)
        scores = torch.einsum("btnd,btd->btn", fuse.fusion_key(o), fuse.fusion_query(h))
        fused = torch.einsum("btn,btnd->btd", scores.softmax(-1), fuse.fusion_value(o))
        assert (block(z, position_embeddings=pos, attention_mask=None) - (h + fused)).abs().max() <= 1e-6


def test_gated_adapter_on_a_llama_classifier_sits_at_the_block_and_is_refused_for_generation():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, pad_token_id=2, num_labels=2)
    base = LlamaForSequenceClassification(cfg).eval()
    x = ids()
    expected = logits(base, x)
    model = get_peft_model(base, GatedBottleneckConfig(reduction_factor=4, task_type="SEQ_CLS"))
    assert adapted(base) == ["model.layers.0", "model.layers.1"]
    assert torch.equal(logits(model, x), expected)
    perturb(model)
    assert (logits(model, x) - expected).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="cannot adapt a model that generates text"):
        get_peft_model(tiny_llama(), GatedBottleneckConfig(task_type="CAUSAL_LM"))


def test_lora_inside_an_adapted_block_keeps_peft_keys_and_unload_restores_the_blocks(tmp_path):
    from safetensors.torch import load_file

    base = tiny_llama()
    model = get_peft_model(base, PfeifferConfig(reduction_factor=4), adapter_name="p")
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    p_keys = sorted(load_file(tmp_path / "p" / "adapter_model.safetensors"))
    assert p_keys[:2] == ["base_model.model.model.layers.0.adapter_down.bias",
                          "base_model.model.model.layers.0.adapter_down.weight"]
    plain = model.unload()
    assert [type(m).__name__ for m in plain.model.layers] == ["LlamaDecoderLayer"] * 2
    assert not adapted(plain)


def fresh_copy(state):
    model = tiny_llama()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("drop", [("pre_ln_site",), ("pre_ln_site", "original_ln_before", "original_ln_after")])
def test_files_saved_before_pre_ln_site_keep_the_projection_placement(tmp_path, drop):
    """A file this code's predecessor saved with original_ln_before=True on a decoder was trained on the FFN's
    projection (the field did not exist then); one older still has neither field."""
    torch.manual_seed(0)
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    before = "original_ln_before" not in drop
    model = get_peft_model(base, PfeifferConfig(reduction_factor=4, pre_ln_site="projection",
                                                original_ln_before=before))
    assert adapted(base) == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    perturb(model)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["pre_ln_site"] == "projection"
    for key in drop:
        del data[key]
    path.write_text(json.dumps(data))
    fresh = fresh_copy(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert loaded.peft_config["default"].pre_ln_site == "projection"
    assert adapted(fresh) == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert torch.equal(logits(loaded, x), expected)


def test_new_files_write_the_layer_site_and_load_back_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, PfeifferConfig(reduction_factor=4))
    perturb(model)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["pre_ln_site"] == "layer"
    fresh = fresh_copy(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert adapted(fresh) == ["model.layers.0", "model.layers.1"]
    assert torch.equal(logits(loaded, x), expected)
    assert PeftConfig.from_dict({"peft_type": "PFEIFFER"}).pre_ln_site == "layer"  # no peft_version: today's


def test_bad_pre_ln_site_and_skip_after_the_adapter_norm_are_refused_before_any_change():
    with pytest.raises(ConfigError, match=r"pre_ln_site='block' is not valid; expected one of \('layer', 'projection'\)"):
        PfeifferConfig(pre_ln_site="block")
    base = tiny_llama()
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ConfigError, match=r"model\.layers\.0: residual_before_ln=False is not supported on a pre-LN"):
        get_peft_model(base, PfeifferConfig(residual_before_ln=False, ln_before=True))
    assert {n: type(m) for n, m in base.named_modules()} == before
    get_peft_model(base, PfeifferConfig(residual_before_ln=False, ln_before=True, pre_ln_site="projection"))
    assert adapted(base) == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]


def test_phi3_parallel_adapter_at_the_attention_reads_the_hidden_size():
    """Phi3Attention registers o_proj (hidden -> hidden) before qkv_proj (hidden -> 3 * hidden): the widths come
    from the model's hidden size, not the registration order."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, pad_token_id=2, bos_token_id=0, eos_token_id=1)
    base = Phi3ForCausalLM(cfg).eval()
    x = ids()
    expected = logits(base, x)
    model = get_peft_model(base, ParallelConfig(mh_adapter=True))
    assert adapted(base) == [f"model.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn", "mlp")]
    attn = base.model.layers[0].self_attn
    assert attn.adapters["default"].width == 16
    assert torch.equal(logits(model, x), expected)
    perturb(model)
    h = torch.randn(2, 5, 16)
    pos = base.model.rotary_emb(h, torch.arange(5)[None])
    with torch.no_grad():
        a = attn.adapters["default"]
        plain = attn.base_layer(h, position_embeddings=pos, attention_mask=None)[0]
        branch = 4.0 * (F.relu(h @ a.adapter_down.weight.T + a.adapter_down.bias) @ a.adapter_up.weight.T
                        + a.adapter_up.bias)
        assert (attn(h, position_embeddings=pos, attention_mask=None)[0] - (plain + branch)).abs().max() <= 1e-6


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_output_hidden_states_are_the_adapted_block_outputs(build):
    """transformers records hidden states with hooks on the block class, i.e. on the wrapped block: each recorded
    state between blocks must be what the next block reads (the output after ``z + A(z)``), not the block's raw
    output."""
    model = get_peft_model(build(), PfeifferConfig(reduction_factor=4))
    perturb(model)
    blocks = [m.base_layer for m in model.modules() if isinstance(m, AdaptedLayer) and hasattr(m, "residual_arg")]
    assert len(blocks) >= 2
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()),
                                         with_kwargs=True) for b in blocks]
    x = ids(2, 6)
    with torch.no_grad():
        states = model(input_ids=x, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    assert len(states) == len(blocks) + 1
    for i in range(1, len(blocks)):  # the state recorded after block i-1 is block i's input
        torch.testing.assert_close(states[i], seen[i], rtol=0, atol=0)
