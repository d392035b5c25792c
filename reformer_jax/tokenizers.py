"""Tokenizers: text <-> token ids, one small interface for every model this library trains or converts.

    tokenizer = tokenizers.from_dict(saved["tokenizer"])     # what a run or a converted checkpoint recorded
    ids = tokenizer.encode("ROMEO:")                          # int32 [n]
    text = tokenizer.decode(ids)                              # special ids dropped, bad UTF-8 replaced

- `BYTES` (this project's runs): byte b is token b + 3; pad 0, eos 1, bos 2; vocabulary 259.
- `ENWIK8_BYTES` (Hugging Face's google/reformer-enwik8): byte b is token b + 2; pad 0; vocabulary 258.
- `SentencePieceTokenizer` (google/reformer-crime-and-punishment's `spiece.model`, vocabulary 320).

A tokenizer is recorded as a small dict (`to_dict`) next to the model (run_settings.json of a main.py run,
tokenizer.json of a converted checkpoint), and everything that turns text into ids (training data, generate,
evaluate) reads it from there instead of assuming one.
"""

from __future__ import annotations

import codecs
import dataclasses
from typing import Any, Callable, Dict, Optional, Union

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer record that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: byte b is id b + `offset`; the ids below `offset` are special (pad, eos, bos)."""

    offset: int
    pad_id: Optional[int] = 0
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None
    name: str = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes (any, not only valid UTF-8) -> int32 ids [len(data)]."""
        return np.frombuffer(data, np.uint8).astype(np.int32) + self.offset

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids, one per UTF-8 byte."""
        return self.encode_bytes(text.encode("utf-8"))

    def _bytes(self, ids) -> bytes:
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)] - self.offset
        return ids.astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """Ids -> text; special ids are dropped and invalid UTF-8 is replaced, never an error."""
        return self._bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> Callable[..., str]:
        """A decoder of successive id blocks, `decode(ids, final=False)`: a character split over two blocks comes out
        whole; the last call (final=True) flushes an incomplete one as U+FFFD, as `decode` of all the ids does."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: decoder.decode(self._bytes(ids), final=final)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": "bytes", "name": self.name, "offset": self.offset, "pad_id": self.pad_id,
                "eos_id": self.eos_id, "bos_id": self.bos_id}


BYTES = ByteTokenizer(offset=3, pad_id=0, eos_id=1, bos_id=2, name="bytes")
ENWIK8_BYTES = ByteTokenizer(offset=2, pad_id=0, name="enwik8 bytes")


class SentencePieceTokenizer:
    """A sentencepiece model (google/reformer-crime-and-punishment's `spiece.model`), read with the `sentencepiece`
    library (`pip install ".[hf]"`). Recorded with the model's bytes, so a record is complete on its own."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        try:
            import sentencepiece
        except ImportError as error:
            raise TokenizerError("this model's tokenizer is a sentencepiece model, which needs the sentencepiece "
                                 "package: pip install sentencepiece (or reformer_jax[hf]).") from error
        self.model_proto, self.name = bytes(model_proto), name
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        special = lambda i: i if i >= 0 else None  # noqa: E731 (sentencepiece says -1 for "none")
        self.pad_id, self.eos_id, self.bos_id = special(self._sp.pad_id()), special(self._sp.eos_id()), special(
            self._sp.bos_id())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return self.encode(data.decode("utf-8", errors="replace"))

    def _pieces(self, ids):
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return [i for i in ids if 0 <= i < self.vocab_size and not self._sp.is_control(i)]

    def _text(self, pieces, first: bool) -> str:
        """Pieces joined, "▁" read as a space, the text's leading space dropped (as sentencepiece and Hugging Face's
        Metaspace decoder do); an unknown piece reads as its own name, "<unk>", as Hugging Face decodes it."""
        text = "".join(self._sp.id_to_piece(i) for i in pieces).replace("\u2581", " ")
        return text[1:] if first and text.startswith(" ") else text

    def decode(self, ids) -> str:
        """Ids -> text; control ids (eos, bos, pad) are dropped."""
        return self._text(self._pieces(ids), first=True)

    def stream_decoder(self) -> Callable[..., str]:
        """Successive id blocks -> the text each adds; together, `decode` of all of them."""
        started = [False]

        def decode(ids, final=False):
            pieces = self._pieces(ids)
            text = self._text(pieces, first=not started[0])
            started[0] = started[0] or bool(pieces)
            return text

        return decode

    def to_dict(self) -> Dict[str, Any]:
        import base64

        return {"kind": "sentencepiece", "name": self.name, "model": base64.b64encode(self.model_proto).decode()}


Tokenizer = Union[ByteTokenizer, SentencePieceTokenizer]  # encode, decode, stream_decoder, vocab_size, special ids


def from_dict(record: Optional[Dict[str, Any]]) -> Optional[Tokenizer]:
    """The tokenizer a record describes (None for None: a model of symbols, such as the copy task's)."""
    if record is None:
        return None
    kind = record.get("kind") if isinstance(record, dict) else None
    try:
        if kind == "bytes":
            return ByteTokenizer(offset=int(record["offset"]), pad_id=record.get("pad_id"),
                                 eos_id=record.get("eos_id"), bos_id=record.get("bos_id"),
                                 name=record.get("name", "bytes"))
        if kind == "sentencepiece":
            import base64

            return SentencePieceTokenizer(base64.b64decode(record["model"]), name=record.get("name", "sentencepiece"))
    except (KeyError, TypeError, ValueError) as error:
        raise TokenizerError(f"the tokenizer record (kind {kind!r}) is incomplete or damaged ({error}).") from None
    raise TokenizerError(f"a tokenizer record of kind {kind!r} is not one this version reads (expected 'bytes' or "
                         "'sentencepiece').")


def for_hf_vocabulary(vocab_size: int, pad_id: Optional[int] = 0) -> Optional[Tokenizer]:
    """The byte tokenizer of a Hugging Face Reformer with this vocabulary (256 bytes after vocab_size - 256
    special ids, as google/reformer-enwik8's 258), or None where the vocabulary is not bytes."""
    offset = vocab_size - 256
    if not 0 <= offset <= 8:
        return None
    if offset == ENWIK8_BYTES.offset:
        return ENWIK8_BYTES
    return ByteTokenizer(offset=offset, pad_id=pad_id if pad_id is not None and pad_id < offset else None,
                         name=f"bytes + {offset}")
