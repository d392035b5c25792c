"""One layer's two blocks as pure functions of (params, inputs), and their stacked parameter initialisers.

A layer is F (attention) followed by G (feed-forward), each pre-LayerNorm. The residual wiring, ordinary or
reversible, lives in `reformer_jax.kernels.reversible`; the Flax module in `reformer_jax.model.reformer_lm` owns the parameters.

Parameters of all layers are stacked on a leading axis n (for `lax.scan`):
  attention:    norm {scale, bias} [n, d], qk [n, d, h, k], v [n, d, h, k], out [n, h, k, d]
                (local attention layers: q, k, v [n, d, h, k] instead of qk, v)
  feed_forward: norm {scale, bias} [n, d], wi [n, d, f], bi [n, f], wo [n, f, d], bo [n, d]
Their initialisers declare each one's logical axes (n: layers, d: embed, h: heads, k: kv, f: mlp) as they create
it (`init_*_params_with_axes`: `nn.LogicallyPartitioned` leaves); `reformer_jax.sharding` maps those names to mesh
axes.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from reformer_jax.kernels import full, lsh
from reformer_jax.kernels.norm import layer_norm
from reformer_jax.kernels import padding
from reformer_jax.kernels import per_head
from reformer_jax.model.config import ModelConfig
from reformer_jax.kernels.local import local_attention
from reformer_jax.kernels import head_parallel

Params = Dict[str, Any]

# Salts folded into a layer's dropout key so each dropout site draws its own, replayable mask.
_ATTN_WEIGHTS, _ATTN_OUT, _FF_HIDDEN, _FF_OUT = range(4)


def dropout_mask(rate: float, rng: jax.Array, salt: int, shape: Tuple[int, ...]) -> jax.Array:
    """The keep mask (bool) of `dropout`: a pure function of (rng, salt), replayable in a recompute.

    A [b, l, d] mask is drawn one row block of positions at a time (`per_head.row_block_size`): drawn whole,
    the random-bit generator's uint32 temporaries would be several times a residual stream's size.
    """
    key = jax.random.fold_in(rng, salt)
    if len(shape) != 3 or per_head.row_block_size(shape[1]) == shape[1]:
        return jax.random.bernoulli(key, 1.0 - rate, shape)
    b, length, d = shape
    rows = per_head.row_block_size(length)
    blocks = lax.map(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, (b, rows, d)),
                     jnp.arange(length // rows))  # [n, b, rows, d]
    return jnp.moveaxis(blocks, 0, 1).reshape(shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array, salt: int, deterministic: bool) -> jax.Array:
    """Inverted dropout whose mask is a pure function of (rng, salt): replayable in a recompute."""
    if deterministic or rate == 0.0:
        return x
    return jnp.where(dropout_mask(rate, rng, salt, x.shape), x / (1.0 - rate), jnp.zeros_like(x))


def replayed_dropout(x: jax.Array, rate: float, rng: jax.Array, salt: int, deterministic: bool) -> jax.Array:
    """`dropout` whose backward pass draws the mask again from (rng, salt) instead of keeping it: outside the
    reversible stack (the embedding's dropout) autodiff would keep a [b, l, d] bool from the forward pass to the
    backward pass. The same values and gradients."""
    if deterministic or rate == 0.0:
        return x
    return _replayed_dropout(x, rng, float(rate), salt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _replayed_dropout(x, rng, rate, salt):
    return dropout(x, rate, rng, salt, False)


def _replayed_dropout_bwd(rate, salt, rng, g):
    # Drawn from a key that only exists once g does: XLA would otherwise merge this draw with the forward's
    # identical one and keep that mask after all (XLA:CPU drops the barrier and does; libtpu keeps it).
    g, rng = lax.optimization_barrier((g, rng))
    return dropout(g, rate, rng, salt, False), None


_replayed_dropout.defvjp(lambda x, rng, rate, salt: (dropout(x, rate, rng, salt, False), rng),
                         _replayed_dropout_bwd)


def attention_core_spec(config: ModelConfig, seq_len: int, deterministic: bool, attention_type: Optional[str] = None,
                        grid_bits: int = 0) -> per_head.HeadSpec:
    """The static settings of the one-head-at-a-time attention core for this config, length, layer type
    ("full" or "lsh"; default config.attention) and reversible stack's grid (0: none)."""
    return per_head.HeadSpec(
        lsh=(attention_type or config.attention) == "lsh", n_hashes=config.n_hashes, n_buckets=config.resolved_n_buckets(seq_len),
        chunk_len=config.chunk_len, n_chunks_before=config.n_chunks_before, causal=config.causal,
        n_chunks_after=config.n_chunks_after, sequential_rounds=config.sequential_rounds,
        dropout_rate=0.0 if deterministic else float(config.attention_dropout),
        layer_norm_eps=float(config.layer_norm_eps), dtype=config.compute_dtype, grid_bits=grid_bits)


def attention_block(params: Params, x: jax.Array, *, config: ModelConfig, lsh_rng: jax.Array,
                    dropout_rng: jax.Array, deterministic: bool, buckets: Optional[jax.Array] = None,
                    attention_type: Optional[str] = None, rotations: Optional[jax.Array] = None,
                    attention_mask: Optional[jax.Array] = None,
                    grid_bits: int = 0) -> Tuple[jax.Array, Optional[jax.Array]]:
    """F(x) = Dropout(Attention(LayerNorm(x))): [b, l, d] float32 -> ([b, l, d] float32, buckets or None).

    For LSH attention the bucket ids [b, h, r, l] are returned so a reversible stack can keep them and pass them
    back in (`buckets=`) when it recomputes this block in the backward pass, instead of re-hashing.
    `attention_type` ("full", "lsh", "local"; default config.attention) picks the attention, `rotations`
    [h, k, r, sum(f_i) / 2] replaces the random hash projections, and `attention_mask` [b, l] bool (False =
    padding) masks padded keys (see `reformer_jax.kernels.padding`; padded LSH positions get an extra bucket).
    A bidirectional model (config.causal False) hands the mask to the attention core as its key mask.

    With `config.sequential_heads` the core of full and LSH layers runs one head at a time
    (`reformer_jax.kernels.per_head`). Local layers (separate q, k, v) have no per-head path: they always run
    all heads at once. With an `attention_mask`, a full or LSH layer's input is reordered so the real positions
    come first (and its output back), on either path; the buckets returned are then those of the reordered
    positions, which a recompute with the same mask reproduces.

    `grid_bits` > 0: the block feeds a reversible stack on that grid (`reformer_jax.kernels.reversible`; the model passes
    config.grid_bits): the per-head path then returns sum_h Q(Dropout(head h's share)) (`reformer_jax.kernels.per_head`), a
    value on the grid, which `attention_block_reverse` with the same grid subtracts exactly; the all-heads and
    local paths leave the rounding to the stack.
    """
    # Causal layers mask padding by moving it after every real position (then the causal mask hides it); a
    # bidirectional core masks padded keys itself.
    key_mask = None if config.causal else attention_mask
    kind = attention_type or config.attention
    weights_rng = jax.random.fold_in(dropout_rng, _ATTN_WEIGHTS)
    # On a reversible stack's grid the per-head core applies the output dropout and rounds each head's share
    # itself: what the fused reverse step (`attention_block_reverse`) subtracts head by head.
    per_head_output = config.sequential_heads and grid_bits > 0 and kind != "local"
    keep, rate = _output_keep(config, dropout_rng, x.shape, deterministic) if per_head_output else (None, 0.0)
    with jax.named_scope("attention_block"):
        if kind == "local":
            y = _local_attention(params, x, config=config, weights_rng=weights_rng, deterministic=deterministic,
                                 attention_mask=attention_mask)
        else:
            inverse = None
            if attention_mask is not None and config.causal:
                # LayerNorm is position-wise, so reordering its input reorders its output.
                order, inverse = padding.real_first_order(attention_mask)
                x = padding.take_positions(x, order, axis=1)
                attention_mask = padding.take_positions(attention_mask, order, axis=1)
                if keep is not None:
                    keep = padding.take_positions(keep, order, axis=1)
            core = (functools.partial(_attention_per_head, keep=keep, rate=rate, grid_bits=grid_bits)
                    if config.sequential_heads else _attention_all_heads)
            y, buckets = core(params, x, config=config, kind=kind, lsh_rng=lsh_rng, weights_rng=weights_rng,
                              deterministic=deterministic, buckets=buckets, rotations=rotations,
                              attention_mask=attention_mask, key_mask=key_mask)
            if inverse is not None:
                y = padding.take_positions(y, inverse, axis=1)
        if not per_head_output:
            y = dropout(y, config.dropout, dropout_rng, _ATTN_OUT, deterministic)
    return y, buckets


def _output_keep(config: ModelConfig, dropout_rng: jax.Array, shape: Tuple[int, ...],
                 deterministic: bool) -> Tuple[Optional[jax.Array], float]:
    """The attention block's output dropout as (keep mask [b, l, d] or None, rate), for the per-head core."""
    rate = 0.0 if deterministic else float(config.dropout)
    return (dropout_mask(rate, dropout_rng, _ATTN_OUT, shape) if rate else None), rate


def attention_block_reverse(params: Params, x: jax.Array, y: jax.Array, dy: jax.Array, dx: jax.Array, *,
                            config: ModelConfig, dropout_rng: jax.Array, deterministic: bool,
                            buckets: Optional[jax.Array],
                            attention_type: Optional[str] = None, attention_mask: Optional[jax.Array] = None,
                            grid_bits: int = 0) -> Tuple[jax.Array, Params, jax.Array]:
    """A reversible layer's attention step backwards (config.sequential_heads): y = x_prev + F(x), F =
    `attention_block` with the same `grid_bits`.

    Returns (x_prev = y - F(x), dF/dparams . dy, dx + dF/dx . dy): each head computed once, y's and dx's
    buffers updated in place; `buckets` are the forward pass's ids. Equal to jax.vjp of `attention_block` up
    to rounding. Full and LSH layers (`attention_type` default config.attention) without a padding mask, or a
    bidirectional model's with one (`attention_mask` [b, l] bool: its key mask); a stack differentiates other
    layers by jax.vjp of `attention_block`.
    """
    if attention_mask is not None and config.causal:
        raise ValueError("attention_block_reverse: a causal layer's padding reorders its positions; differentiate "
                         "attention_block by jax.vjp.")
    if (attention_type or config.attention) == "local":
        raise ValueError("attention_block_reverse: local attention has no per-head path; differentiate "
                         "attention_block by jax.vjp.")
    spec = attention_core_spec(config, x.shape[1], deterministic, attention_type, grid_bits)
    keep, rate = _output_keep(config, dropout_rng, x.shape, deterministic)
    with jax.named_scope("attention_block_reverse"):
        return head_parallel.reverse_by_heads(spec, params, x, y, dy, dx, buckets,
                                         jax.random.fold_in(dropout_rng, _ATTN_WEIGHTS), keep=keep, rate=rate,
                                         key_mask=attention_mask)


def _attention_per_head(params, x, *, config, kind, lsh_rng, weights_rng, deterministic, buckets, rotations,
                        attention_mask, key_mask=None, keep=None, rate=0.0, grid_bits=0):
    """One head at a time (`reformer_jax.kernels.per_head`); attention_mask (causal: already real-first) sets the
    pad bucket, key_mask (bidirectional: the same mask) masks padded keys; keep, rate: the block's output dropout,
    applied per head (on a stream grid)."""
    spec = attention_core_spec(config, x.shape[1], deterministic, kind, grid_bits)
    if spec.lsh and buckets is None:
        if rotations is None:
            rotations = lsh.random_rotations(lsh_rng, n_heads=config.n_heads, d_head=config.d_head,
                                              n_hashes=config.n_hashes, n_buckets=spec.n_buckets)
        buckets = head_parallel.hash_by_heads(spec, params, x, rotations)
        if attention_mask is not None:
            buckets = padding.with_pad_bucket(buckets, attention_mask, spec.n_buckets)
    return head_parallel.attention_by_heads(spec, params, x, buckets, weights_rng, keep, rate, key_mask), buckets


def _attention_all_heads(params, x, *, config, kind, lsh_rng, weights_rng, deterministic, buckets, rotations,
                         attention_mask, key_mask=None):
    """All heads at once: [b, h, l, k] projections, attention under plain autodiff (LSH: its own custom_vjp)."""
    dtype = config.compute_dtype
    h = layer_norm(x, params["norm"], config.layer_norm_eps).astype(dtype)
    qk = jnp.einsum("bld,dhk->bhlk", h, params["qk"].astype(dtype))
    v = jnp.einsum("bld,dhk->bhlk", h, params["v"].astype(dtype))
    rate = 0.0 if deterministic else config.attention_dropout
    if kind == "lsh":
        n_buckets = config.resolved_n_buckets(x.shape[1])
        if buckets is None:
            buckets = lsh.lsh_buckets(qk, lsh_rng, n_hashes=config.n_hashes, n_buckets=n_buckets,
                                       rotations=rotations)
            if attention_mask is not None:
                buckets = padding.with_pad_bucket(buckets, attention_mask, n_buckets)
        o = lsh.lsh_attention(qk, v, None, n_hashes=config.n_hashes, n_buckets=n_buckets,
                               chunk_len=config.chunk_len, n_chunks_before=config.n_chunks_before,
                               causal=config.causal, buckets=buckets, dropout_rate=rate,
                               dropout_rng=weights_rng, sequential_rounds=config.sequential_rounds,
                               n_chunks_after=config.n_chunks_after, key_mask=key_mask)
    else:
        o = full.shared_qk_attention(qk, v, causal=config.causal, dropout_rate=rate, dropout_rng=weights_rng,
                                     key_mask=key_mask)
    y = jnp.einsum("bhlk,hkd->bld", o.astype(dtype), params["out"].astype(dtype)).astype(jnp.float32)
    return y, buckets


def _local_attention(params, x, *, config, weights_rng, deterministic, attention_mask):
    """Local attention, all heads at once under plain autodiff: separate q, k, v [b, h, l, k] projections."""
    dtype = config.compute_dtype
    h = layer_norm(x, params["norm"], config.layer_norm_eps).astype(dtype)
    project = lambda name: jnp.einsum("bld,dhk->bhlk", h, params[name].astype(dtype))  # noqa: E731
    o = local_attention(project("q"), project("k"), project("v"), chunk_len=config.local_chunk_len,
                        n_chunks_before=config.local_n_chunks_before, causal=config.causal,
                        n_chunks_after=config.local_n_chunks_after,
                        key_mask=attention_mask, dropout_rng=weights_rng,
                        dropout_rate=0.0 if deterministic else config.local_attention_dropout)
    return jnp.einsum("bhlk,hkd->bld", o.astype(dtype), params["out"].astype(dtype)).astype(jnp.float32)


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
                       deterministic: bool, chunk_index: Optional[jax.Array] = None) -> jax.Array:
    """G(x) = Dropout(W2 Dropout(act(W1 LayerNorm(x)))): [b, l, d] float32 -> [b, l, d] float32.

    With `ff_chunk_len` set, positions are processed `ff_chunk_len` at a time by `lax.map`, each chunk under
    `jax.checkpoint`, so only one chunk's [b, chunk, d_ff] hidden activation is alive, in the forward pass and
    in the backward pass alike. A caller that chunks on its own (the reversible stack) passes one chunk x
    [b, ff_chunk_len, d] with its `chunk_index`: the dropout masks are then those of that chunk here.
    """
    if chunk_index is not None:
        return _feed_forward_positions(params, x, jax.random.fold_in(dropout_rng, chunk_index), config=config,
                                       deterministic=deterministic)
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


def _axes(value: jax.Array, *names: str) -> nn.LogicallyPartitioned:
    """`value` with the logical names of its dimensions."""
    return nn.LogicallyPartitioned(value, names)


def _norm_params(n_layers: int, width: int, dtype) -> Params:
    return {"scale": _axes(jnp.ones((n_layers, width), dtype), "layers", "embed"),
            "bias": _axes(jnp.zeros((n_layers, width), dtype), "layers", "embed")}


def init_attention_params_with_axes(rng: jax.Array, config: ModelConfig, attention_type: Optional[str] = None,
                                    n_layers: Optional[int] = None) -> Params:
    """Stacked attention parameters of `n_layers` (default all) layers of one type (Glorot-uniform, as trax's
    Dense), each an `nn.LogicallyPartitioned` naming its axes: shared-QK layers ("full", "lsh") have qk and v,
    local layers separate q, k and v."""
    n = config.n_layers if n_layers is None else n_layers
    d, h, k = config.d_model, config.n_heads, config.d_head
    dtype = config.params_dtype
    in_proj = nn.initializers.xavier_uniform(in_axis=1, out_axis=(2, 3), batch_axis=(0,))
    out_proj = nn.initializers.xavier_uniform(in_axis=(1, 2), out_axis=3, batch_axis=(0,))
    names = ("q", "k", "v") if (attention_type or config.attention) == "local" else ("qk", "v")
    rngs = jax.random.split(rng, len(names) + 1)
    params = {"norm": _norm_params(n, d, dtype),
              "out": _axes(out_proj(rngs[-1], (n, h, k, d), dtype), "layers", "heads", "kv", "embed")}
    params.update({name: _axes(in_proj(r, (n, d, h, k), dtype), "layers", "embed", "heads", "kv")
                   for name, r in zip(names, rngs)})
    return params


def init_feed_forward_params_with_axes(rng: jax.Array, config: ModelConfig) -> Params:
    """Stacked feed-forward parameters for all layers, each an `nn.LogicallyPartitioned` naming its axes."""
    n, d, f = config.n_layers, config.d_model, config.d_ff
    dtype = config.params_dtype
    dense = nn.initializers.xavier_uniform(in_axis=1, out_axis=2, batch_axis=(0,))
    r_in, r_out = jax.random.split(rng)
    return {
        "norm": _norm_params(n, d, dtype),
        "wi": _axes(dense(r_in, (n, d, f), dtype), "layers", "embed", "mlp"),
        "bi": _axes(jnp.zeros((n, f), dtype), "layers", "mlp"),
        "wo": _axes(dense(r_out, (n, f, d), dtype), "layers", "mlp", "embed"),
        "bo": _axes(jnp.zeros((n, d), dtype), "layers", "embed"),
    }


def init_attention_params(rng: jax.Array, config: ModelConfig, attention_type: Optional[str] = None,
                          n_layers: Optional[int] = None) -> Params:
    """`init_attention_params_with_axes` as plain arrays."""
    return nn.unbox(init_attention_params_with_axes(rng, config, attention_type, n_layers))


def init_feed_forward_params(rng: jax.Array, config: ModelConfig) -> Params:
    """`init_feed_forward_params_with_axes` as plain arrays."""
    return nn.unbox(init_feed_forward_params_with_axes(rng, config))
