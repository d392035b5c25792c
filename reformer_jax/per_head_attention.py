"""The attention block's core one head at a time, with its own custom_vjp (ModelConfig.sequential_heads).

    attention_core(x) = sum_h Attention_h(LayerNorm(x) W_qk[h], LayerNorm(x) W_v[h]) W_out[h]      [b, l, d]

All heads at once, a layer holds [b, h, l, k] projections (qk, v, the attention output and their cotangents: each
as large as a residual stream) plus every head's sorted buffers and chunk scores. Here a `lax.scan` over heads
keeps only one head's [b, l, k] slices alive, in the forward pass and in the backward pass: the backward
recomputes each head from the block input x (kept anyway by the reversible stack) and the forward's bucket ids,
accumulating dLayerNorm(x) head by head. What the block stores for its backward pass is (params, x, bucket ids).

Hashing uses the same [h, k, r, n] rotations as all heads at once, so the bucket ids are identical; attention
dropout draws a mask per head (a different random stream than all heads at once).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from reformer_jax import attention as attn

Params = Dict[str, Any]


class HeadSpec(NamedTuple):
    """Static (hashable) settings of the per-head block."""

    lsh: bool
    n_hashes: int
    n_buckets: Any  # int or tuple of ints
    chunk_len: int
    n_chunks_before: int
    causal: bool
    sequential_rounds: bool
    dropout_rate: float
    layer_norm_eps: float
    dtype: Any  # compute dtype


def _layer_norm(x: jax.Array, norm: Params, eps: float) -> jax.Array:
    # Imported lazily: reformer_jax.layers imports this module.
    from reformer_jax.layers import layer_norm
    return layer_norm(x, norm, eps)


def _by_head(params: Params) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Head-major projections: qk, v [d, h, k] -> [h, d, k]; out [h, k, d] as it is."""
    return params["qk"].swapaxes(0, 1), params["v"].swapaxes(0, 1), params["out"]


def _head_attention(spec: HeadSpec, w_qk: jax.Array, w_v: jax.Array, h: jax.Array, buckets: Optional[jax.Array],
                    dropout_rng: jax.Array) -> jax.Array:
    """One head: w_qk, w_v [d, k], h [b, l, d] (compute dtype), buckets [b, r, l] -> [b, l, k] float32."""
    qk = jnp.einsum("bld,dk->blk", h, w_qk.astype(spec.dtype))[:, None]  # [b, 1, l, k]
    v = jnp.einsum("bld,dk->blk", h, w_v.astype(spec.dtype))[:, None]
    if spec.lsh:
        o = attn.lsh_attention(qk, v, None, n_hashes=spec.n_hashes, n_buckets=spec.n_buckets,
                               chunk_len=spec.chunk_len, n_chunks_before=spec.n_chunks_before, causal=spec.causal,
                               buckets=buckets[:, None], dropout_rate=spec.dropout_rate, dropout_rng=dropout_rng,
                               sequential_rounds=spec.sequential_rounds)
    else:
        o = attn.shared_qk_attention(qk, v, causal=spec.causal, dropout_rate=spec.dropout_rate,
                                     dropout_rng=dropout_rng)
    return o[:, 0].astype(jnp.float32)


def hash_by_heads(spec: HeadSpec, params: Params, x: jax.Array, rotations: jax.Array) -> jax.Array:
    """LSH bucket ids of every head, computed one head at a time: x [b, l, d] -> [b, h, r, l].

    rotations [h, k, r, n] (`attention.random_rotations`): the same ids as hashing all heads at once.
    """
    h = _layer_norm(x, params["norm"], spec.layer_norm_eps).astype(spec.dtype)
    w_qk, _, _ = _by_head(params)

    def one_head(inputs):
        w, rot = inputs
        qk = jnp.einsum("bld,dk->blk", h, w.astype(spec.dtype))[:, None]
        return attn.lsh_buckets(qk, None, n_hashes=spec.n_hashes, n_buckets=spec.n_buckets, rotations=rot[None])[:, 0]

    with jax.named_scope("lsh_hash"):
        buckets = lax.map(one_head, (lax.stop_gradient(w_qk), rotations))  # [h, b, r, l]
    return buckets.swapaxes(0, 1)


def _head_inputs(params: Params, buckets: Optional[jax.Array], dropout_rng: jax.Array):
    """Per-head scan inputs: projections, bucket ids [h, b, r, l] (or None) and a dropout key per head."""
    w_qk, w_v, w_out = _by_head(params)
    n_heads = w_qk.shape[0]
    head_buckets = None if buckets is None else buckets.swapaxes(0, 1)
    return w_qk, w_v, w_out, head_buckets, jax.random.split(dropout_rng, n_heads)


def _forward(spec: HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array],
             dropout_rng: jax.Array) -> jax.Array:
    h = _layer_norm(x, params["norm"], spec.layer_norm_eps).astype(spec.dtype)

    def add_head(y, inputs):
        w_qk, w_v, w_out, head_buckets, key = inputs
        o = _head_attention(spec, w_qk, w_v, h, head_buckets, key)
        return y + jnp.einsum("blk,kd->bld", o.astype(spec.dtype), w_out.astype(spec.dtype)).astype(jnp.float32), None

    with jax.named_scope("attention_heads"):
        y, _ = lax.scan(add_head, jnp.zeros(x.shape, jnp.float32), _head_inputs(params, buckets, dropout_rng))
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_by_heads(spec, params, x, buckets, dropout_rng):
    return _forward(spec, params, x, buckets, dropout_rng)


def _fwd(spec, params, x, buckets, dropout_rng):
    # Only the inputs are kept: no [b, h, l, k] projection and no LayerNorm output survives the forward pass.
    return _forward(spec, params, x, buckets, dropout_rng), (params, x, buckets, dropout_rng)


def _bwd(spec, residuals, dy):
    """Recompute LayerNorm(x) once, then each head under jax.vjp; dLayerNorm(x) is summed over heads."""
    params, x, buckets, dropout_rng = residuals
    h, norm_vjp = jax.vjp(lambda x_, norm: _layer_norm(x_, norm, spec.layer_norm_eps).astype(spec.dtype),
                          x, params["norm"])
    dy_c = dy.astype(spec.dtype)

    def head_grads(dh, inputs):
        w_qk, w_v, w_out, head_buckets, key = inputs
        o, head_vjp = jax.vjp(lambda a, b, c: _head_attention(spec, a, b, c, head_buckets, key), w_qk, w_v, h)
        do = jnp.einsum("bld,kd->blk", dy_c, w_out.astype(spec.dtype)).astype(jnp.float32)
        d_out = jnp.einsum("blk,bld->kd", o.astype(spec.dtype), dy_c).astype(w_out.dtype)
        d_qk, d_v, dh_head = head_vjp(do)
        return dh + dh_head.astype(dh.dtype), (d_qk, d_v, d_out)

    with jax.named_scope("attention_heads_backward"):
        dh, (d_qk, d_v, d_out) = lax.scan(head_grads, jnp.zeros_like(h), _head_inputs(params, buckets, dropout_rng))
    dx, d_norm = norm_vjp(dh)
    grads = {"norm": d_norm, "qk": d_qk.swapaxes(0, 1).astype(params["qk"].dtype),
             "v": d_v.swapaxes(0, 1).astype(params["v"].dtype), "out": d_out}
    return grads, dx, None, None


_attention_by_heads.defvjp(_fwd, _bwd)


def attention_by_heads(spec: HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array],
                       dropout_rng: jax.Array) -> jax.Array:
    """sum_h Attention_h(LayerNorm(x)) W_out[h], one head at a time: x [b, l, d] float32 -> [b, l, d] float32.

    Args:
      spec: static settings (`HeadSpec`).
      params: one layer's attention parameters: norm {scale, bias} [d], qk, v [d, h, k], out [h, k, d].
      x: the block input (the residual stream).
      buckets: LSH bucket ids [b, h, r, l] (from `hash_by_heads` or a reversible stack); None for full attention.
      dropout_rng: key of the attention-weight dropout (one mask per head is derived from it).
    """
    if spec.lsh and buckets is None:
        raise ValueError("attention_by_heads: LSH attention needs the bucket ids (see hash_by_heads).")
    if not spec.lsh:
        buckets = jnp.zeros((x.shape[0], params["qk"].shape[1], 0, x.shape[1]), jnp.uint8)  # unused placeholder
    return _attention_by_heads(spec, params, x, lax.stop_gradient(buckets), dropout_rng)
