"""Faults: kill -9 and resume exactly, determinism across runs, unwritable or failing workdirs, damaged and foreign
checkpoints, NaN/Inf losses and gradients. Tiny models; the subprocess runs share a persistent compilation cache
after the first run, so each takes seconds."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from reformer_jax import ModelConfig

from reformer_jax.training import data

from reformer_jax.training import loop as trainer
from reformer_jax.training import saved_run
from reformer_jax.training.checkpoint import CheckpointError, WorkdirError, atomic_write
from reformer_jax.training.run_log import MetricsLog
from reformer_jax.training.loop import TrainingDiverged, TrainOptions, train_and_evaluate

# Its module-scoped fixtures are expensive: keep the module on one pytest-xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_faults")

REPO = Path(__file__).resolve().parents[1]
RUNNER = ["-m", "tests.fault_runner"]  # run from the repository root (cwd=REPO)
STEPS = 16
RUN_FLAGS = ["--model=transformer", "--dataset=synthetic", "--d_model=16", "--n_heads=2", "--d_ff=32", "--n_layers=1",
             "--seq_len=16", "--batch_size=4", f"--steps={STEPS}", "--checkpoint_every=2", "--eval_every=0",
             "--sample_len=0", "--noanalyze_memory", "--dropout=0.1", "--seed=3"]


def _env(cache_dir=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    # LLVM -O0 halves the compile of every fresh run (XLA's HLO passes, hence the program's arithmetic, are the
    # ones of the default -O2 build; only the machine code is less optimised). Every run here uses it alike.
    env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
                "XLA_FLAGS": "--xla_backend_optimization_level=0", **extra})
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _run(workdir, env, timeout=240):
    return subprocess.run([sys.executable, *RUNNER, *RUN_FLAGS, f"--workdir={workdir}"], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def _saved_leaves(workdir, step):
    """Every array of checkpoint `step`, read back without a target structure onto this process's one device (the
    runs may have saved it sharded over two host devices, main.py's CPU default): {path: numpy array}."""
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        tree = checkpointer.restore(Path(workdir).absolute() / "checkpoints" / str(step) / "default",
                                    args=ocp.args.StandardRestore(fallback_sharding=one_device))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_arrays(a, b):
    assert a.keys() == b.keys() and len(a) > 5
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run (it also fills the compilation cache the kill test's runs reuse)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = _run(workdir, _env(cache_dir))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return workdir


def test_same_seed_and_flags_give_bit_identical_losses_across_runs(reference, tmp_path):
    again = _run(tmp_path / "run", _env())  # its own compilation, no cache
    assert again.returncode == 0, again.stderr[-3000:]
    assert _losses(tmp_path / "run") == _losses(reference) and len(_losses(reference)) == STEPS
    _assert_same_arrays(_saved_leaves(tmp_path / "run", STEPS), _saved_leaves(reference, STEPS))


def test_reformer_reruns_are_bit_identical_with_xla_default_code_generation(tmp_path):
    """The README's determinism claim on its default path: LSH hashing, dropout, reversible layers, sequential
    rounds and heads, compiled with XLA's default optimisation level (no LLVM -O0) in two processes at once."""
    flags = [f for f in RUN_FLAGS if not f.startswith(("--model=", "--steps=", "--checkpoint_every="))] + [
        "--model=reformer", "--n_hashes=2", "--chunk_len=4", "--attention_dropout=0.1", "--steps=3",
        "--checkpoint_every=3"]
    env = _env(XLA_FLAGS="")  # overrides the suite's LLVM -O0
    runs = [subprocess.Popen([sys.executable, *RUNNER, *flags, f"--workdir={tmp_path / name}"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
            for name in ("a", "b")]
    for run in runs:
        _, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr[-3000:]
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 3
    _assert_same_arrays(_saved_leaves(tmp_path / "a", 3), _saved_leaves(tmp_path / "b", 3))
    model = json.loads((tmp_path / "a" / "run_settings.json").read_text())["model"]
    assert (model["attention"], model["reversible"], model["n_hashes"], model["dropout"]) == ("lsh", True, 2, 0.1)
    assert model["sequential_rounds"] and model["sequential_heads"]


def _kill_when(workdir, env, at_step, delay):
    """Start the run, SIGKILL it `delay` seconds after metrics.jsonl shows step `at_step`."""
    proc = subprocess.Popen([sys.executable, *RUNNER, *RUN_FLAGS, f"--workdir={workdir}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics, deadline = Path(workdir) / "metrics.jsonl", time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= at_step:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit {proc.returncode}): {stderr[-3000:]}"


def test_kill_9_at_random_moments_then_rerun_ends_with_the_uninterrupted_parameters(reference, cache_dir, tmp_path):
    workdir = tmp_path / "run"
    rng = random.Random(8)
    slow = _env(cache_dir, FAULT_STEP_DELAY="0.03")
    _kill_when(workdir, slow, at_step=5, delay=rng.uniform(0, 0.1))
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) in (2, 4, 6)

    # Killed while checkpoint 8 is being written: its files are in orbax's temporary directory, not yet renamed.
    killed = _run(workdir, _env(cache_dir, FAULT_KILL_DURING_SAVE="8"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert "8" not in names and any(n.startswith("8.orbax-checkpoint-tmp") for n in names), names

    _kill_when(workdir, slow, at_step=13, delay=rng.uniform(0, 0.1))
    finished = _run(workdir, _env(cache_dir))
    assert finished.returncode == 0, finished.stdout + finished.stderr[-3000:]
    assert "resumed from" in finished.stdout
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    _assert_same_arrays(_saved_leaves(workdir, STEPS), _saved_leaves(reference, STEPS))
    assert _losses(workdir) == _losses(reference)


# ---------------------------------------------------------------------------------------------------------------
# In-process runs: one tiny model, compiled once for all of them (trainer caches its step functions).

TINY = dict(vocab_size=16, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_len=16, dropout=0.0)
TASK = data.CopyTask(vocab_size=16)


def tiny_config(**overrides):
    return ModelConfig.preset("transformer", **{**TINY, **overrides})


def options(workdir, **overrides):
    base = dict(workdir=str(workdir), steps=6, schedule_steps=8, batch_size=4, seq_len=16, dataset="synthetic",
                eval_every=0, checkpoint_every=2, sample_len=0, analyze_memory=False, warmup_steps=2)
    return TrainOptions(**{**base, **overrides})


def _params(summary):
    return jax.tree.leaves(jax.device_get(summary["state"].params))


def _assert_same_params(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_and_evaluate(tiny_config(), options(tmp_path_factory.mktemp("straight")), dataset=TASK)


def test_workdir_under_a_regular_file_is_refused_before_compiling(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(trainer, "_compiled_steps", lambda *a: pytest.fail("compiled before checking the workdir"))
    with pytest.raises(WorkdirError, match=r"TrainOptions.workdir=.*file/run cannot be written \(Not a directory"):
        train_and_evaluate(tiny_config(), options(tmp_path / "file" / "run"), dataset=TASK)


def test_an_atomic_write_failing_at_the_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out" / "rows.json"
    atomic_write(path, b"old")
    assert path.read_bytes() == b"old"

    def refuse(src, dst):
        assert Path(src).read_bytes() == b"new"  # written in full beside the target first
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(path.parent) == ["rows.json"]


def test_checkpoint_writer_failing_part_way_leaves_the_previous_checkpoint_restorable(tmp_path, monkeypatch,
                                                                                      uninterrupted):
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_step_4(self):  # step 4's arrays are written, its directory is not yet in place
        if self._final_path.name == "4":
            raise OSError(28, "No space left on device")
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_step_4)
    with pytest.raises(CheckpointError, match=r"saving a checkpoint \(step 4\).*No space left on device.*"
                                              r"last complete checkpoint \(step 2\) is intact"):
        train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    resumed = train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK)
    _assert_same_params(resumed, uninterrupted)


def test_metrics_writer_failing_names_the_step_and_the_intact_checkpoint(tmp_path, monkeypatch, uninterrupted):
    write = MetricsLog.write

    def disk_full_at_step_5(self, row):
        if row["step"] == 5:
            raise OSError(28, "No space left on device")
        write(self, row)

    monkeypatch.setattr(MetricsLog, "write", disk_full_at_step_5)
    with pytest.raises(WorkdirError, match=r"failed at step 5 .*No space left.*checkpoint \(step 4\) is intact"):
        train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK)
    monkeypatch.undo()
    _assert_same_params(train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK), uninterrupted)


def _truncate_largest_file(step_dir: Path) -> None:
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:64])


def test_damaged_checkpoint_is_refused_never_restarted_then_the_previous_one_resumes(tmp_path, uninterrupted):
    train_and_evaluate(tiny_config(), options(tmp_path, steps=4), dataset=TASK)
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    _truncate_largest_file(tmp_path / "checkpoints" / "4")
    damaged = tmp_path.absolute() / "checkpoints" / "4"
    with pytest.raises(CheckpointError, match=f"the checkpoint {damaged} cannot be read: it is truncated or "
                                              f"corrupted .*Nothing was overwritten. To resume from the previous "
                                              f"checkpoint \\(step 2\\), move the damaged one aside: mv {damaged} "):
        train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before
    damaged.rename(damaged.with_name("4.damaged"))  # what the message says to do
    _assert_same_params(train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK), uninterrupted)


def test_checkpoint_of_another_model_names_the_arrays_that_differ(tmp_path):
    train_and_evaluate(tiny_config(), options(tmp_path, steps=2), dataset=TASK)
    (tmp_path / "run_settings.json").unlink()  # e.g. checkpoints copied without their settings
    with pytest.raises(CheckpointError, match=r"of another model or optimizer: .*params/layers/feed_forward/wi: "
                                              r"saved float32\[1, 16, 32\], this model float32\[1, 16, 48\]"):
        train_and_evaluate(tiny_config(d_ff=48), options(tmp_path, steps=4), dataset=TASK)


def test_a_run_whose_checkpoints_are_gone_is_not_overwritten(tmp_path):
    train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK)
    shutil.rmtree(tmp_path / "checkpoints")
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(WorkdirError, match="reached step 6 but no checkpoint is left.*refusing to start over"):
        train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before


class _PoisonAt:
    """The copy task with NaN loss weights in training batch `step` (0-based)."""

    def __init__(self, step):
        self.step, self.source, self.origin = step, TASK.source, TASK.origin

    def batch(self, split, seed, step, batch_size, seq_len):
        batch = TASK.batch(split, seed, step, batch_size, seq_len)
        if split == "train" and step == self.step:
            batch["weights"] = batch["weights"] * np.nan
        return batch


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tmp_path, uninterrupted):
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at step 5; .*checkpoint \(step 4\).*is intact"):
        train_and_evaluate(tiny_config(), options(tmp_path), dataset=_PoisonAt(4))
    _assert_same_params(train_and_evaluate(tiny_config(), options(tmp_path), dataset=TASK), uninterrupted)


class _HugeWeightsAt(_PoisonAt):
    """Loss weights of alternating sign, 1e20 in size, in training batch `step`: the weighted loss stays finite
    (the weights sum to about 0, so it is a difference of two huge sums) while the gradient norm overflows."""

    def batch(self, split, seed, step, batch_size, seq_len):
        batch = TASK.batch(split, seed, step, batch_size, seq_len)
        if split == "train" and step == self.step:
            weights = batch["weights"].reshape(-1).copy()
            scored = np.flatnonzero(weights)
            assert scored.size % 2 == 0  # so the weights sum to exactly 0
            weights[scored] = np.where(np.arange(scored.size) % 2, 1e20, -1e20)
            batch["weights"] = weights.reshape(batch["weights"].shape)
        return batch


def test_infinite_gradients_with_a_finite_loss_stop_the_run(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"the gradient norm is (nan|inf) \(loss -?[\d.]+e\+\d+\) at step 3; "
                                               r".*checkpoint \(step 2\)"):
        train_and_evaluate(tiny_config(), options(tmp_path), dataset=_HugeWeightsAt(2))


def test_skip_nonfinite_skips_the_bad_batch_and_changes_nothing(tmp_path):
    skipped = train_and_evaluate(tiny_config(), options(tmp_path / "five", steps=5, skip_nonfinite=True),
                                 dataset=_PoisonAt(4))
    assert skipped["skipped_steps"] == [5] and int(skipped["state"].step) == 5
    # The NaN batch changed no parameter: the final ones are the step-4 checkpoint's, bit for bit.
    at_four = jax.tree.leaves(jax.device_get(saved_run.restore_params(saved_run.open_run(str(tmp_path / "five")), 4)))
    assert len(at_four) > 5
    for final, saved in zip(_params(skipped), at_four, strict=True):
        np.testing.assert_array_equal(final, saved)
    # ... and the four steps before it trained as they do without the bad batch.
    before = train_and_evaluate(tiny_config(), options(tmp_path / "four", steps=4), dataset=TASK)
    for a, b in zip(_params(skipped), _params(before), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    rows = [json.loads(line) for line in (tmp_path / "five" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] is True and np.isnan(rows[-1]["loss"]) and "skipped" not in rows[-2]
    assert all(np.isfinite(leaf).all() for leaf in _params(skipped))
