"""``inject_adapter_in_model``: adapter layers put into a model in place, without a :class:`~peftkit.PeftModel`
around it (mirrors ``peft.inject_adapter_in_model``).

The model keeps its own class and forward; its targeted layers become peftkit's wrapped layers. The adapters'
bookkeeping (configs, the active set) lives on a :class:`~peftkit.PeftModel` that the model carries unregistered
(not a sub-module: it adds no parameter, no state-dict key and no ``repr`` line), so that
:func:`peftkit.get_peft_model_state_dict` and :func:`peftkit.set_peft_model_state_dict` work on the model
itself, with peft's keys for such a model (module paths without ``base_model.model.``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from peftkit.config import PeftConfig
from peftkit.host import check_config
from peftkit.methods.lora_init import check_trainable_init

#: the attribute of an injected model holding its adapters' PeftModel (kept out of ``nn.Module``'s registries)
_HOLDER = "_peftkit_injected"

#: file-key prefix of a PeftModel's module paths, which an injected model's keys lack
PREFIX = "base_model.model."


def injected(model: Any) -> Any:
    """The :class:`~peftkit.PeftModel` holding the adapters of a model returned by :func:`inject_adapter_in_model`
    (a ``torch.compile`` wrapper of one is looked through), or None for any other object."""
    model = getattr(model, "_orig_mod", model)
    return vars(model).get(_HOLDER) if isinstance(model, nn.Module) else None


def file_keys(holder: Any, adapter_name: str, tensors: Mapping[str, Tensor], injected_form: bool) -> dict[str, Tensor]:
    """``tensors`` of adapter ``adapter_name`` of an injected model re-keyed between its PeftModel ``holder``'s file
    keys (``base_model.model.<module path>...``) and the injected model's own (``<module path>...``, peft's keys
    for it): to the injected form when ``injected_form``, else to the holder's (a key already in that form is
    kept). A bundled adapter's namespace (a composition's ``parts.<i>.``, a fusion's ``fused.<name>.``) stays in
    front: ``parts.0.base_model.model.lin.lora_A.weight`` <-> ``parts.0.lin.lora_A.weight``."""
    host = holder.base_model
    spaces = ([f"{space}." for space, _ in host.tuner(adapter_name).bundled(host, adapter_name)]
              if adapter_name in host.peft_config else [])
    out = {}
    for key, value in tensors.items():
        space = next((s for s in spaces if key.startswith(s)), "")
        rest = key[len(space):]
        if injected_form:
            rest = rest.removeprefix(PREFIX)
        elif not rest.startswith(PREFIX):
            rest = PREFIX + rest
        out[space + rest] = value
    return out


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Mapping[str, Tensor] | None = None
                            ) -> nn.Module:
    """Put adapter ``adapter_name`` described by ``peft_config`` into ``model``'s layers, in place, and return
    ``model`` itself (mirrors ``peft.inject_adapter_in_model``): no :class:`~peftkit.PeftModel` wraps it, so the
    model keeps its class, ``forward`` and ``generate``.

    As in peft, the base parameters are frozen and the new adapter is the one active adapter (it trains unless
    ``peft_config.inference_mode``); ``model.peft_config`` is the adapter name -> config table. Calling it again
    on the returned model adds another adapter, which then becomes the active one (peft does the same, with a
    warning). :func:`peftkit.get_peft_model_state_dict` on the model gives peft's keys for an injected model,
    the module paths without ``base_model.model.`` (``model.layers.0.self_attn.q_proj.lora_A.weight``), and
    :func:`peftkit.set_peft_model_state_dict` loads such a dict, or one keyed as a PeftModel's file.

    Args:
        peft_config: the adapter's config, any peftkit method that adapts layers or selects parameters.
        model: any ``torch.nn.Module`` (a ``transformers`` model first).
        adapter_name: the adapter's name (default ``"default"``).
        low_cpu_mem_usage: accepted for peft's signature (default False); it changes nothing here.
        state_dict: optional, as in peft: adapt exactly the modules named by this adapter state dict's keys
            (``{module path}.{adapter tensor}``, with or without ``base_model.model.``) instead of those
            ``target_modules`` selects; only the keys are read, not the values, and keys of the model's own
            tensors (``lin.weight``) are skipped. The adapter's config is then a copy of ``peft_config`` whose
            ``target_modules`` is a regex matching exactly those module paths (no other module whose path merely
            ends in one of them).

    Returns:
        ``model``, with the adapter's layers inside.

    Raises:
        ValueError: a prompt-learning config (prompt tuning, P-tuning, prefix tuning, or a composed config with
            such a part), whose adapter changes the model's inputs rather than its layers and needs a
            :class:`~peftkit.PeftModel` (use :func:`peftkit.get_peft_model`), as peft refuses it; a VeRA or VB-LoRA
            config, whose projection or vector bank is shared by every layer (peft refuses both too); a
            ``state_dict`` none of whose keys names an adapter tensor of a module of ``model`` (e.g. the model's own
            state dict, which peft refuses too).
        ConfigError: an invalid config or adapter name, a name already in use, no module matching the targets.
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``state_dict`` is not a mapping of names.
        The model is left unchanged on every error.
    """
    from peftkit.model import PeftModel

    check_config(peft_config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={model!r:.80} is a {type(model).__name__}; give the torch.nn.Module to adapt")
    prompt = _prompt_learning_part(peft_config)
    if prompt is not None:
        raise ValueError(f"inject_adapter_in_model does not support prompt-learning methods ({prompt}): their adapter "
                         "changes the model's inputs, which needs a PeftModel; use peftkit.get_peft_model instead")
    shared = {"VERA": "projection", "VBLORA": "vector bank"}.get(peft_config.peft_type)
    if shared is not None:
        raise ValueError(f"inject_adapter_in_model does not support {peft_config.peft_type}, whose {shared} is shared by "
                         "every adapted layer (peft refuses it too); use peftkit.get_peft_model instead")
    check_trainable_init(peft_config)
    if state_dict is not None:
        peft_config = _targets_from_state_dict(peft_config, model, state_dict)
    holder = injected(model)
    if holder is None:
        holder = PeftModel(model, peft_config, adapter_name)
        vars(holder.get_base_model())[_HOLDER] = holder  # unregistered: no parameter, key or repr line
    else:
        holder.add_adapter(adapter_name, peft_config)
        holder.set_adapter(adapter_name, inference_mode=peft_config.inference_mode)
    holder.base_model._set_trainable()
    base = holder.get_base_model()
    base.peft_config = holder.peft_config  # the adapters' names: a composition's parts are not listed
    return model


def _prompt_learning_part(config: PeftConfig) -> str | None:
    """The ``peft_type`` of ``config`` or of one of its parts (a composed config) when it is prompt learning."""
    if config.is_prompt_learning:
        return config.peft_type
    for part in getattr(config, "configs", None) or ():
        found = _prompt_learning_part(part)
        if found is not None:
            return found
    return None


def _targets_from_state_dict(config: PeftConfig, model: nn.Module, state_dict: Mapping[str, Tensor]) -> PeftConfig:
    """A copy of ``config`` adapting exactly the modules that ``state_dict``'s keys name: for each key (without
    ``base_model.model.`` or ``_orig_mod.``) that is not one of the model's own tensors, the longest dotted prefix
    that is a module path of ``model``. Its ``target_modules`` is a regex matching those full paths only."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise TypeError(f"state_dict must be a mapping of tensor names (an adapter state dict), got "
                        f"{type(state_dict).__name__}")
    root = getattr(model, "_orig_mod", model)
    modules = {n for n, _ in root.named_modules() if n}
    own = set(root.state_dict())  # the model's own tensors ('lin.weight'): such a key names no adapter tensor
    names: list[str] = []
    for key in state_dict:
        key = key.removeprefix(PREFIX).removeprefix("_orig_mod.")
        if key in own:
            continue
        path = key.split(".")
        found = next((".".join(path[:i]) for i in range(len(path) - 1, 0, -1) if ".".join(path[:i]) in modules), None)
        if found is not None and found not in names:
            names.append(found)
    if not names:
        raise ValueError(f"state_dict names no module of the model by an adapter tensor (e.g. {list(state_dict)[:3]}); "
                         "give the adapter state dict of this model (keys '<module path>.<adapter tensor>'; the "
                         "model's own tensors, such as '<module path>.weight', are skipped)")
    config = copy.deepcopy(config)
    # anchored full paths: a list entry also matches any module whose path ends in it ('sub.lin' for 'lin')
    config.target_modules = "(?:" + "|".join(re.escape(n) for n in names) + ")"
    for field in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if any(f.name == field for f in dataclasses.fields(config)):
            setattr(config, field, None)
    return config
