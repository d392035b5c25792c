"""XLA's compile-time memory figures of a compiled training step, read into `MemoryStats`.

The step is built and compiled from abstract shapes by `reformer_jax.training.step_builder` (`analyze_train_step`,
public as `reformer_jax.memory`), so nothing is allocated: a 1M-token configuration can be measured on a laptop.
This module knows nothing of the model or the training step (it sits below `training/`); it reads
`compiled.memory_analysis()`:

  peak_bytes       = argument + output - alias + temp           (MaxText's headline figure)
  activation_bytes = peak - parameters - their gradients - optimizer state - batch
  floor_bytes      = parameters + gradients + optimizer state + batch + 4 x b x l x d_model x 4 bytes
                     (what no implementation can go below: the two float32 residual streams and their cotangents)

On CPU, XLA's YNNPACK library fusions hide their scratch from the accounting, so they are switched off for the
measurement (`reformer_jax.xla.compiler_options`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import jaxlib

from reformer_jax.xla.compiler_options import step_compiler_options


def compiler_options(backend: Optional[str] = None) -> Dict[str, str]:
    """XLA options for faithful memory accounting on this backend: the executed steps' own options
    (`reformer_jax.xla.compiler_options.step_compiler_options`: YNNPACK fusions, whose scratch the analysis cannot see, off on CPU)."""
    return step_compiler_options(backend)


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) in a pytree."""
    return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def _shard_shape(leaf: Any) -> Tuple[int, ...]:
    """The shape one device holds of a leaf: its sharding's shard shape, or the whole shape without one."""
    sharding = getattr(leaf, "sharding", None)
    return tuple(sharding.shard_shape(tuple(leaf.shape))) if sharding is not None else tuple(leaf.shape)


def device_tree_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree whose leaves carry shardings (arrays, or ShapeDtypeStructs made with
    sharding=...): the largest shard of every leaf; a leaf without a sharding counts whole."""
    return int(sum(math.prod(_shard_shape(leaf)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


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
    # Where it runs: every byte figure above is per device (parameters, optimizer state and batch: the shards one
    # device holds), for `device_count` devices of `device_kind` laid out as `mesh_shape` (data, fsdp, tensor).
    device_kind: str = ""
    device_count: int = 1
    mesh_shape: str = ""
    topology: str = ""  # a TPU slice compiled for without its chips (`reformer_jax.xla.tpu`), e.g. "v5e:4x4"
    hbm_bytes: int = 0  # HBM per chip of that slice the TPU compiler lets a program use (`tpu.usable_hbm_bytes`)

    @property
    def fits(self) -> bool:
        """The per-device peak fits the HBM the compiler lets a program use (True where it is unknown)."""
        return not self.hbm_bytes or self.peak_bytes <= self.hbm_bytes

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        return (f"peak {mib(self.peak_bytes)} = parameters {mib(self.param_bytes)} + gradients "
                f"{mib(self.param_bytes)} + optimizer state {mib(self.optimizer_state_bytes)} + batch "
                f"{mib(self.batch_bytes)} + activations and temporaries {mib(self.activation_bytes)} "
                f"({self.peak_bytes / self.floor_bytes:.2f} x the floor {mib(self.floor_bytes)}) [XLA: argument {mib(self.argument_bytes)}, output {mib(self.output_bytes)}, alias "
                f"{mib(self.alias_bytes)}, temp {mib(self.temp_bytes)}; jax {self.jax_version}, {self.backend}"
                + (f", {self.device_count} x {self.device_kind}, mesh {self.mesh_shape}" if self.mesh_shape else "")
                + (f", {self.topology}: {mib(self.peak_bytes)} of {mib(self.hbm_bytes)} HBM per chip "
                   f"({'fits' if self.fits else 'does NOT fit'})" if self.topology else "")
                + "]")


# The floor's activation allowance: four [b, l, d_model] float32 tensors (two residual streams, two cotangents).
FLOOR_STREAMS = 4


def floor_bytes(*, param_bytes: int, optimizer_state_bytes: int, batch_bytes: int, batch_size: int, seq_len: int,
                d_model: int) -> int:
    """parameters + gradients + optimizer state + batch + 4 x batch x length x d_model x 4 bytes."""
    return (2 * param_bytes + optimizer_state_bytes + batch_bytes
            + FLOOR_STREAMS * batch_size * seq_len * d_model * jnp.dtype(jnp.float32).itemsize)


def stats_from_analysis(analysis: Any, params: Any, opt_state: Any, batch: Any, backend: str, *,
                        d_model: int, mesh: Any = None, device_kind: Optional[str] = None) -> MemoryStats:
    """`MemoryStats` from a compiled step's `memory_analysis()` and the (abstract) step inputs.

    batch: the step's batch, its leaves [batch_size, seq_len] (for the floor's residual streams).
    mesh: the jax Mesh of a sharded step, whose inputs carry their shardings: XLA's figures are then those of one
      device's program, and the parameter, optimizer-state and batch bytes (and so the floor) those of one
      device's shards.
    """
    if mesh is not None:
        return _per_device_stats(analysis, params, opt_state, batch, backend, d_model=d_model, mesh=mesh,
                                 device_kind=device_kind)
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


def _per_device_stats(analysis, params, opt_state, batch, backend, *, d_model, mesh, device_kind):
    from reformer_jax.sharding import mesh_shape_of

    whole = stats_from_analysis(analysis, params, opt_state, batch, backend, d_model=d_model)
    param_bytes, batch_bytes = device_tree_bytes(params), device_tree_bytes(batch)
    opt_bytes = device_tree_bytes(opt_state) if opt_state is not None else 0
    batch_size, seq_len = _shard_shape(jax.tree.leaves(batch)[0])[:2]
    devices = mesh.devices.flat
    kind = device_kind or next(iter(devices)).device_kind
    return dataclasses.replace(
        whole, param_bytes=param_bytes, optimizer_state_bytes=opt_bytes, batch_bytes=batch_bytes,
        activation_bytes=whole.peak_bytes - 2 * param_bytes - opt_bytes - batch_bytes,
        floor_bytes=floor_bytes(param_bytes=param_bytes, optimizer_state_bytes=opt_bytes, batch_bytes=batch_bytes,
                                batch_size=batch_size, seq_len=seq_len, d_model=d_model),
        device_kind=kind, device_count=int(mesh.devices.size), mesh_shape=str(mesh_shape_of(mesh)))
