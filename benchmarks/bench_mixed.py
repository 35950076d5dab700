"""Mixed-adapter batches: peftkit vs the ``peft`` package, in one process, interleaved.

8 LoRA adapters (r=8, all block linears) on the ~20M Llama (rows x 128 tokens) and the MiniLM-shaped
encoder (rows x 64 tokens), 32 rows by default, each row assigned round-robin to an adapter.
Reports, per model:
* peftkit mixed forward / peftkit single-adapter unmerged forward (target <= 1.1x),
* peftkit mixed forward / peft mixed forward (target <= 0.8x),
* the frozen base model's forward / peft mixed forward: the best any mixed path could reach (a side
  path costing nothing), which tells whether the 0.8x target is reachable on that model at all.

    python -m benchmarks.bench_mixed [--reps 10] [--adapters 8] [--rows 32]
"""

from __future__ import annotations

import argparse
import copy
import warnings
from functools import partial

import torch

from benchmarks.common import BLOCK_LINEARS, interleaved, make_batch, make_model


def build(model_name: str, n_adapters: int):
    import peft

    import peftkit

    base = make_model(model_name).eval()
    targets = BLOCK_LINEARS[model_name]
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                          init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                         init_lora_weights=False))
    for i in range(1, n_adapters):
        ours.add_adapter(f"a{i}", peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                     init_lora_weights=False))
        theirs.add_adapter(f"a{i}", peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                    init_lora_weights=False))
    return ours.eval(), theirs.eval()


@torch.no_grad()
def base_forward(model, x) -> None:
    with model.disable_adapter():
        model(input_ids=x)


@torch.no_grad()
def forward(model, x, names=None) -> None:
    if names is None:
        model(input_ids=x)
    else:
        model(input_ids=x, adapter_names=names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--models", default="llama20m,minilm")
    args = parser.parse_args()
    for model_name in args.models.split(","):
        ours, theirs = build(model_name, args.adapters)
        seq = make_batch(model_name)["input_ids"].shape[1]
        x = torch.randint(1000, 8000, (args.rows, seq), generator=torch.Generator().manual_seed(0))
        names = ["default" if i % args.adapters == 0 else f"a{i % args.adapters}" for i in range(x.shape[0])]

        med = interleaved({"ours_mixed": partial(forward, ours, x, names), "ours_single": partial(forward, ours, x),
                           "peft_mixed": partial(forward, theirs, x, names), "peft_single": partial(forward, theirs, x),
                           "base": partial(base_forward, ours, x)},
                          args.reps)
        print(f"{model_name}: rows {x.shape[0]} x {x.shape[1]} tokens, {args.adapters} adapters; "
              + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med.items()))
        print(f"  peftkit mixed / peftkit single = {med['ours_mixed'] / med['ours_single']:.3f} (target <= 1.1)")
        print(f"  peftkit mixed / peft mixed     = {med['ours_mixed'] / med['peft_mixed']:.3f} (target <= 0.8)")
        print(f"  peft mixed / peft single       = {med['peft_mixed'] / med['peft_single']:.3f}")
        print(f"  frozen base / peft mixed       = {med['base'] / med['peft_mixed']:.3f} (bound for the 0.8 target)")


if __name__ == "__main__":
    main()
