"""The PartitionSpec of every kind of parameter under each mesh axis: `data` replicates everything, `fsdp` shards the
d_model dimension of every parameter that has one, `tensor` splits attention heads and the feed-forward width.

Written out by hand per parameter kind (not derived from the rules table they check), on an abstract mesh of each
axis (`jax.sharding.AbstractMesh`: no devices needed), and once on 8 real CPU devices (a subprocess: the host's
device count is fixed when jax starts) with all three axes at once.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from reformer_jax import ModelConfig
from reformer_jax.model.reformer_lm import param_logical_axes
from reformer_jax.sharding import MESH_AXES, state_shardings
from reformer_jax.training.step import abstract_train_state, make_optimizer

REPO = Path(__file__).resolve().parents[1]
# Every kind of parameter: local and LSH attention (q, k, v / qk, v, out), an untied output head, axial positions.
# d_model 32, 2 heads, d_ff 64: a mesh axis of 2 divides each of them; the vocabulary (259) is never split.
CONFIG = dict(vocab_size=259, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=64, chunk_len=16, n_hashes=2,
              attn_layers=("local", "lsh"), tie_embeddings=False)

_ = None
FSDP_D = {  # where the d_model dimension is, by the parameter's shape
    "[V, d]": P(_, "fsdp"), "[n, d, h, k]": P(_, "fsdp"), "[n, h, k, d]": P(_, _, _, "fsdp"),
    "[n, d, f]": P(_, "fsdp"), "[n, f, d]": P(_, _, "fsdp"), "[n, d]": P(_, "fsdp"), "[d]": P("fsdp"),
    "[d, V]": P("fsdp"), "[l1, 1, d1]": P(_, _, "fsdp"),
}
# parameter (its path in the "params" tree) -> (shape, spec under tensor); under fsdp: FSDP_D[shape] (d_ff-sized
# biases and the head's bias have no d_model dimension); under data: replicated.
EXPECTED = {
    "embed": ("[V, d]", P()),
    "positions/axial_0": ("[l1, 1, d1]", P()),
    "positions/axial_1": ("[l1, 1, d1]", P()),
    **{f"layers/attention/local/{name}": ("[n, d, h, k]", P(_, _, "tensor")) for name in ("q", "k", "v")},
    **{f"layers/attention/lsh/{name}": ("[n, d, h, k]", P(_, _, "tensor")) for name in ("qk", "v")},
    "layers/attention/local/out": ("[n, h, k, d]", P(_, "tensor")),
    "layers/attention/lsh/out": ("[n, h, k, d]", P(_, "tensor")),
    **{f"layers/{block}/norm/{name}": ("[n, d]", P()) for block in ("attention/local", "attention/lsh",
                                                                     "feed_forward") for name in ("scale", "bias")},
    "layers/feed_forward/wi": ("[n, d, f]", P(_, _, "tensor")),
    "layers/feed_forward/wo": ("[n, f, d]", P(_, "tensor")),
    "layers/feed_forward/bi": ("[n, f]", P(_, "tensor")),
    "layers/feed_forward/bo": ("[n, d]", P()),
    "final_norm_scale": ("[d]", P()),
    "final_norm_bias": ("[d]", P()),
    "head_kernel": ("[d, V]", P()),
    "head_bias": ("[V]", P()),
}


def expected_spec(name, axis):
    shape, tensor = EXPECTED[name]
    if axis == "data":
        return P()
    if axis == "tensor":
        return tensor
    return FSDP_D.get(shape, P())


def _param_specs(shardings):
    return {"/".join(str(k.key) for k in path): s.spec
            for path, s in jax.tree_util.tree_leaves_with_path(shardings.params)}


@pytest.fixture(scope="module")
def state():
    """(the abstract TrainState, its parameters' logical axes)."""
    config = ModelConfig.preset("reformer", **CONFIG)
    return abstract_train_state(config, make_optimizer("adamw"))[0], param_logical_axes(config)


@pytest.mark.parametrize("axis", MESH_AXES)
def test_each_parameter_kind_is_laid_out_by_its_mesh_axis(state, axis):
    mesh = AbstractMesh(tuple(2 if name == axis else 1 for name in MESH_AXES), MESH_AXES)
    shardings = state_shardings(state[0], mesh, state[1])
    specs = _param_specs(shardings)
    assert set(specs) == set(EXPECTED)  # every parameter is one of the kinds above
    wrong = {name: (spec, expected_spec(name, axis)) for name, spec in specs.items()
             if spec != expected_spec(name, axis)}
    assert not wrong, f"under {axis}:2, parameter: (spec, expected): {wrong}"
    # Adam's moments are laid out as their parameters.
    assert shardings.opt_state[1][0].mu["layers"]["feed_forward"]["wi"].spec == expected_spec(
        "layers/feed_forward/wi", axis)


def _merged(*specs):
    """One spec from specs over different mesh axes (no dimension is split by two of them)."""
    length = max(len(s) for s in specs)
    dims = [next((s[i] for s in specs if i < len(s) and s[i] is not None), None) for i in range(length)]
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


REAL_DEVICES = """
import sys
sys.path.insert(0, {repo!r})
import jax
jax.config.update("jax_num_cpu_devices", 8)
from reformer_jax import ModelConfig
from reformer_jax.sharding import MeshShape, make_mesh
from reformer_jax.training.step import abstract_train_state, make_optimizer
mesh = make_mesh(MeshShape(2, 2, 2))
_, shardings = abstract_train_state(ModelConfig.preset("reformer", **{config!r}), make_optimizer("adamw"), mesh)
specs = {{"/".join(str(k.key) for k in path): tuple(s.spec)
         for path, s in jax.tree_util.tree_leaves_with_path(shardings.params)}}
print(len(set(s.mesh.devices.size for s in jax.tree.leaves(shardings))), mesh.devices.size)
print(specs)
"""


def test_on_eight_devices_every_axis_at_once():
    """data:2,fsdp:2,tensor:2 over 8 CPU devices: each parameter's spec is its fsdp and tensor specs together."""
    result = subprocess.run([sys.executable, "-c", REAL_DEVICES.format(repo=str(REPO), config=CONFIG)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts, specs = result.stdout.strip().splitlines()[-2:]
    assert counts.split() == ["1", "8"]  # one mesh of 8 devices for every leaf
    specs = {name: P(*spec) for name, spec in ast.literal_eval(specs).items()}
    assert set(specs) == set(EXPECTED)
    for name, spec in specs.items():
        assert spec == _merged(expected_spec(name, "fsdp"), expected_spec(name, "tensor")), name
