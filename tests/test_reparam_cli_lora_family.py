"""The command line with the reparameterised methods: every one trains, saves and re-evaluates."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main

CASES = {
    "dora": ("LORA", {"use_dora": True}),
    "pissa": ("LORA", {"init_lora_weights": "pissa"}),
    "vera": ("VERA", {"r": 256}),
    "lorafa": ("LORAFA", {}),
    "dylora": ("DYLORA", {}),
}


@pytest.mark.parametrize("method", list(CASES))
def test_train_and_eval_every_method(method, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / method
    assert main(["train", "--model", tiny_model_dir, "--method", method, "--max-steps", "3", "--max-train-samples",
                 "32", "--max-eval-samples", "16", "--output-dir", str(out), "--no-progress"]) == 0
    peft_type, fields = CASES[method]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type and all(saved[k] == v for k, v in fields.items())
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_dora_as_a_lora_option(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--option", "use_dora=true", "--option", "use_rslora=true",
                 "--max-steps", "2", "--max-train-samples", "16", "--max-eval-samples", "8", "--output-dir", str(out),
                 "--no-progress", "--target-modules", "query,value"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    # LoRA's r*(in+out) plus one magnitude per output, on 2 layers x 2 modules (16 -> 16), + classifier copy
    assert json.loads((out / "metrics.json").read_text())["trainable_params"] == 4 * (8 * 32 + 16) + 34


def test_bad_option_is_reported(tiny_model_dir, capsys):
    assert main(["train", "--model", tiny_model_dir, "--method", "dylora", "--option", "use_dora=true"]) == 2
    assert "use_dora=True is not supported by DyLoRA" in capsys.readouterr().err


def test_methods_lists_the_family(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in ("dora", "pissa", "olora", "vera", "lorafa", "dylora"):
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert "reparameterised" in line and " yes " in line and "arXiv:" in line
