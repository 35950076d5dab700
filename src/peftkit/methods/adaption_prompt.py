"""LLaMA-Adapter: learnable adaption prompts with a zero-initialised gate in the top attention layers.

Paper: Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention", 2023,
arXiv:2303.16199.

Equation, per adapted attention layer with ``P`` the layer's ``(L, d)`` adaption prompt, ``g`` its gate and
``q_t`` the rotated query of token ``t`` (``H`` heads of width ``d_h``):
``y_t <- y_t + W_o concat_h(g * softmax(q_t^h (P W_k^h)^T / sqrt(d_h)) P W_v^h)``. The prompt's keys and values
come from the layer's own (frozen) key and value projections, carry no rotary position, and are seen by every
token whatever the attention mask; the prompt has its own softmax, so at ``g = 0`` (the initialisation) the
model is exactly the base model. Trainable parameters: ``adapter_layers * (adapter_len * hidden_size + 1)``.

Field names, defaults, the supported model types and the file layout (``adaption_prompt``, shape
``(1, adapter_len, hidden_size)``, and ``adaption_gate``, shape ``(1,)``, under each adapted attention module's
name) are peft's ``AdaptionPromptConfig``, so adapters move both ways for Llama, Mistral and GPT-2. peftkit also
adapts Qwen2, whose attention computes as Llama's (peft 0.21.2 refuses its model type). As in peft, on GPT-2 the
prompt's keys and values come from ``c_attn`` and the prompt's output is added after the output projection
``c_proj`` (it does not go through it); on the Llama family it goes through ``o_proj``. Not mergeable: the
output is not a fixed change of the weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.methods.adapter_layers import SublayerLayer, _on_output
from peftkit.methods.adapters import model_type
from peftkit.targeting import iter_logical_modules
from peftkit.tuners import WrapTuner

ADAPTION_PROMPT_PAPER = ("LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention "
                         "(Zhang et al., 2023, arXiv:2303.16199)")

#: ``model_type -> (default target_modules, attention style)``: peft's table (llama, mistral, gpt2) plus qwen2,
#: whose attention computes as Llama's. ``"llama"`` style: q/k/v/o projections and rotary queries; ``"gpt2"``: a
#: fused ``c_attn`` and no rotary positions.
ADAPTION_PROMPT_MODELS: dict[str, tuple[str, str]] = {
    "llama": ("self_attn", "llama"),
    "mistral": ("self_attn", "llama"),
    "qwen2": ("self_attn", "llama"),
    "gpt2": ("attn", "gpt2"),
}

# the modules each attention style reads from the attention it wraps
_NEEDS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"), "gpt2": ("c_attn",)}


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of LLaMA-Adapter's adaption prompts (field names as ``peft.AdaptionPromptConfig``).

    Args:
        target_modules: the name of the attention sub-module of each decoder block (a module is adapted when its
            dotted name ends with ``"." + target_modules``); None (default) takes the model type's
            (:data:`ADAPTION_PROMPT_MODELS`: ``"self_attn"``, GPT-2's ``"attn"``), written into the config when the
            adapter is added, as peft does.
        adapter_len: ``L``, the number of prompt tokens per adapted layer (required; the paper uses 10).
        adapter_layers: how many attention layers, counted from the top (the last ones), get a prompt; required
            by peft. None (a peftkit extension, the command line's default) adapts every layer and writes that
            number into the config when the adapter is added, so the saved file is one peft reads.

    Shapes: ``adaption_prompt: (1, L, hidden_size)`` drawn from N(0, 1) (as peft and the paper's code);
    ``adaption_gate: (1,)`` zero. Trainable parameters: ``adapter_layers * (L * hidden_size + 1)``.

    Raises:
        ConfigError: ``adapter_len`` missing or not a positive integer, ``adapter_layers`` not a positive integer
            (or None), ``target_modules`` not a non-empty module name; when the adapter is added, a model type
            other than :data:`ADAPTION_PROMPT_MODELS` (encoders, encoder-decoders and other decoders), no module
            named ``target_modules``, or more ``adapter_layers`` than the model has such modules.

    Paper: LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention (Zhang et al., 2023,
        arXiv:2303.16199).
    """

    peft_type = "ADAPTION_PROMPT"
    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def validate(self) -> None:
        check(self.adapter_len is not None, "adapter_len=None: give the number of adaption prompt tokens per adapted "
                                            "layer, a positive integer (the paper uses 10)")
        check(self.adapter_len >= 1, f"adapter_len={self.adapter_len!r} is not valid; expected a positive integer "
                                     "(the number of prompt tokens per layer; the paper uses 10)")
        check(self.adapter_layers is None or self.adapter_layers >= 1,
              f"adapter_layers={self.adapter_layers!r} is not valid; expected a positive integer (how many attention "
              "layers, from the top, get a prompt) or None for all of them")
        check(self.target_modules is None or (self.target_modules.strip() != "" and not self.target_modules.startswith(".")
                                              and not self.target_modules.endswith(".")),
              f"target_modules={self.target_modules!r} is not valid; expected the attention sub-module's name (e.g. "
              "'self_attn'), or None for the model type's")


def _rotate_half(t: Tensor) -> Tensor:
    """``(-t2, t1)`` for the halves ``t1, t2`` of the last dimension (the rotary embedding's rotation); any shape."""
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rows(t: Tensor, idx: Tensor | None, batch: int) -> Tensor:
    """Rows ``idx`` of ``t`` when it has one per batch row (``batch`` of them), else ``t`` (shared by all rows)."""
    return t if idx is None or t.shape[0] != batch else t.index_select(0, idx)


class AdaptionPromptAdapter(Adapter):
    """One layer's adaption prompt and gate.

    Args:
        style: ``"llama"`` (q/k/v/o projections, rotary queries) or ``"gpt2"`` (``c_attn``, no rotation).
        adapter_len: ``L``. hidden_size: ``d``, the model's hidden size.

    Shapes: ``adaption_prompt: (1, L, d)``, ``adaption_gate: (1,)``; :meth:`delta` maps the attention's input
    ``(batch, seq, d)`` to the change of its output, ``(batch, seq, d)``.
    """

    mergeable = False

    def __init__(self, style: str, adapter_len: int, hidden_size: int) -> None:
        super().__init__()
        if style not in _NEEDS:
            raise ValueError(f"style={style!r} is not valid; expected one of {sorted(_NEEDS)}")
        self.style, self.adapter_len = style, adapter_len
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, hidden_size))
        self.adaption_gate = nn.Parameter(torch.zeros(1))

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor, position_embeddings: Any = None,
                scope: Callable[[int], AbstractContextManager] | None = None) -> Tensor:
        """``y`` plus the prompt's gated attention output for the attention input ``x`` (both ``(batch, seq, d)``);
        ``position_embeddings`` is the rotary ``(cos, sin)`` pair the attention was given (``(batch or 1, seq,
        head_dim)`` each; unused by the ``gpt2`` style); ``scope(n)``, when given, is entered around each call of
        the attention's projections on ``n`` rows (a mixed-adapter batch: the rows are this adapter's alone).
        Returns ``y``'s shape and dtype.

        Raises:
            ValueError: a ``llama``-style attention called without ``position_embeddings``.
        """
        return (y + self.delta(layer.base_layer, x, y.shape[-1], position_embeddings, scope)).to(y.dtype)

    def delta(self, attn: nn.Module, x: Tensor, width: int, position_embeddings: Any = None,
              scope: Callable[[int], AbstractContextManager] | None = None) -> Tensor:
        """The change of the attention's output for its input ``x`` ``(batch, seq, d)`` (``width``: the output's
        last dimension), ``(batch, seq, width)``, in the dtype the queries have (peft's arithmetic: the prompt's own
        softmax in float32, times the gate, over the prompt's values, then ``o_proj`` on the Llama family).
        ``scope`` as in :meth:`forward`.

        Raises:
            ValueError: a ``llama``-style attention called without ``position_embeddings``.
        """
        batch, seq, _ = x.shape
        head = attn.head_dim
        prompt = self.adaption_prompt.to(x.dtype)
        scope = scope or (lambda n: contextlib.nullcontext())
        if self.style == "gpt2":
            with scope(batch):
                query = attn.c_attn(x).split(attn.split_size, dim=2)[0]
            with scope(1):
                _, key, value = attn.c_attn(prompt).split(width, dim=2)
        else:
            if position_embeddings is None:
                raise ValueError(f"{type(attn).__name__} was called without position_embeddings=(cos, sin); the "
                                 "adaption prompt rotates its queries as the attention does")
            with scope(batch):
                query = attn.q_proj(x)
            with scope(1):
                key, value = attn.k_proj(prompt), attn.v_proj(prompt)
        query = query.view(batch, seq, -1, head).transpose(1, 2)  # (batch, H, seq, d_h)
        heads = query.shape[1]
        if self.style == "llama":
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            query = query * cos + _rotate_half(query) * sin
        # (1, H, L, d_h): grouped key/value heads repeated for the query heads they serve
        key = key.view(1, self.adapter_len, -1, head).transpose(1, 2)
        value = value.view(1, self.adapter_len, -1, head).transpose(1, 2)
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
        scores = query @ key.transpose(2, 3).to(query.dtype) / math.sqrt(head)  # (batch, H, seq, L)
        weights = self.adaption_gate.to(query.dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = (weights @ value.to(query.dtype)).transpose(1, 2).reshape(batch, seq, -1)
        if self.style == "gpt2":
            return out
        with scope(batch):
            return attn.o_proj(out)

    def extra_repr(self) -> str:
        return f"style={self.style!r}, adapter_len={self.adapter_len}"


class AdaptionPromptLayer(SublayerLayer):
    """A wrapped attention module whose adaption prompts add to its output. Other adapters on the same module (a
    parallel bottleneck adapter) run first, as :class:`SublayerLayer` runs them; the modules inside stay
    addressable (LoRA on ``q_proj`` and an adaption prompt combine).

    Shapes: the attention's own: ``(batch, seq, d)`` in, a tuple starting with ``(batch, seq, d)`` out.
    """

    def forward_jobs(self, jobs: list[tuple[Any, Tensor | None]], args: tuple, kwargs: dict) -> Any:
        """The attention's output (with any other adapters' branches) plus each adaption prompt's change, each on
        its rows (``jobs``: ``(adapter, row indices or None)``; None: all rows).

        Raises:
            TypeError: the attention was called without its input (no positional argument and no
                ``hidden_states=``).
        """
        mine = [(a, idx) for a, idx in jobs if isinstance(a, AdaptionPromptAdapter)]
        out = super().forward_jobs([(a, idx) for a, idx in jobs if not isinstance(a, AdaptionPromptAdapter)],
                                   args, kwargs)
        if not mine:
            return out
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self.base_layer).__name__} was called without a positional input or "
                            "hidden_states=; the adaption prompt cannot find the attention's input")
        rotary = kwargs.get("position_embeddings")
        if rotary is None and len(args) > 1 and isinstance(args[1], tuple):  # Llama's second positional argument
            rotary = args[1]

        ctx = self._ctx

        def add(y: Tensor) -> Tensor:
            batch = y.shape[0]
            for adapter, idx in mine:
                if idx is None:
                    y = adapter(self, x, y, rotary)
                    continue
                # the projections it calls may be adapted layers: within each call the batch is this adapter's
                # rows alone (or its one-row prompt)
                name = next(n for n, a in self.adapters.items() if a is adapter)
                pos = None if rotary is None else tuple(_rows(t, idx, batch) for t in rotary)
                rows = adapter(self, _rows(x, idx, batch), y.index_select(0, idx), pos,
                               lambda n, name=name: ctx.only([name] * n))
                y = y.index_copy(0, idx, rows.to(y.dtype))
            return y

        return _on_output(out, add)


class AdaptionPromptTuner(WrapTuner):
    """Wraps the top ``adapter_layers`` attention modules and gives each an :class:`AdaptionPromptAdapter`."""

    method = "adaption prompt (LLaMA-Adapter)"

    def __init__(self) -> None:
        self._style: str | None = None
        self._hidden: int | None = None

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (nn.Module,)

    def new_wrapper(self, module: nn.Module) -> AdaptedLayer:
        return AdaptionPromptLayer(module)

    def find(self, host: Any, config: AdaptionPromptConfig) -> list[str]:
        """The last ``config.adapter_layers`` modules whose name ends with ``"." + config.target_modules`` (in module
        order, which is block order), as peft picks them.

        Raises:
            ConfigError: no such module, more ``adapter_layers`` than modules, a module of another kind than the
                style's attention (missing ``q_proj``... or ``c_attn``), or one already wrapped by another kind of
                sub-layer wrapper (a parallel adapter added first).
        """
        names = [(n, m) for n, m in iter_logical_modules(host.model) if n.endswith("." + config.target_modules)]
        check(bool(names), f"target_modules={config.target_modules!r} matches no module of the model (a module is "
                           f"adapted when its name ends with '.{config.target_modules}'); give the attention "
                           "sub-module's name, e.g. 'self_attn'")
        layers = config.adapter_layers
        check(layers <= len(names), f"adapter_layers={layers} is more than the {len(names)} "
                                    f"'{config.target_modules}' modules this model has; use at most {len(names)}")
        chosen = names[-layers:]
        for name, module in chosen:
            missing = [p for p in _NEEDS[self._style] if not isinstance(getattr(module, p, None), nn.Module)]
            check(not missing and isinstance(getattr(module, "head_dim", None), int),
                  f"{name}: a {type(module).__name__} is not the attention an adaption prompt reads (it lacks "
                  f"{missing or ['head_dim']}); give target_modules naming each block's attention module")
            wrapper = host.model.get_submodule(name)
            check(not isinstance(wrapper, AdaptedLayer) or isinstance(wrapper, AdaptionPromptLayer),
                  f"{name} is already wrapped by another adapter's {type(wrapper).__name__} (a parallel adapter "
                  "beside the attention); add the adaption prompt first, then the other adapter")
        return [n for n, _ in chosen]

    def inject(self, host: Any, config: AdaptionPromptConfig, adapter_name: str) -> None:
        """As :meth:`WrapTuner.inject`, after checking the model type and filling in the default
        ``target_modules`` and ``adapter_layers`` (written into ``config``, as peft writes the target; restored on
        failure).

        Raises:
            ConfigError: a model type not in :data:`ADAPTION_PROMPT_MODELS` (the message names it and the
                supported ones), or as :meth:`find`.
        """
        kind = model_type(host.model)
        check(kind in ADAPTION_PROMPT_MODELS,
              f"adaption prompts (LLaMA-Adapter) adapt the self-attention of decoder-only language models of types "
              f"{sorted(ADAPTION_PROMPT_MODELS)}, and this model's type is {kind!r}"
              + (" (an encoder or encoder-decoder has no such decoder attention; use e.g. LoRA or prompt tuning "
                 "there; `peftkit train --task causal-lm` trains adaption prompts on the shipped stories260K Llama)"
                 if kind is not None else " (not a transformers model)"))
        given = config.target_modules, config.adapter_layers
        target, self._style = ADAPTION_PROMPT_MODELS[kind]
        self._hidden = host.model.config.hidden_size
        try:
            if config.target_modules is None:
                config.target_modules = target
            if config.adapter_layers is None:
                config.adapter_layers = sum(1 for n, _ in iter_logical_modules(host.model)
                                            if n.endswith("." + config.target_modules)) or 1
            super().inject(host, config, adapter_name)
        except BaseException:
            config.target_modules, config.adapter_layers = given
            raise
        finally:
            self._style = self._hidden = None

    def make_adapter(self, base: nn.Module, config: AdaptionPromptConfig, module_name: str) -> Adapter:
        """An :class:`AdaptionPromptAdapter` of ``config.adapter_len`` tokens at the model's hidden size (float32,
        float64 on a float64 model, as peftkit's other adapters; the forward computes in the model's dtype)."""
        return AdaptionPromptAdapter(self._style, config.adapter_len, self._hidden)


def adaption_prompt_from_cli(args: Any) -> AdaptionPromptConfig:
    """``peftkit train --method adaption-prompt``: 10 prompt tokens (the paper's) in every attention layer (override
    with ``--option adapter_len=N`` / ``--option adapter_layers=N``), trained at the method's default learning rate
    1e-1: the gates start at zero and the prompts are few parameters (on stories260K, 20 steps of the causal-LM
    task took the dev perplexity from 1054 to 626 at 1e-2, 245 at 3e-2, 41 at 1e-1 and 5.5 at 3e-1)."""
    return AdaptionPromptConfig(adapter_len=10, task_type=args.task_type)


register_method(MethodSpec(
    name="adaption-prompt", config_cls=AdaptionPromptConfig, family="additive", kind="wrap", mergeable=False,
    paper=ADAPTION_PROMPT_PAPER, tuner=AdaptionPromptTuner(), cli_config=adaption_prompt_from_cli,
    aliases=("llama-adapter",), default_lr=1e-1,
))
