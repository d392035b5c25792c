"""Padding masks for shared-QK (full and LSH) attention, as Hugging Face applies them.

Hugging Face sends padded positions to an extra bucket (id n_buckets, after every real bucket) and gives padded
keys the score MASK_VALUE. For a causal model the same scores come out of the unchanged attention cores if the
real positions are first moved, in order, in front of the padded ones: the extra bucket sorts the padded
positions to the end of every round exactly as before, real positions keep their relative order (all the causal
mask and the sort compare), and every padded key now lies after every real query, so the causal mask gives it
MASK_VALUE. So a padding mask costs two gathers per layer and no change to the memory-critical cores.

Without a causal mask (bidirectional attention) nothing puts the padded keys out of reach, so the cores take the
mask itself: `key_mask=` of `lsh.lsh_attention` (which also puts padded positions in the extra bucket,
`with_pad_bucket`), `full.shared_qk_attention`, `local.local_attention` and the per-head core
(`per_head.attention_by_heads`); no reordering is needed there. Either way a padded token changes no output of
a real position.

Shapes: mask [b, l] bool (True = real token); order [b, l] int32.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from reformer_jax.kernels.lsh import with_pad_bucket  # noqa: F401  (the extra bucket, defined beside the sort)


def real_first_order(mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(order, inverse) [b, l]: a stable permutation putting real positions first, and its inverse."""
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(mask.shape[-1], dtype=jnp.int32), order.shape)
    inverse = jnp.put_along_axis(jnp.zeros_like(order), order, positions, axis=-1, inplace=False)
    return order, inverse


def take_positions(x: jax.Array, order: jax.Array, axis: int) -> jax.Array:
    """x[..., order, ...] along `axis` (the length axis), per batch row. x [b, ..., l, ...], order [b, l]."""
    index = order.reshape(order.shape[:1] + (1,) * (axis - 1) + order.shape[1:] + (1,) * (x.ndim - axis - 1))
    return jnp.take_along_axis(x, index, axis=axis)

