"""Evaluate a checkpoint of a main.py run: bits per character (accuracy for the copy task), kept in its record.

    python -m reformer_jax.evaluate --workdir=runs/default                       # the batches training validated on
    python -m reformer_jax.evaluate --workdir=runs/default --split=train --batches=16
    python -m reformer_jax.evaluate --workdir=runs/default --data_path=play.txt  # a whole file, window after window
    python -m reformer_jax.evaluate --workdir=runs/default --n_hashes=8 --step=200

The latest checkpoint unless --step is given. With --split (default validation) the batches are the ones training
evaluated on (the same windows and hash keys, --batches of them: by default as many as training used), so the
figure at a checkpoint's step equals the validation figure training logged there. With --data_path every window of
--seq_len in the file is scored once. --n_hashes sets the LSH rounds at evaluation (more rounds: closer to full
attention). Each evaluation is added to workdir/summary.json under "evaluations" (the same evaluation repeated
replaces its entry); nothing else in the workdir is written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from absl import flags, logging

from reformer_jax import cli

FLAGS = flags.FLAGS
SPLITS = ("validation", "train")


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The main.py --workdir of the run to evaluate (required).")
    flags.DEFINE_string("data_path", None, "Score every window of this text file (instead of --split).")
    flags.DEFINE_enum("split", None, list(SPLITS), "Score the run's own data: the batches of this split that "
                      "training evaluated on (default: validation).")
    flags.DEFINE_integer("n_hashes", None, "LSH hash rounds at evaluation (default: the run's).")
    flags.DEFINE_integer("step", None, "The checkpoint to evaluate (default: the latest).")
    flags.DEFINE_integer("batches", None, "Batches to score (default: as many as training's validation used; all "
                         "of the file with --data_path).")


def evaluate_run(workdir: str, *, data_path: Optional[str] = None, split: str = "validation",
                 n_hashes: Optional[int] = None, step: Optional[int] = None,
                 batches: Optional[int] = None) -> Dict[str, Any]:
    """Score checkpoint `step` (default the latest) of the run in `workdir`; returns the entry added to its record.

    Raises SavedRunError or DataError with a one-line message naming the flag at fault.
    """
    import jax

    from reformer_jax.training import data as data_lib
    from reformer_jax.training import saved_run
    from reformer_jax.training import step as train
    from reformer_jax.training import loop as trainer
    from reformer_jax.training.run_record import read_record, update_record, with_evaluation

    run = saved_run.open_run(workdir)
    step = run.checkpoint_step(step)
    settings, config = run.settings, run.config
    if n_hashes is not None:
        if not config.uses("lsh"):
            raise saved_run.SavedRunError(f"--n_hashes={n_hashes}: the model of --workdir={workdir} has no LSH "
                                          "attention layer; leave --n_hashes out.")
        try:
            config = config.replace(n_hashes=n_hashes)
        except ValueError as error:
            raise saved_run.SavedRunError(str(error).replace("ModelConfig.", "--")) from None
    batch_size, seq_len, seed = settings["batch_size"], settings["seq_len"], settings["seed"]
    record = read_record(workdir)
    if data_path is not None:
        if settings["dataset"] == "synthetic":
            raise data_lib.DataError(f"--data_path={data_path}: the run was trained on the copy task, not on text; "
                                     "use --split.")
        source = str(Path(data_path).absolute())
        source_batches = data_lib.consecutive_batches(data_lib.read_text_tokens(Path(data_path)), batch_size,
                                                      seq_len, batches)
    else:
        if settings["dataset"] == "text" and not record.get("data"):
            raise data_lib.DataError(f"--workdir={workdir}: the run's text file is not in its record; pass "
                                     "--data_path=FILE to score a file.")
        dataset = data_lib.load_dataset(settings["dataset"], seq_len=seq_len, vocab_size=config.vocab_size,
                                        data_path=record.get("data") if settings["dataset"] != "synthetic" else None)
        batches = batches or int(record.get("eval_batches", 4))
        source = f"{split} split of {dataset.source}"
        source_batches = (dataset.batch(split, seed, i, batch_size, seq_len) for i in range(batches))

    devices = jax.devices()
    if batch_size % len(devices):
        raise saved_run.SavedRunError(f"the run's batch size {batch_size} is not divisible by the {len(devices)} "
                                      "devices here; evaluate on a machine with a device count dividing it.")
    replicated, data_sharding = trainer.data_parallel_shardings(devices)
    params = saved_run.restore_params(run, step, sharding=replicated)
    tx = train.make_optimizer(settings["optimizer"], settings["learning_rate"])  # unused by the evaluation step
    eval_fn = trainer.sharded_step_functions(config, tx, replicated, data_sharding)[2]
    scores = trainer.evaluate_batches(eval_fn, params, source_batches, seed, data_sharding)
    entry = {"step": step, "data": source, "n_hashes": config.n_hashes if config.uses("lsh") else None,
             "batches": batches, "tokens": int(scores["val_tokens"]), "loss": scores["val_loss"],
             "bpc": scores["val_bpc"], "accuracy": scores["val_accuracy"],
             "copy_task": settings["dataset"] == "synthetic"}
    update_record(workdir, {"evaluations": with_evaluation(read_record(workdir), entry)})
    return entry


def describe(entry: Dict[str, Any]) -> str:
    """One line: what was scored and how well."""
    rounds = f", {entry['n_hashes']} hash rounds" if entry["n_hashes"] else ""
    if entry["copy_task"]:
        figures = f"accuracy {entry['accuracy']:.4f} of the copied symbols (loss {entry['loss']:.4f} nats)"
    else:
        figures = (f"{entry['bpc']:.4f} bits per character (loss {entry['loss']:.4f} nats, accuracy "
                   f"{entry['accuracy']:.4f})")
    return f"step {entry['step']}, {entry['data']} ({entry['tokens']:,} tokens{rounds}): {figures}"


def main(argv) -> int:
    logging.set_verbosity(logging.WARNING)
    from reformer_jax.training.checkpoint import CheckpointError
    from reformer_jax.training.data import DataError
    from reformer_jax.training.run_record import SUMMARY_FILE
    from reformer_jax.training.saved_run import SavedRunError

    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)")
    if not FLAGS.workdir:
        raise cli.UsageError("--workdir=DIR is required: the main.py --workdir of the run to evaluate.")
    if FLAGS.data_path and FLAGS.split:
        raise cli.UsageError(f"--data_path={FLAGS.data_path} and --split={FLAGS.split} exclude each other; give one.")
    for name in ("n_hashes", "batches", "step"):
        if FLAGS[name].value is not None and FLAGS[name].value < (0 if name == "step" else 1):
            raise cli.UsageError(f"--{name}={FLAGS[name].value} is invalid: expected a positive integer.")
    try:
        entry = evaluate_run(FLAGS.workdir, data_path=FLAGS.data_path, split=FLAGS.split or "validation",
                             n_hashes=FLAGS.n_hashes, step=FLAGS.step, batches=FLAGS.batches)
    except (SavedRunError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe(entry) + f"; recorded in {Path(FLAGS.workdir) / SUMMARY_FILE}", flush=True)
    return 0 if math.isfinite(entry["loss"]) else 1


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
