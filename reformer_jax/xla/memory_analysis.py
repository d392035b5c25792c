"""Compile-time memory analysis of the real training step, from abstract shapes only.

`analyze_train_step` lowers and compiles the step main.py trains with (or, with optimizer=None, the loss and
gradients alone) for `jax.ShapeDtypeStruct` inputs, so nothing is allocated: a 1M-token configuration can be
measured on a laptop. It reads XLA's `compiled.memory_analysis()`:

  peak_bytes       = argument + output - alias + temp           (MaxText's headline figure)
  activation_bytes = peak - parameters - their gradients - optimizer state - batch
  floor_bytes      = parameters + gradients + optimizer state + batch + 4 x b x l x d_model x 4 bytes
                     (what no implementation can go below: the two float32 residual streams and their cotangents)

On CPU, XLA's YNNPACK library fusions hide their scratch from the accounting, so they are switched off for the
measurement (`reformer_jax.xla.compiler_options`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import jaxlib

from reformer_jax.model.config import ModelConfig
from reformer_jax.model.reformer_lm import init_params
from reformer_jax.training import step as train
from reformer_jax.xla.compiler_options import step_compiler_options


def compiler_options(backend: Optional[str] = None) -> Dict[str, str]:
    """XLA options for faithful memory accounting on this backend: the executed steps' own options
    (`reformer_jax.xla.compiler_options.step_compiler_options`: YNNPACK fusions, whose scratch the analysis cannot see, off on CPU)."""
    return step_compiler_options(backend)


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) in a pytree."""
    return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """XLA's memory analysis of one compiled step, in bytes, split into what it is for."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    param_bytes: int
    optimizer_state_bytes: int
    batch_bytes: int
    activation_bytes: int
    floor_bytes: int
    jax_version: str
    jaxlib_version: str
    backend: str

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        return (f"peak {mib(self.peak_bytes)} = parameters {mib(self.param_bytes)} + gradients "
                f"{mib(self.param_bytes)} + optimizer state {mib(self.optimizer_state_bytes)} + batch "
                f"{mib(self.batch_bytes)} + activations and temporaries {mib(self.activation_bytes)} "
                f"({self.peak_bytes / self.floor_bytes:.2f} x the floor {mib(self.floor_bytes)}) [XLA: argument {mib(self.argument_bytes)}, output {mib(self.output_bytes)}, alias "
                f"{mib(self.alias_bytes)}, temp {mib(self.temp_bytes)}; jax {self.jax_version}, {self.backend}]")


def _abstract_key() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(lambda: jax.random.key(0))


def lower_train_step(config: ModelConfig, *, batch_size: int, seq_len: int,
                     optimizer: Optional[str] = "adafactor"):
    """Lower the training step (or loss and gradients, optimizer=None) for abstract inputs.

    Returns (lowered, abstract_params, abstract_optimizer_state_or_None, abstract_batch).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer.")
    config.check_seq_len(seq_len)
    batch = train.batch_spec(batch_size, seq_len)
    key = _abstract_key()
    if optimizer is None:
        params = jax.eval_shape(functools.partial(init_params, config), key)
        step = jax.ShapeDtypeStruct((), jnp.int32)
        fn = jax.jit(functools.partial(train.loss_and_grads, config=config))
        return fn.lower(params, batch, key, step), params, None, batch
    tx = train.make_optimizer(optimizer)
    state = jax.eval_shape(lambda k: train.create_train_state(k, config, tx), key)
    lowered = train.jit_train_step(config).lower(state, batch, key)
    return lowered, state.params, state.opt_state, batch


# The floor's activation allowance: four [b, l, d_model] float32 tensors (two residual streams, two cotangents).
FLOOR_STREAMS = 4


def floor_bytes(*, param_bytes: int, optimizer_state_bytes: int, batch_bytes: int, batch_size: int, seq_len: int,
                d_model: int) -> int:
    """parameters + gradients + optimizer state + batch + 4 x batch x length x d_model x 4 bytes."""
    return (2 * param_bytes + optimizer_state_bytes + batch_bytes
            + FLOOR_STREAMS * batch_size * seq_len * d_model * jnp.dtype(jnp.float32).itemsize)


def stats_from_analysis(analysis: Any, params: Any, opt_state: Any, batch: Any, backend: str, *,
                        d_model: int) -> MemoryStats:
    """`MemoryStats` from a compiled step's `memory_analysis()` and the (abstract) step inputs.

    batch: the step's batch, its leaves [batch_size, seq_len] (for the floor's residual streams).
    """
    argument = int(analysis.argument_size_in_bytes)
    output = int(analysis.output_size_in_bytes)
    alias = int(analysis.alias_size_in_bytes)
    temp = int(analysis.temp_size_in_bytes)
    peak = argument + output - alias + temp
    param_bytes = tree_bytes(params)
    opt_bytes = tree_bytes(opt_state) if opt_state is not None else 0
    batch_bytes = tree_bytes(batch)
    batch_size, seq_len = jax.tree.leaves(batch)[0].shape[:2]
    return MemoryStats(
        argument_bytes=argument, output_bytes=output, alias_bytes=alias, temp_bytes=temp, peak_bytes=peak,
        param_bytes=param_bytes, optimizer_state_bytes=opt_bytes, batch_bytes=batch_bytes,
        activation_bytes=peak - 2 * param_bytes - opt_bytes - batch_bytes,
        floor_bytes=floor_bytes(param_bytes=param_bytes, optimizer_state_bytes=opt_bytes, batch_bytes=batch_bytes,
                                batch_size=batch_size, seq_len=seq_len, d_model=d_model),
        jax_version=jax.__version__, jaxlib_version=jaxlib.__version__, backend=backend)


def compile_train_step(config: ModelConfig, *, batch_size: int, seq_len: int, optimizer: Optional[str] = "adafactor",
                       extra_options: Optional[Dict[str, Any]] = None) -> Tuple[Any, MemoryStats]:
    """(compiled step, its MemoryStats): `analyze_train_step` that also returns the executable.

    `extra_options` are added to the backend's measuring options (e.g. XLA dump flags for a live-range timeline).
    """
    lowered, params, opt_state, batch = lower_train_step(config, batch_size=batch_size, seq_len=seq_len,
                                                         optimizer=optimizer)
    backend = jax.default_backend()
    compiled = lowered.compile({**compiler_options(backend), **(extra_options or {})})
    return compiled, stats_from_analysis(compiled.memory_analysis(), params, opt_state, batch, backend,
                                         d_model=config.d_model)


def analyze_train_step(config: ModelConfig, *, batch_size: int, seq_len: int,
                       optimizer: Optional[str] = "adafactor") -> MemoryStats:
    """Compile the real training step from abstract shapes and return XLA's memory figures.

    Args:
      config: the model.
      batch_size, seq_len: the batch shape [batch_size, seq_len].
      optimizer: "adafactor" | "adamw" for the full step (loss, gradients, update, donated state), or None for
        loss and gradients only (activation memory without the optimizer's temporaries).
    """
    return compile_train_step(config, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer)[1]
