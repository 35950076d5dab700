"""`peftkit bench`: a tiny sweep runs every cell in its own process, reports, and resumes."""

from __future__ import annotations

import json

import pytest

from peftkit import ConfigError
from peftkit.bench import BenchConfig, run_sweep, summarise, write_report


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
    assert "| lora | 80.0 ± 0.0 | not run yet | failed |" in text
    assert "| method | sst2 (acc) | cola (MCC) | stsb (Pearson) |" in text
    assert "1 cell(s) have not run yet" in text and "- lora / stsb / seed 0: boom" in text
