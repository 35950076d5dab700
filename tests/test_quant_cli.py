"""`peftkit train --quantize`: a QLoRA run on a tiny BERT, its summary, reloading it, errors."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main
from peftkit.train.run import default_model_dir


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-quant")
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(folder)
    return str(folder)


def run(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_run_reports_base_memory_and_reloads(tiny_model_dir, tmp_path, capsys, method):
    out = tmp_path / "run"
    assert run("train", "--model", tiny_model_dir, "--quantize", method, "--max-steps", 4, "--max-train-samples", 64,
               "--max-eval-samples", 32, "--output-dir", out, "--no-progress") == 0
    text = capsys.readouterr().out
    line = next(s for s in text.splitlines() if "base weights" in s)
    assert f"{method} layers" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantized_weight_ratio"] < (0.2 if method == "nf4" else 0.3)
    assert metrics["base_weight_ratio"] < 1  # norms, biases and the head stay float32
    assert metrics["base_weight_bytes"] == round(metrics["base_weight_ratio"] * metrics["base_weight_float32_bytes"])
    assert json.loads((out / "run_config.json").read_text())["quantize"] == method
    assert run("eval", "--adapter", out) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_embeddings_are_quantised_unless_float_embeddings(tiny_model_dir, tmp_path):
    ratios = {}
    for flags in ([], ["--float-embeddings"]):
        out = tmp_path / ("float" if flags else "default")
        assert run("train", "--model", tiny_model_dir, "--quantize", "nf4", *flags, "--max-steps", 2,
                   "--max-train-samples", 32, "--max-eval-samples", 16, "--output-dir", out, "--no-progress") == 0
        ratios[out.name] = json.loads((out / "metrics.json").read_text())["base_weight_ratio"]
        assert json.loads((out / "run_config.json").read_text())["quantize_embeddings"] is not bool(flags)
        assert run("eval", "--adapter", out) == 0
    assert ratios["default"] < 0.35 < ratios["float"]


def test_quantize_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("train", "--quantize", "nf5")
    assert exit_info.value.code == 2 and "invalid choice: 'nf5'" in capsys.readouterr().err
    assert run("train", "--model", tiny_model_dir, "--quantize", "nf4", "--full-finetune", "--max-steps", 1,
               "--output-dir", tmp_path / "x", "--no-progress") == 2
    assert "cannot be combined with --full-finetune" in capsys.readouterr().err
    # a QA-LoRA run's quantisation groups are its qalora_group_size: the message named only group_size
    assert run("train", "--model", tiny_model_dir, "--method", "qalora", "--option", "qalora_group_size=48",
               "--max-steps", 1, "--output-dir", tmp_path / "q", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "quantisation groups are qalora_group_size=48" in err and "--option qalora_group_size=N" in err
    assert not (tmp_path / "q").exists()


def test_a_qalora_run_quantises_with_its_group_so_that_its_merge_stays_integer(tiny_model_dir, tmp_path):
    """``--method qalora`` quantises int4 with groups of ``qalora_group_size`` (16), not int4's default 64: with 64
    the merge could not fold into the zero points and fell back to float, silently. Eval and export read the
    group back from run_config.json."""
    import warnings

    from peftkit import PeftModel
    from peftkit.artifacts import load_base_for
    from peftkit.quant import QuantLinear, merge_and_unload_quantized

    out = tmp_path / "run"
    assert run("train", "--model", tiny_model_dir, "--method", "qalora", "--max-steps", 2, "--max-train-samples", 32,
               "--max-eval-samples", 16, "--output-dir", out, "--no-progress") == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["quantize"], saved["quant_group_size"]) == ("int4", 16)
    assert run("eval", "--adapter", out) == 0
    base, _ = load_base_for(out)
    layer = base.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantLinear) and layer.fmt.group_size == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to float
        plain = merge_and_unload_quantized(PeftModel.from_pretrained(base, out))
    merged = plain.bert.encoder.layer[0].attention.self.query
    assert isinstance(merged, QuantLinear) and merged.merged_weight is None


def test_resuming_a_qalora_run_saved_without_a_group_keeps_its_base(tiny_model_dir, tmp_path, monkeypatch):
    """A run folder written before ``quant_group_size`` existed was trained on int4's default group (64): resuming it
    must quantise that way again, not with the QA-LoRA group a new run uses (its checkpoint then did not fit)."""
    from peftkit.artifacts import load_base_for
    from tests.tiny_train import interrupt_training

    out = tmp_path / "run"
    interrupt_training(monkeypatch, after=2)
    import peftkit.quant

    original = peftkit.quant.quantize_base  # as the older version did: int4's default group
    monkeypatch.setattr(peftkit.quant, "quantize_base", lambda *a, **kw: original(*a, **{**kw, "group_size": None}))
    assert run("train", "--model", tiny_model_dir, "--method", "qalora", "--max-steps", 4, "--save-every", 2,
               "--max-train-samples", 32, "--max-eval-samples", 16, "--output-dir", out, "--no-progress") == 130
    monkeypatch.undo()
    saved = json.loads((out / "run_config.json").read_text())
    del saved["quant_group_size"]  # as an older version wrote it
    (out / "run_config.json").write_text(json.dumps(saved))
    assert run("train", "--resume", out, "--no-progress") == 0
    assert json.loads((out / "run_config.json").read_text()).get("quant_group_size") is None
    base, _ = load_base_for(out)
    assert base.bert.encoder.layer[0].attention.self.query.fmt.group_size == 64
