"""train_and_evaluate: learns, resumes exactly, stops on NaN, runs data-parallel like on one device."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from corpus import CrashAt, corpus_path
from reformer_jax import ModelConfig
from reformer_jax.training import data
from reformer_jax.training.checkpoint import RUN_SETTINGS_FILE, CheckpointMismatch, check_run_settings
from reformer_jax.training.loop import TrainingDiverged, TrainOptions, train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=259, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=64, chunk_len=16, n_hashes=2)


def tiny_config(name="reformer", **overrides):
    return ModelConfig.preset(name, **{**TINY, **overrides})


def options(workdir, **overrides):
    base = dict(workdir=str(workdir), steps=6, batch_size=4, seq_len=64, dataset="text", eval_every=0,
                eval_batches=2, checkpoint_every=3, sample_len=0, analyze_memory=False, learning_rate=3e-3,
                warmup_steps=2)
    return TrainOptions(**{**base, **overrides})


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = corpus_path(tmp_path_factory.mktemp("corpus"))
    return data.load_dataset("text", seq_len=64, data_path=str(path))


def _rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_validation_loss(tmp_path, text_data):
    summary = train_and_evaluate(tiny_config(), options(tmp_path, steps=40, eval_every=10, sample_len=20,
                                                        analyze_memory=True), dataset=text_data)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(isinstance(r["loss"], float) and {"bpc", "tokens_per_sec", "learning_rate"} <= set(r) for r in rows)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 4
    assert evals[-1] < evals[0] - 0.3 and evals[-1] < 0.7 * np.log(259), evals
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 40 and saved["val_loss"] == pytest.approx(evals[-1])


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, text_data):
    cfg = tiny_config(dropout=0.1)
    straight = train_and_evaluate(cfg, options(tmp_path / "straight"), dataset=text_data)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, options(tmp_path / "resumed"), dataset=CrashAt(text_data, 4))  # after step 4
    assert [r["step"] for r in _rows(tmp_path / "resumed")] == [1, 2, 3, 4]
    resumed = train_and_evaluate(cfg, options(tmp_path / "resumed"), dataset=text_data)  # from the step-3 checkpoint
    assert int(resumed["state"].step) == 6
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    assert [r["loss"] for r in _rows(tmp_path / "straight")] == [r["loss"] for r in _rows(tmp_path / "resumed")]


def test_larger_steps_continue_the_run(tmp_path, text_data):
    cfg = tiny_config()
    straight = train_and_evaluate(cfg, options(tmp_path / "a", schedule_steps=6), dataset=text_data)
    train_and_evaluate(cfg, options(tmp_path / "b", steps=3, schedule_steps=6), dataset=text_data)
    continued = train_and_evaluate(cfg, options(tmp_path / "b", steps=6, schedule_steps=6), dataset=text_data)
    for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(continued["state"].params)):
        np.testing.assert_array_equal(a, b)


def test_time_limit_stops_evaluated_and_checkpointed_and_a_rerun_continues(tmp_path, text_data):
    cfg = tiny_config()
    straight = train_and_evaluate(cfg, options(tmp_path / "a"), dataset=text_data)
    # The first step (compilation included) already takes longer than the limit: the run stops after it.
    stopped = train_and_evaluate(cfg, options(tmp_path / "b", eval_every=5, time_limit_minutes=1e-6),
                                 dataset=text_data)
    assert stopped["steps"] == 1 and stopped["stopped_by_time_limit"] and "val_loss" in stopped
    continued = train_and_evaluate(cfg, options(tmp_path / "b", eval_every=5), dataset=text_data)
    assert continued["steps"] == 6 and not continued["stopped_by_time_limit"]
    for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(continued["state"].params)):
        np.testing.assert_array_equal(a, b)


def test_resuming_with_other_settings_is_refused(tmp_path, text_data):
    train_and_evaluate(tiny_config(), options(tmp_path, steps=3, schedule_steps=6), dataset=text_data)
    with pytest.raises(CheckpointMismatch, match=r"\(model.n_hashes: saved 2, now 4\)"):
        train_and_evaluate(tiny_config(n_hashes=4), options(tmp_path, steps=6, schedule_steps=6), dataset=text_data)


def test_a_run_saved_before_a_model_field_existed_resumes_with_its_default(tmp_path):
    # run_settings.json of a run saved before ModelConfig had these fields: the run used what are now their
    # defaults, so resuming it with them is no difference; a value other than the default still is one.
    settings = options(tmp_path).run_settings(tiny_config())
    saved = json.loads(json.dumps(settings))
    added = ("n_chunks_after", "local_n_chunks_after", "head", "num_labels")
    for name in added:
        del saved["model"][name]
    (tmp_path / RUN_SETTINGS_FILE).write_text(json.dumps(saved))
    assert check_run_settings(tmp_path, settings) == saved
    refused = r"model.causal: saved True, now False; model.n_chunks_after: saved 0, now 1\)"
    with pytest.raises(CheckpointMismatch, match=refused):
        check_run_settings(tmp_path, options(tmp_path).run_settings(tiny_config(n_chunks_after=1, causal=False)))


class _PoisonAt:
    def __init__(self, inner, step):
        self.inner, self.step, self.source = inner, step, inner.source

    def batch(self, split, seed, step, batch_size, seq_len):
        batch = self.inner.batch(split, seed, step, batch_size, seq_len)
        if split == "train" and step == self.step:
            batch["weights"] = batch["weights"] * np.nan
        return batch


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, text_data):
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5.*checkpoint \\(step 3\\).*intact"):
        train_and_evaluate(tiny_config(), options(tmp_path), dataset=_PoisonAt(text_data, 4))


def test_copy_task_is_learned_well_above_chance(tmp_path):
    cfg = tiny_config("transformer", vocab_size=8, d_model=64, n_heads=4, d_ff=128, max_len=32, dropout=0.0)
    task = data.CopyTask(vocab_size=8)
    summary = train_and_evaluate(cfg, options(tmp_path, steps=200, batch_size=16, seq_len=32, eval_every=200,
                                              eval_batches=4, optimizer="adamw", learning_rate=3e-3,
                                              warmup_steps=10, checkpoint_every=0), dataset=task)
    assert summary["val_accuracy"] > 0.6  # chance is 1/7


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import os
    import jax, numpy as np
    from reformer_jax import ModelConfig
    from reformer_jax.training import data
    from reformer_jax.training.step import make_optimizer
    from reformer_jax import sharding
    from reformer_jax.training.step_builder import build_train_step
    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig.preset("reformer", **{tiny!r})
    task = data.CopyTask(vocab_size=259)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(sharding.MeshShape(data=len(devices)), devices)
        built = build_train_step(cfg, optimizer=make_optimizer("adafactor", 1e-2), mesh=mesh, guarded=True)
        init_fn, step_fn, batch_sharding = built.init, built.step, sharding.batch_sharding(mesh)
        state = init_fn(jax.random.key(0))
        for step in range(2):
            batch = sharding.global_batch(task.batch("train", 0, step, 8, 64), batch_sharding)
            state, metrics = step_fn(state, batch, jax.random.key(1))
        assert len(state.params["embed"].sharding.device_set) == len(devices)
        results.append((float(metrics["loss"]), jax.tree.leaves(jax.device_get(state.params))))
    # data 2 x fsdp 2 x tensor 2: sharded parameters and optimizer state, the per-head core's heads over tensor
    mesh = sharding.make_mesh(sharding.MeshShape(2, 2, 2), jax.devices())
    built = build_train_step(cfg, optimizer=make_optimizer("adafactor", 1e-2), mesh=mesh, guarded=True)
    init_fn, step_fn = built.init, built.step
    state = init_fn(jax.random.key(0))
    for step in range(2):
        batch = sharding.global_batch(task.batch("train", 0, step, 8, 64), sharding.batch_sharding(mesh))
        state, metrics = step_fn(state, batch, jax.random.key(1))
    assert tuple(state.params["layers"]["attention"]["qk"].sharding.spec) == (None, "fsdp", "tensor")
    results.append((float(metrics["loss"]), jax.tree.leaves(jax.device_get(state.params))))
    (loss1, p1) = results[0]
    for loss8, p8 in results[1:]:
        assert abs(loss1 - loss8) <= 1e-5 * abs(loss1), (loss1, loss8)
        worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(p1, p8))
        assert worst < 1e-4, worst
    from reformer_jax.training.loop import TrainOptions, train_and_evaluate
    import tempfile
    try:
        train_and_evaluate(cfg, TrainOptions(workdir=tempfile.mkdtemp(), batch_size=3, seq_len=64,
                                             analyze_memory=False), dataset=task)
        raise AssertionError("a batch of 3 on 8 devices was accepted")
    except ValueError as error:
        assert "TrainOptions.batch_size=3 is not divisible by the 8 devices" in str(error), error
    print("OK", [r[0] for r in results])
""")


def test_eight_device_step_equals_one_device_step():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    script = MULTI_DEVICE_SCRIPT.format(repo=str(REPO), tiny=TINY)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize("task", ["classify"])  # masked-LM batches: tests/test_mlm_data.py
def test_encoder_tasks_resume_to_the_same_parameters(tmp_path, text_data, task):
    """A bidirectional classifier on ListOps (its batches pure functions of seed and step, as the language model's)
    resumes from a checkpoint to exactly the parameters of a straight run."""
    from reformer_jax.training import tasks

    cfg = tiny_config(dropout=0.1, **tasks.model_fields(task))
    dataset = data.listops_task(64) if task == "classify" else data.MaskedText(text_data, 0.15)
    run = dict(task=task, dataset="listops" if task == "classify" else "text", eval_every=3)
    straight = train_and_evaluate(cfg, options(tmp_path / "straight", **run), dataset=dataset)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, options(tmp_path / "resumed", **run), dataset=CrashAt(dataset, 4))
    resumed = train_and_evaluate(cfg, options(tmp_path / "resumed", **run), dataset=dataset)
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    rows = _rows(tmp_path / "straight")
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(tmp_path / "resumed")]
    assert "val_accuracy" in rows[-1] and "sample" not in straight


def test_a_task_refuses_a_model_or_dataset_that_does_not_fit(tmp_path):
    from reformer_jax.errors import SettingError

    with pytest.raises(SettingError, match="dataset='tiny_shakespeare' is not a classify dataset"):
        options(tmp_path, task="classify", dataset="tiny_shakespeare")
    with pytest.raises(SettingError, match=r"mask_rate=1\.5 is invalid"):
        options(tmp_path, task="mlm", mask_rate=1.5)
    with pytest.raises(SettingError, match="causal=True does not fit the mlm task"):
        train_and_evaluate(tiny_config(), options(tmp_path / "run", task="mlm"))
    assert not (tmp_path / "run" / "checkpoints").exists()
