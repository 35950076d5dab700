"""Two CPU processes (gloo, spawned here) against one: DDP and FSDP2 reproduce a single process with
the same global batch and seed; FSDP saves one loadable adapter; checkpoints resume under FSDP; the
launcher's environment variables are what the workers use (as under torchrun / accelerate launch).

All scenarios run in one spawn of two single-threaded workers (a few seconds), which write their
results as safetensors + JSON; the single-process references are computed in the test process."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from peftkit import PeftModel, get_peft_model_state_dict
from peftkit.train import distributed as D
from peftkit.train.checkpoint import latest_checkpoint
from peftkit.train.trainer import Trainer, TrainingArguments, batch_order, count_rows, count_target_tokens
from tests.tiny_train import (
    Interrupted,
    StopAfter,
    TinyClassifier,
    classification_items,
    collate_classification,
    collate_lm,
    lm_items,
    lora_model,
)

STEPS = 6
# 21 rows in global batches of 5: shards of 3 and 2 rows, and each epoch ends with a 1-row batch
# that leaves rank 1 without a row (it runs one with weight 0).
SCENARIOS = {
    "ddp_classifier": dict(kind="classifier", fsdp=False),
    "ddp_lm": dict(kind="lm", fsdp=False),  # loss is a mean over target tokens, uneven across rows
    # most rows without a target token: some steps leave one rank none (a NaN mean loss, a share of 0)
    "ddp_lm_sparse": dict(kind="lm_sparse", fsdp=False),
    "fsdp_classifier": dict(kind="classifier", fsdp=True),
    "ddp_dropout_a": dict(kind="classifier", fsdp=False, dropout=0.3),
    "ddp_dropout_b": dict(kind="classifier", fsdp=False, dropout=0.3),
    # methods that leave parameters without a gradient: FISH's mask may select nothing in a tensor (an empty
    # parameter), LoHa's module_dropout skips whole adapters, a different draw on each rank; both stopped DDP
    # with "Expected to have finished reduction in the prior iteration"
    "ddp_fish": dict(kind="classifier", fsdp=False, method="fish"),
    "ddp_loha_module_dropout": dict(kind="classifier", fsdp=False, method="loha"),
    # robust AdapterDrop draws the blocks a step drops: every rank must drop the same ones, rank 0's (one process's)
    "ddp_adapterdrop_random": dict(kind="classifier", fsdp=False, method="adapterdrop"),
}


class _Output(dict):
    """A model output DDP can search for tensors (a dict, as HF's ModelOutput is), read as attributes."""

    __getattr__ = dict.__getitem__


class _DictClassifier(TinyClassifier):
    """TinyClassifier returning a dict: DDP's search for unused parameters follows only tensors it finds in
    the output (tuples, lists, dicts), and finds none in a SimpleNamespace."""

    def forward(self, input_ids, attention_mask, labels=None):
        out = super().forward(input_ids, attention_mask, labels)
        return _Output(loss=out.loss, logits=out.logits)


def _method_model(method: str):
    from peftkit import AdapterDropConfig, FishMaskConfig, LoHaConfig, get_peft_model

    torch.manual_seed(0)
    config = {"fish": FishMaskConfig(keep_ratio=0.02, num_fisher_samples=10, target_modules=["fc", "classifier"]),
              "loha": LoHaConfig(r=2, target_modules=["fc"], module_dropout=0.5, init_weights=False),
              "adapterdrop": AdapterDropConfig(target_modules=["fc"], adapterdrop_layers=1, adapterdrop_mode="random", layers_pattern="blocks",
                                               bottleneck_size=4, init_weights="bert")}[method]
    return get_peft_model(_DictClassifier(), config)


def _sparse_lm_items() -> list[dict]:
    """Ten causal-LM rows of which only rows 0 and 1 have target tokens."""
    return [it if i < 2 else {**it, "labels": [-100] * len(it["labels"])} for i, it in enumerate(lm_items(10))]


def _train(kind: str, fsdp: bool = False, dropout: float = 0.0, save_every: int | None = None,
           out: str | None = None, resume=None, stop_after: int | None = None, method: str | None = None):
    model = lora_model("lm" if kind == "lm_sparse" else kind, dropout) if method is None else _method_model(method)
    items = {"classifier": lambda: classification_items(21), "lm": lm_items, "lm_sparse": _sparse_lm_items}[kind]()
    data = items if stop_after is None else StopAfter(items, stop_after)
    args = TrainingArguments(max_steps=STEPS, batch_size=5, warmup_ratio=0.2, progress=False, fsdp=fsdp,
                             save_every=save_every, output_dir=out)
    trainer = Trainer(model, data, collate_classification if kind == "classifier" else collate_lm, args,
                      count_loss_items=count_rows if kind == "classifier" else count_target_tokens)
    stats = trainer.train(resume_from_checkpoint=resume)
    state = {k: D.full(v).detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return model, state, stats


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with D.process_group("cpu") as info:
        assert info.world_size == 2 and info.rank == rank
        for name, spec in SCENARIOS.items():
            model, state, stats = _train(**spec)
            save_file(state, f"{out}/{name}-rank{rank}.safetensors")
            with open(f"{out}/{name}-rank{rank}.json", "w") as fh:
                json.dump(stats, fh)
            if name == "fsdp_classifier":
                model.save_pretrained(f"{out}/fsdp_adapter", is_main_process=info.is_main)
        # a Fisher mask chosen from different rows on each rank (as transformers' Trainer shards the data): all
        # ranks must keep the same entries, rank 0's
        fish = _method_model("fish")
        items = classification_items(21)[rank * 10:]
        fish.peft_prepare(iter([collate_classification(items[:10])]))
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(fish).items()},
                  f"{out}/fish_mask-rank{rank}.safetensors")
        # FSDP interrupted after 3 steps (5 rows each), then resumed in a fresh model and trainer
        ckpt = f"{out}/fsdp_run"
        with pytest.raises(Interrupted):
            _train("classifier", fsdp=True, save_every=3, out=ckpt, stop_after=15)
        _, state, stats = _train("classifier", fsdp=True, save_every=3, out=ckpt, resume=latest_checkpoint(ckpt))
        save_file(state, f"{out}/fsdp_resumed-rank{rank}.safetensors")
        with open(f"{out}/fsdp_resumed-rank{rank}.json", "w") as fh:
            json.dump(stats, fh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return out


def _result(folder, name: str, rank: int):
    return (load_file(folder / f"{name}-rank{rank}.safetensors"),
            json.loads((folder / f"{name}-rank{rank}.json").read_text()))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max().item() for k in a if a[k].numel()), default=0.0)


@pytest.mark.parametrize("name", ["ddp_classifier", "ddp_lm", "ddp_lm_sparse", "fsdp_classifier"])
def test_two_processes_give_one_process_result(two_ranks, name):
    spec = SCENARIOS[name]
    _, reference, ref_stats = _train(spec["kind"])
    for rank in (0, 1):
        state, stats = _result(two_ranks, name, rank)
        assert _max_diff(state, reference) <= 1e-5
        assert abs(stats["train_loss"] - ref_stats["train_loss"]) <= 1e-6
        assert stats["steps"] == STEPS
    # the adapters did train (B started at zero)
    assert max(v.abs().max().item() for k, v in reference.items() if "lora_B" in k) > 1e-4


def test_a_rank_without_target_tokens_adds_nothing_to_the_loss(two_ranks):
    # the scenario does leave each rank without a target token in some step (where its mean loss is NaN)
    targets = [any(t != -100 for t in it["labels"][1:]) for it in _sparse_lm_items()]
    empty = set()
    for _, rows in zip(range(STEPS), batch_order(10, 5, TrainingArguments().seed), strict=False):
        for rank in (0, 1):
            lo, hi = D.shard_rows(len(rows), D.DistInfo(rank=rank, world_size=2, local_rank=rank))
            if not any(targets[i] for i in rows[lo:hi]):
                empty.add(rank)
    assert empty == {0, 1}
    for rank in (0, 1):
        state, stats = _result(two_ranks, "ddp_lm_sparse", rank)
        assert all(torch.isfinite(v).all() for v in state.values())
        assert stats["train_loss"] == pytest.approx(_train("lm_sparse")[2]["train_loss"], abs=1e-6)


def test_fsdp_saves_one_adapter_that_loads(two_ranks):
    rank0, _ = _result(two_ranks, "fsdp_classifier", 0)
    rank1, _ = _result(two_ranks, "fsdp_classifier", 1)
    assert _max_diff(rank0, rank1) == 0.0
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyClassifier(), two_ranks / "fsdp_adapter")
    assert _max_diff(get_peft_model_state_dict(loaded), rank0) == 0.0


def test_fsdp_run_resumed_from_a_checkpoint_equals_the_uninterrupted_one(two_ranks):
    for rank in (0, 1):
        state, stats = _result(two_ranks, "fsdp_resumed", rank)
        whole, whole_stats = _result(two_ranks, "fsdp_classifier", rank)
        assert _max_diff(state, whole) <= 1e-6
        assert abs(stats["train_loss"] - whole_stats["train_loss"]) <= 1e-6
    files = {p.name for p in (two_ranks / "fsdp_run" / "checkpoints" / "step-00000006").iterdir()}
    assert files == {"trainer_state.json", "rank0.safetensors", "rank0.json", "rank1.safetensors", "rank1.json"}


def test_dropout_is_deterministic_per_rank(two_ranks):
    for rank in (0, 1):
        a, _ = _result(two_ranks, "ddp_dropout_a", rank)
        b, _ = _result(two_ranks, "ddp_dropout_b", rank)
        assert _max_diff(a, b) == 0.0
    # the ranks drew their own masks: the run differs from one process with the same seed
    _, single, _ = _train("classifier", dropout=0.3)
    assert _max_diff(a, single) > 1e-4


def test_rank_seeds_and_row_shards():
    assert D.rank_seed(7, 0) == 7 and len({D.rank_seed(7, r) for r in range(8)}) == 8
    shards = [D.shard_rows(5, D.DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    assert shards == [(0, 3), (3, 5)]
    assert [D.shard_rows(1, D.DistInfo(rank=r, world_size=2)) for r in (0, 1)] == [(0, 1), (1, 1)]


@pytest.mark.parametrize("name", ["ddp_fish", "ddp_loha_module_dropout"])
def test_methods_that_leave_parameters_unused_train_on_two_processes(two_ranks, name):
    from peftkit import get_peft_model_state_dict

    rank0, stats = _result(two_ranks, name, 0)
    rank1, _ = _result(two_ranks, name, 1)
    assert stats["steps"] == STEPS
    assert _max_diff(rank0, rank1) == 0.0  # DDP kept the replicas equal
    start = get_peft_model_state_dict(_method_model(SCENARIOS[name]["method"]))
    if name == "ddp_fish":  # the mask left some tensors empty: they hold no value and need no gradient
        assert any(v.numel() == 0 for k, v in rank0.items() if k.endswith("_values"))
        start = {k: v for k, v in start.items() if k in rank0}
    moved = [k for k in rank0 if rank0[k].numel() and (k not in start or start[k].shape != rank0[k].shape
                                                       or (rank0[k] - start[k]).abs().max() > 1e-6)]
    assert moved  # it trained


def test_random_adapterdrop_drops_rank_0s_blocks_on_every_rank(two_ranks):
    """Each rank drew the number of dropped blocks from its own seeded stream (distributed.rank_seed), so in one
    step the ranks trained different sub-networks and averaged their gradients: the two-process run ended 5.4e-4
    away from the one-process run. Every rank now takes rank 0's draw, which is the one process's."""
    model = _method_model("adapterdrop")
    args = TrainingArguments(max_steps=STEPS, batch_size=5, warmup_ratio=0.2, progress=False)
    reference = Trainer(model, classification_items(21), collate_classification, args).train()
    state = get_peft_model_state_dict(model)
    assert max(v.abs().max().item() for k, v in state.items() if "adapter_up" in k) > 1e-3  # trained
    for rank in (0, 1):
        saved, stats = _result(two_ranks, "ddp_adapterdrop_random", rank)
        assert _max_diff(saved, state) <= 1e-5
        assert abs(stats["train_loss"] - reference["train_loss"]) <= 1e-6


@pytest.mark.parametrize("method", ["adalora", "sora", "diff-pruning", "compacter", "compacter++"])
def test_methods_that_cannot_shard_are_refused_with_fsdp_before_anything_is_written(tmp_path, method):
    """They failed in their first sharded step (a DTensor met a plain tensor in AdaLoRA's penalty, SoRA's gate,
    diff pruning's budget), after run_config.json and train.log were written."""
    from peftkit import ConfigError
    from peftkit.train.run import RunConfig, run_training

    cfg = RunConfig(task="causal-lm", model="stories260K", method=method, fsdp=True, max_steps=1,
                    output_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match=re.escape(f"--method {method} does not train sharded")):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


def test_a_skipped_adapter_still_gets_a_zero_gradient():
    """LyCORIS module_dropout and random AdapterDrop skip adapters: the skipped ones join the graph at weight
    zero, so DDP sees a gradient for every parameter and a step that skips them all can still backpropagate."""
    from peftkit import LoHaConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(TinyClassifier(), LoHaConfig(r=2, target_modules=["fc"], module_dropout=0.999999))
    model.train()
    batch = collate_classification(classification_items(4))
    out = model(**batch)
    with torch.no_grad():
        model.eval()
        plain = model(**batch)
    assert torch.equal(out.logits, plain.logits)  # every adapter skipped (and LoHa starts at zero anyway)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "hada_" in n]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_a_fisher_mask_from_different_rows_on_each_rank_is_rank_0s(two_ranks):
    masks = [load_file(two_ranks / f"fish_mask-rank{rank}.safetensors") for rank in (0, 1)]
    alone = _method_model("fish")
    alone.peft_prepare(iter([collate_classification(classification_items(21)[:10])]))
    other = _method_model("fish")
    other.peft_prepare(iter([collate_classification(classification_items(21)[10:20])]))
    indices = [k for k in masks[0] if k.endswith("_indices")]
    assert indices
    ours, theirs = get_peft_model_state_dict(alone), get_peft_model_state_dict(other)
    assert any(not torch.equal(ours[k], theirs[k]) for k in indices)  # the two slices choose differently alone
    for k in indices:
        assert torch.equal(masks[0][k], ours[k]) and torch.equal(masks[1][k], ours[k]), k
