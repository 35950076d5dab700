"""Every CLI failure is one line on stderr (``peftkit: error: ...``): exit status 2 for bad input, found before
anything is written; 1 for anything unforeseen (the traceback only with PEFTKIT_TRACEBACK=1)."""

from __future__ import annotations

import shutil

import pytest
import torch

from peftkit import cli as cli_module
from tests.cli_util import cli, error_line, snapshot

TRAIN_HELP = "(see `peftkit train --help`)"


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "0"], f"argument --max-steps: expected a positive integer, got '0' {TRAIN_HELP}"),
    (["--lr", "nan"], f"argument --lr: expected a positive finite number, got 'nan' {TRAIN_HELP}"),
    (["--lr", "inf"], f"argument --lr: expected a positive finite number, got 'inf' {TRAIN_HELP}"),
    (["--epochs", "inf"], f"argument --epochs: expected a positive finite number, got 'inf' {TRAIN_HELP}"),
    (["--lora-alpha", "inf"], f"argument --lora-alpha: expected a positive finite number, got 'inf' {TRAIN_HELP}"),
    (["--lora-dropout", "nan"], f"argument --lora-dropout: expected a finite number, got 'nan' {TRAIN_HELP}"),
    (["--seed", "100000000000000000000000"],
     f"argument --seed: expected an integer seed in 0..4294967295, got '100000000000000000000000' {TRAIN_HELP}"),
    (["--seed", "-1"], f"argument --seed: expected an integer seed in 0..4294967295, got '-1' {TRAIN_HELP}"),
    (["--target-modules", "(query"],
     "argument --target-modules: '(query' is read as a regular expression, and it is not a valid one (missing ), "
     f"unterminated subpattern at position 0); give names separated by commas or a valid regex {TRAIN_HELP}"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option (see `peftkit train --help`)"),  # (it named `peftkit --help`)
])
def test_argument_errors_are_one_line(tmp_path, capsys, argv, message):
    assert error_line(capsys, "train", "--output-dir", tmp_path / "x", *argv) == f"peftkit: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_other_commands_and_help(capsys):
    assert error_line(capsys, "merge", "a", "b", "--output", "m", "--weights", "1", "nan") == (
        "peftkit: error: argument --weights: expected a finite number, got 'nan' (see `peftkit merge --help`)")
    assert error_line(capsys, "eval") == (
        "peftkit: error: the following arguments are required: --adapter (see `peftkit eval --help`)")
    assert error_line(capsys) == (
        "peftkit: error: the following arguments are required: command (see `peftkit --help`)")
    assert cli("train", "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: peftkit train") and "--overwrite" in out and len(out.splitlines()) > 20


def _model_copy(src, dst, names):
    dst.mkdir()
    for name in names:
        shutil.copy(f"{src}/{name}", dst / name)
    return dst


NEEDS = "a model folder needs config.json, model.safetensors and tokenizer files, as save_pretrained writes them"
ALL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("case", ["target_modules", "regex_option", "inference_mode", "nan_option", "device_foo",
                                  "device_cuda", "device_index", "empty_model", "bad_config", "no_model_type",
                                  "bad_weights", "pickle_model", "no_tokenizer"])
def test_run_option_errors_are_one_line_and_write_nothing(tiny_model_dir, tmp_path, capsys, case):
    model = tiny_model_dir
    extra: list[str] = []
    if case == "target_modules":
        extra, message = ["--option", "target_modules=5"], "--option target_modules=5 has the wrong type; expected list[str] | str | None"
    elif case == "regex_option":
        extra, message = ["--option", 'target_modules="(query"'], (
            "target_modules='(query' is read as a regular expression, and it is not a valid one (missing ), "
            "unterminated subpattern at position 0); give a list of module names or a valid regex")
    elif case == "inference_mode":
        extra, message = ["--option", "inference_mode=true"], (
            "--option inference_mode=true freezes the adapter, so nothing would train; inference_mode is for loading "
            "a trained adapter")
    elif case == "nan_option":
        extra, message = ["--option", "lora_alpha=NaN"], "--option lora_alpha=nan is not valid: numbers must be finite"
    elif case == "device_foo":
        extra, message = ["--device", "foo"], "--device 'foo' is not a device; use cpu, cuda, cuda:N or mps"
    elif case == "device_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra, message = ["--device", "cuda"], (
            f"--device 'cuda': this machine has no cuda device available to torch {torch.__version__}; use --device cpu")
    elif case == "device_index":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        n = torch.cuda.device_count()
        extra, message = ["--device", f"cuda:{n}"], (
            f"--device 'cuda:{n}': this machine has {n} cuda device(s), numbered 0 to {n - 1}")
    elif case == "empty_model":
        model = tmp_path / "empty"
        model.mkdir()
        message = f"--model '{model}' has no config.json; {NEEDS}"
    elif case == "bad_config":
        model = _model_copy(tiny_model_dir, tmp_path / "badcfg", ALL_FILES)
        (model / "config.json").write_text("{oops")
        message = (f"'{model / 'config.json'}' is not valid JSON (Expecting property name enclosed in double quotes: "
                   f"line 1 column 2 (char 1)); {NEEDS}")
    elif case == "no_model_type":
        model = _model_copy(tiny_model_dir, tmp_path / "nomt", ALL_FILES)
        (model / "config.json").write_text('{"hidden_size": 16}')
        message = f"'{model / 'config.json'}' has no \"model_type\"; {NEEDS}"
    elif case == "bad_weights":
        model = _model_copy(tiny_model_dir, tmp_path / "badst", ALL_FILES)
        (model / "model.safetensors").write_bytes(b"\x01" * 100)
        message = (f"'{model / 'model.safetensors'}' is not a readable safetensors file (Error while deserializing "
                   f"header: header too large); {NEEDS}")
    elif case == "pickle_model":
        model = _model_copy(tiny_model_dir, tmp_path / "bin", ["config.json", "tokenizer.json", "tokenizer_config.json"])
        (model / "pytorch_model.bin").write_bytes(b"not loaded")
        message = (f"--model '{model}' has no model.safetensors (only pytorch_model.bin, a pickle file, which peftkit "
                   "does not load; re-save the model with save_pretrained(safe_serialization=True))")
    else:
        model = _model_copy(tiny_model_dir, tmp_path / "notok", ["config.json", "model.safetensors"])
        message = (f"--model '{model}' has no tokenizer (none of tokenizer.json, vocab.txt, vocab.json, "
                   "tokenizer.model, spiece.model, sentencepiece.bpe.model); save the model's tokenizer into it with "
                   "tokenizer.save_pretrained")
    before = snapshot(tmp_path)
    line = error_line(capsys, "train", "--model", model, "--max-steps", 1, "--max-train-samples", 8,
                      "--max-eval-samples", 8, "--output-dir", tmp_path / "run", "--no-progress", *extra)
    assert line == f"peftkit: error: {message}"
    assert snapshot(tmp_path) == before


def test_unforeseen_errors_are_one_line_with_status_1(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("first line\n  second line")

    monkeypatch.setitem(cli_module.COMMANDS, "methods", boom)
    monkeypatch.delenv("PEFTKIT_TRACEBACK", raising=False)
    assert error_line(capsys, "methods", status=1) == (
        "peftkit: error: RuntimeError: first line second line (set PEFTKIT_TRACEBACK=1 for the traceback)")
    monkeypatch.setenv("PEFTKIT_TRACEBACK", "1")
    assert cli("methods") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):" and "RuntimeError: first line" in err
    assert err[-1] == "peftkit: error: RuntimeError: first line second line (set PEFTKIT_TRACEBACK=1 for the traceback)"


def test_mrpc_without_a_data_dir_says_what_to_pass(tmp_path, capsys):
    assert error_line(capsys, "train", "--task", "mrpc", "--output-dir", tmp_path / "x") == (
        "peftkit: error: task 'mrpc' is not shipped (Microsoft's licence); pass --data-dir pointing at a folder "
        "with MRPC/{train,dev}.tsv (GLUE format)")
    assert error_line(capsys, "train", "--task", "mrpc", "--data-dir", tmp_path, "--output-dir", tmp_path / "x") == (
        f"peftkit: error: task 'mrpc' is not in {tmp_path}; pass --data-dir pointing at a folder with "
        "MRPC/{train,dev}.tsv (GLUE format)")


def test_options_that_would_be_ignored_are_refused(tmp_path, capsys):
    data = tmp_path / "tr.csv"
    data.write_text("sentence,label\ngood,1\nbad,0\n")
    assert error_line(capsys, "train", "--task", "rte", "--train-file", data, "--eval-file", data,
                      "--output-dir", tmp_path / "x") == (
        "peftkit: error: --task rte cannot be combined with --train-file, whose rows are the task; leave --task out "
        "(or give --task causal-lm for a causal-LM file)")
    assert error_line(capsys, "train", "--float-embeddings", "--output-dir", tmp_path / "x") == (
        "peftkit: error: --float-embeddings only applies with --quantize (it keeps the embeddings float32)")
    # data options that were accepted, recorded in run_config.json and ignored
    assert error_line(capsys, "train", "--text-column", "nosuch", "--output-dir", tmp_path / "x") == (
        "peftkit: error: --text-column names a column of --train-file/--eval-file; task sst2's own files have fixed "
        "columns")
    assert error_line(capsys, "train", "--task", "causal-lm", "--data-dir", tmp_path, "--output-dir", tmp_path / "x") \
        == (f"peftkit: error: --data-dir {tmp_path} is read only for the GLUE tasks (sst2, rte, cola, stsb, mrpc); "
            "a causal-LM run does not use it")
    assert error_line(capsys, "train", "--task", "causal-lm", "--pair-column", "x", "--label-column", "y",
                      "--output-dir", tmp_path / "x") == (
        "peftkit: error: --pair-column, --label-column do not apply to causal-LM files, whose rows are text (or "
        "prompt/response); --text-column names the text field")
    assert error_line(capsys, "train", "--fsdp", "--output-dir", tmp_path / "x") == (
        "peftkit: error: --fsdp shards the model over several processes, and this run would have one (nothing ran); "
        "start it with torchrun --nproc-per-node N or accelerate launch, or leave --fsdp out")
    assert error_line(capsys, "train", "--output-dir", "") == (  # it was taken as no --output-dir
        "peftkit: error: --output-dir '' is empty; give a folder (or leave the option out for "
        "runs/<method>-<task>-<time>)")
    assert not (tmp_path / "x").exists()


def test_causal_lm_files_are_checked_where_they_are_read(tmp_path, capsys):
    """A text column other than 'text' is honoured (it was ignored: every row 'lacked' text); a non-UTF-8 text
    file was read with replacement characters; a bad row was numbered within the held-out part, without the
    file's name; a one-record file failed with exit 1 (the hold-out took its only record)."""
    from peftkit.train.options import RunConfig
    from peftkit.train.run import _lm_records

    body = tmp_path / "body.jsonl"
    body.write_text("".join(f'{{"body": "story {i}"}}\n' for i in range(20)))
    train, dev = _lm_records(RunConfig(task="causal-lm", train_file=str(body), text_column="body"))
    assert [r["body"] for r in train] == [f"story {i}" for i in range(18)] and len(dev) == 2
    # an evaluation file's rows are read with the column too where they have it, before their prompt/response
    # (it scored the prompt/response of rows trained on their body; `peftkit eval --text-column` the same)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "q", "response": " a", "body": "story x"}\n{"prompt": "q2", "response": " a2"}\n')
    cfg = RunConfig(task="causal-lm", train_file=str(body), text_column="body", eval_file=str(mixed))
    for train_too in (True, False):
        assert _lm_records(cfg, train_too=train_too)[1] == [{"body": "story x"}, {"prompt": "q2", "response": " a2"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join('{"text": "story"}\n' for _ in range(19)) + '{"txt": "oops"}\n')
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 au lait\nsecond line\n".encode("latin-1"))
    one = tmp_path / "one.txt"
    one.write_text("Just one line.\n")
    for path, message in [
        (bad, f"{bad}: line 20 has neither 'text' nor 'prompt'/'response': keys ['txt']; --text-column names another "
              "text field"),
        (text, f"{text}: not UTF-8 text (byte 0xe9 at offset 3); save the file as UTF-8"),
        (one, f"{one}: 1 record(s); holding out the last 10% for evaluation leaves none to train on: give more "
              "records, or an --eval-file"),
    ]:
        assert error_line(capsys, "train", "--task", "causal-lm", "--train-file", path, "--max-steps", 1,
                          "--output-dir", tmp_path / "x", "--no-progress") == f"peftkit: error: {message}"
    assert not (tmp_path / "x").exists()


def test_a_misspelt_target_module_fails_the_run(tiny_model_dir, tmp_path, capsys):
    assert error_line(capsys, "train", "--model", tiny_model_dir, "--target-modules", "query,vlaue", "--max-steps", "1",
                      "--output-dir", tmp_path / "x", "--no-progress") == (
        "peftkit: error: target_modules entries ['vlaue'] match no module of the model (a typo?); the other entries "
        "matched 2 module(s)")
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "prefix-tuning", "--r", "4"], "--r 4 has no effect with --method prefix-tuning, which does not "
     "use it; leave it out (`peftkit methods` lists the methods; --option KEY=VALUE sets any field of the method's "
     "config)"),
    (["--method", "prompt-tuning", "--target-modules", "query"], "--target-modules ['query'] has no effect with "
     "--method prompt-tuning"),
    (["--full-finetune", "--method", "dora"], "--full-finetune trains every weight of the model; --method dora would "
     "have no effect: leave them out, or drop --full-finetune"),
    (["--full-finetune", "--lora-alpha", "8"], "--full-finetune trains every weight of the model; --lora-alpha 8.0 "
     "would have no effect"),
    # the same field twice: it said "--r 4 has no effect with --method lora, which does not use it"
    (["--r", "4", "--option", "r=4"], "--r and --option r=... both set r; give one of them"),
    # also a flag given at its default value: the --option silently won
    (["--lora-alpha", "16", "--option", "lora_alpha=32"], "--lora-alpha and --option lora_alpha=... both set "
     "lora_alpha; give one of them"),
    # a run labelled dora that trained plain LoRA
    (["--method", "dora", "--option", "use_dora=false"], "--option use_dora=False undoes what --method dora is "
     "(use_dora=True); use --method lora for that"),
    # an empty list fell back to all-linear
    (["--target-modules", ","], "argument --target-modules: ',' names no module; give module names separated by "
     "commas, all-linear, or a regex"),
])
def test_options_the_method_does_not_use_are_refused(tiny_model_dir, tmp_path, capsys, extra, message):
    """They were ignored, yet recorded in run_config.json as if they had shaped the run."""
    line = error_line(capsys, "train", "--model", tiny_model_dir, "--max-steps", 1, "--output-dir", tmp_path / "run",
                      "--no-progress", *extra)
    assert line.startswith(f"peftkit: error: {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, option", [("lora", ["--r", "8"]), ("vera", ["--r", "256"]),
                                            ("lora", ["--target-modules", "all-linear"])])
def test_an_option_given_at_the_methods_own_default_is_accepted(method, option):
    """The option is used; only its value equals the default (it was reported as 'has no effect')."""
    from peftkit.cli import _check_options_take_effect, build_parser
    from peftkit.train.options import RunConfig

    args = build_parser().parse_args(["train", "--method", method, *option])
    _check_options_take_effect(RunConfig(method=method, r=args.r, lora_alpha=args.lora_alpha,
                                         lora_dropout=args.lora_dropout, target_modules=args.target_modules))


def test_a_bench_cell_warns_about_an_option_its_method_does_not_use(tiny_model_dir, tmp_path, capsys):
    """`peftkit bench --train-arg=--r=4` reaches every cell; a prefix-tuning cell runs and says so."""
    with pytest.warns(UserWarning, match="--r 4 has no effect with --method prefix-tuning.*a `peftkit bench` cell"):
        assert cli("train", "--model", tiny_model_dir, "--method", "prefix-tuning", "--max-steps", 1,
                   "--max-train-samples", 8, "--max-eval-samples", 8, "--output-dir", tmp_path / "run",
                   "--no-progress", "--unused-options-warn", "--r", 4) == 0


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """``peftkit methods | head -1``: the closed pipe printed "peftkit: error: BrokenPipeError" and exited 1."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "peftkit", "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (head after its line, at the latest)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "BrokenPipe" not in err and "peftkit: error" not in err


def test_a_max_length_beyond_the_models_positions_is_refused_before_writing(tiny_model_dir, tiny_gpt2_dir, tmp_path,
                                                                           capsys):
    """Longer rows failed inside the forward with a bare size mismatch (exit 1), leaving run_config.json behind;
    with short training rows the run passed, and eval or predict failed later on a long row."""
    import json

    rows = tmp_path / "long.jsonl"
    rows.write_text("".join(json.dumps({"text": " ".join(["word"] * 300), "label": i % 2}) + "\n" for i in range(4)))
    before = snapshot(tmp_path)
    assert error_line(capsys, "train", "--model", tiny_model_dir, "--train-file", rows, "--eval-file", rows,
                      "--max-length", 400, "--max-steps", 1, "--output-dir", tmp_path / "run") == (
        "peftkit: error: --max-length 400 is more than the 128 positions the model has; give --max-length 128 or "
        "less")
    # a soft prompt's virtual tokens take positions too (it failed inside the forward, after writing)
    assert error_line(capsys, "train", "--model", tiny_model_dir, "--train-file", rows, "--eval-file", rows,
                      "--method", "prompt-tuning", "--max-length", 120, "--max-steps", 1,
                      "--output-dir", tmp_path / "run") == (
        "peftkit: error: --max-length 120 is more than the 108 positions the model has after the 20 virtual tokens; "
        "give --max-length 108 or less")
    # more virtual tokens than positions: the message spoke of -72 positions and --max-length 1
    assert error_line(capsys, "train", "--model", tiny_model_dir, "--train-file", rows, "--eval-file", rows,
                      "--method", "prompt-tuning", "--option", "num_virtual_tokens=200", "--max-length", 16,
                      "--max-steps", 1, "--output-dir", tmp_path / "run") == (
        "peftkit: error: num_virtual_tokens=200 leaves 0 of the model's 128 positions for the text; use at most 125 "
        "virtual tokens (and --max-length at most 128 minus that)")
    # a causal LM with a learned table (GPT-2): an IndexError in the perplexity before training
    gpt = tiny_gpt2_dir
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join(" ".join(["Once upon a time"] * 20) for _ in range(4)))
    before = snapshot(tmp_path)
    line = error_line(capsys, "train", "--task", "causal-lm", "--model", gpt, "--train-file", text, "--eval-file", text,
                      "--max-length", 64, "--max-steps", 1, "--output-dir", tmp_path / "run")
    assert line == "peftkit: error: --max-length 64 is more than the 32 positions the model has; give --max-length 32 or less"
    assert snapshot(tmp_path) == before


def test_an_option_refining_a_preset_is_accepted():
    """PiSSA with its fast SVD (init_lora_weights="pissa_niter_4") was refused as undoing --method pissa."""
    from peftkit.train.run import RunConfig, build_peft_config

    config = build_peft_config(RunConfig(method="pissa", method_options={"init_lora_weights": "pissa_niter_4"}))
    assert config.init_lora_weights == "pissa_niter_4"


@pytest.mark.parametrize(("given", "canonical"), [("SST-2", "sst2"), ("sts-b", "stsb"), ("causal_lm", "causal-lm"),
                                                  ("Causal-LM", "causal-lm"), ("nope", "nope")])
def test_task_names_take_their_canonical_spelling(given, canonical):
    """--task SST-2 was accepted but written as typed into run_config.json and the folder name, while the metrics
    said sst2; causal_lm was refused."""
    assert cli_module._task_name(given) == canonical


@pytest.mark.parametrize("argv, message", [
    (["train", "--resume", ""], "--resume '' is empty; give the run folder to continue"),
    (["eval", "--adapter", ""], "--adapter '' is empty; give the run folder"),
    (["predict", "--adapter", "", "some text"], "--adapter '' is empty; give the run folder"),
    (["export", "--adapter", " ", "--merge", "--output", "x"], "--adapter ' ' is empty; give the run or adapter folder"),
    (["bench", "--output-dir", ""], "--output-dir '' is empty; give the sweep folder"),
])
def test_empty_folders_are_refused_by_name(argv, message, tmp_path, capsys, monkeypatch):
    """--resume '' started a fresh default run; --adapter '' used the current folder; bench --output-dir '' wrote
    its sweep into the current folder."""
    monkeypatch.chdir(tmp_path)
    assert error_line(capsys, *argv).startswith(f"peftkit: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_empty_model_and_task_are_refused(tmp_path, capsys):
    """--model '' read as the current folder; --task '' trained sst2."""
    line = error_line(capsys, "train", "--model", "", "--output-dir", tmp_path / "a")
    assert line.startswith("peftkit: error: --model '' is empty") and line.endswith("the embedded all-MiniLM-L6-v2")
    # the default it names is the task's (it named MiniLM for a causal-LM run too)
    assert error_line(capsys, "train", "--task", "causal-lm", "--model", " ",
                      "--output-dir", tmp_path / "a").endswith("leave --model out for the shipped stories260K")
    assert "expected a task name" in error_line(capsys, "train", "--task", "", "--output-dir", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_into_its_base_model_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    """--output-dir equal to --model (with --overwrite) trained and wrote adapter files beside config.json: from then
    on transformers loaded that folder as an adapter, and the run could never be evaluated."""
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(os.listdir(model))
    for out in (model, tmp_path):
        line = error_line(capsys, "train", "--model", model, "--output-dir", out, "--overwrite", "--max-steps", "1")
        assert "the base model's folder" in line and "Give a folder outside it" in line
    assert sorted(os.listdir(model)) == before
    from peftkit.train.run import RunConfig, _model_dir_overlap

    # a sub-folder is not read when the model loads: allowed
    assert _model_dir_overlap(model / "runs" / "a", RunConfig(model=str(model))) is None


@pytest.mark.parametrize("variable, value, message", [
    ("ACCELERATE_USE_FSDP", "true", r"accelerate launch --use_fsdp \(ACCELERATE_USE_FSDP=true\) is not read"),
    ("ACCELERATE_MIXED_PRECISION", "bf16", r"accelerate launch --mixed_precision bf16 \(ACCELERATE_MIXED_PRECISION\)"),
])
def test_accelerate_settings_peftkit_does_not_read_are_refused(variable, value, message, tmp_path, capsys, monkeypatch):
    """accelerate launch --use_fsdp trained full replicas and --mixed_precision bf16 trained float32, silently."""
    import re

    monkeypatch.setenv(variable, value)
    assert re.search(message, error_line(capsys, "train", "--output-dir", tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate sets without the option
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    args = cli_module.build_parser().parse_args(["train", "--output-dir", str(tmp_path / "run")])
    args.argv = ["train", "--output-dir", str(tmp_path / "run")]
    assert cli_module.train_config(args).method == "lora"


def test_accelerate_settings_are_refused_on_resume_too(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--resume went around the check: a bf16 launch trained float32, silently."""
    assert cli_module.main(["train", "--model", tiny_model_dir, "--max-steps", "1", "--batch-size", "4",
                            "--max-train-samples", "8", "--max-eval-samples", "8", "--no-progress",
                            "--output-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert "accelerate launch --mixed_precision bf16" in error_line(capsys, "train", "--resume", tmp_path / "run")
