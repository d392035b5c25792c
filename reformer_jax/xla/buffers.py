"""A compiled program's bytes at its peak, part by part, from the compiler's own buffer assignment (any backend).

Compiling with `dump_options(d)` makes XLA (XLA:CPU and libtpu's TPU compiler alike) write, for module `jit_<name>`:

  *after_optimizations-buffer-assignment.txt   the allocations and the values each holds, at an offset:
      allocation 851: size 8372453888, preallocated-temp:
       value: <3101 fusion.991 @0> (size=268435456,offset=16384): pred[512,1,1024,512]{3,2,1,0:T(8,128)(4,1)}
  *after_optimizations-live-range.txt          each value's live interval on the flattened schedule
  *after_optimizations.txt                     the optimised HLO, each instruction with its op_name (named scope)

XLA packs every temporary of the program into one heap, the preallocated-temp allocation; loop-carried values
share bytes. The bytes of the heap in use at a schedule step are the union of the [offset, offset + size) ranges
of the values live then, so values sharing bytes count once and the figure never exceeds the heap; `read_dump`
reads the three files and `heap_peak` finds the step where that union is largest. `breakdown` then splits the
program's memory_analysis peak (argument + output - alias + temp) into parts that sum to it exactly:

  the arguments (parameters, optimizer state, batch), outputs not aliased to an argument,
  the heap's bytes in use at its peak by what they hold (gradients, parameter copies, residual streams, masks,
    bucket ids, each named scope's activations and temporaries), their tile padding apart,
  the heap's bytes not in use at that step (its fragmentation), and what memory_analysis counts beyond the heap.

On TPU a value's size includes its tile padding: with (8, 128) tiles an f32[..., 64] array takes 128 lanes, twice
its bytes. libtpu's temp_size_in_bytes is the heap plus the compiler's own fragmentation figure a second time (its
log: "HLO temp 177.19M (... 27.8% fragmentation (49.33M))" for a memory_analysis temp of 226.5 MiB); XLA:CPU's is
the heap. Loop bodies appear once in the flattened schedule, so the peak is that of one iteration of each loop,
which is every iteration's for the loops here (their buffers have fixed sizes).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from reformer_jax.xla import timeline

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+), (.*)$")
_ARRAY = re.compile(r"^(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) [(].*[{]\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?(?P<name>[\w.\-]+) = .*?[\]})] (?P<op>[\w-]+)\((?P<operands>[^)]*)\)")
_CALLS = re.compile(r"(?:body|calls|to_apply|branch_computations|condition)=\{?%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


# The named scopes of this project's code (jax.named_scope), for `scope_of`; `_backward` / `_reverse` variants
# ("lsh_rounds_backward", "attention_block_reverse") count as their scope's backward pass.
SCOPES = ("lsh_hash", "lsh_sort", "lsh_chunk_attention", "lsh_unsort_combine", "lsh_rounds", "lsh_attention",
          "shared_qk_attention", "local_attention", "attention_heads", "attention_block", "feed_forward_block",
          "embedding", "output_head", "reversible_layer", "reversible_stack", "residual_layer", "residual_stack")


def dump_options(dump_dir: str, module: str = "jit_train_step") -> Dict[str, object]:
    """XLA options that write the three files above for `module` into dump_dir (add them to a compile)."""
    return {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True, "xla_dump_hlo_module_re": module}


@dataclasses.dataclass(frozen=True)
class Value:
    """One HLO value of the heap: `name{index}`, its bytes (with tile padding), offset, shape text and range."""
    key: str
    size: int
    offset: int
    shape: str
    start: int
    end: int

    @property
    def dtype(self) -> str:
        match = _ARRAY.match(self.shape)
        return match.group("dtype") if match else "tuple"

    @property
    def dims(self) -> Tuple[int, ...]:
        match = _ARRAY.match(self.shape)
        return tuple(int(d) for d in match.group("dims").split(",") if d) if match else ()

    @property
    def unpadded(self) -> int:
        """Its bytes without tile padding (a tuple's or an unknown type's: its size)."""
        match = _ARRAY.match(self.shape)
        if not match or match.group("dtype") not in DTYPE_BYTES:
            return self.size
        return min(self.size, math.prod(self.dims) * DTYPE_BYTES[match.group("dtype")])


@dataclasses.dataclass
class Assignment:
    """A module's heap (its preallocated temporaries, memory space 0) and where each value lives in it."""
    heap_bytes: int
    schedule_len: int
    values: List[Value]  # every heap value with a live range, offsets global over the heap's allocations
    op_names: Dict[str, str]  # instruction -> op_name (its own, its operand's, or its caller's)
    module: str


def _find(dump_dir: str, suffix: str, module: str) -> str:
    paths = sorted(p for p in glob.glob(os.path.join(dump_dir, f"*{suffix}"))
                   if os.path.basename(p).split(".")[1] == module)
    if not paths:
        raise FileNotFoundError(f"no *{suffix} for module {module} in {dump_dir}; compile with "
                                "reformer_jax.xla.buffers.dump_options(...) among the compiler options.")
    return paths[-1]  # the last module of that name: the optimised one


def parse_op_names(hlo_text: str) -> Dict[str, str]:
    """instruction name -> op_name from optimised HLO text. An instruction without one (a copy, a tuple element,
    a loop body's parameter) takes its first operand's, or that of the instruction calling its computation."""
    own: Dict[str, str] = {}
    first_operand: Dict[str, str] = {}
    computation_of: Dict[str, str] = {}
    caller: Dict[str, str] = {}
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            computation = header.group("name")
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name = match.group("name")
        computation_of[name] = computation
        op_name = _OP_NAME.search(line)
        if op_name:
            own[name] = op_name.group(1)
        operands = re.findall(r"%?([\w.\-]+)", match.group("operands"))
        if operands and match.group("op") != "parameter":
            first_operand[name] = operands[0]
        for called in _CALLS.findall(line):
            caller.setdefault(called, name)

    def resolve(name: str, depth: int = 0) -> str:
        if name in own or depth > 50:
            return own.get(name, "")
        if name in first_operand:
            found = resolve(first_operand[name], depth + 1)
        else:  # a computation's parameter: its caller's
            call = caller.get(computation_of.get(name, ""))
            found = resolve(call, depth + 1) if call else ""
        own[name] = found
        return found

    return {name: resolve(name) for name in computation_of}


def read_dump(dump_dir: str, module: str = "jit_train_step") -> Assignment:
    """The heap of `module` from the dump in dump_dir (see `dump_options`)."""
    with open(_find(dump_dir, "after_optimizations-buffer-assignment.txt", module)) as f:
        assignment = f.read()
    with open(_find(dump_dir, "after_optimizations-live-range.txt", module)) as f:
        live = f.read()
    with open(_find(dump_dir, "after_optimizations.txt", module)) as f:
        op_names = parse_op_names(f.read())
    live_ranges = timeline.parse_live_ranges(live)  # the same dump format the timeline reads
    ranges = live_ranges.ranges
    values: List[Value] = []
    heap, base, in_heap = 0, 0, False
    for line in assignment.splitlines():
        header = _ALLOCATION.match(line)
        if header:
            in_heap = header.group(3).startswith("preallocated-temp") and "color" not in header.group(3)
            if in_heap:
                base, heap = heap, heap + int(header.group(2))
            continue
        match = timeline.VALUE_LINE.match(line) if in_heap else None
        if match and match.group("shape") is not None:
            key = match.group("name") + (match.group("index") or "{}")
            if key in ranges:
                values.append(Value(key, int(match.group("size")), base + int(match.group("offset")),
                                    match.group("shape").strip(), *ranges[key]))
    if not heap:
        raise ValueError(f"no preallocated-temp allocation in the buffer assignment of {module}.")
    return Assignment(heap, live_ranges.schedule_len, values, op_names, module)


def _union(intervals: Iterable[Tuple[int, int]]) -> int:
    total, reach = 0, -1
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def heap_in_use(assignment: Assignment) -> np.ndarray:
    """Bytes of the heap in use at each schedule step (the union of the live values' byte ranges). [steps] int64."""
    starts: Dict[int, List[Value]] = {}
    ends: Dict[int, List[Value]] = {}
    for value in assignment.values:
        starts.setdefault(value.start, []).append(value)
        ends.setdefault(value.end + 1, []).append(value)
    live: Dict[Tuple[int, int], int] = {}
    curve = np.zeros(assignment.schedule_len, np.int64)
    for step in range(assignment.schedule_len):
        for value, delta in [(v, -1) for v in ends.get(step, ())] + [(v, 1) for v in starts.get(step, ())]:
            span = (value.offset, value.offset + value.size)
            live[span] = live.get(span, 0) + delta
            if not live[span]:
                del live[span]
        if step in starts or step in ends:
            curve[step] = _union(live)
        else:
            curve[step] = curve[step - 1] if step else 0
    return curve


@dataclasses.dataclass
class Held:
    """Bytes of the heap at the peak held by one value (bytes a smaller value also covers go to that one)."""
    value: Value
    bytes: int
    op_name: str

    @property
    def padding(self) -> int:
        return self.bytes - self.bytes * self.value.unpadded // self.value.size if self.value.size else 0


def held_at(assignment: Assignment, step: int) -> List[Held]:
    """Every heap byte in use at `step`, attributed once, to the smallest live value covering it; largest first."""
    live = [v for v in assignment.values if v.start <= step <= v.end]
    bounds = sorted({p for v in live for p in (v.offset, v.offset + v.size)})
    held: Dict[str, int] = {}
    by_start = sorted(live, key=lambda v: v.offset)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        covering = [v for v in by_start if v.offset <= lo and v.offset + v.size >= hi]
        if covering:
            owner = min(covering, key=lambda v: (v.size, v.key))
            held[owner.key] = held.get(owner.key, 0) + hi - lo
    values = {v.key: v for v in live}
    rows = [Held(values[k], b, assignment.op_names.get(k.split("{")[0], "")) for k, b in held.items()]
    return sorted(rows, key=lambda h: -h.bytes)


# ---------------------------------------------------------------------------------------------------------------
# Parts


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the parts are recognised by: the parameters' shapes (stacked per layer or not), the elements of one
    residual stream (batch x length x d_model) and the scopes that name activations (innermost first)."""
    parameters: Tuple[Tuple[int, ...], ...]
    stream_elements: int
    scopes: Tuple[str, ...] = SCOPES

    def is_parameter_shaped(self, dims: Sequence[int]) -> bool:
        squeezed = tuple(d for d in dims if d != 1)
        return any(squeezed == tuple(d for d in shape if d != 1) or
                   (len(shape) > 1 and squeezed == tuple(d for d in shape[1:] if d != 1))
                   for shape in self.parameters if math.prod(shape) > 1)


def scope_of(op_name: str, scopes: Sequence[str]) -> str:
    """'lsh_rounds (backward)': the innermost of `scopes` on an op_name path (a `_backward` / `_reverse` suffix
    and transforms such as transpose(jvp(...)) stripped), with its pass; 'unnamed' without one."""
    backward = "transpose(" in op_name
    for part in reversed(op_name.split("/")):
        words = re.findall(r"[A-Za-z_][\w.]*", part)
        if not words:
            continue
        word = words[-1]
        for suffix in ("_backward", "_reverse"):
            if word.endswith(suffix):
                word, backward = word[:-len(suffix)], True
        if word in scopes:
            return f"{word} ({'backward' if backward or '_backward' in op_name else 'forward'})"
    return "other ops (backward)" if backward else ("other ops" if op_name else "unnamed")


def part_of(held: Held, shapes: Shapes) -> str:
    """The part a value belongs to: gradients (parameter-shaped, float32, in the backward pass), parameter copies
    (parameter-shaped otherwise: a layer's slice, another dtype), residual streams (stream-sized values), stream
    dropout masks (stream-sized bool), LSH bucket ids (8/16-bit unsigned), else its named scope."""
    value, name = held.value, held.op_name
    dims, dtype = value.dims, value.dtype
    elements = math.prod(dims) if dims else 0
    if dims and shapes.is_parameter_shaped(dims):
        if dtype == "f32" and "transpose(" in name:
            return "gradients"
        return "parameter copies" if dtype != "f32" or "jvp(" in name or not name else "optimizer update"
    if elements and elements == shapes.stream_elements:
        return "stream-sized dropout masks" if dtype == "pred" else "residual streams and cotangents"
    if dtype in ("u8", "u16"):
        return "LSH bucket ids"
    return scope_of(name, shapes.scopes)


@dataclasses.dataclass
class Breakdown:
    """The memory_analysis peak of one program in parts that sum to it (bytes), and the heap behind it."""
    parts: List[Tuple[str, int]]
    peak_bytes: int
    heap_bytes: int
    heap_peak_step: int
    heap_in_use_bytes: int
    schedule_len: int
    largest: List[Dict[str, object]]  # the largest values held at the peak: op, shape, bytes, padding
    curve_x: List[float]
    curve_bytes: List[int]

    def part(self, name: str) -> int:
        return sum(b for n, b in self.parts if n == name)


def breakdown(assignment: Assignment, shapes: Shapes, *, argument_parts: Sequence[Tuple[str, int]],
              output_bytes: int, alias_bytes: int, temp_bytes: int, top: int = 12) -> Breakdown:
    """The peak argument + output - alias + temp in parts (see the module docstring).

    argument_parts: the arguments split by the caller (e.g. parameters, optimizer state, batch), summing to the
    argument bytes; output/alias/temp bytes: memory_analysis's figures of the same executable.
    """
    curve = heap_in_use(assignment)
    step = int(curve.argmax())
    held = held_at(assignment, step)
    in_heap: Dict[str, int] = {}
    for h in held:
        part = part_of(h, shapes)
        in_heap[part] = in_heap.get(part, 0) + h.bytes - h.padding
    padding = sum(h.padding for h in held)
    parts = [(n, int(b)) for n, b in argument_parts]
    parts.append(("outputs not aliased to inputs", output_bytes - alias_bytes))
    parts += sorted(in_heap.items(), key=lambda item: -item[1])
    parts += [("tile padding", padding), ("heap not in use at its peak", assignment.heap_bytes - int(curve[step])),
              ("memory_analysis beyond the heap", temp_bytes - assignment.heap_bytes)]
    peak = sum(b for _, b in parts)
    largest = [{"op": h.value.key, "shape": h.value.shape.split("{")[0], "bytes": h.bytes, "padding": h.padding,
                "part": part_of(h, shapes), "op_name": h.op_name[-160:]} for h in held[:top]]
    xs, ys = timeline.downsample_max(curve)
    return Breakdown(parts, peak, assignment.heap_bytes, step, int(curve[step]), assignment.schedule_len, largest,
                     xs, ys)


# Where each part goes in a table: these first and last, every other (a named scope) between them, largest first.
LEADING_PARTS = ("parameters", "optimizer state", "batch, step and key", "outputs not aliased to inputs",
                 "gradients", "parameter copies", "optimizer update", "residual streams and cotangents",
                 "stream-sized dropout masks", "LSH bucket ids")
TRAILING_PARTS = ("tile padding", "heap not in use at its peak", "memory_analysis beyond the heap")


def ordered_parts(programs: Sequence[Sequence[Tuple[str, float]]]) -> List[str]:
    """The part names of several programs' breakdowns in one table order (LEADING_PARTS, the named scopes by
    their largest size, TRAILING_PARTS)."""
    largest: Dict[str, float] = {}
    for parts in programs:
        for name, size in parts:
            largest[name] = max(largest.get(name, 0.0), size)
    middle = sorted((n for n in largest if n not in LEADING_PARTS + TRAILING_PARTS), key=lambda n: -largest[n])
    return [n for n in LEADING_PARTS if n in largest] + middle + [n for n in TRAILING_PARTS if n in largest]
