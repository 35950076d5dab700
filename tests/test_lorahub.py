"""LoraHub: the search finds the composition that fits a few examples, with forward passes only."""

from __future__ import annotations

import pytest
import torch

from peftkit import ConfigError, LoraConfig, get_peft_model
from peftkit.lorahub import lorahub
from tests.conftest import ids, tiny_llama


def upstream():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters." in n:
                p.add_(torch.randn_like(p) * 0.8)
    return model


def test_lorahub_recovers_the_adapter_that_explains_the_examples():
    model = upstream()
    x = ids(batch=6, seq=8)
    with torch.no_grad():
        model.set_adapter("default")
        target = model(input_ids=x).logits  # the new task: behave like adapter 'default'
    batches = [{"input_ids": x, "labels": target}]

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(input_ids=batch["input_ids"]).logits, batch["labels"])

    result = lorahub(model, ["default", "b"], batches, steps=30, l1=0.0, seed=1, loss_fn=loss_fn)
    assert model.active_adapters == ["lorahub"]
    with torch.no_grad():
        with model.disable_adapter():
            base_loss = loss_fn(model, batches[0]).item()
        final = loss_fn(model, batches[0]).item()
    assert final == pytest.approx(result.loss, abs=1e-6)
    assert final < 0.1 * base_loss
    # the composition is quadratic in w (B and A both scale), so the sign of a lone weight does not matter
    assert abs(result.weights[0]) > 0.7 and abs(result.weights[1]) < 0.3
    assert result.evaluations == 1 + 30 * 8


def test_lorahub_errors():
    model = upstream()
    batch = [{"input_ids": ids(), "labels": ids()}]
    with pytest.raises(ConfigError, match="at least two"):
        lorahub(model, ["default"], batch)
    with pytest.raises(ConfigError, match="at least one batch"):
        lorahub(model, ["default", "b"], [])
    # search settings are checked up front (they failed mid-search with raw TypeErrors and numpy's errors)
    for kw, message in [(dict(steps=2.5), "steps=2.5 is not valid; give a whole number >= 1"),
                        (dict(population=3.5), "population=3.5 is not valid"), (dict(steps="3"), "steps='3'"),
                        (dict(seed="x"), "seed='x' is not valid"), (dict(seed=-1), "seed=-1 is not valid"),
                        (dict(bound=float("inf")), "bound=inf is not valid; give a finite number > 0"),
                        (dict(l1=-1), "l1=-1 is not valid; give a finite number >= 0")]:
        with pytest.raises(ConfigError, match=message):
            lorahub(model, ["default", "b"], batch, **kw)
    with pytest.raises(ConfigError, match="batches must be a list of batch dicts or a DataLoader"):
        lorahub(model, ["default", "b"], (b for b in batch))
    # a DataLoader iterates again for each candidate: it is taken (it was refused for a while)
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids(batch=4)], batch_size=2)
    result = lorahub(model, ["default", "b"], loader, adapter_name="from_loader", steps=2, population=3)
    assert len(result.weights) == 2 and "from_loader" in model.peft_config
    model.delete_adapter("from_loader")
    with pytest.raises(ConfigError, match="adapters='default' is one name"):
        lorahub(model, "default", batch)
    model.add_adapter("wide", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="equal rank"):
        lorahub(model, ["default", "wide"], batch)
    assert "lorahub" not in model.peft_config


class _Out:
    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


class _Nested(torch.nn.Module):
    """``lin`` and ``sub.lin``: a plain target name 'lin' would match both by suffix."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.sub = torch.nn.Module()
        self.sub.lin = torch.nn.Linear(8, 8)

    def forward(self, x, labels=None):
        y = self.sub.lin(self.lin(x))
        return _Out(y, None if labels is None else ((y - labels) ** 2).mean())


def test_lorahub_adapter_sits_on_exactly_the_sources_layers_and_equals_their_composition():
    torch.manual_seed(0)
    model = get_peft_model(_Nested(), LoraConfig(r=2, target_modules="lin"), adapter_name="a")  # regex: 'lin' only
    model.add_adapter("b", LoraConfig(r=2, target_modules="lin"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    w = lorahub(model, ["a", "b"], [{"x": x, "labels": y}], steps=3).weights
    holders = [n for n, m in model.base_model.wrappers() if "lorahub" in getattr(m, "adapters", {})]
    assert holders == ["lin"]
    lin, sub = model.base_model.model.lin, model.base_model.model.sub.lin
    with torch.no_grad():
        la, lb = lin.adapters["a"], lin.adapters["b"]
        a = w[0] * la.lora_A.weight * la.scaling ** 0.5 + w[1] * lb.lora_A.weight * lb.scaling ** 0.5
        b = w[0] * la.lora_B.weight * la.scaling ** 0.5 + w[1] * lb.lora_B.weight * lb.scaling ** 0.5
        expected = sub(x @ (lin.base_layer.weight + b @ a).T + lin.base_layer.bias)
        assert torch.allclose(model(x).logits, expected, atol=1e-6)


def test_lorahub_composes_per_layer_ranks_of_a_rank_pattern():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    x = ids()
    lorahub(model, ["a", "b"], [{"input_ids": x, "labels": x}], steps=1)
    ranks = {n.rsplit(".", 1)[-1]: m.adapters["lorahub"].r for n, m in model.base_model.wrappers()
             if "lorahub" in getattr(m, "adapters", {})}
    assert ranks == {"q_proj": 4, "v_proj": 2}


def test_a_failed_lorahub_leaves_the_model_as_it_was():
    model = upstream()
    model.train()
    with pytest.raises(ConfigError, match="no loss"):
        lorahub(model, ["default", "b"], [{"input_ids": ids()}])  # no labels: the model returns no loss
    assert list(model.peft_config) == ["default", "b"]
    assert model.active_adapters == ["default"] and model.training

    def boom(m, batch):
        raise RuntimeError("user loss failed")

    with pytest.raises(RuntimeError, match="user loss failed"):
        lorahub(model, ["default", "b"], [{"input_ids": ids()}], loss_fn=boom)
    assert list(model.peft_config) == ["default", "b"] and model.active_adapters == ["default"] and model.training


def test_lorahub_checks_its_sources_as_add_weighted_adapter_does():
    """LoraHub took a modules_to_save_from without the heads (the composed head was the untrained original),
    PiSSA sources (their start counted twice), and an all-NaN search returned objective=inf with zero weights;
    a failed search also left a merged source unmerged."""
    from tests.conftest import tiny_bert_classifier

    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["query"]))
    batch = [{"input_ids": ids(vocab=64), "labels": torch.tensor([0, 1, 0])}]
    with pytest.raises(ConfigError, match=r"modules_to_save_from='c' is not one of the adapters combined"):
        lorahub(model, ["default", "b"], batch, modules_to_save_from="c")
    with pytest.raises(ConfigError, match=r"modules_to_save_from='c' has no trained copy of \['classifier'\]"):
        lorahub(model, ["default", "c"], batch, modules_to_save_from="c")
    model.add_adapter("p", LoraConfig(r=2, target_modules=["query"], init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match=r"adapter 'p' was created with init_lora_weights='pissa'"):
        lorahub(model, ["c", "p"], batch)
    model.merge_adapter(["default"])
    with pytest.raises(ConfigError, match=r"every candidate's loss was NaN or infinite \(7 evaluated\)"):
        lorahub(model, ["default", "b"], batch, modules_to_save_from="b", steps=2, population=3,
                loss_fn=lambda m, b: torch.tensor(float("nan")))
    assert list(model.peft_config) == ["default", "b", "c", "p"]
    assert model.active_adapters == ["default"] and model.base_model.merged_adapters() == ["default"]


def test_batches_without_labels_are_refused_before_merged_weights_are_touched():
    model = upstream()
    model.merge_adapter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"batch\(es\) \[1\] hold no labels"):
        lorahub(model, ["default", "b"], [{"input_ids": ids(), "labels": ids()}, {"input_ids": ids()}])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit for bit: nothing unmerged
    assert model.base_model.merged_adapters() == ["default"]
