"""Shared machinery of the selective methods: train a chosen subset of the model's own parameters.

Design: *the difference from the base is the adapter*. A selective adapter never writes to the base
weights. On every module that owns selected parameters (``weight`` and/or ``bias``) it keeps a
difference ``delta`` for each of them, and the wrapped layer runs the untouched base module with
``W + delta`` (:meth:`Adapter.substitute_params`; ``torch.func.functional_call``, so any module
type works: Linear, GPT-2 Conv1D, Conv, Embedding, LayerNorm, RMSNorm, ...). Hence:

* ``disable_adapter()`` and ``unload()`` give the base model exactly (its tensors were never touched), unless
  the adapter was merged: unmerging subtracts the difference again, exact to float rounding (about 1e-7 in
  float32; in a bfloat16 model ``W + delta - delta`` can round a weight by one bfloat16 step, up to ~4e-3);
* ``merge_and_unload()`` folds ``W + delta`` into the weights (bit-identical in float32);
* several named selective adapters (of any methods) coexist; active ones add their deltas;
* mixed-adapter batches run each row group with its own deltas.

A difference is held in one of two forms, per tensor:

* dense: parameter ``diff_<name>`` shaped like the base tensor (BitFit, partial fine-tuning,
  Child-Tuning-F, and diff pruning while it trains);
* sparse: parameter ``diff_<name>_values`` ``(k,)`` and buffer ``diff_<name>_indices`` ``(k,)``
  (int32, or int64 for tensors of 2**31 entries or more) into the flattened tensor (FISH mask,
  Child-Tuning-D, and loaded diff-pruning adapters). Only the ``k`` values exist, so no optimiser
  (weight decay included) can move any other entry: the mask is exact by construction.

Files hold exactly these tensors under ``base_model.model.<module>.diff_<name>[_values|_indices]``;
diff pruning's dense training form is written sparse (its non-zero entries). The trainable set is
chosen when the adapter is added (BitFit, partial, diff pruning, Child-Tuning-F) or from data once
before training (FISH, Child-Tuning-D: :meth:`peftkit.PeftModel.peft_prepare`).

Papers of the methods built on this machinery (each method's module gives the details):
  Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
    Language-models", 2021, arXiv:2106.10199 (:mod:`peftkit.methods.bitfit`).
  Lee et al., "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning", 2019, arXiv:1911.03090
    (:mod:`peftkit.methods.partial`).
  Guo et al., "Parameter-Efficient Transfer Learning with Diff Pruning", 2020, arXiv:2012.07463
    (:mod:`peftkit.methods.diff_pruning`).
  Sung et al., "Training Neural Networks with Fixed Sparse Masks", 2021, arXiv:2111.09839
    (FISH mask, :mod:`peftkit.methods.fish`; the Fisher-information selection of :class:`FisherMaskTuner`).
  Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning", 2021,
    arXiv:2109.05687 (Child-Tuning, :mod:`peftkit.methods.child_tuning`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from peftkit.config import ConfigError, PeftConfig, check
from peftkit.formats.hf_peft import PREFIX, AdapterLoadError
from peftkit.layers import AdaptedLayer, Adapter, replace_module, wide
from peftkit.ops import func_transforms_active
from peftkit.targeting import (
    ALL_LINEAR,
    UnmatchedTargetWarning,
    bypassed_modules,
    check_single_path,
    iter_logical_modules,
    layer_index,
    linear_types,
    matches,
)
from peftkit.tuners import Tuner

log = logging.getLogger("peftkit")
SELECTABLE = ("weight", "bias")


def index_dtype(numel: int) -> torch.dtype:
    """The index dtype for a tensor of ``numel`` entries: int32 below 2**31 entries (halves the file size),
    else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def add_sparse(w: Tensor, flat: Tensor, values: Tensor) -> Tensor:
    """``w`` (any shape) plus ``values`` (``(k,)``, cast to ``w``'s dtype) at the flat indices ``flat`` (``(k,)``,
    distinct) of ``w`` flattened: a new tensor shaped like ``w``, differentiable in both (the selective methods'
    sparse differences, SHiRA)."""
    return w.reshape(-1).index_add(0, flat, values.to(w.dtype)).view_as(w)


def sparse_to_dense(flat: Tensor, values: Tensor, shape: Sequence[int]) -> Tensor:
    """A zero tensor of ``shape`` with ``values`` (``(k,)``, its dtype kept) at the flat indices ``flat``
    (``(k,)``)."""
    numel = int(torch.Size(shape).numel())
    return torch.zeros(numel, device=values.device, dtype=values.dtype).index_add_(0, flat, values).view(tuple(shape))


@dataclass
class SelectiveConfig(PeftConfig):
    """Fields shared by the selective methods (not a method itself).

    Args:
        target_modules: which modules' parameters may be selected: a list of names/suffixes, a
            full-match regex, ``"all-linear"``, or None (default) for every module of the model.
        exclude_modules: names/suffixes or regex never selected.
        layers_to_transform / layers_pattern: keep only modules inside these block indices (see
            :mod:`peftkit.targeting`).
        modules_to_save: whole modules trained and saved with the adapter (e.g. a classifier head;
            with ``task_type="SEQ_CLS"`` the head is added automatically).

    Raises:
        ConfigError: a ``target_modules``/``exclude_modules`` that is not a string or a list of
            strings, or a block index that is not an integer >= 0.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        for field_name in ("target_modules", "exclude_modules"):
            value = getattr(self, field_name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, field_name, value)
            check(value is None or isinstance(value, str) or (isinstance(value, list) and value
                                                              and all(isinstance(v, str) for v in value)),
                  f"{field_name}={value!r} is not valid; give a list of module names/suffixes, a regex, or None")
            if isinstance(value, str) and value.lower() != ALL_LINEAR:
                try:
                    re.compile(value)
                except re.error as err:
                    raise ConfigError(f"{field_name}={value!r} is read as a regular expression, and it is not a valid "
                                      f"one ({err}); give a valid regex or a list of module names/suffixes") from None
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            check(isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in layers),
                  f"layers_to_transform={self.layers_to_transform!r} must be a block index >= 0 or a list of them")


def check_fraction(name: str, value: Any, low_open: bool, high_open: bool) -> None:
    """Check that ``value`` (the field ``name``) is a number in the interval from 0 to 1, its ends open or
    closed as ``low_open`` / ``high_open`` say (e.g. both False: ``[0, 1]``).

    Raises:
        ConfigError: ``value`` is not a number (bool excluded) in that interval; the message names ``name``.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
    check(ok, f"{name}={value!r} is not valid; it must be a number in {interval}")


def budget(fraction: float, total: int, what: str) -> int:
    """``round(fraction * total)`` entries, at least one; ``what`` names the setting (``"keep_ratio=0.005"``).

    Raises:
        ConfigError: the rounded budget is 0 (the fraction is too small for this many entries).
    """
    k = round(fraction * total)
    check(k >= 1, f"{what} keeps a fraction {fraction:g} of the {total:,} selected entries, which rounds to 0 "
                  "entries; keep more")
    return min(k, total)


class StepMask:
    """Child-Tuning-F's Bernoulli gradient mask of one difference for the current optimiser step.

    Args:
        p: the probability that a gradient entry is kept, in (0, 1].

    :meth:`masked` draws ``M ~ Bernoulli(p)`` (shaped like the gradient) at the first backward of a step and
    applies the same ``M`` in every later backward until :meth:`renew`, so that under gradient accumulation the
    step's summed gradient is ``M * sum_i g_i / p``, as the reference ``ChildTuningAdamW`` masks the accumulated
    gradient once per step. The draw is ``torch.empty_like(grad).bernoulli_(p)``, made in backward, as when
    the mask was drawn every backward: one backward per step draws from the random stream exactly as before.

    Paper: Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning (Xu et al.,
    2021, arXiv:2109.05687).
    """

    def __init__(self, p: float) -> None:
        self.p = p
        self.mask: Tensor | None = None

    def renew(self) -> None:
        """Forget the mask: the next backward draws a new one."""
        self.mask = None

    def masked(self, grad: Tensor) -> Tensor:
        """``grad * M / p`` for ``grad`` shaped like the difference; draws ``M`` when there is none for this step
        (or the one held no longer fits ``grad``'s shape, dtype or device, e.g. after ``model.to(...)``)."""
        m = self.mask
        if m is None or m.shape != grad.shape or m.dtype != grad.dtype or m.device != grad.device:
            m = self.mask = torch.empty_like(grad).bernoulli_(self.p)
        return grad * m / self.p


class _BernoulliGrad(torch.autograd.Function):
    """Identity forward; backward keeps each gradient entry with probability ``p`` and scales by 1/p: with the
    step's :class:`StepMask` when one is given, else with a mask drawn for this backward alone (under
    ``torch.func`` transforms, whose tensors may not outlive the transform). Forward mode sees the identity: the
    ``jvp`` passes the tangent through (the mask acts on gradients only)."""

    generate_vmap_rule = True  # forward and backward are plain torch ops: torch.func may batch them

    @staticmethod
    def forward(x: Tensor, p: float, step_mask: StepMask | None) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.p, ctx.step_mask = inputs[1], inputs[2]

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, p_t: None, step_mask_t: None) -> Tensor:
        return x_t.view_as(x_t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.step_mask is not None:
            return ctx.step_mask.masked(grad), None, None
        keep = torch.empty_like(grad).bernoulli_(ctx.p)
        return grad * keep / ctx.p, None, None


class SelectAdapter(Adapter):
    """The differences of one selective adapter on one module.

    Args:
        base: the module whose parameters are selected (kept untouched).
        names: which of its parameters (``"weight"``, ``"bias"``) get a difference.
        sparse: start with empty sparse differences (methods that choose entries from data) instead
            of dense zeros.
        save_sparse: write dense differences as their non-zero entries (diff pruning).
        grad_keep: Child-Tuning-F's ``p``: in training, each gradient entry of a dense difference is
            kept with probability ``p`` and scaled by ``1/p``, with one Bernoulli mask per optimiser step
            (:class:`StepMask`): a new one is drawn at the first backward after a training forward (not a
            checkpointed layer's recomputation in backward) found the difference's gradient cleared (``zero_grad()``, which sets it
            to None by default), or after :meth:`renew_grad_masks` (``peft_step_end``); micro-batches
            accumulated into one step share it.

    Shapes: ``diff_<name>`` like the base tensor; ``diff_<name>_values``/``_indices``: ``(k,)``.
    ``delta_weight``/``delta_bias`` are the dense float32 differences.
    """

    substitutes_params = True

    @property
    def saved_form_differs(self) -> bool:
        """True while a dense difference is written to files as its non-zero entries (``save_sparse``)."""
        return self.save_sparse and not all(self.is_sparse.values())

    def __init__(self, base: nn.Module, names: Sequence[str], sparse: bool = False, save_sparse: bool = False,
                 grad_keep: float | None = None) -> None:
        super().__init__()
        self.names = tuple(names)
        self.shapes = {n: tuple(base._parameters[n].shape) for n in self.names}
        self.save_sparse, self.grad_keep = save_sparse, grad_keep
        self._grad_masks: dict[str, StepMask] = {}  # Child-Tuning-F's mask of each difference for this step
        self.is_sparse: dict[str, bool] = {}
        self.prepared = not sparse
        self._warned = False
        device = base._parameters[self.names[0]].device
        for n in self.names:
            if sparse:
                self.set_sparse(n, torch.zeros(0, dtype=torch.int64, device=device))
            else:
                self.set_dense(n, device)

    # --- the two forms ----------------------------------------------------------------------------
    def numel(self, name: str) -> int:
        """The number of entries of the base tensor ``name`` (all of them, not the ``k`` kept)."""
        return int(torch.Size(self.shapes[name]).numel())

    def _device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def _drop(self, name: str) -> None:
        for attr in (f"diff_{name}", f"diff_{name}_values", f"diff_{name}_indices"):
            if attr in self._parameters or attr in self._buffers:
                delattr(self, attr)

    def _dtype(self, name: str) -> torch.dtype:
        """The dtype ``name``'s difference has now (float64 on a float64 model), else the adapter's, else float32."""
        for attr in (f"diff_{name}", f"diff_{name}_values"):
            if attr in self._parameters:
                return self._parameters[attr].dtype
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def set_dense(self, name: str, device: torch.device | None = None) -> None:
        """Make ``name``'s difference a dense zero parameter (in the dtype it has: float64 stays float64)."""
        device, dtype = device or self._device(), self._dtype(name)
        self._drop(name)
        self.register_parameter(f"diff_{name}", nn.Parameter(torch.zeros(self.shapes[name], device=device, dtype=dtype)))
        self.is_sparse[name] = False

    def set_sparse(self, name: str, indices: Tensor) -> None:
        """Make ``name``'s difference a zero sparse parameter at flat ``indices`` (``(k,)``, unique), in the dtype it
        has."""
        dtype = self._dtype(name)
        self._drop(name)
        # nothing selected: an empty parameter that never requires grad (multi-process training wants a gradient
        # for every parameter that requires one, and this one takes no part in the forward)
        self.register_parameter(f"diff_{name}_values", nn.Parameter(
            torch.zeros(indices.numel(), device=indices.device, dtype=dtype), requires_grad=indices.numel() > 0))
        self.register_buffer(f"diff_{name}_indices", indices.to(index_dtype(self.numel(name))))
        self.is_sparse[name] = True

    def dense(self, name: str) -> Tensor:
        """The dense difference of ``name`` (detached) in the base tensor's shape: float32, or float64 for float64
        values."""
        if self.is_sparse[name]:
            return sparse_to_dense(getattr(self, f"diff_{name}_indices"),
                                   wide(getattr(self, f"diff_{name}_values").detach()), self.shapes[name])
        return wide(getattr(self, f"diff_{name}").detach())

    # --- forward and merging ----------------------------------------------------------------------
    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.prepared and self.training and not self._warned:
            self._warned = True
            warnings.warn("a FISH/Child-Tuning-D adapter is used in training before its mask was chosen, so it "
                          "trains nothing; call model.peft_prepare(batches) first (peftkit's Trainer does)",
                          stacklevel=2)
        for n in self.names:
            params[n] = self.substituted(layer, n, params[n] if n in params else layer.base_layer._parameters[n])
        return params

    def substituted(self, layer: AdaptedLayer, name: str, w: Tensor) -> Tensor:
        """``w + difference`` for the tensor ``name``, ``w`` (the base tensor, or what adapters earlier in
        ``layer``'s plan made of it) in its own shape and dtype; ``w`` itself when nothing of it is selected."""
        if self.is_sparse[name]:
            values = getattr(self, f"diff_{name}_values")
            if values.numel() == 0:  # nothing selected in this tensor: no copy of it
                return w
            return add_sparse(w, getattr(self, f"diff_{name}_indices"), values)
        d = getattr(self, f"diff_{name}")
        if self.grad_keep is not None and self.training and d.requires_grad:
            d = self._masked_grad(layer, name, d)
        return w + d.to(w.dtype)

    def _masked_grad(self, layer: AdaptedLayer, name: str, d: Tensor) -> Tensor:
        """``d`` whose gradient gets this step's Child-Tuning-F mask (``d`` itself outside autograd)."""
        step_mask = self._grad_masks.setdefault(name, StepMask(self.grad_keep))
        ctx = layer._ctx
        # a forward that finds the gradient cleared starts a new step (not a checkpointed layer's recomputation in
        # backward, which runs before the gradient is accumulated)
        if d.grad is None and (ctx is None or not ctx.recomputing()):
            step_mask.renew()
        if not torch.is_grad_enabled():
            return d
        return _BernoulliGrad.apply(d, self.grad_keep, None if func_transforms_active() else step_mask)

    def renew_grad_masks(self) -> None:
        """Child-Tuning-F: draw new gradient masks at the next backward (an optimiser step was taken)."""
        for step_mask in self._grad_masks.values():
            step_mask.renew()

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y  # everything happened in substitute_params

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.dense("weight") if "weight" in self.names else torch.zeros_like(layer.weight, dtype=torch.float32)

    def delta_bias(self, layer: AdaptedLayer) -> Tensor | None:
        return self.dense("bias") if "bias" in self.names else None

    # --- files --------------------------------------------------------------------------------------
    def export_state(self) -> dict[str, Tensor]:
        """The file's tensors: with ``save_sparse`` each dense difference as its non-zero entries
        (``diff_<name>_values``/``_indices``); the module's own ``state_dict`` keeps the dense form, so that
        ``load_state_dict(state_dict())`` (torch, accelerate and Lightning checkpoints) round-trips."""
        out = dict(self.state_dict())
        if not self.save_sparse:
            return out
        for n in self.names:
            if not self.is_sparse[n]:
                flat = out.pop(f"diff_{n}").reshape(-1)
                idx = flat.nonzero().squeeze(1)
                out[f"diff_{n}_values"] = flat[idx]
                out[f"diff_{n}_indices"] = idx.to(index_dtype(self.numel(n)))
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {'sparse k=' + str(getattr(self, f'diff_{n}_values').numel()) if self.is_sparse[n] else 'dense'}"
                         for n in self.names)


class TiedDifference(Adapter):
    """A selected tensor's difference where another module shares that tensor (a tied output layer, whose weight
    is the input embedding's): this module runs with the same ``base + difference`` as the module the tensor was
    selected on, so the tensor changes alike at both names, as the tensor itself would if it were trained. It holds
    nothing of its own: the difference lives, trains and is saved once, in ``owner``.

    Args:
        owner: the :class:`SelectAdapter` of the module the tensor was selected on.
        names: the shared tensors, by their names on both modules (``"weight"``).

    Shapes: as ``owner``'s; ``delta_weight``/``delta_bias`` are ``owner``'s dense float32 differences.

    Paper: Training Neural Networks with Fixed Sparse Masks (Sung et al., 2021, arXiv:2111.09839), whose code ranks
    a tied tensor once among ``named_parameters()``; Child-Tuning (Xu et al., 2021, arXiv:2109.05687) shares the
    tuner.
    """

    substitutes_params = True

    def __init__(self, owner: SelectAdapter, names: Sequence[str]) -> None:
        super().__init__()
        self._owner = (owner,)  # not a submodule: its tensors belong (and are saved) under the owner's module
        self.names = tuple(names)

    @property
    def owner(self) -> SelectAdapter:
        """The adapter that holds the difference."""
        return self._owner[0]

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        for n in self.names:
            params[n] = self.owner.substituted(layer, n, params[n] if n in params else layer.base_layer._parameters[n])
        return params

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y  # everything happened in substitute_params

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.owner.delta_weight(layer) if "weight" in self.names else torch.zeros_like(layer.weight,
                                                                                              dtype=torch.float32)

    def delta_bias(self, layer: AdaptedLayer) -> Tensor | None:
        return self.owner.dense("bias") if "bias" in self.names else None

    def extra_repr(self) -> str:
        return f"ties {', '.join(self.names)} to the selected module's difference"


def tied_partners(host: Any, chosen: Sequence[tuple[str, nn.Module, Sequence[str]]]
                  ) -> list[tuple[str, int, tuple[str, ...]]]:
    """The other modules that share a selected tensor under the same name (a tied output layer), as ``(module
    name, index in chosen, tensor names)``: ``chosen`` holds ``(module name, base module, selected names)``.
    Modules trained whole by an adapter (``modules_to_save``) are left out."""
    skip = set(host.modules_to_save_names())
    owners = {id(base._parameters[n]): (i, n) for i, (_, base, names) in enumerate(chosen) for n in names}
    selected = {name for name, _, _ in chosen}
    found: dict[tuple[str, int], list[str]] = {}
    for name, module in iter_logical_modules(host.model):
        if not name or name in selected or name in skip:
            continue
        for pname, p in module._parameters.items():
            hit = owners.get(id(p)) if isinstance(p, nn.Parameter) else None
            if hit is not None and hit[1] == pname:
                found.setdefault((name, hit[0]), []).append(pname)
    return [(name, i, tuple(names)) for (name, i), names in found.items()]


# --- choosing parameters -----------------------------------------------------------------------------
def select_parameters(host: Any, config: SelectiveConfig, names: Sequence[str], method: str,
                      layers: Sequence[int] | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """``(module name, parameter names)`` for every module whose own ``names`` parameters are selected.

    A module qualifies when it matches ``config.target_modules`` (None: any), not
    ``exclude_modules``, lies in ``layers`` (default ``config.layers_to_transform``; None: anywhere)
    and is not a ``modules_to_save`` module. A parameter shared by several modules (tied embeddings)
    is selected once, on the first module that owns it.

    Raises:
        ConfigError: nothing is selected (the message says what was looked for), a selected
            module has a bias but no weight (differences fold into ``weight``/``bias``), or a selected module
            is also part of the model under another name (one layer object placed twice).
    """
    model = host.model
    skip = set(host.modules_to_save_names())
    target = config.target_modules
    output_layer = model.get_output_embeddings() if target == ALL_LINEAR and hasattr(model, "get_output_embeddings") \
        else None
    if layers is None and config.layers_to_transform is not None:
        lt = config.layers_to_transform
        layers = [lt] if isinstance(lt, int) else list(lt)
    seen: set[int] = set()
    found: list[tuple[str, tuple[str, ...]]] = []
    bypassed: list[str] = []
    bypassed_ids = bypassed_modules(model)
    mine = list(getattr(config, "modules_to_save", None) or [])
    left_out: list[str] = []  # modules another adapter trains whole (modules_to_save): not selectable here
    for name, module in iter_logical_modules(model):
        if not name:
            continue
        own = [n for n in names if isinstance(module._parameters.get(n), nn.Parameter)]
        if name in skip:
            if own and not any(name == m or name.endswith("." + m) for m in mine):
                left_out.append(name)
            continue
        # a quantised layer's weight is not a Parameter: it must still be refused, not skipped, when wanted
        codes = hasattr(module, "quantized_numel") and "weight" in names
        if not own and not codes:
            continue
        if target == ALL_LINEAR:
            hit = isinstance(module, linear_types()) and module is not output_layer
        else:
            hit = target is None or matches(name, target)
        if not hit or matches(name, config.exclude_modules):
            continue
        if layers and layer_index(name, config.layers_pattern) not in layers:  # ([] keeps all, as in peft)
            continue
        if id(module) in bypassed_ids:
            check(target is None or target == ALL_LINEAR,
                  f"{method} cannot change {name!r}: it is the out_proj of a torch.nn.MultiheadAttention, which reads "
                  "its weight and bias directly instead of calling it, so a difference on it would act only once "
                  "merged; leave it out of target_modules")
            bypassed.append(name)
            continue
        own = [n for n in own if id(module._parameters[n]) not in seen]
        if not own and not codes:
            continue
        quantised = hasattr(module, "quantized_numel")
        # a bias alone (BitFit) is a float parameter also on a quantised layer
        # a weight computed by a parametrisation (Wav2Vec2's weight-normed positional convolution) is read, never
        # changed, when only the bias is selected: the bias is a plain parameter, and the weight's delta is zero
        computed = "weight" not in names and parametrize.is_parametrized(module, "weight")
        check(isinstance(module._parameters.get("weight"), nn.Parameter) or (quantised and "weight" not in names)
              or computed,
              f"{method} cannot select parameters of module {name!r} ({type(module).__name__}): "
              + ("a quantised layer holds its weight as integer codes, and the selective methods change float layers "
                 "only (a method that wraps layers, e.g. LoRA, trains on a quantised base)" if quantised else
                 "it has no 'weight' parameter to fold the difference into"))
        seen.update(id(module._parameters[n]) for n in own)
        found.append((name, tuple(own)))
    # a module the model also holds under another name would be wrapped under one of them only (checked before
    # the config is changed below)
    check_single_path(model, [n for n, _ in found])
    left_out = [n for n in left_out if target is None or (target == ALL_LINEAR and isinstance(
        model.get_submodule(n), linear_types())) or (target != ALL_LINEAR and matches(n, target))]
    if left_out and found:
        # the config says so, so that its file loads into a model without that other adapter (it lacked them)
        excluded = config.exclude_modules
        config.exclude_modules = (list(excluded or []) + left_out if not isinstance(excluded, str) else
                                  "|".join([f"(?:{excluded})", *(re.escape(n) for n in left_out)]))
        warnings.warn(f"{method}: {left_out} left out: another adapter trains {'it' if len(left_out) == 1 else 'them'} "
                      "whole (modules_to_save); the config's exclude_modules now names "
                      f"{'it' if len(left_out) == 1 else 'them'}", UserWarning, stacklevel=3)
    if isinstance(target, list):  # as the layer-wrapping methods: an entry that names no module is probably a typo
        modules = [n for n, _ in iter_logical_modules(model) if n]
        unmatched = [p for p in target if not any(n == p or n.endswith("." + p) for n in modules)]
        if unmatched:
            warnings.warn(UnmatchedTargetWarning(
                f"{method}: target_modules entries {unmatched} match no module of the model (a typo?); the other "
                f"entries selected {len(found)} module(s)"), stacklevel=3)
    if bypassed and found:
        warnings.warn(f"{method}: {len(bypassed)} module(s) left out ({', '.join(bypassed[:3])}"
                      f"{', ...' if len(bypassed) > 3 else ''}): their parent reads their weights directly "
                      "(torch's MultiheadAttention), so a difference there would act only once "
                      "merged", stacklevel=3)
    if not found:
        raise ConfigError(f"{method}: no {'/'.join(names)} parameter found in modules matching "
                          f"target_modules={target!r}, exclude_modules={config.exclude_modules!r}"
                          + (f", layers {list(layers)}" if layers is not None else "")
                          + " (modules_to_save are never selected)"
                          + ("; this model has no bias at all (as Llama-style models): SSF or (IA)^3 also train "
                             "a few vectors per layer" if tuple(names) == ("bias",) and not any(
                                 n.rsplit(".", 1)[-1] == "bias" for n, _ in model.named_parameters()) else ""))
    return found


def _sparse_problem(idx: Tensor, values: Tensor | None, size: int) -> str | None:
    """What is wrong with a file's sparse difference of a tensor of ``size`` entries, or None."""
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        return f"the indices are {str(idx.dtype).removeprefix('torch.')}, not integers"
    if idx.dim() != 1:
        return f"the indices have shape {tuple(idx.shape)}, not 1-D"
    if values is None or values.shape != idx.shape:
        return (f"{idx.numel()} indices but {'no values' if values is None else f'values of shape {tuple(values.shape)}'}")
    if idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= size:
            return f"index {low if low < 0 else high} is out of range"
        unique, counts = torch.unique(idx, return_counts=True)
        if unique.numel() != idx.numel():
            return f"index {int(unique[counts > 1][0])} is repeated"
    return None


def global_topk(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """The ``k`` largest entries over all ``scores`` together, as sorted flat indices per tensor.

    Args:
        scores: tensors of any shapes (on one device).
        k: how many entries to keep in total, 0 <= k <= total entries.

    Returns:
        one int64 tensor ``(k_i,)`` per input, ``sum(k_i) == k``. Ties are broken by ``torch.topk``.
    """
    flat = torch.cat([s.reshape(-1) for s in scores])
    top = torch.sort(torch.topk(flat, k, sorted=False).indices).values
    out, start = [], 0
    for s in scores:
        end = start + s.numel()
        lo, hi = torch.searchsorted(top, torch.tensor([start, end], device=top.device)).tolist()
        out.append(top[lo:hi] - start)
        start = end
    return out


def _trim_right_padding(row: dict[str, Any]) -> dict[str, Any]:
    """One example cut to its own length when its ``attention_mask`` (``(1, seq)``) is ones then zeros:
    every ``(1, seq, ...)`` tensor loses the padded tail, which the loss never sees."""
    mask = row.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return row
    seq, length = mask.shape[1], int(mask[0].sum())
    if length in (0, seq) or not bool(mask[0, :length].all()):
        return row
    return {k: v[:, :length] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == seq else v
            for k, v in row.items()}


def empirical_fisher(host: Any, params: Sequence[nn.Parameter], batches: Iterator[dict[str, Tensor]],
                     num_samples: int, counted: list[int] | None = None) -> list[Tensor]:
    """The diagonal empirical Fisher information of some of the model's tensors, one example at a time.

    ``F_i = (1/N) sum_n (d loss(x_n, y_n) / d w_i)^2`` over the first ``num_samples`` rows of
    ``batches`` (each row run alone and without its right padding, in eval mode, so dropout is off),
    with the model's own loss on the true labels (Sung et al. 2021, Sec. 3). ``params`` (frozen base
    tensors) require grad only while this runs; their ``.grad`` is never written.

    Under ``torch.distributed`` (several processes) every process returns rank 0's values, so that all
    choose the same entries. ``batches`` may end before ``num_samples`` rows (the trainers give one pass over
    the training data: a row is never counted twice); ``counted`` (a list) gets the number of rows used.

    Returns:
        float32 tensors shaped like ``params``, in the same order.

    Raises:
        ValueError: the model returns no ``loss`` (batches need ``labels``), or ``batches`` is empty.
    """
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    model, seen = host.model, 0
    was_training, needed = model.training, [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                rows = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)
                for i in range(rows):
                    row = _trim_right_padding({k: v[i:i + 1] if isinstance(v, Tensor) and v.dim() > 0 else v
                                               for k, v in batch.items()})
                    loss = getattr(model(**row), "loss", None)
                    if loss is None:
                        raise ValueError("the Fisher information needs the model's loss: give batches with labels")
                    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
                    for f, g in zip(fisher, grads, strict=True):
                        if g is not None:
                            f.addcmul_(g, g)
                    seen += 1
                    if seen >= num_samples:
                        break
                if seen >= num_samples:
                    break
    finally:
        for p, flag in zip(params, needed, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise ValueError("no training example to compute the Fisher information on")
    fisher = [f / seen for f in fisher]
    if counted is not None:
        counted.append(seen)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every process must choose the same entries, as their gradients are averaged: all use rank 0's
        # Fisher information (peftkit's Trainer gives every rank the same batches here; transformers'
        # Trainer gives each rank its own slice of the data)
        for f in fisher:
            dist.broadcast(f, src=0)
    return fisher


def _warn_shared(model: nn.Module, chosen: list[tuple[str, nn.Module, Sequence[str]]], method: str) -> None:
    """Warn when a selected tensor is also another module's (a tied embedding and output layer): the
    difference applies where the selected module runs, and the other module keeps the base values."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    shared = []
    for name, base, names in chosen:
        for n in names:
            own = f"{name}.{n}"
            others = [o for o in owners.get(id(getattr(base, n)), []) if o != own and not o.startswith(f"{name}.")]
            if others:
                shared.append(f"{own} (also {', '.join(others)})")
    if shared:
        warnings.warn(f"{method} selects {len(shared)} tensor(s) shared with another module: {'; '.join(shared[:3])}"
                      f"{'; ...' if len(shared) > 3 else ''}. The difference applies only where the selected module itself "
                      "runs (on a module the model never calls, such as T5's `shared`, it changes nothing); the other "
                      "modules keep the base values (as with LoRA on a tied embedding), and merging unties them; to "
                      "change none, leave the module out of the targets", stacklevel=4)


class SelectTuner(Tuner):
    """Tuner of the selective methods: wraps every module that owns selected parameters in an
    :class:`AdaptedLayer` holding one :class:`SelectAdapter`. Subclasses give :meth:`select` and may
    override :meth:`make_adapter` and :meth:`check_budget`."""

    method = "selective method"
    #: whether a selected tensor that other modules share (tied embeddings) gets its difference at those modules
    #: too (:class:`TiedDifference`); otherwise only the selected module runs with it, with a warning
    follows_ties = False

    def select(self, host: Any, config: Any) -> list[tuple[str, tuple[str, ...]]]:
        """The selected ``(module, parameter names)``; default: weights and biases of the targets."""
        return select_parameters(host, config, SELECTABLE, self.method)

    def make_adapter(self, base: nn.Module, names: tuple[str, ...], config: Any) -> SelectAdapter:
        """The adapter of module ``base`` for its selected parameters ``names`` (``"weight"``/``"bias"``);
        default: dense zero differences."""
        return SelectAdapter(base, names)

    def check_budget(self, config: Any, total: int) -> None:
        """Raise ConfigError when the config's budget cannot be met on ``total`` selectable entries."""

    def inject(self, host: Any, config: Any, adapter_name: str) -> None:
        model = host.model
        built = []
        for name, names in self.select(host, config):
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            built.append((name, module, self.make_adapter(base, names, config)))
        self.check_budget(config, sum(a.numel(n) for _, _, a in built for n in a.names))
        chosen = [(name, module.base_layer if isinstance(module, AdaptedLayer) else module, adapter.names)
                  for name, module, adapter in built]
        if self.follows_ties:
            partners = tied_partners(host, chosen)
            built += [(name, model.get_submodule(name), TiedDifference(built[i][2], names))
                      for name, i, names in partners]
            tied = {(chosen[i][0], n) for _, i, names in partners for n in names}
            chosen = [(name, base, tuple(n for n in names if (name, n) not in tied)) for name, base, names in chosen]
        _warn_shared(model, chosen, self.method)
        for name, module, adapter in built:
            if not isinstance(module, AdaptedLayer):
                wrapper = AdaptedLayer(module)
                wrapper._ctx = host.ctx
                replace_module(model, name, wrapper)
                module = wrapper
            module.add(adapter_name, adapter)

    @staticmethod
    def adapters(host: Any, adapter_name: str) -> list[tuple[str, SelectAdapter]]:
        """``(module name, adapter)`` for every module holding selective adapter ``adapter_name``."""
        return list(host.adapters_of(adapter_name, SelectAdapter).items())

    def before_load(self, host: Any, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Give each difference the form and size the file has (sparse ``k`` comes from the file).

        Raises:
            AdapterLoadError: indices that are not integers, out of range, repeated, or whose count
                differs from the values'. Nothing is changed unless every tensor is valid.
        """
        plan: list[tuple[SelectAdapter, str, Tensor | None]] = []
        seen: list[SelectAdapter] = []
        densified: dict[str, Tensor] = {}
        # a dense adapter that has trained (diff pruning restoring a snapshot) keeps its dense form; a fresh one
        # (from_pretrained) takes the file's fixed mask
        trained = any(not a.is_sparse[n] and bool(getattr(a, f"diff_{n}").detach().any())
                      for _, a in self.adapters(host, adapter_name) for n in a.names)
        for name, adapter in self.adapters(host, adapter_name):
            for n in adapter.names:
                key = f"{PREFIX}{name}.diff_{n}"
                idx, values = tensors.get(key + "_indices"), tensors.get(key + "_values")
                if key in tensors or idx is not None:
                    seen.append(adapter)
                if idx is None:
                    if key in tensors and adapter.is_sparse[n]:
                        plan.append((adapter, n, None))
                    continue
                size = adapter.numel(n)
                problem = _sparse_problem(idx, values, size)
                if problem:
                    raise AdapterLoadError(f"adapter {adapter_name!r}: {key}_indices/_values are not a valid sparse "
                                           f"difference of a tensor with {size:,} entries: {problem} (it needs 1-D "
                                           "integer indices in [0, size), no repeats, as many values as indices)")
                current = getattr(adapter, f"diff_{n}_indices", None) if adapter.is_sparse[n] else None
                if current is not None and torch.equal(current.long(), idx.long().to(current.device)):
                    continue  # the same entries: the values are copied into the live parameter (an optimiser keeps it)
                dense = None if adapter.is_sparse[n] else getattr(adapter, f"diff_{n}")
                if dense is not None and dense.requires_grad and trained:
                    # the file's entries are written into a dense tensor copied into the live one (training and its
                    # optimiser go on as they were)
                    densified[key] = torch.zeros(size, dtype=values.dtype).index_add_(
                        0, idx.long().cpu(), values.cpu()).view(adapter.shapes[n])
                    continue
                plan.append((adapter, n, idx.long()))
        for adapter, n, idx in plan:
            if idx is None:
                adapter.set_dense(n)
            else:
                adapter.set_sparse(n, idx.to(adapter._device()))
        for adapter in seen:  # its entries come from the file: nothing left to choose from data
            adapter.prepared = True
        for key, value in densified.items():
            del tensors[key + "_indices"], tensors[key + "_values"]
            tensors[key] = value


class FisherMaskTuner(SelectTuner):
    """Selective methods whose trainable entries are the ``k`` entries of largest empirical Fisher
    information over all selected tensors (chosen once, by :meth:`prepare`)."""

    fraction_name = "keep_ratio"
    follows_ties = True  # a tied tensor is scored once, by its whole gradient, and its entries change at every name

    def keep_fraction(self, config: Any) -> float:
        """The fraction of selected entries that train (the config field named by ``fraction_name``)."""
        return getattr(config, self.fraction_name)

    def make_adapter(self, base: nn.Module, names: tuple[str, ...], config: Any) -> SelectAdapter:
        """Empty sparse differences (not prepared) until :meth:`prepare` picks the entries."""
        return SelectAdapter(base, names, sparse=True)

    def check_budget(self, config: Any, total: int) -> None:
        budget(self.keep_fraction(config), total, f"{self.fraction_name}={self.keep_fraction(config)!r}")

    def export_config(self, host: Any, adapter_name: str) -> Any:
        if not all(a.prepared for _, a in self.adapters(host, adapter_name)):
            warnings.warn(f"{self.method} adapter {adapter_name!r} is saved before its mask was chosen (peft_prepare, "
                          "which the trainers call): the file holds no entry, and a model loading it cannot choose "
                          "one; save it after training", stacklevel=4)
        return super().export_config(host, adapter_name)

    def prepare(self, host: Any, adapter_name: str, batches: Iterator[dict[str, Tensor]]) -> None:
        adapters = [a for _, a in self.adapters(host, adapter_name)]
        if all(a.prepared for a in adapters):
            return
        config = host.peft_config[adapter_name]
        entries = [(name, a, n) for name, a in self.adapters(host, adapter_name) for n in a.names]
        total = sum(a.numel(n) for _, a, n in entries)
        k = budget(self.keep_fraction(config), total, f"{self.fraction_name}={self.keep_fraction(config)!r}")
        base = [host.model.get_submodule(name).base_layer._parameters[n] for name, _, n in entries]
        counted: list[int] = []
        fisher = empirical_fisher(host, base, batches, config.num_fisher_samples, counted)
        with torch.no_grad():
            for (_, adapter, n), idx in zip(entries, global_topk(fisher, k), strict=True):
                adapter.set_sparse(n, idx)
        for a in adapters:
            a.prepared = True
        log.info("%s %r: Fisher mask of %s of %s entries from %d samples", self.method, adapter_name, f"{k:,}",
                 f"{total:,}", counted[0])
