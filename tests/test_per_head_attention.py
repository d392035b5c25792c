"""The one-head-at-a-time attention block (sequential_heads) against all heads at once under plain autodiff."""

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import pytest

from reformer_jax import ModelConfig

from reformer_jax.model import layers


def _rel_err(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("attention,sequential_rounds", [("lsh", True), ("lsh", False), ("full", True)])
def test_heads_one_at_a_time_match_all_heads(attention, sequential_rounds):
    cfg = ModelConfig.preset("reformer", attention=attention, d_model=24, n_heads=3, d_ff=32, n_layers=1,
                             max_len=64, chunk_len=8, n_hashes=3, dropout=0.0, sequential_rounds=sequential_rounds)
    params = jax.tree.map(lambda leaf: leaf[0], layers.init_attention_params(jax.random.key(1), cfg))
    x = jax.random.normal(jax.random.key(2), (2, 64, 24))
    probe = jax.random.normal(jax.random.key(3), x.shape)

    def run(sequential_heads):
        config = cfg.replace(sequential_heads=sequential_heads)

        def loss(p, x):
            y, buckets = layers.attention_block(p, x, config=config, lsh_rng=jax.random.key(4),
                                                dropout_rng=jax.random.key(5), deterministic=True)
            return jnp.sum(y * probe), (y, buckets)

        return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)

    (_, (y_heads, b_heads)), g_heads = run(True)
    (_, (y_all, b_all)), g_all = run(False)
    if attention == "lsh":
        assert b_heads.dtype == b_all.dtype and bool(jnp.all(b_heads == b_all))  # same rotations, same ids
    assert _rel_err(y_heads, y_all) < 1e-5
    pairs = list(zip(jax.tree.leaves(g_heads), jax.tree.leaves(g_all)))
    assert len(pairs) == 6  # norm scale, bias, out, qk, v and the input
    for got, want in pairs:
        assert float(jnp.max(jnp.abs(want))) > 0
        assert _rel_err(got, want) < 1e-5


def test_heads_one_at_a_time_keep_only_inputs_and_bucket_ids(capsys):
    """What autodiff stores for the backward pass: the block input and the bucket ids, no [b, h, l, k] tensor."""
    cfg = ModelConfig.preset("reformer", d_model=16, n_heads=2, d_ff=32, n_layers=1, max_len=64, chunk_len=8,
                             n_hashes=2, dropout=0.0)
    params = jax.tree.map(lambda leaf: leaf[0], layers.init_attention_params(jax.random.key(1), cfg))
    x = jax.random.normal(jax.random.key(2), (2, 64, 16))

    def f(p, x):
        y, _ = layers.attention_block(p, x, config=cfg, lsh_rng=jax.random.key(4), dropout_rng=jax.random.key(5),
                                      deterministic=True)
        return jnp.sum(y)

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(f, params, x)
    kept = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()
            if not line.partition(" ")[2].startswith("from the argument") and not line.startswith("key<")]
    assert kept == ["u8[2,2,2,64]"]
