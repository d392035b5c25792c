"""The attention block's core one head at a time, with its own custom_vjp (ModelConfig.sequential_heads).

    attention_core(x) = sum_h Attention_h(LayerNorm(x) W_qk[h], LayerNorm(x) W_v[h]) W_out[h]      [b, l, d]

All heads at once, a layer holds [b, h, l, k] projections (qk, v, the attention output and their cotangents: each
as large as a residual stream), LayerNorm(x) and its cotangent, plus every head's sorted buffers and chunk scores.
Here a `lax.scan` over heads keeps only one head's [b, l, k] slices alive, and every [b, l, d] quantity is either
never formed or updated in place, one block of positions at a time (`row_block_size`):
- LayerNorm(x) is recomputed per row block where a head's projections need it (it is cheap next to them);
- the backward pass pushes each head's dLayerNorm(x) through the LayerNorm backward block by block and adds
  it to a caller's buffer (a reversible layer's dx2 = dy2 + dF/dx2 accumulates in dy2's buffer);
- a reversible layer recovers x1 = y1 - F(x2) by subtracting each head's output from y1's buffer in the same
  head loop that computes its gradients, so each head is computed once in the backward pass.
What the block stores for its backward pass is (params, x, bucket ids).

On a reversible stack's exact-reversal grid (`HeadSpec.grid_bits` > 0, see `reformer_jax.kernels.reversible`) the block
output is sum_h Q(Dropout(head h's output)): each head's share is dropped out and rounded to the grid on its own
and added into the output buffer row block by row block, so the reverse step, which subtracts the heads one by one,
removes exactly what the forward pass added.

Hashing uses the same [h, k, r, n] rotations as all heads at once, so the bucket ids are identical; attention
dropout draws a mask per head (a different random stream than all heads at once).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from reformer_jax.kernels import full, lsh
from reformer_jax.kernels.norm import layer_norm
from reformer_jax.kernels.reversible import to_grid

Params = Dict[str, Any]

# Positions per step of the row-block loops (and of blocked dropout masks). A whole-length step would
# materialise its [b, l, d] right-hand side: XLA:CPU fuses neither a dot nor the LayerNorm reductions into an
# in-place update.
_ROWS_PER_STEP = 1024


def row_block_size(length: int) -> int:
    """Positions per step of the in-place row-block loops: `_ROWS_PER_STEP`, or the whole length when shorter
    or not a multiple of it."""
    return _ROWS_PER_STEP if length > _ROWS_PER_STEP and length % _ROWS_PER_STEP == 0 else length


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
    grid_bits: int = 0  # k of the reversible stack's grid: each head's share of the output rounded to 2^-k
    n_chunks_after: int = 0  # LSH chunks after each chunk it attends to (bidirectional attention)


_MASK_BITS = 32  # positions per word of a `_PackedMask`


class _PackedMask(NamedTuple):
    """A [b, l, d] bool mask as bits: words [b, l / 32, d] uint32 whose bit j at [:, w, :] is the mask at position
    32 w + j. A block's dropout keep mask is read in every head's loops, so it stays alive through them: packed it
    takes an eighth of the bool mask's bytes (64 MiB instead of 512 at 2^20 x 512), with d, not a 32-wide axis,
    minor (TPU tiles would pad a minor axis of 32 to 128 lanes)."""

    words: jax.Array


def _pack_mask(mask: Optional[jax.Array], after: Optional[jax.Array] = None):
    """mask [b, l, d] bool as a `_PackedMask` (bit for bit the same mask); None, or a length that is not a multiple
    of 32, as it is. `after` (any array): the packed words are made only once it exists (XLA:CPU drops
    optimization barriers before scheduling; a data dependency it keeps)."""
    if mask is None or mask.ndim != 3 or mask.shape[1] % _MASK_BITS:
        return mask
    b, length, d = mask.shape
    blocks = _Blocks(length)

    def pack(i):  # one row block at a time: the whole mask as uint32 would be four times its bytes
        bits = blocks.get(mask, i).reshape(b, blocks.rows // _MASK_BITS, _MASK_BITS, d).astype(jnp.uint32)
        shifted = bits << jnp.arange(_MASK_BITS, dtype=jnp.uint32)[:, None]
        return jnp.sum(shifted, axis=2, dtype=jnp.uint32)  # distinct bits: their sum is their OR

    indices = jnp.arange(blocks.count)
    if after is None:
        words = lax.map(pack, indices)  # [n, b, rows / 32, d]
    else:  # the words' buffer plus a zero computed from after's bits: XLA makes it once `after` is, not earlier
        bits = lax.bitcast_convert_type(after.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
        zero = lax.shift_right_logical(lax.shift_right_logical(bits, jnp.uint32(31)), jnp.uint32(1))
        init = jnp.zeros((blocks.count, b, blocks.rows // _MASK_BITS, d), jnp.uint32) + zero
        words = lax.scan(lambda w, i: (lax.dynamic_update_index_in_dim(w, pack(i), i, 0), None), init, indices)[0]
    return _PackedMask(jnp.moveaxis(words, 0, 1).reshape(b, length // _MASK_BITS, d))


class _Blocks:
    """Row blocks of positions [i r, (i + 1) r) of [b, l, ...] arrays, for loops that update buffers in place."""

    def __init__(self, length: int):
        self.rows = row_block_size(length)
        self.count = length // self.rows

    def get(self, x: Optional[jax.Array], i: jax.Array) -> Optional[jax.Array]:
        """Block i of x (None, e.g. an absent dropout mask: None; a `_PackedMask`: its block as bool)."""
        if isinstance(x, _PackedMask):
            words = lax.dynamic_slice_in_dim(x.words, i * self.rows // _MASK_BITS, self.rows // _MASK_BITS, axis=1)
            bits = (words[:, :, None, :] >> jnp.arange(_MASK_BITS, dtype=jnp.uint32)[:, None]) & jnp.uint32(1)
            return bits.reshape((words.shape[0], self.rows) + words.shape[2:]).astype(bool)
        return None if x is None else lax.dynamic_slice_in_dim(x, i * self.rows, self.rows, axis=1)

    def set(self, x: jax.Array, i: jax.Array, value: jax.Array) -> jax.Array:
        return lax.dynamic_update_slice_in_dim(x, value.astype(x.dtype), i * self.rows, axis=1)

    def loop(self, body, init):
        """lax.scan of body(carry, block index) over the blocks; returns the final carry."""
        return lax.scan(lambda carry, i: (body(carry, i), None), init, jnp.arange(self.count))[0]


def _norm_fn(spec: HeadSpec):
    """LayerNorm in the compute dtype: (x [..., d], norm) -> [..., d]."""
    return lambda x, norm: layer_norm(x, norm, spec.layer_norm_eps).astype(spec.dtype)


def _by_head(params: Params) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Head-major projections: qk, v [d, h, k] -> [h, d, k]; out [h, k, d] as it is."""
    return params["qk"].swapaxes(0, 1), params["v"].swapaxes(0, 1), params["out"]


def _project(spec: HeadSpec, x: jax.Array, norm: Params, w: jax.Array) -> jax.Array:
    """LayerNorm(x) @ w, row block by row block: x [b, l, d], w [d, n] -> [b, l, n] (compute dtype)."""
    blocks, norm_of, w = _Blocks(x.shape[1]), _norm_fn(spec), w.astype(spec.dtype)
    out = jnp.zeros(x.shape[:2] + w.shape[1:], spec.dtype)
    return blocks.loop(lambda out, i: blocks.set(out, i, jnp.einsum("bld,dn->bln", norm_of(blocks.get(x, i), norm),
                                                                     w)), out)


def _attend(spec: HeadSpec, qk: jax.Array, v: jax.Array, buckets: Optional[jax.Array],
            dropout_rng: jax.Array, key_mask: Optional[jax.Array] = None) -> jax.Array:
    """One head's attention: qk, v [b, l, k], buckets [b, r, l], key_mask [b, l] bool or None -> [b, l, k]
    float32."""
    qk, v = qk[:, None], v[:, None]
    if spec.lsh:
        o = lsh.lsh_attention(qk, v, None, n_hashes=spec.n_hashes, n_buckets=spec.n_buckets,
                               chunk_len=spec.chunk_len, n_chunks_before=spec.n_chunks_before, causal=spec.causal,
                               buckets=buckets[:, None], dropout_rate=spec.dropout_rate, dropout_rng=dropout_rng,
                               sequential_rounds=spec.sequential_rounds, n_chunks_after=spec.n_chunks_after,
                               key_mask=key_mask)
    else:
        o = full.shared_qk_attention(qk, v, causal=spec.causal, dropout_rate=spec.dropout_rate,
                                     dropout_rng=dropout_rng, key_mask=key_mask)
    return o[:, 0].astype(jnp.float32)


def head_keys(dropout_rng: jax.Array, n_heads: int) -> jax.Array:
    """The [h] per-head keys of the attention-weight dropout: split from one key, or `dropout_rng` itself when it
    already is [h] typed keys (a caller that splits the heads over devices derives them for all heads first)."""
    if jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key) and dropout_rng.ndim == 1:
        return dropout_rng
    return jax.random.split(dropout_rng, n_heads)


def _head_inputs(params: Params, buckets: Optional[jax.Array], dropout_rng: jax.Array):
    """Per-head scan inputs: projections, bucket ids [h, b, r, l] (or None) and a dropout key per head."""
    w_qk, w_v, w_out = _by_head(params)
    head_buckets = None if buckets is None else buckets.swapaxes(0, 1)
    return w_qk, w_v, w_out, head_buckets, head_keys(dropout_rng, w_qk.shape[0])


def _dropped(x: jax.Array, keep: Optional[jax.Array], rate: float) -> jax.Array:
    """The block's output dropout (a linear map given its mask): where(keep, x / (1 - rate), 0)."""
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _head_share(spec: HeadSpec, o: jax.Array, w_out: jax.Array, keep: Optional[jax.Array],
                rate: float) -> jax.Array:
    """One head's share of the block output at some positions: Q(Dropout(o W_out[h])), o [b, r, k], w_out [k, d]
    -> [b, r, d] float32 (Q: `to_grid` at spec.grid_bits). The forward pass and the reverse step compute it alike,
    so on the grid they add and subtract the same bits."""
    out = jnp.einsum("blk,kd->bld", o.astype(spec.dtype), w_out.astype(spec.dtype)).astype(jnp.float32)
    return to_grid(_dropped(out, keep, rate), spec.grid_bits)


def _checked_buckets(spec: HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array],
                     missing: str) -> jax.Array:
    """LSH: the given bucket ids (ValueError `missing` without them); full attention: an empty placeholder
    [b, h, 0, l], since the per-head scans need an array to slice."""
    if not spec.lsh:
        return jnp.zeros((x.shape[0], params["qk"].shape[1], 0, x.shape[1]), jnp.uint8)
    if buckets is None:
        raise ValueError(missing)
    return buckets


def hash_by_heads(spec: HeadSpec, params: Params, x: jax.Array, rotations: jax.Array) -> jax.Array:
    """LSH bucket ids of every head, computed one head at a time: x [b, l, d] -> [b, h, r, l].

    rotations [h, k, r, n] (`reformer_jax.kernels.lsh.random_rotations`): the same ids as hashing all heads at once.
    """
    w_qk, _, _ = _by_head(params)
    x, norm = lax.stop_gradient(x), lax.stop_gradient(params["norm"])

    def one_head(inputs):
        w, rot = inputs
        qk = _project(spec, x, norm, w)[:, None]
        return lsh.lsh_buckets(qk, None, n_hashes=spec.n_hashes, n_buckets=spec.n_buckets, rotations=rot[None])[:, 0]

    with jax.named_scope("lsh_hash"):
        buckets = lax.map(one_head, (lax.stop_gradient(w_qk), rotations))  # [h, b, r, l]
    return buckets.swapaxes(0, 1)


def _forward(spec: HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array], dropout_rng: jax.Array,
             keep: Optional[jax.Array], rate: float, key_mask: Optional[jax.Array] = None) -> jax.Array:
    w_qk, w_v, w_out, head_buckets, keys = _head_inputs(params, buckets, dropout_rng)

    def one_head(w_qk, w_v, head_buckets, key):
        qk, v = _project(spec, x, params["norm"], w_qk), _project(spec, x, params["norm"], w_v)
        return _attend(spec, qk, v, head_buckets, key, key_mask).astype(spec.dtype)

    with jax.named_scope("attention_heads"):
        if not spec.grid_bits:
            # The heads' outputs [h, b, l, k] together are one residual stream's size; projecting each head on its
            # own would make a [b, l, d] partial sum per head instead.
            o = lax.map(lambda inputs: one_head(*inputs), (w_qk, w_v, head_buckets, keys))
            y = jnp.einsum("hblk,hkd->bld", o, w_out.astype(spec.dtype)).astype(jnp.float32)
            return _dropped(y, keep, rate)
        # On the grid: each head's rounded share is added into the output buffer, row block by row block.
        blocks, keep = _Blocks(x.shape[1]), _pack_mask(keep)

        def add_head(y, inputs):
            w_qk, w_v, w_out, head_buckets, key = inputs
            o = one_head(w_qk, w_v, head_buckets, key)
            share = lambda i: _head_share(spec, blocks.get(o, i), w_out, blocks.get(keep, i), rate)  # noqa: E731
            return blocks.loop(lambda y, i: blocks.set(y, i, blocks.get(y, i) + share(i)), y), None

        return lax.scan(add_head, jnp.zeros(x.shape, jnp.float32), (w_qk, w_v, w_out, head_buckets, keys))[0]


def _heads_backward(spec: HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array],
                    dropout_rng: jax.Array, dy: jax.Array, dx: jax.Array, y: Optional[jax.Array] = None,
                    keep: Optional[jax.Array] = None, rate: float = 0.0, key_mask: Optional[jax.Array] = None):
    """The backward pass of Dropout(attention_core(x)) for the cotangent dy, one head at a time.

    Each head's output is recomputed under jax.vjp from x and the bucket ids; its contribution to dx is pushed
    through the LayerNorm backward and added to `dx` [b, l, d] in place, block by block. When y is given, each
    head's (dropped-out) output is subtracted from y in place: a reversible layer's input recovered from its
    output without computing the block's output separately.
    keep [b, l, d] bool / rate: the block's output dropout mask (None: no dropout); key_mask [b, l] bool: padding.
    Returns (dx + dF/dx . dy, parameter gradients, y - F(x) or None).
    """
    blocks, norm_of, norm = _Blocks(x.shape[1]), _norm_fn(spec), params["norm"]
    # A reverse step's mask made only once x is (the feed-forward's reverse step makes it): made early, the mask
    # would be held through that step's backward pass, a reversible stack's fullest moment.
    keep = _pack_mask(keep, after=x if y is not None else None)
    dropped = lambda value, i: _dropped(value, blocks.get(keep, i), rate)  # noqa: E731

    def head_grads(carry, inputs):
        dx, y, d_norm = carry
        w_qk, w_v, w_out, head_buckets, key = inputs
        w_out_c = w_out.astype(spec.dtype)
        qk, v = _project(spec, x, norm, w_qk), _project(spec, x, norm, w_v)
        o, attend_vjp = jax.vjp(lambda a, b: _attend(spec, a, b, head_buckets, key, key_mask), qk, v)  # [b, l, k]

        def output_block(carry, i):  # this head's share of the output projection, its cotangent and of y
            do, d_out, y = carry
            dy_i, o_i = dropped(blocks.get(dy, i), i).astype(spec.dtype), blocks.get(o, i).astype(spec.dtype)
            do = blocks.set(do, i, jnp.einsum("bld,kd->blk", dy_i, w_out_c))
            d_out = d_out + jnp.einsum("blk,bld->kd", o_i, dy_i).astype(d_out.dtype)
            if y is not None:
                y = blocks.set(y, i, blocks.get(y, i) - _head_share(spec, o_i, w_out, blocks.get(keep, i), rate))
            return do, d_out, y

        do, d_out, y = blocks.loop(output_block, (jnp.zeros_like(o), jnp.zeros(w_out.shape, jnp.float32), y))
        d_qk, d_v = attend_vjp(do)
        d_proj = jnp.concatenate([d_qk, d_v], axis=-1).astype(spec.dtype)  # [b, l, 2k]
        w_proj = jnp.concatenate([w_qk, w_v], axis=-1).astype(spec.dtype)  # [d, 2k]

        def input_block(carry, i):  # this head's share of dx, of the projections' and of LayerNorm's gradients
            dx, d_w, d_norm = carry
            g_i = blocks.get(d_proj, i)
            h_i, norm_vjp = jax.vjp(norm_of, blocks.get(x, i), norm)
            dx_i, d_norm_i = norm_vjp(jnp.einsum("bln,dn->bld", g_i, w_proj))
            d_w = d_w + jnp.einsum("bld,bln->dn", h_i, g_i).astype(d_w.dtype)
            return blocks.set(dx, i, blocks.get(dx, i) + dx_i), d_w, jax.tree.map(jnp.add, d_norm, d_norm_i)

        dx, d_w, d_norm = blocks.loop(input_block, (dx, jnp.zeros(w_proj.shape, jnp.float32), d_norm))
        k = w_qk.shape[-1]
        return (dx, y, d_norm), (d_w[:, :k].astype(w_qk.dtype), d_w[:, k:].astype(w_v.dtype),
                                 d_out.astype(w_out.dtype))

    with jax.named_scope("attention_heads_backward"):
        (dx, y, d_norm), (d_qk, d_v, d_out) = lax.scan(
            head_grads, (dx, y, jax.tree.map(jnp.zeros_like, norm)), _head_inputs(params, buckets, dropout_rng))
    grads = {"norm": d_norm, "qk": d_qk.swapaxes(0, 1).astype(params["qk"].dtype),
             "v": d_v.swapaxes(0, 1).astype(params["v"].dtype), "out": d_out}
    return dx, grads, y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _attention_by_heads(spec, params, x, buckets, dropout_rng, keep, rate, key_mask):  # gradient: _bwd below
    return _forward(spec, params, x, buckets, dropout_rng, keep, rate, key_mask)


def _fwd(spec, params, x, buckets, dropout_rng, keep, rate, key_mask):
    # Only the inputs are kept: no [b, h, l, k] projection and no LayerNorm output survives the forward pass.
    return (_forward(spec, params, x, buckets, dropout_rng, keep, rate, key_mask),
            (params, x, buckets, dropout_rng, keep, key_mask))


def _bwd(spec, rate, residuals, dy):
    params, x, buckets, dropout_rng, keep, key_mask = residuals
    dx, grads, _ = _heads_backward(spec, params, x, buckets, dropout_rng, dy, jnp.zeros_like(x), keep=keep,
                                   rate=rate, key_mask=key_mask)
    return grads, dx, None, None, None, None


_attention_by_heads.defvjp(_fwd, _bwd)


def attention_by_heads(spec: HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array],
                       dropout_rng: jax.Array, keep: Optional[jax.Array] = None, rate: float = 0.0,
                       key_mask: Optional[jax.Array] = None) -> jax.Array:
    """sum_h Attention_h(LayerNorm(x)) W_out[h], one head at a time: x [b, l, d] float32 -> [b, l, d] float32.

    With keep [b, l, d] bool and rate, the block's output dropout is applied too; on the grid (spec.grid_bits)
    the output is sum_h Q(Dropout(head h's share)), what `reverse_by_heads` subtracts.

    Args:
      spec: static settings (`HeadSpec`).
      params: one layer's attention parameters: norm {scale, bias} [d], qk, v [d, h, k], out [h, k, d].
      x: the block input (the residual stream).
      buckets: LSH bucket ids [b, h, r, l] (from `hash_by_heads` or a reversible stack); None for full attention.
      dropout_rng: key of the attention-weight dropout (one mask per head is derived from it).
      keep, rate: the block's output dropout (see above).
      key_mask: [b, l] bool, False for padding: padded keys are masked (LSH: padded positions also go to the
        extra bucket, see `lsh.lsh_attention`); what a bidirectional (causal=False) block needs.
    """
    buckets = _checked_buckets(spec, params, x, buckets, "attention_by_heads: LSH attention needs the bucket ids "
                               "(see hash_by_heads).")
    key_mask = full.as_key_mask(key_mask, x.shape[0], x.shape[1], "attention_by_heads")
    return _attention_by_heads(spec, params, x, lax.stop_gradient(buckets), dropout_rng, keep, float(rate),
                               key_mask)


def reverse_by_heads(spec: HeadSpec, params: Params, x: jax.Array, y: jax.Array, dy: jax.Array, dx: jax.Array,
                     buckets: Optional[jax.Array], dropout_rng: jax.Array, keep: Optional[jax.Array] = None,
                     rate: float = 0.0, key_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, Params, jax.Array]:
    """A reversible layer's attention step backwards: y = x_prev + attention_by_heads(x, keep, rate).

    Returns (x_prev, parameter gradients, dx + dF/dx . dy) for the cotangent dy of y, computing each head once
    and updating y's and dx's buffers in place (the generic route, jax.vjp of the block, would compute the
    block's output first and recompute every head again for its backward pass). keep [b, l, d] bool and rate:
    the block's output dropout mask, or None; key_mask [b, l] bool: padding, as in `attention_by_heads`.
    """
    buckets = _checked_buckets(spec, params, x, buckets, "reverse_by_heads: LSH attention needs the forward "
                               "pass's bucket ids.")
    key_mask = full.as_key_mask(key_mask, x.shape[0], x.shape[1], "reverse_by_heads")
    dx, grads, x_prev = _heads_backward(spec, params, x, buckets, dropout_rng, dy, dx, y=y, keep=keep, rate=rate,
                                        key_mask=key_mask)
    return x_prev, grads, dx
