"""The arena's report: ``report.md`` (tables), ``report.json`` (every cell) and PNG plots.

Quality is each task's GLUE headline metric x 100 (accuracy for SST-2/RTE, Matthews correlation for
CoLA, Pearson for STS-B, F1 for MRPC) as mean ± sample standard deviation over seeds. Costs per
method: trainable parameters (and % of the model), median train step time, peak memory (the
largest over its cells, process RSS on CPU) and the size of what the run saved.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from peftkit.formats.hf_peft import atomic_write_bytes

#: the error text of a cell that has not run yet (see :func:`peftkit.bench.arena.collect`)
NOT_RUN = "not run"

METRIC_LABEL = {"accuracy": "acc", "matthews": "MCC", "pearson": "Pearson", "f1": "F1"}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """From the cells' ``records`` (see :func:`~peftkit.bench.arena.collect`): per (method, task) metric
    mean/std/n; per method params, step time, memory, size, average metric."""
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    methods: list[str] = []
    tasks: list[str] = []
    metric_of: dict[str, str] = {}
    cost: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    failures = []
    pending = []
    for r in records:
        m, t = r["method"], r["task"]
        methods += [m] if m not in methods else []
        tasks += [t] if t not in tasks else []
        if r.get("error") == NOT_RUN:
            pending.append(r)
            continue
        if "error" in r:
            failures.append(r)
            continue
        metric_of[t] = r["metric"]
        by[(m, t)].append(100 * r[f"dev_{r['metric']}"])
        for key in ("trainable_params", "total_params", "seconds_per_step", "peak_memory_mib", "adapter_bytes"):
            cost[m][key].append(r[key])
        # what the saved file holds: a selective method's changed entries, not its trainable mask/vector
        changed = r.get("changed_params")
        cost[m]["changed_params"].append(r["trainable_params"] if changed is None else changed)
    cells = {}
    for (m, t), values in by.items():
        cells[(m, t)] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "n": len(values)}
    per_method = {}
    for m in methods:
        c = cost.get(m)
        if not c:
            continue
        means = [cells[(m, t)]["mean"] for t in tasks if (m, t) in cells]
        per_method[m] = {
            "trainable_params": max(c["trainable_params"]), "total_params": max(c["total_params"]),
            "step_ms": 1000 * statistics.median(c["seconds_per_step"]), "peak_memory_mib": max(c["peak_memory_mib"]),
            "adapter_bytes": statistics.median(c["adapter_bytes"]),
            "changed_params": max(c["changed_params"]),
            "average": statistics.fmean(means) if len(means) == len(tasks) else None,
        }
    for t in tasks:
        if t not in metric_of:  # no finished cell yet: the task's own headline metric
            metric_of[t] = _task_metric(t)
    return {"methods": methods, "tasks": tasks, "metric_of": metric_of, "cells": cells, "per_method": per_method,
            "failures": failures, "pending": pending}


def _task_metric(task: str) -> str:
    """The headline metric of a built-in task, or '' when it cannot be told without its data."""
    from peftkit.train.data import TASKS

    try:
        return TASKS[task](None).metric
    except Exception:  # MRPC needs its data folder to be described; an unknown task has no metric
        return {"mrpc": "f1"}.get(task, "")


def write_report(records: list[dict[str, Any]], out_dir: str | Path, title: str = "peftkit method arena",
                 notes: str = "") -> Path:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summarise(records)
    atomic_write_bytes(out / "report.json", (json.dumps({"cells": records}, indent=2, default=str) + "\n").encode())
    plots = _plots(s, out)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    head = "| method | " + " | ".join(f"{t} ({METRIC_LABEL.get(s['metric_of'].get(t, ''), '?')})" for t in s["tasks"])
    lines += ["## Quality (dev set, x100, mean ± std over seeds)", "", head + " | average |",
              "|---|" + "---:|" * (len(s["tasks"]) + 1)]
    # the seeds each cell has in the sweep (finished, failed or not run yet): a cell short of them (some failed or
    # have not run) shows its count, and its spread is over fewer seeds, or none
    expected = Counter((r["method"], r["task"]) for r in records)
    short = False
    for m in s["methods"]:
        row = []
        for t in s["tasks"]:
            c = s["cells"].get((m, t))
            if c is not None:
                text = f"{c['mean']:.1f} ± {c['std']:.1f}" if c["n"] > 1 else f"{c['mean']:.1f}"
                if c["n"] < expected[(m, t)]:
                    text += f" (n={c['n']} of {expected[(m, t)]})"
                    short = True
                row.append(text)
            else:
                failed = any(r["method"] == m and r["task"] == t for r in s["failures"])
                row.append("failed" if failed else "not run yet")
        avg = s["per_method"].get(m, {}).get("average")
        partial = any(s["cells"][(m, t)]["n"] < expected[(m, t)] for t in s["tasks"] if (m, t) in s["cells"])
        avg_text = "" if avg is None else f"{avg:.1f}" + ("*" if partial else "")
        lines.append(f"| {m} | " + " | ".join(row) + f" | {avg_text} |")
    if short:
        lines += ["", "(n=k of N): only k of that cell's N seeds finished; * an average over such cells."]
    lines += ["", "## Cost", "", "| method | trainable params | % of model | train step (ms, median) | "
              "peak memory (MiB) | saved size | parameters saved |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, c in s["per_method"].items():
        lines.append(f"| {m} | {c['trainable_params']:,} | {100 * c['trainable_params'] / c['total_params']:.3f} | "
                     f"{c['step_ms']:.0f} | {c['peak_memory_mib']:,.0f} | {_fmt_bytes(c['adapter_bytes'])} | "
                     f"{c['changed_params']:,} |")
    if s["pending"]:
        lines += ["", f"{len(s['pending'])} cell(s) have not run yet; running the same `peftkit bench` command "
                  "again runs them and keeps the finished ones."]
    if s["failures"]:
        lines += ["", "## Cells that did not finish", ""]
        lines += [f"- {r['method']} / {r['task']} / seed {r['seed']}: {r['error']}" for r in s["failures"]]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def _label_places(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float, tuple[int, int], str]]:
    """Where each point's label goes (offset in points, alignment) so that labels of nearby points do not
    overlap: above right by default, else below right, above left or below left, whichever first clears
    the labels placed so far; points that nearly coincide share one label (``"lora / dora"``).
    Positions are estimated in axes fractions (x on a log scale) for the 7 x 4.5 inch plot at font
    size 8; ``points`` holds ``(name, trainable parameters, metric)``."""
    if not points:
        return []
    xs = [math.log10(max(x, 1)) for _, x, _ in points]
    ys = [y for _, _, y in points]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    char_w, line_h, pt_x, pt_y = 0.012, 0.045, 1 / 400, 1 / 243  # axes fraction per character / line / point
    groups: list[list] = []  # points that (nearly) coincide share one label, "lora / dora"
    for (name, x, y), lx in sorted(zip(points, xs), key=lambda p: (p[1], p[0][2])):
        fx, fy = (lx - min(xs)) / x_span * 0.9, (y - min(ys)) / y_span * 0.9
        if groups and abs(fx - groups[-1][3]) < 0.02 and abs(fy - groups[-1][4]) < 0.02:
            groups[-1][0] += f" / {name}"
        else:
            groups.append([name, x, y, fx, fy])
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for name, x, y, fx, fy in groups:
        width = char_w * len(name)
        for (dx, dy), align in (((5, 4), "left"), ((5, -12), "left"), ((-5, 4), "right"), ((-5, -12), "right")):
            left = fx + dx * pt_x - (width if align == "right" else 0)
            bottom = fy + dy * pt_y
            box = (left, bottom, left + width, bottom + line_h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        out.append((name, x, y, (dx, dy), align))
    return out


def _plots(s: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    pm = s["per_method"]
    if not pm:
        return names
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = []
    for m, c in pm.items():
        means = [s["cells"][(m, t)]["mean"] for t in s["tasks"] if (m, t) in s["cells"]]
        if not means:
            continue
        partial = c["average"] is None  # some task not finished: an average over fewer tasks, drawn hollow
        y = statistics.fmean(means) if partial else c["average"]
        ax.scatter(c["trainable_params"], y, s=40, **({"facecolors": "none", "edgecolors": "C0"} if partial else {}))
        points.append((f"{m} (partial)" if partial else m, c["trainable_params"], y))
    for m, x, y, offset, align in _label_places(points):
        ax.annotate(m, (x, y), textcoords="offset points", xytext=offset, fontsize=8, ha=align)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("average dev metric x100 over tasks")
    ax.set_title("quality vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_params.png", dpi=110)
    plt.close(fig)
    names.append("metric_vs_params.png")
    for key, label, fname in (("step_ms", "train step time (ms, median)", "step_time.png"),
                              ("peak_memory_mib", "peak memory (MiB)", "memory.png")):
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(pm) + 1.2))
        methods = list(pm)
        ax.barh(methods, [pm[m][key] for m in methods], color="#4C72B0")
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    return names
