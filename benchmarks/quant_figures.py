"""Figures for the quantisation note, measured on the real default model (all-MiniLM-L6-v2).

1. Base weight memory per method (quantised layers alone, and the whole base with and without
   quantised embeddings).
2. LoftQ: ``||W - (Q + s B A)||_F / ||W||_F`` summed over every block linear, plain LoRA init
   (``Q = q(W)``, ``B = 0``) vs LoftQ, for the real quantisers and the simple ones.
3. Merging into a quantised base by re-quantising: the rounding error it adds, relative to the merged
   weight and to the adapter's own change ``dW``. ``--adapter RUN_DIR`` uses a trained adapter (a
   ``peftkit train`` run folder); otherwise a random rank-8 change of typical size is used.
4. NF4 backends (when bitsandbytes is importable): torchao vs bitsandbytes, bytes per weight,
   error, dequantisation time.

    python benchmarks/quant_figures.py [--adapter RUN_DIR] [--rank 8]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from peftkit.quant import LoftQConfig, base_weight_memory, loftq_decompose, make_format, quantize_base
from peftkit.train.run import default_model_dir


def load():
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=2)


def block_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().float() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".encoder.layer." in n}


def memory() -> None:
    print("## base weight memory (float32 = 1)")
    for method in ("nf4", "int8", "int4"):
        model = quantize_base(load(), method)
        lin = base_weight_memory(model)
        whole = base_weight_memory(quantize_base(model, method, quantize_embeddings=True))
        print(f"{method:<5} quantised layers {lin.quantized_ratio:.4f}x | whole base {lin.ratio:.4f}x "
              f"({lin.total_bytes / 2**20:.1f} MiB) | with embeddings {whole.ratio:.4f}x ({whole.total_bytes / 2**20:.1f} MiB)")


def loftq(weights: dict[str, torch.Tensor], rank: int) -> None:
    print(f"\n## LoftQ, r={rank}, lora_alpha={2 * rank}: sum ||W - (Q + sBA)|| / sum ||W|| over {len(weights)} linears")
    total = sum(w.norm() for w in weights.values())
    for quantizer, bits in (("nf4", 4), ("int4", 4), ("int8", 8), ("normal", 4), ("uniform", 4), ("normal", 2)):
        plain = sum((w - loftq_decompose(w, 1, 1.0, LoftQConfig(bits, 1, quantizer)).dequantized).norm()
                    for w in weights.values())
        row = [f"plain LoRA init {plain / total:.4f}"]
        for steps in (1, 3):
            err = 0.0
            for w in weights.values():
                res = loftq_decompose(w, rank, 2.0, LoftQConfig(loftq_bits=bits, loftq_iter=steps, quantizer=quantizer))
                err += (w - res.dequantized - 2.0 * res.lora_B @ res.lora_A).norm()
            row.append(f"LoftQ T={steps} {err / total:.4f} ({100 * (1 - err / plain):.1f}% lower)")
        print(f"{quantizer:<7} {bits} bits: " + " | ".join(row), flush=True)


def requantize(weights: dict[str, torch.Tensor], adapter: str | None, rank: int) -> None:
    deltas = {}
    if adapter:
        from peftkit import PeftModel

        peft_model = PeftModel.from_pretrained(load(), adapter)
        for name, w in peft_model.base_model.wrappers():
            if hasattr(w, "adapters") and "default" in w.adapters:
                deltas[name] = w.adapters["default"].delta_weight(w)
        source = f"trained adapter {adapter}"
    else:
        g = torch.Generator().manual_seed(0)
        for name, w in weights.items():  # a rank-r change about 5% of the weight's norm
            d = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            deltas[name] = d * (0.05 * w.norm() / d.norm())
        source = f"random rank-{rank} change, 5% of ||W||"
    print(f"\n## merge by re-quantising ({source})")
    for method in ("nf4", "int8", "int4"):
        fmt = make_format(method)
        err = merged_norm = delta_norm = q_err = 0.0
        for name, d in deltas.items():
            if name not in weights:
                continue
            w = weights[name]
            q = fmt.dequantize(fmt.quantize(w), tuple(w.shape))
            merged = q + d
            again = fmt.dequantize(fmt.quantize(merged), tuple(w.shape))
            err += (again - merged).norm()
            merged_norm += merged.norm()
            delta_norm += d.norm()
            q_err += (q - w).norm()
        print(f"{method:<5} added error {err / merged_norm:.4f} of ||Q + dW|| = {err / delta_norm:.3f} of ||dW|| "
              f"(quantising W itself: {q_err / merged_norm:.4f})")


def backends(weights: dict[str, torch.Tensor]) -> None:
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        print("\n## NF4 backends: bitsandbytes not importable, skipped")
        return
    w = next(v for k, v in weights.items() if "intermediate" in k)
    fmt = make_format("nf4")

    def timed(fn, n=10):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            out = fn()
        return (time.perf_counter() - t) / n * 1e3, out

    state = fmt.quantize(w)
    ms, deq = timed(lambda: fmt.dequantize(state, tuple(w.shape)))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"\n## NF4 backends on a {tuple(w.shape)} weight")
    print(f"torchao       {nbytes / w.numel():.4f} B/weight, rel err {(deq - w).norm() / w.norm():.5f}, dequant {ms:.2f} ms")
    packed, st = bf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    ms, deq = timed(lambda: bf.dequantize_4bit(packed, st, quant_type="nf4"))
    nbytes = packed.numel() * packed.element_size() + st.absmax.numel() * st.absmax.element_size() + \
        st.state2.absmax.numel() * 4 + st.state2.code.numel() * 4
    print(f"bitsandbytes  {nbytes / w.numel():.4f} B/weight, rel err {(deq - w).norm() / w.norm():.5f}, dequant {ms:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="a peftkit train run folder (LoRA on the default model)")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    memory()
    weights = block_linears(load())
    loftq(weights, args.rank)
    requantize(weights, args.adapter, args.rank)
    backends(weights)


if __name__ == "__main__":
    main()
