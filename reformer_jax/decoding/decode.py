"""Prefill and the one-token decode step of a ReformerLM, on its own parameters (no new Flax module).

prefill: the prompts [b, P] (right-padded; row i holds lengths[i] real tokens) run through the same blocks as the
  model's forward pass (`layers.attention_block`, `layers.feed_forward_block`, `output_head.head_logits`), layer by
  layer; each layer's cache (`reformer_jax.decoding.cache`) is filled from its input, and the next-token logits at
  each row's last real position come back.
step: one token per row at its own position -> that position's next-token logits, each layer reading and
  writing its cache: full attention over the cached keys up to its position (a block at a time), local attention
  over the ring buffer of its look-back window, LSH attention over the positions of the newest token's chunk in
  every hash round (`cache.chunk_positions`, Hugging Face's cached LSH attention). A reversible stack runs forward only: y1 = x1 + F(x2), y2 = x2 + G(y1).
  `step` handles one sequence; `generation` maps it over the batch with jax.vmap.

Both take the config from `cache.decode_config` (bucket counts fixed, no dropout).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from reformer_jax.decoding import cache as cache_lib
from reformer_jax.kernels import output_head
from reformer_jax.kernels.full import MASK_VALUE, SELF_MASK_VALUE, normalize_keys
from reformer_jax.kernels.lsh import lsh_buckets, total_buckets
from reformer_jax.kernels.reversible import to_grid
from reformer_jax.model import layers
from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import PositionalEmbedding, layer_period, output_head_spec

Params = Dict[str, Any]
Caches = List[cache_lib.Cache]
# Cached positions a full-attention step reads at a time (`_attend_prefix`): per token it reads the blocks up to its
# position, so at most this many positions past it.
FULL_BLOCK = 512


def layer_params(config: ModelConfig, params: Params, i: int):
    """Layer i's (attention parameters, feed-forward parameters), sliced from the stacked tree."""
    kind = config.layer_types[i]
    attention = params["layers"]["attention"]
    if layer_period(config.layer_types) > 1:  # mixed stacks keep {type: that type's layers stacked}
        attention, j = attention[kind], config.layer_types[:i].count(kind)
    else:
        j = i
    pick = lambda tree, index: jax.tree.map(lambda leaf: leaf[index], tree)  # noqa: E731
    return pick(attention, j), pick(params["layers"]["feed_forward"], i)


def lsh_layer_index(config: ModelConfig, i: int) -> int:
    """Layer i's index among the LSH layers (the first axis of the rotations)."""
    return config.layer_types[:i].count("lsh")


def position_table(config: ModelConfig, params: Params) -> jax.Array:
    """The positional embedding of every position: [max_len, d] float32."""
    table = PositionalEmbedding(config).apply({"params": params["positions"]}, config.max_len)
    return table.astype(jnp.float32)


def head_params(config: ModelConfig, params: Params) -> output_head.HeadParams:
    return {"norm": {"scale": params["final_norm_scale"], "bias": params["final_norm_bias"]},
            "kernel": params["embed"].T if config.tie_embeddings else params["head_kernel"],
            "bias": params["head_bias"]}


def _project(config: ModelConfig, h: jax.Array, w: jax.Array) -> jax.Array:
    """h [..., d] @ w [d, heads, k] -> [..., heads, k] float32 (in the compute dtype, as the forward pass)."""
    dtype = config.compute_dtype
    return jnp.einsum("...d,dhk->...hk", h.astype(dtype), w.astype(dtype)).astype(jnp.float32)


def _normed(config: ModelConfig, attn_params: Params, x: jax.Array) -> jax.Array:
    return layers.layer_norm(x, attn_params["norm"], config.layer_norm_eps).astype(config.compute_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Prefill (batched)


def _ring(values: jax.Array, lengths: jax.Array, width: int) -> jax.Array:
    """The ring buffer of each row's last `width` positions: [b, P, ...] -> [b, width, ...], position q in slot
    q % width (slots of positions before 0 hold position 0's values; the step never reads them)."""
    slots = jnp.arange(width)
    last = lengths[:, None] - 1
    held = last - jnp.mod(last - slots[None, :], width)  # [b, width]
    held = jnp.clip(held, 0, values.shape[1] - 1)
    return jnp.take_along_axis(values, held.reshape(held.shape + (1,) * (values.ndim - 2)), axis=1)


def _filled(rows: jax.Array, cache_len: int, axis: int) -> jax.Array:
    """rows [..., P, ...] placed at the start of a zero array of cache_len positions along `axis`."""
    shape = list(rows.shape)
    shape[axis] = cache_len
    return lax.dynamic_update_slice_in_dim(jnp.zeros(shape, rows.dtype), rows, 0, axis)


def _prefill_cache(config: ModelConfig, kind: str, attn_params: Params, x: jax.Array, lengths: jax.Array,
                   buckets: Optional[jax.Array], cache_len: int) -> cache_lib.Cache:
    """One layer's cache from its input x [b, P, d] (and, LSH, the forward pass's bucket ids [b, h, r, P])."""
    h = _normed(config, attn_params, x)
    head_major = lambda rows: jnp.swapaxes(rows, 1, 2)  # noqa: E731  [b, P, h, k] -> [b, h, P, k]
    if kind == "local":
        keys = _project(config, h, attn_params["k"]) / jnp.sqrt(jnp.float32(config.d_head))
        width = cache_lib.local_window(config)
        return {"keys": head_major(_ring(keys, lengths, width)),
                "values": head_major(_ring(_project(config, h, attn_params["v"]), lengths, width))}
    cache = {"keys": _filled(head_major(normalize_keys(_project(config, h, attn_params["qk"]))), cache_len, 2),
             "values": _filled(head_major(_project(config, h, attn_params["v"])), cache_len, 2)}
    if kind == "lsh":
        early = cache_lib.early_positions(config, cache_len)
        cache.update(early_keys=cache["keys"][:, :, :early], early_values=cache["values"][:, :, :early])
        n_b = total_buckets(config.n_buckets)
        dtype = cache_lib.cache_shapes(config, "lsh", 1)["buckets"][1]
        # Padded positions carry the padding bucket n_b; they are outside the index and overwritten later.
        ids = _filled(jnp.minimum(buckets, n_b - 1).astype(dtype), cache_len, 3)
        index = jax.vmap(lambda ids_b, n: cache_lib.new_bucket_index(ids_b, n, n_b))(ids, lengths)
        cache.update(index, buckets=ids)
    return cache


def _residual_update(cfg: ModelConfig, streams, f: jax.Array, feed_forward):
    """One layer's residual update, as the model's forward pass makes it: the reversible pair (y1 = x1 + F,
    y2 = x2 + G(y1), block outputs on the exact-reversal grid) or x + F, then + G. f: the attention block's output."""
    if cfg.reversible:
        y1 = streams[0] + to_grid(f, cfg.grid_bits)
        return y1, streams[1] + to_grid(feed_forward(y1), cfg.grid_bits)
    streams = streams + f
    return streams + feed_forward(streams)


def prefill(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
            rotations: Optional[jax.Array], cache_len: int):
    """Run the prompts through the model once and fill every layer's cache.

    tokens [b, P] int32, right-padded (P: a length the model's forward pass accepts); lengths [b] real tokens per
    row (>= 1); rotations [LSH layers, h, k, r, sum(n_b factors) / 2] (None without LSH layers).
    Returns (caches: one dict per layer with a leading b axis, logits [b, V] float32 at each row's last position).
    """
    cfg = config
    b, length = tokens.shape
    mask = jnp.arange(length)[None, :] < lengths[:, None]
    placeholder = jax.random.key(0)  # no dropout, and hashing uses the given rotations
    x = jnp.take(params["embed"], tokens, axis=0).astype(jnp.float32) + position_table(cfg, params)[:length]
    streams = (to_grid(x, cfg.grid_bits),) * 2 if cfg.reversible else x
    caches: Caches = []
    for i, kind in enumerate(cfg.layer_types):
        attn_params, ff_params = layer_params(cfg, params, i)
        x_in = streams[1] if cfg.reversible else streams
        f, buckets = layers.attention_block(
            attn_params, x_in, config=cfg, lsh_rng=placeholder, dropout_rng=placeholder, deterministic=True,
            attention_type=kind, rotations=rotations[lsh_layer_index(cfg, i)] if kind == "lsh" else None,
            attention_mask=mask, grid_bits=cfg.grid_bits)
        caches.append(_prefill_cache(cfg, kind, attn_params, x_in, lengths, buckets, cache_len))
        feed_forward = lambda y: layers.feed_forward_block(  # noqa: E731
            ff_params, y, config=cfg, dropout_rng=placeholder, deterministic=True)
        streams = _residual_update(cfg, streams, f, feed_forward)
    last = lambda s: jnp.take_along_axis(s, (lengths - 1)[:, None, None], axis=1)  # noqa: E731 [b, 1, d]
    streams = tuple(map(last, streams)) if cfg.reversible else last(streams)
    return caches, output_head.head_logits(head_params(cfg, params), streams, output_head_spec(cfg))[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# One decode step (one sequence)


def _softmax_attend(dots: jax.Array, values: jax.Array, pattern: str) -> jax.Array:
    return jnp.einsum(pattern, jax.nn.softmax(dots, axis=-1), values)


def _write(cache: jax.Array, position: jax.Array, row: jax.Array) -> jax.Array:
    """cache [h, n, k] with row [h, k] at `position`: a dynamic-update-slice, which XLA updates in place in the
    decode loop (an .at[].set scatter became a select over the whole cache and a copy of it per step)."""
    return lax.dynamic_update_slice_in_dim(cache, row[:, None, :].astype(cache.dtype), position, axis=1)


def _attend_all(qk, keys, values, position):
    """Shared-QK attention of one query [h, k] to keys, values [h, n, k] at positions 0 .. n - 1, of which those
    after `position` are masked and its own gets the self-mask score."""
    seen = jnp.arange(keys.shape[1])
    dots = jnp.einsum("hk,hlk->hl", qk, keys)
    dots = jnp.where(seen > position, MASK_VALUE, jnp.where(seen == position, SELF_MASK_VALUE, dots))
    return _softmax_attend(dots, values, "hl,hlk->hk")


def _attend_prefix(qk, keys, values, position, block: Optional[int] = None):
    """`_attend_all` reading only the cached positions up to `position`, `block` (default FULL_BLOCK) at a time:
    qk [h, k], keys, values [h, L, k] -> [h, k].

    A loop over the blocks up to the one holding `position` (a softmax carried across blocks by its running
    maximum and sum), so a step's cost follows the context, not the cache's length L. Positions after `position`
    score MASK_VALUE, which adds exactly 0 as in `_attend_all`. Where block does not divide L the last block starts
    at L - block instead, and the positions it shares with the block before it are left out of it.
    """
    length = keys.shape[1]
    block = min(FULL_BLOCK if block is None else block, length)

    def add_block(i, carry):
        top, total, acc = carry
        start = jnp.minimum(i * block, length - block)
        seen = start + jnp.arange(block)
        dots = jnp.einsum("hk,hbk->hb", qk, lax.dynamic_slice_in_dim(keys, start, block, axis=1))
        dots = jnp.where(seen > position, MASK_VALUE, jnp.where(seen == position, SELF_MASK_VALUE, dots))
        dots = jnp.where(seen < i * block, -jnp.inf, dots)  # already read by the block before
        new_top = jnp.maximum(top, jnp.max(dots, axis=-1))
        scale, weights = jnp.exp(top - new_top), jnp.exp(dots - new_top[:, None])
        acc = acc * scale[:, None] + jnp.einsum("hb,hbk->hk", weights,
                                                lax.dynamic_slice_in_dim(values, start, block, axis=1))
        return new_top, total * scale + jnp.sum(weights, axis=-1), acc

    heads = qk.shape[0]
    init = (jnp.full((heads,), -jnp.inf, jnp.float32), jnp.zeros((heads,), jnp.float32),
            jnp.zeros((heads, values.shape[-1]), jnp.float32))
    _, total, acc = lax.fori_loop(0, position // block + 1, add_block, init)
    return acc / total[:, None]


def _full_step(config, attn_params, cache, h, position):
    """Shared-QK attention of the newest position to every cached one up to it. h [d] -> ([h, k], cache)."""
    qk, v = _project(config, h, attn_params["qk"]), _project(config, h, attn_params["v"])
    keys, values = _write(cache["keys"], position, normalize_keys(qk)), _write(cache["values"], position, v)
    return _attend_prefix(qk, keys, values, position), {"keys": keys, "values": values}


def _local_step(config, attn_params, cache, h, position):
    """Local attention of the newest position to its look-back window in the ring buffer."""
    width = cache["keys"].shape[1]
    q = _project(config, h, attn_params["q"])
    k = _project(config, h, attn_params["k"]) / jnp.sqrt(jnp.float32(config.d_head))
    slot = position % width
    keys, values = _write(cache["keys"], slot, k), _write(cache["values"], slot, _project(config, h, attn_params["v"]))
    held = position - jnp.mod(position - jnp.arange(width), width)  # the position each slot holds
    c = config.local_chunk_len
    start = jnp.maximum(0, (position // c - config.local_n_chunks_before) * c)
    dots = jnp.where(held >= start, jnp.einsum("hk,hwk->hw", q, keys), MASK_VALUE)
    return _softmax_attend(dots, values, "hw,hwk->hk"), {"keys": keys, "values": values}


def _lsh_step(config, attn_params, cache, h, position, full_until, rotations):
    """LSH attention of the newest position, hashed with the prefill's rotations [h, k, r, f / 2].

    Up to position `full_until` it attends to every position instead (Hugging Face does while it has no buckets
    cached: prompts no longer than a chunk, until the sequence reaches a chunk); those positions are <= chunk_len,
    the cache's early_keys / early_values.
    """
    qk, v = _project(config, h, attn_params["qk"]), _project(config, h, attn_params["v"])
    keys, values = _write(cache["keys"], position, normalize_keys(qk)), _write(cache["values"], position, v)
    # The first positions also live in small arrays of their own: read from the big cache, XLA copied all of it
    # at every step (to keep it for the read while writing it in place).
    here = (jnp.arange(cache["early_keys"].shape[1]) == position)[None, :, None]
    early_keys = jnp.where(here, normalize_keys(qk)[:, None], cache["early_keys"])
    early_values = jnp.where(here, v[:, None], cache["early_values"])
    new_buckets = lsh_buckets(qk[None, :, None, :], None, n_hashes=config.n_hashes, n_buckets=config.n_buckets,
                              rotations=rotations)[0, :, :, 0]  # [h, r]
    index = {name: cache[name] for name in ("prev", "next", "first", "last", "counts")}
    index, buckets = cache_lib.insert(index, cache["buckets"], new_buckets, position)
    window = cache_lib.chunk_positions(index, buckets, new_buckets, position, chunk_len=config.chunk_len,
                                       n_chunks_before=config.n_chunks_before)  # [h, r, W]
    heads = jnp.arange(qk.shape[0])[:, None, None]
    dots = jnp.einsum("hk,hrwk->hrw", qk, keys[heads, window])
    dots = jnp.where(window == position, SELF_MASK_VALUE, dots)
    lse = jax.nn.logsumexp(dots, axis=-1)  # [h, r]
    per_round = jnp.einsum("hrw,hrwk->hrk", jnp.exp(dots - lse[..., None]), values[heads, window])
    out = jnp.einsum("hr,hrk->hk", jax.nn.softmax(lse, axis=-1), per_round)
    out = jnp.where(position <= full_until, _attend_all(qk, early_keys, early_values, position), out)
    return out, {"keys": keys, "values": values, "early_keys": early_keys, "early_values": early_values,
                 "buckets": buckets, **index}


def _attention_output(config: ModelConfig, kind: str, o: jax.Array, w_out: jax.Array) -> jax.Array:
    """o [h, k] @ out [h, k, d] -> [d] float32; on a reversible grid with per-head attention each head's share is
    rounded on its own, as the forward pass adds them."""
    dtype = config.compute_dtype
    shares = jnp.einsum("hk,hkd->hd", o.astype(dtype), w_out.astype(dtype)).astype(jnp.float32)
    if config.sequential_heads and config.grid_bits and kind != "local":
        return jnp.sum(to_grid(shares, config.grid_bits), axis=0)
    return jnp.einsum("hk,hkd->d", o.astype(dtype), w_out.astype(dtype)).astype(jnp.float32)


def step(config: ModelConfig, params: Params, caches: Caches, token: jax.Array, position: jax.Array,
         full_until: jax.Array, rotations: Optional[jax.Array], positions: jax.Array):
    """One sequence's next token: token and position int32 scalars -> (caches, logits [V] float32).

    full_until: see `_lsh_step` (-1: never); rotations as for `prefill`; positions: `position_table`.
    """
    cfg = config
    x = jnp.take(params["embed"], token, axis=0).astype(jnp.float32) + positions[position]
    streams = (to_grid(x, cfg.grid_bits),) * 2 if cfg.reversible else x
    new_caches: Caches = []
    for i, kind in enumerate(cfg.layer_types):
        attn_params, ff_params = layer_params(cfg, params, i)
        x_in = streams[1] if cfg.reversible else streams
        h = _normed(cfg, attn_params, x_in)
        if kind == "local":
            o, layer_cache = _local_step(cfg, attn_params, caches[i], h, position)
        elif kind == "full":
            o, layer_cache = _full_step(cfg, attn_params, caches[i], h, position)
        else:
            o, layer_cache = _lsh_step(cfg, attn_params, caches[i], h, position, full_until,
                                       rotations[lsh_layer_index(cfg, i)])
        new_caches.append(layer_cache)
        f = _attention_output(cfg, kind, o, attn_params["out"])
        feed_forward = lambda y: layers.feed_forward_block(  # noqa: E731
            ff_params, y[None, None], config=cfg, dropout_rng=jax.random.key(0), deterministic=True)[0, 0]
        streams = _residual_update(cfg, streams, f, feed_forward)
    as_rows = lambda s: s[None, None]  # noqa: E731
    streams = tuple(map(as_rows, streams)) if cfg.reversible else as_rows(streams)
    return new_caches, output_head.head_logits(head_params(cfg, params), streams, output_head_spec(cfg))[0, 0]


def prefill_length(config: ModelConfig, longest: int, hf_compatible: bool) -> int:
    """The padded prompt length P the prefill runs at for prompts of at most `longest` tokens.

    LSH models pad as Hugging Face does (to a multiple of the chunk lengths' least common multiple; the padding
    changes which chunk the first ones look back to, so it must match); others round up to a multiple of 128 too,
    so prompts of many lengths share one compiled prefill (causal attention never sees the padding)."""
    chunks = [c for kind, c in (("lsh", config.chunk_len), ("local", config.local_chunk_len)) if config.uses(kind)]
    multiple = math.lcm(*chunks) if chunks else 1
    padded = -(-longest // multiple) * multiple
    if not hf_compatible:
        coarse = -(-longest // math.lcm(multiple, 128)) * math.lcm(multiple, 128)
        if coarse <= config.max_len:
            padded = coarse
    return padded


def hf_full_until(config: ModelConfig, length: int) -> int:
    """The last position at which an LSH layer attends to every position (Hugging Face's cached decoding before it
    has buckets: its prefill hashes only prompts longer than a chunk after padding, and a step hashes the cache
    once the sequence reaches a chunk); -1: never."""
    chunks = [c for kind, c in (("lsh", config.chunk_len), ("local", config.local_chunk_len)) if config.uses(kind)]
    multiple, shortest = math.lcm(*chunks), min(chunks)
    padded = -(-length // multiple) * multiple if (length % multiple and length > shortest) else length
    if padded > config.chunk_len:
        return -1
    return max(length, config.chunk_len - 1)


def full_until_per_row(config: ModelConfig, lengths: Sequence[int]) -> List[int]:
    return [hf_full_until(config, n) if config.uses("lsh") else -1 for n in lengths]
