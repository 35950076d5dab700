"""What the user saved is never lost or mixed: run folders, --overwrite, export/merge outputs, damaged run
folders on --resume and eval; refusals are one line and leave every byte on disk as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from peftkit.train.trainer import Trainer
from tests.cli_util import cli, error_line, snapshot
from tests.tiny_train import interrupt_training

DAMAGED = "the checkpoint is damaged; resume from an earlier copy of the run or train again"


def train_args(model_dir, out, *extra):
    return ["train", "--model", model_dir, "--max-steps", 2, "--batch-size", 8, "--max-train-samples", 16,
            "--max-eval-samples", 8, "--target-modules", "query,value", "--output-dir", out, "--no-progress", *extra]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A LoRA run, an IA3 run and a LoRA run with a checkpoint (read-only: copy before changing)."""
    root = tmp_path_factory.mktemp("runs")
    assert cli(*train_args(tiny_model_dir, root / "lora")) == 0
    assert cli(*train_args(tiny_model_dir, root / "ia3", "--method", "ia3", "--option", "feedforward_modules=[]")) == 0
    assert cli(*train_args(tiny_model_dir, root / "ckpt", "--save-every", 1)) == 0
    return root


def test_output_dir_with_a_run_or_a_file_is_refused(tiny_model_dir, runs, tmp_path, capsys):
    run = shutil.copytree(runs / "lora", tmp_path / "run")
    before = snapshot(tmp_path)
    assert error_line(capsys, *train_args(tiny_model_dir, run)) == (
        f"peftkit: error: --output-dir '{run}' is not empty (it holds adapter_config.json, adapter_model.safetensors, "
        "metrics.json, ...); pass --overwrite to replace the run in it, or give a new folder")
    assert snapshot(tmp_path) == before
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    before = snapshot(tmp_path)
    assert error_line(capsys, *train_args(tiny_model_dir, note)) == (
        f"peftkit: error: --output-dir '{note}' is a file, not a folder; give a new or empty folder")
    assert error_line(capsys, *train_args(tiny_model_dir, note, "--overwrite")) == (
        f"peftkit: error: --output-dir '{note}' is a file, not a folder; give a new or empty folder")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(tiny_model_dir, runs, tmp_path, capsys):
    run = shutil.copytree(runs / "ckpt", tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    assert cli(*train_args(tiny_model_dir, run, "--method", "ia3", "--option", "feedforward_modules=[]",
                           "--overwrite")) == 0
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "metrics.json", "notes.txt", "run_config.json", "train.log"]
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert json.loads((run / "metrics.json").read_text())["method"] == "ia3"
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "train.log").read_text().count("done:") == 1


def test_a_crash_after_overwrite_puts_the_earlier_run_back(tiny_model_dir, runs, tmp_path, monkeypatch, capsys):
    run = shutil.copytree(runs / "ckpt", tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)

    def crash(self, indices, step):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Trainer, "_step", crash)
    monkeypatch.delenv("PEFTKIT_TRACEBACK", raising=False)
    assert error_line(capsys, *train_args(tiny_model_dir, run, "--method", "ia3", "--option",
                                          "feedforward_modules=[]", "--overwrite"), status=1) == (
        "peftkit: error: RuntimeError: disk on fire (set PEFTKIT_TRACEBACK=1 for the traceback)")
    assert snapshot(tmp_path) == before  # every byte of the earlier run, checkpoints too, and nothing else
    monkeypatch.undo()
    assert cli("eval", "--adapter", run) == 0


def test_an_interrupted_overwrite_run_with_checkpoints_is_kept_for_resume(tiny_model_dir, runs, tmp_path, monkeypatch,
                                                                          capsys):
    """Ctrl-C after the new run wrote a checkpoint keeps the new run, so --resume continues it (its checkpoints
    were deleted and the earlier run put back, so --resume found nothing); the earlier run waits aside until a
    run in the folder finishes. Without a checkpoint the earlier run is put back."""
    reference = tmp_path / "reference"
    assert cli(*train_args(tiny_model_dir, reference, "--max-steps", 3, "--save-every", 1)) == 0
    run = shutil.copytree(runs / "lora", tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    earlier = snapshot(run)
    interrupt_training(monkeypatch, after=2)
    assert cli(*train_args(tiny_model_dir, run, "--max-steps", 3, "--save-every", 1, "--overwrite")) == 130
    monkeypatch.undo()
    assert "the run stopped after writing checkpoints: it is kept" in capsys.readouterr().err
    aside = [p for p in run.iterdir() if p.name.startswith(".peftkit-replaced-")]
    assert len(aside) == 1 and (aside[0] / "adapter_model.safetensors").read_bytes() == \
        earlier["adapter_model.safetensors"]
    assert (run / "checkpoints").is_dir() and not (run / "metrics.json").exists()
    assert cli("train", "--resume", run, "--no-progress") == 0
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "checkpoints",
                                                     "metrics.json", "notes.txt", "run_config.json", "train.log"]
    assert (run / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    # interrupted before its first checkpoint: the earlier run comes back as it was
    again = shutil.copytree(runs / "lora", tmp_path / "again")
    before = snapshot(again)
    interrupt_training(monkeypatch, after=2)
    assert cli(*train_args(tiny_model_dir, again, "--max-steps", 3, "--overwrite")) == 130
    assert snapshot(again) == before
    monkeypatch.undo()
    # SIGTERM (kill, SLURM, docker stop) likewise: it killed the run outright, leaving the earlier run hidden,
    # and the next --overwrite run deleted it
    step, calls = Trainer._step, []

    def terminated(self, indices, n):
        calls.append(n)
        if len(calls) > 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, indices, n)

    monkeypatch.setattr(Trainer, "_step", terminated)
    assert cli(*train_args(tiny_model_dir, again, "--max-steps", 3, "--overwrite")) == 130
    assert snapshot(again) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was for the run only


def test_overwrite_beside_an_earlier_run_kept_aside_under_the_same_process_id(tiny_model_dir, runs, tmp_path, capsys):
    """A run kept for --resume leaves the run it replaced in .peftkit-replaced-<suffix>; a later --overwrite run
    whose process has the same id (a container's entrypoint gets the same pid every time) failed with
    FileExistsError, as the hidden folder was named by the pid."""
    run = shutil.copytree(runs / "lora", tmp_path / "run")
    aside = run / f".peftkit-replaced-{os.getpid()}"
    shutil.copytree(runs / "ia3", aside)
    assert cli(*train_args(tiny_model_dir, run, "--overwrite")) == 0
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "metrics.json", "run_config.json", "train.log"]
    assert json.loads((run / "metrics.json").read_text())["method"] == "lora"


def test_overwrite_that_cannot_move_every_earlier_file_aside_puts_them_back(tiny_model_dir, runs, tmp_path, monkeypatch,
                                                                              capsys):
    """A run file that cannot be moved (checkpoints/ on another mount: EXDEV) stopped the run after the files
    before it had been hidden in .peftkit-replaced-*: the folder held half of the earlier run."""
    import errno

    import peftkit.train.checks

    run = shutil.copytree(runs / "ckpt", tmp_path / "run")
    before = snapshot(tmp_path)
    real = os.replace

    def other_mount(src, dst):
        if os.path.basename(src) == "checkpoints":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(peftkit.train.checks.os, "replace", other_mount)
    monkeypatch.delenv("PEFTKIT_TRACEBACK", raising=False)
    assert cli(*train_args(tiny_model_dir, run, "--overwrite")) == 1
    monkeypatch.undo()
    assert "Invalid cross-device link" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_export_and_merge_never_replace_a_file_or_their_inputs(runs, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"user data")
    before = snapshot(tmp_path)
    assert error_line(capsys, "export", "--adapter", runs / "lora", "--merge", "--output", target, "--overwrite") == (
        f"peftkit: error: --output '{target}' is a file, not a folder; the model is written as a folder: give "
        "another path")
    assert error_line(capsys, "merge", runs / "lora", runs / "lora", "--output", target, "--overwrite") == (
        f"peftkit: error: --output '{target}' is a file, not a folder; the adapter is written as a folder: give "
        "another path")
    assert snapshot(tmp_path) == before
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert error_line(capsys, "export", "--adapter", runs / "lora", "--merge", "--output", link, "--overwrite") == (
        f"peftkit: error: --output '{link}' is a symbolic link; give the folder it points to, or a new folder")
    link.unlink()
    run = shutil.copytree(runs / "lora", tmp_path / "run")
    before = snapshot(tmp_path)
    assert error_line(capsys, "export", "--adapter", run, "--merge", "--output", tmp_path, "--overwrite") == (
        f"peftkit: error: --output '{tmp_path}' holds the input folder '{run}'; replacing it would delete the input: "
        "give another output folder")
    assert error_line(capsys, "merge", runs / "lora", run, "--output", run, "--overwrite") == (
        f"peftkit: error: --output '{run}' holds the input folder '{run}'; replacing it would delete the input: "
        "give another output folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_non_empty_output_needs_overwrite(runs, tmp_path, capsys, command, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = (["merge", runs / "lora", runs / "lora"] if command == "merge" else
            ["export", "--adapter", runs / "lora", "--merge"]) + ["--output", out]
    before = snapshot(tmp_path)
    # --overwrite replaces an earlier output only: the user's notes are refused, never deleted, and the message
    # says so with or without it (it once advised --overwrite, which was then refused)
    for flags in ([], ["--overwrite"]):
        assert error_line(capsys, *argv, *flags) == (
            f"peftkit: error: --output '{out}' holds notes.txt, which no earlier `peftkit merge` or `peftkit export` "
            "wrote there; --overwrite replaces only such a folder and would delete them: move them away, or give "
            "another folder")
    assert snapshot(tmp_path) == before
    (out / "notes.txt").unlink()
    assert cli(*argv) == 0
    assert error_line(capsys, *argv) == (
        f"peftkit: error: --output '{out}' holds the output of an earlier `peftkit merge` or `peftkit export`; pass "
        "--overwrite to replace it, or give a new folder")
    assert cli(*argv, "--overwrite") == 0  # an earlier output is replaced
    # a user's file named like an output file (README.md, tokenizer_notes.txt) is not taken for one
    for name in ("README.md", "tokenizer_notes.txt"):
        (out / name).write_text("mine")
        assert error_line(capsys, *argv, "--overwrite").startswith(f"peftkit: error: --output '{out}' holds {name}, ")
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    names = sorted(p.name for p in out.iterdir() if p.name != ".peftkit-output.json")
    assert names == (["adapter_config.json", "adapter_model.safetensors", "run_config.json"] if command == "merge"
                     else ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(*argv[:-1], empty) == 0 and (empty / names[0]).is_file()
    # "." and "" failed after all the work ("PosixPath('.') has an empty name", exit 1)
    assert error_line(capsys, *argv[:-1], "") == "peftkit: error: --output '' is empty; give the folder to write"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert cli(*argv[:-1], ".") == 0 and (here / names[0]).is_file()


@pytest.mark.parametrize("command", ["merge", "export"])
def test_overwrite_that_fails_to_put_the_new_output_in_place_keeps_the_earlier_one(runs, tmp_path, capsys, command,
                                                                                   monkeypatch):
    """The earlier output was moved aside, then the new one failed to take its place (an interrupt, an error):
    the output folder was gone, the earlier output hidden in .out.old-<pid> and the new one deleted."""
    import peftkit.artifacts

    out = tmp_path / "out"
    argv = (["merge", runs / "lora", runs / "lora"] if command == "merge" else
            ["export", "--adapter", runs / "lora", "--merge"]) + ["--output", out, "--overwrite"]
    assert cli(*argv) == 0
    before = snapshot(tmp_path)
    real = os.replace

    def new_output_fails(src, dst):
        if os.fspath(dst) == os.fspath(out) and ".tmp-" in os.fspath(src):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(peftkit.artifacts.os, "replace", new_output_fails)
    assert cli(*argv) == 130
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["merge", "export"])
def test_sigterm_during_merge_or_export_removes_the_staging_folder(runs, tmp_path, capsys, command, monkeypatch):
    """SIGTERM (docker stop, kill) ended merge/export outright: the staging folder (for export a whole merged
    model) stayed hidden beside the output. Now it stops as Ctrl-C does."""
    import peftkit.artifacts

    out = tmp_path / "out"
    argv = (["merge", runs / "lora", runs / "lora"] if command == "merge" else
            ["export", "--adapter", runs / "lora", "--merge"]) + ["--output", out, "--overwrite"]
    assert cli(*argv) == 0
    before = snapshot(tmp_path)
    write, unhandled = peftkit.artifacts.atomic_write_bytes, []

    def terminated(path, data):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(path, data)

    monkeypatch.setattr(peftkit.artifacts, "atomic_write_bytes", terminated)
    previous = signal.signal(signal.SIGTERM, lambda *_: unhandled.append(1))  # (the default would end pytest)
    try:
        assert cli(*argv) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not unhandled
    assert "peftkit: interrupted" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_merge_of_adapters_of_different_types_is_refused(runs, tmp_path, capsys):
    assert error_line(capsys, "merge", runs / "lora", runs / "ia3", "--output", tmp_path / "m") == (
        f"peftkit: error: the adapters are of different types ({{'{runs / 'lora'}': 'LORA', '{runs / 'ia3'}': 'IA3'}}); "
        "combine adapters of one type (all LoRA or all (IA)^3)")
    assert not (tmp_path / "m").exists()


def test_export_of_a_method_that_cannot_merge_is_refused(tiny_model_dir, tmp_path, capsys):
    from peftkit import ComposedConfig, LoraConfig, PromptTuningConfig

    prompt = PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS")
    for name, config in (("prompt", prompt), ("composed", ComposedConfig(configs=[LoraConfig(target_modules=["query"]), prompt]))):
        config.save_pretrained(tmp_path / name)
    before = snapshot(tmp_path)
    assert error_line(capsys, "export", "--adapter", tmp_path / "prompt", "--merge", "--model", tiny_model_dir,
                      "--output", tmp_path / "out") == (
        f"peftkit: error: '{tmp_path / 'prompt'}' holds an adapter of type PROMPT_TUNING, which cannot be merged into "
        "the weights (`peftkit methods` shows which methods merge)")
    assert error_line(capsys, "export", "--adapter", tmp_path / "composed", "--merge", "--model", tiny_model_dir,
                      "--output", tmp_path / "out") == (
        f"peftkit: error: '{tmp_path / 'composed'}' holds an adapter of type COMPOSED with a part of type "
        "PROMPT_TUNING, which cannot be merged into the weights (`peftkit methods` shows which methods merge)")
    assert snapshot(tmp_path) == before


def test_merge_with_model_prints_no_progress_bars(tiny_model_dir, runs, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        assert cli("merge", runs / "lora", runs / "lora", "--model", tiny_model_dir, "--output", tmp_path / "m") == 0
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("merged 2 adapters (cat")


def _damage(run, what):
    step = run / "checkpoints" / "step-00000002"
    if what == "run_config_json":
        (run / "run_config.json").write_text('{"max_steps": ')
        return (f"'{run / 'run_config.json'}' is not valid JSON (Expecting value: line 1 column 15 (char 14)); the "
                "run folder is damaged; train again")
    if what == "run_config_type":
        cfg = json.loads((run / "run_config.json").read_text())
        (run / "run_config.json").write_text(json.dumps({**cfg, "max_steps": "2"}))
        return f"'{run / 'run_config.json'}': max_steps='2' has the wrong type; expected int | None"
    if what == "run_config_range":
        cfg = json.loads((run / "run_config.json").read_text())
        (run / "run_config.json").write_text(json.dumps({**cfg, "lora_dropout": 1.5}))
        return f"'{run / 'run_config.json'}': lora_dropout=1.5 must lie in [0, 1)"
    if what == "safetensors":
        data = (step / "rank0.safetensors").read_bytes()
        (step / "rank0.safetensors").write_bytes(data[: len(data) // 2])
        return (f"'{step / 'rank0.safetensors'}' is not a readable safetensors file (Error while deserializing "
                f"header: incomplete metadata, file not fully covered); {DAMAGED}")
    if what == "trainer_state":
        (step / "trainer_state.json").write_text("{oops")
        return (f"'{step / 'trainer_state.json'}' is not valid JSON (Expecting property name enclosed in double "
                f"quotes: line 1 column 2 (char 1)); {DAMAGED}")
    if what == "trainer_state_keys":
        (step / "trainer_state.json").write_text('{"step": 2}')
        return (f"'{step / 'trainer_state.json'}' lacks ['world_size', 'optimizer_param_groups', 'total_steps', "
                f"'batch_size', 'seed', 'history', 'samples', 'seconds', 'scheduler']; {DAMAGED}")
    if what.startswith("state_value:"):  # a value of the wrong form: a raw KeyError/TypeError after writing
        key, value = what.split(":", 2)[1:]
        state = json.loads((step / "trainer_state.json").read_text())
        (step / "trainer_state.json").write_text(json.dumps({**state, key: json.loads(value)}))
        return f"'{step / 'trainer_state.json'}' has {key} of the wrong form; {DAMAGED}"
    if what.startswith("rank_value:"):
        key, value = what.split(":", 2)[1:]
        meta = json.loads((step / "rank0.json").read_text())
        (step / "rank0.json").write_text(json.dumps({**meta, key: json.loads(value)}))
        return f"'{step / 'rank0.json'}' has {key} of the wrong form; {DAMAGED}"
    if what == "missing_rank":
        (step / "rank0.safetensors").unlink()
        return f"'{step / 'rank0.safetensors'}' is missing; {DAMAGED}"
    if what == "no_checkpoints":
        shutil.rmtree(run / "checkpoints")
        return (f"no checkpoint in '{run / 'checkpoints'}' to resume from; a run writes them when trained with "
                "--save-every N")
    (run / "checkpoints" / "latest.json").write_text('{"step": 2}')
    return (f"'{run / 'checkpoints' / 'latest.json'}' names no checkpoint folder (expected \"folder\": \"step-<N>\", "
            f"got None); {DAMAGED}")


@pytest.mark.parametrize("what", ["run_config_json", "run_config_type", "run_config_range", "safetensors",
                                  "trainer_state", "trainer_state_keys", "missing_rank", "no_checkpoints",
                                  "latest", "state_value:scheduler:{}", 'state_value:history:"abc"',
                                  "state_value:samples:null", "state_value:optimizer_param_groups:[{}]",
                                  "rank_value:numpy:[1, 2]", 'rank_value:python:"x"',
                                  'rank_value:optim_scalars:{"0.step": "x"}'])
def test_resume_from_a_damaged_run_is_one_line_and_changes_nothing(runs, tmp_path, capsys, what):
    run = shutil.copytree(runs / "ckpt", tmp_path / "run")
    for name in ("metrics.json", "adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()  # as after an interruption
    message = _damage(run, what)
    before = snapshot(tmp_path)
    assert error_line(capsys, "train", "--resume", run, "--no-progress") == f"peftkit: error: {message}"
    assert snapshot(tmp_path) == before
    if what.startswith("run_config"):
        assert error_line(capsys, "eval", "--adapter", run) == f"peftkit: error: {message}"


def test_resume_of_an_intact_copy_finishes(runs, tmp_path, capsys):
    run = shutil.copytree(runs / "ckpt", tmp_path / "run")
    for name in ("metrics.json", "adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    assert cli("train", "--resume", run, "--no-progress") == 0
    assert (json.loads((run / "metrics.json").read_text())["dev_accuracy"]
            == json.loads((runs / "ckpt" / "metrics.json").read_text())["dev_accuracy"])


def test_weights_are_loaded_from_safetensors_only(tiny_model_dir, runs, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from peftkit.artifacts import load_base_for

    real = AutoModelForSequenceClassification.from_pretrained.__func__
    seen = []

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("use_safetensors"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(spy))
    load_base_for(runs / "lora")  # through the run's own loader (train, eval, resume use it too)
    load_base_for(runs / "lora", model_dir=tiny_model_dir)
    assert seen == [True, True]


def test_resume_and_eval_of_a_folder_that_is_no_run(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = (f"peftkit: error: '{empty}' is not a peftkit run folder (no run_config.json); give the folder that "
               "`peftkit train` wrote")
    assert error_line(capsys, "train", "--resume", empty, "--no-progress") == message
    assert error_line(capsys, "eval", "--adapter", empty) == message
    assert error_line(capsys, "eval", "--adapter", runs / "lora", "--device", "foo") == (
        "peftkit: error: --device 'foo' is not a device; use cpu, cuda, cuda:N or mps")
    assert list(empty.iterdir()) == []


def test_merge_names_the_adapter_that_does_not_fit(runs, tmp_path, capsys):
    from peftkit import LoraConfig, get_peft_model
    from tests.conftest import tiny_gpt2

    other = tmp_path / "gpt2-lora"
    get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], base_model_name_or_path="tiny-gpt2")
                   ).save_pretrained(other)
    line = error_line(capsys, "merge", runs / "lora", other, "--output", tmp_path / "m")
    first = json.loads((runs / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert line.startswith(f"peftkit: error: '{other}' does not fit the base model of '{runs / 'lora'}' (trained on "
                           f"'tiny-gpt2', the first on {first!r}): ")
    assert "'a1'" not in line  # not the internal name
    assert not (tmp_path / "m").exists()


def test_merge_of_a_damaged_adapter_file_says_it_is_damaged(runs, tmp_path, capsys):
    """A truncated weights file was reported as an adapter that "does not fit its base model" (after loading
    the base), which sends the user looking for another base model."""
    run = shutil.copytree(runs / "lora", tmp_path / "run")
    weights = run / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for adapters in ([run, runs / "lora"], [runs / "lora", run]):
        assert error_line(capsys, "merge", *adapters, "--output", tmp_path / "m") == (
            f"peftkit: error: {weights} is not a readable safetensors file (Error while deserializing header: "
            "incomplete metadata, file not fully covered); the adapter was not loaded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_merge_heads_from_an_adapter_without_a_head_is_refused(runs, tmp_path, capsys):
    """The head is never taken from an adapter that did not train one (that wrote the untrained head)."""
    from peftkit import LoraConfig, get_peft_model
    from peftkit.artifacts import load_base_for

    base, _ = load_base_for(runs / "lora")
    get_peft_model(base, LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path / "nohead")
    assert error_line(capsys, "merge", runs / "lora", tmp_path / "nohead", "--heads-from", 1, "--output",
                      tmp_path / "m") == (
        f"peftkit: error: --heads-from 1 names '{tmp_path / 'nohead'}', which has no trained copy of the modules the "
        "others train whole (modules_to_save, e.g. a classifier head); adapters that have one: "
        f"0 ('{runs / 'lora'}')")
    assert not (tmp_path / "m").exists()
    assert cli("merge", runs / "lora", tmp_path / "nohead", "--output", tmp_path / "m") == 0


def test_merge_takes_the_run_config_of_the_adapter_whose_head_it_keeps(tiny_model_dir, runs, tmp_path, capsys):
    """--heads-from 1 kept the RTE run's head but wrote the first (SST-2) run's run_config.json, so predict and
    eval then read one sentence for a sentence-pair head; and --heads-from on adapters without heads was taken."""
    assert cli(*train_args(tiny_model_dir, tmp_path / "rte", "--task", "rte")) == 0
    assert cli("merge", runs / "lora", tmp_path / "rte", "--heads-from", 1, "--output", tmp_path / "m") == 0
    assert json.loads((tmp_path / "m" / "run_config.json").read_text())["task"] == "rte"
    from peftkit import LoraConfig, get_peft_model
    from peftkit.artifacts import load_base_for

    base, _ = load_base_for(runs / "lora")  # (its encoder: what a plain adapter with no task type loads onto)
    model = get_peft_model(base.bert, LoraConfig(r=2, target_modules=["query"],
                                                 base_model_name_or_path=str(tiny_model_dir)))
    model.save_pretrained(tmp_path / "h0")
    model.save_pretrained(tmp_path / "h1")
    capsys.readouterr()
    assert error_line(capsys, "merge", tmp_path / "h0", tmp_path / "h1", "--heads-from", 1, "--output",
                      tmp_path / "m2") == (
        "peftkit: error: --heads-from 1 has no effect: the adapters train no whole modules (no classifier head or "
        "other modules_to_save); leave it out")
    assert not (tmp_path / "m2").exists()


def test_paths_that_do_not_exist_are_named_as_such(runs, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert error_line(capsys, "merge", runs / "lora", runs / "lora", "--output", afile / "sub") == (
        f"peftkit: error: --output '{afile / 'sub'}' lies under '{afile}', which is a file: give a path whose parent "
        "folders are folders")
    assert error_line(capsys, "merge", runs / "lora", runs / "lora", "--model", tmp_path / "nothere", "--output",
                      tmp_path / "m") == (
        f"peftkit: error: --model '{tmp_path / 'nothere'}' is not a folder; give the local transformers model folder "
        "the adapter was trained on")
    assert error_line(capsys, "eval", "--adapter", tmp_path / "nothere") == (
        f"peftkit: error: '{tmp_path / 'nothere'}' does not exist or is not a folder; give the run folder that "
        "`peftkit train` wrote")


def test_merge_takes_the_run_config_from_any_run_folder(runs, tiny_model_dir, tmp_path, capsys):
    """A plain adapter folder first and a run folder second: the merged folder can still be evaluated."""
    from peftkit import LoraConfig, get_peft_model
    from peftkit.artifacts import load_base_for

    base, _ = load_base_for(runs / "lora")
    get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")).save_pretrained(
        tmp_path / "plain")
    assert cli("merge", tmp_path / "plain", runs / "lora", "--model", tiny_model_dir, "--output", tmp_path / "m") == 0
    assert (tmp_path / "m" / "run_config.json").is_file()
    capsys.readouterr()
    assert cli("eval", "--adapter", tmp_path / "m") == 0
    assert "dev_accuracy" in capsys.readouterr().out


def test_export_of_a_full_fine_tuning_run_points_to_its_model(tiny_model_dir, tmp_path, capsys):
    assert cli("train", "--model", tiny_model_dir, "--max-steps", 1, "--max-train-samples", 8, "--max-eval-samples", 8,
               "--output-dir", tmp_path / "full", "--no-progress", "--full-finetune") == 0
    assert error_line(capsys, "export", "--adapter", tmp_path / "full", "--merge", "--output", tmp_path / "x") == (
        f"peftkit: error: '{tmp_path / 'full'}' is a full fine-tuning run: it holds no adapter to merge, and its "
        f"model is already a plain transformers folder, '{tmp_path / 'full' / 'model'}'")


def test_a_checkpoint_of_another_process_count_is_named_as_such(runs):
    """Resuming a 1-process run under torchrun with 2 processes blamed a 'damaged' checkpoint (rank 1's files
    are 'missing'); the process count is checked first."""
    from peftkit.config import ConfigError
    from peftkit.train.checkpoint import check_checkpoint, latest_checkpoint

    folder = latest_checkpoint(runs / "ckpt")
    check_checkpoint(folder, 0, 1)
    with pytest.raises(ConfigError, match=rf"checkpoint '{folder}' was written by 1 process\(es\) but this run has 2; "
                                          r"resume with --nproc-per-node 1"):
        check_checkpoint(folder, 1, 2)


def test_an_output_dir_that_cannot_be_written_is_refused_up_front(tiny_model_dir, tmp_path, capsys):
    """They failed after the model and data had loaded, with raw OS errors (exit 1 for /proc)."""
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    before = snapshot(tmp_path)
    assert error_line(capsys, *train_args(tiny_model_dir, note / "sub")) == (
        f"peftkit: error: --output-dir '{note / 'sub'}' cannot be written: '{note}' is a file, not a folder; give a "
        "path in a folder")
    assert error_line(capsys, *train_args(tiny_model_dir, "/proc/peftkit-run")).startswith(
        "peftkit: error: --output-dir '/proc/peftkit-run' cannot be written: no folder can be made in '/proc'")
    assert snapshot(tmp_path) == before


def test_export_never_replaces_the_base_named_by_a_plain_adapter_folder(tiny_model_dir, tmp_path, capsys):
    """Without --model the base is the folder adapter_config.json names; --overwrite replaced it (rc 0), so the
    adapter lost the model it needs."""
    from transformers import AutoModelForSequenceClassification

    from peftkit import LoraConfig, get_peft_model

    base_dir = shutil.copytree(tiny_model_dir, tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir)
    before = snapshot(tmp_path)
    assert error_line(capsys, "export", "--adapter", tmp_path / "adapter", "--merge", "--output", base_dir,
                      "--overwrite") == (
        f"peftkit: error: --output '{base_dir}' holds the input folder '{base_dir}'; replacing it would delete the "
        "input: give another output folder")
    assert snapshot(tmp_path) == before
