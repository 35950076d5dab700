"""Checkpoints: an interrupted run resumed from its last checkpoint ends exactly as an uninterrupted one
(adapter, optimiser, scheduler, dropout RNG and data position restored), files are safetensors + JSON
only and written atomically, and a checkpoint that does not fit is refused before anything changes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from peftkit import ConfigError, get_peft_model_state_dict
from peftkit.cli import main
from peftkit.train.checkpoint import latest_checkpoint
from peftkit.train.trainer import Trainer, TrainingArguments, batch_order
from tests.tiny_train import (
    Interrupted,
    StopAfter,
    classification_items,
    collate_classification,
    interrupt_training,
    lora_model,
)

ITEMS = classification_items(13)  # batches of 4: 4 steps per epoch, the last one 1 row


def _trainer(out, dropout=0.2, data=None, **kw):
    options = dict(max_steps=10, batch_size=4, warmup_ratio=0.2, progress=False, output_dir=str(out),
                   save_every=3) | kw
    return Trainer(lora_model("classifier", dropout), data if data is not None else ITEMS, collate_classification,
                   TrainingArguments(**options))


def _state(trainer):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


@pytest.mark.parametrize("stop_after_steps", [3, 7])  # inside the first epoch, and past an epoch end
def test_resumed_run_equals_uninterrupted_run(tmp_path, stop_after_steps):
    whole = _trainer(tmp_path / "whole", save_every=None)
    whole_stats = whole.train()
    reads = sum(len(b) for b, _ in zip(batch_order(len(ITEMS), 4, 0), range(stop_after_steps), strict=False))
    with pytest.raises(Interrupted):
        _trainer(tmp_path / "run", data=StopAfter(ITEMS, reads)).train()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == f"step-{3 * (stop_after_steps // 3):08d}"
    resumed = _trainer(tmp_path / "run")
    stats = resumed.train(resume_from_checkpoint=checkpoint)
    a, b = _state(whole), _state(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert resumed.history == pytest.approx(whole.history, abs=1e-6) and len(resumed.history) == 10
    assert stats["train_loss"] == pytest.approx(whole_stats["train_loss"], abs=1e-6)
    assert stats["steps"] == 10 and resumed.samples == whole.samples
    assert (whole_stats["resumed_from_step"], stats["resumed_from_step"]) == (0, 3 * (stop_after_steps // 3))
    # the adapter trained, with dropout on: a resumed run that re-drew its masks would differ
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-3


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    folder = tmp_path / "checkpoints"
    # only the latest complete checkpoint stays, named by latest.json; no temporary folder is left
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-00000009"]
    assert json.loads((folder / "latest.json").read_text()) == {"step": 9, "folder": "step-00000009"}
    files = sorted(p.name for p in (folder / "step-00000009").iterdir())
    assert files == ["rank0.json", "rank0.safetensors", "trainer_state.json"]
    tensors = load_file(folder / "step-00000009" / "rank0.safetensors")
    assert {k.split(".")[0] for k in tensors} == {"param", "optim", "rng"}  # the tiny model has no buffer
    assert any(k.endswith(".exp_avg_sq") for k in tensors)
    state = json.loads((folder / "step-00000009" / "trainer_state.json").read_text())
    assert state["step"] == 9 and len(state["history"]) == 9 and state["scheduler"]["last_epoch"] == 9


def test_a_checkpoint_that_does_not_fit_is_refused_before_any_change(tmp_path):
    _trainer(tmp_path).train()
    checkpoint = latest_checkpoint(tmp_path)
    other = _trainer(tmp_path, batch_size=5)
    with pytest.raises(ConfigError, match="batch_size=4 but this run has 5"):
        other.train(resume_from_checkpoint=checkpoint)
    torch.manual_seed(0)
    wider = Trainer(lora_model("lm"), ITEMS, collate_classification,
                    TrainingArguments(max_steps=10, batch_size=4, warmup_ratio=0.2, progress=False))
    before = _state(wider)
    with pytest.raises(ConfigError, match="does not fit this model"):
        wider.train(resume_from_checkpoint=checkpoint)
    after = _state(wider)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert latest_checkpoint(tmp_path / "nothing-here") is None
    # the optimiser's and scheduler's settings too: they were silently replaced (learning rate, weight decay)
    # or applied (warm-up, clipping), and the run no longer matched the uninterrupted one
    for key, value in (("learning_rate", 0.5), ("weight_decay", 0.5), ("warmup_ratio", 0.0), ("max_grad_norm", 0.0),
                       ("loraplus_lr_ratio", 4.0)):
        changed = _trainer(tmp_path, **{key: value})
        before = _state(changed)
        with pytest.raises(ConfigError, match=f"has {key}=.* but this run has {value}; resume with the run's own"):
            changed.train(resume_from_checkpoint=checkpoint)
        assert all(torch.equal(before[k], v) for k, v in _state(changed).items())


def test_save_every_needs_a_folder():
    with pytest.raises(ConfigError, match="save_every=2 needs output_dir"):
        TrainingArguments(save_every=2)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit.train.run import default_model_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(folder)
    return str(folder)


def test_cli_resume_after_ctrl_c_gives_the_uninterrupted_result(tiny_model_dir, tmp_path, monkeypatch, capsys):
    common = ["train", "--model", tiny_model_dir, "--max-steps", "8", "--batch-size", "8", "--max-train-samples",
              "20", "--max-eval-samples", "24", "--lora-dropout", "0.1", "--target-modules", "query,value",
              "--no-progress", "--save-every", "3"]
    assert main([*common, "--output-dir", str(tmp_path / "whole")]) == 0
    interrupt_training(monkeypatch, after=4)
    capsys.readouterr()
    assert main([*common, "--output-dir", str(tmp_path / "run")]) == 130
    assert f"peftkit: interrupted; `peftkit train --resume {tmp_path / 'run'}` continues it" in capsys.readouterr().err
    monkeypatch.undo()
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    capsys.readouterr()
    # a second resume while one runs was taken, and the two deleted each other's checkpoint writes
    import fcntl
    import os

    held = os.open(tmp_path / "run", os.O_RDONLY)  # what a running `peftkit train` there holds
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
        assert "is being trained by another process" in capsys.readouterr().err
        # nor may a new run replace it meanwhile (it set the resumed run's files aside and mixed the two)
        assert main([*common, "--output-dir", str(tmp_path / "run"), "--overwrite"]) == 2
        assert "is being trained by another process" in capsys.readouterr().err
    finally:
        os.close(held)
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "(this session, resumed at step 3; training over all sessions " in out
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (whole["resumed_from_step"], resumed["resumed_from_step"]) == (0, 3)
    for key in ("dev_accuracy", "train_loss", "steps", "trainable_params"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6)
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # resuming the finished run trained nothing but rewrote its metrics.json (this session's time, resumed step)
    finished = (tmp_path / "run" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    refused = capsys.readouterr()
    assert "is a finished run (it has metrics.json): there is nothing to resume" in refused.err
    assert refused.out == ""  # the refusal is the only output (it came after a "resuming RUN" line)
    assert (tmp_path / "run" / "metrics.json").read_bytes() == finished


def test_a_run_that_creates_its_folder_locks_it_at_once(tiny_model_dir, tmp_path, monkeypatch):
    """The lock was taken only on a folder that existed when the run started: a second run started in the folder
    the first one had made (--overwrite) set its files aside and replaced them, and both reported success."""
    import os

    from peftkit.train.checks import hold_lock

    seen = []
    train = Trainer.train

    def probe(self, *args, **kwargs):
        try:
            fd = hold_lock(tmp_path / "new")  # what a second `peftkit train` there tries
        except BlockingIOError:
            seen.append("locked")
        else:
            os.close(fd)
            seen.append("free")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", probe)
    assert main(["train", "--model", tiny_model_dir, "--max-steps", "1", "--batch-size", "4", "--max-train-samples",
                 "8", "--max-eval-samples", "8", "--no-progress", "--output-dir", str(tmp_path / "new")]) == 0
    assert seen == ["locked"]


@pytest.mark.parametrize("locks", [True, False])
def test_a_folder_another_run_made_after_the_checks_is_not_taken_over(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                     locks):
    """A run whose folder did not exist at its checks found it made (and locked) by another run once it had loaded
    its model, set that run's files aside and trained into the folder: it now refuses, and a folder made meanwhile
    but not locked is checked again (not empty: refused without --overwrite)."""
    import os

    from peftkit.train import run as run_module
    from peftkit.train.checks import hold_lock

    out, held, adapt = tmp_path / "run", [], run_module._adapt

    def adapt_while_another_run_starts(*args, **kwargs):
        model = adapt(*args, **kwargs)
        out.mkdir()
        if locks:
            held.append(hold_lock(out))
        (out / "run_config.json").write_text('{"who": "the other run"}')
        return model

    monkeypatch.setattr(run_module, "_adapt", adapt_while_another_run_starts)
    try:
        assert main(["train", "--model", tiny_model_dir, "--max-steps", "1", "--batch-size", "4", "--max-train-samples",
                     "8", "--max-eval-samples", "8", "--no-progress", "--output-dir", str(out)]) == 2
    finally:
        for fd in held:
            os.close(fd)
    assert ("being trained by another process" if locks else "is not empty") in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["run_config.json"]
    assert (out / "run_config.json").read_text() == '{"who": "the other run"}'


def test_cli_resume_refuses_other_options(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "50", "--method", "ia3",
                 "--output-dir", str(tmp_path / "elsewhere")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peftkit: error: --resume continues {tmp_path / 'run'} with the options it was started with; --method, "
        "--max-steps, --output-dir cannot be given with it (only --device and --no-progress can)")
    assert not (tmp_path / "elsewhere").exists()
    # options given at their default values were dropped unread (the run kept its own seed and batch)
    assert main(["train", "--resume", str(tmp_path / "run"), "--seed", "0", "--batch-size", "32", "--method",
                 "lora", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"peftkit: error: --resume continues {tmp_path / 'run'} with the options it was started with; --method, "
        "--batch-size, --seed cannot be given with it (only --device and --no-progress can)")


def test_cli_resume_without_checkpoint_fails_in_one_line(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a peftkit run folder" in capsys.readouterr().err
    (tmp_path / "run_config.json").write_text(json.dumps({"max_steps": 3}))
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint in" in err[0] and "--save-every" in err[0]


@pytest.mark.parametrize("field, value, message", [
    # a negative norm made clipping flip every gradient (the loss rose: 0.69 -> 0.78 where 1.0 gave 0.65)
    ("max_grad_norm", -1.0, "max_grad_norm=-1.0 must be >= 0"),
    ("max_grad_norm", float("nan"), "max_grad_norm=nan is not valid: numbers must be finite"),  # NaN weights
    ("weight_decay", -0.5, "weight_decay=-0.5 must be >= 0"),
    ("eval_batch_size", 0, "eval_batch_size=0 must be >= 1"),
    ("learning_rate", float("inf"), "learning_rate=inf is not valid: numbers must be finite"),
    ("learning_rate", "1e-3", "learning_rate='1e-3' has the wrong type; expected a number"),
    ("log_every", -3, "log_every=-3 must be >= 1"),
    ("batch_size", 2.5, "batch_size=2.5 has the wrong type; expected an integer"),  # failed mid-run
    ("max_steps", 2.5, r"max_steps=2.5 has the wrong type"),
])
def test_training_arguments_out_of_range_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainingArguments(**{field: value})


def test_resume_takes_the_run_folder_or_its_checkpoints_folder(tmp_path):
    """As `peftkit train --resume RUN_DIR`: the run folder (or its checkpoints folder) means its latest
    checkpoint; it failed, calling the right folder "damaged"."""
    reads = sum(len(b) for b, _ in zip(batch_order(len(ITEMS), 4, 0), range(7), strict=False))
    with pytest.raises(Interrupted):
        _trainer(tmp_path / "run", data=StopAfter(ITEMS, reads)).train()
    results = []
    for i, part in enumerate(("", "checkpoints", "checkpoints/step-00000006")):
        run = shutil.copytree(tmp_path / "run", tmp_path / f"copy{i}")  # a resumed run writes newer checkpoints
        resumed = _trainer(run)
        results.append((resumed.train(resume_from_checkpoint=run / part)["resumed_from_step"], _state(resumed)))
    assert [r[0] for r in results] == [6, 6, 6]
    assert all(torch.equal(results[0][1][k], r[1][k]) for r in results[1:] for k in results[0][1])
    with pytest.raises(FileNotFoundError, match=r"is neither a checkpoint .* nor a run folder with checkpoints"):
        _trainer(tmp_path / "run").train(resume_from_checkpoint=tmp_path)


def test_a_lora_plus_run_resumes_only_as_lora_plus(tmp_path):
    """The LoRA+ ratio is a setting of the optimiser: a run resumed without it (or with another) is refused."""
    _trainer(tmp_path, loraplus_lr_ratio=4.0).train()
    checkpoint = latest_checkpoint(tmp_path)
    for value in (None, 8.0):
        with pytest.raises(ConfigError, match=f"has loraplus_lr_ratio=4.0 but this run has {value}"):
            _trainer(tmp_path, loraplus_lr_ratio=value).train(resume_from_checkpoint=checkpoint)


def test_a_trainer_trains_once_and_needs_labels(tmp_path):
    trainer = _trainer(tmp_path, save_every=None, max_steps=2)
    trainer.train()
    before = _state(trainer)
    with pytest.raises(RuntimeError, match=r"already trained \(its 2 steps"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in _state(trainer).items()) and len(trainer.history) == 2
    def unlabeled(items):
        return {k: v for k, v in collate_classification(items).items() if k != "labels"}

    with pytest.raises(ValueError, match=r"returned no loss .*keys \['attention_mask', 'input_ids'\].* need labels"):
        Trainer(lora_model("classifier"), ITEMS, unlabeled, TrainingArguments(max_steps=2, progress=False)).train()


def test_training_arguments_take_a_path_and_check_seed_and_device(tmp_path):
    assert TrainingArguments(save_every=2, output_dir=tmp_path).output_dir == str(tmp_path)
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=f"seed={seed} must lie in 0..4294967295"):
            TrainingArguments(seed=seed)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda': this machine has no cuda device"):
            Trainer(lora_model("classifier"), ITEMS, collate_classification, TrainingArguments(progress=False),
                    device="cuda")


@pytest.mark.parametrize("damage, message", [
    ("no-rng", r"holds no rng.torch state; the checkpoint is damaged"),
    ("short-python-rng", r"holds a random-generator state that cannot be restored"),
    ("moment-shape", r"has 'optim.0.exp_avg' of shape \[3\] for a parameter of shape \[4, 16\]"),
    ("no-moments", r"has 6 entries where 18 were written"),
    ("step-past-end", r"has total_steps of the wrong form"),
    ("base-lrs", r"has scheduler of the wrong form"),
])
def test_a_damaged_checkpoint_that_still_parses_is_refused_before_any_change(tmp_path, damage, message):
    """Damage that kept the files readable gave raw KeyErrors and RuntimeErrors mid-resume, or was taken
    silently (no optimiser moments: fresh ones; a step past the end: the run "finished" early)."""
    from safetensors.torch import save_file

    _trainer(tmp_path, max_steps=6).train()
    folder = latest_checkpoint(tmp_path)
    tensors = load_file(folder / "rank0.safetensors")
    meta = json.loads((folder / "rank0.json").read_text())
    state = json.loads((folder / "trainer_state.json").read_text())
    if damage == "no-rng":
        del tensors["rng.torch"]
    elif damage == "short-python-rng":
        meta["python"][1] = meta["python"][1][:10]
    elif damage == "moment-shape":
        tensors["optim.0.exp_avg"] = torch.zeros(3)
    elif damage == "no-moments":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("optim.") or k.endswith(".step")}
        meta["optim_scalars"] = {}
    elif damage == "step-past-end":
        state["step"] = 99
    elif damage == "base-lrs":
        state["scheduler"]["base_lrs"] = ["x"]
    save_file(tensors, folder / "rank0.safetensors", metadata={"format": "pt"})
    (folder / "rank0.json").write_text(json.dumps(meta))
    (folder / "trainer_state.json").write_text(json.dumps(state))
    resumed = _trainer(tmp_path, max_steps=6)
    before = _state(resumed)
    with pytest.raises(ConfigError, match=message):
        resumed.train(resume_from_checkpoint=folder)
    assert all(torch.equal(before[k], v) for k, v in _state(resumed).items())


def test_a_checkpoint_put_in_place_before_latest_json_was_written_is_found(tmp_path):
    """A stop between a checkpoint folder's rename and latest.json's write left a complete checkpoint that
    --resume did not find ("no checkpoint ... to resume from")."""
    _trainer(tmp_path, max_steps=6).train()
    (tmp_path / "checkpoints" / "latest.json").unlink()
    (tmp_path / "checkpoints" / "step-00000003").mkdir()  # an older name with no state: not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000006"


def test_a_new_run_does_not_delete_another_runs_checkpoints(tmp_path):
    """A second Trainer in the same output_dir, not resuming, deleted the first run's checkpoints at its own
    first save (step-00000006 replaced by step-00000002)."""
    _trainer(tmp_path, max_steps=6).train()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"holds the checkpoints of another run \(latest: step-00000006\)"):
        _trainer(tmp_path, max_steps=4, save_every=2).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    _trainer(tmp_path, max_steps=6).train(resume_from_checkpoint=tmp_path)  # continuing it is fine


def test_a_run_resumed_on_other_training_data_is_refused(tmp_path):
    """Rows added to the training file between the interruption and --resume made the run a mix of two datasets
    and two batch orders; the row count is recorded and checked."""
    _trainer(tmp_path, max_steps=6).train()
    more = _trainer(tmp_path, max_steps=6, data=classification_items(20))
    with pytest.raises(ConfigError, match=r"has train_rows=13 but this run has 20; the training data changed"):
        more.train(resume_from_checkpoint=tmp_path)
