"""Reading a saved model back: a main.py workdir (its settings and checkpoints) or a converted Hugging Face
checkpoint (python -m reformer_jax.convert). The one reader behind resume's settings, main.py --init_from,
generate, evaluate and the Python API:

    model = saved_run.open_model("runs/default")            # or a converted directory
    params = saved_run.restore_params(model)                 # on this process's first device
    params = saved_run.restore_params(model, sharding=NamedSharding(mesh, P()))   # or laid out on a mesh
    model.config, model.tokenizer, model.data                # the model, its text <-> ids, its data (a run's)
    model.lsh_rotations                                      # a converted seeded checkpoint's hash rotations, or None

A converted checkpoint of a Hugging Face model with a fixed hash_seed carries the hash rotations Hugging Face uses,
[LSH layers, h, k, n_hashes, f / 2] (hf_convert.hf_lsh_rotations); every reader passes them as `lsh_rotations` to
ReformerLM, decoding.generate or the evaluation step, and so hashes as Hugging Face does. Where they are None (a
main.py run, an unseeded checkpoint) the readers draw rotations from their seed.

A checkpoint is read onto the devices given here, whatever mesh (and however many processes) wrote it: orbax
reshards each array into the target's sharding. Nothing here writes to the directory read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from reformer_jax.errors import setting
from reformer_jax import tokenizers
from reformer_jax.model import hf_convert
from reformer_jax.model.config import ModelConfig
from reformer_jax.training import step as train
from reformer_jax.training.checkpoint import (RUN_SETTINGS_FILE, Checkpointer, complete_steps, leaf_shapes,
                                              shape_differences)


class SavedRunError(ValueError):
    """A directory that holds no usable model, or a checkpoint that does not fit; the message says what to do."""


def is_run_workdir(path: str) -> bool:
    """Whether `path` looks like a main.py workdir (its settings file and a checkpoints directory)."""
    return (Path(path) / RUN_SETTINGS_FILE).is_file() and (Path(path) / "checkpoints").is_dir()


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A model on disk: a main.py run (`settings`, its complete checkpoint `steps`) or a converted checkpoint."""

    path: Path
    config: ModelConfig
    tokenizer: Optional[tokenizers.Tokenizer]  # None: a model of symbols (the copy task)
    settings: Optional[Dict[str, Any]] = None  # run_settings.json of a run; None for a converted checkpoint
    steps: Tuple[int, ...] = ()  # a run's complete checkpoints, ascending
    flag: str = "workdir"  # how the user named it, for messages
    # [LSH layers, h, k, n_hashes, f / 2] float32: the recorded hash rotations of a converted seeded checkpoint
    lsh_rotations: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def is_run(self) -> bool:
        return self.settings is not None

    def lsh_rotations_for(self, config: ModelConfig) -> Optional[np.ndarray]:
        """The recorded rotations where `config` hashes as the saved model does (its n_hashes, buckets and heads),
        else None: evaluated with other hash rounds (evaluate --n_hashes) the model draws its own."""
        hashing = lambda c: (c.layer_types, c.n_heads, c.d_head, c.n_hashes, c.n_buckets)  # noqa: E731
        return self.lsh_rotations if hashing(config) == hashing(self.config) else None

    @property
    def workdir(self) -> Path:
        return self.path

    @property
    def data(self) -> Optional[Dict[str, Any]]:
        """The run's recorded data source (`data.DataSource.to_dict`), None for a converted checkpoint."""
        return (self.settings or {}).get("data")

    def checkpoint_step(self, step: Optional[int] = None) -> Optional[int]:
        """`step` if it is checkpointed, else the latest (None for a converted checkpoint)."""
        if not self.is_run:
            if step is not None:
                raise SavedRunError(f"{setting('step')}={step}: {self.flag}={self.path} is a converted checkpoint, "
                                    f"which has no steps; leave {setting('step')} out.")
            return None
        if step is None:
            return self.steps[-1]
        if step not in self.steps:
            raise SavedRunError(f"{setting('step')}={step}: {self.path / 'checkpoints'} holds steps "
                                f"{', '.join(map(str, self.steps))}; pass one of them (or omit {setting('step')} "
                                "for the latest).")
        return step

    def describe(self, step: Optional[int] = None) -> str:
        if not self.is_run:
            return f"{self.path} (converted)"
        return f"{self.path} (step {self.checkpoint_step(step)})"


def model_config(fields: Dict[str, Any], **overrides: Any) -> ModelConfig:
    """The ModelConfig saved as JSON (lists become tuples), with fields overridden."""
    return hf_convert.config_from_fields({**fields, **overrides})


def open_run(workdir: str, flag: Optional[str] = None) -> SavedModel:
    """A main.py workdir: its settings, model, tokenizer and complete checkpoints; SavedRunError (naming `flag`,
    default the workdir setting) if it is not usable."""
    flag = flag or setting("workdir")
    path = Path(workdir)
    if not is_run_workdir(path):
        raise SavedRunError(f"{flag}={workdir} is not a main.py workdir: expected {RUN_SETTINGS_FILE} and "
                            f"checkpoints/ in it (pass the {setting('workdir')} a training run used).")
    try:
        settings = json.loads((path / RUN_SETTINGS_FILE).read_text())
        config = model_config(settings["model"])
        tokenizer = tokenizers.from_dict(settings.get("tokenizer"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SavedRunError(f"{flag}={workdir}: {path / RUN_SETTINGS_FILE} is unreadable ({error}).") from error
    steps = complete_steps(path)
    if not steps:
        raise SavedRunError(f"{flag}={workdir} holds no complete checkpoint yet; train it first (python main.py "
                            f"{setting('workdir')}={workdir}).")
    return SavedModel(path=path, config=config, tokenizer=tokenizer, settings=settings, steps=tuple(steps), flag=flag)


def open_model(path: str, flag: Optional[str] = None) -> SavedModel:
    """A main.py workdir or a converted checkpoint, whichever `path` is; SavedRunError naming `flag` (default the
    init_from setting) otherwise."""
    flag = flag or setting("init_from")
    if is_run_workdir(path):
        return open_run(path, flag=flag)
    if not Path(path).exists():
        raise SavedRunError(f"{flag}={path} does not exist; pass a main.py {setting('workdir')} or a converted "
                            "checkpoint (the output directory of python -m reformer_jax.convert).")
    try:
        config = hf_convert.load_converted_config(Path(path))
        tokenizer = hf_convert.load_converted_tokenizer(Path(path))
        rotations = hf_convert.load_converted_rotations(Path(path), config)
    except (hf_convert.ConversionError, tokenizers.TokenizerError) as error:
        raise SavedRunError(f"{flag}={path}: {error}") from error
    return SavedModel(path=Path(path), config=config, tokenizer=tokenizer, flag=flag, lsh_rotations=rotations)


def abstract_state(run: SavedModel, sharding: Any = None):
    """The shapes and dtypes of the run's TrainState (its model and optimizer), computed without allocating; every
    leaf laid out by `sharding` (one for all leaves)."""
    s = run.settings
    tx = train.make_optimizer(s["optimizer"], s["learning_rate"], schedule_steps=s["schedule_steps"],
                              warmup_steps=s.get("warmup_steps"), clip_norm=s["clip_norm"])
    shapes, _ = train.abstract_train_state(run.config, tx)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def check_same_shapes(model: SavedModel, config: ModelConfig, flag: Optional[str] = None) -> None:
    """SavedRunError naming the parameter arrays whose shape or dtype differ between the saved model and `config`
    (computed abstractly: nothing is allocated, compiled or read but the settings)."""
    flag = flag or setting("init_from")
    differences = shape_differences(leaf_shapes(abstract_params(model.config)), leaf_shapes(abstract_params(config)))
    if differences:
        raise SavedRunError(f"{flag}={model.path} has parameters of other shapes than this model's: "
                            + "; ".join(differences) + ". Leave out the model flags that change shapes (the saved "
                            "model is used when none is given), or start from scratch.")


def abstract_params(config: ModelConfig):
    """The parameters' shapes and dtypes of a model, computed without allocating."""
    from reformer_jax.model.reformer_lm import init_params

    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))  # traced: jax's backends stay unstarted


def default_sharding() -> jax.sharding.Sharding:
    """Where parameters are read to unless the caller lays them out: this process's first device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def restore_params(model: SavedModel, step: Optional[int] = None, sharding: Any = None) -> Any:
    """The parameters of checkpoint `step` (default: the latest; a converted checkpoint has one), laid out by
    `sharding` (one sharding for every leaf, or a tree of them like the parameters; default: this process's first
    device), whatever devices wrote them."""
    sharding = sharding if sharding is not None else default_sharding()
    if not model.is_run:
        target = abstract_params(model.config)
        target = _with_shardings(target, sharding)
        try:
            return hf_convert.load_converted_params(model.path, target)
        except Exception as error:  # orbax and tensorstore raise many types; the message says what failed
            raise SavedRunError(f"{model.flag}={model.path}: its params/ cannot be read ({type(error).__name__}: "
                                f"{str(error).splitlines()[0][:300] if str(error) else ''}).") from error
    one_for_all = isinstance(sharding, jax.sharding.Sharding)
    # With a tree of shardings for the parameters, the optimizer state (read, then dropped) goes on one device.
    state = abstract_state(model, sharding if one_for_all else default_sharding())
    if not one_for_all:
        state = state.replace(params=_with_shardings(state.params, sharding))
    checkpointer = Checkpointer(model.path, read_only=True)
    try:
        return checkpointer.restore(model.checkpoint_step(step), state).params
    finally:
        checkpointer.close()


def _with_shardings(tree: Any, sharding: Any) -> Any:
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)
