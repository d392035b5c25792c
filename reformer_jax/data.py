"""Data: byte-level tokens, the tiny Shakespeare corpus, any UTF-8 text, and the paper's synthetic copy task.

Tokens: each UTF-8 byte b becomes b + 3; pad 0, eos 1, bos 2; vocabulary 259.

Batches are a pure function of (seed, step): batch s of a run is the same whether the run went straight through
or was resumed from a checkpoint, so a resumed run reproduces the uninterrupted one exactly.
A batch is {inputs, targets: int32 [b, l], weights: float32 [b, l]}, targets[i] = the token after inputs[i].
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict, Optional

import numpy as np

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET

TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_DIR_ENV = "REFORMER_JAX_DATA_DIR"
DATASETS = ("tiny_shakespeare", "synthetic", "text")
VALIDATION_FRACTION = 0.1

Batch = Dict[str, np.ndarray]


class DataError(ValueError):
    """A data file that cannot be used, with what to do about it."""


def encode(text: str) -> np.ndarray:
    """UTF-8 text -> int32 token ids (byte + 3)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET


def encode_bytes(data: bytes) -> np.ndarray:
    """Raw bytes (any, not only valid UTF-8: the model is byte-level) -> int32 token ids."""
    return np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET


def decode(tokens) -> str:
    """Token ids -> text; special ids are dropped and invalid UTF-8 is replaced, never an error."""
    ids = np.asarray(tokens).reshape(-1)
    ids = ids[(ids >= BYTE_OFFSET) & (ids < BYTE_VOCAB_SIZE)] - BYTE_OFFSET
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reformer_jax"


def _download(url: str, destination: Path, sha256: str, timeout: float = 30.0) -> None:
    """Download to a temporary file, check its sha256, then move it into place (never a half-written file)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            out.write(response.read())
        actual = sha256_of(Path(tmp))
        if actual != sha256:
            raise DataError(f"the file downloaded from {url} has sha256 {actual}, not the expected {sha256}; it "
                            "was discarded. Download it yourself and pass --data_path.")
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def locate_tiny_shakespeare(data_path: Optional[str] = None, *, download: bool = True) -> Path:
    """Find the tiny Shakespeare corpus: --data_path, $REFORMER_JAX_DATA_DIR, the user cache, else download once.

    An explicit `data_path` that does not exist is an error, never a reason to look elsewhere. A file with the
    wrong checksum is refused, local or downloaded: results on it would be reported as tiny Shakespeare's. The
    explicit way to train on another (or an edited) file is --dataset=text --data_path=FILE.
    """
    if data_path:
        path = Path(data_path).expanduser()
        if not path.exists():
            raise DataError(f"--data_path={data_path} does not exist. Pass the path of tinyshakespeare.txt, or "
                            "omit --data_path to use $REFORMER_JAX_DATA_DIR, the cache or a download.")
        candidates = [path]
    else:
        candidates = []
        if os.environ.get(DATA_DIR_ENV):
            candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser() / TINY_SHAKESPEARE_FILE)
        candidates.append(user_cache_dir() / TINY_SHAKESPEARE_FILE)
    for path in candidates:
        if path.is_file():
            actual = sha256_of(path)
            if actual != TINY_SHAKESPEARE_SHA256:
                raise DataError(f"{path} has sha256 {actual}, not tiny Shakespeare's {TINY_SHAKESPEARE_SHA256}: it is "
                                "another file or a damaged copy. To train on it anyway, pass --dataset=text "
                                f"--data_path={path}; to use tiny Shakespeare, replace it with the file from "
                                f"{TINY_SHAKESPEARE_URL} (or delete it to download it again).")
            return path
        if path.exists():
            raise DataError(f"{path} is not a regular file (a directory?); pass the path of tinyshakespeare.txt.")
    cached = user_cache_dir() / TINY_SHAKESPEARE_FILE
    if download:
        try:
            _download(TINY_SHAKESPEARE_URL, cached, TINY_SHAKESPEARE_SHA256)
            return cached
        except DataError:
            raise
        except OSError as error:  # offline, DNS, HTTP errors (URLError is an OSError)
            reason = f"downloading it failed ({error})"
    else:
        reason = "downloading is switched off"
    raise DataError(f"tiny Shakespeare was not found and {reason}. Supply the file with "
                    f"--data_path=/path/to/{TINY_SHAKESPEARE_FILE}, or put it in ${DATA_DIR_ENV} or {cached} "
                    f"(sha256 {TINY_SHAKESPEARE_SHA256}, from {TINY_SHAKESPEARE_URL}). "
                    "--dataset=synthetic runs offline.")


def read_text_tokens(path: Path) -> np.ndarray:
    """All bytes of a file as tokens. Non-UTF-8 bytes are fine: the model is byte-level."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--data_path={path} is a directory; pass a text file.")
    if not path.exists():
        raise DataError(f"--data_path={path} does not exist.")
    tokens = encode_bytes(path.read_bytes())
    if tokens.size == 0:
        raise DataError(f"--data_path={path} is empty.")
    return tokens


@dataclasses.dataclass(frozen=True)
class TextData:
    """A token stream split into the first 90% (train) and the last 10% (validation), without overlap."""

    train: np.ndarray
    validation: np.ndarray
    source: str

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, seq_len: int, source: str) -> "TextData":
        split = int(round(len(tokens) * (1 - VALIDATION_FRACTION)))
        data = cls(train=tokens[:split], validation=tokens[split:], source=source)
        shortest = min(len(data.train), len(data.validation))
        if shortest < seq_len + 1:
            raise DataError(f"{source} has {len(tokens)} tokens: its validation split ({len(data.validation)}) or "
                            f"training split ({len(data.train)}) is shorter than one sequence of --seq_len={seq_len} "
                            f"plus one target; use a longer text (at least {10 * (seq_len + 1)} bytes) or a "
                            "shorter --seq_len.")
        return data

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> Batch:
        """Random windows of seq_len + 1 tokens, a pure function of (seed, split, step)."""
        tokens = self.train if split == "train" else self.validation
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, step])
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
        windows = np.stack([tokens[s:s + seq_len + 1] for s in starts])
        return {"inputs": windows[:, :-1].astype(np.int32), "targets": windows[:, 1:].astype(np.int32),
                "weights": np.ones((batch_size, seq_len), np.float32)}


@dataclasses.dataclass(frozen=True)
class CopyTask:
    """The paper's duplication task: sequences 0 w 0 w with w random symbols in [1, vocab_size).

    Only the copied half is scored (weights 1 where the target is a symbol of the second w), so the accuracy is
    the fraction of copied symbols predicted right; chance is 1 / (vocab_size - 1).
    """

    vocab_size: int
    source: str = "synthetic copy task (0 w 0 w)"

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> Batch:
        if seq_len % 2 or seq_len < 4:
            raise DataError(f"--seq_len={seq_len}: the copy task needs an even length >= 4.")
        half = seq_len // 2
        rng = np.random.default_rng([seed, 2 if split == "train" else 3, step])
        w = rng.integers(1, self.vocab_size, size=(batch_size, half - 1))
        zeros = np.zeros((batch_size, 1), np.int64)
        sequence = np.concatenate([zeros, w, zeros, w, zeros], axis=1)  # [b, seq_len + 1]
        weights = np.zeros((batch_size, seq_len), np.float32)
        weights[:, half:seq_len - 1] = 1.0  # targets = the second w
        return {"inputs": sequence[:, :-1].astype(np.int32), "targets": sequence[:, 1:].astype(np.int32),
                "weights": weights}


def consecutive_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: Optional[int] = None):
    """The whole token stream as consecutive, non-overlapping windows of seq_len targets, `batch_size` per batch
    (the last batch's missing rows have weight 0); at most `max_batches` batches. Yields Batch dicts."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"{len(tokens)} tokens are fewer than one window of {seq_len} + 1; use a longer text.")
    n_batches = -(-n_windows // batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        inputs = np.zeros((batch_size, seq_len), np.int32)
        targets = np.zeros((batch_size, seq_len), np.int32)
        weights = np.zeros((batch_size, seq_len), np.float32)
        for row, w in enumerate(range(b * batch_size, min((b + 1) * batch_size, n_windows))):
            window = tokens[w * seq_len:w * seq_len + seq_len + 1]
            inputs[row], targets[row], weights[row] = window[:-1], window[1:], 1.0
        yield {"inputs": inputs, "targets": targets, "weights": weights}


def load_dataset(name: str, *, seq_len: int, data_path: Optional[str] = None, vocab_size: int = BYTE_VOCAB_SIZE,
                 download: bool = True):
    """The dataset behind --dataset: an object with .batch(split, seed, step, batch_size, seq_len) and .source."""
    if name == "synthetic":
        return CopyTask(vocab_size=vocab_size)
    if name == "tiny_shakespeare":
        path = locate_tiny_shakespeare(data_path, download=download)
    elif name == "text":
        if not data_path:
            raise DataError("--dataset=text needs --data_path=FILE (any UTF-8 text).")
        path = Path(data_path).expanduser()
    else:
        raise DataError(f"--dataset={name!r} is unknown; expected one of {', '.join(DATASETS)}.")
    if vocab_size < BYTE_VOCAB_SIZE:
        raise DataError(f"--vocab_size={vocab_size} is too small for byte-level text; use {BYTE_VOCAB_SIZE}.")
    return TextData.from_tokens(read_text_tokens(path), seq_len, source=str(path))
