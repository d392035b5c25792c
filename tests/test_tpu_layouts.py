"""What the TPU program's memory savings store differently gives the same numbers: LSH rows read 128 lanes at a time
(`lsh._group_rows`), a dropout keep mask kept as bits (`per_head._PackedMask`) and the embedding's dropout mask
drawn again in the backward pass (`layers.replayed_dropout`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax.kernels import lsh, per_head
from reformer_jax.model import layers


@pytest.mark.parametrize("d_head, block_rows", [(64, 10**9), (64, 32), (8, 32)])
def test_lsh_rows_read_in_groups_give_the_same_outputs_and_gradients(monkeypatch, d_head, block_rows):
    """Grouped rows (what a TPU compile reads: 2 rows of 64 or 16 rows of 8 to a 128-wide row) against plain
    rows, bit for bit: the same values gathered another way, one block per round or several."""
    monkeypatch.setattr(lsh, "BLOCK_ROWS", block_rows)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    qk = jax.random.normal(k1, (1, 2, 128, d_head))
    v = jax.random.normal(k2, qk.shape)
    probe = jax.random.normal(k3, qk.shape)
    buckets = lsh.lsh_buckets(qk, jax.random.key(1), n_hashes=2, n_buckets=8)

    def run():
        f = lambda q, w: jnp.sum(probe * lsh.lsh_attention(  # noqa: E731
            q, w, None, n_hashes=2, n_buckets=8, chunk_len=8, buckets=buckets, dropout_rate=0.2,
            dropout_rng=jax.random.key(2)))
        return jax.jit(jax.value_and_grad(f, (0, 1)))(qk, v)

    plain = run()
    monkeypatch.setattr(lsh, "for_tpu_tiles", lambda: True)
    grouped = run()
    assert isinstance(lsh._group_rows(qk), lsh._Grouped)
    for got, want in zip(jax.tree.leaves(grouped), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(got, want)


def test_without_a_tpu_mesh_rows_stay_as_they_are():
    assert not lsh.for_tpu_tiles()  # the tests run on XLA:CPU
    assert not isinstance(lsh._group_rows(jnp.zeros((1, 1, 128, 64))), lsh._Grouped)


@pytest.mark.parametrize("length", [4096, 96])  # four row blocks of 1024; one block of the whole length
def test_a_packed_keep_mask_reads_back_bit_for_bit(length):
    mask = layers.dropout_mask(0.3, jax.random.key(3), 1, (2, length, 48))
    packed = per_head._pack_mask(mask)
    assert isinstance(packed, per_head._PackedMask) and packed.words.shape == (2, length // 32, 48)
    assert packed.words.dtype == jnp.uint32 and packed.words.nbytes * 8 == mask.size
    blocks = per_head._Blocks(length)
    got = jnp.concatenate([blocks.get(packed, i) for i in range(blocks.count)], axis=1)
    np.testing.assert_array_equal(got, mask)
    odd = layers.dropout_mask(0.3, jax.random.key(3), 1, (2, 100, 48))
    assert per_head._pack_mask(odd) is odd  # a length not a multiple of 32: left as it is


def test_the_replayed_dropout_has_dropouts_values_and_gradient():
    x = jax.random.normal(jax.random.key(4), (1, 2048, 16))
    probe = jax.random.normal(jax.random.key(5), x.shape)
    key = jax.random.key(6)
    for fn in (layers.dropout, layers.replayed_dropout):
        np.testing.assert_array_equal(fn(x, 0.25, key, 0, False), layers.dropout(x, 0.25, key, 0, False))
    grads = [jax.grad(lambda x: jnp.sum(probe * fn(x, 0.25, key, 0, False)))(x)
             for fn in (layers.dropout, layers.replayed_dropout)]
    np.testing.assert_array_equal(grads[1], grads[0])
    assert layers.replayed_dropout(x, 0.25, key, 0, True) is x
