"""REPORT.md's speed sections (benchmarks.speed): the peer comparison, the length sweeps and the step profile."""

from __future__ import annotations

from typing import List

from benchmarks import targets
from benchmarks.output import markdown_table
from benchmarks.reporting.common import load


def sections(results: str, rel: str) -> List[str]:
    """Training speed (benchmarks.speed): the peer comparison and the length sweep, where their JSON exists."""
    from benchmarks import speed
    from benchmarks.speed import LENGTH_COLUMNS, SPEED_COLUMNS

    out: List[str] = []
    targets_of = {"speed_peers": targets.peer_target_lines, "speed_length": targets.length_target_lines,
                  "speed_linearity": targets.linearity_target_lines}
    for name, title, columns in (("speed_peers", "Training speed against the PyTorch Reformers", SPEED_COLUMNS),
                                 ("speed_length", "Training speed against length", LENGTH_COLUMNS),
                                 ("speed_linearity", "Training speed against length, every length in the same "
                                  "timing rounds", LENGTH_COLUMNS)):
        rows = load(results, name)
        if not rows:
            continue
        first = rows[0]
        loads = [r[k] for r in rows for k in ("loadavg_before", "loadavg_after") if r.get(k) is not None]
        peer_versions = "".join(f", {k[:-len('_version')]} {v}" for k, v in dict(
            (k, r[k]) for r in rows for k in ("torch_version", "transformers_version", "reformer_pytorch_version")
            if r.get(k)).items())
        out.append(f"\n## {title}\n")
        out.append(f"{speed.command_text(rows)} -> [`{name}.json`]({rel}/{name}.json). Machine: "
                   f"{first['platform']}, {first['cpu_count']} CPUs, backend {first['backend']}; jax "
                   f"{first['jax_version']}, jaxlib {first['jaxlib_version']}{peer_versions}. Median training step (compile and "
                   f"warm-up excluded, rounds alternating between implementations); peak RSS of each "
                   f"implementation's own process, compilation included. 1-minute load average during the run "
                   f"{min(loads, default=0):.1f} to {max(loads, default=0):.1f} on {first['cpu_count']} CPUs.\n")
        if any("sequential_heads" not in r.get("config", {}) for r in rows if r["implementation"].startswith("ours")):
            out.append("These rows were measured by an earlier version of the code, before heads (and, by default, "
                       "hash rounds) were processed one at a time: each row's `config` says what ran. Rerun the "
                       "command to measure today's defaults.\n")
        out.append(markdown_table(rows, columns))
        out.append("\nTargets, judged from these rows (`benchmarks/targets.py`):\n")
        out.extend(f"- {line}" for line in targets_of[name](rows))
    rows = load(results, "speed_profile")
    if rows:
        from benchmarks import step_profile

        first = rows[0]
        out.append("\n## Where the training step's time goes\n")
        out.append(f"{speed.command_text(rows)} -> [`speed_profile.json`]({rel}/speed_profile.json). Machine: "
                   f"{first['platform']}, {first['cpu_count']} CPUs, backend {first['backend']}; jax "
                   f"{first['jax_version']}, jaxlib {first['jaxlib_version']}. Preset {first['model']}, length "
                   f"{first['seq_len']}, batch {first['batch_size']}, {first['n_layers']} layers, "
                   f"{first['n_hashes']} hash rounds, chunk {first['chunk_len']} (`benchmarks.step_profile`).\n")
        out.append(step_profile.markdown(rows))
    out.extend(hf_enwik8_section(results, rel))
    return out


def hf_enwik8_section(results: str, rel: str) -> List[str]:
    """Evaluation at google/reformer-enwik8's configuration and length against Hugging Face (benchmarks.hf_enwik8),
    where results/hf_enwik8_65536.json exists."""
    from benchmarks import hf_enwik8

    result = load(results, "hf_enwik8_65536")
    if not result:
        return []
    return ["\n## google/reformer-enwik8's configuration at 65,536 tokens: evaluation against Hugging Face\n",
            f"Command: `{result['command']}` -> [`hf_enwik8_65536.json`]({rel}/hf_enwik8_65536.json). Machine: "
            f"{result['machine']['platform']}, {result['machine']['cpu_count']} CPUs; "
            f"{', '.join(f'{k} {v}' for k, v in result['versions'].items())}. Random weights at the published "
            "configuration (`reformer_jax.model.sizes.HF_ENWIK8`), one window of tiny Shakespeare, batch 1, each "
            "side once in its own process (`benchmarks/hf_enwik8.py`).\n", hf_enwik8.table(result),
            hf_enwik8.summary(result)]


