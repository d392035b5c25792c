"""Memory benchmark driver: the seed's three experiments and the paper's Table 5, from XLA's memory analysis.

    python -m benchmarks.memory --experiment=all                    # the seed's setup, writes benchmarks/results/
    python -m benchmarks.memory --experiment=hashes --hash_sweep=2,4,8
    python -m benchmarks.memory --experiment=variants --dtype=bfloat16 --out_dir=/tmp/bf16

Experiments (each writes NAME.json, .csv, .md and .png in --out_dir): variants (the four presets, the seed's
experiment 1), hashes (the Reformer at each --hash_sweep, experiment 2), layers (the Reformer and the Transformer
at each --layer_sweep, experiment 3), seqlen (the presets at --lengths: activation memory's growth exponent beside
Table 5's), timeline (live bytes across one step's schedule, from XLA's buffer dumps), runtime (real steps per
variant in their own processes), floor (the memory-floor targets), encoder (the presets as bidirectional ListOps
classifiers beside the causal models, the Reformer classifier at --floor_hashes rounds), all (all of these) and tpu
(the step compiled for TPU chips by libtpu on this machine, `tpu_memory`; not in all). Every figure is XLA's
compile-time analysis of the step main.py runs, for abstract inputs: peak = argument + output - alias + temp.
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

from absl import flags

from benchmarks import cli, output, seed, targets, tpu_memory
from benchmarks.cli import DEFAULT_OUT_DIR, FlagError, log
from benchmarks.output import MIB, Row
from reformer_jax.model.config import DTYPES, PRESETS
from reformer_jax.model.sizes import SEED

EXPERIMENTS = ("variants", "hashes", "layers", "seqlen", "timeline", "floor", "runtime", "encoder")
EXPERIMENT_CHOICES = EXPERIMENTS + ("tpu", "all")  # "tpu" compiles for TPU slices (needs libtpu), so "all" leaves it out
OPTIMIZER_CHOICES = ("adafactor", "adamw", "none")
FLOOR_PEAK_LIMIT_BYTES = 16 * 2**30


@dataclasses.dataclass(frozen=True)
class Settings(cli.sized(SEED)):
    """One run of the driver: its sizes (the seed's by default) and each experiment's sweep; a flag per field.

    Attributes:
      experiment: One of variants, hashes, layers, seqlen, timeline, floor, runtime, encoder, tpu, all.
      out_dir: Where NAME.json/.csv/.md/.png are written.
      n_layers: Layers (experiments other than 'layers').
      seq_len: Sequence length (experiments other than 'seqlen').
      n_hashes: LSH hash rounds (experiments other than 'hashes').
      batch_size: Batch size.
      dtype: Compute dtype: float32, or bfloat16 for the seed's mixed-precision view.
      optimizer: adafactor (the seed's), adamw, or none (loss and gradients only).
      models: Presets for variants, seqlen, timeline and tpu.
      hash_sweep: n_hashes values of 'hashes'.
      layer_sweep: n_layers values of 'layers'.
      lengths: Sequence lengths of 'seqlen' (its cap: the longest compiles in seconds from abstract shapes).
      seqlen_optimizer: Optimizer of 'seqlen' (none: activation memory without the update's temporaries).
      timeline_unroll: Unroll non-reversible stacks (scan_layers=False) in 'timeline' so each layer shows as a step.
      dump_dir: Keep XLA's dumps of 'timeline' here (default: a temporary directory, removed).
      runtime_models: Presets of 'runtime'.
      runtime_steps: Real training steps per variant in 'runtime'.
      runtime_timeout_s: Time limit of one runtime worker.
      floor_hashes: Target 1: the two hash counts compared.
      floor_layers: Target 2: the two depths compared.
      floor_lengths: Target 4: lengths where peak <= 2 x floor.
      floor_long_len: Target 5: the long length (peak <= 16 GiB).
      floor_speed_layers: Target 1: layers of the model timed for the speed cost of sequential rounds and heads.
      floor_speed_steps: Target 1: timed steps per setting (median; 0 skips the timing).
      floor_real_len: Target 5: length of the one real training step run on this machine (0 skips it).
      compilation_cache_dir: JAX persistent compilation cache directory (empty: off).
      fast_compile: LLVM -O0 (the same memory figures, faster compiles; for tests).
      topologies: One-chip TPU slices of 'tpu' (its seed and longest parts).
      tpu_parts: Parts of 'tpu': seed (the variants at the seed's setup), longest (the longest sequence per chip),
        long (--floor_long_len tokens on --tpu_long_slice), breakdown (the Reformer's peak part by part).
      tpu_dtypes: Compute dtypes of the 'tpu' seed part.
      tpu_fsdp_slices: TPU slices of the 'tpu' longest part with fsdp over all their chips (a sequence per chip).
      tpu_long_slice: TPU slice of the 'tpu' long part (fsdp over its chips).
      tpu_max_length: Longest sequence the 'tpu' longest part compiles (a power of two).
      tpu_breakdown_topology: One-chip TPU slice of the 'tpu' breakdown part.
      tpu_breakdown_lengths: Sequence lengths of the 'tpu' breakdown part (the Reformer, beside XLA:CPU's step).
    """

    experiment: str = "all"
    out_dir: str = DEFAULT_OUT_DIR
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
    compilation_cache_dir: str = ""
    fast_compile: bool = False
    topologies: Tuple[str, ...] = ("v4:1x1x1", "v5e:1x1", "v5p:1x1x1", "v6e:1x1")
    tpu_parts: Tuple[str, ...] = tpu_memory.PARTS
    tpu_dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    tpu_fsdp_slices: Tuple[str, ...] = ("v4:2x2x4", "v5e:4x4", "v5p:2x2x4", "v6e:4x4")
    tpu_long_slice: str = "v5e:2x2"
    tpu_max_length: int = 2**24
    tpu_breakdown_topology: str = "v5e:1x1"
    tpu_breakdown_lengths: Tuple[int, ...] = (4096, 524288)
    command: str = "python -m benchmarks.memory"

    def optimizer_arg(self, name: Optional[str] = None) -> Optional[str]:
        name = self.optimizer if name is None else name
        return None if name == "none" else name

    def config(self, model: str, **overrides: Any):
        """The preset at these sizes; max_len is the row's sequence length."""
        from reformer_jax import ModelConfig

        return ModelConfig.preset(model, **{**self.model_fields(), "dropout": self.dropout, "dtype": self.dtype,
                                            **overrides})

    def extra_options(self) -> Dict[str, Any]:
        # LLVM's optimisation level changes code speed, not HLO buffer assignment: used by the tests to compile
        # faster (the figures were checked identical); never for the committed results.
        return {"xla_backend_optimization_level": 0} if self.fast_compile else {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    cli.define_flags(Settings, flag_values)


def settings_from_flags(fv: flags.FlagValues = flags.FLAGS, argv: Optional[Sequence[str]] = None) -> Settings:
    """Validated Settings; raises FlagError (naming the flag, the value and what would work) before compiling."""
    topologies = tpu_memory.check_topologies
    s = cli.settings_from_flags(
        Settings, fv, "benchmarks.memory", argv,
        choices={"experiment": EXPERIMENT_CHOICES, "dtype": DTYPES, "optimizer": OPTIMIZER_CHOICES,
                 "seqlen_optimizer": OPTIMIZER_CHOICES, "models": PRESETS, "runtime_models": PRESETS,
                 "tpu_parts": tpu_memory.PARTS, "tpu_dtypes": DTYPES},
        minimum={"floor_speed_steps": 0, "floor_real_len": 0, "tpu_max_length": None},  # 0 skips them
        parse={"topologies": lambda v: topologies("topologies", v, one_chip=True),
               "tpu_fsdp_slices": lambda v: topologies("tpu_fsdp_slices", v, one_chip=False),
               "tpu_long_slice": lambda v: topologies("tpu_long_slice", [v], one_chip=False)[0],
               "tpu_breakdown_topology": lambda v: topologies("tpu_breakdown_topology", [v], one_chip=True)[0],
               "compilation_cache_dir": cli.cache_dir})
    if s.d_model % s.n_heads:
        raise FlagError(f"--d_model={s.d_model} is not divisible by --n_heads={s.n_heads}; e.g. --n_heads="
                        f"{math.gcd(s.d_model, 8)}.")
    if s.tpu_max_length < s.seq_len or s.tpu_max_length & (s.tpu_max_length - 1):
        raise FlagError(f"--tpu_max_length={s.tpu_max_length} is invalid: expected a power of two >= --seq_len="
                        f"{s.seq_len}, e.g. {2**24}.")
    for flag in ("floor_hashes", "floor_layers"):
        if len(getattr(s, flag)) != 2:
            raise FlagError(f"--{flag}={','.join(map(str, getattr(s, flag)))}: expected exactly two values (small, "
                            f"large), e.g. --{flag}={','.join(map(str, getattr(Settings(), flag)))}.")
    cli.check_lengths(s.chunk_len, seq_len=(s.seq_len,), lengths=s.lengths, floor_lengths=s.floor_lengths,
                      floor_long_len=(s.floor_long_len,), floor_real_len=(s.floor_real_len,) * bool(s.floor_real_len))
    cli.check_model(lambda: [s.config(model) for model in PRESETS])
    return s


# ----------------------------------------------------------------------------------------------------------------
# Measuring


_CACHE: Dict[Tuple[Any, ...], Tuple[Any, float]] = {}


def measure(settings: Settings, config, *, seq_len: int, optimizer: Optional[str]) -> Tuple[Any, float]:
    """(MemoryStats, compile seconds) of the step, memoised within this process (`all` shares compilations)."""
    from reformer_jax.memory import compile_train_step

    key = (config, settings.batch_size, seq_len, optimizer, settings.fast_compile)
    if key not in _CACHE:
        t = time.perf_counter()
        _, stats = compile_train_step(config, batch_size=settings.batch_size, seq_len=seq_len, optimizer=optimizer,
                                      extra_options=settings.extra_options())
        _CACHE[key] = (stats, time.perf_counter() - t)
    return _CACHE[key]


def make_row(settings: Settings, experiment: str, model: str, config, seq_len: int, optimizer: Optional[str],
             stats, compile_s: float, **extra: Any) -> Row:
    fields = lambda *names: {k: getattr(config, k) for k in names}  # noqa: E731
    row: Row = {"experiment": experiment, "model": model, "seq_len": seq_len, "n_layers": config.n_layers,
                "n_hashes": config.n_hashes if config.attention == "lsh" else None, "batch_size": settings.batch_size,
                **fields("d_model", "n_heads", "d_ff", "chunk_len", "vocab_size", "dropout", "dtype"),
                "optimizer": optimizer or "none",
                **fields("attention", "reversible", "ff_chunk_len", "output_chunk_len", "sequential_rounds",
                         "sequential_heads", "scan_layers"),
                **stats.to_dict(), "peak_mib": round(stats.peak_bytes / MIB, 3),
                "activation_mib": round(stats.activation_bytes / MIB, 3), "floor_mib": round(stats.floor_bytes / MIB, 3),
                "peak_over_floor": round(stats.peak_bytes / stats.floor_bytes, 4), "compile_s": round(compile_s, 2),
                **extra}
    return output.stamp(row, settings.command)


def measure_row(settings: Settings, experiment: str, model: str, *, progress: str, seq_len: Optional[int] = None,
                optimizer: Optional[str] = None, use_settings_optimizer: bool = True, **overrides: Any) -> Row:
    """One row: the preset `model` at the settings' sizes with `overrides`, at `seq_len` (default the settings')."""
    seq_len = settings.seq_len if seq_len is None else seq_len
    optimizer = settings.optimizer_arg() if use_settings_optimizer else optimizer
    config = settings.config(model, max_len=seq_len, **overrides)
    stats, compile_s = measure(settings, config, seq_len=seq_len, optimizer=optimizer)
    row = make_row(settings, experiment, model, config, seq_len, optimizer, stats, compile_s)
    log(f"[{experiment} {progress}] {model} l={seq_len} layers={config.n_layers} hashes={config.n_hashes} "
        f"opt={optimizer or 'none'}: peak {row['peak_mib']:,.1f} MiB, activations {row['activation_mib']:,.1f} MiB "
        f"(compiled in {compile_s:.1f} s)")
    return row


def at_seed_setup(settings: Settings, **more: int) -> bool:
    """True when the sizes are the seed's (so its numbers may be drawn beside ours)."""
    need = {**{k: getattr(SEED, k) for k in ("vocab_size", "d_model", "n_heads", "d_ff", "chunk_len", "batch_size",
                                              "seq_len")}, **more}
    return all(getattr(settings, k) == v for k, v in need.items())


def _label(row: Row) -> str:
    return seed.LABELS[row["model"]]


def _write(settings: Settings, name: str, rows: List[Row], markdown: str, plot: Callable[[Any], None]) -> List[Row]:
    """NAME.* in out_dir; `plot(ax)` draws on a new figure's axes (the figure size by NAME)."""
    output.write_outputs(settings.out_dir, output.backend_name(name), rows, markdown, plot, FIGURE_SIZES[name])
    return rows


FIGURE_SIZES = {"variants": (8.5, 5), "hashes": (7.5, 4.8), "layers": (7.5, 4.8), "seqlen": (7.5, 5),
                "timeline": (9, 5), "runtime": (7.5, 4.8), "floor": (8, 4.2), "encoder": (8.5, 5)}
LEGEND = {"fontsize": 8}  # the plots' legends


# ----------------------------------------------------------------------------------------------------------------
# Experiments 1-3: the seed's sweeps


def sweep_cells(settings: Settings, name: str) -> List[Tuple[str, Dict[str, int]]]:
    """The (preset, overrides) each of the seed's three experiments measures."""
    return {"variants": [(m, {}) for m in settings.models],
            "hashes": [("reformer", {"n_hashes": n}) for n in settings.hash_sweep],
            "layers": [(m, {"n_layers": n}) for m in ("reformer", "transformer") for n in settings.layer_sweep]}[name]


def seed_figure(settings: Settings, name: str, model: str, overrides: Dict[str, int]) -> Optional[int]:
    """The seed's figure (MB) of a cell, where the sizes are the seed's."""
    if name == "variants":
        return seed.VARIANTS_MB.get(model) if at_seed_setup(settings, n_layers=6, n_hashes=8) else None
    if name == "hashes":
        return seed.HASHES_MB.get(overrides["n_hashes"]) if at_seed_setup(settings, n_layers=6) else None
    return seed.LAYERS_MB[model].get(overrides["n_layers"]) if at_seed_setup(settings, n_hashes=8) else None


OURS_OVER_SEED = (lambda r: r["peak_mib"] / r["seed_mb"] if r["seed_mb"] else None, "ours / seed", ".2f")
SWEEP_TABLES = {
    "variants": ("# Experiment 1: the four variants\n\n", [
        (_label, "model", "s"), ("peak_bytes", "peak MiB", "mib"), ("param_bytes", "parameters", "mib"),
        (lambda r: r["param_bytes"], "gradients", "mib"), ("optimizer_state_bytes", "optimizer state", "mib"),
        ("batch_bytes", "batch", "mib"), ("activation_bytes", "activations + temporaries", "mib"),
        ("seed_mb", "seed (PyTorch, fp16) MB", ""), OURS_OVER_SEED]),
    "hashes": ("# Experiment 2: Reformer memory against hash rounds\n\n", [
        ("n_hashes", "hash rounds", ""), ("peak_bytes", "peak MiB", "mib"),
        ("activation_bytes", "activations + temporaries MiB", "mib"), ("temp_bytes", "XLA temp MiB", "mib"),
        ("seed_mb", "seed MB", ""), OURS_OVER_SEED]),
    "layers": ("# Experiment 3: memory against the number of layers\n\n", [
        (_label, "model", "s"), ("n_layers", "layers", ""), ("peak_bytes", "peak MiB", "mib"),
        ("activation_bytes", "activations + temporaries MiB", "mib"), ("param_bytes", "parameters MiB", "mib"),
        ("seed_mb", "seed MB", ""), OURS_OVER_SEED]),
}


def run_sweep(settings: Settings, name: str) -> List[Row]:
    cells = sweep_cells(settings, name)
    rows = []
    for i, (model, overrides) in enumerate(cells):
        row = measure_row(settings, name, model, progress=f"{i + 1}/{len(cells)}", **overrides)
        row["seed_mb"] = seed_figure(settings, name, model, overrides)
        rows.append(row)
    title, columns = SWEEP_TABLES[name]
    plot = {"variants": _plot_variants, "hashes": _plot_hashes, "layers": _plot_layers}[name]
    return _write(settings, name, rows, title + output.markdown_table(rows, columns), lambda ax: plot(ax, settings, rows))


def _plot_variants(ax, settings: Settings, rows: List[Row]) -> None:
    names = [_label(r) for r in rows]
    bottom = [0.0] * len(rows)
    for label, key, color in (("parameters", "param_bytes", "#4c72b0"), ("gradients", "param_bytes", "#55a868"),
                              ("optimizer state", "optimizer_state_bytes", "#8172b2"),
                              ("batch", "batch_bytes", "#937860"),
                              ("activations + temporaries", "activation_bytes", "#dd8452")):
        vals = [r[key] / MIB for r in rows]
        ax.bar(names, vals, bottom=bottom, label=label, color=color, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, r in enumerate(rows):
        ax.text(x, r["peak_mib"], f"{r['peak_mib']:,.0f}", ha="center", va="bottom", fontsize=9)
    seed_x = [x for x, r in enumerate(rows) if r["seed_mb"]]
    if seed_x:
        ax.scatter(seed_x, [rows[x]["seed_mb"] for x in seed_x], marker="_", s=900, color="black", linewidths=2.5,
                   zorder=5, label="seed (PyTorch hooks, fp16)")
    output.finish(ax, f"Experiment 1: peak memory, length {settings.seq_len}, batch {settings.batch_size}, "
                      f"{settings.n_layers} layers, {settings.n_hashes} hashes ({settings.dtype}, XLA compile-time)",
                  ylabel="peak memory of one training step (MiB)", legend=LEGEND, grid={"axis": "y"})


def _plot_hashes(ax, settings: Settings, rows: List[Row]) -> None:
    xs = [r["n_hashes"] for r in rows]
    ax.plot(xs, [r["peak_mib"] for r in rows], "o-", label="peak (ours, XLA)")
    ax.plot(xs, [r["activation_mib"] for r in rows], "s--", label="activations + temporaries (ours)")
    sx = sorted(seed.HASHES_MB) if any(r["seed_mb"] for r in rows) else []
    if sx:
        ax.plot(sx, [seed.HASHES_MB[n] for n in sx], "k^:", label="seed peak (PyTorch, fp16)")
    ax.set_xticks(sorted(set(xs) | set(sx)), [str(x) for x in sorted(set(xs) | set(sx))])
    ax.set_ylim(bottom=0)
    output.finish(ax, f"Experiment 2: Reformer LM against hash rounds (length {settings.seq_len}, "
                      f"{settings.n_layers} layers)", xlabel="hash rounds (n_hashes)", ylabel="memory (MiB)",
                  legend=LEGEND, grid={})


def _plot_layers(ax, settings: Settings, rows: List[Row]) -> None:
    for model, color in (("reformer", "#dd8452"), ("transformer", "#4c72b0")):
        mine = [r for r in rows if r["model"] == model]
        ax.plot([r["n_layers"] for r in mine], [r["peak_mib"] for r in mine], "o-", color=color,
                label=f"{seed.LABELS[model]} (ours, XLA)")
        ref = seed.LAYERS_MB[model] if any(r["seed_mb"] for r in rows) else {}
        if ref:
            ax.plot(sorted(ref), [ref[n] for n in sorted(ref)], "^:", color=color, markeredgecolor="black",
                    label=f"{seed.LABELS[model]} (seed, fp16)")
    ax.set_xticks(sorted(settings.layer_sweep))
    ax.set_ylim(bottom=0)
    output.finish(ax, f"Experiment 3: peak memory against depth (length {settings.seq_len}, {settings.n_hashes} "
                      "hashes)", xlabel="layers (n_layers)", ylabel="peak memory (MiB)", legend=LEGEND,
                  grid={"which": "both"})


# ----------------------------------------------------------------------------------------------------------------
# Table 5, the timeline, runtime memory and the floor targets


def fit_exponent(lengths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(lengths): the growth exponent p in values ~ length^p."""
    if len(lengths) != len(values) or len(lengths) < 2:
        raise ValueError(f"fit_exponent needs at least two (length, value) pairs; got {len(lengths)} lengths and "
                         f"{len(values)} values.")
    if min(lengths) <= 0 or min(values) <= 0:
        raise ValueError("fit_exponent needs positive lengths and values (it fits on a log-log scale).")
    xs, ys = [math.log(x) for x in lengths], [math.log(y) for y in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_exponent needs at least two distinct lengths.")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def run_seqlen(settings: Settings) -> List[Row]:
    optimizer = settings.optimizer_arg(settings.seqlen_optimizer)
    jobs = [(m, length) for m in settings.models for length in settings.lengths]
    rows = [measure_row(settings, "seqlen", model, progress=f"{i + 1}/{len(jobs)}", seq_len=length,
                        optimizer=optimizer, use_settings_optimizer=False) for i, (model, length) in enumerate(jobs)]
    exponents = []
    for model in settings.models:
        mine = [r for r in rows if r["model"] == model]
        lengths, acts = [r["seq_len"] for r in mine], [r["activation_bytes"] for r in mine]
        fitted = fit_exponent(lengths, acts) if len(mine) >= 2 else None
        last = fit_exponent(lengths[-2:], acts[-2:]) if len(mine) >= 2 else None
        fit = {"fitted_exponent": fitted, "last_pair_exponent": last,
               "table5_exponent": seed.TABLE5_EXPONENT[mine[0]["attention"]]}
        for r in mine:
            r.update(fit)
        exponents.append({"model": model, **fit, "lengths": f"{lengths[0]}-{lengths[-1]}"})
        log(f"[seqlen] {model}: activation memory ~ length^{fitted:.2f} (last pair {last:.2f}); Table 5: "
            f"{fit['table5_exponent']}")
    md = ["# Table 5: activation memory against sequence length\n",
          f"Optimizer: {settings.seqlen_optimizer} (activations = peak - parameters - gradients - optimizer state - "
          "batch). Exponent p fitted by least squares on log(activations) against log(length).\n",
          output.markdown_table(exponents, [
              (_label, "model", "s"), ("lengths", "lengths", "s"), ("fitted_exponent", "fitted p (all lengths)", ".2f"),
              ("last_pair_exponent", "p (last two lengths)", ".2f"), ("table5_exponent", "Table 5", "")]),
          "\nActivation memory (MiB):\n",
          output.markdown_table(
              [{"seq_len": length, **{m: next(r["activation_bytes"] for r in rows
                                              if r["model"] == m and r["seq_len"] == length)
                                      for m in settings.models}} for length in settings.lengths],
              [("seq_len", "length", "")] + [(m, seed.LABELS[m], "mib") for m in settings.models])]

    def plot(ax):
        for model in settings.models:
            mine = [r for r in rows if r["model"] == model]
            ax.plot([r["seq_len"] for r in mine], [r["activation_mib"] for r in mine], "o-",
                    label=f"{seed.LABELS[model]}: p = {mine[0]['fitted_exponent']:.2f} "
                          f"(Table 5: {mine[0]['table5_exponent']})")
        output.finish(ax, f"Table 5: activation memory against length ({settings.n_layers} layers, "
                          f"{settings.n_hashes} hashes, batch {settings.batch_size})", xlog=2, ylog=10,
                      xlabel="sequence length (tokens)", ylabel="activation memory (MiB)", legend=LEGEND,
                      grid={"which": "both"})

    return _write(settings, "seqlen", rows, "\n".join(md), plot)


def run_timeline(settings: Settings) -> List[Row]:
    from reformer_jax.memory import compile_train_step
    from reformer_jax.xla import timeline

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
            _, stats = compile_train_step(config, batch_size=settings.batch_size, seq_len=settings.seq_len,
                                          optimizer=settings.optimizer_arg(), extra_options=options)
            compile_s = time.perf_counter() - t
            info = timeline.analyze_dump(dump)
            rows.append(make_row(settings, "timeline", model, config, settings.seq_len, settings.optimizer_arg(),
                                 stats, compile_s, **info))
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
              (_label, "model", "s"), ("scan_layers", "scan_layers", ""),
              ("peak_bytes", "memory_analysis peak MiB", "mib"),
              ("xla_live_peak_bytes", "XLA live-range peak MiB", "mib"),
              ("curve_peak_bytes", "rebuilt curve max MiB", "mib"), ("schedule_len", "schedule steps", ""),
              (lambda r: r["peak_by_scope"][0]["scope"] if r["peak_by_scope"] else None, "largest scope at peak",
               "s")])]
    for r in rows:
        md.append(f"\n## {_label(r)}: XLA's peak by named scope\n")
        md.append(output.markdown_table(r["peak_by_scope"][:10], [("scope", "scope (pass)", "s"),
                                                                  ("bytes", "MiB at peak", "mib")]))

    def plot(ax):
        for r in rows:
            ax.plot(r["curve_x"], [b / MIB for b in r["curve_bytes"]], lw=1.3,
                    label=f"{_label(r)} (peak {r['peak_mib']:,.0f} MiB)")
        output.finish(ax, f"Live memory across one training step (XLA schedule, length {settings.seq_len}, "
                          f"{settings.n_layers} layers)", legend=LEGEND, grid={}, ylabel="live bytes (MiB)",
                      xlabel="position in the step's schedule (0 = start of forward, 1 = end of update)")

    return _write(settings, "timeline", rows, "\n".join(md), plot)


def run_runtime(settings: Settings) -> List[Row]:
    import jax

    from reformer_jax.xla.memory_analysis import MemoryStats

    rows = []
    backend = jax.default_backend()
    profile_dir = os.path.join(settings.out_dir, f"runtime_profiles_{backend}")
    for i, model in enumerate(settings.runtime_models):
        config = settings.config(model)
        profile_path = None if backend == "cpu" else os.path.join(profile_dir, f"{model}.prof.gz")
        if profile_path:
            os.makedirs(profile_dir, exist_ok=True)
        log(f"[runtime {i + 1}/{len(settings.runtime_models)}] {model}: compiling and running "
            f"{settings.runtime_steps} steps in a fresh process ...")
        t = time.perf_counter()
        result = real_steps(settings, config, settings.seq_len, settings.runtime_steps, f"runtime worker for {model}",
                            profile_path)
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
              (_label, "model", "s"), ("peak_bytes", "compile-time peak MiB", "mib"),
              ("runtime_peak_bytes", "runtime MiB", "mib"), ("runtime_over_compile", "runtime / compile-time", ".2f"),
              (lambda r: max(r["step_s"]), "slowest step s", ".1f"), ("runtime_source", "source", "s")])]

    def plot(ax):
        xs = list(range(len(rows)))
        ax.bar([x - 0.2 for x in xs], [r["peak_mib"] for r in rows], width=0.4, label="compile-time peak (XLA)")
        ax.bar([x + 0.2 for x in xs], [r["runtime_peak_mib"] for r in rows], width=0.4,
               label=f"runtime ({'process RSS' if backend == 'cpu' else 'peak_bytes_in_use'})")
        ax.set_xticks(xs, [_label(r) for r in rows])
        output.finish(ax, f"Compile-time prediction against runtime ({backend}, length {settings.seq_len})",
                      ylabel="memory (MiB)", legend=LEGEND, grid={"axis": "y"})

    return _write(settings, "runtime", rows, "\n".join(md), plot)


def time_train_steps(config, *, batch_size: int, seq_len: int, steps: int) -> float:
    """Median seconds of `steps` real training steps (after one warm-up step; compilation excluded)."""
    import jax
    import numpy as np

    from reformer_jax.training.data import lm_batch
    from reformer_jax.training.step_builder import build_train_step

    built = build_train_step(config)
    state = built.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len + 1), 3, config.vocab_size)
    batch = jax.device_put(lm_batch(np.asarray(tokens)))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        state, metrics = built.step(state, batch, jax.random.key(2))
        jax.block_until_ready(metrics)
        if i:  # the first call compiles
            times.append(time.perf_counter() - t)
    return float(sorted(times)[len(times) // 2])


def real_steps(settings: Settings, config, seq_len: int, steps: int, what: str,
               profile_path: Optional[str] = None) -> Dict[str, Any]:
    """`steps` real training steps of `config` in a fresh process (`benchmarks.runtime`); its parsed result."""
    from benchmarks.runtime import parse_result

    spec = {"config": config.to_dict(), "batch_size": settings.batch_size, "seq_len": seq_len,
            "optimizer": settings.optimizer_arg(), "steps": steps, "extra_options": settings.extra_options(),
            "profile_path": profile_path}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime", json.dumps(spec)], cwd=cli.REPO_ROOT,
                          env=cli.worker_env(), capture_output=True, text=True, timeout=settings.runtime_timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse_result(proc.stdout)


def run_floor(settings: Settings) -> List[Row]:
    rows: List[Row] = []

    def target(number: str, criterion: str, measured: float, limit: Optional[float], subject: Row, detail: str,
               **more: Any) -> None:
        status = targets.status(measured, limit)
        rows.append({**subject, "experiment": "floor", "target": number, "criterion": criterion,
                     "measured": measured, "limit": limit, "status": status, "detail": detail, **more})
        log(f"[floor {number}] {criterion}: measured {measured:,.3f} (limit {limit}) -> {status}")

    def mib(row: Row) -> str:
        return f"{row['peak_mib']:,.1f} MiB"

    def reformer(progress: str, **overrides: Any) -> Row:
        return measure_row(settings, "floor", "reformer", progress=progress, **overrides)

    lo, hi = settings.floor_hashes
    a, b = reformer("1", n_hashes=lo), reformer("1", n_hashes=hi)
    a_all, b_all = (reformer("1", n_hashes=n, sequential_rounds=False) for n in (lo, hi))
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
    a, b = (reformer("2", n_layers=n, optimizer=None, use_settings_optimizer=False) for n in (lo, hi))
    a_full, b_full = reformer("2", n_layers=lo), reformer("2", n_layers=hi)
    target("2", f"Reformer activations (optimizer=None) at {hi} layers <= 1.05 x at {lo} layers",
           b["activation_bytes"] / a["activation_bytes"], 1.05, b,
           f"{b['activation_mib']:,.1f} / {a['activation_mib']:,.1f} MiB (full step with the optimizer: peak "
           f"{mib(b_full)} / {mib(a_full)}, activations and temporaries {b_full['activation_mib']:,.1f} / "
           f"{a_full['activation_mib']:,.1f} MiB)")

    r, t = reformer("3"), measure_row(settings, "floor", "transformer", progress="3")
    target("3", "Reformer peak <= 0.05 x Transformer peak", r["peak_bytes"] / t["peak_bytes"], 0.05, r,
           f"{mib(r)} / {mib(t)}")
    for i, length in enumerate(settings.floor_lengths):
        row = reformer("4", seq_len=length)
        target(f"4{'abcdefgh'[i]}", f"Reformer peak <= 2 x floor at length {length}", row["peak_over_floor"], 2.0,
               row, f"peak {mib(row)}, floor {row['floor_mib']:,.1f} MiB")
    row = reformer("5", seq_len=settings.floor_long_len)
    target("5", f"Reformer compile-time peak at length {settings.floor_long_len} <= 16 GiB",
           row["peak_bytes"] / 2**30, FLOOR_PEAK_LIMIT_BYTES / 2**30, row,
           f"peak {row['peak_bytes'] / 2**30:,.2f} GiB = {row['peak_over_floor']:.2f} x the floor "
           f"{row['floor_bytes'] / 2**30:,.2f} GiB")
    if settings.floor_real_len:
        length = settings.floor_real_len
        log(f"[floor 5r] one real training step at length {length} in a fresh process ...")
        result = real_steps(settings, settings.config("reformer", max_len=length), length, 1,
                            f"the real step at length {length}")
        real = reformer("5r", seq_len=length)
        step_s = max(result["step_s"])
        target("5r", f"One real training step at length {length} on this machine: seconds (runtime memory beside "
                     "the prediction)", step_s, None, real,
               f"{step_s:,.1f} s; {result['runtime_source']} {result['runtime_peak_bytes'] / MIB:,.1f} MiB against "
               f"the compile-time peak {mib(real)}", runtime_peak_bytes=result["runtime_peak_bytes"],
               runtime_source=result["runtime_source"], step_s=result["step_s"])

    columns = [("target", "target", "s"), ("criterion", "criterion", "s"), ("measured", "measured", ".3f"),
               ("limit", "limit", "g")]
    md = ["# Memory-floor targets, measured\n",
          "floor = parameters + gradients + optimizer state + batch + 4 x batch x length x d_model x 4 bytes. "
          "'short' means the target is not met. Defaults: hash rounds and heads one at a time "
          "(sequential_rounds, sequential_heads).\n",
          output.markdown_table(rows, columns + [("detail", "values", "s"), ("status", "status", "s")])]
    limited = [r for r in rows if r["limit"] is not None]

    def plot(ax):
        xs = list(range(len(limited)))
        ax.bar(xs, [r["measured"] / r["limit"] for r in limited],
               color=["#55a868" if r["status"] == "pass" else "#c44e52" for r in limited])
        ax.set_xticks(xs, [f"target {r['target']}" for r in limited])
        ax.axhline(1.0, color="black", lw=1)
        output.finish(ax, "Memory-floor targets: measured value over its limit", ylog=10,
                      xlabel="target (green: pass, red: short)", ylabel="measured / limit (log; <= 1 passes)",
                      grid={"axis": "y", "which": "both"})

    _write(settings, "floor", rows, "\n".join(md), plot)
    print(output.markdown_table(rows, columns + [("status", "pass/short", "s")]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The encoder: each preset as a bidirectional classifier (a chunk ahead as one behind, a padded batch, ListOps'
# 10 classes), the training step of `main.py --task=classify`, beside the causal language model.

ENCODER = dict(causal=False, n_chunks_after=1, head="classification", num_labels=10)


def run_encoder(settings: Settings) -> List[Row]:
    cells = ([(m, {}) for m in settings.models] + [(m, ENCODER) for m in settings.models]
             + [("reformer", {**ENCODER, "n_hashes": n}) for n in settings.floor_hashes if n != settings.n_hashes])
    rows = []
    for i, (model, overrides) in enumerate(cells):
        row = measure_row(settings, "encoder", model, progress=f"{i + 1}/{len(cells)}", **overrides)
        row["head"] = "classifier (bidirectional)" if overrides else "language model (causal)"
        rows.append(row)
    classifiers = [r for r in rows if r["head"].startswith("classifier")]
    transformer = next((r["peak_bytes"] for r in classifiers if r["model"] == "transformer"), None)
    for row in rows:
        row["over_transformer_classifier"] = row["peak_bytes"] / transformer if transformer else None
    by_rounds = {r["n_hashes"]: r["peak_bytes"] for r in classifiers if r["model"] == "reformer"}
    low, high = settings.floor_hashes
    lines = ["# The encoder: bidirectional classifiers beside the causal language models\n",
             output.markdown_table(rows, [
                 (lambda r: _label(r).replace(" LM", ""), "model", "s"), ("head", "head", "s"),
                 ("n_hashes", "hash rounds", ""),
                 ("peak_bytes", "peak MiB", "mib"), ("activation_bytes", "activations + temporaries MiB", "mib"),
                 ("over_transformer_classifier", "/ Transformer classifier", ".3f")])]
    if low in by_rounds and high in by_rounds:
        lines.append(f"\nReformer classifier: {high} hash rounds / {low}: {by_rounds[high] / by_rounds[low]:.3f} "
                     "(peak bytes).\n")

    def plot(ax):
        names = [f"{_label(r).replace(' LM', '')}\n{'classifier' if r['head'].startswith('classifier') else 'LM'}"
                 + (f"\nr={r['n_hashes']}" if r["n_hashes"] and r["n_hashes"] != settings.n_hashes else "")
                 for r in rows]
        ax.bar(range(len(rows)), [r["peak_bytes"] / MIB for r in rows],
               color=["#c44e52" if r["head"].startswith("classifier") else "#4c72b0" for r in rows])
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        output.finish(ax, f"Training-step peak, causal LM (blue) and bidirectional classifier (red), "
                          f"l={settings.seq_len}", ylog=10, ylabel="peak MiB (compile time, log scale)",
                      grid={"axis": "y", "which": "both"})

    return _write(settings, "encoder", rows, "\n".join(lines), plot)


RUNNERS: Dict[str, Callable[[Settings], List[Row]]] = {
    "variants": lambda s: run_sweep(s, "variants"), "hashes": lambda s: run_sweep(s, "hashes"),
    "layers": lambda s: run_sweep(s, "layers"), "seqlen": run_seqlen, "timeline": run_timeline, "floor": run_floor,
    "runtime": run_runtime, "encoder": run_encoder,
    "tpu": lambda s: tpu_memory.run_tpu(s, cpu_stats=lambda config: measure(s, config, seq_len=s.seq_len,
                                                                            optimizer=s.optimizer_arg())[0],
                                        seed_sizes=at_seed_setup(s)),
}


def run(settings: Settings) -> Dict[str, List[Row]]:
    """Run the chosen experiment(s); returns {experiment: rows}."""
    if settings.compilation_cache_dir:
        from reformer_jax.xla.compilation_cache import enable_compilation_cache

        enable_compilation_cache(settings.compilation_cache_dir)
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


if __name__ == "__main__":
    define_flags()
    cli.main(settings_from_flags, run)
