"""Prompt tuning and P-tuning on encoder-decoder models (tiny random T5 and BART): the virtual tokens go
before the encoder's input as in peft's ``PeftModelForSeq2SeqLM``; files move both ways with peft; padding,
generation, disabling and refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftkit
from peftkit import ConfigError, PeftModel, get_peft_model
from tests.conftest import perturb


def tiny_t5(layers=2, decoder_layers=None):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=layers,
                   num_decoder_layers=decoder_layers or layers,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart(decoder_layers=2):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=decoder_layers, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(cfg).eval()


MODELS = {"t5": tiny_t5, "bart": tiny_bart}


def configs(lib, **kw):
    return {
        "prompt": lib.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **kw),
        "p-mlp": lib.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, encoder_hidden_size=8, **kw),
        "p-lstm": lib.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2, encoder_hidden_size=6,
                                          encoder_reparameterization_type="LSTM", **kw),
    }


def batch():
    torch.manual_seed(1)
    x = torch.randint(3, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return x, mask, torch.randint(3, 64, (2, 4))


def greedy(model, x, mask):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", ["prompt", "p-mlp", "p-lstm"])
def test_files_move_both_ways_with_peft_and_give_peft_outputs(arch, method, tmp_path):
    base = MODELS[arch]()
    x, mask, labels = batch()
    torch.manual_seed(2)
    ours = get_peft_model(copy.deepcopy(base), configs(peftkit)[method])
    perturb(ours, 0.5)
    ours.eval()
    config = ours.peft_config["default"]
    assert config.num_transformer_submodules == 2  # peft's SEQ_2_SEQ_LM layout: a table of 2P rows
    theirs_fresh = peft.get_peft_model(copy.deepcopy(base), configs(peft)[method])
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs_fresh.parameters() if p.requires_grad)
    with torch.no_grad():
        out = ours(input_ids=x, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 4, 64)  # the decoder's logits, nothing cut
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        ref = theirs(input_ids=x, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert torch.equal(greedy(ours, x, mask), greedy(theirs, x, mask))

    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x, attention_mask=mask, decoder_input_ids=labels).logits,
                                   ours(input_ids=x, attention_mask=mask, decoder_input_ids=labels).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
def test_padding_masks_the_encoder_and_the_cross_attention(arch):
    """A right-padded row gives what it gives alone: the encoder's mask and the decoder's cross-attention mask
    both cover the virtual tokens, and the padding stays masked in both. (Left padding would move the real
    tokens away from the virtual ones, which T5's relative and BART's learned positions see, as in peft.)"""
    model = get_peft_model(MODELS[arch](), configs(peftkit)["prompt"])
    perturb(model, 0.5)
    model.eval()
    x, mask, labels = batch()
    mask = mask.flip(1)  # row 1: 4 real tokens, then 2 of padding
    with torch.no_grad():
        padded = model(input_ids=x, attention_mask=mask, decoder_input_ids=labels).logits[1]
        alone = model(input_ids=x[1:, :4], attention_mask=mask[1:, :4], decoder_input_ids=labels[1:]).logits[0]
        states = model(input_ids=x, attention_mask=mask, decoder_input_ids=labels).encoder_last_hidden_state
    assert states.shape == (2, 3 + 6, 16)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    assert torch.equal(greedy(model, x, mask)[1], greedy(model, x[1:, :4], mask[1:, :4])[0])


def test_disabled_adapter_gives_the_base_and_only_the_prompt_learns():
    base = tiny_t5()
    model = get_peft_model(copy.deepcopy(base), configs(peftkit)["prompt"])
    perturb(model, 0.5)
    x, mask, labels = batch()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask, labels=labels).logits,
                                   base(input_ids=x, attention_mask=mask, labels=labels).logits, atol=1e-6, rtol=0)
    model.train()
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"base_model.extra_modules.default.embedding.weight"}
    table = model.base_model.extra_modules["default"].embedding.weight
    assert table.shape == (6, 16) and table.grad[3:].abs().sum() == 0  # peft's second half is unused
    assert table.grad[:3].abs().sum() > 0


def test_one_submodule_gives_a_table_of_p_rows_as_peft():
    base = tiny_t5()
    x, mask, labels = batch()
    ours = get_peft_model(copy.deepcopy(base), configs(peftkit, num_transformer_submodules=1)["prompt"]).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), configs(peft, num_transformer_submodules=1)["prompt"]).eval()
    table = ours.base_model.extra_modules["default"].embedding.weight
    assert table.shape == (3, 16)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(table)
        torch.testing.assert_close(ours(input_ids=x, attention_mask=mask, labels=labels).logits,
                                   theirs(input_ids=x, attention_mask=mask, labels=labels).logits, atol=1e-5, rtol=0)


# decoder layers read stored 0, 2, 1; a decoder shallower than the encoder (distilled BARTs) reads the first of them
PREFIX_MODELS = {**MODELS, "t5-3-layers": lambda: tiny_t5(layers=3), "t5-3-2": lambda: tiny_t5(3, decoder_layers=2),
                 "bart-2-1": lambda: tiny_bart(decoder_layers=1)}


def prefix(lib, **kw):
    return lib.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **kw)


def trained_prefix(arch, **kw):
    """A prefix-tuning adapter on a tiny model after one optimizer step (nothing left at its init)."""
    base = PREFIX_MODELS[arch]()
    x, mask, labels = batch()
    torch.manual_seed(2)
    model = get_peft_model(copy.deepcopy(base), prefix(peftkit, **kw))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    return base, model.eval()


@pytest.mark.parametrize("arch", PREFIX_MODELS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_gives_peft_outputs_and_files_move_both_ways(arch, projection, tmp_path):
    """peft 0.21.2 puts the prefixes in the decoder's self-attention only (the encoder and the cross-attention get
    none), decoder layer l reading stored layer 2l mod N; the same file gives the same logits and loss in both."""
    base, ours = trained_prefix(arch, prefix_projection=projection, encoder_hidden_size=8)
    x, mask, labels = batch()
    dmask = torch.ones_like(labels)
    dmask[0, -1] = 0
    config = ours.peft_config["default"]
    assert (config.num_transformer_submodules, config.num_layers, config.token_dim) == (2, base.config.num_hidden_layers, 16)
    with torch.no_grad():
        out = ours(input_ids=x, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
        plain = base(input_ids=x, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    assert out.logits.shape == (2, 4, 64)
    torch.testing.assert_close(out.encoder_last_hidden_state, plain.encoder_last_hidden_state, atol=1e-6, rtol=0)
    assert (out.logits - plain.logits).abs().max() > 1e-2  # the prefixes change the decoder
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        ref = theirs(input_ids=x, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)

    torch.manual_seed(3)
    fresh = peft.get_peft_model(copy.deepcopy(base), prefix(peft, prefix_projection=projection, encoder_hidden_size=8))
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == sum(
        p.numel() for p in ours.parameters() if p.requires_grad)
    perturb(fresh, 0.5)
    fresh.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    fresh = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x, attention_mask=mask, decoder_input_ids=labels).logits,
                                   fresh(input_ids=x, attention_mask=mask, decoder_input_ids=labels).logits,
                                   atol=1e-5, rtol=0)


def test_prefix_tuning_refuses_a_decoder_deeper_than_the_encoder_unchanged():
    base = tiny_t5(2, decoder_layers=3)
    with pytest.raises(ConfigError, match=r"needs a decoder no deeper than the encoder.*decoder has 3 layers and 4 heads, "
                                          r"its encoder 2 and 4"):
        get_peft_model(base, prefix(peftkit))
    assert not any(isinstance(m, PeftModel) for m in base.modules()) and not base._forward_hooks


def test_prefix_training_reaches_the_prefixes_that_peft_reads_and_disabling_gives_the_base():
    base = tiny_t5(layers=4)
    model = get_peft_model(copy.deepcopy(base), prefix(peftkit))
    x, mask, labels = batch()
    model.train()
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"base_model.extra_modules.default.embedding.weight"}
    grad = model.base_model.extra_modules["default"].embedding.weight.grad.view(3, 4, 2, 16)  # (P, layer, k/v, d)
    # decoder layers 0..3 read stored layers 2l mod 4 = 0, 2, 0, 2; 1 and 3 fill peft's discarded cross-attention slot
    assert grad[:, 0::2].abs().amax(-1).gt(0).all()
    assert grad[:, 1::2].abs().sum() == 0
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask, labels=labels).logits,
                                   base(input_ids=x, attention_mask=mask, labels=labels).logits, atol=1e-6, rtol=0)
    with torch.no_grad():  # the cache made for the prefixes is returned only when asked for, as the base model's
        assert model(input_ids=x, attention_mask=mask, labels=labels, use_cache=False).past_key_values is None
        cached = model(input_ids=x, attention_mask=mask, decoder_input_ids=labels).past_key_values
    assert cached.self_attention_cache.get_seq_length() == 3 + 4 and cached.cross_attention_cache.get_seq_length() == 6


@pytest.mark.parametrize("arch", MODELS)
def test_prefix_generate_equals_greedy_decoding_by_full_forwards(arch):
    """generate() (prefixes written into its cache once, then cached steps) picks what full forwards pick. (peft
    0.21.2's generate() drops the prefixes under transformers 5: it passes them as past_key_values beside the
    cache argument, which wins, so it generates as the base model.)"""
    base, model = trained_prefix(arch)
    with torch.no_grad():
        model.base_model.extra_modules["default"].embedding.weight.mul_(10)  # prefixes that change the choice
    x, mask, _ = batch()
    start = base.config.decoder_start_token_id
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, forced_eos_token_id=None)
    tokens = torch.full((2, 1), start)
    with torch.no_grad():
        for step in range(4):
            logits = model(input_ids=x, attention_mask=mask, decoder_input_ids=tokens).logits[:, -1]
            torch.testing.assert_close(out.scores[step], logits, atol=1e-5, rtol=0)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, tokens)
    assert not torch.equal(greedy(base, x, mask), tokens)


def test_prefix_tuning_on_a_t5_whose_heads_are_narrower_than_d_model_sizes_them_by_d_kv():
    """flan-t5-small's layout (6 heads of d_kv=64 in d_model=512): the prefixes are num_heads * d_kv wide, the width of
    the keys. (peft 0.21.2 sizes them by d_model and fails in the first forward.)"""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0)).eval()
    model = get_peft_model(copy.deepcopy(base), prefix(peftkit))
    assert model.peft_config["default"].token_dim == 32
    assert model.base_model.extra_modules["default"].embedding.weight.shape == (3, 2 * 2 * 32)
    x, mask, labels = batch()
    model.train()
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    assert model.base_model.extra_modules["default"].embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="token_dim=16 does not fit the model, which needs 32"):
        get_peft_model(copy.deepcopy(base), prefix(peftkit, token_dim=16))


def test_prefix_refusals_on_encoder_decoders_are_clear_and_change_nothing():
    from transformers import T5Config, T5ForConditionalGeneration

    base = tiny_t5()
    with pytest.raises(ConfigError, match="num_transformer_submodules=1 does not fit the model, which needs 2"):
        get_peft_model(copy.deepcopy(base), prefix(peftkit, num_transformer_submodules=1))
    torch.manual_seed(0)
    deep = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                               num_decoder_layers=3, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(ConfigError, match="its decoder has 3 layers and 4 heads, its encoder 2 and 4"):
        get_peft_model(deep, prefix(peftkit))
    assert not deep.get_decoder()._forward_pre_hooks
    model = get_peft_model(base, prefix(peftkit))
    model.gradient_checkpointing_enable()
    model.train()
    x, mask, labels = batch()
    with pytest.raises(ValueError, match="prefix tuning cannot train with gradient checkpointing"):
        model(input_ids=x, attention_mask=mask, labels=labels)
    model.eval()
    with pytest.raises(ValueError, match=r"needs a growing cache .* StaticCache has no room for the prefixes"):
        model.generate(input_ids=x, attention_mask=mask, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match=r"decoder attention mask of shape \(2, 3\) does not fit.*\(2, 4\)"):
        model(input_ids=x, attention_mask=mask, labels=labels, decoder_attention_mask=mask[:, :3])


def test_prefix_decoder_tokens_beyond_barts_positions_after_the_prefixes_are_a_clear_error():
    model = get_peft_model(tiny_bart(), prefix(peftkit)).eval()  # 64 learned positions, P = 3
    x = torch.randint(3, 64, (1, 8))
    with pytest.raises(ValueError, match=r"0 earlier and 62 new decoder token.*at most 61 decoder tokens"):
        model(input_ids=x, decoder_input_ids=torch.randint(3, 64, (1, 62)))
    assert model(input_ids=x, decoder_input_ids=torch.randint(3, 64, (1, 61))).logits.shape == (1, 61, 64)


def test_an_encoder_mask_that_does_not_fit_is_a_clear_error():
    model = get_peft_model(tiny_t5(), configs(peftkit)["prompt"]).eval()
    x, mask, labels = batch()
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 5\) does not fit.*\(2, 6\)"):
        model(input_ids=x, attention_mask=mask[:, 1:], labels=labels)


def test_an_encoder_that_scales_its_token_embeddings_gets_them_scaled():
    """Pegasus (and Marian, ...) multiply the token embeddings by embed_scale inside the encoder, only when it
    embeds the ids itself: the real tokens are embedded as the encoder would (peft 0.21.2 leaves the factor out)."""
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    torch.manual_seed(0)
    base = PegasusForConditionalGeneration(PegasusConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        scale_embedding=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    model = get_peft_model(copy.deepcopy(base), configs(peftkit)["prompt"]).eval()
    x, _, labels = batch()
    encoder = base.get_encoder()
    assert encoder.embed_scale == 4.0
    with torch.no_grad():
        states = model(input_ids=x, decoder_input_ids=labels).encoder_last_hidden_state
        prompt = model.base_model.extra_modules["default"].embedding.weight[:3].expand(2, -1, -1)
        scaled = encoder(inputs_embeds=torch.cat([prompt, encoder.embed_tokens(x) * 4.0], 1)).last_hidden_state
    torch.testing.assert_close(states, scaled, atol=1e-6, rtol=0)


def test_an_input_too_long_for_barts_positions_after_the_virtual_tokens_is_a_clear_error():
    model = get_peft_model(tiny_bart(), configs(peftkit)["prompt"]).eval()  # 64 learned positions, P = 3
    x = torch.randint(3, 64, (1, 63))
    with pytest.raises(ValueError, match="an input of 63 tokens does not fit after num_virtual_tokens=3: "
                                         "BartForConditionalGeneration has 64 learned positions; truncate inputs to 61"):
        model(input_ids=x, decoder_input_ids=x[:, :4])
    with pytest.raises(ValueError, match="truncate inputs to 61"):
        model.generate(input_ids=x, max_new_tokens=2)
    assert model(input_ids=x[:, :61], decoder_input_ids=x[:, :4]).logits.shape == (1, 4, 64)
