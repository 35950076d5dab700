"""Soft-prompt adapters in HF PEFT's file format, checked against the real ``peft`` package both ways."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama

METHODS = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=3)),
    "p-mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=8)),
    "p-lstm": ("PromptEncoderConfig", dict(num_virtual_tokens=2, encoder_hidden_size=6,
                                           encoder_reparameterization_type="LSTM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
    "prefix-mlp": ("PrefixTuningConfig", dict(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8)),
}


def tiny_roberta_classifier():
    """RoBERTa numbers positions from ``padding_idx + 1``: soft prompts on it were off by that (logits 1e-3)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, pad_token_id=1, num_labels=2)).eval()


def tiny_nystromformer_classifier():
    """Nystromformer numbers positions from 2 (its position_ids buffer), with no padding index."""
    from transformers import NystromformerConfig, NystromformerForSequenceClassification

    torch.manual_seed(0)
    return NystromformerForSequenceClassification(NystromformerConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, num_landmarks=4, segment_means_seq_len=4, num_labels=2)).eval()


MODELS = {"gpt2": (tiny_gpt2, "CAUSAL_LM"), "llama": (tiny_llama, "CAUSAL_LM"), "bert": (tiny_bert_classifier, "SEQ_CLS"),
          "roberta": (tiny_roberta_classifier, "SEQ_CLS"), "nystromformer": (tiny_nystromformer_classifier, "SEQ_CLS")}
CASES = [(m, k) for m in MODELS for k in METHODS if not (m in ("roberta", "nystromformer") and k.startswith("prefix"))]


def config(lib, method, task):
    cls, kw = METHODS[method]
    return getattr(lib, cls)(task_type=task, **kw)


def peft_logits(model, x, method, on_bert):
    """peft's output for ``x``; its logits keep the virtual positions, which peftkit drops. peft 0.21.2 cannot run
    prefix tuning on a BERT classifier under transformers 5 (it passes ``past_key_values``, now ``cache``), so
    there its own prefix cache (``get_prompt``) is fed to its model the way peft's forward means to."""
    with torch.no_grad():
        if on_bert and method.startswith("prefix"):
            mask = torch.ones(x.shape[0], model.peft_config["default"].num_virtual_tokens + x.shape[1])
            return model.base_model(input_ids=x, attention_mask=mask, cache=model.get_prompt(x.shape[0])).logits
        out = model(input_ids=x).logits
    return out[:, -x.shape[1]:] if out.dim() == 3 else out


@pytest.mark.parametrize("model_name, method", CASES)
def test_peftkit_adapter_loads_in_peft(model_name, method, tmp_path):
    make, task = MODELS[model_name]
    base = make()
    twin = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, config(peftkit, method, task))
    perturb(ours, 0.5)
    x = ids()
    with torch.no_grad():
        expected = ours(input_ids=x).logits
    ours.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    head = ["base_model.classifier.weight", "base_model.classifier.bias"] if task == "SEQ_CLS" else []
    if model_name in ("roberta", "nystromformer"):  # their classifier is a dense layer and an output projection
        head = [k.replace("classifier.", f"classifier.{part}.") for k in head for part in ("dense", "out_proj")]
    assert keys == {"prompt_embeddings", *head}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - peft_logits(theirs, x, method, model_name == "bert")).abs().max() <= 1e-5


@pytest.mark.parametrize("model_name, method", CASES)
def test_peft_adapter_loads_in_peftkit(model_name, method, tmp_path):
    make, task = MODELS[model_name]
    base = make()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, config(peft, method, task))
        perturb(theirs, 0.5)
        theirs.save_pretrained(tmp_path)
    x = ids()
    expected = peft_logits(theirs, x, method, model_name == "bert")
    ours = peftkit.PeftModel.from_pretrained(twin, tmp_path)
    with torch.no_grad():
        assert (expected - ours(input_ids=x).logits).abs().max() <= 1e-5
        with ours.disable_adapter():
            assert (expected - ours(input_ids=x).logits).abs().max() > 1e-3


def test_p_tuning_v2_preset_writes_prefix_tuning_files(tmp_path):
    from peftkit.config import get_method
    from peftkit.train.run import RunConfig, build_peft_config

    spec = get_method("p-tuning-v2")
    assert spec.kind == "prompt" and "arXiv:2110.07602" in spec.paper
    config = build_peft_config(RunConfig(method="p-tuning-v2", method_options={"num_virtual_tokens": 5}))
    assert isinstance(config, peftkit.PrefixTuningConfig) and not config.prefix_projection
    assert config.task_type == "SEQ_CLS" and config.num_virtual_tokens == 5
    assert get_method(config.peft_type).name == "prefix-tuning"
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, config)
    perturb(ours, 0.5)
    x = ids()
    with torch.no_grad():
        expected = ours(input_ids=x).logits
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert type(theirs.peft_config["default"]).__name__ == "PrefixTuningConfig"
    assert (expected - peft_logits(theirs, x, "prefix", True)).abs().max() <= 1e-5


def test_prefix_tuning_refuses_a_model_that_takes_no_cache_and_positions_count_from_the_offset():
    """MPNet's forward takes no cache: the prefixes were dropped unread (only the head trained), as peft refuses.
    RoBERTa's 40 positions leave 38 from padding_idx + 1: 38 virtual tokens were taken, then every input refused."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    mpnet = MPNetForSequenceClassification(MPNetConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32,
                                                       max_position_embeddings=40, pad_token_id=1))
    with pytest.raises(peftkit.ConfigError, match=r"MPNetModel\.forward takes no 'cache' argument"):
        peftkit.get_peft_model(mpnet, peftkit.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    assert not mpnet._forward_pre_hooks
    with pytest.raises(peftkit.ConfigError, match="RobertaForSequenceClassification has 38 learned positions"):
        peftkit.get_peft_model(tiny_roberta_classifier(), peftkit.PromptTuningConfig(num_virtual_tokens=38,
                                                                                     task_type="SEQ_CLS"))
    ok = peftkit.get_peft_model(tiny_roberta_classifier(), peftkit.PromptTuningConfig(num_virtual_tokens=37,
                                                                                      task_type="SEQ_CLS"))
    assert ok(input_ids=ids(1, 1)).logits.shape == (1, 2)
