"""A small, explicit training loop: AdamW, linear warm-up and decay, gradient clipping, a progress bar,
checkpoints that resume exactly, and several processes (DDP or FSDP2) under ``torchrun``.

It trains any model whose forward returns an object with ``.loss`` when given a batch dict (HF
transformers models, :class:`peftkit.PeftModel`), and only the parameters that require grad.

Global batches: step ``k`` trains on rows ``order[(k-1)*B : k*B]`` of the current epoch's order
(one ``randperm`` per epoch from a generator seeded with ``seed``; a last, shorter batch ends each
epoch). With N processes every rank draws the same global batch and trains on its own contiguous
slice; each rank's loss is weighted by its share of the batch's loss items (rows, or target tokens
with ``count_loss_items``), so the averaged gradient is the one process's gradient of the whole
batch, and N processes give one process's result.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from peftkit.config import check
from peftkit.train import distributed as D
from peftkit.train.checkpoint import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from peftkit.train.checkpoint import STATE as CHECKPOINT_STATE
from peftkit.train.checks import SEED_MAX, check_device, check_field_types

log = logging.getLogger("peftkit")


@dataclass
class TrainingArguments:
    """Hyper-parameters of :class:`Trainer`.

    Args:
        learning_rate: peak AdamW learning rate. Default 1e-3 (adapters); use ~5e-5 for full fine-tuning.
        num_epochs: passes over the data (fractions allowed) when ``max_steps`` is None. Default 1.
        max_steps: optimiser steps; overrides ``num_epochs`` when set.
        batch_size: rows per step, over all processes together (the global batch). Default 32.
        eval_batch_size: rows per evaluation batch. Default 128.
        warmup_ratio: fraction of steps with linearly rising learning rate. Default 0.06.
        weight_decay: AdamW decay of matrices (never of biases or norms). Default 0.01.
        max_grad_norm: clip the global gradient norm (0 disables). Default 1.0.
        seed: seeds the data order and, at the start of training, torch, numpy and random (rank r of
            several processes uses :func:`peftkit.train.distributed.rank_seed`). Default 0.
        log_every: steps between log lines. Default 50.
        progress: show a progress bar (loss, speed) on rank 0. Default True.
        save_every: write a checkpoint every N steps into ``output_dir/checkpoints`` (None: never).
        output_dir: the run folder checkpoints go to (a str or path); required with ``save_every``.
        fsdp: with several processes, shard the model with FSDP2 instead of replicating it (DDP).
        loraplus_lr_ratio: LoRA+ (Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large
            Models", 2024, arXiv:2402.12354): train ``lora_B`` (and 1-D parameters) at ``learning_rate *
            ratio``, through :func:`peftkit.create_loraplus_optimizer` with peft's grouping; the paper
            suggests 2 to 16 (peft's default 16). None (default): plain AdamW, every group at ``learning_rate``.

    Raises:
        ConfigError: a value out of range (named in the message).
    """

    learning_rate: float = 1e-3
    num_epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 50
    progress: bool = True
    save_every: int | None = None
    output_dir: str | os.PathLike | None = None
    fsdp: bool = False
    loraplus_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        # types first (a fractional batch_size failed mid-run; a string learning_rate gave a raw TypeError), and
        # every number finite (a NaN max_grad_norm turned every parameter into NaN)
        check_field_types(self)
        if self.output_dir is not None:
            self.output_dir = os.fspath(self.output_dir)  # a Path is taken, kept as the str it names
        check(self.learning_rate > 0, f"learning_rate={self.learning_rate!r} must be > 0")
        check(0 <= self.seed <= SEED_MAX, f"seed={self.seed!r} must lie in 0..{SEED_MAX}")
        check(self.batch_size >= 1, f"batch_size={self.batch_size!r} must be >= 1")
        check(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size!r} must be >= 1")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps!r} must be >= 1")
        check(self.num_epochs > 0, f"num_epochs={self.num_epochs!r} must be > 0")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio!r} must lie in [0, 1)")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay!r} must be >= 0")
        # a negative norm makes clipping flip every gradient: training then climbs the loss
        check(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm!r} must be >= 0 (0 disables clipping)")
        check(self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
              f"loraplus_lr_ratio={self.loraplus_lr_ratio!r} must be > 0 (LoRA+ suggests 2 to 16), or None for "
              "plain AdamW")
        check(self.log_every >= 1, f"log_every={self.log_every!r} must be >= 1")
        check(self.save_every is None or self.save_every >= 1, f"save_every={self.save_every!r} must be >= 1")
        check(self.save_every is None or self.output_dir is not None,
              f"save_every={self.save_every!r} needs output_dir (the folder checkpoints are written to)")

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a plain dict (``dataclasses.asdict``), field name -> value."""
        return asdict(self)


def _checkpoint_folder(path: Path) -> Path:
    """The checkpoint that ``path`` names: itself when it holds a trainer state, else the latest checkpoint of
    the run folder ``path`` (or of the run whose ``checkpoints`` folder it is).

    Raises:
        FileNotFoundError: ``path`` is none of these (the message says what to give).
    """
    if (path / CHECKPOINT_STATE).is_file():
        return path
    for root in (path, path.parent if path.name == CHECKPOINTS else None):
        if root is not None and (found := latest_checkpoint(root)) is not None:
            return found
    raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint (no {CHECKPOINT_STATE}) nor a run folder with "
                            f"checkpoints; give the run's output_dir or one of its {CHECKPOINTS}/step-<N> folders")


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy (with ``seed % 2**32``) and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mib() -> float:
    """Peak memory of this process in MiB: the CUDA allocator's peak when on GPU, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` as optimiser groups: decayed (2-D and up) with ``weight_decay``, and
    not decayed (biases, norms, vectors) with 0; an empty group is left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def batch_order(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """The global batches (lists of dataset indices) from step ``start_step + 1`` on, endlessly.

    Each epoch is one ``torch.randperm(n)`` from a generator seeded with ``seed`` and is cut into
    ``ceil(n / batch_size)`` batches (the last one shorter). Resuming at ``start_step`` replays the
    earlier epochs' permutations, so the order is the same as in an uninterrupted run.
    """
    per_epoch = math.ceil(n / batch_size)
    generator = torch.Generator().manual_seed(seed)
    epoch, position = divmod(start_step, per_epoch)
    for _ in range(epoch):
        torch.randperm(n, generator=generator)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(position, per_epoch):
            yield order[i * batch_size:(i + 1) * batch_size]
        position = 0


def count_rows(batch: dict[str, Any]) -> int:
    """Loss items of a batch whose loss is a mean over rows (classification, regression)."""
    return next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]


def count_target_tokens(batch: dict[str, Tensor]) -> int:
    """Loss items of a causal-LM batch: tokens with a label (not -100) that a prediction targets
    (the first token of a row is never one, as the labels are shifted left by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def check_optimizer_after_prepare(model: nn.Module, optimizer: torch.optim.Optimizer, before: set[int]) -> None:
    """Refuse an optimiser built before ``peft_prepare`` created trainable parameters it does not hold (a FISH
    or Child-Tuning mask is chosen from data and replaces the adapter's parameters): those would never train.

    Args:
        before: ``id``s of the model's parameters before ``peft_prepare``.

    Raises:
        ConfigError: naming up to three such parameters.
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in before and id(p) not in held]
    check(not missing, f"the optimiser was built before the adapter chose its parameters from data (peft_prepare: "
                       f"the FISH / Child-Tuning mask), so it does not hold {len(missing)} of them (e.g. "
                       f"{', '.join(missing[:3])}) and they would never train; pass no optimiser (the trainer builds "
                       "one), or build it after calling model.peft_prepare(batches) yourself")


class Trainer:
    """Train ``model`` on ``dataset``, on one process or on every rank of a ``torch.distributed`` group.

    Before the optimiser is built, a :class:`peftkit.PeftModel` gets ``peft_prepare(batches)`` with
    training batches in the training order (methods whose parameters are chosen from data use them).

    Args:
        model: returns ``.loss`` for ``model(**batch)``; with FSDP it is sharded in place.
        dataset: a map-style dataset of items for ``collate_fn``.
        collate_fn: items -> batch dict of tensors (including ``labels``), rows first.
        args: :class:`TrainingArguments`.
        optimizer: defaults to AdamW over the trainable parameters (see :func:`param_groups`).
        device: where batches go; defaults to the model's device.
        count_loss_items: the number of items the model's loss averages over in a batch (default
            :func:`count_rows`; :func:`count_target_tokens` for causal LMs); it weights each rank's
            share of a global batch.

    Raises:
        ValueError: the model has no trainable parameter, or the dataset is empty.
        ConfigError: fewer rows per step than processes, FSDP or ``loraplus_lr_ratio`` with a ready-made
            optimizer, a ready-made optimizer that lacks parameters ``peft_prepare`` created, or
            ``loraplus_lr_ratio`` on a model with no trainable ``lora_B`` (not a LoRA-family adapter).
    """

    def __init__(self, model: nn.Module, dataset: torch.utils.data.Dataset, collate_fn: Callable,
                 args: TrainingArguments | None = None, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str | None = None,
                 count_loss_items: Callable[[dict[str, Any]], int] = count_rows) -> None:
        self.model, self.dataset, self.collate_fn = model, dataset, collate_fn
        self.args = args or TrainingArguments()
        self.count_loss_items = count_loss_items
        self.dist = D.current()
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        check(self.args.batch_size >= self.dist.world_size,
              f"batch_size={self.args.batch_size} is the global batch and must be at least the number of "
              f"processes ({self.dist.world_size})")
        if device is not None:
            check_device(str(device), "device")
        self.device = torch.device(device) if device else next(model.parameters()).device
        if hasattr(model, "peft_prepare"):  # data-driven adapters (FISH mask, ...) pick their parameters now
            before = {id(p) for p in model.parameters()}
            # one pass over the data at most: a method wanting more rows than there are (FISH's num_fisher_samples)
            # uses each row once rather than cycling through them
            one_pass = itertools.islice(batch_order(len(dataset), self.args.batch_size, self.args.seed),
                                        math.ceil(len(dataset) / self.args.batch_size))
            model.peft_prepare({k: v.to(self.device) if isinstance(v, Tensor) else v
                                for k, v in self.collate_fn([dataset[i] for i in idx]).items()}
                               for idx in one_pass)
            if optimizer is not None:
                check_optimizer_after_prepare(model, optimizer, before)
        ratio = self.args.loraplus_lr_ratio
        if ratio is not None:
            check(optimizer is None, f"loraplus_lr_ratio={ratio!r} makes the Trainer build a LoRA+ optimizer; do "
                                     "not pass one (or build it with peftkit.create_loraplus_optimizer yourself)")
            check(any("lora_B" in n.split(".") for n, p in model.named_parameters() if p.requires_grad),
                  f"loraplus_lr_ratio={ratio!r} raises the learning rate of LoRA's B factors, and this model trains "
                  "none (no trainable lora_B parameter); use it with a LoRA-family method (lora, dora, pissa, "
                  "adalora, qlora, ...) or leave it out")
        if self.args.fsdp and self.dist.enabled:
            check(optimizer is None, "with fsdp=True the Trainer builds the optimizer (after sharding); "
                                     "do not pass one")
            D.shard_fsdp(model, self.device)
        groups = param_groups(model, self.args.weight_decay)
        if not groups:
            raise ValueError("the model has no trainable parameter (is every adapter in inference mode?)")
        if ratio is not None:
            from peftkit.optimizers import create_loraplus_optimizer

            self.optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, self.args.learning_rate, ratio,
                                                       loraplus_weight_decay=self.args.weight_decay)
        else:
            self.optimizer = optimizer or torch.optim.AdamW(groups, lr=self.args.learning_rate)
        self.wrapped = D.wrap_ddp(model, self.device) if self.dist.enabled and not self.args.fsdp else model
        steps_per_epoch = math.ceil(len(dataset) / self.args.batch_size)
        self.total_steps = self.args.max_steps or max(1, round(steps_per_epoch * self.args.num_epochs))
        warmup, total = int(self.total_steps * self.args.warmup_ratio), self.total_steps

        def schedule(done: int) -> float:  # linear warm-up to the peak, then linear decay to 0
            return (done + 1) / warmup if done < warmup else max(0.0, (total - done) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.history: list[float] = []
        self.samples = 0
        self._seconds_before = 0.0
        self._started = False

    # --- one step -------------------------------------------------------------------------------------
    def _shard(self, indices: list[int]) -> tuple[dict[str, Any], float]:
        """This rank's rows of the global batch and its share of the batch's loss items."""
        batch = self.collate_fn([self.dataset[i] for i in indices])
        if not self.dist.enabled:
            return batch, 1.0
        lo, hi = D.shard_rows(len(indices), self.dist)
        share = 1.0
        if hi == lo:  # a short last batch with fewer rows than ranks: run one row, weigh it 0
            lo, hi, share = 0, 1, 0.0
        local = {k: v[lo:hi] if isinstance(v, Tensor) and v.dim() else v for k, v in batch.items()}
        if share:
            share = self.count_loss_items(local) / max(1, self.count_loss_items(batch))
        return local, share

    def _step(self, indices: list[int], step: int) -> float:
        """One optimiser step on a global batch; returns the batch's mean loss over all ranks."""
        batch, share = self._shard(indices)
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        module = D.unwrap(self.wrapped)
        # the loss terms (AdaLoRA's included, which the forward would add) join the objective here, once
        own_terms = getattr(module, "loss_terms_added_by_caller", contextlib.nullcontext)
        with own_terms():
            loss = getattr(self.wrapped(**batch), "loss", None)
            if loss is None:
                raise ValueError(f"the model returned no loss for a training batch (keys {sorted(batch)}); the "
                                 "batches need labels (the collate function's 'labels') for the model to compute one")
            extra = module.peft_regularization() if hasattr(module, "peft_regularization") else None
        objective = loss * (share * self.dist.world_size) if self.dist.enabled else loss
        (objective if extra is None else objective + extra).backward()
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if hasattr(module, "peft_step_end"):
            module.peft_step_end(step)
        self.optimizer.zero_grad(set_to_none=True)
        if not self.dist.enabled:
            return loss.item()
        # (a rank whose rows carry no loss item has a NaN mean loss and a share of 0: it adds nothing)
        return D.all_reduce_sum([loss.item() * share if share else 0.0])[0]

    # --- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, seconds: float) -> None:
        """Write the checkpoint of step ``step`` to ``args.output_dir/checkpoints`` (every rank calls it)."""
        state = {"total_steps": self.total_steps, "batch_size": self.args.batch_size, "seed": self.args.seed,
                 "history": self.history, "samples": self.samples, "seconds": seconds,
                 "scheduler": self.scheduler.state_dict(), "training": self._resume_settings()}
        folder = save_checkpoint(self.args.output_dir, step, D.unwrap(self.wrapped), self.optimizer, state)
        if self.dist.is_main:
            log.info("checkpoint %s", folder)

    def _resume_settings(self) -> dict[str, float]:
        """The arguments a resumed run must share with the checkpoint besides length, batch and seed (the
        optimiser's and scheduler's settings: changed, they were silently replaced or applied)."""
        a = self.args
        # (train_rows: a training set that grew or shrank would mix two batch orders into one run)
        return {"learning_rate": a.learning_rate, "weight_decay": a.weight_decay, "warmup_ratio": a.warmup_ratio,
                "max_grad_norm": a.max_grad_norm, "loraplus_lr_ratio": a.loraplus_lr_ratio,
                "train_rows": len(self.dataset)}

    def _resume(self, folder: str | os.PathLike) -> int:
        saved = read_checkpoint_state(folder)  # checked before anything is loaded
        mine = {"total_steps": self.total_steps, "batch_size": self.args.batch_size, "seed": self.args.seed,
                **self._resume_settings()}
        training = saved.get("training") if isinstance(saved.get("training"), dict) else {}  # older ones lack it
        for key, value in mine.items():
            # (a checkpoint older than a setting lacks it: it ran at that setting's default)
            default = None if key == "loraplus_lr_ratio" else value
            have = training.get(key, default) if key in self._resume_settings() else saved[key]
            check(have == value, f"checkpoint {str(folder)!r} has {key}={have!r} but this run has {value!r}; "
                                 + ("the training data changed since the run started: resume it with the data it "
                                    "started with, or start a new run" if key == "train_rows" else
                                    "resume with the run's own arguments"))
        state = load_checkpoint(folder, D.unwrap(self.wrapped), self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.samples, self._seconds_before = list(state["history"]), state["samples"], state["seconds"]
        return int(state["step"])

    # --- the loop -------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> dict[str, float]:
        """Run the optimiser steps left (all of them, or those after the checkpoint's step).

        Args:
            resume_from_checkpoint: a checkpoint folder (``<output_dir>/checkpoints/step-<N>``), or the run's
                ``output_dir`` (or its ``checkpoints`` folder) to take its latest checkpoint
                (:func:`peftkit.train.checkpoint.latest_checkpoint`); parameters, optimiser, scheduler, random
                generators and the data position are restored, so the run ends as an uninterrupted one would.

        Returns:
            ``steps``, ``train_loss`` (mean of the last 10% of steps), ``train_seconds`` (over all
            sessions of the run, not counting the time spent writing checkpoints), ``seconds_per_step``,
            ``samples_per_second`` (global rows) and ``resumed_from_step`` (0 for a run that started
            from scratch).

        Raises:
            ConfigError: the checkpoint belongs to another setup (length, batch, seed, processes, model); or,
                starting a new run that writes checkpoints, ``output_dir`` holds another run's checkpoints.
            RuntimeError: this Trainer has trained already (its schedule has run; a second call would train
                at learning rate 0): build a new one.
            ValueError: the model returns no ``loss`` (the batches lack ``labels``).
        """
        if self._started:
            raise RuntimeError(f"this Trainer has already trained (its {self.total_steps} steps and learning-rate "
                               "schedule are spent); build a new Trainer to train again, or give a new one "
                               "resume_from_checkpoint to continue a run")
        args = self.args
        if resume_from_checkpoint is None and args.save_every and args.output_dir:
            # a new run's first checkpoint deletes the folder's others: another run's would be lost unasked
            found = latest_checkpoint(args.output_dir)
            check(found is None, f"output_dir {str(args.output_dir)!r} holds the checkpoints of another run (latest: "
                                 f"{found.name if found else ''}), which this run's checkpoints would replace; pass "
                                 "resume_from_checkpoint=output_dir to continue that run, or give another output_dir "
                                 "(or delete its checkpoints folder) to start a new one")
        self._started = True
        if resume_from_checkpoint is None:
            seed_everything(D.rank_seed(args.seed, self.dist.rank))
            first = 1
        else:
            first = self._resume(_checkpoint_folder(Path(resume_from_checkpoint))) + 1
        self.wrapped.train()
        bar = tqdm(total=self.total_steps, initial=first - 1, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (args.progress and self.dist.is_main), leave=True)
        start = time.perf_counter()
        batches = batch_order(len(self.dataset), args.batch_size, args.seed, start_step=first - 1)
        running, samples_before, saving = None, self.samples, 0.0
        for step in range(first, self.total_steps + 1):
            indices = next(batches)
            value = self._step(indices, step)
            self.history.append(value)
            self.samples += len(indices)
            running = value if running is None else 0.95 * running + 0.05 * value
            lr = self.scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}",
                            rows_s=f"{(self.samples - samples_before) / (time.perf_counter() - start - saving):.0f}")
            if args.log_every and step % args.log_every == 0 and self.dist.is_main:
                log.info("step %d/%d loss %.4f lr %.3e", step, self.total_steps, running, lr)
            if args.save_every and step % args.save_every == 0:  # writing it is not training time
                begun = time.perf_counter()
                self.save_checkpoint(step, self._seconds_before + begun - start - saving)
                saving += time.perf_counter() - begun
        bar.close()
        seconds = self._seconds_before + time.perf_counter() - start - saving
        tail = self.history[-max(1, len(self.history) // 10):]
        self.wrapped.eval()
        return {"steps": self.total_steps, "train_loss": float(np.mean(tail)), "train_seconds": seconds,
                "seconds_per_step": seconds / self.total_steps, "samples_per_second": self.samples / max(seconds, 1e-9),
                "resumed_from_step": first - 1}


def _my_share(dataset: torch.utils.data.Dataset, distributed: bool) -> tuple[torch.utils.data.Dataset, int]:
    """This rank's contiguous slice of ``dataset``, padded to the same length on every rank (sharded
    models need every rank in every forward); returns it and how many of its rows are real."""
    info = D.current()
    if not (distributed and info.enabled) or len(dataset) == 0:
        return dataset, len(dataset)
    per = math.ceil(len(dataset) / info.world_size)
    rows = list(range(info.rank * per, min((info.rank + 1) * per, len(dataset))))
    real = len(rows)
    rows += [rows[-1] if rows else 0] * (per - real)
    return torch.utils.data.Subset(dataset, rows), real


@torch.no_grad()
def predict(model: nn.Module, dataset: torch.utils.data.Dataset, collate_fn: Callable, batch_size: int = 128,
            regression: bool = False, device: torch.device | str | None = None, distributed: bool = False
            ) -> tuple[list[float], list[float]]:
    """Predictions and gold labels over ``dataset`` in order: class ids (argmax) or regression scores.

    A row whose logits are not all finite (a diverged model) gets the class NaN rather than the argmax (which
    would read 0 and score as a guess), so that the metrics of :mod:`peftkit.train.metrics` come out NaN.
    With ``distributed=True`` in a process group, every rank must call it: each predicts its slice
    and every rank gets the whole lists.
    """
    model.eval()
    device = torch.device(device) if device else next(model.parameters()).device
    part, real = _my_share(dataset, distributed)
    preds: list[float] = []
    gold: list[float] = []
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        if regression:
            preds += logits.squeeze(-1).tolist()
        else:
            finite = torch.isfinite(logits).all(-1)
            preds += [c if ok else math.nan for c, ok in zip(logits.argmax(-1).tolist(), finite.tolist())]
        gold += labels.tolist()
    if part is dataset:
        return preds, gold
    pieces = D.all_gather((preds[:real], gold[:real]))
    return [x for p, _ in pieces for x in p], [x for _, g in pieces for x in g]


@torch.no_grad()
def perplexity(model: nn.Module, dataset: torch.utils.data.Dataset, collate_fn: Callable, batch_size: int = 16,
               device: torch.device | str | None = None, distributed: bool = False) -> dict[str, float]:
    """Token-weighted mean loss over ``dataset`` and its perplexity ``exp(loss)`` (labels of -100 ignored; inf
    when the mean loss exceeds 709, past float range; NaN when the loss is NaN, a diverged model).

    With ``distributed=True`` in a process group, every rank must call it; the sums are reduced.

    Raises:
        ValueError: ``dataset`` has no target token (labels all -100, or no rows): there is nothing to score.
    """
    model.eval()
    device = torch.device(device) if device else next(model.parameters()).device
    part, real = _my_share(dataset, distributed)
    total = tokens = 0.0
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    seen = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = max(0, min(len(logits), real - seen))  # padding rows of a sharded slice do not count
        seen += len(logits)
        labels = batch["labels"][:keep, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:keep, :-1].flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        tokens += (labels != -100).sum().item()
    if part is not dataset:
        total, tokens = D.all_reduce_sum([total, tokens])
    if not tokens:
        raise ValueError("the perplexity dataset has no target token (every label is -100, or it has no rows)")
    mean = total / tokens
    # exp overflows a float past a mean loss of about 709.78: the perplexity is then inf, not an OverflowError
    ppl = math.nan if math.isnan(mean) else math.exp(mean) if mean < 709.0 else math.inf
    return {"loss": mean, "perplexity": ppl, "tokens": tokens}
