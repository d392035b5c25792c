"""Full shared-QK attention, and the scoring rules every attention kernel here shares, as pure JAX functions.

Axes: b batch, h heads, l length (q: query position, s: key position), k d_head.

Reference semantics (trax / Hugging Face):
- keys are the shared query/key vectors normalised to unit length; scores are q . k with no 1/sqrt(k) factor;
- a position attends to itself only as a last resort (its score is SELF_MASK_VALUE);
- causal masking always compares ORIGINAL positions, also after sorting (so LSH can reuse these rules).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

MASK_VALUE = -1e9  # score of a masked (future) key
SELF_MASK_VALUE = -1e5  # score of a query's own position: used only when nothing else is visible
KEY_NORM_EPS = 1e-6  # as trax / Hugging Face: k = q * rsqrt(mean(q^2) + eps) / sqrt(d_head)



def at_least_f32(x: jax.Array) -> jax.Array:
    """Attention scores and softmax run in float32 (float64 stays float64, for gradient checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def normalize_keys(qk: jax.Array) -> jax.Array:
    """Unit-length keys from shared query/key vectors. [..., k] -> [..., k] (at least float32)."""
    x = at_least_f32(qk)
    d_head = x.shape[-1]
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + KEY_NORM_EPS) / jnp.sqrt(float(d_head))


def mask_scores(dots: jax.Array, q_pos: jax.Array, k_pos: jax.Array, causal: bool,
                k_valid: Optional[jax.Array] = None) -> jax.Array:
    """Causal mask (keys after the query), padding mask (keys where `k_valid` is False) and self mask (the
    query's own position) on original positions. The self mask comes last, as in Hugging Face: a padded query
    still scores itself SELF_MASK_VALUE."""
    if causal:
        dots = jnp.where(k_pos > q_pos, MASK_VALUE, dots)
    if k_valid is not None:
        dots = jnp.where(k_valid, dots, MASK_VALUE)
    return jnp.where(k_pos == q_pos, SELF_MASK_VALUE, dots)


def masked(q_pos: jax.Array, k_pos: jax.Array, causal: bool, k_valid: Optional[jax.Array] = None) -> jax.Array:
    """Where `mask_scores` replaces a score by a constant (so no gradient reaches q or k there)."""
    constant = (k_pos == q_pos) | (k_pos > q_pos) if causal else (k_pos == q_pos)
    return constant if k_valid is None else constant | jnp.logical_not(k_valid)


def attention_dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    if rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def check_qkv(qk: jax.Array, v: jax.Array, name: str) -> None:
    if qk.ndim != 4 or v.ndim != 4 or qk.shape[:3] != v.shape[:3]:
        raise ValueError(f"{name}: qk and v must be [batch, heads, length, d_head] with matching batch, heads and "
                         f"length; got qk {qk.shape} and v {v.shape}.")


def as_key_mask(key_mask: Optional[jax.Array], batch: int, length: int, name: str) -> Optional[jax.Array]:
    """A padding mask [batch, length] (True or nonzero = real token) as bool; None stays None."""
    if key_mask is None:
        return None
    if key_mask.shape != (batch, length):
        raise ValueError(f"{name}: key_mask has shape {key_mask.shape}; expected {(batch, length)} ([batch, length], "
                         "True for real tokens).")
    return key_mask.astype(bool)


def shared_qk_attention(qk: jax.Array, v: jax.Array, *, causal: bool = True, dropout_rate: float = 0.0,
                        dropout_rng: Optional[jax.Array] = None, key_mask: Optional[jax.Array] = None) -> jax.Array:
    """Full shared-QK attention (the paper's baseline): [b, h, l, k] x [b, h, l, k] -> [b, h, l, k].

    key_mask [b, l] bool (False = padding): padded keys score MASK_VALUE for every query.
    Memory is quadratic in length: the [b, h, l, l] score matrix is materialised.
    """
    check_qkv(qk, v, "shared_qk_attention")
    length = qk.shape[2]
    key_mask = as_key_mask(key_mask, qk.shape[0], length, "shared_qk_attention")
    with jax.named_scope("shared_qk_attention"):
        keys = normalize_keys(qk)
        dots = jnp.einsum("bhqk,bhsk->bhqs", at_least_f32(qk), keys)
        pos = jnp.arange(length)
        k_valid = None if key_mask is None else key_mask[:, None, None, :]
        dots = mask_scores(dots, pos[:, None], pos[None, :], causal, k_valid)
        probs = attention_dropout(jax.nn.softmax(dots, axis=-1), dropout_rate, dropout_rng)
        out = jnp.einsum("bhqs,bhsk->bhqk", probs, at_least_f32(v))
    return out.astype(v.dtype)
