"""The device mesh: --mesh parsing and refusals, logical axes of the training state, training over data x fsdp x
tensor equal to one device, sharded checkpoints resumed on another mesh, per-device memory analysis."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from reformer_jax import ModelConfig
from reformer_jax.sharding import (LOGICAL_RULES, MeshError, MeshShape, check_mesh_fits, make_mesh, parse_mesh,
                                   state_logical_axes)
from reformer_jax.model.reformer_lm import param_logical_axes
from reformer_jax.training.step import abstract_train_state, make_optimizer

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=259, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=64, chunk_len=16, n_hashes=2)


@pytest.mark.parametrize("text, devices, expected", [
    (None, 8, MeshShape(8, 1, 1)), ("data:-1", 1, MeshShape(1, 1, 1)),
    ("data:-1,fsdp:4,tensor:1", 8, MeshShape(2, 4, 1)), ("tensor:2,data:2,fsdp:2", 8, MeshShape(2, 2, 2)),
    ("fsdp:-1", 8, MeshShape(1, 8, 1)), (" tensor:2 ", 2, MeshShape(1, 1, 2))])
def test_mesh_spec_is_parsed(text, devices, expected):
    assert parse_mesh(text, devices) == expected


@pytest.mark.parametrize("text, devices, message", [
    ("data:4,fsdp:3", 8, "TrainOptions.mesh=data:4,fsdp:3 spans 12 devices but there are 8"),
    ("data:-1,pipe:2", 8, "names the unknown axis 'pipe'; the axes are data, fsdp, tensor"),
    ("data:-1,fsdp:3", 8, "the fixed axes (3 devices) do not divide the 8 devices"),
    ("data:-1,fsdp:-1", 8, "more than one axis of size -1"),
    ("data:x", 8, "the size of 'data' is 'x'"), ("data", 8, "'data' is not axis:size"),
    ("data:2,data:4", 8, "gives the axis 'data' twice"), ("data:0", 8, "the size of 'data' is 0")])
def test_bad_mesh_spec_is_refused_in_one_line(text, devices, message):
    with pytest.raises(MeshError) as error:
        parse_mesh(text, devices)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_mesh_that_does_not_divide_the_batch_heads_or_width_is_refused():
    with pytest.raises(MeshError, match=r"TrainOptions.batch_size=6 is not divisible by the 4 devices of the batch axes"):
        check_mesh_fits(MeshShape(2, 2, 2), batch_size=6, n_heads=8, d_ff=64)
    with pytest.raises(MeshError, match=r"tensor:4 does not divide the 2 attention heads \(n_heads\)"):
        check_mesh_fits(MeshShape(2, 1, 4), batch_size=8, n_heads=2, d_ff=64)
    with pytest.raises(MeshError, match=r"tensor:4 does not divide the feed-forward width d_ff=66"):
        check_mesh_fits(MeshShape(2, 1, 4), batch_size=8, n_heads=4, d_ff=66)
    check_mesh_fits(MeshShape(2, 2, 2), batch_size=4, n_heads=2, d_ff=64)


@pytest.mark.parametrize("name, overrides", [("reformer", {}), ("transformer", {"pos_embedding": "absolute"}),
                                             ("reformer", {"attn_layers": ("local", "lsh"), "tie_embeddings": False})])
@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_every_parameter_and_optimizer_moment_has_logical_axes(name, overrides, optimizer):
    config = ModelConfig.preset(name, **{**TINY, **overrides})
    state, _ = abstract_train_state(config, make_optimizer(optimizer))
    axes = state_logical_axes(state, param_logical_axes(config))
    flat_state = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_axes = jax.tree_util.tree_structure(state).flatten_up_to(axes)
    assert len(flat_state) == len(flat_axes)
    by_param = {jax.tree_util.keystr(path).split(".params")[1]: names for (path, _), names in zip(flat_state, flat_axes)
                if ".params" in jax.tree_util.keystr(path)}
    for (path, leaf), names in zip(flat_state, flat_axes):
        assert len(names) == leaf.ndim, (path, names)
        assert all(n is None or n in LOGICAL_RULES for n in names)
        where = jax.tree_util.keystr(path)
        if ".params" in where:  # every parameter's every dimension is named
            assert None not in names, (where, names)
        if ".params" in where and leaf.ndim >= 2 and not where.endswith("['bi']"):
            assert "embed" in names, where  # fsdp shards every stacked or matrix parameter but a [layers, d_ff] bias
        if ".mu" in where or ".nu" in where:  # Adam's moments are named as their parameters
            assert names == by_param[where.split(".mu" if ".mu" in where else ".nu")[1]], where
    assert axes.params["layers"]["feed_forward"]["wi"] == ("layers", "embed", "mlp")


def test_one_device_mesh_keeps_everything_whole():
    config = ModelConfig.preset("reformer", **TINY)
    _, shardings = abstract_train_state(config, make_optimizer("adafactor"), make_mesh(MeshShape(), jax.devices()[:1]))
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))


def _run(devices, out, *runs, model="reformer"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MESH_TEST_MODEL": model}
    result = subprocess.run([sys.executable, "-m", "tests.mesh_runner", str(devices), str(out), *runs],
                            env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    saved = np.load(out)
    return [(saved[f"{i}/losses"], [saved[f"{i}/params/{j}"] for j in range(len(
        [k for k in saved.files if k.startswith(f"{i}/params/")]))]) if f"{i}/losses" in saved.files else None
            for i in range(len(runs))]


def _assert_same_run(reference, other):
    (losses, params), (other_losses, other_params) = reference, other
    assert len(losses) == len(other_losses)
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5, atol=0)  # every step
    worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(params, other_params))
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    """20 steps on one device, on 8 devices as data 2 x fsdp 2 x tensor 2 and as fsdp 8, on 2 as tensor 2; a run
    killed after its step-3 checkpoint on 8 devices resumed on 1, and one killed on 1 resumed on 8, against 6
    uninterrupted steps on one device. Each device count is a process of its own (tests/mesh_runner.py)."""
    tmp = tmp_path_factory.mktemp("mesh")
    eight = _run(8, tmp / "eight.npz", f"data:2,fsdp:2,tensor:2@{tmp}/d2f2t2@20", f"fsdp:8@{tmp}/f8@20",
                 f"data:2,fsdp:2,tensor:2@{tmp}/from8@6@4")
    one = _run(1, tmp / "one.npz", f"data:1@{tmp}/one@20", f"data:1@{tmp}/six@6", f"data:1@{tmp}/from8@6",
               f"data:1@{tmp}/from1@6@4")
    back = _run(8, tmp / "back.npz", f"data:2,fsdp:2,tensor:2@{tmp}/from1@6")
    two = _run(2, tmp / "two.npz", f"tensor:2@{tmp}/t2@20")
    return {"one": one[0], "six": one[1], "d2f2t2": eight[0], "fsdp8": eight[1], "tensor2": two[0],
            "8->1": one[2], "1->8": back[0]}


@pytest.mark.long  # four processes (1, 2 and 8 CPU devices), about 3 minutes on 2 shared cores
@pytest.mark.parametrize("mesh", ["d2f2t2", "fsdp8", "tensor2"])
def test_training_over_a_mesh_equals_one_device(mesh_runs, mesh):
    assert len(mesh_runs["one"][0]) == 20
    _assert_same_run(mesh_runs["one"], mesh_runs[mesh])


@pytest.mark.long
@pytest.mark.parametrize("direction", ["8->1", "1->8"])
def test_checkpoint_written_on_one_mesh_resumes_on_another(mesh_runs, direction):
    """The resumed run's metrics hold steps 1-4 from before the kill (the step-4 row rewritten) and 5-6 after."""
    _assert_same_run(mesh_runs["six"], mesh_runs[direction])


def test_checkpoint_resumes_on_another_mesh_in_one_process(tmp_path):
    """One process split into 8 host devices: a run killed after its step-3 checkpoint on data:2,fsdp:2,tensor:2
    resumes on one device, and one killed on one device resumes on the 8; each ends as 6 uninterrupted steps on one
    device do (losses at every step, final parameters)."""
    runs = _run(8, tmp_path / "out.npz", f"data:1@{tmp_path}/six@6", f"data:2,fsdp:2,tensor:2@{tmp_path}/from8@6@4",
                f"data:1@{tmp_path}/from8@6", f"data:1@{tmp_path}/from1@6@4",
                f"data:2,fsdp:2,tensor:2@{tmp_path}/from1@6")
    assert runs[1] is None and runs[3] is None  # the two killed runs
    _assert_same_run(runs[0], runs[2])  # 8 devices -> 1
    _assert_same_run(runs[0], runs[4])  # 1 device -> 8


def test_main_refuses_a_bad_mesh_before_compiling_in_one_line(tmp_path):
    """The host split into 8 devices (--host_devices); a bad --mesh exits non-zero naming the flag, no traceback,
    before any step is compiled (no workdir is created). The other refusals are `parse_mesh`'s and
    `check_mesh_fits`'s, tested above; main.py passes their messages on."""
    cases = {"--mesh=data:4,fsdp:3": "--mesh=data:4,fsdp:3 spans 12 devices but there are 8",
             "--mesh=data:1,tensor:8": "tensor:8 does not divide the 4 attention heads (--n_heads)"}
    for args, expected in cases.items():
        result = subprocess.run([sys.executable, str(REPO / "main.py"), "--host_devices=8", *args.split(),
                                 f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                                cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert result.returncode != 0 and expected in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and len([line for line in result.stderr.splitlines()
                                                         if expected in line]) == 1
        assert not (tmp_path / "run").exists()


PER_DEVICE_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import jax
jax.config.update("jax_num_cpu_devices", 4)
from reformer_jax import ModelConfig
from reformer_jax.memory import analyze_train_step
from reformer_jax.sharding import MeshShape, make_mesh
config = ModelConfig.preset("reformer", **{tiny!r})
one = analyze_train_step(config, batch_size=4, seq_len=64, mesh=make_mesh(MeshShape(1, 1, 1), jax.devices()[:1]))
whole = analyze_train_step(config, batch_size=4, seq_len=64)
fsdp = analyze_train_step(config, batch_size=4, seq_len=64, mesh=make_mesh(MeshShape(1, 4, 1)))
print(one.to_dict()); print(whole.to_dict()); print(fsdp.to_dict())
"""


def test_per_device_memory_analysis_on_a_mesh():
    """fsdp 4 holds a quarter of the parameters, gradients and optimizer state and a quarter of the batch per
    device, and its peak and floor are below one device's; the stats say where they were measured."""
    import ast

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", PER_DEVICE_SCRIPT.format(repo=str(REPO), tiny=TINY)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, whole, fsdp = (ast.literal_eval(line) for line in result.stdout.strip().splitlines()[-3:])
    assert (one["device_count"], one["mesh_shape"], one["device_kind"]) == (1, "data:1,fsdp:1,tensor:1", "cpu")
    assert (fsdp["device_count"], fsdp["mesh_shape"]) == (4, "data:1,fsdp:4,tensor:1")
    assert one["peak_bytes"] == whole["peak_bytes"] and one["param_bytes"] == whole["param_bytes"]
    # Every parameter of the tiny model but the [layers, d_ff] biases has a d_model dimension fsdp 4 divides.
    assert fsdp["param_bytes"] <= 0.3 * one["param_bytes"]
    assert fsdp["optimizer_state_bytes"] < 0.5 * one["optimizer_state_bytes"]
    assert fsdp["batch_bytes"] * 4 == one["batch_bytes"]
    assert fsdp["peak_bytes"] < one["peak_bytes"] and fsdp["floor_bytes"] < one["floor_bytes"]
