"""Compile-time memory analysis of the training step (the public entry; the step is built by
`reformer_jax.training.step_builder`, its figures read by `reformer_jax.xla.memory_analysis`).

    from reformer_jax import ModelConfig
    from reformer_jax.memory import analyze_train_step
    print(analyze_train_step(ModelConfig.preset("reformer"), batch_size=1, seq_len=4096).summary())
"""

from reformer_jax.training.step_builder import analyze_train_step, compile_train_step
from reformer_jax.xla.memory_analysis import MemoryStats, floor_bytes

__all__ = ["MemoryStats", "analyze_train_step", "compile_train_step", "floor_bytes"]
