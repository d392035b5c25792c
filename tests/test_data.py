"""Byte tokens, corpus discovery and checksums, the 90/10 split, pure-by-step batches, the copy task."""

import hashlib

import numpy as np
import pytest

from reformer_jax.training import data


def test_bytes_round_trip_with_offset_and_specials():
    tokens = data.encode("Héllo\n")
    assert tokens.dtype == np.int32 and tokens.min() >= 3 and tokens.max() < 259
    assert tokens[0] == ord("H") + 3 and len(tokens) == len("Héllo\n".encode("utf-8"))
    assert data.decode(np.concatenate([[data.BOS_ID], tokens, [data.EOS_ID, data.PAD_ID]])) == "Héllo\n"
    assert data.decode(data.encode_bytes(b"\xff\xfeok")) == "\ufffd\ufffdok"  # non-UTF-8 input is fine


def test_explicit_missing_path_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(data.DataError, match=r"TrainOptions.data_path=.*nope.txt does not exist"):
        data.load_dataset("tiny_shakespeare", seq_len=8, data_path=str(tmp_path / "nope.txt"))
    with pytest.raises(data.DataError, match="is not a regular file"):
        data.tiny_shakespeare(str(tmp_path))


def test_packaged_copy_is_the_default_and_checked_by_sha256():
    raw, source = data.tiny_shakespeare(None)
    assert len(raw) == 1_115_394 and hashlib.sha256(raw).hexdigest() == data.TINY_SHAKESPEARE_SHA256
    assert "packaged" in source
    corpus = data.load_dataset("tiny_shakespeare", seq_len=8)
    assert len(corpus.train) + len(corpus.validation) == len(raw) and corpus.source == source


def test_a_damaged_packaged_copy_is_refused(monkeypatch):
    real = data.packaged_tiny_shakespeare()
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(real + b"!").hexdigest())
    with pytest.raises(data.DataError, match="the packaged tiny Shakespeare has sha256"):
        data.load_dataset("tiny_shakespeare", seq_len=8)


def test_an_explicit_path_wins_and_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    payload = b"To be, or not to be\n" * 100
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    good = tmp_path / data.TINY_SHAKESPEARE_FILE
    good.write_bytes(payload)
    corpus = data.load_dataset("tiny_shakespeare", seq_len=8, data_path=str(good))
    assert corpus.source == str(good) and len(corpus.train) + len(corpus.validation) == len(payload)
    damaged = tmp_path / "damaged.txt"
    damaged.write_bytes(payload[:-1] + b"?")  # one byte differs
    with pytest.raises(data.DataError) as err:
        data.load_dataset("tiny_shakespeare", seq_len=8, data_path=str(damaged))
    message = str(err.value)
    assert f"{damaged} has sha256 {hashlib.sha256(damaged.read_bytes()).hexdigest()}" in message
    assert "TrainOptions.dataset=text TrainOptions.data_path=FILE" in message  # the explicit way to use it anyway
    assert len(data.load_dataset("text", seq_len=8, data_path=str(damaged)).train) > 0


def test_non_utf8_bytes_are_accepted_as_byte_tokens(tmp_path):
    raw = bytes(range(256)) * 4  # every byte value, most sequences invalid UTF-8
    path = tmp_path / "binary.bin"
    path.write_bytes(raw)
    text = data.load_dataset("text", seq_len=16, data_path=str(path))
    np.testing.assert_array_equal(np.concatenate([text.train, text.validation]), np.frombuffer(raw, np.uint8).astype(np.int32) + 3)
    batch = text.batch("train", seed=0, step=0, batch_size=2, seq_len=16)
    assert batch["inputs"].max() < data.BYTE_VOCAB_SIZE


def test_split_is_90_10_without_overlap_and_batches_are_pure():
    tokens = np.arange(1000, dtype=np.int32) + 3
    text = data.TextData.from_tokens(tokens, seq_len=16, source="numbers")
    assert len(text.train) == 900 and len(text.validation) == 100
    assert text.train[-1] < text.validation[0]
    a = text.batch("train", seed=1, step=7, batch_size=4, seq_len=16)
    b = text.batch("train", seed=1, step=7, batch_size=4, seq_len=16)
    c = text.batch("train", seed=1, step=8, batch_size=4, seq_len=16)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])
    np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
    assert a["inputs"].max() < 903
    v = text.batch("validation", seed=1, step=0, batch_size=4, seq_len=16)
    assert v["inputs"].min() >= 903


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"short", "shorter than one sequence")])
def test_unusable_text_files(tmp_path, content, message):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.load_dataset("text", seq_len=64, data_path=str(path))


def test_directory_and_missing_text_paths(tmp_path):
    with pytest.raises(data.DataError, match="is a directory"):
        data.load_dataset("text", seq_len=8, data_path=str(tmp_path))
    with pytest.raises(data.DataError, match="needs TrainOptions.data_path"):
        data.load_dataset("text", seq_len=8)
    with pytest.raises(data.DataError, match="unknown"):
        data.load_dataset("wikipedia", seq_len=8)


def test_copy_task_sequences_and_weights():
    task = data.CopyTask(vocab_size=10)
    batch = task.batch("train", seed=0, step=3, batch_size=2, seq_len=12)
    full = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)  # the 13-token sequence
    w = full[:, 1:6]
    np.testing.assert_array_equal(full[:, 0], 0)
    np.testing.assert_array_equal(full[:, 6], 0)
    np.testing.assert_array_equal(full[:, 7:12], w)
    assert w.min() >= 1 and w.max() < 10
    # Scored: the targets that are symbols of the second w.
    np.testing.assert_array_equal(batch["weights"][0], [0] * 6 + [1] * 5 + [0])
    np.testing.assert_array_equal(batch["targets"][batch["weights"] == 1].reshape(2, 5), w)


def test_lm_batch_shifts_windows_into_inputs_and_next_token_targets():
    batch = data.lm_batch(np.array([[1, 2, 3], [4, 5, 6]], np.int64))
    assert batch["inputs"].tolist() == [[1, 2], [4, 5]] and batch["targets"].tolist() == [[2, 3], [5, 6]]
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and batch["weights"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
