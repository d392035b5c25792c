"""Data: the tiny Shakespeare corpus, any text file, and the paper's synthetic copy task; where a run's data came
from (`DataSource`, recorded in run_settings.json so evaluate and generate reopen it); BERT's masking of a text for
masked-LM training (`mask_tokens`, `MaskedText`).

Text is turned into ids by the run's tokenizer (`reformer_jax.tokenizers`; this project's runs: byte b is id b + 3;
pad 0, eos 1, bos 2; vocabulary 259).

Batches are a pure function of (seed, step): batch s of a run is the same whether the run went straight through
or was resumed from a checkpoint, so a resumed run reproduces the uninterrupted one exactly.
A batch is {inputs, targets: int32 [b, l], weights: float32 [b, l]}, targets[i] = the token after inputs[i].
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import lzma
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from reformer_jax import tokenizers
from reformer_jax.training import listops
from reformer_jax.errors import setting

PAD_ID, EOS_ID, BOS_ID = tokenizers.BYTES.pad_id, tokenizers.BYTES.eos_id, tokenizers.BYTES.bos_id
BYTE_OFFSET = tokenizers.BYTES.offset
BYTE_VOCAB_SIZE = tokenizers.BYTES.vocab_size
MASK_ID = BYTE_VOCAB_SIZE  # 259, one past the byte ids: masked-LM models need MLM_VOCAB_SIZE ids
MLM_VOCAB_SIZE = BYTE_VOCAB_SIZE + 1
MLM_RATE = 0.15  # BERT's share of positions to predict

TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
PACKAGED_TINY_SHAKESPEARE = "assets/tinyshakespeare.txt.xz"  # inside this package (public-domain text)
DATASETS = ("tiny_shakespeare", "synthetic", "text", "listops")
VALIDATION_FRACTION = 0.1

Batch = Dict[str, np.ndarray]


class DataError(ValueError):
    """A data file that cannot be used, with what to do about it."""


def lm_batch(windows: np.ndarray) -> Batch:
    """A language model's batch of token windows [b, l + 1]: inputs and next-token targets [b, l] (int32), every
    target weighted 1."""
    return {"inputs": windows[:, :-1].astype(np.int32), "targets": windows[:, 1:].astype(np.int32),
            "weights": np.ones((windows.shape[0], windows.shape[1] - 1), np.float32)}


encode, encode_bytes, decode = tokenizers.BYTES.encode, tokenizers.BYTES.encode_bytes, tokenizers.BYTES.decode


def _tiny_shakespeare_checked(raw: bytes, where: str) -> bytes:
    actual = hashlib.sha256(raw).hexdigest()
    if actual != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"{where} has sha256 {actual}, not tiny Shakespeare's {TINY_SHAKESPEARE_SHA256}: it is another "
                        f"file or a damaged copy. To train on it anyway pass {setting('dataset')}=text "
                        f"{setting('data_path')}=FILE; omit "
                        f"{setting('data_path')} to use the copy shipped with reformer_jax.")
    return raw


def packaged_tiny_shakespeare() -> bytes:
    """The tiny Shakespeare copy shipped inside the package (xz-compressed, 0.36 MB), checked by its sha256."""
    packed = importlib.resources.files(__package__).joinpath(PACKAGED_TINY_SHAKESPEARE).read_bytes()
    return _tiny_shakespeare_checked(lzma.decompress(packed), "the packaged tiny Shakespeare")


def _read_file(data_path: str, flag: Optional[str] = None) -> bytes:
    """A data file's bytes; DataError (naming `flag`, default the data_path setting) if it is missing, not a file,
    or empty."""
    flag = flag or setting("data_path")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"{flag}={data_path} does not exist.")
    if path.is_dir():
        raise DataError(f"{flag}={data_path} is not a regular file: it is a directory; pass a text file.")
    if not path.is_file():
        raise DataError(f"{flag}={data_path} is not a regular file; pass a text file.")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{flag}={data_path} is empty.")
    return raw


def tiny_shakespeare(data_path: Optional[str] = None) -> Tuple[bytes, str]:
    """(the corpus's bytes, where they came from): --data_path if given, else the copy shipped with the package.

    An explicit `data_path` that does not exist is an error, never a reason to fall back to the packaged copy. A
    file with the wrong checksum is refused: results on it would be reported as tiny Shakespeare's. The explicit
    way to train on another (or an edited) file is --dataset=text --data_path=FILE.
    """
    if not data_path:
        return packaged_tiny_shakespeare(), PACKAGED_LABEL
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"{setting('data_path')}={data_path} does not exist. Pass the path of "
                        f"{TINY_SHAKESPEARE_FILE}, or omit "
                        f"{setting('data_path')} to use the copy shipped with reformer_jax.")
    return _tiny_shakespeare_checked(_read_file(data_path), str(path)), str(path)


def read_text_tokens(path: Path, tokenizer: tokenizers.Tokenizer = tokenizers.BYTES) -> np.ndarray:
    """All bytes of a file as tokens. Non-UTF-8 bytes are fine for byte tokenizers."""
    return tokenizer.encode_bytes(_read_file(str(path)))


PACKAGED_LABEL = "tiny Shakespeare (the copy packaged with reformer_jax)"
COPY_TASK_LABEL = "synthetic copy task (0 w 0 w)"


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a run's data came from, as run_settings.json records it (`to_dict`): enough to reopen the same data.

    kind "packaged": the tiny Shakespeare copy shipped with reformer_jax, by name and sha256;
    kind "file": a file by absolute path and sha256 (--data_path);
    kind "synthetic": the copy task, by its vocabulary;
    kind "listops": the ListOps task, by its generator's settings (`listops.ListOps.to_dict`).
    `mask_rate` (text kinds): the text is read as masked-LM batches at that rate (`MaskedText`).
    """

    kind: str
    dataset: str  # the --dataset it was read as: tiny_shakespeare, text or synthetic
    sha256: Optional[str] = None
    path: Optional[str] = None
    vocab_size: Optional[int] = None
    mask_rate: Optional[float] = None
    listops: Optional[Dict[str, int]] = None

    @property
    def label(self) -> str:
        if self.kind == "listops":
            return listops.ListOps(**self.listops).source
        return {"packaged": PACKAGED_LABEL, "synthetic": COPY_TASK_LABEL}.get(self.kind, self.path or "")

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Dict[str, object]) -> "DataSource":
        try:
            source = cls(**record)
        except TypeError as error:
            raise DataError(f"the recorded data source {record!r} is not one this version reads ({error}).") from None
        if source.kind not in ("packaged", "file", "synthetic", "listops"):
            raise DataError(f"the recorded data source {record!r} has an unknown kind {source.kind!r}.")
        return source

@dataclasses.dataclass(frozen=True)
class TextData:
    """A token stream split into the first 90% (train) and the last 10% (validation), without overlap."""

    train: np.ndarray
    validation: np.ndarray
    source: str  # a label for people
    origin: Optional[DataSource] = None  # what reopens it

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, seq_len: int, source: str,
                    origin: Optional[DataSource] = None) -> "TextData":
        split = int(round(len(tokens) * (1 - VALIDATION_FRACTION)))
        data = cls(train=tokens[:split], validation=tokens[split:], source=source, origin=origin)
        shortest = min(len(data.train), len(data.validation))
        if shortest < seq_len + 1:
            raise DataError(f"{source} has {len(tokens)} tokens: its validation split ({len(data.validation)}) or "
                            f"training split ({len(data.train)}) is shorter than one sequence of "
                            f"{setting('seq_len')}={seq_len} "
                            f"plus one target; use a longer text (at least {10 * (seq_len + 1)} bytes) or a "
                            f"shorter {setting('seq_len')}.")
        return data

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> Batch:
        """Random windows of seq_len + 1 tokens, a pure function of (seed, split, step)."""
        tokens = self.train if split == "train" else self.validation
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, step])
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
        return lm_batch(np.stack([tokens[s:s + seq_len + 1] for s in starts]))


@dataclasses.dataclass(frozen=True)
class CopyTask:
    """The paper's duplication task: sequences 0 w 0 w with w random symbols in [1, vocab_size).

    Only the copied half is scored (weights 1 where the target is a symbol of the second w), so the accuracy is
    the fraction of copied symbols predicted right; chance is 1 / (vocab_size - 1).
    """

    vocab_size: int
    source: str = COPY_TASK_LABEL

    @property
    def origin(self) -> DataSource:
        return DataSource(kind="synthetic", dataset="synthetic", vocab_size=self.vocab_size)

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> Batch:
        if seq_len % 2 or seq_len < 4:
            raise DataError(f"{setting('seq_len')}={seq_len}: the copy task needs an even length >= 4.")
        half = seq_len // 2
        rng = np.random.default_rng([seed, 2 if split == "train" else 3, step])
        w = rng.integers(1, self.vocab_size, size=(batch_size, half - 1))
        zeros = np.zeros((batch_size, 1), np.int64)
        sequence = np.concatenate([zeros, w, zeros, w, zeros], axis=1)  # [b, seq_len + 1]
        weights = np.zeros((batch_size, seq_len), np.float32)
        weights[:, half:seq_len - 1] = 1.0  # targets = the second w
        return {"inputs": sequence[:, :-1].astype(np.int32), "targets": sequence[:, 1:].astype(np.int32),
                "weights": weights}


def mask_tokens(tokens: np.ndarray, rng, rate: float = MLM_RATE) -> Batch:
    """BERT's corruption of byte ids [b, l] for masked-LM training, a pure function of `rng`'s seed.

    Each text position (id >= BYTE_OFFSET: never pad, eos or bos) is chosen with probability `rate`; a chosen
    position's input becomes MASK_ID (80%), a random byte id (10%; it may draw the original) or stays as it was
    (10%), so the model cannot tell which unmasked positions it is scored on. `rng`: a np.random.Generator or a seed.
    Returns {inputs: int32 [b, l], targets: int32 [b, l] (the original ids), weights: float32 [b, l] (1 where
    chosen, else 0)}.
    """
    tokens = np.asarray(tokens)
    if not 0 < rate <= 1:
        raise DataError(f"rate={rate} is not a masking rate; use a fraction in (0, 1] (BERT: {MLM_RATE}).")
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise DataError(f"tokens of shape {tokens.shape} and dtype {tokens.dtype} are not a batch of ids; expected "
                        f"integers [batch, length].")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= BYTE_VOCAB_SIZE):
        raise DataError(f"tokens hold ids from {tokens.min()} to {tokens.max()}; masking expects byte-tokenizer ids "
                        f"in [0, {BYTE_VOCAB_SIZE}).")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    chosen = (rng.random(tokens.shape) < rate) & (tokens >= BYTE_OFFSET)
    action = rng.random(tokens.shape)  # below 0.8: MASK_ID; 0.8 to 0.9: a random byte; above: unchanged
    random_bytes = rng.integers(BYTE_OFFSET, BYTE_VOCAB_SIZE, tokens.shape)
    inputs = np.where(chosen & (action < 0.8), MASK_ID, tokens)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_bytes, inputs)
    return {"inputs": inputs.astype(np.int32), "targets": tokens.astype(np.int32),
            "weights": chosen.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class MaskedText:
    """Masked-LM batches of a text: TextData's random windows (seq_len tokens each) corrupted by `mask_tokens`,
    a pure function of (seed, split, step) like every batch here. Models read them with vocab_size MLM_VOCAB_SIZE.
    A batch is {inputs, targets: int32 [b, l], weights: float32 [b, l]}, targets[i] = the original token at i."""

    text: TextData
    rate: float = MLM_RATE

    def __post_init__(self):
        if not 0 < self.rate <= 1:
            raise DataError(f"rate={self.rate} is not a masking rate; use a fraction in (0, 1] (BERT: {MLM_RATE}).")

    @property
    def source(self) -> str:
        return self.text.source

    @property
    def origin(self) -> Optional[DataSource]:
        return None if self.text.origin is None else dataclasses.replace(self.text.origin, mask_rate=self.rate)

    def batch(self, split: str, seed: int, step: int, batch_size: int, seq_len: int) -> Batch:
        windows = self.text.batch(split, seed, step, batch_size, seq_len)["inputs"]  # [b, seq_len]
        # the masks draw from their own stream: not the windows' (0, 1) or the copy task's (2, 3)
        return mask_tokens(windows, np.random.default_rng([seed, 4 if split == "train" else 5, step]), self.rate)


def consecutive_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: Optional[int] = None,
                        pad_id: int = 0, padded_length: Optional[Callable[[int], int]] = None):
    """The whole token stream as consecutive, non-overlapping windows of seq_len targets, `batch_size` per batch
    (the last batch's missing rows have weight 0); at most `max_batches` batches. Yields Batch dicts.

    Every target is scored once: a text that does not fill its last window (or is shorter than one) ends in a
    window padded with `pad_id`, weight 0 and, in that batch only, an "attention_mask" [b, l] (True = real token)
    that keeps the padding out of attention, as Hugging Face pads in evaluation. With `padded_length` (the model's
    `ModelConfig.padded_length`), a batch holding only that short window is as wide as the model needs for it
    rather than seq_len, as Hugging Face pads a short text: where LSH chunks look back across the wrap-around, the
    width changes the scores."""
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise DataError(f"{len(tokens)} tokens are too few to score: a text needs at least two.")
    n_windows = -(-n_targets // seq_len)
    n_batches = -(-n_windows // batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        windows = range(b * batch_size, min((b + 1) * batch_size, n_windows))
        longest = max(min(seq_len, n_targets - w * seq_len) for w in windows)
        width = padded_length(longest) if padded_length is not None and longest < seq_len else seq_len
        inputs = np.full((batch_size, width), pad_id, np.int32)
        targets = np.full((batch_size, width), pad_id, np.int32)
        weights = np.zeros((batch_size, width), np.float32)
        mask = np.ones((batch_size, width), bool)  # rows left empty stay unmasked zeros of weight 0
        for row, w in enumerate(windows):
            window = tokens[w * seq_len:w * seq_len + seq_len + 1]
            n = len(window) - 1
            inputs[row, :n], targets[row, :n], weights[row, :n] = window[:-1], window[1:], 1.0
            mask[row, n:] = False
        batch = {"inputs": inputs, "targets": targets, "weights": weights}
        yield {**batch, "attention_mask": mask} if not mask.all() else batch


LISTOPS_LONGEST = 2000  # Long Range Arena's longest ListOps sequence


@dataclasses.dataclass(frozen=True)
class ListOpsData(listops.ListOps):
    """`listops.ListOps` with the DataSource that reopens it."""

    @property
    def origin(self) -> DataSource:
        return DataSource(kind="listops", dataset="listops", listops=self.to_dict())


def listops_task(seq_len: int) -> ListOpsData:
    """The ListOps task of a run at seq_len: lengths from a quarter of the longest to the longest, which is seq_len
    up to Long Range Arena's 2,000 (LRA: 500-2,000); LRA's depth, arguments and split sizes."""
    longest = min(seq_len, LISTOPS_LONGEST)
    return ListOpsData(min_length=max(listops.SHORTEST, longest // 4), max_length=longest)


def load_dataset(name: str, *, seq_len: int, data_path: Optional[str] = None, vocab_size: int = BYTE_VOCAB_SIZE,
                 tokenizer: tokenizers.Tokenizer = tokenizers.BYTES, mask_rate: Optional[float] = None):
    """The dataset behind --dataset: an object with .batch(split, seed, step, batch_size, seq_len), .source (a label)
    and .origin (the DataSource that reopens it), its text encoded by `tokenizer`; with `mask_rate`, a text's
    masked-LM batches (`MaskedText`)."""
    if name == "synthetic":
        return CopyTask(vocab_size=vocab_size)
    if name == "listops":
        return listops_task(seq_len)
    if name not in DATASETS:
        raise DataError(f"{setting('dataset')}={name!r} is unknown; expected one of {', '.join(DATASETS)}.")
    if vocab_size < tokenizer.vocab_size:
        raise DataError(f"{setting('vocab_size')}={vocab_size} is too small for {tokenizer.name} text; use "
                        f"{tokenizer.vocab_size}.")
    if name == "tiny_shakespeare":
        raw, source = tiny_shakespeare(data_path)
    elif not data_path:
        raise DataError(f"{setting('dataset')}=text needs {setting('data_path')}=FILE (any UTF-8 text).")
    else:
        raw, source = _read_file(data_path), str(Path(data_path).expanduser())
    sha256 = hashlib.sha256(raw).hexdigest()
    origin = (DataSource(kind="packaged", dataset=name, sha256=sha256) if not data_path else
              DataSource(kind="file", dataset=name, sha256=sha256, path=str(Path(source).absolute())))
    text = TextData.from_tokens(tokenizer.encode_bytes(raw), seq_len, source=source, origin=origin)
    return text if mask_rate is None else MaskedText(text, mask_rate)


def reopen(record: Dict[str, object], *, seq_len: int, tokenizer: Optional[tokenizers.Tokenizer] = tokenizers.BYTES,
           flag: Optional[str] = None):
    """The dataset a run recorded (`DataSource.to_dict`), the same bytes or a DataError saying what changed; `flag`
    names the run's directory in messages (default: the workdir setting)."""
    flag = flag or setting("workdir")
    source = DataSource.from_dict(record)
    if source.kind == "synthetic":
        return CopyTask(vocab_size=int(source.vocab_size))
    if source.kind == "listops":
        return ListOpsData(**source.listops)
    if source.kind == "packaged":
        raw = packaged_tiny_shakespeare()
    else:
        if not Path(source.path).is_file():
            raise DataError(f"{flag}: the run's data file {source.path} no longer exists; put it back, or pass "
                            f"{setting('data_path')}=FILE to score another file.")
        raw = Path(source.path).read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != source.sha256:
        raise DataError(f"{flag}: the run's data {source.label} has sha256 {actual}, not the {source.sha256} it was "
                        f"trained on (the file changed); pass {setting('data_path')}=FILE to score it as a new file.")
    text = TextData.from_tokens(tokenizer.encode_bytes(raw), seq_len, source=source.label if source.kind == "packaged"
                                else source.path, origin=dataclasses.replace(source, mask_rate=None))
    return text if source.mask_rate is None else MaskedText(text, source.mask_rate)
