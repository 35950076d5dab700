"""Every additive method from the command line: listed by ``peftkit methods`` and trainable with
``peftkit train --method NAME`` on SST-2 (a tiny random BERT with the real MiniLM tokenizer)."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main
from peftkit.train.run import default_model_dir

ADDITIVE = ["bottleneck", "houlsby", "pfeiffer", "parallel-adapter", "compacter", "compacter++", "adapterdrop",
            "ia3", "ssf"]
PAPERS = {"houlsby": "arXiv:1902.00751", "pfeiffer": "arXiv:2005.00247", "parallel-adapter": "arXiv:2110.04366",
          "compacter": "arXiv:2106.04647", "compacter++": "arXiv:2106.04647", "adapterdrop": "arXiv:2010.11918",
          "ia3": "arXiv:2205.05638", "ssf": "arXiv:2210.08823"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(folder)
    return str(folder)


def test_methods_lists_every_additive_method(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name in ADDITIVE:
        assert " additive " in lines[name]
        assert (" yes " in lines[name]) == (name in ("ia3", "ssf"))
        assert PAPERS.get(name, "arXiv:") in lines[name]


@pytest.mark.parametrize("method", ADDITIVE)
def test_train_each_method_on_sst2_and_reload(method, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--method", method, "--max-steps", "3", "--max-train-samples",
                 "64", "--max-eval-samples", "16", "--output-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["dev_examples"] == 16
    assert metrics["trainable_params"] > 66  # more than the classifier copy (32 * 2 + 2)
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_method_options_reach_the_config(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--method", "houlsby", "--option", "reduction_factor=8",
                 "--option", "non_linearity=\"gelu\"", "--max-steps", "1", "--max-train-samples", "8",
                 "--max-eval-samples", "8", "--output-dir", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["reduction_factor"] == 8 and saved["non_linearity"] == "gelu" and saved["peft_type"] == "HOULSBY"
    metrics = json.loads((out / "metrics.json").read_text())
    # 3 blocks x 2 sites x (2 d m + m + d) with d=32, m=4; plus the classifier copy
    assert metrics["trainable_params"] == 3 * 2 * (2 * 32 * 4 + 4 + 32) + 66
