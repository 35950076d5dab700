"""peftkit: parameter-efficient fine-tuning of pretrained transformers.

The public API mirrors HuggingFace PEFT so that code ports by changing the import::

    from peftkit import LoraConfig, get_peft_model, PeftModel
"""

from peftkit._version import __version__
from peftkit.config import ConfigError, MethodSpec, PeftConfig, all_methods, get_method, register_method
from peftkit.formats.hf_peft import AdapterLoadError, get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.methods.lora import LoraConfig
from peftkit.model import PeftModel, get_peft_model
from peftkit.quant import LoftQConfig, merge_and_unload_quantized, quantize_base

__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "LoftQConfig",
    "LoraConfig",
    "MethodSpec",
    "PeftConfig",
    "PeftModel",
    "__version__",
    "all_methods",
    "get_method",
    "get_peft_model",
    "get_peft_model_state_dict",
    "merge_and_unload_quantized",
    "quantize_base",
    "register_method",
    "set_peft_model_state_dict",
]
