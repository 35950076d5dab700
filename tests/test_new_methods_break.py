"""Adversarial checks of OFT, the adaption prompt (LLaMA-Adapter) and forward-mode AD over adapted models: each
test pins a defect found by trying to break them (the fix is in the same commit as the test)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from peftkit import AdaptionPromptConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model
from tests.conftest import ids, perturb, tiny_gpt2, tiny_llama


def test_exact_cayley_oft_runs_on_a_model_cast_to_bfloat16_as_peft_does(tmp_path):
    # peft builds the exact Cayley transform's identity in float32, so a bf16 adapter is solved in float32; the
    # CPU's LU has no bf16 kernel, and a model cast whole to bf16 (adapter included) must still run
    torch.manual_seed(0)
    kw = dict(oft_block_size=4, use_cayley_neumann=False, target_modules=["q_proj", "v_proj"])
    base = tiny_llama()
    twin = copy.deepcopy(base)
    ours = get_peft_model(base, OFTConfig(**kw))
    perturb(ours, std=0.3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = ids()
    with torch.no_grad():
        got = ours(input_ids=x).logits
        want = theirs(input_ids=x).logits
    assert got.dtype == torch.bfloat16
    assert {p.dtype for n, p in ours.named_parameters() if "oft_R" in n} == {torch.bfloat16}
    assert (got.float() - want.float()).abs().max() <= 1e-2
    with torch.no_grad(), ours.disable_adapter():
        assert (ours(input_ids=x).logits.float() - got.float()).abs().max() > 0.05  # the rotation is not trivial


@pytest.mark.parametrize("make,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])],
                         ids=["llama", "gpt2"])
def test_adaption_prompt_rows_of_a_mixed_batch_beside_a_lora_on_the_attention_projections(make, targets):
    # the prompt's rows (and its own one-row key/value projection) ran the attention's adapted projections
    # with the whole batch's adapter names: "3 entries but a layer saw 2 rows"
    torch.manual_seed(0)
    model = get_peft_model(make(), AdaptionPromptConfig(adapter_len=3, task_type="CAUSAL_LM"), adapter_name="ap")
    model.add_adapter("lora", LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(1.0)
    x = ids()
    alone = {}
    with torch.no_grad():
        for adapter in ("ap", "lora"):
            model.set_adapter(adapter)
            alone[adapter] = model(input_ids=x).logits
        with model.disable_adapter():
            alone["__base__"] = model(input_ids=x).logits
        assert (alone["ap"] - alone["lora"]).abs().max() > 1e-2
        for names in (["ap", "lora", "ap"], ["lora", "ap", "__base__"], ["ap", "ap", "ap"]):
            got = model(input_ids=x, adapter_names=names).logits
            want = torch.stack([alone[n][i] for i, n in enumerate(names)])
            assert (got - want).abs().max() <= 1e-5, names
    names = ["lora", "ap", "ap"]
    out = model.generate(input_ids=x[:, :3], adapter_names=names, max_new_tokens=3, do_sample=False, pad_token_id=2)
    for i, n in enumerate(names):
        model.set_adapter(n)
        one = model.generate(input_ids=x[i:i + 1, :3], max_new_tokens=3, do_sample=False, pad_token_id=2)
        assert torch.equal(out[i], one[0])


def test_adaption_prompt_is_a_part_of_a_composition_that_saves_and_loads(tmp_path):
    # ComposedConfig's check of the parts' modules_to_save read a field AdaptionPromptConfig does not have
    torch.manual_seed(0)
    base = tiny_llama()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, [AdaptionPromptConfig(adapter_len=3, task_type="CAUSAL_LM"),
                                  OFTConfig(oft_block_size=4, target_modules=["q_proj"], task_type="CAUSAL_LM")])
    perturb(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        with model.disable_adapter():
            assert (model(input_ids=x).logits - expected).abs().max() > 1e-2
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(twin, tmp_path)
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - expected).abs().max() <= 1e-6
