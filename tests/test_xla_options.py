"""The steps' XLA options (reformer_jax/xla/compiler_options.py): which options each backend gets, and that a step compiled
lean (without XLA:CPU's fusion emitters) or with XLA's own defaults computes what the default compilation computes."""

import jax
import numpy as np

from benchmarks import speed
from reformer_jax import ModelConfig
from reformer_jax.training import step as train
from reformer_jax import sharding
from reformer_jax.training.step_builder import build_train_step
from reformer_jax.xla.compiler_options import CPU_STEP_OPTIONS, LEAN_CPU_OPTIONS, step_compiler_options
from conftest import USER_CODEGEN


def test_cpu_steps_get_options_and_other_backends_none():
    assert step_compiler_options("cpu", lean=True) == {**CPU_STEP_OPTIONS, **LEAN_CPU_OPTIONS}
    assert step_compiler_options("cpu", lean=False) == step_compiler_options("cpu") == CPU_STEP_OPTIONS
    assert CPU_STEP_OPTIONS == {"xla_cpu_experimental_ynn_fusion_type": ""}  # YNNPACK fusions off
    assert "xla_cpu_use_fusion_emitters" not in CPU_STEP_OPTIONS  # lean compilation is opt-in
    for backend in ("gpu", "tpu"):
        assert step_compiler_options(backend, lean=True) == step_compiler_options(backend) == {}


def test_speed_driver_compiles_only_the_lean_setting_lean():
    tiny = speed.Settings(vocab_size=32, d_model=32, n_heads=2, d_ff=64, n_layers=1, seq_len=32, chunk_len=16)
    lean = speed.ours_spec(tiny, "reformer", 32, "lean_compile")
    default = speed.ours_spec(tiny, "reformer", 32, "default")
    backend = jax.default_backend()
    assert lean["compiler_options"] == step_compiler_options(backend, lean=True)
    assert default["compiler_options"] == step_compiler_options(backend)
    assert speed.ours_spec(tiny, "reformer", 32, "xla_defaults")["compiler_options"] == {}
    assert set(speed.SETTING_NOTES) == set(speed.OURS_SETTINGS)  # every setting is explained in the table
    assert lean["config"] == default["config"]  # the same model, compiled differently


def test_lean_step_computes_what_the_default_step_computes():
    config = ModelConfig.preset("reformer", vocab_size=32, d_model=32, n_heads=2, d_ff=64, n_layers=2, n_hashes=2,
                                chunk_len=8, max_len=32, dropout=0.0)
    tx = train.make_optimizer("adafactor", 1e-2, schedule_steps=4, warmup_steps=1)
    tokens = np.random.default_rng(0).integers(3, 32, size=(2, 33), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((2, 32), np.float32)}
    results = []
    for lean in (False, True):
        mesh = sharding.make_mesh(sharding.MeshShape(), jax.devices()[:1])
        # The default step as a user's run compiles it (the suite's own flags turn the fusion emitters off).
        options = None if lean else {**step_compiler_options(), **USER_CODEGEN}
        built = build_train_step(config, optimizer=tx, mesh=mesh, guarded=True, lean_compile=lean,
                                 compiler_options=options)
        init_fn, step_fn = built.init, built.step
        state = init_fn(jax.random.key(0))
        losses = []
        for _ in range(3):
            state, metrics = step_fn(state, batch, jax.random.key(7))
            losses.append(float(metrics["loss"]))
        results.append((np.array(losses), jax.tree.leaves(state.params)))
    (losses_default, params_default), (losses_lean, params_lean) = results
    np.testing.assert_allclose(losses_lean, losses_default, rtol=1e-5)
    assert losses_default[-1] < losses_default[0]  # the steps trained: the comparison is not between idle states
    for lean_leaf, default_leaf in zip(params_lean, params_default):
        np.testing.assert_allclose(lean_leaf, default_leaf, rtol=1e-4, atol=1e-6)
