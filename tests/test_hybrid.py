"""UniPELT (gated LoRA + gated prefix + gated adapter) and the MAM adapter (prefix + scaled parallel
adapter), both compositions; and the gated sub-modules on their own."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from peftkit import (
    ConfigError,
    GatedBottleneckConfig,
    GatedLoraConfig,
    GatedPrefixTuningConfig,
    ParallelConfig,
    PeftModel,
    PrefixTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
    mam_config,
    set_peft_model_state_dict,
    unipelt_config,
)
from peftkit.cli import main
from peftkit.methods.gating import SequenceMask
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_llama

D, N = 16, 2  # the tiny BERT's hidden size and blocks


def unipelt(**kw):
    return unipelt_config(r=2, num_virtual_tokens=3, encoder_hidden_size=8, reduction_factor=4, **kw)


def adapted(config, std: float = 0.3):
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, config)
    perturb(model, std)
    return model, twin


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def padded_batch():
    x = ids(3, 7)
    mask = torch.ones_like(x)
    mask[0, 4:] = 0
    mask[2, 6:] = 0
    return x, mask


def test_unipelt_gates_lie_in_0_1_one_per_example_and_sub_module(monkeypatch):
    seen = []
    pool = SequenceMask.pool

    def spy(self, g):
        out = pool(self, g)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(SequenceMask, "pool", spy)
    model, _ = adapted(unipelt(task_type="SEQ_CLS"), std=2.0)
    x, mask = padded_batch()
    logits(model, x, attention_mask=mask)
    # per block: query and value LoRA gates, one prefix gate, one adapter gate
    assert len(seen) == N * 4
    for g in seen:
        assert g.shape == (3, 1) and (g >= 0).all() and (g <= 1).all()
    assert max(float(g.std()) for g in seen) > 1e-3  # the gates depend on the example


def test_unipelt_every_part_and_gate_gets_gradients_and_nothing_else():
    model, _ = adapted(unipelt(task_type="SEQ_CLS"))
    model.train()
    x, mask = padded_batch()
    model(input_ids=x, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == trainable
    for piece in ("lora_A", "lora_B", "lora_gate", "embedding", "transform", "prefix_gate", "adapter_down",
                  "adapter_up", "adapter_gate", "modules_to_save"):
        assert any(piece in n for n in grads), piece


def test_unipelt_trainable_count_is_the_formula():
    r, p, h, m = 2, 3, 8, 4
    model = get_peft_model(tiny_bert_classifier(), unipelt(task_type="SEQ_CLS"))
    lora = N * 2 * (r * (D + D) + D + 1)  # query and value, each with its gate
    kv = 2 * N * D
    prefix = p * D + (D * h + h) + (h * kv + kv) + N * (D + 1)  # table, MLP, per-layer gates
    adapter = N * (2 * D * m + m + D + D + 1)
    assert model.get_nb_trainable_parameters()[0] == lora + prefix + adapter + D * 2 + 2


def test_unipelt_pools_gates_over_real_tokens_only():
    model, _ = adapted(unipelt(task_type="SEQ_CLS"))
    x, mask = padded_batch()
    batch = logits(model, x, attention_mask=mask)
    for i in range(3):
        real = int(mask[i].sum())
        alone = logits(model, x[i:i + 1, :real])
        assert (batch[i] - alone[0]).abs().max() <= 1e-5


def test_a_unipelt_copy_or_pickle_runs_on_its_own_gates():
    """The prefix gates' attention hooks were closures: a deep copy's hooks read the original's gate (the original
    got the copy's gradient) and mask (None: the copy pooled over padding); torch.save(model) failed on them."""
    import io

    model, _ = adapted(unipelt(task_type="SEQ_CLS"))
    x, mask = padded_batch()
    want = logits(model, x, attention_mask=mask)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert (logits(other, x, attention_mask=mask) - want).abs().max() <= 1e-6
    twin(input_ids=x, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss.backward()
    gate = next(p for n, p in model.named_parameters() if n.endswith("prefix_gate.weight"))
    twin_gate = next(p for n, p in twin.named_parameters() if n.endswith("prefix_gate.weight"))
    assert gate.grad is None and twin_gate.grad is not None and twin_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("config", [GatedLoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False),
                                    GatedBottleneckConfig(bottleneck_size=4, mh_adapter=True)],
                         ids=["lora", "adapter"])
def test_a_closed_gate_switches_its_sub_module_off(config):
    model, twin = adapted(config)
    x = ids()
    assert (logits(model, x) - twin(input_ids=x).logits).abs().max() > 1e-4
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate.bias"):
                p.fill_(-1e4)
    assert (logits(model, x) - twin(input_ids=x).logits).abs().max() <= 1e-6


def test_prefix_gate_scales_the_prefix_keys_and_values():
    """With the gate forced to 1 the gated prefix is plain prefix tuning with the same prefixes."""
    gated, twin = adapted(GatedPrefixTuningConfig(num_virtual_tokens=3))
    plain = get_peft_model(twin, PrefixTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        plain.base_model.extra_modules["default"].embedding.weight.copy_(
            gated.base_model.extra_modules["default"].embedding.weight)
        gated.base_model.extra_modules["default"].prefix_gate.bias.fill_(1e4)
    x = ids()
    assert (logits(gated, x) - logits(plain, x)).abs().max() <= 1e-6
    with torch.no_grad():
        gated.base_model.extra_modules["default"].prefix_gate.bias.fill_(-2.0)
    assert (logits(gated, x) - logits(plain, x)).abs().max() > 1e-4


@pytest.mark.parametrize("make", [unipelt, mam_config], ids=["unipelt", "mam"])
def test_save_and_load_round_trip_exactly(make, tmp_path):
    config = make(task_type="SEQ_CLS") if make is unipelt else mam_config(num_virtual_tokens=3, encoder_hidden_size=8,
                                                                          task_type="SEQ_CLS")
    model, twin = adapted(config)
    x, mask = padded_batch()
    out = logits(model, x, attention_mask=mask)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "COMPOSED"
    loaded = PeftModel.from_pretrained(twin, tmp_path)
    assert (logits(loaded, x, attention_mask=mask) - out).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_adapter()


def test_mam_equals_prefix_and_parallel_adapter_applied_together():
    model, twin = adapted(mam_config(num_virtual_tokens=3, encoder_hidden_size=8, reduction_factor=4))
    x, mask = padded_batch()
    mam = logits(model, x, attention_mask=mask)
    state = get_peft_model_state_dict(model)
    apart = get_peft_model(twin, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
                           adapter_name="prefix")
    apart.add_adapter("parallel", ParallelConfig(reduction_factor=4, scaling=4.0))
    for i, name in enumerate(("prefix", "parallel")):
        head = f"parts.{i}."
        set_peft_model_state_dict(apart, {k[len(head):]: v for k, v in state.items() if k.startswith(head)}, name)
    apart.set_adapter(["prefix", "parallel"])
    assert (logits(apart, x, attention_mask=mask) - mam).abs().max() <= 1e-6
    apart.set_adapter("prefix")
    assert (logits(apart, x, attention_mask=mask) - mam).abs().max() > 1e-4


def test_mam_trainable_count_is_the_formula():
    p, h, m = 3, 8, 4
    model = get_peft_model(tiny_bert_classifier(), mam_config(num_virtual_tokens=p, encoder_hidden_size=h,
                                                              reduction_factor=4))
    kv = 2 * N * D
    assert model.get_nb_trainable_parameters()[0] == p * D + (D * h + h) + (h * kv + kv) + N * (2 * D * m + m + D)


@pytest.mark.parametrize("make", [
    lambda task: unipelt(task_type=task),
    lambda task: GatedLoraConfig(r=2, target_modules=["q_proj"], task_type=task),
    lambda task: GatedBottleneckConfig(bottleneck_size=4, target_modules=["mlp"], task_type=task),
    lambda task: GatedPrefixTuningConfig(num_virtual_tokens=3, task_type=task),
])
@pytest.mark.parametrize("task", ["CAUSAL_LM", None])
def test_gated_methods_refuse_a_model_that_generates(make, task):
    """A gate averages a sequence's tokens: on a causal LM every position saw later tokens (logits of the first 5
    tokens moved by up to 0.24 when 5 more followed) and cached generation differed from a full forward. Refused,
    by task type or, without one, by the model's can_generate(); nothing changes."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"\(UniPELT\) cannot adapt a model that generates text \((task_type="
                                          r"'CAUSAL_LM'|LlamaForCausalLM)\): its gates average"):
        get_peft_model(model, make(task))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())


def test_gated_adapters_refuse_mixed_adapter_batches():
    model, _ = adapted(GatedLoraConfig(r=2, target_modules=["query"]))
    model.add_adapter("other", GatedLoraConfig(r=2, target_modules=["value"]))
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(input_ids=ids(2), attention_mask=torch.ones(2, 7, dtype=torch.long), adapter_names=["default", "other"])


@pytest.mark.parametrize("kw, fragment", [({"use_dora": True}, "gated LoRA is plain LoRA"),
                                          ({"init_lora_weights": "pissa"}, "not valid for gated LoRA")])
def test_bad_gated_lora_values(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GatedLoraConfig(target_modules=["query"], **kw)


def test_deleting_a_gated_adapter_removes_its_hooks():
    base = tiny_bert_classifier()
    model = get_peft_model(base, unipelt())
    model.delete_adapter("default")
    assert not base._forward_pre_hooks and not base._forward_hooks
    assert not any(m._forward_pre_hooks for m in base.modules())


def test_methods_lists_the_hybrids(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name, paper in (("unipelt", "arXiv:2110.07577"), ("mam", "arXiv:2110.04366"), ("composed", "arXiv:2110.04366"),
                        ("gated-lora", "arXiv:2110.07577")):
        assert " hybrid " in lines[name] and paper in lines[name] and " no " in lines[name]


@pytest.mark.parametrize("method, peft_type", [("unipelt", "COMPOSED"), ("mam", "COMPOSED"), ("gated-lora", "GATED_LORA"),
                                               ("gated-prefix", "GATED_PREFIX_TUNING"),
                                               ("gated-adapter", "GATED_BOTTLENECK")])
def test_train_from_the_cli_and_reload(method, peft_type, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--method", method, "--max-steps", "2", "--max-train-samples",
                 "32", "--max-eval-samples", "16", "--output-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["trainable_params"] > 34
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == peft_type
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_composed_from_the_cli_needs_its_parts(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model", tiny_model_dir, "--method", "composed", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs its parts" in err
    # the example the message gives trains (it named LoRA on "all-linear", which clashed with the trained head)
    example = err.split("--option '")[1].split("'")[0]
    assert main(["train", "--model", tiny_model_dir, "--method", "composed", "--option", example, "--max-steps", "1",
                 "--max-train-samples", "8", "--max-eval-samples", "8", "--output-dir", str(tmp_path / "ex"),
                 "--no-progress"]) == 0
    parts = '[{"peft_type": "LORA", "r": 2, "target_modules": ["query"]}, {"peft_type": "IA3"}]'
    assert main(["train", "--model", tiny_model_dir, "--method", "composed", "--option", f"configs={parts}",
                 "--max-steps", "1", "--max-train-samples", "8", "--max-eval-samples", "8", "--output-dir",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert [c["peft_type"] for c in saved["configs"]] == ["LORA", "IA3"]


@pytest.mark.parametrize("config", [GatedLoraConfig(r=2, task_type="SEQ_CLS"),
                                    GatedBottleneckConfig(task_type="SEQ_CLS")])
def test_gates_refuse_training_with_gradient_checkpointing(config):
    """The layers recomputed in backward ran after the call had ended, without its mask: with padding the
    gradients were silently wrong (61% off) or backward raised a raw CheckpointError."""
    model = get_peft_model(tiny_bert_classifier(), config)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.train()
    x = ids(3, 7)
    with pytest.raises(ValueError, match="cannot train with gradient checkpointing"):
        model(input_ids=x, labels=torch.tensor([0, 1, 0]))
    model.eval()
    with torch.no_grad():
        assert model(input_ids=x).logits.shape == (3, 2)  # inference is fine


def test_a_gate_before_a_soft_prompt_pools_the_rows_own_tokens():
    """A gated part listed before a soft prompt recorded the user's mask; the prompt then moved a decoder
    classifier's right padding in front, and the gate pooled the wrong positions (batched != alone)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from peftkit import ComposedConfig, PromptTuningConfig

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                                      num_hidden_layers=2, num_attention_heads=2, num_labels=2,
                                                      pad_token_id=0)).eval()
    model = get_peft_model(base, ComposedConfig(configs=[GatedLoraConfig(r=2, target_modules=["q_proj"]),
                                                         PromptTuningConfig(num_virtual_tokens=3)], task_type="SEQ_CLS"))
    perturb(model, 0.5)
    model.eval()
    x = torch.randint(3, 64, (2, 6))
    x[1, 4:] = 0
    mask = (x != 0).long()
    with torch.no_grad():
        batched = model(input_ids=x, attention_mask=mask).logits
        alone = model(input_ids=x[1:, :4], attention_mask=mask[1:, :4]).logits
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


def test_unload_removes_the_gates_hooks():
    base = tiny_bert_classifier()
    for _ in range(2):
        base = get_peft_model(base, GatedLoraConfig(r=2, task_type="SEQ_CLS")).unload()
        assert not base._forward_pre_hooks and not base._forward_hooks
    base = get_peft_model(base, unipelt()).unload()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in base.modules())


def test_a_composition_takes_two_parallel_adapters_and_lora_inside_one(tmp_path):
    """The rule that a parallel adapter must come last was stale (the layers inside its sub-layer stay
    targetable), and its advice could not be followed with two parallel adapters."""
    from peftkit import ComposedConfig, LoraConfig

    x = ids()
    for parts in ([ParallelConfig(mh_adapter=True, output_adapter=False), ParallelConfig()],
                  [ParallelConfig(), LoraConfig(r=2, target_modules=["output.dense"])]):
        torch.manual_seed(0)
        model = get_peft_model(tiny_bert_classifier(), ComposedConfig(configs=parts, task_type="SEQ_CLS"))
        perturb(model, 0.5)
        with torch.no_grad():
            out = model(input_ids=x).logits
            with model.disable_adapter():
                assert (model(input_ids=x).logits - out).abs().max() > 1e-4
        model.save_pretrained(tmp_path / "c")
        torch.manual_seed(0)
        again = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "c")
        with torch.no_grad():
            assert torch.allclose(again(input_ids=x).logits, out, atol=1e-6)


def test_a_composition_for_text_generation_refuses_its_gated_parts():
    from peftkit import ComposedConfig

    with pytest.raises(ConfigError, match=r"cannot adapt a model that generates text \(task_type='CAUSAL_LM'\)"):
        get_peft_model(tiny_bert_classifier(), ComposedConfig(configs=[GatedLoraConfig(r=2)], task_type="CAUSAL_LM"))


@pytest.mark.parametrize("option, message", [
    ('configs="lora"', "--option configs='lora' is not valid; give a JSON list of part configs"),
    ("num_virtual_tokens=4", "ComposedConfig has no field 'num_virtual_tokens'; its own fields: configs"),
    ('task_type="CAUSAL_LM"', "--option task_type='CAUSAL_LM': the task type follows --task (SEQ_CLS for sst2)"),
])
def test_cli_options_a_composition_cannot_take(option, message, tiny_model_dir, tmp_path, capsys):
    method = "composed" if option.startswith("configs") else "mam"
    assert main(["train", "--model", tiny_model_dir, "--method", method, "--option", option, "--max-steps", "1",
                 "--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
