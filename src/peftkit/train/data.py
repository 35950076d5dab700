"""Tasks and data: the shipped GLUE tasks, user files (CSV/TSV/JSONL), tokenisation and collation.

A task yields examples ``{"text": str, "text_pair": str | None, "label": int | float}``. Examples are
tokenised once, up front, without padding; :func:`collate` pads each batch to its own longest row.
"""

from __future__ import annotations

import csv
import json
import math
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
        named_labels: the task's files give labels as class names (else as class ids).
    """

    name: str
    num_labels: int
    metric: str
    train: list[Example]
    dev: list[Example]
    label_names: list[str] | None = None
    is_regression: bool = False
    extra_metrics: tuple[str, ...] = field(default_factory=tuple)
    named_labels: bool = False


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


def _read_tsv(path: Path, header: bool = True, encoding: str = "utf-8-sig") -> tuple[list[str], list[list[str]]]:
    """The header (``[]`` when ``header`` is False) and the rows of a GLUE ``.tsv`` file (no quoting).

    Raises:
        DataError: a missing file, text that is not UTF-8, or a file with no row of data.
    """
    if not path.is_file():
        raise DataError(_not_a_file(path))
    try:
        with open(path, encoding=encoding, newline="") as fh:
            rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save the file as UTF-8") from None
    head, body = (rows[0], rows[1:]) if header and rows else ([], rows)
    if not body:
        raise DataError(f"{path}: the file holds no row of data" + (" (only a header)" if head else ""))
    return head, body


def _glue(path: Path, cols: dict[str, int | str], num_labels: int,
          label_map: dict[str, int] | None = None, header: bool = True, regression: bool = False,
          encoding: str = "utf-8-sig") -> list[Example]:
    """The rows of the GLUE file ``path``; a label outside ``0..num_labels-1`` (a score that is not a finite
    number, for regression) is a :class:`DataError` naming the file, the row and the value."""
    head, rows = _read_tsv(path, header, encoding)
    missing = [v for v in cols.values() if isinstance(v, str) and v not in head]
    if missing:
        raise DataError(f"{path}: the header has no column {missing[0]!r}; its columns are {head}")
    idx = {k: (head.index(v) if isinstance(v, str) else v) for k, v in cols.items()}
    width = len(head) if header else None
    out = []
    for n, row in enumerate(rows, start=2 if header else 1):
        if width is not None and len(row) != width:
            raise DataError(f"{path}: row {n} has {len(row)} field(s) but the header has {width} ({head}); GLUE "
                            ".tsv files have no quoting, so a field cannot hold a tab")
        try:
            raw = row[idx["label"]]
            label: float | int = float(raw) if regression else (label_map[raw] if label_map else int(raw))
            out.append({"text": row[idx["text"]], "text_pair": row[idx["text_pair"]] if "text_pair" in idx else None,
                        "label": label})
        except KeyError:
            raise DataError(f"{path}: row {n}: the label {raw!r} is not valid; this task's labels are "
                            f"{list(label_map)}") from None
        except (IndexError, ValueError) as err:
            raise DataError(f"{path}: row {n} cannot be read ({err!r}): {row[:4]}") from err
        if regression and not math.isfinite(label):
            raise DataError(f"{path}: row {n}: the score {raw!r} is not a finite number")
        if not regression and not 0 <= label < num_labels:
            raise DataError(f"{path}: row {n}: the label {raw!r} is not valid; this task's labels are 0..{num_labels - 1}")
    return out


@dataclass(frozen=True)
class TaskSpec:
    """What a named task is, without reading its data (what serving a trained run needs).

    Attributes:
        name: CLI name (``sst2``, ...).
        num_labels: classes (1 for regression).
        label_names: class names in id order, or None.
        is_regression: the label is a score (STS-B).
        sentence_pair: each example is two sentences, encoded as a pair.
        folder: the task's folder in a GLUE data folder (``SST-2``, ...), holding ``train.tsv`` and ``dev.tsv``.
    """

    name: str
    num_labels: int
    label_names: tuple[str, ...] | None
    is_regression: bool
    sentence_pair: bool
    folder: str

    def missing_files(self, data_dir: str | os.PathLike | None) -> list[str]:
        """The task's files that ``data_dir`` (None: the shipped datasets) lacks, as paths."""
        root = Path(data_dir) if data_dir else shipped_data_dir()
        return [str(root / self.folder / f"{split}.tsv") for split in ("train", "dev")
                if not (root / self.folder / f"{split}.tsv").is_file()]


TASK_SPECS: dict[str, TaskSpec] = {}
"""The named tasks' :class:`TaskSpec`, by CLI name (filled in with :data:`TASKS`)."""


def _glue_task(name: str, folder: str, metric: str, cols: dict, num_labels: int, label_names=None, **kw):
    TASK_SPECS[name] = TaskSpec(name, num_labels, tuple(label_names) if label_names else None,
                                kw.get("regression", False), "text_pair" in cols, folder)

    def load(data_dir: str | os.PathLike | None) -> Task:
        root = Path(data_dir) if data_dir else shipped_data_dir()
        if not (root / folder).is_dir():
            where = "is not shipped (Microsoft's licence)" if name == "mrpc" and not data_dir else f"is not in {root}"
            raise DataError(f"task {name!r} {where}; pass --data-dir pointing at a folder with "
                            f"{folder}/{{train,dev}}.tsv (GLUE format)")
        return Task(name=name, num_labels=num_labels, metric=metric, label_names=label_names,
                    train=read(root / folder / "train.tsv"), dev=read(root / folder / "dev.tsv"),
                    is_regression=kw.get("regression", False), extra_metrics=kw.get("extra", ()),
                    named_labels=label_map is not None)

    label_map = {n: i for i, n in enumerate(label_names)} if label_names and kw.get("strings") else None
    extra = {k: v for k, v in kw.items() if k in ("header", "regression", "encoding")}

    def read(path: Path) -> list[Example]:
        return _glue(path, cols, num_labels, label_map, **extra)

    def own_format(path: Path) -> bool:
        """Whether ``path`` is a .tsv in the task's own GLUE layout (its header; CoLA: 4 fields, a 0/1 label)."""
        if Path(path).suffix.lower() != ".tsv" or not Path(path).is_file():
            return False
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            first = next(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if kw.get("header", True):
            return all(c in first for c in cols.values() if isinstance(c, str))
        return len(first) == 4 and first[1] in ("0", "1")

    GLUE_FILES[name] = (own_format, read)
    return load


GLUE_FILES: dict[str, tuple[Callable[[Path], bool], Callable[[Path], list[Example]]]] = {}
"""Per named task: ``(own_format(path), read(path))``, to read a file in the task's own GLUE layout (its dev.tsv,
say) as an ``--eval-file``."""


TASKS: dict[str, Callable[[str | None], Task]] = {
    "sst2": _glue_task("sst2", "SST-2", "accuracy", {"text": "sentence", "label": "label"}, 2, ["negative", "positive"]),
    "rte": _glue_task("rte", "RTE", "accuracy", {"text": "sentence1", "text_pair": "sentence2", "label": "label"}, 2,
                      ["entailment", "not_entailment"], strings=True),
    "cola": _glue_task("cola", "CoLA", "matthews", {"text": 3, "label": 1}, 2, ["unacceptable", "acceptable"],
                       header=False, extra=("accuracy",)),
    "stsb": _glue_task("stsb", "STS-B", "pearson", {"text": "sentence1", "text_pair": "sentence2", "label": "score"},
                       1, regression=True, extra=("spearman",)),
    "mrpc": _glue_task("mrpc", "MRPC", "f1", {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}, 2,
                       ["not_paraphrase", "paraphrase"], extra=("accuracy",)),
}


def task_key(name: str) -> str:
    """``name`` as the task tables key it (``SST-2``, ``sts_b`` -> ``sst2``, ``stsb``; ``causal_lm`` -> ``causallm``):
    lower case, without ``-`` and ``_``."""
    return name.lower().replace("-", "").replace("_", "")


def load_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """Load a GLUE task by name (``sst2``, ``rte``, ``cola``, ``stsb`` shipped; ``mrpc`` from ``data_dir``).

    Raises:
        DataError: unknown task name (the message lists the known ones) or unreadable files.
    """
    key = task_key(name)
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, causal-lm (or give --train-file)")
    return TASKS[key](data_dir)


class Row(dict):
    """A table row (column -> value) that remembers its ``line`` in the file (1-based)."""

    def __init__(self, values: dict[str, Any], line: int) -> None:
        super().__init__(values)
        self.line = line


MAX_CLASSES = 10_000
"""Classification labels from files are class ids 0 .. MAX_CLASSES - 1 (or class names)."""


def read_table(path: str | os.PathLike) -> list[Row]:
    """Rows of the ``.csv``, ``.tsv`` (header row required) or ``.jsonl`` file ``path`` (one JSON object per
    line), each a dict column -> value.

    Raises:
        DataError: missing file, unknown extension, text that is not UTF-8, a line that is not a JSON
            object, or a CSV/TSV row with another number of fields than the header (the line is named).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(_not_a_file(p))
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise DataError(f"{p}: unknown file type {suffix!r}; expected .csv, .tsv or .jsonl")
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            return _jsonl_rows(p, fh) if suffix == ".jsonl" else _csv_rows(p, fh, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save the file as UTF-8") from None


def _jsonl_rows(p: Path, fh: Any) -> list[Row]:
    rows = []
    for n, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p}: line {n} is not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise DataError(f"{p}: line {n} is a JSON {type(value).__name__} ({line.strip()[:40]}), not an object; "
                            'each line must be an object such as {"text": "...", "label": 1}')
        rows.append(Row(value, n))
    return rows


def _csv_rows(p: Path, fh: Any, delimiter: str) -> list[Row]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
    header = next(reader, [])
    rows = []
    for fields in reader:
        if not fields:
            continue
        if len(fields) != len(header):
            how = ("a field holds a tab (.tsv files are read without quoting, as GLUE's are: save the file as .csv "
                   "to quote fields)" if delimiter == "\t" else "a field holds a comma unquoted (quote it)")
            raise DataError(f"{p}: line {reader.line_num} has {len(fields)} field(s) but the header has "
                            f"{len(header)} ({header}): a value is missing, or {how}")
        rows.append(Row(dict(zip(header, fields)), reader.line_num))
    return rows


def _at(row: dict[str, Any], index: int) -> str:
    return f"line {row.line}" if isinstance(row, Row) else f"row {index + 1}"


def _label(value: Any, where: str) -> int | str:
    """A class id (int >= 0) or a class name (str) from a raw label; anything else is a DataError."""
    how = ("classification labels must be all integer class ids (0, 1, ...) or all class names (non-numeric "
           "strings); regression from files is not supported")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where} has no label (the value is {'null' if value is None else 'empty'}); give every "
                        "row a label")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where} has the label {value!r}, a JSON {type(value).__name__}; {how}")
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value.strip()
    if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
        raise DataError(f"{where} has the label {value!r}, which is not an integer class id; {how}")
    if not 0 <= number < MAX_CLASSES:
        raise DataError(f"{where} has the class id {value!r}; class ids must lie in 0..{MAX_CLASSES - 1} "
                        "(number the classes 0, 1, ... or give class names)")
    return int(number)


def examples_from_rows(rows: list[dict[str, Any]], text_column: str | None, label_column: str,
                       pair_column: str | None = None, source: str = "data",
                       label_names: Sequence[str] | None = None, label_ids: bool = False,
                       num_labels: int | None = None) -> tuple[list[Example], list[str] | None]:
    """Turn table rows into examples with integer labels.

    A file's labels are either all integer class ids (``0``, ``1``, ``2.0``; ``>= 0`` and below
    :data:`MAX_CLASSES`) or all class names (non-numeric strings, mapped to ids in sorted order).

    Args:
        rows: from :func:`read_table` (its :class:`Row` objects give messages their line numbers).
        text_column: None picks the first of ``sentence``, ``text``, ``sentence1`` present; ``sentence1`` with a
            ``sentence2`` column and no ``pair_column`` makes them a pair.
        label_names: the labels must be these class names (a dev file of a run trained on names).
        label_ids: the labels must be class ids (a dev file of a run trained on ids), below ``num_labels``
            when given.

    Returns:
        ``(examples, label_names or None)``.

    Raises:
        DataError: no rows; a missing column (the message lists the row's columns); a missing text or
            label; a label that is neither a class id nor a name, fractional, negative, too large, or not
            of the file's (or the training file's) kind. Messages name the file, the line and the value.
    """
    if not rows:
        raise DataError(f"{source} has no rows")
    if text_column is None:
        text_column = next((c for c in ("sentence", "text", "sentence1") if c in rows[0]), None)
        if text_column == "sentence1" and pair_column is None and any("sentence2" in row for row in rows):
            pair_column = "sentence2"  # GLUE's names for a pair: the second sentence is not dropped unread
    cols = [(text_column, "text"), (label_column, "label")] + ([(pair_column, "pair")] if pair_column else [])
    labels: list[int | str] = []
    for n, row in enumerate(rows):
        where = f"{source}: {_at(row, n)}"
        for col, what in cols:
            if col is None:  # no --text-column, and none of the usual names is present
                raise DataError(f"{where}: no text column (looked for sentence, text, sentence1); columns present: "
                                f"{list(row)}; name it with --text-column")
            if col not in row:
                flag = {"text": "--text-column", "label": "--label-column", "pair": "--pair-column"}[what]
                raise DataError(f"{where}: no {what} column {col!r}; columns present: {list(row)}; name the right "
                                f"one with {flag}")
            if what != "label" and not isinstance(row[col], (str, int, float)):
                raise DataError(f"{where}: the {what} column {col!r} holds {row[col]!r}, not text")
        labels.append(_label(row[label_column], where))
    first = labels[0]
    for n, (row, label) in enumerate(zip(rows, labels)):
        if isinstance(label, str) != isinstance(first, str):
            raise DataError(f"{source}: {_at(row, n)} has the label {row[label_column]!r} but {_at(rows[0], 0)} "
                            f"has {rows[0][label_column]!r}; labels must be all integer class ids or all class names")
    names = None
    if isinstance(first, str):
        if label_ids:
            raise DataError(f"{source}: {_at(rows[0], 0)} has the class name {first!r} but the training labels "
                            "are integer class ids; give class ids")
        names = list(label_names) if label_names else sorted(set(labels))
        mapping = {name: i for i, name in enumerate(names)}
        for n, (row, label) in enumerate(zip(rows, labels)):
            if label not in mapping:
                raise DataError(f"{source}: {_at(row, n)} has the label {label!r}, not one of {names}")
        labels = [mapping[label] for label in labels]
    elif label_names:
        raise DataError(f"{source}: {_at(rows[0], 0)} has the class id {first!r} but the training labels are "
                        f"class names {list(label_names)}; give class names")
    elif num_labels is not None:
        for n, (row, label) in enumerate(zip(rows, labels)):
            if label >= num_labels:
                raise DataError(f"{source}: {_at(row, n)} has the class id {label}; the run's model has "
                                f"{num_labels} classes (0..{num_labels - 1})")
    out = [{"text": str(row[text_column]), "text_pair": str(row[pair_column]) if pair_column else None,
            "label": label} for row, label in zip(rows, labels)]
    return out, names


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples tokenised once; items are dicts of 1-D ``input_ids`` (and friends) plus ``labels``.

    Args:
        examples: dicts with ``text``, ``text_pair`` (None for single sentences) and ``label``.
        tokenizer: a transformers tokenizer; texts are truncated to ``max_length`` tokens, not padded
            (:func:`collate` pads a batch).
        regression: whether labels are floats (kept as ``self.regression``). Default False.
    """

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


def _not_a_file(path: Path) -> str:
    """The message for a data file path that is not a file: a folder, or nothing."""
    if path.is_dir():
        return f"data file {str(path)!r} is a folder; give the data file itself"
    return f"data file {str(path)!r} does not exist"
