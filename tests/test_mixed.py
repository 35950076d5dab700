"""Mixed-adapter batches: every row equals that row run alone with its adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from peftkit import ConfigError, LoraConfig, get_peft_model
from tests.conftest import ids, perturb, tiny_bert_classifier, tiny_llama


def llama_with_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj",
                                                                                        "embed_tokens"]))
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules="all-linear"))
    model.add_adapter("c", LoraConfig(r=3, lora_alpha=6, target_modules=["down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters." in n:
                p.add_(torch.randn_like(p) * 0.3)
    return model


ROWS = ["b", "default", "__base__", "c", "b", "default"]


def test_each_row_equals_running_it_alone():
    model = llama_with_adapters()
    x = ids(batch=len(ROWS), seq=6)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=ROWS).logits
        for i, name in enumerate(ROWS):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=x[i:i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=x[i:i + 1]).logits
            assert (mixed[i] - alone[0]).abs().max() <= 1e-6, (i, name)


def test_mixed_heads_per_row():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["value"], task_type="SEQ_CLS"))
    perturb(model)
    model.set_adapter("other")
    perturb(model)
    rows = ["other", "default", "other", "__base__"]
    x = ids(batch=4)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=rows).logits
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=x[i:i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=x[i:i + 1]).logits
            assert (mixed[i] - alone[0]).abs().max() <= 1e-6


def test_generate_with_adapter_names_and_beams():
    model = llama_with_adapters()
    x = ids(batch=3, seq=5)
    rows = ["c", "b", "__base__"]
    with torch.no_grad():
        out = model.generate(input_ids=x, adapter_names=rows, max_new_tokens=4, do_sample=False, num_beams=2,
                             pad_token_id=2)
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=x[i:i + 1], max_new_tokens=4, do_sample=False, num_beams=2,
                                           pad_token_id=2)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=x[i:i + 1], max_new_tokens=4, do_sample=False, num_beams=2,
                                       pad_token_id=2)
            assert torch.equal(out[i], alone[0]), (i, name)


def test_unknown_name_and_wrong_length():
    model = llama_with_adapters()
    with pytest.raises(ConfigError, match=r"unknown adapter name\(s\) \['nope'\]; this model has \['default', 'b', "
                                          r"'c'\] \(and '__base__' for rows without an adapter\)"):
        model(input_ids=ids(batch=2), adapter_names=["b", "nope"])
    with pytest.raises(ConfigError, match=r"unknown adapter name\(s\) \['nope', 'bb'\]; this model"):  # each once
        model(input_ids=ids(batch=4), adapter_names=["nope", "bb", "nope", "nope"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows; give one adapter name"):
        model(input_ids=ids(batch=2), adapter_names=["b", "c", "b"])
    with pytest.raises(ValueError, match="adapter_names has 1 entry but the batch has 2 rows"):
        model(input_ids=ids(batch=2), adapter_names=["b"])
    with pytest.raises(ValueError, match=r"adapter_names is one string \('b'\), one row's name, but the batch has 2"):
        model(input_ids=ids(batch=2), adapter_names="b")
    with pytest.raises(ValueError, match="adapter_names is empty"):
        model(ids(batch=2), adapter_names=[])
    assert model.base_model.ctx.row_names is None  # state restored after the error


def test_lora_linear_layers_take_the_batched_path(monkeypatch):
    from peftkit.layers import AdaptedLayer

    calls = []
    original = AdaptedLayer._per_group

    def spy(self, own, x, y):
        calls.append(type(own[0][0]).__name__)
        return original(self, own, x, y)

    monkeypatch.setattr(AdaptedLayer, "_per_group", spy)
    model = llama_with_adapters()
    with torch.no_grad():
        model(input_ids=ids(batch=len(ROWS), seq=6), adapter_names=ROWS)
    assert calls == ["LoraEmbedding"]  # only the embedding, which has no batched path, went row by row


def test_mixed_batch_gradients_equal_each_group_run_alone():
    """Training through a mixed batch: each adapter's gradient is the one its own rows give alone."""
    model = llama_with_adapters()
    for n, p in model.named_parameters():
        p.requires_grad_("adapters." in n)
    x = ids(batch=len(ROWS), seq=6)
    model(input_ids=x, adapter_names=ROWS).logits.square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert {n.split("adapters.")[1].split(".")[0] for n in mixed} == {"default", "b", "c"}
    alone = {n: torch.zeros_like(g) for n, g in mixed.items()}
    for i, name in enumerate(ROWS):
        model.zero_grad()
        if name == "__base__":
            continue
        model.set_adapter(name)
        for n, p in model.named_parameters():
            p.requires_grad_("adapters." in n)
        model(input_ids=x[i:i + 1]).logits.square().sum().backward()
        for n, p in model.named_parameters():
            if p.grad is not None and n in alone:
                alone[n] += p.grad
    for n in mixed:
        assert torch.allclose(mixed[n], alone[n], atol=1e-5, rtol=1e-4), n


def _rows_alone(model, x, rows, **kw):
    out = []
    for i, name in enumerate(rows):
        row = {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[0] == x.shape[0] else v) for k, v in kw.items()}
        if name == "__base__":
            with model.disable_adapter():
                out.append(model(input_ids=x[i:i + 1], **row).logits)
        else:
            model.set_adapter(name)
            out.append(model(input_ids=x[i:i + 1], **row).logits)
    return torch.cat(out)


def _two_adapters(base, targets, modules_to_save):
    model = get_peft_model(base, LoraConfig(r=2, target_modules=targets, modules_to_save=modules_to_save),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=targets, modules_to_save=modules_to_save))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters." in n or "modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("make, targets, saved", [
    (tiny_bert_classifier, ["query"], ["position_embeddings"]),  # called with one row of position ids for all rows
    (tiny_bert_classifier, ["query"], ["encoder.layer.1"]),  # a block: mask split by rows with its input
    (tiny_llama, ["q_proj"], ["layers.0.self_attn"]),  # called with keyword arguments and rotary (cos, sin)
])
def test_modules_to_save_copies_in_mixed_batches(make, targets, saved):
    model = _two_adapters(make(), targets, saved)
    rows = ["a", "b", "__base__", "b"]
    x = ids(batch=4, seq=6)
    mask = torch.ones_like(x)
    mask[0, 4:] = 0  # one padded row
    kw = {"attention_mask": mask} if make is tiny_bert_classifier else {"use_cache": False}
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=rows, **kw).logits
        alone = _rows_alone(model, x, rows, **kw)
    assert (mixed - alone).abs().max() <= 1e-6


def test_modules_to_save_block_with_a_cache_is_a_clear_error():
    model = _two_adapters(tiny_llama(), ["q_proj"], ["layers.1"])
    with pytest.raises(ValueError, match="got a DynamicCache argument, which cannot be split by rows"):
        model(input_ids=ids(batch=2, seq=5), adapter_names=["a", "b"], use_cache=True)
    assert model.base_model.ctx.row_names is None


def test_batch_rows_come_from_the_main_input_not_a_shared_one():
    model = _two_adapters(tiny_llama(), ["q_proj"], None)
    x = ids(batch=3, seq=6)
    with torch.no_grad():
        out = model(position_ids=torch.arange(6)[None], input_ids=x, adapter_names=["a", "b", "a"]).logits
    assert out.shape[0] == 3


def test_gated_adapters_are_refused_before_the_forward():
    from peftkit import GatedLoraConfig

    # a gated method adapts encoders only (a model that generates text is refused)
    model = get_peft_model(tiny_bert_classifier(), GatedLoraConfig(r=2, target_modules=["query"]), adapter_name="g")
    with pytest.raises(ValueError, match=r"adapter\(s\) \['g'\] use gates that pool each row over its tokens"):
        model(input_ids=ids(batch=2), adapter_names=["g", "__base__"])


def _record_spans(monkeypatch):
    from peftkit.methods.lora import LoraLinear

    seen = []
    original = LoraLinear.mixed_forward

    def spy(layer, x, y, parts, spans=None):
        seen.append(spans)
        return original(layer, x, y, parts, spans)

    monkeypatch.setattr(LoraLinear, "mixed_forward", staticmethod(spy))
    return seen


def test_scattered_rows_run_grouped_and_every_output_comes_back_in_order(monkeypatch):
    """Rows of one adapter scattered over the batch run as contiguous runs inside the model; the logits,
    hidden states and the returned cache are each row's own, in the caller's order."""
    seen = _record_spans(monkeypatch)
    model = llama_with_adapters()
    x = ids(batch=len(ROWS), seq=6)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=ROWS, use_cache=True, output_hidden_states=True)
        assert seen and all(s is not None for s in seen)  # every LoRA layer got contiguous runs
        for i, name in enumerate(ROWS):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=x[i:i + 1], use_cache=True, output_hidden_states=True)
            else:
                model.set_adapter(name)
                alone = model(input_ids=x[i:i + 1], use_cache=True, output_hidden_states=True)
            assert (mixed.logits[i] - alone.logits[0]).abs().max() <= 1e-6, (i, name)
            for h_mixed, h_alone in zip(mixed.hidden_states, alone.hidden_states):
                assert torch.allclose(h_mixed[i], h_alone[0], atol=1e-5, rtol=1e-5)
            for layer in range(2):
                k_mixed, k_alone = mixed.past_key_values.layers[layer].keys, alone.past_key_values.layers[layer].keys
                assert torch.allclose(k_mixed[i], k_alone[0], atol=1e-5, rtol=1e-5), (i, layer)


def test_equal_groups_of_one_rank_run_as_one_batched_gemm(monkeypatch):
    calls = []
    original = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = _two_adapters(tiny_llama(), ["q_proj", "v_proj", "down_proj"], None)
    rows = ["a", "b", "b", "a", "b", "a"]
    x = ids(batch=6, seq=5)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=rows).logits
        assert len(calls) == 3 * 2  # one bmm per adapted linear of the two layers
        assert torch.allclose(mixed, _rows_alone(model, x, rows), atol=1e-6, rtol=0)


def test_row_order_paths_agree(monkeypatch):
    """The grouped path (rows reordered), the gather path (a cache given: rows keep their order) and
    rows already grouped by the caller give the same outputs."""
    from transformers import DynamicCache

    seen = _record_spans(monkeypatch)
    model = llama_with_adapters()
    x = ids(batch=len(ROWS), seq=6)
    with torch.no_grad():
        grouped = model(input_ids=x, adapter_names=ROWS).logits
        gathered = model(input_ids=x, adapter_names=ROWS, cache=DynamicCache()).logits
        assert seen[-1] is None  # the cache kept the rows in place: gather/scatter path
        order = sorted(range(len(ROWS)), key=lambda i: "b default __base__ c".split().index(ROWS[i]))
        pre = model(input_ids=x[order], adapter_names=[ROWS[i] for i in order]).logits
    assert (grouped - gathered).abs().max() <= 1e-6
    assert (grouped[order] - pre).abs().max() <= 1e-6


def test_shared_inputs_keep_their_order_when_rows_are_regrouped():
    """A ``cache_position`` of length seq is shared by all rows even when seq equals the batch size."""
    model = _two_adapters(tiny_llama(), ["q_proj"], None)
    rows = ["a", "b", "a", "b"]
    x = ids(batch=4, seq=4)
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=rows, cache_position=torch.arange(4)).logits
        assert torch.allclose(out, _rows_alone(model, x, rows, cache_position=torch.arange(4)), atol=1e-6, rtol=0)


def test_labels_are_regrouped_with_their_rows():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["value"], task_type="SEQ_CLS"))
    perturb(model)
    x, labels = ids(batch=5), torch.tensor([0, 1, 1, 0, 1])
    rows = ["other", "default", "other", "__base__", "default"]
    with torch.no_grad():
        out = model(input_ids=x, labels=labels, adapter_names=rows)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item(), abs=1e-6)


def test_context_spans():
    from peftkit.layers import AdapterContext

    ctx = AdapterContext()
    ctx.set_rows(["a", "a", "b"])
    assert ctx.spans(6) == {"a": slice(0, 4), "b": slice(4, 6)}  # two copies of each row (beams)
    assert ctx.spans(3) == {"a": slice(0, 2), "b": slice(2, 3)}
    ctx.set_rows(["a", "b", "a"])
    assert ctx.spans(3) is None


def test_regrouped_logits_are_never_copied():
    """The LM head gets its input in the caller's order, so the vocabulary-sized logits come out in it:
    no row reorder may touch a tensor with the vocabulary as its last dimension."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reorders(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.index_select.default, torch.ops.aten.index.Tensor):
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    model = llama_with_adapters()
    x = ids(batch=len(ROWS), seq=6)
    with torch.no_grad(), Reorders() as seen:
        out = model(input_ids=x, adapter_names=ROWS)
    vocab = model.config.vocab_size
    assert out.logits.shape == (len(ROWS), 6, vocab)
    assert (len(ROWS), 6, 16) in seen.shapes  # the head's input was reordered ...
    assert [s for s in seen.shapes if s[-1] == vocab] == []  # ... and the logits were not


def test_lm_labels_and_tuple_outputs_with_regrouped_rows():
    """With labels (the loss meets the logits inside the model) and with tuple outputs the regrouped rows
    give the same loss and logits as the caller's own grouping."""
    model = llama_with_adapters()
    x = ids(batch=len(ROWS), seq=6)
    order = sorted(range(len(ROWS)), key=lambda i: "b default __base__ c".split().index(ROWS[i]))
    with torch.no_grad():
        scattered = model(input_ids=x, labels=x, adapter_names=ROWS)
        grouped = model(input_ids=x[order], labels=x[order], adapter_names=[ROWS[i] for i in order])
        as_tuple = model(input_ids=x, adapter_names=ROWS, return_dict=False)
    assert scattered.loss.item() == pytest.approx(grouped.loss.item(), abs=1e-6)
    assert (scattered.logits[order] - grouped.logits).abs().max() <= 1e-6
    assert (as_tuple[0] - scattered.logits).abs().max() <= 1e-6


@pytest.mark.parametrize("rows", [["a", "a", "b", "__base__"], ["a", "b", "a", "__base__"], ["a", "a", "b", "c"]])
def test_groups_that_do_not_cover_the_batch_evenly_stay_apart(rows):
    """Two equal-rank groups of sizes 2 and 1 next to rows of no adapter (or of one not on the layer)
    must not be cut into two halves by the batched path."""
    model = _two_adapters(tiny_llama(), ["q_proj", "v_proj"], None)
    model.add_adapter("c", LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    x = ids(batch=4, seq=5)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x, adapter_names=rows).logits, _rows_alone(model, x, rows),
                              atol=1e-6, rtol=0)


def test_positional_labels_give_the_loss_of_keyword_labels():
    model = llama_with_adapters()
    x = ids(batch=len(ROWS), seq=6)
    with torch.no_grad():
        by_name = model(input_ids=x, labels=x, adapter_names=ROWS).loss
        by_position = model(x, None, None, None, None, x, adapter_names=ROWS).loss
    assert by_position.item() == pytest.approx(by_name.item(), abs=1e-6)


def test_outputs_with_several_entries_per_row_come_back_in_order():
    """Multiple choice: hidden states have rows x choices entries, flattened row-major."""
    from transformers import BertConfig, BertForMultipleChoice

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    model = get_peft_model(BertForMultipleChoice(cfg).eval(), LoraConfig(r=2, target_modules=["query"],
                                                                        init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"], init_lora_weights=False))
    rows, x = ["default", "b", "default", "b"], torch.randint(3, 64, (4, 3, 5))
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=rows, output_hidden_states=True)
        for i, name in enumerate(rows):
            model.set_adapter(name)
            alone = model(input_ids=x[i:i + 1], output_hidden_states=True)
            assert torch.allclose(mixed.logits[i], alone.logits[0], atol=1e-6)
            assert mixed.hidden_states[-1].shape[0] == 12
            assert torch.allclose(mixed.hidden_states[-1][3 * i:3 * i + 3], alone.hidden_states[-1], atol=1e-5)


def test_a_head_output_that_is_no_output_field_still_comes_back_in_order():
    """BertForPreTraining's LM head is inside its output heads: the regrouped run falls back to
    reordering the outputs, with the same result as rows grouped by the caller."""
    from transformers import BertConfig, BertForPreTraining

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)
    model = _two_adapters(BertForPreTraining(cfg).eval(), ["query", "value"], None)
    rows, x = ["a", "b", "a", "b"], ids(batch=4, seq=5)
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=rows)
        grouped = model(input_ids=x[[0, 2, 1, 3]], adapter_names=["a", "a", "b", "b"])
    for key in ("prediction_logits", "seq_relationship_logits"):
        assert torch.allclose(mixed[key][[0, 2, 1, 3]], grouped[key], atol=1e-6), key


def test_adapter_names_must_be_strings():
    model = llama_with_adapters()
    with pytest.raises(ValueError, match=r"adapter_names holds \['x'\] \(list\); each entry must be an adapter name"):
        model(input_ids=ids(batch=2), adapter_names=["default", ["x"]])
    assert model.base_model.ctx.row_names is None
    with torch.no_grad():  # any iterable of names
        assert model(input_ids=ids(batch=2), adapter_names=(n for n in ["b", "default"])).logits.shape[0] == 2


def test_batched_path_with_a_different_scaling_per_adapter():
    model = _two_adapters(tiny_llama(), ["q_proj", "v_proj"], None)
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows, x = ["a", "c", "b", "c", "b", "a"], ids(batch=6, seq=5)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x, adapter_names=rows).logits, _rows_alone(model, x, rows),
                              atol=1e-6, rtol=0)


def test_modules_to_save_over_another_adapters_lora():
    """Adapter "a" has LoRA on the embedding and "b" (added later) trains its own copy of it: the copy's
    wrapper holds a's adapted layer, which must see only the rows of the group it runs."""
    from transformers import LlamaForCausalLM

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                    init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["embed_tokens", "lm_head"],
                                      init_lora_weights=False))
    with torch.no_grad():  # b's copies (with a's LoRA inside the embedding's copy) differ from the originals
        for n, p in model.named_parameters():
            if "modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.3)
    assert isinstance(model.get_base_model(), LlamaForCausalLM)
    x = ids(batch=5, seq=4)
    for rows in (["a", "b", "a", "__base__", "b"], ["b", "a", "a", "a", "a"]):
        with torch.no_grad():
            mixed = model(input_ids=x, adapter_names=rows).logits
        assert torch.allclose(mixed, _rows_alone(model, x, rows), atol=1e-5, rtol=0), rows


def test_gradient_checkpointing_is_refused_before_anything_runs():
    """The layers recomputed in backward() cannot see the rows' adapters: training a mixed batch with
    gradient checkpointing on raises (nothing set); without gradients (evaluation) it still runs."""
    model = llama_with_adapters()
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="adapter_names cannot be used with gradient checkpointing"):
        model(input_ids=ids(batch=len(ROWS)), adapter_names=ROWS, use_cache=False)
    assert model.base_model.ctx.row_names is None
    model.eval()
    model.get_base_model().model.layers.train()  # checkpointing is gated on the layers' own flag
    with pytest.raises(ValueError, match="adapter_names cannot be used with gradient checkpointing"):
        model(input_ids=ids(batch=len(ROWS)), adapter_names=ROWS, use_cache=False)
    model.train()
    with torch.no_grad():
        out = model(input_ids=ids(batch=len(ROWS)), adapter_names=ROWS, use_cache=False).logits
    model.eval()
    assert out.shape[0] == len(ROWS)
    model.get_base_model().activation_checkpointing_disable()
    model.train()
    model(input_ids=ids(batch=len(ROWS)), adapter_names=ROWS, use_cache=False).logits.sum().backward()


def test_a_copy_over_another_adapters_lora_saves_and_loads(tmp_path):
    """b's trained copy of the embedding (which carries a's LoRA) is saved as just the embedding, and a's
    LoRA under the module's own name: loading a, then b, onto a fresh base gives the same model."""
    from safetensors.torch import load_file

    from peftkit import PeftModel

    torch.manual_seed(0)
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["embed_tokens"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path)
    keys = {n: sorted(k for k in load_file(tmp_path / n / "adapter_model.safetensors") if "embed_tokens" in k)
            for n in ("a", "b")}
    # (a targets embed_tokens, but the input embedding is b's trained copy now: save_embedding_layers="auto" writes
    # no base matrix for a layer inside a copy, whose own tensor is the trained one)
    assert keys == {"a": ["base_model.model.model.embed_tokens.lora_embedding_A",
                          "base_model.model.model.embed_tokens.lora_embedding_B"],
                    "b": ["base_model.model.model.embed_tokens.weight"]}
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", "b")
    x, rows = ids(batch=4, seq=5), ["b", "a", "__base__", "b"]
    with torch.no_grad():
        for name in ("a", "b"):
            model.set_adapter(name)
            loaded.set_adapter(name)
            assert torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6), name
        assert torch.allclose(loaded(input_ids=x, adapter_names=rows).logits,
                              model(input_ids=x, adapter_names=rows).logits, atol=1e-6)


def test_a_custom_models_inputs_and_outputs_that_only_look_per_row_keep_their_order():
    """A custom model's per-class weights and a per-feature output may have as many entries as the batch has
    rows; the rows of a mixed batch must then not be reordered (they were: the class weights and the output
    came back permuted, so the loss was wrong)."""

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.h = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x, labels, class_weight):
            h = self.l(x)
            return {"loss": torch.nn.functional.cross_entropy(self.h(h), labels, weight=class_weight, reduction="sum"),
                    "feat_mean": h.mean(0)}

    torch.manual_seed(0)
    model = get_peft_model(Custom(), LoraConfig(r=2, target_modules=["l"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["l"], init_lora_weights=False))
    model.eval()
    x, y, w = torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 10.0, 100.0, 1000.0])
    names = ["a", "b", "a", "b"]
    with torch.no_grad():
        mixed = model(x, y, w, adapter_names=names)
        loss, feats = 0.0, []
        for i, name in enumerate(names):
            model.set_adapter(name)
            loss += model(x[i:i + 1], y[i:i + 1], w)["loss"].item()
            feats.append(model.get_base_model().l(x[i:i + 1]))
    assert mixed["loss"].item() == pytest.approx(loss, rel=1e-6)
    assert torch.allclose(mixed["feat_mean"], torch.cat(feats).mean(0), atol=1e-6)


def test_a_one_dimensional_position_ids_is_shared_when_rows_are_regrouped():
    """position_ids of shape (seq,) with seq equal to the batch size was reordered as if it held one entry per
    row, so the regrouped rows got other positions."""
    from tests.conftest import tiny_gpt2  # GPT-2 takes a 1-d position_ids (Llama's rotary wants (rows, seq))

    model = _two_adapters(tiny_gpt2(), ["c_attn"], None)
    rows = ["a", "b", "a", "b"]
    x = ids(batch=4, seq=4)
    with torch.no_grad():
        out = model(input_ids=x, adapter_names=rows, position_ids=torch.tensor([3, 1, 0, 2])).logits
        want = _rows_alone(model, x, rows, position_ids=torch.tensor([[3, 1, 0, 2]]))
    assert torch.allclose(out, want, atol=1e-6, rtol=0)


def test_a_batch_that_is_a_multiple_of_the_names_is_refused_outside_generate():
    """A custom model's input passed under its own keyword hid the batch size from the model-level check; the
    layers took 4 rows for 2 names as generate's repeated rows and ran rows 0-1 with 'a', 2-3 with 'b'."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1, self.lin = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.lin(self.lin1(x))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin1", "lin"], init_lora_weights=False),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False))
    model.eval()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but a layer saw 4 rows"):
        model(x=x, adapter_names=["a", "b"])
    out = model(x=x, adapter_names=["a", "b", "__base__", "a"])
    model.set_adapter("a")
    assert (out[[0, 3]] - model(x=x[[0, 3]])).abs().max() <= 1e-6
