"""Forward-mode AD over adapted models: ``torch.func.jvp``, ``jacfwd``, ``hessian`` (``jacfwd`` over ``jacrev``)
and ``torch.autograd.forward_ad`` dual tensors outside ``torch.func``.

Every custom autograd node defines a ``jvp`` (DoRA's rescale, LoHa's Hadamard product, the quantised base's
linear, the CPU dropout's mask, Child-Tuning's gradient mask), and the fused LoRA/DoRA node, which has none, is
bypassed while a transform runs or a forward-AD level is open. References are central finite differences of
the plain forward in float64 (no tangent ever enters a custom node there) and reverse mode."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, hessian, jacfwd, jacrev, jvp

from peftkit import LoraConfig, get_peft_model
from peftkit.methods import fused
from peftkit.methods.child_tuning import ChildTuningConfig
from peftkit.ops import transforms_or_forward_ad_active
from tests.test_func_transforms import CONFIGS, TARGETS, _Net

NAMES = [*CONFIGS, "lora-nf4", "child-f"]
# Child-Tuning-F's gradients are masked at random on purpose, so reverse mode does not give its Jacobian
REVERSE_NAMES = [n for n in NAMES if n != "child-f"]


def _model(name: str, dtype: torch.dtype = torch.float64, **lora_options) -> nn.Module:
    """The tiny two-layer net with ``name``'s adapter on both layers, every trainable tensor moved away from its
    start (so that no derivative is trivially zero), in ``dtype``, training mode."""
    torch.manual_seed(0)
    base = _Net()
    if name == "lora-nf4":
        pytest.importorskip("torchao")
        from peftkit.quant import quantize_base

        base = quantize_base(base, "nf4", skip_modules=[])
    if name == "child-f":
        config = ChildTuningConfig(child_tuning_type="F", reserve_p=0.5, target_modules=TARGETS)
    elif lora_options or name == "lora-nf4":
        config = LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False, **lora_options)
    else:
        config = CONFIGS[name]()
    model = get_peft_model(base, config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


def _trainable(model: nn.Module) -> dict:
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def _directions(params: dict, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return ({k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()},
            torch.randn(x.shape, generator=gen, dtype=x.dtype))


def _finite_difference(f, params: dict, x: torch.Tensor, t_params: dict, t_x: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """``(f(p + eps t, x + eps t_x) - f(p - eps t, x - eps t_x)) / (2 eps)``, under ``no_grad``."""
    with torch.no_grad():
        ends = [f({k: v + s * eps * t_params[k] for k, v in params.items()}, x + s * eps * t_x) for s in (1, -1)]
    return (ends[0] - ends[1]) / (2 * eps)


def _plain(model: nn.Module, name: str, params: dict):
    """``f(params, x)``: the model's output. For DoRA the adapter's math on plain ops instead, with the weight
    norms held at their values for ``params`` (DoRA detaches them, so no derivative flows through them), checked
    against the model there: ``g (x W^T + s (x A^T) B^T) + b``, ``g = m / ||W + s B A||`` per output row."""
    if name != "dora":
        return lambda p, x: functional_call(model, p, (x,))
    fixed = {}  # layer -> (parameter-name prefix, base weight, scaling, norms at params)
    for layer in ("fc", "out"):
        pre = f"base_model.model.{layer}."
        w, s = model.get_parameter(pre + "base_layer.weight").detach(), model.get_submodule(pre + "adapters.default").scaling
        a, b = params[pre + "adapters.default.lora_A.weight"], params[pre + "adapters.default.lora_B.weight"]
        fixed[layer] = pre, w, s, torch.linalg.vector_norm(w + s * b @ a, dim=1)

    def f(p, x):
        for layer, (pre, w, s, n) in fixed.items():
            a, b = p[pre + "adapters.default.lora_A.weight"], p[pre + "adapters.default.lora_B.weight"]
            g = p[pre + "adapters.default.lora_magnitude_vector"] / n
            x = g * (x @ w.T + s * (x @ a.T) @ b.T) + p[pre + "base_layer.bias"]
            x = torch.tanh(x) if layer == "fc" else x
        return x
    probe = torch.linspace(-1, 1, 2 * 64, dtype=torch.float64).view(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(f(params, probe), model(probe), rtol=0, atol=1e-12)
    return f


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("name", NAMES)
def test_func_jvp_equals_finite_difference(name):
    model = _model(name)
    params, x = _trainable(model), torch.randn(40, 64, dtype=torch.float64)  # enough rows to fold for the fused node
    t_params, t_x = _directions(params, x)
    out, tangent = jvp(lambda p, x: functional_call(model, p, (x,)), (params, x), (t_params, t_x))
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-12)
    _close(tangent, _finite_difference(_plain(model, name, params), params, x, t_params, t_x))


@pytest.mark.parametrize("name", NAMES)
def test_dual_tensors_outside_torch_func(name):
    model = _model(name)
    params, x = _trainable(model), torch.randn(40, 64, dtype=torch.float64)
    t_params, t_x = _directions(params, x)
    with fwAD.dual_level():
        # the live parameters (requiring grad, as in training: Child-Tuning-F's gradient mask is applied then)
        duals = {k: fwAD.make_dual(v, t_params[k]) for k, v in model.named_parameters() if v.requires_grad}
        tangent = fwAD.unpack_dual(functional_call(model, duals, (fwAD.make_dual(x, t_x),))).tangent
        # the module's own call, with only the input carrying a tangent
        x_only = fwAD.unpack_dual(model(fwAD.make_dual(x, t_x))).tangent
    f = _plain(model, name, params)
    _close(tangent, _finite_difference(f, params, x, t_params, t_x))
    _close(x_only, _finite_difference(f, params, x, {k: torch.zeros_like(v) for k, v in params.items()}, t_x))


@pytest.mark.parametrize("name", REVERSE_NAMES)
def test_jacfwd_equals_jacrev(name):
    model = _model(name)
    params, x = _trainable(model), torch.randn(3, 64, dtype=torch.float64)

    def f(p):
        return functional_call(model, p, (x,))
    forward, reverse = jacfwd(f)(params), jacrev(f)(params)
    assert forward.keys() == reverse.keys() == params.keys()
    for k in params:
        _close(forward[k], reverse[k], 1e-10)


def _loss(model: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    return (functional_call(model, params, (x,)) * torch.linspace(-1, 1, 4, dtype=x.dtype)).square().sum()


@pytest.mark.parametrize("name", REVERSE_NAMES)
def test_hessian_equals_reverse_over_reverse(name):
    model = _model(name)
    params, x = _trainable(model), torch.randn(3, 64, dtype=torch.float64)
    # the smallest trainable tensor of the first layer: its second derivatives run through both layers' nodes
    key = min((k for k in params if ".fc." in k), key=lambda k: (params[k].numel(), k))

    def f(v):
        return _loss(model, {**params, key: v}, x)
    want = jacrev(jacrev(f))(params[key])
    assert want.shape == params[key].shape * 2
    _close(hessian(f)(params[key]), want, 1e-10)


def test_dropout_tangent_uses_the_forward_mask():
    model = _model("lora", lora_dropout=0.3)
    params, x = _trainable(model), torch.randn(40, 64, dtype=torch.float64)
    t_params, t_x = _directions(params, x)
    with fwAD.dual_level():
        torch.manual_seed(7)
        duals = {k: fwAD.make_dual(v, t_params[k]) for k, v in params.items()}
        tangent = fwAD.unpack_dual(functional_call(model, duals, (fwAD.make_dual(x, t_x),))).tangent
    ends = []
    for s in (1, -1):
        torch.manual_seed(7)  # the same masks as the dual pass
        with torch.no_grad():
            ends.append(functional_call(model, {k: v + s * 1e-6 * t_params[k] for k, v in params.items()},
                                        (x + s * 1e-6 * t_x,)))
    _close(tangent, (ends[0] - ends[1]) / 2e-6)
    model.eval()  # no dropout: a different tangent, so the masks above did act on it
    assert not torch.allclose(tangent, _finite_difference(_plain(model, "lora", params), params, x, t_params, t_x),
                              atol=1e-3)


def test_fused_node_is_bypassed_exactly_while_forward_ad_is_open(monkeypatch):
    calls = []
    real = fused._LowRankLinear.apply
    monkeypatch.setattr(fused._LowRankLinear, "apply", lambda *a: (calls.append(1), real(*a))[1])
    model = _model("lora", torch.float32)
    x = torch.randn(40, 64)
    model(x)
    used_outside = len(calls)
    seen = []
    with fwAD.dual_level():
        seen.append(transforms_or_forward_ad_active())
        model(x)
    jvp(lambda x: (seen.append(transforms_or_forward_ad_active()), model(x))[1], (x,), (x,))
    assert used_outside == 2 and len(calls) == 2  # both layers fused outside, neither inside
    assert seen == [True, True] and not transforms_or_forward_ad_active()
