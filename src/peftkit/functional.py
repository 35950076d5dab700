"""Functions for a model that holds adapters without a :class:`~peftkit.PeftModel` around it, one from
:func:`peftkit.inject_adapter_in_model` (mirrors ``peft.functional``, the API that transformers and diffusers
use for such models): switch, freeze, delete and upcast its adapters, and read or write their state dicts.

Each function also takes a :class:`~peftkit.PeftModel` (or a ``torch.compile`` wrapper of either model), where it
does what the PeftModel's method of the same name does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.config import check
from peftkit.formats.hf_peft import get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.inject import inject_adapter_in_model, injected
from peftkit.layers import AdaptedLayer

__all__ = [
    "cast_adapter_dtype",
    "delete_adapter",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_adapter",
    "set_peft_model_state_dict",
    "set_requires_grad",
]


def _holder(model: Any, caller: str) -> Any:
    """The :class:`~peftkit.PeftModel` that keeps ``model``'s adapters: the model itself when it is one, else the
    one :func:`inject_adapter_in_model` left on it.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``. ValueError: a module holding no injected adapter.
    """
    from peftkit.model import PeftModel

    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, PeftModel):
        return inner
    if not isinstance(inner, nn.Module):
        raise TypeError(f"{caller}() takes a torch.nn.Module holding adapters, not a {type(model).__name__}")
    holder = injected(inner)
    if holder is None:
        raise ValueError(f"{caller}(): this {type(inner).__name__} holds no adapter put in by "
                         "peftkit.inject_adapter_in_model (nor is it a PeftModel); inject one first")
    return holder


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
    """Activate one adapter of ``model``, or several at once (a list, applied in that order; their changes add up
    on a layer they share), as ``peft.functional.set_adapter``. The activated adapters train unless
    ``inference_mode=True`` (default False), which freezes them; the others are frozen. Adapters merged into the
    weights are unmerged first, with a warning (as in peft).

    Args:
        model: a model from :func:`inject_adapter_in_model`, or a :class:`~peftkit.PeftModel`.
        adapter_name: a name, or a list of names.
        inference_mode: freeze the activated adapters (default False).

    An empty list is taken, as by ``peft.functional.set_adapter`` (and unlike ``PeftModel.set_adapter``): no adapter
    is active, and the model runs as its base.

    Raises:
        ConfigError: an unknown or repeated name, a value that is neither a name nor a list of names (peft
            ignores an unknown name), or a non-bool ``inference_mode``; nothing changes then. TypeError / ValueError:
            ``model`` is not a module / holds no injected adapter.
    """
    holder = _holder(model, "set_adapter")
    holder._activate(holder._names_to_activate(adapter_name, inference_mode), inference_mode)


def delete_adapter(model: nn.Module, adapter_name: str, prefix: str | None = None) -> list[str] | None:
    """Remove adapter ``adapter_name`` from ``model`` (``peft.functional.delete_adapter``): its layers go, a layer
    left with no adapter gets its base module back, and, unlike peft, its config leaves ``model.peft_config``.

    Args:
        model: a model from :func:`inject_adapter_in_model`, or a :class:`~peftkit.PeftModel`.
        adapter_name: the adapter to remove.
        prefix: accepted for peft's signature (its method's parameter prefix, e.g. ``"lora_"``); peftkit finds the
            adapter's layers by name, so it changes nothing (default None).

    Returns:
        the active adapters left (when the deleted one was the only active adapter, the first remaining adapter
        becomes active, as in peft), or None when no adapter is left.

    Raises:
        ConfigError: an unknown name, or an adapter that a fusion uses; nothing is removed then. TypeError /
            ValueError: ``model`` is not a module / holds no injected adapter.
    """
    holder = _holder(model, "delete_adapter")
    holder.delete_adapter(adapter_name)
    return holder.active_adapters or None


def set_requires_grad(model: nn.Module, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
    """Make adapters of ``model`` trainable, or frozen with ``requires_grad=False`` (default True), without
    changing which are active (``peft.functional.set_requires_grad``); an inactive adapter made trainable trains
    once activated.

    Raises:
        ConfigError: an unknown name or a non-bool ``requires_grad``; nothing changes then. TypeError / ValueError:
            ``model`` is not a module / holds no injected adapter.
    """
    _holder(model, "set_requires_grad").set_requires_grad(adapter_names, requires_grad=requires_grad)


#: the dtypes :func:`cast_adapter_dtype` upcasts to float32, as peft's (half precision and the float8 kinds this
#: torch has)
_UPCAST = {torch.float16, torch.bfloat16} | {getattr(torch, n) for n in (
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)}


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Upcast the float16, bfloat16 and float8 tensors of adapter ``adapter_name`` to float32, as
    ``peft.functional.cast_adapter_dtype``: its tensors in every wrapped layer. As in peft (and as
    :func:`peftkit.get_peft_model` creates them), its trained copies of ``modules_to_save`` modules and its soft
    prompts keep the base model's dtype, and so do the base model's own tensors.

    peftkit creates adapters in float32 on a half-precision base already, so this matters after the whole model
    was cast (``model.to(torch.bfloat16)`` casts the adapters too). Each parameter keeps its identity (its
    ``.data`` is replaced; peft assigns new parameters), so an optimiser built before still holds it; buffers are
    replaced.

    Args:
        model: a model from :func:`inject_adapter_in_model`, or a :class:`~peftkit.PeftModel`.
        adapter_name: the adapter to upcast.
        autocast_adapter_dtype: False does nothing, as in peft (default True).

    Raises:
        ConfigError: an unknown adapter name (peft ignores it), a name that is not a string, or a non-bool ``autocast_adapter_dtype``; nothing
            changes then. TypeError / ValueError: ``model`` is not a module / holds no injected adapter.
    """
    holder = _holder(model, "cast_adapter_dtype")
    check(isinstance(autocast_adapter_dtype, bool),
          f"autocast_adapter_dtype={autocast_adapter_dtype!r} must be True or False")
    check(isinstance(adapter_name, str), f"adapter_name={adapter_name!r} is not valid; give one adapter's name")
    host = holder.base_model
    host.check_known([adapter_name])
    if not autocast_adapter_dtype:
        return
    names = host.parts([adapter_name])  # a composed adapter runs its parts too
    owners = [w.adapters[n] for _, w in host.wrappers() if isinstance(w, AdaptedLayer) for n in names if n in w.adapters]
    with torch.no_grad():
        for owner in owners:
            for module in owner.modules():
                for param in module.parameters(recurse=False):
                    if param.dtype in _UPCAST:
                        param.data = param.data.to(torch.float32)
                        if param.grad is not None:
                            param.grad = param.grad.float()
                for key, buf in list(module._buffers.items()):
                    if buf is not None and buf.dtype in _UPCAST:
                        module._buffers[key] = buf.to(torch.float32)
