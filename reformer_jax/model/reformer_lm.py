"""ReformerLM: the Flax module that owns the parameters and wires the pure blocks together.

tokens [b, l] -> embedding + positions -> layer stack (ordinary or reversible) -> final LayerNorm -> logits [b, l, V]

Parameters ("params" collection, nothing else):
  embed [V, d]; pos_embed [max_len, d] or axial_0 [l1, 1, d1], axial_1 [1, l2, d2];
  layers {attention, feed_forward} stacked on a leading layer axis (see `reformer_jax.model.layers`);
  final_norm {scale, bias} [w]; head {kernel [w, V] (untied only), bias [V]}, w = d (or 2d for "concat").
RNG streams: "params" (init), "lsh" (hash rotations, LSH models), "dropout" (when deterministic=False).
Every parameter declares its logical axes where it is created (`nn.with_logical_partitioning` here, boxed leaves
from `layers`' initialisers); `param_logical_axes(config)` reads them back, and `init_params` returns plain arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from reformer_jax.model import layers

from reformer_jax.kernels import output_head
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

    The fused per-head reverse step covers full and LSH layers without a padding mask; other layers (local
    attention, masked layers) are differentiated by the stack's generic jax.vjp of F. F and the reverse step are
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
            grid_bits=cfg.grid_bits)
        return x_prev, sharding.shard_layer_grads(grads, attention_axes), dx

    fused = cfg.sequential_heads and kind != "local" and attention_mask is None
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


class ReformerLM(nn.Module):
    """Causal language model for all four presets of `ModelConfig`.

    __call__(tokens [b, l] int, *, deterministic=True) -> logits [b, l, vocab_size] float32.
    loss_terms(tokens, targets, weights, *, deterministic=True) -> weighted sums of the next-token loss, computed
      `config.output_chunk_len` positions at a time (what training uses: the logits are never alive whole).
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.embed = self.param("embed", nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.d_model), cfg.params_dtype)
        self.positions = PositionalEmbedding(cfg)
        self.layers = LayerStack(cfg)
        width = 2 * cfg.d_model if cfg.output_head == "concat" else cfg.d_model
        along = nn.with_logical_partitioning  # an initialiser whose parameter names its axes
        self.final_norm_scale = self.param("final_norm_scale", along(nn.initializers.ones, ("embed",)), (width,),
                                           cfg.params_dtype)
        self.final_norm_bias = self.param("final_norm_bias", along(nn.initializers.zeros, ("embed",)), (width,),
                                          cfg.params_dtype)
        if not cfg.tie_embeddings:
            self.head_kernel = self.param("head_kernel", along(nn.initializers.xavier_uniform(), ("embed", "vocab")),
                                          (width, cfg.vocab_size), cfg.params_dtype)
        self.head_bias = self.param("head_bias", along(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                                    cfg.params_dtype)

    def _stream_keys(self, deterministic: bool, draws_rotations: bool):
        """Per-layer [n_layers, 2] keys (hashing, dropout) and the embedding's dropout key."""
        cfg = self.config
        placeholder = jax.random.key(0)  # stands in for a stream the configuration never draws from
        if draws_rotations:
            if not self.has_rng("lsh"):
                raise ValueError("ReformerLM with attention='lsh' needs an 'lsh' RNG stream for the hash rotations: "
                                 "pass rngs={'lsh': jax.random.key(seed)} to init/apply.")
            lsh_key = _as_typed_key(self.make_rng("lsh"))
        else:
            lsh_key = placeholder
        uses_dropout = not deterministic and (cfg.dropout > 0 or cfg.attention_dropout > 0
                                              or (cfg.uses("local") and cfg.local_attention_dropout > 0))
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
            raise ValueError(f"ReformerLM: lsh_rotations have shape {tuple(lsh_rotations.shape)}; expected "
                             f"{expected} ([LSH layers, heads, d_head, n_hashes, sum(n_buckets factors) / 2]).")
        spread = jnp.zeros((cfg.n_layers,) + expected[1:], jnp.float32).at[jnp.array(lsh_layers)].set(lsh_rotations)
        return {"rng": layer_keys, "rotations": spread}

    def streams(self, tokens: jax.Array, *, deterministic: bool = True, attention_mask=None, lsh_rotations=None):
        """The layer stack's output: x [b, l, d], or the reversible (y1, y2). Arguments as for `__call__`."""
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"ReformerLM expects integer tokens of shape [batch, length]; got {tokens.dtype} "
                             f"{tokens.shape}.")
        cfg.check_seq_len(tokens.shape[1])
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(tokens.shape):
                raise ValueError(f"ReformerLM: attention_mask has shape {tuple(attention_mask.shape)}; expected the "
                                 f"tokens' shape {tuple(tokens.shape)} (1 = real token, 0 = padding).")
            attention_mask = attention_mask.astype(bool)
        if lsh_rotations is not None and cfg.n_buckets is None:
            raise ValueError("ReformerLM: lsh_rotations need an explicit ModelConfig.n_buckets (their width is "
                             "sum(n_buckets factors) / 2).")
        layer_keys, embed_dropout_key = self._stream_keys(deterministic, cfg.uses("lsh") and lsh_rotations is None)
        layer_inputs = self._layer_inputs(layer_keys, lsh_rotations)
        with jax.named_scope("embedding"):
            x = jnp.take(self.embed, tokens, axis=0).astype(jnp.float32)
            x = x + self.positions(tokens.shape[1]).astype(jnp.float32)
            x = layers.dropout(x, cfg.dropout, embed_dropout_key, 0, deterministic)
        if cfg.reversible:
            x = to_grid(x, cfg.grid_bits)  # the stack's inputs on its exact-reversal grid (0: unchanged)
            # trax: both streams start as x
            return tuple(self.layers((x, x), layer_inputs, deterministic=deterministic,
                                     attention_mask=attention_mask))
        return self.layers(x, layer_inputs, deterministic=deterministic, attention_mask=attention_mask)

    def head_params(self) -> output_head.HeadParams:
        return {"norm": {"scale": self.final_norm_scale, "bias": self.final_norm_bias},
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
        length = tokens.shape[-1] if tokens.ndim == 2 else None
        padded = self.config.padded_length(length) if length else length
        if padded != length:
            mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
            attention_mask = jnp.pad(mask, ((0, 0), (0, padded - length)))
            tokens = jnp.pad(tokens, ((0, 0), (0, padded - length)))
        streams = self.streams(tokens, deterministic=deterministic, attention_mask=attention_mask,
                               lsh_rotations=lsh_rotations)
        return output_head.head_logits(self.head_params(), streams, output_head_spec(self.config))[:, :length]

    def loss_terms(self, tokens: jax.Array, targets: jax.Array, weights: jax.Array, *,
                   deterministic: bool = True, attention_mask=None, lsh_rotations=None):
        """{"loss_sum", "correct_sum", "weight_sum"}: weighted next-token cross-entropy (nats), correct argmax
        predictions and total weight over the batch; targets int [b, l], weights [b, l]; attention_mask and
        lsh_rotations as for `__call__`."""
        streams = self.streams(tokens, deterministic=deterministic, attention_mask=attention_mask,
                               lsh_rotations=lsh_rotations)
        return output_head.chunked_loss_terms(self.head_params(), streams, targets, weights, spec=output_head_spec(self.config),
                                              chunk_len=self.config.output_chunk_len)


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
    return ReformerLM(config).init({"params": params_rng, "lsh": lsh_rng}, tokens)["params"]


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
