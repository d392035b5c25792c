"""The Flax modules that own the parameters and wire the pure blocks together: the trunk and its heads.

ReformerTrunk:  tokens [b, l] -> embedding + positions -> layer stack (ordinary or reversible) -> final LayerNorm
                -> hidden states [b, l, w]
ReformerLM:     the trunk -> token logits [b, l, V] (next token; ReformerForMaskedLM: masked tokens, bidirectional)
ReformerForSequenceClassification / ReformerForQuestionAnswering: the trunk -> `heads`' class / span logits.
`model_for(config)` picks the module of config.head; every one has `batch_loss_terms`, what training calls.

Parameters ("params" collection, nothing else):
  embed [V, d]; pos_embed [max_len, d] or axial_0 [l1, 1, d1], axial_1 [1, l2, d2];
  layers {attention, feed_forward} stacked on a leading layer axis (see `reformer_jax.model.layers`);
  final_norm {scale, bias} [w], w = d (or 2d for "concat"); then the head's own: head {kernel [w, V] (untied
  only), bias [V]} for the token head, classifier {...} or qa_outputs {...} (`reformer_jax.model.heads`).
RNG streams: "params" (init), "lsh" (hash rotations, LSH models), "dropout" (when deterministic=False).
Every parameter declares its logical axes where it is created (`nn.with_logical_partitioning` here, boxed leaves
from `layers`' initialisers); `param_logical_axes(config)` reads them back, and `init_params` returns plain arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from reformer_jax.model import heads, layers

from reformer_jax.kernels import output_head
from reformer_jax.kernels.norm import layer_norm
from reformer_jax.model.config import ModelConfig
from reformer_jax.kernels.reversible import residual_stack, reversible_stack, to_grid
from reformer_jax import sharding


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
            return self.param("pos_embed", nn.with_logical_partitioning(init, ("positions", "embed")),
                              (cfg.max_len, cfg.d_model), cfg.params_dtype)[:length]
        (l1, l2), (d1, d2) = cfg.axial_shape, cfg.axial_dims
        # Axial: [l1, 1, d1] and [1, l2, d2] broadcast to [l1, l2, d1 + d2], flattened row-major to [l, d].
        axial = nn.with_logical_partitioning(init, ("positions", "positions", "embed"))
        a0 = self.param("axial_0", axial, (l1, 1, d1), cfg.params_dtype)
        a1 = self.param("axial_1", axial, (1, l2, d2), cfg.params_dtype)
        table = jnp.concatenate([jnp.broadcast_to(a0, (l1, l2, d1)), jnp.broadcast_to(a1, (l1, l2, d2))], axis=-1)
        return table.reshape(l1 * l2, d1 + d2)[:length]


def layer_period(layer_types) -> int:
    """Length of the shortest group of layer types that repeats through the stack: ("local", "lsh") * 6 -> 2."""
    n = len(layer_types)
    return next(p for p in range(1, n + 1) if n % p == 0 and tuple(layer_types) == tuple(layer_types[:p]) * (n // p))


def _init_mixed_attention(rng: jax.Array, config: ModelConfig):
    """Attention parameters of a mixed stack: {type: that type's layers stacked in order}."""
    types = sorted(set(config.layer_types))
    return {t: layers.init_attention_params_with_axes(r, config, t, n_layers=config.layer_types.count(t))
            for t, r in zip(types, jax.random.split(rng, len(types)))}


def _key_of(layer_inputs) -> jax.Array:
    """A layer's [2] key array (hashing, dropout) from its inputs: the keys, or {"rng": keys, "rotations": ...}."""
    return layer_inputs["rng"] if isinstance(layer_inputs, dict) else layer_inputs


def block_functions(cfg: ModelConfig, kind: str, *, deterministic: bool, attention_mask=None):
    """(F, G, F's fused reverse step or None) of one layer of attention type `kind`, as the stacks call them
    (`reformer_jax.kernels.reversible`): F(p, x, inputs, buckets), G(p, x, inputs, chunk_index),
    reverse(p, x2, y1, dy1, dy2, inputs, buckets); `inputs` is the layer's key array or {"rng", "rotations"}.

    The fused per-head reverse step covers full and LSH layers without a padding mask (or with one in a
    bidirectional model); other layers (local attention, causal masked layers) are differentiated by the stack's generic jax.vjp of F. F and the reverse step are
    those of a stack on config.grid_bits's grid (`reformer_jax.kernels.reversible`); pass that grid to the stack.
    """

    # On a mesh (`reformer_jax.sharding`): each layer's parameters gathered over fsdp where it runs and its
    # gradients reduce-scattered into their shards; the activations stay split over the batch.
    attention_axes, feed_forward_axes = layer_logical_axes(cfg, kind)

    def attention_fn(p, x, inputs, buckets):
        p, x = sharding.gather_layer_params(p, attention_axes), sharding.constrain_batch(x)
        key, rotations = _key_of(inputs), (inputs["rotations"] if isinstance(inputs, dict) else None)
        return layers.attention_block(p, x, config=cfg, lsh_rng=key[0], dropout_rng=key[1],
                                      deterministic=deterministic, buckets=buckets, attention_type=kind,
                                      rotations=rotations if kind == "lsh" else None, attention_mask=attention_mask,
                                      grid_bits=cfg.grid_bits)

    def feed_forward_fn(p, x, inputs, chunk_index):
        p, x = sharding.gather_layer_params(p, feed_forward_axes), sharding.constrain_batch(x)
        return layers.feed_forward_block(p, x, config=cfg, dropout_rng=_key_of(inputs)[1],
                                         deterministic=deterministic, chunk_index=chunk_index)

    def attention_reverse_fn(p, x, y, dy, dx, inputs, buckets):
        x_prev, grads, dx = layers.attention_block_reverse(
            sharding.gather_layer_params(p, attention_axes), sharding.constrain_batch(x), y, dy, dx, config=cfg,
            dropout_rng=_key_of(inputs)[1], deterministic=deterministic, buckets=buckets, attention_type=kind,
            attention_mask=attention_mask, grid_bits=cfg.grid_bits)
        return x_prev, sharding.shard_layer_grads(grads, attention_axes), dx

    # A causal layer's padding reorders positions, which the fused step does not replay.
    fused = cfg.sequential_heads and kind != "local" and (attention_mask is None or not cfg.causal)
    return attention_fn, feed_forward_fn, attention_reverse_fn if fused else None


class LayerStack(nn.Module):
    """All n_layers (attention, feed-forward) layers with stacked parameters.

    Reversible: (x1, x2) -> (y1, y2) through `reversible_stack`; otherwise x -> y through `residual_stack`.
    One attention type: "attention" holds every layer's parameters stacked. Mixed types (`attn_layers`):
    "attention" is {type: the layers of that type, stacked in order}, and the stacks scan over the repeating
    group of layer types (`layer_period`), so local and LSH layers each keep their own parameters.
    `layer_inputs` is the [n, 2] key array, or {"rng": keys, "rotations": [n, h, k, r, f / 2]} with explicit
    hash rotations.
    With `sequential_heads`, full and LSH layers run one head at a time and a reversible stack uses their fused
    reverse step (`layers.attention_block_reverse`). Local layers, and every layer when an `attention_mask` is
    given, fall back to the generic reversible backward (jax.vjp of the block; the forward of a masked full / LSH
    layer is still per head); local layers compute all heads at once.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, streams, layer_inputs, *, deterministic: bool, attention_mask=None):
        cfg = self.config
        types = cfg.layer_types
        period = layer_period(types)

        blocks = {kind: block_functions(cfg, kind, deterministic=deterministic, attention_mask=attention_mask)
                  for kind in set(types)}
        feed_forward_fn = blocks[types[0]][1]

        feed_forward = self.param("feed_forward", layers.init_feed_forward_params_with_axes, cfg)
        if period == 1:
            attention = self.param("attention", layers.init_attention_params_with_axes, cfg, types[0])
            attention_fn, _, reverse_fn = blocks[types[0]]
        else:
            by_type = self.param("attention", _init_mixed_attention, cfg)
            groups = cfg.n_layers // period
            group = lambda tree: jax.tree.map(  # noqa: E731  [n, ...] -> [G, period, ...]
                lambda leaf: leaf.reshape((groups, period) + leaf.shape[1:]), tree)
            # Pattern position j is the m-th layer of its type within a group: that type's stack, viewed as
            # [G, layers of the type per group, ...], sliced at m.
            attention, attention_fn = [], []
            for j, kind in enumerate(types[:period]):
                per_group, m = types[:period].count(kind), types[:j].count(kind)
                attention.append(jax.tree.map(
                    lambda leaf: leaf.reshape((groups, per_group) + leaf.shape[1:])[:, m], by_type[kind]))
                attention_fn.append(blocks[kind][0])
            attention, attention_fn = tuple(attention), tuple(attention_fn)
            reverse_fn = tuple(blocks[kind][2] for kind in types[:period])
            feed_forward, layer_inputs = group(feed_forward), group(layer_inputs)
        params = {"attention": attention, "feed_forward": feed_forward}
        if cfg.reversible:
            x1, x2 = streams
            return reversible_stack(attention_fn, feed_forward_fn, params, x1, x2, layer_inputs,
                                    ff_chunk_len=cfg.ff_chunk_len, attention_reverse_fn=reverse_fn,
                                    grid_bits=cfg.grid_bits)
        return residual_stack(attention_fn, feed_forward_fn, params, streams, layer_inputs, scan=cfg.scan_layers)


class ReformerTrunk(nn.Module):
    """The shared trunk of every Reformer model: tokens [b, l] -> hidden states [b, l, w] float32.

    Token embedding + positions -> the layer stack (ordinary or reversible) -> the streams combined (mean, or
    concatenated for the "concat" head: w = 2d) -> the final LayerNorm, which is Hugging Face's ReformerModel's
    `last_hidden_state`. The heads (`ReformerLM` here, the encoder heads in `reformer_jax.model.heads`) add their
    own parameters on top; bring your own head by applying the trunk and reading `__call__`'s hidden states.

    Parameters: embed [V, d], positions, layers, final_norm_scale / final_norm_bias [w].
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.embed = self.param("embed", nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.d_model), cfg.params_dtype)
        self.positions = PositionalEmbedding(cfg)
        self.layers = LayerStack(cfg)
        along = nn.with_logical_partitioning  # an initialiser whose parameter names its axes
        self.final_norm_scale = self.param("final_norm_scale", along(nn.initializers.ones, ("embed",)),
                                           (hidden_width(cfg),), cfg.params_dtype)
        self.final_norm_bias = self.param("final_norm_bias", along(nn.initializers.zeros, ("embed",)),
                                          (hidden_width(cfg),), cfg.params_dtype)

    def _stream_keys(self, deterministic: bool, draws_rotations: bool):
        """Per-layer [n_layers, 2] keys (hashing, dropout) and the embedding's dropout key."""
        cfg = self.config
        name = type(self).__name__
        placeholder = jax.random.key(0)  # stands in for a stream the configuration never draws from
        if draws_rotations:
            if not self.has_rng("lsh"):
                raise ValueError(f"{name} with LSH attention needs an 'lsh' RNG stream for the hash rotations: "
                                 "pass rngs={'lsh': jax.random.key(seed)} to init/apply.")
            lsh_key = _as_typed_key(self.make_rng("lsh"))
        else:
            lsh_key = placeholder
        if uses_dropout(cfg, deterministic):
            if not self.has_rng("dropout"):
                raise ValueError(f"{name}(deterministic=False) with dropout > 0 needs a 'dropout' RNG stream: "
                                 "pass rngs={'dropout': key, ...} or set deterministic=True.")
            dropout_key = _as_typed_key(self.make_rng("dropout"))
        else:
            dropout_key = placeholder
        n = cfg.n_layers
        layer_keys = jnp.stack([jax.random.split(lsh_key, n), jax.random.split(dropout_key, n + 1)[:n]], axis=1)
        return layer_keys, jax.random.split(dropout_key, n + 1)[n]

    def _layer_inputs(self, layer_keys: jax.Array, lsh_rotations):
        """The stack's per-layer inputs: the keys, with explicit rotations [n_lsh, h, k, r, f / 2] spread to
        [n_layers, ...] (zeros at non-LSH layers, which never read them)."""
        if lsh_rotations is None:
            return layer_keys
        cfg = self.config
        lsh_layers = [i for i, t in enumerate(cfg.layer_types) if t == "lsh"]
        columns = sum(f // 2 for f in (cfg.n_buckets if isinstance(cfg.n_buckets, tuple) else (cfg.n_buckets,)))
        expected = (len(lsh_layers), cfg.n_heads, cfg.d_head, cfg.n_hashes, columns)
        if tuple(lsh_rotations.shape) != expected:
            raise ValueError(f"{type(self).__name__}: lsh_rotations have shape {tuple(lsh_rotations.shape)}; "
                             f"expected {expected} ([LSH layers, heads, d_head, n_hashes, sum(n_buckets factors) / 2]).")
        spread = jnp.zeros((cfg.n_layers,) + expected[1:], jnp.float32).at[jnp.array(lsh_layers)].set(lsh_rotations)
        return {"rng": layer_keys, "rotations": spread}

    def streams(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None, lsh_rotations=None):
        """The layer stack's output: x [b, l, d], or the reversible (y1, y2), for a length the layers run on.
        Arguments as for `__call__`."""
        cfg = self.config
        name = type(self).__name__
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{name} expects integer tokens of shape [batch, length]; got {tokens.dtype} "
                             f"{tokens.shape}.")
        cfg.check_seq_len(tokens.shape[1])
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(tokens.shape):
                raise ValueError(f"{name}: attention_mask has shape {tuple(attention_mask.shape)}; expected the "
                                 f"tokens' shape {tuple(tokens.shape)} (1 = real token, 0 = padding).")
            attention_mask = attention_mask.astype(bool)
        if lsh_rotations is not None and cfg.n_buckets is None:
            raise ValueError(f"{name}: lsh_rotations need an explicit ModelConfig.n_buckets (their width is "
                             "sum(n_buckets factors) / 2).")
        layer_keys, embed_dropout_key = self._stream_keys(deterministic, cfg.uses("lsh") and lsh_rotations is None)
        layer_inputs = self._layer_inputs(layer_keys, lsh_rotations)
        with jax.named_scope("embedding"):
            x = jnp.take(self.embed, tokens, axis=0).astype(jnp.float32)
            x = x + self.positions(tokens.shape[1]).astype(jnp.float32)
            x = layers.replayed_dropout(x, cfg.dropout, embed_dropout_key, 0, deterministic)
        if cfg.reversible:
            x = to_grid(x, cfg.grid_bits)  # the stack's inputs on its exact-reversal grid (0: unchanged)
            # trax: both streams start as x
            return tuple(self.layers((x, x), layer_inputs, deterministic=deterministic,
                                     attention_mask=attention_mask))
        return self.layers(x, layer_inputs, deterministic=deterministic, attention_mask=attention_mask)

    def padded_streams(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None,
                       lsh_rotations=None):
        """`streams` for any length l up to max_len: a length the attention layers cannot run on (not a multiple of
        the chunk lengths) is padded at the end to `config.padded_length(l)` and the padding masked, as Hugging
        Face pads in evaluation. Returns (streams over the padded length, l)."""
        length = tokens.shape[-1] if tokens.ndim == 2 else None
        padded = self.config.padded_length(length) if length else length
        if padded != length:
            mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
            attention_mask = jnp.pad(mask, ((0, 0), (0, padded - length)))
            tokens = jnp.pad(tokens, ((0, 0), (0, padded - length)))
        return self.streams(tokens, deterministic=deterministic, attention_mask=attention_mask,
                            lsh_rotations=lsh_rotations), length

    def final_norm(self) -> dict:
        return {"scale": self.final_norm_scale, "bias": self.final_norm_bias}

    def hidden(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None,
               lsh_rotations=None) -> jax.Array:
        """tokens [b, l] -> the final hidden states [b, l, w] float32 (w = 2 d_model for the "concat" head)."""
        streams, length = self.padded_streams(tokens, deterministic=deterministic, attention_mask=attention_mask,
                                              lsh_rotations=lsh_rotations)
        combined = output_head.combine_streams(streams, self.config.output_head)
        return layer_norm(combined, self.final_norm(), self.config.layer_norm_eps)[:, :length]

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None,
                 lsh_rotations=None) -> jax.Array:
        """`hidden`: tokens [b, l] -> [b, l, w]; arguments as for `ReformerLM.__call__`."""
        return self.hidden(tokens, deterministic=deterministic, attention_mask=attention_mask,
                           lsh_rotations=lsh_rotations)


class ReformerLM(ReformerTrunk):
    """The language model for all four presets of `ModelConfig`: the trunk and a token head at every position
    (next-token with causal=True; `reformer_jax.model.heads.ReformerForMaskedLM` is its bidirectional twin).

    __call__(tokens [b, l] int, *, deterministic=True) -> logits [b, l, vocab_size] float32.
    loss_terms(tokens, targets, weights, *, deterministic=True) -> weighted sums of the token loss, computed
      `config.output_chunk_len` positions at a time (what training uses: the logits are never alive whole).
    batch_loss_terms(batch, ...) -> the same sums from a training batch {inputs, targets, weights[, attention_mask]}.
    """

    def setup(self):
        super().setup()
        cfg = self.config
        along = nn.with_logical_partitioning
        if not cfg.tie_embeddings:
            self.head_kernel = self.param("head_kernel", along(nn.initializers.xavier_uniform(), ("embed", "vocab")),
                                          (hidden_width(cfg), cfg.vocab_size), cfg.params_dtype)
        self.head_bias = self.param("head_bias", along(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                                    cfg.params_dtype)

    def head_params(self) -> output_head.HeadParams:
        return {"norm": self.final_norm(),
                "kernel": self.embed.T if self.config.tie_embeddings else self.head_kernel, "bias": self.head_bias}

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None,
                 lsh_rotations=None) -> jax.Array:
        """tokens [b, l] -> logits [b, l, V], for any length l up to max_len.

        A length the attention layers cannot run on (not a multiple of the chunk lengths) is padded at the end to
        `config.padded_length(l)` and the padding masked, as Hugging Face pads in evaluation; the logits of the l
        tokens are returned.
        attention_mask: optional [b, l] (1 / True = real token, 0 / False = padding): padded keys are masked in
          every layer and padded positions get their own bucket in LSH layers (Hugging Face's semantics), so the
          real tokens' logits do not depend on the padding's content.
        lsh_rotations: optional explicit hash projections [LSH layers, h, k, n_hashes, sum(n_buckets factors) / 2]
          instead of random ones (needs an explicit `n_buckets`); then no 'lsh' RNG stream is needed.
        """
        streams, length = self.padded_streams(tokens, deterministic=deterministic, attention_mask=attention_mask,
                                              lsh_rotations=lsh_rotations)
        return output_head.head_logits(self.head_params(), streams, output_head_spec(self.config))[:, :length]

    def loss_terms(self, tokens: jax.Array, targets: jax.Array, weights: jax.Array, *,
                   deterministic: bool = True, attention_mask=None, lsh_rotations=None):
        """{"loss_sum", "correct_sum", "weight_sum"}: weighted cross-entropy (nats) of each position's target,
        correct argmax predictions and total weight over the batch; targets int [b, l], weights [b, l];
        attention_mask and lsh_rotations as for `__call__`."""
        streams = self.streams(tokens, deterministic=deterministic, attention_mask=attention_mask,
                               lsh_rotations=lsh_rotations)
        return output_head.chunked_loss_terms(self.head_params(), streams, targets, weights,
                                              spec=output_head_spec(self.config),
                                              chunk_len=self.config.output_chunk_len)

    def batch_loss_terms(self, batch, *, deterministic: bool = True, lsh_rotations=None):
        """`loss_terms` of a training batch {inputs, targets, weights [b, l], optional attention_mask [b, l]}."""
        return self.loss_terms(batch["inputs"], batch["targets"], batch["weights"], deterministic=deterministic,
                               attention_mask=batch.get("attention_mask"), lsh_rotations=lsh_rotations)


class ReformerForMaskedLM(ReformerLM):
    """`ReformerLM` with bidirectional attention (config.causal False), trained to predict masked tokens: the same
    parameters and token head (Hugging Face's ReformerForMaskedLM). Its batches mark the masked positions with
    weights 1 and carry the original tokens as targets (`reformer_jax.training.data.mask_tokens`)."""

    def setup(self):
        if self.config.causal:
            raise ValueError("ReformerForMaskedLM needs a bidirectional config (causal=False); a causal model is "
                             "ReformerLM.")
        super().setup()


class ReformerForSequenceClassification(ReformerTrunk):
    """The trunk and a classification head on its first position (`heads.ClassificationHead`).

    __call__(tokens [b, l], *, deterministic=True, attention_mask=None) -> logits [b, config.num_labels].
    batch_loss_terms({inputs, attention_mask, labels [b], optional weights [b]}) -> the loss sums of the step.
    """

    def setup(self):
        super().setup()
        self.classifier = heads.ClassificationHead(self.config)

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None,
                 lsh_rotations=None) -> jax.Array:
        return self.classifier(self.hidden(tokens, deterministic=deterministic, attention_mask=attention_mask,
                                           lsh_rotations=lsh_rotations), deterministic=deterministic)

    def batch_loss_terms(self, batch, *, deterministic: bool = True, lsh_rotations=None):
        logits = self(batch["inputs"], deterministic=deterministic, attention_mask=batch["attention_mask"],
                      lsh_rotations=lsh_rotations)
        return heads.classification_loss_terms(logits, batch["labels"], batch.get("weights"))


class ReformerForQuestionAnswering(ReformerTrunk):
    """The trunk and a span head (`heads.QuestionAnsweringHead`).

    __call__(tokens [b, l], *, attention_mask=None) -> (start logits [b, l], end logits [b, l]).
    batch_loss_terms({inputs, attention_mask, start_positions, end_positions [b]}) -> the loss sums.
    """

    def setup(self):
        super().setup()
        self.qa_outputs = heads.QuestionAnsweringHead(self.config)

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None,
                 lsh_rotations=None):
        return self.qa_outputs(self.hidden(tokens, deterministic=deterministic, attention_mask=attention_mask,
                                           lsh_rotations=lsh_rotations))

    def batch_loss_terms(self, batch, *, deterministic: bool = True, lsh_rotations=None):
        start, end = self(batch["inputs"], deterministic=deterministic, attention_mask=batch["attention_mask"],
                          lsh_rotations=lsh_rotations)
        return heads.span_loss_terms(start, end, batch["start_positions"], batch["end_positions"])


def model_for(config: ModelConfig) -> ReformerTrunk:
    """The Flax module of `config`: its head (config.head) on the trunk; a bidirectional "lm" head is the
    masked-LM model. Every module has `batch_loss_terms(batch, ...)`, what the training step calls."""
    if config.head == "classification":
        return ReformerForSequenceClassification(config)
    if config.head == "question_answering":
        return ReformerForQuestionAnswering(config)
    return ReformerLM(config) if config.causal else ReformerForMaskedLM(config)


def hidden_width(config: ModelConfig) -> int:
    """w, the width of the final hidden states: 2 d_model for the "concat" head (both streams), else d_model."""
    return 2 * config.d_model if config.output_head == "concat" else config.d_model


def uses_dropout(config: ModelConfig, deterministic: bool) -> bool:
    """Whether a forward pass draws dropout masks (and so needs a 'dropout' RNG stream)."""
    return not deterministic and (config.dropout > 0 or config.attention_dropout > 0
                                  or (config.uses("local") and config.local_attention_dropout > 0))


def output_head_spec(config: ModelConfig) -> output_head.HeadSpec:
    """The output head's static settings for `config` (how the streams meet, LayerNorm eps, compute dtype)."""
    return output_head.HeadSpec(combine=config.output_head, layer_norm_eps=config.layer_norm_eps,
                                dtype=config.compute_dtype)


def init_length(config: ModelConfig) -> int:
    """The shortest sequence length the model accepts: enough to create parameters (they do not depend on it)."""
    return config.chunk_len if config.uses("lsh") else 1


def _init_with_axes(config: ModelConfig, rng: jax.Array):
    """The "params" collection as created: every leaf an `nn.LogicallyPartitioned` (its value and axis names),
    traced on the shortest valid input."""
    tokens = jnp.zeros((1, init_length(config)), jnp.int32)
    params_rng, lsh_rng = jax.random.split(rng)
    return model_for(config).init({"params": params_rng, "lsh": lsh_rng}, tokens)["params"]


@functools.partial(jax.jit, static_argnums=(0,))
def init_params(config: ModelConfig, rng: jax.Array):
    """Fresh parameters for `config` ({"params": ...} contents): plain arrays."""
    return nn.unbox(_init_with_axes(config, rng))


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def declared_axes(boxed):
    """A parameter tree whose leaves are `nn.LogicallyPartitioned` -> the same tree of logical-name tuples.

    A ValueError naming the parameter's path if a leaf declares no axes, or a number of names other than its
    number of dimensions.
    """
    def names(path, leaf):
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError(f"parameter {where} (shape {tuple(leaf.shape)}) declares no logical axes; create it "
                             "with nn.with_logical_partitioning(init, names) or return nn.LogicallyPartitioned(value, "
                             "names) from its initialiser.")
        if len(leaf.names) != leaf.value.ndim:
            raise ValueError(f"parameter {where} declares the logical axes {tuple(leaf.names)} for its "
                             f"{leaf.value.ndim} dimensions (shape {tuple(leaf.value.shape)}); name each dimension "
                             "once.")
        return tuple(leaf.names)

    return jax.tree_util.tree_map_with_path(names, boxed, is_leaf=_is_box)


def param_logical_axes(config: ModelConfig):
    """The logical axis names of every parameter of `config`: a tree like `init_params(config, rng)` whose leaves
    are tuples (one name per dimension: vocab, embed, heads, kv, mlp, layers, positions), as each parameter
    declares them where it is created. Shapes only: nothing is computed or allocated."""
    return declared_axes(jax.eval_shape(functools.partial(_init_with_axes, config), jax.random.key(0)))


def layer_logical_axes(config: ModelConfig, attention_type: str):
    """(attention, feed_forward): the logical axes of one layer's parameters as its blocks receive them (a layer of
    `attention_type`), trees of name tuples: those the stacked initialisers declare, less the leading layer axis."""
    key = jax.random.key(0)
    one_layer = lambda init: jax.tree.map(  # noqa: E731
        lambda names: names[1:], declared_axes(jax.eval_shape(init)), is_leaf=lambda x: isinstance(x, tuple))
    return (one_layer(lambda: layers.init_attention_params_with_axes(key, config, attention_type)),
            one_layer(lambda: layers.init_feed_forward_params_with_axes(key, config)))
