"""REPORT.md's quality sections (benchmarks.quality): each task's targets, seed spread and tables."""

from __future__ import annotations

import glob
import os
from typing import List

from benchmarks import targets
from benchmarks.output import read_json
from benchmarks.reporting.common import load


def sections(results: str, rel: str) -> List[str]:
    """Quality (benchmarks.quality): the targets of each task, then the driver's own tables, where its JSON exists."""
    from benchmarks import quality

    out: List[str] = []
    for task in quality.TASKS:
        rows = load(results, f"quality_{task}")
        if not rows:
            continue
        by_name = {r["variant"]: r for r in rows}
        name = f"quality_{task}"
        out.append(f"\n## Quality: {task}\n")
        out.append(f"[`{name}.json`]({rel}/{name}.json); learning curves: [`{name}.png`]({rel}/{name}.png)\n")
        out.extend(f"- {line}" for line in targets.quality_target_lines(task, by_name))
        others = {os.path.relpath(path, results): read_json(path)
                  for path in sorted(glob.glob(os.path.join(results, "seeds", "*", f"{name}.json")))}
        spread = quality.seed_spread([rows] + list(others.values())) if others else ""
        if spread:
            commands = "; ".join(f"`{other[0]['command']}` -> [`{path}`]({rel}/{path})"
                                 for path, other in others.items())
            out.append(f"\n{spread}\nOther seeds: {commands}.\n")
        table = quality.markdown(task, rows, rows[0], rows[0]["command"])
        out.append("\n" + table.split("\n", 1)[1].lstrip("\n"))
    return out


