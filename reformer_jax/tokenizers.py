"""Tokenizers: text <-> token ids, one small interface for every model this library trains or converts.

    tokenizer = tokenizers.from_dict(saved["tokenizer"])     # what a run or a converted checkpoint recorded
    ids = tokenizer.encode("ROMEO:")                          # int32 [n]
    text = tokenizer.decode(ids)                              # special ids dropped, bad UTF-8 replaced

- `BYTES` (this project's runs): byte b is token b + 3; pad 0, eos 1, bos 2; vocabulary 259.
- `ENWIK8_BYTES` (Hugging Face's google/reformer-enwik8): byte b is token b + 2; pad 0; vocabulary 258.

A tokenizer is recorded as a small dict (`to_dict`) next to the model (run_settings.json of a main.py run,
tokenizer.json of a converted checkpoint), and everything that turns text into ids (training data, generate,
evaluate) reads it from there instead of assuming one.
"""

from __future__ import annotations

import codecs
import dataclasses
from typing import Any, Callable, Dict, Optional

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

Tokenizer = ByteTokenizer  # the interface: encode, encode_bytes, decode, stream_decoder, vocab_size, special ids


def from_dict(record: Optional[Dict[str, Any]]) -> Optional[Tokenizer]:
    """The tokenizer a record describes (None for None: a model of symbols, such as the copy task's)."""
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("kind") != "bytes":
        raise TokenizerError(f"tokenizer record {record!r} is not one this version reads (expected kind 'bytes').")
    try:
        return ByteTokenizer(offset=int(record["offset"]), pad_id=record.get("pad_id"), eos_id=record.get("eos_id"),
                             bos_id=record.get("bos_id"), name=record.get("name", "bytes"))
    except (KeyError, TypeError, ValueError) as error:
        raise TokenizerError(f"tokenizer record {record!r} is incomplete ({error}).") from None


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
