"""What adapters a model holds and in what state: peft's ``get_layer_status`` / ``get_model_status``.

Both take a :class:`~peftkit.PeftModel` or any ``nn.Module`` holding peftkit layers and return plain
dataclasses with peft's field names, so code that inspects a peft model's state ports unchanged. An
inconsistent state across layers (say, an adapter merged into some layers but not others) is reported
as ``"irregular"``, as peft does.

Beyond peft: a soft prompt (prompt tuning, P-tuning, prefix tuning) is reported as a layer of its own,
the module that holds its virtual tokens (peft refuses prompt-learning models here), and a
:class:`~peftkit.PeftModel` whose adapters wrap no layer yet gives an empty list rather than an error.
Names are those the user addresses: the parts of a composed adapter (``ComposedConfig``, UniPELT, MAM)
are reported under their owner's name.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from peftkit.layers import AdaptedLayer, ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """The state of one adapted module.

    Attributes:
        name: the module's name inside the model given (for a PeftModel: inside ``model.base_model``,
            e.g. ``"model.bert.encoder.layer.0.attention.self.query"``, as in peft).
        module_type: ``"AdaptedLayer(Linear)"`` (a wrapped layer and its base type),
            ``"ModulesToSaveWrapper(Linear)"`` (a ``modules_to_save`` copy), or the class of a soft
            prompt's module (e.g. ``"PromptEmbedding"``).
        enabled: False inside ``disable_adapter()``. (peft also sets the adapters' ``requires_grad`` to
            False there; peftkit leaves it, a disabled adapter gets no gradient anyway.)
        active_adapters: the adapters this module runs, in order: the active adapters it holds (peft lists
            every active adapter of the model, also those not on this module).
        merged_adapters: the adapters folded into its weights, in the order merged.
        requires_grad: adapter name -> True / False when all of its parameters here do / do not require
            grad, ``"irregular"`` for a mix. Adapters without parameters here are left out.
        available_adapters: every adapter on this module, sorted.
        devices: adapter name -> the sorted device types (``"cpu"``, ``"cuda"``) of its tensors here.
        quantization_backend: the storage format of a quantised base layer (``"nf4"``, ``"int8"``,
            ``"int4"``; see :func:`peftkit.quantize_base`), else None.
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The state of a whole model's adapters, aggregated over :func:`get_layer_status`.

    Attributes:
        base_model_type: the class name of the user's model (``"other"`` for a model that is not a
            transformers ``PreTrainedModel`` and not wrapped in a PeftModel, as in peft).
        adapter_model_type: ``"AdapterModel"`` (peftkit's tuner model) for a PeftModel, else ``"None"``.
        peft_types: adapter name -> its config's ``peft_type`` (e.g. ``{"default": "LORA"}``); empty when
            the model is not a PeftModel.
        trainable_params, total_params: as ``PeftModel.get_nb_trainable_parameters()``.
        num_adapter_layers: how many entries :func:`get_layer_status` gives.
        enabled: True / False when every layer is enabled / disabled, else ``"irregular"``.
        active_adapters: the active adapters, in order, when every layer runs those of them it holds; else
            ``"irregular"``.
        merged_adapters: the adapters merged wherever they sit, sorted; ``"irregular"`` when one is merged in
            some layers and not in others that hold it.
        requires_grad: adapter name -> True / False when consistent over every layer, else ``"irregular"``.
        available_adapters: every adapter on any layer, sorted.
        devices: adapter name -> the sorted device types of its tensors anywhere.
        quantization_backend: the format every layer shares (None when none is quantised), else
            ``"irregular"``.
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def _consistent(values: Iterable[Any]) -> Any:
    """The one value all of ``values`` share, else ``"irregular"``."""
    distinct = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    return distinct[0] if len(distinct) == 1 else "irregular"


def _unique(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def _per_adapter(modules: dict[str, nn.Module], owner: Callable[[str], str]
                 ) -> tuple[dict[str, bool | Irregular], dict[str, list[str]]]:
    """``(requires_grad, devices)`` by (owner) adapter name from each adapter's module on one layer."""
    grads: dict[str, list[bool]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for name, module in modules.items():
        key = owner(name)
        for p in module.parameters():
            devices[key].add(p.device.type)
            if p.numel():  # (a FISH tensor with no entry chosen holds an empty parameter that never trains)
                grads[key].append(p.requires_grad)
        for b in module.buffers():
            devices[key].add(b.device.type)
    return ({k: _consistent(v) for k, v in grads.items()},
            {k: sorted(v) for k, v in devices.items()})


def _backend(base: nn.Module) -> str | None:
    fmt = getattr(base, "fmt", None)
    return getattr(fmt, "method", None) if hasattr(base, "quantized_state") else None


def _host_of(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(module to walk, AdapterModel or None)`` for a PeftModel or a plain module (for a model from
    :func:`peftkit.inject_adapter_in_model`, the host of its adapters, which names a composition's parts by their
    owner)."""
    from peftkit.inject import injected
    from peftkit.model import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model, model.base_model
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_layer_status() takes a PeftModel or a torch.nn.Module, not {type(model).__name__}")
    holder = injected(model)
    return model, None if holder is None else holder.base_model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The state of every adapted module of ``model`` (peft's function of the same name).

    Args:
        model: a :class:`~peftkit.PeftModel`, or any ``nn.Module`` holding peftkit layers (e.g. the model
            inside one, ``peft_model.get_base_model()``).

    Returns:
        one :class:`TunerLayerStatus` per wrapped layer, ``modules_to_save`` wrapper and soft-prompt
        module, in model order. Empty for a PeftModel whose adapters wrap nothing.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a plain module (not a PeftModel) with no peftkit layer in it, as peft.
    """
    root, host = _host_of(model)
    owner = host.owner if host is not None else (lambda n: n)
    in_use = host.in_use if host is not None else []
    found: list[TunerLayerStatus] = []
    renamed: list[tuple[str, str]] = []  # a parallel adapter's sub-layer keeps its modules' plain names
    for physical, module in root.named_modules():
        name = next((logical + physical[len(real):] for real, logical in renamed if physical.startswith(real)),
                    physical)
        if getattr(module, "holds_adaptable_modules", False):
            renamed.insert(0, (physical + ".base_layer.", name + "."))
        if isinstance(module, AdaptedLayer):
            adapters, base = dict(module.adapters.items()), module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            adapters, base = dict(module.modules_to_save.items()), module.original_module
        elif host is not None and module is host.extra_modules:
            for key, prompt in module.items():
                grads, devices = _per_adapter({key: prompt}, owner)
                found.append(TunerLayerStatus(
                    name=f"{name}.{key}", module_type=type(prompt).__name__, enabled=not host.disabled,
                    active_adapters=[owner(key)] if key in in_use else [], merged_adapters=[],
                    requires_grad=grads, available_adapters=[owner(key)], devices=devices,
                    quantization_backend=None))
            continue
        else:
            continue
        grads, devices = _per_adapter(adapters, owner)
        found.append(TunerLayerStatus(
            name=name,
            module_type=f"{type(module).__name__}({type(base).__name__})",
            enabled=not module.disabled,
            active_adapters=_unique(map(owner, module.active_adapters)),
            merged_adapters=_unique(map(owner, getattr(module, "merged_adapters", []))),
            requires_grad=grads,
            available_adapters=sorted(set(map(owner, adapters))),
            devices=devices,
            quantization_backend=_backend(base),
        ))
    if not found and host is None:
        raise ValueError(f"no peftkit adapter layer found in this {type(model).__name__}; give a PeftModel (from "
                         "get_peft_model or PeftModel.from_pretrained) or a model holding its layers")
    return found


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The state of ``model``'s adapters as a whole (peft's function of the same name): layer states from
    :func:`get_layer_status` aggregated, ``"irregular"`` where layers disagree.

    Args:
        model: a :class:`~peftkit.PeftModel` or an ``nn.Module`` holding peftkit layers.

    Returns:
        a :class:`TunerModelStatus`. For a PeftModel without adapted layers, ``enabled``, the active and
        available adapters come from the PeftModel itself.

    Raises:
        TypeError / ValueError: as :func:`get_layer_status`.
    """
    from peftkit.model import PeftModel

    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        host = model.base_model
        base_type, adapter_type = type(model.get_base_model()).__name__, type(host).__name__
        peft_types = {n: str(host.peft_config[n].peft_type) for n in host.public_names()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        host = None
        base_type = type(model).__name__ if _is_pretrained(model) else "other"
        adapter_type, peft_types = "None", {}
        trainable, total = PeftModel.get_nb_trainable_parameters(model)

    available = sorted({n for s in layers for n in s.available_adapters})
    if layers:
        enabled = _consistent(s.enabled for s in layers)
        # the adapters in use, in order; each layer runs those of them it holds (peft lists the model's
        # active adapters on every layer, so it has no other notion of consistency)
        active = _unique(n for s in layers for n in s.active_adapters)
        if any(s.active_adapters != [n for n in active if n in s.available_adapters] for s in layers):
            active = "irregular"
    else:  # a PeftModel whose adapters wrap nothing
        enabled = not host.disabled
        active = [n for n in host.active_adapters if host.owner(n) == n]
        available = host.public_names()
    merged_all = {n for s in layers for n in s.merged_adapters}
    merged: list[str] | Irregular = sorted(merged_all)
    if any(set(s.available_adapters) - set(s.merged_adapters) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list[Any]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, value in s.devices.items():
            devices[key].update(value)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _consistent(v) for k, v in grads.items()},
        available_adapters=available,
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=_consistent(s.quantization_backend for s in layers) if layers else None,
    )


def _is_pretrained(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)
