"""Composed adapters: several PEFT methods stacked on one model under one adapter name.

Paper: He, Zhou, Ma, Berg-Kirkpatrick and Neubig, "Towards a Unified View of Parameter-Efficient
Transfer Learning", 2021, arXiv:2110.04366 (the design space of combined methods; UniPELT and the MAM
adapter in :mod:`peftkit.methods.hybrid` are compositions).

Equation: for parts ``m_1 .. m_k`` the adapted model is ``f_{m_k} o ... o f_{m_1}(model)``: every part
changes the frozen model as it would alone; parts at the same layer apply in the listed order (input
transforms and parameter substitutions first, then output updates). Trainable parameters: the sum of
the parts' (plus ``modules_to_save``, e.g. the classification head with ``task_type="SEQ_CLS"``).

Each part becomes an adapter of the host named ``<name>#<index>`` (:meth:`AdapterModel.add_member`;
user adapter names cannot contain ``#``), so layers and tuners treat it like any adapter, while users
only see ``<name>``: it is activated, trained, merged, saved and deleted as one. The file holds every
part's own file tensors under ``parts.<index>.`` (e.g. ``parts.0.base_model.model.<module>.lora_A.weight``,
``parts.1.prompt_embeddings``), and ``adapter_config.json`` lists the parts' configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peftkit.config import ConfigError, MethodSpec, PeftConfig, check, get_method, register_method
from peftkit.tuners import Tuner

UNIFIED_VIEW_PAPER = ("Towards a Unified View of Parameter-Efficient Transfer Learning (He et al., 2021, "
                      "arXiv:2110.04366)")


@dataclass
class ComposedConfig(PeftConfig):
    """Several methods' configs applied together as one adapter (AdapterHub calls this ``ConfigUnion``).

    Args:
        configs: the parts, at least one, each a :class:`PeftConfig` of a registered method (or its
            ``to_dict()`` form, as read from ``adapter_config.json``). Parts are injected and applied in
            this order.
        modules_to_save: whole modules trained and saved with the composition (parts may not set their own).
        task_type: as :class:`PeftConfig`; None takes the parts' common ``task_type``.

    Limits: at most one soft-prompt part (prompt tuning, P-tuning, prefix tuning: they would fight over
    the input); no composition or fusion inside a composition; a parallel adapter (``is_parallel``,
    which wraps whole sub-layers and hides the layers inside them from later parts) must come after the
    parts that wrap or select layers.

    Raises:
        ConfigError: no parts, a part that is not a config, one of the limits above, parts with
            ``modules_to_save``, or parts whose ``task_type`` differs from the composition's.

    Paper: Towards a Unified View of Parameter-Efficient Transfer Learning (He et al., 2021, arXiv:2110.04366); AdapterHub: A Framework for Adapting Transformers (Pfeiffer et al., 2020, arXiv:2007.07779).
    """

    peft_type = "COMPOSED"
    configs: list[Any] = field(default_factory=list)
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        check(isinstance(self.configs, list) and bool(self.configs),
              f"configs={self.configs!r} is not valid; give a non-empty list of PEFT configs (e.g. "
              "[LoraConfig(...), PrefixTuningConfig(...)])")
        parts = []
        for i, part in enumerate(self.configs):
            if isinstance(part, dict):
                part = PeftConfig.from_dict(part)
            check(isinstance(part, PeftConfig), f"configs[{i}] is a {type(part).__name__}; each part must be a "
                                                "PeftConfig (e.g. LoraConfig) or its dict form")
            parts.append(part)
        kinds = [get_method(p.peft_type).kind for p in parts]
        for i, (part, kind) in enumerate(zip(parts, kinds, strict=True)):
            check(kind != "compose", f"configs[{i}] is a {type(part).__name__}; a composition cannot hold another "
                                     "composition or a fusion - list its parts directly")
            check(not getattr(part, "modules_to_save", None),
                  f"configs[{i}] sets modules_to_save={getattr(part, 'modules_to_save', None)!r}; set modules_to_save on the "
                  "ComposedConfig instead (the composition trains and saves them once)")
        prompts = [i for i, k in enumerate(kinds) if k == "prompt"]
        check(len(prompts) <= 1, f"configs{prompts} are soft-prompt methods; a composition holds at most one "
                                 "(two would both rewrite the input)")
        types = {p.task_type for p in parts} - {None}
        if self.task_type is None and len(types) == 1:
            self.task_type = types.pop()
        bad = [i for i, p in enumerate(parts) if p.task_type not in (None, self.task_type)]
        check(not bad, f"configs{bad} have task_type {[parts[i].task_type for i in bad]} but the composition has "
                       f"task_type={self.task_type!r}; give the parts the same task_type or none")
        self.configs = parts

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`PeftConfig.to_dict`, with ``configs`` as the parts' own dicts."""
        out = super().to_dict()
        out["configs"] = [p.to_dict() for p in self.configs]
        return out


class ComposedTuner(Tuner):
    """Injects each part as a member adapter of the composition (see the module docstring)."""

    method = "composition"

    def inject(self, host: Any, config: ComposedConfig, adapter_name: str) -> None:
        for part in config.configs:
            part.inference_mode = config.inference_mode
            host.add_member(adapter_name, part)

    def bundled(self, host: Any, adapter_name: str) -> list[tuple[str, str]]:
        return [(f"parts.{i}", part) for i, part in enumerate(host.members.get(adapter_name, ()))]

    def export_config(self, host: Any, adapter_name: str) -> PeftConfig:
        """The composition with each part's own saved config (e.g. SoRA's kept ranks)."""
        parts = [host.tuner(p).export_config(host, p) for p in host.members[adapter_name]]
        return dataclasses.replace(host.peft_config[adapter_name], configs=parts)


def composed_from_cli(args: Any) -> ComposedConfig:
    """``peftkit train --method composed --option 'configs=[{"peft_type": "LORA", ...}, ...]'``: the parts
    as JSON dicts (each with its ``peft_type``), read from the options ``args``.

    Raises:
        ConfigError: no ``configs`` option.
    """
    configs = args.method_options.get("configs")
    check(configs is None or isinstance(configs, list),
          f"--option configs={configs!r} is not valid; give a JSON list of part configs, e.g. "
          "'configs=[{\"peft_type\": \"LORA\"}, {\"peft_type\": \"PREFIX_TUNING\", \"num_virtual_tokens\": 10}]'")
    if not configs:
        # (LoRA on the model type's default targets: "all-linear" would also take a classifier head, which the
        # classification task's modules_to_save trains whole)
        raise ConfigError("--method composed needs its parts, e.g. --option 'configs=[{\"peft_type\": \"LORA\"}, "
                          "{\"peft_type\": \"PREFIX_TUNING\", \"num_virtual_tokens\": 10}]' (each part a JSON "
                          "object with its peft_type and that config's fields)")
    return ComposedConfig(configs=list(configs), task_type=args.task_type)


register_method(MethodSpec(
    name="composed", config_cls=ComposedConfig, family="hybrid", kind="compose", mergeable=False,
    paper=UNIFIED_VIEW_PAPER, tuner=ComposedTuner(), cli_config=composed_from_cli, aliases=("compose",),
))
