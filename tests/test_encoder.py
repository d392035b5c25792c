"""The bidirectional encoder's contracts at the model level: no position leaks where it must not (padding changes
no real position's output, on every attention path), the encoder does look ahead, the trunk stands alone, and the
heads' modules and losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import ModelConfig
from reformer_jax.model import heads
from reformer_jax.model.reformer_lm import (ReformerForMaskedLM, ReformerForQuestionAnswering,
                                            ReformerForSequenceClassification, ReformerLM, ReformerTrunk, init_params,
                                            model_for)

SMALL = dict(d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=64, chunk_len=8, n_hashes=2, vocab_size=30,
             causal=False, dropout=0.0, local_chunk_len=8)
PATHS = {
    "reformer (LSH, reversible, per head)": ModelConfig.preset("reformer", **SMALL, n_chunks_after=1),
    "LSH, all heads": ModelConfig.preset("lsh", **SMALL, n_chunks_after=1),
    "transformer (full)": ModelConfig.preset("transformer", **SMALL),
    "local + LSH, concat": ModelConfig.preset("reformer", **SMALL, attn_layers=("local", "lsh"), n_chunks_after=1,
                                              local_n_chunks_after=1, output_head="concat", tie_embeddings=False),
}
ROTATION_KEY = {"lsh": jax.random.key(7)}


def _tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 64), 1, 30)


@pytest.mark.parametrize("name", list(PATHS))
def test_padding_changes_no_real_position(name):
    """Whatever the padded positions hold, every real position's hidden state and the class logits are the same
    (same hash rotations: the padding has a bucket of its own)."""
    config = PATHS[name].replace(head="classification", num_labels=3)
    params = init_params(config, jax.random.key(0))
    mask = jnp.arange(64)[None, :] < jnp.array([[64], [41]])
    model = ReformerForSequenceClassification(config)
    tokens = _tokens()
    other = jnp.where(mask, tokens, _tokens(1))  # new content at the padded positions only
    assert not bool(jnp.all(other == tokens))
    both = jax.jit(lambda t: (  # (hidden states, class logits)
        model.apply({"params": params}, t, attention_mask=mask, rngs=ROTATION_KEY, method=ReformerTrunk.hidden),
        model.apply({"params": params}, t, attention_mask=mask, rngs=ROTATION_KEY)))
    (a, logits_a), (b, logits_b) = both(tokens), both(other)
    np.testing.assert_allclose(a[mask], b[mask], rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(a[~mask] - b[~mask]))) > 1e-3  # the padded positions themselves did change
    np.testing.assert_allclose(logits_a, logits_b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["transformer (full)", "local + LSH, concat"])
def test_the_encoder_looks_ahead(name):
    """Changing the last token moves the first position's output (a causal model's would not move)."""
    config = PATHS[name]
    params = init_params(config, jax.random.key(0))
    tokens = _tokens()
    changed = tokens.at[:, -1].set(tokens[:, -1] % 29 + 1)
    first = jax.jit(lambda t: ReformerForMaskedLM(config).apply({"params": params}, t, rngs=ROTATION_KEY)[:, 0])
    assert float(jnp.max(jnp.abs(first(tokens) - first(changed)))) > 1e-4


def test_model_for_picks_the_head_and_the_trunk_stands_alone():
    base = PATHS["reformer (LSH, reversible, per head)"]
    assert type(model_for(base)) is ReformerForMaskedLM
    assert type(model_for(base.replace(causal=True, n_chunks_after=0))) is ReformerLM
    assert type(model_for(base.replace(head="classification"))) is ReformerForSequenceClassification
    assert type(model_for(base.replace(head="question_answering"))) is ReformerForQuestionAnswering
    config = base.replace(head="classification", num_labels=4)
    params = init_params(config, jax.random.key(0))
    assert set(params) - set(init_params(base, jax.random.key(0))) == {"classifier"}
    trunk_params = {k: v for k, v in params.items() if k != "classifier"}
    hidden = jax.jit(lambda p: ReformerTrunk(config).apply({"params": p}, _tokens(), rngs=ROTATION_KEY))(trunk_params)
    assert hidden.shape == (2, 64, 16)
    want = jax.jit(lambda p: ReformerForSequenceClassification(config).apply(
        {"params": p}, _tokens(), rngs=ROTATION_KEY, method=ReformerTrunk.hidden))(params)
    np.testing.assert_array_equal(hidden, want)
    with pytest.raises(ValueError, match="causal=False"):
        ReformerForMaskedLM(base.replace(causal=True, n_chunks_after=0)).init(
            {"params": jax.random.key(0), "lsh": jax.random.key(1)}, _tokens())


def test_the_classification_head_drops_out_at_its_own_rate():
    # classifier_dropout=0 leaves the head deterministic in training whatever `dropout` is; None takes `dropout`.
    config = ModelConfig.preset("reformer", **{**SMALL, "dropout": 0.5}, n_chunks_after=1, head="classification")
    head_of = lambda cfg: heads.ClassificationHead(cfg)  # noqa: E731
    hidden = jax.random.normal(jax.random.key(1), (2, 64, 16))
    params = head_of(config).init(jax.random.key(0), hidden)
    plain = head_of(config).apply(params, hidden)
    train = lambda cfg: head_of(cfg).apply(params, hidden, deterministic=False,  # noqa: E731
                                           rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(train(config.replace(classifier_dropout=0.0)), plain)
    assert float(jnp.max(jnp.abs(train(config) - plain))) > 1e-3
    np.testing.assert_array_equal(train(config), train(config.replace(classifier_dropout=0.5)))
    with pytest.raises(ValueError, match="classifier_dropout=1.5 is invalid"):
        config.replace(classifier_dropout=1.5)


def test_head_losses_by_hand():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    sums = heads.classification_loss_terms(logits, jnp.array([0, 2]))
    want = -jax.nn.log_softmax(logits)[jnp.arange(2), jnp.array([0, 2])]
    np.testing.assert_allclose(sums["loss_sum"], want.sum(), rtol=1e-6)
    assert float(sums["correct_sum"]) == 1.0 and float(sums["weight_sum"]) == 2.0
    start = jnp.array([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    end = jnp.array([[0.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    sums = heads.span_loss_terms(start, end, jnp.array([0, 2]), jnp.array([3, 9]))  # the second end lies outside
    half = (-jax.nn.log_softmax(start[0])[0] - jax.nn.log_softmax(end[0])[3]) / 2
    np.testing.assert_allclose(sums["loss_sum"], half, rtol=1e-6)
    assert float(sums["correct_sum"]) == 1.0 and float(sums["weight_sum"]) == 1.0


def test_heads_need_a_bidirectional_config():
    with pytest.raises(ValueError, match="head='classification' is invalid.*causal=False"):
        ModelConfig(head="classification")
    with pytest.raises(ValueError, match="n_chunks_after=1 is invalid"):
        ModelConfig(n_chunks_after=1)
