"""The quantisation family by name: `--method qlora|loftq|qalora` set up LoRA on a quantised base."""

from __future__ import annotations

import json

import pytest

from peftkit import get_method
from peftkit.cli import main


@pytest.fixture(scope="module")
def bert64_dir(tmp_path_factory):
    """A tiny BERT whose widths (64, 128) fit int4's 64-column groups."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit.train.run import default_model_dir

    folder = tmp_path_factory.mktemp("bert64")
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method, quantize, fields", [
    ("qlora", "nf4", {}),
    ("loftq", None, {"init_lora_weights": "loftq"}),
    ("qalora", "int4", {"use_qalora": True}),
])
def test_quantisation_methods_train_from_the_cli(method, quantize, fields, bert64_dir, tmp_path):
    out = tmp_path / method
    assert main(["train", "--model", bert64_dir, "--method", method, "--max-steps", "2", "--max-train-samples",
                 "16", "--max-eval-samples", "8", "--output-dir", str(out), "--no-progress"]) == 0
    run = json.loads((out / "run_config.json").read_text())
    saved = json.loads((out / "adapter_config.json").read_text())
    assert run["quantize"] == quantize and saved["peft_type"] == "LORA"
    assert all(saved[k] == v for k, v in fields.items())
    assert get_method(method).family == "quantisation"
    assert main(["eval", "--adapter", str(out)]) == 0
