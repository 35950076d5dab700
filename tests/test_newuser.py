"""Checks found by a new user's trial of the methods added on 2026-12-02 (README, CLI, porting a peft script)."""

from __future__ import annotations

import peft
import pytest

import peftkit
from peftkit import get_peft_model
from tests.conftest import tiny_llama


def test_mixed_model_refusal_of_oft_does_not_claim_peft_refuses_it_too():
    """peft's PeftMixedModel takes OFT; peftkit's does not yet, and its error must say so rather than 'as in peft'."""
    peft_model = peft.get_peft_model(tiny_llama(), peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]),
                                     mixed=True)
    assert isinstance(peft_model, peft.PeftMixedModel)
    config = peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="not OFT") as info:
        get_peft_model(tiny_llama(), config, mixed=True)
    assert "as in peft" not in str(info.value)
    assert "peft mixes OFT" in str(info.value)
    # a method peft refuses too keeps saying so
    with pytest.raises(ValueError, match="as in peft"):
        get_peft_model(tiny_llama(), peftkit.VeraConfig(r=4, target_modules=["q_proj"]), mixed=True)
