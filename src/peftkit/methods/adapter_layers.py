"""The modules of bottleneck adapters: the bottleneck itself, Compacter's PHM layer, and the wrapper
of a whole sub-layer that parallel adapters sit beside.

Papers: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", 2019, arXiv:1902.00751;
He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", 2021, arXiv:2110.04366;
Mahabadi et al., "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", 2021, arXiv:2106.04647;
Rücklé et al., "AdapterDrop: On the Efficiency of Adapters in Transformers", 2020, arXiv:2010.11918.

Bottleneck: ``A(h) = s * W_up f(W_down LN?(h) + b_down) + b_up`` with ``W_down: (m, d)``, ``W_up: (d, m)``.
A serial adapter maps a sub-layer output ``u`` to ``u + A(u)``; a parallel one adds ``A(x)`` of the
sub-layer's input ``x`` to its output. A serial adapter at a post-LN block's Add & Norm (AdapterHub's
``original_ln_before=True``, Pfeiffer et al. 2020, arXiv:2005.00247) wraps that LayerNorm: with
``z = u + x`` (sub-layer output plus residual) and ``h = LN(z)`` it gives ``LN(z + A(h))``, which is
AdapterHub's ``LN((u + A(h)) + x)``: the transformer's own LayerNorm before and after the adapter. On a pre-LN
block (GPT-2, Llama, ...) AdapterHub's placement gives ``x + u + A(x + u)``, and ``x + u`` is the block's output
``z``: the adapter wraps the whole block (a :class:`SublayerLayer`) and maps ``z`` to ``z + A(z)``. A PHM layer
builds its ``(in, out)`` matrix as
``H = sum_i phm_rule[i] (x) (W_left[i] @ W_right[i])`` (Kronecker products with ``n`` shared
``n x n`` rule matrices and rank-``r`` factors).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from peftkit.layers import AdaptedLayer, Adapter, skipped
from peftkit.ops import Dropout


def gelu_tanh(t: Tensor) -> Tensor:
    """GELU with the tanh approximation (transformers' ``gelu_new``), elementwise on ``t`` (any shape)."""
    return F.gelu(t, approximate="tanh")


def identity(t: Tensor) -> Tensor:
    """``t`` itself (no non-linearity)."""
    return t


# module-level functions, not lambdas: a model holding them pickles (torch.save(model))
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_tanh, "silu": F.silu,
    "swish": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": identity,
}


#: where a serial adapter sits (see :class:`BottleneckAdapter`): an output projection (None), a post-LN
#: block's Add & Norm LayerNorm, run again after the adapter ("add_norm") or not ("after_norm"), or the output
#: of a whole pre-LN block ("layer")
NORM_SITES = (None, "add_norm", "after_norm", "layer")


class DropState:
    """Which blocks' adapters the robust AdapterDrop skips in the current training step.

    ``n`` is redrawn uniformly from ``{0, ..., max_layers}`` after every optimiser step; adapters in
    blocks ``< n`` are skipped while the model is in training mode. All adapters of one injected
    adapter share one state, so a step drops the same blocks everywhere; on several processes every rank
    takes rank 0's draw (:meth:`share_rank0`).
    """

    def __init__(self, max_layers: int) -> None:
        self.max_layers = max_layers
        self.n = 0
        self.redraw()

    def redraw(self) -> None:
        """Draw a new ``n`` from torch's global generator (seeded by the trainer)."""
        self.n = int(torch.randint(0, self.max_layers + 1, (1,)).item())

    def share_rank0(self) -> None:
        """Take rank 0's ``n`` on every rank of a running process group (DDP, FSDP): each rank's generator is
        seeded apart (its dropout masks differ), but a step must drop the same blocks everywhere, as one process
        with the whole batch would. Nothing to do in a single process or a group of one.

        A collective broadcast on the default process group (a CPU tensor on gloo, the current CUDA device on
        NCCL): it blocks until every rank of the group calls it, so every rank must call it once per optimiser
        step (``PeftModel.peft_step_end`` does, which peftkit's trainers call on every rank).

        Raises:
            RuntimeError: from ``torch.distributed`` when the broadcast fails (a rank gone, a timeout).
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        nccl = dist.get_backend() == "nccl"
        n = torch.tensor([self.n], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        dist.broadcast(n, src=0)
        self.n = int(n.item())


class PHMLinear(nn.Module):
    """A parameterised-hypercomplex-multiplication layer ``y = x @ H + b`` (Compacter's projections).

    ``H = sum_i kron(phm_rule[i], W_left[i] @ W_right[i])``, shape ``(in, out)``.

    Args:
        in_features / out_features: both divisible by ``n``.
        rule: the shared ``(n, n, n)`` rule parameter (the same object in every layer of an adapter).
        rank: ``r``, the rank of each ``W_i``. Trainable (own) parameters: ``r * (in + out) + out``.
        zero: start with ``W_right = 0`` (so ``H = 0``; used for the up-projection).

    Shapes: ``x: (..., in) -> (..., out)``; ``W_left: (n, in/n, r)``, ``W_right: (n, r, out/n)``.
    """

    def __init__(self, in_features: int, out_features: int, rule: nn.Parameter, rank: int, zero: bool) -> None:
        super().__init__()
        n = rule.shape[0]
        self.phm_rule = rule
        self.W_left = nn.Parameter(torch.randn(n, in_features // n, rank) / math.sqrt(in_features))
        right = torch.zeros if zero else torch.randn
        self.W_right = nn.Parameter(right(n, rank, out_features // n) / math.sqrt(rank))
        self.b = nn.Parameter(torch.zeros(out_features))

    def matrix(self) -> Tensor:
        """``H``, shape ``(in, out)``."""
        n, p, q = self.phm_rule.shape[0], self.W_left.shape[1], self.W_right.shape[2]
        w = torch.bmm(self.W_left, self.W_right)  # (n, in/n, out/n)
        return torch.einsum("kab,kij->aibj", self.phm_rule, w).reshape(n * p, n * q)

    def forward(self, x: Tensor) -> Tensor:
        """``x H + b``: ``x: (..., in) -> (..., out)``."""
        return torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.matrix()).reshape(*x.shape[:-1], -1)


class BottleneckAdapter(Adapter):
    """One bottleneck adapter at one site; serial on an output projection, or parallel beside a sub-layer.

    Args:
        width: ``d``, the hidden size at the site. bottleneck: ``m``.
        non_linearity: a key of :data:`ACTIVATIONS`. scaling: ``s``. dropout: on the bottleneck.
        ln_before: a LayerNorm on the adapter's input. residual_before_ln: the serial skip carries the
            input before that LayerNorm (True) or after it.
        init_weights: ``"identity"`` (Kaiming-uniform down, zero up: exactly the identity at step 0, unless
            a LayerNorm comes before the adapter and the skip is taken after it) or ``"bert"`` (both
            N(0, 0.01^2), zero biases: close to the identity).
        rule / phm_rank: with a shared PHM rule the projections are :class:`PHMLinear` (Compacter).
        block: the transformer block index of the site (None if unknown). drop: the robust AdapterDrop
            state, or None.
        norm_site: where a serial adapter sits. None (default): on an output projection, ``y + A(y)``.
            ``"add_norm"``: on a post-LN block's Add & Norm LayerNorm (AdapterHub's ``original_ln_before`` and
            ``original_ln_after``): the layer's input ``z`` and output ``h = LN(z)`` give ``LN(z + A(h))``.
            ``"after_norm"``: on that LayerNorm without the second pass (``original_ln_after=False``):
            ``h + A(h)``. ``"layer"``: on a whole pre-LN block (wrapped by :class:`SublayerLayer`), whose
            output ``z = x + u`` (residual plus FFN output) becomes ``z + A(z)`` (AdapterHub's Pfeiffer placement
            there, ``x + u + A(x + u)``).

    Shapes: ``(..., d) -> (..., d)``. Trainable parameters: ``2 d m + m + d`` (plain) or
    ``2 r (d + m) + m + d`` (PHM, plus the shared ``n^3`` once per adapter); ``+ 2 d`` with ``ln_before``.
    """

    mergeable = False

    reads_input = False  # serial: the output y alone (a parallel adapter's wrapper runs it on its own)

    def __init__(self, width: int, bottleneck: int, non_linearity: str, scaling: float, dropout: float,
                 ln_before: bool, residual_before_ln: bool, init_weights: str, rule: nn.Parameter | None = None,
                 phm_rank: int = 1, block: int | None = None, drop: DropState | None = None,
                 norm_site: str | None = None) -> None:
        super().__init__()
        if norm_site not in NORM_SITES:
            raise ValueError(f"norm_site={norm_site!r} is not valid; expected one of {NORM_SITES}")
        self.norm_site = norm_site
        #: whether a :class:`SublayerLayer` runs it on the wrapped module's output (serial) rather than beside it
        self.on_output = norm_site == "layer"
        # at an Add & Norm the layer's input z (sub-layer output plus residual) is read again
        self.reads_input = norm_site == "add_norm"
        self.scaling, self.residual_before_ln = scaling, residual_before_ln
        self.width, self.r = width, bottleneck
        self.block, self.drop = block, drop
        self.act = ACTIVATIONS[non_linearity]
        self.adapter_norm = nn.LayerNorm(width) if ln_before else None
        self.adapter_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        if rule is not None:
            self.adapter_down: nn.Module = PHMLinear(width, bottleneck, rule, phm_rank, zero=False)
            self.adapter_up: nn.Module = PHMLinear(bottleneck, width, rule, phm_rank, zero=init_weights == "identity")
        else:
            self.adapter_down = nn.Linear(width, bottleneck)
            self.adapter_up = nn.Linear(bottleneck, width)
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        if init_weights == "bert":
            with torch.no_grad():
                for p in self._own_parameters():
                    p.normal_(0.0, 0.01) if p.dim() > 1 else p.zero_()

    def _own_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if "phm_rule" not in n and "adapter_norm" not in n]

    @property
    def dropped(self) -> bool:
        """Whether robust AdapterDrop skips this adapter in the current training step: in training mode, while the
        adapter itself trains (a frozen one, e.g. loaded for a fusion or active beside the adapter in training, is
        always applied: its draw is never renewed, and what trains beside it must see it as it is used)."""
        return (self.drop is not None and self.training and self.block is not None and self.block < self.drop.n
                and next(self.adapter_up.parameters()).requires_grad)

    def bottleneck(self, h: Tensor) -> Tensor:
        """``s * up(dropout(f(down(h))))``, in the adapter's dtype; ``h`` is already normalised."""
        return self.adapter_up(self.adapter_dropout(self.act(self.adapter_down(h)))) * self.scaling

    def _normed(self, x: Tensor) -> Tensor:
        h = x.to(next(self.adapter_up.parameters()).dtype)
        return h if self.adapter_norm is None else self.adapter_norm(h)

    def delta(self, x: Tensor) -> Tensor:
        """The parallel branch ``A(x)`` (no skip), cast to ``x``'s dtype."""
        return self.bottleneck(self._normed(x)).to(x.dtype)

    def change(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        """What the serial adapter adds to ``y`` before :meth:`finish` (AdapterFusion weighs these): on a
        projection the output's change ``forward(layer, x, y) - y``; at an Add & Norm site ``A(y)``, which joins
        the LayerNorm's input. In ``y``'s dtype; zero (joined to the graph) when AdapterDrop skips the adapter.

        Shapes: ``x``: the wrapped layer's input, ``y``: its output so far, ``(..., d)``; out ``(..., d)``.
        """
        if self.norm_site is None or self.dropped:
            return self(layer, x, y) - y
        return self.bottleneck(self._normed(y)).to(y.dtype)

    def finish(self, layer: AdaptedLayer, x: Tensor, y: Tensor, change: Tensor) -> Tensor:
        """The layer's output given a (possibly fused) ``change``: ``y + change``, or at an ``"add_norm"`` site
        ``LN(x + change)`` with the wrapped LayerNorm and the parameters it runs with in this forward."""
        if self.norm_site != "add_norm":
            return y + change
        params = layer._live_params  # another adapter's substitutes for the LayerNorm's own (LN tuning)
        z = x + change
        return layer.base_layer(z) if params is None else functional_call(layer.base_layer, params, (z,))

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        """Serial use: the wrapped projection's output ``y`` becomes ``skip(y) + A(y)``; at an Add & Norm
        LayerNorm with input ``x = z`` and output ``y = LN(z)``, ``LN(z + A(y))``; on a block's output
        ``y = z``, ``z + A(z)`` (see ``norm_site``)."""
        if self.dropped:
            return skipped(self, y)
        if self.norm_site is not None:
            return self.finish(layer, x, y, self.bottleneck(self._normed(y)).to(y.dtype))
        h = self._normed(y)
        skip = y if self.adapter_norm is None or self.residual_before_ln else h.to(y.dtype)
        return skip + self.bottleneck(h).to(y.dtype)

    def extra_repr(self) -> str:
        site = f", norm_site={self.norm_site}" if self.norm_site else ""
        return f"width={self.width}, bottleneck={self.r}, scaling={self.scaling}, block={self.block}{site}"


class SublayerLayer(AdaptedLayer):
    """A whole attention or feed-forward sub-layer wrapped for parallel adapters, or a whole pre-LN block
    wrapped for serial adapters on its output.

    Two calling conventions are handled, found from the wrapped module's signature:

    * *output* (pre-LN decoders, GPT-2 ``attn``/``mlp``, Llama ``self_attn``/``mlp``): the input is the
      first positional argument or ``hidden_states=``; each adapter adds ``A(x)`` to the output (the
      first element when the module returns a tuple).
    * *residual* (post-LN BERT-family ``BertSelfOutput``/``BertOutput``, whose forward takes
      ``(hidden_states, input_tensor)`` and returns ``LayerNorm(f(hidden_states) + input_tensor)``): the
      sub-layer's input is ``input_tensor``; it becomes ``input_tensor + A(input_tensor)``, so the adapter
      output joins the residual sum before the LayerNorm.

    Serial adapters here (``on_output``: a :class:`BottleneckAdapter` with ``norm_site="layer"``, or a fusion
    of them) run on the output after the parallel branches, in order: a pre-LN block's output ``z`` (its
    hidden states, the first element of a tuple output) becomes ``z + A(z)``; the rest of a tuple (attention
    weights, a cache) passes unchanged, and the wrapped module, with its gradient checkpointing and cache
    handling, runs as it would unwrapped.

    Nothing merges here; other methods' layers inside the sub-layer keep working, added before or after it.

    Args:
        base_layer: the attention or feed-forward sub-layer module; its ``forward`` signature decides the
            convention (*residual* when it takes ``input_tensor``).
    """

    #: the modules inside the sub-layer stay targets of other adapters, under their own names
    #: (``attention.output.dense``): see :func:`peftkit.targeting.iter_logical_modules`
    holds_adaptable_modules = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.residual_arg = "input_tensor" in inspect.signature(base_layer.forward).parameters

    def __getattr__(self, name: str) -> Any:
        """A module of the wrapped sub-layer by its own name (``get_submodule("attention.output.dense")``
        finds the ``dense`` inside the wrapped ``attention.output``), after the wrapper's own attributes."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is not None and name in base._modules:
                return base._modules[name]
            raise

    @property
    def weight(self) -> None:  # type: ignore[override]
        """None: a sub-layer has no single weight to merge into."""
        return None

    @property
    def bias(self) -> None:  # type: ignore[override]
        """None: a sub-layer has no single bias either."""
        return None

    def _jobs(self, args: tuple, kwargs: dict) -> list[tuple[BottleneckAdapter, Tensor | None]]:
        ctx = self._ctx
        if self.disabled:
            return []
        if ctx is not None and ctx.row_names is not None:
            x = next(v for v in (*args, *kwargs.values()) if isinstance(v, Tensor))
            return [(self.adapters[n], idx) for n, idx in ctx.groups(x.shape[0], x.device) if n in self.adapters]
        return [(a, None) for a in self._plan]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The sub-layer's output (same structure and shapes as the wrapped module's: ``(batch, seq, hidden)``
        or a tuple starting with it) with the active adapters' branches added; adapters AdapterDrop skips in
        this step join the graph at weight zero. Arguments go to the wrapped module."""
        planned = self._jobs(args, kwargs)
        jobs = [(a, idx) for a, idx in planned if not getattr(a, "dropped", False)]  # (a fusion never drops)
        if len(jobs) < len(planned):  # the dropped ones join the graph at weight zero (see layers.skipped)
            out = self.forward_jobs(jobs, args, kwargs) if jobs else self.base_layer(*args, **kwargs)
            for a, _ in planned:
                if getattr(a, "dropped", False):
                    out = _on_output(out, lambda t, a=a: skipped(a, t))
            return out
        return self.forward_jobs(jobs, args, kwargs)

    def forward_jobs(self, jobs: list[tuple[BottleneckAdapter, Tensor | None]], args: tuple, kwargs: dict) -> Any:
        """The sub-layer's output with ``jobs``' parallel branches added, then its serial (``on_output``) adapters
        applied (the base output when there are none).

        ``jobs``: ``(adapter, row indices or None)`` pairs (None: all rows); ``args``/``kwargs``: the call's.

        Raises:
            TypeError: a parallel adapter's sub-layer was called without its input (no positional argument and
                no ``hidden_states=``).
            ValueError: the input's leading dimensions differ from the output's (e.g. a pooler, ``(batch, seq,
                d) -> (batch, d)``), so ``A(x)`` cannot be added.
        """
        beside = [(a, idx) for a, idx in jobs if not getattr(a, "on_output", False)]
        after = [(a, idx) for a, idx in jobs if getattr(a, "on_output", False)]
        x = args[0] if args else kwargs.get("hidden_states")
        if not beside:
            out = self.base_layer(*args, **kwargs)
        elif self.residual_arg:
            if len(args) > 1:
                args = (args[0], _add_branches(beside, args[1], args[1]), *args[2:])
            else:
                kwargs["input_tensor"] = _add_branches(beside, kwargs["input_tensor"], kwargs["input_tensor"])
            out = self.base_layer(*args, **kwargs)
        else:
            if not isinstance(x, Tensor):
                raise TypeError(f"{type(self.base_layer).__name__} was called without a positional input or "
                                "hidden_states=; a parallel adapter cannot find the sub-layer's input")
            out = _on_output(self.base_layer(*args, **kwargs), lambda t: _add_branches(beside, x, t))
        return _on_output(out, lambda t: _recorded_as(t, self._run_serial(after, x, t))) if after else out

    def _run_serial(self, jobs: list[tuple[BottleneckAdapter, Tensor | None]], x: Any, y: Tensor) -> Tensor:
        """``y`` through each serial adapter of ``jobs`` in turn, each on its rows only (all when None)."""
        for adapter, idx in jobs:
            if idx is None:
                y = adapter(self, x, y)
                continue
            rows = x.index_select(0, idx) if isinstance(x, Tensor) and x.shape[0] == y.shape[0] else x
            y = y.index_copy(0, idx, adapter(self, rows, y.index_select(0, idx)).to(y.dtype))
        return y


def _recorded_as(before: Tensor, after: Tensor) -> Tensor:
    """``after``, also put in ``before``'s place among the hidden states transformers is collecting for
    ``output_hidden_states=True``, if it holds ``before``. transformers (5.x) records them with forward hooks on
    the block class, so the hook on a wrapped block saw its output before the serial adapters ran; the next block
    reads ``after``, and so must the recorded state."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older transformers, which collects the hidden states the blocks return
        return after
    collected = _active_collector.get()
    states = collected.get("hidden_states") if isinstance(collected, dict) else None
    if isinstance(states, list):
        for i in range(len(states) - 1, max(-1, len(states) - 3), -1):  # the block's own entry is among the last
            if states[i] is before:
                states[i] = after
                break
    return after


def _on_output(out: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to a sub-layer's output tensor (the first element of a tuple output)."""
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def _add_branches(jobs: list[tuple[BottleneckAdapter, Tensor | None]], x: Tensor, out: Tensor) -> Tensor:
    """``out + sum_j A_j(x)``, each ``A_j`` on its rows only (all rows when its index is None)."""
    for adapter, idx in jobs:
        if x.shape[:-1] != out.shape[:-1]:  # e.g. a pooler: (batch, length, d) in, (batch, d) out
            raise ValueError(f"a parallel adapter adds A(x) of the sub-layer's input {tuple(x.shape)} to its output, "
                             f"but the sub-layer's output has shape {tuple(out.shape)}; target a sub-layer whose "
                             "output has its input's shape (a block's whole attention or MLP module)")
        if idx is None:
            out = out + adapter.delta(x)
        else:
            out = out.index_add(0, idx, adapter.delta(x.index_select(0, idx)).to(out.dtype))
    return out
