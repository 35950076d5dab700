"""HuggingFace PEFT's adapter file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

On disk a tensor is keyed ``base_model.model.<module path>.<parameter path>`` with the adapter name
stripped (``...query.lora_A.weight``), exactly as ``peft`` writes it, so adapters move both ways.
Prompt-learning adapters use ``base_model.<module path>`` (peft holds the user's model directly there)
plus their own keys from the tuner's ``extra_tensors`` (``prompt_embeddings``).
Keys are built from the module tree (never by substring replacement), so a module or adapter whose
name contains ``lora`` or ``default`` is handled like any other. Only safetensors and JSON are read;
pickle files are refused. Every write goes to a temporary file in the same folder and is renamed
into place, so an interrupted save never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from peftkit.config import CONFIG_NAME, WEIGHTS_NAME, ConfigError, PeftConfig

if TYPE_CHECKING:
    from peftkit.host import AdapterModel
    from peftkit.model import PeftModel

PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """An adapter file cannot be read, or its tensors do not fit the model (names or shapes)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, then rename.

    Creates the parent folder if needed. A crash at any point leaves either the old file or the new
    one at ``path``, never a partial file.
    """
    path = os.fspath(path)
    atomic_write_files(os.path.dirname(path) or ".", {os.path.basename(path): data})


def atomic_write_files(folder: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write several files into ``folder`` (created if needed): each is staged in full (temporary file,
    fsync) before any replaces its previous version, then all are renamed in a row, so an error while
    writing (disk full, interrupt) leaves every previous file whole."""
    atomic_write_folders({os.fspath(folder): files})


def atomic_write_folders(plan: dict[str, dict[str, bytes]]) -> None:
    """:func:`atomic_write_files` over several folders at once (``{folder: {file name: bytes}}``): every
    file of every folder is staged before the first rename, so a failure anywhere (a folder that cannot
    be created, a full disk) replaces none of the previous files.

    Raises:
        NotADirectoryError: a folder of the plan is an existing file (checked before anything is written).
    """
    for folder in plan:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(f"cannot save into {folder!r}: it is a file, not a folder; choose another "
                                     "path or move the file")
    staged: list[tuple[str, str]] = []
    try:
        for folder, files in plan.items():
            os.makedirs(folder, exist_ok=True)
            for name, data in files.items():
                staged.append((_stage(folder, name, data), os.path.join(folder, name)))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def key_prefix(config: PeftConfig) -> str:
    """The file-key prefix for ``config``'s method: ``base_model.model.`` before module paths, or ``base_model.``
    for prompt-learning methods, whose
    peft model holds the user's model directly (``base_model.classifier.weight``)."""
    return "base_model." if config.is_prompt_learning else PREFIX


def get_peft_model_state_dict(model: PeftModel, state_dict: dict[str, Tensor] | str | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: str | bool = "auto") -> dict[str, Tensor]:
    """The tensors of one adapter keyed as in the file (``peft.get_peft_model_state_dict``'s signature).

    Args:
        state_dict: the model's full state dict to take the values from (peft's way of saving a gathered FSDP or
            DeepSpeed model): keyed by ``model.state_dict()``'s names; None (default) reads the live tensors. A
            string here is taken as ``adapter_name`` (peftkit's earlier positional form).
        adapter_name: which adapter (default ``"default"``).
        unwrap_compiled: accepted as in peft (a ``torch.compile``'d model is unwrapped either way).
        save_embedding_layers: also write the base model's input and output embedding matrices, as peft
            does (keyed as they are in the model: ``...embed_tokens.base_layer.weight`` when wrapped by an
            adapter), so that a model whose vocabulary was resized is restored whole by either library.
            True writes them; False never; ``"auto"`` (default) writes them, with a warning, when
            ``target_modules`` names ``embed_tokens`` or ``lm_head`` (a list holding one of those names, or a
            regex matching such a module), or when the model's ``config.vocab_size`` differs from that of
            the local folder ``base_model_name_or_path`` (the Hub is never asked).

    Raises:
        ConfigError: unknown adapter name, a name that is not a string, ``save_embedding_layers`` not
            ``"auto"``/True/False, or a ``state_dict`` that lacks one of the tensors to write.
        TypeError / ValueError: ``model`` is not a module / is neither a PeftModel nor a model from
            :func:`peftkit.inject_adapter_in_model`.
    """
    from peftkit.config import ConfigError

    if isinstance(state_dict, str):
        state_dict, adapter_name = None, state_dict
    if not isinstance(adapter_name, str):
        raise ConfigError(f"adapter_name must be a string, got {type(adapter_name).__name__}; pass a state dict as "
                          "state_dict= (peft's second argument)")
    check_save_embedding_layers(save_embedding_layers)
    from peftkit.inject import file_keys, injected

    holder = injected(model)
    if holder is not None:  # a model from inject_adapter_in_model: peft's keys there are its module paths
        taken = get_peft_model_state_dict(holder, None if state_dict is None else _with_prefix(state_dict), adapter_name,
                                          save_embedding_layers=save_embedding_layers)
        return file_keys(holder, adapter_name, taken, injected_form=True)
    model = _peft_model(model, "get_peft_model_state_dict")
    out = _tensors(model, adapter_name, export=True)
    # base tensors are written as they are unmerged (a merge changed them; loading, unmerged, applies the adapter)
    embeddings = _embedding_tensors(model, adapter_name, save_embedding_layers, live=state_dict is not None)
    # an adapter's own tensor under the same key (none is expected) is never replaced by a base tensor
    embeddings = {k: v for k, v in embeddings.items() if k not in out}
    if state_dict is None:
        return {**out, **embeddings}
    own = _tensors(model, adapter_name, export=False)
    if own.keys() != out.keys():
        raise ConfigError(f"state_dict= is not supported for adapter {adapter_name!r}: its file holds another form than "
                          "its parameters (pruned ranks, sparse differences, folded prompts); call it without state_dict")
    names = {(t.data_ptr(), t.shape): n for n, t in model.state_dict().items() if t.numel()}
    taken = {}
    merged = _merged_base_tensors(model)
    for key, tensor in {**own, **embeddings}.items():
        name = names.get((tensor.data_ptr(), tensor.shape))
        if name is None or name not in state_dict:
            raise ConfigError(f"state_dict holds no value for the adapter's {key!r} (model name {name!r}); give the "
                              "model's own state dict (model.state_dict(), or one gathered from it)")
        taken[key] = state_dict[name]
        if name in merged:  # the given value holds merged adapters' changes: the file gets it unmerged
            layer, path, attr = merged[name]
            given = {k: state_dict[f"{path}.base_layer.{k}"] for k in ("weight", "bias")
                     if f"{path}.base_layer.{k}" in state_dict}
            tied = layer._tied_weight
            if tied is not None and names.get((tied.data_ptr(), tied.shape)) in state_dict:
                given["tied"] = state_dict[names[(tied.data_ptr(), tied.shape)]]
            unmerged = layer.unmerged_base_state(given)
            if attr in unmerged:
                taken[key] = unmerged[attr]
            else:  # a bias the merge gave a bias-free layer
                del taken[key]
    return taken


def _merged_base_tensors(model: PeftModel) -> dict[str, tuple[nn.Module, str, str]]:
    """``{state-dict name: (layer, layer path, "weight" | "bias")}`` of the base weights and biases that merged
    adapters changed (those of every :class:`~peftkit.layers.AdaptedLayer` with something merged)."""
    from peftkit.layers import AdaptedLayer

    return {f"{path}.base_layer.{attr}": (m, path, attr) for path, m in model.named_modules()
            if isinstance(m, AdaptedLayer) and m.merged_adapters for attr in ("weight", "bias")}


def _peft_model(model: object, caller: str) -> PeftModel:
    """``model`` as the :class:`~peftkit.PeftModel` the state-dict calls work on (a ``torch.compile`` wrapper is looked
    through; a PeftModel's base never is one).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``. ValueError: a module that is neither a PeftModel nor a
            model from :func:`peftkit.inject_adapter_in_model` (one adapted by the ``peft`` package, say).
    """
    from peftkit.model import PeftModel

    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, PeftModel):
        return inner
    if not isinstance(inner, nn.Module):
        raise TypeError(f"{caller}() takes a torch.nn.Module holding adapters, not a {type(model).__name__}")
    foreign = any(type(m).__module__.split(".")[0] == "peft" for m in inner.modules())
    raise ValueError(f"{caller}() takes a peftkit PeftModel or a model from peftkit.inject_adapter_in_model; this "
                     f"{type(inner).__name__} " + ("holds adapters of the peft package: use peft's own function on it, "
                     "or adapt the plain model with peftkit" if foreign else "holds no adapter: adapt it first "
                     "(peftkit.get_peft_model or peftkit.inject_adapter_in_model)"))


def _with_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An injected model's state dict (module paths) keyed as its PeftModel's (``base_model.model.`` in front of
    every key that lacks it)."""
    from peftkit.inject import PREFIX

    return {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in state_dict.items()}


def check_save_embedding_layers(value: object) -> None:
    """Raises ConfigError unless ``value`` is ``"auto"``, True or False (``save_embedding_layers``)."""
    from peftkit.config import ConfigError

    if value not in ("auto", True, False) or not isinstance(value, (str, bool)):
        raise ConfigError(f"save_embedding_layers={value!r} is not valid; use 'auto', True or False")


#: module names whose targeting makes ``save_embedding_layers="auto"`` write the embedding matrices (peft's)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _embedding_tensors(model: PeftModel, adapter_name: str, save_embedding_layers: str | bool,
                       live: bool = False) -> dict[str, Tensor]:
    """The base model's input and output embedding tensors as peft's ``save_embedding_layers`` writes them (see
    :func:`get_peft_model_state_dict`), keyed for the file; empty when they are not to be written. A wrapped
    layer's tensors are its unmerged ones (:meth:`~peftkit.layers.AdaptedLayer.unmerged_base_state`: what a merge
    changed is computed back on copies), or with ``live`` the live tensors themselves (merged or not)."""
    import re
    import warnings

    config = model.peft_config[adapter_name]
    hf = model.base_model.model
    targets = getattr(config, "target_modules", None)
    targeted = False
    if isinstance(targets, str) and targets != "all-linear":
        targeted = any(re.fullmatch(targets, name) for name, _ in hf.named_modules()
                       if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES))
    elif targets and not isinstance(targets, str):
        targeted = any(e in targets for e in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        # as peft, trainable tokens (which store a few rows) do not write a targeted embedding whole
        if targeted and type(config).auto_saves_targeted_embeddings:
            warnings.warn("save_embedding_layers='auto': writing the embedding layers too, as target_modules names "
                          "one (pass save_embedding_layers=False to leave them out)", UserWarning, stacklevel=3)
            save_embedding_layers = True
        else:
            save_embedding_layers = _vocab_resized(hf, config)
            if save_embedding_layers:
                warnings.warn("save_embedding_layers='auto': writing the embedding layers too, as the vocabulary "
                              "was resized from the base model's", UserWarning, stacklevel=3)
    if not save_embedding_layers or not hasattr(hf, "get_input_embeddings"):
        return {}
    from peftkit.layers import AdaptedLayer, ModulesToSaveWrapper
    from peftkit.targeting import iter_logical_modules

    prefix = key_prefix(config)
    out: dict[str, Tensor] = {}
    logical = list(iter_logical_modules(hf))
    for layer in (hf.get_input_embeddings(), hf.get_output_embeddings()):
        if layer is None or isinstance(layer, ModulesToSaveWrapper):
            continue  # a trained copy (modules_to_save) is written as the adapter's own tensor
        wrapped = isinstance(layer, AdaptedLayer)
        base = layer.base_layer if wrapped else layer
        if targeted and not (wrapped and isinstance(base, (nn.Linear, nn.Embedding))):
            continue  # peft writes a targeted embedding's base only (a layer LoRA wraps directly)
        # the module's name as the user sees it, keyed as peft keys it: a wrapped layer's own tensors under
        # ``base_layer.`` when targeted, the plain module's otherwise
        name = next((n for n, m in logical if m is base), None)
        if name is None:
            continue
        inner = f"{name}.base_layer" if targeted else name
        state = (layer.unmerged_base_state() if wrapped and not live else base.state_dict(keep_vars=True))
        out.update({f"{prefix}{inner}.{k}": v for k, v in state.items()})
    return {k: v.detach() for k, v in out.items()}


def _vocab_resized(hf: nn.Module, config: PeftConfig) -> bool:
    """Whether ``hf.config.vocab_size`` differs from that of the local model folder ``base_model_name_or_path``
    (False when either is unknown: the Hub is not asked)."""
    vocab = getattr(getattr(hf, "config", None), "vocab_size", None)
    folder = getattr(config, "base_model_name_or_path", None)
    if not vocab or not folder or not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    try:
        base = type(hf.config).from_pretrained(folder)
    except (OSError, ValueError):
        return False
    return getattr(base, "vocab_size", vocab) != vocab


def _tensors(model: PeftModel, adapter_name: str, export: bool) -> dict[str, Tensor]:
    host = model.base_model
    host.check_known([adapter_name])
    return _file_tensors(host, adapter_name, export)


def _file_tensors(host: AdapterModel, adapter_name: str, export: bool) -> dict[str, Tensor]:
    """One adapter's tensors by file key, plus those of the adapters its tuner bundles into its file
    (``<namespace>.<their own file key>``; see :meth:`peftkit.tuners.Tuner.bundled`)."""
    tuner = host.tuner(adapter_name)
    prefix = key_prefix(host.peft_config[adapter_name])
    out = {prefix + k: v for k, v in host.adapter_tensors(adapter_name, export=export).items()}
    out.update(tuner.extra_tensors(host, adapter_name))
    for space, other in tuner.bundled(host, adapter_name):
        out.update({f"{space}.{k}": v for k, v in _file_tensors(host, other, export).items()})
    return out


def _before_load(host: AdapterModel, adapter_name: str, tensors: dict[str, Tensor]) -> None:
    """Run the ``before_load`` hook of an adapter and of each bundled adapter (on its own slice of the
    file, keys without the namespace; what a hook changes in its slice is written back)."""
    tuner = host.tuner(adapter_name)
    tuner.before_load(host, adapter_name, tensors)
    for space, other in tuner.bundled(host, adapter_name):
        head = space + "."
        keys = [k for k in tensors if k.startswith(head)]
        part = {k[len(head):]: tensors.pop(k) for k in keys}
        _before_load(host, other, part)
        tensors.update({head + k: v for k, v in part.items()})


def set_peft_model_state_dict(model: PeftModel, state_dict: dict[str, Tensor], adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False) -> None:
    """Copy file-keyed tensors into adapter ``adapter_name`` (mirrors ``peft.set_peft_model_state_dict``).

    Every expected tensor must be present with the right shape and no tensor may be left over; all
    checks run before any value is copied. A key naming a base-model parameter (peft saves targeted
    embedding matrices whole) is copied into that parameter. A pruned AdaLoRA state dict (the kept
    triplets of the adapter's ``rank_pattern``, as ``get_peft_model_state_dict`` returns it) goes back into
    the full-rank training adapter: the kept triplets to their places, the others zero and masked.

    ``ignore_mismatched_sizes`` (peft's) must stay False: a tensor of another shape is refused, never skipped;
    ``low_cpu_mem_usage`` is accepted and changes nothing (the adapter exists already).

    Raises:
        AdapterLoadError: missing, unexpected or wrongly shaped tensors (listed in the message).
        ConfigError: ``ignore_mismatched_sizes=True``; ``state_dict`` is not a dict of tensors (naming the first
            entry that is not one).
        TypeError / ValueError: ``model`` is not a module / is neither a PeftModel nor a model from
            :func:`peftkit.inject_adapter_in_model`.
    """
    from peftkit.config import ConfigError

    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"state_dict must be a dict of tensors keyed as in the file (get_peft_model_state_dict's "
                          f"form), got {type(state_dict).__name__}")
    odd = next(((k, v) for k, v in state_dict.items() if not isinstance(v, Tensor)), None)
    if odd is not None:
        raise ConfigError(f"state_dict[{odd[0]!r}] is a {type(odd[1]).__name__}, not a tensor; give the tensors "
                          "keyed as in the file (get_peft_model_state_dict's form)")
    if ignore_mismatched_sizes:
        raise ConfigError("ignore_mismatched_sizes=True is not supported: a tensor of another shape than the adapter's "
                          "is refused (with the names), never skipped")
    from peftkit.inject import file_keys, injected

    holder = injected(model)
    if holder is not None:  # a model from inject_adapter_in_model: keys with or without base_model.model., as peft
        model, state_dict = holder, file_keys(holder, adapter_name, state_dict, injected_form=False)
    model = _peft_model(model, "set_peft_model_state_dict")
    load_saved_state(model, state_dict, adapter_name, model.peft_config[adapter_name] if adapter_name in
                     model.peft_config else None)


def load_saved_state(model: PeftModel, state_dict: dict[str, Tensor], adapter_name: str, saved: PeftConfig | None
                     ) -> None:
    """:func:`set_peft_model_state_dict` for tensors saved with config ``saved`` (a file's own, whose
    ``rank_pattern`` may differ from the model's). A merged adapter is unmerged for the load and merged again
    with its new values."""
    host = model.base_model
    host.check_known([adapter_name])
    # the before-load hooks switch adapters to the file's layout (a folded prompt encoder, sparse differences);
    # should the file then not fit, that is undone: nothing changes when loading is refused
    merged = host.merged_adapters()
    touched = [adapter_name, *(other for _, other in host.tuner(adapter_name).bundled(host, adapter_name))]
    if any(name in host.parts(merged) for name in touched):
        # the base weights hold the old values' delta: take it out first and fold the new values in after, or
        # the merged outputs would stay stale and a later unmerge would take out a delta never put in
        host.unmerge()
    else:
        merged = []
    undo = _layout_snapshot(host, adapter_name)
    try:
        _before_load(host, adapter_name, state_dict)
        _check_and_copy(model, state_dict, adapter_name, saved)
    except AdapterLoadError:
        undo()
        raise
    finally:
        if merged:
            host.merge(merged)


def _layout_snapshot(host: AdapterModel, adapter_name: str) -> Callable[[], None]:
    """A function that puts every module of adapter ``adapter_name`` (and of the adapters its file bundles) back as it
    is now: its attributes, parameters, buffers and sub-modules (the objects themselves, so values are kept)."""
    from peftkit.layers import AdaptedLayer

    roots: list[nn.Module] = []
    names = [adapter_name]
    while names:
        name = names.pop()
        names += [other for _, other in host.tuner(name).bundled(host, name)]
        roots += [w.adapters[name] for _, w in host.wrappers() if isinstance(w, AdaptedLayer) and name in w.adapters]
        if name in host.extra_modules:
            roots.append(host.extra_modules[name])

    def attrs(m: nn.Module) -> dict:  # containers a hook may change in place (a dict of forms) are copied
        return {k: copy.copy(v) if isinstance(v, (dict, list, set)) and not k.startswith("_") else v
                for k, v in m.__dict__.items()}

    saved = [(m, attrs(m), dict(m._parameters), dict(m._buffers), dict(m._modules),
              set(m._non_persistent_buffers_set)) for root in roots for m in root.modules()]

    def undo() -> None:
        for m, attrs, params, buffers, modules, non_persistent in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for live, kept in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules),
                               (m._non_persistent_buffers_set, non_persistent)):
                live.clear()
                live.update(kept)

    return undo


def _check_and_copy(model: PeftModel, state_dict: dict[str, Tensor], adapter_name: str, saved: PeftConfig | None
                    ) -> None:
    host = model.base_model
    state_dict, after = host.tuner(adapter_name).widen_loaded(host, adapter_name, state_dict, saved)
    own = _tensors(model, adapter_name, export=False)
    # every parameter of the model by file key; every name of a tied parameter (lm_head.weight is
    # embed_tokens.weight): peft names the one it wrapped
    prefix = key_prefix(model.peft_config[adapter_name])
    params = {prefix + k: v for k, v in model.base_model.model.named_parameters(remove_duplicate=False)}
    _fold_copy_aliases(model, state_dict, own, adapter_name, params)
    # a whole base tensor of a layer another adapter wrapped when the file was written (peft's
    # lm_head.base_layer.weight) names the plain parameter here
    for key in [k for k in state_dict if ".base_layer." in k and k not in own and k not in params]:
        plain = key.replace(".base_layer.", ".")
        if plain in params and plain not in own and plain not in state_dict:
            state_dict[plain] = state_dict.pop(key)
    # and the other way: a whole base tensor written under the plain name (save_embedding_layers=True of an
    # embedding that target_modules does not name, e.g. trainable tokens on GPT-2's wte) when an adapter here
    # wraps that module
    for key in [k for k in state_dict if k not in own and k not in params]:
        head, _, leaf = key.rpartition(".")
        wrapped = f"{head}.base_layer.{leaf}"
        if wrapped in params and wrapped not in own and wrapped not in state_dict:
            state_dict[wrapped] = state_dict.pop(key)
    # peft also stores whole base tensors it considers changed (e.g. a targeted ``embed_tokens``); such keys name
    # a base-model parameter and are loaded into it
    base = {k: params[k] for k in state_dict if k not in own and k in params}
    expected = {**own, **base}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if mismatched:
        grouped = [k for k, v in expected.items() if k in state_dict and k.endswith("lora_A.weight")
                   and state_dict[k].dim() == v.dim() > 2 and state_dict[k].shape[0] == v.shape[0]
                   and state_dict[k].shape[1] > v.shape[1] and state_dict[k].shape[1] % v.shape[1] == 0]
        why = (" (lora_A of a grouped convolution: peft's is not grouped, peftkit's is grouped like the base so that "
               "it merges exactly, so LoRA on grouped convolutions does not move between the two)" if grouped else
               " (was the adapter trained with another r or on another base model?)")
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. " + "; ".join(mismatched[:3]) + why)
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file that the model has no place for, e.g. "
                        f"{unexpected[:3]}")
    if problems:
        raise AdapterLoadError(f"adapter {adapter_name!r} does not fit the model: " + " | ".join(problems))
    # a peft file may carry whole base tensors (save_embedding_layers=True, e.g. after adding tokens); copied into
    # the shared base they would change every other adapter, and no delete, disable or unload gives them back
    others = [n for n in host.peft_config if n != adapter_name]
    changed = [k for k in base
               if not torch.equal(state_dict[k].to(expected[k]), expected[k].detach())]
    if others and changed:
        raise AdapterLoadError(f"adapter {adapter_name!r} holds base-model weights that differ from this model's "
                               f"({changed[:3]}; peft writes them with save_embedding_layers=True); loading it next to "
                               f"the adapters {others} would change their base too: load it into a fresh model with "
                               "PeftModel.from_pretrained")
    # every value converted before any is copied: one that cannot be (a meta tensor) leaves the adapter whole
    values = {k: state_dict[k].to(device=dst.device, dtype=dst.dtype) for k, dst in expected.items()}
    with torch.no_grad():
        for k, dst in expected.items():
            dst.copy_(values[k])
    if after is not None:
        after()


def _fold_copy_aliases(model: PeftModel, state_dict: dict[str, Tensor], own: dict[str, Tensor],
                       adapter_name: str, params: dict[str, Tensor]) -> None:
    """Fold other names for the adapter's own tensors into their names in ``own`` (in place).

    With ``bias="all"`` peft saves every tensor whose name holds "bias", so a ``modules_to_save`` copy's
    bias is written twice: as ``classifier.bias`` and as ``classifier.modules_to_save.bias``. The second
    name is folded into the first (kept when the first is absent) when ``classifier`` is a
    ``modules_to_save`` wrapper here (also ``pooler.modules_to_save.<adapter>.dense.bias``, a copy's
    inner module named with the adapter's name when saved); the frozen original,
    ``classifier.original_module.bias``, names a base parameter and is handled with those. Likewise a
    trained base bias in a layer that another adapter had wrapped when the file was written
    (``key.base_layer.bias``) is read as ``key.bias`` when no adapter here wraps ``key``. A key that
    names another base parameter of the model is not taken for an alias.

    ``params`` holds every parameter of the model by file key.

    Raises:
        AdapterLoadError: the two names hold different values.
    """
    from peftkit.layers import ModulesToSaveWrapper

    prefix = key_prefix(model.peft_config[adapter_name])
    wrappers = {prefix + n for n, m in model.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    # a base parameter trained with bias="all" inside a layer another adapter wrapped, as peft (and peftkit before
    # it wrote names as in a model holding the adapter alone) may name it: key.base_layer.bias for key.bias
    bare = {k.replace(".base_layer.", "."): k for k in own if ".base_layer." not in k}
    marker = ".modules_to_save."
    for key in [k for k in state_dict if k not in own]:
        canonical = None
        at = key.find(marker)
        while at >= 0 and canonical is None:
            rest = key[at + len(marker):]
            # X.modules_to_save.Y, or X.modules_to_save.<adapter name when saved>.Y (a copy's inner module)
            for candidate in (f"{key[:at]}.{rest}", f"{key[:at]}.{rest.partition('.')[2]}"):
                if key[:at] in wrappers and candidate in own:
                    canonical = candidate
                    break
            at = key.find(marker, at + 1)
        if canonical is None:
            canonical = bare.get(key.replace(".base_layer.", "."))
            if key in params and (canonical is None or params[key] is not own[canonical]):
                canonical = None  # a base parameter of its own (not the same tensor under its wrapped name)
        if canonical is None:
            continue
        alias = state_dict.pop(key)
        if canonical not in state_dict:
            state_dict[canonical] = alias
        elif alias.shape != state_dict[canonical].shape or not torch.equal(alias, state_dict[canonical]):
            raise AdapterLoadError(f"adapter {adapter_name!r}: the file holds {key!r} and {canonical!r}, two names "
                                   "for one trained tensor, with different values; which one to load is unclear")


def adapter_files(model: PeftModel, adapter_name: str, write: bool = True,
                  converted: tuple[PeftConfig, dict[str, Tensor]] | None = None,
                  save_embedding_layers: str | bool = "auto") -> dict[str, bytes] | None:
    """One adapter's two files as bytes, ``{"adapter_model.safetensors": ..., "adapter_config.json": ...}``.

    Sharded tensors (FSDP2 ``DTensor``) are gathered whole first, which is a collective: in a process
    group every rank calls this, and only the one with ``write=True`` gets the bytes (the others None).
    ``converted`` gives the ``(config, tensors)`` to write instead of the adapter's own (PiSSA/OLoRA
    conversion). ``save_embedding_layers`` as in :func:`get_peft_model_state_dict`.
    """
    host = model.base_model
    if converted is None:  # (a PiSSA/OLoRA conversion writes its LoRA tensors only, as peft's does)
        converted = (host.tuner(adapter_name).export_config(host, adapter_name),
                     get_peft_model_state_dict(model, adapter_name, save_embedding_layers=save_embedding_layers))
    config, state = converted
    tensors = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu").contiguous().clone()
               for k, v in state.items()}
    if not write:
        return None
    saved = copy.copy(config)
    saved.inference_mode = True  # as peft writes it: a loaded adapter is frozen unless loaded trainable
    return {WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}), CONFIG_NAME: saved.to_json_bytes()}


def save_adapter(model: PeftModel, adapter_name: str, directory: str | os.PathLike, write: bool = True,
                 converted: tuple[PeftConfig, dict[str, Tensor]] | None = None) -> None:
    """Write one adapter's weights and config into ``directory``: both files are staged before either
    replaces the old adapter's, which an error leaves whole (see :func:`adapter_files` for the arguments).

    Raises:
        NotADirectoryError: ``directory`` is an existing file.
    """
    files = adapter_files(model, adapter_name, write, converted)
    if files is not None:
        atomic_write_folders({os.fspath(directory): files})


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stage(folder: str | os.PathLike, name: str, data: bytes) -> str:
    """Write ``data`` to a new temporary file in ``folder`` (flushed to disk); returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + name, dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private (0600); a saved file is not
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def read_adapter_files(directory: str | os.PathLike, config: PeftConfig | None = None,
                       key_mapping: dict[str, str] | None = None) -> tuple[PeftConfig, dict[str, Tensor]]:
    """Read and check an adapter folder before anything touches the model (``key_mapping`` renames the keys'
    module paths, as in :func:`load_peft_weights`).

    Returns:
        ``(config, tensors)`` with file keys.

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        AdapterLoadError: only a pickle checkpoint is present, or the safetensors file is corrupt.
        ConfigError: the config JSON is invalid.
    """
    directory = os.fspath(directory)
    if config is None:
        config = PeftConfig.from_pretrained(directory)
    return config, load_peft_weights(directory, key_mapping=key_mapping)


def load_peft_weights(model_id: str | os.PathLike, device: str | None = None,
                      subfolder: str | None = None, key_mapping: dict[str, str] | None = None) -> dict[str, Tensor]:
    """The tensors of an adapter folder's ``adapter_model.safetensors``, keyed as in the file (peft's
    ``load_peft_weights``; a local folder only, nothing is downloaded).

    Args:
        model_id: the adapter folder.
        device: where to put the tensors (default ``"cpu"``).
        subfolder: read ``model_id/subfolder`` instead (as peft).
        key_mapping: as peft, ``{regex: replacement}`` applied to each key's module path, i.e. with the
            ``base_model.model.`` (or ``base_model.``) prefix taken off first and put back after, so ``^model\\.``
            anchors at the module path (the first pattern that matches renames it), for files of models whose
            module names changed; a key without that prefix (``prompt_embeddings``) is kept; None (default) keeps
            the keys.

    Raises:
        FileNotFoundError: no weights file. AdapterLoadError: only a pickle checkpoint, or a corrupt file.
        ConfigError: a ``key_mapping`` that is not None or a dict of valid ``{regex: replacement}`` strings
            (checked before the file is read).
    """
    check_key_mapping(key_mapping)
    if key_mapping:
        import re

        renamed = {}
        for key, value in load_peft_weights(model_id, device, subfolder).items():
            # the prefix (after a bundled adapter's namespace, ``parts.0.``) is not part of the module path
            prefix = re.search(r"base_model\.(model\.)?", key)
            if prefix:
                path = key[prefix.end():]
                for pattern, replacement in key_mapping.items():
                    path, hits = re.subn(pattern, replacement, path)
                    if hits:
                        break
                key = key[:prefix.end()] + path
            renamed[key] = value
        return renamed
    directory = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    path = _weights_path(directory)
    try:
        return load_file(path, device=device or "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterLoadError(f"{path} is not a readable safetensors file ({err}); the adapter was not loaded") from err


def check_key_mapping(key_mapping: object) -> None:
    """Check a ``key_mapping`` (see :func:`load_peft_weights`): None, or a dict of ``{regex: replacement}``
    strings whose patterns compile and whose replacements refer only to the pattern's groups.

    Raises:
        ConfigError: naming the value, or the entry that is not valid and why.
    """
    import re

    if key_mapping is None:
        return
    if not isinstance(key_mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in key_mapping.items()):
        raise ConfigError(f"key_mapping={key_mapping!r:.200} is not valid; give None or a dict of "
                          "{regex: replacement} strings")
    for pattern, replacement in key_mapping.items():
        try:
            re.compile(pattern).sub(replacement, "")  # the replacement's group references are checked too
        except re.error as err:
            raise ConfigError(f"key_mapping entry {pattern!r}: {replacement!r} is not a valid regex and "
                              f"replacement ({err})") from None


def check_adapter_weights(directory: str | os.PathLike) -> None:
    """Check that ``directory``'s ``adapter_model.safetensors`` can be read, from its header alone (which
    covers the whole file: a truncated file fails), before any work that needs it.

    Raises:
        FileNotFoundError: no weights file. AdapterLoadError: only a pickle checkpoint, or a corrupt file.
    """
    path = _weights_path(os.fspath(directory))
    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterLoadError(f"{path} is not a readable safetensors file ({err}); the adapter was not loaded") from err


def _weights_path(directory: str) -> str:
    """``directory``'s weights file. Raises FileNotFoundError, or AdapterLoadError when only a pickle is there."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise AdapterLoadError(f"{directory!r} holds only adapter_model.bin (pickle); peftkit loads "
                                   f"{WEIGHTS_NAME} only. Re-save it with peft's save_pretrained(safe_serialization=True)")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    return path


def load_adapter_into(model: PeftModel, adapter_name: str, tensors: dict[str, Tensor]) -> None:
    """Copy file tensors into an injected adapter (see :func:`set_peft_model_state_dict`)."""
    set_peft_model_state_dict(model, tensors, adapter_name)


def adapter_file_stats(directory: str | os.PathLike) -> dict[str, int]:
    """Size figures of a saved adapter, read from its ``adapter_model.safetensors`` header only.

    Returns:
        ``adapter_bytes``: the file's size on disk in bytes; ``changed_params``: the number of values
        it stores (elements of floating-point tensors; integer index tensors of sparse differences are
        not counted). For selective methods this is the number of changed base-model entries (plus
        whole ``modules_to_save``); for other methods, the adapter's own weights.

    Raises:
        FileNotFoundError: no weights file in ``directory``.
    """
    path = os.path.join(directory, WEIGHTS_NAME)
    values = 0
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():
            part = fh.get_slice(key)
            if part.get_dtype().startswith(("F", "BF")):
                values += int(torch.Size(part.get_shape()).numel())
    return {"adapter_bytes": os.path.getsize(path), "changed_params": values}
