"""The method arena: methods x tasks x seeds on one base model, each cell a ``peftkit train`` run.

Every cell runs in its own process (``python -m peftkit train ...``), so its peak memory is its own
and a crash costs one cell, not the sweep. A cell is finished when its folder holds ``metrics.json``;
running the same sweep again skips finished cells (resume) and retries failed ones. A cell writes a
checkpoint every ``save_every`` steps, so an interrupted cell continues from its last one
(``peftkit train --resume``, which ends as an uninterrupted run would) instead of starting again.
Full fine-tuning is always a row: it is the baseline every PEFT method is judged against.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from peftkit.bench.report import NOT_RUN
from peftkit.config import ConfigError, check, get_method
from peftkit.formats.hf_peft import atomic_write_bytes
from peftkit.train.checkpoint import CHECKPOINTS, latest_checkpoint
from peftkit.train.checks import SEED_MAX, check_model_dir, hold_lock, read_json_object
from peftkit.train.data import TASK_SPECS, TASKS, task_key
from peftkit.train.options import resolve_model_dir

FULL = "full"
DEFAULT_METHODS = ("full", "lora", "dora", "ia3", "houlsby", "prompt-tuning", "prefix-tuning", "bitfit")
SHIPPED_TASKS = ("sst2", "rte", "cola", "stsb")
PAIR_TASKS = ("rte", "mrpc", "stsb")


@dataclass
class BenchConfig:
    """A sweep.

    Args:
        methods: method names (``peftkit methods``; aliases become the registered name, repeats are
            dropped); ``full`` (full fine-tuning) is added if missing.
        tasks: GLUE task names (``sst2``, ``rte``, ``cola``, ``stsb``; ``mrpc`` needs ``data_dir``); repeats dropped.
        seeds: one cell per seed, each in 0..2**32 - 1; repeats dropped.
        output_dir: where ``cells/<method>/<task>/seed<k>/`` and the report go.
        model / data_dir: passed to every run.
        max_steps, batch_size: per cell. max_length: tokens per row (default 64 for single sentences,
            128 for sentence pairs).
        train_args: extra ``peftkit train`` arguments for every cell, e.g. ``["--r", "16"]``.
        save_every: a cell writes a resumable checkpoint every this many steps (default 100; 0: never),
            so a sweep interrupted mid-cell loses fewer than ``save_every`` steps of it. The time spent
            writing checkpoints is not counted in step times, and a finished cell's checkpoints are
            deleted. Not a cell setting: resumed cells equal uninterrupted ones.
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
    save_every: int = 100

    def __post_init__(self) -> None:
        """Canonical names, repeats dropped (``lora,LoRA`` is one method). Raises ConfigError (unknown method
        or task, a bad seed or size) or FileNotFoundError (``model`` is not a model folder), before any cell runs."""
        for name in ("methods", "tasks", "seeds", "train_args"):
            value = getattr(self, name)
            check(isinstance(value, (list, tuple)) and not isinstance(value, str),
                  f"{name}={value!r} is not valid; give a list" + (" of names" if name != "seeds" else " of integers"))
        check(all(isinstance(a, str) for a in self.train_args),
              f"train_args={self.train_args!r} must be a list of strings (e.g. ['--r=16'])")
        check(bool(self.methods) and bool(self.tasks) and bool(self.seeds), "methods, tasks and seeds must be non-empty")
        for name in ("max_steps", "batch_size", "max_length"):
            value = getattr(self, name)
            check((value is None and name == "max_length")
                  or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                  f"{name}={value!r} must be an integer >= 1")
        # get_method raises ConfigError naming the registered methods
        methods = [FULL if m.lower() == FULL else get_method(m).name for m in self.methods]
        self.methods = _unique([FULL, *methods] if FULL not in methods else methods)
        for t in self.tasks:
            check(task_key(t) in TASKS, f"unknown task {t!r}; the arena's tasks: {', '.join(TASKS)}")
        self.tasks = _unique([task_key(t) for t in self.tasks])
        for s in self.seeds:
            check(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX,
                  f"seed {s!r} must be an integer in 0..{SEED_MAX}")
        self.seeds = _unique(self.seeds)
        check(isinstance(self.save_every, int) and not isinstance(self.save_every, bool) and self.save_every >= 0,
              f"save_every={self.save_every!r} must be an integer >= 0 (0: no checkpoints)")
        if self.model is not None:
            check_model_dir(resolve_model_dir(self.model, self.tasks[0]))
        if "mrpc" in self.tasks:
            check(self.data_dir is not None, "task 'mrpc' is not shipped (Microsoft's licence); pass --data-dir "
                                             "pointing at a folder with MRPC/{train,dev}.tsv")
        if self.data_dir is not None:  # it replaces the shipped data for every task
            missing = [f for t in self.tasks for f in TASK_SPECS[t].missing_files(self.data_dir)]
            check(not missing, f"--data-dir {self.data_dir} lacks {missing} (it holds every task's data, the shipped "
                               "tasks' too); give a GLUE folder with <TASK>/{train,dev}.tsv for each task")
        # saved absolute, so that the cells' run folders can be evaluated (and the sweep resumed) from anywhere
        for name in ("model", "data_dir"):
            value = getattr(self, name)
            if value is not None and Path(value).exists():
                setattr(self, name, str(Path(value).resolve()))
        options = _train_options()
        resolved = {a: _resolve_option(a.split("=", 1)[0], options) for a in self.train_args if a.startswith("--")}
        owned = [a for a, r in resolved.items() if r in OWN_OPTIONS]
        check(not owned, f"train_args {owned} repeat options the sweep sets itself ({', '.join(OWN_OPTIONS)}); "
                         "set them on the sweep (e.g. --max-steps) instead")
        self._check_cells()

    def _check_cells(self) -> None:
        """Run ``peftkit train``'s own checks on the command line of one cell per method and task kind, so that
        a bad ``train_args`` value (``--lora-dropout=1.5``, ``--device=cuda`` without a GPU) is refused before
        the sweep starts instead of failing every cell with the message hidden in its log."""
        from peftkit.cli import check_cell_command

        for method in self.methods:
            for task in _unique([t if t in PAIR_TASKS else "sst2" for t in self.tasks]):
                argv = cell_command(self, Cell(method, task, self.seeds[0]), Path(self.output_dir) / "check")[3:]
                try:
                    check_cell_command(argv)
                except ConfigError as err:
                    what = f"--train-arg {' '.join(self.train_args)!r}" if self.train_args else "the settings"
                    raise ConfigError(f"{what} is not valid for `peftkit train`: {err}") from None

    def check_folder(self) -> None:
        """Refuse to add cells to a sweep folder whose finished cells ran with other settings (steps, batch,
        length, model, data or extra arguments): its report would describe them wrongly. Methods, tasks
        and seeds may differ (cells are added). Raises ConfigError naming the settings that differ, or when
        ``output_dir`` is an existing file."""
        check(not Path(self.output_dir).exists() or Path(self.output_dir).is_dir(),
              f"--output-dir {self.output_dir!r} is a file, not a folder; give a new folder or the folder of a "
              "sweep to resume")
        saved = Path(self.output_dir) / "bench_config.json"
        if not saved.is_file():
            root = Path(self.output_dir)
            # a sweep's own cells (say, copied without their bench_config.json) are no one else's files
            others = sorted(p.name for p in root.iterdir() if p.name != "cells") if root.is_dir() else []
            check(not others, f"--output-dir {self.output_dir!r} holds other files ({', '.join(others[:5])}"
                              f"{', ...' if len(others) > 5 else ''}) and no sweep (no bench_config.json); the sweep "
                              "would write over them: give a new or empty folder, or the folder of a sweep to resume")
            return
        old = read_json_object(saved, "it holds the sweep's settings, written by `peftkit bench`; move the folder away "
                                      "and run the sweep again")
        differ = [f"{k}: {old.get(k)!r} there, {getattr(self, k)!r} now" for k in CELL_SETTINGS
                  if not _same_setting(k, old.get(k), getattr(self, k))]
        check(not differ, f"{self.output_dir} holds a sweep run with other settings ({'; '.join(differ)}); "
                          "use another --output-dir, or the same settings to resume it")


def _same_setting(key: str, saved: Any, now: Any) -> bool:
    """Whether a sweep folder's saved setting is this one: a path saved relative (by a sweep started before
    paths were saved absolute) is the same folder when it resolves to it from here."""
    if saved == now:
        return True
    if key in ("model", "data_dir") and isinstance(saved, str) and isinstance(now, str):
        return Path(saved).exists() and Path(saved).resolve() == Path(now).resolve()
    return False


@dataclass
class Cell:
    """One run of the sweep: a canonical method name (or ``"full"``), a task and a seed."""

    method: str
    task: str
    seed: int

    def folder(self, root: Path) -> Path:
        """The cell's run folder in the sweep folder ``root``: ``root/cells/<method>/<task>/seed<seed>``."""
        return root / "cells" / self.method / self.task / f"seed{self.seed}"


def _unique(values: list) -> list:
    """``values`` without repeats, in first-seen order (each cell has one folder)."""
    return list(dict.fromkeys(values))


def _train_options() -> list[str]:
    """The option strings of ``peftkit train``."""
    from peftkit.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [s for a in commands.choices["train"]._actions for s in a.option_strings]


def _resolve_option(name: str, options: list[str]) -> str | None:
    """The option ``name`` means to ``peftkit train``'s parser: itself, or the one option it abbreviates (argparse
    takes unique prefixes, so ``--max-st`` is ``--max-steps``); ``name`` itself when it fits several or none
    (the parser then refuses it, see :func:`peftkit.cli`'s check of ``--train-arg``)."""
    if name in options:
        return name
    fits = [o for o in options if o.startswith(name)]
    return fits[0] if len(fits) == 1 else name


#: ``peftkit train`` options each cell gets from the sweep, which ``train_args`` may not repeat
OWN_OPTIONS = ("--task", "--seed", "--max-steps", "--batch-size", "--max-length", "--output-dir", "--overwrite",
               "--full-finetune", "--method", "--model", "--data-dir", "--epochs", "--save-every", "--resume")
#: exit statuses of a cell that was interrupted (Ctrl-C: ``peftkit``'s own 130, or killed by SIGINT/SIGTERM)
INTERRUPTED = (130, -2, -15)
#: exit status of ``peftkit train`` refusing its options, data or files before it trains (a checkpoint
#: that cannot be resumed is refused so)
REFUSED = 2
#: the settings every cell of one sweep folder shares
CELL_SETTINGS = ("model", "data_dir", "max_steps", "batch_size", "max_length", "train_args")
# what the report reads of every finished cell's metrics.json, besides its metric
REPORTED = ("trainable_params", "total_params", "seconds_per_step", "peak_memory_mib")


def cells(cfg: BenchConfig) -> list[Cell]:
    """All cells of the sweep ``cfg`` (methods x tasks x seeds), task-major so that a partial sweep covers whole
    tasks first."""
    return [Cell(m, t, s) for t in cfg.tasks for s in cfg.seeds for m in cfg.methods]


def cell_command(cfg: BenchConfig, cell: Cell, folder: Path) -> list[str]:
    """The ``peftkit train`` command line of one cell (``--overwrite``: a retried cell's folder holds the
    failed run's files and the cell's own log)."""
    max_length = cfg.max_length or (128 if cell.task in PAIR_TASKS else 64)
    cmd = [sys.executable, "-m", "peftkit", "train", "--task", cell.task, "--seed", str(cell.seed),
           "--max-steps", str(cfg.max_steps), "--batch-size", str(cfg.batch_size), "--max-length", str(max_length),
           "--output-dir", str(folder), "--overwrite", "--no-progress"]
    cmd += ["--full-finetune"] if cell.method == FULL else ["--method", cell.method]
    if cfg.model:
        cmd += ["--model", cfg.model]
    if cfg.data_dir:
        cmd += ["--data-dir", cfg.data_dir]
    if 0 < cfg.save_every < cfg.max_steps:
        cmd += ["--save-every", str(cfg.save_every)]
    # a --train-arg that this cell's method does not use (--r for prefix tuning) warns instead of failing
    return cmd + (["--unused-options-warn", *cfg.train_args] if cfg.train_args else [])


def resume_command(folder: Path) -> list[str] | None:
    """The command that continues the interrupted cell in ``folder`` from its latest checkpoint, or None
    when it has no usable one (never checkpointed, or a damaged pointer: the cell starts again)."""
    try:
        if not (folder / "run_config.json").is_file() or latest_checkpoint(folder) is None:
            return None
    except ConfigError:
        return None
    return [sys.executable, "-m", "peftkit", "train", "--resume", str(folder), "--no-progress"]


def run_sweep(cfg: BenchConfig, progress: bool = True, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every unfinished cell, then return one record per cell (finished or failed).

    Args:
        cfg: the sweep.
        progress: show which cells run and how long is left.
        jobs: cells run at once; each gets ``cpu_count // jobs`` threads (``OMP_NUM_THREADS``), so
            step times compare fairly within a sweep but not across sweeps with another ``jobs``.

    A cell's record is its ``metrics.json`` plus ``adapter_bytes`` (size of what it saved) and its
    coordinates; a failed cell has ``error`` (the last line the run printed).

    An unfinished cell with a checkpoint is continued from it; only when ``peftkit train --resume``
    refuses the checkpoint (exit status 2) is the cell trained again from step 0. A cell that fails
    otherwise keeps its checkpoints for the next run, and the other cells go on.

    Each cell runs as a ``peftkit train`` process in a session of its own, holding a lock on its folder
    (``.lock``; its process inherits it), so a cell is never trained by two processes at once.

    Raises:
        ConfigError: ``jobs`` < 1, the folder holds a sweep with other settings, or a cell to run is held by
            another process (nothing starts then).
        KeyboardInterrupt: Ctrl-C or SIGTERM to the sweep (passed on to the running cells), or a cell was
            interrupted (SIGINT, SIGTERM); the running cells stop and keep their checkpoints, and no further
            cell starts.
    """
    check(jobs >= 1, f"jobs={jobs!r} must be >= 1")
    root = Path(cfg.output_dir)
    cfg.check_folder()
    root.mkdir(parents=True, exist_ok=True)
    # rewritten by every run of the sweep: a half-written one (a full disk, Ctrl-C) would make it unresumable
    atomic_write_bytes(root / "bench_config.json", (json.dumps({**asdict(cfg), "jobs": jobs}, indent=2) + "\n").encode())
    todo = [c for c in cells(cfg) if not (c.folder(root) / "metrics.json").is_file()]
    done = len(cells(cfg)) - len(todo)
    bar = tqdm(total=len(cells(cfg)), initial=done, desc="bench", unit="cell", disable=not progress,
               dynamic_ncols=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if jobs > 1:
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    running: set[str] = set()
    stop = threading.Event()  # set by an interruption: no further cell starts
    children: dict[subprocess.Popen, None] = {}
    guard = threading.Lock()
    locks: dict[Path, int | None] = {}
    try:  # every cell to run is locked before any starts
        for c in todo:
            locks[c.folder(root)] = _lock_cell(c.folder(root))
    except BaseException:
        for fd in locks.values():
            _unlock(fd)
        bar.close()
        raise

    def halt(sig: int) -> None:
        """Pass an interruption on to the running cells (once; they run in sessions of their own)."""
        stop.set()
        with guard:
            procs = list(children)
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def run(cmd: list[str], folder: Path, append: bool, note: str = "") -> int:
        with open(folder / "cell.log", "a" if append else "w", encoding="utf-8") as log:
            if note:
                log.write(f"\n[bench] {note}\n")
                log.flush()
            fd = locks[folder]
            # a session of its own: an interruption reaches it once, from here (the terminal's Ctrl-C would
            # reach it too); the cell's lock goes with it, so a cell left running is never started twice
            with guard:
                if stop.is_set():
                    return 130
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                        pass_fds=() if fd is None else (fd,))
                children[proc] = None
            try:
                return proc.wait()
            finally:
                with guard:
                    children.pop(proc, None)

    def run_cell(cell: Cell) -> None:
        if stop.is_set():
            return
        folder = cell.folder(root)
        label = f"{cell.method}/{cell.task}/seed{cell.seed}"
        running.add(label)
        bar.set_postfix_str("running " + ", ".join(sorted(running)))
        resume = resume_command(folder)
        if resume is None:
            rc = run(cell_command(cfg, cell, folder), folder, append=False)
        else:  # the log of the interrupted session is kept
            rc = run(resume, folder, append=True, note=f"continuing the interrupted cell: {' '.join(resume[1:])}")
            if rc == REFUSED:  # the checkpoint could not be resumed (the log says why): train from step 0
                rc = run(cell_command(cfg, cell, folder), folder, append=True,
                         note="resuming was refused; training the cell again from the start")
        if rc in INTERRUPTED:  # the cell keeps its checkpoints for the next run; no other cell starts
            stop.set()
        elif rc == 0:  # only a finished cell's checkpoints go: an unfinished one resumes from them
            shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)
        (folder / "error.txt").unlink(missing_ok=True)
        if rc != 0 and rc not in INTERRUPTED:  # an interrupted cell is unfinished, not failed: it is continued
            lines = (folder / "cell.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            (folder / "error.txt").write_text((lines[-1] if lines else f"exit status {rc}") + "\n")
        running.discard(label)
        _unlock(locks.pop(folder, None))
        bar.update(1)

    def on_term(signum: int, frame: Any) -> None:
        halt(signal.SIGTERM)
        raise KeyboardInterrupt("terminated")

    previous = None
    if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
        previous = signal.signal(signal.SIGTERM, on_term)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        list(pool.map(run_cell, todo))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the running cells, wait for them, start no other
        halt(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for fd in locks.values():
            _unlock(fd)
    pool.shutdown()
    bar.close()
    if stop.is_set():
        raise KeyboardInterrupt("a cell was interrupted; run the sweep again to continue it")
    return collect(cfg)


def _lock_cell(folder: Path) -> int | None:
    """An open, exclusively locked ``.lock`` file in the cell's folder (made here), held until the cell ends;
    the cell's training process inherits it, so it stays locked while that process runs. None where file
    locks are not available.

    Raises:
        ConfigError: another process holds the cell (a sweep running it, or a cell left running).
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return hold_lock(folder / ".lock")  # (a file: the cell's `peftkit train` locks the folder itself)
    except BlockingIOError:
        raise ConfigError(f"the cell in {folder} is being trained by another process (a sweep running in the same "
                          "folder, or a cell left running): wait for it to end or stop it, then run the sweep "
                          "again") from None


def _unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)  # (a cell's process that still runs keeps its own copy, and the lock)
        except OSError:
            pass


def _saved_bytes(folder: Path, method: str) -> int:
    if method == FULL:
        return sum(p.stat().st_size for p in (folder / "model").glob("*.safetensors"))
    return sum((folder / n).stat().st_size for n in ("adapter_model.safetensors", "adapter_config.json")
               if (folder / n).is_file())


def collect(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Records of every cell of ``cfg`` from disk (see :func:`run_sweep`).

    Raises:
        ConfigError: a cell's ``metrics.json`` is damaged (not a JSON object, no metric with its value, or a
            reported field missing); the message says to delete the cell's folder and run the sweep again.
    """
    root = Path(cfg.output_dir)
    out = []
    for cell in cells(cfg):
        folder = cell.folder(root)
        record: dict[str, Any] = {"method": cell.method, "task": cell.task, "seed": cell.seed}
        if (folder / "metrics.json").is_file():
            redo = "delete the cell's folder and run the sweep again to redo it"
            record.update(read_json_object(folder / "metrics.json", f"it holds a finished cell's results; {redo}"))
            metric = record.get("metric")
            check(isinstance(metric, str) and isinstance(record.get(f"dev_{metric}"), (int, float)),
                  f"{folder / 'metrics.json'} is damaged: it names no metric with its value (metric="
                  f"{metric!r}); {redo}")
            lacking = [k for k in REPORTED if not isinstance(record.get(k), (int, float))]
            check(not lacking, f"{folder / 'metrics.json'} is damaged: it lacks {', '.join(lacking)}; {redo}")
            record["method"] = cell.method
            record["adapter_bytes"] = _saved_bytes(folder, cell.method)
        elif (folder / "error.txt").is_file():
            record["error"] = (folder / "error.txt").read_text().strip()
        else:
            record["error"] = NOT_RUN
        out.append(record)
    return out
