"""Autoregressive sampling from a trained ReformerLM, for the text samples main.py prints."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import ReformerLM


def sampling_window(config: ModelConfig, seq_len: int, limit: int = 512) -> int:
    """Context the sampler re-reads for every token: at most `limit` positions, a valid model length."""
    window = min(seq_len, limit)
    if config.uses("lsh"):
        window = max(config.chunk_len, window - window % config.chunk_len)
    return window


@functools.partial(jax.jit, static_argnums=(0,))
def next_token(config: ModelConfig, params, buffer: jax.Array, position: jax.Array, rng: jax.Array,
                temperature: jax.Array) -> jax.Array:
    """Sample the token at `position` from the logits at position - 1. buffer [1, window] int32."""
    hash_rng, draw_rng = jax.random.split(rng)
    logits = ReformerLM(config).apply({"params": params}, buffer, rngs={"lsh": hash_rng})
    last = jax.lax.dynamic_index_in_dim(logits[0], position - 1, axis=0, keepdims=False)
    return jax.random.categorical(draw_rng, last / temperature)


def sample(config: ModelConfig, params, prompt: np.ndarray, *, length: int, window: int, rng: jax.Array,
           temperature: float = 0.8) -> np.ndarray:
    """Continue `prompt` (int tokens, non-empty) by `length` tokens; returns only the new tokens.

    The model re-reads a fixed window (later positions padded, which causal attention never sees); when the
    window is full it slides by half.
    """
    prompt = np.asarray(prompt, np.int32)[-(window // 2):]
    if prompt.size == 0:
        raise ValueError("sample: the prompt must hold at least one token.")
    buffer = np.zeros((1, window), np.int32)
    buffer[0, :prompt.size] = prompt
    position, out = prompt.size, []
    for i in range(length):
        if position == window:
            buffer[0, :window // 2] = buffer[0, window // 2:]
            buffer[0, window // 2:] = 0
            position = window // 2
        token = int(next_token(config, params, jnp.asarray(buffer), jnp.int32(position),
                                jax.random.fold_in(rng, i), jnp.float32(temperature)))
        buffer[0, position] = token
        position += 1
        out.append(token)
    return np.asarray(out, np.int32)
