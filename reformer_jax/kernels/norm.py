"""LayerNorm as a pure function: the kernels that recompute it (per-head attention, the output head) share it."""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
from jax import lax

Params = Dict[str, jax.Array]  # {"scale": [d], "bias": [d]}


def layer_norm(x: jax.Array, norm: Params, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32. [..., d] -> [..., d] float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * lax.rsqrt(var + eps)
    return y * norm["scale"].astype(jnp.float32) + norm["bias"].astype(jnp.float32)
