"""Serve a trained run folder: class predictions, regression scores or generated text for new inputs.

What ``peftkit predict`` runs. The run folder (``peftkit train``'s output) says what the model is: the
base model and adapter (or the fully fine-tuned model), the task and how its inputs were encoded, so
new inputs are encoded exactly as the dev set was.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftkit.config import ConfigError
from peftkit.train.data import TASK_SPECS, DataError, TokenizedDataset, collate, task_key
from peftkit.train.options import CAUSAL_LM

__all__ = ["predict_run"]

MAX_INPUTS = 100_000
"""The most inputs one call takes (they are all tokenised up front)."""


def predict_run(run_dir: str | os.PathLike, inputs: Sequence[str | tuple[str, str]], device: str | None = None,
                max_new_tokens: int = 32, batch_size: int = 32) -> list[dict[str, Any]]:
    """Predictions of a trained run for new inputs, in order.

    Classification inputs are encoded as the run's dev set was (same tokenizer, ``--max-length`` cut); a
    sentence-pair task (RTE, MRPC, STS-B, or a file run with a pair column) takes ``(first, second)``
    tuples. A causal-LM run continues each prompt greedily (the most likely token each step, no
    sampling), so the output is deterministic, and stops at the end-of-sequence token.

    Args:
        run_dir: a folder written by ``peftkit train`` (finished: it holds the adapter, or ``model/``).
        inputs: texts; ``(text, text_pair)`` tuples for a sentence-pair run. At most
            :data:`MAX_INPUTS`.
        device: ``cpu``, ``cuda``, ... (default: the run's device, else CUDA when available).
        max_new_tokens: causal-LM runs: the most tokens generated per prompt, >= 1 (default 32).
        batch_size: classification inputs per forward, >= 1 (default 32).

    Returns:
        one dict per input:

        * classification: ``{"label": class name (or id when the classes have no names), "label_id": int,
          "probability": float, "probabilities": list of num_labels floats}`` (softmax of the logits; label and
          label_id None and probability NaN where a logit is not finite, a diverged model);
        * regression (STS-B): ``{"score": float}``;
        * causal LM: ``{"completion": str}`` (the generated text, the prompt not repeated; special tokens
          dropped).

    Raises:
        FileNotFoundError: no ``run_config.json``, or the run did not finish (no adapter / model).
        ConfigError: bad ``max_new_tokens``/``batch_size``, unavailable device, damaged run files.
        DataError: no inputs or too many; an input of the wrong shape for the run (a pair for a
            single-sentence run or the other way round, a non-string); a prompt that, with the
            ``max_new_tokens`` but the last (which the model never reads), exceeds the model's positions.
    """
    from peftkit.train.run import _load_adapter, _load_model_and_tokenizer, check_run_model, read_finished_run

    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")
    run_dir = Path(run_dir)
    cfg, raw = read_finished_run(run_dir)
    if isinstance(inputs, (str, set, frozenset, dict)):  # one text, or no order to give the results back in
        raise DataError(f"inputs={str(inputs)[:40]!r} is a {type(inputs).__name__}; give a list of inputs (one per "
                        "prediction, in order)")
    inputs = list(inputs)
    if not inputs:
        raise DataError("no input to predict on: give at least one text")
    if len(inputs) > MAX_INPUTS:
        raise DataError(f"{len(inputs)} inputs; give at most {MAX_INPUTS} per call")
    causal = cfg.task == CAUSAL_LM
    shape = run_shape(cfg, raw)
    num_labels, names, regression, pair = shape["num_labels"], shape["label_names"], shape["regression"], shape["pair"]
    _check_inputs(inputs, pair, "prompt" if causal else "text")
    cfg.device = device or cfg.device
    check_run_model(run_dir, cfg, device)
    if cfg.full_finetune:
        cfg.model = str(run_dir / "model")
    model, tokenizer = _load_model_and_tokenizer(cfg, num_labels, regression, names)
    if not cfg.full_finetune:
        model = _load_adapter(model, run_dir)
    model.eval()
    with torch.no_grad():
        if causal:
            return _generate(model, tokenizer, inputs, max_new_tokens)
        return _classify(model, tokenizer, inputs, pair, regression, names, cfg.max_length, batch_size)


def run_shape(cfg: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """What a finished run's inputs and outputs are (``cfg``: its RunConfig; ``raw``: its ``run_config.json`` as
    read): ``{"num_labels", "label_names", "regression", "pair"}``
    (classes None and pair False for a causal-LM run). A file run's come from its ``run_config.json`` (its files
    may be gone): ``sentence_pair`` as found in training (runs saved before it was recorded: a pair column
    given by name).

    Raises:
        ConfigError: a damaged ``run_config.json`` (an unknown task, bad classes).
    """
    from peftkit.train.run import _run_classes

    if cfg.task == CAUSAL_LM:
        return {"num_labels": None, "label_names": None, "regression": False, "pair": False}
    if cfg.train_file:
        num_labels, names = _run_classes(raw)
        pair = raw.get("sentence_pair")
        return {"num_labels": num_labels, "label_names": names, "regression": False,
                "pair": bool(cfg.pair_column) if not isinstance(pair, bool) else pair}
    spec = TASK_SPECS.get(task_key(str(cfg.task)))
    if spec is None:
        raise ConfigError(f"run_config.json: task={cfg.task!r} is not a known task ({', '.join(TASK_SPECS)}, "
                          "causal-lm); the run folder is damaged")
    return {"num_labels": spec.num_labels, "label_names": list(spec.label_names) if spec.label_names else None,
            "regression": spec.is_regression, "pair": spec.sentence_pair}


def _check_inputs(inputs: list[Any], pair: bool, what: str) -> None:
    """Each input is a str (a 2-tuple of str for a pair run) of valid Unicode (no lone surrogate, as undecodable
    bytes from a command line become). Raises DataError naming the first bad one."""
    for n, item in enumerate(inputs):
        for text in (item if isinstance(item, (tuple, list)) else (item,)):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(f"input {n + 1} ({text[:40]!r}) is not UTF-8 text; give UTF-8 text") from None
        if pair:
            ok = isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)
            if not ok:
                raise DataError(f"input {n + 1} is {item!r}: this run's task takes sentence pairs, give two texts "
                                "(on the command line: separated by a tab)")
        elif not isinstance(item, str):
            kind = "a sentence pair" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
            raise DataError(f"input {n + 1} is {kind} ({item!r}): this run takes one {what} per input")


def _classify(model: torch.nn.Module, tokenizer: Any, inputs: list[Any], pair: bool, regression: bool,
              names: list[str] | None, max_length: int, batch_size: int) -> list[dict[str, Any]]:
    examples = [{"text": t[0], "text_pair": t[1], "label": 0} if pair else {"text": t, "text_pair": None, "label": 0}
                for t in inputs]
    ds = TokenizedDataset(examples, tokenizer, max_length)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         collate_fn=collate(tokenizer.pad_token_id, regression))
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for batch in loader:
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        if regression:
            out += [{"score": s} for s in logits.squeeze(-1).tolist()]
            continue
        for probs, finite in zip(logits.softmax(-1).tolist(), torch.isfinite(logits).all(-1).tolist()):
            if not finite:  # a diverged model: no class (the argmax of NaNs would read as the first class)
                out.append({"label": None, "label_id": None, "probability": math.nan, "probabilities": probs})
                continue
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append({"label": names[best] if names else best, "label_id": best, "probability": probs[best],
                        "probabilities": probs})
    return out


def _generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int
              ) -> list[dict[str, Any]]:
    """Greedy continuations, one prompt at a time (no padding, so each equals its own unbatched run)."""
    from peftkit.methods.prompt_learning import position_table

    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    limit = position_table(base)[0] or getattr(base.config, "max_position_embeddings", None)
    # (a fully fine-tuned transformers model has peft_config only from PEFT integrations, and an
    # active_adapters *method*: only a PeftModel's adapters reserve positions)
    from peftkit.model import PeftModel

    # the virtual tokens of every active soft prompt, a composed adapter's soft-prompt part too (MAM's prefix)
    host = model.base_model if isinstance(model, PeftModel) else None
    reserved = 0 if host is None else sum(getattr(host.peft_config[n], "num_virtual_tokens", 0) or 0
                                          for n in host.parts(host.active_adapters))
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    for n, ids in enumerate(encoded):  # every check before the first generation
        if ids.shape[1] == 0:
            raise DataError(f"prompt {n + 1} ({prompts[n]!r}) encodes to no token; give some text")
        read = ids.shape[1] + max_new_tokens - 1  # the tokens the model reads: the last new one is only output
        if limit is not None and reserved + read > limit:
            after = f" after the adapter's {reserved} virtual tokens" if reserved else ""
            raise DataError(f"prompt {n + 1} has {ids.shape[1]} tokens; with {max_new_tokens} new tokens "
                            f"(max_new_tokens, --max-new-tokens) that exceeds the model's {limit - reserved} "
                            f"positions{after} (it reads {read} tokens: all but the last new one): shorten it or ask "
                            "for fewer new tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # stop at the model's own end-of-sequence tokens and at the tokenizer's, which training appends to every row
    # (a model folder whose config names another one would otherwise run on past it)
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if own is None else [own] if isinstance(own, int) else list(own)
    eos += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos else []
    out = []
    for ids in encoded:
        ids = ids.to(device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos or None)
        # decoded whole and cut after the prompt's text: decoding the new tokens alone would drop a
        # SentencePiece tokenizer's leading space of the first one ("Type: human" read "Type:human")
        whole = tokenizer.decode(gen[0], skip_special_tokens=True)
        head = tokenizer.decode(ids[0], skip_special_tokens=True)
        new = whole[len(head):] if whole.startswith(head) else tokenizer.decode(gen[0, ids.shape[1]:],
                                                                                skip_special_tokens=True)
        out.append({"completion": new})
    return out
