"""Soft prompts (prompt tuning, P-tuning, prefix tuning) on tiny GPT-2, Llama and BERT models: generation
with and without the cache, padding, disabling, loss masking, training, parameter counts, folding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from peftkit import (
    ConfigError,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama

METHODS = {
    "prompt": lambda **kw: PromptTuningConfig(num_virtual_tokens=3, **kw),
    "p-mlp": lambda **kw: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, **kw),
    "p-lstm": lambda **kw: PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=6,
                                               encoder_reparameterization_type="LSTM", **kw),
    "prefix": lambda **kw: PrefixTuningConfig(num_virtual_tokens=4, **kw),
    "prefix-mlp": lambda **kw: PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8,
                                                  **kw),
}
DECODERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
CASES = [(d, m) for d in DECODERS for m in METHODS]
PAD = 2


def adapted(decoder: str, method: str, std: float = 0.5):
    base = DECODERS[decoder]()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, METHODS[method]())
    perturb(model, std)
    return model, twin


def greedy(model, x, mask=None, steps=5, **kw):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                              pad_token_id=PAD, **kw)


def left_padded(rows):
    length = max(len(r) for r in rows)
    x = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return x, mask


@pytest.mark.parametrize("decoder, method", CASES)
def test_cached_generate_equals_stepwise_decoding_without_cache(decoder, method):
    model, twin = adapted(decoder, method)
    x = ids(2, 6)
    out = greedy(model, x, steps=6)
    seq = x
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert seq.tolist() == out.tolist()
        assert greedy(model, x, steps=6, use_cache=False).tolist() == out.tolist()
        assert greedy(twin, x, steps=6).tolist() != out.tolist()  # the prompt really changes the output


@pytest.mark.parametrize("decoder, method", CASES)
def test_left_padded_batch_gives_each_row_its_own_output(decoder, method):
    model, _ = adapted(decoder, method)
    rows = [torch.randint(3, 64, (n,)) for n in (6, 3, 5)]
    x, mask = left_padded(rows)
    out = greedy(model, x, mask, steps=5)
    with torch.no_grad():
        last = model(input_ids=x, attention_mask=mask).logits[:, -1]
        for i, r in enumerate(rows):
            assert out[i, x.shape[1]:].tolist() == greedy(model, r[None], steps=5)[0, len(r):].tolist()
            assert (last[i] - model(input_ids=r[None]).logits[0, -1]).abs().max() <= 1e-5


@pytest.mark.parametrize("decoder, method", CASES)
def test_forward_with_a_returned_cache_continues_the_sequence(decoder, method):
    model, _ = adapted(decoder, method)
    x = ids(2, 7)
    with torch.no_grad():
        full = model(input_ids=x).logits
        first = model(input_ids=x[:, :5], use_cache=True)
        assert first.logits.shape == (2, 5, 64)
        rest = model(input_ids=x[:, 5:], cache=first.cache, attention_mask=torch.ones(2, 7, dtype=torch.long))
    assert (rest.logits - full[:, 5:]).abs().max() <= 1e-5


@pytest.mark.parametrize("decoder, method", CASES)
def test_disable_adapter_gives_the_base_model(decoder, method):
    model, twin = adapted(decoder, method)
    x, mask = left_padded([torch.randint(3, 64, (n,)) for n in (5, 3)])
    with torch.no_grad():
        adapted_logits = model(input_ids=x, attention_mask=mask).logits
        with model.disable_adapter():
            off = model(input_ids=x, attention_mask=mask).logits
            off_gen = greedy(model, x, mask)
        base = twin(input_ids=x, attention_mask=mask).logits
    assert (off - base).abs().max() == 0
    assert off_gen.tolist() == greedy(twin, x, mask).tolist()
    assert (adapted_logits - base).abs().max() > 1e-3


def _llama_2x2():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("seed", range(6))
def test_first_generated_token_agrees_with_the_forward(seed):
    """peft 0.21.2 + transformers 5.24 fail this: their generate() puts the prefix in ``past_key_values``,
    which transformers 5 no longer reads (the argument is ``cache``), yet shifts the positions by P."""
    torch.manual_seed(seed)
    base = _llama_2x2()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    perturb(model, 0.5)
    x = torch.randint(3, 64, (1, 6))
    with torch.no_grad():
        last = model(input_ids=x).logits[0, -1]
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        no_prefix = twin(input_ids=x).logits[0, -1]
    assert out.sequences[0, -1].item() == last.argmax().item()
    assert (out.logits[0][0] - last).abs().max() <= 1e-5
    assert (no_prefix - last).abs().max() > 1e-2


@pytest.mark.parametrize("decoder, method", CASES)
def test_loss_counts_exactly_the_base_models_targets(decoder, method):
    model, _ = adapted(decoder, method)
    x = ids(3, 6)
    labels = x.clone()
    labels[0, 3] = labels[2, 1] = -100
    out = model(input_ids=x, labels=labels)
    assert out.logits.shape == (3, 6, 64)  # virtual positions are not returned
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(out.loss.item() - manual.item()) <= 1e-5


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("make, task", [(tiny_gpt2, "CAUSAL_LM"), (tiny_bert_classifier, "SEQ_CLS")])
def test_training_lowers_the_loss_and_only_prompt_parameters_learn(make, task, method):
    base = make()
    with torch.no_grad():  # weights large enough that the output depends on what the tokens attend to
        for p in base.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model = get_peft_model(base, METHODS[method](task_type=task))
    x = torch.randint(3, 64, (8, 6))
    if task == "SEQ_CLS":
        labels = torch.tensor([0, 1] * 4)
    else:  # every sequence should end in token 5
        x[:, -1] = 5
        labels = torch.full_like(x, -100)
        labels[:, -1] = 5

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=x, labels=labels).loss.item()

    before = eval_loss()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(40):
        model(input_ids=x, labels=labels).loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                learns = name.startswith("base_model.extra_modules.default.") or ".modules_to_save.default." in name
                assert (p.grad is not None and p.grad.abs().sum() > 0) == learns, name
        opt.step()
        opt.zero_grad()
    assert eval_loss() < 0.8 * before


def _counts(method: str, d: int, layers: int, kv: int) -> int:
    p = {"prompt": 3, "p-mlp": 3, "p-lstm": 2, "prefix": 4, "prefix-mlp": 4}[method]
    if method == "prompt":
        return p * d
    if method == "p-mlp":
        h = 8
        return p * d + (d * h + h) + (h * h + h) + (h * d + d)
    if method == "p-lstm":
        h = 6
        lstm = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)  # 2 layers, both directions
        return p * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    width = 2 * layers * kv
    if method == "prefix":
        return p * width
    h = 8
    return p * kv + (kv * h + h) + (h * width + width)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("make, d, kv", [(tiny_gpt2, 16, 16), (tiny_llama, 16, 8), (tiny_bert_classifier, 16, 16)])
def test_trainable_counts_match_the_formulas(make, d, kv, method):
    base = make()
    model = get_peft_model(base, METHODS[method]())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == _counts(method, d, 2, kv)
    assert total == trainable + sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("method", ["p-mlp", "p-lstm", "prefix-mlp"])
def test_folding_the_reparameterisation_is_exact(method, tmp_path):
    model, twin = adapted("llama", method)
    encoder = model.base_model.extra_modules["default"]
    x = ids(2, 5)
    with torch.no_grad():
        before, tokens = model(input_ids=x).logits, encoder()
        encoder.fold()
        after = model(input_ids=x).logits
    assert torch.equal(encoder.embedding.weight, tokens)
    assert (before - after).abs().max() <= 1e-6
    width = tokens.shape[1]
    assert model.get_nb_trainable_parameters()[0] == tokens.shape[0] * width
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(twin, tmp_path)
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - before).abs().max() <= 1e-6


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_loads_folded(method, tmp_path):
    model, twin = adapted("gpt2", method)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path)
    trainable = PeftModel.from_pretrained(twin, tmp_path, is_trainable=True)
    for loaded in (frozen, trainable):
        assert loaded.base_model.extra_modules["default"].folded
        with torch.no_grad():
            assert (loaded(input_ids=x).logits - expected).abs().max() <= 1e-5
    assert frozen.get_nb_trainable_parameters()[0] == 0
    tokens = model.base_model.extra_modules["default"]()
    assert trainable.get_nb_trainable_parameters()[0] == tokens.numel()


@pytest.mark.parametrize("method", ["prompt", "p-mlp", "prefix"])
def test_bert_classifier_with_padding_and_token_types(method):
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, METHODS[method](task_type="SEQ_CLS"))
    perturb(model, 0.5)
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, token_type_ids=torch.zeros_like(x)).logits
        alone = model(input_ids=x[1:, :4]).logits
        with model.disable_adapter():
            off = model(input_ids=x, attention_mask=mask).logits
        base_out = twin(input_ids=x, attention_mask=mask).logits
    assert out.shape == (2, 2)
    assert (out[1] - alone[0]).abs().max() <= 1e-5
    assert torch.equal(off, base_out)
    assert (out - base_out).abs().max() > 1e-3


def _decoder_classifier(kind: str):
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, pad_token_id=PAD, num_labels=3)).eval()
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                                    pad_token_id=PAD, num_labels=3)).eval()


@pytest.mark.parametrize("method", ["prompt", "p-mlp", "prefix"])
@pytest.mark.parametrize("decoder", ["llama", "gpt2"])
def test_decoder_classifier_pools_each_rows_last_real_token(decoder, method):
    """A decoder's classifier pools the last token that is not pad_token_id, which it finds in input_ids
    only; with inserted embeddings it pooled the last position, a pad in a right-padded row (off by 2.8 to
    4.6). Right padding (masked or not) and left padding now give each row its output alone."""
    model = get_peft_model(_decoder_classifier(decoder), METHODS[method](task_type="SEQ_CLS"))
    perturb(model, 0.5)
    right = torch.tensor([[5, 6, 7, PAD, PAD, PAD], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17, PAD, PAD]])
    left = torch.tensor([[PAD, PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12, 13], [PAD, PAD, 14, 15, 16, 17]])
    rows = [right[0, :3], right[1], right[2, :4]]
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=r[None]).logits for r in rows])
        masked = model(input_ids=right, attention_mask=(right != PAD).long(), labels=labels)
        unmasked = model(input_ids=right).logits
        lefts = model(input_ids=left, attention_mask=(left != PAD).long()).logits
    for got in (masked.logits, unmasked, lefts):
        assert (got - alone).abs().max() <= 1e-5
    assert torch.allclose(masked.loss, F.cross_entropy(alone, labels), atol=1e-5)


def test_prompt_tuning_init_from_text_and_from_the_vocabulary():
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit.train.run import default_model_dir

    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=64)
    base = BertForSequenceClassification(cfg)
    text = "great movie"
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                                    prompt_tuning_init_text=text,
                                                    tokenizer_name_or_path=default_model_dir()))
    token_ids = AutoTokenizer.from_pretrained(default_model_dir())(text)["input_ids"]  # [CLS] great movie [SEP]
    assert len(token_ids) == 4  # with the special tokens, as peft tokenises it (they were left out)
    words = base.get_input_embeddings().weight
    expected = words[(token_ids * 2)[:5]]
    assert torch.equal(model.base_model.extra_modules["default"].embedding.weight, expected)
    model.add_adapter("vocab", PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.base_model.extra_modules["vocab"].embedding.weight
    assert all((words == row).all(-1).any() for row in table)


def test_adapters_come_and_go_without_leaving_hooks():
    base = tiny_gpt2()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, METHODS["prefix"]())
    model.add_adapter("other", METHODS["prompt"]())
    perturb(model)
    x = ids()
    with torch.no_grad():
        model.set_adapter("default")
        with pytest.raises(ConfigError, match=r"adapters \['default', 'other'\] are soft-prompt adapters; activate at"):
            model.set_adapter(["default", "other"])  # refused at once (it failed only at the next forward)
        assert model.active_adapters == ["default"]
        with pytest.raises(ValueError, match="mixed-adapter batches"):
            model(input_ids=x, adapter_names=["default", "__base__", "default"])
        model.delete_adapter("other")
        assert list(model.base_model.extra_modules) == ["default"]
        plain = model.unload()
        assert (plain(input_ids=x).logits - twin(input_ids=x).logits).abs().max() == 0
    assert not plain._forward_pre_hooks and not plain._forward_hooks


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generate_from_embeddings_with_beams_and_a_static_cache(method):
    model, _ = adapted("llama", method)
    x = ids(2, 6)
    out = greedy(model, x, steps=4)
    with torch.no_grad():
        from_embeds = greedy(model, None, steps=4, inputs_embeds=model.get_input_embeddings()(x))
        beams = greedy(model, x, steps=4, num_beams=3)
    assert from_embeds.tolist() == out[:, 6:].tolist()
    assert beams.shape == (2, 10) and beams[:, :6].tolist() == x.tolist()
    with pytest.raises(ValueError, match="needs a growing cache"):
        greedy(model, x, steps=2, cache_implementation="static")


def test_a_soft_prompt_composes_with_a_lora_adapter():
    from peftkit import LoraConfig

    model, twin = adapted("gpt2", "prefix")
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    x = ids()
    with torch.no_grad():
        prefix_only = model(input_ids=x).logits
        model.set_adapter(["default", "lora"])
        both = model(input_ids=x).logits
        model.set_adapter("lora")
        lora_only = model(input_ids=x).logits
        model.set_adapter(["default", "lora"])
        first = greedy(model, x, steps=1)[:, -1]
        with model.disable_adapter():
            off = model(input_ids=x).logits
    assert first.tolist() == both[:, -1].argmax(-1).tolist()
    assert (both - prefix_only).abs().max() > 1e-3 and (both - lora_only).abs().max() > 1e-3
    assert torch.equal(off, twin(input_ids=x).logits)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.extra_modules.default.embedding.weight" in learning
    assert len(learning) == 1 + 2 * 2  # the prefixes, lora_A and lora_B of two c_attn layers


def test_prefix_refuses_gradient_checkpointing_in_training():
    model = get_peft_model(tiny_llama(), METHODS["prefix"]())
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids())


@pytest.mark.parametrize("config, message", [
    (lambda: PromptTuningConfig(), "num_virtual_tokens is required"),
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens=0 is not valid; it must be an integer > 0$"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "prompt_tuning_init='WORDS'"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT"), "needs prompt_tuning_init_text"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, tokenizer_kwargs={"a": 1}), "only used with"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=3),
     "num_transformer_submodules=3 is not valid; use 1 "),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "'GRU'"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=-1), "encoder_hidden_size=-1"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.0), "encoder_dropout=1.0"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones"), "init_weights='ones'"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=2, token_dim=0), "token_dim=0"),
])
def test_bad_values_raise_config_error(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config()


@pytest.mark.parametrize("config, message", [
    (PromptTuningConfig(num_virtual_tokens=2, token_dim=12), "token_dim=12 does not fit the model, which needs 16"),
    (PrefixTuningConfig(num_virtual_tokens=2, token_dim=16), "token_dim=16 does not fit the model, which needs 8"),
    (PrefixTuningConfig(num_virtual_tokens=2, num_layers=3), "num_layers=3 does not fit the model, which needs 2"),
    (PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2),
     "num_transformer_submodules=2 does not fit the model, which needs 1"),
])
def test_sizes_that_do_not_fit_the_model_leave_it_unchanged(config, message):
    base = tiny_llama()
    x = ids()
    with torch.no_grad():
        before = base(input_ids=x).logits
    with pytest.raises(ConfigError, match=message):
        get_peft_model(base, config)
    assert config.num_attention_heads is None  # nothing was filled in
    assert not base._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(base(input_ids=x).logits, before)


def _with_tokens(method: str, tokens: int):
    config = METHODS[method]()
    config.num_virtual_tokens = tokens
    return config


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("make", [tiny_bert_classifier, tiny_gpt2])
def test_virtual_tokens_must_leave_learned_positions_for_the_input(method, make):
    model = make()  # 32 learned positions (BERT's max_position_embeddings, GPT-2's n_positions)
    before = [(n, p.clone()) for n, p in model.named_parameters()]
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=32 leaves no position .* 32 learned positions"):
        get_peft_model(model, _with_tokens(method, 32))
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(model.named_parameters(), before, strict=True))
    assert not model._forward_pre_hooks and not model._forward_hooks
    adapted_model = get_peft_model(model, _with_tokens(method, 30))
    with torch.no_grad():
        adapted_model(input_ids=ids(2, 2))  # 30 + 2 tokens fill the table exactly
        with pytest.raises(ValueError, match=r"an input of 3 tokens does not fit .* truncate inputs to 2 tokens"):
            adapted_model(input_ids=ids(2, 3))


def test_rotary_models_have_no_position_limit_for_virtual_tokens():
    model = get_peft_model(tiny_llama(), _with_tokens("prompt", 80))  # 64 max_position_embeddings
    with torch.no_grad():
        assert model(input_ids=ids(1, 4)).logits.shape[1] == 4


def test_a_tokenizer_path_that_gives_no_tokenizer_is_a_config_error(tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                tokenizer_name_or_path=str(tmp_path / "nothing"))
    model = tiny_llama()
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=r"tokenizer_name_or_path='.*nothing' gives no tokenizer .*local folder"):
        get_peft_model(model, config)
    assert [type(m) for m in model.modules()] == modules and not model._forward_pre_hooks


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_cached_generation_past_the_learned_positions_is_a_clear_error(method):
    """A cached step adds one token: the check on the call's own length never fired, and generation past the
    learned positions (GPT-2's 32) stopped in a raw IndexError inside the position embedding."""
    model = get_peft_model(tiny_gpt2(), _with_tokens(method, 4)).eval()
    x = ids(1, 26)
    with torch.no_grad():
        assert model.generate(input_ids=x, max_new_tokens=2, do_sample=False).shape[1] == 28  # 4 + 28 = 32
        # the 4th new token would run the 29th real token through position 4 + 28 = 32
        with pytest.raises(ValueError, match=r"28 earlier tokens and 1 new one\(s\) do not fit .* at most 28 tokens"):
            model.generate(input_ids=x, max_new_tokens=4, do_sample=False)


def test_sequence_classification_labels_are_left_as_they_are():
    """Multi-label (B, classes) or one-token regression (B, 1) labels as wide as the input were padded with -100
    over the virtual tokens as if they were token labels."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=7, problem_type="multi_label_classification")
    model = get_peft_model(BertForSequenceClassification(cfg), PromptTuningConfig(num_virtual_tokens=4,
                                                                                    task_type="SEQ_CLS"))
    labels = torch.randint(0, 2, (2, 7)).float()
    with torch.no_grad():
        out = model(input_ids=ids(2, 7), labels=labels)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))


def test_a_training_mode_save_writes_the_tokens_in_use(tmp_path):
    model = get_peft_model(tiny_llama(), PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                                             encoder_num_layers=2, encoder_dropout=0.5))
    model.train()
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    model.eval()
    x = ids()
    loaded = PeftModel.from_pretrained(tiny_llama_seeded(), tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "a" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(tmp_path / "b" / "adapter_model.safetensors")["prompt_embeddings"])
    assert model.training is False


def tiny_llama_seeded():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_return_dict_false_gives_the_tuple_of_the_dict_output(method):
    model = get_peft_model(tiny_llama(), METHODS[method]()).eval()
    x = ids()
    with torch.no_grad():
        whole = model(input_ids=x, use_cache=False)
        parts = model(input_ids=x, use_cache=False, return_dict=False)
    assert len(parts) == 1 and torch.equal(parts[0], whole.logits) and parts[0].shape[1] == x.shape[1]


def test_input_ids_with_inputs_embeds_is_refused_and_a_path_is_a_tokenizer_folder():
    model = get_peft_model(tiny_llama(), METHODS["prompt"]())
    x = ids()
    with pytest.raises(ValueError, match="give input_ids or inputs_embeds, not both"):
        model(input_ids=x, inputs_embeds=model.get_input_embeddings()(x))
    from peftkit.train.data import shipped_model_dir

    config = PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="once upon",
                                tokenizer_name_or_path=shipped_model_dir())
    assert config.tokenizer_name_or_path == str(shipped_model_dir())
    with pytest.warns(UserWarning, match="encoder_num_layers=3 only applies to the LSTM encoder"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_num_layers=3)


def test_a_text_started_prompt_loads_trainable_without_its_tokenizer(tmp_path):
    """The file's tokens replace the TEXT start: loading it to train further needs no tokenizer (the folder it
    came from may be gone)."""
    import shutil

    from peftkit.train.data import shipped_model_dir

    shutil.copytree(shipped_model_dir(), tmp_path / "tok")
    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="once upon",
                                tokenizer_name_or_path=str(tmp_path / "tok"))
    from transformers import AutoModelForCausalLM

    def stories():
        return AutoModelForCausalLM.from_pretrained(shipped_model_dir())

    model = get_peft_model(stories(), config)
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "tok")
    again = PeftModel.from_pretrained(stories(), tmp_path / "adapter", is_trainable=True)
    x = ids()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)
    assert any(p.requires_grad for p in again.parameters())
    with pytest.raises(ConfigError, match="gives no tokenizer"):  # a new adapter still needs it
        get_peft_model(stories(), config)


def test_generate_refuses_to_continue_from_a_cache_holding_virtual_tokens():
    """generate() took the cache's virtual positions for input tokens already seen and fed the wrong tokens."""
    model, _ = adapted("llama", "prompt")
    x = ids(1, 5)
    with torch.no_grad():
        first = model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                               return_dict_in_generate=True)
        with pytest.raises(ValueError, match="cannot continue from past_key_values with soft-prompt adapter 'default'"):
            model.generate(input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=2,
                           do_sample=False, pad_token_id=PAD)
        with model.disable_adapter():  # the base model's own cache continues as transformers does
            base = model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                                  return_dict_in_generate=True)
            more = model.generate(input_ids=base.sequences, past_key_values=base.past_key_values, max_new_tokens=2,
                                  do_sample=False, pad_token_id=PAD)
            assert torch.equal(more, greedy(model, x, steps=5))


@pytest.mark.parametrize("method", ["prompt", "p-mlp"])
def test_input_embeddings_narrower_than_the_hidden_size(method, tmp_path):
    """ELECTRA-small/ALBERT/OPT-350m embed tokens narrower than the hidden size: the virtual tokens were built at
    the hidden size and the first forward failed."""
    import peft
    from transformers import ElectraConfig, ElectraForSequenceClassification

    torch.manual_seed(0)
    base = ElectraForSequenceClassification(ElectraConfig(vocab_size=64, embedding_size=16, hidden_size=32,
                                                          num_hidden_layers=1, num_attention_heads=4,
                                                          intermediate_size=32, max_position_embeddings=32)).eval()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, METHODS[method](task_type="SEQ_CLS"))
    assert model.peft_config["default"].token_dim == 16
    perturb(model, 0.5)
    x = ids(2, 6, vocab=64)
    with torch.no_grad():
        out = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    with torch.no_grad():
        assert (theirs(input_ids=x).logits - out).abs().max() <= 1e-5


def test_question_answering_logits_and_loss_cover_the_real_tokens_only():
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    base = BertForQuestionAnswering(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=32, max_position_embeddings=40))
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4, task_type="QUESTION_ANS"))
    perturb(model, 0.5)
    x = ids(2, 7, vocab=64)
    start, end = torch.tensor([1, 2]), torch.tensor([3, 9])  # 9 lies outside the 7 tokens: ignored, as in transformers
    with torch.no_grad():
        out = model(input_ids=x, start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (2, 7)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end.clamp(0, 7),
                                                                           ignore_index=7)) / 2
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_prefix_tuning_on_falcon_with_one_key_value_head():
    """Falcon-7B's layout (multi_query, not the new decoder architecture) has one key/value head whatever its
    config's num_kv_heads says: the prefixes had 4 and the first forward failed."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    base = FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          multi_query=True, new_decoder_architecture=False))
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    assert model.peft_config["default"].num_attention_heads == 1 and model.peft_config["default"].token_dim == 8
    perturb(model, 0.5)
    x = ids(1, 5, vocab=64)
    with torch.no_grad():
        cached = greedy(model, x, steps=4)
        assert torch.equal(cached, greedy(model, x, steps=4, use_cache=False))


def test_multiple_choice_models_and_a_foreign_tokenizer_are_refused_by_name():
    from transformers import BertConfig, BertForMultipleChoice

    from peftkit.train.run import default_model_dir

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=40)
    with pytest.raises(ConfigError, match=r"BertForMultipleChoice takes \(batch, choices, length\) inputs"):
        get_peft_model(BertForMultipleChoice(cfg), PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ConfigError, match=r"gives token id \d+ for prompt_tuning_init_text, past the model's 64 input"):
        get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                                        prompt_tuning_init_text="great movie",
                                                        tokenizer_name_or_path=default_model_dir()))


def test_question_answering_loss_comes_first_as_in_the_models_own_output():
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    base = BertForQuestionAnswering(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=32, max_position_embeddings=40))
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=4, task_type="QUESTION_ANS")).eval()
    x, start, end = ids(2, 7, vocab=64), torch.tensor([1, 2]), torch.tensor([3, 4])
    with torch.no_grad():
        out = model(input_ids=x, start_positions=start, end_positions=end)
        plain = model(input_ids=x, start_positions=start, end_positions=end, return_dict=False)
    assert list(out.keys()) == ["loss", "start_logits", "end_logits"]
    assert plain[0].dim() == 0 and plain[1].shape == (2, 7)


def test_prefix_without_cache_returns_no_cache_key_and_beam_search_works():
    """A forward with use_cache=False gives the base model's keys (no "cache" holding None, which beam search
    would try to reorder)."""
    model, twin = adapted("llama", "prefix")
    x = ids(2, 5)
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False)
        assert list(out.keys()) == list(twin(input_ids=x, use_cache=False).keys()) == ["logits"]
        beams = model.generate(input_ids=x, max_new_tokens=3, num_beams=2, do_sample=False, use_cache=False,
                               pad_token_id=PAD)
    assert beams.shape == (2, 8)


@pytest.mark.parametrize("method", ["prompt", "p-mlp"])
def test_one_row_of_position_ids_is_shared_by_the_batch(method):
    model, _ = adapted("gpt2", method)
    x = ids(2, 7)
    with torch.no_grad():
        shared = model(input_ids=x, position_ids=torch.arange(7)).logits
        given = model(input_ids=x, position_ids=torch.arange(7).expand(2, -1)).logits
        plain = model(input_ids=x).logits
    assert torch.equal(shared, given) and torch.allclose(shared, plain, atol=1e-6)


@pytest.mark.parametrize("config", [
    lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
])
def test_loading_values_into_a_training_reparameterisation_warns_that_it_folds(config):
    from peftkit import get_peft_model_state_dict, set_peft_model_state_dict

    model = get_peft_model(tiny_llama(), config())
    before = model.get_nb_trainable_parameters()[0]
    with pytest.warns(UserWarning, match=r"replaced its reparameterisation \((mlp_head|transform)\).* build it again"):
        set_peft_model_state_dict(model, get_peft_model_state_dict(model))
    table = model.base_model.extra_modules["default"].embedding.weight
    assert table.shape[0] == 3 and model.get_nb_trainable_parameters()[0] == table.numel() < before


def test_a_trainable_load_folds_without_a_warning(tmp_path):
    import warnings

    get_peft_model(tiny_llama(), PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8)).save_pretrained(
        tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)


def test_a_refused_adapter_leaves_the_callers_config_as_it_was(tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                tokenizer_name_or_path=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="gives no tokenizer"):
        get_peft_model(tiny_llama(), config)
    assert (config.token_dim, config.num_layers, config.num_attention_heads, config.num_transformer_submodules) == (
        None, None, None, None)


def test_a_task_type_changed_after_the_config_was_built_is_checked_when_the_adapter_is_added():
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    config.task_type = "causal_lm"
    base = tiny_llama()
    with pytest.raises(ConfigError, match="task_type='causal_lm' is not valid"):
        get_peft_model(base, config)
    assert not base._forward_pre_hooks


@pytest.mark.parametrize("config_cls", [PromptTuningConfig, PrefixTuningConfig])
@pytest.mark.parametrize("wrapped_by", ["modules_to_save", "lora"])
def test_soft_prompts_take_a_model_whose_token_embeddings_another_adapter_wraps(config_cls, wrapped_by):
    """The token-embedding table may sit in a peftkit wrapper (a modules_to_save copy, a LoRA of a composition): the
    model still reads token embeddings (the refusal of models without any, ViT or CLIP, took the wrapper for one)."""
    from peftkit import LoraConfig
    from peftkit.methods.compose import ComposedConfig

    x, base = ids(2, 5), tiny_gpt2()
    alone = get_peft_model(copy.deepcopy(base), config_cls(num_virtual_tokens=3, task_type="CAUSAL_LM")).eval()
    if wrapped_by == "modules_to_save":
        config = config_cls(num_virtual_tokens=3, task_type="CAUSAL_LM", modules_to_save=["wte"])
    else:  # LoRA on the embedding starts at zero (peft's init: A = 0)
        config = ComposedConfig(task_type="CAUSAL_LM", configs=[LoraConfig(r=2, target_modules=["wte"]),
                                                                config_cls(num_virtual_tokens=3)])
    model = get_peft_model(base, config).eval()
    assert type(model.get_input_embeddings()).__name__ != "Embedding"  # wrapped
    prompts = [p for n, p in model.named_parameters() if "extra_modules" in n]
    assert len(prompts) == 1
    with torch.no_grad():
        prompts[0].copy_(next(p for n, p in alone.named_parameters() if "extra_modules" in n))
        assert torch.allclose(model(input_ids=x).logits, alone(input_ids=x).logits, atol=1e-6)
