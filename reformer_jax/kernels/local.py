"""Local (chunked) attention with separate queries, keys and values, as a pure JAX function.

The layer type that alternates with LSH layers in the trax / Hugging Face Reformer checkpoints, with their
semantics:
- scores q . k / sqrt(d_head) (no key normalisation, no self mask);
- the sequence is cut into chunks of `chunk_len`; each chunk attends to itself, the `n_chunks_before` previous
  chunks and the `n_chunks_after` following ones, wrapping around (the first chunks look back to the last ones,
  the last look ahead to the first: Hugging Face's `_look_adjacent`; the causal mask removes the wrapped keys of
  a causal model, a bidirectional one attends to them);
- masked keys (causal: after the query; padding: `key_mask` False) get MASK_VALUE (-1e9), as Hugging Face does.
A sequence no longer than one chunk is one chunk with no look-back, i.e. ordinary attention.

Axes: b batch, h heads, n chunks, q / s query / seen-key positions in a chunk, k d_head.
Memory is O(b h l (n_chunks_before + 1 + n_chunks_after) c): the chunk score matrices, kept by plain autodiff for
the backward pass.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from reformer_jax.kernels.full import MASK_VALUE
from reformer_jax.kernels.full import as_key_mask
from reformer_jax.kernels.lsh import look_adjacent  # the same wrap-around adjacent chunks as LSH


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_len: int, n_chunks_before: int = 1,
                    causal: bool = True, key_mask: Optional[jax.Array] = None, dropout_rate: float = 0.0,
                    dropout_rng: Optional[jax.Array] = None, n_chunks_after: int = 0) -> jax.Array:
    """Chunked attention: q, k, v [b, h, l, k] -> [b, h, l, k] (v's dtype; scores in at least float32).

    Args:
      q, k, v: queries, keys, values.
      chunk_len: c; the length must be a multiple of it, or at most c (then one chunk, no look-back).
      n_chunks_before: previous chunks each chunk attends to (wrapping around from the first chunk to the last).
      causal: mask keys at later positions.
      n_chunks_after: following chunks each chunk attends to (wrapping around from the last chunk to the first);
        > 0 for bidirectional (causal=False) attention, as Hugging Face's local_num_chunks_after.
      key_mask: [b, l] bool, False for padding: those keys are masked for every query.
      dropout_rate, dropout_rng: dropout on the attention weights.
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"local_attention: q, k, v must be [batch, heads, length, d_head] of matching shapes; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}.")
    b, h, length, d_head = q.shape
    if chunk_len < 1 or (length > chunk_len and length % chunk_len):
        raise ValueError(f"local_attention: length {length} is not a multiple of chunk_len={chunk_len}; pad the "
                         "sequence or choose a chunk_len dividing it.")
    for name, value in (("n_chunks_before", n_chunks_before), ("n_chunks_after", n_chunks_after)):
        if value < 0:
            raise ValueError(f"local_attention: {name}={value} must be >= 0.")
    key_mask = as_key_mask(key_mask, b, length, "local_attention")
    if dropout_rate and dropout_rng is None:
        raise ValueError("local_attention: dropout_rate > 0 needs a dropout_rng.")
    c = min(chunk_len, length)
    n = length // c
    n_before, n_after = (n_chunks_before, n_chunks_after) if n > 1 else (0, 0)
    adjacent = lambda x: look_adjacent(x, n_before, n_after)  # noqa: E731
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    chunks = lambda x: x.astype(f32).reshape(b, h, n, c, x.shape[-1])  # noqa: E731
    positions = jnp.arange(length).reshape(1, 1, n, c)
    with jax.named_scope("local_attention"):
        seen_k = adjacent(chunks(k) / jnp.sqrt(jnp.asarray(d_head, f32)))
        seen_v = adjacent(chunks(v))
        dots = jnp.einsum("bhnqk,bhnsk->bhnqs", chunks(q), seen_k)
        visible = jnp.ones(dots.shape, bool)
        if causal:
            seen_pos = adjacent(positions)
            visible = visible & (seen_pos[..., None, :] <= positions[..., :, None])
        if key_mask is not None:
            seen_valid = adjacent(key_mask.reshape(b, 1, n, c))
            visible = visible & seen_valid[..., None, :]
        probs = jax.nn.softmax(jnp.where(visible, dots, MASK_VALUE), axis=-1)
        if dropout_rate:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
            probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
        out = jnp.einsum("bhnqs,bhnsk->bhnqk", probs, seen_v)
    return out.reshape(b, h, length, -1).astype(v.dtype)
