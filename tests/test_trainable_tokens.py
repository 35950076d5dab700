"""Trainable tokens (peft's TrainableTokensConfig): only chosen embedding rows train; file-compatible with peft."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import ConfigError, PeftModel, TrainableTokensConfig, get_peft_model
from peftkit.cli import main
from peftkit.formats.hf_peft import AdapterLoadError
from peftkit.layers import AdaptedLayer
from tests.cli_util import error_line
from tests.conftest import ids, perturb, tiny_gpt2, tiny_llama

TOKENS = [5, 9, 3]
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}  # untied and tied (lm_head.weight is wte.weight)


def inputs():
    x = ids()
    x[:, :3] = torch.tensor(TOKENS)  # every row reads the trained tokens
    return x


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def adapted(kind: str, **kw):
    base = MODELS[kind]()
    model = get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS, **kw))
    perturb(model)
    return base, model.eval()


def test_trainable_count_is_tokens_times_width_and_the_default_target_is_the_input_embedding():
    _, model = adapted("llama")
    assert model.get_nb_trainable_parameters()[0] == len(TOKENS) * 16
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.adapters.default.trainable_tokens_delta"]
    assert model.peft_config["default"].target_modules == "model.embed_tokens"  # written as peft writes it
    _, gpt2 = adapted("gpt2")
    assert gpt2.peft_config["default"].target_modules == "transformer.wte"
    assert gpt2.get_nb_trainable_parameters()[0] == len(TOKENS) * 16  # the tied head shares the rows


def test_default_init_is_a_no_op_and_init_weights_false_draws_rows():
    base = tiny_llama()
    twin = copy.deepcopy(base)
    x = inputs()
    model = get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS))
    assert torch.equal(logits(model, x), logits(twin, x))
    other = get_peft_model(copy.deepcopy(twin), TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    rows = other.base_model.model.model.embed_tokens.adapters["default"].trainable_tokens_delta
    assert not torch.equal(rows, twin.model.embed_tokens.weight[TOKENS])


@pytest.mark.parametrize("kind", list(MODELS))
def test_only_the_chosen_rows_change_and_merging_is_exact(kind):
    base, model = adapted(kind)
    x = inputs()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    unmerged = logits(model, x)
    with model.disable_adapter():
        plain = logits(model, x)
    assert (unmerged - plain).abs().max() > 1e-2
    for _ in range(50):
        model.merge_adapter()
        model.unmerge_adapter()
    model.merge_adapter()
    assert torch.equal(logits(model, x), unmerged)
    model.unmerge_adapter()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in snapshot.items())
    rows = base.get_input_embeddings().adapters["default"].trainable_tokens_delta.detach().clone()
    original = base.get_input_embeddings().weight.detach().clone()
    merged = model.merge_and_unload()
    assert torch.equal(logits(merged, x), unmerged)
    weight = merged.get_input_embeddings().weight
    rest = [i for i in range(weight.shape[0]) if i not in TOKENS]
    assert torch.equal(weight[rest], original[rest]) and torch.equal(weight[TOKENS], rows)


def test_a_tied_head_uses_the_trained_rows_and_stays_tied_after_unmerge():
    base, model = adapted("gpt2")
    x = inputs()
    hidden_only = model.base_model.model.lm_head
    assert isinstance(hidden_only, AdaptedLayer)  # the head follows the embedding's rows, as in peft
    model.merge_adapter()
    model.unmerge_adapter()
    assert base.lm_head.base_layer.weight is base.transformer.wte.base_layer.weight
    # the head's output for the trained tokens' columns changes; the other columns are the base's
    out = logits(model, x)
    with model.disable_adapter():
        plain = logits(model, x)
    rest = [i for i in range(64) if i not in TOKENS]
    diff = (out - plain).abs()
    assert diff[..., TOKENS].max() > 1e-2 and diff[..., rest].max() > 0  # hidden states change too
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight or torch.equal(merged.lm_head.weight,
                                                                                 merged.transformer.wte.weight)


@pytest.mark.parametrize("kind", list(MODELS))
def test_files_move_both_ways_with_peft_and_have_peft_s_keys(kind, tmp_path):
    base = MODELS[kind]()
    twins = [copy.deepcopy(base) for _ in range(3)]
    x = inputs()
    ours = get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS))
    perturb(ours)
    expected = logits(ours.eval(), x)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twins[0], tmp_path / "ours")
        assert torch.equal(logits(theirs, x), expected)
        made = peft.get_peft_model(twins[1], peft.TrainableTokensConfig(token_indices=TOKENS))
        perturb(made)
        made.save_pretrained(tmp_path / "theirs")
        expected_theirs = logits(made.eval(), x)
    ours_keys = set(load_file(tmp_path / "ours/adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "theirs/adapter_model.safetensors"))
    assert len(ours_keys) == (2 if kind == "gpt2" else 1)  # peft writes a tied head's copy too
    saved = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert saved["token_indices"] == TOKENS and saved["peft_type"] == "TRAINABLE_TOKENS"
    loaded = PeftModel.from_pretrained(twins[2], tmp_path / "theirs")
    assert torch.equal(logits(loaded, x), expected_theirs)


def test_two_adapters_share_the_embeddings_wrapper_and_run_in_order():
    base, model = adapted("gpt2")
    model.add_adapter("other", TrainableTokensConfig(token_indices=[9, 11]))
    perturb(model)
    emb = base.transformer.wte
    assert list(emb.adapters) == ["default", "other"] and list(base.lm_head.adapters) == ["default", "other"]
    model.base_model.set_adapter(["default", "other"])
    x = inputs()
    both = logits(model, x)
    rows = emb.adapters["other"].trainable_tokens_delta
    weight = emb.base_layer.weight.detach().clone()
    weight[TOKENS] = emb.adapters["default"].trainable_tokens_delta.detach()
    weight[[9, 11]] = rows.detach()  # the later adapter's row 9 wins
    model.merge_adapter(["default", "other"])
    assert torch.equal(emb.base_layer.weight, weight) and torch.equal(logits(model, x), both)
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert list(emb.adapters) == ["default"]


def test_a_file_whose_tied_copies_disagree_is_refused(tmp_path):
    _, model = adapted("gpt2")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lm_head.trainable_tokens_delta"] += 1
    save_file(tensors, path)
    with pytest.raises(AdapterLoadError, match=r"lm_head\.trainable_tokens_delta and .*wte\.trainable_tokens_delta"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_training_lowers_the_loss_and_changes_only_the_chosen_rows():
    base = tiny_llama()
    original = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, TrainableTokensConfig(token_indices=TOKENS))
    model.train()
    x = inputs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    losses = []
    for _ in range(25):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert [n for n, p in model.named_parameters() if p.grad is not None] == [
            "base_model.model.model.embed_tokens.adapters.default.trainable_tokens_delta"]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    weight = model.merge_and_unload().model.embed_tokens.weight
    changed = (weight != original).any(dim=1).nonzero().squeeze(1).tolist()
    assert sorted(changed) == sorted(TOKENS)


@pytest.mark.parametrize("bad, named", [
    ([], r"token_indices=\[\] is not valid"), ([3, -1], r"holds \[-1\]"), ([2, 2], r"repeats \[2\]"),
    ([1, True], r"token_indices=\[1, True\] is not valid"),
])
def test_bad_token_indices_raise_config_error_naming_them(bad, named):
    with pytest.raises(ConfigError, match=named):
        TrainableTokensConfig(token_indices=bad)


def test_bad_targets_and_out_of_range_rows_are_refused_before_the_model_changes():
    base = tiny_llama()
    with pytest.raises(ConfigError, match=r"token_indices \[64, 70\] are out of range for 'model.embed_tokens', which "
                                          "has 64 rows"):
        get_peft_model(base, TrainableTokensConfig(token_indices=[1, 64, 70]))
    with pytest.raises(ConfigError, match=r"selects 'model.norm' \(LlamaRMSNorm\), which has no 2-D weight"):
        get_peft_model(base, TrainableTokensConfig(token_indices=[1], target_modules=["norm"]))
    with pytest.raises(ConfigError, match="matches no module"):
        get_peft_model(base, TrainableTokensConfig(token_indices=[1], target_modules=["embedding"]))
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_cli_requires_token_indices_and_trains_with_them(tiny_model_dir, tmp_path, capsys):
    common = ["train", "--model", tiny_model_dir, "--method", "trainable-tokens", "--max-steps", "3",
              "--max-train-samples", "64", "--max-eval-samples", "16", "--batch-size", "8", "--no-progress"]
    line = error_line(capsys, *common, "--output-dir", tmp_path / "none")
    assert "--option token_indices=[ID, ...]" in line
    out = tmp_path / "run"
    assert main([*common, "--output-dir", str(out), "--option", "token_indices=[101, 102, 1996]"]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == 3 * 16 + 34  # three rows and the classifier head
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["token_indices"] == [101, 102, 1996]
    assert config["target_modules"] == "bert.embeddings.word_embeddings"
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_registered_as_a_selective_mergeable_method():
    spec = peftkit.get_method("trainable-tokens")
    assert (spec.family, spec.kind, spec.mergeable, spec.peft_type) == ("selective", "select", True, "TRAINABLE_TOKENS")


# --- peft's LoraConfig(trainable_token_indices=...) -----------------------------------------------------------------
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.mark.parametrize("kind", list(MODELS))
def test_lora_with_trainable_token_indices_moves_both_ways_with_peft(kind, tmp_path):
    base = MODELS[kind]()
    twins = [copy.deepcopy(base) for _ in range(3)]
    x = inputs()
    ours = get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=LORA_TARGETS[kind],
                                                   trainable_token_indices=TOKENS))
    assert ours.get_nb_trainable_parameters()[0] == sum(
        p.numel() for n, p in ours.named_parameters() if "lora_" in n) + len(TOKENS) * 16
    perturb(ours)
    expected = logits(ours.eval(), x)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twins[0], tmp_path / "ours")
        assert (logits(theirs, x) - expected).abs().max() <= 1e-5
        made = peft.get_peft_model(twins[1], peft.LoraConfig(r=2, target_modules=LORA_TARGETS[kind],
                                                             trainable_token_indices=TOKENS))
        perturb(made)
        made.save_pretrained(tmp_path / "theirs")
        expected_theirs = logits(made.eval(), x)
    ours_keys = set(load_file(tmp_path / "ours/adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "theirs/adapter_model.safetensors"))
    assert {k for k in ours_keys if "lora_" not in k} == {  # peft writes a tied head's rows once, here
        f"base_model.model.{'model.embed_tokens' if kind == 'llama' else 'transformer.wte'}"
        ".token_adapter.trainable_tokens_delta"}
    loaded = PeftModel.from_pretrained(twins[2], tmp_path / "theirs")
    assert (logits(loaded, x) - expected_theirs).abs().max() <= 1e-5
    assert (logits(loaded.merge_and_unload(), x) - expected_theirs).abs().max() <= 1e-5


def test_lora_trainable_token_indices_by_module_name_and_its_refusals():
    base = tiny_llama()
    model = get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                    trainable_token_indices={"embed_tokens": [1, 2]}))
    assert isinstance(base.model.embed_tokens, AdaptedLayer)
    with pytest.raises(ConfigError, match=r"'model.embed_tokens' already holds adapter 'b' .*not both"):
        model.add_adapter("b", peftkit.LoraConfig(r=2, target_modules=["embed_tokens"], trainable_token_indices=[1]))
    assert "b" not in model.peft_config and list(base.model.embed_tokens.adapters) == ["default"]
    with pytest.raises(ConfigError, match=r"trainable_token_indices\['embed_tokens'\] repeats \[1\]"):
        peftkit.LoraConfig(trainable_token_indices={"embed_tokens": [1, 1]})
    with pytest.raises(ConfigError, match="trainable_token_indices=5 is not valid"):
        peftkit.LoraConfig(trainable_token_indices=5)


def test_lora_trainable_token_indices_entries_on_one_embedding_or_its_tied_head():
    # two dict entries that reach one weight (the same module by two names, or a head tied to the embedding): with
    # different ids the second replaced the first's wrapper and its rows silently; now refused, model unchanged
    for tokens in ({"wte": [1, 2], "lm_head": [3]}, {"wte": [1, 2], "transformer.wte": [3]}):
        base = tiny_gpt2()
        with pytest.raises(ConfigError, match=r"trainable_token_indices: 'lm_head' and 'wte'|"
                                              r"trainable_token_indices: 'transformer.wte' and 'wte'"):
            get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=tokens))
        assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    # the same ids on the embedding and its tied head: one set of rows, the head follows them (as peft)
    base = tiny_gpt2()
    model = get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["c_attn"],
                                                    trainable_token_indices={"wte": [1, 2], "lm_head": [1, 2]}))
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(rows) == 1 and rows[0].shape == (2, 16)
    assert type(base.lm_head.adapters["default"]).__name__ == "TiedTokens"


def test_trainable_token_indices_on_an_embedding_in_modules_to_save_is_refused_by_name():
    # peft refuses both on one embedding; the message said "matches no module" / "has no get_input_embeddings()"
    for tokens in ([1, 2], {"embed_tokens": [1, 2]}):
        base = tiny_llama()
        with pytest.raises(ConfigError, match=r"'model.embed_tokens' is in modules_to_save .*not both"):
            get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                    trainable_token_indices=tokens))
        assert not any(isinstance(m, (AdaptedLayer, peftkit.layers.ModulesToSaveWrapper)) for m in base.modules())
