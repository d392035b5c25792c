"""LSH attention (sort-based, shared QK) as pure JAX functions with hand-written gradients.

Axes (used in every einsum here): b batch, h heads, l length, k d_head, r hash rounds, n chunks (over all rounds),
c chunk length, s keys seen by one chunk ((n_chunks_before + 1 + n_chunks_after) * c).

Reference semantics (the paper's LSH attention as trax and Hugging Face implement it):
- scores, keys, the self mask, the causal mask and the padding mask are full attention's
  (`reformer_jax.kernels.full`);
- LSH: sort each round by (bucket, position), chunk the concatenation of all rounds, let each chunk attend to
  itself, `n_chunks_before` previous chunks and `n_chunks_after` following ones (wrapping around: the first chunk
  of all looks back to the last, the last looks ahead to the first), unsort, and combine the rounds weighted by
  the softmax over rounds of each round's logsumexp. A key seen through two chunks counts twice (no
  duplicate correction, as in Hugging Face);
- padding (`key_mask`): padded positions go to an extra bucket after every real one, and padded keys are masked.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from reformer_jax.kernels.full import (at_least_f32, attention_dropout, as_key_mask, check_qkv, mask_scores, masked,
                                      normalize_keys)

BLOCK_ROWS = 4096  # query rows per block of LSH chunk attention (`_over_blocks`)

Buckets = Union[int, Tuple[int, ...]]


def total_buckets(n_buckets: Buckets) -> int:
    """Number of distinct bucket ids per round (the product of the factors for factorised buckets)."""
    return math.prod(n_buckets) if isinstance(n_buckets, tuple) else int(n_buckets)


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def bucket_dtype(n_buckets: Buckets) -> jnp.dtype:
    """Smallest integer type holding bucket ids in [0, n_buckets): these are what a reversible stack stores."""
    n = total_buckets(n_buckets)
    if n <= 2**8:
        return jnp.dtype(jnp.uint8)
    if n <= 2**16:
        return jnp.dtype(jnp.uint16)
    return jnp.dtype(jnp.int32)


def _bucket_factors(n_buckets: Buckets) -> Tuple[int, ...]:
    factors = tuple(n_buckets) if isinstance(n_buckets, tuple) else (int(n_buckets),)
    if not factors or any(f < 2 or f % 2 for f in factors):
        raise ValueError(f"n_buckets={n_buckets!r} is invalid: expected an even integer >= 2 or a tuple of even "
                         "integers (factorised buckets).")
    return factors


def random_rotations(rng: jax.Array, *, n_heads: int, d_head: int, n_hashes: int, n_buckets: Buckets) -> jax.Array:
    """N(0, 1) hash projections, one per head and round: [h, k, r, sum(f_i) / 2] float32 (Hugging Face layout)."""
    columns = sum(f // 2 for f in _bucket_factors(n_buckets))
    return jax.random.normal(rng, (n_heads, d_head, n_hashes, columns), jnp.float32)


def _signed_argmax(part: jax.Array) -> jax.Array:
    """argmax([part, -part], axis=-1) without the concatenation: [..., n] -> int32 [...] in [0, 2n).

    Ties go to the lowest index, as jnp.argmax's do. Found as the first index equal to the winning extreme: plain
    max/min reductions vectorise, where argmax/argmin are variadic reductions that XLA:CPU runs ~3 x slower (the
    hash of a layer at the speed benchmark's size P took 55 ms, more than its feed-forward forward pass's 36).
    """
    n = part.shape[-1]
    high, low = jnp.max(part, axis=-1), jnp.min(part, axis=-1)
    positive = high >= -low
    winner = jnp.where(positive, high, low)[..., None]
    index = jnp.min(jnp.where(part == winner, lax.broadcasted_iota(jnp.int32, part.shape, part.ndim - 1), n - 1),
                    axis=-1)  # n - 1 only if no entry matches (NaN input): an id in range all the same
    return jnp.where(positive, index, index + n)


def lsh_buckets(qk: jax.Array, rng: Optional[jax.Array], *, n_hashes: int, n_buckets: Buckets,
                rotations: Optional[jax.Array] = None) -> jax.Array:
    """Angular LSH bucket ids: [b, h, l, k] -> [b, h, r, l] in the smallest integer type (`bucket_dtype`).

    bucket = argmax([xR, -xR]) per round; factorised buckets (f1, f2) hash each factor on its own slice of the
    projection and combine as b1 + f1 * b2. Ids are per round (no r * n_buckets offset). Not differentiated.
    `rotations` ([h, k, r, sum(f_i) / 2]) replaces the random draw from `rng`.
    """
    if qk.ndim != 4:
        raise ValueError(f"lsh_buckets: qk must be [batch, heads, length, d_head]; got shape {qk.shape}.")
    factors = _bucket_factors(n_buckets)
    _, n_heads, _, d_head = qk.shape
    with jax.named_scope("lsh_hash"):
        if rotations is None:
            if rng is None:
                raise ValueError("lsh_buckets: pass an rng (or explicit rotations) to draw the hash projections.")
            rotations = random_rotations(rng, n_heads=n_heads, d_head=d_head, n_hashes=n_hashes,
                                         n_buckets=n_buckets)
        expected = (n_heads, d_head, n_hashes, sum(f // 2 for f in factors))
        if rotations.shape != expected:
            raise ValueError(f"lsh_buckets: rotations have shape {rotations.shape}; expected {expected} "
                             "([heads, d_head, n_hashes, sum(n_buckets factors) / 2]).")
        keys = at_least_f32(lax.stop_gradient(qk))

        def hash_round(round_rotations):  # [h, k, n] -> [b, h, l]
            # One round at a time: the [b, h, l, n] projection of all rounds together would be the largest
            # buffer of a long sequence (n = 192 columns per round for 2^20 tokens).
            rotated = jnp.einsum("bhlk,hkn->bhln", keys, round_rotations)
            buckets, offset, stride = None, 0, 1
            for f in factors:
                ids = _signed_argmax(rotated[..., offset:offset + f // 2])
                buckets = ids if buckets is None else buckets + stride * ids
                offset, stride = offset + f // 2, stride * f
            return buckets.astype(bucket_dtype(n_buckets))

        buckets = lax.map(hash_round, jnp.moveaxis(rotations, 2, 0))  # [r, b, h, l]
        buckets = jnp.moveaxis(buckets, 0, 2)
    return buckets.astype(bucket_dtype(n_buckets))


# ---------------------------------------------------------------------------------------------------------------
# Sort-based LSH attention


class _LSHSpec(NamedTuple):
    """Static (hashable) settings of one LSH attention call."""

    chunk_len: int
    n_chunks_before: int
    causal: bool
    dropout_rate: float
    n_chunks_after: int = 0


def look_adjacent(x: jax.Array, n_before: int, n_after: int = 0) -> jax.Array:
    """Keys a chunk sees: [b, h, n, c, ...] -> [b, h, n, (n_before + 1 + n_after) * c, ...].

    Chunk j sees chunks j - n_before .. j + n_after of the concatenation of all rounds, in that order (Hugging
    Face's `_look_adjacent`); the first chunks wrap around to the last ones and the last to the first.
    """
    parts = ([jnp.roll(x, shift, axis=2) for shift in range(n_before, 0, -1)] + [x]
             + [jnp.roll(x, -shift, axis=2) for shift in range(1, n_after + 1)])
    return jnp.concatenate(parts, axis=3)


def with_pad_bucket(buckets: jax.Array, mask: jax.Array, n_buckets: Buckets) -> jax.Array:
    """Bucket ids [b, h, r, l] with padded positions (mask [b, l] False) in the extra bucket
    total_buckets(n_buckets), which sorts them after every real position of each round (Hugging Face).

    The ids widen to the type that holds the extra bucket (e.g. uint8 -> uint16 at 256 buckets). Idempotent.
    """
    n = total_buckets(n_buckets)
    wide = buckets.astype(bucket_dtype(n + 1))
    return jnp.where(mask[:, None, None, :], wide, jnp.asarray(n, wide.dtype))


def _sort_by_bucket(buckets: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Per round, positions ordered by (bucket, position), and the inverse permutation. [b, h, r, l] each.

    Where every (bucket, position) pair fits one uint32 key, bucket * l + position (uint8 ids up to l = 2^24,
    uint16 ids up to l = 2^16), it sorts that key alone: XLA's single-operand sort is about 5 x faster on CPU than
    a sort with a comparator over two operands. Longer inputs sort the two keys; neither way forms trax's single
    key r * n_buckets * l + bucket * l + i, so nothing can overflow.
    """
    length = buckets.shape[-1]
    positions = lax.broadcasted_iota(jnp.int32, buckets.shape, buckets.ndim - 1)
    n_ids = int(jnp.iinfo(buckets.dtype).max) + 1  # a bound on the ids this dtype can hold
    if jnp.issubdtype(buckets.dtype, jnp.unsignedinteger) and n_ids * length <= 2**32:
        keys = buckets.astype(jnp.uint32) * jnp.uint32(length) + positions.astype(jnp.uint32)  # all distinct
        order = (lax.sort(keys, dimension=-1) % jnp.uint32(length)).astype(jnp.int32)
    else:
        _, order = lax.sort((buckets, positions), dimension=-1, num_keys=2)
    inverse = jnp.put_along_axis(jnp.zeros_like(order), order, positions, axis=-1, inplace=False)
    return order, inverse


def _attend_chunks(sq: jax.Array, q_pos: jax.Array, seen_k: jax.Array, seen_v: jax.Array, seen_pos: jax.Array,
                   spec: _LSHSpec, dropout_rng: jax.Array,
                   seen_valid: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Shared-QK attention of each chunk to the keys it sees.

    sq [b, h, n, c, k] queries at original positions q_pos [b, h, n, c]; seen_k / seen_v [b, h, n, s, k] the
    unit-normalised keys and the values each chunk sees, at positions seen_pos [b, h, n, s]; seen_valid
    [b, h, n, s] bool (None: no padding) False where a seen key is padding.
    Returns (out [b, h, n, c, k_v], row_max [b, h, n, c, 1], row_sum [b, h, n, c, 1]): the row's largest score
    m and sum of exp(s - m), so its logsumexp is m + log(row_sum).
    """
    dots = jnp.einsum("bhnqk,bhnsk->bhnqs", sq, seen_k)
    dots = mask_scores(dots, q_pos[..., :, None], seen_pos[..., None, :], spec.causal, _keys_axis(seen_valid))
    # softmax from the row max, not exp(dots - lse): near SELF_MASK_VALUE (-1e5) float32 spacing is 0.008,
    # so a rounded lse would leave a self-only row summing to 0.99 instead of 1.
    row_max = lax.stop_gradient(jnp.max(dots, axis=-1, keepdims=True))
    unnormalized = jnp.exp(dots - row_max)
    row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
    probs = attention_dropout(unnormalized / row_sum, spec.dropout_rate, dropout_rng)
    return jnp.einsum("bhnqs,bhnsk->bhnqk", probs, seen_v), row_max, row_sum


def _keys_axis(seen_valid: Optional[jax.Array]) -> Optional[jax.Array]:
    """seen_valid [..., s] -> [..., 1, s], broadcasting over a chunk's query rows (None stays None)."""
    return None if seen_valid is None else seen_valid[..., None, :]


def chunks_per_block(n_chunks: int, chunk_len: int, n_before: int, block_rows: Optional[int] = None,
                     n_after: int = 0) -> int:
    """Chunks attended together in one block: the largest divisor of n_chunks with at most `block_rows` query
    rows (default BLOCK_ROWS), and more than max(n_before, n_after) chunks (a block's look-back stays in the
    block before it, its look-ahead in the block after it); n_chunks (one block) when no divisor qualifies."""
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    fitting = [d for d in range(1, n_chunks + 1) if n_chunks % d == 0 and d * chunk_len <= block_rows]
    best = max(fitting, default=n_chunks)
    return best if best > max(n_before, n_after) else n_chunks


def _seen(x: jax.Array, n_before: int, n_after: int = 0) -> jax.Array:
    """The rows each of the middle n chunks sees: [b, h, n_before + n + n_after, c, ...] ->
    [b, h, n, (n_before + 1 + n_after) c, ...], the n_before chunks before it first, then its own, then the
    n_after chunks after it (the order of `look_adjacent`)."""
    n = x.shape[2] - n_before - n_after
    return jnp.concatenate([x[:, :, i:i + n] for i in range(n_before + 1 + n_after)], axis=3)


def _own(x: jax.Array, n_before: int, n_after: int) -> jax.Array:
    """The middle chunks of extended rows [b, h, n_before + n + n_after, ...] -> [b, h, n, ...]."""
    return x[:, :, n_before:x.shape[2] - n_after]


def _sorted_valid(key_mask: Optional[jax.Array], positions: jax.Array) -> Optional[jax.Array]:
    """key_mask [b, l] bool at sorted original positions [b, h, ...] -> [b, h, ...] bool (None: no mask)."""
    if key_mask is None:
        return None
    b, h = positions.shape[:2]
    flat = positions.reshape(b, h, -1)
    valid = jnp.take_along_axis(jnp.broadcast_to(key_mask[:, None, :], (b, h, key_mask.shape[-1])), flat, axis=-1)
    return valid.reshape(positions.shape)


def _lsh_attend(spec: _LSHSpec, qk: jax.Array, v: jax.Array, buckets: jax.Array,
                dropout_rng: jax.Array, key_mask: Optional[jax.Array] = None) -> jax.Array:
    """LSH attention given bucket ids, by plain differentiable JAX ops. Returns [b, h, l, k_v] (at least float32).
    key_mask [b, l] bool (None: no padding) masks padded keys.

    The custom_vjp below runs this in the forward pass and recomputes it (under jax.vjp) in the backward pass.
    """
    b, h, length, d_head = qk.shape
    d_value = v.shape[-1]
    n_hashes = buckets.shape[2]
    c = spec.chunk_len
    n_chunks = n_hashes * length // c

    order, inverse = _sort_by_bucket(buckets)  # [b, h, r, l]
    flat_order = order.reshape(b, h, n_hashes * length)
    with jax.named_scope("lsh_sort"):
        sq = jnp.take_along_axis(at_least_f32(qk), flat_order[..., None], axis=2)  # [b, h, r*l, k]
        sv = jnp.take_along_axis(at_least_f32(v), flat_order[..., None], axis=2)
    sq = sq.reshape(b, h, n_chunks, c, d_head)
    sv = sv.reshape(b, h, n_chunks, c, d_value)
    q_pos = flat_order.reshape(b, h, n_chunks, c)

    with jax.named_scope("lsh_chunk_attention"):
        adjacent = functools.partial(look_adjacent, n_before=spec.n_chunks_before, n_after=spec.n_chunks_after)
        q_valid = _sorted_valid(key_mask, q_pos)
        out, row_max, row_sum = _attend_chunks(
            sq, q_pos, adjacent(normalize_keys(sq)), adjacent(sv), adjacent(q_pos), spec, dropout_rng,
            None if q_valid is None else adjacent(q_valid))
        lse = row_max + jnp.log(row_sum)  # each chunk row's weight when combining rounds

    with jax.named_scope("lsh_unsort_combine"):
        out = jnp.take_along_axis(out.reshape(b, h, n_hashes, length, d_value), inverse[..., None], axis=3)
        lse = jnp.take_along_axis(lse.reshape(b, h, n_hashes, length), inverse, axis=3)
        weights = jax.nn.softmax(lse, axis=2)  # over rounds: exp(lse_r - logsumexp_r(lse))
        return jnp.einsum("bhrl,bhrlk->bhlk", weights, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lsh_attention_recomputed(spec, qk, v, buckets, dropout_rng, key_mask=None):
    return _lsh_attend(spec, qk, v, buckets, dropout_rng, key_mask)


def _lsh_forward(spec, qk, v, buckets, dropout_rng, key_mask=None):
    # Keep only the inputs (qk and v are alive anyway as the layer's projections) and the compact bucket ids;
    # no [chunk, keys] score matrix survives the forward pass.
    return _lsh_attend(spec, qk, v, buckets, dropout_rng, key_mask), (qk, v, buckets, dropout_rng, key_mask)


def _lsh_backward(spec, residuals, g):
    qk, v, buckets, dropout_rng, key_mask = residuals
    _, vjp = jax.vjp(lambda q, w: _lsh_attend(spec, q, w, buckets, dropout_rng, key_mask), qk, v)
    dqk, dv = vjp(g)
    return dqk, dv, None, None, None


_lsh_attention_recomputed.defvjp(_lsh_forward, _lsh_backward)


# ---------------------------------------------------------------------------------------------------------------
# The same attention one hash round at a time (sequential_rounds=True), with a hand-written backward pass
#
# Forward: round r gives out_r and its logsumexp lse_r per query row; the rounds combine as
#   out = sum_r w_r out_r,  w_r = exp(lse_r) / sum_s exp(lse_s),
# accumulated online (like a streaming softmax) from each round's row maximum and row sum, one block of a
# round's chunks at a time, so only one block's sorted rows are alive at a time (`_rounds_forward`). The
# look-back of a round's first chunk reaches the previous round's last chunk, as in the all-rounds path,
# through the carried sort order (`_RoundRows.tail`);
# the look-ahead of its last chunk reaches the next round's first chunk (`_RoundRows.front`, from the next
# round's sort, made one step early and carried: `_scan_rounds`).
# Backward: with p the round's attention weights, ds = w_r p * (g . v - g . out) is the gradient of the scores
# s = q . k (the softmax's own term and the lse's cancel into the combined output's), and w_r p = exp(s - top) /
# total with the forward's `top` and `total`. So each round recomputes only its scores, never its output or
# softmax statistics, and nothing of a round is stored for the backward pass (`_chunk_grads`).


class _RoundRows(NamedTuple):
    """Round r's sort: `order` / `inverse` [b, h, l], the look-back `tail` [b, h, n_before * c] (the previous
    round's last rows) and the look-ahead `front` [b, h, n_after * c] (the next round's first rows; None when
    n_after = 0), all original positions; `positions` [b, h, n_before + m + n_after, c] of the extended rows."""

    order: jax.Array
    inverse: jax.Array
    tail: jax.Array
    positions: jax.Array
    front: Optional[jax.Array] = None


def _round_rows(spec: _LSHSpec, order: jax.Array, inverse: jax.Array, previous: jax.Array,
                following: Optional[jax.Array] = None) -> _RoundRows:
    """Round r's rows in look-adjacent order: the previous round's last n_before chunks (of the last round for
    r = 0), this round's chunks, then the next round's first n_after chunks (of round 0 for the last round),
    exactly the adjacent chunks across the concatenated rounds of `_lsh_attend`.
    order / inverse [b, h, l]: round r's sort; previous / following [b, h, l]: the sorted orders of rounds r - 1
    and r + 1 (following: only with n_after > 0). No round's vectors are ever needed besides round r's."""
    b, h, length = order.shape
    c, n_before, n_after = spec.chunk_len, spec.n_chunks_before, spec.n_chunks_after
    tail = previous[..., length - n_before * c:]
    front = following[..., :n_after * c] if n_after else None
    parts = [tail, order] + ([front] if n_after else [])
    positions = jnp.concatenate(parts, axis=-1).reshape(b, h, n_before + length // c + n_after, c)
    return _RoundRows(order, inverse, tail, positions, front)


def _scan_rounds(spec: _LSHSpec, buckets: jax.Array, step, init):
    """lax.scan over the rounds r of carry = step(carry, rows, r), each round given its `_RoundRows`; returns the
    final carry. Each round is sorted once per loop (plus the last round's sort up front, round 0's look-back):
    the loop carries round r - 1's order to round r, and with a look-ahead it sorts round r + 1 one step early
    and carries that sort to the next step."""
    n_hashes = buckets.shape[2]
    sort = lambda r: _sort_by_bucket(lax.dynamic_index_in_dim(buckets, r, axis=2, keepdims=False))  # noqa: E731
    if not spec.n_chunks_after:
        def body(state, r):
            carry, previous = state
            order, inverse = sort(r)  # [b, h, l]
            return (step(carry, _round_rows(spec, order, inverse, previous), r), order), None

        init_sorts = _last_round_order(buckets)
    else:
        def body(state, r):
            carry, (previous, (order, inverse)) = state
            following = sort((r + 1) % n_hashes)
            rows = _round_rows(spec, order, inverse, previous, following[0])
            return (step(carry, rows, r), (order, following)), None

        init_sorts = (_last_round_order(buckets), _sort_by_bucket(buckets[:, :, 0]))
    return lax.scan(body, (init, init_sorts), jnp.arange(n_hashes))[0][0]


def _last_round_order(buckets: jax.Array) -> jax.Array:
    """The sorted order [b, h, l] of the last round: the look-back of round 0."""
    return _sort_by_bucket(buckets[:, :, -1])[0]


_LANES = 128  # a TPU tile's minor width: an f32 [l, 64] array in (8, 128) tiles takes twice its bytes


class _Grouped(NamedTuple):
    """x [b, h, l, k] stored as `data` [b, h, l / p, p k]: p consecutive rows side by side (`_group_rows`)."""

    data: jax.Array
    per_row: int


_Rows = Union[jax.Array, _Grouped]  # [b, h, l, k] rows as `_rows_at` reads them


def for_tpu_tiles() -> bool:
    """Whether the program being traced is for TPU chips, whose (8, 128) tiles pad a narrow minor axis: the
    devices of the mesh in context (`jax.set_mesh`; a TPU slice compiled for on any machine), else the default
    backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return (device.platform if device is not None else jax.default_backend()) == "tpu"


def _group_rows(x: jax.Array) -> _Rows:
    """x [b, h, l, k] (at least float32) for `_rows_at`; for TPU chips (`for_tpu_tiles`), with k < 128 dividing
    128 (and l divisible), as `_Grouped` p = 128 / k rows to a 128-wide row. The same values, but in a shape whose
    minor axis fills a TPU tile, so the compiler need not lay the array out [l, k] with k padded to 128 lanes
    (twice the bytes at k = 64) while the rounds' loops hold it: 1 GiB less at the peak of the seed Reformer's
    step at 2^20 tokens on a v5e chip. XLA:CPU pads nothing, and reading rows p at a time cost it about 40% more
    time in LSH attention's backward pass, so elsewhere x stays as it is. Grouped once, before the loops that
    read it."""
    x = at_least_f32(x)
    if (for_tpu_tiles() and x.ndim == 4 and x.shape[3] < _LANES and _LANES % x.shape[3] == 0
            and x.shape[2] % (_LANES // x.shape[3]) == 0):
        per_row = _LANES // x.shape[3]
        return _Grouped(x.reshape(x.shape[:2] + (x.shape[2] // per_row, per_row * x.shape[3])), per_row)
    return x


def _rows_at(x: _Rows, positions: jax.Array) -> jax.Array:
    """The rows of x [b, h, l, ...] (or of a `_Grouped` x) at original positions [b, h, n, c] ->
    [b, h, n, c, ...] (at least float32)."""
    b, h = positions.shape[:2]
    flat = positions.reshape(b, h, -1)
    if isinstance(x, _Grouped):  # the 128-wide rows holding them, then each one's place in its row
        rows = jnp.take_along_axis(x.data, (flat // x.per_row)[..., None], axis=2)
        rows = rows.reshape(rows.shape[:3] + (x.per_row, -1))
        place = (flat % x.per_row)[..., None]
        # Of two, by a select rather than a second gather.
        rows = (jnp.where(place == 0, rows[:, :, :, 0], rows[:, :, :, 1]) if x.per_row == 2 else
                jnp.take_along_axis(rows, place[..., None], axis=3)[:, :, :, 0])
        return rows.reshape(positions.shape + rows.shape[3:])
    x = at_least_f32(x)
    index = flat.reshape(flat.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, index, axis=2).reshape(positions.shape + x.shape[3:])


def _put_rows(x: jax.Array, positions: jax.Array, rows: jax.Array, add: bool = False) -> jax.Array:
    """x [b, h, l, ...] with rows [b, h, n, c, ...] written at original positions [b, h, n, c], a scatter into
    x's buffer: set (positions distinct), or with `add` added (a position given twice gets both: the adjoint of
    `_rows_at`)."""
    b, h = positions.shape[:2]
    flat = positions.reshape(b, h, -1)
    rows = rows.reshape(flat.shape + rows.shape[4:]).astype(x.dtype)
    put = (lambda a, i, r: a.at[i].add(r)) if add else (lambda a, i, r: a.at[i].set(r))
    return jax.vmap(jax.vmap(put))(x, flat, rows)


def _over_blocks(spec: _LSHSpec, rows: _RoundRows, dropout_rng: jax.Array, r: jax.Array, step, carry):
    """carry = step(carry, ext_pos, own_pos, rng) for each block of chunks of round r in turn (a `lax.scan`).

    A block is the largest run of B chunks of the round with at most BLOCK_ROWS query rows (`chunks_per_block`);
    ext_pos [b, h, n_before + B + n_after, c] are the original positions of its extended rows: the n_before chunks
    before its own (the previous block's last, or for the first block the previous round's last chunks), its own
    B chunks (own_pos [b, h, B, c]) and the n_after after (the next block's first, or the next round's first
    chunks). rng: the block's attention-dropout key (round r's, folded with the block index when there are
    several blocks), the same in both passes.

    Why blocks: every buffer of a block ([B, c, s] scores, its gathered rows) has the same size at any length,
    so at long lengths they stay in cache as they do at short ones (at 65536 tokens a whole round's
    [64 x 64] x [64 x 128] chunk products ran 24% slower per chunk than at 4096), and a block gathers its rows from
    the unsorted arrays and writes its results back at their positions, so no whole-round sorted copy of any
    [b, h, l, k] array is ever formed. One block (every length up to BLOCK_ROWS) is the whole round at once.
    """
    n_before, n_after, c = spec.n_chunks_before, spec.n_chunks_after, spec.chunk_len
    m = rows.order.shape[-1] // c
    per_block = chunks_per_block(m, c, n_before, n_after=n_after)
    rng = jax.random.fold_in(dropout_rng, r)

    def block(carry, j):
        ext_pos = lax.dynamic_slice_in_dim(rows.positions, j * per_block, n_before + per_block + n_after, axis=2)
        own_pos = ext_pos[:, :, n_before:n_before + per_block]
        return step(carry, ext_pos, own_pos, rng if per_block == m else jax.random.fold_in(rng, j)), None

    return lax.scan(block, carry, jnp.arange(m // per_block))[0]


def _round_attend(spec: _LSHSpec, qk: _Rows, v: _Rows, rows: _RoundRows, r: jax.Array,
                  dropout_rng: jax.Array, combined: Tuple[jax.Array, jax.Array, jax.Array],
                  key_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Round r of LSH attention on its `_round_rows`, combined into the running (acc [b, h, l, k_v], top,
    total [b, h, l]) of `_rounds_forward` one block of chunks at a time (`_over_blocks`): at each of a block's
    query rows, top' = max(top, m_r), acc' = acc exp(top - top') + out_r s_r exp(m_r - top'), total' =
    total exp(top - top') + s_r exp(m_r - top'), with out_r, m_r (row max) and s_r (row sum) as `_attend_chunks`
    gives them. A position is a query row once per round, so the update is the same at every position as for
    the whole round at once.

    The chunks of round r see, before its first chunk, the last `n_chunks_before` chunks of round r - 1, and
    after its last chunk the first `n_chunks_after` chunks of round r + 1. qk, v: [b, h, l, k] rows, grouped
    or not (`_group_rows`); key_mask [b, l] bool or None. Not differentiated: `_round_backward` is its gradient.
    """
    seen = functools.partial(_seen, n_before=spec.n_chunks_before, n_after=spec.n_chunks_after)

    def block(combined, ext_pos, own_pos, rng):
        acc, top, total = combined
        ext_q, ext_v = _rows_at(qk, ext_pos), _rows_at(v, ext_pos)
        valid = _sorted_valid(key_mask, ext_pos)
        out, row_max, row_sum = _attend_chunks(_own(ext_q, spec.n_chunks_before, spec.n_chunks_after), own_pos,
                                               seen(normalize_keys(ext_q)), seen(ext_v), seen(ext_pos), spec, rng,
                                               None if valid is None else seen(valid))
        row_max, row_sum = row_max[..., 0], row_sum[..., 0]
        old_top = _rows_at(top, own_pos)
        new_top = jnp.maximum(old_top, row_max)
        scale, weight = jnp.exp(old_top - new_top), row_sum * jnp.exp(row_max - new_top)
        new_acc = _rows_at(acc, own_pos) * scale[..., None] + out * weight[..., None]
        return (_put_rows(acc, own_pos, new_acc), _put_rows(top, own_pos, new_top),
                _put_rows(total, own_pos, _rows_at(total, own_pos) * scale + weight))

    return _over_blocks(spec, rows, dropout_rng, r, block, combined)


def _chunk_grads(ext_q: jax.Array, ext_v: jax.Array, ext_pos: jax.Array, g: jax.Array, g_dot_out: jax.Array,
                 top: jax.Array, total: jax.Array, spec: _LSHSpec, rng: jax.Array,
                 ext_valid: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Gradient of the rounds-combined output with respect to one block's extended rows, flash-style.

    ext_q / ext_v [b, h, n_before + B + n_after, c, k], ext_pos [b, h, n_before + B + n_after, c] their original
    positions (`_over_blocks`), ext_valid (same shape, bool, or None) False at padded positions; for the B chunks'
    query rows: g [b, h, B, c, k_v] the output cotangent, g_dot_out [b, h, B, c] = g . out
    (the combined output), and top / total [b, h, B, c] the forward's largest score over all rounds and its normaliser
    sum_r row_sum_r exp(row_max_r - top) (`_rounds_forward`).
    Returns (d ext_q, d ext_v), shaped like ext_q and ext_v.

    With p the round's attention weights and w = exp(lse_r - top) / total its weight among the rounds, the
    score gradient of out = sum_r w_r out_r is ds = w p * (g . v - g . out): the softmax's own term and the
    lse's cancel into the combined output's, and w p = exp(s - top) / total. So only the scores are recomputed
    (q k), never this round's output or its softmax statistics, and nothing of the block outlives it. top is a
    score itself (exactly SELF_MASK_VALUE in a row that sees only its own position), so s - top is exact where
    it matters: from a rounded logsumexp near -1e5 (float32 spacing 0.008) such a row's weights would be 0.4%
    off.
    """
    n_before, n_after = spec.n_chunks_before, spec.n_chunks_after
    n_adjacent = n_before + n_after
    seen = functools.partial(_seen, n_before=n_before, n_after=n_after)
    q, q_pos = _own(ext_q, n_before, n_after), _own(ext_pos, n_before, n_after)
    keys, keys_vjp = jax.vjp(normalize_keys, ext_q)
    seen_k, seen_v, seen_pos = seen(keys), seen(ext_v), seen(ext_pos)
    k_valid = _keys_axis(None if ext_valid is None else seen(ext_valid))
    dots = mask_scores(jnp.einsum("bhnqk,bhnsk->bhnqs", q, seen_k), q_pos[..., :, None], seen_pos[..., None, :],
                        spec.causal, k_valid)
    # w p = exp(s - lse_r) exp(lse_r - top) / total = exp(s - top) / total: no row maximum or sum to recompute;
    # exp(s - top) <= 1, as top >= every score of the row.
    weighted = jnp.exp(dots - top[..., None]) * (1.0 / total[..., None])  # [b, h, B, c, s]
    # The forward's dropout mask, drawn again from the same key for the same shape.
    d_seen_v = jnp.einsum("bhnqs,bhnqk->bhnsk", attention_dropout(weighted, spec.dropout_rate, rng), g)
    g_dot_v = attention_dropout(jnp.einsum("bhnqk,bhnsk->bhnqs", g, seen_v), spec.dropout_rate, rng)
    d_dots = weighted * (g_dot_v - g_dot_out[..., None])
    d_dots = jnp.where(masked(q_pos[..., :, None], seen_pos[..., None, :], spec.causal, k_valid), 0.0, d_dots)
    d_q = jnp.einsum("bhnqs,bhnsk->bhnqk", d_dots, seen_k)
    d_seen_k = jnp.einsum("bhnqs,bhnqk->bhnsk", d_dots, q)

    def unseen(d):  # adjoint of `seen`: [b, h, n, s, k] -> [b, h, n_before + n + n_after, c, k], a sum of pads
        parts = jnp.split(d, n_adjacent + 1, axis=3)
        widths = lambda i: [(0, 0)] * 2 + [(i, n_adjacent - i)] + [(0, 0)] * (d.ndim - 3)  # noqa: E731
        return sum(jnp.pad(part, widths(i)) for i, part in enumerate(parts))

    d_ext_q = keys_vjp(unseen(d_seen_k))[0] + jnp.pad(d_q, [(0, 0)] * 2 + [(n_before, n_after)] + [(0, 0)] * 2)
    return d_ext_q, unseen(d_seen_v)


def _round_backward(spec: _LSHSpec, qk: _Rows, v: _Rows, rows: _RoundRows, r: jax.Array,
                    dropout_rng: jax.Array, g: _Rows, g_dot_out: jax.Array, top: jax.Array, total: jax.Array,
                    grads: Tuple[jax.Array, jax.Array],
                    key_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Round r's share of (d qk, d v) for the output cotangent g [b, h, l, k_v] (see `_chunk_grads`; qk, v and
    g as `_group_rows` gives them), added to grads = (d qk, d v) [b, h, l, k] (float32 accumulators) one block
    of chunks at a time (`_over_blocks`, the forward's blocks and dropout keys): a block gathers its extended
    rows of qk and v and its query rows of g, g . out, top and total from the unsorted arrays, and scatter-adds
    its gradients back at their positions (its look-back and look-ahead rows' shares included)."""

    def block(grads, ext_pos, own_pos, rng):
        query_rows = [_rows_at(x, own_pos) for x in (g, g_dot_out, top, total)]
        d_q, d_v = _chunk_grads(_rows_at(qk, ext_pos), _rows_at(v, ext_pos), ext_pos, *query_rows, spec, rng,
                                _sorted_valid(key_mask, ext_pos))
        return _put_rows(grads[0], ext_pos, d_q, add=True), _put_rows(grads[1], ext_pos, d_v, add=True)

    return _over_blocks(spec, rows, dropout_rng, r, block, grads)


def _rounds_forward(spec, qk, v, buckets, dropout_rng, key_mask=None):
    """All rounds, one at a time, combined online by their logsumexp lse_r = row_max_r + log(row_sum_r).

    Returns (out [b, h, l, k_v], top [b, h, l], total [b, h, l]): top = max_r row_max_r, the largest score of
    any round, and total = sum_r row_sum_r exp(row_max_r - top), so the rounds' weights are w_r = exp(lse_r -
    top) / total = row_sum_r exp(row_max_r - top) / total. Like `_attend_chunks`, everything is formed from
    maxima of scores, never from a logsumexp: near SELF_MASK_VALUE a rounded one would be off by up to 0.4%.
    """
    b, h, length, _ = qk.shape
    grouped = _group_rows(qk), _group_rows(v)

    def add_round(carry, rows, r):
        return _round_attend(spec, *grouped, rows, r, dropout_rng, carry, key_mask)

    f32 = jnp.promote_types(qk.dtype, jnp.float32)
    init = (jnp.zeros((b, h, length, v.shape[-1]), jnp.promote_types(v.dtype, jnp.float32)),
            jnp.full((b, h, length), -jnp.inf, f32), jnp.zeros((b, h, length), f32))
    with jax.named_scope("lsh_rounds"):
        acc, top, total = _scan_rounds(spec, buckets, add_round, init)
    return acc / total[..., None], top, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lsh_attention_by_rounds(spec, qk, v, buckets, dropout_rng, key_mask=None):
    return _rounds_forward(spec, qk, v, buckets, dropout_rng, key_mask)[0]


def _by_rounds_fwd(spec, qk, v, buckets, dropout_rng, key_mask=None):
    out, top, total = _rounds_forward(spec, qk, v, buckets, dropout_rng, key_mask)
    return out, (qk, v, buckets, dropout_rng, key_mask, out, top, total)


def _by_rounds_bwd(spec, residuals, g):
    """Each round's gradient in turn (`_round_backward`): out = sum_r w_r out_r with w = softmax_r(lse_r), so
    d out_r = w_r g and d lse_r = w_r (g . out_r - g . out); only the scores are recomputed."""
    qk, v, buckets, dropout_rng, key_mask, out, top, total = residuals
    g_dot_out = jnp.sum(g * out, axis=-1)

    qk_rows, v_rows, g_rows = _group_rows(qk), _group_rows(v), _group_rows(g)

    def round_grads(grads, rows, r):
        return _round_backward(spec, qk_rows, v_rows, rows, r, dropout_rng, g_rows, g_dot_out, top, total, grads,
                               key_mask)

    zeros = tuple(jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)) for x in (qk, v))
    with jax.named_scope("lsh_rounds_backward"):
        dqk, dv = _scan_rounds(spec, buckets, round_grads, zeros)
    return dqk.astype(qk.dtype), dv.astype(v.dtype), None, None, None


_lsh_attention_by_rounds.defvjp(_by_rounds_fwd, _by_rounds_bwd)


# ---------------------------------------------------------------------------------------------------------------
# The public entry


def lsh_attention(qk: jax.Array, v: jax.Array, rng: Optional[jax.Array], *, n_hashes: int, n_buckets: Buckets,
                  chunk_len: int, n_chunks_before: int = 1, causal: bool = True,
                  buckets: Optional[jax.Array] = None, rotations: Optional[jax.Array] = None,
                  dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                  sequential_rounds: bool = True, n_chunks_after: int = 0,
                  key_mask: Optional[jax.Array] = None) -> jax.Array:
    """Sort-based LSH attention: qk, v [b, h, l, k] -> [b, h, l, k] (v's dtype).

    Args:
      qk: shared query/key vectors (keys are their unit-normalised copies).
      v: values.
      rng: key for the random hash rotations (unused when `buckets` or `rotations` is given).
      n_hashes: hash rounds n_r.
      n_buckets: buckets per round (even int) or a tuple of even factors.
      chunk_len: c; the length must be a multiple of it.
      n_chunks_before: previous chunks each chunk attends to (across rounds, wrapping around).
      causal: mask keys at later original positions.
      buckets: precomputed bucket ids [b, h, r, l] (e.g. saved by a reversible stack); skips hashing.
      rotations: explicit hash projections [h, k, r, sum(f_i) / 2] instead of drawing them from `rng`.
      dropout_rate, dropout_rng: dropout on the attention weights (replayed exactly in the backward pass).
      sequential_rounds: process one hash round at a time, in the forward and the backward pass, combining rounds
        with a running logsumexp: peak memory no longer grows with n_hashes (the default; False: all rounds at
        once). Same result up to float rounding
        (dropout masks are drawn per round instead, so they differ). Needs n_chunks_before and n_chunks_after
        <= length / chunk_len.
      n_chunks_after: following chunks each chunk attends to (across rounds, wrapping around from the last chunk
        of all to the first); > 0 for bidirectional (causal=False) attention, as Hugging Face's
        lsh_num_chunks_after.
      key_mask: [b, l] bool, False for padding (Hugging Face's attention_mask): padded positions are put in an
        extra bucket (id total_buckets(n_buckets), also when `buckets` are given: `with_pad_bucket`), which sorts
        them after every real position of each round, and padded keys score MASK_VALUE. Real positions' outputs
        then do not depend on the padded tokens.

    The gradient is a `jax.custom_vjp` that recomputes the chunked attention from (qk, v, buckets) instead of
    storing score matrices: memory kept for the backward pass is O(b h l k) plus n_r * l small integers. With
    sequential_rounds each round's backward is written by hand (`_chunk_grads`: only the scores are recomputed),
    and both passes attend a round's chunks in blocks of at most BLOCK_ROWS query rows.
    """
    check_qkv(qk, v, "lsh_attention")
    b, h, length, _ = qk.shape
    if chunk_len < 1 or length % chunk_len:
        raise ValueError(f"lsh_attention: length {length} is not a multiple of chunk_len={chunk_len}; pad the "
                         f"sequence or choose a chunk_len dividing it.")
    if n_chunks_before < 0:
        raise ValueError(f"lsh_attention: n_chunks_before={n_chunks_before} must be >= 0.")
    if n_chunks_after < 0:
        raise ValueError(f"lsh_attention: n_chunks_after={n_chunks_after} must be >= 0.")
    key_mask = as_key_mask(key_mask, b, length, "lsh_attention")
    if n_hashes < 1:
        raise ValueError(f"lsh_attention: n_hashes={n_hashes} must be >= 1.")
    if buckets is None:
        buckets = lsh_buckets(qk, rng, n_hashes=n_hashes, n_buckets=n_buckets, rotations=rotations)
    elif buckets.shape != (b, h, n_hashes, length):
        raise ValueError(f"lsh_attention: buckets have shape {buckets.shape}; expected {(b, h, n_hashes, length)} "
                         "([batch, heads, n_hashes, length]).")
    if key_mask is not None:
        buckets = with_pad_bucket(buckets, key_mask, n_buckets)
    if dropout_rate and dropout_rng is None:
        raise ValueError("lsh_attention: dropout_rate > 0 needs a dropout_rng.")
    if dropout_rng is None:
        dropout_rng = jax.random.key(0)  # unused placeholder: custom_vjp arguments must be arrays
    spec = _LSHSpec(chunk_len=chunk_len, n_chunks_before=n_chunks_before, causal=causal,
                    dropout_rate=float(dropout_rate), n_chunks_after=n_chunks_after)
    for name, value in (("n_chunks_before", n_chunks_before), ("n_chunks_after", n_chunks_after)):
        if sequential_rounds and value > length // chunk_len:
            raise ValueError(f"lsh_attention: sequential_rounds needs {name}={value} <= chunks per round "
                             f"({length // chunk_len}); use sequential_rounds=False.")
    core = _lsh_attention_by_rounds if sequential_rounds else _lsh_attention_recomputed
    with jax.named_scope("lsh_attention"):
        out = core(spec, qk, v, lax.stop_gradient(buckets), dropout_rng, key_mask)
    return out.astype(v.dtype)


def lsh_attention_reference(qk: jax.Array, v: jax.Array, buckets: jax.Array, *, chunk_len: int,
                            n_chunks_before: int = 1, causal: bool = True, n_chunks_after: int = 0,
                            key_mask: Optional[jax.Array] = None, n_buckets: Optional[Buckets] = None) -> jax.Array:
    """The same computation as `lsh_attention` with given buckets, differentiated by plain autodiff.

    For tests and for reading: it is what the custom_vjp must agree with. With a key_mask, `n_buckets` names the
    extra bucket of padded positions (`with_pad_bucket`).
    """
    if key_mask is not None:
        if n_buckets is None:
            raise ValueError("lsh_attention_reference: a key_mask needs n_buckets (padded positions go to bucket "
                             "total_buckets(n_buckets)).")
        buckets = with_pad_bucket(buckets, key_mask, n_buckets)
    spec = _LSHSpec(chunk_len=chunk_len, n_chunks_before=n_chunks_before, causal=causal, dropout_rate=0.0,
                    n_chunks_after=n_chunks_after)
    return _lsh_attend(spec, qk, v, buckets, jax.random.key(0), key_mask).astype(v.dtype)
