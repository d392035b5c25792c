"""The model: its configuration, the layers' parameters and block functions, ReformerLM, and HF conversion."""

from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import ReformerLM, init_params

__all__ = ["ModelConfig", "ReformerLM", "init_params"]
