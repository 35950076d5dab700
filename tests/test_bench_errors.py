"""`peftkit bench` checks its sweep before any cell runs (tasks, methods, model, seeds) and drops repeats."""

from __future__ import annotations

import errno
import io
import json
from dataclasses import asdict

import pytest

from peftkit import ConfigError
from peftkit.bench import BenchConfig, run_sweep
from peftkit.bench.arena import Cell, cell_command
from tests.cli_util import cli, error_line


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ["nope"]}, "unknown task 'nope'; the arena's tasks: sst2, rte, cola, stsb, mrpc"),
    ({"seeds": [2**32]}, "seed 4294967296 must be an integer in 0..4294967295"),
    ({"seeds": [-1]}, "seed -1 must be an integer in 0..4294967295"),
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
    ({"save_every": -1}, "save_every=-1 must be an integer >= 0 (0: no checkpoints)"),
    ({"save_every": 1.5}, "save_every=1.5 must be an integer >= 0 (0: no checkpoints)"),
    ({"save_every": True}, "save_every=True must be an integer >= 0 (0: no checkpoints)"),
    # a string was taken letter by letter ("unknown PEFT method 'l'"), a float ran and failed in every cell
    ({"methods": "lora"}, "methods='lora' is not valid; give a list of names"),
    ({"tasks": "sst2"}, "tasks='sst2' is not valid; give a list of names"),
    ({"seeds": 0}, "seeds=0 is not valid; give a list of integers"),
    ({"train_args": "--r=16"}, "train_args='--r=16' is not valid; give a list of names"),
    ({"max_steps": 1.5}, "max_steps=1.5 must be an integer >= 1"),
    ({"max_steps": "10"}, "max_steps='10' must be an integer >= 1"),
])
def test_bad_sweeps_are_refused(kwargs, message):
    with pytest.raises(ConfigError) as err:
        BenchConfig(**kwargs)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"^unknown PEFT method 'nope'; registered methods: .*\blora\b"):
        BenchConfig(methods=["lora", "nope"])


def test_sweep_names_are_canonical_without_repeats_and_cells_may_retry(tmp_path):
    cfg = BenchConfig(methods=["LoRA", "ia3", "lora", "IA3"], tasks=["SST-2", "sst2", "rte"], seeds=[3, 1, 3],
                      output_dir=str(tmp_path))
    assert cfg.methods == ["full", "lora", "ia3"] and cfg.tasks == ["sst2", "rte"] and cfg.seeds == [3, 1]
    cfg = BenchConfig(methods=["lora", "Full", "full"], tasks=["sst2"], seeds=[0], output_dir=str(tmp_path))
    assert cfg.methods == ["lora", "full"]
    cmd = cell_command(cfg, Cell("lora", "sst2", 3), tmp_path / "cell")
    assert cmd[cmd.index("--output-dir") + 1:cmd.index("--output-dir") + 3] == [str(tmp_path / "cell"), "--overwrite"]


def test_cli_checks_tasks_and_model_before_running_a_cell(tmp_path, capsys):
    out = tmp_path / "bench"
    assert error_line(capsys, "bench", "--tasks", "sst2,nope", "--output-dir", out) == (
        "peftkit: error: unknown task 'nope'; the arena's tasks: sst2, rte, cola, stsb, mrpc")
    assert error_line(capsys, "bench", "--model", tmp_path / "nonexist", "--output-dir", out) == (
        f"peftkit: error: --model '{tmp_path / 'nonexist'}' is not a folder; give a local HF model folder "
        "(config.json + model.safetensors); nothing is downloaded (a hub id names no folder here: the embedded "
        "all-MiniLM-L6-v2 is the default, stories260K is shipped)")
    assert error_line(capsys, "bench", "--model", "stories260k", "--output-dir", out).startswith(
        "peftkit: error: --model 'stories260k' is neither a folder nor a shipped model (did you mean 'stories260K'?)")
    assert error_line(capsys, "bench", "--seeds", "0,x", "--output-dir", out) == (
        "peftkit: error: --seeds '0,x' must be comma-separated integers")
    assert not out.exists()
    out.write_text("mine")
    for extra in ([], ["--report-only"]):
        assert error_line(capsys, "bench", "--output-dir", out, *extra) == (
            f"peftkit: error: --output-dir '{out}' is a file, not a folder; give a new folder or the folder of a "
            "sweep to resume")
    assert out.read_text() == "mine"


def test_report_only_and_damaged_sweep_files(tmp_path, capsys):
    """--report-only on a folder without a sweep made it and wrote an empty report (exit 0); damaged JSON gave
    a bare JSONDecodeError (exit 1) naming no file."""
    typo = tmp_path / "typo"
    assert error_line(capsys, "bench", "--report-only", "--output-dir", typo) == (
        f"peftkit: error: --output-dir '{typo}' holds no sweep (no bench_config.json); give the folder of a sweep, "
        "or run it without --report-only first")
    assert not typo.exists()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "bench_config.json").write_text("{bad")
    assert error_line(capsys, "bench", "--report-only", "--output-dir", sweep).startswith(
        f"peftkit: error: '{sweep / 'bench_config.json'}' is not valid JSON")
    cfg = BenchConfig(methods=["lora"], tasks=["sst2"], seeds=[0], output_dir=str(sweep))
    (sweep / "bench_config.json").write_text(json.dumps(asdict(cfg)))
    metrics = Cell("lora", "sst2", 0).folder(sweep) / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{")
    # the sweep's settings are read from its folder (they had to be typed again, and were refused otherwise)
    assert error_line(capsys, "bench", "--report-only", "--output-dir", sweep) == (
        f"peftkit: error: '{metrics}' is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1)); it holds a finished cell's results; delete the cell's folder and run the sweep again to "
        "redo it")
    metrics.write_text(json.dumps({"dev_accuracy": 0.5}))  # valid JSON without its metric: was a bare KeyError
    assert error_line(capsys, "bench", "--report-only", "--output-dir", sweep) == (
        f"peftkit: error: {metrics} is damaged: it names no metric with its value (metric=None); delete the cell's "
        "folder and run the sweep again to redo it")
    metrics.write_text(json.dumps({"metric": "accuracy", "dev_accuracy": 0.5, "trainable_params": 10}))
    assert error_line(capsys, "bench", "--report-only", "--output-dir", sweep) == (
        f"peftkit: error: {metrics} is damaged: it lacks total_params, seconds_per_step, peak_memory_mib; "
        "delete the cell's folder and run the sweep again to redo it")
    metrics.write_text(json.dumps({"metric": "accuracy", "dev_accuracy": 0.5, "trainable_params": 10,
                                   "total_params": 100, "seconds_per_step": 0.1,
                                   "peak_memory_mib": 5.0}))
    assert cli("bench", "--report-only", "--output-dir", sweep) == 0
    assert "(1 cells finished, 0 failed, 1 not run yet)" in capsys.readouterr().out


def test_a_sweep_folder_keeps_its_settings(tmp_path, capsys):
    """Finished cells are reused only by a sweep with the same per-cell settings, and the sweep's own
    options cannot be overridden through --train-arg (the report would describe other runs)."""

    out = tmp_path / "bench"
    out.mkdir()
    old = BenchConfig(methods=["lora"], tasks=["sst2"], seeds=[0], output_dir=str(out), max_steps=2,
                      train_args=["--max-train-samples=64"])
    (out / "bench_config.json").write_text(json.dumps(asdict(old)))
    assert error_line(capsys, "bench", "--methods", "lora", "--tasks", "sst2", "--seeds", "0", "--max-steps", "3",
                      "--output-dir", out) == (
        f"peftkit: error: {out} holds a sweep run with other settings (max_steps: 2 there, 3 now; train_args: "
        "['--max-train-samples=64'] there, [] now); use another --output-dir, or the same settings to resume it")
    assert error_line(capsys, "bench", "--report-only", "--max-steps", "3", "--output-dir", out) == (
        "peftkit: error: --max-steps has no effect with --report-only: the report describes the sweep as it ran, "
        "whose settings are read from its bench_config.json; leave them out")
    BenchConfig(methods=["lora", "ia3"], tasks=["sst2", "rte"], seeds=[0, 1], output_dir=str(out), max_steps=2,
                train_args=["--max-train-samples=64"]).check_folder()  # more cells, same settings: fine
    with pytest.raises(ConfigError, match=r"train_args \['--max-steps=5'\] repeat options the sweep sets itself"):
        BenchConfig(train_args=["--max-steps=5"])
    with pytest.raises(ConfigError, match=r"train_args \['--seed', '--method'\] repeat"):
        BenchConfig(train_args=["--seed", "3", "--method", "ia3"])
    # argparse takes unique abbreviations: these set the sweep's own steps and seed (every cell ran them)
    with pytest.raises(ConfigError, match=r"train_args \['--max-st=5', '--see'\] repeat options the sweep sets"):
        BenchConfig(train_args=["--max-st=5", "--see", "7"])
    assert BenchConfig(train_args=["--r", "4", "--max-train=64"]).train_args == ["--r", "4", "--max-train=64"]


@pytest.mark.parametrize("extra, problem", [
    ("--bogus", "unrecognized arguments: --bogus (see `peftkit train --help`)"),
    ("--r=abc", "argument --r/--lora-r: expected a positive integer, got 'abc' (see `peftkit train --help`)"),
    # values only `peftkit train`'s own checks refuse (every cell failed with the message in its log)
    ("--lora-dropout=1.5", "--lora-dropout 1.5 must lie in [0, 1)"),
    ("--option=bogus_field=1", "LoraConfig has no field 'bogus_field'"),
    # data paths: every cell loaded its model, then failed on them
    ("--eval-file=/nonexistent.csv", "--eval-file '/nonexistent.csv' is not a file (it does not exist); give an "
                                     "existing file"),
])
def test_a_bad_train_arg_is_refused_before_any_cell_runs(tmp_path, capsys, extra, problem):
    """Before, every cell ran and failed, the reason was only in report.md, and the sweep folder then refused
    the corrected argument as a change of settings."""
    out = tmp_path / "sweep"
    line = error_line(capsys, "bench", "--methods", "lora", "--tasks", "sst2", "--seeds", "0", "--max-steps", "2",
                      "--output-dir", out, f"--train-arg={extra}")
    # (an unknown field's message goes on to list the config's own fields)
    assert line.startswith(f"peftkit: error: --train-arg '{extra}' is not valid for `peftkit train`: {problem}")
    assert not out.exists()


def test_a_folder_with_other_files_is_not_written_over(tmp_path, capsys):
    """The sweep replaced a user's report.md and report.json in a folder that held no sweep."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    assert error_line(capsys, "bench", "--methods", "lora", "--tasks", "sst2", "--seeds", "0", "--max-steps", "1",
                      "--output-dir", out) == (
        f"peftkit: error: --output-dir {str(out)!r} holds other files (report.md) and no sweep (no "
        "bench_config.json); the sweep would write over them: give a new or empty folder, or the folder of a sweep "
        "to resume")
    assert sorted(p.name for p in out.iterdir()) == ["report.md"] and (out / "report.md").read_text() == "my notes"


def test_data_dir_must_hold_every_task_and_paths_are_saved_absolute(tmp_path, monkeypatch):
    """A --data-dir without a task's files ran every cell to fail; relative paths were saved as typed, so the
    cells' run folders could only be evaluated from the directory the sweep ran in."""
    (tmp_path / "glue" / "MRPC").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "glue" / "MRPC" / f"{split}.tsv").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        BenchConfig(tasks=["sst2", "mrpc"], data_dir="glue", output_dir="out")
    assert str(err.value).startswith("--data-dir glue lacks ['glue/SST-2/train.tsv', 'glue/SST-2/dev.tsv'] (it "
                                     "holds every task's data")
    cfg = BenchConfig(methods=["lora"], tasks=["mrpc"], seeds=[0], data_dir="glue", output_dir="out")
    assert cfg.data_dir == str(tmp_path / "glue")
    cmd = cell_command(cfg, Cell("lora", "mrpc", 0), tmp_path / "cell")
    assert cmd[cmd.index("--data-dir") + 1] == str(tmp_path / "glue")


def test_a_sweep_saved_with_relative_paths_resumes_with_its_own_command(tmp_path, monkeypatch):
    """Sweeps started before paths were saved absolute hold 'glue'; the same command was refused as other
    settings ('glue' there, '/abs/glue' now)."""
    (tmp_path / "glue" / "MRPC").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "glue" / "MRPC" / f"{split}.tsv").write_text("x")
    monkeypatch.chdir(tmp_path)
    cfg = BenchConfig(methods=["lora"], tasks=["mrpc"], seeds=[0], data_dir="glue", output_dir="out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bench_config.json").write_text(json.dumps({**asdict(cfg), "data_dir": "glue"}))
    cfg.check_folder()  # the same folder
    (tmp_path / "other" / "MRPC").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "other" / "MRPC" / f"{split}.tsv").write_text("x")
    moved = BenchConfig(methods=["lora"], tasks=["mrpc"], seeds=[0], data_dir="other", output_dir="out")
    with pytest.raises(ConfigError, match="holds a sweep run with other settings"):
        moved.check_folder()


def test_a_full_disk_while_a_resumed_sweep_writes_its_settings_keeps_them(tmp_path, monkeypatch):
    """Every run of a sweep rewrites bench_config.json; it was truncated first, so a full disk (or Ctrl-C) at that
    moment left an empty file, and the sweep could no longer be resumed or reported ("not valid JSON")."""
    cfg = BenchConfig(methods=["lora"], tasks=["sst2"], seeds=[0], output_dir=str(tmp_path))
    saved = json.dumps({**asdict(cfg), "jobs": 1}, indent=2) + "\n"
    (tmp_path / "bench_config.json").write_text(saved)
    real_open = io.open

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def full_disk(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return FullDisk(fh) if any(c in mode for c in "wax+") else fh

    monkeypatch.setattr(io, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_sweep(cfg, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "bench_config.json").read_text() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_config.json"]
    cfg.check_folder()  # the sweep can still be resumed
