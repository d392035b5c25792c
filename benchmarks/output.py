"""Result files of the benchmarks: JSON rows, CSV, a Markdown table and a PNG, each written atomically (through a
temporary file in the same directory and `os.replace`, so an interrupted run never leaves half a file)."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

MIB = 2**20

Row = Dict[str, Any]
# A Markdown column: (row key or function of the row, header, format of the value)
Column = Tuple[Any, str, str]


def atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def write_json(path: str, rows: List[Row]) -> None:
    atomic_write_text(path, json.dumps(rows, indent=1, sort_keys=False) + "\n")


def read_json(path: str) -> List[Row]:
    with open(path) as f:
        return json.load(f)


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


def new_figure(width: float = 8.0, height: float = 4.8, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), squeeze=True)


def save_figure(path: str, fig) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def backend_name(name: str) -> str:
    """A result's file name: NAME on CPU, NAME_<backend> elsewhere (GPU results sit beside the CPU ones)."""
    import jax

    return name if jax.default_backend() == "cpu" else f"{name}_{jax.default_backend()}"


def write_outputs(out_dir: str, name: str, rows: List[Row], markdown: str,
                  plot: Optional[Callable[[str], None]] = None) -> List[str]:
    """NAME.json, NAME.csv, NAME.md and (with `plot(path)`) NAME.png in out_dir; returns the paths written."""
    base = os.path.join(out_dir, name)
    write_json(base + ".json", rows)
    write_csv(base + ".csv", rows)
    atomic_write_text(base + ".md", markdown)
    if plot is not None:
        plot(base + ".png")
    return [base + ext for ext in (".json", ".csv", ".md") + ((".png",) if plot is not None else ())]
