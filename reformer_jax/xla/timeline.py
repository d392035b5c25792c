"""Live bytes across one compiled step, rebuilt from XLA's buffer dumps.

Compiling with `compiler_options={"xla_dump_to": d, "xla_dump_hlo_as_text": True}` makes XLA write, for the module
`jit_<name>`:

  *after_optimizations-buffer-assignment.txt   every HLO value with its size:
      value: <7831 state_params__embed__.1 @0> (size=16384,offset=0): f32[...]
      value: <8794 while.445{1} (phi) @0> (size=16384,offset=...): u32[...]
  *after_optimizations-live-range.txt          the flattened schedule and each value's live interval:
      HloLiveRange (max 1294):
        BufferLiveRange:
          copy.133{}:201-209
        Live ranges at 1106 (peak):
          dot.38{}: 131072 bytes (cumulative: 131072 bytes)
        Stack trace breakdown for peak usage: 1 460 032 bytes
          main.193 (100.0%, total: ...)
            ├── jit(train_step)/jvp(ReformerLM)/layers/.../exp (18.0%, total: 262 144 bytes, ...)

Summing each value's size over its interval gives the live-bytes curve. Under `lax.scan` / while loops the
flattened schedule shows the loop body once and loop-carried values share buffers, so the curve is a picture and
XLA's own peak (the "peak" line) is the number.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

# A value line of a `*-buffer-assignment.txt` dump (its size, its offset in its allocation, its shape); the one
# reader of that line, here and in `buffers`.
VALUE_LINE = re.compile(r"^\s*value: <\d+ (?P<name>[^\s{>]+)(?P<index>\{[\d,]*\})?(?: \(phi\))? @[^>]*> "
                        r"\(size=(?P<size>\d+),offset=(?P<offset>\d+)\)(?:: (?P<shape>.*))?")
_RANGE_RE = re.compile(r"^\s+(?P<name>[^\s{]+)(?P<index>\{[\d,]*\}):(?P<start>\d+)-(?P<end>\d+)\s*$")
_MAX_RE = re.compile(r"HloLiveRange \(max (\d+)\)")
_PEAK_STEP_RE = re.compile(r"Live ranges at (\d+) \(peak\):")
_PEAK_VALUE_RE = re.compile(r"^\s+(?P<name>[^\s{]+)(?P<index>\{[\d,]*\}): (?P<size>\d+) bytes")
_BREAKDOWN_HEAD_RE = re.compile(r"Stack trace breakdown for peak usage: ([\d ]+) bytes")
_BREAKDOWN_ITEM_RE = re.compile(r"^(?P<indent>[\s│]*)[├└]── (?P<name>.+) "
                                r"\((?P<pct>[\d.]+)%, total: (?P<total>[\d ]+) bytes")

# Named scopes of this project (jax.named_scope in reformer_jax), most specific first: a path is attributed to the
# first of these it contains.
KNOWN_SCOPES = ("lsh_hash", "lsh_sort", "lsh_chunk_attention", "lsh_unsort_combine", "lsh_attention",
                "shared_qk_attention", "attention_block", "feed_forward_block", "embedding", "output_head",
                "reversible_stack", "residual_stack")


@dataclasses.dataclass
class LiveRanges:
    """One module's schedule: value -> (start, end) step, value sizes, XLA's peak step and breakdown."""

    schedule_len: int
    ranges: Dict[str, Tuple[int, int]]
    peak_step: Optional[int]
    peak_bytes: Optional[int]  # XLA's own total at its peak step (the breakdown's headline)
    breakdown: List[Tuple[str, int]]  # top-level entries of the peak breakdown: (name, bytes)


def _key(name: str, index: Optional[str]) -> str:
    return f"{name}{index or '{}'}"


def parse_value_sizes(text: str) -> Dict[str, int]:
    """Sizes of the HLO values of a `*-buffer-assignment.txt` dump: {"name{index}": bytes}."""
    sizes: Dict[str, int] = {}
    for line in text.splitlines():
        m = VALUE_LINE.match(line)
        if m:
            key = _key(m.group("name"), m.group("index"))
            sizes[key] = max(sizes.get(key, 0), int(m.group("size")))
    if not sizes:
        raise ValueError("no 'value: <...> (size=...)' lines found: is this an XLA *buffer-assignment.txt dump?")
    return sizes


def parse_live_ranges(text: str) -> LiveRanges:
    """Parse a `*-live-range.txt` dump (see the module docstring for the format)."""
    m = _MAX_RE.search(text)
    if not m:
        raise ValueError("no 'HloLiveRange (max N)' header found: is this an XLA *live-range.txt dump?")
    schedule_len = int(m.group(1)) + 1
    ranges: Dict[str, Tuple[int, int]] = {}
    section = None
    peak_step = None
    breakdown: List[Tuple[str, int]] = []
    peak_bytes = None
    top_indent = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("BufferLiveRange:"):
            section = "ranges"
            continue
        pm = _PEAK_STEP_RE.search(line)
        if pm:
            section, peak_step = "peak", int(pm.group(1))
            continue
        bm = _BREAKDOWN_HEAD_RE.search(line)
        if bm:
            section, peak_bytes = "breakdown", int(bm.group(1).replace(" ", ""))
            continue
        if section == "ranges":
            rm = _RANGE_RE.match(line)
            if rm:
                ranges[_key(rm.group("name"), rm.group("index"))] = (int(rm.group("start")), int(rm.group("end")))
        elif section == "breakdown":
            im = _BREAKDOWN_ITEM_RE.match(line)
            if im:
                indent = len(im.group("indent"))
                if top_indent is None:
                    top_indent = indent
                if indent == top_indent:
                    breakdown.append((im.group("name"), int(im.group("total").replace(" ", ""))))
    if not ranges:
        raise ValueError("no 'BufferLiveRange:' intervals found in the live-range dump.")
    return LiveRanges(schedule_len, ranges, peak_step, peak_bytes, breakdown)


def live_bytes_curve(ranges: LiveRanges, sizes: Dict[str, int]) -> np.ndarray:
    """Bytes live at each schedule step: the sum of the sizes of the values whose interval covers it. [steps] int64.

    Values without a size (none expected) count as 0.
    """
    delta = np.zeros(ranges.schedule_len + 1, np.int64)
    for key, (start, end) in ranges.ranges.items():
        size = sizes.get(key, 0)
        delta[start] += size
        delta[min(end, ranges.schedule_len - 1) + 1] -= size
    return np.cumsum(delta)[:-1]


def downsample_max(curve: np.ndarray, points: int = 400) -> Tuple[List[float], List[int]]:
    """At most `points` (fraction of the schedule, max bytes in the bin) pairs; max-pooling keeps every peak."""
    n = len(curve)
    if n <= points:
        return [i / max(1, n - 1) for i in range(n)], [int(v) for v in curve]
    edges = np.linspace(0, n, points + 1).astype(int)
    xs, ys = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            xs.append(float((lo + hi - 1) / 2 / (n - 1)))
            ys.append(int(curve[lo:hi].max()))
    return xs, ys


def scope_of(name: str) -> str:
    """The project's named scope a breakdown entry belongs to, with its pass: 'feed_forward_block (backward)'.

    Entries that are not JAX op paths are the step's inputs ('state', 'batch', 'rng') or XLA's own unnamed
    temporaries (fusions, copies, dots): 'inputs: state' / 'unnamed XLA temporaries'.
    """
    if name in ("state", "batch", "rng") or name.startswith("state."):
        return "inputs: " + name.split(".")[0].split("[")[0]
    if "/" not in name:
        return "unnamed XLA temporaries"
    direction = "backward" if "transpose(" in name or "_backward" in name else "forward"
    for scope in KNOWN_SCOPES:
        if f"/{scope}/" in name or name.endswith(f"/{scope}"):
            return f"{scope} ({direction})"
    return f"other ops ({direction})"


def breakdown_by_scope(breakdown: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """Top-level peak entries summed per `scope_of`, largest first."""
    totals: Dict[str, int] = {}
    for name, size in breakdown:
        scope = scope_of(name)
        totals[scope] = totals.get(scope, 0) + size
    return sorted(totals.items(), key=lambda item: -item[1])


def find_dump(dump_dir: str, module_prefix: str = "jit_") -> Tuple[str, str]:
    """(buffer-assignment path, live-range path) of the first module whose name starts with `module_prefix`."""
    live = sorted(p for p in glob.glob(os.path.join(dump_dir, "*after_optimizations-live-range.txt"))
                  if os.path.basename(p).split(".")[1].startswith(module_prefix))
    if not live:
        raise FileNotFoundError(f"no *after_optimizations-live-range.txt for a module '{module_prefix}*' in "
                                f"{dump_dir}; was the step compiled with xla_dump_to and xla_dump_hlo_as_text?")
    assignment = live[0].replace("-live-range.txt", "-buffer-assignment.txt")
    if not os.path.exists(assignment):
        raise FileNotFoundError(f"{assignment} is missing beside {live[0]}.")
    return assignment, live[0]


def analyze_dump(dump_dir: str, module_prefix: str = "jit_") -> dict:
    """Everything the timeline experiment reports from one dump directory."""
    assignment_path, live_path = find_dump(dump_dir, module_prefix)
    with open(assignment_path) as f:
        sizes = parse_value_sizes(f.read())
    with open(live_path) as f:
        ranges = parse_live_ranges(f.read())
    curve = live_bytes_curve(ranges, sizes)
    xs, ys = downsample_max(curve)
    return {
        "schedule_len": ranges.schedule_len,
        "xla_peak_step": ranges.peak_step,
        "xla_live_peak_bytes": ranges.peak_bytes,
        "curve_peak_bytes": int(curve.max()),
        "curve_peak_step": int(curve.argmax()),
        "curve_x": xs,
        "curve_bytes": ys,
        "peak_by_scope": [{"scope": s, "bytes": b} for s, b in breakdown_by_scope(ranges.breakdown)],
        "peak_top_entries": [{"name": n, "bytes": b} for n, b in ranges.breakdown[:15]],
        "dump_module": os.path.basename(live_path).split(".")[1],
    }
