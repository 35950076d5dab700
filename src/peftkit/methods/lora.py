"""LoRA: low-rank adaptation of Linear, GPT-2 Conv1D, Conv1d/2d/3d and Embedding layers (and torch's
nn.MultiheadAttention: :mod:`peftkit.methods.lora_mha`).

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685.
rsLoRA scaling: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
2023, arXiv:2312.03732.

Equation: ``h = W0 x + (alpha / r) * B A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)``; rsLoRA
uses ``alpha / sqrt(r)``. Trainable parameters per adapted ``(out, in)`` layer: ``r * (in + out)``
(plus ``out`` with ``lora_bias``, plus ``out`` with DoRA).

Options on the same config: ``use_dora`` (:mod:`peftkit.methods.dora`), ``init_lora_weights="pissa"``,
``"pissa_niter_N"`` or ``"olora"`` (:mod:`peftkit.methods.lora_init`); the LoRA+ optimiser is
:func:`peftkit.optimizers.create_loraplus_optimizer` (also ``peftkit.create_loraplus_optimizer``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter, wide
from peftkit.methods.fused import SpareBuffer, can_fuse, low_rank_linear
from peftkit.methods.lora_init import (
    OLORA_PAPER,
    PISSA_PAPER,
    changes_base,
    check_init,
    convert_to_plain_lora,
    principal_factors,
)
from peftkit.ops import Dropout, func_transforms_active
from peftkit.targeting import (
    LORA_TARGET_DEFAULTS,
    check_pattern_keys,
    check_target_fields,
    linear_types,
    pattern_key,
)
from peftkit.tuners import WrapTuner

LORA_PAPER = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685)"
DORA_PAPER = "DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353)"


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of LoRA (field names and defaults as ``peft.LoraConfig``).

    Args:
        r: rank of the update, > 0. Default 8.
        target_modules: list of module names/suffixes, a full-match regex, or ``"all-linear"``;
            None (default) takes the model type's usual targets, as peft (:data:`~peftkit.targeting.LORA_TARGET_DEFAULTS`).
        exclude_modules: names/suffixes or regex never adapted.
        lora_alpha: scaling numerator (``scaling = lora_alpha / r``), > 0. Default 8.
        lora_dropout: dropout probability on the adapter's input, in [0, 1). Default 0.
        fan_in_fan_out: True when the base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``). peftkit
            reads the layout from the module type; the flag is kept for file compatibility.
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (train the
            biases of adapted layers). Trained biases are saved with the adapter.
        use_rslora: scale by ``lora_alpha / sqrt(r)`` instead.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``["classifier"]``).
        init_lora_weights: True (A Kaiming-uniform, B zero: the adapter starts as identity),
            ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``"orthogonal"`` (on Linear and GPT-2 Conv1D, as peft:
            A and B built from the two halves of the rows of a random orthogonal ``r x r`` matrix, so
            ``B A = 0`` with both non-zero; needs an even ``r``; other layer types get the default),
            ``"eva"`` (accepted only in the config of a trained adapter being loaded: peftkit has no EVA
            step, :func:`get_peft_model` refuses it), False (both random: for tests only), or, on Linear and
            GPT-2 Conv1D layers (other layer types get the default), ``"pissa"`` / ``"pissa_niter_N"`` /
            ``"olora"``, which move the top-``r`` part of the base weight into A and B and leave the
            residual in the base (see :mod:`peftkit.methods.lora_init`), or ``"loftq"`` (LoftQ: quantised
            base + SVD start, see :mod:`peftkit.quant.loftq`).
        use_dora: DoRA: the adapted weight is ``m * (W0 + s B A) / ||W0 + s B A||`` with a trainable
            magnitude ``m`` per output feature (see :mod:`peftkit.methods.dora`).
        loftq_config: LoftQ options (a ``LoftQConfig`` or dict; stored as a dict).
        eva_config: peft's EVA options, kept so that a loaded EVA adapter's config is saved back unchanged
            (peftkit does not use them).
        use_qalora / qalora_group_size: QA-LoRA, input pooled over groups of this many columns (see
            :mod:`peftkit.quant.qalora`). Default False / 16.
        layers_to_transform / layers_pattern: restrict to some blocks (see :mod:`peftkit.targeting`).
        rank_pattern / alpha_pattern: per-module ``r`` / ``lora_alpha`` overrides keyed by a regex
            matched against the end of the module name.
        lora_bias: give ``lora_B`` a trainable bias (merged into the base bias); not with DoRA, PiSSA or
            OLoRA (as in peft).
        trainable_token_indices: also train these rows of the input embedding (a list of token ids), or of the
            named embeddings (``{"embed_tokens": [ids]}``), as peft's (trainable tokens, see
            :mod:`peftkit.methods.trainable_tokens`; file key ``<embedding>.token_adapter.trainable_tokens_delta``).
            None (default): none. An embedding adapted this way cannot also be in ``target_modules``.

    Raises:
        ConfigError: ``r <= 0``, ``lora_alpha <= 0``, dropout outside [0, 1), an unknown ``bias`` or
            ``init_lora_weights``, a non-positive pattern rank, ``lora_bias`` with DoRA/PiSSA/OLoRA, or a
            ``target_modules=[]``.

    Paper: LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685); with use_rslora, A
        Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (Kalajdzievski, 2023, arXiv:2312.03732); with
        use_dora, DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).
    """

    peft_type = "LORA"
    default_target_modules = LORA_TARGET_DEFAULTS
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    use_dora: bool = False
    loftq_config: Any = field(default_factory=dict)  # a LoftQConfig or a dict; stored as a dict
    use_qalora: bool = False
    qalora_group_size: int = 16
    eva_config: Any = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def validate(self) -> None:
        tokens = self.trainable_token_indices
        if tokens is not None:
            from peftkit.methods.trainable_tokens import check_token_indices

            check(isinstance(tokens, (list, dict)) and bool(tokens),
                  f"trainable_token_indices={tokens!r} is not valid: give a list of token ids (rows of the input "
                  "embedding), or a dict {embedding module name: list of ids}, or None")
            for name, idx in (tokens.items() if isinstance(tokens, dict) else [(None, tokens)]):
                check_token_indices(idx, "trainable_token_indices" + (f"[{name!r}]" if name is not None else ""))
        check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
              f"r={self.r!r} is not valid; the rank must be an integer > 0")
        check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
              f"lora_alpha={self.lora_alpha!r} is not valid; it must be a number > 0")
        check(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
              f"lora_dropout={self.lora_dropout!r} is not valid; it must lie in [0, 1)")
        check(self.bias in ("none", "all", "lora_only"),
              f"bias={self.bias!r} is not valid; expected 'none', 'all' or 'lora_only'")
        check_init(self.init_lora_weights)
        if self.init_lora_weights == "orthogonal":
            odd = sorted({r for r in [self.r, *self.rank_pattern.values()] if isinstance(r, int) and r % 2})
            check(not odd, "init_lora_weights='orthogonal' needs even ranks (it splits the rank in two halves); got "
                           + (f"r={odd[0]}" + (" in rank_pattern" if odd[0] != self.r else "") if odd else ""))
        check(isinstance(self.use_dora, bool), f"use_dora={self.use_dora!r} must be true or false")
        check(not (self.lora_bias and (self.use_dora or changes_base(self.init_lora_weights))),
              f"lora_bias=True is not supported with use_dora={self.use_dora} and "
              f"init_lora_weights={self.init_lora_weights!r}; use it with plain LoRA initialisations only")
        check_target_fields(self)
        check_pattern_keys("rank_pattern", self.rank_pattern)
        check_pattern_keys("alpha_pattern", self.alpha_pattern)
        for key, value in self.rank_pattern.items():
            check(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}]={value!r} must be an integer > 0")
        for key, value in self.alpha_pattern.items():
            check(isinstance(value, (int, float)) and value > 0, f"alpha_pattern[{key!r}]={value!r} must be > 0")
        from peftkit.quant.loftq import validate_lora_options

        validate_lora_options(self)
        special = "use_qalora=True" if self.use_qalora else "init_lora_weights='loftq'"
        if self.use_qalora or self.init_lora_weights == "loftq":
            check(not self.use_dora, f"{special} cannot be combined with use_dora=True; use one of them")
            check(not changes_base(self.init_lora_weights),
                  f"{special} cannot be combined with init_lora_weights={self.init_lora_weights!r} (a PiSSA/OLoRA "
                  "start); use the default start")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The ``(r, lora_alpha)`` that apply to ``module_name`` after the patterns."""
        rk = pattern_key(module_name, self.rank_pattern)
        ak = pattern_key(module_name, self.alpha_pattern)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.lora_alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _dropout(p: float) -> nn.Module:
    return Dropout(p) if p > 0 else nn.Identity()


def fresh_output(layer: AdaptedLayer) -> bool:
    """Whether the base layer's output may be updated in place: true for ``nn.Linear`` and GPT-2
    ``Conv1D``, whose backward does not read their output, unless a ``torch.func`` transform runs (``vmap``
    has no batching rule for the in-place GEMM) or the base layer has hooks (a forward hook may keep the
    output it saw; see :meth:`~peftkit.layers.AdaptedLayer.base_is_hooked`), or ``torch.compile`` traces (the
    traced in-place GEMM on a view lost the gradients of DoRA's A and B)."""
    return (type(layer.base_layer) in _INPLACE_SAFE and not func_transforms_active() and not layer.base_is_hooked()
            and not torch.compiler.is_compiling())


_INPLACE_SAFE = set(linear_types())


def _even_cover(spans: list[slice], rows: int) -> bool:
    """Whether ``spans`` are equal, back-to-back runs covering rows ``0..rows-1`` in order."""
    size = spans[0].stop - spans[0].start
    return size > 0 and len(spans) * size == rows and all(
        s.start == i * size and s.stop == (i + 1) * size for i, s in enumerate(spans))


class LoraLinear(Adapter):
    """LoRA on ``nn.Linear`` or GPT-2 ``Conv1D``.

    Shapes: ``x: (..., in_features) -> (..., out_features)``; ``lora_A.weight: (r, in)``,
    ``lora_B.weight: (out, r)``. ``delta_weight`` is ``scaling * B @ A`` shaped like the base weight
    (transposed to ``(in, out)`` for ``Conv1D``). When it is the layer's only adapter in use, base and
    adapter run as one autograd node (:func:`~peftkit.methods.fused.low_rank_linear`).

    Attributes:
        a_key, b_key: the names of A and B inside the adapter's state dict (one per low-rank factor).
        groups: how many independent blocks the rank is split into (1 here; the convolution's groups).
        mutates_base: whether creating it moved part of the base weight into A and B (PiSSA, OLoRA).
    """

    a_key, b_key, groups = "lora_A.weight", "lora_B.weight", 1
    mutates_base = False
    fuses_base = True

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 lora_bias: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.r, self.scaling, self.transposed = r, scaling, transposed
        self.lora_dropout = _dropout(dropout)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias)
        self._spare = SpareBuffer()  # the fused path's folded weight, from one training step to the next

    def train(self, mode: bool = True) -> LoraLinear:
        spare = getattr(self, "_spare", None)
        if not mode and spare is not None:  # the spare fold is a training-time buffer: dropped for evaluation
            spare.clear()
        return super().train(mode)

    def reset(self, init: bool | str) -> None:
        """Initialise A and B from ``init``, the config's ``init_lora_weights`` (see :class:`LoraConfig`)."""
        if init is False:
            return
        # "orthogonal" is a start for linear layers (2-D factors); a convolution's adapter takes the default
        orthogonal = init == "orthogonal" and self.lora_A.weight.dim() == 2
        if orthogonal:
            LoraLinear._orthogonal_init(self)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if not orthogonal:
            nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    @torch.no_grad()
    def _orthogonal_init(self) -> None:
        """peft's ``"orthogonal"`` start: with ``Q`` a random orthogonal ``(r, r)`` matrix, ``A = (G1 Q_0)^T / 10``
        and ``B = G2 Q_1 / 10``, where ``Q_0`` and ``Q_1`` hold ``Q``'s rows 0, 2, 4, ... and 1, 3, 5, ... and
        ``G1: (in, r/2)``, ``G2: (out, r/2)`` are Gaussian. Distinct rows of ``Q`` are orthogonal, so ``B A = 0``
        while both factors are non-zero (the adapter starts as identity)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        half = self.r // 2
        q, _ = torch.linalg.qr(torch.randn(self.r, self.r, dtype=torch.float32))
        a.copy_((torch.randn(a.shape[1], half) @ q[0::2]).T / 10.0)
        b.copy_(torch.randn(b.shape[0], half) @ q[1::2] / 10.0)

    def low_rank(self) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scaling)`` as used now (DyLoRA truncates them)."""
        return self.lora_A.weight, self.lora_B.weight, self.scaling

    def output_factor(self, layer: AdaptedLayer) -> Tensor | None:
        """Per-output factor of the whole layer output (DoRA's ``m / n``); None for LoRA."""
        return None

    def fused_magnitude(self, layer: AdaptedLayer) -> Tensor | None:
        """DoRA's magnitude ``(out,)`` for :func:`~peftkit.methods.fused.low_rank_linear` to form ``m / n`` itself
        (from the folded weight), or None: LoRA, or a layer whose weight holds merged adapters (``n`` must
        come from the unmerged weight; :meth:`output_factor` then gives the factor)."""
        return None

    def fused_forward(self, layer: AdaptedLayer, x: Tensor) -> Tensor | None:
        a, b, scaling = self.low_rank()
        weight = layer.weight
        if self.lora_B.bias is not None or type(layer.base_layer) not in _INPLACE_SAFE or not can_fuse(x, weight, a):
            return None
        xd = self.lora_dropout(x)
        m = self.fused_magnitude(layer)
        g = None if m is not None else self.output_factor(layer)
        return low_rank_linear(x, None if xd is x else xd, weight.T if self.transposed else weight, layer.bias, a, b,
                               None if g is None else g.to(x.dtype), scaling, m, getattr(self, "_spare", None))

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a, b = self.lora_A.weight, self.lora_B
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        z = F.linear(self.lora_dropout(x), a)
        # (under autocast z comes out in the autocast dtype while B stays float32: the in-place GEMM, which
        # autocast does not cover, then does not apply)
        if b.bias is None and y.dtype == z.dtype == b.weight.dtype and y.is_contiguous() and fresh_output(layer):
            # one GEMM accumulating s * z @ B^T into the base output: no extra pass over y
            y.view(-1, y.shape[-1]).addmm_(z.view(-1, self.r), b.weight.T, alpha=self.scaling)
            return y
        return torch.add(y, b(z).to(y.dtype), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        delta = (wide(self.lora_B.weight) @ wide(self.lora_A.weight)) * self.scaling
        return delta.T if self.transposed else delta

    @torch.no_grad()
    def restore_base(self, layer: AdaptedLayer) -> None:
        """PiSSA/OLoRA: add ``scaling * B0 A0`` (the initial factors) back, so the base weight is the
        user's original again (to float tolerance). A base quantised after the start (``quantize_base`` on the
        PeftModel) decodes its weight afresh on each read, so it is quantised again from the restored weight (the
        user's original up to one rounding)."""
        if self.mutates_base and hasattr(self, "initial_A"):
            delta = (wide(self.initial_B) @ wide(self.initial_A)) * self.scaling  # float64 stays float64
            delta = delta.T if self.transposed else delta
            base = layer.base_layer
            if hasattr(base, "quantized_state"):
                from peftkit.quant.layer import QuantLinear

                restored = QuantLinear.quantize((base.weight.float() + delta).to(base.compute_dtype), base.bias,
                                                base.fmt)
                restored.conv1d = base.conv1d
                if base.merged_weight is not None:  # other adapters merged into this layer stay merged
                    restored.merged_weight = (base.merged_weight.float() + delta).to(base.merged_weight.dtype)
                layer.base_layer = restored
                return
            weight = layer.weight
            weight.copy_((wide(weight) + delta).to(weight.dtype))

    @staticmethod
    def mixed_forward(layer: AdaptedLayer, x: Tensor, y: Tensor, parts: list[tuple[LoraLinear, Tensor]],
                      spans: list[slice] | None = None) -> Tensor | None:
        """The side paths of a mixed batch added into the base output ``y``:
        ``y[rows_i] += s_i * (x[rows_i] A_i^T) B_i^T``. Each row costs one rank-``r_i`` product, as in
        a single-adapter batch (no stacked rank ``sum r_i`` run on every row).

        ``spans`` (aligned with ``parts``), when given, says that each group's rows are one contiguous
        run, as :meth:`peftkit.PeftModel.forward` arranges them: the groups then work on views of ``x``
        and ``y`` (no row gather or scatter), and when the groups are equal runs covering the batch with
        one rank, both products run as one batched GEMM each (``bmm`` over ``(groups, rows, features)``).
        Otherwise the rows are gathered per group and added back with ``index_add_``. The base output is
        updated in place when that is safe. Returns None (use the generic per-group path) with a
        ``lora_B`` bias, active dropout or mixed dtypes."""
        adapters = [a for a, _ in parts]
        if any(a.lora_B.bias is not None or (a.training and isinstance(a.lora_dropout, nn.Dropout))
               or a.lora_A.weight.dtype != x.dtype for a in adapters) or y.dtype != x.dtype:
            return None
        in_place = y.is_contiguous() and fresh_output(layer)
        if spans is not None and x.is_contiguous():
            if not in_place:
                y = y.clone(memory_format=torch.contiguous_format)
            if _even_cover(spans, x.shape[0]) and len({a.r for a in adapters}) == 1:
                groups = len(spans)
                a_all = torch.stack([a.lora_A.weight for a in adapters])  # (G, r, in)
                b_all = torch.stack([a.lora_B.weight for a in adapters])  # (G, out, r)
                z = torch.bmm(x.reshape(groups, -1, x.shape[-1]), a_all.mT)  # (G, rows/G, r)
                scales = {a.scaling for a in adapters}
                if len(scales) > 1:
                    z = z * torch.tensor([a.scaling for a in adapters], dtype=z.dtype, device=z.device)[:, None, None]
                y.view(groups, -1, y.shape[-1]).baddbmm_(z, b_all.mT, alpha=scales.pop() if len(scales) == 1 else 1)
                return y
            for a, rows in zip(adapters, spans):
                x_g, y_g = x[rows].reshape(-1, x.shape[-1]), y[rows].view(-1, y.shape[-1])
                y_g.addmm_(x_g @ a.lora_A.weight.T, a.lora_B.weight.T, alpha=a.scaling)
            return y
        for a, idx in parts:
            side = F.linear(F.linear(x.index_select(0, idx), a.lora_A.weight), a.lora_B.weight)
            y = y.index_add_(0, idx, side, alpha=a.scaling) if in_place else y.index_add(0, idx, side, alpha=a.scaling)
        return y

    def delta_bias(self, layer: AdaptedLayer) -> Tensor | None:
        b = self.lora_B.bias
        return None if b is None else wide(b.detach()) * self.scaling


class LoraEmbedding(Adapter):
    """LoRA on ``nn.Embedding``.

    Shapes: ``x: (...)`` integer ids ``-> (..., embedding_dim)``; ``lora_embedding_A: (r, num_embeddings)``,
    ``lora_embedding_B: (embedding_dim, r)``; ``delta_weight = scaling * (B @ A).T``, ``(num, dim)``.
    """

    a_key, b_key, groups = "lora_embedding_A", "lora_embedding_B", 1
    mutates_base = False

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_dropout = _dropout(dropout)  # kept for config parity; ids cannot be dropped out
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r))

    def reset(self, init: bool | str) -> None:
        """Initialise as HF PEFT does: A zero and B normal, so the adapter starts as identity; ``init=False``
        draws both from N(0, 1) (for tests)."""
        if init is False:
            nn.init.normal_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            return
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        base = layer.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        return torch.add(y, (after_a @ self.lora_embedding_B.T).to(y.dtype), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return (wide(self.lora_embedding_B) @ wide(self.lora_embedding_A)).T * self.scaling


class LoraConv(Adapter):
    """LoRA on ``nn.Conv1d/2d/3d``, including grouped convolutions.

    ``lora_A`` is a convolution with the base kernel, stride, padding, dilation and ``groups``
    (``in -> r``); ``lora_B`` a 1x1 convolution ``r -> out`` with the same ``groups``. Because both
    are grouped like the base, ``B(A(x))`` is itself a grouped convolution and merges exactly (HF
    PEFT uses an ungrouped ``A`` there and cannot merge). Requires ``r % groups == 0``.

    Shapes: ``lora_A.weight: (r, in/groups, *k)``, ``lora_B.weight: (out, r/groups, 1, ...)``;
    ``delta_weight: (out, in/groups, *k)``.
    """

    a_key, b_key = "lora_A.weight", "lora_B.weight"
    mutates_base = False

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, lora_bias: bool = False) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        conv = type(base)
        g = base.groups
        self.lora_dropout = _dropout(dropout)
        self.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                           groups=g, bias=False, padding_mode=base.padding_mode)
        self.lora_B = conv(r, base.out_channels, 1, 1, groups=g, bias=lora_bias)
        self.groups = g

    reset = LoraLinear.reset

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        a = self.lora_A.weight
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        return torch.add(y, self.lora_B(self.lora_A(self.lora_dropout(x))).to(y.dtype), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        a, b = wide(self.lora_A.weight), wide(self.lora_B.weight)
        g = self.lora_A.groups
        out = b.shape[0]
        per_group = torch.bmm(b.reshape(g, out // g, self.r // g), a.reshape(g, self.r // g, -1))
        return per_group.reshape(out, *a.shape[1:]) * self.scaling

    delta_bias = LoraLinear.delta_bias


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoraTuner(WrapTuner):
    """Builds one LoRA (or DoRA) adapter for one target module."""

    method = "LoRA"

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return (*linear_types(), nn.Embedding, *CONV_TYPES, nn.MultiheadAttention)

    def new_wrapper(self, module: nn.Module) -> AdaptedLayer:
        """An ``nn.MultiheadAttention`` gets a :class:`~peftkit.methods.lora_mha.MultiheadAttentionLayer` (its
        weights are read, not called); other modules the generic :class:`~peftkit.layers.AdaptedLayer`."""
        if isinstance(module, nn.MultiheadAttention):
            from peftkit.methods.lora_mha import MultiheadAttentionLayer

            return MultiheadAttentionLayer(module)
        return super().new_wrapper(module)

    def adapter_classes(self, config: LoraConfig) -> tuple[type, type, type]:
        """The ``(linear, embedding, conv)`` adapter classes this config builds."""
        if config.use_dora:
            from peftkit.methods.dora import DoraConv, DoraEmbedding, DoraLinear

            return DoraLinear, DoraEmbedding, DoraConv
        return LoraLinear, LoraEmbedding, LoraConv

    def make_adapter(self, base: nn.Module, config: LoraConfig, module_name: str) -> Adapter:
        """The linear, embedding or convolution adapter of :meth:`adapter_classes` (QA-LoRA's with
        ``use_qalora``) with this module's ``(r, alpha)`` after the patterns, initialised by
        ``init_lora_weights``: LoftQ (:func:`~peftkit.quant.loftq.loftq_init`), PiSSA/OLoRA factors of the
        base weight on linear layers (the base weight itself changes only in :meth:`inject`), else the
        adapter's ``reset``; with DoRA, the magnitude from the base weight. An ``nn.MultiheadAttention`` gets
        a :class:`~peftkit.methods.lora_mha.LoraMultiheadAttention` (plain LoRA only).

        Raises:
            ConfigError: ``r`` not divisible by a convolution's ``groups``, PiSSA/OLoRA with
                ``r > min(out, in)``, ``lora_bias`` on an embedding, a layer QA-LoRA or LoftQ cannot adapt, or
                an attention LoRA cannot adapt (see :func:`~peftkit.methods.lora_mha.make_attention_adapter`).
        """
        r, alpha = config.rank_and_alpha(module_name)
        scaling = config.scaling_for(r, alpha)
        if isinstance(base, nn.MultiheadAttention):
            from peftkit.methods.lora_mha import make_attention_adapter

            return make_attention_adapter(base, config, module_name, r, scaling)
        linear, embedding, conv_cls = self.adapter_classes(config)
        init = config.init_lora_weights
        if config.use_qalora:
            from peftkit.quant.qalora import make_qalora_adapter

            adapter: Any = make_qalora_adapter(base, config, module_name, r, scaling)
        elif isinstance(base, nn.Embedding):
            check(not config.lora_bias, f"{module_name}: lora_bias=True is not supported on an embedding (peft refuses "
                  "it too); leave the embedding out of target_modules or set lora_bias=False")
            adapter = embedding(base.num_embeddings, base.embedding_dim, r, scaling, config.lora_dropout)
        elif isinstance(base, CONV_TYPES):
            check(r % base.groups == 0,
                  f"{module_name}: r={r} must be divisible by the convolution's groups={base.groups}")
            adapter = conv_cls(base, r, scaling, config.lora_dropout, config.lora_bias)
        else:
            transposed = not isinstance(base, nn.Linear)
            in_f, out_f = base.weight.shape[::-1] if not transposed else base.weight.shape
            adapter = linear(in_f, out_f, r, scaling, config.lora_dropout, config.lora_bias, transposed)
        if init == "loftq":
            from peftkit.quant.loftq import loftq_init

            loftq_init(adapter, base, config, module_name)
        elif changes_base(init) and isinstance(adapter, LoraLinear):
            # a quantised layer's weight is decoded afresh on each read: the residual could not be stored
            check(not hasattr(base, "quantized_state"),
                  f"{module_name}: init_lora_weights={init!r} moves the top-r part of the base weight into A and B "
                  "and leaves the residual in the base, which a quantised layer "
                  f"({getattr(getattr(base, 'fmt', None), 'method', '?')}) cannot hold (peft refuses it too); "
                  "initialise on the float model and quantise after (quantize_base on the PeftModel), or use "
                  "init_lora_weights='loftq'")
            weight = base.weight.T if adapter.transposed else base.weight
            check(r <= min(weight.shape),
                  f"{module_name}: init_lora_weights={init!r} needs r <= min(out, in) = {min(weight.shape)} for this "
                  f"{tuple(weight.shape)} layer; got r={r} (lower r, or give this layer a smaller rank in rank_pattern)")
            a, b = principal_factors(weight, r, scaling, init)
            with torch.no_grad():
                adapter.lora_A.weight.copy_(a)
                adapter.lora_B.weight.copy_(b)
            adapter.mutates_base = True
            # the factors as created, to give the base its principal part back if the adapter goes unmerged
            adapter.register_buffer("initial_A", a.detach().clone(), persistent=False)
            adapter.register_buffer("initial_B", b.detach().clone(), persistent=False)
        else:
            adapter.reset(True if changes_base(init) else init)
        if config.use_dora:
            adapter.init_magnitude(base)
        return adapter

    def inject(self, host: Any, config: LoraConfig, adapter_name: str) -> None:
        """Inject as every wrap method does, then (PiSSA, OLoRA) leave only the residual in the base
        weights, or (LoftQ) replace them by their quantised form. Both happen after every adapter was
        built, so a bad value still leaves the model as it was.

        Raises:
            ConfigError: LoftQ on a model that already holds another adapter (the quantised base would change
                that adapter's outputs, through the layers it adapts or the layers before them).
        """
        if config.init_lora_weights == "loftq":
            others = [n for n in host.peft_config if n != adapter_name]
            check(not others, f"init_lora_weights='loftq' replaces the base weights of the layers it adapts by their "
                              f"quantised form, and the model already holds adapter(s) {others}, whose outputs that "
                              "would change (through those layers or the ones they feed); add the LoftQ adapter first, "
                              "or to a fresh model")
        super().inject(host, config, adapter_name)
        if config.trainable_token_indices is not None:  # (a failure here: the host removes the adapter whole)
            from peftkit.methods.trainable_tokens import add_lora_token_rows

            add_lora_token_rows(host, adapter_name, config.trainable_token_indices)
        if config.init_lora_weights == "loftq":
            from peftkit.quant.loftq import apply_pending

            apply_pending(host.model, adapter_name)
            return
        if not changes_base(config.init_lora_weights):
            return
        others = [n for n in host.public_names() if n != host.owner(adapter_name)]
        if others:  # peft does the same silently
            warnings.warn(f"init_lora_weights={config.init_lora_weights!r} leaves only the residual of the top-r part in "
                          f"the base weights of the layers it adapts, which the model's other adapter(s) {others} also "
                          "run on: their outputs change while this adapter exists (deleting it gives the base weights "
                          "back). Add such an adapter first, or to a fresh model, to keep the others' outputs",
                          UserWarning, stacklevel=4)
        for _, layer in host.wrappers():
            if isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters:
                adapter = layer.adapters[adapter_name]
                if adapter.mutates_base:
                    with torch.no_grad():
                        weight = layer.weight
                        weight.copy_((weight.float() - adapter.delta_weight(layer)).to(weight.dtype))

    def convert_for_initial_model(self, model: Any, adapter_name: str, initial_dir: str) -> tuple[PeftConfig, dict]:
        """PiSSA/OLoRA to plain LoRA on the original base (see :func:`~peftkit.methods.lora_init.convert_to_plain_lora`)."""
        return convert_to_plain_lora(model, adapter_name, initial_dir)

    def trainable_base_params(self, model: nn.Module, config: LoraConfig, targets: list[str]) -> list[str]:
        return trainable_biases(model, config.bias, targets)


def trainable_biases(model: nn.Module, bias: str, targets: list[str]) -> list[str]:
    """Names of the base biases a ``bias`` option trains: ``"all"`` every bias of the model, ``"none"``
    none, anything else (``"lora_only"``, ``"vera_only"``) the biases of the adapted layers."""
    if bias == "all":  # the model's own biases: not those inside adapters or trained copies (modules_to_save)
        from peftkit.layers import ModulesToSaveWrapper

        # found by module type, so that a user's module that happens to be called "adapters" or
        # "modules_to_save" keeps its bias trained, as in peft
        kinds = ((AdaptedLayer, "adapters."), (ModulesToSaveWrapper, "modules_to_save."))
        inside = tuple(f"{n}.{child}" if n else child for n, m in model.named_modules()
                       for kind, child in kinds if isinstance(m, kind))
        return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and not n.startswith(inside)]
    if bias == "none":
        return []
    return [f"{t}.base_layer.bias" for t in targets if getattr(model.get_submodule(t).base_layer, "bias", None)
            is not None]


def lora_from_cli(args: Any, config_cls: type[LoraConfig] = LoraConfig) -> LoraConfig:
    """Build a ``config_cls`` (default :class:`LoraConfig`, or a subclass) from ``peftkit train`` options ``args``:
    ``--r`` (default 8), ``--lora-alpha``, ``--lora-dropout``, ``--target-modules`` (default ``"all-linear"``),
    ``--task-type``.

    Raises:
        ConfigError: invalid values (from the config's validation).
    """
    return config_cls(r=args.r or 8, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.target_modules or "all-linear", task_type=args.task_type)


def _preset(**fields: Any) -> Any:
    def build(args: Any) -> LoraConfig:
        config = lora_from_cli(args)
        for key, value in fields.items():
            setattr(config, key, value)
        config.validate()
        return config

    build.defining_fields = dict(fields)  # what makes the variant itself (an --option may not undo it)
    return build


_TUNER = LoraTuner()
register_method(MethodSpec(
    name="lora", config_cls=LoraConfig, family="reparameterised", kind="wrap", mergeable=True,
    paper=LORA_PAPER, tuner=_TUNER, cli_config=lora_from_cli,
))
for _name, _paper, _fields in (("dora", DORA_PAPER, {"use_dora": True}),
                               ("pissa", PISSA_PAPER, {"init_lora_weights": "pissa"}),
                               ("olora", OLORA_PAPER, {"init_lora_weights": "olora"})):
    register_method(MethodSpec(
        name=_name, config_cls=LoraConfig, family="reparameterised", kind="wrap", mergeable=True, paper=_paper,
        tuner=_TUNER, cli_config=_preset(**_fields), variant_of="lora",
    ))
