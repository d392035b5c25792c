"""REPORT.md's mesh sections: per-device memory on a device mesh (benchmarks.mesh_memory) and the CPU's cores split
into devices beside Hugging Face (benchmarks.speed --out_dir=RESULTS/mesh)."""

from __future__ import annotations

import os
from typing import List

from benchmarks import targets
from benchmarks.output import markdown_table
from benchmarks.reporting.common import load


def sections(results: str, rel: str) -> List[str]:
    """On a device mesh: per-device memory (benchmarks.mesh_memory) and the tensor2 speed row beside Hugging Face
    (benchmarks.speed --ours=default,tensor2 --compare=peers --out_dir=RESULTS/mesh), where their JSON exists."""
    from benchmarks import mesh_memory, speed

    out: List[str] = []
    rows = load(results, "mesh_memory")
    if rows:
        first = rows[0]
        out.append("\n## On a device mesh: per-device memory\n")
        out.append(f"Command: `{first['command']}` -> [`mesh_memory.json`]({rel}/mesh_memory.json). Machine: "
                   f"{first['platform']}, {first['cpu_count']} CPUs split into CPU devices "
                   "(`jax_num_cpu_devices`); jax "
                   f"{first['jax_version']}, jaxlib {first['jaxlib_version']}. XLA's compile-time analysis of the "
                   "sharded training step (`analyze_train_step(..., mesh=...)`), every figure per device; the "
                   "seed's setup (d_model 512, 8 heads, d_ff 2048, 6 layers, 8 hash rounds, length 4096, "
                   "Adafactor, float32).\n")
        out.extend(f"- {line}" for line in targets.mesh_target_lines(rows))
        out.append("")
        out.append(mesh_memory.markdown(rows).split("\n\n")[0])
    peers = load(os.path.join(results, "mesh"), "speed_peers")
    if peers:
        first = peers[0]
        loads = [r[k] for r in peers for k in ("loadavg_before", "loadavg_after") if r.get(k) is not None]
        out.append("\n## On a device mesh: the CPU's cores as two devices, against Hugging Face\n")
        out.append(f"{speed.command_text(peers)} -> [`mesh/speed_peers.json`]({rel}/mesh/speed_peers.json). "
                   f"Machine: {first['platform']}, {first['cpu_count']} CPUs (shared with other jobs: 1-minute "
                   f"load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f}), jax "
                   f"{first['jax_version']}. Configuration P; rounds alternate between the implementations.\n")
        out.append(markdown_table(peers, speed.SPEED_COLUMNS))
        out.append("")
        out.extend(f"- {line}" for line in targets.peer_target_lines(peers))
        by_impl = {r["implementation"]: r for r in peers}
        main_hf = {r["implementation"]: r for r in (load(results, "speed_peers") or [])}.get("hf")
        hf_here = by_impl.get("hf", {}).get("median_step_s")
        if main_hf and hf_here and hf_here > 1.5 * main_hf["median_step_s"]:
            out.append(f"- Caution: Hugging Face's step took {by_impl['hf']['median_step_s']:.1f} s here against "
                       f"{main_hf['median_step_s']:.1f} s in the less loaded run of the peer table above: torch's "
                       "threads suffer more than XLA's from an oversubscribed machine, so these ratios overstate "
                       "what an idle machine gives (there, ours reached the speed-up of the table above).")
        plain, split = by_impl.get("ours"), by_impl.get("ours_tensor2")
        if plain and split and plain.get("median_step_s") and split.get("median_step_s"):
            paired = sorted(targets.paired_speedups(split, plain))
            round_by_round = (f", {paired[len(paired) // 2]:.2f} x the one-device speed round by round"
                              if paired else "")
            out.append(f"- Two host devices with the heads split (tensor2) against one: step "
                       f"{split['median_step_s']:.2f} s against {plain['median_step_s']:.2f} s{round_by_round}"
                       + (": faster, so it is main.py's CPU default (--mesh unset on a CPU with 2 or more cores)"
                          if split["median_step_s"] < plain["median_step_s"] else
                          ": slower, so main.py keeps one device (every device on data) as its CPU default") + ".")
    return out
