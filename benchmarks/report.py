"""Write benchmarks/REPORT.md from the committed results, read from the files alone.

    python -m benchmarks.report [--results=benchmarks/results] [--report=benchmarks/REPORT.md]

Every result (each NAME.json with the NAME.md its driver drew from the same rows, subfolders included) becomes one
section: the driver's tables as they are, the command, machine and versions its JSON records, its plot, and the
targets judged from its rows (`benchmarks.targets`). The memory experiments, which the report is built around, must
be there.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import List

from benchmarks import targets
from benchmarks.output import atomic_write_text, read_json

MEMORY = ("variants", "hashes", "layers", "seqlen", "timeline", "floor", "runtime")
ORDER = MEMORY + ("mesh_memory", "tpu", "tpu_longest", "tpu_long", "speed_peers", "speed", "speed_length",
                  "speed_linearity", "speed_profile", "hf_enwik8_65536", "generate", "generate_full", "generate_bpc",
                  "reversible_drift", "quality_shakespeare", "quality_synthetic")
TITLES = {"mesh_memory": "On a device mesh: per-device memory"}  # results whose Markdown has no title of its own
TARGETS = {"mesh_memory": targets.mesh_target_lines, "speed_peers": targets.peer_target_lines,
           "speed_length": targets.length_target_lines, "speed_linearity": targets.linearity_target_lines}


def _target_lines(results: str, path: str, name: str, rows) -> List[str]:
    if name in TARGETS:
        return TARGETS[name](rows)
    if name == "runtime" and not os.path.exists(os.path.join(results, "runtime_gpu.json")):
        return ["**GPU: no results.** The runtime experiment ran on this CPU only; the GPU path (memory_stats() peak, "
                "device memory profile) is covered by unit tests with a fake stats source; "
                "`bash benchmarks/run_gpu_runtime.sh` is the prepared script for a GPU machine."]
    if name.startswith("quality_"):
        from benchmarks import quality

        lines = targets.quality_target_lines(name[len("quality_"):], {r["variant"]: r for r in rows})
        others = sorted(glob.glob(os.path.join(results, "seeds", "*", name + ".json")))
        if os.path.dirname(path) == results and others:
            lines.append("\n" + quality.seed_spread([rows] + [read_json(p) for p in others]))
        return lines
    return []


def sections(results: str, rel: str) -> List[str]:
    """The report's sections for every NAME.json with a NAME.md under `results` (linked as `rel`)."""
    paths = [p for p in glob.glob(os.path.join(results, "**", "*.json"), recursive=True)
             if os.path.exists(p[:-len(".json")] + ".md")]
    rank = lambda p: (ORDER.index(os.path.basename(p)[:-5]) if os.path.basename(p)[:-5] in ORDER else len(ORDER),
                      p.count(os.sep), p)  # noqa: E731
    out: List[str] = []
    for path in sorted(paths, key=rank):
        name, where = os.path.basename(path)[:-5], os.path.relpath(path, results)
        data = read_json(path)
        rows = data if isinstance(data, list) else data.get("rows") or [data]
        first = data if isinstance(data, dict) else rows[0]
        with open(path[:-5] + ".md") as f:
            text = f.read()
        title, _, body = text.partition("\n") if text.startswith("#") else (f"# {TITLES[name]}", "", text)
        folder = os.path.dirname(where)
        out.append(f"\n#{title}" + (f" (`{folder}/`)" if folder else "") + "\n")
        machine = first.get("machine") or first
        commands = "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command") for r in rows) if c)
        if "Command" not in body and commands:
            out.append(f"Command: {commands} -> [`{where}`]({rel}/{where}). Machine: {machine.get('platform')}, "
                       f"{machine.get('cpu_count')} CPUs, backend {machine.get('backend')}; jax "
                       f"{machine.get('jax_version')}, jaxlib {machine.get('jaxlib_version')}.\n")
        else:
            out.append(f"Results: [`{where}`]({rel}/{where}).\n")
        if os.path.exists(path[:-5] + ".png"):
            out.append(f"![{name}]({rel}/{where[:-5]}.png)\n")
        out.append("\n".join("#" + line if line.startswith("#") else line for line in body.strip("\n").split("\n")))
        lines = _target_lines(results, path, name, rows)
        out.extend(["", *(line if line.startswith("\n") else f"- {line}" for line in lines)] if lines else [])
    return out


def build(results: str, report_path: str) -> str:
    """Write the report at `report_path` from the files in `results`; returns its text."""
    missing = [n for n in MEMORY if not os.path.exists(os.path.join(results, n + ".json"))]
    if missing:
        raise SystemExit(f"missing results for {', '.join(missing)} in {results}: run "
                         "`python -m benchmarks.memory --experiment=all` first.")
    rel = os.path.relpath(results, os.path.dirname(os.path.abspath(report_path)))
    text = "\n".join(["# Benchmark results: the seed's memory experiments, speed, generation and quality\n",
                      "Generated by `python -m benchmarks.report` from the result files in "
                      f"[`{rel}/`]({rel}/); do not edit by hand. What the figures mean: [docs/](../docs/).",
                      *sections(results, rel)]) + "\n"
    atomic_write_text(report_path, text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--report", default=os.path.join("benchmarks", "REPORT.md"))
    args = parser.parse_args(argv)
    build(args.results, args.report)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
