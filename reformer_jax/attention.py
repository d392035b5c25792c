"""The attention kernels' public entry (the code is in `reformer_jax.kernels`).

    from reformer_jax.attention import lsh_attention
    out = lsh_attention(qk, v, rng, n_hashes=4, n_buckets=64, chunk_len=64)    # [b, h, l, k] -> [b, h, l, k]
"""

from reformer_jax.kernels.full import normalize_keys, shared_qk_attention
from reformer_jax.kernels.local import local_attention
from reformer_jax.kernels.lsh import bucket_dtype, lsh_attention, lsh_buckets, random_rotations, total_buckets

__all__ = ["bucket_dtype", "local_attention", "lsh_attention", "lsh_buckets", "normalize_keys", "random_rotations",
           "shared_qk_attention", "total_buckets"]
