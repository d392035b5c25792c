"""ModelConfig: presets, defaults, hashability and errors that name the field, the value and what is valid."""

import dataclasses

import jax
import pytest

from reformer_jax import ModelConfig
from reformer_jax.model.config import default_axial_shape, default_n_buckets


def test_defaults_are_the_seeds_setup():
    cfg = ModelConfig()
    assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_ff, cfg.n_layers) == (259, 512, 8, 64, 2048, 6)
    assert (cfg.max_len, cfg.chunk_len, cfg.n_hashes, cfg.dropout) == (4096, 64, 8, 0.1)
    assert cfg.tie_embeddings and cfg.output_head == "mean" and cfg.pos_embedding == "axial"
    assert cfg.axial_shape == (64, 64) and cfg.axial_dims == (256, 256)


@pytest.mark.parametrize("name, attention, reversible, chunked_ff", [
    ("transformer", "full", False, False), ("lsh", "lsh", False, False),
    ("reversible", "full", True, False), ("reformer", "lsh", True, True)])
def test_presets(name, attention, reversible, chunked_ff):
    cfg = ModelConfig.preset(name, n_hashes=4)
    assert (cfg.attention, cfg.reversible, cfg.ff_chunk_len > 0, cfg.n_hashes) == (attention, reversible, chunked_ff, 4)


def test_config_is_hashable_and_a_static_jit_argument():
    cfg = ModelConfig.preset("reformer", n_buckets=[8, 4], axial_shape=[64, 64])
    assert cfg.n_buckets == (8, 4) and isinstance(cfg.axial_shape, tuple)
    assert hash(cfg) == hash(ModelConfig.preset("reformer", n_buckets=(8, 4)))
    f = jax.jit(lambda c, x: x * c.n_hashes, static_argnums=0)
    assert int(f(cfg, 2)) == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_hashes = 2


def test_d_head_defaults_to_d_model_over_heads():
    assert ModelConfig(d_model=256, n_heads=4).d_head == 64
    assert ModelConfig(d_model=256, n_heads=4, d_head=32).d_head == 32


def test_default_bucket_count_follows_trax():
    assert default_n_buckets(4096, 64) == 128
    assert default_n_buckets(64, 64) == 2 and default_n_buckets(32, 64) == 2
    assert default_n_buckets(2**15, 64) == (32, 32)
    assert default_n_buckets(2**14, 64) == (32, 16)  # the spec's 512 -> [32, 16]
    assert ModelConfig(chunk_len=32).resolved_n_buckets(1024) == 64
    assert ModelConfig(n_buckets=(4, 8)).resolved_n_buckets(1024) == (4, 8)


def test_axial_shape_derived_from_length():
    assert default_axial_shape(4096) == (64, 64)
    assert default_axial_shape(2**17) == (256, 512)
    assert ModelConfig(max_len=192, chunk_len=64).axial_shape == (12, 16)


@pytest.mark.parametrize("overrides, field, hint", [
    (dict(n_buckets=7), "n_buckets", "even"),
    (dict(n_buckets=(4, 5)), "n_buckets", "even"),
    (dict(n_buckets=(4, 4, 4)), "n_buckets", "two even"),
    (dict(max_len=1000, chunk_len=64), "max_len", "multiple of chunk_len=64"),
    (dict(axial_shape=(32, 64)), "axial_shape", "product is max_len=4096"),
    (dict(axial_dims=(100, 100)), "axial_dims", "d_model=512"),
    (dict(attention="sparse"), "attention", "'full', 'lsh'"),
    (dict(pos_embedding="rotary"), "pos_embedding", "'absolute', 'axial'"),
    (dict(output_head="sum"), "output_head", "'mean', 'concat'"),
    (dict(dtype="float64"), "dtype", "'float32'"),
    (dict(n_hashes=0), "n_hashes", "positive integer"),
    (dict(n_layers=2.5), "n_layers", "positive integer"),
    (dict(n_chunks_before=-1), "n_chunks_before", ">= 0"),
    (dict(dropout=1.0), "dropout", "[0, 1)"),
    (dict(d_model=100, n_heads=8), "d_head", "not divisible by n_heads=8"),
    (dict(ff_chunk_len=-1), "ff_chunk_len", ">= 0"),
    (dict(output_head="concat", reversible=False, tie_embeddings=False), "output_head", "reversible=False"),
    (dict(output_head="concat"), "tie_embeddings", "cannot be tied"),
    (dict(reversible="yes"), "reversible", "True or False"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps", "positive"),
    (dict(stream_grid_bits=24), "stream_grid_bits", "in [0, 23]"),
    (dict(stream_grid_bits=True), "stream_grid_bits", "16 is exact while |stream| < 256"),
    (dict(sequential_rounds=True, max_len=128, n_chunks_before=3), "n_chunks_before", "at most max_len // chunk_len"),
])
def test_invalid_fields_raise_naming_field_value_and_fix(overrides, field, hint):
    with pytest.raises(ValueError) as err:
        ModelConfig(**overrides)
    message = str(err.value)
    assert f"ModelConfig.{field}=" in message and hint in message


def test_preset_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown preset 'bert'.*'transformer'"):
        ModelConfig.preset("bert")
    with pytest.raises(ValueError, match="unknown field.*n_hash\\b"):
        ModelConfig.preset("reformer", n_hash=4)


def test_sequence_length_checks():
    cfg = ModelConfig.preset("reformer", max_len=1024, chunk_len=64)
    cfg.check_seq_len(512)
    with pytest.raises(ValueError, match="seq_len=100 is not a multiple of ModelConfig.chunk_len=64.*seq_len=64"):
        cfg.check_seq_len(100)
    with pytest.raises(ValueError, match="seq_len=2048 is longer than ModelConfig.max_len=1024"):
        cfg.check_seq_len(2048)
    ModelConfig.preset("transformer", max_len=1024).check_seq_len(100)  # full attention takes any length
