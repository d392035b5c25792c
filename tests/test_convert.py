"""reformer_jax.model.hf_convert without torch: the tensor mapping and its errors on a synthetic state dict; the
recorded hash rotations on their way to the reader (tests/test_convert_hf.py checks them against Hugging Face)."""

import importlib
import json
import os
import sys

import numpy as np
import pytest

from reformer_jax.convert import convert_dir
from reformer_jax.model.hf_convert import (ROTATIONS_FILE, ConversionError, _expected_tensors, config_from_hf, from_hf,
                                           lsh_rotations_shape, save_converted)
from reformer_jax.training import saved_run

HF_CONFIG = dict(model_type="reformer", attn_layers=["local", "lsh"], hidden_size=8, num_attention_heads=2,
                 attention_head_size=4, feed_forward_size=16, vocab_size=11, lsh_attn_chunk_length=4,
                 local_attn_chunk_length=4, lsh_num_chunks_before=1, local_num_chunks_before=1, num_hashes=2,
                 num_buckets=[2, 2], is_decoder=True, axial_pos_embds=True, axial_pos_shape=[2, 4],
                 axial_pos_embds_dim=[4, 4], max_position_embeddings=8, hidden_act="relu", layer_norm_eps=1e-12)


def synthetic_state_dict():
    rng = np.random.default_rng(0)
    table = _expected_tensors(config_from_hf(HF_CONFIG))
    return {name: rng.normal(size=shape).astype(np.float32) for name, (shape, _, _) in table.items()}


def test_every_tensor_lands_in_its_place():
    state = synthetic_state_dict()
    config, params = from_hf(state, HF_CONFIG)
    assert config.layer_types == ("local", "lsh") and config.n_buckets == (2, 2) and config.layer_norm_eps == 1e-12
    qk = state["reformer.encoder.layers.1.attention.self_attention.query_key.weight"]  # [h k, d]
    np.testing.assert_array_equal(params["layers"]["attention"]["lsh"]["qk"][0][:, 1, 3], qk[1 * 4 + 3])
    out = state["reformer.encoder.layers.0.attention.output.dense.weight"]  # [d, h k]
    np.testing.assert_array_equal(params["layers"]["attention"]["local"]["out"][0][1, 2], out[:, 1 * 4 + 2])
    np.testing.assert_array_equal(params["layers"]["feed_forward"]["wi"][1],
                                  state["reformer.encoder.layers.1.feed_forward.dense.dense.weight"].T)
    np.testing.assert_array_equal(params["head_kernel"], state["lm_head.decoder.weight"].T)


def test_unknown_missing_and_misshapen_tensors_are_named():
    state = synthetic_state_dict()
    with pytest.raises(ConversionError, match="unknown tensor.*reformer.extra"):
        from_hf({**state, "reformer.extra": np.zeros(3)}, HF_CONFIG)
    with pytest.raises(ConversionError, match="missing tensor.*lm_head.decoder.bias"):
        from_hf({k: v for k, v in state.items() if k != "lm_head.decoder.bias"}, HF_CONFIG)
    name = "reformer.encoder.layers.0.attention.self_attention.key.weight"
    with pytest.raises(ConversionError, match=rf"{name} has shape \(8, 7\); expected \(8, 8\)"):
        from_hf({**state, name: np.zeros((8, 7))}, HF_CONFIG)


@pytest.mark.parametrize("change, message", [
    (dict(num_buckets=None), "num_buckets=None"),
    (dict(lsh_num_chunks_after=1), "lsh_num_chunks_after=1"),
    (dict(hidden_act="swish"), "hidden_act='swish'"),
    (dict(attn_layers=["lsh", "global"]), "attn_layers="),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ConversionError, match=message):
        config_from_hf({**HF_CONFIG, **change})


def _peer(name):
    return importlib.import_module(name) if os.environ.get("CI") == "true" else pytest.importorskip(name)


def test_seeded_checkpoint_converts_without_torch_and_says_so(tmp_path, monkeypatch, capsys):
    """Without torch, Hugging Face's seeded draw cannot be reproduced: one line says so, and the checkpoint is
    converted without rotations (its readers draw their own)."""
    save_file = _peer("safetensors.numpy").save_file
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({**HF_CONFIG, "hash_seed": 3}))
    save_file(synthetic_state_dict(), str(hf_dir / "model.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    summary = convert_dir(hf_dir, tmp_path / "out")
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: hash_seed=3") and "without torch" in note[0], note
    assert "hash rotations" not in summary
    model = saved_run.open_model(str(tmp_path / "out"))
    assert model.lsh_rotations is None and model.config.layer_types == ("local", "lsh")


def test_recorded_rotations_travel_to_the_reader(tmp_path):
    """save_converted records [LSH layers, h, k, n_hashes, f / 2] rotations; open_model hands them out for the
    saved hashing only; a misshapen array is refused on the way in and on the way out."""
    config, params = from_hf(synthetic_state_dict(), HF_CONFIG)
    rotations = np.random.default_rng(1).normal(size=lsh_rotations_shape(config)).astype(np.float32)
    assert rotations.shape == (1, 2, 4, 2, 2)  # one LSH layer, 2 heads of 4, 2 rounds, buckets 2 x 2
    with pytest.raises(ConversionError, match=r"lsh_rotations have shape \(1, 2, 4, 1, 2\); expected"):
        save_converted(config, params, tmp_path / "bad", lsh_rotations=rotations[:, :, :, :1])
    save_converted(config, params, tmp_path / "out", lsh_rotations=rotations)
    model = saved_run.open_model(str(tmp_path / "out"))
    np.testing.assert_array_equal(model.lsh_rotations, rotations)
    assert model.lsh_rotations_for(model.config) is model.lsh_rotations
    assert model.lsh_rotations_for(model.config.replace(n_hashes=4)) is None  # evaluate --n_hashes=4 draws its own
    np.save(tmp_path / "out" / ROTATIONS_FILE, rotations[0])
    with pytest.raises(saved_run.SavedRunError, match=r"lsh_rotations.npy holds float32 \(2, 4, 2, 2\); expected"):
        saved_run.open_model(str(tmp_path / "out"))
