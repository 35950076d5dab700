"""``AutoPeftModel*``: load an adapter folder together with the base model it names (mirrors peft's classes).

``AutoPeftModelForCausalLM.from_pretrained("runs/x/adapter")`` reads the folder's ``adapter_config.json``,
loads the base model from its ``base_model_name_or_path`` with the matching transformers ``AutoModelFor*``
class, and loads the adapter onto it with :meth:`peftkit.PeftModel.from_pretrained`. As everywhere in
peftkit nothing is downloaded: the base must be a local folder (or a name transformers finds in its
local cache).

Paper context: none of its own; this is HF PEFT's loading convenience, for the methods of
:mod:`peftkit.methods`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from peftkit.config import PeftConfig, check
from peftkit.model import (
    LOAD_KEYWORDS,
    TASK_MODEL_CLASSES,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    _adapter_folder,
    _check_load_args,
)


class _BaseAutoPeftModel:
    """What every ``AutoPeftModel*`` class shares; subclasses set the transformers auto class's name and the
    :class:`PeftModel` class they build."""

    _auto_class: str = "AutoModel"
    _peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained(folder)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, revision: str | None = None,
                        **kwargs: Any) -> PeftModel:
        """Load the base model named by the adapter folder's config, then the adapter onto it.

        Args:
            pretrained_model_name_or_path: a local adapter folder (HF PEFT format, saved by peftkit or peft).
            adapter_name: the adapter's name (default ``"default"``).
            is_trainable: False (default) loads it frozen, in eval mode; True to train it further.
            config: use this config instead of the folder's ``adapter_config.json``.
            revision: accepted for peft's signature; only None (nothing is downloaded).
            **kwargs: ``subfolder`` (the adapter is in ``folder/subfolder``), ``low_cpu_mem_usage``, ``key_mapping``
                and peft's loading keywords at their defaults go to :meth:`PeftModel.from_pretrained`; every other keyword
                goes to the base model's ``from_pretrained`` (e.g. ``dtype``, ``num_labels``).

        Returns:
            The :class:`PeftModel` subclass of the config's ``task_type`` (``PeftModel`` itself without one).
            When the adapter folder holds a tokenizer with more tokens than the base's input embeddings, the
            embeddings are first resized to it, as peft does. A ``peftkit train`` classification run folder (with
            ``run_config.json``) gets the head the run trained: its ``num_labels`` and class names, unless given, and,
            when the base config has no ``pad_token_id``, the padding id the run used (the base tokenizer's pad,
            else EOS, else UNK token).

        Raises:
            ConfigError: the config has no ``base_model_name_or_path``; its ``task_type`` belongs to another
                class (``AutoPeftModel`` itself takes only configs without a task type, as in peft);
                ``revision`` is not None; ``is_trainable`` is not a bool or ``config`` not a peftkit config (both
                checked before anything is read).
            TypeError: ``pretrained_model_name_or_path`` is not a path.
            FileNotFoundError: the adapter folder or its files are missing, or the base model cannot be found
                locally (the message names the path).
            AdapterLoadError: the adapter's tensors do not fit the base model.
        """
        check(revision is None, f"revision={revision!r} is not supported: peftkit reads local folders only; "
              "give the folder of the revision you want")
        # before the base model is loaded (minutes for a large one), not after it
        _check_load_args(f"{cls.__name__}.from_pretrained", pretrained_model_name_or_path, is_trainable, config)
        # the adapter's keywords go to PeftModel.from_pretrained; every other one to the base model's from_pretrained
        adapter_kwargs = {k: kwargs.pop(k) for k in LOAD_KEYWORDS if k in kwargs}
        folder = os.fspath(_adapter_folder(f"{cls.__name__}.from_pretrained", pretrained_model_name_or_path,
                                           dict(adapter_kwargs)))
        peft_config = config if config is not None else PeftConfig.from_pretrained(folder)
        task = peft_config.task_type
        if cls._peft_class is PeftModel:
            check(task is None, f"the adapter in {folder!r} has task_type={task!r}; load it with "
                  f"{_auto_name(TASK_MODEL_CLASSES[task])}.from_pretrained (AutoPeftModel takes adapters without a "
                  "task type, as in peft)")
        elif task is not None:
            check(TASK_MODEL_CLASSES[task] is cls._peft_class,
                  f"the adapter in {folder!r} has task_type={task!r}, so {cls.__name__} cannot load it; use "
                  f"{_auto_name(TASK_MODEL_CLASSES[task])}.from_pretrained")
        base_path = peft_config.base_model_name_or_path
        check(bool(base_path), f"the adapter config in {folder!r} names no base_model_name_or_path; load the base "
              f"model yourself and call {cls._peft_class.__name__}.from_pretrained(base_model, {folder!r})")
        import transformers

        auto = getattr(transformers, cls._auto_class)
        run = _run_config(folder) if cls._auto_class == "AutoModelForSequenceClassification" else {}
        kwargs = {**_run_head_keywords(run), **kwargs}
        try:
            base = auto.from_pretrained(base_path, **kwargs)
        except OSError as err:
            raise FileNotFoundError(f"the base model {base_path!r} named by {folder!r}/adapter_config.json could not "
                                    f"be loaded with transformers.{cls._auto_class} ({err}); nothing is downloaded: "
                                    "load the base yourself and call PeftModel.from_pretrained(base, folder), or "
                                    "pass config= with base_model_name_or_path set to a local folder") from err
        _resize_to_saved_tokenizer(base, folder)
        if run and getattr(base.config, "pad_token_id", None) is None:
            _set_run_pad_token(base, base_path)
        peft_class = TASK_MODEL_CLASSES.get(task or "", cls._peft_class)
        return peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                          is_trainable=is_trainable, config=config, **adapter_kwargs)


def _auto_name(peft_class: type[PeftModel]) -> str:
    return "AutoPeftModel" + peft_class.__name__[len("PeftModel"):]


def _resize_to_saved_tokenizer(base: nn.Module, folder: str) -> None:
    """Grow ``base``'s token embeddings to the tokenizer saved in the adapter folder, if there is one with more
    tokens (peft's rule: a run that added tokens saves its tokenizer with the adapter)."""
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")) or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(folder))
    if size > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(size)


def _run_config(folder: str) -> dict[str, Any]:
    """The ``run_config.json`` object of a ``peftkit train`` run folder, or {} (another folder, or a damaged file:
    then the adapter loads as any other)."""
    try:
        with open(os.path.join(folder, "run_config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _run_head_keywords(run: dict[str, Any]) -> dict[str, Any]:
    """The base keywords a classification run built its head with: ``num_labels`` (a base folder's head of another
    size is replaced, as the run replaced it; the trained head comes from the adapter) and, when the run names its
    classes, ``id2label``/``label2id`` (the caller's own keywords win)."""
    num_labels, names = run.get("num_labels"), run.get("label_names")
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        return {}
    from peftkit.train.heads import label_maps

    # as the run loaded it, with the class names it wrote into its config
    return {"num_labels": num_labels, "ignore_mismatched_sizes": True,
            **label_maps(num_labels, names if isinstance(names, list) else None)}


def _set_run_pad_token(base: nn.Module, base_path: str) -> None:
    """Give ``base`` the padding id a ``peftkit train`` run gave it (:func:`peftkit.train.heads.set_pad_token`: its
    tokenizer's pad token, else its EOS, else its UNK); nothing when the base has no tokenizer or none of them."""
    from transformers import AutoTokenizer

    from peftkit.train.heads import set_pad_token

    try:
        tok = AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError):
        return
    pad = set_pad_token(tok)
    if pad is not None:
        base.config.pad_token_id = pad


class AutoPeftModel(_BaseAutoPeftModel):
    """Load an adapter without a ``task_type`` onto ``transformers.AutoModel`` (mirrors ``peft.AutoPeftModel``);
    see :meth:`_BaseAutoPeftModel.from_pretrained`."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    """Load a ``CAUSAL_LM`` adapter onto ``transformers.AutoModelForCausalLM`` (mirrors
    ``peft.AutoPeftModelForCausalLM``); see :meth:`_BaseAutoPeftModel.from_pretrained`."""

    _auto_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    """Load a ``SEQ_2_SEQ_LM`` adapter onto ``transformers.AutoModelForSeq2SeqLM`` (mirrors
    ``peft.AutoPeftModelForSeq2SeqLM``); see :meth:`_BaseAutoPeftModel.from_pretrained`."""

    _auto_class = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    """Load a ``SEQ_CLS`` adapter onto ``transformers.AutoModelForSequenceClassification`` (mirrors peft's class;
    pass ``num_labels=`` when the head has other than the base config's number of labels); see
    :meth:`_BaseAutoPeftModel.from_pretrained`."""

    _auto_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    """Load a ``TOKEN_CLS`` adapter onto ``transformers.AutoModelForTokenClassification`` (mirrors peft's class);
    see :meth:`_BaseAutoPeftModel.from_pretrained`."""

    _auto_class = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    """Load a ``QUESTION_ANS`` adapter onto ``transformers.AutoModelForQuestionAnswering`` (mirrors peft's class);
    see :meth:`_BaseAutoPeftModel.from_pretrained`."""

    _auto_class = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    """Load a ``FEATURE_EXTRACTION`` adapter onto ``transformers.AutoModel`` (mirrors peft's class); see
    :meth:`_BaseAutoPeftModel.from_pretrained`."""

    _peft_class = PeftModelForFeatureExtraction


__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification"]
