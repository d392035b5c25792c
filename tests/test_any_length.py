"""Texts of any length are scored whole: the last window is padded and masked, and scores as the same text would
unpadded."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import init_params
from reformer_jax.training import data
from reformer_jax.training import step as train


def test_every_target_is_scored_once_and_only_the_padded_batch_carries_a_mask():
    tokens = np.arange(3, 3 + 100)
    batches = list(data.consecutive_batches(tokens, batch_size=2, seq_len=16))
    assert sum(float(b["weights"].sum()) for b in batches) == 99
    scored = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    np.testing.assert_array_equal(scored, tokens[1:])
    assert ["attention_mask" in b for b in batches] == [False, False, False, True]
    last = batches[-1]
    assert last["attention_mask"][0].sum() == 99 - 6 * 16 and last["attention_mask"][1].all()  # row 1: unused
    with pytest.raises(data.DataError, match="too few to score"):
        list(data.consecutive_batches(tokens[:1], batch_size=2, seq_len=16))


@pytest.mark.parametrize("attention", ["full", "local"])
def test_a_padded_masked_window_scores_as_the_text_alone(attention):
    config = ModelConfig(attention=attention, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=64, dropout=0.0,
                         local_chunk_len=16)
    params = init_params(config, jax.random.key(0))
    tokens = np.random.default_rng(1).integers(3, config.vocab_size, 49)  # 48 targets: 3 local chunks exactly
    [padded] = list(data.consecutive_batches(tokens, batch_size=1, seq_len=64))
    assert "attention_mask" in padded
    exact = {"inputs": tokens[None, :-1], "targets": tokens[None, 1:], "weights": np.ones((1, 48), np.float32)}
    score = jax.jit(lambda p, b: train.eval_step(p, b, jax.random.key(0), config=config))
    got, expected = score(params, padded), score(params, exact)
    assert float(got["tokens"]) == 48
    np.testing.assert_allclose(float(got["loss"]), float(expected["loss"]), rtol=1e-6)
    assert float(got["accuracy"]) == float(expected["accuracy"])


@pytest.mark.parametrize("layers", [("lsh", "lsh"), ("local", "lsh")])
def test_forward_pads_any_length_and_masks_the_padding(layers):
    """A length off the chunk grid gives the logits of the same tokens padded by hand and masked; the real tokens'
    logits do not depend on what the padding holds."""
    from reformer_jax.model.reformer_lm import ReformerLM

    config = ModelConfig(attn_layers=layers, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_len=64, chunk_len=8,
                         local_chunk_len=8, n_hashes=2, n_buckets=4, dropout=0.0)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, config.vocab_size, (2, 29)))
    assert config.padded_length(29) == 32
    rngs = {"lsh": jax.random.key(5)}
    logits = ReformerLM(config).apply({"params": params}, tokens, rngs=rngs)
    assert logits.shape == (2, 29, config.vocab_size)
    for filler in (0, 7):
        by_hand = jnp.pad(tokens, ((0, 0), (0, 3)), constant_values=filler)
        mask = jnp.arange(32)[None] < 29
        expected = ReformerLM(config).apply({"params": params}, by_hand, attention_mask=jnp.broadcast_to(mask, (2, 32)),
                                            rngs=rngs)[:, :29]
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="longer than the model's ModelConfig.max_len=64"):
        config.padded_length(65)
