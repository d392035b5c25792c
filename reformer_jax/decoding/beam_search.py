"""beam_search: prompts -> the most likely continuation found by beam search, scored as Hugging Face's
`generate(num_beams=N, do_sample=False)` scores it with its default settings (length_penalty 1.0, early_stopping
False).

Every prompt keeps num_beams running hypotheses, b * num_beams rows of the cached decoder (`decode.step` on the
caches `generation.Generation`'s prefill fills, repeated per beam). At each step:

  1. every running beam's score (its summed log-probabilities) plus log_softmax of its logits ranks
     num_beams * V continuations; the best 2 * num_beams are candidates;
  2. a candidate ending in eos, or reaching max_new_tokens, is finished: among the first num_beams candidates,
     those enter the prompt's num_beams best finished hypotheses, scored by summed log-probability / length
     (generated tokens, eos included);
  3. the best num_beams unfinished candidates run on: every cache, position and token history is gathered from
     the row of the beam each one extends (a gather along the row axis), and their newest tokens go through
     `decode.step`;
  4. a prompt is done once its best running score / current length cannot beat the worst of num_beams finished
     hypotheses (Hugging Face's heuristic for early_stopping=False); decoding ends when every prompt is done or
     at max_new_tokens.

The best finished hypothesis is each prompt's answer; the positions after its eos hold pad_id. The loop runs on
the device (`lax.while_loop`) over state of static shapes sized by max_len; max_new_tokens, eos_id and pad_id are
values, not shapes: it compiles once per (model, number of prompts, num_beams) and serves every prompt length.
num_beams=1 keeps one beam, which picks what greedy decoding picks and stops at eos as it does.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from reformer_jax.model.config import ModelConfig
from reformer_jax.decoding import decode
from reformer_jax.decoding.generation import GenerateError, Generation, Prompts, check_arguments

# Hugging Face's stand-in for "impossible" in beam scores: added to the scores of hypotheses that may not be kept.
_EXCLUDED = -1.0e9
LENGTH_PENALTY = 1.0  # Hugging Face's default: a finished hypothesis scores sum(log-probabilities) / length ** 1.0


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [b, n, ...] at index [b, m] along the beam axis -> [b, m, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _select(state: Dict[str, Any], log_probs: jax.Array, n_new: jax.Array, eos_id: jax.Array) -> Dict[str, Any]:
    """One step of beam selection, on the beam arrays of `state` (b prompts, n beams, histories of N positions).

    log_probs [b, n, V]: each running beam's next-token log-probabilities. Returns the running beams' new
    histories, scores and the beam each extends ("source" [b, n]), the finished hypotheses, and whether each
    prompt may still improve."""
    b, n, vocab = log_probs.shape
    t = state["t"]
    candidates, flat = lax.top_k((log_probs + state["running_scores"][:, :, None]).reshape(b, n * vocab), 2 * n)
    source, token = flat // vocab, flat % vocab  # [b, 2n]
    histories = _gather_beams(state["running"], source).at[:, :, t].set(token)  # [b, 2n, N]
    stopped = (token == eos_id) | (t + 1 >= n_new)

    # Running on: the best n candidates that have not stopped.
    kept_scores = candidates + jnp.where(stopped, _EXCLUDED, 0.0)
    _, keep = lax.top_k(kept_scores, n)
    running_scores = _gather_beams(kept_scores, keep)

    # Finished: only the first n candidates count (the others exist so that n can run on); none once the prompt
    # cannot improve.
    just_finished = stopped & (jnp.arange(2 * n) < n)[None, :]
    finished_candidates = (candidates / jnp.float32((t + 1) ** LENGTH_PENALTY)
                           + jnp.where(state["may_improve"][:, None], 0.0, _EXCLUDED)
                           + jnp.where(just_finished, 0.0, _EXCLUDED))
    merged_scores = jnp.concatenate([state["finished_scores"], finished_candidates], axis=1)
    _, best = lax.top_k(merged_scores, n)
    finished = _gather_beams(jnp.concatenate([state["finished"], histories], axis=1), best)
    is_finished = _gather_beams(jnp.concatenate([state["is_finished"], just_finished], axis=1), best)
    finished_scores = _gather_beams(merged_scores, best)

    # Hugging Face's early_stopping=False heuristic: the best running beam, were it to stop at the next length,
    # against the worst finished hypothesis (while fewer than n have finished, anything improves).
    best_possible = running_scores[:, :1] / jnp.float32((t + 1) ** LENGTH_PENALTY)
    worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _EXCLUDED)
    may_improve = state["may_improve"] & jnp.any(best_possible > worst, axis=1)
    return {"running": _gather_beams(histories, keep), "running_scores": running_scores,
            "source": _gather_beams(source, keep), "finished": finished, "finished_scores": finished_scores,
            "is_finished": is_finished, "may_improve": may_improve, "any_runs_on": ~jnp.all(stopped)}


def _beam_steps(config: ModelConfig, params, state: Dict[str, Any], n_new: jax.Array, eos_id: jax.Array):
    """Beam search from the prefill's state to the end: at most n_new steps (a traced int). Rows are
    prompt-major (row i * n + j is prompt i's beam j); the arrays keep their shapes, so this compiles once per
    (config, b, n)."""
    positions = decode.position_table(config, params)
    row_step = jax.vmap(functools.partial(decode.step, config, params), in_axes=(0, 0, 0, 0, None, None))
    b, n = state["running_scores"].shape

    def body(state):
        log_probs = jax.nn.log_softmax(state["logits"], axis=-1).reshape(b, n, -1)
        selected = _select(state, log_probs, n_new, eos_id)
        rows = (jnp.arange(b)[:, None] * n + selected.pop("source")).reshape(-1)  # [b * n] the rows extended
        reorder = lambda tree: jax.tree.map(lambda x: x[rows], tree)  # noqa: E731
        position, full_until = reorder(state["position"]), reorder(state["full_until"])
        token = selected["running"][:, :, state["t"]].reshape(-1)
        caches, logits = row_step(reorder(state["caches"]), token, position, full_until, state["rotations"],
                                  positions)
        return {**state, **selected, "caches": caches, "logits": logits, "position": position + 1,
                "full_until": full_until, "t": state["t"] + 1}

    def going_on(state):
        return (state["t"] < n_new) & jnp.any(state["may_improve"]) & state["any_runs_on"]

    return lax.while_loop(going_on, body, state)


_beam_steps_jit = jax.jit(_beam_steps, static_argnums=(0,), donate_argnums=(2,))


def beam_search_compilations() -> int:
    """How many times the beam loop has been compiled in this process (for tests)."""
    return _beam_steps_jit._cache_size()


def beam_search(config: ModelConfig, params, prompts: Prompts, *, num_beams: int, max_new_tokens: int,
                rng: jax.Array, eos_id: Optional[int] = None, pad_id: int = 0, lsh_rotations=None,
                return_scores: bool = False):
    """Continue each prompt by the best of num_beams beams (Hugging Face's beam search, default settings).

    Args:
      config, params: a ReformerLM's config and its parameters (the "params" collection).
      prompts: a list of token-id sequences (lengths may differ) or one 1-D array.
      num_beams: hypotheses kept per prompt, >= 1 (1: what greedy decoding picks).
      max_new_tokens: at most this many new tokens per prompt; prompt length + max_new_tokens must fit max_len.
      rng: a jax.random key: the hash rotations of LSH layers come from it (as in `generate`).
      eos_id: a hypothesis ending in this id is finished; None: every hypothesis runs to max_new_tokens.
      pad_id: fills each answer after its eos.
      lsh_rotations: explicit hash rotations [LSH layers, h, k, n_hashes, sum(n_buckets factors) / 2] instead of
        drawing them (e.g. those of another implementation).
      return_scores: also return each answer's score: its summed log-probability / its length (eos included).

    Returns tokens [b, max_new_tokens] int32 (and scores [b] float32).
    Raises GenerateError (before anything is compiled) for an argument it cannot use.
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise GenerateError(f"num_beams={num_beams!r} is invalid: expected a positive integer (1 keeps one "
                            "hypothesis, as greedy decoding; 4 is common).")
    rows = check_arguments(config, prompts, max_new_tokens, 1.0, None, None, greedy=True)
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise GenerateError(f"eos_id={eos_id} is outside the vocabulary [0, {config.vocab_size}).")
    generation = Generation(config, params, rows, rng=rng, lsh_rotations=lsh_rotations)  # the prefill
    prefill, cfg = generation.state, generation.config
    b, n, max_len = len(rows), num_beams, cfg.max_len
    caches = prefill["caches"] if b > 1 else jax.tree.map(lambda x: x[None], prefill["caches"])
    per_beam = lambda tree: jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)  # noqa: E731 [b, ...] -> [b*n, ...]
    state = {"caches": per_beam(caches), "logits": per_beam(prefill["logits"]),
             "position": per_beam(prefill["position"]), "full_until": per_beam(prefill["full_until"]),
             "rotations": prefill["rotations"], "t": jnp.int32(0),
             "running": jnp.full((b, n, max_len), pad_id, jnp.int32),
             # Only the first beam starts live, so that the beams do not all pick the same first tokens.
             "running_scores": jnp.zeros((b, n), jnp.float32).at[:, 1:].set(_EXCLUDED),
             "finished": jnp.full((b, n, max_len), pad_id, jnp.int32),
             "finished_scores": jnp.full((b, n), _EXCLUDED, jnp.float32),
             "is_finished": jnp.zeros((b, n), bool), "may_improve": jnp.ones((b,), bool),
             "any_runs_on": jnp.asarray(True)}
    del generation, prefill
    state = _beam_steps_jit(cfg, params, state, jnp.int32(max_new_tokens),
                            jnp.int32(-1 if eos_id is None else eos_id))
    tokens = np.asarray(state["finished"][:, 0, :max_new_tokens])
    return (tokens, np.asarray(state["finished_scores"][:, 0])) if return_scores else tokens

