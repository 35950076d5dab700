"""Saving while an adapter is merged writes the file saving it unmerged writes (the base tensors a file carries:
embedding tables written by ``save_embedding_layers``, ``modules_to_save`` copies holding another adapter's merged
layer), and the live merged model is left as it was."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peftkit import (
    LoraConfig,
    OFTConfig,
    PeftModel,
    TrainableTokensConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama

WEIGHTS = "adapter_model.safetensors"


def _live(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check(build, config, tmp_path, *, exact: bool, save_kwargs=None, adapter: str = "default"):
    """Save unmerged, merge, save again: the files agree (bit for bit when ``exact``, else to float32 round-off
    of one unmerge), the merged model is unchanged by the save, and the merged-time file loads to the unmerged
    outputs. Returns the two files."""
    save_kwargs = save_kwargs or {}
    torch.manual_seed(0)
    model = get_peft_model(build(), config)
    perturb(model)
    x = ids()
    with torch.no_grad():
        plain = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "unmerged", **save_kwargs)
    model.merge_adapter()
    with torch.no_grad():
        merged_out = model(input_ids=x).logits
    assert (merged_out - plain).abs().max() < 1e-4
    live = _live(model)
    model.save_pretrained(tmp_path / "merged", **save_kwargs)
    # the live merged model is untouched by the save
    after = _live(model)
    assert after.keys() == live.keys() and all(torch.equal(after[k], v) for k, v in live.items())
    assert model.base_model.merged_adapters() == ["default"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, merged_out)
    a, b = load_file(tmp_path / "unmerged" / WEIGHTS), load_file(tmp_path / "merged" / WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:  # one merge's and unmerge's round-off: a few float32 ulps of the merged entries (3.1e-7 measured for
            # LoRA, whose merged table reaches 9 here; 4.7e-9 for OFT)
            assert (a[k] - b[k]).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * max(1.0, a[k].abs().max()), k
    torch.manual_seed(0)  # the same base model
    loaded = PeftModel.from_pretrained(build(), tmp_path / "merged")
    with torch.no_grad():
        again = loaded(input_ids=x).logits
    assert (again - plain).abs().max().item() < 1e-5
    # what saving while merged writes is, bit for bit, what unmerging and then saving writes
    model.unmerge_adapter()
    model.save_pretrained(tmp_path / "after", **save_kwargs)
    c = load_file(tmp_path / "after" / WEIGHTS)
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in b)
    return a, b


def test_lora_on_embed_tokens(tmp_path):
    cfg = LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"])
    with pytest.warns(UserWarning, match="writing the embedding layers"):
        a, _ = _check(tiny_llama, cfg, tmp_path, exact=False)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in a


def test_oft_on_embed_tokens(tmp_path):
    cfg = OFTConfig(r=2, oft_block_size=0, target_modules=["embed_tokens"])
    with pytest.warns(UserWarning, match="writing the embedding layers"):
        a, _ = _check(tiny_llama, cfg, tmp_path, exact=False)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in a


def test_trainable_tokens_with_embedding_layers(tmp_path):
    cfg = TrainableTokensConfig(token_indices=[3, 5, 9], target_modules=["embed_tokens"])
    a, _ = _check(tiny_llama, cfg, tmp_path, exact=True, save_kwargs={"save_embedding_layers": True})
    assert "base_model.model.model.embed_tokens.base_layer.weight" in a


def test_trainable_tokens_on_tied_embedding(tmp_path):
    cfg = TrainableTokensConfig(token_indices=[3, 5, 9], target_modules=["wte"])
    a, _ = _check(tiny_gpt2, cfg, tmp_path, exact=True, save_kwargs={"save_embedding_layers": True})
    assert "base_model.model.transformer.wte.weight" in a  # (not targeted by name: the plain key, as peft)


def test_lora_on_tied_lm_head(tmp_path):
    """GPT-2's lm_head shares wte's table; a merge unties them and changes the head's copy only."""
    cfg = LoraConfig(r=2, target_modules=["lm_head", "c_attn"])
    with pytest.warns(UserWarning, match="writing the embedding layers"):
        a, _ = _check(tiny_gpt2, cfg, tmp_path, exact=True)
    assert "base_model.model.lm_head.base_layer.weight" in a


def test_lora_bias_on_bias_free_lm_head_writes_no_bias(tmp_path):
    """A merged lora_bias gives the bias-free head a bias; the file must not carry it."""
    cfg = LoraConfig(r=2, target_modules=["lm_head"], lora_bias=True)
    with pytest.warns(UserWarning, match="writing the embedding layers"):
        a, _ = _check(tiny_llama, cfg, tmp_path, exact=False)
    assert not any(k.endswith("lm_head.base_layer.bias") for k in a)


def test_modules_to_save_copy_holding_another_merged_adapter(tmp_path):
    """Adapter "default" (LoRA on the classifier) is added first, so adapter "a"'s trained copy of the classifier
    holds it too; merging "default" writes into that copy, which "a"'s file holds whole."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["classifier"]))
    model.add_adapter("a", LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    perturb(model)
    model.set_adapter("a")
    perturb(model)
    model.set_adapter("default")
    model.save_pretrained(tmp_path / "unmerged", selected_adapters=["a"])
    model.merge_adapter(["default"])
    live = _live(model)
    model.save_pretrained(tmp_path / "merged", selected_adapters=["a"])
    after = _live(model)
    assert all(torch.equal(after[k], v) for k, v in live.items())
    a, b = load_file(tmp_path / "unmerged" / "a" / WEIGHTS), load_file(tmp_path / "merged" / "a" / WEIGHTS)
    assert a.keys() == b.keys()
    assert "base_model.model.classifier.modules_to_save.weight" in a or any("classifier" in k for k in a)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k


def test_state_dict_argument_while_merged(tmp_path):
    """get_peft_model_state_dict(state_dict=...) of a merged model (a gathered state dict holds merged values)
    gives the unmerged values too."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["lm_head", "c_attn"]))
    perturb(model)
    want = get_peft_model_state_dict(model, save_embedding_layers=True)
    model.merge_adapter()
    got = get_peft_model_state_dict(model, state_dict=model.state_dict(), save_embedding_layers=True)
    also = get_peft_model_state_dict(model, save_embedding_layers=True)
    assert got.keys() == want.keys() == also.keys()
    for k in want:
        assert torch.equal(got[k], want[k]) and torch.equal(also[k], want[k]), k


def test_training_checkpoint_while_merged(tmp_path):
    """A trained base bias (bias="all") that a merged lora_bias changed is checkpointed unmerged; loading the
    checkpoint into the merged model keeps it merged, with the same outputs."""
    from peftkit.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], bias="all",
                                                              lora_bias=True))
    perturb(model)
    x = ids()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.merge_adapter()
    with torch.no_grad():
        merged_out = model(input_ids=x).logits
    live = _live(model)
    state = {"total_steps": 1, "batch_size": 1, "seed": 0, "history": [], "samples": 0, "seconds": 0.0,
             "scheduler": {"base_lrs": [1e-3], "last_epoch": 1, "lr_lambdas": [None]}}
    folder = save_checkpoint(tmp_path, 1, model, opt, state)
    assert all(torch.equal(v, _live(model)[k]) for k, v in live.items())
    saved = load_file(folder / "rank0.safetensors")
    bias = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"
    assert bias in trained and not torch.equal(live[bias], trained[bias])  # the merge changed it
    for n, v in trained.items():
        assert (saved[f"param.{n}"] - v).abs().max().item() <= 1e-6, n
    load_checkpoint(folder, model, opt)
    assert model.base_model.merged_adapters() == ["default"]
    now = _live(model)
    assert all((now[k] - v).abs().max().item() <= 1e-6 for k, v in live.items() if v.is_floating_point())
    with torch.no_grad():
        assert (model(input_ids=x).logits - merged_out).abs().max().item() <= 1e-6
