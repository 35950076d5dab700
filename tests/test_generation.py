"""Serving an adapted model: generation and merging under ``torch.inference_mode()``."""

from __future__ import annotations

import pytest
import torch

from peftkit import LoraConfig, SSFConfig, get_peft_model, quantize_base
from tests.conftest import ids, perturb, tiny_gpt2, tiny_llama


def _lora_on_tied_embedding():
    return get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["wte", "c_attn"], task_type="CAUSAL_LM"))


def _ssf_on_bias_free_layers():  # merging gives each bias-free Llama projection a bias
    return get_peft_model(tiny_llama(), SSFConfig(task_type="CAUSAL_LM"))


def _lora_on_nf4():
    base = tiny_llama()
    quantize_base(base, "nf4")  # merging works on a float copy of the dequantised weight
    return get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))


@pytest.mark.parametrize("make", [_lora_on_tied_embedding, _ssf_on_bias_free_layers, _lora_on_nf4])
def test_a_merge_inside_inference_mode_unmerges_and_trains_outside_it(make):
    """A merge inside ``torch.inference_mode()`` created inference tensors (the untied weight, the new bias, the
    quantised layer's float copy): the later ``unmerge_adapter()`` failed with "Inplace update to inference tensor
    outside InferenceMode is not allowed"."""
    model = make()
    perturb(model)
    model.eval()
    x = ids(batch=2, seq=6)
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
        greedy = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=2)
    with torch.inference_mode():
        model.merge_adapter()
        assert (model(input_ids=x).logits - unmerged).abs().max() <= 1e-4
        assert torch.equal(model.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=2), greedy)
    model.unmerge_adapter()
    with torch.no_grad():
        assert (model(input_ids=x).logits - unmerged).abs().max() <= 1e-5
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.inference_mode():  # merge_and_unload there gives a model that trains afterwards
        merged = model.merge_and_unload()
    merged.train()
    merged(input_ids=x, labels=x).loss.backward()


@pytest.mark.parametrize("make", [_lora_on_tied_embedding, _ssf_on_bias_free_layers, _lora_on_nf4])
def test_a_model_built_inside_inference_mode_merges_inside_and_after_it(make):
    """A serving script that builds the model inside ``torch.inference_mode()`` has inference-tensor weights, which
    only inference mode may update: merging there failed with "Inplace update to inference tensor outside
    InferenceMode" once merges ran outside inference mode."""
    x = ids(batch=2, seq=6)
    with torch.inference_mode():
        model = make()
        perturb(model)
        model.eval()
        unmerged = model(input_ids=x).logits
        model.merge_adapter()
        assert (model(input_ids=x).logits - unmerged).abs().max() <= 1e-4
        model.unmerge_adapter()
        assert (model(input_ids=x).logits - unmerged).abs().max() <= 1e-5
    model.merge_adapter()  # after the block too
    model.unmerge_adapter()
    with torch.inference_mode():
        assert (model(input_ids=x).logits - unmerged).abs().max() <= 1e-5
        assert (model.merge_and_unload()(input_ids=x).logits - unmerged).abs().max() <= 1e-4
