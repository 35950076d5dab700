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

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftkit.config import CONFIG_NAME, ConfigError, PeftConfig, check, get_method
from peftkit.formats.hf_peft import adapter_file_stats, atomic_write_bytes
from peftkit.train import distributed as D
from peftkit.train.checkpoint import check_checkpoint, latest_checkpoint
from peftkit.train.checks import (
    check_device,
    check_field_types,
    check_model_dir,
    drop_set_aside_runs,
    hold_lock,
    output_dir_problem,
    restore_run_files,
    set_aside_run_files,
    unwritable_problem,
)
from peftkit.train.data import (
    GLUE_FILES,
    CausalLMDataset,
    DataError,
    Row,
    Task,
    TokenizedDataset,
    collate,
    collate_causal,
    examples_from_rows,
    load_task,
    read_table,
    shipped_data_dir,
)
from peftkit.train.heads import label_maps, set_pad_token
from peftkit.train.metrics import compute
from peftkit.train.options import (
    CAUSAL_LM,
    DEFAULT_CAUSAL_MODEL_NAME,
    DEFAULT_MODEL_NAME,
    RunConfig,
    default_model_dir,
    read_run_config,
    resolve_model_dir,
)
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

__all__ = ["CAUSAL_LM", "DEFAULT_CAUSAL_MODEL_NAME", "DEFAULT_MODEL_NAME", "RunConfig", "build_peft_config",
           "default_model_dir", "evaluate_run", "load_classification_task", "read_run_config", "resolve_model_dir",
           "resume_run", "run_training"]
log = logging.getLogger("peftkit")


def _check_causal(model: torch.nn.Module, model_dir: Any) -> None:
    """Refuse a model whose logits at a position change with later tokens: an encoder (BERT, MiniLM) loaded with
    a language-model head attends both ways, so it would learn to copy the next token and report a meaningless
    perplexity (transformers' own warning about it is silenced here).

    Raises:
        ConfigError: naming the model folder and class.
    """
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % vocab
    was = model.training
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    model.train(was)
    # (relative to the logits' scale: a tiny random encoder's logits, about 0.2, move by only ~5e-5)
    moved = (logits[0, :3] - logits[1, :3]).abs().max().item()
    check(moved <= 1e-5 * max(logits.abs().max().item(), 1e-3),
          f"--task causal-lm needs a causal decoder, and {str(model_dir)!r} ({type(model).__name__}) lets each "
          "position see later tokens (an encoder such as BERT): it would learn to copy the next token and its "
          "perplexity would mean nothing. Give a decoder model, e.g. --model stories260K")


def _load_model_and_tokenizer(cfg: RunConfig, num_labels: int | None, regression: bool = False,
                              label_names: list[str] | None = None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = resolve_model_dir(cfg.model, cfg.task)
    check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_token_id = set_pad_token(tokenizer)
    torch.manual_seed(cfg.seed)  # the new classification head is initialised from the seed
    if cfg.task == CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    else:
        extra = {"problem_type": "regression"} if regression else {}
        # a checkpoint whose head has another number of labels gets a fresh head of the right size
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                   dtype=torch.float32, ignore_mismatched_sizes=True,
                                                                   use_safetensors=True, **extra)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    for key, value in label_maps(num_labels, None if regression else label_names).items():
        setattr(model.config, key, value)  # saved and exported models name their classes
    if cfg.quantize:
        from peftkit.quant import quantize_base

        try:
            quantize_base(model, cfg.quantize, quantize_embeddings=cfg.quantize_embeddings,
                          group_size=cfg.quant_group_size)
        except ConfigError as err:
            if cfg.quant_group_size is None:
                raise
            # the group size is no option of its own: a QA-LoRA run quantises in groups of its qalora_group_size
            raise ConfigError(f"{err}. The quantisation groups are qalora_group_size={cfg.quant_group_size} (a QA-LoRA "
                              "run quantises in groups of its own size); give --option qalora_group_size=N with N "
                              "dividing the layers' input widths") from None
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer


def load_classification_task(cfg: RunConfig, classes: tuple[int, list[str] | None] | None = None) -> Task:
    """The task named by ``cfg.task``, or the one given by ``cfg.train_file``/``eval_file``; with a named
    task, ``cfg.eval_file`` replaces its dev set (labels as in the task's files: class ids, or names for RTE).

    Args:
        classes: for a file task, the ``(num_labels, label_names)`` a trained run has (``run_config.json``):
            the training file is then not read (it may have changed or gone), and the eval file's labels must
            be among these classes.

    Raises:
        DataError: unknown task, missing files or columns, bad labels (see :func:`examples_from_rows`).
    """
    if cfg.train_file:
        if not cfg.eval_file:
            raise DataError("--train-file needs --eval-file too (the dev set that metrics are reported on)")
        if classes is None:
            train, names = examples_from_rows(read_table(cfg.train_file), cfg.text_column, cfg.label_column,
                                              cfg.pair_column, source=cfg.train_file)
        else:
            train, names = [], classes[1]
        dev, _ = examples_from_rows(read_table(cfg.eval_file), cfg.text_column, cfg.label_column,
                                    cfg.pair_column, source=cfg.eval_file, label_names=names, label_ids=not names,
                                    num_labels=None if classes is None else classes[0])
        if train and dev and (train[0]["text_pair"] is None) != (dev[0]["text_pair"] is None):
            shapes = {True: "sentence pairs", False: "single sentences"}
            raise DataError(f"--train-file {cfg.train_file!r} gives {shapes[train[0]['text_pair'] is not None]} but "
                            f"--eval-file {cfg.eval_file!r} gives {shapes[dev[0]['text_pair'] is not None]}; give files "
                            "of one shape (or name the columns with --text-column / --pair-column)")
        if classes is None and names is not None and len(names) < 2:
            raise DataError(f"{cfg.train_file}: every label is {names[0]!r}; a classifier needs at least two classes "
                            "in the training file")
        if classes is None and names is None and len({e["label"] for e in train}) == 1:  # ids, as for names
            raise DataError(f"{cfg.train_file}: every label is the class id {train[0]['label']}; a classifier needs at "
                            "least two classes in the training file")
        num = classes[0] if classes is not None else len(names) if names else max(e["label"] for e in train + dev) + 1
        task = Task(name=Path(cfg.train_file).stem, num_labels=max(num, 2), metric="accuracy", train=train,
                    dev=dev, label_names=names)
    else:
        task = load_task(cfg.task, cfg.data_dir)
        if cfg.eval_file:
            own_format, read_glue = GLUE_FILES[task.name]
            columns_given = cfg.text_column or cfg.label_column != "label" or cfg.pair_column
            if not columns_given and own_format(Path(cfg.eval_file)):
                task.dev = read_glue(Path(cfg.eval_file))  # the task's own layout (its dev.tsv): read as the task
            else:
                if task.is_regression:
                    raise DataError(f"--eval-file {cfg.eval_file!r}: task {task.name!r} is a regression, and "
                                    "regression from files other than the task's own .tsv layout is not supported")
                paired = task.dev[0]["text_pair"] is not None
                if cfg.pair_column and not paired:  # the model would be trained on sentences and scored on pairs
                    raise DataError(f"--pair-column {cfg.pair_column!r}: task {task.name!r} classifies single "
                                    "sentences, so its eval file has no second sentence; leave the option out")
                pair = cfg.pair_column or ("sentence2" if paired else None)
                task.dev, _ = examples_from_rows(read_table(cfg.eval_file), cfg.text_column, cfg.label_column, pair,
                                                 source=cfg.eval_file,
                                                 label_names=task.label_names if task.named_labels else None,
                                                 label_ids=not task.named_labels, num_labels=task.num_labels)
                if task.dev and (task.dev[0]["text_pair"] is not None) != paired:  # a sentence2 column found
                    raise DataError(f"--eval-file {cfg.eval_file!r} gives sentence pairs (sentence1, sentence2), but "
                                    f"task {task.name!r} classifies single sentences; name the text column with "
                                    "--text-column")
    if cfg.max_train_samples:
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        task.train = [task.train[i] for i in order[: cfg.max_train_samples]]
    if cfg.max_eval_samples:
        task.dev = task.dev[: cfg.max_eval_samples]
    return task


def build_peft_config(cfg: RunConfig) -> PeftConfig:
    """The method's config from the run options ``cfg`` (via the method's registered ``cli_config``).

    Raises:
        ConfigError: unknown method or invalid values.
    """
    spec = get_method(cfg.method)
    check(spec.cli_config is not None, f"method {spec.name!r} cannot be built from CLI options; build it in Python "
                                       "(AdapterFusion: peftkit.add_fusion over trained adapters)")
    config = spec.cli_config(cfg)
    fields = {f.name for f in dataclasses.fields(config)}
    # what makes a preset variant itself (DoRA: use_dora=True on LoRA): an --option may not undo it
    defining = getattr(spec.cli_config, "defining_fields", {})
    for key, value in cfg.method_options.items():
        own = sorted(fields - {f.name for f in dataclasses.fields(PeftConfig)})  # the method's, not every config's
        check(key in fields, f"{spec.config_cls.__name__} has no field {key!r}; its own fields: {', '.join(own)}"
                             + ("; a part's settings are set by giving the parts: --option 'configs=[...]' (see "
                                "`peftkit train --method composed`)" if "configs" in fields else ""))
        check(key != "task_type", f"--option task_type={cfg.method_options[key]!r}: the task type follows --task "
                                  f"({cfg.task_type} for {cfg.task}); leave it out")
        fixed = defining.get(key)  # a refinement of it is fine: init_lora_weights="pissa_niter_4" for PiSSA
        check(key not in defining or value == fixed or (isinstance(value, str) and isinstance(fixed, str)
                                                        and value.startswith(fixed + "_")),
              f"--option {key}={value!r} undoes what --method {spec.name} is ({key}={defining.get(key)!r}); "
              + (f"use --method {spec.variant_of} for that" if spec.variant_of
                 else getattr(spec.cli_config, "defining_reason", "leave it out")))
        setattr(config, key, value)
    check_field_types(config, "--option ", cfg.method_options)
    check(not config.inference_mode, "--option inference_mode=true freezes the adapter, so nothing would train; "
                                     "inference_mode is for loading a trained adapter")
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


def _classification_job(cfg: RunConfig, reserved: int = 0) -> _Job:
    task = load_classification_task(cfg)
    model, tokenizer = _load_model_and_tokenizer(cfg, task.num_labels, task.is_regression, task.label_names)
    pair = task.dev[0]["text_pair"] is not None
    least = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    if cfg.max_length < least:  # the tokenizer cannot cut a row that short: it would leave every row uncut
        raise ConfigError(f"--max-length {cfg.max_length} is too short: this tokenizer adds "
                          f"{least - (2 if pair else 1)} special tokens to each {'pair' if pair else 'sentence'}, so "
                          f"a row needs at least {least} tokens to hold any text")
    train_ds = TokenizedDataset(task.train, tokenizer, cfg.max_length)
    dev_ds = TokenizedDataset(task.dev, tokenizer, cfg.max_length)
    _check_positions(model, cfg.max_length, reserved)
    coll = collate(tokenizer.pad_token_id, task.is_regression)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        preds, gold = predict(m, dev_ds, coll, cfg.eval_batch_size, task.is_regression, distributed=True)
        return {f"dev_{k}": v for k, v in _metrics_for(task, preds, gold).items()}

    return _Job(model, tokenizer, train_ds, dev_ds, coll, count_rows, evaluate,
                {"task": task.name, "metric": task.metric},
                {"label_names": task.label_names, "num_labels": task.num_labels, "sentence_pair": pair})


def _check_positions(model: torch.nn.Module, max_length: int, reserved: int) -> None:
    """Refuse a ``--max-length`` longer than a learned position table (BERT's 512, GPT-2's 1024) leaves after the
    ``reserved`` positions of a soft prompt's virtual tokens: a longer row failed inside the model's forward
    (in training, after the run folder was written; or later, in eval or predict). Raises ConfigError."""
    from peftkit.methods.prompt_learning import position_table

    usable = position_table(model)[0]
    if usable is None:
        return
    room = usable - reserved
    if room < 3:  # a row needs a few real tokens (a classifier's [CLS] text [SEP]) beside the virtual ones
        raise ConfigError(f"num_virtual_tokens={reserved} leaves {max(room, 0)} of the model's {usable} positions for "
                          f"the text; use at most {usable - 3} virtual tokens (and --max-length at most {usable} "
                          "minus that)")
    if max_length > room:
        after = f" after the {reserved} virtual tokens" if reserved else ""
        raise ConfigError(f"--max-length {max_length} is more than the {room} positions the model has{after}; give "
                          f"--max-length {max(room, 1)} or less")


def _causal_lm_job(cfg: RunConfig, reserved: int = 0) -> _Job:
    train_records, eval_records = _lm_records(cfg)
    model, tokenizer = _load_model_and_tokenizer(cfg, None)
    _check_causal(model, resolve_model_dir(cfg.model, cfg.task))  # training only: eval and predict of a run go on
    text_key = cfg.text_column or "text"
    train_ds = CausalLMDataset(train_records, tokenizer, cfg.max_length, text_key=text_key)
    dev_ds = CausalLMDataset(eval_records, tokenizer, cfg.max_length, text_key=text_key)
    for name, ds in (("train", train_ds), ("dev", dev_ds)):
        if ds.skipped:
            log.warning("%d %s rows have no target token within --max-length %d and were skipped",
                        ds.skipped, name, cfg.max_length)
    for name, ds in (("train", train_ds), ("dev", dev_ds)):
        if not len(ds):
            raise DataError(f"no {name} row has a target token within --max-length {cfg.max_length}")
    _check_positions(model, cfg.max_length, reserved)
    coll = collate_causal(tokenizer.pad_token_id)
    before = perplexity(model, dev_ds, coll, cfg.eval_batch_size, distributed=True)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        after = perplexity(m, dev_ds, coll, cfg.eval_batch_size, distributed=True)
        return {"dev_perplexity_before": before["perplexity"], "dev_perplexity": after["perplexity"],
                "dev_tokens": after["tokens"]}

    return _Job(model, tokenizer, train_ds, dev_ds, coll, count_target_tokens, evaluate,
                {"task": CAUSAL_LM, "metric": "perplexity"}, {})


def run_training(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train, evaluate and save one run; returns the metrics dict also written to ``metrics.json``.

    Started by ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1), every process calls it and
    joins the process group for the run; ``batch_size`` stays the global batch.

    Args:
        cfg: the run's options.
        resume: continue the run in ``cfg.output_dir`` from its latest checkpoint (see :func:`resume_run`).
        overwrite: ``cfg.output_dir`` may be a non-empty folder; the files of an earlier run in it
            (:data:`peftkit.train.checks.RUN_FILES`) are moved aside into a hidden sub-folder once every
            check has passed, removed when the new run has been saved, and put back should it fail (an
            error, an interrupt) before writing a checkpoint; one that stops after a checkpoint is kept for
            ``resume`` (the exception gets a ``peftkit_note`` saying so) and the earlier files stay aside until a
            run in the folder finishes. Other files are kept. Without it, a non-empty folder is refused.

    Raises:
        ConfigError, DataError, FileNotFoundError: bad options, data, model folder or output folder, or
            (with ``resume``) no or a damaged checkpoint; all before anything is written.
    """
    cfg.validate()
    check_device(cfg.device)
    with D.process_group(cfg.device) as info, _run_lock(cfg, info) as lock:
        return _run(cfg, resume, overwrite, info, lock)


class _FolderLock:
    """Rank 0's ``flock`` on the run folder (on the folder itself, so no file is made), held until closed."""

    def __init__(self, folder: Path | None) -> None:
        self.folder, self.fd = folder, None

    def take(self) -> None:
        """Lock the folder (once it exists); a no-op when already held or without a folder.

        Raises:
            ConfigError: another process holds the lock (it is training in the folder).
        """
        if self.fd is not None or self.folder is None or not self.folder.is_dir():
            return
        try:
            self.fd = hold_lock(self.folder)
        except BlockingIOError:
            raise ConfigError(f"{str(self.folder)!r} is being trained by another process (a `peftkit train` in the "
                              "same folder); wait for it to end or stop it") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _run_lock(cfg: RunConfig, info: D.DistInfo) -> Iterator[_FolderLock]:
    """Hold a lock on the run folder (rank 0) for the whole run: taken here when the folder exists, else by the
    run right after it creates the folder (:meth:`_FolderLock.take`). Two runs in one folder at once (two
    ``--resume`` of a run, or an ``--overwrite`` run beside a running one) deleted each other's checkpoint
    writes or mixed their files. Where file locks are not available, nothing is locked.

    Raises:
        ConfigError: another process is training in the folder.
    """
    lock = _FolderLock(Path(cfg.output_dir) if cfg.output_dir and info.is_main else None)
    problem = None
    try:
        lock.take()
    except ConfigError as err:
        problem = str(err)
    problem = D.broadcast(problem)
    if problem:
        raise ConfigError(problem)
    try:
        yield lock
    finally:
        lock.close()


def _model_dir_overlap(out_dir: Path, cfg: RunConfig) -> str | None:
    """Why ``out_dir`` cannot take the run because it is or holds the base model's folder (the adapter files
    written there make transformers load that folder as an adapter from then on), or None."""
    try:
        model = Path(resolve_model_dir(cfg.model, cfg.task)).resolve()
    except (ConfigError, OSError, ValueError):
        return None  # an unknown model is named by its own check
    out = out_dir.resolve()
    if out == model or out in model.parents:  # (a sub-folder is not read when the model is loaded)
        return (f"--output-dir {str(out_dir)!r} {'is' if out == model else 'holds'} the base model's folder "
                f"{str(model)!r}; the run's adapter files there would change that model folder. Give a folder outside it")
    return None


def _run(cfg: RunConfig, resume: bool, overwrite: bool, info: D.DistInfo, lock: _FolderLock) -> dict[str, Any]:
    wall = time.perf_counter()
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir or D.broadcast(f"runs/{cfg.label()}-{cfg.task if not cfg.train_file else 'file'}-"
                                                 f"{time.strftime('%Y%m%d-%H%M%S')}"))
    checkpoint = None
    existed_at_check = out_dir.is_dir()
    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {str(out_dir / 'checkpoints')!r} to resume from; a run "
                                    "writes them when trained with --save-every N")
        check_checkpoint(checkpoint, info.rank, info.world_size)
        # the run's log, checkpoints and results are written there: refused before any work (rank 0's answer)
        problem = D.broadcast(unwritable_problem(out_dir, "--resume")
                              or unwritable_problem(out_dir / "checkpoints", "--resume (its checkpoints)"))
        if problem:
            raise ConfigError(problem)
    else:
        problem = D.broadcast(output_dir_problem(out_dir, overwrite) or _model_dir_overlap(out_dir, cfg))
        if problem:
            raise ConfigError(problem)
    if not cfg.full_finetune:  # a method's run defaults (QLoRA: an NF4 base) fill options left unset
        for key, value in get_method(cfg.method).run_options.items():
            if getattr(cfg, key) in (None, False):
                setattr(cfg, key, value)
    peft_config = None if cfg.full_finetune else build_peft_config(cfg)  # validate options before heavy work
    if cfg.fsdp and not cfg.full_finetune and not get_method(cfg.method).shards:
        raise ConfigError(f"--method {cfg.method} does not train sharded (--fsdp): its step computes on the whole "
                          "adapter tensors; train it with DDP (torchrun without --fsdp)")
    if (cfg.quantize in ("int4", "int8") and getattr(peft_config, "use_qalora", False) and cfg.quant_group_size is None
            and not resume):  # a resumed run keeps the base it started with (one saved without the field: the format's default group)
        # QA-LoRA's merge folds into the zero points only where each of its groups holds whole quantisation groups
        cfg.quant_group_size = peft_config.qalora_group_size
    check(not (cfg.full_finetune and cfg.quantize), f"--quantize {cfg.quantize} freezes the base; it cannot be "
          "combined with --full-finetune")
    check_model_dir(resolve_model_dir(cfg.model, cfg.task))  # before the data is read
    reserved = getattr(peft_config, "num_virtual_tokens", 0) or 0  # a soft prompt's positions
    job = (_causal_lm_job if cfg.task == CAUSAL_LM else _classification_job)(cfg, reserved)
    model = _adapt(job.model, peft_config, cfg)
    # built before counting: data-driven adapters (FISH mask, ...) choose their parameters in it
    trainer = Trainer(model, job.train_ds, job.collate_fn, _training_args(cfg, out_dir),
                      count_loss_items=job.count_loss_items)
    handler = aside = None
    done = False
    problem, existed = None, False
    if info.is_main:  # the folder is locked before anything is written there, also one made since the checks
        try:
            existed = out_dir.is_dir()
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.folder = lock.folder or out_dir  # (a default run folder is named only now)
            lock.take()
            if not resume and not existed_at_check and existed:  # another run made it meanwhile
                problem = output_dir_problem(out_dir, overwrite)
        except ConfigError as err:
            problem = str(err)
    problem = D.broadcast(problem)
    if problem:
        raise ConfigError(problem)
    if info.is_main:  # every check has passed: now the folder is written
        if not resume and existed:
            # an earlier run (--overwrite) is moved aside, and put back should this run fail
            aside = set_aside_run_files(out_dir)
        handler = _file_log(out_dir)
        _write_json(out_dir / "run_config.json", {**dataclasses.asdict(cfg), **job.config_extra})
    try:
        trainable, total = _count(model)
        log.info("run %s: %d train / %d dev examples, %s trainable of %s, peak lr %g, %d process(es)%s", out_dir,
                 len(job.train_ds), len(job.dev_ds), f"{trainable:,}", f"{total:,}", cfg.learning_rate(),
                 info.world_size, f", resuming from {checkpoint}" if checkpoint else "")
        stats = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = job.evaluate(model)
        _save(model, job.tokenizer, out_dir, cfg, info)
        result = {**job.head, **metrics, "dev_examples": len(job.dev_ds), "train_examples": len(job.train_ds),
                  "trainable_params": trainable, "total_params": total,
                  **(_file_stats(out_dir, cfg) if info.is_main else {}), **stats,
                  "wall_seconds": time.perf_counter() - wall, "peak_memory_mib": max(D.all_gather(peak_memory_mib())),
                  **_weight_memory(model), "quantize": cfg.quantize,
                  "processes": info.world_size, "method": cfg.label(), "lr": cfg.learning_rate(),
                  "output_dir": str(out_dir)}
        if info.is_main:
            _write_json(out_dir / "metrics.json", result)
            log.info("done: %s", json.dumps(result))
        done = True
    except BaseException as err:
        if info.is_main and aside is not None and latest_checkpoint(out_dir) is not None:
            # the new run can be continued: keep it, and the earlier one aside until a run there finishes
            err.peftkit_note = (f"the run stopped after writing checkpoints: it is kept, so that `peftkit train "  # type: ignore[attr-defined]
                                f"--resume {out_dir}` continues it; the earlier run's files are in {aside} until a "
                                "run in that folder finishes (move them back by hand to keep the earlier run instead)")
            log.warning(err.peftkit_note)  # type: ignore[attr-defined]
            aside = None
        elif info.is_main and isinstance(err, KeyboardInterrupt):
            err.peftkit_note = (f"`peftkit train --resume {out_dir}` continues it from its last checkpoint"  # type: ignore[attr-defined]
                                if latest_checkpoint(out_dir) is not None else
                                "it wrote no checkpoint (--save-every N writes them), so it cannot be resumed; start "
                                f"again with --output-dir {out_dir} --overwrite")
        raise
    finally:
        if handler is not None:
            logging.getLogger("peftkit").removeHandler(handler)
            handler.close()
        if info.is_main:
            if done:
                drop_set_aside_runs(out_dir)  # this run's earlier one, or one kept by an interrupted start
            elif aside is not None:
                restore_run_files(out_dir, aside)
    return result


def check_unfinished(run_dir: str | os.PathLike) -> None:
    """Refuse to resume a finished run.

    Raises:
        ConfigError: ``run_dir`` holds ``metrics.json`` (the run finished; resuming would rewrite its results).
    """
    check(not (Path(run_dir) / "metrics.json").is_file(),
          f"{str(run_dir)!r} is a finished run (it has metrics.json): there is nothing to resume, and resuming would "
          "rewrite its results. `peftkit eval --adapter` scores it again; to train it again, start a new run")


def resume_run(run_dir: str | os.PathLike, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Continue the interrupted run in ``run_dir`` from its latest checkpoint with the run's own options
    (``run_config.json``); the result equals that of an uninterrupted run. Under a multi-process
    launcher it needs as many processes as the interrupted run had.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder, or holds no checkpoint.
        ConfigError: a damaged ``run_config.json`` or checkpoint file (named), a checkpoint that does
            not fit (another number of processes, ...), or a finished run (``metrics.json`` written).
    """
    cfg, _ = read_run_config(Path(run_dir))
    check_unfinished(run_dir)
    cfg.output_dir, cfg.progress, cfg.device = str(run_dir), progress, device or cfg.device
    return run_training(cfg, resume=True)


def _lm_records(cfg: RunConfig, train_too: bool = True) -> tuple[list[Any], list[Any]]:
    """Train and eval records; without ``eval_file`` the last 10% of the train file is held out, and
    without ``train_file`` the shipped TREC corpus (train and dev) is used. With ``train_too=False`` and an
    ``eval_file`` the training file is not read (re-evaluating a run whose training file has gone).

    Raises:
        DataError: see :func:`_read_lm_records`; a file with no record (named).
    """
    trec = shipped_data_dir() / "TREC"
    # --text-column is what the training rows train on (refused where they lack it); an evaluation file is read
    # with it where its rows have it (before their prompt/response fields, as training reads them), as plain
    # text or prompt/response rows otherwise
    text_key, given = cfg.text_column or "text", cfg.text_column is not None
    if cfg.eval_file and not train_too:
        return [], _read_lm_records(cfg.eval_file, text_key, prefer_column=given)
    train = _read_lm_records(cfg.train_file or str(trec / "train.jsonl"), text_key, given)
    if cfg.eval_file or not cfg.train_file:
        dev = _read_lm_records(cfg.eval_file or str(trec / "dev.jsonl"), text_key, given and not cfg.eval_file,
                               prefer_column=given)
    else:
        cut = max(1, len(train) // 10)
        train, dev = train[:-cut], train[-cut:]
        if not train:
            raise DataError(f"{cfg.train_file}: {len(dev)} record(s); holding out the last 10% for evaluation leaves "
                            "none to train on: give more records, or an --eval-file")
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        dev = dev[: cfg.max_eval_samples]
    return train, dev


def _read_lm_records(path: str, text_key: str = "text", column_given: bool = False,
                     prefer_column: bool = False) -> list[Any]:
    """The records of a causal-LM file: rows of a table, each with ``text_key`` or ``prompt`` and ``response``;
    or a plain-text file's paragraphs (lines when it has one paragraph). With ``column_given`` (``--text-column``)
    every row must have ``text_key``, which is what it trains on (its prompt/response fields, if any, are not read).
    With ``prefer_column`` (an evaluation file of a run given ``--text-column``) a row with ``text_key`` is read as
    that text only, and a row without it as its prompt/response.

    Raises:
        DataError: a missing file, text that is not UTF-8, a file with no record, a row with neither field, or
            one whose field is not text (null, a list, an object), naming file and line; with ``column_given``, a
            plain-text file or a row without ``text_key``.
    """
    p = Path(path)
    if column_given and p.suffix.lower() not in (".jsonl", ".csv", ".tsv"):
        raise DataError(f"--text-column {text_key!r} names a field of JSONL/CSV/TSV rows, but {p} is plain text (every "
                        "paragraph is trained on); leave the option out")
    if p.suffix.lower() in (".jsonl", ".csv", ".tsv"):
        rows = read_table(p)
        for n, row in enumerate(rows, start=1):
            where = f"line {row.line}" if isinstance(row, Row) else f"row {n}"
            if column_given and text_key not in row:
                kind = " (a prompt/response row)" if "prompt" in row and "response" in row else ""
                raise DataError(f"{p}: {where} has no {text_key!r} (--text-column){kind}: keys {sorted(row)}; leave "
                                "--text-column out to train on prompt/response rows")
            if text_key not in row and not ("prompt" in row and "response" in row):
                raise DataError(f"{p}: {where} has neither {text_key!r} nor 'prompt'/'response': keys {sorted(row)}"
                                + ("" if text_key != "text" else "; --text-column names another text field"))
            only_text = column_given or (prefer_column and text_key in row)
            fields = ("prompt", "response") if "prompt" in row and "response" in row and not only_text else (
                text_key,)
            for field in fields:  # a null or an object would be trained on as the text "None" or "{'a': 1}"
                if not isinstance(row[field], (str, int, float)) or isinstance(row[field], bool):
                    raise DataError(f"{p}: {where}: {field!r} holds {row[field]!r}, not text")
        if not rows:
            raise DataError(f"{p}: the file holds no record")
        if column_given or prefer_column:
            return [{text_key: row[text_key]} if text_key in row else row for row in rows]
        return rows
    if not p.is_file():
        raise DataError(f"data file {path!r} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); save the file as "
                        "UTF-8") from None
    # paragraphs are separated by a blank line: also a Windows one (\r\n\r\n), or one holding only spaces
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [b.strip() for b in re.split(r"\n[ \t\f\v]*\n", text) if b.strip()]
    records = blocks if len(blocks) > 1 else [line for line in text.splitlines() if line.strip()]
    if not records:
        raise DataError(f"{p}: the file holds no text")
    return records


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
                             fsdp=cfg.fsdp, loraplus_lr_ratio=cfg.loraplus_lr_ratio)


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


def evaluate_run(run_dir: str | os.PathLike, eval_file: str | None = None, device: str | None = None,
                 text_column: str | None = None, pair_column: str | None = None, label_column: str | None = None
                 ) -> dict[str, float]:
    """Reload a run folder (base model + adapter, or the fully fine-tuned model) and recompute its
    dev metrics (or those of the whole ``eval_file``: a named task's file in its own GLUE layout, e.g. its
    ``dev.tsv``, or a table whose columns are found as for training, or named by ``text_column``,
    ``pair_column`` and ``label_column``, which apply only with ``eval_file``).

    Raises:
        FileNotFoundError: no ``run_config.json`` or no adapter in ``run_dir``. AdapterLoadError: corrupt
            adapter. ConfigError: damaged ``run_config.json``, unavailable device. DataError: bad ``eval_file``.
    """
    run_dir = Path(run_dir)
    cfg, raw = read_finished_run(run_dir)
    cfg.device = device or cfg.device
    check_run_model(run_dir, cfg, device)
    columns = {"text_column": text_column, "pair_column": pair_column, "label_column": label_column}
    given = {k: v for k, v in columns.items() if v is not None}
    check(not given or eval_file, f"{', '.join('--' + k.replace('_', '-') for k in given)} "
                                  f"{'names a column' if len(given) == 1 else 'name columns'} of --eval-file; give "
                                  "the file too")
    from peftkit.train.serve import run_shape

    paired = run_shape(cfg, raw)["pair"]
    for key in given:
        if cfg.task == CAUSAL_LM and key != "text_column":
            raise ConfigError(f"--{key.replace('_', '-')} does not apply: {str(run_dir)!r} is a causal-LM run (its "
                              "rows are text, or prompt/response)")
        if key == "pair_column" and not paired:
            raise ConfigError(f"--pair-column does not apply: {str(run_dir)!r} is a run on single sentences")
    if eval_file:
        cfg.eval_file, cfg.max_eval_samples = eval_file, None
        for key, value in given.items():
            setattr(cfg, key, value)
    if cfg.full_finetune:
        cfg.model = str(run_dir / "model")
    if cfg.task == CAUSAL_LM:
        model, tokenizer = _load_model_and_tokenizer(cfg, None)
        if not cfg.full_finetune:
            model = _load_adapter(model, run_dir)
        ds = CausalLMDataset(_lm_records(cfg, train_too=False)[1], tokenizer, cfg.max_length,
                             text_key=cfg.text_column or "text")
        if not len(ds):  # a perplexity over no token would read 1.0, a perfect score
            raise DataError(f"no {'row of ' + repr(eval_file) if eval_file else 'dev row'} has a target token within "
                            f"--max-length {cfg.max_length}")
        return {"dev_perplexity": perplexity(model, ds, collate_causal(tokenizer.pad_token_id),
                                             cfg.eval_batch_size)["perplexity"], "dev_examples": len(ds)}
    # a file run's classes come from its run_config.json: its training file may have changed or gone since
    task = load_classification_task(cfg, _run_classes(raw) if cfg.train_file else None)
    known = not cfg.train_file or isinstance(raw.get("sentence_pair"), bool)  # (older file runs do not record it)
    if not known and not cfg.pair_column:  # trained when a sentence2 column was not read: single sentences
        for example in task.dev:
            example["text_pair"] = None
    if known and task.dev and (task.dev[0]["text_pair"] is not None) != paired:  # encoded otherwise than trained
        which = f"--eval-file {eval_file!r}" if eval_file else f"the run's dev file {cfg.eval_file!r}"
        raise DataError(f"{which} gives {'single sentences' if paired else 'sentence pairs'}, but the run was "
                        f"trained on {'sentence pairs' if paired else 'single sentences'}"
                        + ("; name its second sentence with --pair-column" if paired else
                           "; name its text column with --text-column"))
    model, tokenizer = _load_model_and_tokenizer(cfg, task.num_labels, task.is_regression, task.label_names)
    if not cfg.full_finetune:
        model = _load_adapter(model, run_dir)
    dev_ds = TokenizedDataset(task.dev, tokenizer, cfg.max_length)
    preds, gold = predict(model, dev_ds, collate(tokenizer.pad_token_id, task.is_regression), cfg.eval_batch_size,
                          task.is_regression)
    return {f"dev_{k}": v for k, v in _metrics_for(task, preds, gold).items()} | {"dev_examples": len(dev_ds)}


def read_finished_run(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """:func:`read_run_config` of the run folder ``run_dir``, which must hold a finished run: its adapter (or
    ``model/``, fully fine-tuned).

    Raises:
        FileNotFoundError: no ``run_config.json``, or the run did not finish (the message says how to go on).
        ConfigError: a damaged ``run_config.json``.
    """
    cfg, raw = read_run_config(run_dir)
    saved = run_dir / ("model" if cfg.full_finetune else CONFIG_NAME)
    if not saved.exists():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no {saved.name}: the run did not finish; continue it with "
                                "`peftkit train --resume` (when it saved checkpoints) or train again")
    return cfg, raw


def check_run_model(run_dir: Path, cfg: RunConfig, device: str | None) -> None:
    """Check a finished run's device and model folder (``model/`` when fully fine-tuned) with messages that name
    them as the run's own settings, not as options the user gave. Raises ConfigError / FileNotFoundError."""
    check_device(cfg.device, option="--device" if device else "the run's device (run_config.json; override it "
                                                              "with --device)")
    model_dir = run_dir / "model" if cfg.full_finetune else resolve_model_dir(cfg.model, cfg.task)
    check_model_dir(str(model_dir), option="the run's model folder (run_config.json)")


def _run_classes(raw: dict[str, Any]) -> tuple[int, list[str] | None]:
    """``(num_labels, label_names)`` of a trained classification run, from its ``run_config.json`` object.

    Raises:
        ConfigError: either is missing or damaged.
    """
    num_labels, names = raw.get("num_labels"), raw.get("label_names")
    check(isinstance(num_labels, int) and not isinstance(num_labels, bool) and num_labels >= 2,
          f"run_config.json: num_labels={num_labels!r} must be an integer >= 2 (the run's number of classes)")
    check(names is None or (isinstance(names, list) and len(names) == num_labels and all(isinstance(n, str)
                                                                                         for n in names)),
          f"run_config.json: label_names={names!r} must be None or a list of {num_labels} class names")
    return num_labels, names


def _load_adapter(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    from peftkit.model import PeftModel

    return PeftModel.from_pretrained(model, run_dir)
