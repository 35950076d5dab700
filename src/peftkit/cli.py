"""The ``peftkit`` command line: ``train``, ``eval``, ``methods``.

``peftkit train`` with no options fine-tunes the embedded all-MiniLM-L6-v2 with LoRA on SST-2 and
prints a summary; see ``peftkit train --help``. Errors in options, data or files are reported in one
line (``peftkit: error: ...``) with exit status 2, before any training starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from peftkit.config import ConfigError, all_methods
from peftkit.formats.hf_peft import AdapterLoadError

DEFAULT_STEPS = 800


def _target_modules(value: str) -> list[str] | str:
    """``a,b,c`` -> list; ``all-linear`` or anything with regex characters stays a string."""
    if value == "all-linear" or any(ch in value for ch in "*?[]()|\\^$+"):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def _option(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model with a PEFT method (default: LoRA, MiniLM, SST-2)",
                       description="Fine-tune a model and write a run folder (adapter, metrics.json, "
                                   "run_config.json, train.log). With no options: LoRA on the embedded "
                                   "all-MiniLM-L6-v2 for SST-2, evaluated on the SST-2 dev set.")
    t.add_argument("--model", help="local HF model folder (default: embedded all-MiniLM-L6-v2)")
    t.add_argument("--method", default="lora", help="PEFT method (see `peftkit methods`; default lora)")
    t.add_argument("--task", default="sst2", help="sst2, rte, cola, stsb, mrpc or causal-lm (default sst2)")
    t.add_argument("--train-file", help="CSV/TSV/JSONL training file (text + label columns)")
    t.add_argument("--eval-file", help="CSV/TSV/JSONL dev file for the reported metrics")
    t.add_argument("--text-column", help="text column (default: sentence, text or sentence1)")
    t.add_argument("--pair-column", help="second-sentence column for sentence-pair tasks")
    t.add_argument("--label-column", default="label", help="label column (default label)")
    t.add_argument("--data-dir", help="folder with GLUE task folders (needed for mrpc)")
    t.add_argument("--r", type=_positive_int, default=8, help="adapter rank (default 8)")
    t.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="LoRA alpha (default 16)")
    t.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    t.add_argument("--target-modules", type=_target_modules, default=None,
                   help="comma-separated names/suffixes, a regex, or all-linear (default all-linear)")
    t.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra method config field, JSON value (e.g. --option use_rslora=true); repeatable")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate (default 1e-3; 5e-5 full fine-tune)")
    t.add_argument("--epochs", type=_positive_float, help="passes over the training data")
    t.add_argument("--max-steps", type=_positive_int,
                   help=f"optimiser steps (default {DEFAULT_STEPS} unless --epochs is given)")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="rows per step (default 32)")
    t.add_argument("--max-length", type=_positive_int, default=64, help="tokens per row (default 64)")
    t.add_argument("--max-train-samples", type=_positive_int, help="use only N training examples")
    t.add_argument("--max-eval-samples", type=_positive_int, help="evaluate on the first N dev examples")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--output-dir", help="run folder (default runs/<method>-<task>-<time>)")
    t.add_argument("--full-finetune", action="store_true", help="train all parameters (the baseline)")
    t.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    t.add_argument("--quantize", choices=("nf4", "int8", "int4"),
                   help="store the frozen base's linear weights quantised (nf4 + LoRA = QLoRA); default float32")
    t.add_argument("--quantize-embeddings", action="store_true", help="with --quantize, quantise embeddings too")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="reload a run folder and report its dev metrics again")
    e.add_argument("--adapter", required=True, metavar="RUN_DIR", help="folder written by `peftkit train`")
    e.add_argument("--eval-file", help="evaluate on this file instead of the run's dev set")
    e.add_argument("--device", help="cpu, cuda, ...")

    sub.add_parser("methods", help="list every registered PEFT method")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from peftkit.train.run import DEFAULT_MODEL_NAME, RunConfig, run_training

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
        progress=not args.no_progress, quantize=args.quantize, quantize_embeddings=args.quantize_embeddings,
    )
    model_name = args.model or DEFAULT_MODEL_NAME
    print(f"peftkit train: {cfg.label()} on {model_name}, task {args.train_file or cfg.task}", flush=True)
    r = run_training(cfg)
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
        f"  wall time       {int(minutes)}m {seconds:04.1f}s (training {r['train_seconds']:.0f}s, "
        f"{r['steps']} steps, {1000 * r['seconds_per_step']:.0f} ms/step)",
        f"  peak memory     {r['peak_memory_mib']:,.0f} MiB",
        f"  base weights    {r['base_weight_bytes'] / 2**20:,.1f} MiB ({r['base_weight_ratio']:.3f}x float32"
        + (f"; {args.quantize} layers {r['quantized_weight_ratio']:.3f}x)" if args.quantize else ")"),
        f"  written to      {r['output_dir']}",
    ]
    print("\n".join(lines))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from peftkit.train.run import evaluate_run

    metrics = evaluate_run(args.adapter, eval_file=args.eval_file, device=args.device)
    for k, v in metrics.items():
        print(f"{k:<16}{v:.4f}" if isinstance(v, float) else f"{k:<16}{v}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    specs = all_methods()
    width = max(len(s.name) for s in specs)
    print(f"{'method':<{width}}  {'family':<15}  {'merges':<6}  paper")
    for s in specs:
        print(f"{s.name:<{width}}  {s.family:<15}  {'yes' if s.mergeable else 'no':<6}  {s.paper}")
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "methods": _cmd_methods}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from peftkit.train.data import DataError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, AdapterLoadError) as err:
        print(f"peftkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
