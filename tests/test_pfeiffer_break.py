"""Pfeiffer-family placements in combination with other adapters (break tests of the Add & Norm and block-output
placements). Random AdapterDrop on several processes is tested in tests/test_distributed.py (its shared spawn)."""

from __future__ import annotations

import pytest
from torch import nn

from peftkit import (
    AdapterDropConfig,
    CompacterPlusPlusConfig,
    ConfigError,
    HoulsbyConfig,
    PfeifferConfig,
    add_fusion,
    get_peft_model,
)
from tests.conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama


def _state(model: nn.Module) -> tuple[list[str], dict[str, type]]:
    return list(model.peft_config), {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("make, first, second, sites", [
    (tiny_llama, PfeifferConfig(), PfeifferConfig(pre_ln_site="projection"),
     "'a' on the block's output, 'b' on the FFN's output projection"),
    (tiny_gpt2, PfeifferConfig(), HoulsbyConfig(), "'a' on the block's output, 'b' on the FFN's output projection"),
    (tiny_bert_classifier, PfeifferConfig(), HoulsbyConfig(),
     "'a' after the FFN's Add & Norm, 'b' on the FFN's output projection"),
    (tiny_bert_classifier, PfeifferConfig(mh_adapter=True), HoulsbyConfig(),
     "'a' after the attention's Add & Norm, 'b' on the attention's output projection"),
], ids=["llama-layer-projection", "gpt2-pfeiffer-houlsby", "bert-pfeiffer-houlsby", "bert-attention"])
def test_fusing_adapters_placed_at_different_sites_is_refused_before_any_change(make, first, second, sites):
    """A fusion attends over the adapters at one site. With Pfeiffer's new placements, a Pfeiffer adapter and a
    Houlsby one (or one loaded with the old projection placement) sit at different modules: the fusion became one
    single-adapter "fusion" at each site, the two adapters applied one after the other with nothing to attend
    over, silently (softmax over one entry at each of the 4 fusion sites)."""
    model = get_peft_model(make(), first, adapter_name="a")
    model.add_adapter("b", second)
    before = _state(model)
    with pytest.raises(ConfigError, match=r"adapters \['a', 'b'\] sit at different sites \(" + sites.replace(
            "(", r"\(").replace(")", r"\)")):
        add_fusion(model, ["a", "b"], "f")
    assert _state(model) == before


def test_fusing_adapters_at_the_same_block_output_still_fuses_them():
    model = get_peft_model(tiny_llama(), PfeifferConfig(reduction_factor=4), adapter_name="a")
    model.add_adapter("b", AdapterDropConfig(adapterdrop_layers=1, reduction_factor=4))
    model.add_adapter("c", CompacterPlusPlusConfig(mh_adapter=True))  # its attention adapter: a site of its own
    add_fusion(model, ["a", "b", "c"], "f")
    blocks = model.get_base_model().model.layers
    assert [blocks[i].adapters["f"].fused for i in (0, 1)] == [["a", "c"], ["a", "b", "c"]]
    assert blocks[1].self_attn.o_proj.adapters["f"].fused == ["c"]
