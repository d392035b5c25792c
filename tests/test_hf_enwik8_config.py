"""The published google/reformer-enwik8 configuration (reformer_jax.model.sizes.HF_ENWIK8, the project's one copy) is
one Hugging Face reads as written, and it converts to the ModelConfig a conversion of a saved model of it has.

Skipped unless transformers is installed, except under CI (CI=true), which installs it: there a missing peer fails.
"""

import importlib
import inspect
import json
import math
import os

import pytest

_load = importlib.import_module if os.environ.get("CI") == "true" else pytest.importorskip
transformers = _load("transformers")

from reformer_jax.model.hf_convert import config_from_hf  # noqa: E402
from reformer_jax.model.sizes import HF_ENWIK8, hf_enwik8_config  # noqa: E402


def test_hugging_face_reads_every_value_as_written():
    parameters = inspect.signature(transformers.ReformerConfig.__init__).parameters
    default = transformers.ReformerConfig()
    # A misspelt key would be kept as an attribute nobody reads: each is a parameter or a default attribute.
    assert all(key in parameters or hasattr(default, key) for key in HF_ENWIK8)
    config = transformers.ReformerConfig(**HF_ENWIK8)
    read = {key: getattr(config, key) for key in HF_ENWIK8}
    assert json.loads(json.dumps(read)) == HF_ENWIK8  # (its axial fields become tuples)
    assert config.num_hidden_layers == len(config.attn_layers)


def test_a_saved_model_of_it_converts_to_the_same_model_config(tmp_path):
    transformers.ReformerConfig(**HF_ENWIK8).save_pretrained(tmp_path)  # the config.json convert reads
    written = json.loads((tmp_path / "config.json").read_text())
    ours = hf_enwik8_config()
    assert config_from_hf(written) == ours
    assert ours.layer_types == tuple(HF_ENWIK8["attn_layers"])
    assert ours.max_len == math.prod(HF_ENWIK8["axial_pos_shape"]) == HF_ENWIK8["max_position_embeddings"]
    assert (ours.d_model, ours.n_heads, ours.d_head, ours.d_ff, ours.n_hashes, ours.n_buckets, ours.chunk_len,
            ours.local_chunk_len) == (1024, 8, 128, 4096, 4, 512, 256, 128)
