"""peftkit across HF transformers architectures: tiny random models of many families, each adapted with the
methods that apply to it, checked for targets (against peft 0.21.2's defaults), training, merging, files that
move both ways with peft, generation, and clear refusals where a method cannot apply."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers as T
from peft.tuners.tuners_utils import BaseTunerLayer

import peftkit
from peftkit.layers import AdaptedLayer
from tests.conftest import perturb

V = 64  # vocabulary
H = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
TOKENS = dict(vocab_size=V, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
CLIP_TEXT = dict(**H, **{**TOKENS, "max_position_embeddings": 32})
GPT = dict(n_embd=16, n_layer=2, n_head=2, n_positions=64, vocab_size=V, bos_token_id=0, eos_token_id=1)
BART = dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)

# name -> (config class, model class, config fields, input kind)
ARCHS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(**H, **TOKENS, num_key_value_heads=1, head_dim=8), "causal"),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(**H, **TOKENS), "causal"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(**H, **TOKENS, num_key_value_heads=1), "causal"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(**GPT, rotary_dim=4), "causal"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(**{k: v for k, v in H.items() if k != "intermediate_size"},
                                                         **TOKENS, new_decoder_architecture=False, multi_query=True),
               "causal"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=16, n_layer=2, n_head=2, vocab_size=V), "causal"),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=16, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=V),
            "causal"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(**{k: v for k, v in H.items() if k != "intermediate_size"}, **TOKENS,
                                                ffn_dim=32, word_embed_proj_dim=16), "causal"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(**H, **TOKENS, num_key_value_heads=1, head_dim=8), "causal"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(**H, **TOKENS, num_key_value_heads=1), "causal"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   dict(**H, vocab_size=V, max_position_embeddings=64, pad_token_id=0), "cls"),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification",
               dict(**H, vocab_size=V, max_position_embeddings=64, embedding_size=16, pad_token_id=0), "cls"),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", BART, "seq2seq"),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                     max_source_positions=8, max_target_positions=32, pad_token_id=2, bos_token_id=0, eos_token_id=1,
                     decoder_start_token_id=0), "speech"),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(**H, image_size=8, patch_size=4, num_labels=2), "image"),
    "clip": ("CLIPConfig", "CLIPModel", dict(text_config=CLIP_TEXT,
                                             vision_config=dict(**H, image_size=8, patch_size=4), projection_dim=8),
             "clip"),
    "clip_text": ("CLIPTextConfig", "CLIPTextModel", CLIP_TEXT, "text"),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", dict(**H, image_size=8, patch_size=4), "image"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification",
                 dict(**H, vocab_size=V, conv_dim=(8, 8), conv_kernel=(4, 2), conv_stride=(4, 2), num_labels=2,
                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, mask_time_prob=0.0), "audio"),
}
TASKS = {"causal": "CAUSAL_LM", "cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


def build(arch: str) -> torch.nn.Module:
    """A tiny randomly initialised model of ``arch`` (seeded: two calls give the same weights), in eval mode."""
    cfg_cls, model_cls, fields, _ = ARCHS[arch]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(T, model_cls)(getattr(T, cfg_cls)(**fields)).eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of 2: token ids ``(2, 6)``, pixels ``(2, 3, 8, 8)``, audio ``(2, 64)`` or mel
    features ``(2, 8, 16)``, with decoder ids ``(2, 4)`` for encoder-decoder models."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (2, 6), generator=g)
    kind = ARCHS[arch][3]
    pixels = torch.randn(2, 3, 8, 8, generator=g)
    return {"causal": dict(input_ids=ids), "cls": dict(input_ids=ids), "text": dict(input_ids=ids),
            "seq2seq": dict(input_ids=ids, decoder_input_ids=ids[:, :4]),
            "speech": dict(input_features=torch.randn(2, 8, 16, generator=g), decoder_input_ids=ids[:, :4]),
            "image": dict(pixel_values=pixels), "clip": dict(input_ids=ids, pixel_values=pixels),
            "audio": dict(input_values=torch.randn(2, 64, generator=g))}[kind]


def out(model: torch.nn.Module, x: dict[str, torch.Tensor], peft_model: bool = False) -> torch.Tensor:
    """The model's main output tensor (logits, CLIP's image-text logits, or the last hidden state). peft's
    ``PeftModelForSeq2SeqLM`` passes ``input_ids=None`` next to Whisper's features, which Whisper refuses, so peft's
    Whisper model is called through its tuner."""
    if peft_model and "input_features" in x:
        model = model.base_model
    with torch.no_grad():
        o = model(**x)
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        if getattr(o, key, None) is not None:
            return getattr(o, key)
    raise AssertionError(type(o))


def adapted(model: torch.nn.Module, kind: type) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, kind))


def check_both_ways(arch: str, make_config, tmp_path, task: str | None = None) -> peftkit.PeftModel:
    """Adapt ``arch`` with ``make_config(peftkit)`` and ``make_config(peft)``: the same modules; training moves only
    adapter parameters; merge/unmerge exact to 1e-5; each library loads the other's file with the same output
    (1e-5); returns the peftkit model."""
    x = inputs(arch)
    ours = peftkit.get_peft_model(build(arch), make_config(peftkit))
    theirs = peft.get_peft_model(build(arch), make_config(peft))
    assert adapted(ours, AdaptedLayer) == adapted(theirs, BaseTunerLayer)
    perturb(ours)
    perturb(theirs)
    plain = out(build(arch), x)
    y = out(ours, x)
    assert (y - plain).abs().max() > 1e-5  # the adapter acts
    ours.train()
    loss = next(v for k, v in vars(ours(**x)).items() if k != "loss" and isinstance(v, torch.Tensor)).pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all(p.requires_grad for n, p in ours.named_parameters() if n in grads)
    assert any(g.abs().max() > 0 for g in grads.values())
    ours.eval()
    ours.merge_adapter()
    merged = out(ours, x)
    ours.unmerge_adapter()
    assert (merged - y).abs().max() <= 1e-5 and (out(ours, x) - y).abs().max() <= 1e-5
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ours")
    in_ours = peftkit.PeftModel.from_pretrained(build(arch), tmp_path / "theirs")
    assert (out(in_peft, x, peft_model=True) - y).abs().max() <= 1e-5
    assert (out(in_ours, x) - out(theirs, x, peft_model=True)).abs().max() <= 1e-5
    return ours


def test_default_target_tables_hold_every_model_type_peft_knows():
    """(IA)^3 had no defaults for Gemma 2, Gemma 3, Phi, GPT-J, GPT-Neo, GPT-BigCode, Mixtral, Llama 4, DeBERTa and
    the RefinedWeb names, where peft 0.21.2 has them: a config without target_modules was refused there."""
    from peft.utils import constants as c

    from peftkit.methods.ia3 import IA3_DEFAULTS
    from peftkit.targeting import LORA_TARGET_DEFAULTS

    pairs = [(LORA_TARGET_DEFAULTS, c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
             ({k: v[0] for k, v in IA3_DEFAULTS.items()}, c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING),
             ({k: v[1] for k, v in IA3_DEFAULTS.items()}, c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING)]
    for ours, theirs in pairs:
        assert sorted(set(theirs) - set(ours)) == []
        assert {k: v for k, v in theirs.items() if list(v) != list(ours[k])} == {}


@pytest.mark.parametrize("arch", ["gemma2", "phi", "gptj"])
def test_ia3_defaults_on_decoders_peft_covers(arch, tmp_path):
    """(IA)^3 with peft's default targets and feed-forward modules on Gemma 2, Phi and GPT-J (refused before)."""
    ours = check_both_ways(arch, lambda lib: lib.IA3Config(task_type="CAUSAL_LM"), tmp_path)
    ff = {"gemma2": ["down_proj"], "phi": ["fc2"], "gptj": ["fc_out"]}[arch]
    assert ours.peft_config["default"].feedforward_modules == ff
    assert len(adapted(ours, AdaptedLayer)) == 6  # 2 blocks x 3 targets


@pytest.mark.parametrize("arch", ["falcon", "bloom", "mpt", "opt", "qwen3"])
def test_lora_defaults_on_decoders_match_peft_and_generate_alike(arch, tmp_path):
    ours = check_both_ways(arch, lambda lib: lib.LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM",
                                                            init_lora_weights=False), tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path / "ours")
    ids = inputs(arch)["input_ids"]
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=2)
    assert torch.equal(ours.generate(input_ids=ids, **kw), theirs.generate(input_ids=ids, **kw))


# model types neither library has LoRA defaults for: the refusal names the type; explicit targets work both ways
EXPLICIT = {"phi3": ["qkv_proj"], "starcoder2": ["q_proj", "v_proj"], "albert": ["query", "value"],
            "mbart": ["q_proj", "v_proj"], "whisper": ["q_proj", "v_proj"], "vit": ["q_proj", "v_proj"],
            "clip": ["q_proj", "v_proj"], "wav2vec2": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("arch", list(EXPLICIT))
def test_lora_with_explicit_targets_where_no_defaults(arch, tmp_path):
    kind = ARCHS[arch][3]
    task = TASKS.get(kind)
    with pytest.raises(peftkit.ConfigError, match=rf"no default targets for model_type='{arch}'.*give target_modules"):
        peftkit.get_peft_model(build(arch), peftkit.LoraConfig(task_type=task))
    ours = check_both_ways(arch, lambda lib: lib.LoraConfig(r=2, target_modules=EXPLICIT[arch], task_type=task),
                           tmp_path)
    if kind == "speech":  # generation reads the encoder's features and writes the adapted decoder's tokens
        assert ours.generate(input_features=inputs(arch)["input_features"], max_new_tokens=2).shape[0] == 2


@pytest.mark.parametrize("arch, method", [
    ("vit", "PromptTuningConfig"), ("vit", "PrefixTuningConfig"), ("clip", "PromptTuningConfig"),
    ("clip_vision", "PromptEncoderConfig"), ("wav2vec2", "PrefixTuningConfig"), ("clip_text", "PromptTuningConfig"),
    ("whisper", "PromptTuningConfig")])
def test_soft_prompts_refuse_models_without_token_inputs(arch, method):
    """Vision and audio models have no token table (ViT crashed with an AttributeError, CLIP and Wav2Vec2 with
    transformers' NotImplementedError); CLIP's text model and Whisper's encoder take no inputs_embeds (both were
    adapted and failed at the first forward). The refusal comes at get_peft_model, names the model type and what
    works, and leaves the model untouched."""
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = getattr(peftkit, method)(num_virtual_tokens=2, **({"encoder_hidden_size": 8}
                                                                if method == "PromptEncoderConfig" else {}))
    what = "takes no inputs_embeds" if arch in ("clip_text", "whisper") else "has no token-embedding table"
    kind = {"clip_text": "clip_text_model", "clip_vision": "clip_vision_model"}.get(arch, arch)
    with pytest.raises(peftkit.ConfigError, match=rf"model_type='{kind}'.*{what}.*LoRA, \(IA\)\^3, BitFit"):
        peftkit.get_peft_model(model, config)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_prefix_tuning_on_whisper_writes_the_decoder_cache(tmp_path):
    """Whisper's encoder reads audio, yet prefix tuning applies: its prefixes go to the decoder's cache."""
    x = inputs("whisper")
    model = peftkit.get_peft_model(build("whisper"), peftkit.PrefixTuningConfig(num_virtual_tokens=3,
                                                                                task_type="SEQ_2_SEQ_LM"))
    perturb(model)
    y = out(model, x)
    assert (y - out(build("whisper"), x)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(build("whisper"), tmp_path)
    assert (out(loaded, x) - y).abs().max() <= 1e-6
    # Whisper's generate returns the new tokens without the start token; they are the greedy choices of the forward
    dec = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(3):
        dec = torch.cat([dec, out(loaded, dict(input_features=x["input_features"], decoder_input_ids=dec))[:, -1:]
                         .argmax(-1)], dim=1)
    generated = loaded.generate(input_features=x["input_features"], max_new_tokens=3, min_new_tokens=3)
    assert torch.equal(generated, dec[:, 1:])


def test_bitfit_trains_the_bias_of_a_weight_normed_convolution(tmp_path):
    """Wav2Vec2's positional convolution keeps its weight as a weight-norm parametrisation: BitFit's default (every
    bias) was refused there ("no 'weight' parameter"); its bias trains, merges exactly and the weight is untouched."""
    x = inputs("wav2vec2")
    base = build("wav2vec2")
    conv = base.wav2vec2.encoder.pos_conv_embed.conv
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    model = peftkit.get_peft_model(base, peftkit.BitFitConfig())
    assert any("pos_conv_embed.conv." in n for n, p in model.named_parameters() if p.requires_grad)
    perturb(model)
    y = out(model, x)
    model.save_pretrained(tmp_path)
    merged = model.merge_and_unload()
    conv = merged.wav2vec2.encoder.pos_conv_embed.conv
    assert (out(merged, x) - y).abs().max() <= 1e-5
    assert torch.equal(conv.weight, weight) and (conv.bias - bias).abs().max() > 1e-2
    assert (out(peftkit.PeftModel.from_pretrained(build("wav2vec2"), tmp_path), x) - y).abs().max() <= 1e-6


@pytest.mark.parametrize("arch, sites", [
    ("deberta-v2", ["deberta.encoder.layer.0.attention.output.dense", "deberta.encoder.layer.0.output.dense"]),
    ("gemma2", ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]),
    ("phi3", ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]),
    ("starcoder2", ["model.layers.0.mlp.c_proj", "model.layers.0.self_attn.o_proj"]),
    ("vit", ["vit.layers.0.attention.o_proj", "vit.layers.0.mlp.fc2"])])
def test_houlsby_default_sites(arch, sites, tmp_path):
    """Houlsby adapters after each block's attention and FFN output projections, from the model type alone (these
    types had no sites: a config without target_modules was refused)."""
    x = inputs(arch)
    model = peftkit.get_peft_model(build(arch), peftkit.HoulsbyConfig(reduction_factor=4))
    assert adapted(model, AdaptedLayer) == sorted(sites + [s.replace(".0.", ".1.") for s in sites])
    assert (out(model, x) - out(build(arch), x)).abs().max() == 0  # identity at the start
    perturb(model)
    y = out(model, x)
    model.save_pretrained(tmp_path)
    assert (out(peftkit.PeftModel.from_pretrained(build(arch), tmp_path), x) - y).abs().max() <= 1e-6
