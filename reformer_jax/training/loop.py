"""train_and_evaluate: the training loop behind main.py.

Over a device mesh (`reformer_jax.sharding`: data, fsdp, tensor; by default every device on data), checkpointed
with orbax (sharded: a checkpoint resumes on another mesh), resumable exactly: batches and step keys are pure
functions of (seed, step), so a resumed run repeats the uninterrupted one. Logging and metrics come from process 0
only.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from reformer_jax import sharding as sharding_lib
from reformer_jax import tokenizers
from reformer_jax.errors import SettingError, setting
from reformer_jax.training import data as data_lib
from reformer_jax.training import evaluation
from reformer_jax.training import saved_run
from reformer_jax.training import step as train
from reformer_jax.training import step_builder
from reformer_jax.training import tasks
from reformer_jax.training.checkpoint import (RUN_SETTINGS_FILE, Checkpointer, WorkdirError, check_run_settings,
                                     ensure_writable_workdir, refuse_to_overwrite_a_run, write_json_atomic)
from reformer_jax.model.config import ModelConfig
from reformer_jax.training.run_log import MetricsLog, Progress, TensorBoardLog, format_duration, format_sample
from reformer_jax.training.run_record import read_record, update_record
from reformer_jax.training.runtime_memory import peak_rss_bytes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Everything about a run except the model; checked when made (`SettingError`)."""

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
    task: str = "lm"  # lm, mlm or classify (`reformer_jax.training.tasks`); the model must fit it
    mask_rate: float = data_lib.MLM_RATE  # the share of positions an mlm batch masks
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    sample_len: int = 200
    analyze_memory: bool = True
    skip_nonfinite: bool = False  # skip a batch whose loss or gradients are NaN/Inf instead of stopping
    init_from: Optional[str] = None  # a converted checkpoint (reformer_jax.model.hf_convert) to start from
    # Stop after this much wall time in this call (compilation included), evaluated and checkpointed; a rerun
    # resumes. Not a run setting: a resumed run may change it.
    time_limit_minutes: Optional[float] = None
    # Compile the steps with `compiler_options.step_compiler_options(lean=...)`: on CPU, without XLA's MLIR fusion
    # emitters (less peak RSS, slower steps: see benchmarks/results/speed_peers.md). Not a run setting either.
    lean_compile: bool = False
    # The device mesh, e.g. "data:-1,fsdp:4,tensor:1" (`reformer_jax.sharding`); None: every device on data. Not a
    # run setting: a checkpoint resumes on another mesh.
    mesh: Optional[str] = None
    # What chose the devices and the mesh (a flag, a default, the user's XLA_FLAGS), for the header line.
    devices_chosen_by: Optional[str] = None
    # Train on the first `device_count` of jax.devices() (None: all of them), e.g. one device of a host split into
    # eight. Not a run setting either: a checkpoint resumes on any devices.
    device_count: Optional[int] = None

    def __post_init__(self):
        """Every value checked when the options are made, before anything compiles: a SettingError (one line)."""
        def fail(field, text, shown=None):
            raise SettingError("TrainOptions", field, getattr(self, field), text, shown)

        for name in ("seq_len", "batch_size", "steps", "eval_batches"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "is invalid: expected a positive integer.")
        for name in ("eval_every", "checkpoint_every", "sample_len", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "is invalid: expected an integer >= 0.")
        for name in ("schedule_steps", "warmup_steps", "device_count"):
            if getattr(self, name) is not None and (not _is_int(getattr(self, name)) or getattr(self, name) < 1):
                fail(name, "is invalid: expected a positive integer.")
        for name in ("learning_rate", "clip_norm", "time_limit_minutes"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                fail(name, "is invalid: expected a positive number (finite).")
        if self.optimizer not in train.OPTIMIZERS:
            fail("optimizer", f"is invalid: expected one of {', '.join(train.OPTIMIZERS)}.")
        if self.dataset not in data_lib.DATASETS:
            fail("dataset", f"is invalid: expected one of {', '.join(data_lib.DATASETS)}.")
        tasks.check_options(self.task, self.dataset, self.mask_rate)
        if self.dataset == "synthetic" and (self.seq_len % 2 or self.seq_len < 4):
            fail("seq_len", "is invalid for TrainOptions.dataset=synthetic: the copy task needs an even length >= 4.")

    def devices(self) -> list:
        """The devices the run uses."""
        every = jax.devices()
        if self.device_count is not None and not 1 <= self.device_count <= len(every):
            raise ValueError(f"device_count={self.device_count} is invalid: there are {len(every)} devices.")
        return every[:self.device_count] if self.device_count else every

    @property
    def total_schedule_steps(self) -> int:
        return self.schedule_steps or self.steps

    def run_settings(self, config: ModelConfig, tokenizer: Optional[tokenizers.Tokenizer] = None,
                     data: Optional[data_lib.DataSource] = None) -> Dict[str, Any]:
        """What must not change when a run is resumed, and what reopens the run: its tokenizer and its data."""
        return {"model": config.to_dict(), "optimizer": self.optimizer, "learning_rate": self.learning_rate,
                "schedule_steps": self.total_schedule_steps, "warmup_steps": self.warmup_steps,
                "clip_norm": self.clip_norm, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "dataset": self.dataset, "seed": self.seed, "init_from": self.init_from,
                "tokenizer": tokenizer.to_dict() if tokenizer else None, "data": data.to_dict() if data else None}

    def tokenizer(self) -> Optional[tokenizers.Tokenizer]:
        """The run's tokenizer: --init_from's model's, else bytes + 3 for text (none for the copy task)."""
        if self.init_from:
            return saved_run.open_model(self.init_from).tokenizer
        return None if self.dataset in ("synthetic", "listops") else tokenizers.BYTES


@functools.lru_cache(maxsize=8)
def _compiled_steps(config: ModelConfig, optimizer: str, learning_rate: float, schedule_steps: int,
                    warmup_steps: Optional[int], clip_norm: float, devices: tuple, skip_nonfinite: bool,
                    lean_compile: bool = False,
                    mesh_shape: Optional[sharding_lib.MeshShape] = None) -> step_builder.TrainStep:
    """The run's step per (model, optimizer, devices, mesh): a second run in the same process (a resume, a sweep)
    reuses the compiled executables instead of compiling again."""
    tx = train.make_optimizer(optimizer, learning_rate, schedule_steps=schedule_steps, warmup_steps=warmup_steps,
                              clip_norm=clip_norm)
    mesh = sharding_lib.make_mesh(mesh_shape or sharding_lib.MeshShape(data=len(devices)), list(devices))
    return step_builder.build_train_step(config, optimizer=tx, mesh=mesh, guarded=True, skip_nonfinite=skip_nonfinite,
                                         lean_compile=lean_compile)


def _mesh_line(mesh) -> str:
    shape = sharding_lib.mesh_shape_of(mesh)
    return f"mesh {shape} ({shape.device_count} devices; batch over data x fsdp = {shape.batch_ways})"


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _say(text: str) -> None:
    if _is_main_process():
        print(text, flush=True)


def _runtime_memory_line() -> str:
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return f"runtime peak on {jax.local_devices()[0].device_kind}: {stats['peak_bytes_in_use'] / 2**20:,.1f} MiB"
    return f"runtime: process peak RSS {peak_rss_bytes() / 2**20:,.1f} MiB (CPU: no device memory statistics)"


def evaluate(eval_fn, params, dataset, options: TrainOptions, sharding: NamedSharding,
             split: str = "validation") -> Dict[str, float]:
    """{"val_loss", "val_accuracy", "val_bpc", "val_tokens"} over the same `eval_batches` batches of `split` every
    time, batch i hashed with key(seed + 10_000 + i) (`validation_key`)."""
    batches = (dataset.batch(split, options.seed, i, options.batch_size, options.seq_len)
               for i in range(options.eval_batches))
    scores = evaluation.evaluate_batches(eval_fn, params, batches, validation_key(options.seed, sharding.mesh),
                                         sharding)
    return {f"val_{name}": value for name, value in scores.items()}


def validation_key(seed: int, mesh):
    """Batch i of a validation is hashed with key(seed + 10_000 + i), the same on every process: i -> key."""
    return lambda i: sharding_lib.global_key(seed + 10_000 + i, mesh)


def _describe(config: ModelConfig, dataset, options: TrainOptions, devices, mesh) -> None:
    _say(f"devices: {len(devices)} ({devices[0].platform}), {_mesh_line(mesh)}"
         + (f", processes: {jax.process_count()}" if jax.process_count() > 1 else "")
         + (f" [{options.devices_chosen_by}]" if options.devices_chosen_by else ""))
    kinds = "/".join(sorted(set(config.layer_types)))
    _say(f"model: {'reversible ' if config.reversible else ''}{kinds} attention, {config.n_layers} "
         f"layers, d_model {config.d_model}, {config.n_heads} heads of {config.d_head}, d_ff {config.d_ff}"
         + (f", {config.n_hashes} hash rounds, chunk {config.chunk_len}" if config.uses("lsh") else ""))
    _say(f"data: {dataset.source}; batch {options.batch_size} x {options.seq_len} tokens")


def _initial_params(init_from: str, config: ModelConfig, params: Any) -> Tuple[Any, str]:
    """The parameters of a main.py workdir's latest checkpoint, or of a converted checkpoint, laid out as `params`
    (their shardings on the run's mesh); and where they came from."""
    source = saved_run.open_model(init_from)
    saved_run.check_same_shapes(source, config)
    restored = saved_run.restore_params(source, sharding=jax.tree.map(lambda x: x.sharding, params))
    origin = (str(source.path.absolute() / "checkpoints" / str(source.steps[-1])) if source.is_run
              else str(source.path.absolute()))
    _say(f"parameters from {origin} (a new optimizer state and schedule)")
    return restored, origin


def _start(config: ModelConfig, options: TrainOptions, dataset, workdir: Path, checkpointer: Checkpointer,
           start_step: int, steps: step_builder.TrainStep, seed_key, settings: Dict[str, Any]):
    """Describe the run, compile its step (and report that executable's memory analysis), and restore its state
    (or create it, from --init_from if given). Returns (state, the compiled step, its compile seconds, where the
    initial parameters came from or None)."""
    devices = options.devices()
    _describe(config, dataset, options, devices, steps.mesh)
    if start_step:  # restored into this mesh's layout, checked against the checkpoint before anything compiles
        state, origin = checkpointer.restore(start_step, steps.abstract_state), None
        _say(f"resumed from {checkpointer.directory / str(start_step)}")
    else:
        refuse_to_overwrite_a_run(workdir, options.checkpoint_every)
        state, origin = None, None
    compile_started = time.perf_counter()
    step_fn = steps.compile(options.batch_size, options.seq_len)
    compile_seconds = time.perf_counter() - compile_started
    if options.analyze_memory:
        # The very executable the run calls: its own accounting, per device.
        stats = steps.memory_of(step_fn, options.batch_size, options.seq_len)
        _say(f"memory (compile-time, per device): {stats.summary()}")
    if state is None:
        state = steps.init(seed_key)
        if options.init_from:
            params, origin = _initial_params(options.init_from, config, state.params)
            state = state.replace(params=params)
        if _is_main_process():
            write_json_atomic(workdir / RUN_SETTINGS_FILE, settings)
    return state, step_fn, compile_seconds, origin


VALIDATION_KEYS = ("val_loss", "val_bpc", "val_accuracy", "val_step")


def train_and_evaluate(config: ModelConfig, options: TrainOptions, *, dataset=None) -> Dict[str, Any]:
    """Train `config` as `options` say; returns the run's record (workdir/summary.json) with "state" added.

    `dataset`: default the one `options` names, its text encoded by the run's tokenizer (`options.tokenizer()`).
    A workdir whose checkpoint already reached `options.steps` is left exactly as it is: one line says so, nothing
    is compiled or written, and the record and the restored state are returned.
    """
    invocation_started = time.perf_counter()  # the run's wall time counts compilation and evaluation too
    workdir = Path(options.workdir)
    ensure_writable_workdir(workdir)
    tokenizer = options.tokenizer()
    tasks.check_model(config, options.task)
    if dataset is None:
        dataset = data_lib.load_dataset(options.dataset, seq_len=options.seq_len, data_path=options.data_path,
                                        vocab_size=config.vocab_size, tokenizer=tokenizer or tokenizers.BYTES,
                                        mask_rate=options.mask_rate if options.task == "mlm" else None)
    settings = options.run_settings(config, tokenizer, getattr(dataset, "origin", None))
    check_run_settings(workdir, settings)
    devices = options.devices()
    mesh_shape = sharding_lib.parse_mesh(options.mesh, len(devices))
    sharding_lib.check_mesh_fits(mesh_shape, batch_size=options.batch_size, n_heads=config.n_heads,
                                 d_ff=config.d_ff, text=options.mesh)
    steps = _compiled_steps(config, options.optimizer, options.learning_rate, options.total_schedule_steps,
                            options.warmup_steps, options.clip_norm, tuple(devices), options.skip_nonfinite,
                            options.lean_compile, mesh_shape)
    eval_fn = steps.evaluate
    data_sharding = sharding_lib.batch_sharding(steps.mesh)
    seed_key = sharding_lib.global_key(options.seed, steps.mesh)
    checkpointer = Checkpointer(workdir)
    start_step = checkpointer.latest_step() or 0
    if start_step >= options.steps:
        try:  # restored, not compiled: the caller gets the run's state
            state = checkpointer.restore(start_step, steps.abstract_state)
        finally:
            checkpointer.close()
        _say(f"{setting('workdir')}={workdir} is at step {start_step} ({setting('steps')}={options.steps}): nothing "
             "to train, nothing "
             f"changed; pass a larger {setting('steps')} to continue the run.")
        return {**read_record(workdir), "state": state}
    try:
        state, step_fn, compile_seconds, origin = _start(config, options, dataset, workdir, checkpointer,
                                                          start_step, steps, seed_key, settings)
    except BaseException:  # nothing was trained: leave the checkpoints as they were
        checkpointer.close()
        raise
    schedule = train.learning_rate_schedule(options.learning_rate, options.total_schedule_steps,
                                            options.warmup_steps)

    # The record so far: this invocation adds its steps and wall time to the run's totals.
    previous = read_record(workdir) if start_step else {}
    tokens_per_step = options.batch_size * options.seq_len
    val: Dict[str, float] = {k: previous[k] for k in VALIDATION_KEYS if k in previous}
    skipped = [s for s in previous.get("skipped_steps", []) if s <= start_step]
    last_metrics: Dict[str, float] = {}
    stopped_by_time_limit = False
    started = time.perf_counter()

    def record(step: int) -> Dict[str, Any]:
        train_loss = last_metrics.get("loss", previous.get("train_loss"))
        return {**({"initial_parameters": origin} if origin else {}),
                "steps": step, "tokens": step * tokens_per_step, "tokens_per_step": tokens_per_step,
                "wall_seconds": float(previous.get("wall_seconds", 0.0)) + time.perf_counter() - invocation_started,
                "invocations": int(previous.get("invocations", 0)) + 1, "train_loss": train_loss,
                "train_bpc": None if train_loss is None else train_loss / math.log(2), **val,
                "skipped_steps": skipped, "stopped_by_time_limit": stopped_by_time_limit,
                "data": str(Path(dataset.source).absolute()) if Path(dataset.source).is_file() else dataset.source,
                "eval_batches": options.eval_batches,
                "checkpoint": str(checkpointer.directory),
                "devices": len(devices), "backend": devices[0].platform, "jax_version": jax.__version__}

    log = MetricsLog(workdir / "metrics.jsonl", start_step) if _is_main_process() else None
    board = TensorBoardLog(workdir, start_step) if _is_main_process() else None
    progress = Progress(options.steps, start_step, stream=sys.stdout if _is_main_process() else io.StringIO())
    done, saves = start_step, 0
    try:
        for step in range(start_step, options.steps):
            batch = sharding_lib.global_batch(
                dataset.batch("train", options.seed, step, options.batch_size, options.seq_len), data_sharding)
            step_started = time.perf_counter()
            state, metrics = step_fn(state, batch, seed_key)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - step_started
            done = step + 1
            out_of_time = (options.time_limit_minutes is not None and done < options.steps
                           and time.perf_counter() - started >= 60 * options.time_limit_minutes)
            final_step = done == options.steps or out_of_time
            if step == start_step:
                progress.compiled(compile_seconds + seconds, f" (compiled ahead in {compile_seconds:.1f} s)")
                progress.message(_runtime_memory_line())
            if not metrics.pop("finite"):
                if not options.skip_nonfinite:
                    raise _diverged(metrics, done, checkpointer)
                skipped.append(done)
                progress.message(f"step {done}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}: "
                                 f"batch skipped, parameters unchanged ({setting('skip_nonfinite')})")
            row = {"step": done, **metrics, "bpc": metrics["loss"] / math.log(2),
                   "learning_rate": float(schedule(step)), "step_seconds": seconds,
                   "tokens_per_sec": tokens_per_step / seconds, "elapsed": time.perf_counter() - started}
            if options.eval_every and (done % options.eval_every == 0 or final_step):
                row.update(evaluate(eval_fn, state.params, dataset, options, data_sharding))
                val = {k: row[k] for k in VALIDATION_KEYS[:-1]}
                val["val_step"] = done
                progress.message(f"step {done}: validation " + _scores(val["val_loss"], val["val_accuracy"], config))
            if done in skipped:
                row["skipped"] = True
            if step == start_step:
                row["includes_compilation"] = True  # its time is not the step's: plots leave it out
            if log:
                log.write(row)
            if board:
                board.write(row)
            last_metrics = row
            progress.update(done, metrics["loss"], row["tokens_per_sec"], bpc=config.head == "lm")
            stopped_by_time_limit = out_of_time
            if (options.checkpoint_every and done % options.checkpoint_every == 0) or final_step:
                checkpointer.save(done, state)
                saves += 1
                # Written once a checkpoint is complete (a workdir with a record is never started over: see
                # refuse_to_overwrite_a_run), so a killed invocation still counts in the totals up to its last
                # save. save() returns after finishing the previous save; the one it starts may still be in flight.
                if not final_step and _is_main_process() and (start_step or saves > 1):
                    update_record(workdir, record(done))
            if out_of_time:
                progress.message(f"step {done}: the time limit of {options.time_limit_minutes:g} minutes is reached; "
                                 "stopping here (checkpointed: rerun the same command to continue).")
                break
    except OSError as error:  # metrics.jsonl (checkpoint failures raise CheckpointError)
        checkpointer.wait_until_finished()
        last = checkpointer.latest_step()
        raise WorkdirError(f"writing to {setting('workdir')}={workdir} failed at step {done} ({error}); "
                           + (f"the last complete checkpoint (step {last}) is intact" if last else
                              "no checkpoint exists yet")
                           + ". Free disk space or fix permissions, then rerun the same command to resume.") from error
    finally:
        checkpointer.close()
        if log:
            log.close()
        if board:
            board.close()

    # An encoder predicts no next token: nothing to sample.
    sample_text = (_sample_text(config, state.params, dataset, options, tokenizer)
                   if options.sample_len and config.causal else None)
    summary = record(int(state.step))
    if sample_text is not None:
        summary["sample"] = sample_text
    if _is_main_process():
        summary = update_record(workdir, summary)
        _print_summary(summary, config, invocation_steps=(start_step, int(state.step)),
                       invocation_seconds=time.perf_counter() - invocation_started)
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
        + f" Rerun the same command with {setting('skip_nonfinite')} to resume from it and skip such batches, or "
        "start a "
        f"new {setting('workdir')} with a lower {setting('learning_rate')} or {setting('clip_norm')}.")


def _sample_text(config: ModelConfig, params, dataset, options: TrainOptions, tokenizer) -> Optional[str]:
    """A prompt from the validation split and the model's continuation by cached decoding, told apart (or a
    copy-task score); decoded on process 0 alone (None elsewhere), from the parameters gathered to each host."""
    from reformer_jax.decoding import generate

    if jax.process_count() > 1:  # every process takes part in the gather; one decodes on its own first device
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if not _is_main_process():
        return None
    params = jax.device_put(params, jax.local_devices()[0])
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
    return format_sample(tokenizer.decode(prompt), tokenizer.decode(tokens))


def _scores(loss: float, accuracy: float, config: ModelConfig) -> str:
    """A loss as a line says it: in bits per character for a language model's tokens, per example otherwise."""
    if config.head == "lm":
        return f"loss {loss:.4f} ({loss / math.log(2):.3f} bpc), accuracy {accuracy:.3f}"
    return f"loss {loss:.4f}, accuracy {accuracy:.3f}"


def _print_summary(summary: Dict[str, Any], config: ModelConfig, invocation_steps: Tuple[int, int],
                   invocation_seconds: float) -> None:
    first, last = invocation_steps
    lines = [f"done: steps {first + 1}-{last} in {format_duration(invocation_seconds)} (this invocation); the run: "
             f"{summary['steps']} "
             f"steps, {summary['tokens']:,} tokens, {format_duration(summary['wall_seconds'])} over "
             f"{summary['invocations']} invocation{'s' if summary['invocations'] > 1 else ''}"]
    if summary.get("train_loss") is not None:
        train_loss = summary["train_loss"]
        lines.append(f"  train loss {train_loss:.4f}" + (f" ({summary['train_bpc']:.3f} bpc)" if config.head == "lm"
                                                         else ""))
    if "val_loss" in summary:
        lines.append(f"  validation {_scores(summary['val_loss'], summary['val_accuracy'], config)} at step "
                     f"{summary['val_step']}")
    lines.append(f"  checkpoints: {summary['checkpoint']}")
    if "sample" in summary:
        lines.append("  sample:\n" + "\n".join("    | " + line for line in summary["sample"].splitlines()))
    print("\n".join(lines), flush=True)
