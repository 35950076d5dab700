"""A small, explicit training loop: AdamW, linear warm-up and decay, gradient clipping, a progress bar.

It trains any model whose forward returns an object with ``.loss`` when given a batch dict (HF
transformers models, :class:`peftkit.PeftModel`), and only the parameters that require grad.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger("peftkit")


@dataclass
class TrainingArguments:
    """Hyper-parameters of :class:`Trainer`.

    Args:
        learning_rate: peak AdamW learning rate. Default 1e-3 (adapters); use ~5e-5 for full fine-tuning.
        num_epochs: passes over the data (fractions allowed) when ``max_steps`` is None. Default 1.
        max_steps: optimiser steps; overrides ``num_epochs`` when set.
        batch_size: rows per step. Default 32.
        eval_batch_size: rows per evaluation batch. Default 128.
        warmup_ratio: fraction of steps with linearly rising learning rate. Default 0.06.
        weight_decay: AdamW decay of matrices (never of biases or norms). Default 0.01.
        max_grad_norm: clip the global gradient norm (0 disables). Default 1.0.
        seed: seeds torch, numpy, random and the data order. Default 0.
        log_every: steps between log lines. Default 50.
        progress: show a progress bar (loss, speed). Default True.
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

    def __post_init__(self) -> None:
        from peftkit.config import check

        check(self.learning_rate > 0, f"learning_rate={self.learning_rate!r} must be > 0")
        check(self.batch_size >= 1, f"batch_size={self.batch_size!r} must be >= 1")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps!r} must be >= 1")
        check(self.num_epochs > 0, f"num_epochs={self.num_epochs!r} must be > 0")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio!r} must lie in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mib() -> float:
    """Peak memory of this process in MiB: the CUDA allocator's peak when on GPU, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (2-D and up) and not decayed (biases, norms, vectors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


class Trainer:
    """Train ``model`` on ``dataset``.

    Before the optimiser is built, a :class:`peftkit.PeftModel` gets ``peft_prepare(batches)`` with
    training batches in the training order (methods whose parameters are chosen from data use them).

    Args:
        model: returns ``.loss`` for ``model(**batch)``.
        dataset: a map-style dataset of items for ``collate_fn``.
        collate_fn: items -> batch dict of tensors (including ``labels``).
        args: :class:`TrainingArguments`.
        optimizer: defaults to AdamW over the trainable parameters (see :func:`param_groups`).
        device: where batches go; defaults to the model's device.

    Raises:
        ValueError: the model has no trainable parameter, or the dataset is empty.
    """

    def __init__(self, model: nn.Module, dataset: torch.utils.data.Dataset, collate_fn: Callable,
                 args: TrainingArguments | None = None, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str | None = None) -> None:
        self.model, self.dataset, self.collate_fn = model, dataset, collate_fn
        self.args = args or TrainingArguments()
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.device = torch.device(device) if device else next(model.parameters()).device
        if hasattr(model, "peft_prepare"):  # data-driven adapters (FISH mask, ...) pick their parameters now
            model.peft_prepare({k: v.to(self.device) for k, v in b.items()} for b in self._batches())
        groups = param_groups(model, self.args.weight_decay)
        if not groups:
            raise ValueError("the model has no trainable parameter (is every adapter in inference mode?)")
        self.optimizer = optimizer or torch.optim.AdamW(groups, lr=self.args.learning_rate)
        steps_per_epoch = math.ceil(len(dataset) / self.args.batch_size)
        self.total_steps = self.args.max_steps or max(1, round(steps_per_epoch * self.args.num_epochs))
        warmup, total = int(self.total_steps * self.args.warmup_ratio), self.total_steps

        def schedule(done: int) -> float:  # linear warm-up to the peak, then linear decay to 0
            return (done + 1) / warmup if done < warmup else max(0.0, (total - done) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.history: list[float] = []

    def _batches(self):
        generator = torch.Generator().manual_seed(self.args.seed)
        while True:  # epochs, each in a fresh seeded order
            yield from torch.utils.data.DataLoader(self.dataset, batch_size=self.args.batch_size, shuffle=True,
                                                   collate_fn=self.collate_fn, generator=generator)

    def train(self) -> dict[str, float]:
        """Run ``total_steps`` optimiser steps; returns ``steps``, ``train_loss`` (mean of the last 10%),
        ``train_seconds``, ``seconds_per_step`` and ``samples_per_second``."""
        args, model = self.args, self.model
        model.train()
        bar = tqdm(total=self.total_steps, desc="train", unit="step", disable=not args.progress,
                   dynamic_ncols=True, leave=True)
        start = time.perf_counter()
        samples = 0
        running = None
        batches = self._batches()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for step in range(1, self.total_steps + 1):
            batch = {k: v.to(self.device) for k, v in next(batches).items()}
            loss = model(**batch).loss
            extra = model.peft_regularization() if hasattr(model, "peft_regularization") else None
            (loss if extra is None else loss + extra).backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            if hasattr(model, "peft_step_end"):
                model.peft_step_end(step)
            self.optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            self.history.append(value)
            samples += batch["input_ids"].shape[0]
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                            rows_s=f"{samples / (time.perf_counter() - start):.0f}")
            if args.log_every and step % args.log_every == 0:
                log.info("step %d/%d loss %.4f lr %.3e", step, self.total_steps, running,
                         self.scheduler.get_last_lr()[0])
        bar.close()
        seconds = time.perf_counter() - start
        tail = self.history[-max(1, len(self.history) // 10):]
        model.eval()
        return {"steps": self.total_steps, "train_loss": float(np.mean(tail)), "train_seconds": seconds,
                "seconds_per_step": seconds / self.total_steps, "samples_per_second": samples / seconds}


@torch.no_grad()
def predict(model: nn.Module, dataset: torch.utils.data.Dataset, collate_fn: Callable, batch_size: int = 128,
            regression: bool = False, device: torch.device | str | None = None) -> tuple[list[float], list[float]]:
    """Predictions and gold labels over ``dataset`` in order: class ids (argmax) or regression scores."""
    model.eval()
    device = torch.device(device) if device else next(model.parameters()).device
    preds: list[float] = []
    gold: list[float] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        preds += (logits.squeeze(-1) if regression else logits.argmax(-1)).tolist()
        gold += labels.tolist()
    return preds, gold


@torch.no_grad()
def perplexity(model: nn.Module, dataset: torch.utils.data.Dataset, collate_fn: Callable, batch_size: int = 16,
               device: torch.device | str | None = None) -> dict[str, float]:
    """Token-weighted mean loss over ``dataset`` and its perplexity ``exp(loss)`` (labels of -100 ignored)."""
    model.eval()
    device = torch.device(device) if device else next(model.parameters()).device
    total = tokens = 0.0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        tokens += (labels != -100).sum().item()
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens}
