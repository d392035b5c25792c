"""`benchmarks.memory --experiment=tpu`: the training step compiled by the TPU compiler (libtpu) on this machine.

    python -m benchmarks.memory --experiment=tpu                          # every part below
    python -m benchmarks.memory --experiment=tpu --tpu_parts=seed --topologies=v5e:1x1 --tpu_dtypes=float32

Parts (--tpu_parts), each its own results file, rows merged by key so a part rerun for some slices keeps the rest:
  seed     tpu.*: the variants at the seed's setup on one chip of each --topologies generation, for each
           --tpu_dtypes compute dtype, beside XLA:CPU's figure of the same step and the seed's GPU figure
  longest  tpu_longest.*: the longest power-of-two sequence each variant fits, then the longest multiple of the
           search step (reformer_jax.xla.longest_fit), on one chip (--topologies) and with fsdp over the slices of
           --tpu_fsdp_slices (one sequence per chip: batch = chips x --batch_size)
  long     tpu_long.*: the Reformer at --floor_long_len tokens per sequence on --tpu_long_slice, fsdp over its chips
  breakdown  tpu_breakdown.*: the Reformer's step at each --tpu_breakdown_lengths on one --tpu_breakdown_topology
           chip and on XLA:CPU, each peak split into parts from the compiler's own buffer assignment
           (reformer_jax.training.step_builder.step_breakdown), side by side, with the heap's live bytes across
           the schedule

A row fits when the TPU compiler accepts the program and the compiled peak is within the HBM the compiler lets a
program use (`reformer_jax.xla.tpu.usable_hbm_bytes`, libtpu's own figure: 15.75 GiB of a v5e chip's 16). The
compiler alone is not the judge: it accepts some programs whose own memory analysis exceeds that figure.
`settings` below is a `benchmarks.memory.Settings`.
"""

from __future__ import annotations

import fcntl
import math
import os
import shlex
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import output, seed
from benchmarks.cli import FlagError, log
from reformer_jax.xla import buffers
from reformer_jax.xla.longest_fit import LongestFit, Probe, longest_fitting_length
from benchmarks.output import MIB, Row

PARTS = ("seed", "longest", "long", "breakdown")
GENERATIONS = ("v4", "v5e", "v5p", "v6e")  # table order
COLORS = {"v4": "#4c72b0", "v5e": "#dd8452", "v5p": "#55a868", "v6e": "#c44e52"}
HBM = ("usable_hbm_mib", "usable HBM MiB", ",.0f")
COMMAND = ("row_command", "command", "code")
COLUMNS = {
    "tpu": [("model", "variant", "s"), ("topology", "topology", "s"), ("tpu_device_kind", "device kind", "s"),
            ("dtype", "compute", "s"), HBM, ("tpu_peak_mib", "TPU peak MiB", ",.1f"),
            ("cpu_peak_mib", "XLA:CPU peak MiB", ",.1f"), ("seed_gpu_mb", "seed GPU MB", ""), ("fits", "fits", ""),
            ("tpu_compile_s", "compile s", ".1f"), COMMAND],
    "tpu_longest": [("model", "variant", "s"), ("topology", "slice", "s"), ("mesh", "mesh", "s"),
                    ("batch_size", "batch", "d"), ("tpu_device_kind", "device kind", "s"), HBM,
                    ("power_of_two", "longest 2^k", ",d"), ("power_of_two_peak_mib", "its peak MiB", ",.1f"),
                    ("longest", "longest (chunk steps)", ",d"), ("longest_peak_mib", "its peak MiB", ",.1f"),
                    ("first_refused", "next refused", ",d"), ("step", "step", ",d"), ("probes", "compiles", "d"),
                    ("search_s", "search s", ".0f"), COMMAND],
    "tpu_long": [("model", "variant", "s"), ("topology", "slice", "s"), ("mesh", "mesh", "s"),
                 ("batch_size", "batch", "d"), ("seq_len", "tokens per sequence", ",d"),
                 ("tpu_device_kind", "device kind", "s"), HBM, ("tpu_peak_mib", "peak per chip MiB", ",.1f"),
                 ("tpu_required_mib", "refused: temporaries MiB", ",.1f"), ("fits", "fits", ""),
                 ("tpu_compile_s", "compile s", ".1f"), COMMAND],
}
TITLES = {"tpu": "The variants at the seed's setup, compiled for one TPU chip",
          "tpu_longest": "The longest sequence per chip", "tpu_long": "A very long sequence on a TPU slice with fsdp"}
# The flags each part ignores, left out of its rows' commands.
IGNORED = {"seed": ("tpu_fsdp_slices", "tpu_long_slice", "floor_long_len", "tpu_max_length"),
           "longest": ("tpu_dtypes", "tpu_long_slice", "floor_long_len"),
           "long": ("topologies", "tpu_fsdp_slices", "tpu_max_length", "tpu_dtypes", "models"),
           "breakdown": ("topologies", "tpu_fsdp_slices", "tpu_max_length", "tpu_dtypes", "models",
                         "tpu_long_slice", "floor_long_len")}


def check_topologies(flag: str, values: Sequence[str], *, one_chip: bool) -> Tuple[str, ...]:
    """The TPU slice names of a flag; FlagError for an unknown one (or, `one_chip`, one of several chips)."""
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


def row_command(settings, **flag_values: Any) -> str:
    """The run's command narrowed to one row: `flag_values` replace (or add) those flags."""
    drop = tuple(flag_values) + IGNORED[flag_values["tpu_parts"]]
    words = [w for w in shlex.split(settings.command) if not any(w.startswith(f"--{name}=") for name in drop)]
    return " ".join(words + [f"--{name}={value}" for name, value in flag_values.items()])


def _compile(settings, model: str, topology: str, *, seq_len: int, batch_size: int, dtype: str,
             mesh: Optional[str]) -> Tuple[Any, Optional[str], Probe, float]:
    """(MemoryStats or None, the refusal's first line or None, the Probe, compile seconds) of one TPU compile. A
    compile error other than the compiler's out-of-memory refusal is raised: it is a bug, not a measurement."""
    from reformer_jax.memory import compile_train_step
    from reformer_jax.xla import tpu

    config = settings.config(model, max_len=seq_len, dtype=dtype)
    start = time.perf_counter()
    try:
        _, stats = compile_train_step(config, batch_size=batch_size, seq_len=seq_len,
                                      optimizer=settings.optimizer_arg(), topology=topology, mesh=mesh)
    except tpu.TopologyError:
        raise
    except Exception as error:
        refusal = tpu.hbm_refusal(error)
        if refusal is None and "RESOURCE_EXHAUSTED" not in str(error):
            raise
        seconds, reason = time.perf_counter() - start, str(error).strip().splitlines()[0][:300]
        if refusal is None:  # out of memory in a wording without figures
            return None, reason, Probe(seq_len, False), seconds
        return None, reason, Probe(seq_len, False, refusal.required_bytes, refusal.available_bytes), seconds
    return stats, None, Probe(seq_len, stats.fits, stats.peak_bytes), time.perf_counter() - start


def _base_row(settings, model: str, topology: str, dtype: str, stats) -> Row:
    from importlib import metadata

    from reformer_jax.xla import tpu

    generation = tpu.parse_topology(topology)[0]
    try:
        libtpu = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        libtpu = None
    row: Row = {"model": model, "topology": topology, "generation": generation, "chips": tpu.chips(topology),
                "dtype": dtype, "tpu_device_kind": stats.device_kind if stats else None,
                "hbm_bytes": tpu.hbm_bytes(topology), "hbm_mib": tpu.hbm_bytes(topology) / MIB,
                "usable_hbm_bytes": tpu.usable_hbm_bytes(topology),
                "usable_hbm_mib": tpu.usable_hbm_bytes(topology) / MIB,
                "hbm_source": tpu.HBM_PER_CHIP[generation][1],
                **{k: getattr(settings, k) for k in ("d_model", "n_heads", "d_ff", "n_layers", "n_hashes", "chunk_len",
                                                     "vocab_size", "optimizer")}, "libtpu_version": libtpu}
    return output.stamp(row, settings.command)


def seed_rows(settings, cpu_stats: Callable[[Any], Any], seed_sizes: bool) -> List[Row]:
    """The variants at --seq_len x --batch_size on one chip of each --topologies slice, per --tpu_dtypes;
    `cpu_stats(config)`: XLA:CPU's MemoryStats of the same step; `seed_sizes`: the sizes are the seed's."""
    rows = []
    for topology in settings.topologies:
        for dtype in settings.tpu_dtypes:
            for model in settings.models:
                stats, refused, _, seconds = _compile(settings, model, topology, seq_len=settings.seq_len,
                                                      batch_size=settings.batch_size, dtype=dtype, mesh=None)
                cpu = cpu_stats(settings.config(model, dtype=dtype))
                row = _base_row(settings, model, topology, dtype, stats)
                row.update({"seq_len": settings.seq_len, "batch_size": settings.batch_size,
                            "tpu_peak_bytes": stats.peak_bytes if stats else None,
                            "tpu_peak_mib": round(stats.peak_bytes / MIB, 1) if stats else None,
                            "cpu_peak_mib": round(cpu.peak_bytes / MIB, 1),
                            "seed_gpu_mb": seed.VARIANTS_MB.get(model) if seed_sizes else None,
                            "fits": bool(stats and stats.fits), "tpu_refused": refused,
                            "tpu_compile_s": round(seconds, 1),
                            "row_command": row_command(settings, experiment="tpu", tpu_parts="seed",
                                                       topologies=topology, tpu_dtypes=dtype, models=model)})
                log(f"  [tpu seed] {model} {dtype} on {topology}: "
                    + (f"{row['tpu_peak_mib']:,.1f} MiB" if stats else f"refused ({refused})")
                    + f" (XLA:CPU {row['cpu_peak_mib']:,.1f} MiB; compiled in {seconds:.0f} s)")
                rows.append(row)
                write(settings, "tpu", [row])
    return rows


# LSH's default bucket count, 2 x length / chunk, is split into two even factors near its square root (trax's
# rule); where length / chunk has no such split (an odd multiple of the chunk, or twice a prime), the hash has
# n_buckets / 2 columns and its logits [length x rounds x n_buckets / 2] dwarf everything else, so memory jumps
# up and down between neighbouring multiples of the chunk. On multiples of 32 chunks the count is 64 k, which
# always splits with a factor of at least 32: memory grows smoothly there, and the search can bisect.
LSH_STEP_CHUNKS = 32


def search_step(settings, model: str) -> int:
    """The granularity of the longest-length search: the chunk length for full attention, LSH_STEP_CHUNKS chunks
    for the variants with LSH attention."""
    return settings.chunk_len * (LSH_STEP_CHUNKS if settings.config(model).uses("lsh") else 1)


def longest_rows(settings) -> List[Row]:
    """For each variant: the longest sequence one chip of each --topologies slice fits, and each
    --tpu_fsdp_slices slice with fsdp over all its chips (one sequence per chip)."""
    from reformer_jax.xla import tpu

    rows = []
    layouts = [(t, None) for t in settings.topologies] + [(t, f"fsdp:{tpu.chips(t)}")
                                                           for t in settings.tpu_fsdp_slices]
    for topology, mesh in layouts:
        batch = settings.batch_size * tpu.chips(topology)
        for model in settings.models:
            kinds: Dict[str, str] = {}
            start = time.perf_counter()

            def probe(length: int) -> Probe:
                stats, _, result, seconds = _compile(settings, model, topology, seq_len=length, batch_size=batch,
                                                     dtype=settings.dtype, mesh=mesh)
                if stats:
                    kinds["device_kind"] = stats.device_kind
                log(f"  [tpu longest] {model} on {topology} ({mesh or 'one chip'}) at {length:,}: "
                    + ("fits" if result.fits else "does not fit")
                    + (f", {result.peak_bytes / MIB:,.1f} MiB" if result.peak_bytes else "") + f" ({seconds:.0f} s)")
                return result

            step = search_step(settings, model)
            found = longest_fitting_length(probe, start=max(2 ** int(math.floor(math.log2(settings.seq_len))), step),
                                           step=step, capacity=tpu.usable_hbm_bytes(topology),
                                           max_length=settings.tpu_max_length)
            rows.append(_longest_row(settings, model, topology, mesh, batch, found, kinds.get("device_kind"),
                                     time.perf_counter() - start))
            rows[-1]["step"] = step
            write(settings, "tpu_longest", rows[-1:])  # a search takes minutes: keep each as it ends
    return rows


def _longest_row(settings, model, topology, mesh, batch, found: LongestFit, kind, seconds) -> Row:
    row = _base_row(settings, model, topology, settings.dtype, None)
    capacities = [p.capacity_bytes for p in found.probes if p.capacity_bytes]
    mib = lambda b: round(b / MIB, 1) if b else None  # noqa: E731
    flags = dict(experiment="tpu", tpu_parts="longest", models=model)
    flags.update(dict(topologies=topology, tpu_fsdp_slices="") if mesh is None else
                 dict(topologies="", tpu_fsdp_slices=topology))
    row.update({"tpu_device_kind": kind, "mesh": mesh or "one chip", "batch_size": batch,
                "compiler_hbm_bytes": capacities[-1] if capacities else None,
                "power_of_two": found.power_of_two, "power_of_two_peak_mib": mib(found.peak_at(found.power_of_two)),
                "power_of_two_refused": found.power_of_two_refused, "longest": found.longest,
                "longest_peak_mib": mib(found.peak_at(found.longest)), "first_refused": found.first_refused,
                "probes": len(found.probes), "search_s": round(seconds, 1),
                "probe_lengths": [p.length for p in found.probes], "probe_fits": [p.fits for p in found.probes],
                "probe_peak_bytes": [p.peak_bytes for p in found.probes], "max_length": settings.tpu_max_length,
                "row_command": row_command(settings, **flags)})
    return row


def long_rows(settings) -> List[Row]:
    """The Reformer at --floor_long_len tokens per sequence on --tpu_long_slice, fsdp over every chip."""
    from reformer_jax.xla import tpu

    topology = settings.tpu_long_slice
    mesh, batch = f"fsdp:{tpu.chips(topology)}", settings.batch_size * tpu.chips(topology)
    stats, refused, probe, seconds = _compile(settings, "reformer", topology, seq_len=settings.floor_long_len,
                                              batch_size=batch, dtype=settings.dtype, mesh=mesh)
    row = _base_row(settings, "reformer", topology, settings.dtype, stats)
    row.update({"mesh": mesh, "batch_size": batch, "seq_len": settings.floor_long_len,
                "tpu_peak_bytes": stats.peak_bytes if stats else None,
                "tpu_peak_mib": round(stats.peak_bytes / MIB, 1) if stats else None,
                "fits": bool(stats and stats.fits), "tpu_refused": refused, "tpu_compile_s": round(seconds, 1),
                # a refusal's figure: what the compiler said the temporaries alone need
                "tpu_required_mib": None if stats else round(probe.peak_bytes / MIB, 1),
                "row_command": row_command(settings, experiment="tpu", tpu_parts="long", tpu_long_slice=topology)})
    write(settings, "tpu_long", [row])
    log(f"  [tpu long] reformer x {settings.floor_long_len:,} tokens on {topology} ({mesh}): "
        + (f"{row['tpu_peak_mib']:,.1f} MiB per chip" if stats else f"refused ({refused})"))
    return [row]


def breakdown_rows(settings) -> List[Row]:
    """The Reformer at each --tpu_breakdown_lengths, on one --tpu_breakdown_topology chip and on XLA:CPU: each
    compiled peak in parts (`step_breakdown`), a row per (length, backend)."""
    from reformer_jax.training.step_builder import step_breakdown

    rows = []
    for length in settings.tpu_breakdown_lengths:
        for topology in (None, settings.tpu_breakdown_topology):
            start = time.perf_counter()
            stats, parts = step_breakdown(settings.config("reformer", max_len=length), batch_size=settings.batch_size,
                                          seq_len=length, optimizer=settings.optimizer_arg(), topology=topology)
            row = output.stamp({"model": "reformer", "seq_len": length, "topology": topology or "XLA:CPU",
                                "device_kind": stats.device_kind or "cpu", "peak_bytes": stats.peak_bytes,
                                "heap_bytes": parts.heap_bytes, "heap_in_use_bytes": parts.heap_in_use_bytes,
                                "heap_peak_step": parts.heap_peak_step, "schedule_len": parts.schedule_len,
                                "parts": [{"part": n, "bytes": b} for n, b in parts.parts],
                                "largest": parts.largest, "curve_x": parts.curve_x, "curve_bytes": parts.curve_bytes,
                                "compile_s": round(time.perf_counter() - start, 1)}, settings.command)
            row["row_command"] = row_command(settings, experiment="tpu", tpu_parts="breakdown",
                                             tpu_breakdown_lengths=length)
            log(f"  [tpu breakdown] reformer x {length:,} on {row['topology']}: {stats.peak_bytes / MIB:,.1f} MiB, "
                f"heap {parts.heap_bytes / MIB:,.1f} MiB ({row['compile_s']:.0f} s)")
            rows.append(row)
    every = output.merged(os.path.join(settings.out_dir, "tpu_breakdown.json"), rows,
                          lambda r: (r["seq_len"], r["topology"]))
    write_breakdown(settings.out_dir, sorted(every, key=lambda r: (r["seq_len"], r["topology"] != "XLA:CPU")))
    return rows


def breakdown_markdown(rows: Sequence[Row]) -> str:
    """Per length: the parts of XLA:CPU's peak and the TPU's side by side, and the TPU heap's largest values."""
    md = ["# The Reformer's training step part by part: XLA:CPU and one TPU chip\n\n",
          "Each compiled peak (memory_analysis: arguments + outputs - aliased + temporaries) split into parts from "
          "the compiler's own buffer assignment (`reformer_jax.xla.buffers`): the arguments, then what the heap of "
          "temporaries holds at the step where most of it is in use (tile padding apart), the heap's bytes not in "
          "use then, and what memory_analysis counts beyond the heap. The parts sum to the peak.\n"]
    for length in sorted({r["seq_len"] for r in rows}):
        pair = [r for r in rows if r["seq_len"] == length]
        cpu = next((r for r in pair if r["topology"] == "XLA:CPU"), None)
        tpus = [r for r in pair if r is not cpu]
        sizes = {r["topology"]: {p["part"]: p["bytes"] / MIB for p in r["parts"]} for r in pair}
        table = [{"part": n, **{k: v.get(n, 0.0) for k, v in sizes.items()}}
                 for n in buffers.ordered_parts([list(v.items()) for v in sizes.values()])
                 if max(abs(v.get(n, 0.0)) for v in sizes.values()) >= 0.05]  # none rounds to 0.0 MiB
        table.append({"part": "**peak**", **{r["topology"]: r["peak_bytes"] / MIB for r in pair}})
        for t in table:
            t.update({f"{r['topology']} - XLA:CPU": t[r["topology"]] - t["XLA:CPU"] for r in tpus if cpu})
        columns = [("part", "part", "s")] + [(k, f"{k} MiB", ",.1f") for k in sizes]
        columns += [(f"{r['topology']} - XLA:CPU", f"{r['topology']} - XLA:CPU", ",.1f") for r in tpus if cpu]
        md += [f"\n## {length:,} tokens\n\n", output.markdown_table(table, columns),
               f"\nCommand: `{pair[0]['row_command']}`. Heap of temporaries: "
               + "; ".join(f"{r['topology']} {r['heap_bytes'] / MIB:,.1f} MiB, {r['heap_in_use_bytes'] / MIB:,.1f} in "
                           f"use at its peak (step {r['heap_peak_step']:,} of {r['schedule_len']:,})" for r in pair)
               + ".\n"]
        for r in tpus:
            md += [f"\nThe largest values in the {r['topology']} heap at its peak:\n\n",
                   output.markdown_table(r["largest"][:12], [
                       ("shape", "value", "code"), ("bytes", "MiB", "mib"), ("padding", "of it tile padding", "mib"),
                       ("part", "part", "s"),
                       (lambda v: "/".join(v["op_name"].replace("\\'", "'").split("/")[-3:]), "op (its name's end)",
                        "s")])]
    return "".join(md)


def write_breakdown(out_dir: str, rows: List[Row]) -> None:
    def plot(axes):
        lengths = sorted({r["seq_len"] for r in rows})
        for ax, length in zip(axes if len(lengths) > 1 else [axes], lengths):
            for r in (r for r in rows if r["seq_len"] == length):
                ax.plot(r["curve_x"], [b / MIB for b in r["curve_bytes"]], lw=1.2, label=(
                    f"{r['topology']} (heap {r['heap_bytes'] / MIB:,.0f} MiB, peak {r['peak_bytes'] / MIB:,.0f})"))
            output.finish(ax, f"The Reformer's step at {length:,} tokens", xlabel="position in the step's schedule",
                          ylabel="heap bytes in use (MiB)", legend={"fontsize": 7})

    n = len({r["seq_len"] for r in rows})
    output.write_outputs(out_dir, "tpu_breakdown", rows, breakdown_markdown(rows), plot, (6.5 * n, 4.5, n))


# ----------------------------------------------------------------------------------------------------------------
# Tables, plots and the results files


def _order(row: Row) -> tuple:
    models = list(seed.LABELS)
    return (row.get("chips", 1) > 1, GENERATIONS.index(row["generation"]) if row.get("generation") in GENERATIONS
            else 9, row.get("dtype") != "float32", models.index(row["model"]) if row["model"] in models else 9)


def _plot_seed(rows: Sequence[Row], axes) -> None:
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "float32")
    axes = axes if isinstance(axes, (list, tuple)) or hasattr(axes, "__len__") else [axes]
    models = [m for m in seed.LABELS if any(r["model"] == m for r in rows)]
    for ax, dtype in zip(axes, dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        gens = [g for g in GENERATIONS if any(r["generation"] == g for r in mine)]
        width = 0.8 / max(len(gens), 1)
        for i, gen in enumerate(gens):
            by_model = {r["model"]: r for r in mine if r["generation"] == gen}
            xs = [j + (i - (len(gens) - 1) / 2) * width for j in range(len(models))]
            ax.bar(xs, [by_model.get(m, {}).get("tpu_peak_mib") or 0 for m in models], width, color=COLORS[gen],
                   label=f"{gen} ({next(iter(by_model.values()))['usable_hbm_mib'] / 1024:.2f} GiB usable)")
        cpu = {r["model"]: r["cpu_peak_mib"] for r in mine}
        gpu = {r["model"]: r.get("seed_gpu_mb") for r in mine}
        ax.scatter(range(len(models)), [cpu.get(m, math.nan) for m in models], marker="o", color="black",
                   zorder=3, label="XLA:CPU, same step")
        if any(gpu.values()):
            ax.scatter(range(len(models)), [gpu.get(m) or math.nan for m in models], marker="x", color="black",
                       s=60, zorder=3, label="seed's GPU figure (MB)")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([seed.LABELS[m] for m in models], fontsize=8)
        output.finish(ax, f"One TPU chip, the seed's setup, {dtype} compute", ylog=10, legend={"fontsize": 7},
                      ylabel="compiled peak per chip (MiB, log scale)")


def _plot_longest(rows: Sequence[Row], ax) -> None:
    models = [m for m in seed.LABELS if any(r["model"] == m for r in rows)]
    layouts = sorted({(r["chips"] > 1, r["generation"], r["topology"]) for r in rows},
                     key=lambda k: (k[0], GENERATIONS.index(k[1])))
    width = 0.8 / max(len(layouts), 1)
    for i, (sharded, gen, topology) in enumerate(layouts):
        by_model = {r["model"]: r for r in rows if r["topology"] == topology}
        xs = [j + (i - (len(layouts) - 1) / 2) * width for j in range(len(models))]
        ax.bar(xs, [by_model.get(m, {}).get("longest") or 0 for m in models], width, color=COLORS[gen],
               hatch="//" if sharded else None, edgecolor="white",
               label=f"{topology}" + (" (fsdp over all its chips)" if sharded else " (one chip)"))
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([seed.LABELS[m] for m in models])
    output.finish(ax, "The longest sequence each variant's training step fits on a TPU chip (compiled by libtpu)",
                  ylog=2, ylabel="longest sequence per chip (tokens, log2 scale)", legend={"fontsize": 7, "ncol": 2})


def write(settings, name: str, new_rows: List[Row]) -> List[Row]:
    """Merge new_rows into out_dir/NAME.json and rewrite its CSV, MD and PNG; returns all rows."""
    path = os.path.join(settings.out_dir, name + ".json")
    os.makedirs(settings.out_dir, exist_ok=True)
    with open(os.path.join(settings.out_dir, f".{name}.lock"), "w") as lock:  # parts may run in parallel processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = sorted(output.merged(path, new_rows, lambda r: (r["model"], r["topology"], r.get("mesh"),
                                                               r.get("dtype"))), key=_order)
        dtypes = len({r.get("dtype") for r in rows})  # the seed part's plot: one column of axes per dtype
        plot, figure = {"tpu": (_plot_seed, (6.5 * dtypes, 4.8, dtypes)),
                        "tpu_longest": (_plot_longest, (10, 5))}.get(name, (None, ()))
        md = (f"# {TITLES[name]} (libtpu's compiler, on a CPU-only machine)\n\n{intro(rows)}\n\n"
              f"{output.markdown_table(rows, COLUMNS[name])}\n")
        output.write_outputs(settings.out_dir, name, rows, md, (lambda ax: plot(rows, ax)) if plot else None, figure)
    return rows


def intro(rows: Sequence[Row]) -> str:
    first = rows[0]
    return (f"Machine: {first['platform']}, {first['cpu_count']} CPUs; jax {first['jax_version']}, libtpu "
            f"{first.get('libtpu_version')}. Sizes: d_model {first['d_model']}, {first['n_heads']} heads, d_ff "
            f"{first['d_ff']}, {first['n_layers']} layers, {first['n_hashes']} hash rounds, chunk "
            f"{first['chunk_len']}, vocabulary {first['vocab_size']}, {first['optimizer']}. Peak = XLA's memory "
            "analysis of the compiled training step per chip (arguments + outputs - aliased + temporaries); a row "
            "fits when the TPU compiler accepts the program and the peak is within the HBM the compiler lets a "
            "program use, libtpu's own figure (`reformer_jax.xla.tpu.usable_hbm_bytes`; the chips' nominal HBM, "
            "with sources, is `HBM_PER_CHIP`). Each row's command reproduces it.")


def run_tpu(settings, *, cpu_stats: Callable[[Any], Any], seed_sizes: bool) -> List[Row]:
    """The --tpu_parts of the TPU experiment; returns the rows measured in this run (see `seed_rows`)."""
    from reformer_jax.xla import tpu

    tpu.topology_devices(settings.topologies[0] if settings.topologies else settings.tpu_long_slice,
                         flag="--topologies")  # no libtpu: one line, before anything compiles
    runners = {"seed": lambda s: seed_rows(s, cpu_stats, seed_sizes), "longest": longest_rows, "long": long_rows,
               "breakdown": breakdown_rows}
    measured: List[Row] = []
    for part in (p for p in PARTS if p in settings.tpu_parts):
        measured.extend(runners[part](settings))  # each row is written to its part's files as it is measured
    return measured
