"""Combining several LoRA adapters into a new one (``add_weighted_adapter``), as in HF PEFT.

Task-vector merging rules, each on tensors ``t_i`` with weights ``w_i``:

* task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", 2022, arXiv:2212.04089):
  ``sum_i w_i t_i``.
* magnitude pruning: keep the ``density`` fraction of each ``t_i`` with the largest ``|t|``, then
  task arithmetic.
* TIES (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", 2023,
  arXiv:2306.01708): trim each ``t_i`` to its top-``density`` magnitudes, elect a sign per entry
  (``total``: sign of ``sum_i t_i``; ``frequency``: sign of ``sum_i sign(t_i)``; ties go to +), then
  average ``w_i t_i`` over the tensors that agree with the elected sign (disjoint mean).
* DARE (Yu et al., "Language Models are Super Mario", 2023, arXiv:2311.03099): drop each entry with
  probability ``1 - density`` and rescale the kept ones by ``1 / density``; then task arithmetic
  (``dare_linear``) or the TIES sign election and disjoint mean (``dare_ties``). Seeded.

For LoRA adapters (``delta_i = s_i B_i A_i``) the combination types are HF PEFT's:

* ``cat`` (exact): ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1 ... B_n]`` so that
  ``B A = sum_i w_i s_i B_i A_i``; rank ``sum_i r_i``.
* ``svd`` and ``*_svd``: combine the full deltas with the rule above, then keep the top ``svd_rank``
  singular directions (``B = U S``, ``A = V^T``); exact when ``svd_rank`` reaches the combined rank.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: apply the rule to the A
  matrices and to the B matrices separately with weights ``sign * sqrt(|w_i s_i|)`` on A and
  ``sqrt(|w_i s_i|)`` on B (a cheap approximation; all ranks must be equal).

The new adapter has scaling 1 (``lora_alpha = r``), so rsLoRA, ``alpha_pattern`` and any other
scaling of the sources are folded into its matrices. Grouped convolutions are merged group by group.

(IA)^3 adapters combine as in HF PEFT: the new vector of a layer is ``sum_i w_i l_i`` over the sources
that adapt that layer.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peftkit.config import ConfigError, check
from peftkit.layers import AdaptedLayer, ModulesToSaveWrapper

if TYPE_CHECKING:
    from peftkit.model import PeftModel

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *SVD_TYPES, *FACTOR_TYPES)


# --- rules on task tensors ---------------------------------------------------------------------------
def magnitude_mask(t: Tensor, density: float) -> Tensor:
    """Boolean mask keeping the ``int(density * numel)`` entries of largest magnitude; among equal
    magnitudes, which are kept is whatever ``torch.topk`` picks (as in peft), not the first ones."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if k > 0:
        mask[torch.topk(t.abs().flatten(), k, sorted=False).indices] = True
    return mask.view(t.shape)


def dare_drop(t: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Keep each entry with probability ``density`` and rescale kept entries by ``1 / density``."""
    keep = torch.rand(t.shape, generator=generator, device=t.device) < density
    return torch.where(keep, t / density, torch.zeros_like(t)) if density > 0 else torch.zeros_like(t)


def elect_sign(stacked: Tensor, method: str = "total") -> Tensor:
    """Per-entry elected sign (+1/-1) of ``stacked: (n, ...)``, shape ``(...)``; ``method`` ``"total"``
    (default: sign of the sum, TIES) or ``"frequency"`` (sign of the count of signs); a tie (0) goes to +1.

    Raises:
        ConfigError: ``method`` is neither ``"total"`` nor ``"frequency"``.
    """
    check(method in ("total", "frequency"), f"majority_sign_method={method!r} must be 'total' or 'frequency'")
    votes = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0)


def disjoint_mean(weighted: Tensor, trimmed: Tensor, sign: Tensor) -> Tensor:
    """Mean over ``n`` of ``weighted (n, ...)`` restricted to entries whose ``trimmed`` sign agrees with
    ``sign`` (a count of zero counts as one)."""
    agree = (trimmed.sign() == sign) & (trimmed != 0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine(tensors: Sequence[Tensor], weights: Sequence[float], rule: str, density: float | None = None,
            majority_sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Combine same-shaped task tensors with one of the rules above.

    Args:
        tensors: ``n`` tensors of one shape.
        weights: ``n`` floats (negative allowed).
        rule: ``linear`` (task arithmetic), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``.
        density: fraction kept in (0, 1] for every rule but ``linear``.

    Raises:
        ConfigError: unknown rule, missing/invalid density, no tensors, or not one weight per tensor.
    """
    rules = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
    check(rule in rules, f"rule={rule!r} is not a combination rule; expected one of {rules}")
    tensors, weights = list(tensors), list(weights)
    check(len(tensors) == len(weights) and tensors,
          f"got {len(tensors)} tensors and {len(weights)} weights; give one weight per tensor (at least one)")
    w = torch.tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)
    w = w.view(-1, *([1] * tensors[0].dim()))
    stacked = torch.stack(tensors)
    if rule == "linear":
        return (stacked * w).sum(0)
    check(density is not None and 0 < density <= 1, f"density={density!r} must lie in (0, 1] for {rule!r}")
    if rule == "magnitude_prune":
        return (torch.stack([t * magnitude_mask(t, density) for t in tensors]) * w).sum(0)
    if rule == "dare_linear":
        return (torch.stack([dare_drop(t, density, generator) for t in tensors]) * w).sum(0)
    if rule in ("ties", "dare_ties"):
        if rule == "ties":
            trimmed = torch.stack([t * magnitude_mask(t, density) for t in tensors])
        else:
            trimmed = torch.stack([dare_drop(t, density, generator) for t in tensors])
        return disjoint_mean(trimmed * w, trimmed, elect_sign(trimmed, majority_sign_method))
    raise AssertionError(rule)  # unreachable: the rule was checked above


# --- LoRA factor views ---------------------------------------------------------------------------------
def _directions(adapter: Any) -> int:
    """How many singular directions a delta of ``adapter``'s layer has: ``g * min(out/g, fan_in)`` (from the
    factors' shapes; nothing is copied)."""
    a, b, g = _factors(adapter)
    return g * min(b.shape[0] // g, a[0].numel())


def _factors(adapter: Any) -> tuple[Tensor, Tensor, int]:
    """``(A, B, g)``: a LoRA adapter's factors as stored, and its groups."""
    from peftkit.methods.lora import LoraConv, LoraEmbedding, LoraLinear

    if isinstance(adapter, LoraEmbedding):
        return adapter.lora_embedding_A, adapter.lora_embedding_B, 1
    if isinstance(adapter, (LoraLinear, LoraConv)):
        return adapter.lora_A.weight, adapter.lora_B.weight, adapter.lora_A.groups if isinstance(adapter, LoraConv) else 1
    raise ConfigError(f"add_weighted_adapter combines LoRA adapters only, not {type(adapter).__name__}")


def _views(adapter: Any) -> tuple[Tensor, Tensor, int]:
    """``(A: (g, r/g, fan_in), B: (g, out/g, r/g), g)`` float32 copies of a LoRA adapter, scaling not applied."""
    a, b, g = _factors(adapter)
    a, b = a.detach().float(), b.detach().float()
    return a.reshape(g, a.shape[0] // g, -1), b.reshape(g, b.shape[0] // g, -1), g


def _write(adapter: Any, a3: Tensor, b3: Tensor) -> None:
    from peftkit.methods.lora import LoraEmbedding

    a_dst, b_dst = ((adapter.lora_embedding_A, adapter.lora_embedding_B) if isinstance(adapter, LoraEmbedding)
                    else (adapter.lora_A.weight, adapter.lora_B.weight))
    with torch.no_grad():
        a_dst.copy_(a3.reshape(a_dst.shape))
        b_dst.copy_(b3.reshape(b_dst.shape))


def _layer_factors(parts: list[tuple[Any, float]], combination_type: str, new_rank: int | None,
                   density: float | None, majority_sign_method: str, svd_clamp: float | None,
                   full_matrices: bool, generator: torch.Generator, non_finite: str,
                   svd_driver: str | None = None) -> tuple[Tensor, Tensor]:
    views = [(_views(a), w * a.scaling) for a, w in parts]
    g = views[0][0][2]
    if combination_type == "cat":
        a3 = torch.cat([va * ws for (va, _, _), ws in views], dim=1)
        b3 = torch.cat([vb for (_, vb, _), _ in views], dim=2)
        return a3, b3
    if combination_type in SVD_TYPES:
        rule = "linear" if combination_type == "svd" else combination_type[: -len("_svd")]
        # each rule works on the real deltas s B A: trimming, sign election and the disjoint mean see every
        # adapter's own scaling (rsLoRA, another alpha / r), not the bare product B A
        deltas = [torch.bmm(vb, va) * a.scaling for ((va, vb, _), _), (a, _) in zip(views, parts)]
        delta = combine(deltas, [w for _, w in parts], rule, density, majority_sign_method, generator)
        check(new_rank % g == 0, f"svd_rank={new_rank} must be divisible by the convolution's groups={g}")
        check(bool(torch.isfinite(delta).all()), non_finite)  # (the SVD of one fails with a LinAlgError)
        k = new_rank // g
        # the driver picks a cuSOLVER method; torch takes it on CUDA tensors only (peft passes it as given)
        u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices,
                                    **({"driver": svd_driver} if svd_driver and delta.is_cuda else {}))
        if k > s.shape[-1]:  # pad with zero directions so every layer has the requested rank
            pad = k - s.shape[-1]
            u = torch.cat([u, u.new_zeros(*u.shape[:-1], pad)], -1)
            s = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], -1)
            vh = torch.cat([vh, vh.new_zeros(*vh.shape[:-2], pad, vh.shape[-1])], -2)
        b3, a3 = u[..., :k] * s[..., None, :k], vh[..., :k, :]
        if svd_clamp is not None:
            hi = torch.quantile(torch.cat([b3.flatten(), a3.flatten()]), svd_clamp)
            b3, a3 = b3.clamp(-hi, hi), a3.clamp(-hi, hi)
        return a3, b3
    shapes = {tuple(va.shape) for (va, _, _), _ in views}
    check(len(shapes) == 1, f"combination_type={combination_type!r} needs adapters of equal rank; "
                            f"got A shapes {sorted(shapes)} (use 'cat' or 'svd')")
    signs = [1.0 if ws >= 0 else -1.0 for _, ws in views]
    root = [abs(ws) ** 0.5 for _, ws in views]
    a3 = combine([va for (va, _, _), _ in views], [s * r for s, r in zip(signs, root)], combination_type, density,
                 majority_sign_method, generator)
    b3 = combine([vb for (_, vb, _), _ in views], root, combination_type, density, majority_sign_method, generator)
    return a3, b3


def option_applies(option: str, combination_type: str) -> bool:
    """Whether ``combination_type`` uses ``option`` (``density``, ``svd_rank``, ``svd_clamp``,
    ``majority_sign_method``, ``seed``)."""
    return {"density": combination_type.startswith(("ties", "dare", "magnitude_prune")),
            "svd_rank": combination_type in SVD_TYPES, "svd_clamp": combination_type in SVD_TYPES,
            "majority_sign_method": combination_type.startswith(("ties", "dare_ties")),
            "seed": combination_type.startswith("dare")}[option]


def _check_options_apply(combination_type: str, **given: Any) -> None:
    """Refuse an option ``combination_type`` does not use (``density`` with ``cat``, ...), as ``peftkit merge``
    does: a typo in the type or a misunderstanding must not pass silently. Raises ConfigError."""
    for option, value in given.items():
        if value is not None and not option_applies(option, combination_type):
            users = [t for t in COMBINATION_TYPES if option_applies(option, t)]
            raise ConfigError(f"{option}={value!r} has no effect with combination_type={combination_type!r}; it "
                              f"applies to {', '.join(users)}")


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (Python, numpy or a one-element torch tensor; not a bool),
    else None."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool \
            else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's bool_ is not a numbers.Real
        return float(value)
    return None


def add_lora_on(host: Any, adapter_name: str, ranks: dict[str, int], template: Any, heads: Sequence[str],
                modules_to_save_from: str | None) -> None:
    """Add ``adapter_name``, a LoRA adapter on exactly the layers named in ``ranks`` (full names, as
    ``host.wrappers()`` gives them, each with its rank; scaling 1, factors left random for the caller to
    write), with copies of the ``heads`` (``modules_to_save``) taken from ``modules_to_save_from``.
    ``template`` (a source's config) gives the dropout, task type and base model name.

    Used by :func:`add_weighted_adapter` and :func:`peftkit.lorahub.lorahub`.

    Raises:
        ConfigError: the adapter would land on other layers than ``ranks`` names (it is removed again).
    """
    from peftkit.methods.lora import LoraConfig

    top = max(ranks.values())
    # the layers are named in full and anchored: as plain names (suffixes) or unanchored pattern keys they would
    # also match any module whose name ends in one of them ('other.model.lin' for 'model.lin'), which would get
    # a random adapter (init_lora_weights=False) or another layer's rank
    pattern = {f"^{re.escape(n)}": r for n, r in ranks.items() if r != top}
    targets = "|".join(re.escape(n) for n in ranks)
    new = LoraConfig(r=top, lora_alpha=top, target_modules=f"(?:{targets})", rank_pattern=pattern,
                     alpha_pattern=dict(pattern), init_lora_weights=False, lora_dropout=template.lora_dropout,
                     task_type=template.task_type, base_model_name_or_path=template.base_model_name_or_path,
                     modules_to_save=list(heads) or None)
    _add_combined(host, adapter_name, new, set(ranks), modules_to_save_from)


def _add_combined(host: Any, adapter_name: str, config: Any, layers: set[str], modules_to_save_from: str | None) -> None:
    """Add the combined adapter ``adapter_name`` with ``config``, check that it sits on exactly ``layers`` (else
    remove it and raise ConfigError), and give its ``modules_to_save`` copies those of ``modules_to_save_from``."""
    host.add_adapter(adapter_name, config)
    placed = {n for n, w in host.wrappers() if isinstance(w, AdaptedLayer) and adapter_name in w.adapters}
    if placed != layers:  # cannot happen with anchored full names; never leave a wrong adapter behind
        host.delete_adapter(adapter_name)
        raise ConfigError(f"the combined adapter {adapter_name!r} would sit on {sorted(placed)}, not on the layers "
                          f"the sources adapt {sorted(layers)}")
    for _, w in host.wrappers():
        if isinstance(w, ModulesToSaveWrapper) and adapter_name in w.modules_to_save and modules_to_save_from:
            src = w.modules_to_save[modules_to_save_from] if modules_to_save_from in w.modules_to_save else None
            if src is not None:
                w.modules_to_save[adapter_name].load_state_dict(src.state_dict())


def _source_checks(host: Any, adapters: list[str], weights: Sequence[Any],
                   modules_to_save_from: str | None) -> tuple[list[float], list[str]]:
    """The weights as floats and the ``modules_to_save`` modules the sources train, after the checks every
    combination shares (finite weights; a ``modules_to_save_from`` that has those modules)."""
    given = list(weights)
    values = [_real(w) for w in given]  # numpy and 0-d torch scalars are numbers too, as in peft
    for w, v in zip(given, values):
        check(v is not None and math.isfinite(v), f"weights={given!r}: {w!r} is not a finite number")
    return values, source_heads(host, adapters, modules_to_save_from)


def source_heads(host: Any, adapters: list[str], modules_to_save_from: str | None) -> list[str]:
    """The ``modules_to_save`` modules the source ``adapters`` train, checked against ``modules_to_save_from``
    (shared by :func:`add_weighted_adapter` and :func:`peftkit.lorahub.lorahub`).

    Raises:
        ConfigError: the sources train such modules and no ``modules_to_save_from`` is given, or it names an
            adapter that is not a source or has no trained copy of all of them; ``modules_to_save_from`` given
            where the sources train no such module (it would have no effect).
    """
    heads = [n for n, w in host.wrappers() if isinstance(w, ModulesToSaveWrapper)
             and any(a in w.modules_to_save for a in adapters)]
    check(heads or modules_to_save_from is None,
          f"modules_to_save_from={modules_to_save_from!r} has no effect: the adapters {adapters} train no whole "
          "modules (modules_to_save); leave it out")
    check(not heads or modules_to_save_from is not None,
          f"the adapters train whole modules {heads} (modules_to_save); pass modules_to_save_from=<adapter> "
          "to take them from one adapter")
    if heads and modules_to_save_from is not None:
        owners = [a for a in adapters if all(a in w.modules_to_save for n, w in host.wrappers() if n in heads)]
        check(modules_to_save_from in adapters,
              f"modules_to_save_from={modules_to_save_from!r} is not one of the adapters combined ({adapters}); "
              f"take {heads} from one of them: {owners}")
        check(modules_to_save_from in owners,
              f"modules_to_save_from={modules_to_save_from!r} has no trained copy of {heads} (modules_to_save); "
              f"the adapters that have one: {owners}")
    return heads


def check_plain_start(adapters: Sequence[str], configs: Sequence[Any]) -> None:
    """Refuse sources (``adapters``, with their ``configs`` in the same order) made with PiSSA/OLoRA-style starts (``init_lora_weights`` that moved part of the base
    weight into the adapter): combining them would count that part twice.

    Raises:
        ConfigError: naming the first such adapter and its ``init_lora_weights``.
    """
    from peftkit.methods.lora_init import changes_base

    for name, cfg in zip(adapters, configs):
        init = getattr(cfg, "init_lora_weights", True)
        check(not changes_base(init),
              f"adapter {name!r} was created with init_lora_weights={init!r}, which moved part of the base weights "
              "into it; combining it would count that part twice. Save it converted to plain LoRA first "
              "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and combine the converted ones")


def _add_ia3_weighted(host: Any, adapters: list[str], configs: list[Any], weights: Sequence[Any], adapter_name: str,
                      modules_to_save_from: str | None) -> None:
    """(IA)^3 sources combined as peft's ``IA3Model.add_weighted_adapter`` does: at every layer a source adapts,
    the new vector is ``sum_i w_i l_i`` over the sources present there (a source absent from a layer adds
    nothing to it; it does not count as the identity), on the union of the sources' layers."""
    from peftkit.methods.ia3 import IA3Config, IA3Input

    names = [n for n, c in zip(adapters, configs) if type(c) is not IA3Config]
    check(not names, f"adapters {names} are not (IA)^3; add_weighted_adapter combines (IA)^3 adapters only with "
                     "each other")
    values, heads = _source_checks(host, adapters, weights, modules_to_save_from)
    plan: dict[str, tuple[AdaptedLayer, Tensor]] = {}
    ff: list[str] = []  # the layers whose input the sources scale
    for name, layer in host.wrappers():
        if not isinstance(layer, AdaptedLayer):
            continue
        parts = [(a, layer.adapters[a], w) for a, w in zip(adapters, values) if a in layer.adapters]
        if not parts:
            continue
        kinds = {a: "input" if isinstance(ad, IA3Input) else "output" for a, ad, _ in parts}
        check(len(set(kinds.values())) == 1, f"on layer {name!r} the adapters scale different sides ({kinds}: "
                                             "feedforward_modules differ), so their vectors cannot be added")
        total = sum(w * ad.ia3_l.detach().double() for _, ad, w in parts)
        check(bool(torch.isfinite(total).all()), f"the combination with weights {list(weights)} is not finite "
                                                 f"(inf or NaN) on layer {name!r}")
        plan[name] = (layer, total)
        if "input" in kinds.values():
            ff.append(name)
    template = configs[0]
    new = IA3Config(target_modules="(?:" + "|".join(re.escape(n) for n in plan) + ")",
                    feedforward_modules=("(?:" + "|".join(re.escape(n) for n in ff) + ")") if ff else [],
                    task_type=template.task_type, base_model_name_or_path=template.base_model_name_or_path,
                    modules_to_save=list(heads) or None)
    _add_combined(host, adapter_name, new, set(plan), modules_to_save_from)
    with torch.no_grad():
        for layer, total in plan.values():
            vector = layer.adapters[adapter_name].ia3_l
            vector.copy_(total.to(vector.dtype))
    host._set_trainable()


def add_weighted_adapter(model: PeftModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str | None = None, svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total", seed: int | None = 0,
                         modules_to_save_from: str | None = None) -> None:
    """Add ``adapter_name``, a combination of the LoRA ``adapters`` with ``weights`` (see the module doc), or of
    (IA)^3 adapters: their vectors summed with ``weights`` as peft's ``IA3Model.add_weighted_adapter`` does
    (at each layer, over the sources that adapt it; ``combination_type`` left at its default or ``linear``).

    Args:
        model: a :class:`~peftkit.PeftModel` holding the adapters.
        adapters / weights: names and weights (negative weights subtract).
        adapter_name: the new adapter's name (inactive until ``set_adapter``).
        combination_type: one of :data:`COMBINATION_TYPES`. Default (None) ``svd`` for LoRA, and for (IA)^3
            the only one it has, ``linear`` (peft's IA3 ``add_weighted_adapter`` takes no such argument).
        svd_rank: rank of ``*svd`` results (default: the largest source rank, ``rank_pattern`` included, as
            in peft).
        svd_clamp: quantile in (0, 1] at which ``*svd`` factors are clamped; None (default) does not clamp.
        svd_full_matrices: passed to ``torch.linalg.svd`` (default True, as in peft).
        svd_driver: cuSOLVER method for ``torch.linalg.svd`` on CUDA (``gesvd``, ``gesvdj``, ``gesvda``; None:
            torch's choice); ignored on CPU, as torch has no choice there.
        density: kept fraction for ties/dare/magnitude rules (required by them, refused by the others).
        majority_sign_method: TIES sign election, ``total`` (default) or ``frequency``.
        seed: seeds DARE's random drops (None: the global generator).
        modules_to_save_from: adapter whose ``modules_to_save`` copies (e.g. a classifier head) the new
            adapter takes; required when the sources have such modules (there is no meaningful sum of heads).

    As in peft, a single source adapter is combined with ``linear`` whatever ``combination_type`` says (the
    result is that adapter scaled by its weight); a string ``adapters`` names one adapter.

    Raises:
        ConfigError: unknown names, an existing ``adapter_name``, adapters other than plain LoRA (or all
            (IA)^3, with no LoRA-only option; scaling the same side of each layer), mismatched lengths,
            a bad ``combination_type``/``density``/``svd_rank``/``svd_full_matrices``/``svd_driver``/
            ``majority_sign_method``, an option the combination type does not use (``density`` with ``cat``
            or ``svd``, ``svd_rank`` with ``cat`` or ``linear``, ``majority_sign_method`` or ``seed`` off their
            defaults where no sign election or random draw happens, ...), sources with ``modules_to_save`` and
            no ``modules_to_save_from``, or ``modules_to_save_from`` for sources without them. Nothing is added
            on error.
    """
    from peftkit.methods.ia3 import IA3Config
    from peftkit.methods.lora import LoraConfig

    host = model.base_model
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    host.check_known(adapters + ([modules_to_save_from] if modules_to_save_from else []))
    # a list, tuple, numpy array or 1-d tensor (as peft takes them); not None, a string or one number
    check(hasattr(weights, "__len__") and hasattr(weights, "__iter__") and not isinstance(weights, (str, dict))
          and getattr(weights, "ndim", 1) == 1,
          f"weights={weights!r} is not valid; give a list of numbers, one per adapter")
    weights = list(weights)
    check(len(adapters) == len(weights) and adapters, f"got {len(adapters)} adapters and {len(weights)} weights; "
                                                      "give one weight per adapter (at least one)")
    check(adapter_name not in host.peft_config, f"adapter {adapter_name!r} already exists")
    check(combination_type is None or combination_type in COMBINATION_TYPES,
          f"combination_type={combination_type!r} is not valid; expected one of {COMBINATION_TYPES}")
    check(majority_sign_method in ("total", "frequency"),
          f"majority_sign_method={majority_sign_method!r} is not valid; expected 'total' or 'frequency'")
    check(isinstance(svd_full_matrices, bool), f"svd_full_matrices={svd_full_matrices!r} must be True or False")
    check(svd_driver in (None, "gesvd", "gesvdj", "gesvda"),
          f"svd_driver={svd_driver!r} is not valid; expected None, 'gesvd', 'gesvdj' or 'gesvda'")
    configs = [host.peft_config[a] for a in adapters]
    # the options given (the sign election and the seed count as given when not at their defaults)
    options = dict(svd_rank=svd_rank, svd_clamp=svd_clamp, density=density,
                   majority_sign_method=None if majority_sign_method == "total" else majority_sign_method,
                   seed=None if seed == 0 else seed)
    if any(type(c) is IA3Config for c in configs):
        given_options = [k for k, v in options.items() if v is not None]
        check(combination_type in (None, "linear") and not given_options,
              "(IA)^3 adapters combine only linearly (peft's IA3 add_weighted_adapter): leave combination_type out "
              "(or give 'linear') and give no LoRA option; got "
              + (f"option(s) {given_options}" if given_options else f"combination_type={combination_type!r}"))
        _add_ia3_weighted(host, adapters, configs, weights, adapter_name, modules_to_save_from)
        return
    combination_type = combination_type or "svd"
    _check_options_apply(combination_type, **options)
    if len(adapters) == 1:  # as peft: one adapter can only be combined linearly
        combination_type, density = "linear", None
    check_plain_start(adapters, configs)
    for name, cfg in zip(adapters, configs):
        # (trainable_token_indices: the trained embedding rows are no low-rank factors to combine)
        extras = [k for k in ("use_dora", "lora_bias", "trainable_token_indices") if getattr(cfg, k, None)]
        check(type(cfg) is LoraConfig and not extras,
              f"adapter {name!r} is {cfg.peft_type}{' with ' + ' and '.join(extras) if extras else ''}; "
              "add_weighted_adapter combines plain LoRA adapters (or (IA)^3 adapters, linearly)")
        bias = getattr(cfg, "bias", "none")
        check(bias == "none", f"adapter {name!r} trains biases (bias={bias!r}); add_weighted_adapter combines the "
                              "low-rank factors only, so the combination would drop them: combine adapters trained "
                              "with bias='none'")
    given = list(weights)
    weights, heads = _source_checks(host, adapters, given, modules_to_save_from)
    check(svd_rank is None or (_real(svd_rank) is not None and float(svd_rank).is_integer() and svd_rank > 0),
          f"svd_rank={svd_rank!r} is not valid; give a whole number > 0, or None for the largest source rank")
    svd_rank = None if svd_rank is None else int(svd_rank)
    check(svd_clamp is None or (_real(svd_clamp) is not None and 0 < svd_clamp <= 1),
          f"svd_clamp={svd_clamp!r} is not valid; it is a quantile in (0, 1], or None for no clamping")
    check(density is None or (_real(density) is not None and 0 < density <= 1),
          f"density={density!r} is not valid; it is the kept fraction, a number in (0, 1]")
    check(seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)),
          f"seed={seed!r} is not valid; give a whole number, or None for torch's global generator")
    if combination_type not in ("cat", *FACTOR_TYPES):
        # peft's default: the largest rank of any source, its rank_pattern included
        svd_rank = svd_rank or max(max([c.r, *getattr(c, "rank_pattern", {}).values()]) for c in configs)
        check(svd_rank > 0, f"svd_rank={svd_rank!r} must be > 0")
    if combination_type in SVD_TYPES:  # (padding with zero directions up to any rank would write huge zero files)
        room = max((_directions(layer.adapters[a]) for _, layer in host.wrappers() if isinstance(layer, AdaptedLayer)
                    for a in adapters if a in layer.adapters), default=0)
        check(svd_rank <= room, f"svd_rank={svd_rank} is more than any adapted layer can hold: the widest has "
                                f"{room} singular directions (its smaller dimension); give svd_rank <= {room}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    plan: list[tuple[str, AdaptedLayer, Tensor, Tensor]] = []
    for name, layer in host.wrappers():
        if not isinstance(layer, AdaptedLayer):
            continue
        parts = [(layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
        if parts:
            finite = (f"the combination with weights {given} is not finite (inf or NaN) on layer {name!r}: "
                      "a source holds inf/NaN, or the weights are too large for float32")
            a3, b3 = _layer_factors(parts, combination_type, svd_rank, density, majority_sign_method, svd_clamp,
                                    svd_full_matrices, generator, finite, svd_driver)
            check(bool(torch.isfinite(a3).all() and torch.isfinite(b3).all()), finite)
            plan.append((name, layer, a3, b3))
    ranks = {name: a3.shape[0] * a3.shape[1] for name, _, a3, _ in plan}
    add_lora_on(host, adapter_name, ranks, configs[0], heads, modules_to_save_from)
    for _, layer, a3, b3 in plan:
        _write(layer.adapters[adapter_name], a3, b3)
    host._set_trainable()
