"""Training: tasks and data, the loop (one or several processes, checkpoints), metrics, whole runs
(what ``peftkit train`` does), and serving a trained run (``peftkit predict``)."""

from peftkit.train.data import CausalLMDataset, TokenizedDataset, collate, collate_causal, load_task
from peftkit.train.run import RunConfig, evaluate_run, resume_run, run_training
from peftkit.train.serve import predict_run
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
    "predict_run",
    "resume_run",
    "run_training",
]
