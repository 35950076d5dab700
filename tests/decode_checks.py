"""Decoding checks shared by the additive-method tests: greedy generation with the KV cache against
step-by-step decoding without it, and left-padded batches against each row alone."""

from __future__ import annotations

import torch

PAD = 2


def no_eos(model: torch.nn.Module) -> torch.nn.Module:
    """Let greedy decoding run its full length (a tiny random model may emit EOS at any step)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


@torch.no_grad()
def greedy_cached(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """``generate()`` with the cache; returns only the new tokens, ``(batch, steps)``."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                         do_sample=False, use_cache=True)
    return out[:, input_ids.shape[1]:]


@torch.no_grad()
def greedy_stepwise(model, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Full forward passes without any cache, one new token each; ``(batch, steps)``."""
    seq = input_ids
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, input_ids.shape[1]:]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into a left-padded batch and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def check_decoding(model, steps: int = 6) -> None:
    """Assert cache == no cache token for token, and each left-padded row == that row alone."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 64, (n,), generator=g) for n in (7, 4, 5)]
    for r in rows:
        one = r[None]
        cached = greedy_cached(model, one, torch.ones_like(one), steps)
        assert torch.equal(cached, greedy_stepwise(model, one, steps))
    ids, mask = left_pad(rows)
    batched = greedy_cached(model, ids, mask, steps)
    for i, r in enumerate(rows):
        alone = greedy_cached(model, r[None], torch.ones(1, len(r), dtype=torch.long), steps)
        assert torch.equal(batched[i], alone[0]), f"row {i}: {batched[i].tolist()} != {alone[0].tolist()}"
