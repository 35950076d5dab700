"""Working with saved adapters as files: load base + adapter from a folder, merge adapter folders into a
new one (``peftkit merge``), and export a plain transformers model with an adapter merged in
(``peftkit export --merge``).

An adapter folder is either a run folder written by ``peftkit train`` (its ``run_config.json`` says
which base model and task it belongs to) or any HF PEFT adapter folder, for which the base comes from
``--model`` or the adapter's ``base_model_name_or_path`` and the model class from its ``task_type`` (without
one, peft's default, the class the base folder was saved as). ``merge`` refuses adapters that name different
base models unless ``--model`` says which one to load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from peftkit.config import CONFIG_NAME, WEIGHTS_NAME, ConfigError, PeftConfig, check, get_method
from peftkit.formats.hf_peft import (
    AdapterLoadError,
    atomic_write_bytes,
    check_adapter_weights,
    current_umask,
    save_adapter,
)
from peftkit.train.checks import check_model_dir, has_tokenizer_files, unwritable_problem

HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def _run_dir(folder: Path) -> Path | None:
    """The run folder that ``folder`` (an adapter folder) belongs to: itself or its parent, or None."""
    return next((d for d in (folder, folder.parent) if (d / "run_config.json").is_file()), None)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# `peftkit merge` / `peftkit export` list the files they wrote here, so that --overwrite replaces only those
MANIFEST = ".peftkit-output.json"


def _output_path(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` as a path with a name: one ending in ``.`` or ``..`` is made absolute (it names that
    folder, which is then replaced whole like any other output folder).

    Raises:
        ConfigError: an empty path.
    """
    check(str(output_dir).strip() != "", f"--output {str(output_dir)!r} is empty; give the folder to write")
    path = Path(output_dir)
    return Path(os.path.abspath(path)) if path.name in ("", "..") else path


def _check_output(out: Path, overwrite: bool, inputs: Sequence[str | os.PathLike | None], what: str) -> None:
    """Refuse an output folder that would lose data: a file, a non-empty folder without ``overwrite``, a folder
    holding anything but the files an earlier merge/export wrote (its :data:`MANIFEST`), or a folder that is or
    holds one of ``inputs`` (``what``: what is written, for the message)."""
    check(not out.is_symlink(), f"--output {str(out)!r} is a symbolic link; give the folder it points to, or a new "
                                "folder")
    check(not out.exists() or out.is_dir(), f"--output {str(out)!r} is a file, not a folder; {what} is written as "
                                            "a folder: give another path")
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    check(blocked is None, f"--output {str(out)!r} lies under {str(blocked)!r}, which is a file: give a path whose "
                           "parent folders are folders")
    _check_writable(out)
    # what --overwrite could not fix is said first (it was advised, then refused)
    for source in inputs:
        check(source is None or not _inside(Path(source), out),
              f"--output {str(out)!r} holds the input folder {str(source)!r}; replacing it would delete the input: "
              "give another output folder")
    if out.exists() and any(out.iterdir()):
        try:
            written = set(json.loads((out / MANIFEST).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            written = set()
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != MANIFEST
                         and (p.is_symlink() or not p.is_file() or p.name not in written))
        check(not foreign, f"--output {str(out)!r} holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, "
                           "which no earlier `peftkit merge` or `peftkit export` wrote there; --overwrite replaces "
                           "only such a folder and would delete them: move them away, or give another folder")
    check(overwrite or not out.exists() or not any(out.iterdir()),
          f"--output {str(out)!r} holds the output of an earlier `peftkit merge` or `peftkit export`; pass "
          "--overwrite to replace it, or give a new folder")


def _check_writable(out: Path) -> None:
    """Refuse an ``out`` whose folder cannot be made where the write stages it (next to ``out``), before any
    work (see :func:`peftkit.train.checks.unwritable_problem`)."""
    problem = unwritable_problem(out, "--output", beside=True)
    if problem:
        raise ConfigError(problem)


def _write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """``write(folder)`` into a new hidden folder next to ``out``, then move it into place, replacing ``out``:
    a failure leaves ``out`` as it was. The folder also gets :data:`MANIFEST`, the names of the files written,
    which a later ``--overwrite`` requires."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private (0700); the result is not
    try:
        write(staging)
        files = sorted(p.name for p in staging.iterdir())
        atomic_write_bytes(staging / MANIFEST, (json.dumps({"files": files}, indent=1) + "\n").encode())
        if out.exists():
            # a fresh name (one named by the pid could be a leftover of an interrupted run of the same pid),
            # and the earlier output is put back should the new one not take its place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _base_sources(adapter_dir: str | os.PathLike, model_dir: str | None) -> list[str | os.PathLike | None]:
    """The folders that loading ``adapter_dir``'s base reads: the adapter, ``model_dir`` or the run's model."""
    from peftkit.train.run import read_run_config

    run_dir = _run_dir(Path(adapter_dir))
    run_model = read_run_config(run_dir)[0].model if run_dir is not None and model_dir is None else None
    named = None  # a plain adapter folder's base: the folder its adapter_config.json names
    if run_dir is None and model_dir is None and (Path(adapter_dir) / CONFIG_NAME).is_file():
        try:
            named = PeftConfig.from_pretrained(Path(adapter_dir)).base_model_name_or_path
        except (ConfigError, ValueError, OSError):
            named = None  # a damaged config fails when the base is loaded, with its own message
    return [adapter_dir, model_dir, run_model, named if named and Path(named).is_dir() else None]


def load_base_for(adapter_dir: str | os.PathLike, model_dir: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The base model (and its tokenizer, or None) that the adapter in ``adapter_dir`` was trained on.

    Raises:
        FileNotFoundError: no base model folder can be found, or it lacks config.json/model.safetensors.
        ConfigError: the adapter config or the run's ``run_config.json`` is invalid.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    from peftkit.train.run import _load_model_and_tokenizer, read_run_config

    folder = Path(adapter_dir)
    config = PeftConfig.from_pretrained(folder)
    run_dir = _run_dir(folder)
    if run_dir is not None and model_dir is None:
        cfg, raw = read_run_config(run_dir)
        cfg.device = None  # merging and exporting use whatever device this machine has
        num_labels = raw.get("num_labels")
        check(num_labels is None or (isinstance(num_labels, int) and num_labels >= 1),
              f"{str(run_dir / 'run_config.json')!r}: num_labels={num_labels!r} must be a positive integer")
        names = raw.get("label_names")
        names = names if isinstance(names, list) and all(isinstance(n, (str, int)) for n in names) else None
        return _load_model_and_tokenizer(cfg, num_labels, raw.get("task") == "stsb", names)
    check(model_dir is None or Path(model_dir).is_dir(), f"--model {str(model_dir)!r} is not a folder; give the "
          "local transformers model folder the adapter was trained on")
    source = model_dir or config.base_model_name_or_path
    if not source or not Path(source).is_dir():
        raise FileNotFoundError(f"cannot find the base model of {str(folder)!r}: pass --model DIR (the adapter "
                                f"names {config.base_model_name_or_path!r})")
    check_model_dir(source, tokenizer=False)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        num_labels = _head_rows(folder)
        auto = AutoModelForSequenceClassification if config.task_type == "SEQ_CLS" else AutoModelForTokenClassification
        model = auto.from_pretrained(source, use_safetensors=True, **({"num_labels": num_labels} if num_labels else {}))
    elif config.task_type == "QUESTION_ANS":
        model = AutoModelForQuestionAnswering.from_pretrained(source, use_safetensors=True)
    elif config.task_type == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True)
    else:  # no task type (peft's default): the class the base folder was saved as, as peft's users load it
        import transformers
        from transformers import AutoConfig

        names = getattr(AutoConfig.from_pretrained(source), "architectures", None) or []
        saved_as = getattr(transformers, names[0], None) if names else None
        model = (saved_as or AutoModel).from_pretrained(source, use_safetensors=True)
        # an adapter made on the bare model inside it (AutoModel's) names that model's modules at its top
        inner = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
        tops = _file_modules(folder)
        first = tops[0] if tops else None
        if first and isinstance(inner, torch.nn.Module) and first not in model._modules and first in inner._modules:
            model = inner
        missing = [name for name in tops if name not in model._modules]
        if missing:
            raise ConfigError(
                f"the adapter in {str(folder)!r} has no task_type, so its base {str(source)!r} is loaded as the class "
                f"the folder was saved as ({type(model).__name__}), which has no module {missing[0]!r}: the adapter "
                "was made on another class of that model (a head such as 'score' or 'classifier' comes with "
                "...ForSequenceClassification). Set \"task_type\" in its adapter_config.json to the task it was "
                "trained for: SEQ_CLS, TOKEN_CLS, QUESTION_ANS or CAUSAL_LM")
    return model, AutoTokenizer.from_pretrained(source) if has_tokenizer_files(source) else None


def _file_modules(folder: Path) -> list[str]:
    """The top-level module names the tensors of the adapter file in ``folder`` sit in, in file order
    (``encoder`` for ``base_model.model.encoder.layer.0...``); empty without a file."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        return []
    prefix = "base_model.model."
    with safe_open(path, "pt") as fh:
        names = [k[len(prefix):].split(".", 1)[0] for k in fh.keys() if k.startswith(prefix)]
    return list(dict.fromkeys(names))


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
                          combination_type: str | None = None, model_dir: str | None = None, heads_from: int = 0,
                          overwrite: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Combine saved LoRA or (IA)^3 adapters into a new adapter folder (see
    :func:`peftkit.merging.add_weighted_adapter`).

    The new folder holds the combined adapter in HF PEFT format and, when an adapter came from a run
    folder, a copy of the first such ``run_config.json`` so that ``peftkit eval --adapter`` works on it. It is
    written to a temporary folder and renamed into place.

    Args:
        adapter_dirs / weights: the adapters and one weight each.
        output_dir: where the new adapter goes (a new or empty folder, or with ``overwrite`` one holding an
            earlier merge's files and nothing else).
        combination_type: LoRA: ``cat`` (the default, exact), ``svd``, ``ties``, ``dare_linear``, ...; (IA)^3:
            ``linear`` (the default and the only one: the vectors' weighted sum, as peft's).
        heads_from: index of the adapter whose ``modules_to_save`` (e.g. classifier head) is kept, and whose
            ``run_config.json`` (task, labels) the output gets when it is a run folder; must be 0 when the
            adapters train no such modules.
        overwrite: replace a non-empty ``output_dir`` that holds an earlier merge's files only (never a file,
            a folder holding an input, or one holding anything else: that is refused, not deleted).

    Raises:
        ConfigError: mismatched arguments; an output that is a file, a non-empty folder without
            ``overwrite``, one that holds an input folder or other files than an earlier merge writes;
            adapters that cannot be combined (only plain LoRA adapters, or (IA)^3 adapters, all of one kind).
            AdapterLoadError: an adapter's weights file is damaged (named, before the base model is loaded) or
            does not fit the base model. FileNotFoundError. All before anything is written.
    """
    from peftkit.layers import ModulesToSaveWrapper
    from peftkit.methods.ia3 import IA3Config
    from peftkit.methods.lora import LoraConfig
    from peftkit.model import PeftModel

    check(len(adapter_dirs) >= 2, f"merge needs at least two adapters, got {len(adapter_dirs)}")
    check(len(weights) == len(adapter_dirs), f"got {len(adapter_dirs)} adapters and {len(weights)} weights")
    check(0 <= heads_from < len(adapter_dirs), f"heads_from={heads_from} must index one of the adapters")
    out = _output_path(output_dir)
    _check_output(out, overwrite, [*adapter_dirs, *_base_sources(adapter_dirs[0], model_dir)[1:]], "the adapter")
    configs = []
    for folder in adapter_dirs:
        config = PeftConfig.from_pretrained(folder)
        check_adapter_weights(folder)  # a damaged file is named as such, before the base model is loaded
        configs.append(config)
        extra = [f for f in ("use_dora", "lora_bias", "trainable_token_indices") if getattr(config, f, None)]
        if getattr(config, "bias", "none") != "none":
            extra.append(f"bias={config.bias!r}")
        check(type(config) in (LoraConfig, IA3Config) and not extra,
              f"{str(folder)!r} holds an adapter of type {config.peft_type}"
              f"{' with ' + ' and '.join(extra) if extra else ''}; only plain LoRA adapters (without use_dora, "
              "lora_bias, trainable_token_indices or trained biases) or (IA)^3 adapters can be combined: the combination keeps the "
              "low-rank factors or the scaling vectors alone")
    kinds = {str(folder): c.peft_type for folder, c in zip(adapter_dirs, configs)}
    check(len(set(kinds.values())) == 1, f"the adapters are of different types ({kinds}); combine adapters of one "
                                         "type (all LoRA or all (IA)^3)")
    ia3 = type(configs[0]) is IA3Config
    if combination_type is None:
        combination_type = "linear" if ia3 else "cat"
    tasks = {str(folder): config.task_type for folder, config in zip(adapter_dirs, configs) if config.task_type}
    check(len(set(tasks.values())) <= 1, f"the adapters were trained for different task types ({tasks}); only "
                                         "adapters of one task type (one model head) can be combined")
    if model_dir is None:  # adapters trained on different weights of one shape would combine silently
        # (only names of folders here: another name may be the same model under a hub id)
        bases = {str(folder): str(Path(c.base_model_name_or_path).resolve()) for folder, c in zip(adapter_dirs, configs)
                 if c.base_model_name_or_path and Path(c.base_model_name_or_path).is_dir()}
        check(len(set(bases.values())) <= 1,
              f"the adapters name different base models ({bases}); combining weight "
              "changes learned on different weights matches neither model. If they are one model at two paths, "
              "pass --model DIR to say which folder to load")
    base, _ = load_base_for(adapter_dirs[0], model_dir)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    try:
        model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    except (AdapterLoadError, ConfigError) as err:  # name the folder, not the internal adapter name
        detail = str(err).removeprefix(f"adapter {names[0]!r} does not fit the model: ")
        where = f"--model {model_dir!r}" if model_dir else "its base model"
        raise AdapterLoadError(f"{str(adapter_dirs[0])!r} does not fit {where}: {detail}") from None
    for name, folder, config in zip(names[1:], adapter_dirs[1:], configs[1:]):
        try:
            model.load_adapter(folder, adapter_name=name)
        except (AdapterLoadError, ConfigError) as err:  # name the folder, not the internal adapter name
            mine, first = config.base_model_name_or_path, configs[0].base_model_name_or_path
            bases = f" (trained on {mine!r}, the first on {first!r})" if mine != first else ""
            detail = str(err).removeprefix(f"adapter {name!r} does not fit the model: ")
            raise AdapterLoadError(f"{str(folder)!r} does not fit the base model of {str(adapter_dirs[0])!r}{bases}: "
                                   f"{detail}") from None
    has_heads = bool(model.base_model.modules_to_save_names())
    check(has_heads or heads_from == 0,
          f"--heads-from {heads_from} has no effect: the adapters train no whole modules (no classifier head or "
          "other modules_to_save); leave it out")
    if has_heads:
        wrappers = [w for _, w in model.base_model.wrappers() if isinstance(w, ModulesToSaveWrapper)
                    and any(n in w.modules_to_save for n in names)]
        owners = [i for i, n in enumerate(names) if all(n in w.modules_to_save for w in wrappers)]
        check(heads_from in owners,
              f"--heads-from {heads_from} names {str(adapter_dirs[heads_from])!r}, which has no trained copy of the "
              "modules the others train whole (modules_to_save, e.g. a classifier head); adapters that have one: "
              + ", ".join(f"{i} ({str(adapter_dirs[i])!r})" for i in owners))
    model.add_weighted_adapter(names, list(weights), "merged", combination_type,
                               modules_to_save_from=names[heads_from] if has_heads else None, **kwargs)
    # the input whose head is kept lends its run_config.json (task, labels), so that `eval` and `predict` read
    # inputs for that head; else the first input that is a run folder
    order = [adapter_dirs[heads_from], *(d for i, d in enumerate(adapter_dirs) if i != heads_from)]
    run_dir = next((r for r in (_run_dir(Path(d)) for d in order) if r is not None), None)

    def write(folder: Path) -> None:
        save_adapter(model, "merged", folder)
        if run_dir is not None:
            run = {**json.loads((run_dir / "run_config.json").read_text()), "output_dir": str(out),
                   "merged_from": [str(d) for d in adapter_dirs], "merge_weights": list(weights),
                   "combination_type": combination_type}
            atomic_write_bytes(folder / "run_config.json", (json.dumps(run, indent=2) + "\n").encode())

    _write_folder(out, write)
    return {"output_dir": str(out), "combination_type": combination_type,
            "rank": getattr(model.peft_config["merged"], "r", None),
            "tensors": len(model.base_model.adapter_tensors("merged"))}


def export_merged(adapter_dir: str | os.PathLike, output_dir: str, model_dir: str | None = None,
                  overwrite: bool = False) -> str:
    """Write a plain transformers model folder with the adapter merged in (loadable by ``from_pretrained``
    alone, outputs equal to the adapted model). Written to a temporary folder and renamed into place. A
    quantised base (``peftkit train --quantize``) is written dequantised, in float: the merged weights are
    ``dequantize(Q(W)) + delta``, the weights the adapted model computes with.

    Raises:
        ConfigError: ``output_dir`` is a file; a non-empty folder and ``overwrite`` is False; it is or
            holds the adapter or base model folder, or anything a model folder does not consist of (with
            ``overwrite``, only an earlier export is replaced); or the method cannot merge. All before anything
            is written.
    """
    from peftkit.model import PeftModel
    from peftkit.quant.base import dequantize_base

    out = _output_path(output_dir)
    full = Path(adapter_dir) / "model"
    check(Path(adapter_dir, "adapter_config.json").exists() or not (full / "config.json").is_file(),
          f"{str(adapter_dir)!r} is a full fine-tuning run: it holds no adapter to merge, and its model is already a "
          f"plain transformers folder, {str(full)!r}")
    _check_output(out, overwrite, _base_sources(adapter_dir, model_dir), "the model")
    config = PeftConfig.from_pretrained(adapter_dir)
    parts = config.configs if config.peft_type == "COMPOSED" else [config]
    for part in parts:
        check(get_method(part.peft_type).mergeable,
              f"{str(adapter_dir)!r} holds an adapter of type {config.peft_type}"
              f"{f' with a part of type {part.peft_type}' if part is not config else ''}, which cannot be merged "
              "into the weights (`peftkit methods` shows which methods merge)")
    base, tokenizer = load_base_for(adapter_dir, model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    # a quantised base (a QLoRA run) leaves quantised layers, merged or not, whose buffers transformers does
    # not know: each becomes a float layer holding its merged (or dequantised) weight, as in the adapted model
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse inf/NaN weights
    except ValueError as err:  # the adapter's values (NaN/inf, a merge the stack cannot take): bad input, exit 2
        raise ConfigError(f"{str(adapter_dir)!r}: {err}") from None
    plain = dequantize_base(merged)
    dropped = declare_merged_biases(plain)
    check(not dropped, f"the merged model has biases its transformers config does not describe, which "
                       f"from_pretrained would drop (e.g. {dropped[:3]}): the merge gave these layers a bias the "
                       "model type has no switch for; export the adapter instead (without --merge)")

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    _write_folder(out, write)
    return str(out)


#: config flags by which transformers models declare biases on their linear layers (Llama-style models:
#: ``attention_bias`` for q/k/v/o, ``mlp_bias`` for the MLP; OPT: ``enable_bias``); a merge that gives such a layer a bias
#: must set them
BIAS_FLAGS = ("attention_bias", "mlp_bias", "enable_bias", "bias", "use_bias", "add_bias_linear")


def declare_merged_biases(model: torch.nn.Module) -> list[str]:
    """Make a merged transformers model's config declare the biases a merge created, so that
    ``from_pretrained`` loads them back (SSF, LoRA with ``lora_bias`` or (IA)^3 on a bias-free Llama layer).

    transformers builds the layers its config describes and drops weights it does not expect: with
    ``attention_bias=False`` the merged ``q_proj.bias`` was dropped on load and the exported model differed
    from the adapted one. When the config has flags that declare the missing biases (:data:`BIAS_FLAGS`),
    they are set, and every layer the flags cover that has no bias gets a zero one (its outputs unchanged).

    Returns:
        the names of biases ``from_pretrained`` would still drop ([] when none, or when the model is not a
        transformers model, which has no such config).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        return []
    keys = {k for k in model.state_dict() if k.endswith(".bias")}  # biases only: other keys are not a merge's doing
    try:
        expected = _expected_keys(model)
    except Exception:  # a model class that cannot be built from its config alone: nothing to compare with
        return []
    dropped = sorted(keys - expected)
    flags = [f for f in BIAS_FLAGS if getattr(config, f, None) is False]
    if not dropped or not flags:
        return dropped
    for flag in flags:
        setattr(config, flag, True)
    if keys - _expected_keys(model):  # the flags do not describe this model's biases: its config stays as it was
        for flag in flags:
            setattr(config, flag, False)
        return dropped
    for flag in flags:  # a flag no merged bias needs is left as it was (MLP biases for SSF on attention only)
        if not keys - _expected_keys(model, unset=flag):
            setattr(config, flag, False)
    for key in sorted(_expected_keys(model) - keys):  # layers the set flags cover and no merge touched: a zero bias
        module = model.get_submodule(key.removesuffix(".bias"))
        out = module.weight.shape[0] if isinstance(module, torch.nn.Linear) else module.weight.shape[-1]
        module.bias = torch.nn.Parameter(module.weight.new_zeros(out), requires_grad=module.weight.requires_grad)
    return []


def _expected_keys(model: torch.nn.Module, unset: str | None = None) -> set[str]:
    """The bias keys of ``type(model)``'s state dict built from its config (on the meta device: no memory)."""
    import copy

    config = copy.deepcopy(model.config)
    if unset is not None:
        setattr(config, unset, False)
    with torch.device("meta"):
        return {k for k in type(model)(config).state_dict() if k.endswith(".bias")}


def declare_untied_embeddings(model: torch.nn.Module) -> None:
    """Make a merged transformers model's config say that its input embedding and output layer no longer share
    a tensor (a merge into either end of a tied pair unties them, so that the other end keeps the base values):
    ``tie_word_embeddings`` is set to False in the config and its text config. With it still True, a saved copy
    loaded with a warning, and ``tie_weights()`` (``resize_token_embeddings`` calls it) tied the output layer to
    the input embedding again, silently replacing one of them. Models without these methods or a
    ``tie_word_embeddings`` flag, and pairs that still share their tensor, are left as they are."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if get_in is None or get_out is None or config is None or get_out() is None or get_in() is None:
        return
    if get_in().weight is not get_out().weight:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for c in {id(config): config, id(text): text}.values():
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
