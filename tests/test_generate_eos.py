"""Generation stops at the end-of-sequence id: a row keeps its tokens up to and including the first eos and is
padded after it (log-probability 0), as Hugging Face's generate fills finished rows; decoding ends once every row
has stopped."""

import numpy as np
import pytest

import jax

from reformer_jax.decoding import generation as gen
from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import init_params

CONFIG = ModelConfig(attention="full", d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=96, dropout=0.0,
                     vocab_size=40)


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, jax.random.key(4))
    prompts = [np.array([5, 9, 11, 3]), np.array([7, 2, 30, 30, 8, 1, 4])]
    free, free_log_probs = gen.generate(CONFIG, params, prompts, max_new_tokens=40, greedy=True, rng=jax.random.key(0),
                                        return_log_probs=True)
    return params, prompts, free, free_log_probs


def test_rows_stop_at_their_first_eos_and_are_padded_after_it(model):
    params, prompts, free, free_log_probs = model
    eos = int(free[0, 6])  # a token the first row emits at step 7
    first = [int(np.flatnonzero(row == eos)[0]) if (row == eos).any() else None for row in free]
    tokens, log_probs = gen.generate(CONFIG, params, prompts, max_new_tokens=40, greedy=True, rng=jax.random.key(0),
                                     return_log_probs=True, eos_id=eos, pad_id=0, stream_every=8)
    assert tokens.shape == free.shape
    for row, stop in enumerate(first):
        end = free.shape[1] if stop is None else stop + 1
        np.testing.assert_array_equal(tokens[row, :end], free[row, :end])
        np.testing.assert_allclose(log_probs[row, :end], free_log_probs[row, :end], rtol=1e-6)
        assert (tokens[row, end:] == 0).all() and (log_probs[row, end:] == 0).all()


def test_decoding_ends_once_every_row_has_stopped(model):
    params, prompts, free, _ = model
    eos = int(free[0, 2])
    stop = int(np.flatnonzero(free[0] == eos)[0])  # <= 2
    blocks = []
    gen.generate(CONFIG, params, prompts[:1], max_new_tokens=40, greedy=True, rng=jax.random.key(0), eos_id=eos,
                 stream_every=4, on_tokens=blocks.append)
    assert len(blocks) == 1  # one block of 4 steps, not 10
    np.testing.assert_array_equal(blocks[0][0, :stop + 1], free[0, :stop + 1])
    assert (blocks[0][0, stop + 1:] == 0).all()


def test_an_eos_outside_the_vocabulary_is_refused(model):
    params, prompts, _, _ = model
    with pytest.raises(gen.GenerateError, match="eos_id=40 is outside the vocabulary"):
        gen.generate(CONFIG, params, prompts, max_new_tokens=4, greedy=True, rng=jax.random.key(0), eos_id=40)
