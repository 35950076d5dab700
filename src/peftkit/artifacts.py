"""Working with saved adapters as files: load base + adapter from a folder, merge adapter folders into a
new one (``peftkit merge``), and export a plain transformers model with an adapter merged in
(``peftkit export --merge``).

An adapter folder is either a run folder written by ``peftkit train`` (its ``run_config.json`` says
which base model and task it belongs to) or any HF PEFT adapter folder, for which the base comes from
``--model`` or the adapter's ``base_model_name_or_path`` and the model class from its ``task_type``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from peftkit.config import WEIGHTS_NAME, PeftConfig, check
from peftkit.formats.hf_peft import atomic_write_bytes, save_adapter

HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def _run_config(folder: Path) -> dict[str, Any] | None:
    for candidate in (folder / "run_config.json", folder.parent / "run_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def load_base_for(adapter_dir: str | os.PathLike, model_dir: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The base model (and its tokenizer, or None) that the adapter in ``adapter_dir`` was trained on.

    Raises:
        FileNotFoundError: no base model folder can be found. ConfigError: the adapter config is invalid.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    from peftkit.train.run import RunConfig, _load_model_and_tokenizer

    folder = Path(adapter_dir)
    config = PeftConfig.from_pretrained(folder)
    run = _run_config(folder)
    if run is not None and model_dir is None:
        fields = set(RunConfig.__dataclass_fields__)
        cfg = RunConfig(**{k: v for k, v in run.items() if k in fields})
        return _load_model_and_tokenizer(cfg, run.get("num_labels"), run.get("task") == "stsb")
    source = model_dir or config.base_model_name_or_path
    if not source or not Path(source).is_dir():
        raise FileNotFoundError(f"cannot find the base model of {str(folder)!r}: pass --model DIR (the adapter "
                                f"names {config.base_model_name_or_path!r})")
    hf_logging.set_verbosity_error()
    if config.task_type == "SEQ_CLS":
        num_labels = _head_rows(folder)
        model = AutoModelForSequenceClassification.from_pretrained(source, **({"num_labels": num_labels}
                                                                              if num_labels else {}))
    elif config.task_type == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(source)
    else:
        model = AutoModel.from_pretrained(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _head_rows(folder: Path) -> int | None:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        return None
    with safe_open(path, "pt") as fh:
        for key in fh.keys():
            if key.endswith(HEAD_SUFFIXES):
                return fh.get_slice(key).get_shape()[0]
    return None


def merge_adapter_folders(adapter_dirs: Sequence[str | os.PathLike], weights: Sequence[float], output_dir: str,
                          combination_type: str = "cat", model_dir: str | None = None, heads_from: int = 0,
                          **kwargs: Any) -> dict[str, Any]:
    """Combine saved LoRA adapters into a new adapter folder (see :func:`peftkit.merging.add_weighted_adapter`).

    The new folder holds the combined adapter in HF PEFT format and, when the first adapter came from a
    run folder, a copy of its ``run_config.json`` so that ``peftkit eval --adapter`` works on it.

    Args:
        adapter_dirs / weights: the adapters and one weight each.
        output_dir: where the new adapter goes (must not exist yet, or be empty).
        combination_type: ``cat`` (default, exact), ``svd``, ``ties``, ``dare_linear``, ...
        heads_from: index of the adapter whose ``modules_to_save`` (e.g. classifier head) is kept.

    Raises:
        ConfigError: mismatched arguments or adapters that cannot be combined; FileNotFoundError.
    """
    from peftkit.model import PeftModel

    check(len(adapter_dirs) >= 2, f"merge needs at least two adapters, got {len(adapter_dirs)}")
    check(len(weights) == len(adapter_dirs), f"got {len(adapter_dirs)} adapters and {len(weights)} weights")
    check(0 <= heads_from < len(adapter_dirs), f"heads_from={heads_from} must index one of the adapters")
    out = Path(output_dir)
    check(not out.exists() or not any(out.iterdir()), f"output folder {output_dir!r} exists and is not empty")
    base, _ = load_base_for(adapter_dirs[0], model_dir)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(folder, adapter_name=name)
    has_heads = bool(model.base_model.modules_to_save_names())
    model.add_weighted_adapter(names, list(weights), "merged", combination_type,
                               modules_to_save_from=names[heads_from] if has_heads else None, **kwargs)
    save_adapter(model, "merged", out)
    run = _run_config(Path(adapter_dirs[0]))
    if run is not None:
        run = {**run, "output_dir": str(out), "merged_from": [str(d) for d in adapter_dirs],
               "merge_weights": list(weights), "combination_type": combination_type}
        atomic_write_bytes(out / "run_config.json", (json.dumps(run, indent=2) + "\n").encode())
    return {"output_dir": str(out), "rank": model.peft_config["merged"].r,
            "tensors": len(model.base_model.adapter_tensors("merged"))}


def export_merged(adapter_dir: str | os.PathLike, output_dir: str, model_dir: str | None = None,
                  overwrite: bool = False) -> str:
    """Write a plain transformers model folder with the adapter merged in (loadable by ``from_pretrained``
    alone, outputs equal to the adapted model). Written to a temporary folder and renamed into place.

    Raises:
        ConfigError: ``output_dir`` exists and ``overwrite`` is False, or the method cannot merge.
    """
    from peftkit.model import PeftModel

    out = Path(output_dir)
    check(overwrite or not out.exists(), f"output folder {output_dir!r} exists; pass --overwrite to replace it")
    base, tokenizer = load_base_for(adapter_dir, model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    plain = model.merge_and_unload()
    _mark_untied(plain)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        plain.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(out)


def _mark_untied(model: torch.nn.Module) -> None:
    """A merged input embedding no longer shares its tensor with the output layer: record that in the
    config so that loading does not tie them again."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None or get_in() is None:
        return
    if get_in().weight is not get_out().weight and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False

