"""Shared pieces of the benchmark scripts: the two reference models and an interleaved timer.

Models (randomly initialised, the shapes the issues name):
* ``llama20m``: a Llama-style decoder of about 20M parameters (hidden 512, FFN 1376, 5 layers,
  8 heads, vocab 8192, tied embeddings), batch 8 x 128 tokens.
* ``minilm``: the all-MiniLM-L6-v2 shape (BERT, hidden 384, 6 layers, 12 heads, FFN 1536,
  vocab 30522), batch 32 x 64 tokens.

Speed on these machines drifts by tens of percent between identical processes, so every
comparison runs all contenders in one process, round-robin, and reports medians and ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

BLOCK_LINEARS = {
    "llama20m": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "minilm": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}


def model_names(parser: argparse.ArgumentParser, value: str) -> list[str]:
    """The comma-separated ``--models`` value as a list, each a known model (else ``parser.error``, exit 2)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BLOCK_LINEARS]
    if not names or unknown:
        parser.error(f"--models {value!r}: {'unknown model(s) ' + str(unknown) if unknown else 'no model'}; "
                     f"expected a comma-separated list of {', '.join(BLOCK_LINEARS)}")
    return names


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh randomly initialised reference model (see the module doc)."""
    torch.manual_seed(seed)
    if name == "llama20m":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=5,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    if name == "minilm":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, num_labels=2)
        return BertForSequenceClassification(cfg)
    raise ValueError(f"unknown model {name!r}; expected llama20m or minilm")


def make_batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The benchmark batch of ``name``: token ids plus labels (LM labels or class labels)."""
    g = torch.Generator().manual_seed(seed)
    if name == "llama20m":
        x = torch.randint(0, 8192, (8, 128), generator=g)
        return {"input_ids": x, "labels": x}
    x = torch.randint(1000, 30000, (32, 64), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.randint(0, 2, (32,), generator=g)}


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin ``reps`` times.

    Each round calls them in a fresh random order (seeded, so a rerun repeats it): no function always
    runs first or always follows the same one, which matters because what ran just before changes what
    is left in the caches and in the allocator."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    order, rng = list(fns), random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            gc.collect()
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def in_fresh_processes(module: str, args: list[str], processes: int) -> list[dict]:
    """Run ``python -m module *args --json PATH`` in ``processes`` fresh processes, one after another, and
    return the first result each wrote. Ratios inside one process drift by several percent from one
    process to the next, so the benchmarks check their targets on medians over such runs."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            path = os.path.join(tmp, f"run{i}.json")
            subprocess.run([sys.executable, "-m", module, *args, "--json", path], check=True,
                           stdout=subprocess.DEVNULL)
            with open(path) as fh:
                runs.append(json.load(fh)[0])
    return runs
