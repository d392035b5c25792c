"""The device mesh: axes data, fsdp and tensor, logical axis names for the training state, and ONE rules table.

    --mesh=data:-1,fsdp:4,tensor:1       (-1: the devices the other axes leave; the default puts every device
                                          on data, i.e. plain data parallelism)

Every parameter dimension has a logical name (embed, heads, kv, mlp, vocab, layers, positions), declared by the
model where it creates the parameter (`reformer_jax.model.reformer_lm.param_logical_axes(config)` reads them back
as a tree of name tuples); the functions here take that tree as an argument, and a parameter it gives no names (or
a number of names other than its number of dimensions) is an error naming the parameter. The optimizer state's
leaves take the names of the parameter they belong to (`state_shardings`).
`LOGICAL_RULES` maps logical names to mesh axes:
  batch -> (data, fsdp)     the batch is split over both
  embed -> fsdp             parameters, gradients and optimizer state sharded (ZeRO-3 / FSDP style)
  heads, mlp -> tensor      attention heads and the feed-forward width split (Megatron style)
A dimension that its mesh axes do not divide stays whole (e.g. a 259-symbol vocabulary).

GSPMD (jit with these shardings) places every ordinary op. The one-head-at-a-time attention core
(`per_head_attention`, a lax.scan over heads under its own custom_vjp) cannot be split by propagation: a scan's
iterations run on one device. `reformer_jax.kernels.head_parallel` runs it under shard_map over `tensor` instead, each
device scanning its own heads, with one psum where the heads' outputs meet.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from reformer_jax.errors import setting

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_MESH = "data:-1"

# The rules table: logical axis name -> mesh axes (a tuple shards over their product; () keeps it whole).
LOGICAL_RULES: Dict[str, Tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "kv": (),
    "vocab": (),
    "layers": (),
    "positions": (),
}


class MeshError(ValueError):
    """A --mesh value that cannot work; the message names the flag, the value and what would."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes data, fsdp, tensor."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def sizes(self) -> Tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def device_count(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_ways(self) -> int:
        """How many pieces the batch is cut into (data x fsdp)."""
        return self.data * self.fsdp

    def __str__(self) -> str:
        return ",".join(f"{name}:{size}" for name, size in zip(MESH_AXES, self.sizes))


def parse_mesh(text: Optional[str], device_count: int, flag: Optional[str] = None) -> MeshShape:
    """'data:-1,fsdp:4,tensor:1' -> MeshShape for `device_count` devices; MeshError (one line, naming `flag`:
    default the mesh setting) if it cannot be.

    Axes left out have size 1; one axis may be -1 (the devices the others leave).
    """
    flag = flag or setting("mesh")
    text = (text or DEFAULT_MESH).strip()
    usage = f"expected axis:size pairs over {', '.join(MESH_AXES)}, e.g. {flag}=data:-1,fsdp:4,tensor:1"
    sizes: Dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep or not name:
            raise MeshError(f"{flag}={text} is invalid: {part!r} is not axis:size; {usage}.")
        if name not in MESH_AXES:
            raise MeshError(f"{flag}={text} names the unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}.")
        if name in sizes:
            raise MeshError(f"{flag}={text} gives the axis {name!r} twice; give each axis once.")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"{flag}={text} is invalid: the size of {name!r} is {value!r}; {usage}.") from None
        if size == 0 or size < -1:
            raise MeshError(f"{flag}={text} is invalid: the size of {name!r} is {size}; use a positive size or -1.")
        sizes[name] = size
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise MeshError(f"{flag}={text} has more than one axis of size -1 ({', '.join(free)}); at most one may take "
                        "the remaining devices.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise MeshError(f"{flag}={text}: the fixed axes ({fixed} devices) do not divide the {device_count} "
                            f"devices; use sizes whose product divides {device_count}.")
        sizes[free[0]] = device_count // fixed
    shape = MeshShape(**{name: sizes.get(name, 1) for name in MESH_AXES})
    if shape.device_count != device_count:
        raise MeshError(f"{flag}={text} spans {shape.device_count} devices but there are {device_count}; make the "
                        f"sizes multiply to {device_count} (or let one axis be -1).")
    return shape


def check_mesh_fits(shape: MeshShape, *, batch_size: int, n_heads: int, d_ff: Optional[int] = None,
                    flag: Optional[str] = None, text: Optional[str] = None) -> None:
    """MeshError (one line) if data x fsdp does not divide the batch or tensor the heads (or the d_ff width)."""
    given = f"{flag or setting('mesh')}={text or shape}"
    if batch_size % shape.batch_ways:
        raise MeshError(f"{setting('batch_size')}={batch_size} is not divisible by the {shape.batch_ways} devices of "
                        f"the batch axes data x fsdp ({given}); use a multiple of {shape.batch_ways}, or move devices "
                        "to tensor.")
    if n_heads % shape.tensor:
        raise MeshError(f"{given}: tensor:{shape.tensor} does not divide the {n_heads} attention heads "
                        f"({setting('n_heads')}); "
                        f"use a tensor size that divides {n_heads}.")
    if d_ff is not None and d_ff % shape.tensor:
        raise MeshError(f"{given}: tensor:{shape.tensor} does not divide the feed-forward width "
                        f"{setting('d_ff')}={d_ff}; use "
                        f"a tensor size that divides both {n_heads} and {d_ff}.")


def make_mesh(shape: MeshShape, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The jax Mesh (axes data, fsdp, tensor; Auto axis types: XLA propagates shardings and inserts collectives)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(shape.sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def mesh_shape_of(mesh: Mesh) -> MeshShape:
    return MeshShape(**{name: int(mesh.shape.get(name, 1)) for name in MESH_AXES})


# --- logical axes of the training state -------------------------------------------------------------------------

def _path_names(path) -> Tuple[str, ...]:
    names = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
    return tuple(names)


def _is_names(x) -> bool:
    """A leaf of a logical-axes tree: a tuple of names (None: a dimension no rule applies to)."""
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def _axes_by_path(param_axes: Any) -> Dict[Tuple[str, ...], Tuple[Optional[str], ...]]:
    """{parameter path: its names} from a tree of name tuples shaped like the parameters."""
    flat = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=_is_names)[0]
    return {_path_names(path): names for path, names in flat}


def _declared(axes: Dict[Tuple[str, ...], Tuple[Optional[str], ...]], path: Tuple[str, ...],
              shape: Tuple[int, ...]) -> Tuple[Optional[str], ...]:
    """The logical names of the parameter at `path`; a ValueError naming it if it has none, too few or too many,
    or a name LOGICAL_RULES does not know."""
    where = "/".join(path)
    if path not in axes:
        raise ValueError(f"parameter {where} (shape {shape}) has no declared logical axes (the axes tree names "
                         f"{len(axes)} other parameters); declare them where the parameter is created "
                         "(nn.with_logical_partitioning or nn.LogicallyPartitioned) and pass the axes read from "
                         "that model (reformer_lm.param_logical_axes).")
    names = tuple(axes[path])
    if len(names) != len(shape):
        raise ValueError(f"parameter {where} (shape {shape}) has the logical axes {names}: {len(names)} names for "
                         f"{len(shape)} dimensions; declare one name per dimension.")
    unknown = [n for n in names if n is not None and n not in LOGICAL_RULES]
    if unknown:
        raise ValueError(f"parameter {where} has the logical axes {names}: {', '.join(map(repr, unknown))} is not "
                         f"in LOGICAL_RULES; use one of {', '.join(LOGICAL_RULES)} (or None).")
    return names


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh_shape: MeshShape) -> P:
    """PartitionSpec from logical names by LOGICAL_RULES, skipping mesh axes of size 1, axes already used by an
    earlier dimension and dimensions the axes do not divide."""
    sizes = dict(zip(MESH_AXES, mesh_shape.sizes))
    used, spec = set(), []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if sizes[a] > 1 and a not in used) if name else ()
        if axes and dim % math.prod(sizes[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _optimizer_leaf_names(shape: Tuple[int, ...], param_shape: Tuple[int, ...],
                          param_names: Tuple[Optional[str], ...]) -> Tuple[Optional[str], ...]:
    """Logical names of an optimizer-state leaf of the parameter `param_shape`: the same for a leaf of its shape
    (Adam's moments), those of the remaining dimensions for a factored statistic (Adafactor's row / column
    statistics drop one dimension), none for anything else (counts, placeholders)."""
    if tuple(shape) == tuple(param_shape):
        return param_names
    if len(shape) == len(param_shape) - 1:
        for dropped in range(len(param_shape)):
            if tuple(np.delete(np.array(param_shape), dropped)) == tuple(shape):
                return param_names[:dropped] + param_names[dropped + 1:]
    return (None,) * len(shape)


def state_logical_axes(state: Any, param_axes: Any) -> Any:
    """A pytree like `state` (a TrainState or any tree holding "params") of logical-name tuples per leaf.

    param_axes: the parameters' logical axes, a tree like state's "params" of name tuples
      (`reformer_jax.model.reformer_lm.param_logical_axes(config)`); a parameter it does not name is a ValueError.
    An optimizer-state leaf whose path ends with a parameter's path (optax mirrors the parameter tree inside its
    states) takes that parameter's names (`_optimizer_leaf_names`).
    """
    declared = _axes_by_path(param_axes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    params: Dict[Tuple[str, ...], Tuple[Tuple[int, ...], Tuple[Optional[str], ...]]] = {}
    for path, leaf in leaves:
        names = _path_names(path)
        if "params" in names:
            tail = names[names.index("params") + 1:]
            params[tail] = (tuple(leaf.shape), _declared(declared, tail, tuple(leaf.shape)))
    out = []
    for path, leaf in leaves:
        names = _path_names(path)
        if "params" in names:
            out.append(params[names[names.index("params") + 1:]][1])
            continue
        match = next((params[tail] for tail in params if len(tail) and names[-len(tail):] == tail), None)
        out.append(_optimizer_leaf_names(tuple(leaf.shape), *match) if match else (None,) * leaf.ndim)
    return jax.tree_util.tree_unflatten(treedef, out)


def state_shardings(state: Any, mesh: Mesh, param_axes: Any) -> Any:
    """NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs) by the parameters' logical axes
    (`param_axes`, see `state_logical_axes`) and LOGICAL_RULES."""
    shape = mesh_shape_of(mesh)
    names = state_logical_axes(state, param_axes)
    return jax.tree.map(lambda leaf, n: NamedSharding(mesh, logical_to_spec(n, leaf.shape, shape)), state, names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_key(seed: int, mesh: Mesh) -> jax.Array:
    """jax.random.key(seed) replicated over `mesh`, made from host data that every process computes alike: with
    several processes, device_put cannot place a value on devices another process owns."""
    data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    return jax.random.wrap_key_data(jax.make_array_from_callback(data.shape, replicated(mesh), lambda i: data[i]))


def global_batch(batch: Dict[str, np.ndarray], sharding: NamedSharding) -> Dict[str, jax.Array]:
    """This process's rows of the (identically generated) global batch -> one global array each, laid out by
    `sharding` ({name: [global batch, ...]} numpy on every process)."""
    n, i = jax.process_count(), jax.process_index()
    rows = batch["inputs"].shape[0] // n
    return {k: jax.make_array_from_process_local_data(sharding, v[i * rows:(i + 1) * rows]) for k, v in batch.items()}


# --- the sharded training state and step ------------------------------------------------------------------------

class InMesh:
    """A jitted function traced, lowered and called with `mesh` in context (`jax.set_mesh`), where
    `head_parallel` finds the tensor axis."""

    def __init__(self, fn, mesh: Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.eval_shape(*args, **kwargs)


def jit_sharded_step(step_fn, mesh: Mesh, state_sharding: Any, **jit_kwargs) -> InMesh:
    """jit of step_fn(state, batch, key) -> (state, metrics): state laid out by `state_sharding` and donated,
    batch over data x fsdp, key and metrics replicated."""
    jitted = jax.jit(step_fn, donate_argnums=0, in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)),
                     out_shardings=(state_sharding, replicated(mesh)), **jit_kwargs)
    return InMesh(jitted, mesh)


def _mesh_in_context() -> Optional[MeshShape]:
    """The data / fsdp / tensor sizes of the mesh in context (`jax.set_mesh`), or None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(mesh.axis_names) >= set(MESH_AXES):
        return None
    return MeshShape(**{name: int(mesh.shape[name]) for name in MESH_AXES})


def _layer_specs(tree: Any, axes: Any, shape: MeshShape, gathered: bool) -> Any:
    """PartitionSpecs of one layer's parameters (stacked ones without their layer axis; `axes`: their logical
    names, a tree like `tree`): their shards, or with `gathered` their layout while the layer runs (whole over
    fsdp, still split over tensor)."""
    rules_shape = dataclasses.replace(shape, fsdp=1) if gathered else shape
    declared = _axes_by_path(axes)

    def spec(path, leaf):
        names = _declared(declared, _path_names(path), tuple(leaf.shape))
        return logical_to_spec(names, leaf.shape, rules_shape)

    return jax.tree_util.tree_map_with_path(spec, tree)


def _constrain(tree: Any, specs: Any) -> Any:
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, specs)


def gather_layer_params(tree: Any, axes: Any) -> Any:
    """One layer's parameters gathered over fsdp for the layer to run (FSDP): an identity whose backward pass
    reduce-scatters the gradients into the parameters' shards, layer by layer. `axes`: the parameters' logical
    names, a tree like `tree` of name tuples (`reformer_jax.model.reformer_lm.layer_logical_axes`).

    Without it XLA may keep the weights sharded and gather the batch instead (every device then computes every
    sequence), or hold every layer's gradients whole until the end of the step. Without a mesh in context, or with
    fsdp and tensor of size 1, the tree is returned as it is.
    """
    shape = _mesh_in_context()
    if shape is None or (shape.fsdp == 1 and shape.tensor == 1):
        return tree
    gathered, sharded = _layer_specs(tree, axes, shape, True), _layer_specs(tree, axes, shape, False)

    @jax.custom_vjp
    def gather(tree):
        return _constrain(tree, gathered)

    gather.defvjp(lambda tree: (_constrain(tree, gathered), None), lambda _, grads: (_constrain(grads, sharded),))
    return gather(tree)


def shard_layer_grads(grads: Any, axes: Any) -> Any:
    """One layer's parameter gradients pinned to the parameters' shards (what `gather_layer_params`'s backward
    pass does, for a backward pass written by hand); `axes` as for `gather_layer_params`."""
    shape = _mesh_in_context()
    if shape is None or (shape.fsdp == 1 and shape.tensor == 1):
        return grads
    return _constrain(grads, _layer_specs(grads, axes, shape, False))


def constrain_batch(x: jax.Array) -> jax.Array:
    """An activation [batch, ...] kept split over data x fsdp (each device computes its own sequences)."""
    shape = _mesh_in_context()
    if shape is None or shape.batch_ways == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))
