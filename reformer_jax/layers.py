"""One layer's two blocks as pure functions of (params, inputs), and their stacked parameter initialisers.

A layer is F (attention) followed by G (feed-forward), each pre-LayerNorm. The residual wiring, ordinary or
reversible, lives in `reformer_jax.reversible`; the Flax module in `reformer_jax.model` owns the parameters.

Parameters of all layers are stacked on a leading axis n (for `lax.scan`):
  attention:    norm {scale, bias} [n, d], qk [n, d, h, k], v [n, d, h, k], out [n, h, k, d]
  feed_forward: norm {scale, bias} [n, d], wi [n, d, f], bi [n, f], wo [n, f, d], bo [n, d]
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from reformer_jax import attention as attn
from reformer_jax import padding
from reformer_jax.config import ModelConfig
from reformer_jax.local_attention import local_attention

Params = Dict[str, Any]

# Salts folded into a layer's dropout key so each dropout site draws its own, replayable mask.
_ATTN_WEIGHTS, _ATTN_OUT, _FF_HIDDEN, _FF_OUT = range(4)


def layer_norm(x: jax.Array, norm: Params, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32. [..., d] -> [..., d] float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * lax.rsqrt(var + eps)
    return y * norm["scale"].astype(jnp.float32) + norm["bias"].astype(jnp.float32)


def dropout(x: jax.Array, rate: float, rng: jax.Array, salt: int, deterministic: bool) -> jax.Array:
    """Inverted dropout whose mask is a pure function of (rng, salt): replayable in a recompute."""
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention_block(params: Params, x: jax.Array, *, config: ModelConfig, lsh_rng: jax.Array,
                    dropout_rng: jax.Array, deterministic: bool, buckets: Optional[jax.Array] = None,
                    attention_type: Optional[str] = None, rotations: Optional[jax.Array] = None,
                    attention_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, Optional[jax.Array]]:
    """F(x) = Dropout(Attention(LayerNorm(x))): [b, l, d] float32 -> ([b, l, d] float32, buckets or None).

    For LSH attention the bucket ids [b, h, r, l] are returned so a reversible stack can keep them and pass them
    back in (`buckets=`) when it recomputes this block in the backward pass, instead of re-hashing.
    `attention_type` ("full", "lsh", "local"; default config.attention) picks the attention, `rotations`
    [h, k, r, sum(f_i) / 2] replaces the random hash projections, and `attention_mask` [b, l] bool (False =
    padding) masks padded keys (see `reformer_jax.padding`; padded LSH positions get an extra bucket).
    """
    dtype = config.compute_dtype
    kind = attention_type or config.attention
    with jax.named_scope("attention_block"):
        h = layer_norm(x, params["norm"], config.layer_norm_eps).astype(dtype)
        project = lambda name: jnp.einsum("bld,dhk->bhlk", h, params[name].astype(dtype))  # noqa: E731
        rate = 0.0 if deterministic else config.attention_dropout
        weights_rng = jax.random.fold_in(dropout_rng, _ATTN_WEIGHTS)
        if kind == "local":
            o = local_attention(project("q"), project("k"), project("v"), chunk_len=config.local_chunk_len,
                                n_chunks_before=config.local_n_chunks_before, causal=config.causal,
                                key_mask=attention_mask, dropout_rng=weights_rng,
                                dropout_rate=0.0 if deterministic else config.local_attention_dropout)
        else:
            if attention_mask is not None:
                if not config.causal:
                    raise ValueError(f"an attention_mask with {kind} attention needs causal=True (padded keys are "
                                     "masked by moving them after every real position).")
                order, inverse = padding.real_first_order(attention_mask)
                h = padding.take_positions(h, order, axis=1)
                attention_mask = padding.take_positions(attention_mask, order, axis=1)
            qk, v = project("qk"), project("v")
            if kind == "lsh":
                n_buckets = config.resolved_n_buckets(x.shape[1])
                if buckets is None:
                    buckets = attn.lsh_buckets(qk, lsh_rng, n_hashes=config.n_hashes, n_buckets=n_buckets,
                                               rotations=rotations)
                    if attention_mask is not None:
                        buckets = padding.with_pad_bucket(buckets, attention_mask, n_buckets)
                o = attn.lsh_attention(qk, v, None, n_hashes=config.n_hashes, n_buckets=n_buckets,
                                       chunk_len=config.chunk_len, n_chunks_before=config.n_chunks_before,
                                       causal=config.causal, buckets=buckets, dropout_rate=rate,
                                       dropout_rng=weights_rng, sequential_rounds=config.sequential_rounds)
            else:
                o = attn.shared_qk_attention(qk, v, causal=config.causal, dropout_rate=rate,
                                             dropout_rng=weights_rng)
            if attention_mask is not None:
                o = padding.take_positions(o, inverse, axis=2)
        y = jnp.einsum("bhlk,hkd->bld", o.astype(dtype), params["out"].astype(dtype)).astype(jnp.float32)
        y = dropout(y, config.dropout, dropout_rng, _ATTN_OUT, deterministic)
    return y, buckets


def _activation(name: str):
    return {"relu": jax.nn.relu, "gelu": jax.nn.gelu}[name]


def _feed_forward_positions(params: Params, x: jax.Array, rng: jax.Array, *, config: ModelConfig,
                            deterministic: bool) -> jax.Array:
    """The position-wise feed-forward on any slice of positions: [..., d] float32 -> [..., d] float32."""
    dtype = config.compute_dtype
    h = layer_norm(x, params["norm"], config.layer_norm_eps).astype(dtype)
    h = jnp.einsum("...d,df->...f", h, params["wi"].astype(dtype)) + params["bi"].astype(dtype)
    h = dropout(_activation(config.ff_activation)(h), config.dropout, rng, _FF_HIDDEN, deterministic)
    y = jnp.einsum("...f,fd->...d", h, params["wo"].astype(dtype)) + params["bo"].astype(dtype)
    return dropout(y.astype(jnp.float32), config.dropout, rng, _FF_OUT, deterministic)


def feed_forward_block(params: Params, x: jax.Array, *, config: ModelConfig, dropout_rng: jax.Array,
                       deterministic: bool) -> jax.Array:
    """G(x) = Dropout(W2 Dropout(act(W1 LayerNorm(x)))): [b, l, d] float32 -> [b, l, d] float32.

    With `ff_chunk_len` set, positions are processed `ff_chunk_len` at a time by `lax.map`, each chunk under
    `jax.checkpoint`, so only one chunk's [b, chunk, d_ff] hidden activation is alive, in the forward pass and
    in the backward pass alike.
    """
    b, length, d = x.shape
    chunk = min(config.ff_chunk_len, length) if config.ff_chunk_len else length
    with jax.named_scope("feed_forward_block"):
        if chunk == length:
            return _feed_forward_positions(params, x, dropout_rng, config=config, deterministic=deterministic)
        n_chunks = -(-length // chunk)
        padded = n_chunks * chunk
        if padded != length:  # a zero-padded last chunk; its outputs are dropped below
            x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0)))

        @jax.checkpoint
        def one_chunk(args):
            x_chunk, index = args
            return _feed_forward_positions(params, x_chunk, jax.random.fold_in(dropout_rng, index),
                                           config=config, deterministic=deterministic)

        chunks = x.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)  # [n_chunks, b, chunk, d]
        y = lax.map(one_chunk, (chunks, jnp.arange(n_chunks)))
        return y.swapaxes(0, 1).reshape(b, padded, d)[:, :length]


# ---------------------------------------------------------------------------------------------------------------
# Stacked parameter initialisers (leading axis = layer)


def _norm_params(n_layers: int, width: int, dtype) -> Params:
    return {"scale": jnp.ones((n_layers, width), dtype), "bias": jnp.zeros((n_layers, width), dtype)}


def init_attention_params(rng: jax.Array, config: ModelConfig, attention_type: Optional[str] = None,
                          n_layers: Optional[int] = None) -> Params:
    """Stacked attention parameters of `n_layers` (default all) layers of one type (Glorot-uniform, as trax's
    Dense): shared-QK layers ("full", "lsh") have qk and v, local layers separate q, k and v."""
    n = config.n_layers if n_layers is None else n_layers
    d, h, k = config.d_model, config.n_heads, config.d_head
    dtype = config.params_dtype
    in_proj = nn.initializers.xavier_uniform(in_axis=1, out_axis=(2, 3), batch_axis=(0,))
    out_proj = nn.initializers.xavier_uniform(in_axis=(1, 2), out_axis=3, batch_axis=(0,))
    names = ("q", "k", "v") if (attention_type or config.attention) == "local" else ("qk", "v")
    rngs = jax.random.split(rng, len(names) + 1)
    params = {"norm": _norm_params(n, d, dtype), "out": out_proj(rngs[-1], (n, h, k, d), dtype)}
    params.update({name: in_proj(r, (n, d, h, k), dtype) for name, r in zip(names, rngs)})
    return params


def init_feed_forward_params(rng: jax.Array, config: ModelConfig) -> Params:
    """Stacked feed-forward parameters for all layers."""
    n, d, f = config.n_layers, config.d_model, config.d_ff
    dtype = config.params_dtype
    dense = nn.initializers.xavier_uniform(in_axis=1, out_axis=2, batch_axis=(0,))
    r_in, r_out = jax.random.split(rng)
    return {
        "norm": _norm_params(n, d, dtype),
        "wi": dense(r_in, (n, d, f), dtype),
        "bi": jnp.zeros((n, f), dtype),
        "wo": dense(r_out, (n, f, d), dtype),
        "bo": jnp.zeros((n, d), dtype),
    }
