"""The fast CPU dropout: right keep rate, unbiased, same mask forward and backward, seeded."""

from __future__ import annotations

import torch

from peftkit.ops import Dropout, dropout, keep_mask


def test_keep_rate_and_expectation():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400, 500]), 0.1, torch.device("cpu"))
    assert abs(mask.float().mean().item() - 0.9) < 0.003  # 200k draws: 3 sigma is about 0.002
    x = torch.ones(400, 500)
    y = dropout(x, 0.3)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - round(0.3 * 65536) / 65536)))
    assert abs(y.mean().item() - 1.0) < 0.01


def test_backward_uses_the_forward_mask():
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout(x, 0.5)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)
    assert torch.allclose(x.grad[y != 0], torch.full_like(x.grad[y != 0], 2.0))


def test_seeded_eval_and_zero_p():
    torch.manual_seed(5)
    a = dropout(torch.ones(100), 0.2)
    torch.manual_seed(5)
    b = dropout(torch.ones(100), 0.2)
    assert torch.equal(a, b)
    layer = Dropout(0.4).eval()
    x = torch.randn(10)
    assert layer(x) is x and dropout(x, 0.0) is x
