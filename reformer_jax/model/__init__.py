"""The model: its configuration, the layers' parameters and block functions, ReformerLM, and HF conversion."""

from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import ReformerLM, ReformerTrunk, init_params, model_for

__all__ = ["ModelConfig", "ReformerLM", "ReformerTrunk", "init_params", "model_for"]
