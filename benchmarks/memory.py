"""Memory benchmark driver: the seed's three experiments and the paper's Table 5, from XLA's memory analysis.

    python -m benchmarks.memory --experiment=all                    # the seed's setup, writes benchmarks/results/
    python -m benchmarks.memory --experiment=hashes --hash_sweep=2,4,8
    python -m benchmarks.memory --experiment=variants --dtype=bfloat16 --out_dir=/tmp/bf16

Experiments (each writes NAME.json, NAME.csv, NAME.md and NAME.png in --out_dir):
  variants  the four presets at the seed's setup (experiment 1)
  hashes    the Reformer with n_hashes in --hash_sweep (experiment 2)
  layers    the Reformer and the Transformer with n_layers in --layer_sweep (experiment 3)
  seqlen    the presets at --lengths; growth exponent of activation memory against length beside Table 5's
  timeline  live bytes across one step's schedule, rebuilt from XLA's buffer dumps, and the peak by named scope
  runtime   a few real steps per variant, each in its own process: device peak (GPU/TPU) or process RSS (CPU)
  floor     the memory-floor targets, measured, with pass/short (judged by benchmarks.targets)
  all       all of the above
  tpu       the step compiled for TPU chips by libtpu on this machine (benchmarks/tpu_memory.py; not in all)

Numbers are compile-time figures of the real training step (`reformer_jax.training.step.jit_train_step`, donated state,
Adafactor unless --optimizer) for abstract inputs: peak = argument + output - alias + temp, in MiB (2^20 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import app, flags

from benchmarks import cli, output, seed, targets, tpu_memory
from benchmarks.cli import DEFAULT_OUT_DIR, PRESETS, FlagError, log
from benchmarks.output import MIB, Row
from reformer_jax.model.sizes import SEED

EXPERIMENTS = ("variants", "hashes", "layers", "seqlen", "timeline", "floor", "runtime")
EXPERIMENT_CHOICES = EXPERIMENTS + ("tpu", "all")  # "tpu" compiles for TPU slices (needs libtpu), so "all" leaves it out
OPTIMIZER_CHOICES = ("adafactor", "adamw", "none")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
FLOOR_PEAK_LIMIT_BYTES = 16 * 2**30


# ----------------------------------------------------------------------------------------------------------------
# Settings (from flags)


@dataclasses.dataclass(frozen=True)
class Settings:
    experiment: str = "all"
    out_dir: str = DEFAULT_OUT_DIR
    vocab_size: int = SEED.vocab_size
    d_model: int = SEED.d_model
    n_heads: int = SEED.n_heads
    d_ff: int = SEED.d_ff
    n_layers: int = SEED.n_layers
    seq_len: int = SEED.seq_len
    n_hashes: int = SEED.n_hashes
    chunk_len: int = SEED.chunk_len
    batch_size: int = SEED.batch_size
    dropout: float = 0.1
    dtype: str = "float32"
    optimizer: str = "adafactor"
    models: Tuple[str, ...] = PRESETS
    hash_sweep: Tuple[int, ...] = (1, 2, 4, 8, 16)
    layer_sweep: Tuple[int, ...] = (2, 4, 6, 8, 10, 12)
    lengths: Tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    seqlen_optimizer: str = "none"
    timeline_unroll: bool = True
    dump_dir: str = ""
    runtime_models: Tuple[str, ...] = PRESETS
    runtime_steps: int = 2
    runtime_timeout_s: int = 3600
    floor_hashes: Tuple[int, ...] = (2, 16)
    floor_layers: Tuple[int, ...] = (2, 12)
    floor_lengths: Tuple[int, ...] = (4096, 65536)
    floor_long_len: int = 2**20
    floor_speed_layers: int = 2
    floor_speed_steps: int = 3
    floor_real_len: int = 2**17
    fast_compile: bool = False
    topologies: Tuple[str, ...] = ("v4:1x1x1", "v5e:1x1", "v5p:1x1x1", "v6e:1x1")
    tpu_parts: Tuple[str, ...] = tpu_memory.PARTS
    tpu_dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    fsdp_slices: Tuple[str, ...] = ("v4:2x2x4", "v5e:4x4", "v5p:2x2x4", "v6e:4x4")
    tpu_long_slice: str = "v5e:2x2"
    tpu_max_length: int = 2**24
    command: str = "python -m benchmarks.memory"

    def optimizer_arg(self, name: Optional[str] = None) -> Optional[str]:
        name = self.optimizer if name is None else name
        return None if name == "none" else name

    def config(self, model: str, **overrides: Any):
        """The preset at these sizes; max_len is the row's sequence length."""
        from reformer_jax import ModelConfig

        fields = dict(vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff,
                      n_layers=self.n_layers, max_len=self.seq_len, n_hashes=self.n_hashes,
                      chunk_len=self.chunk_len, dropout=self.dropout, dtype=self.dtype)
        fields.update(overrides)
        return ModelConfig.preset(model, **fields)

    def extra_options(self) -> Dict[str, Any]:
        # LLVM's optimisation level changes code speed, not HLO buffer assignment: used by the tests to compile
        # faster (the figures were checked identical); never for the committed results.
        return {"xla_backend_optimization_level": 0} if self.fast_compile else {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    d = Settings()
    lst = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
    flags.DEFINE_string("experiment", "all", f"One of {', '.join(EXPERIMENT_CHOICES)}.", flag_values=flag_values)
    flags.DEFINE_string("out_dir", d.out_dir, "Where NAME.json/.csv/.md/.png are written.", flag_values=flag_values)
    for name, help_ in [("vocab_size", "Vocabulary (259 = bytes + 3 specials)."), ("d_model", "Model width."),
                        ("n_heads", "Attention heads."), ("d_ff", "Feed-forward width."),
                        ("n_layers", "Layers (experiments other than 'layers')."),
                        ("seq_len", "Sequence length (experiments other than 'seqlen')."),
                        ("n_hashes", "LSH hash rounds (experiments other than 'hashes')."),
                        ("chunk_len", "LSH chunk (bucket) length."), ("batch_size", "Batch size.")]:
        flags.DEFINE_integer(name, getattr(d, name), help_, flag_values=flag_values)
    flags.DEFINE_float("dropout", d.dropout, "Dropout rate of the blocks (ModelConfig's default).",
                       flag_values=flag_values)
    flags.DEFINE_string("dtype", d.dtype, "Compute dtype: float32, or bfloat16 for the seed's mixed-precision view.",
                        flag_values=flag_values)
    flags.DEFINE_string("optimizer", d.optimizer, "adafactor (the seed's), adamw, or none (loss and gradients only).",
                        flag_values=flag_values)
    flags.DEFINE_list("models", lst(d.models), "Presets for variants, seqlen and timeline.", flag_values=flag_values)
    flags.DEFINE_list("hash_sweep", lst(d.hash_sweep), "n_hashes values of 'hashes'.", flag_values=flag_values)
    flags.DEFINE_list("layer_sweep", lst(d.layer_sweep), "n_layers values of 'layers'.", flag_values=flag_values)
    flags.DEFINE_list("lengths", lst(d.lengths), "Sequence lengths of 'seqlen' (its cap: the longest compiles in "
                      "seconds from abstract shapes).", flag_values=flag_values)
    flags.DEFINE_string("seqlen_optimizer", d.seqlen_optimizer, "Optimizer of 'seqlen' (none: activation memory "
                        "without the update's temporaries).", flag_values=flag_values)
    flags.DEFINE_boolean("timeline_unroll", d.timeline_unroll, "Unroll non-reversible stacks (scan_layers=False) in "
                         "'timeline' so each layer's stored activations show as a step.", flag_values=flag_values)
    flags.DEFINE_string("dump_dir", d.dump_dir, "Keep XLA's dumps of 'timeline' here (default: a temporary "
                        "directory, removed).", flag_values=flag_values)
    flags.DEFINE_list("runtime_models", lst(d.runtime_models), "Presets of 'runtime'.", flag_values=flag_values)
    flags.DEFINE_integer("runtime_steps", d.runtime_steps, "Real training steps per variant in 'runtime'.",
                         flag_values=flag_values)
    flags.DEFINE_integer("runtime_timeout_s", d.runtime_timeout_s, "Time limit of one runtime worker.",
                         flag_values=flag_values)
    flags.DEFINE_list("floor_hashes", lst(d.floor_hashes), "Target 1: the two hash counts compared.",
                      flag_values=flag_values)
    flags.DEFINE_list("floor_layers", lst(d.floor_layers), "Target 2: the two depths compared.",
                      flag_values=flag_values)
    flags.DEFINE_list("floor_lengths", lst(d.floor_lengths), "Target 4: lengths where peak <= 2 x floor.",
                      flag_values=flag_values)
    flags.DEFINE_integer("floor_long_len", d.floor_long_len, "Target 5: the long length (peak <= 16 GiB).",
                         flag_values=flag_values)
    flags.DEFINE_integer("floor_speed_layers", d.floor_speed_layers, "Target 1: layers of the model timed for the "
                         "speed cost of sequential rounds and heads (the seed's width and length).",
                         flag_values=flag_values)
    flags.DEFINE_integer("floor_speed_steps", d.floor_speed_steps, "Target 1: timed steps per setting (median; "
                         "0 skips the timing).", flag_values=flag_values)
    flags.DEFINE_integer("floor_real_len", d.floor_real_len, "Target 5: length of the one real training step run "
                         "on this machine (0 skips it).", flag_values=flag_values)
    flags.DEFINE_string("compilation_cache_dir", "", "JAX persistent compilation cache directory (empty: off); a "
                        "rerun loads compiled steps instead of compiling (compile_s then measures the load).",
                        flag_values=flag_values)
    flags.DEFINE_boolean("fast_compile", False, "LLVM -O0 (same memory figures, faster compiles; for tests).",
                         flag_values=flag_values)
    flags.DEFINE_list("topologies", lst(d.topologies), "One-chip TPU slices of 'tpu' (its seed and longest parts).",
                      flag_values=flag_values)
    flags.DEFINE_list("tpu_parts", lst(d.tpu_parts), "Parts of 'tpu': seed (the variants at the seed's setup), "
                      "longest (the longest sequence per chip), long (--floor_long_len tokens on --tpu_long_slice).",
                      flag_values=flag_values)
    flags.DEFINE_list("tpu_dtypes", lst(d.tpu_dtypes), "Compute dtypes of 'tpu' seed part.", flag_values=flag_values)
    flags.DEFINE_list("tpu_fsdp_slices", lst(d.fsdp_slices), "TPU slices of 'tpu' longest part with fsdp over all "
                      "their chips (one sequence per chip).", flag_values=flag_values)
    flags.DEFINE_string("tpu_long_slice", d.tpu_long_slice, "TPU slice of 'tpu' long part (fsdp over its chips).",
                        flag_values=flag_values)
    flags.DEFINE_integer("tpu_max_length", d.tpu_max_length, "Longest sequence 'tpu' longest part compiles (a power "
                         "of two).", flag_values=flag_values)


def _topologies(flag: str, values: Sequence[str], *, one_chip: bool) -> Tuple[str, ...]:
    from reformer_jax.xla import tpu

    try:
        names = tuple(tpu.parse_topology(v, flag=f"--{flag}") and v for v in values if v)
    except tpu.TopologyError as err:
        raise FlagError(str(err)) from None
    for name in names:
        if one_chip and tpu.chips(name) != 1:
            raise FlagError(f"--{flag}={name} has {tpu.chips(name)} chips; its part compiles for one chip: e.g. "
                            f"{name.split(':')[0]}:{'1x1' if name.count('x') == 1 else '1x1x1'}.")
    return names


def settings_from_flags(fv: flags.FlagValues = flags.FLAGS, argv: Optional[Sequence[str]] = None) -> Settings:
    """Validated Settings; raises FlagError (naming the flag, the value and what would work) before compiling."""
    cli.one_of("experiment", fv.experiment, EXPERIMENT_CHOICES)
    cli.at_least(fv, ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "seq_len", "n_hashes", "chunk_len",
                      "batch_size", "runtime_steps", "runtime_timeout_s", "floor_long_len", "floor_speed_layers"),
                 1, Settings())
    for name, choices in (("dtype", DTYPE_CHOICES), ("optimizer", OPTIMIZER_CHOICES),
                          ("seqlen_optimizer", OPTIMIZER_CHOICES)):
        cli.one_of(name, getattr(fv, name), choices)
    cli.at_least(fv, ("floor_speed_steps", "floor_real_len"), 0, Settings())  # 0 skips them
    if fv.d_model % fv.n_heads:
        raise FlagError(f"--d_model={fv.d_model} is not divisible by --n_heads={fv.n_heads}; e.g. --n_heads="
                        f"{math.gcd(fv.d_model, 8)}.")
    s = Settings(
        experiment=fv.experiment, out_dir=fv.out_dir, vocab_size=fv.vocab_size, d_model=fv.d_model,
        n_heads=fv.n_heads, d_ff=fv.d_ff, n_layers=fv.n_layers, seq_len=fv.seq_len, n_hashes=fv.n_hashes,
        chunk_len=fv.chunk_len, batch_size=fv.batch_size, dropout=fv.dropout, dtype=fv.dtype,
        optimizer=fv.optimizer,
        models=cli.presets("models", fv.models), hash_sweep=cli.int_list("hash_sweep", fv.hash_sweep, "1,2,4,8,16"),
        layer_sweep=cli.int_list("layer_sweep", fv.layer_sweep, "2,4,6,8,10,12"),
        lengths=cli.int_list("lengths", fv.lengths, "1024,2048,4096"), seqlen_optimizer=fv.seqlen_optimizer,
        timeline_unroll=fv.timeline_unroll, dump_dir=fv.dump_dir,
        runtime_models=cli.presets("runtime_models", fv.runtime_models), runtime_steps=fv.runtime_steps,
        runtime_timeout_s=fv.runtime_timeout_s,
        floor_hashes=cli.int_list("floor_hashes", fv.floor_hashes, "2,16"),
        floor_layers=cli.int_list("floor_layers", fv.floor_layers, "2,12"),
        floor_lengths=cli.int_list("floor_lengths", fv.floor_lengths, "4096,65536"), floor_long_len=fv.floor_long_len,
        floor_speed_layers=fv.floor_speed_layers, floor_speed_steps=fv.floor_speed_steps,
        floor_real_len=fv.floor_real_len, fast_compile=fv.fast_compile,
        topologies=_topologies("topologies", fv.topologies, one_chip=True),
        tpu_parts=cli.subset("tpu_parts", fv.tpu_parts, tpu_memory.PARTS),
        tpu_dtypes=cli.subset("tpu_dtypes", fv.tpu_dtypes, DTYPE_CHOICES),
        fsdp_slices=_topologies("tpu_fsdp_slices", fv.tpu_fsdp_slices, one_chip=False),
        tpu_long_slice=_topologies("tpu_long_slice", [fv.tpu_long_slice], one_chip=False)[0],
        tpu_max_length=fv.tpu_max_length,
        command=cli.command("benchmarks.memory", argv))
    if s.tpu_max_length < s.seq_len or s.tpu_max_length & (s.tpu_max_length - 1):
        raise FlagError(f"--tpu_max_length={s.tpu_max_length} is invalid: expected a power of two >= --seq_len="
                        f"{s.seq_len}, e.g. {2**24}.")
    for flag, pair in (("floor_hashes", s.floor_hashes), ("floor_layers", s.floor_layers)):
        if len(pair) != 2:
            raise FlagError(f"--{flag}={','.join(map(str, pair))}: expected exactly two values (small, large), "
                            f"e.g. --{flag}={','.join(map(str, getattr(Settings(), flag)))}.")
    for flag, lengths in (("seq_len", (s.seq_len,)), ("lengths", s.lengths), ("floor_lengths", s.floor_lengths),
                          ("floor_long_len", (s.floor_long_len,)),
                          ("floor_real_len", (s.floor_real_len,) if s.floor_real_len else ())):
        for length in lengths:
            if length % s.chunk_len:
                fixed = max(1, length // s.chunk_len) * s.chunk_len
                raise FlagError(f"--{flag}: length {length} is not a multiple of --chunk_len={s.chunk_len}, which "
                                f"LSH attention needs; e.g. {fixed}.")
    # Build every configuration now, so a bad combination fails before the first compilation.
    try:
        for model in PRESETS:
            s.config(model)
    except ValueError as err:
        raise FlagError(f"the size flags give an invalid model: {str(err).replace('ModelConfig.', '--')}") from None
    return s


# ----------------------------------------------------------------------------------------------------------------
# Measuring


_CACHE: Dict[Tuple[Any, ...], Tuple[Any, float]] = {}


def measure(settings: Settings, config, *, seq_len: int, optimizer: Optional[str]) -> Tuple[Any, float]:
    """(MemoryStats, compile seconds) of the step, memoised within this process (`all` shares compilations)."""
    from reformer_jax.memory import compile_train_step as compile_step

    key = (config, settings.batch_size, seq_len, optimizer, settings.fast_compile)
    if key not in _CACHE:
        t = time.perf_counter()
        _, stats = compile_step(config, batch_size=settings.batch_size, seq_len=seq_len, optimizer=optimizer,
                                extra_options=settings.extra_options())
        _CACHE[key] = (stats, time.perf_counter() - t)
    return _CACHE[key]


def make_row(settings: Settings, experiment: str, model: str, config, seq_len: int, optimizer: Optional[str],
             stats, compile_s: float, **extra: Any) -> Row:
    from benchmarks.measure import machine

    row: Row = {
        "experiment": experiment, "model": model, "seq_len": seq_len, "n_layers": config.n_layers,
        "n_hashes": config.n_hashes if config.attention == "lsh" else None, "batch_size": settings.batch_size,
        "d_model": config.d_model, "n_heads": config.n_heads, "d_ff": config.d_ff, "chunk_len": config.chunk_len,
        "vocab_size": config.vocab_size, "dropout": config.dropout, "dtype": config.dtype,
        "optimizer": optimizer or "none",
        "attention": config.attention, "reversible": config.reversible, "ff_chunk_len": config.ff_chunk_len,
        "output_chunk_len": config.output_chunk_len, "sequential_rounds": config.sequential_rounds,
        "sequential_heads": config.sequential_heads, "scan_layers": config.scan_layers,
    }
    row.update(stats.to_dict())
    row.update({"peak_mib": round(stats.peak_bytes / MIB, 3), "activation_mib": round(stats.activation_bytes / MIB, 3),
                "floor_mib": round(stats.floor_bytes / MIB, 3),
                "peak_over_floor": round(stats.peak_bytes / stats.floor_bytes, 4), "compile_s": round(compile_s, 2)})
    row.update(extra)
    row.update({k: v for k, v in machine().items() if k not in row})
    row["command"] = settings.command
    return row


def measure_row(settings: Settings, experiment: str, model: str, *, progress: str, seq_len: Optional[int] = None,
                optimizer: Optional[str] = None, use_settings_optimizer: bool = True, **overrides: Any) -> Row:
    seq_len = settings.seq_len if seq_len is None else seq_len
    if use_settings_optimizer:
        optimizer = settings.optimizer_arg()
    config = settings.config(model, max_len=seq_len, **overrides)
    stats, compile_s = measure(settings, config, seq_len=seq_len, optimizer=optimizer)
    row = make_row(settings, experiment, model, config, seq_len, optimizer, stats, compile_s)
    log(f"[{experiment} {progress}] {model} l={seq_len} layers={config.n_layers} hashes={config.n_hashes} "
        f"opt={optimizer or 'none'}: peak {row['peak_mib']:,.1f} MiB, activations {row['activation_mib']:,.1f} MiB "
        f"(compiled in {compile_s:.1f} s)")
    return row


def _out(settings: Settings, name: str) -> str:
    """Output base name: NAME on CPU, NAME_<backend> elsewhere (GPU results sit beside the CPU ones)."""
    import jax

    backend = jax.default_backend()
    return name if backend == "cpu" else f"{name}_{backend}"


SEED_SETUP = {k: getattr(SEED, k) for k in ("vocab_size", "d_model", "n_heads", "d_ff", "chunk_len", "batch_size",
                                             "seq_len")}


def at_seed_setup(settings: Settings, **more: int) -> bool:
    """True when the sizes are the seed's (so its numbers may be drawn beside ours)."""
    need = {**SEED_SETUP, **more}
    return all(getattr(settings, k) == v for k, v in need.items())


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


# ----------------------------------------------------------------------------------------------------------------
# Experiments


def run_variants(settings: Settings) -> List[Row]:
    rows = []
    for i, model in enumerate(settings.models):
        row = measure_row(settings, "variants", model, progress=f"{i + 1}/{len(settings.models)}")
        row["seed_mb"] = seed.VARIANTS_MB.get(model) if at_seed_setup(settings, n_layers=6, n_hashes=8) else None
        rows.append(row)
    md = output.markdown_table(rows, [
        (lambda r: seed.LABELS[r["model"]], "model", "s"), ("peak_bytes", "peak MiB", "mib"),
        ("param_bytes", "parameters", "mib"), (lambda r: r["param_bytes"], "gradients", "mib"),
        ("optimizer_state_bytes", "optimizer state", "mib"), ("batch_bytes", "batch", "mib"),
        ("activation_bytes", "activations + temporaries", "mib"), ("seed_mb", "seed (PyTorch, fp16) MB", ""),
        (lambda r: _ratio(r["peak_mib"], r["seed_mb"]), "ours / seed", ".2f")])

    def plot(path):
        fig, ax = output.new_figure(8.5, 5)
        names = [seed.LABELS[r["model"]] for r in rows]
        parts = [("parameters", lambda r: r["param_bytes"], "#4c72b0"),
                 ("gradients", lambda r: r["param_bytes"], "#55a868"),
                 ("optimizer state", lambda r: r["optimizer_state_bytes"], "#8172b2"),
                 ("batch", lambda r: r["batch_bytes"], "#937860"),
                 ("activations + temporaries", lambda r: r["activation_bytes"], "#dd8452")]
        bottom = [0.0] * len(rows)
        for label, get, color in parts:
            vals = [get(r) / MIB for r in rows]
            ax.bar(names, vals, bottom=bottom, label=label, color=color, width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, r in enumerate(rows):
            ax.text(x, r["peak_mib"], f"{r['peak_mib']:,.0f}", ha="center", va="bottom", fontsize=9)
        seed_x = [x for x, r in enumerate(rows) if r["seed_mb"]]
        if seed_x:
            ax.scatter(seed_x, [rows[x]["seed_mb"] for x in seed_x], marker="_", s=900, color="black",
                       linewidths=2.5, zorder=5, label="seed (PyTorch hooks, fp16)")
        ax.set_ylabel("peak memory of one training step (MiB)")
        ax.set_title(f"Experiment 1: peak memory, length {settings.seq_len}, batch {settings.batch_size}, "
                     f"{settings.n_layers} layers, {settings.n_hashes} hashes ({settings.dtype}, XLA compile-time)",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        output.save_figure(path, fig)

    output.write_outputs(settings.out_dir, _out(settings, "variants"), rows,
                         "# Experiment 1: the four variants\n\n" + md, plot)
    return rows


def run_hashes(settings: Settings) -> List[Row]:
    rows = []
    for i, n in enumerate(settings.hash_sweep):
        row = measure_row(settings, "hashes", "reformer", progress=f"{i + 1}/{len(settings.hash_sweep)}", n_hashes=n)
        row["seed_mb"] = seed.HASHES_MB.get(n) if at_seed_setup(settings, n_layers=6) else None
        rows.append(row)
    md = output.markdown_table(rows, [
        ("n_hashes", "hash rounds", ""), ("peak_bytes", "peak MiB", "mib"),
        ("activation_bytes", "activations + temporaries MiB", "mib"), ("temp_bytes", "XLA temp MiB", "mib"),
        ("seed_mb", "seed MB", ""), (lambda r: _ratio(r["peak_mib"], r["seed_mb"]), "ours / seed", ".2f")])

    def plot(path):
        fig, ax = output.new_figure(7.5, 4.8)
        xs = [r["n_hashes"] for r in rows]
        ax.plot(xs, [r["peak_mib"] for r in rows], "o-", label="peak (ours, XLA)")
        ax.plot(xs, [r["activation_mib"] for r in rows], "s--", label="activations + temporaries (ours)")
        sx = sorted(seed.HASHES_MB) if any(r["seed_mb"] for r in rows) else []
        if sx:
            ax.plot(sx, [seed.HASHES_MB[n] for n in sx], "k^:", label="seed peak (PyTorch, fp16)")
        ax.set_xticks(sorted(set(xs) | set(sx)), [str(x) for x in sorted(set(xs) | set(sx))])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("hash rounds (n_hashes)")
        ax.set_ylabel("memory (MiB)")
        ax.set_title(f"Experiment 2: Reformer LM against hash rounds (length {settings.seq_len}, "
                     f"{settings.n_layers} layers)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        output.save_figure(path, fig)

    output.write_outputs(settings.out_dir, _out(settings, "hashes"), rows,
                         "# Experiment 2: Reformer memory against hash rounds\n\n" + md, plot)
    return rows


def run_layers(settings: Settings) -> List[Row]:
    rows = []
    jobs = [(m, n) for m in ("reformer", "transformer") for n in settings.layer_sweep]
    for i, (model, n) in enumerate(jobs):
        row = measure_row(settings, "layers", model, progress=f"{i + 1}/{len(jobs)}", n_layers=n)
        row["seed_mb"] = seed.LAYERS_MB[model].get(n) if at_seed_setup(settings, n_hashes=8) else None
        rows.append(row)
    md = output.markdown_table(rows, [
        (lambda r: seed.LABELS[r["model"]], "model", "s"), ("n_layers", "layers", ""),
        ("peak_bytes", "peak MiB", "mib"), ("activation_bytes", "activations + temporaries MiB", "mib"),
        ("param_bytes", "parameters MiB", "mib"), ("seed_mb", "seed MB", ""),
        (lambda r: _ratio(r["peak_mib"], r["seed_mb"]), "ours / seed", ".2f")])

    def plot(path):
        fig, ax = output.new_figure(7.5, 4.8)
        for model, color in (("reformer", "#dd8452"), ("transformer", "#4c72b0")):
            mine = [r for r in rows if r["model"] == model]
            ax.plot([r["n_layers"] for r in mine], [r["peak_mib"] for r in mine], "o-", color=color,
                    label=f"{seed.LABELS[model]} (ours, XLA)")
            ref = seed.LAYERS_MB[model] if any(r["seed_mb"] for r in rows) else {}
            if ref:
                ax.plot(sorted(ref), [ref[n] for n in sorted(ref)], "^:", color=color, markeredgecolor="black",
                        label=f"{seed.LABELS[model]} (seed, fp16)")
        ax.set_xlabel("layers (n_layers)")
        ax.set_ylabel("peak memory (MiB)")
        ax.set_xticks(sorted(settings.layer_sweep))
        ax.set_ylim(bottom=0)
        ax.set_title(f"Experiment 3: peak memory against depth (length {settings.seq_len}, "
                     f"{settings.n_hashes} hashes)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        output.save_figure(path, fig)

    output.write_outputs(settings.out_dir, _out(settings, "layers"), rows,
                         "# Experiment 3: memory against the number of layers\n\n" + md, plot)
    return rows


def fit_exponent(lengths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(lengths): the growth exponent p in values ~ length^p."""
    if len(lengths) != len(values) or len(lengths) < 2:
        raise ValueError(f"fit_exponent needs at least two (length, value) pairs; got {len(lengths)} lengths and "
                         f"{len(values)} values.")
    if min(lengths) <= 0 or min(values) <= 0:
        raise ValueError("fit_exponent needs positive lengths and values (it fits on a log-log scale).")
    xs = [math.log(x) for x in lengths]
    ys = [math.log(y) for y in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_exponent needs at least two distinct lengths.")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def run_seqlen(settings: Settings) -> List[Row]:
    rows = []
    optimizer = settings.optimizer_arg(settings.seqlen_optimizer)
    jobs = [(m, length) for m in settings.models for length in settings.lengths]
    for i, (model, length) in enumerate(jobs):
        rows.append(measure_row(settings, "seqlen", model, progress=f"{i + 1}/{len(jobs)}", seq_len=length,
                                optimizer=optimizer, use_settings_optimizer=False))
    exponents = []
    for model in settings.models:
        mine = [r for r in rows if r["model"] == model]
        lengths = [r["seq_len"] for r in mine]
        acts = [r["activation_bytes"] for r in mine]
        fitted = fit_exponent(lengths, acts) if len(mine) >= 2 else None
        last = fit_exponent(lengths[-2:], acts[-2:]) if len(mine) >= 2 else None
        predicted = seed.TABLE5_EXPONENT[mine[0]["attention"]]
        for r in mine:
            r.update({"fitted_exponent": fitted, "last_pair_exponent": last, "table5_exponent": predicted})
        exponents.append({"model": model, "fitted_exponent": fitted, "last_pair_exponent": last,
                          "table5_exponent": predicted, "lengths": f"{lengths[0]}-{lengths[-1]}"})
        log(f"[seqlen] {model}: activation memory ~ length^{fitted:.2f} (last pair {last:.2f}); Table 5: "
            f"{predicted}")
    md = ["# Table 5: activation memory against sequence length\n",
          f"Optimizer: {settings.seqlen_optimizer} (activations = peak - parameters - gradients - optimizer state - "
          "batch). Exponent p fitted by least squares on log(activations) against log(length).\n",
          output.markdown_table(exponents, [
              (lambda r: seed.LABELS[r["model"]], "model", "s"), ("lengths", "lengths", "s"),
              ("fitted_exponent", "fitted p (all lengths)", ".2f"),
              ("last_pair_exponent", "p (last two lengths)", ".2f"), ("table5_exponent", "Table 5", "")]),
          "\nActivation memory (MiB):\n",
          output.markdown_table(
              [{"seq_len": length, **{m: next(r["activation_bytes"] for r in rows
                                              if r["model"] == m and r["seq_len"] == length)
                                      for m in settings.models}} for length in settings.lengths],
              [("seq_len", "length", "")] + [(m, seed.LABELS[m], "mib") for m in settings.models])]

    def plot(path):
        fig, ax = output.new_figure(7.5, 5)
        for model in settings.models:
            mine = [r for r in rows if r["model"] == model]
            ax.plot([r["seq_len"] for r in mine], [r["activation_mib"] for r in mine], "o-",
                    label=f"{seed.LABELS[model]}: p = {mine[0]['fitted_exponent']:.2f} "
                          f"(Table 5: {mine[0]['table5_exponent']})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("activation memory (MiB)")
        ax.set_title(f"Table 5: activation memory against length ({settings.n_layers} layers, "
                     f"{settings.n_hashes} hashes, batch {settings.batch_size})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        output.save_figure(path, fig)

    output.write_outputs(settings.out_dir, _out(settings, "seqlen"), rows, "\n".join(md), plot)
    return rows


def run_timeline(settings: Settings) -> List[Row]:
    from reformer_jax.xla import timeline
    from reformer_jax.memory import compile_train_step as compile_step

    rows = []
    root = settings.dump_dir or tempfile.mkdtemp(prefix="xla_dump_")
    try:
        for i, model in enumerate(settings.models):
            config = settings.config(model)
            if settings.timeline_unroll and not config.reversible:
                config = config.replace(scan_layers=False)
            dump = os.path.join(root, model)
            shutil.rmtree(dump, ignore_errors=True)
            options = {**settings.extra_options(), "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
                       "xla_dump_hlo_module_re": "jit_train_step"}
            t = time.perf_counter()
            _, stats = compile_step(config, batch_size=settings.batch_size, seq_len=settings.seq_len,
                                    optimizer=settings.optimizer_arg(), extra_options=options)
            compile_s = time.perf_counter() - t
            info = timeline.analyze_dump(dump)
            row = make_row(settings, "timeline", model, config, settings.seq_len, settings.optimizer_arg(), stats,
                           compile_s, **info)
            rows.append(row)
            log(f"[timeline {i + 1}/{len(settings.models)}] {model} (scan_layers={config.scan_layers}): "
                f"memory_analysis peak {stats.peak_bytes / MIB:,.1f} MiB, XLA live-range peak "
                f"{(info['xla_live_peak_bytes'] or 0) / MIB:,.1f} MiB, curve max {info['curve_peak_bytes'] / MIB:,.1f}"
                f" MiB over {info['schedule_len']} steps")
    finally:
        if not settings.dump_dir:
            shutil.rmtree(root, ignore_errors=True)

    md = ["# Live bytes across one training step\n",
          "Rebuilt from XLA's `*after_optimizations-live-range.txt` and `-buffer-assignment.txt` dumps of "
          "`jit_train_step`. Non-reversible stacks are "
          + ("unrolled (`scan_layers=False`)" if settings.timeline_unroll else "scanned (`scan_layers=True`)")
          + "; the reversible stack is always one `lax.scan`, whose body appears once in the flattened schedule "
            "(its curve is a picture, XLA's peak is the number).\n",
          output.markdown_table(rows, [
              (lambda r: seed.LABELS[r["model"]], "model", "s"), ("scan_layers", "scan_layers", ""),
              ("peak_bytes", "memory_analysis peak MiB", "mib"), ("xla_live_peak_bytes", "XLA live-range peak MiB",
                                                                  "mib"),
              ("curve_peak_bytes", "rebuilt curve max MiB", "mib"), ("schedule_len", "schedule steps", ""),
              (lambda r: r["peak_by_scope"][0]["scope"] if r["peak_by_scope"] else None, "largest scope at peak",
               "s")])]
    for r in rows:
        md.append(f"\n## {seed.LABELS[r['model']]}: XLA's peak by named scope\n")
        md.append(output.markdown_table(r["peak_by_scope"][:10], [("scope", "scope (pass)", "s"),
                                                                  ("bytes", "MiB at peak", "mib")]))

    def plot(path):
        fig, ax = output.new_figure(9, 5)
        for r in rows:
            ax.plot(r["curve_x"], [b / MIB for b in r["curve_bytes"]], lw=1.3,
                    label=f"{seed.LABELS[r['model']]} (peak {r['peak_mib']:,.0f} MiB)")
        ax.set_xlabel("position in the step's schedule (0 = start of forward, 1 = end of update)")
        ax.set_ylabel("live bytes (MiB)")
        ax.set_title(f"Live memory across one training step (XLA schedule, length {settings.seq_len}, "
                     f"{settings.n_layers} layers)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        output.save_figure(path, fig)

    output.write_outputs(settings.out_dir, _out(settings, "timeline"), rows, "\n".join(md), plot)
    return rows


def run_runtime(settings: Settings) -> List[Row]:
    import jax

    rows = []
    backend = jax.default_backend()
    profile_dir = os.path.join(settings.out_dir, f"runtime_profiles_{backend}")
    for i, model in enumerate(settings.runtime_models):
        config = settings.config(model)
        spec = {"config": config.to_dict(), "batch_size": settings.batch_size, "seq_len": settings.seq_len,
                "optimizer": settings.optimizer_arg(), "steps": settings.runtime_steps,
                "extra_options": settings.extra_options(),
                "profile_path": None if backend == "cpu" else os.path.join(profile_dir, f"{model}.prof.gz")}
        if spec["profile_path"]:
            os.makedirs(profile_dir, exist_ok=True)
        log(f"[runtime {i + 1}/{len(settings.runtime_models)}] {model}: compiling and running "
            f"{settings.runtime_steps} steps in a fresh process ...")
        t = time.perf_counter()
        result = run_runtime_worker(settings, spec, f"runtime worker for {model}")
        from reformer_jax.xla.memory_analysis import MemoryStats

        stats = MemoryStats(**{f.name: result[f.name] for f in dataclasses.fields(MemoryStats) if f.name in result})
        extra = {k: v for k, v in result.items() if k not in stats.to_dict() and k != "compile_s"}
        row = make_row(settings, "runtime", model, config, settings.seq_len, settings.optimizer_arg(), stats,
                       result["compile_s"], **extra)
        row["runtime_peak_mib"] = round(row["runtime_peak_bytes"] / MIB, 3)
        row["worker_wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        log(f"[runtime {i + 1}/{len(settings.runtime_models)}] {model}: compile-time peak {row['peak_mib']:,.1f} MiB, "
            f"runtime {row['runtime_peak_mib']:,.1f} MiB ({row['runtime_source']}), steps {row['step_s']} s")
    md = ["# Runtime memory of real training steps\n",
          f"Backend {backend}. Each variant ran {settings.runtime_steps} steps in its own process. "
          + ("CPU: runtime = max sampled process RSS during the steps minus the RSS before the state was created "
             "(coarse: allocator caching, thread stacks and code pages count too)." if backend == "cpu" else
             "Runtime = memory_stats()['peak_bytes_in_use'] with XLA_PYTHON_CLIENT_PREALLOCATE=false.") + "\n",
          output.markdown_table(rows, [
              (lambda r: seed.LABELS[r["model"]], "model", "s"), ("peak_bytes", "compile-time peak MiB", "mib"),
              ("runtime_peak_bytes", "runtime MiB", "mib"), ("runtime_over_compile", "runtime / compile-time", ".2f"),
              (lambda r: max(r["step_s"]), "slowest step s", ".1f"), ("runtime_source", "source", "s")])]

    def plot(path):
        fig, ax = output.new_figure(7.5, 4.8)
        names = [seed.LABELS[r["model"]] for r in rows]
        xs = list(range(len(rows)))
        ax.bar([x - 0.2 for x in xs], [r["peak_mib"] for r in rows], width=0.4, label="compile-time peak (XLA)")
        ax.bar([x + 0.2 for x in xs], [r["runtime_peak_mib"] for r in rows], width=0.4,
               label=f"runtime ({'process RSS' if backend == 'cpu' else 'peak_bytes_in_use'})")
        ax.set_xticks(xs, names)
        ax.set_ylabel("memory (MiB)")
        ax.set_title(f"Compile-time prediction against runtime ({backend}, length {settings.seq_len})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        output.save_figure(path, fig)

    output.write_outputs(settings.out_dir, _out(settings, "runtime"), rows, "\n".join(md), plot)
    return rows


def time_train_steps(config, *, batch_size: int, seq_len: int, steps: int) -> float:
    """Median seconds of `steps` real training steps (after one warm-up step; compilation excluded)."""
    import jax
    import jax.numpy as jnp

    from reformer_jax.training import step as train

    tx = train.make_optimizer("adafactor")
    state = jax.jit(lambda k: train.create_train_state(k, config, tx))(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len + 1), 3, config.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((batch_size, seq_len))}
    step = train.jit_train_step(config)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        state, metrics = step(state, batch, jax.random.key(2))
        jax.block_until_ready(metrics)
        if i:  # the first call compiles
            times.append(time.perf_counter() - t)
    return float(sorted(times)[len(times) // 2])


def run_runtime_worker(settings: Settings, spec: Dict[str, Any], what: str) -> Dict[str, Any]:
    """Real training steps in a fresh process (`benchmarks.runtime` with `spec`); its parsed result."""
    from benchmarks.runtime import parse_result

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime", json.dumps(spec)], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=settings.runtime_timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse_result(proc.stdout)


def _real_step(settings: Settings, seq_len: int) -> Dict[str, Any]:
    """One real training step of the Reformer at seq_len in a fresh process (benchmarks.runtime)."""
    spec = {"config": settings.config("reformer", max_len=seq_len).to_dict(), "batch_size": settings.batch_size,
            "seq_len": seq_len, "optimizer": settings.optimizer_arg() or "adafactor", "steps": 1,
            "extra_options": settings.extra_options(), "profile_path": None}
    return run_runtime_worker(settings, spec, f"the real step at length {seq_len}")


def run_floor(settings: Settings) -> List[Row]:
    rows: List[Row] = []

    def target(number: str, criterion: str, measured: float, limit: Optional[float], subject: Row, detail: str,
               **more: Any) -> None:
        status = targets.status(measured, limit)
        row = dict(subject)
        row.update({"experiment": "floor", "target": number, "criterion": criterion, "measured": measured,
                    "limit": limit, "status": status, "detail": detail, **more})
        rows.append(row)
        log(f"[floor {number}] {criterion}: measured {measured:,.3f} (limit {limit}) -> {status}")

    def mib(row: Row) -> str:
        return f"{row['peak_mib']:,.1f} MiB"

    lo, hi = settings.floor_hashes
    a = measure_row(settings, "floor", "reformer", progress="1", n_hashes=lo)
    b = measure_row(settings, "floor", "reformer", progress="1", n_hashes=hi)
    a_all = measure_row(settings, "floor", "reformer", progress="1", n_hashes=lo, sequential_rounds=False)
    b_all = measure_row(settings, "floor", "reformer", progress="1", n_hashes=hi, sequential_rounds=False)
    target("1", f"Reformer peak at {hi} rounds <= 1.15 x peak at {lo} rounds", b["peak_bytes"] / a["peak_bytes"], 1.15,
           b, f"{mib(b)} / {mib(a)} (all rounds at once: {mib(b_all)} / {mib(a_all)} = "
              f"{b_all['peak_bytes'] / a_all['peak_bytes']:.2f})")
    if settings.floor_speed_steps:
        # The speed cost of processing rounds (and heads) one at a time, timed side by side in this process.
        timed = {}
        for rounds, heads in ((True, True), (False, True), (True, False), (False, False)):
            config = settings.config("reformer", n_layers=settings.floor_speed_layers, sequential_rounds=rounds,
                                     sequential_heads=heads)
            timed[rounds, heads] = time_train_steps(config, batch_size=settings.batch_size, seq_len=settings.seq_len,
                                                    steps=settings.floor_speed_steps)
            log(f"[floor 1s] sequential_rounds={rounds} sequential_heads={heads}: {timed[rounds, heads]:.2f} s/step")
        speed_row = dict(b, n_layers=settings.floor_speed_layers, n_hashes=settings.n_hashes,
                         **{f"step_s_rounds_{r}_heads_{h}": t for (r, h), t in timed.items()})
        default, baseline = timed[True, True], timed[False, False]
        target("1s", f"Step time, rounds and heads one at a time (the default) <= 1.3 x all at once "
                     f"({settings.floor_speed_layers} layers, {settings.n_hashes} rounds, length {settings.seq_len})",
               default / baseline, 1.3, speed_row,
               f"{default:.2f} / {baseline:.2f} s/step; rounds only {timed[True, False]:.2f}, heads only "
               f"{timed[False, True]:.2f} s/step")

    lo, hi = settings.floor_layers
    a = measure_row(settings, "floor", "reformer", progress="2", n_layers=lo, optimizer=None,
                    use_settings_optimizer=False)
    b = measure_row(settings, "floor", "reformer", progress="2", n_layers=hi, optimizer=None,
                    use_settings_optimizer=False)
    a_full = measure_row(settings, "floor", "reformer", progress="2", n_layers=lo)
    b_full = measure_row(settings, "floor", "reformer", progress="2", n_layers=hi)
    target("2", f"Reformer activations (optimizer=None) at {hi} layers <= 1.05 x at {lo} layers",
           b["activation_bytes"] / a["activation_bytes"], 1.05, b,
           f"{b['activation_mib']:,.1f} / {a['activation_mib']:,.1f} MiB (full step with the optimizer: peak "
           f"{mib(b_full)} / {mib(a_full)}, activations and temporaries {b_full['activation_mib']:,.1f} / "
           f"{a_full['activation_mib']:,.1f} MiB)")

    r = measure_row(settings, "floor", "reformer", progress="3")
    t = measure_row(settings, "floor", "transformer", progress="3")
    target("3", "Reformer peak <= 0.05 x Transformer peak", r["peak_bytes"] / t["peak_bytes"], 0.05, r,
           f"{mib(r)} / {mib(t)}")

    for i, length in enumerate(settings.floor_lengths):
        row = measure_row(settings, "floor", "reformer", progress="4", seq_len=length)
        target(f"4{'abcdefgh'[i]}", f"Reformer peak <= 2 x floor at length {length}", row["peak_over_floor"], 2.0,
               row, f"peak {mib(row)}, floor {row['floor_mib']:,.1f} MiB")

    row = measure_row(settings, "floor", "reformer", progress="5", seq_len=settings.floor_long_len)
    target("5", f"Reformer compile-time peak at length {settings.floor_long_len} <= 16 GiB",
           row["peak_bytes"] / 2**30, FLOOR_PEAK_LIMIT_BYTES / 2**30, row,
           f"peak {row['peak_bytes'] / 2**30:,.2f} GiB = {row['peak_over_floor']:.2f} x the floor "
           f"{row['floor_bytes'] / 2**30:,.2f} GiB")

    if settings.floor_real_len:
        length = settings.floor_real_len
        log(f"[floor 5r] one real training step at length {length} in a fresh process ...")
        result = _real_step(settings, length)
        real = measure_row(settings, "floor", "reformer", progress="5r", seq_len=length)
        step_s = max(result["step_s"])
        target("5r", f"One real training step at length {length} on this machine: seconds (runtime memory beside "
                     "the prediction)", step_s, None, real,
               f"{step_s:,.1f} s; {result['runtime_source']} {result['runtime_peak_bytes'] / MIB:,.1f} MiB against "
               f"the compile-time peak {mib(real)}", runtime_peak_bytes=result["runtime_peak_bytes"],
               runtime_source=result["runtime_source"], step_s=result["step_s"])

    md = ["# Memory-floor targets, measured\n",
          "floor = parameters + gradients + optimizer state + batch + 4 x batch x length x d_model x 4 bytes. "
          "'short' means the target is not met. Defaults: hash rounds and heads one at a time "
          "(sequential_rounds, sequential_heads).\n",
          output.markdown_table(rows, [("target", "target", "s"), ("criterion", "criterion", "s"),
                                       ("measured", "measured", ".3f"), ("limit", "limit", "g"),
                                       ("detail", "values", "s"), ("status", "status", "s")])]
    limited = [r for r in rows if r["limit"] is not None]

    def plot(path):
        fig, ax = output.new_figure(8, 4.2)
        xs = list(range(len(limited)))
        ratios = [r["measured"] / r["limit"] for r in limited]
        colors = ["#55a868" if r["status"] == "pass" else "#c44e52" for r in limited]
        ax.bar(xs, ratios, color=colors)
        ax.set_xticks(xs, [f"target {r['target']}" for r in limited])
        ax.axhline(1.0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("target (green: pass, red: short)")
        ax.set_ylabel("measured / limit (log; <= 1 passes)")
        ax.set_title("Memory-floor targets: measured value over its limit", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
        output.save_figure(path, fig)

    output.write_outputs(settings.out_dir, _out(settings, "floor"), rows, "\n".join(md), plot)
    print(output.markdown_table(rows, [("target", "target", "s"), ("criterion", "criterion", "s"),
                                       ("measured", "measured", ".3f"), ("limit", "limit", "g"),
                                       ("status", "pass/short", "s")]), flush=True)
    return rows



RUNNERS: Dict[str, Callable[[Settings], List[Row]]] = {
    "variants": run_variants, "hashes": run_hashes, "layers": run_layers, "seqlen": run_seqlen,
    "timeline": run_timeline, "floor": run_floor, "runtime": run_runtime, "tpu": tpu_memory.run_tpu,
}


def run(settings: Settings) -> Dict[str, List[Row]]:
    """Run the chosen experiment(s); returns {experiment: rows}."""
    names = EXPERIMENTS if settings.experiment == "all" else (settings.experiment,)
    os.makedirs(settings.out_dir, exist_ok=True)
    results = {}
    for name in names:
        t = time.perf_counter()
        log(f"== {name} ==")
        results[name] = RUNNERS[name](settings)
        log(f"== {name}: {len(results[name])} rows in {time.perf_counter() - t:.0f} s, written to "
            f"{settings.out_dir} ==")
    return results


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value.")
    try:
        settings = settings_from_flags(flags.FLAGS, sys.argv)
        if flags.FLAGS.compilation_cache_dir:
            from reformer_jax.xla.compilation_cache import enable_compilation_cache

            enable_compilation_cache(flags.FLAGS.compilation_cache_dir)
    except (FlagError, ValueError) as err:
        raise app.UsageError(str(err)) from None
    run(settings)


if __name__ == "__main__":
    define_flags()
    app.run(main)
