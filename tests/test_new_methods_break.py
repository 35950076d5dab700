"""Adversarial checks of OFT, the adaption prompt (LLaMA-Adapter) and forward-mode AD over adapted models: each
test pins a defect found by trying to break them (the fix is in the same commit as the test)."""

from __future__ import annotations

import copy

import peft
import torch

from peftkit import OFTConfig, get_peft_model
from tests.conftest import ids, perturb, tiny_llama


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
