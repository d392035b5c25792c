"""A main.py workdir read back: its settings, its model and the parameters of one of its checkpoints.

Used to evaluate a checkpoint (python -m reformer_jax.evaluate) and to fine-tune from a run
(main.py --init_from=WORKDIR). Nothing here writes to the workdir.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp

from reformer_jax.training import step as train
from reformer_jax.training.checkpoint import RUN_SETTINGS_FILE, Checkpointer, leaf_shapes, shape_differences
from reformer_jax.model.config import ModelConfig


class SavedRunError(ValueError):
    """A directory that is not a usable main.py workdir, or a checkpoint that does not fit; says what to do."""


def is_run_workdir(path: str) -> bool:
    """Whether `path` looks like a main.py workdir (its settings file and a checkpoints directory)."""
    return (Path(path) / RUN_SETTINGS_FILE).is_file() and (Path(path) / "checkpoints").is_dir()


@dataclasses.dataclass(frozen=True)
class SavedRun:
    workdir: Path
    settings: Dict[str, Any]
    config: ModelConfig
    steps: List[int]  # the complete checkpoints, ascending

    def checkpoint_step(self, step: Optional[int] = None) -> int:
        """`step` if it is checkpointed, else the latest; SavedRunError naming the steps there are."""
        if step is None:
            return self.steps[-1]
        if step not in self.steps:
            raise SavedRunError(f"--step={step}: {self.workdir / 'checkpoints'} holds steps "
                                f"{', '.join(map(str, self.steps))}; pass one of them (or omit --step for the latest).")
        return step


def model_config(fields: Dict[str, Any], **overrides: Any) -> ModelConfig:
    """The ModelConfig saved in run_settings.json (lists become tuples), with fields overridden."""
    return ModelConfig(**{**fields, **overrides})


def open_run(workdir: str, flag: str = "--workdir") -> SavedRun:
    """Read a workdir's settings and list its checkpoints; SavedRunError (naming `flag`) if it is not usable."""
    path = Path(workdir)
    if not is_run_workdir(path):
        raise SavedRunError(f"{flag}={workdir} is not a main.py workdir: expected {RUN_SETTINGS_FILE} and "
                            "checkpoints/ in it (pass the --workdir a training run used).")
    try:
        settings = json.loads((path / RUN_SETTINGS_FILE).read_text())
        config = model_config(settings["model"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SavedRunError(f"{flag}={workdir}: {path / RUN_SETTINGS_FILE} is unreadable ({error}).") from error
    checkpointer = Checkpointer(path, read_only=True)
    try:
        steps = checkpointer.all_steps()
    finally:
        checkpointer.close()
    if not steps:
        raise SavedRunError(f"{flag}={workdir} holds no complete checkpoint yet; train it first (main.py "
                            f"--workdir={workdir}).")
    return SavedRun(workdir=path, settings=settings, config=config, steps=steps)


def abstract_state(run: SavedRun, sharding=None):
    """The shapes and dtypes of the run's TrainState (its model and optimizer), computed without allocating."""
    s = run.settings
    tx = train.make_optimizer(s["optimizer"], s["learning_rate"], schedule_steps=s["schedule_steps"],
                              warmup_steps=s.get("warmup_steps"), clip_norm=s["clip_norm"])
    shapes = jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), run.config, tx).replace(
        step=jnp.zeros((), jnp.int32)))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def check_same_shapes(run: SavedRun, config: ModelConfig, flag: str = "--init_from") -> None:
    """SavedRunError naming the parameter arrays whose shape or dtype differ between the run's model and `config`
    (computed abstractly: nothing is allocated, compiled or read but the settings)."""
    differences = shape_differences(leaf_shapes(abstract_state(run).params), leaf_shapes(_abstract_params(config)))
    if differences:
        raise SavedRunError(f"{flag}={run.workdir} has parameters of other shapes than this model's: "
                            + "; ".join(differences) + ". Leave out the model flags that change shapes (the run's "
                            "own model is used when none is given), or start from scratch.")


def _abstract_params(config: ModelConfig):
    tx = train.make_optimizer("adamw", 1e-3)  # any optimizer: only the parameters are compared
    return jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), config, tx)).params


def restore_params(run: SavedRun, step: Optional[int] = None, sharding=None) -> Any:
    """The parameters of checkpoint `step` (default: the latest) of the run."""
    checkpointer = Checkpointer(run.workdir, read_only=True)
    try:
        return checkpointer.restore(run.checkpoint_step(step), abstract_state(run, sharding)).params
    finally:
        checkpointer.close()


def params_into(source_params: Any, target_params: Any) -> Any:
    """`source_params` (same structure and shapes, see `check_same_shapes`) placed like `target_params`."""
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding) if hasattr(t, "sharding") else x,
                        source_params, target_params)
