"""Peak memory and time of one training step: QLoRA (LoRA on an NF4 base) vs LoRA on a float32 base.

Model: a randomly initialised Llama of about 20M parameters (hidden 512, intermediate 1376, 5 layers,
vocab 8192), LoRA r=8 on every block linear, batch 8 x 128 tokens, AdamW. Each configuration runs in
a fresh subprocess so that peak RSS (CPU) or the CUDA allocator's peak is its own.

    python benchmarks/bench_quant.py [--steps 5] [--device cpu] [--methods float32,nf4,int8]

Reports, per configuration: base weight MiB (as stored); the peak memory during the training steps
(CUDA: the allocator's peak; CPU: the process's resident set sampled every half millisecond, after
the float weights that quantisation replaced were returned to the system; children run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set instead of staying in
glibc's heap), also minus the memory held just before the first step (on CPU that baseline includes
the Python/torch runtime, about 450 MiB); and the median step time. Not a test: run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    """Samples the resident set size until stopped; ``peak`` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)


def one(method: str, steps: int, device: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import LoraConfig, get_peft_model
    from peftkit.quant import base_weight_memory, quantize_base

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=5,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    if method != "float32":
        quantize_base(model, method)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).to(device)
    mem = base_weight_memory(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (8, 128), device=device)
    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed float weights back before measuring
        start_mem = rss_bytes()
        sampler = PeakRSS()
        sampler.start()
    times = []
    model.train()
    for _ in range(steps):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        sampler.running = False
        sampler.join()
        peak = sampler.peak
    return {"method": method, "params": model.get_nb_trainable_parameters()[1],
            "base_weight_mib": mem.total_bytes / 2**20, "base_weight_ratio": mem.ratio,
            "peak_mib": peak / 2**20, "step_peak_over_start_mib": (peak - start_mem) / 2**20,
            "median_step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per base, >= 1 (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--methods", default="float32,nf4,int8",
                        help="comma-separated bases, each one of float32, nf4, int8, int4 (default float32,nf4,int8)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps {args.steps} is not valid; it must be 1 or more")
    if args.child:
        print(json.dumps(one(args.child, args.steps, args.device)))
        return
    rows = []
    for method in args.methods.split(","):
        env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}
        out = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(args.steps),
                              "--device", args.device], capture_output=True, text=True, env=env)
        if out.returncode != 0:  # the child's own error, not just its exit status
            tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            sys.exit(f"bench_quant: the {method!r} run failed (exit {out.returncode}): {tail}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["method"] == "float32"), rows[0])
    print(f"Llama ~{ref['params'] / 1e6:.1f}M params, LoRA r=8 all-linear, batch 8x128, {args.steps} steps, "
          f"{args.device}")
    print(f"{'base':<8} {'weights MiB':>11} {'x fp32':>7} {'peak MiB':>9} {'step peak MiB':>13} {'x fp32':>7} "
          f"{'step s':>7}")
    for r in rows:
        print(f"{r['method']:<8} {r['base_weight_mib']:>11.1f} {r['base_weight_ratio']:>7.3f} {r['peak_mib']:>9.0f} "
              f"{r['step_peak_over_start_mib']:>13.0f} {r['peak_mib'] / ref['peak_mib']:>7.2f} "
              f"{r['median_step_s']:>7.3f}")


if __name__ == "__main__":
    main()
