"""peftkit: parameter-efficient fine-tuning of pretrained transformers.

The public API mirrors HuggingFace PEFT so that code ports by changing the import::

    from peftkit import LoraConfig, get_peft_model, PeftModel
"""

from peftkit._version import __version__
from peftkit.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from peftkit.config import (
    AdapterNotFoundError,
    ConfigError,
    MethodSpec,
    PeftConfig,
    TaskType,
    all_methods,
    get_method,
    register_method,
)
from peftkit.formats.hf_peft import AdapterLoadError, get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.inject import inject_adapter_in_model
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.adapters import (
    AdapterDropConfig,
    BottleneckConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    HoulsbyConfig,
    ParallelConfig,
    PfeifferConfig,
)
from peftkit.methods.adaption_prompt import AdaptionPromptConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.child_tuning import ChildTuningConfig
from peftkit.methods.compose import ComposedConfig
from peftkit.methods.diff_pruning import DiffPruningConfig
from peftkit.methods.dylora import DyLoraConfig, set_dylora_rank
from peftkit.methods.fish import FishMaskConfig
from peftkit.methods.fourierft import FourierFTConfig
from peftkit.methods.fusion import AdapterFusionConfig, add_fusion
from peftkit.methods.gated import GatedBottleneckConfig, GatedLoraConfig, GatedPrefixTuningConfig
from peftkit.methods.hra import HRAConfig
from peftkit.methods.hybrid import mam_config, unipelt_config
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.krona import KronaConfig
from peftkit.methods.ln_tuning import LNTuningConfig
from peftkit.methods.loha import LoHaConfig
from peftkit.methods.lokr import LoKrConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.lorafa import LoraFAConfig
from peftkit.methods.moe_lora import MoeLoraConfig
from peftkit.methods.oft import OFTConfig
from peftkit.methods.p_tuning import PromptEncoderConfig
from peftkit.methods.partial import PartialConfig
from peftkit.methods.poly import PolyConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.shira import ShiraConfig
from peftkit.methods.sora import SoraConfig
from peftkit.methods.ssf import SSFConfig
from peftkit.methods.trainable_tokens import TrainableTokensConfig
from peftkit.methods.vblora import VBLoRAConfig
from peftkit.methods.vera import VeraConfig
from peftkit.mixed import PeftMixedModel
from peftkit.model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from peftkit.optimizers import create_loraplus_optimizer
from peftkit.quant import LoftQConfig, merge_and_unload_quantized, quantize_base
from peftkit.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from peftkit.utils import (
    PeftType,
    PromptEncoderReparameterizationType,
    PromptTuningInit,
    get_peft_config,
    load_peft_weights,
    prepare_model_for_kbit_training,
)

__all__ = [
    "AdaLoraConfig",
    "AdapterDropConfig",
    "AdapterFusionConfig",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdaptionPromptConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BitFitConfig",
    "BottleneckConfig",
    "ChildTuningConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ComposedConfig",
    "ConfigError",
    "DiffPruningConfig",
    "DyLoraConfig",
    "FishMaskConfig",
    "FourierFTConfig",
    "GatedBottleneckConfig",
    "GatedLoraConfig",
    "GatedPrefixTuningConfig",
    "HRAConfig",
    "HoulsbyConfig",
    "IA3Config",
    "KronaConfig",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraFAConfig",
    "MethodSpec",
    "MoeLoraConfig",
    "OFTConfig",
    "ParallelConfig",
    "PartialConfig",
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PfeifferConfig",
    "PolyConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SSFConfig",
    "ShiraConfig",
    "SoraConfig",
    "TaskType",
    "TrainableTokensConfig",
    "TunerLayerStatus",
    "TunerModelStatus",
    "VBLoRAConfig",
    "VeraConfig",
    "__version__",
    "add_fusion",
    "all_methods",
    "create_loraplus_optimizer",
    "get_layer_status",
    "get_method",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "mam_config",
    "merge_and_unload_quantized",
    "prepare_model_for_kbit_training",
    "quantize_base",
    "register_method",
    "set_dylora_rank",
    "set_peft_model_state_dict",
    "unipelt_config",
]
