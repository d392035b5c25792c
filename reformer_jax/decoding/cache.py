"""Per-layer decode caches of static shape, and the bucket index that lets an LSH layer look its chunk up.

Every array is allocated once for `cache_len` positions (the model's max_len) when the prompt is prefilled; a
decode step writes one position and reads what it attends to. Shapes per sequence (a batch adds a leading b axis):

  full   keys, values [h, L, k]     every position's unit-normalised key (shared-QK) and value
  local  keys, values [h, W, k]     ring buffer of the look-back window, W = (local_n_chunks_before + 1) *
                                    local_chunk_len, position q in slot q % W; keys already scaled by 1/sqrt(k)
  lsh    keys, values [h, L, k]     as for full attention (head-major: a step's dot products read them in place)
         buckets      [h, r, L]     each position's bucket in every hash round
         prev, next   [h, r, L]     int32: the previous / next position in the same bucket (-1: none)
         first, last  [h, r, n_b]   int32: the first / last position of each bucket (-1: empty)
         counts       [h, r, n_b]   int32: positions per bucket
         early_keys, early_values [h, E, k]   positions 0 .. E - 1 again, E = chunk_len + 1: a step attends to all
                                    of them while Hugging Face would have no buckets yet (`decode._lsh_step`)

Why keys and values, not the layer inputs (trax and Hugging Face cache the layer-normed inputs, d floats per
position, and project the gathered ones again at every step): a step of an LSH layer attends to n_r * W gathered
positions (W = (n_chunks_before + 1) * chunk_len), and projecting them again costs 2 n_r W d h k multiply-adds per
layer and token (for d 512, h 8, k 64, n_r 8, W 128, d_ff 2048: 537 M, over 100 x the 3 M of the layer's
projections and feed-forward), while keeping keys and values costs 2 h k floats per position instead of d, twice
the memory. Full attention would re-project all L positions at every step. The choice is by this count, not by a
timing of both; `bytes_per_token` reports the memory side.

The bucket index (prev / next / first / last / counts) stores each hash round's positions as linked lists by
bucket, in position order: the round's sorted order (by bucket, then position, as LSH attention sorts) is the
concatenation of the non-empty buckets' lists. A new token is appended to its bucket's list in O(1), and the
chunk of the sorted order around it is found by walking W - 1 links from it (`lsh_window`): no step sorts or
reads all L positions.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from reformer_jax.kernels.lsh import bucket_dtype, total_buckets
from reformer_jax.model.config import ModelConfig

Cache = Dict[str, jax.Array]
NONE = -1  # "no position" in the bucket index


def decode_config(config: ModelConfig) -> ModelConfig:
    """The config decoding runs with: LSH bucket counts fixed at their max_len value (the prefill and every step
    must hash into the same buckets, whatever the prompt's length), no dropout. A model trained with the default
    bucket count at a length below max_len hashed into fewer buckets in training; give it an explicit n_buckets."""
    changes: Dict[str, Any] = dict(dropout=0.0, attention_dropout=0.0, local_attention_dropout=0.0)
    if config.uses("lsh"):
        changes["n_buckets"] = config.resolved_n_buckets(config.max_len)
    return config.replace(**changes)


def local_window(config: ModelConfig) -> int:
    """Slots of a local layer's ring buffer: its look-back chunks and its own chunk."""
    return (config.local_n_chunks_before + 1) * config.local_chunk_len


def lsh_window(config: ModelConfig) -> int:
    """Positions one hash round of an LSH step attends to: its chunk of the sorted order and the chunks before."""
    return (config.n_chunks_before + 1) * config.chunk_len


def early_positions(config: ModelConfig, cache_len: int) -> int:
    """Positions an LSH layer's step may attend to all of (see `decode._lsh_step`): chunk_len + 1."""
    return min(cache_len, config.chunk_len + 1)


def cache_shapes(config: ModelConfig, kind: str, cache_len: int) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
    """{name: (shape, dtype)} of one layer's cache for one sequence (`decode_config`'s config)."""
    h, k = config.n_heads, config.d_head
    rows = local_window(config) if kind == "local" else cache_len
    shapes = {"keys": ((h, rows, k), jnp.float32), "values": ((h, rows, k), jnp.float32)}
    if kind == "lsh":
        r, n_b = config.n_hashes, total_buckets(config.n_buckets)
        shapes.update(buckets=((h, r, cache_len), bucket_dtype(config.n_buckets)),
                      prev=((h, r, cache_len), jnp.int32), next=((h, r, cache_len), jnp.int32),
                      first=((h, r, n_b), jnp.int32), last=((h, r, n_b), jnp.int32), counts=((h, r, n_b), jnp.int32),
                      early_keys=((h, early_positions(config, cache_len), k), jnp.float32),
                      early_values=((h, early_positions(config, cache_len), k), jnp.float32))
    return shapes


def bytes_per_token(config: ModelConfig, kind: str) -> int:
    """Cache bytes per position of one layer (its arrays that grow with L; local layers grow with nothing)."""
    if kind == "local":
        return 0
    per_position = 0
    for name, (shape, dtype) in cache_shapes(config, kind, cache_len=1).items():
        if name not in ("first", "last", "counts", "early_keys", "early_values"):
            per_position += math.prod(shape) * jnp.dtype(dtype).itemsize
    return per_position


# ---------------------------------------------------------------------------------------------------------------
# The LSH bucket index


def _at(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[..., index[...]]: per (head, round) lookup. table [h, r, n], index [h, r] -> [h, r]."""
    return jnp.take_along_axis(table, index[..., None], axis=-1)[..., 0]


def new_bucket_index(buckets: jax.Array, length: jax.Array, n_buckets: int) -> Cache:
    """The bucket index of positions 0 .. length - 1 of buckets [h, r, L] (later positions are left out):
    prev, next [h, r, L] and first, last, counts [h, r, n_buckets]."""
    cache_len = buckets.shape[-1]
    positions = lax.broadcasted_iota(jnp.int32, buckets.shape, 2)
    valid = positions < length
    key = jnp.where(valid, buckets.astype(jnp.int32), n_buckets)  # left-out positions sort last
    sorted_key, order = lax.sort((key, positions), dimension=-1, num_keys=2)
    same_as_before = jnp.concatenate([jnp.zeros_like(sorted_key[..., :1], bool),
                                      sorted_key[..., 1:] == sorted_key[..., :-1]], axis=-1)
    same_as_after = jnp.concatenate([same_as_before[..., 1:], jnp.zeros_like(sorted_key[..., :1], bool)], axis=-1)
    in_index = sorted_key < n_buckets
    before = jnp.where(same_as_before & in_index, jnp.roll(order, 1, axis=-1), NONE)
    after = jnp.where(same_as_after & in_index, jnp.roll(order, -1, axis=-1), NONE)
    scatter = lambda values: jnp.put_along_axis(  # noqa: E731  value of sorted slot i -> position order[i]
        jnp.full(buckets.shape, NONE, jnp.int32), order, values, axis=-1, inplace=False)
    big = jnp.int32(cache_len)
    per_bucket = lambda: jnp.zeros(buckets.shape[:2] + (n_buckets + 1,), jnp.int32)  # noqa: E731 (+1: left out)
    rows = jnp.arange(buckets.shape[0])[:, None, None], jnp.arange(buckets.shape[1])[None, :, None]
    counts = per_bucket().at[rows + (key,)].add(valid.astype(jnp.int32))[..., :n_buckets]
    first = (per_bucket() + big).at[rows + (key,)].min(jnp.where(valid, positions, big))[..., :n_buckets]
    last = (per_bucket() + NONE).at[rows + (key,)].max(jnp.where(valid, positions, NONE))[..., :n_buckets]
    return {"prev": scatter(before), "next": scatter(after), "first": jnp.where(first == big, NONE, first),
            "last": last, "counts": counts}


def insert(index: Cache, buckets: jax.Array, new_buckets: jax.Array, position: jax.Array) -> Tuple[Cache, jax.Array]:
    """Append `position` (after every indexed one) to the lists of its buckets new_buckets [h, r].

    Returns the updated index and bucket ids [h, r, L] (the new position's written in)."""
    h, r = new_buckets.shape
    rows = jnp.arange(h)[:, None], jnp.arange(r)[None, :]
    b = new_buckets.astype(jnp.int32)
    tail = _at(index["last"], b)  # the bucket's last position before this one
    write = lambda table, where, value: table.at[rows + (where,)].set(value, mode="promise_in_bounds")  # noqa: E731
    nxt = write(index["next"], position, NONE)
    updated = {"prev": write(index["prev"], position, tail),
               "next": write(nxt, jnp.where(tail >= 0, tail, position), jnp.where(tail >= 0, position, NONE)),
               "first": write(index["first"], b, jnp.where(tail >= 0, _at(index["first"], b), position)),
               "last": write(index["last"], b, position),
               "counts": index["counts"].at[rows + (b,)].add(1, mode="promise_in_bounds")}
    return updated, write(buckets, position, new_buckets.astype(buckets.dtype))


def _neighbour_buckets(counts: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(previous, next) non-empty bucket of every bucket id, cyclically: [h, r, n_b] each."""
    n_b = counts.shape[-1]
    ids = lax.broadcasted_iota(jnp.int32, counts.shape, 2)
    nonempty = counts > 0
    after = lax.cummin(jnp.where(nonempty, ids, n_b), axis=2, reverse=True)  # smallest non-empty id >= b
    after = jnp.concatenate([after[..., 1:], jnp.full_like(after[..., :1], n_b)], axis=-1)  # > b
    after = jnp.where(after == n_b, jnp.min(jnp.where(nonempty, ids, n_b), -1, keepdims=True), after)
    before = lax.cummax(jnp.where(nonempty, ids, -1), axis=2)  # largest non-empty id <= b
    before = jnp.concatenate([jnp.full_like(before[..., :1], -1), before[..., :-1]], axis=-1)  # < b
    before = jnp.where(before == -1, jnp.max(jnp.where(nonempty, ids, -1), -1, keepdims=True), before)
    return before, after


def chunk_positions(index: Cache, buckets: jax.Array, new_buckets: jax.Array, position: jax.Array, *,
                    chunk_len: int, n_chunks_before: int) -> jax.Array:
    """The positions the newest one attends to in each hash round, as Hugging Face's cached LSH attention picks
    them: in the round's sorted order (bucket, then position) of the positions 0 .. position, the chunk of
    `chunk_len` holding the newest position and the `n_chunks_before` chunks before it, ranks taken modulo the
    number of positions (so a short sequence repeats positions, as there). [h, r, W] int32.

    `index` and `buckets` must already hold `position` (`insert`)."""
    b = new_buckets.astype(jnp.int32)
    rank = _at(jnp.cumsum(index["counts"], axis=-1), b) - 1  # the newest position is its bucket's last
    width = (n_chunks_before + 1) * chunk_len
    steps_back = n_chunks_before * chunk_len + rank % chunk_len  # window slot of the newest position
    before, after = _neighbour_buckets(index["counts"])

    def predecessor(q):
        linked = _at(index["prev"], q)
        return jnp.where(linked >= 0, linked, _at(index["last"], _at(before, _at(buckets, q).astype(jnp.int32))))

    def successor(q):
        linked = _at(index["next"], q)
        return jnp.where(linked >= 0, linked, _at(index["first"], _at(after, _at(buckets, q).astype(jnp.int32))))

    def walk(cursors, _):
        back, forward = predecessor(cursors[0]), successor(cursors[1])
        return (back, forward), (back, forward)

    start = jnp.full(b.shape, position, jnp.int32)
    _, (backs, forwards) = lax.scan(walk, (start, start), None, length=width - 1)  # [W - 1, h, r] each
    backs = jnp.concatenate([start[None], backs], 0)  # backs[j]: j links before the newest position
    forwards = jnp.concatenate([start[None], forwards], 0)
    slots = jnp.arange(width)[:, None, None]
    window = jnp.where(slots <= steps_back, jnp.take_along_axis(backs, jnp.clip(steps_back - slots, 0), axis=0),
                       jnp.take_along_axis(forwards, jnp.clip(slots - steps_back, 0, width - 1), axis=0))
    return jnp.moveaxis(window, 0, -1)
