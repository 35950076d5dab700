"""peft's task classes (``PeftModelFor*``), ``AutoPeftModel*`` loading and ``prepare_model_for_kbit_training``."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import peftkit
from peftkit import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    ConfigError,
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    get_peft_model,
    prepare_model_for_kbit_training,
    quantize_base,
)
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_llama


@pytest.mark.parametrize("task, cls", [("CAUSAL_LM", PeftModelForCausalLM), (None, PeftModel),
                                       ("FEATURE_EXTRACTION", peftkit.PeftModelForFeatureExtraction)])
def test_get_peft_model_and_from_pretrained_build_the_task_class_as_peft_does(tmp_path, task, cls):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type=task))
    assert type(model) is cls and isinstance(model, PeftModel)
    assert repr(model).startswith(cls.__name__ + "(\n  (base_model): AdapterModel(")
    model.save_pretrained(tmp_path)
    # whichever class is asked, the saved task type decides (peft's MODEL_TYPE_TO_PEFT_MODEL_MAPPING)
    for asked in (PeftModel, PeftModelForSequenceClassification):
        loaded = asked.from_pretrained(tiny_llama(), tmp_path)
        assert type(loaded) is (cls if task else asked)


def _saved_llama(tmp_path, task_type="CAUSAL_LM"):
    """A tiny Llama saved as a local base folder, and a LoRA adapter trained on it (B != 0) saved next to it."""
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type=task_type))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    return model.eval()


def test_auto_peft_model_for_causal_lm_loads_the_named_base_and_the_adapter(tmp_path):
    model = _saved_llama(tmp_path)
    x = ids()
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is PeftModelForCausalLM and not loaded.training
    assert loaded.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
        # the adapter is really there: the base alone differs
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(x).logits, model(x).logits, atol=1e-3)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", is_trainable=True,
                                                         adapter_name="mine", dtype=torch.float64)
    assert trainable.active_adapter == "mine" and trainable.get_base_model().dtype == torch.float64
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".lora_" in n}


def test_auto_peft_model_loads_what_peft_saved_and_peft_loads_what_it_saved(tmp_path):
    import peft

    model = _saved_llama(tmp_path)
    x = ids()
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    theirs.save_pretrained(tmp_path / "from-peft")
    ours = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "from-peft")
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits, model(x).logits, atol=1e-6)
        assert torch.allclose(ours(x).logits, model(x).logits, atol=1e-6)


def test_auto_classes_refuse_an_adapter_of_another_task_naming_the_right_class(tmp_path):
    _saved_llama(tmp_path)
    with pytest.raises(ConfigError, match=r"task_type='CAUSAL_LM'.*AutoPeftModelForCausalLM\.from_pretrained"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"AutoPeftModelForCausalLM.*AutoPeftModel takes adapters without"):
        AutoPeftModel.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match="revision='main' is not supported"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", revision="main")
    with pytest.raises(TypeError, match=r"use AutoPeftModel\.from_pretrained"):
        AutoPeftModel()


def test_auto_classes_check_their_arguments_before_loading_the_base(tmp_path):
    """is_trainable='no' and a dict config were named only after the base model had been loaded (or, with a base
    that cannot be found, not at all: the missing base was reported instead)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"AutoPeftModelForCausalLM\.from_pretrained\(\): is_trainable='no' must be"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", is_trainable="no")
    with pytest.raises(ConfigError, match=r"expected a peftkit PeftConfig .*got builtins\.dict"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", config={"peft_type": "LORA"})
    with pytest.raises(TypeError, match=r"model_id=None is a NoneType; give the adapter folder"):
        AutoPeftModelForCausalLM.from_pretrained(None)


def test_auto_peft_model_names_a_base_it_cannot_find(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "no-name")
    with pytest.raises(ConfigError, match="names no base_model_name_or_path"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "no-name")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")
    model.save_pretrained(tmp_path / "gone-base")
    with pytest.raises(FileNotFoundError, match=r"the base model '.*gone' named by .*nothing is downloaded"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "gone-base")


def test_auto_peft_model_for_sequence_classification_takes_base_keywords(tmp_path):
    tiny_bert_classifier(num_labels=3).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter", num_labels=3)
    assert type(loaded) is PeftModelForSequenceClassification
    x = ids()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model.eval()(x).logits, atol=1e-6)


def test_auto_peft_model_grows_the_embeddings_to_a_tokenizer_saved_with_the_adapter(tiny_gpt2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    size = len(tok)
    tok.add_tokens(["<new-token>"])
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    base.resize_token_embeddings(len(tok))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")  # "auto": the vocabulary differs from the base folder's
    tok.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert loaded.get_input_embeddings().weight.shape[0] == size + 1
    x = torch.tensor([[5, 9, size]])  # the added token's id
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model.eval()(x).logits, atol=1e-6)


def test_prepare_model_for_kbit_training_matches_peft_on_a_half_precision_base():
    import peft

    base = tiny_llama().to(torch.bfloat16)
    ours, theirs = prepare_model_for_kbit_training(copy.deepcopy(base)), peft.prepare_model_for_kbit_training(
        copy.deepcopy(base))
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert p.dtype == q.dtype == torch.float32 and not p.requires_grad and not q.requires_grad, name
        assert torch.equal(p, q)
    assert not ours.is_gradient_checkpointing  # as peft: only a quantised base is checkpointed


def test_prepare_model_for_kbit_training_on_a_quantised_base_trains_lora_with_checkpointing():
    base = tiny_llama().to(torch.bfloat16)
    quantize_base(base, "nf4", block_size=8, scaler_block_size=8)
    codes = {n: b.clone() for n, b in base.named_buffers() if b.dtype == torch.uint8}
    assert codes
    prepare_model_for_kbit_training(base)
    assert base.is_gradient_checkpointing
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert all(torch.equal(b, codes[n]) for n, b in base.named_buffers() if n in codes)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    perturb(model)
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())


def test_prepare_model_for_kbit_training_refuses_a_peft_model_and_a_quantised_plain_module_unchanged():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="takes the base model, before get_peft_model"):
        prepare_model_for_kbit_training(model)
    assert any(p.requires_grad for p in model.parameters())
    plain = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)).to(torch.bfloat16)
    quantize_base(plain, "nf4", block_size=8, scaler_block_size=8, skip_modules=[])
    with pytest.raises(ConfigError, match=r"Sequential has no gradient_checkpointing_enable.*use_gradient_checkpointing=False"):
        prepare_model_for_kbit_training(plain)
    assert plain[1].weight.requires_grad and plain[1].weight.dtype == torch.bfloat16
    prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False)
    assert plain[1].weight.dtype == torch.float32 and not plain[1].weight.requires_grad


def test_auto_peft_model_gives_a_run_folder_the_head_and_padding_the_run_trained_with(tmp_path):
    """A ``peftkit train`` classification run on a decoder (no pad token in its config) with three named classes:
    loading the run folder needs no keywords, and a padded batch gives the run's own logits."""
    import json

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from peftkit.train.data import shipped_model_dir

    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3,
                                                              ignore_mismatched_sizes=True)  # as the run loads it
    assert base.config.pad_token_id is None and tok.pad_token_id is None
    base.config.pad_token_id = tok.eos_token_id  # what the run does
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    perturb(model)
    model.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"num_labels": 3, "label_names": ["a", "b", "c"]}))
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "run")
    assert loaded.config.id2label == {0: "a", 1: "b", 2: "c"} and loaded.config.pad_token_id == tok.eos_token_id
    x = torch.tensor([[5, 9, 14, 20], [7, 3, tok.eos_token_id, tok.eos_token_id]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, atol=1e-6, rtol=0)
    assert AutoPeftModelForSequenceClassification.from_pretrained(
        tmp_path / "run", id2label={0: "x", 1: "y", 2: "z"}).config.id2label[0] == "x"  # the caller's keywords win


def test_a_run_and_auto_loading_share_one_padding_and_class_name_rule(tmp_path):
    """``peftkit train`` builds its model and ``AutoPeftModelForSequenceClassification`` loads its folder with the
    same rule (:mod:`peftkit.train.heads`): pad token, else EOS, else UNK; class names only when they fit."""
    import json

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from peftkit.train.data import shipped_model_dir
    from peftkit.train.heads import label_maps, set_pad_token
    from peftkit.train.run import RunConfig, _load_model_and_tokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    eos, unk = tok.eos_token_id, tok.unk_token_id
    assert tok.pad_token is None and eos != unk
    assert set_pad_token(tok) == eos and tok.pad_token_id == eos
    tok.pad_token = tok.unk_token
    assert set_pad_token(tok) == unk  # a pad token is kept
    tok.pad_token, tok.eos_token = None, None
    assert set_pad_token(tok) == unk and tok.pad_token_id == unk
    tok.pad_token, tok.unk_token = None, None
    assert set_pad_token(tok) is None and tok.pad_token is None
    assert label_maps(2, ["neg", 1]) == {"id2label": {0: "neg", 1: "1"}, "label2id": {"neg": 0, "1": 1}}
    assert label_maps(3, ["a", "b"]) == label_maps(2, None) == label_maps(0, []) == {}
    # no pad token and no EOS: the run and the loaded folder both pad with UNK and name the classes alike
    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    tok.eos_token = None
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    run_model, run_tok = _load_model_and_tokenizer(RunConfig(model=str(tmp_path / "base"), device="cpu"), 3, False,
                                                   ["x", "y", "z"])
    assert run_model.config.pad_token_id == run_tok.pad_token_id == unk
    get_peft_model(run_model, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")).save_pretrained(
        tmp_path / "run")
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"num_labels": 3, "label_names": ["x", "y", "z"]}))
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "run")
    assert loaded.config.pad_token_id == unk
    assert loaded.config.id2label == run_model.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert loaded.config.label2id == run_model.config.label2id == {"x": 0, "y": 1, "z": 2}
