"""The shared machinery of wrapped layers.

A target module (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``, a quantised
linear, ...) is replaced by an :class:`AdaptedLayer` that keeps it untouched as ``base_layer`` and
holds any number of named :class:`Adapter` modules of any wrap-style method in ``adapters``. The
layer, not the method, owns the lifecycle: which adapters are active, which are merged, disabling,
and mixed-adapter batches. A method only says what one adapter does to one layer's input/output and
how it folds into the weight.

``forward`` reads top to bottom: (optional input transforms) -> base output -> each active,
unmerged adapter updates the output. With no active adapter it is exactly the base layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

BASE_ROWS = "__base__"


class AdapterContext:
    """State shared by every wrapper of one model during a forward pass.

    ``row_groups`` is None for an ordinary batch; for a mixed-adapter batch it is a list of
    ``(adapter_name, row_index_tensor)`` computed once per forward by the model, never per layer.
    """

    def __init__(self) -> None:
        self.row_groups: list[tuple[str, Tensor]] | None = None


class Adapter(nn.Module):
    """One named adapter of one method on one :class:`AdaptedLayer`.

    Subclasses implement :meth:`forward` and, when ``mergeable``, :meth:`delta_weight` (or override
    :meth:`merge_into`/:meth:`unmerge_from` for non-additive merges such as rescaling).

    Class attributes:
        mergeable: whether :meth:`merge_into` is exact.
        transforms_input: whether :meth:`transform_input` changes the layer's input.
    """

    mergeable: ClassVar[bool] = True
    transforms_input: ClassVar[bool] = False

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return the layer output with this adapter applied, given the input ``x`` and output ``y``."""
        raise NotImplementedError

    def transform_input(self, x: Tensor) -> Tensor:
        """Change the input before the base layer sees it (identity by default)."""
        return x

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:  # pragma: no cover - abstract
        """The additive change to the base weight, in the base weight's layout, in float32."""
        raise NotImplementedError

    def delta_bias(self, layer: AdaptedLayer) -> Tensor | None:
        """The additive change to the base bias (float32), or None when the adapter has none."""
        return None

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Fold the adapter into float32 ``weight``/``bias``; returns the new pair (default: add the deltas)."""
        db = self.delta_bias(layer)
        if db is not None:
            if bias is None:
                raise ValueError(f"{type(self).__name__} has a bias delta but the base layer has no bias")
            bias = bias + db
        return weight + self.delta_weight(layer), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Undo :meth:`merge_into` on float32 ``weight``/``bias`` (default: subtract the deltas)."""
        db = self.delta_bias(layer)
        if db is not None and bias is not None:
            bias = bias - db
        return weight - self.delta_weight(layer), bias

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in ("r", "scaling") if hasattr(self, k))


class AdaptedLayer(nn.Module):
    """A frozen base module plus named adapters.

    Args:
        base_layer: the module being adapted; kept as ``base_layer`` and never modified except by
            :meth:`merge` / :meth:`unmerge`.

    Shapes: whatever the base layer takes and returns; adapters must preserve them.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._ctx: AdapterContext | None = None
        self._plan: list[Adapter] = []
        self._tied_weight: nn.Parameter | None = None

    # --- the base weight, in its own layout --------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (``(out, in)`` for Linear, ``(in, out)`` for GPT-2 Conv1D, ...)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # --- adapters ------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> None:
        """Register ``adapter`` under ``name`` (not yet active)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        adapter.to(self._device_of_base())
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        """Remove adapter ``name``, unmerging it first if it is merged."""
        if name in self.merged_adapters:
            self.unmerge()
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._replan()

    def set_active(self, names: Sequence[str]) -> None:
        """Make ``names`` (those present on this layer) the active adapters, in order."""
        self.active_adapters = [n for n in names if n in self.adapters]
        self._replan()

    def _replan(self) -> None:
        self._plan = [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters]

    def _device_of_base(self) -> torch.device:
        for t in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            return t.device
        return torch.device("cpu")

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        ctx = self._ctx
        if ctx is not None and ctx.row_groups is not None and not self.disabled:
            return self._mixed_forward(x, ctx.row_groups, args, kwargs)
        plan = self._plan
        if self.disabled or not plan:
            return self.base_layer(x, *args, **kwargs)
        return self._run_plan(plan, x, args, kwargs)

    def _run_plan(self, plan: Sequence[Adapter], x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        for adapter in plan:
            if adapter.transforms_input:
                x = adapter.transform_input(x)
        y = self.base_layer(x, *args, **kwargs)
        for adapter in plan:
            y = adapter(self, x, y)
        return y

    def _mixed_forward(self, x: Tensor, groups: list[tuple[str, Tensor]], args: tuple, kwargs: dict) -> Tensor:
        """Each group of rows gets its own adapter; the base output is computed once for all rows."""
        own = [(self.adapters[n], idx) for n, idx in groups if n in self.adapters and n not in self.merged_adapters]
        if not own:
            return self.base_layer(x, *args, **kwargs)
        if any(a.transforms_input for a, _ in own):
            out = None
            for name, idx in groups:
                plan = [self.adapters[name]] if name in self.adapters else []
                part = self._run_plan(plan, x.index_select(0, idx), args, kwargs)
                out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
                out = out.index_copy(0, idx, part)
            return out
        y = self.base_layer(x, *args, **kwargs)
        for adapter, idx in own:
            part = adapter(self, x.index_select(0, idx), y.index_select(0, idx))
            y = y.index_copy(0, idx, part)
        return y

    # --- merging -------------------------------------------------------------------------------------
    def merge(self, names: Iterable[str], tied: bool = False) -> None:
        """Fold the named adapters into the base weight (computed in float32, cast back).

        Args:
            names: adapters to merge (those not on this layer are skipped).
            tied: the base weight is shared with another module (tied input/output embeddings); it
                is then untied for as long as anything is merged, so the other module is unaffected,
                and the shared tensor is put back, untouched, by the last :meth:`unmerge`.

        A base layer that stores its weight in another form (a quantised linear) may define
        ``begin_merge()`` (called before the first merge: from then on ``base_layer.weight`` is a
        writable float tensor) and ``end_merge()`` (called by the last :meth:`unmerge`: back to the
        original storage, untouched).

        Raises:
            ValueError: an adapter is not mergeable (the layer is left unchanged).
        """
        todo = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        for n in todo:
            if not self.adapters[n].mergeable:
                raise ValueError(f"adapter {n!r} ({type(self.adapters[n]).__name__}) cannot be merged")
        if todo and not self.merged_adapters and hasattr(self.base_layer, "begin_merge"):
            self.base_layer.begin_merge()
        if todo and tied and self._tied_weight is None:
            shared = self.base_layer.weight
            self._tied_weight = shared
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
        for n in todo:
            self._fold(self.adapters[n].merge_into)
            self.merged_adapters.append(n)
        self._replan()

    def unmerge(self) -> None:
        """Undo every merge, last merged first, restoring the base weight to float tolerance."""
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            self._fold(self.adapters[n].unmerge_from)
        if self._tied_weight is not None:
            self.base_layer.weight = self._tied_weight
            self._tied_weight = None
        if hasattr(self.base_layer, "end_merge"):
            self.base_layer.end_merge()
        self._replan()

    @torch.no_grad()
    def _fold(self, fn) -> None:
        weight, bias = self.weight, self.bias
        new_w, new_b = fn(self, weight.detach().float(), None if bias is None else bias.detach().float())
        weight.copy_(new_w.to(weight.dtype))
        if bias is not None and new_b is not None:
            bias.copy_(new_b.to(bias.dtype))

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A whole module trained and saved with an adapter (``modules_to_save``, e.g. a classifier head).

    The original module stays as ``original_module``; each adapter gets a trainable deep copy in
    ``modules_to_save[adapter_name]``. ``disabled`` (set by ``disable_adapter()``) or no active copy
    routes to the original.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self._ctx: AdapterContext | None = None

    def add(self, name: str) -> None:
        """Create the copy for adapter ``name`` from the original module."""
        if name not in self.modules_to_save:
            self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def _pick(self, name: str | None) -> nn.Module:
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        ctx = self._ctx
        if ctx is not None and ctx.row_groups is not None and not self.disabled:
            out = None
            for name, idx in ctx.row_groups:
                part = self._pick(name)(x.index_select(0, idx), *args, **kwargs)
                out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
                out = out.index_copy(0, idx, part)
            return out
        return self._pick(self.active_adapters[0] if self.active_adapters else None)(x, *args, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module behind a peftkit wrapper (the module itself if it is not wrapped)."""
    if isinstance(module, AdaptedLayer):
        return module.base_layer
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it holds the child."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where module ``name`` is (works inside ``nn.ModuleList``/``nn.Sequential`` too)."""
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)
