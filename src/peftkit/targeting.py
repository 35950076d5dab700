"""Which modules of a model a method adapts.

Matching rules (the same as HF PEFT's, on whole dotted segments, never on substrings):

* ``target_modules`` as a list: a module matches when its full name equals an entry or ends with
  ``"." + entry`` (``"query"`` matches ``bert.encoder.layer.0.attention.self.query``, not ``query_proj``).
* ``target_modules`` as a string: a regular expression that must match the *whole* module name.
* ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the model's output layer
  (``get_output_embeddings()``, e.g. ``lm_head``) and the ``out_proj`` of a ``torch.nn.MultiheadAttention``.
* That ``out_proj`` is never adapted on its own: the attention reads its weight directly and never calls it,
  so an adapter there would change nothing until merged. Naming it is an error; LoRA adapts it, with the
  packed input projection, when the attention module itself is targeted (:mod:`peftkit.methods.lora_mha`).
* ``exclude_modules`` takes the same forms and wins over ``target_modules``.
* ``layers_to_transform`` keeps only modules inside the listed block indices (``[]`` keeps all), as peft
  finds them: the first number segment that follows another segment and precedes one
  (``model.layers.3.self_attn.q_proj`` -> 3, T5's ``encoder.block.1.layer.0.SelfAttention.q`` -> 1), or with
  ``layers_pattern`` (a regex, or a list tried in order) the number after the first segment it matches.
  A module named in full in a ``target_modules`` list is adapted whatever its block, as in peft.
* ``target_modules="all-linear"`` is read in any letter case, as peft does.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from peftkit.config import ConfigError, check

ALL_LINEAR = "all-linear"


def linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` and, when transformers is installed, its GPT-2 ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def matches(name: str, pattern: str | Sequence[str] | None) -> bool:
    """Whether module ``name`` matches ``pattern`` (list of names/suffixes, or a full-match regex)."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def check_pattern_keys(field: str, patterns: dict[str, object]) -> None:
    """Check that every key of ``rank_pattern``/``alpha_pattern`` (``field``) is a non-empty string that compiles as
    a regular expression (see :func:`pattern_key`).

    Raises:
        ConfigError: a key that is not a string, is empty, or is not a valid regular expression (named, with why).
    """
    for key in patterns:
        check(isinstance(key, str) and key != "", f"{field} key {key!r} must be a non-empty string: a module name or "
                                                  "a regular expression matched against the end of module names")
        try:
            re.compile(key)
        except re.error as err:
            raise ConfigError(f"{field} key {key!r} is not a valid regular expression ({err.msg} at position "
                              f"{err.pos} of the key); escape special characters (re.escape) for a literal "
                              "module name") from None


def pattern_key(name: str, patterns: dict[str, object]) -> str | None:
    """The key of ``rank_pattern``/``alpha_pattern`` that applies to module ``name``, or None.

    A key is a regular expression matched against the end of the name on a segment boundary
    (HF PEFT's rule); the first key in insertion order that matches wins.
    """
    for key in patterns:
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return key
    return None


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index of module ``name``, or None, by peft's rule: without ``layers_pattern`` the first number
    segment that follows another segment and precedes one; with it (a regex, or a list tried in order) the
    number after the first segment the pattern matches."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if found:
                break
    # (the pattern may hold groups of its own, or an alternation that matches without the index: no block)
    index = found.groupdict().get("idx") if found else None
    return int(index) if index is not None else None


def iter_logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for the model as the user sees it.

    A peftkit wrapper is reported under its own name with its *base* module, and its internals
    (``base_layer``, adapter modules, saved copies) are hidden, so adding a second adapter targets
    the same modules as the first did.
    """
    from peftkit.layers import unwrap

    hidden: list[str] = []
    # a wrapper around a whole sub-layer (a parallel adapter's) keeps the modules inside it addressable:
    # (real prefix "x.base_layer.", logical prefix "x.")
    renamed: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if hidden and any(name.startswith(h) for h in hidden):
            continue
        if any(name == real[:-1] for real, _ in renamed):
            continue  # the sub-layer itself, already reported under the wrapper's name
        logical = next((log + name[len(real):] for real, log in renamed if name.startswith(real)), name)
        base = unwrap(module)
        if base is not module:
            if getattr(module, "holds_adaptable_modules", False):
                hidden.append(name + ".adapters.")
                renamed.insert(0, (name + ".base_layer.", logical + "."))
            else:
                hidden.append(name + ".")
        yield logical, base


def check_target_fields(config: Any) -> None:
    """Checks of the targeting fields a method config has: ``target_modules`` not ``[]`` (sets and tuples
    become sorted lists) and ``layers_to_transform`` a block index ``>= 0`` or a list of them.

    Raises:
        ConfigError: naming the field and its value.
    """
    targets = getattr(config, "target_modules", None)
    check(targets != [], "target_modules=[] adapts nothing; give module names/suffixes, a regex, 'all-linear', or "
                         "None for the model type's defaults")
    if isinstance(targets, (set, tuple)):
        config.target_modules = sorted(targets)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:  # peft reads it in any letter case
        config.target_modules = ALL_LINEAR
    pattern = getattr(config, "layers_pattern", None)
    for pat in [pattern] if isinstance(pattern, str) else (pattern or []):
        try:
            re.compile(pat)
        except (re.error, TypeError) as err:
            raise ConfigError(f"layers_pattern={pattern!r} is read as regular expression(s), and {pat!r} is not a "
                              f"valid one ({err}); give the name of the segment before the block index, e.g. "
                              "'layers'") from None
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else layers
        check(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers),
              f"layers_to_transform={config.layers_to_transform!r} must be a block index >= 0 or a list of them")


def hidden_targets(model: nn.Module, inside: Sequence[str], target_modules: str | Sequence[str] | None, *,
                   supported: tuple[type[nn.Module], ...], exclude_modules: str | Sequence[str] | None = None,
                   layers_to_transform: int | Sequence[int] | None = None,
                   layers_pattern: str | Sequence[str] | None = None) -> list[str]:
    """The modules at or under the wrappers named in ``inside`` (other adapters' ``modules_to_save``, whose
    insides :func:`find_targets` does not see) that ``target_modules`` would select, by their plain names.

    Shapes: none (module names only). Raises nothing.
    """
    from peftkit.layers import unwrap

    select = _selector(model, target_modules, exclude_modules, layers_to_transform, layers_pattern)
    hits: list[str] = []
    for wrapper_name in inside:
        for sub, module in unwrap(model.get_submodule(wrapper_name)).named_modules():
            name = f"{wrapper_name}.{sub}" if sub else wrapper_name
            if select(name, unwrap(module)) == "selected" and isinstance(unwrap(module), supported):
                hits.append(name)
    return hits


def _selector(model: nn.Module, target_modules: str | Sequence[str] | None,
              exclude_modules: str | Sequence[str] | None, layers_to_transform: int | Sequence[int] | None,
              layers_pattern: str | Sequence[str] | None):
    """``select(name, module)``: ``"selected"``, ``"excluded"`` (matched, then removed by ``exclude_modules``)
    or None (not matched, or outside ``layers_to_transform``), as :func:`find_targets` selects."""
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    all_linear = target_modules == ALL_LINEAR
    named = set(target_modules) if isinstance(target_modules, (list, tuple)) else set()

    def exact(name: str) -> bool:  # peft adapts a module named in full whatever its block
        return name in named

    output_layer = model.get_output_embeddings() if all_linear and hasattr(model, "get_output_embeddings") else None
    lin = linear_types()

    def select(name: str, module: nn.Module) -> str | None:
        hit = (isinstance(module, lin) and module is not output_layer) if all_linear else matches(name, target_modules)
        if not hit:
            return None
        if matches(name, exclude_modules):
            return "excluded"
        if layers and not exact(name) and layer_index(name, layers_pattern) not in layers:
            return None
        return "selected"

    return select


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    supported: tuple[type[nn.Module], ...],
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Sequence[str] = (),
    method: str = "this method",
) -> list[str]:
    """Names of the modules to adapt, in model order.

    Args:
        model: the model to search (its own module names are used, without any prefix).
        target_modules: list of names/suffixes, a full-match regex, or ``"all-linear"``.
        supported: module types the method can wrap; a matched module of another type is an error.
        exclude_modules: names/suffixes or regex removed from the match.
        layers_to_transform: block index or indices to keep; None keeps all.
        layers_pattern: segment name(s) preceding the block index.
        skip: module names (and their subtrees) never targeted, e.g. ``modules_to_save``.
        method: the method's name, for error messages.

    Returns:
        list of module names (at least one).

    Raises:
        ConfigError: a string pattern that is not a valid regex; nothing matches (the message lists module
            names that do exist, or the ``skip`` modules that were all it matched), or a matched module has a
            type the method cannot wrap.
    """
    for field, pattern in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(pattern, str) and pattern != ALL_LINEAR:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{field}={pattern!r} is read as a regular expression, and it is not a valid one "
                                  f"({err}); give a list of module names or a valid regex") from None
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    select = _selector(model, target_modules, exclude_modules, layers_to_transform, layers_pattern)
    bypassed = bypassed_modules(model)
    found: list[str] = []
    candidates: list[str] = []
    names: list[str] = []
    excluded: list[str] = []
    saved: list[str] = []  # selected, but skipped (trained whole as modules_to_save)
    for name, module in iter_logical_modules(model):
        names.append(name)
        if not name or any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip):
            if name and select(name, module) == "selected":
                saved.append(name)
            continue
        if isinstance(module, supported):
            candidates.append(name)
        verdict = select(name, module)
        if verdict == "excluded":
            excluded.append(name)
        if verdict != "selected":
            continue
        if not isinstance(module, supported):
            kind = type(module)
            check(not kind.__module__.startswith("peft."),
                  f"module {name!r} is a layer of the peft package ({kind.__module__}.{kind.__name__}): this model "
                  "already holds peft adapters (peft changes the base model in place); start from a fresh copy of "
                  "the base model")
            raise ConfigError(
                f"{method} cannot adapt module {name!r} of type {type(module).__name__}; "
                f"supported types: {', '.join(t.__name__ for t in supported)}"
            )
        if id(module) in bypassed:
            check(target_modules == ALL_LINEAR,
                  f"{method} cannot adapt {name!r}: it is the out_proj of a torch.nn.MultiheadAttention, whose forward "
                  "reads that weight directly and never calls the module, so an adapter there would change nothing "
                  f"until merged; leave it out (e.g. exclude_modules=[{name!r}]), or, with LoRA, target the attention "
                  f"module itself ({name.rpartition('.')[0]!r}), which adapts its input and output projections together")
            continue
        found.append(name)
    if not found and excluded:
        raise ConfigError(f"target_modules={target_modules!r} matched {excluded[:3]}{'...' if len(excluded) > 3 else ''}"
                          f", but exclude_modules={exclude_modules!r} removes every one of them, which leaves "
                          "nothing to adapt; narrow exclude_modules")
    check(found or not saved,
          f"target_modules={target_modules!r} matched only {saved[:3]}{'...' if len(saved) > 3 else ''}, which "
          "modules_to_save trains whole (this adapter's or another's; a classification or QA task_type puts its head "
          "there), so nothing is left to adapt; target other modules, or leave these out of modules_to_save")
    if not found:
        suffixes = sorted({c.rsplit(".", 1)[-1] for c in candidates})
        raise ConfigError(
            f"target_modules={target_modules!r} matched no module of the model"
            + (f" within layers_to_transform={list(layers_to_transform)}" if layers_to_transform is not None else "")
            + f". Modules {method} can adapt include: {', '.join(candidates[:5]) or 'none'}"
            + (f"; their last name segments: {suffixes[:20]}" if suffixes else "")
        )
    nested = next(((a, b) for a in found for b in found if b.startswith(a + ".")), None)
    if nested is not None:
        raise ConfigError(f"target_modules selects both {nested[0]!r} and {nested[1]!r}, which lies inside it; the "
                          f"wrapper of {nested[0]!r} runs that module whole, so an adapter on {nested[1]!r} would never "
                          "run (and merging would apply it): adapt one of them (exclude_modules can drop the other)")
    check_single_path(model, found)
    if target_modules is not None and not isinstance(target_modules, str):
        unmatched = [p for p in target_modules if not any(n == p or n.endswith("." + p) for n in names)]
        if unmatched:
            warnings.warn(UnmatchedTargetWarning(
                f"target_modules entries {unmatched} match no module of the model (a typo?); the other entries "
                f"matched {len(found)} module(s)"), stacklevel=2)
    return found


def bypassed_modules(model: nn.Module) -> set[int]:
    """``id``s of the submodules of ``model`` whose forward their parent never calls: ``out_proj`` of every
    ``nn.MultiheadAttention`` (``F.multi_head_attention_forward`` reads its weight and bias)."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def check_single_path(model: nn.Module, found: list[str]) -> None:
    """Refuse a target module that the model also holds under another name (``self.b = self.a``, one layer
    placed twice in an ``nn.Sequential``): the wrapper replaces one path, so calls through the others would run
    the base module without the adapter, while merging changes the module for every path. (Modules that only
    share a weight tensor, tied embeddings, are separate modules and pass.)

    Args:
        model: the model ``found`` names modules of.
        found: module names about to be wrapped.

    Raises:
        ConfigError: naming the first such module and its other names; nothing is changed.
    """
    wanted = {id(model.get_submodule(n)): n for n in found}
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in wanted:
            paths.setdefault(id(module), []).append(name)
    shared = next(((wanted[k], [p for p in v if p != wanted[k]]) for k, v in paths.items() if len(v) > 1), None)
    if shared is not None:
        raise ConfigError(f"module {shared[0]!r} is also part of the model as {shared[1]}; an adapter wraps one name, "
                          "so calls through the others would skip it while merging would change them too: exclude it "
                          "(exclude_modules), or give the model one module per name")


class UnmatchedTargetWarning(UserWarning):
    """A ``target_modules`` list names something no module of the model is called, or a ``rank_pattern`` /
    ``alpha_pattern`` key matches none of the adapted modules (peft ignores both silently; peftkit warns,
    and ``peftkit train`` refuses them)."""


#: ``target_modules`` that the LoRA family (LoRA, AdaLoRA, VeRA, LoHa, LoKr, ...) adapts when a config
#: leaves it None, by ``model.config.model_type``: the query and value projections, as peft chooses.
LORA_TARGET_DEFAULTS: dict[str, tuple[str, ...] | str] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ("query", "value")),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "gpt2": ("c_attn",),
    **dict.fromkeys(("gpt_neox", "bloom", "falcon", "RefinedWeb", "RefinedWebModel", "chatglm"), ("query_key_value",)),
    **dict.fromkeys(("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "opt",
                     "gptj", "gpt_neo", "bart", "stablelm"), ("q_proj", "v_proj")),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
    "layoutlm": ("query", "value"),
    "gpt_bigcode": ("c_attn",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mpt": ("Wqkv",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
    # a regex (peft's): the language model's query/value projections, not the vision tower's
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}

#: VeRA's defaults: LoRA's, except Phi's attention only (peft's VeRA table).
VERA_TARGET_DEFAULTS: dict[str, tuple[str, ...] | str] = {**LORA_TARGET_DEFAULTS, "phi": ("q_proj", "v_proj")}


#: AdaLoRA's defaults: peft adapts more layers than LoRA's query/value on these model types.
ADALORA_TARGET_DEFAULTS: dict[str, tuple[str, ...] | str] = {
    **LORA_TARGET_DEFAULTS,
    "roberta": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    **dict.fromkeys(("opt", "bart"), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
}


def default_target_modules(model: nn.Module, defaults: dict[str, tuple[str, ...] | str]) -> list[str] | str:
    """The ``target_modules`` a config left as None gets on ``model``, from ``defaults`` by the HF
    ``config.model_type``: a list of names, or a regex string where peft's table has one (Gemma 4).

    Raises:
        ConfigError: the model type has no default (a plain module, or a type not in ``defaults``).
    """
    kind = getattr(getattr(model, "config", None), "model_type", None)
    check(kind in defaults, f"target_modules=None: there are no default targets for model_type={kind!r} (known: "
                            f"{', '.join(sorted(defaults))}); give target_modules: module names/suffixes, a regex, "
                            "or 'all-linear'")
    found = defaults[kind]
    return found if isinstance(found, str) else list(found)
