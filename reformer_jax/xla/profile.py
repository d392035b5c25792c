"""Where a compiled training step's time goes: its XLA ops, grouped by what they do, with their traced times.

    summary = profile_step(step, compiled.as_text(), steps=2)   # step(): one training step, run to completion

- `parse_hlo` reads the compiled module's text (`compiled.as_text()`): every instruction's opcode, shape and, for
  a fusion, the opcodes inside it, so each op gets a kind (`op_kind`): the batched matmuls of chunked attention,
  dense matmuls, sorts, gathers, reductions, data movement, elementwise math, loop control.
- `self_times` turns a `jax.profiler` trace's op events into exclusive time per op (a while loop's own time without
  its body's ops), summed over the traced steps.
- `summarize` adds them up by kind, with the chunk products' achieved GFLOP/s (flops from the HLO shapes).

XLA:CPU's dot thunk hands each matmul to Eigen with a completion callback, so the event of a dot that Eigen
spreads over the thread pool can end before its work does (the dense matmuls' event times imply rates above the
CPU's peak); the rest of their time falls between ops. The chunk products run one small matmul after another on
the calling thread, so their event time is their time. The time twin of `reformer_jax.xla.timeline` (bytes);
`python -m benchmarks.speed --profile` tabulates it.
"""

from __future__ import annotations

import glob
import gzip
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


def _split_balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group that opens at text[start] == "("."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]!r}")


_ARRAY = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")


def parse_instruction(line: str) -> Optional[HloOp]:
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
        op = parse_instruction(line) if current is not None else None
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


def xla_flops(compiled) -> Optional[float]:
    """XLA's own flop count of a compiled program (`cost_analysis`: elementwise work included), or None where the
    backend gives none."""
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0] if analysis else {}
        return float(analysis["flops"]) if analysis and "flops" in analysis else None
    except Exception:  # noqa: BLE001 - an estimate only; some backends do not implement it
        return None


def wall_and_cpu(fn: Callable[[], Any]) -> Tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call. CPU time counts every thread of the process,
    including a thread pool's workers spinning while they wait."""
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - t, time.process_time() - c, result


def probe_einsum(spec: str, shapes: Sequence[Sequence[int]], dtype: Any = "float32",
                 compiler_options: Optional[Dict[str, Any]] = None, repeats: int = 30) -> Dict[str, Any]:
    """One einsum of two random operands of `shapes` in `dtype`, compiled on its own (with `compiler_options`) and
    called `repeats` times: {"einsum", "dtype", "shapes", "us_per_call", "busy_cores" (process CPU time / wall
    time), "gflops_per_s" (2 x output size x the first operand's last dimension, contracted, per second)}."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, tuple(s), jnp.float32).astype(dtype) for k, s in zip(keys, shapes))
    compiled = jax.jit(lambda x, y: jnp.einsum(spec, x, y)).lower(a, b).compile(compiler_options)
    jax.block_until_ready(compiled(a, b))

    def calls():
        for _ in range(repeats - 1):
            compiled(a, b)
        return jax.block_until_ready(compiled(a, b))

    wall, cpu, out = wall_and_cpu(calls)
    wall, cpu = wall / repeats, cpu / repeats
    return {"einsum": spec, "dtype": jnp.dtype(dtype).name, "shapes": [list(s) for s in shapes],
            "us_per_call": wall * 1e6, "busy_cores": cpu / wall,
            "gflops_per_s": 2 * out.size * shapes[0][-1] / wall / 1e9}


def busy_cores(step: Callable[[], Any], n: int) -> Tuple[float, float]:
    """(median wall seconds per step, process CPU seconds / wall seconds) over n untraced steps."""
    timings = [wall_and_cpu(step)[:2] for _ in range(n)]
    walls = [wall for wall, _ in timings]
    return statistics.median(walls), sum(cpu for _, cpu in timings) / sum(walls)


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
                           "writes its trace differently from what reformer_jax.xla.profile reads.")
    summary = summarize(ops, times, steps)
    traced_s = statistics.median(walls)
    summary.update({"profiled_steps": steps, "untraced_step_s": untraced_s, "busy_cores": cores,
                    "traced_step_s": traced_s, "between_ops_s_per_step": max(0.0, traced_s - summary["op_s_per_step"]),
                    "op_time_over_traced_wall": summary["op_s_per_step"] / traced_s})
    return summary
