"""Where a training step's time goes: a traced step's XLA ops, grouped by what they do.

    python -m benchmarks.speed --profile [--ours=default,lean_compile] [size flags]

The speed driver's worker (benchmarks.speed_worker) compiles the step as it does for timing, then, on the
`profile N` command: runs N steps untraced (wall and process CPU time: how many cores the step keeps busy), N steps
under `jax.profiler` (a Perfetto trace), and times the attention's chunk product and a feed-forward matmul of the
same sizes on their own. This module is what it runs:

- `parse_hlo` reads the compiled module's text (`compiled.as_text()`): every instruction's opcode, shape and, for
  a fusion, the opcodes inside it, so each op gets a kind (`op_kind`): the batched matmuls of chunked attention,
  dense matmuls, sorts, gathers, reductions, data movement, elementwise math, loop control.
- `self_times` turns the trace's op events into exclusive time per op (a while loop's own time without its body's
  ops), summed over the traced steps.
- `summarize` adds them up by kind, with the chunk products' achieved GFLOP/s (flops from the HLO shapes).

XLA:CPU's dot thunk hands each matmul to Eigen with a completion callback, so the event of a dot that Eigen
spreads over the thread pool can end before its work does (the dense matmuls' event times imply rates above this
CPU's peak); the rest of their time falls between ops (the "between ops" row), and the probes give their rate.
The chunk products run one small matmul after another on the calling thread, so their event time is their time
(it matches the probe's).
"""

from __future__ import annotations

import gzip
import glob
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

# Kinds of ops, in the order the tables list them: (key, label).
KINDS = (
    ("chunk_matmul", "batched matmuls (attention chunk products)"),
    ("dense_matmul", "dense matmuls (projections, feed-forward, output)"),
    ("library", "library fusions (YNNPACK / oneDNN)"),
    ("sort", "sorts (bucket order)"),
    ("gather", "gathers / scatters (sorting and unsorting rows)"),
    ("reduction", "reductions (softmax max / sum, norms, optimizer)"),
    ("movement", "copies, concatenations, slices, pads"),
    ("elementwise", "elementwise (exp, masks, scaling, updates)"),
    ("control", "loops and calls (own time, without their ops)"),
    ("other", "other"),
)
KIND_LABELS = dict(KINDS)
# Opcodes that only move or relabel data.
MOVEMENT = frozenset({"parameter", "constant", "bitcast", "broadcast", "reshape", "copy", "concatenate", "slice",
                      "dynamic-slice", "dynamic-update-slice", "pad", "transpose", "iota", "tuple",
                      "get-tuple-element", "reverse"})
CONTROL = frozenset({"while", "call", "conditional"})
# Kinds whose trace events last as long as their work (see the module docstring): GFLOP/s are given for these.
SYNCHRONOUS_KINDS = frozenset({"chunk_matmul"})
TOP_OPS = 12  # ops listed one by one in the tables


class HloOp(NamedTuple):
    """One instruction of the compiled module."""

    name: str
    opcode: str
    dims: Tuple[int, ...]  # of an array result; () for scalars and tuples
    shape: str  # as printed, layout dropped
    inner: frozenset  # opcodes of a fusion's computation (empty for other ops)
    attrs: str  # the text after the operand list
    operands: Tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------------
# The compiled module's text


def _split_balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group that opens at text[start] == "("."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]!r}")


_ARRAY = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")


def _parse_instruction(line: str) -> Optional[HloOp]:
    """`[ROOT ]%name = TYPE opcode(operands), attrs` -> HloOp; None for lines that are not instructions."""
    match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = ", line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # a tuple type
        end = _split_balanced(rest, 0)
        type_text, rest = rest[:end], rest[end:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _split_balanced(rest, op.end() - 1)
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[op.end():close - 1]))
    array = _ARRAY.match(type_text)
    dims = tuple(int(d) for d in array.group(1).split(",") if d) if array else ()
    shape = re.sub(r"\{[^}]*\}", "", type_text)
    return HloOp(match.group(1), op.group(1), dims, shape, frozenset(), rest[close:], operands)


def parse_hlo(text: str) -> Dict[str, HloOp]:
    """Every instruction of an HLO module's text by name, fusions with the opcodes of the computation they call."""
    ops: Dict[str, HloOp] = {}
    computations: Dict[str, set] = {}
    current: Optional[set] = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{") and " -> " in line:
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            current = computations.setdefault(name, set())
            continue
        if line.strip() == "}":
            current = None
            continue
        op = _parse_instruction(line) if current is not None else None
        if op is not None:
            ops[op.name] = op
            current.add(op.opcode)
    for name, op in ops.items():
        called = re.search(r"calls=%([\w.\-]+)", op.attrs)
        if op.opcode == "fusion" and called:
            ops[name] = op._replace(inner=frozenset(computations.get(called.group(1), ())))
    return ops


def op_kind(op: HloOp) -> str:
    """The KINDS key of one op (a fusion by the opcodes inside it)."""
    code = op.opcode
    if code == "dot":
        return "chunk_matmul" if "lhs_batch_dims=" in op.attrs else "dense_matmul"
    if code in ("custom-call",) or (code == "fusion" and "kind=kCustom" in op.attrs):
        return "library"
    inner = op.inner if code == "fusion" else frozenset({code})
    if "dot" in inner:
        return "dense_matmul"
    if "sort" in inner:
        return "sort"
    if inner & {"gather", "scatter"}:
        return "gather"
    if inner & {"reduce", "reduce-window"}:
        return "reduction"
    if code in CONTROL:
        return "control"
    if inner <= MOVEMENT:
        return "movement"
    if code == "fusion" or code not in MOVEMENT:
        return "elementwise"
    return "other"


def dot_flops(op: HloOp, ops: Dict[str, HloOp]) -> Optional[int]:
    """2 * (output elements) * (contracted size) of a dot, from its shapes; None if they cannot be read."""
    if op.opcode != "dot" or not op.operands or op.operands[0] not in ops:
        return None
    lhs = ops[op.operands[0]].dims
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", op.attrs)
    if not lhs or not contracting:
        return None
    size = 1
    for d in (int(x) for x in contracting.group(1).split(",") if x):
        size *= lhs[d]
    out = 1
    for d in op.dims:
        out *= d
    return 2 * out * size


# ----------------------------------------------------------------------------------------------------------------
# The trace


def self_times(events: Iterable[Dict[str, Any]], names: Iterable[str]) -> Dict[str, Tuple[float, int]]:
    """{op name: (exclusive microseconds, calls)} over trace events of these names.

    Events are Perfetto / Chrome "complete" events (ph "X", ts and dur in microseconds). An op's exclusive time is
    its duration less that of the op events nested in it on the same thread (a while loop's body ops), so the
    sums over ops add up to the traced op time once.
    """
    wanted = set(names)
    by_thread: Dict[Tuple[Any, Any], List[Dict[str, Any]]] = {}
    for e in events:
        name = op_name_of(e)
        if e.get("ph") == "X" and name in wanted:
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(dict(e, name=name))
    out: Dict[str, List[float]] = {}
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        own = [float(e["dur"]) for e in thread_events]
        enclosing: List[Tuple[float, int]] = []  # (end, index) of the events open at this point
        for i, e in enumerate(thread_events):
            ts, dur = float(e["ts"]), float(e["dur"])
            while enclosing and enclosing[-1][0] <= ts:
                enclosing.pop()
            if enclosing:  # a direct child: its whole duration is not its parent's own time
                own[enclosing[-1][1]] -= dur
            enclosing.append((ts + dur, i))
        for e, us in zip(thread_events, own):
            total = out.setdefault(e["name"], [0.0, 0])
            total[0] += us
            total[1] += 1
    return {name: (max(0.0, us), int(calls)) for name, (us, calls) in out.items()}


def op_name_of(event: Dict[str, Any]) -> Optional[str]:
    """The HLO op an event ran: XLA:CPU names its events after the op; GPU kernel events carry it in args.hlo_op."""
    args = event.get("args") or {}
    return args.get("hlo_op") or event.get("name")


def read_trace_events(log_dir: str) -> List[Dict[str, Any]]:
    """The events of the Perfetto trace `jax.profiler` wrote under log_dir."""
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {log_dir}; the profile needs "
                           "jax.profiler.start_trace(..., create_perfetto_trace=True).")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        return json.load(f).get("traceEvents", [])


def traced_steps(step: Callable[[], Any], n: int) -> Tuple[List[Dict[str, Any]], List[float]]:
    """(trace events, wall seconds of each step) of n steps run under jax.profiler."""
    import jax

    with tempfile.TemporaryDirectory(prefix="step_profile_") as log_dir:
        walls = []
        jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
        try:
            for _ in range(n):
                t = time.perf_counter()
                step()
                walls.append(time.perf_counter() - t)
        finally:
            jax.profiler.stop_trace()
        return read_trace_events(log_dir), walls


def _wall_and_cpu(fn: Callable[[], Any]) -> Tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call. CPU time counts every thread of the process,
    including a thread pool's workers spinning while they wait."""
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - t, time.process_time() - c, result


def busy_cores(step: Callable[[], Any], n: int) -> Tuple[float, float]:
    """(median wall seconds per step, process CPU seconds / wall seconds) over n untraced steps."""
    timings = [_wall_and_cpu(step)[:2] for _ in range(n)]
    walls = [wall for wall, _ in timings]
    return statistics.median(walls), sum(cpu for _, cpu in timings) / sum(walls)


# ----------------------------------------------------------------------------------------------------------------
# Summaries


def summarize(ops: Dict[str, HloOp], times: Dict[str, Tuple[float, int]], steps: int) -> Dict[str, Any]:
    """Per step: op time by kind (GFLOP/s of the synchronous matmuls) and the costliest ops one by one."""
    total_us = sum(us for us, _ in times.values())
    kinds: Dict[str, Dict[str, float]] = {}
    per_op = []
    for name, (us, calls) in times.items():
        op = ops[name]
        kind = op_kind(op)
        flops = dot_flops(op, ops)
        k = kinds.setdefault(kind, {"us": 0.0, "calls": 0, "flops": 0.0, "flop_us": 0.0})
        k["us"] += us
        k["calls"] += calls
        if flops is not None:
            k["flops"] += flops * calls
            k["flop_us"] += us
        per_op.append((us, name, kind, op.shape, calls, flops))
    by_kind = []
    for key, label in KINDS:
        if key not in kinds:
            continue
        k = kinds[key]
        synchronous = key in SYNCHRONOUS_KINDS
        by_kind.append({"kind": key, "label": label, "s_per_step": k["us"] / 1e6 / steps,
                        "share": k["us"] / total_us if total_us else None, "ops_per_step": k["calls"] / steps,
                        "gflop_per_step": k["flops"] / 1e9 / steps if k["flops"] else None,
                        "gflops_per_s": k["flops"] / k["flop_us"] / 1e3 if k["flop_us"] and synchronous else None})
    per_op.sort(reverse=True)
    top = [{"op": name, "kind": kind, "shape": shape, "s_per_step": us / 1e6 / steps, "calls_per_step": calls / steps,
            "us_per_call": us / calls, "share": us / total_us if total_us else None,
            "gflops_per_s": flops * calls / us / 1e3 if flops and us and kind in SYNCHRONOUS_KINDS else None}
           for us, name, kind, shape, calls, flops in per_op[:TOP_OPS]]
    return {"op_s_per_step": total_us / 1e6 / steps, "by_kind": by_kind, "top_ops": top}


def profile_step(step: Callable[[], Any], hlo_text: str, steps: int) -> Dict[str, Any]:
    """Busy cores over `steps` untraced steps, then the op-time summary of `steps` traced ones."""
    untraced_s, cores = busy_cores(step, steps)
    events, walls = traced_steps(step, steps)
    ops = parse_hlo(hlo_text)
    times = self_times(events, ops)
    if not times:
        raise RuntimeError("the trace holds no event named after an op of the compiled step; this jax / jaxlib "
                           "writes its trace differently from what benchmarks.step_profile reads.")
    summary = summarize(ops, times, steps)
    traced_s = statistics.median(walls)
    summary.update({"profiled_steps": steps, "untraced_step_s": untraced_s, "busy_cores": cores,
                    "traced_step_s": traced_s, "between_ops_s_per_step": max(0.0, traced_s - summary["op_s_per_step"]),
                    "op_time_over_traced_wall": summary["op_s_per_step"] / traced_s})
    return summary


def probe_matmuls(config, seq_len: int, batch_size: int, compiler_options: Optional[Dict[str, Any]],
                  repeats: int = 30) -> List[Dict[str, Any]]:
    """The step's two matmul shapes on their own: the chunk product of one head and round of LSH attention
    ([l / c] x [c, k] x [k, (n_before + 1) c], float32 as attention computes it) and one feed-forward chunk
    ([f, d] x [d, d_ff], in the compute dtype); wall time per call, process CPU time / wall time, GFLOP/s."""
    import jax
    import jax.numpy as jnp

    c = config.chunk_len
    seen = (config.n_chunks_before + 1) * c
    ff_rows = min(config.ff_chunk_len or seq_len, seq_len) * batch_size
    cases = [("chunk product (one head, one round)", "nqk,nsk->nqs", jnp.float32,
              ((seq_len // c * batch_size, c, config.d_head), (seq_len // c * batch_size, seen, config.d_head))),
             ("feed-forward matmul (one chunk)", "qd,df->qf", config.compute_dtype,
              ((ff_rows, config.d_model), (config.d_model, config.d_ff)))]
    rows = []
    for what, spec, dtype, shapes in cases:
        keys = jax.random.split(jax.random.key(0), 2)
        a, b = (jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes))
        compiled = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y)).lower(a, b).compile(compiler_options)
        jax.block_until_ready(compiled(a, b))

        def calls(compiled=compiled, a=a, b=b):
            for _ in range(repeats - 1):
                compiled(a, b)
            return jax.block_until_ready(compiled(a, b))

        wall, cpu, out = _wall_and_cpu(calls)
        wall, cpu = wall / repeats, cpu / repeats
        flops = 2 * out.size * shapes[0][-1]
        rows.append({"what": what, "einsum": spec, "dtype": jnp.dtype(dtype).name, "shapes": [list(s) for s in shapes],
                     "us_per_call": wall * 1e6,
                     "busy_cores": cpu / wall, "gflops_per_s": flops / wall / 1e9})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Tables


def _kind_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Kinds of op down, settings across: ms per step, % of the ops' time, GFLOP/s (chunk products only)."""
    from benchmarks.output import markdown_table

    table = []  # one row per kind: {"label", "entries": {setting: by_kind entry}}
    for key, label in KINDS:
        entries = {r["setting"]: k for r in rows for k in r["by_kind"] if k["kind"] == key}
        if entries:
            table.append({"label": label, "entries": entries})
    table.append({"label": "between ops (dispatch, asynchronous matmuls' remaining work; 0 where events overlap)",
                  "entries": {r["setting"]: {"s_per_step": r["between_ops_s_per_step"]} for r in rows}})
    table.append({"label": "traced step", "entries": {r["setting"]: {"s_per_step": r["traced_step_s"]} for r in rows}})

    def cell(setting, field, scale=1.0):
        def value(t):
            v = t["entries"].get(setting, {}).get(field)
            return None if v is None else v * scale
        return value

    columns = [("label", "kind of op", "s")]
    for r in rows:
        s = r["setting"]
        columns += [(cell(s, "s_per_step", 1e3), f"{s}: ms / step", ",.1f"),
                    (cell(s, "share", 100.0), f"{s}: % of op time", ".1f"),
                    (cell(s, "gflops_per_s"), f"{s}: GFLOP/s", ".0f")]
    return markdown_table(table, columns)


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """The profile tables: op time by kind per setting, the first setting's costliest ops, the matmul probes."""
    from benchmarks.output import markdown_table

    out = []
    for r in rows:
        out.append(f"- **{r['setting']}**: {r['untraced_step_s']:.3g} s per step untraced, {r['busy_cores']:.2f} "
                   f"cores busy (process CPU time / wall time); traced {r['traced_step_s']:.3g} s, of which the ops "
                   f"account for {r['op_time_over_traced_wall'] * 100:.0f}% ({r['profiled_steps']} steps each).")
    out.append("\nOp time by kind (exclusive time of each op's trace events, per step; share of the ops' time; "
               "GFLOP/s of the chunk products from their HLO shapes):\n")
    out.append(_kind_table(rows))
    first = rows[0]
    out.append(f"\nThe {TOP_OPS} costliest ops of **{first['setting']}** (per step):\n")
    out.append(markdown_table(first["top_ops"], [
        ("op", "HLO op", "s"), (lambda o: KIND_LABELS[o["kind"]].split(" (")[0], "kind", "s"), ("shape", "shape", "s"),
        (lambda o: o["s_per_step"] * 1e3, "ms / step", ",.1f"), ("calls_per_step", "calls / step", ",.0f"),
        ("us_per_call", "µs / call", ",.0f"), (lambda o: o["share"] * 100, "% of op time", ".1f"),
        ("gflops_per_s", "GFLOP/s", ".0f")]))
    out.append("\nThe same matmul shapes on their own (compiled with the setting's options; CPU time / wall time "
               "says how many cores the one op keeps busy):\n")
    out.append(markdown_table([dict(p, setting=r["setting"]) for r in rows for p in r["probes"]], [
        ("setting", "setting", "s"), ("what", "matmul", "s"),
        (lambda p: " x ".join(str(tuple(s)) for s in p["shapes"]), "operands", "s"), ("dtype", "dtype", "s"),
        ("us_per_call", "µs / call", ",.0f"), ("busy_cores", "cores busy", ".2f"),
        ("gflops_per_s", "GFLOP/s", ".0f")]))
    out.extend("\n" + line for line in findings(rows))
    return "\n".join(out) + "\n"


def findings(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Sentences read off the first setting's profile (no number in them is typed by hand)."""
    r = rows[0]
    kinds = {k["kind"]: k for k in r["by_kind"]}
    lines = []
    chunk, dense = kinds.get("chunk_matmul"), kinds.get("dense_matmul")
    if chunk:
        text = (f"In **{r['setting']}**, the attention's chunk products take {chunk['share'] * 100:.0f}% of the op "
                f"time ({chunk['s_per_step']:.2f} s per step) at {chunk['gflops_per_s']:.0f} GFLOP/s")
        if dense and dense.get("gflops_per_s"):
            text += f"; the dense matmuls run at {dense['gflops_per_s']:.0f} GFLOP/s"
        lines.append(text + ".")
    probe = next((p for p in r.get("probes", []) if p["what"].startswith("chunk")), None)
    dense_probe = next((p for p in r.get("probes", []) if p["what"].startswith("feed")), None)
    if probe and dense_probe:
        lines.append(f"On its own, one round's chunk product keeps {probe['busy_cores']:.2f} cores busy "
                     f"({probe['gflops_per_s']:.0f} GFLOP/s), the feed-forward matmul "
                     f"{dense_probe['busy_cores']:.2f} ({dense_probe['gflops_per_s']:.0f} GFLOP/s).")
    cores = r.get("cpu_count") or 1
    if chunk and probe and probe["busy_cores"] < 1.5 and cores > 1:
        saved = chunk["s_per_step"] * (1 - 1 / cores)
        lines.append(f"Spread over all {cores} cores at the same rate per core, the chunk products would take "
                     f"{saved:.2f} s less per step ({saved / r['untraced_step_s']:.0%} of the untraced step).")
    return lines


def plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Seconds per step by kind of op, one stacked bar per setting."""
    from benchmarks import output

    fig, ax = output.new_figure(10, 1.6 + 0.6 * len(rows))
    colors = dict(zip((k for k, _ in KINDS), ("tab:red", "tab:orange", "tab:pink", "tab:purple", "tab:brown",
                                              "tab:olive", "tab:cyan", "tab:green", "tab:gray", "black")))
    names = [r["setting"] for r in rows]
    left = [0.0] * len(rows)
    for key, label in KINDS:
        widths = [next((k["s_per_step"] for k in r["by_kind"] if k["kind"] == key), 0.0) for r in rows]
        if any(widths):
            ax.barh(names, widths, left=left, color=colors[key], label=label)
            left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("op time per training step (s, from the trace)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    output.save_figure(path, fig)
