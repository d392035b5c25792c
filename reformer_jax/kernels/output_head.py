"""The output head and the next-token loss, whole or chunk by chunk over positions, as pure functions.

    logits = LayerNorm(combine(streams)) W + bias        streams: x [b, l, d] or the reversible (y1, y2)

`chunked_loss_terms` never holds the [b, l, V] logits whole: a `lax.scan` over position chunks computes each
chunk's logits and cross-entropy under `jax.checkpoint`, so the backward pass recomputes them chunk by chunk too.
For a vocabulary of 259 and d_model 512 the logits and their cotangent are each half a residual stream.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from reformer_jax.kernels.norm import layer_norm

Streams = Union[jax.Array, Tuple[jax.Array, jax.Array]]
HeadParams = Dict[str, jax.Array]  # norm {scale, bias} [w], kernel [w, V], bias [V]


class HeadSpec(NamedTuple):
    """The head's static settings (hashable: a custom_vjp's non-differentiable argument)."""
    combine: str  # how the reversible streams meet: "mean" ([b, l, d]) or "concat" ([b, l, 2d])
    layer_norm_eps: float
    dtype: Any  # compute dtype of the projection; logits come out float32


def combine_streams(streams: Streams, combine: str) -> jax.Array:
    """The head's input: x itself, or the reversible streams' mean ([b, l, d]) or concatenation ([b, l, 2d])."""
    if not isinstance(streams, tuple):
        return streams
    y1, y2 = streams
    return jnp.concatenate([y1, y2], axis=-1) if combine == "concat" else (y1 + y2) / 2


def head_logits(params: HeadParams, streams: Streams, spec: HeadSpec) -> jax.Array:
    """Logits [b, l, V] float32 of the (slice of the) streams."""
    with jax.named_scope("output_head"):
        h = layer_norm(combine_streams(streams, spec.combine), params["norm"], spec.layer_norm_eps)
        dtype = spec.dtype
        logits = jnp.einsum("blw,wv->blv", h.astype(dtype), params["kernel"].astype(dtype))
        return (logits + params["bias"].astype(dtype)).astype(jnp.float32)


def loss_terms(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> Dict[str, jax.Array]:
    """Weighted sums over positions: cross-entropy (nats), correct argmax predictions and weights. [b, l(, V)]."""
    weights = weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "correct_sum": jnp.sum(correct * weights),
            "weight_sum": jnp.sum(weights)}


def _rows_loss_terms(spec: HeadSpec, params: HeadParams, rows: Tuple[Any, jax.Array, jax.Array]):
    """Sums of `loss_terms` over [n, b_row, c, ...] rows of positions, one row at a time."""
    def add_row(sums, row):
        streams, targets, weights = row
        terms = loss_terms(head_logits(params, streams, spec), targets, weights)
        return jax.tree.map(jnp.add, sums, terms), None

    zero = jnp.zeros((), jnp.float32)
    return lax.scan(add_row, {"loss_sum": zero, "correct_sum": zero, "weight_sum": zero}, rows)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(spec, params, stream_rows, target_rows, weight_rows):
    return _rows_loss_terms(spec, params, (stream_rows, target_rows, weight_rows))


def _chunked_fwd(spec, params, stream_rows, target_rows, weight_rows):
    return _rows_loss_terms(spec, params, (stream_rows, target_rows, weight_rows)), (
        params, stream_rows, target_rows, weight_rows)


def _chunked_bwd(spec, residuals, g):
    """Recompute each row's logits under jax.vjp; write its stream cotangents into place."""
    params, stream_rows, target_rows, weight_rows = residuals
    # The cotangent buffers are made from g, so XLA cannot allocate them (as zero-filled constants) before the
    # backward pass begins; as constants it scheduled them at the start of the step, alive through the forward.
    zero = g["loss_sum"] * 0.0
    d_rows = jax.tree.map(lambda s: jnp.full(s.shape, zero, s.dtype), stream_rows)

    def row_grads(carry, i):
        d_params, d_rows = carry
        streams, targets, weights = jax.tree.map(lambda x: x[i], (stream_rows, target_rows, weight_rows))
        _, vjp = jax.vjp(lambda p, s: loss_terms(head_logits(p, s, spec), targets, weights), params, streams)
        d_params_i, d_streams_i = vjp(g)
        d_rows = jax.tree.map(lambda rows, d: lax.dynamic_update_index_in_dim(rows, d, i, 0), d_rows, d_streams_i)
        return (jax.tree.map(jnp.add, d_params, d_params_i), d_rows), None

    init = (jax.tree.map(jnp.zeros_like, params), d_rows)
    (d_params, d_rows), _ = lax.scan(row_grads, init, jnp.arange(target_rows.shape[0]))
    return d_params, d_rows, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_loss_terms(params: HeadParams, streams: Streams, targets: jax.Array, weights: jax.Array, *,
                       spec: HeadSpec, chunk_len: int) -> Dict[str, jax.Array]:
    """`loss_terms` of `head_logits`, `chunk_len` positions at a time (0, or a length it does not divide: whole).

    streams [b, l, d] (or a pair), targets int [b, l], weights [b, l] -> the three weighted sums (scalars).
    The backward pass (a custom_vjp) recomputes each chunk's logits; only the streams' cotangents are full-size.
    """
    b, length = targets.shape
    if not chunk_len or chunk_len >= length or length % chunk_len:
        return loss_terms(head_logits(params, streams, spec), targets, weights)
    # Rows of chunk_len positions, [l / c, b, c, ...]: a row holds chunk i of every sequence, so with the batch
    # split over devices each device's share of a row is its own (rows of one sequence each, [b l / c, 1, c, ...],
    # made XLA move the whole streams between devices for these loops). For b = 1 the reshape is free; otherwise
    # the transpose is made where the streams are combined. They are combined first: the loops over rows then read
    # a buffer of their own, not the reversible stack's outputs, which its backward pass overwrites in place (XLA
    # would copy them for these loops).
    as_rows = lambda x: jnp.moveaxis(x.reshape((b, length // chunk_len, chunk_len) + x.shape[2:]), 1, 0)  # noqa: E731
    return _chunked(spec, params, as_rows(combine_streams(streams, spec.combine)), as_rows(targets), as_rows(weights))
