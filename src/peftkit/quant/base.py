"""Quantise the frozen base of any model, report its weight memory, and merge adapters into it.

QLoRA (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, arXiv:2305.14314) is
LoRA on a base quantised here with ``method="nf4"``: ``h = dequant(Q) x + (alpha / r) B A x``; only
``A`` and ``B`` train (``r * (in + out)`` parameters per adapted layer), the base stays 4-bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.config import ConfigError, check, get_method
from peftkit.layers import AdaptedLayer, Adapter, ModulesToSaveWrapper, get_submodule_parent, replace_module
from peftkit.quant.formats import AffineFormat, make_format
from peftkit.quant.layer import QuantEmbedding, QuantLinear, QuantWeight
from peftkit.targeting import linear_types

if TYPE_CHECKING:
    from peftkit.model import PeftModel

# Segments naming task heads, kept in full precision by default (they are small and often trained).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


def _base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the frozen base, skipping adapters and trained copies (modules_to_save)."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, Adapter):
            continue
        if isinstance(child, ModulesToSaveWrapper):
            yield f"{full}.original_module", child.original_module
            yield from _base_modules(child.original_module, f"{full}.original_module.")
            continue
        if isinstance(child, AdaptedLayer):
            yield f"{full}.base_layer", child.base_layer
            yield from _base_modules(child.base_layer, f"{full}.base_layer.")
            continue
        yield full, child
        yield from _base_modules(child, f"{full}.")


def _is_head(name: str, module: nn.Module, output_layer: nn.Module | None, skip: Sequence[str]) -> bool:
    return module is output_layer or any(segment in skip for segment in name.split("."))


def quantize_base(model: nn.Module, method: str = "nf4", *, block_size: int = 64, scaler_block_size: int = 256,
                  group_size: int | None = None, symmetric: bool | None = None,
                  skip_modules: Sequence[str] = HEAD_NAMES, quantize_embeddings: bool = False) -> nn.Module:
    """Replace the frozen linear weights of ``model`` by quantised ones, in place (``load_in_4bit``).

    Every ``nn.Linear`` and GPT-2 ``Conv1D`` becomes a :class:`~peftkit.quant.layer.QuantLinear`
    (also inside a :class:`~peftkit.PeftModel`: a wrapped layer's ``base_layer``), except the output
    layer (``get_output_embeddings()``), modules under a segment named in ``skip_modules`` (heads:
    ``lm_head``, ``classifier``, ``score``, ...), trained copies (``modules_to_save``) and adapters.
    Norms and biases stay in full precision, and so do embeddings unless ``quantize_embeddings``
    (then every ``nn.Embedding`` not tied to the output layer becomes a
    :class:`~peftkit.quant.layer.QuantEmbedding`). A layer whose shape the format cannot block stays in
    full precision with a warning naming it.

    Args:
        model: any ``torch.nn.Module`` (HF transformers models first), or a :class:`~peftkit.PeftModel`.
        method: ``"nf4"`` (QLoRA's 4-bit NormalFloat with double-quantised scales, 0.129x float32),
            ``"int8"`` (per-channel symmetric, about 0.25x) or ``"int4"`` (group-wise asymmetric,
            0.156x at group 64).
        block_size / scaler_block_size: NF4 blocking (defaults 64 / 256).
        group_size: int8/int4 columns per scale (default per channel for int8, 64 for int4).
        symmetric: int8/int4 mapping (default True for int8, False for int4).
        skip_modules: name segments whose modules stay in full precision (default :data:`HEAD_NAMES`).
        quantize_embeddings: also quantise embedding tables (default False, as QLoRA).

    Returns:
        ``model`` itself, its linear weights (and embeddings) quantised.

    Raises:
        ConfigError: unknown method or invalid sizes, no linear layer to quantise, or layers left to quantise in a
            model whose quantised layers use another method (formats would mix); nothing changed.
        ImportError: torchao is missing.

    Paper: QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv:2305.14314).
    """
    fmt = make_format(method, block_size=block_size, scaler_block_size=scaler_block_size, group_size=group_size,
                      symmetric=symmetric)
    check(not isinstance(skip_modules, str), f"skip_modules={skip_modules!r} must be a list of name segments")
    root = getattr(model, "get_base_model", lambda: model)()
    output_layer = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    tied = getattr(output_layer, "weight", None)
    todo: list[tuple[str, nn.Module]] = []
    kept: list[str] = []
    already = sorted({m.fmt.method for _, m in _base_modules(root) if isinstance(m, QuantWeight)})
    for name, module in _base_modules(root):
        is_linear = isinstance(module, linear_types())
        is_table = quantize_embeddings and isinstance(module, nn.Embedding) and module.weight is not tied
        if (not (is_linear or is_table) or isinstance(module, QuantWeight)
                or _is_head(name, module, output_layer, skip_modules)):
            continue
        parent, _ = get_submodule_parent(root, name)
        if isinstance(parent, AdaptedLayer):
            check(not parent.merged_adapters, f"{name}: unmerge the adapters {parent.merged_adapters} before "
                  "quantising the base")
            check(isinstance(module, (nn.Linear, nn.Embedding)) or not parent.adapters,
                  f"{name} is a GPT-2 Conv1D that already has adapters; quantise the base before adding them")
        weight = module.weight
        shape = tuple(weight.shape if isinstance(module, (nn.Linear, nn.Embedding)) else weight.shape[::-1])
        reason = fmt.unsupported(shape, rows=is_table) or ("max_norm is set" if is_table and module.max_norm else None)
        if reason:
            kept.append(f"{name} ({reason})")
        else:
            todo.append((name, module))
    mixed = [m for m in already if m != fmt.method]
    if todo and mixed:
        raise ConfigError(f"the model's quantised layers use {', '.join(mixed)}; quantising {len(todo)} more layer(s) "
                          f"(e.g. {todo[0][0]}) with {fmt.method} would mix formats in one model: dequantize_base "
                          f"first, or quantise with {mixed[0]}")
    check(bool(todo), f"no layer of the model can be quantised with {fmt.method}"
          + (f" (its linear layers are quantised already, with {', '.join(already)}; dequantize_base first to "
             "change the format)" if already else "")
          + (f"; left in full precision: {kept[:5]}" if kept else ""))
    if kept:
        warnings.warn(f"{len(kept)} layer(s) stay in full precision for {fmt.method}: "
                      + "; ".join(kept[:5]), stacklevel=2)
    # every layer quantised before the first is replaced: a layer that fails leaves the model as it was
    new = [QuantEmbedding(module, fmt) if isinstance(module, nn.Embedding) else QuantLinear.from_module(module, fmt)
           for _, module in todo]
    for (name, _), layer in zip(todo, new, strict=True):
        replace_module(root, name, layer)
    return model


@torch.inference_mode(False)
def _dequantized(module: QuantWeight, requantize: bool = False, linear: bool = False) -> nn.Module:
    """A float ``nn.Linear``/``nn.Embedding`` holding ``module``'s current weight (merged copy or
    dequantised codes), or with ``requantize`` a new quantised layer made from that weight. A layer that was
    a GPT-2 ``Conv1D`` becomes one again (weight ``(in, out)``), unless ``linear`` (adapters wrap it as a linear).
    Built outside inference mode even inside it, so that the new layer can train afterwards."""
    weight = module.weight
    if isinstance(module, QuantLinear):
        if requantize:
            layer = QuantLinear.quantize(weight, module.bias, module.fmt)
            layer.conv1d = module.conv1d
            return layer
        if module.conv1d and not linear:
            from transformers.pytorch_utils import Conv1D

            plain: nn.Module = Conv1D(module.out_features, module.in_features).to(weight.device, module.compute_dtype)
            plain.weight.data.copy_(weight.T)
            if module.bias is not None:
                plain.bias = module.bias
            else:
                plain.bias = None
            plain.requires_grad_(False)
            return plain
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=module.compute_dtype)
        if module.bias is not None:
            plain.bias = module.bias
    else:
        plain = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device=weight.device,
                             dtype=module.compute_dtype)
    plain.weight.data.copy_(weight)
    plain.requires_grad_(False)
    return QuantEmbedding(plain, module.fmt) if requantize else plain


def dequantize_base(model: nn.Module) -> nn.Module:
    """Replace every quantised layer by a frozen float ``nn.Linear``/``nn.Embedding`` holding its current
    weight (the merged copy when adapters are merged into it, else the dequantised codes), in place;
    returns ``model``. A layer that was a GPT-2 ``Conv1D`` becomes a ``Conv1D`` again (so that a model saved
    after ``merge_and_unload`` loads in transformers), except under adapters, which wrap it as a linear."""
    root = getattr(model, "get_base_model", lambda: model)()
    wrapped = {id(m.base_layer) for m in root.modules() if isinstance(m, AdaptedLayer)}
    for name, module in list(_base_modules(root)):
        if isinstance(module, QuantWeight):
            replace_module(root, name, _dequantized(module, linear=id(module) in wrapped))
    return model


@dataclass(frozen=True)
class WeightMemory:
    """Bytes held by a model's frozen base weights (adapters and trained copies excluded).

    Attributes:
        total_bytes: every base parameter plus the quantised storage of quantised layers.
        float32_bytes: the same weights at 4 bytes each (the full-precision reference).
        quantized_bytes / quantized_float32_bytes: the quantised layers alone, stored and at float32.
    """

    total_bytes: int
    float32_bytes: int
    quantized_bytes: int
    quantized_float32_bytes: int

    @property
    def ratio(self) -> float:
        """Whole base: stored / float32."""
        return self.total_bytes / max(self.float32_bytes, 1)

    @property
    def quantized_ratio(self) -> float:
        """Quantised layers only: stored / float32 (0 when none is quantised)."""
        return self.quantized_bytes / max(self.quantized_float32_bytes, 1)


def base_weight_memory(model: nn.Module) -> WeightMemory:
    """Measure the base model's weight memory (see :class:`WeightMemory`); works on plain and PEFT models."""
    root = getattr(model, "get_base_model", lambda: model)()
    total = ref = qbytes = qref = 0
    seen: set[int] = set()
    for _, module in _base_modules(root):
        if isinstance(module, QuantWeight):
            n, logical = module.quantized_nbytes(), module.quantized_numel
            total, ref, qbytes, qref = total + n, ref + 4 * logical, qbytes + n, qref + 4 * logical
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total, ref = total + p.numel() * p.element_size(), ref + 4 * p.numel()
    return WeightMemory(total, ref, qbytes, qref)


def merge_and_unload_quantized(model: PeftModel, requantize: bool = False,
                               adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Merge adapters into a quantised base and return the plain model; two ways.

    * ``requantize=False`` (exact): dequantise -> merge -> keep full precision. Every quantised layer
      that received a merge becomes a float ``nn.Linear`` (``nn.Embedding``); outputs equal the
      unmerged model's to float tolerance. Layers no adapter touched stay quantised: call
      :func:`dequantize_base` on the result before saving it with transformers' ``save_pretrained``,
      which writes the quantised layers' codes under names transformers cannot load back (those
      layers would come back with random weights).
    * ``requantize=True``: dequantise -> merge -> quantise again with the layer's own format. The
      base stays small, at the cost of a new rounding error (see ``benchmarks/quant_figures.py``).

    Adapters whose change is constant over input groups (QA-LoRA: they expose ``group_delta(layer)``)
    on an int4/int8 base whose quantisation group divides ``qalora_group_size`` (``quantize_base(...,
    group_size=qalora_group_size)``; ``peftkit train --method qalora`` quantises so) are folded into the
    zero points instead: exact, and the layer stays quantised either way. Where the groups do not fit
    (e.g. int4's default group of 64 under QA-LoRA's default of 16) such a layer is merged as above, with
    a warning naming it.

    ``PeftModel.merge_and_unload()`` on a quantised base is this function with ``requantize=False``.
    ``safe_merge``: check that every merged weight is finite first (as ``merge_and_unload``).

    Raises:
        TypeError: ``model`` is not a :class:`~peftkit.PeftModel`.
        ConfigError: unknown adapter name. ValueError: an adapter that cannot merge, or any other problem
            :meth:`~peftkit.PeftModel.merge_and_unload` would raise (a zero (IA)^3 scale, ...); all before any
            change, earlier merges included.
    """
    from peftkit.model import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_and_unload_quantized() takes the PeftModel holding the adapters to merge "
                        f"(get_peft_model / PeftModel.from_pretrained), not a {type(model).__name__}")
    host = model.base_model
    names = host.named(adapter_names)
    for n in names:
        if not get_method(host.peft_config[n].peft_type).mergeable:
            raise ValueError(f"adapter {n!r} uses {host.peft_config[n].peft_type}, which cannot be merged")
    before = host.merged_adapters()
    host.unmerge()
    try:  # every merge check before the first fold changes a layer
        host.check_merge(names, safe_merge=safe_merge, dropping=True)
    except BaseException:
        if before:
            host.merge(before)
        raise
    unfolded = []
    for layer_name, w in list(host.wrappers()):
        if isinstance(w, AdaptedLayer) and isinstance(w.base_layer, QuantLinear):
            mine = [n for n in names if n in w.adapters]
            if mine and all(_can_fold(w, w.adapters[n]) for n in mine):
                for n in mine:
                    w.base_layer.fold_group_delta(w.adapters[n].group_delta(w))
                    w.remove(n)
            elif any(hasattr(w.adapters[n], "group_delta") for n in mine):
                unfolded.append((layer_name, isinstance(w.base_layer.fmt, AffineFormat)))
    if unfolded:
        shown = ", ".join(n for n, _ in unfolded[:3]) + (", ..." if len(unfolded) > 3 else "")
        why = ("their quantisation group does not divide qalora_group_size (quantise with quantize_base(..., "
               "group_size=qalora_group_size)), or a group of constant weights (scale ~0) would take an infinite "
               "zero point" if all(affine for _, affine in unfolded) else
               "only int4/int8 bases fold, and an nf4 base or a quantisation group that does not divide "
               "qalora_group_size cannot (quantise with quantize_base(..., 'int4', group_size=qalora_group_size))")
        warnings.warn(f"{len(unfolded)} QA-LoRA layer(s) ({shown}) could not be folded into the quantised zero points: "
                      f"{why}; they are merged {'and quantised again (a new rounding error)' if requantize else 'in float'}"
                      " instead", stacklevel=2)
    plain = host.unload(merge=True, adapter_names=names)  # (safe_merge was checked above, before any fold)
    for name, module in list(_base_modules(plain)):
        if isinstance(module, QuantWeight) and module.merged_weight is not None:
            replace_module(plain, name, _dequantized(module, requantize))
    return plain


def _can_fold(layer: AdaptedLayer, adapter: Adapter) -> bool:
    """Whether ``adapter`` is constant over input groups that contain whole quantisation groups."""
    base = layer.base_layer
    if not hasattr(adapter, "group_delta") or not isinstance(base.fmt, AffineFormat):
        return False
    delta = adapter.group_delta(layer)
    if (base.in_features // delta.shape[1]) % base.fmt.group(base.in_features):
        return False
    with torch.no_grad():  # a group of constant weights (scale ~0) would take an infinite zero point
        return bool(torch.isfinite(base.folded_zero_points(delta)).all())
