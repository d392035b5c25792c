"""Evaluate a checkpoint of a main.py run: bits per character (accuracy for the copy task), kept in its record.

    python -m reformer_jax.evaluate --workdir=runs/default                       # the batches training validated on
    python -m reformer_jax.evaluate --workdir=runs/default --split=train --batches=16
    python -m reformer_jax.evaluate --workdir=runs/default --data_path=play.txt  # a whole file, window after window
    python -m reformer_jax.evaluate --workdir=runs/default --n_hashes=8 --step=200
    python -m reformer_jax.evaluate --init_from=converted/enwik8 --data_path=enwik8.txt   # a converted checkpoint
    python -m reformer_jax.evaluate --init_from=converted/enwik8 --data_path=enwik8.txt --seq_len=65536 \
        --topology=v5e:1x1                           # compile the evaluation step for one TPU chip: does it fit?

The latest checkpoint unless --step is given. With --split (default validation) the batches are the ones training
evaluated on (the same windows and hash keys, --batches of them: by default as many as training used), so the
figure at a checkpoint's step equals the validation figure training logged there. With --data_path every target
of the file is scored once, in windows of --seq_len tokens of the model's own tokenization (the last one padded and
masked). --n_hashes sets the LSH rounds at evaluation (more rounds: closer to full attention). Each evaluation is
added to workdir/summary.json under "evaluations" (the same evaluation repeated replaces its entry); nothing else in
the workdir is written, and nothing in a converted checkpoint.

Memory is reported with every evaluation: the evaluation step's peak at compile time (XLA's memory analysis,
argument + output - alias + temp, `reformer_jax.xla.memory_analysis`) and the process's peak RSS, printed and kept in
the entry under "memory" (with the seconds spent compiling and scoring under "seconds"). With --topology (needs
libtpu) nothing is scored: the evaluation step is compiled by the TPU compiler for one chip of that slice (as
evaluation runs on one device), and its per-chip peak is set against the HBM the compiler lets a program use.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from absl import flags, logging

from reformer_jax import cli, errors

FLAGS = flags.FLAGS
SPLITS = ("validation", "train", "test")  # test: ListOps' held-out split


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The main.py --workdir of the run to evaluate.")
    flags.DEFINE_string("init_from", None, "A converted checkpoint (python -m reformer_jax.convert --out=DIR) to "
                        "score instead of a run: needs --data_path.")
    flags.DEFINE_string("data_path", None, "Score every window of this text file (instead of --split).")
    flags.DEFINE_enum("split", None, list(SPLITS), "Score the run's own data: the batches of this split that "
                      "training evaluated on (default: validation); a ListOps run: every example of the split "
                      "(test: the held-out one).")
    flags.DEFINE_integer("n_hashes", None, "LSH hash rounds at evaluation (default: the model's).")
    flags.DEFINE_integer("step", None, "The checkpoint to evaluate (default: the latest).")
    flags.DEFINE_integer("batches", None, "Batches to score (default: as many as training's validation used; all "
                         "of the file with --data_path).")
    flags.DEFINE_integer("seq_len", None, "With --init_from: tokens per scored window (default: the model's "
                         "max_len, at most 4096).")
    flags.DEFINE_string("topology", None, "Compile the evaluation step for one chip of this TPU slice (e.g. v5e:1x1, "
                        "v4:1x1x1; needs libtpu) and report its per-chip memory instead of scoring.")


def evaluate_run(workdir: str, *, data_path: Optional[str] = None, split: str = "validation",
                 n_hashes: Optional[int] = None, step: Optional[int] = None, batches: Optional[int] = None,
                 seq_len: Optional[int] = None, flag: str = "--workdir",
                 topology: Optional[str] = None) -> Dict[str, Any]:
    """Score checkpoint `step` (default the latest) of the run in `workdir`, or the converted checkpoint there
    (`flag="--init_from"`, with `data_path`); returns the evaluation, added to a run's record.

    The entry's "memory" holds the evaluation step's compile-time figures for one [batch_size, seq_len] batch
    (`eval_step_peak_bytes` = argument + output - alias + temp, and XLA's parts) and the process's `peak_rss_bytes`;
    "seconds" holds `compile` (lowering and compiling that step) and `score` (running every batch).
    With `topology` (a TPU slice, needs libtpu) nothing is read or scored: the evaluation step is compiled for one
    chip of the slice, and the entry (not recorded) has "memory" only, with `hbm_bytes` and `fits`.

    Raises SavedRunError or DataError with a one-line message naming the flag at fault; tpu.TopologyError for a
    slice that cannot be compiled for.
    """
    import jax

    from reformer_jax import sharding as sharding_lib
    from reformer_jax.training import data as data_lib
    from reformer_jax.training import saved_run
    from reformer_jax.training import evaluation
    from reformer_jax.training import step_builder
    from reformer_jax.training import loop as trainer
    from reformer_jax.training.run_record import read_record, update_record, with_evaluation
    from reformer_jax.training.runtime_memory import peak_rss_bytes

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
            raise saved_run.SavedRunError(errors.in_flags(error)) from None
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
            raise saved_run.SavedRunError(errors.in_flags(error)) from None
        if data_path is None:
            raise data_lib.DataError(f"{flag}={workdir} is a converted checkpoint, which has no data of its own; pass "
                                     "--data_path=FILE to score a text file.")
    if config.head != "lm" and (data_path is not None or not model.is_run):
        raise data_lib.DataError(f"{flag}={workdir} is a {config.head.replace('_', '-')} model: it scores labelled "
                                 "examples, not a text file; evaluate a main.py run of it with --split, or apply it "
                                 "from Python (reformer_jax.model_for).")
    copy_task = model.tokenizer is None  # scored by accuracy: the copy task, or a classifier (ListOps)
    if data_path is not None:
        if copy_task:
            raise data_lib.DataError(f"--data_path={data_path}: the run was not trained on text "
                                     f"({data_lib.DataSource.from_dict(model.data).label}); use --split.")
        source = str(Path(data_path).absolute())
        tokens = data_lib.read_text_tokens(Path(data_path), model.tokenizer)
        pad_id = model.tokenizer.pad_id if model.tokenizer.pad_id is not None else 0
        source_batches = data_lib.consecutive_batches(tokens, batch_size, seq_len, batches, pad_id=pad_id,
                                                      padded_length=config.padded_length)
    else:
        dataset = data_lib.reopen(model.data, seq_len=seq_len, tokenizer=model.tokenizer, flag=flag)
        if split == "test":  # a held-out set of examples (ListOps): each scored once, in order
            if not hasattr(dataset, "eval_batches"):
                raise data_lib.DataError(f"--split=test: the run's data ({dataset.source}) has no test split; use "
                                         "--split=validation or --split=train.")
            source = f"{'the first ' + str(batches) + ' batches' if batches else 'every example'} of the test " \
                     f"split of {dataset.source}"
            source_batches = itertools.islice(dataset.eval_batches(split, batch_size, seq_len), batches)
        else:
            batches = batches or int(read_record(workdir).get("eval_batches", 4))
            source = f"{split} split of {dataset.source}"
            source_batches = (dataset.batch(split, seed, i, batch_size, seq_len) for i in range(batches))

    first = next(iter(source_batches))  # its shapes (and mask, if any) are those the step is compiled for
    source_batches = itertools.chain([first], source_batches)
    described = {"step": step, "data": source, "n_hashes": config.n_hashes if config.uses("lsh") else None,
                 "batches": batches, "head": config.head}
    if topology is not None:
        from reformer_jax.xla import tpu

        devices = tpu.topology_devices(topology, flag="--topology")[:1]
    else:
        devices = jax.local_devices()[:1]  # one device: any mesh the run trained on reads onto it
    mesh = sharding_lib.make_mesh(sharding_lib.MeshShape(), devices)
    replicated, data_sharding = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
    eval_fn = step_builder.build_train_step(config, mesh=mesh,
                                            lsh_rotations=model.lsh_rotations_for(config)).evaluate
    if topology is not None:
        _, memory = _compile_eval_step(eval_fn, config, saved_run.abstract_params(config), first, mesh,
                                       topology=topology)
        return {**described, "memory": memory, "copy_task": copy_task}
    params = saved_run.restore_params(model, step, sharding=replicated)
    started = time.perf_counter()
    compiled, memory = _compile_eval_step(eval_fn, config, params, first, mesh)
    compile_seconds = time.perf_counter() - started

    def run_step(params, batch, key):  # the compiled step where the batch has its shapes (the last may not)
        same = batch.keys() == first.keys() and all(batch[k].shape == first[k].shape for k in first)
        return compiled(params, batch, key) if same else eval_fn(params, batch, key)

    started = time.perf_counter()
    scores = evaluation.evaluate_batches(run_step, params, source_batches, trainer.validation_key(seed, mesh),
                                         data_sharding)
    memory["peak_rss_bytes"] = peak_rss_bytes()
    entry = {**described, "tokens": int(scores["tokens"]), "loss": scores["loss"],
             "bpc": scores["bpc"], "accuracy": scores["accuracy"], "copy_task": copy_task,
             "memory": memory, "seconds": {"compile": compile_seconds, "score": time.perf_counter() - started}}
    if model.is_run:
        update_record(workdir, {"evaluations": with_evaluation(read_record(workdir), entry)})
    return entry


def _compile_eval_step(eval_fn, config, params: Any, batch: Dict[str, Any], mesh, topology: Optional[str] = None):
    """(compiled step, its memory figures) of `eval_fn` for `params` (arrays or shapes) and batches shaped like
    `batch` ({name: [batch_size, seq_len] array}) on the one device of `mesh`; for a TPU `topology`, with the chip's
    usable HBM and whether the step fits it (a compiler refusal for lack of HBM reads as does not fit)."""
    import jax

    from reformer_jax import sharding as sharding_lib
    from reformer_jax.xla import tpu
    from reformer_jax.xla.memory_analysis import stats_from_analysis

    replicated, data_sharding = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sharding) for k, v in batch.items()}
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    device_kind = mesh.devices.flat[0].device_kind
    try:
        compiled = eval_fn.lower(params, batch, key).compile()
    except Exception as error:  # the TPU compiler refuses a program larger than the chip's HBM
        refusal = tpu.hbm_refusal(error) if topology is not None else None
        if refusal is None:
            raise
        return None, {"topology": topology, "device_kind": device_kind, "eval_step_peak_bytes": refusal.required_bytes,
                      "hbm_bytes": refusal.available_bytes, "fits": False, "refused": refusal.what}
    stats = stats_from_analysis(compiled.memory_analysis(), params, None, batch,
                                "tpu" if topology else jax.default_backend(), d_model=config.d_model)
    if topology is not None:
        stats = dataclasses.replace(stats, topology=topology, hbm_bytes=tpu.usable_hbm_bytes(topology))
    # The training-step parts of MemoryStats (gradients, optimizer state, the floor) do not apply to evaluation.
    memory = {"eval_step_peak_bytes": stats.peak_bytes, "argument_bytes": stats.argument_bytes,
              "output_bytes": stats.output_bytes, "alias_bytes": stats.alias_bytes, "temp_bytes": stats.temp_bytes,
              "param_bytes": stats.param_bytes, "batch_bytes": stats.batch_bytes, "backend": stats.backend,
              "device_kind": device_kind}
    if topology is not None:
        memory.update(topology=topology, hbm_bytes=stats.hbm_bytes, fits=stats.fits)
    return compiled, memory


def describe_memory(entry: Dict[str, Any]) -> str:
    """One line: the evaluation step's compile-time peak (against the chip's HBM for a topology), the process's
    peak RSS and the seconds spent, where the entry has them."""
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    memory = entry["memory"]
    if "refused" in memory:
        return (f"{memory['topology']} ({memory['device_kind']}): the TPU compiler refused the evaluation step: its "
                f"{memory['refused']} need {mib(memory['eval_step_peak_bytes'])}, more than the "
                f"{mib(memory['hbm_bytes'])} of HBM a program may use per chip: does NOT fit")
    parts = (f"XLA: argument {mib(memory['argument_bytes'])} (parameters {mib(memory['param_bytes'])}), output "
             f"{mib(memory['output_bytes'])}, alias {mib(memory['alias_bytes'])}, temp {mib(memory['temp_bytes'])}")
    if "topology" in memory:
        return (f"{memory['topology']} ({memory['device_kind']}): evaluation step peak "
                f"{mib(memory['eval_step_peak_bytes'])} per chip at compile time ({parts}), of the "
                f"{mib(memory['hbm_bytes'])} of HBM a program may use: {'fits' if memory['fits'] else 'does NOT fit'}")
    seconds = entry["seconds"]
    return (f"memory: evaluation step peak {mib(memory['eval_step_peak_bytes'])} at compile time ({parts}; "
            f"{memory['backend']}); process peak RSS {mib(memory['peak_rss_bytes'])}; compiled in "
            f"{seconds['compile']:.1f} s, scored in {seconds['score']:.1f} s")


def describe(entry: Dict[str, Any]) -> str:
    """One line: what was scored and how well."""
    rounds = f", {entry['n_hashes']} hash rounds" if entry["n_hashes"] else ""
    if entry.get("head") == "classification":  # one label per example
        figures = f"accuracy {entry['accuracy']:.4f} (loss {entry['loss']:.4f} nats per example)"
        return f"step {entry['step']}, {entry['data']} ({entry['tokens']:,} examples): {figures}"
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
    from reformer_jax.xla import tpu

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
    if FLAGS.topology is not None:
        try:
            tpu.parse_topology(FLAGS.topology, flag="--topology")
        except tpu.TopologyError as error:
            raise cli.UsageError(str(error)) from None
        import jax

        jax.config.update("jax_platforms", "cpu")  # the TPU compiler runs through the topology, not a TPU backend
        try:
            # a slice libtpu does not know fails here, before anything compiles
            tpu.topology_devices(FLAGS.topology, flag="--topology")
        except tpu.TopologyError as error:
            if not tpu.libtpu_available():  # the machine lacks libtpu: not a bad flag value
                print(f"error: {error}", file=sys.stderr)
                return 1
            raise cli.UsageError(str(error)) from None
    try:
        entry = evaluate_run(FLAGS.workdir or FLAGS.init_from, data_path=FLAGS.data_path,
                             split=FLAGS.split or "validation", n_hashes=FLAGS.n_hashes, step=FLAGS.step,
                             batches=FLAGS.batches, seq_len=FLAGS.seq_len,
                             flag="--workdir" if FLAGS.workdir else "--init_from", topology=FLAGS.topology)
    except (SavedRunError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if FLAGS.topology is not None:
        print(describe_memory(entry), flush=True)
        return 0 if entry["memory"]["fits"] else 1
    where = f"; recorded in {Path(FLAGS.workdir) / SUMMARY_FILE}" if FLAGS.workdir else ""
    print(describe(entry) + where, flush=True)
    print(describe_memory(entry), flush=True)
    return 0 if math.isfinite(entry["loss"]) else 1


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
