"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, Compacter, Compacter++, AdapterDrop) on a BERT
classifier, GPT-2 and Llama: identity at step 0, training, decoding, counts, files, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import (
    AdapterDropConfig,
    BottleneckConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigError,
    HoulsbyConfig,
    ParallelConfig,
    PeftModel,
    PfeifferConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from peftkit.layers import AdaptedLayer
from peftkit.methods.adapter_layers import BottleneckAdapter, PHMLinear, SublayerLayer
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.decode_checks import check_decoding, greedy_cached, no_eos

MODELS = {"bert": tiny_bert_classifier, "gpt2": tiny_gpt2, "llama": tiny_llama}
PRESETS = {
    "houlsby": lambda: HoulsbyConfig(reduction_factor=4),
    "pfeiffer": lambda: PfeifferConfig(reduction_factor=4),
    "parallel": lambda: ParallelConfig(mh_adapter=True),
    "compacter": lambda: CompacterConfig(reduction_factor=2),
    "compacter++": lambda: CompacterPlusPlusConfig(reduction_factor=2, phm_dim=2, phm_rank=2),
    "adapterdrop": lambda: AdapterDropConfig(adapterdrop_layers=1, reduction_factor=4),
    "ln_before": lambda: BottleneckConfig(reduction_factor=4, ln_before=True, non_linearity="tanh"),
}
# the sites each preset adapts, per model: (module-name suffix, wrapper type)
SITES = {
    "bert": {"attn": "attention.output.dense", "ffn": "output.dense", "attn_block": "attention.output",
             "ffn_block": "output"},
    "gpt2": {"attn": "attn.c_proj", "ffn": "mlp.c_proj", "attn_block": "attn", "ffn_block": "mlp"},
    "llama": {"attn": "self_attn.o_proj", "ffn": "mlp.down_proj", "attn_block": "self_attn", "ffn_block": "mlp"},
}


def adapted_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


def outputs(model, x):
    """Logits and last hidden states together (a tiny BERT classifier's logits alone are ~1e-2)."""
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_identity_at_step_zero_and_perturbed_adapters_change_the_output(arch, preset):
    base = MODELS[arch]()
    x = ids()
    expected = outputs(base, x)
    model = get_peft_model(base, PRESETS[preset]())
    assert (outputs(model, x) - expected).abs().max() <= 1e-6
    perturb(model)
    assert (outputs(model, x) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert (outputs(model, x) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("arch", list(MODELS))
def test_sites_follow_the_architecture_table(arch):
    s = SITES[arch]
    layers = "bert.encoder.layer" if arch == "bert" else "transformer.h" if arch == "gpt2" else "model.layers"
    houlsby = get_peft_model(MODELS[arch](), HoulsbyConfig())
    assert adapted_names(houlsby.get_base_model()) == [f"{layers}.{i}.{s[k]}" for i in (0, 1) for k in ("attn", "ffn")]
    pfeiffer = get_peft_model(MODELS[arch](), PfeifferConfig())
    # post-LN BERT: after the FFN's Add & Norm (its LayerNorm); pre-LN decoders: on the block's output (x + u)
    ffn = ".output.LayerNorm" if arch == "bert" else ""
    assert adapted_names(pfeiffer.get_base_model()) == [f"{layers}.{i}{ffn}" for i in (0, 1)]
    parallel = get_peft_model(MODELS[arch](), ParallelConfig(mh_adapter=True)).get_base_model()
    blocks = [f"{layers}.{i}.{s[k]}" for i in (0, 1) for k in ("attn_block", "ffn_block")]
    assert adapted_names(parallel) == blocks
    assert all(isinstance(parallel.get_submodule(b), SublayerLayer) for b in blocks)
    assert all(parallel.get_submodule(b).residual_arg == (arch == "bert") for b in blocks)


def scaled(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Redraw a tiny decoder's matrices from N(0, std^2): with the default 0.02 its tied output layer
    keeps every logit near 0, so no adapter could lower the loss much."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel", "compacter", "adapterdrop"])
def test_training_lowers_the_loss_and_only_adapters_get_gradients(arch, preset):
    config = PRESETS[preset]()
    config.task_type = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    model = get_peft_model(MODELS[arch]() if arch == "bert" else scaled(MODELS[arch]()), config)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 64, (8, 10), generator=g)
    labels = torch.tensor([0, 1] * 4) if arch == "bert" else x
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(30):  # in eval mode (no dropout), so the loss curve is deterministic
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert ".adapters.default.adapter_" in name or ".modules_to_save.default." in name, name
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("preset", ["houlsby", "parallel", "compacter++"])
def test_generate_with_cache_and_left_padding_match_plain_decoding(arch, preset):
    torch.manual_seed(0)
    base = no_eos(MODELS[arch]())
    prompt = torch.randint(3, 64, (1, 5))
    plain = greedy_cached(base, prompt, torch.ones_like(prompt), 6)
    model = get_peft_model(base, PRESETS[preset]())
    perturb(model, std=0.5)
    check_decoding(model)
    assert not torch.equal(greedy_cached(model, prompt, torch.ones_like(prompt), 6), plain)
    with model.disable_adapter():
        assert torch.equal(greedy_cached(model, prompt, torch.ones_like(prompt), 6), plain)


def test_trainable_counts_match_the_formulas():
    d, blocks = 16, 2
    cases = [
        (HoulsbyConfig(reduction_factor=4), 2 * blocks * (2 * d * 4 + 4 + d)),
        (PfeifferConfig(bottleneck_size=3), blocks * (2 * d * 3 + 3 + d)),
        (ParallelConfig(mh_adapter=True), 2 * blocks * (2 * d * 8 + 8 + d)),
        (BottleneckConfig(reduction_factor=4, ln_before=True), 2 * blocks * (2 * d * 4 + 4 + d + 2 * d)),
        # Compacter: 2 r (d + m) + m + d per site, plus the shared n^3 rule once
        (CompacterConfig(reduction_factor=2), 2 * blocks * (2 * 1 * (d + 8) + 8 + d) + 4 ** 3),
        (CompacterPlusPlusConfig(reduction_factor=2, phm_dim=2, phm_rank=3), blocks * (2 * 3 * (d + 8) + 8 + d) + 2 ** 3),
        (AdapterDropConfig(adapterdrop_layers=1, reduction_factor=4), 1 * (2 * d * 4 + 4 + d)),
        (AdapterDropConfig(adapterdrop_layers=1, adapterdrop_mode="random", reduction_factor=4), 2 * (2 * d * 4 + 4 + d)),
    ]
    for config, expected in cases:
        model = get_peft_model(tiny_llama(), config)
        assert model.get_nb_trainable_parameters()[0] == expected, type(config).__name__


def test_compacter_matrix_is_the_sum_of_kronecker_products_and_the_rule_is_shared():
    model = get_peft_model(tiny_gpt2(), CompacterConfig(reduction_factor=2))
    perturb(model)
    phm = [m for m in model.modules() if isinstance(m, PHMLinear)]
    assert len(phm) == 8 and all(p.phm_rule is phm[0].phm_rule for p in phm)
    layer = phm[0]
    w = layer.W_left @ layer.W_right
    explicit = sum(torch.kron(layer.phm_rule[i], w[i]) for i in range(4))
    assert (layer.matrix() - explicit).abs().max() <= 1e-6
    x = torch.randn(3, 16)
    assert (layer(x) - (x @ explicit + layer.b)).abs().max() <= 1e-5


def test_parallel_adapter_equations():
    torch.manual_seed(0)
    gpt = get_peft_model(tiny_gpt2(), ParallelConfig())
    perturb(gpt)
    mlp = gpt.get_base_model().transformer.h[0].mlp
    adapter = mlp.adapters["default"]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = mlp.base_layer(x) + 4.0 * adapter.adapter_up(torch.relu(adapter.adapter_down(x)))
        assert (mlp(x) - expected).abs().max() <= 1e-6
    bert = get_peft_model(tiny_bert_classifier(), ParallelConfig())
    perturb(bert)
    out = bert.get_base_model().bert.encoder.layer[0].output
    adapter = out.adapters["default"]
    inner, resid = torch.randn(2, 5, 32), torch.randn(2, 5, 16)
    with torch.no_grad():  # post-LN: LayerNorm(dense(inner) + resid + A(resid))
        expected = out.base_layer(inner, resid + 4.0 * adapter.adapter_up(torch.relu(adapter.adapter_down(resid))))
        assert (out(inner, resid) - expected).abs().max() <= 1e-6


def test_serial_adapter_equation_and_residual_placement():
    for before in (True, False):
        model = get_peft_model(tiny_llama(), PfeifferConfig(bottleneck_size=3, ln_before=True, residual_before_ln=before,
                                                            non_linearity="gelu", scaling=0.5, pre_ln_site="projection"))
        perturb(model)
        layer = model.get_base_model().model.layers[1].mlp.down_proj
        a = layer.adapters["default"]
        x = torch.randn(2, 4, 24)
        with torch.no_grad():
            y = layer.base_layer(x)
            h = a.adapter_norm(y)
            expected = (y if before else h) + 0.5 * a.adapter_up(torch.nn.functional.gelu(a.adapter_down(h)))
            assert (layer(x) - expected).abs().max() <= 1e-6


def test_bert_init_is_near_identity():
    base = tiny_gpt2()
    x = ids()
    expected = outputs(base, x)
    model = get_peft_model(base, HoulsbyConfig(init_weights="bert"))
    change = (outputs(model, x) - expected).abs().max().item()
    assert 0 < change < 1e-2
    ups = [m.adapter_up.weight for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert all(0.005 < w.std().item() < 0.02 for w in ups)


def test_random_adapterdrop_skips_lower_blocks_only_in_training_and_redraws_each_step():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), AdapterDropConfig(adapterdrop_layers=1, adapterdrop_mode="random"))
    perturb(model)
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    state = adapters[0].drop
    assert [a.block for a in adapters] == [0, 1] and all(a.drop is state for a in adapters)
    x = ids()
    state.n = 1
    model.train()
    assert [a.dropped for a in adapters] == [True, False]
    dropped_out = model(input_ids=x).logits.detach()
    first = model.get_base_model().model.layers[0]  # the block, whose output the adapter changes
    first.set_active([])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, dropped_out)  # the dropped adapter did nothing
    first.set_active(["default"])
    model.eval()
    assert not any(a.dropped for a in adapters)
    seen = set()
    for step in range(1, 40):
        model.peft_step_end(step)
        seen.add(state.n)
    assert seen == {0, 1}


def test_mixed_adapter_batch_gives_each_row_its_adapter():
    base = tiny_gpt2()
    model = get_peft_model(base, HoulsbyConfig(reduction_factor=4))
    model.add_adapter("par", ParallelConfig())
    perturb_all(model)
    x = ids(batch=4)
    names = ["default", "par", "__base__", "par"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=x[i:i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=x[i:i + 1]).logits
            assert (mixed[i] - alone[0]).abs().max() <= 1e-5


def perturb_all(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter_" in name:
                p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("preset", ["houlsby", "parallel", "compacter"])
def test_save_and_load_round_trip_with_own_peft_type(preset, tmp_path):
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, PRESETS[preset]())
    perturb(model)
    x = ids()
    expected = outputs(model, x)
    model.save_pretrained(tmp_path)
    keys = set(get_peft_model_state_dict(model))
    site = "base_model.model.model.layers.0." + ("mlp" if preset == "parallel" else "mlp.down_proj")
    assert f"{site}.adapter_up.{'W_right' if preset == 'compacter' else 'weight'}" in keys
    fresh = tiny_llama()
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(outputs(loaded, x), expected)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])


def test_explicit_targets_on_a_custom_model_and_unknown_architectures():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.out = nn.Linear(8, 12), nn.Linear(12, 8)

        def forward(self, x):
            return x + self.out(torch.relu(self.proj(x)))

    net = nn.Sequential(Block(), Block())
    with pytest.raises(ConfigError, match="no adapter sites known for model_type=None"):
        get_peft_model(net, PfeifferConfig())
    model = get_peft_model(net, PfeifferConfig(target_modules=["out"], bottleneck_size=2))
    assert adapted_names(net) == ["0.out", "1.out"]
    assert model.get_nb_trainable_parameters()[0] == 2 * (2 * 8 * 2 + 2 + 8)
    par = get_peft_model(nn.Sequential(Block(), Block()), ParallelConfig(target_modules=r"\d", bottleneck_size=2))
    assert isinstance(par.get_base_model()[1], SublayerLayer)
    with pytest.raises(ConfigError, match="cannot adapt module"):
        get_peft_model(nn.Sequential(Block()), HoulsbyConfig(target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"0\.out: a parallel adapter sits beside a whole"):
        get_peft_model(nn.Sequential(Block()), ParallelConfig(target_modules=["out"]))


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_other_table_architectures(arch):
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaModel,
    )

    if arch == "roberta":
        base = RobertaModel(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=40)).eval()
    else:
        base = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2,
                                                                    hidden_dim=32)).eval()
    x = ids()
    with torch.no_grad():
        expected = base(input_ids=x)[0]
    model = get_peft_model(base, HoulsbyConfig(reduction_factor=4))
    model.add_adapter("par", ParallelConfig(mh_adapter=True))
    assert len(adapted_names(base)) == 8
    perturb_all(model)
    for name in ("default", "par"):
        model.set_adapter(name)
        with torch.no_grad():
            assert (model(input_ids=x)[0] - expected).abs().max() > 1e-3
    with model.disable_adapter(), torch.no_grad():
        assert (model(input_ids=x)[0] - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("kw, fragment", [
    (dict(reduction_factor=0), "reduction_factor=0"), (dict(bottleneck_size=0), "bottleneck_size=0"),
    (dict(bottleneck_size=2.5), "bottleneck_size=2.5"), (dict(non_linearity="soft"), "non_linearity='soft'"),
    (dict(scaling=-1.0), "scaling=-1.0"), (dict(adapter_dropout=1.0), "adapter_dropout=1.0"),
    (dict(init_weights="zeros"), "init_weights='zeros'"), (dict(phm_dim=0), "phm_dim=0"),
    (dict(phm_rank=0), "phm_rank=0"), (dict(adapterdrop_layers=-1), "adapterdrop_layers=-1"),
    (dict(adapterdrop_mode="sometimes"), "adapterdrop_mode='sometimes'"), (dict(is_parallel="yes"), "is_parallel='yes'"),
    (dict(mh_adapter=False, output_adapter=False), "leave no site"), (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(task_type="CLS"), "task_type='CLS'"),
])
def test_bad_values_raise_config_error_naming_them(kw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        BottleneckConfig(**kw)


def test_errors_found_at_injection_leave_the_model_unchanged():
    base = tiny_llama()
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ConfigError, match="phm_dim=3 must divide the hidden size 16"):
        get_peft_model(base, CompacterConfig(phm_dim=3, bottleneck_size=3))
    # the message says which blocks there are and how to set the option from the command line
    with pytest.raises(ConfigError, match=r"leaves out every block \(the model's adapted blocks are 0\.\.1\); use a "
                                          r"smaller number \(on the command line: --option adapterdrop_layers=N\)"):
        get_peft_model(base, AdapterDropConfig(adapterdrop_layers=2))
    assert {n: type(m) for n, m in base.named_modules()} == before


def test_merging_a_bottleneck_adapter_is_refused():
    model = get_peft_model(tiny_gpt2(), HoulsbyConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()


def _adapted_names(model, adapter):
    return sorted(n for n, m in model.named_modules() if type(m).__name__ == "AdaptedLayer" and adapter in m.adapters)


def test_lora_and_a_parallel_adapter_in_either_order_adapt_the_same_layers_and_unload():
    """LoRA added after a parallel adapter skipped the dense layers inside its wrapped sub-layers (3 of 7, no
    warning); LoRA added before it made unload()/merge_and_unload() fail half way (the inner wrapper was
    addressed through an outer one already replaced)."""
    import copy

    from peftkit import LoraConfig, ParallelConfig, get_peft_model
    from tests.conftest import ids, perturb, tiny_bert_classifier

    base = tiny_bert_classifier()
    after = get_peft_model(copy.deepcopy(base), ParallelConfig(mh_adapter=True), adapter_name="par")
    after.add_adapter("l", LoraConfig(r=2, target_modules=["dense"]))
    before = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["dense"]), adapter_name="l")
    before.add_adapter("par", ParallelConfig(mh_adapter=True))
    assert len(_adapted_names(after, "l")) == len(_adapted_names(before, "l")) == 7
    assert _adapted_names(after, "l") == _adapted_names(before, "l")
    perturb(after)
    before.load_state_dict(after.state_dict())  # the same module tree, so the same keys
    x = ids(batch=3)
    for model in (after, before):
        model.set_adapter(["par", "l"])
        model.eval()
    with torch.no_grad():
        assert torch.equal(after(input_ids=x).logits, before(input_ids=x).logits)
        merged = before.merge_and_unload(adapter_names=["l"])
        assert not any(type(m).__name__ in ("AdaptedLayer", "SublayerLayer") for m in merged.modules())
        after.set_adapter("l")
        assert torch.allclose(after(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-5)
        bare = after.unload()
        assert not any(type(m).__name__ in ("AdaptedLayer", "SublayerLayer") for m in bare.modules())
        assert torch.equal(bare(input_ids=x).logits, base(input_ids=x).logits)


@pytest.mark.parametrize("mode, message", [("fixed", "leaves out every block"),
                                           ("random", r"lets a step drop the adapters of every block \(the model's "
                                                      r"adapted blocks are 0..1\).*use at most 1")])
def test_adapterdrop_of_every_block_is_refused(mode, message):
    """Random mode accepted adapterdrop_layers=100 on 2 blocks: most steps trained no adapter at all."""
    from peftkit import AdapterDropConfig, ConfigError, get_peft_model

    model = tiny_llama()
    for layers in (2, 100):
        with pytest.raises(ConfigError, match=message):
            get_peft_model(model, AdapterDropConfig(adapterdrop_layers=layers, adapterdrop_mode=mode))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_adapterdrop_without_a_block_index_is_refused(mode):
    """With a layers_pattern that finds no block index, every adapter was kept and never dropped, silently."""
    from peftkit import AdapterDropConfig, ConfigError, get_peft_model

    model = tiny_llama()
    with pytest.raises(ConfigError, match="adapterdrop_layers=1 drops the adapters of the first blocks, but no block "
                                          "index was found"):
        get_peft_model(model, AdapterDropConfig(adapterdrop_layers=1, adapterdrop_mode=mode, layers_pattern="blk"))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_lora_inside_a_parallel_adapters_sub_layer_is_saved_under_plain_names_that_peft_loads(tmp_path):
    """Its keys read 'attention.output.base_layer.dense.lora_A.weight', which peft did not recognise (it loaded
    the LoRA of 3 of BERT's 7 dense layers, and its logits differed by 0.125)."""
    import copy

    import peft
    from safetensors.torch import load_file

    from peftkit import LoraConfig, ParallelConfig, get_peft_model

    base = tiny_bert_classifier()
    for order in ("parallel first", "lora first"):
        if order == "parallel first":
            model = get_peft_model(copy.deepcopy(base), ParallelConfig(mh_adapter=True), adapter_name="par")
            model.add_adapter("l", LoraConfig(r=2, target_modules=["dense"]))
        else:
            model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["dense"]), adapter_name="l")
            model.add_adapter("par", ParallelConfig(mh_adapter=True))
        perturb(model)
        out = tmp_path / order.replace(" ", "-")
        model.save_pretrained(out, selected_adapters=["l"])
        keys = load_file(out / "l" / "adapter_model.safetensors").keys()
        assert len(keys) == 14 and not any("base_layer" in k for k in keys)
        model.set_adapter("l")
        model.eval()
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "l").eval()
        x = ids(batch=2)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-6)


@pytest.mark.parametrize("target", ["layers", "model"])
def test_a_parallel_adapter_refuses_a_container_or_a_whole_model_as_its_sub_layer(target):
    """ParallelConfig(target_modules=['layers']) wrapped the ModuleList (and ['model'] the backbone): accepted,
    then the first forward failed ("'SublayerLayer' object is not subscriptable") and the base model no longer
    ran either. Both are refused while targeting, the model untouched."""
    model = tiny_llama()
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(ConfigError, match=r"^model(\.layers)?: a parallel adapter sits beside one attention or "
                                          r"feed-forward sub-layer, and (ModuleList|LlamaModel) is not one"):
        get_peft_model(model, ParallelConfig(target_modules=[target]))
    assert {n for n, _ in model.named_modules()} == before
    assert model(input_ids=ids()).logits.shape == (3, 7, 64)


@pytest.mark.parametrize("config_cls", [HoulsbyConfig, ParallelConfig, CompacterConfig])
def test_empty_target_modules_is_refused_when_the_config_is_made(config_cls):
    """``target_modules=[]`` was accepted by the bottleneck configs (refused only at injection), while the
    LoRA family refuses it when the config is made."""
    with pytest.raises(ConfigError, match=r"target_modules=\[\] adapts nothing"):
        config_cls(target_modules=[])


@pytest.mark.parametrize("activation", ["gelu_new", "identity"])
def test_adapters_with_every_activation_pickle(activation):
    """Two activations were lambdas, and torch.save(model) of a model holding them failed."""
    import io

    from peftkit import HoulsbyConfig

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), HoulsbyConfig(non_linearity=activation, reduction_factor=4))
    perturb(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    x = ids()
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(input_ids=x).logits, model(input_ids=x).logits)


def test_a_frozen_random_adapterdrop_adapter_is_never_dropped():
    """A robust-AdapterDrop adapter that does not train (loaded for a fusion, or active beside one in training)
    was still skipped in the blocks below its last draw whenever the model was in training mode."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), AdapterDropConfig(adapterdrop_layers=1, adapterdrop_mode="random"))
    perturb(model)
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    adapters[0].drop.n = 1
    model.train()
    assert [a.dropped for a in adapters] == [True, False]
    model.requires_grad_(False)
    assert [a.dropped for a in adapters] == [False, False]
    x = ids()
    with torch.no_grad():
        train_mode = model(input_ids=x).logits
        assert torch.equal(train_mode, model.eval()(input_ids=x).logits)


def test_parallel_adapters_on_a_float64_model_are_float64():
    """A parallel adapter's wrapper looked for the sub-layer's own weight, found none and left it float32."""
    from peftkit import ParallelConfig

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().double(), ParallelConfig(reduction_factor=4))
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.float64}


def test_a_parallel_adapter_beside_a_sub_layer_that_changes_shape_is_refused():
    """BERT's intermediate (16 -> 32 features here) was accepted and every forward failed on a matrix product; the pooler
    ((batch, length, d) -> (batch, d)) failed on a broadcast."""
    from peftkit import ConfigError, ParallelConfig

    model = tiny_bert_classifier()
    with pytest.raises(ConfigError, match=r"layer\.0\.intermediate: .* BertIntermediate maps 16 features to 32"):
        get_peft_model(model, ParallelConfig(target_modules=r".*\.intermediate", reduction_factor=4))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    pooled = get_peft_model(model, ParallelConfig(target_modules=r".*\.pooler", reduction_factor=4))
    with pytest.raises(ValueError, match=r"sub-layer's output has shape \(3, 16\)"):
        pooled(input_ids=ids())


def test_a_saved_random_adapterdrop_adapter_that_could_drop_every_block_still_loads_for_inference(tmp_path):
    """Such adapters were accepted before that check; inference never drops, so loading one for it works."""
    import json

    from peftkit import PeftModel

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), AdapterDropConfig(adapterdrop_layers=1, adapterdrop_mode="random"))
    perturb(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "adapterdrop_layers": 2}))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
    with pytest.raises(ConfigError, match="lets a step drop the adapters of every block"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
