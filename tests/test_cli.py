"""The command line on a tiny random BERT (with the real MiniLM tokenizer): runs, run folders, errors."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest

from peftkit.cli import main


def run(*argv):
    return main([str(a) for a in argv])


def test_train_then_eval_reports_the_same_metrics(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--model", tiny_model_dir, "--max-steps", 6, "--max-train-samples", 96,
               "--max-eval-samples", 40, "--output-dir", out, "--no-progress", "--target-modules", "query,value") == 0
    text = capsys.readouterr().out
    assert "dev accuracy" in text and "trainable" in text and str(out) in text
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "metrics.json",
                                              "run_config.json", "train.log"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["dev_examples"] == 40
    # r*(in+out) on 2 layers x 2 modules (16 -> 16) + classifier copy (16*2 + 2)
    assert metrics["trainable_params"] == 4 * 8 * (16 + 16) + 34
    assert run("eval", "--adapter", out) == 0
    again = capsys.readouterr().out
    assert f"dev_accuracy    {metrics['dev_accuracy']:.4f}" in again


def test_full_finetune_and_custom_files(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    dev = tmp_path / "dev.csv"
    train.write_text("\n".join(json.dumps({"text": f"word {i}", "label": ["no", "yes"][i % 2]}) for i in range(40)))
    dev.write_text("text,label\n" + "\n".join(f"word {i},{['no', 'yes'][i % 2]}" for i in range(10)))
    out = tmp_path / "full"
    assert run("train", "--model", tiny_model_dir, "--full-finetune", "--train-file", train, "--eval-file", dev,
               "--max-steps", 3, "--output-dir", out, "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == metrics["total_params"]
    assert (out / "model" / "config.json").exists()
    assert json.loads((out / "run_config.json").read_text())["label_names"] == ["no", "yes"]
    assert run("eval", "--adapter", out) == 0
    assert f"{metrics['dev_accuracy']:.4f}" in capsys.readouterr().out


def test_methods_lists_lora(capsys):
    assert run("methods") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "family", "merges", "paper"]
    lora = next(line for line in lines if line.startswith("lora "))
    assert "reparameterised" in lora and "yes" in lora and "arXiv:2106.09685" in lora


@pytest.mark.parametrize("argv, message", [
    (["--target-modules", "q_proj"], "matched no module"),
    (["--method", "nope"], "unknown PEFT method 'nope'"),
    (["--method", "lroa"], "unknown PEFT method 'lroa' (did you mean 'lora'?); registered methods: lora, dora"),
    (["--task", "imdb"], "unknown task 'imdb'"),
    (["--model", "/no/such/dir"], "is not a folder"),
    (["--train-file", "/no/such.csv", "--eval-file", "/no/such.csv"], "does not exist"),
    (["--train-file", "/", "--eval-file", "/"], "data file '/' is a folder; give the data file itself"),
    (["--lora-dropout", "1.5"], "--lora-dropout 1.5"),
    (["--option", "nonsense=1"], "has no field 'nonsense'"),
    (["--epochs", "2"], "--epochs 2 and --max-steps 1 both set the run's length; give one of them"),
    (["--full-finetune", "--loraplus-lr-ratio", "4"], "--loraplus-lr-ratio 4 raises the learning rate of LoRA's B"),
    (["--method", "ia3", "--loraplus-lr-ratio", "4"], "--loraplus-lr-ratio 4 raises the learning rate of LoRA's B "
                                                      "factors; --method ia3 has none"),
])
def test_bad_options_fail_in_one_line_before_training(tiny_model_dir, tmp_path, capsys, argv, message):
    args = ["train", "--model", tiny_model_dir, "--max-steps", 1, "--output-dir", tmp_path / "x", "--no-progress"]
    args += argv if "--model" not in argv else []
    if "--model" in argv:
        args[2] = argv[1]
    assert run(*args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftkit: error:") and message in err[0]
    if "--method" in argv:
        assert captured.out == ""  # refused before the run's header line
    assert not (tmp_path / "x").exists()


def test_argument_types_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("train", "--r", 0)
    assert exit_info.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert run("eval", "--adapter", tmp_path) == 2
    assert "not a peftkit run folder" in capsys.readouterr().err


def test_missing_column_is_named(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "d.csv"
    f.write_text("review,stars\nnice,1\n")
    assert run("train", "--model", tiny_model_dir, "--train-file", f, "--eval-file", f, "--output-dir",
               tmp_path / "r", "--no-progress") == 2
    assert ("no text column (looked for sentence, text, sentence1); columns present: ['review', 'stars']; name it "
            "with --text-column") in capsys.readouterr().err
    shutil.rmtree(tmp_path / "r", ignore_errors=True)


def test_relative_paths_are_saved_absolute_so_eval_works_from_anywhere(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.chdir(Path(tiny_model_dir).parent)
    out = tmp_path / "run"
    assert run("train", "--model", Path(tiny_model_dir).name, "--max-steps", 1, "--max-train-samples", 16,
               "--max-eval-samples", 8, "--output-dir", out, "--no-progress") == 0
    assert json.loads((out / "run_config.json").read_text())["model"] == str(Path(tiny_model_dir).resolve())
    monkeypatch.chdir(tmp_path)  # the model folder's name means nothing here
    capsys.readouterr()
    assert run("eval", "--adapter", out) == 0
    assert "dev_accuracy" in capsys.readouterr().out


def test_a_diverged_run_says_so(tiny_model_dir, tmp_path, capsys):
    """--lr 1e6 ended 'done' with a NaN loss and NaN adapter weights, and no word about it."""
    assert run("train", "--model", tiny_model_dir, "--max-steps", 3, "--lr", "1e6", "--max-train-samples", 16,
               "--max-eval-samples", 8, "--output-dir", tmp_path / "run", "--no-progress") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    out = capsys.readouterr().out
    assert metrics["train_loss"] != metrics["train_loss"]  # NaN: the seeded run diverges
    assert "warning         the training loss is nan: the run diverged" in out


def test_lora_plus_run(tiny_model_dir, tmp_path):
    """``--loraplus-lr-ratio`` trains B at lr * ratio and is recorded in the run folder (eval and --resume
    read it back)."""
    from peftkit.train.options import read_run_config

    out = tmp_path / "run"
    assert run("train", "--model", tiny_model_dir, "--max-steps", 2, "--max-train-samples", 16, "--max-eval-samples",
               8, "--output-dir", out, "--no-progress", "--loraplus-lr-ratio", 8) == 0
    assert read_run_config(out)[0].loraplus_lr_ratio == 8.0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_a_bench_cell_runs_without_lora_plus_where_it_does_not_apply(tiny_model_dir, tmp_path):
    """`peftkit bench --train-arg=--loraplus-lr-ratio=R` refused every sweep (its full fine-tuning cell); its
    full and non-LoRA cells now run without the ratio, with a warning, and its LoRA cells with it."""
    from peftkit.train.options import read_run_config

    for method, extra, want in (("lora", [], 4.0), ("ia3", [], None), ("lora", ["--full-finetune"], None)):
        out = tmp_path / f"{method}{len(extra)}"
        with pytest.warns(UserWarning, match="running without it: this is a `peftkit bench` cell") if want is None \
                else contextlib.nullcontext():
            assert run("train", "--model", tiny_model_dir, "--method", method, *extra, "--loraplus-lr-ratio", 4,
                       "--unused-options-warn", "--max-steps", 1, "--max-train-samples", 8, "--max-eval-samples", 8,
                       "--output-dir", out, "--no-progress") == 0
        assert read_run_config(out)[0].loraplus_lr_ratio == want


def test_the_rank_has_a_spelling_that_torchrun_leaves_alone():
    """`torchrun ... -m peftkit train --r 4` failed in torchrun's own parser (--r abbreviates its --rdzv-* options)."""
    from torch.distributed.run import get_args_parser

    from peftkit.cli import build_parser, train_config

    launcher = get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "peftkit", "train", "--lora-r", "4"])
    assert launcher.training_script_args == ["train", "--lora-r", "4"]
    args = build_parser().parse_args(launcher.training_script_args)
    args.argv = launcher.training_script_args
    assert train_config(args).r == 4
