"""The ``peftkit`` command line: ``train``, ``eval``, ``predict``, ``methods``, ``merge``, ``export``, ``bench``.

``peftkit train`` with no options fine-tunes the embedded all-MiniLM-L6-v2 with LoRA on SST-2 and
prints a summary; see ``peftkit train --help``. ``torchrun --nproc-per-node N -m peftkit train ...``
(or ``accelerate launch -m peftkit train ...``) trains on N processes, ``--resume RUN_DIR``
continues an interrupted run. Errors in options, data or files are reported in one
line (``peftkit: error: ...``) with exit status 2, before anything is written; any other failure in
one line too (``peftkit: error: <Type>: ...``, exit status 1; ``PEFTKIT_TRACEBACK=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from peftkit.bench.arena import DEFAULT_METHODS as DEFAULT_BENCH_METHODS
from peftkit.bench.report import NOT_RUN
from peftkit.config import ConfigError, all_methods, check, get_method
from peftkit.formats.hf_peft import AdapterLoadError
from peftkit.targeting import UnmatchedTargetWarning
from peftkit.train.checks import SEED_MAX, read_json_object

DEFAULT_STEPS = 800


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``peftkit: error: ...``, exit status 2) instead of a usage block;
    ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"peftkit: error: {_one_line(message)} (see `{self.prog} --help`)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                   ) -> argparse.Namespace:
        """As argparse's, but an option no sub-command takes is reported with that sub-command's help (the
        top-level parser, which finds them, pointed to `peftkit --help`)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            action = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
            chosen = action.choices.get(getattr(ns, "command", None)) if action is not None else None
            (chosen or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def _target_modules(value: str) -> list[str] | str:
    """``a,b,c`` -> list; ``all-linear`` or anything with regex characters stays a string (a regex)."""
    if value == "all-linear" or any(ch in value for ch in "*?[]()|\\^$+"):
        try:
            re.compile(value)
        except re.error as err:
            raise argparse.ArgumentTypeError(f"{value!r} is read as a regular expression, and it is not a valid "
                                             f"one ({err}); give names separated by commas or a valid regex") from None
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:  # an empty list would fall back to the method's default targets
        raise argparse.ArgumentTypeError(f"{value!r} names no module; give module names separated by commas, "
                                         "all-linear, or a regex")
    return names


def _option(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _int_at_least(low: int, words: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, else an error saying ``expected <words>, got '<value>'``."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {words}, got {value!r}")
        return n
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "an integer >= 0")


def _task_name(value: str) -> str:
    """A ``--task`` value in its canonical spelling (``SST-2`` -> ``sst2``, ``causal_lm`` -> ``causal-lm``), so
    that folder names, run_config.json and metrics agree; an unknown name is kept for the task loader's error."""
    from peftkit.train.data import TASKS, task_key

    if not value.strip():
        raise argparse.ArgumentTypeError("expected a task name (sst2, rte, cola, stsb, mrpc or causal-lm), got ''")
    key = task_key(value)
    return "causal-lm" if key == "causallm" else key if key in TASKS else value


def _weight(value: str) -> float:
    """One ``merge --weights`` entry; the error shows where the weights go."""
    try:
        float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a finite number, got {value!r}: give one number per adapter, space-separated, after the adapter "
            "folders (peftkit merge A B --weights 0.5 0.5 --output OUT)") from None
    return _finite_float(value)


def _finite_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return x


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}")
    return x


def _seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed in 0..{SEED_MAX}, got {value!r}") from None
    if not 0 <= n <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer seed in 0..{SEED_MAX}, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The ``peftkit`` argument parser with its sub-commands (``train``, ``eval``, ``predict``, ``methods``,
    ``merge``, ``bench``, ``export``); invalid options exit with status 2 and a one-line ``peftkit: error: ...``."""
    parser = _Parser(prog="peftkit", description="Parameter-efficient fine-tuning of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model with a PEFT method (default: LoRA, MiniLM, SST-2)",
                       description="Fine-tune a model and write a run folder (adapter, metrics.json, "
                                   "run_config.json, train.log). With no options: LoRA on the embedded "
                                   "all-MiniLM-L6-v2 for SST-2, evaluated on the SST-2 dev set.")
    t.add_argument("--model", help="local HF model folder or a shipped model (stories260K) (default: embedded "
                                   "all-MiniLM-L6-v2; stories260K for causal-lm)")
    t.add_argument("--method", default="lora", help="PEFT method (see `peftkit methods`; default lora)")
    t.add_argument("--task", type=_task_name, help="sst2, rte, cola, stsb, mrpc or causal-lm (default sst2; with --train-file "
                                  "only causal-lm may be given: otherwise the file is the task)")
    t.add_argument("--train-file", help="CSV/TSV/JSONL training file (text + label columns); for causal-lm also "
                                        ".txt, or rows with text or prompt/response (default: shipped TREC)")
    t.add_argument("--eval-file", help="CSV/TSV/JSONL dev file for the reported metrics")
    t.add_argument("--text-column", help="text column (default: sentence, text or sentence1)")
    t.add_argument("--pair-column", help="second-sentence column for sentence-pair tasks")
    t.add_argument("--label-column", default="label", help="label column (default label)")
    t.add_argument("--data-dir", help="folder with GLUE task folders (needed for mrpc)")
    t.add_argument("--r", "--lora-r", dest="r", type=_positive_int,
                   help="adapter rank (default: the method's, 8 for LoRA, 256 for VeRA); --lora-r under torchrun, "
                        "whose own parser takes --r for one of its options")
    t.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="LoRA alpha (default 16)")
    t.add_argument("--lora-dropout", type=_finite_float, default=0.0, help="LoRA dropout (default 0)")
    t.add_argument("--target-modules", type=_target_modules, default=None,
                   help="comma-separated names/suffixes, a regex, or all-linear (default: the method's own, "
                        "all-linear for LoRA; the adapter sites for bottleneck adapters)")
    t.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra method config field, JSON value (e.g. --option use_rslora=true); repeatable")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate (default: the method's, 1e-3 for most; 5e-5 full fine-tune)")
    t.add_argument("--loraplus-lr-ratio", type=_positive_float, metavar="RATIO",
                   help="LoRA+: train lora_B at --lr times RATIO (the paper suggests 2 to 16; LoRA-family methods)")
    t.add_argument("--epochs", type=_positive_float, help="passes over the training data")
    t.add_argument("--max-steps", type=_positive_int,
                   help=f"optimiser steps (default {DEFAULT_STEPS} unless --epochs is given)")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="rows per step (default 32)")
    t.add_argument("--max-length", type=_positive_int, default=64, help="tokens per row (default 64)")
    t.add_argument("--max-train-samples", type=_positive_int, help="use only N training examples")
    t.add_argument("--max-eval-samples", type=_positive_int, help="evaluate on the first N dev examples")
    t.add_argument("--seed", type=_seed, default=0, help=f"random seed, 0..{SEED_MAX} (default 0)")
    t.add_argument("--output-dir", help="run folder, new or empty (default runs/<method>-<task>-<time>)")
    t.add_argument("--overwrite", action="store_true",
                   help="--output-dir may hold an earlier run: its run files (adapter, model/, metrics.json, "
                        "run_config.json, train.log, checkpoints/) are replaced, and put back if the new run "
                        "fails before its first checkpoint (after one, the new run is kept for --resume); other "
                        "files are kept")
    t.add_argument("--full-finetune", action="store_true", help="train all parameters (the baseline)")
    t.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    t.add_argument("--quantize", choices=("nf4", "int8", "int4"),
                   help="store the frozen base's linear weights quantised (nf4 + LoRA = QLoRA); default float32")
    t.add_argument("--float-embeddings", action="store_true",
                   help="with --quantize, keep the embedding tables float32 (quantised by default: they are half "
                        "of a small encoder such as MiniLM; tied tables always stay float)")
    t.add_argument("--quantize-embeddings", action="store_true", help=argparse.SUPPRESS)  # old spelling; now the default
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    # `peftkit bench` passes its --train-arg options to every cell; a cell whose method does not use one of
    # them (--r for prefix tuning, full fine-tuning) runs with a warning instead of failing
    t.add_argument("--unused-options-warn", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--save-every", type=_positive_int, metavar="N",
                   help="write a resumable checkpoint (safetensors + JSON) every N steps")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the interrupted run in RUN_DIR from its last checkpoint, with its own "
                        "options (only --device and --no-progress may be given with it)")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun/accelerate launch: shard the model with FSDP2 instead of DDP")

    e = sub.add_parser("eval", help="reload a run folder and report its dev metrics again",
                       description="Reload a run folder written by `peftkit train` (or `merge`) and report its dev "
                                   "metrics again, or those of another file (--eval-file).")
    e.add_argument("--adapter", required=True, metavar="RUN_DIR", help="folder written by `peftkit train`")
    e.add_argument("--eval-file", help="evaluate on this whole file instead of the run's dev set (labels as in "
                                       "the run's data: class ids, or class names)")
    e.add_argument("--text-column", help="--eval-file's text column (default: sentence, text or sentence1)")
    e.add_argument("--pair-column", help="--eval-file's second-sentence column (pair tasks)")
    e.add_argument("--label-column", help="--eval-file's label column (default: as the run was trained)")
    e.add_argument("--device", help="cpu, cuda, ...")

    p = sub.add_parser("predict", help="serve a trained run: labels, scores or generated text for new inputs",
                       description="Load a run folder (base model + adapter, or the fully fine-tuned model) and "
                                   "print one line per input: the class and its probability, the score "
                                   "(STS-B), or the greedy continuation of a prompt (causal-LM runs). Inputs "
                                   "are the TEXT arguments, else the lines of --input (- or none: standard "
                                   "input); for a sentence-pair task, the two sentences of an input are "
                                   "separated by a tab. A .jsonl, .csv or .tsv --input is a table: one input "
                                   "per row, from its text (and pair) column.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="inputs (default: read from --input)")
    p.add_argument("--adapter", required=True, metavar="RUN_DIR", help="folder written by `peftkit train`")
    p.add_argument("--input", metavar="FILE", help="UTF-8 text file, one input per line (- : standard input); or a "
                                                   ".jsonl/.csv/.tsv table, one input per row")
    p.add_argument("--text-column", help="a table --input's text column (default: the run's, else sentence, text or "
                                         "sentence1; causal-LM runs: prompt, else text)")
    p.add_argument("--pair-column", help="a table --input's second-sentence column (pair tasks; default: the run's, "
                                         "else sentence2)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input instead of tab-separated "
                                                       "columns")
    p.add_argument("--max-new-tokens", type=_positive_int,
                   help="causal-LM runs: most tokens generated per prompt (default 32)")
    p.add_argument("--batch-size", type=_positive_int, help="classification: inputs per forward (default 32)")
    p.add_argument("--device", help="cpu, cuda, ...")

    sub.add_parser("methods", help="list every registered PEFT method",
                   description="List every registered PEFT method: name, family, whether it merges, and its paper.")

    m = sub.add_parser("merge", help="combine saved LoRA or (IA)^3 adapters into a new adapter folder",
                       description="Combine LoRA adapters (run folders or HF PEFT adapter folders) into a new "
                                   "adapter: cat (exact), svd, linear, ties, dare_linear, dare_ties, "
                                   "magnitude_prune and the *_svd forms, as in peft's add_weighted_adapter; or "
                                   "(IA)^3 adapters, linearly (their vectors' weighted sum).")
    m.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="two or more adapter folders")
    m.add_argument("--weights", type=_weight, nargs="+",
                   help="one weight per adapter, space-separated, after the adapter folders (default: all 1)")
    m.add_argument("--combination", help="combination type (default: cat for LoRA, linear for (IA)^3)")
    m.add_argument("--output", required=True, help="new adapter folder (new or empty unless --overwrite)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that holds an earlier merge or export (a folder with other files is "
                        "refused)")
    m.add_argument("--model", help="base model folder (default: from the first adapter)")
    m.add_argument("--svd-rank", type=_positive_int, help="rank of *svd results (default: largest source rank)")
    m.add_argument("--density", type=_finite_float, help="kept fraction for ties/dare/magnitude_prune")
    m.add_argument("--majority-sign", choices=["total", "frequency"], help="TIES sign election (default total)")
    m.add_argument("--seed", type=_seed, help="seed of DARE's random drops (default 0)")
    m.add_argument("--heads-from", type=int, default=0, help="index of the adapter whose head is kept (default 0)")

    b = sub.add_parser("bench", help="the method arena: methods x tasks x seeds, report.md and plots",
                       description="Train every method on every task with several seeds (each cell a "
                                   "`peftkit train` run in its own process), then write report.md, report.json "
                                   "and PNG plots. Re-running resumes: finished cells are kept, and interrupted "
                                   "ones continue from their last checkpoint.")
    b.add_argument("--methods", default=",".join(DEFAULT_BENCH_METHODS),
                   help="comma-separated methods; full fine-tuning is always included (default "
                        f"{','.join(DEFAULT_BENCH_METHODS)})")
    b.add_argument("--tasks", default="sst2,rte,cola,stsb",
                   help="comma-separated tasks (default sst2,rte,cola,stsb; add mrpc with --data-dir)")
    b.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    b.add_argument("--max-steps", type=_positive_int, default=300, help="steps per cell (default 300)")
    b.add_argument("--batch-size", type=_positive_int, default=32, help="rows per step (default 32)")
    b.add_argument("--max-length", type=_positive_int, help="tokens per row (default 64, 128 for sentence pairs)")
    b.add_argument("--output-dir", default="bench", help="sweep folder (default bench)")
    b.add_argument("--model", help="base model folder (default: embedded all-MiniLM-L6-v2)")
    b.add_argument("--data-dir", help="folder with GLUE task folders (needed for mrpc)")
    b.add_argument("--jobs", type=_positive_int, default=1,
                   help="cells run at once, each with cpu_count/jobs threads (default 1)")
    b.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra `peftkit train` argument for every cell (repeatable, e.g. --train-arg=--r=16)")
    b.add_argument("--save-every", type=_count, default=100, metavar="N",
                   help="each cell writes a checkpoint every N steps, so an interrupted sweep continues its "
                        "unfinished cells from there (default 100; 0: never; writing is not counted as step time)")
    b.add_argument("--report-only", action="store_true",
                   help="only rebuild the report of the sweep in --output-dir from its finished cells (its settings "
                        "are read from the folder; other options are refused)")
    b.add_argument("--no-progress", action="store_true", help="no progress display")

    x = sub.add_parser("export", help="write a plain transformers model with an adapter merged in",
                       description="Write a plain transformers model folder (save_pretrained) with an adapter merged "
                                   "into its base weights, loadable without peftkit.")
    x.add_argument("--adapter", required=True, metavar="DIR", help="run folder or adapter folder")
    x.add_argument("--merge", action="store_true", help="merge the adapter into the weights (required)")
    x.add_argument("--output", required=True, help="model folder to write (new or empty unless --overwrite)")
    x.add_argument("--model", help="base model folder (default: from the adapter)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that holds an earlier export or merge (a folder with other files is "
                        "refused)")
    return parser


def _check_data_options(args: argparse.Namespace, causal_lm: str) -> None:
    """Refuse data options the run would ignore, and an empty ``--output-dir``.

    Raises:
        ConfigError: ``--output-dir ''``; ``--data-dir`` for a causal-LM task or with ``--train-file``; column
            options for a named task without ``--eval-file``; ``--pair-column``/``--label-column`` for causal-LM.
    """
    if args.output_dir is not None and not args.output_dir.strip():
        raise ConfigError(f"--output-dir {args.output_dir!r} is empty; give a folder (or leave the option out for "
                          "runs/<method>-<task>-<time>)")
    if args.data_dir is not None and (args.task == causal_lm or args.train_file):
        raise ConfigError(f"--data-dir {args.data_dir} is read only for the GLUE tasks (sst2, rte, cola, stsb, mrpc); "
                          f"{'a causal-LM run' if args.task == causal_lm else '--train-file'} does not use it")
    columns = {"--text-column": args.text_column, "--pair-column": args.pair_column,
               "--label-column": None if args.label_column == "label" else args.label_column}
    given = [k for k, v in columns.items() if v is not None]
    if args.task == causal_lm:
        unused = [k for k in given if k != "--text-column"]
        if unused:
            raise ConfigError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to causal-LM "
                              "files, whose rows are text (or "
                              "prompt/response); --text-column names the text field")
    elif given and not args.train_file and not args.eval_file:
        raise ConfigError(f"{', '.join(given)} {'names a column' if len(given) == 1 else 'name columns'} of "
                          f"--train-file/--eval-file; task {args.task}'s own files have fixed columns")


def _cmd_train(args: argparse.Namespace) -> int:
    from peftkit.train.run import (
        CAUSAL_LM,
        DEFAULT_CAUSAL_MODEL_NAME,
        DEFAULT_MODEL_NAME,
        resume_run,
        run_training,
    )

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if args.resume:
        # every option given, also at its default value (--seed 0 would otherwise be dropped unread)
        given = _given_options(args.argv)
        changed = [k for k in vars(args) if k in given and k not in ("resume", "device", "no_progress")]
        if changed:
            raise ConfigError(f"--resume continues {args.resume} with the options it was started with; "
                              f"{', '.join('--' + k.replace('_', '-') for k in changed)} cannot be given with it "
                              "(only --device and --no-progress can)")
        if any(os.environ.get(v) for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION")):
            from peftkit.train.run import read_run_config

            _check_accelerate_env(read_run_config(Path(args.resume))[0].fsdp)
        from peftkit.train.run import check_unfinished

        check_unfinished(args.resume)  # before the "resuming" line: the refusal is the only output
        if main_rank:
            print(f"peftkit train: resuming {args.resume}", flush=True)
        return _summary(resume_run(args.resume, progress=not args.no_progress, device=args.device), main_rank)
    cfg = train_config(args)
    model_name = args.model or (DEFAULT_CAUSAL_MODEL_NAME if args.task == CAUSAL_LM else DEFAULT_MODEL_NAME)
    if main_rank:
        print(f"peftkit train: {cfg.label()} on {model_name}, task {args.train_file or cfg.task}", flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UnmatchedTargetWarning)  # a misspelt target fails the run
        result = run_training(cfg, overwrite=args.overwrite)
    return _summary(result, main_rank)


def _given_options(argv: list[str] | None) -> set[str]:
    """The destinations of the options on a ``peftkit train`` command line, whatever their values (parsed
    again with every default suppressed); empty when the command line is not known."""
    if argv is None:
        return set()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices["train"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _check_accelerate_env(fsdp: bool) -> None:
    """Refuse the choices ``accelerate launch`` passes to its workers in the environment, which peftkit does not
    read: a user who asked it for FSDP got full replicas, one who asked for bf16 got float32, silently.

    Raises:
        ConfigError: ``ACCELERATE_USE_FSDP`` true without ``--fsdp`` (``fsdp``), or ``ACCELERATE_MIXED_PRECISION``
            other than ``no``.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("true", "1", "yes") and not fsdp:
        raise ConfigError("accelerate launch --use_fsdp (ACCELERATE_USE_FSDP=true) is not read by peftkit train, which "
                          "would train full replicas: pass --fsdp to peftkit train instead (torch's FSDP, sharded by "
                          "the model's blocks) and launch without --use_fsdp")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if precision not in ("", "no"):
        raise ConfigError(f"accelerate launch --mixed_precision {precision} (ACCELERATE_MIXED_PRECISION) is not read "
                          "by peftkit train, which trains in the model's own dtype: launch with --mixed_precision no")


def train_config(args: argparse.Namespace) -> Any:
    """The :class:`~peftkit.train.RunConfig` of parsed ``peftkit train`` options ``args`` (not ``--resume``), after every
    check that needs no model or data: conflicting or ineffective options, the method and its options
    (``--option``), the device. Paths that exist (``--model``, data files and folders) are made absolute, so
    that the run folder can be evaluated from anywhere. Nothing is written.

    Raises:
        ConfigError: naming the offending option and value.
    """
    from peftkit.train.checks import check_device
    from peftkit.train.run import CAUSAL_LM, RunConfig, build_peft_config

    if args.train_file and args.task not in (None, CAUSAL_LM):
        raise ConfigError(f"--task {args.task} cannot be combined with --train-file, whose rows are the task; leave "
                          "--task out (or give --task causal-lm for a causal-LM file)")
    if args.float_embeddings and not args.quantize:
        raise ConfigError("--float-embeddings only applies with --quantize (it keeps the embeddings float32)")
    _check_accelerate_env(args.fsdp)
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        raise ConfigError("--fsdp shards the model over several processes, and this run would have one (nothing ran); "
                          "start it with torchrun --nproc-per-node N or accelerate launch, or leave --fsdp out")
    if args.epochs and args.max_steps:
        raise ConfigError(f"--epochs {args.epochs:g} and --max-steps {args.max_steps} both set the run's length; "
                          "give one of them")
    args.task = args.task or "sst2"
    _check_data_options(args, CAUSAL_LM)
    max_steps = args.max_steps if args.max_steps or args.epochs else DEFAULT_STEPS
    if not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout {args.lora_dropout!r} must lie in [0, 1)")
    cfg = RunConfig(
        model=args.model, method=args.method, task=args.task, train_file=args.train_file, eval_file=args.eval_file,
        text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
        data_dir=args.data_dir, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules, method_options=dict(args.option), lr=args.lr,
        epochs=args.epochs or 1.0, max_steps=max_steps, batch_size=args.batch_size, max_length=args.max_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, seed=args.seed,
        output_dir=args.output_dir, full_finetune=args.full_finetune, device=args.device,
        progress=not args.no_progress, save_every=args.save_every, fsdp=args.fsdp, quantize=args.quantize,
        quantize_embeddings=not args.float_embeddings, loraplus_lr_ratio=args.loraplus_lr_ratio,
    )
    if not args.full_finetune:
        get_method(args.method)  # an unknown method fails before the header line
    given = _given_options(getattr(args, "argv", None))
    for key in METHOD_OPTIONS:  # also a flag given at its default value: --lora-alpha 16 --option lora_alpha=32
        check(not (key in given and key in cfg.method_options),
              f"--{key.replace('_', '-')} and --option {key}=... both set {key}; give one of them")
    try:
        _check_options_take_effect(cfg)
    except ConfigError as err:
        if not args.unused_options_warn:
            raise
        warnings.warn(f"{err} (running without it: this is a `peftkit bench` cell)", stacklevel=1)
    if cfg.loraplus_lr_ratio is not None and not _loraplus_applies(cfg):
        what = "--full-finetune trains none" if cfg.full_finetune else f"--method {cfg.method} has none"
        message = (f"--loraplus-lr-ratio {cfg.loraplus_lr_ratio:g} raises the learning rate of LoRA's B factors; "
                   f"{what} (use it with a LoRA-family method: lora, dora, pissa, adalora, qlora, ...)")
        if not args.unused_options_warn:
            raise ConfigError(message)
        warnings.warn(f"{message} (running without it: this is a `peftkit bench` cell)", stacklevel=1)
        cfg.loraplus_lr_ratio = None
    spec = None if args.full_finetune else get_method(args.method)
    if spec is not None and spec.cli_config is not None:
        # the method's own checks of its options (--option KEY=VALUE, --r, ...), with the run defaults it brings
        # (QLoRA's NF4 base) filled in as the run fills them
        filled = {k: v for k, v in spec.run_options.items() if getattr(cfg, k) in (None, False)}
        build_peft_config(dataclasses.replace(cfg, **filled))
    check_device(cfg.device)
    for key in ("model", "train_file", "eval_file", "data_dir"):
        value = getattr(cfg, key)
        if value and Path(value).exists():  # a shipped model's name (stories260K) is no path here
            setattr(cfg, key, str(Path(value).resolve()))
    return cfg


# the method options of `peftkit train` and their defaults (RunConfig's), for _check_options_take_effect
METHOD_OPTIONS = {"r": None, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": None}


def _loraplus_applies(cfg: Any) -> bool:
    """Whether the run's adapter has LoRA ``B`` factors (``lora_B``) for ``--loraplus-lr-ratio`` to act on: a
    LoRA-family config (LoRA and its presets, DoRA, LoRA-FA, DyLoRA, AdaLoRA, MoE-LoRA, gated LoRA), or a
    composition holding one. (The Trainer checks the built model too.)"""
    from peftkit.methods.adalora import AdaLoraConfig
    from peftkit.methods.lora import LoraConfig
    from peftkit.train.run import build_peft_config

    if cfg.full_finetune:
        return False
    config = build_peft_config(cfg)
    return any(isinstance(part, (LoraConfig, AdaLoraConfig)) for part in getattr(config, "configs", None) or [config])


def _check_options_take_effect(cfg: Any) -> None:
    """Refuse a method option that the chosen method does not use (``--r`` with prefix tuning, anything with
    ``--full-finetune``): it would be recorded in run_config.json as if it had shaped the run.

    Raises:
        ConfigError: naming the option, its value and the method.
    """
    from peftkit.train.run import build_peft_config

    given = {k: getattr(cfg, k) for k, default in METHOD_OPTIONS.items() if getattr(cfg, k) != default}
    flag = {k: "--" + k.replace("_", "-") for k in METHOD_OPTIONS}
    if cfg.full_finetune:
        extra = [f"{flag[k]} {v!r}" for k, v in given.items()]
        extra += [f"--method {cfg.method}"] if cfg.method != "lora" else []
        extra += ["--option"] if cfg.method_options else []
        check(not extra, f"--full-finetune trains every weight of the model; {', '.join(extra)} would have no "
                         "effect: leave them out, or drop --full-finetune")
        return
    if not given or get_method(cfg.method).cli_config is None:
        return
    config = build_peft_config(cfg)
    # another value of the option (not the default, which may equal the given value and the method's own default)
    probe = {"r": (cfg.r or 8) + 1, "lora_alpha": cfg.lora_alpha + 1, "lora_dropout": cfg.lora_dropout / 2 + 0.25,
             "target_modules": ["peftkit_probe_module"]}
    for key, value in given.items():
        try:
            other = build_peft_config(dataclasses.replace(cfg, **{key: probe[key]}))
        except ConfigError:  # the method checks this option's value, so it uses it
            continue
        if other == config:
            raise ConfigError(f"{flag[key]} {value!r} has no effect with --method {cfg.method}, which does not use "
                              f"it; leave it out (`peftkit methods` lists the methods; --option KEY=VALUE sets any "
                              "field of the method's config)")


def _summary(r: dict[str, Any], show: bool) -> int:
    if not show:
        return 0
    minutes, seconds = divmod(r["wall_seconds"], 60)
    lines = ["", "peftkit train: done"]
    if r["metric"] == "perplexity":
        lines.append(f"  dev perplexity  {r['dev_perplexity_before']:.3f} -> {r['dev_perplexity']:.3f} "
                     f"({r['dev_examples']} examples)")
    else:
        lines.append(f"  dev {r['metric']:<12}{r['dev_' + r['metric']]:.4f} ({r['dev_examples']} examples, "
                     f"{r['task']})")
    lines += [
        f"  trainable       {r['trainable_params']:,} of {r['total_params']:,} parameters "
        f"({100 * r['trainable_params'] / r['total_params']:.2f}%)",
        f"  wall time       {int(minutes)}m {seconds:04.1f}s "
        + (f"(this session, resumed at step {r['resumed_from_step']}; training over all sessions "
           if r.get("resumed_from_step") else "(training ")
        + f"{r['train_seconds']:.0f}s, {r['steps']} steps, {1000 * r['seconds_per_step']:.0f} ms/step, "
        f"{r['processes']} process(es))",
        f"  peak memory     {r['peak_memory_mib']:,.0f} MiB",
        *([f"  adapter file    {r['adapter_bytes'] / 1024:,.1f} KiB for {r['changed_params']:,} changed/stored "
           "parameters"] if "adapter_bytes" in r else []),
        f"  base weights    {r['base_weight_bytes'] / 2**20:,.1f} MiB ({r['base_weight_ratio']:.3f}x float32"
        + (f"; {r.get('quantize') or 'quantised'} layers {r['quantized_weight_ratio']:.3f}x)"
           if r["quantized_weight_ratio"] else ")"),
        f"  written to      {r['output_dir']}",
    ]
    if not math.isfinite(r.get("train_loss", 0.0)):
        lines.append(f"  warning         the training loss is {r['train_loss']}: the run diverged and its adapter holds "
                     "no usable weights; train again with a lower --lr")
    print("\n".join(lines))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from peftkit.train.run import evaluate_run

    metrics = evaluate_run(args.adapter, eval_file=args.eval_file, device=args.device, text_column=args.text_column,
                           pair_column=args.pair_column, label_column=args.label_column)
    for k, v in metrics.items():
        print(f"{k:<16}{v:.4f}" if isinstance(v, float) else f"{k:<16}{v}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from peftkit.train.data import DataError
    from peftkit.train.options import CAUSAL_LM, read_run_config
    from peftkit.train.serve import predict_run, run_shape

    if args.texts and args.input:
        raise ConfigError("give inputs either as TEXT arguments or with --input, not both")
    suffix = Path(args.input).suffix.lower() if args.input not in (None, "-") else ""
    table = suffix in (".jsonl", ".csv", ".tsv")
    for flag, value in (("--text-column", args.text_column), ("--pair-column", args.pair_column)):
        if value is not None and not table:
            raise ConfigError(f"{flag} {value!r} applies to a .jsonl, .csv or .tsv --input (a table of rows); "
                              f"{'the TEXT arguments are' if args.texts else 'plain-text input is'} one input per "
                              "argument or line")
    cfg, raw = read_run_config(Path(args.adapter))
    causal = cfg.task == CAUSAL_LM
    pair = run_shape(cfg, raw)["pair"]
    if args.texts:
        lines = list(args.texts)
    elif table:
        lines = []
    else:
        if args.input in (None, "-") and sys.stdin.isatty():
            raise ConfigError("no input: give TEXT arguments, --input FILE, or pipe lines into standard input")
        try:
            if args.input in (None, "-"):  # the bytes, decoded here (a text stream would hide bad ones as surrogates)
                stream = getattr(sys.stdin, "buffer", None)
                raw_bytes = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
            else:
                raw_bytes = Path(args.input).read_bytes()
            text = raw_bytes.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(f"--input {args.input or '-'}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except OSError as err:
            raise DataError(f"--input {args.input!r} cannot be read ({err.strerror}); give a text file") from None
        # lines end at \n, \r\n or \r only (str.splitlines also breaks at \x0c, \x1c, \x85, U+2028, ...)
        lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not causal and args.max_new_tokens is not None:
        kind = "file" if cfg.train_file else str(cfg.task)
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} has no effect: {args.adapter!r} is a {kind} "
                          "classification run (it applies to causal-lm runs)")
    if causal and args.batch_size is not None:
        raise ConfigError(f"--batch-size {args.batch_size} has no effect: {args.adapter!r} is a causal-lm run, whose "
                          "prompts are continued one at a time")
    if causal and not args.texts:  # a prompt line from a file may hold newlines as \n (how the output writes them)
        lines = [_unescape(line) for line in lines]
    inputs: list[Any] = _table_inputs(args, cfg, causal, pair) if table else []
    for n, line in enumerate(lines):
        if pair:
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"input {n + 1} ({line[:60]!r}) has {len(parts) - 1} tabs: this run's task takes "
                                "sentence pairs, the two sentences separated by one tab")
            inputs.append(tuple(parts))
        else:
            inputs.append(line)
    results = predict_run(args.adapter, inputs, device=args.device, max_new_tokens=args.max_new_tokens or 32,
                          batch_size=args.batch_size or 32)
    for item, res in zip(inputs, results):
        text = "\t".join(_escape(t) for t in item) if isinstance(item, tuple) else _escape(item)
        if args.json:
            print(json.dumps({"input": list(item) if isinstance(item, tuple) else item} | res, ensure_ascii=False))
        elif "completion" in res:
            print(f"{text}{_escape(res['completion'])}")
        elif "score" in res:
            print(f"{res['score']:.4f}\t{text}")
        else:
            print(f"{res['label']}\t{res['probability']:.4f}\t{text}")
    return 0


def _table_inputs(args: argparse.Namespace, cfg: Any, causal: bool, pair: bool) -> list[Any]:
    """The inputs of a ``.jsonl``/``.csv``/``.tsv`` ``--input``, one per row: its text column (``--text-column``,
    else the run's own, else the first of ``sentence``, ``text``, ``sentence1``; for a causal-LM run ``prompt``,
    else ``text``) and, for a sentence-pair run, the ``(text, pair)`` tuple (``--pair-column``, else the run's,
    else ``sentence2``). Other columns (a label, say) are ignored.

    Raises:
        ConfigError: ``--pair-column`` for a run on single sentences.
        DataError: an unreadable table (see :func:`~peftkit.train.data.read_table`), a row without the column,
            or a value that is not text or is blank (the line and the columns present are named).
    """
    from peftkit.train.data import DataError, read_table

    if args.pair_column is not None and not pair:
        raise ConfigError(f"--pair-column {args.pair_column!r} does not apply: {args.adapter!r} is a "
                          f"{'causal-lm' if causal else 'single-sentence'} run")
    rows = read_table(args.input)
    if not rows:
        raise DataError(f"--input {args.input}: the table has no rows, so there is no input to predict on")
    first = rows[0]
    usual = ("prompt", "text") if causal else ("sentence", "text", "sentence1")
    text_col = args.text_column or cfg.text_column or next((c for c in usual if c in first), None)
    if text_col is None:
        raise DataError(f"--input {args.input}: line {first.line} has no text column (looked for "
                        f"{', '.join(usual)}); columns present: {list(first)}; name it with --text-column")
    cols = [(text_col, "--text-column")]
    if pair:
        cols.append((args.pair_column or cfg.pair_column or "sentence2", "--pair-column"))
    inputs: list[Any] = []
    for row in rows:
        values = []
        for col, flag in cols:
            if col not in row:
                raise DataError(f"--input {args.input}: line {row.line} has no column {col!r}; columns present: "
                                f"{list(row)}; name the right one with {flag}")
            value = row[col]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise DataError(f"--input {args.input}: line {row.line}'s column {col!r} holds {value!r}, not text")
            if not str(value).strip():  # (skipping it would shift every later output line against its row)
                raise DataError(f"--input {args.input}: line {row.line}'s column {col!r} is empty; give every row a "
                                "text, or remove the row")
            values.append(str(value))
        inputs.append(tuple(values) if pair else values[0])
    return inputs


#: characters other than \n and \r at which readers (Python's str.splitlines) also break lines
_LINE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _escape(text: str) -> str:
    r"""``text`` on one line: a backslash, newline, carriage return and tab written as ``\\``, ``\n``, ``\r``
    and ``\t``, the other line breaks as ``\uXXXX`` (one output line per input)."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return "".join(f"\\u{ord(c):04x}" if c in _LINE_BREAKS else c for c in text)


def _unescape(text: str) -> str:
    r"""A prompt line as :func:`_escape` writes it, back to its text (``\n`` a newline, ``\\`` a backslash,
    ``\uXXXX`` that character)."""
    plain = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}
    return re.sub(r"\\(u[0-9a-fA-F]{4}|[\\nrt])",
                  lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] == "u" and len(m.group(1)) == 5
                  else plain[m.group(1)], text)


def _cmd_methods(args: argparse.Namespace) -> int:
    specs = all_methods()
    width = max(len(s.name) for s in specs)
    print(f"{'method':<{width}}  {'family':<15}  {'merges':<6}  paper")
    for s in specs:
        print(f"{s.name:<{width}}  {s.family:<15}  {'yes' if s.mergeable else 'no':<6}  {s.paper}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from peftkit.artifacts import merge_adapter_folders

    weights = args.weights or [1.0] * len(args.adapters)
    _check_merge_options(args)
    extra = {"svd_rank": args.svd_rank, "density": args.density,
             "majority_sign_method": args.majority_sign or "total", "seed": 0 if args.seed is None else args.seed}
    info = merge_adapter_folders(args.adapters, weights, args.output, args.combination, model_dir=args.model,
                                 heads_from=args.heads_from, overwrite=args.overwrite, **extra)
    rank = f"rank {info['rank']}, " if info["rank"] is not None else ""
    print(f"merged {len(args.adapters)} adapters ({info['combination_type']}, weights {weights}) into "
          f"{info['output_dir']}: {rank}{info['tensors']} tensors")
    return 0


def _check_merge_options(args: argparse.Namespace) -> None:
    """Refuse an option the chosen combination would ignore (``--density`` with ``cat``, ...), so that a
    typo in ``--combination`` or a misunderstanding does not pass silently. Raises ConfigError."""
    from peftkit.merging import COMBINATION_TYPES, option_applies

    def applies(option: str, rule: str) -> bool:
        return option_applies({"--density": "density", "--svd-rank": "svd_rank",
                               "--majority-sign": "majority_sign_method", "--seed": "seed"}[option], rule)

    count = len(args.adapters)
    if not 0 <= args.heads_from < max(count, 1):
        raise ConfigError(f"--heads-from {args.heads_from} is not valid: it indexes the {count} adapter folders given, "
                          f"0 to {count - 1}")
    if args.density is not None and not 0 < args.density <= 1:
        raise ConfigError(f"--density {args.density} is not valid; it is the kept fraction of each delta, a number in "
                          "(0, 1]")
    combination = args.combination or "cat"  # LoRA's default ((IA)^3 adapters refuse every such option later)
    if combination not in COMBINATION_TYPES:
        raise ConfigError(f"--combination {combination!r} is not valid; expected one of {', '.join(COMBINATION_TYPES)}")
    given = {"--density": args.density, "--svd-rank": args.svd_rank, "--majority-sign": args.majority_sign,
             "--seed": args.seed}
    for option, value in given.items():
        if value is not None and not applies(option, combination):
            users = ", ".join(t for t in COMBINATION_TYPES if applies(option, t))
            raise ConfigError(f"{option} {value} has no effect with --combination {combination}; it applies "
                              f"to {users}")
    if args.density is None and applies("--density", combination):
        raise ConfigError(f"--combination {combination} needs --density, the fraction of each delta to keep, "
                          "in (0, 1]")


def _cmd_export(args: argparse.Namespace) -> int:
    from peftkit.artifacts import export_merged

    if not args.merge:
        raise ConfigError("export writes merged models only: pass --merge")
    out = export_merged(args.adapter, args.output, model_dir=args.model, overwrite=args.overwrite)
    print(f"wrote a plain transformers model with the adapter merged in: {out}")
    return 0


def check_cell_command(argv: list[str]) -> None:
    """Run every check ``peftkit train argv...`` makes before it loads a model (the parser, then
    :func:`train_config`), writing nothing; for ``peftkit bench``, whose cells would each fail with the message
    hidden in their logs. Raises ConfigError with the message ``peftkit train`` would print."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        raise ConfigError(err.getvalue().strip().removeprefix("peftkit: error: ")) from None
    args.argv = list(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cell's --unused-options-warn: an unused option is no error
        cfg = train_config(args)
    # the data paths too: each cell would load its model, then fail on them
    for option, value, folder in (("--train-file", cfg.train_file, False), ("--eval-file", cfg.eval_file, False),
                                  ("--data-dir", cfg.data_dir, True)):
        if value and not (Path(value).is_dir() if folder else Path(value).is_file()):
            what = "folder" if folder else "file"
            raise ConfigError(f"{option} {value!r} is not a {what}{'' if Path(value).exists() else ' (it does not exist)'}"
                              f"; give an existing {what}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from peftkit.bench import BenchConfig, collect, run_sweep, write_report

    def split(value: str) -> list[str]:
        return [v.strip() for v in value.split(",") if v.strip()]

    if args.report_only:  # the sweep as it ran: its settings from its folder, none retyped
        saved = Path(args.output_dir) / "bench_config.json"
        check(not Path(args.output_dir).exists() or Path(args.output_dir).is_dir(),
              f"--output-dir {args.output_dir!r} is a file, not a folder; give a new folder or the folder of a sweep "
              "to resume")
        if not saved.is_file():
            raise ConfigError(f"--output-dir {args.output_dir!r} holds no sweep (no bench_config.json); give the "
                              "folder of a sweep, or run it without --report-only first")
        defaults = vars(build_parser().parse_args(["bench"]))
        given = [f"--{k.replace('_', '-')}" for k in ("methods", "tasks", "seeds", "model", "data_dir", "max_steps",
                                                      "batch_size", "max_length", "train_arg", "save_every", "jobs")
                 if getattr(args, k) != defaults[k]]
        check(not given, f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with --report-only: the "
                         "report describes the sweep as it ran, whose settings are read from its bench_config.json; "
                         "leave them out")
        settings = read_json_object(saved, "it holds the sweep's settings, written by `peftkit bench`")
        fields = {f.name for f in dataclasses.fields(BenchConfig)} - {"output_dir"}
        cfg = BenchConfig(**{k: v for k, v in settings.items() if k in fields}, output_dir=args.output_dir)
    else:
        try:
            seeds = [int(s) for s in split(args.seeds)]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r} must be comma-separated integers") from None
        cfg = BenchConfig(methods=split(args.methods), tasks=split(args.tasks), seeds=seeds,
                          output_dir=args.output_dir, model=args.model, data_dir=args.data_dir,
                          max_steps=args.max_steps, batch_size=args.batch_size, max_length=args.max_length,
                          train_args=list(args.train_arg), save_every=args.save_every)
    extra = f" plus `{' '.join(cfg.train_args)}`" if cfg.train_args else ""
    jobs = args.jobs
    if args.report_only:  # the cells ran with the jobs of the last run, not of this command
        saved = Path(cfg.output_dir) / "bench_config.json"
        jobs = read_json_object(saved, "it holds the sweep's settings").get("jobs", "?")
    notes = (f"Base model: {cfg.model or 'all-MiniLM-L6-v2 (embedded)'}; {cfg.max_steps} steps of {cfg.batch_size} "
             f"rows per cell; seeds {cfg.seeds}; each method at its `peftkit train` defaults{extra}; {jobs} "
             "cell(s) at a time.")
    if args.report_only:
        records = collect(cfg)
    else:
        cfg.check_folder()  # (run_sweep checks it again) a folder of another sweep keeps its report untouched
        try:
            records = run_sweep(cfg, progress=not args.no_progress, jobs=args.jobs)
        except KeyboardInterrupt as err:
            # the report of the folder (an earlier run's, or none) is brought up to the cells finished so far
            if (Path(cfg.output_dir) / "bench_config.json").is_file():
                try:
                    path = write_report(collect(cfg), cfg.output_dir, notes=notes)
                    err.peftkit_note = (f"{path} shows the cells finished so far; run the same command again to "
                                        "continue the sweep")
                except (ConfigError, OSError):  # a damaged cell: the next run names it
                    pass
            raise
    path = write_report(records, cfg.output_dir, notes=notes)
    pending = sum(r.get("error") == NOT_RUN for r in records)
    failed = sum("error" in r for r in records) - pending
    print(f"report: {path} ({len(records) - failed - pending} cells finished, {failed} failed"
          + (f", {pending} not run yet" if pending else "") + ")")
    return 0 if not failed else 1


COMMANDS = {"train": _cmd_train, "bench": _cmd_bench, "eval": _cmd_eval, "predict": _cmd_predict,
            "methods": _cmd_methods, "merge": _cmd_merge, "export": _cmd_export}


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("terminated (SIGTERM)")


#: options whose empty value was taken as "not given" or as the current folder: refused by name
_NOT_EMPTY = {"train": [("resume", "--resume", "the run folder to continue")],
              "eval": [("adapter", "--adapter", "the run folder")],
              "predict": [("adapter", "--adapter", "the run folder")],
              "export": [("adapter", "--adapter", "the run or adapter folder")],
              "bench": [("output_dir", "--output-dir", "the sweep folder (or leave the option out for bench)")]}


def _check_not_empty(args: argparse.Namespace) -> None:
    """Refuse an option of :data:`_NOT_EMPTY` given as an empty string.

    Raises:
        ConfigError: such an option, named with what to give.
    """
    for dest, option, what in _NOT_EMPTY.get(args.command, ()):
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{option} {value!r} is empty; give {what}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console script; returns the exit status. ``argv``: the arguments after
    the program name (default None: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what was given, for checks that must tell a default from an option given at it
    from peftkit.train.data import DataError

    # transformers imports torchao (when installed) on the first model load; on a CPU-only machine its optional
    # CUDA kernels fail to load and it logs that, and torch logs a deprecation of torchao's enum registration:
    # four lines of noise on every command, which are about torchao's packaging, not the run
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    previous = None
    if args.command in ("train", "merge", "export") and threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, SLURM, docker stop, torchrun stopping its workers) ends a run as Ctrl-C does: an earlier
        # run moved aside by --overwrite is put back unless a checkpoint was written, and the note is printed;
        # a merge or export removes its staging folder (a whole merged model, left hidden beside the output)
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _check_not_empty(args)
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, NotADirectoryError, AdapterLoadError,
            UnmatchedTargetWarning) as err:
        print(f"peftkit: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        note = getattr(err, "peftkit_note", None)  # e.g. that the stopped run was kept for --resume
        print(f"peftkit: interrupted{'; ' + note if note else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`peftkit methods | head`): stop quietly, as `cat` does
        try:  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout is no file (a test's capture)
            pass
        return 141
    except Exception as err:  # a failure nobody foresaw: still one line, the traceback on request
        if os.environ.get("PEFTKIT_TRACEBACK", "") not in ("", "0"):
            traceback.print_exc()
        note = getattr(err, "peftkit_note", None)
        print(f"peftkit: error: {type(err).__name__}: {_one_line(err)} (set PEFTKIT_TRACEBACK=1 for the "
              f"traceback){'; ' + note if note else ''}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
