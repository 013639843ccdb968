"""Model architectures of the embedded engine, one file per family, and which file serves each
architecture name of a checkpoint's config.json."""

from ..model_config import ModelConfig
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM

CausalLM = LlamaForCausalLM | Gemma3ForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}


def build_model(config: ModelConfig) -> CausalLM:
    return MODEL_CLASSES[config.architecture](config)
