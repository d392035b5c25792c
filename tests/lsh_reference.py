"""An independent LSH attention for the tests: a dense masked softmax over the same buckets.

It shares no code with reformer_jax.attention. Which keys a query sees is worked out in numpy from the semantics
(trax, Hugging Face): per round, positions sorted by (bucket, position); all rounds concatenated and cut into
chunks of `chunk_len`; a chunk sees itself, the `n_chunks_before` chunks before it and the `n_chunks_after` chunks
after it in that concatenation (the first wrap around to the last, the last to the first). The attention itself
is dense jax.numpy over [length, length] scores per round, with each key weighted by how often it appears among
the seen slots (a key seen through two chunks counts twice, as in the chunked computation), so plain autodiff of
it is a gradient written by nobody in the project.
"""

import jax
import jax.numpy as jnp
import numpy as np

MASKED = -1e9  # a key after the query (causal) or a padded key
SELF = -1e5  # the query's own position: a last resort
NORM_EPS = 1e-6  # keys: k = q / sqrt(mean(q^2) + eps) / sqrt(d)


def seen_counts(buckets: np.ndarray, chunk_len: int, n_chunks_before: int, n_chunks_after: int = 0) -> np.ndarray:
    """[b, h, r, l] bucket ids -> [b, h, r, l, l]: how often query i of round r sees key position t."""
    b, h, n_rounds, length = buckets.shape
    counts = np.zeros((b, h, n_rounds, length, length))
    n_chunks = n_rounds * length // chunk_len
    for bi in range(b):
        for hi in range(h):
            order = np.concatenate([np.lexsort((np.arange(length), buckets[bi, hi, r])) for r in range(n_rounds)])
            chunks = order.reshape(n_chunks, chunk_len)
            for j in range(n_chunks):
                seen = np.concatenate([chunks[(j + d) % n_chunks] for d in range(-n_chunks_before, n_chunks_after + 1)])
                r = j * chunk_len // length
                for i in chunks[j]:
                    np.add.at(counts[bi, hi, r, i], seen, 1.0)
    return counts


def dense_lsh_attention(qk: jax.Array, v: jax.Array, counts: np.ndarray, *, causal: bool = True,
                        key_mask=None) -> jax.Array:
    """qk, v [b, h, l, k]; counts from `seen_counts` -> [b, h, l, k]: rounds combined by their logsumexp.
    key_mask [b, l] bool (False = padding): padded keys score MASKED; the self score still comes last."""
    d = qk.shape[-1]
    keys = qk / jnp.sqrt(jnp.mean(qk * qk, axis=-1, keepdims=True) + NORM_EPS) / np.sqrt(d)
    scores = jnp.einsum("bhik,bhtk->bhit", qk, keys)
    i, t = np.indices(scores.shape[-2:])
    if causal:
        scores = jnp.where(t > i, MASKED, scores)
    if key_mask is not None:
        scores = jnp.where(np.asarray(key_mask)[:, None, None, :], scores, MASKED)
    scores = jnp.where(t == i, SELF, scores)
    counts = jnp.asarray(counts, scores.dtype)
    # A key seen n times enters the softmax with weight n; unseen keys not at all.
    per_round = jnp.where(counts > 0, scores[:, :, None] + jnp.log(jnp.maximum(counts, 1.0)), -jnp.inf)
    lse = jax.nn.logsumexp(per_round, axis=-1)  # [b, h, r, l]
    out = jnp.einsum("bhrit,bhtk->bhrik", jnp.exp(per_round - lse[..., None]), v)
    return jnp.einsum("bhri,bhrik->bhik", jax.nn.softmax(lse, axis=2), out)
