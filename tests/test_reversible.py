"""The whole-stack reversible custom_vjp against plain autodiff of the same layers, dropout and hashing on."""

import functools

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import ModelConfig

from reformer_jax.model import layers
from reformer_jax.kernels.reversible import residual_stack, reversible_stack


def _setup(attention, n_layers=3):
    cfg = ModelConfig.preset("reformer", attention=attention, d_model=16, n_heads=2, d_ff=32, n_layers=n_layers,
                             max_len=64, chunk_len=8, n_hashes=2, dropout=0.1, attention_dropout=0.1,
                             ff_chunk_len=16)
    rng = jax.random.key(0)
    params = {"attention": layers.init_attention_params(jax.random.fold_in(rng, 1), cfg),
              "feed_forward": layers.init_feed_forward_params(jax.random.fold_in(rng, 2), cfg)}
    keys = jax.random.split(jax.random.key(3), (n_layers, 2))
    x = jax.random.normal(jax.random.key(4), (2, 64, 16))

    def attention_fn(p, x, key, buckets):
        return layers.attention_block(p, x, config=cfg, lsh_rng=key[0], dropout_rng=key[1], deterministic=False,
                                      buckets=buckets)

    def feed_forward_fn(p, x, key, chunk_index):
        return layers.feed_forward_block(p, x, config=cfg, dropout_rng=key[1], deterministic=False,
                                         chunk_index=chunk_index)

    return cfg, params, keys, x, attention_fn, feed_forward_fn


def _plain_reversible(attention_fn, feed_forward_fn, params, x1, x2, keys):
    """The same reversible wiring as a Python loop: jax differentiates it by storing everything."""
    for i in range(keys.shape[0]):
        p = jax.tree.map(lambda leaf: leaf[i], params)
        x1 = x1 + attention_fn(p["attention"], x2, keys[i], None)[0]
        x2 = x2 + feed_forward_fn(p["feed_forward"], x1, keys[i], None)
    return x1, x2


def _rel_err(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("attention,ff_chunk_len", [("lsh", 16), ("full", 0)])
def test_reversible_gradients_equal_plain_autodiff(attention, ff_chunk_len):
    """ff_chunk_len=16: the stack runs G chunk by chunk in place; 0: G on the whole sequence (it chunks itself)."""
    _, params, keys, x, attention_fn, feed_forward_fn = _setup(attention)
    probe = jax.random.normal(jax.random.key(5), x.shape)

    def loss(stack, params, x1, x2):
        y1, y2 = stack(attention_fn, feed_forward_fn, params, x1, x2, keys)
        return jnp.sum((y1 + 2 * y2) * probe)

    x2 = x * 0.5
    stack = functools.partial(reversible_stack, ff_chunk_len=ff_chunk_len)
    custom_value, custom = jax.jit(jax.value_and_grad(functools.partial(loss, stack), (0, 1, 2)))(
        params, x, x2)
    plain_value, plain = jax.jit(jax.value_and_grad(functools.partial(loss, _plain_reversible), (0, 1, 2)))(
        params, x, x2)
    assert abs(float(custom_value - plain_value)) <= 1e-5 * abs(float(plain_value))
    pairs = list(zip(jax.tree.leaves(custom), jax.tree.leaves(plain)))
    assert len(pairs) == 13  # 11 parameter leaves + both input streams
    for got, want in pairs:
        assert float(jnp.max(jnp.abs(want))) > 0
        assert _rel_err(got, want) < 1e-5


def test_reversible_forward_equals_plain_forward_and_dropout_is_active():
    _, params, keys, x, attention_fn, feed_forward_fn = _setup("lsh")
    run = jax.jit(lambda stack, k: stack(attention_fn, feed_forward_fn, params, x, x, k), static_argnums=0)
    y, z = run(functools.partial(reversible_stack, ff_chunk_len=16), keys), run(_plain_reversible, keys)
    for a, b in zip(y, z):
        assert _rel_err(a, b) < 1e-6
    w = run(reversible_stack, jax.random.split(jax.random.key(6), keys.shape))
    assert _rel_err(w[0], y[0]) > 1e-3


_ITEMSIZE = {"f32": 4, "u8": 1, "u16": 2, "s32": 4}


def _saved_residuals(n_layers, capsys):
    """(dtype, element count) of what autodiff keeps besides the arguments, from print_saved_residuals."""
    _, params, keys, x, attention_fn, feed_forward_fn = _setup("lsh", n_layers)
    f = lambda p, x: jnp.sum(reversible_stack(attention_fn, feed_forward_fn, p, x, x, keys)[0])  # noqa: E731
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(f, params, x)
    kept = []
    for line in capsys.readouterr().out.splitlines():
        spec, _, source = line.partition(" ")
        if source.startswith("from the argument") or spec.startswith("key<"):
            continue
        dtype, dims = spec.rstrip("]").split("[")
        kept.append((dtype, int(np.prod([int(d) for d in dims.split(",")]))))
    return kept


def test_reversible_stack_saves_nothing_per_layer_but_bucket_ids(capsys):
    kept2, kept6 = _saved_residuals(2, capsys), _saved_residuals(6, capsys)
    # Only the outputs y1, y2 ([2, 64, 16] float32 each) are kept in float, whatever the depth...
    assert [k for k in kept2 if k[0] == "f32"] == [k for k in kept6 if k[0] == "f32"] == [("f32", 2 * 64 * 16)] * 2
    # ...and per layer the uint8 bucket ids [batch 2, heads 2, rounds 2, length 64].
    assert [k for k in kept2 if k[0] != "f32"] == [("u8", 2 * 2 * 2 * 2 * 64)]
    assert [k for k in kept6 if k[0] != "f32"] == [("u8", 6 * 2 * 2 * 2 * 64)]


def test_residual_stack_scan_and_unrolled_agree():
    _, params, keys, x, attention_fn, feed_forward_fn = _setup("full")
    run = jax.jit(lambda scan: residual_stack(attention_fn, feed_forward_fn, params, x, keys, scan=scan),
                  static_argnums=0)
    a, b = run(True), run(False)
    assert _rel_err(a, b) < 1e-6
