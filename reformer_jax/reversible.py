"""Residual stacks over stacked layer parameters: the reversible one (RevNet) and the ordinary one.

A layer is a pair of blocks
  F(params, x, key, buckets) -> (y, buckets)   attention; returns its LSH bucket ids (or None)
  G(params, x, key)          -> y              feed-forward
where `key` is the layer's inputs besides the activations (its [2] key array, 0: hashing, 1: dropout, or a pytree
holding it, e.g. with explicit hash rotations) and every block is a pure function of its arguments, so a
recompute with the same key replays the same hash rotations and dropout masks. Stacks of mixed layer types
(e.g. local and LSH attention alternating) scan over their repeating group of layers instead of single layers.

Reversible stack (one `jax.custom_vjp` around one `lax.scan` of all layers):
  forward   y1 = x1 + F(x2),  y2 = x2 + G(y1)
  backward  x2 = y2 - G(y1),  x1 = y1 - F(x2)      (recomputed layer by layer, last layer first)
It keeps for the backward pass only the stack's outputs (y1, y2), the parameters and keys (inputs anyway) and,
per LSH layer, the compact bucket ids: activation memory is flat in depth. A custom_vjp per block would instead
store every block's output (see ../shared/reference/jax-memory-notes.md).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

AttentionFn = Callable[[Any, jax.Array, Any, Optional[jax.Array]], Tuple[jax.Array, Optional[jax.Array]]]
FeedForwardFn = Callable[[Any, jax.Array, Any], jax.Array]
AttentionFns = Union[AttentionFn, Sequence[AttentionFn]]


def _group_layers(attention_fn: AttentionFns):
    """(functions, grouped): one F per layer of the scanned unit.

    A single F scans over layers. A sequence (F_0, ..., F_{p-1}) scans over groups of p consecutive layers (a
    repeating pattern of layer types, e.g. local then LSH): then params["attention"] is a tuple of p trees with
    leading axis G = n / p, params["feed_forward"] leaves and the per-layer inputs `keys` are [G, p, ...].
    """
    if callable(attention_fn):
        return (attention_fn,), False
    return tuple(attention_fn), True


def _layer_slice(p: Any, key: Any, j: int, grouped: bool):
    """Layer j's (attention params, feed-forward params, key) of one scanned unit."""
    if not grouped:
        return p["attention"], p["feed_forward"], key
    pick = lambda tree: jax.tree.map(lambda leaf: leaf[j], tree)  # noqa: E731
    return p["attention"][j], pick(p["feed_forward"]), pick(key)


def reversible_stack(attention_fn: AttentionFns, feed_forward_fn: FeedForwardFn, params: Any, x1: jax.Array,
                     x2: jax.Array, keys: Any) -> Tuple[jax.Array, jax.Array]:
    """Run all layers reversibly: (x1, x2) [b, l, d] each -> (y1, y2) [b, l, d] each.

    Args:
      attention_fn, feed_forward_fn: the blocks F and G (see module docstring); F may be a sequence of one
        function per layer of a repeating group (see `_group_layers`).
      params: {"attention": ..., "feed_forward": ...}, every leaf stacked on a leading layer (or group) axis.
      x1, x2: the two residual streams (float32).
      keys: per-layer inputs of the blocks, stacked likewise: [n, 2] PRNG keys, one pair per layer, or a pytree
        of such arrays (e.g. with explicit hash rotations). Not differentiated.
    """
    fns, grouped = _group_layers(attention_fn)

    def layer_forward(carry, layer):
        x1, x2 = carry
        p, key = layer
        all_buckets = []
        for j, fn in enumerate(fns):
            p_attn, p_ff, key_j = _layer_slice(p, key, j, grouped)
            with jax.named_scope("reversible_layer"):
                f, buckets = fn(p_attn, x2, key_j, None)
                x1 = x1 + f  # y1 = x1 + F(x2)
                x2 = x2 + feed_forward_fn(p_ff, x1, key_j)  # y2 = x2 + G(y1)
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
                g, g_vjp = jax.vjp(lambda pg, y: feed_forward_fn(pg, y, key_j), p_ff, y1)
                x2 = y2 - g
                d_ff[j], dy1_from_g = g_vjp(dy2)
                dy1 = dy1 + dy1_from_g
                # y1 = x1 + F(x2): recover x1 with the forward's buckets (no re-hashing), push dy1 through F.
                f, f_vjp = jax.vjp(lambda pf, x: fns[j](pf, x, key_j, buckets)[0], p_attn, x2)
                x1 = y1 - f
                d_attn[j], dx2_from_f = f_vjp(dy1)
                dx2 = dy2 + dx2_from_f
            y1, y2, dy1, dy2 = x1, x2, dy1, dx2
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
                x = x + feed_forward_fn(p_ff, x, key_j)
        return x, None

    with jax.named_scope("residual_stack"):
        if scan:
            return lax.scan(layer, x, (params, keys))[0]
        for i in range(jax.tree.leaves(keys)[0].shape[0]):
            x, _ = layer(x, jax.tree.map(lambda leaf: leaf[i], (params, keys)))
        return x
