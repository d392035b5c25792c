"""The one builder of the training step: every caller takes its step, state and memory figures from here.

    built = build_train_step(config, optimizer="adafactor", mesh=mesh)
    state = built.init(key)                           # a fresh state, laid out on the mesh
    compiled = built.compile(batch_size, seq_len)     # the executable a run calls (compiled once per shape)
    stats = built.memory(batch_size, seq_len)         # that executable's compile-time MemoryStats

Callers: the training loop (`loop.train_and_evaluate`), `reformer_jax.evaluate`, main.py --compile_only,
`reformer_jax.memory.analyze_train_step` and every benchmark that times or measures a step. The step itself (loss,
gradients, update) is `reformer_jax.training.step`; this module decides how it is jitted: over a mesh (the state's
shardings from `reformer_jax.sharding`, the batch over data x fsdp, the state donated, traced with the mesh in
context so the per-head attention splits heads over `tensor`) or, without one, on the default device.

The XLA options are the executed steps' own (`reformer_jax.xla.compiler_options`), so the step a run executes is the
step the memory analysis measures.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from reformer_jax import sharding as sharding_lib
from reformer_jax.model.config import ModelConfig
from reformer_jax.training import step as train
from reformer_jax.xla.compiler_options import step_compiler_options
from reformer_jax.xla.memory_analysis import MemoryStats, stats_from_analysis


class StepBuildError(ValueError):
    """A setting the step cannot be built with (a batch size, a mesh, a TPU slice); the message says what works."""


def guarded_train_step(state, batch, rng, *, config: ModelConfig, skip_nonfinite: bool = False):
    """`train.train_step` plus metrics["finite"] (loss and gradient norm finite).

    With `skip_nonfinite`, a non-finite step keeps the parameters and optimizer state and only counts the step,
    so the data order and random keys of later steps stay those of (seed, step).
    """
    new_state, metrics = train.train_step(state, batch, rng, config=config)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    if skip_nonfinite:
        kept = new_state.replace(params=state.params, opt_state=state.opt_state)
        new_state = jax.tree.map(lambda updated, old: jnp.where(finite, updated, old), new_state, kept)
    return new_state, {**metrics, "finite": finite}


def _abstract_key(mesh=None) -> jax.ShapeDtypeStruct:
    dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    return jax.ShapeDtypeStruct((), dtype, sharding=sharding_lib.replicated(mesh) if mesh is not None else None)


@dataclasses.dataclass
class TrainStep:
    """A model's training step, built once (`build_train_step`).

    init(key) -> state; step(state, batch, key) -> (state, metrics), the state donated; evaluate(params, batch,
    key) -> metrics (no dropout). With `gradients_only`, `step` is loss and gradients alone:
    step(params, batch, key, step_number) -> ((loss, metrics), gradients), and there is no optimizer state.
    abstract_state: ShapeDtypeStructs of the state (over a mesh, each with its sharding); state_sharding: the
    tree of shardings (None without a mesh).
    """

    config: ModelConfig
    tx: optax.GradientTransformation
    mesh: Any
    abstract_state: Any
    state_sharding: Any
    init: Callable
    step: Callable
    evaluate: Callable
    gradients_only: bool
    backend: str
    _compiled: Dict[Tuple[int, int], Any] = dataclasses.field(default_factory=dict, repr=False)

    def abstract_batch(self, batch_size: int, seq_len: int):
        """The step's abstract batch for the config's head (over a mesh: split over data x fsdp)."""
        return train.abstract_batch(self.config, batch_size, seq_len, self.mesh)

    def abstract_inputs(self, batch_size: int, seq_len: int) -> tuple:
        """The abstract arguments `step` is lowered for."""
        key = _abstract_key(self.mesh)
        batch = self.abstract_batch(batch_size, seq_len)
        if self.gradients_only:
            step_number = jax.ShapeDtypeStruct((), jnp.int32, sharding=key.sharding)
            return self.abstract_state.params, batch, key, step_number
        return self.abstract_state, batch, key

    def lower(self, batch_size: int, seq_len: int):
        _check_batch(self, batch_size, seq_len)
        return self.step.lower(*self.abstract_inputs(batch_size, seq_len))

    def compile(self, batch_size: int, seq_len: int, extra_options: Optional[Dict[str, Any]] = None):
        """The step compiled ahead of time for [batch_size, seq_len] batches (kept: the run calls this very
        executable). `extra_options` (e.g. XLA dump flags) compile a separate copy."""
        if extra_options:
            return self.lower(batch_size, seq_len).compile(extra_options)
        if (batch_size, seq_len) not in self._compiled:
            self._compiled[(batch_size, seq_len)] = self.lower(batch_size, seq_len).compile()
        return self._compiled[(batch_size, seq_len)]

    def memory_of(self, compiled, batch_size: int, seq_len: int, device_kind: Optional[str] = None) -> MemoryStats:
        """MemoryStats of an executable of this step (per device over a mesh)."""
        params = self.abstract_state.params
        opt_state = None if self.gradients_only else self.abstract_state.opt_state
        return stats_from_analysis(compiled.memory_analysis(), params, opt_state,
                                   self.abstract_batch(batch_size, seq_len), self.backend,
                                   d_model=self.config.d_model, mesh=self.mesh, device_kind=device_kind)

    def memory(self, batch_size: int, seq_len: int, extra_options: Optional[Dict[str, Any]] = None) -> MemoryStats:
        """XLA's compile-time memory figures of the step at [batch_size, seq_len]."""
        return self.memory_of(self.compile(batch_size, seq_len, extra_options), batch_size, seq_len)


def _check_batch(built: TrainStep, batch_size: int, seq_len: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StepBuildError(f"batch_size={batch_size!r} is invalid: expected a positive integer.")
    built.config.check_seq_len(seq_len)
    if built.mesh is not None:
        shape = sharding_lib.mesh_shape_of(built.mesh)
        sharding_lib.check_mesh_fits(shape, batch_size=batch_size, n_heads=built.config.n_heads,
                                     d_ff=built.config.d_ff, flag="mesh")


def build_train_step(config: ModelConfig, *, optimizer: Union[str, optax.GradientTransformation] = "adafactor",
                     mesh: Any = None, guarded: bool = False, skip_nonfinite: bool = False,
                     gradients_only: bool = False, lean_compile: bool = False,
                     backend: Optional[str] = None, lsh_rotations: Any = None,
                     compiler_options: Optional[Dict[str, Any]] = None) -> TrainStep:
    """The training step of `config`.

    Args:
      optimizer: "adafactor" | "adamw" (`train.make_optimizer`'s defaults) or an optax transformation.
      mesh: a jax Mesh with axes data, fsdp, tensor (`sharding.make_mesh`): the state sharded by the rules table,
        the batch over data x fsdp, every figure per device. None: plain jit on the default device.
      guarded: the training loop's step (`guarded_train_step`: metrics["finite"], and with `skip_nonfinite` a
        non-finite step leaves the state as it was).
      gradients_only: loss and gradients without the optimizer update (activation memory without the
        optimizer's temporaries).
      lean_compile: XLA:CPU's lean options (`reformer_jax.xla.compiler_options`).
      backend: the backend the options are chosen for (default: jax's; "tpu" when compiling for a topology).
      lsh_rotations: fixed hash rotations [LSH layers, h, k, n_hashes, f / 2] for `evaluate` (a converted seeded
        checkpoint's, `SavedModel.lsh_rotations_for`) instead of rotations drawn from its key.
      compiler_options: XLA options instead of the executed steps' own (a benchmark compiling with XLA's defaults).
    """
    tx = train.make_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
    backend = backend or jax.default_backend()
    options = step_compiler_options(backend, lean=lean_compile) if compiler_options is None else compiler_options
    if mesh is None:
        abstract_state = jax.eval_shape(lambda k: train.create_train_state(k, config, tx), _abstract_key())
        state_sharding = None
        init = jax.jit(lambda key: train.create_train_state(key, config, tx), compiler_options=options)
        evaluate = jax.jit(functools.partial(train.eval_step, config=config, lsh_rotations=lsh_rotations),
                           compiler_options=options)
        if gradients_only:
            step = jax.jit(functools.partial(train.loss_and_grads, config=config), compiler_options=options)
        elif guarded:
            step = jax.jit(functools.partial(guarded_train_step, config=config, skip_nonfinite=skip_nonfinite),
                           donate_argnums=0, compiler_options=options)
        else:
            step = jax.jit(functools.partial(train.train_step, config=config), donate_argnums=0,
                           compiler_options=options)
    else:
        abstract_state, state_sharding = train.abstract_train_state(config, tx, mesh)
        replicated, data = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
        # A strongly typed step counter, as a restored checkpoint has: a resumed run then calls the same compiled
        # step (flax's TrainState.create(step=0) is weakly typed, and another input type means another compilation).
        init = sharding_lib.InMesh(jax.jit(
            lambda key: train.create_train_state(key, config, tx).replace(step=jnp.zeros((), jnp.int32)),
            out_shardings=state_sharding, compiler_options=options), mesh)
        evaluate = sharding_lib.InMesh(jax.jit(
            functools.partial(train.eval_step, config=config, lsh_rotations=lsh_rotations),
            in_shardings=(state_sharding.params, data, replicated), out_shardings=replicated,
            compiler_options=options), mesh)
        if gradients_only:
            step = sharding_lib.InMesh(jax.jit(
                functools.partial(train.loss_and_grads, config=config),
                in_shardings=(state_sharding.params, data, replicated, replicated),
                out_shardings=((replicated, replicated), state_sharding.params), compiler_options=options), mesh)
        else:
            fn = (functools.partial(guarded_train_step, config=config, skip_nonfinite=skip_nonfinite) if guarded
                  else functools.partial(train.train_step, config=config))
            step = sharding_lib.jit_sharded_step(fn, mesh, state_sharding, compiler_options=options)
    return TrainStep(config=config, tx=tx, mesh=mesh, abstract_state=abstract_state, state_sharding=state_sharding,
                     init=init, step=step, evaluate=evaluate, gradients_only=gradients_only, backend=backend)


def topology_mesh(topology: str, mesh: Any = None):
    """The jax Mesh over the chips of a TPU slice (`reformer_jax.xla.tpu`): `mesh` as a mesh string or a
    `sharding.MeshShape` (default: every chip on data); a MeshError or TopologyError (one line) if it cannot be."""
    from reformer_jax.xla import tpu

    devices = tpu.topology_devices(topology, flag="topology")
    if isinstance(mesh, sharding_lib.MeshShape):
        shape = mesh
        if shape.device_count != len(devices):
            raise sharding_lib.MeshError(f"mesh={shape} spans {shape.device_count} chips but {topology} has "
                                         f"{len(devices)}; make the sizes multiply to {len(devices)}.")
    else:
        shape = sharding_lib.parse_mesh(mesh, len(devices), flag="mesh")
    return sharding_lib.make_mesh(shape, devices)


def compile_train_step(config: ModelConfig, *, batch_size: int, seq_len: int, optimizer: Optional[str] = "adafactor",
                       extra_options: Optional[Dict[str, Any]] = None, mesh: Any = None,
                       topology: Optional[str] = None) -> Tuple[Any, MemoryStats]:
    """(compiled step, its MemoryStats): `analyze_train_step` that also returns the executable.

    `extra_options` are added to the step's options (e.g. XLA dump flags for a live-range timeline).
    """
    if topology is not None:
        from reformer_jax.xla import tpu

        mesh = topology_mesh(topology, mesh)
    built = build_train_step(config, optimizer=optimizer or "adafactor", mesh=mesh, gradients_only=optimizer is None,
                             backend="tpu" if topology is not None else None)
    compiled = built.compile(batch_size, seq_len, extra_options)
    stats = built.memory_of(compiled, batch_size, seq_len)
    if topology is not None:
        stats = dataclasses.replace(stats, topology=topology, hbm_bytes=tpu.usable_hbm_bytes(topology))
    return compiled, stats


def step_breakdown(config: ModelConfig, *, batch_size: int, seq_len: int, optimizer: Optional[str] = "adafactor",
                   topology: Optional[str] = None, dump_dir: Optional[str] = None):
    """(MemoryStats, `reformer_jax.xla.buffers.Breakdown`): one device's step compiled as `compile_train_step`
    compiles it (for the chips of a TPU slice with `topology`, the batch split over them), its memory_analysis
    peak split into parts from the compiler's own buffer assignment: parameters, optimizer state, batch, and what
    the temporaries' heap holds at its fullest (gradients, parameter copies, residual streams, masks, bucket ids,
    each named scope's activations, tile padding), its unused bytes then, and what memory_analysis counts beyond
    the heap. XLA's dump goes to `dump_dir` (kept) or a temporary directory (removed)."""
    import shutil
    import tempfile

    from reformer_jax.xla import buffers

    where = dump_dir or tempfile.mkdtemp(prefix="xla_buffers_")
    try:
        compiled, stats = compile_train_step(config, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
                                             extra_options=buffers.dump_options(where), topology=topology)
        assignment = buffers.read_dump(where)
    finally:
        if dump_dir is None:
            shutil.rmtree(where, ignore_errors=True)
    analysis = compiled.memory_analysis()
    params = jax.eval_shape(lambda k: train.create_train_state(k, config, train.make_optimizer()).params,
                            _abstract_key())
    shapes = buffers.Shapes(tuple(tuple(leaf.shape) for leaf in jax.tree.leaves(params)),
                            stream_elements=batch_size // stats.device_count * seq_len * config.d_model)
    argument = int(analysis.argument_size_in_bytes)
    parts = [("parameters", stats.param_bytes), ("optimizer state", stats.optimizer_state_bytes),
             ("batch, step and key", argument - stats.param_bytes - stats.optimizer_state_bytes)]
    return stats, buffers.breakdown(assignment, shapes, argument_parts=parts,
                                    output_bytes=int(analysis.output_size_in_bytes),
                                    alias_bytes=int(analysis.alias_size_in_bytes),
                                    temp_bytes=int(analysis.temp_size_in_bytes))


class DoesNotFit(RuntimeError):
    """The TPU compiler refused to compile the step for a slice (e.g. RESOURCE_EXHAUSTED): it does not fit."""


def compile_for_topology(config: ModelConfig, *, batch_size: int, seq_len: int, topology: str, mesh: Any = None,
                         optimizer: str = "adafactor") -> MemoryStats:
    """The step compiled by the TPU compiler for the chips of `topology` over `mesh` (a mesh string or MeshShape;
    default every chip on data), here on any machine: its per-chip MemoryStats (`.fits`: within the HBM a program
    may use). A bad slice or mesh raises TopologyError / MeshError before anything compiles; a compiler refusal
    raises DoesNotFit with the compiler's first line."""
    mesh = topology_mesh(topology, mesh)
    built = build_train_step(config, optimizer=optimizer, mesh=mesh, backend="tpu")
    _check_batch(built, batch_size, seq_len)
    try:
        compiled = built.compile(batch_size, seq_len)
    except Exception as error:  # the compiler's own refusal: the program cannot be laid out in the chip's HBM
        text = str(error).strip()
        raise DoesNotFit(text.splitlines()[0][:400] if text else type(error).__name__) from error
    from reformer_jax.xla import tpu

    return dataclasses.replace(built.memory_of(compiled, batch_size, seq_len), topology=topology,
                               hbm_bytes=tpu.usable_hbm_bytes(topology))


def analyze_train_step(config: ModelConfig, *, batch_size: int, seq_len: int,
                       optimizer: Optional[str] = "adafactor", mesh: Any = None,
                       topology: Optional[str] = None) -> MemoryStats:
    """Compile the real training step from abstract shapes and return XLA's memory figures.

    Args:
      config: the model.
      batch_size, seq_len: the batch shape [batch_size, seq_len] (with a mesh: the global batch).
      optimizer: "adafactor" | "adamw" for the full step (loss, gradients, update, donated state), or None for
        loss and gradients only (activation memory without the optimizer's temporaries).
      mesh: a jax Mesh with axes data, fsdp, tensor (`reformer_jax.sharding.make_mesh`): the sharded step main.py
        runs on it; every figure is then per device (the floor too: the shards each device must hold), and the
        stats record the device kind, count and mesh shape.
      topology: a TPU slice, e.g. "v5e:4x4" (`reformer_jax.xla.tpu`; needs libtpu): the step is compiled by the TPU
        compiler for that slice's chips, here on any machine, and the figures are per chip, with the chip's HBM
        the compiler lets a program use (`MemoryStats.hbm_bytes`, `.fits`). `mesh` is then a mesh string over the
        slice's chips (default: every chip on data). Without libtpu, or for an unknown name, a
        `tpu.TopologyError` says what would work.
    """
    return compile_train_step(config, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, mesh=mesh,
                              topology=topology)[1]


__all__ = ["TrainStep", "build_train_step", "compile_train_step", "analyze_train_step", "compile_for_topology",
           "step_breakdown", "topology_mesh", "guarded_train_step", "StepBuildError", "DoesNotFit"]
