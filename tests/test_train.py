"""The real training step (the one main.py and the memory analysis use) learns a repeated pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import ModelConfig
from reformer_jax.training import step as train
from reformer_jax.training.step_builder import build_train_step


def pattern_batch(batch_size=4, seq_len=64, period=5, offset=3):
    """Sequences of the cycle offset, offset+1, ..., offset+period-1, each starting at a different phase."""
    starts = jnp.arange(batch_size)[:, None]
    tokens = offset + (starts + jnp.arange(seq_len + 1)[None, :]) % period
    return {"inputs": tokens[:, :-1].astype(jnp.int32), "targets": tokens[:, 1:].astype(jnp.int32),
            "weights": jnp.ones((batch_size, seq_len), jnp.float32)}


@pytest.mark.parametrize("name", ["reformer"])
def test_tiny_model_learns_a_repeated_pattern(name):
    cfg = ModelConfig.preset(name, vocab_size=16, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=64,
                             chunk_len=16, n_hashes=2, dropout=0.0)
    tx = train.make_optimizer("adamw", 3e-3, schedule_steps=40, warmup_steps=5)
    built = build_train_step(cfg, optimizer=tx)
    state, step = built.init(jax.random.key(0)), built.step
    batch, rng = pattern_batch(), jax.random.key(1)
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch, rng)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 40
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.25 * losses[0], losses
    eval_metrics = train.eval_step(state.params, batch, rng, config=cfg)
    assert float(eval_metrics["accuracy"]) > 0.9


def test_optimizer_names_are_checked():
    with pytest.raises(ValueError, match="optimizer='sgd' is unknown; expected one of 'adafactor', 'adamw'"):
        train.make_optimizer("sgd")


def test_step_keys_depend_only_on_seed_and_step():
    a = train._step_rngs(jax.random.key(0), jnp.int32(5))
    b = train._step_rngs(jax.random.key(0), jnp.int32(5))
    c = train._step_rngs(jax.random.key(0), jnp.int32(6))
    same = lambda x, y: bool(jnp.all(jax.random.key_data(x) == jax.random.key_data(y)))  # noqa: E731
    assert same(a["lsh"], b["lsh"]) and not same(a["lsh"], c["lsh"]) and not same(a["lsh"], a["dropout"])
