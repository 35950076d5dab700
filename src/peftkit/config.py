"""Configuration base class, validation helpers and the method registry.

Every PEFT method is described by a dataclass derived from :class:`PeftConfig` and registered once
with :func:`register_method`. The core (injection, saving, loading, the CLI's ``methods`` listing)
only ever talks to the registry; it never branches on a method's name.

The JSON written by :meth:`PeftConfig.to_dict` is HuggingFace PEFT's ``adapter_config.json``: the
same field names and the same ``peft_type`` strings, so that files move both ways.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit._version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class TaskType(str, enum.Enum):
    """What the adapted model does (mirrors ``peft.TaskType``); a config's ``task_type`` takes a member or
    its string value."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


FAMILIES = ("reparameterised", "additive", "selective", "hybrid", "quantisation", "multi-task")
KINDS = ("wrap", "insert", "prompt", "select", "compose")

# Fields that HF PEFT writes into every adapter_config.json and that carry no meaning for peftkit.
_FOREIGN_HARMLESS = {"peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "revision"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is valid."""


class AdapterNotFoundError(FileNotFoundError, ValueError):
    """An adapter folder or its ``adapter_config.json`` is missing: a ``FileNotFoundError``, and a ``ValueError`` as
    peft's "Can't find 'adapter_config.json'" is, so that code catching either ports."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds.

    Raises:
        ConfigError: ``condition`` is false; the error's message is ``message``.
    """
    if not condition:
        raise ConfigError(message)


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (bool is not a number; unknown constructs pass)."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, collections.abc.Sequence):
        return isinstance(value, (list, tuple, set)) and (not args or all(conforms(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(conforms(k, args[0]) and conforms(v, args[1])
                                                            for k, v in value.items()))
    if isinstance(tp, type) and not issubclass(tp, PeftConfig):
        return isinstance(value, tp)
    return True


def non_finite(value: Any) -> bool:
    """Whether ``value`` is, or contains (lists, dicts), a NaN or infinite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple, set)):
        return any(non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    return False


def check_fields(config: Any) -> None:
    """Check every dataclass field of ``config`` against its type annotation, and that no number in it
    is NaN or infinite.

    Raises:
        ConfigError: naming the field, the value and the expected type.
    """
    try:
        hints = typing.get_type_hints(type(config))
    except (NameError, TypeError):  # an annotation that cannot be resolved here: check finiteness only
        hints = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        check(not non_finite(value), f"{f.name}={value!r} is not valid: numbers must be finite (no NaN or inf)")
        tp = hints.get(f.name)
        if tp is not None and not conforms(value, tp):
            raise ConfigError(f"{f.name}={value!r} is not valid: expected {describe_type(tp)}, got "
                              f"{type(value).__name__}{_misfit_entry(value, tp)}")


def _misfit_entry(value: Any, tp: Any) -> str:
    """``" whose entry K is V (type)"`` for the first entry of a list or dict ``value`` that does not fit, when
    the container itself is of a kind ``tp`` allows; else ``""``."""
    for option in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if origin is dict and isinstance(value, dict) and args:
            for k, v in value.items():
                if not (conforms(k, args[0]) and conforms(v, args[1])):
                    return f" whose entry {k!r} is {v!r} ({type(v).__name__}; expected {describe_type(args[1])})"
        if origin in (list, tuple, set, collections.abc.Sequence) and isinstance(value, (list, tuple, set)) and args:
            for v in value:
                if not conforms(v, args[0]):
                    return f" holding {v!r} ({type(v).__name__}; expected {describe_type(args[0])})"
    return ""


def describe_type(tp: Any) -> str:
    """The type annotation ``tp`` in words for error messages (``"an integer"``, ``"list[str] | None"``)."""
    text = str(tp).replace("typing.", "")
    return {"<class 'bool'>": "true or false", "<class 'int'>": "an integer", "<class 'float'>": "a number",
            "<class 'str'>": "a string"}.get(text, text)


@dataclass
class PeftConfig:
    """Base class of every method's configuration (mirrors ``peft.PeftConfig``).

    Args:
        task_type: one of ``SEQ_CLS``, ``CAUSAL_LM``, ``SEQ_2_SEQ_LM``, ``TOKEN_CLS``, ``QUESTION_ANS``,
            ``FEATURE_EXTRACTION`` or ``None`` (default). With ``SEQ_CLS`` and ``TOKEN_CLS`` the model's
            classification head (``classifier`` or ``score``), with ``QUESTION_ANS`` its ``qa_outputs``, is
            added to ``modules_to_save`` when injected, as in peft.
        base_model_name_or_path: where the base model came from; written to the adapter file.
        inference_mode: ``True`` freezes the adapter (set when loading with ``is_trainable=False``).

    Raises:
        ConfigError: on an unknown ``task_type``.
    """

    peft_type: ClassVar[str] = ""
    #: whether rows of a mixed-adapter batch (``adapter_names=...``) may use this method's adapters
    mixed_batches: ClassVar[bool] = True
    #: whether the method's layers route each row by a task id (Poly): ``task_ids=`` of the model's forward
    takes_task_ids: ClassVar[bool] = False
    #: ``target_modules`` by ``model_type`` for a config that leaves them None (the LoRA family, as peft)
    default_target_modules: ClassVar[dict[str, tuple[str, ...] | str] | None] = None
    #: fields added after adapters of this method were first saved, with the value those files meant: a saved
    #: config (one with ``peft_version``) that lacks such a field loads with it, not with today's default
    saved_before_defaults: ClassVar[dict[str, Any]] = {}
    #: whether ``save_embedding_layers="auto"`` writes the base embeddings when ``target_modules`` names one (peft
    #: does, but for trainable tokens, whose file holds the trained rows alone)
    auto_saves_targeted_embeddings: ClassVar[bool] = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a path given for a folder field (tokenizer, base model) is its str
            if f.name.endswith("_name_or_path") and isinstance(getattr(self, f.name), os.PathLike):
                setattr(self, f.name, os.fspath(getattr(self, f.name)))
        self.check_values()

    def check_values(self) -> None:
        """Check every field: ``task_type``, the field types, ``modules_to_save`` and the method's
        :meth:`validate`. Run when the config is built and again when an adapter is added from it (its
        fields may have been changed since).

        Raises:
            ConfigError: the first value that is not valid, named with what would be.
        """
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
            check(self.task_type in TASK_TYPES,
                  f"task_type={self.task_type!r} is not valid; expected one of {TASK_TYPES} or None")
        check_fields(self)
        saved = getattr(self, "modules_to_save", None)
        if isinstance(saved, (list, tuple, set)):
            bad = [m for m in saved if isinstance(m, str) and (not m.strip() or m.startswith(".") or m.endswith("."))]
            check(not bad, f"modules_to_save entries {bad!r} are not module names; give names such as 'classifier' "
                           "(a module's dotted name or its end)")
        self.validate()

    def validate(self) -> None:
        """Check the fields; subclasses extend this. Raises :class:`ConfigError`."""

    @classmethod
    def as_saved(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The fields of a saved config (``data``, from a file written by peft or peftkit) as this class takes them,
        for a value that a file may hold but a new config refuses because it would build the adapter otherwise
        than the file's tensors say (HRA: an odd ``r`` with ``init_weights=True``). The identity by default."""
        return data

    @property
    def is_prompt_learning(self) -> bool:
        """Whether the method changes inputs/attention rather than layers (peft's notion)."""
        return get_method(self.peft_type).kind == "prompt"

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``adapter_config.json`` (sets become sorted lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        out["peft_type"] = self.peft_type
        out["peft_version"] = f"peftkit-{__version__}"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config registered for ``data["peft_type"]`` (or ``cls`` when called on a subclass).

        Keys peftkit does not know are dropped when their value is empty (None, False, 0, ``{}``, ``[]``, ``""``)
        or when they do not change what the adapter computes (``peft_version``, ``revision``, ..., and the fields
        a method's ``inert_peft_fields`` names: ones peft writes for it but ignores). A saved config (one with
        ``peft_version``) that lacks a field named in the method's ``saved_before_defaults`` gets that value: the
        behaviour it was saved with, from before the field existed; it then goes through the method's
        :meth:`as_saved`. Any other
        unknown key is refused: it is a feature peftkit lacks (e.g. peft's ``alora_invocation_tokens``), and
        loading the adapter without it would give other outputs than peft's.

        Raises:
            ConfigError: ``data`` is not a mapping, an unknown ``peft_type``, an invalid field value, or an unknown
                field with a value.
        """
        check(isinstance(data, collections.abc.Mapping),
              f"an adapter config must be a dict of its fields with 'peft_type' (e.g. {{'peft_type': 'LORA', 'r': 8}}), "
              f"got {type(data).__name__} {data!r:.80}")
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target = cls
        if cls is PeftConfig or (peft_type is not None and cls.peft_type != peft_type):
            check(peft_type is not None, "adapter config has no 'peft_type' field")
            target = get_method(peft_type).config_cls
        names = {f.name for f in dataclasses.fields(target)}
        if "peft_version" in data:  # written by a save: a field it lacks did not exist yet
            data = target.as_saved({**target.saved_before_defaults, **data})
        unknown = {k: v for k, v in data.items() if k not in names}
        harmless = _FOREIGN_HARMLESS | getattr(target, "inert_peft_fields", frozenset())
        ignored = sorted(k for k, v in unknown.items() if k not in harmless and v not in (None, False, {}, [], "", 0))
        check(not ignored, f"{target.__name__}: the adapter config sets fields peftkit does not support: "
                           + ", ".join(f"{k}={unknown[k]!r}" for k in ignored)
                           + "; without them the adapter would compute something else than the file describes, so "
                             "it is refused (only empty values, e.g. None or False, of such fields are accepted)")
        inert = getattr(target, "inert_peft_fields", frozenset())  # ignored by peft, whatever the value: dropped
        return target(**{k: v for k, v in data.items() if k in names and k not in inert})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``directory`` atomically (temporary file, then rename)."""
        from peftkit.formats.hf_peft import atomic_write_bytes

        atomic_write_bytes(os.path.join(directory, CONFIG_NAME), self.to_json_bytes())

    def to_json_bytes(self) -> bytes:
        """``adapter_config.json``'s content: :meth:`to_dict` as indented, key-sorted UTF-8 JSON."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None) -> PeftConfig:
        """Read ``adapter_config.json`` from ``directory`` (``directory/subfolder`` when given, as peft).

        Raises:
            AdapterNotFoundError: the folder or its ``adapter_config.json`` is missing (a ``FileNotFoundError`` and,
                as peft raises, a ``ValueError``).
            NotADirectoryError: ``directory`` is a file (e.g. the adapter's weights file).
            ConfigError: the file is not UTF-8, the JSON is malformed, or it describes an invalid config.
        """
        if subfolder:
            directory = os.path.join(directory, subfolder)
        path = os.path.join(directory, CONFIG_NAME)
        if os.path.isfile(directory):
            parent = os.path.dirname(os.path.abspath(directory))
            raise NotADirectoryError(f"{os.fspath(directory)!r} is a file; give the adapter folder that holds "
                                     f"{CONFIG_NAME} and {WEIGHTS_NAME}"
                                     + (f" ({parent!r}?)" if os.path.isfile(os.path.join(parent, CONFIG_NAME)) else ""))
        if not os.path.isdir(directory):
            raise AdapterNotFoundError(f"adapter folder {os.fspath(directory)!r} does not exist")
        if not os.path.isfile(path):
            inside = sorted(e for e in os.listdir(directory) if os.path.isfile(os.path.join(directory, e, CONFIG_NAME)))
            hint = (f"; it holds the adapter folder(s) {inside} (save_pretrained writes adapters other than "
                    "'default' into sub-folders): give one of those" if inside else "")
            raise AdapterNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}; an adapter folder holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        except UnicodeDecodeError as err:  # a damaged file, or one re-saved as UTF-16 by an editor
            raise ConfigError(f"{path} is not UTF-8 text ({err}); an adapter config is UTF-8 JSON") from err
        check(isinstance(data, dict), f"{path} must hold a JSON object, got {type(data).__name__}")
        check(cls is not PeftConfig or data.get("peft_type") is not None,
              f"{path} has no 'peft_type' field (e.g. \"LORA\"); it is not an adapter config peftkit or peft wrote")
        return cls.from_dict(data)


# --- the method registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One registered PEFT method.

    Args:
        name: the CLI name (``lora``, ``ia3``, ...).
        config_cls: its :class:`PeftConfig` subclass; ``config_cls.peft_type`` is the file-format id.
        family: one of :data:`FAMILIES` (the survey's six families).
        kind: how it changes the model, one of :data:`KINDS`.
        mergeable: whether its weights can be folded into the base model exactly.
        paper: title, year and arXiv id of the paper it implements.
        tuner: the method's :class:`~peftkit.tuners.Tuner`; its ``inject(host, config, adapter_name)``
            adds the adapter.
        cli_config: callable ``cli_config(args) -> config`` building a config from CLI options, or None.
        aliases: other names that find this method.
        default_lr: the peak learning rate ``peftkit train`` uses for this method when ``--lr`` is not
            given (None: 1e-3); soft prompts need a higher one, and methods that change the pretrained
            weights themselves (partial fine-tuning, sparse differences) train at full fine-tuning rates.
        variant_of: the name of another registered method whose config class, file format and tuner this
            one shares (DoRA is ``LoraConfig(use_dora=True)``, P-tuning v2 is a prefix-tuning preset). A
            variant has its own name, paper and CLI preset, but owns no ``peft_type``: files with that type
            load as the parent method.
        run_options: defaults for ``peftkit train`` run options that the user left unset, e.g. QLoRA's
            ``{"quantize": "nf4"}``.
        shards: whether it trains with FSDP (``--fsdp``); False for methods whose steps compute on the
            parameters in ways sharded tensors do not support (AdaLoRA's penalty, SoRA's gate, diff
            pruning's budget), which are refused with ``--fsdp`` before the run starts.
    """

    name: str
    config_cls: type[PeftConfig]
    family: str
    kind: str
    mergeable: bool
    paper: str
    tuner: Any
    cli_config: Callable[..., PeftConfig] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    default_lr: float | None = None
    variant_of: str | None = None
    run_options: dict[str, Any] = field(default_factory=dict)
    shards: bool = True

    @property
    def peft_type(self) -> str:
        """The ``peft_type`` of the method's config class (a variant's is its parent method's)."""
        return self.config_cls.peft_type


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry under its name, aliases and (unless it is a variant) ``peft_type``.

    Raises:
        ConfigError: the family or kind is unknown, the name is taken by another method, or ``variant_of``
            names no registered method with the same config class.
    """
    check(spec.family in FAMILIES, f"family={spec.family!r} must be one of {FAMILIES}")
    check(spec.kind in KINDS, f"kind={spec.kind!r} must be one of {KINDS}")
    if spec.variant_of is not None:
        base = _REGISTRY.get(spec.variant_of.lower())
        check(base is not None and base.config_cls is spec.config_cls,
              f"variant_of={spec.variant_of!r} must name a registered method using {spec.config_cls.__name__}")
    keys = (spec.name, *spec.aliases) if spec.variant_of else (spec.name, spec.peft_type, *spec.aliases)
    for key in keys:
        other = _REGISTRY.get(key.lower())
        check(other is None or other is spec or other.name == spec.name,
              f"method name {key!r} is already registered by {other.name if other else ''!r}")
        _REGISTRY[key.lower()] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look up a method by CLI name, alias or ``peft_type`` (case-insensitive).

    Raises:
        ConfigError: the name is not registered; the message lists the registered names.
    """
    _load_builtin_methods()
    name = getattr(name, "value", name)  # a PeftType member
    spec = _REGISTRY.get(str(name).lower())
    if spec is None:
        close = difflib.get_close_matches(str(name).lower(), method_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown PEFT method {name!r}{hint}; registered methods: {', '.join(method_names())}")
    return spec


def method_names() -> list[str]:
    """The CLI names of all registered methods, in registration order."""
    _load_builtin_methods()
    seen: dict[str, None] = {}
    for spec in _REGISTRY.values():
        seen.setdefault(spec.name, None)
    return list(seen)


def all_methods() -> list[MethodSpec]:
    """Every registered :class:`MethodSpec`, one per method, grouped by family (in :data:`FAMILIES`
    order) and in registration order within a family."""
    specs = [get_method(n) for n in method_names()]
    return sorted(specs, key=lambda s: FAMILIES.index(s.family))


def _load_builtin_methods() -> None:
    import peftkit.methods  # noqa: F401  (importing registers the built-in methods)
