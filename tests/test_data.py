"""Byte tokens, corpus discovery and checksums, the 90/10 split, pure-by-step batches, the copy task."""

import hashlib
import io
import urllib.error

import numpy as np
import pytest

from reformer_jax.training import data


def test_bytes_round_trip_with_offset_and_specials():
    tokens = data.encode("Héllo\n")
    assert tokens.dtype == np.int32 and tokens.min() >= 3 and tokens.max() < 259
    assert tokens[0] == ord("H") + 3 and len(tokens) == len("Héllo\n".encode("utf-8"))
    assert data.decode(np.concatenate([[data.BOS_ID], tokens, [data.EOS_ID, data.PAD_ID]])) == "Héllo\n"
    assert data.decode(data.encode_bytes(b"\xff\xfeok")) == "\ufffd\ufffdok"  # non-UTF-8 input is fine


def test_explicit_missing_path_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    (tmp_path / data.TINY_SHAKESPEARE_FILE).write_text("x")
    with pytest.raises(data.DataError, match="--data_path=.*does not exist"):
        data.locate_tiny_shakespeare(str(tmp_path / "nope.txt"), download=False)


def test_env_dir_then_cache_and_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    payload = b"To be, or not to be\n" * 100
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    cached = tmp_path / "cache" / "reformer_jax" / data.TINY_SHAKESPEARE_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(payload)
    assert data.locate_tiny_shakespeare(None, download=False) == cached
    env_file = tmp_path / "env" / data.TINY_SHAKESPEARE_FILE
    env_file.parent.mkdir()
    env_file.write_bytes(payload[:-1] + b"?")  # one byte differs: a damaged copy, found first
    with pytest.raises(data.DataError) as err:
        data.locate_tiny_shakespeare(None, download=False)
    message = str(err.value)
    assert f"{env_file} has sha256 {hashlib.sha256(env_file.read_bytes()).hexdigest()}" in message
    assert f"--dataset=text --data_path={env_file}" in message  # the explicit way to use it anyway
    with pytest.raises(data.DataError, match="not tiny Shakespeare's"):  # also through --data_path
        data.load_dataset("tiny_shakespeare", seq_len=8, data_path=str(env_file), download=False)
    assert len(data.load_dataset("text", seq_len=8, data_path=str(env_file)).train) > 0


def test_non_utf8_bytes_are_accepted_as_byte_tokens(tmp_path):
    raw = bytes(range(256)) * 4  # every byte value, most sequences invalid UTF-8
    path = tmp_path / "binary.bin"
    path.write_bytes(raw)
    text = data.load_dataset("text", seq_len=16, data_path=str(path))
    np.testing.assert_array_equal(np.concatenate([text.train, text.validation]), np.frombuffer(raw, np.uint8).astype(np.int32) + 3)
    batch = text.batch("train", seed=0, step=0, batch_size=2, seq_len=16)
    assert batch["inputs"].max() < data.BYTE_VOCAB_SIZE


def test_offline_failure_says_how_to_supply_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError) as err:
        data.locate_tiny_shakespeare(None)
    message = str(err.value)
    assert "--data_path=" in message and "--dataset=synthetic runs offline" in message and "no network" in message
    assert not list(tmp_path.rglob("*.txt")) and not list(tmp_path.rglob(".download-*"))


def _serving(payload: bytes):
    """A stand-in for urllib.request.urlopen that answers every request with `payload`."""

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return lambda *args, **kwargs: Response(payload)


def test_download_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    monkeypatch.setattr(data.urllib.request, "urlopen", _serving(b"tampered"))
    with pytest.raises(data.DataError, match="was discarded"):
        data.locate_tiny_shakespeare(None)
    assert not list(tmp_path.rglob("*.txt"))


def test_download_with_right_checksum_is_cached(tmp_path, monkeypatch):
    payload = b"To be, or not to be\n" * 100
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())

    monkeypatch.setattr(data.urllib.request, "urlopen", _serving(payload))
    path = data.locate_tiny_shakespeare(None)
    assert path.read_bytes() == payload and path.parent == tmp_path / "reformer_jax"


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
    with pytest.raises(data.DataError, match="needs --data_path"):
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
