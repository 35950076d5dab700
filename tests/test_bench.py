"""`peftkit bench`: a tiny sweep runs every cell in its own process, reports, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit import ConfigError
from peftkit.bench import BenchConfig, collect, run_sweep, summarise, write_report
from peftkit.bench.report import NOT_RUN


def test_sweep_report_and_resume(tiny_model_dir, tmp_path):
    cfg = BenchConfig(methods=["lora"], tasks=["stsb"], seeds=[0], output_dir=str(tmp_path / "b"),
                      model=tiny_model_dir, max_steps=2, batch_size=8,
                      train_args=["--max-train-samples", "32", "--max-eval-samples", "24"])
    assert cfg.methods == ["full", "lora"]
    records = run_sweep(cfg, progress=False, jobs=2)
    assert [("error" in r) for r in records] == [False] * 2, records
    stsb = next(r for r in records if r["task"] == "stsb" and r["method"] == "lora")
    assert stsb["metric"] == "pearson" and stsb["adapter_bytes"] > 0 and stsb["trainable_params"] > 0
    full = next(r for r in records if r["method"] == "full")
    assert full["trainable_params"] == full["total_params"]
    path = write_report(records, tmp_path / "b")
    text = path.read_text()
    assert "| full |" in text and "| lora |" in text and "stsb (Pearson)" in text
    lora = next(r for r in records if r["method"] == "lora")
    cost_row = next(line for line in text.split("## Cost")[1].splitlines() if line.startswith("| lora |"))
    assert cost_row.endswith(f"| {lora['changed_params']:,} |")  # parameters saved, next to the file size
    for png in ("metric_vs_params.png", "step_time.png", "memory.png"):
        assert (tmp_path / "b" / png).stat().st_size > 1000
    # resume: only the missing cell runs again
    cell = tmp_path / "b" / "cells" / "lora" / "stsb" / "seed0"
    (cell / "metrics.json").unlink()
    kept = (tmp_path / "b" / "cells" / "full" / "stsb" / "seed0" / "metrics.json").stat().st_mtime_ns
    again = run_sweep(cfg, progress=False)
    assert (cell / "metrics.json").is_file() and not any("error" in r for r in again)
    assert (tmp_path / "b" / "cells" / "full" / "stsb" / "seed0" / "metrics.json").stat().st_mtime_ns == kept
    assert json.loads((tmp_path / "b" / "bench_config.json").read_text())["max_steps"] == 2


def test_summary_statistics():
    rec = [{"method": "m", "task": "t", "seed": s, "metric": "accuracy", "dev_accuracy": v, "trainable_params": 10,
            "total_params": 100, "seconds_per_step": st, "peak_memory_mib": mem, "adapter_bytes": 2048}
           for s, v, st, mem in ((0, 0.80, 0.1, 500), (1, 0.90, 0.3, 700), (2, 0.85, 0.2, 600))]
    sparse = {**rec[0], "method": "d", "trainable_params": 100, "changed_params": 3}  # diff pruning's saved entries
    s = summarise([*rec, sparse, {"method": "x", "task": "t", "seed": 0, "error": "boom"}])
    assert s["per_method"]["m"]["changed_params"] == 10 and s["per_method"]["d"]["changed_params"] == 3
    cell = s["cells"][("m", "t")]
    assert cell["mean"] == pytest.approx(85.0) and cell["std"] == pytest.approx(5.0) and cell["n"] == 3
    assert s["per_method"]["m"]["step_ms"] == pytest.approx(200) and s["per_method"]["m"]["peak_memory_mib"] == 700
    assert s["failures"][0]["error"] == "boom"


def test_cells_short_of_seeds_show_their_count_and_mark_averages_over_them(tmp_path):
    """A cell with 1 of 2 seeds read "75.0 ± 0.0", like two seeds that agreed, and its method's average ranked
    beside complete ones unmarked."""
    base = {"metric": "accuracy", "trainable_params": 10, "total_params": 100, "seconds_per_step": 0.1,
            "peak_memory_mib": 500, "adapter_bytes": 2048}
    records = [{**base, "method": m, "task": "rte", "seed": seed, "dev_accuracy": acc}
               for m, seed, acc in (("full", 0, 0.6), ("full", 1, 0.7), ("lora", 0, 0.75))]
    records.append({"method": "lora", "task": "rte", "seed": 1, "error": "boom"})
    text = write_report(records, tmp_path).read_text()
    assert "| full | 65.0 ± 7.1 | 65.0 |" in text
    assert "| lora | 75.0 (n=1 of 2) | 75.0* |" in text
    assert "(n=k of N): only k of that cell's N seeds finished; * an average over such cells." in text
    # a seed not run yet anywhere: every cell is short of it (the count was taken from the finished cells)
    pending = [*records, *({"method": m, "task": "rte", "seed": 2, "error": "not run"} for m in ("full", "lora"))]
    text = write_report(pending, tmp_path).read_text()
    assert "| full | 65.0 ± 7.1 (n=2 of 3) | 65.0* |" in text


def test_bad_sweeps():
    with pytest.raises(ConfigError, match="unknown PEFT method 'nope'"):
        BenchConfig(methods=["nope"])
    with pytest.raises(ConfigError, match="--data-dir"):
        BenchConfig(methods=["lora"], tasks=["mrpc"])


def test_cells_not_run_yet_are_not_failures(tmp_path):
    rec = {"method": "lora", "task": "sst2", "seed": 0, "metric": "accuracy", "dev_accuracy": 0.8,
           "trainable_params": 10, "total_params": 100, "seconds_per_step": 0.1, "peak_memory_mib": 500,
           "adapter_bytes": 2048}
    records = [rec, {"method": "lora", "task": "cola", "seed": 0, "error": "not run"},
               {"method": "lora", "task": "stsb", "seed": 0, "error": "boom"}]
    s = summarise(records)
    assert [r["task"] for r in s["pending"]] == ["cola"] and [r["task"] for r in s["failures"]] == ["stsb"]
    assert s["metric_of"] == {"sst2": "accuracy", "cola": "matthews", "stsb": "pearson"}
    text = write_report(records, tmp_path).read_text()
    assert "| lora | 80.0 | not run yet | failed |" in text  # one seed: no spread (it read "± 0.0")
    assert "| method | sst2 (acc) | cola (MCC) | stsb (Pearson) |" in text
    assert "1 cell(s) have not run yet" in text and "- lora / stsb / seed 0: boom" in text


def test_an_interrupted_cell_continues_from_its_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """A cell killed after step 3 of 5 continues from its step-2 checkpoint (save_every=2) when the sweep is
    run again, ends with the adapter an uninterrupted cell gets, and its checkpoints are then deleted."""
    from safetensors.torch import load_file

    from peftkit.bench.arena import Cell, cell_command
    from peftkit.cli import main
    from tests.tiny_train import interrupt_training

    def sweep(name: str) -> BenchConfig:
        return BenchConfig(methods=["lora"], tasks=["sst2"], seeds=[0], output_dir=str(tmp_path / name),
                           model=tiny_model_dir, max_steps=5, batch_size=4, save_every=2,
                           train_args=["--max-train-samples", "32", "--max-eval-samples", "16"])

    whole = run_sweep(sweep("whole"), progress=False)
    assert not any("error" in r for r in whole), whole
    assert not (tmp_path / "whole" / "cells" / "lora" / "sst2" / "seed0" / "checkpoints").exists()

    cfg = sweep("cut")
    folder = Cell("lora", "sst2", 0).folder(tmp_path / "cut")
    cmd = cell_command(cfg, Cell("lora", "sst2", 0), folder)
    assert cmd[cmd.index("--save-every") + 1] == "2"
    interrupt_training(monkeypatch, after=3)
    assert main(cmd[3:]) == 130  # the cell's own command line, in this process, interrupted at step 4
    monkeypatch.undo()
    assert json.loads((folder / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (folder / "metrics.json").exists()

    records = run_sweep(cfg, progress=False)  # full fine-tuning runs from scratch, LoRA resumes
    lora = next(r for r in records if r["method"] == "lora")
    assert "error" not in lora and lora["resumed_from_step"] == 2
    assert "[bench] continuing the interrupted cell" in (folder / "cell.log").read_text()
    assert not (folder / "checkpoints").exists()
    ref = next(r for r in whole if r["method"] == "lora")
    assert lora["dev_accuracy"] == ref["dev_accuracy"] and lora["train_loss"] == pytest.approx(ref["train_loss"],
                                                                                                abs=1e-6)
    got = load_file(folder / "adapter_model.safetensors")
    want = load_file(tmp_path / "whole" / "cells" / "lora" / "sst2" / "seed0" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)


def test_a_cell_whose_checkpoint_cannot_be_resumed_trains_again(tiny_model_dir, tmp_path):
    """A damaged checkpoint pointer is not resumed: the cell trains from step 0, with a fresh log."""
    from peftkit.bench.arena import Cell, resume_command

    cfg = BenchConfig(methods=["lora"], tasks=["sst2"], seeds=[0], output_dir=str(tmp_path / "b"),
                      model=tiny_model_dir, max_steps=3, batch_size=4, save_every=1,
                      train_args=["--max-train-samples", "16", "--max-eval-samples", "8"])
    folder = Cell("lora", "sst2", 0).folder(tmp_path / "b")
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run_config.json").write_text("{}")
    (folder / "checkpoints" / "latest.json").write_text("not json")
    assert resume_command(folder) is None
    records = run_sweep(cfg, progress=False)
    lora = next(r for r in records if r["method"] == "lora")
    assert "error" not in lora and lora["resumed_from_step"] == 0
    assert "[bench]" not in (folder / "cell.log").read_text()


@pytest.mark.parametrize("status", [130, 2, 1])
def test_what_a_failed_resume_does(tmp_path, monkeypatch, status):
    """Resuming a cell interrupted again (130) stops the sweep and keeps the checkpoint; a refused
    checkpoint (2) makes the cell train from step 0; any other failure (1) keeps the checkpoint for the
    next run and the sweep goes on."""
    from peftkit.bench import arena

    cfg = BenchConfig(methods=["lora"], tasks=["sst2"], seeds=[0], output_dir=str(tmp_path), max_steps=5)
    first = arena.Cell("full", "sst2", 0).folder(tmp_path)
    (first / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(arena, "resume_command", lambda folder: ["resume", str(folder)] if folder == first else None)
    calls = []

    class FakePopen:  # a cell's process that ends at once with the status the case asks for
        def __init__(self, cmd, **kwargs):
            calls.append(cmd[:2] if cmd[0] == "resume" else [*cmd[3:5], cmd[cmd.index("--output-dir") + 1]])
            self.returncode = status if cmd[0] == "resume" else 0

        def wait(self):
            return self.returncode

        def poll(self):
            return self.returncode

    monkeypatch.setattr(arena.subprocess, "Popen", FakePopen)
    fresh_full = ["train", "--task", str(first)]
    fresh_lora = ["train", "--task", str(arena.Cell("lora", "sst2", 0).folder(tmp_path))]
    if status == 130:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cfg, progress=False)
        assert calls == [["resume", str(first)]]  # neither a fresh run of the cell nor the next cell
        assert (first / "checkpoints").is_dir()
        # unfinished, not failed: the report lists it as not run yet (it read "failed: peftkit: interrupted")
        assert not (first / "error.txt").exists()
        assert [r["error"] for r in collect(cfg)] == [NOT_RUN, NOT_RUN]
        return
    run_sweep(cfg, progress=False)
    if status == 2:
        assert calls == [["resume", str(first)], fresh_full, fresh_lora]
        log = (first / "cell.log").read_text()
        assert "[bench] resuming was refused; training the cell again from the start" in log
    else:
        assert calls == [["resume", str(first)], fresh_lora]
        assert (first / "checkpoints").is_dir() and (first / "error.txt").is_file()


def test_plot_labels_of_nearby_points_go_to_different_sides_or_are_shared():
    from peftkit.bench.report import _label_places

    points = [("houlsby", 226850, 67.5), ("lora", 338690, 67.4), ("dora", 359810, 67.5), ("full", 2.2e7, 69.4),
              ("ia3", 16898, 63.6)]
    places = {name: (offset, align) for name, _, _, offset, align in _label_places(points)}
    assert places["full"] == places["ia3"] == ((5, 4), "left")  # alone: above right
    assert set(places) == {"full", "ia3", "houlsby", "lora / dora"}  # nearly the same point: one label
    assert places["houlsby"] != places["lora / dora"]


def test_a_cell_held_by_another_process_is_not_started_twice(tmp_path):
    """SIGTERM to `peftkit bench` left its running cell training on its own (a new session's child), and the
    next sweep then trained that cell a second time into the same folder. The cells now run in sessions of
    their own that the sweep stops itself, and each holds a lock on its folder (inherited by its training
    process): a sweep finding a cell locked refuses before any cell starts."""
    import fcntl
    import os

    from peftkit.bench import arena

    cfg = BenchConfig(methods=["lora"], tasks=["sst2"], seeds=[0], output_dir=str(tmp_path), max_steps=5)
    held = arena._lock_cell(arena.Cell("lora", "sst2", 0).folder(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"the cell in .*lora/sst2/seed0 is being trained by another process"):
            run_sweep(cfg, progress=False)
        # nothing started, and the other cell's lock was let go
        assert not (arena.Cell("full", "sst2", 0).folder(tmp_path) / "cell.log").exists()
        fd = os.open(arena.Cell("full", "sst2", 0).folder(tmp_path) / ".lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        os.close(held)


def test_an_interrupted_sweep_brings_its_report_up_to_date(tmp_path, monkeypatch, capsys):
    """Ctrl-C left the report.md of an earlier run of the sweep in place, describing fewer cells than the folder
    holds; now the report is rewritten from the cells finished so far, and the message says so."""
    from dataclasses import asdict

    import peftkit.bench
    from peftkit.cli import main

    def interrupted_sweep(cfg, progress=True, jobs=1):  # the sweep as Ctrl-C leaves it: settings written, no cell
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "bench_config.json").write_text(json.dumps({**asdict(cfg), "jobs": jobs}))
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.bench, "run_sweep", interrupted_sweep)
    argv = ["bench", "--methods", "lora", "--tasks", "sst2", "--seeds", "0", "--output-dir", str(tmp_path),
            "--no-progress"]
    (tmp_path / "bench_config.json").write_text("{}")  # an earlier run of this sweep, with its report
    (tmp_path / "report.md").write_text("# stale report\n")
    monkeypatch.setattr(peftkit.bench.BenchConfig, "check_folder", lambda self: None)
    assert main(argv) == 130
    report = (tmp_path / "report.md").read_text()
    assert "stale" not in report and "| lora | not run yet |" in report and "| full | not run yet |" in report
    err = capsys.readouterr().err
    assert f"peftkit: interrupted; {tmp_path / 'report.md'} shows the cells finished so far" in err
