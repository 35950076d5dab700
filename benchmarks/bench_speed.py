"""peftkit vs the ``peft`` package, side by side on the same models and configs, in one run.

For the ~20M Llama (batch 8 x 128) and the MiniLM-shaped encoder (batch 32 x 64), r=8 on all block
linears where a method has a rank:

* train step time (forward + backward + AdamW step) of LoRA (dropout 0 and 0.1), DoRA (dropout 0
  and 0.1), (IA)^3, prompt tuning and prefix tuning (20 virtual tokens), for both libraries,
  stepped round-robin in one process (identical fresh processes here differ by up to ~40% in
  speed, so only ratios inside one process are compared); medians over ``--reps`` steps;
* the frozen-base floor: forward + backward to the input embeddings with every weight frozen, the
  least any adapter can cost; LoRA's step is reported as a ratio to it;
* inference: base forward, unmerged LoRA forward and merged LoRA forward (``merge_adapter``, wrappers
  left in place), as ratios to the base forward, over ``--inference-reps``
  rounds (default three times ``--reps``);
* merge time (``merge_adapter`` + ``unmerge_adapter``);
* peak memory of a LoRA/DoRA training step per library, each measured in its own fresh process
  (peak RSS on CPU cannot be reset inside a process), the median over three such processes per
  library, run interleaved.

    python -m benchmarks.bench_speed [--reps 20] [--inference-reps 60] [--processes 1] [--models llama20m,minilm]
        [--json out.json]

With ``--processes N`` the timing runs in N fresh processes and every figure is the median over them.

Methods a library lacks are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from typing import Any

import torch

from benchmarks.common import (
    BLOCK_LINEARS,
    in_fresh_processes,
    interleaved,
    make_batch,
    make_model,
    model_names,
)

IA3_TARGETS = {"llama20m": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "minilm": (["key", "value", "output.dense"], ["output.dense"])}


def configs(lib: Any, model_name: str) -> dict[str, Any]:
    """The benchmarked configs of one library (``peft`` or ``peftkit``), by method label."""
    lin = BLOCK_LINEARS[model_name]
    task = "CAUSAL_LM" if model_name == "llama20m" else "SEQ_CLS"
    out: dict[str, Any] = {}
    for drop in (0.0, 0.1):
        out[f"lora_d{drop}"] = lambda d=drop: lib.LoraConfig(r=8, lora_alpha=16, lora_dropout=d, target_modules=lin)
        out[f"dora_d{drop}"] = lambda d=drop: lib.LoraConfig(r=8, lora_alpha=16, lora_dropout=d, target_modules=lin,
                                                             use_dora=True)
    if hasattr(lib, "IA3Config"):
        targets, ff = IA3_TARGETS[model_name]
        out["ia3"] = lambda: lib.IA3Config(target_modules=targets, feedforward_modules=ff)
    if hasattr(lib, "PromptTuningConfig"):
        out["prompt"] = lambda: lib.PromptTuningConfig(num_virtual_tokens=20, task_type=task)
    if hasattr(lib, "PrefixTuningConfig"):
        out["prefix"] = lambda: lib.PrefixTuningConfig(num_virtual_tokens=20, task_type=task)
    return out


def build(lib: Any, base: torch.nn.Module, make_config: Any, batch: dict[str, torch.Tensor] | None = None,
          copy_base: bool = True) -> tuple[Any, Any] | None:
    """The adapted model and its optimiser, or None when the library cannot apply the method here
    (checked with one training step on ``batch`` when given)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(copy.deepcopy(base) if copy_base else base, make_config())
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            if batch is not None:
                train_step(model, opt, batch)
    except Exception as err:  # a method the library lacks or cannot apply here
        print(f"    skipped {lib.__name__}: {type(err).__name__}: {str(err)[:120]}")
        return None
    return model, opt


def train_step(model: Any, opt: Any, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def floor_step(base: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    base.train()
    embeds = base.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    base(inputs_embeds=embeds, **rest).loss.backward()


@torch.no_grad()
def infer(model: Any, batch: dict[str, torch.Tensor]) -> None:
    model.eval()
    model(**{k: v for k, v in batch.items() if k != "labels"})


def speed(model_name: str, reps: int, inference_reps: int | None = None) -> dict[str, Any]:
    """Every timing of one model, in this process; ``inference_reps`` defaults to ``3 * reps``."""
    import peft

    import peftkit

    base = make_model(model_name)
    batch = make_batch(model_name)
    frozen = copy.deepcopy(base).requires_grad_(False)
    result: dict[str, Any] = {"model": model_name, "params_m": sum(p.numel() for p in base.parameters()) / 1e6}
    contenders: dict[str, Any] = {"floor": partial(floor_step, frozen, batch)}
    ours_cfg, theirs_cfg = configs(peftkit, model_name), configs(peft, model_name)
    built: dict[str, Any] = {}
    for label in ours_cfg:
        for lib, cfgs, tag in ((peftkit, ours_cfg, "peftkit"), (peft, theirs_cfg, "peft")):
            if label not in cfgs:
                continue
            got = build(lib, base, cfgs[label], batch)
            if got is not None:
                built[f"{tag}:{label}"] = got
                contenders[f"{tag}:{label}"] = partial(train_step, got[0], got[1], batch)
    med = interleaved(contenders, reps)
    result["train_ms"] = {k: 1000 * v for k, v in med.items()}
    ratios = {}
    for label in ours_cfg:
        a, b = med.get(f"peftkit:{label}"), med.get(f"peft:{label}")
        if a and b:
            ratios[label] = a / b
    result["peftkit_over_peft"] = ratios
    result["lora_over_floor"] = {lib: med[f"{lib}:lora_d0.0"] / med["floor"] for lib in ("peftkit", "peft")
                                 if f"{lib}:lora_d0.0" in med}
    result["lora_d01_over_floor"] = {lib: med[f"{lib}:lora_d0.1"] / med["floor"] for lib in ("peftkit", "peft")
                                     if f"{lib}:lora_d0.1" in med}
    # inference: base, unmerged, merged (wrappers in place)
    inf: dict[str, Any] = {"base": partial(infer, frozen, batch)}
    for tag in ("peftkit", "peft"):
        if f"{tag}:lora_d0.0" in built:
            inf[f"{tag}:unmerged"] = partial(infer, built[f"{tag}:lora_d0.0"][0], batch)
    merged = {}
    for tag in ("peftkit", "peft"):
        if f"{tag}:lora_d0.0" in built:
            m = copy.deepcopy(built[f"{tag}:lora_d0.0"][0])
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.01)
            m.merge_adapter()
            merged[tag] = m
            inf[f"{tag}:merged"] = partial(infer, m, batch)
    med_inf = interleaved(inf, 3 * reps if inference_reps is None else inference_reps)
    result["inference_ms"] = {k: 1000 * v for k, v in med_inf.items()}
    result["inference_over_base"] = {k: v / med_inf["base"] for k, v in med_inf.items() if k != "base"}
    # merge time
    merge_t = {}
    for tag, m in merged.items():
        times = []
        for _ in range(5):
            m.unmerge_adapter()
            t = time.perf_counter()
            m.merge_adapter()
            times.append(time.perf_counter() - t)
        merge_t[tag] = 1000 * sorted(times)[len(times) // 2]
    result["merge_ms"] = merge_t
    return result


def _reset_peak_rss() -> None:
    """Reset this process's peak-RSS mark to its current RSS (Linux ``clear_refs``), if possible.

    A child started by ``subprocess`` inherits its parent's high-water mark through ``fork``, and
    ``ru_maxrss`` keeps it across ``exec``, so without the reset every child reports the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM`` where ``/proc`` has it, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(lib_name: str, model_name: str, label: str) -> None:
    """Entry of the per-library memory process: build, take 3 train steps, print peak RSS (MiB)."""
    _reset_peak_rss()
    lib = __import__(lib_name)
    base = make_model(model_name)
    batch = make_batch(model_name)
    before = _peak_rss_mib()
    got = build(lib, base, configs(lib, model_name)[label], copy_base=False)  # no second copy of the base
    if got is None:
        print(json.dumps({"peak_mib": None}))
        return
    del base
    for _ in range(3):
        train_step(got[0], got[1], batch)
    print(json.dumps({"peak_mib": _peak_rss_mib(), "before_mib": before}))


def memory(model_name: str, children: int = 3) -> dict[str, Any]:
    """Peak RSS (MiB) of a short training run per library and method, each the median over ``children``
    fresh processes run interleaved (peftkit, peft, peftkit, ...). One child alone is not enough: the same
    child measured twice here differed by up to ~40 MiB, which is the size of the gap being compared."""
    peaks: dict[str, list[float]] = {}
    for label in ("lora_d0.0", "dora_d0.0"):
        for _ in range(children):
            for lib in ("peftkit", "peft"):
                cmd = [sys.executable, "-m", "benchmarks.bench_speed", "--memory-child", lib, model_name, label]
                text = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip().splitlines()
                peak = json.loads(text[-1])["peak_mib"] if text else None
                if peak is not None:
                    peaks.setdefault(f"{lib}:{label}", []).append(peak)
    out: dict[str, Any] = {key: statistics.median(values) for key, values in peaks.items()}
    out["children"] = children
    return out


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's results from several processes: every number (and every number of a nested dict)
    replaced by its median over the processes; the per-process ratios are kept under ``per_process``."""
    def merge(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            keys = [k for k in values[0] if all(k in v for v in values)]
            return {k: merge([v[k] for v in values]) for k in keys}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return statistics.median(values)
        return values[0]
    out = merge(runs)
    out["processes"] = len(runs)
    out["per_process"] = [{k: r[k] for k in ("peftkit_over_peft", "lora_over_floor", "inference_over_base")}
                          for r in runs]
    return out


def _speed_in_processes(model_name: str, reps: int, inference_reps: int, processes: int) -> dict[str, Any]:
    """:func:`speed` in ``processes`` fresh processes, one after another, combined by :func:`_median_of`.
    Ratios inside one process drift by several percent from one process to the next (which models sit
    where in memory differs), so the issue's targets are checked on medians over processes."""
    runs = in_fresh_processes("benchmarks.bench_speed", ["--reps", str(reps), "--inference-reps", str(inference_reps),
                                                        "--models", model_name, "--speed-only"], processes)
    return _median_of(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed rounds of training steps per contender (default 20)")
    parser.add_argument("--inference-reps", type=int,
                        help="rounds of the inference timing (default 3x --reps: a forward costs about a third "
                             "of a training step, and the inference targets are the tightest)")
    parser.add_argument("--models", default="llama20m,minilm",
                        help="comma-separated: llama20m (~20M Llama, batch 8 x 128), minilm (MiniLM-shaped, 32 x 64)")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the timing in N fresh processes and report medians over them (default 1)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.processes < 1:
        parser.error(f"--processes {args.processes} is not valid; it must be 1 or more")
    for flag, value in (("--reps", args.reps), ("--inference-reps", args.inference_reps)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value} is not valid; it must be 1 or more")
    inference_reps = 3 * args.reps if args.inference_reps is None else args.inference_reps
    results = []
    for model_name in model_names(parser, args.models):
        print(f"== {model_name}")
        if args.processes > 1:
            r = _speed_in_processes(model_name, args.reps, inference_reps, args.processes)
        else:
            r = speed(model_name, args.reps, inference_reps)
        if not args.speed_only:
            r["peak_memory_mib"] = memory(model_name)
        results.append(r)
        print(json.dumps(r, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
