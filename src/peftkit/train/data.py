"""Tasks and data: the shipped GLUE tasks, user files (CSV/TSV/JSONL), tokenisation and collation.

A task yields examples ``{"text": str, "text_pair": str | None, "label": int | float}``. Examples are
tokenised once, up front, without padding; :func:`collate` pads each batch to its own longest row.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

Example = dict[str, Any]


class DataError(ValueError):
    """A data file or task cannot be read; the message names the file, row or column."""


@dataclass
class Task:
    """A text-classification or regression task.

    Attributes:
        name: CLI name (``sst2``, ``rte``, ...).
        num_labels: classes (1 for regression).
        metric: the headline metric name (``accuracy``, ``matthews``, ``pearson``, ``f1``).
        label_names: class names in id order, when labels were strings.
        train / dev: the examples.
    """

    name: str
    num_labels: int
    metric: str
    train: list[Example]
    dev: list[Example]
    label_names: list[str] | None = None
    is_regression: bool = False
    extra_metrics: tuple[str, ...] = field(default_factory=tuple)


def shipped_data_dir() -> Path:
    """The folder of datasets shipped inside the package (SST-2, RTE, CoLA, STS-B, TREC as prompt/response
    JSONL for causal-LM fine-tuning); see its PROVENANCE.md."""
    return Path(str(resources.files("peftkit") / "datasets"))


SHIPPED_MODELS = ("stories260K",)


def shipped_model_dir(name: str = "stories260K") -> Path:
    """The folder of a model shipped inside the package (HF format): ``stories260K``, a 260K-parameter
    Llama trained on TinyStories (llama2.c, MIT licence; see its PROVENANCE.md).

    Raises:
        DataError: ``name`` is not a shipped model.
    """
    if name not in SHIPPED_MODELS:
        raise DataError(f"no shipped model {name!r}; shipped models: {', '.join(SHIPPED_MODELS)}")
    return Path(str(resources.files("peftkit") / "models" / name))


def _read_tsv(path: Path, header: bool = True, encoding: str = "utf-8") -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    with open(path, encoding=encoding, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if header:
        return rows[0], rows[1:]
    return [], rows


def _glue(folder: Path, split: str, cols: dict[str, int | str], label_map: dict[str, int] | None = None,
          header: bool = True, regression: bool = False, encoding: str = "utf-8") -> list[Example]:
    head, rows = _read_tsv(folder / f"{split}.tsv", header, encoding)
    idx = {k: (head.index(v) if isinstance(v, str) else v) for k, v in cols.items()}
    out = []
    for n, row in enumerate(rows, start=2 if header else 1):
        if not row:
            continue
        try:
            raw = row[idx["label"]]
            label: float | int = float(raw) if regression else (label_map[raw] if label_map else int(raw))
            out.append({"text": row[idx["text"]], "text_pair": row[idx["text_pair"]] if "text_pair" in idx else None,
                        "label": label})
        except (IndexError, KeyError, ValueError) as err:
            raise DataError(f"{folder / (split + '.tsv')}: row {n} cannot be read ({err!r}): {row[:4]}") from err
    return out


def _glue_task(name: str, folder: str, metric: str, cols: dict, num_labels: int, label_names=None, **kw):
    def load(data_dir: str | os.PathLike | None) -> Task:
        root = Path(data_dir) if data_dir else shipped_data_dir()
        if not (root / folder).is_dir():
            raise DataError(f"task {name!r} needs {root / folder}/{{train,dev}}.tsv (GLUE format); "
                            "pass --data-dir pointing at the folder that holds it")
        label_map = {n: i for i, n in enumerate(label_names)} if label_names and kw.get("strings") else None
        extra = {k: v for k, v in kw.items() if k in ("header", "regression", "encoding")}
        return Task(name=name, num_labels=num_labels, metric=metric, label_names=label_names,
                    train=_glue(root / folder, "train", cols, label_map, **extra),
                    dev=_glue(root / folder, "dev", cols, label_map, **extra),
                    is_regression=kw.get("regression", False), extra_metrics=kw.get("extra", ()))
    return load


TASKS: dict[str, Callable[[str | None], Task]] = {
    "sst2": _glue_task("sst2", "SST-2", "accuracy", {"text": "sentence", "label": "label"}, 2, ["negative", "positive"]),
    "rte": _glue_task("rte", "RTE", "accuracy", {"text": "sentence1", "text_pair": "sentence2", "label": "label"}, 2,
                      ["entailment", "not_entailment"], strings=True),
    "cola": _glue_task("cola", "CoLA", "matthews", {"text": 3, "label": 1}, 2, ["unacceptable", "acceptable"],
                       header=False, extra=("accuracy",)),
    "stsb": _glue_task("stsb", "STS-B", "pearson", {"text": "sentence1", "text_pair": "sentence2", "label": "score"},
                       1, regression=True, extra=("spearman",)),
    "mrpc": _glue_task("mrpc", "MRPC", "f1", {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}, 2,
                       ["not_paraphrase", "paraphrase"], encoding="utf-8-sig", extra=("accuracy",)),
}


def load_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """Load a GLUE task by name (``sst2``, ``rte``, ``cola``, ``stsb`` shipped; ``mrpc`` from ``data_dir``).

    Raises:
        DataError: unknown task name (the message lists the known ones) or unreadable files.
    """
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or give --train-file)")
    return TASKS[key](data_dir)


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``.csv``, ``.tsv`` (header row required) or ``.jsonl`` file as dicts.

    Raises:
        DataError: missing file, unknown extension, or a malformed JSON line (its number is given).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{p}: line {n} is not valid JSON ({err})") from err
        return rows
    if suffix in (".csv", ".tsv"):
        with open(p, encoding="utf-8-sig", newline="") as fh:
            if suffix == ".tsv":
                return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
            return list(csv.DictReader(fh))
    raise DataError(f"{p}: unknown file type {suffix!r}; expected .csv, .tsv or .jsonl")


def examples_from_rows(rows: list[dict[str, Any]], text_column: str | None, label_column: str,
                       pair_column: str | None = None, source: str = "data",
                       label_names: Sequence[str] | None = None) -> tuple[list[Example], list[str] | None]:
    """Turn table rows into examples; string labels are mapped to ids (sorted, or by ``label_names``).

    Returns:
        ``(examples, label_names or None)``.

    Raises:
        DataError: a column is missing (the message lists the columns present) or a label is unknown.
    """
    if not rows:
        raise DataError(f"{source} has no rows")
    columns = list(rows[0])
    if text_column is None:
        text_column = next((c for c in ("sentence", "text", "sentence1") if c in columns), None)
    for col, what in ((text_column, "text"), (label_column, "label"), (pair_column, "pair")):
        if (col is not None and col not in columns) or (col is None and what == "text"):
            raise DataError(f"{source}: no {what} column {col!r}; columns present: {columns}")
    raw = [r[label_column] for r in rows]
    numeric = all(isinstance(v, (int, float)) or (isinstance(v, str) and _is_int(v)) for v in raw)
    names = list(label_names) if label_names else (None if numeric else sorted({str(v) for v in raw}))
    mapping = {n: i for i, n in enumerate(names)} if names else None
    out = []
    for n, row in enumerate(rows):
        value = row[label_column]
        if mapping is not None:
            if str(value) not in mapping:
                raise DataError(f"{source}: row {n + 1} has label {value!r}, not one of {names}")
            label = mapping[str(value)]
        else:
            label = int(value)
        out.append({"text": str(row[text_column]), "text_pair": str(row[pair_column]) if pair_column else None,
                    "label": label})
    return out, names


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples tokenised once; items are dicts of 1-D ``input_ids`` (and friends) plus ``labels``."""

    def __init__(self, examples: list[Example], tokenizer: Any, max_length: int, regression: bool = False) -> None:
        texts = [e["text"] for e in examples]
        pairs = [e["text_pair"] for e in examples]
        kwargs = dict(truncation=True, max_length=max_length)
        enc = tokenizer(texts, pairs, **kwargs) if any(p is not None for p in pairs) else tokenizer(texts, **kwargs)
        self.features = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.labels = [e["label"] for e in examples]
        self.regression = regression

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.features.items()}
        item["labels"] = self.labels[i]
        return item


def collate(pad_token_id: int, regression: bool = False) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
    """A collate function padding ``input_ids`` with ``pad_token_id`` (masks and type ids with 0) on the right."""

    def fn(items: list[dict[str, Any]]) -> dict[str, Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        batch: dict[str, Tensor] = {}
        for key in items[0]:
            if key == "labels":
                continue
            pad = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([list(it[key]) + [pad] * (longest - len(it[key])) for it in items])
        labels = [it["labels"] for it in items]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return batch

    return fn


class CausalLMDataset(torch.utils.data.Dataset):
    """Causal-LM examples: plain text (every token is a target) or prompt/response pairs (the prompt is
    masked out of the loss with -100). Items are dicts of ``input_ids`` and ``labels`` (lists of ints).

    Rows longer than ``max_length`` tokens are cut: plain text at the end; a prompt/response pair keeps
    its response (cut only if the response alone is too long) and drops tokens from the start of the
    prompt, after a leading BOS. Rows left with no target token are skipped (``skipped`` counts them).

    Raises:
        DataError: a record has neither a text nor a prompt/response field.
    """

    def __init__(self, records: list[dict[str, Any]] | list[str], tokenizer: Any, max_length: int,
                 prompt_key: str = "prompt", response_key: str = "response", text_key: str = "text") -> None:
        self.items: list[dict[str, list[int]]] = []
        self.skipped = 0
        eos = tokenizer.eos_token or ""
        bos = getattr(tokenizer, "bos_token_id", None)
        for n, rec in enumerate(records):
            if isinstance(rec, str):
                rec = {text_key: rec}
            if prompt_key in rec and response_key in rec:
                prompt = tokenizer(str(rec[prompt_key]))["input_ids"]
                answer = tokenizer(str(rec[response_key]) + eos, add_special_tokens=False)["input_ids"]
                answer = answer[: max_length - 1]
                room = max_length - len(answer)
                if len(prompt) > room:
                    keep = 1 if bos is not None and prompt[:1] == [bos] else 0
                    prompt = prompt[:keep] + prompt[len(prompt) - (room - keep):]
                ids = prompt + answer
                labels = [-100] * len(prompt) + answer
            elif text_key in rec:
                ids = tokenizer(str(rec[text_key]) + eos)["input_ids"][:max_length]
                labels = list(ids)
            else:
                raise DataError(f"record {n + 1} has neither {text_key!r} nor {prompt_key!r}/{response_key!r}: "
                                f"keys {sorted(rec)}")
            if any(label != -100 for label in labels[1:]):
                self.items.append({"input_ids": ids, "labels": labels})
            else:
                self.skipped += 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def collate_causal(pad_token_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, Tensor]]:
    """Right-pad ``input_ids`` (``pad_token_id``), ``labels`` (-100) and build ``attention_mask``."""

    def fn(items: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        ids, labels, mask = [], [], []
        for it in items:
            gap = longest - len(it["input_ids"])
            ids.append(it["input_ids"] + [pad_token_id] * gap)
            labels.append(it["labels"] + [-100] * gap)
            mask.append([1] * len(it["input_ids"]) + [0] * gap)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}

    return fn
