"""Adapter files moved between peftkit and the peft package, for the method test files: each direction builds
the adapter (weights perturbed off their initial values) on one copy of a tiny model, saves it, and loads the
file into the other library on a twin copy; the caller compares the returned outputs."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import peft
import torch

import peftkit
from tests.conftest import ids, perturb


def output(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    """The model's logits (or plain output) without gradients: ``inputs`` is a batch of token ids, or a dict of
    keyword inputs (``{"x": tensor}`` calls a plain module positionally)."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            out = model(inputs["x"]) if set(inputs) == {"x"} else model(**inputs)
        else:
            out = model(input_ids=inputs)
    return out.logits if hasattr(out, "logits") else out


def peftkit_file_in_peft(make: Callable[[], torch.nn.Module], config: peftkit.PeftConfig, tmp_path,
                         inputs: Callable[[], Any] = ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(base output, peftkit's output, peft's output from peftkit's file)`` for one input batch."""
    base = make()
    twin = copy.deepcopy(base)
    x = inputs()
    bare = output(base, x)
    ours = peftkit.get_peft_model(base, config)
    perturb(ours)
    expected = output(ours, x)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    return bare, expected, output(theirs, x)


def peft_file_in_peftkit(make: Callable[[], torch.nn.Module], config: Any, tmp_path,
                         inputs: Callable[[], Any] = ids) -> tuple[torch.Tensor, peftkit.PeftModel, Any]:
    """``(peft's output, peftkit's model loaded from peft's file, the input batch)``: ``config`` is peft's."""
    base = make()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, config)
        perturb(theirs)
        theirs.save_pretrained(tmp_path)
    x = inputs()
    return output(theirs, x), peftkit.PeftModel.from_pretrained(twin, tmp_path), x
