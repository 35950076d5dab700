"""`peftkit merge` and `peftkit export --merge` on saved adapters."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.cli import main
from tests.conftest import ids, perturb, tiny_gpt2


def run(*argv):
    return main([str(a) for a in argv])


def train(model_dir, out, seed, *extra):
    assert run("train", "--model", model_dir, "--max-steps", 4, "--max-train-samples", 64, "--max-eval-samples", 32,
               "--seed", seed, "--lr", 0.05, "--target-modules", "query,value", "--output-dir", out,
               "--no-progress", *extra) == 0


def test_merge_two_runs_with_cat_is_exact_and_evaluable(tiny_model_dir, tmp_path, capsys):
    train(tiny_model_dir, tmp_path / "r1", 1)
    train(tiny_model_dir, tmp_path / "r2", 2)
    assert run("merge", tmp_path / "r1", tmp_path / "r2", "--weights", 0.75, -0.5, "--output", tmp_path / "m") == 0
    files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("r1", "r2", "m")]
    scales = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("r1", "r2", "m")]
    key = "base_model.model.bert.encoder.layer.1.attention.self.value"
    delta = [f[f"{key}.lora_B.weight"] @ f[f"{key}.lora_A.weight"] * c["lora_alpha"] / c["r"]
             for f, c in zip(files, scales)]
    assert scales[2]["r"] == 16
    assert (delta[2] - (0.75 * delta[0] - 0.5 * delta[1])).abs().max() <= 1e-5
    # the head comes from the first adapter
    assert torch.equal(files[2]["base_model.model.classifier.weight"], files[0]["base_model.model.classifier.weight"])
    capsys.readouterr()
    assert run("eval", "--adapter", tmp_path / "m") == 0
    assert "dev_accuracy" in capsys.readouterr().out


def test_merge_argument_errors(tiny_model_dir, tmp_path, capsys):
    train(tiny_model_dir, tmp_path / "r1", 1)
    assert run("merge", tmp_path / "r1", "--output", tmp_path / "m") == 2
    assert "at least two adapters" in capsys.readouterr().err
    assert run("merge", tmp_path / "r1", tmp_path / "r1", "--weights", 1, "--output", tmp_path / "m") == 2
    assert "2 adapters and 1 weights" in capsys.readouterr().err
    # adapters for another task type (another head): refused in either order (one order was merged, exit 0)
    lm = tmp_path / "lm"
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    model.save_pretrained(lm)
    for pair in ((tmp_path / "r1", lm), (lm, tmp_path / "r1")):
        assert run("merge", *pair, "--output", tmp_path / "m") == 2
        assert "the adapters were trained for different task types" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert run("merge", tmp_path / "r1", tmp_path / "r1", "--combination", "avg", "--output", tmp_path / "m") == 2
    assert "--combination 'avg' is not valid; expected one of cat, " in capsys.readouterr().err
    # an option the combination would ignore is refused, naming the combinations it applies to
    pair = (tmp_path / "r1", tmp_path / "r1", "--output", tmp_path / "m")
    assert run("merge", *pair, "--density", 0.5) == 2
    assert capsys.readouterr().err.strip() == (
        "peftkit: error: --density 0.5 has no effect with --combination cat; it applies to ties_svd, dare_linear_svd, "
        "dare_ties_svd, magnitude_prune_svd, ties, dare_linear, dare_ties, magnitude_prune")
    assert run("merge", *pair, "--combination", "ties", "--density", 0.5, "--svd-rank", 4) == 2
    assert capsys.readouterr().err.strip() == (
        "peftkit: error: --svd-rank 4 has no effect with --combination ties; it applies to svd, ties_svd, "
        "dare_linear_svd, dare_ties_svd, magnitude_prune_svd")
    assert run("merge", *pair, "--combination", "linear", "--seed", 3) == 2
    assert "--seed 3 has no effect with --combination linear; it applies to dare_linear_svd, dare_ties_svd, " \
           "dare_linear, dare_ties" in capsys.readouterr().err
    assert run("merge", *pair, "--combination", "dare_linear", "--density", 0.5, "--majority-sign", "frequency") == 2
    assert "--majority-sign frequency has no effect with --combination dare_linear" in capsys.readouterr().err
    assert run("merge", *pair, "--combination", "ties_svd") == 2
    assert capsys.readouterr().err.strip() == (
        "peftkit: error: --combination ties_svd needs --density, the fraction of each delta to keep, in (0, 1]")
    assert not (tmp_path / "m" / "adapter_model.safetensors").exists()
    # a file where the adapter folder belongs (its weights file): said to be a file, with the folder to give
    weights_file = next((tmp_path / "r1").rglob("adapter_model.safetensors"))
    assert run("export", "--adapter", weights_file, "--merge", "--output", tmp_path / "e") == 2
    assert capsys.readouterr().err.strip() == (
        f"peftkit: error: {str(weights_file)!r} is a file; give the adapter folder that holds adapter_config.json and "
        f"adapter_model.safetensors ({str(weights_file.parent)!r}?)")
    assert run("merge", weights_file, tmp_path / "r1", "--output", tmp_path / "m") == 2
    assert f"{str(weights_file)!r} is a file" in capsys.readouterr().err
    if os.path.isdir("/proc"):  # no folder can be made there, not even by root: refused up front, naming --output
        assert run("merge", *pair[:2], "--output", "/proc/peftkit-m") == 2
        assert "--output '/proc/peftkit-m' cannot be written: no folder can be made in '/proc'" in capsys.readouterr().err
        assert run("export", "--adapter", tmp_path / "r1", "--merge", "--output", "/proc/peftkit-e/x") == 2
        assert "--output '/proc/peftkit-e/x' cannot be written" in capsys.readouterr().err
    assert run("merge", *pair, "--combination", "dare_ties", "--density", 0.5, "--seed", 3,
               "--majority-sign", "frequency") == 0


def test_export_merge_gives_a_plain_transformers_model(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    train(tiny_model_dir, tmp_path / "r1", 3)
    assert run("export", "--adapter", tmp_path / "r1", "--merge", "--output", tmp_path / "exp") == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exp").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, tmp_path / "r1").eval()
    x = torch.randint(1000, 5000, (3, 9))
    with torch.no_grad():
        assert (plain(input_ids=x).logits - adapted(input_ids=x).logits).abs().max() <= 1e-5
    assert (tmp_path / "exp" / "tokenizer.json").exists()
    assert plain.config.id2label == {0: "negative", 1: "positive"}  # the task's class names travel along
    capsys.readouterr()
    assert run("export", "--adapter", tmp_path / "r1", "--merge", "--output", tmp_path / "exp") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run("export", "--adapter", tmp_path / "r1", "--output", tmp_path / "exp2") == 2


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_export_of_a_quantised_run_writes_float_weights(tiny_model_dir, tmp_path, method):
    """The exported model holds the weights the adapted QLoRA model computes with, under transformers' own
    names (before, it held the quantised buffers, and transformers initialised every weight at random)."""
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from peftkit.artifacts import load_base_for

    train(tiny_model_dir, tmp_path / "r1", 3, "--quantize", method)
    assert run("export", "--adapter", tmp_path / "r1", "--merge", "--output", tmp_path / "exp") == 0
    with safe_open(tmp_path / "exp" / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    query = "bert.encoder.layer.0.attention.self.query"
    assert f"{query}.weight" in keys and not [k for k in keys if k.startswith(query) and not k.endswith(
        (".weight", ".bias"))]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exp").eval()
    base, _ = load_base_for(tmp_path / "r1")
    adapted = PeftModel.from_pretrained(base, tmp_path / "r1").eval()
    x = torch.randint(1000, 5000, (3, 9))
    with torch.no_grad():
        expected = adapted(input_ids=x).logits
        assert (plain(input_ids=x).logits - expected).abs().max() <= 1e-5
        with adapted.disable_adapter():  # the adapter changes the outputs, so the comparison above means something
            assert (adapted(input_ids=x).logits - expected).abs().max() > 1e-4


def _export_plain_adapter_folder(tmp_path, base, config):
    """Save ``base`` and a perturbed ``config`` adapter of it as plain folders, export them merged to
    ``tmp_path / "exp"``; returns ``(adapted model, input, its logits)``."""
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, config)
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    assert run("export", "--adapter", tmp_path / "adapter", "--model", tmp_path / "base", "--merge",
               "--output", tmp_path / "exp") == 0
    return model, x, expected


def test_export_untied_embedding_of_a_plain_adapter_folder(tmp_path):
    from transformers import GPT2LMHeadModel

    _, x, expected = _export_plain_adapter_folder(
        tmp_path, tiny_gpt2(), LoraConfig(r=2, target_modules=["wte", "c_attn"], task_type="CAUSAL_LM"))
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "exp").eval()
    with torch.no_grad():
        assert (plain(input_ids=x).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("task_type", ["TOKEN_CLS", "QUESTION_ANS"])
def test_export_of_token_and_qa_adapters_loads_the_task_model(task_type, tmp_path):
    """The base is loaded with the task's head class (AutoModel lacked the head, so the saved head copy had
    nowhere to go)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification, BertConfig

    auto = AutoModelForTokenClassification if task_type == "TOKEN_CLS" else AutoModelForQuestionAnswering
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=5 if task_type == "TOKEN_CLS" else 2)
    base = auto.from_config(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], task_type=task_type))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    x = ids()
    field = "logits" if task_type == "TOKEN_CLS" else "start_logits"
    with torch.no_grad():
        expected = getattr(model(input_ids=x), field)
    assert run("export", "--adapter", tmp_path / "adapter", "--model", tmp_path / "base", "--merge",
               "--output", tmp_path / "exp") == 0
    plain = auto.from_pretrained(tmp_path / "exp").eval()
    with torch.no_grad():
        assert (getattr(plain(input_ids=x), field) - expected).abs().max() <= 1e-5


def test_export_refuses_non_finite_weights(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    train(tiny_model_dir, tmp_path / "r1", 3)
    path = tmp_path / "r1" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path)
    assert run("export", "--adapter", tmp_path / "r1", "--merge", "--output", tmp_path / "exp") == 2
    err = capsys.readouterr().err
    assert "non-finite weights on layer" in err and "ValueError" not in err
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("kind", ["ssf", "lora_bias"])
def test_a_merge_that_gives_a_llama_layer_a_bias_exports_and_saves_whole(kind, tmp_path):
    """SSF and LoRA's lora_bias give bias-free Llama layers a bias when merged: the config now declares it
    (attention_bias / mlp_bias, the other covered layers get a zero bias). transformers dropped the biases on
    load before, and the exported model differed from the adapted one by up to 4.4."""
    from transformers import AutoModelForCausalLM

    from peftkit import SSFConfig
    from tests.conftest import tiny_llama

    config = (SSFConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if kind == "ssf"
              else LoraConfig(r=2, target_modules=["q_proj", "down_proj"], lora_bias=True, task_type="CAUSAL_LM"))
    model, x, expected = _export_plain_adapter_folder(tmp_path, tiny_llama(), config)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    assert (exported.config.attention_bias, exported.config.mlp_bias) == (True, kind == "lora_bias")
    plain = model.merge_and_unload()  # in Python too: saved and loaded back whole
    plain.save_pretrained(tmp_path / "py")
    with torch.no_grad():
        assert (exported(input_ids=x).logits - expected).abs().max() <= 1e-5
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "py").eval()(input_ids=x).logits
        assert (again - expected).abs().max() <= 1e-5
    assert torch.count_nonzero(exported.model.layers[0].self_attn.k_proj.bias) == 0  # covered by the flag only


def test_opt_declares_merged_biases_with_enable_bias(tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    from peftkit import SSFConfig

    torch.manual_seed(0)
    base = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                    vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=16,
                                    enable_bias=False)).eval()
    model = get_peft_model(base, SSFConfig(target_modules=["q_proj", "fc2"]))
    perturb(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    plain = model.merge_and_unload()
    assert plain.config.enable_bias is True
    plain.save_pretrained(tmp_path)
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=x).logits - expected).abs().max() <= 1e-5


def test_export_and_merge_of_adapters_saved_without_a_task_type(tmp_path, capsys):
    """peft's default task_type=None: the base was loaded as AutoModel (a LlamaModel), which the file's keys
    (base_model.model.model.layers...) did not fit; it is now loaded as the class the base folder was saved as."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                               LoraConfig(r=2, target_modules=["q_proj"]))
        model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
        perturb(model)
        model.save_pretrained(tmp_path / name)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    assert run("export", "--adapter", tmp_path / "b", "--merge", "--output", tmp_path / "exp") == 0
    with torch.no_grad():
        assert (LlamaForCausalLM.from_pretrained(tmp_path / "exp")(input_ids=x).logits - expected).abs().max() <= 1e-5
    assert run("merge", tmp_path / "a", tmp_path / "b", "--output", tmp_path / "merged") == 0


def test_export_of_a_no_task_adapter_made_on_another_head_class_says_why_and_how(tmp_path, capsys):
    """An adapter made on LlamaForSequenceClassification without a task_type: the base folder loads as the
    LlamaForCausalLM it was saved as, and the error only said modules_to_save matched nothing; setting the
    task_type it names makes the export work."""
    import json

    from transformers import LlamaForSequenceClassification

    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    cls = LlamaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    cls.config.pad_token_id = 0
    model = get_peft_model(cls, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"]))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    perturb(model)
    model.save_pretrained(tmp_path / "ad")
    assert run("export", "--adapter", tmp_path / "ad", "--merge", "--output", tmp_path / "exp") == 2
    err = capsys.readouterr().err
    assert "(LlamaForCausalLM), which has no module 'score'" in err and 'Set "task_type"' in err
    assert not (tmp_path / "exp").exists()
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    assert run("export", "--adapter", tmp_path / "ad", "--merge", "--output", tmp_path / "exp") == 0
    x = ids()
    with torch.no_grad():
        want = model.eval()(input_ids=x).logits
        got = LlamaForSequenceClassification.from_pretrained(tmp_path / "exp").eval()(input_ids=x).logits
    assert (got - want).abs().max() <= 1e-5


def test_merge_refuses_adapters_of_different_base_models(tmp_path, capsys):
    """Two bases of one shape but different weights: the merge went through silently, naming only the first."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama

    for seed, name in ((0, "base_a"), (1, "base_b")):
        torch.manual_seed(seed)
        tiny_llama().save_pretrained(tmp_path / name)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / name),
                               LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        model.peft_config["default"].base_model_name_or_path = str(tmp_path / name)
        model.save_pretrained(tmp_path / f"on_{name}")
    assert run("merge", tmp_path / "on_base_a", tmp_path / "on_base_b", "--output", tmp_path / "out") == 2
    assert "the adapters name different base models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run("merge", tmp_path / "on_base_a", tmp_path / "on_base_b", "--model", tmp_path / "base_a",
               "--output", tmp_path / "out") == 0


def test_merge_of_ia3_adapters_sums_their_vectors_and_mixed_kinds_are_refused(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from peftkit import IA3Config
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base")
    for seed, name, config in ((1, "a", IA3Config(task_type="CAUSAL_LM")), (2, "b", IA3Config(task_type="CAUSAL_LM")),
                               (3, "lora", LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), config)
        model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
        perturb(model)
        model.save_pretrained(tmp_path / name)
    assert run("merge", tmp_path / "a", tmp_path / "b", "--weights", 0.25, 0.75, "--output", tmp_path / "m") == 0
    assert "(linear, weights [0.25, 0.75])" in capsys.readouterr().out
    a, b, m = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b", "m"))
    assert set(m) == set(a) == set(b)
    for key in m:
        torch.testing.assert_close(m[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert run("merge", tmp_path / "a", tmp_path / "lora", "--output", tmp_path / "mixed") == 2
    assert "the adapters are of different types" in capsys.readouterr().err
    assert run("merge", tmp_path / "a", tmp_path / "b", "--combination", "cat", "--output", tmp_path / "cat") == 2
    assert "(IA)^3 adapters combine only linearly" in capsys.readouterr().err
    assert run("merge", tmp_path / "a", tmp_path / "b", "--density", 0.5, "--output", tmp_path / "d") == 2
    assert "--density 0.5 has no effect with --combination cat" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("mixed", "cat", "d"))


def test_merge_option_errors_name_the_flags(tmp_path, capsys):
    for extra, message in ((("--heads-from", 5), "--heads-from 5 is not valid: it indexes the 2 adapter folders given, "
                                                 "0 to 1"),
                           (("--heads-from", -1), "--heads-from -1 is not valid"),
                           (("--combination", "ties", "--density", 1.5), "--density 1.5 is not valid; it is the kept "
                                                                         "fraction of each delta, a number in (0, 1]")):
        assert run("merge", tmp_path / "a", tmp_path / "b", *extra, "--output", tmp_path / "m") == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_adapter_config_without_peft_type_names_the_file(tmp_path):
    from peftkit import ConfigError, PeftConfig

    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(ConfigError, match=r"adapter_config.json has no 'peft_type' field"):
        PeftConfig.from_pretrained(tmp_path)
