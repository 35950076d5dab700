"""Serving a run folder: ``peftkit predict`` / :func:`peftkit.train.serve.predict_run` give the labels, scores
and greedy continuations the trained model gives, and bad input is refused before the model loads."""

from __future__ import annotations

import io
import itertools
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit import PeftModel
from peftkit.train.data import DataError, load_task, shipped_model_dir
from peftkit.train.metrics import pearson
from peftkit.train.serve import predict_run
from tests.cli_util import cli, error_line


@pytest.fixture(scope="module")
def sst2_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "sst2"
    assert cli("train", "--model", tiny_model_dir, "--max-steps", 4, "--max-train-samples", 64,
               "--max-eval-samples", 40, "--output-dir", out, "--no-progress") == 0
    return out


@pytest.fixture(scope="module")
def stsb_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "stsb"
    assert cli("train", "--model", tiny_model_dir, "--task", "stsb", "--max-steps", 4, "--max-train-samples", 64,
               "--max-eval-samples", 30, "--output-dir", out, "--no-progress") == 0
    return out


def test_classification_predictions_reproduce_the_runs_dev_accuracy(sst2_run):
    metrics = json.loads((sst2_run / "metrics.json").read_text())
    dev = load_task("sst2").dev[:40]
    results = predict_run(sst2_run, [e["text"] for e in dev], batch_size=7)  # batches of another size than eval's
    assert len(results) == 40
    hits = sum(r["label_id"] == e["label"] for r, e in zip(results, dev))
    assert hits / 40 == pytest.approx(metrics["dev_accuracy"])
    for r in results:
        assert r["label"] == ["negative", "positive"][r["label_id"]]
        assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-6)
        assert r["probability"] == max(r["probabilities"])


def test_classification_probabilities_are_the_adapted_models_softmax(sst2_run, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, sst2_run).eval()
    text = "an utterly charming and hilarious film"
    with torch.no_grad():
        want = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()
    got = predict_run(sst2_run, [text])[0]["probabilities"]
    assert got == pytest.approx(want, abs=1e-6)


def test_a_run_folder_loads_with_auto_peft_model_as_predict_serves_it(sst2_run, tiny_model_dir):
    """A run folder names its base model and task, so peft's one-line loading works on it."""
    from peftkit import AutoPeftModelForSequenceClassification, PeftModelForSequenceClassification

    model = AutoPeftModelForSequenceClassification.from_pretrained(sst2_run)
    assert type(model) is PeftModelForSequenceClassification and not model.training
    text = "an utterly charming and hilarious film"
    with torch.no_grad():
        got = model(**AutoTokenizer.from_pretrained(tiny_model_dir)(text, return_tensors="pt")).logits.softmax(-1)
    assert got[0].tolist() == pytest.approx(predict_run(sst2_run, [text])[0]["probabilities"], abs=1e-6)


def test_sentence_pair_regression_reproduces_the_runs_pearson(stsb_run, capsys):
    metrics = json.loads((stsb_run / "metrics.json").read_text())
    dev = load_task("stsb").dev[:30]
    scores = [r["score"] for r in predict_run(stsb_run, [(e["text"], e["text_pair"]) for e in dev])]
    assert pearson(scores, [e["label"] for e in dev]) == pytest.approx(metrics["dev_pearson"], abs=1e-6)
    # the command line takes the pair as two tab-separated sentences and prints the score first
    first = f"{dev[0]['text']}\t{dev[0]['text_pair']}"
    assert cli("predict", "--adapter", stsb_run, first) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{scores[0]:.4f}\t{first}"


def test_causal_lm_continuation_is_the_greedy_decoding(tmp_path, capsys):
    out = tmp_path / "lm"
    assert cli("train", "--task", "causal-lm", "--model", "stories260K", "--max-steps", 3, "--batch-size", 8,
               "--max-train-samples", 32, "--max-eval-samples", 8, "--output-dir", out, "--no-progress") == 0
    capsys.readouterr()
    prompt = "Question: Who was Galileo ?\nType:"
    got = predict_run(out, [prompt, "Once upon a time"], max_new_tokens=6)
    # the same continuation by hand: the adapted model's most likely next token, six times
    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(shipped_model_dir()), out).eval()
    # the run folder names its base and task: peft's one-line loading gives the same model
    from peftkit import AutoPeftModelForCausalLM, PeftModelForCausalLM

    auto = AutoPeftModelForCausalLM.from_pretrained(out)
    assert type(auto) is PeftModelForCausalLM and type(model) is PeftModelForCausalLM
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, model(input_ids=ids).logits)
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    whole = tok.decode(ids[0], skip_special_tokens=True)
    assert got[0]["completion"] == whole[len(tok.decode(ids[0, :start], skip_special_tokens=True)):]
    assert got[0]["completion"] and len(got) == 2
    # the command line prints prompt + continuation on one line (newlines written as \n), or JSON
    assert cli("predict", "--adapter", out, "--max-new-tokens", 6, "--json", prompt) == 0
    assert json.loads(capsys.readouterr().out) == {"input": prompt, "completion": got[0]["completion"]}
    assert cli("predict", "--adapter", out, "--max-new-tokens", 6, prompt) == 0
    assert capsys.readouterr().out == (prompt + got[0]["completion"]).replace("\n", "\\n") + "\n"
    # a JSONL table of prompt/response rows (the training format): each row's prompt, its newline kept as is
    table = tmp_path / "prompts.jsonl"
    table.write_text(json.dumps({"prompt": prompt, "response": " DESC"}) + "\n")
    assert cli("predict", "--adapter", out, "--max-new-tokens", 6, "--input", table, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"input": prompt, "completion": got[0]["completion"]}
    # a prompt too long for the model's positions is refused, naming the limit
    with pytest.raises(DataError, match=r"exceeds the model.s \d+ positions"):
        predict_run(out, ["Once"], max_new_tokens=100_000)


def test_a_fully_fine_tuned_causal_lm_run_predicts(tmp_path, capsys):
    """predict on a --full-finetune causal-LM run failed with "TypeError: 'method' object is not iterable": a
    transformers model's active_adapters is a method (eval worked on the same folder)."""
    out = tmp_path / "full"
    assert cli("train", "--task", "causal-lm", "--model", "stories260K", "--full-finetune", "--max-steps", 1,
               "--batch-size", 4, "--max-train-samples", 8, "--max-eval-samples", 4, "--output-dir", out,
               "--no-progress") == 0
    capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = tok("Once upon", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=3, do_sample=False)
    got = predict_run(out, ["Once upon"], max_new_tokens=3)
    assert got[0]["completion"] == tok.decode(want[0], skip_special_tokens=True)[len("Once upon"):]


def test_inputs_from_a_file_and_stdin(sst2_run, tmp_path, capsys, monkeypatch):
    texts = tmp_path / "in.txt"
    texts.write_text("a joyless mess\n\n  \nsheer delight\n", encoding="utf-8")  # blank lines are skipped
    assert cli("predict", "--adapter", sst2_run, "--input", texts) == 0
    from_file = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in from_file] == ["a joyless mess", "sheer delight"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a joyless mess\nsheer delight\n"))
    assert cli("predict", "--adapter", sst2_run, "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == ["a joyless mess", "sheer delight"]
    assert [f"{r['label']}\t{r['probability']:.4f}\t{r['input']}" for r in rows] == from_file
    assert all(math.isclose(sum(r["probabilities"]), 1.0, abs_tol=1e-6) for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--input", "{file}", "text"], "either as TEXT arguments or with --input"),
    (["--max-new-tokens", "4", "text"], "--max-new-tokens 4 has no effect"),
    (["--batch-size", "0", "text"], "positive integer"),
    (["--input", "{latin1}"], "not UTF-8"),
    (["--input", "{empty}"], "no input to predict on"),
])
def test_bad_predict_options_are_one_line_errors(sst2_run, tmp_path, capsys, argv, message):
    (tmp_path / "in.txt").write_text("x\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    argv = [a.format(file=tmp_path / "in.txt", latin1=tmp_path / "latin1.txt", empty=tmp_path / "empty.txt")
            for a in argv]
    assert message in error_line(capsys, "predict", "--adapter", sst2_run, *argv)


def test_inputs_of_the_wrong_shape_are_refused(sst2_run, stsb_run, tmp_path, capsys):
    with pytest.raises(DataError, match="input 2 is a sentence pair"):
        predict_run(sst2_run, ["fine", ("a", "b")])
    with pytest.raises(DataError, match="input 1 is 'one sentence': this run's task takes sentence pairs"):
        predict_run(stsb_run, ["one sentence"])
    assert "has 0 tabs" in error_line(capsys, "predict", "--adapter", stsb_run, "no tab")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run_config.json").write_text((sst2_run / "run_config.json").read_text())
    assert "did not finish" in error_line(capsys, "predict", "--adapter", unfinished, "text")


def test_a_prompt_too_long_after_the_virtual_tokens_is_refused(tiny_gpt2_dir, tmp_path):
    """The check left out a soft prompt's virtual tokens: the prompt failed inside generate instead."""
    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    gpt = tiny_gpt2_dir
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Once upon a time {i}." for i in range(12)))
    out = tmp_path / "pt"
    assert cli("train", "--task", "causal-lm", "--model", gpt, "--train-file", text, "--method", "prompt-tuning",
               "--max-length", 8, "--max-steps", 1, "--output-dir", out, "--no-progress") == 0
    prompt = "Once upon a time there was a little cat who"
    n = len(tok(prompt)["input_ids"])
    with pytest.raises(DataError, match=f"prompt 1 has {n} tokens; with 5 new tokens .* exceeds the model.s 12 "
                                        "positions after the adapter's 20 virtual tokens"):
        predict_run(out, [prompt], max_new_tokens=5)
    assert len(predict_run(out, ["Once"], max_new_tokens=3)) == 1


def test_a_composed_runs_prefix_part_reserves_its_positions_too(tiny_gpt2_dir, tmp_path, capsys):
    """MAM (a prefix part + parallel adapters): the up-front check counted only a top-level adapter's virtual
    tokens, so a prompt too long after the part's 16 failed inside generate, after the inputs before it had run."""
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Once upon a time {i}." for i in range(12)))
    out = tmp_path / "mam"
    assert cli("train", "--task", "causal-lm", "--model", tiny_gpt2_dir, "--train-file", text, "--method", "mam",
               "--max-length", 8, "--max-steps", 1, "--output-dir", out, "--no-progress") == 0
    capsys.readouterr()
    with pytest.raises(DataError, match=r"prompt 2 has 7 tokens; with 12 new tokens .* exceeds the model.s 16 "
                                        r"positions after the adapter's 16 virtual tokens \(it reads 18 tokens"):
        predict_run(out, ["Once", "Once upon a time there was"], max_new_tokens=12)
    # 7 + 10 new tokens fit: the model reads 16 of them (the check refused it, counting the last one it never reads)
    assert len(predict_run(out, ["Once upon a time there was"], max_new_tokens=10)[0]["completion"]) > 0


def test_the_continuation_stops_at_the_tokenizers_end_of_sequence_too(tmp_path, capsys):
    """Training appends the tokenizer's EOS to every row, but generation stopped only at the model config's: with a
    config naming another token (a tiny GPT-2's default 50256 here: 3), predict ran on past the EOS the run learned."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    once, upon, time = (tok(w)["input_ids"][-1] for w in ("Once", " upon", " time"))
    chain = [once, upon, tok.eos_token_id, time]  # each token's most likely successor is the next one
    model = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=len(tok),
                                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=3))
    with torch.no_grad():
        for p in [*model.transformer.h.parameters(), model.transformer.wpe.weight, model.transformer.wte.weight,
                  model.lm_head.weight]:
            p.zero_()
        for i, (now, nxt) in enumerate(itertools.pairwise(chain)):
            model.transformer.wte.weight[now, 4 * i] = 1.0
            model.lm_head.weight[nxt] = 10 * model.transformer.ln_f(model.transformer.wte.weight[now])
    folder = tmp_path / "chain"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time.\n\nOnce upon.\n")
    out = tmp_path / "run"
    assert cli("train", "--task", "causal-lm", "--model", folder, "--train-file", text, "--max-length", 16,
               "--max-steps", 1, "--lr", 1e-9, "--output-dir", out, "--no-progress") == 0
    capsys.readouterr()
    assert predict_run(out, ["Once"], max_new_tokens=5) == [{"completion": " upon"}]  # was " upon time"


def test_a_file_run_with_found_pair_columns_takes_pairs(tiny_model_dir, tmp_path, capsys):
    """sentence1/sentence2 columns: sentence2 was dropped unread in training (sentence1 found as the text), and
    predict and eval could not tell a pair run; now the pair is found, recorded and required."""
    rows = tmp_path / "pairs.csv"
    rows.write_text("sentence1,sentence2,label\n" + "".join(f"a{i} b,b a{i},{['no', 'yes'][i % 2]}\n" for i in range(8)))
    out = tmp_path / "run"
    assert cli("train", "--model", tiny_model_dir, "--train-file", rows, "--eval-file", rows, "--max-steps", 2,
               "--output-dir", out, "--no-progress") == 0
    assert json.loads((out / "run_config.json").read_text())["sentence_pair"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    got = predict_run(out, [(f"a{i} b", f"b a{i}") for i in range(8)])
    hits = sum(r["label"] == ["no", "yes"][i % 2] for i, r in enumerate(got))
    assert hits / 8 == pytest.approx(metrics["dev_accuracy"])
    with pytest.raises(DataError, match="this run's task takes sentence pairs"):
        predict_run(out, ["one sentence"])
    single = tmp_path / "single.csv"
    single.write_text("sentence,label\nx,yes\n")
    with pytest.raises(DataError, match="gives single sentences, but the run was trained on sentence pairs"):
        from peftkit.train.run import evaluate_run

        evaluate_run(out, eval_file=str(single))


def test_lines_escapes_and_bad_text(sst2_run, tmp_path, capsys, monkeypatch):
    """Input lines split only at line ends (str.splitlines also split at \\x85, \\x0c, U+2028); a newline in an
    input is written escaped, so each input is one output line; undecodable bytes are refused before loading."""
    f = tmp_path / "in.txt"
    f.write_bytes("\ufeffa\x85b\nc\x0cd\re\u2028f\r\ng\n".encode())
    assert cli("predict", "--adapter", sst2_run, "--input", f, "--json") == 0
    assert [json.loads(line)["input"] for line in capsys.readouterr().out.split("\n")[:-1]] == [
        "a\x85b", "c\x0cd", "e\u2028f", "g"]  # (and no BOM in the first)
    assert cli("predict", "--adapter", sst2_run, "great\nmovie", "x\\y") == 0
    out = capsys.readouterr().out.split("\n")[:-1]
    assert [line.split("\t")[2] for line in out] == ["great\\nmovie", "x\\\\y"]
    monkeypatch.setattr("sys.stdin", io.StringIO("caf\udce9\n"))  # how a text stream shows the byte 0xe9
    assert "--input -: not UTF-8 text" in error_line(capsys, "predict", "--adapter", sst2_run)
    assert "input 1 ('caf\\udce9') is not UTF-8 text" in error_line(capsys, "predict", "--adapter", sst2_run,
                                                                    "caf\udce9")
    assert "cannot be read" in error_line(capsys, "predict", "--adapter", sst2_run, "--input", tmp_path)
    with pytest.raises(DataError, match="is a str; give a list of inputs"):
        predict_run(sst2_run, "hello")
    with pytest.raises(DataError, match="is a set; give a list of inputs"):  # no order to answer in
        predict_run(sst2_run, {"a", "b"})
    assert cli("predict", "--adapter", sst2_run, "ls\u2028sep", "nel\x85x") == 0  # other line breaks: escaped
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and "ls\\u2028sep" in out and "nel\\u0085x" in out


def test_messages_name_the_runs_own_settings(sst2_run, tmp_path, capsys):
    import shutil

    run = shutil.copytree(sst2_run, tmp_path / "moved")
    cfg = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**cfg, "model": str(tmp_path / "gone")}))
    assert f"the run's model folder (run_config.json) '{tmp_path / 'gone'}' is not a folder" in error_line(
        capsys, "predict", "--adapter", run, "x")
    (run / "run_config.json").write_text(json.dumps({**cfg, "task": "qqp"}))
    assert "run_config.json: task='qqp' is not a known task" in error_line(capsys, "predict", "--adapter", run, "x")


def test_causal_prompts_from_a_file_take_escaped_newlines(tmp_path, capsys):
    out = tmp_path / "lm"
    assert cli("train", "--task", "causal-lm", "--model", "stories260K", "--max-steps", 1, "--batch-size", 4,
               "--max-train-samples", 8, "--max-eval-samples", 4, "--output-dir", out, "--no-progress") == 0
    prompt = "Question: Who was Galileo ?\nType:"
    want = predict_run(out, [prompt], max_new_tokens=4)[0]["completion"]
    f = tmp_path / "prompts.txt"
    f.write_text("Question: Who was Galileo ?\\nType:\n")  # the line as the output writes it
    capsys.readouterr()
    assert cli("predict", "--adapter", out, "--input", f, "--max-new-tokens", 4, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"input": prompt, "completion": want}
    assert "--batch-size 4 has no effect" in error_line(capsys, "predict", "--adapter", out, "--batch-size", 4, "x")


def test_eval_names_the_runs_own_model_folder(sst2_run, tmp_path, capsys):
    import shutil

    run = shutil.copytree(sst2_run, tmp_path / "moved")
    cfg = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**cfg, "model": str(tmp_path / "gone")}))
    line = error_line(capsys, "eval", "--adapter", run)
    assert f"the run's model folder (run_config.json) '{tmp_path / 'gone'}' is not a folder" in line
    assert "--model" not in line.split("is not a folder")[0]  # it named an option eval does not have


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_a_table_input_predicts_one_row_each_from_its_text_column(sst2_run, suffix, tmp_path, capsys):
    """A .jsonl/.csv/.tsv --input was refused (before that, each of its lines was classified with its syntax, the
    JSON braces and the label included): now each row's text column is the input, as on the command line."""
    texts = ["a joyless mess", "sheer delight", "it, sadly, is not funny"]
    rows = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        rows.write_text("".join(json.dumps({"label": 1, "sentence": t}) + "\n" for t in texts))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        quote = (lambda t: t) if suffix == ".tsv" else (lambda t: f'"{t}"')
        rows.write_text(f"label{sep}sentence\n" + "".join(f"1{sep}{quote(t)}\n" for t in texts))
    assert cli("predict", "--adapter", sst2_run, "--input", rows) == 0
    got = capsys.readouterr().out.splitlines()
    want = predict_run(sst2_run, texts)
    assert got == [f"{r['label']}\t{r['probability']:.4f}\t{t}" for r, t in zip(want, texts)]


def test_a_table_input_of_a_pair_run_takes_its_two_columns(stsb_run, tmp_path, capsys):
    dev = load_task("stsb").dev[:3]
    rows = tmp_path / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"a": e["text"], "b": e["text_pair"]}) + "\n" for e in dev))
    assert cli("predict", "--adapter", stsb_run, "--input", rows, "--text-column", "a", "--pair-column", "b",
               "--json") == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = predict_run(stsb_run, [(e["text"], e["text_pair"]) for e in dev])
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)
    assert got[0]["input"] == [dev[0]["text"], dev[0]["text_pair"]]
    # sentence1/sentence2 are found without naming them
    glue = tmp_path / "glue.tsv"
    glue.write_text("sentence1\tsentence2\n" + "".join(f"{e['text']}\t{e['text_pair']}\n" for e in dev))
    assert cli("predict", "--adapter", stsb_run, "--input", glue) == 0
    scores = [float(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines()]
    assert scores == pytest.approx([w["score"] for w in want], abs=1e-4)


@pytest.mark.parametrize("content, argv, message", [
    ('{"review": "fine"}\n', [], "line 1 has no text column (looked for sentence, text, sentence1); columns "
                                 "present: ['review']; name it with --text-column"),
    ('{"text": "fine"}\n{"txt": "x"}\n', [], "line 2 has no column 'text'; columns present: ['txt']"),
    ('{"text": ["a", "b"]}\n', [], "line 1's column 'text' holds ['a', 'b'], not text"),
    ('{"text": "fine"}\n', ["--pair-column", "b"], "--pair-column 'b' does not apply"),
    ("\n", [], "the table has no rows"),
    ('{"text": "fine"\n', [], "line 1 is not valid JSON"),
])
def test_bad_table_inputs_are_one_line_errors(sst2_run, tmp_path, capsys, content, argv, message):
    rows = tmp_path / "in.jsonl"
    rows.write_text(content)
    assert message in error_line(capsys, "predict", "--adapter", sst2_run, "--input", rows, *argv)


def test_column_options_need_a_table_input(sst2_run, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("fine\n")
    assert "--text-column 'x' applies to a .jsonl, .csv or .tsv --input" in error_line(
        capsys, "predict", "--adapter", sst2_run, "--input", texts, "--text-column", "x")
    assert "the TEXT arguments are one input per argument" in error_line(
        capsys, "predict", "--adapter", sst2_run, "--pair-column", "x", "fine")


def test_a_blank_cell_of_a_table_input_is_refused(sst2_run, tmp_path, capsys):
    """It was predicted on as the empty text (a causal run continued from BOS alone)."""
    rows = tmp_path / "in.csv"
    rows.write_text("sentence,label\nfine,1\n ,0\n")
    assert "line 3's column 'sentence' is empty; give every row a text" in error_line(
        capsys, "predict", "--adapter", sst2_run, "--input", rows)
