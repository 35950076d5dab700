"""transformers' Trainer with peftkit models (PeftTrainer) on a tiny BERT: training, evaluation with
labels and loss, unused columns dropped, checkpoints and final saves as adapter files that reload,
exact resume from a checkpoint, activation checkpointing. The plain ``Trainer`` trains and evaluates
a peftkit model too (the model's forward shows the wrapped model's arguments)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from peftkit import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.train.hf_trainer import PeftTrainer
from tests.conftest import perturb, tiny_bert_classifier


class Rows(torch.utils.data.Dataset):
    """Token ids with a label that depends on them, plus a text column the model does not take."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 64, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 33).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i], "text": f"row {i}"}


def _model() -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS"))


def _trainer(out, model=None, trainer_class=PeftTrainer, **kw) -> PeftTrainer:
    options = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                   save_steps=3, eval_strategy="steps", eval_steps=3, logging_steps=3, report_to=[], use_cpu=True,
                   seed=0, dataloader_num_workers=0, disable_tqdm=True) | kw
    seen = {}

    def metrics(pred):
        seen["labels"] = pred.label_ids
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = trainer_class(model=model or _model(), args=TrainingArguments(**options), train_dataset=Rows(32, 1),
                          eval_dataset=Rows(12, 2), compute_metrics=metrics)
    trainer.seen = seen
    return trainer


def test_peft_trainer_trains_evaluates_and_saves_adapter_files(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.label_names == ["labels"]
    trainer.train()
    result = trainer.evaluate()
    assert "eval_loss" in result and 0 <= result["eval_accuracy"] <= 1
    assert trainer.seen["labels"].tolist() == Rows(12, 2).labels.tolist()
    for step in (3, 6):
        files = {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "training_args.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}
    trainer.save_model(str(tmp_path / "final"))
    trained = trainer.model
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier_seeded(), tmp_path / "final")
    batch = Rows(5, 3).ids
    with torch.no_grad():
        assert torch.allclose(trained.eval()(input_ids=batch).logits, reloaded(input_ids=batch).logits, atol=1e-6)
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 1e-4  # it trained


def tiny_bert_classifier_seeded():
    torch.manual_seed(0)  # the same base weights (and classifier) as _model()
    return tiny_bert_classifier()


def test_plain_transformers_trainer_trains_and_evaluates_a_peftkit_model(tmp_path):
    trainer = _trainer(tmp_path, trainer_class=Trainer, save_strategy="no")
    assert trainer.label_names == ["labels"]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()  # the string column "text" would break the default collator unless dropped
    result = trainer.evaluate()
    assert "eval_loss" in result and 0 <= result["eval_accuracy"] <= 1
    assert trainer.seen["labels"].tolist() == Rows(12, 2).labels.tolist()
    after = dict(trainer.model.named_parameters())
    assert all((after[n] - p).abs().max() > 0 for n, p in before.items())


def test_forward_shows_the_wrapped_models_arguments_and_stays_bound_to_its_model():
    model = _model()
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "token_type_ids", "labels", "adapter_names"} <= set(params)
    assert params["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "labels" in inspect.signature(PeftModel.forward).parameters  # Trainer reads label names off the class
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin and model.forward.__self__ is model
    perturb(twin)
    ids = Rows(3, 5).ids
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, twin(input_ids=ids).logits)
        assert torch.equal(twin(input_ids=ids).logits, twin.forward(input_ids=ids).logits)


def test_resume_from_checkpoint_loads_the_adapter_and_ends_as_the_uninterrupted_run(tmp_path):
    whole = _trainer(tmp_path / "whole")
    whole.train()
    resumed = _trainer(tmp_path / "resumed")
    perturb(resumed.model)  # proof that the checkpoint's adapter replaces whatever the model holds
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    a = load_file(tmp_path / "whole" / "checkpoint-6" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-6" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_missing_adapter_in_a_checkpoint_is_an_error(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no adapter_model\.safetensors"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "empty"))


def test_a_checkpoint_missing_one_adapters_file_loads_none_of_them(tmp_path):
    """The adapters were loaded one by one: the first came from the checkpoint before the second's missing file
    (a copy that skipped sub-folders) stopped the load, leaving the model half-loaded."""
    from peftkit.train.hf_trainer import load_adapter_weights

    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    (tmp_path / "b" / "adapter_model.safetensors").unlink()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"holds no adapter_model\.safetensors for adapter 'b'"):
        load_adapter_weights(model, tmp_path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["method_state.safetensors", "training_state.safetensors"])
def test_a_damaged_state_file_in_a_checkpoint_is_named(tmp_path, name):
    """A truncated method or training state file gave safetensors' bare "incomplete metadata" error, naming no file."""
    trainer = _trainer(tmp_path, max_steps=1)
    checkpoint = tmp_path / "checkpoint-3"
    trainer.model.save_pretrained(checkpoint)
    (checkpoint / name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(ConfigError, match=rf"'{checkpoint / name}' is not a readable safetensors file \(.*\); the "
                                          "checkpoint is damaged"):
        trainer._load_from_checkpoint(str(checkpoint))


def test_activation_checkpointing_still_trains_the_adapter(tmp_path):
    trainer = _trainer(tmp_path, activation_checkpointing=True, max_steps=2, save_strategy="no", eval_strategy="no")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert trainer.model.get_base_model().is_activation_checkpointing
    after = dict(trainer.model.named_parameters())
    assert all((after[n] - p).abs().max() > 0 for n, p in before.items())


def test_a_peft_model_moves_and_casts_like_a_module():
    model = _model()
    model.to("cpu").double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model.float()
    out = model(input_ids=Rows(2, 4).ids).logits
    assert out.dtype == torch.float32 and out.shape == (2, 2)



def test_the_signed_forward_leaves_no_reference_cycle():
    """The signature comes from a class-level descriptor: nothing on the instance refers back to the model, so
    it is freed as soon as it is dropped (GPU memory too), without the garbage collector."""
    import gc
    import weakref

    model = _model()
    with torch.no_grad():
        model(input_ids=Rows(3, 6).ids)
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_the_compiler_traces_the_model_whole():
    model = _model()
    ids = Rows(3, 6).ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(input_ids=ids).logits, expected, atol=1e-6)
    torch._dynamo.reset()


def test_trainer_label_smoothing_shifts_a_causal_lms_labels_as_for_the_base_model(tmp_path):
    """Trainer picks the shifted label smoothing by the model's class name; the adapted model reports its base's
    (its repr still says PeftModel)."""
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: same outputs
    assert repr(model).startswith("PeftModel(\n  (base_model): AdapterModel(")
    assert model._get_name() == "LlamaForCausalLM"
    batch = {"input_ids": torch.randint(3, 60, (2, 9)), "labels": torch.randint(3, 60, (2, 9))}
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    with torch.no_grad():
        ours = Trainer(model=model, args=args).compute_loss(model, dict(batch))
        theirs = Trainer(model=base, args=args).compute_loss(base, dict(batch))
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_labels_for_a_model_that_takes_none_are_refused_with_advice():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin"]))
    x = torch.randn(3, 4)
    assert model(x, labels=None).shape == (3, 2)
    with pytest.raises(TypeError, match=r"labels were given, but the wrapped model's forward \(Net\) takes no "
                                        r"'labels' argument; .*label_names"):
        model(x, labels=torch.zeros(3))


def test_peft_trainer_runs_peftkits_training_hooks(tmp_path):
    """AdaLoRA's penalty is part of the loss and its ranks are allocated; FISH picks its mask from the training
    data. PeftTrainer ran none of these: AdaLoRA trained on another objective than peft's, kept every rank, and
    FISH trained only the head."""
    from peftkit import AdaLoraConfig, FishMaskConfig

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_classifier(), AdaLoraConfig(
        init_r=4, target_r=1, target_modules=["query", "value"], total_step=6, tinit=1, tfinal=2, deltaT=1,
        orth_reg_weight=0.5, task_type="SEQ_CLS"))
    perturb(model)  # lora_E starts at 0: give every triplet a value the allocation can prune
    trainer = _trainer(tmp_path / "ada", model=model, eval_strategy="no", save_strategy="no")
    rows = Rows(4, 3)
    batch = {"input_ids": rows.ids, "attention_mask": torch.ones_like(rows.ids), "labels": rows.labels}
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout masks in both forwards
        expected = model(**batch).loss  # the forward adds the penalty in training, as peft's does
        with model.loss_terms_added_by_caller():
            torch.manual_seed(1)
            assert model.peft_regularization() > 0.1
            assert torch.allclose(model(**batch).loss + model.peft_regularization(), expected)
        torch.manual_seed(1)
        assert torch.allclose(trainer.compute_loss(model, batch), expected)
    kept = lambda: sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)  # noqa: E731
    assert kept() == 16
    trainer.train()
    assert kept() < 16  # the budget was cut towards target_r
    torch.manual_seed(0)
    fish = get_peft_model(tiny_bert_classifier(), FishMaskConfig(keep_ratio=0.05, task_type="SEQ_CLS"))
    head = sum(p.numel() for n, p in fish.named_parameters() if "classifier" in n and p.requires_grad)
    _trainer(tmp_path / "fish", model=fish, eval_strategy="no", save_strategy="no").train()
    assert fish.get_nb_trainable_parameters()[0] > head


def test_a_pruned_adalora_checkpoint_loads_back_into_the_training_model(tmp_path):
    """AdaLoRA's checkpoints hold only the kept triplets (``rank_pattern``): ``load_best_model_at_end`` and
    ``resume_from_checkpoint`` put them back in the full-rank training model, which then computes what was
    saved (it once refused the smaller tensors, and the best-model load failed after training)."""
    from peftkit import AdaLoraConfig

    def model():
        torch.manual_seed(0)
        return get_peft_model(tiny_bert_classifier(), AdaLoraConfig(
            init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, target_modules=["query", "value"],
            task_type="SEQ_CLS"))

    trainer = _trainer(tmp_path, model(), save_steps=2, eval_steps=2, load_best_model_at_end=True,
                       metric_for_best_model="loss", learning_rate=5e-2)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    config = PeftModel.from_pretrained(tiny_bert_classifier_seeded(), best).peft_config["default"]
    assert config.rank_pattern and any(not all(m) for m in config.rank_pattern.values())  # pruned when saved
    batch = Rows(5, 3).ids
    saved = PeftModel.from_pretrained(tiny_bert_classifier_seeded(), best).eval()
    with torch.no_grad():
        want = saved(input_ids=batch).logits
        assert torch.allclose(trainer.model.eval()(input_ids=batch).logits, want, atol=1e-6)
    assert trainer.model.peft_config["default"].rank_pattern == config.rank_pattern
    resumed = _trainer(tmp_path / "again", model(), save_steps=2, eval_steps=2, max_steps=6)
    resumed._load_from_checkpoint(best)
    with torch.no_grad():
        assert torch.allclose(resumed.model.eval()(input_ids=batch).logits, want, atol=1e-6)


@pytest.mark.parametrize("checkpoint", [1, 3, 5])  # before, in and after AdaLoRA's pruning phase
def test_an_adalora_run_resumed_by_peft_trainer_ends_as_the_uninterrupted_one(tmp_path, checkpoint):
    """The checkpoint holds the pruned ranks and importance averages (method_state.safetensors) and, once ranks are
    pruned, the full-rank parameters (training_state.safetensors): the pruned triplets' rows came back as zeros
    and the importance averages started afresh."""
    from peftkit import AdaLoraConfig

    def model():
        torch.manual_seed(0)
        return get_peft_model(tiny_bert_classifier(), AdaLoraConfig(
            init_r=4, target_r=1, total_step=6, tinit=1, tfinal=2, deltaT=1, target_modules=["query", "value"],
            task_type="SEQ_CLS"))

    options = dict(save_steps=1, eval_strategy="no", learning_rate=5e-2)
    whole = _trainer(tmp_path / "whole", model(), **options)
    whole.train()
    folder = tmp_path / "whole" / f"checkpoint-{checkpoint}"
    assert (folder / "method_state.safetensors").is_file()
    assert (folder / "training_state.safetensors").is_file() == (checkpoint > 1)
    resumed = _trainer(tmp_path / "resumed", model(), **options)
    resumed.train(resume_from_checkpoint=str(folder))
    a = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    pattern = whole.model.peft_config["default"].rank_pattern
    assert pattern == resumed.model.peft_config["default"].rank_pattern and sum(map(sum, pattern.values())) < 16


@pytest.mark.parametrize("method", ["p-tuning", "prefix-projection", "diff-pruning"])
def test_resume_of_adapters_saved_in_another_form_than_they_train_in(method, tmp_path):
    """P-tuning's and prefix tuning's encoders are saved folded, diff pruning's dense differences as their
    non-zero entries: resuming loaded that form, replaced the trainable parameters and failed on the optimiser
    state, after changing the model."""
    from peftkit import DiffPruningConfig, PrefixTuningConfig, PromptEncoderConfig

    configs = {"p-tuning": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, task_type="SEQ_CLS"),
               "prefix-projection": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                               encoder_hidden_size=8, task_type="SEQ_CLS"),
               "diff-pruning": lambda: DiffPruningConfig(target_modules=["query", "value"])}

    def model():
        torch.manual_seed(0)
        return get_peft_model(tiny_bert_classifier(), configs[method]())

    whole = _trainer(tmp_path / "whole", model())
    whole.train()
    resumed = _trainer(tmp_path / "resumed", model())
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    a = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    (tmp_path / "whole" / "checkpoint-3" / "training_state.safetensors").unlink()
    again = _trainer(tmp_path / "again", model())
    before = {n: p.detach().clone() for n, p in again.model.named_parameters()}
    with pytest.raises(ConfigError, match=r"has no training_state\.safetensors"):
        again.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert all(torch.equal(p, before[n]) for n, p in again.model.named_parameters())


def test_a_folded_model_cannot_resume_a_checkpoint_of_the_unfolded_form(tmp_path):
    """A P-tuning model loaded from a checkpoint is folded already: resuming copied the checkpoint's tokens into it,
    then failed on the optimiser state (saved for the encoder)."""
    from peftkit import PromptEncoderConfig

    torch.manual_seed(0)
    whole = _trainer(tmp_path / "whole", get_peft_model(tiny_bert_classifier(), PromptEncoderConfig(
        num_virtual_tokens=3, encoder_hidden_size=8, task_type="SEQ_CLS")))
    whole.train()
    torch.manual_seed(0)
    folded = PeftModel.from_pretrained(tiny_bert_classifier(), str(tmp_path / "whole" / "checkpoint-6"),
                                       is_trainable=True)
    before = {n: p.detach().clone() for n, p in folded.named_parameters()}
    with pytest.raises(ConfigError, match="was written while the adapter trained in another form"):
        _trainer(tmp_path / "again", folded).train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert all(torch.equal(p, before[n]) for n, p in folded.named_parameters())


def test_each_method_declares_whether_its_saved_form_differs():
    """The model asks every layer adapter and every module kept outside the layers (nested ones too: UniPELT's
    gated prefix sits inside a composition); folding the prompt encoder ends the difference."""
    from peftkit import DiffPruningConfig, IA3Config, PromptEncoderConfig, unipelt_config

    def model(config):
        torch.manual_seed(0)
        return get_peft_model(tiny_bert_classifier(), config)

    assert not model(LoraConfig(r=2, target_modules=["query"])).base_model.saved_form_differs()
    assert not model(IA3Config(target_modules=["key"], feedforward_modules=[])).base_model.saved_form_differs()
    assert model(DiffPruningConfig(target_modules=["query"])).base_model.saved_form_differs()
    assert model(unipelt_config(r=2, encoder_hidden_size=8, task_type="SEQ_CLS")).base_model.saved_form_differs()
    assert not model(unipelt_config(r=2, encoder_hidden_size=None,
                                    task_type="SEQ_CLS")).base_model.saved_form_differs()
    ptuning = model(PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, task_type="SEQ_CLS"))
    assert ptuning.base_model.saved_form_differs()
    ptuning.base_model.extra_modules["default"].fold()
    assert not ptuning.base_model.saved_form_differs()


def test_gradient_checkpointing_enable_passes_transformers_options_on():
    """every_n_layers / offload were a TypeError (peft passes them on to transformers)."""
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=2)
    base = model.get_base_model()
    assert base.is_activation_checkpointing
    flags = [m.gradient_checkpointing for m in base.bert.encoder.layer]
    assert flags == [True, False]
    model.train()
    x = Rows(4, 0)
    batch = {"input_ids": x.ids[:4], "labels": x.labels[:4]}
    model(**batch).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_child_tuning_f_under_gradient_accumulation_masks_each_step_once(tmp_path):
    """PeftTrainer with 2 micro-batches per step: both backward passes of a step send the gradient through one
    mask, and the next step has a new one (every backward drew its own before)."""
    from peftkit.methods.child_tuning import ChildTuningConfig

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_classifier(), ChildTuningConfig(child_tuning_type="F", reserve_p=0.5,
                                                                     target_modules=["query"], task_type="SEQ_CLS"))
    delta = next(p for n, p in model.named_parameters() if n.endswith("layer.0.attention.self.query.adapters."
                                                                     "default.diff_weight"))
    kept = []
    delta.register_hook(lambda g: kept.append(g != 0))  # each backward's gradient, after the mask
    _trainer(tmp_path, model=model, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2,
             eval_strategy="no", save_strategy="no").train()
    assert len(kept) == 6
    for step in range(3):
        assert torch.equal(kept[2 * step], kept[2 * step + 1])
        assert abs(kept[2 * step].float().mean().item() - 0.5) < 0.1
    assert (kept[0] != kept[2]).float().mean() > 0.3 and (kept[2] != kept[4]).float().mean() > 0.3
