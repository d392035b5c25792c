"""The encoder's task heads as Flax modules on the trunk's final hidden states, their losses, and their batches.

A head reads the trunk's hidden states h [b, l, w] (`reformer_jax.model.reformer_lm.ReformerTrunk`; w = 2 d_model
for the "concat" output head) and owns its own parameters, named as Hugging Face names them so checkpoints convert
one to one:
  ClassificationHead      classifier {dense {kernel [w, d], bias [d]}, out_proj {kernel [d, C], bias [C]}}:
                          h[:, 0] -> dropout -> dense -> tanh -> dropout -> out_proj -> logits [b, C]
                          (ReformerForSequenceClassification pools the first position, a [CLS]-like token).
  QuestionAnsweringHead   qa_outputs {kernel [w, 2], bias [2]}: h -> start, end logits [b, l] each.
The masked-LM head is the language model's own token head (`ReformerForMaskedLM`).

Each head's loss comes as the weighted sums the training step reduces ({loss_sum, correct_sum, weight_sum}), so one
step, one evaluation loop and one metrics function serve every task.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from reformer_jax.model.config import ModelConfig

Sums = Dict[str, jax.Array]


def _dense(features: int, axes: Tuple, config: ModelConfig, name: str) -> nn.Dense:
    """A Dense layer whose kernel and bias declare their logical axes (as every parameter of the model does)."""
    return nn.Dense(features, dtype=config.compute_dtype, param_dtype=config.params_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class ClassificationHead(nn.Module):
    """hidden [b, l, w] -> class logits [b, num_labels] float32, from the first position."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        rate = cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        dropout = nn.Dropout(rate, deterministic=deterministic)
        x = dropout(hidden[:, 0])
        x = jnp.tanh(_dense(cfg.d_model, ("embed", "mlp"), cfg, "dense")(x))
        x = dropout(x)
        return _dense(cfg.num_labels, ("mlp", None), cfg, "out_proj")(x).astype(jnp.float32)


class QuestionAnsweringHead(nn.Module):
    """hidden [b, l, w] -> (start logits [b, l], end logits [b, l]) float32; parameters kernel [w, 2], bias [2]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> Tuple[jax.Array, jax.Array]:
        cfg = self.config
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", None)),
                            (hidden.shape[-1], 2), cfg.params_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (2,), cfg.params_dtype)
        dtype = cfg.compute_dtype
        logits = (jnp.einsum("blw,wt->blt", hidden.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype))
        return logits[..., 0].astype(jnp.float32), logits[..., 1].astype(jnp.float32)


def classification_loss_terms(logits: jax.Array, labels: jax.Array, weights=None) -> Sums:
    """Sums over the batch of cross-entropy, correct predictions and examples: logits [b, C], labels int [b];
    weights [b] (default 1) leave out the rows that only fill a last evaluation batch."""
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "correct_sum": jnp.sum(correct * weights),
            "weight_sum": jnp.sum(weights)}


def span_loss_terms(start_logits: jax.Array, end_logits: jax.Array, start_positions: jax.Array,
                    end_positions: jax.Array) -> Sums:
    """Hugging Face's question-answering loss as sums: per example the mean of the start and end cross-entropies;
    an example whose start or end lies outside [0, l) is not scored (Hugging Face ignores such a position's term).
    correct_sum counts examples whose start and end are both the argmax. logits [b, l], positions int [b]."""
    length = start_logits.shape[-1]

    def one_end(logits, positions):
        inside = (positions >= 0) & (positions < length)
        safe = jnp.where(inside, positions, 0)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
        return jnp.where(inside, losses, 0.0), inside, jnp.argmax(logits, axis=-1) == positions

    start_loss, start_in, start_hit = one_end(start_logits, start_positions)
    end_loss, end_in, end_hit = one_end(end_logits, end_positions)
    scored = (start_in & end_in).astype(jnp.float32)
    return {"loss_sum": jnp.sum(scored * (start_loss + end_loss) / 2),
            "correct_sum": jnp.sum(scored * (start_hit & end_hit)), "weight_sum": jnp.sum(scored)}


def batch_shapes(config: ModelConfig, batch_size: int, seq_len: int) -> Dict[str, jax.ShapeDtypeStruct]:
    """The training batch of `config`'s head, as abstract arrays:
      "lm"                  inputs, targets int32 [b, l], weights float32 [b, l]
      "classification"      inputs int32 [b, l], attention_mask bool [b, l], labels int32 [b]
      "question_answering"  inputs int32 [b, l], attention_mask bool [b, l], start_positions, end_positions int32 [b]
    """
    b, l = batch_size, seq_len
    tokens = jax.ShapeDtypeStruct((b, l), jnp.int32)
    if config.head == "lm":
        return {"inputs": tokens, "targets": tokens, "weights": jax.ShapeDtypeStruct((b, l), jnp.float32)}
    shapes = {"inputs": tokens, "attention_mask": jax.ShapeDtypeStruct((b, l), jnp.bool_)}
    labels = ("labels",) if config.head == "classification" else ("start_positions", "end_positions")
    return {**shapes, **{name: jax.ShapeDtypeStruct((b,), jnp.int32) for name in labels}}
