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


def _project(h: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """h [b, l, d] @ w [d, k] -> [b, 1, l, k] (one head, in attention's [b, h, l, k] layout)."""
    return jnp.einsum("bld,dk->blk", h, w.astype(dtype))[:, None]


def _attend(spec: HeadSpec, qk: jax.Array, v: jax.Array, buckets: Optional[jax.Array],
            dropout_rng: jax.Array) -> jax.Array:
    """One head's attention: qk, v [b, 1, l, k], buckets [b, r, l] -> [b, 1, l, k] float32."""
    if spec.lsh:
        o = attn.lsh_attention(qk, v, None, n_hashes=spec.n_hashes, n_buckets=spec.n_buckets,
                               chunk_len=spec.chunk_len, n_chunks_before=spec.n_chunks_before, causal=spec.causal,
                               buckets=buckets[:, None], dropout_rate=spec.dropout_rate, dropout_rng=dropout_rng,
                               sequential_rounds=spec.sequential_rounds)
    else:
        o = attn.shared_qk_attention(qk, v, causal=spec.causal, dropout_rate=spec.dropout_rate,
                                     dropout_rng=dropout_rng)
    return o.astype(jnp.float32)


def _head_attention(spec: HeadSpec, w_qk: jax.Array, w_v: jax.Array, buckets: Optional[jax.Array],
                    dropout_rng: jax.Array, *, h: jax.Array) -> jax.Array:
    """One head: w_qk, w_v [d, k], h [b, l, d] (compute dtype), buckets [b, r, l] -> [b, l, k] float32."""
    return _attend(spec, _project(h, w_qk, spec.dtype), _project(h, w_v, spec.dtype), buckets, dropout_rng)[:, 0]


# Positions per step of the loops below that update a [b, l, d] buffer in place: a whole-length update would
# materialise its [b, l, d] right-hand side first (XLA:CPU fuses neither a dot nor these reductions into it).
_ROWS_PER_STEP = 1024


def _row_steps(length: int) -> int:
    return _ROWS_PER_STEP if length > _ROWS_PER_STEP and length % _ROWS_PER_STEP == 0 else length


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
    w_qk, w_v, w_out, head_buckets, keys = _head_inputs(params, buckets, dropout_rng)

    def one_head(inputs):
        return _head_attention(spec, *inputs, h=h).astype(spec.dtype)

    with jax.named_scope("attention_heads"):
        # The heads' outputs [h, b, l, k] together are one residual stream's size; projecting each head on its own
        # would make a [b, l, d] partial sum per head instead.
        o = lax.map(one_head, (w_qk, w_v, head_buckets, keys))
        return jnp.einsum("hblk,hkd->bld", o, w_out.astype(spec.dtype)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_by_heads(spec, params, x, buckets, dropout_rng):  # gradient: _bwd below
    return _forward(spec, params, x, buckets, dropout_rng)


def _fwd(spec, params, x, buckets, dropout_rng):
    # Only the inputs are kept: no [b, h, l, k] projection and no LayerNorm output survives the forward pass.
    return _forward(spec, params, x, buckets, dropout_rng), (params, x, buckets, dropout_rng)


class _Blocks:
    """Row blocks of positions [i r, (i + 1) r) of [b, l, ...] arrays, for loops that update buffers in place."""

    def __init__(self, length: int):
        self.rows = _row_steps(length)
        self.count = length // self.rows

    def get(self, x: jax.Array, i: jax.Array) -> jax.Array:
        return lax.dynamic_slice_in_dim(x, i * self.rows, self.rows, axis=1)

    def set(self, x: jax.Array, i: jax.Array, value: jax.Array) -> jax.Array:
        return lax.dynamic_update_slice_in_dim(x, value.astype(x.dtype), i * self.rows, axis=1)


def _dropped(x: jax.Array, keep: Optional[jax.Array], rate: float) -> jax.Array:
    """The block's output dropout (a linear map given its mask): where(keep, x / (1 - rate), 0)."""
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _heads_backward(spec: HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array],
                    dropout_rng: jax.Array, dy: jax.Array, y: Optional[jax.Array] = None,
                    keep: Optional[jax.Array] = None, rate: float = 0.0):
    """The backward pass of Dropout(attention_core(x)) for the cotangent dy, one head at a time.

    Each head's output is recomputed under jax.vjp from LayerNorm(x) and the bucket ids. Every [b, l, d]
    buffer is updated in place, row block by row block: dLayerNorm(x) (summed over heads) and, when y is given,
    y - Dropout(attention_core(x)) (summed over heads): a reversible layer's input recovered from its output
    without computing the block's output separately.
    keep [b, l, d] bool / rate: the block's output dropout mask (None: no dropout).
    Returns (dx [b, l, d], parameter gradients, y - block output or None).
    """
    h = _layer_norm(x, params["norm"], spec.layer_norm_eps).astype(spec.dtype)
    blocks = _Blocks(x.shape[1])

    def head_grads(carry, inputs):
        dh, y = carry
        w_qk, w_v, w_out, head_buckets, key = inputs
        w_out_c = w_out.astype(spec.dtype)
        qk, v = _project(h, w_qk, spec.dtype), _project(h, w_v, spec.dtype)
        o, attend_vjp = jax.vjp(lambda a, b: _attend(spec, a, b, head_buckets, key), qk, v)  # [b, 1, l, k]
        o = o[:, 0]

        def output_block(carry, i):  # this head's share of the output projection, its cotangent and its input
            do, d_out, y = carry
            dy_i = _dropped(blocks.get(dy, i), None if keep is None else blocks.get(keep, i), rate).astype(spec.dtype)
            o_i = blocks.get(o, i).astype(spec.dtype)
            do = blocks.set(do, i, jnp.einsum("bld,kd->blk", dy_i, w_out_c))
            d_out = d_out + jnp.einsum("blk,bld->kd", o_i, dy_i).astype(d_out.dtype)
            if y is not None:
                out_i = jnp.einsum("blk,kd->bld", o_i, w_out_c).astype(jnp.float32)
                y = blocks.set(y, i, blocks.get(y, i) - _dropped(out_i, None if keep is None else blocks.get(keep, i),
                                                                 rate))
            return (do, d_out, y), None

        (do, d_out, y), _ = lax.scan(output_block, (jnp.zeros_like(o), jnp.zeros(w_out.shape, jnp.float32), y),
                                     jnp.arange(blocks.count))
        d_qk, d_v = attend_vjp(do[:, None])
        d_proj = jnp.concatenate([d_qk[:, 0], d_v[:, 0]], axis=-1).astype(spec.dtype)  # [b, l, 2k]
        w_proj = jnp.concatenate([w_qk, w_v], axis=-1).astype(spec.dtype)  # [d, 2k]

        def input_block(carry, i):  # this head's share of dLayerNorm(x) and of the projections' gradients
            dh, d_w = carry
            g_i = blocks.get(d_proj, i)
            dh = blocks.set(dh, i, blocks.get(dh, i) + jnp.einsum("bln,dn->bld", g_i, w_proj).astype(dh.dtype))
            return (dh, d_w + jnp.einsum("bld,bln->dn", blocks.get(h, i), g_i).astype(d_w.dtype)), None

        (dh, d_w), _ = lax.scan(input_block, (dh, jnp.zeros(w_proj.shape, jnp.float32)), jnp.arange(blocks.count))
        k = w_qk.shape[-1]
        return (dh, y), (d_w[:, :k].astype(w_qk.dtype), d_w[:, k:].astype(w_v.dtype), d_out.astype(w_out.dtype))

    with jax.named_scope("attention_heads_backward"):
        (dh, y), (d_qk, d_v, d_out) = lax.scan(head_grads, (jnp.zeros(h.shape, jnp.float32), y),
                                               _head_inputs(params, buckets, dropout_rng))
    dx, d_norm = _layer_norm_backward(spec, x, params["norm"], dh)
    grads = {"norm": d_norm, "qk": d_qk.swapaxes(0, 1).astype(params["qk"].dtype),
             "v": d_v.swapaxes(0, 1).astype(params["v"].dtype), "out": d_out}
    return dx, grads, y


def _bwd(spec, residuals, dy):
    params, x, buckets, dropout_rng = residuals
    dx, grads, _ = _heads_backward(spec, params, x, buckets, dropout_rng, dy)
    return grads, dx, None, None


_attention_by_heads.defvjp(_fwd, _bwd)


def reverse_by_heads(spec: HeadSpec, params: Params, x: jax.Array, y: jax.Array, dy: jax.Array,
                     buckets: Optional[jax.Array], dropout_rng: jax.Array, keep: Optional[jax.Array] = None,
                     rate: float = 0.0) -> Tuple[jax.Array, Params, jax.Array]:
    """A reversible layer's attention step backwards: y = x_prev + Dropout(attention_by_heads(x)).

    Returns (x_prev, parameter gradients, dx) for the cotangent dy of y, computing each head once (the generic
    route, jax.vjp of the block, would compute the block's output first and recompute every head for its
    backward pass). keep [b, l, d] bool and rate: the block's output dropout mask, or None.
    """
    dx, grads, x_prev = _heads_backward(spec, params, x, buckets, dropout_rng, dy, y=y, keep=keep, rate=rate)
    return x_prev, grads, dx


def _layer_norm_backward(spec: HeadSpec, x: jax.Array, norm: Params, dh: jax.Array) -> Tuple[jax.Array, Params]:
    """(dx [b, l, d], d_norm) of h = LayerNorm(x) for the cotangent dh, position chunk by chunk; dx takes dh's
    buffer."""
    # Row blocks: whole, its per-element products (three [b, l, d] temporaries on XLA:CPU) would be materialised
    # before being reduced over positions for the scale and bias gradients.
    blocks = _Blocks(x.shape[1])
    norm_of = lambda x_, n: _layer_norm(x_, n, spec.layer_norm_eps).astype(spec.dtype)  # noqa: E731

    def block(carry, i):
        d_x, d_norm = carry
        _, vjp = jax.vjp(norm_of, blocks.get(x, i), norm)
        dx_i, d_norm_i = vjp(blocks.get(d_x, i).astype(spec.dtype))
        return (blocks.set(d_x, i, dx_i), jax.tree.map(jnp.add, d_norm, d_norm_i)), None

    (dx, d_norm), _ = lax.scan(block, (dh, jax.tree.map(jnp.zeros_like, norm)), jnp.arange(blocks.count))
    return dx, d_norm


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
