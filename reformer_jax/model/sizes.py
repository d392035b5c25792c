"""The project's named sizes, defined once: main.py's defaults and the benchmark drivers' configurations.

| name                  | d_model | heads | d_ff | layers | length | batch | used by                                   |
| --------------------- | ------- | ----- | ---- | ------ | ------ | ----- | ----------------------------------------- |
| `SEED`                | 512     | 8     | 2048 | 6      | 4096   | 1     | the seed's memory experiments (memory.py) |
| `SPEED_P`             | 256     | 4     | 1024 | 6      | 4096   | 1     | the speed benchmark's configuration P     |
| `CPU`                 | 256     | 4     | 1024 | 3      | 256    | 8     | main.py's defaults (minutes on a CPU)     |
| `QUALITY_SHAKESPEARE` | 128     | 4     | 512  | 2      | 256    | 8     | quality.py, tiny Shakespeare              |
| `QUALITY_COPY`        | 256     | 4     | 1024 | 1      | 256    | 16    | quality.py, the copy task                 |

All use the byte vocabulary (259; the copy task: 128 symbols), 8 hash rounds and chunks of 64; the rest of a model is its preset's
(`ModelConfig.preset`). `python main.py --sizes=seed` trains at the seed's sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of a model and its batches; `model_fields()` are ModelConfig fields (max_len = seq_len)."""

    d_model: int
    n_heads: int
    d_ff: int
    n_layers: int
    seq_len: int
    batch_size: int
    vocab_size: int = 259
    n_hashes: int = 8
    chunk_len: int = 64

    def model_fields(self) -> Dict[str, Any]:
        return dict(vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff,
                    n_layers=self.n_layers, max_len=self.seq_len, n_hashes=self.n_hashes, chunk_len=self.chunk_len)


SEED = Sizes(d_model=512, n_heads=8, d_ff=2048, n_layers=6, seq_len=4096, batch_size=1)
SPEED_P = Sizes(d_model=256, n_heads=4, d_ff=1024, n_layers=6, seq_len=4096, batch_size=1)
CPU = Sizes(d_model=256, n_heads=4, d_ff=1024, n_layers=3, seq_len=256, batch_size=8)
QUALITY_SHAKESPEARE = Sizes(d_model=128, n_heads=4, d_ff=512, n_layers=2, seq_len=256, batch_size=8)
QUALITY_COPY = Sizes(d_model=256, n_heads=4, d_ff=1024, n_layers=1, seq_len=256, batch_size=16, vocab_size=128)

NAMED = {"seed": SEED, "speed_p": SPEED_P, "cpu": CPU, "quality_shakespeare": QUALITY_SHAKESPEARE,
         "quality_copy": QUALITY_COPY}
