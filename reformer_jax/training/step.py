"""The training step: loss, gradients and optimizer update as pure, jittable functions.

This is the function main.py trains with and the one `reformer_jax.xla.memory_analysis.analyze_train_step` compiles, so the
memory figures describe the real step.

A batch is a dict of arrays; a language model's ([b, l] each):
  inputs  int32   tokens fed to the model
  targets int32   the token each position predicts (the next one; a masked-LM: the original masked token)
  weights float32 1 where the position counts in the loss (0 for padding, for unmasked positions of a masked-LM
                  batch, or for the unscored half of the synthetic copy task)
  attention_mask  optional bool, True = a real token (a text's last, padded window in evaluation)
The classification and question-answering heads' batches: `reformer_jax.model.heads.batch_shapes`.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from reformer_jax import sharding
from reformer_jax.model.config import ModelConfig
from reformer_jax.model.heads import batch_shapes
from reformer_jax.model.reformer_lm import init_params, model_for, param_logical_axes

OPTIMIZERS = ("adafactor", "adamw")
Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """flax's TrainState (step, params, opt_state, apply_fn, tx)."""


def learning_rate_schedule(learning_rate: float, schedule_steps: int, warmup_steps: Optional[int] = None):
    """Linear warm-up to `learning_rate`, then cosine decay to 10% of it at `schedule_steps`."""
    if warmup_steps is None:
        warmup_steps = max(1, min(1000, schedule_steps // 10))
    warmup_steps = min(warmup_steps, max(1, schedule_steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(schedule_steps, warmup_steps + 1),
                                              end_value=0.1 * learning_rate)


def make_optimizer(name: str = "adafactor", learning_rate: float = 1e-3, *, schedule_steps: int = 10_000,
                   warmup_steps: Optional[int] = None, clip_norm: float = 1.0,
                   weight_decay: float = 0.01) -> optax.GradientTransformation:
    """Adafactor (the seed's choice) or AdamW, on a warm-up + cosine schedule, after global-norm clipping."""
    schedule = learning_rate_schedule(learning_rate, schedule_steps, warmup_steps)
    if name == "adafactor":
        optimizer = optax.adafactor(learning_rate=schedule, multiply_by_parameter_scale=False)
    elif name == "adamw":
        optimizer = optax.adamw(learning_rate=schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer={name!r} is unknown; expected one of {', '.join(map(repr, OPTIMIZERS))}.")
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)


@functools.lru_cache(maxsize=32)
def _apply_fn(config: ModelConfig):
    """One model_for(config).apply per config: TrainStates of one config and optimizer then have equal static
    fields, so a tree of their shardings (`reformer_jax.sharding.state_shardings`) fits any of them."""
    return model_for(config).apply


def create_train_state(rng: jax.Array, config: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    """Fresh parameters and optimizer state."""
    params = init_params(config, rng)
    return TrainState.create(apply_fn=_apply_fn(config), params=params, tx=tx)


def _step_rngs(rng: jax.Array, step: jax.Array) -> Dict[str, jax.Array]:
    """Per-step keys, a pure function of (seed key, step): a resumed run draws the same hashes and masks."""
    lsh_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, step))
    return {"lsh": lsh_rng, "dropout": dropout_rng}


def metrics_from_sums(sums: Dict[str, jax.Array]) -> Tuple[jax.Array, Metrics]:
    """Mean loss (nats per scored token, or per example for a classifier) and accuracy from a model's weighted
    loss sums (`batch_loss_terms`)."""
    total = jnp.maximum(sums["weight_sum"], 1.0)
    loss = sums["loss_sum"] / total
    return loss, {"loss": loss, "accuracy": sums["correct_sum"] / total, "tokens": sums["weight_sum"]}


def loss_fn(params: Any, batch: Batch, rngs: Dict[str, jax.Array], *, config: ModelConfig,
            deterministic: bool = False, lsh_rotations=None) -> Tuple[jax.Array, Metrics]:
    """The mean loss of config's head and its metrics (a language model: weighted token cross-entropy, the logits
    formed `output_chunk_len` at a time). An LM batch may carry an "attention_mask" [b, l] (True = real token)
    that keeps padding out of attention. lsh_rotations: optional fixed hash rotations [LSH layers, h, k,
    n_hashes, f / 2] instead of drawn ones."""
    model = model_for(config)
    sums = model.apply({"params": params}, batch, deterministic=deterministic, lsh_rotations=lsh_rotations,
                       rngs=rngs, method=type(model).batch_loss_terms)
    return metrics_from_sums(sums)


def loss_and_grads(params: Any, batch: Batch, rng: jax.Array, step: jax.Array, *,
                   config: ModelConfig) -> Tuple[Tuple[jax.Array, Metrics], Any]:
    """((loss, metrics), gradients) of one training batch: the step without the optimizer update."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, config=config), has_aux=True)
    return grad_fn(params, batch, _step_rngs(rng, step))


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, config: ModelConfig) -> Tuple[TrainState, Metrics]:
    """One optimizer update. Pure; jitted (state donated) by `step_builder.build_train_step`."""
    (_, metrics), grads = loss_and_grads(state.params, batch, rng, state.step, config=config)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads), metrics


def eval_step(params: Any, batch: Batch, rng: jax.Array, *, config: ModelConfig, lsh_rotations=None) -> Metrics:
    """Loss and accuracy without dropout (LSH models still hash with rotations drawn from `rng`, or with the fixed
    `lsh_rotations` [LSH layers, h, k, n_hashes, f / 2] of a converted seeded checkpoint)."""
    _, metrics = loss_fn(params, batch, {"lsh": rng}, config=config, deterministic=True, lsh_rotations=lsh_rotations)
    return metrics




def abstract_train_state(config, tx, mesh: Optional[Mesh] = None):
    """(abstract TrainState with an int32 step, its shardings over `mesh` or None): shapes only, nothing
    allocated. With a mesh, every leaf's ShapeDtypeStruct carries its sharding (as a restore target needs)."""
    abstract = jax.eval_shape(lambda k: create_train_state(k, config, tx).replace(step=jnp.zeros((), jnp.int32)),
                              jax.eval_shape(lambda: jax.random.key(0)))
    if mesh is None:
        return abstract, None
    shardings = sharding.state_shardings(abstract, mesh, param_logical_axes(config))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def abstract_batch(config: ModelConfig, batch_size: int, seq_len: int, mesh: Optional[Mesh] = None):
    """The step's abstract batch for config's head (`heads.batch_shapes`; split over data x fsdp with a mesh)."""
    batch = batch_shapes(config, batch_size, seq_len)
    if mesh is None:
        return batch
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh)) for k, v in batch.items()}
