"""Result files of the benchmarks: JSON rows, CSV, a Markdown table and a PNG, each written atomically (through a
temporary file in the same directory and `os.replace`, so an interrupted run never leaves half a file)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

MIB = 2**20

Row = Dict[str, Any]
# A Markdown column: (row key or function of the row, header, format of the value)
Column = Tuple[Any, str, str]


def atomic_write_text(path: str, text: str) -> None:
    from reformer_jax.training.checkpoint import atomic_write  # jax: imported when a result is written

    atomic_write(path, text.encode("utf-8"))


def write_json(path: str, rows: List[Row]) -> None:
    atomic_write_text(path, json.dumps(rows, indent=1, sort_keys=False) + "\n")


def read_json(path: str) -> List[Row]:
    with open(path) as f:
        return json.load(f)


def merged(path: str, new: Sequence[Row], key: Callable[[Row], Any]) -> List[Row]:
    """The rows of the results file `path` (if any) that no row of `new` replaces (by `key`), then `new`: a rerun
    for some settings keeps the others' rows, each with its own command."""
    replaced = {key(r) for r in new}
    return [r for r in (read_json(path) if os.path.exists(path) else []) if key(r) not in replaced] + list(new)


def write_csv(path: str, rows: List[Row]) -> None:
    """Scalar fields of every row (lists such as timeline curves stay in the JSON only)."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and (v is None or isinstance(v, (str, int, float)))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def met(ok: bool) -> str:
    """How the reports judge a target: "met" or "NOT met"."""
    return "met" if ok else "NOT met"


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if spec in ("mib", "gib"):
        return f"{value / MIB:,.1f}" if spec == "mib" else f"{value / 2**30:,.2f}"
    if spec == "code":
        return f"`{value}`"
    return format(value, spec) if spec else str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """A GitHub Markdown table. A column's key may be a function of the row."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "| " + " | ".join("---" if spec in ("", "s", "code") else "---:" for _, _, spec in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(key(row) if callable(key) else row.get(key), spec)
                                       for key, _, spec in columns) + " |")
    return "\n".join(lines) + "\n"


def machine() -> Dict[str, Any]:
    """Where a number was measured: platform, CPU count, Python, jax and jaxlib versions, backend and devices."""
    import jax
    import jaxlib

    devices = jax.devices()
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "python_version": sys.version.split()[0], "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind if devices else "none", "device_count": len(devices)}


def stamp(row: Row, command: str) -> Row:
    """`row` with the machine's fields it lacks (`machine`), then the command that made it."""
    row.update({k: v for k, v in machine().items() if k not in row})
    row["command"] = command
    return row


def backend_name(name: str) -> str:
    """A result's file name: NAME on CPU, NAME_<backend> elsewhere (GPU results sit beside the CPU ones)."""
    import jax

    return name if jax.default_backend() == "cpu" else f"{name}_{jax.default_backend()}"


def finish(ax, title: Optional[str] = None, *, xlabel: Optional[str] = None, ylabel: Optional[str] = None,
           xlog: Optional[int] = None, ylog: Optional[int] = None, legend: Optional[Dict[str, Any]] = None,
           grid: Optional[Dict[str, Any]] = None) -> None:
    """The results' axes, drawn one way: log scales of base `xlog` / `ylog`, the labels, a 10-point title, a
    legend (`legend`: its keyword arguments) and a faint grid (`grid`: its keyword arguments); None leaves one out.
    It sets the scales, so ticks set by hand come after it."""
    for log_base, set_scale in ((xlog, ax.set_xscale), (ylog, ax.set_yscale)):
        if log_base:
            set_scale("log", base=log_base)
    for text, set_text in ((xlabel, ax.set_xlabel), (ylabel, ax.set_ylabel)):
        if text:
            set_text(text)
    if title:
        ax.set_title(title, fontsize=10)
    if legend is not None:
        ax.legend(**legend)
    if grid is not None:
        ax.grid(**{"alpha": 0.3, **grid})


def write_outputs(out_dir: str, name: str, rows: List[Row], markdown: str, plot: Optional[Callable[[Any], None]] = None,
                  figure: Tuple[float, ...] = (8.0, 4.8)) -> List[str]:
    """NAME.json, NAME.csv, NAME.md and, with `plot(axes)`, NAME.png in out_dir; returns the paths written. `plot`
    draws on the axes of a new figure of size `figure`: (width, height) or (width, height, columns of axes)."""
    base = os.path.join(out_dir, name)
    write_json(base + ".json", rows)
    write_csv(base + ".csv", rows)
    atomic_write_text(base + ".md", markdown)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from reformer_jax.training.checkpoint import atomic_write

        width, height, ncols = (*figure, 1)[:3]
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=True)
        plot(axes)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write(base + ".png", buffer.getvalue())
    return [base + ext for ext in (".json", ".csv", ".md") + ((".png",) if plot is not None else ())]
