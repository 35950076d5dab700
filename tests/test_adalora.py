"""AdaLoRA: exact merging, the budget schedule, rank allocation (checked against peft's allocator),
the orthogonality penalty, rank-0 layers, peft interop both ways, and bad values."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdaLoraConfig, ConfigError, PeftModel, get_peft_model
from peftkit.methods.adalora import AdaLoraTuner, adalora_from_cli, budget_schedule
from peftkit.train.run import RunConfig
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_gpt2
from tests.zoo import (
    SHAPES,
    TARGETS,
    Zoo,
    adapted_zoo,
    assert_fifty_cycles,
    assert_merge_exact,
    train_tiny_bert,
    zoo_inputs,
)


def config(**kw) -> AdaLoraConfig:
    return AdaLoraConfig(**{"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 6, "target_modules": TARGETS,
                            **kw})


def mask_layers(model, masks: dict[str, list[bool]]) -> None:
    AdaLoraTuner().set_rank_masks(model.base_model, "default", {k: torch.tensor(v) for k, v in masks.items()})


@pytest.mark.parametrize("masked", [False, True])
def test_merge_and_unload_equals_unmerged(masked):
    _, model = adapted_zoo(config())
    if masked:
        mask_layers(model, {"lin": [True, False, True, False], "conv2": [False] * 4})
    assert_merge_exact(model, zoo_inputs())


def test_fifty_merge_cycles_restore_base_weights():
    base, model = adapted_zoo(config(lora_alpha=11))
    assert_fifty_cycles(base, model, zoo_inputs())


def test_trainable_parameter_count_matches_formula():
    model = get_peft_model(Zoo(), config(init_r=5))
    shapes = {**SHAPES, "conv2": (8, 2 * 9)}
    assert model.get_nb_trainable_parameters()[0] == sum(5 * (i + o + 1) for o, i in shapes.values())


def test_budget_schedule_on_a_hand_made_case():
    cfg = AdaLoraConfig(target_modules=["q"], init_r=12, target_r=8, tinit=2, tfinal=3, total_step=15, deltaT=2)
    # 2 layers: budget 24 -> 16; cubic between step 2 and step 12 = 15 - 3
    expected = {1: (24, False), 2: (24, False), 3: (21, False), 4: (20, True), 7: (17, False), 8: (16, True),
                12: (16, True), 13: (16, True), 15: (16, True)}
    for step, value in expected.items():
        assert budget_schedule(step, 24, 16, cfg) == value, step
    # 3: 8 * 0.9^3 + 16 = 21.83; 4: 8 * 0.8^3 + 16 = 20.10; 7: 8 * 0.5^3 + 16 = 17; 8: 8 * 0.4^3 + 16 = 16.51


def test_budget_schedule_matches_peft():
    kw = dict(init_r=6, target_r=2, tinit=3, tfinal=4, total_step=30, deltaT=3, target_modules=["0", "1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), peft.AdaLoraConfig(**kw))
    allocator = theirs.base_model.rankallocator
    for step in range(1, 31):
        assert budget_schedule(step, 12, 4, AdaLoraConfig(**kw)) == allocator.budget_schedule(step), step


def _pair(steps: int):
    """A peft AdaLoRA model and a peftkit one with identical weights (tiny BERT, query/value)."""
    kw = dict(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=steps, deltaT=1, lora_alpha=4,
              target_modules=["query", "value"], orth_reg_weight=0.1, task_type="SEQ_CLS")
    base = tiny_bert_classifier()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.AdaLoraConfig(**kw))
    ours = get_peft_model(twin, AdaLoraConfig(**kw))
    perturb(ours)
    sd = peftkit.get_peft_model_state_dict(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.set_peft_model_state_dict(theirs, sd)
    return theirs, ours


@pytest.mark.parametrize("call", ["peft_step_end", "update_and_allocate"])  # ours, and peft's name for it
def test_rank_allocation_matches_peft_step_by_step(call):
    steps = 12
    theirs, ours = _pair(steps)
    x, labels = ids(8, 10), torch.tensor([0, 1] * 4)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (theirs, ours)]
    for step in range(1, steps + 1):
        loss_theirs = theirs(input_ids=x, labels=labels).loss  # both forwards add the penalty (SEQ_CLS)
        loss_ours = ours(input_ids=x, labels=labels).loss
        assert abs(loss_theirs.item() - loss_ours.item()) <= 1e-5
        loss_theirs.backward()
        loss_ours.backward()
        for opt in opts:
            opt.step()
        theirs.base_model.update_and_allocate(step)
        if call == "peft_step_end":
            ours.peft_step_end(step)
        else:
            ours.base_model.update_and_allocate(step)
        for opt in opts:
            opt.zero_grad()
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            stripped = {k.replace(".default", ""): v for k, v in pattern.items()}
            assert stripped == ours.peft_config["default"].rank_pattern, step
    final = ours.peft_config["default"].rank_pattern
    assert sum(sum(m) for m in final.values()) == 2 * len(final) == 8  # target_r per layer on average
    for a in AdaLoraTuner.adapters(ours.base_model, "default").values():
        assert torch.equal(a.lora_E[~a.rank_mask], torch.zeros_like(a.lora_E[~a.rank_mask]))


def _allocate_steps(model, steps, after_each=None):
    """``steps`` SGD steps of ``model`` with its rank allocation after each (then ``after_each(step)``); returns the
    inputs used."""
    x, labels = ids(8, 10), torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(1, steps + 1):
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        model.peft_step_end(step)
        if after_each is not None:
            after_each(step)
        opt.zero_grad()
    return x


def test_a_pruned_state_dict_goes_back_into_the_training_model_as_in_peft():
    """get_peft_model_state_dict of a pruned adapter holds the kept triplets only; setting it back (restoring a
    snapshot in a loop of one's own) was refused with a shape mismatch, where peft resizes by rank_pattern."""
    _, ours = _pair(8)
    x = _allocate_steps(ours, 5)
    pattern = ours.peft_config["default"].rank_pattern
    assert any(not all(m) for m in pattern.values())
    snapshot = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(ours).items()}
    assert any(v.shape[0] < 4 for k, v in snapshot.items() if k.endswith("lora_A"))  # compact
    want = _logits(ours, x)
    perturb(ours)
    assert not torch.allclose(_logits(ours, x), want, atol=1e-4)
    peftkit.set_peft_model_state_dict(ours, snapshot)
    assert torch.allclose(_logits(ours, x), want, atol=1e-6)
    assert ours.peft_config["default"].rank_pattern == pattern
    for a in AdaLoraTuner.adapters(ours.base_model, "default").values():  # pruned triplets are zero and masked
        assert torch.equal(a.lora_E[~a.rank_mask], torch.zeros_like(a.lora_E[~a.rank_mask]))


def test_allocation_without_gradients_is_refused_and_changes_nothing():
    model = get_peft_model(Zoo(), config())
    x = zoo_inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(*x).sum().backward()
    opt.step()
    opt.zero_grad()  # too early: the scores read the gradients
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n}
    with pytest.raises(RuntimeError, match="AdaLoRA adapter 'default' has no gradients at step 1"):
        model.peft_step_end(1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_E" in n)
    assert not model.peft_config["default"].rank_pattern
    for bad in ("3", None, 2.5, -1, True):
        with pytest.raises(ConfigError, match=f"step={bad!r} is not valid"):
            model.base_model.update_and_allocate(bad)


def test_orthogonality_penalty_value():
    model = get_peft_model(nn.Sequential(nn.Linear(6, 5)), config(init_r=3, orth_reg_weight=0.25, target_modules=["0"]))
    adapter = model.base_model.model[0].adapters["default"]
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(6, 3))
        adapter.lora_A.copy_(q.T)                      # orthonormal rows: no penalty from A
        adapter.lora_B.copy_(torch.full((5, 3), 0.5))
    b = adapter.lora_B.detach()
    expected = 0.25 * (0.0 + torch.linalg.matrix_norm(b.T @ b - torch.eye(3)).item()) / 2
    assert model.peft_regularization() is None  # the forward adds it, as peft's does
    with model.loss_terms_added_by_caller():
        assert model.peft_regularization().item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert get_peft_model(nn.Sequential(nn.Linear(6, 5)),
                              config(orth_reg_weight=0, target_modules=["0"])).peft_regularization() is None


def test_forward_loss_holds_the_penalty_as_peft_does():
    """A peft-style loop (``model(**batch).loss.backward()``) trains on peft's objective: the penalty is in the
    forward's loss (in eval mode too, as in peft). It was missing (only peftkit's trainers added it). While a
    trainer adds the terms itself, and for an adapter in inference mode, the loss is the task's alone."""
    theirs, ours = _pair(10)
    x, labels = ids(8, 10), torch.tensor([0, 1] * 4)

    def loss(model, seed=0):
        torch.manual_seed(seed)  # the same dropout masks in training mode
        return model(input_ids=x, labels=labels).loss.item()

    for mode in ("eval", "train"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        with_penalty = loss(ours)
        assert with_penalty == pytest.approx(loss(theirs), abs=1e-5), mode
        with ours.loss_terms_added_by_caller():
            task = loss(ours)
            penalty = ours.peft_regularization().item()
        assert penalty > 0.01
        assert with_penalty == pytest.approx(task + penalty, abs=1e-6), mode
        assert ours.peft_regularization() is None and not ours.base_model.ctx.caller_adds_loss_terms
    ours.set_adapter("default", inference_mode=True)  # an adapter that does not train adds no penalty
    assert loss(ours) == pytest.approx(task, abs=1e-6)


def test_rank_zero_layer_saves_loads_and_merges(tmp_path):
    base = Zoo()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config())
    perturb(model)
    mask_layers(model, {"conv2": [False] * 4, "wide": [False, True, False, True]})
    x = zoo_inputs()
    with torch.no_grad():
        expected = model(*x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.conv2.lora_A"].shape == (0, 18)
    assert tensors["base_model.model.conv2.lora_B"].shape == (8, 0)
    assert tensors["base_model.model.wide.lora_E"].shape == (2, 1)
    assert tensors["base_model.model.lin.lora_A"].shape == (4, 8)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern["conv2.lora_E"] == [False] * 4 and pattern["wide.lora_E"] == [False, True, False, True]
    fresh = Zoo()
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    assert loaded.base_model.model.conv2.adapters["default"].r == 0
    with torch.no_grad():
        assert (loaded(*x) - expected).abs().max() <= 1e-6
        again = tmp_path / "again"
        loaded.save_pretrained(again)           # a compact model saves the same pattern again
        assert json.loads((again / "adapter_config.json").read_text())["rank_pattern"] == pattern
        merged = loaded.merge_and_unload()
        assert (merged(*x) - expected).abs().max() <= 1e-5


def test_training_reduces_loss_and_only_adapter_gets_gradients():
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=7, tfinal=15, total_step=60, lora_alpha=32, orth_reg_weight=0.1,
                        target_modules=["query", "value"], task_type="SEQ_CLS")
    losses, model = train_tiny_bert(cfg, "lora_", steps=60)
    assert losses[-1] < 0.5 * losses[0]
    assert sum(sum(m) for m in model.peft_config["default"].rank_pattern.values()) == 2 * 4


INTEROP = {
    "bert": (tiny_bert_classifier, dict(target_modules=["query", "value", "dense"], bias="lora_only")),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
}


def _masks(names: list[str]) -> dict[str, list[bool]]:
    choices = ([True, False, True, True], [False] * 4, [True] * 4, [False, False, True, False])
    return {n: choices[i % 4] for i, n in enumerate(names)}


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("case", list(INTEROP))
def test_peftkit_adapter_loads_in_peft(case, tmp_path):
    make, kw = INTEROP[case]
    base = make()
    twin = copy.deepcopy(base)
    ours = get_peft_model(base, AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=5, **kw))
    perturb(ours, std=1.0)
    names = [n for n, w in ours.base_model.wrappers() if hasattr(w, "adapters")]
    mask_layers(ours, _masks(names))
    x = ids()
    expected = _logits(ours, x)
    with ours.disable_adapter():
        assert (expected - _logits(ours, x)).abs().max() > 1e-4
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - _logits(theirs, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_adapter_loads_in_peftkit(case, tmp_path):
    make, kw = INTEROP[case]
    base = make()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=5, **kw))
        perturb(theirs, std=1.0)
        names = [n for n, _ in theirs.base_model.model.named_parameters() if n.endswith(".lora_E.default")]
        pattern = _masks(names)
        theirs.peft_config["default"].rank_pattern = pattern
        theirs.base_model.rankallocator.mask_using_rank_pattern(theirs.base_model.model, pattern)
        theirs.save_pretrained(tmp_path)
    x = ids()
    expected = _logits(theirs, x)
    ours = PeftModel.from_pretrained(twin, tmp_path)
    assert (expected - _logits(ours, x)).abs().max() <= 1e-5
    assert (expected - ours.merge_and_unload()(input_ids=x).logits).abs().max() <= 1e-5


def test_a_peft_file_with_lora_fields_peft_adalora_ignores_loads(tmp_path):
    """peft writes every LoRA field into an AdaLoRA file, and its AdaLoRA scales by lora_alpha whatever
    use_rslora and alpha_pattern say: such a file was refused ("sets fields peftkit does not support")."""
    base = tiny_gpt2()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=5,
                                                              target_modules=["c_attn"], use_rslora=True,
                                                              alpha_pattern={"c_attn": 3}))
        perturb(theirs, std=1.0)
        theirs.save_pretrained(tmp_path)
    x = ids()
    ours = PeftModel.from_pretrained(twin, tmp_path)
    assert (_logits(theirs, x) - _logits(ours, x)).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match=r"use_dora=True is not supported by AdaLoRA"):
        AdaLoraConfig.from_dict({**ours.peft_config["default"].to_dict(), "use_dora": True})


@pytest.mark.parametrize("kw, message", [
    (dict(total_step=None), "total_step is required"),
    (dict(total_step=0), "total_step=0"),
    (dict(tinit=6, tfinal=4), "leave no pruning phase"),
    (dict(target_r=5), "target_r=5 must not exceed init_r=4"),
    (dict(beta1=1.0), r"beta1=1.0 is not valid; it must lie in \(0, 1\)"),
    (dict(deltaT=0), "deltaT=0"),
    (dict(orth_reg_weight=-1), "orth_reg_weight=-1"),
    (dict(lora_dropout=1.5), "lora_dropout=1.5"),
    (dict(bias="some"), "bias='some'"),
    (dict(rank_pattern={"lin.lora_E": [True, False]}), "must be a list of init_r=4 booleans"),
    (dict(use_dora=True), "use_dora=True is not supported by AdaLoRA"),
    (dict(lora_bias=True), "lora_bias=True is not supported by AdaLoRA"),
    (dict(use_rslora=True), "use_rslora=True is not supported by AdaLoRA"),
    (dict(alpha_pattern={"lin": 2}), "alpha_pattern=.* is not supported by AdaLoRA"),
])
def test_bad_values_raise_config_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        config(**kw)


def test_the_lora_fields_peft_adalora_inherits_are_taken_at_their_defaults():
    """A ported call that spells out peft's inherited LoRA fields was a TypeError (unexpected keyword)."""
    kw = dict(use_rslora=False, alpha_pattern={}, lora_bias=False, use_dora=False)
    assert config(**kw) == config()
    assert peft.AdaLoraConfig(total_step=10, **kw).use_dora is False  # peft takes them too


def test_unused_r_warns_like_peft():
    with pytest.warns(UserWarning, match="r=16 is not used"):
        config(r=16)


def test_cli_defaults_come_from_the_run_length():
    cfg = adalora_from_cli(RunConfig(max_steps=15, r=8, lora_alpha=16))
    assert (cfg.total_step, cfg.tinit, cfg.tfinal, cfg.init_r, cfg.target_r) == (15, 1, 3, 12, 8)
    assert cfg.target_modules == "all-linear"
    assert adalora_from_cli(RunConfig(max_steps=None, method_options={"total_step": 50})).total_step == 50
    with pytest.raises(ConfigError, match="give --max-steps N or --option total_step=N"):
        adalora_from_cli(RunConfig(max_steps=None))


def test_peftkit_trainer_adds_the_penalty_once(tmp_path, monkeypatch):
    """peftkit's Trainer adds every loss term itself: its forward runs with the forward's own terms off, so the
    penalty (which the forward would add) joins the objective exactly once per step."""
    from peftkit.train.trainer import Trainer, TrainingArguments
    from tests.tiny_train import TinyClassifier, classification_items, collate_classification

    torch.manual_seed(0)
    model = get_peft_model(TinyClassifier(), config(target_modules=["fc"], total_step=2, tinit=0, tfinal=0))
    seen, terms = [], []
    model.base_model.model.register_forward_pre_hook(
        lambda *_: seen.append(model.base_model.ctx.caller_adds_loss_terms))
    original = AdaLoraTuner.regularizer
    monkeypatch.setattr(AdaLoraTuner, "regularizer", lambda *a: terms.append(original(*a)) or terms[-1])
    Trainer(model, classification_items(8), collate_classification,
            TrainingArguments(max_steps=2, batch_size=4, progress=False, output_dir=str(tmp_path))).train()
    assert seen == [True, True] and len(terms) == 2 and all(t.item() > 0 for t in terms)
    assert not model.base_model.ctx.caller_adds_loss_terms


def test_a_second_allocation_call_for_one_step_is_ignored_with_a_warning():
    """PeftTrainer's own call plus a ported peft callback allocated twice per step: at the final-budget step the
    second call ran on cleared importance and dropped every triplet, silently."""
    _, ours = _pair(8)

    def again(step):
        with pytest.warns(UserWarning, match=f"step {step} was already allocated; this call is ignored"):
            ours.base_model.update_and_allocate(step)

    _allocate_steps(ours, 6, after_each=again)
    kept = [sum(m) for m in ours.peft_config["default"].rank_pattern.values()]
    assert sum(kept) == 2 * len(kept)  # target_r=2 per layer on average, not every triplet dropped


def test_a_refused_allocation_can_be_made_again():
    """The no-gradient refusal recorded the step first: the corrected call was then ignored as a repeat."""
    _, ours = _pair(8)
    with pytest.raises(RuntimeError, match="has no gradients at step 1"):
        ours.peft_step_end(1)
    x, labels = ids(8, 10), torch.tensor([0, 1] * 4)
    ours(input_ids=x, labels=labels).loss.backward()
    ours.peft_step_end(1)  # no "already allocated" warning: the importance is taken now
    assert all(a.importance for a in AdaLoraTuner.adapters(ours.base_model, "default").values())
