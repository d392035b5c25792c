"""reformer_jax.model.hf_convert without torch: the tensor mapping and its errors on a synthetic state dict."""

import numpy as np
import pytest

from reformer_jax.model.hf_convert import ConversionError, _expected_tensors, config_from_hf, from_hf

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
