"""The method arena: methods x tasks x seeds on one base model, each cell a ``peftkit train`` run.

Every cell runs in its own process (``python -m peftkit train ...``), so its peak memory is its own
and a crash costs one cell, not the sweep. A cell is finished when its folder holds ``metrics.json``;
running the same sweep again skips finished cells (resume) and retries failed ones. Full fine-tuning
is always a row: it is the baseline every PEFT method is judged against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from peftkit.config import check, get_method

FULL = "full"
DEFAULT_METHODS = ("full", "lora", "dora", "ia3", "houlsby", "prompt-tuning", "prefix-tuning", "bitfit")
SHIPPED_TASKS = ("sst2", "rte", "cola", "stsb")
PAIR_TASKS = ("rte", "mrpc", "stsb")


@dataclass
class BenchConfig:
    """A sweep.

    Args:
        methods: method names (``peftkit methods``); ``full`` (full fine-tuning) is added if missing.
        tasks: GLUE task names; ``mrpc`` needs ``data_dir``.
        seeds: one cell per seed.
        output_dir: where ``cells/<method>/<task>/seed<k>/`` and the report go.
        model / data_dir: passed to every run.
        max_steps, batch_size: per cell. max_length: tokens per row (default 64 for single sentences,
            128 for sentence pairs).
        train_args: extra ``peftkit train`` arguments for every cell, e.g. ``["--r", "16"]``.
    """

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tasks: list[str] = field(default_factory=lambda: list(SHIPPED_TASKS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    output_dir: str = "bench"
    model: str | None = None
    data_dir: str | None = None
    max_steps: int = 300
    batch_size: int = 32
    max_length: int | None = None
    train_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(bool(self.methods) and bool(self.tasks) and bool(self.seeds), "methods, tasks and seeds must be non-empty")
        if FULL not in self.methods:
            self.methods = [FULL, *self.methods]
        for m in self.methods:
            if m != FULL:
                get_method(m)  # raises ConfigError naming the registered methods
        check(self.max_steps >= 1, f"max_steps={self.max_steps!r} must be >= 1")
        if "mrpc" in self.tasks:
            check(self.data_dir is not None, "task 'mrpc' is not shipped (Microsoft's licence); pass --data-dir "
                                             "pointing at a folder with MRPC/{train,dev}.tsv")


@dataclass
class Cell:
    method: str
    task: str
    seed: int

    def folder(self, root: Path) -> Path:
        return root / "cells" / self.method / self.task / f"seed{self.seed}"


def cells(cfg: BenchConfig) -> list[Cell]:
    """All cells of the sweep, task-major so that a partial sweep covers whole tasks first."""
    return [Cell(m, t, s) for t in cfg.tasks for s in cfg.seeds for m in cfg.methods]


def cell_command(cfg: BenchConfig, cell: Cell, folder: Path) -> list[str]:
    """The ``peftkit train`` command line of one cell."""
    max_length = cfg.max_length or (128 if cell.task in PAIR_TASKS else 64)
    cmd = [sys.executable, "-m", "peftkit", "train", "--task", cell.task, "--seed", str(cell.seed),
           "--max-steps", str(cfg.max_steps), "--batch-size", str(cfg.batch_size), "--max-length", str(max_length),
           "--output-dir", str(folder), "--no-progress"]
    cmd += ["--full-finetune"] if cell.method == FULL else ["--method", cell.method]
    if cfg.model:
        cmd += ["--model", cfg.model]
    if cfg.data_dir:
        cmd += ["--data-dir", cfg.data_dir]
    return cmd + list(cfg.train_args)


def run_sweep(cfg: BenchConfig, progress: bool = True, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every unfinished cell, then return one record per cell (finished or failed).

    Args:
        cfg: the sweep.
        progress: show which cells run and how long is left.
        jobs: cells run at once; each gets ``cpu_count // jobs`` threads (``OMP_NUM_THREADS``), so
            step times compare fairly within a sweep but not across sweeps with another ``jobs``.

    A cell's record is its ``metrics.json`` plus ``adapter_bytes`` (size of what it saved) and its
    coordinates; a failed cell has ``error`` (the last line the run printed).
    """
    check(jobs >= 1, f"jobs={jobs!r} must be >= 1")
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    todo = [c for c in cells(cfg) if not (c.folder(root) / "metrics.json").is_file()]
    done = len(cells(cfg)) - len(todo)
    bar = tqdm(total=len(cells(cfg)), initial=done, desc="bench", unit="cell", disable=not progress,
               dynamic_ncols=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if jobs > 1:
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    running: set[str] = set()

    def run_cell(cell: Cell) -> None:
        folder = cell.folder(root)
        folder.mkdir(parents=True, exist_ok=True)
        label = f"{cell.method}/{cell.task}/seed{cell.seed}"
        running.add(label)
        bar.set_postfix_str("running " + ", ".join(sorted(running)))
        with open(folder / "cell.log", "w", encoding="utf-8") as log:
            rc = subprocess.run(cell_command(cfg, cell, folder), stdout=log, stderr=subprocess.STDOUT,
                                env=env).returncode
        (folder / "error.txt").unlink(missing_ok=True)
        if rc != 0:
            lines = (folder / "cell.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            (folder / "error.txt").write_text((lines[-1] if lines else f"exit status {rc}") + "\n")
        running.discard(label)
        bar.update(1)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run_cell, todo))
    bar.close()
    return collect(cfg)


def _saved_bytes(folder: Path, method: str) -> int:
    if method == FULL:
        return sum(p.stat().st_size for p in (folder / "model").glob("*.safetensors"))
    return sum((folder / n).stat().st_size for n in ("adapter_model.safetensors", "adapter_config.json")
               if (folder / n).is_file())


def collect(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Records of every cell of ``cfg`` from disk (see :func:`run_sweep`)."""
    root = Path(cfg.output_dir)
    out = []
    for cell in cells(cfg):
        folder = cell.folder(root)
        record: dict[str, Any] = {"method": cell.method, "task": cell.task, "seed": cell.seed}
        if (folder / "metrics.json").is_file():
            record.update(json.loads((folder / "metrics.json").read_text()))
            record["method"] = cell.method
            record["adapter_bytes"] = _saved_bytes(folder, cell.method)
        elif (folder / "error.txt").is_file():
            record["error"] = (folder / "error.txt").read_text().strip()
        else:
            record["error"] = "not run"
        out.append(record)
    return out
