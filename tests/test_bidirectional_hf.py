"""The bidirectional kernels against Hugging Face's attention layers themselves (is_decoder=False, chunks after,
a padded batch): LSHSelfAttention with the bucket ids it drew, LocalSelfAttention, on the same projections.

Skipped unless torch and transformers are installed, except under CI (CI=true), where a missing peer fails the
module. Hugging Face's padded positions that see only themselves (a padded chunk whose window holds only padding)
are left out of the LSH comparison: Hugging Face combines their equal round logsumexps (-1e5) through a float32
logsumexp, whose rounding near 1e5 (spacing 0.008) leaves round weights summing to about 0.998; the kernel forms
them from row maxima and is exact there. No real position's output depends on those rows.
"""

import importlib
import os

import numpy as np
import pytest

_load = importlib.import_module if os.environ.get("CI") == "true" else pytest.importorskip
torch = _load("torch")
transformers = _load("transformers")

import jax.numpy as jnp  # noqa: E402

from reformer_jax.kernels import local, lsh  # noqa: E402

B, L, D, H, K = 2, 32, 16, 2, 8


def _inputs():
    torch.manual_seed(0)
    mask = np.ones((B, L), np.int64)
    mask[1, 25:] = 0
    mask[1, 3] = 0
    return torch.randn(B, L, D), mask


def _heads(t):
    """[b, l, h * k] torch -> [b, h, l, k] jax."""
    return jnp.asarray(t.detach().numpy().reshape(B, L, H, K).transpose(0, 2, 1, 3))


def _merged(x):
    """[b, h, l, k] -> [b, l, h * k] numpy, Hugging Face's layout of a layer's output."""
    return np.asarray(x).transpose(0, 2, 1, 3).reshape(B, L, H * K)


@pytest.mark.parametrize("n_before, n_after", [(1, 1), (0, 1)])
def test_lsh_attention_equals_hugging_face_bidirectional_with_padding(n_before, n_after):
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention
    x, mask = _inputs()
    config = transformers.ReformerConfig(
        hidden_size=D, num_attention_heads=H, attention_head_size=K, lsh_attn_chunk_length=4, num_buckets=4,
        num_hashes=2, lsh_num_chunks_before=n_before, lsh_num_chunks_after=n_after, is_decoder=False, hash_seed=3,
        lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=L)
    layer = LSHSelfAttention(config).eval()
    with torch.no_grad():
        hf = layer(x, attention_mask=torch.tensor(mask))
        qk, v = _heads(layer.query_key(x)), _heads(layer.value(x))
    # Hugging Face's ids carry round offsets of n_buckets + 1 (the padding bucket); the kernel takes per-round ids.
    buckets = hf.buckets.numpy() - np.arange(2)[None, None, :, None] * 5
    want = hf.hidden_states.numpy()
    sees_only_itself = np.zeros((B, L), bool)
    if n_before == 0:  # the first padded chunk of a round looks ahead only into the second
        sees_only_itself[1, [3, 25, 26, 27]] = True
    for sequential_rounds in (True, False):
        got = _merged(lsh.lsh_attention(qk, v, None, n_hashes=2, n_buckets=4, chunk_len=4, n_chunks_before=n_before,
                                        n_chunks_after=n_after, causal=False, buckets=jnp.asarray(buckets),
                                        key_mask=jnp.asarray(mask), sequential_rounds=sequential_rounds))
        np.testing.assert_allclose(got[~sees_only_itself], want[~sees_only_itself], rtol=1e-5, atol=1e-5)
        # There the kernel gives exactly the row's own value, Hugging Face 0.2% less.
        np.testing.assert_allclose(got[sees_only_itself], _merged(v)[sees_only_itself], rtol=1e-6)


@pytest.mark.parametrize("n_before, n_after", [(1, 1), (0, 1), (2, 1)])
def test_local_attention_equals_hugging_face_bidirectional_with_padding(n_before, n_after):
    from transformers.models.reformer.modeling_reformer import LocalSelfAttention
    x, mask = _inputs()
    config = transformers.ReformerConfig(
        hidden_size=D, num_attention_heads=H, attention_head_size=K, local_attn_chunk_length=8,
        local_num_chunks_before=n_before, local_num_chunks_after=n_after, is_decoder=False,
        local_attention_probs_dropout_prob=0.0)
    layer = LocalSelfAttention(config).eval()
    with torch.no_grad():
        want = layer(x, attention_mask=torch.tensor(mask)).hidden_states.numpy()
        q, k, v = (_heads(p(x)) for p in (layer.query, layer.key, layer.value))
    got = _merged(local.local_attention(q, k, v, chunk_len=8, n_chunks_before=n_before, n_chunks_after=n_after,
                                        causal=False, key_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
