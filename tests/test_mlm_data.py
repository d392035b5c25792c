"""Masked-LM data: BERT's corruption of byte ids (rate, 80/10/10 split, pads never chosen, targets kept) and masked
text batches that are a pure function of (seed, split, step)."""

import numpy as np
import pytest

from reformer_jax.training import data


def _text_batch(rows=64, length=512, seed=0):
    """Byte ids [rows, length] with a pad tail in every other row and an eos and a bos in each row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(data.BYTE_OFFSET, data.BYTE_VOCAB_SIZE, (rows, length))
    tokens[::2, -100:] = data.PAD_ID
    tokens[:, 0], tokens[:, 1] = data.BOS_ID, data.EOS_ID
    return tokens


def _within(count, n, p, sds=4.0):
    """count is within `sds` binomial standard deviations of n * p."""
    return abs(count - n * p) < sds * np.sqrt(n * p * (1 - p))


def test_the_mask_id_follows_the_byte_vocabulary():
    assert data.MASK_ID == 259 == data.BYTE_VOCAB_SIZE and data.MLM_VOCAB_SIZE == 260


def test_rate_and_the_80_10_10_split_match_bert():
    tokens = _text_batch()
    batch = data.mask_tokens(tokens, 0)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": (tokens.shape, np.int32), "targets": (tokens.shape, np.int32), "weights": (tokens.shape, np.float32)}
    text = tokens >= data.BYTE_OFFSET
    chosen = batch["weights"] > 0
    assert set(np.unique(batch["weights"])) == {0.0, 1.0}
    assert _within(chosen.sum(), text.sum(), 0.15)  # 29,440 text positions
    inputs, targets = batch["inputs"][chosen], tokens[chosen]
    m = chosen.sum()
    masked = inputs == data.MASK_ID
    replaced = ~masked & (inputs != targets)
    assert _within(masked.sum(), m, 0.8)
    assert _within(replaced.sum(), m, 0.1 * 255 / 256)  # a random byte draws the original 1 time in 256
    assert _within((inputs == targets).sum(), m, 0.1 + 0.1 / 256)
    assert np.all((inputs[replaced] >= data.BYTE_OFFSET) & (inputs[replaced] < data.BYTE_VOCAB_SIZE))
    # a higher rate chooses proportionally more
    assert _within((data.mask_tokens(tokens, 1, rate=0.5)["weights"] > 0).sum(), text.sum(), 0.5)


def test_pads_and_specials_are_never_chosen_and_unchosen_positions_are_untouched():
    tokens = _text_batch()
    for seed in range(3):
        batch = data.mask_tokens(tokens, seed, rate=0.9)
        special = tokens < data.BYTE_OFFSET
        assert special.sum() == 32 * 100 + 64 * 2
        assert not batch["weights"][special].any()
        chosen = batch["weights"] > 0
        assert np.array_equal(batch["inputs"][~chosen], tokens[~chosen])
        assert np.array_equal(batch["targets"], tokens)  # targets are the original ids everywhere


def test_masking_is_a_pure_function_of_its_seed():
    tokens = _text_batch(rows=8, length=64)
    a, b = data.mask_tokens(tokens, 7), data.mask_tokens(tokens, np.random.default_rng(7))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["weights"], data.mask_tokens(tokens, 8)["weights"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(rate=0.0), r"^rate=0.0 is not a masking rate; use a fraction in \(0, 1\]"),
    (dict(rate=1.5), r"^rate=1.5 is not a masking rate"),
    (dict(tokens=np.full((2, 4), data.MASK_ID)), r"^tokens hold ids from 259 to 259; .* in \[0, 259\)"),
    (dict(tokens=np.zeros(4, np.int64)), r"^tokens of shape \(4,\) .* expected integers \[batch, length\]"),
])
def test_bad_arguments_are_refused(kwargs, match):
    tokens = kwargs.pop("tokens", _text_batch(rows=2, length=8))
    with pytest.raises(data.DataError, match=match):
        data.mask_tokens(tokens, 0, **kwargs)


def test_masked_text_batches_are_windows_of_the_text_and_a_pure_function_of_seed_and_step():
    text = data.TextData.from_tokens(data.encode("the quick brown fox jumps over the lazy dog. " * 200), 64,
                                     source="pangrams")
    task = data.MaskedText(text)
    batch = task.batch("train", seed=3, step=5, batch_size=16, seq_len=64)
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (16, 64)
    assert np.array_equal(batch["targets"], text.batch("train", 3, 5, 16, 64)["inputs"])  # the LM windows, unshifted
    assert (batch["inputs"] == data.MASK_ID).any() and batch["weights"].sum() > 0
    again = task.batch("train", seed=3, step=5, batch_size=16, seq_len=64)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    later = task.batch("train", seed=3, step=6, batch_size=16, seq_len=64)
    assert not np.array_equal(batch["weights"], later["weights"])
    validation = task.batch("validation", seed=3, step=5, batch_size=16, seq_len=64)
    stream = text.validation.tobytes()
    assert all(row.astype(text.validation.dtype).tobytes() in stream for row in validation["targets"])
    assert task.source == "pangrams" and task.origin is None
    with pytest.raises(data.DataError, match=r"^rate=2 is not a masking rate"):
        data.MaskedText(text, rate=2)
