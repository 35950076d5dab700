"""The adapter host: the user's model plus every named adapter's lifecycle (peft's "tuner model").

:class:`AdapterModel` injects adapters through their methods' tuners, activates them, sets what
trains, merges, unloads and collects the tensors each adapter saves. :class:`peftkit.PeftModel`
wraps it with HF PEFT's public API.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import ConfigError, PeftConfig, check, get_method
from peftkit.layers import BASE_ROWS, AdaptedLayer, AdapterContext, ModulesToSaveWrapper, replace_module
from peftkit.targeting import default_target_modules

#: the output heads a task type adds to ``modules_to_save`` when injected, as peft's task classes do
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
PART_SEP = "#"  # a part of a composed adapter is named "<owner>#<index>"; user names cannot contain it


_CONTAINERS = (nn.ModuleDict(), nn.ParameterDict())


def _reserved(name: str) -> bool:
    """Whether ``name`` is an attribute of torch's ``ModuleDict``/``ParameterDict`` (``keys``, ``forward``,
    ``training``, ...): those containers, which hold an adapter's modules per name, cannot take it as a key."""
    return any(hasattr(c, name) for c in _CONTAINERS)


def _check_name(name: Any) -> str:
    if (not isinstance(name, str) or not name or any(c in name for c in (".", "/", "\\", PART_SEP))
            or name == BASE_ROWS or not name.isprintable() or len(name.encode()) > 200):
        raise ConfigError(f"adapter_name={name!r} is not valid; use a non-empty printable string of at most 200 "
                          f"bytes without '.', '/', '\\' or {PART_SEP!r}, other than {BASE_ROWS!r} (it also "
                          "names a folder on disk)")
    if _reserved(name):
        raise ConfigError(f"adapter_name={name!r} is not valid: it is an attribute name of torch's ModuleDict, "
                          "which holds adapters by name (like 'keys', 'update', 'forward', 'training'); choose "
                          "another name")
    return name


def check_config(config: Any) -> None:
    """Refuse anything but a peftkit :class:`PeftConfig` (a ``peft`` package config, a dict, a method name).

    Raises:
        ConfigError: naming the type given, and peftkit's class of that name for a config of another package.
    """
    if not isinstance(config, PeftConfig):
        kind = type(config)
        where = kind.__module__.split(".")[0]
        hint = (f": a config of the {where!r} package; build it with peftkit's own (from peftkit import "
                f"{kind.__name__})" if where != "peftkit" and kind.__name__.endswith("Config") else "")
        raise ConfigError(f"expected a peftkit PeftConfig (e.g. peftkit.LoraConfig), got "
                          f"{kind.__module__}.{kind.__qualname__}{hint}")


class AdapterModel(nn.Module):
    """Holds the user's model as ``.model`` and drives every adapter's lifecycle (peft's "tuner model").

    Attributes:
        model: the adapted model; wrapped layers live inside it.
        peft_config: adapter name -> its config, in the order the adapters were added.
        active_adapters: names of the adapters in use, in order.
        extra_modules: adapter name -> a module the adapter keeps outside the model's layers (e.g. a prompt
            encoder); a tuner's ``inject`` puts it there. It trains exactly when its adapter is active and
            not in inference mode, and goes when the adapter is deleted or the model unloaded.
        members: adapter name -> the names of its *parts* (a composed adapter, see :meth:`add_member`). A
            part is an adapter like any other for layers and tuners (its config is in ``peft_config``), but
            users only address its owner, with which it is activated, trained, merged, saved and deleted.

    Args:
        model: the model to adapt (a ``transformers`` model or any ``nn.Module``); it is held, not copied.

    Raises:
        ConfigError: ``model`` already holds peftkit adapters (a wrapped layer, or a soft-prompt hook); add
            more through its ``PeftModel.add_adapter``, or start from ``unload()``.
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={model!r:.80} is a {type(model).__name__}; give the torch.nn.Module to adapt (e.g. a "
                            "transformers model)")
        # a torch.compile wrapper: the module it compiles is adapted (the wrapper shares it, so it runs the adapters
        # too), and the file keys are the model's own (no "_orig_mod." that a plain model would not fit)
        while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        wrapped = next((n for n, m in model.named_modules() if isinstance(m, (AdaptedLayer, ModulesToSaveWrapper))), None)
        if wrapped is None:  # a soft-prompt adapter wraps no layer: its hooks on the model hold their host
            wrapped = next((n or type(model).__name__ for n, m in model.named_modules()
                            for h in m._forward_pre_hooks.values()
                            if isinstance(getattr(getattr(h, "__self__", None), "host", None), AdapterModel)), None)
        from peftkit.inject import injected

        if wrapped is not None and injected(model) is not None:
            raise ConfigError(f"the model already holds peftkit adapters put in by inject_adapter_in_model (module "
                              f"{wrapped!r}); add more with inject_adapter_in_model(config, model, '<new name>'), or "
                              "start from a fresh copy of the base model")
        if wrapped is not None:
            raise ConfigError(f"the model already holds peftkit adapters (module {wrapped!r}); add more to its "
                              "PeftModel with add_adapter(), or start from peft_model.unload()")
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapters: list[str] = []
        self.ctx = AdapterContext()
        self.extra_modules = nn.ModuleDict()
        self.disabled = False
        self.members: dict[str, list[str]] = {}
        self._extra: dict[str, list[str]] = {}
        #: state a tuner keeps per adapter beside the layers (DyLoRA's ranks), by adapter name; kept on the host
        #: so that a copy of the model (``copy.deepcopy``) carries its own
        self.tuner_state: dict[str, Any] = {}
        # base parameters' own values that adapters train or load over (restored when none claims them),
        # and every base parameter's requires_grad as the user had it (restored by unload)
        self._originals: dict[str, tuple[Tensor, Tensor]] = {}
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def __getattr__(self, name: str) -> Any:
        """An attribute this host lacks is the adapted model's (``model.base_model.config``, ``.device``,
        ``.get_input_embeddings()``, ``.lm_head``), as on peft's tuner model.

        Raises:
            AttributeError: neither has it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet (a half-built or unpickling host): no recursion
                raise
            return getattr(self.model, name)

    # --- structure ----------------------------------------------------------------------------------
    def wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, wrapper)`` for every AdaptedLayer and ModulesToSaveWrapper in the model."""
        for name, module in self.model.named_modules():
            if isinstance(module, (AdaptedLayer, ModulesToSaveWrapper)):
                yield name, module

    def adapters_of(self, adapter_name: str, kind: type) -> dict[str, Any]:
        """Module name -> the adapter ``adapter_name`` on that module, for every wrapped layer where it is an
        instance of ``kind``, in model order."""
        found = {}
        for name, w in self.wrappers():
            adapter = w.adapters[adapter_name] if isinstance(w, AdaptedLayer) and adapter_name in w.adapters else None
            if isinstance(adapter, kind):
                found[name] = adapter
        return found

    def modules_to_save_names(self) -> list[str]:
        """Names of the modules wrapped for ``modules_to_save`` (by any adapter), in model order."""
        return [n for n, m in self.wrappers() if isinstance(m, ModulesToSaveWrapper)]

    def set_extra_trainable(self, adapter_name: str, names: list[str]) -> None:
        """Record base-model parameters (by name) that ``adapter_name`` trains and saves. Their values are
        kept aside first, and put back once no adapter claims them (delete, ``unload`` without merging).
        Parameters of a module the adapter replaces by its own trained copy (``modules_to_save``: the
        wrapper's ``original_module``) are left out: the adapter never runs them."""
        owner = self.owner(adapter_name)  # a part of a composed adapter uses its owner's trained copies
        unused = tuple(f"{n}.original_module." for n, w in self.wrappers()
                       if isinstance(w, ModulesToSaveWrapper) and owner in w.modules_to_save)
        names = [n for n in names if not n.startswith(unused)] if unused else names
        params = dict(self.model.named_parameters())
        for n in names:
            if n not in self._originals:  # the parameter itself is kept: wrapping may rename it later
                self._originals[n] = (params[n], params[n].detach().clone())
        self._extra[adapter_name] = list(names)

    def _restore_unclaimed(self) -> None:
        claimed = {n for names in self._extra.values() for n in names}
        with torch.no_grad():
            for n in [n for n in self._originals if n not in claimed]:
                param, value = self._originals.pop(n)
                param.copy_(value)

    def extra_parameter(self, name: str) -> nn.Parameter:
        """The base parameter recorded under ``name`` by :meth:`set_extra_trainable`, found by identity: a later
        adapter that wraps its module (BitFit after ``bias="all"``) renames it to ``....base_layer.bias``."""
        return self._originals[name][0]

    def extra_trainable(self, adapter_name: str) -> list[str]:
        """The base-model parameter names recorded by :meth:`set_extra_trainable` for ``adapter_name`` (empty
        when none or unknown)."""
        return self._extra.get(adapter_name, [])

    # --- parts of composed adapters -----------------------------------------------------------------------
    def add_member(self, owner: str, config: PeftConfig) -> str:
        """Inject ``config`` as the next part of adapter ``owner`` (called by a composing tuner's ``inject``);
        returns the part's name ``<owner>#<index>``, which no user adapter can have. On error the owner's
        :meth:`add_adapter` removes the owner with all its parts."""
        parts = self.members.setdefault(owner, [])
        name = f"{owner}{PART_SEP}{len(parts)}"
        parts.append(name)
        self.peft_config[name] = config
        self._fill_targets(config)
        get_method(config.peft_type).tuner.inject(self, config, name)
        return name

    def _fill_targets(self, config: PeftConfig) -> bool:
        """As peft: a LoRA-family config without ``target_modules`` gets the model type's usual targets,
        written into the config (so also into the saved file). Returns whether it did. Raises
        ConfigError when the model type has none."""
        defaults = type(config).default_target_modules
        if defaults is None or getattr(config, "target_modules", "") is not None:
            return False
        config.target_modules = default_target_modules(self.model, defaults)
        return True

    def parts(self, names: Sequence[str]) -> list[str]:
        """The adapters the layers run for ``names``: each name followed by its parts, if it has any."""
        out: list[str] = []
        for n in names:
            out += [n, *self.members.get(n, ())]
        return out

    def owner(self, name: str) -> str:
        """The adapter that ``name`` is a part of (``name`` itself when it is not a part)."""
        return next((o for o, parts in self.members.items() if name in parts), name)

    def public_names(self) -> list[str]:
        """The adapters users address: every adapter except the parts of composed ones."""
        return [n for n in self.peft_config if self.owner(n) == n]

    @property
    def in_use(self) -> list[str]:
        """Every adapter the layers run now: the active adapters and their parts, in order."""
        return self.parts(self.active_adapters)

    def update_and_allocate(self, global_step: int) -> None:
        """peft's name for the per-step call of AdaLoRA (``model.base_model.update_and_allocate(step)``):
        the same as :meth:`peftkit.PeftModel.peft_step_end` with the same ``step``, for every adapter in
        training. Call it after ``optimizer.step()`` and before ``zero_grad()``.

        Raises:
            ConfigError: ``global_step`` is not a whole number >= 0.
        """
        check(isinstance(global_step, numbers.Integral) and not isinstance(global_step, bool) and global_step >= 0,
              f"step={global_step!r} is not valid; give the number of optimiser steps taken, a whole number >= 0")
        for name in self.training_parts():
            self.tuner(name).on_step_end(self, name, global_step)

    def training_parts(self) -> list[str]:
        """The active adapters and their parts whose owner is not in inference mode (they train)."""
        return self.parts([n for n in self.active_adapters if not self.peft_config[n].inference_mode])

    # --- adding and removing --------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Inject a new adapter ``adapter_name`` described by ``config`` (not yet active). On any error the model
        is left exactly as it was.

        Raises:
            ConfigError: invalid or duplicate name, no matching module, a value the model cannot take.
        """
        _check_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} already exists; existing: {list(self.peft_config)}")
        check_config(config)
        config.check_values()  # again: fields may have been changed since the config was built
        if any(c is config for c in self.peft_config.values()):
            # one config object for two adapters (get_peft_model(m, c, "a"); add_adapter("b", c)): the second gets
            # a copy, since per-adapter state lives in it (inference_mode: set_requires_grad, set_adapter)
            config = copy.deepcopy(config)
        spec = get_method(config.peft_type)
        filled = self._fill_targets(config)
        before = set(self.peft_config)
        self.peft_config[adapter_name] = config
        try:
            heads = self._wrap_modules_to_save(config, adapter_name)
            spec.tuner.inject(self, config, adapter_name)
        except BaseException:  # remove it and whatever its tuner added (parts, adapters a fusion loads)
            if filled:
                config.target_modules = None
            for name in reversed([n for n in self.peft_config if n not in before]):
                if name in self.peft_config:
                    self._remove_everywhere(name)
                    del self.peft_config[name]
            raise
        if heads and any(f.name == "modules_to_save" for f in dataclasses.fields(config)):
            # written into the saved config, as peft writes the head it trains along
            config.modules_to_save = [*(config.modules_to_save or []), *heads]
        for _, w in self.wrappers():
            w.set_active(self.in_use)
            w.disabled = self.disabled  # a layer wrapped inside disable_adapter() is disabled like the rest

    def _wrap_modules_to_save(self, config: PeftConfig, adapter_name: str) -> list[str]:
        """Wrap the modules ``config.modules_to_save`` names (a ``SEQ_CLS`` or ``TOKEN_CLS`` config adds the
        classification head, ``classifier`` or ``score``, and ``QUESTION_ANS`` adds ``qa_outputs``, as peft
        does); returns the head names added that way and found."""
        wanted = list(getattr(config, "modules_to_save", None) or [])
        auto = [h for h in TASK_HEADS.get(config.task_type, ()) if h not in wanted]
        if not wanted and not auto:
            return []
        found: list[str] = []
        for name, _ in list(_logical(self.model)):
            # peft's rule, kept so that files move both ways: a plain string suffix, so "norm" also takes
            # "input_layernorm" (target_modules, in contrast, match whole dotted segments)
            if name and any(name.endswith(w) for w in wanted + auto):
                found.append(name)
        if wanted and not found:
            raise ConfigError(f"modules_to_save={wanted!r} matched no module of the model")
        heads = {h for names in TASK_HEADS.values() for h in names}  # peft's files list every head name it knows
        unmatched = [w for w in wanted if w not in heads and not any(n.endswith(w) for n in found)]
        if unmatched:
            raise ConfigError(f"modules_to_save entry(ies) {unmatched} matched no module of the model (the others "
                              f"did: {found[:3]}); check the spelling, or leave them out")
        from peftkit.quant.layer import QuantWeight

        quantised = [n for n in found if any(isinstance(m, QuantWeight) for m in self.model.get_submodule(n).modules())]
        if quantised:
            raise ConfigError(f"modules_to_save names quantised module(s) {quantised[:3]}: a trained copy of a quantised "
                              "weight would have no trainable parameter; quantise with them skipped "
                              "(quantize_base(..., skip_modules=[...])), or dequantize_base first")
        for name in found:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(module)
                wrapper._ctx = self.ctx
                replace_module(self.model, name, wrapper)
                module = wrapper
            module.add(adapter_name)
        return [h for h in auto if any(name.endswith(h) for name in found)]

    def tuner(self, adapter_name: str) -> Any:
        """The registered tuner of adapter ``adapter_name``'s method."""
        return get_method(self.peft_config[adapter_name].peft_type).tuner

    def _remove_everywhere(self, adapter_name: str) -> None:
        for part in self.members.pop(adapter_name, []):
            self._remove_everywhere(part)
            self.peft_config.pop(part, None)
        if adapter_name in self.peft_config:
            self.tuner(adapter_name).remove(self, adapter_name)
        for name, module in reversed(list(self.wrappers())):  # innermost first, as in unload
            if isinstance(module, AdaptedLayer):
                if adapter_name in module.adapters:
                    module.remove(adapter_name)
                if len(module.adapters) == 0:
                    replace_module(self.model, name, module.base_layer)
            else:
                module.remove(adapter_name)
                if len(module.modules_to_save) == 0:
                    replace_module(self.model, name, module.original_module)
        self._extra.pop(adapter_name, None)
        self._restore_unclaimed()
        if adapter_name in self.extra_modules:
            del self.extra_modules[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` everywhere; layers left with no adapter get their base module back. A merged adapter
        is unmerged first (peft refuses to delete it); the other active adapters stay active, and merged if they
        were; when none is left, the first remaining adapter becomes active.

        Raises:
            ConfigError: unknown name, or an adapter that another one builds on (a fusion's fused
                adapters: delete the fusion first); nothing is removed then.
        """
        self.check_known([adapter_name])
        users = [other for other in self.public_names() if other != adapter_name
                 and adapter_name in [name for _, name in self.tuner(other).bundled(self, other)]]
        if users:
            raise ConfigError(f"cannot delete adapter {adapter_name!r}: adapter(s) {users} use it (a fusion runs the "
                              f"adapters it fuses); delete {users} first")
        self._remove_everywhere(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if remaining or not self.peft_config or not self.active_adapters:
            # the others stay active, and merged: deleting one is no switch (set_adapter would unmerge them)
            self.active_adapters = remaining
            for _, w in self.wrappers():
                w.set_active(self.in_use)
            self._set_trainable()
        else:
            self.set_adapter(self.public_names()[:1])

    def check_known(self, names: Sequence[str], rows: bool = False) -> None:
        """Raise :class:`ConfigError` naming any of ``names`` that is not an adapter of this model (the parts
        of composed adapters are not addressable); with ``rows`` (names of batch rows) the message also
        offers ``'__base__'``. Default ``rows=False``.

        Raises:
            ConfigError: some of ``names`` are unknown; the message lists them and this model's adapters.
        """
        public = self.public_names()
        unknown: list[Any] = []
        for n in names:  # each once (rows repeat names); a value given by mistake may be unhashable (a list)
            if n not in public and n not in unknown:
                unknown.append(n)
        if unknown:
            raise ConfigError(f"unknown adapter name(s) {unknown}; this model has {public}"
                              + (f" (and '{BASE_ROWS}' for rows without an adapter)" if rows else ""))

    @staticmethod
    def name_list(adapter_names: Any, field: str = "adapter_name") -> list[str]:
        """``adapter_names`` (one name as a ``str``, or a list/tuple of them) as a list.

        Raises:
            ConfigError: anything else (None, a number, a list holding a non-string), naming the value.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        check(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names),
              f"{field}={adapter_names!r} is not valid; give an adapter's name, or a list of names")
        return list(names)

    def named(self, adapter_names: str | Sequence[str] | None) -> list[str]:
        """``adapter_names`` as a list (one name given as a ``str``; None: the active adapters), each checked
        to exist (ConfigError otherwise, naming the known ones)."""
        if adapter_names is not None and not isinstance(adapter_names, (str, Iterable)):
            raise ConfigError(f"adapter_names={adapter_names!r} is not valid; give an adapter's name, a list of names, "
                              "or None for the active adapters")
        names = list(self.active_adapters if adapter_names is None else
                     [adapter_names] if isinstance(adapter_names, str) else adapter_names)
        self.check_known(names)
        return names

    # --- activation and trainability ------------------------------------------------------------------
    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate ``adapter_names`` (one or several, applied in order) and make them trainable unless
        their config says ``inference_mode``. Other adapters are frozen and unused.

        Raises:
            ConfigError: an unknown or repeated name, more than one soft-prompt adapter (counting the parts
                of composed adapters), a fusion with one of the adapters it fuses, or two adapters with their own
                copies of one module (``modules_to_save``, as peft refuses); the active adapters stay as they were.
        """
        names = self.name_list(adapter_names)
        self.check_known(names)
        _check_unique(names)
        for name in names:  # an adapter that runs others (a fusion) beside one of them would apply it twice
            inside = [other for _, other in self.tuner(name).bundled(self, name) if other in names]
            check(not inside, f"adapter {name!r} already applies {inside}; activating them together would apply "
                              f"{'it' if len(inside) == 1 else 'them'} twice: activate {name!r} alone")
        prompts = [self.owner(n) for n in self.parts(names) if self.peft_config[n].is_prompt_learning]
        if len(prompts) > 1:
            raise ConfigError(f"adapters {list(dict.fromkeys(prompts))} are soft-prompt adapters; activate at most one "
                              "of them at a time (stacking soft prompts is not supported)")
        for module_name, w in self.wrappers():  # as peft: one trained copy of a module runs at a time
            copies = [n for n in names if isinstance(w, ModulesToSaveWrapper) and n in w.modules_to_save]
            check(len(copies) <= 1,
                  f"adapters {copies} each train their own copy of {module_name!r} (modules_to_save), and only one "
                  "copy can run: activate one of them, or add the others without that module in modules_to_save")
        merged = self.merged_adapters()
        if merged and names != self.active_adapters:
            warnings.warn(f"adapter(s) {merged} are merged; unmerging them before switching to {names} (as peft "
                          "does)", stacklevel=3)
            self.unmerge()
        self.active_adapters = names
        for _, w in self.wrappers():
            w.set_active(self.in_use)
        self._set_trainable()

    def _set_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.extra_modules.requires_grad_(False)
        for name in self.training_parts():
            if name in self.extra_modules:
                self.extra_modules[name].requires_grad_(True)
            for _, w in self.wrappers():
                if isinstance(w, AdaptedLayer) and name in w.adapters:
                    adapter = w.adapters[name]
                    frozen = set(getattr(adapter, "frozen_parameters", ()))
                    for pname, p in adapter.named_parameters():  # an empty one has nothing to train
                        p.requires_grad_(pname not in frozen and p.numel() > 0)
                elif isinstance(w, ModulesToSaveWrapper) and name in w.modules_to_save:
                    w.modules_to_save[name].requires_grad_(True)
            for pname in self.extra_trainable(name):
                self.extra_parameter(pname).requires_grad_(True)

    def set_disabled(self, disabled: bool) -> None:
        """Switch every wrapper to its base module (``disabled=True``) or back (False); soft-prompt hooks also stop
        rewriting calls. Merged weights are not touched (``PeftModel.disable_adapter`` unmerges first)."""
        self.disabled = disabled
        for _, w in self.wrappers():
            w.disabled = disabled

    def saved_form_differs(self) -> bool:
        """Whether loading this model's adapter files back would replace some trainable parameters by another
        form (a soft prompt's encoder not folded yet, dense diff-pruning differences): asked of every layer
        adapter (:attr:`Adapter.saved_form_differs`) and every module kept outside the layers."""
        holders = [*self.extra_modules.values(),
                   *(w.adapters for _, w in self.wrappers() if isinstance(w, AdaptedLayer))]
        return any(getattr(m, "saved_form_differs", False) for holder in holders for m in holder.modules())

    def method_state(self) -> dict[str, Tensor]:
        """Every adapter's :meth:`~peftkit.tuners.Tuner.method_state` (what a resumed run needs beyond parameters
        and buffers), keyed ``<adapter name>:<method's key>``; empty for most methods."""
        return {f"{name}:{key}": value for name in self.peft_config
                for key, value in self.tuner(name).method_state(self, name).items()}

    def load_method_state(self, tensors: dict[str, Tensor], check_only: bool = False) -> None:
        """Restore :meth:`method_state`'s tensors, all checked before any is applied (``check_only``: only check).

        Raises:
            ConfigError: a key of no adapter of this model, or tensors an adapter's method does not keep or
                that do not fit it.
        """
        names = sorted(self.peft_config, key=len, reverse=True)  # the longest name that prefixes a key owns it
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            owner = next((n for n in names if key.startswith(f"{n}:")), None)
            check(owner is not None, f"the checkpoint holds training state {key!r} of an adapter this model does "
                                     f"not have (it has {list(self.peft_config)}); resume with the run's own options")
            grouped.setdefault(owner, {})[key[len(owner) + 1:]] = value
        for name, part in grouped.items():
            self.tuner(name).load_method_state(self, name, part, check_only=True)
        if not check_only:
            for name, part in grouped.items():
                self.tuner(name).load_method_state(self, name, part)

    # --- merging ------------------------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        """Adapters merged into at least one layer, by owner (a composed adapter, not its parts), in the
        order first found in the model."""
        out: list[str] = []
        for _, w in self.wrappers():
            if isinstance(w, AdaptedLayer):
                for owner in map(self.owner, w.merged_adapters):
                    if owner not in out:  # two parts of one composed adapter in one layer name it once
                        out.append(owner)
        return out

    @torch.no_grad()
    def _retie_merged(self) -> None:
        """After a merge for :meth:`unload`: layers that shared one weight (tied input/output embeddings), which
        merging untied, share it again when their merged weights are equal (trainable tokens write the same rows
        into both, as peft's merged model keeps them tied). The shared tensor takes the merged value. Left untied:
        merged weights that differ (LoRA on the embedding alone: the head keeps the base table) or a shared
        tensor that a module outside these layers still uses."""
        groups: dict[int, list[AdaptedLayer]] = {}
        for _, w in self.wrappers():
            if isinstance(w, AdaptedLayer) and w._tied_weight is not None:
                groups.setdefault(id(w._tied_weight), []).append(w)
        used = {id(p) for m in self.model.modules() for k, p in m._parameters.items()  # (not the kept shared ones)
                if p is not None and not (isinstance(m, AdaptedLayer) and k == "_tied_weight")}
        for layers in groups.values():
            shared = layers[0]._tied_weight
            merged = layers[0].base_layer.weight
            if (len(layers) < 2 or id(shared) in used
                    or any(w.base_layer.weight.shape != shared.shape or w.base_layer.weight.dtype != shared.dtype
                           or not torch.equal(w.base_layer.weight, merged) for w in layers)):
                continue
            shared.copy_(merged)
            for w in layers:
                w.base_layer.weight = shared
                w._tied_weight = None

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False,
              dropping: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights.

        A composed adapter merges when every part does; otherwise the error names the part that does not.
        With ``dropping`` the unmerged adapters not named are about to be removed (``unload``), so they do
        not block a merge that only they would make inexact.

        Raises:
            ConfigError: unknown name. ValueError: a method that cannot merge, an adapter whose merge could
            not be undone (a zero (IA)^3/SSF scale), or with ``safe_merge`` a merged weight that is not finite;
            all checked before any layer changes.
        """
        names = self.check_merge(adapter_names, safe_merge, dropping)
        layers = [w for _, w in self.wrappers() if isinstance(w, AdaptedLayer)]
        counts: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        for w in layers:
            w.merge(names, tied=counts.get(id(w.weight), 0) > 1)

    def check_merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False,
                    dropping: bool = False) -> list[str]:
        """Every check :meth:`merge` makes, changing nothing; returns the adapters (and their parts) it would
        merge. ``adapter_names`` (default None: the active ones), ``safe_merge`` (default False) and ``dropping``
        (default False; True: the unmerged adapters not named are about to be removed) as for :meth:`merge`.

        Raises:
            ValueError: the adapters are disabled (inside ``disable_adapter()``); a layer to merge into is offloaded
                (accelerate's ``cpu_offload``/``dispatch_model``: tensors on the meta device); otherwise as
                :meth:`merge`.
        """
        if self.disabled:
            raise ValueError("cannot merge while the adapters are disabled (inside disable_adapter()); "
                             "merge after the with-block")
        names = self.named(adapter_names)
        _check_unique(names)
        for n in names:
            for part in self.members.get(n) or [n]:
                peft_type = self.peft_config[part].peft_type
                if not get_method(peft_type).mergeable:
                    what = f"one of its parts uses {peft_type}" if part != n else f"it uses {peft_type}"
                    raise ValueError(f"adapter {n!r} cannot be merged: {what}, which cannot be merged (its effect is "
                                     "not a fixed change of the weights); keep it unmerged (it runs as it is), "
                                     "unload() it, or name the adapters to merge (adapter_names=[...])")
        public = list(names)
        names = self.parts(names)
        offloaded = [f"{layer_name}.{key}" for layer_name, w in self.wrappers()
                     if isinstance(w, AdaptedLayer) and any(n in w.adapters for n in names)
                     for key, t in w.state_dict(keep_vars=True).items() if t.is_meta]
        if offloaded:
            raise ValueError(f"cannot merge {public}: the layers to merge into are offloaded by accelerate's hooks "
                             f"(their tensors are on the meta device, e.g. {offloaded[:3]}), where a merge changes "
                             "nothing; merge before cpu_offload/dispatch_model, or load the model without offloading; "
                             "nothing was merged")
        for layer_name, w in self.wrappers():
            problem = w.check_partial_merge(names, dropping) if isinstance(w, AdaptedLayer) else None
            if problem:
                for part in {p for p in names if self.owner(p) != p}:  # users name composed adapters, not parts
                    problem = problem.replace(repr(part), f"{self.owner(part)!r} (its {self.peft_config[part].peft_type} "
                                                          "part)")
                raise ValueError(f"cannot merge {public} on layer {layer_name!r}: {problem}; nothing was merged")
            for n in names if isinstance(w, AdaptedLayer) and not dropping else ():  # (dropping: never unmerged)
                problem = w.adapters[n].merge_problem() if n in w.adapters and n not in w.merged_adapters else None
                if problem:
                    raise ValueError(f"cannot merge adapter {n!r} on layer {layer_name!r}: its {problem}; nothing "
                                     "was merged")
        if safe_merge:
            for layer_name, w in self.wrappers():
                if not isinstance(w, AdaptedLayer):
                    continue
                for n in names:
                    if n in w.adapters and n not in w.merged_adapters:
                        weight, bias = w.weight.detach().float(), None if w.bias is None else w.bias.detach().float()
                        new_w, _ = w.adapters[n].merge_into(w, weight, bias)
                        if not torch.isfinite(new_w).all():
                            raise ValueError(f"merging adapter {n!r} gives non-finite weights on layer {layer_name!r} "
                                             "(its tensors hold NaN or inf); nothing was merged")
        return names

    def unmerge(self) -> None:
        """Undo all merges, restoring the base weights to float tolerance."""
        for _, w in self.wrappers():
            if isinstance(w, AdaptedLayer):
                w.unmerge()

    def unload(self, merge: bool = False, adapter_names: Sequence[str] | None = None,
               safe_merge: bool = False) -> nn.Module:
        """Return the bare model: wrappers replaced by their base modules (merged first if ``merge``);
        ``modules_to_save`` become, when merging, the trained copy of a merged adapter (an active one's first,
        then the first named in ``adapter_names``), else the original.
        When merging, exactly ``adapter_names`` (default: the active adapters) end up in the weights: an
        adapter merged earlier (``merge_adapter``) but not named is taken out again. Without merging,
        base parameters an adapter trained or loaded (e.g. ``bias="all"``) get their own values back;
        either way every base parameter's ``requires_grad`` is put back as it was.

        Raises:
            as :meth:`merge` (``safe_merge`` as there); the model is then left as it was.
        """
        names: list[str] = []
        if merge:
            names = self.named(adapter_names)
            _check_unique(names)  # before anything is unmerged below
            before = self.merged_adapters()
            if all(n in self.parts(names) for n in before):
                self.merge(names, safe_merge=safe_merge, dropping=True)
            else:  # an earlier merge of an adapter that is to be dropped: start again from the base weights
                self.unmerge()
                try:
                    self.merge(names, safe_merge=safe_merge, dropping=True)
                except BaseException:
                    self.unmerge()
                    self.merge(before)
                    raise
            self._retie_merged()
        else:
            self.unmerge()
        for name in list(self.peft_config):  # while the layers still hold their adapters (gates find their hooks)
            self.tuner(name).remove(self, name)
        # the adapters merged in keep their trained copies (modules_to_save): an active one's first, as peft
        keep = [n for n in self.active_adapters if n in names] + [n for n in names if n not in self.active_adapters]
        # innermost first: a wrapper inside a wrapped sub-layer (LoRA on the dense layer inside a parallel
        # adapter's attention.output) is addressed through the outer wrapper, which must still be there
        for name, w in reversed(list(self.wrappers())):
            if isinstance(w, AdaptedLayer):
                for n, adapter in w.adapters.items():  # what is not merged in goes, with what it took from the base
                    if n not in w.merged_adapters:
                        adapter.restore_base(w)
                replace_module(self.model, name, w.base_layer)
            else:
                copy = next((w.modules_to_save[a] for a in keep if a in w.modules_to_save), w.original_module)
                replace_module(self.model, name, copy)
        self.peft_config.clear()
        self.members.clear()
        self.active_adapters = []
        self._extra.clear()
        if merge:
            self._originals.clear()
        self._restore_unclaimed()
        self.extra_modules.clear()
        for n, p in self.model.named_parameters():
            if n in self._requires_grad:
                p.requires_grad_(self._requires_grad[n])
        return self.model

    # --- state for saving ---------------------------------------------------------------------------
    def adapter_tensors(self, adapter_name: str, export: bool = False) -> dict[str, Tensor]:
        """The tensors of one adapter keyed as on disk, relative to the model (no ``base_model.model.``):
        ``<module path>.<parameter path inside the adapter>``; built from the module tree. With ``export``
        each adapter gives what its file holds (:meth:`Adapter.export_state`, e.g. only kept ranks);
        without, the live tensors (what loading copies into). ``adapter_name`` may name a part."""
        if adapter_name not in self.peft_config:
            self.check_known([adapter_name])
        out: dict[str, Tensor] = {}
        wrapped = list(self.wrappers())
        saved = {n for n, w in wrapped if isinstance(w, ModulesToSaveWrapper)}
        for name, w in wrapped:
            logical = _outside_copies(name, saved)
            if logical is None:  # inside another adapter's trained copy: saved with that copy
                continue
            logical = self._outside_sublayers(logical)
            if isinstance(w, AdaptedLayer) and adapter_name in w.adapters:
                adapter = w.adapters[adapter_name]
                for k, t in (adapter.export_state() if export else adapter.state_dict()).items():
                    out[f"{logical}.{k}"] = t
            elif isinstance(w, ModulesToSaveWrapper) and adapter_name in w.modules_to_save:
                for k, t in _plain_state(w.modules_to_save[adapter_name], unmerged=export).items():
                    out[f"{logical}.{k}"] = t
        # a trained base bias (bias="all"/"lora_only") of a layer with merged adapters holds their bias deltas: the
        # file gets its unmerged value, which loading (unmerged) expects
        merged_biases = {id(w.base_layer.bias): w for _, w in wrapped if isinstance(w, AdaptedLayer)
                         and w.merged_adapters and getattr(w.base_layer, "bias", None) is not None} if export else {}
        for pname in self.extra_trainable(adapter_name):
            param = self.extra_parameter(pname)
            layer = merged_biases.get(id(param))
            out[self._file_name(pname, adapter_name)] = param if layer is None else layer.unmerged_bias()
        return out

    def _outside_sublayers(self, name: str) -> str:
        """A module path with the ``base_layer.`` of wrapped sub-layers left out (``attention.output.base_layer.
        dense`` -> ``attention.output.dense``): a layer inside a parallel adapter's sub-layer is saved under its
        name in the plain model, as peft names it, whichever order the adapters were added in."""
        return self._drop_base_layers(name, lambda outer: not getattr(outer, "holds_adaptable_modules", False))

    def _file_name(self, pname: str, adapter_name: str) -> str:
        """The file key of a base parameter that ``adapter_name`` trains (``bias="all"``): its name with the
        ``base_layer.`` of layers that only *other* adapters wrap left out, i.e. its name in a model holding
        this adapter alone, whichever adapters were added before or after it (peft's layout). A parameter of a
        sub-module that peft wraps too when it wraps the layer (``AdaptedLayer.peft_wrapped_children``: an attention's
        ``out_proj``) gets that wrapper's ``base_layer.`` as well (``attn.base_layer.out_proj.base_layer.bias``)."""
        key = self._drop_base_layers(
            pname, lambda layer: isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters)
        head, child, leaf = pname.rsplit(".", 2) if pname.count(".") >= 2 else ("", "", pname)
        if head.endswith(".base_layer"):
            layer = self.model.get_submodule(head[: -len(".base_layer")])
            if (isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters
                    and child in getattr(layer, "peft_wrapped_children", ())):
                key = f"{key.rpartition('.')[0]}.base_layer.{leaf}"
        return key

    def _drop_base_layers(self, name: str, keep: Any) -> str:
        """``name`` with each ``.base_layer.`` segment left out unless ``keep(the module before it)``."""
        parts = name.split(".base_layer.")
        out = parts[0]
        for rest in parts[1:]:
            try:
                outer = self.model.get_submodule(out)
            except AttributeError:
                outer = None
            out = f"{out}.base_layer.{rest}" if keep(outer) else f"{out}.{rest}"
        return out


def _outside_copies(name: str, saved: set[str]) -> str | None:
    """The module path ``name`` as the user sees it when it lies in a ``modules_to_save`` wrapper's
    original module (``x.original_module.y`` -> ``x.y``), or None when it lies in a trained copy."""
    for w in sorted(saved, key=len, reverse=True):
        if name.startswith(f"{w}.modules_to_save."):
            return None
        if name == f"{w}.original_module" or name.startswith(f"{w}.original_module."):
            return _outside_copies(w + name[len(w) + len(".original_module"):], saved)
    return name


def _plain_state(module: nn.Module, unmerged: bool = False) -> dict[str, Tensor]:
    """``module.state_dict()`` as if it held no adapted layers: another adapter's weights inside an
    adapted layer are left out and ``base_layer.`` is dropped from the keys (a trained copy of a module
    that carries another adapter's LoRA saves just the module). With ``unmerged`` (what files hold) the weight
    and bias of an adapted layer with merged adapters are its unmerged values
    (:meth:`AdaptedLayer.unmerged_base_state`, computed on copies; a bias the merge created is left out)."""
    inner = sorted((n for n, m in module.named_modules() if isinstance(m, AdaptedLayer)), key=len, reverse=True)
    state = module.state_dict()
    for n, m in module.named_modules() if unmerged else ():
        if isinstance(m, AdaptedLayer) and m.merged_adapters:
            pre = f"{n}.base_layer." if n else "base_layer."
            fixed = m.unmerged_base_state()
            for attr in ("weight", "bias"):
                if pre + attr in state:
                    if attr in fixed:
                        state[pre + attr] = fixed[attr]
                    else:
                        del state[pre + attr]
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        for n in inner:
            pre = f"{n}." if n else ""
            if key.startswith(pre + "adapters."):
                key = ""
                break
            if key.startswith(pre + "base_layer."):
                key = pre + key[len(pre) + len("base_layer."):]
        if key:
            out[key] = t
    return out


def _check_unique(names: Sequence[str]) -> None:
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ConfigError(f"adapter name(s) {repeated} given more than once in {list(names)}; name each once")


def _logical(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peftkit.targeting import iter_logical_modules

    return iter_logical_modules(model)
