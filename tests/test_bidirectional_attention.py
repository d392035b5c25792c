"""Bidirectional attention in the kernels: chunks after (n_chunks_after) and padding masks without a causal mask.

- LSH attention (one round at a time and all rounds at once, forward and gradients) against a dense masked
  softmax over the same buckets (tests/lsh_reference.py: which keys a query sees worked out in numpy from the
  semantics, each key weighted by how often it is seen), in float64;
- one bucket and chunk windows covering the sequence: full bidirectional shared-QK attention;
- local attention against a dense reference with the wrap-around windows of Hugging Face's `_look_adjacent`;
- a padded token changes no output of a real position (LSH, full, local, the one-head-at-a-time core);
- the one-head-at-a-time core with n_chunks_after and a padding mask against all heads at once;
- memory: the one-round-at-a-time bidirectional path's temporaries do not grow with the number of rounds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax.kernels import full, local, lsh, per_head
from reformer_jax.kernels.norm import layer_norm
from tests.lsh_reference import dense_lsh_attention, seen_counts

LENGTH, CHUNK, N_BUCKETS = 32, 4, 4


def _rel_err(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _output_and_grads(f, qk, v, probe):
    """f(qk, v) and the gradients of sum(probe * f) with respect to qk and v, from one compiled program."""
    def run(qk, v):
        out, vjp = jax.vjp(f, qk, v)
        return out, vjp(probe.astype(out.dtype))
    return jax.jit(run)(qk, v)


def _padding(length=LENGTH):
    """[2, l] bool: row 0 all real; row 1 padded at the end and at one position inside (any pattern is allowed)."""
    mask = np.ones((2, length), bool)
    mask[1, length - 7:] = False
    mask[1, 3] = False
    return mask


def _padded_buckets(buckets, mask, n_buckets):
    """The spec's padding: padded positions in the extra bucket n_buckets (numpy, independent of the kernel)."""
    return np.where(mask[:, None, None, :], np.asarray(buckets).astype(np.int64), n_buckets)


@pytest.mark.parametrize("n_hashes, n_chunks_before, n_chunks_after, padded", [
    (2, 1, 1, True), (2, 1, 1, False), (1, 1, 1, True),  # both ways, across rounds and within one round
    (2, 0, 1, True), (1, 0, 1, False),                    # look-ahead alone
    (2, 1, 0, True), (1, 0, 0, True),                     # no look-ahead, with a padding mask
])
@pytest.mark.parametrize("sequential_rounds", [True, False])
def test_bidirectional_lsh_and_its_gradient_equal_a_dense_masked_softmax(sequential_rounds, n_hashes,
                                                                         n_chunks_before, n_chunks_after, padded):
    """Row 0 of the batch is unpadded, so the padded cases check a mask's real rows and its padded ones."""
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(10), 3)
        qk = jax.random.normal(k1, (2, 2, LENGTH, 8), jnp.float64)
        v = jax.random.normal(k2, qk.shape, jnp.float64)
        probe = jax.random.normal(k3, qk.shape, jnp.float64)
        buckets = lsh.lsh_buckets(qk, jax.random.key(11), n_hashes=n_hashes, n_buckets=N_BUCKETS)
        mask = _padding() if padded else None
        ref_buckets = np.asarray(buckets) if mask is None else _padded_buckets(buckets, mask, N_BUCKETS)
        counts = seen_counts(ref_buckets, CHUNK, n_chunks_before, n_chunks_after)
        if n_chunks_after:  # the look-ahead shows: other keys are seen than with look-back alone
            assert not np.array_equal(counts, seen_counts(ref_buckets, CHUNK, n_chunks_before))

        def ours(q, w):
            return lsh.lsh_attention(q, w, None, n_hashes=n_hashes, n_buckets=N_BUCKETS, chunk_len=CHUNK,
                                     n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after, causal=False,
                                     buckets=buckets, key_mask=mask, sequential_rounds=sequential_rounds)

        def reference(q, w):
            return dense_lsh_attention(q, w, counts, causal=False, key_mask=mask)

        (out, grads), (want_out, want_grads) = _output_and_grads(ours, qk, v, probe), _output_and_grads(
            reference, qk, v, probe)
        assert _rel_err(out, want_out) < 1e-6
        for g, w in zip(grads, want_grads):
            assert _rel_err(g, w) < 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_of_chunks_with_look_ahead_equal_the_dense_reference(monkeypatch, causal):
    """Blocks of chunks (a scan whose blocks look ahead into the next block, forward and backward) against the
    dense reference; causal with chunks after is well defined too (the causal mask removes later keys)."""
    monkeypatch.setattr(lsh, "BLOCK_ROWS", 16)  # 64 / 4 = 16 chunks a round in blocks of 4: the scan path
    assert lsh.chunks_per_block(16, CHUNK, 1, n_after=2) == 4
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(12), 3)
        qk = jax.random.normal(k1, (2, 1, 64, 8), jnp.float64)
        v = jax.random.normal(k2, qk.shape, jnp.float64)
        probe = jax.random.normal(k3, qk.shape, jnp.float64)
        buckets = lsh.lsh_buckets(qk, jax.random.key(13), n_hashes=2, n_buckets=8)
        mask = _padding(64)
        counts = seen_counts(_padded_buckets(buckets, mask, 8), CHUNK, 1, 2)

        def ours(q, w):
            return lsh.lsh_attention(q, w, None, n_hashes=2, n_buckets=8, chunk_len=CHUNK, n_chunks_before=1,
                                     n_chunks_after=2, causal=causal, buckets=buckets, key_mask=mask)

        def reference(q, w):
            return dense_lsh_attention(q, w, counts, causal=causal, key_mask=mask)

        (out, grads), (want_out, want_grads) = _output_and_grads(ours, qk, v, probe), _output_and_grads(
            reference, qk, v, probe)
        assert _rel_err(out, want_out) < 1e-6
        for g, w in zip(grads, want_grads):
            assert _rel_err(g, w) < 1e-6


@pytest.mark.parametrize("length, chunk_len, n_hashes, n_before, n_after, padded", [
    (12, 4, 1, 1, 1, False),  # three chunks, each seeing all three once
    (16, 4, 1, 2, 1, True),   # four chunks, each seeing all four once
    (16, 16, 2, 1, 1, True),  # a round is one chunk, which sees both rounds (each key 3 times: the same softmax)
])
@pytest.mark.parametrize("sequential_rounds", [True, False])
def test_one_bucket_and_windows_covering_the_sequence_equal_full_bidirectional_attention(
        sequential_rounds, length, chunk_len, n_hashes, n_before, n_after, padded):
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(14), 3)
        qk = jax.random.normal(k1, (2, 2, length, 8), jnp.float64)
        v = jax.random.normal(k2, qk.shape, jnp.float64)
        probe = jax.random.normal(k3, qk.shape, jnp.float64)
        one_bucket = jnp.zeros((2, 2, n_hashes, length), jnp.uint8)
        key_mask = None
        if padded:  # padded positions then go to a second bucket after the real ones: still one window
            key_mask = np.ones((2, length), bool)
            key_mask[1, length - 3:] = False

        def ours(q, w):
            return lsh.lsh_attention(q, w, None, n_hashes=n_hashes, n_buckets=2, chunk_len=chunk_len,
                                     n_chunks_before=n_before, n_chunks_after=n_after, causal=False,
                                     buckets=one_bucket, key_mask=key_mask, sequential_rounds=sequential_rounds)

        def dense(q, w):
            return full.shared_qk_attention(q, w, causal=False, key_mask=key_mask)

        (out, grads), (want_out, want_grads) = (_output_and_grads(f, qk, v, probe) for f in (ours, dense))
        assert _rel_err(out, want_out) < 1e-6
        for g, w in zip(grads, want_grads):
            assert _rel_err(g, w) < 1e-6


def dense_local_reference(q, k, v, chunk_len, n_before, n_after, causal, key_mask):
    """Every query against every key, each key weighted by how often its chunk is in the query chunk's window
    (chunks ci - n_before .. ci + n_after, wrapping around); masked keys score -1e9 (float64 numpy)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    length = q.shape[2]
    n = length // chunk_len
    ci, cj = np.arange(length)[:, None] // chunk_len, np.arange(length)[None, :] // chunk_len
    counts = sum(((ci + d) % n == cj).astype(np.float64) for d in range(-n_before, n_after + 1))
    visible = np.ones((length, length), bool)
    if causal:
        visible &= np.arange(length)[None, :] <= np.arange(length)[:, None]
    visible = visible[None, None] & key_mask[:, None, None, :]
    dots = np.einsum("bhqk,bhsk->bhqs", q, k) / np.sqrt(q.shape[-1])
    dots = np.where(visible, dots, -1e9)
    dots = np.where(counts > 0, dots, -np.inf)
    weights = counts * np.exp(dots - dots.max(-1, keepdims=True))
    return np.einsum("bhqs,bhsk->bhqk", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("n_before, n_after", [(1, 1), (0, 1), (2, 1), (0, 3)])
def test_local_bidirectional_attention_matches_a_dense_reference_with_padding(n_before, n_after):
    with jax.enable_x64(True):
        q, k, v = jax.random.normal(jax.random.key(15), (3, 2, 2, LENGTH, 8), jnp.float64)
        mask = _padding()
        out = jax.jit(lambda *a: local.local_attention(*a, chunk_len=8, n_chunks_before=n_before,
                                                       n_chunks_after=n_after, causal=False, key_mask=mask))(q, k, v)
        want = dense_local_reference(q, k, v, 8, n_before, n_after, False, mask)
        assert _rel_err(out, want) < 1e-6
        # The window wraps: with chunks after, the last chunk sees the first (Hugging Face's _look_adjacent).
        unwrapped = dense_local_reference(q, k, v, 32, 0, 0, False, mask)  # one chunk: everything
        assert (n_before + n_after + 1 >= 4) == (_rel_err(out, unwrapped) < 1e-6)


def _vary_padding(x, mask, key):
    """x [b, h, l, k] with new values at the padded positions (mask [b, l] False) only."""
    noise = 3.0 * jax.random.normal(key, x.shape, x.dtype)
    return jnp.where(jnp.asarray(mask)[:, None, :, None], x, noise)


@pytest.mark.parametrize("kind", ["lsh_by_rounds", "lsh_all_rounds", "full", "local"])
def test_a_padded_token_changes_no_output_of_a_real_position(kind):
    """Bucket ids are hashed from qk inside the kernel here, so a padded token could also act through the sort:
    padded positions sit in their own bucket after every real one, and padded keys get no weight."""
    k1, k2, k3 = jax.random.split(jax.random.key(16), 3)
    q, k, v = jax.random.normal(k1, (3, 2, 2, LENGTH, 8))
    mask = _padding()

    def attend(q, k, v):
        if kind == "local":
            return local.local_attention(q, k, v, chunk_len=8, n_chunks_before=1, n_chunks_after=1, causal=False,
                                         key_mask=mask)
        if kind == "full":
            return full.shared_qk_attention(q, v, causal=False, key_mask=mask)
        return lsh.lsh_attention(q, v, jax.random.key(17), n_hashes=2, n_buckets=N_BUCKETS, chunk_len=CHUNK,
                                 n_chunks_before=1, n_chunks_after=1, causal=False, key_mask=mask,
                                 sequential_rounds=kind == "lsh_by_rounds")

    attend = jax.jit(attend)
    out = attend(q, k, v)
    changed = attend(*(_vary_padding(x, mask, key) for x, key in zip((q, k, v), (k2, k3, k1))))
    real = np.asarray(mask)
    assert np.array_equal(np.asarray(out)[real[:, None, :].repeat(2, 1)],
                          np.asarray(changed)[real[:, None, :].repeat(2, 1)])
    assert not np.array_equal(np.asarray(out), np.asarray(changed))  # the padded positions' own outputs moved

    # No gradient of the real positions' outputs reaches a padded token either.
    weights = jnp.asarray(real, jnp.float32)[:, None, :, None]
    grads = jax.grad(lambda q, k, v: jnp.sum(weights * attend(q, k, v) ** 2), (0, 1, 2))(q, k, v)
    for g in grads:
        assert float(jnp.max(jnp.abs(jnp.where(weights > 0, 0.0, g)))) == 0.0
    assert float(jnp.max(jnp.abs(grads[2]))) > 0


def test_heads_one_at_a_time_with_chunks_after_and_padding_match_all_heads(sequential_rounds=True):
    """The per-head core (HeadSpec.n_chunks_after, key_mask) against the same block computed for all heads at
    once from the kernel, forward and gradients (the parameters' and the input's)."""
    d, h, k = 16, 2, 8
    keys = jax.random.split(jax.random.key(18), 6)
    params = {"norm": {"scale": 1.0 + 0.1 * jax.random.normal(keys[0], (d,)), "bias": jnp.zeros(d)},
              "qk": jax.random.normal(keys[1], (d, h, k)) / 4, "v": jax.random.normal(keys[2], (d, h, k)) / 4,
              "out": jax.random.normal(keys[3], (h, k, d)) / 4}
    x = jax.random.normal(keys[4], (2, LENGTH, d))
    probe = jax.random.normal(keys[5], x.shape)
    mask = _padding()
    spec = per_head.HeadSpec(lsh=True, n_hashes=2, n_buckets=N_BUCKETS, chunk_len=CHUNK, n_chunks_before=1,
                             causal=False, sequential_rounds=sequential_rounds, dropout_rate=0.0,
                             layer_norm_eps=1e-6, dtype=jnp.float32, n_chunks_after=1)
    rotations = lsh.random_rotations(jax.random.key(19), n_heads=h, d_head=k, n_hashes=2, n_buckets=N_BUCKETS)
    buckets = per_head.hash_by_heads(spec, params, x, rotations)

    def by_heads(p, x):
        return jnp.sum(probe * per_head.attention_by_heads(spec, p, x, buckets, jax.random.key(1), key_mask=mask))

    def all_heads(p, x):
        normed = layer_norm(x, p["norm"], 1e-6)
        qk, v = (jnp.einsum("bld,dhk->bhlk", normed, p[name]) for name in ("qk", "v"))
        o = lsh.lsh_attention(qk, v, None, n_hashes=2, n_buckets=N_BUCKETS, chunk_len=CHUNK, n_chunks_before=1,
                              n_chunks_after=1, causal=False, buckets=buckets, key_mask=mask,
                              sequential_rounds=sequential_rounds)
        return jnp.sum(probe * jnp.einsum("bhlk,hkd->bld", o, p["out"]))

    (value, grads), (want_value, want) = (jax.jit(jax.value_and_grad(f, (0, 1)))(params, x)
                                          for f in (by_heads, all_heads))
    assert abs(float(value - want_value)) <= 1e-5 * float(jnp.sum(jnp.abs(probe)))
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(want)))
    assert len(pairs) == 6  # norm bias, scale, out, qk, v and the input
    for got, w in pairs:
        assert _rel_err(got, w) < 1e-5


def _temp_bytes(n_hashes, sequential_rounds):
    """Compiled temporaries of one bidirectional, padded LSH attention's value and gradient (float32)."""
    b, h, length, d_head = 1, 2, 1024, 32
    qk = jax.ShapeDtypeStruct((b, h, length, d_head), jnp.float32)
    buckets = jax.ShapeDtypeStruct((b, h, n_hashes, length), jnp.uint8)
    mask = jax.ShapeDtypeStruct((b, length), jnp.bool_)

    def loss(qk, v, buckets, mask):
        return jnp.sum(lsh.lsh_attention(qk, v, None, n_hashes=n_hashes, n_buckets=16, chunk_len=32,
                                         n_chunks_before=1, n_chunks_after=1, causal=False, buckets=buckets,
                                         key_mask=mask, sequential_rounds=sequential_rounds) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(qk, qk, buckets, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_bidirectional_rounds_one_at_a_time_keep_memory_flat_in_hash_rounds():
    by_rounds = {r: _temp_bytes(r, True) for r in (2, 8)}
    assert by_rounds[8] <= 1.15 * by_rounds[2], by_rounds
    all_rounds = {r: _temp_bytes(r, False) for r in (2, 8)}  # the measure can tell: all rounds at once grows
    assert all_rounds[8] > 2 * all_rounds[2], all_rounds


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_chunks_after=-1), "n_chunks_after=-1 must be >= 0"),
    (dict(n_chunks_after=9), "sequential_rounds needs n_chunks_after=9 <= chunks per round"),
    (dict(key_mask=np.ones((2, 31), bool)), r"key_mask has shape \(2, 31\); expected \(2, 32\)"),
])
def test_bad_bidirectional_arguments_are_rejected_before_compiling(kwargs, message):
    qk = jnp.zeros((2, 1, LENGTH, 4))
    with pytest.raises(ValueError, match=message):
        lsh.lsh_attention(qk, qk, jax.random.key(0), n_hashes=2, n_buckets=4, chunk_len=4, causal=False, **kwargs)
    if "n_chunks_after" in kwargs and kwargs["n_chunks_after"] < 0:
        with pytest.raises(ValueError, match="local_attention: n_chunks_after=-1"):
            local.local_attention(qk, qk, qk, chunk_len=8, causal=False, **kwargs)
