"""Tiny torch-only models and datasets for training-loop tests (no transformers import, so spawned
worker processes start fast). Models take a batch dict and return an object with ``.loss``/``.logits``."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from peftkit import LoraConfig, get_peft_model


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + torch.tanh(self.fc(h)))


class TinyClassifier(nn.Module):
    """Embedding -> 2 blocks -> mean over unmasked tokens -> classifier; loss: mean over rows."""

    _no_split_modules = ("Block",)  # FSDP groups, as HF models declare them

    def __init__(self, vocab: int = 32, width: int = 16, num_labels: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.classifier = nn.Linear(width, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        mask = attention_mask.unsqueeze(-1).float()
        logits = self.classifier((h * mask).sum(1) / mask.sum(1))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


class TinyLM(nn.Module):
    """Next-token model; loss: mean over target tokens (labels shifted by one, -100 ignored)."""

    _no_split_modules = ("Block",)

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def classification_items(n: int = 22, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        out.append({"input_ids": torch.randint(0, 32, (length,), generator=g).tolist(), "labels": i % 2})
    return out


def lm_items(n: int = 18, seed: int = 2) -> list[dict]:
    """Rows of different lengths, some with a masked prompt, so rows hold different numbers of targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(0, 32, (length,), generator=g).tolist()
        prompt = int(torch.randint(0, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def collate_classification(items: list[dict]) -> dict[str, torch.Tensor]:
    longest = max(len(it["input_ids"]) for it in items)
    ids = [it["input_ids"] + [0] * (longest - len(it["input_ids"])) for it in items]
    mask = [[1] * len(it["input_ids"]) + [0] * (longest - len(it["input_ids"])) for it in items]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor([it["labels"] for it in items])}


def collate_lm(items: list[dict]) -> dict[str, torch.Tensor]:
    longest = max(len(it["input_ids"]) for it in items)
    gap = [longest - len(it["input_ids"]) for it in items]
    return {"input_ids": torch.tensor([it["input_ids"] + [0] * g for it, g in zip(items, gap, strict=True)]),
            "attention_mask": torch.tensor([[1] * len(it["input_ids"]) + [0] * g for it, g in zip(items, gap, strict=True)]),
            "labels": torch.tensor([it["labels"] + [-100] * g for it, g in zip(items, gap, strict=True)])}


def lora_model(kind: str = "classifier", dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A seeded tiny model with LoRA (r=4) on every block's ``fc``; the classifier is trained whole."""
    torch.manual_seed(seed)
    base = TinyClassifier() if kind == "classifier" else TinyLM()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], lora_dropout=dropout,
                        modules_to_save=["classifier"] if kind == "classifier" else None)
    return get_peft_model(base, config)


class Interrupted(Exception):
    """Raised by :class:`StopAfter` to simulate a run killed part way."""


class StopAfter(torch.utils.data.Dataset):
    """Wraps a dataset and raises :class:`Interrupted` once more than ``limit`` items were read."""

    def __init__(self, items: list, limit: int) -> None:
        self.items, self.limit, self.reads = items, limit, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads > self.limit:
            raise Interrupted(f"stopped after {self.limit} reads")
        return self.items[i]


def interrupt_training(monkeypatch, after: int) -> None:
    """Make ``Trainer._step`` raise ``KeyboardInterrupt`` (as Ctrl-C does) on its call number ``after + 1``
    in this process; ``monkeypatch.undo()`` restores it."""
    from peftkit.train.trainer import Trainer

    step, calls = Trainer._step, []

    def interrupted(self, indices, n):
        calls.append(n)
        if len(calls) > after:
            raise KeyboardInterrupt
        return step(self, indices, n)

    monkeypatch.setattr(Trainer, "_step", interrupted)
