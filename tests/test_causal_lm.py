"""Causal-LM fine-tuning on the shipped real model (stories260K, a 260K-parameter TinyStories Llama)
and real text (TREC questions): loss masking, truncation, and short runs whose perplexity must drop.
Each run is a few dozen steps on CPU (seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from peftkit.cli import main
from peftkit.train.data import CausalLMDataset, DataError, collate_causal, shipped_data_dir, shipped_model_dir
from peftkit.train.run import RunConfig, evaluate_run, resolve_model_dir, run_training

pytestmark = pytest.mark.slow
TREC = shipped_data_dir() / "TREC"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(shipped_model_dir())


def test_prompt_is_masked_and_response_kept_when_rows_are_cut(tok):
    row = {"prompt": "Question: Who was Galileo ?\nType:", "response": " human"}
    ds = CausalLMDataset([row], tok, max_length=64)
    item = ds[0]
    prompt = tok(row["prompt"])["input_ids"]
    answer = tok(" human" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert item["input_ids"] == prompt + answer
    assert item["labels"] == [-100] * len(prompt) + answer
    assert item["input_ids"][0] == tok.bos_token_id and item["input_ids"][-1] == tok.eos_token_id
    short = CausalLMDataset([row], tok, max_length=len(answer) + 3)[0]
    assert short["input_ids"] == [tok.bos_token_id, *prompt[-2:], *answer]
    assert short["labels"] == [-100] * 3 + answer


def test_plain_text_targets_every_token_and_bad_rows_are_reported(tok):
    ds = CausalLMDataset(["Once upon a time", {"text": "there was a cat"}], tok, max_length=4)
    assert [it["labels"] for it in ds.items] == [it["input_ids"] for it in ds.items]
    assert all(len(it["input_ids"]) == 4 for it in ds.items)
    assert CausalLMDataset(["Once upon a time"], tok, max_length=1).skipped == 1  # no next token to predict
    with pytest.raises(DataError, match="record 1 has neither 'text'"):
        CausalLMDataset([{"question": "x"}], tok, max_length=8)
    batch = collate_causal(0)([{"input_ids": [1, 5], "labels": [-100, 5]}, {"input_ids": [1], "labels": [1]}])
    assert batch["labels"].tolist() == [[-100, 5], [1, -100]] and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_lora_on_stories260k_learns_trec_types_and_reloads(tmp_path):
    cfg = RunConfig(task="causal-lm", model="stories260K", max_steps=30, batch_size=16, max_train_samples=480,
                    max_eval_samples=64, output_dir=str(tmp_path / "run"), progress=False)
    result = run_training(cfg)
    # before: a story model has never seen "Type: location"; after 30 steps the answer words are learnt
    assert result["dev_perplexity_before"] > 100
    assert result["dev_perplexity"] < 0.05 * result["dev_perplexity_before"]
    assert result["dev_examples"] == 64
    again = evaluate_run(tmp_path / "run")
    assert again["dev_perplexity"] == pytest.approx(result["dev_perplexity"], rel=1e-5)


def test_plain_text_file_and_a_bottleneck_adapter_from_the_cli(tmp_path, capsys):
    questions = [json.loads(line)["prompt"].split("\n")[0][len("Question: "):]
                 for line in (TREC / "train.jsonl").read_text(encoding="utf-8").splitlines()[:400]]
    text = tmp_path / "questions.txt"
    text.write_text("\n".join(questions) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", "stories260K", "--method", "houlsby", "--train-file",
                 str(text), "--max-steps", "25", "--batch-size", "16", "--lr", "3e-3", "--output-dir", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"dev perplexity  {metrics['dev_perplexity_before']:.3f} -> {metrics['dev_perplexity']:.3f}" in printed
    assert metrics["dev_examples"] == 40  # the last 10% of the file is held out
    assert metrics["dev_perplexity"] < 0.8 * metrics["dev_perplexity_before"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "HOULSBY"
    # an eval file with no target token is refused (its perplexity read 1.0, a perfect score, with exit 0)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--eval-file", str(empty)]) == 2
    assert f"{empty}: the file holds no text" in capsys.readouterr().err


def test_shipped_model_resolution(tmp_path):
    assert resolve_model_dir(None, "causal-lm") == str(shipped_model_dir())
    assert resolve_model_dir("stories260K", "causal-lm") == str(shipped_model_dir())
    assert resolve_model_dir(str(tmp_path), "sst2") == str(tmp_path)
    assert (shipped_model_dir() / "PROVENANCE.md").read_text().count("MIT") >= 1


def test_paragraphs_of_windows_text_files_and_fields_that_are_not_text(tmp_path):
    """A CRLF file's paragraphs were split into lines (its blank line is \\r\\n\\r\\n); a null or an object in a
    JSONL field was trained on as the text 'None' or "{'a': 1}"."""
    from peftkit.train.run import _read_lm_records

    paragraphs = [f"Story {i} begins.\nIt ends." for i in range(5)]
    lf, crlf, spaced = tmp_path / "lf.txt", tmp_path / "crlf.txt", tmp_path / "spaced.txt"
    lf.write_bytes("\n\n".join(paragraphs).encode())
    crlf.write_bytes("\r\n\r\n".join(p.replace("\n", "\r\n") for p in paragraphs).encode())
    spaced.write_bytes("\n  \n".join(paragraphs).encode())
    want = _read_lm_records(str(lf))
    assert len(want) == 5 and want[0] == "Story 0 begins.\nIt ends."
    assert _read_lm_records(str(crlf)) == want and _read_lm_records(str(spaced)) == want
    for row, field in [({"text": None}, "text"), ({"text": {"a": 1}}, "text"), ({"prompt": "q", "response": None},
                                                                                   "response")]:
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl: line 2: '{field}' holds .*, not text"):
            _read_lm_records(str(f))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no record"):
        _read_lm_records(str(tmp_path / "empty.jsonl"))


def test_eval_file_of_a_causal_run_needs_no_training_file(tmp_path, capsys):
    """eval --eval-file read the run's training file first: moved or deleted, it failed ('does not exist')."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"Once upon a time {i}."}) + "\n" for i in range(30)))
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", "stories260K", "--train-file", str(train),
                 "--max-steps", "1", "--output-dir", str(out), "--no-progress"]) == 0
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "Once upon a time."}) + "\n" + json.dumps({"text": "The dog ran."}) + "\n")
    with_train = evaluate_run(out, eval_file=str(dev))
    train.unlink()
    assert evaluate_run(out, eval_file=str(dev)) == with_train


@pytest.mark.parametrize("gap, want", [(60.0, math.exp(60.0)), (800.0, math.inf)])
def test_perplexity_is_exp_of_the_mean_loss_uncapped(gap, want):
    """It was exp(min(loss, 50)): a mean loss of 60 read 5.2e21 instead of 1.1e26."""
    from types import SimpleNamespace

    from peftkit.train.trainer import perplexity

    class Sure(torch.nn.Module):  # every logit 0 but token 0's, so each target but 0 costs about `gap` nats
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 8, dtype=torch.float64)
            logits[..., 0] = gap
            return SimpleNamespace(logits=logits)

    out = perplexity(Sure(), [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], collate_causal(0))
    loss = gap + math.log1p(7 * math.exp(-gap))
    assert out["loss"] == pytest.approx(loss, rel=1e-9)
    assert out["perplexity"] == pytest.approx(want, rel=1e-6)


def test_an_encoder_is_refused_for_causal_lm(tiny_model_dir, tmp_path, capsys):
    """BERT loaded for causal LM attends both ways: it trained to copy the next token (dev perplexity 58779 ->
    1.6) with no warning (transformers' own was silenced)."""
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(tiny_model_dir), "--max-steps", "1",
                 "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs a causal decoder" in err and "(BertLMHeadModel) lets each position see later tokens" in err
    assert not out.exists()


def test_a_tiny_encoder_is_refused_too(tmp_path, capsys):
    """The probe's fixed tolerance (1e-4) let tiny random encoders through (their logits, ~0.2, moved by 5e-5)."""
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel

    from peftkit.train.run import _check_causal, default_model_dir

    torch.manual_seed(17)
    model = BertLMHeadModel(BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    with pytest.raises(Exception, match="needs a causal decoder"):
        _check_causal(model, "bert8")
    model.save_pretrained(tmp_path / "bert8")
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp_path / "bert8")
    assert main(["train", "--task", "causal-lm", "--model", str(tmp_path / "bert8"), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "needs a causal decoder" in capsys.readouterr().err
