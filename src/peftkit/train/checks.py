"""Up-front checks for runs: option types, devices, model folders, output folders and the JSON files that a
run reads back. Each raises before anything is written, naming the offending value and what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from peftkit.config import ConfigError, check, conforms, describe_type, non_finite

SEED_MAX = 2**32 - 1
"""Largest accepted seed (numpy's generators take 32-bit seeds)."""

RUN_FILES = ("run_config.json", "metrics.json", "adapter_config.json", "adapter_model.safetensors", "model",
             "checkpoints", "train.log")
"""What a run writes into its folder; ``run_config.json`` first, so that removing them in this order
never leaves a folder that ``peftkit eval`` accepts with files of two runs."""


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a JSON value) has the type ``hint`` (the rule every config applies to its own
    fields, :func:`peftkit.config.conforms`) and, when it is a number, is finite."""
    return conforms(value, hint) and not (isinstance(value, float) and non_finite(value))


def check_field_types(obj: Any, where: str = "", names: typing.Iterable[str] | None = None) -> None:
    """Check the dataclass ``obj``'s fields (or only ``names``) against their type hints.

    Raises:
        ConfigError: ``"<where><field>=<value> has the wrong type; expected <type>"``.
    """
    try:
        hints = typing.get_type_hints(type(obj))
    except NameError:  # a plugin's config whose hints cannot be resolved: nothing to check against
        return
    wanted = set(names) if names is not None else None
    for f in dataclasses.fields(obj):
        if (wanted is None or f.name in wanted) and f.name in hints:
            value = getattr(obj, f.name)
            check(conforms(value, hints[f.name]),
                  f"{where}{f.name}={value!r} has the wrong type; expected {describe_type(hints[f.name])}")
            check(fits(value, hints[f.name]), f"{where}{f.name}={value!r} is not valid: numbers must be finite")


def as_device(value: Any, label: str) -> torch.device:
    """``value`` as a ``torch.device``.

    Raises:
        ConfigError: ``"<label> is not a device; ..."`` when torch does not read it as one.
    """
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{label} is not a device; use cpu, cuda, cuda:N or mps") from None


def check_device(device: str | None, option: str = "--device") -> None:
    """Check that ``device`` names a device this machine has (None: automatic, always fine).

    Raises:
        ConfigError: not a device string, no such backend available, or a device index out of range.
    """
    if device is None:
        return
    dev = as_device(device, f"{option} {device!r}")
    if dev.type == "cpu":
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    check(available is not None and available(),
          f"{option} {device!r}: this machine has no {dev.type} device available to torch {torch.__version__}; "
          "use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None:
        check(dev.index < count(), f"{option} {device!r}: this machine has {count()} {dev.type} device(s), "
                                   f"numbered 0 to {count() - 1}")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
"""Files that hold a tokenizer's vocabulary (without one, transformers builds an empty tokenizer)."""


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds a tokenizer vocabulary (one of :data:`TOKENIZER_FILES`)."""
    return any((Path(folder) / n).is_file() for n in TOKENIZER_FILES)


def check_model_dir(path: str, option: str = "--model", tokenizer: bool = True) -> None:
    """Check that ``path`` is an HF model folder peftkit can load: ``config.json`` (a JSON object with a
    ``model_type``), safetensors weights (their header is read) and (with ``tokenizer``) a tokenizer vocabulary.

    Raises:
        FileNotFoundError: not a folder, or a file missing (the message says when only a pickle
            ``pytorch_model.bin`` is there, which peftkit does not load).
        ConfigError: a damaged ``config.json`` or ``model.safetensors`` (the message names the file).
    """
    folder = Path(path)
    needs = "a model folder needs config.json, model.safetensors and tokenizer files, as save_pretrained writes them"
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {str(path)!r} is not a folder; give a local HF model folder "
                                "(config.json + model.safetensors); nothing is downloaded (a hub id names no folder "
                                "here: the embedded all-MiniLM-L6-v2 is the default, stories260K is shipped)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{option} {str(path)!r} has no config.json; {needs}")
    config = read_json_object(folder / "config.json", needs)
    check(isinstance(config.get("model_type"), str),
          f"{str(folder / 'config.json')!r} has no \"model_type\"; {needs}")
    if not any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (folder / n).is_file()]
        detail = (f"only {pickled[0]}, a pickle file, which peftkit does not load; re-save the model with "
                  "save_pretrained(safe_serialization=True)") if pickled else needs
        raise FileNotFoundError(f"{option} {str(path)!r} has no model.safetensors ({detail})")
    weights = folder / "model.safetensors"
    if weights.is_file():
        try:
            with safe_open(weights, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{str(weights)!r} is not a readable safetensors file ({err}); {needs}") from None
    if tokenizer and not has_tokenizer_files(folder):
        raise FileNotFoundError(f"{option} {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the model's tokenizer into it with tokenizer.save_pretrained")


def hold_lock(path: Path) -> int | None:
    """An exclusive, non-blocking ``flock`` on ``path`` (a folder is locked itself, no file is made; a file
    is created if missing): the open descriptor, to be closed to let go (a child process that inherits it
    holds the lock too). None where file locks are not available.

    Raises:
        BlockingIOError: another open of ``path`` holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BlockingIOError(f"{str(path)!r} is locked by another process") from None
    return fd


def unwritable_problem(out: Path, option: str, beside: bool = False) -> str | None:
    """Why no folder ``out`` can be written (None when one can): a file stands where a parent folder would go,
    or no folder can be made in the nearest folder that exists (``out`` itself, when it exists; with ``beside``
    its parent, for writes staged next to ``out``). A hidden folder is made there and removed again, since
    ``os.access`` alone passes for root and on special filesystems; so the refusal comes before any work."""
    start = out.parent if beside else out
    anchor = next(p for p in (start, *start.parents) if p.exists() or p.is_symlink())
    if not anchor.is_dir():
        return (f"{option} {str(out)!r} cannot be written: {str(anchor)!r} is a file, not a folder; give a path "
                "in a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".peftkit-probe-", dir=anchor))
    except OSError as err:
        return (f"{option} {str(out)!r} cannot be written: no folder can be made in {str(anchor)!r} "
                f"({err.strerror}); give a path in a folder you can write to")
    return None


def output_dir_problem(out: Path, overwrite: bool, option: str = "--output-dir") -> str | None:
    """Why ``out`` cannot take a new run (None when it can): a file, a path that cannot be written
    (:func:`unwritable_problem`), or a non-empty folder without ``overwrite``."""
    if out.exists() and not out.is_dir():
        return f"{option} {str(out)!r} is a file, not a folder; give a new or empty folder"
    problem = unwritable_problem(out, option)
    if problem:
        return problem
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        return (f"{option} {str(out)!r} is not empty (it holds {', '.join(entries[:3])}"
                f"{', ...' if len(entries) > 3 else ''}); pass --overwrite to replace the run in it, or give a "
                "new folder")
    return None


def clear_run_files(out: Path) -> None:
    """Remove the files of an earlier run from ``out`` (those in :data:`RUN_FILES`, in that order); other
    files are kept."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


#: name prefix of the hidden folder in a run folder that holds an earlier run's files while ``--overwrite``
#: replaces them (:func:`set_aside_run_files`)
ASIDE_PREFIX = ".peftkit-replaced-"


def set_aside_run_files(out: Path) -> Path | None:
    """Move the files of an earlier run in ``out`` (those in :data:`RUN_FILES`, in that order) into a new
    hidden folder ``out/.peftkit-replaced-<random suffix>`` (never one that an earlier interrupted run left
    there), so that a new run can be written in their place and they can be put back if it fails
    (:func:`restore_run_files`); returns that folder, or None when ``out`` holds no run file. Renames only:
    nothing is copied or deleted; should one fail (a run file on another mount, an interrupt), those already
    moved are put back before the error is raised."""
    present = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    if not present:
        return None
    aside = Path(tempfile.mkdtemp(prefix=ASIDE_PREFIX, dir=out))
    moved: list[str] = []
    try:
        for name in present:
            os.replace(out / name, aside / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            os.replace(aside / name, out / name)
        aside.rmdir()
        raise
    return aside


def drop_set_aside_runs(out: Path) -> None:
    """Delete every earlier run that ``--overwrite`` set aside in ``out``: called when a run there has finished
    (also a resumed one, whose interrupted start kept the earlier run aside in case the user wanted it back)."""
    for folder in out.glob(f"{ASIDE_PREFIX}*"):
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)


def restore_run_files(out: Path, aside: Path) -> None:
    """Undo :func:`set_aside_run_files`: remove what a failed run wrote into ``out`` (its run files) and move
    the earlier run's files back; ``aside`` is then removed."""
    clear_run_files(out)
    for name in RUN_FILES:
        if (aside / name).exists() or (aside / name).is_symlink():
            os.replace(aside / name, out / name)
    aside.rmdir()


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        FileNotFoundError: no such file. ConfigError: not UTF-8 JSON, or not an object; the message names
            ``path`` and says what it should be (``what``).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({err}); {what}") from None
    check(isinstance(data, dict), f"{str(path)!r} holds a JSON {type(data).__name__}, not an object; {what}")
    return data
