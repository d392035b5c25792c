"""Pure-JAX kernels: the memory-critical cores, each with its own custom_vjp where it needs one.

No Flax and no ModelConfig here: every function takes arrays and plain Python settings, so the kernels can be
used, tested and measured on their own.

- `lsh`: sort-based LSH attention (shared QK, chunks before and after, rounds combined by logsumexp, one round
  at a time), causal or bidirectional, with an optional padding mask.
- `full`: full shared-QK attention (causal or bidirectional), the reference LSH is compared with.
- `local`: chunked local attention with a window of chunks before and after.
- `per_head`: the attention block one head at a time, with its reverse step for reversible layers.
- `reversible`: the reversible stack as one custom_vjp around one scan of all layers.
- `output_head`: the output projection and loss, chunked over positions.
- `padding`: moving padded positions out of the way of bucketed and chunked attention.
"""
