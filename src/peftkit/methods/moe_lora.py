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
the tuner's ``regularizer`` hook.
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
        #: the load-balancing term of the latest training forward that ran this router (see :attr:`last_aux`)
        self._aux = _Transient()
        #: that forward's ``AdapterContext.forward_id`` (the tuner's regulariser uses only current terms)
        self.aux_forward_id: int | None = None

    @property
    def last_aux(self) -> Tensor | None:
        """The load-balancing term of the latest training forward (with its graph), or None. It is not
        copied with the model (``copy.deepcopy``, pickling): a copy starts without one."""
        return self._aux.get("aux")

    @last_aux.setter
    def last_aux(self, value: Tensor | None) -> None:
        self._aux["aux"] = value

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
        if not self.training:
            self.last_aux = None  # not keeping the graph of a training forward alive after it
        else:
            flat_g, flat_p = gates.reshape(-1, self.num_experts), probs.reshape(-1, self.num_experts)
            load = (flat_g > 0).float().mean(0) / self.top_k
            self.last_aux = self.num_experts * (load * flat_p.mean(0)).sum()
            self.aux_forward_id = None if layer._ctx is None else layer._ctx.forward_id
        z = self.lora_A(self.lora_dropout(x))
        z = z * gates.to(z.dtype).repeat_interleave(self.r, dim=-1)
        return torch.add(y, self.lora_B(z).to(y.dtype), alpha=self.scaling)


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
        """``coef`` times the mean load-balancing term of the routers that ran in the latest forward (in
        training mode, on rows of this adapter); None when none did (an eval forward, a mixed batch
        without this adapter's rows, a forward under ``disable_adapter``).

        Raises:
            RuntimeError: the routers train but the latest forward's terms carry no gradient (e.g. reentrant
                gradient checkpointing ran the layers under ``no_grad``), so they could not learn to balance.
        """
        coef = host.peft_config[adapter_name].router_aux_loss_coef
        adapters = [layer.adapters[adapter_name] for _, layer in host.wrappers()
                    if isinstance(layer, AdaptedLayer) and adapter_name in layer.adapters]
        terms = [a.last_aux for a in adapters if a.last_aux is not None and a.aux_forward_id == host.ctx.forward_id]
        if not coef or not terms:
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
