"""Trainable tokens: train only chosen rows (tokens) of an embedding matrix.

No paper of its own: HF peft's ``TrainableTokensConfig`` (peft 0.15, 2025), a row-sparse variant of fine-tuning the
embedding for new or re-purposed tokens; its rows are selected as in partial fine-tuning (Lee et al., "What Would
Elsa Do? Freezing Layers During Transformer Fine-Tuning", 2019, arXiv:1911.03090), here at the granularity of
single tokens.

Equation: ``E'[i] = t_i`` for ``i`` in ``token_indices`` (``t`` trained, ``(k, d)``), ``E'[j] = E[j]`` otherwise;
the layer runs with ``E'``. Trainable parameters: ``len(token_indices) * embedding_dim``.

File format (peft's): ``base_model.model.<embedding>.trainable_tokens_delta`` ``(k, d)`` holds the trained rows
themselves (peft's name says "delta", the values are the rows); ``token_indices`` lives in the config only. A
tied output layer (the LM head sharing the embedding's weight) uses the same rows, as peft ties its layer to the
embedding's; peft writes the rows under both names, and so does peftkit (loading checks that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from peftkit.config import ConfigError, MethodSpec, PeftConfig, check, register_method
from peftkit.formats.hf_peft import AdapterLoadError, key_prefix
from peftkit.layers import AdaptedLayer, Adapter, replace_module, unwrap
from peftkit.methods.selective import SelectiveConfig, tied_partners
from peftkit.targeting import UnmatchedTargetWarning, check_single_path, iter_logical_modules, matches
from peftkit.tuners import Tuner

TRAINABLE_TOKENS_PAPER = ("Trainable tokens (HF peft's TrainableTokensConfig, 2025; selective like partial fine-tuning: "
                          "Lee et al., 2019, arXiv:1911.03090)")


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Configuration of trainable tokens (selective family); mirrors ``peft.TrainableTokensConfig``.

    Args:
        token_indices: the rows (token ids) that train, e.g. ``[32000, 32001]`` for two tokens added to a
            tokenizer (and the embedding resized to them). Required: a non-empty list of distinct integers >= 0,
            each below the embedding's number of rows (checked when added to a model).
        target_modules: names/suffixes, or a full-match regex, of the embedding(s) (an ``nn.Embedding``, or any
            module with a 2-D ``weight`` whose rows are tokens). None (default): the model's input embedding
            (``get_input_embeddings()``), else ``embed_tokens``; its dotted name is written into the config, as peft.
        init_weights: True (default): the trained rows start as the embedding's own, so the adapter starts as a
            no-op. False: they start as ``N(0, 1)`` samples, as in peft (only for tokens the model has no row for yet).

    Trainable parameters: ``len(token_indices) * embedding_dim`` per targeted embedding (a tied output layer
    shares them).

    Raises:
        ConfigError: ``token_indices`` empty, not integers, negative or repeated; ``init_weights`` not a bool; when
            added to a model: no module matches, a matched module has no 2-D weight, or an index is out of range.

    Paper: no paper; HF peft's method (see :mod:`peftkit.methods.trainable_tokens`).
    """

    peft_type = "TRAINABLE_TOKENS"
    auto_saves_targeted_embeddings: ClassVar[bool] = False  # the file holds the rows alone, as peft's

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def validate(self) -> None:
        if isinstance(self.token_indices, tuple):
            self.token_indices = list(self.token_indices)
        check_token_indices(self.token_indices, "token_indices")
        targets = _TargetsOnly(self.target_modules)
        SelectiveConfig.validate(targets)  # type: ignore[arg-type]  (the same checks of target_modules)
        self.target_modules = targets.target_modules


def check_token_indices(idx: Any, field_name: str) -> None:
    """Check a list of token ids (``field_name`` names it in the message).

    Raises:
        ConfigError: not a non-empty list, an entry that is not an integer >= 0, or a repeated entry.
    """
    check(isinstance(idx, list) and len(idx) > 0,
          f"{field_name}={idx!r} is not valid: give the token ids whose embedding rows train, a non-empty list of "
          "integers (e.g. the ids a tokenizer gave new tokens)")
    bad = [i for i in idx if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    check(not bad, f"{field_name} holds {bad[:3]!r}: every entry must be an integer >= 0 (a row of the embedding)")
    repeated = sorted({i for i in idx if idx.count(i) > 1})
    check(not repeated, f"{field_name} repeats {repeated[:3]!r}: give each token once")


@dataclass
class _TargetsOnly:
    """The fields :meth:`SelectiveConfig.validate` checks, for configs that have only ``target_modules``."""

    target_modules: list[str] | str | None
    exclude_modules: None = None
    layers_to_transform: None = None


class TrainableTokensAdapter(Adapter):
    """The trained rows of one embedding.

    Args:
        base: the embedding (kept untouched): any module with a 2-D ``weight`` ``(num_embeddings, dim)``.
        token_indices: the rows that train, ``k`` distinct ids.
        init_weights: start from the base rows (True) or ``N(0, 1)`` (False).

    Attributes:
        trainable_tokens_delta: ``(k, dim)`` parameter, the rows themselves (peft's name), float32 (float64 for a
            float64 embedding).
        token_indices: ``(k,)`` int64 buffer, not saved (the config holds the ids).

    Forward: the embedding runs with ``weight.index_copy(0, token_indices, rows)``. Merge writes the rows into
    the weight and keeps the ones they replace; unmerge writes those back (exact).
    """

    substitutes_params = True

    def __init__(self, base: nn.Module, token_indices: list[int], init_weights: bool = True) -> None:
        super().__init__()
        weight = base.weight.detach()
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        idx = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        rows = weight.index_select(0, idx).to(dtype) if init_weights else torch.randn(
            len(token_indices), weight.shape[1], dtype=dtype, device=weight.device)
        self.trainable_tokens_delta = nn.Parameter(rows.clone())
        self.register_buffer("token_indices", idx, persistent=False)
        self._kept: Tensor | None = None  # the replaced rows while merged

    def substituted(self, layer: AdaptedLayer, w: Tensor) -> Tensor:
        """``w`` (the weight, or what adapters earlier in ``layer``'s plan made of it) with the trained rows in."""
        return w.index_copy(0, self.token_indices.to(w.device), self.trainable_tokens_delta.to(w.dtype))

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        params["weight"] = self.substituted(layer, params.get("weight", layer.base_layer._parameters["weight"]))
        return params

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y  # everything happened in substitute_params

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``weight`` with the trained rows in (cast through the layer's dtype, as the forward runs); the rows it
        replaces are kept for :meth:`unmerge_from`."""
        idx = self.token_indices.to(weight.device)
        self._kept = weight.index_select(0, idx).clone()
        rows = self.trainable_tokens_delta.detach().to(layer.weight.dtype).to(weight.dtype)
        return weight.index_copy(0, idx, rows), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``weight`` with the rows :meth:`merge_into` replaced put back."""
        if self._kept is None:
            return weight, bias
        return weight.index_copy(0, self.token_indices.to(weight.device), self._kept), bias

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """The change as a dense float32 difference ``E' - E`` (zero outside the trained rows)."""
        w = layer.weight.detach().float()
        return self.substituted(layer, w) - w

    def extra_repr(self) -> str:
        return f"tokens={self.token_indices.numel()}"


class LoraTokenAdapter(Adapter):
    """The rows that ``LoraConfig(trainable_token_indices=...)`` trains on one embedding, held as peft holds them
    there: a :class:`TrainableTokensAdapter` under ``token_adapter`` (file key
    ``<embedding>.token_adapter.trainable_tokens_delta``, ``(k, dim)``). Runs and merges as that adapter.

    Args:
        rows: the :class:`TrainableTokensAdapter` it holds.
    """

    substitutes_params = True

    def __init__(self, rows: TrainableTokensAdapter) -> None:
        super().__init__()
        self.token_adapter = rows

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.token_adapter.substitute_params(layer, params)

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.token_adapter.merge_into(layer, weight, bias)

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.token_adapter.unmerge_from(layer, weight, bias)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.token_adapter.delta_weight(layer)


def add_lora_token_rows(host: Any, adapter_name: str, indices: list[int] | dict[str, list[int]]) -> None:
    """Train the rows ``indices`` (peft's ``LoraConfig.trainable_token_indices``: a list for the input embedding,
    or ``{module name: list}``) next to a LoRA adapter ``adapter_name``, as :class:`LoraTokenAdapter` s (a tied
    LM head follows the rows, and is not written to files, as in peft). Every adapter is built before any is added.

    Two dict entries that reach one weight (one module by two names, or an embedding and its tied head) are
    one set of rows when their ids agree (the later entry adds nothing, as peft), and refused when they differ.

    Raises:
        ConfigError: as :func:`plan_token_adapters`; two entries reaching one weight with different ids; or LoRA
            adapts one of these embeddings too.
    """
    plans = {default_embedding_name(host.model): indices} if isinstance(indices, list) else indices
    built: list[tuple[str, nn.Module, Adapter]] = []
    claimed: dict[str, str] = {}  # module name -> the entry whose rows it runs with
    for target, idx in plans.items():
        part = plan_token_adapters(host, [target] if isinstance(indices, dict) else target, idx,
                                   explicit=isinstance(indices, dict), wrap=LoraTokenAdapter, tied_written=False)
        clash = [name for name, _, _ in part if name in claimed]
        if clash:
            first = claimed[clash[0]]
            check(plans[first] == idx and len(clash) == len(part),
                  f"trainable_token_indices: {target!r} and {first!r} reach one weight ({clash[0]!r}: the same "
                  f"module, or a tied one) with different token ids ({idx!r} and {plans[first]!r}); give them the "
                  "same ids or one entry")
            continue
        claimed.update({name: target for name, _, _ in part})
        built += part
    attach(host, adapter_name, built)


class TiedTokens(Adapter):
    """The trained rows where another module shares the embedding's weight (a tied LM head, ``(vocab, dim)``):
    it runs with the same rows, as peft ties its layer to the embedding's. It holds nothing of its own (nothing in
    the file but a copy under its own name, as peft writes it); merging writes the rows into its own (untied while merged) weight.

    Args:
        owner: the :class:`TrainableTokensAdapter` of the embedding.
        written: write the rows under this module's name too (default True, as peft's trainable tokens; peft's
            LoRA with ``trainable_token_indices`` writes them once).
    """

    substitutes_params = True

    def __init__(self, owner: TrainableTokensAdapter, written: bool = True) -> None:
        super().__init__()
        self._owner = (owner,)  # not a submodule: its tensors belong to (and are saved with) the embedding's
        self._kept: Tensor | None = None
        self.written = written

    @property
    def owner(self) -> TrainableTokensAdapter:
        """The adapter that holds the rows."""
        return self._owner[0]

    def substitute_params(self, layer: AdaptedLayer, params: dict[str, Tensor]) -> dict[str, Tensor]:
        params["weight"] = self.owner.substituted(layer, params.get("weight", layer.base_layer._parameters["weight"]))
        return params

    def forward(self, layer: AdaptedLayer, x: Tensor, y: Tensor) -> Tensor:
        return y

    def export_state(self) -> dict[str, Tensor]:
        """The embedding's rows again under this module's name, as peft writes its tied layer's (its
        ``state_dict()`` stays empty: the rows train and load once, in the owner)."""
        return {"trainable_tokens_delta": self.owner.trainable_tokens_delta} if self.written else {}

    def merge_into(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        idx = self.owner.token_indices.to(weight.device)
        self._kept = weight.index_select(0, idx).clone()
        rows = self.owner.trainable_tokens_delta.detach().to(layer.weight.dtype).to(weight.dtype)
        return weight.index_copy(0, idx, rows), bias

    def unmerge_from(self, layer: AdaptedLayer, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self._kept is None:
            return weight, bias
        return weight.index_copy(0, self.owner.token_indices.to(weight.device), self._kept), bias

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.owner.delta_weight(layer)

    def extra_repr(self) -> str:
        return "ties the embedding's trained rows"


def default_embedding_name(model: nn.Module) -> str:
    """peft's default target: the dotted name of ``model.get_input_embeddings()``, else ``"embed_tokens"``."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is not None:
        emb = unwrap(emb)  # (a second adapter: the embedding is wrapped already)
        for name, module in iter_logical_modules(model):
            if module is emb:
                return name
    return "embed_tokens"


class TrainableTokensTuner(Tuner):
    """Wraps every targeted embedding in an :class:`~peftkit.layers.AdaptedLayer` with a
    :class:`TrainableTokensAdapter`, and every module sharing its weight (a tied LM head) with a :class:`TiedTokens`."""

    method = "trainable tokens"

    def inject(self, host: Any, config: TrainableTokensConfig, adapter_name: str) -> None:
        """Raises ConfigError (nothing changed): no module matches, one has no 2-D weight, an index is out of
        range, or a matched module is a ``modules_to_save`` copy."""
        target = config.target_modules if config.target_modules is not None else default_embedding_name(host.model)
        built = plan_token_adapters(host, target, config.token_indices, config.init_weights,
                                    explicit=config.target_modules is not None)
        attach(host, adapter_name, built)
        if config.target_modules is None:
            config.target_modules = target  # as peft, the name found is saved

    def before_load(self, host: Any, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """A tied output layer's copy of the rows (peft writes ``lm_head.trainable_tokens_delta`` next to the
        embedding's) is checked against the embedding's and dropped: the rows load once, into the embedding's.

        Raises:
            AdapterLoadError: the two copies differ (the file was edited or is not peft's).
        """
        prefix = key_prefix(host.peft_config[adapter_name])
        live = host.adapter_tensors(adapter_name)
        by_tensor = {t.data_ptr(): k for k, t in live.items()}  # (state_dict() gives detached views)
        for key, t in host.adapter_tensors(adapter_name, export=True).items():
            if key in live or prefix + key not in tensors:
                continue
            owner = prefix + by_tensor[t.data_ptr()]
            value = tensors.pop(prefix + key)
            if owner not in tensors:
                tensors[owner] = value
            elif value.shape != tensors[owner].shape or not torch.equal(value, tensors[owner].to(value)):
                raise AdapterLoadError(f"adapter {adapter_name!r}: {prefix + key} and {owner} name the rows of one "
                                       "tied embedding but hold different values; give a file whose copies agree")


def plan_token_adapters(host: Any, target: str | list[str], token_indices: list[int], init_weights: bool = True,
                        explicit: bool = True, wrap: Any = None, tied_written: bool = True
                        ) -> list[tuple[str, nn.Module, Adapter]]:
    """The adapters that train rows ``token_indices`` of the modules ``target`` names (changing nothing yet), as
    ``(module name, module, adapter)``: a :class:`TrainableTokensAdapter` per embedding (``wrap(adapter)`` instead,
    when given: LoRA's ``token_adapter``), and a :class:`TiedTokens` per module sharing its weight (written to
    files when ``tied_written``). ``explicit``: the target was given by the user (not the default).

    Raises:
        ConfigError: no module matches, one is in ``modules_to_save``, one has no 2-D weight, or an index is out
            of range.
    """
    import warnings

    model = host.model
    skip = set(host.modules_to_save_names())
    found: list[tuple[str, nn.Module, nn.Module]] = []
    seen: set[int] = set()
    for name, module in iter_logical_modules(model):
        if not name or not matches(name, target):
            continue
        check(name not in skip, f"trainable tokens: {name!r} is in modules_to_save (trained whole); train chosen rows "
                                "of it or the whole module, not both (as peft)")
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        weight = base._parameters.get("weight")
        check(isinstance(weight, nn.Parameter) and weight.dim() == 2,
              f"trainable tokens: target_modules={target!r} selects {name!r} ({type(base).__name__}), which has no "
              "2-D weight of token rows; target the embedding (nn.Embedding)")
        if id(weight) in seen:  # a tied output layer named too: it follows the embedding's rows (below)
            continue
        rows = weight.shape[0]
        out = [i for i in token_indices if i >= rows]
        check(not out, f"token_indices {out[:3]!r} are out of range for {name!r}, which has {rows} rows (0 to "
                       f"{rows - 1}); resize the embedding first (model.resize_token_embeddings) for new tokens")
        seen.add(id(weight))
        found.append((name, model.get_submodule(name), base))  # (the wrapper, when another adapter has one)
    if not found:
        raise ConfigError(f"trainable tokens: target_modules={target!r} matches no module of the model"
                          + ("" if explicit else " (the model has no get_input_embeddings(); give target_modules)"))
    if isinstance(target, list):
        names = [n for n, _ in iter_logical_modules(model) if n]
        unmatched = [p for p in target if not any(n == p or n.endswith("." + p) for n in names)]
        if unmatched:
            warnings.warn(UnmatchedTargetWarning(f"trainable tokens: target_modules entries {unmatched} match no "
                                                 "module of the model (a typo?)"), stacklevel=4)
    check_single_path(model, [n for n, _, _ in found])
    rows_of = [TrainableTokensAdapter(base, token_indices, init_weights) for _, _, base in found]
    built: list[tuple[str, nn.Module, Adapter]] = [
        (name, module, a if wrap is None else wrap(a)) for (name, module, _), a in zip(found, rows_of, strict=True)]
    partners = tied_partners(host, [(name, base, ("weight",)) for name, _, base in found])
    built += [(name, model.get_submodule(name), TiedTokens(rows_of[i], written=tied_written)) for name, i, _ in partners]
    return built


def attach(host: Any, adapter_name: str, built: list[tuple[str, nn.Module, Adapter]]) -> None:
    """Wrap each module of ``built`` (:func:`plan_token_adapters`) and add its adapter as ``adapter_name``.

    Raises:
        ConfigError: a module already holds an adapter of that name (e.g. LoRA targets the embedding whose rows
            ``trainable_token_indices`` trains); nothing is added then.
    """
    taken = [name for name, module, _ in built if isinstance(module, AdaptedLayer) and adapter_name in module.adapters]
    if taken:
        raise ConfigError(f"trainable tokens: {taken[0]!r} already holds adapter {adapter_name!r} (target_modules "
                          "adapts it too); train its rows with trainable_token_indices or adapt it with target_modules, "
                          "not both")
    for name, module, adapter in built:
        if not isinstance(module, AdaptedLayer):
            wrapper = AdaptedLayer(module)
            wrapper._ctx = host.ctx
            replace_module(host.model, name, wrapper)
            module = wrapper
        module.add(adapter_name, adapter)


def trainable_tokens_from_cli(args: Any) -> TrainableTokensConfig:
    """Build a :class:`TrainableTokensConfig` from ``peftkit train`` options ``args``: ``--option
    token_indices=[...]`` is required; ``--target-modules`` picks the embedding (default: the input embedding).

    Raises:
        ConfigError: no ``--option token_indices=[...]``.
    """
    idx = args.method_options.get("token_indices")
    check(idx is not None, "--method trainable-tokens needs the tokens to train: give --option token_indices=[ID, ...] "
                           "(the ids the tokenizer gives them)")
    return TrainableTokensConfig(token_indices=idx, target_modules=args.target_modules, task_type=args.task_type)


register_method(MethodSpec(
    name="trainable-tokens", config_cls=TrainableTokensConfig, family="selective", kind="select", mergeable=True,
    paper=TRAINABLE_TOKENS_PAPER, tuner=TrainableTokensTuner(), cli_config=trainable_tokens_from_cli,
    default_lr=5e-3, aliases=("trainable_tokens",),
))
