"""Evaluate a checkpoint of a main.py run: bits per character (accuracy for the copy task), kept in its record.

    python -m reformer_jax.evaluate --workdir=runs/default                       # the batches training validated on
    python -m reformer_jax.evaluate --workdir=runs/default --split=train --batches=16
    python -m reformer_jax.evaluate --workdir=runs/default --data_path=play.txt  # a whole file, window after window
    python -m reformer_jax.evaluate --workdir=runs/default --n_hashes=8 --step=200
    python -m reformer_jax.evaluate --init_from=converted/enwik8 --data_path=enwik8.txt   # a converted checkpoint

The latest checkpoint unless --step is given. With --split (default validation) the batches are the ones training
evaluated on (the same windows and hash keys, --batches of them: by default as many as training used), so the
figure at a checkpoint's step equals the validation figure training logged there. With --data_path every target
of the file is scored once, in windows of --seq_len tokens of the model's own tokenization (the last one padded and
masked). --n_hashes sets the LSH rounds at evaluation (more rounds: closer to full attention). Each evaluation is
added to workdir/summary.json under "evaluations" (the same evaluation repeated replaces its entry); nothing else in
the workdir is written, and nothing in a converted checkpoint.
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
    flags.DEFINE_string("workdir", None, "The main.py --workdir of the run to evaluate.")
    flags.DEFINE_string("init_from", None, "A converted checkpoint (python -m reformer_jax.convert --out=DIR) to "
                        "score instead of a run: needs --data_path.")
    flags.DEFINE_string("data_path", None, "Score every window of this text file (instead of --split).")
    flags.DEFINE_enum("split", None, list(SPLITS), "Score the run's own data: the batches of this split that "
                      "training evaluated on (default: validation).")
    flags.DEFINE_integer("n_hashes", None, "LSH hash rounds at evaluation (default: the model's).")
    flags.DEFINE_integer("step", None, "The checkpoint to evaluate (default: the latest).")
    flags.DEFINE_integer("batches", None, "Batches to score (default: as many as training's validation used; all "
                         "of the file with --data_path).")
    flags.DEFINE_integer("seq_len", None, "With --init_from: tokens per scored window (default: the model's "
                         "max_len, at most 4096).")


def evaluate_run(workdir: str, *, data_path: Optional[str] = None, split: str = "validation",
                 n_hashes: Optional[int] = None, step: Optional[int] = None, batches: Optional[int] = None,
                 seq_len: Optional[int] = None, flag: str = "--workdir") -> Dict[str, Any]:
    """Score checkpoint `step` (default the latest) of the run in `workdir`, or the converted checkpoint there
    (`flag="--init_from"`, with `data_path`); returns the evaluation, added to a run's record.

    Raises SavedRunError or DataError with a one-line message naming the flag at fault.
    """
    import jax

    from reformer_jax import sharding as sharding_lib
    from reformer_jax.training import data as data_lib
    from reformer_jax.training import saved_run
    from reformer_jax.training import step as train
    from reformer_jax.training import loop as trainer
    from reformer_jax.training.run_record import read_record, update_record, with_evaluation

    model = saved_run.open_run(workdir) if flag == "--workdir" else saved_run.open_model(workdir, flag=flag)
    step = model.checkpoint_step(step)
    config = model.config
    if n_hashes is not None:
        if not config.uses("lsh"):
            raise saved_run.SavedRunError(f"--n_hashes={n_hashes}: the model of {flag}={workdir} has no LSH "
                                          "attention layer; leave --n_hashes out.")
        try:
            config = config.replace(n_hashes=n_hashes)
        except ValueError as error:
            raise saved_run.SavedRunError(str(error).replace("ModelConfig.", "--")) from None
    if model.is_run:
        settings = model.settings
        batch_size, seed = settings["batch_size"], settings["seed"]
        seq_len = settings["seq_len"]
    else:
        batch_size, seed = 1, 0
        seq_len = seq_len or min(config.max_len, 4096)
        try:
            config.check_seq_len(seq_len)
        except ValueError as error:
            raise saved_run.SavedRunError(f"--seq_len={seq_len}: {str(error).replace('ModelConfig.', '--')}") from None
        if data_path is None:
            raise data_lib.DataError(f"{flag}={workdir} is a converted checkpoint, which has no data of its own; pass "
                                     "--data_path=FILE to score a text file.")
    copy_task = model.tokenizer is None
    if data_path is not None:
        if copy_task:
            raise data_lib.DataError(f"--data_path={data_path}: the run was trained on the copy task, not on text; "
                                     "use --split.")
        source = str(Path(data_path).absolute())
        tokens = data_lib.read_text_tokens(Path(data_path), model.tokenizer)
        pad_id = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
        source_batches = data_lib.consecutive_batches(tokens, batch_size, seq_len, batches, pad_id=pad_id)
    else:
        dataset = data_lib.reopen(model.data, seq_len=seq_len, tokenizer=model.tokenizer, flag=flag)
        batches = batches or int(read_record(workdir).get("eval_batches", 4))
        source = f"{split} split of {dataset.source}"
        source_batches = (dataset.batch(split, seed, i, batch_size, seq_len) for i in range(batches))

    devices = jax.local_devices()[:1]  # one device: any mesh the run trained on reads onto it
    mesh = sharding_lib.make_mesh(sharding_lib.MeshShape(), devices)
    replicated, data_sharding = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
    params = saved_run.restore_params(model, step, sharding=replicated)
    tx = train.make_optimizer("adamw")  # unused by the evaluation step
    eval_fn = trainer.sharded_step_functions(config, tx, replicated, data_sharding)[2]
    scores = trainer.evaluate_batches(eval_fn, params, source_batches, seed, data_sharding)
    entry = {"step": step, "data": source, "n_hashes": config.n_hashes if config.uses("lsh") else None,
             "batches": batches, "tokens": int(scores["val_tokens"]), "loss": scores["val_loss"],
             "bpc": scores["val_bpc"], "accuracy": scores["val_accuracy"], "copy_task": copy_task}
    if model.is_run:
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
    if (FLAGS.workdir is None) == (FLAGS.init_from is None):
        raise cli.UsageError("pass one of --workdir=DIR (a main.py run) and --init_from=DIR (a converted checkpoint, "
                             "with --data_path=FILE).")
    if FLAGS.seq_len is not None and FLAGS.workdir:
        raise cli.UsageError(f"--seq_len={FLAGS.seq_len} is for --init_from: a run is scored at its own length.")
    if FLAGS.data_path and FLAGS.split:
        raise cli.UsageError(f"--data_path={FLAGS.data_path} and --split={FLAGS.split} exclude each other; give one.")
    for name in ("n_hashes", "batches", "step", "seq_len"):
        if FLAGS[name].value is not None and FLAGS[name].value < (0 if name == "step" else 1):
            raise cli.UsageError(f"--{name}={FLAGS[name].value} is invalid: expected a positive integer.")
    try:
        entry = evaluate_run(FLAGS.workdir or FLAGS.init_from, data_path=FLAGS.data_path,
                             split=FLAGS.split or "validation", n_hashes=FLAGS.n_hashes, step=FLAGS.step,
                             batches=FLAGS.batches, seq_len=FLAGS.seq_len,
                             flag="--workdir" if FLAGS.workdir else "--init_from")
    except (SavedRunError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    where = f"; recorded in {Path(FLAGS.workdir) / SUMMARY_FILE}" if FLAGS.workdir else ""
    print(describe(entry) + where, flush=True)
    return 0 if math.isfinite(entry["loss"]) else 1


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
