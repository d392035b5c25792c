"""ReformerLM: all four presets run forward and backward, full-attention presets are causal, bad input rejected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import ModelConfig, ReformerLM, init_params

PRESETS = ["transformer", "lsh", "reversible", "reformer"]


def small_config(name, **overrides):
    base = dict(vocab_size=40, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=128, chunk_len=16, n_hashes=2,
                ff_chunk_len=32 if name == "reformer" else 0)
    return ModelConfig.preset(name, **{**base, **overrides})


RNGS = {"lsh": jax.random.key(1), "dropout": jax.random.key(2)}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_run_forward_and_backward(name):
    cfg = small_config(name)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 128), 0, cfg.vocab_size)
    model = ReformerLM(cfg)

    def loss(p):
        logits = model.apply({"params": p}, tokens, deterministic=False, rngs=RNGS)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert logits.shape == (2, 128, 40) and logits.dtype == jnp.float32
    assert np.isfinite(float(value))
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert float(jnp.max(jnp.abs(grads["layers"]["attention"]["qk"]))) > 0
    # The model has parameters and nothing else.
    variables = model.init({"params": jax.random.key(0), "lsh": jax.random.key(1)}, tokens[:, :16])
    assert set(variables) == {"params"}


@pytest.mark.parametrize("name", ["transformer", "reversible"])
def test_full_attention_presets_are_causal(name):
    cfg = small_config(name)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(4), (1, 64), 0, cfg.vocab_size)
    changed = tokens.at[:, 40:].set((tokens[:, 40:] + 7) % cfg.vocab_size)
    apply = jax.jit(lambda t: ReformerLM(cfg).apply({"params": params}, t))
    a, b = apply(tokens), apply(changed)
    np.testing.assert_allclose(a[:, :40], b[:, :40], atol=1e-5)
    assert float(jnp.max(jnp.abs(a[:, 40:] - b[:, 40:]))) > 1e-3


def test_lsh_model_never_puts_weight_on_the_future_when_buckets_are_fixed():
    """With one bucket per round LSH sees the whole past, like full attention: then it is exactly causal."""
    cfg = small_config("reformer", n_buckets=2, chunk_len=64)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(5), (1, 64), 0, cfg.vocab_size)
    changed = tokens.at[:, 50:].set((tokens[:, 50:] + 3) % cfg.vocab_size)
    apply = jax.jit(lambda t: ReformerLM(cfg).apply({"params": params}, t, rngs={"lsh": jax.random.key(6)}))
    np.testing.assert_allclose(apply(tokens)[:, :50], apply(changed)[:, :50], atol=1e-5)


@pytest.mark.parametrize("head, tie", [("mean", True), ("mean", False), ("concat", False)])
def test_output_heads(head, tie):
    cfg = small_config("reversible", output_head=head, tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    assert ("head_kernel" in params) == (not tie)
    width = 64 if head == "concat" else 32
    assert params["final_norm_scale"].shape == (width,)
    logits = ReformerLM(cfg).apply({"params": params}, jnp.zeros((1, 16), jnp.int32))
    assert logits.shape == (1, 16, 40)


def test_absolute_and_axial_positions():
    axial = init_params(small_config("transformer"), jax.random.key(0))["positions"]
    assert axial["axial_0"].shape == (8, 1, 16) and axial["axial_1"].shape == (1, 16, 16)
    absolute = init_params(small_config("transformer", pos_embedding="absolute"), jax.random.key(0))["positions"]
    assert absolute["pos_embed"].shape == (128, 32)


def test_bfloat16_compute_keeps_float32_logits():
    cfg = small_config("reformer", dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    logits = ReformerLM(cfg).apply({"params": params}, jnp.ones((1, 64), jnp.int32), rngs=RNGS)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_dropout_only_when_not_deterministic():
    cfg = small_config("reformer", dropout=0.2)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.ones((1, 64), jnp.int32)
    apply = lambda det, rngs: ReformerLM(cfg).apply({"params": params}, tokens, deterministic=det,  # noqa: E731
                                                   rngs=rngs)
    same = {"lsh": jax.random.key(1)}
    np.testing.assert_array_equal(apply(True, same), apply(True, same))
    a = apply(False, {**same, "dropout": jax.random.key(2)})
    b = apply(False, {**same, "dropout": jax.random.key(3)})
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("tokens, rngs, message", [
    (jnp.ones((1, 256), jnp.int32), {"lsh": jax.random.key(0)}, "longer than the model's ModelConfig.max_len=128"),
    (jnp.ones((64,), jnp.int32), {"lsh": jax.random.key(0)}, "shape [batch, length]"),
    (jnp.ones((1, 64), jnp.float32), {"lsh": jax.random.key(0)}, "integer tokens"),
    (jnp.ones((1, 64), jnp.int32), {}, "needs an 'lsh' RNG stream"),
])
def test_bad_input_is_rejected(tokens, rngs, message):
    cfg = small_config("reformer")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError) as err:
        ReformerLM(cfg).apply({"params": params}, tokens, rngs=rngs)
    assert message in str(err.value)


def test_missing_dropout_stream_is_explained():
    cfg = small_config("transformer")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a 'dropout' RNG stream"):
        ReformerLM(cfg).apply({"params": params}, jnp.ones((1, 8), jnp.int32), deterministic=False)

