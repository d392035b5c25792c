"""Compile-time memory analysis of the training step (the public entry; the code is in `reformer_jax.xla`).

    from reformer_jax import ModelConfig
    from reformer_jax.memory import analyze_train_step
    print(analyze_train_step(ModelConfig.preset("reformer"), batch_size=1, seq_len=4096).summary())
"""

from reformer_jax.xla.memory_analysis import MemoryStats, analyze_train_step, compile_train_step, floor_bytes

__all__ = ["MemoryStats", "analyze_train_step", "compile_train_step", "floor_bytes"]
