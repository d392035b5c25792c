"""Sampling draws from the distribution it names: softmax(logits / temperature), cut to the top_k tokens, then to the
smallest set of the (renormalised) survivors whose probability reaches top_p (Hugging Face's order); and the
log-probabilities generation returns are the model's own, log_softmax of the unscaled logits.

The empirical distribution of N draws is compared with a float64 numpy reference in total variation. Bound, at
failure probability DELTA per check: E[TV(p_hat, p)] <= 1/2 sum_i sqrt(p_i (1 - p_i) / N) (Jensen), and TV moves by at
most 1/N per draw, so TV(p_hat, p) <= that + sqrt(ln(1 / DELTA) / (2 N)) (McDiarmid). Every setting also checks that
the distributions a plausible mistake would draw from (temperature ignored, k + 1 or k - 1, one token more or fewer
in the top-p set, top-p on the distribution before the top-k cut) lie further from the right one than the two
bounds together, so each mistake fails the test with the same confidence.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax.decoding import generation as gen
from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import init_params

DRAWS = 100_000
DELTA = 1e-6
# Ten distinct logits in shuffled order (ranks must be found, not assumed); no ties at any cut below.
LOGITS = np.array([0.3, 2.0, -1.0, 1.0, 1.6, -0.5, 0.7, 0.0, 1.3, -2.0])


def reference(logits, temperature=1.0, top_k=None, top_p=None, p_before_top_k=False):
    """The sampling distribution, in float64 numpy. p_before_top_k: top_p measured on the untruncated softmax
    (a wrong order, for the separation checks)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    kept = np.zeros(z.size, bool)
    kept[order[:top_k or z.size]] = True
    if top_p is not None:
        measured = np.where(kept | p_before_top_k, np.exp(z - z.max()), 0.0)
        measured /= measured.sum()
        mass_before = np.cumsum(measured[order]) - measured[order]  # mass of the tokens ranked above each
        kept[order[mass_before >= top_p]] = False
    p = np.where(kept, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def tv_bound(p, n=DRAWS, delta=DELTA):
    """TV(empirical of n draws from p, p) stays below this with probability >= 1 - delta."""
    return 0.5 * float(np.sum(np.sqrt(p * (1 - p) / n))) + math.sqrt(math.log(1 / delta) / (2 * n))


def total_variation(p, q):
    return 0.5 * float(np.abs(p - q).sum())


@functools.partial(jax.jit, static_argnums=(0,))
def _draw(n, logits, key, temperature, top_k, top_p):
    rows = jnp.broadcast_to(logits.astype(jnp.float32), (n, logits.shape[-1]))
    return gen.sample_tokens(rows, key, jnp.asarray(False), temperature, top_k, top_p)


def empirical(logits, key, temperature=1.0, top_k=None, top_p=None):
    """Frequencies of DRAWS tokens drawn by `sample_tokens` (one vectorised call, one compilation for every
    setting: its arguments are arrays)."""
    tokens = _draw(DRAWS, jnp.asarray(logits), key, jnp.float32(temperature), jnp.int32(top_k or 0),
                   jnp.float32(1.0 if top_p is None else top_p))
    return np.bincount(np.asarray(tokens), minlength=len(logits)) / DRAWS


SETTINGS = {
    "temperature": dict(temperature=0.5),
    "top_k": dict(temperature=1.5, top_k=3),
    "top_p": dict(temperature=0.8, top_p=0.6),
    "top_k_then_top_p": dict(temperature=2.0, top_k=4, top_p=0.7),  # top-p cuts the top 4 to 3
}


def mistakes(setting):
    """The distributions a plausible mistake in `setting` would sample from."""
    wrong = {}
    if setting.get("temperature", 1.0) != 1.0:
        wrong["temperature ignored"] = reference(LOGITS, **{**setting, "temperature": 1.0})
    if setting.get("top_k"):
        wrong["k + 1"] = reference(LOGITS, **{**setting, "top_k": setting["top_k"] + 1})
        wrong["k - 1"] = reference(LOGITS, **{**setting, "top_k": setting["top_k"] - 1})
    if setting.get("top_p"):
        right = reference(LOGITS, **setting)
        order = np.argsort(-LOGITS)
        size = int(np.count_nonzero(right))
        for name, kept in (("one token fewer in the top-p set", size - 1), ("one token more", size + 1)):
            p = np.where(np.isin(np.arange(LOGITS.size), order[:kept]),
                         np.exp(LOGITS / setting.get("temperature", 1.0)), 0.0)
            wrong[name] = p / p.sum()
        if setting.get("top_k"):
            wrong["top-p before the top-k cut"] = reference(LOGITS, **setting, p_before_top_k=True)
    return wrong


@pytest.mark.parametrize("name", list(SETTINGS))
def test_draws_follow_the_temperature_top_k_top_p_distribution(name):
    setting = SETTINGS[name]
    expected = reference(LOGITS, **setting)
    bound = tv_bound(expected)
    wrong = mistakes(setting)
    assert wrong
    for mistake, q in wrong.items():  # the test separates every mistake from the right distribution
        assert total_variation(q, expected) > bound + tv_bound(q), (mistake, total_variation(q, expected), bound)
    got = empirical(LOGITS, jax.random.key(list(SETTINGS).index(name)), **setting)
    assert np.all(got[expected == 0] == 0), "a token outside the top-k / top-p set was drawn"
    assert total_variation(got, expected) < bound, (total_variation(got, expected), bound)


def test_the_reference_keeps_the_smallest_set_that_reaches_top_p():
    """The reference's own reading of top_p, on probabilities chosen by hand: 0.5, 0.3, 0.15, 0.05."""
    logits = np.log([0.15, 0.5, 0.05, 0.3])
    assert np.count_nonzero(reference(logits, top_p=0.5)) == 1  # 0.5 reaches 0.5
    assert np.count_nonzero(reference(logits, top_p=0.51)) == 2
    assert np.count_nonzero(reference(logits, top_p=0.81)) == 3
    np.testing.assert_allclose(reference(logits, top_p=0.81), np.array([0.15, 0.5, 0, 0.3]) / 0.95)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_generated_log_probs_are_the_log_softmax_of_the_scaled_logits():
    """`Generation.log_probs` (what `generate(..., return_log_probs=True)` returns): log_softmax of the logits each
    token was drawn from, divided by the temperature (before top-k), not of the unscaled logits."""
    config = ModelConfig(attention="full", d_model=32, n_heads=2, d_ff=64, n_layers=1, max_len=32, dropout=0.0)
    params = init_params(config, jax.random.key(7))
    prompts = [np.array([5, 9, 11]), np.array([7])]
    generation = gen.Generation(config, params, prompts, rng=jax.random.key(8), keep_logits=True)
    temperature, top_k = 0.5, 5
    generation.set_sampling(greedy=False, temperature=temperature, top_k=top_k, top_p=None)
    generation.advance(12)
    tokens, log_probs, logits = generation.tokens(), generation.log_probs(), generation.logits()
    picked = lambda table: np.take_along_axis(table, tokens[..., None], axis=-1)[..., 0]  # noqa: E731
    np.testing.assert_allclose(log_probs, picked(_log_softmax(logits / temperature)), rtol=0, atol=1e-5)
    unscaled = picked(_log_softmax(logits))
    assert np.max(np.abs(unscaled - log_probs)) > 1e-2  # the check above tells the two apart
    ranks = np.sum(logits > np.take_along_axis(logits, tokens[..., None], axis=-1), axis=-1)
    assert np.all(ranks < top_k)  # and each token was among the top 5
