"""Selective methods one by one: Fisher masks on hand-made cases, Child-Tuning-F's mask rate, diff
pruning's exact sparsity, trainable-parameter counts, bad values, other architectures, the CLI."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftkit import ConfigError, get_peft_model, inject_adapter_in_model
from peftkit.cli import main
from peftkit.formats.hf_peft import adapter_file_stats
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.child_tuning import ChildTuningConfig
from peftkit.methods.diff_pruning import DiffPruningConfig
from peftkit.methods.fish import FishMaskConfig
from peftkit.methods.partial import PartialConfig
from peftkit.methods.selective import empirical_fisher, global_topk
from peftkit.train.run import RunConfig, default_model_dir
from tests.conftest import perturb, tiny_bert_classifier, tiny_gpt2, tiny_llama
from tests.test_selective import adapters_of, batch, trained

HEAD = 16 * 2 + 2  # the tiny BERT's classifier, trained in full as modules_to_save


class Probe(nn.Module):
    """``loss = sum(W x + b)``: the gradient of one example is ``x`` for ``W`` and 1 for ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(loss=self.lin(x).sum())


# rows: per-example squared gradients of W are [4, 0, 0, 9] and [4, 0, 4, 1]; of b, 1 and 1
PROBE_ROWS = {"x": torch.tensor([[2.0, 0.0, 0.0, 3.0], [-2.0, 0.0, 2.0, 1.0]]), "labels": torch.zeros(2)}


def test_empirical_fisher_is_the_mean_of_per_example_squared_gradients():
    peft_model = get_peft_model(Probe(), FishMaskConfig(keep_ratio=0.6))
    lin = peft_model.base_model.model.lin.base_layer
    fisher = empirical_fisher(peft_model.base_model, [lin.weight, lin.bias], iter([PROBE_ROWS]), num_samples=2)
    assert not lin.weight.requires_grad and lin.weight.grad is None
    # entry 0's gradients (+2, -2) cancel in a batch mean, but not in the per-example Fisher
    assert torch.equal(fisher[0], torch.tensor([[4.0, 0.0, 2.0, 5.0]]))
    assert torch.equal(fisher[1], torch.tensor([1.0]))


@pytest.mark.parametrize("config, samples, weight_idx, bias_idx", [
    (FishMaskConfig(keep_ratio=0.6, num_fisher_samples=2), 2, [0, 2, 3], []),   # F = W [4,0,2,5], b 1
    (FishMaskConfig(keep_ratio=0.6, num_fisher_samples=1), 1, [0, 3], [0]),     # F = W [4,0,0,9], b 1
    (ChildTuningConfig(reserve_p=0.4, num_fisher_samples=2), 2, [0, 3], []),    # k = round(0.4 * 5) = 2
])
def test_fisher_mask_keeps_the_top_entries_of_a_hand_made_case(config, samples, weight_idx, bias_idx):
    peft_model = get_peft_model(Probe(), config)
    peft_model.peft_prepare(iter([PROBE_ROWS]))
    adapter = adapters_of(peft_model)["lin"]
    assert adapter.diff_weight_indices.tolist() == weight_idx
    assert adapter.diff_bias_indices.tolist() == bias_idx
    assert peft_model.get_nb_trainable_parameters()[0] == len(weight_idx) + len(bias_idx)
    before = adapter.diff_weight_indices.clone()
    peft_model.peft_prepare(iter([{"x": -PROBE_ROWS["x"] * 5, "labels": PROBE_ROWS["labels"]}]))
    assert torch.equal(adapter.diff_weight_indices, before)  # chosen once


def test_global_topk_splits_indices_per_tensor():
    scores = [torch.tensor([[0.5, 9.0], [0.1, 3.0]]), torch.tensor([7.0, 0.2, 8.0])]
    picks = global_topk(scores, 4)
    assert [p.tolist() for p in picks] == [[1, 3], [0, 2]]
    assert [p.tolist() for p in global_topk(scores, 0)] == [[], []]


def test_child_tuning_f_keeps_a_fraction_p_of_gradient_entries_scaled_by_one_over_p():
    torch.manual_seed(3)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(200, 200)), ChildTuningConfig(child_tuning_type="F",
                                                                                     reserve_p=0.3))
    delta = adapters_of(peft_model)["0"].diff_weight
    x = torch.ones(1, 200)
    peft_model.train()
    masks = []
    for _ in range(2):
        peft_model(x).sum().backward()  # the gradient of W is all ones
        kept = delta.grad != 0
        assert abs(kept.float().mean().item() - 0.3) < 0.01  # 40,000 entries: 4.4 standard deviations
        assert torch.allclose(delta.grad[kept], torch.full_like(delta.grad[kept], 1 / 0.3))
        masks.append(kept)
        delta.grad = None
    assert (masks[0] != masks[1]).float().mean() > 0.3  # a fresh mask once the gradient was cleared
    peft_model.eval()
    peft_model(x).sum().backward()
    assert torch.equal(delta.grad, torch.ones_like(delta.grad))  # no mask outside training


def _child_f(p=0.3, seed=3):
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(200, 200)), ChildTuningConfig(child_tuning_type="F", reserve_p=p))
    model.train()
    return model, adapters_of(model)["0"].diff_weight


@pytest.mark.parametrize("renew", ["zero_grad", "peft_step_end"])
def test_child_tuning_f_draws_one_gradient_mask_per_optimiser_step(renew):
    """Under gradient accumulation every backward drew its own mask, so the step's gradient was masked by
    neither (52% of the entries kept after two micro-batches at p = 0.4, not 40%); the reference ChildTuningAdamW
    masks the accumulated gradient once per step."""
    model, delta = _child_f(p=0.4)
    opt = torch.optim.SGD([delta], lr=0.1)
    x = torch.ones(1, 200)
    kept = []
    for step in (1, 2):
        model(x).sum().backward()  # the gradient of W is all ones
        first = delta.grad.clone()
        model(2 * x).sum().backward()  # the second micro-batch: all twos, under the same mask
        mask = first != 0
        assert torch.equal(delta.grad != 0, mask)
        assert torch.allclose(delta.grad[mask], torch.full_like(delta.grad[mask], 3 / 0.4))  # (1 + 2) / p
        assert abs(mask.float().mean().item() - 0.4) < 0.015
        kept.append(mask)
        opt.step()
        if renew == "peft_step_end":  # a loop that keeps zeroed gradients says when a step was taken
            model.peft_step_end(step)
            opt.zero_grad(set_to_none=False)
        else:
            opt.zero_grad()
    assert (kept[0] != kept[1]).float().mean() > 0.3  # the next step has its own mask


def test_child_tuning_f_without_accumulation_draws_its_masks_as_before():
    """One backward per step consumes the random stream as the per-backward draw did: the same seed gives the
    same gradients (each mask is torch.empty_like(grad).bernoulli_(p), drawn in backward)."""
    model, delta = _child_f()
    x = torch.ones(1, 200)
    state = torch.get_rng_state()
    grads = []
    for step in (1, 2):
        model(x).sum().backward()
        grads.append(delta.grad.clone())
        model.peft_step_end(step)
        delta.grad = None
    torch.set_rng_state(state)
    for got in grads:
        torch.empty(200).bernoulli_(0.3)  # the bias difference's mask, drawn first (its gradient comes first)
        assert torch.equal(got, torch.empty(200, 200).bernoulli_(0.3) / 0.3)


def test_child_tuning_f_a_module_run_twice_in_one_forward_gets_one_mask():
    """Both uses of a shared weight (and its recomputation under checkpointing) share the step's mask."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(100, 100)

        def forward(self, x):
            return self.lin(self.lin(x))

    torch.manual_seed(0)
    model = get_peft_model(Twice(), ChildTuningConfig(child_tuning_type="F", reserve_p=0.3))
    model.train()
    delta = next(p for n, p in model.named_parameters() if n.endswith("diff_weight"))
    model(torch.randn(4, 100)).sum().backward()
    assert abs((delta.grad != 0).float().mean().item() - 0.3) < 0.02  # two masks would keep 1 - 0.7^2 = 51%



@pytest.mark.parametrize("injected", [False, True])
def test_child_tuning_f_a_checkpointed_use_recomputed_after_the_draw_keeps_the_mask(injected):
    """The first use runs under activation checkpointing, the second does not: backward draws the mask for the
    second, then recomputes the first (the gradient still cleared); that recomputation must not start a new step."""
    from torch.utils.checkpoint import checkpoint

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(100, 100)

        def forward(self, x):
            return self.lin(checkpoint(self.lin, x, use_reentrant=False))

    torch.manual_seed(0)
    config = ChildTuningConfig(child_tuning_type="F", reserve_p=0.3)
    model = inject_adapter_in_model(config, Twice()) if injected else get_peft_model(Twice(), config)
    model.train()
    delta = next(p for n, p in model.named_parameters() if n.endswith("diff_weight"))
    model(torch.randn(4, 100)).sum().backward()
    assert abs((delta.grad != 0).float().mean().item() - 0.3) < 0.02  # two masks would keep 1 - 0.7^2 = 51%

@pytest.mark.parametrize("injected", [False, True])
@pytest.mark.parametrize("reentrant", [None, False, True])
def test_child_tuning_f_micro_batches_share_the_mask_under_gradient_checkpointing(reentrant, injected):
    """The checkpointed layers run again in backward(), outside the model call: the recomputation keeps the step's
    mask (re-entrant checkpointing runs the whole forward of the layers there), also on a model from
    inject_adapter_in_model, whose forward no PeftModel call surrounds."""
    torch.manual_seed(0)
    config = ChildTuningConfig(child_tuning_type="F", reserve_p=0.5, target_modules=["q_proj"])
    model = inject_adapter_in_model(config, tiny_llama()) if injected else get_peft_model(tiny_llama(), config)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    delta = next(p for n, p in model.named_parameters() if n.endswith("layers.0.self_attn.q_proj.adapters.default"
                                                                     ".diff_weight"))
    x = torch.randint(3, 64, (2, 6))
    model(input_ids=x, labels=x).loss.backward()
    first = delta.grad != 0
    model(input_ids=x.flip(0), labels=x.flip(0)).loss.backward()
    assert torch.equal(delta.grad != 0, first)
    assert abs(first.float().mean().item() - 0.5) < 0.1  # 256 entries


@pytest.mark.parametrize("entry", ["inject_adapter_in_model", "base model"])
def test_child_tuning_f_draws_a_new_mask_each_step_outside_a_peft_model_call(entry):
    """A model driven by its own forward (one from inject_adapter_in_model, or a PeftModel's base model called
    directly) kept the first step's mask for the whole run: only a PeftModel call counted as a new forward."""
    torch.manual_seed(3)
    config = ChildTuningConfig(child_tuning_type="F", reserve_p=0.4)
    if entry == "inject_adapter_in_model":
        model = inject_adapter_in_model(config, nn.Sequential(nn.Linear(200, 200)))
    else:
        model = get_peft_model(nn.Sequential(nn.Linear(200, 200)), config).get_base_model()
    model.train()
    delta = next(p for n, p in model.named_parameters() if n.endswith("diff_weight"))
    opt = torch.optim.SGD([delta], lr=0.1)
    kept = []
    for _ in range(2):
        model(torch.ones(1, 200)).sum().backward()
        model(torch.ones(1, 200)).sum().backward()  # a second micro-batch: the same mask
        kept.append(delta.grad != 0)
        assert torch.allclose(delta.grad[kept[-1]], torch.full_like(delta.grad[kept[-1]], 2 / 0.4))
        assert abs(kept[-1].float().mean().item() - 0.4) < 0.015
        opt.step()
        opt.zero_grad()
    assert (kept[0] != kept[1]).float().mean() > 0.3  # the next step has its own mask


@pytest.mark.parametrize("steps", [1, 3])
def test_diff_pruning_sparsity_equals_the_target_after_each_step(steps, tmp_path):
    _, peft_model = trained("diff-pruning", steps=steps)
    adapters = adapters_of(peft_model).values()
    selected = sum(a.numel(n) for a in adapters for n in a.names)
    k = round((1 - 0.97) * selected)
    assert sum(int(a.dense(n).count_nonzero()) for a in adapters for n in a.names) == k
    peft_model.save_pretrained(tmp_path)
    stats = adapter_file_stats(tmp_path)
    assert stats["changed_params"] == k + HEAD
    assert stats["adapter_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert stats["adapter_bytes"] < 4 * selected  # indices + values are far smaller than the dense delta


def test_trainable_parameter_counts_match_the_formulas():
    base = tiny_bert_classifier()
    params = {n: p.numel() for n, p in base.named_parameters() if not n.startswith("classifier.")}
    everything = sum(params.values())
    biases = sum(v for n, v in params.items() if n.endswith(".bias"))
    block = sum(v for n, v in params.items() if n.startswith("bert.encoder.layer.1."))
    query_value = 2 * 2 * (16 * 16 + 16)

    def count(config, prepare=False):
        peft_model = get_peft_model(copy.deepcopy(base), config)
        if prepare:
            peft_model.peft_prepare(iter([batch(seed=s) for s in range(4)]))
        return peft_model.get_nb_trainable_parameters()[0]

    assert count(BitFitConfig(task_type="SEQ_CLS")) == biases + HEAD
    assert count(BitFitConfig(target_modules=["query", "intermediate.dense"])) == 2 * (16 + 32)
    assert count(BitFitConfig(target_modules=r".*layer\.0\..*", task_type="SEQ_CLS")) == \
        sum(v for n, v in params.items() if n.startswith("bert.encoder.layer.0.") and n.endswith(".bias")) + HEAD
    assert count(PartialConfig(num_top_layers=1, task_type="SEQ_CLS")) == block + HEAD
    assert count(PartialConfig(layers_to_transform=[1], target_modules=["query", "value"])) == query_value // 2
    assert count(DiffPruningConfig(task_type="SEQ_CLS")) == everything + HEAD
    assert count(FishMaskConfig(keep_ratio=0.01, num_fisher_samples=4, task_type="SEQ_CLS"), prepare=True) == \
        round(0.01 * everything) + HEAD
    # without SEQ_CLS the classifier is an ordinary module: its entries compete for the mask too
    assert count(ChildTuningConfig(reserve_p=0.2, num_fisher_samples=4), prepare=True) == round(0.2 * (everything + HEAD))
    assert count(ChildTuningConfig(child_tuning_type="F", target_modules=["query", "value"])) == query_value


@pytest.mark.parametrize("make, fragment", [
    (lambda: BitFitConfig(target_modules=5), "target_modules=5"),
    (lambda: BitFitConfig(layers_to_transform=[-1]), r"layers_to_transform=\[-1\] must be"),
    (lambda: PartialConfig(), "needs num_top_layers"),
    (lambda: PartialConfig(num_top_layers=0), "num_top_layers=0"),
    (lambda: PartialConfig(num_top_layers=1, layers_to_transform=[0]), "not both"),
    (lambda: DiffPruningConfig(target_sparsity=1.0), r"target_sparsity=1.0 .* \[0, 1\)"),
    (lambda: FishMaskConfig(keep_ratio=0), r"keep_ratio=0 .* \(0, 1\]"),
    (lambda: FishMaskConfig(num_fisher_samples=0), "num_fisher_samples=0"),
    (lambda: ChildTuningConfig(child_tuning_type="X"), "child_tuning_type='X'"),
    (lambda: ChildTuningConfig(reserve_p=1.5), "reserve_p=1.5"),
])
def test_bad_values_raise_config_error_naming_them(make, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make()


@pytest.mark.parametrize("model_fn, config, fragment", [
    # a model without biases: the message says so and names methods that do apply
    (tiny_llama, BitFitConfig(), r"no bias parameter found .*; this model has no bias at all \(as Llama-style "
                                 r"models\): SSF or \(IA\)\^3 also train a few vectors per layer"),
    (tiny_bert_classifier, PartialConfig(num_top_layers=5), "num_top_layers=5 but the model has 2 blocks"),
    (tiny_bert_classifier, FishMaskConfig(keep_ratio=1e-9), "keep_ratio=1e-09 keeps .* rounds to 0"),
    (tiny_bert_classifier, DiffPruningConfig(target_sparsity=0.9999999), "target_sparsity=0.9999999 keeps"),
    (tiny_bert_classifier, BitFitConfig(target_modules=["nothing"]), "target_modules=\\['nothing'\\]"),
])
def test_values_the_model_cannot_take_raise_before_any_change(model_fn, config, fragment):
    model = model_fn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=fragment):
        get_peft_model(model, config)
    assert not any(type(m).__name__ == "AdaptedLayer" for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("model_fn, config", [
    (tiny_gpt2, DiffPruningConfig(target_sparsity=0.5)),   # Conv1D, LayerNorm, tied wte/lm_head
    (tiny_llama, PartialConfig(num_top_layers=1)),         # RMSNorm weights, bias-free linears
])
def test_other_architectures_merge_exactly_and_select_tied_weights_once(model_fn, config):
    model = model_fn()
    peft_model = get_peft_model(model, config)
    perturb(peft_model, std=0.05)
    selected = adapters_of(peft_model)
    assert "lm_head" not in selected
    x = batch(rows=2, seq=6)["input_ids"]
    with torch.no_grad():
        adapted = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=x).logits - adapted).abs().max() > 1e-3
        merged = peft_model.merge_and_unload()
        assert (merged(input_ids=x).logits - adapted).abs().max() <= 1e-5


def test_methods_train_at_their_default_learning_rates():
    assert RunConfig(method="bitfit").learning_rate() == 5e-3
    assert RunConfig(method="fish").learning_rate() == 1e-4
    assert RunConfig(method="partial", lr=3e-3).learning_rate() == 3e-3
    assert RunConfig(method="partial", full_finetune=True).learning_rate() == 5e-5


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-sel")
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method, options", [
    ("bitfit", []), ("partial", []), ("diff-pruning", []),
    ("fish", ["--option", "num_fisher_samples=4"]),
    ("child-tuning", ["--option", "num_fisher_samples=4", "--option", "reserve_p=0.01"]),
    ("child-tuning", ["--option", "child_tuning_type=F"]),
])
def test_cli_trains_saves_reports_size_and_reloads(method, options, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", tiny_model_dir, "--method", method, "--max-steps", "3", "--max-train-samples", "64",
            "--max-eval-samples", "16", "--batch-size", "8", "--output-dir", str(out), "--no-progress", *options]
    assert main(argv) == 0
    text = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert f"{metrics['changed_params']:,} changed/stored parameters" in text
    if method in ("fish", "child-tuning") and "child_tuning_type=F" not in options:
        assert HEAD < metrics["trainable_params"] < metrics["total_params"] // 50  # the mask was chosen first
        assert metrics["changed_params"] == metrics["trainable_params"]
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_fisher_of_a_padded_example_equals_that_of_the_example_alone():
    torch.manual_seed(5)
    peft_model = get_peft_model(tiny_bert_classifier(), FishMaskConfig(keep_ratio=0.1))
    host = peft_model.base_model
    entries = [p for n, p in host.model.named_parameters() if ".base_layer." in n]
    ids = torch.randint(3, 64, (1, 9))
    alone = {"input_ids": ids, "attention_mask": torch.ones(1, 9, dtype=torch.long), "labels": torch.tensor([1])}
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long(), "labels": torch.tensor([1])}
    one = empirical_fisher(host, entries, iter([alone]), 1)
    two = empirical_fisher(host, entries, iter([padded]), 1)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert sum(int(f.count_nonzero()) for f in one) > 1000


def test_an_optimiser_built_before_the_fisher_mask_is_refused():
    """FISH replaces its parameters when it chooses its entries from data (``peft_prepare``): an optimiser
    built before would train none of them, silently; both trainers refuse it."""
    from transformers import TrainingArguments as HFArguments

    from peftkit import ConfigError, FishMaskConfig, get_peft_model
    from peftkit.train.hf_trainer import PeftTrainer
    from peftkit.train.trainer import Trainer, TrainingArguments
    from tests.tiny_train import TinyClassifier, classification_items, collate_classification

    def model():
        torch.manual_seed(0)
        return get_peft_model(TinyClassifier(), FishMaskConfig(keep_ratio=0.05, num_fisher_samples=4,
                                                               target_modules=["fc"], modules_to_save=["classifier"]))

    fish = model()
    early = torch.optim.AdamW([p for p in fish.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ConfigError, match="optimiser was built before the adapter chose its parameters"):
        Trainer(fish, classification_items(8), collate_classification, TrainingArguments(max_steps=2, progress=False),
                optimizer=early)
    fish = model()
    early = torch.optim.AdamW([p for p in fish.parameters() if p.requires_grad], lr=1e-2)
    trainer = PeftTrainer(model=fish, args=HFArguments("unused", max_steps=2, report_to=[], use_cpu=True),
                          train_dataset=classification_items(8), data_collator=collate_classification,
                          optimizers=(early, None))
    with pytest.raises(ConfigError, match="optimiser was built before the adapter chose its parameters"):
        trainer.create_optimizer()


def test_the_fisher_information_uses_each_training_row_once():
    """With fewer rows than num_fisher_samples the trainer's endless batches cycled through the data (each row
    6 or 7 times for 64 samples of 10 rows), weighting rows unequally at several times the cost."""
    from peftkit.train.trainer import Trainer, TrainingArguments
    from tests.tiny_train import TinyClassifier, classification_items, collate_classification

    torch.manual_seed(0)
    model = get_peft_model(TinyClassifier(), FishMaskConfig(keep_ratio=0.05, num_fisher_samples=64,
                                                            target_modules=["fc"]))
    seen: list[int] = []
    hook = model.base_model.model.register_forward_pre_hook(lambda m, a, k: seen.append(1), with_kwargs=True)
    Trainer(model, classification_items(10), collate_classification, TrainingArguments(max_steps=1, batch_size=4,
                                                                                       progress=False))
    hook.remove()
    assert len(seen) == 10


def test_partial_blocks_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "stories260K", "--task", "causal-lm", "--method", "partial", "--option",
                 "layers_to_transform=[0]", "--max-steps", "1", "--max-train-samples", "8", "--max-eval-samples", "4",
                 "--output-dir", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [0] and saved["num_top_layers"] is None


class _AttentionNet(nn.Module):
    """torch's own attention and Transformer layer, which read their sub-layers' tensors directly."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.block(h))


def test_sub_layers_that_torch_attention_reads_directly_are_not_selected():
    """A difference on nn.MultiheadAttention's out_proj never acted unmerged but did once merged (merged and
    unmerged outputs differed by 1.19): it is left out, and refused by name. The linear layers of an
    nn.TransformerEncoderLayer are selected: the layer's eval-mode fast path, which reads them directly, is
    turned off for it."""
    torch.manual_seed(0)
    net = _AttentionNet().eval()
    with pytest.warns(UserWarning, match=r"module\(s\) left out \(attn.out_proj, block.self_attn.out_proj"):
        model = get_peft_model(net, BitFitConfig())
    chosen = {n for n, _ in model.named_parameters() if "diff_" in n}
    assert not any("attn.out_proj" in n for n in chosen)
    assert any(".block.linear1." in n for n in chosen) and any(".block.linear2." in n for n in chosen)
    perturb(model)
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        out = model(input_ids=x)
        with model.disable_adapter():
            assert (model(input_ids=x) - out).abs().max() > 1e-3
        model.merge_adapter()
        assert (model(input_ids=x) - out).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="reads its weight and bias directly instead of calling it"):
        get_peft_model(_AttentionNet(), BitFitConfig(target_modules=["attn.out_proj"]))
    model = get_peft_model(_AttentionNet().eval(), DiffPruningConfig(target_modules=["linear1"]))
    perturb(model)
    with torch.no_grad():
        out = model(input_ids=x)
        with model.disable_adapter():
            assert (model(input_ids=x) - out).abs().max() > 1e-3
        model.merge_adapter()
        assert (model(input_ids=x) - out).abs().max() <= 1e-5


@pytest.mark.parametrize("model_fn", ["gpt2", "llama"])
def test_fish_scores_a_tied_tensor_once_and_changes_it_at_both_names(model_fn, tmp_path):
    """GPT-2's wte and lm_head (and a Llama with tie_word_embeddings=True) share one tensor: it is scored once, by
    the square of its whole gradient (both uses), as the paper's code ranks ``named_parameters()``; its chosen
    entries then change at both names, as the tensor itself would: the output layer ran on the base values before."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import PeftModel, get_peft_model_state_dict
    from peftkit.methods.selective import SelectTuner, budget

    if model_fn == "gpt2":
        base, emb, head = tiny_gpt2(), "transformer.wte", "lm_head"
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                            tie_word_embeddings=True)).eval()
        emb, head = "model.embed_tokens", "lm_head"
    assert base.get_submodule(head).weight is base.get_submodule(emb).weight
    twin = copy.deepcopy(base)
    x = torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    # the reference: per example, the squared gradient of every distinct tensor (the tied one once: both uses)
    fisher = {n: torch.zeros_like(p) for n, p in twin.named_parameters()}
    for i in range(4):
        twin.zero_grad()
        twin(input_ids=x[i:i + 1], labels=x[i:i + 1]).loss.backward()
        for n, p in twin.named_parameters():
            fisher[n] += p.grad ** 2 / 4
    config = FishMaskConfig(keep_ratio=0.01, num_fisher_samples=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "shared with another module" warning: the tensor changes everywhere
        model = get_peft_model(base, config)
    model.peft_prepare(iter([{"input_ids": x, "labels": x}]))
    selected = dict(SelectTuner.adapters(model.base_model, "default"))
    assert head not in selected  # one difference, held by the embedding
    flat = torch.cat([fisher[f"{name}.{n}"].reshape(-1) for name, a in selected.items() for n in a.names])
    k = budget(0.01, flat.numel(), "keep_ratio")
    assert sum(getattr(a, f"diff_{n}_indices").numel() for a in selected.values() for n in a.names) == k
    chosen = selected[emb].diff_weight_indices.long().sort().values
    threshold = flat.topk(k).values[-1]
    want = (fisher[f"{emb}.weight"].reshape(-1) >= threshold).nonzero().squeeze(1)
    assert chosen.numel() > 0 and torch.equal(chosen, want)
    # train the chosen entries: the model equals the base whose shared tensor itself got the difference
    with torch.no_grad():
        selected[emb].diff_weight_values.normal_(0, 0.5)  # the other tensors' entries stay 0
    delta = selected[emb].dense("weight")
    with torch.no_grad():
        twin.get_submodule(emb).weight.add_(delta)  # tied: the output layer sees it too
        want_logits = twin(input_ids=x).logits
        assert (model(input_ids=x).logits - want_logits).abs().max() <= 1e-5
        model.save_pretrained(tmp_path)
        keys = list(get_peft_model_state_dict(model))
        assert any(emb in key for key in keys) and not any(head in key for key in keys)  # saved once
        loaded = PeftModel.from_pretrained(copy.deepcopy(twin).eval(), tmp_path)  # twin holds base + delta
        loaded.get_base_model().get_submodule(emb).base_layer.weight.sub_(delta)  # the base again, still tied
        assert (loaded(input_ids=x).logits - want_logits).abs().max() <= 1e-5
        merged = model.merge_and_unload()
        assert torch.equal(merged.get_submodule(head).weight, merged.get_submodule(emb).weight)
        assert (merged(input_ids=x).logits - want_logits).abs().max() <= 1e-5
