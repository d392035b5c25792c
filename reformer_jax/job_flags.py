"""The training job's command line (main.py): its flags, their checks, and the configs they make.

Every ModelConfig field is a flag (generated from the dataclass, `model_flags`); the run's flags are defined here.
Each check raises absl's UsageError with one line naming the flag, the value and what would work, before anything
is compiled. The library behind them: `training.devices` (the default devices and mesh),
`training.step_builder.compile_for_topology` (--compile_only), `training.loop.train_and_evaluate`.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Tuple

from absl import app, flags

from reformer_jax import errors
from reformer_jax.errors import SettingError
from reformer_jax.model import sizes
from reformer_jax.model.config import PRESETS, ModelConfig
from reformer_jax.model_flags import define_model_flags, parse_value
from reformer_jax.training import data as data_lib
from reformer_jax.training import devices
from reformer_jax.training import tasks
from reformer_jax.training.step import OPTIMIZERS

FLAGS = flags.FLAGS

# --- the run ---------------------------------------------------------------------------------------------------
flags.DEFINE_enum("model", "reformer", list(PRESETS), "Model variant: a ModelConfig preset. transformer = full "
                  "attention + ordinary residual; lsh = LSH attention + ordinary residual; reversible = full "
                  "attention + reversible layers; reformer = LSH + reversible + chunked feed-forward.")
flags.DEFINE_enum("sizes", None, list(sizes.NAMED), "Named sizes (reformer_jax/model/sizes.py) for --d_model, "
                  "--n_heads, --d_ff, --n_layers, --seq_len and --batch_size (each flag given still wins); unset: cpu.")
flags.DEFINE_integer("seq_len", sizes.CPU.seq_len, "Tokens per training sequence (a multiple of --chunk_len for LSH "
                     "models).")
flags.DEFINE_integer("batch_size", sizes.CPU.batch_size, "Sequences per step, over all devices (a multiple of the "
                     "mesh's data x fsdp).")
flags.DEFINE_integer("steps", 300, "Train until this many optimizer steps are done (a rerun with a larger value "
                     "continues the same run).")
flags.DEFINE_integer("schedule_steps", None, "Length of the warm-up + cosine learning-rate schedule (default: "
                     "--steps, or the saved run's value when resuming).")
flags.DEFINE_integer("warmup_steps", None, "Linear warm-up steps (default: 10% of the schedule, at most 1000).")
flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate.")
flags.DEFINE_enum("optimizer", "adafactor", list(OPTIMIZERS), "adafactor (the seed's choice) or adamw.")
flags.DEFINE_float("clip_norm", 1.0, "Clip gradients to this global norm.")
flags.DEFINE_enum("task", "lm", list(tasks.TASKS), "lm (next-token language model), mlm (masked bytes, a "
                  "bidirectional encoder) or classify (sequence classification with a bidirectional encoder, on "
                  "--dataset=listops). Sets the model fields the task needs (model flags given still win).")
flags.DEFINE_float("mask_rate", data_lib.MLM_RATE, "--task=mlm: the share of positions masked (BERT's 80/10/10).")
flags.DEFINE_enum("dataset", None, list(data_lib.DATASETS), "tiny_shakespeare (byte-level), synthetic (the paper's "
                  "copy task 0 w 0 w, runs offline), text (any file at --data_path) or listops (ListOps, generated: "
                  "--task=classify, lengths up to min(--seq_len, 2000)). Default: listops for --task=classify, else "
                  "tiny_shakespeare.")
flags.DEFINE_string("data_path", None, "Path of the text file (tiny_shakespeare: default the copy packaged with "
                    "reformer_jax, checked by sha256).")
flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics.jsonl and summary.json.")
flags.DEFINE_integer("eval_every", 100, "Evaluate on the validation split every this many steps and at the end "
                     "(0: never).")
flags.DEFINE_integer("eval_batches", 4, "Validation batches per evaluation.")
flags.DEFINE_integer("checkpoint_every", 100, "Save a checkpoint every this many steps (and always at the end).")
flags.DEFINE_integer("seed", 0, "Seed of the parameters, data order, hashing and dropout.")
flags.DEFINE_integer("sample_len", 200, "Characters of text generated at the end (0: none).")
flags.DEFINE_string("compilation_cache_dir", None, "Keep compiled steps in this directory (JAX's persistent "
                    "compilation cache): a rerun with the same model and shapes loads them instead of compiling.")
flags.DEFINE_string("init_from", None, "Fine-tune: start from the latest checkpoint's parameters of a main.py "
                    "--workdir (its model; model flags given override fields that keep the shapes, such as "
                    "--dropout) with a new optimizer state and schedule, or from a converted checkpoint (python -m "
                    "reformer_jax.convert --out=DIR; no model flags), whose tokenizer the run then uses.")
flags.DEFINE_bool("analyze_memory", True, "Print the compiled step's memory analysis before training.")
flags.DEFINE_float("time_limit_minutes", None, "Stop after this much wall time (compilation included), evaluated and "
                   "checkpointed, even before --steps; rerun the same command to continue.")
flags.DEFINE_bool("lean_compile", False, "CPU: compile the steps without XLA's MLIR fusion emitters: a few hundred "
                  "MB less peak RSS while compiling, slower steps (reformer_jax/xla/compiler_options.py).")
flags.DEFINE_bool("skip_nonfinite", False, "Skip a batch whose loss or gradients are NaN/Inf (parameters unchanged, "
                  "logged) instead of stopping the run.")
# --- devices ---------------------------------------------------------------------------------------------------
flags.DEFINE_string("mesh", None, "Device mesh as axis:size pairs over data, fsdp and tensor, e.g. "
                    "data:-1,fsdp:4,tensor:2 (-1: the devices the other axes leave). fsdp shards the parameters, "
                    "gradients and optimizer state; tensor splits the attention heads and the feed-forward width; the "
                    "batch goes over data x fsdp. Default: on a CPU with 2 or more cores, tensor:2 over two host "
                    "devices (a layer's heads on separate cores: the fastest CPU setting measured, docs/speed.md); "
                    "on GPUs and TPUs, every device on data (data parallel).")
flags.DEFINE_integer("host_devices", None, "CPU: split the host into this many devices (XLA's "
                     "--xla_force_host_platform_device_count, set before jax starts), e.g. --host_devices=8 "
                     "--mesh=data:2,fsdp:2,tensor:2. Default: 2 with the default --mesh (see there), else 1.")
flags.DEFINE_string("topology", None, "With --compile_only: a TPU slice to compile the job for on this machine, e.g. "
                    "v5e:16x16 (needs libtpu: pip install \"libtpu==0.0.42.*\"); --mesh then lays out its chips.")
flags.DEFINE_bool("compile_only", False, "Compile the training step for --topology, print its per-chip memory "
                  "analysis against the chip's HBM and exit: 0 if it fits, 1 if not. Trains nothing.")
# --- several hosts ---------------------------------------------------------------------------------------------
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs "
                    "(jax.distributed.initialize). Omit on one host; on Cloud TPU and SLURM it is auto-detected "
                    "with --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection (Cloud TPU pods, "
                  "SLURM) even without --coordinator_address.")

# --- every ModelConfig field (None: the preset's value), generated from the dataclass -----------------------------
MODEL_FLAGS = define_model_flags(
    ModelConfig, defaults={name: getattr(sizes.CPU, name) for name in ("d_model", "n_heads", "d_ff", "n_layers")},
    extra_help={"max_len": "Unset: --seq_len.", "vocab_size": "The copy task draws its symbols below it.",
                "stream_grid_bits": "See benchmarks/results/reversible_drift.md."})
SIZE_FLAGS = ("d_model", "n_heads", "d_ff", "n_layers", "seq_len", "batch_size")


def _config_from_init_from() -> ModelConfig:
    """The model of --init_from: a main.py workdir's (model flags given override its fields; parameter shapes are
    checked by `check_init_from_shapes`) or a converted checkpoint's (no model flags), checked against --seq_len.
    Read from the files alone: jax's backends stay unstarted, so the devices can still be chosen."""
    from reformer_jax.training import saved_run

    given = [name for name in MODEL_FLAGS if FLAGS[name].present]
    try:
        source = saved_run.open_model(FLAGS.init_from, flag="--init_from")
        if source.is_run:
            if FLAGS["model"].present:
                raise app.UsageError(f"--init_from={FLAGS.init_from} fixes the model; drop --model (model flags such "
                                     "as --dropout or --n_hashes may still change what keeps the shapes).")
            config = saved_run.model_config(source.settings["model"], **_model_overrides(given))
        else:
            if given or FLAGS["model"].present:
                names = ", ".join(f"--{name}" for name in given) or "--model"
                raise app.UsageError(f"--init_from={FLAGS.init_from} (a converted checkpoint) fixes the model; drop "
                                     f"{names}.")
            config = source.config
        config.check_seq_len(FLAGS.seq_len)
    except saved_run.SavedRunError as error:
        raise app.UsageError(str(error) if str(error).startswith("--init_from") else
                             f"--init_from={FLAGS.init_from}: {error}")
    except ValueError as error:
        raise app.UsageError(f"--init_from={FLAGS.init_from}: {_blame_given_flag(error)}")
    return config


def check_init_from_shapes(config: ModelConfig) -> None:
    """UsageError if the --init_from run's parameters differ in shape from `config`'s (model flags that change
    shapes). Computed abstractly (nothing compiles), but it traces the model, which starts jax's backends: called
    once the devices are set (`apply_device_flags`)."""
    if not FLAGS.init_from:
        return
    from reformer_jax.training import saved_run

    try:
        source = saved_run.open_model(FLAGS.init_from, flag="--init_from")
        if source.is_run:
            saved_run.check_same_shapes(source, config)
    except saved_run.SavedRunError as error:
        raise app.UsageError(str(error)) from None


def _model_overrides(names) -> Dict[str, Any]:
    """The ModelConfig fields the model flags `names` set (None values: the preset's)."""
    try:
        return {name: parse_value(ModelConfig, name, FLAGS[name].value) for name in names
                if FLAGS[name].value is not None}
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def apply_named_sizes() -> None:
    """--sizes=NAME: its values for the size flags not given on the command line."""
    if FLAGS.sizes:
        named = sizes.NAMED[FLAGS.sizes]
        for name in SIZE_FLAGS:
            if not FLAGS[name].present:
                FLAGS[name].value = getattr(named, name)


def model_config_from_flags() -> ModelConfig:
    """The ModelConfig the flags describe; a bad value raises UsageError naming the flag."""
    if FLAGS.init_from:
        return _config_from_init_from()
    overrides = {**tasks.model_fields(FLAGS.task), **_model_overrides(MODEL_FLAGS)}
    overrides.setdefault("max_len", FLAGS.seq_len)
    try:
        config = ModelConfig.preset(FLAGS.model, **overrides)
        config.check_seq_len(FLAGS.seq_len)
    except ValueError as error:
        raise app.UsageError(_blame_given_flag(error))
    return config


def _given(name: str) -> bool:
    return FLAGS[name].present > 0


def _blame_given_flag(error: ValueError) -> str:
    """A setting's error (`SettingError`) in the flags the user gave: a derived field is blamed on its source."""
    if isinstance(error, SettingError) and error.field == "d_head" and error.value is None:  # d_head derives from d_model // n_heads
        blamed = "d_model" if _given("d_model") or not _given("n_heads") else "n_heads"
        divisors = [h for h in range(1, min(FLAGS.d_model, 64) + 1) if FLAGS.d_model % h == 0][-4:]
        return (f"--{blamed}={FLAGS[blamed].value} is invalid: --d_model={FLAGS.d_model} is not divisible by "
                f"--n_heads={FLAGS.n_heads}; use --n_heads dividing it (e.g. {', '.join(map(str, divisors))}) or "
                "give --d_head.")
    if isinstance(error, SettingError) and error.field == "tie_embeddings" and not _given("tie_embeddings"):
        return ("--output_head=concat is invalid with tied embeddings (the default): the 'concat' head has width "
                "2 * d_model and cannot be tied to the embedding; add --notie_embeddings or use --output_head=mean.")
    # max_len is --seq_len's value unless given: name the flag the user gave
    return errors.in_flags(error, {} if FLAGS.max_len is not None else {"max_len": "seq_len"})


def validate_run_flags() -> None:
    """Range checks of the run's flags (the model's are ModelConfig's), before anything is compiled."""
    apply_named_sizes()
    run_options()  # the run's own values, checked by TrainOptions
    vocab, dataset = FLAGS.vocab_size, dataset_flag()
    if vocab is not None and dataset == "synthetic" and vocab < 2:
        raise app.UsageError(f"--vocab_size={vocab} is invalid for --dataset=synthetic: the copy task needs at least "
                             "one symbol besides 0 (--vocab_size >= 2).")
    if vocab is not None and dataset in ("tiny_shakespeare", "text") and vocab < data_lib.BYTE_VOCAB_SIZE:
        raise app.UsageError(f"--vocab_size={vocab} is too small for byte-level --dataset={dataset}; use "
                             f"{data_lib.BYTE_VOCAB_SIZE} (or leave it unset).")
    if FLAGS.compilation_cache_dir is not None:
        from reformer_jax.xla.compilation_cache import check_cache_dir

        try:
            check_cache_dir(FLAGS.compilation_cache_dir)
        except ValueError as error:
            raise app.UsageError(str(error)) from None
    if FLAGS.task != "lm" and FLAGS.causal:
        raise app.UsageError(f"--causal is invalid with --task={FLAGS.task}: the task trains a bidirectional encoder; "
                             "leave --causal out, or use --task=lm for a causal language model.")
    if dataset == "text" and not FLAGS.data_path:
        raise app.UsageError("--dataset=text needs --data_path=FILE.")
    if (FLAGS.num_processes is None) != (FLAGS.process_id is None) or (
            FLAGS.num_processes is not None and not FLAGS.coordinator_address):
        raise app.UsageError("multi-host runs need --coordinator_address, --num_processes and --process_id together "
                             "(or --distributed for auto-detection on Cloud TPU and SLURM).")
    if FLAGS.compile_only and not FLAGS.topology:
        raise app.UsageError("--compile_only needs --topology=SLICE (e.g. --topology=v5e:16x16): it compiles the job "
                             "for a TPU slice without running it.")
    if FLAGS.topology and not FLAGS.compile_only:
        raise app.UsageError(f"--topology={FLAGS.topology} is for --compile_only (this machine cannot train on the "
                             "slice); add --compile_only.")
    if FLAGS.host_devices is not None and FLAGS.host_devices < 1:
        raise app.UsageError(f"--host_devices={FLAGS.host_devices} is invalid: expected a positive integer.")
    if FLAGS.num_processes is not None and not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise app.UsageError(f"--process_id={FLAGS.process_id} is invalid: expected 0 <= process_id < "
                             f"--num_processes={FLAGS.num_processes}.")


def apply_device_flags(config: ModelConfig) -> bool:
    """--host_devices, or the CPU default's two host devices where it applies (`training.devices`); whether the
    host was split for the default. A --host_devices that cannot be applied (jax has already started its
    backends) is refused; the default then stays on one device."""
    multi_process = FLAGS.num_processes is not None or FLAGS.distributed
    if devices.cpu_default_applies(config, mesh_given=FLAGS.mesh is not None,
                                   host_devices_given=FLAGS.host_devices is not None, multi_process=multi_process):
        return devices.split_host(devices.CPU_DEFAULT_DEVICES)
    if FLAGS.host_devices is not None and not devices.split_host(FLAGS.host_devices):
        raise app.UsageError(f"--host_devices={FLAGS.host_devices} cannot be applied once jax has started its "
                             "backends; drop it to train on one device.")
    return False


def resolve_mesh_flag(config: ModelConfig, host_was_split: bool) -> Tuple[str, str]:
    """(--mesh as given, else the default mesh; what chose the devices and the mesh, for the header), checked
    against the devices, --batch_size and the model, before anything compiles."""
    import jax

    from reformer_jax.sharding import MeshError, check_mesh_fits, parse_mesh

    mesh = FLAGS.mesh or devices.default_mesh(host_was_split)
    cpu_default = FLAGS.mesh is None and mesh == devices.CPU_DEFAULT_MESH
    if FLAGS.host_devices is not None:
        chosen = f"--host_devices={FLAGS.host_devices}"
    elif cpu_default:
        chosen = "the CPU default (two host devices)"
    else:
        chosen = devices.users_device_count() or ("jax's devices" if jax.process_count() == 1 else
                                                   f"{jax.process_count()} processes")
    chosen = f"devices from {chosen}; mesh from " + ("--mesh" if FLAGS.mesh else
                                                    "the CPU default" if cpu_default else "the default")
    try:
        shape = parse_mesh(mesh, jax.device_count())
        check_mesh_fits(shape, batch_size=FLAGS.batch_size, n_heads=config.n_heads, d_ff=config.d_ff, text=mesh)
    except MeshError as error:
        raise app.UsageError(str(error)) from None
    return mesh, chosen


def compile_only(config: ModelConfig) -> int:
    """--compile_only: the job's training step compiled for --topology's chips over --mesh; 0 if it fits."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # the TPU compiler runs through the topology, not a TPU backend
    from reformer_jax.xla import tpu
    from reformer_jax.sharding import MeshError, check_mesh_fits, parse_mesh
    from reformer_jax.training.step_builder import DoesNotFit, compile_for_topology

    try:
        devices = tpu.topology_devices(FLAGS.topology, flag="--topology")
        mesh = FLAGS.mesh or "data:-1"
        shape = parse_mesh(mesh, len(devices))
        check_mesh_fits(shape, batch_size=FLAGS.batch_size, n_heads=config.n_heads, d_ff=config.d_ff, text=mesh)
    except (tpu.TopologyError, MeshError) as error:
        raise app.UsageError(str(error)) from None
    print(f"compiling for {FLAGS.topology}: {len(devices)} x {devices[0].device_kind}, mesh {shape}, batch "
          f"{FLAGS.batch_size} x {FLAGS.seq_len} tokens", flush=True)
    try:
        stats = compile_for_topology(config, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                                     optimizer=FLAGS.optimizer, topology=FLAGS.topology, mesh=shape)
    except DoesNotFit as refusal:
        print(f"error: the TPU compiler refused the step for {FLAGS.topology} ({refusal}); it does not fit: use a "
              "larger slice, more fsdp, a shorter --seq_len or a smaller --batch_size.", file=sys.stderr)
        return 1
    print(f"memory (compile-time, per device): {stats.summary()}", flush=True)
    if not stats.fits:
        print(f"error: the step needs {stats.peak_bytes / 2**20:,.1f} MiB per device, more than the "
              f"{stats.hbm_bytes / 2**20:,.0f} MiB of HBM the TPU compiler lets a program use on each chip of "
              f"{FLAGS.topology}: use a larger slice, more fsdp, a shorter --seq_len or a smaller --batch_size.",
              file=sys.stderr)
        return 1
    print(f"fits: {stats.peak_bytes / 2**20:,.1f} MiB of the {stats.hbm_bytes / 2**20:,.0f} MiB of HBM a program "
          "may use per chip")
    return 0


def initialize_distributed() -> None:
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def dataset_flag() -> str:
    """--dataset, or the task's default: listops for --task=classify, tiny_shakespeare otherwise."""
    return FLAGS.dataset or ("listops" if FLAGS.task == "classify" else "tiny_shakespeare")


def run_options(**resolved):
    """TrainOptions from the flags (`resolved`: the values main fills in once jax has started); a value
    TrainOptions refuses is a one-line UsageError naming its flag."""
    from reformer_jax.training.loop import TrainOptions

    names = ("workdir", "steps", "schedule_steps", "warmup_steps", "learning_rate", "optimizer", "clip_norm",
             "batch_size", "seq_len", "dataset", "data_path", "seed", "eval_every", "eval_batches", "checkpoint_every",
             "sample_len", "analyze_memory", "skip_nonfinite", "init_from", "time_limit_minutes", "lean_compile",
             "task", "mask_rate")
    try:
        return TrainOptions(**{**{name: FLAGS[name].value for name in names}, "dataset": dataset_flag(), **resolved})
    except SettingError as error:
        raise app.UsageError(error.as_flags()) from None


def train_options(config: ModelConfig, host_was_split: bool):
    """The run's TrainOptions: the flags, the mesh and devices resolved, and a resumed run's saved schedule
    (unless --schedule_steps)."""
    from reformer_jax.training.checkpoint import saved_run_settings

    mesh, chosen = resolve_mesh_flag(config, host_was_split)  # a bad mesh: UsageError, one line from cli.run
    schedule_steps = FLAGS.schedule_steps
    saved = saved_run_settings(FLAGS.workdir)
    if schedule_steps is None and saved:  # resuming with a larger --steps keeps the run's schedule
        schedule_steps = saved.get("schedule_steps")
    return run_options(schedule_steps=schedule_steps, mesh=mesh, devices_chosen_by=chosen)
