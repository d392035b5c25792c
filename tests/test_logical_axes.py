"""Logical axes declared where each parameter is created (`nn.with_logical_partitioning`, boxed leaves from the
layer initialisers), read back by `reformer_lm.param_logical_axes` and mapped to mesh axes by `reformer_jax.sharding`.

tests/sharding_specs.json holds the PartitionSpec of every leaf of the training state (both optimizers) and of one
layer's parameters as `gather_layer_params` lays them out (sharded and gathered), for the four presets and a mixed
local / LSH stack, on six meshes (a leaf absent from a mesh's entry is replicated there). Those layouts are the
contract of `LOGICAL_RULES`: a change that means to move a leaf edits that file by hand.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AbstractMesh, PartitionSpec as P

from reformer_jax import ModelConfig, sharding
from reformer_jax.model.reformer_lm import declared_axes, init_params, layer_logical_axes, param_logical_axes
from reformer_jax.training.step import abstract_train_state, make_optimizer

RECORD = json.loads((Path(__file__).parent / "sharding_specs.json").read_text())
CONFIGS = sorted(RECORD["configs"])


def _config(label):
    entry = RECORD["configs"][label]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["overrides"].items()}
    return ModelConfig.preset(entry["preset"], **{**RECORD["base"], **overrides})


def _spec(recorded):
    return P(*(tuple(s) if isinstance(s, list) else s for s in recorded))


def _is_names(x):
    return isinstance(x, tuple)


@pytest.mark.parametrize("label", CONFIGS)
def test_every_leaf_keeps_its_recorded_layout(label):
    config = _config(label)
    axes = param_logical_axes(config)
    wrong = []
    for optimizer, recorded in RECORD["configs"][label]["state"].items():
        state, _ = abstract_train_state(config, make_optimizer(optimizer))
        for mesh_name, sizes in RECORD["meshes"].items():
            shardings = sharding.state_shardings(state, AbstractMesh(tuple(sizes), sharding.MESH_AXES), axes)
            specs = {jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
            assert set(specs) == set(recorded), (optimizer, set(specs) ^ set(recorded))
            wrong += [(optimizer, mesh_name, leaf, spec) for leaf, spec in specs.items()
                      if spec != _spec(recorded[leaf].get(mesh_name, []))]
    assert not wrong, wrong[:10]


@pytest.mark.parametrize("label", CONFIGS)
def test_one_layer_keeps_its_recorded_layout_sharded_and_gathered(label):
    config = _config(label)
    params = jax.eval_shape(init_params, config, jax.random.key(0))["layers"]
    one_layer = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)  # noqa: E731
    kinds = sorted(set(config.layer_types))
    blocks = {"feed_forward": (params["feed_forward"], layer_logical_axes(config, kinds[0])[1])}
    for kind in kinds:
        tree = params["attention"] if len(kinds) == 1 else params["attention"][kind]
        blocks["attention" if len(kinds) == 1 else f"attention/{kind}"] = (tree, layer_logical_axes(config, kind)[0])
    recorded = RECORD["configs"][label]["layers"]
    assert set(blocks) == set(recorded)
    wrong = []
    for block, (tree, axes) in blocks.items():
        for mesh_name, sizes in RECORD["meshes"].items():
            for gathered in (False, True):
                specs = sharding._layer_specs(one_layer(tree), axes, sharding.MeshShape(*sizes), gathered)
                flat = {jax.tree_util.keystr(path): spec for path, spec in jax.tree_util.tree_leaves_with_path(
                    specs, is_leaf=lambda x: isinstance(x, P))}
                assert set(flat) == set(recorded[block])
                key = f"{mesh_name} {'gathered' if gathered else 'sharded'}"
                wrong += [(block, key, leaf, spec) for leaf, spec in flat.items()
                          if spec != _spec(recorded[block][leaf].get(key, []))]
    assert not wrong, wrong[:10]


@pytest.mark.parametrize("label", ["reversible", "reformer_local_lsh"])
def test_axes_tree_mirrors_the_plain_parameters(label):
    """One name per dimension, every name a rule's; init_params stays plain arrays (no metadata boxes)."""
    config = _config(label)
    params = jax.eval_shape(init_params, config, jax.random.key(0))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))
    axes = param_logical_axes(config)
    flat_axes, axes_def = jax.tree_util.tree_flatten(axes, is_leaf=_is_names)
    flat_params, params_def = jax.tree_util.tree_flatten(params)
    assert axes_def == params_def
    for names, leaf in zip(flat_axes, flat_params):
        assert len(names) == leaf.ndim and all(n in sharding.LOGICAL_RULES for n in names), (names, leaf.shape)


class _PartlyDeclared(nn.Module):
    """A kernel that names its axes, and a bias that names none or (`bias_names`) the wrong number."""

    bias_names: tuple = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (4, 8))
        bias_init = nn.initializers.zeros
        if self.bias_names is not None:
            bias_init = nn.with_logical_partitioning(bias_init, self.bias_names)
        return x @ kernel + self.param("bias", bias_init, (8,))


def test_a_parameter_created_without_axes_fails_loudly():
    boxed = jax.eval_shape(_PartlyDeclared().init, jax.random.key(0), np.ones((2, 4), np.float32))["params"]
    with pytest.raises(ValueError, match=r"^parameter bias \(shape \(8,\)\) declares no logical axes"):
        declared_axes(boxed)
    boxed = jax.eval_shape(_PartlyDeclared(("embed", "mlp")).init, jax.random.key(0),
                           np.ones((2, 4), np.float32))["params"]
    with pytest.raises(ValueError, match=r"^parameter bias declares the logical axes \('embed', 'mlp'\) for its 1 "
                                         r"dimensions"):
        declared_axes(boxed)
    boxed = jax.eval_shape(_PartlyDeclared(("mlp",)).init, jax.random.key(0), np.ones((2, 4), np.float32))["params"]
    assert declared_axes(boxed) == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}


def test_a_parameter_the_axes_tree_does_not_name_fails_loudly():
    config = _config("reformer_local_lsh")
    state, _ = abstract_train_state(config, make_optimizer("adamw"))
    mesh = AbstractMesh((1, 2, 2), sharding.MESH_AXES)

    def edited(change):
        axes = param_logical_axes(config)
        change(axes["layers"]["feed_forward"])
        return axes

    with pytest.raises(ValueError, match=r"^parameter layers/feed_forward/wi \(shape \(4, 128, 256\)\) has no "
                                         r"declared logical axes"):
        sharding.state_shardings(state, mesh, edited(lambda ff: ff.pop("wi")))
    with pytest.raises(ValueError, match=r"^parameter layers/feed_forward/wi \(shape \(4, 128, 256\)\) has the "
                                         r"logical axes \('embed', 'mlp'\): 2 names for 3 dimensions"):
        sharding.state_shardings(state, mesh, edited(lambda ff: ff.update(wi=("embed", "mlp"))))
    with pytest.raises(ValueError, match=r"^parameter layers/feed_forward/wi has the logical axes .*'hidden' is "
                                         r"not in LOGICAL_RULES"):
        sharding.state_shardings(state, mesh, edited(lambda ff: ff.update(wi=("layers", "embed", "hidden"))))
    # One layer's parameters inside the stack: the same refusal.
    attention, _ = layer_logical_axes(config, "lsh")
    del attention["norm"]["scale"]
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                             state.params["layers"]["attention"]["lsh"])
    with pytest.raises(ValueError, match=r"^parameter norm/scale \(shape \(128,\)\) has no declared logical axes"):
        sharding._layer_specs(one_layer, attention, sharding.MeshShape(1, 2, 2), False)
