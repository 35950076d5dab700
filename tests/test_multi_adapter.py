"""Several named adapters of different methods on one model (LoRA, IA3, Houlsby, prefix tuning, BitFit):
load, switch, enable several at once, delete, train several at once."""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit import (
    BitFitConfig,
    HoulsbyConfig,
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    get_peft_model,
)
from peftkit.layers import AdaptedLayer
from tests.conftest import ids, tiny_bert_classifier

CONFIGS = {
    "lora": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "output.dense"]),
    "ia3": lambda: IA3Config(init_ia3_weights=False),
    "houlsby": lambda: HoulsbyConfig(bottleneck_size=4, init_weights="bert"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "bitfit": lambda: BitFitConfig(),
}
NAMES = list(CONFIGS)


def nudge(model, name: str, seed: int) -> None:
    """Give adapter ``name``'s own tensors non-zero random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".{name}." in key or key.endswith(f".{name}") or f"adapters.{name}." in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def all_five():
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, CONFIGS["lora"](), adapter_name="lora")
    for name in NAMES[1:]:
        model.add_adapter(name, CONFIGS[name]())
    for i, name in enumerate(NAMES):
        nudge(model, name, i)
    return model, twin


def alone(name: str, model, twin):
    """``name`` on its own copy of the base model, with the same tensors."""
    from peftkit import get_peft_model_state_dict, set_peft_model_state_dict

    single = get_peft_model(copy.deepcopy(twin), CONFIGS[name](), adapter_name=name)
    set_peft_model_state_dict(single, get_peft_model_state_dict(model, name), name)
    return single


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def each_active(model, x):
    """Logits with each adapter of NAMES active in turn, by name."""
    outs = {}
    for name in NAMES:
        model.set_adapter(name)
        outs[name] = logits(model, x)
    return outs


def test_switching_gives_each_adapter_alone():
    model, twin = all_five()
    x = ids()
    outs = each_active(model, x)
    for name in NAMES:
        assert (outs[name] - logits(alone(name, model, twin), x)).abs().max() <= 1e-6, name
    assert min((outs[a] - outs[b]).abs().max() for a in NAMES for b in NAMES if a < b) > 1e-5
    with model.disable_adapter():
        assert torch.equal(logits(model, x), twin(input_ids=x).logits)


def test_several_at_once_equals_their_composition_and_order_of_activation():
    model, twin = all_five()
    x = ids()
    model.set_adapter(NAMES)
    together = logits(model, x)
    combo = get_peft_model(copy.deepcopy(twin), [CONFIGS[n]() for n in NAMES])
    from peftkit import get_peft_model_state_dict, set_peft_model_state_dict

    state = {}
    for i, name in enumerate(NAMES):
        state.update({f"parts.{i}.{k}": v for k, v in get_peft_model_state_dict(model, name).items()})
    set_peft_model_state_dict(combo, state)
    assert (logits(combo, x) - together).abs().max() <= 1e-6
    for name in NAMES:
        model.set_adapter(name)
        assert (logits(model, x) - together).abs().max() > 1e-5


def test_training_several_at_once_reaches_exactly_the_active_ones():
    model, _ = all_five()
    active = ["ia3", "prefix", "bitfit"]
    model.set_adapter(active)
    model.train()
    model(input_ids=ids(4)).logits.pow(2).sum().backward()
    for key, p in model.named_parameters():
        owner = next((n for n in NAMES if f"adapters.{n}." in key or f"extra_modules.{n}." in key), None)
        got = p.grad is not None and p.grad.abs().sum() > 0
        assert got == (owner in active), key
    assert {n for n in NAMES if any(p.requires_grad for k, p in model.named_parameters()
                                    if f"adapters.{n}." in k or f"extra_modules.{n}." in k)} == set(active)


def test_delete_one_leaves_the_others_unchanged():
    model, twin = all_five()
    x = ids()
    model.set_adapter(["lora", "houlsby", "bitfit"])
    before = logits(model, x)
    model.delete_adapter("prefix")
    model.delete_adapter("ia3")
    assert list(model.peft_config) == ["lora", "houlsby", "bitfit"]
    assert (logits(model, x) - before).abs().max() <= 1e-6
    for name in ("lora", "houlsby", "bitfit"):
        model.delete_adapter(name)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert torch.equal(logits(model, x), twin(input_ids=x).logits)


@pytest.mark.parametrize("first", ["prefix", "bitfit"])
def test_save_all_and_load_them_back(first, tmp_path):
    model, twin = all_five()
    x = ids()
    outs = each_active(model, x)
    model.set_adapter(["houlsby", "lora"])
    outs["pair"] = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(twin, tmp_path / first, adapter_name=first)
    for name in NAMES:
        if name != first:
            loaded.load_adapter(tmp_path / name, adapter_name=name)
    for name in NAMES:
        loaded.set_adapter(name)
        assert (logits(loaded, x) - outs[name]).abs().max() <= 1e-6, name
    loaded.set_adapter(["houlsby", "lora"])
    assert (logits(loaded, x) - outs["pair"]).abs().max() <= 1e-6


def test_merging_several_methods_at_once_is_exact():
    model, twin = all_five()
    x = ids()
    names = ["bitfit", "ia3", "lora"]  # substitution, input/output rescaling and low-rank update at shared layers
    model.set_adapter(names)
    unmerged = logits(model, x)
    model.merge_adapter()
    assert sorted(model.base_model.merged_adapters()) == sorted(names)
    assert (logits(model, x) - unmerged).abs().max() <= 1e-5
    model.unmerge_adapter()
    with model.disable_adapter():
        assert (logits(model, x) - twin(input_ids=x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("second", ["ia3", "dora", "bitfit", "lora"])
def test_merging_some_active_adapters_is_exact_or_refused(second):
    """Merging folds an adapter under those the forward applies before it: exact when they commute (LoRA with
    LoRA; BitFit's bias, which DoRA's rescale now leaves unscaled in both forms), refused otherwise. Before,
    merge_adapter(['b']) silently changed the outputs, and DoRA + BitFit differed even with every adapter merged.
    A rescale merged under an unmerged substitution is refused even where, as for DoRA and BitFit, it would be
    exact: the rule is general and errs on the side of refusing."""
    from transformers import BertConfig, BertModel

    targets = ["query", "value", "intermediate.dense"]
    first = peftkit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False, use_dora=second == "bitfit")
    configs = {"ia3": peftkit.IA3Config(target_modules=targets, feedforward_modules=["intermediate.dense"]),
               "dora": peftkit.LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False),
               "bitfit": peftkit.BitFitConfig(),
               "lora": peftkit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)}
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = peftkit.get_peft_model(BertModel(cfg).eval(), first, adapter_name="a")
    model.add_adapter("b", configs[second])
    model.set_adapter(["a", "b"])
    with torch.no_grad():  # every trainable tensor away from its start (magnitudes, biases, scales)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    x = torch.tensor([[1, 5, 7, 9, 11, 3]])
    with torch.no_grad():
        expected = model(input_ids=x).last_hidden_state
    for names in (None, ["b", "a"], ["a"], ["b"]):
        refused = {"ia3": ["b"], "dora": ["b"], "bitfit": ["a"]}.get(second)  # (DoRA after BitFit's bias)
        if refused is not None and names == refused:
            left = "b" if second == "bitfit" else "a"
            with pytest.raises(ValueError, match=rf"merging '{names[0]}' while '{left}', which the forward applies "
                                                 r"before it, stays unmerged would change the outputs"):
                model.merge_adapter(names)
            assert model.base_model.merged_adapters() == []
            continue
        model.merge_adapter(names)
        with torch.no_grad():
            assert (model(input_ids=x).last_hidden_state - expected).abs().max() <= 1e-5, names
        model.unmerge_adapter()


@pytest.mark.parametrize("first", ["houlsby", "pfeiffer"])
def test_merging_lora_under_an_unmerged_bottleneck_adapter_is_refused(first):
    """A serial bottleneck adapter keeps the default merge but is not mergeable: unmerged the layer computes
    ``H(W x) + B A x``, merged ``H((W + B A) x)``. merge_adapter(['l']) used to accept this and move the outputs
    (6.8e-3 here); it is refused, and with the LoRA added first (so it runs first) it stays exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    # (on the FFN's projection, beside the LoRA: by default a Pfeiffer adapter wraps the whole block)
    cfg = peftkit.HoulsbyConfig() if first == "houlsby" else peftkit.PfeifferConfig(pre_ln_site="projection")
    model = peftkit.get_peft_model(base, cfg, adapter_name="h")
    model.add_adapter("l", peftkit.LoraConfig(target_modules=["o_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters.h." in n:
                p.normal_(0, 0.3)
    model.set_adapter(["h", "l"])
    model.eval()
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(ValueError, match=r"merging 'l' while 'h', which the forward applies before it, stays "
                                         r"unmerged would change the outputs"):
        model.merge_adapter(["l"])
    assert model.base_model.merged_adapters() == []
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


def test_bias_all_survives_another_adapter_wrapping_its_modules(tmp_path):
    """BitFit after LoRA(bias="all") wraps the LayerNorms whose biases LoRA trains: the recorded names went
    stale and add_adapter, set_adapter and save_pretrained raised a bare KeyError."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = peftkit.get_peft_model(BertModel(cfg).eval(), peftkit.LoraConfig(r=4, target_modules=["query"],
                                                                             bias="all"))
    model.save_pretrained(tmp_path / "before")
    model.add_adapter("bf", peftkit.BitFitConfig())
    model.set_adapter("default")
    bias = "embeddings.LayerNorm.bias"
    assert model.base_model.extra_parameter(bias).requires_grad
    model.save_pretrained(tmp_path / "after")
    from safetensors.torch import load_file

    before, after = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("before", "after"))
    assert sorted(before) == sorted(after) and f"base_model.model.{bias}" in after


def _stack(*configs):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = peftkit.get_peft_model(BertModel(cfg).eval(), configs[0][1], adapter_name=configs[0][0])
    for name, config in configs[1:]:
        model.add_adapter(name, config)
    model.set_adapter([name for name, _ in configs])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_merging_an_input_transform_while_another_adapter_stays_unmerged_is_refused():
    """(IA)^3 on a feed-forward layer scales the input every adapter of the layer sees: folded into W alone,
    the unmerged LoRA after it saw the unscaled input (outputs off by 4e-3)."""
    t = ["output.dense"]
    model = _stack(("ia3", peftkit.IA3Config(target_modules=t, feedforward_modules=t)),
                   ("lora", peftkit.LoraConfig(r=4, target_modules=t, init_lora_weights=False)))
    x = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = model(input_ids=x).last_hidden_state
    with pytest.raises(ValueError, match="merging 'ia3', which transforms the layer's input, while 'lora' stays "
                                         "unmerged"):
        model.merge_adapter(["ia3"])
    model.merge_adapter(["lora"])  # the other way round is exact: the input is scaled before the base layer
    with torch.no_grad():
        assert (model(input_ids=x).last_hidden_state - expected).abs().max() <= 1e-5


def test_two_rescales_over_a_substituted_bias_are_not_merged():
    """(IA)^3 then DoRA then BitFit on one layer: the merged model differed by 1.9e-3 (the same in float64)."""
    t = ["output.dense"]
    model = _stack(("i", peftkit.IA3Config(target_modules=t, feedforward_modules=[])),
                   ("d", peftkit.LoraConfig(r=4, target_modules=t, use_dora=True, init_lora_weights=False)),
                   ("b", peftkit.BitFitConfig(target_modules=t)))
    with pytest.raises(ValueError, match=r"the merged form of \['i', 'd'\] stacked on the parameters that 'b' "
                                         "substitutes is not exact"):
        model.merge_adapter()
    assert model.base_model.merged_adapters() == []


def test_subfolder_reads_that_adapter_and_other_keywords_are_refused(tmp_path):
    """``subfolder=`` (peft's keyword) picks the adapter saved there; it was dropped unread, so the folder's root
    adapter was loaded instead. Any other keyword is refused before anything changes."""
    model, twin = all_five()
    x = ids()
    outs = each_active(model, x)
    model.save_pretrained(tmp_path)  # no adapter is named "default": each is saved in its own folder
    loaded = PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path, subfolder="ia3", adapter_name="ia3",
                                       low_cpu_mem_usage=True)
    assert (logits(loaded, x) - outs["ia3"]).abs().max() <= 1e-6
    assert isinstance(peftkit.PeftConfig.from_pretrained(tmp_path, subfolder="lora"), peftkit.LoraConfig)
    loaded.load_adapter(tmp_path, adapter_name="lora", subfolder="lora")
    loaded.set_adapter("lora")
    assert (logits(loaded, x) - outs["lora"]).abs().max() <= 1e-6
    with pytest.raises(TypeError, match=r"from_pretrained\(\) got unexpected keyword argument\(s\) \['bogus', "
                                        r"'revision'\]"):
        PeftModel.from_pretrained(twin, tmp_path / "lora", revision="main", bogus=1)
    assert not any(isinstance(m, AdaptedLayer) for m in twin.modules())
    with pytest.raises(TypeError, match=r"load_adapter\(\) got unexpected keyword argument\(s\) \['token'\]"):
        loaded.load_adapter(tmp_path / "houlsby", adapter_name="houlsby", token="x")
    assert "houlsby" not in loaded.peft_config


def test_peft_loading_keywords_at_their_defaults_are_taken_and_other_values_refused(tmp_path):
    """add_adapter(low_cpu_mem_usage=...), load_adapter(torch_device='cpu') and from_pretrained(
    autocast_adapter_dtype=True, ephemeral_gpu_offload=False) raised TypeError, the message calling them hub
    options; peft's defaults (and the model's own device) are taken, any other value refused by name."""
    model, twin = all_five()
    x = ids()
    outs = each_active(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "lora", adapter_name="lora",
                                       autocast_adapter_dtype=True, ephemeral_gpu_offload=False, key_mapping=None)
    loaded.load_adapter(tmp_path / "ia3", adapter_name="ia3", torch_device="cpu")
    loaded.add_adapter("more", peftkit.LoraConfig(r=2, target_modules=["query"]), low_cpu_mem_usage=True)
    loaded.set_adapter("ia3")
    assert (logits(loaded, x) - outs["ia3"]).abs().max() <= 1e-6
    for kw, message in [(dict(autocast_adapter_dtype=False), r"autocast_adapter_dtype=False is not supported by "
                                                            r"load_adapter\(\); peftkit takes only peft's default, True"),
                        (dict(ephemeral_gpu_offload=True), r"ephemeral_gpu_offload=True is not supported"),
                        (dict(torch_device="meta"), r"torch_device='meta' is not where the model is \(cpu\)"),
                        (dict(torch_device="nowhere"), r"torch_device='nowhere' is not a device")]:
        with pytest.raises(peftkit.ConfigError, match=message):
            loaded.load_adapter(tmp_path / "houlsby", adapter_name="houlsby", **kw)
        assert "houlsby" not in loaded.peft_config


def test_merge_and_unload_drops_an_adapter_merged_earlier():
    """``merge_and_unload(adapter_names=[b])`` after ``merge_adapter()`` merged ``a``: the result computes ``b``
    alone, as the docstring says (``a`` stayed in the weights). A failing merge leaves the earlier merge."""
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    model = get_peft_model(base, CONFIGS["lora"](), adapter_name="a")
    model.add_adapter("b", CONFIGS["lora"]())
    model.add_adapter("p", CONFIGS["prefix"]())
    nudge(model, "a", 0)
    nudge(model, "b", 1)
    x = ids()
    model.set_adapter("b")
    only_b = logits(model, x)
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload(adapter_names=["p"])
    assert model.base_model.merged_adapters() == ["a"]
    with_a = logits(model, x)
    plain = model.merge_and_unload(adapter_names=["b"])
    assert (logits(plain, x) - only_b).abs().max() <= 1e-5
    assert (logits(plain, x) - with_a).abs().max() > 1e-2
    assert (logits(twin, x) - only_b).abs().max() > 1e-2  # b changes the output


def test_get_peft_model_takes_peft_s_keywords_and_refuses_others():
    """Unknown keywords were dropped unread (a misspelt ``adaptor_name`` gave an adapter named "default"), and
    ``autocast_adapter_dtype=False`` left the adapters in float32 while peft keeps the base's dtype."""
    model = get_peft_model(tiny_bert_classifier(), CONFIGS["lora"](), mixed=False, autocast_adapter_dtype=True,
                           revision=None, low_cpu_mem_usage=False)
    assert list(model.peft_config) == ["default"]
    base = tiny_bert_classifier()
    with pytest.raises(TypeError, match="adaptor_name"):
        get_peft_model(base, CONFIGS["lora"](), adaptor_name="x")
    with pytest.raises(peftkit.ConfigError, match="autocast_adapter_dtype=False is not supported"):
        get_peft_model(base, CONFIGS["lora"](), autocast_adapter_dtype=False)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_an_adapter_cannot_target_inside_another_adapters_modules_to_save_copies(tmp_path):
    """Adapter 'a' replaces the embedding by its trained copies (modules_to_save); adapter 'b' targeting it was
    silently left off it, and b's file then did not load onto a plain base. It is refused, the model unchanged;
    in the other order (b first, copies taken with b inside) it works and b's file loads on a plain base, and
    two SEQ_CLS adapters on all-linear each keep their own head out of their targets."""
    from tests.conftest import tiny_llama

    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"],
                                                           modules_to_save=["embed_tokens"]), adapter_name="a")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(peftkit.ConfigError, match=r"target_modules=\['q_proj', 'embed_tokens'\] selects "
                                                  r"\['model.embed_tokens'\], which another adapter's modules_to_save "
                                                  r"replaces by its trained copies"):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    assert [n for n, _ in model.named_modules()] == before and list(model.peft_config) == ["a"]
    first = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                                           init_lora_weights=False), adapter_name="b")
    first.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    x = ids()
    with torch.no_grad():
        expected = first(input_ids=x).logits
    first.save_pretrained(tmp_path, selected_adapters=["b"])
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
    with torch.no_grad():
        assert (again(input_ids=x).logits - expected).abs().max() <= 1e-6
    two = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    two.add_adapter("y", LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    assert sorted(two.base_model.model.classifier.modules_to_save) == ["default", "y"]


def test_load_adapter_under_an_existing_name_reloads_its_weights(tmp_path):
    """As peft (and transformers' Trainer, which reloads checkpoints so): it was refused as "already exists"."""
    from peftkit import AdapterLoadError, ConfigError, IA3Config, LoraConfig, get_peft_model
    from tests.conftest import ids, perturb, tiny_llama

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(model)
    model.save_pretrained(tmp_path / "ckpt")
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    perturb(model)
    model.load_adapter(tmp_path / "ckpt", adapter_name="default", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)
    assert all(p is params[n] for n, p in model.named_parameters() if p.requires_grad)  # the optimiser's tensors
    other = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        other.load_adapter(tmp_path / "ckpt", adapter_name="default")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    get_peft_model(tiny_llama(), IA3Config()).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ConfigError, match=r"is LORA and .* holds a IA3 adapter"):
        model.load_adapter(tmp_path / "ia3", adapter_name="default")


def _llama_with(config, *names):
    from tests.conftest import tiny_llama

    model = get_peft_model(tiny_llama(), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    return model


def test_one_config_object_for_two_adapters_keeps_their_trainability_apart():
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = _llama_with(config, "a", "b")
    assert model.peft_config["a"] is config and model.peft_config["b"] is not config
    model.set_adapter("a")
    model.set_requires_grad("b", requires_grad=False)
    assert not model.peft_config["a"].inference_mode and model.peft_config["b"].inference_mode
    per_layer = (16 * 2 + 2 * 16) + (16 * 2 + 2 * 8)  # r=2 on q_proj (16 -> 16) and v_proj (16 -> 8)
    assert model.get_nb_trainable_parameters()[0] == 2 * per_layer  # a's only, in 2 layers


def test_two_active_adapters_that_each_train_the_head_are_refused_as_in_peft():
    from tests.conftest import tiny_llama

    def classifier():
        from transformers import LlamaForSequenceClassification

        torch.manual_seed(0)
        return LlamaForSequenceClassification(tiny_llama().config)

    model = get_peft_model(classifier(), LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    with pytest.raises(peftkit.ConfigError, match=r"adapters \['a', 'b'\] each train their own copy of 'score'"):
        model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a"]
    model.set_adapter("b")
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["b"].weight.add_(1.0)
        x = ids(2, 5)
        running = model(input_ids=x).logits
        merged = copy.deepcopy(model).merge_and_unload(adapter_names=["a", "b"])(input_ids=x).logits
    # the active adapter's head is the one kept, whatever the order of the names
    torch.testing.assert_close(merged, running, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["load_adapter", "set_peft_model_state_dict"])
def test_loading_values_into_a_merged_adapter_merges_the_new_values(how, tmp_path):
    from tests.conftest import tiny_llama

    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    nudge(model, "a", 1)
    model.save_pretrained(tmp_path)
    saved_state = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(model, adapter_name="a").items()}
    x = ids(2, 5)
    with torch.no_grad():
        expected = model(input_ids=x).logits
    nudge(model, "a", 2)
    model.merge_adapter()
    if how == "load_adapter":
        model.load_adapter(tmp_path / "a", "a")
    else:
        peftkit.set_peft_model_state_dict(model, saved_state, adapter_name="a")
    assert model.base_model.merged_adapters() == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-5, rtol=0)
    plain = model.unload()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rotation", ["hra", "oft"])
def test_a_weight_only_rotation_under_a_rescale_over_a_substituted_bias_merges_exactly(rotation):
    """A rotation that folds into the weight alone (HRA's ``W H``, OFT's ``W R^T``) reads no bias, so with DoRA and
    BitFit on the layer it is no second rescale: merging all three is exact (float64: any difference is a real
    one). OFT's was refused as one ("the merged form of ['r', 'd'] stacked on ... 'b' substitutes"), HRA's not."""
    t = ["output.dense"]
    rot = (peftkit.HRAConfig(r=2, init_weights=False, target_modules=t) if rotation == "hra"
           else peftkit.OFTConfig(oft_block_size=4, target_modules=t))
    dora = peftkit.LoraConfig(r=4, target_modules=t, use_dora=True, init_lora_weights=False)
    model = _stack(("r", rot), ("d", dora), ("b", peftkit.BitFitConfig(target_modules=t))).double()
    x = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = model(input_ids=x).last_hidden_state
        with model.disable_adapter():
            assert (model(input_ids=x).last_hidden_state - expected).abs().max() > 1e-2
        model.merge_adapter()
        assert sorted(model.base_model.merged_adapters()) == ["b", "d", "r"]
        assert (model(input_ids=x).last_hidden_state - expected).abs().max() <= 1e-10
    # a rescale that reads the bias (IA3's) in the rotation's place is still refused
    model.unmerge_adapter()
    model.delete_adapter("r")
    model.add_adapter("i", peftkit.IA3Config(target_modules=t, feedforward_modules=[]))
    model.set_adapter(["i", "d", "b"])
    with pytest.raises(ValueError, match=r"the merged form of \['i', 'd'\] stacked"):
        model.merge_adapter()


@pytest.mark.parametrize("rotation", ["hra", "oft"])
def test_a_kernel_rotation_with_two_rescales_on_a_conv2d_merges_exactly(rotation):
    """HRA's and OFT's Conv2d adapters substitute the kernel alone (``W H``, ``W R^T``), never the bias, so they are
    no substituted bias that DoRA and (IA)^3 after them would read twice: merging the three is exact (float64).
    HRA's was refused ("the merged form of ['d', 'i'] stacked on the parameters that 'r' substitutes"), OFT's not."""
    torch.manual_seed(0)
    t = ["0"]
    rot = (peftkit.HRAConfig(r=2, init_weights=False, target_modules=t) if rotation == "hra"
           else peftkit.OFTConfig(oft_block_size=4, target_modules=t))
    model = peftkit.get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1)).double(), rot,
                                   adapter_name="r")
    model.add_adapter("i", peftkit.IA3Config(target_modules=t, feedforward_modules=[]))
    model.add_adapter("d", peftkit.LoraConfig(r=2, target_modules=t, use_dora=True, init_lora_weights=False))
    model.set_adapter(["r", "d", "i"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            assert (model(x) - expected).abs().max() > 1e-2
        model.merge_adapter()
        assert sorted(model.base_model.merged_adapters()) == ["d", "i", "r"]
        assert (model(x) - expected).abs().max() <= 1e-10
