"""The shared machinery of wrapped layers.

A target module (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``, a quantised
linear, ...) is replaced by an :class:`AdaptedLayer` that keeps it untouched as ``base_layer`` and
holds any number of named :class:`Adapter` modules of any wrap-style method in ``adapters``. The
layer, not the method, owns the lifecycle: which adapters are active, which are merged, disabling,
and mixed-adapter batches. A method only says what one adapter does to one layer's input/output and
how it folds into the weight.

``forward`` reads top to bottom: (optional input transforms and parameter substitutions) -> base
output -> each active, unmerged adapter updates the output. With no active adapter it is exactly the
base layer.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

BASE_ROWS = "__base__"


class AdapterContext:
    """State shared by every wrapper of one model during a forward pass.

    ``row_names`` is None for an ordinary batch; for a mixed-adapter batch it holds one adapter name
    per row. :meth:`groups` turns it into ``(adapter_name, row_index_tensor)`` pairs once per batch
    size and device (not once per layer); a batch that is a whole multiple of the rows (beam search,
    ``num_return_sequences``) repeats each row's name for its copies.

    ``forward_id`` counts :meth:`peftkit.PeftModel.forward` calls, so that state an adapter records
    during a forward (MoE-LoRA's load-balancing loss) can be told apart from an earlier forward's.
    ``caller_adds_loss_terms`` is True while a trainer that adds every loss term itself runs the forward
    (see :meth:`peftkit.PeftModel.loss_terms_added_by_caller`).

    ``task_ids`` holds the running call's task id per row (``task_ids=`` of :meth:`peftkit.PeftModel.forward`
    or ``generate``), which Poly's layers route by; None without.

    ``in_call`` is True while a :meth:`peftkit.PeftModel.forward` call runs (see :meth:`call`), and
    ``attention_mask`` then holds the call's 2-D ``(batch, seq)`` attention mask in the row order the layers
    see (None without one): what MoE-LoRA's load-balancing loss averages over. A layer running while no call
    does, inside a backward pass (activation checkpointing's recomputation), can tell it is not a new forward
    (:meth:`recomputing`).
    """

    def __init__(self) -> None:
        self.forward_id = 0
        self.caller_adds_loss_terms = False
        self.in_call = False
        self.attention_mask: Tensor | None = None
        self.row_names: list[str] | None = None
        #: the running call's ``task_ids`` ``(batch,)`` int64 (Poly's routing), checked by the model; None without
        self.task_ids: Tensor | None = None
        self.copies = False  # whether a layer may see each row repeated (generate's beams and return sequences)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, Tensor]]] = {}
        self._spans: dict[int, dict[str, slice] | None] = {}

    def set_rows(self, names: list[str] | None, copies: bool = False) -> None:
        """Start a mixed-adapter batch with one adapter name per row (``"__base__"``: no adapter), or end
        it with None; clears the cached row groups either way. With ``copies`` a layer may see each row
        repeated in place (generate's beams, a multiple-choice model's choices): ``k * len(names)`` rows, row
        ``i`` from name ``i // k``."""
        self.row_names, self.copies = names, copies and names is not None
        self._groups = {}
        self._spans = {}

    @contextlib.contextmanager
    def call(self, attention_mask: Any) -> Iterator[None]:
        """Within the block a model call runs (:attr:`in_call`) with ``attention_mask`` (kept when it is a 2-D
        tensor, else None); the previous state comes back afterwards, also after an exception."""
        saved = self.in_call, self.attention_mask
        self.in_call = True
        self.attention_mask = attention_mask if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 else None
        try:
            yield
        finally:
            self.in_call, self.attention_mask = saved

    def recomputing(self) -> bool:
        """Whether a layer running now is recomputed by autograd rather than run by a new forward: no
        :meth:`call` runs and a backward pass does (activation checkpointing, re-entrant or not, recomputes its
        layers inside ``backward()``). A forward outside any ``PeftModel`` call (a model from
        :func:`peftkit.inject_adapter_in_model`, a base model called directly) is a new forward."""
        return not self.in_call and torch._C._current_graph_task_id() != -1

    @contextlib.contextmanager
    def only(self, names: list[str]) -> Iterator[None]:
        """Within the block the batch is ``names`` (the rows of one group, which a wrapper runs on their
        own); the outer batch's names and cached groups come back afterwards."""
        saved = self.row_names, self.copies, self._groups, self._spans
        self.set_rows(names, self.copies)
        try:
            yield
        finally:
            self.row_names, self.copies, self._groups, self._spans = saved

    def spans(self, batch: int) -> dict[str, slice] | None:
        """``{adapter_name: slice of rows}`` when each adapter's rows of a ``batch``-row batch are one
        contiguous run (as :meth:`peftkit.PeftModel.forward` arranges them), else None; the group tensors
        of :meth:`groups` then hold the same rows. Cached per batch size."""
        if batch not in self._spans:
            names = self.row_names or []
            spans: dict[str, slice] | None = None
            if names and batch % len(names) == 0:
                copies, spans, start = batch // len(names), {}, 0
                for i in range(1, len(names) + 1):
                    if i == len(names) or names[i] != names[start]:
                        if names[start] in spans:  # the name comes back after another: not one run
                            spans = None
                            break
                        spans[names[start]] = slice(start * copies, i * copies)
                        start = i
            self._spans[batch] = spans
        return self._spans[batch]

    def groups(self, batch: int, device: torch.device) -> list[tuple[str, Tensor]]:
        """Row groups for a batch of ``batch`` rows: ``(adapter name, row indices (n,) int64 on device)`` in
        order of first appearance, cached per ``(batch, device)``. With ``copies`` (set by :meth:`set_rows`) a
        batch may hold each named row repeated ``batch // len(row_names)`` times in a row (beam search).

        Raises:
            ValueError: ``batch`` does not fit the names (not their number, or, with ``copies``, not a
                multiple of it).
        """
        key = (batch, device)
        if key not in self._groups:
            names = self.row_names or []
            if batch % len(names) or (batch != len(names) and not self.copies):
                raise ValueError(f"adapter_names has {len(names)} entries but a layer saw {batch} rows; give one "
                                 "adapter name (or '__base__') per row")
            copies = batch // len(names)
            rows: dict[str, list[int]] = {}
            for i in range(batch):
                rows.setdefault(names[i // copies], []).append(i)
            self._groups[key] = [(n, torch.tensor(ix, device=device)) for n, ix in rows.items()]
        return self._groups[key]


def trains_with_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` is training with transformers' gradient checkpointing on (a module with
    ``gradient_checkpointing`` set): its checkpointed blocks run again in backward, after the call ended, which
    state that lives only for the call (a soft prompt's cache, a gate's attention mask) does not survive."""
    return model.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False)
                                                               for m in model.modules())


def wide(t: Tensor) -> Tensor:
    """``t`` in the dtype merges compute in: float32, or float64 when ``t`` is float64 (never narrower)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def skipped(adapter: nn.Module, y: Tensor) -> Tensor:
    """``y`` for an adapter that skips this training step (LyCORIS ``module_dropout``, random AdapterDrop), with
    its trainable parameters joined to the graph at weight zero: every parameter then gets a (zero) gradient,
    as multi-process training (DDP) needs, and a step that skips every adapter still has a loss to
    differentiate. Outside autograd it is ``y`` itself."""
    if not torch.is_grad_enabled():
        return y
    params = [p for p in adapter.parameters() if p.requires_grad and p.numel()]
    if not params:
        return y
    return y + 0.0 * sum(p.sum() for p in params).to(y.dtype)


class Adapter(nn.Module):
    """One named adapter of one method on one :class:`AdaptedLayer`.

    Subclasses implement :meth:`forward` and, when ``mergeable``, :meth:`delta_weight` (or override
    :meth:`merge_into`/:meth:`unmerge_from` for non-additive merges such as rescaling).

    Class attributes:
        mergeable: whether :meth:`merge_into` is exact.
        reads_input: whether :meth:`forward` reads the layer's input ``x`` (False: it changes the output ``y``
            from ``y`` alone, as serial bottleneck adapters do, so an input transform merged under it is exact).
        transforms_input: whether :meth:`transform_input` changes the layer's input.
        fuses_base: whether :meth:`fused_forward` may compute the whole layer output when this adapter
            is the only one in use (one autograd node for the base and the adapter).
        substitutes_params: whether :meth:`substitute_params` changes the parameters the base layer
            runs with (selective methods: ``W + delta``); the base module itself is never modified. The merge
            check never counts a substitution as an output rescale: one that scaled the bias would need its own
            flag there.
        substitutes_bias: whether such a substitution may change the base bias (True by default; False for
            one that only replaces the weight, as OFT's rotated convolution kernel does).
        merge_keeps_bias: whether a rescaling merge (not an additive delta) changes the weight alone and never
            reads or rescales the bias (the rotations of HRA and OFT), so stacking it with a bias substitution
            stays exact.
    """

    mergeable: ClassVar[bool] = True
    reads_input: ClassVar[bool] = True
    transforms_input: ClassVar[bool] = False
    fuses_base: ClassVar[bool] = False
    substitutes_params: ClassVar[bool] = False
    substitutes_bias: ClassVar[bool] = True
    merge_keeps_bias: ClassVar[bool] = False

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return the layer output with this adapter applied, given the input ``x`` and output ``y``.

        Shapes: ``x`` as the base layer takes it (``(..., in_features)`` for a linear layer), ``y`` the output
        so far (the base output, plus adapters earlier in the plan), ``(..., out_features)``; same shape out.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError

    def fused_forward(self, layer: AdaptedLayer, x: Tensor) -> Tensor | None:
        """The layer output (base and this adapter) computed in one go, or None to decline."""
        return None

    def transform_input(self, x: Tensor) -> Tensor:
        """Change the input before the base layer sees it (identity by default)."""
        return x

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The parameters the base layer runs with in this forward, keyed by its own parameter names.

        ``params`` holds the replacements made by adapters earlier in the plan (empty for the first);
        parameters not in it are the base layer's own. Returns the updated dict (identity by default).
        """
        return params

    @property
    def saved_form_differs(self) -> bool:
        """Whether this adapter's file holds its trainable parameters in another form than the one they train
        in, so that loading the file back would replace them by that form (diff pruning's dense differences,
        written as their non-zero entries). False by default."""
        return False

    def merge_problem(self) -> str | None:
        """Why merging this adapter now could not be undone (e.g. a zero scale), or None; checked on every
        layer before any layer merges."""
        return None

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:  # pragma: no cover - abstract
        """The additive change to the base weight of ``layer``, in the base weight's layout (e.g. ``(out, in)`` for
        ``nn.Linear``, ``(in, out)`` for GPT-2 ``Conv1D``), in float32.

        Raises:
            NotImplementedError: a subclass that does not override it (an adapter that cannot merge).
        """
        raise NotImplementedError

    def delta_bias(self, layer: AdaptedLayer) -> Tensor | None:
        """The additive change to the base bias of ``layer`` (float32, ``(out,)``), or None when the adapter has
        none (the default)."""
        return None

    def export_state(self) -> dict[str, Tensor]:
        """The tensors written to the adapter file, keyed as in ``state_dict()`` (which is the default).

        A method whose training switches ranks off (AdaLoRA, SoRA) returns only the kept ones; its
        tuner's ``export_config`` then describes those shapes, so that loading builds the adapter compact.
        """
        return self.state_dict()

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Fold the adapter into float32 ``weight``/``bias``; returns the new pair (default: add the deltas).

        Returning a bias when ``bias`` is None gives the base layer a (frozen) bias for as long as
        anything is merged into it; the last :meth:`AdaptedLayer.unmerge` removes it again.
        """
        db = self.delta_bias(layer)
        if db is not None:  # a bias-free base layer gets one while merged (see above)
            bias = db.clone() if bias is None else bias + db
        return weight + self.delta_weight(layer), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Undo :meth:`merge_into` on float32 ``weight``/``bias`` (default: subtract the deltas)."""
        db = self.delta_bias(layer)
        if db is not None and bias is not None:
            bias = bias - db
        return weight - self.delta_weight(layer), bias

    def restore_base(self, layer: AdaptedLayer) -> None:
        """Give the base weight back what creating this adapter took from it, when the adapter goes away
        unmerged (deleted, or ``unload()`` without merging); nothing by default (PiSSA/OLoRA override)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in ("r", "scaling") if hasattr(self, k))


def _additive(adapter: Adapter) -> bool:
    """Whether ``adapter`` only adds a weight (and bias) change, unmerged or merged: mergeable, the default
    merge and no input transform (LoRA and its family; BitFit-like substitutions ``W + delta``, which read the
    base as it is, merged changes included). A bottleneck adapter keeps the default merge but is not
    mergeable: its output is nonlinear in the layer's, so nothing merged may run before it."""
    return adapter.mergeable and type(adapter).merge_into is Adapter.merge_into and not adapter.transforms_input


# the settings of torch's layers that a wrapper answers for its base layer (see AdaptedLayer.__getattr__)
BASE_SETTINGS = frozenset({
    "in_features", "out_features", "nf", "eps", "normalized_shape", "elementwise_affine", "in_channels",
    "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "output_padding",
    "num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse",
    # nn.MultiheadAttention's, which torch's Transformer layers read before choosing their path
    "batch_first", "num_heads", "embed_dim", "kdim", "vdim", "head_dim", "dropout", "add_zero_attn", "bias_k",
    "bias_v", "in_proj_weight", "in_proj_bias", "_qkv_same_embed_dim",
})


# a ModulesToSaveWrapper's own names, never looked up in the module it wraps
_WRAPPER_OWN = frozenset({"original_module", "modules_to_save", "active_adapters", "disabled"})


def _in_merge_mode(method: Callable[..., None]) -> Callable[..., None]:
    """Run an :class:`AdaptedLayer` merge method outside ``torch.inference_mode()`` even when called inside it: the
    tensors a merge creates (a quantised layer's float copy, an untied weight, a bias it gives the layer) would
    otherwise be inference tensors, which the unmerge after the block, or training, cannot write or use. A base
    layer that holds inference tensors itself (a model built inside the block) can only be updated in inference
    mode, so its merges run there (also when called after the block)."""

    @functools.wraps(method)
    def run(self: AdaptedLayer, *args: Any, **kwargs: Any) -> None:
        inference = any(t.is_inference() for t in itertools.chain(self.base_layer.parameters(),
                                                                   self.base_layer.buffers()))
        with torch.inference_mode(inference):
            return method(self, *args, **kwargs)

    return run


@contextlib.contextmanager
def onloaded(adapters: Iterable[nn.Module]) -> Iterator[None]:
    """Run with the tensors of ``adapters`` on their execution device.

    accelerate's hooks (``cpu_offload``, ``dispatch_model`` with a CPU- or disk-offloaded part) keep an
    offloaded module's tensors on the meta device and load them only while that module is called; adapters
    read their parameters (``lora_A.weight``) without calling the modules holding them, and read meta tensors.
    Here each hooked submodule's pre-forward step (loading) runs first and its post-forward step
    (offloading again) after; modules without a hook are left as they are. A hooked adapter itself is called
    without its hook meanwhile (the hook would move the layer passed to it, offloaded tensors and all). Used
    only while the base layer has an instance-level ``forward`` (how accelerate hooks a module), so the
    ordinary path pays nothing.
    """
    adapters = list(adapters)
    hooked = [m for a in adapters for m in a.modules() if getattr(m, "_hf_hook", None) is not None]
    bypassed = {a: vars(a).pop("forward") for a in adapters if a in hooked and "forward" in vars(a)}
    for m in hooked:
        m._hf_hook.pre_forward(m)
    try:
        yield
    finally:
        for m in hooked:
            m._hf_hook.post_forward(m, None)
        for a, forward in bypassed.items():
            a.forward = forward


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
        self._created_bias = False
        self._live_params: dict[str, Tensor] | None = None  # parameter substitutions of the running forward
        self.train(base_layer.training)

    def __getattr__(self, name: str) -> Any:
        """The base layer's settings (``in_features``, a LayerNorm's ``eps``, a convolution's ``kernel_size``, ...:
        :data:`BASE_SETTINGS`), so that code reading them (torch's Transformer layers, model code) finds them on
        the wrapper; other attributes are the wrapper's own."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer") if name in BASE_SETTINGS else None
            if base is None:
                raise
            return getattr(base, name)

    # --- the base weight, in its own layout --------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (``(out, in)`` for Linear, ``(in, out)`` for GPT-2 Conv1D, ...)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias (``(out,)``), or None when it has none."""
        return getattr(self.base_layer, "bias", None)

    @property
    def live_bias(self) -> Tensor | None:
        """The bias the base layer ran with in the forward now running: an adapter's substitute (BitFit's
        ``b + delta``) when one is active, else :attr:`bias`. What an output rescale must leave unscaled."""
        live = self._live_params
        return live["bias"] if live is not None and "bias" in live else self.bias

    # --- adapters ------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> None:
        """Register ``adapter`` under ``name`` (not yet active); it is moved to the base layer's device, to
        float64 when the base weight is float64, and to the layer's train/eval mode.

        Raises:
            ValueError: an adapter ``name`` already exists on this layer.
        """
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        adapter.to(self._device_of_base())
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, Tensor):  # a sub-layer (a parallel adapter's): its first floating parameter
            weight = next((p for p in self.base_layer.parameters() if p.is_floating_point()), None)
        if isinstance(weight, Tensor) and weight.dtype == torch.float64:
            # as peft: a float64 model gets float64 adapters (merged and unmerged then agree to float64
            # round-off); half-precision models keep float32 adapters
            adapter.to(torch.float64)
        adapter.train(self.training)  # an adapter added to a model in eval mode starts in eval mode
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        """Remove adapter ``name``, unmerging it first if it is merged (the other merged adapters stay merged)."""
        self.active_adapters = [a for a in self.active_adapters if a != name]
        if name in self.merged_adapters:
            others, tied = [a for a in self.merged_adapters if a != name], self._tied_weight is not None
            self.unmerge()
            self.adapters.pop(name).restore_base(self)
            self.merge(others, tied=tied)
        else:
            self.adapters.pop(name).restore_base(self)
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
        """The base layer's output on ``x`` with the active adapters applied, in order; the base layer alone
        when disabled or no adapter is active. With per-row adapter names set on the shared
        :class:`AdapterContext` (mixed batches), each group of rows gets its own adapter (a batch of one
        row is broadcast to all names). Shapes are the base layer's (``(..., in) -> (..., out)`` for a
        linear layer); ``args``/``kwargs`` go to the base layer unchanged."""
        ctx = self._ctx
        if ctx is not None and ctx.row_names is not None and not self.disabled:
            rows = len(ctx.row_names) if x.shape[0] == 1 else x.shape[0]  # one row shared by all: broadcast
            if "forward" in vars(self.base_layer):  # accelerate's device hooks: see :func:`onloaded`
                with onloaded(self.adapters.values()):
                    return self._mixed_forward(x, ctx.groups(rows, x.device), args, kwargs)
            return self._mixed_forward(x, ctx.groups(rows, x.device), args, kwargs)
        plan = self._plan
        if self.disabled or not plan:
            return self.base_layer(x, *args, **kwargs)
        if "forward" in vars(self.base_layer):  # accelerate's device hooks: see :func:`onloaded`
            with onloaded(plan):
                return self._run_plan(plan, x, args, kwargs)
        return self._run_plan(plan, x, args, kwargs)

    def base_is_hooked(self) -> bool:
        """Whether calling the base layer does more than its class's ``forward``: it has forward (pre-)hooks or
        backward hooks (e.g. registered on the module before it was adapted), or an instance-level ``forward``
        (accelerate's device hooks). Adapters then call it and leave its output as returned (no fused path, no
        in-place update), so the hooks run and see what they see on the base model, as in peft."""
        base = self.base_layer
        return bool(base._forward_hooks or base._forward_pre_hooks or base._backward_hooks
                    or base._backward_pre_hooks) or "forward" in vars(base)

    def _run_plan(self, plan: Sequence[Adapter], x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        if len(plan) == 1 and plan[0].fuses_base and not args and not kwargs and not self.base_is_hooked():
            out = plan[0].fused_forward(self, x)
            if out is not None:
                return out
        params: dict[str, Tensor] | None = None
        for adapter in plan:
            if adapter.transforms_input:
                x = adapter.transform_input(x)
            if adapter.substitutes_params:
                params = adapter.substitute_params(self, {} if params is None else params)
        if params is None:
            y = self.base_layer(x, *args, **kwargs)
            for adapter in plan:
                y = adapter(self, x, y)
            return y
        y = functional_call(self.base_layer, params, (x, *args), kwargs)
        self._live_params = params  # what :attr:`live_bias` reads while the output adapters run
        try:
            for adapter in plan:
                y = adapter(self, x, y)
        finally:
            self._live_params = None
        return y

    def _mixed_forward(self, x: Tensor, groups: list[tuple[str, Tensor]], args: tuple, kwargs: dict) -> Tensor:
        """Each group of rows gets its own adapter; the base output is computed once for all rows.

        When every adapter involved is of one class offering ``mixed_forward`` (LoRA does), that class
        runs all groups at once; otherwise each group's side path runs on its own rows.
        """
        live = [(n, idx) for n, idx in groups if n in self.adapters and n not in self.merged_adapters]
        own = [(self.adapters[n], idx) for n, idx in live]
        if not own:
            return self.base_layer(x, *args, **kwargs)
        rows = sum(idx.numel() for _, idx in groups)
        broadcast = x.shape[0] != rows  # an input shared by all rows, e.g. position ids (1, seq)
        kind = type(own[0][0])
        # only a class that defines the batched path itself (a subclass such as DoRA changes the maths)
        if not broadcast and "mixed_forward" in vars(kind) and all(type(a) is kind for a, _ in own):
            y = self.base_layer(x, *args, **kwargs)
            spans = self._ctx.spans(rows) if self._ctx is not None else None
            out = kind.mixed_forward(self, x, y, own, None if spans is None else [spans[n] for n, _ in live])
            if out is not None:
                return out
            return self._per_group(own, x, y)
        if broadcast or any(a.transforms_input or a.substitutes_params for a, _ in own):
            parts = [(idx, self._run_plan([self.adapters[name]] if name in self.adapters else [],
                                          x if broadcast else x.index_select(0, idx), args, kwargs))
                     for name, idx in groups]
            return _gather_rows(parts, rows)
        return self._per_group(own, x, self.base_layer(x, *args, **kwargs))

    def _per_group(self, own: list[tuple[Adapter, Tensor]], x: Tensor, y: Tensor) -> Tensor:
        for adapter, idx in own:
            part = adapter(self, x.index_select(0, idx), y.index_select(0, idx))
            y = y.index_copy(0, idx, part)
        return y

    # --- merging -------------------------------------------------------------------------------------
    @_in_merge_mode
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
        # fold in the order the forward applies them: parameter substitutions, output updates in the order of
        # the active adapters (those not active after, as named), then input transforms (last applied first:
        # W T_k ... T_1 multiplies every term that saw the input)
        kind = {n: 0 if self.adapters[n].substitutes_params else 2 if self.adapters[n].transforms_input else 1
                for n in todo}
        rank = {n: self.active_adapters.index(n) if n in self.active_adapters else len(self.active_adapters) + i
                for i, n in enumerate(todo)}
        todo = sorted(todo, key=lambda n: (kind[n], -rank[n] if kind[n] == 2 else rank[n]))
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

    def check_partial_merge(self, names: Iterable[str], dropping: bool = False) -> str | None:
        """Why merging ``names`` now would change this layer's output, or None when it is exact.

        The forward applies the active adapters in order; merging one folds it under those applied before
        it. That is exact when everything before it is merged too, or when both only add a weight change
        (LoRA and its family commute); a rescale (DoRA, (IA)^3, SSF) or an input transform does not commute.
        With ``dropping`` (``merge_and_unload(adapter_names=...)``) the active adapters not in ``names`` are
        about to be removed, so the output to keep is that of the merged ones alone and the others do not count.
        Merging anything into an ``nn.Embedding`` with ``max_norm`` set is never exact (its lookup renormalises
        the table's rows in place).
        """
        merging = {n for n in names if n in self.adapters}
        max_norm = getattr(self.base_layer, "max_norm", None) if isinstance(self.base_layer, nn.Embedding) else None
        if merging and max_norm is not None:
            return (f"its base nn.Embedding has max_norm={max_norm}, which renormalises the rows it looks up, in "
                    "place: a merged table renormalises base plus adapter together (other outputs than the adapted "
                    "layer, which renormalises the base rows alone) and leaves rows that unmerging cannot restore; "
                    "keep the adapter unmerged, or set the embedding's max_norm to None before adapting it")
        # parameter substitutions run first (before the base layer), the output adapters after, in order
        live = sorted((n for n in self.active_adapters if n not in self.merged_adapters
                       and (not dropping or n in merging)),
                      key=lambda n: not self.adapters[n].substitutes_params)
        if not merging & set(live):
            return None
        # not rescales: an adapter with ``merge_keeps_bias`` set (HRA's, OFT's) folds into the weight alone, with no
        # bias to read twice; a substitution that replaces tensors (LN tuning's) merges as it runs
        rescales = [n for n in live if not _additive(self.adapters[n]) and not self.adapters[n].merge_keeps_bias
                    and not self.adapters[n].substitutes_params]
        bias = next((n for n in live if self.adapters[n].substitutes_params and self.adapters[n].substitutes_bias),
                    None)
        if len(rescales) > 1 and bias is not None:  # a rescale then reads a bias another rescale already scaled
            return (f"the merged form of {rescales} stacked on the parameters that {bias!r} substitutes is not "
                    "exact; keep them unmerged, or merge a set of active adapters without one of them")
        for i, m in enumerate(live):
            if not getattr(self.adapters[m], "rescales_around_bias", False):
                continue
            # DoRA rescales the output minus the base bias: a bias change of an adapter before it is rescaled
            # unmerged, but once merged it sits in the bias, which DoRA's merge leaves unscaled
            # (a substituted bias, BitFit's, is the live bias DoRA leaves unscaled, merged or not)
            moved = next((n for n in live[:i] if not self.adapters[n].substitutes_params
                          and self._merge_changes_bias(n)), None)
            if moved is not None:
                return (f"{m!r} ({type(self.adapters[m]).__name__}) rescales the bias change of {moved!r}, which the "
                        f"forward applies before it, while merged weights cannot: merging is not exact here; keep them "
                        "unmerged, or apply the bias-changing adapter after it")
        for i, m in enumerate(live):
            if m not in merging:
                continue
            # every adapter of the layer that reads the input sees the scaled one
            rest = [n for n in live if n not in merging and self.adapters[n].reads_input]
            if self.adapters[m].transforms_input and rest:
                advice = (f"merge {rest[0]!r} too" if self.adapters[rest[0]].mergeable else
                          f"keep {m!r} unmerged ({rest[0]!r} cannot be merged)")
                return (f"merging {m!r}, which transforms the layer's input, while {rest[0]!r} stays unmerged would "
                        f"change the input {rest[0]!r} sees; {advice}")
            for n in live[:i]:  # (an unmerged input transform still scales the input the merged weight sees)
                if (n not in merging and not self.adapters[n].transforms_input
                        and not (_additive(self.adapters[n]) and _additive(self.adapters[m]))
                        # an input transform under an adapter that reads only the output commutes with it
                        and not (self.adapters[m].transforms_input and not self.adapters[n].reads_input)):
                    advice = (f"merge {n!r} too" if self.adapters[n].mergeable else
                              f"keep {m!r} unmerged ({n!r} cannot be merged)")
                    return (f"merging {m!r} while {n!r}, which the forward applies before it, stays unmerged would "
                            f"change the outputs ({type(self.adapters[n]).__name__} and "
                            f"{type(self.adapters[m]).__name__} do not commute); {advice}")
        return None

    @torch.no_grad()
    def _merge_changes_bias(self, name: str) -> bool:
        """Whether merging adapter ``name`` would change the layer's bias (a dry run on copies)."""
        weight = wide(self.weight.detach())
        bias = None if self.bias is None else wide(self.bias.detach())
        _, new_bias = self.adapters[name].merge_into(self, weight, bias)
        return new_bias is not None and (bias is None or not torch.equal(new_bias, bias))

    @torch.no_grad()
    def unmerged_bias(self) -> Tensor:
        """The base bias as it is with nothing merged (a dry run of :meth:`unmerge` on copies; the layer is not
        changed), in the bias's dtype, ``(out,)``; the bias itself when nothing is merged. A trained bias is saved
        with this value."""
        bias = self.base_layer.bias
        if not self.merged_adapters:
            return bias.detach()
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        weight, plain = self.weight.detach().to(dtype), bias.detach().to(dtype)
        for n in reversed(self.merged_adapters):
            weight, plain = self.adapters[n].unmerge_from(self, weight, plain)
        return plain.to(bias.dtype)

    @torch.no_grad()
    def unmerged_base_state(self, given: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The base layer's ``state_dict()`` as :meth:`unmerge` would leave it, computed on copies: the layer and
        the model are not changed (saving while merged writes this, so the file equals one saved unmerged).

        Nothing merged: the base layer's own (detached) tensors. Otherwise ``weight`` and ``bias`` run through each
        merged adapter's ``unmerge_from``, last merged first, in the float type and with the casts of
        :meth:`unmerge` (so the values are bit for bit those an unmerge gives); a tied weight that the merge untied
        is the shared tensor it kept (exact); a bias the merge created is left out; a quantised base's codes were
        never changed (its float copy is not in its state dict).

        Args:
            given: other values for the base's ``weight``/``bias`` to unmerge (a gathered state dict's, which holds
                the merged values), keyed ``"weight"``/``"bias"``; None (default) or a missing key: the live ones.
                A tied weight the merge untied is then taken from ``given["tied"]`` when present.

        Returns:
            ``{name: tensor}`` keyed as ``base_layer.state_dict()``; shapes as there (``weight (out, in)``, an
            embedding's ``(num_embeddings, embedding_dim)``).
        """
        given = dict(given or {})
        state = {k: v.detach() for k, v in self.base_layer.state_dict(keep_vars=True).items()}
        if not self.merged_adapters:
            return {**state, **{k: v for k, v in given.items() if k in state}}
        live_w, live_b = self.weight, self.bias
        dtype = torch.promote_types(live_w.dtype, torch.float32)  # as _fold
        w = given.get("weight", live_w).detach()
        b = None if live_b is None else given.get("bias", live_b).detach()
        for n in reversed(self.merged_adapters):
            new_w, new_b = self.adapters[n].unmerge_from(self, w.to(dtype), None if b is None else b.to(dtype))
            w = new_w.to(live_w.dtype)
            if new_b is not None and b is not None:
                b = new_b.to(live_b.dtype)
        if self._tied_weight is not None:
            w = given.get("tied", self._tied_weight).detach()
        if "weight" in state:
            state["weight"] = w
        if self._created_bias:
            state.pop("bias", None)
        elif "bias" in state and b is not None:
            state["bias"] = b
        return state

    @_in_merge_mode
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
        if self._created_bias:
            self.base_layer.bias = None
            self._created_bias = False
        self._replan()

    @torch.no_grad()
    def _fold(self, fn) -> None:
        weight, bias = self.weight, self.bias
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 model
        new_w, new_b = fn(self, weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        weight.copy_(new_w.to(weight.dtype))
        if new_b is None:
            return
        if bias is None:  # a merge gives a bias-free base layer a bias (e.g. SSF's shift); unmerge removes it
            self.base_layer.bias = nn.Parameter(new_b.to(weight.dtype), requires_grad=False)
            self._created_bias = True
        else:
            bias.copy_(new_b.to(bias.dtype))

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"


def unmerged_base_values(model: nn.Module) -> dict[str, Tensor]:
    """The values, with nothing merged, of the base weights and biases that merged adapters changed, keyed as in
    ``model.named_parameters()`` (``<layer path>.base_layer.weight``), computed on copies
    (:meth:`AdaptedLayer.unmerged_base_state`); ``model`` is not changed. A bias a merge created is not listed.
    Training checkpoints write these in place of the live values, so that they hold what saving unmerged holds."""
    out: dict[str, Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, AdaptedLayer) and m.merged_adapters:
            pre = f"{path}.base_layer." if path else "base_layer."
            state = m.unmerged_base_state()
            out.update({pre + k: state[k] for k in ("weight", "bias") if k in state})
    return out


@contextlib.contextmanager
def unmerged_for_load(model: nn.Module) -> Iterator[None]:
    """Run a block that copies unmerged values (a training checkpoint's) into ``model``'s parameters with its merged
    adapters unmerged, and merge them again after (also when the block raises)."""
    host = getattr(model, "base_model", None)
    merged = host.merged_adapters() if callable(getattr(host, "merged_adapters", None)) else []
    if merged:
        host.unmerge()
    try:
        yield
    finally:
        if merged:
            host.merge(merged)


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
        self.train(module.training)

    def add(self, name: str) -> None:
        """Create the copy for adapter ``name`` from the original module."""
        if name not in self.modules_to_save:
            # adapted layers inside the copy (another adapter's LoRA on this module) keep the model's shared
            # context, so that they too see the rows of a mixed-adapter batch
            memo = {} if self._ctx is None else {id(self._ctx): self._ctx}
            self.modules_to_save[name] = copy.deepcopy(self.original_module, memo)

    def remove(self, name: str) -> None:
        """Drop adapter ``name``'s trained copy and deactivate it (nothing happens for an unknown name)."""
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        """Make ``names`` (those with a copy here) the active adapters, in order. Outside mixed-adapter
        batches only the first one's copy runs (the original module when none is active)."""
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def __getattr__(self, name: str) -> Any:
        """An attribute the wrapper lacks comes from the module that runs now (the active copy, else the original),
        as in peft: code reading a module's settings or tensors (torch's Transformer layers read a LayerNorm's
        ``eps``, an attention's ``batch_first`` and ``out_proj.weight``) sees that module's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if (name.startswith("_") and name not in BASE_SETTINGS) or name in _WRAPPER_OWN:
                raise
            state = self.__dict__
            if "active_adapters" not in state or "disabled" not in state:  # still being built
                raise
            active = state["active_adapters"]
            return getattr(self._pick(active[0] if active else None), name)

    def _pick(self, name: str | None) -> nn.Module:
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The first active adapter's trained copy of the module on the arguments ``args``/``kwargs`` (the original module when
        none is active); with per-row adapter names set (mixed batches), each group of rows runs through its
        own adapter's copy and the outputs are put back in row order. The original module runs when the
        wrapper is disabled."""
        ctx = self._ctx
        if ctx is not None and ctx.row_names is not None and not self.disabled:
            return self._mixed_forward(ctx, args, kwargs)
        return self._pick(self.active_adapters[0] if self.active_adapters else None)(*args, **kwargs)

    def _mixed_forward(self, ctx: AdapterContext, args: tuple, kwargs: dict) -> Any:
        """Each row group through its adapter's copy (``__base__`` rows through the original). Tensor
        arguments (also inside tuples, e.g. rotary ``(cos, sin)``) with one row per batch row are split
        by rows; a single-row tensor (e.g. position ids shared by all rows) is given whole to every group
        and its output repeated for the group's rows; outputs (tensors or tuples of them) are put back in
        row order.

        Raises:
            ValueError: an argument that cannot be split by rows (a KV cache object: pass
                ``use_cache=False``) or an output that is neither a tensor nor a tuple of them.
        """
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.dim() > 0), None)
        if first is None:
            raise ValueError("a modules_to_save copy in a mixed-adapter batch got no tensor input to split by rows")
        rows = len(ctx.row_names) if first.shape[0] == 1 else first.shape[0]
        groups = ctx.groups(rows, first.device)
        batch = first.shape[0]
        parts = []
        for name, idx in groups:
            # the module run may hold adapted layers itself (the original module can carry another
            # adapter's LoRA): within the call the batch is this group's rows alone
            with ctx.only([name] * idx.numel()):
                parts.append((idx, self._pick(name)(*_split_rows(args, idx, batch),
                                                    **{k: _split_rows(v, idx, batch) for k, v in kwargs.items()})))
        return _gather_rows(parts, rows)


def _split_rows(value: Any, idx: Tensor, batch: int) -> Any:
    """The rows ``idx`` of a call argument: tensors with ``batch`` (> 1) rows are indexed, also inside
    tuples/lists; anything else passes whole. Raises ValueError for an object that cannot be split."""
    if isinstance(value, Tensor):
        return value.index_select(0, idx) if value.dim() and value.shape[0] == batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_split_rows(v, idx, batch) for v in value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    raise ValueError(f"a modules_to_save copy in a mixed-adapter batch got a {type(value).__name__} argument, "
                     "which cannot be split by rows (a KV cache: pass use_cache=False)")


def _gather_rows(parts: list[tuple[Tensor, Any]], rows: int) -> Any:
    """Outputs of row groups (``(row_index, output)``) put together in row order; a single-row tensor
    output (the group ran on a shared input) is repeated for the group's rows."""
    first = parts[0][1]
    if isinstance(first, Tensor):
        out = first.new_empty((rows, *first.shape[1:]))
        for idx, part in parts:
            part = part.expand(idx.numel(), *part.shape[1:]) if part.shape[0] == 1 else part
            out = out.index_copy(0, idx, part)
        return out
    if isinstance(first, (tuple, list)):
        return type(first)(_gather_rows([(idx, part[i]) for idx, part in parts], rows) for i in range(len(first)))
    if first is None:
        return None
    raise ValueError(f"a modules_to_save copy in a mixed-adapter batch returned a {type(first).__name__}; only "
                     "tensors and tuples of tensors can be put back in row order")


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
    """Put ``new`` where module ``name`` is (works inside ``nn.ModuleList``/``nn.Sequential`` too).

    A torch ``nn.TransformerEncoderLayer``/``DecoderLayer`` around ``name`` gets a no-op forward pre-hook, which
    turns off its eval-mode fast path: that path reads its sub-layers' weights directly instead of calling
    them, so a wrapped (adapted, quantised, copied) sub-layer would be skipped; an ``nn.TransformerEncoder``
    around it stops converting padded inputs to nested tensors, which only the fast path takes. Both stay
    after the original module is put back (the regular path gives the same outputs)."""
    parent, child = get_submodule_parent(model, name)
    while isinstance(parent, AdaptedLayer) and child not in parent._modules:
        parent = parent.base_layer  # a module inside a wrapped sub-layer (see SublayerLayer.__getattr__)
    setattr(parent, child, new)
    _regular_path_for_torch_transformer_layers(model, name)


def _regular_path_for_torch_transformer_layers(model: nn.Module, name: str) -> None:
    """Give each torch Transformer layer around module ``name`` a no-op forward pre-hook (once): torch skips its
    fast path for a layer with hooks."""
    parts = name.split(".")
    for i in range(len(parts)):  # the model itself (i = 0) and every module around ``name``
        try:
            outer = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        if isinstance(outer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not getattr(
                outer, "_peftkit_regular_path", False):
            outer.register_forward_pre_hook(_no_op_hook)
            outer._peftkit_regular_path = True
        if isinstance(outer, nn.TransformerEncoder):  # its nested-tensor input is for the fast path only
            outer.use_nested_tensor = False


def _no_op_hook(module: nn.Module, args: tuple) -> None:
    return None
