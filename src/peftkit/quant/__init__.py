"""Quantisation PEFT: a 4-bit / 8-bit frozen base under any wrap-style adapter (QLoRA), LoftQ
initialisation, QA-LoRA, and merging adapters into a quantised base.

    from peftkit import LoraConfig, get_peft_model
    from peftkit.quant import quantize_base, merge_and_unload_quantized

    model = quantize_base(model, "nf4")            # QLoRA's base: NF4 + double-quantised scales
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear"))
    ...train...
    plain = merge_and_unload_quantized(peft_model)  # exact: merged layers back in float

The quantisers are torchao's (``pip install 'peftkit[quant]'``); LoftQ's simple quantisers need
nothing beyond torch.
"""

from peftkit.quant.base import (
    HEAD_NAMES,
    WeightMemory,
    base_weight_memory,
    dequantize_base,
    merge_and_unload_quantized,
    quantize_base,
)
from peftkit.quant.formats import METHODS, AffineFormat, NF4Format, make_format
from peftkit.quant.layer import QuantEmbedding, QuantLinear, QuantWeight
from peftkit.quant.loftq import LoftQConfig, loftq_decompose

__all__ = [
    "HEAD_NAMES",
    "METHODS",
    "AffineFormat",
    "LoftQConfig",
    "NF4Format",
    "QuantEmbedding",
    "QuantLinear",
    "QuantWeight",
    "WeightMemory",
    "base_weight_memory",
    "dequantize_base",
    "loftq_decompose",
    "make_format",
    "merge_and_unload_quantized",
    "quantize_base",
]
