"""The reversible stack's recomputation: the backward pass uses the forward's bucket ids (a recomputed input that
re-hashes into another bucket changes nothing), how far recomputed inputs drift over 48 layers on plain float32
streams, and that on the exact-reversal grid (ModelConfig.stream_grid_bits) they come back exactly while the
gradients still equal autodiff's."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.reversible_drift import FLOAT32_TARGET, drift_config, measure_drift
from reformer_jax import ModelConfig
from reformer_jax.model import layers
from reformer_jax.kernels import lsh as attn
from reformer_jax.model.config import RECOMMENDED_STREAM_GRID_BITS
from reformer_jax.model.reformer_lm import block_functions
from reformer_jax.kernels.reversible import reversible_stack, to_grid

# Its module-scoped fixtures are expensive: keep the module on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_reversible_robustness")

LENGTH, CHUNK = 16, 4
# One head of width 2 hashed into 2 buckets by the projection x0 - x1: bucket 0 when x0 >= x1, else 1.
ROTATIONS = jnp.array([1.0, -1.0]).reshape(1, 2, 1, 1)


def _attention_fn(p, x, key, buckets):
    """F: shared-QK LSH attention with qk = x itself [b, l, 2], so a position with x0 == x1 sits on the hash
    boundary; hashes only when `buckets` is None, as the model's attention block does."""
    qk = x[:, None]
    v = jnp.einsum("bld,de->ble", x, p["wv"])[:, None]
    if buckets is None:
        buckets = attn.lsh_buckets(qk, None, n_hashes=1, n_buckets=2, rotations=ROTATIONS)
    o = attn.lsh_attention(qk, v, None, n_hashes=1, n_buckets=2, chunk_len=CHUNK, n_chunks_before=1,
                           buckets=buckets)
    return jnp.einsum("ble,ed->bld", o[:, 0], p["wo"]), buckets


def _feed_forward_fn(p, y, key, chunk=None):
    """G: outputs up to 1000 in the first coordinate, 10 in the second. y2 = x2 + G(y1) rounds x2's coordinates to
    different grids, so x2 = y2 - G(y1) comes back with x0 - x1 slightly off zero at the boundary positions."""
    return jnp.tanh(y @ p["wg"]) * jnp.array([1000.0, 10.0])


def _setup():
    k = jax.random.split(jax.random.key(0), 6)
    params = {"attention": {"wv": jax.random.normal(k[0], (1, 2, 2)), "wo": jax.random.normal(k[1], (1, 2, 2))},
              "feed_forward": {"wg": jax.random.normal(k[2], (1, 2, 2))}}
    x1 = jax.random.normal(k[3], (1, LENGTH, 2))
    x2 = jax.random.normal(k[4], (1, LENGTH, 2))
    x2 = x2.at[:, ::2, 1].set(x2[:, ::2, 0])  # every even position exactly on the boundary (bucket 0)
    cotangent = jax.random.normal(k[5], (2, 1, LENGTH, 2))
    return params, x1, x2, jax.random.split(jax.random.key(1), (1, 2)), cotangent


def _stack(params, x1, x2, keys, buckets):
    """The reversible stack under test: it hashes in its forward pass (`buckets` unused) and recomputes x2 in its
    backward pass."""
    return reversible_stack(_attention_fn, _feed_forward_fn, params, x1, x2, keys)


def _plain(params, x1, x2, keys, buckets):
    """The same layer, with F attending by the given bucket ids, differentiated by ordinary autodiff (it keeps x2:
    nothing is recomputed)."""
    p = jax.tree.map(lambda leaf: leaf[0], params)
    y1 = x1 + _attention_fn(p["attention"], x2, keys[0], buckets)[0]
    return y1, x2 + _feed_forward_fn(p["feed_forward"], y1, keys[0])


def test_backward_uses_the_forward_buckets_where_rehashing_would_flip_one():
    params, x1, x2, keys, cotangent = _setup()
    p = jax.tree.map(lambda leaf: leaf[0], params)
    @jax.jit
    def forward_then_recompute(p, x1, x2):
        f, buckets = _attention_fn(p["attention"], x2, keys[0], None)  # the layer's forward pass
        y1 = x1 + f
        y2 = x2 + _feed_forward_fn(p["feed_forward"], y1, keys[0])
        recomputed = y2 - _feed_forward_fn(p["feed_forward"], y1, keys[0])  # what the backward pass recovers
        return buckets, recomputed, attn.lsh_buckets(recomputed[:, None], None, n_hashes=1, n_buckets=2,
                                                     rotations=ROTATIONS)

    forward_buckets, x2_recomputed, rehashed = forward_then_recompute(p, x1, x2)
    flipped = np.flatnonzero(np.asarray(rehashed != forward_buckets))
    assert flipped.size > 0, "premise: re-hashing the recomputed x2 moves some position to another bucket"
    assert float(jnp.max(jnp.abs(x2_recomputed - x2))) < 1e-3  # ... although x2 is recovered to rounding error

    def gradients(forward):
        def loss(params, x1, x2, buckets):
            y1, y2 = forward(params, x1, x2, keys, buckets)
            return jnp.sum(y1 * cotangent[0]) + jnp.sum(y2 * cotangent[1])
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    reversible = gradients(_stack)(params, x1, x2, forward_buckets)
    exact = gradients(_plain)(params, x1, x2, forward_buckets)  # ordinary autodiff of the forward pass as it ran
    rehashing = gradients(_plain)(params, x1, x2, rehashed)  # what a backward re-hashing x2 would compute
    worst = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(jax.tree.leaves(reversible), jax.tree.leaves(exact)))
    assert worst < 1e-4, worst  # the gradients are exact up to the rounding of x2's recomputation
    moved = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(jax.tree.leaves(rehashing), jax.tree.leaves(exact)))
    assert moved > 100 * worst, (moved, worst)  # what a re-hashing backward would have got instead
    print(f"flipped {flipped.size} of {LENGTH}; reversible vs exact {worst:.1e}; re-hashed vs exact {moved:.1e}")


SMALL = dict(d_model=32, n_heads=2, d_ff=64, n_layers=48, max_len=64, chunk_len=16, n_hashes=2)
GRID = RECOMMENDED_STREAM_GRID_BITS


@pytest.fixture(scope="module")
def float32_drift():
    """Plain float32 streams (no grid), 2 and 48 layers."""
    return measure_drift(drift_config("float32", **SMALL), [2, 48], batch_size=1, seq_len=64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reconstruction_on_the_grid_is_exact_at_2_and_48_layers(float32_drift, dtype):
    """README: relative error 0 at every depth from 2 to 48, in float32 and in bfloat16 compute."""
    on_grid = measure_drift(drift_config(dtype, stream_grid_bits=GRID, **SMALL), [2, 48], batch_size=1, seq_len=64)
    assert [r["n_layers"] for r in on_grid] == [2, 48]
    assert max(r["max_abs_stream"] for r in on_grid) < 2 ** (24 - GRID)  # premise: the grid's exact range
    assert float32_drift[-1]["relative_error"] > 0  # the measure sees the plain streams' error...
    assert [r["relative_error"] for r in on_grid] == [0.0, 0.0]  # ...and the grid's is none at all
    assert on_grid[-1]["relative_error"] < FLOAT32_TARGET  # the target the grid was built for


def test_reconstruction_error_is_nonzero_and_grows_with_depth(float32_drift):
    assert [r["n_layers"] for r in float32_drift] == [2, 48]
    assert 0 < float32_drift[0]["relative_error"] < float32_drift[1]["relative_error"]


def test_gradients_on_the_grid_equal_plain_autodiff_of_the_quantised_layers():
    """The stack on the grid (per-head full attention with its fused reverse step, chunked feed-forward, dropout on)
    against a Python loop of y1 = x1 + Q(F(x2)), y2 = x2 + Q(G(y1)) differentiated by autodiff (Q straight-through),
    with the tolerance of the plain contract in test_reversible.py."""
    cfg = ModelConfig.preset("reformer", attention="full", d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=64,
                             dropout=0.1, attention_dropout=0.1, ff_chunk_len=16, stream_grid_bits=GRID)
    attention_fn, feed_forward_fn, reverse_fn = block_functions(cfg, "full", deterministic=False)
    params = {"attention": layers.init_attention_params(jax.random.key(1), cfg),
              "feed_forward": layers.init_feed_forward_params(jax.random.key(2), cfg)}
    keys = jax.random.split(jax.random.key(3), (cfg.n_layers, 2))
    x = to_grid(jax.random.normal(jax.random.key(4), (2, 64, 16)), GRID)
    probe = jax.random.normal(jax.random.key(5), x.shape)

    def stack(params, x1, x2):
        return reversible_stack(attention_fn, feed_forward_fn, params, x1, x2, keys, ff_chunk_len=16,
                                attention_reverse_fn=reverse_fn, grid_bits=GRID)

    def plain(params, x1, x2):
        for i in range(cfg.n_layers):
            p = jax.tree.map(lambda leaf: leaf[i], params)
            x1 = x1 + to_grid(attention_fn(p["attention"], x2, keys[i], None)[0], GRID)
            x2 = x2 + to_grid(feed_forward_fn(p["feed_forward"], x1, keys[i], None), GRID)
        return x1, x2

    def gradients(forward):
        def loss(params, x1, x2):
            y1, y2 = forward(params, x1, x2)
            return jnp.sum((y1 + 2 * y2) * probe)
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(params, x, to_grid(x * 0.5, GRID))

    (value, got), (want_value, want) = gradients(stack), gradients(plain)
    assert abs(float(value - want_value)) <= 1e-5 * abs(float(want_value))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.max(jnp.abs(w))) > 0
        assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 1e-5
