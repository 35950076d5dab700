"""PeftModel's lifecycle API: adapters, activation, disabling, merging, parameters, errors."""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

from peftkit import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.layers import AdaptedLayer, ModulesToSaveWrapper
from tests.conftest import ids, perturb, tiny_bert_classifier


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def test_add_set_delete_adapters():
    base = mlp()
    x = torch.randn(5, 6)
    with torch.no_grad():
        plain = base(x)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=3, target_modules=["2"], init_lora_weights=False))
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default", "b"]
    with torch.no_grad():
        out_a = model(x)
        model.set_adapter("b")
        out_b = model(x)
        model.set_adapter(["default", "b"])
        out_ab = model(x)
    assert model.active_adapter == "default"
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_ab, out_a)
    # only active adapters train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".default." in n for n in trainable) and any(".b." in n for n in trainable)
    model.set_adapter("b")
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert isinstance(base[2], nn.Linear)  # unwrapped: no adapter left on it
    model.delete_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    assert isinstance(base[0], nn.Linear)


def test_unknown_adapter_names_raise():
    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"]))
    for call in (lambda: model.set_adapter("nope"), lambda: model.delete_adapter("nope"),
                 lambda: model.merge_adapter(["nope"]), lambda: model.save_pretrained("/tmp/x", ["nope"])):
        with pytest.raises(ConfigError, match="'nope'"):
            call()
    with pytest.raises(ConfigError, match="already exists"):
        model.add_adapter("default", LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="adapter_name"):
        model.add_adapter("a.b", LoraConfig(r=2, target_modules=["0"]))


def test_disable_adapter_nests_and_restores_after_exception():
    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(3, 6)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            base = model(x)
            with model.disable_adapter():
                assert torch.equal(model(x), base)
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), adapted)
        with pytest.raises(RuntimeError), model.disable_adapter():
            raise RuntimeError("boom")
        assert torch.equal(model(x), adapted)
        # merged state is restored too
        model.merge_adapter()
        with model.disable_adapter():
            assert torch.allclose(model(x), base, atol=1e-6)
        assert model.base_model.merged_adapters() == ["default"]
        assert torch.allclose(model(x), adapted, atol=1e-5)


def test_modules_to_save_is_trained_saved_and_bypassed_when_disabled(tmp_path):
    base = tiny_bert_classifier()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert isinstance(base.classifier, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in base.classifier.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in base.classifier.original_module.parameters())
    with torch.no_grad():
        base.classifier.modules_to_save["default"].weight.add_(1.0)
    x = ids()
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=x).logits
        on = model(input_ids=x).logits
    assert (on - off).abs().max() > 0.1
    from peftkit import get_peft_model_state_dict

    keys = set(get_peft_model_state_dict(model))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_seq_cls_task_type_saves_the_head():
    base = tiny_bert_classifier()
    get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert isinstance(base.classifier, ModulesToSaveWrapper)


def test_no_matching_target_lists_existing_modules_and_leaves_model_unchanged():
    base = tiny_bert_classifier()
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ConfigError) as err:
        get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"]))
    msg = str(err.value)
    assert "q_proj" in msg and "bert.encoder.layer.0.attention.self.query" in msg and "'value'" in msg
    assert {n: type(m) for n, m in base.named_modules()} == before


@pytest.mark.parametrize("kw, fragment", [
    (dict(r=0), "r=0"), (dict(r=-2), "r=-2"), (dict(r=2.5), "r=2.5"), (dict(lora_alpha=0), "lora_alpha=0"),
    (dict(lora_dropout=1.0), "lora_dropout=1.0"), (dict(bias="some"), "bias='some'"),
    (dict(init_lora_weights="pisa"), "init_lora_weights='pisa'"), (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(task_type="CLS"), "task_type='CLS'"), (dict(target_modules=[]), "target_modules=[] adapts nothing"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    # a container of the right kind names the entry that does not fit (it said only "got list")
    (dict(target_modules=["query", 3]), "got list holding 3 (int; expected a string)"),
    (dict(alpha_pattern={"query": "x"}), "got dict whose entry 'query' is 'x' (str; expected"),
])
def test_invalid_config_values_are_named(kw, fragment):
    args = dict(target_modules=["query"]) | kw
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        LoraConfig(**args)


def test_unsupported_module_type_is_an_error():
    with pytest.raises(ConfigError, match="LayerNorm"):
        get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["LayerNorm"]))


def test_merge_and_unload_and_unload_return_plain_models():
    base = tiny_bert_classifier()
    reference = tiny_bert_classifier()
    reference.load_state_dict(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))
    perturb(model)
    x = ids()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = model.merge_and_unload()
        assert not any(isinstance(m, (AdaptedLayer, ModulesToSaveWrapper)) for m in merged.modules())
        assert (merged(input_ids=x).logits - adapted).abs().max() <= 1e-5
    model2 = get_peft_model(reference, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    perturb(model2)
    with torch.no_grad():
        plain = tiny_bert_classifier()
        plain.load_state_dict(model2.unload().state_dict())
        assert not any(isinstance(m, AdaptedLayer) for m in reference.modules())


def test_base_model_answers_the_wrapped_models_attributes_as_peft_s_tuner_model():
    """``model.base_model.config`` / ``.device`` / ``.get_input_embeddings()`` / a submodule reach the adapted model,
    as on peft's ``LoraModel``; the host's own attributes win, and a missing one is still an AttributeError."""
    base = tiny_bert_classifier()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    host = model.base_model
    assert host.config is base.config and host.config.num_labels == 2
    assert host.device == torch.device("cpu") and host.dtype == torch.float32
    assert host.get_input_embeddings() is base.bert.embeddings.word_embeddings
    assert host.bert is base.bert and host.model is base
    assert host.peft_config is not base.config and list(host.peft_config) == ["default"]  # the host's own
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = host.no_such_attribute
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert twin.base_model.config.num_labels == 2
            assert torch.equal(twin(input_ids=x).logits, expected)


def test_print_trainable_parameters(capsys):
    model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0"]))
    model.print_trainable_parameters()
    # r*(6+8) = 28 trainable; base 6*8+8 + 8*4+4 = 92
    assert capsys.readouterr().out.strip() == "trainable params: 28 || all params: 120 || trainable%: 23.3333"
    assert model.get_nb_trainable_parameters() == (28, 120)


def test_layers_to_transform_and_exclude_and_regex_targets():
    base = tiny_bert_classifier()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[1],
                                            exclude_modules=["value"]))
    wrapped = [n for n, m in base.named_modules() if isinstance(m, AdaptedLayer)]
    assert wrapped == ["bert.encoder.layer.1.attention.self.query"]
    base2 = tiny_bert_classifier()
    get_peft_model(base2, LoraConfig(r=2, target_modules=r".*layer\.0\..*\.(key|value)"))
    wrapped = [n for n, m in base2.named_modules() if isinstance(m, AdaptedLayer)]
    assert wrapped == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.value"]
    assert isinstance(model, PeftModel)


def test_exclude_modules_removing_every_match_is_named_in_the_error():
    """The error blamed target_modules ("matched no module") when exclude_modules had removed every match."""
    base = tiny_bert_classifier()
    with pytest.raises(ConfigError, match=r"target_modules=\['query'\] matched \['bert.encoder.layer.0.attention.self."
                                          r"query', 'bert.encoder.layer.1.attention.self.query'\], but "
                                          r"exclude_modules=\['query'\] removes every one of them"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["query"], exclude_modules=["query"]))
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_all_linear_skips_output_layer():
    from tests.conftest import tiny_llama

    base = tiny_llama()
    get_peft_model(base, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, AdaptedLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(base.lm_head, nn.Linear)


def test_tied_embedding_merge_keeps_output_layer_exact():
    from tests.conftest import tiny_gpt2

    base = tiny_gpt2()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["wte"]))
    perturb(model)
    x = ids()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        shared = base.lm_head.weight
        model.merge_adapter()
        assert (model(input_ids=x).logits - adapted).abs().max() <= 1e-5
        model.unmerge_adapter()
        assert base.transformer.wte.base_layer.weight is shared  # the tie is back


def test_merge_and_unload_of_a_tied_embedding_declares_it_untied(tmp_path):
    """The merge unties GPT-2's wte from lm_head, but the config still said tie_word_embeddings=True: a saved
    copy loaded with a warning, and tie_weights() (resize_token_embeddings calls it) silently tied them again."""
    from transformers import GPT2LMHeadModel

    from tests.conftest import tiny_gpt2

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["wte"]))
    perturb(model)
    x = ids()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = model.merge_and_unload()
        assert merged.config.tie_word_embeddings is False
        merged.tie_weights()
        assert (merged(input_ids=x).logits - adapted).abs().max() <= 1e-5
        merged.save_pretrained(tmp_path)
        reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert reloaded.config.tie_word_embeddings is False
        assert (reloaded(input_ids=x).logits - adapted).abs().max() <= 1e-5


def test_a_misspelt_target_module_warns():
    from peftkit.targeting import UnmatchedTargetWarning

    with pytest.warns(UnmatchedTargetWarning, match=r"entries \['vlaue'\] match no module"):
        model = get_peft_model(tiny_bert_classifier(), LoraConfig(target_modules=["query", "vlaue"]))
    assert model.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize(("kw", "message"), [
    (dict(target_modules=r".*\.query", layers_to_transform=[1]),
     r"layers_to_transform=\[1\] cannot be used with target_modules given as a string"),
    (dict(target_modules="all-linear", layers_to_transform=0), "layers_to_transform=0 cannot be used"),
    (dict(target_modules=["query"], layers_pattern="layer"),
     "layers_pattern='layer' needs layers_to_transform"),
])
def test_block_options_that_peft_refuses_are_refused_before_the_model_changes(kw, message):
    base = tiny_bert_classifier()
    modules = [type(m) for m in base.modules()]
    with pytest.raises(ConfigError, match=message):
        get_peft_model(base, LoraConfig(r=2, **kw))
    assert [type(m) for m in base.modules()] == modules


def test_rank_and_alpha_pattern_keys_that_match_no_adapted_module_warn():
    from peftkit.targeting import UnmatchedTargetWarning

    with pytest.warns(UnmatchedTargetWarning, match=r"rank_pattern keys \['quary'\] match none of the 4 adapted"):
        model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query", "value"],
                                                                  rank_pattern={"quary": 4, "value": 3}))
    assert {m.adapters["default"].r for m in model.modules() if isinstance(m, AdaptedLayer)} == {2, 3}
    with pytest.warns(UnmatchedTargetWarning, match=r"alpha_pattern keys \['key'\]"):
        get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], alpha_pattern={"key": 4}))


@pytest.mark.parametrize("entry", ["", " ", ".classifier", "classifier."])
def test_modules_to_save_entries_that_are_not_module_names_are_refused(entry):
    with pytest.raises(ConfigError, match=r"modules_to_save entries \[.*\] are not module names"):
        LoraConfig(r=2, target_modules=["query"], modules_to_save=[entry])


class _TorchAttentionNet(nn.Module):
    """torch's own attention and Transformer layer, which read some sub-layers' tensors directly."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(x + self.attn(x, x, x, need_weights=False)[0]))


def test_wrapped_layers_inside_torch_attention_act_in_eval_mode_or_are_refused():
    """LoRA on an nn.TransformerEncoderLayer's linear layers did nothing in eval mode without gradients (its fast
    path reads their weights directly), and on nn.MultiheadAttention's out_proj nothing at all unmerged."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = get_peft_model(_TorchAttentionNet(), LoraConfig(r=2, target_modules=["linear1", "linear2"],
                                                            init_lora_weights=False)).eval()
    with torch.no_grad():
        out = model(x)
        with model.disable_adapter():
            assert (model(x) - out).abs().max() > 1e-2
        model.train()
        assert (model(x) - out).abs().max() <= 1e-6  # (no dropout) the same path in both modes
        model.eval()
        model.merge_adapter()
        assert (model(x) - out).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match=r"'attn.out_proj': it is the out_proj of a torch.nn.MultiheadAttention"):
        get_peft_model(_TorchAttentionNet(), LoraConfig(r=2, target_modules=["out_proj", "head"]))
    adapted = get_peft_model(_TorchAttentionNet(), LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {n.rsplit(".adapters", 1)[0] for n, _ in adapted.named_modules() if n.endswith(".adapters")}
    assert wrapped == {"base_model.model.block.linear1", "base_model.model.block.linear2", "base_model.model.head"}


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=24, num_layers=2, num_heads=2, d_kv=8))


def _adapted(model) -> set[str]:
    return {n for n, _ in model.base_model.wrappers()}


def _peft_adapted(model) -> set[str]:
    return {n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q", "v"], layers_to_transform=[1]),  # T5: block 1 (encoder.block.1.layer.0...), as peft
    dict(target_modules=["q", "v"], layers_to_transform=[0], layers_pattern="bl.ck"),  # a regex, as in peft
    dict(target_modules=["encoder.block.0.layer.0.SelfAttention.q", "v"], layers_to_transform=[1]),  # named in full
    dict(target_modules=["q"], layers_to_transform=[]),  # every block
    dict(target_modules="ALL-LINEAR"),  # any letter case
], ids=["t5-block", "regex-pattern", "full-name", "empty-list", "all-linear-case"])
def test_block_selection_is_peft_s(kw, tmp_path):
    """peftkit read T5's sub-layer index (layer.M) as the block and adapted cross-attention in every decoder
    block; a regex layers_pattern, [] and a full module name differed from peft too, so peft's files did not load."""
    import peft

    ours = get_peft_model(_t5(), LoraConfig(r=2, **kw))
    theirs = peft.get_peft_model(_t5(), peft.LoraConfig(r=2, **kw))
    assert _adapted(ours) == _peft_adapted(theirs) and _adapted(ours)
    theirs.save_pretrained(tmp_path)
    PeftModel.from_pretrained(_t5(), tmp_path)  # peft's file fits the modules peftkit adapts


def test_an_invalid_layers_pattern_regex_is_refused():
    with pytest.raises(ConfigError, match=r"layers_pattern='layers\[' is read as regular expression"):
        LoraConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern="layers[")


def test_a_torch_encoder_with_a_padding_mask_runs_the_adapters_in_eval():
    """nn.TransformerEncoder turns a padded eval input into a nested tensor for the fast path, which the layers'
    regular path (taken for their adapters) cannot read: it raised."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 2)
    model = get_peft_model(enc, LoraConfig(r=2, target_modules=["linear1"], init_lora_weights=False))
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        trained_path = model.train()(x, src_key_padding_mask=mask)
        out = model.eval()(x, src_key_padding_mask=mask)
        with model.disable_adapter():
            assert (model(x, src_key_padding_mask=mask)[0] - out[0]).abs().max() > 1e-3
    assert (out[0] - trained_path[0]).abs().max() <= 1e-5 and (out[1, :3] - trained_path[1, :3]).abs().max() <= 1e-5


@pytest.mark.parametrize("copied", ["norm1", "self_attn", "out_proj"])
def test_modules_to_save_inside_torch_transformer_layers(copied):
    """A copied LayerNorm, attention or attention output projection answered none of the attributes torch's layer
    reads (eps, batch_first, weight): every eval forward raised; peft forwards them to the copy."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 1,
                                enable_nested_tensor=False)
    model = get_peft_model(enc, LoraConfig(r=2, target_modules=["linear1"], modules_to_save=[copied]))
    perturb(model)  # the copies too
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        trained_path = model.train()(x)
        out = model.eval()(x)
    assert (out - trained_path).abs().max() <= 1e-5


@pytest.mark.parametrize("pattern", ["(layers|h)", "lay(er)s", "layers|h"])
def test_a_layers_pattern_with_groups_of_its_own_selects_as_peft(pattern):
    """layer_index read the pattern's own first group as the block index (int('layers') raised)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1))

    kw = dict(r=2, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = peft.get_peft_model(llama(), peft.LoraConfig(**kw))
        except ValueError:  # an alternation that matches without the index: no block, and nothing to adapt
            with pytest.raises(ConfigError, match="matched no module"):
                get_peft_model(llama(), LoraConfig(**kw))
            return
        ours = get_peft_model(llama(), LoraConfig(**kw))
    wanted = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert {n for n, _ in ours.base_model.wrappers()} == wanted


def test_loha_ignores_layers_to_transform_with_a_regex_as_peft(tmp_path):
    """peft's LoHa takes layers_to_transform next to a regex and selects by the regex; its file was refused."""
    from peftkit import LoHaConfig

    with pytest.warns(UserWarning, match=r"layers_to_transform=\[0\] is ignored with target_modules given as a string"):
        model = get_peft_model(tiny_bert_classifier(), LoHaConfig(r=2, target_modules=r".*\.(query|value)",
                                                                  layers_to_transform=[0]))
    assert len(list(model.base_model.wrappers())) == 4  # both blocks' query and value


def test_a_model_whose_forward_is_a_per_instance_partial_is_freed_and_its_positional_mask_found():
    """accelerate's hooks (device_map, offloading) replace ``model.forward`` by ``partial(new_forward, model)``: the
    remembered attention_mask position must not keep that partial, and with it the whole model, alive."""
    import functools
    import gc
    import weakref

    from peftkit.model import _call_mask
    from tests.conftest import tiny_gpt2

    base = tiny_gpt2()
    plain = base.forward

    def new_forward(module, *args, **kwargs):
        return type(module).forward(module, *args, **kwargs)

    base.forward = functools.update_wrapper(functools.partial(new_forward, base), plain)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"]))
    x, mask = torch.randint(3, 64, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert model(x, None, mask).logits.shape == (2, 5, 64)  # input_ids, past_key_values, attention_mask
    assert _call_mask(base, (x, None, mask), {}) is mask
    assert _call_mask(base, (x, None), {}) is None
    alive = weakref.ref(base)
    del model, base, plain
    gc.collect()
    assert alive() is None
