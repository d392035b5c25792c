"""reformer_jax: the Reformer (Kitaev, Kaiser, Levskaya, ICLR 2020) in JAX/Flax, with XLA memory analysis.

    from reformer_jax import ModelConfig, ReformerLM
    config = ModelConfig.preset("reformer", n_hashes=4)
    logits = ReformerLM(config).apply({"params": params}, tokens, rngs={"lsh": key})
"""

from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import ReformerLM, ReformerTrunk, init_params, model_for

__all__ = ["ModelConfig", "ReformerLM", "ReformerTrunk", "init_params", "model_for"]
__version__ = "0.1.0"
