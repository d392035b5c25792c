"""Evaluating a trained language model: per-token log-probabilities, the future's influence, honest LSH scores.

LSH attention never puts weight on a later position, but which earlier keys share a query's chunk depends on the
buckets of every token, later ones included (hashing sees the whole sequence at once), so an
LSH model's log-probability at position i can move when a later token changes. Two measurements make a
comparison with a full-attention Transformer honest:

- `future_influence`: replace every token after a split position and see how far the log-probabilities of the
  targets at or before the split move (zero for a causal full-attention model up to rounding).
- `truncated_log_probs`: score position p with every later token masked as padding. Padded positions go to
  their own bucket and are sorted behind every real one (reformer_jax.kernels.padding), so the real positions' chunks,
  and hence the score at p, depend on tokens 0..p only: an evaluation that cannot see the future.

Shapes: tokens, targets [b, l] int32; log-probabilities [b, l] float32 (nats).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from reformer_jax.model.config import ModelConfig
from reformer_jax.sharding import global_batch
from reformer_jax.model.reformer_lm import ReformerLM

LOG2 = math.log(2)


@functools.partial(jax.jit, static_argnums=(0,))
def token_scores(config: ModelConfig, params: Any, tokens: jax.Array, targets: jax.Array, rng: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """(log p(targets[b, i] | tokens[b, :i + 1]) in nats, argmax == target as 0/1), each [b, l] float32.

    Deterministic (no dropout); `rng` draws the hash rotations of LSH layers; `attention_mask` [b, l] marks real
    tokens (1) and padding (0)."""
    logits = ReformerLM(config).apply({"params": params}, tokens, deterministic=True, attention_mask=attention_mask,
                                      rngs={"lsh": rng}).astype(jnp.float32)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return log_probs, (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


def token_log_probs(config: ModelConfig, params: Any, tokens, targets, rng: jax.Array,
                    attention_mask=None) -> np.ndarray:
    """log p(targets[b, i] | tokens[b, :i + 1]) [b, l] in nats (see `token_scores`)."""
    return np.asarray(token_scores(config, params, tokens, targets, rng, attention_mask)[0])


def future_influence(config: ModelConfig, params: Any, tokens: np.ndarray, targets: np.ndarray,
                     other_tokens: np.ndarray, split: int, rng: jax.Array) -> Dict[str, float]:
    """How much the log-probabilities of positions 0..split move when every token after `split` is replaced.

    tokens, targets [b, l]: sequences and their next tokens; other_tokens [b, l]: where the replacement tokens
    come from. Positions 0..split keep their inputs and are scored on their original targets in both runs. Returns
    mean and max |delta log p| in nats over those positions, the mean signed change in bits per character (negative:
    the changed future made the past look more likely) and the fraction of positions that moved by more than 1e-5.
    """
    if not 0 <= split < tokens.shape[1] - 1:
        raise ValueError(f"future_influence: split={split} must leave at least one later position to replace "
                         f"(0 <= split < {tokens.shape[1] - 1}).")
    changed = np.array(tokens, copy=True)
    changed[:, split + 1:] = other_tokens[:, split + 1:]
    before = token_log_probs(config, params, tokens, targets, rng)[:, :split + 1]
    after = token_log_probs(config, params, changed, targets, rng)[:, :split + 1]
    delta = after - before
    return {"mean_abs_delta_nats": float(np.mean(np.abs(delta))), "max_abs_delta_nats": float(np.max(np.abs(delta))),
            "mean_delta_bpc": float(-np.mean(delta) / LOG2), "fraction_moved": float(np.mean(np.abs(delta) > 1e-5)),
            "positions": int(delta.size)}


def _scored_rows(tokens: np.ndarray, positions: np.ndarray, rows_per_call: int):
    """Batches of (sequence index, column in positions, position): one forward pass per scored position, padded
    to `rows_per_call` rows by repeating the last one (a fixed shape: one compilation)."""
    rows = [(b, j, int(p)) for b in range(positions.shape[0]) for j, p in enumerate(positions[b])]
    for start in range(0, len(rows), rows_per_call):
        batch = rows[start:start + rows_per_call]
        yield batch, batch + [batch[-1]] * (rows_per_call - len(batch))


def truncated_log_probs(config: ModelConfig, params: Any, tokens: np.ndarray, targets: np.ndarray,
                        positions: np.ndarray, rng: jax.Array, rows_per_call: int = 8) -> np.ndarray:
    """log p(targets[b, p] | tokens[b, :p + 1]) [b, n] for positions [b, n], each computed with every token after
    p masked as padding, so no later token reaches the score through the LSH buckets (one forward pass per scored
    position, `rows_per_call` at a time)."""
    if positions.ndim != 2 or positions.shape[0] != tokens.shape[0]:
        raise ValueError(f"truncated_log_probs: positions must be [batch, n]; got {positions.shape} for tokens "
                         f"{tokens.shape}.")
    if positions.size and not (0 <= positions.min() and positions.max() < tokens.shape[1]):
        raise ValueError(f"truncated_log_probs: positions must lie in [0, {tokens.shape[1]}).")
    out = np.zeros(positions.shape, np.float32)
    for scored, padded in _scored_rows(tokens, positions, rows_per_call):
        b, _, p = (np.array(column) for column in zip(*padded))
        masks = (np.arange(tokens.shape[1])[None, :] <= p[:, None]).astype(np.int32)
        log_probs = token_log_probs(config, params, tokens[b], targets[b], rng, masks)
        for k, (row, column, position) in enumerate(scored):
            out[row, column] = log_probs[k, position]
    return out


def sample_positions(length: int, per_sequence: int, n_sequences: int, seed: int) -> np.ndarray:
    """[n_sequences, per_sequence] distinct positions drawn uniformly from [0, length), sorted per sequence."""
    if not 0 < per_sequence <= length:
        raise ValueError(f"sample_positions: per_sequence={per_sequence} must lie in [1, {length}].")
    rng = np.random.default_rng(seed)
    return np.sort(np.stack([rng.choice(length, per_sequence, replace=False) for _ in range(n_sequences)]), axis=1)


def honest_bpc(config: ModelConfig, params: Any, tokens: np.ndarray, targets: np.ndarray, positions: np.ndarray,
               rng: jax.Array, rows_per_call: int = 8) -> Dict[str, float]:
    """Bits per character at sampled positions, scored as usual (whole sequence) and with the future masked.

    Returns {"bpc": whole-sequence score, "truncated_bpc": future masked, "difference": truncated - whole,
    "positions": number scored}; both on the same positions, so the difference is paired.
    """
    whole = token_log_probs(config, params, tokens, targets, rng)
    whole = np.take_along_axis(whole, positions, axis=1)
    truncated = truncated_log_probs(config, params, tokens, targets, positions, rng, rows_per_call)
    bpc, truncated_bpc = -float(np.mean(whole)) / LOG2, -float(np.mean(truncated)) / LOG2
    return {"bpc": bpc, "truncated_bpc": truncated_bpc, "difference": truncated_bpc - bpc,
            "positions": int(positions.size)}


def evaluate_batches(eval_fn: Callable, params: Any, batches: Iterable[Dict[str, np.ndarray]],
                     keys: Callable[[int], jax.Array], sharding: Any = None) -> Dict[str, float]:
    """Weighted means over `batches` of eval_fn(params, batch, keys(i)) -> {"loss", "accuracy", "tokens"} (the
    jitted `step.eval_step`, or a built step's `evaluate`): {"loss" (nats per token), "bpc", "accuracy",
    "tokens"}. With a `sharding`, batch i is this process's rows of the global batch laid out by it."""
    totals = {"loss": 0.0, "accuracy": 0.0, "tokens": 0.0}
    for i, batch in enumerate(batches):
        if sharding is not None:
            batch = global_batch(batch, sharding)
        metrics = jax.device_get(eval_fn(params, batch, keys(i)))
        weight = float(metrics["tokens"])
        totals["loss"] += float(metrics["loss"]) * weight
        totals["accuracy"] += float(metrics["accuracy"]) * weight
        totals["tokens"] += weight
    tokens = max(totals["tokens"], 1.0)
    loss = totals["loss"] / tokens
    return {"loss": loss, "bpc": loss / LOG2, "accuracy": totals["accuracy"] / tokens, "tokens": totals["tokens"]}
