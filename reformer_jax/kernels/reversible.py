"""Residual stacks over stacked layer parameters: the reversible one (RevNet) and the ordinary one.

A layer is a pair of blocks
  F(params, x, key, buckets)   -> (y, buckets)   attention; returns its LSH bucket ids (or None)
  G(params, x, key, chunk)     -> y              feed-forward, position-wise
where `key` is the layer's inputs besides the activations (its [2] key array, 0: hashing, 1: dropout, or a pytree
holding it, e.g. with explicit hash rotations) and every block is a pure function of its arguments, so a
recompute with the same key replays the same hash rotations and dropout masks. G is called on the whole sequence
with chunk=None, or on positions [i c, (i + 1) c) with chunk=i (its dropout masks then depend on i), which it must
treat alike. Stacks of mixed layer types (e.g. local and LSH attention alternating) scan over their repeating
group of layers instead of single layers.

Reversible stack (one `jax.custom_vjp` around one `lax.scan` of all layers):
  forward   y1 = x1 + F(x2),  y2 = x2 + G(y1)
  backward  x2 = y2 - G(y1),  x1 = y1 - F(x2)      (recomputed layer by layer, last layer first)
It keeps for the backward pass only the stack's outputs (y1, y2), the parameters and keys (inputs anyway) and,
per LSH layer, the compact bucket ids: activation memory is flat in depth. A custom_vjp per block would instead
store every block's output, since each block's backward pass needs its own inputs.

With `ff_chunk_len`, G and its residual add run chunk by chunk, in place: y2[chunk] = x2[chunk] + G(y1[chunk])
forward, x2[chunk] = y2[chunk] - G(y1[chunk]) and dy1[chunk] += dG backward, so no full-length G output (or its
cotangent) is ever alive.

Exact reversal on a grid (`grid_bits` = k > 0, ModelConfig.stream_grid_bits): each subtraction above only
recovers x1 (x2) to the rounding of the forward's sum at |y1|'s scale, and that error grows with depth. With a grid
the streams stay float32 but hold multiples of 2^-k only: the stack's inputs are put on the grid by the caller
(`to_grid`) and every block output is rounded to it before it is added,
  y1 = x1 + Q(F(x2)),  y2 = x2 + Q(G(y1)),   Q(v) = round(v 2^k) / 2^k,
so while |values| < 2^(24 - k) every float32 sum and difference of stream values is exact, and the backward pass
recovers x1, x2 bit for bit (a recomputed block gives the same bits). Q's gradient is the identity
(straight-through), so the backward formulas are unchanged. Larger values round as without the grid. A block whose
output is a sum of parts that a fused reverse step subtracts one by one (the per-head attention) must round each
part on its own.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

AttentionFn = Callable[[Any, jax.Array, Any, Optional[jax.Array]], Tuple[jax.Array, Optional[jax.Array]]]
FeedForwardFn = Callable[[Any, jax.Array, Any, Optional[jax.Array]], jax.Array]
AttentionFns = Union[AttentionFn, Sequence[AttentionFn]]
# (params, x2, y1, dy1, dy2, key, buckets) -> (x1 = y1 - F(x2), dF/dparams . dy1, dy2 + dF/dx2 . dy1)
AttentionReverseFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, Any, Optional[jax.Array]],
                              Tuple[jax.Array, Any, jax.Array]]
AttentionReverseFns = Union[None, AttentionReverseFn, Sequence[Optional[AttentionReverseFn]]]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def to_grid(x: jax.Array, bits: int) -> jax.Array:
    """Q(x): x rounded to the nearest multiple of 2^-bits (bits = 0: x unchanged), same shape and dtype.

    Its derivative is the identity (straight-through): Q only removes the low bits a reversible stack could not
    recover exactly.
    """
    if not bits:
        return x
    scale = float(2 ** bits)  # a power of two: x * scale and / scale are exact
    return jnp.round(x * scale) / scale


@to_grid.defjvp
def _to_grid_jvp(bits, primals, tangents):
    return to_grid(primals[0], bits), tangents[0]


def _group_layers(attention_fn: AttentionFns):
    """(functions, grouped): one F per layer of the scanned unit.

    A single F scans over layers. A sequence (F_0, ..., F_{p-1}) scans over groups of p consecutive layers (a
    repeating pattern of layer types, e.g. local then LSH): then params["attention"] is a tuple of p trees with
    leading axis G = n / p, params["feed_forward"] leaves and the per-layer inputs `keys` are [G, p, ...].
    """
    if callable(attention_fn):
        return (attention_fn,), False
    return tuple(attention_fn), True


def _group_reverse_fns(attention_reverse_fn: AttentionReverseFns, n_fns: int, grouped: bool):
    """One optional fused reverse step per layer of the scanned unit (None: that layer uses jax.vjp of F)."""
    if not grouped or attention_reverse_fn is None or callable(attention_reverse_fn):
        return (attention_reverse_fn,) * n_fns
    reverse_fns = tuple(attention_reverse_fn)
    if len(reverse_fns) != n_fns:
        raise ValueError(f"reversible_stack: {len(reverse_fns)} attention_reverse_fn entries for a group of "
                         f"{n_fns} layers; expected one (or None) per layer.")
    return reverse_fns


def _layer_slice(p: Any, key: Any, j: int, grouped: bool):
    """Layer j's (attention params, feed-forward params, key) of one scanned unit."""
    if not grouped:
        return p["attention"], p["feed_forward"], key
    pick = lambda tree: jax.tree.map(lambda leaf: leaf[j], tree)  # noqa: E731
    return p["attention"][j], pick(p["feed_forward"]), pick(key)


def _chunk_count(length: int, ff_chunk_len: int) -> int:
    """Chunks G runs over inside the stack: 0 (G on the whole sequence) unless ff_chunk_len divides length."""
    if ff_chunk_len and ff_chunk_len < length and length % ff_chunk_len == 0:
        return length // ff_chunk_len
    return 0


def _positions(x: jax.Array, i: jax.Array, size: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _set_positions(x: jax.Array, i: jax.Array, value: jax.Array) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(x, value, i * value.shape[1], axis=1)


def _residual_feed_forward(feed_forward_fn: FeedForwardFn, p: Any, x: jax.Array, base: jax.Array, key: Any,
                           n_chunks: int, sign: float, grid_bits: int = 0) -> jax.Array:
    """base + sign * Q(G(x)), [b, l, d], chunk by chunk into base's buffer when n_chunks > 0 (Q: `to_grid`)."""
    if not n_chunks:
        return base + sign * to_grid(feed_forward_fn(p, x, key, None), grid_bits)
    size = x.shape[1] // n_chunks

    def chunk(out, i):
        g = to_grid(feed_forward_fn(p, _positions(x, i, size), key, i), grid_bits)
        return _set_positions(out, i, _positions(out, i, size) + sign * g), None

    return lax.scan(chunk, base, jnp.arange(n_chunks))[0]


def _feed_forward_backward(feed_forward_fn: FeedForwardFn, p: Any, y1: jax.Array, y2: jax.Array, dy1: jax.Array,
                           dy2: jax.Array, key: Any, n_chunks: int,
                           grid_bits: int = 0) -> Tuple[jax.Array, jax.Array, Any]:
    """Undo y2 = x2 + Q(G(y1)) and push dy2 through G: (x2, dy1 + dG/dy1 . dy2, dG/dparams . dy2)."""
    if not n_chunks:
        g, g_vjp = jax.vjp(lambda pg, y: feed_forward_fn(pg, y, key, None), p, y1)
        d_params, dy1_from_g = g_vjp(dy2)
        return y2 - to_grid(g, grid_bits), dy1 + dy1_from_g, d_params
    size = y1.shape[1] // n_chunks

    def chunk(carry, i):
        x2, dy1, d_params = carry
        g, g_vjp = jax.vjp(lambda pg, y: feed_forward_fn(pg, y, key, i), p, _positions(y1, i, size))
        d_params_i, dy1_i = g_vjp(_positions(dy2, i, size))
        x2 = _set_positions(x2, i, _positions(x2, i, size) - to_grid(g, grid_bits))
        dy1 = _set_positions(dy1, i, _positions(dy1, i, size) + dy1_i)
        return (x2, dy1, jax.tree.map(jnp.add, d_params, d_params_i)), None

    # x2 overwrites y2's buffer chunk by chunk; dy1 is updated in place.
    return lax.scan(chunk, (y2, dy1, jax.tree.map(jnp.zeros_like, p)), jnp.arange(n_chunks))[0]


def _layer_forward(attention_fn: AttentionFn, feed_forward_fn: FeedForwardFn, p_attn: Any, p_ff: Any,
                     x1: jax.Array, x2: jax.Array, key: Any, *, n_chunks: int, grid_bits: int):
    """One reversible layer forward: (x1, x2) [b, l, d] -> (y1, y2, F's bucket ids or None).

    n_chunks: chunks G runs over (`_chunk_count`); grid_bits: as for `reversible_stack`.
    """
    with jax.named_scope("reversible_layer"):
        f, buckets = attention_fn(p_attn, x2, key, None)
        y1 = x1 + to_grid(f, grid_bits)
        return y1, _residual_feed_forward(feed_forward_fn, p_ff, y1, x2, key, n_chunks, 1.0, grid_bits), buckets


def _layer_backward(attention_fn: AttentionFn, feed_forward_fn: FeedForwardFn,
                    attention_reverse_fn: Optional[AttentionReverseFn], p_attn: Any, p_ff: Any, y1: jax.Array,
                    y2: jax.Array, dy1: jax.Array, dy2: jax.Array, key: Any, buckets: Optional[jax.Array], *,
                    n_chunks: int, grid_bits: int):
    """One reversible layer backward: its inputs recovered from its outputs (y1, y2) and the cotangents pushed
    through it: (x1, x2, dx1, dx2, F's parameter gradients, G's). `buckets` are the forward pass's."""
    with jax.named_scope("reversible_layer_backward"):
        # y2 = x2 + G(y1): recover x2, push dy2 through G.
        x2, dy1, d_ff = _feed_forward_backward(feed_forward_fn, p_ff, y1, y2, dy1, dy2, key, n_chunks, grid_bits)
        # y1 = x1 + F(x2): recover x1 with the forward's buckets (no re-hashing), push dy1 through F.
        if attention_reverse_fn is not None:
            x1, d_attn, dx2 = attention_reverse_fn(p_attn, x2, y1, dy1, dy2, key, buckets)
        else:
            f, f_vjp = jax.vjp(lambda pf, x: attention_fn(pf, x, key, buckets)[0], p_attn, x2)
            x1 = y1 - to_grid(f, grid_bits)
            d_attn, dx2_from_f = f_vjp(dy1)
            dx2 = dy2 + dx2_from_f
        return x1, x2, dy1, dx2, d_attn, d_ff


def _stack_passes(attention_fn: AttentionFns, feed_forward_fn: FeedForwardFn, length: int, ff_chunk_len: int,
                  attention_reverse_fn: AttentionReverseFns, grid_bits: int):
    """The reversible stack's two passes (arguments as for `reversible_stack`):
      forward(params, x1, x2, keys) -> ((y1, y2), bucket ids of every layer)
      backward(params, keys, buckets, y1, y2, dy1, dy2) -> ((x1, x2, dx1, dx2), parameter gradients)
    where the backward pass recovers each layer's inputs from its outputs, last layer first."""
    fns, grouped = _group_layers(attention_fn)
    reverse_fns = _group_reverse_fns(attention_reverse_fn, len(fns), grouped)
    n_chunks = _chunk_count(length, ff_chunk_len)

    def layer_forward(carry, layer):
        x1, x2 = carry
        p, key = layer
        all_buckets = []
        for j, fn in enumerate(fns):
            p_attn, p_ff, key_j = _layer_slice(p, key, j, grouped)
            x1, x2, buckets = _layer_forward(fn, feed_forward_fn, p_attn, p_ff, x1, x2, key_j, n_chunks=n_chunks,
                                             grid_bits=grid_bits)
            all_buckets.append(buckets)
        return (x1, x2), (tuple(all_buckets) if grouped else all_buckets[0])

    def layer_backward(carry, layer):
        y1, y2, dy1, dy2 = carry
        p, key, group_buckets = layer
        d_attn, d_ff = [None] * len(fns), [None] * len(fns)
        for j in reversed(range(len(fns))):
            p_attn, p_ff, key_j = _layer_slice(p, key, j, grouped)
            buckets = group_buckets[j] if grouped else group_buckets
            y1, y2, dy1, dy2, d_attn[j], d_ff[j] = _layer_backward(
                fns[j], feed_forward_fn, reverse_fns[j], p_attn, p_ff, y1, y2, dy1, dy2, key_j, buckets,
                n_chunks=n_chunks, grid_bits=grid_bits)
        if grouped:
            grads = {"attention": tuple(d_attn), "feed_forward": jax.tree.map(lambda *g: jnp.stack(g), *d_ff)}
        else:
            grads = {"attention": d_attn[0], "feed_forward": d_ff[0]}
        return (y1, y2, dy1, dy2), grads

    def forward(params, x1, x2, keys):
        return lax.scan(layer_forward, (x1, x2), (params, keys))

    def backward(params, keys, buckets, y1, y2, dy1, dy2):
        return lax.scan(layer_backward, (y1, y2, dy1, dy2), (params, keys, buckets), reverse=True)

    return forward, backward


def reversible_stack(attention_fn: AttentionFns, feed_forward_fn: FeedForwardFn, params: Any, x1: jax.Array,
                     x2: jax.Array, keys: Any, *, ff_chunk_len: int = 0,
                     attention_reverse_fn: AttentionReverseFns = None,
                     grid_bits: int = 0) -> Tuple[jax.Array, jax.Array]:
    """Run all layers reversibly: (x1, x2) [b, l, d] each -> (y1, y2) [b, l, d] each.

    Args:
      attention_fn, feed_forward_fn: the blocks F and G (see module docstring); F may be a sequence of one
        function per layer of a repeating group (see `_group_layers`).
      params: {"attention": ..., "feed_forward": ...}, every leaf stacked on a leading layer (or group) axis.
      x1, x2: the two residual streams (float32).
      keys: per-layer inputs of the blocks, stacked likewise: [n, 2] PRNG keys, one pair per layer, or a pytree
        of such arrays (e.g. with explicit hash rotations). Not differentiated.
      ff_chunk_len: run G and its residual add over chunks of this many positions inside the stack (when it
        divides the length; otherwise G gets the whole sequence and may chunk on its own).
      attention_reverse_fn: F's backward step fused with recovering x1 (see `AttentionReverseFn`); without it
        the stack computes F(x2) to recover x1 and then differentiates F by jax.vjp. With a sequence of F, a
        sequence of one such step (or None for jax.vjp) per layer of the group.
      grid_bits: k of the exact-reversal grid (see the module docstring; 0: off). x1 and x2 must be on it
        (`to_grid`), and a fused reverse step must subtract exactly what F added (each part rounded to the grid).
    """
    forward, backward = _stack_passes(attention_fn, feed_forward_fn, x1.shape[1], ff_chunk_len,
                                      attention_reverse_fn, grid_bits)

    @jax.custom_vjp
    def stack(params, x1, x2, keys):
        return forward(params, x1, x2, keys)[0]

    def stack_fwd(params, x1, x2, keys):
        (y1, y2), buckets = forward(params, x1, x2, keys)
        return (y1, y2), (params, keys, buckets, y1, y2)

    def stack_bwd(residuals, cotangents):
        params, keys, buckets, y1, y2 = residuals
        (_, _, dx1, dx2), d_params = backward(params, keys, buckets, y1, y2, *cotangents)
        return d_params, dx1, dx2, jax.tree.map(lambda _: None, keys)

    stack.defvjp(stack_fwd, stack_bwd)
    with jax.named_scope("reversible_stack"):
        return stack(params, x1, x2, keys)


def recovered_inputs(attention_fn: AttentionFns, feed_forward_fn: FeedForwardFn, params: Any, x1: jax.Array,
                     x2: jax.Array, keys: Any, dy1: jax.Array, dy2: jax.Array, *, ff_chunk_len: int = 0,
                     attention_reverse_fn: AttentionReverseFns = None,
                     grid_bits: int = 0):
    """((x1, x2), (y1, y2)): the stack's inputs [b, l, d] as its backward pass recovers them, and its outputs.

    Runs the stack's forward pass and then its backward pass for the cotangents dy1, dy2 [b, l, d] of (y1, y2),
    in one program as a training step does (XLA may compile a block to different bits in another program);
    recovered - (x1, x2) is the reconstruction error the gradients see (`benchmarks.reversible_drift`).
    Arguments as for `reversible_stack`.
    """
    forward, backward = _stack_passes(attention_fn, feed_forward_fn, x1.shape[1], ff_chunk_len,
                                      attention_reverse_fn, grid_bits)
    (y1, y2), buckets = forward(params, x1, x2, keys)
    (x1, x2, _, _), _ = backward(params, keys, buckets, y1, y2, dy1, dy2)
    return (x1, x2), (y1, y2)


def residual_stack(attention_fn: AttentionFns, feed_forward_fn: FeedForwardFn, params: Any, x: jax.Array,
                   keys: Any, *, scan: bool = True) -> jax.Array:
    """Ordinary pre-LayerNorm residual layers, differentiated by plain autodiff: [b, l, d] -> [b, l, d].

    Autodiff stores each layer's activations for the backward pass (the seed's Transformer / LSH LM baselines).
    `scan=False` unrolls the layers in Python so XLA's schedule shows each layer's stored activations.
    Arguments as for `reversible_stack`.
    """
    fns, grouped = _group_layers(attention_fn)

    def layer(x, layer_inputs):
        p, key = layer_inputs
        for j, fn in enumerate(fns):
            p_attn, p_ff, key_j = _layer_slice(p, key, j, grouped)
            with jax.named_scope("residual_layer"):
                x = x + fn(p_attn, x, key_j, None)[0]
                x = x + feed_forward_fn(p_ff, x, key_j, None)
        return x, None

    with jax.named_scope("residual_stack"):
        if scan:
            return lax.scan(layer, x, (params, keys))[0]
        for i in range(jax.tree.leaves(keys)[0].shape[0]):
            x, _ = layer(x, jax.tree.map(lambda leaf: leaf[i], (params, keys)))
        return x
