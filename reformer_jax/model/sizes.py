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

`HF_ENWIK8` is the published configuration of the pretrained enwik8 Reformer, as Hugging Face's
google/reformer-enwik8 config.json states it (d_model 1024, 8 heads of 128, d_ff 4096, 12 local and LSH layers,
65,536 tokens); `hf_enwik8_config()` is the ModelConfig a conversion of that checkpoint has.
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


# Hugging Face's google/reformer-enwik8 config.json (its dropouts matter only in training). The one place the
# project states it: benchmarks.hf_enwik8 builds Hugging Face's ReformerConfig from it.
HF_ENWIK8: Dict[str, Any] = {
    "vocab_size": 258, "hidden_size": 1024, "num_attention_heads": 8, "attention_head_size": 128,
    "feed_forward_size": 4096, "num_hidden_layers": 12,
    "attn_layers": ["local", "local", "lsh", "local", "local", "local", "lsh", "local", "local", "local", "lsh",
                    "local"],
    "num_hashes": 4, "num_buckets": 512, "lsh_attn_chunk_length": 256, "local_attn_chunk_length": 128,
    "lsh_num_chunks_before": 1, "lsh_num_chunks_after": 0, "local_num_chunks_before": 1,
    "local_num_chunks_after": 0, "hidden_act": "relu", "max_position_embeddings": 65536, "axial_pos_embds": True,
    "axial_pos_shape": [128, 512], "axial_pos_embds_dim": [256, 768], "axial_norm_std": 1.0,
    "layer_norm_eps": 1e-12, "chunk_size_lm_head": 0, "chunk_size_feed_forward": 0, "is_decoder": True,
    "pad_token_id": 0, "hash_seed": None, "tie_word_embeddings": False, "hidden_dropout_prob": 0.2,
    "lsh_attention_probs_dropout_prob": 0.1, "local_attention_probs_dropout_prob": 0.2,
}


def hf_enwik8_config():
    """The ModelConfig of google/reformer-enwik8 converted (`hf_convert.config_from_hf(HF_ENWIK8)`)."""
    from reformer_jax.model.hf_convert import config_from_hf

    return config_from_hf(HF_ENWIK8)
