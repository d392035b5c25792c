"""Checkpoints with orbax: saved atomically (orbax writes to a temporary directory and renames it when complete),
resumed from the latest complete step, and tied to the run's settings so a resume never mixes two runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from flax import serialization

from reformer_jax.errors import setting

RUN_SETTINGS_FILE = "run_settings.json"


class CheckpointMismatch(ValueError):
    """The workdir holds a run with different settings."""


def atomic_write(path: Any, data: bytes) -> None:
    """Write `data` to a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, payload: Any) -> None:
    """`payload` as JSON (indented, keys sorted), written atomically."""
    atomic_write(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def _flatten(settings: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"model": {"n_hashes": 2}} -> {"model.n_hashes": 2}, so a difference names the exact field."""
    flat: Dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def saved_run_settings(workdir: Path) -> Optional[Dict[str, Any]]:
    """The settings saved by an earlier run in `workdir`, or None."""
    path = Path(workdir) / RUN_SETTINGS_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def check_run_settings(workdir: Path, settings: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Compare with the settings saved in `workdir` (if any); raise naming each difference.

    Returns the saved settings, or None for a new workdir (the caller then saves them).
    """
    path = workdir / RUN_SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # compare as saved: tuples become lists
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointMismatch(f"{path} is unreadable ({error}); move the workdir away or pass another "
                                 f"{setting('workdir')}.") from error
    saved_flat, now_flat = _flatten(_with_model_defaults(saved)), _flatten(settings)
    differences = [f"{key}: saved {saved_flat.get(key)!r}, now {now_flat.get(key)!r}"
                   for key in sorted(set(saved_flat) | set(now_flat)) if saved_flat.get(key) != now_flat.get(key)]
    if differences:
        raise CheckpointMismatch(f"{setting('workdir')}={workdir} holds a run with other settings ("
                                 + "; ".join(differences) + f"). Pass a new {setting('workdir')}, or the saved "
                                 "settings to "
                                 "resume it.")
    return saved


def _with_model_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The saved settings with their model read as generate and evaluate read it: a ModelConfig field added after
    the run was saved takes its default (what the run used), so it is not a difference."""
    from reformer_jax.model.hf_convert import config_from_fields

    if not isinstance(saved.get("model"), dict):
        return saved
    try:
        model = config_from_fields(saved["model"]).to_dict()
    except (TypeError, ValueError):  # a field removed since, or a value no longer valid: compared as saved
        return saved
    return {**saved, "model": json.loads(json.dumps(model))}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored or saved; the message says which and what to do."""


class WorkdirError(CheckpointError):
    """The workdir cannot be written, or holds a run that a fresh start would overwrite."""


def ensure_writable_workdir(workdir: Path) -> None:
    """Create `workdir` and write a probe file in it, before anything is compiled; WorkdirError if that fails."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise WorkdirError(f"{setting('workdir')}={workdir} cannot be written ({error.strerror or error}: "
                           f"{error.filename or workdir}); pass a directory you can create and write to.") from error


def refuse_to_overwrite_a_run(workdir: Path, checkpoint_every: int) -> None:
    """Called when `workdir` has no checkpoint: raise WorkdirError if it still shows a run that got past one.

    A run killed before its first save legitimately starts over; but a finished run (summary.json) or metrics
    past step 2 * checkpoint_every (by then a save had completed: each save waits for the previous one) mean
    the checkpoints were lost, and starting from scratch would overwrite that run's metrics.
    """
    workdir = Path(workdir)
    steps = []
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    reached = max(steps, default=0)
    if (workdir / "summary.json").exists() or (checkpoint_every and reached > 2 * checkpoint_every):
        raise WorkdirError(f"{setting('workdir')}={workdir} holds a run that reached step {reached} but no "
                           "checkpoint is left in "
                           f"{workdir / 'checkpoints'}; refusing to start over and overwrite it. Restore its "
                           f"checkpoints, or pass a new {setting('workdir')}.")


def _leaf_path(path) -> str:
    """A pytree key path as "params/layers/attention/qk" (dict keys, attributes and list indices alike)."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return "/".join(parts)


def leaf_shapes(tree: Any) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{path: (shape, dtype)} of every array leaf of a state, a state dict or orbax's saved metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_leaf_path(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype")}


def shape_differences(saved: Dict[str, Tuple], expected: Dict[str, Tuple], limit: int = 4) -> List[str]:
    """What differs between two `leaf_shapes` results, first `limit` items, e.g. "params/embed: saved ..."."""
    out = []
    for key in sorted(set(saved) | set(expected), key=lambda k: (not k.startswith("params"), k)):
        if key not in saved:
            out.append(f"{key}: not in the checkpoint")
        elif key not in expected:
            out.append(f"{key}: in the checkpoint, not in this model")
        elif saved[key] != expected[key]:
            (s_shape, s_dtype), (e_shape, e_dtype) = saved[key], expected[key]
            out.append(f"{key}: saved {s_dtype}{list(s_shape)}, this model {e_dtype}{list(e_shape)}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else ""


def _is_layout_error(error: Exception) -> bool:
    """orbax's refusal to place arrays on devices other than the writer's: the data is fine, the target is not."""
    text = str(error).lower()
    return any(words in text for words in ("topology mismatch", "addressable devices"))


def complete_steps(workdir: Path) -> List[int]:
    """The steps of workdir/checkpoints whose save completed (orbax's finalized step directories), ascending.

    Read from the directory alone: jax's backends stay unstarted, so a run that reads another run's steps
    (main.py --init_from) can still split the host into devices afterwards.
    """
    return sorted(ocp.path.step.checkpoint_steps(Path(workdir).absolute() / "checkpoints"))


class Checkpointer:
    """Latest-k orbax checkpoints of a TrainState under workdir/checkpoints.

    A save is written to a temporary directory and renamed when complete, so a run killed during a save leaves
    the previous checkpoints intact; the half-written temporary directory is removed when the next run opens
    the workdir.
    """

    def __init__(self, workdir: Path, max_to_keep: int = 2, read_only: bool = False):
        """`read_only`: for reading another run's checkpoints (nothing is created or cleaned up; never save)."""
        self.directory = Path(workdir).absolute() / "checkpoints"
        # The handler is named, so the manager itself reads a step's metadata (reading it with a bare
        # StandardCheckpointer from the item directory logs a warning about a missing _CHECKPOINT_METADATA).
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                                                 cleanup_tmp_directories=not read_only),
            item_handlers=ocp.StandardCheckpointHandler())
        self._saving: Optional[int] = None  # the step of the asynchronous save in flight

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> List[int]:
        return complete_steps(self.directory.parent)

    def save(self, step: int, state: Any) -> None:
        """Start saving (asynchronously); the previous save is finished first (its errors surface here)."""
        self.wait_until_finished()
        self._saving = step
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state))
        except Exception as error:  # orbax and tensorstore raise many types; the message says what failed
            raise self._save_failed(step, error) from error

    def wait_until_finished(self) -> None:
        """Finish the save in flight; a failure raises CheckpointError naming the step and the intact one."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(self._saving, error) from error
        self._saving = None

    def _save_failed(self, step: Optional[int], error: Exception) -> "CheckpointError":
        self._saving = None
        complete = [s for s in self.all_steps() if step is None or s < step]
        kept = (f"the last complete checkpoint (step {complete[-1]}) is intact" if complete
                else "no complete checkpoint exists yet")
        return CheckpointError(
            f"saving a checkpoint{f' (step {step})' if step is not None else ''} in {self.directory} failed "
            f"({type(error).__name__}: {error}); {kept}. Free disk space or fix the directory's permissions, then "
            "rerun the same command to resume.")

    def restore(self, step: int, target: Any) -> Any:
        """Restore into the structure, shapes and shardings of `target` (arrays or ShapeDtypeStructs).

        Raises CheckpointError naming the leaves that differ (a checkpoint of another model) or the damaged
        step directory (a truncated or corrupted checkpoint), never restarting from scratch.
        """
        step_dir = self.directory / str(step)
        try:
            saved = leaf_shapes(self._manager.item_metadata(step))
        except Exception as error:
            raise self._damaged(step, error) from error
        if not saved:
            raise self._damaged(step, FileNotFoundError(f"no readable array metadata in {step_dir / 'default'}"))
        differences = shape_differences(saved, leaf_shapes(serialization.to_state_dict(target)))
        if differences:
            raise CheckpointError(f"the checkpoint {step_dir} is of another model or optimizer: "
                                  + "; ".join(differences) + ". Resume it with the settings it was trained with "
                                  f"(see run_settings.json), or pass a new {setting('workdir')}.")
        # Every leaf gets a layout on the devices here (a leaf without one: this process's first device), so orbax
        # reshards whatever mesh wrote the checkpoint instead of asking for the writer's devices.
        first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or first), target)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:
            if _is_layout_error(error):
                raise CheckpointError(
                    f"the checkpoint {step_dir} is intact but could not be laid out on the devices of this process "
                    f"({type(error).__name__}: {_first_line(error)}); read it with a target laid out on these "
                    "devices (reformer_jax.training.saved_run.restore_params does).") from error
            raise self._damaged(step, error) from error

    def _damaged(self, step: int, error: Exception) -> "CheckpointError":
        earlier = [s for s in self.all_steps() if s < step]
        step_dir = self.directory / str(step)
        fix = (f"To resume from the previous checkpoint (step {earlier[-1]}), move the damaged one aside: mv "
               f"{step_dir} {step_dir}.damaged" if earlier else
               f"No earlier checkpoint exists: pass a new {setting('workdir')} to start over")
        return CheckpointError(f"the checkpoint {step_dir} cannot be read: it is truncated or corrupted "
                               f"({type(error).__name__}: {_first_line(error)}). Nothing was overwritten. {fix}.")

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()
