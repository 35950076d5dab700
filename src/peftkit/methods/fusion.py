"""AdapterFusion: attention over the outputs of several trained bottleneck adapters at each site.

Paper: Pfeiffer, Kamath, Rücklé, Cho and Gurevych, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning", 2020, arXiv:2005.00247.

Equation, at a site with sub-layer output ``u`` (the serial adapters' input) and the changes
``o_n = A_n(u) - u`` the ``N`` fused adapters make there:
``p = softmax_n((W_Q u) . (W_K o_n))``, ``u' = u + sum_n p_n W_V o_n`` (AdapterHub's "dynamic" fusion: query
from the sub-layer output, keys and values from the adapter outputs, the residual added after).
``W_V`` starts at the identity and ``W_Q``, ``W_K`` near zero, so a new fusion averages its adapters, and a
fusion of one adapter is that adapter. The training loss gets ``lambda sum_sites ||I - W_V||^2``
(``regularization_weight``, the paper's regulariser keeping ``W_V`` near the identity). Trainable
parameters per site: ``3 d^2 + 2 d`` (``W_Q``, ``W_K`` with biases, ``W_V`` without), or ``d^2`` at a site
that holds only one of the fused adapters (its softmax has one entry, so it has no ``W_Q``, ``W_K``); the
fused adapters stay frozen.

A fusion is an adapter of its own (``add_fusion`` or ``AdapterFusionConfig``) that runs the fused adapters
itself: activate the fusion alone (``set_adapter(fusion_name)``). Its file holds the fusion layers and a
copy of every fused adapter (``fused.<name>.<that adapter's file key>``; their configs in
``adapter_config.json``), so loading it onto a fresh model restores the fused adapters under their
names as well; loading it where they exist loads the saved copies into them, with a warning naming those
whose weights this changes.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import MethodSpec, PeftConfig, check, register_method
from peftkit.layers import AdaptedLayer, Adapter
from peftkit.methods.adapters import BottleneckConfig, serial_sites
from peftkit.tuners import Tuner

FUSION_PAPER = ("AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al., 2020, "
                "arXiv:2005.00247)")


@dataclass
class AdapterFusionConfig(PeftConfig):
    """Configuration of an AdapterFusion layer over trained serial bottleneck adapters.

    Args:
        adapters: the names of the fused adapters (at least one, no repeats), each a serial bottleneck
            adapter (Houlsby, Pfeiffer, Compacter, ...) of the model.
        adapter_configs: name -> config dict of each fused adapter; filled when the fusion is saved, and
            used when loading it onto a model that lacks them. Leave empty.
        regularization_weight: ``lambda`` of the ``||I - W_V||^2`` penalty, >= 0 (default 0.01, AdapterHub's).
        modules_to_save: modules trained in full and saved with the fusion (``SEQ_CLS`` adds the head).

    Raises:
        ConfigError: an empty or repeated ``adapters`` list, a negative ``regularization_weight``; when
            added, a name that is not an adapter of the model (and not saved with the fusion) or an adapter
            that is not a serial bottleneck adapter.

    Paper: AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al., 2020, arXiv:2005.00247).
    """

    peft_type = "ADAPTER_FUSION"
    adapters: list[str] = field(default_factory=list)
    adapter_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    regularization_weight: float = 0.01
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        check(isinstance(self.adapters, list) and bool(self.adapters) and all(isinstance(a, str) for a in self.adapters),
              f"adapters={self.adapters!r} is not valid; give the names of the adapters to fuse, e.g. ['sst2', 'rte']")
        repeated = sorted({a for a in self.adapters if self.adapters.count(a) > 1})
        check(not repeated, f"adapters={self.adapters!r} names {repeated} more than once")
        w = self.regularization_weight
        check(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0,
              f"regularization_weight={w!r} must be a number >= 0")


class FusionAdapter(Adapter):
    """The fusion layer at one site: attention over the fused adapters present there.

    Args:
        fused: names of the fused adapters at this site, in fusion order. width: ``d``.

    Shapes: ``y: (..., d) -> (..., d)``; ``fusion_query``/``fusion_key``: ``Linear(d, d)`` (None with one
    fused adapter: its weight is 1), ``fusion_value``: ``Linear(d, d, bias=False)``.
    """

    mergeable = False

    def __init__(self, fused: list[str], width: int) -> None:
        super().__init__()
        self.fused = list(fused)
        self.fusion_query = self.fusion_key = None
        if len(fused) > 1:
            self.fusion_query = nn.Linear(width, width)
            self.fusion_key = nn.Linear(width, width)
            for linear in (self.fusion_query, self.fusion_key):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
        self.fusion_value = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.fusion_value.weight.copy_(torch.eye(width))

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        # the fused adapters cannot be deleted while the fusion exists (AdapterModel.delete_adapter refuses)
        # each adapter's change before its site's finish: at a post-LN Add & Norm (Pfeiffer placement) A_n(h),
        # and the fused sum then goes through the LayerNorm with the residual, as in AdapterHub
        adapters = [layer.adapters[name] for name in self.fused]
        changes = [a.change(layer, x, y) for a in adapters]
        dtype = self.fusion_value.weight.dtype
        if self.fusion_key is None:
            return adapters[0].finish(layer, x, y, self.fusion_value(changes[0].to(dtype)).to(y.dtype))
        o = torch.stack(changes, dim=-2).to(dtype)  # (..., N, d)
        q = self.fusion_query(y.to(dtype)).unsqueeze(-1)  # (..., d, 1)
        p = torch.softmax((self.fusion_key(o) @ q).squeeze(-1), dim=-1)  # (..., N)
        return adapters[0].finish(layer, x, y, (p.unsqueeze(-2) @ self.fusion_value(o)).squeeze(-2).to(y.dtype))

    def value_penalty(self) -> Tensor:
        """``||I - W_V||^2`` (squared Frobenius norm)."""
        w = self.fusion_value.weight
        return (torch.eye(w.shape[0], device=w.device, dtype=w.dtype) - w).pow(2).sum()

    def extra_repr(self) -> str:
        return f"fused={self.fused}"


class FusionTuner(Tuner):
    """Adds the fused adapters the model lacks (from ``adapter_configs``), then a :class:`FusionAdapter` on every
    layer that holds any of them."""

    method = "AdapterFusion"

    def inject(self, host: Any, config: AdapterFusionConfig, adapter_name: str) -> None:
        """Add a fusion layer over ``config.adapters`` on every layer that holds one of them; fused adapters the
        model lacks are added from ``config.adapter_configs`` (in inference mode: frozen).

        Raises:
            ConfigError: ``adapter_name`` is one of the fused adapters' names, a fused adapter is neither in the
                model nor in ``adapter_configs``, one is not a serial bottleneck adapter, adapters placed by the
                model's table sit at different sites of one sub-layer (e.g. a Pfeiffer adapter after the FFN's
                Add & Norm and a Houlsby one on its output projection), or adapters at the Add & Norm LayerNorms
                (``original_ln_before``) differ in ``original_ln_after``.
        """
        check(adapter_name not in config.adapters,
              f"the fusion cannot be named {adapter_name!r}: that is the name of one of the adapters it fuses "
              f"{config.adapters}; give it another adapter_name")
        public = [n for n in host.public_names() if n != adapter_name]  # not the fusion being added
        missing = [n for n in config.adapters if n not in public]
        unknown = [n for n in missing if n not in config.adapter_configs]
        check(not unknown, f"cannot fuse unknown adapter(s) {unknown}; this model has {public}")
        parts = {n: host.peft_config[n] if n in public else PeftConfig.from_dict(config.adapter_configs[n])
                 for n in config.adapters}
        for n, cfg in parts.items():
            check(isinstance(cfg, BottleneckConfig) and not cfg.is_parallel,
                  f"adapter {n!r} is {cfg.peft_type}{' (parallel)' if getattr(cfg, 'is_parallel', False) else ''}; "
                  "AdapterFusion fuses serial bottleneck adapters (Houlsby, Pfeiffer, Compacter, ...)")
        placed = {n: serial_sites(cfg, host.model) for n, cfg in parts.items()}
        for part in ("attention", "FFN"):
            where = {n: p[part] for n, p in placed.items() if part in p}
            check(len(set(where.values())) <= 1,
                  f"adapters {sorted(where)} sit at different sites ({', '.join(f'{n!r} {w}' for n, w in where.items())}"
                  f"); AdapterFusion attends over the adapters at one site, and these would each be fused alone. Fuse "
                  "adapters placed alike: the same original_ln_before (Pfeiffer's True, Houlsby's False) and, on "
                  "pre-LN models, the same pre_ln_site")
        after = {n: cfg.original_ln_after for n, cfg in parts.items() if cfg.original_ln_before}
        check(len(set(after.values())) <= 1,
              f"adapters {sorted(after)} sit at the Add & Norm LayerNorms but differ in original_ln_after ({after}); "
              "AdapterFusion sums their changes before one LayerNorm pass, so fuse adapters that agree on it")
        for n in missing:
            parts[n].inference_mode = True
            host.add_adapter(n, parts[n])
        layers = [w for _, w in host.wrappers() if isinstance(w, AdaptedLayer)
                  and any(n in w.adapters for n in config.adapters)]
        for w in layers:
            present = [n for n in config.adapters if n in w.adapters]
            fusion = FusionAdapter(present, w.adapters[present[0]].width)
            # (on a pre-LN block's output the fused adapters are serial there, and so is their fusion)
            fusion.on_output = getattr(w.adapters[present[0]], "on_output", False)
            fusion.found = [n for n in present if n not in missing]  # the model's own before this fusion came
            w.add(adapter_name, fusion)

    def before_load(self, host: Any, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Warn when the file's copy of a fused adapter the model already had (not one this load created)
        differs from that adapter's weights, which loading replaces by the copy (as the fusion was trained with
        it)."""
        from peftkit.formats.hf_peft import _file_tensors

        found = {n for _, w in host.wrappers() if isinstance(w, AdaptedLayer) and adapter_name in w.adapters
                 for n in getattr(w.adapters[adapter_name], "found", ())}
        replaced = []
        for space, other in self.bundled(host, adapter_name):
            if other in found:
                head = space + "."
                live = _file_tensors(host, other, export=False)
                if any(head + k in tensors and not torch.equal(tensors[head + k].to(v), v.detach())
                       for k, v in live.items()):
                    replaced.append(other)
        if replaced:
            warnings.warn(f"loading fusion {adapter_name!r} replaces the weights of the model's adapter(s) {replaced} by "
                          "the copies saved with the fusion, which differ (the fusion was trained with them); save "
                          "those adapters first to keep their current weights", UserWarning, stacklevel=2)

    def bundled(self, host: Any, adapter_name: str) -> list[tuple[str, str]]:
        return [(f"fused.{n}", n) for n in host.peft_config[adapter_name].adapters]

    def export_config(self, host: Any, adapter_name: str) -> PeftConfig:
        """The fusion config with the fused adapters' saved configs in ``adapter_configs``."""
        config = host.peft_config[adapter_name]
        saved = {n: host.tuner(n).export_config(host, n).to_dict() for n in config.adapters}
        return dataclasses.replace(config, adapter_configs=saved)

    def regularizer(self, host: Any, adapter_name: str) -> Tensor | None:
        weight = host.peft_config[adapter_name].regularization_weight
        layers = [w.adapters[adapter_name] for _, w in host.wrappers()
                  if isinstance(w, AdaptedLayer) and adapter_name in w.adapters]
        if not weight or not layers:
            return None
        return weight * torch.stack([a.value_penalty() for a in layers]).sum()


def add_fusion(model: Any, adapters: list[str], fusion_name: str = "fusion", **options: Any) -> None:
    """Add an AdapterFusion layer named ``fusion_name`` over the trained serial bottleneck ``adapters`` of
    ``model`` (a :class:`peftkit.PeftModel`); AdapterHub's ``add_adapter_fusion(Fuse(...))``. It is added
    inactive: ``model.set_adapter(fusion_name)`` activates it, training only the fusion layers.

    Args:
        options: other :class:`AdapterFusionConfig` fields (``regularization_weight``, ``task_type``, ...).

    Raises:
        ConfigError: see :class:`AdapterFusionConfig`; the model is left unchanged.

    Paper: AdapterFusion: Non-Destructive Task Composition for Transfer Learning (Pfeiffer et al., 2020, arXiv:2005.00247).
    """
    # a string stays one (refused) value rather than becoming a list of its letters
    fused = adapters if isinstance(adapters, str) else list(adapters)
    model.add_adapter(fusion_name, AdapterFusionConfig(adapters=fused, **options))


register_method(MethodSpec(
    name="adapter-fusion", config_cls=AdapterFusionConfig, family="multi-task", kind="compose", mergeable=False,
    paper=FUSION_PAPER, tuner=FusionTuner(), aliases=("fusion",),
))
