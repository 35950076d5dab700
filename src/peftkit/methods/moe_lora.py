"""MoE-LoRA: several LoRA experts per layer behind a learned top-k router.

Paper: Zadouri et al., "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for
Instruction Tuning" (MoLoRA), 2023, arXiv:2309.05444; top-k routing and the load-balancing loss as in
Fedus et al., "Switch Transformers", 2021, arXiv:2101.03961.

Equation, per token ``x``: ``p = softmax(W_r x)``, ``T = top_k(p)``,
``h = W0 x + (alpha / r) * sum_{e in T} (p_e / sum_{j in T} p_j) B_e A_e x`` for ``top_k >= 2``; with
``top_k = 1`` the chosen expert is weighted by ``p_e`` itself, as in Switch Transformers (renormalised,
its gate would always be 1 and the router would get no gradient from the task loss).
Trainable parameters per adapted ``(out, in)`` layer: ``E * r * (in + out) + E * in`` (E experts).

All experts' ``A`` run as one ``(E*r, in)`` projection and all ``B`` as one ``(out, E*r)``
projection; the router's gates zero the columns of unselected experts, so no token is gathered or
scattered. The router depends on the input, so MoE-LoRA does not merge into the base weight.
The auxiliary load-balancing loss ``coef * E * sum_e f_e * P_e`` (``f_e``: fraction of routing slots
given to expert ``e``, ``P_e``: its mean router probability) is added to the training loss through
the tuner's ``regularizer`` hook. When the call to :class:`~peftkit.PeftModel` has a 2-D
``attention_mask``, ``f_e`` and ``P_e`` are averaged over the real tokens only, as in transformers'
``load_balancing_loss_func(..., attention_mask)`` (padding would otherwise pull the balance towards the
experts the pad token goes to). Each layer records its per-token choices and probabilities and the
call's mask; the average is taken when the loss term is asked for, outside the layers, so a layer that
activation checkpointing recomputes in ``backward()`` (re-entrant or not) needs no mask, and its
recomputation does not replace the record of the forward that the loss term came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftkit.config import MethodSpec, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.methods.lora import LoraConfig, LoraTuner, _dropout
from peftkit.targeting import linear_types
from peftkit.tuners import WrapTuner

PAPER = ("Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning "
         "(Zadouri et al., 2023, arXiv:2309.05444)")


@dataclass
class MoeLoraConfig(LoraConfig):
    """MoE-LoRA configuration: :class:`~peftkit.LoraConfig`'s fields plus the experts.

    Args:
        num_experts: LoRA experts per adapted layer (E >= 2). Default 4.
        top_k: experts used per token, 1 <= top_k <= num_experts. Default 2. Their gates are renormalised
            to sum to 1; with top_k=1 the one expert is weighted by its router probability (Switch).
        router_aux_loss_coef: weight of the load-balancing loss (>= 0). Default 0.01.

    ``r`` is each expert's rank. ``use_dora``, ``use_qalora``, ``loftq_config``, ``eva_config``, ``lora_bias``
    and ``init_lora_weights`` other than True/False are refused (:class:`~peftkit.ConfigError`).

    Raises:
        ConfigError: as LoraConfig, or num_experts < 2, top_k outside [1, num_experts], coef < 0.

    Paper: Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning (Zadouri et al., 2023, arXiv:2309.05444).
    """

    peft_type = "MOELORA"
    num_experts: int = 4
    top_k: int = 2
    router_aux_loss_coef: float = 0.01

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.num_experts, int) and self.num_experts >= 2,
              f"num_experts={self.num_experts!r} must be an integer >= 2")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
              f"top_k={self.top_k!r} must lie in [1, num_experts={self.num_experts}]")
        check(self.router_aux_loss_coef >= 0, f"router_aux_loss_coef={self.router_aux_loss_coef!r} must be >= 0")
        check(not self.lora_bias, "MoE-LoRA does not support lora_bias=True")
        # LoRA options the experts do not implement: refused rather than saved and silently ignored
        unsupported = {"use_dora": self.use_dora, "use_qalora": self.use_qalora,
                       "loftq_config": bool(self.loftq_config), "eva_config": self.eva_config is not None}
        bad = [k for k, v in unsupported.items() if v]
        check(not bad, f"MoE-LoRA does not support {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}; its experts "
                       "are plain LoRA (leave these at their defaults)")
        check(self.init_lora_weights in (True, False),
              f"init_lora_weights={self.init_lora_weights!r} is not supported by MoE-LoRA; use True (A Kaiming-uniform, "
              "B zero: the experts start as identity) or False (both random)")


class _Transient(dict):
    """A dict of per-forward values that copies of its owner do not share or carry: ``copy.deepcopy`` and
    pickling give an empty one (a tensor with autograd history cannot be deep-copied)."""

    def __deepcopy__(self, memo: dict) -> _Transient:
        return _Transient()

    def __reduce__(self) -> tuple:
        return _Transient, ()


class MoeLoraLinear(Adapter):
    """MoE-LoRA on ``nn.Linear`` / GPT-2 ``Conv1D``.

    Shapes: ``x: (..., in) -> (..., out)``; ``lora_A.weight: (E*r, in)``, ``lora_B.weight: (out, E*r)``,
    ``lora_router.weight: (E, in)``.
    """

    mergeable = False

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 num_experts: int, top_k: int) -> None:
        super().__init__()
        self.r, self.scaling, self.num_experts, self.top_k = r, scaling, num_experts, top_k
        self.lora_dropout = _dropout(dropout)
        self.lora_A = nn.Linear(in_features, num_experts * r, bias=False)
        self.lora_B = nn.Linear(num_experts * r, out_features, bias=False)
        self.lora_router = nn.Linear(in_features, num_experts, bias=False)
        #: the routing of the latest training forward that ran this router (see :attr:`last_aux`)
        self._aux = _Transient()
        #: that forward's ``AdapterContext.forward_id`` (the tuner's regulariser uses only current terms)
        self.aux_forward_id: int | None = None

    @property
    def last_aux(self) -> Tensor | None:
        """The load-balancing term ``E * sum_e f_e * P_e`` of the latest training forward (a scalar with its
        graph to the router), or None after an eval forward or before any. ``f_e`` and ``P_e`` are averaged
        over the tokens the call's ``attention_mask`` marks as real (all tokens without one; none real gives 0).
        The record it is computed from is not copied with the model (``copy.deepcopy``, pickling): a copy starts
        without one."""
        if "probs" not in self._aux:
            return None
        chosen, probs, weights = self._aux["chosen"].float(), self._aux["probs"], self._aux["weights"]
        if weights is None:
            load, share = chosen.mean(0) / self.top_k, probs.mean(0)
        else:
            real = weights.sum().clamp_min(1)
            load = (chosen * weights[:, None]).sum(0) / (real * self.top_k)
            share = (probs * weights[:, None]).sum(0) / real
        return self.num_experts * (load * share).sum()

    def reset(self, init: bool | str) -> None:
        """A Kaiming-uniform, B zero (identity at start) unless ``init`` is False; router small normal."""
        nn.init.normal_(self.lora_router.weight, std=0.02)
        if init is False:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(gates, probs)`` for ``x: (..., in)``: per-token expert weights ``(..., E)`` (top-k renormalised for
        ``top_k >= 2``, ``p_e`` itself for ``top_k = 1``; zero elsewhere) and the full router probabilities
        ``(..., E)``, both float32."""
        probs = F.softmax(self.lora_router(x).float(), dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            top = top / top.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, idx, top)
        return gates, probs

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        if x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        gates, probs = self.gates(x)
        ctx = layer._ctx
        if not self.training:
            self._aux.clear()  # not keeping the graph of a training forward alive after it
        elif ctx is None or not ctx.recomputing():  # (a checkpointed layer's recomputation keeps the record)
            self._aux.update(chosen=(gates > 0).reshape(-1, self.num_experts),
                             probs=probs.reshape(-1, self.num_experts), weights=_token_weights(self, layer, x))
            self.aux_forward_id = None if ctx is None else ctx.forward_id
        z = self.lora_A(self.lora_dropout(x))
        z = z * gates.to(z.dtype).repeat_interleave(self.r, dim=-1)
        return torch.add(y, self.lora_B(z).to(y.dtype), alpha=self.scaling)


def _token_weights(adapter: MoeLoraLinear, layer: AdaptedLayer, x: Tensor) -> Tensor | None:
    """Per-token weights ``(batch * seq,)`` float32, 1 for a real token and 0 for padding, for the input
    ``x: (batch, seq, in)`` of ``adapter`` on ``layer``: the running call's attention mask (see
    :class:`~peftkit.layers.AdapterContext`), its rows of this adapter's group in a mixed-adapter batch. None
    (every token counts) without a mask, or when ``x`` is not laid out as the mask's tokens (a per-example
    input ``(batch, in)``, a decoder of an encoder-decoder model)."""
    ctx = layer._ctx
    mask = None if ctx is None else ctx.attention_mask
    if mask is None or x.dim() != 3:
        return None
    if ctx.row_names is not None and x.shape[0] != mask.shape[0]:  # one adapter's rows of a mixed batch
        name = next(n for n, a in layer.adapters.items() if a is adapter)
        try:
            rows = dict(ctx.groups(mask.shape[0], mask.device)).get(name)
        except ValueError:  # a mask of another number of rows than the adapter names describe
            return None
        if rows is None:
            return None
        mask = mask.index_select(0, rows)
    if mask.shape != x.shape[:2]:
        return None
    return mask.reshape(-1).to(device=x.device, dtype=torch.float32)


class MoeLoraTuner(WrapTuner):
    """Builds MoE-LoRA adapters; adds the routers' load-balancing loss while training."""

    method = "MoE-LoRA"
    # bias="all" / "lora_only": the base biases train, as with LoRA (they were saved in the config and ignored)
    trainable_base_params = LoraTuner.trainable_base_params

    def supported_types(self) -> tuple[type[nn.Module], ...]:
        return linear_types()

    def make_adapter(self, base: nn.Module, config: MoeLoraConfig, module_name: str) -> Adapter:
        """A :class:`MoeLoraLinear` of ``num_experts`` experts of this module's rank ``r`` (after the
        patterns), scaled by ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
        r, alpha = config.rank_and_alpha(module_name)
        transposed = not isinstance(base, nn.Linear)
        in_f, out_f = base.weight.shape if transposed else base.weight.shape[::-1]
        adapter = MoeLoraLinear(in_f, out_f, r, config.scaling_for(r, alpha), config.lora_dropout,
                                config.num_experts, config.top_k)
        adapter.reset(config.init_lora_weights)
        return adapter

    def regularizer(self, host: Any, adapter_name: str) -> Tensor | None:
        """``coef`` times the mean load-balancing term (:attr:`MoeLoraLinear.last_aux`: over the real tokens when
        the call had an attention mask) of the routers that ran in the latest forward (in training mode, on rows
        of this adapter); None when none did (an eval forward, a mixed batch without this adapter's rows, a
        forward under ``disable_adapter``) or when ``router_aux_loss_coef`` is 0.

        Raises:
            RuntimeError: the routers train but the latest forward's terms carry no gradient (e.g. reentrant
                gradient checkpointing ran the layers under ``no_grad``), so they could not learn to balance.
        """
        coef = host.peft_config[adapter_name].router_aux_loss_coef
        if not coef:
            return None
        adapters = [layer.adapters[adapter_name] for _, layer in host.wrappers()
                    if isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters]
        current = (a.last_aux for a in adapters if a.aux_forward_id == host.ctx.forward_id)
        terms = [t for t in current if t is not None]
        if not terms:
            return None
        trains = any(p.requires_grad for a in adapters for p in a.lora_router.parameters())
        if trains and torch.is_grad_enabled() and not any(t.requires_grad for t in terms):
            # the training forward ran without autograd: reentrant activation checkpointing runs the layers'
            # first pass under no_grad (and their recomputation only in backward, after this term is taken)
            raise RuntimeError(f"MoE-LoRA adapter {adapter_name!r}: the routers' load-balancing loss of the latest "
                               "forward has no gradient (the forward ran without autograd, e.g. under reentrant "
                               "gradient checkpointing), so the routers would not learn to balance; use "
                               "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                               "or set router_aux_loss_coef=0")
        return coef * torch.stack(terms).mean()


def moe_lora_from_cli(args: Any) -> MoeLoraConfig:
    """MoE-LoRA from ``peftkit train`` options ``args`` (``--r`` default 8, ``--lora-alpha``, ``--lora-dropout``,
    ``--target-modules`` default ``"all-linear"``; the config's defaults of 4 experts, top-2, unless ``--option``
    says otherwise)."""
    return MoeLoraConfig(r=args.r or 8, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=args.target_modules or "all-linear", task_type=args.task_type)


register_method(MethodSpec(
    name="moe-lora", config_cls=MoeLoraConfig, family="multi-task", kind="wrap", mergeable=False, paper=PAPER,
    tuner=MoeLoraTuner(), cli_config=moe_lora_from_cli,
))
