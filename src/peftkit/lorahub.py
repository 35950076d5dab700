"""LoraHub: gradient-free search of the weights that compose existing LoRA adapters for a new task.

Paper: Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
2023, arXiv:2307.13269.

Composition (element-wise, as in the paper): ``A = sum_i w_i s_i^(1/2) A_i``, ``B = sum_i w_i s_i^(1/2) B_i``
for adapters of equal rank ``r`` (``s_i`` their scalings, folded in so the new adapter has scaling 1).
The weights minimise ``L(w) = mean few-shot loss + l1 * sum_i |w_i|`` with a gradient-free
evolution strategy (the paper uses Shiwa from Nevergrad; here a (mu/mu, lambda)-ES with a
success-based step size keeps peftkit free of that dependency): each iteration samples ``lambda``
candidates around the mean, keeps the best ``mu``, moves the mean to their average, and widens
the step when the best candidate improved on the incumbent, else narrows it. Weights stay in
``[-bound, bound]``. Only forward passes are used; no gradient is computed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from peftkit.config import ConfigError, check
from peftkit.layers import AdaptedLayer
from peftkit.merging import add_lora_on, check_plain_start, source_heads

if TYPE_CHECKING:
    from peftkit.model import PeftModel


@dataclass
class LoraHubResult:
    """What :func:`lorahub` found: ``weights`` (one per adapter), ``objective`` (loss + L1 at the
    weights), ``loss`` (few-shot loss alone), ``evaluations`` (forward sweeps over the examples)."""

    weights: list[float]
    objective: float
    loss: float
    evaluations: int


def _factors(model: PeftModel, adapters: Sequence[str]) -> list[tuple[AdaptedLayer, list[tuple[Tensor, Tensor]]]]:
    from peftkit.methods.lora import LoraLinear

    out = []
    for _, layer in model.base_model.wrappers():
        if not isinstance(layer, AdaptedLayer) or not any(a in layer.adapters for a in adapters):
            continue
        missing = [a for a in adapters if a not in layer.adapters]
        check(not missing, f"adapters {missing} do not adapt a layer the others adapt; LoraHub composes "
                           "adapters with the same targets")
        parts = []
        for a in adapters:
            ad = layer.adapters[a]
            check(type(ad) is LoraLinear and ad.lora_B.bias is None,
                  f"adapter {a!r} is not a plain LoRA on a linear layer ({type(ad).__name__})")
            root = ad.scaling ** 0.5
            parts.append((ad.lora_A.weight.detach() * root, ad.lora_B.weight.detach() * root))
        shapes = {tuple(p[0].shape) for p in parts}
        check(len(shapes) == 1, f"LoraHub composes adapters of equal rank; got A shapes {sorted(shapes)}")
        out.append((layer, parts))
    check(bool(out), "none of the adapters adapts any layer")
    return out


def lorahub(model: PeftModel, adapters: Sequence[str], batches: Sequence[dict[str, Tensor]],
            adapter_name: str = "lorahub", steps: int = 40, l1: float = 0.05, seed: int = 0,
            population: int = 8, bound: float = 1.5, loss_fn: Callable[[Any, dict[str, Tensor]], Tensor] | None = None,
            modules_to_save_from: str | None = None) -> LoraHubResult:
    """Compose ``adapters`` into a new LoRA adapter ``adapter_name`` for the task the ``batches`` show.

    Args:
        model: a PeftModel holding the (equal-rank, LoRA-on-linear) upstream adapters.
        adapters: names of the adapters to compose (at least two).
        batches: a few examples of the new task as model inputs (``labels`` included); the loss is
            ``model(**batch).loss`` unless ``loss_fn(model, batch)`` is given. A candidate whose loss is
            not finite ranks last.
        adapter_name: name of the composed adapter; it is left active.
        steps: ES iterations (each evaluates ``population`` candidates). Default 40.
        l1: weight of the L1 penalty on the composition weights. Default 0.05.
        seed: seeds the search. bound: weights are clipped to ``[-bound, bound]``. Default 1.5.
        modules_to_save_from: adapter whose ``modules_to_save`` (e.g. head) the new adapter uses.

    Returns:
        :class:`LoraHubResult` with the best weights found (they are written into the new adapter).

    Raises:
        ConfigError: unknown names, fewer than two adapters, adapters of different ranks (on one layer) or
            targets, non-LoRA adapters or ones started with PiSSA/OLoRA, an existing ``adapter_name``, a
            ``modules_to_save_from`` that is not a source with those modules, no batches, bad search settings,
            batches for which the model returns no loss (no ``labels`` and no ``loss_fn``), or no candidate
            with a finite loss. On any error, the model is left as it was (no new adapter; the same active
            and merged adapters and train/eval mode).
    """
    host = model.base_model
    check(not isinstance(adapters, str), f"adapters={adapters!r} is one name; LoraHub composes a list of at least "
                                         "two adapters")
    adapters = list(adapters)
    host.check_known(adapters + ([modules_to_save_from] if modules_to_save_from else []))
    check(len(adapters) >= 2, f"LoraHub needs at least two adapters, got {adapters}")
    check(adapter_name not in host.peft_config, f"adapter {adapter_name!r} already exists")
    # read once per candidate: a list or a DataLoader, which iterate again; not a one-shot iterator (a generator)
    check(hasattr(batches, "__len__") and not isinstance(batches, (str, dict)) and iter(batches) is not batches,
          f"batches must be a list of batch dicts or a DataLoader (they are read once per candidate), got a "
          f"{type(batches).__name__}")
    check(len(batches) > 0, "LoraHub needs at least one batch of examples of the new task")
    for name, value, low in (("steps", steps, 1), ("population", population, 2), ("seed", seed, 0)):
        check(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low,
              f"{name}={value!r} is not valid; give a whole number >= {low}")
    for name, value, low_ok in (("bound", bound, False), ("l1", l1, True)):
        real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        check(real and (value > 0 or (low_ok and value == 0)),
              f"{name}={value!r} is not valid; give a finite number {'>= 0' if low_ok else '> 0'}")
    if loss_fn is None:  # checked here, before the new adapter is added (and merged adapters unmerged)
        unlabelled = [i for i, b in enumerate(batches) if not isinstance(b, dict)
                      or all(b.get(k) is None for k in ("labels", "start_positions"))]
        check(not unlabelled, f"batch(es) {unlabelled[:5]} hold no labels, so the model returns no loss for them: give "
                              "batches with labels, or pass loss_fn(model, batch)")
    check_plain_start(adapters, [host.peft_config[a] for a in adapters])
    layers = _factors(model, adapters)
    names = {id(w): n for n, w in host.wrappers()}
    # each layer keeps its own rank (the sources may have a rank_pattern; _factors checked they agree per layer)
    ranks = {names[id(layer)]: parts[0][0].shape[0] for layer, parts in layers}
    heads = source_heads(host, adapters, modules_to_save_from)
    before = list(host.active_adapters), model.training, host.merged_adapters()
    add_lora_on(host, adapter_name, ranks, host.peft_config[adapters[0]], heads, modules_to_save_from)
    try:
        host.set_adapter(adapter_name)
        model.eval()
        return _search(model, adapter_name, layers, adapters, batches, steps, l1, seed, population, bound, loss_fn,
                       before[1])
    except BaseException:  # a failed search leaves the model as it was: no half-made adapter, same mode
        host.delete_adapter(adapter_name)
        host.set_adapter(before[0])
        if before[2] and host.merged_adapters() != before[2]:  # (activating the new adapter unmerged them)
            host.merge(before[2])
        model.train(before[1])
        raise


def _search(model: PeftModel, adapter_name: str, layers: list[tuple[AdaptedLayer, list[tuple[Tensor, Tensor]]]],
            adapters: Sequence[str], batches: Sequence[dict[str, Tensor]], steps: int, l1: float, seed: int,
            population: int, bound: float, loss_fn: Callable[[Any, dict[str, Tensor]], Tensor] | None,
            was_training: bool) -> LoraHubResult:
    """The evolution strategy of :func:`lorahub` over the composed adapter ``adapter_name`` (already added
    and active); writes the best weights found into it."""

    def write(weights: np.ndarray) -> None:
        with torch.no_grad():
            for layer, parts in layers:
                target = layer.adapters[adapter_name]
                target.lora_A.weight.copy_(sum(float(w) * a for w, (a, _) in zip(weights, parts)))
                target.lora_B.weight.copy_(sum(float(w) * b for w, (_, b) in zip(weights, parts)))

    def loss_at(weights: np.ndarray) -> float:
        write(weights)
        values = []
        with torch.no_grad():
            for b in batches:
                loss = loss_fn(model, b) if loss_fn else getattr(model(**b), "loss", None)
                if loss is None:
                    raise ConfigError("the model returned no loss for a batch: give batches with labels, or pass "
                                      "loss_fn(model, batch)")
                values.append(float(loss))
        value = float(np.mean(values))
        return value if np.isfinite(value) else float("inf")  # a candidate that overflows ranks last

    rng = np.random.default_rng(seed)
    k = len(adapters)
    mean, sigma = np.zeros(k), 0.5
    best_w = mean.copy()
    best_loss = loss_at(best_w)
    best_obj = best_loss + l1 * np.abs(best_w).sum()
    evaluations = 1
    mu = max(1, population // 2)
    for _ in range(steps):
        cands = np.clip(mean + sigma * rng.standard_normal((population, k)), -bound, bound)
        scored = []
        for c in cands:
            loss = loss_at(c)
            scored.append((loss + l1 * np.abs(c).sum(), loss, c))
        evaluations += population
        scored.sort(key=lambda t: t[0])
        if scored[0][0] < best_obj:
            best_obj, best_loss, best_w = scored[0][0], scored[0][1], scored[0][2].copy()
            sigma = min(sigma * 1.2, bound)
        else:
            sigma *= 0.85
        mean = np.mean([c for _, _, c in scored[:mu]], axis=0)
    if not np.isfinite(best_obj):
        raise ConfigError(f"every candidate's loss was NaN or infinite ({evaluations} evaluated); the sources or the "
                          "batches give no usable loss, so no composition can be chosen")
    write(best_w)
    model.train(was_training)
    return LoraHubResult(weights=[float(w) for w in best_w], objective=float(best_obj), loss=float(best_loss),
                         evaluations=evaluations)
