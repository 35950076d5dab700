"""Mixed-adapter batches: peftkit vs the ``peft`` package, in one process, interleaved.

8 LoRA adapters (r=8, all block linears) on the ~20M Llama (rows x 128 tokens) and the MiniLM-shaped
encoder (rows x 64 tokens), 32 rows by default, each row assigned round-robin to an adapter.
Reports, per model:
* peftkit mixed forward / peftkit single-adapter unmerged forward (target <= 1.1x),
* peftkit mixed forward / peft mixed forward (target <= 0.8x),
* the frozen base model's forward / peft mixed forward: the best any mixed path could reach (a side
  path costing nothing), which tells whether the 0.8x target is reachable on that model at all.

    python -m benchmarks.bench_mixed [--reps 10] [--adapters 8] [--rows 32] [--processes 1] [--json out.json]

With ``--processes N`` the timing runs in N fresh processes and every figure is the median over them
(ratios inside one process drift by several percent from one process to the next).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings
from functools import partial

import torch

from benchmarks.common import (
    BLOCK_LINEARS,
    in_fresh_processes,
    interleaved,
    make_batch,
    make_model,
    model_names,
)


def build(model_name: str, n_adapters: int):
    import peft

    import peftkit

    base = make_model(model_name).eval()
    targets = BLOCK_LINEARS[model_name]
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                          init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                         init_lora_weights=False))
    for i in range(1, n_adapters):
        ours.add_adapter(f"a{i}", peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                     init_lora_weights=False))
        theirs.add_adapter(f"a{i}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                    init_lora_weights=False))
    return ours.eval(), theirs.eval()


@torch.no_grad()
def base_forward(model, x) -> None:
    with model.disable_adapter():
        model(input_ids=x)


@torch.no_grad()
def forward(model, x, names=None) -> None:
    if names is None:
        model(input_ids=x)
    else:
        model(input_ids=x, adapter_names=names)


def measure(model_name: str, n_adapters: int, rows: int, reps: int) -> dict:
    """Median milliseconds of each forward and the ratios the issue's targets are about, for one model."""
    ours, theirs = build(model_name, n_adapters)
    seq = make_batch(model_name)["input_ids"].shape[1]
    x = torch.randint(1000, 8000, (rows, seq), generator=torch.Generator().manual_seed(0))
    names = ["default" if i % n_adapters == 0 else f"a{i % n_adapters}" for i in range(x.shape[0])]
    med = interleaved({"ours_mixed": partial(forward, ours, x, names), "ours_single": partial(forward, ours, x),
                       "peft_mixed": partial(forward, theirs, x, names), "peft_single": partial(forward, theirs, x),
                       "base": partial(base_forward, ours, x)},
                      reps)
    return {"model": model_name, "rows": rows, "tokens": seq, "adapters": n_adapters,
            "ms": {k: 1000 * v for k, v in med.items()},
            "ratios": {"mixed_over_single": med["ours_mixed"] / med["ours_single"],
                       "mixed_over_peft": med["ours_mixed"] / med["peft_mixed"],
                       "peft_mixed_over_single": med["peft_mixed"] / med["peft_single"],
                       "base_over_peft_mixed": med["base"] / med["peft_mixed"]}}


def in_processes(model_name: str, n_adapters: int, rows: int, reps: int, processes: int) -> dict:
    """:func:`measure` in ``processes`` fresh processes, one after another; every figure is the median over
    them and the per-process ratios are kept under ``per_process``."""
    runs = in_fresh_processes("benchmarks.bench_mixed", ["--reps", str(reps), "--models", model_name, "--adapters",
                                                        str(n_adapters), "--rows", str(rows)], processes)
    out = {**runs[0], "ms": {k: statistics.median(r["ms"][k] for r in runs) for k in runs[0]["ms"]},
           "ratios": {k: statistics.median(r["ratios"][k] for r in runs) for k in runs[0]["ratios"]}}
    out["processes"], out["per_process"] = processes, [r["ratios"] for r in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="timed rounds per contender (default 10)")
    parser.add_argument("--adapters", type=int, default=8, help="LoRA adapters on the model (default 8)")
    parser.add_argument("--rows", type=int, default=32, help="batch rows, spread over the adapters (default 32)")
    parser.add_argument("--models", default="llama20m,minilm", help="comma-separated: llama20m, minilm")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the timing in N fresh processes and report medians over them (default 1)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    for flag, value in (("--processes", args.processes), ("--reps", args.reps), ("--adapters", args.adapters),
                        ("--rows", args.rows)):
        if value < 1:
            parser.error(f"{flag} {value} is not valid; it must be 1 or more")
    results = []
    for model_name in model_names(parser, args.models):
        if args.processes > 1:
            r = in_processes(model_name, args.adapters, args.rows, args.reps, args.processes)
        else:
            r = measure(model_name, args.adapters, args.rows, args.reps)
        results.append(r)
        q = r["ratios"]
        print(f"{model_name}: rows {r['rows']} x {r['tokens']} tokens, {r['adapters']} adapters"
              + (f", medians over {r['processes']} processes" if "processes" in r else "") + "; "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in r["ms"].items()))
        print(f"  peftkit mixed / peftkit single = {q['mixed_over_single']:.3f} (target <= 1.1)")
        print(f"  peftkit mixed / peft mixed     = {q['mixed_over_peft']:.3f} (target <= 0.8)")
        print(f"  peft mixed / peft single       = {q['peft_mixed_over_single']:.3f}")
        print(f"  frozen base / peft mixed       = {q['base_over_peft_mixed']:.3f} (bound for the 0.8 target)")
        for i, p in enumerate(r.get("per_process", [])):
            print(f"  process {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in p.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
