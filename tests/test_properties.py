"""Property tests over every mergeable method: hypothesis draws the method's main hyperparameters, the model
(the layer zoo, a tiny BERT, a tiny Llama), the dtype and the input sizes; after every trainable parameter is
perturbed (so the adapter is not the identity) four properties must hold, with concrete tolerances:

1. ``merge_and_unload()`` gives the unmerged output, which differs from the base output;
2. ``merge_adapter()`` / ``unmerge_adapter()`` cycles give back every base weight and the unmerged output, and
   the merged output equals the unmerged one;
3. ``save_pretrained`` then ``PeftModel.from_pretrained`` on a fresh copy of the base gives the same output;
4. inside ``disable_adapter()`` (merged or not) the output is the bare base model's, and ``unload()`` gives
   the bare base model back.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peftkit
from peftkit import PeftModel, get_peft_model
from peftkit.layers import AdaptedLayer
from tests.test_lora import Zoo  # linear, Conv1D (square and wide), grouped Conv2d, Conv1d, and an Embedding

ZOO_LINEAR = ["lin", "square", "wide"]
ZOO_ALL = [*ZOO_LINEAR, "conv2", "conv1"]
ZOO_EMB = [*ZOO_ALL, "emb"]
BERT_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LINEAR_TARGETS = {"zoo": ZOO_LINEAR, "bert": BERT_LINEAR, "llama": LLAMA_LINEAR}
# (out, in) of the linear targets, for KronA's factor sizes
SHAPES = {"lin": (12, 8), "square": (12, 12), "wide": (20, 12), "conv2": (8, 18), "conv1": (6, 16)}

# PEFTKIT_PROPERTY_EXAMPLES=N runs N times as many examples, drawn afresh (for bug hunting; the default is a
# fixed, derandomised draw that fits the suite's time budget)
SCALE = int(os.environ.get("PEFTKIT_PROPERTY_EXAMPLES", "0"))
SETTINGS = dict(deadline=None, derandomize=not SCALE, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def examples(n: int) -> int:
    return n * SCALE if SCALE else n


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: a second intra-op thread only adds contention (several times slower on a busy
    2-core machine), so this module runs on one and gives the setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- models and inputs ------------------------------------------------------------------------------------
def bert():
    """conftest's tiny BERT, initialised with std 0.2 instead of 0.02: at 0.02 the attention scores are ~1e-4, so
    an adapter on the queries or keys alone changes the logits by ~1e-7 (a no-op for these tests)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2, initializer_range=0.2)
    return BertForSequenceClassification(cfg)


def llama():
    """conftest's tiny Llama, initialised with std 0.2 (see :func:`bert`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2, initializer_range=0.2)
    return LlamaForCausalLM(cfg)


@dataclass
class Case:
    """One drawn example: how to build the base (deterministically), the config, the inputs."""

    arch: str
    config: Any
    seed: int
    dtype: torch.dtype
    sizes: tuple[int, int, int]  # batch, sequence, image side
    groups: int = 2
    std: float = 0.3              # perturbation of the trainable parameters
    after: Callable[[Any], None] | None = None  # more changes after the perturbation (masks, gates, ...)
    mutates_base: bool = False    # PiSSA / OLoRA: the base runs on the residual inside disable_adapter()
    trains_base_bias: bool = False  # bias="all"/"lora_only"/"vera_only": disable_adapter() keeps them
    needs_data: bool = False      # FISH / Child-Tuning-D choose their mask from data (peft_prepare)
    noop: bool = False            # the drawn adapter is the identity on purpose (every SoRA gate pruned)
    loose: float = 1.0            # tolerance factor: DoRA divides by column norms (float32: ~7e-5 seen)

    def base(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = {"zoo": lambda: Zoo(groups=self.groups), "bert": bert, "llama": llama}[self.arch]()
        return model.to(self.dtype).eval()

    def inputs(self) -> dict[str, torch.Tensor]:
        b, s, side = self.sizes
        g = torch.Generator().manual_seed(self.seed + 7)
        if self.arch == "zoo":
            return {"ids": torch.randint(0, 20, (b, s), generator=g),
                    "x": torch.randn(b, s, 12, generator=g, dtype=self.dtype),
                    "img": torch.randn(b, 4, side, side, generator=g, dtype=self.dtype)}
        x = {"input_ids": torch.randint(3, 64, (b, s), generator=g)}
        if self.arch == "bert":  # right padding on the last row (a query-only adapter acts on the first)
            mask = torch.ones(b, s, dtype=torch.long)
            if b > 1:
                mask[-1, s - s // 2:] = 0
            x["attention_mask"] = mask
        return x

    def batches(self, n: int = 6):
        g = torch.Generator().manual_seed(self.seed + 11)
        return iter([{"input_ids": torch.randint(3, 64, (2, 6), generator=g), "labels": torch.tensor([0, 1])}
                     for _ in range(n)])

    def tol(self) -> float:
        # float32: a few layers of a transformer (attention, norms) round the same sum two ways to ~1.3e-5 of
        # its scale; a wrong merge is off by far more (1e-3 and up)
        return self.loose * (3e-5 if self.dtype == torch.float32 else 1e-10)


def out(model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs compared: the zoo's tensor; an HF model's logits and last hidden state (the tiny BERT's
    logits are ~1e-3, so each output is compared at its own scale)."""
    with torch.no_grad():
        if "img" in x:
            return {"out": model(**x)}
        y = model(**x, output_hidden_states=True)
    return {"logits": y.logits, "hidden": y.hidden_states[-1]}


def close(a: dict, b: dict, tol: float) -> tuple[bool, float, float, str]:
    """``(ok, max abs difference, allowed, output name)`` of the worst output, each compared relative to its
    own scale (the larger max |value| of the two)."""
    worst = (True, 0.0, 0.0, "")
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        allowed = tol * max(a[key].abs().max().item(), b[key].abs().max().item(), 1e-30)
        if diff / allowed > (worst[1] / worst[2] if worst[2] else -1):
            worst = (diff <= allowed, diff, allowed, key)
    return worst


def assert_close(a, b, tol, what):
    ok, diff, allowed, key = close(a, b, tol)
    assert ok, f"{what}: max |diff| of {key} = {diff:.3e} > {allowed:.3e}"


def perturb_trainable(model, case: Case) -> None:
    """Move every trainable parameter off its start (``case.std``), run ``case.after``, and put the model in eval
    mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                # a DoRA magnitude is a column norm: scaled, not shifted (a shift of 0.3 on norms of ~0.07 brings some
                # near 0, and merging then divides float32 rounding by them: ill-conditioned, not wrong)
                p.mul_(1 + torch.rand_like(p) * case.std)
            elif p.requires_grad:
                p.add_(torch.randn_like(p) * case.std)
    if case.after is not None:
        case.after(model)
    model.eval()


def adapted(case: Case) -> tuple[Any, torch.Tensor]:
    """``(peft_model, bare_base_output)``: the peft model in eval mode, every trainable parameter perturbed."""
    x = case.inputs()
    bare = out(case.base(), x)
    torch.manual_seed(case.seed + 1)
    model = get_peft_model(case.base(), copy.deepcopy(case.config))
    if case.needs_data:
        model.peft_prepare(case.batches())
    perturb_trainable(model, case)
    return model, bare


def base_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.get_base_model().state_dict().items()}


def assert_weights_back(before: dict, now: dict, merged: dict, tol: float, what: str) -> None:
    """Every base tensor is back to within ``tol`` times the larger of 1 and its scale before and while merged:
    unmerging subtracts the merged delta again, so float32 rounding is relative to the merged weight (a DoRA
    or PiSSA adapter with a large ``alpha / r`` merges weights ~50x larger than the base's)."""
    assert now.keys() == before.keys()
    for k, v in before.items():
        if not v.numel() or not v.is_floating_point():
            assert torch.equal(now[k], v), k
            continue
        diff = (now[k] - v).abs().max().item()
        allowed = tol * max(1.0, v.abs().max().item(), merged[k].abs().max().item())
        assert diff <= allowed, f"{k} {what}: max |diff| = {diff:.3e} > {allowed:.3e}"


# --- per-method config strategies --------------------------------------------------------------------------
def subset(pool: list[str], max_size: int | None = None):
    return st.lists(st.sampled_from(pool), min_size=1, max_size=max_size or len(pool), unique=True)


common = dict(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]),
              sizes=st.tuples(st.integers(1, 3), st.integers(2, 6), st.integers(3, 5)))


@st.composite
def lora_case(draw, variant: str = "lora"):
    arch = draw(st.sampled_from(["zoo", "bert", "llama"]))
    groups = draw(st.sampled_from([1, 2, 4])) if arch == "zoo" else 1
    pool = ZOO_EMB if arch == "zoo" and variant in ("lora", "dora", "lorafa", "pissa") else LINEAR_TARGETS[arch]
    targets = draw(subset(pool))
    r = draw(st.integers(1, 6))
    if any(t in ("conv2",) for t in targets):
        r = groups * max(1, r // groups)  # LoRA's grouped conv B has out * r/groups entries
    kw: dict[str, Any] = dict(r=r, target_modules=targets, lora_alpha=draw(st.floats(0.5, 32)),
                              use_rslora=draw(st.booleans()))
    bias = "none"
    if arch != "llama" and variant != "dylora":
        bias = draw(st.sampled_from(["none", "none", "lora_only", "all"]))
    kw["bias"] = bias
    mutates = False
    if variant == "pissa":
        init = draw(st.sampled_from(["pissa", "pissa_niter_2", "olora"]))
        kw["init_lora_weights"] = init
        kw["r"] = min(r, 6)  # PiSSA/OLoRA need r <= min(out, in): 8 at least here (zoo lin, llama k_proj)
        kw["use_dora"] = draw(st.booleans())
        mutates = True
    elif variant == "dylora":
        kw["init_lora_weights"] = draw(st.sampled_from([True, False, "gaussian"]))
        kw["eval_rank"] = draw(st.one_of(st.none(), st.integers(1, r)))
    else:
        # "orthogonal" on a convolution raised AttributeError; it takes the default init there, as documented
        inits = [True, False, "gaussian"] + (["orthogonal"] if r % 2 == 0 else [])
        kw["init_lora_weights"] = draw(st.sampled_from(inits))
        kw["use_dora"] = variant == "dora"
        if variant != "dora" and "emb" not in targets and draw(st.booleans()):  # no lora_bias on embeddings
            kw["lora_bias"] = True
        if draw(st.booleans()):
            step = math.lcm(2 if kw["init_lora_weights"] == "orthogonal" else 1, groups if "conv2" in targets else 1)
            kw["rank_pattern"] = {targets[0]: step * draw(st.integers(1, 3))}
            kw["alpha_pattern"] = {targets[-1]: draw(st.floats(0.5, 16))}
    if arch == "bert":
        kw["task_type"] = draw(st.sampled_from([None, "SEQ_CLS"]))  # SEQ_CLS also trains a copy of the head
    cls = {"dylora": peftkit.DyLoraConfig, "lorafa": peftkit.LoraFAConfig}.get(variant, peftkit.LoraConfig)
    config = cls(**kw)
    # (PiSSA/OLoRA on a float64 base restored the base weight in float32: unload() was off by ~3e-8)
    dtype = draw(common["dtype"])
    return Case(arch, config, draw(common["seed"]), dtype, draw(common["sizes"]), groups=groups,
                mutates_base=mutates, trains_base_bias=bias != "none", loose=10.0 if kw.get("use_dora") else 1.0)


@st.composite
def vera_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert", "llama"]))
    bias = "none" if arch == "llama" else draw(st.sampled_from(["none", "none", "vera_only", "all"]))
    config = peftkit.VeraConfig(r=draw(st.integers(1, 8)), target_modules=draw(subset(LINEAR_TARGETS[arch])),
                                projection_prng_key=draw(st.integers(0, 2**31)),
                                save_projection=draw(st.booleans()), d_initial=draw(st.floats(0.01, 1.0)),
                                init_weights=draw(st.booleans()), bias=bias)
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=1,
                trains_base_bias=bias != "none")


def _mask_adalora(masks: dict[str, list[bool]]):
    def apply(model):
        from peftkit.methods.adalora import AdaLoraTuner

        AdaLoraTuner().set_rank_masks(model.base_model, "default", {k: torch.tensor(v) for k, v in masks.items()})
    return apply


@st.composite
def adalora_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert"]))
    groups = draw(st.sampled_from([1, 2])) if arch == "zoo" else 1
    targets = draw(subset(ZOO_ALL if arch == "zoo" else ["query", "value", "intermediate.dense"]))
    init_r = draw(st.integers(1, 5))
    config = peftkit.AdaLoraConfig(init_r=init_r, target_r=draw(st.integers(0, init_r)), total_step=10,
                                   lora_alpha=draw(st.floats(0.5, 16)), target_modules=targets,
                                   init_lora_weights=draw(st.booleans()))
    after = None
    if arch == "zoo" and draw(st.booleans()):  # a pruned budget: some triplets (or whole layers) masked off
        after = _mask_adalora({t: draw(st.lists(st.booleans(), min_size=init_r, max_size=init_r))
                               for t in targets})
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=groups,
                after=after)


@st.composite
def lycoris_case(draw, kind: str):
    arch = draw(st.sampled_from(["zoo", "zoo", "llama"]))
    groups = draw(st.sampled_from([1, 2])) if arch == "zoo" else 1
    targets = draw(subset(ZOO_ALL if arch == "zoo" else LLAMA_LINEAR))
    kw: dict[str, Any] = dict(r=draw(st.integers(1, 4)), alpha=draw(st.floats(0.5, 16)), target_modules=targets,
                              use_effective_conv2d=draw(st.booleans()))
    if kind == "loha":
        kw["init_weights"] = draw(st.booleans())
        cls = peftkit.LoHaConfig
    else:
        kw.update(init_weights=draw(st.sampled_from([True, False, "lycoris"])), decompose_both=draw(st.booleans()),
                  decompose_factor=draw(st.sampled_from([-1, -1, 1, 2, 3, 4])))
        cls = peftkit.LoKrConfig
    if draw(st.booleans()):
        kw["rank_pattern"] = {targets[0]: draw(st.integers(1, 4))}
        kw["alpha_pattern"] = {targets[-1]: draw(st.floats(0.5, 8))}
    return Case(arch, cls(**kw), draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=groups)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def krona_case(draw):
    groups = draw(st.sampled_from([1, 2]))
    targets = draw(subset(ZOO_ALL))
    shapes = {**SHAPES, "conv2": (8, 36 // groups)}
    outs = [d for d in _divisors(shapes[targets[0]][0]) if all(shapes[t][0] % d == 0 for t in targets)]
    ins = [d for d in _divisors(shapes[targets[0]][1]) if all(shapes[t][1] % d == 0 for t in targets)]
    config = peftkit.KronaConfig(target_modules=targets, a1=draw(st.sampled_from(outs)),
                                 a2=draw(st.sampled_from(ins)), scale=draw(st.floats(0.1, 4)),
                                 init_weights=draw(st.booleans()))
    return Case("zoo", config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=groups)


@st.composite
def hra_case(draw):
    arch = draw(st.sampled_from(["zoo", "zoo", "bert", "llama"]))
    # (HRA refuses a grouped Conv2d and a Conv1d, as peft)
    targets = draw(subset([*ZOO_LINEAR, "conv2"] if arch == "zoo" else LINEAR_TARGETS[arch]))
    init = draw(st.booleans())
    r = draw(st.sampled_from([2, 4, 6])) if init else draw(st.integers(1, 6))  # the paired init needs an even r
    # (Gram-Schmidt needs the random init: the paired one has equal columns)
    config = peftkit.HRAConfig(r=r, apply_GS=not init and draw(st.booleans()), init_weights=init,
                               target_modules=targets)
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=1)


@st.composite
def fourierft_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert", "llama"]))
    targets = draw(subset(LINEAR_TARGETS[arch]))  # (Linear and GPT-2 Conv1D only, as peft)
    # (a weight change's entries are ~ scaling sqrt(n) / (out in): at least ~0.05 on the 256-entry BERT layers, so
    # that the adapter shows; at most ~1 on the 96-entry zoo layer, so that float32 rounding stays near 1e-5)
    config = peftkit.FourierFTConfig(n_frequency=draw(st.integers(8, 60)), scaling=draw(st.floats(5, 10)),
                                     random_loc_seed=draw(st.integers(0, 2**31)), init_weights=draw(st.booleans()),
                                     target_modules=targets)
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]))


@st.composite
def vblora_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert", "llama"]))
    bias = "none" if arch == "llama" else draw(st.sampled_from(["none", "none", "vblora_only", "all"]))
    num_vectors = draw(st.integers(2, 12))
    # (vector lengths 2 and 4 divide every linear size of the three models: the zoo's 8/12/20, Llama's 8/16/24)
    config = peftkit.VBLoRAConfig(r=draw(st.integers(1, 4)), num_vectors=num_vectors,
                                  vector_length=draw(st.sampled_from([2, 4])), topk=draw(st.integers(1, num_vectors)),
                                  save_only_topk_weights=draw(st.booleans()), target_modules=draw(subset(LINEAR_TARGETS[arch])),
                                  bias=bias)
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]),
                trains_base_bias=bias != "none")


def _zero_gates(fraction: float):
    def apply(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_gate"):
                    pruned = torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) < fraction
                    pruned[0] = fraction == 1.0  # the first rank stays unless all are pruned (the adapter acts)
                    p[pruned] = 0
    return apply


@st.composite
def sora_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert"]))
    targets = draw(subset(ZOO_ALL if arch == "zoo" else BERT_LINEAR))
    config = peftkit.SoraConfig(r=draw(st.integers(1, 5)), target_modules=targets,
                                sparse_lambda=draw(st.floats(0, 0.1)), init_lora_weights=draw(st.booleans()))
    pruned = draw(st.sampled_from([0.0, 0.5, 1.0]))
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=1,
                after=_zero_gates(pruned), noop=pruned == 1.0)


@st.composite
def ia3_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert", "llama"]))
    groups = draw(st.sampled_from([1, 2])) if arch == "zoo" else 1
    targets = draw(subset(ZOO_ALL if arch == "zoo" else LINEAR_TARGETS[arch]))
    ff = [t for t in targets if draw(st.booleans())]
    config = peftkit.IA3Config(target_modules=targets, feedforward_modules=ff,
                               init_ia3_weights=draw(st.booleans()))
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=groups)


@st.composite
def ssf_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert"]))
    pool = ZOO_LINEAR if arch == "zoo" else [*BERT_LINEAR, "LayerNorm"]
    config = peftkit.SSFConfig(target_modules=draw(st.one_of(st.just("all-linear"), subset(pool))),
                               init_ssf_weights=draw(st.sampled_from([True, "normal"])))
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]))


@st.composite
def oft_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert", "llama"]))
    targets = draw(subset([*ZOO_LINEAR, "conv2", "emb"] if arch == "zoo" else LINEAR_TARGETS[arch]))  # (groups=1)
    # every input width here (8, 12, 16, 24, 32; the Conv2d's 4 * 3 * 3; the embedding's 8) is divisible by 2 and
    # 4, and so by 1, 2 or 4 blocks
    size = draw(st.one_of(st.just(None), st.sampled_from([2, 4])))
    shape = dict(oft_block_size=size) if size else dict(r=draw(st.sampled_from([1, 2, 4])), oft_block_size=0)
    bias = draw(st.sampled_from(["none", "oft_only"])) if arch != "llama" else "none"
    coft = draw(st.booleans())
    config = peftkit.OFTConfig(target_modules=targets, block_share=draw(st.booleans()), bias=bias,
                               use_cayley_neumann=draw(st.booleans()), num_cayley_neumann_terms=draw(st.integers(2, 7)),
                               coft=coft, eps=draw(st.floats(0.2, 2.0)) if coft else 6e-5, **shape)
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]), groups=1,
                trains_base_bias=bias != "none")


def _bert(draw, config, **kw):
    # (a sparse difference on a float64 model could not be merged: float64 values index_add_ed into float32 zeros)
    dtype = draw(common["dtype"])
    return Case("bert", config, draw(common["seed"]), dtype, draw(common["sizes"]), **kw)


BERT_MODULES = ["query", "key", "value", "dense", "LayerNorm", "word_embeddings", "classifier"]


@st.composite
def selective_case(draw, kind: str):
    targets = draw(st.one_of(st.none(), subset(BERT_MODULES[:5])))
    task = draw(st.sampled_from([None, "SEQ_CLS"]))
    if kind == "bitfit":  # the key bias alone adds q.b_k to every score of a row: softmax ignores it
        return _bert(draw, peftkit.BitFitConfig(target_modules=targets, task_type=task),
                     noop=targets == ["key"] and task is None)
    if kind == "partial":
        choice = draw(st.sampled_from(["top", "blocks", "targets"]))
        kw = ({"num_top_layers": draw(st.integers(1, 2))} if choice == "top" else
              {"layers_to_transform": draw(subset([0, 1]))} if choice == "blocks" else
              {"target_modules": targets or ["query"]})
        return _bert(draw, peftkit.PartialConfig(task_type=task, **kw))
    if kind == "diff-pruning":
        project = draw(st.booleans())  # the projection to the target sparsity that follows each optimiser step
        return _bert(draw, peftkit.DiffPruningConfig(target_modules=targets, task_type=task,
                                                     target_sparsity=draw(st.floats(0.5, 0.99))),
                     after=(lambda m: m.peft_step_end(1)) if project else None)
    if kind == "fish":
        return _bert(draw, peftkit.FishMaskConfig(target_modules=targets, task_type=task,
                                                  keep_ratio=draw(st.floats(0.02, 0.5)),
                                                  num_fisher_samples=draw(st.integers(1, 4))), needs_data=True)
    kind_ct = draw(st.sampled_from(["D", "F"]))
    return _bert(draw, peftkit.ChildTuningConfig(target_modules=targets, task_type=task, child_tuning_type=kind_ct,
                                                 reserve_p=draw(st.floats(0.05, 1.0)),
                                                 num_fisher_samples=draw(st.integers(1, 4))),
                 needs_data=kind_ct == "D")


@st.composite
def ln_tuning_case(draw):
    arch = draw(st.sampled_from(["bert", "llama"]))
    pool = ["LayerNorm", "attention.output.LayerNorm"] if arch == "bert" else ["input_layernorm",
                                                                               "post_attention_layernorm", "norm"]
    config = peftkit.LNTuningConfig(target_modules=draw(st.one_of(st.none(), subset(pool))),
                                    task_type=draw(st.sampled_from([None, "SEQ_CLS"])) if arch == "bert" else None)
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]))


@st.composite
def shira_case(draw):
    arch = draw(st.sampled_from(["zoo", "bert", "llama"]))
    targets = ["lin"] if arch == "zoo" else draw(subset(LINEAR_TARGETS[arch]))  # (nn.Linear only, as peft)
    # (r * (in + out) <= out * in on every target: r <= 4 on the zoo's 12 x 8, r <= 5 on the Llama's 8 x 16)
    config = peftkit.ShiraConfig(r=draw(st.integers(1, 3)), random_seed=draw(st.one_of(st.none(), st.integers(0, 2**31))),
                                 init_weights=draw(st.booleans()), target_modules=targets)
    return Case(arch, config, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]))


@st.composite
def trainable_tokens_case(draw):
    arch = draw(st.sampled_from(["zoo", "llama"]))
    case = Case(arch, None, draw(common["seed"]), draw(common["dtype"]), draw(common["sizes"]))
    rows = 20 if arch == "zoo" else 64
    # at least one of the rows the inputs read, so that the adapter is not a no-op
    first = int(case.inputs()["ids" if arch == "zoo" else "input_ids"][0, 0])
    more = draw(st.lists(st.integers(0, rows - 1), max_size=6, unique=True))
    case.config = peftkit.TrainableTokensConfig(token_indices=[first, *(i for i in more if i != first)],
                                                target_modules=["emb"] if arch == "zoo" else None,
                                                init_weights=draw(st.booleans()))
    return case


STRATEGIES = {
    "lora": lora_case("lora"),
    "dora": lora_case("dora"),
    "pissa-olora": lora_case("pissa"),
    "lorafa": lora_case("lorafa"),
    "dylora": lora_case("dylora"),
    "vera": vera_case(),
    "adalora": adalora_case(),
    "loha": lycoris_case("loha"),
    "lokr": lycoris_case("lokr"),
    "krona": krona_case(),
    "hra": hra_case(),
    "fourierft": fourierft_case(),
    "vblora": vblora_case(),
    "sora": sora_case(),
    "oft": oft_case(),
    "ia3": ia3_case(),
    "ssf": ssf_case(),
    "bitfit": selective_case("bitfit"),
    "partial": selective_case("partial"),
    "diff-pruning": selective_case("diff-pruning"),
    "fish": selective_case("fish"),
    "child-tuning": selective_case("child-tuning"),
    "ln-tuning": ln_tuning_case(),
    "trainable-tokens": trainable_tokens_case(),
    "shira": shira_case(),
}
METHODS = list(STRATEGIES)


def test_every_mergeable_method_is_covered():
    from peftkit.config import all_methods

    mergeable = {spec.name for spec in all_methods() if spec.mergeable and spec.family != "quantisation"}
    covered = {"lora", "dora", "pissa", "olora", "lorafa", "dylora", "vera", "adalora", "loha", "lokr", "krona",
               "hra", "fourierft", "vblora", "sora", "oft", "ia3", "ssf", "bitfit", "partial", "diff-pruning", "fish",
               "child-tuning", "ln-tuning", "trainable-tokens", "shira"}
    assert mergeable <= covered, mergeable - covered


# --- the properties ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=examples(10), **SETTINGS)
@given(data=st.data())
def test_merge_and_unload_equals_unmerged_and_is_not_the_base(method, data):
    case = data.draw(STRATEGIES[method], label="case")
    model, bare = adapted(case)
    x = case.inputs()
    unmerged = out(model, x)
    ok, diff, allowed, key = close(unmerged, bare, 1e-3)
    assert case.noop or not ok, f"the adapter is a no-op: max |adapted - base| = {diff:.3e} <= {allowed:.3e} ({key})"
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    assert_close(out(merged, x), unmerged, case.tol(), "merge_and_unload vs unmerged")


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=examples(10), **SETTINGS)
@given(data=st.data(), cycles=st.integers(1, 3))
def test_merge_unmerge_cycles_restore_the_base_weights(method, data, cycles):
    case = data.draw(STRATEGIES[method], label="case")
    model, _ = adapted(case)
    x = case.inputs()
    before = out(model, x)
    snapshot = base_snapshot(model)
    for _ in range(cycles):
        model.merge_adapter()
        merged = base_snapshot(model)
        assert_close(out(model, x), before, case.tol(), "merged vs unmerged")
        model.unmerge_adapter()
    assert_weights_back(snapshot, base_snapshot(model), merged, case.tol(), f"after {cycles} merge/unmerge cycles")
    assert_close(out(model, x), before, case.tol(), "unmerged output after the cycles")


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=examples(8), **SETTINGS)
@given(data=st.data(), merged=st.booleans())
def test_save_and_load_on_a_fresh_base_gives_the_same_output(method, data, merged):
    """Saved unmerged or while merged; the reloaded adapter also merges to the same output."""
    case = data.draw(STRATEGIES[method], label="case")
    model, _ = adapted(case)
    x = case.inputs()
    expected = out(model, x)
    # (saved while merged, a trained base bias was written with the merged lora_B bias in it: counted twice)
    if merged:
        model.merge_adapter()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(case.base(), folder).eval()
    assert_close(out(loaded, x), expected, case.tol(), f"reloaded vs saved model (saved merged={merged})")
    if merged:
        model.unmerge_adapter()
        assert_close(out(model, x), expected, case.tol(), "the saved model after unmerging")
    assert_close(out(loaded.merge_and_unload(), x), expected, case.tol(), "reloaded, then merge_and_unload")


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=examples(8), **SETTINGS)
@given(data=st.data(), merged=st.booleans())
def test_disable_adapter_and_unload_give_the_base_model(method, data, merged):
    case = data.draw(STRATEGIES[method], label="case")
    model, bare = adapted(case)
    x = case.inputs()
    adapted_out = out(model, x)
    if merged:
        model.merge_adapter()
    entered = out(model, x)  # merged or not: the output the model gives back after the context
    assert_close(entered, adapted_out, case.tol(), "merged vs unmerged")
    with model.disable_adapter():
        disabled = out(model, x)
    if not (case.mutates_base or case.trains_base_bias):  # documented exceptions (README, disable_adapter)
        assert_close(disabled, bare, case.tol(), f"disable_adapter (merged={merged}) vs the bare base")
    assert_close(out(model, x), entered, case.tol(), "adapted output after leaving disable_adapter")
    assert model.base_model.merged_adapters() == (["default"] if merged else [])
    assert_close(out(model.unload(), x), bare, case.tol(), "unload() vs the bare base")


def second_config(config):
    """The same method's config for a second adapter, without a head copy or trained base biases (two adapters
    may not both train those: refused with a ConfigError, as in peft)."""
    other = copy.deepcopy(config)
    for name, value in (("task_type", None), ("modules_to_save", None), ("bias", "none")):
        if hasattr(other, name):
            setattr(other, name, value)
    return other


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=examples(5), **SETTINGS)
@given(data=st.data())
def test_two_active_adapters_merge_in_parts_and_delete_exactly(method, data):
    """Two active adapters of one method: merging one, then the other, gives the unmerged output; unmerging gives
    every base weight back; deleting one leaves exactly the other's output, which merge_and_unload keeps."""
    case = data.draw(STRATEGIES[method], label="case")
    x = case.inputs()
    torch.manual_seed(case.seed + 1)
    model = get_peft_model(case.base(), copy.deepcopy(case.config))
    model.add_adapter("other", second_config(case.config))
    model.set_adapter(["default", "other"])
    if case.needs_data:
        model.peft_prepare(case.batches())
    perturb_trainable(model, case)
    both = out(model, x)
    snapshot = base_snapshot(model)
    for part in ("other", "default"):
        try:
            model.merge_adapter([part])
        except ValueError as e:  # adapters that rescale (DoRA, (IA)^3, SSF) do not commute: refused, nothing merged
            assert "nothing was merged" in str(e), e
            assert not model.base_model.merged_adapters()
            assert_close(out(model, x), both, case.tol(), f"after the refused merge of {part!r} alone")
        else:
            assert_close(out(model, x), both, case.tol(), f"{part!r} merged, the other adapter unmerged")
            model.unmerge_adapter()
    model.merge_adapter()
    merged = base_snapshot(model)
    assert_close(out(model, x), both, case.tol(), "both merged")
    model.unmerge_adapter()
    assert_weights_back(snapshot, base_snapshot(model), merged, case.tol(), "after unmerging both")
    model.set_adapter("default")
    alone = out(model, x)
    model.set_adapter(["default", "other"])
    model.delete_adapter("other")
    if case.mutates_base:  # deleting a PiSSA/OLoRA adapter gives its principal part back to the base (documented)
        return
    assert_close(out(model, x), alone, case.tol(), "after deleting 'other' vs 'default' alone")
    assert_close(out(model.merge_and_unload(), x), alone, case.tol(), "merge_and_unload of 'default'")


# --- the defects these properties found, each as a fixed case ---------------------------------------------------

def test_orthogonal_init_on_a_convolution_takes_the_default():
    """It raised AttributeError ('LoraConv' object has no attribute '_orthogonal_init')."""
    model = get_peft_model(nn.Sequential(nn.Conv2d(4, 8, 3)), peftkit.LoraConfig(r=2, target_modules=["0"],
                                                                                 init_lora_weights="orthogonal"))
    adapter = model.base_model.model[0].adapters["default"]
    assert adapter.lora_A.weight.abs().sum() > 0 and adapter.lora_B.weight.abs().sum() == 0


def test_a_sparse_difference_on_a_float64_model_merges():
    """index_add_ of float64 values into float32 zeros: RuntimeError on merging FISH / Child-Tuning-D."""
    from types import SimpleNamespace

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, labels=None):
            return SimpleNamespace(loss=self.lin(x).pow(2).sum(), logits=self.lin(x))

    torch.manual_seed(0)
    model = get_peft_model(M().double(), peftkit.FishMaskConfig(keep_ratio=0.5, num_fisher_samples=2,
                                                                target_modules=["lin"]))
    model.peft_prepare(iter([{"x": torch.randn(2, 4, dtype=torch.float64), "labels": torch.zeros(2)}] * 2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    x = torch.randn(3, 4, dtype=torch.float64)
    want = model(x).logits.detach()
    assert (model.merge_and_unload()(x).logits - want).abs().max() <= 1e-12


def test_pissa_on_a_float64_base_unloads_to_the_exact_weight():
    """restore_base added B0 A0 back in float32: unload() was off by ~3e-8 on a float64 base."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8)).double()
    w0 = base[0].weight.detach().clone()
    for init in ("pissa", "olora"):
        model = get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["0"],
                                                                       init_lora_weights=init))
        assert (model.unload()[0].weight - w0).abs().max() <= 1e-14, init


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_trained_bias_saved_while_merged_is_not_counted_twice(bias, tmp_path):
    """The file held the live base bias, which held the merged lora_B bias: reloaded, it was added twice (4.35)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4))
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["0"], bias=bias, lora_bias=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    x = torch.randn(2, 4)
    want = model(x).detach()
    model.merge_adapter()
    model.save_pretrained(tmp_path)
    assert (PeftModel.from_pretrained(fresh, tmp_path)(x) - want).abs().max() <= 1e-6
    assert (model(x) - want).abs().max() <= 1e-6  # saving changed nothing in the merged model
