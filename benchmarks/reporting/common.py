"""What every REPORT.md section needs: reading a results file, and the report's number formats."""

from __future__ import annotations

import os
from typing import List, Optional

from benchmarks.output import MIB, Row, read_json


def load(results: str, name: str) -> Optional[List[Row]]:
    """The rows of results/NAME.json, or None when that experiment has not been run."""
    path = os.path.join(results, name + ".json")
    return read_json(path) if os.path.exists(path) else None


def slope(xs, ys) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def mib(b) -> str:
    return f"{b / MIB:,.0f}"
