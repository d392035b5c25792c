"""Every hand-written gradient against an independent reference.

- LSH attention's custom_vjp (both paths: all rounds at once, one round at a time) against plain autodiff of a
  dense masked softmax over the same buckets (tests/lsh_reference.py), in float64 to 1e-10.
- The chunked loss's custom_vjp (output_head._chunked) against plain autodiff of the whole-sequence loss.
- The reversible stack with the one-head-at-a-time reverse step of LSH layers against plain autodiff of a
  Python loop of the same layers computing all heads at once (no custom gradient of the project on that path
  but LSH attention's own, checked above).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from reformer_jax import ModelConfig

from reformer_jax.model import layers
from reformer_jax.kernels import lsh as attn
from reformer_jax.kernels import output_head
from reformer_jax.model.reformer_lm import block_functions
from reformer_jax.kernels.reversible import reversible_stack
from tests.lsh_reference import dense_lsh_attention, seen_counts


def _rel_err(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("n_hashes, n_buckets, chunk_len, n_chunks_before, causal", [
    (3, 8, 8, 1, True), (2, (4, 2), 4, 2, False)])
@pytest.mark.parametrize("sequential_rounds", [True, False])
def test_lsh_attention_and_its_gradient_equal_a_dense_masked_softmax(sequential_rounds, n_hashes, n_buckets,
                                                                     chunk_len, n_chunks_before, causal):
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        qk = jax.random.normal(k1, (2, 2, 32, 8), jnp.float64)
        v = jax.random.normal(k2, qk.shape, jnp.float64)
        probe = jax.random.normal(k3, qk.shape, jnp.float64)
        buckets = attn.lsh_buckets(qk, jax.random.key(1), n_hashes=n_hashes, n_buckets=n_buckets)
        counts = seen_counts(np.asarray(buckets), chunk_len, n_chunks_before)
        assert counts.max() == 2  # some key is seen through two chunks (the wrap-around or a round boundary)

        def ours(q, w):
            return attn.lsh_attention(q, w, None, n_hashes=n_hashes, n_buckets=n_buckets, chunk_len=chunk_len,
                                      n_chunks_before=n_chunks_before, causal=causal, buckets=buckets,
                                      sequential_rounds=sequential_rounds)

        def reference(q, w):
            return dense_lsh_attention(q, w, counts, causal=causal)

        def value_and_grads(f):
            return jax.jit(jax.value_and_grad(lambda q, w: jnp.sum(probe * f(q, w)), (0, 1)))(qk, v)

        (value, got), (want_value, want) = value_and_grads(ours), value_and_grads(reference)
        assert abs(float(value - want_value)) < 1e-12 * float(jnp.sum(jnp.abs(probe)))
        for g, w in zip(got, want):
            assert _rel_err(g, w) < 1e-10


@pytest.mark.parametrize("sequential_rounds", [True, False])
def test_lsh_dropout_gradient_equals_finite_differences_of_the_forward(sequential_rounds):
    """With dropout the mask is a function of the rng: the backward pass must replay it. Checked against finite
    differences of the forward pass itself (float64), which knows nothing of the backward."""
    with jax.enable_x64(True):
        qk, v = (jax.random.normal(k, (1, 2, 32, 4), jnp.float64) for k in jax.random.split(jax.random.key(2)))
        buckets = attn.lsh_buckets(qk, jax.random.key(3), n_hashes=2, n_buckets=4)
        with_key = jax.jit(lambda q, w, key: attn.lsh_attention(
            q, w, None, n_hashes=2, n_buckets=4, chunk_len=8, buckets=buckets, dropout_rate=0.3, dropout_rng=key,
            sequential_rounds=sequential_rounds))
        f = functools.partial(with_key, key=jax.random.key(4))
        assert _rel_err(f(qk, v), with_key(qk, v, jax.random.key(5))) > 0.1  # the mask is on and follows the key
        check_grads(f, (qk, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The chunked loss


@pytest.mark.parametrize("head", ["plain", "mean", "concat"])
def test_chunked_loss_and_gradients_equal_the_whole_sequence_loss(head):
    """output_chunk_len 8 of 32 positions (4 rows a sequence): the custom_vjp against autodiff of the unchunked
    loss; uneven weights, so a row's cotangent landing in another row's place shows."""
    spec = output_head.HeadSpec(combine="concat" if head == "concat" else "mean", layer_norm_eps=1e-6,
                                dtype=jnp.float32)
    width = 16 if head == "concat" else 8
    k = jax.random.split(jax.random.key(5), 6)
    params = {"norm": {"scale": 1.0 + 0.1 * jax.random.normal(k[0], (width,)),
                       "bias": 0.1 * jax.random.normal(k[1], (width,))},
              "kernel": jax.random.normal(k[2], (width, 11)), "bias": jax.random.normal(k[3], (11,))}
    x = jax.random.normal(k[4], (2, 32, 8))
    streams = x if head == "plain" else (x, jnp.roll(x, 3, axis=1) * 0.5)
    targets = jax.random.randint(k[5], (2, 32), 0, 11)
    weights = (jnp.arange(32)[None] % 5).astype(jnp.float32) * jnp.array([[1.0], [0.5]])

    def loss(chunk_len):
        def f(params, streams):
            sums = output_head.chunked_loss_terms(params, streams, targets, weights, spec=spec,
                                                  chunk_len=chunk_len)
            return sums["loss_sum"] + 0.3 * sums["correct_sum"], sums
        return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(params, streams)

    (value, sums), grads = loss(8)
    (whole_value, whole_sums), whole_grads = loss(0)  # 0: the whole sequence, plain autodiff
    for name in ("loss_sum", "correct_sum", "weight_sum"):
        assert abs(float(sums[name] - whole_sums[name])) <= 1e-5 * abs(float(whole_sums[name])), name
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(whole_grads)))
    assert len(pairs) == 4 + (1 if head == "plain" else 2)
    for got, want in pairs:
        assert float(jnp.max(jnp.abs(want))) > 0
        assert _rel_err(got, want) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The one-head-at-a-time reverse step of LSH layers


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional-padded"])
def test_reversible_lsh_stack_with_the_per_head_reverse_step_equals_plain_autodiff(bidirectional):
    """A reversible stack of 2 LSH layers, 3 heads, output and feed-forward dropout on: the stack's backward
    recovers each layer's input and gradients head by head (layers.attention_block_reverse); the reference
    computes all heads at once in a Python loop that jax differentiates by storing everything. Also for a
    bidirectional encoder's layers (a chunk after) with a padded batch, whose mask the reverse step replays."""
    cfg = ModelConfig.preset("reformer", d_model=24, n_heads=3, d_ff=32, n_layers=2, max_len=64, chunk_len=8,
                             n_hashes=2, dropout=0.1, attention_dropout=0.0, ff_chunk_len=16)
    mask = None
    if bidirectional:
        cfg = cfg.replace(causal=False, n_chunks_after=1)
        mask = jnp.arange(64)[None, :] < jnp.array([[64], [37]])
    all_heads = cfg.replace(sequential_heads=False)
    attention_fn, feed_forward_fn, reverse_fn = block_functions(cfg, "lsh", deterministic=False, attention_mask=mask)
    plain_attention_fn, plain_feed_forward_fn, no_reverse = block_functions(all_heads, "lsh", deterministic=False,
                                                                            attention_mask=mask)
    assert reverse_fn is not None and no_reverse is None
    params = {"attention": layers.init_attention_params(jax.random.key(1), cfg),
              "feed_forward": layers.init_feed_forward_params(jax.random.key(2), cfg)}
    keys = jax.random.split(jax.random.key(3), (cfg.n_layers, 2))
    x = jax.random.normal(jax.random.key(4), (2, 64, 24))
    probe = jax.random.normal(jax.random.key(5), x.shape)

    def stack(params, x1, x2):
        return reversible_stack(attention_fn, feed_forward_fn, params, x1, x2, keys, ff_chunk_len=16,
                                attention_reverse_fn=reverse_fn)

    def plain(params, x1, x2):
        for i in range(cfg.n_layers):
            p = jax.tree.map(lambda leaf: leaf[i], params)
            x1 = x1 + plain_attention_fn(p["attention"], x2, keys[i], None)[0]
            x2 = x2 + plain_feed_forward_fn(p["feed_forward"], x1, keys[i], None)
        return x1, x2

    def gradients(forward):
        def loss(params, x1, x2):
            y1, y2 = forward(params, x1, x2)
            return jnp.sum((y1 + 2 * y2) * probe)
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(params, x, 0.5 * x)

    (value, got), (want_value, want) = gradients(stack), gradients(plain)
    assert abs(float(value - want_value)) <= 1e-5 * abs(float(want_value))
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert len(pairs) == 5 + 6 + 2  # attention (norm 2, qk, v, out), feed-forward, both input streams
    for g, w in pairs:
        assert float(jnp.max(jnp.abs(w))) > 0
        assert _rel_err(g, w) < 1e-5
