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
store every block's output (see ../shared/reference/jax-memory-notes.md).

With `ff_chunk_len`, G and its residual add run chunk by chunk, in place: y2[chunk] = x2[chunk] + G(y1[chunk])
forward, x2[chunk] = y2[chunk] - G(y1[chunk]) and dy1[chunk] += dG backward, so no full-length G output (or its
cotangent) is ever alive.
"""

from __future__ import annotations

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
                           n_chunks: int, sign: float) -> jax.Array:
    """base + sign * G(x), [b, l, d], chunk by chunk into base's buffer when n_chunks > 0."""
    if not n_chunks:
        return base + sign * feed_forward_fn(p, x, key, None)
    size = x.shape[1] // n_chunks

    def chunk(out, i):
        return _set_positions(out, i, _positions(out, i, size) + sign * feed_forward_fn(p, _positions(x, i, size),
                                                                                         key, i)), None

    return lax.scan(chunk, base, jnp.arange(n_chunks))[0]


def _feed_forward_backward(feed_forward_fn: FeedForwardFn, p: Any, y1: jax.Array, y2: jax.Array, dy1: jax.Array,
                           dy2: jax.Array, key: Any, n_chunks: int) -> Tuple[jax.Array, jax.Array, Any]:
    """Undo y2 = x2 + G(y1) and push dy2 through G: (x2, dy1 + dG/dy1 . dy2, dG/dparams . dy2)."""
    if not n_chunks:
        g, g_vjp = jax.vjp(lambda pg, y: feed_forward_fn(pg, y, key, None), p, y1)
        d_params, dy1_from_g = g_vjp(dy2)
        return y2 - g, dy1 + dy1_from_g, d_params
    size = y1.shape[1] // n_chunks

    def chunk(carry, i):
        x2, dy1, d_params = carry
        g, g_vjp = jax.vjp(lambda pg, y: feed_forward_fn(pg, y, key, i), p, _positions(y1, i, size))
        d_params_i, dy1_i = g_vjp(_positions(dy2, i, size))
        x2 = _set_positions(x2, i, _positions(x2, i, size) - g)
        dy1 = _set_positions(dy1, i, _positions(dy1, i, size) + dy1_i)
        return (x2, dy1, jax.tree.map(jnp.add, d_params, d_params_i)), None

    # x2 overwrites y2's buffer chunk by chunk; dy1 is updated in place.
    return lax.scan(chunk, (y2, dy1, jax.tree.map(jnp.zeros_like, p)), jnp.arange(n_chunks))[0]


def reversible_stack(attention_fn: AttentionFns, feed_forward_fn: FeedForwardFn, params: Any, x1: jax.Array,
                     x2: jax.Array, keys: Any, *, ff_chunk_len: int = 0,
                     attention_reverse_fn: AttentionReverseFns = None) -> Tuple[jax.Array, jax.Array]:
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
    """
    fns, grouped = _group_layers(attention_fn)
    reverse_fns = _group_reverse_fns(attention_reverse_fn, len(fns), grouped)
    n_chunks = _chunk_count(x1.shape[1], ff_chunk_len)

    def layer_forward(carry, layer):
        x1, x2 = carry
        p, key = layer
        all_buckets = []
        for j, fn in enumerate(fns):
            p_attn, p_ff, key_j = _layer_slice(p, key, j, grouped)
            with jax.named_scope("reversible_layer"):
                f, buckets = fn(p_attn, x2, key_j, None)
                y1 = x1 + f
                y2 = _residual_feed_forward(feed_forward_fn, p_ff, y1, x2, key_j, n_chunks, 1.0)
            x1, x2 = y1, y2
            all_buckets.append(buckets)
        return (x1, x2), (tuple(all_buckets) if grouped else all_buckets[0])

    def run_forward(params, x1, x2, keys):
        (y1, y2), buckets = lax.scan(layer_forward, (x1, x2), (params, keys))
        return (y1, y2), buckets

    @jax.custom_vjp
    def stack(params, x1, x2, keys):
        return run_forward(params, x1, x2, keys)[0]

    def stack_fwd(params, x1, x2, keys):
        (y1, y2), buckets = run_forward(params, x1, x2, keys)
        return (y1, y2), (params, keys, buckets, y1, y2)

    def layer_backward(carry, layer):
        y1, y2, dy1, dy2 = carry
        p, key, group_buckets = layer
        d_attn, d_ff = [None] * len(fns), [None] * len(fns)
        for j in reversed(range(len(fns))):
            p_attn, p_ff, key_j = _layer_slice(p, key, j, grouped)
            buckets = group_buckets[j] if grouped else group_buckets
            with jax.named_scope("reversible_layer_backward"):
                # y2 = x2 + G(y1): recover x2, push dy2 through G.
                x2, dy1, d_ff[j] = _feed_forward_backward(feed_forward_fn, p_ff, y1, y2, dy1, dy2, key_j, n_chunks)
                # y1 = x1 + F(x2): recover x1 with the forward's buckets (no re-hashing), push dy1 through F.
                if reverse_fns[j] is not None:
                    x1, d_attn[j], dx2 = reverse_fns[j](p_attn, x2, y1, dy1, dy2, key_j, buckets)
                else:
                    f, f_vjp = jax.vjp(lambda pf, x: fns[j](pf, x, key_j, buckets)[0], p_attn, x2)
                    x1 = y1 - f
                    d_attn[j], dx2_from_f = f_vjp(dy1)
                    dx2 = dy2 + dx2_from_f
            y1, y2, dy2 = x1, x2, dx2
        if grouped:
            grads = {"attention": tuple(d_attn), "feed_forward": jax.tree.map(lambda *g: jnp.stack(g), *d_ff)}
        else:
            grads = {"attention": d_attn[0], "feed_forward": d_ff[0]}
        return (y1, y2, dy1, dy2), grads

    def stack_bwd(residuals, cotangents):
        params, keys, buckets, y1, y2 = residuals
        dy1, dy2 = cotangents
        (_, _, dx1, dx2), d_params = lax.scan(layer_backward, (y1, y2, dy1, dy2), (params, keys, buckets),
                                              reverse=True)
        return d_params, dx1, dx2, jax.tree.map(lambda _: None, keys)

    stack.defvjp(stack_fwd, stack_bwd)
    with jax.named_scope("reversible_stack"):
        return stack(params, x1, x2, keys)


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
