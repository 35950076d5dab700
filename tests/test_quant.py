"""Quantised frozen base (QLoRA and friends): storage, exact forward, gradients, merging, files, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.quant import (
    QuantEmbedding,
    QuantLinear,
    base_weight_memory,
    dequantize_base,
    make_format,
    merge_and_unload_quantized,
    quantize_base,
)
from peftkit.quant.formats import torchao_quantization
from tests.conftest import perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama

METHODS = [("nf4", {}), ("int8", {}), ("int4", {"group_size": 8})]


def lora_pair(model_fn, method, kw, **lora):
    """The same perturbed LoRA on a quantised model and on a float model holding its dequantised weights."""
    quant = quantize_base(model_fn(), method, **kw)
    plain = dequantize_base(copy.deepcopy(quant))
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", **lora)
    q_model, f_model = get_peft_model(quant, LoraConfig(**cfg)), get_peft_model(plain, LoraConfig(**cfg))
    perturb(q_model)
    adapters = {k: v for k, v in q_model.state_dict().items() if "lora_" in k}
    f_model.load_state_dict(adapters, strict=False)
    return q_model, f_model


def test_nf4_storage_is_torchaos_nf4_bit_for_bit():
    tq = torchao_quantization()
    w = torch.randn(48, 64)
    fmt = make_format("nf4", scaler_block_size=16)
    ours = fmt.dequantize(fmt.quantize(w), (48, 64))
    theirs = tq.NF4Tensor.from_tensor(w, 64, 16).get_original_weight()
    assert torch.equal(ours, theirs)
    rows = torch.tensor([5, 0, 47, 5])
    assert torch.equal(fmt.dequantize_rows(fmt.quantize(w), (48, 64), rows), theirs[rows])


@pytest.mark.parametrize("method, kw", [("int8", {}), ("int8", {"group_size": 16, "symmetric": False}),
                                        ("int4", {"group_size": 16})])
def test_affine_storage_rounds_to_the_nearest_level(method, kw):
    w = torch.randn(12, 32)
    fmt = make_format(method, **kw)
    state = fmt.quantize(w)
    deq = fmt.dequantize(state, (12, 32))
    step = state["qscale"].repeat_interleave(fmt.group(32), dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert (deq - w).abs().max() > 0
    if method == "int4":
        assert state["qdata"].shape == (12, 16) and state["qdata"].dtype == torch.uint8  # two codes per byte


@pytest.mark.parametrize("method, kw", METHODS)
@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
def test_qlora_forward_equals_float_lora_over_dequantized_weights(model_fn, method, kw):
    q_model, f_model = lora_pair(model_fn, method, kw)
    x = torch.randint(3, 64, (3, 9))
    with torch.no_grad():
        out_q, out_f = q_model(input_ids=x).logits, f_model(input_ids=x).logits
        with q_model.disable_adapter():
            base = q_model(input_ids=x).logits
    assert (out_q - base).abs().max() > 1e-2  # the adapters matter
    assert (out_q - out_f).abs().max() <= 1e-5
    assert any(isinstance(m, QuantLinear) for m in q_model.modules())


def test_gradients_reach_only_the_adapter_and_the_quantized_base_never_changes():
    q_model, _ = lora_pair(tiny_llama, "nf4", {})
    stored = {k: v.clone() for k, v in q_model.state_dict().items() if ".nf4_" in k}
    x = torch.randint(3, 64, (4, 10))
    opt = torch.optim.AdamW([p for p in q_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    q_model.train()
    for _ in range(15):
        loss = q_model(input_ids=x, labels=x).loss
        loss.backward()
        got = {n for n, p in q_model.named_parameters() if p.grad is not None}
        assert got and all(".lora_A." in n or ".lora_B." in n for n in got)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    now = q_model.state_dict()
    assert stored and all(torch.equal(now[k], v) for k, v in stored.items())


def test_merge_is_exact_and_fifty_cycles_restore_the_codes_bit_for_bit():
    q_model, _ = lora_pair(tiny_llama, "nf4", {})
    layer = q_model.base_model.model.model.layers[0].mlp.up_proj
    codes = {k: v.clone() for k, v in layer.base_layer.quantized_state().items()}
    x = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        unmerged = q_model(input_ids=x).logits
        for _ in range(50):
            q_model.merge_adapter()
            q_model.unmerge_adapter()
        q_model.merge_adapter()
        merged = q_model(input_ids=x).logits
        assert layer.base_layer.merged_weight is not None
        q_model.unmerge_adapter()
    assert (merged - unmerged).abs().max() <= 1e-5
    assert layer.base_layer.merged_weight is None
    assert all(torch.equal(layer.base_layer.quantized_state()[k], v) for k, v in codes.items())


@pytest.mark.parametrize("method, kw, bound", [("nf4", {}, 0.15), ("int8", {}, 0.02), ("int4", {"group_size": 8}, 0.15)])
def test_merge_and_unload_dequantize_is_exact_and_requantize_adds_one_rounding(method, kw, bound):
    x = torch.randint(3, 64, (2, 8))
    plain = {}
    for requantize in (False, True):
        torch.manual_seed(0)
        q_model, _ = lora_pair(tiny_llama, method, kw)
        with torch.no_grad():
            unmerged = q_model(input_ids=x).logits
            plain[requantize] = merge_and_unload_quantized(q_model, requantize=requantize)
        kinds = {type(m) for m in plain[requantize].model.layers.modules()}
        assert (QuantLinear in kinds) == requantize and AdaptedLayer not in kinds
    with torch.no_grad():
        assert (plain[False](input_ids=x).logits - unmerged).abs().max() <= 1e-5
    exact = dict(plain[False].named_modules())
    for name, module in plain[True].named_modules():
        if isinstance(module, QuantLinear):  # the new rounding error, relative to the merged weight
            merged = exact[name].weight
            err = ((module.dequantize() - merged).norm() / merged.norm()).item()
            assert 0 < err < bound


def test_saved_adapter_holds_no_base_weight_and_loads_onto_a_quantized_base(tmp_path):
    torch.manual_seed(3)
    base = tiny_bert_classifier()
    q_model = get_peft_model(quantize_base(copy.deepcopy(base), "nf4"),
                             LoraConfig(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS"))
    perturb(q_model)
    q_model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    others = {k for k in keys if ".lora_A." not in k and ".lora_B." not in k}
    assert others == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}  # the trained head
    assert len(keys) == 2 + 2 * 11  # A and B on 11 layers (query, value, 4 dense a block, pooler)
    x = torch.randint(3, 64, (3, 7))
    with torch.no_grad():
        want = q_model(input_ids=x).logits
        again = PeftModel.from_pretrained(quantize_base(copy.deepcopy(base), "nf4"), tmp_path)
        assert (again(input_ids=x).logits - want).abs().max() <= 1e-6
        on_float = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(input_ids=x).logits
    assert 0 < (on_float - want).abs().max() < 0.5  # only the quantisation error differs


def test_heads_stay_full_precision_and_embeddings_only_on_request():
    model = quantize_base(tiny_bert_classifier(), "nf4")
    assert type(model.classifier) is nn.Linear and type(model.bert.embeddings.word_embeddings) is nn.Embedding
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantLinear)
    lm = quantize_base(tiny_llama(), "int8")
    assert type(lm.lm_head) is nn.Linear
    both = quantize_base(tiny_bert_classifier(), "nf4", block_size=16, quantize_embeddings=True)
    emb = both.bert.embeddings.word_embeddings
    assert isinstance(emb, QuantEmbedding)
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(emb(ids), nn.functional.embedding(ids, emb.dequantize()))


def test_lora_on_a_quantized_embedding_merges_exactly():
    model = quantize_base(tiny_bert_classifier(), "int8", quantize_embeddings=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["word_embeddings", "query"]))
    perturb(peft_model)
    x = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
        plain = merge_and_unload_quantized(peft_model)
        after = plain(input_ids=x).logits
    assert type(plain.bert.embeddings.word_embeddings) is nn.Embedding
    assert (before - after).abs().max() <= 1e-5


class Rescale(Adapter):
    """A non-additive wrap-style adapter that reads the base weight (as DoRA / (IA)^3 do)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(out_features) * 0.3)

    def forward(self, layer, x, y):
        norm = layer.weight.norm(dim=1)  # the base weight, read through the layer
        return y * (1 + self.s) + 0.0 * norm

    def merge_into(self, layer, weight, bias):
        return weight * (1 + self.s.detach())[:, None], bias

    def unmerge_from(self, layer, weight, bias):
        return weight / (1 + self.s.detach())[:, None], bias


def test_any_wrap_style_adapter_works_on_a_quantized_base():
    layer = AdaptedLayer(QuantLinear.from_module(nn.Linear(32, 16, bias=False), make_format("int4", group_size=8)))
    layer.add("a", Rescale(16))
    layer.set_active(["a"])
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = (x @ layer.base_layer.dequantize().T) * (1 + layer.adapters["a"].s)
        assert (layer(x) - want).abs().max() <= 1e-6
        layer.merge(["a"])
        assert (layer(x) - want).abs().max() <= 1e-5
        layer.unmerge()
    assert layer.base_layer.merged_weight is None


def test_quantizing_a_peft_model_quantizes_the_wrapped_base_layers():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    quantize_base(peft_model, "nf4")
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, AdaptedLayer) and isinstance(q_proj.base_layer, QuantLinear)
    assert type(q_proj.adapters["default"].lora_A) is nn.Linear  # adapters are never quantised
    gpt = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="Conv1D that already has adapters"):
        quantize_base(gpt, "nf4")


def test_parameter_count_includes_the_quantized_weights():
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    quant = get_peft_model(quantize_base(tiny_llama(), "nf4"), LoraConfig(r=2, target_modules="all-linear"))
    assert quant.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()


def test_layers_that_cannot_be_blocked_stay_float_with_a_warning():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))  # 48 weights: not a multiple of 64
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay in full precision.*1 \(weight count 48"):
        quantize_base(model, "nf4")
    assert isinstance(model[0], QuantLinear) and type(model[1]) is nn.Linear


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nf3"), "quantisation method 'nf3' is not valid"),
    (dict(method="nf4", block_size=7), "block_size=7 is not valid"),
    (dict(method="nf4", scaler_block_size=0), "scaler_block_size=0 is not valid"),
    (dict(method="int4", group_size=0), "group_size=0 is not valid"),
    (dict(method="int8", group_size=1), "group_size=1 is not valid; expected an integer >= 2"),
    (dict(method="int4", group_size=True), "group_size=True is not valid"),  # bool: failed later in torchao
    (dict(method="nf4", scaler_block_size=True), "scaler_block_size=True is not valid"),
    (dict(method="int8", symmetric="yes"), "symmetric=.yes. is not valid; expected True or False"),
    (dict(method="nf4", group_size=16, symmetric="yes"), "group_size=16 and symmetric='yes' apply to int4/int8 only"),
    (dict(method="int8", skip_modules="lm_head"), "must be a list of name segments"),
])
def test_bad_values_raise_config_error_before_any_change(kwargs, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        quantize_base(model, **kwargs)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_model_without_linear_layers_is_an_error():
    with pytest.raises(ConfigError, match="no layer of the model can be quantised with int8"):
        quantize_base(nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8)), "int8")


@pytest.mark.slow
def test_base_weight_memory_on_the_real_default_model():
    from transformers import AutoModelForSequenceClassification

    from peftkit.train.run import default_model_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=2)
    linear = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
    numel = sum(m.weight.numel() for m in linear)
    quantize_base(model, "nf4")
    mem = base_weight_memory(model)
    # 4 bits + one int8 scale per 64 weights + one float32 factor per 64*256, + 4-byte mean and 16 levels a layer
    assert mem.quantized_bytes == numel // 2 + numel // 64 + 4 * numel // (64 * 256) + len(linear) * (4 + 64)
    assert mem.quantized_float32_bytes == 4 * numel
    assert mem.quantized_ratio <= 0.35 and mem.quantized_ratio == pytest.approx(0.129, abs=1e-3)
    quantize_base(model, "nf4", quantize_embeddings=True)
    assert base_weight_memory(model).ratio <= 0.35  # the whole base, embeddings quantised too


def test_moving_an_adapted_quantized_model_keeps_it_working():
    # AdaptedLayer once shadowed nn.Module._apply, which broke .to() / .float() on every PeftModel
    model = get_peft_model(quantize_base(tiny_llama(), "nf4"), LoraConfig(r=2, target_modules="all-linear"))
    x = torch.randint(3, 64, (1, 4))
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert torch.equal(model.to("cpu").float()(input_ids=x).logits, want)


def test_peft_models_merge_and_unload_on_a_quantised_base_gives_float_merged_layers(tmp_path):
    """``PeftModel.merge_and_unload()`` on a quantised base is the exact ``merge_and_unload_quantized``: merged
    layers become float ``nn.Linear`` (it once left quantised layers holding a float copy besides their codes,
    which ``save_pretrained`` lost: reloaded, they were random)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    q_model, _ = lora_pair(tiny_llama, "nf4", {})
    x = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        unmerged = q_model(input_ids=x).logits
    plain = q_model.merge_and_unload()
    kinds = {type(m) for m in plain.model.layers.modules()}
    assert QuantLinear not in kinds and AdaptedLayer not in kinds
    with torch.no_grad():
        assert (plain(input_ids=x).logits - unmerged).abs().max() <= 1e-5
    plain.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=x).logits
    assert (reloaded - unmerged).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="takes the PeftModel holding the adapters to merge"):
        merge_and_unload_quantized(tiny_llama())


def test_what_a_quantised_base_cannot_take_is_refused_before_any_change():
    model = quantize_base(tiny_llama(), "int8")
    codes = {n: b.clone() for n, b in model.named_buffers()}
    for init in ("pissa", "olora"):  # the residual would be written into a weight decoded afresh on each read
        with pytest.raises(ConfigError, match=f"init_lora_weights='{init}' moves the top-r part .* quantised layer"):
            get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    with pytest.raises(ConfigError, match=r"modules_to_save names quantised module\(s\) \['model.layers.0.mlp.down_proj'"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["down_proj"]))
    with pytest.raises(ConfigError, match="quantised already, with int8; dequantize_base first"):
        quantize_base(model, "nf4")
    assert all(torch.equal(codes[n], b) for n, b in model.named_buffers())
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    tables = quantize_base(tiny_llama(), "int8", quantize_embeddings=True)
    with pytest.raises(ConfigError, match="has 64 rows and cannot be resized to 80"):
        tables.resize_token_embeddings(80)
    assert tables.model.embed_tokens.num_embeddings == 64 and tables.config.vocab_size == 64


def test_a_cast_quantised_model_computes_and_merges_in_the_new_dtype():
    model = quantize_base(tiny_llama(), "nf4").to(torch.bfloat16)
    assert {m.compute_dtype for m in model.modules() if isinstance(m, QuantLinear)} == {torch.bfloat16}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb(peft_model)
    x = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        unmerged = peft_model(input_ids=x).logits
        peft_model.merge_adapter()  # met a float32 weight and a bf16 input before
        merged = peft_model(input_ids=x).logits
    assert merged.dtype == torch.bfloat16 and (merged - unmerged).abs().max() <= 0.05


def test_bitfit_trains_the_float_biases_of_a_quantised_base():
    """A bias is a float parameter also on a quantised layer: BitFit selects it (it was refused with the rest
    of the selective methods, which change weights the quantised layer holds as codes)."""
    from peftkit import BitFitConfig

    quant = quantize_base(tiny_bert_classifier(), "int8")
    plain = dequantize_base(copy.deepcopy(quant))
    config = dict(target_modules=["query", "value"])
    q_model, f_model = get_peft_model(quant, BitFitConfig(**config)), get_peft_model(plain, BitFitConfig(**config))
    perturb(q_model)
    f_model.load_state_dict({k: v for k, v in q_model.state_dict().items() if "diff" in k}, strict=False)
    x = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        out = q_model(input_ids=x).logits
        with q_model.disable_adapter():
            assert (q_model(input_ids=x).logits - out).abs().max() > 1e-4  # the differences act
        assert (f_model(input_ids=x).logits - out).abs().max() <= 1e-6
        q_model.merge_adapter()
        assert (q_model(input_ids=x).logits - out).abs().max() <= 1e-5
        q_model.unmerge_adapter()
    with pytest.raises(ConfigError, match="a quantised layer holds its weight as integer codes"):
        from peftkit import PartialConfig

        get_peft_model(quantize_base(tiny_bert_classifier(), "int8"), PartialConfig(target_modules=["query"]))


def test_casting_a_quantised_model_keeps_the_format_scales():
    """.half() cast NF4's float32 block scales too: above float16's range (weights of std <~ 1.5e-3) they became
    inf and the weight error doubled (0.092 -> 0.184)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.001)
    model = quantize_base(torch.nn.Sequential(copy.deepcopy(lin)), "nf4")
    before = model[0].weight.clone()
    assert model[0].nf4_factor.max() > torch.finfo(torch.float16).max  # the case that overflowed
    keys = list(model.state_dict())
    model.half()
    assert model[0].nf4_factor.dtype == torch.float32 and torch.isfinite(model[0].nf4_factor).all()
    assert model[0].weight.dtype == torch.float16 and list(model.state_dict()) == keys
    assert (model[0].weight.float() - before).abs().max() <= 4e-6  # float16 rounding of weights of ~4e-3 at most
    assert model(torch.randn(2, 256, dtype=torch.float16)).dtype == torch.float16


def test_a_failed_move_leaves_the_quantised_storage_in_place():
    """A cast or move that raised (no such device, out of memory) left the format's buffers unregistered: the
    state dict lost them and the next forward raised AttributeError."""
    model = quantize_base(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), "nf4",
                          skip_modules=[])
    keys, x = list(model.state_dict()), torch.randn(1, 64)
    before = model(x)

    def boom(t):
        if t.is_floating_point():
            raise RuntimeError("no such device")
        return t

    with pytest.raises(RuntimeError, match="no such device"):
        model._apply(boom)
    assert list(model.state_dict()) == keys and torch.equal(model(x), before)


def test_gpt2_conv1d_layers_come_back_as_conv1d_so_a_merged_export_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from peftkit.quant import dequantize_base

    model = quantize_base(tiny_gpt2(), "nf4")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
    x = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
    # under adapters a dequantised layer stays linear (the adapters' layout)
    live = dequantize_base(copy.deepcopy(peft_model))
    assert isinstance(live.base_model.model.transformer.h[0].attn.c_attn.base_layer, nn.Linear)
    merged = dequantize_base(peft_model.merge_and_unload())
    block = merged.transformer.h[0]
    assert all(type(m) is Conv1D for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
    merged.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["unload", "delete_adapter"])
def test_a_pissa_start_quantised_after_gives_the_original_back_up_to_one_rounding(how):
    """PiSSA on the float model, then quantize_base on the PeftModel: removing the adapter puts the principal
    part back into the (quantised again) base, not into a decoded copy that is thrown away."""
    original = tiny_llama()
    x = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        reference = original(input_ids=x).logits
    rounding = (quantize_base(copy.deepcopy(original), "int8")(input_ids=x).logits - reference).abs().max()
    model = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights="pissa"))
    quantize_base(model, "int8")
    with torch.no_grad():
        if how == "unload":
            plain = model.unload()
        else:
            model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
            model.delete_adapter("default")
            plain = model
        assert isinstance(plain.get_base_model().model.layers[0].self_attn.q_proj.base_layer
                          if how != "unload" else plain.model.layers[0].self_attn.q_proj, QuantLinear)
        drift = (plain(input_ids=x).logits - reference).abs().max()
    assert drift < 4 * rounding + 1e-3, (drift, rounding)


@pytest.mark.parametrize("target", [None, "all-linear", ["q_proj"]])
def test_diff_pruning_on_a_bias_free_quantised_layer_is_refused_as_on_one_with_a_bias(target):
    from peftkit import DiffPruningConfig

    model = quantize_base(tiny_llama(), "int8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="a quantised layer holds its weight as integer codes"):
        get_peft_model(model, DiffPruningConfig(target_modules=target))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_state_dict_taken_while_merged_loads_into_an_unmerged_model():
    model = get_peft_model(quantize_base(tiny_llama(), "nf4"), LoraConfig(r=2, target_modules=["q_proj"]))
    twin = copy.deepcopy(model)
    model.merge_adapter()
    state = model.state_dict()
    assert not any(k.endswith("merged_weight") for k in state)
    twin.load_state_dict(state)  # strict


def test_a_second_pass_with_another_method_is_refused_rather_than_mixing_formats():
    model = tiny_llama()
    with pytest.warns(UserWarning, match="stay in full precision"):
        quantize_base(model, "int4", group_size=24)  # only the layers with 24 | in_features (down_proj)
    methods = {m.fmt.method for m in model.modules() if isinstance(m, QuantLinear)}
    assert methods == {"int4"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"quantised layers use int4; quantising .* with nf4 would mix formats"):
        quantize_base(model, "nf4")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
