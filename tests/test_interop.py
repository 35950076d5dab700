"""The HF PEFT file format, checked against the real ``peft`` package in both directions."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import peftkit
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama

CASES = {
    "bert_cls": (tiny_bert_classifier, dict(r=4, lora_alpha=6, target_modules=["query", "value", "dense"],
                                            modules_to_save=["classifier"], bias="lora_only")),
    "bert_cls_task": (tiny_bert_classifier, dict(r=2, lora_alpha=4, target_modules=["query", "key"], task_type="SEQ_CLS")),
    # bias="all": peft writes the classifier copy's bias twice (classifier.bias, classifier.modules_to_save.bias)
    "bert_cls_bias_all": (tiny_bert_classifier, dict(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                     bias="all")),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             use_rslora=True)),
    "gpt2_embed": (tiny_gpt2, dict(r=2, lora_alpha=3, target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
}


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_adapter_loads_in_peft(case, tmp_path):
    make, kw = CASES[case]
    base = make()
    twin = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, peftkit.LoraConfig(**kw))
    perturb(ours)
    x = ids()
    expected = _logits(ours, x)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - _logits(theirs, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_peftkit(case, tmp_path):
    make, kw = CASES[case]
    base = make()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(**kw))
        perturb(theirs)
        theirs.save_pretrained(tmp_path)
    x = ids()
    expected = _logits(theirs, x)
    ours = peftkit.PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - _logits(ours, x)).abs().max() <= 1e-5
    with torch.no_grad():
        merged = ours.merge_and_unload()
        assert (expected - merged(input_ids=x).logits).abs().max() <= 1e-5


def test_several_adapters_use_subfolders_like_peft(tmp_path):
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["query"]))
    ours.add_adapter("other", peftkit.LoraConfig(r=3, target_modules=["value"]))
    perturb_all(ours)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_config.json").exists()
    ours.set_adapter("other")
    x = ids()
    expected = _logits(ours, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
        theirs.load_adapter(tmp_path / "other", adapter_name="other")
        theirs.set_adapter("other")
    assert (expected - _logits(theirs, x)).abs().max() <= 1e-5


def perturb_all(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("name", ["LoraConfig", "AdaLoraConfig", "VeraConfig", "LoHaConfig", "LoKrConfig"])
@pytest.mark.parametrize("make", [tiny_bert_classifier, tiny_llama])
def test_configs_without_target_modules_pick_what_peft_picks(name, make):
    """Porting code that leaves target_modules out: the same modules (written into the config, so saved)
    and the same number of trainable parameters as peft."""
    kw = {"total_step": 10} if name == "AdaLoraConfig" else {}
    if make is tiny_bert_classifier:
        kw["task_type"] = "SEQ_CLS"
    base = make()
    ours = peftkit.get_peft_model(copy.deepcopy(base), getattr(peftkit, name)(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, name)(**kw))
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]  # (peft counts AdaLoRA's ranknum)


def test_unknown_config_fields_with_a_value_are_refused():
    """peft's aLoRA (alora_invocation_tokens) changes the forward pass; loaded without it the outputs differed
    from peft's by 0.009 with only a warning. Unknown fields that are empty, or harmless ones, still load."""
    from peftkit import ConfigError, PeftConfig

    with pytest.raises(ConfigError, match=r"LoraConfig: the adapter config sets fields peftkit does not support: "
                                          r"alora_invocation_tokens=\[5, 7\]"):
        PeftConfig.from_dict({"peft_type": "LORA", "r": 4, "alora_invocation_tokens": [5, 7]})
    config = PeftConfig.from_dict({"peft_type": "LORA", "r": 4, "alora_invocation_tokens": None,
                                   "ensure_weight_tying": False, "peft_version": "0.21.2", "revision": "main"})
    assert config.r == 4


def test_a_peft_file_with_base_embeddings_loads_alone_but_not_next_to_other_adapters(tmp_path):
    """peft's save_embedding_layers=True stores the base embedding; copied into a shared base it changed every
    other adapter for good. Alone (a fresh model) it loads and matches peft."""
    from peftkit.formats.hf_peft import AdapterLoadError

    torch.manual_seed(0)
    base = tiny_llama()
    state = copy.deepcopy(base.state_dict())
    trained = copy.deepcopy(base)
    with torch.no_grad():
        trained.model.embed_tokens.weight[50:] += 1.0  # e.g. the rows of added tokens
    ref = peft.get_peft_model(trained, peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                       init_lora_weights=False))
    ref.save_pretrained(tmp_path / "p", save_embedding_layers=True)
    x = torch.tensor([[3, 51, 52, 53]])
    with torch.no_grad():
        expected = ref(input_ids=x).logits

    def fresh():
        model = tiny_llama()
        model.load_state_dict(state)
        return model

    model = peftkit.get_peft_model(fresh(), peftkit.LoraConfig(r=2, target_modules=["v_proj"],
                                                               init_lora_weights=False), adapter_name="a")
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(AdapterLoadError, match=r"adapter 'p' holds base-model weights that differ from this model's "
                                               r".*next to the adapters \['a'\] would change their base too"):
        model.load_adapter(tmp_path / "p", adapter_name="p")
    assert list(model.peft_config) == ["a"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    alone = peftkit.PeftModel.from_pretrained(fresh(), tmp_path / "p")
    with torch.no_grad():
        assert (alone(input_ids=x).logits - expected).abs().max() <= 1e-5


def test_from_pretrained_for_inference_is_in_eval_mode_as_in_peft(tmp_path):
    model = peftkit.get_peft_model(tiny_bert_classifier().train(), peftkit.LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftModel.from_pretrained(tiny_bert_classifier().train(), tmp_path / "a")
    assert not loaded.training and not any(m.training for m in loaded.modules())
    trainable = peftkit.PeftModel.from_pretrained(tiny_bert_classifier().train(), tmp_path / "a", is_trainable=True)
    assert trainable.training


def test_a_peft_lora_on_a_tied_lm_head_loads(tmp_path):
    """peft stores the tied lm_head's base weight under lm_head.base_layer.weight; named_parameters() lists a
    tied tensor once (as embed_tokens), so the key had "no place" and the file was refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")

    def fresh():
        return LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()

    ref = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                       init_lora_weights=False))
    ref.save_pretrained(tmp_path / "ad")
    ours = peftkit.PeftModel.from_pretrained(fresh(), tmp_path / "ad")
    x = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert (ours(input_ids=x).logits - ref(input_ids=x).logits).abs().max() <= 1e-5
        assert (ours(input_ids=x).logits - fresh()(input_ids=x).logits).abs().max() > 1e-3


def test_two_names_for_one_trained_bias_must_agree(tmp_path):
    """peft's bias="all" file names the classifier copy's bias twice; a file where the two differ is refused
    (which one peft would load depends on its key order), and nothing is loaded."""
    from safetensors.torch import load_file, save_file

    from peftkit.formats.hf_peft import AdapterLoadError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(r=2, target_modules=["query"],
                                                                             task_type="SEQ_CLS", bias="all"))
        theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    alias = "base_model.model.classifier.modules_to_save.bias"
    assert torch.equal(tensors[alias], tensors["base_model.model.classifier.bias"])
    tensors[alias] = tensors[alias] + 1
    save_file(tensors, path)
    model = peftkit.get_peft_model(tiny_bert_classifier(), peftkit.LoraConfig(r=2, target_modules=["value"]),
                                   adapter_name="a")
    with pytest.raises(AdapterLoadError, match=r"holds 'base_model\.model\.classifier\.modules_to_save\.bias' and "
                                               r"'base_model\.model\.classifier\.bias', two names for one trained"):
        model.load_adapter(tmp_path, adapter_name="p")
    assert list(model.peft_config) == ["a"]


def test_orthogonal_init_starts_as_identity_and_peft_files_with_it_load(tmp_path):
    """init_lora_weights="orthogonal" (peft's): B A = 0 with both factors non-zero; odd ranks are refused;
    a peft adapter trained from it loads and matches."""
    from peftkit.config import ConfigError

    base = tiny_bert_classifier()
    x = ids()
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules=["query", "value"],
                                                                           init_lora_weights="orthogonal"))
    layer = ours.get_base_model().bert.encoder.layer[0].attention.self.query.adapters["default"]
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert a.abs().min() > 0 and b.abs().max() > 1e-3 and (b @ a).abs().max() < 1e-6
    with torch.no_grad():
        assert (ours(input_ids=x).logits - base(input_ids=x).logits).abs().max() < 1e-6
    with pytest.raises(ConfigError, match=r"init_lora_weights='orthogonal' needs even ranks .*got r=3"):
        peftkit.LoraConfig(r=4, rank_pattern={"query": 3}, init_lora_weights="orthogonal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["query"],
                                                                           init_lora_weights="orthogonal"))
        perturb(theirs)
        theirs.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (_logits(loaded, x) - _logits(theirs, x)).abs().max() <= 1e-5


def test_a_peft_eva_adapter_loads_but_eva_is_not_a_training_start(tmp_path):
    """EVA sets A from activations of the data, which peftkit does not do: a trained EVA adapter's config loads
    (its eva_config saved back unchanged); asking get_peft_model or add_adapter for EVA is refused."""
    from peft.tuners.lora.config import EvaConfig

    from peftkit.config import ConfigError, PeftConfig

    base = tiny_bert_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, target_modules=["query"], init_lora_weights="eva", eva_config=EvaConfig(rho=1.5)))
        perturb(theirs)
        theirs.save_pretrained(tmp_path / "eva")
    x = ids()
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "eva")
    assert (_logits(loaded, x) - _logits(theirs, x)).abs().max() <= 1e-5
    loaded.save_pretrained(tmp_path / "again")
    again = PeftConfig.from_pretrained(tmp_path / "again")
    assert again.init_lora_weights == "eva" and again.eva_config["rho"] == 1.5
    with pytest.raises(ConfigError, match=r"init_lora_weights='eva': peftkit has no EVA initialisation"):
        peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules=["query"],
                                                                       init_lora_weights="eva"))
    with pytest.raises(ConfigError, match=r"peftkit has no EVA initialisation"):
        loaded.add_adapter("more", peftkit.LoraConfig(r=4, target_modules=["value"], init_lora_weights="eva"))
    assert list(loaded.peft_config) == ["default"]


@pytest.mark.parametrize("first", ["other", "biased"])
def test_a_bias_all_adapter_saved_next_to_another_loads_alone_in_both_libraries(first, tmp_path):
    """With bias="all" an adapter trains every bias, also those of layers that only another adapter wraps
    (key.base_layer.bias then). The file names them as in a model holding the adapter alone (key.bias),
    whichever adapter came first, so it loads alone in peftkit and in peft; the old layout loads too."""
    from safetensors.torch import load_file, save_file

    base = tiny_bert_classifier()
    other = peftkit.LoraConfig(r=2, target_modules=["key"])
    biased = peftkit.LoraConfig(r=2, target_modules=["query"], bias="all")
    configs = [("o", other), ("b", biased)] if first == "other" else [("b", biased), ("o", other)]
    model = peftkit.get_peft_model(copy.deepcopy(base), configs[0][1], adapter_name=configs[0][0])
    model.add_adapter(*configs[1])
    model.set_adapter("b")
    perturb(model)
    x = ids()
    expected = _logits(model.eval(), x)
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    path = tmp_path / "b" / "adapter_model.safetensors"
    keys = set(load_file(path))
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.bias" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
    assert (_logits(ours, x) - expected).abs().max() <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
    assert (_logits(theirs, x) - expected).abs().max() <= 1e-5
    # the layout written before (the wrapped name) still loads, also next to an adapter that wraps key
    old = {k.replace(".key.bias", ".key.base_layer.bias"): v for k, v in load_file(path).items()}
    save_file(old, path)
    alone = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
    assert (_logits(alone, x) - expected).abs().max() <= 1e-6
    beside = peftkit.get_peft_model(copy.deepcopy(base), other, adapter_name="o")
    beside.load_adapter(tmp_path / "b", adapter_name="b")
    beside.set_adapter("b")
    assert (_logits(beside.eval(), x) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("saved_as, loaded_as", [("default", "other"), ("other", "default")])
def test_a_peft_bias_all_file_with_a_nested_copy_loads_under_any_adapter_name(saved_as, loaded_as, tmp_path):
    """With modules_to_save=["pooler"] and bias="all", peft also writes the copy's inner bias under the name the
    adapter had when saved (bert.pooler.modules_to_save.<name>.dense.bias)."""
    base = tiny_bert_classifier()
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=2, target_modules=["query"], task_type="SEQ_CLS", bias="all", modules_to_save=["pooler"]),
            adapter_name=saved_as)
        perturb(theirs)
        theirs.save_pretrained(tmp_path)
    folder = tmp_path if saved_as == "default" else tmp_path / saved_as
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name=loaded_as)
    assert (_logits(ours, x) - _logits(theirs.eval(), x)).abs().max() <= 1e-5


def test_a_user_module_named_modules_to_save_is_not_taken_for_a_copy(tmp_path):
    """Only a real modules_to_save wrapper's names are folded: a base module that happens to be called
    modules_to_save keeps its own (trained, bias="all") bias."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(4, 8)
            self.head = torch.nn.Module()
            self.head.modules_to_save = torch.nn.Linear(8, 2)
            self.head.bias = torch.nn.Parameter(torch.zeros(2))

        def forward(self, v):
            return self.head.modules_to_save(self.emb(v)) + self.head.bias

    torch.manual_seed(0)
    net, v = Net(), torch.randn(3, 4)
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=["emb"], bias="all"))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path)
    with torch.no_grad():
        assert (ours(v) - theirs(v)).abs().max() <= 1e-6
    trained = peftkit.get_peft_model(copy.deepcopy(net), peftkit.LoraConfig(r=2, target_modules=["emb"], bias="all"))

    def biases(model):
        return {n.split("base_model.model.")[-1] for n, p in model.named_parameters() if p.requires_grad
                and n.endswith("bias")}
    assert biases(trained) == biases(theirs) == {"emb.base_layer.bias", "head.modules_to_save.bias", "head.bias"}


def test_modules_to_save_match_name_suffixes_as_in_peft(tmp_path):
    """peft takes a modules_to_save entry as a plain string suffix ("norm" also takes every
    input_layernorm); peftkit does the same, so the files move both ways."""
    kw = dict(r=2, target_modules=["q_proj"], modules_to_save=["norm"])
    torch.manual_seed(0)
    base = tiny_llama()
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    copies = {n.split(".modules_to_save.")[0] for n, p in ours.named_parameters() if p.requires_grad and "norm" in n}
    assert copies == {n.split(".modules_to_save.")[0] for n, p in theirs.named_parameters()
                      if p.requires_grad and "norm" in n}
    assert len(copies) == 1 + 2 * len(base.model.layers)
    perturb(ours)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = ids()
    assert (_logits(loaded, x) - _logits(ours, x)).abs().max() <= 1e-5


def _tiny_bert_for(task_type: str):
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=5)
    if task_type == "TOKEN_CLS":
        return BertForTokenClassification(cfg).eval()
    cfg.num_labels = 2
    return BertForQuestionAnswering(cfg).eval()


def _head_outputs(model, x):
    with torch.no_grad():
        out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else torch.stack([out.start_logits, out.end_logits])


@pytest.mark.parametrize("task_type, head", [("TOKEN_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")])
@pytest.mark.parametrize("method", ["LoraConfig", "IA3Config"])
def test_token_and_qa_tasks_train_and_save_their_head_as_in_peft(task_type, head, method, tmp_path):
    """As peft's task classes do, TOKEN_CLS adds the classifier and QUESTION_ANS the qa_outputs head to
    modules_to_save (the head stayed frozen at its random start and was not saved, and peft could not load
    the file)."""
    base = _tiny_bert_for(task_type)
    kw = dict(target_modules=["query", "value"], task_type=task_type)
    kw.update(dict(feedforward_modules=[]) if method == "IA3Config" else dict(r=2))
    ours = peftkit.get_peft_model(copy.deepcopy(base), getattr(peftkit, method)(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, method)(**kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert any(p.requires_grad for n, p in ours.named_parameters() if head in n)
    perturb(ours)
    x = ids()
    expected = _head_outputs(ours, x)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (_head_outputs(loaded, x) - expected).abs().max() <= 1e-5
    assert (_head_outputs(peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"), x)
            - expected).abs().max() <= 1e-5


def test_set_adapter_and_set_requires_grad_train_as_in_peft(tmp_path):
    """peft's set_adapter makes the adapter trainable unless inference_mode=True (peftkit kept one loaded
    frozen at 0 trainable parameters and had no inference_mode argument), and set_requires_grad exists."""
    base = tiny_llama()
    peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path)
    counts = {}
    for lib in (peftkit, peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # frozen
            model.load_adapter(tmp_path, "b")
            trainable = lambda m=model: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
            model.set_adapter("b")
            after_set = trainable()
            model.set_adapter("b", inference_mode=True)
            frozen = trainable()
            model.set_requires_grad("b", True)
            again = trainable()
            model.set_requires_grad("b", False)
            counts[lib.__name__] = (after_set, frozen, again, trainable())
    assert counts["peftkit"] == counts["peft"] == (128, 0, 128, 0)
    with pytest.raises(peftkit.ConfigError, match="inference_mode='no' must be True or False"):
        peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["q_proj"])).set_adapter(
            "default", inference_mode="no")


def test_default_targets_are_peft_s_for_every_model_type_both_know():
    """A config without target_modules adapts what peft's would: AdaLoRA adapted only query/value on RoBERTa, T5 and
    BART (peft: attention and feed-forward), and (IA)^3 had no default for BART."""
    from peft.utils import constants as c

    from peftkit.methods.ia3 import IA3_DEFAULTS
    from peftkit.targeting import ADALORA_TARGET_DEFAULTS, LORA_TARGET_DEFAULTS, VERA_TARGET_DEFAULTS

    pairs = [(LORA_TARGET_DEFAULTS, c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
             (VERA_TARGET_DEFAULTS, c.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING),
             (ADALORA_TARGET_DEFAULTS, c.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING),
             ({k: v[0] for k, v in IA3_DEFAULTS.items()}, c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING),
             ({k: v[1] for k, v in IA3_DEFAULTS.items()}, c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING)]
    for ours, theirs in pairs:
        differ = {k: (list(v), list(theirs[k])) for k, v in ours.items() if k in theirs and list(v) != list(theirs[k])}
        assert not differ
    assert {"roberta", "t5", "bart"} <= ADALORA_TARGET_DEFAULTS.keys() and "bart" in IA3_DEFAULTS
    # every model type peft's LoRA table knows, but Gemma 4's (a regex for its language model only)
    assert set(c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) - set(LORA_TARGET_DEFAULTS) <= {"gemma4"}
    assert VERA_TARGET_DEFAULTS["phi"] == ("q_proj", "v_proj") != LORA_TARGET_DEFAULTS["phi"]


def test_peft_s_utility_names_import_from_peftkit(tmp_path):
    """``PeftType``, ``PromptTuningInit``, ``PromptEncoderReparameterizationType``, ``get_peft_config``,
    ``load_peft_weights`` and ``peftkit.utils`` were missing: peft code that imports them failed to port."""
    import peft

    import peftkit
    from peftkit.utils import PeftType, get_peft_model_state_dict, load_peft_weights

    shared = {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "VERA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
    assert shared <= {m.value for m in peft.PeftType} and shared <= {m.value for m in PeftType}
    assert PeftType.LORA == "LORA" == peftkit.LoraConfig(target_modules=["q"]).peft_type
    config = peftkit.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init=peftkit.PromptTuningInit.RANDOM)
    assert config.prompt_tuning_init == "RANDOM"
    encoder = peftkit.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type=(
        peftkit.PromptEncoderReparameterizationType.LSTM))
    assert encoder.encoder_reparameterization_type == "LSTM"
    for kind in ("LORA", PeftType.LORA):
        made = peftkit.get_peft_config({"peft_type": kind, "r": 4, "target_modules": ["q_proj"]})
        assert isinstance(made, peftkit.LoraConfig) and made.r == 4
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "one")
    loaded = load_peft_weights(tmp_path, subfolder="one")
    assert loaded.keys() == get_peft_model_state_dict(model).keys()
    assert all(torch.equal(loaded[k], v) for k, v in get_peft_model_state_dict(model).items())


@pytest.mark.parametrize("bad", [None, "lora", [("peft_type", "LORA")]], ids=["none", "name", "pairs"])
def test_get_peft_config_names_a_value_that_is_not_a_dict(bad):
    """None and a method name failed with TypeError/ValueError from dict() ('dictionary update sequence element #0
    has length 1'), and a list of pairs was taken for a dict (peft refuses all three)."""
    with pytest.raises(peftkit.ConfigError, match=rf"an adapter config must be a dict .*got {type(bad).__name__} "):
        peftkit.get_peft_config(bad)
    with pytest.raises(peftkit.ConfigError, match="an adapter config must be a dict"):
        peftkit.LoraConfig.from_dict(bad)


def test_saved_config_says_inference_mode_as_peft_writes_it(tmp_path):
    """peft writes ``"inference_mode": true`` whatever the live config says; a config read back and given to
    peft's ``get_peft_model`` then makes the same frozen adapter either way."""
    import json

    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inference_mode"] is True
    assert model.peft_config["default"].inference_mode is False  # the live config is left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["inference_mode"] is True


def test_a_base_tensor_peft_named_inside_another_adapters_wrapper_loads(tmp_path):
    """peft writes a targeted embedding's whole base tensors; with another adapter wrapping lm_head the key reads
    lm_head.base_layer.weight, which peftkit refused as a tensor it had no place for."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tiny_llama()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                           init_lora_weights=False))
        theirs.add_adapter("other", peft.LoraConfig(r=4, target_modules=["lm_head"]))
        theirs.save_pretrained(tmp_path, selected_adapters=["default"])
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.lm_head.base_layer.weight" in keys
    x = ids()
    with torch.no_grad():
        expected = theirs(input_ids=x).logits
        ours = peftkit.PeftModel.from_pretrained(twin, tmp_path)
        assert (ours(input_ids=x).logits - expected).abs().max() <= 1e-5


def test_a_model_peft_already_wrapped_is_named_as_such():
    """peft wraps the base in place; peftkit then said "cannot adapt module '0' of type Linear; supported types:
    Linear, ...", which contradicts itself (peft's layer class is also called Linear)."""
    from torch import nn

    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(peftkit.ConfigError, match=r"module '0' is a layer of the peft package \(peft\.tuners\.lora"
                                                  r".*start from a fresh copy of the base model"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["0"]))


def _resized_llama(new_rows_seed: int):
    """A tiny Llama whose vocabulary was resized from 64 to 70 tokens (the new input rows drawn from the seed)."""
    torch.manual_seed(0)
    model = tiny_llama()
    torch.manual_seed(new_rows_seed)
    model.resize_token_embeddings(70, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[64:] = 0
    return model


@pytest.mark.parametrize("saver", ["peftkit", "peft"])
def test_save_embedding_layers_restores_a_resized_vocabulary_in_either_library(saver, tmp_path):
    """save_pretrained(save_embedding_layers=True) was swallowed by **kwargs: the file held no embedding matrix, so
    the added tokens' rows were lost on reloading (logits off by about 1e-2). Now peftkit writes what peft writes,
    and either library restores the model whole from the other's file."""
    from safetensors import safe_open

    lib, other = (peftkit, peft) if saver == "peftkit" else (peft, peftkit)
    x = torch.tensor([[64, 65, 66, 67, 68, 69]])
    trained = lib.get_peft_model(_resized_llama(1), lib.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                                   init_lora_weights=False))
    trained.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained.save_pretrained(tmp_path / "explicit", save_embedding_layers=True)
        trained.save_pretrained(tmp_path / "none", save_embedding_layers=False)
        # "auto" writes them too when target_modules names an embedding layer (with a warning, as peft)
        trained.save_pretrained(tmp_path / "auto")
    keys = {}
    for name in ("explicit", "none", "auto"):
        with safe_open(tmp_path / name / "adapter_model.safetensors", "pt") as fh:
            keys[name] = {k for k in fh.keys() if "lora" not in k}
    assert keys == {"explicit": {"base_model.model.model.embed_tokens.base_layer.weight"}, "none": set(),
                    "auto": {"base_model.model.model.embed_tokens.base_layer.weight"}}
    with torch.no_grad():
        want = trained(input_ids=x).logits
        for loader in (lib, other):
            back = loader.PeftModel.from_pretrained(_resized_llama(2), tmp_path / "explicit").eval()
            assert (back(input_ids=x).logits - want).abs().max() <= 1e-6, loader.__name__
        lost = peftkit.PeftModel.from_pretrained(_resized_llama(2), tmp_path / "none").eval()
        assert (lost(input_ids=x).logits - want).abs().max() > 1e-4  # without them the new rows are the base's


def test_save_embedding_layers_auto_follows_a_resized_vocabulary(tmp_path):
    """With an untargeted embedding, "auto" writes the embedding matrices when the vocabulary differs from the
    base model folder's (as peft checks it, here on the local folder only), and not otherwise."""
    from safetensors import safe_open

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    plain = peftkit.get_peft_model(transformers_model(tmp_path / "base"), peftkit.LoraConfig(r=2,
                                                                                              target_modules=["q_proj"]))
    resized = transformers_model(tmp_path / "base")
    resized.resize_token_embeddings(70, mean_resizing=False)
    resized = peftkit.get_peft_model(resized, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert resized.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match="the vocabulary was resized"):
        resized.save_pretrained(tmp_path / "resized")
    found = {}
    for name in ("plain", "resized"):
        with safe_open(tmp_path / name / "adapter_model.safetensors", "pt") as fh:
            found[name] = sorted(k for k in fh.keys() if "lora" not in k)
    # untargeted: the modules themselves (peft's names), both ends of the tied embedding
    assert found == {"plain": [], "resized": ["base_model.model.lm_head.weight",
                                              "base_model.model.model.embed_tokens.weight"]}
    back = peftkit.PeftModel.from_pretrained(_resized_llama(3), tmp_path / "resized")
    assert torch.equal(back.get_input_embeddings().weight, resized.get_input_embeddings().weight)


def transformers_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_an_adapter_on_a_compiled_model_saves_the_models_own_keys(tmp_path):
    """get_peft_model(torch.compile(model)): saving crashed (AttributeError: 'LlamaModel' object has no attribute
    'check_known'), and loading onto a compiled model failed on "_orig_mod." keys. The compiled module itself is
    adapted now (the compiled wrapper runs the adapters too), so files are the plain model's, which peft loads."""
    torch.manual_seed(0)
    base = tiny_llama()
    plain = copy.deepcopy(base)
    compiled = torch.compile(base, backend="eager")
    model = peftkit.get_peft_model(compiled, peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert model.get_base_model() is base
    model.save_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
        # the user's compiled handle has the adapter too (as plain ops: rounding differs from the fused node)
        assert (compiled(input_ids=x).logits - want).abs().max() <= 1e-6
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path)
        assert (theirs(input_ids=x).logits - want).abs().max() <= 1e-6
        ours = peftkit.PeftModel.from_pretrained(torch.compile(copy.deepcopy(plain), backend="eager"), tmp_path)
        assert (ours(input_ids=x).logits - want).abs().max() <= 1e-6


def test_a_peft_config_object_and_pefts_peft_type_attribute():
    """A peft config left over from porting read "expected a PeftConfig (e.g. LoraConfig), got LoraConfig"; and
    model.peft_type, peft's attribute, raised AttributeError naming the base model."""
    with pytest.raises(peftkit.ConfigError, match=r"got peft\.tuners\.lora\.config\.LoraConfig: a config of the "
                                                  r"'peft' package; build it with peftkit's own \(from peftkit import "
                                                  r"LoraConfig\)"):
        peftkit.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("ia3", peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert model.peft_type == "LORA"
    model.set_adapter("ia3")
    assert model.peft_type == "IA3"


def test_embedding_layers_next_to_trained_copies_and_conversions(tmp_path):
    """Found in review of save_embedding_layers: (1) with modules_to_save=["embed_tokens", "lm_head"] on a resized
    vocabulary, "auto" wrote the untrained base matrix under the trained copy's key (reloaded logits off by 16);
    (2) a targeted embed_tokens next to modules_to_save=["lm_head"] wrote lm_head.base_layer.weight, which
    peftkit refused to load; (3) a PiSSA conversion with lm_head targeted wrote the residual lm_head."""
    from transformers import AutoModelForCausalLM

    x = torch.tensor([[3, 4, 65, 66]])
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")

    def resized():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(70, mean_resizing=False)
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copies = peftkit.get_peft_model(resized(), peftkit.LoraConfig(r=2, target_modules=["q_proj"],
                                                                      modules_to_save=["embed_tokens", "lm_head"]))
        with torch.no_grad():
            for p in copies.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        copies.save_pretrained(tmp_path / "copies")  # "auto", vocabulary resized
        for lib in (peftkit, peft):
            back = lib.PeftModel.from_pretrained(resized(), tmp_path / "copies").eval()
            with torch.no_grad():
                assert (back(input_ids=x).logits - copies.eval()(input_ids=x).logits).abs().max() <= 1e-6, lib

        torch.manual_seed(0)
        mixed = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(
            r=2, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
        mixed.save_pretrained(tmp_path / "mixed")
        for lib in (peftkit, peft):
            torch.manual_seed(0)
            back = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mixed").eval()
            with torch.no_grad():
                assert (back(input_ids=x[:, :2]).logits - mixed.eval()(input_ids=x[:, :2]).logits).abs().max() <= 1e-6

        torch.manual_seed(0)
        pissa = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["lm_head", "q_proj"],
                                                                        init_lora_weights="pissa"))
        pissa.save_pretrained(tmp_path / "init", save_embedding_layers=False)
        perturb(pissa)
        pissa.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")
    torch.manual_seed(0)
    back = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "conv").eval()
    with torch.no_grad():
        assert (back(input_ids=x[:, :2]).logits - pissa.eval()(input_ids=x[:, :2]).logits).abs().max() <= 1e-5


def test_load_peft_weights_key_mapping_renames_module_paths_as_peft(tmp_path):
    """peft applies key_mapping to the module path, with the ``base_model.model.`` prefix taken off: a pattern anchored
    with ``^`` (as transformers' conversion mappings are) never matched in peftkit, which kept the prefix on."""
    model = peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    mapping = {r"^model\.layers\.0\.": "model.blocks.0.", r"q_proj": "query"}
    ours = peftkit.load_peft_weights(tmp_path, key_mapping=mapping)
    assert ours.keys() == peft.utils.load_peft_weights(str(tmp_path), key_mapping=mapping).keys()
    assert "base_model.model.model.blocks.0.self_attn.q_proj.lora_A.weight" in ours
    assert "base_model.model.model.layers.1.self_attn.query.lora_A.weight" in ours


def test_from_pretrained_and_load_adapter_take_pefts_key_mapping(tmp_path):
    """An adapter trained on a causal LM loads onto its bare decoder (``LlamaModel``: no ``model.`` in the paths) with
    peft's ``key_mapping``, giving peft's outputs; peftkit refused any key_mapping but None."""
    lm = tiny_llama()
    bare = copy.deepcopy(lm.model)
    ours = peftkit.get_peft_model(lm, peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    perturb(ours)
    ours.save_pretrained(tmp_path)
    x = ids()
    mapping = {r"^model\.": ""}
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = peft.PeftModel.from_pretrained(copy.deepcopy(bare), tmp_path, key_mapping=mapping)(
                input_ids=x).last_hidden_state
        loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(bare), tmp_path, key_mapping=mapping)
        assert (loaded(input_ids=x).last_hidden_state - expected).abs().max() <= 1e-5
        loaded.load_adapter(tmp_path, adapter_name="again", key_mapping=mapping)
        loaded.set_adapter("again")
        assert (loaded(input_ids=x).last_hidden_state - expected).abs().max() <= 1e-5
    with pytest.raises(peftkit.ConfigError, match=r"key_mapping=\['model'\] is not valid; give None or a dict"):
        loaded.load_adapter(tmp_path, adapter_name="bad", key_mapping=["model"])
    assert "bad" not in loaded.peft_config


@pytest.mark.parametrize("mapping, named", [({"[": ""}, r"entry '\[': '' is not a valid regex and replacement"),
                                            ({"a": r"\1"}, r"entry 'a': '\\\\1' is not a valid regex and replacement"),
                                            ([("a", "b")], r"key_mapping=\[\('a', 'b'\)\] is not valid")],
                         ids=["pattern", "group", "list"])
def test_a_key_mapping_that_cannot_rename_is_named_before_loading(tmp_path, mapping, named):
    """A pattern that is not a regex, or a replacement naming a group the pattern lacks, raised a bare re.error from
    inside the renaming (load_peft_weights: an AttributeError for a list), not naming key_mapping."""
    adapted = peftkit.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                     peftkit.LoraConfig(r=2, target_modules=["0"]))
    adapted.save_pretrained(tmp_path)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(peftkit.ConfigError, match=named):
        peftkit.PeftModel.from_pretrained(base, tmp_path, key_mapping=mapping)
    assert type(base[0]) is torch.nn.Linear
    with pytest.raises(peftkit.ConfigError, match=named):
        peftkit.load_peft_weights(tmp_path, key_mapping=mapping)


SEQ2SEQ_CASES = {
    "t5_lora": ("t5", "LoraConfig", dict(r=2, lora_alpha=3, target_modules="all-linear", use_rslora=True, bias="lora_only")),
    "t5_dora": ("t5", "LoraConfig", dict(r=2, target_modules=["q", "v", "wo"], use_dora=True, layers_to_transform=[1])),
    "t5_adalora": ("t5", "AdaLoraConfig", dict(init_r=3, target_r=2, total_step=10, target_modules=["q", "k", "wi"])),
    "t5_ia3": ("t5", "IA3Config", dict()),
    "bart_lora": ("bart", "LoraConfig", dict(r=2, target_modules=["q_proj", "fc1", "embed_tokens"],
                                             rank_pattern={"fc1": 3}, alpha_pattern={"q_proj": 5})),
    "bart_vera": ("bart", "VeraConfig", dict(r=4, target_modules=["q_proj", "v_proj"])),
    "bart_loha": ("bart", "LoHaConfig", dict(r=2, alpha=3, target_modules=["q_proj", "out_proj"])),
    "bart_lokr": ("bart", "LoKrConfig", dict(r=2, alpha=3, target_modules=["k_proj", "fc2"])),
}


@pytest.mark.parametrize("case", list(SEQ2SEQ_CASES))
def test_weight_methods_on_encoder_decoders_move_both_ways_and_merge_alike(case, tmp_path):
    """Every weight method both libraries have, on T5 and BART (encoder, decoder and cross attention): files move
    both ways with the saver's outputs, and the merged models agree. (peft's merge of BART's embed_tokens also
    changes the LM head tied to it, so there only peftkit's merged model is compared with the unmerged outputs.)"""
    from tests.test_prompt_seq2seq import tiny_bart, tiny_t5

    arch, name, kw = SEQ2SEQ_CASES[case]
    x, y = ids(), ids(seq=5)

    def out(model):
        with torch.no_grad():
            return model(input_ids=x, decoder_input_ids=y).logits

    for saver, loader in ((peftkit, peft), (peft, peftkit)):
        base = (tiny_t5 if arch == "t5" else tiny_bart)()
        twin = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trained = saver.get_peft_model(base, getattr(saver, name)(task_type="SEQ_2_SEQ_LM", **copy.deepcopy(kw)))
            perturb(trained)
            trained.save_pretrained(tmp_path / saver.__name__)
            loaded = loader.PeftModel.from_pretrained(twin, tmp_path / saver.__name__)
        expected = out(trained)
        with trained.disable_adapter():
            assert (out(trained) - expected).abs().max() > 1e-3  # the adapter changes the outputs
        assert (out(loaded) - expected).abs().max() <= 1e-5, saver.__name__
        with torch.no_grad():
            merged = {lib: out(model.merge_and_unload()) for lib, model in ((saver, trained), (loader, loaded))}
        assert (merged[peftkit] - expected).abs().max() <= 1e-5
        if "embed_tokens" not in kw.get("target_modules", ()):
            assert (merged[peft] - expected).abs().max() <= 1e-5
