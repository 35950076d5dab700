"""Shared fixtures: tiny randomly initialised models (hidden size 8-32) and helpers."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_bert_classifier(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def perturb(model: nn.Module, std: float = 0.3) -> None:
    """Give every trainable (adapter) parameter a random non-zero value, so merge bugs show."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


def ids(batch: int = 3, seq: int = 7, vocab: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT classifier saved with the real MiniLM tokenizer (vocab 30522, hidden 16)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit.train.run import default_model_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_gpt2_dir(tmp_path):
    """A tiny random GPT-2 (a learned table of 32 positions) saved with stories260K's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from peftkit.train.data import shipped_model_dir

    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    folder = tmp_path / "gpt"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=len(tok))).save_pretrained(
        folder)
    tok.save_pretrained(folder)
    return folder
