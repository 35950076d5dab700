"""How a method puts one named adapter into a model.

A tuner is the "code that applies" a registered method. The host (:class:`peftkit.host.AdapterModel`)
calls ``tuner.inject(host, config, adapter_name)``; everything else in the lifecycle (activation,
trainability, merging, saving) is generic.

:class:`WrapTuner` serves every wrap-style method: it finds the targets, builds *all* adapters first
(so a bad value raises before the model changes), then wraps each target in an
:class:`~peftkit.layers.AdaptedLayer` (or reuses the existing wrapper) and adds the adapter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from peftkit.config import ConfigError, check
from peftkit.host import TASK_HEADS
from peftkit.layers import AdaptedLayer, Adapter, replace_module
from peftkit.targeting import UnmatchedTargetWarning, find_targets, hidden_targets, pattern_key

if TYPE_CHECKING:
    from peftkit.config import PeftConfig
    from peftkit.host import AdapterModel


def check_unmerged(host: AdapterModel, adapter_name: str, what: str) -> None:
    """Refuse a step that changes adapter ``adapter_name``'s weights while it is merged into a layer (unmerging
    would then subtract another change than the one merged, and the base weights would drift).

    Raises:
        ConfigError: the adapter is merged (naming the first layer and ``what`` would change it).
    """
    merged = [n for n, w in host.wrappers() if isinstance(w, AdaptedLayer) and adapter_name in w.merged_adapters]
    if merged:
        raise ConfigError(f"adapter {adapter_name!r} is merged (into {merged[0]!r}{' and others' if merged[1:] else ''})"
                          f": unmerge it (unmerge_adapter()) before {what}, which changes the weights that unmerging "
                          "subtracts")


class Tuner:
    """Base of all tuners. Subclasses implement :meth:`inject`."""

    method = "PEFT method"

    def inject(self, host: AdapterModel, config: PeftConfig, adapter_name: str) -> None:  # pragma: no cover
        """Add adapter ``adapter_name`` described by ``config`` to ``host.model``.

        Raises:
            NotImplementedError: a subclass that does not override it. Implementations raise
                :class:`~peftkit.config.ConfigError` when the config does not fit the model.
        """
        raise NotImplementedError

    def trainable_base_params(self, model: nn.Module, config: Any, targets: list[str]) -> list[str]:
        """Names of base-model parameters this adapter trains and saves (e.g. biases); none by default."""
        return []

    # --- optional hooks; the defaults do nothing -------------------------------------------------------
    def extra_tensors(self, host: AdapterModel, adapter_name: str) -> dict[str, Any]:
        """Tensors adapter ``adapter_name`` keeps outside wrapped layers of ``host``, keyed exactly as on disk (e.g. peft's
        ``prompt_embeddings``). Saving writes them; loading copies file values into them."""
        return {}

    #: whether :meth:`regularizer` joins the loss that ``PeftModel.forward`` returns in training mode (as peft's
    #: forward adds AdaLoRA's penalty), rather than only through ``PeftModel.peft_regularization()``
    regularizer_in_forward = False

    def regularizer(self, host: AdapterModel, adapter_name: str) -> Any:
        """A scalar tensor added to the training loss while adapter ``adapter_name`` is active and training (e.g.
        AdaLoRA's orthogonality penalty), or None (the default)."""
        return None

    def on_step_end(self, host: AdapterModel, adapter_name: str, step: int) -> None:
        """Called after each optimiser step, before gradients are cleared (e.g. AdaLoRA's rank budget)."""

    def prepare(self, host: AdapterModel, adapter_name: str, batches: Iterator[dict[str, Tensor]]) -> None:
        """Called once before training, before the optimiser is built, with an iterator of training batches
        (dicts the model takes, with ``labels``; the trainers give one pass over the data); a method that picks its trainable
        parameters from data (FISH mask, Child-Tuning-D) takes the batches it needs here. Must be a
        no-op when the adapter is already prepared (e.g. loaded from a file)."""

    def before_load(self, host: AdapterModel, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Called with a file's tensors (file keys) before they are checked against the adapter and
        copied in: switch to the layout the file holds (fold a training-time reparameterisation, since
        peft files keep only its output; resize data-dependent tensors such as sparse indices). Raise
        ``AdapterLoadError`` for tensors that cannot be right (the caller removes the adapter)."""

    def widen_loaded(self, host: AdapterModel, adapter_name: str, tensors: dict[str, Tensor], saved: PeftConfig
                     ) -> tuple[dict[str, Tensor], Callable[[], None] | None]:
        """File tensors (file keys) saved in a compact form, described by ``saved`` (the config they were saved
        with), widened to the adapter's shapes in this model, and what to run once they are copied in; the
        default: as given, nothing. (AdaLoRA: a pruned file holds only the kept triplets; they go to their
        places among the model's, the others are zero and masked.) Must not change anything itself."""
        return tensors, None

    def bundled(self, host: AdapterModel, adapter_name: str) -> list[tuple[str, str]]:
        """``(namespace, other adapter)`` pairs whose tensors are saved in this adapter's file and loaded
        from it, each under ``<namespace>.<that adapter's own file key>`` (a composition's parts, the
        adapters a fusion fuses); none by default."""
        return []

    def remove(self, host: AdapterModel, adapter_name: str) -> None:
        """Drop state kept outside wrapped layers for ``adapter_name`` when it is deleted or the model unloaded
        (default: nothing to drop)."""

    def method_state(self, host: AdapterModel, adapter_name: str) -> dict[str, Tensor]:
        """State that training changes outside parameters and persistent buffers and that a resumed run
        needs to continue exactly (AdaLoRA's rank masks and importance averages), keyed as the method
        likes; written into checkpoints, never into adapter files. None by default."""
        return {}

    def load_method_state(self, host: AdapterModel, adapter_name: str, tensors: dict[str, Tensor],
                          check_only: bool = False) -> None:
        """Restore what :meth:`method_state` returned; with ``check_only`` only check that it fits.

        Raises:
            ConfigError: a tensor this method does not keep, or one that does not fit the adapter (always
                checked before anything changes).
        """
        check(not tensors, f"{self.method} adapter {adapter_name!r} keeps no training state beyond its parameters, "
                           f"but the checkpoint holds some for it (e.g. {sorted(tensors)[:2]}); resume with the "
                           "run's own options")

    def export_config(self, host: AdapterModel, adapter_name: str) -> PeftConfig:
        """The config written next to the adapter's file tensors (default: the adapter's config as is). A
        method whose saved shapes depend on training (SoRA's pruned ranks) returns an updated copy."""
        return host.peft_config[adapter_name]

    def convert_for_initial_model(self, model: Any, adapter_name: str, initial_dir: str) -> tuple[PeftConfig, dict]:
        """``(config, file tensors)`` of an adapter that changed the base weights at creation (PiSSA, OLoRA),
        rewritten to apply to the unchanged base model, given the folder saved right after creation
        (peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``).

        Raises:
            ValueError: the method has no such conversion (the default).
        """
        raise ValueError(f"{self.method} adapters cannot be saved with path_initial_model_for_weight_conversion")


# peft types whose configs take layers_to_transform next to a regex target_modules and then ignore it (peft's
# LoRA-family configs refuse the pair)
_BLOCKS_IGNORED_WITH_A_REGEX = frozenset({"LOHA", "LOKR", "VERA", "IA3"})


class WrapTuner(Tuner):
    """Tuner of methods that wrap target layers; subclasses give :meth:`supported_types` and :meth:`make_adapter`."""

    def supported_types(self) -> tuple[type[nn.Module], ...]:  # pragma: no cover - abstract
        """The module classes the method can wrap; a target matched by the config's patterns that is of
        another class makes :meth:`find` raise ``ConfigError``.

        Raises:
            NotImplementedError: a subclass that does not override it.
        """
        raise NotImplementedError

    def make_adapter(self, base: nn.Module, config: Any, module_name: str) -> Adapter:  # pragma: no cover
        """Build (not attach) the adapter for one target.

        Args:
            base: the target's unwrapped base module (``base_layer`` when it is already wrapped); it must
                not be modified here, since a later target may still fail.
            config: the adapter's config.
            module_name: the target's name in the model (e.g. for ``rank_pattern``/``alpha_pattern`` and
                error messages).

        Raises:
            ConfigError: the config does not fit this module (e.g. a rank the shape cannot take).
        """
        raise NotImplementedError

    def new_wrapper(self, module: nn.Module) -> AdaptedLayer:
        """The wrapper put around a target that is not wrapped yet (an :class:`AdaptedLayer` by default)."""
        return AdaptedLayer(module)

    def find(self, host: AdapterModel, config: Any) -> list[str]:
        """The module names this config adapts.

        Raises:
            ConfigError: none match; or block options peft refuses (its files would not load there):
            ``layers_to_transform`` with ``target_modules`` given as one string (LoRA-family configs; LoHa, LoKr,
            VeRA and (IA)^3 ignore it then with a warning, as peft does), ``layers_pattern`` without
            ``layers_to_transform``.
        """
        blocks, pattern = getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None)
        if blocks is not None and isinstance(config.target_modules, str) and getattr(
                config, "peft_type", None) in _BLOCKS_IGNORED_WITH_A_REGEX:
            # peft's LoHa/LoKr/VeRA/(IA)^3 accept the pair and select by the regex alone: their files must load
            warnings.warn(f"layers_to_transform={blocks!r} is ignored with target_modules given as a string "
                          f"({config.target_modules!r}), as peft ignores it for {config.peft_type}; select the blocks "
                          "inside the regular expression", stacklevel=3)
            blocks = pattern = None
        check(blocks is None or not isinstance(config.target_modules, str),
              f"layers_to_transform={blocks!r} cannot be used with target_modules given as a string "
              f"({config.target_modules!r}), as in peft; give target_modules as a list of names, or select the "
              "blocks inside the regular expression")
        check(pattern is None or blocks is not None,
              f"layers_pattern={pattern!r} needs layers_to_transform (the block indices it locates), as in peft; "
              "give layers_to_transform too, or leave layers_pattern out")
        own = list(getattr(config, "modules_to_save", None) or [])
        # (suffixes, as modules_to_save matches; a task type's head is this adapter's own trained copy too)
        mine = own + list(TASK_HEADS.get(getattr(config, "task_type", None), ()))
        others = [n for n in host.modules_to_save_names() if not any(n.endswith(s) for s in mine)]
        hidden = hidden_targets(host.model, others, config.target_modules, supported=self.supported_types(),
                                exclude_modules=getattr(config, "exclude_modules", None),
                                layers_to_transform=blocks, layers_pattern=pattern) if others else []
        # peft adapts both the original module and every adapter's trained copy of it there; peftkit would
        # skip them, and write a file that a plain base then does not fit
        check(not hidden, f"target_modules={config.target_modules!r} selects {hidden[:3]}"
                          f"{'...' if len(hidden) > 3 else ''}, which another adapter's modules_to_save replaces by "
                          "its trained copies; peftkit cannot adapt inside them. Add this adapter before the one "
                          "with that modules_to_save (the copies are then taken with this adapter in them), or "
                          "leave those modules out (exclude_modules)")
        found = find_targets(
            host.model, config.target_modules, supported=self.supported_types(),
            exclude_modules=getattr(config, "exclude_modules", None),
            layers_to_transform=blocks, layers_pattern=pattern,
            skip=own + host.modules_to_save_names(),
            method=self.method,
        )
        # (AdaLoRA's saved rank_pattern is another thing: per-rank masks keyed by parameter name)
        fields = ("alpha_pattern",) if getattr(config, "peft_type", None) == "ADALORA" else ("rank_pattern",
                                                                                             "alpha_pattern")
        for field in fields:
            keys = getattr(config, field, None) or {}
            unmatched = [k for k in keys if not any(pattern_key(name, {k: None}) for name in found)]
            if unmatched:
                warnings.warn(UnmatchedTargetWarning(
                    f"{field} keys {unmatched} match none of the {len(found)} adapted module(s) (a typo?), so they "
                    f"change nothing; adapted modules include {found[:3]}"), stacklevel=3)
        return found

    def inject(self, host: AdapterModel, config: Any, adapter_name: str) -> None:
        model = host.model
        targets = self.find(host, config)
        built: list[tuple[str, nn.Module, Adapter]] = []
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            built.append((name, module, self.make_adapter(base, config, name)))
        for name, module, adapter in built:
            if not isinstance(module, AdaptedLayer):
                wrapper = self.new_wrapper(module)
                wrapper._ctx = host.ctx
                replace_module(model, name, wrapper)
                module = wrapper
            module.add(adapter_name, adapter)
        host.set_extra_trainable(adapter_name, self.trainable_base_params(model, config, targets))
