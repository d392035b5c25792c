"""ReformerLM: the Flax module that owns the parameters and wires the pure blocks together.

tokens [b, l] -> embedding + positions -> layer stack (ordinary or reversible) -> final LayerNorm -> logits [b, l, V]

Parameters ("params" collection, nothing else):
  embed [V, d]; pos_embed [max_len, d] or axial_0 [l1, 1, d1], axial_1 [1, l2, d2];
  layers {attention, feed_forward} stacked on a leading layer axis (see `reformer_jax.layers`);
  final_norm {scale, bias} [w]; head {kernel [w, V] (untied only), bias [V]}, w = d (or 2d for "concat").
RNG streams: "params" (init), "lsh" (hash rotations, LSH models), "dropout" (when deterministic=False).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from reformer_jax import layers, output_head
from reformer_jax.config import ModelConfig
from reformer_jax.reversible import residual_stack, reversible_stack


def _as_typed_key(key: jax.Array) -> jax.Array:
    """Flax hands out raw uint32 keys; the stacks carry typed key arrays."""
    return jax.random.wrap_key_data(key) if key.dtype == jnp.uint32 else key


class PositionalEmbedding(nn.Module):
    """Learned positions for the first `length` positions: -> [length, d]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(stddev=0.02)
        if cfg.pos_embedding == "absolute":
            return self.param("pos_embed", init, (cfg.max_len, cfg.d_model), cfg.params_dtype)[:length]
        (l1, l2), (d1, d2) = cfg.axial_shape, cfg.axial_dims
        # Axial: [l1, 1, d1] and [1, l2, d2] broadcast to [l1, l2, d1 + d2], flattened row-major to [l, d].
        a0 = self.param("axial_0", init, (l1, 1, d1), cfg.params_dtype)
        a1 = self.param("axial_1", init, (1, l2, d2), cfg.params_dtype)
        table = jnp.concatenate([jnp.broadcast_to(a0, (l1, l2, d1)), jnp.broadcast_to(a1, (l1, l2, d2))], axis=-1)
        return table.reshape(l1 * l2, d1 + d2)[:length]


class LayerStack(nn.Module):
    """All n_layers (attention, feed-forward) layers with stacked parameters.

    Reversible: (x1, x2) -> (y1, y2) through `reversible_stack`; otherwise x -> y through `residual_stack`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, streams, keys: jax.Array, *, deterministic: bool):
        cfg = self.config
        params = {
            "attention": self.param("attention", layers.init_attention_params, cfg),
            "feed_forward": self.param("feed_forward", layers.init_feed_forward_params, cfg),
        }

        def attention_fn(p, x, key, buckets):
            return layers.attention_block(p, x, config=cfg, lsh_rng=key[0], dropout_rng=key[1],
                                          deterministic=deterministic, buckets=buckets)

        def feed_forward_fn(p, x, key, chunk_index):
            return layers.feed_forward_block(p, x, config=cfg, dropout_rng=key[1], deterministic=deterministic,
                                             chunk_index=chunk_index)

        def attention_reverse_fn(p, x, y, dy, dx, key, buckets):
            return layers.attention_block_reverse(p, x, y, dy, dx, config=cfg, dropout_rng=key[1],
                                                  deterministic=deterministic, buckets=buckets)

        if cfg.reversible:
            x1, x2 = streams
            return reversible_stack(attention_fn, feed_forward_fn, params, x1, x2, keys,
                                    ff_chunk_len=cfg.ff_chunk_len,
                                    attention_reverse_fn=attention_reverse_fn if cfg.sequential_heads else None)
        return residual_stack(attention_fn, feed_forward_fn, params, streams, keys, scan=cfg.scan_layers)


class ReformerLM(nn.Module):
    """Causal language model for all four presets of `ModelConfig`.

    __call__(tokens [b, l] int, *, deterministic=True) -> logits [b, l, vocab_size] float32.
    loss_terms(tokens, targets, weights, *, deterministic=True) -> weighted sums of the next-token loss, computed
      `config.output_chunk_len` positions at a time (what training uses: the logits are never alive whole).
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed = self.param("embed", nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
                                (cfg.vocab_size, cfg.d_model), cfg.params_dtype)
        self.positions = PositionalEmbedding(cfg)
        self.layers = LayerStack(cfg)
        width = 2 * cfg.d_model if cfg.output_head == "concat" else cfg.d_model
        self.final_norm_scale = self.param("final_norm_scale", nn.initializers.ones, (width,), cfg.params_dtype)
        self.final_norm_bias = self.param("final_norm_bias", nn.initializers.zeros, (width,), cfg.params_dtype)
        if not cfg.tie_embeddings:
            self.head_kernel = self.param("head_kernel", nn.initializers.xavier_uniform(), (width, cfg.vocab_size),
                                          cfg.params_dtype)
        self.head_bias = self.param("head_bias", nn.initializers.zeros, (cfg.vocab_size,), cfg.params_dtype)

    def _stream_keys(self, deterministic: bool):
        """Per-layer [n_layers, 2] keys (hashing, dropout) and the embedding's dropout key."""
        cfg = self.config
        placeholder = jax.random.key(0)  # stands in for a stream the configuration never draws from
        if cfg.attention == "lsh":
            if not self.has_rng("lsh"):
                raise ValueError("ReformerLM with attention='lsh' needs an 'lsh' RNG stream for the hash rotations: "
                                 "pass rngs={'lsh': jax.random.key(seed)} to init/apply.")
            lsh_key = _as_typed_key(self.make_rng("lsh"))
        else:
            lsh_key = placeholder
        uses_dropout = not deterministic and (cfg.dropout > 0 or cfg.attention_dropout > 0)
        if uses_dropout:
            if not self.has_rng("dropout"):
                raise ValueError("ReformerLM(deterministic=False) with dropout > 0 needs a 'dropout' RNG stream: "
                                 "pass rngs={'dropout': key, ...} or set deterministic=True.")
            dropout_key = _as_typed_key(self.make_rng("dropout"))
        else:
            dropout_key = placeholder
        n = cfg.n_layers
        layer_keys = jnp.stack([jax.random.split(lsh_key, n), jax.random.split(dropout_key, n + 1)[:n]], axis=1)
        return layer_keys, jax.random.split(dropout_key, n + 1)[n]

    def streams(self, tokens: jax.Array, *, deterministic: bool = True):
        """The layer stack's output: x [b, l, d], or the reversible (y1, y2)."""
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"ReformerLM expects integer tokens of shape [batch, length]; got {tokens.dtype} "
                             f"{tokens.shape}.")
        cfg.check_seq_len(tokens.shape[1])
        layer_keys, embed_dropout_key = self._stream_keys(deterministic)
        with jax.named_scope("embedding"):
            x = jnp.take(self.embed, tokens, axis=0).astype(jnp.float32)
            x = x + self.positions(tokens.shape[1]).astype(jnp.float32)
            x = layers.dropout(x, cfg.dropout, embed_dropout_key, 0, deterministic)
        if cfg.reversible:
            return tuple(self.layers((x, x), layer_keys, deterministic=deterministic))  # trax: both streams = x
        return self.layers(x, layer_keys, deterministic=deterministic)

    def head_params(self) -> output_head.HeadParams:
        return {"norm": {"scale": self.final_norm_scale, "bias": self.final_norm_bias},
                "kernel": self.embed.T if self.config.tie_embeddings else self.head_kernel, "bias": self.head_bias}

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        streams = self.streams(tokens, deterministic=deterministic)
        return output_head.head_logits(self.head_params(), streams, self.config)

    def loss_terms(self, tokens: jax.Array, targets: jax.Array, weights: jax.Array, *,
                   deterministic: bool = True):
        """{"loss_sum", "correct_sum", "weight_sum"}: weighted next-token cross-entropy (nats), correct argmax
        predictions and total weight over the batch; targets int [b, l], weights [b, l]."""
        streams = self.streams(tokens, deterministic=deterministic)
        return output_head.chunked_loss_terms(self.head_params(), streams, targets, weights, config=self.config,
                                              chunk_len=self.config.output_chunk_len)


def init_length(config: ModelConfig) -> int:
    """The shortest sequence length the model accepts: enough to create parameters (they do not depend on it)."""
    return config.chunk_len if config.attention == "lsh" else 1


@functools.partial(jax.jit, static_argnums=(0,))
def init_params(config: ModelConfig, rng: jax.Array):
    """Fresh parameters for `config` ({"params": ...} contents), traced on the shortest valid input."""
    tokens = jnp.zeros((1, init_length(config)), jnp.int32)
    params_rng, lsh_rng = jax.random.split(rng)
    return ReformerLM(config).init({"params": params_rng, "lsh": lsh_rng}, tokens)["params"]
