"""``peftkit train --method adalora|loha|lokr|krona|sora|oft`` on a tiny BERT: runs, saves, reloads identically."""

from __future__ import annotations

import json

import pytest

from peftkit.cli import main


@pytest.mark.parametrize("method, options", [
    ("adalora", []),
    ("loha", []),
    ("lokr", []),
    ("krona", ["--option", "scale=2"]),
    ("sora", ["--option", "sparse_lambda=0.5"]),   # large enough to prune ranks within 4 steps
    ("oft", ["--option", "coft=true", "--option", "eps=0.5"]),  # --r 4: 4 blocks of 4 on the hidden size 16
])
def test_train_and_eval_each_method(tiny_model_dir, tmp_path, capsys, method, options):
    out = tmp_path / method
    rank = [] if method == "krona" else ["--r", "4"]  # KronA's factors have no rank (--r is refused)
    argv = ["train", "--model", tiny_model_dir, "--method", method, "--max-steps", "4", *rank,
            "--max-train-samples", "64", "--max-eval-samples", "24", "--output-dir", str(out), "--no-progress",
            *options]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["trainable_params"] > 34  # more than the classifier head
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    if method == "sora":       # pruned ranks were dropped from the file
        assert min(config["rank_pattern"].values()) < 4
    if method == "oft":        # --r sets the block count, so the block size is derived
        assert (config["r"], config["oft_block_size"], config["coft"]) == (4, 0, True)
    if method == "adalora":    # the final mask: target_r = 4 per layer on average, out of init_r = 6
        masks = config["rank_pattern"].values()
        assert config["total_step"] == 4 and sum(map(sum, masks)) == 4 * len(masks)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_adalora_without_a_run_length_is_refused(tiny_model_dir, tmp_path, capsys):
    argv = ["train", "--model", tiny_model_dir, "--method", "adalora", "--epochs", "1", "--output-dir",
            str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == 2
    assert "give --max-steps N or --option total_step=N" in capsys.readouterr().err


def test_loha_refuses_lora_dropout(tiny_model_dir, tmp_path, capsys):
    argv = ["train", "--model", tiny_model_dir, "--method", "loha", "--lora-dropout", "0.1", "--max-steps", "1",
            "--output-dir", str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == 2
    assert "--option rank_dropout=P" in capsys.readouterr().err
