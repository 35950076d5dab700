"""Train-step time of peftkit against the ``peft`` package for LoRA and DoRA, in one process.

Issue 3's targets: peftkit's LoRA step no slower than peft's, and peftkit's DoRA step at most 0.8x
peft's DoRA step, on

* ``llama``: a ~20M-parameter Llama (hidden 512, intermediate 1376, 5 layers, 8 heads, vocab 8192),
  batch 8 x 128, causal-LM loss;
* ``minilm``: a MiniLM-shaped BERT encoder (hidden 384, 6 layers, 12 heads, intermediate 1536,
  vocab 30522), batch 32 x 64, sequence-classification loss;

with r=8, alpha=16, every linear layer of the transformer blocks adapted, dropout 0 and 0.1.

Both libraries adapt deep copies of the same randomly initialised model. A step is forward, backward,
an AdamW step and ``zero_grad``. After warm-up, the contenders run round-robin (one step each per
round) so that machine noise hits them alike; the median over the rounds is reported, with the
ratios. Nothing is downloaded. Run it on a quiet machine::

    PYTHONPATH=src python benchmarks/bench_reparam.py --reps 30
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

BLOCK_LINEARS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "minilm": ["query", "key", "value", "output.dense", "intermediate.dense"],
}


def build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The base model (train mode) and one batch for it."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "llama":
        cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=5,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 8192, (8, 128))
        batch = {"input_ids": ids, "labels": ids}
    else:
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=512, num_labels=2)
        model = BertForSequenceClassification(cfg)
        batch = {"input_ids": torch.randint(0, 30522, (32, 64)), "labels": torch.randint(0, 2, (32,))}
    return model.train(), batch


def contenders(name: str, dropout: float) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """``{label: (adapted model, optimiser)}`` for peft/peftkit x LoRA/DoRA."""
    import peft

    import peftkit

    base, _ = build(name)
    out = {}
    for dora in (False, True):
        for lib in (peft, peftkit):
            torch.manual_seed(1)
            config = lib.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=BLOCK_LINEARS[name],
                                    use_dora=dora)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = lib.get_peft_model(copy.deepcopy(base), config)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            out[f"{lib.__name__}-{'dora' if dora else 'lora'}"] = (model, opt)
    return out


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """Seconds for one training step."""
    start = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(name: str, dropout: float, reps: int, warmup: int) -> dict[str, float]:
    """Median step seconds of each contender, measured round-robin."""
    _, batch = build(name)
    runners = contenders(name, dropout)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(warmup):
        for model, opt in runners.values():
            step(model, opt, batch)
    for _ in range(reps):
        for label, (model, opt) in runners.items():
            times[label].append(step(model, opt, batch))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama", "minilm"], choices=list(BLOCK_LINEARS))
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.1])
    parser.add_argument("--reps", type=int, default=20, help="measured rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} rounds after {args.warmup}")
    header = (f"{'model':<7} {'drop':>4}  {'peft lora':>9} {'kit lora':>9} {'peft dora':>9} {'kit dora':>9}  "
              f"{'lora kit/peft':>13} {'dora kit/peft':>13} {'kit dora/lora':>13} {'peft dora/lora':>14}")
    print(header)
    for name in args.models:
        for dropout in args.dropouts:
            t = measure(name, dropout, args.reps, args.warmup)
            ms = {k: 1000 * v for k, v in t.items()}
            print(f"{name:<7} {dropout:>4.2f}  {ms['peft-lora']:>7.1f}ms {ms['peftkit-lora']:>7.1f}ms "
                  f"{ms['peft-dora']:>7.1f}ms {ms['peftkit-dora']:>7.1f}ms  "
                  f"{t['peftkit-lora'] / t['peft-lora']:>13.3f} {t['peftkit-dora'] / t['peft-dora']:>13.3f} "
                  f"{t['peftkit-dora'] / t['peftkit-lora']:>13.3f} {t['peft-dora'] / t['peft-lora']:>14.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
