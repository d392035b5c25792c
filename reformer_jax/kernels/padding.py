"""Padding masks for shared-QK (full and LSH) attention, as Hugging Face applies them.

Hugging Face sends padded positions to an extra bucket (id n_buckets, after every real bucket) and gives padded
keys the score MASK_VALUE. For a causal model the same scores come out of the unchanged attention cores if the
real positions are first moved, in order, in front of the padded ones: the extra bucket sorts the padded
positions to the end of every round exactly as before, real positions keep their relative order (all the causal
mask and the sort compare), and every padded key now lies after every real query, so the causal mask gives it
MASK_VALUE. So a padding mask costs two gathers per layer and no change to the memory-critical cores.

Shapes: mask [b, l] bool (True = real token); order [b, l] int32.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from reformer_jax.kernels.lsh import bucket_dtype, total_buckets


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


def with_pad_bucket(buckets: jax.Array, mask: jax.Array, n_buckets) -> jax.Array:
    """Bucket ids [b, h, r, l] with padded positions in the extra bucket total_buckets(n_buckets).

    The ids widen to the type that holds the extra bucket (e.g. uint8 -> uint16 at 256 buckets).
    """
    n = total_buckets(n_buckets)
    wide = buckets.astype(bucket_dtype(n + 1))
    return jnp.where(mask[:, None, None, :], wide, jnp.asarray(n, wide.dtype))
