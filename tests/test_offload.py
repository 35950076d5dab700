"""accelerate's device hooks (``cpu_offload``, ``dispatch_model`` with an offloaded part) on an adapted model."""

from __future__ import annotations

import pytest
import torch

from peftkit import IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from tests.conftest import ids, perturb, tiny_llama

accelerate = pytest.importorskip("accelerate")

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("config", [LoraConfig(r=2, target_modules=TARGETS), IA3Config(target_modules=TARGETS),
                                    LoHaConfig(r=2, target_modules=TARGETS)], ids=["lora", "ia3", "loha"])
def test_cpu_offloaded_adapters_give_the_outputs_of_the_model_in_memory(config):
    """An offloaded adapter's tensors are on the meta device until its module is called; LoRA read
    lora_A.weight directly (NaN logits), (IA)^3 and LoHa, hooked themselves, had the hook move the layer
    passed to them (NotImplementedError: cannot copy out of meta tensor)."""
    model = get_peft_model(tiny_llama(), config)
    perturb(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.base_model.model.model.layers[0].self_attn.q_proj.weight.is_meta
        assert (model(input_ids=x).logits - expected).abs().max() <= 1e-5
        assert (model(input_ids=x).logits - expected).abs().max() <= 1e-5  # offloaded again after each call
    assert all(p.is_meta for n, p in model.named_parameters() if "adapters" in n)


def test_cpu_offloaded_mixed_batch_gives_each_row_its_adapter():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=TARGETS))
    model.add_adapter("b", LoraConfig(r=2, target_modules=TARGETS))
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.normal_(std=0.3)
    x, names = ids(), ["default", "b", "__base__"]
    with torch.no_grad():
        expected = model(input_ids=x, adapter_names=names).logits
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert (model(input_ids=x, adapter_names=names).logits - expected).abs().max() <= 1e-5


def test_merging_an_offloaded_model_is_refused_before_anything_changes():
    """The merge folded into meta tensors, which hold nothing: the weights the hooks load stayed the base ones,
    and merge_and_unload returned the base model's outputs, silently."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=TARGETS))
    perturb(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        for merge in (model.merge_adapter, model.merge_and_unload):
            with pytest.raises(ValueError, match=r"cannot merge \['default'\]: the layers to merge into are "
                                                 r"offloaded .*'model\.layers\.0\.self_attn\.q_proj\.base_layer\.weight'"):
                merge()
        assert model.base_model.merged_adapters() == []
        assert (model(input_ids=x).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("config", [PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                                    PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)],
                         ids=["prompt", "prefix"])
def test_cpu_offloaded_virtual_tokens_give_the_outputs_of_the_model_in_memory(config):
    """The virtual-token table was read as embedding.weight, on the meta device (RuntimeError in torch.cat)."""
    model = get_peft_model(tiny_llama(), config)
    perturb(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert (model(input_ids=x).logits - expected).abs().max() <= 1e-5
