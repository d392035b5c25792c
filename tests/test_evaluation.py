"""reformer_jax.training.evaluation: the future's influence and the truncated (future-masked) score."""

import jax
import numpy as np
import pytest

from reformer_jax import ModelConfig
from reformer_jax.model.reformer_lm import ReformerLM, init_params
from reformer_jax.training import evaluation

LENGTH = 64


def _config(model: str) -> ModelConfig:
    return ModelConfig.preset(model, vocab_size=32, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=LENGTH,
                              chunk_len=8, n_hashes=2, dropout=0.0)


def _tokens(seed: int, batch: int = 2):
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, 32, size=(batch, LENGTH + 1)).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


@pytest.fixture(scope="module")
def models():
    return {name: (_config(name), init_params(_config(name), jax.random.key(0))) for name in ("transformer", "lsh")}


def test_full_attention_past_does_not_move_when_the_future_changes(models):
    config, params = models["transformer"]
    tokens, targets = _tokens(1)
    other, _ = _tokens(2)
    moved = evaluation.future_influence(config, params, tokens, targets, other, split=31, rng=jax.random.key(3))
    assert moved["positions"] == 2 * 32
    assert moved["max_abs_delta_nats"] < 1e-5


def test_lsh_past_moves_when_the_future_changes_but_not_when_masked(models):
    config, params = models["lsh"]
    tokens, targets = _tokens(1)
    other, _ = _tokens(2)
    moved = evaluation.future_influence(config, params, tokens, targets, other, split=31, rng=jax.random.key(3))
    assert moved["max_abs_delta_nats"] > 1e-4  # the buckets of later tokens reach earlier positions
    # With the future masked, replacing it changes nothing at the scored positions.
    positions = np.array([[5, 20, 31], [0, 17, 31]])
    changed = tokens.copy()
    changed[:, 32:] = other[:, 32:]
    first = evaluation.truncated_log_probs(config, params, tokens, targets, positions, jax.random.key(3), 4)
    second = evaluation.truncated_log_probs(config, params, changed, targets, positions, jax.random.key(3), 4)
    np.testing.assert_array_equal(first, second)


def test_truncated_score_equals_the_whole_score_for_full_attention(models):
    config, params = models["transformer"]
    tokens, targets = _tokens(4)
    positions = evaluation.sample_positions(LENGTH, 5, 2, seed=0)
    scores = evaluation.honest_bpc(config, params, tokens, targets, positions, jax.random.key(0), rows_per_call=4)
    assert scores["positions"] == 10
    assert abs(scores["difference"]) < 1e-4 * scores["bpc"]
    whole = evaluation.token_log_probs(config, params, tokens, targets, jax.random.key(0))
    np.testing.assert_allclose(-np.take_along_axis(whole, positions, 1).mean() / np.log(2), scores["bpc"], rtol=1e-6)


def test_evaluate_batches_weights_tokens(models):
    config, params = models["lsh"]
    tokens, targets = _tokens(5)
    rng = jax.random.fold_in(jax.random.key(0), 0)  # batch 0's hashing key
    # Targets chosen from the model's own logits: of the 20 weighted positions, exactly 7 are predicted right.
    logits = np.asarray(ReformerLM(config).apply({"params": params}, tokens, rngs={"lsh": rng}))
    predicted = logits.argmax(-1)
    targets = np.where(predicted == targets, (targets + 1) % config.vocab_size, targets)
    targets[0, :4], targets[1, 3:6] = predicted[0, :4], predicted[1, 3:6]
    weights = np.zeros(tokens.shape, np.float32)
    weights[:, :10] = 1.0
    scores = evaluation.evaluate_batches(config, params, [{"inputs": tokens, "targets": targets,
                                                           "weights": weights}], jax.random.key(0))
    log_probs = evaluation.token_log_probs(config, params, tokens, targets, rng)
    np.testing.assert_allclose(scores["loss"], -log_probs[:, :10].mean(), rtol=1e-5)
    assert scores["accuracy"] == pytest.approx(7 / 20)


def test_bad_positions_are_refused(models):
    config, params = models["lsh"]
    tokens, targets = _tokens(1)
    with pytest.raises(ValueError, match="positions must lie in"):
        evaluation.truncated_log_probs(config, params, tokens, targets, np.array([[LENGTH], [0]]), jax.random.key(0))
    with pytest.raises(ValueError, match="split=63"):
        evaluation.future_influence(config, params, tokens, targets, tokens, split=LENGTH - 1, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="per_sequence=0"):
        evaluation.sample_positions(LENGTH, 0, 1, seed=0)
