"""reformer_jax.training.evaluation: the future's influence and the truncated (future-masked) score."""

import functools

import jax
import numpy as np
import pytest

from reformer_jax import ModelConfig
from reformer_jax.model.reformer_lm import ReformerLM, init_params
from reformer_jax.training import evaluation
from reformer_jax.training.step import eval_step

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
    eval_fn = jax.jit(functools.partial(eval_step, config=config))
    scores = evaluation.evaluate_batches(eval_fn, params, [{"inputs": tokens, "targets": targets, "weights": weights}],
                                         lambda i: jax.random.fold_in(jax.random.key(0), i))
    log_probs = evaluation.token_log_probs(config, params, tokens, targets, rng)
    np.testing.assert_allclose(scores["loss"], -log_probs[:, :10].mean(), rtol=1e-5)
    assert scores["accuracy"] == pytest.approx(7 / 20)


def _numpy_scores(logits, targets, weights):
    """Weighted sums of float64 numpy cross-entropy (nats) and argmax accuracy of logits [b, l, V]."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return np.array([(nll * weights).sum(), ((logits.argmax(-1) == targets) * weights).sum(), weights.sum()])


def test_validation_scores_are_numpy_cross_entropy_of_the_models_logits(models):
    """The loop's validation (`loop.evaluate` over the built step's `evaluate`, as main.py and evaluate score a
    run; batch i hashed with key(seed + 10_000 + i)) and `evaluation.evaluate_batches` with other keys (batch i
    hashed with fold_in(rng, i)): loss, accuracy and bits per character of three weighted batches equal a float64 numpy
    cross-entropy of `ReformerLM(config).apply`'s logits under the same hash keys, to 1e-5."""
    import math

    from reformer_jax import sharding
    from reformer_jax.training import loop
    from reformer_jax.training.step_builder import build_train_step

    class Batches:  # a dataset whose validation batches are `batches`
        def __init__(self, batches):
            self.batches = batches

        def batch(self, split, seed, i, batch_size, seq_len):
            return self.batches[i]

    config, params = models["lsh"]
    rng = np.random.default_rng(6)
    batches = []
    for i in range(3):
        tokens, targets = _tokens(10 + i)
        batches.append({"inputs": tokens, "targets": targets,
                        "weights": rng.choice([0.0, 0.5, 1.0], size=tokens.shape).astype(np.float32)})
    logits_fn = jax.jit(lambda tokens, key: ReformerLM(config).apply({"params": params}, tokens, deterministic=True,
                                                                     rngs={"lsh": key}))

    def expected(keys):
        sums = sum(_numpy_scores(logits_fn(b["inputs"], key), b["targets"], b["weights"])
                   for b, key in zip(batches, keys))
        loss = sums[0] / sums[2]
        return {"loss": loss, "accuracy": sums[1] / sums[2], "bpc": loss / math.log(2), "tokens": sums[2]}

    seed = 3
    mesh = sharding.make_mesh(sharding.MeshShape(), jax.devices()[:1])
    got = loop.evaluate(build_train_step(config, mesh=mesh).evaluate, params, Batches(batches),
                        loop.TrainOptions(workdir="unused", seed=seed, eval_batches=3, batch_size=2, seq_len=batches[0]["inputs"].shape[1]),
                        sharding.batch_sharding(mesh))
    want = expected([jax.random.key(seed + 10_000 + i) for i in range(3)])
    for name in ("loss", "accuracy", "bpc", "tokens"):
        assert got[f"val_{name}"] == pytest.approx(want[name], rel=1e-5), name
    rng_key = jax.random.key(seed)
    got = evaluation.evaluate_batches(jax.jit(functools.partial(eval_step, config=config)), params, batches,
                                      lambda i: jax.random.fold_in(rng_key, i))
    want = expected([jax.random.fold_in(rng_key, i) for i in range(3)])
    for name in ("loss", "accuracy", "bpc", "tokens"):
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    # The hash keys matter (an LSH model): other keys give another loss than the reference's.
    assert abs(expected([jax.random.key(99 + i) for i in range(3)])["loss"] / want["loss"] - 1) > 1e-4


def test_bad_positions_are_refused(models):
    config, params = models["lsh"]
    tokens, targets = _tokens(1)
    with pytest.raises(ValueError, match="positions must lie in"):
        evaluation.truncated_log_probs(config, params, tokens, targets, np.array([[LENGTH], [0]]), jax.random.key(0))
    with pytest.raises(ValueError, match="split=63"):
        evaluation.future_influence(config, params, tokens, targets, tokens, split=LENGTH - 1, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="per_sequence=0"):
        evaluation.sample_positions(LENGTH, 0, 1, seed=0)


def test_evaluate_describes_an_entry_by_its_models_head():
    from reformer_jax.evaluate import describe

    entry = {"step": 3, "data": "the test split of my labelled file", "n_hashes": 2, "tokens": 200, "loss": 1.5,
             "accuracy": 0.25, "bpc": None, "copy_task": True}
    assert "(200 examples): accuracy 0.2500" in describe({**entry, "head": "classification"})
    assert "of the copied symbols" in describe({**entry, "head": "lm"})
