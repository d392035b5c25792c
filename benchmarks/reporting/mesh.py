"""REPORT.md's mesh sections: per-device memory on a device mesh (benchmarks.mesh_memory) and the speed of the
CPU's cores split into devices beside Hugging Face (benchmarks.speed --out_dir=RESULTS/mesh)."""

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
        out.extend(f"- {line}" for line in mesh_memory.target_lines(rows))
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
    return out
