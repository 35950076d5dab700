"""LLaMA-Adapter (``AdaptionPromptConfig``, peft's ``ADAPTION_PROMPT``) on tiny random decoders: the zero gate
gives the base model exactly, files move both ways with the ``peft`` package, training moves the output,
cached generation equals step-by-step decoding, and what it cannot adapt or merge is refused."""

from __future__ import annotations

import copy
import json
import math
import warnings

import peft
import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.config import ConfigError
from tests.conftest import ids, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.decode_checks import check_decoding, no_eos


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return MistralForCausalLM(cfg).eval()


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
PEFT_MODELS = ["llama", "mistral", "gpt2"]  # peft 0.21.2's TRANSFORMERS_MODEL_CONFIG
ATTN = {"llama": "self_attn", "mistral": "self_attn", "qwen2": "self_attn", "gpt2": "attn"}


def _logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def _open_gates(model, gate: float = 1.5) -> None:
    """A trained-looking adapter: every gate at ``gate`` (the prompts are already N(0, 1))."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(gate)


def _adapted(model, **kw):
    return peftkit.get_peft_model(model, peftkit.AdaptionPromptConfig(task_type="CAUSAL_LM", **kw))


@pytest.mark.parametrize("arch", list(MODELS))
def test_zero_gate_is_the_base_model_and_an_open_one_is_not(arch):
    base = MODELS[arch]()
    x = ids()
    expected = _logits(base, x)
    model = _adapted(base, adapter_len=4, adapter_layers=2)
    # exactly: the gate multiplies the prompt's whole contribution, and it starts at zero
    assert torch.equal(_logits(model, x), expected)
    _open_gates(model)
    assert (_logits(model, x) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(_logits(model, x), expected)


@pytest.mark.parametrize("arch", list(MODELS))
def test_only_the_top_layers_get_a_prompt_and_the_count_is_the_formula(arch):
    model = _adapted(MODELS[arch](), adapter_len=5, adapter_layers=1)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    block = "model.layers.1" if arch != "gpt2" else "transformer.h.1"
    assert names == [f"base_model.model.{block}.{ATTN[arch]}.adapters.default.adaption_gate",
                     f"base_model.model.{block}.{ATTN[arch]}.adapters.default.adaption_prompt"]
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 1 * (5 * 16 + 1)  # adapter_layers * (adapter_len * hidden_size + 1)
    config = model.peft_config["default"]
    assert config.target_modules == ATTN[arch] and config.adapter_layers == 1
    # None (the CLI's default) adapts every block and writes their number into the config
    every = _adapted(MODELS[arch](), adapter_len=2)
    assert every.peft_config["default"].adapter_layers == 2
    assert every.get_nb_trainable_parameters()[0] == 2 * (2 * 16 + 1)


def test_the_file_holds_peft_keys_and_shapes(tmp_path):
    model = _adapted(tiny_llama(), adapter_len=3, adapter_layers=2)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.adaption_{p}": s
        for i in (0, 1) for p, s in (("prompt", (1, 3, 16)), ("gate", (1,)))}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT" and saved["adapter_len"] == 3 and saved["adapter_layers"] == 2
    assert saved["target_modules"] == "self_attn"


@pytest.mark.parametrize("arch", PEFT_MODELS)
def test_peftkit_adapter_loads_in_peft(arch, tmp_path):
    base = MODELS[arch]()
    twin = copy.deepcopy(base)
    ours = _adapted(base, adapter_len=3, adapter_layers=2)
    _open_gates(ours)
    x = ids()
    expected = _logits(ours, x)
    assert (expected - _logits(twin, x)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - _logits(theirs, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", PEFT_MODELS)
def test_peft_adapter_loads_in_peftkit(arch, tmp_path):
    base = MODELS[arch]()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1,
                                                                     task_type="CAUSAL_LM"))
        _open_gates(theirs, gate=-2.0)
        theirs.save_pretrained(tmp_path)
    x = ids()
    expected, bare = _logits(theirs, x), _logits(twin, x)
    ours = peftkit.PeftModel.from_pretrained(twin, tmp_path)
    assert ours.peft_config["default"].adapter_len == 4
    got = _logits(ours, x)
    assert (expected - got).abs().max() <= 1e-5 and (got - bare).abs().max() > 1e-3


def test_qwen2_which_peft_refuses_round_trips_in_peftkit(tmp_path):
    base = tiny_qwen2()
    twin = copy.deepcopy(base)
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'qwen2'"):
        peft.get_peft_model(copy.deepcopy(base), peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    ours = _adapted(base, adapter_len=3, adapter_layers=2)
    _open_gates(ours)
    x = ids()
    expected = _logits(ours, x)
    ours.save_pretrained(tmp_path)
    again = peftkit.PeftModel.from_pretrained(twin, tmp_path)
    assert torch.equal(_logits(again, x), expected)


def test_the_prompt_attends_as_the_paper_says():
    """One layer by hand: ``W_o concat_h(g softmax(q (P W_k)^T / sqrt(d_h)) P W_v)`` added to the attention's
    output, with Llama's rotary queries and the grouped key/value heads repeated."""
    base = tiny_qwen2()  # 4 query heads sharing 2 key/value heads, with q/k/v biases
    model = _adapted(base, adapter_len=3, adapter_layers=1)
    _open_gates(model, gate=0.7)
    layer = model.get_base_model().model.layers[1].self_attn
    attn, adapter = layer.base_layer, layer.adapters["default"]
    h = torch.randn(2, 5, 16)
    pos = torch.arange(5)[None].expand(2, 5)
    cos, sin = model.get_base_model().model.rotary_emb(h, pos)
    with torch.no_grad():
        got = layer(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
        plain = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)[0]
        q = attn.q_proj(h).view(2, 5, 4, 4).transpose(1, 2)
        half = torch.cat((-q[..., 2:], q[..., :2]), dim=-1)
        q = q * cos[:, None] + half * sin[:, None]
        p = adapter.adaption_prompt[0]
        k = attn.k_proj(p).view(3, 2, 4).transpose(0, 1).repeat_interleave(2, dim=0)  # (4, 3, 4)
        v = attn.v_proj(p).view(3, 2, 4).transpose(0, 1).repeat_interleave(2, dim=0)
        w = 0.7 * torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)  # sqrt(head_dim 4) = 2
        want = plain + attn.o_proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
    assert (got - want).abs().max() <= 1e-6 and (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_moves_the_output_and_only_the_prompts_and_gates_train(arch):
    base = MODELS[arch]()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = _adapted(base, adapter_len=4, adapter_layers=2)
    model.train()
    x = ids(4, 8)
    start = _logits(model, x)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for step in range(12):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if step == 0:
            grads = {n.rsplit(".", 1)[-1]: p.grad for n, p in model.named_parameters() if p.requires_grad}
            # zero-init attention: at gate 0 only the gates get a gradient, the prompts none yet
            assert grads["adaption_gate"].abs().max() > 0 and torch.equal(grads["adaption_prompt"],
                                                                          torch.zeros_like(grads["adaption_prompt"]))
            assert all(p.grad is None for p in base.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    assert (_logits(model, x) - start).abs().max() > 1e-3
    after = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters()
             if "adaption" not in n}
    assert after.keys() == before.keys() and all(torch.equal(p, before[n]) for n, p in after.items())


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_cached_generation_equals_stepwise_decoding_and_padded_batches_equal_rows(arch):
    model = _adapted(MODELS[arch](), adapter_len=4, adapter_layers=2)
    _open_gates(model, gate=3.0)
    check_decoding(no_eos(model))


def test_mixed_adapter_batch_rows_match_each_adapter_alone():
    model = _adapted(tiny_llama(), adapter_len=3, adapter_layers=2)
    model.add_adapter("other", peftkit.AdaptionPromptConfig(adapter_len=5, adapter_layers=1))
    _open_gates(model)
    x = ids(3, 6)
    rows = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        rows[name] = _logits(model, x)
    with model.disable_adapter():
        rows["__base__"] = _logits(model, x)
    names = ["other", "__base__", "default"]
    mixed = _logits(model, x, adapter_names=names)
    for i, name in enumerate(names):
        assert (mixed[i] - rows[name][i]).abs().max() <= 1e-6, name
    assert (rows["other"] - rows["default"]).abs().max() > 1e-3


def test_with_lora_on_the_attention_inside():
    """A LoRA on q_proj/v_proj inside an adapted attention composes: removing either gives the other alone."""
    base = tiny_llama()
    x = ids()
    bare = _logits(base, x)
    model = _adapted(base, adapter_len=3, adapter_layers=2)
    model.add_adapter("lora", peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    _open_gates(model)
    model.set_adapter(["default", "lora"])
    both = _logits(model, x)
    model.set_adapter("default")
    prompt_only = _logits(model, x)
    model.set_adapter("lora")
    lora_only = _logits(model, x)
    assert min((both - prompt_only).abs().max(), (both - lora_only).abs().max()) > 1e-4
    model.delete_adapter("lora")
    model.set_adapter("default")
    assert torch.equal(_logits(model, x), prompt_only)
    plain = model.unload()
    assert not any("AdaptionPrompt" in type(m).__name__ for m in plain.modules())
    assert torch.equal(_logits(plain, x), bare)


def test_merging_is_refused_and_changes_nothing():
    model = _adapted(tiny_llama(), adapter_len=2, adapter_layers=1)
    _open_gates(model)
    x = ids()
    expected = _logits(model, x)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(_logits(model, x), expected)


def test_models_it_cannot_adapt_are_refused_before_anything_changes():
    bert = tiny_bert_classifier()
    before = {n: type(m) for n, m in bert.named_modules()}
    with pytest.raises(ConfigError, match=r"decoder-only language models of types \['gpt2', 'llama', 'mistral', "
                                          r"'qwen2'\], and this model's type is 'bert' \(an encoder"):
        peftkit.get_peft_model(bert, peftkit.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    assert {n: type(m) for n, m in bert.named_modules()} == before
    llama = tiny_llama()
    with pytest.raises(ConfigError, match="adapter_layers=3 is more than the 2 'self_attn' modules this model has; "
                                          "use at most 2"):
        peftkit.get_peft_model(llama, peftkit.AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    with pytest.raises(ConfigError, match=r"target_modules='mlp': a LlamaMLP is not the attention an adaption prompt "
                                          r"reads|model\.layers\.1\.mlp: a LlamaMLP is not the attention"):
        peftkit.get_peft_model(llama, peftkit.AdaptionPromptConfig(adapter_len=2, adapter_layers=1,
                                                                   target_modules="mlp"))
    with pytest.raises(ConfigError, match="target_modules='attention' matches no module"):
        peftkit.get_peft_model(llama, peftkit.AdaptionPromptConfig(adapter_len=2, target_modules="attention"))
    assert not any("AdaptionPrompt" in type(m).__name__ for m in llama.modules())
    with pytest.raises(ConfigError, match="not a transformers model"):
        peftkit.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                               peftkit.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))


@pytest.mark.parametrize("kw, message", [
    ({}, "adapter_len=None: give the number of adaption prompt tokens"),
    ({"adapter_len": 0}, "adapter_len=0 is not valid; expected a positive integer"),
    ({"adapter_len": 2.5}, "adapter_len=2.5 is not valid"),
    ({"adapter_len": 2, "adapter_layers": 0}, "adapter_layers=0 is not valid; expected a positive integer"),
    ({"adapter_len": 2, "target_modules": ""}, "target_modules='' is not valid"),
    ({"adapter_len": 2, "target_modules": ["self_attn"]}, "target_modules=\\['self_attn'\\] is not valid"),
])
def test_bad_values_are_refused_naming_them(kw, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.AdaptionPromptConfig(**kw)


@pytest.mark.slow
def test_cli_trains_on_stories260k_and_perplexity_drops(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--method", "adaption-prompt", "--max-steps", "20",
                 "--max-train-samples", "320", "--max-eval-samples", "48", "--output-dir", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20
    # at the default learning rate 1e-1 (measured: 1054 -> 41)
    assert metrics["dev_perplexity"] < 0.1 * metrics["dev_perplexity_before"] and metrics["lr"] == 0.1
    assert metrics["trainable_params"] == 5 * (10 * 64 + 1)  # 5 blocks, 10 tokens, hidden 64
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT" and saved["adapter_layers"] == 5 and saved["adapter_len"] == 10
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_perplexity  {metrics['dev_perplexity']:.4f}" in capsys.readouterr().out
    assert math.isfinite(metrics["dev_perplexity"])


def test_cli_refuses_a_classification_run_on_an_encoder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--method", "adaption-prompt", "--max-steps", "1",
                 "--max-train-samples", "8", "--max-eval-samples", "8", "--output-dir", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "decoder-only language models" in err and "model's type is 'bert'" in err and "--task causal-lm" in err
    assert not out.exists()


def test_methods_lists_it(capsys):
    assert main(["methods"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("adaption-prompt "))
    assert " additive " in line and "arXiv:2303.16199" in line and " no " in line
