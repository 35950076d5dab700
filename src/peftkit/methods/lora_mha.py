"""LoRA on ``torch.nn.MultiheadAttention``: its packed input projection and its output projection.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685.

torch's attention has no linear layers to wrap: ``F.multi_head_attention_forward`` (and the eval-mode fast
path, ``torch._native_multi_head_attention``) read the packed ``in_proj_weight`` ``(3E, E)`` (rows: q, k, v)
and ``out_proj.weight`` ``(E, E)`` directly, and never call ``out_proj``. Targeting the attention module by
name gives both weights a low-rank update, as peft's ``lora.MultiheadAttention`` does:

    ``W_in' = W_in + s B A`` with ``A: (r, E)``, ``B: (3E, r)``;  ``W_out' = W_out + s B_o A_o`` with
    ``A_o: (r, E)``, ``B_o: (E, r)``;  ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

Unmerged, the attention runs on the updated weights through ``torch.func.functional_call`` (the base module is
never changed, and the fast path, which reads the module's attributes, reads the updated ones too); merged, the
updates are added to the two weights in place. The biases are not adapted. File keys are peft's:
``<attn>.lora_A.weight``, ``<attn>.lora_B.weight``, ``<attn>.base_layer.out_proj.lora_A.weight``,
``<attn>.base_layer.out_proj.lora_B.weight``. Trainable parameters: ``r * (E + 3E) + r * (E + E) = 6 r E``.

Restrictions (as peft, which refuses or silently ignores the same): q, k and v of one size (``kdim`` and
``vdim`` equal to ``embed_dim``, so that the weight is packed); no DoRA, ``lora_bias``, QA-LoRA or an
initialisation from the base weight (PiSSA, OLoRA, LoftQ); ``lora_dropout`` is not applied (the update acts on
the weights, not on an input the side path could drop out); no mixed-adapter batches.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from peftkit.config import check
from peftkit.layers import AdaptedLayer, Adapter, onloaded, wide
from peftkit.methods.lora_init import changes_base

# the attributes code reads on an attention module (torch's Transformer layers, open_clip) that a wrapper answers
# for its base; the weights read here are the base's own, without unmerged adapters
_ATTENTION_ATTRIBUTES = frozenset({"out_proj", "merge_masks"})


class _LowRank(nn.Module):
    """One weight's LoRA factors: ``lora_A: (r, in)``, ``lora_B: (out, r)`` (``nn.Linear`` s without bias, as peft
    keys them). ``reset`` is LoRA's (see :meth:`peftkit.methods.lora.LoraLinear.reset`)."""

    def __init__(self, in_features: int, out_features: int, r: int) -> None:
        super().__init__()
        self.r = r
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)

    def reset(self, init: bool | str) -> None:
        """Initialise from ``init_lora_weights`` (True, ``"gaussian"``, ``"orthogonal"``, False)."""
        from peftkit.methods.lora import LoraLinear

        LoraLinear.reset(self, init)

    def product(self) -> Tensor:
        """``B @ A``, ``(out, in)``, in the factors' dtype (autograd flows to both)."""
        return self.lora_B.weight @ self.lora_A.weight


class LoraMultiheadAttention(Adapter):
    """LoRA on an ``nn.MultiheadAttention`` of embedding size ``E``: rank-``r`` updates of ``in_proj_weight``
    ``(3E, E)`` and ``out_proj.weight`` ``(E, E)``, scaled by ``scaling``.

    Args:
        embed_dim: ``E``, the attention's ``embed_dim`` (also its ``kdim`` and ``vdim``).
        r: rank, > 0 (the same for both weights, as in peft).
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)``).

    Shapes: ``lora_A.weight: (r, E)``, ``lora_B.weight: (3E, r)``; ``base_layer.out_proj.lora_A.weight: (r, E)``,
    ``base_layer.out_proj.lora_B.weight: (E, r)`` (the state-dict keys peft uses). The layer's input and output
    are the attention's (``query``, ``key``, ``value`` -> ``(attn_output, attn_weights)``); the adapter acts on
    the weights the attention runs with (:meth:`substitute_params`), and its :meth:`forward` passes the output
    through. ``delta_weight`` is ``(4E, E)``: the input projection's update over the output projection's, the
    layout of :attr:`MultiheadAttentionLayer.weight`.

    Paper: LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).
    """

    a_key, b_key, groups = "lora_A.weight", "lora_B.weight", 1
    #: the A factors (LoRA-FA freezes them)
    a_keys = ("lora_A.weight", "base_layer.out_proj.lora_A.weight")
    mutates_base = False
    substitutes_params = True
    reads_input = False

    def __init__(self, embed_dim: int, r: int, scaling: float) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Linear(embed_dim, r, bias=False)
        self.lora_B = nn.Linear(r, 3 * embed_dim, bias=False)
        # peft wraps out_proj inside the attention it wraps: its factors live at base_layer.out_proj.*
        self.base_layer = nn.ModuleDict({"out_proj": _LowRank(embed_dim, embed_dim, r)})

    def reset(self, init: bool | str) -> None:
        """Initialise both factor pairs from ``init_lora_weights`` as LoRA on a linear layer does (default: A
        Kaiming-uniform, B zero, so the adapter starts as identity; False draws both at random, for tests)."""
        _LowRank.reset(self, init)
        self.base_layer["out_proj"].reset(init)

    def _deltas(self) -> tuple[Tensor, Tensor]:
        """``(s B A, s B_o A_o)``: ``(3E, E)`` and ``(E, E)`` in the factors' dtype, with autograd."""
        return _LowRank.product(self) * self.scaling, self.base_layer["out_proj"].product() * self.scaling

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """``in_proj_weight`` and ``out_proj.weight`` with this adapter's updates added (to the substitutes of the
        adapters before it when there are some, else to the base weights), in the base weights' dtype."""
        base = layer.base_layer
        w_in = params.get("in_proj_weight", base.in_proj_weight)
        w_out = params.get("out_proj.weight", base.out_proj.weight)
        d_in, d_out = self._deltas()
        return {**params, "in_proj_weight": w_in + d_in.to(w_in.dtype), "out_proj.weight": w_out + d_out.to(w_out.dtype)}

    def forward(self, layer: AdaptedLayer, x: Any, y: Any) -> Any:
        """The attention's output ``y`` unchanged: the update acted through :meth:`substitute_params`."""
        return y

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """``(4E, E)`` float32: ``s B A`` (rows ``0..3E``, for ``in_proj_weight``) over ``s B_o A_o`` (rows
        ``3E..4E``, for ``out_proj.weight``)."""
        a, b = wide(self.lora_A.weight), wide(self.lora_B.weight)
        out = self.base_layer["out_proj"]
        a_o, b_o = wide(out.lora_A.weight), wide(out.lora_B.weight)
        return torch.cat([b @ a, b_o @ a_o]) * self.scaling


class MultiheadAttentionLayer(AdaptedLayer):
    """The wrapper of an ``nn.MultiheadAttention`` (see :class:`~peftkit.layers.AdaptedLayer`), holding
    :class:`LoraMultiheadAttention` adapters.

    It is called as the attention is (``query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False``; ``batch_first`` either way, batched or not)
    and returns what the attention returns. Its merge layout, :attr:`weight`, is ``in_proj_weight`` ``(3E, E)``
    stacked over ``out_proj.weight`` ``(E, E)``; merging adds an adapter's ``(4E, E)`` delta to the two
    parameters in place, so ``unload()`` gives back the plain attention module. It answers the attention's
    settings (``embed_dim``, ``num_heads``, ``batch_first``, ``in_proj_weight``, ``out_proj``, ``merge_masks``,
    ...), as the base module's own (without unmerged adapters).

    Attributes:
        peft_wrapped_children: sub-modules of the attention that peft wraps too (``out_proj``): a trained base
            parameter there (``bias="all"``) is saved under peft's key, ``<attn>.base_layer.out_proj.base_layer.bias``.
    """

    peft_wrapped_children = ("out_proj",)

    def __getattr__(self, name: str) -> Any:
        if name in _ATTENTION_ATTRIBUTES:
            base = self._modules.get("base_layer")
            if base is not None:
                return getattr(base, name)
        return super().__getattr__(name)

    @property
    def weight(self) -> Tensor:
        """A new ``(4E, E)`` tensor: ``in_proj_weight`` over ``out_proj.weight`` (see the class docstring)."""
        base = self.base_layer
        return torch.cat([base.in_proj_weight, base.out_proj.weight])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The attention on ``args``/``kwargs`` (its own arguments) with the active, unmerged adapters' updates in its
        weights; the base attention alone when disabled or none is active.

        Raises:
            ValueError: a mixed-adapter batch (``adapter_names=...``) that names an adapter of this layer (the
                updates are to weights, shared by all rows; peft refuses it too).
        """
        ctx = self._ctx
        if ctx is not None and ctx.row_names is not None and not self.disabled:
            used = sorted({n for n in ctx.row_names if n in self.adapters and n not in self.merged_adapters})
            if used:
                raise ValueError(f"adapter_names names {used}, LoRA adapter(s) of an nn.MultiheadAttention, which "
                                 "changes the attention's weights for every row: mixed-adapter batches are not "
                                 "supported there (nor in peft); run one adapter per call (set_adapter)")
            return self.base_layer(*args, **kwargs)
        plan = self._plan
        if self.disabled or not plan:
            return self.base_layer(*args, **kwargs)
        if "forward" in vars(self.base_layer):  # accelerate's device hooks: see :func:`peftkit.layers.onloaded`
            with onloaded(plan):
                return self._attend(plan, args, kwargs)
        return self._attend(plan, args, kwargs)

    def _attend(self, plan: list[Adapter], args: tuple, kwargs: dict) -> Any:
        params: dict[str, Tensor] = {}
        for adapter in plan:
            params = adapter.substitute_params(self, params)
        return functional_call(self.base_layer, params, args, kwargs)

    @torch.no_grad()
    def _fold(self, fn) -> None:
        base = self.base_layer
        w_in, w_out = base.in_proj_weight, base.out_proj.weight
        dtype = torch.promote_types(w_in.dtype, torch.float32)
        new, _ = fn(self, torch.cat([w_in.detach().to(dtype), w_out.detach().to(dtype)]), None)
        w_in.copy_(new[: w_in.shape[0]].to(w_in.dtype))
        w_out.copy_(new[w_in.shape[0]:].to(w_out.dtype))


def make_attention_adapter(base: nn.MultiheadAttention, config: Any, module_name: str, r: int,
                           scaling: float) -> LoraMultiheadAttention:
    """A :class:`LoraMultiheadAttention` for attention ``base`` (named ``module_name``) from a ``LoraConfig``,
    initialised by its ``init_lora_weights``; warns that ``lora_dropout > 0`` is not applied there (as in peft).

    Raises:
        ConfigError: ``kdim``/``vdim`` other than ``embed_dim`` (separate q/k/v weights), ``use_dora``,
            ``lora_bias``, ``use_qalora``, an initialisation from the base weight (``"pissa"``, ``"olora"``,
            ``"loftq"``), or ``bias="lora_only"``; the message names the value and what is supported.
    """
    where = f"{module_name} (nn.MultiheadAttention)"
    check(base._qkv_same_embed_dim,
          f"{where}: LoRA adapts the packed in_proj_weight, which an attention with kdim={base.kdim}, vdim={base.vdim} "
          f"and embed_dim={base.embed_dim} does not have (its q, k and v weights are separate; peft refuses it too); "
          "only kdim == vdim == embed_dim is supported: leave this module out of target_modules")
    for flag, value, advice in (("use_dora", config.use_dora, "set use_dora=False"),
                                ("lora_bias", config.lora_bias, "set lora_bias=False"),
                                ("use_qalora", config.use_qalora, "set use_qalora=False")):
        check(not value, f"{where}: {flag}=True is not supported on torch's attention (only plain LoRA is, as in "
                         f"peft); {advice}, or leave this module out of target_modules")
    init = config.init_lora_weights
    check(not (changes_base(init) or init == "loftq"),
          f"{where}: init_lora_weights={init!r} starts from the base weight, which is not supported on torch's "
          "attention; use True, 'gaussian' or 'orthogonal', or leave this module out of target_modules")
    check(config.bias != "lora_only",
          f"{where}: bias='lora_only' is not supported on torch's attention (peft trains its out_proj bias but does "
          "not save it); use bias='none' or 'all'")
    if config.lora_dropout:
        warnings.warn(f"{where}: lora_dropout={config.lora_dropout} is not applied on torch's attention (LoRA changes "
                      "its weights, not an input the side path could drop out; peft does not apply it either)",
                      UserWarning, stacklevel=5)
    adapter = LoraMultiheadAttention(base.embed_dim, r, scaling)
    adapter.reset(init)
    return adapter
