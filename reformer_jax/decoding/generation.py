"""generate: prompts -> new tokens, by a prefill and a decode loop that runs on the device (`lax.while_loop`).

The loop's state (every layer's cache, the logits, each row's position, the tokens so far) has static shapes
sized by the model's max_len, and the number of steps is an argument, not a shape: the loop compiles once per
(model, batch size) and serves every prompt length, every max_new_tokens and every sampling setting, and a caller
can run it a few steps at a time to stream the text (`on_tokens`). The prefill compiles once per padded prompt
length (`decode.prefill_length`).

Sampling: greedy (argmax), or softmax(logits / temperature) restricted to the top_k tokens and to the smallest set
whose probability reaches top_p. A generation draws its LSH hash rotations once, from `rng`, and hashes the prompt
and every new token with them (all rows of a batch share them).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from reformer_jax.kernels.lsh import random_rotations
from reformer_jax.model.config import ModelConfig
from reformer_jax.decoding import cache as cache_lib
from reformer_jax.decoding import decode

Prompts = Union[Sequence[Sequence[int]], np.ndarray]


class GenerateError(ValueError):
    """An argument generate cannot use; the message names it, its value and what would work."""


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(logits: jax.Array, key: jax.Array, greedy: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Next tokens [b] from logits [b, V]; every setting is an array, so one compilation serves them all.
    top_k 0 keeps every token; top_p 1 keeps every token."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    descending = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    descending = jnp.where(descending >= kth, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    kept = (before < top_p) & (descending >= kth)
    threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
    drawn = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# The compiled pieces


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(config: ModelConfig, params, tokens, lengths, rotations, cache_len: int):
    return decode.prefill(config, params, tokens, lengths, rotations, cache_len)


def _decode_steps(config: ModelConfig, params, state: Dict[str, Any], n_steps: jax.Array, sampling: Dict[str, Any]):
    """Run n_steps (a traced int) steps of: pick each row's next token from state["logits"] (sampled, or
    state["forced"][:, t] where sampling["forced"]), record it and its log-probability, and feed it through
    `decode.step`. The state's arrays keep their shapes, so this compiles once."""
    positions = decode.position_table(config, params)
    one_row = functools.partial(decode.step, config, params)
    if state["tokens"].shape[0] == 1:
        # One row: its caches are carried without a batch axis (`Generation`), so XLA updates them in place; a
        # reshape between the loop's carry and the step made it copy every cache at every step.
        def row_step(caches, token, position, full_until, rotations, positions):
            caches, logits = one_row(caches, token[0], position[0], full_until[0], rotations, positions)
            return caches, logits[None]
    else:
        row_step = jax.vmap(one_row, in_axes=(0, 0, 0, 0, None, None))

    def body(state):
        t = state["t"]
        sampled = sample_tokens(state["logits"], jax.random.fold_in(state["rng"], t), sampling["greedy"],
                                sampling["temperature"], sampling["top_k"], sampling["top_p"])
        token = jnp.where(sampling["forced"], state["forced"][:, t], sampled)
        # The token's log-probability under the tempered distribution it is drawn from (before top-k / top-p cut
        # it down); greedy and forced decoding run at temperature 1: the model's own log-probability.
        tempered = state["logits"] / sampling["temperature"]
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(tempered, axis=-1), token[:, None], axis=-1)[:, 0]
        caches, logits = row_step(state["caches"], token, state["position"], state["full_until"],
                                  state["rotations"], positions)
        write = lambda name, value: {name: state[name].at[:, t].set(value, mode="promise_in_bounds")}  # noqa: E731
        recorded = write("all_logits", state["logits"]) if "all_logits" in state else {}
        return {**state, **recorded, **write("tokens", token), **write("log_probs", log_prob), "caches": caches,
                "logits": logits, "position": state["position"] + 1, "t": t + 1}

    end = state["t"] + n_steps
    return lax.while_loop(lambda s: s["t"] < end, body, state)


_decode_steps_jit = jax.jit(_decode_steps, static_argnums=(0,), donate_argnums=(2,))


def decode_step_compilations() -> int:
    """How many times the decode loop has been compiled in this process (for tests)."""
    return _decode_steps_jit._cache_size()


# ---------------------------------------------------------------------------------------------------------------
# The API


def _as_prompt_rows(prompts: Prompts) -> List[np.ndarray]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        prompts = [prompts]
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not rows:
        raise GenerateError("prompts=[] is empty: pass at least one prompt of at least one token.")
    return rows


def check_decoder(config: ModelConfig, what: str = "the model") -> None:
    """GenerateError unless `config` is a causal language model: an encoder (`reformer_jax.model.heads`) sees the
    tokens after each position, so it has no next-token distribution to decode from."""
    if config.head != "lm" or not config.causal:
        kind = "a masked-LM encoder" if config.head == "lm" else f"a bidirectional {config.head.replace('_', '-')} model"
        raise GenerateError(f"{what} is {kind}, not a causal language model: it cannot generate text (evaluate it "
                            "instead).")


def check_arguments(config: ModelConfig, prompts: Prompts, max_new_tokens: int, temperature: float,
                    top_k: Optional[int], top_p: Optional[float], greedy: bool) -> List[np.ndarray]:
    """The prompts as int arrays; GenerateError (one line) for anything that cannot be generated."""
    check_decoder(config)
    rows = _as_prompt_rows(prompts)
    for i, row in enumerate(rows):
        if row.size == 0:
            raise GenerateError(f"prompt {i} is empty: a prompt needs at least one token (e.g. a newline).")
        if row.min() < 0 or row.max() >= config.vocab_size:
            raise GenerateError(f"prompt {i} holds token ids outside [0, {config.vocab_size}) (vocab_size).")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={max_new_tokens!r} is invalid: expected a positive integer.")
    if not greedy and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                       or not temperature > 0):
        raise GenerateError(f"temperature={temperature!r} is invalid: expected a number > 0 (for the most likely "
                            "token at every step use greedy decoding instead: greedy=True).")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise GenerateError(f"top_k={top_k!r} is invalid: expected a positive integer, or None for every token.")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise GenerateError(f"top_p={top_p!r} is invalid: expected a probability in (0, 1], or None for 1.")
    longest = max(row.size for row in rows)
    if longest + max_new_tokens > config.max_len:
        raise GenerateError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} is "
                            f"{longest + max_new_tokens} positions, more than the model's max_len={config.max_len}; "
                            f"shorten the prompt or generate at most {max(config.max_len - longest, 0)} tokens.")
    return rows


def _rotations(config: ModelConfig, key: jax.Array, given: Optional[jax.Array]) -> Optional[jax.Array]:
    """Hash rotations of every LSH layer, [LSH layers, h, k, r, f / 2]: drawn once per generation."""
    if not config.uses("lsh"):
        return None
    if given is not None:
        return jnp.asarray(given, jnp.float32)
    keys = jax.random.split(key, config.layer_types.count("lsh"))
    return jnp.stack([random_rotations(k, n_heads=config.n_heads, d_head=config.d_head, n_hashes=config.n_hashes,
                                       n_buckets=config.n_buckets) for k in keys])


class Generation:
    """One batch of prompts being continued: `advance(n)` runs n more steps of the on-device loop.

    tokens() / log_probs(): [b, steps so far] of the new tokens and their log-probabilities: log_softmax of the
    logits divided by the temperature (before top-k or top-p); at temperature 1, greedy or forced, the model's own.
    With keep_logits, logits() [b, steps, V]: the logits each token was picked from (a [b, max_len, V] buffer, and
    a compilation of its own).
    """

    def __init__(self, config: ModelConfig, params, rows: List[np.ndarray], *, rng: jax.Array,
                 lsh_rotations=None, forced: Optional[np.ndarray] = None, keep_logits: bool = False):
        self.config = cfg = cache_lib.decode_config(config)
        self.params = params
        lengths = np.array([row.size for row in rows], np.int32)
        hf_compatible = cfg.uses("lsh")
        padded = decode.prefill_length(cfg, int(lengths.max()), hf_compatible)
        if padded > cfg.max_len:
            raise GenerateError(f"prompts of {lengths.max()} tokens pad to {padded} positions (a multiple of the "
                                f"chunk lengths), more than max_len={cfg.max_len}; shorten the prompts.")
        tokens = np.zeros((len(rows), padded), np.int32)
        for i, row in enumerate(rows):
            tokens[i, :row.size] = row
        rotation_key, self._sample_key = jax.random.split(rng)
        rotations = _rotations(cfg, rotation_key, lsh_rotations)
        caches, logits = _prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), rotations, cfg.max_len)
        b = len(rows)
        if b == 1:  # carried without the batch axis (see `_decode_steps`)
            caches = jax.tree.map(lambda x: x[0], caches)
        self.state = {"caches": caches, "logits": logits, "position": jnp.asarray(lengths), "t": jnp.int32(0),
                      "tokens": jnp.zeros((b, cfg.max_len), jnp.int32),
                      "log_probs": jnp.zeros((b, cfg.max_len), jnp.float32),
                      "forced": jnp.zeros((b, cfg.max_len), jnp.int32) if forced is None else
                      jnp.asarray(np.pad(forced, ((0, 0), (0, cfg.max_len - forced.shape[1])))),
                      "full_until": jnp.asarray(decode.full_until_per_row(cfg, lengths.tolist()), jnp.int32),
                      "rotations": rotations if rotations is not None else jnp.zeros((0,), jnp.float32),
                      "rng": self._sample_key}
        if keep_logits:
            self.state["all_logits"] = jnp.zeros((b, cfg.max_len, cfg.vocab_size), jnp.float32)
        self.lengths = lengths
        self.steps = 0
        self._sampling = None

    def set_sampling(self, *, greedy: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
                     forced: bool = False) -> None:
        self._sampling = {"greedy": jnp.asarray(greedy), "temperature": jnp.float32(temperature if not greedy else 1.0),
                          "top_k": jnp.int32(top_k or 0), "top_p": jnp.float32(1.0 if top_p is None else top_p),
                          "forced": jnp.asarray(forced)}

    def advance(self, n_steps: int) -> np.ndarray:
        """Generate n_steps more tokens per row; returns them, [b, n_steps]."""
        start = self.steps
        self.state = _decode_steps_jit(self.config, self.params, self.state, jnp.int32(n_steps), self._sampling)
        self.steps += n_steps
        return np.asarray(self.state["tokens"][:, start:self.steps])

    def tokens(self) -> np.ndarray:
        return np.asarray(self.state["tokens"][:, :self.steps])

    def log_probs(self) -> np.ndarray:
        return np.asarray(self.state["log_probs"][:, :self.steps])

    def logits(self) -> np.ndarray:
        return np.asarray(self.state["all_logits"][:, :self.steps])


def generate(config: ModelConfig, params, prompts: Prompts, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, greedy: bool = False,
             rng: jax.Array, return_log_probs: bool = False, lsh_rotations=None,
             on_tokens: Optional[Callable[[np.ndarray], None]] = None, stream_every: int = 32,
             eos_id: Optional[int] = None, pad_id: int = 0):
    """Continue each prompt by max_new_tokens tokens.

    Args:
      config, params: a ReformerLM's config and its parameters (the "params" collection).
      prompts: a list of token-id sequences (lengths may differ) or one 1-D array.
      max_new_tokens: tokens to generate per prompt; prompt length + max_new_tokens must fit in max_len.
      temperature: > 0; divides the logits before sampling. Greedy decoding is `greedy=True` (temperature <= 0
        is refused rather than read as greedy).
      top_k: sample among the k most likely tokens (None: all). top_p: among the most likely tokens whose
        probabilities add up to top_p, in (0, 1] (None: 1).
      greedy: pick the most likely token (temperature, top_k and top_p are then ignored).
      rng: a jax.random key: the hash rotations of LSH layers and every sampling draw come from it.
      return_log_probs: also return each new token's log-probability ([b, max_new_tokens]): log_softmax of the
        logits divided by `temperature` (before top_k / top_p); greedy decoding: the model's own.
      lsh_rotations: explicit hash rotations [LSH layers, h, k, n_hashes, sum(n_buckets factors) / 2] instead of
        drawing them (e.g. those of another implementation).
      on_tokens: called with each new block of tokens [b, n] as it is generated (the loop then runs
        `stream_every` steps per call on the device).
      eos_id: stop a row at this id (it is kept; the row's later tokens are `pad_id`, log-probabilities 0, as
        Hugging Face's generate fills finished rows), and stop decoding once every row has stopped (checked every
        `stream_every` steps).

    Returns tokens [b, max_new_tokens] int32 (and log-probabilities [b, max_new_tokens] float32).
    Raises GenerateError (before anything is compiled) for an argument it cannot use.
    """
    rows = check_arguments(config, prompts, max_new_tokens, temperature, top_k, top_p, greedy)
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise GenerateError(f"eos_id={eos_id} is outside the vocabulary [0, {config.vocab_size}).")
    generation = Generation(config, params, rows, rng=rng, lsh_rotations=lsh_rotations)
    generation.set_sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    if on_tokens is None and eos_id is None:
        generation.advance(max_new_tokens)
        tokens, log_probs = generation.tokens(), generation.log_probs()
    else:
        finished = np.zeros(len(rows), bool)
        while generation.steps < max_new_tokens and not finished.all():
            start = generation.steps
            generation.advance(min(stream_every, max_new_tokens - start))
            tokens, _ = _padded_after_eos(generation.tokens(), generation.log_probs(), eos_id, pad_id)
            finished = (tokens == eos_id).any(axis=1)
            if on_tokens is not None:
                on_tokens(tokens[:, start:])
        missing = max_new_tokens - generation.steps  # every row stopped early: the rest is padding
        tokens, log_probs = _padded_after_eos(np.pad(generation.tokens(), ((0, 0), (0, missing)),
                                                     constant_values=pad_id),
                                              np.pad(generation.log_probs(), ((0, 0), (0, missing))), eos_id, pad_id)
    return (tokens, log_probs) if return_log_probs else tokens


def _padded_after_eos(tokens: np.ndarray, log_probs: np.ndarray, eos_id: Optional[int], pad_id: int):
    """tokens, log_probs [b, n] with every position strictly after a row's first eos set to pad_id (log-prob 0)."""
    if eos_id is None:
        return tokens, log_probs
    after = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
    return np.where(after, pad_id, tokens), np.where(after, 0.0, log_probs)


def score(config: ModelConfig, params, tokens: np.ndarray, *, rng: jax.Array, prefix: int = 1,
          lsh_rotations=None) -> np.ndarray:
    """log p(tokens[:, i] | tokens[:, :i]) for i >= prefix by cached decoding (the first `prefix` tokens are the
    prefill): tokens [b, l] int -> [b, l - prefix] float32 nats."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or not 1 <= prefix < tokens.shape[1] or tokens.shape[1] > config.max_len:
        raise GenerateError(f"score: tokens must be [batch, length] with 1 <= prefix={prefix} < length <= max_len="
                            f"{config.max_len}; got shape {tokens.shape}.")
    generation = Generation(config, params, list(tokens[:, :prefix]), rng=rng, lsh_rotations=lsh_rotations,
                            forced=tokens[:, prefix:])
    generation.set_sampling(greedy=True, temperature=1.0, top_k=None, top_p=None, forced=True)
    generation.advance(tokens.shape[1] - prefix)
    return generation.log_probs()
