"""peftkit: parameter-efficient fine-tuning of pretrained transformers.

The public API mirrors HuggingFace PEFT so that code ports by changing the import::

    from peftkit import LoraConfig, get_peft_model, PeftModel
"""

from peftkit._version import __version__
from peftkit.config import ConfigError, MethodSpec, PeftConfig, all_methods, get_method, register_method
from peftkit.formats.hf_peft import AdapterLoadError, get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.child_tuning import ChildTuningConfig
from peftkit.methods.diff_pruning import DiffPruningConfig
from peftkit.methods.fish import FishMaskConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.partial import PartialConfig
from peftkit.model import PeftModel, get_peft_model

__all__ = [
    "AdapterLoadError",
    "BitFitConfig",
    "ChildTuningConfig",
    "ConfigError",
    "DiffPruningConfig",
    "FishMaskConfig",
    "LoraConfig",
    "MethodSpec",
    "PartialConfig",
    "PeftConfig",
    "PeftModel",
    "__version__",
    "all_methods",
    "get_method",
    "get_peft_model",
    "get_peft_model_state_dict",
    "register_method",
    "set_peft_model_state_dict",
]
