"""Training: tasks and data, the loop (one or several processes, checkpoints), metrics, and whole runs
(what ``peftkit train`` does)."""

from peftkit.train.data import CausalLMDataset, TokenizedDataset, collate, collate_causal, load_task
from peftkit.train.run import RunConfig, evaluate_run, resume_run, run_training
from peftkit.train.trainer import Trainer, TrainingArguments, perplexity, predict

__all__ = [
    "CausalLMDataset",
    "RunConfig",
    "TokenizedDataset",
    "Trainer",
    "TrainingArguments",
    "collate",
    "collate_causal",
    "evaluate_run",
    "load_task",
    "perplexity",
    "predict",
    "resume_run",
    "run_training",
]
