"""``PeftMixedModel``: adapters of several low-rank, Kronecker and sparse methods on one model, several active at
once (mirrors ``peft.PeftMixedModel``, which ``get_peft_model(model, config, mixed=True)`` returns).

A :class:`~peftkit.PeftModel` already holds adapters of any methods side by side and runs a list of active
adapters together (``set_adapter(["a", "b"])``); this class is that model restricted, as peft's is, to the
methods peft lets one mix: LoRA (its variants included: DoRA, rsLoRA, ...), LoHa, LoKr, AdaLoRA and SHiRA (peft's
``COMPATIBLE_TUNER_TYPES`` also lists OFT, whose input rotation does not commute with the others' sums and is
not mixed here yet). Each of them adds a weight change (SHiRA's a sparse one, ``W0 + S``), so several active
adapters on one layer sum their changes, in whatever order they are listed.

Papers: LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685); LoHa:
FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning (Hyeon-Woo et al., 2021,
arXiv:2108.06098); LoKr: Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation
(Yeh et al., 2023, arXiv:2309.14859); AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning
(Zhang et al., 2023, arXiv:2303.10512); SHiRA: Sparse High Rank Adapters (Bhardwaj et al., 2024,
arXiv:2406.13175).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from peftkit.config import PeftConfig, check
from peftkit.host import check_config
from peftkit.model import PeftModel

#: the methods a mixed model takes (peft's ``COMPATIBLE_TUNER_TYPES`` that peftkit implements), by ``peft_type``
COMPATIBLE_TUNER_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "SHIRA")
#: methods peft's mixed model takes that peftkit's does not yet (its error must not say peft refuses them too)
PEFT_ONLY_MIXED_TYPES = ("OFT",)


def check_mixed_compatible(config: PeftConfig) -> None:
    """Raise ValueError unless ``config``'s method is one a :class:`PeftMixedModel` takes
    (:data:`COMPATIBLE_TUNER_TYPES`), as peft does, except for OFT, which peft mixes and peftkit does not yet
    (:data:`PEFT_ONLY_MIXED_TYPES`; the error says so).

    Raises:
        ConfigError: ``config`` is not a peftkit config. ValueError: another method (a soft prompt, (IA)^3, VeRA, a
            bottleneck adapter, a composed config, ...), naming it and the methods allowed.
    """
    check_config(config)
    if config.peft_type not in COMPATIBLE_TUNER_TYPES:
        peft_too = (f"peft mixes {config.peft_type} but peftkit does not yet" if config.peft_type in PEFT_ONLY_MIXED_TYPES
                    else "as in peft")
        raise ValueError(f"a PeftMixedModel takes {list(COMPATIBLE_TUNER_TYPES)} adapters, not {config.peft_type} "
                         f"({type(config).__name__}), {peft_too}; use get_peft_model without mixed=True, whose "
                         "PeftModel also holds several methods at once")


class PeftMixedModel(PeftModel):
    """A model holding LoRA, LoHa, LoKr, AdaLoRA and SHiRA adapters together, any of them active at once (mirrors
    ``peft.PeftMixedModel``). Build it with ``get_peft_model(model, config, mixed=True)``, or
    :meth:`from_pretrained`; add adapters with :meth:`add_adapter` / :meth:`load_adapter` and activate several with
    ``set_adapter(["a", "b"])``: each adapted layer then adds every active adapter's change,
    ``y = W x + sum_a delta_a(x)`` with ``x: (..., in_features)``.

    :meth:`load_adapter` and :meth:`from_pretrained` refuse a folder of another method before reading its weights.
    It is a :class:`~peftkit.PeftModel` in every other way (``forward``, ``generate``, ``disable_adapter``,
    ``merge_and_unload``, ``unload``, ``set_adapter``, mixed-adapter batches, ...). Beyond peft's class it also saves
    (``save_pretrained`` writes each adapter in peft's format, which ``PeftModel.from_pretrained`` of either library
    loads) and reports ``get_layer_status`` / ``get_model_status``, which peft's refuses.

    Args:
        model: any ``torch.nn.Module`` (a ``transformers`` model first).
        peft_config: the first adapter's config, of a method in :data:`COMPATIBLE_TUNER_TYPES`.
        adapter_name: its name (default ``"default"``).

    Raises:
        ValueError: a config of another method (checked first, nothing changes). ConfigError: as
            :class:`~peftkit.PeftModel`.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        check_mixed_compatible(peft_config)
        super().__init__(model, peft_config, adapter_name)

    @property
    def active_adapter(self) -> list[str]:
        """The active adapters' names, as a list, as peft's mixed model gives them (its ``active_adapter`` is the
        list :attr:`active_adapters` also gives, one name or several); a copy, empty when no adapter is left. It never
        raises (:attr:`peftkit.PeftModel.active_adapter` is the first name, a string, as in peft's ``PeftModel``)."""
        return self.active_adapters

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several (a list); see :meth:`peftkit.PeftModel.set_adapter`. As peft's mixed model
        (unlike its ``PeftModel``), an empty list is taken: no adapter is active and the model runs as its base.

        Raises:
            ConfigError: as :meth:`peftkit.PeftModel.set_adapter`, an empty list excepted; nothing changes then.
        """
        self._activate(self._names_to_activate(adapter_name, inference_mode), inference_mode)

    @classmethod
    def _class_for(cls, config: PeftConfig) -> type[PeftModel]:
        """Always this class (peft's ``PeftMixedModel.from_pretrained`` returns no task class)."""
        return cls

    @classmethod
    def _check_new_config(cls, config: PeftConfig) -> None:
        """Refuse a method a mixed model does not take (see :func:`check_mixed_compatible`)."""
        check_mixed_compatible(config)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter, inactive until :meth:`set_adapter` (peft's signature).

        Args:
            adapter_name: a new name.
            peft_config: its config, of a method in :data:`COMPATIBLE_TUNER_TYPES`.
            low_cpu_mem_usage: accepted for peft's signature (default False); it changes nothing here.
            autocast_adapter_dtype: True (default, peft's): adapter weights stay float32 on a half-precision base;
                False is refused.

        Raises:
            ValueError: a method a mixed model does not take. ConfigError: a duplicate or invalid name, a config the
                model cannot take, or ``autocast_adapter_dtype=False``. The model is unchanged on error.
        """
        check_mixed_compatible(peft_config)
        check(autocast_adapter_dtype is True, f"autocast_adapter_dtype={autocast_adapter_dtype!r} is not supported: "
              "peftkit keeps adapter weights in float32 on a half-precision base (peft's default, True)")
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage)

    def delete_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Remove one adapter, or several (a list, as peft's mixed model takes); see
        :meth:`peftkit.PeftModel.delete_adapter`.

        Raises:
            ConfigError: an unknown name (every name is checked before any adapter is removed), or a value that is
                neither a name nor a list of names.
        """
        names = self.base_model.name_list(adapter_name)
        self.base_model.check_known(names)
        for name in dict.fromkeys(names):
            super().delete_adapter(name)
