"""The fused single-adapter path (base + low-rank + DoRA rescale in one autograd node) against the
module-by-module path: same outputs and the same gradients for every input and parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import DyLoraConfig, LoraConfig, LoraFAConfig, get_peft_model
from peftkit.methods.fused import low_rank_linear
from tests.conftest import perturb

CONFIGS = {
    "lora": lambda p: LoraConfig(r=3, lora_alpha=5, target_modules=["0"], lora_dropout=p, bias="all"),
    "dora": lambda p: LoraConfig(r=3, lora_alpha=5, target_modules=["0"], lora_dropout=p, use_dora=True, bias="all"),
    "lorafa": lambda p: LoraFAConfig(r=3, target_modules=["0"], lora_dropout=p, use_dora=True),
    "dylora": lambda p: DyLoraConfig(r=4, lora_alpha=3, target_modules=["0"], lora_dropout=p, use_rslora=True),
}


def run(model, layer, x, fused: bool, seed: int = 7):
    """Output and every gradient, through the fused path or the module-by-module one."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # same dropout mask and DyLoRA rank either way
    if fused:
        out = model(x)
    else:
        inner = model.base_model.model
        for hook in inner._forward_pre_hooks.values():  # DyLoRA draws its rank here: same draw either way
            hook(inner, (x,))
        out = layer.adapters["default"](layer, x, layer.base_layer(x))
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("rows", [3, 10], ids=["few-rows", "folded-weight"])  # 2*60/16 = 7.5 rows fold
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_fused_equals_module_by_module(base, method, dropout, rows):
    from peftkit.methods.fused import _fold_pays

    assert _fold_pays(rows, torch.Size([6, 10])) == (rows == 10)
    layer = nn.Linear(10, 6) if base == "linear" else Conv1D(6, 10)
    model = get_peft_model(nn.Sequential(layer), CONFIGS[method](dropout))
    perturb(model)
    model.train()
    wrapped = model.base_model.model[0]
    x = torch.randn(1, rows, 10)
    out, gx, grads = run(model, wrapped, x, fused=True)
    ref_out, ref_gx, ref_grads = run(model, wrapped, x, fused=False)
    assert (out - ref_out).abs().max() <= 1e-5
    assert torch.allclose(gx, ref_gx, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-5), name


def test_zero_magnitude_rows_still_get_their_gradient():
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.double, requires_grad=True)
    w, bias = torch.randn(5, 4, dtype=torch.double), torch.randn(5, dtype=torch.double)
    a = torch.randn(2, 4, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.double, requires_grad=True)
    g = torch.tensor([0.5, 0.0, 1.5, 0.0, 2.0], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: low_rank_linear(t[0], None, w, bias, t[1], t[2], t[3], 0.7),
                                    (x, a, b, g))
    xd = torch.randn(7, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: low_rank_linear(t[0], t[1], w, t[2], t[3], t[4], None, 1.3),
                                    (x, xd, bias.clone().requires_grad_(), a, b))


@pytest.mark.parametrize("rows", [3, 10])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_inference_without_grad_equals_the_merged_model(method, rows):
    model = get_peft_model(nn.Sequential(nn.Linear(10, 6)), CONFIGS[method](0.1))
    perturb(model)
    model.eval()
    x = torch.randn(1, rows, 10)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
    assert (unmerged - merged).abs().max() <= 1e-5


@pytest.mark.parametrize("rows", [3, 10], ids=["few-rows", "folded-weight"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_double_backward_equals_module_by_module(method, rows):
    """A gradient penalty (``create_graph=True``, then the gradient of a first-order gradient's norm) sees
    how every first-order gradient (the input's, A's, B's, the magnitude's) depends on the input, A, B
    and the magnitude, also when the forward folded the weight."""
    layer = nn.Linear(10, 6)
    model = get_peft_model(nn.Sequential(layer), CONFIGS[method](0.0))
    perturb(model)
    model.train()
    wrapped = model.base_model.model[0]
    x = torch.randn(1, rows, 10, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for penalised in range(1 + len(params)):  # the input's gradient, then each parameter's
        found = []
        for fused in (True, False):
            out = model(x) if fused else wrapped.adapters["default"](wrapped, x, wrapped.base_layer(x))
            first = torch.autograd.grad((out ** 2).sum(), [x, *params], create_graph=True)
            found.append(torch.autograd.grad((first[penalised] ** 2).sum(), [x, *params]))
        for p, g, ref in zip([x, *params], *found):
            assert ref.abs().max() > 0
            assert torch.allclose(g, ref, rtol=1e-4, atol=1e-4), (penalised, p.shape)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_autocast_bf16_runs_and_stays_close_to_float32(name, dropout):
    """Under autocast (accelerate's or Trainer's mixed precision) activations are bfloat16 while the adapter
    stays float32: the forward and backward run (they raised a dtype error) and match float32 to bf16 precision."""
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), _retarget(CONFIGS[name](dropout)))
    perturb(model, 0.05)
    model.eval()
    x = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        reference = model(input_ids=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(input_ids=x).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() <= 0.05 * reference.abs().max()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def _retarget(config):
    config.target_modules = ["q_proj", "down_proj"]
    return config


@pytest.mark.parametrize("rows, cols", [(5, 3), (300, 7), (1000, 384), (1031, 1376), (4096, 16)])
def test_column_dots_is_the_columnwise_dot_product(rows, cols):
    from peftkit.methods.fused import column_dots

    p, q = torch.randn(rows, cols, dtype=torch.float64), torch.randn(rows, cols, dtype=torch.float64)
    assert torch.allclose(column_dots(p, q), (p * q).sum(0), rtol=1e-12, atol=1e-12)
    assert column_dots(p[:, :1].T.contiguous().T, q[:, :1]).shape == (1,)


@pytest.mark.parametrize("rows", [2, 12], ids=["factored-norm", "norm-from-the-fold"])
def test_the_magnitude_form_is_dora_with_a_detached_norm(rows):
    """``low_rank_linear(..., m=m)`` forms ``g = m / ||W + s B A||`` itself (from the folded weight when the
    batch folds): the same output and gradients as passing that ``g``, and exact gradients for x and m."""
    from peftkit.methods.dora import factored_norm
    from peftkit.methods.fused import _fold_pays

    assert _fold_pays(rows, torch.Size([5, 4])) == (rows == 12)
    torch.manual_seed(0)
    w, bias = torch.randn(5, 4, dtype=torch.double), torch.randn(5, dtype=torch.double)
    a, b = torch.randn(2, 4, dtype=torch.double), torch.randn(5, 2, dtype=torch.double)
    x = torch.randn(rows, 4, dtype=torch.double, requires_grad=True)
    m = (torch.rand(5, dtype=torch.double) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, m_: low_rank_linear(x_, None, w, bias, a, b, None, 0.7, m_), (x, m))
    grads = []
    for form in ("m", "g"):
        xs, ms = x.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        if form == "m":
            out = low_rank_linear(xs, None, w, bias, a_, b_, None, 0.7, ms)
        else:
            out = low_rank_linear(xs, None, w, bias, a_, b_, ms / factored_norm(w, a, b, 0.7), 0.7)
        (out * torch.linspace(-1, 1, 5, dtype=torch.double)).sum().backward()
        grads.append((out.detach(), xs.grad, ms.grad, a_.grad, b_.grad))
    for mine, theirs in zip(*grads, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(low_rank_linear(x, None, w, bias, a, b, None, 0.7, m), grads[0][0], atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_the_fold_is_reused_across_steps_and_never_while_a_graph_holds_it(method):
    """The next step folds into the buffer the backward gave back (no fresh weight-sized allocation, whose
    page faults cost about what LoRA adds to a step on the CPU); the results equal a fresh fold's. A graph kept
    with retain_graph=True still holds its fold: the next forward then folds elsewhere, and a second backward
    through the kept graph gives its gradients unchanged. eval() and copies drop the buffer."""
    import copy

    model = get_peft_model(nn.Sequential(nn.Linear(10, 6)), CONFIGS[method](0.0))
    perturb(model)
    model.train()
    adapter = model.base_model.model[0].adapters["default"]
    x = torch.randn(2, 8, 10, requires_grad=True)  # 16 rows: folded (7.5 rows and more fold here)

    def step():
        model.zero_grad()
        x.grad = None
        (model(x) * torch.linspace(-1, 1, 6)).sum().backward()
        return x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = step()
    kept = adapter._spare._buf
    assert kept is not None
    second = step()
    assert adapter._spare._buf is kept  # folded into the same buffer, and given back again
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    y = (model(x) * torch.linspace(-1, 1, 6)).sum()
    y.backward(retain_graph=True)  # the fold is given back, but the kept graph still holds it
    held = adapter._spare._buf
    model.zero_grad()
    x.grad = None
    model(x).sum()  # this forward must not fold into the held buffer
    assert adapter._spare._buf is None or adapter._spare._buf is not held
    model.zero_grad()
    x.grad = None
    y.backward()  # the kept graph again: no "modified by an inplace operation", same gradients
    assert torch.equal(x.grad, first[0])
    assert adapter._spare._buf is not None
    twin = copy.deepcopy(model)
    assert twin.base_model.model[0].adapters["default"]._spare._buf is None
    model.eval()
    assert adapter._spare._buf is None
    adapter._spare = None  # no buffer kept at all: eval() and a training step still work
    model.train()
    model.eval()


@pytest.mark.parametrize("method", ["lora", "dora", "dylora"])
def test_hooks_on_the_adapted_module_run_and_see_the_base_output_as_in_peft(method):
    """A forward pre-hook (halving the input) and a forward hook registered on a module before it was adapted
    run on every call, on the base layer alone: the adapter sees the unhooked input, and the output the hook
    kept is not changed afterwards (peft's behaviour; the fused path and in-place update would skip both)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    model[0].register_forward_hook(lambda module, args, out: seen.append((out, out.detach().clone())))
    model = get_peft_model(model, CONFIGS[method](0.0))
    perturb(model)
    model.train()
    x = torch.randn(4, 8, 16)  # 32 rows: enough for the fused path to fold
    layer = model.get_base_model()[0]
    adapter = layer.adapters["default"]
    base = nn.Linear(16, 16)
    base.load_state_dict(layer.base_layer.state_dict())  # the same layer (its bias trained too) without hooks
    torch.manual_seed(1)  # DyLoRA draws its rank in the forward
    out = model(x)
    assert len(seen) == 1
    kept, at_call = seen[0]
    assert torch.equal(kept, at_call)
    with torch.no_grad():
        torch.manual_seed(1)
        # the module-by-module path: the adapter on the unhooked input, given the hooked base output
        expected = adapter(layer, x, base(0.5 * x))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert adapter.lora_A.weight.grad is not None

    model.add_adapter("other", CONFIGS["lora"](0.0))
    model.base_model.set_adapter(["default", "other"])  # two adapters: the output is updated, never in place
    seen.clear()
    model(x)
    kept, at_call = seen[0]
    assert torch.equal(kept, at_call)
