"""Injecting into plain ``torch.nn.Module`` models (no transformers): MLPs in nested containers, a CNN with
strided, padded, dilated and grouped convolutions, embeddings, torch's own transformer layers, aliased and
tied modules, forwards with keyword-only arguments and structured outputs, float64/bfloat16, channels_last
and ``torch.compile``. Every wrap method that applies is checked for forward/backward, exact merge/unmerge,
a save/load round trip and, where peft supports the layer, the same outputs from peft on the same file; the
layers a method cannot adapt are refused by name, class and what is supported.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import peft
import pytest
import torch
from torch import nn

from peftkit import (
    BitFitConfig,
    BottleneckConfig,
    CompacterConfig,
    ConfigError,
    DiffPruningConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PartialConfig,
    PeftModel,
    PfeifferConfig,
    VeraConfig,
    get_peft_model,
)
from peftkit.layers import AdaptedLayer
from tests.conftest import perturb


class MLP(nn.Module):
    """``nn.Sequential`` then two blocks held in a ``ModuleList`` of ``ModuleDict`` s; hidden size 16."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(16, 32), "down": nn.Linear(32, 16, bias=False)}) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.seq(x)
        for block in self.blocks:
            h = h + block["down"](torch.relu(block["up"](h)))
        return self.head(h)


class CNN(nn.Module):
    """Conv1d (strided, grouped, no bias), Conv2d (dilated, padded), grouped Conv2d, Conv3d (anisotropic)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.c2 = nn.Conv2d(4, 8, 3, padding=2, dilation=2)
        self.c2g = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.c1(x1).flatten(1), self.c2g(self.c2(x2)).flatten(1), self.c3(x3).flatten(1)], 1)


def mlp_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).to(dtype),)


def cnn_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(*s, generator=g).to(dtype) for s in ((2, 4, 9), (2, 4, 7, 7), (2, 2, 3, 6, 6)))


MLP_TARGETS = ["seq.0", "seq.2", "up", "down"]
CONFIGS = {
    "lora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t),
    "rslora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_rslora=True),
    "dora": lambda t: LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True),
    "loha": lambda t: LoHaConfig(r=4, alpha=8, target_modules=t),
    "lokr": lambda t: LoKrConfig(r=4, alpha=8, target_modules=t),
    "ia3": lambda t: IA3Config(target_modules=t, feedforward_modules=[t[1]]),
    "vera": lambda t: VeraConfig(r=4, target_modules=t),
}
# the layers of the CNN each method adapts (LoHa/LoKr: no Conv3d; VeRA: linear layers only)
CNN_TARGETS = {"lora": ["c1", "c2", "c2g", "c3"], "rslora": ["c1", "c2", "c2g", "c3"], "dora": ["c1", "c2", "c2g", "c3"],
               "loha": ["c1", "c2", "c2g"], "lokr": ["c1", "c2", "c2g"], "ia3": ["c1", "c2", "c2g", "c3"]}


def lifecycle(base: nn.Module, config, x: tuple, tmp_path, kwargs: dict | None = None, tol: float = 1e-5,
              pick=lambda out: out) -> tuple[PeftModel, torch.Tensor]:
    """Adapt a copy of ``base`` (adapter weights perturbed), then check: every trainable tensor gets a gradient,
    the adapter changes the output, ``disable_adapter`` gives the base, merge/unmerge/``merge_and_unload`` keep
    the output (``tol``, relative to the output's scale), and the saved file reloads to the same output.
    Returns the model (unmerged, eval) and its output."""
    kwargs = kwargs or {}
    model = get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    pick(model(*x, **kwargs)).float().square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        out = pick(model(*x, **kwargs))
        scale = out.abs().max().item()
        with model.disable_adapter():
            # (equal up to rounding: torch's transformer layers take another kernel path when not adapted)
            assert (pick(model(*x, **kwargs)) - pick(base.eval()(*x, **kwargs))).abs().max() <= 1e-6 * scale
        assert (out - pick(base(*x, **kwargs))).abs().max() > 1e-3 * scale
        model.merge_adapter()
        assert (pick(model(*x, **kwargs)) - out).abs().max() <= tol * scale
        model.unmerge_adapter()
        assert (pick(model(*x, **kwargs)) - out).abs().max() <= tol * scale
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(pick(loaded(*x, **kwargs)), out)
        merged = copy.deepcopy(model).merge_and_unload()
        assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
        assert (pick(merged(*x, **kwargs)) - out).abs().max() <= tol * scale
    return model, out


def peft_output(base: nn.Module, folder, x: tuple, train: bool = False) -> torch.Tensor:
    """peft's output with the adapter file in ``folder`` on a copy of ``base``."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    model.train(train)
    with torch.no_grad():
        return model(*x)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_mlp_in_nested_containers(method, dtype, tol, tmp_path):
    torch.manual_seed(0)
    base, x = MLP().to(dtype), mlp_inputs(dtype)
    model, out = lifecycle(base, CONFIGS[method](MLP_TARGETS), x, tmp_path, tol=tol)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)) == [
        "base_model.model.blocks.0.down", "base_model.model.blocks.0.up", "base_model.model.blocks.1.down",
        "base_model.model.blocks.1.up", "base_model.model.seq.0", "base_model.model.seq.2"]
    assert out.dtype == dtype
    if dtype == torch.float32:  # the same file in peft gives the same outputs
        assert (peft_output(base, tmp_path, x) - out).abs().max() <= 1e-5 * out.abs().max()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize("method", list(CNN_TARGETS))
def test_cnn_strided_padded_dilated_grouped(method, dtype, tol, tmp_path):
    torch.manual_seed(0)
    base, x = CNN().to(dtype), cnn_inputs(dtype)
    lifecycle(base, CONFIGS[method](CNN_TARGETS[method]), x, tmp_path, tol=tol)


@pytest.mark.parametrize("method, targets", [("lora", ["c3"]), ("dora", ["c3"]), ("loha", ["c1", "c2g"]),
                                             ("lokr", ["c1", "c2g"]), ("ia3", ["c2", "c2g", "c3"])])
def test_cnn_matches_peft(method, targets, tmp_path):
    """peft reads the same files to the same outputs (its LoRA convolution ignores the base's dilation and groups,
    so LoRA is compared on the Conv3d alone)."""
    torch.manual_seed(0)
    base, x = CNN(), cnn_inputs()
    config = CONFIGS[method](targets) if method != "ia3" else IA3Config(target_modules=targets,
                                                                         feedforward_modules=["c2g"])
    _, out = lifecycle(base, config, x, tmp_path)
    assert (peft_output(base, tmp_path, x) - out).abs().max() <= 1e-5 * out.abs().max()


@pytest.mark.parametrize("method, targets, supported", [
    ("loha", ["c3"], "Linear, Conv1D, Conv1d, Conv2d"),
    ("lokr", ["c3"], "Linear, Conv1D, Conv1d, Conv2d"),
    ("vera", ["c2"], "Linear, Conv1D"),
])
def test_cnn_layers_a_method_cannot_adapt_are_refused(method, targets, supported):
    base = CNN()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ConfigError, match=rf"cannot adapt module '{targets[0]}' of type Conv[23]d; supported types: "
                                          f"{supported}$"):
        get_peft_model(base, CONFIGS[method](targets))
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.gru(x)[0])[0]


@pytest.mark.parametrize("config, message", [
    (LoraConfig(target_modules=["gru"]), "LoRA cannot adapt module 'gru' of type GRU; supported types: Linear, "
                                         "Conv1D, Embedding, Conv1d, Conv2d, Conv3d"),
    (LoraConfig(target_modules=["lstm"]), "LoRA cannot adapt module 'lstm' of type LSTM"),
    (IA3Config(target_modules=["gru"], feedforward_modules=[]), r"\(IA\)\^3 cannot adapt module 'gru' of type GRU"),
    (BottleneckConfig(target_modules=["lstm"]), "cannot adapt module 'lstm' of type LSTM; supported types: Linear"),
    (LoraConfig(target_modules="all-linear"), "'all-linear' matched no module of the model"),
])
def test_recurrent_layers_are_refused(config, message):
    with pytest.raises(ConfigError, match=message):
        get_peft_model(Recurrent(), config)


class TorchTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(x, self.enc(x))


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules="all-linear"),
    LoraConfig(r=4, target_modules=["linear1", "linear2"], use_dora=True),
    IA3Config(target_modules=["linear1", "linear2"], feedforward_modules=["linear2"]),
    LoHaConfig(r=4, target_modules=["linear1", "linear2"]),
], ids=["lora-all-linear", "dora", "ia3", "loha"])
def test_torch_transformer_layers(config, tmp_path):
    """The eval-mode fast path is off for adapted layers; peft in eval mode takes it and drops its adapters (its
    output equals the base's), so peft is compared in train mode (no dropout)."""
    torch.manual_seed(0)
    base, x = TorchTransformer(), (torch.randn(2, 5, 8),)
    _, out = lifecycle(base, config, x, tmp_path)
    assert (peft_output(base, tmp_path, x, train=True) - out).abs().max() <= 1e-5


def test_multihead_attention_is_adapted_by_lora_and_refused_by_others():
    """LoRA adapts an nn.MultiheadAttention named as a whole (tests/test_mha.py has the rest); other methods refuse
    it by class, and its out_proj alone is refused with the way to adapt it."""
    from peftkit.methods.lora_mha import MultiheadAttentionLayer

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    assert isinstance(get_peft_model(Attn(), LoraConfig(target_modules=["attn"])).base_model.model.attn,
                      MultiheadAttentionLayer)
    with pytest.raises(ConfigError, match="LoHa cannot adapt module 'attn' of type MultiheadAttention; supported types"):
        get_peft_model(Attn(), LoHaConfig(target_modules=["attn"]))
    with pytest.raises(ConfigError, match=r"'attn\.out_proj': it is the out_proj of a torch\.nn\.MultiheadAttention.*"
                                          r"with LoRA, target the attention module itself \('attn'\)"):
        get_peft_model(Attn(), LoraConfig(target_modules=["out_proj"]))


class Embedder(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, **kwargs)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


IDS = (torch.tensor([[0, 1, 2, 5], [3, 0, 19, 7]]),)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_embedding_with_padding_idx(use_dora, tmp_path):
    torch.manual_seed(0)
    base = Embedder(padding_idx=0)
    model, out = lifecycle(base, LoraConfig(r=4, target_modules=["emb"], use_dora=use_dora), IDS, tmp_path)
    assert (peft_output(base, tmp_path, IDS) - out).abs().max() <= 1e-5
    # the padding row gets no gradient, in the base table as in the adapter's
    model.train()
    model.zero_grad()
    model(torch.zeros(1, 3, dtype=torch.long)).sum().backward()
    a = model.base_model.model.emb.adapters["default"].lora_embedding_A
    assert a.grad is not None and a.grad.abs().sum() == 0


@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
def test_embedding_refused_by_methods_without_it(method):
    with pytest.raises(ConfigError, match=r"cannot adapt module 'emb' of type Embedding; supported types: Linear"):
        get_peft_model(Embedder(), CONFIGS[method](["emb", "out"]))


class Alias(nn.Module):
    """One ``nn.Linear`` reachable as ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules=["a"]), IA3Config(target_modules=["a"], feedforward_modules=[]),
    LoraConfig(r=4, target_modules="all-linear"), BitFitConfig(target_modules=["a"]), BitFitConfig(),
    PartialConfig(target_modules=["a", "c"]), DiffPruningConfig(target_modules=["a"]),
], ids=["lora", "ia3", "lora-all-linear", "bitfit", "bitfit-all", "partial", "diff-pruning"])
def test_a_module_reachable_by_two_names_is_refused(config):
    """BitFit and the other selective methods wrapped the module under one name only: the call through the other
    name ran the base bias while merging changed both (merged output off by 0.32 on this model)."""
    base = Alias()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"module 'a' is also part of the model as \['b'\]"):
            get_peft_model(base, config)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("config", [LoraConfig(r=4, target_modules=["c"]), BitFitConfig(target_modules=["c"])],
                         ids=["lora", "bitfit"])
def test_an_aliased_module_left_out_leaves_the_rest_adaptable(config, tmp_path):
    torch.manual_seed(0)
    lifecycle(Alias(), config, (torch.randn(2, 8),), tmp_path)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.emb(ids)))


@pytest.mark.parametrize("targets", [["emb"], ["out"], ["emb", "out"]])
def test_tied_weights(targets, tmp_path):
    torch.manual_seed(0)
    base = Tied()
    model, out = lifecycle(base, LoraConfig(r=4, target_modules=targets), IDS, tmp_path)
    assert model.base_model.model.out.weight is model.base_model.model.emb.weight  # tied again after unmerging
    assert (peft_output(base, tmp_path, IDS) - out).abs().max() <= 1e-5


def test_parameters_registered_directly_are_left_alone(tmp_path):
    """A model whose own parameters are no layer: a regex matching everything adapts the Linear only, BitFit
    trains the Linear's bias (the root's ``bias`` parameter belongs to no layer)."""
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))
            self.bias = nn.Parameter(torch.randn(8))
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x @ self.w + self.bias)

    torch.manual_seed(0)
    x = (torch.randn(2, 8),)
    model, _ = lifecycle(Direct(), LoraConfig(r=4, target_modules=".*"), x, tmp_path / "lora")
    assert [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)] == ["base_model.model.lin"]
    model, _ = lifecycle(Direct(), BitFitConfig(), x, tmp_path / "bitfit")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.lin.adapters.default.diff_bias"]


@dataclasses.dataclass
class Out:
    y: torch.Tensor
    n: int


class KeywordModel(nn.Module):
    """``forward(x, *, scale, mask)`` returning a tensor, a dict, a tuple or a dataclass."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0, mask: torch.Tensor | None = None):
        y = self.lin(x) * scale
        y = y if mask is None else y * mask
        return {"plain": y, "dict": {"y": y, "aux": 3}, "tuple": (y, "aux"), "dataclass": Out(y=y, n=1)}[self.kind]


PICK = {"plain": lambda o: o, "dict": lambda o: o["y"], "tuple": lambda o: o[0], "dataclass": lambda o: o.y}


@pytest.mark.parametrize("kind", list(PICK))
def test_keyword_only_arguments_and_structured_outputs(kind, tmp_path):
    torch.manual_seed(0)
    kwargs = {"scale": 2.0, "mask": (torch.arange(8) % 2).float()}
    model, _ = lifecycle(KeywordModel(kind), LoraConfig(r=4, target_modules=["lin"]), (torch.randn(2, 8),), tmp_path,
                         kwargs=kwargs, pick=PICK[kind])
    out = model(torch.randn(2, 8), **kwargs)
    assert type(out) is type(KeywordModel(kind)(torch.randn(2, 8), **kwargs))
    assert (PICK[kind](out)[:, ::2] == 0).all()  # the mask reached the model


@pytest.mark.parametrize("config", [BottleneckConfig(target_modules=["down"]), PfeifferConfig(target_modules=["down"]),
                                    CompacterConfig(target_modules=["down"])], ids=["bottleneck", "pfeiffer",
                                                                                     "compacter"])
def test_bottleneck_adapters_on_an_mlp(config, tmp_path):
    """Adapters after a target layer: they train, save and load, ``unload`` gives the base; merging is refused."""
    torch.manual_seed(0)
    base, x = MLP(), mlp_inputs()
    model = get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    model(*x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model(*x)
        assert (out - base(*x)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(*x), out)
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_adapter()
        assert torch.equal(model(*x), out)
        assert torch.equal(model.unload()(*x), base(*x))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr"])
def test_bfloat16_cnn(method, tmp_path):
    """Adapter weights train in float32 on a bfloat16 model; outputs stay bfloat16 and merging is exact to bfloat16
    rounding."""
    torch.manual_seed(0)
    targets = CNN_TARGETS[method]
    model, out = lifecycle(CNN().to(torch.bfloat16), CONFIGS[method](targets), cnn_inputs(torch.bfloat16), tmp_path,
                           tol=2 ** -6)
    assert out.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr"])
def test_channels_last_conv2d(method):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 1, bias=False))
    base = base.to(memory_format=torch.channels_last)
    model = get_peft_model(base, CONFIGS[method](["0", "1"])).eval()
    perturb(model)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert (out - model(x)).abs().max() <= 1e-5
        model.merge_adapter()
        assert (model(x.to(memory_format=torch.channels_last)) - out).abs().max() <= 1e-5
        model.unmerge_adapter()
    assert base[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha"])
def test_torch_compile(method):
    """The compiled model (eager backend: the graph capture, not a C compiler) gives the eager output and
    gradients, captures without graph breaks, and follows merge/unmerge. DoRA's fused node broke the graph
    (10 breaks on this model); without it, the in-place GEMM of LoRA's path lost DoRA's A and B gradients.
    DoRA's rescale and LoHa's product broke it again once they defined a forward-mode ``jvp`` (Dynamo does not
    trace such autograd functions): under compile they run as plain ops."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    model = get_peft_model(MLP(), CONFIGS[method](["up", "down"]))
    perturb(model)
    x = mlp_inputs()
    eager = model(*x)
    eager.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="eager")
    out = compiled(*x)
    assert (out - eager).abs().max() <= 1e-6  # (plain ops where the eager forward takes the fused LoRA node)
    out.sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:  # (DoRA's A and B of the first layer got none: the traced in-place GEMM lost them)
            assert p.grad is not None and (p.grad - grads[name]).abs().max() <= 1e-5 * grads[name].abs().max(), name
    assert not counters["graph_break"]  # (DoRA's fused node broke the graph on a data-dependent branch)
    with torch.no_grad():
        model.merge_adapter()
        assert (compiled(*x) - eager).abs().max() <= 1e-5
        model.unmerge_adapter()
        assert (compiled(*x) - eager).abs().max() <= 1e-5


@pytest.mark.parametrize("config", [LoraConfig(r=4, target_modules=["emb"], init_lora_weights=False),
                                    PartialConfig(target_modules=["emb"])], ids=["lora", "partial"])
def test_merging_into_an_embedding_with_max_norm_is_refused(config):
    """``max_norm`` renormalises the looked-up rows of the table in place, so ``renorm(W + dW)`` (merged) is not
    ``renorm(W) + dW`` (unmerged): merging changed this model's outputs by 0.78, and the rows renormalised while
    merged stayed changed after unmerging (base off by 0.6)."""
    torch.manual_seed(0)
    model = get_peft_model(Embedder(max_norm=1.0), config).eval()
    perturb(model)
    with torch.no_grad():
        out = model(*IDS)  # (renormalises the rows it looks up: the base table's own behaviour)
        weight = model.base_model.model.emb.weight.detach().clone()
        for merge in (model.merge_adapter, model.merge_and_unload):
            with pytest.raises(ValueError, match=r"on layer 'emb': its base nn.Embedding has max_norm=1.0"):
                merge()
        assert torch.equal(model(*IDS), out)
    assert torch.equal(model.base_model.model.emb.weight, weight)
    assert isinstance(model.base_model.model.emb, AdaptedLayer)


def test_torch_compile_with_lora_dropout_captures_without_graph_breaks():
    """The CPU dropout's mask (``random_``) and its autograd function (it defines a ``jvp``) broke the graph at every
    adapted layer; while compiling, dropout is torch's own."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.5))
    perturb(model)
    model.train()
    out = torch.compile(model, backend="eager")(*mlp_inputs())
    out.sum().backward()
    assert not counters["graph_break"]
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
