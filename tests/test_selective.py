"""Selective methods (BitFit, partial, diff pruning, FISH, Child-Tuning): the lifecycle and its exactness.

Every method is trained for a few AdamW steps with weight decay on a tiny BERT, then checked against
a copy of the base: only the intended entries ever change, the saved difference reloads exactly,
disable/unload give the base back, merging gives the trained model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit import AdapterLoadError, PeftModel, get_peft_model
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.child_tuning import ChildTuningConfig
from peftkit.methods.diff_pruning import DiffPruningConfig
from peftkit.methods.fish import FishMaskConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.partial import PartialConfig
from tests.conftest import perturb, tiny_bert_classifier

CONFIGS = {
    "bitfit": lambda: BitFitConfig(task_type="SEQ_CLS"),
    "bitfit-subset": lambda: BitFitConfig(target_modules=["query", "intermediate.dense"], task_type="SEQ_CLS"),
    "partial": lambda: PartialConfig(num_top_layers=1, task_type="SEQ_CLS"),
    "diff-pruning": lambda: DiffPruningConfig(target_sparsity=0.97, task_type="SEQ_CLS"),
    "fish": lambda: FishMaskConfig(keep_ratio=0.02, num_fisher_samples=6, task_type="SEQ_CLS"),
    "child-D": lambda: ChildTuningConfig(reserve_p=0.1, num_fisher_samples=6, task_type="SEQ_CLS"),
    "child-F": lambda: ChildTuningConfig(child_tuning_type="F", reserve_p=0.5, target_modules=["query", "value"],
                                         task_type="SEQ_CLS"),
}


def batch(rows: int = 8, seq: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 64, (rows, seq), generator=g), "labels": torch.arange(rows) % 2}


def adapters_of(peft_model, name="default"):
    from peftkit.methods.selective import SelectTuner

    return dict(SelectTuner.adapters(peft_model.base_model, name))


def trained(key: str, steps: int = 6, weight_decay: float = 0.1):
    """A tiny BERT with adapter ``key`` after ``steps`` AdamW steps (weight decay on every parameter)."""
    model = tiny_bert_classifier()
    base = copy.deepcopy(model)
    peft_model = get_peft_model(model, CONFIGS[key]())
    peft_model.peft_prepare(iter([batch(seed=s) for s in range(10)]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=weight_decay)
    peft_model.train()
    for step in range(1, steps + 1):
        peft_model(**batch(seed=step)).loss.backward()
        opt.step()
        peft_model.peft_step_end(step)
        opt.zero_grad()
    return base, peft_model.eval()


def changed_entries(base, peft_model) -> dict[str, torch.Tensor]:
    """Per parameter of the merged model: a bool mask of the entries that differ from the base."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    now, before = merged.state_dict(), base.state_dict()
    assert now.keys() == before.keys()
    return {k: now[k] != before[k] for k in before if (now[k] != before[k]).any()}


def intended(key: str, name: str, peft_model) -> bool:
    if name.startswith("classifier."):
        return True
    module, _, param = name.rpartition(".")
    if key.startswith("bitfit"):
        subset = key == "bitfit-subset"
        return param == "bias" and (not subset or module.endswith(("query", "intermediate.dense")))
    if key == "partial":
        return name.startswith("bert.encoder.layer.1.")
    if key == "child-F":
        return module.endswith(("query", "value"))
    return True  # sparse methods: checked entry by entry below


@pytest.mark.parametrize("key", list(CONFIGS))
def test_only_intended_entries_change_and_base_tensors_are_untouched(key):
    base, peft_model = trained(key)
    changed = changed_entries(base, peft_model)
    assert any(not k.startswith("classifier.") for k in changed)  # the adapter really trained something
    for name in changed:
        assert intended(key, name, peft_model), f"{key} changed {name}"
    if key in ("fish", "child-D", "diff-pruning"):
        # at most k = round(fraction * N) entries of the model change, and only at the stored positions
        selected = sum(a.numel(n) for a in adapters_of(peft_model).values() for n in a.names)
        fraction = {"fish": 0.02, "child-D": 0.1, "diff-pruning": 1 - 0.97}[key]
        count = sum(int(m.sum()) for k, m in changed.items() if not k.startswith("classifier."))
        assert 0 < count <= round(fraction * selected)
        positions = {f"{m}.{n}": a.dense(n) != 0 for m, a in adapters_of(peft_model).items() for n in a.names}
        for name, mask in changed.items():
            if not name.startswith("classifier."):
                assert not (mask & ~positions[name]).any(), name
    # the wrapped base modules were never written to: unloading gives the base bit for bit
    unloaded = peft_model.unload().state_dict()
    assert all(torch.equal(unloaded[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("key", ["fish", "child-D"])
def test_sparse_masks_hold_under_sgd_momentum_and_decay(key):
    """Optimisers that move entries with a zero gradient (momentum, decoupled decay) cannot reach
    entries outside a fixed mask: those entries are not parameters at all."""
    model = tiny_bert_classifier()
    peft_model = get_peft_model(model, CONFIGS[key]())
    peft_model.peft_prepare(iter([batch(seed=s) for s in range(10)]))
    masks = {m: {n: a.dense(n) for n in a.names} for m, a in adapters_of(peft_model).items()}
    positions = {m: {n: getattr(a, f"diff_{n}_indices").clone() for n in a.names}
                 for m, a in adapters_of(peft_model).items()}
    assert all(not d.any() for per in masks.values() for d in per.values())
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=0.5)
    for step in range(4):
        peft_model(**batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    for m, a in adapters_of(peft_model).items():
        for n in a.names:
            d = a.dense(n).reshape(-1)
            outside = torch.ones_like(d, dtype=torch.bool)
            outside[positions[m][n].long()] = False
            assert not d[outside].any()


@pytest.mark.parametrize("key", list(CONFIGS))
def test_saved_difference_reloads_exactly_onto_a_fresh_base(key, tmp_path):
    base, peft_model = trained(key)
    x = batch(seed=42)["input_ids"]
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == type(CONFIGS[key]()).peft_type
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    sparse = key in ("fish", "child-D", "diff-pruning")
    diffs = [k for k in tensors if not k.startswith("base_model.model.classifier.")]
    assert diffs and all(".diff_" in k for k in diffs)
    assert all(k.endswith(("_values", "_indices")) for k in diffs) == sparse
    if sparse:
        assert all(tensors[k].dtype == torch.int32 for k in diffs if k.endswith("_indices"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        again = loaded(input_ids=x).logits
    assert (again - expected).abs().max().item() <= 1e-6
    trainable, _ = loaded.get_nb_trainable_parameters()
    assert trainable == 0  # inference mode by default


def test_reloaded_diff_pruning_trains_its_fixed_mask(tmp_path):
    base, peft_model = trained("diff-pruning")
    peft_model.save_pretrained(tmp_path)
    stored = sum(a.dense(n).count_nonzero().item() for a in adapters_of(peft_model).values() for n in a.names)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    head = sum(p.numel() for p in base.classifier.parameters())
    assert loaded.get_nb_trainable_parameters()[0] == stored + head
    assert all(a.is_sparse[n] for a in adapters_of(loaded).values() for n in a.names)


@pytest.mark.parametrize("key", ["bitfit", "partial", "fish", "diff-pruning", "child-F"])
def test_disable_unload_and_merge(key):
    base, peft_model = trained(key, steps=2)
    perturb(peft_model, std=0.05)  # every trainable difference non-zero where it may be
    x = batch(seed=7)["input_ids"]
    with torch.no_grad():
        reference = base(input_ids=x).logits
        adapted = peft_model(input_ids=x).logits
        assert (adapted - reference).abs().max() > 1e-3
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(input_ids=x).logits, reference)
        for _ in range(50):
            peft_model.merge_adapter()
            peft_model.unmerge_adapter()
        assert (peft_model(input_ids=x).logits - adapted).abs().max() <= 1e-5
        merged = copy.deepcopy(peft_model).merge_and_unload()
        assert (merged(input_ids=x).logits - adapted).abs().max() <= 1e-6
        assert not any(type(m).__name__ == "AdaptedLayer" for m in merged.modules())
        plain = peft_model.unload()
        assert (plain(input_ids=x).logits - reference).abs().max() <= 1e-5


def test_several_named_selective_adapters_coexist_and_mix_per_row():
    model = tiny_bert_classifier()
    peft_model = get_peft_model(model, BitFitConfig(), adapter_name="bias")
    peft_model.add_adapter("sparse", FishMaskConfig(keep_ratio=0.05, num_fisher_samples=4))
    peft_model.add_adapter("lora", LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    peft_model.set_adapter(["bias", "sparse", "lora"])
    peft_model.peft_prepare(iter([batch()]))
    perturb(peft_model, std=0.1)
    x = batch(rows=6)["input_ids"]
    with torch.no_grad():
        alone = {}
        for name in ("bias", "sparse", "lora"):
            peft_model.set_adapter(name)
            alone[name] = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            alone["__base__"] = peft_model(input_ids=x).logits
        assert (alone["bias"] - alone["sparse"]).abs().max() > 1e-3
        rows = ["bias", "sparse", "__base__", "lora", "sparse", "bias"]
        mixed = peft_model(input_ids=x, adapter_names=rows).logits
        for i, name in enumerate(rows):
            assert (mixed[i] - alone[name][i]).abs().max() <= 1e-6
        peft_model.set_adapter(["bias", "sparse", "lora"])
        together = peft_model(input_ids=x).logits
        merged = copy.deepcopy(peft_model).merge_and_unload()
        assert (merged(input_ids=x).logits - together).abs().max() <= 1e-5
    peft_model.delete_adapter("sparse")
    assert "sparse" not in peft_model.peft_config
    assert all("sparse" not in a for a in adapters_of(peft_model, "bias"))


def test_corrupt_sparse_indices_are_refused_and_the_model_left_unadapted(tmp_path):
    base, peft_model = trained("fish", steps=1)
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(path)
    key = next(k for k in good if k.endswith("_indices") and good[k].numel() > 1)
    values = key.removesuffix("_indices") + "_values"
    first = int(good[key][0])
    for change, problem in ((lambda t: t[key].__setitem__(0, 10**6), "index 1000000 is out of range"),
                            (lambda t: t[key].__setitem__(1, first), f"index {first} is repeated"),
                            (lambda t: t.__setitem__(key, t[key].bool()), "the indices are bool, not integers"),
                            (lambda t: t.__setitem__(values, t[values][:-1]), "[0-9]+ indices but values of shape")):
        tensors = {k: v.clone() for k, v in good.items()}
        change(tensors)
        save_file(tensors, path)
        fresh = copy.deepcopy(base)
        with pytest.raises(AdapterLoadError, match=f"not a valid sparse difference .*: {problem}"):
            PeftModel.from_pretrained(fresh, tmp_path)
        assert not any(type(m).__name__ == "AdaptedLayer" for m in fresh.modules())


def test_fish_before_prepare_trains_nothing_and_warns():
    peft_model = get_peft_model(tiny_bert_classifier(), FishMaskConfig(keep_ratio=0.1))
    assert peft_model.get_nb_trainable_parameters()[0] == 0
    peft_model.train()
    with pytest.warns(UserWarning, match="peft_prepare"):
        peft_model(**batch())


def test_selecting_a_tied_tensor_warns_that_the_other_module_keeps_the_base():
    """A tied embedding (GPT-2's wte, shared with lm_head): the difference reaches the input embedding only, as
    LoRA's does; it did so silently. The output equals the model with the difference on the embedding alone."""
    import warnings

    from peftkit import PartialConfig
    from tests.conftest import tiny_gpt2

    base = tiny_gpt2()
    twin = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"selects 1 tensor\(s\) shared with another module: transformer.wte.weight "
                                         r"\(also lm_head.weight\)"):
        model = get_peft_model(base, PartialConfig(target_modules=["wte"]))
    delta = next(p for n, p in model.named_parameters() if p.requires_grad and "wte" in n)
    with torch.no_grad():
        delta.normal_(0, 0.5)
        x = torch.randint(0, 64, (2, 6))
        twin.transformer.wte = torch.nn.Embedding.from_pretrained(twin.transformer.wte.weight + delta, freeze=True)
        assert (model(input_ids=x).logits - twin(input_ids=x).logits).abs().max() <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(tiny_gpt2(), PartialConfig(target_modules=["c_fc"]))  # nothing shared: no warning


def test_a_selective_method_on_a_quantised_layer_says_why_it_is_refused():
    """The message said the layer had no 'weight' to fold into. (BitFit, biases only, is taken: see test_quant.)"""
    from peftkit import ConfigError
    from peftkit.quant import quantize_base
    from tests.conftest import tiny_bert_classifier

    model = quantize_base(tiny_bert_classifier(), "int8")
    with pytest.raises(ConfigError, match=r"cannot select parameters of module .*\(QuantLinear\): a quantised "
                                          r"layer holds its weight as integer codes"):
        get_peft_model(model, PartialConfig(target_modules=["query"]))


def test_a_fish_adapter_reports_trainable_and_warns_when_saved_unprepared(tmp_path):
    _, peft_model = trained("fish", steps=1)
    assert peft_model.get_model_status().requires_grad == {"default": True}  # empty tensors were 'irregular'
    fresh = get_peft_model(tiny_bert_classifier(), FishMaskConfig(keep_ratio=0.1))
    with pytest.warns(UserWarning, match="saved before its mask was chosen"):
        fresh.save_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["fish", "diff-pruning"])
def test_a_refused_state_dict_changes_nothing_and_a_fitting_one_keeps_the_live_parameters(key):
    """A file with one stray key was refused only after the sparse differences had been re-made as zeros (the
    trained values were lost); a fitting one replaced the parameter objects (an optimiser kept stepping dead ones,
    and diff pruning became a fixed mask)."""
    from peftkit import AdapterLoadError, get_peft_model_state_dict, set_peft_model_state_dict

    _, model = trained(key)
    x = batch()["input_ids"]
    with torch.no_grad():
        want = model(input_ids=x).logits
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    snapshot = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    with pytest.raises(AdapterLoadError, match="no place for"):
        set_peft_model_state_dict(model, {**snapshot, "base_model.model.stray": torch.zeros(1)})
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)
    perturb(model)  # then restore the snapshot into the live adapter
    set_peft_model_state_dict(model, snapshot)
    with torch.no_grad():
        assert (model(input_ids=x).logits - want).abs().max() <= 1e-6
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert now.keys() == params.keys() and all(now[n] is params[n] for n in now)


def test_diff_pruning_keeps_the_dense_form_in_module_state_dicts_and_float64():
    """state_dict() held the file's sparse form, so load_state_dict(state_dict()) (accelerate, Lightning) failed;
    sparse differences were float32 on a float64 model."""
    _, model = trained("diff-pruning")
    model.load_state_dict(model.state_dict())
    assert any(k.endswith("diff_weight") for k in model.state_dict())
    double = get_peft_model(tiny_bert_classifier().double(), CONFIGS["fish"]())
    double.peft_prepare(iter([batch(seed=s) for s in range(6)]))
    assert {p.dtype for p in double.parameters() if p.requires_grad} == {torch.float64}


def test_a_diff_pruning_step_while_merged_is_refused_before_any_change():
    """The projection changed the difference after it was merged, and unmerging then subtracted the new one."""
    from peftkit import ConfigError

    base, model = trained("diff-pruning", steps=2)
    model.merge_adapter()
    with pytest.raises(ConfigError, match=r"is merged .*unmerge it \(unmerge_adapter\(\)\) before peft_step_end"):
        model.peft_step_end(3)
    model.unmerge_adapter()
    x = batch()["input_ids"]
    with torch.no_grad(), model.disable_adapter():
        assert (model(input_ids=x).logits - base.eval()(input_ids=x).logits).abs().max() <= 1e-5


def test_selective_targets_are_checked_as_the_wrapping_methods_check_them():
    """A bad regex was a bare re.error naming no field; a list entry naming no module passed silently."""
    import warnings

    from peftkit import ConfigError
    from peftkit.targeting import UnmatchedTargetWarning

    with pytest.raises(ConfigError, match=r"target_modules='\(query' is read as a regular expression"):
        BitFitConfig(target_modules="(query")
    with pytest.raises(ConfigError, match=r"exclude_modules='\[layer' is read as a regular expression"):
        FishMaskConfig(exclude_modules="[layer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(tiny_bert_classifier(), BitFitConfig(target_modules=["query", "valeu"]))
    assert any(isinstance(w.message, UnmatchedTargetWarning) and "['valeu']" in str(w.message) for w in caught)


def test_two_data_driven_adapters_prepare_on_the_same_batches():
    """They shared one iterator: the second found it used up ("no training example") or got other rows."""
    from peftkit.methods.selective import SelectTuner

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_classifier(), FishMaskConfig(keep_ratio=0.02, num_fisher_samples=4,
                                                                   target_modules=["query"]), adapter_name="f")
    model.add_adapter("c", ChildTuningConfig(reserve_p=0.02, num_fisher_samples=4, target_modules=["query"]))
    model.set_adapter(["f", "c"])
    model.peft_prepare(iter([batch(rows=4, seed=s) for s in range(1)]))  # one batch of 4 rows: enough for each
    picks = [sorted((n, tuple(a.diff_weight_indices.tolist())) for n, a in SelectTuner.adapters(model.base_model, name))
             for name in ("f", "c")]
    assert picks[0] == picks[1]  # same data, same Fisher information, same ratio: the same entries


def test_a_module_another_adapter_trains_whole_is_excluded_in_the_saved_config(tmp_path):
    """BitFit added after a LoRA adapter with modules_to_save=["classifier"] left classifier.bias out silently, and
    its file did not load into a plain base (which selected that bias)."""
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]),
                           adapter_name="b")
    with pytest.warns(UserWarning, match=r"\['classifier'\] left out: another adapter trains it whole"):
        model.add_adapter("a", BitFitConfig())
    assert model.peft_config["a"].exclude_modules == ["classifier"]
    perturb(model)
    model.save_pretrained(tmp_path, selected_adapters=["a"])
    loaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "a")
    assert loaded.peft_config["default"].exclude_modules == ["classifier"]
