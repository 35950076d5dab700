"""LN tuning (Zhao et al., 2023, arXiv:2312.11420): a trained copy of each targeted norm, file-compatible with peft."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import BitFitConfig, ConfigError, LNTuningConfig, PeftModel, get_peft_model
from peftkit.cli import main
from peftkit.layers import AdaptedLayer
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.zoo import train_tiny_bert


def tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2)
    return GemmaForCausalLM(cfg).eval()


MODELS = {"bert": tiny_bert_classifier, "llama": tiny_llama, "gpt2": tiny_gpt2, "gemma": tiny_gemma}


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def adapted(kind: str, **kw):
    base = MODELS[kind]()
    model = get_peft_model(base, LNTuningConfig(task_type="SEQ_CLS" if kind == "bert" else "CAUSAL_LM", **kw))
    perturb(model)
    return base, model.eval()


def test_trainable_count_is_the_norms_parameters_plus_the_head():
    _, bert = adapted("bert")
    # 5 LayerNorms (embeddings + 2 per block) of weight and bias (16 each), plus the classifier copy (16*2 + 2)
    assert bert.get_nb_trainable_parameters()[0] == 5 * 2 * 16 + 34
    _, llama = adapted("llama")
    assert llama.get_nb_trainable_parameters()[0] == 5 * 16  # 2 RMSNorms per block + the final one, weight only
    names = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert len(names) == 5 and all(n.endswith("ln_tuning_layers.weight") for n in names)


def test_default_targets_are_peft_s_plus_bert_like_encoders():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as theirs

    from peftkit.methods.ln_tuning import LN_TUNING_TARGET_DEFAULTS as ours

    assert {k: list(v) for k, v in ours.items() if k in theirs} == {k: v for k, v in theirs.items() if k != "llava"}
    assert ours["bert"] == ("LayerNorm",)
    _, bert = adapted("bert")
    assert bert.peft_config["default"].target_modules == ["LayerNorm"]
    assert sum(isinstance(m, AdaptedLayer) for m in bert.modules()) == 5


@pytest.mark.parametrize("kind", ["bert", "llama", "gemma"])
def test_merged_equals_unmerged_exactly_and_fifty_cycles_restore_the_base(kind):
    base, model = adapted(kind)
    x = ids()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    unmerged = logits(model, x)
    with model.disable_adapter():
        plain = logits(model, x)
    assert (unmerged - plain).abs().max() > 1e-3  # the copies change the output
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    model.merge_adapter()
    assert torch.equal(logits(model, x), unmerged)
    model.unmerge_adapter()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in snapshot.items())
    with model.disable_adapter():
        assert torch.equal(logits(model, x), plain)
    assert torch.equal(logits(model.merge_and_unload(), x), unmerged)


def test_a_bfloat16_model_merges_and_unmerges_bit_for_bit():
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, LNTuningConfig())
    perturb(model)
    copy_ = next(p for n, p in model.named_parameters() if "ln_tuning_layers" in n)
    assert copy_.dtype == torch.float32  # adapters train in float32, as peftkit's others
    norms = {k: v.clone() for k, v in base.state_dict().items() if "norm" in k}
    x = ids()
    unmerged = logits(model, x)
    model.merge_adapter()
    assert torch.equal(logits(model, x), unmerged)
    model.unmerge_adapter()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in norms.items())


def test_stacked_with_bitfit_on_the_same_norm_merges_exactly():
    base = tiny_bert_classifier()
    model = get_peft_model(base, BitFitConfig(target_modules=["LayerNorm"]), adapter_name="b")
    model.add_adapter("ln", LNTuningConfig(target_modules=["output.LayerNorm"]))
    perturb(model)
    model.base_model.set_adapter(["b", "ln"])
    for p in model.parameters():
        p.requires_grad_(False)
    x = ids()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    unmerged = logits(model, x)
    model.merge_adapter(["b", "ln"])
    assert (logits(model, x) - unmerged).abs().max() <= 1e-6
    model.unmerge_adapter()
    assert max((base.state_dict()[k] - v).abs().max().item() for k, v in snapshot.items()) <= 1e-6


def test_training_lowers_the_loss_and_only_the_copies_and_head_train(tmp_path):
    losses, model = train_tiny_bert(LNTuningConfig(task_type="SEQ_CLS"), "ln_tuning_layers", steps=30, lr=5e-2)
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.bert.embeddings.LayerNorm.ln_tuning_layers.weight" in keys and len(keys) == 12
    torch.manual_seed(0)  # the base train_tiny_bert built (the test starts at seed 0)
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    assert torch.equal(logits(reloaded, x), expected)


@pytest.mark.parametrize("kind", ["bert", "llama", "gemma"])
def test_files_move_both_ways_with_peft_and_have_peft_s_keys(kind, tmp_path):
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    base = MODELS[kind]()
    twins = [copy.deepcopy(base) for _ in range(3)]
    x = ids()
    ours = get_peft_model(base, LNTuningConfig(task_type=task))
    perturb(ours)
    expected = logits(ours.eval(), x)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twins[0], tmp_path / "ours")
        assert torch.equal(logits(theirs, x), expected)
        # peft has no default norms for BERT: the ones peftkit picks
        made = peft.get_peft_model(twins[1], peft.LNTuningConfig(task_type=task, target_modules=ours.peft_config[
            "default"].target_modules if kind == "bert" else None))
        perturb(made)
        made.save_pretrained(tmp_path / "theirs")
        expected_theirs = logits(made.eval(), x)
    assert set(load_file(tmp_path / "ours/adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs/adapter_model.safetensors"))
    saved = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert saved["peft_type"] == "LN_TUNING" and "layers_to_transform" not in saved
    loaded = PeftModel.from_pretrained(twins[2], tmp_path / "theirs")
    assert torch.equal(logits(loaded, x), expected_theirs)


def test_bad_values_raise_config_error_naming_them_and_leave_the_model_alone():
    with pytest.raises(ConfigError, match="target_modules=5"):
        LNTuningConfig(target_modules=5)
    with pytest.raises(ConfigError, match=r"exclude_modules='\('"):
        LNTuningConfig(target_modules=["LayerNorm"], exclude_modules="(")
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="no default targets for model_type=None"):
        get_peft_model(plain, LNTuningConfig())
    base = tiny_bert_classifier()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match=r"'bert\.encoder\.layer\.0\.attention\.output'.*sub-modules"):
        get_peft_model(base, LNTuningConfig(target_modules=["attention.output"]))
    with pytest.raises(ConfigError, match="no weight/bias parameter found"):
        get_peft_model(base, LNTuningConfig(target_modules=["dropout"]))
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    assert base.state_dict().keys() == before.keys()


def test_any_norm_with_a_plain_target_list_works_on_a_custom_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GroupNorm(2, 6), torch.nn.Linear(6, 3))
    peft_model = get_peft_model(model, LNTuningConfig(target_modules=["1"]))
    assert peft_model.get_nb_trainable_parameters()[0] == 12
    perturb(peft_model)
    x = torch.randn(5, 4)
    with torch.no_grad():
        out = peft_model(x)
        merged = peft_model.merge_and_unload()(x)
    assert torch.equal(out, merged)


def test_cli_trains_ln_tuning_on_sst2_and_reloads(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--method", "ln-tuning", "--max-steps", "3",
                 "--max-train-samples", "64", "--max-eval-samples", "16", "--batch-size", "8", "--output-dir",
                 str(out), "--no-progress"]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == 5 * 2 * 16 + 34  # the norms' copies and the classifier head
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and config["target_modules"] == ["LayerNorm"]
    assert config["modules_to_save"] == ["classifier"]
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_registered_as_a_selective_mergeable_method():
    spec = peftkit.get_method("ln-tuning")
    assert (spec.family, spec.kind, spec.mergeable, spec.peft_type) == ("selective", "select", True, "LN_TUNING")
    assert "2312.11420" in spec.paper
