"""The one-head-at-a-time attention core with its heads split over the mesh's `tensor` axis.

`per_head_attention` runs a layer's heads as a lax.scan under its own custom_vjp; GSPMD cannot split a scan's
iterations over devices, so with a `tensor` axis of size T > 1 in the mesh in context (`jax.set_mesh`), these
wrappers run it under shard_map over `tensor` only (data and fsdp stay automatic): each device scans its h / T
heads, and one psum over `tensor` joins the heads where they meet (the block output; in the reverse step the
recovered input, dx and the LayerNorm gradients). Without such a mesh they call `per_head_attention` directly.

Every head draws the same hash rotations and dropout keys as on one device (they are made for all heads and then
split), so the result equals the single-device block up to the order of the additions.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from reformer_jax.kernels import per_head

TENSOR = "tensor"
Params = Any


def tensor_ways() -> int:
    """Size of the `tensor` axis of the mesh in context (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TENSOR not in mesh.axis_names:
        return 1
    return int(mesh.shape[TENSOR])


def _param_specs(params: Params):
    """One layer's attention parameters: qk, v [d, h, k] and out [h, k, d] split on heads; the LayerNorm whole."""
    heads_at = {"qk": P(None, TENSOR), "v": P(None, TENSOR), "out": P(TENSOR)}
    return {name: heads_at.get(name, jax.tree.map(lambda _: P(), value)) for name, value in params.items()}


def _over_tensor(body, out_specs, *values_and_specs):
    """shard_map of body over `tensor` (other axes automatic); None values are passed through as None."""
    present = [i for i, (value, _) in enumerate(values_and_specs) if value is not None]

    def local(*values):
        full = [None] * len(values_and_specs)
        for i, value in zip(present, values):
            full[i] = value
        return body(*full)

    # check_vma=False: the per-head core's loops start from fresh (device-invariant) buffers that its heads make
    # device-varying. Nothing differentiates through this shard_map: the forward and backward passes of the
    # heads over `tensor` are paired by their own custom_vjp below, with explicit psums.
    mapped = jax.shard_map(local, in_specs=tuple(values_and_specs[i][1] for i in present), out_specs=out_specs,
                           axis_names={TENSOR}, check_vma=False)
    return mapped(*(values_and_specs[i][0] for i in present))


def hash_by_heads(spec: per_head.HeadSpec, params: Params, x: jax.Array, rotations: jax.Array) -> jax.Array:
    """`per_head.hash_by_heads` with the heads over `tensor`: x [b, l, d], rotations [h, k, r, n] -> [b, h, r, l]."""
    if tensor_ways() == 1:
        return per_head.hash_by_heads(spec, params, x, rotations)
    return _over_tensor(lambda p, x, rot: per_head.hash_by_heads(spec, p, x, rot), P(None, TENSOR),
                        (params, _param_specs(params)), (x, P()), (rotations, P(TENSOR)))


def _forward(spec, params, x, buckets, keys, keep, rate, key_mask=None):
    """The block output of every head, each device running its own: [b, l, d], one psum."""
    local = lambda p, x, buckets, keys, keep, key_mask: lax.psum(  # noqa: E731
        per_head.attention_by_heads(spec, p, x, buckets, keys, keep, rate, key_mask), TENSOR)
    return _over_tensor(local, P(), (params, _param_specs(params)), (x, P()), (buckets, P(None, TENSOR)),
                        (keys, P(TENSOR)), (keep, P()), (key_mask, P()))


def _reverse(spec, params, x, y, dy, buckets, keys, keep, rate, key_mask=None):
    """(-F(x) or None without y, dF/dparams . dy, dF/dx . dy) of every head, each device running its own."""
    def local(p, x, dy, buckets, keys, keep, key_mask):
        zeros = jnp.zeros_like(x)
        minus_f, grads, dx = per_head.reverse_by_heads(spec, p, x, zeros if y is not None else None, dy, zeros,
                                                       buckets, keys, keep, rate, key_mask)
        grads = {**grads, "norm": lax.psum(grads["norm"], TENSOR)}  # LayerNorm: a sum over all heads
        return (None if minus_f is None else lax.psum(minus_f, TENSOR)), grads, lax.psum(dx, TENSOR)

    return _over_tensor(local, (None if y is None else P(), _param_specs(params), P()),
                        (params, _param_specs(params)), (x, P()), (dy, P()), (buckets, P(None, TENSOR)),
                        (keys, P(TENSOR)), (keep, P()), (key_mask, P()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _attention_over_tensor(spec, params, x, buckets, keys, keep, rate, key_mask):
    return _forward(spec, params, x, buckets, keys, keep, rate, key_mask)


def _attention_fwd(spec, params, x, buckets, keys, keep, rate, key_mask):
    return _forward(spec, params, x, buckets, keys, keep, rate, key_mask), (params, x, buckets, keys, keep, key_mask)


def _attention_bwd(spec, rate, residuals, dy):
    params, x, buckets, keys, keep, key_mask = residuals
    _, grads, dx = _reverse(spec, params, x, None, dy, buckets, keys, keep, rate, key_mask)
    return grads, dx, None, None, None, None


_attention_over_tensor.defvjp(_attention_fwd, _attention_bwd)


def attention_by_heads(spec: per_head.HeadSpec, params: Params, x: jax.Array, buckets: Optional[jax.Array],
                       dropout_rng: jax.Array, keep: Optional[jax.Array] = None, rate: float = 0.0,
                       key_mask: Optional[jax.Array] = None) -> jax.Array:
    """`per_head.attention_by_heads` with the heads over `tensor`: x [b, l, d] -> [b, l, d]."""
    if tensor_ways() == 1:
        return per_head.attention_by_heads(spec, params, x, buckets, dropout_rng, keep, rate, key_mask)
    if buckets is not None:
        buckets = lax.stop_gradient(buckets)
    return _attention_over_tensor(spec, params, x, buckets, per_head.head_keys(dropout_rng, params["qk"].shape[1]),
                                  keep, float(rate), key_mask)


def reverse_by_heads(spec: per_head.HeadSpec, params: Params, x: jax.Array, y: jax.Array, dy: jax.Array,
                     dx: jax.Array, buckets: Optional[jax.Array], dropout_rng: jax.Array,
                     keep: Optional[jax.Array] = None, rate: float = 0.0,
                     key_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, Params, jax.Array]:
    """`per_head.reverse_by_heads` with the heads over `tensor`: (y - F(x), dF/dparams . dy, dx + dF/dx . dy).

    Each device subtracts its heads' outputs from a zero buffer and adds their dF/dx into another; one psum each
    joins them.
    """
    if tensor_ways() == 1:
        return per_head.reverse_by_heads(spec, params, x, y, dy, dx, buckets, dropout_rng, keep, rate, key_mask)
    keys = per_head.head_keys(dropout_rng, params["qk"].shape[1])
    minus_f, grads, dx_heads = _reverse(spec, params, x, y, dy, buckets, keys, keep, rate, key_mask)
    return y + minus_f, grads, dx + dx_heads
