"""Local attention against a dense masked reference; padding masks; per-layer attention types (torch-free)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import ModelConfig, ReformerLM, init_params

from reformer_jax.model import layers
from reformer_jax.kernels.local import local_attention
from reformer_jax.model.reformer_lm import layer_period
from reformer_jax.kernels.reversible import reversible_stack


def dense_local_reference(q, k, v, chunk_len, n_before, causal, key_mask):
    """Every query against every key, masking what chunked look-back cannot see (no wrap-around: causal)."""
    length = q.shape[2]
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    visible = (i // chunk_len - j // chunk_len >= 0) & (i // chunk_len - j // chunk_len <= n_before)
    if causal:
        visible = visible & (j <= i)
    visible = jnp.asarray(visible)[None, None] & key_mask[:, None, None, :]
    dots = jnp.einsum("bhqk,bhsk->bhqs", q, k) / jnp.sqrt(q.shape[-1])
    return jnp.einsum("bhqs,bhsk->bhqk", jax.nn.softmax(jnp.where(visible, dots, -1e9), -1), v)


@pytest.mark.parametrize("n_before", [0, 1, 2])
def test_local_attention_matches_dense_masked_reference(n_before):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 3, 32, 8))
    key_mask = jnp.arange(32)[None, :] < jnp.array([[32], [21]])
    key_mask = key_mask.at[1, 0].set(False)  # a padded key in the middle of what queries see
    out = jax.jit(lambda *a: local_attention(*a, chunk_len=8, n_chunks_before=n_before, key_mask=key_mask))(q, k, v)
    expected = dense_local_reference(q, k, v, 8, n_before, True, key_mask)
    real = np.asarray(key_mask) & (np.arange(32) > 0)  # queries with a visible real key
    np.testing.assert_allclose(np.asarray(out)[:, :, real[1]][1], np.asarray(expected)[:, :, real[1]][1],
                               atol=1e-6)
    np.testing.assert_allclose(out[0], expected[0], atol=1e-6)


def test_local_attention_one_chunk_is_ordinary_attention_and_bad_lengths_fail():
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 2, 6, 4))
    full = dense_local_reference(q, k, v, 8, 0, True, jnp.ones((1, 6), bool))
    np.testing.assert_allclose(jax.jit(lambda *a: local_attention(*a, chunk_len=8))(q, k, v), full, atol=1e-6)
    with pytest.raises(ValueError, match="length 12 is not a multiple of chunk_len=8"):
        local_attention(*jax.random.normal(jax.random.key(1), (3, 1, 2, 12, 4)), chunk_len=8)


def test_attn_layers_validation_names_the_value():
    with pytest.raises(ValueError, match=r"attn_layers=.*n_layers=3"):
        ModelConfig(n_layers=3, attn_layers=("local", "lsh"))
    with pytest.raises(ValueError, match="'sparse' is not an attention type"):
        ModelConfig(n_layers=2, attn_layers=("local", "sparse"))
    config = ModelConfig(n_layers=4, attn_layers=["local", "lsh", "local", "lsh"])
    assert config.layer_types == ("local", "lsh") * 2 and config.uses("local") and not config.uses("full")
    assert ModelConfig(n_layers=2, attention="full").layer_types == ("full", "full")
    with pytest.raises(ValueError, match="local_chunk_len=8"):
        ModelConfig(n_layers=1, attention="local", local_chunk_len=8, max_len=64).check_seq_len(20)
    assert [layer_period(t) for t in (("lsh",) * 3, ("local", "lsh") * 3, ("lsh", "local", "local"))] == [1, 2, 3]


def small(**overrides):
    base = dict(vocab_size=20, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=32, chunk_len=8, n_hashes=2,
                n_buckets=4, local_chunk_len=8, dropout=0.0, output_head="concat", tie_embeddings=False)
    return ModelConfig(**{**base, **overrides})


def test_right_padding_leaves_real_logits_of_local_and_full_layers_unchanged():
    config = small(attn_layers=("local", "full"), reversible=False, output_head="mean")  # the plain stack
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 3, 20)
    padded = jnp.concatenate([tokens, jnp.zeros((1, 16), jnp.int32)], axis=1)
    mask = jnp.arange(32)[None] < 16
    apply = jax.jit(lambda t, m: ReformerLM(config).apply({"params": params}, t, attention_mask=m))
    alone = apply(tokens, None)
    with_padding = apply(padded, mask)
    np.testing.assert_allclose(with_padding[:, :16], alone, atol=1e-5)


def test_padding_content_never_reaches_real_tokens_in_lsh_layers_with_explicit_rotations():
    config = small(attn_layers=("local", "lsh"))
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 3, 20)
    rotations = jax.random.normal(jax.random.key(4), (1, 2, 8, 2, 2))  # [LSH layers, h, k, n_hashes, 4 / 2]
    with pytest.raises(ValueError, match=r"lsh_rotations have shape \(2, 2, 8, 2, 2\); expected \(1, 2, 8, 2, 2\)"):
        ReformerLM(config).apply({"params": params}, tokens, lsh_rotations=jnp.zeros((2, 2, 8, 2, 2)))
    mask = (jnp.arange(32)[None] < jnp.array([[25], [32]])) & (jnp.arange(32)[None] >= jnp.array([[0], [6]]))
    other = jnp.where(mask, tokens, jax.random.randint(jax.random.key(2), tokens.shape, 3, 20))
    apply = jax.jit(lambda t, m: ReformerLM(config).apply({"params": params}, t, attention_mask=m,
                                                          lsh_rotations=rotations))  # no 'lsh' stream needed
    a, b = apply(tokens, mask), apply(other, mask)
    np.testing.assert_allclose(np.asarray(a)[np.asarray(mask)], np.asarray(b)[np.asarray(mask)], atol=1e-5)
    assert not np.allclose(np.asarray(a)[np.asarray(mask)], np.asarray(apply(tokens, None))[np.asarray(mask)],
                           atol=1e-3)  # the mask does change what real tokens see


@pytest.mark.long  # two stack compiles (~35 s on the shared CPU)
def test_mixed_reversible_stack_gradients_equal_plain_autodiff():
    """A (local, full) group, G chunked in place, dropout on: the full layer takes the fused per-head reverse
    step (as LSH layers do; the cheaper compile), the local one jax.vjp of its block."""
    cfg = small(attn_layers=("local", "full"), dropout=0.1, ff_chunk_len=8)
    assert cfg.sequential_heads
    groups, rng = 1, jax.random.key(0)

    @jax.jit
    def inputs(rng):  # one compile instead of many small eager ones
        params = {"attention": (layers.init_attention_params(jax.random.fold_in(rng, 1), cfg, "local", groups),
                                layers.init_attention_params(jax.random.fold_in(rng, 2), cfg, "full", groups)),
                  "feed_forward": jax.tree.map(lambda leaf: leaf.reshape((groups, 2) + leaf.shape[1:]),
                                               layers.init_feed_forward_params(jax.random.fold_in(rng, 3), cfg))}
        return (params, jax.random.split(jax.random.fold_in(rng, 4), (groups, 2, 2)),
                jax.random.normal(jax.random.fold_in(rng, 5), (2, 32, 16)),
                jax.random.normal(jax.random.fold_in(rng, 6), (2, 32, 16)))

    params, keys, x, probe = inputs(rng)

    def attention_fn(kind):
        return lambda p, x, key, buckets: layers.attention_block(
            p, x, config=cfg, lsh_rng=key[0], dropout_rng=key[1], deterministic=False, buckets=buckets,
            attention_type=kind)

    def ff(p, x, key, chunk_index):
        return layers.feed_forward_block(p, x, config=cfg, dropout_rng=key[1], deterministic=False,
                                         chunk_index=chunk_index)

    def full_reverse(p, x, y, dy, dx, key, buckets):
        return layers.attention_block_reverse(p, x, y, dy, dx, config=cfg, dropout_rng=key[1], deterministic=False,
                                              buckets=buckets, attention_type="full")

    fns = (attention_fn("local"), attention_fn("full"))

    def custom(params, x1, x2):
        return reversible_stack(fns, ff, params, x1, x2, keys, ff_chunk_len=8,
                                attention_reverse_fn=(None, full_reverse))

    def plain(params, x1, x2):  # the same layers in a Python loop, differentiated by autodiff
        for g in range(groups):
            for j in range(2):
                key = keys[g, j]
                x1 = x1 + fns[j](jax.tree.map(lambda leaf: leaf[g], params["attention"][j]), x2, key, None)[0]
                x2 = x2 + ff(jax.tree.map(lambda leaf: leaf[g, j], params["feed_forward"]), x1, key, None)
        return x1, x2

    def grads(stack):
        def loss(params, x1, x2):
            y1, y2 = stack(params, x1, x2)
            return jnp.sum((y1 + 2 * y2) * probe)
        return jax.jit(jax.grad(loss, (0, 1, 2)))(params, x, 0.5 * x)

    got, want = grads(custom), grads(plain)
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert len(pairs) == 6 + 5 + 6 + 2  # local (norm 2, q, k, v, out), full (norm 2, qk, v, out), ff, x1, x2
    for a, b in pairs:
        assert float(jnp.max(jnp.abs(b))) > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))
