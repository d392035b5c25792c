"""train_and_evaluate: the training loop behind main.py.

Data-parallel over every device (a "data" mesh axis; parameters replicated), checkpointed with orbax, resumable
exactly: batches and step keys are pure functions of (seed, step), so a resumed run repeats the uninterrupted
one. Logging and metrics come from process 0 only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import resource
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from reformer_jax import data as data_lib
from reformer_jax import train
from reformer_jax.checkpoint import (Checkpointer, WorkdirError, check_run_settings, ensure_writable_workdir,
                                     refuse_to_overwrite_a_run, write_json_atomic)
from reformer_jax.config import ModelConfig
from reformer_jax.memory import compile_train_step
from reformer_jax.run_log import MetricsLog, Progress, format_duration
from reformer_jax.xla_options import step_compiler_options


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Everything about a run except the model."""

    workdir: str
    steps: int = 1000
    schedule_steps: Optional[int] = None  # None: steps
    warmup_steps: Optional[int] = None  # None: 10% of schedule_steps, at most 1000
    learning_rate: float = 2e-3
    optimizer: str = "adafactor"
    clip_norm: float = 1.0
    batch_size: int = 8
    seq_len: int = 1024
    dataset: str = "tiny_shakespeare"
    data_path: Optional[str] = None
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    sample_len: int = 200
    analyze_memory: bool = True
    skip_nonfinite: bool = False  # skip a batch whose loss or gradients are NaN/Inf instead of stopping
    init_from: Optional[str] = None  # a converted checkpoint (reformer_jax.convert) to start from
    # Stop after this much wall time in this call (compilation included), evaluated and checkpointed; a rerun
    # resumes. Not a run setting: a resumed run may change it.
    time_limit_minutes: Optional[float] = None
    # Compile the steps with `xla_options.step_compiler_options(lean=...)`: on CPU, without XLA's MLIR fusion
    # emitters (less peak RSS, slower steps: see benchmarks/results/speed_peers.md). Not a run setting either.
    lean_compile: bool = False

    @property
    def total_schedule_steps(self) -> int:
        return self.schedule_steps or self.steps

    def run_settings(self, config: ModelConfig) -> Dict[str, Any]:
        """What must not change when a run is resumed."""
        return {"model": config.to_dict(), "optimizer": self.optimizer, "learning_rate": self.learning_rate,
                "schedule_steps": self.total_schedule_steps, "warmup_steps": self.warmup_steps,
                "clip_norm": self.clip_norm, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "dataset": self.dataset, "seed": self.seed, "init_from": self.init_from}


def data_parallel_shardings(devices) -> Tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded) shardings over a one-axis "data" mesh of `devices`."""
    # Auto axes: XLA propagates the batch sharding and inserts the gradient all-reduce itself.
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def guarded_train_step(state, batch, rng, *, config: ModelConfig, skip_nonfinite: bool = False):
    """`train.train_step` plus metrics["finite"] (loss and gradient norm finite).

    With `skip_nonfinite`, a non-finite step keeps the parameters and optimizer state and only counts the step,
    so the data order and random keys of later steps stay those of (seed, step).
    """
    new_state, metrics = train.train_step(state, batch, rng, config=config)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    if skip_nonfinite:
        kept = new_state.replace(params=state.params, opt_state=state.opt_state)
        new_state = jax.tree.map(lambda updated, old: jnp.where(finite, updated, old), new_state, kept)
    return new_state, {**metrics, "finite": finite}


def sharded_step_functions(config: ModelConfig, tx, replicated: NamedSharding, data_sharding: NamedSharding,
                           skip_nonfinite: bool = False, lean_compile: bool = False):
    """Jitted (init, train_step, eval_step): state replicated and donated, batch split over "data", compiled with
    `xla_options.step_compiler_options(lean=lean_compile)`."""
    options = step_compiler_options(lean=lean_compile)
    # A strongly typed step counter, as a restored checkpoint has: a resumed run then calls the same compiled step
    # (flax's TrainState.create(step=0) is weakly typed, and a different input type means another compilation).
    init_fn = jax.jit(lambda key: train.create_train_state(key, config, tx).replace(step=jnp.zeros((), jnp.int32)),
                      out_shardings=replicated, compiler_options=options)
    step_fn = jax.jit(functools.partial(guarded_train_step, config=config, skip_nonfinite=skip_nonfinite),
                      donate_argnums=0, in_shardings=(replicated, data_sharding, replicated),
                      out_shardings=(replicated, replicated), compiler_options=options)
    eval_fn = jax.jit(functools.partial(train.eval_step, config=config),
                      in_shardings=(replicated, data_sharding, replicated), out_shardings=replicated,
                      compiler_options=options)
    return init_fn, step_fn, eval_fn


@functools.lru_cache(maxsize=8)
def _compiled_steps(config: ModelConfig, optimizer: str, learning_rate: float, schedule_steps: int,
                    warmup_steps: Optional[int], clip_norm: float, devices: tuple, skip_nonfinite: bool,
                    lean_compile: bool = False):
    """Step functions per (model, optimizer, devices): a second run in the same process (a resume, a sweep)
    reuses the compiled executables instead of compiling again."""
    tx = train.make_optimizer(optimizer, learning_rate, schedule_steps=schedule_steps, warmup_steps=warmup_steps,
                              clip_norm=clip_norm)
    return sharded_step_functions(config, tx, *data_parallel_shardings(list(devices)), skip_nonfinite,
                                  lean_compile)


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _say(text: str) -> None:
    if _is_main_process():
        print(text, flush=True)


def global_batch(batch: Dict[str, np.ndarray], sharding: NamedSharding) -> Dict[str, jax.Array]:
    """This process's rows of the (identically generated) global batch -> one global, sharded array each."""
    n, i = jax.process_count(), jax.process_index()
    rows = batch["inputs"].shape[0] // n
    return {k: jax.make_array_from_process_local_data(sharding, v[i * rows:(i + 1) * rows]) for k, v in batch.items()}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _runtime_memory_line() -> str:
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return f"runtime peak on {jax.local_devices()[0].device_kind}: {stats['peak_bytes_in_use'] / 2**20:,.1f} MiB"
    return f"runtime: process peak RSS {_peak_rss_bytes() / 2**20:,.1f} MiB (CPU: no device memory statistics)"


def evaluate(eval_fn, params, dataset, options: TrainOptions, sharding: NamedSharding) -> Dict[str, float]:
    """Mean loss and accuracy over the same `eval_batches` validation batches every time (fixed hash keys)."""
    totals: Dict[str, float] = {}
    for i in range(options.eval_batches):
        batch = global_batch(dataset.batch("validation", options.seed, i, options.batch_size, options.seq_len),
                              sharding)
        metrics = jax.device_get(eval_fn(params, batch, jax.random.key(options.seed + 10_000 + i)))
        weight = float(metrics["tokens"])
        for name in ("loss", "accuracy"):
            totals[name] = totals.get(name, 0.0) + float(metrics[name]) * weight
        totals["tokens"] = totals.get("tokens", 0.0) + weight
    tokens = max(totals.pop("tokens"), 1.0)
    result = {f"val_{name}": value / tokens for name, value in totals.items()}
    result["val_bpc"] = result["val_loss"] / math.log(2)
    return result


def train_and_evaluate(config: ModelConfig, options: TrainOptions, *, dataset=None) -> Dict[str, Any]:
    """Train `config` as `options` say; returns the summary (also written to workdir/summary.json)."""
    workdir = Path(options.workdir)
    ensure_writable_workdir(workdir)
    settings = options.run_settings(config)
    check_run_settings(workdir, settings)
    if dataset is None:
        dataset = data_lib.load_dataset(options.dataset, seq_len=options.seq_len, data_path=options.data_path,
                                        vocab_size=config.vocab_size)

    devices = jax.devices()
    if options.batch_size % len(devices):
        raise ValueError(f"--batch_size={options.batch_size} is not divisible by the {len(devices)} devices; use a "
                         f"multiple of {len(devices)}.")
    replicated, data_sharding = data_parallel_shardings(devices)
    _say(f"devices: {len(devices)} ({devices[0].platform})"
         + (f", processes: {jax.process_count()}" if jax.process_count() > 1 else ""))
    kinds = "/".join(sorted(set(config.layer_types)))
    _say(f"model: {'reversible ' if config.reversible else ''}{kinds} attention, {config.n_layers} "
         f"layers, d_model {config.d_model}, {config.n_heads} heads of {config.d_head}, d_ff {config.d_ff}"
         + (f", {config.n_hashes} hash rounds, chunk {config.chunk_len}" if config.uses("lsh") else ""))
    _say(f"data: {dataset.source}; batch {options.batch_size} x {options.seq_len} tokens")

    if options.analyze_memory:
        # Compiled as the run compiles its step (a lean run must not pay the fusion emitters' memory here).
        stats = compile_train_step(config, batch_size=options.batch_size // len(devices), seq_len=options.seq_len,
                                   optimizer=options.optimizer,
                                   extra_options=step_compiler_options(lean=options.lean_compile))[1]
        _say(f"memory (compile-time, per device): {stats.summary()}")

    schedule = train.learning_rate_schedule(options.learning_rate, options.total_schedule_steps,
                                            options.warmup_steps)
    seed_key = jax.random.key(options.seed)
    init_fn, step_fn, eval_fn = _compiled_steps(config, options.optimizer, options.learning_rate,
                                                options.total_schedule_steps, options.warmup_steps,
                                                options.clip_norm, tuple(devices), options.skip_nonfinite,
                                                options.lean_compile)

    checkpointer = Checkpointer(workdir)
    start_step = checkpointer.latest_step() or 0
    if not start_step:
        refuse_to_overwrite_a_run(workdir, options.checkpoint_every)
    if start_step:  # restored into the abstract state: checked against the checkpoint before anything compiles
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                jax.eval_shape(init_fn, seed_key))
        state = checkpointer.restore(start_step, abstract)
        _say(f"resumed from {checkpointer.directory / str(start_step)}")
    else:
        state = init_fn(seed_key)
        if options.init_from:
            from reformer_jax.convert import load_converted_params
            state = state.replace(params=load_converted_params(options.init_from, state.params))
            _say(f"parameters from {options.init_from}")
        if _is_main_process():
            write_json_atomic(workdir / "run_settings.json", settings)
    if start_step >= options.steps:
        _say(f"the checkpoint is at step {start_step} >= --steps={options.steps}: nothing to train.")

    log = MetricsLog(workdir / "metrics.jsonl", start_step) if _is_main_process() else None
    progress = Progress(options.steps, start_step)
    tokens_per_step = options.batch_size * options.seq_len
    val: Dict[str, float] = {}
    last_metrics: Dict[str, float] = {}
    skipped = []
    started = time.perf_counter()
    done = start_step
    stopped_by_time_limit = False
    try:
        for step in range(start_step, options.steps):
            batch = global_batch(dataset.batch("train", options.seed, step, options.batch_size, options.seq_len),
                                  data_sharding)
            step_started = time.perf_counter()
            state, metrics = step_fn(state, batch, seed_key)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - step_started
            done = step + 1
            out_of_time = (options.time_limit_minutes is not None and done < options.steps
                           and time.perf_counter() - started >= 60 * options.time_limit_minutes)
            final_step = done == options.steps or out_of_time
            if not metrics.pop("finite"):
                if not options.skip_nonfinite:
                    raise _diverged(metrics, done, checkpointer)
                skipped.append(done)
                progress.message(f"step {done}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}: "
                                 "batch skipped, parameters unchanged (--skip_nonfinite)")
            row = {"step": done, **metrics, "bpc": metrics["loss"] / math.log(2),
                   "learning_rate": float(schedule(step)), "step_seconds": seconds,
                   "tokens_per_sec": tokens_per_step / seconds, "elapsed": time.perf_counter() - started}
            if step == start_step:
                _say(_runtime_memory_line() + f" (first step incl. compilation {seconds:.1f} s)")
            if options.eval_every and (done % options.eval_every == 0 or final_step):
                val = evaluate(eval_fn, state.params, dataset, options, data_sharding)
                row.update(val)
                progress.message(f"step {done}: validation loss {val['val_loss']:.4f}, bpc {val['val_bpc']:.3f}, "
                                 f"accuracy {val['val_accuracy']:.3f}")
            if done in skipped:
                row["skipped"] = True
            if log:
                log.write(row)
            last_metrics = row
            progress.update(done, metrics["loss"], row["tokens_per_sec"])
            if (options.checkpoint_every and done % options.checkpoint_every == 0) or final_step:
                checkpointer.save(done, state)
            if out_of_time:
                stopped_by_time_limit = True
                progress.message(f"step {done}: the time limit of {options.time_limit_minutes:g} minutes is reached; "
                                 "stopping here (checkpointed: rerun the same command to continue).")
                break
    except OSError as error:  # metrics.jsonl (checkpoint failures raise CheckpointError)
        checkpointer.wait_until_finished()
        last = checkpointer.latest_step()
        raise WorkdirError(f"writing to --workdir={workdir} failed at step {done} ({error}); "
                           + (f"the last complete checkpoint (step {last}) is intact" if last else
                              "no checkpoint exists yet")
                           + ". Free disk space or fix permissions, then rerun the same command to resume.") from error
    finally:
        checkpointer.close()
        if log:
            log.close()

    summary = {"steps": int(state.step), "train_loss": last_metrics.get("loss"), **val, "skipped_steps": skipped,
               "stopped_by_time_limit": stopped_by_time_limit,
               "wall_seconds": time.perf_counter() - started, "checkpoint": str(checkpointer.directory),
               "devices": len(devices), "backend": devices[0].platform, "jax_version": jax.__version__}
    if options.sample_len and _is_main_process():
        summary["sample"] = _sample_text(config, state.params, dataset, options)
    if _is_main_process():
        write_json_atomic(workdir / "summary.json", summary)
        _print_summary(summary)
    summary["state"] = state
    return summary


def _diverged(metrics: Dict[str, float], step: int, checkpointer: Checkpointer) -> TrainingDiverged:
    checkpointer.wait_until_finished()  # a save in flight completes, so "intact" below is true
    last = checkpointer.latest_step()
    what = (f"the loss is {metrics['loss']}" if not math.isfinite(metrics["loss"]) else
            f"the gradient norm is {metrics['grad_norm']} (loss {metrics['loss']:.6g})")
    return TrainingDiverged(
        f"{what} at step {step}; stopping. The last checkpoint "
        + (f"(step {last}) in {checkpointer.directory} is intact." if last else "does not exist yet.")
        + " Rerun the same command with --skip_nonfinite to resume from it and skip such batches, or start a "
        "new --workdir with a lower --learning_rate or --clip_norm.")


def _sample_text(config: ModelConfig, params, dataset, options: TrainOptions) -> str:
    """Generated text after a prompt from the validation split (or a copy-task example), by cached decoding."""
    from reformer_jax.decoding import generate

    rng = jax.random.key(options.seed + 20_000)
    if isinstance(dataset, data_lib.CopyTask):
        length = min(options.seq_len, config.max_len)
        half = length // 2
        example = dataset.batch("validation", options.seed, 0, 1, length)["inputs"][0]
        copied = generate(config, params, [example[:half + 1]], max_new_tokens=half - 1, greedy=True, rng=rng)[0]
        right = float(np.mean(copied == example[half + 1:]))
        return f"copy task: {right:.1%} of {half - 1} symbols copied right by greedy decoding"
    prompt = dataset.batch("validation", options.seed, 0, 1, 64)["inputs"][0][:config.max_len - 1]
    length = min(options.sample_len, config.max_len - prompt.size)
    tokens = generate(config, params, [prompt], max_new_tokens=length, temperature=0.8, rng=rng)[0]
    return f"[prompt]\n{data_lib.decode(prompt)}\n[generated, {length} tokens]\n{data_lib.decode(tokens)}"


def _print_summary(summary: Dict[str, Any]) -> None:
    lines = [f"done: {summary['steps']} steps in {format_duration(summary['wall_seconds'])}"]
    if summary.get("train_loss") is not None:
        lines.append(f"  train loss {summary['train_loss']:.4f} ({summary['train_loss'] / math.log(2):.3f} bpc)")
    if "val_loss" in summary:
        lines.append(f"  validation loss {summary['val_loss']:.4f} ({summary['val_bpc']:.3f} bpc), accuracy "
                     f"{summary['val_accuracy']:.3f}")
    lines.append(f"  checkpoints: {summary['checkpoint']}")
    if "sample" in summary:
        lines.append("  sample:\n" + "\n".join("    | " + line for line in summary["sample"].splitlines()))
    print("\n".join(lines), flush=True)
