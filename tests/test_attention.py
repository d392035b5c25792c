"""LSH attention against full shared-QK attention, its masks, its custom_vjp gradient, and its hashing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from reformer_jax.kernels.full import shared_qk_attention
from reformer_jax.kernels import lsh as attn


def _qkv(seed, shape=(2, 3, 64, 16)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def _max_abs(a, b):
    return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk_len", [64, 32])
def test_lsh_with_whole_sequence_chunks_equals_full_attention(chunk_len, causal):
    qk, v = _qkv(0)
    full = shared_qk_attention(qk, v, causal=causal)
    lsh = attn.lsh_attention(qk, v, jax.random.key(1), n_hashes=1, n_buckets=4, chunk_len=chunk_len, causal=causal)
    assert _max_abs(lsh, full) < 1e-5


def test_full_attention_matches_explicit_softmax():
    qk, v = _qkv(2, (1, 2, 8, 4))
    q = np.asarray(qk, np.float64)
    keys = q / np.linalg.norm(q, axis=-1, keepdims=True)
    scores = np.einsum("bhqk,bhsk->bhqs", q, keys)
    i, j = np.indices((8, 8))
    scores = np.where(j > i, -1e9, scores)
    scores = np.where(i == j, -1e5, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhqs,bhsk->bhqk", probs / probs.sum(-1, keepdims=True), np.asarray(v, np.float64))
    np.testing.assert_allclose(shared_qk_attention(qk, v), expected, atol=1e-5)
    # Position 0 sees only itself: the self mask is a last resort, not a hard mask.
    np.testing.assert_allclose(shared_qk_attention(qk, v)[:, :, 0], v[:, :, 0], atol=1e-6)


@pytest.mark.parametrize("n_hashes, n_buckets, chunk_len, n_chunks_before", [
    (1, 2, 8, 1), (2, 8, 8, 1), (4, 16, 4, 1), (3, (4, 4), 8, 2), (2, 8, 16, 0), (8, 32, 2, 1)])
def test_lsh_weights_are_causal_and_sum_to_one(n_hashes, n_buckets, chunk_len, n_chunks_before):
    length = 64
    qk = jax.random.normal(jax.random.key(3), (2, 2, length, 8))
    onehot = jnp.broadcast_to(jnp.eye(length), (2, 2, length, length))  # output row i = weights of query i
    weights = attn.lsh_attention(qk, onehot, jax.random.key(4), n_hashes=n_hashes, n_buckets=n_buckets,
                                 chunk_len=chunk_len, n_chunks_before=n_chunks_before)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, atol=1e-5)
    assert float(jnp.max(jnp.triu(weights, k=1))) == 0.0
    assert float(jnp.min(weights)) >= 0.0


def test_lsh_non_causal_attends_to_later_positions():
    qk = jax.random.normal(jax.random.key(5), (1, 2, 32, 8))
    onehot = jnp.broadcast_to(jnp.eye(32), (1, 2, 32, 32))
    weights = attn.lsh_attention(qk, onehot, jax.random.key(6), n_hashes=2, n_buckets=4, chunk_len=8, causal=False)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, atol=1e-5)
    assert float(jnp.max(jnp.triu(weights, k=1))) > 0.1


def test_lsh_matches_naive_per_round_computation():
    """Re-derive LSH attention position by position with numpy from the same buckets (independent algorithm)."""
    b, h, length, k, n_hashes, c = 1, 2, 32, 4, 2, 8
    qk, v = _qkv(7, (b, h, length, k))
    buckets = attn.lsh_buckets(qk, jax.random.key(8), n_hashes=n_hashes, n_buckets=4)
    out = attn.lsh_attention(qk, v, None, n_hashes=n_hashes, n_buckets=4, chunk_len=c, buckets=buckets)
    q, vv, bk = (np.asarray(a, np.float64) for a in (qk, v, buckets))
    expected = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            # All rounds concatenated, each sorted by (bucket, position).
            order = np.concatenate([sorted(range(length), key=lambda i: (bk[bi, hi, r, i], i))
                                    for r in range(n_hashes)])
            chunks = order.reshape(-1, c)
            outs, lses = np.zeros((n_hashes * length, k)), np.zeros(n_hashes * length)
            for j, chunk in enumerate(chunks):
                seen = np.concatenate([chunks[j - 1], chunk])  # chunk -1 wraps to the last
                for slot, i in enumerate(chunk):
                    key_vecs = q[bi, hi, seen] / np.linalg.norm(q[bi, hi, seen], axis=-1, keepdims=True)
                    s = key_vecs @ q[bi, hi, i]
                    s = np.where(seen > i, -1e9, s)
                    s = np.where(seen == i, -1e5, s)
                    m = s.max()
                    p = np.exp(s - m)
                    outs[j * c + slot] = (p / p.sum()) @ vv[bi, hi, seen]
                    lses[j * c + slot] = m + np.log(p.sum())
            for i in range(length):
                rows = [r * length + list(order[r * length:(r + 1) * length]).index(i) for r in range(n_hashes)]
                w = np.exp(lses[rows] - np.logaddexp.reduce(lses[rows]))
                expected[bi, hi, i] = w @ outs[rows]
    np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize("sequential_rounds", [False, True])
def test_lsh_gradients_check_grads_float64(sequential_rounds):
    with jax.enable_x64(True):
        qk, v = (x.astype(jnp.float64) for x in _qkv(12, (1, 2, 16, 4)))
        buckets = attn.lsh_buckets(qk, jax.random.key(13), n_hashes=2, n_buckets=4)
        f = lambda q, w: attn.lsh_attention(q, w, None, n_hashes=2, n_buckets=4, chunk_len=4,  # noqa: E731
                                             buckets=buckets, sequential_rounds=sequential_rounds)
        check_grads(f, (qk, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_given_buckets_are_used_instead_of_hashing():
    qk, v = _qkv(17)
    buckets = attn.lsh_buckets(qk, jax.random.key(18), n_hashes=2, n_buckets=8)
    a = attn.lsh_attention(qk, v, jax.random.key(99), n_hashes=2, n_buckets=8, chunk_len=8, buckets=buckets)
    b = attn.lsh_attention(qk, v, jax.random.key(18), n_hashes=2, n_buckets=8, chunk_len=8)
    c = attn.lsh_attention(qk, v, jax.random.key(99), n_hashes=2, n_buckets=8, chunk_len=8)
    assert _max_abs(a, b) == 0.0 and _max_abs(a, c) > 1e-3


def test_buckets_compact_dtype_and_range():
    qk, _ = _qkv(19)
    small = attn.lsh_buckets(qk, jax.random.key(20), n_hashes=3, n_buckets=16)
    assert small.shape == (2, 3, 3, 64) and small.dtype == jnp.uint8
    assert 0 <= int(small.min()) and int(small.max()) < 16 and len(np.unique(small)) > 8
    factorised = attn.lsh_buckets(qk, jax.random.key(20), n_hashes=2, n_buckets=(32, 16))
    assert factorised.dtype == jnp.uint16 and int(factorised.max()) < 512
    assert attn.bucket_dtype((256, 512)) == jnp.int32


def test_hash_is_argmax_of_rotation_and_its_negation():
    qk, _ = _qkv(21, (1, 2, 16, 4))
    rotations = attn.random_rotations(jax.random.key(22), n_heads=2, d_head=4, n_hashes=2, n_buckets=(4, 6))
    assert rotations.shape == (2, 4, 2, 5)
    got = attn.lsh_buckets(qk, None, n_hashes=2, n_buckets=(4, 6), rotations=rotations)
    rotated = np.einsum("bhlk,hkrn->bhrln", np.asarray(qk), np.asarray(rotations))
    b1 = np.argmax(np.concatenate([rotated[..., :2], -rotated[..., :2]], -1), -1)
    b2 = np.argmax(np.concatenate([rotated[..., 2:], -rotated[..., 2:]], -1), -1)
    np.testing.assert_array_equal(got, b1 + 4 * b2)


def test_signed_argmax_breaks_ties_like_argmax_of_the_concatenation():
    # Small integers make ties within a row and between a row's maximum and its negated minimum common.
    part = jax.random.randint(jax.random.key(5), (64, 4, 6), -3, 4).astype(jnp.float32)
    want = np.argmax(np.concatenate([np.asarray(part), -np.asarray(part)], -1), -1)
    np.testing.assert_array_equal(attn._signed_argmax(part), want)
    assert len(np.unique(want)) > 6  # both halves occur


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.int32])
def test_sort_orders_by_bucket_then_position_and_inverts(dtype):
    """uint8 and uint16 ids take the one-key (bucket * l + position) sort, int32 ids the two-key sort."""
    buckets = jnp.array([[[[3, 1, 3, 0, 1, 0, 2, 3]]]], dtype)
    order, inverse = attn._sort_by_bucket(buckets)
    np.testing.assert_array_equal(order[0, 0, 0], [3, 5, 1, 4, 6, 0, 2, 7])
    np.testing.assert_array_equal(jnp.take_along_axis(order, inverse, -1)[0, 0, 0], np.arange(8))
    # Large ids and many ties: the same order as a stable argsort.
    wide = jax.random.randint(jax.random.key(0), (2, 3, 4, 4096), 0, 200 if dtype == jnp.uint8 else 5000)
    order, inverse = attn._sort_by_bucket(wide.astype(dtype))
    np.testing.assert_array_equal(order, np.argsort(np.asarray(wide), axis=-1, kind="stable"))
    np.testing.assert_array_equal(jnp.take_along_axis(order, inverse, -1),
                                  np.broadcast_to(np.arange(4096), order.shape))


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_len=24), "length 64 is not a multiple of chunk_len=24"),
    (dict(n_chunks_before=-1), "n_chunks_before=-1"),
    (dict(buckets=jnp.zeros((2, 3, 1, 64), jnp.uint8)), "expected (2, 3, 2, 64)"),
    (dict(n_buckets=5), "n_buckets=5 is invalid"),
    (dict(dropout_rate=0.1), "needs a dropout_rng"),
])
def test_bad_lsh_arguments_are_rejected(kwargs, message):
    qk, v = _qkv(23)
    args = dict(n_hashes=2, n_buckets=8, chunk_len=8)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        attn.lsh_attention(qk, v, jax.random.key(0), **args)
    assert message in str(err.value)


def test_mismatched_qk_and_v_are_rejected():
    qk, v = _qkv(24)
    with pytest.raises(ValueError, match="matching batch, heads and length"):
        shared_qk_attention(qk, v[:, :, :32])


@pytest.mark.parametrize("n_hashes, n_buckets, chunk_len, n_chunks_before", [(3, 8, 8, 1), (4, (4, 4), 16, 2)])
def test_sequential_rounds_equal_all_rounds_at_once(n_hashes, n_buckets, chunk_len, n_chunks_before):
    """One round at a time, with the look-back into the previous round, gives the same outputs and gradients."""
    qk, v = _qkv(25)
    buckets = attn.lsh_buckets(qk, jax.random.key(26), n_hashes=n_hashes, n_buckets=n_buckets)
    probe = jax.random.normal(jax.random.key(27), qk.shape)

    def run(sequential):
        f = lambda q, w: jnp.sum(probe * attn.lsh_attention(  # noqa: E731
            q, w, None, n_hashes=n_hashes, n_buckets=n_buckets, chunk_len=chunk_len,
            n_chunks_before=n_chunks_before, buckets=buckets, sequential_rounds=sequential))
        return jax.jit(jax.value_and_grad(f, (0, 1)))(qk, v)

    (value, grads), (seq_value, seq_grads) = run(False), run(True)
    assert abs(float(seq_value - value)) <= 1e-5 * abs(float(value))
    plain = jax.grad(lambda q, w: jnp.sum(probe * attn.lsh_attention_reference(
        q, w, buckets, chunk_len=chunk_len, n_chunks_before=n_chunks_before)), (0, 1))(qk, v)
    for got, want in zip(seq_grads, plain):
        assert _max_abs(got, want) / float(jnp.max(jnp.abs(want))) < 1e-5
    for got, want in zip(seq_grads, grads):
        assert _max_abs(got, want) / float(jnp.max(jnp.abs(want))) < 1e-5


def test_sequential_rounds_keep_weights_causal_and_normalised():
    qk = jax.random.normal(jax.random.key(28), (1, 2, 64, 8))
    onehot = jnp.broadcast_to(jnp.eye(64), (1, 2, 64, 64))
    weights = attn.lsh_attention(qk, onehot, jax.random.key(29), n_hashes=4, n_buckets=8, chunk_len=8,
                                 sequential_rounds=True)
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, atol=1e-5)
    assert float(jnp.max(jnp.triu(weights, k=1))) == 0.0
    with pytest.raises(ValueError, match="sequential_rounds needs n_chunks_before=9"):
        attn.lsh_attention(qk, onehot, jax.random.key(29), n_hashes=2, n_buckets=8, chunk_len=8, n_chunks_before=9,
                           sequential_rounds=True)


@pytest.mark.parametrize("n_chunks_before, causal", [(0, True), (1, True), (2, True), (1, False)])
def test_chunk_blocks_give_the_one_block_outputs_and_gradients(monkeypatch, n_chunks_before, causal):
    """Blocks of chunks (a scan carrying each block's look-back, forward and backward) change no result."""
    qk, v = _qkv(40, (1, 2, 128, 8))
    buckets = attn.lsh_buckets(qk, jax.random.key(41), n_hashes=3, n_buckets=8)
    probe = jax.random.normal(jax.random.key(42), qk.shape)

    def run(block_rows):
        monkeypatch.setattr(attn, "BLOCK_ROWS", block_rows)
        f = lambda q, w: jnp.sum(probe * attn.lsh_attention(  # noqa: E731
            q, w, None, n_hashes=3, n_buckets=8, chunk_len=8, n_chunks_before=n_chunks_before, causal=causal,
            buckets=buckets))
        return jax.jit(jax.value_and_grad(f, (0, 1)))(qk, v)

    assert attn.chunks_per_block(128 // 8, 8, n_chunks_before, block_rows=32) == 4  # 4 blocks of 4 chunks
    (value, grads), (blocked_value, blocked_grads) = run(10**9), run(32)
    assert abs(float(blocked_value - value)) <= 1e-5 * abs(float(value))
    plain = jax.grad(lambda q, w: jnp.sum(probe * attn.lsh_attention_reference(
        q, w, buckets, chunk_len=8, n_chunks_before=n_chunks_before, causal=causal)), (0, 1))(qk, v)
    for got, want, one_block in zip(blocked_grads, plain, grads):
        assert _max_abs(got, want) / float(jnp.max(jnp.abs(want))) < 1e-5
        assert _max_abs(one_block, want) / float(jnp.max(jnp.abs(want))) < 1e-5


@pytest.mark.parametrize("block_rows", [10**9, 32])
def test_by_rounds_gradient_with_dropout_equals_autodiff_of_its_forward(monkeypatch, block_rows):
    """The hand-written round backward replays each block's dropout mask and matches autodiff (float64)."""
    monkeypatch.setattr(attn, "BLOCK_ROWS", block_rows)
    with jax.enable_x64(True):
        qk, v = (x.astype(jnp.float64) for x in _qkv(43, (2, 2, 64, 8)))
        buckets = attn.lsh_buckets(qk, jax.random.key(44), n_hashes=2, n_buckets=8)
        spec = attn._LSHSpec(chunk_len=8, n_chunks_before=1, causal=True, dropout_rate=0.3)
        probe = jax.random.normal(jax.random.key(45), qk.shape, jnp.float64)
        rng = jax.random.key(46)
        loss = lambda f: (lambda q, w: jnp.sum(probe * f(q, w)))  # noqa: E731
        custom = jax.grad(loss(lambda q, w: attn._lsh_attention_by_rounds(spec, q, w, buckets, rng)), (0, 1))(qk, v)
        plain = jax.grad(loss(lambda q, w: attn._rounds_forward(spec, q, w, buckets, rng)[0]), (0, 1))(qk, v)
        for got, want in zip(custom, plain):
            assert _max_abs(got, want) <= 1e-12 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("n_chunks, chunk_len, n_before, block_rows, expected", [
    (64, 64, 1, 4096, 64),     # the speed benchmark's 4096 tokens: one block
    (1024, 64, 1, 4096, 64),   # 65536 tokens: 16 blocks of 4096 rows
    (12, 64, 1, 256, 4),       # the largest divisor within the rows
    (12, 64, 4, 256, 12),      # blocks must hold more than the look-back: one block
    (7, 64, 1, 256, 7),        # a prime count: no divisor > n_before fits, one block
])
def test_chunks_per_block(n_chunks, chunk_len, n_before, block_rows, expected):
    assert attn.chunks_per_block(n_chunks, chunk_len, n_before, block_rows=block_rows) == expected
