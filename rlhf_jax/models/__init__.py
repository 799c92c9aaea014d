"""Flax NNX decoder models (GPT-2, Llama/Qwen2/Mistral), their heads, and HF interop."""

from rlhf_jax.models.config import ModelConfig, gpt2_config
from rlhf_jax.models.heads import CausalLM, ScalarModel
from rlhf_jax.models.hf import (
                                CheckpointError,
                                config_from_hf,
                                hf_config_from,
                                load_pretrained,
                                read_hf_config,
                                save_pretrained,
)
from rlhf_jax.models.transformer import init_cache

__all__ = [
    "CausalLM", "CheckpointError", "ModelConfig", "ScalarModel", "config_from_hf",
    "gpt2_config", "hf_config_from", "init_cache", "load_pretrained",
    "read_hf_config", "save_pretrained",
]
