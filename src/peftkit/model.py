"""PeftModel: a pretrained model plus named adapters, with HF PEFT's public API (the adapter host it
wraps is :class:`peftkit.host.AdapterModel`).

Paper context: the lifecycle (inject, train, save, load, merge) follows HF PEFT's design; the methods
themselves cite their own papers in :mod:`peftkit.methods`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import numbers
import os
import types
import warnings
import weakref
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.config import PeftConfig, check
from peftkit.host import AdapterModel, check_config
from peftkit.layers import BASE_ROWS, AdaptedLayer, ModulesToSaveWrapper
from peftkit.methods.lora_init import check_trainable_init


class PeftModel(nn.Module):
    """A pretrained model with one or more named adapters (mirrors ``peft.PeftModel``).

    Build one with :func:`get_peft_model` or :meth:`from_pretrained`. ``forward`` and ``generate``
    pass through to the base model; ``adapter_names=[...]`` (one name per batch row, ``"__base__"``
    for none) runs a mixed-adapter batch; ``task_ids=[...]`` (one integer per row) gives Poly adapters each
    row's task, as in peft.

    Args:
        model: any ``torch.nn.Module`` (HF transformers models first).
        peft_config: the first adapter's config.
        adapter_name: its name (default ``"default"``).

    Raises:
        ConfigError: invalid config or name, or no module matches the config's targets.
    """

    #: whether a regrouped mixed batch may reorder the LM head's input instead of its logits (turned off
    #: for a model whose head output does not reach its outputs as one field)
    _regroup_at_head: bool = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = AdapterModel(model)
        self.base_model.add_adapter(adapter_name, peft_config)
        self.base_model.set_adapter(adapter_name)

    def _get_name(self) -> str:
        """The wrapped model's class name: code that dispatches on a model's name (transformers' ``Trainer``
        shifts labels for a causal LM's label smoothing by it) treats the adapted model as its base model, as
        it does for a peft model. ``repr`` still reads ``PeftModel(...)`` (or the task class's name)."""
        return self.get_base_model()._get_name()

    def __repr__(self) -> str:
        text = super().__repr__()
        return type(self).__name__ + text[len(self._get_name()):]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    # --- adapters -----------------------------------------------------------------------------------
    @property
    def peft_config(self) -> MutableMapping[str, PeftConfig]:
        """Adapter name -> config, in the order added: the host's table without the parts of composed
        adapters (reads and writes go to the host's table)."""
        return _PublicConfigs(self.base_model)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names, in the order applied (a copy; empty when all were deleted)."""
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name.

        Raises:
            ValueError: no adapter is active (all were deleted)."""
        return self._first_active()

    def _first_active(self) -> str:
        """The first active adapter's name; ValueError when none is active."""
        if not self.base_model.active_adapters:
            raise ValueError(f"no adapter is active; this model has {self.base_model.public_names()} "
                             "(add one with add_adapter, then set_adapter)")
        return self.base_model.active_adapters[0]

    @property
    def peft_type(self) -> str:
        """The ``peft_type`` of the active adapter's config (of the first adapter when none is active), e.g.
        ``"LORA"``: peft's attribute, a plain string here (peft's is a ``PeftType`` enum whose value is this).

        Raises:
            ValueError: the model holds no adapter (all were deleted)."""
        names = self.base_model.active_adapters or self.base_model.public_names()
        if not names:
            raise ValueError("this model holds no adapter, so it has no peft_type; add one with add_adapter")
        return self.base_model.peft_config[names[0]].peft_type

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the first active adapter (the first of :attr:`active_adapters`).

        Raises:
            ValueError: no adapter is active."""
        return self.peft_config[self._first_active()]

    def get_base_model(self) -> nn.Module:
        """The user's model (with wrapped layers inside)."""
        return self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter, inactive until :meth:`set_adapter`; on error the model is unchanged.

        Args:
            adapter_name: a new name (a valid folder name; not one in use).
            peft_config: the adapter's config (any method's; several methods may share the model).
            low_cpu_mem_usage: accepted for peft's signature; it changes nothing here.

        Raises:
            ConfigError: a duplicate or invalid name, a config the model cannot take (no matching module, a
                rank the shape cannot take, ...), or a start that needs data (``init_lora_weights="eva"``).
        """
        check_trainable_init(peft_config)
        self.base_model.add_adapter(adapter_name, peft_config)
        self.base_model._set_trainable()

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (a list, applied in that order); only active adapters
        train. As in peft, the activated adapters become trainable (also one loaded with
        ``is_trainable=False``) unless ``inference_mode=True``, which freezes them (their config's
        ``inference_mode`` is set either way). When adapters are merged and the active set changes, they
        are all unmerged first (with a warning, as peft does).

        Raises:
            ConfigError: an unknown or repeated name, a value that is neither a name nor a list of names, an empty
                list (as peft's ``PeftModel`` refuses it; use :meth:`disable_adapter` to run the base model), more
                than one soft prompt, or a non-bool ``inference_mode``; nothing changes then.
        """
        names = self._names_to_activate(adapter_name, inference_mode)
        check(bool(names), f"set_adapter() needs at least one adapter name, not {adapter_name!r}; this model has "
              f"{self.base_model.public_names()} (to run the base model, use `with model.disable_adapter():`)")
        self._activate(names, inference_mode)

    def _names_to_activate(self, adapter_name: Any, inference_mode: Any) -> list[str]:
        """``adapter_name`` as a list of names, once ``inference_mode`` is known to be a bool (ConfigError
        otherwise; nothing changes)."""
        check(isinstance(inference_mode, bool), f"inference_mode={inference_mode!r} must be True or False")
        return self.base_model.name_list(adapter_name)

    def _activate(self, names: list[str], inference_mode: bool) -> None:
        """Activate ``names`` (none: the model runs as its base), setting their configs' ``inference_mode``."""
        self.base_model.set_adapter(names)  # checks the names before anything changes
        for name in names:
            self.base_model.peft_config[name].inference_mode = inference_mode
        self.base_model._set_trainable()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make adapters trainable (or frozen, ``requires_grad=False``) without changing which are active,
        as peft's ``set_requires_grad``: sets each one's ``inference_mode`` to ``not requires_grad``; an
        inactive adapter trains once activated.

        Raises:
            ConfigError: an unknown name or a non-bool ``requires_grad``; nothing changes then.
        """
        check(isinstance(requires_grad, bool), f"requires_grad={requires_grad!r} must be True or False")
        names = self.base_model.name_list(adapter_names, "adapter_names")
        self.base_model.check_known(names)
        for name in names:
            self.base_model.peft_config[name].inference_mode = not requires_grad
        self.base_model._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``; its layers return to the base modules when no other adapter uses them (see
        :meth:`peftkit.host.AdapterModel.delete_adapter`).

        Raises:
            ConfigError: an unknown adapter, or one a fusion uses; nothing is removed then. (A merged adapter is
                unmerged and deleted; the other merged adapters stay merged.)
        """
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model is the base model (merged adapters are unmerged for the
        duration; base biases an adapter trains with ``bias="all"``/``"lora_only"`` keep their trained
        values, as in peft, since they are the model's own parameters). The previous state, merges included,
        is restored on exit, even after an exception; it nests. If the active adapters were changed inside
        it (``set_adapter``), adapters merged before stay unmerged, with a warning, as ``set_adapter`` leaves
        them outside it.

        One exception, as in peft: a PiSSA or OLoRA adapter (``init_lora_weights="pissa"``/``"olora"``) moved the
        top-r part of the weights it adapts into its factors, so inside the context those layers run on the
        residual, not on the original base weights (``unload()`` or deleting the adapter gives them back)."""
        host = self.base_model
        was_disabled = host.disabled
        merged, active = host.merged_adapters(), list(host.active_adapters)
        if merged:
            host.unmerge()
        host.set_disabled(True)
        try:
            yield
        finally:
            host.set_disabled(was_disabled)
            merged = [n for n in merged if n in host.public_names()]  # an adapter may be deleted inside
            if merged and list(host.active_adapters) != [n for n in active if n in host.public_names()]:
                # set_adapter inside the block: outside it, switching unmerges (as in peft), so the merge is
                # not put back (it would add adapters no longer active to the outputs)
                warnings.warn(f"the active adapters changed inside disable_adapter() ({active} -> "
                              f"{list(host.active_adapters)}); adapter(s) {merged}, merged before, stay unmerged "
                              "(as set_adapter leaves them outside it)", stacklevel=3)
            elif merged:
                host.merge(merged)

    # --- merging ------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (``W <- W + delta``), keeping their layers for :meth:`unmerge_adapter`.

        Args:
            adapter_names: the adapters to fold in (default: the active ones). With the default the outputs are
                unchanged to float tolerance; an inactive adapter named here is folded in beside the active
                ones, which keep running, so it then adds to the outputs (peft instead stops the active ones).
            safe_merge: first compute every merged weight and refuse (nothing merged) if one is not finite.

        Raises:
            ConfigError: an unknown adapter name. ValueError: a method that cannot merge (soft prompts, MoE-LoRA,
            fusion), a merge that could not be undone (a zero (IA)^3/SSF scale), or with ``safe_merge`` a merged
            weight that is not finite; all checked before any layer changes.
        """
        self.base_model.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`: every merged adapter's delta is taken out of the base weights again
        (``W <- W - delta``; in float32 the base comes back to ~1e-6, an (IA)^3/SSF scale is divided out); the
        adapters stay and run unmerged. Nothing happens when none is merged."""
        self.base_model.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the adapters and return the plain base model with no wrapper left (zero overhead).

        Args:
            progressbar: accepted for peft compatibility; merging shows no progress bar.
            safe_merge: first compute every merged weight and refuse (nothing merged) if one is not finite.
            adapter_names: the adapters to merge (default: the active ones); the others are dropped, also
                one merged earlier with ``merge_adapter`` (peft keeps such an adapter in the weights).

        A merge that gives a bias-free layer of a transformers model a bias (SSF, ``lora_bias``) sets the
        config's flags for it (``attention_bias``/``mlp_bias``; uncovered layers get a zero bias), so that a
        saved copy loads back whole; a merge that untied a tied input embedding and output layer sets the
        config's ``tie_word_embeddings`` to False. On a quantised base (:func:`~peftkit.quantize_base`) this is
        :func:`~peftkit.merge_and_unload_quantized` (exact): each layer an adapter merges into becomes a float
        layer holding the merged weight (a quantised layer cannot hold it: peft, with bitsandbytes, quantises
        it again, which ``merge_and_unload_quantized(model, requantize=True)`` does); the other layers stay
        quantised.

        Raises:
            ValueError: an adapter that cannot be merged (a soft prompt, a non-invertible rescale, a stack
                whose merged form would differ from its outputs), checked before any layer changes.
        """
        from peftkit.artifacts import declare_merged_biases, declare_untied_embeddings
        from peftkit.quant.layer import QuantWeight

        if any(isinstance(getattr(w, "base_layer", None), QuantWeight) for _, w in self.base_model.wrappers()):
            from peftkit.quant.base import merge_and_unload_quantized

            plain = merge_and_unload_quantized(self, adapter_names=adapter_names, safe_merge=safe_merge)
        else:
            plain = self.base_model.unload(merge=True, adapter_names=adapter_names, safe_merge=safe_merge)
        declare_untied_embeddings(plain)  # a merge into a tied embedding or output layer unties them
        # a bias the merge gave a bias-free layer: declared in a transformers config (attention_bias, mlp_bias),
        # so that save_pretrained + from_pretrained keep it
        dropped = declare_merged_biases(plain)
        if dropped:
            warnings.warn(f"the merged model holds tensors its config does not describe (e.g. {dropped[:3]}); "
                          "transformers' from_pretrained would drop them from a saved copy", stacklevel=2)
        return plain

    def unload(self) -> nn.Module:
        """Return the base model without any adapter (nothing merged)."""
        return self.base_model.unload(merge=False)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str | None = None, **kwargs: Any) -> None:
        """Add ``adapter_name`` combining LoRA ``adapters`` with ``weights`` (``cat``, ``svd``, ``linear``,
        ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their ``_svd`` forms), or (IA)^3
        adapters linearly as peft does; see :func:`peftkit.merging.add_weighted_adapter` for the options and
        the definitions."""
        from peftkit.merging import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    # --- status -------------------------------------------------------------------------------------
    def get_layer_status(self) -> list[Any]:
        """The state of every adapted module (peft's method): see :func:`peftkit.status.get_layer_status`."""
        from peftkit.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The state of the adapters as a whole (peft's method): see :func:`peftkit.status.get_model_status`."""
        from peftkit.status import get_model_status

        return get_model_status(self)

    # --- parameters ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (total includes adapter parameters, as in peft, and the
        weights a quantised layer stores as buffers: modules with a ``quantized_numel`` attribute)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        total += sum(getattr(m, "quantized_numel", 0) for m in self.modules())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (peft's line)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Enable the base model's gradient checkpointing so that adapters still get gradients with a
        frozen base (input embeddings are made to require grad for re-entrant checkpointing).
        ``gradient_checkpointing_kwargs`` (default None) goes to the base model's method (e.g.
        ``{"use_reentrant": False}``); other keyword arguments (transformers' ``every_n_layers``, ``offload``) go to the base model's method, as in peft.

        Raises:
            TypeError: a keyword argument the base model's method does not take (transformers' error).
        """
        enable_checkpointing(self.get_base_model(), gradient_checkpointing_kwargs, **kwargs)

    # --- training hooks -----------------------------------------------------------------------------
    def peft_regularization(self) -> Tensor | None:
        """The active, trainable adapters' loss terms that a training loop adds to ``model(**batch).loss``
        (MoE-LoRA's load balancing, AdapterFusion's regulariser, ...), summed; None when there are none.

        AdaLoRA's orthogonality penalty is not among them: as in peft, the forward's loss already holds it
        (while the adapter is active and not in inference mode). Inside :meth:`loss_terms_added_by_caller`
        the forward adds nothing and this returns every term, AdaLoRA's included;
        :class:`peftkit.train.Trainer` and :class:`peftkit.train.hf_trainer.PeftTrainer` work that way.
        """
        return self._loss_terms(others=True, forward_ones=self.base_model.ctx.caller_adds_loss_terms)

    def _loss_terms(self, others: bool, forward_ones: bool) -> Tensor | None:
        """The sum of the training adapters' loss terms: of the methods whose forward adds theirs (as peft's
        does AdaLoRA's) when ``forward_ones``, of the others when ``others``; None when there are none."""
        host, total = self.base_model, None
        for name in host.training_parts():
            tuner = host.tuner(name)
            if not (forward_ones if tuner.regularizer_in_forward else others):
                continue
            term = tuner.regularizer(host, name)
            if term is not None:
                total = term if total is None else total + term
        return total

    @contextlib.contextmanager
    def loss_terms_added_by_caller(self) -> Iterator[None]:
        """Within the block the forward's loss is the task loss alone (not even AdaLoRA's penalty, which
        the forward otherwise adds, as peft's does), and :meth:`peft_regularization` gives
        every loss term: for a training loop that adds them itself, e.g. scaled for gradient accumulation."""
        ctx = self.base_model.ctx
        before, ctx.caller_adds_loss_terms = ctx.caller_adds_loss_terms, True
        try:
            yield
        finally:
            ctx.caller_adds_loss_terms = before

    def peft_prepare(self, batches: Iterator[dict[str, Tensor]]) -> None:
        """Let the active, trainable adapters' methods look at training data once before training (e.g.
        the FISH mask's Fisher information); call it before building the optimiser, since it may
        replace adapter parameters. ``batches``: an iterator of batch dicts with ``labels`` (peftkit's trainers
        give one pass over the training data; a method uses up to what it needs).
        :class:`peftkit.train.Trainer` calls it; methods that need nothing ignore it."""
        host = self.base_model
        parts = host.training_parts()
        # each method sees the batches from the first (two data-driven masks share them); tee keeps what one read
        for name, own in zip(parts, itertools.tee(batches, len(parts)) if parts else (), strict=True):
            host.tuner(name).prepare(host, name, own)

    def peft_step_end(self, step: int) -> None:
        """Tell the active adapters' methods that optimiser step ``step`` (1-based) has been taken; call
        it after ``optimizer.step()`` and before ``zero_grad()`` (AdaLoRA reads the gradients)."""
        self.base_model.update_and_allocate(step)

    # --- running ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _rows(self, adapter_names: Sequence[str] | None, batch_size: int | None, copies: bool = False
              ) -> Iterator[list[str] | None]:
        """Run a block with one adapter name per row, checked here before anything runs; yields the names
        as a list (None without ``adapter_names``) and clears them from the layers afterwards. ``copies``
        (``generate``): the layers may see each row repeated (beams), as they may when ``batch_size`` is known."""
        if adapter_names is None:
            yield None
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names:
            raise ValueError("adapter_names is empty; give one adapter name (or '__base__') per batch row")
        odd = [n for n in names if not isinstance(n, str)]
        if odd:
            raise ValueError(f"adapter_names holds {odd[0]!r} ({type(odd[0]).__name__}); each entry must be an "
                             "adapter name (str) or '__base__'")
        self.base_model.check_known([n for n in names if n != BASE_ROWS], rows=True)
        merged = self.base_model.merged_adapters()
        if merged:
            raise ValueError(f"adapter(s) {merged} are merged into the base weights, which every row would then "
                             "use; call unmerge_adapter() before a mixed-adapter batch (adapter_names=...)")
        routed = sorted({n for n in names if n in self.peft_config and self.peft_config[n].takes_task_ids})
        if routed:
            raise ValueError(f"adapter(s) {routed} route each row by its task id (Poly); mixed-adapter batches "
                             "(adapter_names=...) do not support them: run their rows in batches of their own with "
                             "task_ids=...")
        gated = sorted({n for n in names if n in self.peft_config and not self.peft_config[n].mixed_batches})
        if gated:
            raise ValueError(f"adapter(s) {gated} use gates that pool each row over its tokens with the call's "
                             "attention mask (UniPELT); mixed-adapter batches (adapter_names=...) do not support them")
        composed = sorted({n for n in names if n in self.base_model.members})
        if composed:
            raise ValueError(f"adapter(s) {composed} are composed of several parts; mixed-adapter batches "
                             "(adapter_names=...) do not support composed adapters yet")
        if batch_size is not None and len(names) != batch_size:
            given = (f"is one string ({adapter_names!r}), one row's name," if isinstance(adapter_names, str)
                     else f"has {len(names)} {'entry' if len(names) == 1 else 'entries'}")
            raise ValueError(f"adapter_names {given} but the batch has {batch_size} rows; give one adapter name "
                             "(or '__base__') per row")
        base = self.get_base_model()
        if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) is True and m.training
                                           for m in base.modules()):
            raise ValueError("adapter_names cannot be used with gradient checkpointing: the layers recomputed in "
                             "backward() would not see the per-row adapters and the gradients would be wrong. "
                             "Turn it off (activation_checkpointing_disable(), or gradient_checkpointing_disable() in "
                             "transformers without it), or train on batches of one adapter (set_adapter)")
        ctx = self.base_model.ctx
        # a layer may see each row repeated (generate's beams, a multiple-choice model's choices) once the batch
        # is known to have one row per name; a batch the model cannot size must match the names row for row
        ctx.set_rows(names, copies or batch_size is not None)
        try:
            yield names
        finally:
            ctx.set_rows(None)

    @contextlib.contextmanager
    def _tasks(self, task_ids: Any, batch_size: int | None, adapter_names: Any) -> Iterator[None]:
        """Run a block with ``task_ids`` (one task id per row, for adapters that route by task: Poly) set on the
        layers' context, checked here before anything runs; cleared afterwards.

        Without ``task_ids`` every active such adapter must have ``n_tasks = 1`` (its rows are then task 0). With
        the adapters disabled (``disable_adapter()``) the ids are not needed and not used.

        Raises:
            ValueError: ``task_ids`` missing while an active adapter has ``n_tasks > 1``; given with
                ``adapter_names``, or while no active adapter routes by task; not a 1-D sequence of integers;
                not one per row of the batch; or an id outside ``[0, n_tasks)`` of an active adapter.
        """
        host = self.base_model
        takers = [] if host.disabled else [n for n in host.in_use if host.peft_config[n].takes_task_ids]
        if task_ids is None:
            need = [host.owner(n) for n in takers if host.peft_config[n].n_tasks > 1]
            if need and adapter_names is None:
                raise ValueError(f"adapter {need[0]!r} routes each row by its task (n_tasks="
                                 f"{host.peft_config[need[0]].n_tasks}) and needs task_ids: pass task_ids=[...], one "
                                 "integer in [0, n_tasks) per batch row")
            yield
            return
        if adapter_names is not None:
            raise ValueError("task_ids cannot be combined with adapter_names: adapters that route by task (Poly) do "
                             "not run in mixed-adapter batches; run their rows in a batch of their own")
        if not takers and not host.disabled:
            raise ValueError(f"task_ids were given, but no active adapter routes by task (active: "
                             f"{host.active_adapters}); task_ids are for Poly adapters (PolyConfig)")
        def not_int(t: Any) -> bool:  # (numpy integers count; bools, numpy's too, do not)
            return isinstance(t, bool) or not isinstance(t, numbers.Integral)

        if isinstance(task_ids, (list, tuple)) and any(not_int(t) for t in task_ids):
            bad = next(t for t in task_ids if not_int(t))
            raise ValueError(f"task_ids holds {bad!r} ({type(bad).__name__}); each task id must be an integer")
        ids = torch.as_tensor(task_ids) if isinstance(task_ids, (list, tuple, Tensor)) else None
        if ids is None or ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.is_complex() \
                or ids.dtype == torch.bool:
            shape = tuple(ids.shape) if ids is not None else None
            raise ValueError(f"task_ids={task_ids!r} is not valid (shape {shape}); give a non-empty 1-D list or "
                             "integer tensor with one task id per batch row")
        if batch_size is not None and ids.numel() != batch_size:
            raise ValueError(f"task_ids has {ids.numel()} entries but the batch has {batch_size} rows; give one task "
                             "id per row")
        ids = ids.long()
        low, high = int(ids.min()), int(ids.max())
        for n in takers:
            n_tasks = host.peft_config[n].n_tasks
            if low < 0 or high >= n_tasks:
                bad = low if low < 0 else high
                raise ValueError(f"task_ids holds {bad}, outside [0, {n_tasks}): adapter {host.owner(n)!r} has "
                                 f"n_tasks={n_tasks}")
        ctx = host.ctx
        saved = ctx.task_ids
        ctx.task_ids = ids
        try:
            yield
        finally:
            ctx.task_ids = saved

    def _own_task_ids(self, task_ids: Any, kwargs: dict[str, Any]) -> Any:
        """``task_ids`` when they are the adapters' (see :meth:`_tasks`), else None after putting them in ``kwargs``
        for the wrapped model: when no adapter of the model routes by task and its forward names ``task_ids``
        (as before Poly came in, a model reading its own task ids still gets them)."""
        if task_ids is None or any(c.takes_task_ids for c in self.base_model.peft_config.values()):  # (parts too)
            return task_ids
        if not getattr(getattr(self.forward, "__func__", None), "base_takes_task_ids", False):
            return task_ids
        kwargs["task_ids"] = task_ids
        return None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, task_ids: Any = None,
                labels: Any = None, **kwargs: Any) -> Any:
        """Run the adapted model; ``adapter_names`` (one per row) selects an adapter per batch row; ``task_ids``
        (one integer per row, a list or 1-D tensor) gives each row's task to adapters that route by task (Poly),
        as in peft (checked as :meth:`_tasks` says); while no adapter of the model routes by task, a wrapped model
        whose forward names ``task_ids`` gets them instead.

        ``labels`` goes to the wrapped model when given (it is named here so that transformers'
        ``Trainer``, which looks for label arguments on the model's class, finds it).

        A mixed-adapter batch whose rows of one adapter are scattered (``["a", "b", "a", ...]``) runs with
        its rows grouped by adapter (a stable sort, in order of first appearance): every tensor argument
        with one entry per row is reordered on the way in, every such output (and a returned cache) is put
        back in the caller's order on the way out, so each adapted layer works on contiguous runs of rows.
        With a cache given (in the caller's order) the rows keep their order.

        Raises:
            TypeError: ``labels`` given to a wrapped model whose forward takes none.
        """
        if labels is not None:
            # read once per wrapped model class off the signed forward (see _SignedForward)
            if not getattr(getattr(self.forward, "__func__", None), "takes_labels", True):
                raise TypeError(f"labels were given, but the wrapped model's forward "
                                f"({type(self.get_base_model()).__name__}) takes no 'labels' argument; with "
                                "transformers' Trainer pass TrainingArguments(label_names=[...]) naming its label "
                                "arguments, or use peftkit.train.hf_trainer.PeftTrainer, which reads them off the "
                                "wrapped model")
            kwargs["labels"] = labels
        task_ids = self._own_task_ids(task_ids, kwargs)
        rows = _batch_size(args, kwargs)
        ctx = self.base_model.ctx
        ctx.forward_id += 1
        base = self.get_base_model()
        with self._tasks(task_ids, rows, adapter_names), self._rows(adapter_names, rows) as names, \
                ctx.call(_call_mask(base, args, kwargs)):
            order = (None if names is None or rows is None or _holds_cache(args, kwargs)
                     or not _regroupable(base, args, kwargs) else _grouped_order(names))
            if order is None:
                return self._with_forward_terms(base(*args, **kwargs))
            ctx.set_rows([names[i] for i in order], copies=True)
            mask = ctx.attention_mask
            if mask is not None and mask.shape[0] == rows:  # in the rows' new order, as the layers see them
                ctx.attention_mask = mask.index_select(0, torch.tensor(order, device=mask.device))
            return self._with_forward_terms(self._regrouped(base, order, rows, args, kwargs))

    def _with_forward_terms(self, out: Any) -> Any:
        """``out`` with the loss terms that peft's forward adds (AdaLoRA's orthogonality penalty, while the
        adapter is active and not in inference mode, in training and eval mode alike) added to its ``loss``,
        unless the caller adds them (:meth:`loss_terms_added_by_caller`)."""
        loss = getattr(out, "loss", None)
        if not isinstance(loss, Tensor) or self.base_model.ctx.caller_adds_loss_terms:
            return out
        extra = self._loss_terms(others=False, forward_ones=True)
        if extra is not None:
            out.loss = loss + extra
        return out

    def _regrouped(self, base: nn.Module, order: list[int], rows: int, args: tuple, kwargs: dict) -> Any:
        """Run ``base`` on the rows taken in ``order`` and give back its outputs in the caller's order."""
        perm = torch.tensor(order, device=_first_device(args, kwargs))
        inv = torch.argsort(perm)
        shared = {k: kwargs.pop(k) for k in _SHARED_INPUTS if k in kwargs}
        for k in _ROW_INPUTS_2D:  # a 1-d position_ids (seq,) is one row shared by all, even when seq == rows
            if isinstance(kwargs.get(k), Tensor) and kwargs[k].dim() == 1:
                shared[k] = kwargs.pop(k)
        args, kwargs = _take_rows((args, kwargs), perm, rows)
        kwargs.update(shared)
        # A plain output head (an LM head, vocabulary-sized) gets its input back in the caller's order, so
        # that the logits need no reordering. Not with labels (they meet the logits inside the model; a
        # positional argument may be labels), nor with tuple outputs (the logits cannot be told apart).
        tuples = kwargs.get("return_dict") is False or getattr(getattr(base, "config", None), "return_dict", True) is False
        head = None
        if self._regroup_at_head and len(args) <= 1 and kwargs.get("labels") is None and not tuples:
            head = _plain_output_head(base)
        if head is None:
            return _take_rows(base(*args, **kwargs), inv, rows, outputs=True)
        seen: list[Any] = []

        def restore_order(module: nn.Module, inputs: tuple) -> tuple | None:
            x = inputs[0] if inputs else None
            if seen or not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != rows:
                seen.append(None)  # a second call, or an input not one per row: not this layout
                return None
            return (x.index_select(0, inv.to(x.device)), *inputs[1:])

        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            if len(seen) == 0:
                seen.append(output)

        hooks = (head.register_forward_pre_hook(restore_order), head.register_forward_hook(record))
        try:
            out = base(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        keep = [k for k, v in out.items() if v is seen[0]] if len(seen) == 1 and isinstance(out, dict) else []
        if len(keep) != 1:
            # The head's output did not reach the outputs as one field: run again reordering the outputs,
            # and do not try the head for this model again.
            self._regroup_at_head = False
            return _take_rows(base(*args, **kwargs), inv, rows, outputs=True)
        # Every other per-row output goes back to the caller's order; the head's (already in it) is not
        # copied again.
        for k, v in _take_rows({k: v for k, v in out.items() if k != keep[0]}, inv, rows, outputs=True).items():
            out[k] = v
        return out

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, task_ids: Any = None,
                 **kwargs: Any) -> Any:
        """The base model's ``generate`` with the adapters applied (per row with ``adapter_names``; ``task_ids``, one
        per prompt, for adapters that route by task, as in :meth:`forward`: each beam or returned sequence keeps
        its prompt's task).

        Raises:
            ValueError: ``past_key_values`` holding positions while a soft prompt is active: its cache also holds
                the virtual tokens, which ``generate`` would count as input tokens already seen (a forward call
                takes such a cache; ``generate`` would feed the wrong tokens).
        """
        cache = kwargs.get("past_key_values")
        seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        host = self.base_model
        prompts = [] if host.disabled else [n for n in host.in_use if host.peft_config[n].is_prompt_learning]
        if seen and prompts and adapter_names is None:
            raise ValueError(f"generate() cannot continue from past_key_values with soft-prompt adapter "
                             f"{host.owner(prompts[0])!r} "
                             f"active: the cache also holds its {host.peft_config[prompts[0]].num_virtual_tokens} "
                             "virtual tokens, which generate() would take for input tokens; pass the whole sequence "
                             "without past_key_values")
        task_ids = self._own_task_ids(task_ids, kwargs)
        batch = _batch_size(args, kwargs)
        with self._tasks(task_ids, batch, adapter_names), self._rows(adapter_names, batch, copies=True):
            return self.get_base_model().generate(*args, **kwargs)

    # --- files --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        save_embedding_layers: str | bool = "auto", **kwargs: Any) -> None:
        """Write each adapter in HF PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``
        in ``save_directory`` for ``"default"`` and in ``save_directory/<name>`` for the others. Every
        file of every adapter is written to a temporary name before the first is renamed into place, so
        an error leaves the adapters already in the folder whole.
        In a process group every rank calls it (FSDP-sharded tensors are gathered); only the one with
        ``is_main_process=True`` writes.

        ``path_initial_model_for_weight_conversion`` (as in peft): the folder where an adapter that changed
        the base weights when created (PiSSA, OLoRA) was saved before training; the adapter is then
        written as an equivalent plain adapter for the unchanged base model (its method's
        ``convert_for_initial_model``).

        ``save_embedding_layers`` (as in peft): also write the base model's embedding matrices, for a model whose
        vocabulary was resized; ``"auto"`` (default) does when ``target_modules`` names ``embed_tokens`` or
        ``lm_head``, or when ``config.vocab_size`` differs from the local base model folder's (see
        :func:`peftkit.get_peft_model_state_dict`).

        Raises:
            ConfigError: unknown adapter name, or a ``save_embedding_layers`` other than ``"auto"``, True or False.
            ValueError: ``safe_serialization=False`` (pickle is refused), or
            a conversion the method does not support. NotADirectoryError: ``save_directory`` (or an adapter's
            sub-folder) is an existing file. Nothing is written when any of these is raised.
        """
        from peftkit.formats.hf_peft import adapter_files, atomic_write_folders, check_save_embedding_layers

        if not safe_serialization:
            raise ValueError("peftkit writes safetensors only; safe_serialization=False (pickle) is not supported")
        names = (list(self.peft_config) if selected_adapters is None else
                 [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters))
        if not names:
            raise ValueError("there is no adapter to save: this model has none" if not self.peft_config
                             else "selected_adapters is empty; name at least one of " + repr(list(self.peft_config)))
        self.base_model.check_known(names)
        check_save_embedding_layers(save_embedding_layers)
        # every adapter's files are made first and staged together: a failure on any (a conversion it does
        # not support, a path that is a file) leaves all files already in the folder as they were
        plan: dict[str, dict[str, bytes]] = {}
        for name in names:
            target = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            converted = None
            if path_initial_model_for_weight_conversion is not None:
                converted = self.base_model.tuner(name).convert_for_initial_model(
                    self, name, os.fspath(path_initial_model_for_weight_conversion))
            files = adapter_files(self, name, write=is_main_process, converted=converted,
                                  save_embedding_layers=save_embedding_layers)
            if files is not None:
                plan[target] = files
        if plan:
            atomic_write_folders(plan)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **kwargs: Any) -> PeftModel:
        """Load an adapter folder (HF PEFT format, saved by peftkit or by ``peft``) onto ``model``.

        Args:
            model: the base model the adapter was trained on.
            model_id: a local adapter folder.
            adapter_name: name to give the adapter.
            is_trainable: False (default) loads it frozen for inference, and puts the model in eval mode
                (as peft does); True loads it to train further.
            config: use this config instead of the folder's ``adapter_config.json``.
            subfolder: keyword only; read the adapter from ``model_id/subfolder`` (as peft does).
            low_cpu_mem_usage: keyword only, accepted for peft's signature; it changes nothing here.
            key_mapping: keyword only, as peft's: ``{regex: replacement}`` renaming the file's module paths (see
                :func:`peftkit.load_peft_weights`), for an adapter saved on a model whose module names differ.
                None (default) takes, as peft does, the model's ``_checkpoint_conversion_mapping`` (the renames
                transformers applies to the model's own old checkpoints) unless the adapter is a prompt-learning
                one (its keys hold no module paths); a model without that attribute keeps the keys as they are.
            autocast_adapter_dtype, ephemeral_gpu_offload: keyword only, peft's; taken at peft's defaults (True,
                False) only. torch_device: keyword only; None, or the model's device.

        Raises:
            FileNotFoundError: missing folder or files. AdapterLoadError: unreadable/corrupt weights, or
            tensors whose names or shapes do not fit the model (the model is left unadapted).
            ConfigError: one of peft's keywords at a value other than its default (a ``torch_device`` other
            than the model's), an ``is_trainable`` that is not a bool, a ``config`` that is not a peftkit config, or
            a ``key_mapping`` that is not a dict of valid ``{regex: replacement}`` strings.
            TypeError: another keyword (peft's hub options do not apply: peftkit reads local folders), or a
            ``model_id`` that is not a path.
        """
        from peftkit.formats.hf_peft import check_key_mapping, load_adapter_into, read_adapter_files
        from peftkit.methods.prompt_learning import loading_values

        _check_load_args("from_pretrained", model_id, is_trainable, config)
        model_id = _adapter_folder("from_pretrained", model_id, kwargs)
        _check_device("from_pretrained", model, kwargs)
        if config is None:
            config = PeftConfig.from_pretrained(model_id)
        cls._check_new_config(config)
        key_mapping = kwargs.get("key_mapping")
        if key_mapping is None and not config.is_prompt_learning:
            # as peft: renames of module paths that transformers applies to this model's older checkpoints apply to
            # its adapters too
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
            check_key_mapping(key_mapping)
        config, tensors = read_adapter_files(model_id, config, key_mapping)
        with _fields_kept_on_error(config):
            config.inference_mode = not is_trainable
            with loading_values():  # built to take the file's values: no start that needs more than the model
                peft_model = cls._class_for(config)(model, config, adapter_name)
            try:
                load_adapter_into(peft_model, adapter_name, tensors)
            except BaseException:
                peft_model.unload()
                raise
        peft_model.base_model._set_trainable()
        if not is_trainable:  # as peft: loaded for inference, the whole model in eval mode (no dropout)
            peft_model.eval()
        return peft_model

    @classmethod
    def _class_for(cls, config: PeftConfig) -> type[PeftModel]:
        """The class :meth:`from_pretrained` builds for ``config``: its task type's (as peft), else ``cls``."""
        return _model_class(config, cls)

    @classmethod
    def _check_new_config(cls, config: PeftConfig) -> None:
        """Refuse a config this class cannot hold, before anything is read or changed (every config here)."""

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **kwargs: Any) -> None:
        """Load another adapter folder under ``adapter_name`` (not activated; see :meth:`set_adapter`); when the
        model already has an adapter of that name, load the folder's weights into it, as peft does (its files must
        fit that adapter: same method, names and shapes). Keywords: ``config`` (instead of the folder's
        ``adapter_config.json``), ``subfolder``, ``low_cpu_mem_usage``, ``key_mapping`` and peft's other loading
        keywords at their defaults, as for :meth:`from_pretrained`.

        Raises:
            as :meth:`from_pretrained`; on error the model is left as it was.
        """
        from peftkit.formats.hf_peft import load_adapter_into, read_adapter_files
        from peftkit.methods.prompt_learning import loading_values

        config = kwargs.pop("config", None)
        _check_load_args("load_adapter", model_id, is_trainable, config)
        folder = _adapter_folder("load_adapter", model_id, kwargs)
        _check_device("load_adapter", self.base_model.model, kwargs)
        if config is None:
            config = PeftConfig.from_pretrained(folder)
        self._check_new_config(config)
        config, tensors = read_adapter_files(folder, config, kwargs.get("key_mapping"))
        if adapter_name in self.base_model.public_names():
            # as peft: the folder's weights go into the adapter of that name (how transformers' Trainer reloads a
            # checkpoint, and a loop restores its best one); its files must fit it, or nothing changes
            check(config.peft_type == self.peft_config[adapter_name].peft_type,
                  f"adapter {adapter_name!r} is {self.peft_config[adapter_name].peft_type} and {str(folder)!r} holds a "
                  f"{config.peft_type} adapter; load it under another adapter_name")
            from peftkit.formats.hf_peft import load_saved_state

            load_saved_state(self, tensors, adapter_name, config)
            if not is_trainable:  # as peft
                self.eval()
            return
        with _fields_kept_on_error(config):
            config.inference_mode = not is_trainable
            before = set(self.base_model.public_names())
            with loading_values():
                self.base_model.add_adapter(adapter_name, config)
            try:
                load_adapter_into(self, adapter_name, tensors)
            except BaseException:  # also drop adapters the load created (those a fusion is saved with)
                created = [n for n in self.base_model.public_names() if n not in before and n != adapter_name]
                for name in [adapter_name, *reversed(created)]:  # the fusion before the adapters it fuses
                    self.base_model.delete_adapter(name)
                raise
        self.base_model._set_trainable()
        if not is_trainable:  # as peft
            self.eval()


class PeftModelForSequenceClassification(PeftModel):
    """A :class:`PeftModel` whose adapters have ``task_type="SEQ_CLS"`` (mirrors
    ``peft.PeftModelForSequenceClassification``): what :func:`get_peft_model` and :meth:`PeftModel.from_pretrained`
    return for that task type. It behaves as :class:`PeftModel` in every way; the class exists so that code naming
    peft's task classes (``PeftModelForSequenceClassification.from_pretrained(base, folder)``, ``isinstance``
    checks) ports by changing the import."""


class PeftModelForCausalLM(PeftModel):
    """A :class:`PeftModel` for ``task_type="CAUSAL_LM"`` (mirrors ``peft.PeftModelForCausalLM``); see
    :class:`PeftModelForSequenceClassification`."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A :class:`PeftModel` for ``task_type="SEQ_2_SEQ_LM"`` (mirrors ``peft.PeftModelForSeq2SeqLM``); see
    :class:`PeftModelForSequenceClassification`."""


class PeftModelForTokenClassification(PeftModel):
    """A :class:`PeftModel` for ``task_type="TOKEN_CLS"`` (mirrors ``peft.PeftModelForTokenClassification``); see
    :class:`PeftModelForSequenceClassification`."""


class PeftModelForQuestionAnswering(PeftModel):
    """A :class:`PeftModel` for ``task_type="QUESTION_ANS"`` (mirrors ``peft.PeftModelForQuestionAnswering``); see
    :class:`PeftModelForSequenceClassification`."""


class PeftModelForFeatureExtraction(PeftModel):
    """A :class:`PeftModel` for ``task_type="FEATURE_EXTRACTION"`` (mirrors ``peft.PeftModelForFeatureExtraction``);
    see :class:`PeftModelForSequenceClassification`."""


#: task_type -> the PeftModel class get_peft_model and from_pretrained build for it (peft's
#: MODEL_TYPE_TO_PEFT_MODEL_MAPPING); a config without a task type gets PeftModel itself
TASK_MODEL_CLASSES: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def _model_class(config: PeftConfig, default: type[PeftModel] = PeftModel) -> type[PeftModel]:
    """The class to build for ``config``: its task type's (as peft, whichever class was asked for), else
    ``default``."""
    return TASK_MODEL_CLASSES.get(getattr(config, "task_type", None) or "", default)


def enable_checkpointing(model: nn.Module, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
    """Turn on a transformers model's gradient checkpointing (``activation_checkpointing_enable`` where
    transformers has that newer name) and make its input embeddings' output require grad, so that a frozen
    base still passes gradients to adapters through re-entrant checkpointing.

    Raises:
        TypeError: a keyword argument the model's method does not take (transformers' error).
    """
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # its new name (transformers 5.x)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


# peft's loading keywords that are not hub options, taken at peft's defaults (others are refused by name)
_PEFT_LOAD_DEFAULTS: dict[str, Any] = {"autocast_adapter_dtype": True, "ephemeral_gpu_offload": False,
                                       "torch_device": None}
#: every keyword from_pretrained / load_adapter take besides their named arguments
LOAD_KEYWORDS = ("subfolder", "low_cpu_mem_usage", "key_mapping", *_PEFT_LOAD_DEFAULTS)


def _check_device(caller: str, model: nn.Module, kwargs: dict[str, Any]) -> None:
    """``torch_device`` (peft: where the adapter weights are loaded) must be where the model is: peftkit puts
    adapter weights beside the layers they adapt.

    Raises:
        ConfigError: naming both devices.
    """
    wanted = kwargs.get("torch_device")
    if wanted is None:
        return
    from peftkit.train.checks import as_device

    device = as_device(wanted, f"torch_device={wanted!r}")
    here = next((p.device for p in model.parameters()), torch.device("cpu"))
    check(device.type == here.type and (device.index is None or here.index is None or device.index == here.index),
          f"torch_device={wanted!r} is not where the model is ({here}); peftkit loads adapter weights beside the "
          "layers they adapt: move the model there first, or leave torch_device out")


@contextlib.contextmanager
def _fields_kept_on_error(config: PeftConfig) -> Iterator[None]:
    """Put every field of ``config`` back as it was when the block raises: a config the caller gave to a load that
    failed is left as given (not in inference mode, without the targets and heads the adapter filled in)."""
    saved = copy.deepcopy(vars(config))
    try:
        yield
    except BaseException:
        vars(config).clear()
        vars(config).update(saved)
        raise


def _check_load_args(caller: str, model_id: Any, is_trainable: Any, config: Any) -> None:
    """Check ``from_pretrained``'s / ``load_adapter``'s arguments before anything is read or changed.

    Raises:
        TypeError: ``model_id`` is not a folder path (``str`` or ``os.PathLike``).
        ConfigError: ``is_trainable`` is not a bool (a string such as ``"no"`` would load the adapter trainable),
            or ``config`` is neither None nor a peftkit config.
    """
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"{caller}(): model_id={model_id!r:.80} is a {type(model_id).__name__}; give the adapter "
                        "folder (a str or os.PathLike)")
    check(isinstance(is_trainable, bool), f"{caller}(): is_trainable={is_trainable!r} must be True or False")
    if config is not None:
        check_config(config)


def _adapter_folder(caller: str, model_id: str | os.PathLike, kwargs: dict[str, Any]) -> str | os.PathLike:
    """The folder that ``from_pretrained`` / ``load_adapter`` read: ``model_id``, joined with ``subfolder``
    when given. Raises TypeError, naming them, for keywords other than ``subfolder``, ``low_cpu_mem_usage`` and
    ``key_mapping`` (peft's hub options, or a typo, which would otherwise be dropped unread), and ConfigError for a
    ``key_mapping`` that is not None or a dict of valid ``{regex: replacement}`` strings."""
    unknown = sorted(k for k in kwargs if k not in LOAD_KEYWORDS)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}; besides its named arguments it "
                        f"takes subfolder=..., low_cpu_mem_usage=..., key_mapping=... and, at peft's defaults, "
                        f"{', '.join(f'{k}={v!r}' for k, v in _PEFT_LOAD_DEFAULTS.items())} (peftkit reads local "
                        "adapter folders, so peft's hub options such as revision or token do not apply)")
    for key, default in _PEFT_LOAD_DEFAULTS.items():
        value = kwargs.get(key, default)
        if key == "torch_device" and value is not None:
            continue  # checked against the model's device by the caller
        check(value == default and type(value) is type(default),
              f"{key}={value!r} is not supported by {caller}(); peftkit takes only peft's default, {default!r}"
              + (" (adapter weights stay float32 on a half-precision base)" if key == "autocast_adapter_dtype" else ""))
    from peftkit.formats.hf_peft import check_key_mapping

    check_key_mapping(kwargs.get("key_mapping"))
    subfolder = kwargs.get("subfolder")
    if subfolder in (None, ""):
        return model_id
    if not isinstance(subfolder, (str, os.PathLike)):
        raise TypeError(f"subfolder={subfolder!r} is not valid; give a folder name inside {str(model_id)!r}")
    return os.path.join(model_id, subfolder)


class _PublicConfigs(MutableMapping):
    """The host's ``peft_config`` seen without the parts of composed adapters."""

    def __init__(self, host: AdapterModel) -> None:
        self.host = host

    def __getitem__(self, name: str) -> PeftConfig:
        if self.host.owner(name) != name:
            raise KeyError(name)
        return self.host.peft_config[name]

    def __setitem__(self, name: str, config: PeftConfig) -> None:
        self.host.peft_config[name] = config

    def __delitem__(self, name: str) -> None:
        self[name]  # KeyError for a part
        del self.host.peft_config[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.host.public_names())

    def __len__(self) -> int:
        return len(self.host.public_names())

    def __repr__(self) -> str:
        return repr(dict(self.items()))


#: inputs shared by all rows whatever their first dimension (a length-``seq`` vector may match the rows)
_SHARED_INPUTS = ("cache_position", "logits_to_keep", "num_items_in_batch")

_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")

#: transformers inputs known to hold one entry per row (first dimension) or to be shared (first dimension 1)
_ROW_INPUTS = frozenset(_BATCH_INPUTS) | {
    "attention_mask", "token_type_ids", "position_ids", "labels", "decoder_input_ids", "decoder_attention_mask",
    "decoder_inputs_embeds", "decoder_position_ids", "pixel_mask", "bbox", "start_positions", "end_positions"}


#: row inputs whose per-row form is ``(rows, seq)``: given 1-d, they are shared by every row
_ROW_INPUTS_2D = ("position_ids", "decoder_position_ids")


def _regroupable(base: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a mixed batch may be run with its rows reordered: only a transformers model given inputs whose
    layout is known (its main input positionally, the rest by name in :data:`_ROW_INPUTS` or
    :data:`_SHARED_INPUTS`), and only then are its outputs known to be one entry per row. Any other tensor
    input (a custom model's per-class weights, a transformers ``head_mask``) could have a first dimension that
    only happens to equal the rows, so such calls keep the caller's order (each layer then gathers its
    adapter's rows instead)."""
    from transformers import PreTrainedModel

    if not isinstance(base, PreTrainedModel) or any(_has_tensor(a) for a in args[1:]):
        return False
    return not any(_has_tensor(v) for k, v in kwargs.items() if k not in _ROW_INPUTS and k not in _SHARED_INPUTS)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _grouped_order(names: list[str]) -> list[int] | None:
    """The row order that makes each adapter's rows of a mixed batch one contiguous run (a stable sort by
    the order in which the names first appear), or None when the rows already are."""
    first: dict[str, int] = {}
    for name in names:
        first.setdefault(name, len(first))
    keys = [first[name] for name in names]
    if keys == sorted(keys):
        return None
    return sorted(range(len(names)), key=keys.__getitem__)


def _holds_cache(args: tuple, kwargs: dict) -> bool:
    """Whether the call is given a cache (its rows are in the caller's order and must stay so)."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return True
    return any(callable(getattr(v, "reorder_cache", None)) for v in (*args, *kwargs.values()))


def _plain_output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (LM head) when it exists and holds no adapter or trainable copy."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module) or any(isinstance(m, (AdaptedLayer, ModulesToSaveWrapper))
                                              for m in head.modules()):
        return None
    return head


def _first_device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def _take_rows(value: Any, idx: Tensor, rows: int, outputs: bool = False) -> Any:
    """``value`` with every tensor of ``rows`` rows (first dimension) reordered by ``idx``, through tuples,
    lists, dicts and HF ``ModelOutput``; a transformers ``Cache`` is reordered in place; anything else
    (scalars, a loss, tensors shared by all rows) is returned as is. For ``outputs``, a first dimension
    of ``k * rows`` (rows flattened with their choices, tokens, ...) is reordered in blocks of ``k``."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] == 0:
            return value
        index = _row_index(idx, rows, value.shape[0], outputs)
        return value if index is None else value.index_select(0, index.to(value.device))
    if isinstance(value, dict):  # also HF ModelOutput (an OrderedDict); its None fields are not stored
        items = {k: _take_rows(v, idx, rows, outputs) for k, v in value.items()}
        if type(value) is dict:
            return items
        out = copy.copy(value)
        for k, v in items.items():
            out[k] = v
        return out
    if isinstance(value, (tuple, list)):
        items = [_take_rows(v, idx, rows, outputs) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if callable(getattr(value, "reorder_cache", None)):
        size = _cache_rows(value)
        index = _row_index(idx, rows, rows if size is None else size, outputs)
        if index is not None:
            value.reorder_cache(index)
    return value


def _row_index(idx: Tensor, rows: int, size: int, outputs: bool) -> Tensor | None:
    """The index reordering a first dimension of ``size`` entries, or None when it is not per row."""
    if size == rows:
        return idx
    if outputs and size % rows == 0:
        k = size // rows
        return (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)
    return None


def _cache_rows(cache: Any) -> int | None:
    """The batch size of a transformers cache (its first key tensor's first dimension), or None."""
    for part in (cache, getattr(cache, "self_attention_cache", None)):
        for layer in getattr(part, "layers", None) or ():
            keys = getattr(layer, "keys", None)
            if isinstance(keys, Tensor) and keys.dim() > 0:
                return keys.shape[0]
    return None


def _call_mask(base: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """The 2-D ``attention_mask`` ``(batch, seq)`` of a call to ``base`` (a keyword or the positional argument of
    that name), or None: without one, or on an encoder-decoder model (its encoder's mask does not describe the
    decoder's tokens, which the same adapters see)."""
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return None
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1:
        forward = base.forward
        where = _mask_position(getattr(forward, "__func__", forward), forward)
        if where is not None and where < len(args):
            mask = args[where]
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


#: weak keys: a forward made per instance (accelerate's hooks set ``model.forward = partial(new_forward, model)``)
#: holds its model, which a strong key would keep alive after the user dropped it
_MASK_POSITIONS: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


def _mask_position(key: Any, forward: Any) -> int | None:
    """The position of ``attention_mask`` among ``forward``'s positional parameters (None: it has none, or no
    readable signature), remembered per forward function ``key`` for as long as ``key`` lives: reading a signature
    costs about 20 us, which a model call should not pay each time (a ``key`` that cannot be weakly referenced is
    read each time)."""
    try:
        return _MASK_POSITIONS[key]
    except (KeyError, TypeError):
        pass
    try:
        params = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):  # a forward without a readable signature
        params = []
    where = params.index("attention_mask") if "attention_mask" in params else None
    with contextlib.suppress(TypeError):
        _MASK_POSITIONS[key] = where
    return where


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Rows of the batch: from the model's main input (``input_ids``, ``inputs_embeds``, ...; else the
    first positional tensor), never from a shared input such as ``position_ids`` or ``cache_position``;
    None when there is no such input (the layers then check the rows)."""
    for value in (*(kwargs.get(k) for k in _BATCH_INPUTS), *args):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def get_peft_model(model: nn.Module, peft_config: PeftConfig | Sequence[PeftConfig], adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (mirrors ``peft.get_peft_model``).

    The base model's parameters are frozen; only the adapter (and its ``modules_to_save``) train. A list
    of configs makes one composed adapter of them (:class:`peftkit.ComposedConfig`).

    Args:
        mixed: False (default) returns a :class:`PeftModel` (or its task class), which takes adapters of any methods
            side by side; True returns a :class:`peftkit.PeftMixedModel`, as peft does, which takes LoRA, LoHa, LoKr
            and AdaLoRA adapters only (a ValueError for another method).
        autocast_adapter_dtype: True (peft's default): adapter weights are float32 on a float16/bfloat16
            base, as peftkit always keeps them; False (keep them in the base's dtype) is refused.
        revision, low_cpu_mem_usage: accepted for peft's signature; they change nothing here.

    Raises:
        ConfigError: ``peft_config`` is not a peftkit config (nor a list of them), is invalid, or no module of
            ``model`` matches its targets (the message lists module names that exist);
            ``autocast_adapter_dtype=False``. The model and the config are left unchanged on error.
        ValueError: ``mixed=True`` with a config of a method :class:`peftkit.PeftMixedModel` does not take.
        TypeError: ``model`` is not a ``torch.nn.Module``, or a keyword peft's ``get_peft_model`` does not take
            either (e.g. a misspelt ``adapter_name``).
    """
    check(autocast_adapter_dtype is True, f"autocast_adapter_dtype={autocast_adapter_dtype!r} is not supported: "
          "peftkit keeps adapter weights in float32 on a half-precision base (peft's default, True)")
    if isinstance(peft_config, (list, tuple)):
        from peftkit.methods.compose import ComposedConfig

        peft_config = ComposedConfig(configs=list(peft_config))
    check_config(peft_config)
    if mixed:
        from peftkit.mixed import PeftMixedModel, check_mixed_compatible

        check_mixed_compatible(peft_config)
    check_trainable_init(peft_config)
    named = bool(getattr(model, "name_or_path", None)) and peft_config.base_model_name_or_path is None
    if named:
        peft_config.base_model_name_or_path = os.fspath(model.name_or_path)
    try:
        return (PeftMixedModel if mixed else _model_class(peft_config))(model, peft_config, adapter_name)
    except BaseException:  # the caller's config is left as it was
        if named:
            peft_config.base_model_name_or_path = None
        raise


class _SignedForward:
    """Descriptor for :meth:`PeftModel.forward`: on a model it gives a bound method whose signature is the
    wrapped model's forward arguments (plus ``adapter_names``, and ``task_ids`` while an adapter routes by task),
    as for a peft model, so that tools which keep only the arguments a model takes (transformers' ``Trainer``
    with ``remove_unused_columns``) keep the right ones; on the class it gives the plain function (whose signature names ``labels``, where
    ``Trainer`` looks for label names).

    The bound method is a real ``types.MethodType`` made at each access (nothing is stored on the model, so
    no reference cycle), of a copy of the function that carries ``__signature__``; the copies are cached
    per wrapped model class. Code that rebinds ``model.forward.__func__`` (accelerate's mixed precision)
    keeps the signature, since ``functools.wraps`` copies ``__signature__``.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        # weak keys: a base forward set per instance (accelerate's hooks) may hold the whole base model
        self._signed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, fn)

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        if model is None:
            return self.fn
        if torch.compiler.is_compiling():  # what the compiler traces (it cannot build methods; no signature needed)
            return functools.partial(self.fn, model)
        try:
            base_forward = model.base_model.model.forward
        except AttributeError:  # during construction or teardown
            return types.MethodType(self.fn, model)
        key = getattr(base_forward, "__func__", base_forward)
        # task_ids is named only while an adapter routes by task (Poly): Trainer then keeps that column, and
        # drops it, as before, for the other methods (whose forward refuses task_ids)
        routed = any(c.takes_task_ids for c in getattr(model.base_model, "peft_config", {}).values())
        try:
            fns = self._signed.setdefault(key, {})
        except TypeError:  # not weakly referenceable: not cached
            return types.MethodType(self._copy_with_signature(base_forward, routed), model)
        if routed not in fns:
            fns[routed] = self._copy_with_signature(base_forward, routed)
        return types.MethodType(fns[routed], model)

    def _copy_with_signature(self, base_forward: Any, routed: bool) -> Any:
        fn = types.FunctionType(self.fn.__code__, self.fn.__globals__, self.fn.__name__, self.fn.__defaults__,
                                self.fn.__closure__)
        functools.update_wrapper(fn, self.fn)
        del fn.__wrapped__  # the signature below, not the wrapped function's, is the one to report
        fn.__kwdefaults__ = self.fn.__kwdefaults__
        try:
            params = list(inspect.signature(base_forward).parameters.values())
        except (TypeError, ValueError):  # a forward without a readable signature keeps peftkit's own
            fn.__signature__ = inspect.signature(self.fn)
            return fn
        # whether labels may be passed on (PeftModel.forward refuses them otherwise)
        fn.takes_labels = any(p.name == "labels" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        # whether the wrapped model reads task_ids itself (they go on to it while no adapter routes by task)
        fn.base_takes_task_ids = any(p.name == "task_ids" for p in params)
        for name in ("adapter_names", "task_ids") if routed else ("adapter_names",):
            if name not in {p.name for p in params}:
                extra = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
                params.insert(at, extra)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fn.__signature__ = inspect.Signature([self_param, *params])
        return fn


PeftModel.forward = _SignedForward(PeftModel.forward)
