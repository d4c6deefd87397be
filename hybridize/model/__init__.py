"""The hybrid model, registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import HybridCache
from .configuration_hybrid import LAYER_TYPES, HybridConfig, HybridConfigError
from .modeling_hybrid import HybridForCausalLM, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = ["LAYER_TYPES", "HybridCache", "HybridConfig", "HybridConfigError", "HybridForCausalLM", "HybridModel"]
