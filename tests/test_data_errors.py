"""Training data is read exactly or refused: labels, columns, JSON lines, encodings; messages name the file,
the line and the value, and a refused run writes nothing."""

from __future__ import annotations

import json

import pytest

from peftkit.train.data import DataError, examples_from_rows, read_table
from tests.cli_util import cli, error_line, snapshot

HOW = ("classification labels must be all integer class ids (0, 1, ...) or all class names (non-numeric strings); "
       "regression from files is not supported")


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def examples(path, **kw):
    return examples_from_rows(read_table(path), None, "label", source=str(path), **kw)


@pytest.mark.parametrize("label, message", [
    (0.4, "line 2 has the label 0.4, which is not an integer class id; " + HOW),
    (1.9, "line 2 has the label 1.9, which is not an integer class id; " + HOW),
    (None, "line 2 has no label (the value is null); give every row a label"),
    ("", "line 2 has no label (the value is empty); give every row a label"),
    (-1, "line 2 has the class id -1; class ids must lie in 0..9999 (number the classes 0, 1, ... or give class "
         "names)"),
    (1000000, "line 2 has the class id 1000000; class ids must lie in 0..9999 (number the classes 0, 1, ... or "
              "give class names)"),
    (True, "line 2 has the label True, a JSON bool; " + HOW),
    ([1], "line 2 has the label [1], a JSON list; " + HOW),
    ("pos", "line 2 has the label 'pos' but line 1 has 0; labels must be all integer class ids or all class names"),
])
def test_bad_jsonl_labels_are_refused(tmp_path, label, message):
    f = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": label}])
    with pytest.raises(DataError) as err:
        examples(f)
    assert str(err.value) == f"{f}: {message}"


def test_csv_labels_and_rows(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("text,label\na,0.4\n")
    with pytest.raises(DataError) as err:
        examples(f)
    assert str(err.value) == f"{f}: line 2 has the label '0.4', which is not an integer class id; " + HOW
    f.write_text("text,label\na,1\nb\n")
    with pytest.raises(DataError) as err:
        read_table(f)
    assert str(err.value) == (f"{f}: line 3 has 1 field(s) but the header has 2 (['text', 'label']): a value is "
                              "missing, or a field holds a comma unquoted (quote it)")
    f.write_text("text,label\na,1\nb,\n")
    with pytest.raises(DataError, match="line 3 has no label"):
        examples(f)


def test_valid_labels_are_read_exactly(tmp_path):
    f = jsonl(tmp_path / "ids.jsonl", [{"text": "a", "label": 2}, {"text": 7, "label": 0.0}, {"text": "c", "label": "1"}])
    out, names = examples(f)
    assert names is None and [e["label"] for e in out] == [2, 0, 1] and out[1]["text"] == "7"
    f = tmp_path / "names.csv"
    f.write_text('text,label\n"a, quoted",yes\nb, no\n')
    out, names = examples(f)
    assert names == ["no", "yes"] and [e["label"] for e in out] == [1, 0] and out[0]["text"] == "a, quoted"


def test_dev_labels_must_match_the_training_kind(tmp_path):
    f = jsonl(tmp_path / "dev.jsonl", [{"text": "a", "label": "pos"}])
    with pytest.raises(DataError) as err:
        examples(f, label_ids=True)
    assert str(err.value) == f"{f}: line 1 has the class name 'pos' but the training labels are integer class ids; give class ids"
    g = jsonl(tmp_path / "dev2.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(DataError) as err:
        examples(g, label_names=["neg", "pos"])
    assert str(err.value) == (f"{g}: line 1 has the class id 1 but the training labels are class names ['neg', 'pos']; "
                              "give class names")
    with pytest.raises(DataError) as err:
        examples(f, label_names=["neg", "positive"])
    assert str(err.value) == f"{f}: line 1 has the label 'pos', not one of ['neg', 'positive']"
    h = jsonl(tmp_path / "dev3.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(DataError) as err:
        examples(h, label_ids=True, num_labels=2)
    assert str(err.value) == f"{h}: line 2 has the class id 2; the run's model has 2 classes (0..1)"


def test_malformed_files(tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, "", "[1, 2]"])
    with pytest.raises(DataError) as err:
        read_table(f)
    assert str(err.value) == (f"{f}: line 3 is a JSON list ([1, 2]), not an object; each line must be an object "
                              'such as {"text": "...", "label": 1}')
    f = jsonl(tmp_path / "keys.jsonl", [{"text": "a", "label": 1}, {"sentence": "b", "label": 0}])
    with pytest.raises(DataError) as err:
        examples(f)
    assert str(err.value) == (f"{f}: line 2: no text column 'text'; columns present: ['sentence', 'label']; name "
                              "the right one with --text-column")
    f = jsonl(tmp_path / "null.jsonl", [{"text": None, "label": 1}])
    with pytest.raises(DataError) as err:
        examples(f)
    assert str(err.value) == f"{f}: line 1: the text column 'text' holds None, not text"
    f = tmp_path / "latin1.csv"
    f.write_bytes("text,label\ncafé,1\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_table(f)
    assert str(err.value) == f"{f}: not UTF-8 text (byte 0xe9 at offset 14); save the file as UTF-8"


def test_rows_without_line_numbers_are_counted(tmp_path):
    with pytest.raises(DataError) as err:
        examples_from_rows([{"text": "a", "label": 0}, {"text": "b", "label": 0.5}], None, "label", source="mine")
    assert str(err.value) == "mine: row 2 has the label 0.5, which is not an integer class id; " + HOW


@pytest.mark.parametrize("bad", ["float", "negative", "latin1", "not-object"])
def test_cli_refuses_bad_data_before_writing_anything(tiny_model_dir, tmp_path, capsys, bad):
    good = jsonl(tmp_path / "dev.jsonl", [{"text": f"w{i}", "label": i % 2} for i in range(4)])
    train = tmp_path / "train.jsonl"
    if bad == "float":
        jsonl(train, [{"text": "a", "label": 0}, {"text": "b", "label": 1.9}])
        message = f"{train}: line 2 has the label 1.9, which is not an integer class id; " + HOW
    elif bad == "negative":
        jsonl(train, [{"text": "a", "label": 0}, {"text": "b", "label": -1}])
        message = (f"{train}: line 2 has the class id -1; class ids must lie in 0..9999 (number the classes 0, 1, "
                   "... or give class names)")
    elif bad == "latin1":
        train = tmp_path / "train.csv"
        train.write_bytes("text,label\nnaïve,1\n".encode("latin-1"))
        message = f"{train}: not UTF-8 text (byte 0xef at offset 13); save the file as UTF-8"
    else:
        jsonl(train, ['"just a string"'])
        message = (f"{train}: line 1 is a JSON str (\"just a string\"), not an object; each line must be an object "
                   'such as {"text": "...", "label": 1}')
    before = snapshot(tmp_path)
    line = error_line(capsys, "train", "--model", tiny_model_dir, "--train-file", train, "--eval-file", good,
                      "--max-steps", 1, "--output-dir", tmp_path / "run", "--no-progress")
    assert line == f"peftkit: error: {message}"
    assert snapshot(tmp_path) == before


def test_eval_file_of_a_named_task_replaces_its_dev_set(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", "--model", tiny_model_dir, "--max-steps", 1, "--max-train-samples", 16, "--max-eval-samples",
               8, "--target-modules", "query", "--output-dir", out, "--no-progress") == 0
    dev = tmp_path / "dev.csv"
    dev.write_text("sentence,label\ngood,1\nbad,0\nfine,1\n")
    capsys.readouterr()
    assert cli("eval", "--adapter", out, "--eval-file", dev) == 0
    assert "dev_examples    3" in capsys.readouterr().out.splitlines()
    dev.write_text("sentence,label\ngood,positive\n")
    assert error_line(capsys, "eval", "--adapter", out, "--eval-file", dev) == (
        f"peftkit: error: {dev}: line 2 has the class name 'positive' but the training labels are integer class ids; "
        "give class ids")
    dev.write_bytes("sentence,label\ncafé,1\n".encode("latin-1"))
    assert error_line(capsys, "eval", "--adapter", out, "--eval-file", dev) == (
        f"peftkit: error: {dev}: not UTF-8 text (byte 0xe9 at offset 18); save the file as UTF-8")


MRPC_HEAD = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


@pytest.mark.parametrize("task, split, row, message", [
    ("mrpc", "dev", "2\t1\t2\ta\tb", "row 2: the label '2' is not valid; this task's labels are 0..1"),
    ("mrpc", "train", "-1\t1\t2\ta\tb", "row 2: the label '-1' is not valid; this task's labels are 0..1"),
    ("stsb", "train", "a man\ta woman\tnan", "row 2: the score 'nan' is not a finite number"),
    ("stsb", "dev", "a man\ta woman\t3.0\textra", "row 2 has 4 field(s) but the header has 3 (['sentence1', "
                                                  "'sentence2', 'score']); GLUE .tsv files have no quoting, so a "
                                                  "field cannot hold a tab"),
])
def test_glue_files_from_data_dir_are_checked_before_writing_anything(tiny_model_dir, tmp_path, capsys, task, split,
                                                                     row, message):
    """A dev label out of range was scored as a wrong prediction, a train label failed mid-training (exit 1,
    files left behind) and a NaN score trained on NaN gradients with exit 0."""
    folder = tmp_path / "glue" / ("MRPC" if task == "mrpc" else "STS-B")
    folder.mkdir(parents=True)
    head = MRPC_HEAD if task == "mrpc" else "sentence1\tsentence2\tscore\n"
    good = "1\t1\t2\tthe cat\ta cat\n" if task == "mrpc" else "a cat\ta dog\t3.2\n"
    for name in ("train", "dev"):
        (folder / f"{name}.tsv").write_text(head + (row + "\n" if name == split else "") + good * 3, encoding="utf-8")
    before = snapshot(tmp_path)
    line = error_line(capsys, "train", "--model", tiny_model_dir, "--task", task, "--data-dir", tmp_path / "glue",
                      "--max-steps", 1, "--output-dir", tmp_path / "run", "--no-progress")
    assert line == f"peftkit: error: {folder / (split + '.tsv')}: {message}"
    assert snapshot(tmp_path) == before


def test_eval_of_a_file_run_needs_only_its_eval_file(tiny_model_dir, tmp_path, capsys):
    """eval re-read the training file: deleted, it failed ('does not exist'); edited, or with an eval label
    the run lacks, it gave a misleading shape mismatch. The classes come from run_config.json now."""
    train = jsonl(tmp_path / "train.jsonl", [{"text": f"w{i}", "label": i % 3} for i in range(6)])
    dev = jsonl(tmp_path / "dev.jsonl", [{"text": f"w{i}", "label": i % 3} for i in range(3)])
    run = tmp_path / "run"
    assert cli("train", "--model", tiny_model_dir, "--train-file", train, "--eval-file", dev, "--max-steps", 1,
               "--batch-size", 2, "--output-dir", run, "--no-progress") == 0
    trained = json.loads((run / "metrics.json").read_text())["dev_accuracy"]
    train.unlink()
    capsys.readouterr()
    assert cli("eval", "--adapter", run) == 0
    assert f"dev_accuracy    {trained:.4f}" in capsys.readouterr().out
    big = jsonl(tmp_path / "big.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 7}])
    assert error_line(capsys, "eval", "--adapter", run, "--eval-file", big) == (
        f"peftkit: error: {big}: line 2 has the class id 7; the run's model has 3 classes (0..2)")


@pytest.mark.parametrize("content, message", [
    (b"", "the file holds no row of data"),
    (b"sentence\tlabel\n", "the file holds no row of data (only a header)"),
    (b"text\tlabel\ngood\t1\n", "the header has no column 'sentence'; its columns are ['text', 'label']"),
    ("sentence\tlabel\ncaf\u00e9\t1\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 18); save the file as UTF-8"),
])
def test_glue_train_files_that_cannot_be_read_are_named(tmp_path, content, message):
    """These raised a bare ValueError/IndexError/UnicodeDecodeError naming no file (exit 1)."""
    from peftkit.train.data import load_task

    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_bytes(content)
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_task("sst2", tmp_path)
    assert str(err.value) == f"{folder / 'train.tsv'}: {message}"


def test_glue_files_with_a_byte_order_mark_and_named_labels(tmp_path):
    from peftkit.train.data import load_task

    (tmp_path / "SST-2").mkdir()
    for split in ("train", "dev"):  # a BOM, as Excel and Notepad write: the first column read '\ufeffsentence'
        (tmp_path / "SST-2" / f"{split}.tsv").write_bytes(b"\xef\xbb\xbfsentence\tlabel\ngood\t1\nbad\t0\n")
    assert [e["label"] for e in load_task("sst2", tmp_path).train] == [1, 0]
    (tmp_path / "RTE").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailed\n")
    with pytest.raises(DataError, match="row 2: the label 'entailed' is not valid; this task's labels are "
                                        r"\['entailment', 'not_entailment'\]"):
        load_task("rte", tmp_path)


def test_a_tsv_row_with_a_tab_in_a_field_says_tsv_has_no_quoting(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text('text\tlabel\n"a\tb"\t1\n')
    with pytest.raises(DataError, match=r"a field holds a tab \(.tsv files are read without quoting, as GLUE's are: "
                                        "save the file as .csv to quote fields"):
        read_table(f)


def test_train_options_that_cannot_work_are_refused_before_writing(tiny_model_dir, tmp_path, capsys):
    one = jsonl(tmp_path / "one.jsonl", [{"text": "good", "label": "pos"}, {"text": "nice", "label": "pos"}])
    ids = jsonl(tmp_path / "ids.jsonl", [{"text": "good", "label": 0}, {"text": "nice", "label": 0}])
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence\tother\tlabel\na film\tterrible\t1\nawful\tsuperb\t0\n")
    before = snapshot(tmp_path)
    common = ("--model", tiny_model_dir, "--max-steps", 1, "--output-dir", tmp_path / "run", "--no-progress")
    # one class: the run was trained, then eval/predict refused its run_config.json as damaged
    assert error_line(capsys, "train", "--train-file", one, "--eval-file", one, *common) == (
        f"peftkit: error: {one}: every label is 'pos'; a classifier needs at least two classes in the training file")
    # one class id: it trained a two-class head on one class, where class names were refused
    assert error_line(capsys, "train", "--train-file", ids, "--eval-file", ids, *common) == (
        f"peftkit: error: {ids}: every label is the class id 0; a classifier needs at least two classes in the "
        "training file")
    # SST-2 trained on sentences and scored on pairs
    assert "--pair-column 'other': task 'sst2' classifies single sentences" in error_line(
        capsys, "train", "--eval-file", pairs, "--pair-column", "other", *common)
    # shorter than the special tokens: the tokenizer left every row uncut
    assert error_line(capsys, "train", "--task", "rte", "--max-length", 4, *common) == (
        "peftkit: error: --max-length 4 is too short: this tokenizer adds 3 special tokens to each pair, so a row "
        "needs at least 5 tokens to hold any text")
    assert snapshot(tmp_path) == before


def test_spearman_of_nan_predictions_is_nan():
    import math

    from peftkit.train.metrics import pearson, spearman

    assert math.isnan(spearman([float("nan"), 1, 2], [1, 2, 3]))  # it ranked NaN highest: -0.5
    assert math.isnan(pearson([float("nan"), 1, 2], [1, 2, 3]))
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)


def test_eval_file_in_the_tasks_own_glue_layout_and_named_columns(tiny_model_dir, tmp_path, capsys):
    """A task's own dev.tsv was refused as --eval-file (CoLA's has no header; STS-B is a regression), and the
    message said to pass --text-column, which eval did not take."""
    from peftkit.train.data import load_task, shipped_data_dir

    common = ("--model", tiny_model_dir, "--max-steps", 1, "--max-train-samples", 16, "--max-eval-samples", 8,
              "--no-progress")
    for task, folder, metric in (("cola", "CoLA", "matthews"), ("stsb", "STS-B", "pearson")):
        run = tmp_path / task
        assert cli("train", "--task", task, "--output-dir", run, *common) == 0
        capsys.readouterr()
        assert cli("eval", "--adapter", run, "--eval-file", shipped_data_dir() / folder / "dev.tsv") == 0
        lines = capsys.readouterr().out.splitlines()
        assert f"dev_examples    {len(load_task(task).dev)}" in lines  # the whole file, read as the task reads it
        assert any(line.startswith(f"dev_{metric}") for line in lines)
    table = tmp_path / "mine.csv"
    table.write_text("review,gold\nan awful film,0\na fine film,1\n")
    assert error_line(capsys, "eval", "--adapter", tmp_path / "cola", "--text-column", "review") == (
        "peftkit: error: --text-column names a column of --eval-file; give the file too")
    assert cli("eval", "--adapter", tmp_path / "cola", "--eval-file", table, "--text-column", "review",
               "--label-column", "gold") == 0
    assert "dev_examples    2" in capsys.readouterr().out.splitlines()


def test_train_and_dev_files_of_different_shapes_are_refused(tiny_model_dir, tmp_path, capsys):
    """A sentence1/sentence2 training file and a sentence1 dev file (or the reverse) trained on one shape and
    scored on the other; a named single-sentence task took a pair eval file the same way."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sentence1,sentence2,label\n" + "".join(f"a{i},b{i},{i % 2}\n" for i in range(6)))
    single = tmp_path / "single.csv"
    single.write_text("sentence1,label\n" + "".join(f"a{i},{i % 2}\n" for i in range(6)))
    common = ("--model", tiny_model_dir, "--max-steps", 1, "--output-dir", tmp_path / "run", "--no-progress")
    before = snapshot(tmp_path)
    assert error_line(capsys, "train", "--train-file", pairs, "--eval-file", single, *common) == (
        f"peftkit: error: --train-file {str(pairs)!r} gives sentence pairs but --eval-file {str(single)!r} gives "
        "single sentences; give files of one shape (or name the columns with --text-column / --pair-column)")
    assert "gives single sentences but --eval-file" in error_line(capsys, "train", "--train-file", single,
                                                                 "--eval-file", pairs, *common)
    assert error_line(capsys, "train", "--task", "sst2", "--eval-file", pairs, *common) == (
        f"peftkit: error: --eval-file {str(pairs)!r} gives sentence pairs (sentence1, sentence2), but task 'sst2' "
        "classifies single sentences; name the text column with --text-column")
    assert snapshot(tmp_path) == before


def test_a_causal_lm_text_column_is_read_or_refused(tmp_path):
    """--text-column was recorded and ignored for prompt/response rows (the shipped TREC ones too) and plain text."""
    import json

    from peftkit.train.data import DataError
    from peftkit.train.run import _read_lm_records

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "one two", "prompt": "q", "response": "a"}) + "\n")
    assert _read_lm_records(str(rows), "body", column_given=True) == [{"body": "one two"}]
    assert _read_lm_records(str(rows), "body")[0]["prompt"] == "q"  # without the option: prompt/response, as before
    with pytest.raises(DataError, match=r"line 1 has no 'nope' \(--text-column\) \(a prompt/response row\)"):
        _read_lm_records(str(rows), "nope", column_given=True)
    text = tmp_path / "plain.txt"
    text.write_text("one\n\ntwo\n")
    with pytest.raises(DataError, match=r"--text-column 'body' names a field of JSONL/CSV/TSV rows, but .* plain text"):
        _read_lm_records(str(text), "body", column_given=True)


def test_a_causal_lm_run_with_a_text_column_is_evaluated_on_other_files(tmp_path):
    """The run's --text-column was applied strictly to an --eval-file given to eval, which has no such option: a
    plain-text or prompt/response file was refused."""
    from peftkit.train.run import RunConfig, _lm_records

    text = tmp_path / "dev.txt"
    text.write_text("one two\n\nthree four\n")
    cfg = RunConfig(task="causal-lm", text_column="body", eval_file=str(text))
    assert _lm_records(cfg, train_too=False)[1] == ["one two", "three four"]


def test_metric_edges_match_the_reference_formulas():
    """Pearson read 0.0 for predictions scaled by 1e160 (the variance overflowed) and 0.9935 at 1e-160; inputs of
    different lengths were broadcast (F1 1.33); a NaN next to a constant side read 0 for Pearson, NaN for Spearman."""
    import math

    from peftkit.train.metrics import accuracy, f1, matthews, pearson, spearman

    for scale in (1.0, 1e160, 1e-160, 1e300):
        assert pearson([scale, 2 * scale, 3.5 * scale], [1, 2, 3]) == pytest.approx(0.9933992677987828, abs=1e-12)
    assert pearson([0.1, 0.1, 0.1], [1, 2, 3]) == 0.0  # constant (its mean has rounding)
    # a large common offset keeps its precision (scaling by the largest value itself rounded it away: 0.853)
    assert pearson([1e16, 1e16 + 2, 1e16 + 4], [1, 2, 3]) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(pearson([float("nan"), 1, 2], [1, 1, 1]))
    assert math.isnan(spearman([float("nan"), 1, 2], [1, 1, 1]))
    for metric in (accuracy, f1, matthews, pearson, spearman):
        with pytest.raises(ValueError, match=r"one length; got shapes \(1,\) and \(3,\)"):
            metric([1], [1, 0, 1])
        assert math.isnan(metric([1, float("nan"), 0], [1, 0, 0]))  # a diverged model's prediction


def test_a_diverged_classifier_scores_nan_not_the_first_class(tiny_model_dir):
    """NaN logits have argmax 0, so a diverged classifier scored as if it always answered class 0 (CoLA: accuracy
    0.35, MCC 0.0, with no warning from eval); and a causal LM with a NaN loss read perplexity inf."""
    import math

    import torch

    from peftkit.train.data import collate
    from peftkit.train.trainer import perplexity, predict

    class Diverged(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.logits = logits

        def forward(self, input_ids, attention_mask=None, **_):
            out = self.logits[: len(input_ids)].clone()
            return type("Out", (), {"logits": out})()

    rows = [{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1]), "labels": torch.tensor(i % 2)}
            for i in range(3)]
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [2.0, 1.0]])
    preds, gold = predict(Diverged(logits), rows, collate(0))
    assert preds[0] == 1 and preds[2] == 0 and math.isnan(preds[1]) and gold == [0, 1, 0]
    lm_rows = [{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1]), "labels": torch.tensor([1, 2])}]
    nan_lm = Diverged(torch.full((1, 2, 3), float("nan")))
    assert math.isnan(perplexity(nan_lm, lm_rows, lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})["perplexity"])
