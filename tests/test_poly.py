"""Polytropon / MHR (PolyConfig): the equation by hand, task ids through forward and generate, files both
ways with peft, training two tasks apart, refusals (merge, mixed batches, bad task ids, bad configs), the CLI."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import peftkit
from peftkit import ConfigError, PeftModel, PolyConfig, get_peft_model
from tests.conftest import ids, perturb, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def adapted(n_tasks=3, n_skills=4, n_splits=2, r=2, targets=TARGETS, seed=0):
    torch.manual_seed(seed)
    base = tiny_llama()
    model = get_peft_model(base, PolyConfig(r=r, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
                                            target_modules=targets))
    perturb(model)
    return model.eval()


def test_layer_output_is_the_routed_sum_of_skills_by_hand():
    model = adapted(n_tasks=3, n_skills=3, n_splits=2, r=2)
    layer = model.base_model.model.model.layers[1].mlp.down_proj  # 24 -> 16
    poly = layer.adapters["default"]
    x = torch.randn(3, 5, 24)
    task_ids = torch.tensor([2, 0, 2])
    with torch.no_grad(), _task_ids(model, task_ids):
        got = layer(x)
    expected = layer.base_layer(x).detach()
    logits = poly.poly_router.module_logits.detach()
    a_all, b_all = poly.poly_lora_A.detach(), poly.poly_lora_B.detach()  # (Q, S, 12, r), (Q, S, r, 8)
    for row, t in enumerate(task_ids.tolist()):
        w = torch.sigmoid(logits[t]).view(2, 3)  # eval mode: sigmoid, normalised over the skills
        w = w / (w.sum(-1, keepdim=True) + 1e-12)
        # split q's mixed A takes input slice q, its mixed B gives output slice q
        a = torch.cat([sum(w[q, s] * a_all[q, s] for s in range(3)) for q in range(2)], 0)  # (24, r)
        b = torch.cat([sum(w[q, s] * b_all[q, s] for s in range(3)) for q in range(2)], 1)  # (r, 16)
        expected[row] += x[row] @ a @ b / 2
    assert (got - expected).abs().max() < 1e-6


class _task_ids:
    """Set task ids on the model's layer context, as PeftModel.forward does for a call."""

    def __init__(self, model, task_ids):
        self.ctx, self.ids = model.base_model.ctx, task_ids

    def __enter__(self):
        self.ctx.task_ids = self.ids

    def __exit__(self, *exc):
        self.ctx.task_ids = None


def test_trainable_count_matches_the_formula_and_only_poly_parameters_get_gradients():
    model = adapted(n_tasks=3, n_skills=4, n_splits=2, r=2)
    # q 16->16, v 16->8, down 24->16 in 2 blocks: S r (in + out) + T Q S
    per = lambda i, o: 4 * 2 * (i + o) + 3 * 2 * 4  # noqa: E731
    assert model.get_nb_trainable_parameters()[0] == 2 * (per(16, 16) + per(16, 8) + per(24, 16))
    model.train()
    x = ids(batch=3, seq=6)
    model(input_ids=x, labels=x, task_ids=[0, 1, 2]).loss.backward()
    names = {n.split(".default.")[-1].split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert names == {"poly_lora_A", "poly_lora_B", "poly_router"}
    router = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].poly_router
    assert router.module_logits.grad.abs().sum() > 0  # the routing itself trains


def test_each_row_uses_its_own_task_and_n_tasks_1_needs_no_ids():
    model = adapted(n_tasks=3)
    x = ids(batch=3, seq=5)
    with torch.no_grad():
        mixed = model(input_ids=x, task_ids=torch.tensor([2, 0, 1])).logits
        for row, t in enumerate([2, 0, 1]):
            alone = model(input_ids=x[row:row + 1], task_ids=[t]).logits
            assert (mixed[row] - alone[0]).abs().max() < 1e-5
        other = model(input_ids=x, task_ids=[0, 0, 0]).logits
    assert (mixed[0] - other[0]).abs().max() > 1e-3  # the task changes the output
    one = adapted(n_tasks=1)
    with torch.no_grad():
        assert torch.equal(one(input_ids=x).logits, one(input_ids=x, task_ids=[0, 0, 0]).logits)


def test_zero_b_starts_as_the_base_model():
    torch.manual_seed(0)
    base = tiny_llama()
    x = ids()
    with torch.no_grad():
        want = base(input_ids=x).logits
        model = get_peft_model(copy.deepcopy(base), PolyConfig(r=2, n_tasks=2, target_modules=TARGETS))
        assert torch.equal(model(input_ids=x, task_ids=[1, 0, 1]).logits, want)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_peft_file_loads_in_peftkit_and_back(n_splits, tmp_path):
    import peft

    torch.manual_seed(0)
    base = tiny_llama()
    x = ids(batch=4, seq=6)
    task_ids = torch.tensor([1, 0, 2, 1])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PolyConfig(
        r=2, n_tasks=3, n_skills=3, n_splits=n_splits, target_modules=TARGETS, task_type="CAUSAL_LM"))
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = theirs(input_ids=x, task_ids=task_ids).logits
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert isinstance(ours.peft_config["default"], PolyConfig) and ours.peft_config["default"].n_splits == n_splits
    with torch.no_grad():
        got = ours(input_ids=x, task_ids=task_ids).logits
    assert (got - want).abs().max() < 1e-5
    # and back: change ours, save, load in peft
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "poly_" in n:
                p.add_(torch.randn_like(p) * 0.1)
        mine = ours(input_ids=x, task_ids=task_ids).logits
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "POLY" and saved["n_tasks"] == 3 and saved["n_skills"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(input_ids=x, task_ids=task_ids).logits - mine).abs().max() < 1e-5
    keys = set(peft.get_peft_model_state_dict(theirs))
    assert keys == set(peftkit.get_peft_model_state_dict(ours))
    assert "base_model.model.model.layers.0.self_attn.q_proj.poly_router.module_logits" in keys


def test_two_tasks_learn_different_outputs():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PolyConfig(r=4, n_tasks=2, n_skills=4, target_modules="all-linear"))
    x = ids(batch=4, seq=6)
    x = torch.cat([x, x])  # the same inputs for both tasks
    tasks = torch.tensor([0] * 4 + [1] * 4)
    targets = torch.where(tasks[:, None] == 0, 5, 9).expand(8, 6)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(40):
        out = model(input_ids=x, labels=targets, task_ids=tasks)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        pred = model(input_ids=x, task_ids=tasks).logits.argmax(-1)
        swapped = model(input_ids=x, task_ids=1 - tasks).logits.argmax(-1)
    assert (pred[:4] == 5).all() and (pred[4:] == 9).all()
    assert (swapped[:4] == 9).all() and (swapped[4:] == 5).all()  # the task id alone decides


def test_generate_keeps_each_prompts_task_across_beams():
    model = adapted(n_tasks=3)
    perturb(model, std=2.0)  # tasks far enough apart to pick other tokens
    x = ids(batch=2, seq=4)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=2)
    both = model.generate(input_ids=x, task_ids=[2, 1], **kw)
    for row, t in enumerate([2, 1]):
        alone = model.generate(input_ids=x[row:row + 1], task_ids=[t], **kw)
        assert torch.equal(both[row], alone[0])
    swapped = model.generate(input_ids=x, task_ids=[1, 2], **kw)
    assert not torch.equal(swapped, both)  # the task ids decide what each prompt generates


def test_gradient_checkpointing_recomputes_with_the_calls_task_ids():
    model = adapted(n_tasks=3)
    x = ids(batch=3, seq=5)
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.config.use_cache = False
    torch.manual_seed(1)
    model(input_ids=x, labels=x, task_ids=[2, 1, 0]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    model.zero_grad()
    model.base_model.model.gradient_checkpointing_disable()
    torch.manual_seed(1)
    model(input_ids=x, labels=x, task_ids=[2, 1, 0]).loss.backward()
    for n, g in grads.items():
        assert torch.allclose(dict(model.named_parameters())[n].grad, g, atol=1e-6), n


def test_bad_task_ids_are_refused_naming_the_value():
    model = adapted(n_tasks=3)
    x = ids(batch=3, seq=4)
    cases = [
        (None, r"'default' routes each row by its task \(n_tasks=3\) and needs task_ids"),
        ([0, 1], r"task_ids has 2 entries but the batch has 3 rows"),
        ([0, 1, 3], r"task_ids holds 3, outside \[0, 3\)"),
        ([0, -1, 1], r"task_ids holds -1, outside \[0, 3\)"),
        ([0, 1.0, 1], r"task_ids holds 1.0 \(float\)"),
        (torch.tensor([[0, 1, 2]]), r"task_ids=.* is not valid \(shape \(1, 3\)\)"),
        (torch.tensor([0.0, 1.0, 2.0]), r"is not valid"),
        (2, r"task_ids=2 is not valid"),
    ]
    for task_ids, message in cases:
        with pytest.raises(ValueError, match=message):
            model(input_ids=x, task_ids=task_ids)
    with pytest.raises(ValueError, match=r"task_ids cannot be combined with adapter_names"):
        model(input_ids=x, task_ids=[0, 1, 2], adapter_names=["default"] * 3)
    with pytest.raises(ValueError, match=r"\['default'\] route each row by its task id"):
        model(input_ids=x, adapter_names=["default", "__base__", "default"])
    with pytest.raises(ValueError, match=r"needs task_ids: pass task_ids"):
        model.generate(input_ids=x, max_new_tokens=2)
    with model.disable_adapter(), torch.no_grad():  # the base model needs no task ids
        model(input_ids=x)
    lora = get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"no active adapter routes by task"):
        lora(input_ids=x, task_ids=[0, 0, 0])


def test_merging_is_refused_and_the_model_is_unchanged():
    model = adapted(n_tasks=2)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x, task_ids=[0, 1, 1]).logits
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x, task_ids=[0, 1, 1]).logits, before)


@pytest.mark.parametrize("field, value, message", [
    ("r", 0, r"r=0 is not valid"),
    ("n_tasks", 0, r"n_tasks=0 is not valid"),
    ("n_skills", -1, r"n_skills=-1 is not valid"),
    ("n_splits", 1.5, r"n_splits=1.5 is not valid"),
    ("poly_type", "mhr", r"poly_type='mhr' is not valid; expected one of \['poly'\]"),
    ("target_modules", [], r"target_modules=\[\]"),
])
def test_bad_config_values_raise_config_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        PolyConfig(**{field: value})


def test_n_splits_must_divide_every_layer_and_nothing_is_changed():
    base = tiny_llama()
    before = {n for n, _ in base.named_modules()}
    with pytest.raises(ConfigError, match=r"n_splits=3 must divide .*'model.layers.0.self_attn.q_proj' has 16 inputs"):
        get_peft_model(base, PolyConfig(n_splits=3, target_modules=["q_proj"]))
    assert {n for n, _ in base.named_modules()} == before


def test_gpt2_conv1d_and_default_targets():
    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(), PolyConfig(r=2, n_tasks=2))
    assert model.peft_config["default"].target_modules == ["c_attn"]
    perturb(model)
    model.eval()
    x = ids(batch=2, seq=5)
    with torch.no_grad():
        a = model(input_ids=x, task_ids=[0, 1]).logits
        b = model(input_ids=x, task_ids=[1, 0]).logits
    assert (a - b).abs().max() > 1e-4


def test_cli_trains_one_task_and_reloads(tiny_model_dir, tmp_path, capsys):
    from peftkit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--method", "poly", "--option", "n_skills=2", "--max-steps",
                 "3", "--max-train-samples", "32", "--max-eval-samples", "8", "--output-dir", str(out),
                 "--no-progress"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "POLY" and saved["n_tasks"] == 1 and saved["n_skills"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["dev_examples"] == 8
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out
    assert main(["methods"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("poly "))
    assert "multi-task" in line and "arXiv:2202.13914" in line


def test_cli_refuses_several_tasks_before_training(tiny_model_dir, tmp_path, capsys):
    from tests.cli_util import error_line

    out = tmp_path / "run"
    line = error_line(capsys, "train", "--model", tiny_model_dir, "--method", "poly", "--option", "n_tasks=3",
                      "--max-steps", "1", "--output-dir", out, "--no-progress")
    assert "--option n_tasks=3 undoes what --method poly is (n_tasks=1)" in line and "carry no task ids" in line
    assert not out.exists()


def test_forward_signature_names_task_ids_for_trainers_that_filter_columns():
    import inspect

    model = adapted(n_tasks=2)
    params = inspect.signature(model.forward).parameters
    assert "task_ids" in params and "input_ids" in params
    x = ids(batch=2, seq=4)
    with torch.no_grad():  # an int32 tensor works as a list does
        assert torch.equal(model(input_ids=x, task_ids=torch.tensor([1, 0], dtype=torch.int32)).logits,
                           model(input_ids=x, task_ids=[1, 0]).logits)


def test_forward_signature_names_task_ids_only_on_a_model_with_a_task_routed_adapter():
    # transformers' Trainer (remove_unused_columns) keeps the dataset columns the forward's signature names: a
    # LoRA model must not keep a ``task_ids`` column, which its forward would refuse, as before Poly came in
    import inspect

    lora = get_peft_model(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "task_ids" not in inspect.signature(lora.forward).parameters
    assert "adapter_names" in inspect.signature(lora.forward).parameters
    lora.add_adapter("poly", PolyConfig(r=2, n_tasks=2, target_modules=["q_proj"]))
    assert "task_ids" in inspect.signature(lora.forward).parameters
    lora.delete_adapter("poly")
    assert "task_ids" not in inspect.signature(lora.forward).parameters


def test_task_ids_go_to_a_wrapped_model_whose_forward_takes_them_when_no_adapter_routes_by_task():
    # before Poly, PeftModel passed task_ids on to the wrapped model; a model that reads them still gets them
    class TaskNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.bias = torch.nn.Embedding(3, 4)

        def forward(self, x, task_ids=None):
            return self.proj(x) + (0 if task_ids is None else self.bias(torch.as_tensor(task_ids)))

    torch.manual_seed(0)
    net = TaskNet()
    x = torch.randn(2, 4)
    expected = net(x, task_ids=[2, 1]).detach()
    model = get_peft_model(net, peftkit.LoraConfig(r=2, target_modules=["proj"]))
    with torch.no_grad():
        assert torch.allclose(model(x, task_ids=[2, 1]), expected)
        assert not torch.allclose(model(x, task_ids=[0, 0]), expected)


def test_task_ids_of_numpy_integers_work_as_python_integers():
    # a list read off a numpy array or a pandas column holds numpy integers; they were refused as not integers
    import numpy as np

    model = adapted(n_tasks=3)
    x = ids(batch=3, seq=4)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x, task_ids=list(np.array([2, 0, 1]))).logits,
                           model(input_ids=x, task_ids=[2, 0, 1]).logits)
    with pytest.raises(ValueError, match=r"task_ids holds (np\.)?True_? \(bool_?\)"):
        model(input_ids=x, task_ids=[0, np.bool_(True), 1])
