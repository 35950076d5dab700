"""``peftkit train/eval/methods`` with the soft-prompt methods, on a tiny random BERT (MiniLM's tokenizer)."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main
from peftkit.train.run import RunConfig, default_model_dir

D, H, P = 16, 128, 20  # tiny model width, the CLI's encoder width, the CLI's virtual tokens
HEAD = D * 2 + 2  # the classifier, trained and saved with every SEQ_CLS adapter
EXPECTED = {
    "prompt-tuning": P * D,
    "p-tuning": P * D + (D * H + H) + (H * H + H) + (H * D + D),
    "prefix-tuning": P * D + (D * H + H) + (H * 2 * 2 * D + 2 * 2 * D),
    "p-tuning-v2": P * 2 * 2 * D,
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-prompts")
    cfg = BertConfig(vocab_size=30522, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", list(EXPECTED))
def test_train_and_eval_each_soft_prompt_method(method, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / method
    argv = ["train", "--method", method, "--model", tiny_model_dir, "--max-steps", "3", "--max-train-samples", "64",
            "--max-eval-samples", "32", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == EXPECTED[method] + HEAD
    assert json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == P
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_methods_lists_the_soft_prompt_methods(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    papers = {"prompt-tuning": "arXiv:2104.08691", "p-tuning": "arXiv:2103.10385",
              "prefix-tuning": "arXiv:2101.00190", "p-tuning-v2": "arXiv:2110.07602"}
    for name, paper in papers.items():
        line = next(line for line in lines if line.split()[0] == name)
        assert line.split()[1:3] == ["additive", "no"] and paper in line


def test_num_virtual_tokens_option_and_its_error(tiny_model_dir, tmp_path, capsys):
    argv = ["train", "--method", "prompt-tuning", "--model", tiny_model_dir, "--max-steps", "1", "--output-dir",
            str(tmp_path / "x"), "--no-progress", "--option"]
    assert main([*argv, "num_virtual_tokens=0"]) == 2
    assert "num_virtual_tokens=0 is not valid" in capsys.readouterr().err
    assert main([*argv, "num_virtual_tokens=4", "--max-train-samples", "16", "--max-eval-samples", "8"]) == 0
    assert json.loads((tmp_path / "x" / "metrics.json").read_text())["trainable_params"] == 4 * D + HEAD


def test_soft_prompts_train_at_their_own_default_learning_rate():
    assert RunConfig(method="prompt-tuning").learning_rate() == 1e-2
    assert RunConfig(method="p-tuning-v2").learning_rate() == 1e-2
    assert RunConfig(method="p-tuning").learning_rate() == 1e-3  # no default of its own: the trainer's
    # through the reparameterisation MLP, 5e-3 collapsed SST-2 to the majority class; 1e-3 trains
    assert RunConfig(method="prefix-tuning").learning_rate() == 1e-3
    assert RunConfig(method="gated-prefix").learning_rate() == 1e-3
    assert RunConfig(method="prompt-tuning", lr=0.5).learning_rate() == 0.5
    assert RunConfig(method="prompt-tuning", full_finetune=True).learning_rate() == 5e-5
