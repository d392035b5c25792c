"""reformer_jax main job: train one of the four variants, show progress, save and resume, report memory.

    python main.py --model=reformer --n_hashes=4
    python main.py --model=transformer --dataset=synthetic --steps=500
    python main.py --help

Every ModelConfig field is a flag (generated from the dataclass); a model flag left unset keeps the preset's value.
The defaults are sized for a CPU (under 10 minutes on 2 cores); --sizes=seed gives the seed's setup (d_model 512,
8 heads, d_ff 2048, 6 layers, length 4096, batch 1), see reformer_jax/model/sizes.py. Rerunning the same command resumes
from the latest checkpoint in --workdir; a larger --steps continues the run; a finished run is left as it is.

Flags -> configs (reformer_jax/job_flags.py) -> one library call (`reformer_jax.training.loop.train_and_evaluate`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from reformer_jax import cli, errors, job_flags
# Checked and read here; tests and scripts reach them as main.<name>.
from reformer_jax.job_flags import MODEL_FLAGS, model_config_from_flags, validate_run_flags  # noqa: F401

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(job_flags)  # --help lists the job's flags as main.py's own


def main(argv):
    with errors.flag_names():  # the library's messages name the flags of this command line
        return _train(argv)


def _train(argv):
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO level
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)")
        validate_run_flags()
        config = model_config_from_flags()
        if FLAGS.compile_only:
            return job_flags.compile_only(config)
        host_was_split = job_flags.apply_device_flags(config)
        job_flags.check_init_from_shapes(config)
    except app.UsageError as error:  # one line, no usage text (that is --help's)
        print(f"error: {error}", file=sys.stderr)
        return 2
    job_flags.initialize_distributed()
    options = job_flags.train_options(config, host_was_split)
    if FLAGS.compilation_cache_dir is not None:
        from reformer_jax.xla.compilation_cache import enable_compilation_cache

        enable_compilation_cache(FLAGS.compilation_cache_dir)

    from reformer_jax.training.checkpoint import CheckpointError, CheckpointMismatch
    from reformer_jax.training.data import DataError
    from reformer_jax.training.loop import TrainingDiverged, train_and_evaluate
    from reformer_jax.training.saved_run import SavedRunError

    try:
        train_and_evaluate(config, options)
    except (DataError, CheckpointMismatch, CheckpointError, TrainingDiverged, SavedRunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # e.g. a batch size the device count does not divide
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    cli.run(main)
