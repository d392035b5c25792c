"""Checkpoints with orbax: saved atomically (orbax writes to a temporary directory and renames it when complete),
resumed from the latest complete step, and tied to the run's settings so a resume never mixes two runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp

RUN_SETTINGS_FILE = "run_settings.json"


class CheckpointMismatch(ValueError):
    """The workdir holds a run with different settings."""


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
                                 "--workdir.") from error
    saved_flat, now_flat = _flatten(saved), _flatten(settings)
    differences = [f"{key}: saved {saved_flat.get(key)!r}, now {now_flat.get(key)!r}"
                   for key in sorted(set(saved_flat) | set(now_flat)) if saved_flat.get(key) != now_flat.get(key)]
    if differences:
        raise CheckpointMismatch(f"--workdir={workdir} holds a run with other settings ("
                                 + "; ".join(differences) + "). Pass a new --workdir, or the saved settings to "
                                 "resume it.")
    return saved


class Checkpointer:
    """Latest-k orbax checkpoints of a TrainState under workdir/checkpoints."""

    def __init__(self, workdir: Path, max_to_keep: int = 2):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Start saving (asynchronously); the previous save is finished first."""
        self._manager.wait_until_finished()
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, target: Any) -> Any:
        """Restore into the structure, shapes and shardings of `target` (arrays or ShapeDtypeStructs)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
